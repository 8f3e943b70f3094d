"""Every loss against brute-force / closed-form values, plus gradient and masking invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opd_lightning import ops
from opd_lightning.losses import (
    completion_nll,
    distillation_advantages,
    forward_kl,
    generalized_jsd,
    group_advantages,
    grpo_loss,
    kl_k3,
    masked_mean,
    policy_gradient_loss,
    reverse_kl,
    sampled_reverse_kl,
    skew_kl,
    topk_reverse_kl,
    topk_reverse_kl_from_logprobs,
)
from opd_lightning.ops import HiddenLogits, RoutedLogits, gather_logprobs, support_logprobs, topk_support

B, T, V = 3, 4, 7
# Ragged: row 0 full, row 1 three tokens, row 2 one token. 8 tokens in all.
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)


def logits(seed: int, scale: float = 2.0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(B, T, V, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def softmax_np(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def kl_np(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum(p * np.log(p / q)))


def brute_token_mean(per_token, *tensors) -> float:
    """Mean of ``per_token(*rows)`` over the masked positions, by an explicit double loop."""
    values = [
        per_token(*(x[b, t].numpy() for x in tensors)) for b in range(B) for t in range(T) if MASK[b, t]
    ]
    return sum(values) / len(values)


# --------------------------------------------------------------------------------------------------
# Full-vocabulary divergences
# --------------------------------------------------------------------------------------------------


def jsd_np(ps, pt, beta):
    m = beta * pt + (1 - beta) * ps
    return beta * kl_np(pt, m) + (1 - beta) * kl_np(ps, m)


DIVERGENCES = {
    "forward_kl": (forward_kl, lambda ps, pt: kl_np(pt, ps)),
    "reverse_kl": (reverse_kl, lambda ps, pt: kl_np(ps, pt)),
    "jsd_0.5": (
        lambda s, t, m, **kw: generalized_jsd(s, t, m, beta=0.5, **kw),
        lambda ps, pt: jsd_np(ps, pt, 0.5),
    ),
    "jsd_0.3": (
        lambda s, t, m, **kw: generalized_jsd(s, t, m, beta=0.3, **kw),
        lambda ps, pt: jsd_np(ps, pt, 0.3),
    ),
    "skew_kl": (
        lambda s, t, m, **kw: skew_kl(s, t, m, alpha=0.1, **kw),
        lambda ps, pt: kl_np(pt, 0.1 * pt + 0.9 * ps),
    ),
    "skew_reverse_kl": (
        lambda s, t, m, **kw: skew_kl(s, t, m, alpha=0.1, reverse=True, **kw),
        lambda ps, pt: kl_np(ps, 0.1 * ps + 0.9 * pt),
    ),
}


@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergence_matches_brute_force(name):
    fn, brute = DIVERGENCES[name]
    student, teacher = logits(0), logits(1)
    loss, metrics = fn(student, teacher, MASK)
    expected = brute_token_mean(lambda s, t: brute(softmax_np(s), softmax_np(t)), student, teacher)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())


def _topk_full(student, teacher, mask, **kw):
    ids = torch.arange(V).expand(B, T, V)
    return topk_reverse_kl(student, support_logprobs(teacher, ids), ids, mask, **kw)


def _topk_3(student, teacher, mask, **kw):
    ids, valid = topk_support(student, teacher, k=3, source="union")
    return topk_reverse_kl(student, support_logprobs(teacher, ids), ids, mask, support_valid=valid, **kw)


ALL_DIVERGENCES = {name: fn for name, (fn, _) in DIVERGENCES.items()} | {
    "topk_full": _topk_full,
    "topk_3": _topk_3,
}


@pytest.mark.parametrize("name", ALL_DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_divergence_is_exactly_zero_when_student_equals_teacher(name, dtype):
    student = logits(0, scale=5.0, dtype=dtype)
    loss, _ = ALL_DIVERGENCES[name](student, student.clone(), MASK)
    assert loss.item() == 0.0


def test_forward_and_reverse_kl_differ_on_an_asymmetric_pair():
    student, teacher = logits(0, scale=1.0), logits(1, scale=4.0)  # broad student, peaked teacher
    fwd, _ = forward_kl(student, teacher, MASK)
    rev, _ = reverse_kl(student, teacher, MASK)
    assert abs(fwd.item() - rev.item()) > 0.1
    # Swapping the roles swaps the two.
    assert reverse_kl(teacher, student, MASK)[0].item() == pytest.approx(fwd.item(), rel=1e-12)


def test_generalized_jsd_endpoints_are_exactly_forward_and_reverse_kl():
    student, teacher = logits(0), logits(1)
    assert torch.equal(
        generalized_jsd(student, teacher, MASK, beta=0.0)[0], forward_kl(student, teacher, MASK)[0]
    )
    assert torch.equal(
        generalized_jsd(student, teacher, MASK, beta=1.0)[0], reverse_kl(student, teacher, MASK)[0]
    )


def test_generalized_jsd_near_the_endpoints_is_beta_times_the_endpoint_kl():
    student, teacher = logits(0), logits(1)
    beta = 1e-6
    fwd, rev = forward_kl(student, teacher, MASK)[0], reverse_kl(student, teacher, MASK)[0]
    assert generalized_jsd(student, teacher, MASK, beta=beta)[0] / beta == pytest.approx(fwd.item(), rel=1e-4)
    assert generalized_jsd(student, teacher, MASK, beta=1 - beta)[0] / beta == pytest.approx(
        rev.item(), rel=1e-4
    )


def test_generalized_jsd_at_half_is_the_symmetric_jsd_bounded_by_log2():
    student, teacher = logits(0, scale=20.0), logits(1, scale=20.0)  # nearly disjoint supports
    jsd, _ = generalized_jsd(student, teacher, MASK, beta=0.5)
    assert jsd.item() == pytest.approx(generalized_jsd(teacher, student, MASK, beta=0.5)[0].item(), rel=1e-12)
    assert 0.5 < jsd.item() <= math.log(2)


@pytest.mark.parametrize("reverse", [False, True])
def test_skew_kl_with_alpha_zero_is_the_plain_kl_and_with_alpha_one_is_zero(reverse):
    student, teacher = logits(0, scale=50.0), logits(1, scale=50.0)
    plain = (reverse_kl if reverse else forward_kl)(student, teacher, MASK)[0]
    assert torch.equal(skew_kl(student, teacher, MASK, alpha=0.0, reverse=reverse)[0], plain)
    assert skew_kl(student, teacher, MASK, alpha=1.0, reverse=reverse)[0].item() == pytest.approx(
        0.0, abs=1e-15
    )


def test_mixture_divergences_stay_finite_for_extreme_logits():
    student, teacher = (
        logits(0, scale=300.0, dtype=torch.float32),
        logits(1, scale=300.0, dtype=torch.float32),
    )
    student.requires_grad_()
    for loss, _ in [
        generalized_jsd(student, teacher, MASK, beta=0.3),
        skew_kl(student, teacher, MASK, alpha=0.1),
        skew_kl(student, teacher, MASK, alpha=0.1, reverse=True),
    ]:
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


# --------------------------------------------------------------------------------------------------
# Full-vocabulary divergences from hidden states, a chunk of positions at a time
# --------------------------------------------------------------------------------------------------

H = 5
FULL_VOCABULARY = {name: fn for name, (fn, _) in DIVERGENCES.items()} | {
    "jsd_0": lambda s, t, m, **kw: generalized_jsd(s, t, m, beta=0.0, **kw),
    "jsd_1": lambda s, t, m, **kw: generalized_jsd(s, t, m, beta=1.0, **kw),
}


def hidden_and_head(seed: int, dtype=torch.float32, rows: int = B) -> tuple[torch.Tensor, torch.nn.Linear]:
    """Final hidden states ``[rows, T, H]`` and an LM head ``H -> V``, both with grad; padding holds huge values."""
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=False, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g, dtype=dtype))
    hidden = torch.randn(rows, T, H, generator=g, dtype=dtype)
    if rows == B:
        hidden = torch.where(MASK[..., None], hidden, 1e4)  # whatever sits at padding is never read
    return hidden.requires_grad_(), head


def routed_teacher(dtype=torch.float32):
    """Two teachers with their own heads: rows 0 and 2 routed to the first, row 1 to the second (as
    TeacherPool.score builds it), and the dense [B, T, V] logits they stand for."""
    (hidden_a, head_a), (hidden_b, head_b) = (
        hidden_and_head(10, dtype, rows=2),
        hidden_and_head(11, dtype, rows=1),
    )
    hidden_a, hidden_b = hidden_a.detach(), hidden_b.detach()
    parts = [
        (torch.tensor([0, 2]), HiddenLogits(hidden_a, head_a)),
        (torch.tensor([1]), HiddenLogits(hidden_b, head_b)),
    ]
    with torch.no_grad():
        dense = torch.stack([head_a(hidden_a[0]), head_b(hidden_b[0]), head_a(hidden_a[1])])
    return RoutedLogits(parts, B), dense


@pytest.mark.parametrize("positions", [1, 3, 100], ids=["1-per-chunk", "3-per-chunk", "one-chunk"])
@pytest.mark.parametrize("teacher_form", ["routed", "hidden", "dense"])
@pytest.mark.parametrize("name", FULL_VOCABULARY)
def test_full_vocabulary_divergence_from_hidden_states_equals_the_dense_loss_metrics_and_gradient(
    name, teacher_form, positions, monkeypatch
):
    """The chunked path (student's head run a few masked positions at a time, recomputed in the backward pass;
    the teacher's logits read at the same positions) against the dense [B, T, V] one, float32."""
    fn = FULL_VOCABULARY[name]
    hidden, head = hidden_and_head(0)
    teacher, teacher_dense = routed_teacher()
    if teacher_form == "hidden":
        teacher_hidden, teacher_head = hidden_and_head(1)
        teacher, teacher_dense = (
            HiddenLogits(teacher_hidden.detach(), teacher_head),
            teacher_head(teacher_hidden).detach(),
        )
    elif teacher_form == "dense":
        teacher = teacher_dense
    normalizer = 11.0  # as the stage passes: a constant, not the local token count

    dense_loss, dense_metrics = fn(head(hidden), teacher_dense, MASK, normalizer=normalizer)
    dense_grads = torch.autograd.grad(dense_loss, [hidden, head.weight])
    if name in DIVERGENCES:  # and the dense loss is the brute-force one
        brute = DIVERGENCES[name][1]
        mean = brute_token_mean(
            lambda s, t: brute(softmax_np(s), softmax_np(t)), head(hidden).detach(), teacher_dense
        )
        assert dense_loss.item() == pytest.approx(mean * MASK.sum().item() / normalizer, rel=1e-5)

    monkeypatch.setattr(ops, "LOGIT_CHUNK_ELEMENTS", positions * V)
    loss, metrics = fn(HiddenLogits(hidden, head), teacher, MASK, normalizer=normalizer)
    grads = torch.autograd.grad(loss, [hidden, head.weight])
    torch.testing.assert_close(loss, dense_loss, rtol=1e-6, atol=1e-6)
    assert metrics.keys() == dense_metrics.keys()
    for key, value in dense_metrics.items():
        assert not metrics[key].requires_grad
        torch.testing.assert_close(metrics[key], value, rtol=1e-6, atol=1e-6, msg=key)
    for got, want in zip(grads, dense_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (grads[0][~MASK] == 0).all()


@pytest.mark.parametrize("name", ["reverse_kl", "jsd_0.3", "skew_kl"])
def test_gradcheck_of_the_chunked_divergence_through_recomputed_chunks(name, monkeypatch):
    monkeypatch.setattr(ops, "LOGIT_CHUNK_ELEMENTS", 2 * V)  # 4 chunks of 2 positions
    hidden, head = hidden_and_head(0, torch.float64)
    teacher, _ = routed_teacher(torch.float64)
    weight = head.weight.detach().clone().requires_grad_()

    class MatmulHead:  # an LM head whose weight is gradcheck's own input
        def __init__(self, weight: torch.Tensor):
            self.weight = weight

        def __call__(self, h: torch.Tensor) -> torch.Tensor:
            return h @ self.weight.T

    def fn(hidden, weight):
        return FULL_VOCABULARY[name](HiddenLogits(hidden, MatmulHead(weight)), teacher, MASK)[0]

    assert torch.autograd.gradcheck(fn, (hidden.detach().clone().requires_grad_(), weight))


def test_chunked_divergence_makes_only_a_chunk_of_logits_at_a_time_forward_and_backward(monkeypatch):
    """No [B, T, V] tensor on either side: each head sees at most 3 positions per call, the masked ones only,
    the student's once in the forward pass and once more when the backward pass recomputes its chunk."""
    monkeypatch.setattr(ops, "LOGIT_CHUNK_ELEMENTS", 3 * V)
    hidden, head = hidden_and_head(0)
    teacher, _ = routed_teacher()
    seen = {"student": [], "teacher": []}
    head.register_forward_hook(lambda m, i, out: seen["student"].append(tuple(out.shape)))
    for _, part in teacher.parts:
        part.head.register_forward_hook(lambda m, i, out: seen["teacher"].append(tuple(out.shape)))
    loss, _ = generalized_jsd(HiddenLogits(hidden, head), teacher, MASK, beta=0.3)
    forward_positions = sum(shape[0] for shape in seen["student"])
    loss.backward()
    for shapes in seen.values():
        assert shapes and all(len(shape) == 2 and shape[0] <= 3 for shape in shapes), shapes
    assert forward_positions == MASK.sum(), "each real position once, padding never"
    assert sum(shape[0] for shape in seen["student"]) == 2 * MASK.sum(), (
        "recomputed once in the backward pass"
    )


def test_chunked_divergence_on_an_empty_mask_is_zero_with_zero_gradient():
    hidden, head = hidden_and_head(0)
    teacher, _ = routed_teacher()
    empty = torch.zeros_like(MASK)
    loss, metrics = reverse_kl(HiddenLogits(hidden, head), teacher, empty)
    grads = torch.autograd.grad(loss, [hidden, head.weight])
    assert loss.item() == 0.0 and metrics["reverse_kl"].item() == 0.0
    assert all((grad == 0).all() for grad in grads)


# --------------------------------------------------------------------------------------------------
# Top-k reverse KL
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_reverse_kl_with_the_whole_vocabulary_equals_full_reverse_kl(dtype):
    student, teacher = logits(0, dtype=dtype), logits(1, dtype=dtype)
    ids = torch.stack([torch.randperm(V, generator=torch.Generator().manual_seed(i)) for i in range(B * T)])
    ids = ids.reshape(B, T, V)
    loss, metrics = topk_reverse_kl(student, support_logprobs(teacher, ids), ids, MASK)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert loss.item() == pytest.approx(reverse_kl(student, teacher, MASK)[0].item(), abs=tol)
    assert metrics["student_tail_mass"] < 10 * torch.finfo(dtype).eps


@pytest.mark.parametrize("source", ["teacher", "union"])
def test_topk_reverse_kl_from_the_students_support_logprobs_equals_the_one_from_its_logits(source):
    """The hidden-state path passes the student's log-probs at the support, 0 at padding (ops.gather_logprobs):
    same loss, metrics and gradient as from the logits, and the padding fillers make no nan."""
    student, teacher = logits(0).requires_grad_(), logits(1)
    ids, valid = topk_support(student.detach(), teacher, k=3, source=source)
    teacher_lp = support_logprobs(teacher, ids)
    loss, metrics = topk_reverse_kl(student, teacher_lp, ids, MASK, support_valid=valid)
    (grad,) = torch.autograd.grad(loss, student)
    student_lp = gather_logprobs(student, ids, MASK)
    assert (student_lp[~MASK] == 0).all()
    other, other_metrics = topk_reverse_kl_from_logprobs(student_lp, teacher_lp, MASK, support_valid=valid)
    (other_grad,) = torch.autograd.grad(other, student)
    assert other.item() == pytest.approx(loss.item(), rel=1e-12)
    assert other_metrics.keys() == metrics.keys()
    for key in metrics:
        assert other_metrics[key].item() == pytest.approx(metrics[key].item(), rel=1e-12), key
    torch.testing.assert_close(other_grad, grad)


def bucketed_reverse_kl_np(s, t, ids, valid):
    ps, pt = softmax_np(s), softmax_np(t)
    support = sorted({int(i) for i, ok in zip(ids, valid, strict=True) if ok})
    qs = np.append(ps[support], 1 - ps[support].sum())
    qt = np.append(pt[support], 1 - pt[support].sum())
    return kl_np(qs, qt)


@pytest.mark.parametrize("source", ["teacher", "student", "union"])
def test_topk_reverse_kl_matches_brute_force_bucketing(source):
    student, teacher = logits(0), logits(1)
    ids, valid = topk_support(student, teacher, k=3, source=source)
    teacher_lp = support_logprobs(teacher, ids).masked_fill(~valid, float("nan"))  # invalid: ignored
    loss, metrics = topk_reverse_kl(student, teacher_lp, ids, MASK, support_valid=valid)
    expected = brute_token_mean(bucketed_reverse_kl_np, student, teacher, ids, valid)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    # Coarsening can only lose divergence (data-processing inequality).
    assert loss <= reverse_kl(student, teacher, MASK)[0]
    assert 0 < metrics["teacher_tail_mass"] < 1


# --------------------------------------------------------------------------------------------------
# NLL
# --------------------------------------------------------------------------------------------------


def test_completion_nll_matches_brute_force_and_ignores_padding_targets():
    student = logits(0)
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    targets_padded = targets.masked_fill(~MASK, -100)
    loss, metrics = completion_nll(student, targets_padded, MASK)
    expected = brute_token_mean(lambda z, y: -math.log(softmax_np(z)[int(y)]), student, targets)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    correct = [
        (student[b, t].argmax() == targets[b, t]).item() for b in range(B) for t in range(T) if MASK[b, t]
    ]
    assert metrics["token_accuracy"].item() == pytest.approx(sum(correct) / len(correct))
    assert metrics["nll"].item() == pytest.approx(expected, rel=1e-12)


def test_completion_nll_is_zero_on_an_empty_mask():
    loss, metrics = completion_nll(logits(0), torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T))
    assert loss.item() == 0.0 and metrics["token_accuracy"].item() == 0.0


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd_0.3", "skew_kl", "topk_3"])
def test_half_precision_logits_are_upcast_and_the_loss_is_float32(name):
    student, teacher = logits(0, dtype=torch.bfloat16), logits(1, dtype=torch.bfloat16)
    loss, _ = ALL_DIVERGENCES[name](student, teacher, MASK)
    reference, _ = ALL_DIVERGENCES[name](student.float(), teacher.float(), MASK)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference)


