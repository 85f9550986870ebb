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

from . import segmentation, validation
from .engine import DEFAULT_PAG_LAYERS, StepInfo, guide
from .guidance import METHODS, REGISTRY, SCFGOptions
from .pipeline_call import runs_separate_cfg
from .pipelines import resolve_settings
from .transformer_attention import denoiser
from .validation import Limits, NonFiniteError

__all__ = ["GenerationResult", "StepInfo", "generate", "check_arguments"]


@dataclass
class GenerationResult:
    """Images (PIL, or a float tensor in [0, 1] for ``output_type="pt"``), masks when asked, and
    the number of U-Net evaluations (per image) the run cost."""

    images: list
    masks: segmentation.MaskSet | None = None
    unet_evaluations: int = 0
    branches_per_step: list[tuple[str, ...]] = field(default_factory=list)


def _check_pipe(pipe) -> None:
    missing = [a for a in ("vae", "scheduler", "encode_prompt", "prepare_latents") if not hasattr(pipe, a)]
    if denoiser(pipe) is None:
        missing.insert(0, "unet or transformer")
    if missing:
        raise ValueError(f"pipe must be a diffusers text-to-image pipeline (SD, SDXL, SD3, PixArt, Sana, HunyuanDiT, Flux); "
                         f"it lacks {missing}")


def size_multiple(pipe) -> int:
    """Height and width must be multiples of this: the VAE's factor times the U-Net's downsampling,
    or times a transformer's patch size (and Flux's 2x2 latent packing)."""
    model = denoiser(pipe)
    if hasattr(model, "up_blocks"):
        return pipe.vae_scale_factor * 2 ** len(model.up_blocks[1:])
    patch = int(getattr(model.config, "patch_size", 1) or 1)
    return pipe.vae_scale_factor * patch * (2 if hasattr(pipe, "_pack_latents") else 1)


def default_size(pipe) -> int:
    """The pipeline's native image side in pixels."""
    size = getattr(pipe, "default_sample_size", None) or denoiser(pipe).config.sample_size
    return int(size) * pipe.vae_scale_factor


def _call_kwargs(work, kwargs: dict) -> dict:
    """The keyword arguments the workflow's pipeline takes; one it lacks may only have its default."""
    import inspect

    accepted = set(inspect.signature(type(work).__call__).parameters)
    for name in ("negative_prompt", "clip_skip"):  # unset: the pipeline's own default ("" for PixArt's negative prompt)
        if kwargs.get(name) is None:
            kwargs.pop(name, None)
    defaults = {"eta": 0.0, "clip_skip": None, "negative_prompt": None, "callback_on_step_end": None}
    for name in [k for k in kwargs if k not in accepted]:
        if name in defaults and kwargs[name] != defaults[name] and name != "callback_on_step_end":
            raise ValueError(f"{name}: {type(work).__name__} does not take {name} (got {kwargs[name]!r})")
        kwargs.pop(name)
    return kwargs


def _check_size(pipe, height, width) -> tuple[int, int]:
    multiple = size_multiple(pipe)
    checked = []
    for name, value in (("height", height), ("width", width)):
        value = validation.integer(name, value, minimum=1)
        if value % multiple:
            raise ValueError(
                f"{name} must be a positive multiple of {multiple} for this model (VAE factor "
                f"{pipe.vae_scale_factor} x denoiser factor {multiple // pipe.vae_scale_factor}), got {value!r}"
            )
        checked.append(value)
    return checked[0], checked[1]


def _check_pixels(name: str, height: int, width: int, limits: Limits) -> None:
    if height * width > limits.max_pixels:
        raise ValueError(f"{name}: {width}x{height} = {height * width} pixels is more than attnguide.Limits.max_pixels = "
                         f"{limits.max_pixels} (raise the limit to allow it)")


def _distilled(pipe) -> bool:
    """A guidance-distilled model (Flux): its guidance_scale is an input of the denoiser, not CFG's w."""
    return bool(getattr(denoiser(pipe).config, "guidance_embeds", False))


