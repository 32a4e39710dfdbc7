"""qlip_jax.distributed: --mesh parsing, the parameter sharding rules (on SD v1.4 shapes, nothing
materialised), and real multi-process runs: 2 processes x 2 CPU devices on JAX's distributed runtime
(gloo collectives), against one process with the same 4-device mesh."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, NamedSharding

from tiny_qlip import tiny_quant_dir  # noqa: F401  (fixture)

from qlip_jax.distributed import AXES, param_shardings, param_spec, parse_mesh
from qlip_jax.errors import BadArgument

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red star", "two blue squares", "a green circle", "a shape", "a yellow triangle", "three stars",
           "a big circle", "a small square"]


def test_parse_mesh():
    assert parse_mesh(None, 4) == {"data": 4, "fsdp": 1}
    assert parse_mesh("data=2,fsdp=2", 4) == {"data": 2, "fsdp": 2}
    assert parse_mesh("fsdp=4", 4) == {"data": 1, "fsdp": 4}
    assert parse_mesh("data=-1,fsdp=2", 8) == {"data": 4, "fsdp": 2}
    bad = {"data=3": "needs 3 devices, this run has 4", "dp=4": "unknown axis 'dp'",
           "data=2,fsdp": "not AXIS=SIZE", "data=2,data=2": "not AXIS=SIZE", "data=0,fsdp=4": "positive integer",
           "data=-1,fsdp=3": "divisible by 3", "data=-1,fsdp=-1": "at most one axis"}
    for text, problem in bad.items():
        with pytest.raises(BadArgument, match=problem) as e:
            parse_mesh(text, 4)
        assert "\n" not in e.value.message and "--mesh" in e.value.message


def test_param_spec_rules():
    P = jax.sharding.PartitionSpec
    assert param_spec((3, 3, 320, 640), 8) == P(None, None, None, "fsdp")     # conv: output channels
    assert param_spec((3, 3, 640, 4), 8) == P(None, None, "fsdp")             # ... else the largest divisible
    assert param_spec((768, 320), 8) == P("fsdp")                              # dense: the larger axis
    assert param_spec((320, 1280), 8) == P(None, "fsdp")
    assert param_spec((1283, 320), 8) == P(None, "fsdp")                       # larger axis not divisible
    assert param_spec((1283, 321), 8) == P()                                   # none divisible
    assert param_spec((1280,), 8) == P()                                       # small: replicated
    assert param_spec((3, 3, 320, 640), 1) == P()                              # no fsdp axis


def test_sd_v14_params_get_a_sharding_and_fsdp8_splits_them():
    """Every leaf of an SD v1.4-shaped UNet (``jax.eval_shape``, nothing allocated) gets a sharding; at
    ``fsdp=8`` one device holds at most 1/7 of the replicated bytes."""
    from qlip_jax.models.io import read_json
    from qlip_jax.models.configs import UNetConfig
    from qlip_jax.models.unet import abstract_unet_params

    config = UNetConfig.from_dict(read_json(os.path.join(ROOT, "tests", "data", "sd-v1-4", "unet", "config.json")))
    params = abstract_unet_params(config)
    shardings = param_shardings(params, AbstractMesh((1, 8), AXES))
    leaves, shards = jax.tree.leaves(params), jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    assert len(leaves) == len(shards) > 600 and all(isinstance(s, NamedSharding) for s in shards)
    full = sum(x.size * x.dtype.itemsize for x in leaves)
    per_device = sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize for x, s in zip(leaves, shards))
    assert full > 3.2 * 2 ** 30                                                 # 860M float32 parameters
    assert per_device <= full / 7, (per_device / full)
    assert per_device >= full / 8


def run_processes(argv: list[str], processes: int, devices: int) -> list[str]:
    """:func:`qlip_jax.distributed.launch_local` from the repository root; every process must succeed."""
    from qlip_jax.distributed import launch_local

    env = {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    results = launch_local(argv, processes, devices, timeout=600, env=env)
    for i, (code, _, err) in enumerate(results):
        assert code == 0, f"process {i} of {processes} failed:\n{err[-3000:]}"
    return [out for _, out, _ in results]


def test_sample_two_processes_equals_one(tiny_sd_dir, tmp_path):
    """``qlip sample --mesh data=2,fsdp=2`` as 2 processes x 2 CPU devices gives the grid of one process with
    the same 4-device mesh, bit for bit (float32, 8 prompts); only process 0 writes it."""
    from PIL import Image

    def sample(out, processes, devices):
        argv = ["-m", "qlip_jax.cli", "sample", "--model", tiny_sd_dir, "--steps", "3", "--mesh", "data=2,fsdp=2",
                "--out", str(out), "--no-cache"] + sum((["--prompt", p] for p in PROMPTS), [])
        return run_processes(argv, processes, devices)

    two = sample(tmp_path / "two.png", 2, 2)
    sample(tmp_path / "one.png", 1, 4)
    ours = [[line for line in out.splitlines() if not line.startswith("[Gloo]")] for out in two]  # gloo's own
    assert ours[0][-1] == str(tmp_path / "two.png") and ours[1] == []
    a, b = (np.asarray(Image.open(tmp_path / n)) for n in ("two.png", "one.png"))
    assert a.shape == b.shape and a.std() > 5
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mesh,problem", [("data=3", "--mesh data=3 needs 3 devices, this run has 1"),
                                          ("data=1,tp=1", "unknown axis 'tp'")])
def test_sample_refuses_a_bad_mesh_before_loading(mesh, problem, tmp_path):
    out = subprocess.run([sys.executable, "-m", "qlip_jax.cli", "sample", "--prompt", "a red star", "--mesh", mesh,
                          "--out", str(tmp_path / "g.png")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=ROOT)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and problem in lines[0], out.stderr[-2000:]
    assert "model loaded" not in out.stderr and not (tmp_path / "g.png").exists()


def test_train_selector_refuses_q2b_rows_that_do_not_split_before_loading(tmp_path):
    """``--batch 3 --rows-per-prompt 1`` over 4 devices (no ``--mesh``: all on ``data``): one error line
    naming the rows and the shards, before the model loads or ``--work`` is made."""
    from qlip_jax.distributed import launch_local

    (code, _, err), = launch_local([os.path.join(ROOT, "train", "train_selector.py"), "--quant", str(tmp_path),
                                    "--work", str(tmp_path / "w"), "--out", str(tmp_path / "s"), "--batch", "3",
                                    "--rows-per-prompt", "1"], 1, 4, timeout=300,
                                   env={"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert "(Q2B rows) is 3, which does not split over the mesh's 4 batch shards" in lines[0], lines[0]
    assert not (tmp_path / "w").exists()


def _pretrain(tmp_path, name, mesh, processes, devices, *extra):
    work = tmp_path / name
    argv = ["train/pretrain.py", "--work", str(work / "work"), "--out", str(work / "out"), "--preset", "tiny",
            "--vae-steps", "1", "--vae-batch", "4", "--num-scenes", "16", "--steps", "10", "--batch", "8",
            "--ckpt-every", "5", "--sample-every", "0", "--mesh", mesh, "--quiet", "--no-cache", *extra]
    out = run_processes(argv, processes, devices)
    if "--stop-at" in extra:
        return None
    from qlip_jax.training import Checkpointer

    state, _ = Checkpointer(str(work / "work" / "diffusion")).restore()  # NumPy, whatever mesh it was saved on
    loss = json.loads(out[0][out[0].index("{"):])["final_loss"]
    return loss, jax.tree.leaves(state["params"]), int(state["step"])


@pytest.mark.slow
def test_pretrain_fsdp_two_processes_resuming_another_mesh(tmp_path):
    """``train/pretrain.py``: 5 steps in one process on ``--mesh data=4``, then resumed to step 10 as 2 processes
    x 2 CPU devices on ``--mesh data=2,fsdp=2`` (params, Adam moments and EMA restored onto the new mesh and
    split on fsdp; each process reads and saves its own shards with orbax), against 10 steps in one
    process on ``data=4``: the loss within 1e-5 and the parameters within 1e-6 relative (L2). Not bit for
    bit: gloo sums gradients across processes in another order than one process does (measured: also
    against one process with the same data=2,fsdp=2 mesh), and Adam turns such float-rounding differences
    of near-zero gradients into steps of up to a tenth of the learning rate on a few elements (max 4e-5
    after 20 steps)."""
    _pretrain(tmp_path, "resumed", "data=4", 1, 4, "--stop-at", "5")
    loss2, params2, step2 = _pretrain(tmp_path, "resumed", "data=2,fsdp=2", 2, 2)
    loss4, params4, step4 = _pretrain(tmp_path, "straight", "data=4", 1, 4)
    assert step2 == step4 == 10 and np.isfinite(loss2)
    assert abs(loss2 - loss4) <= 1e-5, (loss2, loss4)
    d = np.concatenate([(a - b).ravel() for a, b in zip(params2, params4)])
    w = np.concatenate([a.ravel() for a in params4])
    assert np.linalg.norm(d) <= 1e-6 * np.linalg.norm(w), np.linalg.norm(d) / np.linalg.norm(w)


@pytest.mark.slow
def test_evaluate_two_processes_equals_one(tiny_sd_dir, tiny_quant_dir, tmp_path):
    """``eval/evaluate.py --mesh data=4`` (FP and W4A8 on 4 prompts of a caption file, FID/sFID with the FID
    Inception against a folder of 8 PNGs) as 2 processes x 2 CPU devices and as one process with 4: the
    same images, so the same FID, sFID and per-image PSNR; only process 0 writes the report."""
    import csv

    from PIL import Image

    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(f"a {s} {c} {t}" for c in ("red", "blue", "green", "gray")
                                  for t in ("star", "cat", "dog", "box") for s in ("big", "small")) + "\n")  # 8 eval
    ref = tmp_path / "photos"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(ref / f"{i}.png")

    def evaluate(name, processes, devices):
        out = tmp_path / name
        argv = [os.path.join(ROOT, "eval", "evaluate.py"), "--model", tiny_sd_dir, "--prompts", str(captions),
                "--reference", str(ref), "--quant", tiny_quant_dir, "--settings", "W4A8", "--n", "4", "--steps", "3",
                "--guidance", "3", "--batch", "4", "--inception", "on", "--ref-n", "8", "--cache",
                str(tmp_path / f"cache-{name}"), "--out", str(out), "--quiet", "--mesh", "data=4", "--no-cache"]
        run_processes(argv, processes, devices)
        with open(out / "report.csv") as f:
            rows = {r["method"]: r for r in csv.DictReader(f)}
        return rows, json.loads((out / "report.json").read_text())

    two, two_json = evaluate("two", 2, 2)
    one, one_json = evaluate("one", 1, 4)
    assert list(two) == list(one) == ["FP", "W4A8 (minmax)"]
    for method in one:
        for key in ("fid", "sfid", "psnr"):
            a, b = float(two[method][key]), float(one[method][key])
            assert a == b or abs(a - b) <= 1e-6 * abs(b), (method, key, a, b)
        assert np.isfinite(float(one[method]["fid"])) and float(one[method]["fid"]) > 0
    assert two_json["per_image"] == one_json["per_image"]


@pytest.mark.slow
def test_calibrate_two_processes_equals_one(tiny_sd_dir, tmp_path):
    """``train/calibrate.py --method mse --mesh data=4`` (float trajectories of 8 caption-file prompts split over
    the devices of 2 processes x 2, statistics and clipping search on every process, the quantizer saved
    by all through orbax) against one process with 4 devices: scales and zero points within 2e-6 relative (measured:
    up to 1.0e-6; not bit for bit, not diagnosed), equal weight codes."""
    from qlip_jax.ptq.persist import load_quant_setup, read_quant_info

    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(f"a {s} {c} {t}" for c in ("red", "blue", "green", "gray")
                                  for t in ("star", "cat", "dog", "box") for s in ("big", "small")) + "\n")

    def calibrate(name, processes, devices):
        out = tmp_path / name
        run_processes([os.path.join(ROOT, "train", "calibrate.py"), "--model", tiny_sd_dir, "--prompts",
                       str(captions), "--method", "mse", "--calib-prompts", "8", "--steps", "3", "--keep-steps", "3",
                       "--out", str(out), "--mesh", "data=4", "--no-cache"], processes, devices)
        setup, _ = load_quant_setup(str(out), read_quant_info(str(out))["model_fingerprint"])
        return jax.tree.leaves(setup.state)

    two, one = calibrate("two", 2, 2), calibrate("one", 1, 4)
    assert len(two) == len(one) > 50
    for a, b in zip(two, one):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=2e-6, atol=0)


@pytest.mark.slow
def test_train_selector_two_processes_equals_one(tiny_sd_dir, tiny_quant_dir, tmp_path):
    """``train/train_selector.py --mesh data=2,fsdp=2``: labelling trajectories, T2Q and 10 Q2B iterations (each
    sampling its quantized trajectories over the mesh, its 4 rows split over 2 processes x 2 CPU devices, the
    UNet's params over fsdp) against one process with the same 4-device mesh. Equal: the labels and T2Q,
    bit for bit. Close: Adam's first moment (the running mean of the gradients) within 1e-4 relative L2
    and the Q2B params within 1e-3 (measured 3.2e-5 and 2.2e-5, max abs 1.1e-3), the held-out FAB equal.
    Not within 1e-5 element by element: Adam divides each gradient by its running RMS + 1e-8, so on elements
    whose gradients are ~1e-9 a rounding-size difference becomes a step difference of a sizeable part of the
    learning rate (docs/distributed.md). Only process 0 writes the caches and the export."""
    from safetensors.numpy import load_file

    from qlip_jax.selector.quality import QualityTargets
    from qlip_jax.training import Checkpointer

    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(f"a {c} {t}" for c in ("red", "blue", "green", "gray")
                                  for t in ("star", "cat", "dog", "box")) + "\n")
    ref = tmp_path / "ref"  # the runner's scorer reads no reference; the program still checks the folder
    ref.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(ref / "0.png")

    def train(name, processes, devices):
        out, work = tmp_path / name / "out", tmp_path / name / "work"
        run_processes([os.path.join(ROOT, "tests", "selector_runner.py"), "--model", tiny_sd_dir, "--quant",
                       tiny_quant_dir, "--prompts", str(captions), "--reference", str(ref), "--work", str(work),
                       "--out", str(out), "--train-prompts", "4", "--heldout", "2", "--steps", "3", "--size", "32",
                       "--t2q-steps", "20", "--q2b-steps", "10", "--batch", "2", "--rows-per-prompt", "2",
                       "--group-size", "1", "--first-fp-steps", "0", "--lambda-bit", "0.01", "--mesh",
                       "data=2,fsdp=2", "--quiet", "--no-cache"], processes, devices)
        labels = [QualityTargets.load(str(work / n)) for n in sorted(os.listdir(work))
                  if n.startswith("labels-train") and n.endswith(".npz")]
        runs = [work / n for n in os.listdir(work) if n.startswith("q2b-")]
        assert len(runs) == 1 and len(labels) == 1
        state, _ = Checkpointer(str(runs[0])).restore()
        info = json.loads((out / "selector.json").read_text())["info"]
        return (labels[0], load_file(str(out / "t2q.safetensors")), load_file(str(out / "q2b.safetensors")),
                state["opt"][0]["mu"], info)

    two, one = train("two", 2, 2), train("one", 1, 4)
    np.testing.assert_array_equal(two[0].raw, one[0].raw)
    assert sorted(two[1]) == sorted(one[1]) and all(np.array_equal(two[1][k], one[1][k]) for k in one[1])

    def rel(a, b):
        a, b = (np.concatenate([np.ravel(x[k]).astype(np.float64) for k in sorted(x)]) for x in (a, b))
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    flat = lambda tree: {"/".join(map(str, p)): v for p, v in  # noqa: E731
                         ((tuple(getattr(k, "key", k) for k in path), v)
                          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0])}
    mu_rel, params_rel = rel(flat(two[3]), flat(one[3])), rel(two[2], one[2])
    assert mu_rel <= 1e-4 and params_rel <= 1e-3, (mu_rel, params_rel)
    assert abs(two[4]["heldout_fab_mean"] - one[4]["heldout_fab_mean"]) <= 1e-6 and np.isfinite(two[4]["final_mse"])
    # ... and Q2B moved the params (a run that skipped the iterations would pass the comparisons above)
    import jax.numpy as jnp

    from qlip_jax.ptq.persist import load_quant_setup, read_quant_info
    from qlip_jax.selector.q2b import Q2B, Q2BConfig

    setup, _ = load_quant_setup(tiny_quant_dir, read_quant_info(tiny_quant_dir)["model_fingerprint"])
    cfg = Q2BConfig(num_layers=len(setup.registry), num_steps=3, group_size=1, first_fp_steps=0, low=0, med=1, high=2)
    init = flat(Q2B(cfg).init(jax.random.key(1), jnp.zeros((1,)), 3)["params"])
    assert sorted(init) == sorted(one[2])
    assert max(float(np.abs(one[2][k] - init[k]).max()) for k in init) > 1e-3
    print(f"Q2B after 10 iterations, 2 processes vs 1: Adam mu rel L2 {mu_rel:.2e}, params rel L2 {params_rel:.2e}, "
          f"max abs {max(float(np.abs(two[2][k] - one[2][k]).max()) for k in one[2]):.2e}")
