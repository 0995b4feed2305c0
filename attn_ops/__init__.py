"""attn-ops: one fused, tiled Triton kernel for masked softmax attention, with a PyTorch fallback."""

__version__ = "0.2.0"

from . import reference
from .api import attention, use_backend
from .hf import register_transformers
from .mha import MultiheadAttention
from .sdpa import scaled_dot_product_attention

__all__ = ["MultiheadAttention", "__version__", "attention", "reference", "register_transformers",
           "scaled_dot_product_attention", "use_backend"]
