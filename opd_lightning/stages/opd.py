"""Multi-expert on-policy distillation: the student samples, each sample's routed teacher grades every token.

The last stage of the recipe (MiMo-V2's MOPD, DeepSeek-V4's specialist distillation, Qwen3's strong-to-weak
step): the student rolls out on a mixture of domains; each prompt's domain tag routes its completion to that
domain's expert (``teachers:`` in YAML, plus an optional ``default``), and the student moves towards the
expert on its own samples. On-policy samples avoid the train/test mismatch of SFT on teacher text (Agarwal
et al. 2024, GKD), and the per-token teacher signal is far denser than a task reward (Lu et al. 2025,
Thinking Machines, "On-Policy Distillation").

One batch, top to bottom: prompts -> rollouts (the student's; for GKD's off-policy share, the routed teachers')
-> student logits (with grad) and routed teacher scores (without) -> verifier reward -> loss. The loss is
chosen in YAML (:class:`DistillConfig`):

* ``sampled_reverse_kl``: per-token advantage ``A_t = -coef (log p_S(y_t) - log p_T(y_t))`` (optionally
  discounted, plus a weighted task reward) in a policy-gradient loss: the Thinking Machines / MOPD recipe;
  needs only the teacher's log-prob of the sampled token.
* ``reverse_kl`` (full vocabulary, or a top-k support plus a tail bucket), ``forward_kl``,
  ``generalized_jsd`` (``beta``), ``skew_kl`` / ``skew_reverse_kl`` (``alpha``): analytic divergences at
  every sampled position, from :mod:`opd_lightning.losses`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from opd_lightning import rewards
from opd_lightning.data.batch import PromptBatch
from opd_lightning.losses import (
    Metrics,
    Normalizer,
    distillation_advantages,
    forward_kl,
    generalized_jsd,
    group_advantages,
    masked_mean,
    policy_gradient_loss,
    reverse_kl,
    sampled_reverse_kl,
    skew_kl,
    topk_reverse_kl_from_logprobs,
)
from opd_lightning.metrics import DISTILLATION_STATS, DomainMean
from opd_lightning.ops import HiddenLogits, gather_logprobs
from opd_lightning.rollout import Rollout, SamplingConfig, lazy_completion_logits
from opd_lightning.seeding import make_generator
from opd_lightning.stages.base import PolicyModule
from opd_lightning.stages.overlap_cold_start import OverlapColdStart, describe, run_overlap_cold_start
from opd_lightning.teachers import TeacherPool, TeacherScores

LOSSES = ("sampled_reverse_kl", "reverse_kl", "forward_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl")


@dataclass
class DistillConfig:
    """What the student minimises against its routed teacher, and how the batch is scored."""

    loss: str = "reverse_kl"
    """One of sampled_reverse_kl, reverse_kl, forward_kl, generalized_jsd, skew_kl, skew_reverse_kl."""
    top_k: int | None = None
    """reverse_kl only: compare on a top-k support plus a tail bucket (O(k) teacher memory per token)
    instead of the full vocabulary; null for the exact full-vocabulary loss."""
    top_k_from: Literal["teacher", "student", "union"] = "teacher"
    """Whose top-k ids make the support: the teacher's, the student's, or both (2k ids, deduplicated)."""
    beta: float = 0.5
    """generalized_jsd: teacher weight of the mixture, in [0, 1] (0 = forward KL, 1 = reverse KL)."""
    alpha: float = 0.1
    """skew_kl / skew_reverse_kl: share of the first distribution mixed into the second, in [0, 1]."""
    kl_coef: float = 1.0
    """sampled_reverse_kl: scale of the per-token reward -(log p_S - log p_T)."""
    discount: float = 0.0
    """sampled_reverse_kl: discount of future per-token rewards in [0, 1]; 0 = each token on its own."""
    clip_eps: float = 0.2
    """sampled_reverse_kl: PPO ratio clip (a no-op with one update per batch, the ratio is 1)."""
    reward_weight: float = 0.0
    """sampled_reverse_kl: weight of the verifier's task reward added to every token's advantage (the
    OPD + RL hybrid); 0 turns it off. The reward is still computed for the train accuracy log."""
    reward_normalization: Literal["group", "none"] = "group"
    """How the task reward enters the advantage: "group" = GRPO's group-relative advantage over the
    sampling.num_samples completions of a prompt (needs num_samples >= 2); "none" = the raw reward."""
    off_policy_ratio: float = 0.0
    """Fraction of batches (GKD's 1 - lambda) whose completions the routed teachers sample instead of the
    student; analytic losses only. 0 = fully on-policy."""
    overlap_k: int = 8
    """k of the logged top-k overlap / shared-mass diagnostics."""
    stats_every: int | None = None
    """Compute the per-teacher / per-domain diagnostics (exact full-vocabulary reverse KL, entropies, top-k
    overlap: metrics.distillation_stats) on every this many optimiser steps only; at a real vocabulary they cost
    most of the scoring time. null = on the steps the logger writes (trainer.log_every_n_steps), so what the
    logs show is what computing them at every step would show. Each logged figure is exact for the step it is
    logged at (every completion token of that batch); the steps in between log none."""
    micro_batch_size: int | None = None
    """Rows per teacher forward (bounds teacher activation and logit memory); null = all routed rows."""
    teacher_token_budget: int | None = 65536
    """Most padded tokens one teacher forward takes, rows x (longest prompt + longest completion) of its rows
    (teachers.forward_chunks): bounds a teacher's activation memory however long the completions, where
    micro_batch_size bounds rows only. Scores do not depend on it. Must hold one row, data.max_prompt_length +
    sampling.max_new_tokens; null = no bound. The default never splits the tiny world's batches (<= 7,168 tokens)
    and cuts 64 rows x 4,096 tokens into 4 forwards."""

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"distill.loss must be one of {', '.join(LOSSES)}; got {self.loss!r}")
        if self.top_k is not None:
            if self.top_k < 1:
                raise ValueError(f"distill.top_k must be >= 1 or null, got {self.top_k}")
            if self.loss != "reverse_kl":
                raise ValueError(f"distill.top_k applies to loss reverse_kl only, got loss {self.loss!r}")
        if self.top_k_from not in ("teacher", "student", "union"):
            raise ValueError(f"distill.top_k_from must be teacher, student or union, got {self.top_k_from!r}")
        for name in ("beta", "alpha", "discount", "off_policy_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"distill.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.kl_coef <= 0:
            raise ValueError(f"distill.kl_coef must be > 0, got {self.kl_coef}")
        if self.clip_eps <= 0:
            raise ValueError(f"distill.clip_eps must be > 0, got {self.clip_eps}")
        if self.reward_weight < 0:
            raise ValueError(f"distill.reward_weight must be >= 0, got {self.reward_weight}")
        if self.reward_weight > 0 and self.loss != "sampled_reverse_kl":
            raise ValueError(
                f"distill.reward_weight > 0 needs loss sampled_reverse_kl (a reward enters an advantage), "
                f"got loss {self.loss!r}"
            )
        if self.reward_normalization not in ("group", "none"):
            raise ValueError(
                f"distill.reward_normalization must be group or none, got {self.reward_normalization!r}"
            )
        if self.off_policy_ratio > 0 and self.loss == "sampled_reverse_kl":
            raise ValueError(
                "distill.off_policy_ratio > 0 needs an analytic loss: sampled_reverse_kl scores the student's "
                "own samples, and teacher samples would make its policy gradient off-policy"
            )
        if self.overlap_k < 1:
            raise ValueError(f"distill.overlap_k must be >= 1, got {self.overlap_k}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"distill.micro_batch_size must be >= 1 or null, got {self.micro_batch_size}")
        if self.teacher_token_budget is not None and self.teacher_token_budget < 1:
            raise ValueError(
                f"distill.teacher_token_budget must be >= 1 (padded tokens per teacher forward) or null, got "
                f"{self.teacher_token_budget}"
            )
        if self.stats_every is not None and self.stats_every < 1:
            raise ValueError(
                f"distill.stats_every must be >= 1 or null (the logging cadence), got {self.stats_every}"
            )

    @property
    def needs_teacher_logits(self) -> bool:
        """Full-vocabulary losses read the teacher's whole distribution at every position (kept as hidden states
        and LM heads, made a chunk of positions at a time); the others need O(1) or O(k) per token."""
        return self.loss != "sampled_reverse_kl" and self.top_k is None


def distillation_loss(
    config: DistillConfig,
    student_logits: Tensor | HiddenLogits,
    rollout: Rollout,
    scores: TeacherScores,
    *,
    task_advantages: Tensor | None = None,
    temperature: float = 1.0,
    normalizer: Normalizer = None,
) -> tuple[Tensor, Metrics]:
    """The loss ``config.loss`` of the student's completion logits ``[N, C, V]`` against the routed teachers.

    ``student_logits`` may be :class:`~opd_lightning.ops.HiddenLogits`: every loss then makes the student's logits
    a chunk of positions at a time, recomputed in the backward pass, never holding ``[N, C, V]``: the sampled-token
    and top-k losses read log-probs (:func:`opd_lightning.ops.gather_logprobs`), the full-vocabulary ones compare
    each chunk with the teacher's logits at the same positions (``scores.logits``, dense or
    :class:`~opd_lightning.ops.RoutedLogits`) and keep per-token values. Distributions are compared
    at temperature 1. For ``sampled_reverse_kl`` the policy-gradient ratio uses
    the student's log-probs at the sampling ``temperature`` (that of ``rollout.logprobs``), and
    ``task_advantages [N]`` (already normalised) is added to every token's advantage, times
    ``config.reward_weight``. Normalisation: ``normalizer`` (the stage passes the DDP-invariant token count).
    """
    mask = rollout.completion_mask  # [N, C]
    if config.loss == "sampled_reverse_kl":
        sampled = rollout.completion_ids.unsqueeze(-1)  # [N, C, 1]

        def sampled_logprobs(tau: float) -> Tensor:  # [N, C], with grad
            return gather_logprobs(student_logits, sampled, mask, temperature=tau).squeeze(-1)

        logp = sampled_logprobs(1.0)
        # the importance ratio compares like with like: rollout.logprobs are at the sampling temperature
        sampling_logp = logp if temperature == 1.0 else sampled_logprobs(temperature)
        advantages = distillation_advantages(
            logp.detach(), scores.logprobs, mask, coef=config.kl_coef, discount=config.discount
        )
        if task_advantages is not None:
            advantages = advantages + config.reward_weight * task_advantages[:, None] * mask
        loss, metrics = policy_gradient_loss(
            sampling_logp, rollout.logprobs, advantages, mask, clip_eps=config.clip_eps, normalizer=normalizer
        )
        _, estimates = sampled_reverse_kl(logp.detach(), scores.logprobs, mask)
        return loss, {**metrics, **estimates, "advantage_mean": masked_mean(advantages, mask)}
    if config.loss == "reverse_kl" and config.top_k is not None:
        return topk_reverse_kl_from_logprobs(
            gather_logprobs(student_logits, scores.support_ids, mask), scores.support_logprobs, mask,
            support_valid=scores.support_valid, normalizer=normalizer,
        )  # fmt: skip
    teacher_logits = scores.logits
    if config.loss == "reverse_kl":
        return reverse_kl(student_logits, teacher_logits, mask, normalizer=normalizer)
    if config.loss == "forward_kl":
        return forward_kl(student_logits, teacher_logits, mask, normalizer=normalizer)
    if config.loss == "generalized_jsd":
        return generalized_jsd(student_logits, teacher_logits, mask, beta=config.beta, normalizer=normalizer)
    reverse = config.loss == "skew_reverse_kl"
    return skew_kl(
        student_logits, teacher_logits, mask, alpha=config.alpha, reverse=reverse, normalizer=normalizer
    )


class MultiExpertOPD(PolicyModule):
    """On-policy distillation of a student from several domain experts, each sample routed by its domain.

    Args:
        teachers: ``domain -> local teacher folder`` (HF format, same tokenizer as the student); the key
            ``default`` takes domains without an entry. Domains sharing a folder share one loaded teacher.
        distill: the loss and its knobs (:class:`DistillConfig`).
        sampling: how the student (or, for the off-policy share, the teacher) samples completions.
        seed: seeds sampling per row of each optimiser step's global batch (:mod:`opd_lightning.seeding`), so
            runs and resumes reproduce, at any number of processes and micro-batches.
        overlap_cold_start: when set, domains whose student/teacher top-k overlap is below its threshold get
            ColdStart steps on their teacher's samples before the first OPD step
            (:mod:`opd_lightning.stages.overlap_cold_start`); null = straight to OPD.
        **kwargs: the policy, optimiser and validation arguments of :class:`PolicyModule`.
    """

    train_format = "prompts"
    frozen_modules = ("teachers",)

    def __init__(
        self,
        teachers: dict[str, str],
        distill: DistillConfig | None = None,
        sampling: SamplingConfig | None = None,
        seed: int = 0,
        overlap_cold_start: OverlapColdStart | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.distill = distill or DistillConfig()
        self.overlap_cold_start = overlap_cold_start
        self.cold_start_report: dict | None = None  # what the overlap cold start did; kept in checkpoints
        self.sampling = sampling or SamplingConfig(max_new_tokens=32, temperature=1.0)
        self.seed = seed
        if self.distill.reward_weight > 0 and self.distill.reward_normalization == "group":
            if self.sampling.num_samples < 2:
                raise ValueError(
                    "distill.reward_normalization: group needs sampling.num_samples >= 2 (a group per prompt), "
                    f"got {self.sampling.num_samples}; raise it or use reward_normalization: none"
                )
        # Cheap and before any weights load: folders exist, tokenizers and chat templates equal the student's.
        self.teachers = TeacherPool.for_student(
            teachers, self.tokenizer, trust_remote_code=self.hparams.trust_remote_code
        )

    # ------------------------------------------------------------------------------------ building

    def configure_frozen_models(self) -> None:
        self.teachers.load(dtype=self.frozen_dtype, trust_remote_code=self.hparams.trust_remote_code)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        # A missing route is a config error: say so before any model loads or any step runs.
        self.teachers.check_domains(datamodule.domains)
        budget, longest = self.distill.teacher_token_budget, datamodule.max_prompt_length + self.max_new_tokens()
        if budget is not None and budget < longest:
            raise ValueError(
                f"distill.teacher_token_budget={budget} cannot hold one row: a teacher forward takes whole rows, up "
                f"to data.max_prompt_length ({datamodule.max_prompt_length}) + sampling.max_new_tokens "
                f"({self.max_new_tokens()}) = {longest} tokens. Raise it to at least {longest}, or null for no bound."
            )
        super().setup(stage)
        names = [f"teacher/{t}/{s}" for t in self.teachers.names for s in DISTILLATION_STATS]
        names += [f"domain/{d}/{s}" for d in datamodule.domains for s in DISTILLATION_STATS]
        names += [f"accuracy/{d}" for d in datamodule.domains]
        names += [f"tokens/{t}" for t in self.teachers.names]
        self.train_stats = DomainMean(names)

    def max_new_tokens(self) -> int:
        return self.sampling.max_new_tokens

    def on_train_start(self) -> None:
        # Not on_fit_start: sharded strategies restore a checkpoint after that hook, and the report restored
        # from the checkpoint is what says "already done" to a resumed run.
        if self.overlap_cold_start is None:
            return
        if self.cold_start_report is not None:
            self.print(f"[opd] overlap cold start already ran in this run: {describe(self.cold_start_report)}")
            return
        self.cold_start_report = run_overlap_cold_start(self, self.overlap_cold_start)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["overlap_cold_start"] = self.cold_start_report

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.cold_start_report = checkpoint.get("overlap_cold_start")  # absent: written by an older version

    # ------------------------------------------------------------------------------------ training

    def training_step(self, batch: PromptBatch, batch_idx: int) -> Tensor:
        # 1. rollouts: the student's own samples; for GKD's off-policy share, each prompt's routed teacher's
        off_policy = self._off_policy_batch()
        uniforms = self.rollout_uniforms(self.seed, "opd_rollout", len(batch), self.sampling)
        if off_policy:
            rollout = self.teachers.generate(
                batch.prompt_ids, batch.prompt_mask, batch.domains, self.sampling,
                eos_token_id=self.eos_token_ids, pad_token_id=self.tokenizer.pad_token_id,
                uniforms=uniforms, tokenizer=self.tokenizer,
            )  # fmt: skip
        else:
            rollout = self.sample(self.policy, batch, self.sampling, uniforms=uniforms)
        mask = rollout.completion_mask  # [N, C]

        # 2. the student's distributions at the sampled positions (with grad), the routed teachers' (without);
        # both kept as hidden states where the models allow it, never as [N, C, V] logits
        student_logits = lazy_completion_logits(
            self.policy, rollout.input_ids, rollout.attention_mask, rollout.completion_ids.shape[1]
        )  # [N, C, V]
        stats = self._stats_due()
        scores = self.teachers.score(
            rollout,
            student_logits=student_logits.detach() if stats or self.distill.top_k_from != "teacher" else None,
            stats=stats,
            keep_logits=self.distill.needs_teacher_logits,
            lazy_logits=True,
            top_k=self.distill.top_k,
            top_k_from=self.distill.top_k_from,
            overlap_k=self.distill.overlap_k,
            micro_batch_size=self.distill.micro_batch_size,
            token_budget=self.distill.teacher_token_budget,
        )

        # 3. the verifier's task reward: train accuracy, and the OPD + RL hybrid's extra advantage
        entries = [batch.entries[i] for i in rollout.prompt_index.tolist()]
        reward, exact = rewards.verify(rollout.decode(self.tokenizer), entries, mask.device)  # [N], [N]
        task_advantages = None
        if self.distill.reward_weight > 0:
            task_advantages = reward
            if self.distill.reward_normalization == "group":
                task_advantages, _ = group_advantages(reward, self.sampling.num_samples)

        # 4. the loss against the routed teachers
        loss, metrics = distillation_loss(
            self.distill,
            student_logits,
            rollout,
            scores,
            task_advantages=task_advantages,
            temperature=self.sampling.logprob_temperature,
            normalizer=self.token_normalizer(mask),
        )
        self.log_loss(loss)
        self.log_across_ranks({f"train/{k}": v for k, v in metrics.items()})
        self._log_routed(rollout, scores, reward, exact, off_policy)
        return loss

    # ------------------------------------------------------------------------------------ helpers

    def _stats_due(self) -> bool:
        """Whether this optimiser step computes the diagnostics (``distill.stats_every``); the same on every rank
        and micro-batch. Lightning's logger writes when ``(step + 1) % log_every_n_steps == 0``."""
        every = self.distill.stats_every or self.trainer.log_every_n_steps
        return every > 0 and (self.trainer.global_step + 1) % every == 0

    def _off_policy_batch(self) -> bool:
        """GKD's coin, one per optimiser step: the same on every rank and micro-batch (seeded by the step only),
        so ranks roll out in lockstep and a step is on- or off-policy whatever its decomposition."""
        if self.distill.off_policy_ratio == 0.0:
            return False
        step, _ = self.batch_position()
        coin = make_generator(self.seed, "gkd_coin", step)
        return bool(torch.rand((), generator=coin) < self.distill.off_policy_ratio)

    def _log_routed(
        self, rollout: Rollout, scores: TeacherScores, reward: Tensor, exact: Tensor, off_policy: bool
    ) -> None:
        """Diagnostics per teacher and per domain (token-weighted, summed across ranks by DomainMean) on the steps
        that computed them, train accuracy (exact match) per domain, the share of tokens each teacher scored,
        its throughput."""
        mask = rollout.completion_mask
        lengths = mask.sum(-1).float()  # [N]
        for stat in scores.stats:
            per_row = torch.where(mask, scores.stats[stat], 0.0).sum(-1) / lengths.clamp(min=1)  # [N]
            self.train_stats.update(per_row, [f"teacher/{t}/{stat}" for t in scores.teacher], weights=lengths)
            self.train_stats.update(per_row, [f"domain/{d}/{stat}" for d in rollout.domains], weights=lengths)
        # every step, stats or not: the token counts the routing shares below are read from
        ones = torch.ones_like(lengths)
        self.train_stats.update(ones, [f"tokens/{t}" for t in scores.teacher], weights=lengths)
        if not off_policy:  # accuracy of the student's own samples, not the teachers'
            self.train_stats.update(exact, [f"accuracy/{d}" for d in rollout.domains])
        values, counts = self.train_stats.compute(), self.train_stats.counts()
        self.train_stats.reset()
        self.log_dict({f"train/{k}": v for k, v in values.items() if not k.startswith("tokens/")})
        routed = {t: counts[f"tokens/{t}"] for t in self.teachers.names}
        total = sum(routed.values()).clamp(min=1)
        self.log_dict({f"train/teacher/{t}/token_fraction": n / total for t, n in routed.items()})
        self.log_dict(
            {
                f"train/teacher/{t}/tokens_per_s": scores.tokens[t] / max(s, 1e-9)
                for t, s in scores.seconds.items()
            }
        )
        seconds = sum(scores.seconds.values())  # throughputs stay per rank: a rank's own teachers' speed
        self.log("train/teacher_tokens_per_s", sum(scores.tokens.values()) / max(seconds, 1e-9))
        if scores.stats:  # computed on the same steps on every rank (_stats_due)
            full_reverse_kl = masked_mean(scores.stats["reverse_kl"], mask)
            self.log_across_ranks({"train/full_reverse_kl": full_reverse_kl}, prog_bar=True)
        self.log_across_ranks({
            "train/reward": reward.mean(),
            "train/completion_length": lengths.mean(),
            "train/truncated_fraction": rollout.is_truncated.float().mean(),
        })  # fmt: skip
        self.log("train/off_policy", float(off_policy))  # one coin per step, the same on every rank
