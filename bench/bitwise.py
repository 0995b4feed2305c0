"""Bitwise determinism across processes, for `.ci/gpu.sh`.

The suite's determinism tests run a computation twice in one process and compare the results with
`torch.equal`. As a pytest plugin (`pytest -p bench.bitwise --hashes PATH ...`) this module records,
per test, a hash of both tensors of every such comparison and writes them to PATH as JSON; the
tests seed their inputs, so a second process must record the same hashes. `python -m bench.bitwise
FIRST SECOND` compares two such files and exits 1 unless every test's hashes are equal.
"""

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

_EQUAL = torch.equal
HASHES = {}  # test id -> [[hash of a, hash of b] for each torch.equal(a, b) it made]


def digest(t):
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + raw).hexdigest()[:16]


def pytest_addoption(parser):
    parser.addoption("--hashes", help="write each test's hashes of the tensors it compared here (JSON)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    seen = HASHES.setdefault(item.nodeid, [])

    def recording_equal(a, b):
        seen.append([digest(a), digest(b)])
        return _EQUAL(a, b)

    torch.equal = recording_equal
    try:
        yield
    finally:
        torch.equal = _EQUAL


def pytest_sessionfinish(session):
    path = session.config.getoption("--hashes")
    if path:
        Path(path).write_text(json.dumps(HASHES, indent=1) + "\n")


def compare(first, second):
    """(verdict line, whether every test's hashes match) for two runs' {test id: hashes}."""
    differ = sorted(test for test in first.keys() | second.keys() if first.get(test) != second.get(test))
    tensors = sum(len(pairs) * 2 for pairs in first.values())
    if differ:
        names = ", ".join(differ)
        return f"determinism: DIFFER across processes in {len(differ)} of {len(first)} tests: {names}", False
    if not tensors:
        return "determinism: no tensors compared (no test ran?)", False
    return f"determinism: bitwise equal across processes: {tensors} tensors in {len(first)} tests", True


def main(argv=None):
    paths = sys.argv[1:] if argv is None else argv
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        print(f"determinism: no hashes from {', '.join(missing)} (that run did not finish)")
        return 1
    line, same = compare(*(json.loads(Path(p).read_text()) for p in paths))
    print(line)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
