"""The overlap probe: how a student and its routed teachers relate on a few held-out prompts per domain.

"Rethinking OPD" (and every report of a stalled distillation run) points at one number measured before any
step: the top-k overlap between the student's and the teacher's next-token distributions on the student's
*own* samples. Where it is low, the teacher's per-token signal lands on tokens the student never samples and
on-policy distillation barely moves; an off-policy warm-up on the teacher's samples (ColdStart) rescues it.

:func:`probe_batches` picks the prompts (held-out, teacher-aligned, a seeded sample per domain) and
:func:`overlap_probe` measures them: the student samples at temperature 1 (as OPD draws), each row's routed
teacher scores the completion, and :func:`opd_lightning.metrics.distillation_stats` gives the per-token
statistics, token-weighted per domain and summed across data-parallel ranks. `opd check`
(:mod:`opd_lightning.check`) reports it; MultiExpertOPD's overlap-driven cold start
(:mod:`opd_lightning.stages.overlap_cold_start`) acts on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from opd_lightning.data.batch import PromptBatch
from opd_lightning.losses import masked_mean
from opd_lightning.metrics import DISTILLATION_STATS, DomainMean
from opd_lightning.rollout import SamplingConfig, completion_logits
from opd_lightning.seeding import make_generator

if TYPE_CHECKING:
    from opd_lightning.data.datamodule import PromptDataModule
    from opd_lightning.stages.base import PolicyModule
    from opd_lightning.teachers import TeacherPool

__all__ = ["overlap_probe", "probe_batches"]


def probe_batches(
    datamodule: PromptDataModule, prompts: int, device, seed: int = 0, domains: list[str] | None = None
) -> dict[str, PromptBatch]:
    """``domain -> batch`` of up to `prompts` held-out prompts of that domain's teacher-aligned tasks, drawn
    by a seeded permutation (so every task of the domain is represented). Needs ``datamodule.setup()``."""
    out = {}
    for domain in domains or datamodule.aligned_domains:
        pool = [e for e in datamodule.val_examples if e.aligned and e.domain == domain]
        if not pool:
            continue
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
        picked = [pool[i] for i in order[:prompts]]
        out[domain] = move_data_to_device(datamodule.collate_prompts(picked), device)
    return out


@torch.no_grad()
def overlap_probe(
    module: PolicyModule,
    teachers: TeacherPool,
    batches: dict[str, PromptBatch],
    *,
    max_new_tokens: int,
    overlap_k: int,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``domain -> {stat: value}`` for every key of :data:`DISTILLATION_STATS` (token-weighted means over the
    student's completions, all ranks together) plus ``tokens``, the completion tokens the means cover.

    The student (``module.policy``, sampled through ``module.sample`` so data-parallel ranks stay in
    lockstep) draws one completion per prompt at temperature 1; each row's routed teacher scores it."""
    domains = list(batches)
    stats = DomainMean([f"{d}/{s}" for d in domains for s in DISTILLATION_STATS]).to(module.device)
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0)
    for i, domain in enumerate(domains):
        generator = make_generator(seed, "overlap_probe", i, module.global_rank, device=module.device)
        rollout = module.sample(module.policy, batches[domain], config, generator=generator)
        mask = rollout.completion_mask  # [N, C]
        student = completion_logits(module.policy, rollout.input_ids, rollout.attention_mask, mask.shape[1])
        scores = teachers.score(rollout, student_logits=student, overlap_k=overlap_k)
        del student
        for name in DISTILLATION_STATS:
            stats.update(masked_mean(scores.stats[name], mask), [f"{domain}/{name}"], mask.sum().float())
    values, counts = stats.compute(), stats.counts()
    return {
        d: {
            **{s: float(values[f"{d}/{s}"]) for s in DISTILLATION_STATS if f"{d}/{s}" in values},
            "tokens": int(counts[f"{d}/reverse_kl"]),
        }
        for d in domains
    }