def _check_clip_skip(pipe, clip_skip):
    if clip_skip is None:
        return None
    encoders = [e for e in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if e is not None]
    layers = min((int(getattr(e.config, "num_hidden_layers", 1)) for e in encoders), default=1)
    return validation.integer("clip_skip", clip_skip, minimum=0, maximum=max(layers - 1, 0),
                              hint=f" (the text encoder has {layers} layers)")


def _check_scheduler(scheduler) -> None:
    if scheduler is None:
        return
    missing = [a for a in ("set_timesteps", "step", "config", "timesteps") if not hasattr(scheduler, a)]
    if missing:
        raise TypeError(f"scheduler must be a diffusers scheduler instance (e.g. DDIMScheduler.from_config(pipe.scheduler.config)), "
                        f"got {scheduler!r} ({type(scheduler).__name__}, lacks {missing})")


def _generators(seed, generator, batch: int) -> torch.Generator | list[torch.Generator] | None:
    """One generator per image when seeds are given, so an image depends only on its own seed."""
    if seed is not None and generator is not None:
        raise ValueError("seed: give either seed or generator, not both")
    if seed is None:
        if generator is None or isinstance(generator, torch.Generator):
            return generator
        if isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator):
            if len(generator) != batch:
                raise ValueError(f"generator: a list needs one torch.Generator per image ({batch}), got {len(generator)}")
            return list(generator)
        raise TypeError(f"generator must be a torch.Generator or a list of them, got {generator!r}")
    return [torch.Generator(device="cpu").manual_seed(s) for s in validation.seed_list(seed, batch)]


