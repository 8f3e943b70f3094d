"""What every stage shares: the policy and its tokenizer, optimiser wiring, validation by generation.

Kept deliberately thin (no stage flags here): a stage subclasses `PolicyModule`, declares which batches it
trains on (`train_format`), and writes its own `training_step` top to bottom.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from torch.optim.lr_scheduler import LambdaLR

from opd_lightning.data.batch import PromptBatch
from opd_lightning.evaluation import greedy_exact
from opd_lightning.metrics import DomainMean
from opd_lightning.models import load_causal_lm, load_tokenizer, resolve_model_path, stop_token_ids
from opd_lightning.rollout import SamplingConfig, compile_forwards, generate
from opd_lightning.seeding import row_uniforms
from opd_lightning.sharding import ShardingConfig, offload_sharded_parameters, shard_model


@dataclass
class EvalConfig:
    """Validation by generation: greedy answers to each task's held-out prompts, scored by its verifier."""

    max_new_tokens: int | None = None
    """Generation budget per validation answer (EOS included); null = data.max_answer_length, the longest
    reference answer the data allows, so the budget is said once."""
    samples_to_log: int = 3
    """Sample completions per task written to TensorBoard as text at each validation."""

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"eval.max_new_tokens must be >= 1 or null, got {self.max_new_tokens}")
        if self.samples_to_log < 0:
            raise ValueError(f"eval.samples_to_log must be >= 0, got {self.samples_to_log}")


class WarmupLinearDecay(LambdaLR):
    """Linear warm-up to the base LR, then linear decay to `min_ratio` × base LR at `total_steps`.

    `total_steps=None` takes the trainer's step budget (`estimated_stepping_batches`) so `max_steps` is said
    once, in the trainer section.
    """

    def __init__(self, optimizer, warmup_steps: int = 0, total_steps: int | None = None, min_ratio: float = 0.0):
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if not self.total_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return 1.0 - (1.0 - self.min_ratio) * progress


