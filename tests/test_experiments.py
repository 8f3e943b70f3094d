"""The experiments (`bash tools/experiments.sh NAME`): mean and spread over seeds, the stall rule, the FLOPs
estimate, every run's command line, and a `--quick` run of all four that writes every file with every variant."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opd_lightning import experiments
from opd_lightning.experiments import EXPERIMENTS, Context, aggregate, cell, flops_per_token, stall_overlap
from opd_lightning.pipeline import fit_command

ROOT = Path(__file__).parents[1]


# ------------------------------------------------------------------------------------------ aggregation


def test_aggregate_gives_mean_min_max_and_sample_std_of_known_per_seed_values():
    stats = aggregate([0.5, 0.7, 0.9])
    assert stats["mean"] == pytest.approx(0.7) and (stats["min"], stats["max"]) == (0.5, 0.9)
    assert stats["std"] == pytest.approx(0.2)  # sample std: sqrt((0.04 + 0 + 0.04) / 2)
    assert stats["n"] == 3 and stats["values"] == [0.5, 0.7, 0.9]
    assert cell(stats) == "0.7 [0.5–0.9]"


def test_a_seed_without_a_value_is_counted_and_left_out_of_the_statistics():
    stats = aggregate([1.0, None, 3.0])  # e.g. one seed never reached the target
    assert (stats["n"], stats["mean"], stats["min"], stats["max"]) == (2, 2.0, 1.0, 3.0)
    assert stats["std"] == pytest.approx(math.sqrt(2))
    assert cell(stats) == "2 [1–3] (2/3 seeds)"
    assert cell(aggregate([None, None])) == "— (0/2 seeds)"
    one = aggregate([4.0])
    assert one["std"] is None and cell(one) == "4"


def test_results_files_hold_each_variants_mean_and_spread_over_seeds(tmp_path):
    ctx = Context("objective", tmp_path, tmp_path / "pipeline", quick=False, seeds=[1, 2, 3],
                  walls={f"objective/{v}/seed{s}": 10.0 * s for v in ("a", "b") for s in (1, 2, 3)})  # fmt: skip
    runs = {v: {s: experiments.Stage(f"objective/{v}/seed{s}", "opd") for s in (1, 2, 3)} for v in ("a", "b")}
    result = {"metrics": {"a": {"accuracy / math": [0.5, 0.6, 0.7]}, "b": {"accuracy / math": [0.8, None, 0.9]}},
              "notes": ["a note"], "extra": {"k": 1}}  # fmt: skip
    (tmp_path / "objective").mkdir()
    written = experiments.write_experiment(ctx, EXPERIMENTS["objective"], result, runs, "the command")
    saved = json.loads((tmp_path / "objective" / "results.json").read_text())
    assert saved == json.loads(json.dumps(written))
    assert saved["metrics"]["a"]["accuracy / math"]["mean"] == pytest.approx(0.6)
    assert saved["metrics"]["b"]["accuracy / math"]["n"] == 2 and saved["extra"] == {"k": 1}
    assert saved["wall_seconds"]["a"]["mean"] == pytest.approx(20.0)
    table = (tmp_path / "objective" / "results.md").read_text()
    assert "| metric | a | b |" in table
    assert "| accuracy / math | 0.6 [0.5–0.7] | 0.85 [0.8–0.9] (2/3 seeds) |" in table
    assert "| wall s per run | 20 [10–30] | 20 [10–30] |" in table
    assert "- a note" in table and "![objective](objective.png)" in table


# ------------------------------------------------------------------------------------------ overlap's rule


def steps(values: list[float]) -> list[tuple[int, float]]:
    return list(enumerate(values))


def test_the_stall_overlap_is_the_lowest_overlap_at_which_the_kl_still_fell():
    # run 1: overlap 0.6 -> 0.7 while the KL halves every window (progress); run 2: overlap 0.1-0.2, KL flat
    falling = (steps([0.6, 0.6, 0.65, 0.65, 0.7, 0.7]), steps([1.0, 1.0, 0.5, 0.5, 0.25, 0.25]))
    flat = (steps([0.1, 0.1, 0.2, 0.2, 0.2, 0.2]), steps([1.0, 1.0, 0.99, 0.99, 0.98, 0.98]))
    stall = stall_overlap([falling, flat], window=2, min_drop=0.05)
    assert stall["threshold"] == pytest.approx(0.6), "the lowest window that made progress"
    assert (stall["windows"], stall["progressing"], stall["stalled_below"]) == (4, 2, 2)
    assert stall["lowest_overlap"] == pytest.approx(0.1)
    nothing = stall_overlap([flat], window=2)
    assert nothing["threshold"] is None and nothing["stalled_below"] == 2


def test_a_window_that_converged_high_does_not_raise_the_threshold():
    """A stall above the lowest progressing overlap is convergence, not the overlap failure the rule reports."""
    converged = (steps([0.3, 0.3, 0.8, 0.8, 0.9, 0.9]), steps([1.0, 1.0, 0.5, 0.5, 0.5, 0.5]))
    stall = stall_overlap([converged], window=2, min_drop=0.05)
    assert stall["threshold"] == pytest.approx(0.3) and stall["stalled_below"] == 0


# ------------------------------------------------------------------------------------------ cost's FLOPs


def test_flops_per_token_count_a_forward_as_2p_and_a_training_pass_as_6p():
    opd = {"model": {"class_path": "opd_lightning.stages.MultiExpertOPD", "init_args": {}}}
    assert flops_per_token(opd, student=10, teacher=100) == 2 * 10 + 6 * 10 + 2 * 100
    grpo = {"model": {"class_path": "opd_lightning.stages.GRPO", "init_args": {"grpo": {"ppo_epochs": 2}}}}
    assert flops_per_token(grpo, student=10, teacher=0) == 2 * 10 + 2 * 6 * 10
    grpo["model"]["init_args"]["ref_model"] = "ref"
    assert flops_per_token(grpo, student=10, teacher=0) == 2 * 10 + 2 * 6 * 10 + 2 * 10


# ------------------------------------------------------------------------------------------ every run's command


@pytest.fixture(scope="module")
def fake_pipeline(tiny_dir, tmp_path_factory):
    """The shared stages' exports, each the tiny model, so every run's command line can build."""
    root = tmp_path_factory.mktemp("experiments")
    for name in ("base", "expert/math", "expert/string"):
        (root / "pipeline" / name).mkdir(parents=True)
        (root / "pipeline" / name / "hf").symlink_to(tiny_dir)
    return root


EXPECTED = {  # what each variant must set, read back from the built stage
    "objective/reverse_kl": lambda m, d: m.distill.loss == "reverse_kl" and m.distill.top_k is None,
    "objective/sampled_reverse_kl": lambda m, d: m.distill.loss == "sampled_reverse_kl",
    f"objective/top{experiments.TOP_K}_reverse_kl": lambda m, d: m.distill.top_k == experiments.TOP_K,
    "objective/forward_kl": lambda m, d: m.distill.loss == "forward_kl",
    "objective/generalized_jsd_0.5": lambda m, d: m.distill.loss == "generalized_jsd" and m.distill.beta == 0.5,
    "prompts/ood_ratio_0": lambda m, d: d.ood_ratio == 0.0,
    "prompts/ood_ratio_0.1": lambda m, d: d.ood_ratio == 0.1,
    "prompts/ood_ratio_0.3": lambda m, d: d.ood_ratio == 0.3,
    "cost/opd": lambda m, d: d.domain_weights == {"math": 1.0} and type(m).__name__ == "MultiExpertOPD",
    "cost/grpo": lambda m, d: d.domain_weights == {"math": 1.0} and m.config.seed == 1,
    "overlap/cold_start": lambda m, d: m.config.cache_dir is None and m.config.seed == 1,
}


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_run_of_an_experiment_builds_with_the_cli_and_carries_its_variant_and_seed(
    name, fake_pipeline, tiny_dir, monkeypatch
):
    from opd_lightning.cli import build_cli

    monkeypatch.chdir(fake_pipeline)
    monkeypatch.setattr(sys, "argv", ["opd"])  # pytest's own arguments are not the CLI's
    ctx = Context(name, fake_pipeline, fake_pipeline / "pipeline", quick=False, seeds=[1])
    order, runs = EXPERIMENTS[name].plan(ctx)
    assert set(runs) and all(list(seeds) == [1] for seeds in runs.values())
    checked = 0
    for stage in order:
        args = fit_command(stage, fake_pipeline, quick=False)[4:]  # after `python -m opd_lightning.cli fit`
        # an earlier run's export (the low-overlap base, a cold start) does not exist here: the tiny model stands in
        args = [f"--model.init_args.model={tiny_dir}" if a.startswith("--model.init_args.model=")
                and not Path(a.split("=", 1)[1]).exists() else a for a in args]  # fmt: skip
        cli = build_cli(args, run=False)
        key = stage.name.rsplit("/seed", 1)[0]
        if key in EXPECTED:
            assert EXPECTED[key](cli.model, cli.datamodule), stage.name
            checked += 1
        if stage.config == "opd":
            assert cli.model.seed == 1, stage.name
        if stage.name != experiments.LOW_OVERLAP_BASE:  # seeded runs: the seed also draws their prompt stream
            assert cli.datamodule.stream_seed == 1 and cli.datamodule.seed == 0, stage.name
        if stage.name != experiments.LOW_OVERLAP_BASE:
            assert cli.trainer.log_every_n_steps == 1, "token counters and curves need every step"
    assert checked == sum(k.startswith(f"{name}/") for k in EXPECTED)


# ------------------------------------------------------------------------------------------ the quick run


@pytest.fixture(scope="module")
def quick_all(tmp_path_factory):
    """`experiments all --quick`: one shared pipeline output (base, experts) for the four experiments."""
    out = tmp_path_factory.mktemp("experiments-quick")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "opd_lightning.experiments", "all", "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_quick_run_writes_results_and_a_plot_with_every_variant(name, quick_all):
    out, stdout = quick_all
    assert stdout.count(") base: running") == 1, "the shared base is trained once for all four"
    results = json.loads((out / name / "results.json").read_text())
    _, runs = EXPERIMENTS[name].plan(Context(name, out, out / "pipeline", quick=True, seeds=[1]))
    assert list(results["metrics"]) == list(runs) and results["quick"] and results["seeds"] == [1]
    table = (out / name / "results.md").read_text()
    assert "| metric | " + " | ".join(runs) + " |" in table
    for variant, seeds in results["metrics"].items():
        assert seeds, variant
        for metric, stats in seeds.items():
            assert len(stats["values"]) == 1, (variant, metric)
        assert (out / "runs" / name / variant / "seed1" / "version_0").is_dir()
    assert (out / name / f"{name}.png").stat().st_size > 10_000
    if name == "prompts":  # the OOD prompts are validated in every variant
        assert all(any(m.startswith("OOD accuracy") for m in rows) for rows in results["metrics"].values())
    if name == "cost":
        curve = results["curves"]["opd"]["1"][-1]
        assert curve["step"] == 4 and curve["sampled_tokens"] == curve["teacher_tokens"] > 0
        assert results["curves"]["grpo"]["1"][-1]["teacher_tokens"] == 0
