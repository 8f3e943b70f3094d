"""MultiExpertOPD: the student moves towards each domain's own teacher; routing, start-up checks, checkpoints."""

from __future__ import annotations

import shutil

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from opd_lightning import ops
from opd_lightning.data import PromptDataModule, TaskSpec
from opd_lightning.losses import masked_mean
from opd_lightning.models import load_causal_lm, load_tokenizer
from opd_lightning.ops import token_logprobs
from opd_lightning.rollout import Rollout, SamplingConfig, completion_logits, generate, lazy_completion_logits
from opd_lightning.stages import WarmupLinearDecay
from opd_lightning.stages.opd import DistillConfig, MultiExpertOPD, distillation_loss
from opd_lightning.teachers import TeacherScores
from tests.conftest import EASY_MATH, cpu_trainer
from tests.test_teachers import make_teacher

MATH = TaskSpec("basic_arithmetic", "math", config=EASY_MATH, size=300, val_size=8)
STRING = TaskSpec(
    "spell_backward", "string", config=dict(min_word_len=3, max_word_len=5), size=300, val_size=8
)


@pytest.fixture(scope="module")
def teachers(tiny_dir, tmp_path_factory):
    """Two different teachers (other seeds, sharpened) on the student's tokenizer."""
    root = tmp_path_factory.mktemp("opd-teachers")
    return make_teacher(tiny_dir, root / "a", seed=1), make_teacher(tiny_dir, root / "b", seed=2)


def make(
    tiny_dir, routes, *, tasks=(MATH, STRING), lr=1e-3, batch_size=16, steps=30, sampling=None, **distill
):
    distill.setdefault("stats_every", 1)  # the tests read every step's diagnostics
    module = MultiExpertOPD(
        model=str(tiny_dir),
        teachers={domain: str(path) for domain, path in routes.items()},
        distill=DistillConfig(**distill),
        sampling=sampling or SamplingConfig(max_new_tokens=8),
        optimizer=lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0),
    )
    data = PromptDataModule(
        tokenizer=module.tokenizer,
        tasks=list(tasks),
        batch_size=batch_size,
        val_batch_size=16,
        steps_per_epoch=steps,
        max_prompt_length=48,
    )
    return module, data


class Record(L.Callback):
    """The logged train/... scalars of every step."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})

    def mean(self, key: str, rows: slice) -> float:
        values = [row[key] for row in self.rows[rows]]
        return sum(values) / len(values)


def fit(module, data, steps, tmp_path, callbacks=(), ckpt_path=None, **kw):
    trainer = cpu_trainer(tmp_path, steps, callbacks, **kw)
    # weights_only=False: built in Python (not by the CLI), the hparams hold config dataclasses
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=False if ckpt_path else None)
    return trainer


def real_tokens(rollout, rows: list[int]) -> list[tuple[int, ...]]:
    return [tuple(rollout.input_ids[i][rollout.attention_mask[i]].tolist()) for i in rows]


def watch_teachers(module):
    """Record, for every scoring call, the rollout and the input rows each teacher's forward received."""
    calls, scoring = [], [False]  # teachers also run when they sample (off-policy batches): not recorded
    score = module.teachers.score

    def recording_score(rollout, **kwargs):
        calls.append({"rollout": rollout, "seen": {name: [] for name in module.teachers.names}})
        scoring[0] = True
        try:
            return score(rollout, **kwargs)
        finally:
            scoring[0] = False

    def hook(module, args, kwargs, output, name):
        if scoring[0]:
            # each row's real tokens: forwards cut padding and group rows by length (rollout.length_groups)
            ids, mask = kwargs["input_ids"], kwargs["attention_mask"].bool()
            calls[-1]["seen"][name].append([tuple(row[m].tolist()) for row, m in zip(ids, mask)])

    module.teachers.score = recording_score
    module.configure_model()
    for name, teacher in module.teachers.models.items():
        # the base model: scoring runs it alone (hidden states, the LM head applied a chunk at a time)
        teacher.base_model.register_forward_hook(lambda *a, name=name: hook(*a, name), with_kwargs=True)
    return calls


# ------------------------------------------------------------------------------------------------- learning


