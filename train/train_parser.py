"""Train the scene parser on fresh procedural images and report held-out figures.

    python train/train_parser.py --out qlip_jax/assets/scene-parser

Training scenes come from a seed range disjoint from every prompt set; the figures are measured on
the scenes of the evaluation prompt set (held out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from qlip_jax import compile_cache
from qlip_jax.atomic import atomic_write, check_writable_dir
from qlip_jax.data.scenes import DATA_VERSION, prompt_set, render, sample_scene, scene_of
from qlip_jax.errors import check_finite, check_int, check_seed, program
from qlip_jax.metrics.parser import SceneParser, SceneParserNet, batch_labels, evaluate_parser, make_parser_step

PARSER_SEEDS = 5_000_000  # parser training scenes: seeds from here on (disjoint from all prompt sets)


@program
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None, help="continue from a saved parser folder")
    p.add_argument("--seed-offset", type=int, default=0,
                   help="first training batch index (continuing runs see fresh scenes)")
    compile_cache.add_argument(p)
    args = p.parse_args(argv)
    check_int(args.steps, "--steps", 1)
    check_int(args.batch, "--batch", 1)
    check_int(args.width, "--width", 1)
    check_finite(args.lr, "--lr", lo=0.0)
    check_seed(args.seed)
    check_writable_dir(args.out)
    compile_cache.from_args(args)

    net = SceneParserNet(args.width)
    params = (SceneParser.load(args.init).params if args.init else
              net.init(jax.random.key(args.seed), jnp.zeros((1, 64, 64, 3), jnp.uint8))["params"])
    tx = optax.adam(optax.cosine_decay_schedule(args.lr, args.steps, 0.05))
    opt_state = tx.init(params)
    step = make_parser_step(net, tx)
    for s in (bar := tqdm(range(args.steps), desc="parser")):
        seeds = PARSER_SEEDS + (args.seed_offset + s) * args.batch + np.arange(args.batch)
        scenes = [sample_scene(int(x)) for x in seeds]
        images = np.stack([render(sc) for sc in scenes])
        params, opt_state, loss = step(params, opt_state, images, batch_labels(scenes))
        if (s + 1) % 50 == 0:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    parser = SceneParser(params, args.width)
    records = prompt_set("eval")
    scenes = [scene_of(r) for r in records]
    figures = evaluate_parser(parser, scenes, np.stack([render(s) for s in scenes]))
    parser.save(args.out)
    info = {"command": "python train/train_parser.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "data_version": DATA_VERSION, "steps": args.steps, "batch": args.batch,
            "held_out": "scenes of prompt_set('eval')", **figures}
    if args.init and os.path.isfile(os.path.join(args.init, "training.json")):
        with open(os.path.join(args.init, "training.json")) as f:
            info["continued_from"] = json.load(f)
    with atomic_write(f"{args.out}/training.json", "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
