"""The segmentation check: IoU bookkeeping on known inputs, and a run on a tiny model."""
import numpy as np
import pytest

from attnguide.builtin import data
from attnguide.evaluation import segcheck


def test_object_regions_follow_caption_words():
    scene = data.scenes(0, 1, "heldout", n_objects=2)[0]
    _, gt = data.render(scene)
    labels = np.zeros(gt.shape[1:], dtype=int)
    for words, mask in zip(scene.object_words, gt):
        labels[mask] = words[-1] + 1  # the shape word's token position
    regions = segcheck.object_regions(labels, scene)
    assert all(segcheck.iou(r, g) == 1.0 for r, g in zip(regions, gt))
    assert segcheck.iou(~np.any(regions, 0), ~np.any(gt, 0)) == 1.0


def test_iou_values():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True
    b[1:3] = True
    assert segcheck.iou(a, b) == pytest.approx(4 / 12)
    # a: rows 0-1, b: rows 1-2 -> 4 of a's 8 pixels are in b, and 4 of b's 8 in a.
    assert segcheck.precision_recall(a, b) == (0.5, 0.5)
    assert segcheck.precision_recall(a, a) == (1.0, 1.0)
    wide = np.ones((4, 4), bool)
    assert segcheck.precision_recall(wide, b) == (0.5, 1.0)  # spills over: precision drops, recall does not


def _mean_object_iou(labels, scenes) -> float:
    ious = []
    for lab, scene in zip(labels, scenes):
        _, gt = data.render(scene)
        ious += [segcheck.iou(r, g) for r, g in zip(segcheck.object_regions(lab, scene), gt)]
    return float(np.mean(ious))


def test_grid_ceiling_is_exact_at_full_resolution_and_falls_with_coarser_grids():
    scenes = data.scenes(3, 12, "heldout")
    at = {g: _mean_object_iou(segcheck.grid_ceiling_labels(scenes, (g, g)), scenes) for g in (64, 16, 8, 4)}
    assert at[64] > 0.98  # only pixels of touching objects, which the rendered masks share, can differ
    assert at[64] > at[16] > at[8] > at[4]
    one_cell = segcheck.grid_ceiling_labels(scenes[:1], (1, 1))
    assert (one_cell == 0).all()  # a single cell: the background covers most of every scene
    with pytest.raises(ValueError, match="grid"):
        segcheck.grid_ceiling_labels(scenes, (6, 6))


def test_runs_on_tiny_model(sd_pipe):
    result = segcheck.segmentation_miou(sd_pipe, n_images=3, timestep=500, batch=2, progress=False)
    assert 0.0 <= result.miou <= 1.0 and result.images == 3
    # Every object's IoU is at most its precision and its recall, so the means are ordered too.
    assert result.object_iou <= min(result.object_precision, result.object_recall) + 1e-12
    unsmoothed = segcheck.segmentation_miou(sd_pipe, n_images=3, timestep=500, batch=2, progress=False, smoothing=False)
    assert not unsmoothed.smoothing and result.smoothing
    assert result.grid[0] >= 1 and 0.0 < result.ceiling_object_iou <= 1.0 and 0.0 < result.ceiling_miou <= 1.0
    with pytest.raises(ValueError, match="timestep"):
        segcheck.segmentation_miou(sd_pipe, n_images=1, timestep=5000)
