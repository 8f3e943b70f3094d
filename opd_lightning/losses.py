"""Losses for SFT, GRPO and (multi-expert) on-policy distillation, as pure functions.

Conventions shared by every function here:

* **Aligned inputs.** ``logits[b, t]`` is the distribution that predicts ``tokens[b, t]``; the stage
  does the causal shift once. Logits are ``[B, T, V]``; tokens, masks and log-probs ``[B, T]``. The
  full-vocabulary divergences also take the student's logits as :class:`~opd_lightning.ops.HiddenLogits`
  (hidden states and LM head) and the teacher's in any :data:`~opd_lightning.ops.Logits` form; they then
  compare a chunk of positions at a time and never hold ``[B, T, V]``, with the same value and gradient.
  Logits must be finite (padded vocabulary entries hold large negative numbers, not ``-inf``).
* **Masks** are True where a token counts (bool; float / int masks are read with ``.bool()``).
  Whatever sits at masked-out positions never changes a loss or its gradient.
* **Precision.** Softmaxes run in at least float32, whatever the input dtype, and losses come back in
  float32 (float64 stays float64, which :func:`torch.autograd.gradcheck` needs).
* **Normalisation.** A loss is a token mean: the masked sum divided by ``normalizer``, which defaults
  to the local ``mask.sum()`` (at least 1). In training the stage passes a constant and rescales the
  gradients by the optimiser step's global token count (``PolicyModule.token_normalizer``), so each token
  weighs the same whatever the number of processes and micro-batches (verl ``core_algos.agg_loss``).
* **Return value.** ``(loss, metrics)``: ``metrics`` maps names to detached scalar tensors. Metric
  means are *local* token means (they ignore ``normalizer``) so that they read as the quantity they
  name on any micro-batch.
* Teacher / reference inputs are not detached: score them under ``torch.no_grad()``.

The log-prob primitives the losses are built from (log-softmax gathers, per-token KL, top-k supports)
live in :mod:`opd_lightning.ops`, shared with rollout, teachers and metrics; the masked means stay
here because they carry the loss normalisation above.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from opd_lightning.ops import (
    HiddenLogits,
    Logits,
    dense,
    kl_divergence,
    log_softmax,
    map_positions,
    support_logprobs,
    upcast,
)

__all__ = [
    "completion_nll",
    "distillation_advantages",
    "forward_kl",
    "generalized_jsd",
    "group_advantages",
    "grpo_loss",
    "kl_k3",
    "masked_mean",
    "policy_gradient_loss",
    "reverse_kl",
    "sampled_reverse_kl",
    "skew_kl",
    "topk_reverse_kl",
    "topk_reverse_kl_from_logprobs",
]

Normalizer = float | Tensor | None
Metrics = dict[str, Tensor]

# --------------------------------------------------------------------------------------------------
# Masked means
# --------------------------------------------------------------------------------------------------


def _masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    # where, not multiply: padding may hold inf / nan (0 * inf = nan).
    masked = torch.where(mask.bool(), upcast(values), 0.0)
    return masked.sum() if dim is None else masked.sum(dim)


def _token_mean(total: Tensor, mask: Tensor, normalizer: Normalizer) -> Tensor:
    if normalizer is None:
        normalizer = mask.bool().sum().clamp(min=1)
    return total / torch.as_tensor(normalizer, dtype=total.dtype, device=total.device)


def masked_mean(values: Tensor, mask: Tensor, normalizer: Normalizer = None) -> Tensor:
    """Token mean ``sum(values[mask]) / normalizer``.

    ``normalizer`` defaults to the local ``mask.sum()`` clamped to at least 1, so an empty mask gives
    0 rather than nan. A given ``normalizer`` is used as is (no clamping): e.g. a constant whose
    gradients the caller rescales by a global token count (verl ``agg_loss``). Values at masked-out positions are never
    read, even when they are inf or nan.
    """
    return _token_mean(_masked_sum(values, mask), mask, normalizer)


def _local_mean(values: Tensor, mask: Tensor) -> Tensor:
    return masked_mean(values.detach(), mask)


# --------------------------------------------------------------------------------------------------
# Supervised NLL
# --------------------------------------------------------------------------------------------------


def completion_nll(
    logits: Tensor, targets: Tensor, mask: Tensor, *, normalizer: Normalizer = None
) -> tuple[Tensor, Metrics]:
    """Token-mean negative log-likelihood ``-sum_t mask_t log p(y_t) / normalizer`` (SFT).

    Only the masked positions go through ``F.cross_entropy``, so targets at padding may be anything
    (-100 included) and no log-softmax of the padded positions is built.

    Normalisation: ``normalizer`` (default local ``mask.sum()``), see :func:`masked_mean`.
    Metrics: ``nll`` (local token mean) and ``token_accuracy`` (argmax == target over masked tokens).
    """
    mask = mask.bool()
    selected = upcast(logits[mask])  # [N, V]
    selected_targets = targets[mask]  # [N]
    nll_sum = F.cross_entropy(selected, selected_targets, reduction="sum")
    loss = _token_mean(nll_sum, mask, normalizer)
    with torch.no_grad():
        n_tokens = mask.sum().clamp(min=1)
        correct = (selected.argmax(-1) == selected_targets).sum()
        metrics = {"nll": nll_sum.detach() / n_tokens, "token_accuracy": correct / n_tokens}
    return loss, metrics


# --------------------------------------------------------------------------------------------------
# Full-vocabulary divergences
# --------------------------------------------------------------------------------------------------


def _log_mixture_ratio(d: Tensor, w: float) -> Tensor:
    """``log(w + (1 - w) exp(d))`` for ``0 < w < 1``, exactly 0 at ``d = 0`` and finite for all d.

    With ``d = log q - log p`` this is ``log(m / p)`` for the mixture ``m = w p + (1 - w) q``.
    """
    # Two branches so neither overflows: for d <= 0, log1p((1 - w) expm1(d)); for d > 0,
    # d + log1p(w expm1(-d)). Each branch sees its own clamped d, because torch.where
    # back-propagates through the unselected branch too and an inf there turns into nan.
    neg = torch.log1p((1.0 - w) * torch.expm1(d.clamp(max=0.0)))
    pos_d = d.clamp(min=0.0)
    pos = pos_d + torch.log1p(w * torch.expm1(-pos_d))
    return torch.where(d > 0, pos, neg)


def _kl_to_mixture(logp: Tensor, logq: Tensor, w: float) -> Tensor:
    """``KL(p || w p + (1 - w) q)`` per token for ``0 <= w <= 1``; ``kl_divergence(logp, logq)`` at ``w = 0``."""
    if w == 0.0:
        return kl_divergence(logp, logq)
    if w == 1.0:  # m = p; the mixture ratio's log1p(-1) would be -inf for large d
        return torch.zeros_like(logp[..., 0])
    return -(logp.exp() * _log_mixture_ratio(logq - logp, w)).sum(-1)


def _per_token(
    divergence: Callable[[Tensor, Tensor], Tensor],
    student_logits: Tensor | HiddenLogits,
    teacher_logits: Logits,
    mask: Tensor,
) -> Tensor:
    """``divergence(log p_S, log p_T)`` per token, ``[B, T]``.

    Student logits given as :class:`~opd_lightning.ops.HiddenLogits`: both sides are made and compared a chunk of
    masked positions at a time and the student's chunks recomputed in the backward pass
    (:func:`opd_lightning.ops.map_positions`), so no ``[B, T, V]`` tensor exists; 0 at masked-out positions.
    Dense student logits: the whole ``[B, T, V]`` log-softmaxes at once (the teacher's made dense too).
    """
    if isinstance(student_logits, HiddenLogits):
        return map_positions(
            lambda s, t: divergence(log_softmax(s), log_softmax(t)), mask, student_logits, teacher_logits
        )
    return divergence(log_softmax(student_logits), log_softmax(dense(teacher_logits)))


def forward_kl(
    student_logits: Tensor | HiddenLogits,
    teacher_logits: Logits,
    mask: Tensor,
    *,
    normalizer: Normalizer = None,
) -> tuple[Tensor, Metrics]:
    """Forward KL ``KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v))`` per token, token mean.

    Mode covering: the student pays wherever the teacher has mass it misses (Hinton et al. 2015
    distillation; GKD ``beta = 0``). Normalisation: ``normalizer`` (default local ``mask.sum()``),
    see :func:`masked_mean`. Metrics: ``forward_kl``.
    """
    per_token = _per_token(
        lambda logp_s, logp_t: kl_divergence(logp_t, logp_s), student_logits, teacher_logits, mask
    )
    return masked_mean(per_token, mask, normalizer), {"forward_kl": _local_mean(per_token, mask)}


def reverse_kl(
    student_logits: Tensor | HiddenLogits,
    teacher_logits: Logits,
    mask: Tensor,
    *,
    normalizer: Normalizer = None,
) -> tuple[Tensor, Metrics]:
    """Reverse KL ``KL(p_S || p_T) = sum_v p_S(v) (log p_S(v) - log p_T(v))`` per token, full vocabulary.

    Mode seeking: the student pays for mass where the teacher has little, not for teacher modes it
    ignores (MiniLLM, Gu et al. 2024; on-policy distillation, Agarwal et al. 2024). Normalisation:
    ``normalizer`` (default local ``mask.sum()``), see :func:`masked_mean`. Metrics: ``reverse_kl``.
    """
    per_token = _per_token(kl_divergence, student_logits, teacher_logits, mask)
    return masked_mean(per_token, mask, normalizer), {"reverse_kl": _local_mean(per_token, mask)}


def generalized_jsd(
    student_logits: Tensor | HiddenLogits,
    teacher_logits: Logits,
    mask: Tensor,
    *,
    beta: float = 0.5,
    normalizer: Normalizer = None,
) -> tuple[Tensor, Metrics]:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1), TRL convention.

    For ``0 < beta < 1``, with the mixture ``m = beta p_T + (1 - beta) p_S``::

        JSD_beta = beta KL(p_T || m) + (1 - beta) KL(p_S || m)

    ``beta = 0.5`` is the standard JSD. As TRL's ``GKDTrainer.generalized_jsd_loss`` does, the
    endpoints are special-cased to the plain KLs, ``beta = 0`` -> ``KL(p_T || p_S)`` (forward) and
    ``beta = 1`` -> ``KL(p_S || p_T)`` (reverse), since the mixture form vanishes there.

    Limit behaviour: the interior is *not* continuous with the endpoints in scale. As beta -> 0,
    ``JSD_beta = beta KL(p_T || p_S) + O(beta^2)`` (the student term is second order), so
    ``JSD_beta / beta -> forward KL``; symmetrically ``JSD_beta / (1 - beta) -> reverse KL`` as
    beta -> 1. Expect a loss scale of order ``min(beta, 1 - beta)`` times a KL near the endpoints.

    Normalisation: ``normalizer`` (default local ``mask.sum()``), see :func:`masked_mean`.
    Metrics: ``jsd``.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")

    def jsd(logp_s: Tensor, logp_t: Tensor) -> Tensor:
        if beta == 0.0:
            return kl_divergence(logp_t, logp_s)
        if beta == 1.0:
            return kl_divergence(logp_s, logp_t)
        # KL(p_T || m) mixes p_T with weight beta; KL(p_S || m) mixes p_S with weight 1 - beta.
        return beta * _kl_to_mixture(logp_t, logp_s, beta) + (1.0 - beta) * _kl_to_mixture(
            logp_s, logp_t, 1.0 - beta
        )

    per_token = _per_token(jsd, student_logits, teacher_logits, mask)
    return masked_mean(per_token, mask, normalizer), {"jsd": _local_mean(per_token, mask)}


def skew_kl(
    student_logits: Tensor | HiddenLogits,
    teacher_logits: Logits,
    mask: Tensor,
    *,
    alpha: float = 0.1,
    reverse: bool = False,
    normalizer: Normalizer = None,
) -> tuple[Tensor, Metrics]:
    """Skew KL of DistiLLM (Ko et al. 2024, eqs. 4-5).

    ``reverse=False``: ``SKL_alpha = KL(p_T || alpha p_T + (1 - alpha) p_S)``;
    ``reverse=True``: ``SRKL_alpha = KL(p_S || alpha p_S + (1 - alpha) p_T)``.
    Mixing a little of the first argument into the second bounds the log-ratio by ``-log alpha``, which
    keeps gradients finite where the second distribution has no mass. ``alpha = 0`` is exactly the
    forward / reverse KL; ``alpha = 1`` gives 0.

    Normalisation: ``normalizer`` (default local ``mask.sum()``), see :func:`masked_mean`.
    Metrics: ``skew_kl`` or ``skew_reverse_kl``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if reverse:
        per_token = _per_token(lambda s, t: _kl_to_mixture(s, t, alpha), student_logits, teacher_logits, mask)
    else:
        per_token = _per_token(lambda s, t: _kl_to_mixture(t, s, alpha), student_logits, teacher_logits, mask)
    name = "skew_reverse_kl" if reverse else "skew_kl"
    return masked_mean(per_token, mask, normalizer), {name: _local_mean(per_token, mask)}


