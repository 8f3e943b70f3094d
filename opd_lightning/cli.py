"""`opd`: one LightningCLI for every stage; the YAML's `model.class_path` picks the stage.

    opd fit --config configs/tiny/sft.yaml
    opd fit --config configs/tiny/sft.yaml --ckpt_path last        # resume
    opd fit --config configs/tiny/opd.yaml --config configs/strategy/ddp.yaml
"""

from __future__ import annotations

import os

# Quieter and never online: the kit loads every model from a local path.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from opd_lightning.callbacks import HFExport  # noqa: E402
from opd_lightning.data import PromptDataModule  # noqa: E402
from opd_lightning.stages.base import PolicyModule  # noqa: E402


class OPDCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Always on, configurable as `export:` in YAML (dirpath defaults to <run log dir>/hf).
        parser.add_lightning_class_args(HFExport, "export")
        # Said once: the data pipeline uses the policy's own tokenizer, and the stage decides whether it
        # trains on prompt+answer (SFT, ColdStart) or prompts only (GRPO, OPD).
        parser.link_arguments("model.tokenizer", "data.tokenizer", apply_on="instantiate")
        parser.link_arguments("model.train_format", "data.train_format", apply_on="instantiate")


def build_cli(args=None, run: bool = True) -> OPDCLI:
    return OPDCLI(
        PolicyModule,
        PromptDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args=None) -> None:
    build_cli(args)


if __name__ == "__main__":
    main()
