"""Data-parallel on CPU: the tiny OPD config runs under `strategy=ddp` with 2 processes (gloo)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_opd_config_runs_for_a_few_steps_under_ddp_with_two_cpu_processes(tiny_dir, tmp_path):
    overrides = [
        f"--model.init_args.model={tiny_dir}",
        f"--model.init_args.teachers.math={tiny_dir}",
        f"--model.init_args.teachers.string={tiny_dir}",
        "--trainer.max_steps=3", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--data.batch_size=4", "--model.init_args.sampling.max_new_tokens=6", f"--export.dirpath={tmp_path / 'hf'}",
        "--trainer.callbacks=[]",
    ]
    cmd = [sys.executable, "-m", "opd_lightning.cli", "fit", "--config", str(ROOT / "configs/tiny/defaults.yaml"),
           "--config", str(ROOT / "configs/tiny/opd.yaml"),
           "--config", str(ROOT / "configs/strategy/ddp.yaml"), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "distributed_backend=gloo" in out.stderr + out.stdout and "All distributed processes registered" in out.stderr + out.stdout
    assert (tmp_path / "hf" / "model.safetensors").exists(), "rank 0 exported the student after the DDP run"
