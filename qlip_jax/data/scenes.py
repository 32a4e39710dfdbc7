"""Procedural captioned scenes: the training and evaluation domain of the embedded miniature SD.

A scene is 1-4 objects (shape, color, size, fill, position on a 3x3 grid) on a plain background,
rendered at 64x64 RGB with anti-aliased edges. Captions come at five specificity levels, so prompts
differ in richness the way QLIP's premise needs:

====  ===========================================================================================
lvl   example
====  ===========================================================================================
0     "a shape", "something red"                                         (generic)
1     "a red star"                                                       (one object)
2     "a red star and a blue circle", "a single red star"                (every object)
3     "a large striped red star and a small blue circle"                 (+ size, stripes)
4     "a large striped red star at the top left and a small solid blue circle at the bottom
      right on a yellow background"                                      (everything)
====  ===========================================================================================

A level-2 caption of a one-object scene says "a single": without it, it would read exactly like a
level-1 caption (which names one object of a scene of 1-4) while claiming there is nothing else
(``scenes-v2``; ``scenes-v1`` had no such word, see ``eval/caption_ambiguity.py``).

Every caption is true of its scene, and carries the structured list of what it *states*
(:class:`Caption`), built when the caption is made, never parsed from text.

Everything is a deterministic function of integer seeds (NumPy PCG64), identical across runs and
platforms. Prompt sets (train / calibration / evaluation) come from disjoint seed ranges.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

DATA_VERSION = "scenes-v2"
IMAGE_SIZE = 64

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {  # object colors, RGB
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 75, 215), "yellow": (235, 215, 40),
    "purple": (140, 55, 185), "orange": (240, 135, 30), "white": (245, 245, 245), "black": (25, 25, 25),
}
BACKGROUNDS = {  # background colors; an object never has its background's color
    "gray": (128, 128, 128), "white": (235, 235, 235), "yellow": (225, 205, 90), "blue": (90, 120, 200),
}
SIZES = {"small": 11.0, "medium": 16.0, "large": 21.0}  # object extent in pixels
FILLS = ("solid", "striped")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom",
             "bottom right")
_POSITION_PHRASE = {"top left": "at the top left", "top": "at the top", "top right": "at the top right",
                    "left": "on the left", "center": "in the center", "right": "on the right",
                    "bottom left": "at the bottom left", "bottom": "at the bottom",
                    "bottom right": "at the bottom right"}
LEVELS = (0, 1, 2, 3, 4)
_CELL_CENTERS = (11.0, 32.0, 53.0)


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    fill: str
    position: str


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str
    jitter: tuple[tuple[float, float], ...]  # per-object pixel offset from its cell center


@dataclasses.dataclass(frozen=True)
class StatedObject:
    """What a caption says about one object; ``None`` = not stated."""

    shape: str | None = None
    color: str | None = None
    size: str | None = None
    fill: str | None = None
    position: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        return all(v is None or getattr(obj, k) == v for k, v in dataclasses.asdict(self).items())


@dataclasses.dataclass(frozen=True)
class Caption:
    """A caption and the attributes it states.

    ``objects``: one :class:`StatedObject` per object the caption mentions; ``exhaustive``: the caption
    claims these are *all* the objects (levels 2-4); ``background``: stated background or None.
    """

    text: str
    level: int
    objects: tuple[StatedObject, ...]
    background: str | None
    exhaustive: bool


# ----------------------------------------------------------------------------------------------
# Scenes


def sample_scene(seed: int, n_objects: int | None = None) -> Scene:
    """The scene of a seed (``n_objects`` in 1..4 forces the count)."""
    rng = np.random.default_rng([seed, 0x5CE7E])
    n = int(rng.integers(1, 5)) if n_objects is None else int(n_objects)
    if not 1 <= n <= 4:
        raise ValueError(f"n_objects must be in 1..4, got {n}")
    background = str(rng.choice(list(BACKGROUNDS)))
    colors = [c for c in COLORS if c != background]
    cells = rng.choice(len(POSITIONS), size=n, replace=False)
    objs, jitter = [], []
    for cell in cells:
        objs.append(SceneObject(shape=str(rng.choice(SHAPES)), color=str(rng.choice(colors)),
                                size=str(rng.choice(list(SIZES))), fill=str(rng.choice(FILLS, p=[0.7, 0.3])),
                                position=POSITIONS[int(cell)]))
        jitter.append(tuple(float(v) for v in rng.uniform(-2.5, 2.5, 2)))
    return Scene(tuple(objs), background, tuple(jitter))


def _shape_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Approximate signed distance (pixels, < 0 inside) of a shape of half-extent ``r`` at the origin."""
    if shape == "circle":
        return np.hypot(dx, dy) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r
    if shape == "triangle":  # pointing up; centroid at the origin
        k = np.sqrt(3.0) / 2.0
        y = dy - 0.2 * r  # image y grows downwards; shift so the triangle looks centred
        d1 = y - 0.75 * r                      # bottom edge
        d2 = -k * dx - 0.5 * y - 0.75 * r * 0.5 - 0.25 * r
        d3 = k * dx - 0.5 * y - 0.75 * r * 0.5 - 0.25 * r
        return np.maximum(d1, np.maximum(d2, d3))
    if shape == "star":  # five points, one up; radius swings between 0.45 r and r
        theta = np.arctan2(dx, -dy)
        phase = np.abs(((theta / (2 * np.pi / 5)) % 1.0) - 0.5) * 2.0  # 1 at tips, 0 between
        radius = r * (0.45 + 0.55 * phase ** 1.5)
        return (np.hypot(dx, dy) - radius) * 0.8
    raise ValueError(f"unknown shape '{shape}'")