# --------------------------------------------------------------------------------------------------
# Sampled reverse KL and distillation advantages
# --------------------------------------------------------------------------------------------------


def test_sampled_reverse_kl_k1_is_the_mean_log_ratio_and_k3_is_nonnegative():
    g = torch.Generator().manual_seed(4)
    student_logp, teacher_logp = -torch.rand(B, T, generator=g) * 3, -torch.rand(B, T, generator=g) * 3
    k1, metrics = sampled_reverse_kl(student_logp, teacher_logp, MASK, estimator="k1")
    k3, _ = sampled_reverse_kl(student_logp, teacher_logp, MASK, estimator="k3")
    assert k1.item() == pytest.approx((student_logp - teacher_logp)[MASK].mean().item(), rel=1e-6)
    r = (teacher_logp - student_logp).exp()
    assert k3.item() == pytest.approx(((r - 1) - r.log())[MASK].mean().item(), rel=1e-6)
    assert k3 >= 0 and metrics["sampled_reverse_kl_k3"] == k3


def test_sampled_reverse_kl_estimators_are_unbiased_on_student_samples():
    student, teacher = torch.tensor([2.0, 0.5, -1.0, 0.0]), torch.tensor([0.0, 1.0, 0.5, -2.0])
    samples = torch.multinomial(
        student.softmax(-1), 200_000, replacement=True, generator=torch.Generator().manual_seed(5)
    )
    s_lp, t_lp = student.log_softmax(-1)[samples][None], teacher.log_softmax(-1)[samples][None]
    mask = torch.ones_like(s_lp, dtype=torch.bool)
    exact = kl_np(softmax_np(student.numpy()), softmax_np(teacher.numpy()))
    for estimator in ("k1", "k3"):
        assert sampled_reverse_kl(s_lp, t_lp, mask, estimator=estimator)[0].item() == pytest.approx(
            exact, rel=0.02
        )


