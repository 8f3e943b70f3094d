"""TeacherPool: routes, scoring under the routed teacher (exact, micro-batch invariant), teacher sampling."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from opd_lightning import ops
from opd_lightning import rollout as rollout_module
from opd_lightning.metrics import DISTILLATION_STATS, distillation_stats
from opd_lightning.models import build_tiny_model, load_causal_lm, load_tokenizer
from opd_lightning.ops import HiddenLogits, support_logprobs, topk_support
from opd_lightning.rollout import (
    SamplingConfig,
    completion_logits,
    completion_logprobs,
    generate,
    lazy_completion_logits,
)
from opd_lightning.seeding import row_uniforms
from opd_lightning.teachers import TeacherPool, forward_chunks


def make_teacher(tiny_dir: Path, out: Path, seed: int, sharpen: float = 4.0) -> Path:
    """A tiny teacher that shares the student's tokenizer but not its weights (another seed).

    Scaling the final norm makes its next-token distributions peaked, as a trained teacher's are, so a
    randomly initialised student has something to move towards.
    """
    if (out / "config.json").exists():
        return out
    tokenizer = load_tokenizer(tiny_dir)
    model = build_tiny_model(tokenizer, "1m", seed=seed)
    with torch.no_grad():
        model.model.norm.weight.mul_(sharpen)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def teachers(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return make_teacher(tiny_dir, root / "a", seed=1), make_teacher(tiny_dir, root / "b", seed=2)


@pytest.fixture(scope="module")
def rollout(tiny_dir, tiny_tokenizer):
    """Six student completions of left-padded prompts of different lengths, tagged math / string / ood."""
    questions = ["1 + 2 =", "Spell cat backward", "3 - 1 =", "Spell dog backward", "5 + 5 =", "9 + 9 + 9 ="]
    domains = ["math", "string", "math", "string", "math", "ood"]
    encoded = [
        tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for q in questions
    ]
    batch = tiny_tokenizer.pad({"input_ids": encoded}, return_tensors="pt")  # left padding
    student = load_causal_lm(tiny_dir)
    return generate(
        student,
        batch["input_ids"],
        batch["attention_mask"].bool(),
        SamplingConfig(max_new_tokens=7),
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
        domains=domains,
        generator=torch.Generator().manual_seed(0),
    )


def loaded_pool(routes) -> TeacherPool:
    pool = TeacherPool(routes)
    pool.load(dtype="float32")
    return pool


def test_scored_logprobs_equal_a_teacher_forced_recompute_under_each_rows_teacher(teachers, rollout):
    a, b = teachers
    pool = loaded_pool({"math": a, "string": b, "default": a})
    scores = pool.score(rollout)
    assert scores.teacher == [
        "math+default",
        "string",
        "math+default",
        "string",
        "math+default",
        "math+default",
    ]
    with torch.no_grad():
        under_a = completion_logprobs(load_causal_lm(a).eval(), rollout)
        under_b = completion_logprobs(load_causal_lm(b).eval(), rollout)
    expected = torch.where(torch.tensor([d == "string" for d in rollout.domains])[:, None], under_b, under_a)
    torch.testing.assert_close(scores.logprobs, expected, rtol=0, atol=1e-5)
    assert (scores.logprobs[~rollout.completion_mask] == 0).all()
    assert not torch.allclose(under_a, under_b), "the two teachers must differ for this test to mean anything"
    assert scores.tokens == {
        "math+default": int(rollout.completion_mask[[0, 2, 4, 5]].sum()),
        "string": int(rollout.completion_mask[[1, 3]].sum()),
    }


def test_forward_chunks_hold_the_token_budget_and_group_rows_of_similar_length():
    rows = torch.tensor([0, 2, 3, 5, 6])  # rows 1 and 4 go to another teacher
    prompts = torch.tensor([10, 99, 30, 12, 99, 31, 11])
    completions = torch.tensor([5, 99, 0, 7, 99, 2, 4])  # an empty completion still costs its one position

    def split(max_rows, budget):
        return [piece.tolist() for piece in forward_chunks(rows, prompts, completions, max_rows, budget)]

    # what fits stays the row split it was without a budget, in routed order
    assert split(2, None) == split(2, 10**6) == [[0, 2], [3, 5], [6]]
    assert split(None, 10**6) == [[0, 2, 3, 5, 6]]
    # 5 x (31 + 7) = 190 > 70: rows by prompt length, a forward closed before the next row takes it past 70
    assert split(None, 70) == [[0, 6, 3], [2, 5]]  # 3 x (12 + 7) = 57, 2 x (31 + 2) = 66
    assert split(2, 70) == [[0, 6], [3], [2, 5]]  # 2 rows at most: row 3 with row 2 would be 2 x 37 = 74
    for max_rows, budget in [(None, 33), (None, 70), (2, 70), (3, 100)]:
        pieces = forward_chunks(rows, prompts, completions, max_rows, budget)
        assert sorted(torch.cat(pieces).tolist()) == rows.tolist()
        for piece in pieces:
            assert len(piece) * (prompts[piece].max() + completions[piece].clamp(min=1).max()) <= budget
            assert max_rows is None or len(piece) <= max_rows


def test_a_token_budget_below_one_row_is_refused_naming_the_field():
    rows, prompts, completions = torch.tensor([0, 1]), torch.tensor([10, 31]), torch.tensor([5, 2])
    with pytest.raises(ValueError, match=r"distill\.teacher_token_budget=32: one row alone is 33 padded tokens"):
        forward_chunks(rows, prompts, completions, None, 32)


@pytest.mark.parametrize("dense", [True, False], ids=["full-logits", "hidden-states"])
def test_a_token_budget_bounds_every_teacher_forward_and_does_not_change_scores(
    teachers, tiny_dir, rollout, monkeypatch, dense
):
    a, b = teachers
    pool = loaded_pool({"math": a, "string": b, "default": b})
    student_logits = completion_logits(
        load_causal_lm(tiny_dir), rollout.input_ids, rollout.attention_mask, rollout.completion_ids.shape[1]
    ).detach()
    kwargs = dict(student_logits=student_logits, keep_logits=dense, top_k=5, overlap_k=4)
    kwargs |= dict(top_k_from="union") if dense else {}
    whole = pool.score(rollout, **kwargs)
    forwards = []  # padded tokens of every model forward the scoring runs

    def recorded(forward):
        def run(model, input_ids, attention_mask, c):
            forwards.append(input_ids.numel())
            return forward(model, input_ids, attention_mask, c)

        return run

    for name in ("_forward_completion", "_forward_hidden"):
        monkeypatch.setattr(rollout_module, name, recorded(getattr(rollout_module, name)))
    lengths = rollout.prompt_mask.sum(-1) + rollout.completion_mask.sum(-1).clamp(min=1)
    for budget in (int(lengths.max()), 2 * int(lengths.max())):
        forwards.clear()
        budgeted = pool.score(rollout, token_budget=budget, **kwargs)
        assert max(forwards) <= budget and len(forwards) > len(pool.names), (budget, forwards)
        torch.testing.assert_close(budgeted.logprobs, whole.logprobs, rtol=0, atol=1e-5)
        if dense:
            torch.testing.assert_close(budgeted.logits, whole.logits, rtol=0, atol=1e-4)
        assert torch.equal(budgeted.support_ids, whole.support_ids)
        assert torch.equal(budgeted.support_valid, whole.support_valid)
        torch.testing.assert_close(budgeted.support_logprobs, whole.support_logprobs, rtol=0, atol=1e-5)
        assert budgeted.stats.keys() == whole.stats.keys() and whole.stats
        for key in whole.stats:
            torch.testing.assert_close(budgeted.stats[key], whole.stats[key], rtol=0, atol=1e-5, msg=key)
        assert budgeted.tokens == whole.tokens


def test_micro_batching_does_not_change_scores(teachers, tiny_dir, rollout):
    a, b = teachers
    pool = loaded_pool({"math": a, "string": b, "default": b})
    student_logits = completion_logits(
        load_causal_lm(tiny_dir), rollout.input_ids, rollout.attention_mask, rollout.completion_ids.shape[1]
    ).detach()
    kwargs = dict(student_logits=student_logits, keep_logits=True, top_k=5, top_k_from="union", overlap_k=4)
    whole = pool.score(rollout, **kwargs)
    for size in (1, 2):
        chunked = pool.score(rollout, micro_batch_size=size, **kwargs)
        torch.testing.assert_close(chunked.logprobs, whole.logprobs, rtol=0, atol=1e-5)
        torch.testing.assert_close(chunked.logits, whole.logits, rtol=0, atol=1e-4)
        assert torch.equal(chunked.support_ids, whole.support_ids)
        assert torch.equal(chunked.support_valid, whole.support_valid)
        torch.testing.assert_close(chunked.support_logprobs, whole.support_logprobs, rtol=0, atol=1e-5)
        assert chunked.stats.keys() == whole.stats.keys()
        for key in whole.stats:
            torch.testing.assert_close(chunked.stats[key], whole.stats[key], rtol=0, atol=1e-5, msg=key)


def test_topk_support_is_the_teachers_own_log_probs_at_its_top_ids(teachers, rollout):
    a, _ = teachers
    pool = loaded_pool({"default": a})
    scores = pool.score(rollout, keep_logits=True, top_k=3)
    mask = rollout.completion_mask
    assert scores.support_ids.shape == (*rollout.completion_ids.shape, 3)
    assert torch.equal(scores.support_ids[mask], scores.logits.topk(3, dim=-1).indices[mask])
    expected = support_logprobs(scores.logits, scores.support_ids)
    torch.testing.assert_close(scores.support_logprobs[mask], expected[mask])
    # padding gets no logits: finite fillers a masked loss never reads
    assert (scores.support_ids[~mask] == torch.arange(3)).all() and scores.support_valid[~mask].all()
    assert (scores.support_logprobs[~mask] == 0).all()


@pytest.mark.parametrize("source", ["teacher", "union"])
def test_scoring_from_hidden_states_in_small_chunks_equals_brute_force_on_the_full_logits(
    teachers, tiny_dir, rollout, monkeypatch, source
):
    """The O(k) path (teacher and student as hidden states, the LM head run on 5 positions at a time) gives
    the sampled-token log-probs, top-k support and diagnostics of the full [N, C, V] logits."""
    a, b = teachers
    pool = loaded_pool({"math": a, "default": b})
    student_model = load_causal_lm(tiny_dir)
    c = rollout.completion_ids.shape[1]
    with torch.no_grad():
        student_dense = completion_logits(student_model, rollout.input_ids, rollout.attention_mask, c)
        student_lazy = lazy_completion_logits(student_model, rollout.input_ids, rollout.attention_mask, c)
        teacher_dense = pool.score(rollout, keep_logits=True).logits  # [N, C, V], brute force below
    assert isinstance(student_lazy, HiddenLogits)
    vocab = teacher_dense.shape[-1]
    monkeypatch.setattr(ops, "LOGIT_CHUNK_ELEMENTS", 5 * vocab)
    heads_saw = []
    for model in pool.models.values():
        model.get_output_embeddings().register_forward_hook(lambda m, i, out: heads_saw.append(out.shape[0]))
    scores = pool.score(rollout, student_logits=student_lazy, top_k=4, top_k_from=source, overlap_k=3)
    assert scores.logits is None and heads_saw and max(heads_saw) <= 5, "never more than a chunk of logits"

    mask = rollout.completion_mask
    expected_lp = torch.log_softmax(teacher_dense, -1).gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(scores.logprobs, torch.where(mask, expected_lp, 0.0), rtol=0, atol=1e-5)
    ids, valid = topk_support(student_dense, teacher_dense, k=4, source=source)
    assert torch.equal(scores.support_ids[mask], ids[mask])
    assert torch.equal(scores.support_valid[mask], valid[mask])
    expected_support = support_logprobs(teacher_dense, ids)
    torch.testing.assert_close(scores.support_logprobs[mask], expected_support[mask], rtol=0, atol=1e-5)
    expected_stats = distillation_stats(student_dense, teacher_dense, overlap_k=3)
    for key, value in expected_stats.items():
        torch.testing.assert_close(scores.stats[key][mask], value[mask], rtol=0, atol=1e-5, msg=key)
        assert (scores.stats[key][~mask] == 0).all()


def test_stats_can_be_skipped_while_the_student_still_makes_the_support(teachers, tiny_dir, rollout):
    a, _ = teachers
    pool = loaded_pool({"default": a})
    c = rollout.completion_ids.shape[1]
    with torch.no_grad():
        student = completion_logits(load_causal_lm(tiny_dir), rollout.input_ids, rollout.attention_mask, c)
    with_stats = pool.score(rollout, student_logits=student, top_k=3, top_k_from="student")
    without = pool.score(rollout, student_logits=student, stats=False, top_k=3, top_k_from="student")
    assert without.stats == {} and set(with_stats.stats) == set(DISTILLATION_STATS)
    assert torch.equal(without.support_ids, with_stats.support_ids)


def test_stats_need_the_students_logits_and_describe_the_pair(teachers, tiny_dir, rollout):
    a, _ = teachers
    pool = loaded_pool({"default": a})
    assert pool.score(rollout).stats == {}
    teacher_logits = pool.score(rollout, keep_logits=True).logits
    same = pool.score(rollout, student_logits=teacher_logits).stats  # the teacher as its own student
    mask = rollout.completion_mask
    assert same["reverse_kl"][mask].abs().max() < 1e-5
    assert (same["topk_overlap"][mask] == 1).all()
    torch.testing.assert_close(same["student_entropy"], same["teacher_entropy"])


def test_the_students_logits_are_made_only_when_the_diagnostics_or_its_top_k_need_them(teachers, tiny_dir, rollout):
    a, _ = teachers
    pool = loaded_pool({"default": a})
    student_model = load_causal_lm(tiny_dir)
    calls = []
    student_model.get_output_embeddings().register_forward_hook(lambda *args: calls.append(1))
    c = rollout.completion_ids.shape[1]
    with torch.no_grad():
        student = lazy_completion_logits(student_model, rollout.input_ids, rollout.attention_mask, c)
    calls.clear()  # the head check's forward
    pool.score(rollout, student_logits=student, stats=False, top_k=3)  # the teacher's top-k: no student logits
    assert calls == []
    pool.score(rollout, student_logits=student, stats=False, top_k=3, top_k_from="union")
    assert calls, "a union support reads the student's top-k"


def test_domains_sharing_a_folder_load_one_teacher(teachers):
    a, b = teachers
    pool = TeacherPool({"math": a, "code": str(a) + "/", "string": b})
    assert pool.names == ["math+code", "string"]
    assert pool.route(["code", "math", "string"]) == ["math+code", "math+code", "string"]
    pool.load(dtype="float32")
    pool.load(dtype="float32")  # idempotent
    assert len(pool.models) == 2


def test_default_teacher_takes_every_unrouted_domain(teachers):
    a, b = teachers
    pool = TeacherPool({"math": a, "default": b})
    pool.check_domains(["math", "string", "ood"])
    assert pool.route(["math", "string", "ood"]) == ["math", "default", "default"]
    rows = pool.rows(["string", "math", "ood", "math"])
    assert {k: v.tolist() for k, v in rows.items()} == {"math": [1, 3], "default": [0, 2]}


def test_a_domain_without_route_or_default_fails_naming_the_domain_and_field(teachers):
    a, _ = teachers
    pool = TeacherPool({"math": a})
    with pytest.raises(ValueError, match=r"\['string'\].*model\.init_args\.teachers") as info:
        pool.check_domains(["math", "string"])
    assert "string: <teacher folder>" in str(info.value)
    with pytest.raises(KeyError, match="string"):
        pool.route(["string"])


def test_a_missing_teacher_folder_is_named_by_its_field(tmp_path, teachers):
    with pytest.raises(FileNotFoundError, match=r"model\.init_args\.teachers\.string"):
        TeacherPool({"math": teachers[0], "string": tmp_path / "nope"})


def test_teachers_stay_frozen_and_in_eval_mode(teachers):
    pool = loaded_pool({"math": teachers[0], "string": teachers[1]})
    torch.nn.Sequential(pool).train()  # what Lightning does to the whole LightningModule at fit start
    assert not any(m.training for m in pool.modules())
    assert not any(p.requires_grad for p in pool.parameters())


def test_teacher_sampling_gives_each_prompt_its_routed_teachers_completion(teachers, rollout, tiny_tokenizer):
    a, b = teachers
    pool = loaded_pool({"math": a, "string": b, "default": b})
    # the prompts of the fixture rollout: one row per prompt there
    prompt_ids, prompt_mask, domains = rollout.prompt_ids, rollout.prompt_mask, rollout.domains
    config = SamplingConfig(max_new_tokens=5, temperature=0.0, num_samples=2)
    kw = dict(eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    mixed = pool.generate(prompt_ids, prompt_mask, domains, config, **kw)
    assert len(mixed) == 12 and mixed.domains == [d for d in domains for _ in range(2)]
    assert mixed.prompt_index.tolist() == [i for i in range(6) for _ in range(2)]
    for name, teacher in (("math", a), ("string+default", b)):
        rows = pool.rows(domains)[name]
        alone = generate(load_causal_lm(teacher), prompt_ids[rows], prompt_mask[rows], config, **kw)
        out_rows = (rows[:, None] * 2 + torch.arange(2)).reshape(-1)
        c = alone.completion_ids.shape[1]
        assert torch.equal(mixed.completion_ids[out_rows, :c], alone.completion_ids)
        assert torch.equal(mixed.completion_mask[out_rows, :c], alone.completion_mask)
        assert not mixed.completion_mask[out_rows, c:].any()
        torch.testing.assert_close(mixed.logprobs[out_rows, :c], alone.logprobs)
    # the behaviour log-probs are the teachers': scoring the samples reproduces them
    torch.testing.assert_close(pool.score(mixed).logprobs, mixed.logprobs, rtol=0, atol=1e-4)


def test_routed_teacher_sampling_keeps_each_rows_uniforms(teachers, rollout, tiny_tokenizer):
    # a row's sample must not depend on which other rows its teacher samples with it (ColdStart, GKD)
    a, b = teachers
    pool = loaded_pool({"math": a, "string": b, "default": b})
    config = SamplingConfig(max_new_tokens=5, temperature=1.0, num_samples=2)
    kw = dict(eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    uniforms = row_uniforms(0, "test", 0, range(12), 5)
    mixed = pool.generate(rollout.prompt_ids, rollout.prompt_mask, rollout.domains, config, uniforms=uniforms, **kw)
    for name, teacher in (("math", a), ("string+default", b)):
        rows = pool.rows(rollout.domains)[name]
        out_rows = (rows[:, None] * 2 + torch.arange(2)).reshape(-1)
        alone = generate(load_causal_lm(teacher), rollout.prompt_ids[rows], rollout.prompt_mask[rows], config,
                         uniforms=uniforms[out_rows], **kw)  # fmt: skip
        assert torch.equal(mixed.completion_ids[out_rows, : alone.completion_ids.shape[1]], alone.completion_ids)


def test_domains_whose_safe_names_collide_keep_their_own_teachers(teachers, rollout):
    a, b = teachers
    # "a.b" and "a_b" both sanitise to "a_b": one ModuleDict key would let b replace a for both domains
    pool = loaded_pool({"a.b": a, "a_b": b})
    assert pool.names == ["a_b", "a_b_2"]
    assert pool.route(["a.b", "a_b"]) == ["a_b", "a_b_2"]
    assert len(pool.models) == 2
    renamed = dataclasses.replace(rollout, domains=["a.b", "a_b"] * 3)
    with torch.no_grad():
        under_a = completion_logprobs(load_causal_lm(a).eval(), rollout)
        under_b = completion_logprobs(load_causal_lm(b).eval(), rollout)
    expected = torch.where(torch.tensor([d == "a_b" for d in renamed.domains])[:, None], under_b, under_a)
    torch.testing.assert_close(pool.score(renamed).logprobs, expected, rtol=0, atol=1e-5)


def test_a_suffixed_name_does_not_take_the_name_of_a_later_domain(teachers, tmp_path):
    a, b = teachers
    c = make_teacher(Path(a), tmp_path / "c", seed=3)
    pool = TeacherPool({"x.y": a, "x_y": b, "x_y_2": c})
    assert pool.names == ["x_y", "x_y_2", "x_y_2_2"]
    assert pool.route(["x.y", "x_y", "x_y_2"]) == pool.names


def test_teacher_sampling_also_stops_at_the_teachers_generation_config_eos(
    teachers, rollout, tiny_tokenizer, tmp_path
):
    a, _ = teachers
    prompt_ids, prompt_mask = rollout.prompt_ids[:1], rollout.prompt_mask[:1]
    config = SamplingConfig(max_new_tokens=8, temperature=0.0)
    kw = dict(eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    free = loaded_pool({"default": a}).generate(prompt_ids, prompt_mask, ["math"], config, **kw)
    assert free.completion_lengths.item() == 8, "the greedy sample must not stop by itself for this test"
    stop = int(free.completion_ids[0, 2])
    # a chat checkpoint whose turns end in a token the tokenizer's EOS is not (Qwen3-Base: <|im_end|>)
    chat = tmp_path / "chat-teacher"
    shutil.copytree(a, chat)
    model = load_causal_lm(chat)
    model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, stop]
    model.save_pretrained(chat)
    stopped = loaded_pool({"default": chat}).generate(prompt_ids, prompt_mask, ["math"], config, **kw)
    first = free.completion_ids[0].tolist().index(stop)
    assert stopped.completion_ids[0].tolist() == free.completion_ids[0, : first + 1].tolist()
    assert not stopped.is_truncated[0]
