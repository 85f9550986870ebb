"""Loading diffusers pipelines from local folders (safetensors only, no remote code)."""
from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def builtin_model_path() -> Path:
    """The folder of the built-in model shipped with the package."""
    from .builtin.model import MODEL_DIR

    return MODEL_DIR


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
    pipe = DiffusionPipeline.from_pretrained(
        path, torch_dtype=DTYPES[dtype], use_safetensors=True, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