@pytest.mark.parametrize("discount", [0.0, 0.9, 1.0])
def test_distillation_advantages_match_a_discounted_python_loop(discount):
    g = torch.Generator().manual_seed(6)
    student_logp, teacher_logp = -torch.rand(B, T, generator=g), -torch.rand(B, T, generator=g)
    advantages = distillation_advantages(student_logp, teacher_logp, MASK, coef=0.5, discount=discount)
    for b in range(B):
        for t in range(T):
            expected = 0.0
            if MASK[b, t]:
                expected = sum(
                    discount ** (s - t) * -0.5 * (student_logp[b, s] - teacher_logp[b, s]).item()
                    for s in range(t, T)
                    if MASK[b, s] and (s == t or discount > 0)
                )
            assert advantages[b, t].item() == pytest.approx(expected, abs=1e-6)
    assert not advantages.requires_grad


# --------------------------------------------------------------------------------------------------
# Policy gradient and GRPO
# --------------------------------------------------------------------------------------------------

# Crafted ratios (row 0) and advantages: clipping is active for (1.5, A>0) and (0.5, A<0) only.
RATIOS = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.1, 3.0]])
ADVANTAGES = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0, 1.0]])
PG_MASK = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)  # the 3.0 is padding


@pytest.mark.parametrize(("clip_eps_high", "clipped"), [(None, 2), (0.6, 1)])
def test_policy_gradient_clip_fraction_on_crafted_ratios(clip_eps_high, clipped):
    behaviour = torch.zeros_like(RATIOS)
    loss, metrics = policy_gradient_loss(
        RATIOS.log(), behaviour, ADVANTAGES, PG_MASK, clip_eps_high=clip_eps_high
    )
    assert metrics["clip_fraction"].item() == pytest.approx(clipped / 5)
    high = 1.2 if clip_eps_high is None else 1.6
    per_token = [
        max(-a * r, -a * min(max(r, 0.8), high))
        for r, a in zip(RATIOS[0, :5].tolist(), [1, 1, -1, -1, 1], strict=True)
    ]
    assert loss.item() == pytest.approx(sum(per_token) / 5, rel=1e-6)
    assert metrics["ratio_max"].item() == pytest.approx(1.5)  # the masked 3.0 is not seen


