import os

import torch

# Without a GPU the real kernels run on CPU tensors in Triton's interpreter; it must be chosen
# before triton is first imported (torch does not import it on its own).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def op_calls(monkeypatch):
    """``op_calls(module)`` makes `module`'s calls of attn_ops.attention record their keywords in the
    returned dict (the last call wins) before running the real op."""
    import attn_ops

    def spy_on(module):
        seen = {}

        def spy(q, k, v, **kwargs):
            seen.update(kwargs)
            return attn_ops.attention(q, k, v, **kwargs)

        monkeypatch.setattr(module, "attention", spy)
        return seen

    return spy_on
