"""``generate``: images from a diffusers pipeline with CFG, PAG, S-CFG or a combination, in one call.

A thin user of the engine (``engine.guide``): it builds the working pipeline for the workflow
(text-to-image, img2img with ``image``, inpainting with ``image`` + ``mask_image``) from the
components of the pipeline it is given, with a copy of its scheduler, and calls it inside
``guide``. The given pipeline is only read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import segmentation
from .engine import DEFAULT_PAG_LAYERS, StepInfo, guide
from .guidance import GuidanceConfig, SCFGOptions

__all__ = ["GenerationResult", "StepInfo", "generate"]


@dataclass
class GenerationResult:
    """Images (PIL, or a float tensor in [0, 1] for ``output_type="pt"``), masks when asked, and
    the number of U-Net evaluations (per image) the run cost."""

    images: list
    masks: segmentation.MaskSet | None = None
    unet_evaluations: int = 0
    branches_per_step: list[tuple[str, ...]] = field(default_factory=list)


def _as_list(value, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {value!r}")


def _check_pipe(pipe) -> None:
    missing = [a for a in ("unet", "vae", "scheduler", "encode_prompt", "prepare_latents") if not hasattr(pipe, a)]
    if missing:
        raise ValueError(f"pipe must be a diffusers Stable Diffusion or SDXL pipeline; it lacks {missing}")


def _check_size(pipe, height: int, width: int) -> None:
    multiple = pipe.vae_scale_factor * 2 ** len(getattr(pipe.unet, "up_blocks", [None])[1:])
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % multiple:
            raise ValueError(
                f"{name} must be a positive multiple of {multiple} for this model (VAE factor "
                f"{pipe.vae_scale_factor} x U-Net factor {multiple // pipe.vae_scale_factor}), got {value!r}"
            )


def _generators(seed, generator, batch: int, device) -> torch.Generator | list[torch.Generator] | None:
    """One generator per image when seeds are given, so an image depends only on its own seed."""
    if seed is not None and generator is not None:
        raise ValueError("give either seed or generator, not both")
    if seed is None:
        return generator
    seeds = [seed + i for i in range(batch)] if isinstance(seed, int) else list(seed)
    if len(seeds) != batch or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seed must be an int or a list of {batch} ints (one per image), got {seed!r}")
    return [torch.Generator(device="cpu").manual_seed(s) for s in seeds]


def _working_pipeline(pipe, scheduler, image, mask_image):
    """The pipeline for the workflow, sharing ``pipe``'s components (nothing is copied but the
    scheduler, so ``pipe`` itself is never changed)."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

    auto = AutoPipelineForText2Image if image is None else (AutoPipelineForImage2Image if mask_image is None else AutoPipelineForInpainting)
    try:
        work = auto.from_pipe(pipe, scheduler=scheduler)
    except ValueError as error:
        raise ValueError(f"image/mask_image: no {auto.__name__[15:]} pipeline for {type(pipe).__name__} ({error})") from None
    work.set_progress_bar_config(disable=True)
    return work


def _open_image(value, name: str):
    """A PIL image from a PIL image or a path."""
    from PIL import Image

    if value is None or isinstance(value, Image.Image):
        return value
    try:
        return Image.open(value).convert("RGB")
    except (OSError, TypeError) as error:
        raise ValueError(f"{name} must be a PIL image or the path of an image file, got {value!r} ({error})") from None


