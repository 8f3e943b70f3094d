"""The GRPO stage raises its reward, starts each batch on-policy, takes ppo_epochs × num_minibatches optimiser
steps per rollout batch, keeps its reference frozen and out of checkpoints, resumes exactly, and rejects bad
configs early."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from opd_lightning.data import PromptDataModule, TaskSpec
from opd_lightning.models import load_causal_lm
from opd_lightning.rollout import SamplingConfig
from opd_lightning.stages import GRPO, GRPOConfig, RewardTerm, WarmupLinearDecay
from tests.conftest import EASY_MATH, cpu_trainer

MATH = TaskSpec("basic_arithmetic", "math", config=EASY_MATH, size=500, val_size=8)
# A random-init model never answers correctly (zero-std groups, no gradient): a length penalty gives it a
# signal it can climb at once, by preferring short tokens and an early EOS.
SHORT = RewardTerm("opd_lightning.rewards.length_penalty", weight=1.0, kwargs={"target_chars": 4})


class Record(L.Callback):
    def __init__(self):
        self.outputs = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append({k: float(v) for k, v in outputs.items()})


def spy_on_policy_loss(module):
    """Record the metrics of every minibatch loss the stage computes."""
    calls, inner = [], module.policy_loss

    def spy(*args, **kwargs):
        loss, metrics = inner(*args, **kwargs)
        calls.append({k: float(v) for k, v in metrics.items()})
        return loss, metrics

    module.policy_loss = spy
    return calls


def make(tiny_dir, *, batch_size=4, num_samples=4, max_new_tokens=12, lr=3e-3, shaping=(SHORT,), **kw):
    grpo = GRPOConfig(**{k: kw.pop(k) for k in list(kw) if k in GRPOConfig.__dataclass_fields__})
    module = GRPO(
        model=str(tiny_dir),
        sampling=SamplingConfig(num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=1.0),
        grpo=grpo,
        shaping=list(shaping),
        optimizer=lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0),
        lr_scheduler=lambda o: WarmupLinearDecay(o, warmup_steps=0, total_steps=1000, min_ratio=1.0),
        **kw,
    )
    data = PromptDataModule(
        tokenizer=module.tokenizer,
        tasks=[MATH],
        train_format="prompts",
        batch_size=batch_size,
        val_batch_size=8,
        steps_per_epoch=100,
        max_prompt_length=32,
    )
    return module, data


def trainer(tmp_path, steps, callbacks=(), **kw):
    return cpu_trainer(tmp_path, steps, callbacks, **kw)


def test_shaped_reward_rises_from_a_random_model(tiny_dir, tmp_path):
    L.seed_everything(0)
    module, data = make(tiny_dir, batch_size=8, num_samples=4, lr=1e-2)
    rec = Record()
    trainer(tmp_path, 30, [rec]).fit(module, datamodule=data)
    reward = [o["train/reward_mean"] for o in rec.outputs]
    first, last = sum(reward[:5]) / 5, sum(reward[-5:]) / 5
    print(
        f"reward {first:.3f} -> {last:.3f}; length {rec.outputs[0]['train/completion_length']:.1f} -> "
        f"{rec.outputs[-1]['train/completion_length']:.1f}"
    )
    assert len(reward) == 30
    assert last > first + 1.0  # in units of target_chars
    assert rec.outputs[0]["train/frac_reward_zero_std"] < 0.5, "shaping gives the groups a spread"
    assert rec.outputs[0]["train/accuracy"] < 0.01, "a random model (almost) never scores"


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_each_batch_starts_on_policy_then_goes_off_policy(tiny_dir, tmp_path, loss_type):
    L.seed_everything(0)
    module, data = make(tiny_dir, loss_type=loss_type, ppo_epochs=2, num_minibatches=2, lr=1e-2)
    calls = spy_on_policy_loss(module)
    trainer(tmp_path, 4).fit(module, datamodule=data)
    assert len(calls) == 4
    first = calls[0]
    # behaviour log-probs from the rollout make the ratio exact: 1 up to float32 round-off, nothing clipped
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert first["ratio_max"] == pytest.approx(1.0, abs=1e-4)
    assert first["clip_fraction"] == 0.0
    # after an optimiser step the same rollout is off-policy, and the ratio shows it
    assert max(abs(c["ratio_max"] - 1.0) for c in calls[1:]) > 1e-2


def test_a_batch_takes_ppo_epochs_times_minibatches_optimiser_steps(tiny_dir, tmp_path):
    L.seed_everything(0)
    module, data = make(tiny_dir, batch_size=3, num_samples=2, ppo_epochs=2, num_minibatches=3)
    rec = Record()
    t = trainer(tmp_path, 12, [rec])
    t.fit(module, datamodule=data)
    assert len(rec.outputs) == 2, "two rollout batches"
    assert t.global_step == 12 == 2 * 2 * 3
    assert t.lr_scheduler_configs[0].scheduler.last_epoch == 12, "the LR schedule steps with the optimiser"


def test_reference_is_frozen_out_of_checkpoints_and_kl_starts_at_zero(tiny_dir, tmp_path):
    L.seed_everything(0)
    module, data = make(tiny_dir, ref_model=str(tiny_dir), kl_coef=0.1, lr=1e-2)
    calls = spy_on_policy_loss(module)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    rec = Record()
    trainer(tmp_path, 3, [ckpt, rec], enable_checkpointing=True).fit(module, datamodule=data)

    original = load_causal_lm(tiny_dir)
    for (name, p), q in zip(module.reference.named_parameters(), original.parameters(), strict=True):
        assert not p.requires_grad and torch.equal(p, q), name
    assert not module.reference.training
    assert calls[0]["kl"] == pytest.approx(0.0, abs=1e-6), "policy == reference before the first step"
    assert rec.outputs[-1]["train/kl"] > 1e-5, "the policy moved away from the reference"

    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    assert any(k.startswith("policy.") for k in state)
    assert not any(k.startswith("reference.") for k in state)
    fresh, _ = make(tiny_dir, ref_model=str(tiny_dir), kl_coef=0.1)
    fresh.configure_model()
    fresh.load_state_dict(state)  # strict: only the frozen reference may be missing


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tiny_dir, tmp_path):
    def run(steps, root, ckpt_path=None):
        L.seed_everything(0)
        module, data = make(tiny_dir, num_minibatches=2)
        rec = Record()
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_last=True, save_top_k=-1)
        # weights_only=False: built in Python (not by the CLI), the hparams hold config dataclasses
        trainer(root, steps, [rec, ckpt], enable_checkpointing=True).fit(
            module, datamodule=data, ckpt_path=ckpt_path, weights_only=False
        )
        return module, rec

    straight, rec_straight = run(8, tmp_path / "straight")
    run(4, tmp_path / "interrupted")
    resumed, rec_resumed = run(
        8, tmp_path / "interrupted", ckpt_path=str(tmp_path / "interrupted/ckpt/last.ckpt")
    )
    assert len(rec_resumed.outputs) == 2, "only the remaining batches run"
    same = ("train/reward_mean", "train/completion_length", "train/entropy", "train/loss")
    for a, b in zip(rec_resumed.outputs, rec_straight.outputs[2:], strict=True):
        assert [a[k] for k in same] == pytest.approx([b[k] for k in same], abs=1e-6), (
            "same rollouts after resuming"
        )
    for (name, p), q in zip(straight.policy.named_parameters(), resumed.policy.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_partial_credit_can_be_withheld_from_the_reward_and_never_counts_as_accurate(tiny_dir):
    import reasoning_gym

    entry = reasoning_gym.create_dataset("basic_arithmetic", seed=0, size=1)[0]
    answer = entry["answer"]
    completions, entries = [answer, answer + "0", "x"], [entry] * 3
    module, _ = make(tiny_dir)
    reward, accuracy = module.verifier_reward(completions, entries)
    assert reward.tolist() == pytest.approx([1.0, len(answer) / (len(answer) + 1), 0.0])  # substring credit
    assert accuracy.tolist() == [1.0, 0.0, 0.0]
    module, _ = make(tiny_dir, partial_credit=False)
    reward, accuracy = module.verifier_reward(completions, entries)
    assert reward.tolist() == accuracy.tolist() == [1.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------ bad configs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_samples=1), r"sampling\.num_samples .* must be >= 2"),
        (
            dict(shaping=[RewardTerm("opd_lightning.rewards.no_such_reward")]),
            r"shaping\[0\]\.fn=.*no function",
        ),
        (dict(shaping=[RewardTerm("no_such_package.reward")]), r"shaping\[0\]\.fn=.*cannot import"),
        (dict(shaping=[RewardTerm("length_penalty")]), r"shaping\[0\]\.fn=.*not an import path"),
        (dict(kl_coef=0.1), r"grpo\.kl_coef=0\.1 needs model\.init_args\.ref_model"),
        (dict(ref_model="/no/such/folder"), r"model\.init_args\.ref_model="),
    ],
)
def test_bad_stage_config_fails_at_init_naming_the_field(tiny_dir, kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        make(tiny_dir, **kwargs)


def test_greedy_sampling_is_rejected(tiny_dir):
    with pytest.raises(ValueError, match=r"sampling\.temperature must be > 0"):
        GRPO(model=str(tiny_dir), sampling=SamplingConfig(num_samples=4, temperature=0.0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(loss_type="ppo"), r"grpo\.loss_type"),
        (dict(ppo_epochs=0), r"grpo\.ppo_epochs must be >= 1"),
        (dict(num_minibatches=0), r"grpo\.num_minibatches must be >= 1"),
        (dict(clip_eps=1.5), r"grpo\.clip_eps must be in"),
        (dict(max_grad_norm=0.0), r"grpo\.max_grad_norm must be > 0"),
    ],
)
def test_bad_grpo_values_fail_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**kwargs)


def test_minibatches_that_do_not_divide_the_batch_fail_before_training(tiny_dir, tmp_path):
    module, data = make(tiny_dir, batch_size=4, num_samples=4, num_minibatches=3)
    with pytest.raises(ValueError, match=r"grpo\.num_minibatches=3 does not divide the 16 completions"):
        trainer(tmp_path, 3).fit(module, datamodule=data)
    assert module.policy is None, "nothing was loaded"
