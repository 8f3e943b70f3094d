"""The main job: the whole recipe on the offline tiny world, one `opd fit` per stage, resumable.

    bash tools/pipeline.sh [--quick] [--out DIR]        # = python -m opd_lightning.pipeline after set-up

    base (mixed-domain SFT from scratch: the "pre-trained" model, competent in every domain)
      -> expert/<domain>/sft -> expert/<domain>      (domain SFT then GRPO, one expert per domain)
      -> student                                     (MultiExpertOPD from the base, each domain routed to its expert)
      -> baseline/sft-merge, baseline/mixed-grpo     (the older ways to merge, same start / prompts / steps)
      -> results.json, results.md, accuracy.png, opd_curves.png

Every stage is `opd fit --config configs/tiny/defaults.yaml --config configs/tiny/<stage>.yaml` plus the
paths of its inputs and outputs under DIR, so each can be run alone (the YAML's first line says how).
Outputs: DIR/<stage>/hf (HF export), DIR/runs/<stage>/version_0 (TensorBoard + checkpoints: compare every
stage with `tensorboard --logdir DIR/runs`), DIR/logs/<stage>.log (the stage's console output).

A stage whose export exists is skipped; a stage with a checkpoint but no export (killed midway) resumes from
its `last.ckpt` (exact: data position, RNG streams, optimiser and LR schedule). `--quick` runs the same
stages at toy size (configs/tiny/quick.yaml) for CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"
DEFAULTS = CONFIGS / "defaults.yaml"
QUICK = CONFIGS / "quick.yaml"


@dataclass(frozen=True)
class Stage:
    name: str
    """Output folder under DIR and TensorBoard run name."""
    config: str
    """The stage's overlay, configs/tiny/<config>.yaml."""
    model: str | None = None
    """The stage whose export is the starting policy; None builds the tiny model from scratch."""
    teachers: dict[str, str] = field(default_factory=dict)
    """domain -> the stage whose export teaches it (OPD, sft-merge)."""
    overrides: tuple[str, ...] = ()
    """CLI arguments after the YAMLs, the quick overlay included: the variants of opd_lightning/experiments.py."""


DOMAINS = ("math", "string")
EXPERTS = {d: f"expert/{d}" for d in DOMAINS}
STAGES = [
    Stage("base", "base"),
    *(Stage(f"expert/{d}/sft", f"expert_sft_{d}", model="base") for d in DOMAINS),
    *(Stage(f"expert/{d}", f"expert_grpo_{d}", model=f"expert/{d}/sft") for d in DOMAINS),
    Stage("student", "opd", model="base", teachers=EXPERTS),
    Stage("baseline/sft-merge", "baseline_sft_merge", model="base", teachers=EXPERTS),
    Stage("baseline/mixed-grpo", "baseline_mixed_grpo", model="base"),
]
MODELS = [s.name for s in STAGES if not s.name.endswith("/sft")]
"""The models of the final table, in stage order: every stage's export but the experts' SFT half-way points."""


def log(msg: str) -> None:
    print(f"[pipeline] {msg}", flush=True)


def fit_command(stage: Stage, out: Path, quick: bool) -> list[str]:
    cmd = [sys.executable, "-m", "opd_lightning.cli", "fit", "--config", str(DEFAULTS),
           "--config", str(CONFIGS / f"{stage.config}.yaml")]  # fmt: skip
    if quick:
        cmd += ["--config", str(QUICK)]
    cmd += stage.overrides
    # an absolute stage.model or teacher (another output folder, as experiments use) stays as it is: out / "/x" = "/x"
    model = out / stage.model / "hf" if stage.model else out / "tiny-1m"
    cmd += [
        f"--model.init_args.model={model}",
        f"--export.dirpath={out / stage.name / 'hf'}",
        f"--trainer.logger.init_args.save_dir={out / 'runs'}",
        f"--trainer.logger.init_args.name={stage.name}",
        "--trainer.logger.init_args.version=0",
        "--trainer.enable_progress_bar=false",
        f"--data.cache_dir={out / 'cache' / 'encoded'}",  # stages share the tokenized prompts
    ]
    if stage.teachers:
        routes = {d: str(out / t / "hf") for d, t in stage.teachers.items()}
        cmd.append(f"--model.init_args.teachers={json.dumps(routes)}")
    last = run_dir(out, stage) / "checkpoints" / "last.ckpt"
    if last.is_file():  # killed midway: resume, do not restart
        cmd.append(f"--ckpt_path={last}")
    return cmd


