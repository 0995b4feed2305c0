"""attn-ops: one fused, tiled Triton kernel for masked softmax attention, with a PyTorch fallback."""

from . import reference
from .api import attention, use_backend

__all__ = ["attention", "reference", "use_backend"]
