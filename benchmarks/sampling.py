"""Sampling speed, side by side in one run on one model and one set of initial latents: our jitted loop in
float, with fake-quant W4A8, the QLIP schedule, the int8 path (``--int8``) and batch-invariant W4A8, at several batch sizes, their compile times cold
(empty cache) and warm (persistent cache), diffusers' eager PyTorch pipeline in float and with wrapped-
layer fake quantization, and the start-up of a second ``qlip sample --precision qlip`` process.

    python benchmarks/sampling.py [--model DIR] [--batches 1 8 32] [--steps 10] [--repeats 2] [--dtype bfloat16]
        [--no-diffusers] [--no-cli]

Without ``--model`` the shipped embedded model is used with its quantizer and QLIP selector
(``qlip_jax/assets/selector``); ``--model tiny`` builds a random ``tiny``-preset SD (the QLIP row then
uses random per-prompt schedules, there being no selector for it). The machine's load
(``os.getloadavg``) is printed before and after: on a shared machine compare the ratios of one run.

Rows, per batch size: ``compile cold`` is lowering + XLA compilation with an empty persistent cache,
``compile warm`` the same for a fresh sampler with the cache filled (what a second process pays);
``median`` is the median of ``--repeats`` timed calls after the first; ``ratio`` divides by our float
median at that batch. The QLIP schedule runs the W4A8 program itself (bit widths are data), so its cold
compile shows ``(= W4A8's)``: nothing is compiled for it. diffusers runs on the same folder with the same initial latents (NCHW), DDIM,
the same guidance, ``torch.set_num_threads`` = the machine's cores; its fake-quant variant wraps every
``nn.Conv2d``/``nn.Linear`` of the UNet: weights fake-quantized once to 4 bits per output channel,
inputs per tensor at 8 bits with the scale and zero point of our quantizer for that layer
(the way PyTorch PTQ code simulates W4A8).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from qlip_jax import compile_cache
from qlip_jax.errors import check_int, check_sampling_args, program

HERE = os.path.dirname(os.path.abspath(__file__))


def timed(fn, repeats: int) -> tuple[float, float]:
    """``(first call seconds, median of `repeats` further calls)``."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def load() -> str:
    return "load average (1/5/15 min) " + " / ".join(f"{v:.2f}" for v in os.getloadavg()) + \
        f" on {os.cpu_count()} cores"


def compile_seconds(pipe, emb, seeds, guidance, schedule, latents) -> float:
    """Lowering + compilation of ``pipe``'s sampling loop for these arguments (no run)."""
    t0 = time.perf_counter()
    pipe._sample.lower(pipe._params(), emb.cond, jnp.broadcast_to(emb.uncond, emb.cond.shape),
                       jnp.asarray(seeds, jnp.uint32), None if schedule is None else jnp.asarray(schedule),
                       jnp.asarray(latents), pipe.guidance_scales(guidance)).compile()
    return time.perf_counter() - t0


