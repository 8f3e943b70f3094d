"""Log-prob primitives: gathers against a plain log-softmax, half precision, top-k supports."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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


@pytest.mark.parametrize("rows", [B, 2**20 // V + 1], ids=["product", "dot-product"])
def test_kl_divergence_is_exactly_zero_for_identical_inputs_and_matches_the_definition(rows):
    g = torch.Generator().manual_seed(0)
    p, q = (ops.log_softmax(torch.randn(rows, T, V, generator=g, dtype=torch.float64) * 2) for _ in range(2))
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


# ---------------------------------------------------------------------- map_positions's LM-head gradient


class SubclassedLinear(torch.nn.Linear):
    """Not a plain ``nn.Linear``: :func:`ops.map_positions` recomputes its chunks by ``torch.utils.checkpoint``."""


def tied_heads(dtype, bias: bool) -> tuple[torch.nn.Parameter, torch.nn.Parameter | None, dict]:
    """One weight (and bias) shared by a plain ``nn.Linear`` head and a subclassed one, so the two recomputation
    paths differentiate the same leaves; the weight doubles as the token embedding (tied, as the students' are)."""
    g = torch.Generator().manual_seed(4)
    weight = torch.nn.Parameter(torch.randn(V, H, generator=g, dtype=dtype))
    bias_ = torch.nn.Parameter(torch.randn(V, generator=g, dtype=dtype)) if bias else None
    heads = {}
    for name, cls in (("linear", torch.nn.Linear), ("checkpoint", SubclassedLinear)):
        heads[name] = cls(H, V, bias=bias, dtype=dtype)
        heads[name].weight, heads[name].bias = weight, bias_
    return weight, bias_, heads


def kl_and_reads(z, teacher_z, ids, scale):
    """``[p, V], [p, V], [p, K], [p] -> [p]``: reads both ``others`` (the teacher) and ``per_position`` values."""
    kl = kl_divergence(ops.log_softmax(z), ops.log_softmax(teacher_z))
    return scale * (kl + ops.support_logprobs(z, ids).sum(-1))


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("needs_grad", ["student", "teacher", "per_position"])
def test_map_positions_gradients_match_the_dense_logits_on_every_recomputation_path(bias, needs_grad):
    """Four chunks of two positions, padding, a tied embedding/head: the loss and its gradient with respect to the
    hidden states, the head's weight and bias (and the teacher's hidden states or a per-position value, where those
    need grad) equal the dense [B, T, V] computation's, whether the chunks go through the plain-Linear backward
    (_LinearHeadChunks) or checkpointing (a subclassed head, or something in others / per_position needing grad)."""
    weight, bias_, heads = tied_heads(torch.float32, bias)
    g = torch.Generator().manual_seed(5)
    token_ids, ids = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T, 2), generator=g)
    mix, weights = torch.randn(H, H, generator=g), torch.randn(B, T, generator=g)
    teacher_hidden = torch.randn(B, T, H, generator=g).requires_grad_(needs_grad == "teacher")
    scale = torch.rand(B, T, generator=g).requires_grad_(needs_grad == "per_position")
    teacher_head = torch.nn.Linear(H, V).requires_grad_(False)
    extra = {"student": [], "teacher": [teacher_hidden], "per_position": [scale]}[needs_grad]

    def loss_and_grads(path: str) -> list[torch.Tensor]:
        hidden = torch.tanh(torch.nn.functional.embedding(token_ids, weight) @ mix)  # [B, T, H], tied weight
        teacher = ops.HiddenLogits(teacher_hidden, teacher_head)
        if path == "dense":
            per_token = kl_and_reads(heads["linear"](hidden), teacher.dense(), ids, scale)
            out = torch.where(MASK, per_token, 0.0)
        else:
            lazy = ops.HiddenLogits(hidden, heads[path])
            values = (ids, scale)
            out = ops.map_positions(kl_and_reads, MASK, lazy, teacher, per_position=values, chunk_elements=2 * V)
        loss = (out * weights).sum()
        leaves = [hidden, weight, *([bias_] if bias else []), *extra]
        return [loss, *torch.autograd.grad(loss, leaves)]

    expected = loss_and_grads("dense")
    for path in ("linear", "checkpoint"):
        for got, want in zip(loss_and_grads(path), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_map_positions_plain_linear_backward_passes_gradcheck_in_float64():
    """Finite differences through the tied weight, the bias and the hidden states (several chunks, padding)."""
    weight, bias_, heads = tied_heads(torch.float64, bias=True)
    g = torch.Generator().manual_seed(6)
    token_ids, ids = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T, 2), generator=g)
    teacher_head = torch.nn.Linear(H, V, dtype=torch.float64).requires_grad_(False)
    teacher = ops.HiddenLogits(torch.randn(B, T, H, generator=g, dtype=torch.float64), teacher_head)
    scale = torch.rand(B, T, generator=g, dtype=torch.float64)
    shift = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)

    def chunked(weight, bias_, shift):
        heads["linear"].weight, heads["linear"].bias = weight, bias_
        hidden = torch.nn.functional.embedding(token_ids, weight) + shift
        lazy = ops.HiddenLogits(hidden, heads["linear"])
        values = (ids, scale)
        return ops.map_positions(kl_and_reads, MASK, lazy, teacher, per_position=values, chunk_elements=3 * V)

    assert torch.autograd.gradcheck(chunked, (weight, bias_, shift))


class FreshTensors(TorchDispatchMode):
    """Counts the new (neither view nor in-place) tensors of ``numel`` elements that ops make."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not func._schema.is_mutable:
            tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.count += sum(t.numel() == self.numel for t in tensors)
        return out


def test_map_positions_sums_the_head_weight_gradient_of_all_chunks_in_one_buffer():
    """Four chunks make one [V, H] head-weight gradient, not one per chunk plus autograd's running sums: the memory a
    152k-vocabulary step peaks at (checkpointing each chunk held three V x H copies at once with a tied embedding)."""
    hidden, head = hidden_and_head()
    ids = torch.randint(0, V, (B, T, 1), generator=torch.Generator().manual_seed(1))
    out = ops.gather_logprobs(ops.HiddenLogits(hidden, head), ids, MASK, chunk_elements=2 * V)
    assert len(ops.position_chunks(MASK, V, 2 * V)) == 4
    with FreshTensors(V * H) as fresh:
        out.sum().backward()
    assert fresh.count == 1
    assert head.weight.grad.shape == (V, H) and hidden.grad.shape == (B, T, H)


def test_map_positions_under_autocast_differentiates_the_autocast_forward():
    """Under autocast, chunks are recomputed by checkpointing, which replays autocast: the gradient is that of the
    bfloat16 logits the forward made, as the checkpointed (subclassed) head's is."""
    weight, _, heads = tied_heads(torch.float32, bias=False)
    hidden = torch.randn(B, T, H, generator=torch.Generator().manual_seed(7), requires_grad=True)
    ids = torch.randint(0, V, (B, T, 2), generator=torch.Generator().manual_seed(1))
    grads = []
    for path in ("linear", "checkpoint"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ops.gather_logprobs(ops.HiddenLogits(hidden, heads[path]), ids, MASK, chunk_elements=2 * V)
        grads.append(torch.autograd.grad(out.sum(), [hidden, weight]))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
