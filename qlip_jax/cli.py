"""The ``qlip`` command.

``qlip sample --prompt TEXT [--prompt ...] [--model DIR] [--steps N] [--guidance G] [--seed S]
[--precision fp|qlip|wXaY|SCHEDULE.npy|SCHEDULE.json] [--selector DIR] [--quant DIR] [--out grid.png]``

``qlip demo [--n 128] [--out qlip-demo] [--overwrite] [--model DIR --quant DIR --selector DIR]``: the main
job, FP vs uniform precisions vs QLIP on held-out prompts (FID, sFID, domain FID, alignment, PSNR/SSIM,
BitOPs, FAB), a report and figures (:mod:`qlip_jax.evaluation`).

Without ``--model`` the embedded miniature Stable Diffusion shipped in the package is used, with the
selector (``assets/selector``) trained for it and the quantizer state it was trained on (its ``quant/``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parse_precision(text: str):
    """``'fp'`` -> ('fp', None); ``'qlip'`` -> ('qlip', None); ``'w4a8'`` -> ('uniform', (4, 8));
    ``x.npy`` -> ('file', path); ``x.json`` -> ('json', path)."""
    from qlip_jax.evaluation import parse_setting

    text = text.strip()
    if text.lower() in ("fp", "qlip"):
        return text.lower(), None
    setting = parse_setting(text)
    if setting:
        return "uniform", setting
    if text.endswith((".npy", ".json")):
        if not os.path.isfile(text):
            raise SystemExit(f"error: schedule file not found: {text}")
        return ("file" if text.endswith(".npy") else "json"), text
    raise SystemExit("error: --precision must be fp, qlip, wXaY (e.g. w4a8) or a .npy / .json schedule, "
                     f"got '{text}'")


def shipped_selector_dir() -> str:
    """``qlip_jax/assets/selector``: the QLIP selector trained for the embedded model."""
    from qlip_jax.assets import ASSETS

    return os.path.join(ASSETS, "selector")


def shipped_quant_dir() -> str:
    """``qlip_jax/assets/selector/quant``: the quantizer state calibrated for the embedded model, the
    one the shipped selector was trained on (stored once, in the selector folder)."""
    return os.path.join(shipped_selector_dir(), "quant")


BUILD_SELECTOR = ("python train/calibrate.py --method qdiff --out runs/quant/qdiff && python "
                  "train/train_selector.py --quant runs/quant/qdiff --work runs/selector --out qlip_jax/assets/selector")


def _require_selector(folder: str | None) -> str:
    """The selector folder to use (``folder`` or the shipped one); a clear error if it is absent."""
    path = folder or shipped_selector_dir()
    if not os.path.isfile(os.path.join(path, "selector.json")):
        if folder:
            raise SystemExit(f"error: no QLIP selector at {folder} (no selector.json); train one with "
                             "train/train_selector.py")
        raise SystemExit(f"error: the shipped QLIP selector is missing ({path}); build it with `{BUILD_SELECTOR}` "
                         "(after the quantizer state), or pass --selector DIR")
    return path


def _require_quant(folder: str | None) -> str:
    """The quantizer-state folder to use (``folder`` or the shipped one); a clear error if it is absent."""
    path = folder or shipped_quant_dir()
    if not os.path.isdir(path):
        if folder:
            raise SystemExit(f"error: no quantizer state at {folder}; make one with train/calibrate.py")
        raise SystemExit(f"error: the shipped quantizer state is missing ({path}); it comes with the selector, "
                         f"built by `{BUILD_SELECTOR}`; or pass --quant DIR")
    return path


def _json_widths(path: str) -> tuple[set[int], tuple[int, ...]]:
    """Integer widths a schedule JSON uses, and its recorded candidates (``act_bits``)."""
    import json

    with open(path, encoding="utf-8") as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise SystemExit(f"error: {path} is not a schedule JSON object (see qlip_jax/selector/schedule_io.py)")
    used = {int(v) for row in obj.get("schedule") or [] if isinstance(row, list) for v in row
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return used, tuple(obj.get("act_bits") or sorted(used))


def _quantizer(sd, pipe, args, kind: str, value):
    """The quantizer for a quantized precision: ``--quant DIR``; else the shipped state if it was
    calibrated for this model and has the widths needed; else min-max calibration (with a note)."""
    from qlip_jax.data.scenes import prompt_set
    from qlip_jax.quant.calibration import calibrate_minmax
    from qlip_jax.quant.persist import QuantStateMismatch, load_quant_setup, model_fingerprint
    from qlip_jax.quant.state import QuantConfig

    if kind == "uniform":
        wbits, need, fallback = value[0], {value[1]}, (value[1],)
    elif kind == "json":
        need, fallback = _json_widths(value)
        wbits, fallback = args.weight_bits, fallback or tuple(args.act_bits)
    else:  # .npy indices mean --act-bits
        wbits, need, fallback = args.weight_bits, None, tuple(args.act_bits)

    def serves(cfg) -> bool:
        return cfg.weight_bits == wbits and (set(cfg.act_bits) >= need if need is not None
                                             else cfg.act_bits == fallback)

    fingerprint = model_fingerprint(sd.configs.unet, sd.params["unet"])
    if args.quant:
        setup, _ = load_quant_setup(_require_quant(args.quant), fingerprint, sd.params["unet"])
        if kind == "uniform" and not serves(setup.config):
            raise SystemExit(f"error: the quantizer in {args.quant} is W{setup.config.weight_bits}"
                             f"A{list(setup.config.act_bits)}; it has no W{wbits}A{value[1]}")
        return setup
    shipped = shipped_quant_dir()
    if os.path.isdir(shipped):
        try:
            setup, info = load_quant_setup(shipped, fingerprint, sd.params["unet"])
        except QuantStateMismatch:
            print("[qlip] note: the shipped quantizer state belongs to the embedded model, not this one",
                  file=sys.stderr)
        else:
            cfg = setup.config
            if serves(cfg):
                print(f"[qlip] using the shipped quantizer state ({info.get('method', '?')}, "
                      f"W{cfg.weight_bits}A{list(cfg.act_bits)})", file=sys.stderr)
                return setup
            print(f"[qlip] note: the shipped quantizer state is W{cfg.weight_bits}A{list(cfg.act_bits)}, which does "
                  "not serve this precision", file=sys.stderr)
    config = QuantConfig(act_bits=fallback, weight_bits=wbits)
    calib = [r.text for r in prompt_set("calibration")[:args.calib_prompts]]
    print(f"[qlip] min-max calibration of W{wbits}A{list(config.act_bits)} on {len(calib)} prompts ...",
          file=sys.stderr)
    return calibrate_minmax(pipe, config, calib, range(len(calib)), args.guidance, num_steps_kept=8)


def cmd_sample(args) -> int:
    import numpy as np

    from qlip_jax.assets import default_model_dir
    from qlip_jax.models.sd import load_stable_diffusion
    from qlip_jax.quant.persist import QuantStateMismatch
    from qlip_jax.quant.registry import average_act_bits
    from qlip_jax.sampling.grid import save_grid
    from qlip_jax.sampling.pipeline import Text2Image
    from qlip_jax.selector.schedule_io import load_schedule_json
    from qlip_jax.selector.selector import Selector

    kind, value = _parse_precision(args.precision)
    if args.out and os.path.exists(args.out) and not args.overwrite:
        raise SystemExit(f"error: {args.out} exists; pass --overwrite to replace it")
    selector_dir = _require_selector(args.selector) if kind == "qlip" else None
    t0 = time.time()
    sd = load_stable_diffusion(args.model or default_model_dir())
    inv = {"batch_invariant": args.batch_invariant}
    pipe = Text2Image(sd, args.scheduler, args.steps, **inv)
    selector = None
    if kind == "qlip":
        try:
            selector = Selector.load(selector_dir, sd)
        except QuantStateMismatch as e:
            raise SystemExit(f"error: the selector in {selector_dir} does not belong to this model: {e}") from None
        pipe = Text2Image(sd, args.scheduler, args.steps, quant=selector.quant, **inv)
    elif kind != "fp":
        pipe = Text2Image(sd, args.scheduler, args.steps, quant=_quantizer(sd, pipe, args, kind, value), **inv)
    print(f"[qlip] model loaded in {time.time() - t0:.1f}s; sampling {len(args.prompt)} prompt(s), "
          f"{pipe.num_steps} steps ({args.scheduler}), precision {args.precision} ...", file=sys.stderr)
    emb = pipe.encode(args.prompt)
    for p, cut in zip(args.prompt, emb.truncated):
        if cut:
            print(f"[qlip] warning: prompt truncated to 77 tokens: {p[:60]}...", file=sys.stderr)
    schedule, quality = None, None
    if kind == "uniform":
        schedule = pipe.uniform_schedule(len(args.prompt), value[1])
    elif kind == "qlip":
        quality, schedule = selector.predict(pipe, emb)
    elif kind in ("file", "json"):
        if kind == "file":
            schedule = np.load(value)
        else:
            schedule, _ = load_schedule_json(value, pipe.quant.registry, pipe.quant.config, pipe.num_steps)
        if schedule.ndim == 2:  # one [T, L] schedule for every prompt
            schedule = np.broadcast_to(schedule, (len(args.prompt),) + schedule.shape)
    t1 = time.time()
    images = pipe(emb, np.arange(len(args.prompt)) + args.seed, args.guidance, schedule)
    print(f"[qlip] sampled in {time.time() - t1:.1f}s (including compilation)", file=sys.stderr)
    if schedule is not None:
        fab = np.asarray(average_act_bits(np.asarray(schedule), pipe.quant.config))
        for i, p in enumerate(args.prompt):
            q = "" if quality is None else f", predicted quality {float(quality[i]):.3f}"
            print(f"average activation bits {fab[i]:.2f}{q}: {p}")
    save_grid(args.out, images, args.prompt)
    print(args.out)
    return 0


def cmd_demo(args) -> int:
    from qlip_jax.evaluation import check_out_dir, run_evaluation
    from qlip_jax.quant.persist import QuantStateMismatch

    check_out_dir(args.out, args.overwrite)
    quant_dirs = [_require_quant(d) for d in (args.quant or [None])]
    selector_dirs = [_require_selector(d) for d in (args.selector or [None])]
    try:
        _, paths = run_evaluation(args, quant_dirs, selector_dirs, tag="demo")
    except QuantStateMismatch as e:
        raise SystemExit(f"error: {e} (with --model, pass --quant and --selector made for that model)") from None
    print(f"\nreport: {os.path.join(os.path.abspath(args.out), 'report.md')} (also report.csv, report.json)")
    print("pictures: " + ", ".join(sorted(os.path.basename(p) for p in paths.values() if p.endswith(".png"))))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qlip", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="text-to-image sampling at a chosen precision")
    s.add_argument("--model", default=None, help="diffusers-format SD folder (default: embedded mini SD)")
    s.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--guidance", type=float, default=5.0)
    s.add_argument("--seed", type=int, default=0, help="prompt i uses seed S + i")
    s.add_argument("--scheduler", default="ddim", choices=["ddim", "pndm", "dpmsolver++"])
    s.add_argument("--precision", default="fp",
                   help="fp; wXaY (uniform); qlip (the selector picks each prompt's schedule); SCHEDULE.npy "
                        "[B|1, T, L] candidate indices; or SCHEDULE.json (qlip_jax.selector.schedule_io)")
    s.add_argument("--selector", default=None, help="QLIP selector folder for --precision qlip "
                                                    "(default: the shipped qlip_jax/assets/selector)")
    s.add_argument("--quant", default=None, help="quantizer state for wXaY / schedules (default: the shipped "
                                                 "selector's quantizer if it fits, else min-max calibration)")
    s.add_argument("--weight-bits", type=int, default=4, help="weights for a .npy schedule")
    s.add_argument("--act-bits", type=int, nargs="+", default=[6, 8, 10],
                   help="candidate activation bits a .npy schedule indexes")
    s.add_argument("--calib-prompts", type=int, default=16,
                   help="calibration prompts for min-max quantizer ranges (quantized precisions)")
    s.add_argument("--batch-invariant", action="store_true",
                   help="sample one prompt at a time: a prompt's image is bit-identical whatever the other "
                        "prompts (slower when batching helps)")
    s.add_argument("--out", default="grid.png")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_sample)

    from qlip_jax.evaluation import add_arguments

    d = sub.add_parser("demo", help="the main job: FP vs uniform precisions vs QLIP on held-out prompts, "
                                    "with a report and figures (about 6 minutes on 2 idle CPU cores)")
    d.add_argument("--quant", action="append", default=None, metavar="DIR",
                   help="base quantizer state for the uniform rows (default: the shipped selector's quant/); repeat")
    d.add_argument("--selector", action="append", default=None, metavar="DIR",
                   help="QLIP selector (default: qlip_jax/assets/selector); repeat")
    add_arguments(d, n=128, out="qlip-demo")
    d.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
