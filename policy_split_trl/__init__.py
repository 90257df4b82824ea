"""Policy Split (arXiv 2604.11510) for TRL: dual-mode, entropy-regularized GRPO."""

from .asym_grpo import AsymGRPOConfig, AsymGRPOTrainer
from .baselines import (
    ClipCovGRPOConfig,
    ClipCovGRPOTrainer,
    EntropyAdvantageGRPOConfig,
    EntropyAdvantageGRPOTrainer,
    EntropyDrivenAdvantageGRPOConfig,
    EntropyDrivenAdvantageGRPOTrainer,
)
from .config import PolicySplitGRPOConfig
from .diagnostics import plot_mode_diagnostics
from .eta_control import EtaControllerCallback, adaptive_eta_update
from .methods import METHODS, AsymPolicySplitGRPOTrainer, MethodConfig, apply_method, trainer_class
from .modes import (
    HIGH_ENTROPY_MODE,
    HIGH_ENTROPY_SYSTEM_PROMPT,
    LOW_ENTROPY_SYSTEM_PROMPT,
    MODE_PROMPTS,
    NORMAL_MODE,
    REWRITTEN_HIGH_ENTROPY_SYSTEM_PROMPT,
    apply_mode,
    apply_system_prompt,
)
from .polarity import PolarityReweightingGRPOConfig, PolarityReweightingGRPOTrainer
from .trainer import PolicySplitGRPOTrainer
from .version import __version__ as __version__  # re-exported: `policy_split_trl.__version__`

__all__ = [
    "HIGH_ENTROPY_MODE",
    "HIGH_ENTROPY_SYSTEM_PROMPT",
    "LOW_ENTROPY_SYSTEM_PROMPT",
    "METHODS",
    "MODE_PROMPTS",
    "NORMAL_MODE",
    "REWRITTEN_HIGH_ENTROPY_SYSTEM_PROMPT",
    "AsymGRPOConfig",
    "AsymGRPOTrainer",
    "AsymPolicySplitGRPOTrainer",
    "ClipCovGRPOConfig",
    "ClipCovGRPOTrainer",
    "EntropyAdvantageGRPOConfig",
    "EntropyAdvantageGRPOTrainer",
    "EntropyDrivenAdvantageGRPOConfig",
    "EntropyDrivenAdvantageGRPOTrainer",
    "EtaControllerCallback",
    "MethodConfig",
    "PolarityReweightingGRPOConfig",
    "PolarityReweightingGRPOTrainer",
    "PolicySplitGRPOConfig",
    "PolicySplitGRPOTrainer",
    "adaptive_eta_update",
    "apply_method",
    "apply_mode",
    "apply_system_prompt",
    "plot_mode_diagnostics",
    "trainer_class",
]
