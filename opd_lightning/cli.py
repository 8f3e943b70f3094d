"""`opd`: one LightningCLI for every stage; the YAML's `model.class_path` picks the stage.

    opd fit --config configs/tiny/defaults.yaml --config configs/tiny/base.yaml
    opd fit --config configs/tiny/defaults.yaml --config configs/tiny/base.yaml --ckpt_path last   # resume
    opd fit --config configs/tiny/defaults.yaml --config configs/tiny/opd.yaml --config configs/strategy/ddp.yaml

Resume. `--ckpt_path last` continues the run's newest `last.ckpt`: Lightning alone would look for it in the
*new* `version_N` folder the logger is about to open, find nothing and train from scratch. Here the logger's
version folders (`<save_dir>/<name>/version_*`) are searched, the newest `checkpoints/last*.ckpt` is loaded
and the logger is pinned to its folder, so TensorBoard curves continue where they stopped. Checkpoints but
no `last.ckpt` (`save_last` off) is a refusal that names the files. No checkpoint at all starts a fresh run
with a warning naming the folder searched: `last` is the "resume if there is anything to resume" flag a
requeued job passes on every launch, first one included, so refusing would break that use; the warning
makes a wrong `save_dir`/`name` visible. A `ModelCheckpoint` with its own `dirpath` is Lightning's case
(it finds `last.ckpt` there; the logger opens a new version folder). A pinned `logger.version` is kept.

Check. `opd check --config ... [overrides]` parses the same config, loads the models and data, trains nothing,
writes no run, and prints a table of what would doom the run (tokenizers, routes, lengths, on-policy sampling,
a self-distillation sanity check, a student/teacher overlap probe, memory and step time): opd_lightning/check.py.

Refusals. Bad input (a typo'd key, a wrong type, a missing folder, a bad value raised by a stage's or the
DataModule's constructor or set-up) ends in a few lines on stderr, `error: <what is wrong, which field, what
to do>`, and exit status 2, without traceback or parser dump; the run's fresh log folder is removed.
`OPD_TRACEBACK=1` re-raises with the full traceback instead.
"""

from __future__ import annotations

import os

# Quieter and never online: the kit loads every model from a local path.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jsonargparse  # noqa: E402
from jsonargparse import Namespace  # noqa: E402
from lightning.fabric.utilities.exceptions import MisconfigurationException  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402

import opd_lightning  # noqa: E402
from opd_lightning.callbacks import HFExport, HParamsWithFinalMetrics  # noqa: E402
from opd_lightning.dashboard import DashboardLayout  # noqa: E402
from opd_lightning.data import PromptDataModule  # noqa: E402
from opd_lightning.stages.base import PolicyModule  # noqa: E402

# Errors that mean "the input is wrong", as opposed to a bug (whose traceback is kept).
_REFUSALS = (ValueError, OSError, MisconfigurationException)
_JSONARGPARSE_DIR = str(Path(jsonargparse.__file__).parent)
_PACKAGE_DIR = str(Path(opd_lightning.__file__).parent)
# Lines of jsonargparse's union reports that say nothing about what is wrong.
_NOISE = re.compile(
    r"^\s*(-\s*)?(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value( type)?:|"
    r"Expected a <class 'NoneType'>|Expected a path but)"
)


@rank_zero_only
def _say(message: str) -> None:
    print(f"[opd] {message}", file=sys.stderr)


def refuse(message: str) -> None:
    """End the command on bad input: one `error:` message, exit status 2 (argparse's usage-error code)."""
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def short_parser_message(message: str) -> str:
    """jsonargparse's report without its union bookkeeping: `model: <class>: Option 'lr' is not accepted`."""
    parts = []
    for line in message.splitlines():
        if not line.strip() or _NOISE.match(line):
            continue
        line = re.sub(r'^Parser key "([^"]+)":', r"\1:", line.strip())
        line = re.sub(r"^-\s*Problem with given class_path '([^']+)':", r"\1:", line)
        parts.append(line.removeprefix("- "))
    return " ".join(parts)