@program
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="diffusers SD folder, 'tiny', or the shipped model (default)")
    p.add_argument("--variant", default=None, help="weights variant, e.g. fp16 (<weights>.fp16.safetensors)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="UNet compute dtype")
    p.add_argument("--no-diffusers", action="store_true", help="skip diffusers' PyTorch pipeline")
    p.add_argument("--torch-device", default=None, help="device of the diffusers rows (default: cuda if "
                                                         "available, else cpu); on cuda in --dtype")
    p.add_argument("--no-cli", action="store_true", help="skip the two `qlip sample --precision qlip` processes")
    compile_cache.add_argument(p)
    args = p.parse_args(argv)
    check_sampling_args(args, max(args.batches))
    for b in args.batches:
        check_int(b, "--batches", 1)
    check_int(args.repeats, "--repeats", 1)
    # a cache of this run only: the cold compile times are cold, the warm ones read what this run wrote
    own_cache = tempfile.mkdtemp(prefix="qlip-bench-xla-")
    if not args.no_cache:
        compile_cache.enable(own_cache)

    from qlip_jax.assets import default_model_dir
    from qlip_jax.cli import shipped_quant_dir, shipped_selector_dir
    from qlip_jax.data.scenes import prompt_set
    from qlip_jax.models.sd import load_stable_diffusion
    from qlip_jax.ptq.calibration import calibrate_minmax
    from qlip_jax.ptq.persist import QuantStateMismatch, load_quant_setup, model_fingerprint
    from qlip_jax.quant.state import QuantConfig
    from qlip_jax.sampling.pipeline import Text2Image
    from qlip_jax.selector.selector import Selector

    print(f"start: {load()}", flush=True)
    shipped = args.model is None
    folder = _tiny_model_dir() if args.model == "tiny" else (args.model or default_model_dir())
    sd = load_stable_diffusion(folder, args.variant)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    fp = Text2Image(sd, "ddim", args.steps, dtype=dtype)
    all_prompts = [r.text for r in prompt_set("eval")]
    selector = None
    try:
        quant, _ = load_quant_setup(shipped_quant_dir(), model_fingerprint(sd.configs.unet, sd.params["unet"]))
        qsource = "the shipped quantizer state"
        if shipped:
            selector = Selector.load(shipped_selector_dir(), sd)
    except QuantStateMismatch:
        quant = calibrate_minmax(fp, QuantConfig(act_bits=(6, 8, 10), weight_bits=4), all_prompts[:4],
                                 np.arange(4), args.guidance, num_steps_kept=4)
        qsource = "min-max calibration on 4 prompts"
    q = Text2Image(sd, "ddim", args.steps, quant=quant, dtype=dtype)
    q_int8 = Text2Image(sd, "ddim", args.steps, quant=quant, dtype=dtype, int8=True)
    q_inv = Text2Image(sd, "ddim", args.steps, quant=quant, dtype=dtype, batch_invariant=True)

    rows = []  # (batch, what, compile cold, compile warm, median)
    ref_times = {}
    for b in args.batches:
        prompts = [all_prompts[i % len(all_prompts)] for i in range(b)]
        seeds = np.arange(b)
        latents = np.asarray(jax.random.normal(jax.random.key(b), (b, *fp.latent_shape)), np.float32)
        emb = fp.encode(prompts)
        if selector is not None:
            qlip_name, qlip_sched = "ours, QLIP schedule (selector)", selector.schedule(q, emb)
        else:
            rng = np.random.default_rng(0)
            qlip_name = "ours, random per-prompt schedules"
            qlip_sched = rng.integers(0, quant.config.num_candidates,
                                      (b, q.num_steps, len(quant.registry))).astype(np.int32)
        w4a8 = q.uniform_schedule(b, 8)
        variants = [("ours, float", fp, None), ("ours, fake-quant W4A8", q, w4a8), (qlip_name, q, qlip_sched),
                    ("ours, int8 W4A8 (--int8)", q_int8, w4a8), ("ours, fake-quant W4A8, batch-invariant", q_inv, w4a8)]
        for name, pipe, sched in variants:
            cold = compile_seconds(pipe, emb, seeds, args.guidance, sched, latents)
            fresh = Text2Image(sd, "ddim", args.steps, quant=pipe.quant, dtype=dtype, int8=pipe.int8,
                               batch_invariant=pipe.batch_invariant)  # a new jit: a new process
            warm = compile_seconds(fresh, emb, seeds, args.guidance, sched, latents)
            _, med = timed(lambda: pipe(emb, seeds, args.guidance, sched, latents), args.repeats)
            rows.append((b, name, cold, warm, med))
            print(f"  batch {b:3d} {name:36s} compile cold {cold:6.1f}s warm {warm:5.1f}s, median {med:7.3f}s "
                  f"({load()})", flush=True)
        if not args.no_diffusers:
            ref_times[b] = _diffusers_rows(folder, quant, prompts, latents, args)
            for name, med in ref_times[b]:
                rows.append((b, name, None, None, med))
                print(f"  batch {b:3d} {name:36s} median {med:7.3f}s ({load()})", flush=True)

    cli = None if args.no_cli else _cli_start(args)
    print(f"\nmodel: {folder}{' (shipped)' if shipped else ''}; quantizer: {qsource} "
          f"(W{quant.config.weight_bits}A{list(quant.config.act_bits)}, {len(quant.registry)} layers); "
          f"{args.steps} DDIM steps, CFG {args.guidance}, UNet dtype {args.dtype}; "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s); repeats {args.repeats}")
    print(f"end: {load()}\n")
    print(f"| batch | {'what':48s} | compile cold (s) | compile warm (s) | median (s) | ratio to ours float |")
    print(f"|------:|{'-' * 50}|-----------------:|-----------------:|-----------:|--------------------:|")
    for b, name, cold, warm, med in rows:
        base = next(m for bb, n, _, _, m in rows if bb == b and n == "ours, float")
        c = "" if cold is None else f"{cold:.1f}" if cold > 1.0 else "(= W4A8's)"
        w = "" if warm is None else f"{warm:.1f}"
        print(f"| {b:5d} | {name:48s} | {c:>16s} | {w:>16s} | {med:10.3f} | {med / base:19.2f} |")
    if cli:
        print(f"\nsecond `qlip sample --precision qlip` in a new process (shipped model, 1 prompt, 25 steps, "
              f"persistent cache): {cli[1]:.1f}s wall in all (first process, empty cache: {cli[0]:.1f}s); "
              f"of which sampling itself (the CLI's 'sampled in', compile included): {cli[3]:.1f}s "
              f"(first: {cli[2]:.1f}s)")
    return 0


def _cli_start(args) -> tuple[float, float, float, float] | None:
    """Wall seconds and the CLI's own 'sampled in' seconds of two ``qlip sample --precision qlip``
    processes sharing a fresh persistent cache: ``(wall1, wall2, sampled1, sampled2)``."""
    import re

    cache = tempfile.mkdtemp(prefix="qlip-bench-cli-xla-")
    out = tempfile.mkdtemp(prefix="qlip-bench-cli-")
    env = {**os.environ, "QLIP_CACHE": cache, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(HERE)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    walls, sampled = [], []
    for i in range(2):
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "qlip_jax.cli", "sample", "--precision", "qlip", "--prompt",
                              "a red star", "--out", os.path.join(out, f"{i}.png")], env=env, capture_output=True,
                             text=True)
        walls.append(time.perf_counter() - t0)
        if res.returncode != 0:
            print(f"qlip sample failed: {res.stderr[-2000:]}", file=sys.stderr)
            return None
        m = re.search(r"sampled in ([0-9.]+)s", res.stderr)
        sampled.append(float(m.group(1)) if m else float("nan"))
        print(f"  qlip sample process {i + 1}: {walls[-1]:.1f}s wall ({load()})", flush=True)
    return walls[0], walls[1], sampled[0], sampled[1]


def _diffusers_rows(folder, quant, prompts, latents, args) -> list[tuple[str, float]]:
    """diffusers' StableDiffusionPipeline (eager PyTorch) on ``folder``, float and with wrapped-layer
    W4A8 fake quantization; the same initial latents. ``[(name, median seconds)]``."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.set_num_threads(os.cpu_count() or 1)
    device = args.torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if device != "cpu" else torch.float32
    ref = StableDiffusionPipeline.from_pretrained(folder, variant=args.variant, safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False)
    if device != "cpu":
        ref = ref.to(device, dtype)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    lat = torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2))).to(device, dtype)

    def run():
        with torch.no_grad():
            ref(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="np",
                latents=lat.clone())
        if device == "cuda":
            torch.cuda.synchronize()

    out = [(f"diffusers eager, float ({device})", timed(run, args.repeats)[1])]
    wrap_fake_quant(ref.unet, quant)
    out.append((f"diffusers eager, wrapped fake-quant W4A8 ({device})", timed(run, args.repeats)[1]))
    return out


def wrap_fake_quant(unet, quant, act_bits: int = 8) -> int:
    """Replace every ``nn.Conv2d``/``nn.Linear`` of a diffusers UNet that our quantizer covers by a
    wrapper: weight fake-quantized once (``weight_bits``, symmetric per output channel, our ``w_scale``),
    input fake-quantized per tensor at ``act_bits`` with our scale/zero point. Returns the count."""
    import torch

    k = quant.config.index_of(act_bits)
    qmax = 2 ** act_bits - 1

    class Wrapped(torch.nn.Module):
        def __init__(self, layer, state):
            super().__init__()
            self.layer = layer
            w = layer.weight.data
            s = torch.tensor(np.asarray(state["w_scale"]), dtype=w.dtype, device=w.device)
            shape = (-1,) + (1,) * (w.ndim - 1)
            hi = 2 ** (quant.config.weight_bits - 1) - 1
            layer.weight.data = torch.clamp(torch.round(w / s.reshape(shape)), -hi - 1, hi) * s.reshape(shape)
            a_scale, a_zero = np.asarray(state["a_scale"]), np.asarray(state["a_zero"])
            self.scale = float(a_scale.reshape(-1, a_scale.shape[-1])[0, k])
            self.zero = int(np.round(a_zero.reshape(-1, a_zero.shape[-1])[0, k]))

        def forward(self, x, *rest, **kw):
            xq = torch.fake_quantize_per_tensor_affine(x.float(), self.scale, self.zero, 0, qmax)
            return self.layer(xq.to(x.dtype), *rest, **kw)

    count = 0
    for name, module in list(unet.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, (torch.nn.Conv2d, torch.nn.Linear)) and full in quant.state:
                setattr(module, child_name, Wrapped(child, quant.state[full]))
                count += 1
    return count


def _tiny_model_dir() -> str:
    """A random ``tiny``-preset SD saved in a temporary folder (tokenizer from open_clip's BPE)."""
    from qlip_jax.data.tokenizer import convert_clip_bpe, find_clip_bpe
    from qlip_jax.models.presets import preset
    from qlip_jax.models.sd import StableDiffusion, configs_from_dicts, init_params, save_stable_diffusion

    folder = tempfile.mkdtemp(prefix="qlip-bench-")
    configs = configs_from_dicts(preset("tiny"))
    tok = convert_clip_bpe(find_clip_bpe(), f"{folder}-tokenizer")
    save_stable_diffusion(folder, StableDiffusion(configs, init_params(configs, jax.random.key(0)), None), tok)
    return folder


if __name__ == "__main__":
    raise SystemExit(main())
