"""The QLIP selector: T2Q, Q2B (formulas, forced steps, ablations, STE, resampling, bit penalty),
the jitted schedule selection, and schedule JSON/npy import/export. Small, CPU, fast."""

from __future__ import annotations

import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlip_jax.quant.registry import LayerInfo, Registry, average_act_bits
from qlip_jax.quant.state import QuantConfig
from qlip_jax.selector import (
    Q2B, Q2BConfig, T2Q, bit_penalty, hard_indices, load_schedule_json, load_schedule_npy, pearson,
    save_schedule_json, save_schedule_npy, schedule_from_json, schedule_to_json, select_schedule,
    spearman, ste_onehot, step_groups, t2q_loss,
)

L, T, M, m = 4, 10, 3, 2          # layers, training steps, group size, forced steps -> G = 4
CFG = Q2BConfig(num_layers=L, num_steps=T, group_size=M, first_fp_steps=m, low=0, med=1, high=2)
QCFG = QuantConfig(act_bits=(6, 8, 10))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _params(cfg=CFG, seed=0, s=None):
    """Non-trivial Q2B params (numpy float32)."""
    rng = np.random.default_rng(seed)
    G = cfg.num_groups
    return {"s": np.asarray(rng.uniform(1, 6, cfg.num_layers) if s is None else np.full(cfg.num_layers, s),
                            np.float32),
            "o": rng.normal(0, 0.5, cfg.num_layers).astype(np.float32),
            "p_m_logit": rng.normal(0, 1.5, (G, cfg.num_layers)).astype(np.float32),
            "p_h_logit": rng.normal(0, 1.5, (G, cfg.num_layers)).astype(np.float32)}


def _hand_probs(p, q, cfg, t_inf):
    """Loop-by-loop float64 evaluation of the paper's formulas with the documented resampling."""
    out = np.zeros((len(q), t_inf, cfg.num_layers, 3))
    for b, qb in enumerate(q):
        for i in range(t_inf):
            pos = i * cfg.num_steps / t_inf
            g = min(int(math.floor(pos / cfg.group_size)), cfg.num_groups - 1)
            for k in range(cfg.num_layers):
                pq = 1.0 if pos < cfg.first_fp_steps else _sigmoid((qb - 0.5) * p["s"][k] + p["o"][k])
                pm = _sigmoid(p["p_m_logit"][g, k]) if cfg.use_pm else 0.0
                ph = _sigmoid(p["p_h_logit"][g, k]) if cfg.use_ph else 1.0
                out[b, i, k] = [(1 - pq) * (1 - pm), (1 - pq) * pm + pq * (1 - ph), pq * ph]
    return out


# ----------------------------------------------------------------------------------------------
# T2Q


def test_t2q_output_loss_and_fit():
    x = jax.random.normal(jax.random.key(0), (16, 12))
    target = jnp.linspace(0.05, 0.95, 16)
    for act in ("gelu", "silu"):
        model = T2Q(hidden=8, activation=act)
        params = model.init(jax.random.key(1), x)["params"]
        assert params["fc1"]["kernel"].shape == (12, 8) and params["fc3"]["kernel"].shape == (8, 1)
        q = model.apply({"params": params}, x)
        assert q.shape == (16,) and bool(jnp.all((q > 0) & (q < 1)))
        loss = t2q_loss(params, x, target, model)
        np.testing.assert_allclose(loss, np.mean((np.asarray(q) - np.asarray(target)) ** 2), rtol=1e-6)
    # default model is read off the params (GELU): same value as passing it explicitly
    gelu = T2Q(hidden=8)
    params = gelu.init(jax.random.key(1), x)["params"]
    np.testing.assert_allclose(t2q_loss(params, x, target), t2q_loss(params, x, target, gelu), rtol=1e-7)
    # plain gradient descent lowers the MSE
    grad = jax.jit(jax.value_and_grad(t2q_loss))
    l0, _ = grad(params, x, target)
    for _ in range(200):
        _, g = grad(params, x, target)
        params = jax.tree.map(lambda p, d: p - 0.5 * d, params, g)
    assert float(grad(params, x, target)[0]) < 0.5 * float(l0)
    with pytest.raises(ValueError, match="activation"):
        T2Q(hidden=4, activation="relu").init(jax.random.key(0), x)


