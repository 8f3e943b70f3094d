"""Peak host memory of MultiExpertOPD with 1 vs 3 teachers (the issue's memory figure).

    python tools/opd_memory.py                          # 1m student, 10m teachers, 5 steps
    python tools/opd_memory.py --teacher-size 1m --top-k 8

Each configuration runs in a fresh process (``ru_maxrss`` is a per-process high-water mark): a tiny student
(built once under --workdir) distils for a few steps from 1 teacher (``default``) or 3 teachers (``math``,
``string`` and ``default`` for an OOD domain), the tiny OPD setup on CPU. Teachers share the student's tokenizer
and differ by seed. Prints one JSON line per run and a Markdown table: RSS before fit (imports, data, student
tokenizer), peak RSS, and the teachers' parameter bytes for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build_models(workdir: Path, teacher_size: str) -> None:
    import torch

    from opd_lightning.models import build_tiny, build_tiny_model, load_tokenizer

    student = build_tiny(workdir / "student", "1m", seed=0)
    tokenizer = load_tokenizer(student)
    for seed in (1, 2, 3):
        out = workdir / f"teacher-{teacher_size}-{seed}"
        if not (out / "config.json").exists():
            model = build_tiny_model(tokenizer, teacher_size, seed=seed)
            with torch.no_grad():
                model.model.norm.weight.mul_(4.0)  # peaked distributions, as a trained teacher's
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)


def child(args: argparse.Namespace) -> None:
    import lightning as L
    import torch

    from opd_lightning.data import PromptDataModule, TaskSpec
    from opd_lightning.rollout import SamplingConfig
    from opd_lightning.stages.opd import DistillConfig, MultiExpertOPD

    torch.set_num_threads(args.threads)
    folders = [str(args.workdir / f"teacher-{args.teacher_size}-{seed}") for seed in (1, 2, 3)]
    routes = (
        {"default": folders[0]} if args.n_teachers == 1 else dict(zip(("math", "string", "default"), folders))
    )
    math = dict(
        min_terms=2,
        max_terms=2,
        min_digits=1,
        max_digits=2,
        operators=["+", "-"],
        allow_parentheses=False,
        allow_negation=False,
    )
    tasks = [
        TaskSpec("basic_arithmetic", "math", config=math, size=500, val_size=0),
        TaskSpec(
            "spell_backward", "string", config=dict(min_word_len=3, max_word_len=5), size=500, val_size=0
        ),
        TaskSpec(
            "chain_sum",
            "ood",
            aligned=False,
            config=dict(min_terms=3, max_terms=3, min_digits=1, max_digits=1),
            size=200,
            val_size=0,
        ),
    ]
    module = MultiExpertOPD(
        model=str(args.workdir / "student"),
        teachers=routes,
        distill=DistillConfig(loss=args.loss, top_k=args.top_k, micro_batch_size=args.micro_batch_size),
        sampling=SamplingConfig(max_new_tokens=args.max_new_tokens),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
    )
    data = PromptDataModule(
        tokenizer=module.tokenizer,
        tasks=tasks,
        ood_ratio=0.1,
        batch_size=args.batch_size,
        steps_per_epoch=args.steps,
        max_prompt_length=48,
    )
    before = rss_mb()
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    teacher_bytes = sum(p.numel() * p.element_size() for p in module.teachers.parameters())
    print(
        json.dumps(
            {
                "teachers": args.n_teachers,
                "teacher_size": args.teacher_size,
                "loss": args.loss,
                "top_k": args.top_k,
                "batch_size": args.batch_size,
                "max_new_tokens": args.max_new_tokens,
                "steps": args.steps,
                "rss_before_fit_mb": round(before, 1),
                "peak_rss_mb": round(rss_mb(), 1),
                "teacher_params_mb": round(teacher_bytes / 2**20, 1),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/opd-memory"))
    parser.add_argument("--teacher-size", default="10m", choices=["1m", "10m"])
    parser.add_argument("--teachers", type=int, nargs="+", default=[1, 3], choices=[1, 3])
    parser.add_argument("--loss", default="reverse_kl")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n-teachers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    build_models(args.workdir, args.teacher_size)
    rows = []
    for n in args.teachers:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--n-teachers",
            str(n),
            "--workdir",
            str(args.workdir),
            "--teacher-size",
            args.teacher_size,
            "--loss",
            args.loss,
            "--batch-size",
            str(args.batch_size),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
        ]
        if args.top_k is not None:
            cmd += ["--top-k", str(args.top_k)]
        if args.micro_batch_size is not None:
            cmd += ["--micro-batch-size", str(args.micro_batch_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| teachers | teacher params (MiB) | RSS before fit (MiB) | peak RSS (MiB) |\n|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['teachers']} × {row['teacher_size']} | {row['teacher_params_mb']} | "
            f"{row['rss_before_fit_mb']} | {row['peak_rss_mb']} |"
        )


if __name__ == "__main__":
    main()
