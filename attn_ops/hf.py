"""Hugging Face transformers integration: ``attn_implementation="attn_ops"``.

Two functions are registered under one name, as transformers needs both:

- a mask function (`AttentionMaskInterface`), called once per forward. Where the caller lets
  `sdpa_mask` skip materialising the mask (its ``allow_is_*_skip`` flags), ours returns the key
  padding alone as a ``[B, 1, 1, Lk]`` view (True = real token; ``[B, 1, 1, 0]`` where nothing is
  padded but the rule must be told): for the plain causal mask and a sliding-window causal layer's,
  the module adding its causal rule and its ``sliding_window`` (which transformers passes to
  attention functions, as to flash attention) as in transformers' flash-attention integration; for
  the plain bidirectional mask the same padding as every query's row (``[B, 1, Lq, Lk]`` through
  stride 0). Four dims: transformers may slice the queries' dimension (Gemma 3n's and 4's KV-shared
  layers keep the last tokens' rows).
  A chunked-attention layer's mask (Llama 4's ``chunked_causal_mask_function``, its chunks shifted by
  each row's left padding) is the causal one while every key lies in one chunk (the key padding
  then, as above); longer, over more than one query, it comes back as a `BlockMask` of that
  function and the key padding, evaluated as `sdpa_mask` evaluates them but a chunk of blocks at a
  time, never ``[Lq, Lk]`` at once: once per forward, for every chunked layer (building evaluates
  each (query, key) once and reads the blocks' counts on the host, a sync per chunk of blocks; the
  attention calls read nothing); the kernels skip the other chunks' blocks. Its decoding steps keep
  the one-row mask. Packed sequences (flash-attn's keywords) on a chunked layer run as causal
  sequences, exact where ``max_length_q`` is at most the chunk; longer ones are refused, as
  transformers' flash-attention path refuses them.
  Other patterns (packed sequences, a sliding cache past its window, static-cache offsets, custom
  overlays) get transformers' own dense `sdpa_mask`.
- an attention function (`AttentionInterface`) with `sdpa_attention_forward`'s signature. A causal
  module (``module.is_causal``) given a mask of one row reads it as key padding under its causal
  rule, bottom-right aligned as a KV cache needs, and the sliding window the call passes (a dense
  mask's one row, a decoding step's, holds that rule already: adding it changes nothing).
  Any other mask is read exactly as SDPA reads it, and no mask as SDPA does (top-left causal for a
  causal module given more than one query). GQA runs without repeating k/v.
  It takes the score modifiers models pass: ``softcap`` (Gemma 2), ``s_aux`` as the per-head sinks
  (gpt-oss) and ``position_bias`` (T5) as a float mask, its gradient flowing back to the bias.
  transformers' paged ``cache`` (continuous batching) is refused: transformers 5.23 lets only its
  own eager, sdpa and flash names drive continuous batching.

Decoding steps (one new token per row, after transformers has written it into its cache) run
through `attention_with_kvcache`, the split-KV kernels, the layer's keys a dense cache: without a
mask over all of them; with a bool key mask (padding, a static cache's unused tail) as the kernels'
`key_mask`, each row visiting its keys up to its last visible one. Nothing is read on the host, so
compiled static-cache generation takes the same kernels.

Packed batches (one row of several sequences, ``position_ids`` restarting at 0 as
`DataCollatorWithFlattening` makes, or flash-attn's ``cu_seq_lens_q``/``cu_seq_lens_k`` keywords) run
through `varlen_attention`, each sequence attending to itself alone: work proportional to the sum
of the sequences' squared lengths, not the row's. The keywords are taken as transformers'
flash-attention path takes them: the sequences they give, the module's causal rule and its
``sliding_window``, the mask not read. With ``position_ids`` alone, transformers builds its dense
block-diagonal mask for such a row; the varlen path is taken only where that mask says exactly
"each token sees its own sequence's tokens (the earlier ones, for a causal module)", which finding
the sequences and comparing the mask read on the host once per forward (the layers share the mask
object; the keywords avoid that read). A packed row with any other mask (a sliding window's dense
mask, say) takes the dense path.
"""

