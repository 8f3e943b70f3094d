"""Prompt sources: procedural `reasoning_gym` tasks and local / `datasets` files, each tagged with a domain.

An item is a plain dict `{"question": str, "answer": str, "metadata": dict}`, the shape `reasoning_gym`
uses, so one verifier (`opd_lightning.rewards.correctness`) scores items from every source.
"""

from __future__ import annotations

import difflib
import json
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
    domain: str = ""
    """Domain tag carried by every prompt of this task; OPD routes on it to the domain's teacher. With
    `domain_field` it is the tag of rows whose own is empty (leave it unset to require one on every row)."""
    aligned: bool = True
    """True: part of the teacher-aligned pool (prompts the teachers were post-trained on). False: an
    out-of-distribution task, drawn for the `ood_ratio` share of each batch and evaluated separately."""
    config: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for `reasoning_gym.create_dataset` (difficulty knobs); unused with `path`."""
    path: str | None = None
    """A local `.jsonl`/`.json`/`.parquet`/`.csv` file, a folder written by `datasets`' `save_to_disk`, or a
    `datasets.load_dataset` path (local folder or cached dataset), instead of a procedural task."""
    split: str = "train"
    """Split to read with `path` (for a saved `DatasetDict` or a `load_dataset` path)."""
    question_field: str = "question"
    """Column holding the user prompt (with `path`)."""
    answer_field: str = "answer"
    """Column holding the reference answer (with `path`); scored by normalised exact match."""
    domain_field: str | None = None
    """Column holding each row's domain tag (with `path`), so one file carries several domains: every row
    is routed, weighted and evaluated under its own tag."""
    weight: float = 1.0
    """Sampling weight of this task within each of its domains (or within the OOD pool)."""
    size: int = 2000
    """Training items generated (procedural tasks) or the cap on items read (files)."""
    val_size: int = 64
    """Held-out validation items; never in the training pool (duplicates are removed from training)."""

    def __post_init__(self) -> None:
        if not self.domain and self.domain_field is None:
            raise ValueError(
                f"data.tasks ({self.name!r}): set `domain` (a non-empty tag), or `domain_field` to read each "
                "row's tag from a column of `path`"
            )
        if self.domain_field is not None and self.path is None:
            raise ValueError(f"data.tasks ({self.name!r}): `domain_field` reads a column of `path`; set `path` too")
        if self.weight < 0:
            raise ValueError(f"data.tasks ({self.name!r}): `weight` must be >= 0, got {self.weight}")
        if self.size < 1 or self.val_size < 0:
            raise ValueError(f"data.tasks ({self.name!r}): need size >= 1 and val_size >= 0")


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


def _distinct(items: list[dict], n: int) -> list[dict]:
    """The first `n` items whose questions differ (fewer if there are not that many)."""
    seen: set[str] = set()
    out = []
    for item in items:
        if len(out) == n:
            break
        if item["question"] not in seen:
            seen.add(item["question"])
            out.append(item)
    return out


class Task:
    """A `TaskSpec` made concrete: knows how to draw its training and validation items."""

    def __init__(self, spec: TaskSpec, field_name: str = "task"):
        self.spec = spec
        self.field_name = field_name
        self._rows: list[dict] | None = None

    def domains(self) -> set[str]:
        """Every domain tag this task's items carry. Reads (and checks) a `path` task's rows."""
        if self.spec.path is None:
            return {self.spec.domain}
        return {self.domain_of(item) for item in self.rows()}

    def domain_of(self, item: dict) -> str:
        return item["metadata"]["domain"] if self.spec.domain_field is not None else self.spec.domain

    def split(self, seed: int) -> tuple[list[dict], list[dict]]:
        """Deterministic (train, val) items for this seed; validation questions never appear in train."""
        # Held-out questions are distinct: a small procedural space (1-2 digit sums) repeats questions, and a
        # repeated one would count twice in an accuracy that claims val_size prompts.
        if self.spec.path is None:
            n = self.spec.val_size
            val = _distinct(self.generate(2 * n + 16, seed + VAL_SEED_OFFSET), n) if n else []
            train = self.generate(self.spec.size, seed)
        else:
            rows = list(self.rows())
            random.Random(seed).shuffle(rows)
            val = _distinct(rows, self.spec.val_size)
            train = rows[: self.spec.size + len(val)]
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

    def rows(self) -> list[dict]:
        """The items of a `path` task, read once and checked row by row."""
        if self._rows is None:
            self._rows = [self._item(where, record) for where, record in self._read_records()]
            if not self._rows:
                raise ValueError(f"{self.field_name}.path={self.spec.path!r} is empty: give it at least one row")
        return self._rows

    def _item(self, where: str, record: dict) -> dict:
        spec, path = self.spec, self.spec.path
        for key, col in (("question_field", spec.question_field), ("answer_field", spec.answer_field),
                         ("domain_field", spec.domain_field)):
            if col is not None and col not in record:
                raise ValueError(
                    f"{self.field_name}: {where} of {path!r} has no column {col!r} (it has {sorted(record)}); "
                    f"set {self.field_name}.{key} to the column that holds it"
                )
        columns = [c for c in (spec.question_field, spec.answer_field, spec.domain_field) if c is not None]
        text = {col: "" if record[col] is None else str(record[col]) for col in columns}
        for col in (spec.question_field, spec.answer_field):
            if not text[col].strip():
                raise ValueError(f"{self.field_name}: {where} of {path!r} has an empty {col!r}; fill or remove that row")
        metadata: dict[str, Any] = {"source": spec.name}
        if spec.domain_field is not None:
            metadata["domain"] = text[spec.domain_field].strip() or spec.domain
            if not metadata["domain"]:
                raise ValueError(
                    f"{self.field_name}: {where} of {path!r} has an empty {spec.domain_field!r}; fill it, or set "
                    f"{self.field_name}.domain as the tag of rows without one"
                )
        return {"question": text[spec.question_field], "answer": text[spec.answer_field], "metadata": metadata}

    def _read_records(self) -> list[tuple[str, dict]]:
        """`(where, row)` pairs, `where` locating the row in the source for error messages."""
        path = Path(self.spec.path).expanduser()
        suffix = path.suffix.lower()
        if suffix in _FILE_BUILDERS:
            if not path.is_file():
                raise FileNotFoundError(f"{self.field_name}.path={self.spec.path!r}: no such file")
            if path.stat().st_size == 0:
                raise ValueError(f"{self.field_name}.path={self.spec.path!r} is empty: give it at least one row")
            if suffix in (".jsonl", ".json"):
                return self._read_json(path)
        return [(f"row {i + 1}", row) for i, row in enumerate(self._load_datasets(path, suffix))]

    def _read_json(self, path: Path) -> list[tuple[str, dict]]:
        # read here rather than by `datasets`, whose error for one bad line is a chained
        # DatasetGenerationError that never says which line
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{self.field_name}.path={self.spec.path!r} is not valid JSON: {err.msg} at line {err.lineno}, "
                    f"column {err.colno}. Fix the file: a list of objects, or one object per line (JSON Lines)."
                ) from None
            records = [(f"item {i + 1}", row) for i, row in enumerate(rows)]
        else:
            records = []
            for n, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    records.append((f"line {n}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{self.field_name}.path={self.spec.path!r}: line {n} is not valid JSON ({err.msg}, column "
                        f"{err.colno}): {line[:60]!r}. Fix that line: each line is one JSON object, e.g. "
                        '{"question": "...", "answer": "..."}.'
                    ) from None
        for where, row in records:
            if not isinstance(row, dict):
                raise ValueError(
                    f"{self.field_name}.path={self.spec.path!r}: {where} is a {type(row).__name__}, not a JSON "
                    'object; write each row as {"question": "...", "answer": "..."}'
                )
        return records

    def _load_datasets(self, path: Path, suffix: str):
        import datasets

        spec = self.spec
        try:
            if suffix in _FILE_BUILDERS:
                ds = datasets.load_dataset(_FILE_BUILDERS[suffix], data_files=str(path), split="train")
            elif path.is_dir() and any((path / marker).is_file() for marker in _SAVED_MARKERS):
                ds = datasets.load_from_disk(str(path))  # a `save_to_disk` folder, which load_dataset cannot read
            else:
                ds = datasets.load_dataset(spec.path, split=spec.split)
        except Exception as err:  # datasets raises many types (and some with empty messages)
            raise ValueError(
                f"{self.field_name}.path={spec.path!r} could not be loaded: {type(err).__name__}: {err}"
            ) from err
        if isinstance(ds, datasets.DatasetDict):
            if spec.split not in ds:
                raise ValueError(
                    f"{self.field_name}.split={spec.split!r} is not in {spec.path!r} (splits: {sorted(ds)}); "
                    f"set {self.field_name}.split to one of them"
                )
            ds = ds[spec.split]
        return ds


# `datasets` builders for single files; `.jsonl`/`.json` are read directly (see `Task._read_json`)
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# files `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write
_SAVED_MARKERS = ("state.json", "dataset_dict.json")


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