def _object_covers(scene: Scene, size: int):
    """Per object: ``(obj, cover [size, size] in [0, 1] (anti-aliased), dy [size, size])``, ``dy`` the
    pixel rows' offset from the object's centre (for the stripes)."""
    scale = size / IMAGE_SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for obj, (jx, jy) in zip(scene.objects, scene.jitter):
        row, col = divmod(POSITIONS.index(obj.position), 3)
        cx, cy = (_CELL_CENTERS[col] + jx) * scale, (_CELL_CENTERS[row] + jy) * scale
        dy = yy - cy
        d = _shape_distance(obj.shape, xx - cx, dy, SIZES[obj.size] * scale / 2)
        yield obj, np.clip(0.5 - d, 0.0, 1.0), dy


def object_coverage(scene: Scene, size: int = IMAGE_SIZE, cells: int | None = None) -> np.ndarray:
    """``float32 [size, size]``: the share of each pixel covered by an object (0 = background).

    With ``cells``: ``[cells, cells]``, the share of each cell of a ``cells x cells`` grid (e.g. the
    latent cells of a VAE that downsamples by ``size // cells``).
    """
    if cells is not None and (cells < 1 or size % cells):
        raise ValueError(f"cells must divide the image size {size}, got {cells}")
    free = np.ones((size, size), np.float32)
    for _, cover, _ in _object_covers(scene, size):
        free *= 1.0 - cover
    cover = 1.0 - free
    if cells is None:
        return cover
    k = size // cells
    return cover.reshape(cells, k, cells, k).mean(axis=(1, 3))


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """``uint8 [size, size, 3]`` image of a scene (anti-aliased; later objects drawn on top)."""
    scale = size / IMAGE_SIZE
    img = np.empty((size, size, 3), np.float32)
    img[:] = BACKGROUNDS[scene.background]
    for obj, cover, dy in _object_covers(scene, size):
        cover = cover[..., None]
        color = np.asarray(COLORS[obj.color], np.float32)
        if obj.fill == "striped":  # horizontal bands of the color and its half-dark shade
            band = (np.floor(dy / (3.0 * scale)) % 2 == 1)[..., None]
            color = np.where(band, color * 0.45, color)
        img = img * (1.0 - cover) + color * cover
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Captions

_PREFIXES = ("", "", "a picture of ", "an image of ", "a drawing of ")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def make_caption(scene: Scene, level: int, rng: np.random.Generator) -> Caption:
    """A caption of ``scene`` at specificity ``level`` (0-4), with what it states."""
    if level not in LEVELS:
        raise ValueError(f"caption level must be one of {LEVELS}, got {level}")
    objs = list(scene.objects)
    if level == 0:
        obj = objs[int(rng.integers(len(objs)))]
        choice = int(rng.integers(5))
        if choice == 0:
            return Caption("a shape", 0, (StatedObject(),), None, False)
        if choice == 1:
            return Caption(f"something {obj.color}", 0, (StatedObject(color=obj.color),), None, False)
        if choice == 2:
            return Caption(f"{_article(obj.shape)} {obj.shape}", 0, (StatedObject(shape=obj.shape),), None, False)
        if choice == 3:
            return Caption("an image", 0, (), None, False)
        return Caption(f"something on a {scene.background} background", 0, (), scene.background, False)
    if level == 1:
        obj = objs[int(rng.integers(len(objs)))]
        text = f"{_article(obj.color)} {obj.color} {obj.shape}"
        return Caption(str(rng.choice(_PREFIXES)) + text, 1,
                       (StatedObject(shape=obj.shape, color=obj.color),), None, False)
    order = [objs[i] for i in rng.permutation(len(objs))]
    parts, stated = [], []
    for obj in order:
        words = [obj.color, obj.shape]
        s = dict(shape=obj.shape, color=obj.color)
        if level >= 3:
            words = [obj.size] + (["striped"] if obj.fill == "striped" else []) + words
            s["size"] = obj.size
            if obj.fill == "striped":
                s["fill"] = "striped"
        if level == 4:
            if obj.fill == "solid":
                words = [obj.size, "solid", obj.color, obj.shape]
                s["fill"] = "solid"
            words = words + [_POSITION_PHRASE[obj.position]]
            s["position"] = obj.position
        article = "a single" if level == 2 and len(objs) == 1 else _article(words[0])
        parts.append(f"{article} " + " ".join(words))
        stated.append(StatedObject(**s))
    text = _join(parts)
    background = None
    if level == 4:
        text += f" on {_article(scene.background)} {scene.background} background"
        background = scene.background
    return Caption(str(rng.choice(_PREFIXES)) + text, level, tuple(stated), background, True)


