"""Verifiable rewards and the accuracy reported from them: partial credit is a reward, accuracy is exact match
in every stage's logs."""

import pytest
import torch

from opd_lightning import rewards
from opd_lightning.data import PromptDataModule, TaskSpec
from opd_lightning.rollout import SamplingConfig
from opd_lightning.stages import GRPO, ColdStart, MultiExpertOPD
from tests.conftest import EASY_MATH, cpu_trainer

ENTRY = {"question": "Calculate 2 - 30.", "answer": "-28", "metadata": {"source_dataset": "basic_arithmetic"}}


def test_accuracy_is_exact_even_where_the_verifier_gives_partial_credit():
    assert rewards.correctness(["-280"], [ENTRY])[0] > 0.0  # reasoning_gym's partial credit
    assert rewards.exact_accuracy(["-280", "-28", "<answer>-28</answer>"], [ENTRY] * 3) == [0.0, 1.0, 1.0]


def test_verify_gives_partial_credit_as_reward_and_exact_match_as_accuracy_in_one_call():
    reward, exact = rewards.verify(["-280", "-28", "x"], [ENTRY] * 3, device="cpu")
    assert reward.dtype == exact.dtype == torch.float32 and reward.shape == exact.shape == (3,)
    assert reward.tolist() == pytest.approx([0.75, 1.0, 0.0])  # basic_arithmetic: len("-28") / len("-280")
    assert exact.tolist() == [0.0, 1.0, 0.0]


def _grpo(model):
    return GRPO(model=model, sampling=SamplingConfig(num_samples=2, max_new_tokens=4, temperature=1.0))


def _opd(model):
    return MultiExpertOPD(model=model, teachers={"math": model}, sampling=SamplingConfig(max_new_tokens=4))


def _cold_start(model):
    return ColdStart(model=model, teachers={"math": model}, sampling=SamplingConfig(max_new_tokens=4))


# stage -> (logged accuracies, logged reward): the student's for GRPO and OPD, the teachers' for ColdStart
STAGES = {
    "grpo": (_grpo, ["train/accuracy", "train/accuracy/math"], "train/reward/correctness"),
    "opd": (_opd, ["train/accuracy/math"], "train/reward"),
    "cold_start": (
        _cold_start,
        ["train/teacher_accuracy", "train/teacher_accuracy/math", "val/teacher_accuracy"],
        "train/teacher_reward",
    ),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_training_accuracy_is_exact_match_while_the_reward_keeps_partial_credit(
    tiny_dir, tmp_path, monkeypatch, stage
):
    # every completion half right, as basic_arithmetic scores "-280" against "-28"
    monkeypatch.setattr(rewards, "score", lambda completion, entry: 0.75)
    build, accuracies, reward = STAGES[stage]
    module = build(str(tiny_dir))
    module.eval_config.max_new_tokens = 4
    task = TaskSpec("basic_arithmetic", "math", config=EASY_MATH, size=50, val_size=4)
    data = PromptDataModule(
        tokenizer=module.tokenizer, tasks=[task], batch_size=4, val_batch_size=4, max_prompt_length=32
    )
    trainer = cpu_trainer(tmp_path, 1, limit_val_batches=1, val_check_interval=1)
    trainer.fit(module, datamodule=data)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    accuracies += ["val/accuracy"]
    assert {k: logged[k] for k in accuracies} == dict.fromkeys(accuracies, 0.0), "no answer is fully right"
    assert logged[reward] == pytest.approx(0.75), "the reward keeps the partial credit"