import inspect

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .api import attention, attention_with_kvcache, varlen_attention
from .block_mask import BlockMask

_REQUIREMENT = "Hugging Face transformers >= 5.4"


def register_transformers(name="attn_ops"):
    """Register the op so that ``from_pretrained(..., attn_implementation=name)`` uses it."""
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
    except ImportError as err:
        raise ImportError(f"attn_ops.register_transformers needs {_REQUIREMENT}: pip install 'attn-ops[hf]'") from err
    # Before 5.4 mask functions took cache_position instead of q_length / q_offset.
    if "q_length" not in inspect.signature(sdpa_mask).parameters:
        raise ImportError(f"attn_ops.register_transformers needs {_REQUIREMENT}: pip install -U 'attn-ops[hf]'")
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, padding_or_dense_mask)


def padding_or_dense_mask(
    batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None, **kwargs
):
    """Key padding alone where it says everything, transformers' dense `sdpa_mask` otherwise.

    ``attention_mask`` is the 2-D padding mask ``[B, >= kv_length]`` (True = real token) or None.
    Returns None (no padding, and the rule SDPA reads without a mask), the key padding
    ``[B, 1, 1, kv_length]`` (causal or a sliding-window causal layer: `attention_forward` adds the
    module's causal rule and the layer's window), the rule alone ``[B, 1, 1, 0]`` (nothing padded),
    the key padding as every query's row ``[B, 1, q_length, kv_length]`` through stride 0
    (bidirectional) or the dense ``[B, 1, q_length, kv_length]`` mask.
    """
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    mask_function = causal_mask_function if mask_function is None else mask_function
    # Only where transformers lets `sdpa_mask` skip materialising the mask may ours be small.
    skip = kwargs.get("allow_is_causal_skip", True)
    chunked = _chunked(mask_function)
    # Keys all within one chunk (kv_length <= the chunk size, counted from the row's first real token):
    # the chunked rule is the causal one.
    within_a_chunk = chunked and kv_offset == 0 and kv_length <= (kwargs.get("local_size") or 0)
    causal = (mask_function is causal_mask_function or within_a_chunk) and skip
    bidirectional = mask_function is bidirectional_mask_function and kwargs.get("allow_is_bidirectional_skip", False)
    # Bottom-right causal alignment is exact when the queries are the last q_length of kv_length keys.
    aligned = isinstance(q_offset, int) and q_offset + q_length == kv_length
    covers_keys = attention_mask is None or attention_mask.shape[-1] >= kv_length
    if kv_offset == 0 and covers_keys and bidirectional:
        # Every query's row, through stride 0: a one-row mask would read as a causal layer's padding
        # (some bidirectional encoders' modules say is_causal, Phi-4-multimodal's vision tower's).
        return None if attention_mask is None else attention_mask[:, None, None, :kv_length].expand(
            -1, -1, q_length, -1)
    if chunked and q_length > 1 and skip and not within_a_chunk and not kwargs.get("use_vmap", False):
        return _block_mask(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask,
                           kwargs.get("device", "cpu"))
    sliding = aligned and _sliding_window(mask_function, kwargs) is not None
    if kv_offset == 0 and covers_keys and (sliding or causal and aligned):
        # The key padding alone: `attention_forward` adds the module's causal rule and the layer's
        # window (transformers passes `sliding_window`, as to its flash-attention path).
        if attention_mask is not None:
            return attention_mask[:, None, None, :kv_length]
        if not sliding and (q_offset == 0 or q_length == 1):
            # Read as SDPA reads it: top-left causal, exact when q_length == kv_length; a single query
            # sees every key (a decoding step, which then takes the KV-cache path).
            return None
        return torch.ones(batch_size, 1, 1, 0, dtype=torch.bool, device=kwargs.get("device", "cpu"))
    return sdpa_mask(
        batch_size,
        q_length,
        kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        **kwargs,
    )