def test_correlations_with_ties():
    a = [1.0, 2.0, 2.0, 3.0, 5.0]
    b = [10.0, 30.0, 20.0, 40.0, 40.0]
    # average ranks by hand: a -> [0, 1.5, 1.5, 3, 4], b -> [0, 2, 1, 3.5, 3.5]
    ra, rb = np.array([0, 1.5, 1.5, 3, 4]), np.array([0, 2, 1, 3.5, 3.5])
    assert spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1], abs=1e-12)
    assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 40), rng.integers(0, 5, 40) + rng.integers(0, 2, 40)  # many ties
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])


# ----------------------------------------------------------------------------------------------
# Q2B


def test_q2b_param_shapes_and_init_picks_medium():
    model = Q2B(CFG)
    params = model.init(jax.random.key(0), jnp.zeros((1,)), T)["params"]
    assert CFG.num_groups == 4
    assert {k: v.shape for k, v in params.items()} == {"s": (L,), "o": (L,), "p_m_logit": (4, L),
                                                         "p_h_logit": (4, L)}
    q = jnp.linspace(0.0, 1.0, 11)
    probs = model.apply({"params": params}, q, T)
    np.testing.assert_allclose(probs[..., 1], 0.9, atol=1e-6)            # p_med = 0.9 for every q, t
    assert bool(jnp.all(hard_indices(probs, CFG) == CFG.med))
    # richer prompt: more p_high, less p_low (s > 0)
    assert float(probs[-1, -1, 0, 2]) > float(probs[0, -1, 0, 2])


def test_q2b_matches_hand_computation_and_sums_to_one():
    p = _params()
    q = np.array([0.0, 0.3, 0.5, 0.81, 1.0], np.float32)
    probs = np.asarray(Q2B(CFG).apply({"params": p}, jnp.asarray(q), T))
    assert probs.shape == (5, T, L, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    assert probs.min() >= 0
    np.testing.assert_allclose(probs, _hand_probs(p, q, CFG, T), atol=1e-6)
    # default num_steps is the training T
    np.testing.assert_allclose(Q2B(CFG).apply({"params": p}, jnp.asarray(q)), probs)


def test_first_m_steps_force_pq_one():
    # p_q would be ~0 elsewhere (q = 0, steep s, negative offset): low dominates after step m
    p = _params(s=40.0)
    p["o"][:] = -5.0
    p["p_m_logit"][:] = -3.0                    # lower branch prefers low
    probs = np.asarray(Q2B(CFG).apply({"params": p}, jnp.zeros((3,)), T))
    ph = _sigmoid(p["p_h_logit"][0])            # steps 0, 1 lie in group 0
    forced = probs[:, :m]
    np.testing.assert_array_equal(forced[..., 0], 0.0)                    # p_low = 0 exactly
    np.testing.assert_allclose(forced[..., 2], np.broadcast_to(ph, forced[..., 2].shape), atol=1e-6)
    np.testing.assert_allclose(forced[..., 1], 1 - np.broadcast_to(ph, forced[..., 1].shape), atol=1e-6)
    idx = np.asarray(hard_indices(jnp.asarray(probs), CFG))
    assert (idx[:, :m] != CFG.low).all()                                  # never b_low while forced
    expect = np.where(ph > 0.5, CFG.high, CFG.med)                       # [L]: med vs high by p_h
    np.testing.assert_array_equal(idx[:, :m], np.broadcast_to(expect, (3, m, L)))
    assert (idx[:, m:] == CFG.low).all()                                  # and low right after


@pytest.mark.parametrize("use_pm,use_ph", [(False, False), (False, True), (True, False), (True, True)])
def test_ablations(use_pm, use_ph):
    cfg = Q2BConfig(L, T, M, m, use_pm=use_pm, use_ph=use_ph)
    p = _params(cfg, seed=3)
    q = np.array([0.1, 0.6, 0.95], np.float32)
    probs = np.asarray(Q2B(cfg).apply({"params": p}, jnp.asarray(q), T))
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(probs, _hand_probs(p, q, cfg, T), atol=1e-6)
    if not use_pm and not use_ph:                                         # "p_q only": two-way low/high
        np.testing.assert_array_equal(probs[..., 1], 0.0)
    if not use_pm:                                                        # p_m = 0: p_low = 1 - p_q
        np.testing.assert_array_equal(probs[:, :m, :, 0], 0.0)
        assert (probs[:, m:, :, 0] > 0).all()
    if not use_ph:                                                        # p_h = 1: p_high = p_q
        np.testing.assert_allclose(probs[:, :m, :, 2], 1.0, atol=1e-6)
        p_q = _sigmoid((q[:, None] - 0.5) * p["s"] + p["o"])                # [B, L], unforced steps
        np.testing.assert_allclose(probs[:, m:, :, 2], np.broadcast_to(p_q[:, None], probs[:, m:, :, 2].shape),
                                   atol=1e-6)


def test_hard_indices_is_mapped_argmax():
    cfg = Q2BConfig(L, T, M, m, low=0, med=2, high=3)                     # e.g. skip a width, or fp
    probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (2, T, L, 3)) * 3)
    idx = np.asarray(hard_indices(probs, cfg))
    assert idx.dtype == np.int32 and idx.shape == (2, T, L)
    np.testing.assert_array_equal(idx, np.array([0, 2, 3])[np.argmax(np.asarray(probs), -1)])


