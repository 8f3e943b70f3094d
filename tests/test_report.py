"""The final table: accuracy per aligned domain with intervals, the student/expert ratio and the gain share."""

import json

from opd_lightning.data.tasks import TaskSpec
from opd_lightning.report import write_results

SPECS = [TaskSpec("basic_arithmetic", "math"), TaskSpec("chain_sum", "math", aligned=False)]


def test_results_give_accuracy_per_aligned_domain_the_ratio_and_the_share_of_the_experts_gain(tmp_path):
    def right(k: int) -> list[float]:  # k of 10 held-out prompts answered exactly
        return [1.0] * k + [0.0] * (10 - k)

    scores = {
        "base": {"basic_arithmetic": right(6), "chain_sum": right(0)},
        "expert/math": {"basic_arithmetic": right(10), "chain_sum": right(1)},
        "student": {"basic_arithmetic": right(9), "chain_sum": right(0)},
        "baseline/sft-merge": {"basic_arithmetic": right(5), "chain_sum": right(0)},
    }
    results = write_results(tmp_path, scores, SPECS, {"base": 1.0}, experts={"math": "expert/math"})
    assert results == json.loads((tmp_path / "results.json").read_text())
    assert results["accuracy"]["student"] == {"math": 0.9}, "OOD tasks stay out of the domain's accuracy"
    assert results["task_accuracy"]["expert/math"]["chain_sum"] == 0.1
    lo, hi = results["interval95"]["student"]["math"]
    assert lo < 0.9 < hi
    table = (tmp_path / "results.md").read_text()
    assert "student / expert = 0.90 (0.900 / 1.000)" in table
    # base 0.6 -> expert 1.0: the student keeps (0.9 - 0.6) / 0.4 of the gain, the baseline falls below the base
    assert "kept: student +75%, baseline/sft-merge -25%" in table
    assert (tmp_path / "accuracy.png").is_file()
