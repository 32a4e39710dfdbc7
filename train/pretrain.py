"""Train the miniature Stable Diffusion from scratch on procedural captioned scenes, and export it.

    python train/pretrain.py --work runs/pretrain --out qlip_jax/assets/mini-sd

Stage 1 trains the VAE; its latents of the training scenes are then encoded once (posterior means)
and the scaling factor set to ``1 / std`` of them, as SD's 0.18215 was; stage 2 trains the UNet and
the CLIP text encoder jointly on those latents with 10 % caption dropout, keeping EMA weights.
Every stage checkpoints with orbax and resumes where it stopped (``--work`` holds the state);
the data of step ``s`` is a pure function of ``(seed, s)``, so a resumed run is the same run.
Sample grids of held-out prompts are written to ``<work>/samples`` every ``--sample-every`` steps.
The EMA model is exported as a diffusers folder (float16 tensors) with ``qlip_training.json``
recording how it was made.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from qlip_jax import compile_cache, distributed
from qlip_jax.atomic import atomic_write, check_writable_dir
from qlip_jax.data import scenes
from qlip_jax.data.tokenizer import convert_clip_bpe, find_clip_bpe, load_tokenizer
from qlip_jax.errors import BadArgument, MissingFile, check_finite, check_int, check_seed, program
from qlip_jax.models.clip import CLIPTextModel
from qlip_jax.models.configs import VAEConfig
from qlip_jax.models.presets import preset
from qlip_jax.models.sd import (SDConfigs, StableDiffusion, configs_from_dicts, init_params,
                                load_stable_diffusion, save_stable_diffusion)
from qlip_jax.models.unet import UNet2DConditionModel, default_attention_chunk, default_remat
from qlip_jax.programs import add_memory_arguments, micro_batch_for, settings_from_args
from qlip_jax.models.vae import AutoencoderKL, encode_images
from qlip_jax.sampling.grid import save_grid
from qlip_jax.sampling.pipeline import Text2Image
from qlip_jax.sampling.schedulers import SchedulerConfig
from qlip_jax.training import Checkpointer
from qlip_jax.training.diffusion import make_diffusion_step, make_vae_step


def seeds_in_chain(record: dict | None) -> set[int]:
    """The ``--seed`` of every diffusion run in a ``qlip_training.json`` record and its ``init_from`` chain."""
    seeds = set()
    while record:
        if record.get("diffusion_steps", 0) > 0 and "seed" in record:
            seeds.add(int(record["seed"]))
        record = (record.get("init_from") or {}).get("record")
    return seeds


def _schedule(lr: float, steps: int, warmup: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, max(1, steps // 10)), max(steps, 2),
                                              end_value=lr * 0.1)


def random_crops(images: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A ``size x size`` window of each image at a random position: ``images [B, H, W, C]`` ->
    ``(crops [B, size, size, C], offsets [B, 2])`` with offsets ``(y, x)`` of each window's top left."""
    b, h, w = images.shape[:3]
    offsets = np.stack([rng.integers(0, h - size + 1, b), rng.integers(0, w - size + 1, b)], axis=1)
    crops = np.stack([im[y:y + size, x:x + size] for im, (y, x) in zip(images, offsets)])
    return crops, offsets


