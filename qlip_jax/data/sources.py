"""Data sources: where the prompts (train / calibration / evaluation) and the reference data come from.

One small protocol, :class:`DataSource`, and two implementations:

* :class:`FileSource` -- the user's data: ``--prompts FILE`` and optionally ``--reference DIR|FILE.npz``.
  Prompt files: plain text (one caption a line, blank lines skipped); ``.jsonl`` (one JSON object a line)
  or ``.csv`` (with a header) with a caption column (``caption``, ``text`` or ``prompt``, or the one
  named); a COCO captions ``.json`` (``annotations[].caption``, grouped by ``image_id``) or a JSON list of
  strings. The captions are split into train / calibration / evaluation by a seeded permutation of caption
  groups (a COCO image's captions stay in one split), reproducible from the seed. The reference is a folder
  of images (any format PIL reads, any size: :func:`qlip_jax.data.images.fid_resize`) or an ``.npz`` of
  Inception statistics ``mu`` ``[D]``, ``sigma`` ``[D, D]`` as pytorch-fid and clean-fid write them.
* :class:`SceneSource` -- the procedural scenes of the embedded model (:mod:`qlip_jax.data.scenes`, its
  fixed prompt sets): rendered evaluation scenes as reference images and the scene parser's alignment as
  an extra per-image scorer.

A prompt is any object with ``.id`` and ``.text`` (:class:`Prompt` here; the scenes'
:class:`~qlip_jax.data.scenes.PromptRecord`). Errors on bad input are one line naming the file and what
to do.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from qlip_jax.data.images import fid_resize
from qlip_jax.errors import BadArgument, MissingFile, QlipInputError

#: split names, in the order the prompts are dealt
SPLITS = ("train", "calibration", "eval")
#: caption columns tried, in order, when none is named
CAPTION_COLUMNS = ("caption", "text", "prompt")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

#: ``(images uint8 [N, H, W, 3], prompts [N]) -> float [N]``, higher is better
Scorer = Callable[[np.ndarray, Sequence], np.ndarray]


class DataError(QlipInputError, ValueError):
    """A prompt or reference file that cannot be used as it is (a user-input error: one ``error:`` line)."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One caption of a prompt file; ``id`` is ``'<file stem>-<line or annotation index>'``."""

    id: str
    text: str


@dataclasses.dataclass(frozen=True)
class InceptionStats:
    """Precomputed Inception pool features' ``mu [D]`` and ``sigma [D, D]`` (float64)."""

    mu: np.ndarray
    sigma: np.ndarray


class DataSource(Protocol):
    """What every program needs from the data, and nothing else."""

    def prompts(self, split: str) -> list:
        """The prompts of ``split`` (one of :data:`SPLITS`), in a fixed order."""

    def reference_batches(self, size: int, batch: int = 64, limit: int | None = None) -> Iterator[np.ndarray] | None:
        """Batches ``uint8 [b, size, size, 3]`` of the reference images (at most ``limit`` in all), or None
        if it has none."""

    def reference_images(self, size: int, limit: int | None = None) -> np.ndarray | None:
        """``uint8 [N, size, size, 3]``: all of :meth:`reference_batches` at once, or None."""

    def reference_stats(self) -> InceptionStats | None:
        """Precomputed Inception statistics of the reference, or None."""

    def scorers(self) -> dict[str, Scorer]:
        """Extra per-image scorers this data has (``{}`` if none)."""

    def describe(self) -> dict:
        """JSON-able identity (kind, files, content hashes, seed): to record and key caches with."""


# ----------------------------------------------------------------------------------------------
# Files


def _sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _column(row: dict, column: str | None, where: str) -> str:
    names = (column,) if column else CAPTION_COLUMNS
    for name in names:
        if name in row:
            return str(row[name])
    want = f"'{column}'" if column else "any of " + ", ".join(f"'{c}'" for c in CAPTION_COLUMNS)
    raise DataError(f"{where}: no caption column ({want}); its columns are {sorted(row)}; "
                    "name the right one with --caption-column")


