"""Small reusable checks of user input, and the configurable upper bounds (``Limits``).

Every check raises ``ValueError`` (``TypeError`` for a value of the wrong kind) whose message starts
with the parameter's name, and returns the value normalized to a plain Python type. Numbers may be
Python numbers, numpy scalars or 0-d torch tensors; ``bool`` never counts as a number.

This module imports no torch at import time (the command line's ``--help`` stays fast).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import Any, Iterator, Sequence

__all__ = [
    "Limits", "DEFAULT_LIMITS", "NonFiniteError", "SEED_MAX", "using_limits", "current_limits",
    "number", "integer", "flag", "choice", "window", "seed_list", "scfg_options", "callback", "check_guide_arguments",
]

SEED_MAX = 2**32 - 1  # torch's CPU generator (mt19937) keeps the low 32 bits of a seed; larger seeds alias


class NonFiniteError(FloatingPointError):
    """The denoising produced NaN or infinite values; the message names the step and the cause."""


@dataclass(frozen=True)
class Limits:
    """Upper bounds checked before any work (so a typo cannot allocate until the machine dies).

    max_scale: largest guidance_scale (w) and pag_scale (s).
    max_pixels: largest height x width of an image (default 2048 x 2048).
    max_images: largest number of images one call makes (prompts x num_images_per_prompt).
    max_steps: largest num_inference_steps.

    Pass ``limits=Limits(max_pixels=4096 * 4096)`` to ``generate`` (unnamed fields keep the defaults),
    or wrap ``guide`` in ``with attnguide.validation.using_limits(Limits(...))``.
    """

    max_scale: float = 100.0
    max_pixels: int = 2048 * 2048
    max_images: int = 64
    max_steps: int = 1000

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_scale", number("limits.max_scale", self.max_scale, minimum=0.0, min_open=True))
        for name in ("max_pixels", "max_images", "max_steps"):
            object.__setattr__(self, name, integer(f"limits.{name}", getattr(self, name), minimum=1))




def current_limits() -> Limits:
    """The limits in force (``DEFAULT_LIMITS`` unless inside ``using_limits``)."""
    return _LIMITS.get()


@contextlib.contextmanager
def using_limits(limits: Limits | dict | None) -> Iterator[Limits]:
    """Use ``limits`` (a ``Limits`` or a dict of its fields) for the checks inside the block."""
    resolved = as_limits(limits)
    token = _LIMITS.set(resolved)
    try:
        yield resolved
    finally:
        _LIMITS.reset(token)


def as_limits(limits: Limits | dict | None) -> Limits:
    if limits is None:
        return current_limits()
    if isinstance(limits, Limits):
        return limits
    if isinstance(limits, dict):
        known = {f.name for f in fields(Limits)}
        unknown = sorted(set(limits) - known)
        if unknown:
            raise ValueError(f"limits: unknown field(s) {unknown}; known: {sorted(known)}")
        return replace(DEFAULT_LIMITS, **limits)
    raise TypeError(f"limits must be an attnguide.Limits or a dict of its fields, got {type(limits).__name__}")


# ----------------------------------------------------------------------------------------------
# Scalars


def _scalar(value: Any) -> Any:
    """A Python scalar from a numpy scalar or a 0-d (or one-element) torch tensor; else ``value``."""
    module = type(value).__module__
    if module == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value if _is_bool(value) else value.item()
    if module.startswith("torch") and hasattr(value, "dim") and value.dim() == 0:
        if value.dtype.is_complex or str(value.dtype) == "torch.bool":
            return value
        return value.item()
    return value


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_", "bool8"))


def number(name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
           min_open: bool = False, max_open: bool = False, hint: str = "") -> float:
    """A finite real number in the given range, as a Python float."""
    raw = value
    value = _scalar(value)
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {raw!r} ({type(raw).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {raw!r}")
    low_ok = minimum is None or (value > minimum if min_open else value >= minimum)
    high_ok = maximum is None or (value < maximum if max_open else value <= maximum)
    if not (low_ok and high_ok):
        low = "" if minimum is None else f"{'>' if min_open else '>='} {minimum:g}"
        high = "" if maximum is None else f"{'<' if max_open else '<='} {maximum:g}"
        raise ValueError(f"{name} must be {' and '.join(p for p in (low, high) if p)}, got {raw!r}{hint}")
    return value


def integer(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None, hint: str = "") -> int:
    """An integer (Python, numpy or 0-d torch; not bool, not float) in the given range."""
    raw = value
    value = _scalar(value)
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {raw!r} ({type(raw).__name__})")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        span = (f"in [{minimum}, {maximum}]" if minimum is not None and maximum is not None
                else f">= {minimum}" if minimum is not None else f"<= {maximum}")
        raise ValueError(f"{name} must be an integer {span}, got {raw!r}{hint}")
    return value


def flag(name: str, value: Any) -> bool:
    """True or False (Python or numpy bool); strings such as "no" are refused."""
    if _is_bool(value):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def window(name: str, value: Any) -> tuple[float, float]:
    """A pair (start, stop) with 0 <= start < stop <= 1 (fractions of the sampling steps)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise TypeError(f"{name} must be a pair (start, stop) of fractions of the sampling steps, got {value!r}")
    start = number(f"{name} start", value[0], minimum=0.0, maximum=1.0)
    stop = number(f"{name} stop", value[1], minimum=0.0, maximum=1.0)
    if not start < stop:
        raise ValueError(f"{name} must satisfy 0 <= start < stop <= 1 (fractions of the sampling steps), got {value!r}")
    return start, stop


