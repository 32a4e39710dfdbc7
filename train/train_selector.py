"""Train the QLIP selector (T2Q + Q2B) on top of a calibrated base quantizer, and export it.

    python train/train_selector.py --quant runs/quant/mse --work runs/selector --out runs/selector/export

    python train/train_selector.py --model SD_DIR --prompts captions.txt --reference images/ \\
        --quant runs/quant/qdiff --work runs/selector --out runs/selector/export

1. Labels: float sampling of ``--train-prompts`` training prompts (seed ``i``) of the data source
   (``--prompts FILE``'s train split, held-out prompts from its eval split; the procedural scenes without
   it), keeping each image's trajectory; each image is scored by ``--quality`` and the scores are
   normalised to [0, 1] (:mod:`qlip_jax.selector.quality`). GIQA (KNN, or GMM) compares features of the
   image with features of real images: Inception-v3 pool features of the ``--reference`` images with a
   prompt file, the scene parser's features of rendered scenes otherwise. Labels and trajectories are
   cached in ``--work`` under a key of the model fingerprint, the data source, the quality target and
   the sampler settings (another model or data never reuses them).
2. T2Q: MSE regression of the label from the prompt's pooled text embedding; SROCC/PLCC on
   ``--heldout`` evaluation prompts (never trained on) are printed and stored.
3. Q2B, everything else frozen: each iteration takes ``--batch`` training prompts, samples their
   trajectories under the current hard schedule (``x^_t``), picks ``--rows-per-prompt`` steps of each and
   minimises the paper's loss (:mod:`qlip_jax.selector.training`). orbax checkpoints every
   ``--ckpt-every`` iterations; a rerun resumes. The rows are split over the devices of every process
   (``--mesh data=N,fsdp=M``, :mod:`qlip_jax.distributed`; default all devices on ``data``), the UNet's
   params over ``fsdp``; the selector is replicated. Several processes (``JAX_NUM_PROCESSES`` ...) sample
   the labelling and Q2B trajectories together; process 0 writes the caches, checkpoints' metadata and
   the export, and ``--work`` must be a folder every process sees.
4. Export to ``--out``: ``selector.json`` (configs, candidate bits, metrics, command, and the model
   fingerprint, data source, quality target and sampler it was trained with), ``t2q.safetensors``,
   ``q2b.safetensors``, and the quantizer state it was trained on (``quant/``). A selector is refused on
   another model; used at another step count it is noted (Q2B's groups of steps stretch to the new count).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from tqdm import tqdm

from qlip_jax import compile_cache, distributed
from qlip_jax.assets import ASSETS, default_model_dir
from qlip_jax.atomic import atomic_write, check_writable_dir
from qlip_jax.data.sources import FileSource, add_source_arguments, source_from_args
from qlip_jax.errors import (BadArgument, MismatchError, MissingFile, check_finite, check_int,
                             check_sampling_args, program)
from qlip_jax.metrics.parser import SceneParser
from qlip_jax.models.sd import load_stable_diffusion
from qlip_jax.models.unet import default_remat
from qlip_jax.programs import add_memory_arguments, micro_batch_for, settings_from_args
from qlip_jax.ptq.persist import load_quant_setup, model_fingerprint
from qlip_jax.quant.registry import average_act_bits
from qlip_jax.sampling.pipeline import Text2Image, add_int8_argument
from qlip_jax.selector.q2b import Q2B, Q2BConfig, bit_penalty, hard_indices, ste_onehot
from qlip_jax.selector.quality import QUALITY_KINDS, QualityTargets, make_quality_fn, real_features
from qlip_jax.selector.selector import Selector
from qlip_jax.selector.t2q import T2Q, pearson, spearman
from qlip_jax.selector.training import fit_t2q, make_q2b_loss, make_q2b_step, q2b_frozen
from qlip_jax.training import Checkpointer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--variant", default=None, help="weights variant, e.g. fp16 (<weights>.fp16.safetensors)")
    p.add_argument("--quant", required=True, help="quantizer state from train/calibrate.py")
    p.add_argument("--parser", default=os.path.join(ASSETS, "scene-parser"))
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--quality", default="giqa-knn", choices=QUALITY_KINDS)
    p.add_argument("--real", type=int, default=4000,
                   help="real images whose features GIQA compares to (rendered scenes, or the first of --reference)")
    add_source_arguments(p)
    p.add_argument("--train-prompts", type=int, default=512)
    p.add_argument("--heldout", type=int, default=128)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--pooling", default="eos", choices=["eos", "mean"],
                   help="text embedding T2Q reads: CLIP's pooled EOS state or the token mean")
    p.add_argument("--t2q-hidden", type=int, default=128)
    p.add_argument("--t2q-steps", type=int, default=1500)
    p.add_argument("--t2q-lr", type=float, default=1e-3)
    p.add_argument("--bits", type=int, nargs=3, default=None, metavar=("LOW", "MED", "HIGH"),
                   help="activation widths b_low b_med b_high (default: the quantizer's candidates)")
    p.add_argument("--group-size", type=int, default=5, help="M: steps sharing p_m, p_h")
    p.add_argument("--first-fp-steps", type=int, default=2, help="m: first steps with p_q forced to 1")
    p.add_argument("--ablation", default="full", choices=["full", "pq", "pq_pm", "pq_ph"])
    p.add_argument("--lambda-bit", type=float, default=0.05)
    p.add_argument("--macs-weighted", action="store_true")
    p.add_argument("--trajectory", default="quant", choices=["quant", "fp"])
    p.add_argument("--q2b-steps", type=int, default=300)
    p.add_argument("--q2b-lr", type=float, default=5e-2)
    p.add_argument("--batch", type=int, default=8, help="prompts per Q2B iteration")
    p.add_argument("--rows-per-prompt", type=int, default=4)
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop (without exporting) once Q2B reaches this iteration, as an interruption "
                        "would; a later run with the same arguments resumes")
    p.add_argument("--size", type=int, default=None,
                   help="image height = width (default: the model's native size)")
    distributed.add_mesh_argument(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--label-batch", type=int, default=32, help="prompts per labelling trajectory batch")
    add_memory_arguments(p, "prompts per labelling batch and rows per Q2B micro-batch (gradient accumulation)")
    add_int8_argument(p)  # the labelling and Q2B trajectories, the held-out schedules' samples
    compile_cache.add_argument(p)
    return p


def pooled_embedding(pipe, texts: list[str], pooling: str, batch: int = 128) -> np.ndarray:
    """``[N, D]`` text embedding T2Q reads (the diffusion model's own text encoder, in float)."""
    out = []
    for i in range(0, len(texts), batch):
        emb = pipe.encode(texts[i:i + batch])
        out.append(np.asarray(emb.pooled if pooling == "eos" else emb.cond.mean(axis=1)))
    return np.concatenate(out)


def label_with_trajectories(pipe, records, guidance, quality_fn, kind, path, bounds=None, desc=None,
                            batch=32):
    """Float images, trajectories ``[N, T, h, w, c]`` and quality labels of ``records`` (cached)."""
    cached = os.path.isfile(path) and os.path.isfile(path + ".traj.npy")
    distributed.barrier("labels-checked")  # no process writes before every process has looked
    if cached:
        return QualityTargets.load(path), np.load(path + ".traj.npy")
    images, trajs = [], []
    for i in tqdm(range(0, len(records), batch), desc=desc, disable=desc is None or not distributed.is_main()):
        chunk = records[i:i + batch]
        img, traj = pipe.trajectory(pipe.encode([r.text for r in chunk]), np.arange(i, i + len(chunk)), guidance)
        images.append(img)
        trajs.append(np.swapaxes(traj, 0, 1))
    images, trajs = np.concatenate(images), np.concatenate(trajs).astype(np.float32)
    targets = QualityTargets.from_scores(kind, records, np.arange(len(records)), quality_fn(images, records),
                                         bounds, {"guidance": guidance, "steps": pipe.num_steps})
    if distributed.is_main():  # every process has the same gathered trajectories and labels
        targets.save(path)
        with atomic_write(path + ".traj.npy") as tmp:
            np.save(tmp, trajs)
    distributed.barrier("labels-written")
    return targets, trajs


def _check_quality(args, source) -> None:
    """Refuse a quality target the data source cannot give, before anything loads."""
    if not isinstance(source, FileSource):
        return
    if args.quality == "alignment":
        raise BadArgument("--quality alignment needs the scene parser, which only reads the procedural scenes",
                          "use --quality giqa-knn or giqa-gmm with --reference DIR")
    if source.reference is None:
        raise BadArgument(f"--quality {args.quality} with --prompts needs --reference DIR (the real images "
                          "GIQA compares with)", "pass --reference DIR of real images")
    if source.reference_stats() is not None:
        raise BadArgument(f"--reference {args.reference} holds Inception statistics; GIQA needs the real "
                          "images' features", "pass --reference DIR, a folder of the real images")


def quality_description(args, source) -> dict:
    """What the labels measure (recorded in the label cache key and the selector folder)."""
    if args.quality == "alignment":
        return {"kind": "alignment", "scorer": "scene-parser"}
    features = "inception-v3-pool" if isinstance(source, FileSource) else "scene-parser"
    return {"kind": args.quality, "features": features, "real": args.real}


def quality_target(args, source):
    """``quality_fn(images, records) -> [N]``: GIQA over Inception-v3 pool features of the first ``--real``
    reference images (a prompt file), or over the scene parser's features of ``--real`` rendered scenes /
    the parser's alignment (the scenes)."""
    if isinstance(source, FileSource):
        from qlip_jax.metrics.inception import inception_features, load_inception_params

        params = load_inception_params()
        extract = lambda images: inception_features(params, images)[0]  # noqa: E731
        real = np.concatenate([extract(b) for b in source.reference_batches(299, limit=args.real)])
        need = 5 if args.quality == "giqa-knn" else 8   # make_quality_fn's k / n_components
        if len(real) < need:
            raise BadArgument(f"--reference has {len(real)} readable image(s); {args.quality} needs at least "
                              f"{need}", "add reference images")
        return make_quality_fn(args.quality, extract, real)
    parser = SceneParser.load(args.parser)
    real = None if args.quality == "alignment" else real_features(parser.features, args.real)
    return make_quality_fn(args.quality, parser.features, real, parser)


def label_key(args, fingerprint: str, source) -> str:
    """Name part of the label / trajectory caches: a digest of everything the labels depend on (the model,
    the data source, the quality target and the sampler), so that nothing is reused across them."""
    key = {"model": fingerprint, "data": source.describe(), "quality": quality_description(args, source),
           "sampler": [args.scheduler, args.steps, args.guidance, args.size]}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{args.quality}-{args.scheduler}{args.steps}-g{args.guidance}-{digest}"


def q2b_run_name(args, quant, method: str | None, labels: str = "") -> str:
    """Checkpoint folder of one Q2B problem: a run resumes only a run with the same settings on the same
    quantizer (its config, state and PTQD tables, digested), wherever that quantizer is stored, and the
    same labels (``labels``: :func:`label_key`). Labels, which depend on the float model, the data and the
    sampler alone, are shared by all runs in ``--work`` with those."""
    key = {k: getattr(args, k) for k in ("quality", "train_prompts", "scheduler", "steps", "guidance", "pooling",
                                        "t2q_hidden", "t2q_steps", "t2q_lr", "bits", "group_size",
                                        "first_fp_steps", "ablation", "lambda_bit", "macs_weighted", "trajectory",
                                        "q2b_lr", "batch", "rows_per_prompt", "size", "seed")}
    tables = {"state": quant.state, "ptqd": {} if quant.ptqd is None else quant.ptqd.to_dict()}
    key["quant"] = model_fingerprint(quant.config, tables)
    key["labels"] = labels
    if getattr(args, "int8", False):  # only when on, so the names of earlier runs still resume
        key["int8"] = True
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"q2b-{method or 'quant'}-{args.ablation}-lam{args.lambda_bit}-{digest}"


@program
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    distributed.initialize()  # several processes: they sample the trajectories together, process 0 writes
    check_sampling_args(args, max(args.train_prompts, 1))
    for name in ("real", "train_prompts", "heldout", "t2q_hidden", "t2q_steps", "group_size", "q2b_steps", "batch",
                 "rows_per_prompt", "ckpt_every"):
        check_int(getattr(args, name), "--" + name.replace("_", "-"), 1)
    check_int(args.first_fp_steps, "--first-fp-steps", 0, args.steps)
    for name in ("t2q_lr", "q2b_lr", "lambda_bit"):
        check_finite(getattr(args, name), "--" + name.replace("_", "-"), lo=0.0)
    for flag, folder in (("--quant", args.quant), ("--parser", args.parser), ("--model", args.model)):
        if folder is not None and not os.path.isdir(folder):
            raise MissingFile(folder, f"{flag} folder not found: {folder}", f"check {flag}")
    if args.model is not None and args.prompts is None:
        raise BadArgument("--model needs --prompts FILE (training captions for that model)",
                          "pass --prompts FILE (and --reference DIR for the GIQA target)")
    mesh = distributed.mesh_from_arg(args.mesh)  # None: one process, no --mesh (the pipelines as they are)
    q2b_mesh = mesh or distributed.make_mesh(distributed.parse_mesh(None, jax.device_count()))
    distributed.check_rows(args.batch * args.rows_per_prompt, q2b_mesh, "--batch x --rows-per-prompt (Q2B rows)")
    source = source_from_args(args)
    _check_quality(args, source)
    check_writable_dir(args.work, "--work")
    check_writable_dir(args.out)
    compile_cache.from_args(args)
    t0 = time.time()
    os.makedirs(args.work, exist_ok=True)
    dtype = jnp.dtype(args.dtype)
    sd = load_stable_diffusion(args.model or default_model_dir(), args.variant,
                               unet_dtype=None if dtype.itemsize == 2 else np.float32)
    fingerprint = model_fingerprint(sd.configs.unet, sd.params["unet"])
    quant, quant_info = load_quant_setup(args.quant, fingerprint, sd.params["unet"])
    cfg = quant.config
    bits = tuple(args.bits) if args.bits else tuple(sorted(cfg.act_bits))[:3]
    if len(bits) != 3:
        raise MismatchError(f"Q2B needs three candidate widths, the quantizer in {args.quant} has {cfg.act_bits}",
                            "calibrate one with three --act-bits or pass --bits LOW MED HIGH")
    low, med, high = (cfg.index_of(b) for b in bits)
    fp_pipe = Text2Image(sd, args.scheduler, args.steps, args.size, args.size, dtype=dtype,
                         attention_chunk=args.attention_chunk, mesh=mesh)
    q_pipe = Text2Image(sd, args.scheduler, args.steps, args.size, args.size, quant=quant, dtype=dtype,
                        attention_chunk=args.attention_chunk, int8=args.int8, mesh=mesh)
    T, L = q_pipe.num_steps, len(quant.registry)
    settings = settings_from_args(args, size=args.size, steps=args.steps, act_bits=cfg.act_bits,
                                  weight_bits=cfg.weight_bits, label_batch=args.label_batch, q2b_batch=args.batch,
                                  rows_per_prompt=args.rows_per_prompt)
    say = lambda m: print(m, file=sys.stderr)  # noqa: E731
    label_batch = micro_batch_for(args, sd.configs, "t2q-labels", settings, say)
    q2b_micro = micro_batch_for(args, sd.configs, "q2b", settings, say)

    # 1. labels
    quality_fn = quality_target(args, source)
    train_recs = source.prompts("train")[:args.train_prompts]
    held_recs = source.prompts("eval")[-args.heldout:]
    if len(train_recs) < 2 or not held_recs:
        raise BadArgument(f"the data source has {len(train_recs)} train and {len(held_recs)} eval prompt(s); "
                          "T2Q needs at least 2 and 1", "give --prompts a file with more captions")
    tag = label_key(args, fingerprint, source)
    train_t, train_traj = label_with_trajectories(
        fp_pipe, train_recs, args.guidance, quality_fn, args.quality,
        os.path.join(args.work, f"labels-train{len(train_recs)}-{tag}.npz"), desc="label train",
        batch=label_batch)
    held_t, _ = label_with_trajectories(
        fp_pipe, held_recs, args.guidance, quality_fn, args.quality,
        os.path.join(args.work, f"labels-heldout{len(held_recs)}-{tag}.npz"),
        bounds=(train_t.lo, train_t.hi), desc="label held-out", batch=label_batch)

    # 2. T2Q
    x_train = pooled_embedding(fp_pipe, train_t.texts, args.pooling)
    x_held = pooled_embedding(fp_pipe, held_t.texts, args.pooling)
    t2q = T2Q(hidden=args.t2q_hidden)
    t2q_params = t2q.init(jax.random.key(args.seed), jnp.zeros((1, x_train.shape[1])))["params"]
    t2q_apply = lambda p, x: t2q.apply({"params": p}, x)
    t2q_params, losses = fit_t2q(t2q_apply, t2q_params, x_train, train_t.normalized, args.t2q_steps,
                                 args.t2q_lr, seed=args.seed)
    pred_held = np.asarray(t2q_apply(t2q_params, jnp.asarray(x_held)))
    t2q_metrics = {"train_mse": float(losses[-50:].mean()),
                   "heldout_srocc": float(spearman(pred_held, held_t.normalized)),
                   "heldout_plcc": float(pearson(pred_held, held_t.normalized)),
                   "heldout_mse": float(np.mean((pred_held - held_t.normalized) ** 2))}
    print(f"[selector] T2Q ({args.quality}): " + ", ".join(f"{k} {v:.3f}" for k, v in t2q_metrics.items()),
          file=sys.stderr)
    q_train = np.asarray(t2q_apply(t2q_params, jnp.asarray(x_train)))

    # 3. Q2B
    q2b_cfg = Q2BConfig(num_layers=L, num_steps=T, group_size=args.group_size,
                        first_fp_steps=args.first_fp_steps, low=low, med=med, high=high,
                        use_pm=args.ablation in ("full", "pq_pm"), use_ph=args.ablation in ("full", "pq_ph"))
    q2b = Q2B(q2b_cfg)
    q2b_params = q2b.init(jax.random.key(args.seed + 1), jnp.zeros((1,)), T)["params"]
    probs_fn = lambda p, q: q2b.apply({"params": p}, q, T)
    macs = quant.registry.macs().astype(np.float64)
    weights = jnp.asarray(macs / macs.mean() if args.macs_weighted else np.ones(L), jnp.float32)
    penalty_fn = lambda probs: bit_penalty(probs, 1.0, bits[1] / bits[2], weights) / (T * L)
    remat = default_remat(sd.configs.unet) if args.remat is None else args.remat
    loss_fn = make_q2b_loss(q_pipe.unet.clone(remat=remat), quant, probs_fn, ste_onehot, penalty_fn, low, med, high)
    tx = optax.adam(args.q2b_lr)
    repl = distributed.replicated(q2b_mesh)  # the selector and its Adam state on every device
    state = distributed.put({"params": q2b_params, "opt": tx.init(q2b_params), "step": jnp.int32(0)}, repl)
    ckpt = Checkpointer(os.path.join(args.work, q2b_run_name(args, quant, quant_info.get("method"), tag)))
    if ckpt.latest_step() is not None:
        state, _ = ckpt.restore(state)
        print(f"[selector] Q2B resumed at iteration {int(state['step'])}", file=sys.stderr)
    step_fn = make_q2b_step(loss_fn, tx, q2b_micro, q2b_mesh)
    rows_sharding = NamedSharding(q2b_mesh, distributed.batch_spec(q2b_mesh))
    timesteps = np.asarray(q_pipe.sched.timesteps)
    start = int(state["step"])
    end = args.q2b_steps if args.stop_at is None else min(args.q2b_steps, args.stop_at)
    bar = tqdm(range(start, end), desc="Q2B", initial=start, total=args.q2b_steps,
               disable=args.quiet or not distributed.is_main())
    metrics = {}
    params, opt = state["params"], state["opt"]
    frozen = q2b_frozen(sd.params["unet"], quant, args.lambda_bit)
    unet = frozen.pop("unet")  # split on fsdp (if the mesh has it), the rest replicated
    frozen = {**distributed.put(frozen, repl), "unet": distributed.put_params(unet, q2b_mesh)}
    for it in bar:
        rng = np.random.default_rng([args.seed, it, 0x5E1])
        ids = rng.choice(len(train_recs), args.batch, replace=False)
        emb = fp_pipe.encode([train_t.texts[i] for i in ids])
        qb = q_train[ids]
        if args.trajectory == "quant":
            sched = np.asarray(hard_indices(probs_fn(params, jnp.asarray(qb)), q2b_cfg))
            _, traj = q_pipe.trajectory(emb, train_t.seeds[ids], args.guidance, sched)
            x_hat_traj = np.swapaxes(traj, 0, 1)                           # [B, T, h, w, c]
        else:
            x_hat_traj = train_traj[ids]
        steps = rng.integers(0, T, (args.batch, args.rows_per_prompt))
        b_idx = np.repeat(np.arange(args.batch), args.rows_per_prompt)
        s_idx = steps.ravel()
        batch = {"q": qb[b_idx], "step": s_idx.astype(np.int32), "t": timesteps[s_idx],
                 "x_fp": train_traj[ids][b_idx, s_idx], "x_hat": x_hat_traj[b_idx, s_idx],
                 "cond": np.asarray(emb.cond)[b_idx], "uncond": np.broadcast_to(
                     np.asarray(emb.uncond), (len(b_idx),) + emb.uncond.shape[1:]),
                 "guidance": np.full(len(b_idx), args.guidance, np.float32)}
        batch = distributed.put({k: np.asarray(v) for k, v in batch.items()}, rows_sharding)
        params, opt, metrics = step_fn(params, opt, frozen, batch)
        if (it + 1) % 10 == 0:
            bar.set_postfix(mse=f"{float(distributed.gather(metrics['mse'])):.4f}",
                            pen=f"{float(distributed.gather(metrics['penalty'])):.3f}")
        if (it + 1) % args.ckpt_every == 0 or it + 1 in (args.q2b_steps, end):
            ckpt.save(it + 1, {"params": params, "opt": opt, "step": jnp.int32(it + 1)}, {"stage": "q2b"})

    if end < args.q2b_steps:
        if distributed.is_main():
            print(f"[selector] stopped at Q2B iteration {end} of {args.q2b_steps}; run again to resume",
                  file=sys.stderr)
        return 0

    # 4. export
    sel = Selector(t2q, t2q_params, q2b, params, quant, pooling=args.pooling)
    sched_held = sel.schedule(q_pipe, fp_pipe.encode(held_t.texts))
    fab = np.asarray(average_act_bits(jnp.asarray(sched_held), cfg))
    info = {"command": "python train/train_selector.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "quality": args.quality, "bits": list(bits), "ablation": args.ablation,
            "lambda_bit": args.lambda_bit, "macs_weighted": args.macs_weighted, "trajectory": args.trajectory,
            "q2b_steps": args.q2b_steps, "train_prompts": len(train_recs), "t2q": t2q_metrics,
            "heldout_fab_mean": float(fab.mean()), "heldout_fab_std": float(fab.std()),
            "final_mse": float(distributed.gather(metrics["mse"])) if metrics else None,
            "base_method": quant_info.get("method"), "minutes": round((time.time() - t0) / 60, 1),
            "model_fingerprint": fingerprint, "data": source.describe(),
            "quality_target": quality_description(args, source),
            "sampler": {"scheduler": args.scheduler, "steps": T, "guidance": args.guidance, "size": args.size}}
    if distributed.is_main():
        sel.save(args.out, info, quant_dir=args.quant)
        print(json.dumps(info, indent=1))
    distributed.barrier("exported")
    return 0


if __name__ == "__main__":
    sys.exit(main())
