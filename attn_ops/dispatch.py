"""Which implementation runs a `Problem`: each says what it cannot do and why
(`not_supported_reasons`), and dispatch takes the first that can.

An implementation is a module with ``NAME``, ``not_supported_reasons(problem) -> list[str]`` and
``run(q, k, v, problem) -> (out, lse)``. The fused ones are imported only when a call may use them,
so `import attn_ops` loads none of the kernels (torch's own `torch.nn.attention` imports Triton
where installed). Later variants (Hopper kernels) join `_fused()` ahead of the generic kernels
they specialise. Packed sequences are a `Problem` too (`cu_seqlens_q`
set): the generic kernels and the reference each take them. Decoding against a KV cache is a
`Problem` with `cache_seqlens` set, run by `run_cache` of the implementations `fused_cache()` lists, or the reference's.
"""

import contextlib

import torch

from . import reference
from .checks import check_backend

_auto_backend = "auto"  # what backend="auto" means; set by use_backend (a plain global: torch.compile reads it)


@contextlib.contextmanager
def use_backend(name):
    """Inside ``with use_backend("triton")``, ``backend="auto"`` (and every drop-in) uses `name`."""
    global _auto_backend
    check_backend(name, {"backend": "use_backend's name"})
    previous, _auto_backend = _auto_backend, name
    try:
        yield
    finally:
        _auto_backend = previous


def choose(problem, backend, fused=None):
    """The implementation module that runs `problem` for `backend`, or a ValueError with every reason.

    ``"reference"``: the plain PyTorch path. ``"triton"``: the first fused implementation that
    supports the call, among `fused()` (by default the attention kernels, `_fused`). ``"auto"``: what
    `use_backend` set, else the fused kernels on CUDA and the reference elsewhere; on CUDA it never
    falls back to the reference silently, except for float64, which only the reference computes.
    """
    check_backend(backend, problem.names)
    planned = ("implementation", backend, _auto_backend, fused)  # the answer depends on these and the static parts
    implementation = problem.plans.get(planned)
    if implementation is None:
        implementation = problem.plans[planned] = _choose(problem, backend, fused)
    return implementation


def _choose(problem, backend, fused):
    chosen = _auto_backend if backend == "auto" else backend
    if chosen == "auto":
        on_cuda = problem.device.type == "cuda"
        chosen = "triton" if on_cuda and problem.dtype != torch.float64 else "reference"
    if chosen == "reference":
        return reference
    reasons = {}
    for implementation in (fused or _fused)():
        why = implementation.not_supported_reasons(problem)
        if not why:
            return implementation
        reasons[implementation.NAME] = why
    said = "; ".join(f"{name}: {', '.join(why)}" for name, why in reasons.items())
    asked = f"{problem.names['backend']}={backend!r}"
    if backend == "auto":
        asked += f" inside use_backend({_auto_backend!r})" if _auto_backend != "auto" else " on CUDA"
    raise ValueError(f"{asked} runs the fused kernels, which cannot run this call ({said}). Pass "
                     f"{problem.names['backend']}='reference' (or use attn_ops.use_backend('reference')) for the plain "
                     "PyTorch path")


def _fused():
    """The fused implementations, in order of preference; imported on first use (Triton, the kernels)."""
    from . import fused

    return (fused,)


def fused_cache():
    """The fused implementations of `attention_with_kvcache` (`Problem`s with `cache_seqlens`), in order of preference."""
    from . import decode

    return (decode,)
