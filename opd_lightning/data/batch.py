"""Typed batch containers. Lightning moves their tensors to the device (dataclasses are traversed)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class PromptBatch:
    """Prompts to roll out from (GRPO, ColdStart, OPD, and validation by generation)."""

    prompt_ids: Tensor  # [B, P] left-padded
    prompt_mask: Tensor  # [B, P] bool
    domains: list[str]  # [B] domain tag: routes OPD samples to their teacher
    aligned: Tensor  # [B] bool, False for out-of-distribution prompts
    tasks: list[str]  # [B] task name (metrics, samples)
    entries: list[dict]  # [B] the verifier's payload: {"question", "answer", "metadata"}

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]


@dataclass
class SFTBatch:
    """Prompt + reference answer, teacher-forced, with the loss on the answer tokens only. Laid out as a
    :class:`~opd_lightning.rollout.Rollout` (prompts left-padded, completions right-padded), so the one
    teacher-forced forward (``rollout.completion_logits``) serves SFT as it serves RL and distillation."""

    prompt_ids: Tensor  # [B, P] left-padded
    prompt_mask: Tensor  # [B, P] bool
    completion_ids: Tensor  # [B, C] right-padded: the answer, EOS included
    completion_mask: Tensor  # [B, C] bool, True on the answer tokens (the loss's targets)
    domains: list[str]  # [B]
    tasks: list[str]  # [B]

    @property
    def input_ids(self) -> Tensor:  # [B, P + C]
        import torch

        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:  # [B, P + C] bool
        import torch

        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]


def pad_sequences(seqs: list[list[int]], pad_value: int, side: str, dtype=None) -> Tensor:
    """Stack ragged lists into [len(seqs), max_len], padding on the `side` ("left" or "right")."""
    import torch

    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), pad_value, dtype=dtype or torch.long)
    for i, s in enumerate(seqs):
        if s:
            row = torch.as_tensor(s, dtype=out.dtype)
            if side == "left":
                out[i, width - len(s) :] = row
            else:
                out[i, : len(s)] = row
    return out


def make_sft_batch(prompts: list[list[int]], completions: list[list[int]], domains: list[str], tasks: list[str],
                   pad_token_id: int) -> SFTBatch:
    """Prompt + completion token lists as one batch: prompts left-padded, completions right-padded."""
    import torch

    return SFTBatch(
        prompt_ids=pad_sequences(prompts, pad_token_id, "left"),
        prompt_mask=pad_sequences([[1] * len(p) for p in prompts], 0, "left", dtype=torch.bool),
        completion_ids=pad_sequences(completions, pad_token_id, "right"),
        completion_mask=pad_sequences([[1] * len(c) for c in completions], 0, "right", dtype=torch.bool),
        domains=list(domains),
        tasks=list(tasks),
    )
