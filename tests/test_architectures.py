"""Any causal LM that `transformers` loads, not only Qwen3: tiny Llama (tied and untied embeddings) and GPT-2
(learned absolute positions, fused attention, a `transformer.` prefix) go through SFT, GRPO, ColdStart and
MultiExpertOPD as student and as teacher, mixed with the Qwen3 tiny model on the same tokenizer; each stage
learns, and its HF export reloads to the same class with the same weights and the same greedy answers."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from opd_lightning.callbacks import HFExport
from opd_lightning.data.datamodule import encode_prompt
from opd_lightning.models import BOS_TOKEN, build_tiny_model, load_tokenizer
from opd_lightning.rollout import SamplingConfig, generate
from tests import test_cold_start, test_grpo, test_opd, test_sft
from tests.conftest import cpu_trainer

# OPD teachers are mildly peaked (a random student's reverse KL to them starts near 1.5-2.5 nats and can halve in a
# few steps); ColdStart teachers sharply (their samples must have structure for the student's NLL to fall).
OPD_TEACHER_ENTROPY, COLD_START_TEACHER_ENTROPY = 6.0, 2.0
# Steps of SFT on the math task that make a random Llama an expert to distil from (its answer loss 6.9 -> 1.7).
OPD_TEACHER_SFT_STEPS = 30


def tiny_config(family: str, tokenizer):
    """A 2-layer, 64-wide model of another family than the kit's Qwen3, on the kit's tokenizer."""
    ids = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS_TOKEN),
    )
    if family in ("llama-tied", "llama-untied"):
        return LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, tie_word_embeddings=family == "llama-tied", **ids,
        )  # fmt: skip
    if family == "gpt2":  # GPT2Config's defaults keep GPT-2's dropout of 0.1
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **ids)
    raise ValueError(family)


def final_norm(model) -> torch.nn.Module:
    return model.transformer.ln_f if model.config.model_type == "gpt2" else model.model.norm


@torch.no_grad()
def sharpen(model, prompt_ids: torch.Tensor, max_entropy: float = 3.0) -> None:
    """Scale the final norm until the next-token entropy on `prompt_ids` is under `max_entropy` nats (a random
    model's is ~ln(1024) = 6.9), so its samples have structure a student can learn, as a trained teacher's do.
    The scale a family needs differs several-fold, hence the loop rather than one factor."""
    model.eval()
    for _ in range(8):
        logp = model(prompt_ids).logits.log_softmax(-1)
        if -(logp.exp() * logp).sum(-1).mean() < max_entropy:
            return
        final_norm(model).weight.mul_(2.0)
    raise AssertionError("could not sharpen the teacher")


def sft_expert(start: Path, out: Path, steps: int) -> Path:
    """`start` after `steps` steps of the kit's SFT stage on the math task, exported to `out` in HF format: an
    expert as the pipeline makes them, whose next-token distributions carry the task (answer digits, then EOS)."""
    L.seed_everything(1)
    module, data = test_sft.make(start, lr=1e-2, steps=steps)
    trainer = cpu_trainer(out.with_name(out.name + "-run"), steps, [HFExport(dirpath=str(out))])
    trainer.fit(module, datamodule=data)
    return out


@pytest.fixture(scope="module")
def models(tiny_dir, tmp_path_factory):
    """`models(family, teacher_entropy=None, extra_vocab=0, sft_steps=0)`: the HF folder of a tiny model of that
    family on the kit's tokenizer ("qwen3" is the kit's own). A teacher is another seed, sharpened to
    `teacher_entropy` or trained for `sft_steps` SFT steps; `extra_vocab` pads the embedding past the tokenizer,
    as Qwen checkpoints do."""
    root, tokenizer, built = tmp_path_factory.mktemp("families"), load_tokenizer(tiny_dir), {}
    prompts = torch.tensor(
        [encode_prompt(tokenizer, f"Calculate {a} + {b}.") for a, b in ((1, 2), (3, 4), (5, 7))]
    )

    def get(
        family: str, teacher_entropy: float | None = None, extra_vocab: int = 0, sft_steps: int = 0
    ) -> Path:
        key = (family, teacher_entropy, extra_vocab, sft_steps)
        if key in built:
            return built[key]
        if family == "qwen3" and teacher_entropy is None and not extra_vocab and not sft_steps:
            built[key] = tiny_dir
            return tiny_dir
        seed = 0 if teacher_entropy is None and not sft_steps else 1
        if family == "qwen3":
            model = build_tiny_model(tokenizer, "1m", seed=seed)
        else:
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(tiny_config(family, tokenizer))
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.eos_token_id = tokenizer.eos_token_id
        if extra_vocab:
            model.resize_token_embeddings(len(tokenizer) + extra_vocab)
        if teacher_entropy is not None:
            sharpen(model, prompts, teacher_entropy)
        out = root / f"{family}-{teacher_entropy}-{extra_vocab}-seed{seed}"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        if sft_steps:
            out = sft_expert(out, root / f"{family}-sft{sft_steps}", sft_steps)
        built[key] = out
        return out

    return get


def assert_export_is_the_trained_policy(module, out: Path, data) -> None:
    """The HF folder reloads to the policy's own class, ties (or not) its head as the policy does, holds the
    trained weights, and answers greedily exactly as the policy does."""

    def tied(model) -> bool:
        return (
            model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        )

    policy = module.policy
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert type(reloaded) is type(policy)
    assert tied(reloaded) == tied(policy) == policy.config.tie_word_embeddings
    trained, saved = policy.state_dict(), reloaded.state_dict()
    assert trained.keys() == saved.keys()
    for name, value in saved.items():
        assert torch.equal(value, trained[name]), name
    tokenizer = load_tokenizer(out)
    batch = data.collate_prompts(data.val_examples[:8])
    kw = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = SamplingConfig(max_new_tokens=8, temperature=0.0)
    ours = generate(policy, batch.prompt_ids, batch.prompt_mask, config, **kw)
    theirs = generate(reloaded, batch.prompt_ids, batch.prompt_mask, config, **kw)
    assert torch.equal(ours.completion_ids, theirs.completion_ids)


def snapshot(module) -> dict[str, torch.Tensor]:
    module.configure_model()
    return {k: v.detach().clone() for k, v in module.policy.state_dict().items()}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


# --------------------------------------------------------------------------------------------------- SFT


@pytest.mark.parametrize("family", ["llama-tied", "llama-untied", "gpt2"])
def test_sft_loss_falls_and_the_export_reloads_as_the_same_family(family, models, tmp_path):
    L.seed_everything(0)
    module, data = test_sft.make(models(family), lr=1e-2, steps=12)
    rec = test_sft.Record()
    cpu_trainer(tmp_path, 12, [rec, HFExport(dirpath=str(tmp_path / "hf"))]).fit(module, datamodule=data)
    first, last = mean(rec.losses[:3]), mean(rec.losses[-3:])
    print(f"{family}: loss {first:.3f} -> {last:.3f}")
    assert last < 0.7 * first
    assert_export_is_the_trained_policy(module, tmp_path / "hf", data)


# -------------------------------------------------------------------------------------------------- GRPO


@pytest.mark.parametrize(
    ("student", "reference"), [("llama-untied", "llama-untied"), ("gpt2", "gpt2"), ("qwen3", "llama-tied")]
)
def test_grpo_samples_on_policy_and_moves_away_from_its_reference(student, reference, models, tmp_path):
    L.seed_everything(0)
    module, data = test_grpo.make(
        models(student), ref_model=str(models(reference)), kl_coef=0.1, lr=1e-2, num_minibatches=2
    )
    initial = snapshot(module)
    calls = test_grpo.spy_on_policy_loss(module)
    cpu_trainer(tmp_path, 6, [HFExport(dirpath=str(tmp_path / "hf"))]).fit(module, datamodule=data)
    # the behaviour log-probs of KV-cached, left-padded sampling are what the training forward recomputes
    assert calls[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert calls[0]["ratio_max"] == pytest.approx(1.0, abs=1e-4)
    if student == reference:
        assert calls[0]["kl"] == pytest.approx(0.0, abs=1e-6), "policy == reference before the first step"
        assert calls[-1]["kl"] > 1e-5, "the policy moved away from its reference"
    else:
        assert calls[0]["kl"] > 1e-3, "another family's reference scores the samples as itself"
    assert not all(torch.equal(v, initial[k]) for k, v in module.policy.state_dict().items())
    assert_export_is_the_trained_policy(module, tmp_path / "hf", data)


# --------------------------------------------------------------------------------------------------- OPD


def opd_reverse_kl(student: Path, teacher: Path, steps: int, tmp_path: Path, export: Path | None = None):
    """The per-step reverse KL of `steps` OPD steps (the loss, on the student's own samples)."""
    L.seed_everything(0)
    module, data = test_opd.make(
        student,
        {"math": teacher},
        tasks=(test_opd.MATH,),
        batch_size=8,
        steps=steps,
        lr=1e-2,
        loss="reverse_kl",
    )
    rec = test_opd.Record()
    test_opd.fit(module, data, steps, tmp_path, [rec] + ([HFExport(dirpath=str(export))] if export else []))
    return [row["train/loss"] for row in rec.rows], module, data


# In 15 steps a student learns what its teacher prefers in every context, little of the rest. On a random student's
# samples, most of its 1.7 nats of reverse KL to a sharpened random Qwen3 is such a shared preference (the best
# context-free distribution is at 0.33). A sharpened random Llama has almost none: the tied one predicts "repeat the
# previous token" (p 0.72; best context-free 2.26 of 2.49), the untied one a peaked distribution that changes with
# the context (2.38 of 3.15). The tied one's KL fell far only when the student collapsed onto one repeated token,
# at a step that the order of its samples decided (2.5 -> 0.1 in 25 steps, or 2.5 -> 2.3 in 60 when the batch is
# shuffled). An SFT-trained Llama, what OPD distils from, has the task's structure (answer digits, then EOS) to
# teach: 4.2-7.4 -> 0.4-1.7 nats over the teacher, data, sampling seeds and batch orders tried; no fall at lr 0.
@pytest.mark.parametrize(
    ("student", "teacher", "how"),
    [
        ("llama-untied", "qwen3", dict(teacher_entropy=OPD_TEACHER_ENTROPY)),
        ("gpt2", "qwen3", dict(teacher_entropy=OPD_TEACHER_ENTROPY)),
        ("qwen3", "llama-tied", dict(sft_steps=OPD_TEACHER_SFT_STEPS)),
        ("qwen3", "llama-untied", dict(sft_steps=OPD_TEACHER_SFT_STEPS)),
    ],
    ids=[
        "llama-untied-from-qwen3",
        "gpt2-from-qwen3",
        "qwen3-from-llama-tied-sft",
        "qwen3-from-llama-untied-sft",
    ],
)
def test_opd_reverse_kl_to_another_familys_teacher_falls(student, teacher, how, models, tmp_path):
    kl, module, data = opd_reverse_kl(models(student), models(teacher, **how), 15, tmp_path, tmp_path / "hf")
    print(f"{student} <- {teacher}: reverse KL {mean(kl[:3]):.3f} -> {mean(kl[-3:]):.3f}")
    assert mean(kl[-3:]) < 0.7 * mean(kl[:3])
    assert_export_is_the_trained_policy(module, tmp_path / "hf", data)


@pytest.mark.parametrize(("student_rows", "teacher_rows"), [(0, 64), (32, 0)])
def test_opd_works_when_embeddings_are_padded_past_the_tokenizer(
    student_rows, teacher_rows, models, tmp_path
):
    """One tokenizer, embeddings of different heights: Qwen2.5-7B pads its vocabulary to 152064 rows, Qwen2.5-1.5B
    to 151936, Qwen3 to 151936 for 151669 tokens. Ids past the tokenizer are never real tokens, so the two models
    are compared on the tokenizer's ids."""
    student = models("llama-tied", extra_vocab=student_rows)
    teacher = models("qwen3", teacher_entropy=OPD_TEACHER_ENTROPY, extra_vocab=teacher_rows)
    kl, _, _ = opd_reverse_kl(student, teacher, 15, tmp_path)
    print(f"padded {student_rows} <- {teacher_rows}: reverse KL {mean(kl[:3]):.3f} -> {mean(kl[-3:]):.3f}")
    assert mean(kl[-3:]) < 0.7 * mean(kl[:3])


# --------------------------------------------------------------------------------------------- ColdStart


@pytest.mark.parametrize(("student", "teacher"), [("llama-untied", "qwen3"), ("qwen3", "gpt2")])
def test_cold_start_on_another_familys_samples_lowers_their_nll(student, teacher, models, tmp_path):
    L.seed_everything(0)
    module, data = test_cold_start.make(
        models(student),
        {"math": models(teacher, teacher_entropy=COLD_START_TEACHER_ENTROPY)},
        batch_size=8,
        lr=1e-2,
        steps_per_epoch=12,
    )
    rec = test_cold_start.Record()
    cpu_trainer(tmp_path, 12, [rec, HFExport(dirpath=str(tmp_path / "hf"))]).fit(module, datamodule=data)
    nll = [s["train/loss"] for s in rec.steps]
    print(f"{student} <- {teacher}: nll {mean(nll[:3]):.3f} -> {mean(nll[-3:]):.3f}")
    assert mean(nll[-3:]) < 0.75 * mean(nll[:3])
    assert_export_is_the_trained_policy(module, tmp_path / "hf", data)
