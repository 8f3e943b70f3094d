"""Loading policies, teachers and tokenizers from local Hugging Face folders, and the offline tiny world.

Every model in the kit goes through `load_tokenizer` / `load_causal_lm`, i.e. the `transformers` Auto
classes on a local path, safetensors only and no remote code unless asked. The same YAML therefore runs a
Qwen3 checkpoint on GPUs and the tiny model built here on a laptop CPU.

The tiny world (`build_tiny`, console script `opd-tiny`) needs no network: a byte-level BPE tokenizer is
trained in about a second on text from the kit's own procedural tasks, and a small Qwen3-architecture
causal LM is initialised from a config. Digits are split one per token (as Qwen's and Llama's tokenizers
do) because glued digits make arithmetic much harder to learn for a tiny model (PLATFORM.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

# Qwen-style chat markup. The {% generation %} markers make `return_assistant_tokens_mask=True` work, which
# is where the SFT loss mask comes from; `<|im_end|>` closes every turn and is the EOS the model must learn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# name -> Qwen3Config overrides. Parameter counts are with the ~1k-token tiny vocabulary and tied embeddings.
TINY_SIZES: dict[str, dict] = {
    "1m": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32),
    "10m": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=10, num_attention_heads=8,
                num_key_value_heads=4, head_dim=32),
}


def check_local_path(path: str | os.PathLike, field: str) -> Path:
    """Fail early, naming the config field, when a model/tokenizer folder is missing (no hub fallback)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        message = f"{field}={str(path)!r}: no such local folder. "
        producer = _stage_exporting_to(p)
        if producer is not None:
            # an expert or a previous stage's output: an untrained tiny model there would be silently wrong
            message += (f"It is the HF export of a pipeline stage: run `{producer}` first "
                        f"(`bash tools/pipeline.sh` runs every stage in order), or point {field} at a trained "
                        "Hugging Face folder.")
        else:
            message += (f"Models load from local paths only (no hub downloads): point {field} at a Hugging Face "
                        "model folder (config.json, *.safetensors, tokenizer files).")
            if field.rsplit(".", 1)[-1] == "model":
                message += (f" To train from scratch instead, set tiny_size: 1m (or run `opd-tiny {path} --size 1m`) "
                            "to build an untrained tiny model there.")
        raise FileNotFoundError(message)
    return p


def _stage_exporting_to(folder: Path) -> str | None:
    """The command of the config (in ./configs or the kit's own configs/) whose `export.dirpath` is `folder`, if
    any: the YAML's first line when it states its command, as the kit's stage YAMLs do."""
    import yaml

    target = folder.absolute()
    roots = dict.fromkeys([Path("configs").absolute(), Path(__file__).resolve().parents[1] / "configs"])
    for root in roots:
        for config in sorted(root.rglob("*.yaml")):
            try:
                export = (yaml.safe_load(config.read_text()) or {}).get("export")
            except (yaml.YAMLError, AttributeError):  # not a stage config
                continue
            dirpath = export.get("dirpath") if isinstance(export, dict) else None
            if dirpath and Path(dirpath).expanduser().absolute() == target:
                name = str(config.relative_to(Path.cwd()) if config.is_relative_to(Path.cwd()) else config)
                command = config.read_text().splitlines()[0].removeprefix("#").strip()  # a stage YAML's 1st line
                return command if command.startswith("opd ") else f"opd fit --config {name}"
    return None


