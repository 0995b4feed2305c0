"""Jobs run in turn within a time budget, saving after each, for the drivers `.ci/gpu.sh` runs
(`bench.headline`, `bench.tiles`): a device call has a fixed length, so what was measured must
survive a step that runs out of time."""

import time


def run_within(jobs, budget_s, run_job, save):
    """Calls `run_job(job)` for each job in turn, then `save(pending)` with the jobs not yet run.
    A job is not started once `budget_s` seconds have passed, and the one under way when SIGINT
    arrives (`.ci/gpu.sh`'s timeout sends it) is given up: both stay pending, and what came before
    stays saved. Returns the pending jobs."""
    deadline = time.monotonic() + budget_s
    pending = list(jobs)
    try:
        while pending and time.monotonic() < deadline:
            run_job(pending[0])
            pending.pop(0)
            save(pending)
    except KeyboardInterrupt:
        print("interrupted: saving what was measured", flush=True)
    save(pending)
    return pending