def _working_pipeline(pipe, scheduler, image, mask_image):
    """The pipeline for the workflow, sharing ``pipe``'s components (nothing is copied but the
    scheduler, so ``pipe`` itself is never changed)."""
    from .pipelines import quiet

    with quiet():  # importing diffusers' pipelines makes transformers log notices about optional backends
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

    auto = AutoPipelineForText2Image if image is None else (AutoPipelineForImage2Image if mask_image is None else AutoPipelineForInpainting)
    try:
        with quiet():
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
    method: str | None = None,
    guidance_scale: float | None = None,
    pag_scale: float | None = None,
    pag_layers: str | Sequence[str] | None = None,
    num_inference_steps: int | None = None,
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
    pipeline_kwargs: dict | None = None,
    progress: bool = True,
    limits: Limits | dict | None = None,
    _check_only: bool = False,
) -> GenerationResult:
    """Sample images with CFG, PAG, S-CFG or a combination, on a diffusers SD/SDXL pipeline.

    Args:
        pipe: a diffusers ``StableDiffusionPipeline``/``StableDiffusionXLPipeline`` (or any pipeline
            of those families: its components are reused for the workflow).
        prompt: one prompt or a list; ``negative_prompt`` the same count (or one string for all).
            ``negative_prompt`` needs a method with CFG (``none``/``pag`` have no unconditional branch).
        method: one of ``none, cfg, pag, cfg+pag, scfg, scfg+pag``.
        guidance_scale: w of CFG/S-CFG (> 1 for the methods that use it; checked but ignored by ``none``/``pag``).
            On Flux it is passed as ``true_cfg_scale`` (its negative prompt defaults to ""), batched with
            the prompt in one transformer call; with ``none``/``pag`` it is Flux's embedded guidance.
        pag_scale: s of PAG. pag_layers: self-attention layers PAG perturbs (names or component
            patterns; ``attnguide layers`` lists them).
        method, guidance_scale, pag_scale, pag_layers, num_inference_steps: None takes the model folder's
            recommendation (its ``attnguide.json``), else the library default
            (``attnguide.recommended_settings``: scfg+pag, w 7.5, s 3.0, the mid block, 50 steps).
        seed: an int (image i gets seed + i) or one int per image, each in [0, 2**32 - 1] (torch's CPU
            generator keeps 32 bits); or pass ``generator``.
        image, strength: img2img from ``image`` (PIL image or path; its size is the output size, so
            height/width are refused); with ``mask_image`` too, inpainting (white = repaint).
        return_masks: also return S-CFG's per-token masks (for ``mask_steps``, default every step).
        cfg_window / pag_window: fractions [start, stop) of the steps where each term is active; a
            window of a term the method uses must contain at least one step.
        scfg: ``SCFGOptions`` or a dict of its fields (mode, levels, power, smoothing, rate_min, rate_max, cap).
        scheduler: a diffusers scheduler to use instead of (a copy of) the pipeline's.
        eta: DDIM's eta in [0, 1] (other schedulers ignore it). clip_skip: CLIP layers to skip.
        callback: called with a ``StepInfo`` after every step.
        pipeline_kwargs: further keyword arguments of the pipeline's own call (e.g.
            ``max_sequence_length`` of SD3/PixArt); they may not repeat one of ``generate``'s.
        limits: ``attnguide.Limits`` (or a dict of its fields): upper bounds of the scales, image
            size, images per call and steps, checked before any work (defaults: 100, 2048x2048
            pixels, 64 images, 1000 steps).

    Every option is checked (whether or not ``method`` uses it) before the first U-Net call; bad
    input raises ``ValueError`` (``TypeError`` for a value of the wrong kind) whose message starts with
    the parameter's name. NaN/infinite values during sampling raise ``attnguide.NonFiniteError``
    naming the step and the cause. Returns a ``GenerationResult`` with ``.images`` and, when asked,
    ``.masks``. The pipeline is unchanged afterwards, also when this raises.
    """
    # --- validate everything before any work -------------------------------------------------
    limits = validation.as_limits(limits)
    _check_pipe(pipe)
    settings = resolve_settings(pipe, method=method, guidance_scale=guidance_scale, pag_scale=pag_scale,
                                pag_layers=pag_layers, num_inference_steps=num_inference_steps)
    method, guidance_scale, pag_scale, pag_layers, num_inference_steps = (
        settings[k] for k in ("method", "guidance_scale", "pag_scale", "pag_layers", "num_inference_steps"))
    method = validation.choice("method", method, METHODS)
    uses = REGISTRY[method]
    guidance_scale = validation.number("guidance_scale", guidance_scale, minimum=0.0, maximum=limits.max_scale,
                                       hint=" (attnguide.Limits.max_scale bounds it)")
    if uses.uses_cfg and guidance_scale <= 1:
        raise ValueError(f"guidance_scale must be > 1 for method {method!r} (it is CFG's w), got {guidance_scale!r}")
    (_, pag_scale, pag_layers, cfg_window, pag_window, guidance_rescale, scfg, return_masks, mask_steps,
     callback) = validation.check_guide_arguments(pipe, method, pag_scale, pag_layers, cfg_window, pag_window,
                                                  guidance_rescale, scfg, return_masks, mask_steps, callback,
                                                  DEFAULT_PAG_LAYERS, limits)
    prompts, negatives = _check_prompts(prompt, negative_prompt, method)
    num_inference_steps, num_images_per_prompt = _check_counts(num_inference_steps, num_images_per_prompt, len(prompts), limits)
    batch = len(prompts) * num_images_per_prompt
    validation.choice("output_type", output_type, ("pil", "np", "pt", "latent"))
    progress = validation.flag("progress", progress)
    strength = validation.number("strength", strength, minimum=0.0, maximum=1.0, min_open=True)
    eta = validation.number("eta", eta, minimum=0.0, maximum=1.0)
    clip_skip = _check_clip_skip(pipe, clip_skip)
    _check_scheduler(scheduler)
    image, mask_image, height, width = _check_images(pipe, image, mask_image, height, width, limits)
    denoising_steps = _denoising_steps(image, strength, num_inference_steps)
    _check_step_options(method, cfg_window, pag_window, mask_steps, denoising_steps)
    generators = _generators(seed, generator, batch)
    _check_pipeline_kwargs(pipeline_kwargs)
    if _check_only:
        return None

    # --- run the user's workflow inside the engine ------------------------------------------------
    sched = scheduler if scheduler is not None else type(pipe.scheduler).from_config(pipe.scheduler.config)
    work = _working_pipeline(pipe, sched, image, mask_image)
    work.set_progress_bar_config(disable=not progress, desc=f"sampling ({method})")
    kwargs = _pipeline_arguments(
        pipe, work, method, prompts=prompts, negative_prompt=negatives, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt, generator=generators, eta=eta,
        clip_skip=clip_skip, output_type=output_type, image=image, strength=strength, mask_image=mask_image,
        height=height, width=width)
    kwargs.update(pipeline_kwargs or {})
    with validation.using_limits(limits), guide(
        work, method, pag_scale=pag_scale, pag_layers=pag_layers, cfg_window=cfg_window, pag_window=pag_window,
        guidance_rescale=guidance_rescale, scfg=scfg, return_masks=return_masks, mask_steps=mask_steps, callback=callback,
    ) as run:
        out = work(**kwargs)
    images = out.images
    if output_type == "pt":
        images = images.float()
    return GenerationResult(images=images, masks=run.masks, unet_evaluations=run.unet_evaluations,
                            branches_per_step=run.branches_per_step)


