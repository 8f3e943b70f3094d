"""The `opd` CLI: every YAML under configs/ builds, and bad input fails before any training."""

from pathlib import Path

import pytest

from opd_lightning.cli import build_cli

CONFIGS = sorted(str(p) for p in (Path(__file__).parents[1] / "configs").rglob("*.yaml"))
STRATEGY_OVERLAYS = [c for c in CONFIGS if "/strategy/" in c]
STAGE_CONFIGS = [c for c in CONFIGS if c not in STRATEGY_OVERLAYS]


def model_path_overrides(config: str, tiny_dir) -> list[str]:
    """Point every model path of a config at the test's tiny model, so nothing is built inside the repo
    and configs that start from a previous stage's output build without running that stage."""
    import yaml

    init = yaml.safe_load(Path(config).read_text())["model"]["init_args"]
    args = [f"--model.init_args.model={tiny_dir}", "--model.init_args.tiny_size=null"]
    for key in ("ref_model",):
        if init.get(key):
            args.append(f"--model.init_args.{key}={tiny_dir}")
    if isinstance(init.get("teachers"), dict):
        args += [f"--model.init_args.teachers.{domain}={tiny_dir}" for domain in init["teachers"]]
    return args


def test_configs_are_found():
    assert any(c.endswith("tiny/sft.yaml") for c in STAGE_CONFIGS)


@pytest.mark.parametrize("config", STAGE_CONFIGS, ids=lambda c: Path(c).relative_to(Path(c).parents[1]).as_posix())
def test_every_config_builds_with_the_cli(config, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative outputs (runs/, artifacts/) land in the test's dir
    cli = build_cli(["--config", config, *model_path_overrides(config, tiny_dir)], run=False)
    assert cli.model.policy is None, "weights load in configure_model, not at parse time"
    assert cli.datamodule.tokenizer is cli.model.tokenizer, "the tokenizer is linked, not repeated"
    assert cli.datamodule.train_format == cli.model.train_format


@pytest.mark.parametrize("overlay", STRATEGY_OVERLAYS, ids=lambda c: Path(c).name)
def test_strategy_overlays_build_on_top_of_a_stage_config(overlay, tiny_dir, tmp_path, monkeypatch):
    import yaml
    from lightning.pytorch.strategies import StrategyRegistry

    monkeypatch.chdir(tmp_path)
    base = next(c for c in STAGE_CONFIGS if c.endswith("tiny/sft.yaml"))
    cli = build_cli(["--config", base, "--config", overlay, *model_path_overrides(base, tiny_dir)], run=False)
    # the overlay's values win over the base config's (devices: 1, single-device strategy)
    wanted = yaml.safe_load(Path(overlay).read_text())["trainer"]
    assert isinstance(cli.trainer.strategy, StrategyRegistry[wanted["strategy"]]["strategy"])
    assert (cli.trainer.num_devices, cli.trainer.num_nodes) == (wanted["devices"], wanted["num_nodes"])
    assert cli.trainer.world_size == wanted["devices"] * wanted["num_nodes"]


def test_unknown_yaml_key_names_the_key(tmp_path, capsys, tiny_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model:\n  class_path: opd_lightning.stages.SFT\n  init_args:\n    model: {tiny_dir}\n"
                   "    learning_rate: 0.1\n")
    with pytest.raises(SystemExit):
        build_cli(["--config", str(bad)], run=False)
    assert "learning_rate" in capsys.readouterr().err


def test_missing_model_path_fails_before_training_and_names_the_field(tmp_path, capsys):
    with pytest.raises((SystemExit, FileNotFoundError, ValueError)) as err:
        build_cli(["--model", "opd_lightning.stages.SFT", f"--model.init_args.model={tmp_path / 'nope'}"], run=False)
    text = str(err.value) + capsys.readouterr().err
    assert "model.init_args.model=" in text and "no such local folder" in text


def test_unknown_task_in_yaml_fails_before_training(tmp_path, tiny_dir, capsys):
    with pytest.raises((SystemExit, ValueError)) as err:
        build_cli(["--model", "opd_lightning.stages.SFT", f"--model.init_args.model={tiny_dir}",
                   '--data.tasks=[{"name": "basic_aritmetic", "domain": "math"}]'], run=False)
    text = str(err.value) + capsys.readouterr().err
    assert "basic_aritmetic" in text and "not a reasoning_gym task" in text
