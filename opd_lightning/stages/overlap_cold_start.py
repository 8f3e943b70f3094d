"""Overlap-driven cold start: ColdStart's SFT on teacher samples, inside an OPD run, only where it is needed.

On-policy distillation stalls when the student's top-k next tokens overlap little with its teacher's ("Rethinking
OPD"): the teacher grades tokens the student never samples. The remedy is an off-policy warm-up on the teacher's
own samples (the ColdStart stage). MultiExpertOPD's ``overlap_cold_start`` option makes it automatic and per
domain: before the first OPD step it measures each domain's overlap on a held-out probe
(:func:`opd_lightning.probe.overlap_probe`); every domain under ``below_overlap`` gets ColdStart steps (its
routed teacher samples answers to the domain's training prompts, :func:`~opd_lightning.stages.cold_start.
teacher_rows`, and the student learns them with the SFT loss) until its overlap clears the threshold or
``max_steps`` is spent; then OPD proceeds.

It uses its own optimiser (the YAML's, fresh, at its base LR, thrown away after) so the OPD optimiser's state and
LR schedule start as they would without it, and its own seeded prompt draws, so the OPD data stream is the same.
What ran (overlap per domain before and after, steps per domain) is logged under ``cold_start/`` and stored in
the checkpoint, so a resumed run does not redo it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_info

from opd_lightning.data.teacher_samples import collate_rows
from opd_lightning.losses import completion_nll
from opd_lightning.probe import overlap_probe, probe_batches
from opd_lightning.rollout import completion_logits
from opd_lightning.seeding import make_generator
from opd_lightning.stages.cold_start import teacher_rows

if TYPE_CHECKING:
    from opd_lightning.stages.opd import MultiExpertOPD

__all__ = ["OverlapColdStart", "run_overlap_cold_start"]


@dataclass
class OverlapColdStart:
    """When and how long MultiExpertOPD warms a low-overlap student up on its teachers' samples."""

    below_overlap: float = 0.5
    """Domains whose student/teacher top-k overlap (k = distill.overlap_k, on the student's own samples of the
    probe prompts) is below this get ColdStart steps before OPD begins."""
    max_steps: int = 100
    """Most ColdStart optimiser steps in all (each step trains every domain still below the threshold)."""
    probe_prompts: int = 32
    """Held-out prompts per domain the overlap is measured on."""
    probe_every: int = 10
    """ColdStart steps between two measurements of the overlap (the loop stops at the first that clears it)."""
    batch_size: int | None = None
    """Prompts per ColdStart step, shared equally by the domains still below; null = data.batch_size."""

    def __post_init__(self) -> None:
        if not 0.0 < self.below_overlap <= 1.0:
            raise ValueError(f"overlap_cold_start.below_overlap must be in (0, 1], got {self.below_overlap}")
        for name in ("max_steps", "probe_prompts", "probe_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"overlap_cold_start.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"overlap_cold_start.batch_size must be >= 1 or null, got {self.batch_size}")


