"""Experiments: the claims behind multi-expert OPD, tested on the tiny world, one command each (issue 12).

    bash tools/experiments.sh NAME [--quick] [--out DIR] [--seeds N] [--pipeline DIR]
    # = python -m opd_lightning.experiments ... after set-up; NAME: cost, overlap, prompts, objective or all

Each experiment starts from the main job's shared stages (the base and the two experts of
opd_lightning/pipeline.py), run into DIR/pipeline, or taken from `--pipeline DIR` (e.g. the main job's
`artifacts`); a stage whose export exists is skipped. Then it runs its variants, each an `opd fit` of a stage YAML
of configs/tiny/ plus overrides (:class:`~opd_lightning.pipeline.Stage`; they come after the quick overlay, so an
experiment leaves step counts alone under `--quick`), once per seed, with the pipeline's skip / resume rules.
Outputs:

    DIR/runs/NAME/<variant>/seed<s>/version_0   TensorBoard, every step logged (tensorboard --logdir DIR/runs)
    DIR/NAME/<variant>/seed<s>/hf               the run's export
    DIR/NAME/results.json, results.md, NAME.png  every variant: mean and spread (min-max) over seeds
    DIR/logs/<run>.log, DIR/wall_seconds.json   each run's console output and wall time

Seeds (1..N) set each run's sampling seed (the stage's rollout or teacher-sampling seed), `seed_everything` and
`data.stream_seed` (which training prompts each step draws). `data.seed` stays that of configs/tiny/defaults.yaml:
it draws every task's held-out split, so another value would validate on prompts the shared base and experts were
trained on. The spread over seeds is thus that of the prompt stream and of sampling, from shared base and
experts (their own seed variance is not in it). `--quick` appends configs/tiny/quick.yaml to every run (4
steps, CI's smoke run: the figures mean nothing) and defaults to one seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from opd_lightning.pipeline import EXPERTS, STAGES, Stage, run_dir, run_stage
from opd_lightning.report import read_scalars

SHARED = [s for s in STAGES if s.name == "base" or s.name.startswith("expert/")]
"""The main job's stages every experiment starts from: the base and both experts (SFT then GRPO)."""
SEED_FIELDS = {
    "opd": "--model.init_args.seed",
    "baseline_mixed_grpo": "--model.init_args.grpo.seed",
    "cold_start": "--model.init_args.cold_start.seed",
}
"""Each varied stage's sampling seed."""
EVERY_STEP = ("--trainer.log_every_n_steps=1",)  # token counters and curves at every optimiser step
FINAL_SHARE = 0.1
"""A "final" train statistic is the mean of the last 10% of its logged steps (one step's batch is noisy)."""
SPREAD = "mean [min–max] over seeds; results.json adds each seed's value and the sample std (ddof 1)"


