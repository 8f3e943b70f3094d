import torch

from opd_lightning.data.tasks import TaskSpec
from opd_lightning.rollout import SamplingConfig
from opd_lightning.sharding import ShardingConfig
from opd_lightning.stages.base import EvalConfig, PolicyModule, WarmupLinearDecay
from opd_lightning.stages.cold_start import ColdStart, ColdStartConfig
from opd_lightning.stages.grpo import GRPO, GRPOConfig, RewardTerm
from opd_lightning.stages.opd import DistillConfig, MultiExpertOPD
from opd_lightning.stages.overlap_cold_start import OverlapColdStart
from opd_lightning.stages.sft import SFT

__all__ = ["SFT", "EvalConfig", "PolicyModule", "WarmupLinearDecay"]
__all__ += ["GRPO", "GRPOConfig", "RewardTerm"]
__all__ += ["DistillConfig", "MultiExpertOPD", "OverlapColdStart"]
__all__ += ["ColdStart", "ColdStartConfig"]

# Checkpoints keep these plain-data config dataclasses in their hyper-parameters: allow them under
# torch.load(weights_only=True), so resuming stays safe by default instead of needing weights_only=False.
torch.serialization.add_safe_globals(
    [TaskSpec, SamplingConfig, EvalConfig, GRPOConfig, RewardTerm, DistillConfig, ColdStartConfig, ShardingConfig]
    + [OverlapColdStart]
)