def _sliding_window(mask_function, kwargs):
    """The window of a sliding-window causal layer's mask, where `mask_function` is exactly
    transformers' ``sliding_window_causal_mask_function(window)`` (its window overlay on the causal
    rule: `_causal_overlay`) and the call lets the mask be skipped (no overlay, no packed sequences);
    else None, and the layer gets transformers' dense mask."""
    from transformers.masking_utils import sliding_window_overlay

    window = kwargs.get("local_size")
    if not isinstance(window, int) or not kwargs.get("allow_is_causal_skip", True):
        return None
    overlay = _causal_overlay(mask_function)
    if overlay is not None and overlay.__code__ is sliding_window_overlay(window).__code__ \
            and overlay.__closure__[0].cell_contents == window:
        return window
    return None


def _chunked(mask_function):
    """Whether `mask_function` is exactly transformers' ``chunked_causal_mask_function(chunk_size,
    left_padding)`` (its chunk overlay on the causal rule: `_causal_overlay`)."""
    from transformers.masking_utils import chunked_overlay

    overlay = _causal_overlay(mask_function)
    return overlay is not None and overlay.__code__ is chunked_overlay(1, None).__code__


def _causal_overlay(mask_function):
    """The overlay of a mask function that is transformers' ``and_masks(overlay, causal_mask_function)``
    (read from its closure), as its sliding-window and chunked causal rules are made; else None."""
    from transformers.masking_utils import causal_mask_function

    try:
        overlay, rule = mask_function.__closure__[0].cell_contents
    except (AttributeError, IndexError, TypeError, ValueError):  # another kind of mask function
        return None
    return overlay if rule is causal_mask_function and hasattr(overlay, "__code__") else None


def _block_mask(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask, device):
    """A `BlockMask` [B, 1, q_length, kv_length] of transformers' index-based `mask_function` and the
    key padding, exactly as `sdpa_mask` would evaluate them (the same offsets, the padding mask padded
    the same way), built on the device a chunk of blocks at a time: never [Lq, Lk] at once. Building
    reads the blocks' counts on the host (a sync per chunk of blocks, once per forward: the layers
    share the mask)."""
    from transformers.masking_utils import prepare_padding_mask

    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None:
        padding = padding.to(device=device, dtype=torch.bool)

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = mask_function(b, h, q_idx + q_offset, kv_idx + kv_offset)
        return allowed if padding is None else allowed & padding[b, kv_idx + kv_offset]

    return BlockMask.from_mask_mod(mask_mod, batch_size, 1, q_length, kv_length, device=device)


def attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, softcap=None, s_aux=None,
    position_bias=None, **kwargs
):
    """`sdpa_attention_forward`'s contract: q ``[B, Hq, Lq, D]``, k/v ``[B, Hkv, Lk, D]`` in,
    ``(out [B, Lq, Hq, D], None)`` out. ``s_aux`` is ``[Hq]``; ``position_bias`` broadcasts to
    ``[B, Hq, Lq, Lk]`` and is added to the scores, as the mask is."""
    if kwargs.get("cache") is not None:
        raise ValueError(
            "attn_ops attention does not support `cache` (transformers' paged cache for continuous batching); "
            "use attn_implementation='sdpa' or 'eager' there"
        )
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = None
    chunk_size = _chunk_size(module) if kwargs.get("cu_seq_lens_q") is not None else None
    if chunk_size is not None:
        # Packed sequences (flash-attn's keywords) on a chunked layer: exact as causal sequences where
        # none is longer than the chunk, which the block mask of the whole row does not know.
        _check_packed_sequences_fit_the_chunk(chunk_size, kwargs)
        attention_mask = None
    if isinstance(attention_mask, BlockMask):
        # A chunked-attention layer's rule, causal and key padding included (padding_or_dense_mask's).
        out = attention(query, key, value, mask=position_bias, block_mask=attention_mask, scale=scaling, softcap=softcap,
                        sinks=s_aux, dropout_p=dropout)
        return out.transpose(1, 2).contiguous(), None
    if attention_mask is None:
        mask, causal = None, bool(is_causal) and query.shape[2] > 1
    elif attention_mask.dim() == 4 and attention_mask.shape[2] == 1 and is_causal:
        # Key padding (padding_or_dense_mask's; [B, 1, 1, 0]: nothing padded) or one row of a dense
        # mask, under the module's causal rule and a sliding-window layer's window; transformers'
        # window: key kv is seen from query q iff q - sliding_window < kv <= q.
        # The window as transformers' flash-attention path takes it: the call's keyword alone (some
        # models keep `sliding_window` on every layer's module and pass None for their full layers).
        mask, causal = attention_mask if attention_mask.shape[-1] else None, "bottom_right"
        sliding_window = kwargs.get("sliding_window")
        window = (sliding_window - 1, 0) if sliding_window else None
    else:
        mask, causal = attention_mask, False
    if position_bias is not None:
        mask = _with_bias(mask, position_bias)
    decoding = None if position_bias is not None else _decoding_step(query, key, value, s_aux, mask, dropout)
    if decoding is not None:
        cache_seqlens, key_mask = decoding
        out = attention_with_kvcache(query, key, value, cache_seqlens, key_mask=key_mask, window=window, scale=scaling,
                                     softcap=softcap, sinks=s_aux)
        return out.transpose(1, 2).contiguous(), None
    packed = None if position_bias is not None else _packed_sequences(query, key, attention_mask, is_causal, kwargs)
    if packed is not None:
        cu_seqlens, window = packed
        # Bottom-right, as flash-attn aligns a causal rule (the same where the lengths are equal).
        out = varlen_attention(
            query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), *cu_seqlens,
            causal="bottom_right" if is_causal else False, window=window, scale=scaling, softcap=softcap,
            sinks=s_aux, dropout_p=dropout,
        )
        return out[None], None
    out = attention(query, key, value, mask=mask, causal=causal, window=window, scale=scaling, softcap=softcap,
                    sinks=s_aux, dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


def _chunk_size(module):
    """The chunk of a chunked-attention layer (Llama 4's: ``config.layer_types[layer_idx]``), or None."""
    config = getattr(module, "config", None)
    layer_types = getattr(config, "layer_types", None) or ()
    index = getattr(module, "layer_idx", None)
    if isinstance(index, int) and 0 <= index < len(layer_types) and layer_types[index] == "chunked_attention":
        return getattr(config, "attention_chunk_size", None)
    return None


def _check_packed_sequences_fit_the_chunk(chunk_size, kwargs):
    """Packed sequences on a chunked layer run as causal sequences: exact only where none is longer than
    the chunk, which ``max_length_q`` must say (transformers' flash-attention path refuses longer ones)."""
    longest = kwargs.get("max_length_q")
    if not isinstance(longest, int) or longest > chunk_size:
        raise ValueError(f"attn_ops attention: packed sequences (cu_seq_lens_q) on a chunked-attention layer need "
                         f"max_length_q <= its attention_chunk_size ({chunk_size}), got max_length_q={longest!r}; "
                         f"pass longer sequences as a padded batch")


def _with_bias(mask, bias):
    """One float mask from the attention mask and T5's position bias: the op takes a single mask.

    Without a mask the bias goes in as is (its gradient in its own shape, no full-size tensor);
    padding makes a ``[B, Hq, Lq, Lk]`` one, as transformers' SDPA path does.
    """
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.where(mask, float("-inf"))
    return bias + mask


def _decoding_step(query, key, value, sinks, attention_mask, dropout):
    """For a decoding step (one query per row, no dropout, nothing needing a gradient): the
    `attention_with_kvcache` arguments (cache_seqlens, key_mask) over the layer's keys; else None.

    Without a mask every key is seen (a dynamic cache with no padding). A bool key mask
    (``[B, 1, 1, Lk]``: a generation's padding, a static cache's unused tail) goes to the kernels as
    it is, and each row's keys past its last visible one are not visited at all: their count comes
    from the mask on the device. Nothing is read on the host, so this holds under torch.compile too
    (transformers compiles static-cache generation). A row's query is taken to sit at its last
    visible key, as a token just written into the cache does; a padding query (the last prompt row
    of right-padded generation, which transformers warns against) is placed there too, which a
    sliding window then measures from.
    """
    batch, _, len_q, _ = query.shape
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (query, key, value, sinks))
    if len_q != 1 or dropout or needs_grad or key.shape[2] == 0:
        return None
    if attention_mask is None:
        return key.shape[2], None
    if attention_mask.dtype != torch.bool or tuple(attention_mask.shape) != (batch, 1, 1, key.shape[2]):
        return None
    key_mask = attention_mask.reshape(batch, key.shape[2])
    positions = torch.arange(1, key.shape[2] + 1, device=key_mask.device)
    return (key_mask * positions).amax(-1).int(), key_mask  # one past each row's last visible key


