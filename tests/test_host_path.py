"""No entry point reads tensor values on the host (API.md, "The host path"): each call runs through the
kernel path with its launches stubbed out (`bench.overhead.stubbed_launches`: the launchers do all
their host work, the kernels none, so the calls are fast) inside `no_host_reads()`, which makes every
way of reading a tensor's values on the host raise. Under `attn_ops.checked_values()` the value
checks come back, as host-side errors naming the argument."""

import contextlib
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch._library import custom_ops
from torch.utils._python_dispatch import TorchDispatchMode

import attn_ops
import attn_ops.hf
from bench.overhead import stubbed_launches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # without CUDA the kernels are interpreted (conftest)


class HostRead(AssertionError):
    """A read of tensor values on the host (or a synchronous copy of them) inside `no_host_reads`."""


# Tensor methods and torch functions that read values on the host (.cpu() copies them there).
READ_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")
READ_FUNCTIONS = ("equal", "nonzero")
# The aten ops behind reads made in C++ (bool() of a tensor, torch.equal, a scalar argument taken
# from a tensor), which the patches above do not see.
READ_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default, torch.ops.aten.equal.default,
            torch.ops.aten.is_nonzero.default}


@contextlib.contextmanager
def no_host_reads():
    """Inside, reading tensor values on the host raises `HostRead` where it happens: the methods and
    functions above, and, seen by a dispatch mode, the aten ops above, ops whose output's shape
    depends on the values (nonzero, masked indexing, unique...: the host must read the size), and a
    tensor made of Python values (``torch.tensor([seed], device=...)``: on CUDA a synchronous copy).
    The mode also sees into custom ops (`torch.library.custom_op`), whose Python bodies would
    otherwise run below it. A read the code catches and swallows still fails, on exit."""
    reads = []

    def refuse(what):
        reads.append(what)
        raise HostRead(f"{what}: a host read of tensor values (or a synchronous copy of them)")

    def refusing(what):
        return lambda *args, **kwargs: refuse(what)

    with contextlib.ExitStack() as patches:
        for name in READ_METHODS:
            patches.enter_context(mock.patch.object(torch.Tensor, name, refusing(f"Tensor.{name}")))
        for name in READ_FUNCTIONS:
            patches.enter_context(mock.patch.object(torch, name, refusing(f"torch.{name}")))
        patches.enter_context(_ReadsRefused(refuse))
        yield
    if reads:
        raise HostRead(f"host reads of tensor values raised inside the call and were swallowed there: {reads}")


class _ReadsRefused(TorchDispatchMode):
    def __init__(self, refuse):
        super().__init__()
        self.refuse = refuse

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READ_OPS:
            self.refuse(str(func))
        if _sized_by_values(func, args, kwargs):
            self.refuse(f"{func}, whose output's shape depends on the values")
        if func is torch.ops.aten.lift_fresh.default:
            self.refuse("a tensor made of Python values (on CUDA, a synchronous copy from the host)")
        if _crosses_the_host(func, args, kwargs):
            self.refuse(f"{func} between the CPU and another device")
        custom = custom_ops.OPDEFS.get(func._schema.name)
        if custom is not None:
            # Its Python body would run below this mode, unseen: run it inside the mode instead.
            with self:
                return custom._init_fn(*args, **kwargs)
        return func(*args, **kwargs)


def _sized_by_values(func, args, kwargs):
    """Whether `func` sizes its output from its inputs' values: the ops torch tags so, except
    indexing with integer tensors and repeat_interleave told its output_size."""
    if torch.Tag.dynamic_output_shape not in func.tags:
        return False
    if func is torch.ops.aten.index.Tensor:
        return any(index is not None and index.dtype in (torch.bool, torch.uint8) for index in args[1])
    if func is torch.ops.aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    return True


def _crosses_the_host(func, args, kwargs):
    """Whether `func` copies between the CPU and another device (``.to("cpu")``, ``.copy_``): on CUDA
    a synchronous copy."""
    if func is torch.ops.aten._to_copy.default:
        devices = {args[0].device, kwargs.get("device") or args[0].device}
    elif func is torch.ops.aten.copy_.default:
        devices = {args[0].device, args[1].device}
    else:
        return False
    return len(devices) > 1 and any(device.type == "cpu" for device in devices)


