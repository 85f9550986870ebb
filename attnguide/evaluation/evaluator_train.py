"""Training and checking the scene evaluator: geometry calibration from rendered objects,
training on rendered scenes of both splits (with augmentation so that it also reads generated
images), and its accuracy on rendered (real) scenes, optionally through a model's autoencoder.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import optimize
from tqdm.auto import tqdm

from attnguide.builtin import data

from .evaluator import (
    COLOUR_NAMES,
    CONFIG_FORMAT,
    DEFAULT_CHANNELS,
    DEFAULT_WEIGHTS,
    MIN_AREA,
    SHAPE_NAMES,
    SIZE_NAMES,
    DetectedObject,
    Evaluator,
    SceneNet,
)

POSITION_TOLERANCE = 4.0  # pixels, for evaluator_accuracy
_MATCH_DISTANCE = 10.0  # pixels: a detection further than this from a true object does not match it


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
    training = {
        "steps": steps, "batch": batch, "seed": seed, "lr": lr, "pool_size": pool_size,
        "final_losses": {k: round(v, 4) for k, v in running.items()},
        "seconds": round(time.time() - start, 1), "torch_threads": torch.get_num_threads(),
    }
    config = _evaluator_config(net, training)
    evaluator = Evaluator(net.eval(), config)
    evaluator.save(out_path)
    return evaluator


def _evaluator_config(net: SceneNet, training: dict[str, Any]) -> dict[str, Any]:
    """The JSON config stored beside trained weights (classes, geometry calibration, training)."""
    return {
        "format": CONFIG_FORMAT,
        "channels": list(net.channels),
        "colours": list(COLOUR_NAMES),
        "shapes": list(SHAPE_NAMES),
        "sizes": list(SIZE_NAMES),
        "resolution": data.RESOLUTION,
        "min_area": MIN_AREA,
        "geometry": calibrate_geometry(),
        "training": training,
    }


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
    result: dict[str, Any] = {"split": split, "n_scenes": n_scenes}
    result.update(_tally(scenes, detections, position_tolerance))
    return result


def _tally(scenes: Sequence[data.Scene], detections: Sequence[Sequence[DetectedObject]],
           position_tolerance: float) -> dict[str, Any]:
    """The accuracy fields of ``evaluator_accuracy`` from scenes and their detections."""
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
    result: dict[str, Any] = {"n_objects": n_objects}
    result.update({k: v / n_objects for k, v in hits.items()})
    result["count"] = count_ok / len(scenes)
    result["extra_detections"] = extra
    result["mean_position_error"] = float(np.mean(errors)) if errors else float("nan")
    return result
