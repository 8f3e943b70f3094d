#!/usr/bin/env bash
# Set up (or refresh) the project's virtualenv at .venv: idempotent, safe on a fresh machine.
# The CPU build of torch goes in first when no torch is present, because an unpinned resolve pulls a
# multi-GB CUDA build; on a GPU machine (nvidia-smi present) the default CUDA build is taken instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "[setup] installing torch (CUDA build: a GPU is present)"
    "${PIP[@]}" torch
  else
    echo "[setup] installing the CPU build of torch"
    "${PIP[@]}" torch==2.13.0
  fi
fi
EXTRAS=${EXTRAS:-dev}  # tools/test.sh adds `bench`: the suite also checks the TRL side of tools/bench.py
echo "[setup] installing opd_lightning with its extras: $EXTRAS"
"${PIP[@]}" -e ".[$EXTRAS]"
.venv/bin/python -c "import opd_lightning, torch, lightning, transformers; print(f'[setup] ok: torch {torch.__version__}, lightning {lightning.__version__}, transformers {transformers.__version__}')"
