"""What an evaluation sweeps: configs (a method with its scales, the ``--methods METHOD@SCALES``
grammar), jobs (one image each) with their seeds, and work units (batches of jobs).

A *job* is one image: (config, prompt index p, sample index k). Its seed is
``seed + 1000 * p + k`` -- a function of (p, k) only, so every method and scale starts from the
same initial noise for the same (prompt, sample).

Jobs are batched into *work units*: each config's jobs in (p, k) order are cut into chunks of
``batch``. The units, not single jobs, are what gets sharded (unit i goes to process
i % world_size), because float results depend slightly on the batch an image was computed in;
this way a sharded run computes every image in exactly the batch a single-process run does.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..guidance import METHODS, REGISTRY
from .storage import IMAGES_DIR, JOBS_DIR, MASKS_DIR

SEED_STRIDE = 1000  # seed = base + SEED_STRIDE * prompt_index + sample_index


@dataclass(frozen=True)
class Config:
    """A method with its scales: ``guidance_scale`` is w (cfg, scfg, cfg+pag, scfg+pag),
    ``pag_scale`` is s (pag, cfg+pag, scfg+pag); a scale the method does not use is None."""

    method: str
    guidance_scale: float | None = None
    pag_scale: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--methods: unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        uses_w, uses_s = REGISTRY[self.method].uses_cfg, REGISTRY[self.method].pag
        for name, value, used in (("w", self.guidance_scale, uses_w), ("s", self.pag_scale, uses_s)):
            if used and value is None:
                raise ValueError(f"--methods: {self.method} needs a scale {name}")
            if not used and value is not None:
                raise ValueError(f"--methods: {self.method} takes no scale {name}, got {value!r}")
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--scales: scale {name} of {self.method} must be a finite number >= 0, got {value!r}")

    def ablations(self) -> list[Config]:
        """The configs this one is compared with (``Method.ablations`` at the same scales)."""
        out = []
        for name in REGISTRY[self.method].ablations:
            method = REGISTRY[name]
            out.append(Config(name, self.guidance_scale if method.uses_cfg else None, self.pag_scale if method.pag else None))
        return out

    @property
    def label(self) -> str:
        """``none``, ``cfg@5``, ``pag@2``, ``cfg+pag@5/1.5`` (the ``--methods`` syntax)."""
        scales = [f"{v:g}" for v in (self.guidance_scale, self.pag_scale) if v is not None]
        return self.method + (f"@{'/'.join(scales)}" if scales else "")

    @property
    def slug(self) -> str:
        """A folder name: ``cfg_w5``, ``pag_s2``, ``cfg-pag_w5_s1.5``."""
        parts = [self.method.replace("+", "-")]
        if self.guidance_scale is not None:
            parts.append(f"w{self.guidance_scale:g}")
        if self.pag_scale is not None:
            parts.append(f"s{self.pag_scale:g}")
        return "_".join(parts)

    @property
    def scale(self) -> float | None:
        """The swept scale: w for methods with CFG, s for pag, None for none."""
        return self.guidance_scale if self.guidance_scale is not None else self.pag_scale

    @property
    def uses_scfg(self) -> bool:
        return REGISTRY[self.method].uses_scfg

    def generate_kwargs(self) -> dict[str, Any]:
        """The method and scales as keyword arguments of ``attnguide.generate``."""
        kwargs: dict[str, Any] = {"method": self.method}
        if self.guidance_scale is not None:
            kwargs["guidance_scale"] = self.guidance_scale
        if self.pag_scale is not None:
            kwargs["pag_scale"] = self.pag_scale
        return kwargs


def _float(text: str, param: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{param}: {text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{param}: scales must be finite numbers >= 0, got {text!r}")
    return value


def parse_scales(text: str | None) -> list[float] | None:
    """``"3,5,7.5"`` -> [3.0, 5.0, 7.5]; None or empty -> None."""
    if text is None or not text.strip():
        return None
    return [_float(t.strip(), "--scales") for t in text.split(",") if t.strip()]


def parse_configs(
    methods: Iterable[str],
    scales: Sequence[float] | None = None,
    pag_scale: float | None = None,
    guidance_scale: float | None = None,
) -> list[Config]:
    """Configs from ``--methods`` items (comma lists allowed) and ``--scales``.

    An item is ``METHOD`` or ``METHOD@SCALES``: ``cfg@5``/``scfg@5`` (w), ``pag@2`` (s),
    ``cfg+pag@5/1.5`` (w/s) or ``cfg+pag@5`` (w, s = ``pag_scale``). A ``METHOD`` without ``@``
    gets one config per value of ``scales`` -- w for cfg/scfg/cfg+pag/scfg+pag (s fixed to
    ``pag_scale``), s for pag -- or, without ``scales``, ``guidance_scale`` resp. ``pag_scale``.
    ``none`` takes no scale. ``pag_scale`` / ``guidance_scale`` None: the built-in model's
    recommendation (``pipelines.recommended_settings``). Duplicates are dropped, order kept.
    """
    if pag_scale is None or guidance_scale is None:
        from ..pipelines import resolve_settings

        recommended = resolve_settings(None, pag_scale=pag_scale, guidance_scale=guidance_scale)
        pag_scale, guidance_scale = float(recommended["pag_scale"]), float(recommended["guidance_scale"])
    configs: list[Config] = []
    for item in (m.strip() for value in methods for m in value.split(",")):
        if not item:
            continue
        method, at, spec = item.partition("@")
        method = method.strip()
        if method not in METHODS:
            raise ValueError(f"--methods: unknown method {method!r} in {item!r}; choose from {', '.join(METHODS)}")
        if at:
            configs.append(_explicit_config(method, spec, item, pag_scale))
        elif not REGISTRY[method].uses_cfg and not REGISTRY[method].pag:
            configs.append(Config(method))
        elif not REGISTRY[method].uses_cfg:
            configs.extend(Config(method, None, s) for s in (scales or [pag_scale]))
        else:
            s = pag_scale if REGISTRY[method].pag else None
            configs.extend(Config(method, w, s) for w in (scales or [guidance_scale]))
    if not configs:
        raise ValueError("--methods: no method given")
    return list(dict.fromkeys(configs))


def _explicit_config(method: str, spec: str, item: str, pag_scale: float) -> Config:
    values = [_float(v.strip(), f"--methods ({item})") for v in spec.split("/")]
    entry = REGISTRY[method]
    if not entry.uses_cfg and not entry.pag:
        raise ValueError(f"--methods: {method} takes no scale, got {item!r}")
    if not entry.uses_cfg:
        if len(values) != 1:
            raise ValueError(f"--methods: {method} takes one scale (s), as {method}@2; got {item!r}")
        return Config(method, None, values[0])
    if not entry.pag:
        if len(values) != 1:
            raise ValueError(f"--methods: {method} takes one scale (w), as {method}@5; got {item!r}")
        return Config(method, values[0], None)
    if len(values) not in (1, 2):
        raise ValueError(f"--methods: {method} takes w or w/s, as {method}@5/1.5; got {item!r}")
    return Config(method, values[0], values[1] if len(values) == 2 else pag_scale)


def config_from_record(record: dict[str, Any]) -> Config:
    """The config a record was made with."""
    return Config(record["method"], record["guidance_scale"], record["pag_scale"])


def job_seed(base: int, prompt_index: int, sample_index: int) -> int:
    """The seed of sample k of prompt p: ``base + 1000 p + k``, the same for every config."""
    if not 0 <= sample_index < SEED_STRIDE:
        raise ValueError(f"--n: at most {SEED_STRIDE} samples per prompt, got sample index {sample_index}")
    return base + SEED_STRIDE * prompt_index + sample_index


@dataclass(frozen=True)
class Job:
    """One image to make: a config, a prompt (by index) and a sample index, with its seed."""

    config: Config
    prompt_index: int
    sample_index: int
    prompt: str
    seed: int

    @property
    def name(self) -> str:
        return f"p{self.prompt_index:05d}_k{self.sample_index:03d}"

    @property
    def key(self) -> str:
        return f"{self.config.slug}/{self.name}"

    def record_path(self, out: Path) -> Path:
        return out / JOBS_DIR / self.config.slug / f"{self.name}.json"

    def image_rel(self) -> str:
        return f"{IMAGES_DIR}/{self.config.slug}/{self.name}.png"

    def mask_rel(self) -> str:
        return f"{MASKS_DIR}/{self.config.slug}/{self.name}.png"


def build_jobs(configs: Sequence[Config], prompts: Sequence[str], n: int, seed: int) -> list[Job]:
    """Every job, config-major, then by prompt, then by sample."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n!r}")
    return [
        Job(c, p, k, prompt, job_seed(seed, p, k))
        for c in configs for p, prompt in enumerate(prompts) for k in range(n)
    ]


def work_units(jobs: Sequence[Job], batch: int) -> list[list[Job]]:
    """Jobs cut into batches: consecutive jobs of one config, at most ``batch`` each."""
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch!r}")
    units: list[list[Job]] = []
    for job in jobs:
        if units and units[-1][0].config == job.config and len(units[-1]) < batch:
            units[-1].append(job)
        else:
            units.append([job])
    return units


def shard(units: Sequence[list[Job]], rank: int, world_size: int) -> list[list[Job]]:
    """The units of process ``rank``: unit i goes to process i % world_size."""
    return [u for i, u in enumerate(units) if i % world_size == rank]


# --------------------------------------------------------------------------------------------
# The default scale


def model_folder(model: str | None) -> Path:
    """The model's folder (default: the built-in model)."""
    from ..pipelines import builtin_model_path

    return Path(model) if model else builtin_model_path()
