"""Two-process CPU runs for tests/test_fsdp.py: `python tests/fsdp_worker.py <scenario> <out> <json args>`.

Lightning starts the second process by running this script again (its subprocess launcher), and every fit of
a scenario runs in the same two processes, so the imports are paid once. Each fit writes, per rank, what it
saw (losses, routed domains, parameter bytes) to `<out>/<fit>-rank<r>.json`, and rank 0 the policy's full
weights to `<out>/<fit>.pt`. Process groups time out after `TIMEOUT`: a hang fails the run.
"""

from __future__ import annotations

import json
import resource
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from opd_lightning.callbacks import HFExport, full_state_dict
from opd_lightning.data import PromptDataModule, TaskSpec
from opd_lightning.rollout import SamplingConfig
from opd_lightning.sharding import ShardingConfig
from opd_lightning.stages import GRPO, SFT, ColdStart, MultiExpertOPD
from opd_lightning.stages.cold_start import ColdStartConfig
from opd_lightning.stages.grpo import GRPOConfig
from opd_lightning.stages.opd import DistillConfig
from tests.conftest import EASY_MATH

TIMEOUT = timedelta(seconds=60)
MATH = TaskSpec("basic_arithmetic", "math", config=EASY_MATH, size=200, val_size=4)
STRING = TaskSpec("spell_backward", "string", config=dict(min_word_len=3, max_word_len=5), size=200, val_size=4)


def strategy(kind: str):
    if kind == "ddp":
        return DDPStrategy(process_group_backend="gloo", timeout=TIMEOUT)
    return ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, timeout=TIMEOUT,
        save_distributed_checkpoint=kind != "fsdp-full",
    )  # fmt: skip


# A lambda, so the hparams drop it and checkpoints load with torch.load(weights_only=True), as the CLI's do.
adamw = lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)  # noqa: E731


