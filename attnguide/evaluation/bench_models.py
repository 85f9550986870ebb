"""The benchmark's models: Stable Diffusion 1.5 / SDXL architectures with random weights, the test-sized
tiny model and the package's built-in model, plus their image geometry (native size, size multiple)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .tiny_transformers import FAMILIES as TRANSFORMER_FAMILIES
from .tiny_transformers import build_family

# Transformer families at test size (random weights, CPU-sized): the engine's transformer paths, timed.
TRANSFORMER_MODELS = tuple(f"tiny-{name}" for name in TRANSFORMER_FAMILIES)
MODELS = ("tiny", "builtin", "sd15", "sdxl", *TRANSFORMER_MODELS)
DTYPES = ("float32", "float16", "bfloat16")
SD_TOKENS = 77  # CLIP's context length in SD 1.x / SDXL: the token count of every cross-attention map


def sd_tokenizer(max_length: int):
    """The built-in word tokenizer (offline), padded to ``max_length`` tokens."""
    from attnguide.builtin.model import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.model_max_length = max_length
    return tokenizer


def make_scheduler():
    from attnguide.builtin.model import build_scheduler

    return build_scheduler()


def clip_text(vocab: int, hidden: int, layers: int, heads: int, ffn: int, positions: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
        max_position_embeddings=positions, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        projection_dim=projection or hidden,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _sd_vae(scaling_factor: float, sample_size: int, force_upcast: bool):
    """Stable Diffusion's AutoencoderKL architecture (the same for SD 1.x and SDXL), random weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=sample_size, scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    ).eval()


# The U-Net architectures of the random-weight models (also built on the meta device by ``count_costs``).
UNET_CONFIGS: dict[str, dict] = {
    "tiny": dict(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32, 32), layers_per_block=1, cross_attention_dim=32,
        attention_head_dim=(2, 2, 2), norm_num_groups=8,
    ),
    "sd15": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    ),
    "sdxl": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        use_linear_projection=True, norm_num_groups=32,
    ),
}


def tiny_unet(sdxl: bool = False, attention_everywhere: bool = True):
    """The tiny SD-shaped U-Net of the benchmark's smoke runs and the test suite: 3 levels on 16x16
    latents, seeded (the same weights every call). ``sdxl`` adds SDXL's text-time conditioning;
    ``attention_everywhere=False`` leaves no attention layer (for refusal tests)."""
    from diffusers import UNet2DConditionModel

    config = dict(UNET_CONFIGS["tiny"], mid_block_type="UNetMidBlock2DCrossAttn")
    if sdxl:
        config.update(cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=8 * 6 + 32)
    if not attention_everywhere:
        config.update(down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3, mid_block_type=None)
    torch.manual_seed(0)
    return UNet2DConditionModel(**config).eval()


