"""GenEval-style prompt scoring for the synthetic shape scenes: the objects the evaluator detected
in an image, checked against the prompt (scene) the image was made from."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import optimize

from attnguide.builtin import data

from .evaluator import DetectedObject


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
    objects = [_object_score(p, None if m is None else detected[m], m, has_size)
               for p, m, has_size in zip(scene.objects, match, named)]
    relation = prompt_relation(scene)
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
        "relation_correct": _relation_correct(relation, match, detected),
    }
    checks = ("present", "colour_bound", "size_correct", "count_correct", "relation_correct")
    result["fully_correct"] = all(result[k] is not False for k in checks)
    return result


def _object_score(p: data.SceneObject, d: DetectedObject | None, m: int | None, has_size: bool) -> dict[str, Any]:
    """The checks of one prompt object ``p`` against its matched detection ``d`` (index ``m``)."""
    return {
        "shape": p.shape,
        "colour": p.colour,
        "size": p.size if has_size else None,
        "present": d is not None,
        "colour_correct": d is not None and d.colour == p.colour,
        "size_correct": (d is not None and d.size == p.size) if has_size else None,
        "match": m,
    }


def _relation_correct(relation: tuple[str, int, int] | None, match: Sequence[int | None],
                      detected: Sequence[DetectedObject]) -> bool | None:
    """Whether the prompt's relation holds between the matched detections (None: no relation)."""
    if relation is None:
        return None
    phrase, a, b = relation
    da, db = match[a], match[b]
    return (
        da is not None and db is not None
        and data.relation_holds(detected[da].as_scene_object(), detected[db].as_scene_object(), phrase)
    )
