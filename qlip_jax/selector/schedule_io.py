"""Export and import one prompt's bit schedule, as hand-editable JSON or as a ``.npy`` of indices.

JSON layout (activation *bits*, not candidate indices, so it can be read and edited by hand)::

    {
     "prompt": "a red bicycle leaning on a wall",
     "layer_names": ["conv_in", "down_blocks.0.resnets.0.conv1", ...],
     "act_bits": [6, 8, 10],
     "steps": 25,
     "schedule": [
      [8, 8, 10, "fp", ...],        <- step 0: one entry per layer, in "layer_names" order
      ...
     ]
    }

Each entry is one of the QuantConfig's activation widths or ``"fp"`` (the full-precision candidate,
index ``K``). ``"act_bits"`` records the candidates of the exporting config for the reader; on import
the entries are checked against the *importing* config (a width it lacks is an error), so a schedule
only using widths common to two configs moves between them. ``"layer_names"`` may be reordered or
come from a hand edit; import maps every column to the registry's order and requires exactly the
registry's layers (unknown, missing or repeated names are errors).

``.npy`` layout: int32 candidate indices ``[T, L]`` (or ``[B, T, L]``), registry order; no names, so
import checks the layer count, the step count and the index range.

Every import failure raises :class:`ScheduleError` or :class:`~qlip_jax.errors.BadFile` (both
``ValueError``) saying what is wrong and where (step, layer name).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from qlip_jax.atomic import atomic_write
from qlip_jax.errors import BadFile, MissingFile, QlipInputError
from qlip_jax.quant.state import QuantConfig, check_indices


class ScheduleError(QlipInputError, ValueError):
    """A schedule (JSON object or array) that does not fit the model, quantizer or sampler."""


def _names(registry_or_names: Any) -> tuple[str, ...]:
    """Layer names of a :class:`~qlip_jax.quant.registry.Registry` or of a sequence of names."""
    names = getattr(registry_or_names, "names", registry_or_names)
    return tuple(str(n) for n in names)


def _bits_label(index: int, config: QuantConfig):
    return "fp" if index == config.fp_index else int(config.act_bits[index])


def schedule_to_json(schedule, registry_or_names, config: QuantConfig, prompt: str | None = None) -> dict:
    """The JSON object of one prompt's schedule.

    Args:
      schedule: int ``[T, L]`` candidate indices (``[1, T, L]`` is accepted too), registry order.
      registry_or_names: the registry (or its ``names``) whose order the columns follow.
      config: the QuantConfig the indices refer to.
      prompt: the prompt text (stored as is; may be None).
    """
    names = _names(registry_or_names)
    sched = np.asarray(schedule)
    if sched.ndim == 3 and sched.shape[0] == 1:
        sched = sched[0]
    if sched.ndim != 2 or sched.shape[1] != len(names):
        raise ScheduleError(f"one prompt's schedule must have shape [T, L={len(names)}], got {np.shape(schedule)}")
    check_indices(sched, config)
    return {"prompt": prompt, "layer_names": list(names), "act_bits": list(config.act_bits),
            "steps": int(sched.shape[0]),
            "schedule": [[_bits_label(int(i), config) for i in row] for row in sched]}


def dumps_schedule(obj: dict) -> str:
    """JSON text with one line per step (readable and diff-friendly for hand edits)."""
    head = {k: v for k, v in obj.items() if k != "schedule"}
    lines = ["{"]
    for k, v in head.items():
        lines.append(f" {json.dumps(k)}: {json.dumps(v)},")
    rows = [f"  {json.dumps(row)}" for row in obj["schedule"]]
    lines.append(' "schedule": [')
    lines.append(",\n".join(rows))
    lines.append(" ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


def save_schedule_json(path: str | os.PathLike, schedule, registry_or_names, config: QuantConfig,
                       prompt: str | None = None) -> None:
    """Write :func:`schedule_to_json` to ``path``."""
    text = dumps_schedule(schedule_to_json(schedule, registry_or_names, config, prompt))
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def _entry_index(value, config: QuantConfig, where: str) -> int:
    if isinstance(value, str):
        if value.strip().lower() == "fp":
            return config.fp_index
        raise ScheduleError(f"{where}: entry {value!r} is not a bit width; use one of "
                         f"{list(config.act_bits)} or \"fp\"")
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and not value.is_integer())):
        raise ScheduleError(f"{where}: entry {value!r} is not a bit width; use one of "
                         f"{list(config.act_bits)} or \"fp\"")
    bits = int(value)
    if bits not in config.act_bits:
        raise ScheduleError(f"{where}: activation bit width {bits} is not a candidate of this quantizer; "
                         f"candidates are {list(config.act_bits)} and \"fp\"")
    return config.act_bits.index(bits)


def schedule_from_json(obj: dict, registry_or_names, config: QuantConfig,
                       num_steps: int | None = None) -> tuple[np.ndarray, str | None]:
    """Validate a schedule JSON object and turn it into candidate indices.

    Args:
      obj: the parsed JSON (see the module docstring).
      registry_or_names: the registry (or names) of the model it is to run on; the result follows
        its order.
      config: the QuantConfig whose candidates the bit widths must be.
      num_steps: the sampler's step count, if it must match (else ``obj["steps"]`` is used).
    Returns:
      ``(schedule int32 [T, L], prompt)``.
    Raises:
      ValueError naming the problem: missing key, unknown/missing/repeated layer, wrong step count,
      ragged row, or a bit width that is not a candidate.
    """
    if not isinstance(obj, dict):
        raise ScheduleError(f"a schedule JSON must be an object, got {type(obj).__name__}")
    missing = [k for k in ("layer_names", "steps", "schedule") if k not in obj]
    if missing:
        raise ScheduleError(f"schedule JSON lacks key(s) {missing}")
    names = _names(registry_or_names)
    file_names = obj["layer_names"]
    if not isinstance(file_names, list) or not all(isinstance(n, str) for n in file_names):
        raise ScheduleError("\"layer_names\" must be a list of layer-name strings")
    unknown = [n for n in file_names if n not in names]
    if unknown:
        raise ScheduleError(f"unknown layer(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''}: not quantized "
                         f"layers of this model (it has {len(names)} layers, e.g. {list(names[:3])})")
    seen: set[str] = set()
    repeated = [n for n in file_names if n in seen or seen.add(n)]
    if repeated:
        raise ScheduleError(f"layer(s) {repeated[:5]} listed more than once in \"layer_names\"")
    absent = [n for n in names if n not in seen]
    if absent:
        raise ScheduleError(f"schedule JSON has no column for layer(s) {absent[:5]}"
                         f"{' ...' if len(absent) > 5 else ''} ({len(absent)} missing); every quantized "
                         "layer needs a bit width per step")

    steps = obj["steps"]
    rows = obj["schedule"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ScheduleError(f"\"steps\" must be a positive integer, got {steps!r}")
    if not isinstance(rows, list):
        raise ScheduleError("\"schedule\" must be a list of per-step lists")
    if len(rows) != steps:
        raise ScheduleError(f"wrong step count: \"steps\" says {steps} but \"schedule\" has {len(rows)} rows")
    if num_steps is not None and steps != int(num_steps):
        raise ScheduleError(f"wrong step count: the schedule has {steps} steps, the sampler runs {num_steps}")

    column = np.asarray([names.index(n) for n in file_names], np.int64)   # file column -> registry column
    out = np.empty((steps, len(names)), np.int32)
    for t, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(file_names):
            got = len(row) if isinstance(row, list) else type(row).__name__
            raise ScheduleError(f"step {t}: expected a list of {len(file_names)} bit widths (one per layer), "
                             f"got {got}")
        for j, value in enumerate(row):
            out[t, column[j]] = _entry_index(value, config, f"step {t}, layer '{file_names[j]}'")
    return out, obj.get("prompt")


def load_schedule_json(path: str | os.PathLike, registry_or_names, config: QuantConfig,
                       num_steps: int | None = None) -> tuple[np.ndarray, str | None]:
    """Read and validate a schedule JSON file: ``(schedule int32 [T, L], prompt)``
    (see :func:`schedule_from_json`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFile(path, f"schedule file not found: {path}", "check the path")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadFile(path, f"not valid JSON ({e})", "fix or re-export the schedule") from None
    try:
        return schedule_from_json(obj, registry_or_names, config, num_steps)
    except QlipInputError as e:
        raise BadFile(path, str(e), "see qlip_jax/selector/schedule_io.py for the layout") from None


def save_schedule_npy(path: str | os.PathLike, schedule, config: QuantConfig | None = None) -> None:
    """Write candidate indices ``[T, L]`` or ``[B, T, L]`` as int32 ``.npy`` (checked against
    ``config`` if given)."""
    arr = np.asarray(schedule)
    if arr.ndim not in (2, 3):
        raise ScheduleError(f"a schedule must have shape [T, L] or [B, T, L], got {arr.shape}")
    if config is not None:
        check_indices(arr, config)
    with atomic_write(path) as tmp:
        np.save(tmp, arr.astype(np.int32))


def read_schedule_npy(path: str | os.PathLike, batch: int | None = None,
                      num_candidates: int | None = None) -> np.ndarray:
    """The file-level checks of a ``.npy`` schedule, possible before any model is loaded: a readable
    ``.npy`` (no pickles) of integer candidate indices ``[T, L]`` or ``[B|1, T, L]``, ``B == batch`` if
    given, every index in ``[0, num_candidates]`` (``num_candidates`` = K, index K = full precision).

    Returns the int32 array; raises :class:`~qlip_jax.errors.BadFile` naming ``path`` and the problem.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFile(path, f"schedule file not found: {path}", "check the path")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise BadFile(path, f"not a readable .npy array ({e})",
                      "write schedules with numpy.save (integer candidate indices [T, L] or [B, T, L])") from None
    if not isinstance(arr, np.ndarray) or arr.ndim not in (2, 3):
        raise BadFile(path, f"a schedule must have shape [T, L] or [B, T, L], got {np.shape(arr)}",
                      "save one [T, L] array for every prompt or one [B, T, L] row per prompt")
    if not np.issubdtype(arr.dtype, np.integer):
        raise BadFile(path, f"schedule entries must be integer candidate indices, got dtype {arr.dtype}",
                      "save it with .astype(numpy.int32)")
    if batch is not None and arr.ndim == 3 and arr.shape[0] not in (1, batch):
        raise BadFile(path, f"the schedule has {arr.shape[0]} rows [B, T, L] for {batch} prompt(s)",
                      "give one row per prompt, or a single [T, L] / [1, T, L] schedule for all")
    if num_candidates is not None and arr.size and (arr.min() < 0 or arr.max() > num_candidates):
        bad = arr[(arr < 0) | (arr > num_candidates)].ravel()[:5].tolist()
        raise BadFile(path, f"bit index out of the candidate set: found {bad}",
                      f"valid indices are 0..{num_candidates} ({num_candidates} = full precision)")
    return arr.astype(np.int32)


def load_schedule_npy(path: str | os.PathLike, registry_or_names: Any, config: QuantConfig,
                      num_steps: int | None = None, batch: int | None = None) -> np.ndarray:
    """Read int32 candidate indices ``[T, L]`` or ``[B, T, L]`` and validate them against the model
    (:func:`read_schedule_npy`, then layer count, step count and ``config``'s candidates).

    ``registry_or_names`` may also be the layer count ``L`` (an int). With ``batch``, the result is
    broadcast to ``[batch, T, L]``.
    """
    arr = read_schedule_npy(path, batch, config.fp_index)
    num_layers = registry_or_names if isinstance(registry_or_names, int) else len(_names(registry_or_names))
    if arr.shape[-1] != num_layers:
        raise BadFile(os.fspath(path), f"the schedule has {arr.shape[-1]} layer columns, the model has "
                      f"{num_layers} quantized layers", "export a schedule for this model")
    if num_steps is not None and arr.shape[-2] != int(num_steps):
        raise BadFile(os.fspath(path), f"wrong step count: the schedule has {arr.shape[-2]} steps, the "
                      f"sampler runs {num_steps}", f"sample with --steps {arr.shape[-2]} or export a new schedule")
    if batch is not None:
        arr = np.broadcast_to(arr, (batch, *arr.shape[-2:]))
    return arr


__all__ = [
    "dumps_schedule", "load_schedule_json", "load_schedule_npy", "read_schedule_npy", "save_schedule_json", "save_schedule_npy",
    "schedule_from_json", "schedule_to_json",
]
