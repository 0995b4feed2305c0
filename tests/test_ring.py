"""Ring attention (`attn_ops.ring_attention`) on 2 and 3 gloo ranks in worker processes on this
machine: each case equals float64 attention on the full tensors (see ring_worker.py)."""

import json
import multiprocessing
import time

import pytest
import torch

import attn_ops
import ring_worker

WORLDS = (2, 3)
TIMEOUT_S = 300  # for all the cases of one world size; a hung ring fails the tests instead of CI


@pytest.fixture(scope="module")
def ring_results(tmp_path_factory):
    """world -> case -> (rank -> "passed", "skipped: why" or the traceback), running each world's workers
    once."""
    return {world: _run_workers(world, tmp_path_factory.mktemp(f"ring{world}")) for world in WORLDS}


def _run_workers(world, folder):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=ring_worker.run, args=(rank, world, str(folder / "init"), str(folder)))
               for rank in range(world)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + TIMEOUT_S
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, worker in enumerate(workers) if worker.is_alive()]
    for worker in workers:
        worker.kill() if worker.is_alive() else None
        worker.join()
    if hung:
        pytest.fail(f"ranks {hung} of {world} still running after {TIMEOUT_S} s: killed")
    failed = {rank: w.exitcode for rank, w in enumerate(workers) if w.exitcode}
    assert not failed, f"worker exit codes {failed}"
    per_rank = [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(world)]
    return {case: {rank: results[case] for rank, results in enumerate(per_rank)} for case in per_rank[0]}


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", ring_worker.case_names(3))
def test_ring(ring_results, world, case):
    outcome = ring_results[world][case]
    if outcome[0].startswith("skipped"):
        pytest.skip(outcome[0].removeprefix("skipped: "))
    failures = {rank: trace for rank, trace in outcome.items() if trace != "passed"}
    assert not failures, "\n".join(f"rank {rank}:\n{trace}" for rank, trace in failures.items())


def test_no_process_group():
    q = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="init_process_group"):
        attn_ops.ring_attention(q, q, q)
    with pytest.raises(ValueError, match="init_process_group"):
        attn_ops.shard_sequence(q)
