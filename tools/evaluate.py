"""Greedy accuracy of HF model folders on every task's held-out prompts, as one table.

    python tools/evaluate.py artifacts/base/hf artifacts/experts/math/hf ... [--out results.md]

The held-out sets are the DataModule's own (seeded by task name), so figures compare with the
`val/task_accuracy/<task>` curves in TensorBoard. Also reports, per task, mean completion length.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from opd_lightning.data import DEFAULT_TASKS, PromptDataModule  # noqa: E402
from opd_lightning.models import check_local_path, load_causal_lm, load_tokenizer  # noqa: E402
from opd_lightning.rewards import exact_accuracy  # noqa: E402
from opd_lightning.rollout import SamplingConfig, generate  # noqa: E402

# the pipeline configs hold out 200 prompts per task; the same seed gives the same first items at any size
EVAL_TASKS = [dataclasses.replace(t, val_size=200) for t in DEFAULT_TASKS]


def evaluate(path: str, tasks=EVAL_TASKS, max_new_tokens: int = 24, batch_size: int = 200) -> dict[str, float]:
    tokenizer = load_tokenizer(check_local_path(path, "model"))
    model = load_causal_lm(path)
    data = PromptDataModule(tokenizer=tokenizer, tasks=tasks, max_prompt_length=256, val_batch_size=batch_size)
    data.setup("validate")
    scores: dict[str, list[float]] = {}
    for batch in data.val_dataloader():
        rollout = generate(model, batch.prompt_ids, batch.prompt_mask,
                           SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0),
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for task, s in zip(batch.tasks, exact_accuracy(rollout.decode(tokenizer), batch.entries)):
            scores.setdefault(task, []).append(s)
    return {task: sum(v) / len(v) for task, v in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="HF folders (optionally NAME=PATH)")
    parser.add_argument("--out", help="also write the table (markdown) here")
    args = parser.parse_args()
    torch.manual_seed(0)
    header = "| model | " + " | ".join(f"{t.name} ({t.domain}{'' if t.aligned else ', OOD'})" for t in DEFAULT_TASKS)
    lines = [header + " |", "|---" * (len(DEFAULT_TASKS) + 1) + "|"]
    for spec in args.models:
        name, _, path = spec.rpartition("=")
        start = time.time()
        acc = evaluate(path)
        lines.append(f"| {name or path} | " + " | ".join(f"{acc[t.name]:.3f}" for t in DEFAULT_TASKS) + " |")
        print(lines[-1], f"({time.time() - start:.0f}s)", flush=True)
    table = "\n".join(lines)
    print("\nexact-match greedy accuracy on each task's held-out prompts (200 per task)\n" + table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
