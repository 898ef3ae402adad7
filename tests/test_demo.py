"""The demo pipeline end to end, in a temporary working directory, through the real Snakefile (the demo_run
fixture in conftest.py: one demo per session, shared with tests/test_status.py)."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_report import row_label, table3_cells

from workflow_scripts import matrix, preflight, stats

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "demo" / "config.yaml"


@pytest.mark.slow
def test_demo_learns_every_pair(demo_run):
    """Every fine-tuned pair learns. demo_mixer_p8 on digits_jpeg is not one: it plays a released checkpoint
    there (a random-init stand-in evaluated as it is: chance level, by design)."""
    _, root, cfg = demo_run
    assert ("demo_mixer_p8", "digits_jpeg") not in matrix.pairs(cfg)
    headline = cfg["evaluation"]["headline_protocol"]
    for ckpt, ds, protocol in matrix.evaluations(cfg):
        result = json.loads((root / "evaluate" / ckpt / ds / f"{protocol}.json").read_text())
        if protocol == headline:  # resize_crop's centre crop cuts strokes off 8x8 digits: not held to the bar
            assert result["top1_mean"] >= 80.0, (ckpt, ds, protocol, result["top1_mean"])
        selection = json.loads((root / "selection" / ckpt / f"{ds}.json").read_text())
        assert result["selected_lr"] == selection["selected_lr"]
        assert {run["trained_on"] for run in result["runs"]} == {"full"}  # retrained on train + dev split


def demo_evaluation(root: Path, cfg: dict, ckpt: str, dataset: str, source: str) -> dict:
    """The headline test evaluation of a result of the demo: a pair's evaluation file, or a released checkpoint's
    baseline, at the headline protocol."""
    protocol = cfg["evaluation"]["headline_protocol"]
    folder = "evaluate" if source == "finetune" else "baseline"
    return json.loads((root / folder / ckpt / dataset / f"{protocol}.json").read_text())


def demo_top1(root: Path, cfg: dict, ckpt: str, dataset: str, source: str) -> float:
    evaluation = demo_evaluation(root, cfg, ckpt, dataset, source)
    return evaluation["top1_mean"] if source == "finetune" else evaluation["top1"]


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
        status, lines = cells[row, "AvgDemo"]
        assert (status, lines[0]) == ("run", f"{average:.2f}"), ckpt
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
        result = demo_evaluation(root, cfg, ckpt, ds, "finetune")
        assert f"{result['top1_mean']:.2f}" in html, (ckpt, ds)
    assert "not run" in html
    refs = yaml.safe_load((REPO / "report" / "references.yaml").read_text())
    for key in refs["primary"].values():
        assert refs["sources"][key].split(",")[0] in html
    assert (root / "report" / "analysis.html").exists()


@pytest.mark.slow
def test_demo_comparison_has_intervals_and_verdicts(demo_run):
    """comparison.csv: an interval for every row that was run (Wilson over the test images of the file it comes
    from), the verdict "no reference" for the demo's rows (it invents no published figure), "not run" for the
    study's; the report says no published figure was run and what the final models were trained on."""
    _, root, cfg = demo_run
    rows = list(csv.DictReader((root / "aggregate" / "comparison.csv").open()))
    assert {"ci_low", "ci_high", "verdict"} <= set(rows[0])
    for row in rows:
        run = row["status"] == "run"
        assert (row["ci_low"] != "" and row["ci_high"] != "") == run, row
        if run:
            assert float(row["ci_low"]) <= float(row["top1_mean"]) <= float(row["ci_high"]), row
        assert row["verdict"] == ("no reference" if run else "not run"), row
    by_key = {(r["checkpoint"], r["dataset_name"], r["kind"]): r for r in rows if r["status"] == "run"}
    for ckpt, ds, source in matrix.results(cfg):
        evaluation = demo_evaluation(root, cfg, ckpt, ds, source)
        per_seed = [r["top1"] for r in evaluation["runs"]] if source == "finetune" else [evaluation["top1"]]
        interval = stats.top1_interval(per_seed, evaluation["num_images"])
        row = by_key[ckpt, ds, "dataset"]
        assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx((interval.low, interval.high))
        other = json.loads((root / ("evaluate" if source == "finetune" else "baseline") / ckpt / ds
                            / "resize_crop.json").read_text())
        assert float(row["top1_resize_crop"]) == pytest.approx(other["top1_mean" if source == "finetune" else "top1"])
    summary = json.loads((root / "aggregate" / "summary.json").read_text())
    published = sum(1 for r in rows if r["primary_top1"])
    assert summary["verdicts"] == {"published": published, "consistent": 0, "below": 0, "above": 0,
                                   "not run": published}
    html = (root / "report" / "index.html").read_text()
    assert f"and {published} were not run by this config" in html
    assert "retrained at the selected learning rate on the full training split" in html


