"""eval/evaluate.py on a prompt file (issue #37 item 3): the eval split's prompts, the CLIP score with
``--clip DIR``, the scene-only metrics and FID without a reference skipped with a one-line note each."""

import csv
import json
import os
import runpy

import numpy as np
import pytest
from tiny_qlip import STEPS, tiny_quant_dir  # noqa: F401  (fixtures)

from qlip_jax.data.sources import FileSource

EVALUATE = os.path.join(os.path.dirname(__file__), "..", "eval", "evaluate.py")
CAPTIONS = [f"a {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("star", "circle", "square", "cat")]


@pytest.mark.slow  # a whole program end to end
def test_evaluate_on_a_prompt_file_with_the_clip_score(tiny_sd, tiny_sd_dir, tiny_quant_dir, tiny_clip_dir,
                                                        tmp_path, capsys):
    from qlip_jax.metrics.clip_score import ClipScorer
    from qlip_jax.sampling.pipeline import Text2Image

    prompts = tmp_path / "captions.txt"
    prompts.write_text("\n".join(CAPTIONS) + "\n")
    out = tmp_path / "report"
    main = runpy.run_path(EVALUATE)["main"]
    argv = ["--model", tiny_sd_dir, "--prompts", str(prompts), "--clip", tiny_clip_dir, "--quant", tiny_quant_dir,
            "--settings", "W4A8", "--n", "3", "--steps", str(STEPS), "--guidance", "3", "--batch", "3",
            "--inception", "off", "--cache", str(tmp_path / "cache"), "--grid-prompts", "2", "--out", str(out),
            "--quiet"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    notes = [l for l in captured.err.splitlines() if "note:" in l]
    assert any("domain FID and alignment are skipped" in l for l in notes)
    assert any("FID and sFID are skipped (no --reference)" in l for l in notes)
    assert not any("CLIP score is skipped" in l for l in notes)
    table = [l for l in captured.out.splitlines() if l.startswith("| ")]
    assert "| CLIP score |" in table[0]

    texts = [p.text for p in FileSource(str(prompts)).prompts("eval")[:3]]
    report = json.loads((out / "report.json").read_text())
    assert report["prompts"] == texts
    with open(out / "report.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["FP", "W4A8 (minmax)"]
    for r in rows.values():
        assert r["domain_fid"] == r["alignment"] == r["fid"] == r["sfid"] == "nan"
    # the FP row's CLIP score is the scorer's on the float images of seeds 0, 1, 2
    pipe = Text2Image(tiny_sd, "ddim", STEPS)
    fp_images = pipe(pipe.encode(texts), np.arange(3), 3.0)
    scorer = ClipScorer(tiny_clip_dir)
    per = scorer.pair_scores(fp_images, texts)
    np.testing.assert_allclose(report["per_image"]["FP"]["clip_score"], per, rtol=1e-4, atol=1e-4)
    assert float(rows["FP"]["clip_score"]) == pytest.approx(scorer(fp_images, texts), abs=1e-4)
    assert float(rows["W4A8 (minmax)"]["fab"]) == 8 and float(rows["FP"]["psnr"]) == np.inf
    assert "schedule_" not in " ".join(os.listdir(out))            # no selector: no heatmaps