@torch.no_grad()
def generate(
    pipe,
    prompt: str | Sequence[str],
    *,
    method: str = "cfg",
    guidance_scale: float = 7.5,
    pag_scale: float = 3.0,
    pag_layers: str | Sequence[str] = DEFAULT_PAG_LAYERS,
    num_inference_steps: int = 50,
    negative_prompt: str | Sequence[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    num_images_per_prompt: int = 1,
    generator: torch.Generator | list[torch.Generator] | None = None,
    seed: int | Sequence[int] | None = None,
    image=None,
    strength: float = 0.8,
    mask_image=None,
    return_masks: bool = False,
    mask_steps: Sequence[int] | None = None,
    cfg_window: tuple[float, float] = (0.0, 1.0),
    pag_window: tuple[float, float] = (0.0, 1.0),
    guidance_rescale: float = 0.0,
    scfg: SCFGOptions | dict | None = None,
    scheduler=None,
    eta: float = 0.0,
    clip_skip: int | None = None,
    output_type: str = "pil",
    callback: Callable[[StepInfo], None] | None = None,
    progress: bool = True,
) -> GenerationResult:
    """Sample images with CFG, PAG, S-CFG or a combination, on a diffusers SD/SDXL pipeline.

    Args:
        pipe: a diffusers ``StableDiffusionPipeline``/``StableDiffusionXLPipeline`` (or any pipeline
            of those families: its components are reused for the workflow).
        prompt: one prompt or a list; ``negative_prompt`` the same count (or one string for all).
        method: one of ``none, cfg, pag, cfg+pag, scfg, scfg+pag``.
        guidance_scale: w of CFG/S-CFG (> 1 for the methods that use it; ignored by ``none``/``pag``).
        pag_scale: s of PAG. pag_layers: self-attention layers PAG perturbs (names or component
            patterns; ``attnguide layers`` lists them); default the mid block.
        seed: an int (image i gets seed + i) or one int per image; or pass ``generator``.
        image, strength: img2img from ``image`` (PIL image or path); with ``mask_image`` too,
            inpainting (white = repaint).
        return_masks: also return S-CFG's per-token masks (for ``mask_steps``, default every step).
        cfg_window / pag_window: fractions [start, stop) of the steps where each term is active.
        scfg: ``SCFGOptions`` or a dict of its fields (mode, levels, power, smoothing, rate_min, rate_max, cap).
        scheduler: a diffusers scheduler to use instead of (a copy of) the pipeline's.
        callback: called with a ``StepInfo`` after every step.

    Returns a ``GenerationResult`` with ``.images`` and, when asked, ``.masks``. The pipeline is
    unchanged afterwards, also when this raises.
    """
    # --- validate everything before any work -------------------------------------------------
    _check_pipe(pipe)
    if isinstance(scfg, dict):
        scfg = SCFGOptions(**scfg)
    config = GuidanceConfig(
        method=method, guidance_scale=guidance_scale, pag_scale=pag_scale, cfg_window=cfg_window,
        pag_window=pag_window, guidance_rescale=guidance_rescale, scfg=scfg or SCFGOptions(),
    )
    if config.uses_cfg and guidance_scale <= 1:
        raise ValueError(f"guidance_scale must be > 1 for method {method!r} (it is CFG's w), got {guidance_scale!r}")
    prompts = _as_list(prompt, "prompt")
    negatives = None
    if negative_prompt is not None:
        negatives = _as_list(negative_prompt, "negative_prompt")
        if len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt must have one entry per prompt: {len(negatives)} given for {len(prompts)} prompts")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
    if output_type not in ("pil", "np", "pt", "latent"):
        raise ValueError(f"output_type must be one of 'pil', 'np', 'pt', 'latent', got {output_type!r}")
    if not (isinstance(strength, (int, float)) and 0.0 < strength <= 1.0):
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    if mask_image is not None and image is None:
        raise ValueError("mask_image needs image (the picture to inpaint)")
    image, mask_image = _open_image(image, "image"), _open_image(mask_image, "mask_image")
    default_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height = default_size if height is None else height
    width = default_size if width is None else width
    _check_size(pipe, height, width)
    if mask_steps is not None and any(not 0 <= s < num_inference_steps for s in mask_steps):
        raise ValueError(f"mask_steps must lie in [0, {num_inference_steps}), got {list(mask_steps)!r}")
    batch = len(prompts) * num_images_per_prompt
    generators = _generators(seed, generator, batch, "cpu")

    # --- run the user's workflow inside the engine ------------------------------------------------
    sched = scheduler if scheduler is not None else type(pipe.scheduler).from_config(pipe.scheduler.config)
    work = _working_pipeline(pipe, sched, image, mask_image)
    work.set_progress_bar_config(disable=not progress, desc=f"sampling ({method})")
    kwargs = dict(
        prompt=prompts, negative_prompt=negatives, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale if config.uses_cfg else 1.0, num_images_per_prompt=num_images_per_prompt,
        generator=generators, eta=eta, clip_skip=clip_skip, output_type=output_type,
    )
    if image is None or mask_image is not None:
        kwargs.update(height=height, width=width)
    if image is not None:
        kwargs.update(image=image, strength=strength)
    if mask_image is not None:
        kwargs["mask_image"] = mask_image
    with guide(work, method, pag_scale=pag_scale, pag_layers=pag_layers, cfg_window=cfg_window, pag_window=pag_window,
               guidance_rescale=guidance_rescale, scfg=config.scfg, return_masks=return_masks, mask_steps=mask_steps,
               callback=callback) as run:
        out = work(**kwargs)
    images = out.images
    if output_type == "pt":
        images = images.float()
    return GenerationResult(images=images, masks=run.masks, unet_evaluations=run.unet_evaluations,
                            branches_per_step=run.branches_per_step)
