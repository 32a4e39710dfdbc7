"""Bad input at every program's boundary (issue 38): one ``error:`` line, exit code 2, no traceback, no file
created or changed, nothing compiled; plus the boundary's --debug, the atomic writers, the --out claim.

Each row of ``CASES`` is ``(id, program, argv, pattern)``: ``argv`` may use ``{tmp}`` (the case's own empty
folder, where every output goes), ``{tiny}`` (the tiny SD folder), ``{bad}`` (shared broken inputs, below).
Almost all are refused before a model is loaded; the rows marked "after load" load the tiny model (no
compile) and are refused there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import threading

import numpy as np
import pytest
from refusal import refused

from qlip_jax.errors import BadArgument, BadFile, QlipInputError, program, run_program

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # benchmarks/training.py imports its sibling as 'sampling'


def _main(name: str):
    import importlib

    modules = {"qlip": "qlip_jax.cli", "bench-sampling": "sampling", "bench-training": "training"}
    return importlib.import_module(modules.get(name, name)).main


S = ["sample", "--prompt", "a red star"]                      # qlip sample, one prompt
ST = S + ["--model", "{tiny}", "--steps", "3", "--out", "{tmp}/g.png"]   # ... on the tiny model
PRE = ["--work", "{tmp}/w", "--out", "{tmp}/o", "--preset", "tiny"]      # train/pretrain.py

CASES = [
    # --seed: unsigned 32-bit, prompt i uses S + i
    ("seed-2**32", "qlip", S + ["--seed", "4294967296", "--out", "{tmp}/g.png"], r"--seed must be between 0 and 4294967295, got 4294967296"),
    ("seed-negative", "qlip", S + ["--seed", "-1", "--out", "{tmp}/g.png"], r"--seed .* got -1; seeds are unsigned 32-bit"),
    ("seed-last-of-2", "qlip", S + ["--prompt", "b", "--seed", "4294967295", "--out", "{tmp}/g.png"], r"between 0 and 4294967294.*2 prompts"),
    # --steps, --guidance, counts
    ("steps-0", "qlip", S + ["--steps", "0", "--out", "{tmp}/g.png"], r"--steps must be between 1 and 1000, got 0"),
    ("steps-huge", "qlip", S + ["--steps", "100000", "--out", "{tmp}/g.png"], r"--steps .* got 100000"),
    ("steps-not-int", "qlip", S + ["--steps", "ten", "--out", "{tmp}/g.png"], r"argument --steps: invalid int value"),
    ("guidance-nan", "qlip", S + ["--guidance", "nan", "--out", "{tmp}/g.png"], r"--guidance must be a finite number, got nan"),
    ("guidance-inf", "qlip", S + ["--guidance", "inf", "--out", "{tmp}/g.png"], r"--guidance must be a finite number, got inf"),
    ("calib-prompts-0", "qlip", S + ["--calib-prompts", "0", "--out", "{tmp}/g.png"], r"--calib-prompts must be >= 1"),
    ("prompt-empty", "qlip", ["sample", "--prompt", " ", "--out", "{tmp}/g.png"], r"--prompt is empty"),
    # --precision
    ("precision-w1", "qlip", S + ["--precision", "w1a8", "--out", "{tmp}/g.png"], r"--precision w1a8: bit width 1 outside the supported range \[2, 32\]"),
    ("precision-a64", "qlip", S + ["--precision", "W4A64", "--out", "{tmp}/g.png"], r"bit width 64 outside the supported range"),
    ("precision-word", "qlip", S + ["--precision", "int4", "--out", "{tmp}/g.png"], r"--precision must be fp, qlip, wXaY"),
    ("act-bits-1", "qlip", S + ["--precision", "{bad}/ok.npy", "--act-bits", "1", "8", "--out", "{tmp}/g.png"], r"bit width 1 outside"),
    # .npy schedules: file-level checks before the model
    ("npy-missing", "qlip", S + ["--precision", "{tmp}/none.npy", "--out", "{tmp}/g.png"], r"schedule file not found: .*none.npy"),
    ("npy-float", "qlip", S + ["--precision", "{bad}/float.npy", "--out", "{tmp}/g.png"], r"float.npy: schedule entries must be integer .* float32"),
    ("npy-1d", "qlip", S + ["--precision", "{bad}/1d.npy", "--out", "{tmp}/g.png"], r"1d.npy: a schedule must have shape \[T, L\] or \[B, T, L\], got \(5,\)"),
    ("npy-4d", "qlip", S + ["--precision", "{bad}/4d.npy", "--out", "{tmp}/g.png"], r"4d.npy: .*got \(1, 1, 3, 5\)"),
    ("npy-batch", "qlip", S + ["--prompt", "b", "--precision", "{bad}/b3.npy", "--out", "{tmp}/g.png"], r"b3.npy: the schedule has 3 rows \[B, T, L\] for 2 prompt"),
    ("npy-index-high", "qlip", S + ["--precision", "{bad}/high.npy", "--out", "{tmp}/g.png"], r"high.npy: bit index out of the candidate set: found \[7, .*valid indices are 0..3"),
    ("npy-index-negative", "qlip", S + ["--precision", "{bad}/neg.npy", "--out", "{tmp}/g.png"], r"neg.npy: bit index out .*found \[-1,"),
    ("npy-garbage", "qlip", S + ["--precision", "{bad}/garbage.npy", "--out", "{tmp}/g.png"], r"garbage.npy: not a readable .npy array"),
    ("npy-pickle", "qlip", S + ["--precision", "{bad}/pickle.npy", "--out", "{tmp}/g.png"], r"pickle.npy: not a readable .npy array"),
    # .json schedules
    ("json-invalid", "qlip", S + ["--precision", "{bad}/broken.json", "--out", "{tmp}/g.png"], r"broken.json: not valid JSON"),
    ("json-list", "qlip", S + ["--precision", "{bad}/list.json", "--out", "{tmp}/g.png"], r"list.json: not a schedule JSON object"),
    # --out
    ("out-no-extension", "qlip", S + ["--out", "{tmp}/grid"], r"--out .*grid has no image extension; end it with one of .png"),
    ("out-txt", "qlip", S + ["--out", "{tmp}/grid.txt"], r"unknown image extension '.txt'"),
    ("out-exists", "qlip", S + ["--out", "{bad}/keep.png"], r"keep.png exists .*pass --overwrite"),
    ("out-is-folder", "qlip", S + ["--out", "{bad}/folder.png"], r"folder.png is a folder"),
    ("out-under-a-file", "qlip", S + ["--out", "{bad}/keep.png/g.png"], r"keep.png is a file, so .* cannot be a folder"),
    # folders that are not there
    ("model-missing", "qlip", S + ["--model", "{tmp}/nope", "--out", "{tmp}/g.png"], r"model folder not found: .*nope"),
    ("selector-missing", "qlip", S + ["--precision", "qlip", "--selector", "{tmp}/nosel", "--out", "{tmp}/g.png"], r"no QLIP selector at .*nosel .*train/train_selector.py"),
    ("quant-missing", "qlip", S + ["--precision", "w4a8", "--quant", "{tmp}/noq", "--out", "{tmp}/g.png"], r"no quantizer state at .*noq"),
    # after load: files name themselves, parts made for another model are refused
    ("safetensors-truncated", "qlip", S + ["--model", "{bad}/sd_trunc", "--out", "{tmp}/g.png"], r"sd_trunc/unet/diffusion_pytorch_model.safetensors: unreadable safetensors file"),
    ("config-invalid-json", "qlip", S + ["--model", "{bad}/sd_json", "--out", "{tmp}/g.png"], r"sd_json/vae/config.json: invalid JSON \(Extra data: line"),
    ("model-index-missing", "qlip", S + ["--model", "{bad}/sd_noindex", "--out", "{tmp}/g.png"], r"missing config file: .*sd_noindex/model_index.json"),
    ("selector-json-field", "qlip", ST + ["--precision", "qlip", "--selector", "{bad}/sel_nopool"], r"sel_nopool/selector.json: missing field\(s\) \['pooling'\]"),
    ("selector-json-invalid", "qlip", ST + ["--precision", "qlip", "--selector", "{bad}/sel_broken"], r"sel_broken/selector.json: invalid JSON"),
    ("selector-other-model", "qlip", ST + ["--precision", "qlip"], r"the selector in .*assets/selector does not belong to this model.*calibrated for model"),
    ("quant-other-model", "qlip", ST + ["--precision", "w4a8", "--quant", "{shipped_quant}"], r"was calibrated for model .* not for this model"),
    ("quant-truncated", "qlip", ST + ["--precision", "w4a8", "--quant", "{bad}/quant_trunc"], r"quant_trunc: unreadable quantizer state metadata"),
    # qlip demo / eval/evaluate.py
    ("demo-n-1", "qlip", ["demo", "--n", "1", "--out", "{tmp}/demo"], r"--n must be between 2 and \d+, got 1"),
    ("demo-out-file", "qlip", ["demo", "--out", "{bad}/keep.png"], r"--out .*keep.png is a file, not a folder"),
    ("evaluate-seed", "eval.evaluate", ["--quant", "{tmp}", "--seed", "-2", "--out", "{tmp}/ev"], r"--seed .* got -2"),
    # train/
    ("pretrain-seed", "train.pretrain", PRE + ["--seed", "4294967295"], r"--seed must be between 0 and 4294967294.*--seed \+ 1"),
    ("pretrain-steps", "train.pretrain", PRE + ["--steps", "-1"], r"--steps must be >= 0, got -1"),
    ("pretrain-lr", "train.pretrain", PRE + ["--lr", "nan"], r"--lr must be a finite number"),
    ("pretrain-batch", "train.pretrain", PRE + ["--batch", "0"], r"--batch must be >= 1"),
    ("pretrain-init-from", "train.pretrain", PRE + ["--init-from", "{tmp}/nothing"], r"--init-from folder not found"),
    ("pretrain-ema", "train.pretrain", PRE + ["--ema-decay", "1.5"], r"--ema-decay must be in \[0, 1\]"),
    ("calibrate-bits", "train.calibrate", ["--out", "{tmp}/q", "--act-bits", "6", "99"], r"bit width 99 outside the supported range"),
    ("calibrate-out-file", "train.calibrate", ["--out", "{bad}/keep.png"], r"keep.png is a file, not a folder"),
    ("calibrate-prompt-file", "train.calibrate", ["--out", "{tmp}/q", "--prompts", "{tmp}/p.txt"], r"prompt file not found: .*p.txt; check --prompts"),
    ("calibrate-init-from-method", "train.calibrate", ["--out", "{tmp}/q", "--init-from", "{tmp}"], r"--init-from applies to --method ptqd alone"),
    ("calibrate-init-from-missing", "train.calibrate", ["--out", "{tmp}/q", "--method", "ptqd", "--init-from", "{tmp}/noq"], r"no quantizer state at .*noq"),
    ("calibrate-recon-iters", "train.calibrate", ["--out", "{tmp}/q", "--method", "qdiff", "--recon-iters", "0"], r"--recon-iters must be >= 1, got 0"),
    ("calibrate-recon-method", "train.calibrate", ["--out", "{tmp}/q", "--method", "ptqd", "--init", "mse", "--recon-batch", "4"], r"--recon-iters/--recon-batch apply to --method qdiff"),
    ("calibrate-seed", "train.calibrate", ["--out", "{tmp}/q", "--seed", "4294967290"], r"--seed must be between 0 and 4294967264"),
    ("selector-quant-missing", "train.train_selector", ["--work", "{tmp}/w", "--out", "{tmp}/s", "--quant", "{tmp}/noq"], r"--quant folder not found"),
    ("selector-lambda", "train.train_selector", ["--work", "{tmp}/w", "--out", "{tmp}/s", "--quant", "{tmp}", "--lambda-bit", "-1"], r"--lambda-bit must be >= 0.0"),
    ("static-quant-missing", "train.static_schedule", ["--out", "{tmp}/s.json", "--budget", "8", "--quant", "{tmp}/noq"], r"--quant folder not found"),
    ("static-calib-prompts", "train.static_schedule", ["--out", "{tmp}/s.json", "--budget", "8", "--quant", "{tmp}", "--calib-prompts", "0"], r"--calib-prompts must be >= 1, got 0"),
    ("parser-lr", "train.train_parser", ["--out", "{tmp}/p", "--lr", "inf"], r"--lr must be a finite number"),
    # eval/ and benchmarks/
    ("ptq-setting", "eval.ptq_report", ["--out", "{tmp}/r", "--settings", "W4A8", "4bit"], r"a setting looks like W4A8, got '4bit'"),
    ("ptq-width", "eval.ptq_report", ["--out", "{tmp}/r", "--settings", "W4A1"], r"bit width 1 outside"),
    ("sensitivity-bits", "eval.sensitivity", ["--out", "{tmp}/r", "--act-bits", "40"], r"bit width 40 outside"),
    ("alignment-steps", "eval.alignment", ["--out", "{tmp}/r", "--steps", "0"], r"--steps must be between 1 and 1000"),
    ("denoise-guidance", "eval.denoise_probe", ["--guidance", "nan"], r"--guidance must be a finite number"),
    ("ambiguity-seed", "eval.caption_ambiguity", ["--seed", "-5"], r"--seed .* got -5"),
    ("object-signal-n", "eval.object_signal", ["--n", "0"], r"--n must be >= 1, got 0"),
    ("bench-steps", "bench-sampling", ["--steps", "0"], r"--steps must be between 1 and 1000"),
    ("bench-training-repeats", "bench-training", ["--repeats", "0"], r"--repeats must be >= 1"),
]


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_sd_dir):
    """Broken inputs shared by the table (made once)."""
    d = tmp_path_factory.mktemp("bad")
    np.save(d / "ok.npy", np.zeros((3, 5), np.int32))
    np.save(d / "float.npy", np.zeros((3, 5), np.float32))
    np.save(d / "1d.npy", np.zeros(5, np.int32))
    np.save(d / "4d.npy", np.zeros((1, 1, 3, 5), np.int32))
    np.save(d / "b3.npy", np.zeros((3, 3, 5), np.int32))
    np.save(d / "high.npy", np.full((3, 5), 7, np.int32))
    np.save(d / "neg.npy", np.full((3, 5), -1, np.int32))
    (d / "garbage.npy").write_bytes(b"\x93NUMPY not really")
    np.save(d / "pickle.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (d / "broken.json").write_text('{"schedule": [1, 2]}\n}')
    (d / "list.json").write_text("[1, 2, 3]")
    (d / "keep.png").write_bytes(b"precious")
    (d / "folder.png").mkdir()
    # model folders: a truncated safetensors, a config.json with trailing garbage, no model_index.json
    for name in ("sd_trunc", "sd_json", "sd_noindex"):
        shutil.copytree(tiny_sd_dir, d / name)
    f = d / "sd_trunc" / "unet" / "diffusion_pytorch_model.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    with open(d / "sd_json" / "vae" / "config.json", "a") as fh:
        fh.write("\n{}\n")
    os.remove(d / "sd_noindex" / "model_index.json")
    # selector folders: selector.json without 'pooling', one not JSON at all
    shipped = os.path.join(ROOT, "qlip_jax", "assets", "selector")
    meta = json.load(open(os.path.join(shipped, "selector.json")))
    (d / "sel_nopool").mkdir()
    json.dump({k: v for k, v in meta.items() if k != "pooling"}, open(d / "sel_nopool" / "selector.json", "w"))
    (d / "sel_broken").mkdir()
    (d / "sel_broken" / "selector.json").write_text('{"t2q": ')
    # a quantizer state whose orbax metadata is truncated
    shutil.copytree(os.path.join(shipped, "quant"), d / "quant_trunc")
    for f in (d / "quant_trunc").rglob("meta/metadata"):
        os.truncate(f, f.stat().st_size // 2)
    return d


@pytest.fixture(scope="module")
def compiles():
    """A list that grows by one at every XLA compilation (jax.monitoring's backend-compile event; a
    persistent-cache hit goes through the same event)."""
    import jax

    from jax._src.dispatch import BACKEND_COMPILE_EVENT

    seen: list[str] = []

    def listener(event, duration, **kw):
        if event == BACKEND_COMPILE_EVENT:
            seen.append(kw.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield seen
    jax.monitoring.unregister_event_duration_listener(listener)


def _snapshot(*folders) -> dict:
    """``{path: sha1}`` of every file (and folder) under ``folders``."""
    out = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in dirs:
                out[os.path.join(root, name)] = "dir"
            for name in files:
                p = os.path.join(root, name)
                out[p] = hashlib.sha1(open(p, "rb").read()).hexdigest()
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written_nothing_compiled(case, compiles, tmp_path, capsys, monkeypatch,
                                                                       request):
    _, name, argv, pattern = case
    monkeypatch.delenv("QLIP_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)  # a relative default output would land here
    needs = " ".join(argv)  # the shared broken inputs (and the tiny model) only for the rows that use them
    bad = request.getfixturevalue("bad") if "{bad}" in needs or "{tiny}" in needs else tmp_path
    tiny = request.getfixturevalue("tiny_sd_dir") if "{tiny}" in needs else None
    shipped_quant = os.path.join(ROOT, "qlip_jax", "assets", "selector", "quant")
    argv = [a.format(tmp=tmp_path, tiny=tiny, bad=bad, shipped_quant=shipped_quant) for a in argv]
    main = _main(name)
    before, compiled = _snapshot(tmp_path, bad), len(compiles)
    refused(main, argv, capsys, pattern)
    assert _snapshot(tmp_path, bad) == before
    assert compiles[compiled:] == []


def test_the_table_covers_every_program():
    programs = {c[1] for c in CASES}
    assert len(CASES) >= 40
    for folder in ("train", "eval"):
        for f in os.listdir(os.path.join(ROOT, folder)):
            if f.endswith(".py") and f != "__init__.py":
                assert f"{folder}.{f[:-3]}" in programs, f
    assert {"qlip", "bench-sampling", "bench-training"} <= programs


# ----------------------------------------------------------------------------------------------
# The boundary itself


@program
def _toy(argv):
    if argv[0] == "bad":
        raise BadArgument("--x must be positive, got -1", "give --x > 0")
    if argv[0] == "file":
        raise BadFile("/some/file.json", "invalid JSON (Expecting value:\n line 1)", "fix it")
    raise KeyError("a bug")


def test_boundary_one_line_debug_and_bugs(capsys, monkeypatch):
    monkeypatch.delenv("QLIP_DEBUG", raising=False)
    assert refused(_toy, ["bad"], capsys, "x") == "error: --x must be positive, got -1; give --x > 0"
    # a multi-line message still makes one line, starting with the file's name
    assert refused(_toy, ["file"], capsys, "x") == "error: /some/file.json: invalid JSON (Expecting value: line 1); fix it"
    with pytest.raises(BadArgument):  # --debug: the exception and its traceback
        _toy(["bad", "--debug"])
    monkeypatch.setenv("QLIP_DEBUG", "1")
    with pytest.raises(BadArgument):
        _toy(["bad"])
    monkeypatch.setenv("QLIP_DEBUG", "0")
    assert run_program(_toy, ["bad"]) == 2
    with pytest.raises(KeyError):  # a bug is not an input error: its traceback is shown
        _toy(["bug"])
    assert issubclass(BadFile, ValueError) and issubclass(BadArgument, QlipInputError)


# ----------------------------------------------------------------------------------------------
# Nothing lost: atomic writes and the --out claim


def test_atomic_write_replaces_or_leaves_the_old_file(tmp_path):
    from qlip_jax.atomic import atomic_write, write_json

    path = tmp_path / "r.json"
    write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as f:
            f.write('{"a": 2')
            raise RuntimeError("interrupted")
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["r.json"]
    with atomic_write(tmp_path / "x.npy") as tmp:  # a path keeps its extension (np.save appends none)
        np.save(tmp, np.arange(3))
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), np.arange(3))
    assert sorted(os.listdir(tmp_path)) == ["r.json", "x.npy"]


def test_two_claims_of_one_fresh_out_one_wins(tmp_path):
    """Two runs given one fresh --out: exactly one claims it (O_EXCL), the other gets the clear error."""
    from qlip_jax.atomic import claim_output, release_claim

    path = str(tmp_path / "grid.png")
    for _ in range(20):
        barrier, results = threading.Barrier(2), []

        def claim():
            barrier.wait()
            try:
                results.append(claim_output(path, overwrite=False))
            except BadArgument as e:
                results.append(str(e))

        threads = [threading.Thread(target=claim) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = [r for r in results if r is True]
        lost = [r for r in results if r is not True]
        assert len(won) == 1 and len(lost) == 1 and re.search(r"grid.png exists .*pass --overwrite", lost[0])
        release_claim(path)  # still empty: removed, as after a failed run
        assert not os.path.exists(path)
    assert claim_output(path, overwrite=False) and claim_output(path, overwrite=True) is False


def test_every_writer_goes_through_the_atomic_helper():
    """No file is opened for writing, np.save'd or PIL-saved outside qlip_jax/atomic.py except to the
    temporary path or file atomic_write yields."""
    direct = re.compile(r"open\([^)]*['\"][wa]b?['\"]|np\.savez?\((?!tmp|f\b)|save_file\((?!.*tmp)|savefig\(|"
                        r"json\.dump\([^)]*open\(")
    offenders = []
    for folder in ("qlip_jax", "train", "eval", "benchmarks"):
        for root, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                p = os.path.join(root, name)
                if not name.endswith(".py") or p.endswith(os.path.join("qlip_jax", "atomic.py")):
                    continue
                for i, line in enumerate(open(p, encoding="utf-8"), 1):
                    if direct.search(line) and "atomic_write" not in line:
                        offenders.append(f"{os.path.relpath(p, ROOT)}:{i}: {line.strip()}")
    assert offenders == []


def test_sampler_seeds_do_not_wrap():
    """--seed 4294967296 used to equal --seed 0 (uint32 wrap); the sampler refuses it, and -1, itself."""
    from qlip_jax.sampling.pipeline import seed_array

    np.testing.assert_array_equal(seed_array(np.arange(2) + 4294967294, 2), [4294967294, 4294967295])
    np.testing.assert_array_equal(seed_array(7, 3), [7, 7, 7])
    for bad in (4294967296, -1, np.arange(2) + 4294967295):
        with pytest.raises(BadArgument, match="seed out of range"):
            seed_array(bad, 2)
