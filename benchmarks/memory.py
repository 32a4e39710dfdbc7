"""Peak device memory of one step of every program, from XLA's own buffer analysis, without weights.

    nice python benchmarks/memory.py --config tests/data/sd-v1-4/unet/config.json --dtype bfloat16
    python benchmarks/memory.py --preset tiny --dtype float32

For a preset or a diffusers model (``--config``: a ``unet/config.json`` whose siblings ``text_encoder/``,
``vae/`` and ``scheduler/`` hold the other configs), each program's jitted step
(:func:`qlip_jax.programs.program_steps`: sampling ``--sample-batch`` prompts with CFG, calibration
trajectories, a reconstruction step, T2Q labelling trajectories, a Q2B step, a pretraining step) is
lowered on abstract arguments (``jax.eval_shape``: nothing is materialised) and compiled for the default
backend; ``compiled.memory_analysis()`` gives arguments, outputs and temporaries. ``peak`` is
``arguments + outputs + temporaries - aliased``. Each program runs at the micro-batch the programs use
by default (:meth:`qlip_jax.programs.ProgramSettings.micro_for`: the whole batch, or for SD-size UNets
:data:`qlip_jax.programs.SD_MICRO_BATCH`), or at ``--micro-batch PROGRAM=N``; with ``--memory-budget``
each program's micro-batch is the largest divisor of its batch whose peak fits (as the programs'
``--memory-budget`` picks it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Buffer assignment (what memory_analysis reports) happens on the optimised HLO, before LLVM code
# generation; skipping LLVM's expensive passes only shortens the (CPU) compile of SD-size programs.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")

import jax  # noqa: E402

from qlip_jax.memory import GIB, check_micro_batch, choose_micro_batch, peak_bytes
from qlip_jax.models import io
from qlip_jax.models.presets import preset
from qlip_jax.models.sd import configs_from_dicts
from qlip_jax.programs import PROGRAMS, ProgramSettings, program_steps, rows_of


def load_configs(preset_name: str | None, config: str | None):
    """SD configs from a preset name or a ``unet/config.json`` path (siblings give the other parts)."""
    if config is None:
        return configs_from_dicts(preset(preset_name or "mini-sd"))
    path = os.path.join(config, "unet", "config.json") if os.path.isdir(config) else config
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config: no UNet config.json at {path}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    parts = {"unet": path, "vae": os.path.join(root, "vae", "config.json"),
             "text_encoder": os.path.join(root, "text_encoder", "config.json"),
             "scheduler": os.path.join(root, "scheduler", "scheduler_config.json")}
    missing = [p for p in parts.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"--config {config}: the model folder lacks {missing} (the UNet config's "
                                "siblings text_encoder/, vae/ and scheduler/ give the other parts)")
    return configs_from_dicts({k: io.read_json(p) for k, p in parts.items()})


def measure(configs, settings: ProgramSettings, programs=PROGRAMS, budget_gib: float | None = None,
            log=None) -> list[dict]:
    """One row per program: ``{program, rows, micro_batch, peak, arguments, temp, seconds}`` (bytes).

    With ``budget_gib`` the micro-batch of each program is chosen to fit (largest divisor of its batch).
    """
    rows = []
    for name in programs:
        t0 = time.time()

        def compile_at(mb, name=name):
            s = settings.with_micro(name, mb)
            fn, args = program_steps(configs, s, (name,))[name]
            return fn.lower(*args).compile()

        n = rows_of(name, settings)
        if budget_gib is not None:
            mb, _ = choose_micro_batch(compile_at, n, budget_gib)
        else:
            mb = settings.micro_for(name, configs.unet)
            check_micro_batch(n, mb, f"{name} batch")
        compiled = compile_at(mb)
        m = compiled.memory_analysis()
        row = {"program": name, "rows": n, "micro_batch": mb, "peak": peak_bytes(compiled),
               "arguments": int(m.argument_size_in_bytes), "temp": int(m.temp_size_in_bytes),
               "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        if log:
            log(format_row(row))
    return rows


def format_row(r: dict) -> str:
    return (f"| {r['program']:<14} | {r['rows']:>5} | {r['micro_batch']:>5} | {r['peak'] / GIB:9.2f} | "
            f"{r['arguments'] / GIB:9.2f} | {r['temp'] / GIB:9.2f} | {r['seconds']:7.1f} |")


HEADER = ("| program        |  rows | micro | peak GiB  | args GiB  | temp GiB  | compile s |\n"
          "|----------------|-------|-------|-----------|-----------|-----------|-----------|")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="model preset (default mini-sd)")
    src.add_argument("--config", default=None, help="a diffusers unet/config.json (or the model folder)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--size", type=int, default=None, help="image side (default: the model's native size)")
    p.add_argument("--programs", nargs="+", default=list(PROGRAMS), choices=PROGRAMS)
    p.add_argument("--memory-budget", type=float, default=None, metavar="GiB",
                   help="choose each program's micro-batch to fit this budget")
    p.add_argument("--micro-batch", nargs="+", default=[], metavar="PROGRAM=N",
                   help="a program's micro-batch (default: the programs' own default for the model)")
    p.add_argument("--attention-chunk", type=int, default=None,
                   help="query chunk of attention (default: the model's memory default; 0: full)")
    p.add_argument("--remat", default=None, help="remat policy of trained UNets ('' off; default: by size)")
    args = p.parse_args(argv)
    configs = load_configs(args.preset, args.config)
    settings = ProgramSettings(size=args.size, dtype=args.dtype, attention_chunk=args.attention_chunk,
                               remat=args.remat)
    for item in args.micro_batch:
        name, _, n = item.partition("=")
        if name not in PROGRAMS or not n.isdigit():
            p.error(f"--micro-batch {item}: expected PROGRAM=N with PROGRAM one of {PROGRAMS}")
        settings = settings.with_micro(name, int(n))
    print(f"# {args.config or args.preset or 'mini-sd'}, {args.dtype}, backend {jax.default_backend()}, "
          f"size {args.size or 'native'}, load average {os.getloadavg()[0]:.1f}", flush=True)
    print(HEADER, flush=True)
    measure(configs, settings, tuple(args.programs), args.memory_budget, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