# --------------------------------------------------------------------------------------------------
# Top-k reverse KL
# --------------------------------------------------------------------------------------------------


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0`` (Maechler 2012: switch between the two forms at -log 2)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _log_tail(logprobs: Tensor, valid: Tensor) -> Tensor:
    """``log(1 - sum_valid p)`` from the support log-probs ``[..., K]`` -> ``[...]``."""
    log_support = torch.logsumexp(logprobs.masked_fill(~valid, -math.inf), dim=-1)
    # The support can hold all the mass up to rounding (k = V): keeping the tail >= eps keeps its
    # log finite, and both sides then share the same floor so the tail bucket contributes ~0.
    log_support = log_support.clamp(max=math.log1p(-torch.finfo(logprobs.dtype).eps))
    return _log1mexp(log_support)


def topk_reverse_kl(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    support_ids: Tensor,
    mask: Tensor,
    *,
    support_valid: Tensor | None = None,
    normalizer: Normalizer = None,
) -> tuple[Tensor, Metrics]:
    """Reverse KL on a top-k support plus one tail bucket, O(k) memory on the teacher side.

    Both distributions are coarsened to the K support ids plus a tail bucket holding the rest of
    their mass, ``p_tail = 1 - sum_{i in S} p(i)`` (computed as ``log1mexp(logsumexp)``, floored at
    float eps), and the reverse KL of the coarsened pair is::

        sum_{i in S} p_S(i) log(p_S(i) / p_T(i)) + p_S,tail log(p_S,tail / p_T,tail)

    By the data-processing inequality this lower-bounds the full :func:`reverse_kl`, with equality
    when the support is the whole vocabulary. The teacher arrives already gathered
    (``teacher_logprobs[b, t, i] = log p_T(support_ids[b, t, i])``, from
    :func:`opd_lightning.ops.support_logprobs`), so its full logits can be freed per micro-batch; the
    student side uses its full logits, so the gradient also reaches the ids in the tail.

    Shapes: ``student_logits [B, T, V]``; ``teacher_logprobs``, ``support_ids`` and ``support_valid``
    ``[B, T, K]``. Entries with ``support_valid`` False (duplicates of
    :func:`opd_lightning.ops.topk_support` "union") are ignored, whatever teacher value they hold.

    Normalisation: ``normalizer`` (default local ``mask.sum()``), see :func:`masked_mean`.
    Metrics: ``reverse_kl`` and the local token means ``student_tail_mass``, ``teacher_tail_mass``.
    """
    return topk_reverse_kl_from_logprobs(
        support_logprobs(student_logits, support_ids),
        teacher_logprobs,
        mask,
        support_valid=support_valid,
        normalizer=normalizer,
    )