# Each mask transformers built for a packed row -> (the position_ids, causality and mask version it was
# checked with, cu_seqlens or None).
_checked_masks = WeakIdKeyDictionary()


def _packed_sequences(query, key, attention_mask, is_causal, kwargs):
    """((cu_seqlens_q, cu_seqlens_k) int32, window) of a packed row, or None when the call is not one
    (or its mask says more).

    flash-attn's keywords ``cu_seq_lens_q``/``cu_seq_lens_k`` (`DataCollatorWithFlattening` with
    ``return_flash_attn_kwargs=True``) are taken as transformers' flash-attention path takes them:
    their sequences, read by the kernels only, with the module's ``sliding_window`` (transformers'
    ``q - W < kv``) and not the mask. Without them, a row whose ``position_ids`` restart is packed only
    where transformers' mask says exactly "each token sees its own sequence's (earlier) tokens":
    finding the sequences and comparing the mask read values on the host, once per forward (the
    layers share the mask object); the keywords avoid that read.
    """
    length = query.shape[2]
    if query.shape[0] != 1 or key.shape[2] != length or length < 2:
        return None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        sliding_window = kwargs.get("sliding_window")
        window = None if sliding_window is None else (sliding_window - 1, 0)
        return (cu_q.to(torch.int32), cu_k.to(torch.int32)), window
    position_ids = kwargs.get("position_ids")
    if attention_mask is None or position_ids is None or position_ids.numel() != length:
        # transformers detects packing only without a cache, and then always builds a mask: no mask
        # means one sequence.
        return None
    checked = _checked_masks.get(attention_mask)
    key = (position_ids, bool(is_causal), attention_mask._version)
    if checked is None or checked[0] is not key[0] or checked[1:3] != key[1:]:
        checked = (*key, _sequences_the_mask_keeps_apart(attention_mask, position_ids.reshape(-1), is_causal))
        _checked_masks[attention_mask] = checked
    return None if checked[3] is None else ((checked[3], checked[3]), None)


def _sequences_the_mask_keeps_apart(mask, positions, causal):
    """int32 cu_seqlens of the sequences `positions` packs (each starting where the position equals the
    row's first: 0, or 2 in RoBERTa-like models), if there are several and a bool [1, 1, L, L] mask
    lets each token see exactly its own sequence's tokens (the earlier ones where `causal`); else None."""
    length = positions.numel()
    if mask.dtype != torch.bool or tuple(mask.shape) != (1, 1, length, length):
        return None  # not transformers' dense mask of one packed row (and no host read to find that)
    starts = (positions == positions[0]).nonzero().view(-1)
    if starts.numel() < 2:
        return None  # a single sequence: the dense call is the same work
    cu_seqlens = torch.cat([starts, starts.new_tensor([length])]).to(torch.int32)
    ids = torch.repeat_interleave(torch.arange(starts.numel(), device=mask.device),
                                  (cu_seqlens[1:] - cu_seqlens[:-1]).to(mask.device))
    expected = ids[:, None] == ids[None, :]
    if causal:
        expected = expected.tril()
    return cu_seqlens if torch.equal(mask[0, 0], expected) else None
