"""The sampling loop: batch builder -> U-Net with taps -> guidance rule -> scheduler.

``generate`` runs any diffusers Stable Diffusion (1.x/2.x) or SDXL text-to-image pipeline with
CFG, PAG, S-CFG or their combinations, one batched U-Net call per step holding exactly the
branches the active terms need. The pipeline is only read: its scheduler is copied, its U-Net's
processors are restored on exit (also when sampling raises).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from . import attention, segmentation
from .guidance import GuidanceConfig, SCFGOptions, StepPlan, combine, plan_step

DEFAULT_PAG_LAYERS = ("mid",)


@dataclass
class StepInfo:
    """What one denoising step saw and produced; passed to ``callback``."""

    step: int
    timestep: torch.Tensor
    plan: StepPlan
    predictions: dict[str, torch.Tensor]
    guided: torch.Tensor
    segmentation: segmentation.Segmentation | None
    rate: torch.Tensor | None


@dataclass
class GenerationResult:
    """Images (PIL, or a float tensor in [0, 1] for ``output_type="pt"``), masks when asked, and
    the number of U-Net evaluations (per image) the run cost."""

    images: list
    masks: segmentation.MaskSet | None = None
    unet_evaluations: int = 0
    branches_per_step: list[tuple[str, ...]] = field(default_factory=list)


def _is_sdxl(pipe) -> bool:
    return hasattr(pipe, "text_encoder_2") and hasattr(pipe, "_get_add_time_ids")


def _as_list(value, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {value!r}")


def _check_pipe(pipe) -> None:
    missing = [a for a in ("unet", "vae", "scheduler", "encode_prompt", "prepare_latents") if not hasattr(pipe, a)]
    if missing:
        raise ValueError(f"pipe must be a diffusers Stable Diffusion or SDXL text-to-image pipeline; it lacks {missing}")


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


def _encode(pipe, prompts, negative, n_per_prompt, need_uncond, device, clip_skip):
    """Embeddings per branch, using the pipeline's own encoder (so behaviour matches diffusers)."""
    if _is_sdxl(pipe):
        pe, ne, pooled, npooled = pipe.encode_prompt(
            prompts, None, device, n_per_prompt, need_uncond, negative, None, clip_skip=clip_skip
        )
        return {"cond": pe, "uncond": ne}, {"cond": pooled, "uncond": npooled}
    pe, ne = pipe.encode_prompt(prompts, device, n_per_prompt, need_uncond, negative, clip_skip=clip_skip)
    return {"cond": pe, "uncond": ne}, None


def _time_ids(pipe, pooled, height, width, dtype, device):
    proj = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else int(pooled.shape[-1])
    ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=dtype, text_encoder_projection_dim=proj)
    return ids.to(device).repeat(pooled.shape[0], 1)


def _prompt_tokens(pipe, prompts: list[str], n_per_prompt: int) -> list[list[str]]:
    tokenizer = pipe.tokenizer
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    tokens = [tokenizer.convert_ids_to_tokens(row) for row in ids]
    return [t for t in tokens for _ in range(n_per_prompt)]