def test_ste_forward_onehot_backward_soft():
    p = _params(seed=5)
    q = jnp.array([0.2, 0.7])
    model = Q2B(CFG)
    probs = model.apply({"params": p}, q, T)
    hard = np.asarray(ste_onehot(probs))
    assert set(np.unique(hard)) <= {0.0, 1.0}
    np.testing.assert_array_equal(hard.sum(-1), 1.0)
    np.testing.assert_array_equal(hard.argmax(-1), np.asarray(probs).argmax(-1))
    c = jax.random.normal(jax.random.key(1), probs.shape)

    def toy_ste(params):
        return jnp.sum(c * ste_onehot(model.apply({"params": params}, q, T)) ** 2)

    def toy_soft(params):                     # the same loss, derivative evaluated at the hard value
        pr = model.apply({"params": params}, q, T)
        return jnp.sum(2 * c * jax.lax.stop_gradient(jnp.asarray(hard)) * pr)

    g_ste, g_soft = jax.grad(toy_ste)(p), jax.grad(toy_soft)(p)
    for k in p:
        np.testing.assert_allclose(g_ste[k], g_soft[k], rtol=1e-5, atol=1e-7)
        assert np.abs(np.asarray(g_ste[k])).sum() > 0, k
    # linear loss: STE gradient equals the gradient of the same loss on the soft probs
    lin = lambda f: (lambda params: jnp.sum(c * f(model.apply({"params": params}, q, T))))
    g1, g2 = jax.grad(lin(ste_onehot))(p), jax.grad(lin(lambda x: x))(p)
    for k in p:
        np.testing.assert_allclose(g1[k], g2[k], rtol=1e-6, atol=1e-8)