class OPDArgumentParser(LightningArgumentParser):
    def error(self, message: str, ex: Exception | None = None):
        # nested parsers raise (exit_on_error off) and their caller reports; only the top one prints
        if not self.exit_on_error or os.environ.get("OPD_TRACEBACK"):
            return super().error(message, ex)
        self._logger.error(message)
        command = self.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {short_parser_message(message)}\ntip: `{command} --help` lists every option\n")
        sys.exit(2)


def _raised_in(err: BaseException, folder: str) -> bool:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(folder)


def user_error(err: BaseException, *, ours_only: bool) -> BaseException | None:
    """The refusal inside `err` (jsonargparse wraps a constructor's error in a union report that dumps the
    whole Namespace): the first error of the cause chain not raised by jsonargparse itself. `ours_only`
    keeps only those raised by this package (or Lightning's configuration checks)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, _REFUSALS) and not _raised_in(err, _JSONARGPARSE_DIR):
            if not ours_only or _raised_in(err, _PACKAGE_DIR) or isinstance(err, MisconfigurationException):
                return err
        err = err.__cause__ or err.__context__
    return None


def _refuse_none_text(cfg: Namespace, prefix: str = "") -> None:
    """Refuse the text 'None' anywhere in the config. jsonargparse (4.53) turns `--a.init_args.b.c=null` on the
    command line into the string 'None' when `c` is a field of a dataclass argument of a class_path model: a
    cache_dir: null then writes a folder named None. (In YAML, `None` is the text 'None' too; null is null.)"""
    for key, value in vars(cfg).items():
        name = f"{prefix}{key}"
        if isinstance(value, Namespace):
            _refuse_none_text(value, f"{name}.")
        elif value == "None":
            parent, _, field = name.rpartition(".")
            refuse(
                f"{name}: the text 'None'. For no value write null in YAML; on the command line, where "
                f"--{name}=null arrives as the text 'None' inside a dataclass option, write "
                f"--{parent}='{{\"{field}\": null}}' or set it in a YAML file."
            )


def _created_root(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet: what a run writing to `path` would create."""
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


class OPDCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Always on, configurable as `export:` in YAML (dirpath defaults to <run log dir>/hf).
        parser.add_lightning_class_args(HFExport, "export")
        # Said once: the data pipeline uses the policy's own tokenizer, and the stage decides whether it
        # trains on prompt+answer (SFT, ColdStart) or prompts only (GRPO, OPD).
        parser.link_arguments("model.tokenizer", "data.tokenizer", apply_on="instantiate")
        parser.link_arguments("model.train_format", "data.train_format", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        if self.subcommand is not None:
            _refuse_none_text(self.config[self.subcommand])
        if self.subcommand is not None and self.config[self.subcommand].get("ckpt_path") == "last":
            self._resolve_last_checkpoint(self.config[self.subcommand])

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except _REFUSALS as err:
            cause = user_error(err, ours_only=False)
            if cause is None or os.environ.get("OPD_TRACEBACK"):
                raise
            refuse(str(cause))

    def fit(self, **kwargs) -> None:
        trainer = self.trainer
        created = _created_root(Path(trainer.log_dir)) if trainer.log_dir else None
        try:
            trainer.fit(**kwargs)
        except _REFUSALS as err:
            # refusals come from set-up hooks (data, routes, context length), before any batch is drawn
            cause = user_error(err, ours_only=True) if trainer.state.stage is None else None
            if cause is None or os.environ.get("OPD_TRACEBACK"):
                raise
            if created is not None and trainer.is_global_zero and not any(created.rglob("*.ckpt")):
                shutil.rmtree(created, ignore_errors=True)  # the config.yaml of a run that never started
            refuse(str(cause))

    # ----------------------------------------------------------------------------------------- resume

    def _resolve_last_checkpoint(self, cfg: Namespace) -> None:
        """See the module docstring: find the newest `last*.ckpt` of the logger's runs and pin the logger."""
        callbacks = cfg.trainer.callbacks or []
        checkpoints = [cb for cb in callbacks if _is_a(cb.class_path, ModelCheckpoint)]
        if checkpoints and all(cb.init_args.dirpath for cb in checkpoints):
            return  # checkpoints do not move with the logger's version: Lightning's own search finds them
        loggers = cfg.trainer.logger if isinstance(cfg.trainer.logger, list) else [cfg.trainer.logger]
        logger = loggers[0] if loggers else False
        if logger is False:
            return  # no logger: checkpoints live in <default_root_dir>/checkpoints, where Lightning looks
        if logger is None or logger is True:  # Lightning's default logger, made explicit so it can be pinned
            logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                               init_args=Namespace(save_dir=cfg.trainer.default_root_dir or ".",
                                                   name="lightning_logs", version=None))
            cfg.trainer.logger = [logger, *loggers[1:]] if len(loggers) > 1 else logger
        if not _is_a(logger.class_path, (TensorBoardLogger, CSVLogger)):
            refuse(
                f"--ckpt_path last: the first trainer.logger ({logger.class_path}) is not a "
                "TensorBoardLogger or CSVLogger, so its run folder cannot be found; pass the checkpoint file: "
                "--ckpt_path <save_dir>/<name>/version_N/checkpoints/last.ckpt"
            )
        args = logger.init_args
        if args.version is not None:
            return  # a pinned version folder is where Lightning already looks
        root = Path(args.save_dir or cfg.trainer.default_root_dir or ".") / (args.name or "")
        found = list(root.glob("*/checkpoints/*.ckpt"))  # files, or folders of per-rank shards (FSDP2)
        last = [p for p in found if p.stem.startswith("last")]
        if not last and found:
            refuse(
                f"--ckpt_path last: {root}/ has checkpoints ({', '.join(sorted(str(p) for p in found)[:3])}) but no "
                "last.ckpt (ModelCheckpoint save_last is off); pass one of them with --ckpt_path <file>"
            )
        if not last:
            _say(f"warning: --ckpt_path last: no checkpoint under {root}/*/checkpoints/, so this is a FRESH run "
                 "(check trainer.logger's save_dir and name if you meant to resume)")
            cfg.ckpt_path = None
            return
        # a sharded checkpoint's folder keeps its time when its files are rewritten; its meta.pt is rewritten
        newest = max(last, key=lambda p: (p / "meta.pt" if p.is_dir() else p).stat().st_mtime)
        version = newest.parent.parent.name
        match = re.fullmatch(r"version_(\d+)", version)
        args.version = int(match.group(1)) if match else version
        cfg.ckpt_path = str(newest)
        _say(f"resuming from {newest}; logging on in {newest.parent.parent}")


def _is_a(class_path: str, base: type | tuple[type, ...]) -> bool:
    module, _, name = class_path.rpartition(".")  # jsonargparse has resolved it to a full import path
    return issubclass(getattr(importlib.import_module(module), name), base)


def build_cli(args=None, run: bool = True, cli_class: type[OPDCLI] = OPDCLI, **kwargs) -> OPDCLI:
    return cli_class(
        PolicyModule,
        PromptDataModule,
        subclass_mode_model=True,
        parser_class=OPDArgumentParser,
        save_config_kwargs={"overwrite": True},
        # always on, after the YAML's callbacks: the HPARAMS view gets every run's settings and final metrics,
        # the CUSTOM SCALARS tab the per-domain / per-teacher charts
        trainer_defaults={"callbacks": [HParamsWithFinalMetrics(), DashboardLayout()]},
        args=args,
        run=run,
        **kwargs,
    )


def main(args=None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["check"]:  # `opd fit`'s parser without running fit: opd_lightning/check.py
        from opd_lightning.check import check_main

        return check_main(argv[1:])
    if argv[:1] in (["-h"], ["--help"]) or not argv:  # LightningCLI lists only its own subcommands
        print("opd check --config X.yaml [overrides]: check a stage's config, models and data before a run "
              "(trains nothing, writes nothing); opd check --help for its options\n")
    build_cli(args)


if __name__ == "__main__":
    main()
