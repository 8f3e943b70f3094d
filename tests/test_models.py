import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_lightning.models import build_tiny, check_local_path, check_same_tokenizer, load_causal_lm, tiny_main


def test_tiny_tokenizer_splits_digits_and_round_trips(tiny_tokenizer):
    ids = tiny_tokenizer("Calculate 123 + 45.", add_special_tokens=False)["input_ids"]
    pieces = [tiny_tokenizer.decode([i]) for i in ids]
    assert {"1", "2", "3", "4", "5"} <= set(p.strip() for p in pieces)
    assert tiny_tokenizer.decode(ids) == "Calculate 123 + 45."
    assert tiny_tokenizer.padding_side == "left"
    assert tiny_tokenizer.eos_token == "<|im_end|>" and tiny_tokenizer.pad_token == "<|endoftext|>"


def test_chat_template_assistant_mask_covers_answer_and_eos(tiny_tokenizer):
    messages = [{"role": "user", "content": "Calculate 2 + 3."}, {"role": "assistant", "content": "5"}]
    out = tiny_tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tiny_tokenizer.decode(masked) == "5<|im_end|>"


def test_tiny_model_saves_and_reloads_bit_identical(tiny_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True)
    assert (tiny_dir / "model.safetensors").exists()
    n = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < n < 2e6, n
    again = load_causal_lm(tiny_dir)
    x = torch.randint(0, model.config.vocab_size, (2, 7))
    assert torch.equal(model(x).logits, again(x).logits)
    tok = AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)
    assert len(tok) == model.config.vocab_size


def test_build_tiny_is_deterministic_and_keeps_an_existing_folder(tiny_dir, tmp_path):
    other = build_tiny(tmp_path / "again", "1m", seed=0)
    a, b = load_causal_lm(tiny_dir), load_causal_lm(other)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    stamp = (other / "config.json").stat().st_mtime_ns
    build_tiny(other, "1m", seed=0)  # exists: left alone
    assert (other / "config.json").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dirs must not be left behind"


def test_opd_tiny_console_script_builds_the_10m_model(tmp_path, capsys):
    tiny_main([str(tmp_path / "t10"), "--size", "10m"])
    assert "10m model" in capsys.readouterr().out
    n = sum(p.numel() for p in load_causal_lm(tmp_path / "t10").parameters())
    assert 5e6 < n < 15e6, n


def test_missing_model_path_names_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.model=.*no such local folder.*opd-tiny"):
        check_local_path(tmp_path / "nope", "model.model")


def test_tokenizer_mismatch_names_the_teacher(tiny_tokenizer, tmp_path):
    from opd_lightning.models import build_tiny_tokenizer

    other = build_tiny_tokenizer(["completely different text " * 50], vocab_size=300)
    with pytest.raises(ValueError, match="teachers.math: tokenizer does not match"):
        check_same_tokenizer(tiny_tokenizer, other, "teachers.math")
    check_same_tokenizer(tiny_tokenizer, tiny_tokenizer, "teachers.math")  # same tokenizer passes