def read_captions(path: str, column: str | None = None) -> list[tuple[str, str]]:
    """``[(group, caption)]`` of a prompt file (module docstring for the formats). The group keeps
    captions of one image together when splitting (COCO ``image_id``; otherwise the caption's index).

    Raises FileNotFoundError, DataError (empty file, missing caption column, unknown JSON layout).
    """
    if not os.path.isfile(path):
        raise MissingFile(path, f"prompt file not found: {path}", "check --prompts")
    ext = os.path.splitext(path)[1].lower()
    out: list[tuple[str, str]] = []
    with open(path, encoding="utf-8-sig", newline="" if ext == ".csv" else None) as f:
        if ext == ".jsonl":
            for i, line in enumerate(f):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise DataError(f"{path} line {i + 1}: expected a JSON object with a caption column")
                    out.append((str(i), _column(row, column, f"{path} line {i + 1}")))
        elif ext == ".csv":
            reader = csv.DictReader(f)
            if reader.fieldnames:
                _column(dict.fromkeys(reader.fieldnames), column, f"{path} header")
            out = [(str(i), _column(row, column, path)) for i, row in enumerate(reader)]
        elif ext == ".json":
            data = json.load(f)
            if isinstance(data, dict) and isinstance(data.get("annotations"), list):
                for i, a in enumerate(data["annotations"]):
                    if not isinstance(a, dict) or "caption" not in a:
                        raise DataError(f"{path}: annotations[{i}] has no 'caption' (a COCO captions file "
                                        "has annotations[].caption)")
                    out.append((f"image-{a.get('image_id', i)}", str(a["caption"])))
            elif isinstance(data, list) and all(isinstance(x, str) for x in data):
                out = [(str(i), x) for i, x in enumerate(data)]
            else:
                raise DataError(f"{path}: a .json prompt file must be COCO captions (annotations[].caption) "
                                "or a list of strings")
        else:  # plain text, one caption a line
            out = [(str(i), line.strip()) for i, line in enumerate(f) if line.strip()]
    out = [(g, " ".join(c.split())) for g, c in out if c.strip()]
    if not out:
        raise DataError(f"prompt file {path} has no captions (empty, or only blank lines / empty captions)")
    return out


def split_groups(groups: Sequence[str], seed: int, calibration: float, evaluation: float) -> dict[str, np.ndarray]:
    """``{split: int [n_split] caption indices}``: the distinct groups, permuted by ``seed``, dealt as
    ``evaluation`` then ``calibration`` (fractions of the groups, at least one group each) then train (the
    rest, at least one). Within a split, captions keep their file order."""
    names = list(dict.fromkeys(groups))
    if len(names) < 3:
        raise DataError(f"{len(names)} caption group(s): at least 3 are needed for train / calibration / "
                        "evaluation splits")
    if not (0 < calibration < 1 and 0 < evaluation < 1 and calibration + evaluation < 1):
        raise BadArgument(f"calibration ({calibration}) and evaluation ({evaluation}) fractions must be in "
                          "(0, 1) with a sum below 1")
    order = np.random.default_rng(seed).permutation(len(names))
    n = len(names)
    n_eval = int(np.clip(round(evaluation * n), 1, n - 2))
    n_cal = int(np.clip(round(calibration * n), 1, n - 1 - n_eval))
    which = np.empty(len(names), np.int64)
    which[order[:n_eval]] = 2
    which[order[n_eval:n_eval + n_cal]] = 1
    which[order[n_eval + n_cal:]] = 0
    index = {g: k for k, g in enumerate(names)}
    split_of = np.array([which[index[g]] for g in groups])
    return {name: np.flatnonzero(split_of == k) for k, name in zip((0, 1, 2), SPLITS)}


def list_images(folder: str) -> list[str]:
    """Image files (by extension) under ``folder``, recursively, sorted."""
    out = []
    for root, _, files in os.walk(folder):
        out += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(out)


def _no_image(folder: str, bad: list[str]) -> DataError:
    seen = f"; {len(bad)} unreadable file(s), e.g. {bad[:3]}" if bad else ""
    return DataError(f"reference folder {folder} has no readable image (extensions "
                     f"{', '.join(IMAGE_EXTENSIONS)}){seen}")


def _check_readable(folder: str) -> None:
    """Raise DataError unless some image of ``folder`` opens (headers only, stops at the first)."""
    bad = []
    for path in list_images(folder):
        try:
            with Image.open(path) as im:
                im.verify()
            return
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            bad.append(os.path.basename(path))
    raise _no_image(folder, bad)