def steps_in_window(win: tuple[float, float], num_steps: int) -> list[int]:
    """The step indices i of ``num_steps`` with start <= i / num_steps < stop (the engine's rule)."""
    return [i for i in range(num_steps) if win[0] <= i / num_steps < win[1]]


def seed_list(seed: Any, count: int) -> list[int]:
    """One seed per image from an int (image i gets seed + i) or a sequence of ``count`` ints, each in
    [0, 2**32 - 1], the range torch's CPU generator tells apart."""
    hint = f" (torch's CPU generator keeps only the low 32 bits, so seeds must lie in [0, {SEED_MAX}])"
    if isinstance(seed, (list, tuple)) or getattr(seed, "ndim", 0) >= 1:
        values = list(seed)
        if len(values) != count:
            raise ValueError(f"seed must be an int or a list of {count} ints (one per image), got {len(values)} seeds")
        return [integer(f"seed[{i}]", s, minimum=0, maximum=SEED_MAX, hint=hint) for i, s in enumerate(values)]
    base = integer("seed", seed, minimum=0, maximum=SEED_MAX, hint=hint)
    if base + count - 1 > SEED_MAX:
        raise ValueError(f"seed must be <= {SEED_MAX - count + 1} for {count} images (image i uses seed + i){hint}, got {seed!r}")
    return [base + i for i in range(count)]


