"""Shared fixtures: the offline tiny world, built once per test session (no downloads, ever)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A ~1M-parameter Qwen3 + byte-level BPE tokenizer in HF format, randomly initialised."""
    from opd_lightning.models import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "tiny-1m", "1m", seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from opd_lightning.models import load_tokenizer

    return load_tokenizer(tiny_dir)


# 1-digit sums and differences: a space small enough for a tiny model to learn in seconds on CPU
EASY_MATH = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1, operators=["+", "-"],
                 allow_parentheses=False, allow_negation=False)


def cpu_trainer(root, steps: int, callbacks=(), **overrides):
    """A quiet CPU Trainer for stage tests: no logger, no validation or checkpoints unless asked."""
    import lightning as L

    kw = dict(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=root, num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=False,
              callbacks=list(callbacks))
    return L.Trainer(**{**kw, **overrides})
