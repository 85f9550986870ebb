"""Tiny random-weight pipelines built from configs: no downloads, seconds on a CPU."""
from __future__ import annotations

import warnings

import pytest
import torch

# The tiny model is the benchmark's smoke model too: one definition, in the package.
from attnguide.evaluation.bench_models import make_scheduler as scheduler
from attnguide.evaluation.bench_models import tiny_sd_components as sd_components
from attnguide.evaluation.bench_models import tiny_sdxl_components as sdxl_components
from attnguide.evaluation.bench_models import tiny_text_encoder, tiny_unet, tiny_vae

warnings.filterwarnings("ignore", message=".*torchvision.*")

__all__ = ["scheduler", "sd_components", "sdxl_components", "tiny_text_encoder", "tiny_unet", "tiny_vae"]


@pytest.fixture
def sd_pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**sd_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def sdxl_pipe():
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**sdxl_components(), force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- builders for the engine tests: conditioning models and adapters, random weights, offline ---


def tiny_inpaint_unet(sdxl: bool = False):
    """A 9-channel inpainting U-Net (latents + mask + masked-image latents)."""
    from diffusers import UNet2DConditionModel

    config = dict(tiny_unet(sdxl=sdxl).config)
    config["in_channels"] = 9
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(config).eval()


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    """diffusers zero-initializes ControlNet's output convs (so a fresh ControlNet adds nothing);
    give every parameter of ``module`` random values so the conditioning really changes the U-Net."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)


def tiny_controlnet(unet, seed: int = 1):
    """A ControlNet shaped like ``unet`` (4 latent channels) with random, non-zero output convs."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    config = dict(unet.config)
    config["in_channels"] = 4
    base = UNet2DConditionModel.from_config(config)
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(base, conditioning_embedding_out_channels=(8, 16), load_weights_from_unet=False)
    _randomize(controlnet.controlnet_down_blocks, seed)
    _randomize(controlnet.controlnet_mid_block, seed + 100)
    _randomize(controlnet.controlnet_cond_embedding.conv_out, seed + 200)
    return controlnet.eval()


def tiny_t2i_adapter(seed: int = 2):
    """A full T2I-Adapter whose features match ``tiny_unet``'s down blocks (16, 32, 32 channels)."""
    from diffusers import T2IAdapter

    torch.manual_seed(seed)
    return T2IAdapter(in_channels=3, channels=[16, 32, 32], num_res_blocks=1, downscale_factor=2,
                      adapter_type="full_adapter").eval()


def tiny_motion_adapter(seed: int = 3):
    from diffusers import MotionAdapter

    torch.manual_seed(seed)
    return MotionAdapter(block_out_channels=(16, 32, 32), motion_layers_per_block=1, motion_num_attention_heads=2,
                         motion_norm_num_groups=8, motion_max_seq_length=8, use_motion_mid_block=True).eval()


IP_EMBED_DIM = 16


def load_tiny_ip_adapter(unet, seed: int = 4) -> None:
    """Load an IP-Adapter (image projection + decoupled cross-attention processors) onto ``unet``
    from a random state dict in the original IP-Adapter layout, as ``load_ip_adapter`` would."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.2

    cross = unet.config.cross_attention_dim
    image_proj = {"proj.weight": rand(4 * cross, IP_EMBED_DIM), "proj.bias": rand(4 * cross),
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    ip_adapter, key_id = {}, 1
    channels = unet.config.block_out_channels
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        ip_adapter[f"{key_id}.to_k_ip.weight"] = rand(hidden, cross)
        ip_adapter[f"{key_id}.to_v_ip.weight"] = rand(hidden, cross)
        key_id += 2
    unet._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": ip_adapter}], low_cpu_mem_usage=False)


def pipeline_from(class_name: str, components: dict, **extra):
    """diffusers' pipeline ``class_name`` built from the components it takes (skips the test when
    this diffusers version lacks the class), progress bar off."""
    import diffusers

    from attnguide.evaluation.tiny_transformers import pipeline_from as build

    pipe = build(class_name, components, **extra)
    if pipe is None:
        pytest.skip(f"diffusers {diffusers.__version__} has no {class_name}")
    return pipe
