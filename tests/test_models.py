import pytest
import torch

from opd_lightning.callbacks import save_hf
from opd_lightning.models import (
    build_tiny,
    check_local_path,
    check_same_tokenizer,
    load_causal_lm,
    load_tokenizer,
    tiny_main,
)
from opd_lightning.rollout import SamplingConfig, generate


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
    model, tokenizer = load_causal_lm(tiny_dir), load_tokenizer(tiny_dir)
    n = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < n < 2e6, n
    torch.manual_seed(0)
    with torch.no_grad():  # weights that tiny_dir does not hold, so only the saved folder can give them back
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    out = save_hf(model, tokenizer, tmp_path / "saved")
    assert (out / "model.safetensors").exists() and not (out / "pytorch_model.bin").exists()
    again, tok = load_causal_lm(out), load_tokenizer(out)
    assert type(again) is type(model) and again.state_dict().keys() == model.state_dict().keys()
    for name, value in again.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    head, embedding = again.get_output_embeddings().weight, again.get_input_embeddings().weight
    assert head.data_ptr() == embedding.data_ptr(), "tied embeddings stay tied"
    x = torch.randint(0, model.config.vocab_size, (2, 7))
    assert torch.equal(model(x).logits, again(x).logits)
    prompt = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "Calculate 2 + 3."}],
                                                         add_generation_prompt=True, return_dict=False)])
    kw = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    assert torch.equal(generate(model, prompt, torch.ones_like(prompt), greedy, **kw).completion_ids,
                       generate(again, prompt, torch.ones_like(prompt), greedy, **kw).completion_ids)
    assert tok.get_vocab() == tokenizer.get_vocab() and len(tok) == again.config.vocab_size
    assert tok.chat_template == tokenizer.chat_template and tok.padding_side == "left"


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

