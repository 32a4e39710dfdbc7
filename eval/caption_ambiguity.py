"""How much a level-2 single-object caption can score, given what its words mean in the training data.

    python eval/caption_ambiguity.py --draws 60000

A level-2 caption of a one-object scene ("a drawing of an orange triangle") reads exactly like a level-1
caption, which names *one* object of a scene of 1-4; only level 2 claims to list every object, and the
alignment score charges it one point per extra object. This draws training captions as pretraining does
(a train-split scene, a uniform level), keeps the levels-1/2 captions that name one object, and prints
how often such a text comes from a one-object scene, how many objects its scenes hold, and the mean
alignment a perfect sampler of ``p(scene | text)`` would reach on it (all of the named object's points,
plus one unearned point per extra object).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np

from qlip_jax.data import scenes
from qlip_jax.metrics.parser import ParsedScene, alignment_score


def one_object_texts(draws: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(levels [M], n_objects [M], scores [M])`` of the captions among ``draws`` training draws that name
    one object at level 1 or 2 (the two levels whose texts coincide); ``scores``: the alignment score of
    the text read as a level-2 caption against the scene it came from (what a perfect sampler earns)."""
    rng = np.random.default_rng(seed)
    seeds = scenes.split_seeds("train")
    levels, counts, scores = [], [], []
    for _ in range(draws):
        scene = scenes.sample_scene(seeds[int(rng.integers(len(seeds)))])
        level = int(rng.integers(len(scenes.LEVELS)))
        if level in (1, 2):
            caption = scenes.make_caption(scene, level, rng)
            if len(caption.objects) == 1:
                levels.append(level)
                counts.append(len(scene.objects))
                claimed = dataclasses.replace(caption, level=2, exhaustive=True)
                scores.append(alignment_score(claimed, ParsedScene(scene.objects, scene.background)))
    return np.asarray(levels), np.asarray(counts), np.asarray(scores)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--draws", type=int, default=60000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.draws < 1:
        p.error(f"--draws must be positive, got {args.draws}")
    levels, n, scores = one_object_texts(args.draws, args.seed)
    ceiling = scores.mean()
    print(f"{len(n)} of {args.draws} training captions name one object at level 1 or 2 (the same texts)")
    print(f"from a one-object scene: {np.mean(n == 1):.3f}; level 2 (claims to be exhaustive): "
          f"{np.mean(levels == 2):.3f}; objects in the scene: {n.mean():.2f} on average")
    print(f"level-2 single-object alignment of a perfect sampler: {ceiling:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