def caption_is_true(caption: Caption, scene: Scene) -> bool:
    """Every stated object matches a distinct scene object; counts and background agree if stated."""
    if caption.background is not None and caption.background != scene.background:
        return False
    if caption.exhaustive and len(caption.objects) != len(scene.objects):
        return False
    free = list(scene.objects)
    for s in caption.objects:
        hit = next((o for o in free if s.matches(o)), None)
        if hit is None:
            return False
        free.remove(hit)
    return True


# ----------------------------------------------------------------------------------------------
# Prompt sets and training batches

_SPLITS = {"train": (0, 20000), "calibration": (1_000_000, 256), "eval": (2_000_000, 512)}


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    id: str
    caption: Caption
    seed: int          # the scene the caption was made from
    n_objects: int

    @property
    def text(self) -> str:
        return self.caption.text

    @property
    def level(self) -> int:
        return self.caption.level


def split_seeds(name: str) -> range:
    """Scene seeds of a split (disjoint ranges)."""
    if name not in _SPLITS:
        raise ValueError(f"unknown split '{name}'; splits: {sorted(_SPLITS)}")
    start, n = _SPLITS[name]
    return range(start, start + n)


def prompt_set(name: str) -> list[PromptRecord]:
    """The fixed prompt set of a split; ids ``'<split>-NNNNN'`` are stable.

    ``train``: one caption per training scene, levels cycling 0-4. ``calibration`` and ``eval``: levels
    cycling 0-4; in ``eval`` even items are single-object scenes and odd items have 2-4 objects, so every
    level is covered for single- and multi-object prompts.
    """
    records = []
    for i, seed in enumerate(split_seeds(name)):
        n_objects = None
        if name == "eval":
            n_objects = 1 if i % 2 == 0 else 2 + (i // 2) % 3
        scene = sample_scene(seed, n_objects)
        level = (i // 2) % 5 if name == "eval" else i % 5
        cap = make_caption(scene, level, np.random.default_rng([seed, 0xCA9]))
        records.append(PromptRecord(f"{name}-{i:05d}", cap, seed, len(scene.objects)))
    return records


def scene_of(record: PromptRecord) -> Scene:
    n = record.n_objects if record.id.startswith("eval-") else None
    return sample_scene(record.seed, n)


def training_batch(seed: int, step: int, batch_size: int) -> tuple[np.ndarray, list[Caption], np.ndarray]:
    """Deterministic batch of a training run: ``(images uint8 [B, 64, 64, 3], captions, scene_ids [B])``.

    Scenes are drawn from the train split, caption levels uniformly; the same ``(seed, step)`` always
    gives the same batch, so a resumed run sees exactly the data it would have seen.
    """
    rng = np.random.default_rng([seed, step, 0xBA7C])
    ids = rng.integers(0, len(split_seeds("train")), batch_size)
    scenes = [sample_scene(split_seeds("train")[int(i)]) for i in ids]
    caps = [make_caption(s, int(rng.integers(5)), rng) for s in scenes]
    return np.stack([render(s) for s in scenes]), caps, ids


def random_captions(scene_ids: np.ndarray, rng: np.random.Generator) -> list[Caption]:
    """A fresh random-level caption for each train-split scene index."""
    seeds = split_seeds("train")
    return [make_caption(sample_scene(seeds[int(i)]), int(rng.integers(5)), rng) for i in scene_ids]


def train_object_counts(n: int | None = None) -> np.ndarray:
    """Number of objects ``[n]`` of the first ``n`` train-split scenes (all of them by default)."""
    seeds = split_seeds("train")
    n = len(seeds) if n is None else min(n, len(seeds))
    return np.array([len(sample_scene(seeds[i]).objects) for i in range(n)], np.int32)


def iterate_train_images(batch_size: int, limit: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """All train-split scenes in order: ``(scene_ids [b], images uint8 [b, 64, 64, 3])``."""
    seeds = split_seeds("train")
    n = len(seeds) if limit is None else min(limit, len(seeds))
    for start in range(0, n, batch_size):
        ids = np.arange(start, min(n, start + batch_size))
        yield ids, np.stack([render(sample_scene(seeds[int(i)])) for i in ids])
