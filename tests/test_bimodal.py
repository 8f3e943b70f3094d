"""The bimodal lesson (tools/bimodal.py): forward KL covers both modes, reverse KL locks onto one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

# tools/ holds scripts, not a package: load the file itself.
_SPEC = importlib.util.spec_from_file_location("bimodal", Path(__file__).parents[1] / "tools" / "bimodal.py")
bimodal = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bimodal)


@pytest.fixture(scope="module")
def fits() -> dict[str, dict]:
    return {objective: bimodal.fit_bimodal(objective, steps=200, seed=0) for objective in bimodal.OBJECTIVES}


def test_reverse_kl_student_locks_onto_one_mode(fits):
    fit = fits["reverse_kl"]
    masses = sorted([fit["mass_left"], fit["mass_right"]])
    assert masses[1] > 0.9 and masses[0] < 0.1
    assert fit["std"] < 2 * bimodal.MODE_STD
    assert min(abs(fit["mean"] - mode) for mode in bimodal.MODES) < 0.25


def test_forward_kl_student_spreads_over_both_modes(fits):
    fit = fits["forward_kl"]
    assert 0.25 < fit["mass_left"] < 0.75 and 0.25 < fit["mass_right"] < 0.75
    assert abs(fit["mean"]) < 0.5  # between the modes, in the valley
    assert fit["std"] > 3 * fits["reverse_kl"]["std"]


def test_each_objective_wins_on_its_own_divergence(fits):
    assert fits["forward_kl"]["forward_kl"] < fits["reverse_kl"]["forward_kl"]
    assert fits["reverse_kl"]["reverse_kl"] < fits["forward_kl"]["reverse_kl"]


def test_main_prints_the_table_and_saves_the_plot(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bimodal.png"
    monkeypatch.setattr("sys.argv", ["bimodal.py", "--out", str(out), "--steps", "20"])
    bimodal.main()
    assert "reverse_kl" in capsys.readouterr().out
    assert out.stat().st_size > 0
