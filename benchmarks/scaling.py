"""Scaling table: sampling throughput and pretraining step time on 1, 2 and 4 CPU devices in one process,
and on 2 processes x 2 devices (JAX's distributed runtime, gloo), ratios side by side in one run.

    python benchmarks/scaling.py [--model tiny|DIR] [--batch 8] [--steps 10] [--train-batch 8]

Each configuration runs in fresh processes (the device count is fixed when JAX starts), launched with
:func:`qlip_jax.distributed.launch_local`; the mesh is ``data=N`` for sampling and ``data=N/2,fsdp=2``
for pretraining where N > 1. Times are the best of 3 calls after compiling. On a machine with fewer cores
than devices the devices share the cores: this measures the overhead of the distribution, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

CONFIGS = [(1, 1), (1, 2), (1, 4), (2, 2)]  # (processes, devices per process)


def _best(fn, n: int = 3) -> float:
    fn()  # compiles
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def worker(args) -> None:
    """One configuration, in every process of it; process 0 prints one JSON line."""
    from qlip_jax import distributed

    distributed.initialize()
    import jax
    import numpy as np
    import optax

    from qlip_jax.models.clip import CLIPTextModel
    from qlip_jax.models.presets import preset
    from qlip_jax.models.sd import configs_from_dicts, init_params, load_stable_diffusion
    from qlip_jax.models.unet import UNet2DConditionModel
    from qlip_jax.sampling.pipeline import Text2Image
    from qlip_jax.training.diffusion import make_diffusion_step

    n = jax.device_count()
    if args.model == "tiny":
        configs = configs_from_dicts(preset("tiny"))
        from qlip_jax.models.sd import StableDiffusion
        from qlip_jax.data.tokenizer import convert_clip_bpe, find_clip_bpe, load_tokenizer

        tok = os.path.join(args.work, "tokenizer")
        if distributed.is_main() and not os.path.isdir(tok):
            convert_clip_bpe(find_clip_bpe(), tok)
        distributed.barrier("tokenizer")
        sd = StableDiffusion(configs, init_params(configs, jax.random.key(0)), load_tokenizer(tok))
    else:
        from qlip_jax.assets import default_model_dir

        sd = load_stable_diffusion(args.model or default_model_dir())
        configs = sd.configs
    pipe = Text2Image(sd, "ddim", args.steps, mesh=distributed.make_mesh({"data": n}))
    emb = pipe.encode([f"prompt {i}" for i in range(args.batch)])
    sample_s = _best(lambda: pipe(emb, np.arange(args.batch), 5.0))

    mesh = distributed.make_mesh({"data": n // 2, "fsdp": 2} if n > 1 else {"data": 1})
    unet, text = UNet2DConditionModel(configs.unet), CLIPTextModel(configs.text)
    tx = optax.adamw(1e-4)
    trainable = {"unet": sd.params["unet"], "text_encoder": sd.params["text_encoder"]}
    state = {"params": trainable, "opt": tx.init(trainable), "ema": trainable, "step": jax.numpy.int32(0)}
    state = distributed.put(state, distributed.param_shardings(state, mesh))
    step = make_diffusion_step(unet, text, tx, jax.numpy.asarray(configs.scheduler.alphas_cumprod(), "float32"),
                               0.999)
    rows = jax.sharding.NamedSharding(mesh, distributed.batch_spec(mesh))
    h = pipe.latent_shape
    lat = distributed.put(np.random.default_rng(0).standard_normal((args.train_batch, *h)).astype(np.float32), rows)
    ids = distributed.put(np.ones((args.train_batch, configs.text.max_position_embeddings), np.int32), rows)
    box = [state]

    def train():
        box[0], metrics = step(box[0], lat, ids, jax.random.key(1))
        jax.block_until_ready(metrics["loss"])

    train_s = _best(train)
    if distributed.is_main():
        print(json.dumps({"devices": n, "processes": jax.process_count(), "sample_s": sample_s, "train_s": train_s}),
              flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="'tiny' (random tiny preset), a diffusers folder, or '' for "
                                                   "the shipped model")
    p.add_argument("--batch", type=int, default=8, help="prompts sampled at once")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps")
    p.add_argument("--train-batch", type=int, default=8, help="latents per pretraining step")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import tempfile

    from qlip_jax.distributed import launch_local

    work = args.work or tempfile.mkdtemp(prefix="qlip-scaling-")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print(f"start: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    rows = []
    for processes, devices in CONFIGS:
        argv_w = [os.path.abspath(__file__), "--worker", "--model", args.model, "--batch", str(args.batch),
                  "--steps", str(args.steps), "--train-batch", str(args.train_batch), "--work", work]
        out = launch_local(argv_w, processes, devices, env=env)
        if any(code for code, _, _ in out):
            print(f"{processes} x {devices}: failed\n{out[0][2][-2000:]}", file=sys.stderr)
            return 1
        row = json.loads([line for line in out[0][1].splitlines() if line.startswith("{")][-1])
        rows.append(row)
        print(f"  {processes} process(es) x {devices} device(s): sampling {row['sample_s']:.3f} s, pretraining step "
              f"{row['train_s']:.3f} s (load {os.getloadavg()[0]:.1f})", flush=True)
    base = rows[0]
    print(f"\nmodel {args.model or 'shipped'}; sampling {args.batch} prompts x {args.steps} DDIM steps, mesh data=N; "
          f"pretraining step of {args.train_batch} latents, mesh data=N/2,fsdp=2 (data=1 on one device); best of 3; "
          f"end load {os.getloadavg()[0]:.1f}\n")
    print("| processes x devices | sampling (s) | images/s | vs 1 device | pretraining step (s) | vs 1 device |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['processes']} x {r['devices'] // r['processes']} | {r['sample_s']:.3f} | "
              f"{args.batch / r['sample_s']:.1f} | {base['sample_s'] / r['sample_s']:.2f} | {r['train_s']:.3f} | "
              f"{base['train_s'] / r['train_s']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