@torch.library.custom_op("host_path_test::reads_inside", mutates_args=())
def _reads_inside(x: torch.Tensor) -> torch.Tensor:
    torch.ops.aten._local_scalar_dense(x.sum())  # a read no Python patch sees
    return x.clone()


READS = {
    "item": lambda t: t[0].item(),
    "tolist": lambda t: t.tolist(),
    "bool": lambda t: bool(t[0]),
    "if": lambda t: 1 if t[0] > 0 else 0,
    "int": lambda t: int(t[0]),
    "list_index": lambda t: [0, 1, 2, 3][t[0]],
    "format": lambda t: f"{t[0]}",
    "Tensor.nonzero": lambda t: t.nonzero(),
    "torch.nonzero": lambda t: torch.nonzero(t),
    "torch.equal": lambda t: torch.equal(t, t),
    "cpu": lambda t: t.cpu(),
    "numpy": lambda t: t.numpy(),
    "aten.equal": lambda t: torch.ops.aten.equal(t, t),
    "aten.is_nonzero": lambda t: torch.ops.aten.is_nonzero(t[:1]),
    "aten._local_scalar_dense": lambda t: torch.ops.aten._local_scalar_dense(t[0]),
    "masked_index": lambda t: t[t > 1],
    "repeat_interleave": lambda t: torch.repeat_interleave(t, t),
    "unique": lambda t: torch.unique(t),
    "tensor_of_python_values": lambda t: torch.tensor([1], device=t.device),
    "to_another_device": lambda t: t.to("cpu" if t.is_cuda else "meta"),  # meta: a second device without CUDA
    "inside_a_custom_op": lambda t: _reads_inside(t),
}


@pytest.mark.parametrize("read", READS)
def test_the_guard_refuses_each_way_of_reading_values(read):
    t = torch.arange(4, device=DEVICE)
    with pytest.raises(HostRead), no_host_reads():
        READS[read](t)


def test_the_guard_fails_a_read_that_the_code_swallows():
    t = torch.arange(4, device=DEVICE)
    with pytest.raises(HostRead, match="swallowed"), no_host_reads():
        try:
            t[0].item()
        except Exception:
            pass


def test_the_guard_lets_device_work_through_and_restores_torch():
    t = torch.arange(4, device=DEVICE)
    with no_host_reads():
        counts = t.clamp(max=2)
        torch.repeat_interleave(t, counts, output_size=5)  # told its size: 0 + 1 + 2 + 2
        t[counts]  # indexing by integers
        torch.where(t > 1, t, -t).cumsum(0)
        t.new_empty(len(t)), torch.full((2,), 3, device=DEVICE)
    assert bool(t[1]) and t.tolist() == [0, 1, 2, 3] and torch.equal(t, t)  # the patches are gone


def test_stubbed_launches_run_the_launchers_not_the_kernels():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    runs = InterpretedFunction.run, JITFunction.run
    q = torch.randn(1, 2, 64, 32, device=DEVICE)
    with stubbed_launches() as launched:
        out = attn_ops.attention(q, q, q, backend="triton")
    assert launched == ["_attn_fwd"] and out.shape == q.shape
    assert (InterpretedFunction.run, JITFunction.run) == runs


@contextlib.contextmanager
def kernel_path():
    """The kernels' host path alone: launches stubbed, ``backend="auto"`` meaning the kernels (for the
    entry points that take no backend argument). Yields the launched kernels' names: a call that
    launched none took the reference, and proves nothing."""
    with stubbed_launches() as launched, attn_ops.use_backend("triton"):
        yield launched
    assert launched, "no kernel launched: the call did not take the kernel path"


def _grad_leaves(*tensors):
    return [t.detach().requires_grad_() for t in tensors]


