"""How torch lets float32 matmuls run, read by the launchers and by the call descriptions' keys;
torch only, so that describing a call loads no Triton."""

import torch


def tf32_allowed():
    """torch's switch for TF32 in float32 matmuls. torch >= 2.9 reads it as
    ``torch.backends.cuda.matmul.fp32_precision`` (which also reflects the legacy setter); reading the
    legacy ``allow_tf32`` there raises once anything (transformers does) has used the new API."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision == "tf32"
    return matmul.allow_tf32
