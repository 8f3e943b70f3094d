"""Log-prob primitives shared by rollout, teachers, losses and metrics: no losses, no masks, no reductions.

Everything here maps logits ``[..., V]`` to per-position values in at least float32 (float64 stays
float64, which :func:`torch.autograd.gradcheck` needs): the log-softmax, a log-softmax read at a few ids
(:func:`support_logprobs`, :func:`token_logprobs`), the per-token KL of two log-prob vectors and the
top-k supports of the top-k reverse KL. Sampling (:mod:`opd_lightning.rollout`), teacher scoring
(:mod:`opd_lightning.teachers`), the losses and the diagnostics all read distributions through these,
so a rollout's behaviour log-probs, a teacher's scores and a loss's log-probs are computed the same way.

**Logits that are never whole.** At a real vocabulary a batch's ``[N, C, V]`` logits are the largest
tensors of a step (64 rows x 4,096 tokens x 152k ids is 160 GB in float32). :class:`HiddenLogits` keeps the
final hidden states ``[N, C, H]`` and the LM head instead; :func:`position_chunks` and :func:`logits_at`
turn a chunk of real (masked-in) positions at a time into logits, and :func:`gather_logprobs` reads
log-probs at a few ids that way, with autograd, recomputing each chunk in the backward pass (activation
checkpointing), so memory is O(chunk x V) plus O(N x C x H), not O(N x C x V).

Masked means stay in :mod:`opd_lightning.losses`: a masked mean is where a loss's normalisation lives
(the ``normalizer`` that keeps a token mean the same under data parallelism), which is a property of
the loss, not of a log-prob.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "LOGIT_CHUNK_ELEMENTS",
    "HiddenLogits",
    "gather_logprobs",
    "kl_divergence",
    "log_softmax",
    "logits_at",
    "position_chunks",
    "support_logprobs",
    "token_logprobs",
    "topk_support",
    "upcast",
]

# Elements per float32 chunk when upcasting half-precision logits (256 MiB): bounds the temporary
# copy however long the batch.
_UPCAST_CHUNK_ELEMENTS = 2**26


def upcast(x: Tensor) -> Tensor:
    """``x`` in at least float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def log_softmax(logits: Tensor) -> Tensor:
    """``log softmax(logits)`` over the last dimension, in at least float32."""
    return F.log_softmax(upcast(logits), dim=-1)


def kl_divergence(logp: Tensor, logq: Tensor) -> Tensor:
    """``KL(p || q) = sum_v p_v (log p_v - log q_v)`` per token, from log-probs ``[..., V]``."""
    # Written as p * (log p - log q) rather than sum(p log p) - sum(p log q): the difference is
    # exactly 0 for identical inputs and suffers no cancellation when the two are close.
    return (logp.exp() * (logp - logq)).sum(-1)


def _gather_logprobs(logits: Tensor, ids: Tensor, temperature: float) -> Tensor:
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, ids) - torch.logsumexp(logits, dim=-1, keepdim=True)


def support_logprobs(logits: Tensor, ids: Tensor, *, temperature: float = 1.0) -> Tensor:
    """``log softmax(logits / temperature)`` read at ``ids``: ``[..., V]`` and ``[..., K]`` -> ``[..., K]``.

    ``log p(i) = z_i / tau - logsumexp(z / tau)``: one gather and one logsumexp, so no log-softmax
    copy of the logits is kept. Half-precision logits are upcast to float32 a chunk of rows at a
    time, which bounds the temporary copy under ``no_grad`` (rollout, teacher scoring); with
    autograd on, each chunk is kept for the backward pass (verl ``logprobs_from_logits_v2`` does
    the same row by row).
    Used by both sides of :func:`opd_lightning.losses.topk_reverse_kl` (``ids`` from :func:`topk_support`).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.dtype in (torch.float32, torch.float64):
        return _gather_logprobs(logits, ids, temperature)
    vocab, k = logits.shape[-1], ids.shape[-1]
    flat_logits, flat_ids = logits.reshape(-1, vocab), ids.reshape(-1, k)
    rows = max(1, _UPCAST_CHUNK_ELEMENTS // vocab)
    chunks = [
        _gather_logprobs(chunk.float(), chunk_ids, temperature)
        for chunk, chunk_ids in zip(flat_logits.split(rows), flat_ids.split(rows), strict=True)
    ]
    return torch.cat(chunks).reshape(ids.shape)


def token_logprobs(logits: Tensor, tokens: Tensor, *, temperature: float = 1.0) -> Tensor:
    """``log p(tokens)`` under ``softmax(logits / temperature)``: ``[..., V]`` and ``[...]`` -> ``[...]``, float32.

    Memory-efficient (gather + logsumexp, see :func:`support_logprobs`). Every entry of ``tokens``
    must be a valid id, padding included (pad with any id and mask the result).
    """
    return support_logprobs(logits, tokens.unsqueeze(-1), temperature=temperature).squeeze(-1)


@torch.no_grad()
def topk_support(
    student_logits: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    *,
    k: int,
    source: Literal["teacher", "student", "union"] = "teacher",
) -> tuple[Tensor, Tensor]:
    """Token ids on which :func:`opd_lightning.losses.topk_reverse_kl` compares the two distributions.

    ``source="teacher"`` / ``"student"``: that model's top-k ids, ``[B, T, k]``, all valid.
    ``source="union"``: ``[B, T, 2k]``, the teacher's top-k followed by the student's top-k, where a
    student id already among the teacher's is marked invalid so that each id counts once.
    ``k`` is capped at the vocabulary size. Returns ``(ids, valid)``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    needed = {
        "teacher": [teacher_logits],
        "student": [student_logits],
        "union": [teacher_logits, student_logits],
    }
    if source not in needed:
        raise ValueError(f"source must be 'teacher', 'student' or 'union', got {source!r}")
    if any(logits is None for logits in needed[source]):
        raise ValueError(
            f"source={source!r} needs {'both logits' if source == 'union' else source + '_logits'}"
        )
    top_ids = [logits.topk(min(k, logits.shape[-1]), dim=-1).indices for logits in needed[source]]
    if source != "union":
        return top_ids[0], torch.ones_like(top_ids[0], dtype=torch.bool)
    teacher_ids, student_ids = top_ids
    # O(k log k) dedup: look each student id up in the sorted teacher ids.
    sorted_teacher = teacher_ids.sort(dim=-1).values.contiguous()
    pos = torch.searchsorted(sorted_teacher, student_ids.contiguous()).clamp(max=sorted_teacher.shape[-1] - 1)
    duplicate = sorted_teacher.gather(-1, pos) == student_ids
    ids = torch.cat([teacher_ids, student_ids], dim=-1)
    valid = torch.cat([torch.ones_like(teacher_ids, dtype=torch.bool), ~duplicate], dim=-1)
    return ids, valid