def test_reverse_kl_to_each_routed_teacher_falls(tiny_dir, teachers, tmp_path):
    L.seed_everything(0)
    module, data = make(tiny_dir, {"math": teachers[0], "string": teachers[1]}, loss="reverse_kl")
    calls = watch_teachers(module)
    rec = Record()
    fit(module, data, 30, tmp_path, [rec])
    for teacher in ("math", "string"):
        key = f"train/teacher/{teacher}/reverse_kl"
        first, last = rec.mean(key, slice(0, 5)), rec.mean(key, slice(-5, None))
        print(f"{key}: {first:.3f} -> {last:.3f}")
        assert last < 0.5 * first
    # the loss is the same exact reverse KL, as a DDP-invariant token mean
    assert rec.rows[0]["train/loss"] == pytest.approx(rec.rows[0]["train/full_reverse_kl"], rel=1e-4)
    # each teacher's logged share is the share of the batch's completion tokens routed to it
    rollout = calls[-1]["rollout"]
    is_math = torch.tensor([d == "math" for d in rollout.domains])
    math_share = rollout.completion_mask[is_math].sum() / rollout.completion_mask.sum()
    assert 0 < math_share < 1
    assert rec.rows[-1]["train/teacher/math/token_fraction"] == pytest.approx(float(math_share))


def test_sampled_reverse_kl_makes_the_students_kl_fall(tiny_dir, teachers, tmp_path):
    L.seed_everything(0)
    module, data = make(
        tiny_dir,
        {"math": teachers[0], "string": teachers[1]},
        loss="sampled_reverse_kl",
        lr=1e-3,
        batch_size=48,
        sampling=SamplingConfig(max_new_tokens=6),
    )
    rec = Record()
    fit(module, data, 40, tmp_path, [rec])
    for key in ("train/sampled_reverse_kl_k3", "train/full_reverse_kl"):
        first, last = rec.mean(key, slice(0, 5)), rec.mean(key, slice(-5, None))
        print(f"{key}: {first:.3f} -> {last:.3f}")
        assert last < 0.75 * first


# -------------------------------------------------------------------------------------------------- routing


@pytest.mark.parametrize(("stats_every", "log_every_n_steps"), [(2, 50), (None, 2)], ids=["every-2", "log-cadence"])
def test_diagnostics_run_on_their_schedule_and_routing_shares_every_step(
    tiny_dir, teachers, tmp_path, stats_every, log_every_n_steps
):
    module, data = make(tiny_dir, {"math": teachers[0], "string": teachers[1]}, batch_size=8, steps=4,
                        loss="sampled_reverse_kl", stats_every=stats_every)  # fmt: skip
    steps = []
    score = module.teachers.score
    module.teachers.score = lambda rollout, **kw: steps.append(kw["stats"]) or score(rollout, **kw)
    rec = Record()
    fit(module, data, 4, tmp_path, [rec], log_every_n_steps=log_every_n_steps)
    assert steps == [False, True, False, True], "steps 2 and 4, where a logger with log_every_n_steps=2 writes"
    assert not any(k.endswith("reverse_kl") and "sampled" not in k for k in rec.rows[0])
    for row in (rec.rows[1], rec.rows[3]):
        assert {"train/full_reverse_kl", "train/teacher/math/reverse_kl", "train/domain/string/topk_overlap"} <= set(row)
    assert all("train/teacher/math/token_fraction" in row for row in rec.rows), "routing shares every step"


def test_each_domains_rows_go_only_to_its_teacher(tiny_dir, teachers, tmp_path):
    module, data = make(tiny_dir, {"math": teachers[0], "string": teachers[1]}, micro_batch_size=3)
    calls = watch_teachers(module)
    fit(module, data, 2, tmp_path)
    assert len(calls) == 2
    for call in calls:
        rollout = call["rollout"]
        for name in ("math", "string"):
            rows = [i for i, d in enumerate(rollout.domains) if d == name]
            assert rows, "both domains should appear in a batch of 16"
            assert all(len(chunk) <= 3 for chunk in call["seen"][name]), "micro-batches of 3 rows"
            assert sorted(sum(call["seen"][name], [])) == sorted(real_tokens(rollout, rows))


