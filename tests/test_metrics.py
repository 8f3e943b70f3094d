"""Per-token diagnostics against brute force; DomainMean bookkeeping and its cross-process merge."""

from __future__ import annotations

import math

import pytest
import torch

from opd_lightning.metrics import (
    DISTILLATION_STATS,
    DomainMean,
    distillation_stats,
    token_entropy,
    topk_overlap,
)

B, T, V = 2, 3, 9


def logits(seed: int, scale: float = 2.0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(B, T, V, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def test_token_entropy_matches_brute_force():
    z = logits(0)
    entropy = token_entropy(z)
    for b in range(B):
        for t in range(T):
            p = [math.exp(v) for v in z[b, t].tolist()]
            p = [x / sum(p) for x in p]
            assert entropy[b, t].item() == pytest.approx(-sum(x * math.log(x) for x in p), rel=1e-12)


def test_token_entropy_is_log_v_for_uniform_and_zero_for_one_hot_logits():
    uniform = torch.zeros(1, 1, V)
    peaked = torch.full((1, 1, V), -1e4).index_fill(-1, torch.tensor([3]), 0.0)
    assert token_entropy(uniform).item() == pytest.approx(math.log(V), rel=1e-6)
    assert token_entropy(peaked).item() == 0.0


def test_token_entropy_upcasts_half_precision_and_needs_no_grad():
    z = logits(0, dtype=torch.bfloat16).requires_grad_()
    entropy = token_entropy(z)
    assert entropy.dtype == torch.float32 and not entropy.requires_grad
    torch.testing.assert_close(entropy, token_entropy(z.detach().float()))


def test_distillation_stats_match_brute_force_and_come_back_in_float32():
    student, teacher = logits(0), logits(1)
    stats = distillation_stats(student, teacher, overlap_k=3)
    assert tuple(stats) == DISTILLATION_STATS
    assert all(v.dtype == torch.float32 and v.shape == (B, T) for v in stats.values())
    p_s, p_t = student.softmax(-1), teacher.softmax(-1)
    brute_kl = (p_s * (p_s.log() - p_t.log())).sum(-1)
    torch.testing.assert_close(stats["reverse_kl"], brute_kl.float())
    torch.testing.assert_close(stats["teacher_entropy"], token_entropy(teacher).float())
    overlap = topk_overlap(student, teacher, 3)
    torch.testing.assert_close(stats["topk_overlap"], overlap["overlap"].float())
    torch.testing.assert_close(stats["teacher_shared_mass"], overlap["teacher_shared_mass"].float())
    same = distillation_stats(teacher, teacher, overlap_k=3)
    assert (same["reverse_kl"] == 0).all() and (same["topk_overlap"] == 1).all()


@pytest.mark.parametrize("k", [1, 3, V])
def test_topk_overlap_matches_brute_force_sets(k):
    student, teacher = logits(0), logits(1)
    out = topk_overlap(student, teacher, k)
    p_s, p_t = student.softmax(-1), teacher.softmax(-1)
    for b in range(B):
        for t in range(T):
            shared = set(student[b, t].topk(k).indices.tolist()) & set(teacher[b, t].topk(k).indices.tolist())
            ids = torch.tensor(sorted(shared), dtype=torch.long)
            assert out["overlap"][b, t].item() == pytest.approx(len(shared) / k)
            assert out["student_shared_mass"][b, t].item() == pytest.approx(
                p_s[b, t, ids].sum().item(), rel=1e-12
            )
            assert out["teacher_shared_mass"][b, t].item() == pytest.approx(
                p_t[b, t, ids].sum().item(), rel=1e-12
            )
    if k == V:  # every id is shared: all the mass on both sides
        torch.testing.assert_close(out["student_shared_mass"], torch.ones(B, T, dtype=torch.float64))


def test_topk_overlap_is_zero_for_disjoint_top_sets():
    student = torch.tensor([[[5.0, 4.0, 0.0, 0.0]]])
    teacher = torch.tensor([[[0.0, 0.0, 4.0, 5.0]]])
    out = topk_overlap(student, teacher, 2)
    assert out["overlap"].item() == 0 and out["student_shared_mass"].item() == 0
    assert topk_overlap(student, student, 2)["overlap"].item() == 1


def test_domain_mean_averages_per_domain_and_omits_unseen_domains():
    metric = DomainMean(["math", "code", "chat"])
    metric.update(torch.tensor([1.0, 0.0, 1.0]), ["math", "math", "code"])
    metric.update(torch.tensor([1.0]), ["math"])
    result = metric.compute()
    assert set(result) == {"math", "code"}
    assert result["math"].item() == pytest.approx(2 / 3) and result["code"].item() == 1.0
    assert {k: v.item() for k, v in metric.counts().items()} == {"math": 3.0, "code": 1.0, "chat": 0.0}


def test_domain_mean_weights_give_a_token_weighted_mean():
    metric = DomainMean(["teacher_a", "teacher_b"])
    # Per-sequence mean KL, weighted by each sequence's token count.
    metric.update(
        torch.tensor([0.5, 2.0, 1.0]),
        ["teacher_a", "teacher_a", "teacher_b"],
        weights=torch.tensor([3, 1, 4]),
    )
    result = metric.compute()
    assert result["teacher_a"].item() == pytest.approx((0.5 * 3 + 2.0) / 4)
    counts = metric.counts()
    assert counts["teacher_a"].item() == 4 and counts["teacher_b"].item() == 4  # tokens routed per teacher


def test_domain_mean_rejects_an_unknown_domain_naming_it_and_the_known_ones():
    metric = DomainMean(["math", "code"])
    with pytest.raises(ValueError, match=r"\['poetry'\].*\['math', 'code'\]"):
        metric.update(torch.tensor([1.0]), ["poetry"])


def test_domain_mean_states_sum_across_processes_and_reset():
    ranks = [DomainMean(["math", "code"]) for _ in range(2)]
    ranks[0].update(torch.tensor([1.0, 0.0]), ["math", "code"])
    ranks[1].update(torch.tensor([0.0, 0.0]), ["math", "math"])
    # What DDP's sum-reduction does at compute(): add the other rank's states.
    ranks[0].merge_state(ranks[1])
    result = ranks[0].compute()
    assert result["math"].item() == pytest.approx(1 / 3) and result["code"].item() == 0.0
    assert ranks[0].counts()["math"].item() == 3  # summed, not averaged, across ranks
    ranks[0].reset()
    assert all(count == 0 for count in ranks[0].counts().values())


def test_domain_mean_counts_stay_exact_after_the_module_is_cast_to_bfloat16():
    metric = DomainMean(["math"]).to(torch.bfloat16)  # what "bf16-true" precision does to the module
    for _ in range(300):
        metric.update(torch.tensor([0.1]), ["math"])
    assert metric.counts()["math"].item() == 300
    assert metric.compute()["math"].item() == pytest.approx(0.1)
