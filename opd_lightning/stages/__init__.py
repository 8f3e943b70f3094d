from opd_lightning.stages.base import EvalConfig, PolicyModule, WarmupLinearDecay
from opd_lightning.stages.sft import SFT

__all__ = ["SFT", "EvalConfig", "PolicyModule", "WarmupLinearDecay"]
