"""Loading diffusers pipelines from local folders (safetensors only, no remote code)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def builtin_model_path() -> Path:
    """The folder of the built-in model shipped with the package."""
    from .builtin.model import MODEL_DIR

    return MODEL_DIR


DEFAULT_SETTINGS = {"guidance_scale": 7.5, "pag_scale": 3.0, "num_inference_steps": 50, "scfg_levels": None}


def recommended_settings(pipe) -> dict:
    """Sampling settings a model folder recommends in its ``attnguide.json`` (w, s, steps, S-CFG
    levels), over ``DEFAULT_SETTINGS``; the built-in model ships one."""
    import json

    settings = dict(DEFAULT_SETTINGS)
    path = Path(getattr(pipe, "name_or_path", "") or "") / "attnguide.json"
    if path.is_file():
        settings.update({k: v for k, v in json.loads(path.read_text()).items() if k in DEFAULT_SETTINGS})
    return settings


@contextlib.contextmanager
def _quiet():
    """No loading bars or library notices while loading (errors still raise)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


def load_pipeline(model: str | Path | None = None, device: str = "cpu", dtype: str = "float32"):
    """A diffusers text-to-image pipeline from a local folder (default: the built-in model).

    Weights are read from safetensors files only; nothing is downloaded and no code from the folder runs.
    """
    from diffusers import DiffusionPipeline

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path = Path(model) if model is not None else builtin_model_path()
    if not (path / "model_index.json").is_file():
        raise ValueError(f"model must be a local diffusers folder with a model_index.json; {str(path)!r} has none")
    with _quiet():
        pipe = DiffusionPipeline.from_pretrained(path, dtype=DTYPES[dtype], use_safetensors=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
