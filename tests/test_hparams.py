"""TensorBoard's HPARAMS view gets every run's settings with its final validation metrics, and no curve gets a
second point from it."""

from __future__ import annotations

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from opd_lightning.callbacks import HParamsWithFinalMetrics
from opd_lightning.data import PromptDataModule
from opd_lightning.stages import SFT
from tests.conftest import cpu_trainer
from tests.test_sft import MATH


def test_final_val_metrics_reach_the_hparams_view_without_a_second_point(tiny_dir, tmp_path):
    module = SFT(model=str(tiny_dir), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    module.eval_config.max_new_tokens = 4
    data = PromptDataModule(tokenizer=module.tokenizer, tasks=[MATH], train_format="sft", batch_size=8,
                            val_batch_size=40, max_prompt_length=32, max_answer_length=6)  # fmt: skip
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    trainer = cpu_trainer(tmp_path, 3, [HParamsWithFinalMetrics()], logger=logger, limit_val_batches=1,
                          val_check_interval=3, log_every_n_steps=1)  # fmt: skip
    trainer.fit(module, datamodule=data)

    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/accuracy")] == [2], "one point: the run's own validation"
    plugin = acc.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/experiment"])
    metric_tags = {m.name.tag for m in session.experiment.metric_infos}
    assert {"val/accuracy", "val/accuracy/math"} <= metric_tags
    start = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["data.batch_size"].number_value == 8


def test_a_stage_seed_other_than_the_data_seed_fits_and_both_reach_the_hparams_view(tiny_dir, tmp_path):
    """MultiExpertOPD's `seed` (its rollouts) and the datamodule's `seed` (tasks, held-out split, batch stream) are
    separate knobs: Lightning's fit-start merge of the two hparams dicts used to refuse them when they differed."""
    from opd_lightning.rollout import SamplingConfig
    from opd_lightning.stages.opd import MultiExpertOPD

    module = MultiExpertOPD(model=str(tiny_dir), teachers={"math": str(tiny_dir)}, seed=1,
                            sampling=SamplingConfig(max_new_tokens=4),
                            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))  # fmt: skip
    data = PromptDataModule(tokenizer=module.tokenizer, tasks=[MATH], batch_size=4, max_prompt_length=32, seed=0)
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    trainer = cpu_trainer(tmp_path, 1, [HParamsWithFinalMetrics()], logger=logger)
    trainer.fit(module, datamodule=data)

    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    start = plugin_data_pb2.HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["seed"].number_value == 1
    assert start.session_start_info.hparams["data.seed"].number_value == 0