def tiny_vae():
    """A 2-level AutoencoderKL (factor 2: 32-pixel images for 16x16 latents), seeded."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=8, sample_size=32, mid_block_add_attention=False,
    ).eval()


def tiny_text_encoder(vocab: int, with_projection: bool = False):
    """A 2-layer CLIP text encoder of width 32 over ``vocab`` tokens (24 positions), seeded."""
    torch.manual_seed(0)
    return clip_text(vocab, 32, 2, 2, 64, 24, projection=32 if with_projection else None)


def tiny_sd_components(attention_everywhere: bool = True) -> dict:
    """The tiny model as ``StableDiffusionPipeline`` components (built-in word tokenizer and scheduler)."""
    tokenizer = sd_tokenizer(24)
    return dict(unet=tiny_unet(attention_everywhere=attention_everywhere), vae=tiny_vae(),
                text_encoder=tiny_text_encoder(len(tokenizer)), tokenizer=tokenizer, scheduler=make_scheduler(),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def tiny_sdxl_components(unet=None) -> dict:
    """The tiny model as ``StableDiffusionXLPipeline`` components (two text encoders)."""
    tokenizer = sd_tokenizer(24)
    return dict(unet=(unet if unet is not None else tiny_unet(sdxl=True)).eval(), vae=tiny_vae(),
                text_encoder=tiny_text_encoder(len(tokenizer)),
                text_encoder_2=tiny_text_encoder(len(tokenizer), with_projection=True),
                tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=make_scheduler())


def _sd15_components() -> dict:
    """Stable Diffusion 1.5's U-Net, VAE and CLIP ViT-L text encoder architectures with random
    weights (timing does not depend on the weights); the word tokenizer pads to 77 tokens like CLIP."""
    from diffusers import UNet2DConditionModel

    tokenizer = sd_tokenizer(SD_TOKENS)
    unet = UNet2DConditionModel(**UNET_CONFIGS["sd15"]).eval()
    text_encoder = clip_text(len(tokenizer), 768, 12, 12, 3072, SD_TOKENS)
    return dict(unet=unet, vae=_sd_vae(0.18215, 512, False), text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=make_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _sdxl_components() -> dict:
    """SDXL base's U-Net, VAE and both text encoders' architectures with random weights."""
    from diffusers import UNet2DConditionModel

    tokenizer = sd_tokenizer(SD_TOKENS)
    unet = UNet2DConditionModel(**UNET_CONFIGS["sdxl"]).eval()
    return dict(
        unet=unet, vae=_sd_vae(0.13025, 1024, True),
        text_encoder=clip_text(len(tokenizer), 768, 12, 12, 3072, SD_TOKENS),
        text_encoder_2=clip_text(len(tokenizer), 1280, 32, 20, 5120, SD_TOKENS, projection=1280),
        tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=make_scheduler(), force_zeros_for_empty_prompt=True,
    )


def build_pipeline(model: str = "tiny", device: str = "cpu", dtype: str = "float32", model_path: str | Path | None = None):
    """The benchmark's pipeline for ``model``.

    tiny: the test suite's tiny random model (smoke tests). builtin: the package's trained model
    (or the diffusers folder ``model_path``). sd15 / sdxl: Stable Diffusion 1.5 / SDXL architectures
    with random weights (no download; timing does not depend on weights). tiny-sd3, tiny-pixart-sigma,
    tiny-hunyuan-dit, tiny-sana, tiny-flux: the test suite's tiny random transformer pipelines.
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    if model == "builtin":
        from attnguide.pipelines import builtin_model_path, load_pipeline

        path = Path(model_path) if model_path is not None else builtin_model_path()
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"model 'builtin': no trained model at {path} (no model_index.json). Train and export it first "
                "(`attnguide train`), pass a diffusers folder with --model-path, or benchmark --model tiny/sd15/sdxl."
            )
        return load_pipeline(path, device=device, dtype=dtype)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    torch.manual_seed(0)
    if model in TRANSFORMER_MODELS:
        pipe = build_family(transformer_family(model).name)
    elif model == "sdxl":
        pipe = StableDiffusionXLPipeline(**_sdxl_components())
    else:
        pipe = StableDiffusionPipeline(**(tiny_sd_components() if model == "tiny" else _sd15_components()))
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe if torch_dtype == torch.float32 else pipe.to(dtype=torch_dtype)


def transformer_family(model: str):
    """The ``tiny_transformers`` family of a ``tiny-NAME`` model, else None."""
    return TRANSFORMER_FAMILIES.get(model[len("tiny-"):]) if model in TRANSFORMER_MODELS else None


def pipeline_geometry(pipe, model: str | None = None) -> tuple[int, int]:
    """(native image size, the multiple every image side must be) of a built pipeline (a tiny
    transformer family's native size is its test size)."""
    from attnguide.sampling import default_size, size_multiple

    family = transformer_family(model or "")
    return (family.size if family else default_size(pipe)), size_multiple(pipe)


def config_geometry(model: str, model_path: str | Path | None) -> tuple[int, int]:
    """``pipeline_geometry`` without building the model (read from its configs)."""
    if model == "tiny":
        return 32, 8
    if model == "sd15":
        return 512, 64
    if model == "sdxl":
        return 1024, 32
    if model in TRANSFORMER_MODELS:  # tiny: building it is the simplest way to read its geometry
        return pipeline_geometry(build_pipeline(model), model)
    from attnguide.pipelines import builtin_model_path

    path = Path(model_path) if model_path is not None else builtin_model_path()
    try:
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError("no model_index.json")
        unet = json.loads((path / "unet" / "config.json").read_text())
        vae = json.loads((path / "vae" / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"model 'builtin': no trained model at {path} ({exc}). Train and export it first (`attnguide train`), "
            "pass a diffusers folder with --model-path, or benchmark --model tiny/sd15/sdxl."
        ) from None
    vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return unet["sample_size"] * vae_factor, vae_factor * 2 ** (len(unet["up_block_types"]) - 1)


def resolve_size(size: tuple[int | None, int | None], geometry: tuple[int, int], model: str, device: str) -> tuple[int, int]:
    """The (height, width) to run: the given one (checked), else the native size (256 for
    SD 1.5 / SDXL on CPU, where the native size takes minutes per step)."""
    native, multiple = geometry
    if model in ("sd15", "sdxl") and not str(device).startswith("cuda"):
        native = 256
    out = []
    for name, value in zip(("height", "width"), size):
        value = native if value is None else value
        if value <= 0 or value % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple} for model {model!r}, got {value}")
        out.append(value)
    return out[0], out[1]
