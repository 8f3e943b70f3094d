"""Log-prob primitives: gathers against a plain log-softmax, half precision, top-k supports."""

from __future__ import annotations

import pytest
import torch

from opd_lightning import ops
from opd_lightning.ops import kl_divergence, token_logprobs, topk_support

B, T, V = 3, 4, 7


def logits(seed: int, scale: float = 2.0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(B, T, V, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_equals_log_softmax_gather(temperature):
    z, tokens = logits(0), torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    expected = torch.log_softmax(z / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(z, tokens, temperature=temperature), expected)


def test_token_logprobs_upcasts_half_precision_in_chunks(monkeypatch):
    monkeypatch.setattr(ops, "_UPCAST_CHUNK_ELEMENTS", 2 * V)  # two rows per chunk
    z, tokens = (
        logits(0, dtype=torch.bfloat16),
        torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3)),
    )
    out = token_logprobs(z, tokens)
    assert out.dtype == torch.float32
    expected = torch.log_softmax(z.float(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(out, expected)


def test_topk_support_union_counts_each_id_once():
    student, teacher = logits(0), logits(1)
    ids, valid = topk_support(student, teacher, k=3, source="union")
    assert ids.shape == valid.shape == (B, T, 6)
    assert valid[..., :3].all()  # the teacher's top-k come first, all kept
    for b in range(B):
        for t in range(T):
            expected = set(student[b, t].topk(3).indices.tolist()) | set(
                teacher[b, t].topk(3).indices.tolist()
            )
            kept = ids[b, t][valid[b, t]].tolist()
            assert sorted(kept) == sorted(expected)


def test_topk_support_on_identical_logits_marks_every_student_id_duplicate():
    student = logits(0)
    ids, valid = topk_support(student, student, k=4, source="union")
    assert valid[..., :4].all() and not valid[..., 4:].any()


def test_topk_support_needs_the_logits_of_its_source():
    with pytest.raises(ValueError, match="teacher_logits"):
        topk_support(student_logits=logits(0), k=2)


def test_kl_divergence_is_exactly_zero_for_identical_inputs_and_matches_the_definition():
    p, q = ops.log_softmax(logits(0)), ops.log_softmax(logits(1))
    assert (kl_divergence(p, p) == 0).all()
    torch.testing.assert_close(kl_divergence(p, q), (p.exp() * p).sum(-1) - (p.exp() * q).sum(-1))