def train_vae(args, configs: SDConfigs, params: dict, work: str, mesh=None) -> tuple[dict, int]:
    """Stage 1: ``(params, steps trained by this invocation)``. With ``--vae-crop`` each step sees a random
    window of each image (the VAE is convolutional; its mid-block attention sees a smaller grid)."""
    vae = AutoencoderKL(configs.vae)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(_schedule(args.vae_lr, args.vae_steps, 200)))
    state = {"params": params, "opt": tx.init(params), "step": jnp.int32(0)}
    if mesh is not None:  # the VAE is small: replicated, its batch split over the mesh
        state = distributed.put(state, distributed.replicated(mesh))
    ckpt = Checkpointer(os.path.join(work, "vae"))
    if ckpt.latest_step() is not None:
        state, _ = ckpt.restore(state)
        print(f"[pretrain] VAE: resumed at step {int(state['step'])}", file=sys.stderr)
    step_fn = make_vae_step(vae, tx, args.kl_weight)
    key = jax.random.key(args.seed)
    start = int(state["step"])
    bar = tqdm(range(start, args.vae_steps), desc="VAE", initial=start, total=args.vae_steps,
               disable=args.quiet)
    for s in bar:
        images, _, _ = scenes.training_batch(args.seed, s, args.vae_batch)
        if args.vae_crop:
            images, _ = random_crops(images, args.vae_crop, np.random.default_rng([args.seed, s, 0xC409]))
        x = _rows_on(mesh, images.astype(np.float32) / 127.5 - 1.0)
        state, metrics = step_fn(state, x, jax.random.fold_in(key, s))
        if (s + 1) % 50 == 0:
            bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", l1=f"{float(metrics['l1']):.4f}")
        if (s + 1) % args.ckpt_every == 0 or s + 1 == args.vae_steps:
            ckpt.save(s + 1, state, {"stage": "vae"})
    return state["params"], max(0, args.vae_steps - start)


def _rows_on(mesh, x: np.ndarray):
    """A batch ``[B, ...]`` split over the mesh's batch shards (as is without a mesh)."""
    if mesh is None:
        return x
    return distributed.put(x, jax.sharding.NamedSharding(mesh, distributed.batch_spec(mesh)))


