"""attn-ops: one fused, tiled Triton kernel for masked softmax attention, with a PyTorch fallback."""

from . import reference
from .api import attention, use_backend
from .hf import register_transformers
from .mha import MultiheadAttention
from .sdpa import scaled_dot_product_attention

__all__ = ["MultiheadAttention", "attention", "reference", "register_transformers", "scaled_dot_product_attention",
           "use_backend"]