def test_policy_gradient_on_policy_gradient_is_reinforce():
    g = torch.Generator().manual_seed(7)
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    advantages = torch.randn(B, T, generator=g, dtype=torch.float64)
    loss, metrics = policy_gradient_loss(logp, logp.detach(), advantages, MASK)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, -advantages * MASK / MASK.sum())
    assert metrics["clip_fraction"] == 0 and metrics["ratio_mean"] == 1


def test_policy_gradient_broadcasts_sequence_advantages():
    g = torch.Generator().manual_seed(8)
    logp, behaviour, adv = (
        -torch.rand(B, T, generator=g),
        -torch.rand(B, T, generator=g),
        torch.randn(B, generator=g),
    )
    per_sequence, _ = policy_gradient_loss(logp, behaviour, adv, MASK)
    per_token, _ = policy_gradient_loss(logp, behaviour, adv[:, None].expand(B, T), MASK)
    assert per_sequence == per_token


def test_group_advantages_match_hand_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 1.0])
    advantages, metrics = group_advantages(rewards, 4)
    s1 = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    expected = [x / (s1 + 1e-4) for x in (0.5, -0.5, -0.5, 0.5)] + [0.0] * 4
    expected += [x / (0.5 + 1e-4) for x in (-0.25, -0.25, -0.25, 0.75)]
    torch.testing.assert_close(advantages, torch.tensor(expected))
    assert torch.equal(advantages[4:8], torch.zeros(4))  # zero-std group: exactly zero
    assert metrics["frac_reward_zero_std"].item() == pytest.approx(1 / 3)
    assert metrics["reward_mean"].item() == pytest.approx(11 / 12)
    assert metrics["reward_std"].item() == pytest.approx((s1 + 0.5) / 3, rel=1e-6)
    unscaled, _ = group_advantages(rewards, 4, scale_std=False)
    torch.testing.assert_close(unscaled[8:], torch.tensor([-0.25, -0.25, -0.25, 0.75]))


