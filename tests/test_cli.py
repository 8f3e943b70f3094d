"""The `opd` CLI: every YAML under configs/ builds, and bad input fails before any training."""

import os
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import yaml

from opd_lightning.cli import build_cli, main
from opd_lightning.sharding import ShardingConfig

REPO = Path(__file__).parents[1]
CONFIGS = sorted(str(p) for p in (REPO / "configs").rglob("*.yaml"))
STRATEGY_OVERLAYS = [c for c in CONFIGS if "/strategy/" in c]
DEFAULTS = next(c for c in CONFIGS if c.endswith("tiny/defaults.yaml"))  # every tiny stage's first config
QUICK = next(c for c in CONFIGS if c.endswith("tiny/quick.yaml"))  # the pipeline's --quick overlay
STAGE_CONFIGS = [c for c in CONFIGS if c not in (*STRATEGY_OVERLAYS, QUICK) and not c.endswith("/defaults.yaml")]
BASE_YAML = next(c for c in STAGE_CONFIGS if c.endswith("tiny/base.yaml"))
BASE = ["--config", DEFAULTS, "--config", BASE_YAML]  # `opd fit` of the pipeline's first stage


def model_path_overrides(config: str, tiny_dir) -> list[str]:
    """Point every model path of a config at the test's tiny model, so nothing is built inside the repo
    and configs that start from a previous stage's output build without running that stage."""
    init = yaml.safe_load(Path(config).read_text())["model"]["init_args"]
    args = [f"--model.init_args.model={tiny_dir}", "--model.init_args.tiny_size=null"]
    for key in ("ref_model",):
        if init.get(key):
            args.append(f"--model.init_args.{key}={tiny_dir}")
    if isinstance(init.get("teachers"), dict):
        args += [f"--model.init_args.teachers.{domain}={tiny_dir}" for domain in init["teachers"]]
    return args


def own_command(config: str) -> list[str]:
    """The `--config` arguments of the command a stage YAML begins with (`# opd fit --config ... --config ...`)."""
    words = Path(config).read_text().splitlines()[0].removeprefix("# opd fit ").split()
    files = words[1::2]
    assert words[::2] == ["--config"] * len(files) and Path(config).relative_to(REPO).as_posix() in files, words
    return [arg for f in files for arg in ("--config", str(REPO / f))]


def test_configs_are_found():
    assert any(c.endswith("tiny/opd.yaml") for c in STAGE_CONFIGS) and len(STAGE_CONFIGS) >= 9
    assert any(c.endswith("qwen3/opd.yaml") for c in STAGE_CONFIGS)


