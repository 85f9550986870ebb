"""Evaluator for images of the synthetic shape scenes: object detection, GenEval-style prompt
scoring and a Fréchet distance over learned features.

A small fully-convolutional network reads a 64x64 RGB image and predicts, per pixel,
foreground/background, a colour class and a shape class. Objects are the connected components of
the foreground; each gets its majority colour and shape, a size from its area and a centre from
its centroid. The network is trained on rendered scenes of both splits (so held-out colour-shape
pairs are recognised) with noise, blur and colour jitter so that it also reads generated images.

Weights are stored as safetensors only (``evaluator.safetensors``) with a JSON config beside them
(``evaluator.json``); nothing here unpickles or downloads anything.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy import linalg, ndimage, optimize
from torch import nn
from tqdm.auto import tqdm

from attnguide.builtin import data

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "evaluator.safetensors"
CONFIG_FORMAT = 1
COLOUR_NAMES: tuple[str, ...] = tuple(data.COLOURS)
SHAPE_NAMES: tuple[str, ...] = tuple(data.SHAPES)
SIZE_NAMES: tuple[str, ...] = tuple(data.SIZES)
DEFAULT_CHANNELS: tuple[int, ...] = (16, 32, 64, 128)
MIN_AREA = 12  # components smaller than this (in pixels) are noise, not objects
POSITION_TOLERANCE = 4.0  # pixels, for evaluator_accuracy
_MATCH_DISTANCE = 10.0  # pixels: a detection further than this from a true object does not match it
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
# Geometry calibration (derived from rendered objects, stored in the config)


def calibrate_geometry(samples_per_kind: int = 24, seed: int = 0) -> dict[str, Any]:
    """Measure rendered object areas and centroid offsets for each (shape, size).

    Renders single objects at random positions and returns ``size_thresholds`` (per shape: the
    geometric mean of the mean small and mean large area; an area at or above it reads as
    'large'), ``global_size_threshold`` (the same over all shapes, used for unknown shapes),
    ``centroid_offsets`` (per 'shape/size': mean mask centroid minus the object's centre, in
    pixels; a triangle's centroid sits below its centre) and the raw ``mean_areas``.
    """
    if samples_per_kind < 1:
        raise ValueError(f"samples_per_kind must be >= 1, got {samples_per_kind!r}")
    rng = np.random.default_rng(seed)
    mean_areas: dict[str, float] = {}
    offsets: dict[str, list[float]] = {}
    for shape in SHAPE_NAMES:
        for size in SIZE_NAMES:
            areas, dxs, dys = [], [], []
            r = data.SIZES[size]
            for _ in range(samples_per_kind):
                cx, cy = rng.uniform(r + 2, data.RESOLUTION - r - 2, size=2)
                obj = data.SceneObject(shape, "red", size, float(cx), float(cy))
                _, masks = data.render(data.Scene((obj,), "gray", ""))
                ys, xs = np.nonzero(masks[0])
                areas.append(len(xs))
                dxs.append(xs.mean() + 0.5 - cx)
                dys.append(ys.mean() + 0.5 - cy)
            mean_areas[f"{shape}/{size}"] = float(np.mean(areas))
            offsets[f"{shape}/{size}"] = [round(float(np.mean(dxs)), 4), round(float(np.mean(dys)), 4)]
    thresholds = {
        shape: round(math.sqrt(mean_areas[f"{shape}/small"] * mean_areas[f"{shape}/large"]), 2)
        for shape in SHAPE_NAMES
    }
    small = np.mean([mean_areas[f"{s}/small"] for s in SHAPE_NAMES])
    large = np.mean([mean_areas[f"{s}/large"] for s in SHAPE_NAMES])
    return {
        "size_thresholds": thresholds,
        "global_size_threshold": round(float(math.sqrt(small * large)), 2),
        "centroid_offsets": offsets,
        "mean_areas": {k: round(v, 2) for k, v in mean_areas.items()},
    }


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
        save_file(state, str(weights), metadata={"format": str(CONFIG_FORMAT)})
        self.config_path(weights).write_text(json.dumps(self.config, indent=2) + "\n")
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
        ``frechet_distance``; ``images`` as for ``detect``."""
        x = _as_input(images)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if not len(x):
            return np.zeros((0, self.net.channels[-1]))
        feats = torch.cat([self.net.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
        return feats.double().numpy()


# --------------------------------------------------------------------------------------------
# Fréchet distance


def frechet_distance_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``.

    As in the standard FID code, a non-finite matrix square root is retried with ``eps`` added to
    the diagonals, and small imaginary parts from numerical error are dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"mu1 and mu2 must be vectors of one length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (d, d):
            raise ValueError(f"{name} must be ({d}, {d}) to match the means, got {sigma.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all() or _large_imaginary(covmean):
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if _large_imaginary(covmean):
            raise ValueError(f"sigma1/sigma2: matrix square root has imaginary part {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _sqrtm(m: np.ndarray) -> np.ndarray:
    """Matrix square root; the near-singular case is handled by the caller, so scipy's
    singularity warning is silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(m)


def _large_imaginary(m: np.ndarray) -> bool:
    return bool(np.iscomplexobj(m) and not np.allclose(np.diagonal(m).imag, 0, atol=1e-3))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D)."""
    stats = []
    for name, feats in (("feats_a", feats_a), ("feats_b", feats_b)):
        feats = np.asarray(feats, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[0] < 2:
            raise ValueError(f"{name} must be (N, D) with N >= 2, got shape {feats.shape}")
        if not np.isfinite(feats).all():
            raise ValueError(f"{name} contains non-finite values")
        stats.append((feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])))
    if stats[0][0].shape != stats[1][0].shape:
        raise ValueError(f"feats_a and feats_b must have the same feature dimension, got "
                         f"{stats[0][0].shape[0]} and {stats[1][0].shape[0]}")
    return frechet_distance_from_stats(stats[0][0], stats[0][1], stats[1][0], stats[1][1], eps)


# --------------------------------------------------------------------------------------------
# GenEval-style prompt scoring


def prompt_relation(scene: data.Scene) -> tuple[str, int, int] | None:
    """``(relation, subject, reference)`` when the caption is 'A <relation> B' for a 2-object
    scene (indices into ``scene.objects``), else ``None``."""
    if len(scene.objects) != 2 or len(scene.object_words) != 2:
        return None
    words = scene.words
    first, second = sorted(range(2), key=lambda i: min(scene.object_words[i]))
    between = " ".join(words[max(scene.object_words[first]) + 1 : min(scene.object_words[second])])
    for relation in sorted(data.RELATIONS, key=len, reverse=True):
        if f" {relation} " in f" {between} ":
            return relation, first, second
    return None


def _size_named(scene: data.Scene, index: int) -> bool:
    words = scene.words
    return any(words[j] in data.SIZES for j in scene.object_words[index] if 0 <= j < len(words))


def _assign(prompt: Sequence[data.SceneObject], named: Sequence[bool], detected: Sequence[DetectedObject]) -> list[int | None]:
    """Match prompt objects to distinct detections of the same shape, preferring colour, then
    named-size agreement. Returns a detection index (or None) per prompt object."""
    if not detected:
        return [None] * len(prompt)
    score = np.zeros((len(prompt), len(detected)))
    for i, p in enumerate(prompt):
        for j, d in enumerate(detected):
            if d.shape == p.shape:
                score[i, j] = 1 + 4 * (d.colour == p.colour) + 2 * (named[i] and d.size == p.size)
    rows, cols = optimize.linear_sum_assignment(score, maximize=True)
    match: list[int | None] = [None] * len(prompt)
    for i, j in zip(rows, cols):
        if score[i, j] > 0:
            match[int(i)] = int(j)
    return match


def score_prompt(scene: data.Scene, detected: Sequence[DetectedObject]) -> dict[str, Any]:
    """Score the objects detected in an image against the prompt (``scene``) it was made from.

    Each detection can stand for at most one prompt object; prompt objects are matched to
    detections of the same shape, preferring the right colour (and size, where named). Returns:

    - ``objects``: per prompt object, ``shape``, ``colour``, ``size`` (None if the caption does
      not name it), ``present`` (matched to a detection of the same shape), ``colour_correct``
      (that detection has the colour), ``size_correct`` (None when no size is named), ``match``
      (index into ``detected`` or None);
    - ``present``, ``colour_bound``: every prompt object present / with the right colour;
    - ``size_correct``: every named size right (None when the caption names no size);
    - ``count_correct``: as many detections as prompt objects;
    - ``relation``: the relation phrase or None; ``relation_correct``: whether it holds between
      the matched detections (None when the caption has no relation);
    - ``n_prompt_objects``, ``n_detected``, ``fully_correct`` (all applicable checks pass).
    """
    if not isinstance(scene, data.Scene):
        raise TypeError(f"scene must be a data.Scene, got {type(scene).__name__}")
    if len(scene.object_words) != len(scene.objects):
        raise ValueError(
            f"scene.object_words must give the caption words of each of the {len(scene.objects)} objects, "
            f"got {len(scene.object_words)} entries"
        )
    detected = list(detected)
    for k, d in enumerate(detected):
        if not isinstance(d, DetectedObject):
            raise TypeError(f"detected[{k}] must be a DetectedObject, got {type(d).__name__}")
    named = [_size_named(scene, i) for i in range(len(scene.objects))]
    match = _assign(scene.objects, named, detected)
    objects = []
    for p, m, has_size in zip(scene.objects, match, named):
        d = detected[m] if m is not None else None
        objects.append({
            "shape": p.shape,
            "colour": p.colour,
            "size": p.size if has_size else None,
            "present": d is not None,
            "colour_correct": d is not None and d.colour == p.colour,
            "size_correct": (d is not None and d.size == p.size) if has_size else None,
            "match": m,
        })
    relation = prompt_relation(scene)
    relation_correct = None
    if relation is not None:
        phrase, a, b = relation
        da, db = match[a], match[b]
        relation_correct = (
            da is not None and db is not None
            and data.relation_holds(detected[da].as_scene_object(), detected[db].as_scene_object(), phrase)
        )
    sizes = [o["size_correct"] for o in objects if o["size_correct"] is not None]
    result = {
        "objects": objects,
        "n_prompt_objects": len(scene.objects),
        "n_detected": len(detected),
        "present": all(o["present"] for o in objects),
        "colour_bound": all(o["colour_correct"] for o in objects),
        "size_correct": all(sizes) if sizes else None,
        "count_correct": len(detected) == len(scene.objects),
        "relation": relation[0] if relation else None,
        "relation_correct": relation_correct,
    }
    checks = ("present", "colour_bound", "size_correct", "count_correct", "relation_correct")
    result["fully_correct"] = all(result[k] is not False for k in checks)
    return result


# --------------------------------------------------------------------------------------------
# Training


def _targets(scenes: Sequence[data.Scene], masks: Sequence[np.ndarray]) -> np.ndarray:
    """Per-pixel targets (N, 2, H, W) int8: colour index and shape index, -1 for background."""
    res = data.RESOLUTION
    out = np.full((len(scenes), 2, res, res), -1, dtype=np.int8)
    for n, (scene, m) in enumerate(zip(scenes, masks)):
        for obj, mask in zip(scene.objects, m):  # later objects are drawn on top
            out[n, 0][mask] = COLOUR_NAMES.index(obj.colour)
            out[n, 1][mask] = SHAPE_NAMES.index(obj.shape)
    return out


class _ScenePool:
    """Rendered scenes of both splits, refreshed a few at a time while training."""

    def __init__(self, rng: np.random.Generator, size: int) -> None:
        self.rng = rng
        scenes = [self._sample() for _ in range(size)]
        rendered = [data.render(s) for s in scenes]
        self.images = np.stack([r[0] for r in rendered])
        self.targets = _targets(scenes, [r[1] for r in rendered])

    def _sample(self) -> data.Scene:
        split = data.SPLITS[int(self.rng.integers(len(data.SPLITS)))]
        return data.sample_scene(self.rng, split)

    def refresh(self, count: int) -> None:
        for k in self.rng.integers(len(self.images), size=count):
            scene = self._sample()
            image, masks = data.render(scene)
            self.images[k] = image
            self.targets[k] = _targets([scene], [masks])[0]

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.rng.integers(len(self.images), size=size)
        x = torch.from_numpy(self.images[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return x, torch.from_numpy(self.targets[idx].astype(np.int64))


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image ``sigma`` (0 leaves the image unchanged)."""
    n, c, h, w = x.shape
    t = torch.arange(-2, 3, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t[None] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c, 5)
    y = F.pad(x.reshape(1, n * c, h, w), (2, 2, 2, 2), mode="replicate")
    y = F.conv2d(y, kernel[:, None, :, None], groups=n * c)
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * c)
    return y.reshape(n, c, h, w)


def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch (images in [-1, 1], per-pixel targets) so the network also reads generated
    images: horizontal flips, colour jitter (per-channel gain/offset), slight blur, noise."""
    n = x.shape[0]

    def uniform(*shape: int, low: float, high: float) -> torch.Tensor:
        return torch.rand(*shape, generator=gen) * (high - low) + low

    flip = torch.rand(n, generator=gen) < 0.5
    x, y = torch.where(flip[:, None, None, None], x.flip(-1), x), torch.where(flip[:, None, None, None], y.flip(-1), y)
    gain = uniform(n, 3, 1, 1, low=0.9, high=1.1) * uniform(n, 1, 1, 1, low=0.9, high=1.1)
    x = x * gain + uniform(n, 3, 1, 1, low=-0.08, high=0.08)
    sigma = uniform(n, low=0.3, high=1.1) * (torch.rand(n, generator=gen) < 0.5)
    x = _blur(x, sigma)
    x = x + torch.randn(x.shape, generator=gen) * uniform(n, 1, 1, 1, low=0.0, high=0.08)
    return x.clamp(-1.0, 1.0), y


def _loss(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    n_colour = len(COLOUR_NAMES)
    fg = (y[:, 0] >= 0).float()
    fg_loss = F.binary_cross_entropy_with_logits(logits[:, 0], fg)
    colour_loss = F.cross_entropy(logits[:, 1 : 1 + n_colour], y[:, 0], ignore_index=-1)
    shape_loss = F.cross_entropy(logits[:, 1 + n_colour :], y[:, 1], ignore_index=-1)
    total = 2.0 * fg_loss + colour_loss + shape_loss
    return total, {"fg": fg_loss.item(), "colour": colour_loss.item(), "shape": shape_loss.item()}


def train_evaluator(
    out_path: str | Path = DEFAULT_WEIGHTS,
    steps: int = 800,
    batch: int = 32,
    seed: int = 0,
    *,
    lr: float = 3e-3,
    pool_size: int = 4096,
    channels: Sequence[int] = DEFAULT_CHANNELS,
    progress: bool = True,
) -> Evaluator:
    """Train an evaluator on rendered scenes of both splits and save it to ``out_path``
    (``.safetensors``, with the ``.json`` config beside it). Seeded by ``seed`` (scenes,
    augmentation, initialisation). The shipped weights are ``steps=800, batch=32, seed=0``: about
    8.5 minutes on one CPU thread. Returns the trained evaluator."""
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ValueError(f"out_path must name a .safetensors file, got {str(out_path)!r}")
    for name, value in (("steps", steps), ("batch", batch), ("pool_size", pool_size)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    start = time.time()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = SceneNet(channels)
    pool = _ScenePool(rng, pool_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    net.train()
    bar = tqdm(range(steps), desc="evaluator", disable=not progress)
    running: dict[str, float] = {}
    for _ in bar:
        pool.refresh(max(1, batch // 8))
        x, y = augment(*pool.batch(batch), gen)
        loss, parts = _loss(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = {k: 0.95 * running.get(k, v) + 0.05 * v for k, v in parts.items()}
        bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()})
    config = {
        "format": CONFIG_FORMAT,
        "channels": list(net.channels),
        "colours": list(COLOUR_NAMES),
        "shapes": list(SHAPE_NAMES),
        "sizes": list(SIZE_NAMES),
        "resolution": data.RESOLUTION,
        "min_area": MIN_AREA,
        "geometry": calibrate_geometry(),
        "training": {
            "steps": steps, "batch": batch, "seed": seed, "lr": lr, "pool_size": pool_size,
            "final_losses": {k: round(v, 4) for k, v in running.items()},
            "seconds": round(time.time() - start, 1), "torch_threads": torch.get_num_threads(),
        },
    }
    evaluator = Evaluator(net.eval(), config)
    evaluator.save(out_path)
    return evaluator


# --------------------------------------------------------------------------------------------
# Accuracy on real (rendered) scenes


def _match_truth(truth: Sequence[data.SceneObject], detected: Sequence[DetectedObject]) -> list[int | None]:
    """Match true objects to distinct detections by centre distance (Hungarian), within
    ``_MATCH_DISTANCE`` pixels."""
    if not truth or not detected:
        return [None] * len(truth)
    dist = np.array([[math.hypot(t.cx - d.cx, t.cy - d.cy) for d in detected] for t in truth])
    rows, cols = optimize.linear_sum_assignment(dist)
    match: list[int | None] = [None] * len(truth)
    for i, j in zip(rows, cols):
        if dist[i, j] <= _MATCH_DISTANCE:
            match[int(i)] = int(j)
    return match


@torch.no_grad()
def round_trip(autoencoder: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Images (n, 3, H, W) in [-1, 1] encoded to the posterior mean and decoded again."""
    param = next(autoencoder.parameters())
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size]).to(param)
        out.append(autoencoder.decode(autoencoder.encode(x).latent_dist.mean).sample.clamp(-1, 1).float().cpu().numpy())
    return np.concatenate(out)


def evaluator_accuracy(
    n_scenes: int = 500,
    seed: int = 12345,
    split: str = "heldout",
    evaluator: Evaluator | None = None,
    position_tolerance: float = POSITION_TOLERANCE,
    autoencoder: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Accuracy of the evaluator on ``n_scenes`` rendered scenes of ``split``.

    With ``autoencoder`` (a diffusers ``AutoencoderKL`` or anything with its interface) every image is first encoded to its
    posterior mean and decoded: the result is the ceiling that autoencoder sets for any sampler
    on the model built on it.

    True objects are matched to detections by centre distance; ``shape``, ``colour``, ``size``
    and ``position`` (centre within ``position_tolerance`` px) are fractions of true objects
    whose matched detection has that attribute right (an unmatched object counts as wrong);
    ``detected`` is the fraction matched at all; ``count`` the fraction of scenes with as many
    detections as objects; ``extra_detections`` the number of unmatched detections.
    """
    if n_scenes < 1:
        raise ValueError(f"n_scenes must be >= 1, got {n_scenes!r}")
    if split not in data.SPLITS:
        raise ValueError(f"split must be one of {data.SPLITS}, got {split!r}")
    evaluator = evaluator or Evaluator.load()
    scenes = data.scenes(seed, n_scenes, split)
    images = data.render_batch(scenes)
    if autoencoder is not None:
        images = round_trip(autoencoder, images)
    detections = evaluator.detect(images)
    hits = {k: 0 for k in ("detected", "shape", "colour", "size", "position")}
    n_objects = count_ok = extra = 0
    errors = []
    for scene, found in zip(scenes, detections):
        match = _match_truth(scene.objects, found)
        n_objects += len(scene.objects)
        count_ok += len(found) == len(scene.objects)
        extra += len(found) - sum(m is not None for m in match)
        for t, m in zip(scene.objects, match):
            if m is None:
                continue
            d = found[m]
            err = math.hypot(t.cx - d.cx, t.cy - d.cy)
            errors.append(err)
            hits["detected"] += 1
            hits["shape"] += d.shape == t.shape
            hits["colour"] += d.colour == t.colour
            hits["size"] += d.size == t.size
            hits["position"] += err <= position_tolerance
    result: dict[str, Any] = {"split": split, "n_scenes": n_scenes, "n_objects": n_objects}
    result.update({k: v / n_objects for k, v in hits.items()})
    result["count"] = count_ok / n_scenes
    result["extra_detections"] = extra
    result["mean_position_error"] = float(np.mean(errors)) if errors else float("nan")
    return result


# --------------------------------------------------------------------------------------------
# Command line


@click.group(name="evaluator")
def evaluator_cli() -> None:
    """Train and check the scene evaluator (object detector + Fréchet features)."""


@evaluator_cli.command("train")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_WEIGHTS,
              show_default=True, help="Weights file (.safetensors); the .json config goes beside it.")
@click.option("--steps", type=click.IntRange(min=1), default=800, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: torch's).")
def _train_command(out: Path, steps: int, batch: int, seed: int, threads: int | None) -> None:
    """Train the evaluator on rendered scenes of both splits and save it."""
    if threads:
        torch.set_num_threads(threads)
    evaluator = train_evaluator(out, steps=steps, batch=batch, seed=seed)
    info = evaluator.config["training"]
    click.echo(f"saved {out} ({info['seconds']} s, final losses {info['final_losses']})")


@evaluator_cli.command("accuracy")
@click.option("--n", "n_scenes", type=click.IntRange(min=1), default=500, show_default=True, help="Scenes to render.")
@click.option("--seed", type=int, default=12345, show_default=True)
@click.option("--split", type=click.Choice(data.SPLITS), default="heldout", show_default=True)
@click.option("--weights", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Weights file to check (default: the shipped evaluator).")
@click.option("--through-vae", "vae_model", default=None, metavar="MODEL",
              help="Pass every image through this diffusers model's autoencoder first ('builtin' or a folder): "
                   "the ceiling the autoencoder sets for generated images.")
def _accuracy_command(n_scenes: int, seed: int, split: str, weights: Path | None, vae_model: str | None) -> None:
    """Per-attribute accuracy of the evaluator on rendered (real) scenes."""
    autoencoder = None
    if vae_model is not None:
        from ..pipelines import builtin_model_path, load_pipeline

        folder = builtin_model_path() if vae_model == "builtin" else Path(vae_model)
        if not (folder / "vae").is_dir():
            raise click.BadParameter(f"{str(folder)!r} has no vae folder", param_hint="--through-vae")
        autoencoder = load_pipeline(folder).vae  # whatever class the folder's model_index.json names
    result = evaluator_accuracy(n_scenes, seed, split, evaluator=Evaluator.load(weights), autoencoder=autoencoder)
    through = f" through the autoencoder of {vae_model}" if vae_model else ""
    click.echo(f"split={split} scenes={result['n_scenes']} objects={result['n_objects']} seed={seed}{through}")
    click.echo(f"{'attribute':<12} {'accuracy':>9}")
    for key in ("detected", "shape", "colour", "size", "position", "count"):
        click.echo(f"{key:<12} {100 * result[key]:>8.2f}%")
    click.echo(f"extra detections: {result['extra_detections']}; "
               f"mean position error: {result['mean_position_error']:.2f} px")