def test_group_advantages_zero_for_groups_of_equal_non_representable_rewards():
    advantages, metrics = group_advantages(torch.full((6,), 0.1), 3)
    assert torch.equal(advantages, torch.zeros(6)) and metrics["frac_reward_zero_std"] == 1


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


def test_kl_k3_matches_formula_and_is_zero_on_equal_logprobs():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -0.5, -3.0])
    d = ref - logp
    torch.testing.assert_close(kl_k3(logp, ref), d.exp() - d - 1)
    assert kl_k3(logp, ref)[0] == 0 and (kl_k3(logp, ref) >= 0).all()


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_grpo_loss_aggregation_matches_hand_computation_on_ragged_masks(loss_type):
    g = torch.Generator().manual_seed(9)
    logp, behaviour, ref = (-torch.rand(B, T, generator=g, dtype=torch.float64) for _ in range(3))
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    loss, metrics = grpo_loss(
        logp, behaviour, adv, MASK, loss_type=loss_type, ref_logp=ref, kl_coef=0.1, max_completion_length=10
    )
    per_token = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            r = math.exp(logp[b, t] - behaviour[b, t])
            pg = max(-adv[b].item() * r, -adv[b].item() * min(max(r, 0.8), 1.2))
            d = (ref[b, t] - logp[b, t]).item()
            per_token[b][t] = pg + 0.1 * (math.exp(d) - d - 1)
    sums = [sum(per_token[b][t] for t in range(T) if MASK[b, t]) for b in range(B)]
    lengths = MASK.sum(-1).tolist()
    expected = {
        "grpo": sum(s / n for s, n in zip(sums, lengths, strict=True)) / B,
        "dr_grpo": sum(sums) / (B * 10),
        "dapo": sum(sums) / sum(lengths),
    }[loss_type]
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert metrics["kl"] > 0 and "pg_loss" in metrics and "clip_fraction" in metrics


