#!/usr/bin/env bash
# The main job: the whole recipe on the offline tiny world, from nothing to results.json and plots.
#   bash tools/pipeline.sh [--quick] [--out DIR]      (DIR defaults to ./artifacts)
# base -> experts (SFT then GRPO, one per domain) -> MultiExpertOPD student, and the two merge baselines
# (SFT on the experts' samples; one mixed-domain GRPO run), then every model scored on the same held-out
# prompts. A finished stage is skipped and a killed one resumes from its last checkpoint, so re-running
# continues where it stopped. Stages, outputs and plots: opd_lightning/pipeline.py.
exec bash "$(dirname "$0")/with_setup.sh" opd_lightning.pipeline "$@"
