"""Correct under data parallelism and gradient accumulation: an optimiser step's global batch gives the same
logged losses and the same weights whether it is one batch, two accumulated micro-batches, or two DDP processes
(gloo, CPU); validation and the train figures log global figures, not one rank's shard.

Tolerance: float32 on CPU. Splitting a batch changes only the order of float32 sums and the padded widths,
so the runs agree to float32 round-off: measured after 3 steps (SGD with momentum, see tests/parallel_runs.py),
losses within 1e-6 (relative 1.4e-7) and weights within 1.2e-7; asserted at rtol 1e-6 + atol 1e-6.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opd_lightning.models import load_causal_lm
from tests.parallel_runs import run
from tests.test_teachers import make_teacher

ROOT = Path(__file__).parents[1]
TOL = dict(rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def teachers(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dp-teachers")
    return [str(make_teacher(tiny_dir, root / "a", seed=1)), str(make_teacher(tiny_dir, root / "b", seed=2))]


def job(stage, tiny_dir, teachers, batch_size, accumulate=1, steps=3, validate=False) -> dict:
    return dict(stage=stage, tiny_dir=str(tiny_dir), teachers=teachers, batch_size=batch_size,
                accumulate=accumulate, steps=steps, validate=validate)  # fmt: skip


def assert_same_training(a: dict, b: dict) -> None:
    assert len(a["losses"]) == len(b["losses"]) > 0
    loss_diff = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
    print(f"losses {a['losses']}: max diff {loss_diff:.2g}, weights max diff {(a['params'] - b['params']).abs().max():.2g}")
    torch.testing.assert_close(torch.tensor(a["losses"]), torch.tensor(b["losses"]), **TOL)
    torch.testing.assert_close(a["params"], b["params"], **TOL)


@pytest.mark.parametrize("stage, batch_size", [("sft", 16), ("opd", 8)])
def test_two_accumulated_micro_batches_train_like_one_doubled_batch(stage, batch_size, tiny_dir, teachers, tmp_path):
    doubled = run(job(stage, tiny_dir, teachers, batch_size), tmp_path / "doubled")
    accumulated = run(job(stage, tiny_dir, teachers, batch_size // 2, accumulate=2), tmp_path / "accumulated")
    assert_same_training(doubled, accumulated)
    assert not torch.equal(doubled["params"], run(job(stage, tiny_dir, teachers, batch_size, steps=1),
                                                  tmp_path / "one")["params"]), "the steps moved the weights"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ddp_processes_train_and_validate_like_one_process_with_the_same_global_batch(
    tiny_dir, teachers, tmp_path
):
    jobs = {
        "sft": job("sft", tiny_dir, teachers, 8, validate=True),  # 2 processes x 8 = the single run's 16
        "opd": job("opd", tiny_dir, teachers, 4),
        "grpo": job("grpo", tiny_dir, teachers, 4),
        "cold_start": job("cold_start", tiny_dir, teachers, 4, steps=0, validate=True),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "NODE_RANK": "0", "WORLD_SIZE": "2"}  # fmt: skip
    cmd = [sys.executable, "-m", "tests.parallel_runs", json.dumps(jobs), str(tmp_path)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**env, "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]  # fmt: skip
    try:
        logs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    ddp = {name: torch.load(tmp_path / f"{name}.rank0.pt") for name in jobs}
    other_rank = torch.load(tmp_path / "sft.rank1.pt")

    single_sft = run(job("sft", tiny_dir, teachers, 16, validate=True), tmp_path / "single-sft")
    assert_same_training(ddp["sft"], single_sft)
    assert torch.equal(ddp["sft"]["params"], other_rank["params"]), "DDP keeps the replicas equal"
    # validation split over two ranks logs the figure of the whole held-out set
    assert ddp["sft"]["val"]["val/accuracy"] == single_sft["val"]["val/accuracy"]
    for key, value in single_sft["val"].items():
        assert ddp["sft"]["val"][key] == pytest.approx(value, abs=1e-6), key

    single_opd = run(job("opd", tiny_dir, teachers, 8), tmp_path / "single-opd")
    assert_same_training(ddp["opd"], single_opd)
    # its gradients (DAPO's global token mean) must agree
    single_grpo = run(job("grpo", tiny_dir, teachers, 8), tmp_path / "single-grpo")
    print(f"GRPO weights max diff {(ddp['grpo']['params'] - single_grpo['params']).abs().max():.2g}")
    torch.testing.assert_close(ddp["grpo"]["params"], single_grpo["params"], **TOL)
    initial = torch.cat([p.detach().flatten() for p in load_causal_lm(tiny_dir).parameters()])
    assert (single_grpo["params"] - initial).abs().max() > 1e-3, "GRPO's steps moved the weights"
    # the logged train figures are the whole global batch's, not rank 0's half: its row means equal the single run's
    row_means = {
        "opd": ("train/reward", "train/completion_length", "train/truncated_fraction"),
        "grpo": ("train/reward_mean", "train/accuracy", "train/completion_length", "train/truncated_frac",
                 "train/reward_std", "train/frac_reward_zero_std"),
    }  # fmt: skip
    for stage, single in (("opd", single_opd), ("grpo", single_grpo)):
        assert len(ddp[stage]["train"]) == len(single["train"]) == 3
        for step, (got, want) in enumerate(zip(ddp[stage]["train"], single["train"], strict=True)):
            for key in row_means[stage]:
                assert got[key] == pytest.approx(want[key], abs=1e-6), (stage, step, key)

    # ColdStart's overall diagnostics: with one domain, the overall figure is that domain's (global) figure
    val = ddp["cold_start"]["val"]
    for name in ("topk_overlap", "student_shared_mass", "teacher_shared_mass", "teacher_sample_nll"):
        assert val[f"val/{name}"] == pytest.approx(val[f"val/{name}/math"], abs=1e-6), name