def run_dir(out: Path, stage: Stage) -> Path:
    return out / "runs" / stage.name / "version_0"


def run_stage(
    i: int, stage: Stage, out: Path, quick: bool, walls: dict[str, float], total: int = len(STAGES)
) -> None:
    tag = f"({i}/{total}) {stage.name}"
    if (out / stage.name / "hf" / "config.json").is_file():
        log(f"{tag}: done earlier ({out / stage.name / 'hf'}), skipped")
        return
    cmd = fit_command(stage, out, quick)
    resuming = any(c.startswith("--ckpt_path") for c in cmd)
    if not resuming and run_dir(out, stage).exists():  # killed before its first checkpoint: drop its curves
        shutil.rmtree(run_dir(out, stage))
    logfile = out / "logs" / f"{stage.name.replace('/', '_')}.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    log(f"{tag}: {'resuming' if resuming else 'running'} (log: {logfile})")
    start = time.perf_counter()
    try:
        with open(logfile, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    finally:  # an interrupted segment still counts (Ctrl-C, SIGTERM); a SIGKILLed pipeline's is lost
        seconds = time.perf_counter() - start
        walls[stage.name] = walls.get(stage.name, 0.0) + seconds  # a resumed stage adds its parts
        (out / "wall_seconds.json").write_text(json.dumps(walls, indent=1))
    if proc.returncode != 0:
        tail = logfile.read_text().splitlines()[-30:]
        log(f"{tag} FAILED after {seconds:.0f} s (exit {proc.returncode}); the end of {logfile}:")
        print("\n".join(tail), file=sys.stderr)
        sys.exit(proc.returncode)
    log(f"{tag}: done in {seconds:.0f} s{final_accuracy(run_dir(out, stage))}")


def final_accuracy(logdir: Path) -> str:
    """The stage's last logged val/accuracy/<domain>, for the progress line."""
    from opd_lightning.report import read_scalars

    curves = read_scalars(logdir)
    last = {t.rsplit("/", 1)[1]: v[-1][1] for t, v in curves.items() if t.startswith("val/accuracy/")}
    return "; val accuracy " + ", ".join(f"{d} {v:.3f}" for d, v in sorted(last.items())) if last else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy-size run of every stage (CI smoke test)")
    parser.add_argument("--out", default="artifacts", help="output folder (default: artifacts)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated pipeline still records its times
    os.environ.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    walls_file = out / "wall_seconds.json"
    walls = json.loads(walls_file.read_text()) if walls_file.is_file() else {}
    start = time.perf_counter()
    for i, stage in enumerate(STAGES, 1):
        run_stage(i, stage, out, args.quick, walls)
    log("evaluating every model on the held-out prompts")
    from opd_lightning.report import evaluate_models, plot_curves, write_results

    eval_start = time.perf_counter()
    base_config = ["--config", str(DEFAULTS), "--config", str(CONFIGS / "base.yaml"),
                   f"--model.init_args.model={out / 'base' / 'hf'}", f"--data.cache_dir={out / 'cache' / 'encoded'}"]  # fmt: skip
    scores, specs = evaluate_models({m: out / m / "hf" for m in MODELS}, base_config)
    walls["evaluation"] = time.perf_counter() - eval_start
    walls_file.write_text(json.dumps(walls, indent=1))
    write_results(out, scores, specs, walls, experts=EXPERTS)
    plot_curves(out / "runs", out / "opd_curves.png", baselines=("baseline/sft-merge", "baseline/mixed-grpo"))
    log(f"done in {time.perf_counter() - start:.0f} s; results in {out}/results.md, accuracy.png, opd_curves.png")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
