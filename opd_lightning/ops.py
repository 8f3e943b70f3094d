"""Log-prob primitives shared by rollout, teachers, losses and metrics: no losses, no masks, no reductions.

Everything here maps logits ``[..., V]`` to per-position values in at least float32 (float64 stays
float64, which :func:`torch.autograd.gradcheck` needs): the log-softmax, a log-softmax read at a few ids
(:func:`support_logprobs`, :func:`token_logprobs`), the per-token KL of two log-prob vectors and the
top-k supports of the top-k reverse KL. Sampling (:mod:`opd_lightning.rollout`), teacher scoring
(:mod:`opd_lightning.teachers`), the losses and the diagnostics all read distributions through these,
so a rollout's behaviour log-probs, a teacher's scores and a loss's log-probs are computed the same way.

**Logits that are never whole.** At a real vocabulary a batch's ``[N, C, V]`` logits are the largest
tensors of a step (64 rows x 4,096 tokens x 152k ids is 160 GB in float32). :class:`HiddenLogits` keeps the
final hidden states ``[N, C, H]`` and the LM head instead (:class:`RoutedLogits`: one per routed teacher);
:func:`position_chunks` and :func:`logits_at` turn a chunk of real (masked-in) positions at a time into logits.
:func:`map_positions` reduces each chunk to per-position values with autograd, recomputing the chunk in the
backward pass (activation checkpointing), so memory is O(chunk x V) plus O(N x C x H), not O(N x C x V):
:func:`gather_logprobs` reads log-probs at a few ids that way, the full-vocabulary losses compare the student's
and the teacher's whole distributions that way (:mod:`opd_lightning.losses`).

**One LM-head weight gradient.** What is left that grows with V is the head's ``[V, H]`` weight gradient (the
tied embedding's, for the students here). Checkpointed chunks each made their own, which autograd summed out of
place, and a tied embedding's backward adds a dense ``[V, H]`` of its own: three copies at once. With a plain
``nn.Linear`` head, :func:`map_positions`'s backward (:class:`_LinearHeadChunks`) adds every chunk's ``dz^T h``
in place into one buffer, so two copies remain at the peak (that buffer and the embedding's gradient, which
autograd then sums in place). Measured (``tools/bench.py --only memory``, one OPD step of the 1M student, tied,
H = 128, 8 x 32 completion tokens; MiB over the resident size before the step): at V = 1k / 32k / 152k,
``sampled_reverse_kl`` and ``top_k=8`` 35 / 140 / 251 before, 34 / 108 / 165 after (34 / 123 / 165 on a
diagnostics step), full-vocabulary ``reverse_kl`` 35 / 140 / 251 before, 34 / 140 / 196 after. Of the 165, 2 x 74
MiB are those two ``[V, H]`` copies; the rest is flat in V above 32k (chunks of :data:`LOGIT_CHUNK_ELEMENTS`);
from 1k to 32k a chunk grows to that bound.

Masked means stay in :mod:`opd_lightning.losses`: a masked mean is where a loss's normalisation lives
(the ``normalizer`` that keeps a token mean the same under data parallelism), which is a property of
the loss, not of a log-prob.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "LOGIT_CHUNK_ELEMENTS",
    "HiddenLogits",
    "Logits",
    "RoutedLogits",
    "dense",
    "gather_logprobs",
    "kl_divergence",
    "log_softmax",
    "logits_at",
    "map_positions",
    "position_chunks",
    "support_logprobs",
    "token_logprobs",
    "topk_support",
    "upcast",
]

# Elements per float32 chunk when upcasting half-precision logits (256 MiB): bounds the temporary
# copy however long the batch.
_UPCAST_CHUNK_ELEMENTS = 2**26


# Below this many elements kl_divergence multiplies and sums: bmm's many short dot products cost twice as much
# there (224 x 1k: 2.2 ms against 1.1 ms forward + backward, 1 thread), and the product is small; at a chunk of a
# real vocabulary (128 x 32k) the dot product is the faster (31 ms against 44-57) and saves a 16 MiB product.
_DOT_MIN_ELEMENTS = 2**20


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
    p, d = logp.exp(), logp - logq
    if p.numel() < _DOT_MIN_ELEMENTS:
        return (p * d).sum(-1)
    # a dot product (einsum: one bmm) makes no [..., V] product: the peak of a full-vocabulary loss's chunk
    return torch.einsum("...v,...v->...", p, d)


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
        """The whole ``[N, C, V]`` logits: for a consumer that needs them all at once."""
        return self.head(self.hidden)


@dataclass
class RoutedLogits:
    """Logits ``[N, C, V]`` whose rows come from different models (each row's routed teacher): ``parts`` pairs the
    batch rows ``[n_j]`` that one forward scored with their logits ``[n_j, C, V]``, dense or :class:`HiddenLogits`
    (a teacher without a separable LM head stays dense); every row is in exactly one part. Built by
    :meth:`opd_lightning.teachers.TeacherPool.score` for the full-vocabulary losses, read by :func:`logits_at`."""

    parts: list[tuple[Tensor, Tensor | HiddenLogits]]
    rows: int  # N
    owner: Tensor = field(init=False, repr=False)  # [N] index of each row's part
    local: Tensor = field(init=False, repr=False)  # [N] each row's index within its part

    def __post_init__(self) -> None:
        device = self.parts[0][0].device
        self.owner = torch.full((self.rows,), -1, dtype=torch.long, device=device)
        self.local = torch.zeros(self.rows, dtype=torch.long, device=device)
        for j, (rows, _) in enumerate(self.parts):
            self.owner[rows] = j
            self.local[rows] = torch.arange(len(rows), device=device)
        if bool((self.owner < 0).any()):
            missing = (self.owner < 0).nonzero().flatten().tolist()
            raise ValueError(
                f"RoutedLogits: rows {missing} are in no part; every row needs its model's logits"
            )

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows, *self.parts[0][1].shape[1:]))

    def dense(self) -> Tensor:
        out = None
        for rows, part in self.parts:
            values = dense(part)
            if out is None:
                out = values.new_empty((self.rows, *values.shape[1:]))
            out[rows] = values
        return out


Logits = Tensor | HiddenLogits | RoutedLogits
"""Logits ``[N, C, V]`` in any of the forms :func:`logits_at` reads."""


def dense(logits: Logits) -> Tensor:
    """The whole ``[N, C, V]`` logits of any form: for a consumer that needs them all at once."""
    return logits if isinstance(logits, Tensor) else logits.dense()


def _positions_per_chunk(vocab: int, chunk_elements: int | None) -> int:
    return max(1, (chunk_elements or LOGIT_CHUNK_ELEMENTS) // vocab)


def position_chunks(
    mask: Tensor, vocab: int, chunk_elements: int | None = None
) -> list[tuple[Tensor, Tensor]]:
    """The True positions of ``mask [N, C]`` as ``(rows, cols)`` index pairs in row-major order,
    ``chunk_elements // vocab`` positions (at least 1) per chunk: padding gets no logits at all.
    ``chunk_elements`` defaults to :data:`LOGIT_CHUNK_ELEMENTS`, read at call time."""
    rows, cols = mask.bool().nonzero(as_tuple=True)
    size = _positions_per_chunk(vocab, chunk_elements)
    return list(zip(rows.split(size), cols.split(size), strict=True))


def logits_at(logits: Logits, rows: Tensor, cols: Tensor) -> Tensor:
    """The logits at positions ``(rows[i], cols[i])``: ``[p, V]``, in the model's dtype."""
    if isinstance(logits, HiddenLogits):
        return logits.head(logits.hidden[rows, cols])
    if isinstance(logits, RoutedLogits):
        owner, local = logits.owner[rows], logits.local[rows]
        # unique() waits for the device: skipped when there is one part; [0] when there is no position at all
        parts = [0] if len(logits.parts) == 1 else owner.unique().tolist() or [0]
        if len(parts) == 1:  # one model's rows: no assembly
            return logits_at(logits.parts[parts[0]][1], local, cols)
        out = None
        for j in parts:
            pick = (owner == j).nonzero(as_tuple=True)[0]
            values = logits_at(logits.parts[j][1], local[pick], cols[pick])
            if out is None:
                out = values.new_empty((len(rows), values.shape[-1]))
            out[pick] = values
        return out
    return logits[rows, cols]


def _chunk_values(
    fn: Callable[..., Tensor], head: nn.Module, others: tuple[Logits, ...],
    hidden: Tensor, rows: Tensor, cols: Tensor, *values: Tensor,
) -> Tensor:  # fmt: skip
    return fn(head(hidden), *(logits_at(other, rows, cols) for other in others), *values)


def _chunks(size: int, *tensors: Tensor) -> zip:
    """``tensors`` (``[P, ...]`` each) ``size`` positions at a time: a tuple of chunks per step."""
    return zip(*(tensor.split(size) for tensor in tensors), strict=True)


def _requires_grad(logits: Logits) -> bool:
    if isinstance(logits, HiddenLogits):
        return logits.hidden.requires_grad or any(p.requires_grad for p in logits.head.parameters())
    if isinstance(logits, RoutedLogits):
        return any(_requires_grad(part) for _, part in logits.parts)
    return logits.requires_grad


def _linear_chunk_grads(
    fn: Callable[..., Tensor], weight: Tensor, bias: Tensor | None, others: tuple[Logits, ...],
    hidden: Tensor, rows: Tensor, cols: Tensor, grad: Tensor, *values: Tensor,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One chunk's ``dz [p, V]`` (``z = hidden W^T + b``) and ``dL/dhidden [p, H]``, for ``grad [p, ...]`` on ``fn``'s
    output. ``z`` and the others' logits are referenced by nothing but ``fn``'s graph, so those ``fn`` does not keep
    for its backward are freed before it runs, as a checkpointed chunk's are."""
    hidden = hidden.detach().requires_grad_()
    dz = []
    with torch.enable_grad():
        z = F.linear(hidden, weight, bias)  # weight and bias need no grad here: dW is summed by the caller
        z.register_hook(dz.append)
        out = fn(z, *(logits_at(other, rows, cols) for other in others), *values)
        del z
    (grad_hidden,) = torch.autograd.grad(out, hidden, grad)
    return dz[0], grad_hidden


class _LinearHeadChunks(torch.autograd.Function):
    """:func:`map_positions`'s chunks through a plain ``nn.Linear`` head ``z = h W^T + b``, its weight gradient
    summed in place into one ``[V, H]`` buffer.

    Forward: each chunk's ``fn`` under ``no_grad``, keeping only its per-position results. Backward, per chunk:
    the logits ``z`` again, with ``W`` and ``b`` detached; ``dz`` and ``dL/dh = dz W`` by autograd through ``fn``
    (:func:`_linear_chunk_grads`); then ``dL/dW += dz^T h`` (``addmm_``) and ``dL/db += sum dz``, in place.
    Checkpointing each chunk instead gives each chunk's head product its own ``[V, H]`` weight gradient, which
    autograd adds to the running sum out of place: three ``[V, H]`` copies at once where a tied embedding's dense
    gradient joins them (251 MiB at the bench's 152k step, 165 MiB this way: see the module docstring).
    """

    @staticmethod
    def forward(ctx, fn, head, others, size, rows, cols, hidden, weight, bias, *values):
        ctx.fn, ctx.others, ctx.size = fn, others, size
        ctx.save_for_backward(rows, cols, hidden, weight, bias, *values)
        chunks = _chunks(size, hidden, rows, cols, *values)
        return torch.cat([_chunk_values(fn, head, others, *chunk) for chunk in chunks])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        rows, cols, hidden, weight, bias, *values = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[6:9]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None  # the one [V, H] buffer, made by the first chunk's product
        grad_bias = torch.zeros_like(bias) if need_bias else None
        start = 0
        for h, r, c, g, *v in _chunks(ctx.size, hidden, rows, cols, grad_out, *values):
            dz, grad_h = _linear_chunk_grads(ctx.fn, weight, bias, ctx.others, h, r, c, g, *v)
            if need_hidden:
                grad_hidden[start : start + len(h)] = grad_h
            if need_weight:
                grad_weight = dz.T @ h if grad_weight is None else grad_weight.addmm_(dz.T, h)
            if need_bias:
                grad_bias.add_(dz.sum(0))
            start += len(h)
            del dz, grad_h  # freed before the next chunk makes its own
        constants = (None,) * 6  # fn, head, others, size, rows, cols
        return *constants, grad_hidden, grad_weight, grad_bias, *(None,) * len(values)


def map_positions(
    fn: Callable[..., Tensor],
    mask: Tensor,
    logits: HiddenLogits,
    *others: Logits,
    per_position: Sequence[Tensor] = (),
    chunk_elements: int | None = None,
) -> Tensor:
    """``fn`` at the True positions of ``mask [N, C]``, a chunk of positions at a time; 0 elsewhere: ``[N, C, ...]``.

    ``fn(z, *other_z, *values) -> [p, ...]`` gets one chunk's logits ``z [p, V]``, made from ``logits``'s hidden
    states by its head, the logits of ``others`` at the same positions (any form, :func:`logits_at`) and the
    entries of ``per_position`` (``[N, C, ...]`` each) there. Chunks hold ``chunk_elements // V`` positions
    (:func:`position_chunks`); padding gets no logits. Only ``fn``'s per-position results are kept: with autograd
    on and more than one chunk, each chunk is recomputed in the backward pass, its logits and ``fn``'s temporaries
    included, so memory is O(chunk x V) plus the hidden states, not O(N x C x V), at the cost of a second LM-head
    product per chunk (and per model in ``others`` made from hidden states).
    Differentiable with respect to ``logits``'s hidden states and head (and ``others``', where they need grad).

    How a chunk is recomputed: with a plain ``nn.Linear`` head (HF LM heads are) and nothing in ``others`` or
    ``per_position`` needing grad, by :class:`_LinearHeadChunks`, which sums the chunks' ``[V, H]`` head-weight
    gradients in place into one buffer; otherwise (or under autocast) by ``torch.utils.checkpoint`` per chunk,
    where autograd holds each chunk's ``[V, H]`` weight gradient beside the running sum (others' own leaves are
    not inputs that :class:`_LinearHeadChunks` could return gradients to).
    """
    mask = mask.bool()
    rows, cols = mask.nonzero(as_tuple=True)
    size = _positions_per_chunk(logits.shape[-1], chunk_elements)
    # One gather of the real positions' hidden states: the backward pass then scatters their gradient into
    # [N, C, H] once, where indexing each chunk would zero-fill an [N, C, H] gradient per chunk.
    hidden = logits.hidden[rows, cols]
    values = [value[rows, cols] for value in per_position]
    head, chunks = logits.head, _chunks(size, hidden, rows, cols, *values)
    if len(hidden) <= size:  # one chunk: autograd keeps its logits anyway, nothing to recompute
        out = _chunk_values(fn, head, others, hidden, rows, cols, *values)
    elif not torch.is_grad_enabled():
        out = torch.cat([_chunk_values(fn, head, others, *chunk) for chunk in chunks])
    elif (
        type(head) is nn.Linear  # a subclass may compute something else (quantised heads)
        and not any(map(_requires_grad, (*others, *values)))
        # checkpoint replays autocast in the recomputation; _LinearHeadChunks's backward would not
        and not torch.is_autocast_enabled(hidden.device.type)
    ):
        weights = head.weight, head.bias
        out = _LinearHeadChunks.apply(fn, head, others, size, rows, cols, hidden, *weights, *values)
    else:
        out = torch.cat([
            checkpoint(_chunk_values, fn, head, others, *chunk, use_reentrant=False, preserve_rng_state=False)
            for chunk in chunks
        ])  # fmt: skip
    return out.new_zeros((*mask.shape, *out.shape[1:])).index_put((rows, cols), out)


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
    positions at a time, each chunk recomputed in the backward pass (:func:`map_positions`), so memory is
    O(chunk x V). Used for the student side of the sampled-token and top-k losses
    (:func:`opd_lightning.stages.opd.distillation_loss`).
    """
    mask = mask.bool()
    if not isinstance(logits, HiddenLogits):
        values = support_logprobs(logits, ids, temperature=temperature)
        return torch.where(mask.unsqueeze(-1), upcast(values), 0.0)
    read = functools.partial(support_logprobs, temperature=temperature)
    return map_positions(read, mask, logits, per_position=(ids,), chunk_elements=chunk_elements)
