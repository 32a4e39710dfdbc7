"""Sampling speed, side by side in one run on one model: our jitted loop in float, with an all-8-bit
schedule, with per-prompt random schedules, and diffusers' PyTorch StableDiffusionPipeline.

    python benchmarks/sampling.py [--model DIR] [--batch 4] [--steps 10] [--repeats 3]

Without ``--model`` a randomly initialised SD of the ``tiny`` preset is built in a temporary folder
(the numbers measure the loop, not image quality). Each row: compile (first call) time, then the
median of ``--repeats`` timed calls; the ratio column divides by our float loop's median.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np

from qlip_jax import compile_cache
from qlip_jax.errors import check_int, check_sampling_args, program


def timed(fn, repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


@program
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--variant", default=None, help="weights variant, e.g. fp16 (<weights>.fp16.safetensors)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--guidance", type=float, default=5.0)
    compile_cache.add_argument(p)
    args = p.parse_args(argv)
    check_sampling_args(args, args.batch)
    check_int(args.batch, "--batch", 1)
    check_int(args.repeats, "--repeats", 1)
    compile_cache.from_args(args)

    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from qlip_jax.data.scenes import prompt_set
    from qlip_jax.models.sd import load_stable_diffusion
    from qlip_jax.quant.calibration import calibrate_minmax
    from qlip_jax.quant.state import QuantConfig
    from qlip_jax.sampling.pipeline import Text2Image

    folder = args.model or _tiny_model_dir()
    sd = load_stable_diffusion(folder, args.variant)
    prompts = [r.text for r in prompt_set("eval")[:args.batch]]
    seeds = np.arange(args.batch)
    fp = Text2Image(sd, "ddim", args.steps)
    quant = calibrate_minmax(fp, QuantConfig(act_bits=(6, 8, 10), weight_bits=4), prompts, seeds,
                             args.guidance, num_steps_kept=4)
    q = Text2Image(sd, "ddim", args.steps, quant=quant)
    emb = fp.encode(prompts)
    rng = np.random.default_rng(0)
    shape = (args.batch, q.num_steps, len(quant.registry))
    w4a8 = q.uniform_schedule(args.batch, 8)

    rows = [("ours, float (jit)", *timed(lambda: fp(emb, seeds, args.guidance), args.repeats)),
            ("ours, W4A8 schedule (jit)", *timed(lambda: q(emb, seeds, args.guidance, w4a8), args.repeats)),
            ("ours, random per-prompt schedules (jit)",
             *timed(lambda: q(emb, seeds, args.guidance,
                               rng.integers(0, quant.config.num_candidates, shape).astype(np.int32)),
                     args.repeats))]

    torch.set_num_threads(max(1, torch.get_num_threads()))
    ref = StableDiffusionPipeline.from_pretrained(folder, variant=args.variant, safety_checker=None,
                                                  feature_extractor=None,
                                                  requires_safety_checker=False)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)

    def run_ref():
        with torch.no_grad():
            ref(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="np",
                generator=torch.Generator().manual_seed(0))

    rows.append(("diffusers PyTorch pipeline, float", *timed(run_ref, args.repeats)))
    base = rows[0][2]
    print(f"\nmodel: {folder}\nbatch {args.batch}, {args.steps} DDIM steps, CFG {args.guidance}, "
          f"{len(quant.registry)} quantized layers, {jax.device_count()} {jax.devices()[0].platform} device(s), "
          f"torch threads {torch.get_num_threads()}\n")
    print(f"| {'what':42s} | first call (s) | median (s) | ratio to ours float |")
    print(f"|{'-' * 44}|----------------|------------|---------------------|")
    for name, first, med in rows:
        print(f"| {name:42s} | {first:14.2f} | {med:10.3f} | {med / base:19.2f} |")
    return 0


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
