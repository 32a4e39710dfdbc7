"""The ``qlip`` command.

``qlip sample --prompt TEXT [--prompt ...] | --prompts FILE [--n N]  [--model DIR] [--steps N] [--guidance G] [--seed S]
[--precision fp|qlip|wXaY|SCHEDULE.npy|SCHEDULE.json] [--selector DIR] [--quant DIR] [--out grid.png]``

``qlip demo [--n 128] [--out qlip-demo] [--overwrite] [--model DIR --quant DIR --selector DIR]``: the main
job, FP vs uniform precisions vs QLIP on held-out prompts (FID, sFID, domain FID, alignment, PSNR/SSIM,
BitOPs, FAB), a report and figures (:mod:`qlip_jax.evaluation`).

Without ``--model`` the embedded miniature Stable Diffusion shipped in the package is used, with the
selector (``assets/selector``) trained for it and the quantizer state it was trained on (its ``quant/``).

Compiled programs are kept in a persistent XLA cache (``~/.cache/qlip-jax/xla``; ``QLIP_CACHE=DIR`` moves
it, ``--no-cache`` or ``QLIP_CACHE=off`` disables it; :mod:`qlip_jax.compile_cache`), so a second
``qlip sample`` starts sampling without compiling again.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from qlip_jax.errors import BadArgument, BadFile, MismatchError, MissingFile, program


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
            raise MissingFile(text, f"schedule file not found: {text}", "check the --precision path")
        return ("file" if text.endswith(".npy") else "json"), text
    raise BadArgument(f"--precision must be fp, qlip, wXaY (e.g. w4a8) or a .npy / .json schedule, got '{text}'",
                      "see qlip sample --help")


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
            raise MissingFile(folder, f"no QLIP selector at {folder} (no selector.json)",
                              "train one with train/train_selector.py")
        raise MissingFile(path, f"the shipped QLIP selector is missing ({path})",
                          f"build it with `{BUILD_SELECTOR}` (after the quantizer state), or pass --selector DIR")
    return path


def _require_quant(folder: str | None) -> str:
    """The quantizer-state folder to use (``folder`` or the shipped one); a clear error if it is absent."""
    path = folder or shipped_quant_dir()
    if not os.path.isdir(path):
        if folder:
            raise MissingFile(folder, f"no quantizer state at {folder}", "make one with train/calibrate.py")
        raise MissingFile(path, f"the shipped quantizer state is missing ({path}); it comes with the selector",
                          f"build it with `{BUILD_SELECTOR}`, or pass --quant DIR")
    return path


def _json_widths(path: str) -> tuple[set[int], tuple[int, ...]]:
    """Integer widths a schedule JSON uses, and its recorded candidates (``act_bits``)."""
    import json

    with open(path, encoding="utf-8") as f:
        try:
            obj = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadFile(path, f"not valid JSON ({e})", "fix or re-export the schedule") from None
    if not isinstance(obj, dict):
        raise BadFile(path, "not a schedule JSON object", "see qlip_jax/selector/schedule_io.py for the layout")
    used = {int(v) for row in obj.get("schedule") or [] if isinstance(row, list) for v in row
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return used, tuple(obj.get("act_bits") or sorted(used))


def _quantizer(sd, args, kind: str, value):
    """The quantizer for a quantized precision: ``--quant DIR``; else the shipped state if it was
    calibrated for this model and has the widths needed; else min-max calibration (with a note) on the
    calibration split of ``--prompts FILE`` (the scene prompts for the embedded model; another ``--model``
    without ``--prompts`` is refused)."""
    from qlip_jax.data.sources import source_from_args
    from qlip_jax.ptq.calibration import calibrate_minmax
    from qlip_jax.ptq.persist import QuantStateMismatch, load_quant_setup, model_fingerprint
    from qlip_jax.quant.state import QuantConfig
    from qlip_jax.sampling.pipeline import Text2Image

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
            raise MismatchError(f"the quantizer in {args.quant} is W{setup.config.weight_bits}"
                                f"A{list(setup.config.act_bits)}; it has no W{wbits}A{value[1]}",
                                "pass a --quant calibrated with that width, or leave --quant out")
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
    if args.model and not args.prompts:
        raise BadArgument(f"no quantizer for --precision {args.precision} on this --model",
                          "pass --quant DIR (train/calibrate.py), or --prompts FILE to min-max calibrate on its "
                          "calibration split")
    source = source_from_args(args)
    calib = [r.text for r in source.prompts("calibration")[:args.calib_prompts]]
    what = "the scene prompts" if args.prompts is None else args.prompts
    print(f"[qlip] min-max calibration of W{wbits}A{list(config.act_bits)} on {len(calib)} prompts of {what} ...",
          file=sys.stderr)
    return calibrate_minmax(Text2Image(sd, args.scheduler, args.steps), config, calib, range(len(calib)),
                            args.guidance, num_steps_kept=8)


def check_sample_args(args):
    """Every check of ``qlip sample``'s arguments that needs no model: ``(kind, value, prompts)`` with
    ``--precision`` parsed and the prompt texts (``--prompt`` or ``--prompts FILE``).
    Raises a :class:`~qlip_jax.errors.QlipInputError` naming the problem."""
    from qlip_jax.atomic import check_image_path
    from qlip_jax.errors import check_int, check_sampling_args
    from qlip_jax.ptq.persist import read_quant_info
    from qlip_jax.quant.state import QuantConfig
    from qlip_jax.selector.schedule_io import read_schedule_npy
    from qlip_jax.selector.selector import Selector

    prompts = _sample_prompts(args)
    if not all(p.strip() for p in prompts):
        raise BadArgument("--prompt is empty", "give each --prompt some text")
    check_sampling_args(args, len(prompts))
    check_int(args.calib_prompts, "--calib-prompts", 1)
    check_image_path(args.out)
    kind, value = _parse_precision(args.precision)
    try:
        if kind == "uniform":
            QuantConfig(act_bits=(value[1],), weight_bits=value[0])
        elif kind in ("file", "json"):
            QuantConfig(act_bits=tuple(args.act_bits), weight_bits=args.weight_bits)
    except BadArgument as e:
        raise BadArgument(f"--precision {args.precision}: {e.problem}", e.hint) from None
    if kind == "file":
        read_schedule_npy(value, len(prompts), len(args.act_bits))
    elif kind == "json":
        _json_widths(value)
    elif kind == "qlip":
        Selector.read_meta(_require_selector(args.selector))
    if args.model is not None and not os.path.isdir(args.model):
        raise MissingFile(args.model, f"model folder not found: {args.model}",
                          "pass a diffusers-format Stable Diffusion folder, or leave --model out")
    if args.quant is not None and kind not in ("fp", "qlip"):
        read_quant_info(_require_quant(args.quant))
    return kind, value, prompts


def _sample_prompts(args) -> list[str]:
    """``--prompt`` texts, else the first ``--n`` evaluation-split prompts of ``--prompts FILE``."""
    from qlip_jax.data.sources import source_from_args
    from qlip_jax.errors import check_int

    if args.prompt:
        return list(args.prompt)
    if not args.prompts:
        raise BadArgument("no prompt given", "give --prompt TEXT (repeatable) or --prompts FILE")
    check_int(args.n, "--n", 1)
    return [p.text for p in source_from_args(args).prompts("eval")[:args.n]]


def cmd_sample(args) -> int:
    from qlip_jax.atomic import claim_output, release_claim

    from qlip_jax import distributed

    distributed.initialize()  # several processes (JAX_NUM_PROCESSES / QLIP_DISTRIBUTED): join them first
    kind, value, prompts = check_sample_args(args)
    mesh = distributed.mesh_from_arg(args.mesh, args.batch_invariant)
    claimed = distributed.is_main() and claim_output(args.out, args.overwrite)  # process 0 writes
    try:
        return _sample(args, kind, value, prompts, mesh)
    finally:
        if claimed:
            release_claim(args.out)  # removes the placeholder only if nothing was written


def _sample(args, kind, value, prompts: list[str], mesh=None) -> int:
    import numpy as np

    from qlip_jax.assets import default_model_dir
    from qlip_jax.distributed import is_main
    from qlip_jax.models.sd import load_stable_diffusion
    from qlip_jax.ptq.persist import QuantStateMismatch
    from qlip_jax.quant.registry import average_act_bits
    from qlip_jax.sampling.grid import save_grid
    from qlip_jax.sampling.pipeline import Text2Image
    from qlip_jax.selector.schedule_io import load_schedule_json, load_schedule_npy
    from qlip_jax.selector.selector import Selector

    selector_dir = _require_selector(args.selector) if kind == "qlip" else None
    t0 = time.time()
    sd = load_stable_diffusion(args.model or default_model_dir(), args.variant)
    selector, quant = None, None  # the selector / quantizer are read (and refused) before anything compiles
    if kind == "qlip":
        try:
            selector = Selector.load(selector_dir, sd)
        except QuantStateMismatch as e:
            raise MismatchError(f"the selector in {selector_dir} does not belong to this model: {e.problem}",
                                "pass --selector made for this --model") from None
        quant = selector.quant
    elif kind != "fp":
        quant = _quantizer(sd, args, kind, value)
    pipe = Text2Image(sd, args.scheduler, args.steps, quant=quant, batch_invariant=args.batch_invariant,
                      int8=args.int8, mesh=mesh)
    note = selector.steps_note(pipe.num_steps) if selector is not None else None
    if note:
        print(f"[qlip] {note}", file=sys.stderr)
    print(f"[qlip] model loaded in {time.time() - t0:.1f}s; sampling {len(prompts)} prompt(s), "
          f"{pipe.num_steps} steps ({args.scheduler}), precision {args.precision} ...", file=sys.stderr)
    schedule, quality = None, None
    if kind == "file":  # checked against the model before anything compiles
        schedule = load_schedule_npy(value, pipe.quant.registry, pipe.quant.config, pipe.num_steps,
                                     batch=len(prompts))
    elif kind == "json":
        schedule, _ = load_schedule_json(value, pipe.quant.registry, pipe.quant.config, pipe.num_steps)
        schedule = np.broadcast_to(schedule, (len(prompts),) + schedule.shape)
    emb = pipe.encode(prompts)
    for p, cut in zip(prompts, emb.truncated):
        if cut:
            print(f"[qlip] warning: prompt truncated to 77 tokens: {p[:60]}...", file=sys.stderr)
    if kind == "uniform":
        schedule = pipe.uniform_schedule(len(prompts), value[1])
    elif kind == "qlip":
        quality, schedule = selector.predict(pipe, emb)
    t1 = time.time()
    images = pipe(emb, np.arange(len(prompts)) + args.seed, args.guidance, schedule)
    print(f"[qlip] sampled in {time.time() - t1:.1f}s (including compilation)", file=sys.stderr)
    if not is_main():
        return 0
    if schedule is not None:
        fab = np.asarray(average_act_bits(np.asarray(schedule), pipe.quant.config))
        for i, p in enumerate(prompts):
            q = "" if quality is None else f", predicted quality {float(quality[i]):.3f}"
            print(f"average activation bits {fab[i]:.2f}{q}: {p}")
    save_grid(args.out, images, prompts)
    print(args.out)
    return 0


def cmd_demo(args) -> int:
    from qlip_jax.evaluation import check_out_dir, run_evaluation
    from qlip_jax.ptq.persist import QuantStateMismatch

    check_out_dir(args.out, args.overwrite)
    quant_dirs = [_require_quant(d) for d in (args.quant or [None])]
    selector_dirs = [_require_selector(d) for d in (args.selector or [None])]
    try:
        _, paths = run_evaluation(args, quant_dirs, selector_dirs, tag="demo")
    except QuantStateMismatch as e:
        raise MismatchError(e.problem, "with --model, pass --quant and --selector made for that model") from None
    if not paths:  # not process 0 of a multi-process run: it wrote the report
        return 0
    print(f"\nreport: {os.path.join(os.path.abspath(args.out), 'report.md')} (also report.csv, report.json)")
    print("pictures: " + ", ".join(sorted(os.path.basename(p) for p in paths.values() if p.endswith(".png"))))
    return 0


@program
def main(argv: list[str] | None = None) -> int:
    from qlip_jax import compile_cache
    from qlip_jax.data.sources import add_source_arguments

    parser = argparse.ArgumentParser(prog="qlip", description=__doc__.split("\n\n")[0],
                                     epilog="A bad input prints one 'error:' line and exits 2; --debug (anywhere) "
                                            "or QLIP_DEBUG=1 shows its traceback instead.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="text-to-image sampling at a chosen precision")
    s.add_argument("--model", default=None, help="diffusers-format SD folder (default: embedded mini SD)")
    s.add_argument("--variant", default=None, help="weights variant, e.g. fp16 (<weights>.fp16.safetensors)")
    s.add_argument("--prompt", action="append", default=None,
                   help="repeat for several prompts (default: the first --n evaluation prompts of --prompts FILE)")
    add_source_arguments(s, reference=False)
    s.add_argument("--n", type=int, default=4, help="prompts sampled from --prompts FILE without --prompt")
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--guidance", type=float, default=5.0)
    s.add_argument("--seed", type=int, default=0,
                   help="prompt i uses seed S + i; seeds are unsigned 32-bit, 0 .. 2**32 - 1 (a negative or larger "
                        "one is refused: it would wrap onto another seed)")
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
    from qlip_jax.distributed import add_mesh_argument
    from qlip_jax.sampling.pipeline import add_int8_argument

    add_int8_argument(s)
    add_mesh_argument(s)
    s.add_argument("--out", default="grid.png")
    s.add_argument("--overwrite", action="store_true")
    compile_cache.add_argument(s)
    s.set_defaults(func=cmd_sample)

    from qlip_jax.evaluation import add_arguments

    d = sub.add_parser("demo", help="the main job: FP vs uniform precisions vs QLIP on held-out prompts, "
                                    "with a report and figures (about 6 minutes on 2 idle CPU cores)")
    d.add_argument("--quant", action="append", default=None, metavar="DIR",
                   help="base quantizer state for the uniform rows (default: the shipped selector's quant/); repeat")
    d.add_argument("--selector", action="append", default=None, metavar="DIR",
                   help="QLIP selector (default: qlip_jax/assets/selector); repeat")
    add_arguments(d, n=128, out="qlip-demo")
    compile_cache.add_argument(d)
    d.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    compile_cache.from_args(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
