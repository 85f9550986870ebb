"""The settings of an evaluation run: ``EvalSettings``, the prompts and the model they name, the
checks made before anything is written, and the run metadata (``run.json``) a resumed call must
match.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..guidance import REGISTRY, SCFG_MODES
from .errors import BadInput, EvalFolderError
from .sweep import Config, job_seed, model_folder

DEFAULT_BUILTIN_PROMPTS = 100
# Settings that fix what an image is; a resumed call must repeat them.
FIXED_SETTINGS = ("model", "model_fingerprint", "prompts", "prompt_seed", "steps", "seed", "height", "width",
                  "dtype", "pag_layers", "scfg_mode", "scfg_levels", "negative_prompt")


@dataclass
class EvalSettings:
    """Everything ``run_eval`` needs (the ``attnguide eval run`` options)."""

    out: Path
    configs: list[Config]
    prompts: str = "builtin"
    num_prompts: int | None = None
    prompt_seed: int = 1000
    n: int = 1
    model: str | None = None
    steps: int | None = None  # None: the model's recommendation (pipelines.recommended_settings)
    seed: int = 0
    batch: int = 8
    pag_layers: tuple[str, ...] | None = None  # None: the model's recommendation (pipelines.recommended_settings)
    scfg_mode: str = "reference"
    scfg_levels: tuple[int, ...] | None = None  # None: the model's recommendation (engine.default_levels)
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    evaluator: str | None = None
    clip: str | None = None
    min_real: int = 500
    grid_prompts: int = 4
    progress: bool = True
    report: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.steps is None or self.pag_layers is None:
            from ..pipelines import recommended_settings

            recommended = recommended_settings(self.model)
            self.steps = int(recommended["num_inference_steps"]) if self.steps is None else self.steps
            self.pag_layers = tuple(recommended["pag_layers"]) if self.pag_layers is None else self.pag_layers
        for name in ("steps", "batch", "n"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)!r}")
        if self.scfg_mode not in SCFG_MODES:
            raise ValueError(f"--scfg-mode must be one of {SCFG_MODES}, got {self.scfg_mode!r}")
        if self.min_real < 2:
            raise ValueError(f"--min-real must be >= 2, got {self.min_real!r}")
        if self.grid_prompts < 0:
            raise ValueError(f"--grid-prompts must be >= 0, got {self.grid_prompts!r}")
        if self.clip is not None and not Path(self.clip).is_dir():
            raise ValueError(f"--clip: CLIP model folder {self.clip!r} does not exist (nothing is downloaded)")
        if self.evaluator is not None and not Path(self.evaluator).is_file():
            raise ValueError(f"--evaluator: weights file {self.evaluator!r} does not exist")


def load_prompts(source: str, num_prompts: int | None, prompt_seed: int):
    """Prompts and, for ``builtin``, their scenes (ground truth).

    ``source`` is ``builtin`` -- the first ``num_prompts`` (default 100) held-out scenes of
    ``data.scenes(prompt_seed, ...)`` -- or a UTF-8 text file with one prompt a line (blank lines
    and lines starting with ``#`` skipped; the first ``num_prompts`` when given). Returns
    ``(prompts, scenes or None)``.
    """
    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {num_prompts!r}")
    if source == "builtin":
        from ..builtin import data

        scenes = data.scenes(prompt_seed, num_prompts or DEFAULT_BUILTIN_PROMPTS, "heldout")
        return [s.caption for s in scenes], scenes
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"--prompts must be 'builtin' or a text file of prompts; {source!r} is neither")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts: {source!r} holds no prompts (one per line expected)")
    return prompts[:num_prompts] if num_prompts else prompts, None


def model_fingerprint(folder: str | Path) -> str:
    """A short content hash of a model folder (every file's path and size; the content of files
    up to 256 MiB, the first and last MiB of larger ones)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder).as_posix()}\0{size}\0".encode())
        with path.open("rb") as fh:
            if size <= 256 << 20:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
            else:
                digest.update(fh.read(1 << 20))
                fh.seek(-(1 << 20), os.SEEK_END)
                digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:16]


def load_model(model: str | None, device: str, dtype: str, attempts: int = 5):
    """Load the pipeline and fingerprint its folder, retrying when the folder changed while it
    was read (the built-in model folder is swapped atomically by training exports)."""
    from ..pipelines import load_pipeline

    folder = model_folder(model)
    last: Exception | None = None
    for attempt in range(attempts):
        swapping = folder.with_name(folder.name + ".tmp").exists() or folder.with_name(folder.name + ".old").exists()
        if not (folder / "model_index.json").is_file() and not swapping:
            last = FileNotFoundError(f"{str(folder)!r} has no model_index.json")
            break
        try:
            before = model_fingerprint(folder)
            pipe = load_pipeline(model, device=device, dtype=dtype)
            if model_fingerprint(folder) == before:
                return pipe, before
        except (OSError, ValueError) as exc:
            last = exc
            if not swapping and attempt >= 1:
                break  # a broken folder, not one being swapped: retrying will not help
        time.sleep(1.0 + attempt)
    where = "the built-in model (train it with `attnguide train`, or pass --model)" if model is None else repr(str(folder))
    reason = " ".join(str(last).split()) if last else "it kept changing"
    raise BadInput(f"--model: could not load a stable model from {where}: {reason}")


