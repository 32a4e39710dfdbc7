"""Fixtures for the evaluation and CLI tests: a min-max quantizer state and a QLIP selector with random
T2Q/Q2B params, both saved as folders for the tiny model (``tiny_sd`` in conftest.py), so the tests
never depend on the shipped assets. Import the fixtures into a test module to use them. Also the
zero-terminal-SNR scheduler changes and ``with_scheduler``, which the pipeline and PTQD tests share."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

STEPS = 3                 # sampler steps of every test using these fixtures
ACT_BITS = (4, 6, 8)      # the tiny quantizer's candidates; Q2B picks low/med/high among them
LAMBDA = 0.1              # recorded in the selector's info (the report names it "QLIP (lambda 0.1)")
# zero terminal SNR with v-prediction and trailing timesteps (Lin et al., 2024): scheduler-config changes
ZERO_SNR = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def with_scheduler(sd, changes: dict):
    """``sd`` (a ``StableDiffusion``) with ``changes`` applied to its scheduler config; same params."""
    import dataclasses

    from qlip_jax.sampling.schedulers import SchedulerConfig

    sched = SchedulerConfig.from_dict({**sd.configs.scheduler.to_dict(), **changes})
    return dataclasses.replace(sd, configs=dataclasses.replace(sd.configs, scheduler=sched))


@pytest.fixture(scope="session")
def tiny_quant_dir(tiny_sd, tmp_path_factory):
    """W4A{4,6,8} min-max quantizer state of the tiny model, saved as train/calibrate.py does."""
    from qlip_jax.ptq.calibration import calibrate_minmax
    from qlip_jax.ptq.persist import model_fingerprint, save_quant_setup
    from qlip_jax.quant.state import QuantConfig
    from qlip_jax.sampling.pipeline import Text2Image

    pipe = Text2Image(tiny_sd, "ddim", STEPS)
    setup = calibrate_minmax(pipe, QuantConfig(ACT_BITS, 4), ["a red star", "two blue squares"], [0, 1], 3.0)
    path = str(tmp_path_factory.mktemp("tiny_quant") / "minmax")
    save_quant_setup(path, setup, model_fingerprint(tiny_sd.configs.unet, tiny_sd.params["unet"]),
                     {"method": "minmax"})
    return path


@pytest.fixture(scope="session")
def tiny_selector_dir(tiny_sd, tiny_quant_dir, tmp_path_factory):
    """A :class:`Selector` over the tiny quantizer with random T2Q and Q2B params (p_m / p_h logits
    spread out, so schedules mix all three widths and differ between prompts)."""
    from qlip_jax.ptq.persist import load_quant_setup, model_fingerprint
    from qlip_jax.selector.q2b import Q2B, Q2BConfig
    from qlip_jax.selector.selector import Selector
    from qlip_jax.selector.t2q import T2Q

    setup, _ = load_quant_setup(tiny_quant_dir, model_fingerprint(tiny_sd.configs.unet, tiny_sd.params["unet"]))
    t2q = T2Q(hidden=8)
    t2q_params = t2q.init(jax.random.key(0), jnp.zeros((1, tiny_sd.configs.text.hidden_size)))["params"]
    cfg = Q2BConfig(num_layers=len(setup.registry), num_steps=STEPS, group_size=2, first_fp_steps=1)
    q2b = Q2B(cfg)
    params = q2b.init(jax.random.key(1), jnp.zeros((1,)), STEPS)["params"]
    rng = np.random.default_rng(0)
    params = {**params, "s": jnp.asarray(rng.uniform(20, 40, cfg.num_layers), jnp.float32),
              "o": jnp.asarray(rng.normal(0, 1, cfg.num_layers), jnp.float32),
              "p_m_logit": jnp.asarray(rng.normal(0, 2, params["p_m_logit"].shape), jnp.float32),
              "p_h_logit": jnp.asarray(rng.normal(0, 2, params["p_h_logit"].shape), jnp.float32)}
    path = str(tmp_path_factory.mktemp("tiny_selector") / "selector")
    Selector(t2q, t2q_params, q2b, params, setup).save(path, {"lambda_bit": LAMBDA}, quant_dir=tiny_quant_dir)
    return path