def test_default_teacher_scores_the_domains_without_a_route(tiny_dir, teachers, tmp_path):
    module, data = make(tiny_dir, {"math": teachers[0], "default": teachers[1]})
    calls = watch_teachers(module)
    rec = Record()
    fit(module, data, 1, tmp_path, [rec])
    rollout = calls[0]["rollout"]
    string_rows = [i for i, d in enumerate(rollout.domains) if d == "string"]
    assert sorted(sum(calls[0]["seen"]["default"], [])) == sorted(real_tokens(rollout, string_rows))
    # each teacher's share of the completion tokens it scored, counted here from the rollout's mask
    tokens = rollout.completion_mask.sum(-1).float()  # [N]
    share = tokens[string_rows].sum().item() / tokens.sum().item()
    assert 0 < share < 1
    assert rec.rows[0]["train/teacher/default/token_fraction"] == pytest.approx(share, rel=1e-6)
    assert rec.rows[0]["train/teacher/math/token_fraction"] == pytest.approx(1 - share, rel=1e-6)
    assert "train/domain/string/reverse_kl" in rec.rows[0]


def test_a_domain_without_a_teacher_fails_at_setup_before_any_model_loads(tiny_dir, teachers, tmp_path):
    module, data = make(tiny_dir, {"math": teachers[0]})
    with pytest.raises(ValueError, match=r"\['string'\] with no teacher in model\.init_args\.teachers"):
        fit(module, data, 1, tmp_path)
    assert module.policy is None and len(module.teachers.models) == 0


def test_a_teacher_token_budget_that_cannot_hold_one_row_fails_at_setup_before_any_model_loads(
    tiny_dir, teachers, tmp_path
):
    module, data = make(tiny_dir, {"default": teachers[0]}, teacher_token_budget=55)  # 48 + 8 = 56 per row
    with pytest.raises(ValueError, match=r"distill\.teacher_token_budget=55 cannot hold one row.* = 56 tokens"):
        fit(module, data, 1, tmp_path)
    assert module.policy is None and len(module.teachers.models) == 0


def test_a_teacher_with_another_tokenizer_is_named_at_init(tiny_dir, teachers, tmp_path):
    other = tmp_path / "other-vocab"
    shutil.copytree(teachers[1], other)
    tokenizer = load_tokenizer(other)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|tool|>"]}
    )  # one more id than the student's
    tokenizer.save_pretrained(other)
    with pytest.raises(ValueError, match=r"model\.init_args\.teachers\.string: tokenizer does not match"):
        make(tiny_dir, {"math": teachers[0], "string": other})


def test_off_policy_batches_are_sampled_by_the_routed_teachers(tiny_dir, teachers, tmp_path):
    module, data = make(tiny_dir, {"math": teachers[0], "string": teachers[1]}, off_policy_ratio=1.0)
    calls = watch_teachers(module)
    rec = Record()
    fit(module, data, 1, tmp_path, [rec])
    rollout = calls[0]["rollout"]
    # the behaviour log-probs are the teachers': re-scoring the samples under the routed teacher matches
    torch.testing.assert_close(module.teachers.score(rollout).logprobs, rollout.logprobs, rtol=0, atol=1e-4)
    assert rec.rows[0]["train/off_policy"] == 1.0
    assert not any(k.startswith("train/accuracy/") for k in rec.rows[0]), (
        "teacher samples are not the student's"
    )


# ------------------------------------------------------------------------------------------ ending samples


def completion_texts(rollout, tokenizer) -> list[tuple[str, str]]:
    """Each row's completion text, and the same without its last token."""
    out = []
    for ids, n in zip(rollout.completion_ids.tolist(), rollout.completion_lengths.tolist(), strict=True):
        out.append(tuple(tokenizer.decode(ids[:k], skip_special_tokens=True) for k in (n, n - 1)))
    return out


@pytest.mark.parametrize("off_policy_ratio", [0.0, 1.0], ids=["student-samples", "teacher-samples"])
def test_a_stop_string_ends_each_sample_at_the_token_that_completes_it(tiny_dir, teachers, tmp_path, off_policy_ratio):
    stop = "e"  # frequent in the tiny vocabulary: most rows of a random rollout meet it
    module, data = make(
        tiny_dir,
        {"math": teachers[0], "string": teachers[1]},
        sampling=SamplingConfig(max_new_tokens=8, stop_strings=(stop,)),
        off_policy_ratio=off_policy_ratio,
    )
    calls = watch_teachers(module)
    fit(module, data, 1, tmp_path)
    rollout = calls[0]["rollout"]
    hits = 0
    for row, (text, before_last) in enumerate(completion_texts(rollout, module.tokenizer)):
        if stop in text:
            hits += 1
            assert stop not in before_last, f"row {row} ran past its stop string: {text!r}"
            assert not rollout.is_truncated[row]
    assert hits >= 3, "too few rows met the stop string for this test to mean anything"