def topk_reverse_kl_from_logprobs(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    *,
    support_valid: Tensor | None = None,
    normalizer: Normalizer = None,
) -> tuple[Tensor, Metrics]:
    """:func:`topk_reverse_kl` from the student's log-probs at the support, ``[B, T, K]`` (with grad), rather
    than its logits: what a caller that never holds the student's ``[B, T, V]`` logits passes
    (:func:`opd_lightning.ops.gather_logprobs` from hidden states). The gradient still reaches every id
    through the log-softmax's normaliser. Same value, metrics and normalisation as :func:`topk_reverse_kl`.
    """
    student_lp = upcast(student_logprobs)  # [B, T, K]
    valid = torch.ones_like(student_lp, dtype=torch.bool) if support_valid is None else support_valid.bool()
    # Invalid entries and padded tokens may hold -inf or garbage; zero them before any arithmetic.
    teacher_lp = torch.where(valid & mask.bool().unsqueeze(-1), upcast(teacher_logprobs), 0.0)
    student_tail, teacher_tail = _log_tail(student_lp, valid), _log_tail(teacher_lp, valid)
    buckets = torch.where(valid, student_lp.exp() * (student_lp - teacher_lp), 0.0).sum(-1)
    per_token = buckets + student_tail.exp() * (student_tail - teacher_tail)
    metrics = {
        "reverse_kl": _local_mean(per_token, mask),
        "student_tail_mass": _local_mean(student_tail.exp(), mask),
        "teacher_tail_mass": _local_mean(teacher_tail.exp(), mask),
    }
    return masked_mean(per_token, mask, normalizer), metrics


