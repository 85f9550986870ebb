"""The synthetic scene generator: determinism, splits, captions, masks against pixels."""
import numpy as np
import pytest

from attnguide.builtin import data
from attnguide.builtin.model import build_tokenizer


def test_deterministic_by_seed():
    a, b = data.scenes(7, 20), data.scenes(7, 20)
    assert a == b
    assert data.scenes(8, 20) != a
    np.testing.assert_array_equal(data.render(a[0])[0], data.render(b[0])[0])


def test_splits_respect_held_out_pairs():
    for scene in data.scenes(1, 300, "train"):
        assert not any((o.colour, o.shape) in data.HELD_OUT_PAIRS for o in scene.objects)
    for scene in data.scenes(2, 300, "heldout"):
        assert any((o.colour, o.shape) in data.HELD_OUT_PAIRS for o in scene.objects)


def test_variety():
    scenes = data.scenes(3, 2000)
    objects = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objects} == set(data.SHAPES) and len(data.SHAPES) >= 5
    assert {o.colour for o in objects} == set(data.COLOURS) and len(data.COLOURS) >= 6
    assert {o.size for o in objects} == set(data.SIZES)
    assert {s.background for s in scenes} == set(data.BACKGROUNDS) and len(data.BACKGROUNDS) >= 4
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert any(r in s.caption for s in scenes for r in data.RELATIONS)


def test_object_words_name_the_objects_and_relations_hold():
    for scene in data.scenes(4, 500):
        words = scene.words
        for obj, idx in zip(scene.objects, scene.object_words):
            named = [words[i] for i in idx]
            assert named[-1] == obj.shape and named[-2] == obj.colour
            if len(named) == 3:
                assert named[0] == obj.size
        for relation in data.RELATIONS:
            if f" {relation} " in scene.caption:
                assert data.relation_holds(scene.objects[0], scene.objects[1], relation)


def test_tokenizer_covers_every_caption_word():
    tok = build_tokenizer()
    unk = tok.convert_tokens_to_ids("<unk>")
    for scene in data.scenes(5, 300):
        ids = tok(scene.caption).input_ids
        assert unk not in ids
        assert len(ids) == len(scene.words) + 2  # <start> ... <end>
        assert tok.convert_ids_to_tokens(ids)[1:-1] == scene.words


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        data.scenes(0, 1, "test")
    with pytest.raises(ValueError, match="n_objects"):
        data.scenes(0, 1, n_objects=4)
