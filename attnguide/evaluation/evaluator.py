"""Evaluator for images of the synthetic shape scenes: a small network that detects the objects
of an image, and gives the learned features the Fréchet distance is computed on.

A small fully-convolutional network reads a 64x64 RGB image and predicts, per pixel,
foreground/background, a colour class and a shape class. Objects are the connected components of
the foreground; each gets its majority colour and shape, a size from its area and a centre from
its centroid. Training (``evaluator_train``) uses rendered scenes of both splits (so held-out
colour-shape pairs are recognised) with noise, blur and colour jitter so that it also reads
generated images. Scoring detections against prompts is in ``geneval``; the Fréchet distance in
``metrics``.

Weights are stored as safetensors only (``evaluator.safetensors``) with a JSON config beside them
(``evaluator.json``); nothing here unpickles or downloads anything.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from scipy import ndimage
from torch import nn

from attnguide.builtin import data

from .storage import atomic_write_bytes, atomic_write_text

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "evaluator.safetensors"
CONFIG_FORMAT = 1
COLOUR_NAMES: tuple[str, ...] = tuple(data.COLOURS)
SHAPE_NAMES: tuple[str, ...] = tuple(data.SHAPES)
SIZE_NAMES: tuple[str, ...] = tuple(data.SIZES)
DEFAULT_CHANNELS: tuple[int, ...] = (16, 32, 64, 128)
MIN_AREA = 12  # components smaller than this (in pixels) are noise, not objects
_N_OUT = 1 + len(COLOUR_NAMES) + len(SHAPE_NAMES)


# --------------------------------------------------------------------------------------------
# Network


class _ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by batch norm and ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class SceneNet(nn.Module):
    """A small U-Net: image (N, 3, H, W) in [-1, 1] -> per-pixel logits (N, 12, H, W).

    Output channels: 0 foreground, 1-6 colour classes (``COLOUR_NAMES``), 7-11 shape classes
    (``SHAPE_NAMES``). ``features`` gives the global-average-pooled bottleneck (N, channels[-1]).
    H and W must be divisible by 2 ** (len(channels) - 1).
    """

    def __init__(self, channels: Sequence[int] = DEFAULT_CHANNELS) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2 or min(channels) < 1:
            raise ValueError(f"channels must be at least two positive widths, got {channels!r}")
        self.channels = channels
        self.down = nn.ModuleList()
        c_prev = 3
        for c in channels:
            self.down.append(_ConvBlock(c_prev, c))
            c_prev = c
        self.up = nn.ModuleList(
            _ConvBlock(channels[i + 1] + channels[i], channels[i]) for i in reversed(range(len(channels) - 1))
        )
        self.head = nn.Conv2d(channels[0], _N_OUT, 1)

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        return skips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = self._encode(x)
        h = skips[-1]
        for block, skip in zip(self.up, reversed(skips[:-1])):
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = block(torch.cat([h, skip], dim=1))
        return self.head(h)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled bottleneck features, (N, channels[-1])."""
        return self._encode(x)[-1].mean(dim=(2, 3))


# --------------------------------------------------------------------------------------------
# Detection


@dataclass(frozen=True)
class DetectedObject:
    """One object found in an image.

    ``cx``/``cy`` estimate the object's centre in pixels, in the same convention as
    ``data.SceneObject`` (the mask centroid, corrected by the shape's known centroid offset);
    ``area`` is the component's pixel count.
    """

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    area: int

    def as_scene_object(self) -> data.SceneObject:
        """This detection as a ``data.SceneObject`` (for ``data.relation_holds`` and friends)."""
        return data.SceneObject(self.shape, self.colour, self.size, self.cx, self.cy)