ATTENTION_CASES = {
    "causal": lambda q: dict(causal=True),
    "modifiers": lambda q: dict(window=(16, 0), align="bottom_right", softcap=20.0,
                                alibi_slopes=torch.rand(q.shape[1], device=DEVICE),
                                sinks=torch.randn(q.shape[1], device=DEVICE, requires_grad=True)),
    "bool_mask": lambda q: dict(mask=torch.rand(q.shape[0], 1, 1, 64, device=DEVICE) > 0.2),
    "learned_bias": lambda q: dict(mask=torch.randn(1, q.shape[1], 64, 64, device=DEVICE, requires_grad=True)),
    "dropout_explicit_seed": lambda q: dict(dropout_p=0.1, seed=1234),
    "dropout_drawn_seed": lambda q: dict(dropout_p=0.1),
}


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_reads_no_values(case, backward):
    q, k, v = _grad_leaves(torch.randn(2, 4, 64, 32, device=DEVICE), *torch.randn(2, 2, 2, 64, 32, device=DEVICE))
    rules = ATTENTION_CASES[case](q)
    with kernel_path(), torch.set_grad_enabled(backward), no_host_reads():
        out, lse = attn_ops.attention(q, k, v, return_lse=True, backend="triton", **rules)
        if backward:
            (out.sum() + lse.sum()).backward()


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
@pytest.mark.parametrize("rules", [dict(causal=True), dict(dropout_p=0.1, seed=1234)], ids=["causal", "dropout"])
def test_varlen_attention_reads_no_values(rules, backward):
    cu_seqlens = torch.tensor([0, 5, 5, 40, 64], dtype=torch.int32, device=DEVICE)
    q, k, v = _grad_leaves(torch.randn(64, 4, 32, device=DEVICE), *torch.randn(2, 64, 2, 32, device=DEVICE))
    with kernel_path(), torch.set_grad_enabled(backward), no_host_reads():
        out = attn_ops.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen_q=35, max_seqlen_k=35,
                                        backend="triton", **rules)
        if backward:
            out.sum().backward()


@pytest.mark.parametrize("seqlens", ["tensor", "int"])
@pytest.mark.parametrize("layout", ["dense", "paged"])
def test_a_decoding_step_with_its_append_reads_no_values(layout, seqlens):
    batch, heads_kv, capacity, page = 3, 2, 64, 16
    k_cache, v_cache = (torch.randn(batch, heads_kv, capacity, 32, device=DEVICE) for _ in range(2))
    table = None
    if layout == "paged":  # each sequence's pages in a shuffled pool, read as [num_blocks, Hkv, page, D]
        table = torch.randperm(batch * capacity // page, device=DEVICE).view(batch, -1).int()
        k_cache, v_cache = (c.view(-1, heads_kv, page, 32) for c in (k_cache, v_cache))
    cache_seqlens = (torch.tensor([0, 17, 62], dtype=torch.int32, device=DEVICE) if seqlens == "tensor" else 40)
    q = torch.randn(batch, 8, 1, 32, device=DEVICE)
    k_new, v_new = (torch.randn(batch, heads_kv, 1, 32, device=DEVICE) for _ in range(2))
    with kernel_path(), torch.no_grad(), no_host_reads():
        attn_ops.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new=k_new, v_new=v_new,
                                        block_table=table, causal=True, backend="triton")


