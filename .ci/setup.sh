#!/usr/bin/env bash
# Installs attn-ops with everything its tests, benchmarks and integrations use, on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install torch
  else
    # A plain `torch` would pull gigabytes of CUDA wheels onto a machine with no GPU.
    python -m pip install torch==2.13.0
  fi
fi
python -m pip install -q -e ".[test,bench,hf]"
