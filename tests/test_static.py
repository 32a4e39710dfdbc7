"""Static mixed precision (issue #42, item 1b): ``allocate`` is the brute-force optimum on small hand-built
problems and never exceeds its budget; the layer-step sensitivities on the tiny SD are single-layer
quantization errors; the schedule meets a uniform width's BitOPs budget; train/static_schedule.py writes
a schedule file the sampler's loader reads."""

import itertools

import numpy as np
import pytest

from tiny_qlip import tiny_quant_dir  # noqa: F401  (fixture)

from qlip_jax.selector.static import allocate


def _brute_force(errors, costs, budget):
    T, L, K = errors.shape
    costs = np.broadcast_to(costs, errors.shape)
    best = (np.inf, None)
    for flat in itertools.product(range(K), repeat=T * L):
        ch = np.asarray(flat).reshape(T, L)
        t, l = np.indices((T, L))
        if costs[t, l, ch].sum() <= budget:
            best = min(best, (errors[t, l, ch].sum(), flat), key=lambda x: x[0])
    return best[0]


def test_three_layers_hand_built():
    """Three layers, one step, candidates (A6, A8, A10) with BitOPs-like costs MACs x 4 x bits: the big
    layer's error is the largest but dear to remove (A10 costs 128 more than A6); with 40 to spend, the
    optimum is the mid layer at A10 (32) and the small one at A8 (8): error 3.3, against 3.5 for the
    small one at A10 and the mid one at A8 (32)."""
    macs = np.asarray([8.0, 2.0, 1.0])
    costs = macs[:, None] * 4 * np.asarray([6.0, 8.0, 10.0])[None, :]          # [L, K]
    errors = np.asarray([[[3.0, 1.0, 0.0],        # big layer: 3 -> 0 costs 8 x 4 x 4 = 128 more
                          [2.0, 0.5, 0.1],        # mid
                          [4.0, 0.2, 0.0]]])      # small and sensitive
    budget = costs[:, 0].sum() + 40                                              # 40 units over all-A6
    got = allocate(errors, costs, budget)
    assert got.exact and got.cost <= budget
    assert got.error == _brute_force(errors, costs, budget)
    np.testing.assert_array_equal(got.choice, [[0, 2, 1]])
    assert got.error == pytest.approx(3.0 + 0.1 + 0.2) and got.cost == budget


@pytest.mark.parametrize("seed", range(6))
def test_random_small_problems_equal_brute_force(seed):
    rng = np.random.default_rng(seed)
    T, L, K = 2, 3, 3
    costs = rng.integers(1, 9, (L, K)).astype(float)
    errors = rng.random((T, L, K))
    cheapest, dearest = T * costs.min(axis=1).sum(), T * costs.max(axis=1).sum()
    budget = float(rng.integers(int(cheapest), int(dearest) + 1))
    got = allocate(errors, costs, budget)
    t, l = np.indices((T, L))
    assert got.exact and got.cost <= budget
    assert got.cost == np.broadcast_to(costs, errors.shape)[t, l, got.choice].sum()
    assert got.error == pytest.approx(_brute_force(errors, costs, budget), abs=1e-12)


def test_non_integer_costs_never_exceed_the_budget_and_use_most_of_it():
    """Costs off any grid (rounded to units): the budget always holds, at most 1% of what the budget allows
    above the cheapest schedule stays unused, and more budget never gives more error."""
    rng = np.random.default_rng(0)
    T, L, K = 25, 40, 3
    macs = rng.uniform(1e5, 1e7, L)
    costs = macs[:, None] * 4 * np.asarray([6.0, 8.0, 10.0]) * rng.uniform(0.99, 1.01, (L, 1))
    errors = np.sort(rng.random((T, L, K)), axis=-1)[..., ::-1] * macs[None, :, None]   # more bits, less error
    lo, hi = T * costs[:, 0].sum(), T * costs[:, 2].sum()
    previous = np.inf
    for frac in (0.1, 0.5, 0.9):
        budget = lo + frac * (hi - lo)
        got = allocate(errors, costs, budget)
        assert not got.exact and got.cost <= budget
        assert budget - got.cost <= 0.01 * (budget - lo), (budget, got.cost)
        assert got.error <= previous
        previous = got.error
    top = allocate(errors, costs, hi)
    assert top.cost <= hi and top.error <= errors[..., 2].sum() * 1.01


def test_a_budget_below_the_cheapest_schedule_is_refused():
    with pytest.raises(ValueError, match="below the cheapest schedule"):
        allocate(np.zeros((1, 2, 3)), np.ones((2, 3)), 1.5)


