"""The demo pipeline end to end, in a temporary working directory, through the real Snakefile."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

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
    _, root, cfg = demo_run
    for ckpt in cfg["finetune"]["checkpoints"]:
        for ds in cfg["finetune"]["datasets"]:
            result = json.loads((root / "evaluate" / ckpt / f"{ds}.json").read_text())
            assert result["top1_mean"] >= 80.0, (ckpt, ds, result["top1_mean"])
            selection = json.loads((root / "selection" / ckpt / f"{ds}.json").read_text())
            assert result["selected_lr"] == selection["selected_lr"]


@pytest.mark.slow
def test_demo_report_shows_each_pair_and_the_unrun_study(demo_run):
    _, root, cfg = demo_run
    html = (root / "report" / "index.html").read_text()
    for ckpt in cfg["finetune"]["checkpoints"]:
        for ds in cfg["finetune"]["datasets"]:
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
