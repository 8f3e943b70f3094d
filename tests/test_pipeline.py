"""The main job (`bash tools/pipeline.sh`): every stage runs, exports and is scored; held-out prompts stay
held out; a re-run skips finished stages and resumes an unfinished one from its checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from opd_lightning import pipeline

ROOT = Path(__file__).parents[1]


def run_pipeline(out: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "opd_lightning.pipeline", "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    proc = run_pipeline(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.slow
def test_quick_pipeline_exports_every_stage_and_scores_every_model_in_every_domain(quick_run):
    from transformers import AutoModelForCausalLM

    out, stdout = quick_run
    for stage in pipeline.STAGES:
        model = AutoModelForCausalLM.from_pretrained(out / stage.name / "hf")
        assert model.num_parameters() > 0, stage.name
        assert f"{stage.name}: done in" in stdout
    results = json.loads((out / "results.json").read_text())
    assert set(results["accuracy"]) == set(pipeline.MODELS)
    for model in pipeline.MODELS:
        assert set(results["accuracy"][model]) == set(pipeline.DOMAINS)
        assert all(0.0 <= v <= 1.0 for v in results["accuracy"][model].values())
        assert results["n"][model] == {d: 200 for d in pipeline.DOMAINS}  # at least 200 prompts per domain
        assert {"chain_sum", "spell_backward"} <= set(results["task_accuracy"][model])  # OOD probes
    assert {s.name for s in pipeline.STAGES} <= set(results["wall_seconds"])
    for png in ("accuracy.png", "opd_curves.png"):
        assert (out / png).stat().st_size > 10_000, png
    assert "student / expert" in (out / "results.md").read_text()


@pytest.mark.slow
def test_the_final_table_is_the_students_last_validation(quick_run):
    """One evaluation path: the table's figure for the student equals the last val/accuracy/<domain> its own
    run logged on the same held-out prompts (the quick overlay validates the aligned tasks' prompts)."""
    from opd_lightning.report import read_scalars

    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    logged = read_scalars(out / "runs" / "student" / "version_0")
    for domain in pipeline.DOMAINS:
        assert logged[f"val/accuracy/{domain}"][-1][1] == pytest.approx(results["accuracy"]["student"][domain])


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_resumes_an_unfinished_one_from_its_checkpoint(quick_run, tmp_path):
    out, _ = quick_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "student" / "hf")  # as if killed after its last checkpoint, before the export
    proc = run_pipeline(copy)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in pipeline.STAGES:
        expected = "resuming" if stage.name == "student" else "skipped"
        assert f"{stage.name}: {expected}" in proc.stdout or f"{stage.name}: done earlier" in proc.stdout
    log = (copy / "logs" / "student.log").read_text()
    assert "--ckpt_path=" in log and "Restoring states from the checkpoint path" in log
    assert (copy / "student" / "hf" / "model.safetensors").is_file()


def test_no_stage_config_overrides_the_data_every_stage_shares():
    """The held-out prompts are defined once (configs/tiny/defaults.yaml): a stage that redefined its tasks
    could train on another stage's held-out prompts."""
    for stage in pipeline.STAGES:
        config = yaml.safe_load((ROOT / pipeline.CONFIGS / f"{stage.config}.yaml").read_text())
        assert "tasks" not in (config.get("data") or {}), stage.config
        assert "seed" not in (config.get("data") or {}), stage.config


def test_held_out_prompts_never_appear_in_any_training_pool(tiny_dir):
    from opd_lightning.report import _held_out_data

    data, _ = _held_out_data(["--config", str(ROOT / pipeline.DEFAULTS), "--config",
                              str(ROOT / pipeline.CONFIGS / "base.yaml"), f"--model.init_args.model={tiny_dir}"])  # fmt: skip
    data.setup("fit")
    held_out = {e.entry["question"] for e in data.val_examples}
    assert len(held_out) == len(data.val_examples) >= 200 * len(data.specs) * 0.95
    for task, pool in data.train_pools.items():
        trained = {e.entry["question"] for e in pool}
        assert not held_out & trained, task
