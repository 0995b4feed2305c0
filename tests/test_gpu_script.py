"""`.ci/gpu.sh`, the one script a lent GPU session runs, cannot rot unseen: its CPU dry run (the same
steps, the kernels in Triton's interpreter, a few small tests, toy shapes) runs every step and leaves
every file, no more than a device call brings back."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.bitwise import compare

REPO = Path(__file__).resolve().parents[1]
FILES = {"summary.txt", "pytest.txt", "determinism.txt", "headline.json", "headline.md", "tiles.json", "tiles.md",
         "log.txt"}
STEPS = ("tests", "determinism run 1", "determinism run 2", "headline", "tiles")
MAX_FILES = 8  # what a device call brings back from $OUT


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU session runs the script itself, not its dry run")
def test_dry_run_runs_every_step_and_leaves_its_files(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", ".ci/gpu.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    summary = (tmp_path / "summary.txt").read_text()
    assert done.returncode == 0, summary + done.stderr
    assert {p.name for p in tmp_path.iterdir()} == FILES and len(FILES) <= MAX_FILES
    assert done.stdout.endswith(summary)  # the summary is printed last: a device call returns the output's tail
    for step in STEPS:
        assert f"\n{step}: ok, " in summary, step
    assert "torch " in summary and "triton " in summary
    assert "bitwise equal across processes" in (tmp_path / "determinism.txt").read_text()

    headline = json.loads((tmp_path / "headline.json").read_text())
    assert {"device", "torch", "triton", "cuda", "git", "date"} <= headline["meta"].keys()
    assert headline["meta"]["not_run"] == []
    modes = {(row["mode"], row["mask"]) for row in headline["rows"] if row["ms"] is not None}
    assert {("fwd", "none"), ("bwd", "causal"), ("fwd", "padding"), ("decode", "kvcache")} <= modes

    tiles = json.loads((tmp_path / "tiles.json").read_text())
    assert {row["pass"] for row in tiles["rows"] if row["ms"] is not None} == {"fwd", "bwd"}
    assert any(row["config"] is not None for row in tiles["rows"])  # a candidate, through config=


def test_the_determinism_check_names_the_tests_whose_tensors_differ():
    first = {"a": [["1", "1"]], "b": [["2", "2"]]}
    assert compare(first, first)[1]
    line, same = compare(first, {"a": [["1", "1"]], "b": [["3", "3"]]})
    assert not same and line.endswith(": b")
    assert not compare({"a": []}, {"a": []})[1]  # nothing compared proves nothing
