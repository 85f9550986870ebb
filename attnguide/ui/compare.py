"""Running a ``Request`` through ``attnguide.generate`` for each method, and drawing the results."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from .form import Request

DISPLAY_SIZE = 256  # small model images are enlarged (nearest neighbour) to this for the page


@dataclass(frozen=True)
class ModelInfo:
    """What the form offers for a pipeline: defaults and valid choices."""

    self_layers: tuple[str, ...]  # PAG's choices
    default_layers: tuple[str, ...]
    levels: tuple[int, ...]  # S-CFG's choices (downsampling factors)
    default_levels: tuple[int, ...]
    size: int  # default image side in pixels
    settings: dict = field(default_factory=dict)  # recommended_settings(pipe)


def model_info(pipe) -> ModelInfo:
    from .. import attention
    from ..engine import default_levels
    from ..pipelines import recommended_settings

    if getattr(pipe, "unet", None) is None:
        return _transformer_info(pipe)
    recommended = recommended_settings(pipe)
    layers = attention.list_layers(pipe.unet)
    self_layers = tuple(lay.name for lay in layers if not lay.is_cross)
    defaults = _recommended_pag_layers(pipe.unet, recommended["pag_layers"]) or self_layers[:1]
    levels = tuple(sorted({lay.factor for lay in layers if lay.is_cross}))
    try:
        chosen = tuple(default_levels(pipe))
    except ValueError:  # no cross-attention: S-CFG cannot run on this model; the engine says so if asked
        chosen = ()
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return ModelInfo(self_layers, defaults, levels, chosen, int(size), recommended)


def _transformer_info(pipe) -> ModelInfo:
    """A transformer denoiser: PAG's choices are its perturbable layers (self, joint, single-stream);
    S-CFG has no levels to choose (every block sees the same token grid)."""
    from .. import transformer_attention as tx
    from ..pipelines import recommended_settings
    from ..sampling import default_size

    model, recommended = pipe.transformer, recommended_settings(pipe)
    self_layers = tuple(lay.name for lay in tx.list_layers(model) if lay.kind in tx.PERTURBABLE)
    defaults = _recommended_pag_layers(model, recommended["pag_layers"]) if self_layers else ()
    return ModelInfo(self_layers, defaults, (), (), int(default_size(pipe)), recommended)


def _recommended_pag_layers(denoiser, patterns) -> tuple[str, ...]:
    """The self-attention layers the recommended patterns select (none when they select nothing here)."""
    from .. import attention

    try:
        return tuple(attention.select_self_attention(denoiser, patterns))
    except ValueError:
        return ()


@dataclass
class MethodResult:
    method: str
    images: list  # PIL, one per seed
    seconds: float
    unet_evaluations: int  # per image
    masks: object = None  # segmentation.MaskSet or None


@dataclass
class Comparison:
    request: Request
    results: list[MethodResult]

    def mask_sources(self) -> list[str]:
        """Labels of the images that have S-CFG masks: "scfg · seed 0"."""
        return [_source(r.method, seed) for r in self.results if r.masks is not None and r.masks.steps
                for seed in self.request.seeds]

    def mask_steps(self) -> list[int]:
        steps = {s for r in self.results if r.masks is not None for s in r.masks.steps}
        return sorted(steps)

    def overlay(self, source: str, step: int | None = None, size: int = DISPLAY_SIZE):
        """The masks of one image at one denoising step (default: the last), over the image, with
        the token legend."""
        for r in self.results:
            for i, seed in enumerate(self.request.seeds):
                if _source(r.method, seed) == source and r.masks is not None:
                    recorded = sorted(r.masks.steps)
                    step = recorded[-1] if step is None else min(recorded, key=lambda s: abs(s - int(step)))
                    return r.masks.render(i, r.images[i], step=step, size=size)
        raise ValueError(f"no masks for {source!r}; generate with an S-CFG method first")

    def gallery(self) -> list[tuple]:
        """(image, caption) row by row: one row per seed, the methods side by side."""
        return [(_enlarge(r.images[i]), f"{r.method} · seed {seed}")
                for i, seed in enumerate(self.request.seeds) for r in self.results]

    def summary(self) -> str:
        """A Markdown table: time and U-Net evaluations per method."""
        rows = [f"| {r.method} | {r.seconds:.2f} s | {r.unet_evaluations} |" for r in self.results]
        head = f"{len(self.request.seeds)} seed(s) per method, {self.request.steps} steps\n\n"
        return head + "| method | time | U-Net evaluations per image |\n|---|---|---|\n" + "\n".join(rows)


def _source(method: str, seed: int) -> str:
    return f"{method} · seed {seed}"


def _enlarge(image):
    from PIL import Image

    if max(image.size) >= DISPLAY_SIZE:
        return image
    factor = max(1, DISPLAY_SIZE // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def run_comparison(pipe, request: Request, progress: Callable[[int, int, str], None] | None = None) -> Comparison:
    """Each method of ``request`` through ``attnguide.generate`` with the same prompt and seeds.

    progress(done, total, text) is called after every denoising step of every method."""
    from ..sampling import generate

    total, done = request.steps * len(request.methods), 0
    results = []
    for method in request.methods:
        def step(info, method=method):
            nonlocal done
            done += 1
            if progress is not None:
                progress(min(done, total), total, f"{method}: step {info.step + 1}/{request.steps}")

        start = time.perf_counter()
        out = generate(pipe, [request.prompt], callback=step, **request.generate_kwargs(method))
        seconds = time.perf_counter() - start
        masks = out.masks if out.masks is not None and out.masks.steps else None
        results.append(MethodResult(method, list(out.images), seconds, out.unet_evaluations, masks))
    return Comparison(request, results)
