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
    assert (tmp_path / "out" / "steps.png").stat().st_size > 0
    assert (tmp_path / "out" / "scaling.png").stat().st_size > 0
