"""attn_ops.attention_with_kvcache through the kernels: each sequence against float64 math on the keys
its cache holds, dense and paged caches, split counts, appending."""

import pytest
import torch

import attn_ops
from attn_ops.kernels.attn_decode import MAX_SPLITS, MIN_KEYS_PER_SPLIT, split_count
from truth import DEVICES, check_against_float64, check_lse_against_float64


def make_cache(lengths, capacity, heads_kv, head_dim, dtype, device, head_dim_v=None):
    """A dense cache [B, Hkv, capacity, D] (and V's) holding random rows up to each sequence's length
    and NaN after: a kernel that reads past a length returns NaN."""
    shape = (len(lengths), heads_kv, capacity)
    k, v = torch.randn(*shape, head_dim, device=device), torch.randn(*shape, head_dim_v or head_dim, device=device)
    for b, n in enumerate(lengths):
        k[b, :, n:] = v[b, :, n:] = float("nan")
    return k.to(dtype), v.to(dtype)


def paged(k_cache, v_cache, page):
    """The same rows in pools of pages of `page` rows, stored [num_blocks, page, Hkv, D] and returned
    as [num_blocks, Hkv, page, D] views, each sequence's blocks in random places (NaN in the spare
    ones); and the int32 block table they share."""
    batch, _, capacity, _ = k_cache.shape
    per_sequence = capacity // page
    num_blocks = batch * per_sequence + 3
    table = torch.randperm(num_blocks, device=k_cache.device)[: batch * per_sequence].view(batch, per_sequence)
    pools = []
    for cache in (k_cache, v_cache):
        heads, dim = cache.shape[1], cache.shape[3]
        pool = torch.full((num_blocks, page, heads, dim), float("nan"), dtype=cache.dtype, device=cache.device)
        pool[table] = cache.view(batch, heads, per_sequence, page, dim).permute(0, 2, 3, 1, 4)
        pools.append(pool.transpose(1, 2))
    return *pools, table.int()


def cached_rows(cache, b, n):
    """Sequence b's first n rows of a dense cache as [1, Hkv, n, D]."""
    return cache[b : b + 1, :, :n]


def check_each_sequence(q, k_cache, v_cache, lengths, out, lse, causal=False, window=None, alibi_slopes=None,
                        **kw):
    """Each sequence's output and LSE against float64 math over the keys it sees (2x rule); a sequence
    that sees no key gives zeros (lse -inf, or the sink)."""
    rules = dict(causal="bottom_right" if causal else False, window=window, align="bottom_right", **kw)
    for b, n in enumerate(lengths):
        k, v = cached_rows(k_cache, b, n), cached_rows(v_cache, b, n)
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        if n == 0 and kw.get("sinks") is None:
            assert torch.equal(out[b], torch.zeros_like(out[b])) and torch.all(lse[b] == float("-inf"))
            continue
        check_against_float64(q[b : b + 1], k, v, out[b : b + 1], alibi_slopes=slopes, **rules)
        check_lse_against_float64(q[b : b + 1], k, v, lse[b], alibi_slopes=slopes, **rules)


