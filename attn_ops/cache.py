"""Where a sequence's keys live in a KV cache, in torch: writing new tokens in (`append`) and reading a
sequence's keys out (`sequence_rows`, for the reference).

Dense: ``cache[b, :, t]``. Paged: ``cache[table[b, t // page], :, t % page]``, the pool
``[num_blocks, Hkv, page, D]`` in any strides.
"""

import torch


def append(k_cache, v_cache, k_new, v_new, problem):
    """Writes ``k_new[b]``/``v_new[b]`` (``[B, Hkv, L_new, D]``) into the caches in place at positions
    ``cache_seqlens[b] ...`` of sequence b: one indexed write per cache, on the device, no host sync."""
    positions = problem.cache_seqlens[:, None].long() + torch.arange(problem.len_new, device=k_cache.device)
    # Advanced indices split by a slice index [B, L_new, Hkv, D]: the new tokens with their heads inside.
    index = _index(positions, problem.block_table, k_cache.shape[2])  # v_cache's rows are k_cache's
    k_cache[index] = k_new.transpose(1, 2)
    v_cache[index] = v_new.transpose(1, 2)


def sequence_rows(cache, b, length, table):
    """Sequence b's first `length` rows of `cache` as a ``[1, Hkv, length, D]`` tensor."""
    if table is None:
        return cache[b : b + 1, :, :length]
    positions = torch.arange(length, device=cache.device)
    page = cache.shape[2]
    return cache[table[b].long()[positions // page], :, positions % page].transpose(0, 1)[None]


def _index(positions, table, page):
    """The index of `positions` ``[B, n]`` (sequence b's in row b) in a dense cache (`table` None) or
    a paged pool of pages of `page` rows."""
    if table is None:
        return torch.arange(positions.shape[0], device=positions.device)[:, None], slice(None), positions
    return table.gather(1, positions // page).long(), slice(None), positions % page