def run_meta(settings: EvalSettings, fingerprint: str) -> dict[str, Any]:
    """The run metadata stored in ``run.json``."""
    return {
        "model": str(model_folder(settings.model).resolve()) if settings.model else "builtin",
        "model_fingerprint": fingerprint,
        "prompts": settings.prompts if settings.prompts == "builtin" else str(Path(settings.prompts).resolve()),
        "prompt_seed": settings.prompt_seed,
        "steps": settings.steps,
        "seed": settings.seed,
        "height": settings.height,
        "width": settings.width,
        "dtype": settings.dtype,
        "pag_layers": list(settings.pag_layers),
        "scfg_mode": settings.scfg_mode,
        "scfg_levels": list(settings.scfg_levels) if settings.scfg_levels else None,
        "negative_prompt": settings.negative_prompt,
        "evaluator": settings.evaluator,
        "clip": settings.clip,
        "min_real": settings.min_real,
        "configs": [c.label for c in settings.configs],
        "num_prompts": settings.num_prompts,
        "n": settings.n,
    }


def check_compatible(stored: dict[str, Any], meta: dict[str, Any], out: Path) -> None:
    """Refuse to resume a run in ``out`` whose stored settings differ from this call's."""
    changed = [k for k in FIXED_SETTINGS if stored.get(k) != meta.get(k)]
    if changed:
        details = "; ".join(f"{k}: stored {stored.get(k)!r}, now {meta.get(k)!r}" for k in changed)
        raise EvalFolderError(
            f"--out: {str(out)!r} holds a run made with other settings ({details}). Resume with the same "
            "settings, or use a new --out folder."
        )


def merged_meta(stored: dict[str, Any] | None, meta: dict[str, Any]) -> dict[str, Any]:
    """The run metadata after this call: configs of earlier calls are kept (first-seen order)."""
    if not stored:
        return meta
    merged = dict(meta)
    merged["configs"] = list(dict.fromkeys([*stored.get("configs", []), *meta["configs"]]))
    return merged


_EVAL_OPTIONS = {"guidance_scale": "--methods/--scales (w)", "pag_scale": "--pag-scale", "pag_layers": "--pag-layers",
                 "num_inference_steps": "--steps", "num_images_per_prompt": "--batch", "negative_prompt": "--negative-prompt",
                 "height": "--height", "width": "--width", "seed": "--seed", "prompt": "--prompts", "scfg mode": "--scfg-mode",
                 "scfg levels": "--scfg-levels",
                 "device": "--device", "dtype": "--dtype", "model": "--model"}


def option_message(exc: BaseException) -> str:
    """A validation message that starts with an API parameter name, starting with the option instead."""
    from ..validation import with_option_name

    return with_option_name(" ".join(str(exc).split()), _EVAL_OPTIONS)


def check_settings(settings: EvalSettings, pipe, prompts: Sequence[str]) -> None:
    """Everything a run would reject, checked before anything is written: every config's
    arguments of ``generate`` (with the first unit's prompts), and the range of the seeds."""
    from .. import sampling
    from ..validation import SEED_MAX

    last_seed = job_seed(settings.seed, len(prompts) - 1, settings.n - 1)
    if settings.seed < 0 or last_seed > SEED_MAX:
        raise BadInput(f"--seed: the jobs' seeds (seed + 1000 p + k) must lie in [0, {SEED_MAX}]; with --seed {settings.seed}, "
                       f"{len(prompts)} prompts and --n {settings.n} the last is {last_seed}")
    unit = list(prompts[: settings.batch])
    seeds = [settings.seed + i for i in range(len(unit))]
    for config in settings.configs:
        try:
            sampling.check_arguments(
                pipe, unit, **config.generate_kwargs(), pag_layers=list(settings.pag_layers),
                num_inference_steps=settings.steps, negative_prompt=negative_prompt_for(settings, config), height=settings.height,
                width=settings.width, seed=seeds, scfg=scfg_options(settings), output_type="pil", progress=False,
            )
        except (ValueError, TypeError) as exc:
            raise BadInput(f"{option_message(exc)} ({config.label})") from None


def scfg_options(settings: EvalSettings) -> dict[str, Any]:
    """The ``scfg`` argument of ``generate`` for every job of the run."""
    return {"mode": settings.scfg_mode, "levels": settings.scfg_levels}


def negative_prompt_for(settings: EvalSettings, config: Config) -> str | None:
    """The negative prompt for a config: only methods with CFG have an unconditional branch to use it."""
    return settings.negative_prompt if REGISTRY[config.method].uses_cfg else None
