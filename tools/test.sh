#!/usr/bin/env bash
# The README's test command: set everything up from nothing, then run the test suite.
# Extra arguments go to pytest (e.g. `tools/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
# TRL (the `bench` extra) too: tests/test_bench.py runs TRL's memory cells, so none of them is skipped
EXTRAS=dev,bench bash tools/setup.sh
exec .venv/bin/python -m pytest -q "$@"
