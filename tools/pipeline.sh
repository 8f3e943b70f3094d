#!/usr/bin/env bash
# The main job: the whole recipe on the offline tiny world, from nothing to results.json and plots.
#   bash tools/pipeline.sh [--quick] [--out DIR]      (DIR defaults to ./artifacts)
# base -> experts (SFT then GRPO, one per domain) -> MultiExpertOPD student, and the two merge baselines
# (SFT on the experts' samples; one mixed-domain GRPO run), then every model scored on the same held-out
# prompts. A finished stage is skipped and a killed one resumes from its last checkpoint, so re-running
# continues where it stopped. Stages, outputs and plots: opd_lightning/pipeline.py.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$ROOT/.logs"
if ! bash "$ROOT/tools/setup.sh" > "$ROOT/.logs/setup.log" 2>&1; then
  cat "$ROOT/.logs/setup.log" >&2
  echo "[pipeline] set-up failed; its output is above (and in .logs/setup.log)" >&2
  exit 1
fi
echo "[pipeline] set-up done (log: .logs/setup.log)"
exec "$ROOT/.venv/bin/python" -m opd_lightning.pipeline "$@"
