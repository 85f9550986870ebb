"""Synthetic scenes with ground truth: coloured shapes on simple backgrounds.

Every scene is a small list of objects (shape, colour, size, centre) on a background. It renders
to an RGB image, a ground-truth mask per object and a caption whose words that name each object
are known, so guidance methods and attention segmentation can be checked against ground truth.
Everything is a deterministic function of a seed; the supply of scenes is unlimited.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

RESOLUTION = 64
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
}
SIZES = {"small": 7.0, "large": 12.0}  # half-extent in pixels at RESOLUTION
BACKGROUNDS = ("gray", "white", "black", "checkered", "striped")
RELATIONS = ("to the left of", "to the right of", "above", "below")
# Colour-shape pairs never shown in training: the held-out split contains them (generalisation).
HELD_OUT_PAIRS = frozenset(
    {("red", "square"), ("green", "triangle"), ("blue", "circle"), ("yellow", "cross"), ("purple", "diamond")}
)
SPLITS = ("train", "heldout")
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cx: float  # centre, in pixels of a RESOLUTION x RESOLUTION image
    cy: float

    @property
    def radius(self) -> float:
        return SIZES[self.size] * self.scale

    @property
    def scale(self) -> float:
        return 1.0

    @property
    def horizontal(self) -> str:
        return "left" if self.cx < RESOLUTION / 2 else "right"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str
    caption: str
    # For each object, the indices (into caption_words(caption)) of the words that name it.
    object_words: tuple[tuple[int, ...], ...] = field(default=())

    @property
    def words(self) -> list[str]:
        return caption_words(self.caption)


def caption_words(caption: str) -> list[str]:
    """Split a caption into the words the built-in tokenizer sees (words and punctuation)."""
    return re.findall(r"\w+|[^\w\s]+", caption.lower())


def vocabulary() -> list[str]:
    """Every word any caption can contain, in a fixed order."""
    words = {"a", "an", "and", "on", "background", ",", "the", "left", "right", "of", "to", "above", "below"}
    words |= set(SHAPES) | set(COLOURS) | set(SIZES) | set(BACKGROUNDS)
    return sorted(words)


def _shape_coverage(obj: SceneObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean inside-test of the shape on a grid of pixel-centre coordinates."""
    dx, dy, r = xs - obj.cx, ys - obj.cy, obj.radius
    if obj.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if obj.shape == "square":
        s = r * 0.85
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if obj.shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r * 1.1
    if obj.shape == "cross":
        arm = r * 0.38
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if obj.shape == "triangle":
        # Upward triangle: apex at top, base at bottom.
        top, bottom = -r, r * 0.8
        half_width = (dy - top) / (bottom - top) * r
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= half_width)
    raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")


