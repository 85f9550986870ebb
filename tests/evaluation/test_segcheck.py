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


def test_runs_on_tiny_model(sd_pipe):
    result = segcheck.segmentation_miou(sd_pipe, n_images=3, timestep=500, batch=2, progress=False)
    assert 0.0 <= result.miou <= 1.0 and result.images == 3
    # Every object's IoU is at most its precision and its recall, so the means are ordered too.
    assert result.object_iou <= min(result.object_precision, result.object_recall) + 1e-12
    unsmoothed = segcheck.segmentation_miou(sd_pipe, n_images=3, timestep=500, batch=2, progress=False, smoothing=False)
    assert not unsmoothed.smoothing and result.smoothing
    with pytest.raises(ValueError, match="timestep"):
        segcheck.segmentation_miou(sd_pipe, n_images=1, timestep=5000)