def _decode(pipe, latents: torch.Tensor, output_type: str):
    """Images from the final latents; ``"latent"`` returns them as sampled (as diffusers does),
    without running the VAE."""
    if output_type == "latent":
        return latents
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    try:
        if upcast:
            vae.to(torch.float32)
        latents = latents.to(vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(torch.float16)
    return pipe.image_processor.postprocess(image, output_type=output_type)


def _model_has_attention(unet) -> bool:
    return any(True for _ in attention.list_layers(unet))


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
        pipe: a diffusers ``StableDiffusionPipeline``/``StableDiffusionXLPipeline`` (or one shaped like them).
        prompt: one prompt or a list; ``negative_prompt`` the same count (or one string for all).
        method: one of ``none, cfg, pag, cfg+pag, scfg, scfg+pag``.
        guidance_scale: w of CFG/S-CFG. pag_scale: s of PAG.
        pag_layers: self-attention layers PAG perturbs (names or component patterns; see
            ``attnguide.attention.select_self_attention``); default the mid block.
        seed: an int (image i gets seed + i) or one int per image; or pass ``generator``.
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
    default_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height = default_size if height is None else height
    width = default_size if width is None else width
    _check_size(pipe, height, width)
    unet = pipe.unet
    needs_attention = config.uses_pag or config.uses_scfg or return_masks
    if needs_attention and not _model_has_attention(unet):
        raise ValueError(f"method {method!r}{' with return_masks' if return_masks else ''} needs attention layers; this U-Net has none")
    perturb_layers = attention.select_self_attention(unet, pag_layers) if config.uses_pag else []
    segmenting = config.uses_scfg or return_masks
    levels = (config.scfg.levels or attention.default_scfg_levels(unet)) if segmenting else ()
    pairs = attention.scfg_layers(unet, levels) if segmenting else []
    factors = {l.name: l.factor for l in attention.list_layers(unet)}
    batch = len(prompts) * num_images_per_prompt
    generators = _generators(seed, generator, batch, "cpu")
    if mask_steps is not None and any(not 0 <= s < num_inference_steps for s in mask_steps):
        raise ValueError(f"mask_steps must lie in [0, {num_inference_steps}), got {list(mask_steps)!r}")

    # --- prepare ---------------------------------------------------------------------------------
    device = pipe._execution_device if hasattr(pipe, "_execution_device") else unet.device
    plans = [plan_step(config, i, num_inference_steps) for i in range(num_inference_steps)]
    need_uncond = any("uncond" in p.branches for p in plans)
    embeds, pooled = _encode(pipe, prompts, negatives, num_images_per_prompt, need_uncond, device, clip_skip)
    added = None
    if pooled is not None:
        time_ids = _time_ids(pipe, pooled["cond"], height, width, embeds["cond"].dtype, device)
        added = {b: {"text_embeds": p, "time_ids": time_ids} for b, p in pooled.items() if p is not None}
    sched = scheduler if scheduler is not None else type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(num_inference_steps, device=device)
    latents = pipe.prepare_latents(batch, unet.config.in_channels, height, width, embeds["cond"].dtype, device, generators)
    step_kwargs = {}
    accepted = set(inspect.signature(sched.step).parameters)
    if "eta" in accepted:
        step_kwargs["eta"] = eta
    if "generator" in accepted:
        step_kwargs["generator"] = generators
    masks = segmentation.MaskSet(_prompt_tokens(pipe, prompts, num_images_per_prompt)) if return_masks else None
    record_pairs = [(s, c) for s, c in pairs]
    seg_pairs = [(s, c, factors[c]) for s, c in pairs]
    result = GenerationResult(images=[])

    # --- denoise -----------------------------------------------------------------------------------
    with attention.attention_taps(unet, perturb=perturb_layers, record=record_pairs) as taps:
        for i, t in enumerate(tqdm(sched.timesteps, desc=f"sampling ({method})", disable=not progress)):
            plan = plans[i]
            want_masks = return_masks and (mask_steps is None or i in mask_steps)
            sources = _mask_sources(plan, config, want_masks)
            taps.branches = plan.branches
            taps.record_branches = sources
            taps.records.clear()
            model_in = sched.scale_model_input(torch.cat([latents] * len(plan.branches)), t)
            kwargs = {}
            if added is not None:
                kwargs["added_cond_kwargs"] = {
                    k: torch.cat([added[b if b != "perturbed" else "cond"][k] for b in plan.branches])
                    for k in ("text_embeds", "time_ids")
                }
            context = torch.cat([embeds[b if b != "perturbed" else "cond"] for b in plan.branches])
            noise = unet(model_in, t, encoder_hidden_states=context, return_dict=False, **kwargs)[0]
            predictions = dict(zip(plan.branches, noise.chunk(len(plan.branches))))
            seg = rate = None
            if sources:
                seg = _segment(taps, sources, seg_pairs, latents.shape[-2:], config.scfg)
            if plan.scfg:
                opts = config.scfg
                rate = segmentation.scfg_rate(
                    predictions["uncond"], predictions["cond"], seg, config.guidance_scale,
                    opts.rate_min, opts.rate_max, opts.cap, opts.smoothing,
                ).to(noise.dtype)
            guided = combine(predictions, plan, config, rate)
            latents = sched.step(guided, t, latents, **step_kwargs, return_dict=False)[0]
            result.unet_evaluations += len(plan.branches)
            result.branches_per_step.append(plan.branches)
            if want_masks and seg is not None:
                masks.steps[i] = (seg.labels.cpu(), seg.foreground[:, 0].cpu())
            if callback is not None:
                callback(StepInfo(i, t, plan, predictions, guided, seg, rate))
    result.images = _decode(pipe, latents, output_type)
    result.masks = masks
    return result


def _mask_sources(plan: StepPlan, config: GuidanceConfig, want_masks: bool) -> tuple[str, ...]:
    """Branches whose attention the segmentation reads this step (none if nothing needs masks)."""
    if not (plan.scfg or want_masks):
        return ()
    if config.scfg.mode == "reference" and "uncond" in plan.branches:
        return ("uncond", "cond")  # tokens from the conditional half, foreground from the unconditional
    return ("cond",)


def _segment(taps, sources, pairs, latent_hw, opts: SCFGOptions) -> segmentation.Segmentation:
    """Segment from the taps' records; rows are ordered as ``sources`` (uncond before cond)."""
    first = next(iter(taps.records.values()))
    rows = first.query.shape[0] if isinstance(first, attention.SelfRecord) else first.shape[0]
    chunk = rows // len(sources)
    start = sources.index("cond") * chunk
    cond = slice(start, start + chunk)
    fore = slice(0, chunk) if "uncond" in sources else cond
    return segmentation.segment(
        taps.records, pairs, tuple(latent_hw), opts.mode, opts.power, opts.smoothing, token_rows=cond, foreground_rows=fore
    )
