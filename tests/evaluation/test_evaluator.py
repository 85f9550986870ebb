"""Tests for attnguide.evaluation.evaluator: Fréchet distance, prompt scoring, detection accuracy
of the shipped evaluator, weight storage, and the ground truth (masks) it is trained on."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import ndimage

from attnguide.builtin import data
from attnguide.evaluation import evaluator as ev
from attnguide.evaluation import evaluator_train, metrics
from attnguide.evaluation.evaluator import DetectedObject, Evaluator
from attnguide.evaluation.evaluator_cli import evaluator_cli
from attnguide.evaluation.geneval import score_prompt

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shipped() -> Evaluator:
    return Evaluator.load()


# ---------------------------------------------------------------------------------------------
# Fréchet distance


def _closed_form_diag(mu1, var1, mu2, var2) -> float:
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2)))


def test_frechet_from_stats_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    var1, var2 = rng.uniform(0.2, 3.0, size=6), rng.uniform(0.2, 3.0, size=6)
    got = metrics.frechet_distance_from_stats(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(_closed_form_diag(mu1, var1, mu2, var2), rel=1e-9, abs=1e-9)


def test_frechet_from_stats_identical_gaussians_is_zero_even_when_singular():
    sigma = np.diag([1.0, 2.0, 0.0])  # singular covariance
    assert metrics.frechet_distance_from_stats(np.ones(3), sigma, np.ones(3), sigma) == pytest.approx(0.0, abs=1e-5)


def test_frechet_distance_on_samples_approaches_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.0, -1.0])
    var1, var2 = np.array([1.0, 0.5, 2.0]), np.array([0.25, 0.5, 1.0])
    a = mu1 + rng.normal(size=(40000, 3)) * np.sqrt(var1)
    b = mu2 + rng.normal(size=(40000, 3)) * np.sqrt(var2)
    expected = _closed_form_diag(mu1, var1, mu2, var2)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, abs=0.03)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


class _Features(torch.nn.Module):
    """torchmetrics' feature-extractor slot, given the features themselves."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x):
        return x


@pytest.mark.parametrize("n_a, n_b, dim", [(300, 500, 16), (64, 80, 48)])
def test_frechet_distance_equals_torchmetrics_fid_on_the_same_features(n_a, n_b, dim):
    """The peer: torchmetrics' FrechetInceptionDistance with a custom feature extractor computes the
    same statistic (its trace by eigenvalues, ours by a matrix square root); float64 agreement."""
    fid_module = pytest.importorskip("torchmetrics.image.fid")
    rng = np.random.default_rng(n_a)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)  # correlated features, full-rank or not
    generated = rng.normal(size=(n_a, dim)) @ mixing + 0.3
    real = rng.normal(size=(n_b, dim)) @ (mixing * 1.2)
    peer = fid_module.FrechetInceptionDistance(feature=_Features(dim))
    peer.update(torch.from_numpy(real), real=True)
    peer.update(torch.from_numpy(generated), real=False)
    expected = float(peer.compute())
    assert metrics.frechet_distance(generated, real) == pytest.approx(expected, rel=1e-6, abs=1e-8)


def test_frechet_distance_handles_fewer_samples_than_dimensions():
    rng = np.random.default_rng(2)
    value = metrics.frechet_distance(rng.normal(size=(10, 32)), rng.normal(size=(12, 32)))
    assert np.isfinite(value) and value > 0


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(ValueError, match="feats_b"):
        metrics.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="feats_a"):
        metrics.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


# ---------------------------------------------------------------------------------------------
# score_prompt on hand-made scenes and detections


def _scene(caption: str, *objects: data.SceneObject) -> data.Scene:
    """A Scene whose object_words point at each object's (size) colour shape words."""
    words = data.caption_words(caption)
    object_words = []
    for obj in objects:
        end = next(i for i in range(1, len(words)) if words[i - 1 : i + 1] == [obj.colour, obj.shape])
        start = end - 2 if end >= 2 and words[end - 2] in data.SIZES else end - 1
        object_words.append(tuple(range(start, end + 1)))
    return data.Scene(tuple(objects), "gray", caption, tuple(object_words))