class PolicyModule(L.LightningModule):
    """A trainable policy (an HF causal LM from a local folder) with validation by generation."""

    train_format: Literal["sft", "prompts"] = "prompts"
    frozen_modules: tuple[str, ...] = ()
    """Attribute names of frozen submodules (teachers, reference). They are rebuilt from their own paths in
    `configure_model`, so checkpoints leave them out: a resume does not re-save gigabytes of teacher weights."""

    def __init__(
        self,
        model: str,
        tiny_size: str | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        compile_forwards: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        eval: EvalConfig | None = None,
        sharding: ShardingConfig | None = None,
    ):
        """
        Args:
            model: local folder of the policy (HF format: config, safetensors, tokenizer).
            tiny_size: when set ("1m" or "10m") and `model` does not exist yet, build the offline tiny
                model there first. Leave unset for real checkpoints, so a wrong path is an error.
            dtype: parameter dtype; float32 on CPU (bf16 is 11-30x slower there), bfloat16 on GPUs.
            trust_remote_code: allow custom modelling code shipped with the checkpoint (off by default).
            gradient_checkpointing: recompute activations in backward to save memory (big models).
            compile_forwards: run the teacher-forced forwards of the policy and of the frozen models (teachers,
                reference) as torch.compile'd graphs (`rollout.compile_forwards`): on CPU the OPD step's scoring
                and student forward + backward are 14-24% faster, after ~30 CPU-s of compiling per model, so it
                pays off over hundreds of steps; FSDP2-sharded models stay eager, with a warning. Sampling has
                its own switch, `sampling.compile`.
            optimizer: the optimiser, chosen in YAML (class_path + init_args).
            lr_scheduler: optional LR scheduler, stepped every optimiser step.
            eval: validation-by-generation settings.
            sharding: FSDP2 settings (mixed precision, CPU offload), used under ModelParallelStrategy only.
        """
        super().__init__()
        self.save_hyperparameters()
        self.model_path = resolve_model_path(model, tiny_size, "model.init_args.model")
        self.tokenizer = load_tokenizer(self.model_path, trust_remote_code=trust_remote_code)
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.eval_config = eval or EvalConfig()
        self.sharding = sharding or ShardingConfig()
        self.policy: torch.nn.Module | None = None
        self.eos_token_ids: list[int] | None = None  # what ends a sample (models.stop_token_ids), set on load
        self._val_samples: list[str] = []

    # ------------------------------------------------------------------------------------ building

    def configure_model(self) -> None:
        # Lightning's hook for sharded strategies; idempotent because it may be called more than once.
        if self.policy is None:
            self.policy = self.load_policy(self.model_path)
            self.eos_token_ids = stop_token_ids(self.policy, self.tokenizer.eos_token_id)
            self.policy.train()  # from_pretrained returns eval-mode modules
            # Sampling runs in eval mode; the loss's log-probs must come from the same function, so dropout is
            # off in training too (TRL's disable_dropout): otherwise GRPO's first ratio is not 1 (GPT-2, OPT, ...).
            for module in self.policy.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
            if self.hparams.gradient_checkpointing:
                # No `config.use_cache = False`: transformers drops the cache itself where it checkpoints (grad
                # mode), rollouts keep theirs, and the exported config would carry it to every later stage.
                self.policy.gradient_checkpointing_enable()
        self.configure_frozen_models()
        if self.device_mesh is not None:  # ModelParallelStrategy (configs/strategy/fsdp*.yaml): FSDP2
            self._shard(self.device_mesh)
        if self.hparams.compile_forwards:
            for field, model in {"model.init_args.model": self.policy, **self.frozen_models()}.items():
                refusal = compile_forwards(model)
                if refusal is not None:
                    warnings.warn(
                        f"compile_forwards is set but {field} {refusal}: its forwards run eagerly", stacklevel=2
                    )

    def configure_frozen_models(self) -> None:
        """Load the stage's frozen models (teachers, reference) under `frozen_modules`; idempotent. Stages
        with frozen models override it; `configure_model` shards them with the policy."""

    @property
    def frozen_dtype(self) -> str:
        """The dtype frozen models are stored in: the mixed-precision compute dtype when there is one (they take
        no optimiser step, so they need no float32 master copy), else the policy's."""
        return self.sharding.param_dtype or self.hparams.dtype

    def _shard(self, mesh) -> None:
        if mesh.ndim > 1 and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                "trainer.strategy.init_args.tensor_parallel_size must be 1: the kit shards data-parallel "
                "(FSDP2) only; set data_parallel_size to the number of devices × nodes"
            )
        dp_mesh = mesh["data_parallel"] if mesh.ndim > 1 else mesh
        shard_model(self.policy, dp_mesh, self.sharding, field="model.init_args.model")
        for field, model in self.frozen_models().items():
            shard_model(model, dp_mesh, self.sharding, field=field, frozen=True)
        # The state dict leaves the frozen models out (see `state_dict`), and Lightning's full-checkpoint
        # loader for ModelParallelStrategy asks a strict load for every parameter, frozen ones included.
        # A sharded checkpoint is still checked key by key by torch.distributed.checkpoint.
        self.strict_loading = not self.frozen_modules

    def load_policy(self, path) -> torch.nn.Module:
        return load_causal_lm(path, dtype=self.hparams.dtype, trust_remote_code=self.hparams.trust_remote_code)

    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule
        # A stage is judged on its aligned domains; OOD probe tasks are reported apart, never mixed in.
        # "*" is every aligned prompt: the overall figure, summed across ranks like the others.
        ood = [f"ood/{d}" for d in data.ood_domains]
        self.val_accuracy = DomainMean(["*", *data.aligned_domains, *ood])
        self.val_task_accuracy = DomainMean([s.name for s in data.specs])

    def on_fit_start(self) -> None:
        # the models' configs are known only once configure_model has loaded them
        self._check_context(self.trainer.datamodule)
        # any constant cancels in the rescale (see token_normalizer); the most tokens a micro-batch of one
        # sample per prompt holds keeps the loss of order 1 (a raw token sum can overflow fp16 loss scaling)
        self._loss_scale = float(self.trainer.datamodule.batch_size * self.max_new_tokens())
        self._reset_step_totals()

    def frozen_models(self) -> dict[str, torch.nn.Module]:
        """``YAML field -> model`` for every loaded frozen model (teachers, reference) under `frozen_modules`;
        `models.load_frozen` records the field each came from."""
        found = {}
        for name in self.frozen_modules:
            module = getattr(self, name)
            if module is not None:
                found.update({m.yaml_field: m for m in module.modules() if hasattr(m, "yaml_field")})
        return found

    def _check_context(self, datamodule) -> None:
        """Every model that reads prompt + completion (the policy, and each teacher or reference that scores
        or samples them) must hold it in its context: past it, positions are ones the model never learned."""
        new_tokens = max(self.eval_max_new_tokens(), self.max_new_tokens())
        need = datamodule.max_prompt_length + new_tokens
        for field, model in {"model.init_args.model": self.policy, **self.frozen_models()}.items():
            limit = getattr(model.config, "max_position_embeddings", None)  # not every config has one
            if limit is not None and need > limit:
                raise ValueError(
                    f"{field}: the model's context is {limit} positions, but data.max_prompt_length "
                    f"({datamodule.max_prompt_length}) + max new tokens ({new_tokens}: the larger of "
                    "model.init_args.eval.max_new_tokens and the stage's sampling or answer length) = "
                    f"{need}.\n"
                    "Lower one of them, or use a model with a longer context."
                )

    def eval_max_new_tokens(self) -> int:
        """Greedy validation budget: `eval.max_new_tokens`, else the data's longest answer."""
        return self.eval_config.max_new_tokens or self.trainer.datamodule.max_answer_length

    def max_new_tokens(self) -> int:
        """Longest completion the stage trains on (stages that sample override this)."""
        return self.trainer.datamodule.max_answer_length

    def configure_optimizers(self):
        if self.sharding.cpu_offload and self.device_mesh is not None:
            for model in (self.policy, *self.frozen_models().values()):
                offload_sharded_parameters(model)
        optimizer = self.optimizer(self.policy.parameters())
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        if isinstance(scheduler, WarmupLinearDecay) and scheduler.total_steps is None:
            scheduler.total_steps = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------------------------- checkpoints

    def _is_frozen_key(self, key: str) -> bool:
        return any(key.startswith(f"{name}.") for name in self.frozen_modules)

    def state_dict(self, *args, **kwargs):
        # Lightning's documented way to keep frozen parts out of checkpoints (strategies and sharded
        # checkpoints included): the state dict never holds them, so no rank gathers or writes teacher weights.
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        state = super().state_dict(*args, **kwargs)
        for key in [k for k in state if k.startswith(prefix) and self._is_frozen_key(k.removeprefix(prefix))]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not self._is_frozen_key(k)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"checkpoint does not match the stage: missing keys {missing[:5]}, unexpected keys "
                f"{result.unexpected_keys[:5]} (was it written by another stage or model?)"
            )
        return result

    # ---------------------------------------------------------------------------------- mechanics

    # A token-mean loss must weigh every token of the optimiser step alike, whether the step's global batch is
    # spread over processes or micro-batches (verl's `agg_loss` rule). Its denominator, the step's token count,
    # is not known when a micro-batch's backward runs: completion lengths exist only after sampling (OPD,
    # ColdStart on the fly), and later micro-batches are not even drawn yet. So a stage's loss is the token SUM
    # over a fixed constant (`token_normalizer`), and `on_before_optimizer_step`, which Lightning calls once
    # the step's last backward is done and before clipping, rescales the gradients by the step's global token
    # count, all-reduced once. That also undoes Lightning's 1 / accumulate_grad_batches and DDP's (and FSDP's)
    # 1 / world_size averaging. Losses stay pure functions of their `normalizer`; a stage hands its loss to
    # `log_loss`, which logs the step's token mean.
    # Manual optimisation (GRPO) steps inside training_step and normalises each of its updates itself.

    def token_normalizer(self, mask: torch.Tensor) -> float:
        """The `normalizer` of a token-mean loss over `mask`'s tokens (call once per loss): a constant of the
        run, with the tokens counted towards the optimiser step's global count (see the note above)."""
        self._step_tokens += mask.sum().detach().to(self._step_tokens)
        return self._loss_scale

    def _reset_step_totals(self) -> None:
        # the step's loss sum and token count, local to this process until on_before_optimizer_step
        self._step_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self._step_tokens = torch.zeros((), dtype=torch.float64, device=self.device)

    def log_loss(self, loss: torch.Tensor) -> None:
        """Record a loss normalised by `token_normalizer`: `train/loss` is logged at the optimiser step, as the
        token mean over all of its micro-batches and ranks."""
        self._step_loss += loss.detach().to(self._step_loss) * self._loss_scale

    def on_before_optimizer_step(self, optimizer) -> None:
        if not self.automatic_optimization:
            return
        totals = torch.stack([self._step_loss, self._step_tokens])
        if self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        loss_sum, tokens = totals.tolist()
        self._reset_step_totals()
        tokens = max(tokens, 1.0)  # a step with no loss token (all filtered out) has zero gradients anyway
        scale = self._loss_scale * self.trainer.accumulate_grad_batches * self.trainer.world_size / tokens
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        # the token mean over the whole step: every micro-batch and rank
        self.log("train/loss", loss_sum / tokens, prog_bar=True)

    def log_across_ranks(self, metrics: dict[str, torch.Tensor | float], **kwargs) -> None:
        """Log this rank's figures reduced across ranks: their mean (``*_max`` figures: their maximum), so that under
        data parallelism the logs speak for every rank's rows, not rank 0's alone. Every rank holds the same number
        of rows, so a row mean is the global one; a token mean becomes the mean of the ranks' token means. One
        collective per figure: every rank must log the same names (never names that depend on the batch)."""
        for name, value in metrics.items():
            reduce_fx = "max" if name.endswith("_max") else "mean"
            self.log(name, value, sync_dist=True, reduce_fx=reduce_fx, **kwargs)

    def batch_position(self, cursor: int | None = None) -> tuple[int, int]:
        """(optimiser step, index of its first row in the step's global batch) of this rank's training
        micro-batch `cursor` (counted since the run started; default: the one in training now)."""
        if cursor is None:
            cursor = self.trainer.fit_loop.total_batch_idx  # restored on resume, like the loader's cursor
        return self.trainer.datamodule.layout().position(cursor)

    def rollout_uniforms(self, seed: int, purpose: str, prompts: int, config: SamplingConfig, cursor=None):
        """The sampling uniforms of micro-batch `cursor`'s `prompts × num_samples` rollout rows, each seeded by its
        global row in the optimiser step (`seeding.row_uniforms`): the same samples at any decomposition."""
        if config.greedy:
            return None
        step, first = self.batch_position(cursor)
        g = config.num_samples
        rows = range(first * g, (first + prompts) * g)
        return row_uniforms(seed, purpose, step, rows, config.max_new_tokens, self.device)

    def sample(self, policy, batch: PromptBatch, config: SamplingConfig, generator=None, uniforms=None):
        """Roll out `policy` on the batch's prompts, in lockstep across ranks when data-parallel."""
        if self.trainer.world_size > 1 and not config.sync_ranks:
            config = SamplingConfig(**{**config.__dict__, "sync_ranks": True})
        return generate(
            policy, batch.prompt_ids, batch.prompt_mask, config, eos_token_id=self.eos_token_ids,
            pad_token_id=self.tokenizer.pad_token_id, domains=batch.domains, generator=generator,
            uniforms=uniforms, tokenizer=self.tokenizer,  # stop strings are matched on decoded text
        )

    # --------------------------------------------------------------------------- validation by generation

    def log_val_metrics(self, metrics: dict[str, torch.Tensor], prog_bar: tuple[str, ...] = ()) -> None:
        """Log epoch-level validation metrics (already reduced across ranks by torchmetrics).

        Lightning discards what is logged during the sanity check, but with `num_sanity_val_steps: -1`
        that pass is the "before training" point of every curve, so it goes straight to the logger at step 0.
        """
        if not self.trainer.sanity_checking:
            for name, value in metrics.items():
                self.log(name, value, prog_bar=name in prog_bar)
        elif self.logger is not None and self.trainer.is_global_zero:
            self.logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=0)

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        # the same function scores the pipeline's final table (opd_lightning.report): one evaluation path
        completions, scores = greedy_exact(
            lambda b, config: self.sample(self.policy, b, config), self.tokenizer, batch,
            self.eval_max_new_tokens(),
        )  # fmt: skip
        scores = scores.to(self.device)
        aligned = batch.aligned.tolist()
        self.val_accuracy.update(scores, [d if a else f"ood/{d}" for d, a in zip(batch.domains, aligned)])
        self.val_accuracy.update(scores[batch.aligned.to(scores.device)], ["*"] * sum(aligned))
        self.val_task_accuracy.update(scores, batch.tasks)
        shown: dict[str, int] = {}
        for task, entry, text, s in zip(batch.tasks, batch.entries, completions, scores.tolist()):
            if len(self._val_samples) < 64 and shown.get(task, 0) < self.eval_config.samples_to_log:
                shown[task] = shown.get(task, 0) + 1
                self._val_samples.append(
                    f"| {task} | {entry['question'][:120]!r} | {text!r} | {entry['answer']!r} | {s:.2f} |"
                )

    def on_validation_epoch_end(self) -> None:
        metrics = {f"val/task_accuracy/{t}": v for t, v in self.val_task_accuracy.compute().items()}
        for key, value in self.val_accuracy.compute().items():  # reduced across ranks
            if key == "*":
                metrics["val/accuracy"] = value
            elif key.startswith("ood/"):
                metrics[f"val/ood_accuracy/{key.removeprefix('ood/')}"] = value
            else:
                metrics[f"val/accuracy/{key}"] = value
        self.log_val_metrics(metrics, prog_bar=("val/accuracy",))
        self.val_accuracy.reset()
        self.val_task_accuracy.reset()
        if self._val_samples and isinstance(self.logger, TensorBoardLogger) and self.trainer.is_global_zero:
            table = "| task | prompt | completion | reference | score |\n|---|---|---|---|---|\n"
            self.logger.experiment.add_text("val/samples", table + "\n".join(self._val_samples), self.global_step)
        self._val_samples = []
