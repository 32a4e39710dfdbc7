"""The shipped embedded default: miniature SD and scene parser."""

import json
import os

import numpy as np

from qlip_jax.assets import ASSETS, default_model_dir
from qlip_jax.data.scenes import DATA_VERSION, prompt_set, render, scene_of
from qlip_jax.metrics.parser import SceneParser, evaluate_parser
from qlip_jax.models.sd import load_stable_diffusion
from qlip_jax.sampling.pipeline import Text2Image


def _size_mb(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2 ** 20


def test_shipped_model_loads_and_samples_finite_images():
    folder = default_model_dir()
    sd = load_stable_diffusion(folder)
    info = json.load(open(os.path.join(folder, "qlip_training.json")))
    assert info["data_version"] == DATA_VERSION and "command" in info and info["diffusion_steps"] > 0
    images = Text2Image(sd, "ddim", steps=3).generate(["a red star", "a shape"], seed=0, guidance=5.0)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8 and images.std() > 1
    assert _size_mb(folder) + _size_mb(os.path.join(ASSETS, "scene-parser")) <= 40


def test_shipped_parser_reads_held_out_scenes():
    parser = SceneParser.load(os.path.join(ASSETS, "scene-parser"))
    scenes = [scene_of(r) for r in prompt_set("eval")[:256]]
    figures = evaluate_parser(parser, scenes, np.stack([render(s) for s in scenes]))
    print(figures)
    assert figures["pair_macro_f1"] >= 0.95, figures
    assert figures["background_acc"] >= 0.95 and figures["count_acc"] >= 0.9, figures


def test_shipped_quantizer_and_selector_belong_to_the_shipped_model():
    from qlip_jax.evaluation import same_setup
    from qlip_jax.ptq.persist import load_quant_setup, model_fingerprint
    from qlip_jax.selector.selector import Selector

    sd = load_stable_diffusion(default_model_dir())
    from qlip_jax.cli import shipped_quant_dir

    quant, info = load_quant_setup(shipped_quant_dir(),
                                   model_fingerprint(sd.configs.unet, sd.params["unet"]), sd.params["unet"])
    assert info["method"] == "qdiff" and quant.config.weight_bits == 4
    sel = Selector.load(os.path.join(ASSETS, "selector"), sd)
    assert same_setup(sel.quant, quant)          # the demo's uniform rows use the selector's quantizer
    pipe = Text2Image(sd, "ddim", steps=25, quant=quant)
    q, sched = sel.predict(pipe, pipe.encode(["a shape", "a large striped red star at the top left and a "
                                              "small blue circle at the bottom right on a yellow background"]))
    T, L = pipe.num_steps, len(quant.registry)
    assert sched.shape == (2, T, L) and np.all((0 <= q) & (q <= 1))
    cfg = sel.q2b.config
    assert set(np.unique(sched)) <= {cfg.low, cfg.med, cfg.high}
    assert np.all(sched[:, :cfg.first_fp_steps] != cfg.low)      # p_q = 1 in the first steps: never b_low