class Record(L.Callback):
    """Per step: the loss this rank returned and the domains of its batch."""

    def __init__(self):
        self.losses, self.domains = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if "loss" in outputs else outputs["train/loss"]  # GRPO returns its logs
        self.losses.append(float(loss))
        self.domains.append(sorted(set(batch.domains)) if hasattr(batch, "domains") else [])


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters this rank holds: a DTensor counts its local shard only."""
    total = 0
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def fit(name: str, out: Path, module, data, kind: str, steps: int, callbacks=(), ckpt_path=None, weights_only=None,
        **trainer_kw):
    record = Record()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy(kind), max_steps=steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out / name,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[record, *callbacks],
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), **trainer_kw,
    )  # fmt: skip
    initial = None
    if ckpt_path is None:
        initial = {k: v.clone() for k, v in module.load_policy(module.model_path).state_dict().items()}
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=weights_only)
    weights = full_state_dict(module.policy)  # a collective under FSDP2: every rank joins
    frozen = {field: parameter_bytes(model) for field, model in module.frozen_models().items()}
    report = {
        "losses": record.losses,
        "domains": record.domains,
        "global_step": trainer.global_step,
        "policy_bytes": parameter_bytes(module.policy),
        "frozen_bytes": frozen,
        "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "moved": None if initial is None or not trainer.is_global_zero else any(  # full weights on rank 0 only
            not torch.equal(weights[k], v) for k, v in initial.items()),
    }  # fmt: skip
    (out / f"{name}-rank{trainer.global_rank}.json").write_text(json.dumps(report))
    if trainer.is_global_zero:
        torch.save(weights, out / f"{name}.pt")


def sft_run(args, out: Path) -> None:
    def make(gradient_checkpointing=False):
        module = SFT(model=args["tiny"], optimizer=adamw, gradient_checkpointing=gradient_checkpointing,
                     sharding=ShardingConfig())  # in the hparams: a safe global for torch.load
        data = PromptDataModule(tokenizer=module.tokenizer, tasks=[MATH], train_format="sft", batch_size=4,
                                steps_per_epoch=50, max_prompt_length=32, max_answer_length=6)  # fmt: skip
        return module, data

    def every(n, folder):
        return ModelCheckpoint(dirpath=out / folder, every_n_train_steps=n, save_top_k=-1, filename="{step}")

    clip = dict(gradient_clip_val=1.0)  # the tiny defaults clip: the DTensor gradient norm is a collective
    fit("ddp", out, *make(), "ddp", 4, **clip)
    export = HFExport(dirpath=str(out / "hf-fsdp"))
    fit("fsdp", out, *make(gradient_checkpointing=True), "fsdp", 4, [every(2, "sharded"), export], **clip)
    fit("fsdp-resumed-sharded", out, *make(True), "fsdp", 4, ckpt_path=str(out / "sharded" / "step=2.ckpt"), **clip)
    fit("fsdp-full", out, *make(True), "fsdp-full", 2, [every(2, "full")], **clip)
    fit("fsdp-resumed-full", out, *make(True), "fsdp", 4, ckpt_path=str(out / "full" / "step=2.ckpt"), **clip)


def opd_run(args, out: Path) -> None:
    def make():
        module = MultiExpertOPD(
            model=args["tiny"], teachers={"math": args["math"], "string": args["string"]}, optimizer=adamw,
            distill=DistillConfig(loss="reverse_kl", micro_batch_size=1),  # per-rank forward counts differ
            sampling=SamplingConfig(max_new_tokens=6, temperature=1.0),
        )  # fmt: skip
        data = PromptDataModule(tokenizer=module.tokenizer, tasks=[MATH, STRING], batch_size=2, steps_per_epoch=50,
                                max_prompt_length=48)  # fmt: skip
        return module, data

    def at_step_2(folder):
        return ModelCheckpoint(dirpath=out / folder, every_n_train_steps=2, save_top_k=-1, filename="{step}")

    fit("ddp", out, *make(), "ddp", 3)
    fit("fsdp", out, *make(), "fsdp", 3, [at_step_2("sharded")])
    fit("fsdp-resumed-sharded", out, *make(), "fsdp", 3, ckpt_path=str(out / "sharded" / "step=2.ckpt"),
        weights_only=False)  # fmt: skip
    fit("fsdp-full", out, *make(), "fsdp-full", 2, [at_step_2("full")])
    fit("fsdp-resumed-full", out, *make(), "fsdp", 3, ckpt_path=str(out / "full" / "step=2.ckpt"), weights_only=False)


def smoke_run(args, out: Path) -> None:
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, num_samples=2)
    grpo = GRPO(model=args["tiny"], ref_model=args["math"], sampling=sampling, optimizer=adamw,
                grpo=GRPOConfig(kl_coef=0.1, loss_type="dapo"))  # fmt: skip
    grpo_data = PromptDataModule(tokenizer=grpo.tokenizer, tasks=[MATH], batch_size=2, steps_per_epoch=50,
                                 max_prompt_length=48)  # fmt: skip
    fit("grpo", out, grpo, grpo_data, "fsdp", 2, [HFExport(dirpath=str(out / "hf-grpo"))])
    # 3 cached prompts on 2 ranks, one per batch: rank 0 samples twice, rank 1 once (and once more, in lockstep)
    cold = ColdStart(model=args["tiny"], teachers={"math": args["math"], "string": args["string"]},
                     sampling=SamplingConfig(max_new_tokens=6, temperature=1.0), optimizer=adamw,
                     cold_start=ColdStartConfig(cache_dir=str(out / "cache"), cache_prompts=3))  # fmt: skip
    cold_data = PromptDataModule(tokenizer=cold.tokenizer, tasks=[MATH, STRING], batch_size=1, steps_per_epoch=50,
                                 max_prompt_length=48)  # fmt: skip
    fit("cold_start", out, cold, cold_data, "fsdp", 2, [HFExport(dirpath=str(out / "hf-cold_start"))])


if __name__ == "__main__":
    scenario, out, args = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    torch.set_num_threads(1)
    {"sft": sft_run, "opd": opd_run, "smoke": smoke_run}[scenario](args, out)
