"""The pipeline's results: every model scored on the same held-out prompts, as JSON, a table and plots.

`results.json` = ``{"accuracy": {model: {domain: float}}, "task_accuracy": {model: {task: float}},
"interval95": {model: {domain: [lo, hi]}}, "n": {model: {domain: int}}, "wall_seconds": {stage: float}}``;
`accuracy` averages each aligned domain's held-out prompts over its aligned tasks (OOD probe tasks appear in
`task_accuracy` only). Scores come from :func:`opd_lightning.evaluation.evaluate_policy`, the code that
in-training validation runs, on the held-out prompts of `configs/tiny/defaults.yaml` (the data every stage
trains on, said once, so no stage ever trains on them).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from opd_lightning.evaluation import evaluate_policy, wilson_interval

__all__ = ["evaluate_models", "read_scalars", "write_results"]


def read_scalars(logdir: str | Path, wall_time: bool = False) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve of a TensorBoard run: ``{tag: [(step, value), ...]}`` sorted by step, one value per
    step ({} if there is none); with ``wall_time``, the Unix time each point was logged instead of its value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not Path(logdir).is_dir():
        return {}
    curves: dict[str, dict[int, float]] = {}
    # one event file per process that logged (a resumed run adds one): the later file wins a repeated step
    for events in sorted(Path(logdir).glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            curves.setdefault(tag, {}).update(
                (e.step, e.wall_time if wall_time else e.value) for e in acc.Scalars(tag)
            )
    return {tag: sorted(points.items()) for tag, points in curves.items()}


def _held_out_data(config_args: list[str]):
    """The datamodule every stage uses, built by the CLI from the same YAMLs, with its held-out prompts."""
    from opd_lightning.cli import build_cli

    cli = build_cli(config_args + ["--trainer.logger=false"], run=False)
    data = cli.datamodule
    data.setup("validate")
    return data, cli.model.eval_config.max_new_tokens or data.max_answer_length


@torch.no_grad()
def evaluate_models(paths: dict[str, Path], config_args: list[str]) -> tuple[dict[str, dict[str, list[float]]], list]:
    """``{model: {task: [exact 0/1 per held-out prompt]}}`` and the task specs, greedy, for each HF folder."""
    from transformers.utils import logging as hf_logging

    from opd_lightning.models import load_causal_lm, load_tokenizer, stop_token_ids
    from opd_lightning.rollout import generate

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per model would bury the table
    data, max_new_tokens = _held_out_data(config_args)
    scores = {}
    for name, path in paths.items():
        tokenizer, policy = load_tokenizer(path), load_causal_lm(path)
        eos = stop_token_ids(policy, tokenizer.eos_token_id)

        def sample(batch, config, policy=policy, tokenizer=tokenizer, eos=eos):
            return generate(policy, batch.prompt_ids, batch.prompt_mask, config, eos_token_id=eos,
                            pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer)  # fmt: skip

        scores[name] = evaluate_policy(sample, tokenizer, data.val_dataloader(), max_new_tokens)
    return scores, data.specs


def write_results(out: Path, scores: dict[str, dict[str, list[float]]], specs, walls: dict[str, float],
                  experts: dict[str, str], student: str = "student", base: str = "base") -> dict:
    """results.json, results.md and accuracy.png in `out`; returns the JSON dict."""
    domains = sorted({s.domain for s in specs if s.aligned})
    aligned = {d: [s.name for s in specs if s.aligned and s.domain == d] for d in domains}
    results: dict = {"accuracy": {}, "task_accuracy": {}, "interval95": {}, "n": {}, "wall_seconds": walls}
    for model, by_task in scores.items():
        results["task_accuracy"][model] = {t: sum(v) / len(v) for t, v in by_task.items()}
        for key in ("accuracy", "interval95", "n"):
            results[key][model] = {}
        for d in domains:
            values = [x for t in aligned[d] for x in by_task[t]]
            results["accuracy"][model][d] = sum(values) / len(values)
            results["interval95"][model][d] = list(wilson_interval(sum(values), len(values)))
            results["n"][model][d] = len(values)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(_table(results, specs, domains, experts, student, base))
    _plot_accuracy(results, domains, out / "accuracy.png")
    return results


def _table(results: dict, specs, domains: list[str], experts: dict[str, str], student: str, base: str) -> str:
    ood = [s.name for s in specs if not s.aligned]
    head = ["model", *(f"{d} (aligned)" for d in domains), *(f"{t} (OOD)" for t in ood)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, acc in results["accuracy"].items():
        cells = [f"{acc[d]:.3f} [{lo:.2f}, {hi:.2f}]" for d, (lo, hi) in
                 ((d, results["interval95"][model][d]) for d in domains)]  # fmt: skip
        cells += [f"{results['task_accuracy'][model][t]:.3f}" for t in ood]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    n = {d: results["n"][next(iter(results["n"]))][d] for d in domains}
    lines += ["", "Exact-match greedy accuracy on held-out prompts (" + ", ".join(f"{d}: {n[d]}" for d in domains)
              + " per model), 95% Wilson interval in brackets.", ""]
    experts_accuracy = {d: results["accuracy"].get(experts.get(d, ""), {}).get(d) for d in domains}
    if student in results["accuracy"]:
        for d, expert in experts_accuracy.items():
            if expert:
                ratio = results["accuracy"][student][d] / expert
                lines.append(f"- {d}: student / expert = {ratio:.2f} ({results['accuracy'][student][d]:.3f} / {expert:.3f})")
        # Every model starts from the base, so the ratio above credits the base's own accuracy; the share of the
        # expert's gain over the base that each merged model keeps is the figure that tells the merges apart.
        start = results["accuracy"].get(base, {})
        for d, expert in experts_accuracy.items():
            if expert is not None and d in start and expert > start[d]:
                shares = [f"{m} {(acc[d] - start[d]) / (expert - start[d]):+.0%}" for m, acc in results["accuracy"].items()
                          if m not in (base, *experts.values())]  # fmt: skip
                lines.append(f"- {d}: share of the expert's gain over the base ({start[d]:.3f} -> {expert:.3f}) kept: "
                             + ", ".join(shares))
    walls = results["wall_seconds"]
    if walls:
        lines += ["", "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in walls.items())
                  + f"; total {sum(walls.values()):.0f}"]
    return "\n".join(lines) + "\n"


def _plot_accuracy(results: dict, domains: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["accuracy"])
    width = 0.8 / len(domains)
    fig, ax = plt.subplots(figsize=(1.3 * len(models) + 2, 4))
    for j, d in enumerate(domains):
        xs = [i + (j - (len(domains) - 1) / 2) * width for i in range(len(models))]
        ys = [results["accuracy"][m][d] for m in models]
        lo = [y - results["interval95"][m][d][0] for m, y in zip(models, ys)]
        hi = [results["interval95"][m][d][1] - y for m, y in zip(models, ys)]
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=d)
    ax.set_xticks(range(len(models)), models, rotation=20, ha="right")
    ax.set_ylabel("held-out exact-match accuracy")
    ax.set_ylim(0, 1)
    ax.legend(title="domain")
    ax.set_title("Accuracy per aligned domain (95% intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(runs: Path, path: Path, student: str = "student", baselines: tuple[str, ...] = ()) -> None:
    """The OPD run's per-teacher reverse KL and top-k overlap, and val accuracy per domain against step for
    the student and the baselines (matched steps), from the TensorBoard logs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    opd = read_scalars(runs / student / "version_0")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, stat, title in ((axes[0], "reverse_kl", "reverse KL to the routed teacher"),
                            (axes[1], "topk_overlap", "student/teacher top-k overlap")):  # fmt: skip
        for tag, points in sorted(opd.items()):
            if tag.startswith("train/teacher/") and tag.endswith(f"/{stat}"):
                steps, values = zip(*points)
                ax.plot(steps, values, label=tag.split("/")[2])
        ax.set_title(f"{student}: {title}")
        ax.set_xlabel("step")
        ax.legend(title="teacher")
    for name, style in ((student, "-"), *((b, "--") for b in baselines)):
        for tag, points in sorted(read_scalars(runs / name / "version_0").items()):
            if tag.startswith("val/accuracy/"):
                steps, values = zip(*points)
                axes[2].plot(steps, values, style, marker="o", label=f"{name}: {tag.rsplit('/', 1)[1]}")
    axes[2].set_title("held-out accuracy per domain")
    axes[2].set_xlabel("optimiser step")
    axes[2].set_ylim(0, 1)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