def test_the_policys_generation_config_eos_ends_its_samples(tiny_dir, teachers, tmp_path):
    module, data = make(tiny_dir, {"default": teachers[0]})
    module.configure_model()
    module.trainer = cpu_trainer(tmp_path, 1)
    data.setup("fit")
    batch = data.collate_prompts(data.train_pools["basic_arithmetic"][:4])
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    free = module.sample(module.policy, batch, greedy)
    assert free.completion_lengths[0] == 8, "row 0 must not stop by itself for this test"
    stop = int(free.completion_ids[0, 3])
    # a chat checkpoint whose turns end in a token that is not the tokenizer's EOS (Qwen3-Base: <|im_end|>)
    chat = shutil.copytree(tiny_dir, tmp_path / "chat-student")
    policy = load_causal_lm(chat)
    policy.generation_config.eos_token_id = [module.tokenizer.eos_token_id, stop]
    policy.save_pretrained(chat)
    module, _ = make(chat, {"default": teachers[0]})
    module.configure_model()
    module.trainer = cpu_trainer(tmp_path, 1)
    stopped = module.sample(module.policy, batch, greedy)
    first = free.completion_ids[0].tolist().index(stop)
    length = int(stopped.completion_lengths[0])
    assert stopped.completion_ids[0, :length].tolist() == free.completion_ids[0, : first + 1].tolist()
    assert not stopped.is_truncated[0]
    assert module.eos_token_ids == [module.tokenizer.eos_token_id, stop]


# --------------------------------------------------------------------------------------------------- losses


def test_topk_reverse_kl_with_k_equal_to_the_vocabulary_is_the_full_one(tiny_dir, teachers, tiny_tokenizer):
    module, data = make(tiny_dir, {"math": teachers[0], "string": teachers[1]})
    module.configure_model()
    data.setup("fit")
    batch = data.collate_prompts(
        data.train_pools["basic_arithmetic"][:3] + data.train_pools["spell_backward"][:3]
    )
    rollout = generate(
        module.policy,
        batch.prompt_ids,
        batch.prompt_mask,
        SamplingConfig(max_new_tokens=6),
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
        domains=batch.domains,
        generator=torch.Generator().manual_seed(0),
    )
    vocab = module.policy.config.vocab_size

    def loss_and_grad(config: DistillConfig):
        student = completion_logits(module.policy, rollout.input_ids, rollout.attention_mask, 6)
        student.retain_grad()
        scores = module.teachers.score(
            rollout,
            student_logits=student.detach(),
            keep_logits=config.needs_teacher_logits,
            top_k=config.top_k,
            top_k_from=config.top_k_from,
        )
        loss, _ = distillation_loss(config, student, rollout, scores)
        loss.backward()
        return loss.detach(), student.grad

    full, full_grad = loss_and_grad(DistillConfig(loss="reverse_kl"))
    assert full > 0.05
    for source in ("teacher", "student", "union"):
        topk, topk_grad = loss_and_grad(DistillConfig(loss="reverse_kl", top_k=vocab, top_k_from=source))
        torch.testing.assert_close(topk, full, rtol=1e-4, atol=1e-6, msg=source)
        torch.testing.assert_close(topk_grad, full_grad, rtol=1e-3, atol=1e-7, msg=source)