# --------------------------------------------------------------------------------------------------
# Sampled reverse KL and on-policy distillation advantages
# --------------------------------------------------------------------------------------------------


def sampled_reverse_kl(
    student_logp: Tensor,
    teacher_logp: Tensor,
    mask: Tensor,
    *,
    estimator: Literal["k1", "k3"] = "k1",
    normalizer: Normalizer = None,
) -> tuple[Tensor, Metrics]:
    """Single-sample estimate of ``KL(p_S || p_T)`` from the student's own tokens ``y_t ~ p_S``.

    With ``r = p_T(y_t) / p_S(y_t)`` (Schulman 2020, "Approximating KL divergence"):
    ``k1 = log p_S(y_t) - log p_T(y_t) = -log r`` (unbiased, can be negative) and
    ``k3 = (r - 1) - log r`` (unbiased, never negative, lower variance).

    Differentiating this loss directly is *not* the KL gradient: it omits the score-function term
    of the sampling distribution. To train on it, turn it into rewards with
    :func:`distillation_advantages` and use :func:`policy_gradient_loss`.

    Normalisation: ``normalizer`` (default local ``mask.sum()``), see :func:`masked_mean`.
    Metrics: ``sampled_reverse_kl_k1`` and ``sampled_reverse_kl_k3`` (local token means).
    """
    # Zeroed at padding, where the inputs may be -inf fills: exp would overflow there and torch.where
    # would turn the unused inf into a nan gradient.
    log_ratio = torch.where(mask.bool(), upcast(student_logp) - upcast(teacher_logp), 0.0)  # -log r
    estimates = {"k1": log_ratio, "k3": torch.expm1(-log_ratio) + log_ratio}
    if estimator not in estimates:
        raise ValueError(f"estimator must be 'k1' or 'k3', got {estimator!r}")
    metrics = {f"sampled_reverse_kl_{name}": _local_mean(value, mask) for name, value in estimates.items()}
    return masked_mean(estimates[estimator], mask, normalizer), metrics