def test_grpo_loss_rejects_a_normalizer_for_sequence_level_aggregation():
    logp = torch.zeros(B, T)
    with pytest.raises(ValueError, match="dapo"):
        grpo_loss(logp, logp, torch.ones(B), MASK, loss_type="grpo", normalizer=8.0)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logp, logp, torch.ones(B), MASK, loss_type="dr_grpo")


# --------------------------------------------------------------------------------------------------
# Gradients, masking and normalisation, for every loss
# --------------------------------------------------------------------------------------------------


def make_inputs(seed: int = 0, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student, teacher = logits(seed, dtype=dtype), logits(seed + 100, dtype=dtype)
    ids, valid = topk_support(student, teacher, k=3, source="union")
    return {
        "student": student,
        "teacher": teacher,
        "targets": torch.randint(0, V, (B, T), generator=g),
        "ids": ids,
        "valid": valid,
        "teacher_lp": support_logprobs(teacher, ids),
        "logp": -torch.rand(B, T, generator=g, dtype=dtype),
        "behaviour": -torch.rand(B, T, generator=g, dtype=dtype),
        "advantages": torch.randn(B, T, generator=g, dtype=dtype),
        "seq_advantages": torch.randn(B, generator=g, dtype=dtype),
    }


# Each takes (inputs, mask, normalizer); the gradient is taken w.r.t. `student` or `logp`.
LOSSES = {
    "completion_nll": lambda x, m, n: completion_nll(x["student"], x["targets"], m, normalizer=n),
    "forward_kl": lambda x, m, n: forward_kl(x["student"], x["teacher"], m, normalizer=n),
    "reverse_kl": lambda x, m, n: reverse_kl(x["student"], x["teacher"], m, normalizer=n),
    "generalized_jsd": lambda x, m, n: generalized_jsd(x["student"], x["teacher"], m, beta=0.3, normalizer=n),
    "skew_kl": lambda x, m, n: skew_kl(x["student"], x["teacher"], m, alpha=0.2, normalizer=n),
    "skew_reverse_kl": lambda x, m, n: skew_kl(
        x["student"], x["teacher"], m, alpha=0.2, reverse=True, normalizer=n
    ),
    "topk_reverse_kl": lambda x, m, n: topk_reverse_kl(
        x["student"], x["teacher_lp"], x["ids"], m, support_valid=x["valid"], normalizer=n
    ),
    "sampled_reverse_kl": lambda x, m, n: sampled_reverse_kl(
        x["logp"], x["behaviour"], m, estimator="k3", normalizer=n
    ),
    "policy_gradient_loss": lambda x, m, n: policy_gradient_loss(
        x["logp"], x["behaviour"], x["advantages"], m, normalizer=n
    ),
    "grpo_loss_dapo": lambda x, m, n: grpo_loss(
        x["logp"],
        x["behaviour"],
        x["seq_advantages"],
        m,
        loss_type="dapo",
        ref_logp=x["behaviour"],
        kl_coef=0.1,
        normalizer=n,
    ),
}


def grad_input(name: str) -> str:
    return "logp" if name in ("sampled_reverse_kl", "policy_gradient_loss", "grpo_loss_dapo") else "student"


@pytest.mark.parametrize("name", LOSSES)
def test_gradcheck_in_float64(name):
    inputs = make_inputs()
    key = grad_input(name)

    def fn(x):
        return LOSSES[name](inputs | {key: x}, MASK, None)[0]

    assert torch.autograd.gradcheck(fn, (inputs[key].clone().requires_grad_(),))


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "generalized_jsd", "skew_reverse_kl"])
def test_gradcheck_with_respect_to_the_teacher(name):
    inputs = make_inputs()

    def fn(x):
        return LOSSES[name](inputs | {"teacher": x}, MASK, None)[0]

    assert torch.autograd.gradcheck(fn, (inputs["teacher"].clone().requires_grad_(),))


