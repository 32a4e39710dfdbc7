"""Orbax checkpointing with JSON metadata, and EMA.

A training state is any pytree of arrays (params, optimizer state, EMA params, step, PRNG key data).
:class:`Checkpointer` saves it together with a JSON ``meta`` dict (config, data version, what the
state belongs to) through an ``orbax.checkpoint.CheckpointManager``, and restores it into the
structure of a template state, so a run interrupted at any point resumes from its last save with
an identical state.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    """Keeps the last ``max_to_keep`` saves of a training state under ``directory``."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict | None = None) -> None:
        """Save ``state`` (pytree) and ``meta`` (JSON-able) at ``step``; blocks until written."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})))
        self.manager.wait_until_finished()

    def restore(self, template=None, step: int | None = None):
        """``(state, meta)`` of ``step`` (default: latest) in the structure/dtypes of ``template``
        (or as saved, as NumPy arrays, without one)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = None if template is None else jax.tree.map(
            lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), template)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def ema_update(ema, params, decay: float):
    """``ema <- decay * ema + (1 - decay) * params`` leaf by leaf."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