def iter_reference_images(folder: str, size: int, batch: int = 64,
                          limit: int | None = None) -> Iterator[np.ndarray]:
    """Batches ``uint8 [b, size, size, 3]`` (``b <= batch``) of the readable images of ``folder`` (sorted
    paths, at most ``limit`` in all) through :func:`~qlip_jax.data.images.fid_resize`; unreadable files are
    skipped. Only one batch is in memory at a time (5,000 COCO images at 512 px are 3.9 GB).

    Raises FileNotFoundError (no folder), DataError (no readable image)."""
    if not os.path.isdir(folder):
        raise MissingFile(folder, f"reference folder not found: {folder}", "check --reference")
    out, bad, n = [], [], 0
    for path in list_images(folder):
        if limit is not None and n >= limit:
            break
        try:
            with Image.open(path) as im:
                out.append(fid_resize(im, size))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            bad.append(os.path.basename(path))
            continue
        n += 1
        if len(out) == batch:
            yield np.stack(out)
            out = []
    if out:
        yield np.stack(out)
    if n == 0:
        raise _no_image(folder, bad)


def load_reference_images(folder: str, size: int, limit: int | None = None) -> np.ndarray:
    """``uint8 [N, size, size, 3]``: all of :func:`iter_reference_images` at once."""
    return np.concatenate(list(iter_reference_images(folder, size, limit=limit)))


def load_inception_stats(path: str) -> InceptionStats:
    """``mu``/``sigma`` of a pytorch-fid / clean-fid ``.npz``. Raises DataError naming the keys found."""
    if not os.path.isfile(path):
        raise MissingFile(path, f"reference statistics not found: {path}", "check --reference")
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{path} is not a readable .npz ({e})") from None
    with z:
        if not {"mu", "sigma"} <= set(z.files):
            raise DataError(f"{path} has keys {sorted(z.files)}; Inception statistics need 'mu' and 'sigma' "
                            "(as pytorch-fid --save-stats and clean-fid write them)")
        mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise DataError(f"{path}: mu {mu.shape} and sigma {sigma.shape} must be [D] and [D, D]")
    return InceptionStats(mu, sigma)


class FileSource:
    """The user's prompt file and optional reference (module docstring).

    Args:
      prompts: the prompt file.
      reference: a folder of images, or an ``.npz`` with ``mu``/``sigma``; None: no reference.
      seed: seed of the split permutation.
      calibration, evaluation: fractions of the caption groups in those splits (train gets the rest).
      caption_column: the caption column of a ``.jsonl``/``.csv`` (default: the first of
        :data:`CAPTION_COLUMNS` present).
    """

    def __init__(self, prompts: str, reference: str | None = None, seed: int = 0, calibration: float = 0.125,
                 evaluation: float = 0.25, caption_column: str | None = None):
        self.path, self.reference, self.seed = prompts, reference, seed
        self.fractions = (calibration, evaluation)
        rows = read_captions(prompts, caption_column)
        stem = os.path.splitext(os.path.basename(prompts))[0]
        self._all = [Prompt(f"{stem}-{i:05d}", text) for i, (_, text) in enumerate(rows)]
        self._splits = split_groups([g for g, _ in rows], seed, calibration, evaluation)
        self._stats = None
        if reference is not None:
            if os.path.isdir(reference):
                _check_readable(reference)
            elif reference.lower().endswith(".npz"):
                self._stats = load_inception_stats(reference)
            elif not os.path.exists(reference):
                raise MissingFile(reference, f"reference not found: {reference}", "check --reference")
            else:
                raise DataError(f"--reference must be a folder of images or an .npz of Inception statistics "
                                f"(mu, sigma); got the file {reference}")

    def prompts(self, split: str) -> list[Prompt]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return [self._all[i] for i in self._splits[split]]

    def reference_batches(self, size: int, batch: int = 64, limit: int | None = None) -> Iterator[np.ndarray] | None:
        if self.reference is None or self._stats is not None:
            return None
        return iter_reference_images(self.reference, size, batch, limit)

    def reference_images(self, size: int, limit: int | None = None) -> np.ndarray | None:
        return _all(self.reference_batches(size, limit=limit))

    def reference_stats(self) -> InceptionStats | None:
        return self._stats

    def scorers(self) -> dict[str, Scorer]:
        return {}

    def describe(self) -> dict:
        ref = None
        if self.reference is not None:
            ref = {"path": os.path.abspath(self.reference)}
            if os.path.isfile(self.reference):
                ref["sha256"] = _sha(self.reference)
            else:
                files = list_images(self.reference)
                ref["files"] = len(files)
                ref["names_sha256"] = hashlib.sha256(
                    "\n".join(os.path.relpath(p, self.reference) for p in files).encode()).hexdigest()[:16]
        return {"kind": "files", "prompts": os.path.abspath(self.path), "prompts_sha256": _sha(self.path),
                "seed": self.seed, "fractions": list(self.fractions),
                "sizes": {s: len(self._splits[s]) for s in SPLITS}, "reference": ref}


