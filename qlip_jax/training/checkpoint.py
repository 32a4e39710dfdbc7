"""Orbax checkpointing with JSON metadata, and EMA.

A training state is any pytree of arrays (params, optimizer state, EMA params, step, PRNG key data).
:class:`Checkpointer` saves it together with a JSON ``meta`` dict (config, data version, what the
state belongs to) through an ``orbax.checkpoint.CheckpointManager``, and restores it into the
structure of a template state, so a run interrupted at any point resumes from its last save with
an identical state.

Fallback: orbax writes a save to a temporary folder and renames it when complete, so an interrupted
save never becomes a step. A step that is there but cannot be read (a truncated or corrupted file)
is reported in one line on stderr, moved aside to ``<step>.unreadable`` (kept, never deleted) and the
newest readable step is restored instead; if no step is readable, :class:`~qlip_jax.errors.BadFile`
says so and nothing is moved or deleted.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from qlip_jax.errors import BadFile, MissingFile, describe


def _abstract(x):
    """Restore target of one leaf: a sharded ``jax.Array`` is restored with its sharding (each process
    reads its own shards; the template's mesh may differ from the one saved), anything else as NumPy."""
    if isinstance(x, jax.Array) and isinstance(x.sharding, jax.sharding.NamedSharding):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return np.zeros(np.shape(x), np.asarray(x).dtype)


def _global_or_host(x):
    """A leaf orbax can save from several processes: mesh-wide arrays as they are, host-local ones as NumPy."""
    if isinstance(x, jax.Array) and x.is_fully_addressable:
        return np.asarray(x)
    return x


class Checkpointer:
    """Keeps the last ``max_to_keep`` saves of a training state under ``directory``."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict | None = None) -> None:
        """Save ``state`` (pytree) and ``meta`` (JSON-able) at ``step``; blocks until written.

        Several processes: every one calls this; arrays split over the mesh are written shard by shard,
        values each process holds whole (host-local arrays, NumPy) are written once."""
        if jax.process_count() > 1:
            state = jax.tree.map(_global_or_host, state)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})))
        self.manager.wait_until_finished()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def _restore(self, step: int, template):
        abstract = self._as_saved(step) if template is None else jax.tree.map(_abstract, template)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def _as_saved(self, step: int):
        """NumPy restore targets in the saved shapes and dtypes, so a checkpoint written on any mesh (e.g.
        sharded over a pod) reads back whole on one process; None if its metadata cannot be read."""
        try:
            meta = ocp.StandardCheckpointer().metadata(os.path.join(self.directory, str(step), "state"))
        except Exception:  # noqa: BLE001 - then orbax restores as saved, or reports the problem itself
            return None
        tree = getattr(meta, "item_metadata", meta)
        return jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree,
                            is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))

    def restore(self, template=None, step: int | None = None):
        """``(state, meta)`` of ``step`` in the structure/dtypes of ``template`` (or as saved, as NumPy
        arrays, without one).

        Without ``step``: the newest READABLE step. Each newer step that fails to restore is named on
        stderr and moved aside to ``<step>.unreadable`` once a readable one is found (so the run can save
        that step again); if none is readable, :class:`BadFile` and nothing is moved.
        """
        if step is not None:
            return self._restore(step, template)
        steps = self.all_steps()
        if not steps:
            raise MissingFile(self.directory, f"no checkpoint in {self.directory}", "start a new run")
        failed: list[tuple[int, str]] = []
        for s in reversed(steps):
            try:
                out = self._restore(s, template)
            except Exception as e:  # orbax / tensorstore raise many types on truncated or corrupt files
                failed.append((s, describe(e, 160)))
                continue
            for bad, why in failed:
                print(f"[checkpoint] step {bad} in {self.directory} cannot be read ({why}); falling back to step "
                      f"{s} (the unreadable one is kept as {bad}.unreadable)", file=sys.stderr)
                self._set_aside(bad)
            if failed:
                self.manager.reload()
            return out
        raise BadFile(self.directory, f"no readable checkpoint: every step {steps} fails to load "
                      f"(latest: {failed[0][1]})", "nothing was deleted; restore the folder from a backup, or "
                      "give another work folder to start afresh")

    def _set_aside(self, step: int) -> None:
        src = os.path.join(self.directory, str(step))
        dst, k = src + ".unreadable", 1
        while os.path.exists(dst):
            dst, k = f"{src}.unreadable{k}", k + 1
        os.replace(src, dst)

    def restore_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise MissingFile(self.directory, f"no checkpoint in {self.directory}", "start a new run")
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def ema_update(ema, params, decay: float):
    """``ema <- decay * ema + (1 - decay) * params`` leaf by leaf."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