LENGTHS = (0, 1, 17, 64, 100)  # empty, one key, odd, a whole number of tiles and of 16-row blocks, across blocks
QUERIES = {"1": (1, False), "4_causal": (4, True), "4": (4, False)}
HEADS = {"gqa8": (8, 1), "mha": (4, 4)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["dense", "paged"])
@pytest.mark.parametrize("queries", QUERIES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("num_splits", [1, 2, 7, None])
def test_each_sequence_matches_float64(device, layout, queries, heads, num_splits):
    (len_q, causal), (heads_q, heads_kv) = QUERIES[queries], HEADS[heads]
    k_cache, v_cache = make_cache(LENGTHS, 128, heads_kv, 32, torch.float32, device, head_dim_v=16)
    q = torch.randn(len(LENGTHS), heads_q, len_q, 32, device=device)
    k_in, v_in, table = paged(k_cache, v_cache, 16) if layout == "paged" else (k_cache, v_cache, None)
    seqlens = torch.tensor(LENGTHS, dtype=torch.int32, device=device)
    out, lse = attn_ops.attention_with_kvcache(q, k_in, v_in, seqlens, block_table=table, causal=causal,
                                               num_splits=num_splits, return_lse=True, backend="triton")
    assert out.shape == (len(LENGTHS), heads_q, len_q, 16) and lse.shape == (len(LENGTHS), heads_q, len_q)
    check_each_sequence(q, k_cache, v_cache, LENGTHS, out, lse, causal=causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page", [16, 48])
def test_a_paged_cache_gives_the_dense_result_bitwise(device, page):
    """The same logical cache through shuffled blocks of 16 or 48 rows (a page that is not a power of
    two, nor a multiple of the key tile): the same tiles in the same order, so the same bits."""
    lengths = (5, 96, 0, 61)
    k_cache, v_cache = make_cache(lengths, 96, 2, 32, torch.float16, device)
    q = torch.randn(4, 4, 2, 32, device=device, dtype=torch.float16)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    dense = attn_ops.attention_with_kvcache(q, k_cache, v_cache, seqlens, causal=True, num_splits=2, backend="triton")
    k_pool, v_pool, table = paged(k_cache, v_cache, page)
    assert not k_pool.is_contiguous()  # a [num_blocks, page, Hkv, D] pool read in place
    out = attn_ops.attention_with_kvcache(q, k_pool, v_pool, seqlens, block_table=table, causal=True, num_splits=2,
                                         backend="triton")
    assert torch.equal(out, dense)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["dense", "paged"])
def test_appending_writes_exactly_the_new_rows_then_attends_to_them(device, layout):
    lengths, len_new = (0, 5, 16, 29), 3  # the last ones cross a 16-row block
    k_cache, v_cache = make_cache(lengths, 32, 2, 16, torch.float32, device)
    logical = [torch.cat([cached_rows(c, b, n) for b, n in enumerate(lengths)], 2) for c in (k_cache, v_cache)]
    k_new, v_new = (torch.randn(4, 2, len_new, 16, device=device) for _ in range(2))
    q = torch.randn(4, 4, len_new, 16, device=device)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    k_in, v_in, table = paged(k_cache, v_cache, 16) if layout == "paged" else (k_cache, v_cache, None)
    before = [t.clone() for t in (k_in, v_in)]
    out = attn_ops.attention_with_kvcache(q, k_in, v_in, seqlens, k_new=k_new, v_new=v_new, block_table=table,
                                         causal=True, backend="triton")
    assert torch.equal(seqlens, torch.tensor(lengths, dtype=torch.int32, device=device))  # not modified
    for cache, old, new in zip((k_in, v_in), before, (k_new, v_new)):
        written = torch.zeros(cache.shape[0], cache.shape[2], dtype=torch.bool, device=device)  # (block or b, row)
        for b, n in enumerate(lengths):
            for t in range(n, n + len_new):
                where = (int(table[b, t // 16]), t % 16) if table is not None else (b, t)
                written[where] = True
                assert torch.equal(cache[where[0], :, where[1]], new[b, :, t - n])
        # Everything else, NaN included, is as it was.
        keep = ~written[:, None, :, None].expand_as(cache)
        assert torch.equal(cache[keep].isnan(), old[keep].isnan())
        assert torch.equal(cache[keep].nan_to_num(), old[keep].nan_to_num())
    for b, n in enumerate(lengths):
        k = torch.cat([logical[0][:, :, sum(lengths[:b]):sum(lengths[: b + 1])], k_new[b : b + 1]], 2)
        v = torch.cat([logical[1][:, :, sum(lengths[:b]):sum(lengths[: b + 1])], v_new[b : b + 1]], 2)
        check_against_float64(q[b : b + 1], k, v, out[b : b + 1], causal="bottom_right")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_empty_caches_give_zeros_and_the_sink(device, num_splits):
    k_cache, v_cache = make_cache((0, 0), 64, 2, 16, torch.float32, device)
    q = torch.randn(2, 4, 3, 16, device=device)
    out, lse = attn_ops.attention_with_kvcache(q, k_cache, v_cache, 0, causal=True, num_splits=num_splits,
                                               return_lse=True, backend="triton")
    assert torch.equal(out, torch.zeros_like(out)) and torch.all(lse == float("-inf"))
    sinks = torch.randn(4, device=device)
    out, lse = attn_ops.attention_with_kvcache(q, k_cache, v_cache, 0, sinks=sinks, num_splits=num_splits,
                                               return_lse=True, backend="triton")
    assert torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(lse, sinks[None, :, None].expand_as(lse))


MODIFIERS = {
    "window": {"window": (20, 0)},
    "window_unbounded_left": {"window": (-1, 2)},
    "softcap_alibi_sinks": {"softcap": 2.0, "alibi_slopes": "per_head", "sinks": True},
    "alibi_per_sequence": {"alibi_slopes": "per_sequence"},
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("modifier", MODIFIERS)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_score_modifiers_match_float64(device, modifier, num_splits):
    lengths = (70, 0, 9)
    kw = dict(MODIFIERS[modifier])
    if kw.get("alibi_slopes") == "per_head":
        kw["alibi_slopes"] = torch.rand(8, device=device)
    elif kw.get("alibi_slopes") == "per_sequence":
        kw["alibi_slopes"] = torch.rand(3, 8, device=device)
    if kw.pop("sinks", False):
        kw["sinks"] = torch.randn(8, device=device)
    k_cache, v_cache = make_cache(lengths, 80, 2, 32, torch.float32, device)
    q = torch.randn(3, 8, 4, 32, device=device)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    out, lse = attn_ops.attention_with_kvcache(q, k_cache, v_cache, seqlens, causal=True, num_splits=num_splits,
                                               return_lse=True, backend="triton", **kw)
    check_each_sequence(q, k_cache, v_cache, lengths, out, lse, causal=True, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_float64(device, dtype):
    lengths = (100, 33)
    k_cache, v_cache = make_cache(lengths, 128, 2, 64, dtype, device)
    q = torch.randn(2, 8, 1, 64, device=device, dtype=dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    for num_splits in (1, None):
        out, lse = attn_ops.attention_with_kvcache(q, k_cache, v_cache, seqlens, return_lse=True,
                                                   num_splits=num_splits, backend="triton")
        assert out.dtype == dtype and lse.dtype == torch.float32
        check_each_sequence(q, k_cache, v_cache, lengths, out, lse)


@pytest.mark.parametrize("device", DEVICES)
def test_the_output_is_laid_out_like_q(device):
    k_cache, v_cache = make_cache((7,), 16, 2, 16, torch.float32, device)
    q = torch.randn(1, 3, 4, 16, device=device).transpose(1, 2)  # [B, Lq, Hq, D] memory, passed as [B, Hq, Lq, D]
    out = attn_ops.attention_with_kvcache(q, k_cache, v_cache, 7, backend="triton")
    assert out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, attn_ops.attention_with_kvcache(q, k_cache, v_cache, 7, backend="reference"))


def test_split_count_fills_the_gpu_without_tiny_splits():
    assert split_count(programs=264, max_keys=2**17, multiprocessors=132) == 1  # enough programs already
    assert split_count(programs=8, max_keys=2**17, multiprocessors=132) == 33  # about two waves
    assert split_count(programs=8, max_keys=MIN_KEYS_PER_SPLIT * 4, multiprocessors=132) == 4  # no split under 256 keys
    assert split_count(programs=1, max_keys=2**20, multiprocessors=132) == MAX_SPLITS
    assert split_count(programs=8, max_keys=0, multiprocessors=132) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_reference_and_kernels_agree_with_every_argument(device):
    """backend="reference" (the CPU path users get without the interpreter) computes the same call."""
    lengths = (20, 3)
    k_cache, v_cache = make_cache(lengths, 48, 2, 16, torch.float32, device)
    k_pool, v_pool, table = paged(k_cache, v_cache, 16)
    q = torch.randn(2, 4, 2, 16, device=device)
    k_new, v_new = (torch.randn(2, 2, 2, 16, device=device) for _ in range(2))
    kw = dict(k_new=k_new, v_new=v_new, block_table=table, causal=True, window=(10, 0), softcap=3.0,
              alibi_slopes=torch.rand(4, device=device), sinks=torch.randn(4, device=device), return_lse=True)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    pools = [(k_pool.clone(), v_pool.clone()) for _ in range(2)]
    (out, lse), (ref_out, ref_lse) = (attn_ops.attention_with_kvcache(q, *pool, seqlens, backend=backend, **kw)
                                      for pool, backend in zip(pools, ("triton", "reference")))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(*pools))


@pytest.mark.parametrize("device", DEVICES)
def test_several_row_blocks_and_strided_lengths_and_table(device):
    """GQA 8:1 with 9 queries: 72 (query, head) rows, more than one program's 64, the last block
    partial and starting mid-group; cache_seqlens a strided column and the block table column-major
    (the kernels read contiguous copies)."""
    lengths = (40, 7, 90)
    k_cache, v_cache = make_cache(lengths, 96, 1, 16, torch.float32, device)
    k_pool, v_pool, table = paged(k_cache, v_cache, 16)
    q = torch.randn(3, 8, 9, 16, device=device)
    seqlens = torch.tensor([[n, 999] for n in lengths], dtype=torch.int32, device=device)[:, 0]
    table = table.t().contiguous().t()
    assert not seqlens.is_contiguous() and not table.is_contiguous()
    kw = dict(causal=True, window=(30, 0), sinks=torch.randn(8, device=device))
    for num_splits in (1, 3):
        out, lse = attn_ops.attention_with_kvcache(q, k_pool, v_pool, seqlens, block_table=table, num_splits=num_splits,
                                                   return_lse=True, backend="triton", **kw)
        check_each_sequence(q, k_cache, v_cache, lengths, out, lse, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_num_splits_none_splits_a_long_cache(device):
    lengths = (700,)
    k_cache, v_cache = make_cache(lengths, 768, 1, 16, torch.float32, device)
    assert split_count(programs=1, max_keys=768, multiprocessors=8) == 3  # the interpreter's stand-in GPU
    q = torch.randn(1, 4, 1, 16, device=device)
    out, lse = attn_ops.attention_with_kvcache(q, k_cache, v_cache, 700, return_lse=True, backend="triton")
    check_each_sequence(q, k_cache, v_cache, lengths, out, lse)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["dense", "paged"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_a_key_mask_hides_keys_as_a_generations_padding_does(device, layout, num_splits):
    # Left padding (the first keys hidden), holes, a sequence with every key hidden: each sequence
    # against float64 math with the same mask over the keys it sees, the kernels reading it by position.
    lengths = (40, 33, 9, 70)
    k_cache, v_cache = make_cache(lengths, 96, 2, 32, torch.float32, device)
    key_mask = torch.rand(4, 96, device=device) > 0.3
    key_mask[0, :12] = False
    key_mask[2] = False
    q = torch.randn(4, 4, 2, 32, device=device)
    k_in, v_in, table = paged(k_cache, v_cache, 16) if layout == "paged" else (k_cache, v_cache, None)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    out, lse = attn_ops.attention_with_kvcache(q, k_in, v_in, seqlens, block_table=table, key_mask=key_mask,
                                               causal=True, num_splits=num_splits, return_lse=True, backend="triton")
    reference = attn_ops.attention_with_kvcache(q.double(), k_cache.double(), v_cache.double(), seqlens,
                                                key_mask=key_mask, causal=True, return_lse=True, backend="reference")
    for b, n in enumerate(lengths):
        mask = key_mask[b, None, None, None, :n]
        check_against_float64(q[b : b + 1], cached_rows(k_cache, b, n), cached_rows(v_cache, b, n), out[b : b + 1],
                              causal="bottom_right", mask=mask)
    assert torch.equal(out[2], torch.zeros_like(out[2])) and torch.all(lse[2] == float("-inf"))
    torch.testing.assert_close(out.double(), reference[0], atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CUDA graphs")
def test_a_decoding_step_with_its_append_replays_in_a_cuda_graph():
    # No host read and no host-side decision on values anywhere in the step: captured once, it replays
    # with new queries, tokens and lengths written into its inputs, and equals the eager step.
    batch, heads_q, heads_kv, dim, capacity = 4, 8, 2, 64, 512
    k_cache, v_cache = (torch.randn(batch, heads_kv, capacity, dim, device="cuda", dtype=torch.bfloat16)
                        for _ in range(2))
    q = torch.randn(batch, heads_q, 1, dim, device="cuda", dtype=torch.bfloat16)
    k_new, v_new = (torch.randn(batch, heads_kv, 1, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    seqlens = torch.tensor([3, 100, 0, 300], dtype=torch.int32, device="cuda")

    def step():
        return attn_ops.attention_with_kvcache(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new, causal=True)

    side = torch.cuda.Stream()  # warm up (compile, plan) off the capturing stream, as capture requires
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    before = k_cache.clone(), v_cache.clone()
    for lengths in ([7, 0, 200, 511], [1, 2, 3, 4]):
        for t in (q, k_new, v_new):
            t.copy_(torch.randn_like(t))
        seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        k_cache.copy_(before[0])
        v_cache.copy_(before[1])
        graph.replay()
        replayed = captured.clone(), k_cache.clone(), v_cache.clone()
        k_cache.copy_(before[0])
        v_cache.copy_(before[1])
        eager = step(), k_cache, v_cache
        for a, b in zip(replayed, eager):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [-0.7, 0.0], ids=str)
def test_any_finite_scale_as_sdpa_takes_it(device, scale):
    lengths = (5, 40)
    k_cache, v_cache = make_cache(lengths, 64, 2, 16, torch.float32, device)
    q = torch.randn(2, 4, 2, 16, device=device)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    out, lse = attn_ops.attention_with_kvcache(q, k_cache, v_cache, seqlens, causal=True, scale=scale, num_splits=2,
                                               return_lse=True, backend="triton")
    check_each_sequence(q, k_cache, v_cache, lengths, out, lse, causal=True, scale=scale)
