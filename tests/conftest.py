"""Shared fixtures: tiny random diffusers/transformers models saved the way users' folders are."""

from __future__ import annotations

import os

# Tests run on the CPU, deterministic and in float32.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shutil
import tempfile

import numpy as np
import pytest


def pytest_configure(config):
    """One persistent XLA compilation cache per test session, empty at the start, shared by the workers.

    Several tests run a real program more than once (an interrupted run, its resume, an uninterrupted
    run), and tests in different files compile the same sampler; each call builds its jitted functions
    afresh, and the cache lets later calls reuse the first call's executables instead of compiling them
    again. Trace counts, which the compile-once tests assert on, are unaffected: tracing happens before
    the cache is consulted.

    The suite runs on pytest-xdist's workers (``-n`` in pyproject's addopts, one test file a worker at a
    time): the controlling process makes the folder before it starts them, and they inherit its path.

    Programs (``qlip``, train/, eval/) turn on a per-user cache (:mod:`qlip_jax.compile_cache`); it
    keeps a folder JAX already has, so in-process runs use this one, and ``QLIP_CACHE`` points programs
    started in a subprocess here too: tests never write to the user's cache.
    """
    import jax

    cache = os.environ.get("QLIP_TEST_XLA_CACHE") if os.environ.get("PYTEST_XDIST_WORKER") else None
    if cache is None:
        cache = tempfile.mkdtemp(prefix="qlip-jax-xla-cache-")
        config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))
        os.environ["QLIP_TEST_XLA_CACHE"] = cache
    os.environ["QLIP_CACHE"] = cache
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    import jax.monitoring

    jax.monitoring.register_event_duration_secs_listener(_count_compile)


# Where the suite's time goes: XLA compiles (count and seconds) per test. Each phase's report (setup,
# call, teardown) carries the compiles since the previous report, so the numbers reach the controlling
# process from xdist's workers; it adds them up and prints the costliest tests at the end of the run.
_COMPILES = {"since_report": [0, 0.0], "per_test": {}}


def _count_compile(event: str, seconds: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES["since_report"][0] += 1
        _COMPILES["since_report"][1] += seconds


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    n, s = _COMPILES["since_report"]
    report.user_properties.append(("xla_compiles", (n, s)))
    _COMPILES["since_report"] = [0, 0.0]
    return report


def pytest_runtest_logreport(report):
    for name, (n, s) in (p for p in report.user_properties if p[0] == "xla_compiles"):
        total_n, total_s = _COMPILES["per_test"].get(report.nodeid, (0, 0.0))
        _COMPILES["per_test"][report.nodeid] = (total_n + n, total_s + s)


def pytest_terminal_summary(terminalreporter):
    rows = sorted(_COMPILES["per_test"].items(), key=lambda kv: -kv[1][1])[:25]
    if rows:
        total_n = sum(n for n, _ in _COMPILES["per_test"].values())
        total_s = sum(s for _, s in _COMPILES["per_test"].values())
        terminalreporter.section(f"XLA compiles: {total_n} in {total_s:.0f} s (setup included); the 25 costliest tests")
        for nodeid, (n, s) in rows:
            terminalreporter.write_line(f"{s:8.1f} s {n:5d} compiles  {nodeid}")


def perturb_(module, scale: float = 0.05, seed: int = 0) -> None:
    """Add noise to every parameter, so zero biases / unit norms do not hide conversion bugs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24, attention_head_dim=4,
    norm_num_groups=8,
)


@pytest.fixture(scope="session")
def tiny_unet_dir(tmp_path_factory):
    """A tiny SD-v1-layout UNet (conv proj_in/out, cross-attention) saved with save_pretrained."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET).eval()
    perturb_(unet)
    path = tmp_path_factory.mktemp("unet")
    unet.save_pretrained(path)
    return str(path)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def rms_rel_err(a, b) -> float:
    """Relative RMS error ``||a - b|| / ||b||`` (quantization noise vs signal)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """CLIP's tokenizer, converted from the open_clip wheel's BPE file."""
    from qlip_jax.data.tokenizer import convert_clip_bpe, find_clip_bpe

    return convert_clip_bpe(find_clip_bpe(), str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory, tokenizer_dir):
    """A randomly initialised tiny SD (preset 'tiny') saved as a diffusers folder."""
    import jax

    from qlip_jax.models.presets import preset
    from qlip_jax.models.sd import StableDiffusion, configs_from_dicts, init_params, save_stable_diffusion

    configs = configs_from_dicts(preset("tiny"))
    params = init_params(configs, jax.random.key(0))
    # perturb so biases and norms are not at their trivial initial values
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    leaves = [np.asarray(x) + 0.02 * rng.standard_normal(np.shape(x)).astype(np.float32) for x in leaves]
    sd = StableDiffusion(configs, jax.tree.unflatten(tree, leaves), None)
    path = str(tmp_path_factory.mktemp("tiny_sd"))
    save_stable_diffusion(path, sd, tokenizer_dir)
    return path


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_dir):
    from qlip_jax.models.sd import load_stable_diffusion

    return load_stable_diffusion(tiny_sd_dir)


@pytest.fixture(scope="session")
def calib(tiny_sd):
    """``(float DDIM 4-step sampler, its timestep-aware calibration data)`` of two prompts on the tiny SD."""
    from qlip_jax.ptq.calibration import collect_calibration_data
    from qlip_jax.sampling.pipeline import Text2Image

    pipe = Text2Image(tiny_sd, "ddim", steps=4)
    data = collect_calibration_data(pipe, ["a red star", "two blue squares on a gray background"], [0, 1],
                                    guidance=3.0)
    return pipe, data


TINY_CLIP = dict(
    text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=49408, eos_token_id=2, bos_token_id=0, pad_token_id=1),  # openai's legacy ids
    vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=8),
    projection_dim=16,
)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory, tokenizer_dir):
    """A tiny random transformers ``CLIPModel`` folder as openai's are laid out: the model, CLIP's tokenizer
    and a ``preprocessor_config.json`` (shortest edge 32, 32x32 crop)."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(**TINY_CLIP)).eval()
    perturb_(model)
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    transformers.CLIPTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                                    ).save_pretrained(path)
    return str(path)
