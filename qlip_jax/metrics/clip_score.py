"""CLIP score, as torchmetrics' ``CLIPScore`` defines it, with a Flax CLIP loaded torch-free.

For image ``i`` with caption ``c``: ``s_i = 100 * cos(E_I(i), E_C(c))`` with ``E`` the projected CLIP
embeddings; the score of a set is ``max(mean_i s_i, 0)`` (torchmetrics clamps the mean, so a pair with a
negative cosine lowers it; its docs write the clamp per pair, its code clamps the mean).

Images go through what ``CLIPImageProcessor`` does (``do_resize``: the shortest edge to ``size``, bicubic,
the other edge scaled and truncated to an int; ``do_center_crop`` to ``crop_size``; ``/255``; normalise by
``image_mean``/``image_std``), with the values of the folder's ``preprocessor_config.json`` (the CLIP
defaults at the vision tower's ``image_size`` if it has none). Captions are tokenized by the folder's
tokenizer without truncation and then cut to ``max_position_embeddings`` tokens, as torchmetrics does.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from PIL import Image

from qlip_jax.data.images import center_crop
from qlip_jax.errors import BadFile
from qlip_jax.models.clip import CLIPModel, load_clip
from qlip_jax.models.configs import CLIPConfig

#: OpenAI CLIP's normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ClipPreprocess:
    """The subset of ``CLIPImageProcessor``'s settings the CLIP score uses."""

    shortest_edge: int = 224
    crop: tuple[int, int] = (224, 224)  # (height, width)
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    resample: int = 3  # PIL.Image.BICUBIC
    do_resize: bool = True
    do_center_crop: bool = True
    rescale_factor: float = 1 / 255

    @classmethod
    def from_folder(cls, folder: str, image_size: int) -> "ClipPreprocess":
        """From ``folder/preprocessor_config.json``, or CLIP's defaults at ``image_size``."""
        path = os.path.join(folder, "preprocessor_config.json")
        if not os.path.isfile(path):
            return cls(image_size, (image_size, image_size))
        with open(path) as f:
            d = json.load(f)
        size = d.get("size", image_size)
        edge = size.get("shortest_edge", image_size) if isinstance(size, dict) else int(size)
        crop = d.get("crop_size", image_size)
        crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
        for key in ("do_convert_rgb", "do_rescale", "do_normalize"):
            if d.get(key, True) is False:
                raise BadFile(path, f"{key}=false is not supported by the CLIP score",
                              "use a CLIP folder whose preprocessor converts, rescales and normalizes")
        return cls(edge, crop, tuple(d.get("image_mean", CLIP_MEAN)), tuple(d.get("image_std", CLIP_STD)),
                   int(d.get("resample", 3)), bool(d.get("do_resize", True)),
                   bool(d.get("do_center_crop", True)), float(d.get("rescale_factor", 1 / 255)))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """``uint8 [H, W, 3]`` (any size) -> ``float32 [crop_h, crop_w, 3]`` normalised."""
        img = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
        if self.do_resize:
            w, h = img.size
            short, long = min(h, w), max(h, w)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            size = (new_short, new_long) if w <= h else (new_long, new_short)  # PIL: (width, height)
            img = img.resize(size, resample=self.resample)
        x = np.asarray(img, np.float32)
        if self.do_center_crop:
            x = center_crop(x, self.crop)
        x = x * self.rescale_factor
        return ((x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)).astype(np.float32)


class ClipScorer:
    """CLIP embeddings and score from a transformers ``CLIPModel`` folder (``config.json``,
    ``model.safetensors``, a tokenizer, optionally ``preprocessor_config.json``); no torch.

    Params are an argument of the jitted functions, never closed over.
    """

    def __init__(self, folder: str, batch: int = 32):
        from qlip_jax.data.tokenizer import load_tokenizer

        self.folder, self.batch = folder, batch
        self.config: CLIPConfig
        self.config, self.params = load_clip(folder)
        self.tokenizer = load_tokenizer(folder)
        self.preprocess = ClipPreprocess.from_folder(folder, self.config.vision_config.image_size)
        model = CLIPModel(self.config)
        self._image = jax.jit(lambda p, x: model.apply({"params": p}, x, method=CLIPModel.image_features))
        self._text = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask,
                                                              method=CLIPModel.text_features))

    @property
    def logit_scale(self) -> float:
        return float(np.exp(self.params["logit_scale"]))

    def pixels(self, images) -> np.ndarray:
        """uint8 images ``[B, H, W, 3]`` (or a list of ``[H_i, W_i, 3]``) -> ``float32 [B, S, S, 3]``."""
        return np.stack([self.preprocess(im) for im in images])

    def tokens(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int32 [B, T], mask int32 [B, T])``, ``T = max_position_embeddings``: untruncated ids cut
        to ``T`` (torchmetrics), padded with the tokenizer's pad token."""
        t = self.config.text_config.max_position_embeddings
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        rows = [r[:t] for r in self.tokenizer(list(captions))["input_ids"]]
        ids = np.full((len(rows), t), pad, np.int32)
        mask = np.zeros((len(rows), t), np.int32)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        return ids, mask

    def _batched(self, fn, n: int, *arrays) -> np.ndarray:
        """Apply ``fn`` in fixed-size batches (the last one padded), so there is one compilation."""
        out = []
        for s in range(0, n, self.batch):
            parts = [a[s:s + self.batch] for a in arrays]
            k = parts[0].shape[0]
            if k < self.batch and n > self.batch:
                parts = [np.concatenate([p, np.repeat(p[-1:], self.batch - k, 0)]) for p in parts]
            out.append(np.asarray(fn(self.params, *parts))[:k])
        return np.concatenate(out)

    def image_embeds(self, images) -> np.ndarray:
        """``float32 [B, P]`` unit-norm image embeddings."""
        x = self.pixels(images)
        return _unit(self._batched(self._image, len(x), x))

    def text_embeds(self, captions: list[str]) -> np.ndarray:
        """``float32 [B, P]`` unit-norm text embeddings."""
        ids, mask = self.tokens(captions)
        return _unit(self._batched(self._text, len(ids), ids, mask))

    def pair_scores(self, images, captions: list[str]) -> np.ndarray:
        """``float32 [B]``: ``100 * cos`` of each image with its caption (not clamped)."""
        if isinstance(captions, str) or len(images) != len(captions):
            raise ValueError(f"CLIP score: {len(images)} images but "
                             f"{1 if isinstance(captions, str) else len(captions)} captions (one each)")
        return 100.0 * np.sum(self.image_embeds(images) * self.text_embeds(captions), axis=-1)

    def __call__(self, images, captions: list[str]) -> float:
        """torchmetrics' CLIP score of the set: ``max(mean(100 * cos), 0)``."""
        return clip_score_from_pairs(self.pair_scores(images, captions))


def clip_score_from_pairs(scores) -> float:
    """``max(mean(scores), 0)`` of per-pair ``100 * cos`` scores (torchmetrics' ``compute``)."""
    return float(max(np.mean(np.asarray(scores, np.float64)), 0.0))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