def encode_training_latents(args, configs: SDConfigs, vae_params: dict, work: str) -> np.ndarray:
    """Posterior means ``[N, h, w, c]`` of the training scenes (cached in ``work``)."""
    path = os.path.join(work, f"latents_{args.num_scenes}.npy")
    if os.path.isfile(path):
        return np.load(path)
    latents = np.concatenate([
        encode_images(configs.vae, vae_params, images)
        for _, images in tqdm(scenes.iterate_train_images(256, args.num_scenes), desc="encode",
                              total=-(-args.num_scenes // 256), disable=args.quiet)])
    if distributed.is_main():
        with atomic_write(path) as tmp:
            np.save(tmp, latents)
    return latents


def object_weights(args, latent_shape: tuple[int, ...], work: str) -> np.ndarray | None:
    """Loss weights ``[N, h, w]`` of the training scenes' latent cells: ``1 + object_weight * coverage``,
    coverage = share of the cell's pixels an object covers (cached in ``work``); None when off."""
    if args.object_weight == 0:
        return None
    n, h, w = latent_shape[:3]
    path = os.path.join(work, f"coverage_{n}x{h}x{w}.npy")
    if os.path.isfile(path):
        coverage = np.load(path)
    else:
        if h != w:
            raise ValueError(f"the scenes are square; latents of {h}x{w} cells are not")
        seeds = scenes.split_seeds("train")
        coverage = np.stack([scenes.object_coverage(scenes.sample_scene(seeds[i]), cells=h)
                             for i in tqdm(range(n), desc="coverage", disable=args.quiet)])
        if distributed.is_main():
            with atomic_write(path) as tmp:
                np.save(tmp, coverage)
    return 1.0 + args.object_weight * coverage


def batch_weights(weights: np.ndarray | None, ids: np.ndarray, captions: list, dropped: np.ndarray,
                  captions_weighted: str, small_caption_weight: float = 1.0) -> np.ndarray | None:
    """The loss weights ``[B, h, w]`` of a batch of scenes ``ids [B]``.

    ``small_caption_weight``: every cell of a sample whose (kept) caption states a small or medium
    object is multiplied by it. It depends on the caption only, so it changes how much those captions
    count in a batch but not what the model should draw for them.

    ``captions_weighted="all"``: every sample's object weights. ``"exhaustive"``: only samples whose
    caption lists every object of the scene (levels 2-4, not dropped); the rest weigh 1 in every cell.
    Levels 0-1 name one object of several and an empty caption none, so there a weight that grows with
    object area tilts the learned images towards *more* objects; ``"exhaustive"`` leaves those samples
    alone. It does not make the weight harmless: the weight is per cell and depends on the clean image,
    so each cell's optimum is tilted towards "an object is here" on its own, and samples get objects at
    several places at once (measured in the README: extra objects at levels 3-4 too, whose captions
    state the one object's size and, at level 4, its place).
    """
    if weights is None:
        return None
    w, kept = weights[ids], ~np.asarray(dropped, bool)
    if captions_weighted == "exhaustive":
        exhaustive = np.array([c.exhaustive for c in captions]) & kept
        w = np.where(exhaustive[:, None, None], w, np.ones_like(w))
    if small_caption_weight != 1.0:
        small = np.array([any(o.size in ("small", "medium") for o in c.objects) for c in captions]) & kept
        w = w * np.where(small, small_caption_weight, 1.0).astype(w.dtype)[:, None, None]
    return w


def draw_scene_ids(rng: np.random.Generator, counts: np.ndarray, batch: int,
                   single_share: float | None) -> np.ndarray:
    """Indices ``[batch]`` into the encoded training scenes, whose object counts are ``counts [N]``.

    ``single_share`` None: uniform over the scenes (a quarter of them have one object). Otherwise each
    sample is a uniform single-object scene with that probability, else a uniform scene of 2-4 objects.
    """
    if single_share is None:
        return rng.integers(0, len(counts), batch)
    single, several = np.flatnonzero(counts == 1), np.flatnonzero(counts != 1)
    if not len(single) or not len(several):
        raise BadArgument(f"--single-object-share needs scenes of one object and of several among the "
                          f"{len(counts)} encoded ones; got {len(single)} and {len(several)}")
    pick = rng.random(batch) < single_share
    return np.where(pick, rng.choice(single, batch), rng.choice(several, batch))


def tokenize(tokenizer, texts: list[str], length: int) -> np.ndarray:
    return tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                     return_tensors="np")["input_ids"].astype(np.int32)


class GridSampler:
    """Periodic sample grids of the EMA weights, from one :class:`Text2Image` built at the first grid:
    its jitted sampler takes params as arguments, so later grids reuse the compiled loop instead of
    tracing and compiling a new one each time (mini-sd-s, 16 prompts: 10.4 s -> 3.5 s a grid)."""

    def __init__(self, configs: SDConfigs, tokenizer, prompts: list[str], guidance: float, mesh=None):
        self.configs, self.tokenizer, self.prompts, self.guidance = configs, tokenizer, prompts, guidance
        self.mesh = mesh
        self.sampler: Text2Image | None = None

    def __call__(self, params: dict, path: str) -> None:
        if self.sampler is None:
            self.sampler = Text2Image(StableDiffusion(self.configs, params, self.tokenizer), "ddim", 25,
                                      mesh=self.mesh)
        images = self.sampler.with_params(params).generate(self.prompts, seed=0, guidance=self.guidance)
        if distributed.is_main():
            save_grid(path, images, self.prompts, cols=len(self.prompts) // 2)


def train_diffusion(args, configs: SDConfigs, params: dict, latents: np.ndarray, tokenizer, work: str, mesh=None):
    latent_hw = latents.shape[1:3]
    unet = UNet2DConditionModel(configs.unet, dtype=jnp.dtype(args.dtype),
                                attention_chunk=(default_attention_chunk(latent_hw) if args.attention_chunk is None
                                                 else args.attention_chunk),
                                remat=default_remat(configs.unet) if args.remat is None else args.remat)
    text = CLIPTextModel(configs.text)
    settings = settings_from_args(args, pretrain_batch=args.batch)
    micro = micro_batch_for(args, configs, "pretraining", settings, lambda m: print(m, file=sys.stderr))
    trainable = {"unet": params["unet"], "text_encoder": params["text_encoder"]}
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(_schedule(args.lr, args.steps, 500), weight_decay=0.01))
    state = {"params": trainable, "opt": tx.init(trainable), "ema": trainable, "step": jnp.int32(0)}
    if mesh is not None:  # FSDP: params, Adam moments and EMA split on fsdp by shape (qlip_jax.distributed)
        state = distributed.put(state, distributed.param_shardings(state, mesh))
    ckpt = Checkpointer(os.path.join(work, "diffusion"))
    if ckpt.latest_step() is not None:
        state, _ = ckpt.restore(state)
        print(f"[pretrain] diffusion: resumed at step {int(state['step'])}", file=sys.stderr)
    weights = object_weights(args, latents.shape, work)
    if weights is None and args.small_caption_weight != 1.0:
        weights = np.ones(latents.shape[:3], np.float32)
    counts = scenes.train_object_counts(latents.shape[0]) if args.single_object_share is not None else None
    ac = jnp.asarray(configs.scheduler.alphas_cumprod(), jnp.float32)
    step_fn = make_diffusion_step(unet, text, tx, ac, args.ema_decay, args.min_snr_gamma or None,
                                  args.v_weighting, configs.scheduler.prediction_type, micro)
    key = jax.random.key(args.seed + 1)
    length = configs.text.max_position_embeddings
    grid = GridSampler(configs, tokenizer, [r.text for r in scenes.prompt_set("eval")[:16]], args.guidance, mesh)
    start = int(state["step"])
    end = args.steps if args.stop_at is None else min(args.steps, args.stop_at)
    if start > end:
        bound = "--stop-at" if args.stop_at is not None and args.stop_at < args.steps else "--steps"
        raise BadArgument(f"the diffusion checkpoint in {work} is at step {start}, past {bound} {end}",
                          f"give {bound} >= {start}, or another --work to start afresh")
    bar = tqdm(range(start, end), desc="UNet+text", initial=start, total=args.steps, disable=args.quiet)
    for s in bar:
        rng = np.random.default_rng([args.seed, s, 0xD1FF])
        ids = (rng.integers(0, latents.shape[0], args.batch) if counts is None else
               draw_scene_ids(rng, counts, args.batch, args.single_object_share))
        captions = scenes.random_captions(ids, rng)
        dropped = rng.random(args.batch) < args.cond_dropout
        texts = ["" if drop else c.text for c, drop in zip(captions, dropped)]
        x0 = latents[ids] * configs.vae.scaling_factor
        w = batch_weights(weights, ids, captions, dropped, args.object_weight_captions, args.small_caption_weight)
        state, metrics = step_fn(state, _rows_on(mesh, x0), _rows_on(mesh, tokenize(tokenizer, texts, length)),
                                 jax.random.fold_in(key, s), None if w is None else _rows_on(mesh, w))
        if (s + 1) % 50 == 0:
            bar.set_postfix(loss=f"{float(distributed.gather(metrics['loss'])):.4f}")
        if (s + 1) % args.ckpt_every == 0 or s + 1 == args.steps:
            ckpt.save(s + 1, state, {"stage": "diffusion"})
        if args.sample_every and ((s + 1) % args.sample_every == 0 or s + 1 == args.steps):
            grid({**state["ema"], "vae": params["vae"]}, os.path.join(work, "samples", f"step{s + 1:06d}.png"))
    return state["ema"], float(distributed.gather(metrics["loss"])) if end > start else None


def training_schedule(config: SchedulerConfig, args) -> SchedulerConfig:
    """The preset's scheduler config with ``--prediction-type`` and ``--zero-terminal-snr`` applied."""
    changes = {}
    if args.prediction_type is not None:
        changes["prediction_type"] = args.prediction_type
    if args.zero_terminal_snr:
        changes.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if not changes:
        return config
    return SchedulerConfig.from_dict({**config.to_dict(), **changes}, source="--prediction-type/--zero-terminal-snr")


def _wall_clock(work: str, seconds: float, trained: bool) -> dict:
    """Append this invocation's wall time to ``<work>/wall_clock.json`` if it trained a step (an invocation
    that only exports a checkpoint is not training time); the per-invocation list and total."""
    path = os.path.join(work, "wall_clock.json")
    runs = json.load(open(path)) if os.path.isfile(path) else []
    if trained:
        runs.append(round(seconds / 60, 1))
        with atomic_write(path, "w") as f:
            json.dump(runs, f)
    return {"invocations": runs, "total": round(sum(runs), 1)}


def _same_architecture(a, b) -> bool:
    """Configs equal up to the VAE's data-dependent ``scaling_factor``."""
    if hasattr(a, "scaling_factor"):
        a, b = dataclasses.replace(a, scaling_factor=1.0), dataclasses.replace(b, scaling_factor=1.0)
    return a == b


_PARTS = ("vae", "text_encoder", "unet")


@program
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="checkpoints, caches and sample grids")
    p.add_argument("--out", required=True, help="exported diffusers folder")
    p.add_argument("--preset", default="mini-sd")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-crop", type=int, default=0,
                   help="train the VAE on random square windows of this side instead of whole images (0: whole; "
                        "a multiple of the VAE's downsampling factor); a step costs about (crop / side)^2")
    p.add_argument("--kl-weight", type=float, default=1e-5)
    p.add_argument("--num-scenes", type=int, default=20000, help="training scenes encoded for stage 2")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--cond-dropout", type=float, default=0.1)
    p.add_argument("--single-object-share", type=float, default=None, metavar="P",
                   help="draw a single-object scene for this share of the diffusion stage's samples, a scene "
                        "of 2-4 objects for the rest (default: uniform over the scenes, about 0.25 single)")
    p.add_argument("--object-weight", type=float, default=0.0,
                   help="weight the diffusion loss of each latent cell by 1 + this x the share of its pixels "
                        "objects cover (0: plain mean; the shipped model was trained with 0)")
    p.add_argument("--object-weight-captions", choices=("all", "exhaustive"), default="all",
                   help="which samples --object-weight weights: all, or only those whose caption lists every "
                        "object (levels 2-4; the others weigh 1)")
    p.add_argument("--small-caption-weight", type=float, default=1.0,
                   help="weight of samples whose caption states a small or medium object, against 1 for the "
                        "rest (depends on the caption only, so it leaves the learned distribution alone)")
    p.add_argument("--min-snr-gamma", type=float, default=0.0,
                   help="Min-SNR-gamma loss weighting by timestep, min(SNR, gamma) / SNR (0: off; the shipped "
                        "model was trained without it)")
    p.add_argument("--v-weighting", action="store_true",
                   help="weight each sample's loss by (SNR + 1) / SNR (the v-prediction loss of the same "
                        "noise-predicting model: the noisiest steps, where the layout is decided from the "
                        "caption alone, count ~1/SNR times more); times Min-SNR's weight if both are on")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="what the UNet predicts (default: the preset's, epsilon for mini-sd); written to the "
                        "exported scheduler config")
    p.add_argument("--zero-terminal-snr", action="store_true",
                   help="rescale the noise schedule to zero terminal SNR and sample with 'trailing' timesteps "
                        "(Lin et al., 2024): the last training step sees pure noise, so the layout must come "
                        "from the caption; needs --prediction-type v_prediction")
    p.add_argument("--guidance", type=float, default=5.0, help="for the sample grids")
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--sample-every", type=int, default=1000)
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop (without exporting, unless --export-on-stop) once the diffusion stage reaches "
                        "this step, as an interruption would; a later run with the same arguments resumes")
    p.add_argument("--export-on-stop", action="store_true",
                   help="with --stop-at: export the EMA weights reached there to --out (recorded as "
                        "'stopped_at'), e.g. to evaluate a checkpoint of a longer run; resuming is unaffected")
    p.add_argument("--init-from", default=None,
                   help="an earlier export (diffusers folder): the starting point of every part whose "
                        "config matches the preset (VAE, text encoder, UNet) instead of a random init; "
                        "with --vae-steps 0 its VAE is reused as-is (stage 1 skipped)")
    p.add_argument("--init-parts", nargs="+", choices=_PARTS, default=list(_PARTS),
                   help="which parts --init-from starts (e.g. 'vae' alone: a fresh UNet and text encoder "
                        "on the earlier VAE)")
    p.add_argument("--quiet", action="store_true")
    add_memory_arguments(p, "latents per diffusion micro-batch (gradient accumulation)")
    distributed.add_mesh_argument(p)
    compile_cache.add_argument(p)
    args = p.parse_args(argv)
    distributed.initialize()  # several processes (JAX_NUM_PROCESSES / QLIP_DISTRIBUTED): join them first
    check_seed(args.seed, 2, uses="the diffusion stage draws from --seed + 1")
    for name in ("vae_steps", "steps", "sample_every"):
        check_int(getattr(args, name), "--" + name.replace("_", "-"), 0)
    for name in ("vae_batch", "batch", "num_scenes", "ckpt_every"):
        check_int(getattr(args, name), "--" + name.replace("_", "-"), 1)
    if args.stop_at is not None:
        check_int(args.stop_at, "--stop-at", 0)
    for name in ("vae_lr", "lr", "kl_weight", "guidance", "ema_decay", "cond_dropout"):
        check_finite(getattr(args, name), "--" + name.replace("_", "-"), lo=0.0)
    for name in ("ema_decay", "cond_dropout"):
        if getattr(args, name) > 1:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if args.init_from is not None and not os.path.isdir(args.init_from):
        raise MissingFile(args.init_from, f"--init-from folder not found: {args.init_from}",
                          "pass an earlier export of this program")
    check_writable_dir(args.work, "--work")
    check_writable_dir(args.out)
    compile_cache.from_args(args)
    for name in ("object_weight", "min_snr_gamma"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.single_object_share is not None and not 0 < args.single_object_share < 1:
        p.error(f"--single-object-share must be strictly between 0 and 1, got {args.single_object_share}")
    if args.small_caption_weight <= 0:
        p.error(f"--small-caption-weight must be > 0, got {args.small_caption_weight}")
    if args.zero_terminal_snr and args.prediction_type != "v_prediction":
        p.error("--zero-terminal-snr needs --prediction-type v_prediction (at zero SNR the noise is the "
                "input itself, so an epsilon prediction says nothing about the image)")
    if args.v_weighting and args.prediction_type == "v_prediction":
        p.error("--v-weighting gives an epsilon model v-prediction's loss; with --prediction-type "
                "v_prediction the loss is that already")
    if args.export_on_stop and args.stop_at is None:
        p.error("--export-on-stop exports where --stop-at stops; give --stop-at")
    if args.vae_crop:
        vae_config = VAEConfig.from_dict(preset(args.preset)["vae"], source=f"preset '{args.preset}'")
        if (why := vae_config.window_error(args.vae_crop)):
            p.error(f"--vae-crop: {why}")
    if args.object_weight_captions != "all" and args.object_weight == 0:
        p.error("--object-weight-captions chooses which samples --object-weight weights; "
                "give --object-weight > 0 with it")

    mesh = distributed.mesh_from_arg(args.mesh)
    distributed.check_rows(args.batch, mesh, "--batch")
    if args.vae_steps > 0:
        distributed.check_rows(args.vae_batch, mesh, "--vae-batch")
    t0 = time.time()
    os.makedirs(args.work, exist_ok=True)
    tok_dir = os.path.join(args.work, "tokenizer")
    if distributed.is_main() and not os.path.isfile(os.path.join(tok_dir, "vocab.json")):
        convert_clip_bpe(find_clip_bpe(), tok_dir)
    distributed.barrier("tokenizer")
    tokenizer = load_tokenizer(tok_dir)
    configs = configs_from_dicts(preset(args.preset))
    configs = dataclasses.replace(configs, scheduler=training_schedule(configs.scheduler, args))
    params = init_params(configs, jax.random.key(args.seed))

    earlier, started_from = None, {}
    if args.init_from:
        earlier = load_stable_diffusion(args.init_from)
        for part, mine, theirs in (("vae", configs.vae, earlier.configs.vae),
                                   ("text_encoder", configs.text, earlier.configs.text),
                                   ("unet", configs.unet, earlier.configs.unet)):
            if part in args.init_parts and _same_architecture(mine, theirs):
                params[part] = earlier.params[part]
                started_from[part] = args.init_from
        if "vae" not in started_from and args.vae_steps == 0:
            why = ("--init-parts leaves it out" if "vae" not in args.init_parts else
                   f"{args.init_from} has another VAE architecture than preset '{args.preset}'")
            raise BadArgument(f"--vae-steps 0 reuses the VAE of --init-from, but {why}",
                              "give --vae-steps > 0 or --init-parts with vae")
        print(f"[pretrain] starting from {args.init_from}: {sorted(started_from)}", file=sys.stderr)
        used = seeds_in_chain(earlier.info)
        if args.steps > 0 and args.seed in used:
            print(f"[pretrain] warning: {args.init_from} was trained (it or a run it continues) with --seed "
                  f"{args.seed}; a step's batch, timesteps and noise depend only on (seed, step), so this run "
                  f"draws the same ones as that run's first steps. A --seed not in {sorted(used)} gives fresh "
                  f"ones.", file=sys.stderr)
    vae_trained = 0
    if args.vae_steps > 0:
        params["vae"], vae_trained = train_vae(args, configs, params["vae"], args.work, mesh)
        params["vae"] = jax.tree.map(distributed.gather, params["vae"])  # host values: encoded on each process
    latents = encode_training_latents(args, configs, params["vae"], args.work)
    scale = float(1.0 / latents.std())
    configs = dataclasses.replace(configs, vae=dataclasses.replace(configs.vae, scaling_factor=scale))
    print(f"[pretrain] latents {latents.shape}, std {latents.std():.4f} -> scaling_factor {scale:.5f}",
          file=sys.stderr)
    ema, last_loss = train_diffusion(args, configs, params, latents, tokenizer, args.work, mesh)
    if not distributed.is_main():  # process 0 exports and records
        return 0
    ema = jax.tree.map(distributed.gather, ema)
    stopped = args.stop_at is not None and args.stop_at < args.steps
    trained = vae_trained > 0 or last_loss is not None
    if stopped and not args.export_on_stop:
        _wall_clock(args.work, time.time() - t0, trained)
        print(f"[pretrain] stopped at step {args.stop_at} of {args.steps}; run again to resume", file=sys.stderr)
        return 0

    info = {"command": "python train/pretrain.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "preset": args.preset, "seed": args.seed, "data_version": scenes.DATA_VERSION,
            "vae_steps": args.vae_steps, "vae_crop": args.vae_crop, "diffusion_steps": args.steps, "batch": args.batch,
            "num_scenes": args.num_scenes, "single_object_share": args.single_object_share,
            "object_weight": args.object_weight,
            "object_weight_captions": args.object_weight_captions,
            "small_caption_weight": args.small_caption_weight,
            "min_snr_gamma": args.min_snr_gamma, "v_weighting": args.v_weighting,
            "prediction_type": configs.scheduler.prediction_type,
            "zero_terminal_snr": configs.scheduler.rescale_betas_zero_snr, "final_loss": last_loss,
            "jax_version": jax.__version__,
            "wall_clock_minutes": _wall_clock(args.work, time.time() - t0, trained)}
    if stopped:
        info["stopped_at"] = args.stop_at
    if earlier is not None:
        info["init_from"] = {"parts": sorted(started_from), "record": earlier.info}
    sd = StableDiffusion(configs, {**ema, "vae": params["vae"]}, tokenizer, info=info)
    # diffusers' PNDMScheduler (SD v1's) has no zero-terminal-SNR option, its DDIMScheduler has
    zero_snr = configs.scheduler.rescale_betas_zero_snr
    save_stable_diffusion(args.out, sd, tok_dir, dtype=np.float16,
                          scheduler_class="DDIMScheduler" if zero_snr else "PNDMScheduler")
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