@torch.no_grad()
def distillation_advantages(
    student_logp: Tensor,
    teacher_logp: Tensor,
    mask: Tensor,
    *,
    coef: float = 1.0,
    discount: float = 0.0,
) -> Tensor:
    """Per-token advantages for on-policy distillation with a reverse-KL reward, ``[B, T]``, detached.

    Reward ``r_t = -coef (log p_S(y_t) - log p_T(y_t))`` on the student's sampled tokens, and
    advantage ``A_t = sum_{s >= t, mask_s} discount^(s - t) r_s`` (positions, not masked tokens,
    count in the exponent); ``discount = 0`` gives ``A_t = r_t``, the per-token reverse-KL advantage of
    Thinking Machines' "On-Policy Distillation" (Lu et al. 2025) and MiMo's multi-teacher OPD.
    Zero wherever ``mask`` is False. Feed to :func:`policy_gradient_loss`.
    """
    mask = mask.bool()
    rewards = torch.where(mask, -coef * (upcast(student_logp) - upcast(teacher_logp)), 0.0)
    if discount == 0.0:
        return rewards
    if discount == 1.0:
        returns = rewards.flip(-1).cumsum(-1).flip(-1)
    else:
        returns = torch.zeros_like(rewards)
        running = torch.zeros_like(rewards[..., 0])
        for t in range(rewards.shape[-1] - 1, -1, -1):
            running = rewards[..., t] + discount * running
            returns[..., t] = running
    return torch.where(mask, returns, 0.0)