def with_garbage_padding(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Padding filled with what real pipelines leave there: huge logits, any id, -inf / nan log-probs."""
    g = torch.Generator().manual_seed(123)
    fills = torch.tensor([float("-inf"), float("nan"), float("inf"), -1e4], dtype=torch.float64)
    out = {}
    for key, x in inputs.items():
        if x.dim() < 2:
            out[key] = x
            continue
        pad = ~MASK.reshape(B, T, *([1] * (x.dim() - 2)))
        if key in ("targets", "ids"):
            garbage = torch.randint(0, V, x.shape, generator=g)
        elif key == "valid":
            garbage = torch.rand(x.shape, generator=g) < 0.5
        elif key in ("student", "teacher", "logp"):  # model outputs: finite, possibly huge
            garbage = torch.randn(x.shape, generator=g, dtype=x.dtype) * 1e3
        else:  # fills of recorded log-probs and advantages
            garbage = fills[torch.randint(0, len(fills), x.shape, generator=g)].to(x.dtype)
        out[key] = torch.where(pad, garbage, x)
    return out


@pytest.mark.parametrize("name", LOSSES)
def test_garbage_at_padding_changes_neither_loss_nor_gradient(name):
    key = grad_input(name)
    clean = make_inputs()
    dirty = with_garbage_padding(clean)
    results = []
    for inputs in (clean, dirty):
        x = inputs[key].clone().requires_grad_()
        loss, _ = LOSSES[name](inputs | {key: x}, MASK, None)
        (grad,) = torch.autograd.grad(loss, x)
        results.append((loss, grad))
    (loss_clean, grad_clean), (loss_dirty, grad_dirty) = results
    torch.testing.assert_close(loss_dirty, loss_clean, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_dirty, grad_clean, rtol=1e-12, atol=0)
    assert (grad_dirty[~MASK] == 0).all()


@pytest.mark.parametrize("name", LOSSES)
def test_two_halves_with_the_total_token_count_as_normalizer_sum_to_the_whole(name):
    inputs = make_inputs()
    whole, _ = LOSSES[name](inputs, MASK, None)
    total = MASK.sum().item()
    halves = [
        LOSSES[name]({k: v[rows] for k, v in inputs.items()}, MASK[rows], total)[0]
        for rows in (slice(0, 1), slice(1, B))
    ]
    assert (halves[0] + halves[1]).item() == pytest.approx(whole.item(), rel=1e-12)


def test_masked_mean_defaults_to_the_local_token_count_and_reads_no_padding():
    values = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(values, mask).item() == 2.0
    assert masked_mean(values, mask, normalizer=torch.tensor(6)).item() == 1.0
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0