def callback(name: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a function (or None), got {value!r} ({type(value).__name__})")
    return value


def string_or_strings(name: str, value: Any) -> list[str]:
    """One string or a non-empty list/tuple of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise (ValueError if isinstance(value, (list, tuple)) else TypeError)(
        f"{name} must be a string or a non-empty list of strings, got {value!r}")


# ----------------------------------------------------------------------------------------------
# Guidance options


def scfg_options(value: Any, limits: Limits | None = None):
    """``SCFGOptions`` from an ``SCFGOptions``, a dict of its fields or None, every field checked."""
    from .guidance import SCFG_MODES, SCFGOptions

    limits = limits or current_limits()
    if value is None:
        return SCFGOptions()
    if isinstance(value, SCFGOptions):
        items = {f.name: getattr(value, f.name) for f in fields(SCFGOptions)}
    elif isinstance(value, dict):
        known = [f.name for f in fields(SCFGOptions)]
        unknown = [k for k in value if k not in known]
        if unknown:
            raise ValueError(f"scfg: unknown option(s) {unknown}; known: {', '.join(known)}")
        items = dict(value)
    else:
        raise TypeError(f"scfg must be an SCFGOptions or a dict of its fields, got {type(value).__name__}")
    out: dict[str, Any] = {}
    if "mode" in items:
        out["mode"] = choice("scfg mode", items["mode"], SCFG_MODES)
    if "power" in items:
        out["power"] = integer("scfg power", items["power"], minimum=1, maximum=32)
    if "smoothing" in items:
        out["smoothing"] = flag("scfg smoothing", items["smoothing"])
    if items.get("levels") is not None:
        levels = items["levels"]
        if isinstance(levels, (str, bytes)) or not hasattr(levels, "__iter__"):
            raise TypeError(f"scfg levels must be downsampling factors (powers of two, e.g. (4, 8)), got {levels!r}")
        levels = tuple(integer("scfg levels", f, minimum=1) for f in levels)
        if not levels or any(f & (f - 1) for f in levels):
            raise ValueError(f"scfg levels must be downsampling factors (powers of two, e.g. (4, 8)), got {items['levels']!r}")
        out["levels"] = levels
    elif "levels" in items:
        out["levels"] = None
    if "rate_min" in items:
        out["rate_min"] = number("scfg rate_min", items["rate_min"], minimum=0.0, maximum=limits.max_scale)
    if "rate_max" in items:
        out["rate_max"] = number("scfg rate_max", items["rate_max"], minimum=0.0, maximum=limits.max_scale, min_open=True,
                                 hint=" (0 would turn S-CFG's guidance off)")
    if "cap" in items:
        out["cap"] = number("scfg cap", items["cap"], minimum=0.0, min_open=True,
                            hint=" (the rate is bounded by cap / w, so 0 would turn S-CFG's guidance off)")
    defaults = SCFGOptions()
    if out.get("rate_min", defaults.rate_min) > out.get("rate_max", defaults.rate_max):
        raise ValueError(f"scfg rate_min must be <= rate_max, got {out.get('rate_min', defaults.rate_min)} > "
                         f"{out.get('rate_max', defaults.rate_max)}")
    return SCFGOptions(**out)


GUIDE_ARGUMENTS = ("method", "pag_scale", "pag_layers", "cfg_window", "pag_window", "guidance_rescale", "scfg",
                   "return_masks", "mask_steps", "callback")


def check_guide_arguments(pipe, method: Any, pag_scale: Any, pag_layers: Any, cfg_window: Any, pag_window: Any,
                          guidance_rescale: Any, scfg: Any, return_masks: Any, mask_steps: Any, callback_fn: Any,
                          default_pag_layers: Sequence[str] = ("mid",), limits: Limits | None = None) -> tuple:
    """Everything ``guide`` can check at its entry, normalized, as a tuple in the order of
    ``GUIDE_ARGUMENTS``. Every option is checked whether or not ``method`` uses it (a value a method
    ignores must still be valid); ``pag_layers`` is matched against the U-Net whenever it is not the default."""
    from .guidance import METHODS

    limits = limits or current_limits()
    choice("method", method, METHODS)
    pag_scale = number("pag_scale", pag_scale, minimum=0.0, maximum=limits.max_scale,
                       hint=" (attnguide.Limits.max_scale bounds it)")
    guidance_rescale = number("guidance_rescale", guidance_rescale, minimum=0.0, maximum=1.0)
    cfg_window = window("cfg_window", cfg_window)
    pag_window = window("pag_window", pag_window)
    scfg = scfg_options(scfg, limits)
    return_masks = flag("return_masks", return_masks)
    if mask_steps is not None:
        if isinstance(mask_steps, (str, bytes)) or not hasattr(mask_steps, "__iter__"):
            raise TypeError(f"mask_steps must be a list of step indices (or None), got {mask_steps!r}")
        mask_steps = [integer("mask_steps", s, minimum=0) for s in mask_steps]
    callback_fn = callback("callback", callback_fn)
    if isinstance(pag_layers, str):
        layers: Any = pag_layers
    elif isinstance(pag_layers, (list, tuple)) and all(isinstance(p, str) for p in pag_layers):
        layers = list(pag_layers)
    else:
        raise TypeError(f"pag_layers must be a layer name/pattern or a list of them, got {pag_layers!r}")
    unet = getattr(pipe, "unet", None)
    given = ([layers] if isinstance(layers, str) else list(layers)) != list(default_pag_layers)
    if unet is not None and given:
        from . import attention

        attention.select_self_attention(unet, layers)  # raises ValueError naming pag_layers
    if scfg.levels is not None:
        if unet is None:
            raise ValueError("scfg levels do not apply to transformer denoisers (every block sees the same token grid)")
        from . import attention

        attention.scfg_layers(unet, scfg.levels)  # raises ValueError naming scfg levels and those available
    return (method, pag_scale, layers, cfg_window, pag_window, guidance_rescale, scfg, return_masks, mask_steps,
            callback_fn)


def non_finite_error(step: int, total: int, sample, predictions: dict, config) -> NonFiniteError:
    """The error for a non-finite guided prediction at ``step``, naming the first cause found."""
    import torch

    where = f"step {step + 1} of {total}"
    if not bool(torch.isfinite(sample).all()):
        cause = ("the latents entering the U-Net are already NaN/infinite (an earlier scheduler step diverged: "
                 "check eta, the scheduler and the input image)")
    else:
        bad = [b for b, p in predictions.items() if not bool(torch.isfinite(p).all())]
        if bad:
            cause = (f"the U-Net's own prediction ({', '.join(bad)} branch) is NaN/infinite for finite input "
                     f"(dtype {sample.dtype}: a float16 overflow? try float32 or bfloat16)")
        else:
            cause = (f"combining the predictions overflowed (guidance_scale={config.guidance_scale:g}, "
                     f"pag_scale={config.pag_scale:g}, method {config.method}): lower the scales")
    return NonFiniteError(f"non-finite values at {where}: {cause}")


DEFAULT_LIMITS = Limits()
_LIMITS: contextvars.ContextVar[Limits] = contextvars.ContextVar("attnguide_limits", default=DEFAULT_LIMITS)


def with_option_name(message: str, options: dict[str, str]) -> str:
    """``message``, which starts with an API parameter's name, starting with the name of the option
    that sets it instead (``options`` maps parameter names to option names; longest match wins)."""
    for name in sorted(options, key=len, reverse=True):
        after = message[len(name):len(name) + 1]
        if message.startswith(name) and not (after.isalnum() or after == "_"):
            return options[name] + message[len(name):]
    return message