def _as_input(images: np.ndarray | torch.Tensor, name: str = "images") -> torch.Tensor:
    """Validate images and return a float32 tensor (N, 3, H, W) in [-1, 1].

    Accepts float (N, 3, H, W) in [-1, 1] (as ``data.render_batch`` gives) or uint8 (N, H, W, 3)
    (as ``data.render`` gives, stacked); a single image without the batch axis is also accepted.
    """
    if isinstance(images, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(images))
    elif isinstance(images, torch.Tensor):
        tensor = images.detach().cpu()
    else:
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(images).__name__}")
    if tensor.dtype == torch.uint8:
        if tensor.ndim == 3:
            tensor = tensor[None]
        if tensor.ndim != 4 or tensor.shape[-1] != 3:
            raise ValueError(f"uint8 {name} must be (N, H, W, 3), got shape {tuple(tensor.shape)}")
        tensor = tensor.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    elif tensor.is_floating_point():
        if tensor.ndim == 3:
            tensor = tensor[None]
        if tensor.ndim != 4 or tensor.shape[1] != 3:
            raise ValueError(f"float {name} must be (N, 3, H, W) in [-1, 1], got shape {tuple(tensor.shape)}")
        tensor = tensor.float()
        if tensor.numel() and (tensor.min() < -1.5 or tensor.max() > 1.5):
            raise ValueError(
                f"float {name} must be scaled to [-1, 1], got values in "
                f"[{float(tensor.min()):.3g}, {float(tensor.max()):.3g}]"
            )
    else:
        raise TypeError(f"{name} must be uint8 (N, H, W, 3) or float (N, 3, H, W), got dtype {tensor.dtype}")
    if tuple(tensor.shape[2:]) != (data.RESOLUTION, data.RESOLUTION):
        raise ValueError(
            f"{name} must be {data.RESOLUTION}x{data.RESOLUTION} pixels, got {tuple(tensor.shape[2:])}"
        )
    return tensor.clamp(-1.0, 1.0).contiguous()  # slight overshoot (generated images) is clipped


def _majority(labels: np.ndarray, n_classes: int) -> int:
    return int(np.bincount(labels, minlength=n_classes).argmax())


def extract_objects(
    foreground: np.ndarray,
    colour: np.ndarray,
    shape: np.ndarray,
    geometry: dict[str, Any],
    min_area: int = MIN_AREA,
) -> list[DetectedObject]:
    """Objects from per-pixel maps of one image.

    ``foreground`` is a bool (H, W) map, ``colour`` and ``shape`` int (H, W) class indices (into
    ``COLOUR_NAMES``/``SHAPE_NAMES``). Objects are the 4-connected components of the foreground
    with at least ``min_area`` pixels; a component whose pixels split into two colours of
    substantial area is split by colour (two touching objects). Sorted by position (top, left).
    """
    if foreground.ndim != 2 or colour.shape != foreground.shape or shape.shape != foreground.shape:
        raise ValueError(
            "foreground, colour and shape must be (H, W) maps of one shape, got "
            f"{foreground.shape}, {colour.shape}, {shape.shape}"
        )
    if min_area < 1:
        raise ValueError(f"min_area must be >= 1, got {min_area!r}")
    components, n = ndimage.label(foreground)
    objects = []
    for index in range(1, n + 1):
        region = components == index
        if region.sum() < min_area:
            continue
        for part in _split_by_colour(region, colour, min_area):
            objects.append(_describe(part, colour, shape, geometry))
    return sorted(objects, key=lambda o: (round(o.cy), o.cx))


def _split_by_colour(region: np.ndarray, colour: np.ndarray, min_area: int) -> list[np.ndarray]:
    """Split a component into per-colour parts when it holds two substantial colours."""
    counts = np.bincount(colour[region], minlength=len(COLOUR_NAMES))
    big = [c for c in np.argsort(counts)[::-1] if counts[c] >= max(3 * min_area, 0.2 * region.sum())]
    if len(big) < 2:
        return [region]
    parts = []
    for c in big:
        sub, n = ndimage.label(region & (colour == c))
        sizes = np.bincount(sub.ravel(), minlength=n + 1)[1:]
        if n and sizes.max() >= min_area:
            parts.append(sub == int(sizes.argmax()) + 1)
    return parts or [region]


def _describe(region: np.ndarray, colour: np.ndarray, shape: np.ndarray, geometry: dict[str, Any]) -> DetectedObject:
    area = int(region.sum())
    shape_name = SHAPE_NAMES[_majority(shape[region], len(SHAPE_NAMES))]
    colour_name = COLOUR_NAMES[_majority(colour[region], len(COLOUR_NAMES))]
    threshold = geometry["size_thresholds"].get(shape_name, geometry["global_size_threshold"])
    size = "large" if area >= threshold else "small"
    ys, xs = np.nonzero(region)
    dx, dy = geometry["centroid_offsets"].get(f"{shape_name}/{size}", (0.0, 0.0))
    cx, cy = float(xs.mean() + 0.5 - dx), float(ys.mean() + 0.5 - dy)
    return DetectedObject(shape_name, colour_name, size, round(cx, 3), round(cy, 3), area)


