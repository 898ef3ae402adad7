"""The demo pipeline end to end, in a temporary working directory, through the real Snakefile."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_report import row_label, table3_cells

from workflow_scripts import matrix

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "demo" / "config.yaml"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Run the whole demo once; the tests below read what it produced."""
    workdir = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    start = time.monotonic()
    res = subprocess.run(
        [str(Path(sys.executable).with_name("snakemake")), "-s", str(REPO / "Snakefile"),
         "--configfile", str(DEMO_CONFIG), "--cores", "2"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=1200,
    )
    elapsed = time.monotonic() - start
    cfg = yaml.safe_load(DEMO_CONFIG.read_text())
    root = workdir / cfg["output_root"]
    if res.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted((root / "logs").rglob("*.log")))
        pytest.fail(f"demo failed (exit {res.returncode}):\n{res.stderr[-4000:]}\n{logs}")
    print(f"demo pipeline wall time: {elapsed:.0f} s")
    return workdir, root, cfg


@pytest.mark.slow
def test_demo_learns_every_pair(demo_run):
    """Every fine-tuned pair learns. demo_mixer_p8 on digits_jpeg is not one: it plays a released checkpoint
    there (a random-init stand-in evaluated as it is: chance level, by design)."""
    _, root, cfg = demo_run
    assert ("demo_mixer_p8", "digits_jpeg") not in matrix.pairs(cfg)
    for ckpt, ds in matrix.pairs(cfg):
        result = json.loads((root / "evaluate" / ckpt / f"{ds}.json").read_text())
        assert result["top1_mean"] >= 80.0, (ckpt, ds, result["top1_mean"])
        selection = json.loads((root / "selection" / ckpt / f"{ds}.json").read_text())
        assert result["selected_lr"] == selection["selected_lr"]


def demo_top1(root: Path, cfg: dict, ckpt: str, dataset: str, source: str) -> float:
    """The test top-1 of a result of the demo: a pair's evaluation, or a released checkpoint's baseline at the
    dataset's eval_protocol."""
    if source == "finetune":
        return json.loads((root / "evaluate" / ckpt / f"{dataset}.json").read_text())["top1_mean"]
    protocol = cfg["datasets"][dataset]["eval_protocol"]
    return json.loads((root / "baseline" / ckpt / dataset / f"{protocol}.json").read_text())["top1"]


def real_top1_by_hand(workdir: Path, real: dict) -> float:
    """ReaL top-1 recomputed from the files the ReaL result names: first run's top-1 in file-name order against
    real.json's lists, empty lists left out."""
    with np.load(workdir / real["predictions"]) as predictions:
        top1 = predictions["top5"][0][np.argsort(predictions["file_names"]), 0]
    labels = json.loads((workdir / real["real_labels"]).read_text())
    scored = [int(p) in lists for p, lists in zip(top1, labels, strict=True) if lists]
    return 100.0 * sum(scored) / len(scored)


@pytest.mark.slow
def test_demo_report_has_the_table3_grid(demo_run):
    """AvgDemo a number for both checkpoints, ReaL computed by the real code, the study's cells "not run"."""
    workdir, root, cfg = demo_run
    html = (root / "report" / "index.html").read_text()
    cells = table3_cells(html, "this-run")
    results = {(ck, ds): demo_top1(root, cfg, ck, ds, source) for ck, ds, source in matrix.results(cfg)}
    for ckpt in cfg["finetune"]["checkpoints"]:
        row = row_label(cfg, ckpt)
        average = statistics.fmean(results[ckpt, ds] for ds in cfg["averages"]["AvgDemo"])
        assert cells[row, "AvgDemo"] == ("run", [f"{average:.2f}"]), ckpt
        real = json.loads((root / "real" / ckpt / "digits_jpeg.json").read_text())
        assert real["num_excluded_empty"] > 0 and real["num_images"] < real["num_validation_images"]
        assert real["real_top1"] == pytest.approx(real_top1_by_hand(workdir, real))
        assert cells[row, "Digits (JPEG tree) ReaL"][1][0] == f"{real['real_top1']:.2f}", ckpt
        for ds in cfg["finetune"]["datasets"]:
            assert cells[row, cfg["datasets"][ds]["label"]][1][0] == f"{results[ckpt, ds]:.2f}", (ckpt, ds)
    # The study's rows: every cell "not run", beside the published figures.
    study = table3_cells(html, "headline")
    assert {status for status, _ in study.values()} == {"not run"}
    assert all(lines[0] == "not run" for _, lines in study.values())
    assert any("paper_table3: 93.63" in lines for _, lines in study.values())


@pytest.mark.slow
def test_demo_report_shows_each_pair_and_the_unrun_study(demo_run):
    _, root, cfg = demo_run
    html = (root / "report" / "index.html").read_text()
    for ckpt, ds in matrix.pairs(cfg):
        result = json.loads((root / "evaluate" / ckpt / f"{ds}.json").read_text())
        assert f"{result['top1_mean']:.2f}" in html, (ckpt, ds)
    assert "not run" in html
    refs = yaml.safe_load((REPO / "report" / "references.yaml").read_text())
    for key in refs["primary"].values():
        assert refs["sources"][key].split(",")[0] in html
    assert (root / "report" / "analysis.html").exists()


@pytest.mark.slow
def test_demo_rerun_has_nothing_to_do(demo_run):
    workdir, _, _ = demo_run
    res = subprocess.run(
        [str(Path(sys.executable).with_name("snakemake")), "-s", str(REPO / "Snakefile"),
         "--configfile", str(DEMO_CONFIG), "--cores", "2", "-n"],
        cwd=workdir, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"),
    )
    assert res.returncode == 0
    assert "Nothing to be done" in res.stdout + res.stderr


@pytest.mark.slow
def test_snakemake_report_holds_the_results_with_their_captions(demo_run, tmp_path):
    workdir, _, _ = demo_run
    out = tmp_path / "snakemake-report.html"
    res = subprocess.run(
        [str(Path(sys.executable).with_name("snakemake")), "-s", str(REPO / "Snakefile"),
         "--configfile", str(DEMO_CONFIG), "--report", str(out)],
        cwd=workdir, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    html = out.read_text()
    # Every report() output is in it, each with its caption from report/*.rst.
    for caption in ("largest absolute logit difference", "chosen on minival (never on test)",
                    "Every fine-tuning run in one tidy table"):
        assert caption in html, caption
    for name in ("demo_mixer_p4.parity.json", "runs.csv", "comparison.csv", "index.html", "analysis.html"):
        assert name in html, name
