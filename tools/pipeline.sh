#!/usr/bin/env bash
# The main job: the toy end-to-end OPD pipeline on CPU, from nothing to a results table.
#   base (mixed SFT) -> experts (SFT then GRPO, one per domain) -> ColdStart -> MultiExpertOPD
# Each stage is one `opd fit --config configs/tiny/<stage>.yaml`; outputs go to artifacts/, curves to runs/
# (tensorboard --logdir runs). A stage whose HF export already exists is skipped, so a re-run resumes the
# pipeline; delete artifacts/ to start over. Wall time on 2 CPU cores: see the README.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OPD=.venv/bin/opd

stage() {  # stage <config> <export dir>
  if [ -f "$2/config.json" ]; then
    echo "[pipeline] $1: $2 exists, skipped"
    return
  fi
  echo "[pipeline] $1 -> $2"
  local start=$SECONDS
  "$OPD" fit --config "configs/tiny/$1.yaml" --trainer.enable_progress_bar=false
  echo "[pipeline] $1 done in $((SECONDS - start)) s"
}

stage base                artifacts/base/hf
stage expert_sft_math     artifacts/experts/math-sft/hf
stage expert_sft_string   artifacts/experts/string-sft/hf
stage grpo                artifacts/experts/math/hf
stage grpo_string         artifacts/experts/string/hf
stage cold_start          artifacts/cold_start/hf
stage opd                 artifacts/opd/hf

.venv/bin/python tools/evaluate.py --out artifacts/results.md \
  base=artifacts/base/hf \
  math-expert=artifacts/experts/math/hf \
  string-expert=artifacts/experts/string/hf \
  cold-start=artifacts/cold_start/hf \
  opd-student=artifacts/opd/hf
