#!/usr/bin/env bash
# One call on a lent GPU machine (run from the repo root, PYTHONPATH=.): the test suite twice
# (a result that moves between runs is a race), the ptxas resource report of the kernels (spills),
# and a quick benchmark sweep. Everything lands under $OUT; the last lines are a short summary.
set -uo pipefail
export PYTHONPATH=. OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"
for run in 1 2; do
  timeout 240 python -m pytest tests -q -x -p no:cacheprovider >"$OUT/pytest-$run.txt" 2>&1
  echo "pytest run $run: $(tail -n 1 "$OUT/pytest-$run.txt")"
done
# Register use and spills of every compiled kernel variant the tests left in Triton's cache.
grep -rhoE '"(name|n_regs|n_spills|shared)": [^,]*' ~/.triton/cache 2>/dev/null | paste - - - - | sort -u >"$OUT/kernel-resources.txt"
echo "kernel variants with spills: $(grep -cvE '"n_spills": 0' "$OUT/kernel-resources.txt" 2>/dev/null || echo 0)"
timeout 300 python -m bench --quick --out "$OUT" >"$OUT/bench.txt" 2>&1
tail -n 40 "$OUT/bench.txt"
