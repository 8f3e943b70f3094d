"""Verifiable rewards: `fn(completions, entries, **meta) -> list[float]`.

`entries` are the items the DataModule carries through every batch (`{"question", "answer", "metadata"}`).
Items from `reasoning_gym` are scored by the task's own verifier (`score_answer`, with its partial credit);
items from local files by normalised exact match.

Stages call :func:`verify`, which gives both readings of one verification: the partial credit (a reward,
logged under a `reward` name) and exact match (the only thing logged under an `accuracy` name).
"""

from __future__ import annotations

import functools
import re

import torch
from torch import Tensor

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


def verify(
    completions: list[str], entries: list[dict], device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """The verifier's partial credit ``[N]`` float32 and exact match ``[N]`` float32 (1.0 only for full
    credit). Some `reasoning_gym` verifiers give partial credit (basic_arithmetic scores "-280" as 0.75
    against "-28"): a fine reward shape, but it would inflate anything called accuracy."""
    scores = correctness(completions, entries)
    # full credit is decided on the verifier's own floats: float32 rounds 0.99999999 up to 1.0
    exact = [float(s >= 1.0) for s in scores]
    return (
        torch.tensor(scores, dtype=torch.float32, device=device),
        torch.tensor(exact, dtype=torch.float32, device=device),
    )


def exact_accuracy(completions: list[str], entries: list[dict], **_) -> list[float]:
    """1.0 only for a fully correct answer (:func:`verify`'s exact match, as a list)."""
    return verify(completions, entries)[1].tolist()


def length_penalty(completions: list[str], entries: list[dict], *, target_chars: int = 64, **_) -> list[float]:
    """A shaping term: −(excess characters / target), 0 when the completion is within `target_chars`."""
    return [-max(0, len(c) - target_chars) / target_chars for c in completions]
