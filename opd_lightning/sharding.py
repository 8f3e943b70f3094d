"""FSDP2 for the policy and its frozen models, the Lightning way (``configs/strategy/fsdp*.yaml``).

Lightning's ``ModelParallelStrategy`` starts the processes, builds the device mesh and calls the stage's
``configure_model``; there :class:`opd_lightning.stages.base.PolicyModule` calls :func:`shard_model` on the
policy and on every frozen model (teachers, reference): ``fully_shard`` on each decoder layer (the classes the
HF model names in ``_no_split_modules``), then on the root. Each rank then holds ``1 / world`` of every model,
so a teacher larger than one device fits, and frozen models keep no gradients or optimiser state.

A sharded forward is a collective (each layer all-gathers its parameters), so every rank must run the same
forwards: sampling decodes until every rank is done (``SamplingConfig.sync_ranks``), and a rank with no rows
for a teacher runs a throw-away forward while the others score theirs (:func:`lockstep_counts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["ShardingConfig", "is_sharded", "lockstep_counts", "offload_sharded_parameters", "shard_model"]


def _dtype(name: str | None, field: str) -> torch.dtype | None:
    if name is None:
        return None
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"{field}={name!r} is not a torch floating-point dtype; use bfloat16, float16 or float32")
    return value


@dataclass
class ShardingConfig:
    """How FSDP2 shards the models under ``ModelParallelStrategy`` (ignored by single-device and DDP runs)."""

    param_dtype: str | None = None
    """Mixed precision: the dtype gathered parameters compute in (bfloat16 on GPUs); null = the stored dtype
    (model.init_args.dtype, float32 for an fp32 master copy). Frozen models (teachers, reference) are then
    stored in this dtype too: they take no optimiser step, so they need no float32 copy."""
    reduce_dtype: str | None = None
    """dtype gradients are reduce-scattered in; float32 keeps bf16 training's gradient sums exact enough.
    null = param_dtype."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimiser state in CPU memory (FSDP2's CPUOffloadPolicy); the
    optimiser steps on the CPU. Fits larger models, at the cost of slower steps. GPUs only."""
    reshard_after_forward: bool = True
    """Free each layer's gathered parameters after its forward (ZeRO-3). false keeps the policy's gathered
    until its backward: faster decoding and backward, more memory. Frozen models always free them."""

    def __post_init__(self) -> None:
        _dtype(self.param_dtype, "model.init_args.sharding.param_dtype")
        _dtype(self.reduce_dtype, "model.init_args.sharding.reduce_dtype")

    @property
    def mixed_precision(self) -> bool:
        return self.param_dtype is not None or self.reduce_dtype is not None


def is_sharded(model: nn.Module) -> bool:
    """``fully_shard`` was applied to ``model`` (its parameters are DTensors gathered in every forward)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, mesh, config: ShardingConfig, *, field: str, frozen: bool = False) -> None:
    """``fully_shard`` each decoder layer of an HF causal LM, then the root; a no-op if already sharded
    (Lightning may call ``configure_model`` more than once).

    The root's group holds the embeddings and the LM head, so tied embeddings (one Parameter in two modules)
    stay one sharded parameter. ``field`` names the YAML field the model comes from, for errors.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if is_sharded(model):
        return
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())  # None on some remote-code models
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(
            f"{field}: FSDP2 shards a model layer by layer, and {type(model).__name__} names no decoder-layer "
            f"class (its _no_split_modules is {sorted(layer_classes)}, matching no module). Use "
            "configs/strategy/ddp.yaml for this model, or a model class that declares its layers."
        )
    mp_policy = MixedPrecisionPolicy(
        param_dtype=_dtype(config.param_dtype, "model.init_args.sharding.param_dtype"),
        reduce_dtype=_dtype(config.reduce_dtype, "model.init_args.sharding.reduce_dtype"),
    )
    offload = CPUOffloadPolicy() if config.cpu_offload else OffloadPolicy()
    # A frozen model has no backward to keep gathered parameters for.
    reshard = True if frozen else config.reshard_after_forward
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, offload_policy=offload, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, offload_policy=offload, reshard_after_forward=reshard)


def offload_sharded_parameters(module: nn.Module) -> None:
    """Move the sharded (DTensor) parameters of ``module`` back to CPU memory, buffers staying put.

    ``ModelParallelStrategy`` moves the whole LightningModule to the GPU after ``configure_model``, which
    undoes ``CPUOffloadPolicy`` (FSDP2 then refuses to run: "FSDP parameters should be materialized on CPU").
    Called before the optimiser is built, so its state is created next to the parameters, on the CPU.
    """
    from torch.distributed.tensor import DTensor

    module._apply(lambda t: t.cpu() if isinstance(t, DTensor) else t)


def lockstep_counts(counts: list[int], device: torch.device) -> list[int]:
    """The largest of each count over all ranks (one all-reduce): how many sharded forwards every rank must
    run so that none waits for a parameter gather the others never start."""
    if not (dist.is_available() and dist.is_initialized()) or not counts:
        return counts
    tensor = torch.tensor(counts, dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()
