"""How good is S-CFG's attention segmentation? mIoU against ground truth on noised real images.

As in DiffSegmenter: a held-out real image is encoded, noised to a chosen timestep, and passed
through the U-Net once with its caption (and the empty prompt, for the reference mode's
foreground map). The S-CFG masks built from that call's attention are compared with the scene's
ground-truth object masks: an object's predicted region is every pixel assigned to one of the
caption words that name it; the background is every other pixel.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import attention
from ..builtin import data
from ..cli import SCFG_LEVELS
from ..engine import default_levels
from ..guidance import SCFGOptions
from ..segmentation import segment_records
from .storage import atomic_write_text


@dataclass
class SegCheckResult:
    timestep: int
    levels: tuple[int, ...]
    mode: str
    miou: float  # mean over images of the mean IoU over (objects + background)
    object_iou: float  # mean IoU of object regions
    background_iou: float
    # Mean over objects of |predicted ∩ true| / |predicted| and / |true|: precision below recall
    # means the predicted regions spill over the objects' outlines.
    object_precision: float
    object_recall: float
    per_word: dict[str, float]  # mean IoU of objects by their shape word
    images: int
    smoothing: bool = True  # S-CFG's 3x3 Gaussian on the token maps (part of the method)
    # What a perfect labelling at S-CFG's label grid reaches (each cell to the region covering most
    # of it): masks can be no finer than the finest level read.
    grid: tuple[int, int] = (0, 0)
    ceiling_miou: float = float("nan")
    ceiling_object_iou: float = float("nan")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def precision_recall(predicted: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """|predicted ∩ true| / |predicted| (1.0 when nothing is predicted) and / |true| (1.0 when
    nothing is true)."""
    hit = np.logical_and(predicted, true).sum()
    return float(hit / predicted.sum()) if predicted.any() else 1.0, float(hit / true.sum()) if true.any() else 1.0


def grid_ceiling_labels(scenes: list[data.Scene], grid: tuple[int, int]) -> np.ndarray:
    """(n, RESOLUTION, RESOLUTION) token labels of the best labelling at a ``grid`` of cells: each
    cell goes to the region (background or an object) covering most of it, an object's cells to
    its first word (token index + 1, as S-CFG's labels count <start>), nearest-upsampled."""
    from ..builtin.train import region_masks

    if grid[0] != grid[1] or data.RESOLUTION % grid[0]:
        raise ValueError(f"grid must be square and divide {data.RESOLUTION}, got {grid}")
    regions = region_masks([data.render(s)[1] for s in scenes], grid[0]).argmax(axis=1)
    labels = np.zeros_like(regions)
    for lab, region, scene in zip(labels, regions, scenes):
        for k, words in enumerate(scene.object_words):
            lab[region == k + 1] = words[0] + 1
    cell = data.RESOLUTION // grid[0]
    return labels.repeat(cell, axis=1).repeat(cell, axis=2)


def object_regions(labels: np.ndarray, scene: data.Scene) -> list[np.ndarray]:
    """Predicted region of each object: pixels whose token is one of its words (+1 for <start>)."""
    return [np.isin(labels, [i + 1 for i in words]) for words in scene.object_words]


@torch.no_grad()
def segmentation_miou(
    pipe,
    n_images: int = 200,
    timestep: int = 500,
    seed: int = 0,
    levels: tuple[int, ...] | None = None,
    mode: str = "reference",
    batch: int = 16,
    progress: bool = True,
    smoothing: bool = True,
) -> SegCheckResult:
    """mIoU of S-CFG masks on ``n_images`` held-out real scenes noised to ``timestep``.

    ``smoothing=False`` leaves out the method's 3x3 Gaussian on the token maps: a diagnosis of how
    much of the error is that blur at the model's grid, not S-CFG's rule."""
    if not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images must be a positive integer, got {n_images!r}")
    train_steps = pipe.scheduler.config.num_train_timesteps
    if not isinstance(timestep, int) or not 0 <= timestep < train_steps:
        raise ValueError(f"timestep must be an integer in [0, {train_steps}), got {timestep!r}")
    opts = SCFGOptions(mode=mode, levels=levels, smoothing=smoothing)
    unet = pipe.unet
    levels = opts.levels or default_levels(pipe)
    factors = {lay.name: lay.factor for lay in attention.list_layers(unet)}
    pairs = attention.scfg_layers(unet, levels)
    seg_pairs = [(s, c, factors[c]) for s, c in pairs]
    scenes = data.scenes(seed, n_images, "heldout")
    alphas = pipe.scheduler.alphas_cumprod
    gen = torch.Generator().manual_seed(seed)
    sources = ("uncond", "cond") if mode == "reference" else ("cond",)
    image_mious, object_ious, background_ious, per_word, hits = [], [], [], {}, []
    best_mious, best_object_ious, grid = [], [], (0, 0)
    with attention.attention_taps(unet, record=pairs) as taps:
        for start in tqdm(range(0, n_images, batch), desc="segmentation check", disable=not progress):
            chunk = scenes[start : start + batch]
            images = torch.from_numpy(data.render_batch(chunk)).to(unet.device, pipe.vae.dtype)
            latents = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=gen).to(latents)
            a = alphas[timestep].to(latents)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            cond, uncond = pipe.encode_prompt([s.caption for s in chunk], unet.device, 1, True, None)
            taps.branches = ("uncond", "cond")
            taps.record_branches = sources
            taps.records.clear()
            unet(torch.cat([noisy, noisy]).to(unet.dtype), timestep, encoder_hidden_states=torch.cat([uncond, cond]))
            seg = segment_records(taps, sources, seg_pairs, noisy.shape[-2:], opts)
            labels = F.interpolate(seg.labels[:, None].float(), size=images.shape[-2:], mode="nearest")[:, 0].long().cpu().numpy()
            _score_batch(chunk, labels, image_mious, object_ious, background_ious, per_word, hits)
            grid = tuple(seg.labels.shape[-2:])
            _score_batch(chunk, grid_ceiling_labels(chunk, grid), best_mious, best_object_ious, [], {}, [])
    return SegCheckResult(
        timestep=timestep, levels=tuple(levels), mode=mode, miou=float(np.mean(image_mious)),
        object_iou=float(np.mean(object_ious)), background_iou=float(np.mean(background_ious)),
        object_precision=float(np.mean([p for p, _ in hits])), object_recall=float(np.mean([r for _, r in hits])),
        per_word={k: float(np.mean(v)) for k, v in sorted(per_word.items())}, images=n_images, smoothing=smoothing,
        grid=grid, ceiling_miou=float(np.mean(best_mious)), ceiling_object_iou=float(np.mean(best_object_ious)),
    )