@pytest.fixture
def single_rank_group():
    """A gloo process group of this process alone, gone after the test (test_ring checks that no
    group means an error)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.usefixtures("single_rank_group")
def test_ring_attention_reads_no_values():
    q, k, v = _grad_leaves(*torch.randn(3, 1, 2, 32, 16, device=DEVICE))
    with kernel_path(), no_host_reads():
        out = attn_ops.ring_attention(q, k, v, causal=True)
        out.sum().backward()


# Hugging Face: a tiny Llama runs as transformers runs it; the guard covers the attention function
# each layer calls (the mask function runs once per forward, and hands packed rows to transformers'
# own sdpa_mask).
VOCAB, SEQ = 64, 9


@pytest.fixture
def guarded_layers():
    """Registers the attention function inside `no_host_reads`; returns the list of its calls."""
    transformers = pytest.importorskip("transformers")
    attn_ops.register_transformers()
    calls = []

    def guarded(*args, **kwargs):
        calls.append(args[1].shape)
        with no_host_reads():
            return attn_ops.hf.attention_forward(*args, **kwargs)

    transformers.AttentionInterface.register("attn_ops", guarded)
    yield calls
    transformers.AttentionInterface.register("attn_ops", attn_ops.hf.attention_forward)


def _llama():
    from test_hf import _llama as llama  # test_hf's tiny Llama; imported here, as it needs transformers

    return llama().to(DEVICE)


@pytest.mark.parametrize("padding_mask", [False, True], ids=["no_mask", "all_ones_padding_mask"])
def test_hugging_face_decoding_step_reads_no_values(guarded_layers, padding_mask):
    # The prompt through sdpa fills a dynamic cache; then one step through attn_ops, with the mask
    # generate() passes (all ones: no padding) or none.
    model = _llama()
    ids = torch.randint(0, VOCAB, (2, SEQ + 1), device=DEVICE)
    masks = [torch.ones(2, n, dtype=torch.long, device=DEVICE) if padding_mask else None for n in (SEQ, SEQ + 1)]
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        cache = model(input_ids=ids[:, :SEQ], attention_mask=masks[0], use_cache=True).past_key_values
        model.set_attn_implementation("attn_ops")
        with kernel_path():
            model(input_ids=ids[:, SEQ:], attention_mask=masks[1], cache=cache, use_cache=True)
    assert guarded_layers == [(2, 4, 1, 8)] * 2


def test_hugging_face_prefill_of_one_row_reads_no_values(guarded_layers):
    model = _llama()
    model.set_attn_implementation("attn_ops")
    with kernel_path(), torch.no_grad():
        model(input_ids=torch.randint(0, VOCAB, (1, SEQ), device=DEVICE), use_cache=True)
    assert guarded_layers == [(1, 4, SEQ, 8)] * 2


def test_hugging_face_packed_row_reads_no_values(guarded_layers):
    # One row of three sequences with flash-attn's cu_seq_lens keywords (DataCollatorWithFlattening's
    # return_flash_attn_kwargs=True), without a cache, as in training. (With position_ids alone the
    # backend reads the positions and transformers' mask once per forward to find the sequences:
    # attn_ops.hf's docstring.)
    model = _llama()
    model.set_attn_implementation("attn_ops")
    lengths = (5, 9, 3)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(DEVICE)
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32, device=DEVICE)
    with kernel_path():
        model(input_ids=torch.randint(0, VOCAB, (1, sum(lengths)), device=DEVICE), position_ids=positions,
              use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9)
    assert guarded_layers == [(1, 4, sum(lengths), 8)] * 2


# The reverse: value checks on request, as host-side errors naming the argument. checked_values is
# part of the contract: its absence fails these tests.
def checked_values():
    assert hasattr(attn_ops, "checked_values"), "attn_ops.checked_values() (API.md, 'The host path') is missing"
    return attn_ops.checked_values()


def test_checked_values_names_a_decreasing_cu_seqlens():
    q = torch.randn(8, 4, 32, device=DEVICE)
    good = torch.tensor([0, 3, 5, 8], dtype=torch.int32, device=DEVICE)
    bad = torch.tensor([0, 5, 3, 8], dtype=torch.int32, device=DEVICE)
    with stubbed_launches(), checked_values(), pytest.raises(ValueError, match="cu_seqlens_q"):
        attn_ops.varlen_attention(q, q, q, bad, good, backend="triton")


def test_checked_values_names_a_cache_seqlens_beyond_the_capacity():
    k_cache = torch.randn(2, 2, 32, 16, device=DEVICE)
    q, new = torch.randn(2, 4, 2, 16, device=DEVICE), torch.randn(2, 2, 2, 16, device=DEVICE)
    cache_seqlens = torch.tensor([5, 31], dtype=torch.int32, device=DEVICE)  # 31 + 2 new tokens > 32
    with stubbed_launches(), torch.no_grad(), checked_values(), pytest.raises(ValueError, match="cache_seqlens"):
        attn_ops.attention_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens, k_new=new, v_new=new.clone(),
                                        backend="triton")