def load_tokenizer(path: str | os.PathLike, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
    # Generation batches prompts of different lengths: left padding keeps every prompt's last token at
    # the right edge so decoding starts at the same step for all rows.
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    """Load a causal LM from a local folder: safetensors only, never from the hub."""
    kwargs = dict(
        dtype=dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype),
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        local_files_only=True,
    )
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    # Checkpoints often pad their embedding rows past the tokenizer (Qwen2.5-7B: 152,064 rows for 151,665
    # tokens; the 1.5B: 151,936 on the same tokenizer). Those rows are never a real token: drop them, so the
    # logits of every model of one tokenizer have the same width and a sample never draws a padding id.
    vocab = len(load_tokenizer(path, trust_remote_code=trust_remote_code))
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < vocab:
        raise ValueError(f"{path}: the model has {rows} embedding rows for a tokenizer of {vocab} tokens; "
                         "the folder's tokenizer does not belong to this model")
    if rows > vocab:
        model.resize_token_embeddings(vocab)
    return model


def load_frozen(path: str | os.PathLike, *, dtype: torch.dtype | str, field: str,
                trust_remote_code: bool = False) -> torch.nn.Module:
    """A teacher or reference model: eval mode (no dropout), no gradients, in the policy's dtype.

    The model keeps the YAML ``field`` it came from as ``yaml_field``, so checks that can only run once it is
    loaded (its context length, at fit start) name the field to fix."""
    model = load_causal_lm(check_local_path(path, field), dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    model.requires_grad_(False)
    model.yaml_field = field
    return model


def stop_token_ids(model: torch.nn.Module, eos_token_id: int | list[int] | None) -> list[int]:
    """The ids that end a sample of ``model``: ``eos_token_id`` (the tokenizer's EOS, or ids gathered already)
    and every ``generation_config.eos_token_id`` of the model, in that order, without repeats.

    They differ in real checkpoints: Qwen3-Base's tokenizer ends text with ``<|endoftext|>`` while its chat
    turns end with ``<|im_end|>``, which only its generation config lists; sampling that stops at the
    tokenizer's EOS alone runs every chat answer to ``max_new_tokens``.
    """
    config = model.generation_config  # None for models that cannot generate
    ids = [*_as_list(eos_token_id), *_as_list(None if config is None else config.eos_token_id)]
    return list(dict.fromkeys(ids))


def _as_list(ids: int | list[int] | None) -> list[int]:
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def _first_difference(mine: str, theirs: str, width: int = 30) -> str:
    at = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
    theirs, mine = theirs[at : at + width], mine[at : at + width]
    return f"first difference at character {at}: {theirs!r} vs the student's {mine!r}"


def tokenizer_differences(student: PreTrainedTokenizerBase, other: PreTrainedTokenizerBase) -> list[str]:
    """What `other` reads or writes differently from the student's tokenizer, one phrase per difference
    (vocabulary and ids, EOS / BOS / pad / unk, special tokens, chat template); empty when they agree."""
    problems = []
    if len(student) != len(other):
        problems.append(f"vocabulary size {len(other)} vs the student's {len(student)}")
    else:
        mine, theirs = student.get_vocab(), other.get_vocab()
        moved = sorted(t for t in mine.keys() | theirs.keys() if mine.get(t) != theirs.get(t))
        if moved:
            problems.append(f"{len(moved)} token(s) with other ids, e.g. {moved[:3]}")
    for role in ("eos", "bos", "pad", "unk"):
        mine, theirs = getattr(student, f"{role}_token"), getattr(other, f"{role}_token")
        if mine != theirs:
            other_id, student_id = getattr(other, f"{role}_token_id"), getattr(student, f"{role}_token_id")
            problems.append(f"{role}_token {theirs!r} (id {other_id}) vs the student's {mine!r} (id {student_id})")

    def special(tok) -> set[str]:  # what decoding with skip_special_tokens drops
        return {t.content for t in tok.added_tokens_decoder.values() if t.special}

    only_other, only_student = special(other) - special(student), special(student) - special(other)
    if only_other or only_student:
        problems.append(
            f"special tokens only in this model's: {sorted(only_other)}, "
            f"only in the student's: {sorted(only_student)}"
        )
    mine, theirs = student.chat_template, other.chat_template
    if mine != theirs:
        if mine is None or theirs is None:
            problems.append(f"chat template: {'this model' if theirs is None else 'the student'} has none")
        else:
            problems.append(f"chat template ({_first_difference(str(mine), str(theirs))})")
    return problems


def check_same_tokenizer(
    reference: PreTrainedTokenizerBase, other: PreTrainedTokenizerBase, name: str
) -> None:
    """A teacher or reference must read and write text exactly as the student: same vocabulary and ids, same
    special tokens (EOS, BOS, pad, unk, and which tokens decoding drops), same chat template. Token-level
    distillation compares distributions id by id, on prompts rendered once with the student's template."""
    problems = tokenizer_differences(reference, other)
    if problems:
        raise ValueError(
            f"{name}: tokenizer does not match the student's: {'; '.join(problems)}.\n"
            "Token-level distillation compares next-token distributions id by id, on prompts rendered with "
            "the student's chat template, so both models need one tokenizer and one template. Use a model of "
            "the student's tokenizer family (the same tokenizer files); across tokenizers, distil through "
            "text instead: SFT the student on the teacher's samples (ColdStart) or sequence-level KD."
        )


# ----------------------------------------------------------------------------------------------- tiny world


def tiny_corpus(num_per_task: int = 500, seed: int = 0) -> list[str]:
    """Text from every default task (questions and answers) to train the tiny tokenizer on."""
    from opd_lightning.data.tasks import DEFAULT_TASKS, build_task

    texts = []
    for spec in DEFAULT_TASKS:
        task = build_task(spec)
        for item in task.generate(num_per_task, seed=seed):
            texts.append(item["question"])
            texts.append(item["answer"])
    # the chat markup's role names appear in every prompt: let them become single tokens
    texts += ["user\nassistant\nsystem\n"] * num_per_task
    return texts


def build_tiny_tokenizer(texts: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerBase:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=None,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


def build_tiny_model(tokenizer: PreTrainedTokenizerBase, size: str = "1m", seed: int = 0) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if size not in TINY_SIZES:
        raise ValueError(f"tiny size {size!r} is unknown; choose one of {sorted(TINY_SIZES)}")
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS_TOKEN),
        **TINY_SIZES[size],
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_tiny(out_dir: str | os.PathLike, size: str = "1m", *, seed: int = 0, overwrite: bool = False) -> Path:
    """Build (tokenizer + randomly initialised model) into `out_dir`, atomically.

    The folder appears all at once (written to a sibling temp dir, then renamed), so several processes
    (DDP ranks, parallel tests) may call this on the same path: the first rename wins and the others keep
    what is there. The build is seeded, so every caller would have written the same files anyway.
    """
    out = Path(out_dir).expanduser()
    if out.is_dir() and not overwrite:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # the tokenizer does not depend on `seed`: tiny models of any seed share it, so they can teach each other
    tokenizer = build_tiny_tokenizer(tiny_corpus())
    model = build_tiny_model(tokenizer, size, seed=seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if overwrite and out.is_dir():
            shutil.rmtree(out)
        try:
            os.rename(tmp, out)
        except OSError:
            if not out.is_dir():  # a real failure, not a lost race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model_path(path: str, tiny_size: str | None, field: str) -> Path:
    """The folder to load, building the tiny model there first when `tiny_size` asks for it."""
    if tiny_size is not None and not Path(path).expanduser().is_dir():
        build_tiny(path, tiny_size)
    return check_local_path(path, field)


def tiny_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the offline tiny tokenizer + Qwen3 model in HF format.")
    parser.add_argument("out_dir")
    parser.add_argument("--size", default="1m", choices=sorted(TINY_SIZES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    out = build_tiny(args.out_dir, args.size, seed=args.seed, overwrite=args.overwrite)
    model = load_causal_lm(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny {args.size} model: {n / 1e6:.2f}M parameters, vocab {model.config.vocab_size}, saved to {out}")


if __name__ == "__main__":
    tiny_main()
