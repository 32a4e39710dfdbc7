"""Scene parser: a small Flax CNN that reads the procedural scene back from an image.

It predicts, for each of the 9 grid cells, the object there (none or one of the 4 shapes) with its
color, size and fill, and the background color. From the parse come

* :func:`alignment_score`: the fraction of a caption's stated attributes found in the image, with
  extra objects penalised for captions that claim to list every object; the domain's analogue of
  CLIP score / GenEval;
* :meth:`SceneParser.features`: a 256-d embedding, the feature space of the domain FID and of GIQA.

Labels come from the generator's ground truth (:mod:`qlip_jax.data.scenes`), so the parser is
trained on unlimited fresh procedural images and evaluated on held-out seeds.
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qlip_jax.data.scenes import (
    BACKGROUNDS, COLORS, FILLS, IMAGE_SIZE, POSITIONS, SHAPES, SIZES, Caption, Scene, SceneObject,
)
from qlip_jax.atomic import write_json
from qlip_jax.errors import MissingFile
from qlip_jax.models.io import flat_leaves, load_safetensors_file, read_json, require_fields, write_safetensors

_SHAPES = ("none",) + SHAPES
_COLORS, _SIZES, _BGS = tuple(COLORS), tuple(SIZES), tuple(BACKGROUNDS)
HEADS = {"shape": len(_SHAPES), "color": len(_COLORS), "size": len(_SIZES), "fill": len(FILLS)}
FEATURE_DIM = 256


class SceneParserNet(nn.Module):
    """``images uint8 or float [B, 64, 64, 3]`` -> dict of logits and ``features [B, 256]``.

    Logits: ``shape [B, 9, 5]``, ``color [B, 9, 8]``, ``size [B, 9, 3]``, ``fill [B, 9, 2]``,
    ``background [B, 4]``.
    """

    width: int = 32

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        x = images.astype(jnp.float32) / 127.5 - 1.0 if images.dtype == jnp.uint8 else images
        w = self.width
        for i, (c, s) in enumerate([(w, 1), (w, 2), (2 * w, 2), (2 * w, 1), (2 * w, 2), (w, 1)]):
            x = nn.relu(nn.GroupNorm(num_groups=8, name=f"norm{i}")(
                nn.Conv(c, (3, 3), strides=(s, s), name=f"conv{i}")(x)))
        feats = nn.relu(nn.Dense(FEATURE_DIM, name="fc")(x.reshape(x.shape[0], -1)))  # [B, 256]
        out = {k: nn.Dense(9 * n, name=f"head_{k}")(feats).reshape(-1, 9, n) for k, n in HEADS.items()}
        out["background"] = nn.Dense(len(_BGS), name="head_background")(feats)
        out["features"] = feats
        return out


def scene_labels(scene: Scene) -> dict[str, np.ndarray]:
    """Integer targets of one scene: per cell ``shape/color/size/fill [9]`` and ``background []``."""
    lab = {k: np.zeros(9, np.int32) for k in HEADS}
    for o in scene.objects:
        c = POSITIONS.index(o.position)
        lab["shape"][c] = _SHAPES.index(o.shape)
        lab["color"][c] = _COLORS.index(o.color)
        lab["size"][c] = _SIZES.index(o.size)
        lab["fill"][c] = FILLS.index(o.fill)
    lab["background"] = np.int32(_BGS.index(scene.background))
    return lab


def batch_labels(scenes: list[Scene]) -> dict[str, np.ndarray]:
    labs = [scene_labels(s) for s in scenes]
    return {k: np.stack([l[k] for l in labs]) for k in labs[0]}


def parser_loss(logits: dict, labels: dict) -> jax.Array:
    """Cross-entropy: shape for every cell, attributes only where an object is, background."""
    ce = lambda lg, y: -jnp.take_along_axis(jax.nn.log_softmax(lg), y[..., None], -1)[..., 0]  # noqa: E731
    present = (labels["shape"] > 0).astype(jnp.float32)
    loss = jnp.mean(ce(logits["shape"], labels["shape"])) + jnp.mean(ce(logits["background"], labels["background"]))
    for k in ("color", "size", "fill"):
        loss += jnp.sum(ce(logits[k], labels[k]) * present) / jnp.maximum(jnp.sum(present), 1.0)
    return loss


@dataclasses.dataclass(frozen=True)
class ParsedScene:
    """What the parser read: the objects (as the generator's :class:`SceneObject`) and background."""

    objects: tuple[SceneObject, ...]
    background: str


def decode(logits: dict) -> list[ParsedScene]:
    """Argmax parse of a batch of logits (numpy or jax arrays)."""
    arg = {k: np.asarray(jnp.argmax(v, -1)) for k, v in logits.items() if k != "features"}
    scenes = []
    for b in range(arg["background"].shape[0]):
        objs = tuple(SceneObject(shape=_SHAPES[arg["shape"][b, c]], color=_COLORS[arg["color"][b, c]],
                                 size=_SIZES[arg["size"][b, c]], fill=FILLS[arg["fill"][b, c]],
                                 position=POSITIONS[c])
                     for c in range(9) if arg["shape"][b, c] > 0)
        scenes.append(ParsedScene(objs, _BGS[arg["background"][b]]))
    return scenes


def alignment_score(caption: Caption, parsed: ParsedScene) -> float:
    """Fraction of the caption's stated attributes found in the parsed image, in [0, 1].

    Each stated object is matched greedily to a distinct detected object by the number of its stated
    attributes (shape, color, size, fill, position) that agree; it contributes that many points out of
    its stated count (at least 1: "a shape" states that an object exists). A stated background is one
    more point. For captions that claim to list every object (levels 2-4), each detected object beyond
    the stated ones adds one unearned point to the total. A caption that states nothing scores 1.
    """
    earned, total = 0, 0
    free = list(parsed.objects)
    for s in caption.objects:
        stated = {k: v for k, v in dataclasses.asdict(s).items() if v is not None}
        total += max(1, len(stated))
        if not free:
            continue
        best = max(free, key=lambda o: sum(getattr(o, k) == v for k, v in stated.items()))
        earned += sum(getattr(best, k) == v for k, v in stated.items()) if stated else 1
        free.remove(best)
    if caption.background is not None:
        total += 1
        earned += int(parsed.background == caption.background)
    if caption.exhaustive:
        total += len(free)
    return 1.0 if total == 0 else earned / total


def pair_presence(scenes) -> np.ndarray:
    """``[N, 4 * 8]`` 0/1 presence of each (shape, color) pair, for ground-truth or parsed scenes."""
    out = np.zeros((len(scenes), len(SHAPES) * len(_COLORS)), np.int32)
    for i, sc in enumerate(scenes):
        for o in sc.objects:
            out[i, SHAPES.index(o.shape) * len(_COLORS) + _COLORS.index(o.color)] = 1
    return out


def macro_f1(truth: np.ndarray, pred: np.ndarray) -> float:
    """Mean over label columns of F1 (columns with no positives and no predictions are skipped)."""
    f1s = []
    for j in range(truth.shape[1]):
        tp = int(np.sum((truth[:, j] == 1) & (pred[:, j] == 1)))
        fp = int(np.sum((truth[:, j] == 0) & (pred[:, j] == 1)))
        fn = int(np.sum((truth[:, j] == 1) & (pred[:, j] == 0)))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


def to_parser_size(images: np.ndarray) -> np.ndarray:
    """uint8 ``[B, H, W, 3]`` images of another size (e.g. a test model's 32x32 samples) -> bilinear
    ``[B, 64, 64, 3]``, the size the parser reads; 64x64 (and float) input is returned unchanged."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:3] == (IMAGE_SIZE, IMAGE_SIZE):
        return images
    from PIL import Image

    size = (IMAGE_SIZE, IMAGE_SIZE)
    return np.stack([np.asarray(Image.fromarray(x).resize(size, Image.BILINEAR)) for x in images])


class SceneParser:
    """A trained parser: ``parse(images) -> [ParsedScene]``, ``features(images) -> [B, 256]``
    (uint8 images of any size are resized to 64x64 first, :func:`to_parser_size`)."""

    def __init__(self, params: dict, width: int = 32):
        self.net = SceneParserNet(width)
        self.params = params
        self._apply = jax.jit(lambda p, x: self.net.apply({"params": p}, x))

    def logits(self, images: np.ndarray, batch_size: int = 256) -> dict:
        images = to_parser_size(images)
        outs = [self._apply(self.params, jnp.asarray(images[i:i + batch_size]))
                for i in range(0, len(images), batch_size)]
        return {k: np.concatenate([np.asarray(o[k]) for o in outs]) for k in outs[0]}

    def parse(self, images: np.ndarray) -> list[ParsedScene]:
        return decode(self.logits(images))

    def features(self, images: np.ndarray) -> np.ndarray:
        return self.logits(images)["features"]

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        flat = {"/".join(k): np.asarray(v) for k, v in flat_leaves(self.params).items()}
        write_safetensors(flat, os.path.join(folder, "parser.safetensors"), {})
        write_json(os.path.join(folder, "parser.json"), {"width": self.net.width, "feature_dim": FEATURE_DIM},
                   indent=None)

    @classmethod
    def load(cls, folder: str) -> "SceneParser":
        path = os.path.join(folder, "parser.safetensors")
        if not os.path.isfile(path):
            raise MissingFile(folder, f"no scene parser at {folder}", "train one with train/train_parser.py")
        meta_path = os.path.join(folder, "parser.json")
        meta = require_fields(read_json(meta_path), ("width",), meta_path)
        params: dict = {}
        for key, value in load_safetensors_file(path).items():
            node = params
            *parents, leaf = key.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return cls(params, meta["width"])


def make_parser_step(net: SceneParserNet, tx):
    """Jitted ``(params, opt_state, images, labels) -> (params, opt_state, loss)``."""
    import optax

    @jax.jit
    def step(params, opt_state, images, labels):
        loss, grads = jax.value_and_grad(lambda p: parser_loss(net.apply({"params": p}, images), labels))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def evaluate_parser(parser: SceneParser, scenes: list[Scene], images: np.ndarray) -> dict[str, float]:
    """Held-out figures: macro-F1 of (shape, color) pair presence, background and count accuracy,
    and per-cell attribute accuracy on occupied cells."""
    parsed = parser.parse(images)
    lab = batch_labels(scenes)
    arg = {k: np.argmax(v, -1) for k, v in parser.logits(images).items() if k != "features"}
    occ = lab["shape"] > 0
    return {
        "pair_macro_f1": macro_f1(pair_presence(scenes), pair_presence(parsed)),
        "background_acc": float(np.mean([p.background == s.background for p, s in zip(parsed, scenes)])),
        "count_acc": float(np.mean([len(p.objects) == len(s.objects) for p, s in zip(parsed, scenes)])),
        **{f"{k}_acc": float(np.mean(arg[k][occ] == lab[k][occ])) for k in ("shape", "color", "size", "fill")},
        "cell_occupancy_acc": float(np.mean((arg["shape"] > 0) == occ)),
    }