@pytest.mark.parametrize(
    "fields",
    [
        dict(loss="sampled_reverse_kl"),
        dict(loss="reverse_kl", top_k=4, top_k_from="union"),
        dict(loss="reverse_kl"),
        dict(loss="generalized_jsd", beta=0.3),
    ],
    ids=["sampled_reverse_kl", "top_k-union", "reverse_kl", "generalized_jsd"],
)
def test_the_students_hidden_state_path_gives_the_dense_loss_and_gradient(
    tiny_dir, teachers, tiny_tokenizer, monkeypatch, fields
):
    """What training_step runs (student and teachers as hidden states, the LM heads run 3 positions at a time and
    the student's recomputed in the backward pass; for the full-vocabulary losses, two routed teachers scored in
    micro-batches of 2 rows) against the dense [N, C, V] path."""
    module, data = make(tiny_dir, {"math": teachers[0], "string": teachers[1]})
    module.configure_model()
    data.setup("fit")
    batch = data.collate_prompts(data.train_pools["basic_arithmetic"][:3] + data.train_pools["spell_backward"][:3])
    config = DistillConfig(**fields)
    temperature = 0.7  # the policy-gradient ratio reads log-probs at the sampling temperature too
    rollout = generate(module.policy, batch.prompt_ids, batch.prompt_mask,
                       SamplingConfig(max_new_tokens=6, temperature=temperature),
                       eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id,
                       domains=batch.domains, generator=torch.Generator().manual_seed(0))  # fmt: skip

    def loss_and_grads(forward):
        module.policy.zero_grad()
        student = forward(module.policy, rollout.input_ids, rollout.attention_mask, 6)
        scores = module.teachers.score(rollout, student_logits=student.detach(), top_k=config.top_k,
                                       top_k_from=config.top_k_from, keep_logits=config.needs_teacher_logits,
                                       lazy_logits=forward is lazy_completion_logits, micro_batch_size=2)  # fmt: skip
        if forward is lazy_completion_logits and config.needs_teacher_logits:  # 3 + 3 rows, 2 per forward
            assert isinstance(scores.logits, ops.RoutedLogits) and len(scores.logits.parts) == 4
        loss, metrics = distillation_loss(config, student, rollout, scores, temperature=temperature)
        loss.backward()
        return loss.detach(), metrics, [p.grad.clone() for p in module.policy.parameters()]

    dense, dense_metrics, dense_grads = loss_and_grads(completion_logits)
    monkeypatch.setattr(ops, "LOGIT_CHUNK_ELEMENTS", 3 * module.policy.config.vocab_size)
    lazy, lazy_metrics, lazy_grads = loss_and_grads(lazy_completion_logits)
    torch.testing.assert_close(lazy, dense, rtol=1e-5, atol=1e-7)
    for key, value in dense_metrics.items():
        torch.testing.assert_close(lazy_metrics[key], value, rtol=1e-5, atol=1e-6, msg=key)
    for got, want in zip(lazy_grads, dense_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_task_reward_is_added_to_every_tokens_advantage():
    torch.manual_seed(0)
    n, c, v = 4, 5, 7
    mask = torch.tensor(
        [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool
    )
    ids = torch.randint(v, (n, c))
    student = torch.randn(n, c, v, requires_grad=True)
    rollout = Rollout(
        prompt_ids=torch.zeros(n, 1, dtype=torch.long),
        prompt_mask=torch.ones(n, 1, dtype=torch.bool),
        completion_ids=ids,
        completion_mask=mask,
        logprobs=token_logprobs(student, ids).detach(),
        prompt_index=torch.arange(n),
        domains=["math"] * n,
        is_truncated=torch.zeros(n, dtype=torch.bool),
    )
    scores = TeacherScores(teacher=["math"] * n, logprobs=torch.randn(n, c).masked_fill(~mask, 0.0))
    task = torch.tensor([1.0, -1.0, 0.5, 0.0])

    def loss(weight):
        config = DistillConfig(loss="sampled_reverse_kl", reward_weight=weight)
        return distillation_loss(config, student, rollout, scores, task_advantages=task)[0]

    # on-policy the ratio is 1, so the loss is -mean_t(A_t) and the reward term shifts it by -w * mean_t(task)
    expected_shift = -0.5 * masked_mean(task[:, None].expand(n, c), mask)
    torch.testing.assert_close(loss(0.5) - loss(0.0), expected_shift)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(loss="kl"), r"distill\.loss must be one of sampled_reverse_kl, reverse_kl, forward_kl"),
        (dict(beta=1.5), r"distill\.beta must be in \[0, 1\]"),
        (dict(top_k=0), r"distill\.top_k must be >= 1"),
        (dict(loss="forward_kl", top_k=8), r"distill\.top_k applies to loss reverse_kl only"),
        (dict(reward_weight=1.0), r"distill\.reward_weight > 0 needs loss sampled_reverse_kl"),
        (
            dict(loss="sampled_reverse_kl", off_policy_ratio=0.5),
            r"distill\.off_policy_ratio > 0 needs an analytic",
        ),
        (dict(micro_batch_size=0), r"distill\.micro_batch_size"),
        (dict(teacher_token_budget=0), r"distill\.teacher_token_budget must be >= 1 \(padded tokens per"),
        (dict(stats_every=0), r"distill\.stats_every must be >= 1 or null"),
    ],
)
def test_distill_config_rejects_bad_values_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(**fields)