def _check_prompts(prompt, negative_prompt, method: str) -> tuple[list[str], list[str] | None]:
    """The prompts, and the negative prompts (one per prompt) where given; a negative prompt needs CFG."""
    prompts = validation.string_or_strings("prompt", prompt)
    if negative_prompt is None:
        return prompts, None
    negatives = validation.string_or_strings("negative_prompt", negative_prompt)
    if len(negatives) == 1 and len(prompts) > 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"negative_prompt must have one entry per prompt: {len(negatives)} given for {len(prompts)} prompts")
    if not REGISTRY[method].uses_cfg:
        raise ValueError(f"negative_prompt has no effect with method {method!r}, which has no unconditional branch; "
                         "drop it or use a method with CFG (cfg, cfg+pag, scfg, scfg+pag)")
    return prompts, negatives


def _check_counts(steps, images_per_prompt, prompts: int, limits: Limits) -> tuple[int, int]:
    """Steps and images per prompt, within ``limits`` (also the images of the whole call)."""
    steps = validation.integer("num_inference_steps", steps, minimum=1, maximum=limits.max_steps,
                               hint=" (attnguide.Limits.max_steps bounds it)")
    images_per_prompt = validation.integer("num_images_per_prompt", images_per_prompt, minimum=1,
                                           maximum=limits.max_images, hint=" (attnguide.Limits.max_images bounds it)")
    if prompts * images_per_prompt > limits.max_images:
        raise ValueError(f"num_images_per_prompt: {prompts} prompts x {images_per_prompt} images = {prompts * images_per_prompt} "
                         f"images in one call, more than attnguide.Limits.max_images = {limits.max_images}")
    return steps, images_per_prompt


def _check_images(pipe, image, mask_image, height, width, limits: Limits) -> tuple:
    """(image, mask_image, height, width): the opened images and the output size. img2img takes the
    size of ``image``; text-to-image and inpainting the given or native size."""
    if mask_image is not None and image is None:
        raise ValueError("mask_image needs image (the picture to inpaint)")
    image, mask_image = _open_image(image, "image"), _open_image(mask_image, "mask_image")
    if image is not None and mask_image is None:
        for name, value in (("height", height), ("width", width)):
            if value is not None:
                raise ValueError(f"{name}: img2img makes images of the size of image ({image.size[0]}x{image.size[1]}); "
                                 "resize image instead of passing height/width")
        _check_pixels("image", image.size[1], image.size[0], limits)
    native = default_size(pipe)
    height, width = _check_size(pipe, native if height is None else height, native if width is None else width)
    if image is None or mask_image is not None:
        _check_pixels("height", height, width, limits)
    return image, mask_image, height, width


