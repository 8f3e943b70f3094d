"""GRPO: how a domain expert is made from its SFT checkpoint (Shao et al. 2024, DeepSeekMath sec. 4.1).

Per prompt the policy samples a group of `sampling.num_samples` completions; each is scored by the task's
verifier (`rewards.verify`: partial credit, or exact match with `grpo.partial_credit: false`) plus optional
shaping terms; advantages are the rewards centred (and by default scaled) within each group
(`losses.group_advantages`); the policy then takes `ppo_epochs × num_minibatches` clipped-surrogate steps
on that rollout (`losses.grpo_loss`, with the Dr. GRPO and DAPO aggregations and an optional k3 KL to a
frozen reference). The ratio uses the behaviour log-probs recorded while sampling, so it is exact: 1 (to
float32 round-off) on the first minibatch of the first epoch, the off-policy correction after that.

Several optimiser steps per batch means manual optimisation. Consequences a YAML must respect:
`trainer.max_steps` and `ModelCheckpoint(every_n_train_steps)` count *optimiser* steps, while
`val_check_interval` and `log_every_n_steps` count *batches*; `trainer.gradient_clip_val` must stay unset
(Lightning refuses it in manual mode), `grpo.max_grad_norm` clips instead.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from opd_lightning import rewards
from opd_lightning.data.batch import PromptBatch
from opd_lightning.losses import group_advantages, grpo_loss
from opd_lightning.metrics import DomainMean
from opd_lightning.models import check_local_path, check_same_tokenizer, load_frozen, load_tokenizer
from opd_lightning.rollout import Rollout, SamplingConfig, completion_logprobs
from opd_lightning.seeding import make_generator
from opd_lightning.stages.base import PolicyModule

__all__ = ["GRPO", "GRPOConfig", "RewardTerm", "resolve_reward_fn"]


@dataclass
class GRPOConfig:
    """The policy update: advantage scaling, loss aggregation, clipping, KL, and steps per rollout batch."""

    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    """Loss aggregation: "grpo" (mean per sequence, then over sequences), "dr_grpo" (sum / (rows ×
    sampling.max_new_tokens), no length bias) or "dapo" (token mean over the batch, global token count)."""
    partial_credit: bool = True
    """Reward the verifier's partial credit as is. False: only fully correct answers (score 1) earn the reward.
    reasoning_gym's default scorer gives len(answer) / len(completion) to any completion that *contains* the
    answer ("-280" scores 0.75 for "-28"), a reward a policy can climb by padding its answers."""
    scale_std: bool = True
    """Divide each group's centred rewards by the group's std (GRPO); Dr. GRPO turns this off."""
    clip_eps: float = 0.2
    """Lower clip range of the ratio: 1 - clip_eps."""
    clip_eps_high: float | None = None
    """Upper clip range, 1 + clip_eps_high; None = clip_eps (DAPO's "clip-higher" uses 0.28)."""
    kl_coef: float = 0.0
    """Weight of the k3 KL to `ref_model` in the loss; needs `ref_model`. 0 with a reference still logs it."""
    ppo_epochs: int = 1
    """Passes over each rollout batch; later passes are off-policy and rely on the clipped ratio."""
    num_minibatches: int = 1
    """Optimiser steps per pass; must divide data.batch_size × sampling.num_samples."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm at each optimiser step; None = no clipping."""
    ref_micro_batch_size: int | None = None
    """Rows per reference-model forward (memory bound for big models); None = the whole batch at once."""
    seed: int = 0
    """Seeds rollout sampling (per row of the step's global batch) and minibatch shuffling (per step and rank),
    through :mod:`opd_lightning.seeding`: reproducible and resumable."""

    def __post_init__(self) -> None:
        if self.loss_type not in ("grpo", "dr_grpo", "dapo"):
            raise ValueError(f"grpo.loss_type must be 'grpo', 'dr_grpo' or 'dapo', got {self.loss_type!r}")
        if not 0.0 < self.clip_eps < 1.0:
            raise ValueError(f"grpo.clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.clip_eps_high is not None and self.clip_eps_high <= 0.0:
            raise ValueError(f"grpo.clip_eps_high must be > 0 (or null = clip_eps), got {self.clip_eps_high}")
        if self.kl_coef < 0.0:
            raise ValueError(f"grpo.kl_coef must be >= 0, got {self.kl_coef}")
        for name in ("ppo_epochs", "num_minibatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"grpo.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0.0:
            raise ValueError(
                f"grpo.max_grad_norm must be > 0 (or null = no clipping), got {self.max_grad_norm}"
            )
        if self.ref_micro_batch_size is not None and self.ref_micro_batch_size < 1:
            raise ValueError(
                f"grpo.ref_micro_batch_size must be >= 1 (or null), got {self.ref_micro_batch_size}"
            )


@dataclass
class RewardTerm:
    """A shaping term added to the verifier's reward: `weight * fn(completions, entries, **kwargs)`."""

    fn: str
    """Import path of a reward function `fn(completions, entries, **kwargs) -> list[float]`, e.g.
    `opd_lightning.rewards.length_penalty`."""
    weight: float = 1.0
    """Multiplies the term before it is added to the reward."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for `fn` (e.g. `{target_chars: 16}`)."""


def resolve_reward_fn(path: str, field_name: str) -> Callable[..., list[float]]:
    """The callable at import path `module.attr`; a bad path fails now, naming the YAML field."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(
            f"{field_name}={path!r} is not an import path; write it as `package.module.function`"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{field_name}={path!r}: cannot import module {module_name!r} ({err})") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{field_name}={path!r}: module {module_name!r} has no function {attr!r}")
    return fn


class GRPO(PolicyModule):
    """Group-relative policy optimisation on the task verifiers' rewards (the domain-expert stage)."""

    train_format = "prompts"
    frozen_modules = ("reference",)

    def __init__(
        self,
        model: str,
        sampling: SamplingConfig | None = None,
        grpo: GRPOConfig | None = None,
        shaping: list[RewardTerm] | None = None,
        ref_model: str | None = None,
        **kwargs,
    ):
        """
        Args:
            model: local folder of the policy to train (usually the domain's SFT export).
            sampling: how completions are sampled; `num_samples` is GRPO's group size (>= 2, temperature > 0).
                Default: 8 samples at temperature 1, 64 new tokens.
            grpo: loss and update settings (see `GRPOConfig`).
            shaping: extra reward terms added to the verifier's correctness, resolved by import path now.
            ref_model: local folder of a frozen reference for the KL term (and its log); None = no reference.
            **kwargs: the `PolicyModule` arguments (tiny_size, dtype, optimizer, lr_scheduler, eval, ...).
        """
        super().__init__(model, **kwargs)
        # Several optimiser steps per rollout batch: Lightning's automatic loop does exactly one.
        self.automatic_optimization = False
        self.sampling = sampling or SamplingConfig(num_samples=8)
        self.config = grpo or GRPOConfig()
        if self.sampling.num_samples < 2:
            raise ValueError(
                f"sampling.num_samples (GRPO's num_generations) must be >= 2, got {self.sampling.num_samples}: "
                "advantages are relative to the other completions of the same prompt"
            )
        if self.sampling.greedy:
            raise ValueError(
                "sampling.temperature must be > 0 for GRPO: greedy groups are identical, so no signal"
            )
        self.shaping = [
            (term, resolve_reward_fn(term.fn, f"shaping[{i}].fn")) for i, term in enumerate(shaping or [])
        ]
        if self.config.kl_coef > 0 and ref_model is None:
            raise ValueError(
                f"grpo.kl_coef={self.config.kl_coef} needs model.init_args.ref_model (the frozen reference)"
            )
        self.ref_model = (
            check_local_path(ref_model, "model.init_args.ref_model") if ref_model is not None else None
        )
        if self.ref_model is not None:
            ref_tokenizer = load_tokenizer(self.ref_model, trust_remote_code=self.hparams.trust_remote_code)
            check_same_tokenizer(self.tokenizer, ref_tokenizer, "model.init_args.ref_model")
        self.reference: torch.nn.Module | None = None

    def configure_frozen_models(self) -> None:
        if self.ref_model is not None and self.reference is None:
            self.reference = load_frozen(
                self.ref_model,
                dtype=self.frozen_dtype,
                field="model.init_args.ref_model",
                trust_remote_code=self.hparams.trust_remote_code,
            )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = self.trainer.datamodule
        self.train_accuracy = DomainMean(datamodule.domains)
        rows = datamodule.batch_size * self.sampling.num_samples
        if rows % self.config.num_minibatches:
            raise ValueError(
                f"grpo.num_minibatches={self.config.num_minibatches} does not divide the {rows} completions of a "
                f"batch (data.batch_size={datamodule.batch_size} × sampling.num_samples="
                f"{self.sampling.num_samples}); choose a divisor of {rows}"
            )

    def max_new_tokens(self) -> int:
        return self.sampling.max_new_tokens

    # ------------------------------------------------------------------------------------- training

    def training_step(self, batch: PromptBatch, batch_idx: int) -> dict[str, Tensor]:
        cfg, group = self.config, self.sampling.num_samples
        temperature = self.sampling.logprob_temperature
        # the batch's optimiser step of the data stream (global_step counts this stage's several updates)
        step, _ = self.batch_position()

        # 1. Roll out: `group` contiguous completions per prompt, with their behaviour log-probs.
        start = _clock(self.device)
        uniforms = self.rollout_uniforms(cfg.seed, "grpo_rollout", len(batch), self.sampling)
        rollout = self.sample(self.policy, batch, self.sampling, uniforms=uniforms)  # N = B * group rows
        completions = rollout.decode(self.tokenizer)
        entries = [batch.entries[i] for i in rollout.prompt_index.tolist()]

        # 2. Score: verifier (+ shaping) -> group-relative advantages; reference log-probs for the KL.
        verifier, exact = self.verifier_reward(completions, entries)  # [N], [N]
        reward, reward_terms = self.shaped_reward(verifier, completions, entries)  # [N]
        advantages, group_metrics = group_advantages(reward, group, scale_std=cfg.scale_std)  # [N]
        ref_logp = None
        if self.reference is not None:
            with torch.no_grad():
                ref_logp = completion_logprobs(  # [N, C]
                    self.reference,
                    rollout,
                    temperature=temperature,
                    micro_batch_size=cfg.ref_micro_batch_size,
                )
        rollout_time = _clock(self.device) - start

        # 3. Update: ppo_epochs passes of num_minibatches optimiser steps each, on this one rollout.
        # Manual optimisation: trainer.gradient_clip_val does not apply (Lightning refuses it), so the
        # clip value is a stage field; the LR scheduler is stepped here, once per optimiser step.
        start = _clock(self.device)
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        # minibatches are drawn from this rank's rows (as TRL and verl do): with num_minibatches > 1 the partition,
        # hence the updates, depend on the world size; one minibatch (the default) does not
        shuffle = make_generator(cfg.seed, "grpo_minibatch", step, self.global_rank)
        step_metrics: list[dict[str, Tensor]] = []
        entropy = _EntropySum()
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(len(rollout), generator=shuffle).to(self.device)
            for rows in order.chunk(cfg.num_minibatches):
                minibatch = rollout.select(rows)
                loss, metrics = self.policy_loss(
                    minibatch, advantages[rows], None if ref_logp is None else ref_logp[rows],
                    entropy=entropy if epoch == 0 else None,  # the policy's entropy on its own samples
                )  # fmt: skip
                optimizer.zero_grad()
                self.manual_backward(loss)
                if cfg.max_grad_norm is not None:
                    self.clip_gradients(
                        optimizer, gradient_clip_val=cfg.max_grad_norm, gradient_clip_algorithm="norm"
                    )
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                step_metrics.append({"loss": loss.detach(), **metrics})
        update_time = _clock(self.device) - start

        # 4. Log.
        self.train_accuracy.update(exact, rollout.domains)  # exact match, as validation scores it
        lengths = rollout.completion_lengths.float()
        logs = {
            # reward_mean, reward_std (mean within-group std), frac_reward_zero_std (groups with no signal)
            **{f"train/{k}": v for k, v in group_metrics.items()},
            **{f"train/reward/{k}": v for k, v in reward_terms.items()},
            "train/accuracy": exact.mean(),
            **{f"train/accuracy/{d}": v for d, v in self.train_accuracy.compute().items()},
            "train/entropy": entropy.mean(),
            **{f"train/{k}": torch.stack([m[k] for m in step_metrics]).mean() for k in step_metrics[0]},
            "train/ratio_max": torch.stack([m["ratio_max"] for m in step_metrics]).max(),
            "train/completion_length": lengths.mean(),
            "train/truncated_frac": rollout.is_truncated.float().mean(),
            "train/rollout_time_s": torch.tensor(rollout_time),
            "train/update_time_s": torch.tensor(update_time),
        }
        self.train_accuracy.reset()
        self.log_across_ranks({"train/reward_mean": logs.pop("train/reward_mean")}, prog_bar=True)
        self.log_across_ranks(logs)
        return {"train/reward_mean": group_metrics["reward_mean"], **logs}

    def verifier_reward(self, completions: list[str], entries: list[dict]) -> tuple[Tensor, Tensor]:
        """The verifier's reward ``[N]`` (partial credit unless ``grpo.partial_credit`` is false) and exact
        match ``[N]`` (what accuracy reports, here as in validation)."""
        credit, exact = rewards.verify(completions, entries, self.device)
        return credit if self.config.partial_credit else exact, exact

    def shaped_reward(
        self, verifier: Tensor, completions: list[str], entries: list[dict]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Verifier reward plus the weighted shaping terms, ``[N]``; and each term's (unweighted) mean."""
        reward, terms = verifier, {"correctness": verifier.mean()}
        for term, fn in self.shaping:
            values = torch.tensor(
                fn(completions, entries, **term.kwargs), dtype=torch.float32, device=self.device
            )
            if values.shape != reward.shape:
                raise ValueError(
                    f"shaping fn {term.fn} returned {values.numel()} rewards for {len(completions)}"
                )
            reward = reward + term.weight * values
            name = term.fn.rpartition(".")[2]
            terms[name if name not in terms else f"{name}_{len(terms)}"] = values.mean()
        return reward, terms

    def policy_loss(
        self, rollout: Rollout, advantages: Tensor, ref_logp: Tensor | None, entropy: _EntropySum | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """GRPO loss of the current policy on (a minibatch of) a rollout, against its behaviour log-probs;
        adds the policy's token entropies to ``entropy`` when given."""
        cfg = self.config
        mask = rollout.completion_mask
        temperature = self.sampling.logprob_temperature
        if entropy is None:
            logp = completion_logprobs(self.policy, rollout, temperature=temperature)  # [n, C]
        else:
            logp, token_entropy = completion_logprobs(self.policy, rollout, temperature=temperature, entropy=True)
            entropy.add(token_entropy, mask)
        return grpo_loss(
            logp,
            rollout.logprobs,
            advantages,
            mask,
            loss_type=cfg.loss_type,
            clip_eps=cfg.clip_eps,
            clip_eps_high=cfg.clip_eps_high,
            ref_logp=ref_logp,
            kl_coef=cfg.kl_coef,
            max_completion_length=self.sampling.max_new_tokens,
            # only DAPO's token mean takes a normaliser: the global token count keeps it DDP-invariant
            normalizer=self.minibatch_normalizer(mask) if cfg.loss_type == "dapo" else None,
        )

    def minibatch_normalizer(self, mask: Tensor) -> Tensor:
        """This process's share of the minibatch's global token count: each minibatch is one optimiser step,
        so a token mean averaged by DDP over ranks is the mean over all tokens of all ranks (verl's `agg_loss`).
        The "grpo" and "dr_grpo" means need none: every rank holds the same number of rows."""
        count = mask.sum().float()
        if self.trainer.world_size > 1:
            count = self.trainer.strategy.reduce(count, reduce_op="sum") / self.trainer.world_size
        return count.clamp(min=1.0)


# ------------------------------------------------------------------------------------------- helpers


def _clock(device: torch.device) -> float:
    if device.type == "cuda":  # kernels run asynchronously: time the work, not its launch
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _EntropySum:
    """Mean token entropy of the policy's sampling distribution (``softmax(logits / T)``) on its own samples,
    accumulated over the minibatches of the first update pass (read off the loss's forward: no extra one)."""

    def __init__(self) -> None:
        self.total, self.count = torch.zeros(()), torch.zeros(())

    def add(self, entropy: Tensor, mask: Tensor) -> None:  # [n, C], 0 where masked
        self.total = self.total.to(entropy.device) + entropy.sum()
        self.count = self.count.to(entropy.device) + mask.sum()

    def mean(self) -> Tensor:
        return self.total / self.count.clamp(min=1)
