"""Diagnostics for distillation and RL: per-token statistics and per-domain means that sync under DDP.

Per-token functions take aligned logits ``[B, T, V]`` (see :mod:`opd_lightning.losses`), run
without autograd in at least float32, and return ``[B, T]`` tensors; reduce them with
:func:`opd_lightning.losses.masked_mean`. :func:`distillation_stats` gathers the ones a student /
teacher pair is monitored by (teacher scoring computes them while the teacher's logits are at hand).
:class:`DomainMean` accumulates any per-sample value by domain (or by teacher) across steps and
processes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from opd_lightning.ops import kl_divergence, log_softmax, upcast

__all__ = [
    "DISTILLATION_STATS",
    "DomainMean",
    "distillation_stats",
    "token_entropy",
    "token_kl",
    "topk_overlap",
]

DISTILLATION_STATS = (
    "reverse_kl",
    "student_entropy",
    "teacher_entropy",
    "topk_overlap",
    "student_shared_mass",
    "teacher_shared_mass",
)
"""Keys of :func:`distillation_stats`, in logging order."""


@torch.no_grad()
def token_entropy(logits: Tensor) -> Tensor:
    """Entropy ``H(p) = -sum_v p_v log p_v`` of ``softmax(logits)`` in nats, ``[B, T, V]`` -> ``[B, T]``.

    A falling entropy on the student's own samples is the usual sign of collapse in RL fine-tuning
    (Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs").
    """
    logp = log_softmax(logits)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def token_kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Exact ``KL(p || q)`` per token over the full vocabulary, ``[..., V] -> [...]`` (monitoring; no grad).

    With the student as ``p`` this is the per-token reverse KL that OPD minimises."""
    return kl_divergence(log_softmax(p_logits), log_softmax(q_logits))


@torch.no_grad()
def topk_overlap(student_logits: Tensor, teacher_logits: Tensor, k: int) -> dict[str, Tensor]:
    """How much the student's and the teacher's top-k next tokens agree, per token.

    With ``S``, ``T`` the two top-k id sets (``k`` capped at the vocabulary size), returns ``[B, T]``
    tensors: ``overlap = |S & T| / k``, ``student_shared_mass = p_S(S & T)`` and
    ``teacher_shared_mass = p_T(S & T)``. Shared mass near 1 on both sides means a top-k support
    (:func:`opd_lightning.ops.topk_support`) loses little of either distribution. Membership is
    an ``[B, T, k, k]`` comparison, so keep ``k`` modest (<= a few hundred).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, student_logits.shape[-1])
    student_logits, teacher_logits = upcast(student_logits), upcast(teacher_logits)
    student_ids = student_logits.topk(k, dim=-1).indices  # [B, T, k]
    teacher_ids = teacher_logits.topk(k, dim=-1).indices
    shared = (student_ids.unsqueeze(-1) == teacher_ids.unsqueeze(-2)).any(-1)  # [B, T, k] over student ids

    def mass_on_shared(logits: Tensor) -> Tensor:
        logp = logits.gather(-1, student_ids) - torch.logsumexp(logits, dim=-1, keepdim=True)
        return torch.where(shared, logp.exp(), 0.0).sum(-1)

    return {
        "overlap": shared.sum(-1) / k,
        "student_shared_mass": mass_on_shared(student_logits),
        "teacher_shared_mass": mass_on_shared(teacher_logits),
    }


@torch.no_grad()
def distillation_stats(
    student_logits: Tensor, teacher_logits: Tensor, overlap_k: int = 8
) -> dict[str, Tensor]:
    """Per-token diagnostics of a student / teacher pair: ``[B, T, V]`` twice -> ``{name: [B, T]}`` float32.

    Keys (:data:`DISTILLATION_STATS`): ``reverse_kl`` (exact ``KL(p_S || p_T)``, full vocabulary, so a top-k
    loss can monitor the exact KL), ``student_entropy``, ``teacher_entropy``, and :func:`topk_overlap`'s
    ``topk_overlap``, ``student_shared_mass``, ``teacher_shared_mass`` at ``k = overlap_k``. Unmasked:
    reduce with the completion mask.
    """
    overlap = topk_overlap(student_logits, teacher_logits, overlap_k)
    stats = {
        "reverse_kl": token_kl(student_logits, teacher_logits),
        "student_entropy": token_entropy(student_logits),
        "teacher_entropy": token_entropy(teacher_logits),
        "topk_overlap": overlap["overlap"],
        "student_shared_mass": overlap["student_shared_mass"],
        "teacher_shared_mass": overlap["teacher_shared_mass"],
    }
    return {name: stats[name].float() for name in DISTILLATION_STATS}


class DomainMean(Metric):
    """Weighted mean of a per-sample value for each of a fixed list of domains, summed across processes.

    ``update(values, domains, weights=None)`` adds ``weights * values`` to each sample's domain total
    and ``weights`` (default 1) to its count; ``compute()`` returns ``{domain: total / count}`` for
    the domains seen. Typical uses: accuracy or reward per domain, completion length per domain,
    KL per teacher (weights = token counts gives a token-weighted mean), and, through
    :meth:`counts`, the fraction of tokens routed to each teacher. ``compute()`` returns a dict, so
    log it with ``self.log_dict(metric.compute())`` then ``metric.reset()``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    total: Tensor
    count: Tensor

    def __init__(self, domains: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        if len(set(domains)) != len(domains) or not domains:
            raise ValueError(f"domains must be a non-empty list of distinct names, got {list(domains)}")
        self.domains = list(domains)
        self._index = {name: i for i, name in enumerate(self.domains)}
        self.add_state(
            "total", default=torch.zeros(len(self.domains), dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state(
            "count", default=torch.zeros(len(self.domains), dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, values: Tensor, domains: Sequence[str], weights: Tensor | None = None) -> None:
        """Add ``values [N]`` (optionally ``weights [N]``) to the totals of ``domains`` (``N`` names)."""
        values = torch.as_tensor(values).detach().reshape(-1)
        if values.numel() != len(domains):
            raise ValueError(f"got {values.numel()} values for {len(domains)} domains")
        unknown = sorted(set(domains) - self._index.keys())
        if unknown:
            raise ValueError(f"unknown domain(s) {unknown}; known domains: {self.domains}")
        values = values.to(device=self.total.device, dtype=torch.float64)
        weights = (
            torch.ones_like(values) if weights is None else torch.as_tensor(weights).detach().reshape(-1)
        )
        weights = weights.to(device=self.total.device, dtype=torch.float64)
        index = torch.tensor(
            [self._index[name] for name in domains], device=self.total.device, dtype=torch.long
        )
        self.total.index_add_(0, index, values * weights)
        self.count.index_add_(0, index, weights)

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = ()) -> DomainMean:
        # States stay float64 (exact counts, long sums of small values) and only follow the device:
        # Lightning's "bf16-true" precision calls module.to(bfloat16), which torchmetrics applies to
        # metric states too, and bfloat16 counts stop being exact at 257.
        this = super()._apply(fn, exclude_state=(*exclude_state, "total", "count"))
        for key in ("total", "count"):
            setattr(this, key, getattr(this, key).to(this.device))
            this._defaults[key] = this._defaults[key].to(this.device)
        return this

    def compute(self) -> dict[str, Tensor]:
        return {
            name: (self.total[i] / self.count[i]).float()
            for i, name in enumerate(self.domains)
            if self.count[i] > 0
        }

    def overall(self) -> Tensor:
        """The weighted mean over every domain together, synced like ``compute()`` (the states themselves are
        this process's only: read outside ``compute()`` they would give a rank's own figure)."""
        with self.sync_context(should_sync=self.sync_on_compute):
            return (self.total.sum() / self.count.sum().clamp(min=1)).float()

    def counts(self) -> dict[str, Tensor]:
        """Summed weights (sample counts when unweighted) of every domain, synced like ``compute()``.

        Divide by their sum for the fraction of samples (or tokens) that went to each domain.
        """
        with self.sync_context(should_sync=self.sync_on_compute):
            return {name: self.count[i].clone().float() for i, name in enumerate(self.domains)}
