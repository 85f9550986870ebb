"""attnguide: training-free, attention-based guidance (PAG, S-CFG and CFG) for diffusers U-Nets."""
from .guidance import METHODS, GuidanceConfig, SCFGOptions
from .sampling import GenerationResult, StepInfo, generate

__all__ = ["METHODS", "GuidanceConfig", "SCFGOptions", "GenerationResult", "StepInfo", "generate"]
__version__ = "0.1.0"