def run_overlap_cold_start(module: MultiExpertOPD, config: OverlapColdStart) -> dict:
    """Measure, warm up the domains below ``config.below_overlap``, measure again; returns the report
    ``{"threshold", "before": {domain: overlap}, "after": {...}, "steps": {domain: n}}``."""
    datamodule, device = module.trainer.datamodule, module.device
    batches = probe_batches(datamodule, config.probe_prompts, device, seed=module.seed)

    def measure(domains: list[str]) -> dict[str, float]:
        stats = overlap_probe(
            module, module.teachers, {d: batches[d] for d in domains},
            max_new_tokens=module.sampling.max_new_tokens, overlap_k=module.distill.overlap_k, seed=module.seed,
        )  # fmt: skip
        return {d: s["topk_overlap"] for d, s in stats.items()}

    before = measure(list(batches))
    after, steps = dict(before), dict.fromkeys(before, 0)
    low = sorted(d for d, v in before.items() if v < config.below_overlap)
    _log(module, {f"cold_start/topk_overlap/{d}": v for d, v in before.items()}, step=0)
    if low:
        optimizer = module.optimizer(module.policy.parameters())
        pools = {d: [e for s in datamodule.specs if s.aligned for e in datamodule.train_pools[s.name]
                     if e.domain == d] for d in low}  # fmt: skip
        rows_per_step = config.batch_size or datamodule.batch_size
        step = 0
        while low and step < config.max_steps:
            for _ in range(min(config.probe_every, config.max_steps - step)):
                draw = make_generator(module.seed, "overlap_cold_start", step, module.global_rank)
                picks = [low[i % len(low)] for i in range(rows_per_step)]
                examples = [pools[d][torch.randint(len(pools[d]), (), generator=draw)] for d in picks]
                batch = move_data_to_device(datamodule.collate_prompts(examples), device)
                rows = teacher_rows(
                    module.teachers, batch, module.sampling, module.eos_token_ids, module.tokenizer,
                    make_generator(module.seed, "overlap_cold_start_sample", step, module.global_rank, device=device),
                )  # fmt: skip
                nll = _sft_step(module, optimizer, rows)
                step += 1
                for d in low:
                    steps[d] += 1
                _log(module, {"cold_start/nll": nll}, step=step)
            after.update(measure(low))
            _log(module, {f"cold_start/topk_overlap/{d}": after[d] for d in low}, step=step)
            low = [d for d in low if after[d] < config.below_overlap]
        optimizer.zero_grad(set_to_none=True)
        del optimizer
    report = {"threshold": config.below_overlap, "before": before, "after": after, "steps": steps}
    _log(module, {f"cold_start/steps/{d}": float(n) for d, n in steps.items()}, step=0)
    rank_zero_info(f"[opd] overlap cold start: {describe(report)}")
    return report


def describe(report: dict) -> str:
    """One line per run: ``math 0.12 -> 0.61 in 30 steps; string 0.83 (>= 0.5, none needed)``."""
    parts = []
    for d, v in report["before"].items():
        if report["steps"][d]:
            reached = "" if report["after"][d] >= report["threshold"] else f", still < {report['threshold']}"
            parts.append(f"{d} {v:.2f} -> {report['after'][d]:.2f} in {report['steps'][d]} steps{reached}")
        else:
            parts.append(f"{d} {v:.2f} (>= {report['threshold']}, none needed)")
    return "; ".join(parts)


def _sft_step(module: MultiExpertOPD, optimizer: torch.optim.Optimizer, rows: list[dict]) -> float:
    """One ColdStart update: the student teacher-forced on the teacher's completions, completion-token NLL."""
    samples = collate_rows(rows, module.tokenizer.pad_token_id, module.device)
    mask = samples.completion_mask
    logits = completion_logits(module.policy, samples.input_ids, samples.attention_mask, mask.shape[1])
    # the token mean over every rank's tokens (not module.token_normalizer: that counts towards an OPD step)
    count = mask.sum().float()
    if module.trainer.world_size > 1:
        dist.all_reduce(count)
        count /= module.trainer.world_size
    loss, metrics = completion_nll(logits, samples.completion_ids, mask, normalizer=count.clamp(min=1.0))
    loss.backward()
    params = [p for p in module.policy.parameters() if p.grad is not None]
    # Called outside the training step, the forward bypasses DDP's wrapper, whose gradient hooks then stay
    # idle: average by hand. FSDP2's hooks sit on the policy's own layers (DTensor parameters) and do run.
    if module.trainer.world_size > 1 and not any(type(p).__name__ == "DTensor" for p in params):
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= module.trainer.world_size
    if module.trainer.gradient_clip_val:
        torch.nn.utils.clip_grad_norm_(params, module.trainer.gradient_clip_val)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(metrics["nll"])


def _log(module: MultiExpertOPD, metrics: dict[str, float], step: int) -> None:
    if module.logger is not None and module.trainer.is_global_zero:
        module.logger.log_metrics(metrics, step=step)
