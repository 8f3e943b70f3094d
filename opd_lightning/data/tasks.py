"""Prompt sources: procedural `reasoning_gym` tasks and local / `datasets` files, each tagged with a domain.

An item is a plain dict `{"question": str, "answer": str, "metadata": dict}`, the shape `reasoning_gym`
uses, so one verifier (`opd_lightning.rewards.correctness`) scores items from every source.
"""

from __future__ import annotations

import difflib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A seed offset for validation items, so they are drawn from a different stream than training items.
VAL_SEED_OFFSET = 1_000_003


@dataclass
class TaskSpec:
    """One prompt source and where it sits in the mixture."""

    name: str
    """A `reasoning_gym` task name (e.g. `basic_arithmetic`), or a free label when `path` is set."""
    domain: str
    """Domain tag carried by every prompt of this task; OPD routes on it to the domain's teacher."""
    aligned: bool = True
    """True: part of the teacher-aligned pool (prompts the teachers were post-trained on). False: an
    out-of-distribution task, drawn for the `ood_ratio` share of each batch and evaluated separately."""
    config: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for `reasoning_gym.create_dataset` (difficulty knobs); unused with `path`."""
    path: str | None = None
    """A local `.jsonl`/`.json`/`.parquet`/`.csv` file, or a `datasets.load_dataset` path (local folder or
    cached dataset), instead of a procedural task."""
    split: str = "train"
    """Split to read with `path`."""
    question_field: str = "question"
    """Column holding the user prompt (with `path`)."""
    answer_field: str = "answer"
    """Column holding the reference answer (with `path`); scored by normalised exact match."""
    weight: float = 1.0
    """Sampling weight of this task within its domain (or within the OOD pool)."""
    size: int = 2000
    """Training items generated (procedural tasks) or the cap on items read (files)."""
    val_size: int = 64
    """Held-out validation items; never in the training pool (duplicates are removed from training)."""

    def __post_init__(self) -> None:
        if not self.domain:
            raise ValueError(f"task {self.name!r}: `domain` must be a non-empty tag")
        if self.weight < 0:
            raise ValueError(f"task {self.name!r}: `weight` must be >= 0, got {self.weight}")
        if self.size < 1 or self.val_size < 0:
            raise ValueError(f"task {self.name!r}: need size >= 1 and val_size >= 0")


# The tasks the tiny world is built around: short answers a ~1M model can learn (PLATFORM.md). One aligned
# task per domain (what the experts are post-trained on) and one OOD task per domain. Reversing a list of
# words is token-level copying, learnable by a tiny model; spelling backward needs the letters inside BPE
# tokens, which makes it a good "hard, out-of-distribution" probe.
DEFAULT_TASKS: list[TaskSpec] = [
    TaskSpec("basic_arithmetic", "math",
             config=dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2, operators=["+", "-"],
                         allow_parentheses=False, allow_negation=False)),
    TaskSpec("word_sequence_reversal", "string", config=dict(min_words=2, max_words=3)),
    TaskSpec("chain_sum", "math", aligned=False, config=dict(min_terms=3, max_terms=3, min_digits=1, max_digits=1)),
    TaskSpec("spell_backward", "string", aligned=False, config=dict(min_word_len=3, max_word_len=5)),
]


class Task:
    """A `TaskSpec` made concrete: knows how to draw its training and validation items."""

    def __init__(self, spec: TaskSpec, field_name: str = "task"):
        self.spec = spec
        self.field_name = field_name

    def split(self, seed: int) -> tuple[list[dict], list[dict]]:
        """Deterministic (train, val) items for this seed; validation questions never appear in train."""
        if self.spec.path is None:
            val = self.generate(self.spec.val_size, seed + VAL_SEED_OFFSET) if self.spec.val_size else []
            train = self.generate(self.spec.size, seed)
        else:
            rows = self._read_rows()
            random.Random(seed).shuffle(rows)
            val, train = rows[: self.spec.val_size], rows[self.spec.val_size :][: self.spec.size]
        held_out = {item["question"] for item in val}
        train = [item for item in train if item["question"] not in held_out]
        if not train:
            raise ValueError(
                f"{self.field_name} ({self.spec.name!r}): no training items left (size={self.spec.size}, "
                f"val_size={self.spec.val_size}); raise size or point path at a bigger dataset"
            )
        return train, val

    def generate(self, n: int, seed: int) -> list[dict]:
        import reasoning_gym

        try:
            ds = reasoning_gym.create_dataset(self.spec.name, seed=seed, size=n, **self.spec.config)
        except Exception as err:  # reasoning_gym raises assorted types for bad configs
            raise ValueError(f"{self.field_name}.config for {self.spec.name!r} is invalid: {err}") from err
        return [{"question": e["question"], "answer": str(e["answer"]), "metadata": e["metadata"]} for e in ds]

    def _read_rows(self) -> list[dict]:
        import datasets

        spec, path = self.spec, self.spec.path
        suffix = Path(path).suffix.lower()
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(suffix)
        if builder is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{self.field_name}.path={path!r}: no such file")
        if builder is not None and Path(path).stat().st_size == 0:
            raise ValueError(f"{self.field_name}.path={path!r} is empty: give it at least one row")
        try:
            ds = (
                datasets.load_dataset(builder, data_files=path, split="train")
                if builder
                else datasets.load_dataset(path, split=spec.split)
            )
        except Exception as err:  # datasets raises many types (and some with empty messages)
            raise ValueError(f"{self.field_name}.path={path!r} could not be loaded: {type(err).__name__}: {err}") from err
        for col in (spec.question_field, spec.answer_field):
            if col not in ds.column_names:
                raise ValueError(
                    f"{self.field_name}: column {col!r} not in {path!r} (columns: {ds.column_names}); "
                    "set question_field / answer_field"
                )
        rows = [
            {"question": str(r[spec.question_field]), "answer": str(r[spec.answer_field]),
             "metadata": {"source": spec.name}}
            for r in ds
        ]
        if not rows:
            raise ValueError(f"{self.field_name}.path={path!r} is empty")
        return rows


def build_task(spec: TaskSpec, field_name: str = "task") -> Task:
    """Validate the task name up front so a typo fails before any data is generated or model loaded."""
    if spec.path is None:
        from reasoning_gym.factory import DATASETS

        if spec.name not in DATASETS:
            close = difflib.get_close_matches(spec.name, DATASETS, n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise ValueError(
                f"{field_name}.name={spec.name!r} is not a reasoning_gym task.{hint} Set `path` to use a local "
                "dataset instead."
            )
    return Task(spec, field_name)
