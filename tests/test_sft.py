"""The SFT stage learns, checkpoints, resumes exactly, and exports a loadable HF folder."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_lightning.callbacks import HFExport
from opd_lightning.data import PromptDataModule, TaskSpec
from opd_lightning.rollout import SamplingConfig, generate
from opd_lightning.stages import SFT, WarmupLinearDecay
from tests.conftest import EASY_MATH, cpu_trainer

MATH = TaskSpec("basic_arithmetic", "math", config=EASY_MATH, size=2000, val_size=40)


class Record(L.Callback):
    def __init__(self):
        self.losses, self.batches = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))  # the step's token mean
        self.batches.append(batch.input_ids.clone())


def make(tiny_dir, lr=1e-2, steps=100, tasks=(MATH,), **data_kw):
    module = SFT(
        model=str(tiny_dir),
        optimizer=lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0),
        lr_scheduler=lambda o: WarmupLinearDecay(o, warmup_steps=10, min_ratio=0.1),
    )
    module.eval_config.max_new_tokens = 4
    data = PromptDataModule(tokenizer=module.tokenizer, tasks=list(tasks), train_format="sft", batch_size=64,
                            val_batch_size=40, steps_per_epoch=steps, max_prompt_length=32, max_answer_length=6,
                            **data_kw)
    return module, data


def trainer(tmp_path, steps, callbacks=(), **kw):
    return cpu_trainer(tmp_path, steps, callbacks, **{"limit_val_batches": 1, "enable_checkpointing": True, **kw})


@pytest.mark.slow
def test_sft_loss_falls_and_greedy_accuracy_rises(tiny_dir, tmp_path):
    L.seed_everything(0)
    module, data = make(tiny_dir, steps=300)
    rec = Record()
    t = trainer(tmp_path, 300, [rec], enable_checkpointing=False, val_check_interval=300)
    before = t.validate(module, datamodule=data, verbose=False)[0]["val/accuracy"]
    t.fit(module, datamodule=data)
    after = t.callback_metrics["val/accuracy"].item()
    first, last = sum(rec.losses[:10]) / 10, sum(rec.losses[-10:]) / 10
    print(f"loss {first:.3f} -> {last:.3f}; accuracy {before:.3f} -> {after:.3f}")
    assert last < 0.5 * first
    # measured (300 steps): loss 4.05 -> 1.05, held-out accuracy 0.000 -> 0.025-0.075 (1-3 of 40: the
    # figure moves with fp32 round-off, e.g. one padded forward vs length groups with gradients equal to
    # 1e-7). The held-out questions are never trained on, and the 1-digit space has only ~200, so most of
    # what is learnt is the trained sums: the loss carries the evidence; accuracy must still leave zero
    # (an untrained model scores 0 here).
    assert before <= 0.03 and after > before


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tiny_dir, tmp_path):
    def run(steps, ckpt_path=None, root=tmp_path / "a"):
        L.seed_everything(0)
        module, data = make(tiny_dir, steps=50)
        rec = Record()
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=3, save_last=True, save_top_k=-1)
        trainer(root, steps, [rec, ckpt], limit_val_batches=0).fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module, rec

    straight, rec_straight = run(8, root=tmp_path / "straight")
    run(6, root=tmp_path / "interrupted")
    resumed, rec_resumed = run(8, ckpt_path=str(tmp_path / "interrupted" / "ckpt" / "last.ckpt"),
                               root=tmp_path / "interrupted")
    assert len(rec_resumed.batches) == 2, "only the remaining steps run"
    assert all(torch.equal(a, b) for a, b in zip(rec_resumed.batches, rec_straight.batches[6:])), "data position"
    assert rec_resumed.losses == pytest.approx(rec_straight.losses[6:], abs=1e-6)
    for (name, p), q in zip(straight.policy.named_parameters(), resumed.policy.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)  # optimiser + scheduler state restored


def test_hf_export_reloads_and_generates_the_same_greedy_answers(tiny_dir, tmp_path):
    L.seed_everything(0)
    module, data = make(tiny_dir, steps=20)
    export = HFExport(dirpath=str(tmp_path / "hf"))
    trainer(tmp_path, 20, [export], enable_checkpointing=False, limit_val_batches=0).fit(module, datamodule=data)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    batch = data.collate_prompts(data.val_examples[:16])
    config = SamplingConfig(max_new_tokens=6, temperature=0.0)
    kw = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    ours = generate(module.policy, batch.prompt_ids, batch.prompt_mask, config, **kw)
    theirs = generate(model, batch.prompt_ids, batch.prompt_mask, config, **kw)
    assert torch.equal(ours.completion_ids, theirs.completion_ids)
    assert ours.decode(module.tokenizer) == theirs.decode(tok)
