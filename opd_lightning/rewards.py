"""Verifiable rewards: `fn(completions, entries, **meta) -> list[float]`.

`entries` are the items the DataModule carries through every batch (`{"question", "answer", "metadata"}`).
Items from `reasoning_gym` are scored by the task's own verifier (`score_answer`, with its partial credit);
items from local files by normalised exact match.
"""

from __future__ import annotations

import functools
import re

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(completion: str) -> str:
    """The final answer in a completion: the last `<answer>...</answer>` if present (chat models prompted for
    it), else the whole completion (the tiny models answer directly)."""
    tagged = _ANSWER_TAG.findall(completion)
    return (tagged[-1] if tagged else completion).strip()


@functools.cache
def _reasoning_gym_scorer(source_dataset: str):
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(source_dataset)


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


def score(completion: str, entry: dict) -> float:
    answer = extract_answer(completion)
    source = entry.get("metadata", {}).get("source_dataset")
    if source is not None:
        return float(_reasoning_gym_scorer(source)(answer, entry))
    return float(_normalise(answer) == _normalise(entry["answer"]))


def correctness(completions: list[str], entries: list[dict], **_) -> list[float]:
    """1.0 for a correct answer, 0.0 otherwise (partial credit where the task's verifier gives it)."""
    return [score(c, e) for c, e in zip(completions, entries, strict=True)]


def exact_accuracy(completions: list[str], entries: list[dict], **_) -> list[float]:
    """1.0 only for a fully correct answer. What `val/accuracy` reports: some `reasoning_gym` verifiers give
    partial credit (basic_arithmetic scores "-280" as 0.75 against "-28"), which is a fine reward shape but
    would inflate an accuracy."""
    return [float(s >= 1.0) for s in correctness(completions, entries)]


def length_penalty(completions: list[str], entries: list[dict], *, target_chars: int = 64, **_) -> list[float]:
    """A shaping term: −(excess characters / target), 0 when the completion is within `target_chars`."""
    return [-max(0, len(c) - target_chars) / target_chars for c in completions]
