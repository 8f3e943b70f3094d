"""Supervised fine-tuning on reference answers: completion-only NLL, teacher-forced.

Used to pre-train the tiny base on mixed-domain data (the kit's stand-in for pre-training, i.e. forward KL
to the data) and to make each domain expert's SFT step before GRPO.
"""

from __future__ import annotations

from opd_lightning.data.batch import SFTBatch
from opd_lightning.losses import completion_nll
from opd_lightning.rollout import completion_logits
from opd_lightning.stages.base import PolicyModule


class SFT(PolicyModule):
    train_format = "sft"

    def training_step(self, batch: SFTBatch, batch_idx: int):
        mask = batch.completion_mask  # the answer tokens (and EOS) are the targets
        logits = completion_logits(self.policy, batch.input_ids, batch.attention_mask, mask.shape[1])  # [B, C, V]
        loss, metrics = completion_nll(logits, batch.completion_ids, mask, normalizer=self.token_normalizer(mask))
        self.log_loss(loss)
        self.log_across_ranks({f"train/{k}": v for k, v in metrics.items()})
        self.log("train/completion_tokens", mask.sum().float(), reduce_fx="sum", sync_dist=True)
        return loss
