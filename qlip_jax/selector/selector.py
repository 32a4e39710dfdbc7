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
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from qlip_jax.atomic import atomic_dir, write_json
from qlip_jax.errors import BadFile, MismatchError, MissingFile, describe
from qlip_jax.models.io import flat_leaves, load_safetensors_file, read_json, require_fields, write_safetensors
from qlip_jax.ptq.persist import load_quant_setup, model_fingerprint
from qlip_jax.quant.state import QuantSetup
from qlip_jax.selector.q2b import Q2B, Q2BConfig, hard_indices
from qlip_jax.selector.t2q import T2Q


def _save_tree(path: str, tree) -> None:
    write_safetensors({"/".join(k): np.asarray(v, np.float32) for k, v in flat_leaves(tree).items()}, path, {})


def _load_tree(path: str) -> dict:
    tree: dict = {}
    for key, value in load_safetensors_file(path).items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value  # NumPy: the jitted selector takes it as is (no per-shape device transfer compile)
    return tree


class Selector:
    """T2Q and Q2B modules with their params, and the :class:`QuantSetup` whose candidates Q2B picks."""

    def __init__(self, t2q: T2Q, t2q_params, q2b: Q2B, q2b_params, quant: QuantSetup, pooling: str = "eos",
                 info: dict | None = None):
        if q2b.config.num_layers != len(quant.registry):
            raise MismatchError(f"Q2B was built for {q2b.config.num_layers} layers, the quantizer has "
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

    def steps_note(self, num_steps: int) -> str | None:
        """A one-line note when the selector was trained for another sampler step count than
        ``num_steps`` (it still works: Q2B's step groups are laid over the new count), else None."""
        trained = (self.info.get("sampler") or {}).get("steps")
        if trained is None or int(trained) == int(num_steps):
            return None
        return (f"note: this selector was trained for {trained} sampler steps and is used at {num_steps}: its "
                f"schedules were not trained for that count (train_selector.py --steps {num_steps} trains one)")

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
        write_json(os.path.join(folder, "selector.json"), meta, indent=1)
        if quant_dir is not None:
            dst = os.path.join(folder, "quant")
            if os.path.abspath(quant_dir) != os.path.abspath(dst):
                with atomic_dir(dst) as tmp:
                    shutil.copytree(quant_dir, tmp, dirs_exist_ok=True)

    @staticmethod
    def read_meta(folder: str) -> dict:
        """The checked ``selector.json`` of ``folder`` (no model needed: callers check it before loading one)."""
        path = os.path.join(folder, "selector.json")
        if not os.path.isfile(path):
            raise MissingFile(folder, f"no selector at {folder} (no selector.json)",
                              "train one with train/train_selector.py")
        meta = require_fields(read_json(path), ("t2q", "q2b", "pooling", "info"), path)
        require_fields(meta["t2q"], ("hidden",), path, " under \"t2q\"")
        if meta["pooling"] not in ("eos", "mean"):
            raise BadFile(path, f"\"pooling\" must be \"eos\" or \"mean\", got {meta['pooling']!r}",
                          "restore the file or train the selector again")
        return meta

    @classmethod
    def load(cls, folder: str, sd) -> "Selector":
        """Load for the model ``sd`` (a :class:`~qlip_jax.models.sd.StableDiffusion`); the quantizer
        state must have been calibrated for it."""
        meta = cls.read_meta(folder)
        path = os.path.join(folder, "selector.json")
        fingerprint = model_fingerprint(sd.configs.unet, sd.params["unet"])
        trained_on = meta["info"].get("model_fingerprint")
        if trained_on is not None and trained_on != fingerprint:
            raise MismatchError(f"the selector in {folder} was trained on another model (fingerprint "
                                f"{str(trained_on)[:12]}, this model is {fingerprint[:12]})",
                                "train a selector for this --model with train/train_selector.py")
        try:
            q2b_config = Q2BConfig(**meta["q2b"])
        except TypeError as e:
            raise BadFile(path, f"invalid \"q2b\" config ({describe(e)})",
                          "restore the file or train the selector again") from e
        t2q_params = _load_tree(os.path.join(folder, "t2q.safetensors"))
        q2b_params = _load_tree(os.path.join(folder, "q2b.safetensors"))
        quant, _ = load_quant_setup(os.path.join(folder, "quant"), fingerprint, sd.params["unet"])
        return cls(T2Q(hidden=meta["t2q"]["hidden"]), t2q_params, Q2B(q2b_config), q2b_params, quant,
                   meta["pooling"], meta["info"])
