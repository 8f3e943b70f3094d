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


# ---------------------------------------------------------------------------------- logits from hidden states

H = 5
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)  # [B, T]


def hidden_and_head(seed: int = 0) -> tuple[torch.Tensor, torch.nn.Linear]:
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g, dtype=torch.float64))
    return torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True), head


def test_position_chunks_cover_the_masked_positions_once_in_order_and_in_budget():
    chunks = ops.position_chunks(MASK, vocab=V, chunk_elements=2 * V)  # two positions per chunk
    assert [len(rows) for rows, _ in chunks] == [2, 2, 2, 2]
    rows = torch.cat([r for r, _ in chunks])
    cols = torch.cat([c for _, c in chunks])
    assert torch.equal(torch.stack([rows, cols], dim=1), MASK.nonzero())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_elements", [V, 3 * V, 100 * V], ids=["1-per-chunk", "3-per-chunk", "one-chunk"])
def test_gather_logprobs_from_hidden_states_matches_the_dense_log_softmax_and_its_gradient(
    temperature, chunk_elements
):
    hidden, head = hidden_and_head()
    ids = torch.randint(0, V, (B, T, 2), generator=torch.Generator().manual_seed(1))
    weights = torch.randn(B, T, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    # brute force: every position's full log-softmax, read at ids, zero where masked
    dense = torch.log_softmax(head(hidden) / temperature, -1).gather(-1, ids)
    expected = torch.where(MASK[..., None], dense, 0.0)
    expected_grads = torch.autograd.grad((expected * weights).sum(), [hidden, head.weight])

    lazy = ops.HiddenLogits(hidden, head)
    out = ops.gather_logprobs(lazy, ids, MASK, temperature=temperature, chunk_elements=chunk_elements)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad((out * weights).sum(), [hidden, head.weight])  # through the recomputed chunks
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)
    # the dense form of the same logits gives the same values
    torch.testing.assert_close(ops.gather_logprobs(head(hidden), ids, MASK, temperature=temperature), expected)


def test_hidden_logits_make_only_one_chunk_of_logits_at_a_time():
    hidden, head = hidden_and_head()
    seen = []
    head.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    ids = torch.zeros(B, T, 1, dtype=torch.long)
    ops.gather_logprobs(ops.HiddenLogits(hidden, head), ids, MASK, chunk_elements=3 * V).sum().backward()
    assert seen and all(shape[0] <= 3 and len(shape) == 2 for shape in seen), seen
    assert sum(shape[0] for shape in seen[:3]) == MASK.sum(), "forward: each real position once, padding never"


def test_routed_logits_read_each_rows_own_model_at_any_positions():
    """Rows 0 and 2 scored by one model (as hidden states), row 1 by another (dense logits): logits_at over a chunk
    of positions that spans both gives what the dense [B, T, V] assembly of the two holds there."""
    (hidden_a, head_a), (hidden_b, head_b) = hidden_and_head(0), hidden_and_head(1)
    hidden_a, hidden_b = hidden_a[:2].detach(), hidden_b[:1].detach()
    dense_b = head_b(hidden_b).detach()
    parts = [(torch.tensor([0, 2]), ops.HiddenLogits(hidden_a, head_a)), (torch.tensor([1]), dense_b)]
    routed = ops.RoutedLogits(parts, B)
    with torch.no_grad():
        expected = torch.stack([head_a(hidden_a[0]), dense_b[0], head_a(hidden_a[1])])
    assert routed.shape == (B, T, V)
    torch.testing.assert_close(ops.dense(routed).detach(), expected)
    rows, cols = MASK.nonzero(as_tuple=True)
    torch.testing.assert_close(ops.logits_at(routed, rows, cols).detach(), expected[rows, cols])
    one_model = rows == 1
    only_b = ops.logits_at(routed, rows[one_model], cols[one_model])  # a chunk within one model's rows
    torch.testing.assert_close(only_b, expected[1, cols[one_model]])


def test_routed_logits_refuse_a_row_that_no_model_scored():
    with pytest.raises(ValueError, match=r"rows \[1\] are in no part"):
        ops.RoutedLogits([(torch.tensor([0, 2]), logits(0)[:2])], B)
