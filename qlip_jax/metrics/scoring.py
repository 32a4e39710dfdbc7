"""Sampling a prompt set in batches and scoring the images: what every evaluation program shares.

``sample_records`` runs a :class:`~qlip_jax.sampling.pipeline.Text2Image` over held-out prompt
records (prompt ``i`` always gets seed ``seed + i``, so two precisions of one prompt start from the
same noise); ``score_images`` compares a set against the float images of the same seeds (PSNR, SSIM)
and against the prompts (scene alignment by the parser).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from qlip_jax.metrics.image import psnr, ssim
from qlip_jax.metrics.parser import SceneParser, alignment_score


def sample_records(pipe, records: list, guidance: float, seed: int = 0, batch: int = 25,
                   schedule_fn: Callable[[int, object], np.ndarray] | None = None,
                   desc: str | None = None) -> np.ndarray:
    """uint8 images ``[N, H, W, 3]`` for ``records`` (objects with ``.text``).

    ``schedule_fn(start, emb) -> [b, T, L]`` gives the precision schedule of the batch beginning at
    record ``start`` (``emb`` are its text embeddings, for a selector); None samples in float.
    """
    out = []
    for i in tqdm(range(0, len(records), batch), desc=desc, disable=desc is None):
        chunk = records[i:i + batch]
        emb = pipe.encode([r.text for r in chunk])
        schedule = None if schedule_fn is None else schedule_fn(i, emb)
        out.append(pipe(emb, seed + np.arange(i, i + len(chunk)), guidance, schedule))
    return np.concatenate(out)


def alignment(parser: SceneParser, records: list, images: np.ndarray) -> np.ndarray:
    """Scene alignment ``[N]`` of each image with its record's caption."""
    return np.asarray([alignment_score(r.caption, s) for r, s in zip(records, parser.parse(images))])


def score_images(images: np.ndarray, fp_images: np.ndarray | None, records: list,
                 parser: SceneParser | None) -> dict[str, np.ndarray]:
    """Per-image ``alignment`` (with a scene ``parser``; none without) and, given float images of the same
    seeds, ``psnr`` and ``ssim``."""
    out = {} if parser is None else {"alignment": alignment(parser, records, images)}
    if fp_images is not None:
        out["psnr"] = psnr(images, fp_images)
        out["ssim"] = ssim(images, fp_images)
    return out
