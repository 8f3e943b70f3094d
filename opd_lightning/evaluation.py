"""Greedy exact-match evaluation: the one path shared by in-training validation and the final table.

`PolicyModule.validation_step` scores each validation batch with :func:`greedy_exact`; the pipeline's
final table (:func:`evaluate_policy`) runs the same function over the same held-out prompts, so a figure in
TensorBoard and a figure in `results.json` are the same measurement.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from opd_lightning import rewards
from opd_lightning.data.batch import PromptBatch
from opd_lightning.rollout import Rollout, SamplingConfig

__all__ = ["evaluate_policy", "greedy_exact", "wilson_interval"]


@torch.no_grad()
def greedy_exact(
    sample: Callable[[PromptBatch, SamplingConfig], Rollout], tokenizer, batch: PromptBatch, max_new_tokens: int
) -> tuple[list[str], Tensor]:
    """Greedy completions of the batch's prompts and their exact-match scores ``[B]`` (1.0 only for a
    fully correct answer; some verifiers give partial credit, which is a reward, not an accuracy).

    ``sample(batch, config)`` rolls the policy out (the stage passes its rank-lockstep sampler)."""
    rollout = sample(batch, SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0))
    completions = rollout.decode(tokenizer)
    _, exact = rewards.verify(completions, batch.entries)
    return completions, exact


def evaluate_policy(
    sample: Callable[[PromptBatch, SamplingConfig], Rollout],
    tokenizer,
    batches: Iterable[PromptBatch],
    max_new_tokens: int,
) -> dict[str, list[float]]:
    """Exact-match scores of every held-out prompt, by task: ``{task: [0/1, ...]}``."""
    scores: dict[str, list[float]] = {}
    for batch in batches:
        _, s = greedy_exact(sample, tokenizer, batch, max_new_tokens)
        for task, value in zip(batch.tasks, s.tolist(), strict=True):
            scores.setdefault(task, []).append(value)
    return scores


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (well-behaved at 0 and 1, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
