"""Loading diffusers pipelines from local folders (safetensors only, no remote code)."""
from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def builtin_model_path() -> Path:
    """The folder of the built-in model shipped with the package."""
    from .builtin.model import MODEL_DIR

    return MODEL_DIR


def default_settings() -> dict:
    """The library's defaults (``guidance.DEFAULTS``), the layers PAG perturbs (the mid block) and
    S-CFG's levels (None: chosen from the denoiser's architecture, ``attention.default_scfg_levels``)."""
    from .engine import DEFAULT_PAG_LAYERS
    from .guidance import DEFAULTS

    return {**DEFAULTS, "pag_layers": list(DEFAULT_PAG_LAYERS), "scfg_levels": None}


def recommended_settings(model) -> dict:
    """The settings every entry point (API, CLI, web UI, eval) uses where the caller gives none:
    what the model folder recommends in its ``attnguide.json`` (method, w, s, steps, PAG layers, S-CFG levels),
    over the library's defaults. ``model`` is a pipeline (its ``name_or_path`` folder), a folder, or
    None (the built-in model); the built-in model ships one."""
    settings = default_settings()
    if model is None:
        folder = builtin_model_path()
    elif isinstance(model, (str, Path)):
        folder = Path(model)
    else:
        folder = Path(getattr(model, "name_or_path", "") or "")
    path = folder / "attnguide.json"
    if str(folder) not in ("", ".") and path.is_file():
        stored = _read_settings_file(str(path.resolve()), path.stat().st_mtime_ns)
        settings.update({k: v for k, v in stored.items() if k in settings})
    return settings


@functools.lru_cache(maxsize=16)
def _read_settings_file(path: str, mtime_ns: int) -> dict:
    """An ``attnguide.json``, parsed once per version of the file (``mtime_ns`` is the cache key:
    one generate call asks for it several times; an edited file is read again)."""
    return json.loads(Path(path).read_text())


def resolve_settings(model, **given) -> dict:
    """``recommended_settings(model)`` with every value of ``given`` that is not None put over it."""
    settings = recommended_settings(model)
    settings.update({k: v for k, v in given.items() if v is not None})
    return settings


@contextlib.contextmanager
def quiet():
    """No loading bars or library notices (diffusers, transformers) inside the block; errors still
    raise. Verbosity and progress-bar settings are restored afterwards."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    saved = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    for lib in libraries:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*(torchvision|accelerate).*")
            yield
    finally:
        for lib, (level, bars) in zip(libraries, saved):
            lib.set_verbosity(level)
            if bars:
                lib.enable_progress_bar()


_quiet = quiet  # old name


class ModelLoadError(ValueError):
    """A model folder that cannot be loaded; the message names the file and the reason."""


def check_device(device) -> str:
    """``device`` as a string, after checking torch knows it and this machine has it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps): {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} is not available: this torch ({torch.__version__}) sees no CUDA GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r} is not available: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device: {device!r} is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"device: {device!r} is not supported here; use cpu, cuda or mps")
    return str(device)


def check_safetensors(path: Path) -> None:
    """A safetensors file must have a readable header and hold every byte the header describes."""
    import json
    import struct

    size = path.stat().st_size
    where = f"model: {path}"
    if size < 8:
        raise ModelLoadError(f"{where}: truncated or not a safetensors file ({size} bytes)")
    with path.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > min(size - 8, 100 << 20):
            raise ModelLoadError(f"{where}: not a safetensors file, or truncated (its header length field says "
                                 f"{header_len} bytes; the file holds {size})")
        try:
            header = json.loads(fh.read(header_len))
        except (ValueError, UnicodeDecodeError):
            raise ModelLoadError(f"{where}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{where}: not a safetensors file (its header is not a JSON object)")
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    need = 8 + header_len + max(ends, default=0)
    if need > size:
        raise ModelLoadError(f"{where}: truncated: its header describes {need} bytes, the file holds {size}")


_NO_WEIGHTS = ("scheduler", "tokenizer", "tokenizer_2", "feature_extractor", "image_processor")


def check_model_folder(path: str | Path) -> Path:
    """Check a diffusers model folder before loading: model_index.json, the pipeline class, every
    listed component folder with its config, and every safetensors file. Raises ``ModelLoadError``."""
    import json

    import diffusers

    path = Path(path)
    index = path / "model_index.json"
    if not path.is_dir():
        raise ModelLoadError(f"model: {str(path)!r} is not a folder")
    if not index.is_file():
        raise ModelLoadError(f"model: {str(path)!r} is not a local diffusers folder: it has no model_index.json")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"model: {index}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("_class_name"), str):
        raise ModelLoadError(f"model: {index}: has no pipeline class (_class_name)")
    if not hasattr(diffusers, data["_class_name"]):
        raise ModelLoadError(f"model: {index}: names pipeline class {data['_class_name']!r}, which diffusers "
                             f"{diffusers.__version__} does not have")
    for name, entry in data.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or None in entry:
            continue
        folder = path / name
        if not folder.is_dir():
            raise ModelLoadError(f"model: {folder}: missing (model_index.json lists component {name!r}: {entry[0]}.{entry[1]})")
        configs = sorted(folder.glob("*.json"))
        if not configs:
            raise ModelLoadError(f"model: {folder}: has no configuration (.json) file")
        for config in configs:
            try:
                json.loads(config.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise ModelLoadError(f"model: {config}: not valid JSON ({exc})") from None
        weights = sorted(folder.glob("*.safetensors"))
        if name not in _NO_WEIGHTS and (folder / "config.json").is_file() and not weights:
            raise ModelLoadError(f"model: {folder}: has no .safetensors weights (only safetensors files are loaded)")
        for file in weights:
            check_safetensors(file)
    return path


def load_error_reason(exc: BaseException) -> str:
    """The most specific one-line reason in an exception chain."""
    messages = []
    while exc is not None and len(messages) < 5:
        text = " ".join(str(exc).split())
        if text:
            messages.append(f"{text}" if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {text}")
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(messages[:2]) or "unknown error"


def load_pipeline(model: str | Path | None = None, device: str = "cpu", dtype: str = "float32"):
    """A diffusers text-to-image pipeline from a local folder (default: the built-in model).

    Weights are read from safetensors files only; nothing is downloaded and no code from the folder runs.
    The device and the folder are checked before anything is loaded; errors are ``ValueError``s
    (``ModelLoadError`` for the folder) naming the file and the reason.
    """
    from diffusers import DiffusionPipeline

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    device = check_device(device)
    with quiet():  # diffusers' lazy pipeline imports make transformers log notices about optional backends
        path = check_model_folder(Path(model) if model is not None else builtin_model_path())
        import attnguide.builtin.autoencoder  # noqa: F401  (the built-in model's vae class, named in its model_index.json)

        try:
            pipe = DiffusionPipeline.from_pretrained(path, dtype=DTYPES[dtype], use_safetensors=True, local_files_only=True)
        except (OSError, ValueError, KeyError, AttributeError, ImportError, TypeError, RuntimeError) as exc:
            raise ModelLoadError(f"model: could not load {str(path)!r}: {load_error_reason(exc)}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