def _denoising_steps(image, strength: float, steps: int) -> int:
    """The steps that denoise: all of them, or img2img's/inpainting's ``strength`` share."""
    if image is None:
        return steps
    denoising = min(int(steps * strength), steps)
    if denoising < 1:
        raise ValueError(f"strength: {strength:g} x {steps} steps leaves no denoising step; raise strength or num_inference_steps")
    return denoising


def _check_step_options(method: str, cfg_window, pag_window, mask_steps, steps: int) -> None:
    """Each term the method uses is active on at least one step; mask steps exist."""
    uses = REGISTRY[method]
    for name, win, used in (("cfg_window", cfg_window, uses.uses_cfg), ("pag_window", pag_window, uses.pag)):
        if used and not validation.steps_in_window(win, steps):
            raise ValueError(f"{name} {win} contains none of the {steps} denoising steps (step i sits at "
                             f"fraction i/{steps}), so method {method!r} would never apply it; widen it")
    if mask_steps is not None and any(s >= steps for s in mask_steps):
        raise ValueError(f"mask_steps must lie in [0, {steps}), got {list(mask_steps)!r}")


# Arguments of the pipeline call that generate sets itself.
_OWN_PIPELINE_ARGUMENTS = frozenset({
    "prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "num_images_per_prompt", "generator", "eta",
    "clip_skip", "output_type", "callback_on_step_end", "height", "width", "image", "strength", "mask_image", "true_cfg_scale",
})


def _check_pipeline_kwargs(pipeline_kwargs) -> None:
    if pipeline_kwargs is None:
        return
    if not isinstance(pipeline_kwargs, dict) or not all(isinstance(k, str) for k in pipeline_kwargs):
        raise TypeError(f"pipeline_kwargs must be a dict of keyword arguments, got {pipeline_kwargs!r}")
    clash = sorted(_OWN_PIPELINE_ARGUMENTS & set(pipeline_kwargs))
    if clash:
        raise ValueError(f"pipeline_kwargs: {clash} are arguments of generate itself; pass them directly")


def _pipeline_arguments(pipe, work, method: str, *, prompts, negative_prompt, guidance_scale, image, strength, mask_image,
                        height, width, **common) -> dict:
    """The keyword arguments of the workflow pipeline's call: w where the method has CFG (Flux: as
    ``true_cfg_scale``, with "" as the default negative prompt; its embedded guidance keeps the
    pipeline's default), the size only where the output size is free, the images of img2img/inpainting."""
    cfg = REGISTRY[method].uses_cfg
    kwargs = dict(common, prompt=prompts, negative_prompt=negative_prompt, callback_on_step_end=_check_latents,
                  guidance_scale=guidance_scale if cfg or _distilled(pipe) else 1.0)
    if image is None or mask_image is not None:
        kwargs.update(height=height, width=width)
    if image is not None:
        kwargs.update(image=image, strength=strength)
    if mask_image is not None:
        kwargs["mask_image"] = mask_image
    if runs_separate_cfg(work) and cfg:
        kwargs.update(true_cfg_scale=kwargs.pop("guidance_scale"), negative_prompt=negative_prompt or [""] * len(prompts))
    return _call_kwargs(work, kwargs)


def _check_latents(pipe, step: int, timestep, tensors: dict) -> dict:
    """``callback_on_step_end``: the latents after every scheduler step must be finite."""
    latents = tensors.get("latents")
    if latents is not None and not bool(torch.isfinite(latents).all()):
        total = len(getattr(pipe.scheduler, "timesteps", [])) or "?"
        raise NonFiniteError(
            f"non-finite values at step {step + 1} of {total}: the scheduler step ({type(pipe.scheduler).__name__}) "
            "turned finite predictions into NaN/infinite latents (check eta and the scheduler's settings)"
        )
    return tensors


def check_arguments(pipe, prompt, **kwargs) -> None:
    """Run every check ``generate(pipe, prompt, **kwargs)`` makes, without generating anything
    (no U-Net call, no allocation); raises what ``generate`` would."""
    generate(pipe, prompt, **kwargs, _check_only=True)
