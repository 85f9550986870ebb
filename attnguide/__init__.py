"""attnguide: training-free, attention-based guidance (PAG, S-CFG and CFG) for diffusers U-Nets.

Names are imported on first use (``attnguide.generate``, ``attnguide.pipelines``, ...), so
``import attnguide`` and ``attnguide --help`` do not import torch. The built-in model's autoencoder
module, which the model's ``model_index.json`` names for diffusers' loader, is registered in
``sys.modules`` at import (lazily: it loads on first attribute access), so ``import attnguide`` then
``StableDiffusionPipeline.from_pretrained(builtin_folder)`` works.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    "METHODS": "guidance", "GuidanceConfig": "guidance", "SCFGOptions": "guidance",
    "GenerationResult": "sampling", "StepInfo": "sampling", "generate": "sampling",
    "guide": "engine", "GuideRun": "engine",
    "Limits": "validation", "NonFiniteError": "validation",
    "load_pipeline": "pipelines", "builtin_model_path": "pipelines", "ModelLoadError": "pipelines",
    "recommended_settings": "pipelines",
    "PatchAutoencoder": "builtin.autoencoder",
}
_SUBMODULES = ("attention", "builtin", "cli", "engine", "evaluation", "guidance", "pipelines", "report", "sampling",
               "segmentation", "validation")

__all__ = [*_EXPORTS, *_SUBMODULES]


class _LazyModule(types.ModuleType):
    """A stand-in in ``sys.modules`` that imports the real module on first access to a public name
    (private and dunder names, which module scanners read, do not trigger it)."""

    def __getattr__(self, attr: str):
        if attr.startswith("_"):
            raise AttributeError(attr)
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        try:
            module = importlib.import_module(name)
        except BaseException:
            sys.modules.setdefault(name, self)
            raise
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, module)
        return getattr(module, attr)


def _register_lazy(name: str) -> None:
    """Put a stand-in for module ``name`` in ``sys.modules`` without running the module."""
    if name in sys.modules or importlib.util.find_spec(name) is None:
        return
    stub = _LazyModule(name)
    sys.modules[name] = stub
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, stub)


_register_lazy(f"{__name__}.builtin.autoencoder")


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