# --------------------------------------------------------------------------------------------------
# Policy gradient: PPO surrogate and GRPO
# --------------------------------------------------------------------------------------------------


def _clipped_surrogate(
    logp: Tensor,
    behaviour_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    clip_eps_high: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token PPO loss ``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))``; also ``r`` and "clipped"."""
    advantages = upcast(advantages).detach()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # one advantage per sequence
    # Padding is zeroed first: -inf / nan fills there would otherwise leak nan into the gradient
    # through torch.where's unused branch.
    mask = mask.bool()
    log_ratio = torch.where(mask, upcast(logp) - upcast(behaviour_logp).detach(), 0.0)
    advantages = torch.where(mask, advantages, 0.0)
    # Bounding the log-ratio keeps exp finite when the behaviour log-probs come from another engine
    # and disagree wildly on a rare token (verl clamps at the same +-20).
    ratio = log_ratio.clamp(-20.0, 20.0).exp()
    high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    return torch.maximum(unclipped, clipped), ratio, clipped > unclipped


def policy_gradient_loss(
    logp: Tensor,
    behaviour_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    normalizer: Normalizer = None,
) -> tuple[Tensor, Metrics]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), token mean.

    Per token, with ``r = exp(logp - behaviour_logp)``:
    ``-min(r A, clip(r, 1 - clip_eps, 1 + clip_eps_high) A)``; ``clip_eps_high`` defaults to
    ``clip_eps`` (DAPO's "clip-higher" sets it larger). ``advantages`` is ``[B, T]`` or ``[B]``
    (broadcast over tokens); it and ``behaviour_logp`` are detached. When ``logp`` equals
    ``behaviour_logp`` the gradient is REINFORCE's ``-A grad log p``.

    Normalisation: ``normalizer`` (default local ``mask.sum()``), see :func:`masked_mean`.
    Metrics: ``pg_loss``, ``clip_fraction`` (tokens whose clipped term is active, so that carry no
    gradient), ``ratio_mean``, ``ratio_max`` (local, masked).
    """
    per_token, ratio, is_clipped = _clipped_surrogate(
        logp, behaviour_logp, advantages, mask, clip_eps, clip_eps_high
    )
    metrics = _surrogate_metrics(per_token, ratio, is_clipped, mask)
    return masked_mean(per_token, mask, normalizer), metrics


def _surrogate_metrics(per_token: Tensor, ratio: Tensor, is_clipped: Tensor, mask: Tensor) -> Metrics:
    mask = mask.bool()
    ratio = ratio.detach()
    return {
        "pg_loss": _local_mean(per_token, mask),
        "clip_fraction": _local_mean(is_clipped.float(), mask),
        "ratio_mean": _local_mean(ratio, mask),
        "ratio_max": torch.where(mask, ratio, 0.0).amax(),  # ratios are > 0: an empty mask gives 0
    }


