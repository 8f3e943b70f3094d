from opd_lightning.stages.base import EvalConfig, PolicyModule, WarmupLinearDecay
from opd_lightning.stages.cold_start import ColdStart, ColdStartConfig
from opd_lightning.stages.grpo import GRPO, GRPOConfig, RewardTerm
from opd_lightning.stages.opd import DistillConfig, MultiExpertOPD
from opd_lightning.stages.sft import SFT

__all__ = ["SFT", "EvalConfig", "PolicyModule", "WarmupLinearDecay"]
__all__ += ["GRPO", "GRPOConfig", "RewardTerm"]
__all__ += ["DistillConfig", "MultiExpertOPD"]
__all__ += ["ColdStart", "ColdStartConfig"]
