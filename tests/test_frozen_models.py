"""Frozen models (the teachers of ColdStart and MultiExpertOPD, GRPO's reference) that cannot serve the
student are refused before any step, naming their YAML field: another tokenizer, special tokens or chat
template (at construction), or a context shorter than prompt + completion (at fit start)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from opd_lightning.data import PromptDataModule, TaskSpec
from opd_lightning.models import load_tokenizer
from opd_lightning.rollout import SamplingConfig
from opd_lightning.stages import GRPO, ColdStart, MultiExpertOPD
from tests.conftest import EASY_MATH, cpu_trainer

MATH = TaskSpec("basic_arithmetic", "math", config=EASY_MATH, size=50, val_size=4)
FIELDS = {
    "opd": r"model\.init_args\.teachers\.math",
    "cold_start": r"model\.init_args\.teachers\.math",
    "grpo": r"model\.init_args\.ref_model",
}


def build(stage: str, student, frozen):
    common = dict(model=str(student), optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    sampling = SamplingConfig(max_new_tokens=8, num_samples=2)
    if stage == "opd":
        return MultiExpertOPD(teachers={"math": str(frozen)}, sampling=sampling, **common)
    if stage == "cold_start":
        return ColdStart(teachers={"math": str(frozen)}, sampling=sampling, **common)
    return GRPO(ref_model=str(frozen), sampling=sampling, **common)


def copy_weights(tiny_dir, out):
    """The student's weights and config without its tokenizer files."""
    out.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny_dir / name, out / name)
    return out


def edit_tokenizer(tokenizer, kind: str) -> None:
    if kind == "vocab_size":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    elif kind == "special_tokens":  # same ids, but decoding drops one more token
        assert "user" in tokenizer.get_vocab()
        tokenizer.add_special_tokens({"additional_special_tokens": ["user"]})
    elif kind == "eos":  # a base model's tokenizer: text ends in <|endoftext|>, not in the turn's <|im_end|>
        tokenizer.eos_token = "<|endoftext|>"
    elif kind == "chat_template":
        template = tokenizer.chat_template
        tokenizer.chat_template = template.replace("'<|im_start|>' + message['role']", "'<|user|>'")
    elif kind == "no_chat_template":
        tokenizer.chat_template = None


DIFFERENCES = {
    "vocab_size": r"vocabulary size \d+ vs the student's \d+",
    "special_tokens": r"special tokens only in this model's: \['user'\], only in the student's: \[\]",
    "eos": r"eos_token '<\|endoftext\|>' \(id 0\) vs the student's '<\|im_end\|>' \(id 2\)",
    "chat_template": r"chat template \(first difference at character \d+: ",
    "no_chat_template": r"chat template: this model has none",
}


@pytest.mark.parametrize("stage", list(FIELDS))
@pytest.mark.parametrize("kind", list(DIFFERENCES))
def test_a_frozen_model_with_another_tokenizer_or_template_is_refused_at_construction(
    tiny_dir, tmp_path, stage, kind
):
    frozen = copy_weights(tiny_dir, tmp_path / kind)
    tokenizer = load_tokenizer(tiny_dir)
    edit_tokenizer(tokenizer, kind)
    tokenizer.save_pretrained(frozen)
    with pytest.raises(ValueError, match=f"{FIELDS[stage]}: tokenizer does not match") as info:
        build(stage, tiny_dir, frozen)
    message = str(info.value)
    assert re.search(DIFFERENCES[kind], message), message
    assert "same tokenizer files" in message and "ColdStart" in message  # what to do across tokenizers


@pytest.mark.parametrize("stage", list(FIELDS))
def test_a_frozen_model_with_a_shorter_context_is_refused_at_fit_start(tiny_dir, tmp_path, stage):
    short = shutil.copytree(tiny_dir, tmp_path / "short-context")
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 64  # < 48 prompt + 32 eval tokens
    (short / "config.json").write_text(json.dumps(config))
    module = build(stage, tiny_dir, short)
    data = PromptDataModule(tokenizer=module.tokenizer, tasks=[MATH], batch_size=2, max_prompt_length=48)
    trainer = cpu_trainer(tmp_path, 1)
    with pytest.raises(ValueError, match=f"{FIELDS[stage]}: the model's context is 64 positions") as info:
        trainer.fit(module, datamodule=data)
    assert "data.max_prompt_length (48)" in str(info.value) and "= 80" in str(info.value)
    assert trainer.global_step == 0
