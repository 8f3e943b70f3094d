"""tools/bench.py: a smoke test of its quick mode and checks of its accounting (nothing here asserts speed)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "tools" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flop_accounting_counts_every_matmul_weight_of_the_tiny_models(tiny_dir):
    """2 FLOPs per weight per token: the body's weights are every parameter but the embedding and the norms."""
    from opd_lightning.models import load_causal_lm

    model = load_causal_lm(tiny_dir)
    dims = bench().model_dims(tiny_dir)
    norms = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    embedding = model.get_input_embeddings().weight.numel()
    assert dims["body"] == sum(p.numel() for p in model.parameters()) - embedding - norms
    assert dims["head"] == embedding  # tied: the LM head is the embedding matrix
    one_token = bench().forward_flops(dims, tokens=1, context=1, head_positions=1)
    assert one_token == 2 * dims["body"] + 4 * dims["layers"] * dims["attn"] + 2 * dims["head"]


def test_memory_of_one_opd_step_is_measured_in_a_fresh_process():
    row = bench().measure_memory(ROOT, 1024, "top_k=8", stats=True)
    assert row["vocab"] == 1024 and row["step_mib"] == max(row["sampling_mib"], row["scoring_mib"])
    assert row["scoring_mib"] > 0 and row["rss_mib"] > row["scoring_mib"]
    assert row["completion_tokens"] == 8 * 32


@pytest.mark.slow
@pytest.mark.parametrize("system", ["TRL DistillationTrainer (beta=1)", "TRL GKDTrainer (lmbda=1, beta=1)"])
def test_trls_memory_cell_does_the_same_work_as_ours(system):
    assert system in bench().TRL_MEMORY
    row = bench().measure_memory(ROOT, 1024, system, stats=True)
    assert row["completion_tokens"] == 8 * 32, "TRL sampled as many tokens as ours: the same work"
    assert row["scoring_mib"] > 0 and row["step_mib"] == max(row["sampling_mib"], row["scoring_mib"])


def test_memory_table_sets_ours_beside_trl_per_vocabulary(tmp_path):
    b = bench()

    def row(version, vocab, loss, stats, mib):
        return dict(version=version, vocab_name=vocab, loss=loss, stats=stats, step_mib=mib, weight_grad_mib=1.0)

    rows = [row("after", v, loss, stats, 100 * i + 10 * j + stats) for i, v in enumerate(b.VOCABS)
            for j, loss in enumerate(b.LOSSES) for stats in (True, False)]  # fmt: skip
    rows += [row("TRL", v, system, True, 1000 + 100 * i + j) for i, v in enumerate(b.VOCABS)
             for j, system in enumerate(b.TRL_MEMORY)]  # fmt: skip
    text = b.report({"memory": rows}, tmp_path)
    header = "| vocab | " + " | ".join(f"ours {loss}" for loss in b.LOSSES) + " | " + " | ".join(b.TRL_MEMORY) + " |"
    assert header in text
    # 152k is the third vocabulary (i = 2): ours per loss j as "diagnostics step (other steps)", then TRL's
    ours = " | ".join(f"{200 + 10 * j + 1} ({200 + 10 * j})" for j in range(len(b.LOSSES)))
    trl = " | ".join(str(1200 + j) for j in range(len(b.TRL_MEMORY)))
    assert f"| 152k | {ours} | {trl} |" in text
    assert (tmp_path / "memory.png").stat().st_size > 0


@pytest.mark.slow
def test_quick_bench_writes_its_tables_and_plots(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "tools/bench.py", "--quick", "--skip-trl", "--only", "steps", "scaling",
           "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work")]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    text = (tmp_path / "out" / "bench.md").read_text()
    for row in ("| ours OPD |", "| ours GRPO |", "| teacher scoring |", "| sampling |", "| 64 |", "| 2 |"):
        assert row in text, row
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["steps"]["flops"]["teacher scoring"] > 0 and 0 < results["steps"]["limit_seconds"]
    grpo = results["steps"]["work"]["ours GRPO"]  # GRPO's share of the limit too: sampling and the policy only
    assert set(grpo["flops"]) == {"sampling", "student forward + backward"} and grpo["limit_seconds"] > 0
    assert (tmp_path / "out" / "steps.png").stat().st_size > 0
    assert (tmp_path / "out" / "scaling.png").stat().st_size > 0
