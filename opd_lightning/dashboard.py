"""The distillation dashboard: a TensorBoard custom-scalars layout, so per-domain and per-teacher charts sit side
by side (one chart per quantity, one line per domain or teacher) in TensorBoard's CUSTOM SCALARS tab.

Each chart is a regular expression over the tags the stages log (TensorBoard matches it from the start of the
tag): ``train/domain/<domain>/<stat>`` and ``train/teacher/<teacher>/<stat>`` for the
:data:`~opd_lightning.metrics.DISTILLATION_STATS` of MultiExpertOPD, ``train/accuracy/<domain>`` (OPD, GRPO),
``val/accuracy/<domain>`` and ``val/ood_accuracy/<domain>`` (every stage), ColdStart's
``val/<topk_overlap|student_shared_mass|teacher_shared_mass|teacher_sample_nll|teacher_accuracy>/<domain>`` and
the overlap-driven cold start's ``cold_start/topk_overlap/<domain>``. A stage gets the charts of what it logs
(:func:`layout`); :class:`DashboardLayout` writes them into the run's event file at fit start.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from opd_lightning.stages import GRPO, ColdStart, MultiExpertOPD

__all__ = ["DashboardLayout", "layout"]

_DOMAIN, _NAME = "[^/]+", "[^/]+$"
_STATS = {
    "top-k overlap": "topk_overlap",
    "student shared mass": "student_shared_mass",
    "teacher shared mass": "teacher_shared_mass",
    "reverse KL": "reverse_kl",
    "student entropy": "student_entropy",
    "teacher entropy": "teacher_entropy",
}


def layout(module: L.LightningModule) -> dict[str, dict[str, list]]:
    """``{category: {chart title: ["Multiline", [tag regex, ...]]}}`` (the form `add_custom_scalars` takes) of
    the charts `module`'s stage logs."""
    opd, cold = isinstance(module, MultiExpertOPD), isinstance(module, ColdStart)
    per_domain: dict[str, list[str]] = {}
    for title, stat in _STATS.items():
        tags = [f"train/domain/{_DOMAIN}/{stat}$"] if opd else []
        if cold and stat in ("topk_overlap", "student_shared_mass", "teacher_shared_mass"):
            tags.append(f"val/{stat}/{_NAME}")  # ColdStart measures them on held-out student rollouts
        if tags:
            per_domain[title] = tags
    if opd or isinstance(module, GRPO):
        per_domain["train accuracy"] = [f"train/accuracy/{_NAME}"]
    per_domain["val accuracy"] = [f"val/accuracy/{_NAME}"]
    per_domain["OOD accuracy"] = [f"val/ood_accuracy/{_NAME}"]
    charts = {"per domain": per_domain}
    if opd:
        per_teacher = {title: [f"train/teacher/{_DOMAIN}/{stat}$"] for title, stat in _STATS.items()}
        per_teacher["token fraction"] = [f"train/teacher/{_DOMAIN}/token_fraction$"]
        per_teacher["tokens per second"] = [f"train/teacher/{_DOMAIN}/tokens_per_s$"]
        charts["per teacher"] = per_teacher
    if cold:
        charts["cold start"] = {
            "student NLL of teacher samples": [f"val/teacher_sample_nll/{_NAME}"],
            "teacher accuracy": [f"val/teacher_accuracy/{_NAME}", f"train/teacher_accuracy/{_NAME}"],
        }
    if opd and module.overlap_cold_start is not None:
        charts["cold start"] = {
            "top-k overlap (x: cold-start step)": [f"cold_start/topk_overlap/{_NAME}"],
            "student NLL of teacher samples": ["cold_start/nll$"],
        }
    return {category: {t: ["Multiline", tags] for t, tags in c.items()} for category, c in charts.items()}


class DashboardLayout(L.Callback):
    """Writes :func:`layout` into the TensorBoard run at fit start (rank zero; a resumed run rewrites it)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.logger, TensorBoardLogger) and trainer.is_global_zero:
            trainer.logger.experiment.add_custom_scalars(layout(pl_module))