@torch.no_grad()
def group_advantages(
    rewards: Tensor, group_size: int, *, scale_std: bool = True, eps: float = 1e-4
) -> tuple[Tensor, Metrics]:
    """Group-relative advantages of GRPO (Shao et al. 2024, DeepSeekMath sec. 4.1.2).

    ``rewards [N]`` holds contiguous groups of ``group_size`` completions of one prompt.
    ``A_i = r_i - mean(group)``, divided by ``std(group) + eps`` when ``scale_std`` (Dr. GRPO, Liu et
    al. 2025, drops that division). ``std`` is the unbiased sample std, as in TRL's ``GRPOTrainer``.
    Groups whose rewards are all equal get exactly zero advantage.

    Metrics: ``reward_mean``, ``reward_std`` (mean within-group std) and ``frac_reward_zero_std``
    (fraction of groups with no reward spread, hence no learning signal; DAPO filters them).
    """
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = upcast(rewards).reshape(-1, group_size)
    mean = grouped.mean(-1, keepdim=True)
    std = grouped.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    advantages = grouped - mean
    if scale_std:
        advantages = advantages / (std + eps)
    # mean() of equal floats can be off by an ulp; such groups carry no signal, so make it exact.
    advantages = torch.where(zero_std, 0.0, advantages)
    metrics = {
        "reward_mean": grouped.mean(),
        "reward_std": std.mean(),
        "frac_reward_zero_std": zero_std.float().mean(),
    }
    return advantages.reshape(-1), metrics


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of ``KL(pi || pi_ref)`` on tokens sampled from pi (GRPO, DeepSeekMath eq. 4).

    ``exp(ref - logp) - (ref - logp) - 1``, elementwise, never negative (Schulman 2020).
    """
    delta = upcast(ref_logp) - upcast(logp)
    return torch.expm1(delta) - delta


def grpo_loss(
    logp: Tensor,
    behaviour_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "grpo",
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    max_completion_length: int | None = None,
    normalizer: Normalizer = None,
) -> tuple[Tensor, Metrics]:
    """GRPO objective: per-token PPO surrogate (+ ``kl_coef`` k3 KL to a reference), TRL aggregations.

    Per token: the clipped surrogate of :func:`policy_gradient_loss` with the sequence's advantage
    (``advantages [B]``, from :func:`group_advantages`), plus ``kl_coef * kl_k3(logp, ref_logp)``.
    Aggregation, as ``loss_type`` in TRL's ``GRPOTrainer``:

    * ``"grpo"`` (Shao et al. 2024): mean over each sequence's tokens, then over the ``B`` sequences;
      long sequences weigh less per token.
    * ``"dr_grpo"`` (Liu et al. 2025): ``sum / (B * max_completion_length)``, a constant denominator
      that removes the length bias; ``max_completion_length`` is required.
    * ``"dapo"`` (Yu et al. 2025): token mean over the batch, denominator ``normalizer`` (default local
      ``mask.sum()``, see :func:`masked_mean`).

    ``normalizer`` applies to ``"dapo"`` only and passing it with another type is an error: the other
    two denominators count sequences, which DDP's gradient averaging already makes global when
    every process holds the same number of sequences.

    Metrics: ``pg_loss`` (surrogate only), ``clip_fraction``, ``ratio_mean``, ``ratio_max`` and, when
    ``ref_logp`` is given, ``kl`` (all local token means).
    """
    if loss_type not in ("grpo", "dr_grpo", "dapo"):
        raise ValueError(f"loss_type must be 'grpo', 'dr_grpo' or 'dapo', got {loss_type!r}")
    if normalizer is not None and loss_type != "dapo":
        raise ValueError(f"normalizer applies to loss_type='dapo' only, got loss_type={loss_type!r}")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length (its constant denominator)")
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError("kl_coef != 0 needs ref_logp")
    mask = mask.bool()
    per_token, ratio, is_clipped = _clipped_surrogate(
        logp, behaviour_logp, advantages, mask, clip_eps, clip_eps_high
    )
    metrics = _surrogate_metrics(per_token, ratio, is_clipped, mask)
    if ref_logp is not None:
        # ref = logp at padding: k3 is 0 there, whatever fill the reference log-probs carry.
        kl = kl_k3(logp, torch.where(mask, upcast(ref_logp).detach(), upcast(logp).detach()))
        metrics["kl"] = _local_mean(kl, mask)
        if kl_coef != 0.0:
            per_token = per_token + kl_coef * kl

    if loss_type == "grpo":
        per_sequence = _masked_sum(per_token, mask, dim=-1) / mask.sum(-1).clamp(min=1)
        loss = per_sequence.mean()
    elif loss_type == "dr_grpo":
        loss = _masked_sum(per_token, mask) / (mask.shape[0] * max_completion_length)
    else:
        loss = masked_mean(per_token, mask, normalizer)
    return loss, metrics