def log(msg: str) -> None:
    print(f"[experiments] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ aggregation


def aggregate(values: list[float | None]) -> dict:
    """Mean and spread over seeds of one figure; None (e.g. a target never reached) is left out of the
    statistics and counted: ``{"values", "n", "mean", "min", "max", "std"}`` (std: sample, ddof 1; None
    under two values)."""
    kept = [v for v in values if v is not None]
    stats = {"values": values, "n": len(kept), "mean": None, "min": None, "max": None, "std": None}
    if kept:
        stats.update(mean=statistics.fmean(kept), min=min(kept), max=max(kept))
    if len(kept) >= 2:
        stats["std"] = statistics.stdev(kept)
    return stats


def fmt(x: float) -> str:
    return f"{x:.2e}" if abs(x) >= 1e4 else f"{x:.3g}"


def cell(stats: dict) -> str:
    """A table cell: ``mean [min–max]``, ``k/N seeds`` when only k of N seeds have a value."""
    if stats["n"] == 0:
        return f"— (0/{len(stats['values'])} seeds)"
    text = fmt(stats["mean"]) if stats["n"] == 1 else f"{fmt(stats['mean'])} [{fmt(stats['min'])}–{fmt(stats['max'])}]"
    if stats["n"] < len(stats["values"]):
        text += f" ({stats['n']}/{len(stats['values'])} seeds)"
    return text


# ------------------------------------------------------------------------------------------ curves


def last(curves: dict, tag: str) -> float | None:
    points = curves.get(tag)
    return points[-1][1] if points else None


def first(curves: dict, tag: str) -> float | None:
    points = curves.get(tag)
    return points[0][1] if points else None


def final(curves: dict, tag: str) -> float | None:
    """The mean of the last FINAL_SHARE of a train curve's points (at least one)."""
    return _share_mean(curves, tag, at_end=True)


def initial(curves: dict, tag: str) -> float | None:
    """The mean of the first FINAL_SHARE of a train curve's points (at least one)."""
    return _share_mean(curves, tag, at_end=False)


def _share_mean(curves: dict, tag: str, at_end: bool) -> float | None:
    points = curves.get(tag)
    if not points:
        return None
    n = max(1, math.ceil(FINAL_SHARE * len(points)))
    return statistics.fmean(v for _, v in (points[-n:] if at_end else points[:n]))


def domains_of(curves: dict, prefix: str, stat: str = "") -> list[str]:
    """The <name>s of tags ``prefix<name>`` (or ``prefix<name>/stat``)."""
    names = set()
    for tag in curves:
        if tag.startswith(prefix):
            rest = tag[len(prefix) :].split("/")
            if (stat and rest[1:] == [stat]) or (not stat and len(rest) == 1):
                names.add(rest[0])
    return sorted(names)


def smooth(points: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    """A trailing mean over 5% of the points: a train statistic of one batch is noisy."""
    window = max(1, len(points) // 20)
    steps, values = zip(*points)
    means = [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
    return list(steps), means


def plot_panels(path: Path, runs: dict[str, dict[int, Path]], panels: list[tuple[str, str]], title: str) -> None:
    """One panel per (title, tag) against the optimiser step: a colour per variant, a line per seed; train/ tags
    smoothed (trailing mean over 5% of the steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    curves = {v: {s: read_scalars(d) for s, d in seeds.items()} for v, seeds in runs.items()}
    for ax, (panel, tag) in zip(axes.flat, panels):
        for colour, (variant, seeds) in enumerate(curves.items()):
            for k, c in enumerate(seeds.values()):
                if not c.get(tag):
                    continue
                xs, ys = smooth(c[tag]) if tag.startswith("train/") else zip(*c[tag])
                ax.plot(xs, ys, color=f"C{colour}", alpha=0.8, marker="" if tag.startswith("train/") else "o",
                        markersize=3, label=variant if k == 0 else None)  # fmt: skip
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("optimiser step")
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ the runs


@dataclass
class Context:
    """Where one experiment reads the shared stages and writes its runs, and how it runs them."""

    name: str
    out: Path
    pipeline: Path
    quick: bool
    seeds: list[int]
    walls: dict[str, float] = field(default_factory=dict)

    @property
    def teachers(self) -> dict[str, str]:
        return {d: str(self.pipeline / t) for d, t in EXPERTS.items()}

    def run(self, variant: str, config: str, seed: int, *overrides: str, model: str | None = None,
            teachers: dict[str, str] | None = None, name: str | None = None) -> Stage:  # fmt: skip
        """A seeded run of configs/tiny/<config>.yaml named NAME/<variant>/seed<s>, from `model` (absolute; the
        shared base by default), with the shared experts as teachers unless `teachers` says otherwise."""
        return Stage(
            name or f"{self.name}/{variant}/seed{seed}",
            config,
            model=model or str(self.pipeline / "base"),
            teachers=self.teachers if teachers is None else teachers,
            overrides=(*EVERY_STEP, f"--seed_everything={seed}", f"{SEED_FIELDS[config]}={seed}",
                       f"--data.stream_seed={seed}", *overrides),
        )


@dataclass(frozen=True)
class Experiment:
    name: str
    claim: str
    plan: Callable[[Context], tuple[list[Stage], dict[str, dict[int, Stage]]]]
    """Every run in order (prerequisites first) and the runs reported: ``{variant: {seed: stage}}``."""
    report: Callable[[Context, dict[str, dict[int, Path]]], dict]
    """From the reported runs' TensorBoard folders: writes NAME.png, returns ``{"metrics": {variant: {metric:
    [value per seed]}}, "notes": [str], ...}`` (extra keys go to results.json as they are)."""


# ------------------------------------------------------------------------------------------ cost


def cost_plan(ctx: Context):
    # one domain (math) for both; validation every 25 steps on the math prompts only (the first val batch)
    math_only = ('--data.domain_weights={"math": 1.0}', "--trainer.limit_val_batches=1",
                 *(() if ctx.quick else ("--trainer.val_check_interval=25",)))  # fmt: skip
    runs = {"opd": {s: ctx.run("opd", "opd", s, *math_only) for s in ctx.seeds},
            "grpo": {s: ctx.run("grpo", "baseline_mixed_grpo", s, *math_only, teachers={}) for s in ctx.seeds}}  # fmt: skip
    return [stage for seeds in runs.values() for stage in seeds.values()], runs


def parameters(path: Path) -> int:
    from opd_lightning.models import load_causal_lm

    return sum(p.numel() for p in load_causal_lm(path).parameters())


def flops_per_token(config: dict, student: int, teacher: int) -> float:
    """Estimated FLOPs per sampled completion token of one training step: 2·params for a forward (sampling,
    teacher scoring, a reference), 6·params for a training forward + backward."""
    init = config["model"]["init_args"]
    if config["model"]["class_path"].endswith("GRPO"):
        reference = 2 * student if init.get("ref_model") else 0
        return 2 * student + 6 * student * init["grpo"]["ppo_epochs"] + reference
    return 2 * student + 6 * student + 2 * teacher  # sample, train, the routed teacher scores every token


def cost_curve(logdir: Path, student: int, teacher: int) -> list[dict]:
    """At each validation of the math prompts: optimiser steps done, accuracy, cumulative sampled and
    teacher-scored tokens, estimated FLOPs and wall seconds since the run's first logged point."""
    config = yaml.safe_load((logdir / "config.yaml").read_text())
    rows = (config["data"]["batch_size"] * config["model"]["init_args"]["sampling"]["num_samples"]
            * config["trainer"]["accumulate_grad_batches"])  # fmt: skip
    is_opd = config["model"]["class_path"].endswith("MultiExpertOPD")
    per_token = flops_per_token(config, student, teacher)
    curves, times = read_scalars(logdir), read_scalars(logdir, wall_time=True)
    start = min(points[0][1] for points in times.values())
    # mean completion tokens per row of each step, with the time it was logged: the steps done before a
    # validation are those logged before it (Lightning logs the step-0 validation before any training, and the
    # one after step k's update under step k)
    lengths = [(step, value, when) for (step, value), (_, when) in
               zip(curves["train/completion_length"], times["train/completion_length"])]  # fmt: skip
    out = []
    for (_, accuracy), (_, at) in zip(curves["val/accuracy/math"], times["val/accuracy/math"]):
        done = [(step, value) for step, value, when in lengths if when <= at]
        steps = done[-1][0] + 1 if done else 0
        tokens = rows * steps * statistics.fmean(v for _, v in done) if done else 0.0  # exact: every step logged
        out.append({"step": steps, "accuracy": accuracy, "sampled_tokens": tokens,
                    "teacher_tokens": tokens if is_opd else 0.0, "flops": tokens * per_token,
                    "wall_s": at - start})  # fmt: skip
    return out


def cost_report(ctx: Context, runs: dict[str, dict[int, Path]]) -> dict:
    expert = last(read_scalars(ctx.pipeline / "runs" / EXPERTS["math"] / "version_0"), "val/accuracy/math")
    base = last(read_scalars(ctx.pipeline / "runs" / "base" / "version_0"), "val/accuracy/math")
    student, teacher = parameters(ctx.pipeline / "base" / "hf"), parameters(ctx.pipeline / EXPERTS["math"] / "hf")
    targets = {"90% of the expert": 0.9 * expert, "90% of the expert's gain": base + 0.9 * (expert - base)}
    curves = {v: {s: cost_curve(d, student, teacher) for s, d in seeds.items()} for v, seeds in runs.items()}
    metrics: dict = {}
    for variant, seeds in curves.items():
        rows = metrics[variant] = {}
        for label, target in targets.items():
            reached = [next((p for p in c if p["accuracy"] >= target), None) for c in seeds.values()]
            for key, what in (("step", "optimiser steps"), ("sampled_tokens", "sampled tokens"),
                              ("teacher_tokens", "teacher-scored tokens"), ("flops", "FLOPs"), ("wall_s", "wall s")):  # fmt: skip
                rows[f"{what} to {label}"] = [p[key] if p else None for p in reached]
        rows["final math accuracy"] = [c[-1]["accuracy"] for c in seeds.values()]
        rows["FLOPs in all"] = [c[-1]["flops"] for c in seeds.values()]
    plot_cost(ctx.out / ctx.name / "cost.png", curves, targets)
    (of_expert, expert_target), (of_gain, gain_target) = targets.items()
    notes = [
        f"Targets on the same held-out math prompts: the math expert's accuracy {expert:.3f} (its last validation), "
        f"the base's {base:.3f}; {of_expert} = {expert_target:.3f}, {of_gain} over the base = "
        f"{gain_target:.3f}. A target is reached at "
        "the first validation (every 25 steps, step 0 included) at or above it; a run that never reaches it counts "
        "in neither mean nor spread (the cell says how many seeds did).",
        f"FLOPs are estimated from completion tokens only: 2·params per token for each forward (the policy "
        f"sampling, the teacher scoring), 6·params per token for the training forward + backward; params = "
        f"{student:,} (student) and {teacher:,} (teacher), embeddings included. OPD: 8·P_S + 2·P_T per sampled "
        "token; GRPO: 8·P per sampled token (one PPO epoch, no reference model). Prompt tokens (the same 64 rows "
        "per step in both) and validation are left out.",
        "Sampled tokens per step = rows × the step's logged mean completion length (train/completion_length); "
        "both runs sample 64 completions per step (OPD: 64 prompts × 1; GRPO: 16 prompts × a group of 4). Wall "
        "seconds run from the run's first logged point (after start-up) and include its validations.",
    ]
    return {"metrics": metrics, "notes": notes, "targets": targets, "expert_accuracy": expert, "base_accuracy": base,
            "parameters": {"student": student, "teacher": teacher}, "curves": curves}  # fmt: skip


def plot_cost(path: Path, curves: dict, targets: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for colour, (variant, seeds) in enumerate(curves.items()):
        for k, c in enumerate(seeds.values()):
            for ax, key in zip(axes, ("flops", "sampled_tokens")):
                ax.plot([p[key] for p in c], [p["accuracy"] for p in c], color=f"C{colour}", marker="o",
                        markersize=3, label=variant if k == 0 else None)  # fmt: skip
    for ax, xlabel in zip(axes, ("estimated training FLOPs", "sampled completion tokens")):
        for style, (label, y) in zip((":", "--"), targets.items()):
            ax.axhline(y, color="grey", linestyle=style, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out math accuracy")
    axes[0].legend(fontsize=7)
    fig.suptitle("cost: OPD vs GRPO from the base toward the math expert")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ overlap

LOW_OVERLAP_BASE = "overlap/low-overlap-base"
LOW_OVERLAP_STEPS = 300
"""The low-overlap student's SFT steps: a quarter of the base's 1,200 (configs/tiny/base.yaml)."""
STALL_WINDOW_SHARE, STALL_MIN_DROP = 0.1, 0.05


def stall_overlap(series: list[tuple[list[tuple[int, float]], list[tuple[int, float]]]],
                  window: int, min_drop: float = STALL_MIN_DROP) -> dict:  # fmt: skip
    """The rule for "the overlap below which OPD stopped making progress".

    Each series is one (run, teacher)'s per-step top-k overlap and reverse KL. It is cut into windows of `window`
    logged steps; window i made progress when the mean reverse KL of window i+1 is at least `min_drop` (relative)
    below that of window i. The threshold is the lowest mean overlap of a window that made progress: every window
    below it stalled. Returns ``{"threshold", "lowest_overlap", "windows", "progressing", "stalled_below"}``
    (threshold None when no window made progress)."""
    windows = []  # (mean overlap, made progress)
    for overlap, kl in series:
        o, k = [v for _, v in overlap], [v for _, v in kl]
        chunks = range(0, min(len(o), len(k)) - window, window)
        for i in chunks:
            before, after = statistics.fmean(k[i : i + window]), statistics.fmean(k[i + window : i + 2 * window])
            drop = 1 - after / before if before > 0 else 0.0
            windows.append((statistics.fmean(o[i : i + window]), drop >= min_drop))
    progressing = [o for o, ok in windows if ok]
    threshold = min(progressing) if progressing else None
    below = [o for o, ok in windows if not ok and (threshold is None or o < threshold)]
    return {"threshold": threshold, "lowest_overlap": min((o for o, _ in windows), default=None),
            "windows": len(windows), "progressing": len(progressing), "stalled_below": len(below)}  # fmt: skip


def describe_stall(stall: dict) -> str:
    if stall["windows"] == 0:
        return "too few logged steps for a window"
    if stall["threshold"] is None:
        return f"no window made progress (lowest overlap {stall['lowest_overlap']:.3f})"
    if stall["stalled_below"]:
        return (f"progress only at top-k overlap ≥ {stall['threshold']:.3f}: all {stall['stalled_below']} windows "
                f"below it stalled ({stall['progressing']}/{stall['windows']} windows made progress)")  # fmt: skip
    return (f"no stall below the progressing windows: OPD made progress down to overlap {stall['threshold']:.3f} "
            f"({stall['progressing']}/{stall['windows']} windows made progress)")


def overlap_plan(ctx: Context):
    from opd_lightning.models import build_tiny

    # the low-overlap student: another initialisation (seed 1; the tokenizer is shared) given a quarter of the
    # base's SFT steps. It is one model for every seed, like the shared base.
    tiny = ctx.out / "overlap" / "tiny-1m-seed1"
    build_tiny(tiny / "hf", "1m", seed=1)  # before the fit: base.yaml's tiny_size would build seed 0 there
    shorter = () if ctx.quick else (f"--trainer.max_steps={LOW_OVERLAP_STEPS}", "--trainer.val_check_interval=150")
    low = Stage(LOW_OVERLAP_BASE, "base", model=str(tiny), overrides=shorter)
    low_path = str(ctx.out / LOW_OVERLAP_BASE)
    order, runs = [low], {"opd": {}, "cold_start_then_opd": {}, "opd_from_main_base": {}}
    for s in ctx.seeds:
        # ColdStart samples the teachers on the fly (no cache): each seed's warm-up sees its own teacher samples.
        # A JSON null: `--model.init_args.cold_start.cache_dir=null` reaches the str field as the string "None"
        cold = ctx.run("cold_start", "cold_start", s, '--model.init_args.cold_start={"cache_dir": null}',
                       model=low_path, name=f"overlap/cold_start/seed{s}")  # fmt: skip
        runs["opd"][s] = ctx.run("opd", "opd", s, model=low_path)
        runs["cold_start_then_opd"][s] = ctx.run("cold_start_then_opd", "opd", s, model=str(ctx.out / cold.name))
        runs["opd_from_main_base"][s] = ctx.run("opd_from_main_base", "opd", s)
        order += [cold, runs["opd"][s], runs["cold_start_then_opd"][s], runs["opd_from_main_base"][s]]
    return order, runs


def overlap_report(ctx: Context, runs: dict[str, dict[int, Path]]) -> dict:
    curves = {v: {s: read_scalars(d) for s, d in seeds.items()} for v, seeds in runs.items()}
    teachers = domains_of(next(iter(curves["opd"].values())), "train/teacher/", "topk_overlap")
    metrics, stalls = {}, {}
    for variant, seeds in curves.items():
        rows = metrics[variant] = {}
        for d in teachers:
            overlap, kl = f"train/teacher/{d}/topk_overlap", f"train/teacher/{d}/reverse_kl"
            rows[f"top-k overlap, OPD start / {d}"] = [initial(c, overlap) for c in seeds.values()]
            rows[f"top-k overlap, end / {d}"] = [final(c, overlap) for c in seeds.values()]
            rows[f"reverse KL, OPD start / {d}"] = [initial(c, kl) for c in seeds.values()]
            rows[f"reverse KL, end / {d}"] = [final(c, kl) for c in seeds.values()]
            rows[f"accuracy, OPD start / {d}"] = [first(c, f"val/accuracy/{d}") for c in seeds.values()]
            rows[f"accuracy, end / {d}"] = [last(c, f"val/accuracy/{d}") for c in seeds.values()]
        series = [(c[f"train/teacher/{d}/topk_overlap"], c[f"train/teacher/{d}/reverse_kl"])
                  for c in seeds.values() for d in teachers]  # fmt: skip
        window = max(1, round(STALL_WINDOW_SHARE * min(len(o) for o, _ in series)))
        stalls[variant] = stall_overlap(series, window)
    every = [(c[f"train/teacher/{d}/topk_overlap"], c[f"train/teacher/{d}/reverse_kl"])
             for seeds in curves.values() for c in seeds.values() for d in teachers]  # fmt: skip
    stalls["all OPD runs"] = stall_overlap(every, max(1, round(STALL_WINDOW_SHARE * min(len(o) for o, _ in every))))
    panels = [(f"{title} / {d}", tag.format(d=d)) for d in teachers for title, tag in (
        ("top-k overlap (train)", "train/teacher/{d}/topk_overlap"),
        ("student's mass on the shared top-k", "train/teacher/{d}/student_shared_mass"),
        ("reverse KL to the teacher (train)", "train/teacher/{d}/reverse_kl"),
        ("held-out accuracy", "val/accuracy/{d}"))]  # fmt: skip
    plot_panels(ctx.out / ctx.name / "overlap.png", runs, panels, "overlap: OPD from a low-overlap student, with and "
                "without ColdStart; the main base (high overlap) for reference")  # fmt: skip
    notes = [
        f"Low-overlap student: the tiny model initialised with seed 1 (the base's is seed 0; same tokenizer), trained "
        f"by configs/tiny/base.yaml for {LOW_OVERLAP_STEPS} steps instead of 1,200 ({LOW_OVERLAP_BASE}). "
        "cold_start_then_opd: configs/tiny/cold_start.yaml (teachers sampled on the fly) from it, then "
        "configs/tiny/opd.yaml; opd: configs/tiny/opd.yaml from it directly; opd_from_main_base: configs/tiny/opd.yaml "
        "from the experts' own base, for reference. OPD steps are equal; the cold start's steps come on top.",
        f"Start / end of a train curve: the mean of its first / last {FINAL_SHARE:.0%} of steps; accuracy: the "
        "first (step 0) / last validation.",
        f"Stall rule: each (run, teacher)'s per-step curves are cut into windows of {STALL_WINDOW_SHARE:.0%} of its "
        f"steps; a window made progress when the next window's mean reverse KL is ≥ {STALL_MIN_DROP:.0%} below "
        "its own. The overlap below which OPD stopped making progress is the lowest mean top-k overlap of a window "
        "that made progress (every window below it stalled).",
        *(f"Stall rule, {v}: {describe_stall(s)}." for v, s in stalls.items()),
    ]
    return {"metrics": metrics, "notes": notes, "stall": stalls}


# ------------------------------------------------------------------------------------------ prompts

OOD_RATIOS = (0.0, 0.1, 0.3)


def prompts_plan(ctx: Context):
    # validation on every task, the OOD ones included (the quick overlay's limit covers the aligned ones only)
    runs = {f"ood_ratio_{r:g}": {s: ctx.run(f"ood_ratio_{r:g}", "opd", s, f"--data.ood_ratio={r}",
                                            "--trainer.limit_val_batches=1.0") for s in ctx.seeds}
            for r in OOD_RATIOS}  # fmt: skip
    return [stage for seeds in runs.values() for stage in seeds.values()], runs


def prompts_report(ctx: Context, runs: dict[str, dict[int, Path]]) -> dict:
    curves = {v: {s: read_scalars(d) for s, d in seeds.items()} for v, seeds in runs.items()}
    some = next(iter(next(iter(curves.values())).values()))
    aligned, ood = domains_of(some, "val/accuracy/"), domains_of(some, "val/ood_accuracy/")
    metrics = {}
    for variant, seeds in curves.items():
        rows = metrics[variant] = {}
        for d in aligned:
            entropy = f"train/domain/{d}/student_entropy"
            rows[f"student entropy, start / {d}"] = [initial(c, entropy) for c in seeds.values()]
            rows[f"student entropy, end / {d}"] = [final(c, entropy) for c in seeds.values()]
        for d in aligned:
            rows[f"in-domain accuracy / {d}"] = [last(c, f"val/accuracy/{d}") for c in seeds.values()]
        for d in ood:
            rows[f"OOD accuracy / {d}"] = [last(c, f"val/ood_accuracy/{d}") for c in seeds.values()]
    panels = [(f"student entropy (train) / {d}", f"train/domain/{d}/student_entropy") for d in aligned]
    panels += [(f"held-out accuracy / {d}", f"val/accuracy/{d}") for d in aligned]
    panels += [(f"OOD held-out accuracy / {d}", f"val/ood_accuracy/{d}") for d in ood]
    plot_panels(ctx.out / ctx.name / "prompts.png", runs, panels, "prompts: OPD with a share of OOD prompts")
    notes = [
        "Each variant is configs/tiny/opd.yaml with data.ood_ratio set: that share of every batch comes from the OOD "
        "tasks (chain_sum, routed to the math expert; spell_backward, to the string expert).",
        f"Student entropy: nats per token on the student's own samples, the mean over the first / last "
        f"{FINAL_SHARE:.0%} of steps, per domain tag; with ood_ratio > 0 a domain's figure includes its OOD prompts.",
        "Accuracy: the last validation; in-domain on the aligned tasks' held-out prompts, OOD on the OOD tasks'.",
    ]
    return {"metrics": metrics, "notes": notes}


# ------------------------------------------------------------------------------------------ objective

TOP_K = 16
OBJECTIVES = {
    "reverse_kl": ("--model.init_args.distill.loss=reverse_kl",),
    "sampled_reverse_kl": ("--model.init_args.distill.loss=sampled_reverse_kl",),
    f"top{TOP_K}_reverse_kl": ("--model.init_args.distill.loss=reverse_kl", f"--model.init_args.distill.top_k={TOP_K}"),
    "forward_kl": ("--model.init_args.distill.loss=forward_kl",),
    "generalized_jsd_0.5": ("--model.init_args.distill.loss=generalized_jsd", "--model.init_args.distill.beta=0.5"),
}


def objective_plan(ctx: Context):
    runs = {v: {s: ctx.run(v, "opd", s, *args) for s in ctx.seeds} for v, args in OBJECTIVES.items()}
    return [stage for seeds in runs.values() for stage in seeds.values()], runs


def objective_report(ctx: Context, runs: dict[str, dict[int, Path]]) -> dict:
    curves = {v: {s: read_scalars(d) for s, d in seeds.items()} for v, seeds in runs.items()}
    aligned = domains_of(next(iter(next(iter(curves.values())).values())), "val/accuracy/")
    metrics = {}
    for variant, seeds in curves.items():
        rows = metrics[variant] = {}
        for d in aligned:
            rows[f"accuracy / {d}"] = [last(c, f"val/accuracy/{d}") for c in seeds.values()]
        rows["reverse KL (full vocabulary), end"] = [final(c, "train/full_reverse_kl") for c in seeds.values()]
        for d in aligned:
            rows[f"student entropy, end / {d}"] = [final(c, f"train/domain/{d}/student_entropy") for c in seeds.values()]
    panels = [("reverse KL, full vocabulary (train)", "train/full_reverse_kl")]
    panels += [(f"student entropy (train) / {d}", f"train/domain/{d}/student_entropy") for d in aligned]
    panels += [(f"held-out accuracy / {d}", f"val/accuracy/{d}") for d in aligned]
    plot_panels(ctx.out / ctx.name / "objective.png", runs, panels, "objective: OPD's loss at equal steps")
    notes = [
        "Every variant is configs/tiny/opd.yaml (same start, prompts, steps and LR) with distill.loss set: analytic "
        f"reverse KL over the full vocabulary; the sampled-token reverse KL (policy gradient); analytic reverse KL on "
        f"the teacher's top-{TOP_K} support plus a tail bucket; forward KL; generalized JSD with beta 0.5.",
        f"Reverse KL: the exact full-vocabulary KL(student ‖ teacher) on the student's samples, logged for every loss "
        f"(train/full_reverse_kl), and student entropy, each the mean of the last {FINAL_SHARE:.0%} of steps; "
        "accuracy: the last validation.",
    ]
    return {"metrics": metrics, "notes": notes}


EXPERIMENTS = {
    "cost": Experiment(
        "cost",
        "OPD reaches RL's quality at about a tenth of the compute (Qwen3 report; Thinking Machines, On-Policy "
        "Distillation): from the same start and prompts, OPD against GRPO toward the math expert's accuracy.",
        cost_plan, cost_report),
    "overlap": Experiment(
        "overlap",
        "When student and teacher share little of their top-k tokens, OPD fails; a cold start fixes it "
        "(Rethinking OPD): a low-overlap student distilled with and without ColdStart.",
        overlap_plan, overlap_report),
    "prompts": Experiment(
        "prompts",
        "Mixing out-of-distribution prompts into OPD guards against entropy collapse: data.ood_ratio 0, 0.1, 0.3.",
        prompts_plan, prompts_report),
    "objective": Experiment(
        "objective",
        "Reverse KL is mode seeking, forward KL mode covering: five distillation losses at equal steps.",
        objective_plan, objective_report),
}  # fmt: skip


# ------------------------------------------------------------------------------------------ results


def write_experiment(ctx: Context, experiment: Experiment, result: dict, runs: dict[str, dict[int, Stage]],
                     command: str) -> dict:  # fmt: skip
    """DIR/NAME/results.json and results.md: every metric's mean and spread over seeds, per variant."""
    metrics = {v: {m: aggregate(values) for m, values in rows.items()} for v, rows in result.pop("metrics").items()}
    walls = {v: aggregate([ctx.walls.get(stage.name) for stage in seeds.values()]) for v, seeds in runs.items()}
    notes = result.pop("notes")
    results = {"experiment": experiment.name, "claim": experiment.claim, "command": command, "quick": ctx.quick,
               "seeds": ctx.seeds, "spread": SPREAD, "metrics": metrics, "wall_seconds": walls, "notes": notes,
               **result}  # fmt: skip
    folder = ctx.out / experiment.name
    (folder / "results.json").write_text(json.dumps(results, indent=1))
    variants = list(metrics)
    lines = [f"# Experiment: {experiment.name}", "", f"**Claim.** {experiment.claim}", "", f"**Command.** `{command}`"]
    if ctx.quick:
        lines += ["", "**Quick run** (configs/tiny/quick.yaml, 4 steps per run): a smoke test; the figures mean nothing."]
    lines += ["", "| metric | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for metric in metrics[variants[0]]:
        lines.append(f"| {metric} | " + " | ".join(cell(metrics[v][metric]) for v in variants) + " |")
    lines.append("| wall s per run | " + " | ".join(cell(walls[v]) for v in variants) + " |")
    lines += ["", f"Each cell: {SPREAD}; seeds {', '.join(map(str, ctx.seeds))} (each run's sampling seed, "
              "seed_everything and data.stream_seed; data.seed is fixed: it draws the held-out split). Runs: "
              f"`tensorboard --logdir {ctx.out / 'runs' / experiment.name}`.", ""]  # fmt: skip
    lines += [f"- {note}" for note in notes]
    lines += ["", f"![{experiment.name}]({experiment.name}.png)", ""]
    (folder / "results.md").write_text("\n".join(lines))
    return results


def run_experiment(experiment: Experiment, out: Path, pipeline: Path, quick: bool, seeds: list[int]) -> dict:
    walls_file = out / "wall_seconds.json"
    ctx = Context(experiment.name, out, pipeline, quick, seeds,
                  json.loads(walls_file.read_text()) if walls_file.is_file() else {})  # fmt: skip
    order, runs = experiment.plan(ctx)
    start = time.perf_counter()
    for i, stage in enumerate(order, 1):
        run_stage(i, stage, out, quick, ctx.walls, total=len(order))
    (out / experiment.name).mkdir(parents=True, exist_ok=True)
    result = experiment.report(ctx, {v: {s: run_dir(out, st) for s, st in seeds.items()} for v, seeds in runs.items()})
    command = f"bash tools/experiments.sh {experiment.name}{' --quick' if quick else ''} --seeds {len(seeds)}"
    results = write_experiment(ctx, experiment, result, runs, command)
    log(f"{experiment.name}: done in {time.perf_counter() - start:.0f} s; {out / experiment.name}/results.md")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="experiments", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=[*EXPERIMENTS, "all"], help="the experiment, or all four in turn")
    parser.add_argument("--quick", action="store_true", help="toy-size runs (4 steps each; CI's smoke test)")
    parser.add_argument("--out", default="artifacts/experiments", help="output folder (default: artifacts/experiments)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 3; 1 with --quick)")
    parser.add_argument("--pipeline", default=None,
                        help="the main job's output to start from (default: DIR/pipeline, run as needed)")  # fmt: skip
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    if seeds < 1:
        parser.error(f"--seeds must be >= 1, got {seeds}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated run still records its wall time
    os.environ.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))
    out = Path(args.out).resolve()
    pipeline = Path(args.pipeline).resolve() if args.pipeline else out / "pipeline"
    pipeline.mkdir(parents=True, exist_ok=True)
    walls_file = pipeline / "wall_seconds.json"
    walls = json.loads(walls_file.read_text()) if walls_file.is_file() else {}
    log(f"the shared stages (base, experts) in {pipeline}")
    for i, stage in enumerate(SHARED, 1):
        run_stage(i, stage, pipeline, args.quick, walls, total=len(SHARED))
    for name in EXPERIMENTS if args.name == "all" else [args.name]:
        log(f"{name}: {EXPERIMENTS[name].claim}")
        run_experiment(EXPERIMENTS[name], out, pipeline, args.quick, list(range(1, seeds + 1)))
        print((out / name / "results.md").read_text())


if __name__ == "__main__":
    main()
