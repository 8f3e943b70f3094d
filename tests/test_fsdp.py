"""Every stage under FSDP2 (Lightning's ModelParallelStrategy + fully_shard) with 2 CPU processes (gloo).

Each fixture runs one scenario of tests/fsdp_worker.py (several fits in the same two processes) and the tests
read what it wrote. The reference is DDP at the same 2 ranks: both strategies draw the same per-rank batches
(the data stream is seeded per rank), so FSDP2 must reproduce DDP's per-rank losses and final weights, up to
the order of floating-point sums in the gradient reduction. Process groups time out after 60 s and the whole
process tree is killed after `LIMIT`, so a deadlock fails instead of blocking CI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd_lightning.callbacks import save_hf
from opd_lightning.models import load_causal_lm, load_tokenizer
from tests import test_teachers

teachers = test_teachers.teachers  # the fixture: two tiny teachers on the student's tokenizer
ROOT = Path(__file__).parents[1]
LIMIT = 240  # seconds for a whole scenario (they take ~25 s on a quiet machine)
ATOL = 1e-5  # FSDP2 vs DDP: measured 0 (OPD) and 1.4e-7 (SFT, with activation checkpointing) after 4 steps

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def launch(scenario: str, out: Path, **paths) -> None:
    """Run a worker scenario in its own session, so a hang can be killed with every process it started."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "tests" / "fsdp_worker.py"), scenario, str(out),
           json.dumps({k: str(v) for k, v in paths.items()})]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"{scenario}: no result after {LIMIT} s (a hang?)\n{log[-3000:]}")
    assert proc.returncode == 0, log[-5000:]


def report(out: Path, fit: str, rank: int) -> dict:
    return json.loads((out / f"{fit}-rank{rank}.json").read_text())


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