RED_CIRCLE = data.SceneObject("circle", "red", "large", 16.0, 32.0)
BLUE_SQUARE = data.SceneObject("square", "blue", "small", 48.0, 30.0)
RELATION_SCENE = _scene("a large red circle to the left of a small blue square", RED_CIRCLE, BLUE_SQUARE)


def _det(shape: str, colour: str, size: str, cx: float, cy: float) -> DetectedObject:
    return DetectedObject(shape, colour, size, cx, cy, 400 if size == "large" else 150)


def test_scene_helper_points_at_object_words():
    words = RELATION_SCENE.words
    assert [words[i] for i in RELATION_SCENE.object_words[0]] == ["large", "red", "circle"]
    assert [words[i] for i in RELATION_SCENE.object_words[1]] == ["small", "blue", "square"]


def test_score_prompt_correct_image():
    found = [_det("circle", "red", "large", 15, 33), _det("square", "blue", "small", 47, 31)]
    s = score_prompt(RELATION_SCENE, found)
    assert s["present"] and s["colour_bound"] and s["size_correct"] and s["count_correct"]
    assert s["relation"] == "to the left of" and s["relation_correct"] is True
    assert s["fully_correct"] is True
    assert [o["match"] for o in s["objects"]] == [0, 1]


def test_score_prompt_detection_order_does_not_matter():
    found = [_det("square", "blue", "small", 47, 31), _det("circle", "red", "large", 15, 33)]
    s = score_prompt(RELATION_SCENE, found)
    assert s["fully_correct"] and [o["match"] for o in s["objects"]] == [1, 0]


def test_score_prompt_wrong_colour():
    found = [_det("circle", "green", "large", 15, 33), _det("square", "blue", "small", 47, 31)]
    s = score_prompt(RELATION_SCENE, found)
    assert s["present"] is True and s["colour_bound"] is False
    assert s["objects"][0]["colour_correct"] is False and s["objects"][1]["colour_correct"] is True
    assert s["fully_correct"] is False


def test_score_prompt_missing_object():
    s = score_prompt(RELATION_SCENE, [_det("circle", "red", "large", 15, 33)])
    assert s["present"] is False and s["objects"][1]["present"] is False
    assert s["count_correct"] is False and s["relation_correct"] is False
    assert s["fully_correct"] is False


def test_score_prompt_wrong_relation():
    found = [_det("circle", "red", "large", 48, 33), _det("square", "blue", "small", 16, 31)]
    s = score_prompt(RELATION_SCENE, found)
    assert s["present"] and s["colour_bound"] and s["count_correct"]
    assert s["relation_correct"] is False and s["fully_correct"] is False


def test_score_prompt_wrong_count():
    found = [
        _det("circle", "red", "large", 15, 33),
        _det("square", "blue", "small", 47, 31),
        _det("cross", "yellow", "small", 30, 55),
    ]
    s = score_prompt(RELATION_SCENE, found)
    assert s["present"] and s["colour_bound"] and s["relation_correct"]
    assert s["count_correct"] is False and s["n_detected"] == 3 and s["fully_correct"] is False


def test_score_prompt_one_detection_cannot_stand_for_two_objects():
    scene = _scene(
        "a red circle and a blue circle",
        data.SceneObject("circle", "red", "small", 16, 16),
        data.SceneObject("circle", "blue", "small", 48, 48),
    )
    s = score_prompt(scene, [_det("circle", "blue", "small", 48, 48)])
    assert s["objects"][1]["present"] and s["objects"][1]["colour_correct"]
    assert s["objects"][0]["present"] is False and s["fully_correct"] is False


def test_score_prompt_sizes_only_checked_when_named():
    unsized = _scene("a red circle and a blue square on a gray background", RED_CIRCLE, BLUE_SQUARE)
    found = [_det("circle", "red", "small", 15, 33), _det("square", "blue", "large", 47, 31)]
    s = score_prompt(unsized, found)
    assert s["size_correct"] is None and s["relation"] is None and s["relation_correct"] is None
    assert s["fully_correct"] is True
    s = score_prompt(RELATION_SCENE, found)
    assert s["size_correct"] is False and s["fully_correct"] is False