# --------------------------------------------------------------------------------------------------
# Logits a chunk of positions at a time
# --------------------------------------------------------------------------------------------------

LOGIT_CHUNK_ELEMENTS = 2**22
"""Logit elements per chunk of positions (16 MiB in float32): ``2**22 // V`` positions, 27 at Qwen3's
152k vocabulary, 4,096 at the tiny 1k one (where a tiny batch is one chunk). Each chunk's temporaries
(log-softmaxes, top-k, diagnostics) are a few times this; a chunk of a few dozen positions still keeps
the LM head a matrix product, not a vector one."""


@dataclass
class HiddenLogits:
    """Logits ``[N, C, V]`` kept as the final hidden states ``[N, C, H]`` and the LM head that maps them to
    logits (``logits = head(hidden)``), so they are only ever made a chunk of positions at a time
    (:func:`logits_at`). Built by :func:`opd_lightning.rollout.lazy_completion_logits`."""

    hidden: Tensor  # [N, C, H]
    head: nn.Module  # [..., H] -> [..., V]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], self.head.weight.shape[0]))

    def __getitem__(self, rows) -> HiddenLogits:
        return HiddenLogits(self.hidden[rows], self.head)

    def detach(self) -> HiddenLogits:
        return HiddenLogits(self.hidden.detach(), self.head)

    def dense(self) -> Tensor:
        """The whole ``[N, C, V]`` logits: for a consumer that needs them all (full-vocabulary losses)."""
        return self.head(self.hidden)


def position_chunks(
    mask: Tensor, vocab: int, chunk_elements: int | None = None
) -> list[tuple[Tensor, Tensor]]:
    """The True positions of ``mask [N, C]`` as ``(rows, cols)`` index pairs in row-major order,
    ``chunk_elements // vocab`` positions (at least 1) per chunk: padding gets no logits at all.
    ``chunk_elements`` defaults to :data:`LOGIT_CHUNK_ELEMENTS`, read at call time."""
    rows, cols = mask.bool().nonzero(as_tuple=True)
    size = max(1, (chunk_elements or LOGIT_CHUNK_ELEMENTS) // vocab)
    return list(zip(rows.split(size), cols.split(size), strict=True))


def logits_at(logits: Tensor | HiddenLogits, rows: Tensor, cols: Tensor) -> Tensor:
    """The logits at positions ``(rows[i], cols[i])``: ``[p, V]``, in the model's dtype."""
    if isinstance(logits, HiddenLogits):
        return logits.head(logits.hidden[rows, cols])
    return logits[rows, cols]


def _head_logprobs(head: nn.Module, hidden: Tensor, ids: Tensor, temperature: float) -> Tensor:
    return support_logprobs(head(hidden), ids, temperature=temperature)


def gather_logprobs(
    logits: Tensor | HiddenLogits,
    ids: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    chunk_elements: int | None = None,
) -> Tensor:
    """``log softmax(logits / temperature)`` read at ``ids`` where ``mask`` is True, 0 elsewhere: ``ids [N, C, K]``
    and ``mask [N, C]`` -> ``[N, C, K]``, at least float32. Differentiable.

    Dense logits go through :func:`support_logprobs`. :class:`HiddenLogits` are made a chunk of real
    positions at a time (:func:`position_chunks`); with autograd on and more than one chunk, each chunk is
    recomputed in the backward pass (``torch.utils.checkpoint``), so only the hidden states are kept and
    memory is O(chunk x V), at the cost of a second LM-head product per chunk. Used for the student side of
    the sampled-token and top-k losses (:func:`opd_lightning.stages.opd.distillation_loss`).
    """
    mask = mask.bool()
    if not isinstance(logits, HiddenLogits):
        values = support_logprobs(logits, ids, temperature=temperature)
        return torch.where(mask.unsqueeze(-1), upcast(values), 0.0)
    n, c, k = ids.shape
    chunks = position_chunks(mask, logits.shape[-1], chunk_elements)
    recompute = len(chunks) > 1 and torch.is_grad_enabled()
    pieces = []
    for rows, cols in chunks:
        args = (logits.head, logits.hidden[rows, cols], ids[rows, cols], temperature)
        if recompute:
            pieces.append(checkpoint(_head_logprobs, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            pieces.append(_head_logprobs(*args))
    if not pieces:
        return torch.zeros((n, c, k), dtype=torch.float32, device=ids.device)
    values = torch.cat(pieces)
    return values.new_zeros((n, c, k)).index_put(mask.nonzero(as_tuple=True), values)
