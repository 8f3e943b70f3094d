"""The distillation dashboard: the custom-scalars layout is in the run's event file, and every chart's regexes
match the tags the stage really logged, one line per domain (or teacher)."""

from __future__ import annotations

import re

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from opd_lightning.dashboard import DashboardLayout, layout
from opd_lightning.data import PromptDataModule, TaskSpec
from opd_lightning.rollout import SamplingConfig
from opd_lightning.stages import SFT, ColdStart, MultiExpertOPD, OverlapColdStart
from tests.conftest import EASY_MATH, cpu_trainer
from tests.test_teachers import make_teacher

TASKS = [
    TaskSpec("basic_arithmetic", "math", config=EASY_MATH, size=200, val_size=8),
    TaskSpec("spell_backward", "string", config=dict(min_word_len=3, max_word_len=4), size=200, val_size=8),
    TaskSpec("chain_sum", "math", aligned=False, config=dict(min_terms=3, max_terms=3, min_digits=1, max_digits=1),
             size=50, val_size=4),
]  # fmt: skip


def read_back(log_dir) -> tuple[layout_pb2.Layout, list[str]]:
    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    (config,) = events.Tensors("custom_scalars__config__")
    return layout_pb2.Layout.FromString(config.tensor_proto.string_val[0]), events.Tags()["scalars"]


def test_the_opd_dashboard_is_read_back_from_the_event_file_with_one_line_per_domain(tiny_dir, tmp_path):
    teacher = make_teacher(tiny_dir, tmp_path / "teacher", seed=1)
    module = MultiExpertOPD(
        model=str(tiny_dir),
        teachers={"math": str(teacher), "string": str(tiny_dir)},
        sampling=SamplingConfig(max_new_tokens=6),
        overlap_cold_start=OverlapColdStart(below_overlap=1.0, max_steps=1, probe_prompts=4),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
    )
    module.eval_config.max_new_tokens = 6
    data = PromptDataModule(tokenizer=module.tokenizer, tasks=TASKS, batch_size=8, val_batch_size=20,
                            max_prompt_length=48)  # fmt: skip
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = cpu_trainer(tmp_path, 2, [DashboardLayout()], logger=logger, log_every_n_steps=1,
                          limit_val_batches=1, val_check_interval=2)  # fmt: skip
    trainer.fit(module, datamodule=data)

    written, tags = read_back(logger.log_dir)
    charts = {
        (category.title, chart.title): list(chart.multiline.tag)
        for category in written.category
        for chart in category.chart
    }
    assert {c for c, _ in charts} == {"per domain", "per teacher", "cold start"}
    assert charts[("per domain", "top-k overlap")] == ["train/domain/[^/]+/topk_overlap$"]
    for (category, title), regexes in charts.items():
        matched = sorted(t for t in tags if any(re.match(r, t) for r in regexes))
        lines = {t.split("/")[-2] if "/domain/" in t or "/teacher/" in t else t.split("/")[-1] for t in matched}
        if category == "per teacher":
            assert lines == {"math", "string"}, (title, matched)  # teacher names: one folder per domain here
        elif title == "OOD accuracy":
            assert lines == {"math"}, matched
        elif title == "student NLL of teacher samples":
            assert matched == ["cold_start/nll"]
        else:
            assert lines == {"math", "string"}, (category, title, matched)


def test_each_stage_gets_the_charts_of_what_it_logs(tiny_dir, tmp_path):
    sft = layout(SFT(model=str(tiny_dir)))
    assert list(sft) == ["per domain"] and set(sft["per domain"]) == {"val accuracy", "OOD accuracy"}
    cold = layout(ColdStart(model=str(tiny_dir), teachers={"default": str(tiny_dir)}))
    assert cold["per domain"]["top-k overlap"] == ["Multiline", ["val/topk_overlap/[^/]+$"]]  # its validation's
    assert "train accuracy" not in cold["per domain"] and list(cold["cold start"]) == [
        "student NLL of teacher samples", "teacher accuracy"]  # fmt: skip
    opd = layout(MultiExpertOPD(model=str(tiny_dir), teachers={"default": str(tiny_dir)}))
    assert list(opd) == ["per domain", "per teacher"], "no cold-start charts without overlap_cold_start"
    assert opd["per teacher"]["reverse KL"] == ["Multiline", ["train/teacher/[^/]+/reverse_kl$"]]
