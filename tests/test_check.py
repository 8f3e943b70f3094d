"""`opd check`: the stage's config read as `opd fit` reads it, models and data loaded, nothing trained or written;
one table, exit 1 when a check fails, each failure a line that names the field and the fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from opd_lightning.cli import main
from opd_lightning.models import load_tokenizer
from tests.test_cli import DEFAULTS, STAGE_CONFIGS, model_path_overrides
from tests.test_frozen_models import copy_weights, edit_tokenizer
from tests.test_teachers import make_teacher

OPD = next(c for c in STAGE_CONFIGS if c.endswith("tiny/opd.yaml"))
SMALL_DATA = {  # the tiny world's two aligned tasks at a size that sets up in a blink
    "data": {
        "tasks": [
            {"name": "basic_arithmetic", "domain": "math", "aligned": True, "size": 300, "val_size": 16,
             "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "operators": ["+"],
                        "allow_parentheses": False, "allow_negation": False}},
            {"name": "word_sequence_reversal", "domain": "string", "aligned": True, "size": 300, "val_size": 16,
             "config": {"min_words": 3, "max_words": 4}},
        ],
        "batch_size": 8,
    }
}  # fmt: skip


def check(capsys, config: str, tiny_dir, *extra: str, small: Path | None = None) -> tuple[int, dict[str, list]]:
    """Run `opd check`; its exit status and ``{check: [(status, detail), ...]}`` read back from the table."""
    args = ["check", "--config", DEFAULTS, "--config", config]
    if small is not None:
        small.write_text(yaml.safe_dump(SMALL_DATA))
        args += ["--config", str(small)]
    with pytest.raises(SystemExit) as info:
        main([*args, *model_path_overrides(config, tiny_dir), *extra])
    out = capsys.readouterr().out
    table = out[out.index("check ") :]
    rows: dict[str, list] = {}
    name = None
    for line in table.splitlines()[1:-1]:
        match = re.match(r"^(\S.*?)\s{2,}(ok|warn|FAIL|skip)\s+(.*)$", line)
        if match:
            name = match.group(1)
            rows.setdefault(name, []).append([match.group(2), match.group(3)])
        else:  # a detail's continuation line
            rows[name][-1][1] += "\n" + line.strip()
    return info.value.code, rows


def status(rows, name: str) -> list[str]:
    return [s for s, _ in rows[name]]


@pytest.fixture(scope="module")
def peaked_dir(tiny_dir, tmp_path_factory):
    """A tiny model with peaked next-token distributions, as a trained one has (a random one is near uniform,
    which the probe flags: such a teacher has nothing to teach)."""
    return make_teacher(tiny_dir, tmp_path_factory.mktemp("peaked") / "hf", seed=0, sharpen=16.0)


def test_check_passes_on_the_tiny_opd_config_and_writes_nothing(capsys, peaked_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's relative outputs (runs/, artifacts/) would land here
    code, rows = check(capsys, OPD, peaked_dir)
    assert code == 0, rows
    for name in ("tokenizer", "routes", "prompts", "sampling", "context", "self-distillation", "probe math",
                 "probe string", "memory", "step time"):  # fmt: skip
        assert status(rows, name) == ["ok"], (name, rows[name])
    assert "renders to the same" in rows["tokenizer"][0][1]
    # student and teachers are one model here: full overlap, zero KL, a zero self-distillation loss
    assert re.search(r"top-8 overlap 1\.00, .* reverse KL 0\.000", rows["probe math"][0][1])
    assert re.search(r"reverse_kl of the student against itself on \d+ of its samples: 0\.00e\+00", 
                     rows["self-distillation"][0][1])  # fmt: skip
    assert re.search(r"optimiser state \d+\.\d MiB \(measured\)", rows["memory"][0][1])
    assert re.search(r"teacher hidden states \[64, 32, \d+\]", rows["memory"][0][1])  # data.batch_size, max_new_tokens
    assert re.search(r"\d+\.\d\d s per optimiser step", rows["step time"][0][1])
    assert list(tmp_path.iterdir()) == [], "no run folder, checkpoint, log or export"


def test_check_names_a_teacher_with_another_tokenizer(capsys, tiny_dir, tmp_path):
    other = copy_weights(tiny_dir, tmp_path / "other-tokenizer")
    tokenizer = load_tokenizer(tiny_dir)
    edit_tokenizer(tokenizer, "eos")
    tokenizer.save_pretrained(other)
    code, rows = check(capsys, OPD, tiny_dir, f"--model.init_args.teachers.string={other}")
    assert code == 1
    assert rows["tokenizer"] == [
        ["FAIL", "model.init_args.teachers.string: eos_token '<|endoftext|>' (id 0) vs the student's '<|im_end|>' (id 2)"],
        ["ok", rows["tokenizer"][1][1]],
    ]  # fmt: skip
    assert rows["tokenizer"][1][1].startswith("model.init_args.teachers.math: as the student's")
    assert "build" not in rows and "probe math" not in rows, "nothing loads once a tokenizer differs"


def test_check_names_an_unrouted_domain(capsys, tiny_dir, tmp_path):
    code, rows = check(capsys, OPD, tiny_dir, f'--model.init_args.teachers={{"math": "{tiny_dir}"}}',
                       small=tmp_path / "small.yaml")  # fmt: skip
    assert code == 1
    assert status(rows, "routes") == ["FAIL"]
    assert rows["routes"][0][1].startswith(
        "data.tasks has domain(s) ['string'] with no teacher in model.init_args.teachers (routes: ['math']). "
        "Add `string: <teacher folder>` under model.init_args.teachers"
    )
    assert "probe math" not in rows, "no model loads before the routes are fixed"


def test_check_names_an_over_long_prompt_set(capsys, tiny_dir, tmp_path):
    code, rows = check(capsys, OPD, tiny_dir, "--data.max_prompt_length=20", small=tmp_path / "small.yaml")
    assert code == 1
    assert status(rows, "prompts") == ["FAIL"]
    assert re.match(
        r"data\.max_prompt_length=20 is shorter than a prompt of task data\.tasks\[1\] \('word_sequence_reversal'\): "
        r"\d+ tokens for '.*'\. Raise data\.max_prompt_length", rows["prompts"][0][1]
    )  # fmt: skip


def test_check_refuses_sampling_that_makes_opd_off_policy(capsys, tiny_dir, tmp_path):
    code, rows = check(capsys, OPD, tiny_dir, "--model.init_args.sampling.temperature=0.7",
                       "--model.init_args.sampling.top_p=0.9", small=tmp_path / "small.yaml")  # fmt: skip
    assert code == 1
    assert rows["sampling"][0][0] == "FAIL"
    assert rows["sampling"][0][1].startswith("model.init_args.sampling has temperature 0.7, top_p 0.9:")
    assert "Set sampling.temperature: 1.0, top_k: 0, top_p: 1.0." in rows["sampling"][0][1]


def test_a_low_overlap_domain_fails_with_the_cold_start_command_or_warns_when_the_fit_warms_it_up(
    capsys, tiny_dir, peaked_dir, tmp_path
):
    """A teacher of other weights (another seed) overlaps little with the student."""
    far = make_teacher(tiny_dir, tmp_path / "far", seed=1, sharpen=16.0)
    routes = f"--model.init_args.teachers.math={far}"
    small, prompts = tmp_path / "small.yaml", "--check.prompts=8"
    code, rows = check(capsys, OPD, peaked_dir, routes, prompts, "--check.timed_step=false", small=small)
    assert code == 1
    overlap = float(re.search(r"top-8 overlap (\S+),", rows["probe math"][0][1]).group(1))
    assert overlap < 0.5 and status(rows, "probe math") == ["FAIL"]
    assert "Run ColdStart first: opd fit --config configs/tiny/defaults.yaml --config configs/tiny/cold_start.yaml" \
        f" --model.init_args.model={peaked_dir} --model.init_args.teachers.math={far}" in rows["probe math"][0][1]
    assert status(rows, "probe string") == ["ok"], "the string teacher is the student itself"
    assert status(rows, "step time") == ["skip"]

    code, rows = check(capsys, OPD, peaked_dir, routes, prompts, "--check.timed_step=false",
                       "--model.init_args.overlap_cold_start.below_overlap=0.6", small=small)  # fmt: skip
    assert code == 0 and status(rows, "probe math") == ["warn"]
    assert "the fit warms this domain up on its teacher's samples before OPD" in rows["probe math"][0][1]


def test_the_self_distillation_check_catches_a_loss_that_is_not_zero_at_the_teacher(
    capsys, tiny_dir, tmp_path, monkeypatch
):
    import opd_lightning.check as check_module

    real = check_module.distillation_loss

    def off_by_a_constant(*args, **kwargs):  # a loss with a bug: a constant that does not vanish at p_S = p_T
        loss, metrics = real(*args, **kwargs)
        return loss + 0.01, metrics

    monkeypatch.setattr(check_module, "distillation_loss", off_by_a_constant)
    code, rows = check(capsys, OPD, tiny_dir, "--check.prompts=4", "--check.timed_step=false",
                       small=tmp_path / "small.yaml")  # fmt: skip
    assert code == 1
    assert rows["self-distillation"][0][0] == "FAIL"
    assert "1.00e-02 (tolerance 0.001): a loss that is not zero here is a bug" in rows["self-distillation"][0][1]


STAGES = {
    "expert_sft_math.yaml": {"self-distillation": "skip", "sampling": "skip", "routes": "skip"},
    "expert_grpo_math.yaml": {"on-policy ratio": "ok", "sampling": "ok", "routes": "skip"},
    "cold_start.yaml": {"self-distillation": "skip", "sampling": "ok", "probe math": "ok"},
}


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_is_checkable(capsys, peaked_dir, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    config = next(c for c in STAGE_CONFIGS if c.endswith(f"tiny/{name}"))
    code, rows = check(capsys, config, peaked_dir, "--check.prompts=4", small=tmp_path / "small.yaml")
    assert code == 0, rows
    for row, expected in STAGES[name].items():
        assert status(rows, row) == [expected], (row, rows[row])
    assert status(rows, "step time") == ["ok"]
    assert [p.name for p in tmp_path.iterdir()] == ["small.yaml"], "the ColdStart cache is not written either"


def test_opd_help_lists_the_check_subcommand(capsys):
    from opd_lightning.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("opd check --config X.yaml") and "fit" in out
