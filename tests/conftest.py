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
    """``op_calls(module)`` makes a drop-in `module`'s calls of the op (`attn_ops.api.attention_as`)
    record their keywords in the returned dict (the last call wins) before running the real op."""
    from attn_ops import api

    def spy_on(module):
        seen = {}

        def spy(q, k, v, **kwargs):
            seen.update(kwargs)
            return api.attention_as(q, k, v, **kwargs)

        monkeypatch.setattr(module, "attention_as", spy)
        return seen

    return spy_on
