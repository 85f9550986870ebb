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