def test_group_normalised_task_reward_needs_several_samples_per_prompt(tiny_dir, teachers):
    with pytest.raises(ValueError, match=r"sampling\.num_samples >= 2"):
        make(tiny_dir, {"default": teachers[0]}, loss="sampled_reverse_kl", reward_weight=1.0)


# ---------------------------------------------------------------------------------------------- checkpoints


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tiny_dir, teachers, tmp_path):
    """Data position, per-row rollout seeds, GKD's coin, LR schedule and optimiser state all come back: the
    resumed run logs the same losses and ends with the same weights (fp32 CPU, within 1e-6)."""

    def run(steps, root, ckpt_path=None):
        L.seed_everything(0)
        # half the steps off-policy (teacher samples), with gradient accumulation: every stream is exercised
        module, data = make(tiny_dir, {"math": teachers[0], "string": teachers[1]}, batch_size=4, steps=10,
                            off_policy_ratio=0.5)  # fmt: skip
        # total_steps said here: by default it is max_steps, which the interrupted run sets lower
        module.lr_scheduler = lambda o: WarmupLinearDecay(o, warmup_steps=2, total_steps=6, min_ratio=0.1)
        rec = Record()
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_last=True, save_top_k=-1)
        fit(module, data, steps, root, [rec, ckpt], ckpt_path=ckpt_path, enable_checkpointing=True,
            accumulate_grad_batches=2)  # fmt: skip
        return module, rec

    straight, rec_straight = run(6, tmp_path / "straight")
    run(4, tmp_path / "interrupted")
    resumed, rec_resumed = run(6, tmp_path / "interrupted", str(tmp_path / "interrupted" / "ckpt" / "last.ckpt"))
    # micro-batches 8..11 of the straight run
    assert len(rec_resumed.rows) == 4
    assert {r["train/off_policy"] for r in rec_straight.rows} == {0.0, 1.0}, "both kinds of steps ran"
    for key in ("train/off_policy", "train/completion_length", "train/full_reverse_kl"):
        assert [r[key] for r in rec_resumed.rows] == pytest.approx([r[key] for r in rec_straight.rows[8:]],
                                                                   abs=1e-6), key  # fmt: skip
    # train/loss is the step's token mean, logged with its last micro-batch
    assert [r["train/loss"] for r in rec_resumed.rows[1::2]] == pytest.approx(
        [r["train/loss"] for r in rec_straight.rows[9::2]], abs=1e-6
    )
    for (name, p), q in zip(straight.policy.named_parameters(), resumed.policy.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_checkpoints_leave_out_teacher_weights_and_resume(tiny_dir, teachers, tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2, save_top_k=-1)
    module, data = make(tiny_dir, {"math": teachers[0], "string": teachers[1]})
    fit(module, data, 2, tmp_path, [ckpt], enable_checkpointing=True)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    assert not [k for k in state if k.startswith("teachers.")]
    assert {k.removeprefix("policy.") for k in state} == set(module.policy.state_dict())
    resumed, data = make(tiny_dir, {"math": teachers[0], "string": teachers[1]})
    trainer = fit(resumed, data, 3, tmp_path, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 3
    assert len(resumed.teachers.models) == 2, "teachers come back from their folders, not the checkpoint"


def test_compile_forwards_compiles_the_students_and_every_teachers_forwards(tiny_dir, teachers):
    """The YAML switch reaches every model whose teacher-forced forward runs in a step (the rollout tests check that
    a compiled forward equals the eager one); without it, all stay eager."""
    from opd_lightning.rollout import _COMPILED_FORWARDS

    routes = {"math": teachers[0], "string": teachers[1]}
    for on in (False, True):
        module = MultiExpertOPD(model=str(tiny_dir), teachers={d: str(p) for d, p in routes.items()},
                                compile_forwards=on)  # fmt: skip
        module.configure_model()
        models = [module.policy, *module.teachers.models.values()]
        assert len(models) == 3 and all((m in _COMPILED_FORWARDS) == on for m in models)
