"""Is the sampler with prepared quantizer rows (Text2Image.prepare_rows, the default) bit-identical to the
layers' own path on the shipped model? W4A8 uniform, a random per-row/step/layer schedule (full precision
among the candidates) at 10 DDIM steps, and the shipped selector's QLIP schedules at 25 steps, 4 prompts.

    python benchmarks/prepared_check.py
"""
import numpy as np
from qlip_jax.assets import default_model_dir
from qlip_jax.cli import shipped_quant_dir
from qlip_jax.models.sd import load_stable_diffusion
from qlip_jax.ptq.persist import load_quant_setup, model_fingerprint
from qlip_jax.sampling.pipeline import Text2Image
sd = load_stable_diffusion(default_model_dir())
quant, _ = load_quant_setup(shipped_quant_dir(), model_fingerprint(sd.configs.unet, sd.params["unet"]), sd.params["unet"])
prompts = ["a red star", "two blue squares on a gray background", "a green circle", "a shape"]
out = {}
for prep in (True, False):
    p = Text2Image(sd, "ddim", 10, quant=quant)
    p.prepare_rows = prep
    emb = p.encode(prompts)
    rng = np.random.default_rng(0)
    sched = rng.integers(0, quant.config.num_candidates, (4, p.num_steps, len(quant.registry))).astype(np.int32)
    out[prep] = (p(emb, np.arange(4), 5.0, p.uniform_schedule(4, 8)), p(emb, np.arange(4), 5.0, sched))
print("W4A8 equal:", np.array_equal(out[True][0], out[False][0]), "random schedule equal:", np.array_equal(out[True][1], out[False][1]))
d = np.abs(out[True][1].astype(int) - out[False][1].astype(int))
print("random schedule: max", d.max(), "mean", d.mean(), "share of pixels differing", (d > 0).mean())
from qlip_jax.cli import shipped_selector_dir
from qlip_jax.selector.selector import Selector
sel = Selector.load(shipped_selector_dir(), sd)
res = {}
for prep in (True, False):
    p = Text2Image(sd, "ddim", 25, quant=sel.quant)
    p.prepare_rows = prep
    emb = p.encode(prompts)
    res[prep] = p(emb, np.arange(4), 5.0, sel.schedule(p, emb))
d = np.abs(res[True].astype(int) - res[False].astype(int))
print("QLIP (shipped selector, 25 steps): equal", np.array_equal(res[True], res[False]), "max", d.max(), "mean", d.mean())
