"""attn-ops: one fused, tiled Triton kernel for masked softmax attention, with a PyTorch fallback."""

__version__ = "0.2.0"

from . import reference
from .block_mask import BlockMask
from .api import attention, attention_with_kvcache, use_backend, varlen_attention
from .checks import checked_values
from .hf import register_transformers
from .mha import MultiheadAttention
from .ring import gather_sequence, ring_attention, shard_sequence
from .sdpa import scaled_dot_product_attention

__all__ = ["BlockMask", "MultiheadAttention", "__version__", "attention", "attention_with_kvcache", "checked_values",
           "gather_sequence", "reference",
           "register_transformers", "ring_attention", "scaled_dot_product_attention", "shard_sequence", "use_backend",
           "varlen_attention"]