def _background(name: str, res: int) -> np.ndarray:
    yy, xx = np.mgrid[0:res, 0:res]
    if name == "gray":
        grey = np.full((res, res), 128.0)
    elif name == "white":
        grey = np.full((res, res), 235.0)
    elif name == "black":
        grey = np.full((res, res), 25.0)
    elif name == "checkered":
        cell = res // 8
        grey = np.where(((xx // cell) + (yy // cell)) % 2 == 0, 95.0, 165.0)
    elif name == "striped":
        cell = res // 16
        grey = np.where((yy // cell) % 2 == 0, 100.0, 175.0)
    else:
        raise ValueError(f"unknown background {name!r}; expected one of {BACKGROUNDS}")
    return np.repeat(grey[..., None], 3, axis=-1)


def render(scene: Scene, res: int = RESOLUTION) -> tuple[np.ndarray, np.ndarray]:
    """Render a scene: uint8 image (res, res, 3) and bool masks (n_objects, res, res).

    A pixel belongs to an object's mask when at least half of it is covered by the shape; the
    image blends colours by coverage (anti-aliasing), so masks match the rendered pixels.
    """
    scale = res / RESOLUTION
    ss = _SUPERSAMPLE
    coords = (np.arange(res * ss) + 0.5) / ss / scale
    xs, ys = np.meshgrid(coords, coords)
    image = _background(scene.background, res)
    masks = np.zeros((len(scene.objects), res, res), dtype=bool)
    for i, obj in enumerate(scene.objects):
        inside = _shape_coverage(obj, xs, ys).astype(np.float64)
        coverage = inside.reshape(res, ss, res, ss).mean(axis=(1, 3))
        colour = np.asarray(COLOURS[obj.colour], dtype=np.float64)
        image = image * (1 - coverage[..., None]) + colour * coverage[..., None]
        masks[i] = coverage >= 0.5
    return np.clip(np.round(image), 0, 255).astype(np.uint8), masks


def _relation(a: SceneObject, b: SceneObject) -> str:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def relation_holds(a: SceneObject, b: SceneObject, relation: str) -> bool:
    """Whether 'a {relation} b' describes the centres of a and b."""
    return _relation(a, b) == relation


def _place_objects(rng: np.random.Generator, specs: list[tuple[str, str, str]]) -> list[SceneObject] | None:
    placed: list[SceneObject] = []
    for shape, colour, size in specs:
        r = SIZES[size]
        for _ in range(100):
            cx, cy = rng.uniform(r + 1, RESOLUTION - r - 1, size=2)
            candidate = SceneObject(shape, colour, size, float(cx), float(cy))
            if all(np.hypot(cx - o.cx, cy - o.cy) > r + o.radius + 3 for o in placed):
                placed.append(candidate)
                break
        else:
            return None
    return placed


def _phrase(obj: SceneObject, with_size: bool) -> list[str]:
    words = [obj.size, obj.colour, obj.shape] if with_size else [obj.colour, obj.shape]
    return ["an" if words[0][0] in "aeiou" else "a", *words]


def _caption(rng: np.random.Generator, objects: list[SceneObject], background: str) -> tuple[str, tuple]:
    with_size = bool(rng.random() < 0.7)
    with_background = bool(rng.random() < 0.6)
    words: list[str] = []
    object_words: list[tuple[int, ...]] = []

    def add_object(obj: SceneObject) -> None:
        phrase = _phrase(obj, with_size)
        start = len(words) + 1  # skip the article
        words.extend(phrase)
        object_words.append(tuple(range(start, len(words))))

    if len(objects) == 2 and rng.random() < 0.6:
        add_object(objects[0])
        words.extend(_relation(objects[0], objects[1]).split())
        add_object(objects[1])
    else:
        for i, obj in enumerate(objects):
            if i > 0:
                words.append("and" if i == len(objects) - 1 else ",")
            add_object(obj)
    if with_background:
        words.extend(["on", "a", background, "background"])
    caption = " ".join(words).replace(" ,", ",")
    return caption, tuple(object_words)


def recaption(rng: np.random.Generator, scene: Scene) -> Scene:
    """The same scene with a freshly drawn caption variant (size, relation, background words)."""
    caption, object_words = _caption(rng, list(scene.objects), scene.background)
    return Scene(scene.objects, scene.background, caption, object_words)


def is_held_out(objects) -> bool:
    return any((o.colour, o.shape) in HELD_OUT_PAIRS for o in objects)


def sample_scene(rng: np.random.Generator, split: str = "train", n_objects: int | None = None) -> Scene:
    """Draw one scene of the given split ('train': no held-out colour-shape pair; 'heldout': at
    least one). ``n_objects`` fixes the object count (1-3); by default it is drawn."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n_objects is not None and n_objects not in (1, 2, 3):
        raise ValueError(f"n_objects must be 1, 2 or 3, got {n_objects!r}")
    while True:
        n = n_objects or int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
        specs = [
            (str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), str(rng.choice(list(SIZES))))
            for _ in range(n)
        ]
        if split == "heldout":
            # Force one object onto a held-out pair so the split is never empty of them.
            colour, shape = sorted(HELD_OUT_PAIRS)[int(rng.integers(len(HELD_OUT_PAIRS)))]
            k = int(rng.integers(n))
            specs[k] = (shape, colour, specs[k][2])
        if len({(s, c) for s, c, _ in specs}) < n:
            continue  # identical colour+shape twice makes captions ambiguous
        objects = _place_objects(rng, specs)
        if objects is None or is_held_out(objects) != (split == "heldout"):
            continue
        background = str(rng.choice(BACKGROUNDS))
        caption, object_words = _caption(rng, objects, background)
        return Scene(tuple(objects), background, caption, object_words)


def scenes(seed: int, count: int, split: str = "train", n_objects: int | None = None) -> list[Scene]:
    """``count`` scenes, a deterministic function of ``seed``."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split, n_objects) for _ in range(count)]


def render_batch(batch: list[Scene], res: int = RESOLUTION) -> np.ndarray:
    """Images of several scenes as a float32 array (n, 3, res, res) in [-1, 1]."""
    images = np.stack([render(s, res)[0] for s in batch]).astype(np.float32)
    return images.transpose(0, 3, 1, 2) / 127.5 - 1.0