def test_score_prompt_above_below_relation():
    top = data.SceneObject("triangle", "green", "small", 30.0, 12.0)
    bottom = data.SceneObject("cross", "orange", "small", 34.0, 50.0)
    scene = _scene("a green triangle above an orange cross", top, bottom)
    ok = [_det("triangle", "green", "small", 31, 13), _det("cross", "orange", "small", 33, 49)]
    assert score_prompt(scene, ok)["relation_correct"] is True
    swapped = [_det("triangle", "green", "small", 31, 49), _det("cross", "orange", "small", 33, 13)]
    assert score_prompt(scene, swapped)["relation_correct"] is False


def test_score_prompt_matches_generated_captions_of_data():
    for scene in data.scenes(3, 40, "heldout"):
        truth = [_det(o.shape, o.colour, o.size, o.cx, o.cy) for o in scene.objects]
        s = score_prompt(scene, truth)
        assert s["fully_correct"], (scene.caption, s)
        if len(scene.objects) == 2 and any(r in scene.caption for r in data.RELATIONS):
            assert s["relation"] in data.RELATIONS


def test_score_prompt_rejects_bad_input():
    with pytest.raises(TypeError, match="scene"):
        score_prompt("a red circle", [])
    with pytest.raises(TypeError, match=r"detected\[0\]"):
        score_prompt(RELATION_SCENE, [RED_CIRCLE])
    with pytest.raises(ValueError, match="object_words"):
        score_prompt(data.Scene((RED_CIRCLE,), "gray", "a red circle"), [])


# ---------------------------------------------------------------------------------------------
# Object extraction from hand-made maps


def test_extract_objects_components_sizes_and_triangle_centre():
    geometry = evaluator_train.calibrate_geometry(samples_per_kind=4)
    tri = data.SceneObject("triangle", "green", "large", 20.0, 20.0)
    circ = data.SceneObject("circle", "purple", "small", 45.0, 45.0)
    _, masks = data.render(data.Scene((tri, circ), "gray", ""))
    fg = masks.any(0)
    fg[60:62, 60:62] = True  # a 4-pixel speck: dropped
    colour = np.where(masks[0], ev.COLOUR_NAMES.index("green"), ev.COLOUR_NAMES.index("purple"))
    shape = np.where(masks[0], ev.SHAPE_NAMES.index("triangle"), ev.SHAPE_NAMES.index("circle"))
    found = ev.extract_objects(fg, colour, shape, geometry)
    assert [(d.shape, d.colour, d.size) for d in found] == [("triangle", "green", "large"), ("circle", "purple", "small")]
    for d, t in zip(found, (tri, circ)):
        assert abs(d.cx - t.cx) < 0.5 and abs(d.cy - t.cy) < 0.5


def test_extract_objects_splits_touching_objects_of_different_colours():
    geometry = evaluator_train.calibrate_geometry(samples_per_kind=2)
    fg = np.zeros((64, 64), bool)
    fg[20:40, 10:30] = fg[20:40, 30:50] = True
    colour = np.zeros((64, 64), np.int64)
    colour[:, 30:] = 2
    shape = np.full((64, 64), ev.SHAPE_NAMES.index("square"))
    found = ev.extract_objects(fg, colour, shape, geometry)
    assert sorted(d.colour for d in found) == sorted([ev.COLOUR_NAMES[0], ev.COLOUR_NAMES[2]])


# ---------------------------------------------------------------------------------------------
# The shipped evaluator


def test_shipped_evaluator_accuracy_on_heldout_scenes(shipped):
    result = evaluator_train.evaluator_accuracy(50, seed=777, split="heldout", evaluator=shipped)
    assert result["n_scenes"] == 50
    for key in ("detected", "shape", "colour", "size", "position", "count"):
        assert result[key] >= 0.95, (key, result)


def test_shipped_evaluator_detects_a_known_scene(shipped):
    scene = data.scenes(5, 1, "heldout", n_objects=2)[0]
    image, _ = data.render(scene)
    found = shipped.detect(image[None])[0]  # uint8 (N, H, W, 3) is accepted too
    assert score_prompt(scene, found)["fully_correct"], (scene, found)


