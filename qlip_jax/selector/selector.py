"""A trained QLIP selector: T2Q + Q2B + the quantizer state they were trained on, saved as a folder.

``Selector.schedule(pipe, emb)`` turns encoded prompts into the ``[B, T, L]`` candidate-index array the
jitted sampler consumes (T2Q reads the pooled text embedding, Q2B maps the predicted quality to a
layer x step map; the whole map is known before denoising starts). The step count of ``pipe`` may
differ from training: Q2B resamples its step groups.

Folder layout: ``selector.json`` (configs, training record), ``t2q.safetensors``, ``q2b.safetensors``,
``quant/`` (the orbax quantizer state, tagged with its model; loading refuses another model).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from qlip_jax.models.io import flat_leaves
from qlip_jax.quant.persist import load_quant_setup, model_fingerprint
from qlip_jax.quant.state import QuantSetup
from qlip_jax.selector.q2b import Q2B, Q2BConfig, hard_indices
from qlip_jax.selector.t2q import T2Q


def _save_tree(path: str, tree) -> None:
    save_file({"/".join(k): np.asarray(v, np.float32) for k, v in flat_leaves(tree).items()}, path)


def _load_tree(path: str) -> dict:
    tree: dict = {}
    for key, value in load_file(path).items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value)
    return tree


class Selector:
    """T2Q and Q2B modules with their params, and the :class:`QuantSetup` whose candidates Q2B picks."""

    def __init__(self, t2q: T2Q, t2q_params, q2b: Q2B, q2b_params, quant: QuantSetup, pooling: str = "eos",
                 info: dict | None = None):
        if q2b.config.num_layers != len(quant.registry):
            raise ValueError(f"Q2B was built for {q2b.config.num_layers} layers, the quantizer has "
                             f"{len(quant.registry)}")
        self.t2q, self.t2q_params, self.q2b, self.q2b_params = t2q, t2q_params, q2b, q2b_params
        self.quant, self.pooling, self.info = quant, pooling, dict(info or {})
        self._select = jax.jit(self._select_impl, static_argnames="num_steps")

    def _select_impl(self, t2q_params, q2b_params, pooled, num_steps):
        q = self.t2q.apply({"params": t2q_params}, pooled)
        probs = self.q2b.apply({"params": q2b_params}, q, num_steps)
        return q, hard_indices(probs, self.q2b.config)

    def pooled(self, emb) -> jax.Array:
        """``[B, D]`` text embedding T2Q reads, from :class:`~qlip_jax.sampling.pipeline.TextEmbeddings`."""
        return emb.pooled if self.pooling == "eos" else jnp.mean(emb.cond, axis=1)

    def predict(self, pipe, emb) -> tuple[np.ndarray, np.ndarray]:
        """``(q [B] predicted quality, schedule int32 [B, T, L])`` for ``pipe``'s step count."""
        q, sched = self._select(self.t2q_params, self.q2b_params, self.pooled(emb), pipe.num_steps)
        return np.asarray(q), np.asarray(sched, np.int32)

    def schedule(self, pipe, emb) -> np.ndarray:
        """int32 ``[B, T, L]`` schedule for encoded prompts ``emb``."""
        return self.predict(pipe, emb)[1]

    # ------------------------------------------------------------------------------------------
    def save(self, folder: str, info: dict | None = None, quant_dir: str | None = None) -> None:
        """Write the folder; ``quant_dir`` is the saved quantizer state to copy in (``quant/``)."""
        os.makedirs(folder, exist_ok=True)
        _save_tree(os.path.join(folder, "t2q.safetensors"), self.t2q_params)
        _save_tree(os.path.join(folder, "q2b.safetensors"), self.q2b_params)
        meta = {"t2q": {"hidden": self.t2q.hidden}, "q2b": dataclasses.asdict(self.q2b.config),
                "pooling": self.pooling, "info": {**self.info, **(info or {})}}
        with open(os.path.join(folder, "selector.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if quant_dir is not None:
            dst = os.path.join(folder, "quant")
            if os.path.abspath(quant_dir) != os.path.abspath(dst):
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(quant_dir, dst)

    @classmethod
    def load(cls, folder: str, sd) -> "Selector":
        """Load for the model ``sd`` (a :class:`~qlip_jax.models.sd.StableDiffusion`); the quantizer
        state must have been calibrated for it."""
        path = os.path.join(folder, "selector.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no selector at {folder} (train one with train/train_selector.py)")
        with open(path) as f:
            meta = json.load(f)
        quant, _ = load_quant_setup(os.path.join(folder, "quant"),
                                    model_fingerprint(sd.configs.unet, sd.params["unet"]), sd.params["unet"])
        t2q = T2Q(hidden=meta["t2q"]["hidden"])
        q2b = Q2B(Q2BConfig(**meta["q2b"]))
        return cls(t2q, _load_tree(os.path.join(folder, "t2q.safetensors")), q2b,
                   _load_tree(os.path.join(folder, "q2b.safetensors")), quant, meta["pooling"], meta["info"])
