"""What the page sends, checked and turned into a ``Request`` (no gradio, no sampling).

Every problem raises ``ValueError`` with a message for the page; the engine checks the rest
(e.g. an image size the model cannot take) with its own messages.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class Bounds:
    """Upper bounds of one request (``attnguide ui --max-...``)."""

    max_steps: int = 100
    max_size: int = 512  # pixels, each side
    max_images: int = 12  # images per request: seeds x methods
    max_methods: int = 6

    def __post_init__(self) -> None:
        for name in ("max_steps", "max_size", "max_images", "max_methods"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class Request:
    """One comparison: the same prompt and seeds for every method."""

    prompt: str
    negative_prompt: str | None
    seeds: tuple[int, ...]
    steps: int
    height: int
    width: int
    methods: tuple[str, ...]
    guidance_scale: float
    pag_scale: float
    pag_layers: tuple[str, ...]
    scfg_mode: str
    scfg_levels: tuple[int, ...] | None
    cfg_window: tuple[float, float]
    pag_window: tuple[float, float]

    @property
    def images(self) -> int:
        return len(self.seeds) * len(self.methods)

    def generate_kwargs(self, method: str) -> dict:
        """Keyword arguments of ``attnguide.generate`` for one method (prompt and pipe aside)."""
        from ..guidance import REGISTRY

        return dict(
            method=method, guidance_scale=self.guidance_scale, pag_scale=self.pag_scale, pag_layers=list(self.pag_layers),
            num_inference_steps=self.steps, negative_prompt=self.negative_prompt, height=self.height, width=self.width,
            num_images_per_prompt=len(self.seeds), seed=list(self.seeds), return_masks=REGISTRY[method].uses_scfg,
            scfg={"mode": self.scfg_mode, "levels": self.scfg_levels}, cfg_window=self.cfg_window,
            pag_window=self.pag_window, progress=False,
        )


def parse_seeds(text, max_count: int) -> tuple[int, ...]:
    """Seeds from "0", "0, 1, 2" or "0 1 2"; each in [0, 2**32 - 1]."""
    parts = [p for p in re.split(r"[,\s]+", str(text or "").strip()) if p]
    if not parts:
        raise ValueError("seeds: give at least one seed, e.g. 0 or 0, 1, 2")
    seeds = []
    for part in parts:
        if not re.fullmatch(r"\d+", part) or int(part) > SEED_MAX:
            raise ValueError(f"seeds: {part!r} is not a whole number in [0, {SEED_MAX}]")
        seeds.append(int(part))
    if len(seeds) > max_count:
        raise ValueError(f"seeds: {len(seeds)} given, at most {max_count} per request")
    return tuple(seeds)


def _integer(name: str, value, minimum: int, maximum: int) -> int:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value != int(value):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if not minimum <= int(value) <= maximum:
        raise ValueError(f"{name} must be between {minimum} and {maximum}, got {int(value)}")
    return int(value)


def _number(name: str, value) -> float:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def parse_request(bounds: Bounds, *, prompt, negative_prompt, seeds, steps, height, width, methods, guidance_scale,
                  pag_scale, pag_layers, scfg_mode, scfg_levels, cfg_window, pag_window,
                  allowed_layers, allowed_levels) -> Request:
    """A checked ``Request`` from the form's values, or ``ValueError``.

    allowed_layers / allowed_levels: the model's self-attention layer names and S-CFG levels
    (the page offers only those; anything else sent is refused)."""
    from ..guidance import METHODS, REGISTRY, SCFG_MODES, GuidanceConfig, SCFGOptions

    prompt = str(prompt or "").strip()
    if not prompt:
        raise ValueError("prompt is empty")
    negative = str(negative_prompt or "").strip() or None
    methods = tuple(methods or ())
    if not methods:
        raise ValueError("choose at least one method to compare")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError("each method can be chosen once")
    if len(methods) > bounds.max_methods:
        raise ValueError(f"{len(methods)} methods chosen, at most {bounds.max_methods} per request")
    seed_list = parse_seeds(seeds, bounds.max_images)
    if len(seed_list) * len(methods) > bounds.max_images:
        raise ValueError(f"{len(seed_list)} seeds x {len(methods)} methods = {len(seed_list) * len(methods)} images, "
                         f"at most {bounds.max_images} per request")
    steps = _integer("steps", steps, 1, bounds.max_steps)
    height = _integer("height", height, 1, bounds.max_size)
    width = _integer("width", width, 1, bounds.max_size)
    w, s = _number("w (guidance scale)", guidance_scale), _number("s (PAG scale)", pag_scale)
    layers = tuple(pag_layers or ())
    if any(REGISTRY[m].pag for m in methods):
        if not layers:
            raise ValueError("choose at least one PAG layer for the PAG methods")
        bad = [lay for lay in layers if lay not in allowed_layers]
        if bad:
            raise ValueError(f"PAG layers {bad} are not self-attention layers of this model")
    if scfg_mode not in SCFG_MODES:
        raise ValueError(f"S-CFG mode must be one of {SCFG_MODES}, got {scfg_mode!r}")
    levels = tuple(sorted({int(v) for v in scfg_levels})) if scfg_levels else None
    if levels is not None and any(v not in allowed_levels for v in levels):
        raise ValueError(f"S-CFG levels {list(levels)} are not all among this model's levels {sorted(allowed_levels)}")
    windows = tuple((_number(f"{n} start", a), _number(f"{n} stop", b)) for n, (a, b) in
                    (("CFG window", cfg_window), ("PAG window", pag_window)))
    options = SCFGOptions(mode=scfg_mode, levels=levels)
    for method in methods:  # every method's settings are checked before any of them runs
        GuidanceConfig(method=method, guidance_scale=w, pag_scale=s, cfg_window=windows[0], pag_window=windows[1], scfg=options)
        if REGISTRY[method].uses_cfg and w <= 1:
            raise ValueError(f"w (guidance scale) must be > 1 for method {method!r} (it is CFG's w), got {w:g}")
    return Request(prompt=prompt, negative_prompt=negative, seeds=seed_list, steps=steps, height=height, width=width,
                   methods=methods, guidance_scale=w, pag_scale=s, pag_layers=layers, scfg_mode=scfg_mode,
                   scfg_levels=levels, cfg_window=windows[0], pag_window=windows[1])
