"""Tiny random-weight pipelines built from configs: no downloads, seconds on a CPU."""
from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*torchvision.*")


def tiny_unet(sdxl: bool = False, attention_everywhere: bool = True):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    extra = {}
    if sdxl:
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32)
    down = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D") if attention_everywhere else ("DownBlock2D",) * 3
    up = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D") if attention_everywhere else ("UpBlock2D",) * 3
    mid = "UNetMidBlock2DCrossAttn" if attention_everywhere else None
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        mid_block_type=mid,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        cross_attention_dim=64 if sdxl else 32,
        attention_head_dim=(2, 2, 2),
        norm_num_groups=8,
        **extra,
    )


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        mid_block_add_attention=False,
    )


def tiny_text_encoder(vocab: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=24, pad_token_id=0, bos_token_id=1, eos_token_id=2, projection_dim=32,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def scheduler():
    from attnguide.builtin.model import build_scheduler

    return build_scheduler()


def sd_components(attention_everywhere: bool = True) -> dict:
    from attnguide.builtin.model import build_tokenizer

    tokenizer = build_tokenizer()
    return dict(
        unet=tiny_unet(attention_everywhere=attention_everywhere).eval(),
        vae=tiny_vae().eval(),
        text_encoder=tiny_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        scheduler=scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture
def sd_pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**sd_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def sdxl_pipe():
    from diffusers import StableDiffusionXLPipeline

    from attnguide.builtin.model import build_tokenizer

    tokenizer = build_tokenizer()
    pipe = StableDiffusionXLPipeline(
        unet=tiny_unet(sdxl=True).eval(),
        vae=tiny_vae().eval(),
        text_encoder=tiny_text_encoder(len(tokenizer)),
        text_encoder_2=tiny_text_encoder(len(tokenizer), with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=scheduler(),
        force_zeros_for_empty_prompt=True,
    )
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


def sdxl_components(unet=None) -> dict:
    from attnguide.builtin.model import build_tokenizer

    tokenizer = build_tokenizer()
    return dict(
        unet=(unet if unet is not None else tiny_unet(sdxl=True)).eval(),
        vae=tiny_vae().eval(),
        text_encoder=tiny_text_encoder(len(tokenizer)),
        text_encoder_2=tiny_text_encoder(len(tokenizer), with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=scheduler(),
    )


def pipeline_from(class_name: str, components: dict, **extra):
    """diffusers' pipeline ``class_name`` built from the components it takes (skips the test when
    this diffusers version lacks the class), progress bar off."""
    import inspect

    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        pytest.skip(f"diffusers {diffusers.__version__} has no {class_name}")
    accepted = inspect.signature(cls.__init__).parameters
    pipe = cls(**{k: v for k, v in components.items() if k in accepted}, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe
