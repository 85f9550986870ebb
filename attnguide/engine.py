"""The guidance engine, at the one place every diffusers U-Net pipeline passes through: the U-Net call.

``with attnguide.guide(pipe, method="scfg+pag") as run: pipe(prompt, guidance_scale=7.5, ...)``
works on the pipeline object a user already has — text-to-image, img2img, inpainting, ControlNet,
T2I-Adapter, IP-Adapter, LoRA, AnimateDiff, SD 1.x/2.x and SDXL — with no pipeline class per
workflow. Per U-Net call the engine

1. reads which rows of the batch the pipeline sent are which branch (``[uncond, cond]`` when the
   pipeline runs CFG, ``[cond]`` otherwise);
2. rebuilds the batch with exactly the branches the active guidance terms need this step
   (``guidance.plan_step``: the perturbed chunk appended for PAG, the uncond chunk dropped
   outside the CFG window), and makes every per-row input follow the same rebuild (ControlNet
   residuals, SDXL's added conditions, IP-Adapter image embeddings, inpainting channels);
3. runs the U-Net once with taps that are told which rows are which branch;
4. combines the branch predictions with the guidance rule (``guidance.combine``, S-CFG's masks
   from ``segmentation``) into ε̂ and hands back ``[ε̂, ε̂]`` (or ``[ε̂]``): the pipeline's own
   ``u + w(c − u)`` turns that into exactly ε̂.

Everything installed (forward hooks, attention taps, two instance attributes) is removed when
the block exits, also when the pipeline raises.

Transformer denoisers (``pipe.transformer``: SD3, PixArt-Σ, Sana, HunyuanDiT, Flux) go through the same
call with the taps of ``transformer_attention``; see there for what is perturbed and read per family.
"""
from __future__ import annotations

import contextlib
import inspect
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from . import attention, segmentation
from . import transformer_attention as tx
from .guidance import GuidanceConfig, SCFGOptions, StepPlan, combine, plan_step
from .pipeline_call import check_pipe, instance_patch, prompt_tokens, read_call_locals, runs_separate_cfg, token_grid, tokens_as_grid, true_cfg_batch
from .rows import frames_as_rows, map_rows, rows_as_frames

DEFAULT_PAG_LAYERS = ("mid",)


@dataclass
class StepInfo:
    """What one U-Net call of a guided pipeline saw and produced; passed to ``callback``."""

    step: int
    timestep: torch.Tensor
    plan: StepPlan
    predictions: dict[str, torch.Tensor]
    guided: torch.Tensor
    segmentation: segmentation.Segmentation | None
    rate: torch.Tensor | None


@dataclass
class GuideRun:
    """What a ``guide`` block collected over its latest pipeline call.

    masks: S-CFG's per-token regions by step (when ``return_masks``), with the prompt's tokens.
    unet_evaluations: U-Net evaluations per image (rows of the batch / images).
    branches_per_step: the branches each U-Net call computed.
    """

    masks: segmentation.MaskSet | None = None
    unet_evaluations: int = 0
    branches_per_step: list[tuple[str, ...]] = field(default_factory=list)


def default_levels(pipe) -> tuple[int, ...]:
    """S-CFG's levels for a pipeline: those its model folder recommends, else
    ``attention.default_scfg_levels``."""
    from .pipelines import recommended_settings

    levels = recommended_settings(pipe)["scfg_levels"]
    return tuple(levels) if levels else attention.default_scfg_levels(pipe.unet)


class _Engine:
    """State of one ``guide`` block: the configuration and the current pipeline call."""

    def __init__(self, pipe, method: str, pag_scale: float, pag_layers, cfg_window, pag_window, guidance_rescale,
                 scfg: SCFGOptions, return_masks: bool, mask_steps, callback) -> None:
        self.pipe, self.unet = pipe, tx.denoiser(pipe)
        # Validated once here with a placeholder w; the pipeline's own guidance_scale is used per call.
        self.template = GuidanceConfig(method=method, guidance_scale=1.0, pag_scale=pag_scale, cfg_window=cfg_window,
                                       pag_window=pag_window, guidance_rescale=guidance_rescale, scfg=scfg)
        self.call_locals: dict[str, Any] = {}
        self.transformer = getattr(pipe, "unet", None) is None
        if self.transformer:
            self._init_transformer(method, pag_layers, scfg, return_masks, mask_steps, callback)
            return
        needs_attention = self.template.uses_pag or self.template.uses_scfg or return_masks
        if needs_attention and not attention.list_layers(self.unet):
            raise ValueError(f"method {method!r} needs attention layers; this U-Net has none")
        self.perturb = attention.select_self_attention(self.unet, pag_layers) if self.template.uses_pag else []
        self.segmenting = self.template.uses_scfg or return_masks
        levels = (scfg.levels or default_levels(pipe)) if self.segmenting else ()
        self.pairs = attention.scfg_layers(self.unet, levels) if self.segmenting else []
        factors = {lay.name: lay.factor for lay in attention.list_layers(self.unet)}
        self.seg_pairs = [(s, c, factors[c]) for s, c in self.pairs]
        self.return_masks, self.mask_steps, self.callback = return_masks, mask_steps, callback
        self.signature = inspect.signature(attention.unwrap(self.unet).forward)
        self.sample_key, self.shared_inputs, self.eps_channels = "sample", frozenset(), None
        self.run = GuideRun()
        self.taps: attention.TapState | None = None
        self._new_call(None)

    def _init_transformer(self, method, pag_layers, scfg: SCFGOptions, return_masks, mask_steps, callback) -> None:
        """A transformer denoiser (SD3, PixArt-Σ, Sana, HunyuanDiT, Flux): layers from ``transformer_attention``."""
        model, pipe = self.unet, self.pipe
        # Flux runs its true CFG as a second transformer call per step (negative prompt); the engine
        # batches both into the first call and answers the second from it (``pipeline_call.true_cfg_batch``).
        self.separate_cfg = runs_separate_cfg(pipe)
        self.negative_answer = None
        needs_attention = self.template.uses_pag or self.template.uses_scfg or return_masks
        if needs_attention and not tx.list_layers(model):
            raise ValueError(f"method {method!r} needs attention layers; this transformer has none")
        self.perturb = tx.select_self_attention(model, pag_layers) if self.template.uses_pag else []
        self.segmenting = self.template.uses_scfg or return_masks
        self.pairs = tx.scfg_layers(model) if self.segmenting else []
        self.seg_pairs = [(s, c, tx.patch_size(model)) for s, c in self.pairs]
        self.return_masks, self.mask_steps, self.callback = return_masks, mask_steps, callback
        self.signature = inspect.signature(attention.unwrap(model).forward)
        self.sample_key = next(iter(self.signature.parameters))
        # Inputs shared by every row (no batch dimension, though a length may equal the batch by chance).
        self.shared_inputs = frozenset({"image_rotary_emb", "txt_ids", "img_ids"})
        config = getattr(model, "config", {})
        out, inp = config.get("out_channels"), config.get("in_channels")
        self.eps_channels = inp if (out and inp and out == 2 * inp) else None  # learned sigma: S-CFG reads ε only
        self.run = GuideRun()
        self.taps = None
        self._new_call(None)

    def _pipeline_cfg(self) -> bool:
        """Whether the pipeline batches [uncond, cond] in this call."""
        if self.transformer and self.separate_cfg:
            return bool(self.call_locals.get("do_true_cfg"))
        if hasattr(type(self.pipe), "do_classifier_free_guidance"):
            return bool(self.pipe.do_classifier_free_guidance)
        if "do_classifier_free_guidance" in self.call_locals:  # PixArt-Σ keeps it in a local of __call__
            return bool(self.call_locals["do_classifier_free_guidance"])
        raise ValueError(f"cannot tell whether {type(self.pipe).__name__} runs CFG in this call")

    # --- per pipeline call ------------------------------------------------------------------------
    def _new_call(self, total_steps: int | None) -> None:
        self.prompt_seen = False  # the next pipeline call's encode_prompt names the masks
        self.total_steps = total_steps
        self.calls = 0
        self.prompts: list[str] | None = getattr(self, "prompts", None)
        self.run.masks = None
        self.run.unet_evaluations = 0
        self.run.branches_per_step = []

    def _config(self) -> GuidanceConfig:
        if not self.transformer:
            w = float(getattr(self.pipe, "guidance_scale", 1.0))
        elif self.separate_cfg:  # Flux: guidance_scale is the embedded (distilled) guidance; CFG's w is true_cfg_scale
            w = float(self.call_locals.get("true_cfg_scale", 1.0)) if self.call_locals.get("do_true_cfg") else 1.0
        elif hasattr(type(self.pipe), "guidance_scale"):
            w = float(self.pipe.guidance_scale)
        else:
            w = float(self.call_locals.get("guidance_scale", 1.0))
        t = self.template
        return GuidanceConfig(method=t.method, guidance_scale=w, pag_scale=t.pag_scale, cfg_window=t.cfg_window,
                              pag_window=t.pag_window, guidance_rescale=t.guidance_rescale, scfg=t.scfg)

    def _input_branches(self, config: GuidanceConfig) -> tuple[str, ...]:
        pipeline_cfg = bool(self.pipe.do_classifier_free_guidance) if not self.transformer else self._pipeline_cfg()
        scale = "true_cfg_scale" if self.transformer and self.separate_cfg else "guidance_scale"
        if config.uses_cfg and not pipeline_cfg:
            raise ValueError(
                f"method {config.method!r} guides with the pipeline's {scale}, but the pipeline runs without "
                f"CFG ({scale}={config.guidance_scale}); call it with {scale} > 1"
                + (" and a negative_prompt (\"\" works)" if scale == "true_cfg_scale" else "")
                + (" (S-CFG's w)" if config.uses_scfg else "")
            )
        if not config.uses_cfg and pipeline_cfg:
            raise ValueError(
                f"method {config.method!r} uses no CFG, but the pipeline runs CFG ({scale}="
                f"{config.guidance_scale}); call it with {scale}=1, or use method 'cfg+pag'"
            )
        return ("uncond", "cond") if pipeline_cfg else ("cond",)

    def _step(self) -> tuple[int, int]:
        order = int(getattr(self.pipe.scheduler, "order", 1)) or 1
        total = self.total_steps or len(getattr(self.pipe.scheduler, "timesteps", [])) or 1
        return min(self.calls // order, total - 1), total

    # --- the U-Net call ---------------------------------------------------------------------------
    def forward(self, original: Callable, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        inputs = dict(bound.arguments)
        extra = inputs.pop("kwargs", {}) if "kwargs" in self.signature.parameters else {}
        inputs.update(extra)
        separate = self.transformer and self.separate_cfg and bool(self.call_locals.get("do_true_cfg"))
        if separate and inputs.get("encoder_hidden_states") is self.call_locals["negative_prompt_embeds"]:
            return self._negative_call(inputs.get("return_dict", True))
        if separate:
            inputs = true_cfg_batch(self.pipe, inputs, self.call_locals, self.sample_key, self.shared_inputs)
        sample = inputs[self.sample_key]
        config = self._config()
        layout = self._input_branches(config)
        batch = sample.shape[0]
        if batch % len(layout):
            raise ValueError(f"the pipeline's batch of {batch} rows does not split into {layout}")
        chunk = batch // len(layout)
        step, total = self._step()
        plan = plan_step(config, step, total)
        rows = torch.cat([
            torch.arange(chunk) + layout.index("cond" if b == "perturbed" else b) * chunk for b in plan.branches
        ])
        return_dict = inputs.pop("return_dict", True)
        frames_in = sample.shape[2] if sample.ndim == 5 else 1
        call_inputs = {k: (map_rows(v, rows, batch, frames_in)
                           if (k != "timestep" or torch.is_tensor(v)) and k not in self.shared_inputs else v)
                       for k, v in inputs.items()}
        want_masks = self.return_masks and (self.mask_steps is None or step in self.mask_steps)
        sources = segmentation.mask_sources(plan, config, want_masks)
        self.taps.branches = plan.branches
        self.taps.record_branches = sources
        self.taps.records.clear()
        noise = original(**call_inputs, return_dict=False)[0]
        frames = noise.shape[2] if noise.ndim == 5 else 0
        predictions = dict(zip(plan.branches, frames_as_rows(noise).chunk(len(plan.branches))))
        # Flux packs latents into tokens (B, N, C): S-CFG works on their (h, w) grid.
        grid = token_grid(inputs, noise.shape[1]) if noise.ndim == 3 and (sources or plan.scfg) else None
        seg = rate = None
        if sources:
            seg = segmentation.segment_records(self.taps, sources, self.seg_pairs, grid or tuple(noise.shape[-2:]), config.scfg)
        if plan.scfg:
            opts = config.scfg
            eps = slice(None, self.eps_channels)  # learned-sigma transformers: ε channels only
            uncond, cond = predictions["uncond"], predictions["cond"]
            if grid:
                uncond, cond = tokens_as_grid(uncond, grid), tokens_as_grid(cond, grid)
            rate = segmentation.scfg_rate(
                uncond[:, eps], cond[:, eps], seg, config.guidance_scale, opts.rate_min, opts.rate_max, opts.cap,
                opts.smoothing,
            ).to(noise.dtype)
            if grid:
                rate = rate.flatten(2).transpose(1, 2)  # (B, 1, h, w) -> (B, N, 1), the tokens' order
        guided = combine(predictions, plan, config, rate)
        if not bool(torch.isfinite(guided).all()):  # a NaN image is an error naming its cause, not a black PNG
            from .validation import non_finite_error

            raise non_finite_error(step, total, sample, predictions, config)
        if frames:
            guided = rows_as_frames(guided, frames)
            predictions = {b: rows_as_frames(p, frames) for b, p in predictions.items()}
        rows_per_branch = chunk * max(frames, 1)  # masks are per image, or per frame of a video
        self._record(step, inputs.get("timestep"), plan, predictions, guided, seg, rate, rows_per_branch, want_masks)
        if separate:  # this call stands for the conditional one; the negative call gets ε̂ too
            self.negative_answer = guided
            return self._output(guided, return_dict)
        return self._output(torch.cat([guided] * len(layout)) if len(layout) > 1 else guided, return_dict)

    def _output(self, out: torch.Tensor, return_dict: bool):
        """``out`` in the form the denoiser itself returns."""
        if return_dict and self.transformer:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=out)
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)

    def _negative_call(self, return_dict: bool):
        """The pipeline's negative-prompt call of a step: answered with the step's ε̂ (computed by the
        conditional call), so its ``neg + w(cond − neg)`` is exactly ε̂; no transformer evaluation."""
        if self.negative_answer is None:
            raise RuntimeError(f"{type(self.pipe).__name__} made its negative-prompt call before the conditional one")
        answer, self.negative_answer = self.negative_answer, None
        return self._output(answer, return_dict)

    def _record(self, step, timestep, plan, predictions, guided, seg, rate, chunk, want_masks) -> None:
        self.calls += 1
        self.run.unet_evaluations += len(plan.branches)
        self.run.branches_per_step.append(plan.branches)
        if want_masks and seg is not None:
            if self.run.masks is None:
                # Flux's attention reads the T5 tokens (tokenizer_2); the others' first tokens are CLIP's.
                tokenizer = "tokenizer_2" if self.transformer and self.separate_cfg else "tokenizer"
                self.run.masks = segmentation.MaskSet(prompt_tokens(self.pipe, self.prompts, chunk, tokenizer))
            self.run.masks.steps[step] = (seg.labels.cpu(), seg.foreground[:, 0].cpu())
        if self.callback is not None:
            self.callback(StepInfo(step, timestep, plan, predictions, guided, seg, rate))


@contextlib.contextmanager
def guide(
    pipe,
    method: str | None = None,
    *,
    pag_scale: float | None = None,
    pag_layers: str | Sequence[str] | None = None,
    cfg_window: tuple[float, float] = (0.0, 1.0),
    pag_window: tuple[float, float] = (0.0, 1.0),
    guidance_rescale: float = 0.0,
    scfg: SCFGOptions | dict | None = None,
    return_masks: bool = False,
    mask_steps: Sequence[int] | None = None,
    callback: Callable[[StepInfo], None] | None = None,
) -> Iterator[GuideRun]:
    """Guide every call of ``pipe`` inside the block with ``method``; yields a ``GuideRun``.

    ``pipe`` is any diffusers U-Net pipeline whose loop batches ``[uncond, cond]`` (SD 1.x/2.x,
    SDXL; text-to-image, img2img, inpaint, ControlNet, T2I-Adapter, IP-Adapter, LoRA, AnimateDiff),
    or a transformer pipeline (SD3 and its img2img, PixArt-Σ, Sana, HunyuanDiT, Flux).
    CFG's and S-CFG's w is the pipeline's own ``guidance_scale``: methods with CFG need it > 1,
    ``none`` and ``pag`` need it ≤ 1 (a clear error at the first U-Net call, before any denoising).
    On Flux, w is ``true_cfg_scale`` (with a ``negative_prompt``; its ``guidance_scale`` is the embedded
    guidance): the negative prompt's pass is batched into the step's one transformer call, and the
    pipeline's second call is answered from it without evaluating the transformer.

    Args:
        method: one of ``none, cfg, pag, cfg+pag, scfg, scfg+pag``; None: the model's recommendation,
            else the library default (``attnguide.recommended_settings``).
        pag_scale: s of PAG (None: as ``method``). pag_layers: self-attention layers PAG perturbs (names or component
            patterns, ``attnguide layers`` lists them); None: the model's recommendation, else the mid block.
        cfg_window / pag_window: fractions [start, stop) of the steps where each term is active;
            outside, its branch is not computed.
        guidance_rescale: φ of Lin et al. (2024) on the guided prediction (leave the pipeline's own at 0).
        scfg: ``SCFGOptions`` or a dict of its fields.
        return_masks: keep S-CFG's per-token masks (for ``mask_steps``, default every step) in ``run.masks``.
        callback: called with a ``StepInfo`` after every U-Net call.

    Example::

        with attnguide.guide(pipe, "scfg+pag", pag_scale=3.0, return_masks=True) as run:
            image = pipe("a cat on a sofa", image=init, strength=0.6, guidance_scale=7.5).images[0]
        run.masks.render(0, image).save("masks.png")
    """
    from .pipelines import resolve_settings
    from .validation import check_guide_arguments

    settings = resolve_settings(pipe, method=method, pag_scale=pag_scale, pag_layers=pag_layers)
    method, pag_scale, pag_layers = settings["method"], settings["pag_scale"], settings["pag_layers"]
    (method, pag_scale, pag_layers, cfg_window, pag_window, guidance_rescale, scfg, return_masks, mask_steps,
     callback) = check_guide_arguments(pipe, method, pag_scale, pag_layers, cfg_window, pag_window, guidance_rescale,
                                       scfg, return_masks, mask_steps, callback, DEFAULT_PAG_LAYERS)
    check_pipe(pipe)
    engine = _Engine(pipe, method, pag_scale, pag_layers, cfg_window, pag_window, guidance_rescale,
                     scfg or SCFGOptions(), return_masks, mask_steps, callback)
    unet = engine.unet
    original_forward = unet.forward

    def guided_forward(*args, **kwargs):
        return engine.forward(original_forward, *args, **kwargs)

    original_bar = pipe.progress_bar

    def progress_bar(iterable=None, total=None):
        # Every diffusers pipeline opens its progress bar right before its denoising loop.
        engine._new_call(total if total is not None else (len(iterable) if iterable is not None else None))
        if engine.transformer:
            engine.call_locals = read_call_locals(pipe, sys._getframe(1))
            engine.negative_answer = None
        return original_bar(iterable=iterable, total=total)

    encode_prompt = getattr(pipe, "encode_prompt", None)

    def capture_prompt(*args, **kwargs):
        # The first encode_prompt call before denoising is the prompt's; Flux's true CFG makes a
        # second one for its negative prompt, which must not name the masks.
        prompt = kwargs.get("prompt", args[0] if args else None)
        if not engine.prompt_seen:
            engine.prompts = [prompt] if isinstance(prompt, str) else (list(prompt) if isinstance(prompt, (list, tuple)) else None)
            engine.prompt_seen = True
        return encode_prompt(*args, **kwargs)

    with contextlib.ExitStack() as stack:
        taps = tx.transformer_taps if engine.transformer else attention.attention_taps
        engine.taps = stack.enter_context(taps(unet, perturb=engine.perturb, record=engine.pairs))
        stack.enter_context(instance_patch(unet, "forward", guided_forward))
        stack.enter_context(instance_patch(pipe, "progress_bar", progress_bar))
        if encode_prompt is not None:
            stack.enter_context(instance_patch(pipe, "encode_prompt", capture_prompt))
        yield engine.run