@pytest.fixture(scope="module")
def sft_runs(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp-sft")
    launch("sft", out, tiny=tiny_dir)
    return out


@pytest.fixture(scope="module")
def opd_runs(tiny_dir, teachers, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp-opd")
    launch("opd", out, tiny=tiny_dir, math=teachers[0], string=teachers[1])
    return out


@pytest.fixture(scope="module")
def smoke_runs(tiny_dir, teachers, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp-smoke")
    launch("smoke", out, tiny=tiny_dir, math=teachers[0], string=teachers[1])
    return out


# ------------------------------------------------------------------------------------------------- SFT


def test_sft_under_fsdp2_with_activation_checkpointing_matches_ddp(sft_runs):
    for rank in (0, 1):
        ddp, fsdp = report(sft_runs, "ddp", rank), report(sft_runs, "fsdp", rank)
        assert len(fsdp["losses"]) == 4
        assert fsdp["losses"] == pytest.approx(ddp["losses"], abs=ATOL), rank
        assert fsdp["policy_bytes"] * 2 == ddp["policy_bytes"], "each rank holds half of the policy"
    assert report(sft_runs, "fsdp", 0)["moved"]
    assert_same_weights(torch.load(sft_runs / "fsdp.pt"), torch.load(sft_runs / "ddp.pt"), ATOL)


@pytest.mark.parametrize("kind", ["sharded", "full"])
def test_fsdp2_checkpoint_resumes_to_the_uninterrupted_losses_and_weights(sft_runs, kind):
    # sharded: a folder of per-rank shards (torch.distributed.checkpoint); full: one file gathered on rank 0
    saved = sft_runs / kind / "step=2.ckpt"
    assert saved.is_dir() if kind == "sharded" else saved.is_file()
    for rank in (0, 1):
        straight, resumed = report(sft_runs, "fsdp", rank), report(sft_runs, f"fsdp-resumed-{kind}", rank)
        assert resumed["losses"] == straight["losses"][2:], "steps 3-4 repeat exactly"
    assert_same_weights(torch.load(sft_runs / f"fsdp-resumed-{kind}.pt"), torch.load(sft_runs / "fsdp.pt"), 0.0)


def test_hf_export_under_fsdp2_equals_a_single_process_export_of_the_same_weights(sft_runs, tiny_dir, tmp_path):
    weights = torch.load(sft_runs / "fsdp.pt")  # gathered from the shards at fit end
    model = load_causal_lm(tiny_dir)
    model.load_state_dict(weights)
    single = save_hf(model, load_tokenizer(tiny_dir), tmp_path / "single")
    exported = sft_runs / "hf-fsdp"
    assert sorted(p.name for p in exported.iterdir()) == sorted(p.name for p in single.iterdir())
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (exported / name).read_text() == (single / name).read_text(), name
    assert_same_weights(load_file(exported / "model.safetensors"), load_file(single / "model.safetensors"), 0.0)
    again = load_causal_lm(exported)
    assert type(again).__name__ == "Qwen3ForCausalLM", "the class FSDP2 wraps the model in is not exported"
    assert again.lm_head.weight is again.model.embed_tokens.weight, "tied embeddings stay tied"


# ------------------------------------------------------------------------------------------------- OPD


def test_opd_with_two_sharded_teachers_matches_ddp_and_halves_the_teachers_memory(opd_runs):
    for rank in (0, 1):
        ddp, fsdp = report(opd_runs, "ddp", rank), report(opd_runs, "fsdp", rank)
        assert len(fsdp["losses"]) == 3
        assert fsdp["losses"] == pytest.approx(ddp["losses"], abs=ATOL), rank
        assert fsdp["domains"] == ddp["domains"], "the same rollouts: same batches, same sampling streams"
        for field, full in ddp["frozen_bytes"].items():
            assert fsdp["frozen_bytes"][field] * 2 == full, field  # each rank holds half of every teacher
    other = report(opd_runs, "fsdp", 1)["domains"]
    routed_apart = any(a != b for a, b in zip(report(opd_runs, "fsdp", 0)["domains"], other))
    assert routed_apart, "some step routed the two ranks to different teachers (the lockstep path ran)"
    assert_same_weights(torch.load(opd_runs / "fsdp.pt"), torch.load(opd_runs / "ddp.pt"), ATOL)


@pytest.mark.parametrize("kind", ["sharded", "full"])
def test_opd_checkpoints_leave_the_teachers_out_and_resume_under_fsdp2(opd_runs, kind):
    from torch.distributed.checkpoint import FileSystemReader

    saved = opd_runs / kind / "step=2.ckpt"
    if kind == "sharded":
        keys = list(FileSystemReader(saved).read_metadata().state_dict_metadata)
        keys = [k.removeprefix("state_dict.") for k in keys if k.startswith("state_dict.")]
    else:
        keys = list(torch.load(saved, weights_only=False)["state_dict"])
    assert keys and all(k.startswith("policy.") for k in keys), [k for k in keys if not k.startswith("policy.")][:3]
    for rank in (0, 1):
        resumed = report(opd_runs, f"fsdp-resumed-{kind}", rank)
        assert resumed["losses"] == report(opd_runs, "fsdp", rank)["losses"][2:]
    assert_same_weights(torch.load(opd_runs / f"fsdp-resumed-{kind}.pt"), torch.load(opd_runs / "fsdp.pt"), 0.0)


# ------------------------------------------------------------------------------------- GRPO, ColdStart


@pytest.mark.parametrize("stage", ["grpo", "cold_start"])
def test_grpo_and_cold_start_train_under_fsdp2_and_export_a_loadable_model(smoke_runs, teachers, stage):
    # GRPO with a sharded reference (k3 KL); ColdStart writes its cache with sharded teachers, 3 prompts on 2
    # ranks one per batch: rank 1 samples a throw-away batch while rank 0 samples its second
    full = sum(p.numel() * p.element_size() for p in load_causal_lm(teachers[0]).parameters())
    for rank in (0, 1):
        run = report(smoke_runs, stage, rank)
        assert run["global_step"] == 2 and all(torch.isfinite(torch.tensor(run["losses"])))
        assert run["frozen_bytes"] and all(2 * b == full for b in run["frozen_bytes"].values())
    assert report(smoke_runs, stage, 0)["moved"], "the policy's weights changed"
    exported = load_causal_lm(smoke_runs / f"hf-{stage}")
    assert_same_weights(exported.state_dict(), torch.load(smoke_runs / f"{stage}.pt"), 0.0)
