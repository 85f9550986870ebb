"""Guidance rules: pure functions of named predictions, plus the validated configuration.

Notation as in the papers: ``uncond`` = ε(x_t, ∅) (or the negative prompt), ``cond`` = ε(x_t, c),
``perturbed`` = ε(x_t, c) with PAG's identity self-attention. Nothing here touches a model, so
every rule is unit-testable with plain tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

BRANCH_ORDER = ("uncond", "cond", "perturbed")  # perturbed last: taps slice it off cheaply
SCFG_MODES = ("reference", "paper")


@dataclass(frozen=True)
class Method:
    """A guidance method: which text-guidance term it uses (none, CFG or S-CFG) and whether PAG
    is added. The one registry of methods: the engine, ``generate``, the CLI, the evaluation
    harness and the benchmark all read ``REGISTRY``; a new method is one entry here (plus its
    rule in ``combine``)."""

    name: str
    text: str | None  # None, "cfg" or "scfg"
    pag: bool

    @property
    def uses_cfg(self) -> bool:
        """It needs the unconditional branch and the scale w."""
        return self.text is not None

    @property
    def uses_scfg(self) -> bool:
        return self.text == "scfg"

    @property
    def ablations(self) -> tuple[str, ...]:
        """The methods one component away from this one, which the evaluation compares it with
        (paired): PAG removed, S-CFG's per-region scale replaced by CFG's uniform one, CFG removed."""
        variants = []
        if self.pag:
            variants.append((self.text, False))
        if self.text == "scfg":
            variants.append(("cfg", self.pag))
        if self.text == "cfg":
            variants.append((None, self.pag))
        return tuple(m.name for v in variants for m in REGISTRY.values() if (m.text, m.pag) == v)

    @property
    def branches(self) -> tuple[str, ...]:
        """Branches of a step where every term is active."""
        return tuple(b for b in BRANCH_ORDER if b == "cond" or (b == "uncond" and self.uses_cfg) or (b == "perturbed" and self.pag))


REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method("none", None, False),
        Method("cfg", "cfg", False),
        Method("pag", None, True),
        Method("cfg+pag", "cfg", True),
        Method("scfg", "scfg", False),
        Method("scfg+pag", "scfg", True),
    )
}
METHODS = tuple(REGISTRY)


def _check_number(name: str, value: float, minimum: float = 0.0) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value!r}")


def _check_window(name: str, window: tuple[float, float]) -> tuple[float, float]:
    try:
        start, stop = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (start, stop) of fractions of the sampling steps, got {window!r}") from None
    if not (0.0 <= start < stop <= 1.0) or not (math.isfinite(start) and math.isfinite(stop)):
        raise ValueError(f"{name} must satisfy 0 <= start < stop <= 1 (fractions of the sampling steps), got {window!r}")
    return start, stop


@dataclass(frozen=True)
class SCFGOptions:
    """Options of Semantic-aware CFG (Shen et al., CVPR 2024).

    mode: ``"reference"`` reproduces the public reference code's arithmetic ((S + 3S²)/4
        self-attention completion, foreground map from the unconditional half);
        ``"paper"`` uses the paper's mean of the first ``power`` powers of S and the conditional half.
    levels: downsampling factors (relative to the latent) whose attention layers segment; ``None``
        picks latent/4 and latent/8 when the U-Net has attention there, else its two coarsest levels.
    power: R, the number of self-attention powers averaged in ``"paper"`` mode.
    smoothing: apply the 3x3 Gaussian (sigma 0.5) to token maps and to the rate map.
    rate_min, rate_max: clamp of the per-pixel rate; ``cap`` bounds it further by ``cap / w``.
    """

    mode: str = "reference"
    levels: tuple[int, ...] | None = None
    power: int = 4
    smoothing: bool = True
    rate_min: float = 0.8
    rate_max: float = 3.0
    cap: float = 15.0

    def __post_init__(self) -> None:
        if self.mode not in SCFG_MODES:
            raise ValueError(f"scfg mode must be one of {SCFG_MODES}, got {self.mode!r}")
        if not isinstance(self.power, int) or isinstance(self.power, bool) or self.power < 1:
            raise ValueError(f"scfg power must be an integer >= 1, got {self.power!r}")
        if self.levels is not None:
            levels = tuple(self.levels)
            if not levels or any(not isinstance(f, int) or f < 1 or f & (f - 1) for f in levels):
                raise ValueError(f"scfg levels must be downsampling factors (powers of two, e.g. (4, 8)), got {self.levels!r}")
            object.__setattr__(self, "levels", tuple(sorted(set(levels))))
        _check_number("scfg rate_min", self.rate_min)
        _check_number("scfg rate_max", self.rate_max)
        _check_number("scfg cap", self.cap)
        if self.rate_min > self.rate_max:
            raise ValueError(f"scfg rate_min must be <= rate_max, got {self.rate_min} > {self.rate_max}")


# The library's defaults, used wherever neither the caller nor the model folder's ``attnguide.json``
# gives a value (``pipelines.recommended_settings``): the method combining all of attnguide's terms;
# w = 7.5 and 50 steps, S-CFG's reference setting (SD's own default w); s = 3.0 and the mid block,
# diffusers' PAG defaults (methods.md).
DEFAULTS = {"method": "scfg+pag", "guidance_scale": 7.5, "pag_scale": 3.0, "num_inference_steps": 50}


@dataclass(frozen=True)
class GuidanceConfig:
    """Which guidance to apply and how strongly; validated on construction.

    ``guidance_scale`` is w (CFG and S-CFG), ``pag_scale`` is s. ``cfg_window`` / ``pag_window`` limit
    each term to a fraction [start, stop) of the sampling steps; outside its window a term's extra
    branch is not computed at all. ``guidance_rescale`` is φ of Lin et al. (2024), 0 = off.
    """

    method: str = DEFAULTS["method"]
    guidance_scale: float = DEFAULTS["guidance_scale"]
    pag_scale: float = DEFAULTS["pag_scale"]
    cfg_window: tuple[float, float] = (0.0, 1.0)
    pag_window: tuple[float, float] = (0.0, 1.0)
    guidance_rescale: float = 0.0
    scfg: SCFGOptions = field(default_factory=SCFGOptions)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        _check_number("guidance_scale", self.guidance_scale)
        _check_number("pag_scale", self.pag_scale)
        _check_number("guidance_rescale", self.guidance_rescale)
        if self.guidance_rescale > 1:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {self.guidance_rescale!r}")
        object.__setattr__(self, "cfg_window", _check_window("cfg_window", self.cfg_window))
        object.__setattr__(self, "pag_window", _check_window("pag_window", self.pag_window))
        if not isinstance(self.scfg, SCFGOptions):
            raise ValueError(f"scfg must be an SCFGOptions, got {type(self.scfg).__name__}")

    @property
    def uses_cfg(self) -> bool:
        return REGISTRY[self.method].uses_cfg

    @property
    def uses_scfg(self) -> bool:
        return REGISTRY[self.method].uses_scfg

    @property
    def uses_pag(self) -> bool:
        return REGISTRY[self.method].pag


@dataclass(frozen=True)
class StepPlan:
    """What one denoising step computes: the batch branches and the active terms."""

    branches: tuple[str, ...]
    cfg: bool  # the text-guidance term (CFG or S-CFG) is active
    scfg: bool  # ... and it is S-CFG
    pag: bool


def _in_window(window: tuple[float, float], step: int, num_steps: int) -> bool:
    fraction = step / num_steps
    return window[0] <= fraction < window[1]


def plan_step(config: GuidanceConfig, step: int, num_steps: int) -> StepPlan:
    """The branches a step needs. A term that is outside its window, or whose scale makes it a
    no-op (CFG at w = 1, PAG at s = 0), adds no branch."""
    cfg = config.uses_cfg and _in_window(config.cfg_window, step, num_steps)
    if cfg and not config.uses_scfg and config.guidance_scale == 1.0:
        cfg = False  # ε_u + 1·(ε_c − ε_u) = ε_c
    pag = config.uses_pag and config.pag_scale != 0.0 and _in_window(config.pag_window, step, num_steps)
    branches = tuple(b for b in BRANCH_ORDER if b == "cond" or (b == "uncond" and cfg) or (b == "perturbed" and pag))
    return StepPlan(branches=branches, cfg=cfg, scfg=cfg and config.uses_scfg, pag=pag)


def cfg_term(uncond: torch.Tensor, cond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): ε_u + w·(ε_c − ε_u). ``scale`` may be a per-pixel
    map: S-CFG's step 7 (Shen et al. 2024), ε_u + w·rate(x)·(ε_c − ε_u)."""
    return uncond + scale * (cond - uncond)