class Evaluator:
    """A trained ``SceneNet`` plus the geometry calibration that turns its maps into objects."""

    def __init__(self, net: SceneNet, config: dict[str, Any]) -> None:
        self.net = net.eval()
        self.config = config
        self.geometry: dict[str, Any] = config["geometry"]
        self.min_area: int = int(config.get("min_area", MIN_AREA))

    # ---- storage

    @staticmethod
    def config_path(weights_path: str | Path) -> Path:
        """The JSON config stored beside a weights file (same name, ``.json``)."""
        return Path(weights_path).with_suffix(".json")

    @classmethod
    def load(cls, path: str | Path | None = None) -> Evaluator:
        """Load an evaluator from ``path`` (a ``.safetensors`` file with its ``.json`` config
        beside it); by default the one shipped with the package."""
        weights = Path(path) if path is not None else DEFAULT_WEIGHTS
        if weights.suffix != ".safetensors":
            raise ValueError(f"path must name a .safetensors file, got {str(weights)!r}")
        config_file = cls.config_path(weights)
        for p in (weights, config_file):
            if not p.is_file():
                raise FileNotFoundError(f"path: evaluator file {str(p)!r} does not exist")
        config = json.loads(config_file.read_text())
        if config.get("format") != CONFIG_FORMAT:
            raise ValueError(f"path: {config_file} has config format {config.get('format')!r}, expected {CONFIG_FORMAT}")
        net = SceneNet(config["channels"])
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
        net.load_state_dict(state)
        return cls(net, config)

    def save(self, path: str | Path) -> Path:
        """Save weights (float16 safetensors) to ``path`` and the config beside it as JSON."""
        weights = Path(path)
        if weights.suffix != ".safetensors":
            raise ValueError(f"path must name a .safetensors file, got {str(weights)!r}")
        weights.parent.mkdir(parents=True, exist_ok=True)
        state = {
            k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous()
            for k, v in self.net.state_dict().items()
        }
        atomic_write_bytes(weights, safetensors_bytes(state, metadata={"format": str(CONFIG_FORMAT)}))
        atomic_write_text(self.config_path(weights), json.dumps(self.config, indent=2) + "\n")
        return weights

    # ---- inference

    @torch.no_grad()
    def predict(self, images: np.ndarray | torch.Tensor, batch_size: int = 64) -> dict[str, np.ndarray]:
        """Per-pixel predictions: ``foreground`` bool (N, H, W), ``foreground_prob`` float,
        ``colour`` and ``shape`` int class indices (N, H, W) into ``COLOUR_NAMES``/``SHAPE_NAMES``;
        ``images`` as for ``detect``."""
        x = _as_input(images)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        chunks = [self.net(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        logits = torch.cat(chunks) if chunks else torch.zeros(0, _N_OUT, *x.shape[2:])
        n_colour = len(COLOUR_NAMES)
        return {
            "foreground": (logits[:, 0] > 0).numpy(),
            "foreground_prob": torch.sigmoid(logits[:, 0]).numpy(),
            "colour": logits[:, 1 : 1 + n_colour].argmax(1).numpy(),
            "shape": logits[:, 1 + n_colour :].argmax(1).numpy(),
        }

    def detect(self, images: np.ndarray | torch.Tensor, batch_size: int = 64) -> list[list[DetectedObject]]:
        """The objects in each image.

        ``images``: float (N, 3, 64, 64) in [-1, 1] (as ``data.render_batch`` gives) or uint8
        (N, 64, 64, 3) (stacked ``data.render`` images); numpy or torch; one image without the
        batch axis is accepted too.
        """
        maps = self.predict(images, batch_size)
        return [
            extract_objects(maps["foreground"][i], maps["colour"][i], maps["shape"][i], self.geometry, self.min_area)
            for i in range(len(maps["foreground"]))
        ]

    @torch.no_grad()
    def features(self, images: np.ndarray | torch.Tensor, batch_size: int = 128) -> np.ndarray:
        """Global-average-pooled bottleneck features (N, D), float64, for
        ``metrics.frechet_distance``; ``images`` as for ``detect``."""
        x = _as_input(images)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if not len(x):
            return np.zeros((0, self.net.channels[-1]))
        feats = torch.cat([self.net.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
        return feats.double().numpy()


def to_eval_array(image, resolution: int = data.RESOLUTION) -> np.ndarray:
    """A PIL image as uint8 (H, W, 3) at the evaluator's resolution (bilinear resize if needed)."""
    from PIL import Image

    image = image.convert("RGB")
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)
