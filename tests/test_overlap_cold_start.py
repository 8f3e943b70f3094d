"""MultiExpertOPD's overlap-driven cold start: a student whose top-k tokens overlap little with its teacher's is
warmed up on the teacher's samples until the overlap clears the threshold, before the first OPD step; domains
above it are left alone; a resumed run does not redo it."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from opd_lightning.data import PromptDataModule, TaskSpec
from opd_lightning.probe import overlap_probe, probe_batches
from opd_lightning.rollout import SamplingConfig
from opd_lightning.stages import MultiExpertOPD, OverlapColdStart
from opd_lightning.stages import overlap_cold_start as module_under_test
from tests.conftest import EASY_MATH, cpu_trainer
from tests.test_cold_start import sft_math_teacher

MATH = TaskSpec("basic_arithmetic", "math", config=EASY_MATH, size=1000, val_size=40)
STRING = TaskSpec("spell_backward", "string", config=dict(min_word_len=3, max_word_len=4), size=300, val_size=16)


@pytest.fixture(scope="module")
def math_teacher(tiny_dir, tmp_path_factory):
    """SFT'd briefly on easy sums: structured, peaked answers ("7<|im_end|>") that the random student (the
    `tiny_dir` model, from scratch) shares few top-k tokens with."""
    return sft_math_teacher(tiny_dir, tmp_path_factory.mktemp("math-teacher"), steps=30)


def make(student, teachers: dict, tasks=(MATH,), **cold_start):
    module = MultiExpertOPD(
        model=str(student),
        teachers={d: str(p) for d, p in teachers.items()},
        sampling=SamplingConfig(max_new_tokens=6),
        overlap_cold_start=OverlapColdStart(**cold_start),
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0),
    )
    data = PromptDataModule(tokenizer=module.tokenizer, tasks=list(tasks), batch_size=8, max_prompt_length=32)
    return module, data


class FirstStep(L.Callback):
    """The student's overlap with its teachers when the first OPD batch starts (another probe seed)."""

    def __init__(self) -> None:
        self.overlap: dict[str, float] | None = None
        self.report_then: dict | None = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.overlap is None:
            self.report_then = module.cold_start_report
            batches = probe_batches(trainer.datamodule, 16, module.device, seed=7)
            stats = overlap_probe(module, module.teachers, batches, max_new_tokens=6, overlap_k=8, seed=7)
            self.overlap = {d: s["topk_overlap"] for d, s in stats.items()}


def test_a_low_overlap_student_is_warmed_up_above_the_threshold_before_opd_begins(tiny_dir, math_teacher, tmp_path):
    module, data = make(tiny_dir, {"math": math_teacher}, below_overlap=0.5, max_steps=40, probe_prompts=16,
                        probe_every=5, batch_size=32)  # fmt: skip
    watch = FirstStep()
    cpu_trainer(tmp_path, 1, [watch]).fit(module, datamodule=data)
    report = watch.report_then
    assert report is not None, "the cold start ran before the first OPD step"
    assert report["before"]["math"] < 0.2, "a student from scratch overlaps little with a trained teacher"
    assert report["after"]["math"] >= 0.5 and 0 < report["steps"]["math"] <= 40
    assert watch.overlap["math"] >= 0.4, "the raised overlap holds on other prompts and samples"
    assert module.cold_start_report == report


def test_domains_above_the_threshold_get_no_cold_start_steps(tiny_dir, math_teacher, tmp_path, monkeypatch):
    """string is taught by the student itself (overlap 1): only math is trained, and the SFT batches hold
    math prompts only."""
    module, data = make(tiny_dir, {"math": math_teacher, "string": tiny_dir}, tasks=(MATH, STRING),
                        below_overlap=0.5, max_steps=5, probe_prompts=8, batch_size=8)  # fmt: skip
    seen = []
    real = module_under_test.teacher_rows

    def recording(teachers, batch, *args):
        seen.extend(batch.domains)
        return real(teachers, batch, *args)

    monkeypatch.setattr(module_under_test, "teacher_rows", recording)
    cpu_trainer(tmp_path, 1).fit(module, datamodule=data)
    report = module.cold_start_report
    assert report["before"]["string"] == pytest.approx(1.0) and report["steps"]["string"] == 0
    assert report["steps"]["math"] > 0 and set(seen) == {"math"}


def test_a_resumed_run_keeps_the_report_and_does_not_redo_the_cold_start(tiny_dir, math_teacher, tmp_path, monkeypatch):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    module, data = make(tiny_dir, {"math": math_teacher}, below_overlap=1.0, max_steps=2, probe_prompts=4)
    cpu_trainer(tmp_path, 1, [ckpt], enable_checkpointing=True).fit(module, datamodule=data)
    ran = module.cold_start_report
    assert ran["steps"]["math"] == 2, "threshold 1.0: the bound stops it"
    stored = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["overlap_cold_start"]
    assert stored == ran

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cold start ran again on resume")

    monkeypatch.setattr("opd_lightning.stages.opd.run_overlap_cold_start", must_not_run)
    resumed, data = make(tiny_dir, {"math": math_teacher}, below_overlap=1.0, max_steps=2, probe_prompts=4)
    trainer = cpu_trainer(tmp_path, 2)
    trainer.fit(resumed, datamodule=data, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), weights_only=False)
    assert trainer.global_step == 2 and resumed.cold_start_report == ran


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(below_overlap=0.0), r"overlap_cold_start\.below_overlap must be in \(0, 1\], got 0\.0"),
        (dict(max_steps=0), r"overlap_cold_start\.max_steps must be >= 1, got 0"),
        (dict(batch_size=0), r"overlap_cold_start\.batch_size must be >= 1 or null, got 0"),
    ],
)
def test_overlap_cold_start_rejects_bad_values_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        OverlapColdStart(**fields)
