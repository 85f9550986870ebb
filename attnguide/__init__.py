"""attnguide: training-free, attention-based guidance (PAG, S-CFG and CFG) for diffusers U-Nets."""
from .builtin.autoencoder import PatchAutoencoder  # the built-in model's autoencoder, named in its model_index.json
from .guidance import METHODS, GuidanceConfig, SCFGOptions
from .sampling import GenerationResult, StepInfo, generate

__all__ = ["METHODS", "GuidanceConfig", "SCFGOptions", "GenerationResult", "StepInfo", "generate", "PatchAutoencoder"]
__version__ = "0.1.0"
