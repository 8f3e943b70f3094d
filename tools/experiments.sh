#!/usr/bin/env bash
# The experiments: each claim behind multi-expert OPD tested on the tiny world, one command each.
#   bash tools/experiments.sh NAME [--quick] [--out DIR] [--seeds N] [--pipeline DIR]
# NAME: cost, overlap, prompts, objective or all; DIR defaults to ./artifacts/experiments, N to 3 (1 with --quick).
# Runs the main job's base and experts first (into DIR/pipeline, or reuses --pipeline DIR), skipping what exists,
# then each variant and seed as an `opd fit`; writes DIR/NAME/results.json, results.md and NAME.png.
# Experiments, variants and outputs: opd_lightning/experiments.py.
exec bash "$(dirname "$0")/with_setup.sh" opd_lightning.experiments "$@"