def pag_term(cond: torch.Tensor, perturbed: torch.Tensor, scale: float) -> torch.Tensor:
    """PAG's guidance term (Ahn et al. 2024, §3: ε̃ = ε_c + s·(ε_c − ε̂), ε̂ the prediction with
    identity self-attention): s·(ε_c − ε_p)."""
    return scale * (cond - perturbed)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2024, eq. 15-16): match the std of the guided prediction to
    the conditional one, then mix with weight φ."""
    dims = list(range(1, guided.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided.clamp_min(torch.finfo(guided.dtype).tiny))
    return phi * rescaled + (1 - phi) * guided


def combine(
    predictions: dict[str, torch.Tensor],
    plan: StepPlan,
    config: GuidanceConfig,
    rate: torch.Tensor | None = None,
) -> torch.Tensor:
    """The guided noise prediction of one step from the named branch predictions.

    none / terms outside their window: ε_c.  CFG: ε_u + w(ε_c − ε_u).  S-CFG: ε_u + w·rate(x)(ε_c − ε_u).
    PAG adds s(ε_c − ε_p) to whichever base applies.
    """
    cond = predictions["cond"]
    # Text term first (CFG, or S-CFG step 7 with the per-pixel rate), then PAG's term added to it:
    # ε̂ = ε_u + w(ε_c − ε_u) + s(ε_c − ε_p), PAG combined with CFG (Ahn et al. 2024; methods.md).
    if plan.cfg:
        scale = config.guidance_scale if not plan.scfg else config.guidance_scale * rate
        if plan.scfg and rate is None:
            raise ValueError("S-CFG needs the per-pixel rate map")
        guided = cfg_term(predictions["uncond"], cond, scale)
    else:
        guided = cond
    if plan.pag:
        guided = guided + pag_term(cond, predictions["perturbed"], config.pag_scale)
    if config.guidance_rescale > 0 and (plan.cfg or plan.pag):
        guided = rescale_guidance(guided, cond, config.guidance_rescale)
    return guided