@pytest.mark.parametrize("config", STAGE_CONFIGS, ids=lambda c: Path(c).relative_to(Path(c).parents[1]).as_posix())
def test_every_config_builds_with_the_cli(config, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative outputs (runs/, artifacts/) land in the test's dir
    command = own_command(config)
    # Real-checkpoint configs (configs/qwen3/) name GPUs and local Qwen3 folders this machine does not have:
    # they build with the tiny model in place of every checkpoint, on the CPU (nothing starts before fit).
    cpu = ["--trainer.accelerator=cpu"] if "/qwen3/" in config else []
    cli = build_cli([*command, *model_path_overrides(config, tiny_dir), *cpu], run=False)
    if "/qwen3/" in config:  # their command adds the FSDP2 GPU overlay: bf16 compute, sharded over 8 GPUs
        assert type(cli.trainer.strategy).__name__ == "ModelParallelStrategy" and cli.trainer.num_devices == 8
        assert cli.model.sharding.param_dtype == "bfloat16" and cli.model.hparams.gradient_checkpointing
    assert cli.model.policy is None, "weights load in configure_model, not at parse time"
    assert cli.datamodule.tokenizer is cli.model.tokenizer, "the tokenizer is linked, not repeated"
    assert cli.datamodule.train_format == cli.model.train_format


@pytest.mark.parametrize("overlay", STRATEGY_OVERLAYS, ids=lambda c: Path(c).name)
def test_strategy_overlays_build_on_top_of_a_stage_config(overlay, tiny_dir, tmp_path, monkeypatch):
    import yaml
    from lightning.pytorch.strategies import StrategyRegistry

    monkeypatch.chdir(tmp_path)
    wanted = yaml.safe_load(Path(overlay).read_text())["trainer"]
    # GPU overlays build here with their accelerator swapped for the CPU: nothing starts before fit
    cpu = ["--trainer.accelerator=cpu"] if wanted.get("accelerator") == "gpu" else []
    cli = build_cli([*BASE, "--config", overlay, *model_path_overrides(BASE_YAML, tiny_dir), *cpu], run=False)
    # the overlay's values win over the base config's (devices: 1, single-device strategy)
    strategy = wanted["strategy"]
    if isinstance(strategy, str):
        assert isinstance(cli.trainer.strategy, StrategyRegistry[strategy]["strategy"])
    else:  # class_path + init_args
        assert type(cli.trainer.strategy).__name__ == strategy["class_path"].rpartition(".")[2]
        data_parallel = strategy["init_args"]["data_parallel_size"]
        assert data_parallel == wanted["devices"] * wanted["num_nodes"], "FSDP2 shards over every process"
    assert (cli.trainer.num_devices, cli.trainer.num_nodes) == (wanted["devices"], wanted["num_nodes"])
    assert cli.trainer.world_size == wanted["devices"] * wanted["num_nodes"]
    init_args = yaml.safe_load(Path(overlay).read_text()).get("model", {}).get("init_args", {})
    if "sharding" in init_args:
        assert cli.model.sharding == ShardingConfig(**init_args.pop("sharding"))
    for key, value in init_args.items():
        assert cli.model.hparams[key] == value, key


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


# --------------------------------------------------------------------------------------- resume


class KillAt(L.Callback):
    """SIGKILLs its own process when training reaches `step` (after that step's checkpoint is written): a
    pre-empted job, with no clean-up of any kind."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def tiny_overlay(path: Path, tiny_dir, kill_at: int | None = None) -> str:
    """Shrinks configs/tiny/base.yaml to seconds: 4 steps of 8 one-digit sums, a checkpoint every step."""
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"save_last": True, "every_n_train_steps": 1, "save_top_k": 1}}]
    if kill_at is not None:
        callbacks.append({"class_path": "tests.test_cli.KillAt", "init_args": {"step": kill_at}})
    overlay = {
        "trainer": {"max_steps": 4, "num_sanity_val_steps": 0, "limit_val_batches": 0, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False, "callbacks": callbacks},
        "model": {"init_args": {"model": str(tiny_dir), "tiny_size": None}},
        "data": {"tasks": [{"name": "basic_arithmetic", "domain": "math", "size": 200, "val_size": 4,
                            "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1,
                                       "operators": ["+"]}}],
                 "domain_weights": {"math": 1.0}, "batch_size": 8,
                 "steps_per_epoch": 3},  # the kill and the resume fall in different epochs
    }
    path.write_text(yaml.safe_dump(overlay))
    return str(path)


def opd_fit(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`opd fit --config configs/tiny/base.yaml ...` as a user runs it, from `cwd` (runs/ and artifacts/ land there)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cwd.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "opd_lightning.cli", "fit", *BASE, *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def scalars(version_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in sorted(version_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        out.update({e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {})
    return out


def test_ckpt_path_last_resumes_a_killed_run_in_its_own_version_folder(tiny_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    killed, straight = tmp_path / "killed", tmp_path / "straight"
    first = opd_fit(killed, "--config", tiny_overlay(tmp_path / "kill.yaml", tiny_dir, kill_at=2), "--ckpt_path", "last")
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert "no checkpoint under runs/base/*/checkpoints/, so this is a FRESH run" in first.stderr
    run_dir = killed / "runs" / "base" / "version_0"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2

    resumed = opd_fit(killed, "--config", tiny_overlay(tmp_path / "go.yaml", tiny_dir), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from runs/base/version_0/checkpoints/last.ckpt" in resumed.stderr
    assert sorted(p.name for p in (killed / "runs" / "base").iterdir()) == ["version_0"], "no new version folder"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4

    # the interrupted run, resumed, is the uninterrupted run: same curve in one folder, same weights
    assert opd_fit(straight, "--config", str(tmp_path / "go.yaml")).returncode == 0
    curve = scalars(run_dir, "train/loss")
    assert sorted(curve) == [0, 1, 2, 3], "TensorBoard's curve continues in the run's folder"
    assert curve == scalars(straight / "runs" / "base" / "version_0", "train/loss")
    a = load_file(killed / "artifacts" / "base" / "hf" / "model.safetensors")
    b = load_file(straight / "artifacts" / "base" / "hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp_overlay_trains_and_ckpt_path_last_resumes_its_sharded_checkpoint(tiny_dir, tmp_path):
    import torch

    fsdp = ["--config", str(REPO / "configs" / "strategy" / "fsdp.yaml"), "--trainer.strategy.init_args.timeout=0:01:00"]
    overlay = tiny_overlay(tmp_path / "go.yaml", tiny_dir)
    first = opd_fit(tmp_path, "--config", overlay, *fsdp, "--trainer.max_steps=2", "--ckpt_path", "last")
    assert first.returncode == 0, first.stderr[-3000:]
    last = tmp_path / "runs" / "base" / "version_0" / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"], "one shard per rank"
    resumed = opd_fit(tmp_path, "--config", overlay, *fsdp, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from runs/base/version_0/checkpoints/last.ckpt" in resumed.stderr, "a sharded last.ckpt is found"
    assert torch.load(last / "meta.pt", weights_only=False)["global_step"] == 4
    assert (tmp_path / "artifacts" / "base" / "hf" / "model.safetensors").exists(), "rank 0 exported the policy"


def test_ckpt_path_last_with_checkpoints_but_no_last_is_refused(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    stale = tmp_path / "runs" / "base" / "version_3" / "checkpoints" / "epoch=0-step=300.ckpt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *BASE, *model_path_overrides(BASE_YAML, tiny_dir), "--ckpt_path", "last"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "has checkpoints (runs/base/version_3/checkpoints/epoch=0-step=300.ckpt) but no last.ckpt" in err


# --------------------------------------------------------------------------------------- refusals


def refusal(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_, mock.patch.object(sys, "argv", ["opd"]):
        main(["fit", *args])
    assert exit_.value.code == 2
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Namespace(" not in text and "Traceback" not in text and "Given value" not in text, text
    assert len(out.err.strip().splitlines()) <= 3, out.err
    return out.err


def test_refusals_are_a_few_lines_naming_the_field(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny = model_path_overrides(BASE_YAML, tiny_dir)
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  init_args:\n    learning_rate: 0.1\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?" "answer": "4"}\n')
    cases = [
        ([*BASE, *tiny, "--config", str(typo)], ["model:", "'learning_rate' is not accepted"]),
        ([*BASE, *tiny, "--data.batch_sise=3"], ["--data.batch_sise"]),
        ([*BASE, *tiny, "--data.ood_ratio=1.5"], ["data.ood_ratio must be in [0, 1]"]),
        ([*BASE, *tiny, f'--data.tasks=[{{"name": "mine", "domain": "math", "path": "{bad}"}}]'],
         ["data.tasks[0].path=", "line 2 is not valid JSON", "Fix that line"]),
        # raised in the DataModule's set-up, inside `fit`
        ([*BASE, *tiny, "--data.max_prompt_length=5"], ["data.max_prompt_length=5 is shorter"]),
    ]
    for args, expected in cases:
        err = refusal(capsys, args)
        assert all(e in err for e in expected), (expected, err)
    assert not any(tmp_path.glob("runs/*/version_*")), "a refused run leaves no log folder behind"


def test_null_in_a_dataclass_option_on_the_command_line_is_refused_not_read_as_the_text_none(
    tiny_dir, tmp_path, monkeypatch, capsys
):
    # jsonargparse turns `=null` inside a dataclass option of a class_path model into the text 'None': before,
    # cold_start.cache_dir=null wrote the teacher-sample cache into a folder named "None"
    monkeypatch.chdir(tmp_path)
    yaml = str(REPO / "configs" / "tiny" / "cold_start.yaml")
    args = ["--config", DEFAULTS, "--config", yaml, *model_path_overrides(yaml, tiny_dir)]
    err = refusal(capsys, [*args, "--model.init_args.cold_start.cache_dir=null"])
    assert "model.init_args.cold_start.cache_dir: the text 'None'" in err
    assert """--model.init_args.cold_start='{"cache_dir": null}'""" in err
    assert not (tmp_path / "None").exists()


def test_a_refusal_from_a_stage_set_up_removes_the_run_folder_it_created(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    opd_yaml = str(REPO / "configs" / "tiny" / "opd.yaml")
    rows = tmp_path / "rows.jsonl"  # per-row domains reach the teacher routes
    rows.write_text("".join(f'{{"question": "{i} + 1?", "answer": "{i + 1}", "domain": "{d}"}}\n'
                            for i, d in enumerate(["math", "string"] * 10)))
    task = f'{{"name": "rows", "path": "{rows}", "domain_field": "domain", "val_size": 2}}'
    args = ["--config", DEFAULTS, "--config", opd_yaml, f"--model.init_args.model={tiny_dir}", f"--data.tasks=[{task}]",
            "--data.ood_ratio=0", f'--model.init_args.teachers={{"math": "{tiny_dir}"}}']  # none for `string`
    err = refusal(capsys, args)
    assert "['string'] with no teacher in model.init_args.teachers" in err
    assert not (tmp_path / "runs").exists(), "the config.yaml Lightning wrote at set-up is gone with its folder"


def test_a_missing_pipeline_artifact_names_the_stage_that_makes_it(tmp_path):
    """The math expert's GRPO stage before the pipeline made its SFT export, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "opd_lightning.cli", "fit", "--config", DEFAULTS, "--config",
                           str(REPO / "configs" / "tiny" / "expert_grpo_math.yaml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert len((done.stdout + done.stderr).strip().splitlines()) < 10 and "Traceback" not in done.stderr
    assert "model.init_args.model='artifacts/expert/math/sft/hf': no such local folder" in done.stderr
    assert "expert_sft_math.yaml` first" in done.stderr
    assert "opd-tiny" not in done.stderr, "an untrained tiny model is no expert"
    assert not any(tmp_path.iterdir()), "nothing written"


def test_the_readme_prompts_example_builds_with_its_per_row_domains(tiny_dir, monkeypatch):
    monkeypatch.chdir(REPO)  # run as the README runs it, from the repo root (run=False writes nothing)
    cli = build_cli([*BASE, "--config", "examples/my_prompts.yaml",
                     *model_path_overrides(BASE_YAML, tiny_dir)], run=False)
    data = cli.datamodule
    assert [s.name for s in data.specs] == ["my_prompts"] and data.domains == ["math", "string"]
    data.setup("fit")
    assert {e.domain for e in data.val_examples} <= {"math", "string"} and len(data.val_examples) == 8
    batch = next(iter(data.train_dataloader()))  # SFT: prompt + answer batches
    assert set(batch.domains) == {"math", "string"}
    assert all(("plus" in e.entry["question"]) == (e.domain == "math") for e in data.train_pools["my_prompts"])