def test_features_are_pooled_vectors_and_separate_real_from_noise(shipped):
    real_a = data.render_batch(data.scenes(10, 24, "train"))
    real_b = data.render_batch(data.scenes(11, 24, "heldout"))
    noise = np.random.default_rng(0).uniform(-1, 1, size=real_a.shape).astype(np.float32)
    fa, fb, fn = shipped.features(real_a), shipped.features(real_b), shipped.features(noise)
    assert fa.shape == (24, shipped.net.channels[-1]) and 64 <= fa.shape[1] <= 256
    np.testing.assert_allclose(shipped.features(torch.from_numpy(real_a)), fa, rtol=1e-5, atol=1e-6)
    assert metrics.frechet_distance(fa, fb) < metrics.frechet_distance(fa, fn)


def test_images_are_validated(shipped):
    with pytest.raises(ValueError, match="images"):
        shipped.detect(np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        shipped.features(np.full((1, 3, 64, 64), 200.0, np.float32))
    with pytest.raises(TypeError, match="images"):
        shipped.detect([[0.0]])


def test_weights_are_safetensors_and_small():
    assert ev.DEFAULT_WEIGHTS.suffix == ".safetensors"
    assert ev.DEFAULT_WEIGHTS.stat().st_size < 2 * 1024 * 1024
    assert Evaluator.config_path(ev.DEFAULT_WEIGHTS).is_file()


def test_save_load_roundtrip(tmp_path, shipped):
    path = shipped.save(tmp_path / "copy.safetensors")
    again = Evaluator.load(path)
    x = data.render_batch(data.scenes(4, 4, "train"))
    np.testing.assert_allclose(again.features(x), shipped.features(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="path"):
        Evaluator.load(tmp_path / "copy.pt")
    with pytest.raises(FileNotFoundError, match="path"):
        Evaluator.load(tmp_path / "missing.safetensors")


def test_accuracy_command_prints_a_table():
    result = CliRunner().invoke(evaluator_cli, ["accuracy", "--n", "5", "--seed", "1", "--split", "train"])
    assert result.exit_code == 0, result.output
    for key in ("shape", "colour", "size", "position", "count"):
        assert key in result.output
    assert evaluator_cli.name == "evaluator"


# ---------------------------------------------------------------------------------------------
# Ground truth the evaluator learns from: masks match the rendered pixels


@pytest.mark.parametrize("split", data.SPLITS)
def test_render_masks_match_rendered_pixels(split):
    checked = 0
    for scene in data.scenes(21, 30, split):
        image, masks = data.render(scene)
        assert masks.shape == (len(scene.objects), *image.shape[:2])
        for k, obj in enumerate(scene.objects):
            assert masks[k].sum() > 50, (scene, k)
            interior = ndimage.binary_erosion(masks[k], structure=np.ones((3, 3)), border_value=1)
            others = [m for i, m in enumerate(masks) if i != k]
            if others:  # skip pixels next to another object (anti-aliased blends)
                interior &= ~ndimage.binary_dilation(np.any(others, axis=0), structure=np.ones((3, 3)))
            pixels = image[interior].astype(int)
            assert len(pixels) > 0
            assert np.abs(pixels - np.array(data.COLOURS[obj.colour])).max() <= 1, (scene, k)
            checked += len(pixels)
            # mask centre of mass lies near the object's centre (triangle: below it)
            ys, xs = np.nonzero(masks[k])
            assert abs(xs.mean() + 0.5 - obj.cx) < 1.0 and abs(ys.mean() + 0.5 - obj.cy) < 3.0
    assert checked > 1000


def test_accuracy_through_the_builtin_autoencoder():
    result = CliRunner().invoke(evaluator_cli, ["accuracy", "--n", "4", "--seed", "1", "--through-vae", "builtin"])
    assert result.exit_code == 0, result.output
    assert "through the autoencoder of builtin" in result.output
    bad = CliRunner().invoke(evaluator_cli, ["accuracy", "--n", "4", "--through-vae", "/nonexistent"])
    assert bad.exit_code != 0 and "--through-vae" in bad.output


def test_round_trip_through_an_autoencoder_keeps_shape_and_range():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    images = data.render_batch(data.scenes(0, 3, "train"))
    out = evaluator_train.round_trip(vae, images, batch_size=2)
    assert out.shape == images.shape and out.dtype == np.float32
    assert out.min() >= -1 and out.max() <= 1
    assert not np.allclose(out, images)  # a random autoencoder cannot reproduce them