def test_step_resampling():
    p = _params(seed=7)
    q = jnp.array([0.25, 0.9])
    model = Q2B(CFG)
    group, forced = step_groups(CFG, T)
    np.testing.assert_array_equal(group, np.minimum(np.arange(T) // M, CFG.num_groups - 1))
    np.testing.assert_array_equal(forced, np.arange(T) < m)
    base = np.asarray(model.apply({"params": p}, q, T))
    # T_inf = 2T: every training step appears twice, in order (forced steps too)
    double = np.asarray(model.apply({"params": p}, q, 2 * T))
    np.testing.assert_array_equal(double[:, 0::2], base)
    np.testing.assert_array_equal(double[:, 1::2], base)
    g2, f2 = step_groups(CFG, 2 * T)
    np.testing.assert_array_equal(g2, np.repeat(group, 2))
    np.testing.assert_array_equal(f2, np.repeat(forced, 2))
    # T_inf = T / 2: every other training step; odd T_inf: groups stay in range and monotone
    np.testing.assert_array_equal(np.asarray(model.apply({"params": p}, q, T // 2)), base[:, 0::2])
    g7, _ = step_groups(CFG, 7)
    np.testing.assert_array_equal(g7, [0, 0, 0, 1, 1, 2, 2])     # floor(i * 10 / 7 / 3)
    np.testing.assert_allclose(model.apply({"params": p}, q, 7), _hand_probs(p, np.asarray(q), CFG, 7),
                               atol=1e-6)


def test_bit_penalty_value_and_gradient():
    p = _params(seed=9)
    q = jnp.array([0.3, 0.8, 0.55])
    model = Q2B(CFG)
    probs = model.apply({"params": p}, q, T)
    w = jnp.array([0.5, 1.0, 1.5, 1.0])
    expect = np.mean(np.sum(10 * np.asarray(probs[..., 2]) * np.asarray(w)
                            + 8 * np.asarray(probs[..., 1]) * np.asarray(w), axis=(1, 2)))
    np.testing.assert_allclose(bit_penalty(probs, 10.0, 8.0, w), expect, rtol=1e-6)
    np.testing.assert_allclose(bit_penalty(probs, 10.0, 8.0),
                               np.mean(np.sum(10 * probs[..., 2] + 8 * probs[..., 1], axis=(1, 2))), rtol=1e-6)
    with pytest.raises(ValueError, match="weights"):
        bit_penalty(probs, 10.0, 8.0, jnp.ones(L + 1))

    pen = lambda params: bit_penalty(model.apply({"params": params}, q, T), 10.0, 8.0, w)
    g = jax.grad(pen)(p)
    assert (np.asarray(g["p_h_logit"]) > 0).all()          # descent lowers every p_h
    assert (np.asarray(g["p_m_logit"]) > 0).all()          # ... and every p_m (med costs more than low)
    new = jax.tree.map(lambda a, b: a - 0.5 * b, p, g)
    before, after = probs, model.apply({"params": new}, q, T)
    assert float(after[..., 2].mean()) < float(before[..., 2].mean())
    assert float(pen(new)) < float(pen(p))


def test_richer_prompt_gets_more_bits():
    p = _params(seed=11, s=8.0)
    p["o"][:] = 0.0
    p["p_m_logit"][:] = np.random.default_rng(0).uniform(-1, 1, p["p_m_logit"].shape)
    p["p_h_logit"][:] = np.random.default_rng(1).uniform(-1, 1, p["p_h_logit"].shape)
    q = jnp.linspace(0.0, 1.0, 11)
    sched = hard_indices(Q2B(CFG).apply({"params": p}, q, T), CFG)
    fab = np.asarray(average_act_bits(sched, QCFG))
    assert (np.diff(fab) >= 0).all(), fab
    assert fab[-1] > fab[0] + 1.0, fab
    # s < 0 reverses it
    p["s"][:] = -8.0
    fab_neg = np.asarray(average_act_bits(hard_indices(Q2B(CFG).apply({"params": p}, q, T), CFG), QCFG))
    assert fab_neg[0] > fab_neg[-1]


def test_select_schedule_compiles_once():
    D = 12
    t2q, q2b = T2Q(hidden=8), Q2B(CFG)
    t2q_params = t2q.init(jax.random.key(0), jnp.zeros((1, D)))["params"]
    q2b_params = jax.tree.map(jnp.asarray, _params(seed=13))

    # trace counter on the undecorated function, jitted the same way
    counted = jax.jit(chex.assert_max_traces(select_schedule.__wrapped__, n=1),
                      static_argnames=("t2q", "q2b", "num_steps"))
    before = select_schedule._cache_size()
    for i in range(6):
        pooled = jax.random.normal(jax.random.key(100 + i), (3, D)) * (1 + i)
        q, sched = select_schedule(t2q_params, q2b_params, pooled, t2q, q2b, T)
        q_c, sched_c = counted(t2q_params, q2b_params, pooled, t2q, q2b, num_steps=T)
        assert q.shape == (3,) and sched.shape == (3, T, L) and sched.dtype == jnp.int32
        np.testing.assert_array_equal(sched, sched_c)
        q_ref = t2q.apply({"params": t2q_params}, pooled)
        np.testing.assert_allclose(q, q_ref, rtol=1e-6)
        np.testing.assert_array_equal(sched, hard_indices(q2b.apply({"params": q2b_params}, q_ref, T), CFG))
    assert select_schedule._cache_size() - before == 1


# ----------------------------------------------------------------------------------------------
# schedule JSON / npy

REG = Registry(tuple(LayerInfo(f"down_blocks.{i}.conv", "conv", 100 * (i + 1), 8) for i in range(L)))


def _sched(seed=0, steps=T):
    return np.random.default_rng(seed).integers(0, QCFG.fp_index + 1, (steps, L)).astype(np.int32)


def test_json_round_trip_exact(tmp_path):
    sched = _sched()
    sched[0, 0] = QCFG.fp_index
    path = tmp_path / "s.json"
    save_schedule_json(path, sched, REG, QCFG, prompt='a "red" bicycle')
    obj = json.loads(path.read_text())
    assert obj["layer_names"] == list(REG.names) and obj["act_bits"] == [6, 8, 10] and obj["steps"] == T
    assert obj["schedule"][0][0] == "fp"
    assert obj["schedule"][1] == ["fp" if i == 3 else [6, 8, 10][i] for i in sched[1]]
    back, prompt = load_schedule_json(path, REG, QCFG, num_steps=T)
    assert back.dtype == np.int32 and prompt == 'a "red" bicycle'
    np.testing.assert_array_equal(back, sched)
    # hand edit: reorder the columns (names and entries together) -> same schedule
    perm = [2, 0, 3, 1]
    obj["layer_names"] = [obj["layer_names"][j] for j in perm]
    obj["schedule"] = [[row[j] for j in perm] for row in obj["schedule"]]
    np.testing.assert_array_equal(schedule_from_json(obj, REG.names, QCFG)[0], sched)
    # [1, T, L] accepted on export
    assert schedule_to_json(sched[None], REG, QCFG)["schedule"] == schedule_to_json(sched, REG, QCFG)["schedule"]


def test_json_validation_errors(tmp_path):
    good = schedule_to_json(_sched(1), REG, QCFG, "p")

    def bad(**changes):
        obj = json.loads(json.dumps(good))
        obj.update(changes)
        return obj

    names = list(REG.names)
    with pytest.raises(ValueError, match=r"unknown layer.*'up_blocks\.9\.conv'"):
        schedule_from_json(bad(layer_names=names[:-1] + ["up_blocks.9.conv"]), REG, QCFG)
    with pytest.raises(ValueError, match=r"more than once"):
        schedule_from_json(bad(layer_names=names[:-1] + names[:1]), REG, QCFG)
    with pytest.raises(ValueError, match=r"no column for layer"):
        schedule_from_json(bad(layer_names=names[:-1], schedule=[r[:-1] for r in good["schedule"]]), REG, QCFG)
    rows = json.loads(json.dumps(good["schedule"]))
    rows[4][2] = 7
    with pytest.raises(ValueError, match=r"step 4, layer 'down_blocks\.2\.conv'.*bit width 7 is not a candidate"):
        schedule_from_json(bad(schedule=rows), REG, QCFG)
    rows[4][2] = "int8"
    with pytest.raises(ValueError, match=r"step 4.*'int8' is not a bit width"):
        schedule_from_json(bad(schedule=rows), REG, QCFG)
    rows[4][2] = 8.0                       # an integral float is a width
    assert schedule_from_json(bad(schedule=rows), REG, QCFG)[0][4, 2] == 1
    with pytest.raises(ValueError, match=r"wrong step count.*says 9.*10 rows"):
        schedule_from_json(bad(steps=9), REG, QCFG)
    with pytest.raises(ValueError, match=r"wrong step count.*10 steps.*sampler runs 25"):
        schedule_from_json(good, REG, QCFG, num_steps=25)
    rows = json.loads(json.dumps(good["schedule"]))
    rows[3] = rows[3][:-1]
    with pytest.raises(ValueError, match=r"step 3: expected a list of 4"):
        schedule_from_json(bad(schedule=rows), REG, QCFG)
    with pytest.raises(ValueError, match=r"lacks key"):
        schedule_from_json({"layer_names": names}, REG, QCFG)
    # a config without width 6 rejects a schedule using it
    with pytest.raises(ValueError, match=r"bit width 6 is not a candidate"):
        schedule_from_json(schedule_to_json(np.zeros((T, L), np.int32), REG, QCFG), REG,
                           QuantConfig(act_bits=(8, 16)))
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_schedule_json(path, REG, QCFG)


def test_npy_round_trip_and_checks(tmp_path):
    sched = np.stack([_sched(2), _sched(3)])
    path = tmp_path / "s.npy"
    save_schedule_npy(path, sched, QCFG)
    back = load_schedule_npy(path, REG, QCFG, num_steps=T)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, sched)
    np.testing.assert_array_equal(load_schedule_npy(path, L, QCFG), sched)
    with pytest.raises(ValueError, match="wrong step count"):
        load_schedule_npy(path, REG, QCFG, num_steps=T + 1)
    with pytest.raises(ValueError, match="layer columns"):
        load_schedule_npy(path, L + 1, QCFG)
    np.save(tmp_path / "bad.npy", np.full((T, L), 9, np.int32))
    with pytest.raises(ValueError, match="out of the candidate set"):
        load_schedule_npy(tmp_path / "bad.npy", REG, QCFG)
