"""Callbacks: export of the trained policy in Hugging Face format."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import lightning as L
import torch


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict on CPU. Collective under FSDP2: call it on every rank."""
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # The gather returns tied parameters (an LM head sharing the embedding) as separate copies; one tensor
        # under both names again, so save_pretrained writes it once, as a single-process export does.
        first: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if id(param) in first and name in state:
                state[name] = state[first[id(param)]]
            first.setdefault(id(param), name)
        return state  # empty on ranks other than 0

    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_hf(model: torch.nn.Module, tokenizer, out_dir: str | os.PathLike, state_dict=None) -> Path:
    """`save_pretrained` of model + tokenizer into `out_dir`, atomically (temp dir, then rename), so a
    crash mid-write never leaves a half-written folder that `from_pretrained` would half-load."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class HFExport(L.Callback):
    """At the end of `fit`, write the policy and tokenizer as a Hugging Face folder that
    `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` load back.

    Args:
        dirpath: where to write; default `<run log dir>/hf`.
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath
        self.last_export: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state_dict = full_state_dict(pl_module.policy)  # every rank joins the gather
        if trainer.is_global_zero:
            out = Path(self.dirpath) if self.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "hf"
            self.last_export = save_hf(pl_module.policy, pl_module.tokenizer, out, state_dict=state_dict)
            print(f"[opd] exported the trained policy in HF format to {self.last_export}")
        trainer.strategy.barrier("hf_export")


class HParamsWithFinalMetrics(L.Callback):
    """At the end of `fit`, record the run's hyper-parameters with its final validation metrics, so
    TensorBoard's HPARAMS view lists every stage's settings next to the accuracy they reached.

    The view reads only a run's first hyper-parameter record (so the logger must not write one at fit start:
    `default_hp_metric: false` in configs/tiny/defaults.yaml) and takes each metric's value from the run's own
    scalars of that tag. The record is therefore written here without the metric values that
    `TensorBoardLogger.log_hyperparams(params, metrics)` would log again as scalars: a second point per curve."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
        from lightning.pytorch.loggers import TensorBoardLogger
        from torch.utils.tensorboard.summary import hparams

        logger = trainer.logger
        if not isinstance(logger, TensorBoardLogger) or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        params = dict(pl_module.hparams)
        if trainer.datamodule is not None:
            params.update({f"data.{k}": v for k, v in trainer.datamodule.hparams.items()})
        params.update(max_steps=trainer.max_steps, global_step=trainer.global_step)
        # the flattening and sanitising TensorBoardLogger.log_hyperparams applies, without its log_metrics
        params = logger._sanitize_params(_flatten_dict(_convert_params(params)))
        writer = logger.experiment._get_file_writer()
        for summary in hparams(params, metrics):
            writer.add_summary(summary, trainer.global_step)