# ----------------------------------------------------------------------------------------------
# Procedural scenes (the embedded model's world)


class SceneSource:
    """The procedural scenes' fixed prompt sets (:func:`qlip_jax.data.scenes.prompt_set`; they do not
    depend on a seed), the rendered evaluation scenes as reference, and the scene parser's alignment."""

    def __init__(self, parser_dir: str | None = None):
        self.parser_dir = parser_dir
        self._parser = None

    def prompts(self, split: str):
        from qlip_jax.data.scenes import prompt_set

        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return prompt_set(split)

    def reference_batches(self, size: int, batch: int = 64, limit: int | None = None) -> Iterator[np.ndarray]:
        """The evaluation prompts' own scenes, rendered at ``size``."""
        from qlip_jax.data.scenes import render, scene_of

        records = self.prompts("eval")[:limit]
        for s in range(0, len(records), batch):
            yield np.stack([render(scene_of(r), size) for r in records[s:s + batch]])

    def reference_images(self, size: int, limit: int | None = None) -> np.ndarray:
        return _all(self.reference_batches(size, limit=limit))

    def reference_stats(self) -> None:
        return None

    def scorers(self) -> dict[str, Scorer]:
        """``alignment``: the fraction of each caption's stated attributes the scene parser finds.

        The parser lives in the metrics layer; it is imported here, when a scorer is asked for, so that
        importing the data layer never pulls in the metrics."""
        def alignment(images: np.ndarray, prompts: Sequence) -> np.ndarray:
            from qlip_jax.metrics.scoring import alignment as align

            if self._parser is None:
                from qlip_jax.metrics.parser import SceneParser

                self._parser = SceneParser.load(self.parser_dir or _default_parser_dir())
            return align(self._parser, list(prompts), images)

        return {"alignment": alignment}

    def describe(self) -> dict:
        from qlip_jax.data.scenes import DATA_VERSION

        return {"kind": "scenes", "version": DATA_VERSION}


def _all(batches: Iterator[np.ndarray] | None) -> np.ndarray | None:
    return None if batches is None else np.concatenate(list(batches))


def _default_parser_dir() -> str:
    from qlip_jax.assets import ASSETS

    return os.path.join(ASSETS, "scene-parser")


def open_source(prompts: str | None = None, reference: str | None = None, seed: int = 0,
                caption_column: str | None = None) -> DataSource:
    """``--prompts``/``--reference`` -> a source: a :class:`FileSource`, or the scenes without a prompt
    file (a reference without prompts is refused: it would be compared against scene prompts)."""
    if prompts is None:
        if reference is not None:
            raise BadArgument("--reference needs --prompts (the captions the reference images go with)",
                              "pass --prompts FILE with the captions, or leave --reference out")
        return SceneSource()
    return FileSource(prompts, reference, seed, caption_column=caption_column)


def add_source_arguments(parser, reference: bool = True) -> None:
    """The data options every program shares: ``--prompts FILE``, ``--caption-column``, ``--data-seed`` and
    (unless ``reference=False``) ``--reference DIR|FILE.npz``."""
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="prompt file: .txt (one caption a line), .jsonl/.csv (caption column), COCO "
                             "captions .json; split into train/calibration/eval by --data-seed (default: the "
                             "embedded model's procedural scene prompts)")
    parser.add_argument("--caption-column", default=None,
                        help=f"caption column of a .jsonl/.csv --prompts (default: {', '.join(CAPTION_COLUMNS)})")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the split of --prompts")
    if reference:
        parser.add_argument("--reference", default=None, metavar="DIR|NPZ",
                            help="reference images (a folder, any sizes) or Inception statistics (.npz with "
                                 "mu, sigma) for --prompts")


def source_from_args(args) -> DataSource:
    """The source named by :func:`add_source_arguments`' options."""
    return open_source(args.prompts, getattr(args, "reference", None), args.data_seed, args.caption_column)
