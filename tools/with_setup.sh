#!/usr/bin/env bash
# What tools/pipeline.sh and tools/experiments.sh share: set up the project (tools/setup.sh, its output kept in
# .logs/setup.log and shown only if it fails), then run `python -m MODULE ARGS...` in the project's .venv.
#   bash tools/with_setup.sh opd_lightning.pipeline --quick
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MODULE="$1"
shift
TAG="${MODULE##*.}"
mkdir -p "$ROOT/.logs"
if ! bash "$ROOT/tools/setup.sh" > "$ROOT/.logs/setup.log" 2>&1; then
  cat "$ROOT/.logs/setup.log" >&2
  echo "[$TAG] set-up failed; its output is above (and in .logs/setup.log)" >&2
  exit 1
fi
echo "[$TAG] set-up done (log: .logs/setup.log)"
exec "$ROOT/.venv/bin/python" -m "$MODULE" "$@"
