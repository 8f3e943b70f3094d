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
    """Prompt + reference answer, teacher-forced, with the loss on the answer tokens only."""

    input_ids: Tensor  # [B, T] right-padded
    attention_mask: Tensor  # [B, T] bool
    loss_mask: Tensor  # [B, T] bool, True on completion tokens (answer + EOS), aligned with input_ids
    domains: list[str]  # [B]
    tasks: list[str]  # [B]

    def __len__(self) -> int:
        return self.input_ids.shape[0]


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
    """Prompt + completion token lists as one right-padded batch, the loss mask on the completions."""
    import torch

    seqs = [p + c for p, c in zip(prompts, completions, strict=True)]
    return SFTBatch(
        input_ids=pad_sequences(seqs, pad_token_id, "right"),
        attention_mask=pad_sequences([[1] * len(s) for s in seqs], 0, "right", dtype=torch.bool),
        loss_mask=pad_sequences([[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)], 0, "right",
                                dtype=torch.bool),
        domains=list(domains),
        tasks=list(tasks),
    )