def _score_batch(scenes, labels: np.ndarray, image_mious: list, object_ious: list, background_ious: list,
                 per_word: dict[str, list[float]], hits: list[tuple[float, float]]) -> None:
    """IoUs of a batch's predicted label maps against its scenes' ground truth, appended to the lists."""
    for scene, lab in zip(scenes, labels):
        _, gt = data.render(scene)
        predicted = object_regions(lab, scene)
        ious = [iou(p, g) for p, g in zip(predicted, gt)]
        hits.extend(precision_recall(p, g) for p, g in zip(predicted, gt))
        bg = iou(~np.any(predicted, axis=0), ~np.any(gt, axis=0))
        image_mious.append(float(np.mean(ious + [bg])))
        object_ious.extend(ious)
        background_ious.append(bg)
        for obj, value in zip(scene.objects, ious):
            per_word.setdefault(obj.shape, []).append(value)


@click.command("segcheck")
@click.option("--model", type=click.Path(exists=True, file_okay=False), default=None, help="Local diffusers folder [default: built-in model].")
@click.option("--n", "n_images", type=click.IntRange(1), default=200, help="Held-out real images.")
@click.option("--timestep", "timesteps", type=click.IntRange(0, 999), multiple=True, default=(300, 500, 700), help="Noise timestep(s).")
@click.option("--levels", "--scfg-levels", "levels", type=SCFG_LEVELS, default=None,
              help="Downsampling factors whose attention S-CFG reads, e.g. 1,2 [default: the model's recommendation, "
                   "else latent/4 and latent/8].")
@click.option("--mode", type=click.Choice(["reference", "paper"]), default="reference")
@click.option("--seed", type=int, default=0)
@click.option("--smoothing/--no-smoothing", default=True, show_default=True,
              help="S-CFG's 3x3 Gaussian on the token maps; --no-smoothing only diagnoses what that blur costs.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the results as JSON.")
def segcheck(model, n_images, timesteps, levels, mode, seed, smoothing, json_path) -> None:
    """mIoU of S-CFG's attention masks against ground truth on noised held-out real images.

    \b
    Example:
      attnguide segcheck --n 200 --timestep 500 --levels 1,2
    """
    from ..pipelines import load_pipeline

    pipe = load_pipeline(model)
    results = []
    for t in timesteps:
        r = segmentation_miou(pipe, n_images=n_images, timestep=t, seed=seed, levels=levels, mode=mode, smoothing=smoothing)
        results.append(r)
        words = ", ".join(f"{k} {v:.3f}" for k, v in r.per_word.items())
        blur = "" if smoothing else " no smoothing"
        click.echo(f"t={t:4d} levels={r.levels} mode={mode}{blur}: mIoU {r.miou:.3f} (objects {r.object_iou:.3f}: "
                   f"precision {r.object_precision:.3f}, recall {r.object_recall:.3f}; background {r.background_iou:.3f}; {words}); "
                   f"ceiling of its {r.grid[0]}x{r.grid[1]} grid: mIoU {r.ceiling_miou:.3f}, objects {r.ceiling_object_iou:.3f}")
    if json_path:
        atomic_write_text(Path(json_path), json.dumps([r.__dict__ for r in results], indent=1))
