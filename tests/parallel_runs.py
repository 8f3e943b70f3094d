"""A few training steps of SFT, MultiExpertOPD, GRPO or ColdStart under one split of the global batch into processes
and micro-batches, for tests/test_data_parallel.py: it calls `run` in-process for one process, and launches this
file as two gloo processes (`python -m tests.parallel_runs JOBS OUT`, LOCAL_RANK 0 and 1) for DDP.

A job is a dict: `stage` ("sft", "opd", "grpo", "cold_start"), `batch_size` (per process and micro-batch),
`accumulate`, `steps` (optimiser steps; 0 = validate only), `validate`, and the model folders.

SGD with momentum, not Adam: the weights are then linear in the gradients, so equal weights mean equal
gradients. Adam divides each gradient by its own running magnitude, which turns float32 round-off in a
near-zero gradient (~1e-9) into an update of the order of the learning rate.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy

from opd_lightning.data import PromptDataModule, TaskSpec
from opd_lightning.rollout import SamplingConfig
from opd_lightning.stages import (
    GRPO,
    SFT,
    ColdStart,
    ColdStartConfig,
    DistillConfig,
    GRPOConfig,
    MultiExpertOPD,
    RewardTerm,
    WarmupLinearDecay,
)

EASY_MATH = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1, operators=["+", "-"],
                 allow_parentheses=False, allow_negation=False)  # fmt: skip
MATH = TaskSpec("basic_arithmetic", "math", config=EASY_MATH, size=300, val_size=8)
STRING = TaskSpec("spell_backward", "string", config=dict(min_word_len=3, max_word_len=5), size=300, val_size=8)


def build(job: dict):
    """The module and datamodule of `job` (every process builds the same)."""
    stage, tiny = job["stage"], job["tiny_dir"]
    if stage == "sft":
        module = SFT(
            model=tiny,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
            lr_scheduler=lambda o: WarmupLinearDecay(o, warmup_steps=2, min_ratio=0.1),
        )
        tasks, train_format = [MATH, STRING], "sft"
    elif stage == "opd":
        module = MultiExpertOPD(
            model=tiny,
            teachers={"math": job["teachers"][0], "string": job["teachers"][1]},
            distill=DistillConfig(loss="reverse_kl"),
            sampling=SamplingConfig(max_new_tokens=6, temperature=1.0, num_samples=2),
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        )
        tasks, train_format = [MATH, STRING], "prompts"
    elif stage == "grpo":
        module = GRPO(
            model=tiny,
            sampling=SamplingConfig(max_new_tokens=6, temperature=1.0, num_samples=4),
            grpo=GRPOConfig(loss_type="dapo"),  # the token mean with a global normaliser
            # the untrained model is never right: a length reward gives the groups advantages to learn from
            shaping=[RewardTerm("opd_lightning.rewards.length_penalty", kwargs={"target_chars": 4})],
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        )
        tasks, train_format = [MATH, STRING], "prompts"
    else:
        module = ColdStart(
            model=tiny,
            teachers={"math": job["teachers"][0]},
            sampling=SamplingConfig(max_new_tokens=6, temperature=1.0),
            cold_start=ColdStartConfig(),
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        )
        tasks, train_format = [MATH], "prompts"
    module.eval_config.max_new_tokens = 6
    data = PromptDataModule(
        tokenizer=module.tokenizer, tasks=tasks, train_format=train_format, batch_size=job["batch_size"],
        val_batch_size=4, steps_per_epoch=10 * job["accumulate"], max_prompt_length=48, max_answer_length=8,
    )  # fmt: skip
    return module, data


class StepLosses(L.Callback):
    """The logged `train/loss` of every optimiser step (the token mean over all its micro-batches and ranks), and
    every logged `train/...` figure of each batch."""

    def __init__(self):
        self.losses: list[float] = []
        self.train: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})
        if pl_module.automatic_optimization and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.losses.append(float(trainer.callback_metrics["train/loss"]))


def run(job: dict, root: Path, devices: int = 1) -> dict:
    L.seed_everything(0)
    module, data = build(job)
    # a short process-group timeout: a rank that hangs fails the test instead of blocking CI
    strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60)) if devices > 1 else "auto"
    record = StepLosses()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=job["steps"],
        accumulate_grad_batches=job["accumulate"], logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=root, num_sanity_val_steps=0,
        limit_val_batches=0, callbacks=[record],
    )  # fmt: skip
    if job["steps"]:
        trainer.fit(module, datamodule=data)
    out = {"losses": record.losses, "train": record.train}
    if job.get("validate"):
        trainer.limit_val_batches = 1.0
        out["val"] = {k: float(v) for k, v in trainer.validate(module, datamodule=data, verbose=False)[0].items()}
    module.configure_model()  # a validate-only run has built it already; a no-op then
    out["params"] = torch.cat([p.detach().flatten() for p in module.policy.parameters()])
    out["rank"] = trainer.global_rank
    return out


if __name__ == "__main__":
    jobs, out_dir = json.loads(sys.argv[1]), Path(sys.argv[2])
    for name, job in jobs.items():
        result = run(job, out_dir / name, devices=2)
        torch.save(result, out_dir / f"{name}.rank{result['rank']}.pt")