@pytest.mark.slow
def test_demo_variant_and_selection_bias_tables(demo_run):
    """The demo's variant and selection-bias evaluations reach their own tables, from the files the rules wrote."""
    _, root, cfg = demo_run
    summary = json.loads((root / "aggregate" / "summary.json").read_text())
    html = (root / "report" / "index.html").read_text()
    [(name, ckpt, ds)] = matrix.variant_pairs(cfg)
    variant = json.loads((root / "variants" / name / ckpt / ds / "evaluation.json").read_text())
    [row] = summary["variants"]
    assert row["top1_mean"] == pytest.approx(variant["top1_mean"])
    assert row["difference"] == pytest.approx(variant["top1_mean"] - demo_top1(root, cfg, ckpt, ds, "finetune"))
    assert cfg["variants"][name]["label"] in html.split('id="variants-table"')[1].split("</table>")[0]
    assert [(e["checkpoint"], e["dataset"]) for e in summary["selection_bias"]] == matrix.selection_bias_pairs(cfg)
    for entry in summary["selection_bias"]:
        sweep = json.loads((root / "selection_bias" / entry["checkpoint"] / f"{entry['dataset']}.json").read_text())
        assert len(sweep["runs"]) == len(matrix.pair_runs(cfg, entry["checkpoint"], entry["dataset"]))
        assert entry["best_top1"] == pytest.approx(max(r["top1"] for r in sweep["runs"]))  # one seed per LR
        assert f'id="selection-bias-{entry["checkpoint"]}-{entry["dataset"]}"' in html


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
                    "Every fine-tuning run of the learning-rate sweep in one tidy table"):
        assert caption in html, caption
    for name in ("demo_mixer_p4.parity.json", "runs.csv", "comparison.csv", "index.html", "analysis.html"):
        assert name in html, name


def demo_snakemake(workdir: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).with_name("snakemake")), "-s", str(REPO / "Snakefile"),
         "--configfile", str(DEMO_CONFIG), "--cores", "2", *args],
        cwd=workdir, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(env or {})),
    )


@pytest.mark.slow
def test_demo_preflight_summary_has_every_shape_and_the_plan(demo_run):
    """The preflight ran on the demo's shapes (CPU) before their jobs; each run records the micro-batch it used."""
    _, root, cfg = demo_run
    summary = json.loads((root / "preflight" / "summary.json").read_text())
    shapes = {s["shape"]: s for s in summary["shapes"]}
    assert set(shapes) == set(matrix.job_shapes(cfg))
    for shape in shapes.values():
        assert shape["device"] == "cpu" and shape["precision"] == "fp32" and shape["micro_batch"] == 32
        for key in ("peak_memory_mib", "train_img_s", "loader_img_s", "eval_img_s"):
            assert shape[key] > 0, (shape["shape"], key)
        assert shape["eval_top1_agreement"] == 100.0  # fp32 against fp32
    assert summary["gpus"] >= 1 and 0 < summary["eta_hours"] <= summary["device_hours"]
    for ckpt, ds, lr, seed in matrix.finetune_runs(cfg):
        run = json.loads((root / "finetune" / ckpt / ds / f"lr{lr}_s{seed}" / "summary.json").read_text())
        assert run["micro_batch_size"] == 32 and run["micro_batch_from"] == "protocol.micro_batch_size"


@pytest.mark.slow
def test_a_later_preflight_reruns_no_finished_job(demo_run):
    """Every GPU job takes its shape's preflight as an ancient() input: a new preflight (another node, another
    day) reruns the preflight and its summary, nothing else."""
    workdir, _, _ = demo_run
    res = demo_snakemake(workdir, "-n", "--forcerun", "preflight_shape")
    assert res.returncode == 0, res.stdout + res.stderr
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", res.stdout.split("Job stats:")[1].split("total")[0], re.M))
    assert counts.pop("preflight_shape") == "2" and set(counts) <= {"preflight", "all"}, counts


@pytest.mark.slow
def test_a_failing_preflight_keeps_fine_tuning_from_starting(demo_run, tmp_path):
    """In a copy of the finished demo: one run's files and its shape's preflight gone, and a memory cap nothing
    fits under: the preflight fails and the fine-tuning job never starts."""
    workdir, root, cfg = demo_run
    copy = tmp_path / "demo"
    shutil.copytree(workdir, copy, symlinks=True)
    ckpt, ds, lr, seed = next(r for r in matrix.finetune_runs(cfg) if r[0] == "demo_mixer_p4")
    run = Path(cfg["output_root"]) / "finetune" / ckpt / ds / f"lr{lr}_s{seed}"
    shutil.rmtree(copy / run)
    finetune_log = copy / cfg["output_root"] / "logs" / "finetune" / ckpt / ds / f"lr{lr}_s{seed}.log"
    finetune_log.unlink()
    shape_file = Path(cfg["output_root"]) / "preflight" / f"{matrix.job_shape(cfg, ckpt)}.json"
    (copy / shape_file).unlink()
    res = demo_snakemake(copy, str(run / "summary.json"), env={preflight.MEMORY_CAP_ENV: "0.5"})
    assert res.returncode != 0
    log = (copy / cfg["output_root"] / "logs" / "preflight_shape" / f"{shape_file.stem}.log").read_text()
    assert "error: not even micro-batches of 1 image(s) fit on" in log and "0.5 MiB cap" in log
    assert not (copy / shape_file).exists() and not (copy / run).exists()
    assert not finetune_log.exists()
