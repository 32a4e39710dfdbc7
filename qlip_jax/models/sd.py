"""A Stable Diffusion model folder (diffusers layout) as configs + param trees + tokenizer.

Reads and writes the folder a user has for SD v1.x (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``) with safetensors in PyTorch names and layouts; no
torch, no hub.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from qlip_jax.atomic import atomic_dir
from qlip_jax.errors import BadFile, MissingFile
from qlip_jax.models import io
from qlip_jax.models.clip import load_text_encoder, save_text_encoder
from qlip_jax.models.configs import CLIPTextConfig, UNetConfig, VAEConfig
from qlip_jax.models.unet import load_unet, save_unet
from qlip_jax.models.vae import load_vae, save_vae
from qlip_jax.sampling.schedulers import SchedulerConfig

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclasses.dataclass(frozen=True)
class SDConfigs:
    """Static configs of the four parts (hashable)."""

    unet: UNetConfig
    vae: VAEConfig
    text: CLIPTextConfig
    scheduler: SchedulerConfig


@dataclasses.dataclass
class StableDiffusion:
    """``params`` is ``{'unet': tree, 'vae': tree, 'text_encoder': tree}`` (float32 arrays)."""

    configs: SDConfigs
    params: dict
    tokenizer: object
    folder: str | None = None
    info: dict = dataclasses.field(default_factory=dict)


def load_stable_diffusion(folder: str, variant: str | None = None, unet_dtype=np.float32) -> StableDiffusion:
    """Load a diffusers-format SD folder. Errors name the missing part or offending file.

    ``variant`` (e.g. ``'fp16'``) reads every component's ``<weights>.<variant>.safetensors``; a
    component without them falls back to its plain files with a warning (as diffusers does), and a
    folder with no variant file at all is refused. Other pipeline entries of ``model_index.json``
    (``safety_checker``, ``feature_extractor``, ...) are ignored.

    ``unet_dtype``: dtype of the UNet params (None: as stored; programs computing in 16 bits pass None so
    a float16 folder is not copied to float32). The VAE and text encoder, which run in float32, are
    float32."""
    from qlip_jax.data.tokenizer import load_tokenizer

    if not os.path.isdir(folder):
        raise MissingFile(folder, f"model folder not found: {folder}",
                          "pass a diffusers-format Stable Diffusion folder")
    index = io.read_json(os.path.join(folder, "model_index.json"))
    missing = [c for c in COMPONENTS if c not in index or not os.path.isdir(os.path.join(folder, c))]
    if missing:
        raise BadFile(folder, f"lacks component(s) {missing}",
                      "a diffusers SD folder needs model_index.json and one sub-folder per component")
    stems = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
    if variant and not any(variant in io.variants_present(os.path.join(folder, c), s)
                           for c, s in stems.items()):
        raise MissingFile(folder, f"{folder}: no component has '{variant}' variant files (e.g. "
                          f"unet/diffusion_pytorch_model.{variant}.safetensors)",
                          "drop the variant (--variant) to load the plain files")
    unet_cfg, unet = load_unet(os.path.join(folder, "unet"), variant, unet_dtype)
    vae_cfg, vae = load_vae(os.path.join(folder, "vae"), variant)
    text_cfg, text = load_text_encoder(os.path.join(folder, "text_encoder"), variant)
    sched_cfg = SchedulerConfig.from_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
    tokenizer = load_tokenizer(os.path.join(folder, "tokenizer"))
    info_path = os.path.join(folder, "qlip_training.json")
    info = io.read_json(info_path) if os.path.isfile(info_path) else {}
    return StableDiffusion(SDConfigs(unet_cfg, vae_cfg, text_cfg, sched_cfg),
                           {"unet": unet, "vae": vae, "text_encoder": text}, tokenizer, folder, info)


def save_stable_diffusion(folder: str, sd: StableDiffusion, tokenizer_dir: str,
                          scheduler_class: str = "PNDMScheduler", dtype=np.float32) -> None:
    """Write a folder that both :func:`load_stable_diffusion` and diffusers'
    ``StableDiffusionPipeline.from_pretrained`` (with ``safety_checker=None``) load.

    ``dtype=np.float16`` halves the files (loading converts back to float32)."""
    os.makedirs(folder, exist_ok=True)
    save_unet(os.path.join(folder, "unet"), sd.configs.unet, sd.params["unet"], dtype)
    save_vae(os.path.join(folder, "vae"), sd.configs.vae, sd.params["vae"], dtype)
    save_text_encoder(os.path.join(folder, "text_encoder"), sd.configs.text, sd.params["text_encoder"],
                      dtype)
    tok_out = os.path.join(folder, "tokenizer")
    if os.path.abspath(tokenizer_dir) != os.path.abspath(tok_out):
        with atomic_dir(tok_out) as tmp:
            shutil.copytree(tokenizer_dir, tmp, dirs_exist_ok=True)
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    io.write_json(os.path.join(folder, "scheduler", "scheduler_config.json"),
                  {"_class_name": scheduler_class, **sd.configs.scheduler.to_dict()})
    io.write_json(os.path.join(folder, "model_index.json"), {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler_class], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False,
    })
    if sd.info:
        io.write_json(os.path.join(folder, "qlip_training.json"), sd.info)


def configs_from_dicts(d: dict) -> SDConfigs:
    """``{'unet', 'vae', 'text_encoder', 'scheduler'}`` config.json dicts -> :class:`SDConfigs`."""
    return SDConfigs(UNetConfig.from_dict(d["unet"]), VAEConfig.from_dict(d["vae"]),
                     CLIPTextConfig.from_dict(d["text_encoder"]), SchedulerConfig.from_dict(d["scheduler"]))


def init_params(configs: SDConfigs, key: jax.Array) -> dict:
    """Randomly initialised params of the three networks (Flax default initialisers).

    Each network's ``init`` runs as one jitted program: run op by op it compiled one small program per
    operation (580 for the ``tiny`` preset), which dominated the start of every test and pretraining run.
    The program runs once and is almost all random-number generation, so it is compiled without XLA's
    backend optimisations: on the ``tiny`` preset that took its compile from 55 s to 20 s on a loaded
    2-core machine (the optimised program differs in the last float32 bit of some values, not more).
    """
    from qlip_jax.models.clip import CLIPTextModel
    from qlip_jax.models.unet import UNet2DConditionModel
    from qlip_jax.models.vae import AutoencoderKL

    k_unet, k_vae, k_text = jax.random.split(key, 3)
    u, v, t = configs.unet, configs.vae, configs.text
    f = v.downsampling_factor

    def init(module, k, *example):
        fn = jax.jit(lambda k, *x: module.init(k, *x)["params"])
        if any(isinstance(a, jax.core.Tracer) for a in (k, *example)):   # inside eval_shape / jit: trace it
            return fn(k, *example)
        return fn.lower(k, *example).compile({"xla_backend_optimization_level": 0})(k, *example)

    unet = init(UNet2DConditionModel(u), k_unet, jnp.zeros((1, u.sample_size, u.sample_size, u.in_channels)),
                jnp.zeros((1,), jnp.int32), jnp.zeros((1, t.max_position_embeddings, t.hidden_size)))
    vae = init(AutoencoderKL(v), k_vae, jnp.zeros((1, f, f, v.in_channels)))
    text = init(CLIPTextModel(t), k_text, jnp.zeros((1, t.max_position_embeddings), jnp.int32))
    return {"unet": unet, "vae": vae, "text_encoder": text}
