"""How much a level-2 single-object caption can score, given what its words mean in the training data.

    python eval/caption_ambiguity.py --draws 60000            # the current data (scenes-v2): 1.000
    python eval/caption_ambiguity.py --draws 60000 --v1-texts # as scenes-v1 worded it: 0.720

Alignment charges a level-2 caption one point per extra object, since level 2 claims to list every
object. A perfect sampler of ``p(scene | text)`` draws, for a text, the scenes that text was written for
in the training data. This draws training captions as pretraining does (a train-split scene, a uniform
level), groups them by text, and for each level-2 caption of a one-object scene scores the scenes of
its text group against that caption's claim (all of the named object's points, plus one unearned point
per extra object). In ``scenes-v1`` such a caption ("a drawing of an orange triangle") read exactly like
a level-1 caption, which names *one* object of a scene of 1-4; ``scenes-v2`` writes "a single orange
triangle". ``--v1-texts`` maps the texts back to ``scenes-v1``'s wording ("a single X" -> "a/an X").
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import numpy as np

from qlip_jax import compile_cache
from qlip_jax.data import scenes
from qlip_jax.errors import check_seed, program
from qlip_jax.metrics.parser import ParsedScene, alignment_score


def v1_text(text: str) -> str:
    """``scenes-v1``'s wording of a caption: level 2 had no "a single"."""
    head, sep, rest = text.partition("a single ")
    return head + (("an " if rest[:1] in "aeiou" else "a ") + rest if sep else "")


def one_object_texts(draws: int, seed: int, v1_texts: bool = False
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per level-2 caption of a one-object scene among ``draws`` training draws (``C`` of them), over the
    draws with the same text: ``(one_object [C], n_objects [C], scores [C])``, the share of them from a
    one-object scene, their mean object count and their mean alignment score against the level-2
    caption's claim (what a perfect sampler earns on that prompt)."""
    rng = np.random.default_rng(seed)
    seeds = scenes.split_seeds("train")
    by_text = defaultdict(list)
    claims = []
    for _ in range(draws):
        scene = scenes.sample_scene(seeds[int(rng.integers(len(seeds)))])
        caption = scenes.make_caption(scene, int(rng.integers(len(scenes.LEVELS))), rng)
        text = v1_text(caption.text) if v1_texts else caption.text
        by_text[text].append(scene)
        if caption.level == 2 and len(scene.objects) == 1:
            claims.append((text, caption))
    per_text = {}  # a level-2 text states the same objects whichever claim wrote it: score its group once
    for text, caption in claims:
        if text not in per_text:
            n = np.array([len(s.objects) for s in by_text[text]])
            per_text[text] = (np.mean(n == 1), n.mean(), np.mean(
                [alignment_score(caption, ParsedScene(s.objects, s.background)) for s in by_text[text]]))
    rows = np.array([per_text[text] for text, _ in claims]).reshape(-1, 3)
    return rows[:, 0], rows[:, 1], rows[:, 2]


@program
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--draws", type=int, default=60000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--v1-texts", action="store_true", help="word level 2 as scenes-v1 did (no 'a single')")
    compile_cache.add_argument(p)
    args = p.parse_args(argv)
    check_seed(args.seed)
    compile_cache.from_args(args)
    if args.draws < 1:
        p.error(f"--draws must be positive, got {args.draws}")
    one, n, scores = one_object_texts(args.draws, args.seed, args.v1_texts)
    if not len(n):
        p.error(f"no level-2 one-object caption among {args.draws} draws; draw more")
    print(f"{'scenes-v1 wording' if args.v1_texts else scenes.DATA_VERSION}: {len(n)} of {args.draws} training "
          f"captions are level-2 captions of one-object scenes; the training captions with the same text")
    print(f"come from a one-object scene {one.mean():.3f} of the time, from scenes of {n.mean():.2f} objects "
          f"on average")
    print(f"level-2 single-object alignment of a perfect sampler: {scores.mean():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
