"""ColdStart: off-policy warm-up before on-policy distillation, i.e. SFT of the student on its teachers' samples.

Each prompt is routed by its domain tag to that domain's frozen teacher, the teacher samples completions
(several per prompt if asked; optionally only those the task's verifier accepts are kept), and the student
learns them teacher-forced with the SFT loss: sequence-level knowledge distillation (Kim & Rush 2016), the
"cold start" on expert samples that precedes on-policy distillation in DeepSeek-V4 / MiMo / Qwen3-style
pipelines. Its purpose is to make the student's own samples land where the teachers put mass, which the
validation measures directly: the top-k overlap between student and teacher next-token distributions on
held-out *student* rollouts (`val/topk_overlap/<domain>`), which should rise during cold start.

Where the teacher samples come from (`cold_start.cache_dir`): `null` samples every training batch's prompts
inside the step; a folder holds samples made once at fit start and reused by later runs
(:mod:`opd_lightning.data.teacher_samples`). In cache mode the datamodule still drives the loop: it is the
step clock (epochs, validation cadence, checkpoint/resume) and `len(batch) * sampling.num_samples` sets the
rows per step; the prompts of its training batches are not used.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info

from opd_lightning.data.batch import PromptBatch
from opd_lightning.data.teacher_samples import (
    TeacherSampleCache,
    cache_meta,
    collate_rows,
    rows_from_rollout,
    write_cache,
)
from opd_lightning.losses import completion_nll, masked_mean
from opd_lightning.metrics import DomainMean
from opd_lightning.rollout import SamplingConfig, completion_logits
from opd_lightning.seeding import make_generator
from opd_lightning.stages.base import PolicyModule
from opd_lightning.teachers import TeacherPool

VAL_METRICS = (
    "topk_overlap",
    "student_shared_mass",
    "teacher_shared_mass",
    "teacher_sample_nll",
    "teacher_accuracy",
)


@dataclass
class ColdStartConfig:
    """Where teacher samples come from, which are kept, and the validation diagnostics."""

    filter_correct: bool = False
    """Keep only teacher samples the task's verifier scores fully correct (exact match, `rewards.verify`)."""
    cache_dir: str | None = None
    """Folder of teacher samples generated once at fit start and reused by later runs; null samples on the
    fly in every training step."""
    cache_prompts: int = 1024
    """Prompts (all ranks together, from the head of the training stream) the teachers sample into the
    cache; each gives `sampling.num_samples` rows."""
    micro_batch_size: int | None = None
    """Rows per teacher / student forward when scoring at validation; null scores a batch at once."""
    overlap_k: int = 8
    """k of the top-k overlap between student and teacher logged at validation."""
    seed: int = 0
    """Seeds teacher sampling (per row of each step's global batch, `opd_lightning.seeding`) and the order rows are
    drawn from the cache."""

    def __post_init__(self) -> None:
        if self.cache_prompts < 1:
            raise ValueError(f"cold_start.cache_prompts must be >= 1, got {self.cache_prompts}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"cold_start.micro_batch_size must be >= 1 or null, got {self.micro_batch_size}")
        if self.overlap_k < 1:
            raise ValueError(f"cold_start.overlap_k must be >= 1, got {self.overlap_k}")


class ColdStart(PolicyModule):
    """Student SFT on completions sampled by each prompt's domain teacher (on the fly or from a disk cache)."""

    train_format = "prompts"
    frozen_modules = ("teachers",)

    def __init__(
        self,
        teachers: dict[str, str],
        sampling: SamplingConfig | None = None,
        cold_start: ColdStartConfig | None = None,
        **kwargs,
    ):
        """
        Args:
            teachers: domain tag -> local HF folder of that domain's frozen teacher; a `default` entry takes
                every domain without its own. Tokenizers must equal the student's (checked here).
            sampling: how teachers sample completions (temperature, max_new_tokens, num_samples per prompt).
            cold_start: sample source (on the fly / cache), the correctness filter, validation diagnostics.
            **kwargs: the policy and optimiser arguments of `PolicyModule` (model, dtype, optimizer, eval, ...).
        """
        super().__init__(**kwargs)
        self.sampling = sampling or SamplingConfig()
        self.config = cold_start or ColdStartConfig()
        # Cheap and before any weights load: folders exist, tokenizers and chat templates equal the student's.
        self.teachers = TeacherPool.for_student(
            teachers, self.tokenizer, trust_remote_code=self.hparams.trust_remote_code
        )
        self.cache: TeacherSampleCache | None = None  # in cache mode, once fit starts
        self._val_teacher_rows: dict[str, list[dict]] = {}

    # ------------------------------------------------------------------------------------ building

    def configure_frozen_models(self) -> None:
        self.teachers.load(dtype=self.frozen_dtype, trust_remote_code=self.hparams.trust_remote_code)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = self.trainer.datamodule
        if datamodule.train_format != "prompts":
            raise ValueError(
                "ColdStart trains on prompts: set data.train_format to 'prompts' (the CLI links it)"
            )
        self.teachers.check_domains(datamodule.domains)  # a missing route fails here, before any model loads
        self.val_metrics = torch.nn.ModuleDict({name: DomainMean(datamodule.domains) for name in VAL_METRICS})

    def max_new_tokens(self) -> int:
        return self.sampling.max_new_tokens

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.config.cache_dir is None:
            return
        path, strategy = Path(self.config.cache_dir), self.trainer.strategy
        # reading every teacher's weights is I/O-bound: one process fingerprints, the others get the result
        meta = strategy.broadcast(self.cache_meta() if strategy.is_global_zero else None)
        if not strategy.broadcast(path.exists()):
            write_cache(
                path, meta, loader=self.trainer.datamodule.train_dataloader(),
                prompts=self.config.cache_prompts, strategy=strategy, device=self.device,
                sample=lambda batch, g: self.teacher_rows(batch, uniforms=self._uniforms(batch, g)),
            )  # fmt: skip
        self.cache = TeacherSampleCache(
            path, meta, filter_correct=self.config.filter_correct, seed=self.config.seed,
            field="model.init_args.cold_start.cache_dir",
        )  # fmt: skip
        stats = self.cache.stats()
        rank_zero_info(
            f"[opd] cold start cache {path}: " + ", ".join(f"{k} {v:.3g}" for k, v in stats.items())
        )
        if self.logger is not None:
            self.logger.log_metrics(stats, step=self.global_step)

    def cache_meta(self) -> dict:
        return cache_meta(
            teachers=self.teachers, dtype=self.frozen_dtype, tokenizer=self.tokenizer,
            tokenizer_dir=self.model_path, sampling=self.sampling, cache_prompts=self.config.cache_prompts,
            seed=self.config.seed, datamodule=self.trainer.datamodule,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------ training

    def training_step(self, batch: PromptBatch, batch_idx: int):
        # 1. teacher samples: drawn from the cache, or sampled now by each prompt's routed teacher
        # the batch index counts batches, not optimiser steps (accumulation), and is restored on resume
        rows = self.teacher_samples(batch, self.trainer.fit_loop.total_batch_idx)
        correct = torch.tensor([r["correct"] for r in rows], device=self.device)  # [N] bool, exact match
        keep = correct if self.config.filter_correct else torch.ones_like(correct)

        # 2. the student, teacher-forced on prompt + teacher completion; loss on the completion tokens (EOS
        # included). Rejected rows stay in the batch with an empty mask, so every rank runs the same forward.
        samples = collate_rows(rows, self.tokenizer.pad_token_id, self.device)
        mask = samples.completion_mask & keep[:, None]
        logits = completion_logits(self.policy, samples.input_ids, samples.attention_mask, mask.shape[1])
        loss, metrics = completion_nll(logits, samples.completion_ids, mask, normalizer=self.token_normalizer(mask))

        self.log_loss(loss)
        self.log_across_ranks({f"train/{k}": v for k, v in metrics.items()})
        self.log("train/completion_tokens", mask.sum().float(), reduce_fx="sum", sync_dist=True)
        self.log_across_ranks({"train/frac_kept": keep.float().mean()})
        if self.cache is None:  # in cache mode: cache/teacher_accuracy, logged once at fit start
            self.log_across_ranks({
                "train/teacher_reward": torch.tensor([r["reward"] for r in rows]).mean(),
                "train/teacher_accuracy": correct.float().mean(),
            })  # fmt: skip
            # per domain: this rank's own (the domains in a batch differ between ranks, and so would the names)
            for domain in sorted(set(samples.domains)):
                self.log(
                    f"train/teacher_accuracy/{domain}",
                    correct[_is(samples.domains, domain, self.device)].float().mean(),
                )
        return loss

    def teacher_samples(self, batch: PromptBatch, step: int) -> list[dict]:
        """The rows batch `step` trains on: `len(batch) * sampling.num_samples` of them."""
        if self.cache is None:
            return self.teacher_rows(batch, uniforms=self._uniforms(batch, step))
        count = len(batch) * self.sampling.num_samples
        return self.cache.rows(step, self.global_rank, self.trainer.world_size, count)

    def teacher_rows(self, batch: PromptBatch, generator=None, uniforms=None) -> list[dict]:
        """`sampling.num_samples` completions of each prompt by its routed teacher, verified, as rows."""
        return teacher_rows(self.teachers, batch, self.sampling, self.eos_token_ids, self.tokenizer, generator,
                            uniforms)  # fmt: skip

    def _uniforms(self, batch: PromptBatch, cursor: int):
        """Teacher sampling of training micro-batch `cursor`, per row of its optimiser step. Cache and on-the-fly
        mode share the stream: a cached row is the sample the on-the-fly mode draws at that stream position."""
        return self.rollout_uniforms(self.config.seed, "cold_start", len(batch), self.sampling, cursor)

    def _generator(self, batch_idx: int, sample: int) -> torch.Generator:
        """Validation rollouts, per (validation batch, rank, which of the two samples)."""
        return make_generator(self.config.seed, "cold_start_val", batch_idx, self.global_rank, sample,
                              device=self.device)  # fmt: skip

    # ------------------------------------------------------------------------------------ validation

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)  # greedy accuracy of the student, val/accuracy/<domain>
        m, micro = self.val_metrics, self.config.micro_batch_size

        # the student's own samples (temperature 1, as OPD will draw them) scored by each row's teacher
        config = SamplingConfig(max_new_tokens=self.eval_max_new_tokens(), temperature=1.0)
        rollout = self.sample(self.policy, batch, config, self._generator(batch_idx, 0))
        c = rollout.completion_ids.shape[1]
        for index in torch.arange(len(rollout), device=self.device).split(micro or len(rollout)):
            part = rollout.select(index)
            with torch.no_grad():
                student = completion_logits(self.policy, part.input_ids, part.attention_mask, c)  # [m, C, V]
                stats = self.teachers.score(
                    part, student_logits=student, overlap_k=self.config.overlap_k
                ).stats
            del student
            for domain in sorted(set(part.domains)):
                mask = part.completion_mask & _is(part.domains, domain, self.device)[:, None]
                for name in ("topk_overlap", "student_shared_mass", "teacher_shared_mass"):
                    m[name].update(masked_mean(stats[name], mask), [domain], mask.sum().float())

        # teacher samples on the held-out prompts (sampled once; the teachers are frozen): the student's NLL.
        # Micro-batches of rows, not of domains: under FSDP every rank must run the same number of forwards.
        key = hashlib.sha1(batch.prompt_ids.cpu().numpy().tobytes()).hexdigest()
        if key not in self._val_teacher_rows:
            self._val_teacher_rows[key] = self.teacher_rows(batch, self._generator(batch_idx, 1))
        chunk = micro or len(self._val_teacher_rows[key])
        for lo in range(0, len(self._val_teacher_rows[key]), chunk):
            rows = self._val_teacher_rows[key][lo : lo + chunk]
            samples = collate_rows(rows, self.tokenizer.pad_token_id, self.device)
            c = samples.completion_ids.shape[1]
            with torch.no_grad():
                logits = completion_logits(self.policy, samples.input_ids, samples.attention_mask, c)
            for domain in sorted(set(samples.domains)):
                mask = samples.completion_mask & _is(samples.domains, domain, self.device)[:, None]
                _, metrics = completion_nll(logits, samples.completion_ids, mask)
                m["teacher_sample_nll"].update(metrics["nll"], [domain], mask.sum().float())
            m["teacher_accuracy"].update(torch.tensor([float(r["correct"]) for r in rows]), samples.domains)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        values = {}
        for name, metric in self.val_metrics.items():
            values.update({f"val/{name}/{d}": v for d, v in metric.compute().items()})
            values[f"val/{name}"] = metric.overall()
            metric.reset()
        self.log_val_metrics(values)


@torch.no_grad()
def teacher_rows(
    teachers: TeacherPool,
    batch: PromptBatch,
    sampling: SamplingConfig,
    eos_token_ids: list[int],
    tokenizer,
    generator: torch.Generator | None,
    uniforms: torch.Tensor | None = None,
) -> list[dict]:
    """`sampling.num_samples` completions of each prompt of `batch` by its routed teacher, verified, as rows
    (:func:`opd_lightning.data.teacher_samples.rows_from_rollout`). ColdStart's samples, and those of
    MultiExpertOPD's overlap-driven cold start."""
    rollout = teachers.generate(
        batch.prompt_ids,
        batch.prompt_mask,
        batch.domains,
        sampling,
        eos_token_id=eos_token_ids,  # the student's stop ids; each teacher adds its own
        pad_token_id=tokenizer.pad_token_id,
        generator=generator,
        uniforms=uniforms,
        tokenizer=tokenizer,
    )
    return rows_from_rollout(batch, rollout, teachers.route(rollout.domains), tokenizer)


def _is(domains: list[str], domain: str, device) -> torch.Tensor:  # [N] bool
    return torch.tensor([d == domain for d in domains], device=device)