@pytest.fixture(scope="module")
def tiny_errors(calib):
    """The tiny SD's min-max W4A{4,6,8} quantizer on the calibration data of the ``calib`` fixture (4 DDIM
    steps, 2 prompts x 2 guidance halves per step) and its ``[T, L, K]`` layer-step errors."""
    from qlip_jax.ptq.calibration import calibrate
    from qlip_jax.quant.state import QuantConfig
    from qlip_jax.selector.static import layer_step_errors

    pipe, data = calib
    quant = calibrate(pipe, QuantConfig((4, 6, 8), 4), data, "minmax")
    return pipe, data, quant, layer_step_errors(pipe.unet, pipe.sd.params["unet"], quant, data, pipe.num_steps)


def test_layer_step_errors_are_single_layer_quantization_errors(tiny_errors):
    """Entries equal a direct UNet call with only that layer at that width (checks the batching of
    (layer, width) pairs); lower widths do more damage on average; no entry is zero."""
    import jax.numpy as jnp

    from qlip_jax.quant.state import QuantArgs

    pipe, data, quant, errors = tiny_errors
    T, L, K = errors.shape
    assert (T, L, K) == (pipe.num_steps, len(quant.registry), 3)
    assert np.all(np.isfinite(errors)) and np.all(errors > 0)
    means = errors.mean(axis=(0, 1))
    assert means[0] > means[1] > means[2], means
    cfg, params = quant.config, pipe.sd.params["unet"]
    for t, l, k in [(0, 0, 0), (T - 1, L - 1, 2), (1, L // 2, 1)]:
        rows = np.flatnonzero(data.step_index == t)
        x, ts, c = data.latents[rows], data.timesteps[rows], data.context[rows]
        idx = np.full((len(rows), L), cfg.fp_index, np.int32)
        idx[:, l] = k
        q = QuantArgs.from_indices(quant.state, jnp.asarray(idx), quant.registry.names, cfg, step=t)
        out = np.asarray(pipe.unet.apply({"params": params}, x, ts, c, q), np.float64)
        ref = np.asarray(pipe.unet.apply({"params": params}, x, ts, c), np.float64)
        assert errors[t, l, k] == pytest.approx(np.mean((out - ref) ** 2), rel=1e-4), (t, l, k)


def test_static_schedule_meets_the_budget_and_beats_uniform(tiny_errors):
    """W4A6's budget: BitOPs within [99%, 100%] of uniform W4A6's, and a summed error no larger than
    uniform W4A6's (a feasible schedule of that budget), with some layer-steps below and some above A6."""
    from qlip_jax.selector.static import candidate_bitops, static_schedule

    _, _, quant, errors = tiny_errors
    got = static_schedule(errors, quant, 6)
    budget = errors.shape[0] * candidate_bitops(quant)[:, 1].sum()
    assert 0.99 * budget <= got.cost <= budget
    t, l = np.indices(got.choice.shape)
    assert got.error == pytest.approx(errors[t, l, got.choice].sum())
    assert got.error <= errors[..., 1].sum()
    assert (got.choice == 0).any() and (got.choice == 2).any()


@pytest.mark.slow  # a whole program end to end
def test_static_schedule_program_writes_a_schedule_the_sampler_reads(tiny_sd_dir, tiny_quant_dir, tmp_path, capsys):
    """``train/static_schedule.py`` on a tiny SD folder and a caption file: the schedule JSON loads for the
    quantizer's registry, is the allocation of the saved sensitivities under uniform W4A6's BitOPs, and the
    printed summary says so."""
    import json
    import os
    import sys

    from qlip_jax.ptq.persist import load_quant_setup, read_quant_info
    from qlip_jax.selector.schedule_io import load_schedule_json
    from qlip_jax.selector.static import static_schedule

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "train"))
    import static_schedule as program

    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(f"a {c} {t}" for c in ("red", "blue", "green") for t in ("star", "cat", "box")) + "\n")
    out = tmp_path / "static" / "w4a6.json"
    capsys.readouterr()
    assert program.main(["--model", tiny_sd_dir, "--quant", tiny_quant_dir, "--prompts", str(captions),
                         "--calib-prompts", "2", "--steps", "3", "--budget", "6", "--out", str(out), "--no-cache"]) == 0
    summary = json.loads(capsys.readouterr().out)
    quant, _ = load_quant_setup(tiny_quant_dir, read_quant_info(tiny_quant_dir)["model_fingerprint"])
    schedule, _ = load_schedule_json(str(out), quant.registry, quant.config, 3)
    errors = np.load(str(out) + ".errors.npy")
    assert errors.shape == (3, len(quant.registry), 3) and np.all(errors > 0)
    np.testing.assert_array_equal(schedule, static_schedule(errors, quant, 6).choice)
    assert 0.99 <= summary["bitops_vs_budget"] <= 1.0 and summary["error_sum"] <= summary["uniform_error_sum"]
    assert summary["budget"] == "W4A6" and sum(summary["share_per_width"].values()) == pytest.approx(1.0)
