"""Quality targets for T2Q: how good is the image the float model makes for a prompt?

QLIP labels each training prompt with the GIQA score of the full-precision model's image for it and
regresses that score from the prompt's text embedding. This module makes those labels:

* ``quality_fn(images, records) -> scores [N]`` (higher = better), built by :func:`make_quality_fn`:

  - ``giqa-knn`` (default, as in the paper's best variant family): minus the mean distance of the
    image's features to its k nearest real-image features;
  - ``giqa-gmm``: log-likelihood of the features under a Gaussian mixture fitted to real features;
  - ``alignment``: the scene parser's alignment of the image with its prompt (the domain's analogue of
    a text-alignment score), for the paper's ablation over quality metrics.

  GIQA runs over a pluggable feature extractor ``images uint8 [N, H, W, 3] -> [N, F]``: the scene
  parser's penultimate features by default, Inception-v3 pool features when available.
* :class:`QualityTargets`: per training prompt its id, text, seed and raw score, cached to disk
  (``.npz``), and the normalisation to ``[0, 1]``: ``(raw - lo) / (hi - lo)`` clipped, with ``lo``/``hi``
  the 2nd/98th percentiles of the training scores (a robust min-max; the paper only says "normalized").
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import numpy as np

from qlip_jax.atomic import atomic_write
from qlip_jax.data import scenes

QUALITY_KINDS = ("giqa-knn", "giqa-gmm", "alignment")


def real_features(extract: Callable[[np.ndarray], np.ndarray], n: int, batch: int = 256) -> np.ndarray:
    """Features ``[n, F]`` of the first ``n`` real training-split scenes (rendered, not generated)."""
    return np.concatenate([extract(images) for _, images in scenes.iterate_train_images(batch, n)])


def make_quality_fn(kind: str, extract: Callable[[np.ndarray], np.ndarray] | None = None,
                    real: np.ndarray | None = None, parser=None, k: int = 5, n_components: int = 8,
                    seed: int = 0) -> Callable[[np.ndarray, list], np.ndarray]:
    """``quality_fn(images uint8 [N, H, W, 3], records) -> float [N]`` of the chosen ``kind``.

    ``giqa-*`` need ``extract`` and the real features ``real [M, F]``; ``alignment`` needs ``parser``.
    """
    if kind == "alignment":
        if parser is None:
            raise ValueError("the 'alignment' quality needs a scene parser")
        from qlip_jax.metrics.scoring import alignment
        return lambda images, records: alignment(parser, records, images)
    if kind not in QUALITY_KINDS:
        raise ValueError(f"unknown quality kind '{kind}'; choose from {QUALITY_KINDS}")
    if extract is None or real is None:
        raise ValueError(f"the '{kind}' quality needs a feature extractor and real-image features")
    from qlip_jax.metrics import giqa
    scorer = (giqa.GIQAKNN(real, k=k) if kind == "giqa-knn"
              else giqa.GIQAGMM(real, n_components=n_components, seed=seed))
    return lambda images, records: np.asarray(scorer.score(extract(images)), np.float64)


@dataclasses.dataclass
class QualityTargets:
    """Quality labels of float generations: ``ids``, ``texts``, ``seeds [N]``, ``raw [N]`` scores.

    ``lo``/``hi`` fix the normalisation (set from the training labels, reused for held-out ones).
    """

    kind: str
    ids: list[str]
    texts: list[str]
    seeds: np.ndarray
    raw: np.ndarray
    lo: float
    hi: float
    meta: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_scores(cls, kind: str, records: list, seeds, raw, bounds: tuple[float, float] | None = None,
                    meta: dict | None = None) -> "QualityTargets":
        """Labels of ``records`` from raw scores; ``bounds`` = the training labels' ``(lo, hi)``, or
        None to set them from these scores (2nd / 98th percentiles)."""
        raw = np.asarray(raw, np.float64)
        if raw.shape != (len(records),) or not np.all(np.isfinite(raw)):
            raise ValueError(f"need one finite score per prompt ({len(records)}), got shape {raw.shape}")
        lo, hi = bounds if bounds is not None else (float(np.percentile(raw, 2)), float(np.percentile(raw, 98)))
        return cls(kind, [r.id for r in records], [r.text for r in records], np.asarray(seeds), raw,
                   float(lo), float(hi), dict(meta or {}))

    @property
    def normalized(self) -> np.ndarray:
        """``[N]`` scores mapped to ``[0, 1]``."""
        return normalize(self.raw, self.lo, self.hi)

    def save(self, path: str) -> None:
        with atomic_write(path + ".npz" if not path.endswith(".npz") else path) as tmp:
            np.savez(tmp, seeds=self.seeds, raw=self.raw)
        with atomic_write(path + ".json", "w") as f:
            json.dump({"kind": self.kind, "ids": self.ids, "texts": self.texts, "lo": self.lo,
                       "hi": self.hi, "meta": self.meta}, f)

    @classmethod
    def load(cls, path: str) -> "QualityTargets":
        if not os.path.isfile(path) or not os.path.isfile(path + ".json"):
            raise FileNotFoundError(f"no quality targets at {path} (+ .json)")
        arrays = np.load(path)
        with open(path + ".json") as f:
            info = json.load(f)
        if len(info["ids"]) != len(arrays["raw"]):
            raise ValueError(f"quality targets at {path} are inconsistent: {len(info['ids'])} ids, "
                             f"{len(arrays['raw'])} scores")
        return cls(info["kind"], info["ids"], info["texts"], arrays["seeds"], arrays["raw"],
                   info["lo"], info["hi"], info.get("meta", {}))


def normalize(raw: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``clip((raw - lo) / (hi - lo), 0, 1)``."""
    return np.clip((np.asarray(raw, np.float64) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
