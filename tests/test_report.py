"""Aggregation, the HTML report and the analysis notebook, on result files generated per docs/design.md."""
from __future__ import annotations

import csv
import dataclasses
import html
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml

from workflow_scripts import aggregate, charts, matrix, report, stats, tables
from workflow_scripts.common import PipelineError

REPO = Path(__file__).resolve().parents[1]
REFS = yaml.safe_load((REPO / "report" / "references.yaml").read_text())
# As the rules run a stage: from the working directory, with the workflow's package importable.
WORKFLOW_ENV = dict(os.environ, PYTHONPATH=str(REPO))
BENCH_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time"


def load_config(name: str, tmp_path: Path, base_lrs: list[float] | None = None, **finetune) -> dict:
    """A workflow config as rules/common.smk passes it: references loaded, paths under tmp_path.

    `base_lrs` replaces every dataset's LR grid; `finetune` updates the finetune block (checkpoints, datasets, seeds).
    """
    config = yaml.safe_load((REPO / name).read_text())
    config["references"] = REFS
    config["output_root"] = str(tmp_path / "results")
    config["data_root"] = str(tmp_path / "data")
    config["weights_dir"] = str(tmp_path / "weights")
    config["finetune"].update(finetune)
    for ds in config["datasets"].values():
        ds["base_lrs"] = base_lrs or ds["base_lrs"]
    # A subset keeps only the variants of its pairs (the workflow refuses a variant of a pair it does not run).
    fine_tuned = set(matrix.pairs(config))
    variants = {name: {**v, "pairs": [p for p in v["pairs"] if tuple(p) in fine_tuned]}
                for name, v in config["variants"].items()}
    config["variants"] = {name: v for name, v in variants.items() if v["pairs"]}
    return config


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _json(path: Path, obj) -> None:
    _write(path, json.dumps(obj, indent=1))


def eval_result(top1, top5, num_classes, protocol, split, model, dataset, num_images=360) -> dict:
    return {"top1": top1, "top5": top5, "top5_note": None, "loss": 0.5, "num_images": num_images,
            "num_classes": num_classes, "per_class_top1": [top1] * num_classes, "confusion": None,
            "images_per_s": 900.0, "protocol": protocol, "split": split, "model": model, "dataset": dataset}


def evaluation_file(ck: str, ds: str, runs: list[dict], selected_lr) -> dict:
    """An evaluation file as evaluate.seed_summary writes it (its runs carry lr, seed and trained_on)."""
    top1s = [r["top1"] for r in runs]
    return {"checkpoint": ck, "dataset": ds, "selected_lr": selected_lr, "selection": None,
            "protocol": runs[0]["protocol"], "runs": runs, "top1_mean": float(np.mean(top1s)),
            "top1_std": float(np.std(top1s, ddof=1)) if len(runs) > 1 else None,  # sample std, as evaluate.py
            "top5_mean": 99.5, "top5_std": 0.0 if len(runs) > 1 else None,
            "num_seeds": len({r["seed"] for r in runs}), "num_images": runs[0]["num_images"]}


def evaluated_runs(config: dict, ck: str, ds: str, models: dict, protocol: str, trained_on: str, rng) -> list[dict]:
    """One evaluation result per model ({(lr, seed): path}) with the named protocol, random top-1."""
    settings = {"name": protocol, **config["evaluation"]["protocols"][protocol], "precision": "fp32"}
    return [{"checkpoint": ck, "seed": seed, "lr": lr, "trained_on": trained_on,
             **eval_result(float(np.round(rng.uniform(60, 99), 4)), 99.5, 10, settings, "test", str(path), ds)}
            for (lr, seed), path in models.items()]


def write_sweep(config: dict, root: Path, ck: str, ds: str, rng) -> dict:
    """The LR sweep of a pair (summary, metrics, benchmark, log per run) and its selection; returns the selection."""
    steps, proto = config["datasets"][ds]["steps"], config["protocol"]
    candidates = []
    for lr in config["datasets"][ds]["base_lrs"]:
        per_seed = []
        for seed in config["finetune"]["seeds"]:
            rel = f"finetune/{ck}/{ds}/lr{lr:g}_s{seed}"
            top1 = float(np.round(rng.uniform(60, 99), 3))
            per_seed.append(top1)
            lines = []
            for step in range(proto["log_every"], steps + 1, proto["log_every"]):
                lines.append({"step": step, "loss": 2.3 * np.exp(-step / steps) + 0.05,
                              "lr": cosine_lr(step, lr, steps, proto["warmup_steps"]),
                              "grad_norm": 0.8, "img_s": 400.0, "elapsed_s": step / 10})
                if step % proto["eval_every"] == 0 or step == steps:
                    lines.append({"step": step, "minival_top1": top1 * step / steps,
                                  "minival_top5": 99.0, "minival_loss": 0.3})
            _write(root / rel / "metrics.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
            _json(root / rel / "summary.json", {
                "checkpoint": ck, "dataset": ds, "lr": lr, "seed": seed, "steps": steps,
                "batch_size": proto["batch_size"], "micro_batch_size": proto["micro_batch_size"],
                "world_size": 1, "device": "cpu", "device_names": ["cpu: Fixture CPU @ 2.0GHz"],
                "precision": "fp32", "inception_crop": proto["inception_crop"], "minival_top1": top1,
                "minival_top5": 99.0, "minival_loss": 0.3, "train_seconds": 12.5, "img_s": 400.0,
                "resumed_from_step": None, "protocol": proto, "train_on": "train",
                "started_utc": "2025-01-01T10:00:00+00:00", "finished_utc": "2025-01-01T10:01:00+00:00"})
            _write(root / "benchmarks" / "finetune" / ck / ds / f"lr{lr:g}_s{seed}.tsv",
                   f"{BENCH_HEADER}\n14.2500\t0:00:14\t412.3\t900.1\t400.0\t401.0\t1.0\t2.0\t95.0\t13.1\n")
            _write(root / "logs" / "finetune" / ck / ds / f"lr{lr:g}_s{seed}.log", "training...\n")
        candidates.append({"lr": lr, "seeds": config["finetune"]["seeds"], "minival_top1_per_seed": per_seed,
                           "minival_top1_mean": float(np.mean(per_seed))})
    best = max(candidates, key=lambda c: c["minival_top1_mean"])
    selection = {"checkpoint": ck, "dataset": ds, "criterion": "minival_top1_mean", "candidates": candidates,
                 "selected_lr": best["lr"], "selected_runs": [str(root / f"finetune/{ck}/{ds}/lr{best['lr']:g}_s{s}")
                                                              for s in best["seeds"]]}
    _json(root / "selection" / ck / f"{ds}.json", selection)
    return selection


def final_models(config: dict, root: Path, ck: str, ds: str, lr: float) -> tuple[dict, str]:
    """{(lr, seed): model path} of a pair's final models and what they were trained on (as the rules plan them)."""
    seeds = config["finetune"]["seeds"]
    if config["finetune"]["retrain_on_full_train"]:
        return {(lr, s): root / f"final/{ck}/{ds}/s{s}/model.safetensors" for s in seeds}, "full"
    return {(lr, s): root / f"finetune/{ck}/{ds}/lr{lr:g}_s{s}/model.safetensors" for s in seeds}, "train"


def make_results(config: dict, subset: tuple[str, ...] = (), rng_seed: int = 0) -> dict:
    """Write every file the aggregate stage reads, in the formats of docs/design.md.

    Returns {"results": {(ckpt, dataset): headline test top-1}, "protocols": {(ckpt, dataset, protocol): top-1},
    "reals": {(ckpt, dataset): ReaL top-1}, "variants": {(variant, ckpt, dataset): top-1}, "selection_bias":
    {(ckpt, dataset): {lr: test top-1 mean over seeds}}}: every matrix.results entry (a pair's mean over seeds, a
    released checkpoint's baseline) at every protocol, and every matrix.real_results entry.
    """
    rng = np.random.default_rng(rng_seed)
    root, headline = Path(config["output_root"]), config["evaluation"]["headline_protocol"]
    write_records(config, subset)
    expected = {"results": {}, "protocols": {}, "reals": {}, "variants": {}, "selection_bias": {}}
    selections = {}
    for ck, ds in matrix.pairs(config):
        selections[ck, ds] = selection = write_sweep(config, root, ck, ds, rng)
        models, trained_on = final_models(config, root, ck, ds, selection["selected_lr"])
        for p in config["evaluation"]["protocols"]:
            record = evaluation_file(ck, ds, evaluated_runs(config, ck, ds, models, p, trained_on, rng),
                                     selection["selected_lr"])
            _json(root / "evaluate" / ck / ds / f"{p}.json", record)
            expected["protocols"][ck, ds, p] = record["top1_mean"]
        expected["results"][ck, ds] = expected["protocols"][ck, ds, headline]
    for name, ck, ds in matrix.variant_pairs(config):
        lr = selections[ck, ds]["selected_lr"]
        models = {(lr, s): root / f"variants/{name}/{ck}/{ds}/s{s}/model.safetensors"
                  for s in config["finetune"]["seeds"]}
        record = evaluation_file(ck, ds, evaluated_runs(config, ck, ds, models, headline,
                                                        final_models(config, root, ck, ds, lr)[1], rng), lr)
        _json(root / "variants" / name / ck / ds / "evaluation.json", record)
        expected["variants"][name, ck, ds] = record["top1_mean"]
    for ck, ds in matrix.selection_bias_pairs(config):
        models = {(float(lr), seed): root / f"finetune/{ck}/{ds}/lr{lr}_s{seed}/model.safetensors"
                  for _, _, lr, seed in matrix.pair_runs(config, ck, ds)}
        runs = evaluated_runs(config, ck, ds, models, headline, "train", rng)
        _json(root / "selection_bias" / ck / f"{ds}.json", evaluation_file(ck, ds, runs, None))
        expected["selection_bias"][ck, ds] = {lr: float(np.mean([r["top1"] for r in runs if r["lr"] == lr]))
                                              for lr in sorted({r["lr"] for r in runs})}
    for ck, ds, p in matrix.baseline_runs(config):
        top1 = 11.25 if p == "official" else 12.75
        _json(root / "baseline" / ck / ds / f"{p}.json", eval_result(top1, 52.5, 10, {"name": p}, "test",
                                                                     str(root / "converted" / f"{ck}.safetensors"), ds))
        _write(root / "logs" / "baseline" / ck / ds / f"{p}.log", "evaluating...\n")
        expected["protocols"][ck, ds, p] = top1
        if p == headline:
            expected["results"][ck, ds] = top1
    for ck, ds, source in matrix.real_results(config):
        expected["reals"][ck, ds] = write_real(root, ck, ds, source, headline, rng)
    return expected


def write_records(config: dict, subset: tuple[str, ...]) -> None:
    """dataset.json per used dataset, parity and download records per used checkpoint."""
    root, data, weights = Path(config["output_root"]), Path(config["data_root"]), Path(config["weights_dir"])
    for ds in matrix.used_datasets(config):
        _json(data / ds / "dataset.json", {
            "name": ds, "label": config["datasets"][ds]["label"], "layout": "arrays", "root": str(data / ds),
            "classes": [str(i) for i in range(10)], "num_classes": 10, "splits": {"train": 1200, "test": 360},
            "train_split": "train", "test_split": "test", "minival": {"fraction": 0.1, "seed": 0},
            "subset": ds in subset, "subset_note": "120 of 1000 classes" if ds in subset else None})
    for ck in matrix.used_checkpoints(config):
        _json(root / "converted" / f"{ck}.parity.json", {
            "checkpoint": ck, "npz_sha256": "a" * 64, "safetensors_sha256": "b" * 64, "num_params": 571_234,
            "architecture": config["checkpoints"][ck]["architecture"], "max_abs_logit_diff": 3.1e-6,
            "reference": "flax_reference (NumPy)",
            "input": {"shape": [2, 32, 32, 3], "layout": "NHWC", "distribution": "uniform(-1, 1)", "seed": 0},
            "convert_seconds": 0.4,
            "peak_rss_mib": 310.0, "npz_mib": 2.2})
        _json(weights / f"{ck}.download.json", {
            "checkpoint": ck, "url": config["checkpoints"][ck]["url"], "path": str(weights / f"{ck}.npz"),
            "bytes": 2_306_000, "sha256": "a" * 64, "verified_against": "recorded", "seconds": 0.1})


def write_real(root: Path, ck: str, ds: str, source: str, protocol: str, rng) -> float:
    """A ReaL result (real.py's format) for the models of the (ckpt, dataset) result at the headline protocol;
    returns its ReaL top-1."""
    if source == "finetune":
        evaluation = json.loads((root / "evaluate" / ck / ds / f"{protocol}.json").read_text())
        models = [r["model"] for r in evaluation["runs"]]
    else:
        models = [json.loads((root / "baseline" / ck / ds / f"{protocol}.json").read_text())["model"]]
    scores = [float(np.round(rng.uniform(60, 99), 3)) for _ in models]
    _json(root / "real" / ck / f"{ds}.json", {
        "dataset": ds, "real_top1": float(np.mean(scores)),
        "real_top1_std": float(np.std(scores, ddof=1)) if len(scores) > 1 else None,
        "num_images": 327, "num_excluded_empty": 33, "num_validation_images": 360,
        "runs": [{"model": m, "seed": None if source == "released" else i, "real_top1": x, "top1": x - 5}
                 for i, (m, x) in enumerate(zip(models, scores))],
        "image_order": "file names sorted", "predictions": "p.npz", "predictions_sha256": "c" * 64,
        "real_labels": "real.json", "real_labels_sha256": "d" * 64, "definition": "Beyer et al. 2020 (fixture)"})
    return float(np.mean(scores))


def cosine_lr(step, base_lr, total, warmup):
    if step < warmup:
        return base_lr * step / warmup
    return 0.5 * base_lr * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))


def result_files(config: dict, benchmarks: bool = True) -> aggregate.ResultFiles:
    """The files make_results wrote, listed as the aggregate rule lists them (workflow_scripts.matrix order)."""
    root, data, weights = Path(config["output_root"]), Path(config["data_root"]), Path(config["weights_dir"])
    runs = matrix.finetune_runs(config)
    return aggregate.ResultFiles(
        summaries=[root / f"finetune/{ck}/{ds}/lr{lr}_s{seed}/summary.json" for ck, ds, lr, seed in runs],
        metrics=[root / f"finetune/{ck}/{ds}/lr{lr}_s{seed}/metrics.jsonl" for ck, ds, lr, seed in runs],
        finetune_benchmarks=[root / f"benchmarks/finetune/{ck}/{ds}/lr{lr}_s{seed}.tsv" for ck, ds, lr, seed in runs]
        if benchmarks else [],
        selections=[root / "selection" / ck / f"{ds}.json" for ck, ds in matrix.pairs(config)],
        evaluations=[root / "evaluate" / ck / ds / f"{p}.json" for ck, ds, p in matrix.evaluations(config)],
        variant_evaluations=[root / "variants" / v / ck / ds / "evaluation.json"
                             for v, ck, ds in matrix.variant_pairs(config)],
        selection_bias=[root / "selection_bias" / ck / f"{ds}.json" for ck, ds in matrix.selection_bias_pairs(config)],
        baselines=[root / "baseline" / ck / ds / f"{p}.json" for ck, ds, p in matrix.baseline_runs(config)],
        parity=[root / "converted" / f"{ck}.parity.json" for ck in matrix.used_checkpoints(config)],
        downloads=[weights / f"{ck}.download.json" for ck in matrix.used_checkpoints(config)],
        datasets=[data / ds / "dataset.json" for ds in matrix.used_datasets(config)],
        reals=[root / "real" / ck / f"{ds}.json" for ck, ds, _ in matrix.real_results(config)],
    )


def make_results_protocol(root: Path, ck: str, ds: str, protocol: str) -> float:
    """The mean test top-1 make_results wrote for a pair at a protocol."""
    return json.loads((root / "evaluate" / ck / ds / f"{protocol}.json").read_text())["top1_mean"]


def aggregate_outputs(out_dir: Path) -> aggregate.AggregateOutputs:
    return aggregate.AggregateOutputs(
        runs_csv=out_dir / "runs.csv", comparison_csv=out_dir / "comparison.csv",
        comparison_md=out_dir / "comparison.md", comparison_tex=out_dir / "comparison.tex",
        summary_json=out_dir / "summary.json", config_json_out=out_dir / "config.json")


def run_aggregate(config: dict, files: aggregate.ResultFiles | None = None) -> dict:
    """aggregate() as the rule runs it, writing into <output_root>/aggregate."""
    out_dir = Path(config["output_root"]) / "aggregate"
    return aggregate.aggregate(config, files or result_files(config), aggregate_outputs(out_dir))


def aggregate_argv(files: aggregate.ResultFiles, out_dir: Path) -> list[str]:
    """The aggregate CLI's file arguments, as rules/report.smk writes them."""
    argv = []
    for name in aggregate.INPUT_LISTS:
        argv += ["--" + name.replace("_", "-"), *map(str, getattr(files, name))]
    outputs = aggregate_outputs(out_dir)
    return argv + ["--runs-csv", str(outputs.runs_csv), "--comparison-csv", str(outputs.comparison_csv),
                   "--comparison-md", str(outputs.comparison_md), "--comparison-tex", str(outputs.comparison_tex),
                   "--summary-json", str(outputs.summary_json), "--config-json-out", str(outputs.config_json_out)]


def build_report(tmp_path: Path, config: dict, command: str = "snakemake --cores 2") -> tuple[Path, str]:
    """Aggregate and render (with a stand-in notebook page); returns the page path and its HTML."""
    root = Path(config["output_root"])
    run_aggregate(config)
    notebook_html = root / "report" / "analysis.html"
    _write(notebook_html, "<html></html>")
    out = report.render_report(root / "aggregate" / "summary.json", root / "aggregate" / "config.json",
                               notebook_html, root / "logs", root / "report" / "index.html", command)
    return out, out.read_text()


def notebook_argv(notebook: Path, root: Path) -> list[str]:
    return [sys.executable, "-m", "workflow_scripts.report", "notebook", "--notebook", str(notebook),
            "--summary", str(root / "aggregate" / "summary.json"), "--runs-csv", str(root / "aggregate" / "runs.csv"),
            "--comparison-csv", str(root / "aggregate" / "comparison.csv"),
            "--out-ipynb", str(root / "report" / "analysis.ipynb"),
            "--out-html", str(root / "report" / "analysis.html")]


class _Table3Parser(HTMLParser):
    """The cells of one Table 3 grid of the page: {(pre-training | model, column): (status, [line texts])}."""

    def __init__(self, table_id: str):
        super().__init__()
        self.table_id, self.inside, self.row, self.cell, self.cells = table_id, False, None, None, {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id") == self.table_id:
            self.inside = True
        elif self.inside and tag == "tr" and "data-row" in attrs:
            self.row = attrs["data-row"]
        elif self.inside and tag == "td" and "data-column" in attrs:
            self.cell = (self.row, attrs["data-column"])
            self.cells[self.cell] = (attrs["data-status"], [])
        elif self.cell and tag == "span":
            self.cells[self.cell][1].append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False
        elif tag == "td":
            self.cell = None

    def handle_data(self, data):
        if self.cell and self.cells[self.cell][1]:
            self.cells[self.cell][1][-1] += data


def table3_cells(page: str, table_id: str) -> dict[tuple[str, str], tuple[str, list[str]]]:
    parser = _Table3Parser(table_id)
    parser.feed(page)
    assert parser.cells, f"no Table 3 grid with id {table_id!r}"
    return parser.cells


def row_label(config: dict, ckpt: str) -> str:
    """The data-row of a checkpoint's row in the page's Table 3 grids."""
    return f"{config['checkpoints'][ckpt]['pretraining']} | {config['checkpoints'][ckpt]['label']}"


@pytest.fixture
def demo(tmp_path):
    config = load_config("demo/config.yaml", tmp_path)
    expected = make_results(config)
    out, page = build_report(tmp_path, config)
    return config, expected, out, page


# ---------------------------------------------------------------------------------------------
def test_aggregate_tables_follow_the_config_matrix(tmp_path):
    config = load_config("config.yaml", tmp_path, base_lrs=[0.003, 0.03], checkpoints=["mixer_b16_in21k"],
                         datasets=["imagenet", "cifar10"], seeds=[0, 1])
    expected = make_results(config, subset=("imagenet",))["results"]
    root = Path(config["output_root"])
    summary = run_aggregate(config)

    runs = list(csv.DictReader((root / "aggregate" / "runs.csv").open()))
    assert len(runs) == 1 * 2 * 2 * 2
    for r in runs:
        sel = json.loads((root / "selection" / r["checkpoint"] / f"{r['dataset']}.json").read_text())
        assert (r["selected"] == "True") == (float(r["lr"]) == sel["selected_lr"])
        assert r["test_top1"] == ""  # retrained on the full training split: no sweep run was tested
        assert float(r["gpu_hours"]) == pytest.approx(14.25 * 1 / 3600)
        assert r["label"] == "Mixer-B/16" and r["pretraining"] == "ImageNet-21k"
        assert r["device_names"] == "cpu: Fixture CPU @ 2.0GHz"

    comp = {(r["model"], r["pretraining"], r["dataset"]): r
            for r in csv.DictReader((root / "aggregate" / "comparison.csv").open())}
    cifar = comp["Mixer-B/16", "ImageNet-21k", "CIFAR-10"]
    official = next(f["value"] for f in REFS["figures"] if f["source"] == REFS["primary"]["CIFAR-10"]
                    and (f["label"], f["pretraining"], f["dataset"]) == ("Mixer-B/16", "ImageNet-21k", "CIFAR-10"))
    assert float(cifar["top1_mean"]) == pytest.approx(expected["mixer_b16_in21k", "cifar10"])
    assert float(cifar["diff_to_primary"]) == pytest.approx(expected["mixer_b16_in21k", "cifar10"] - official)
    assert cifar["primary_source"] == REFS["primary"]["CIFAR-10"]
    assert comp["Mixer-L/16", "ImageNet-21k", "CIFAR-10"]["status"] == "not run"
    assert comp["Mixer-B/16", "ImageNet-21k", "ImageNet"]["subset"] == "True"
    # ReaL and the averages are rows too: Avg5 has 2 of its 5 members, so no number.
    real = comp["Mixer-B/16", "ImageNet-21k", "ImageNet ReaL"]
    assert real["kind"] == "real" and real["status"] == "run" and real["primary_source"] == "paper_table3"
    avg = comp["Mixer-B/16", "ImageNet-21k", "Avg5"]
    assert (avg["kind"], avg["status"], avg["coverage"], avg["top1_mean"]) == ("average", "partial", "2 of 5", "")
    assert avg["diff_to_primary"] == "" and float(avg["paper_table3_top1"]) == 92.5
    # Every reference figure's row is present.
    for f in REFS["figures"]:
        assert (f["label"], f["pretraining"], f["dataset"]) in comp

    md = (root / "aggregate" / "comparison.md").read_text()
    assert f"{expected['mixer_b16_in21k', 'cifar10']:.2f}" in md and "not run" in md
    assert "| 2 of 5 (paper_table3: 92.50) |" in md
    assert "(subset)" in md and "**Subset:** ImageNet" in md and "120 of 1000 classes" in md
    tex = (root / "aggregate" / "comparison.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex and "not run" in tex and "paper\\_table3" in tex
    assert summary["subset_datasets"][0]["name"] == "imagenet"
    assert json.loads((root / "aggregate" / "config.json").read_text())["finetune"]["seeds"] == [0, 1]
    assert str(root / "evaluate" / "mixer_b16_in21k" / "cifar10" / "official.json") in summary["inputs"]
    # Every row that was run carries its interval, every published figure a verdict, both protocols side by side.
    evaluation = json.loads((root / "evaluate/mixer_b16_in21k/cifar10/official.json").read_text())
    seeds = [r["top1"] for r in evaluation["runs"]]
    interval = stats.top1_interval(seeds, 360)
    assert (float(cifar["ci_low"]), float(cifar["ci_high"])) == pytest.approx((interval.low, interval.high))
    assert "2 seeds" in cifar["ci_method"] and cifar["eval_protocol"] == "official"
    assert cifar["verdict"] == stats.verdict(float(cifar["official_repo_top1"]), interval)[0]
    assert float(cifar["top1_resize_crop"]) == pytest.approx(
        make_results_protocol(root, "mixer_b16_in21k", "cifar10", "resize_crop"))
    assert cifar["trained_on"] == "full"
    assert avg["verdict"] == "not run" and comp["Mixer-L/16", "ImageNet-21k", "CIFAR-10"]["verdict"] == "not run"
    assert real["ci_low"] != "" and real["top1_resize_crop"] == ""  # ReaL is scored at the headline protocol only
    for row in comp.values():
        assert (row["ci_low"] != "") == (row["ci_high"] != "") == (row["status"] == "run")
        assert row["verdict"] in {"consistent", "below", "above", "not run"} if row["primary_top1"] else \
            row["verdict"] == ("no reference" if row["status"] == "run" else "not run")


def test_aggregate_names_a_missing_input(tmp_path):
    config = load_config("demo/config.yaml", tmp_path)
    make_results(config)
    missing = Path(config["output_root"]) / "evaluate" / "demo_mixer_p4" / "digits" / "resize_crop.json"
    missing.unlink()
    with pytest.raises(PipelineError, match=re.escape(str(missing))):
        run_aggregate(config)
    assert not (Path(config["output_root"]) / "aggregate").exists()


def test_aggregate_cli(tmp_path):
    config = load_config("demo/config.yaml", tmp_path)
    make_results(config)
    root = Path(config["output_root"])
    out_dir = tmp_path / "elsewhere"
    res = subprocess.run([sys.executable, "-m", "workflow_scripts.aggregate", "--config-json", json.dumps(config),
                          *aggregate_argv(result_files(config), out_dir)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    # Exactly the files it was told to write, where it was told.
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        ["runs.csv", "comparison.csv", "comparison.md", "comparison.tex", "summary.json", "config.json"])
    assert all(p.stat().st_size > 0 for p in out_dir.iterdir())
    assert not (root / "aggregate").exists()


def test_aggregate_refuses_lists_that_do_not_match_the_matrix(tmp_path):
    config = load_config("demo/config.yaml", tmp_path)
    make_results(config)
    files = result_files(config)
    n_runs = len(matrix.finetune_runs(config))
    short = dataclasses.replace(files, summaries=files.summaries[:-1])
    with pytest.raises(PipelineError, match=rf"--summaries: {n_runs - 1} files given, but the config's matrix has "
                                            rf"{n_runs} fine-tuning runs.*matrix\.finetune_runs"):
        run_aggregate(config, short)
    extra = dataclasses.replace(files, datasets=[*files.datasets, files.datasets[0]])
    with pytest.raises(PipelineError, match=r"--datasets: 4 files given, .* has 3 used datasets"):
        run_aggregate(config, extra)
    with pytest.raises(PipelineError, match=r"--reals: 1 files given, .* has 2 results with ReaL labels.*"
                                            r"matrix\.real_results"):
        run_aggregate(config, dataclasses.replace(files, reals=files.reals[:1]))
    # The ReaL files of the fine-tuned and the released checkpoint swapped: they name other models.
    with pytest.raises(PipelineError, match=re.escape(str(files.reals[1])) + r" \(in --reals\) is the result of "):
        run_aggregate(config, dataclasses.replace(files, reals=files.reals[::-1]))
    # Right length, wrong order: the files record which entry they are.
    swapped = dataclasses.replace(files, evaluations=files.evaluations[::-1])
    with pytest.raises(PipelineError, match=re.escape(str(files.evaluations[-1])) + r" \(in --evaluations\) is the "
                                            r"result of .*workflow_scripts\.matrix order"):
        run_aggregate(config, swapped)
    assert not (Path(config["output_root"]) / "aggregate").exists()
    # The CLI: one clear line, exit code 2, nothing written.
    res = subprocess.run([sys.executable, "-m", "workflow_scripts.aggregate", "--config-json", json.dumps(config),
                          *aggregate_argv(dataclasses.replace(files, metrics=files.metrics[:2]), tmp_path / "out")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.startswith("error: --metrics: 2 files given") and res.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_aggregate_reads_only_the_files_it_is_given(tmp_path):
    """Every input moved to a layout of its own: aggregate builds no path, so it still works."""
    config = load_config("demo/config.yaml", tmp_path)
    expected = make_results(config)["results"]
    files = result_files(config)
    moved = {}
    for name in aggregate.INPUT_LISTS:
        moved[name] = []
        for i, path in enumerate(getattr(files, name)):
            dest = tmp_path / "moved" / f"{name}{i}" / path.name
            dest.parent.mkdir(parents=True)
            path.rename(dest)
            moved[name].append(dest)
    shutil.rmtree(config["output_root"])
    shutil.rmtree(config["data_root"])
    shutil.rmtree(config["weights_dir"])
    summary = run_aggregate(config, aggregate.ResultFiles(**moved))
    assert {(p["checkpoint"], p["dataset"]): p["top1_mean"] for p in summary["pairs"]} == {
        pair: expected[pair] for pair in matrix.pairs(config)}
    assert [r["path"] for r in summary["reals"]] == [str(p) for p in moved["reals"]]
    assert summary["inputs"] == [str(p) for name in aggregate.INPUT_LISTS for p in moved[name]]
    assert all(r["wall_seconds"] == pytest.approx(14.25) for r in summary["runs"])


def test_report_shows_each_pair_references_and_provenance(demo):
    config, expected, out, page = demo
    text = html.unescape(page)
    for (ck, ds), top1 in expected["results"].items():
        assert f"{top1:.2f}" in page, (ck, ds)
    # The demo matches no published configuration: every cell of the published grid is "not run", each
    # published top-1 shown in its cell with its source, none invented.
    headline = table3_cells(page, "headline")
    assert {status for status, _ in headline.values()} == {"not run"}
    assert all(lines[0] == "not run" for _, lines in headline.values())
    for f in REFS["figures"]:
        if f["metric"] == "top1":
            cell = headline[f"{f['pretraining']} | {f['label']}", f["dataset"]]
            assert f"{f['source']}: {tables.format_reference(f['value'])}" in cell[1], f
        else:
            assert f">{tables.format_reference(f['value'])}<" in page.split('id="references"')[1], f
    for citation in REFS["sources"].values():
        assert citation in text
    # The demo's own rows: this run only, no published figure, Δ or source.
    this_run = table3_cells(page, "this-run")
    for (row, column), (_, lines) in this_run.items():
        # the value, its interval, the other protocol's figure (not for ReaL), and "released ..." for p8
        assert lines[1].startswith("95% CI ") and all(not line.startswith(("Δ", *REFS["sources"])) for line in lines)
        assert any(line.startswith("resize_crop: ") and line.endswith("(not verified as the paper's)")
                   for line in lines) == (not column.endswith("ReaL")), (row, column)
        assert len(lines) <= 4
    # Provenance
    for field in ("Git commit", "Working tree dirty", "Package versions", "torch ", "timm ", "snakemake ",
                  "snakemake --cores 2", "cpu: Fixture CPU @ 2.0GHz", "2025-01-01T10:00:00+00:00",
                  "Inception crop (training)"):
        assert field in text, field
    # (safe.directory: the checkout may belong to another user, as a bind-mounted one does when root runs this)
    commit = subprocess.run(["git", "-c", f"safe.directory={REPO}", "-C", str(REPO), "rev-parse", "HEAD"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert commit in page
    # Self-contained: charts embedded, stylesheet inlined, nothing fetched from elsewhere.
    assert page.count("data:image/png;base64,") >= 2 + len(matrix.pairs(config))
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "<link" not in page and "border-collapse" in page
    # Relative links to the logs and the notebook.
    first_lr = config["datasets"]["digits"]["base_lrs"][0]
    assert f'href="../logs/finetune/demo_mixer_p4/digits/lr{first_lr}_s0.log"' in page
    assert 'href="analysis.html"' in page
    # The baseline with both protocols, checksums with where they were verified.
    baseline = page.split('id="baseline-table"')[1].split("</table>")[0]
    assert "11.25" in baseline and "12.75" in baseline
    assert "a" * 64 in page and "recorded" in page


def test_table3_of_the_demo_has_real_and_the_average(demo):
    """The demo's grid: its ReaL-labelled dataset, then its ReaL column, the named average, the others."""
    config, expected, _, page = demo
    cells = table3_cells(page, "this-run")
    columns = list(dict.fromkeys(column for _, column in cells))
    assert columns == ["Digits (JPEG tree)", "Digits (JPEG tree) ReaL", "AvgDemo", "Digits (image folder)",
                       "Digits (array store)"]
    members = config["averages"]["AvgDemo"]
    for ck in config["finetune"]["checkpoints"]:
        row = row_label(config, ck)
        mean = statistics.fmean(expected["results"][ck, ds] for ds in members)
        # The average's interval from its members' (one seed each: Wilson over the 360 test images).
        average = stats.average_interval([stats.top1_interval([expected["results"][ck, ds]], 360) for ds in members])
        other = statistics.fmean(expected["protocols"][ck, ds, "resize_crop"] for ds in members)
        assert cells[row, "AvgDemo"] == ("run", [f"{mean:.2f}", f"95% CI {average.low:.2f}–{average.high:.2f}",
                                                 f"resize_crop: {other:.2f} (not verified as the paper's)"])
        assert cells[row, "Digits (JPEG tree) ReaL"][1][0] == f"{expected['reals'][ck, 'digits_jpeg']:.2f}"
        # ReaL: Wilson over the 327 images with a ReaL label.
        real = stats.top1_interval([expected["reals"][ck, "digits_jpeg"]], 327)
        assert cells[row, "Digits (JPEG tree) ReaL"][1][1] == f"95% CI {real.low:.2f}–{real.high:.2f}"
    # demo_mixer_p8 is not fine-tuned on its head's dataset: its result there is the released model.
    p8 = cells[row_label(config, "demo_mixer_p8"), "Digits (JPEG tree)"]
    released = stats.wilson(11.25, 360)
    assert p8 == ("run", ["11.25", f"95% CI {released[0]:.2f}–{released[1]:.2f}",
                          "resize_crop: 12.75 (not verified as the paper's)", "released model, not fine-tuned"])


def test_table3_of_the_study(tmp_path):
    """The whole study: the paper's column order, released ImageNet-1k results from the baseline at the headline
    protocol, Avg5 over the five results with its interval and verdict, the earlier study's figures in the cells
    they belong to."""
    config = load_config("config.yaml", tmp_path, base_lrs=[0.03])
    expected = make_results(config)
    _, page = build_report(tmp_path, config)
    root = Path(config["output_root"])
    cells = table3_cells(page, "headline")
    assert list(dict.fromkeys(column for _, column in cells)) == [
        "ImageNet", "ImageNet ReaL", "Avg5", "CIFAR-10", "CIFAR-100", "Oxford-IIIT Pets", "Oxford Flowers-102"]
    assert list(dict.fromkeys(row for row, _ in cells)) == [row_label(config, ck)
                                                            for ck in config["finetune"]["checkpoints"]]
    assert 'id="this-run"' not in page  # every row has a published figure
    for ck in config["finetune"]["checkpoints"]:
        row = row_label(config, ck)
        avg = statistics.fmean(expected["results"][ck, ds] for ds in config["averages"]["Avg5"])
        status, lines = cells[row, "Avg5"]
        assert status == "run" and lines[0] == f"{avg:.2f}"
        paper = next(f["value"] for f in REFS["figures"] if f["source"] == "paper_table3" and f["dataset"] == "Avg5"
                     and row == f"{f['pretraining']} | {f['label']}")
        interval = stats.average_interval([stats.top1_interval([expected["results"][ck, ds]], 360)
                                           for ds in config["averages"]["Avg5"]])
        verdict = "consistent" if interval.low <= paper <= interval.high else \
            "below" if interval.high < paper else "above"
        assert lines[1] == f"95% CI {interval.low:.2f}–{interval.high:.2f}"
        assert lines[3:6] == [f"paper_table3: {paper:.2f}", f"Δ {avg - paper:+.2f}", verdict]
        assert cells[row, "ImageNet ReaL"][1][0] == f"{expected['reals'][ck, 'imagenet']:.2f}"
    # Released ImageNet-1k checkpoints: the baseline at the headline protocol (official -> 11.25 here), the other
    # protocol's figure (12.75) beside it.
    b16_1k = cells[row_label(config, "mixer_b16_in1k"), "ImageNet"][1]
    assert b16_1k[2:7] == ["resize_crop: 12.75 (not verified as the paper's)", "released model, not fine-tuned",
                           "paper_table3: 76.44", "Δ -65.19", "below"]
    # The earlier study, labelled as what it was: B/16 ImageNet-1k ImageNet top-1, L/16 ImageNet-21k Avg5 top-1.
    assert "earlier_study: 73.64" in b16_1k
    assert "earlier_study: 88.70" in cells[row_label(config, "mixer_l16_in21k"), "Avg5"][1]
    assert "88.70" not in "".join(line for (_, column), (_, lines) in cells.items() if column != "Avg5"
                                  for line in lines)
    assert not re.search(r"top-5[^<]{0,80}88\.70|88\.70[^<]{0,80}top-5", html.unescape(page))
    md = (root / "aggregate" / "comparison.md").read_text()
    assert "earlier_study: 88.70" in md.split("| ImageNet-21k | Mixer-L/16 |")[1].split("\n")[0]
    tex = (root / "aggregate" / "comparison.tex").read_text()
    assert "earlier\\_study: 88.70" in tex and r"\begin{tabular}[t]{@{}r@{}}" in tex
    summary = json.loads((root / "aggregate" / "summary.json").read_text())
    assert {(r["checkpoint"], r["dataset_name"], r["result_from"]) for r in summary["reals"]} == set(
        matrix.real_results(config))


def test_table3_columns_follow_the_paper():
    """ReaL-labelled datasets first, each followed by its ReaL column, then the averages, then the rest;
    labels only the references use are placed by the same rule."""
    config_columns = [{"label": "Pets", "kind": "dataset"}, {"label": "Avg5", "kind": "average"}]
    reference_labels = ["ImageNet", "ImageNet ReaL", "Avg5", "CIFAR-10"]
    assert [c["label"] for c in tables.table3_columns(config_columns, reference_labels)] == [
        "ImageNet", "ImageNet ReaL", "Avg5", "CIFAR-10", "Pets"]
    demo_columns = [{"label": "D", "kind": "dataset"}, {"label": "D ReaL", "kind": "real"},
                    {"label": "E", "kind": "dataset"}, {"label": "AvgDemo", "kind": "average"}]
    columns = tables.table3_columns(demo_columns, reference_labels)
    assert [(c["label"], c["kind"]) for c in columns] == [
        ("ImageNet", None), ("ImageNet ReaL", "real"), ("D", "dataset"), ("D ReaL", "real"), ("AvgDemo", "average"),
        ("Avg5", None), ("CIFAR-10", None), ("E", "dataset")]


def test_averages_need_every_member(tmp_path):
    """A named average is a number only when every member has a result; else "k of N" and no number."""
    config = load_config("demo/config.yaml", tmp_path, datasets=["digits", "digits_arrays"])
    config["averages"] = {"AvgDemo": ["digits_jpeg", "digits", "digits_arrays"], "AvgTwo": ["digits", "digits_arrays"]}
    expected = make_results(config)["results"]
    summary = run_aggregate(config)
    averages = {(a["checkpoint"], a["dataset_name"]): a for a in summary["averages"]}
    for ck in config["finetune"]["checkpoints"]:
        assert (averages[ck, "AvgDemo"]["status"], averages[ck, "AvgDemo"]["coverage"]) == ("partial", "2 of 3")
        assert averages[ck, "AvgDemo"]["top1_mean"] is None
        two = averages[ck, "AvgTwo"]
        assert two["status"] == "run" and two["top1_mean"] == pytest.approx(
            (expected[ck, "digits"] + expected[ck, "digits_arrays"]) / 2)
    _, page = build_report(tmp_path, config)
    cells = table3_cells(page, "this-run")
    assert cells[row_label(config, "demo_mixer_p4"), "AvgDemo"] == ("partial", ["2 of 3"])
    # No ReaL column: the dataset with ReaL labels was not run.
    assert not any(column.endswith("ReaL") for _, column in cells)


def test_two_checkpoints_cannot_share_a_row(tmp_path):
    config = load_config("demo/config.yaml", tmp_path)
    config["checkpoints"]["demo_mixer_p8"].update(label="Mixer-T/4 (demo)")
    make_results(config)
    with pytest.raises(PipelineError, match=r"'checkpoints\.demo_mixer_p4' and 'checkpoints\.demo_mixer_p8' have "
                                            r"the same label and pretraining"):
        run_aggregate(config)
    assert not (Path(config["output_root"]) / "aggregate").exists()


def test_subset_is_flagged_in_the_headline(tmp_path):
    config = load_config("config.yaml", tmp_path, base_lrs=[0.03], checkpoints=["mixer_b16_in21k"],
                         datasets=["imagenet"], seeds=[0])
    make_results(config, subset=("imagenet",))
    _, page = build_report(tmp_path, config)
    headline = page.split('id="headline-section"')[1].split("</section>")[0]
    assert 'id="subset-warning"' in headline and "120 of 1000 classes" in headline
    assert "(subset)" in headline


def test_no_subset_warning_for_full_datasets(demo):
    _, _, _, page = demo
    assert 'id="subset-warning"' not in page


def test_labels_are_escaped(tmp_path):
    config = load_config("demo/config.yaml", tmp_path)
    config["checkpoints"]["demo_mixer_p4"]["label"] = "<script>alert('x')</script>"
    make_results(config)
    _, page = build_report(tmp_path, config, command="snakemake <b>--cores</b>")
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page
    assert "snakemake &lt;b&gt;--cores&lt;/b&gt;" in page


def test_report_cli_writes_the_page(tmp_path):
    config = load_config("demo/config.yaml", tmp_path)
    make_results(config)
    root = Path(config["output_root"])
    run_aggregate(config)
    res = subprocess.run([sys.executable, "-m", "workflow_scripts.report", "--summary",
                          str(root / "aggregate" / "summary.json"), "--config", str(root / "aggregate" / "config.json"),
                          "--notebook-html", str(root / "report" / "analysis.html"), "--logs-dir", str(root / "logs"),
                          "--out", str(root / "report" / "index.html"), "--command", "snakemake -n"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    page = (root / "report" / "index.html").read_text()
    assert "snakemake -n" in page
    assert 'href="../logs/baseline/demo_mixer_p8/digits_jpeg/official.log"' in page


def test_notebook_and_report_draw_with_the_same_chart_functions(tmp_path, monkeypatch):
    chart_functions = [name for name in dir(charts) if name.endswith("_chart")]
    assert len(chart_functions) == 3
    nb = json.loads((REPO / "notebooks" / "analysis.ipynb").read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "from workflow_scripts import charts" in code
    for name in chart_functions:
        assert f"charts.{name}(" in code, name
    assert "matplotlib" not in code and "plt." not in code  # it draws nothing of its own
    # The report calls every one of them too.
    called = []
    for name in chart_functions:
        original = getattr(charts, name)
        monkeypatch.setattr(charts, name, lambda *a, _name=name, _f=original: called.append(_name) or _f(*a))
    config = load_config("demo/config.yaml", tmp_path)
    make_results(config)
    build_report(tmp_path, config)
    assert set(called) == set(chart_functions)
    assert called.count("training_curves_chart") == len(matrix.pairs(config))


# ---------------------------------------------------------------------------------------------
def test_notebook_executes_on_the_results(tmp_path):
    config = load_config("demo/config.yaml", tmp_path)
    expected = make_results(config)["results"]
    root = Path(config["output_root"])
    run_aggregate(config)
    out_ipynb, out_html = root / "report" / "analysis.ipynb", root / "report" / "analysis.html"
    res = subprocess.run(notebook_argv(REPO / "notebooks" / "analysis.ipynb", root),
                         cwd=tmp_path, env=WORKFLOW_ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    nb = json.loads(out_ipynb.read_text())
    outputs = json.dumps([c.get("outputs", []) for c in nb["cells"]])
    assert "error" not in {o.get("output_type") for c in nb["cells"] for o in c.get("outputs", [])}
    injected = "".join(next(c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", []))["source"])
    assert str((root / "aggregate" / "summary.json").absolute()) in injected  # papermill passed the files
    assert f"kernel interpreter: {sys.executable}" in outputs  # the running environment's kernel
    for top1 in expected.values():
        assert f"{top1:.2f}" in outputs
    # The report's charts: accuracy, LR sweep and one curves chart per pair.
    assert outputs.count('"image/png"') == 2 + len(matrix.pairs(config))
    # The Table 3 grid, as the report shows it (the same functions).
    average = statistics.fmean(expected["demo_mixer_p4", ds] for ds in config["averages"]["AvgDemo"])
    assert "AvgDemo" in outputs and f"{average:.2f}" in outputs
    # The verdicts, the protocol variants and the selection-bias tables, as the report states them.
    summary = json.loads((root / "aggregate" / "summary.json").read_text())
    assert tables.verdict_sentence(summary["verdicts"]) in outputs
    assert config["variants"]["batch32"]["label"] in outputs
    for entry in summary["selection_bias"]:
        assert tables.selection_bias_sentence(entry) in outputs
    assert out_html.read_text().lstrip().lower().startswith("<!doctype html")


def test_failing_notebook_leaves_no_outputs(tmp_path):
    import nbformat

    nb = nbformat.read(REPO / "notebooks" / "analysis.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("raise RuntimeError('deliberate failure')"))
    broken = tmp_path / "broken.ipynb"
    nbformat.write(nb, broken)
    config = load_config("demo/config.yaml", tmp_path)
    make_results(config)
    root = Path(config["output_root"])
    run_aggregate(config)
    out_ipynb, out_html = root / "report" / "analysis.ipynb", root / "report" / "analysis.html"
    res = subprocess.run(notebook_argv(broken, root),
                         cwd=tmp_path, env=WORKFLOW_ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "deliberate failure" in res.stderr and "RuntimeError" in res.stderr
    assert not out_ipynb.exists() and not out_html.exists()
    assert not list((root / "report").glob("*")) if (root / "report").exists() else True


def test_runs_without_benchmark_files_have_no_cost(tmp_path):
    """Stages run by hand have no Snakemake benchmark: the cost is left empty, never guessed."""
    config = load_config("demo/config.yaml", tmp_path)
    make_results(config)
    root = Path(config["output_root"])
    # A listed benchmark file must exist (the rule declares them as inputs) ...
    missing = result_files(config).finetune_benchmarks[0]
    missing.unlink()
    with pytest.raises(PipelineError, match=re.escape(str(missing)) + ": benchmark file not found"):
        run_aggregate(config)
    # ... and without any, the cost is unknown.
    summary = run_aggregate(config, result_files(config, benchmarks=False))
    assert all(r["wall_seconds"] is None and r["gpu_hours"] is None for r in summary["runs"])
    assert summary["cost"]["gpu_hours"] is None and summary["cost"]["runs_with_benchmark"] == 0
    runs = list(csv.DictReader((root / "aggregate" / "runs.csv").open()))
    assert {r["gpu_hours"] for r in runs} == {""}
    notebook_html = root / "report" / "analysis.html"
    _write(notebook_html, "<html></html>")
    page = report.render_report(root / "aggregate" / "summary.json", root / "aggregate" / "config.json",
                                notebook_html, root / "logs", root / "report" / "index.html", "").read_text()
    assert f"0 of {len(matrix.finetune_runs(config))} runs have a benchmark file" in page


# ---------------------------------------------------------------------------------------------
# Intervals and verdicts, both protocols, protocol variants and the selection-bias table
def set_evaluation(root: Path, ck: str, ds: str, per_seed: list[float], num_images: int, protocol="official") -> None:
    """Give a pair's evaluation file these per-seed top-1 figures over num_images test images."""
    path = root / "evaluate" / ck / ds / f"{protocol}.json"
    record = json.loads(path.read_text())
    for run, top1 in zip(record["runs"], per_seed, strict=True):
        run.update(top1=top1, num_images=num_images)
    record.update(top1_mean=statistics.fmean(per_seed), top1_std=statistics.stdev(per_seed), num_images=num_images)
    _json(path, record)


def set_real(root: Path, ck: str, ds: str, per_run: list[float], num_images: int) -> None:
    path = root / "real" / ck / f"{ds}.json"
    record = json.loads(path.read_text())
    for run, top1 in zip(record["runs"], per_run, strict=True):
        run["real_top1"] = top1
    record.update(real_top1=statistics.fmean(per_run), num_images=num_images,
                  real_top1_std=statistics.stdev(per_run) if len(per_run) > 1 else None)
    _json(path, record)


# A study-like fixture: (checkpoint, dataset) -> (per-seed top-1, test images, verdict against the primary figure).
STUDY_EVALUATIONS = {
    ("mixer_b16_in21k", "cifar10"): ([96.70, 96.94], 10_000, "consistent"),  # official_repo 96.82
    ("mixer_l16_in21k", "cifar10"): ([95.00, 95.20], 10_000, "below"),       # official_repo 98.34
    ("mixer_b16_in1k", "cifar10"): ([98.50, 98.60], 10_000, "above"),        # official_repo 96.72
    ("mixer_b16_in21k", "imagenet"): ([80.60, 80.68], 50_000, "consistent"),  # paper_table3 80.64
    ("mixer_l16_in21k", "imagenet"): ([85.00, 85.10], 50_000, "above"),       # paper_table3 82.89
}
STUDY_REALS = {
    ("mixer_b16_in21k", "imagenet"): ([85.70, 85.90], 46_837, "consistent"),  # paper_table3 85.80
    ("mixer_l16_in21k", "imagenet"): ([80.00, 80.20], 46_837, "below"),       # paper_table3 87.54
    ("mixer_b16_in1k", "imagenet"): ([90.00], 46_837, "above"),               # released model; paper_table3 82.36
}


@pytest.fixture
def study(tmp_path):
    """Three checkpoints of the study on ImageNet and CIFAR-10 with two seeds, figures set around the published ones."""
    config = load_config("config.yaml", tmp_path, base_lrs=[0.03], datasets=["imagenet", "cifar10"], seeds=[0, 1],
                         checkpoints=["mixer_b16_in21k", "mixer_l16_in21k", "mixer_b16_in1k"])
    make_results(config)
    root = Path(config["output_root"])
    for (ck, ds), (per_seed, n, _) in STUDY_EVALUATIONS.items():
        set_evaluation(root, ck, ds, per_seed, n)
    for (ck, ds), (per_run, n, _) in STUDY_REALS.items():
        set_real(root, ck, ds, per_run, n)
    _, page = build_report(tmp_path, config)
    return config, root, page


def test_verdicts_of_published_figures(study):
    """Published figures inside, below and above this run's intervals; the count in the headline, the CSV, the
    Markdown and LaTeX tables and the page all agree."""
    config, root, page = study
    comp = {(r["model"], r["pretraining"], r["dataset"]): r
            for r in csv.DictReader((root / "aggregate" / "comparison.csv").open())}
    labels = {ck: (config["checkpoints"][ck]["label"], config["checkpoints"][ck]["pretraining"])
              for ck in config["finetune"]["checkpoints"]}
    cases = [(ck, config["datasets"][ds]["label"], *case) for (ck, ds), case in STUDY_EVALUATIONS.items()]
    cases += [(ck, "ImageNet ReaL", *case) for (ck, _), case in STUDY_REALS.items()]
    for ck, column, per_seed, n, expected in cases:
        row = comp[(*labels[ck], column)]
        interval = stats.top1_interval(per_seed, n)
        assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx((interval.low, interval.high))
        assert row["verdict"] == expected, (ck, column)
        assert float(row["diff_to_primary"]) == pytest.approx(statistics.fmean(per_seed) - float(row["primary_top1"]))
        cell = table3_cells(page, "headline")[f"{labels[ck][1]} | {labels[ck][0]}", column]
        assert expected in cell[1] and f"95% CI {interval.low:.2f}–{interval.high:.2f}" in cell[1]
    released = comp["Mixer-B/16", "ImageNet-1k", "ImageNet"]  # the released model at 11.25 over 360 images
    assert released["verdict"] == "below" and float(released["ci_high"]) == pytest.approx(stats.wilson(11.25, 360)[1])
    not_run = [r for r in comp.values() if r["primary_top1"] and r["status"] != "run"]
    assert len(not_run) == 7 and {r["verdict"] for r in not_run} == {"not run"}  # L/16 ImageNet-1k, the Avg5s
    summary = json.loads((root / "aggregate" / "summary.json").read_text())
    assert summary["verdicts"] == {"published": 16, "consistent": 3, "below": 3, "above": 3, "not run": 7}
    sentence = ("Of 16 published figures (each cell's primary reference), 3 were reproduced (consistent: inside this "
                "run's 95% interval), 6 not (3 below, 3 above), and 7 were not run by this config.")
    headline = html.unescape(page.split('id="verdict-summary"')[1].split("</p>")[0])
    assert sentence in headline
    assert sentence in (root / "aggregate" / "comparison.md").read_text()
    assert tables.latex_escape(sentence) in (root / "aggregate" / "comparison.tex").read_text()
    md = (root / "aggregate" / "comparison.md").read_text()
    assert "96.82 ± 0.17 (n=2) (95% CI 95.25–98.38; resize_crop: " in md
    assert "official_repo: 96.82; Δ +0.00; consistent)" in md


def test_both_protocols_and_the_final_models_are_stated(study):
    config, root, page = study
    text = html.unescape(page)
    assert "retrained at the selected learning rate on the full training split" in text
    assert "shown beside it: resize_crop (resize=shorter_side crop_fraction=0.875), not verified as the paper's" in \
        re.sub(r"<[^>]+>", "", text)
    comp = {(r["model"], r["pretraining"], r["dataset"]): r
            for r in csv.DictReader((root / "aggregate" / "comparison.csv").open())}
    other = json.loads((root / "evaluate/mixer_b16_in21k/cifar10/resize_crop.json").read_text())
    row = comp["Mixer-B/16", "ImageNet-21k", "CIFAR-10"]
    interval = stats.top1_interval([r["top1"] for r in other["runs"]], other["num_images"])
    assert (float(row["top1_resize_crop"]), float(row["ci_low_resize_crop"]), float(row["ci_high_resize_crop"])) == \
        pytest.approx((interval.value, interval.low, interval.high))
    # The verdict is against the headline protocol's figure only.
    assert row["verdict"] == "consistent" and row["eval_protocol"] == "official"
    baseline = page.split('id="baseline-table"')[1].split("</table>")[0]
    assert baseline.count("not verified as the paper&#39;s") == 1  # the released B/16 at resize_crop


def test_selection_bias_numbers_never_feed_the_headline(tmp_path):
    """Every LR's test figure is in its own table; rewriting the selection-bias files changes that table and
    nothing else: not the selection, not the headline, not comparison.csv or runs.csv."""
    config = load_config("demo/config.yaml", tmp_path)
    expected = make_results(config)
    root = Path(config["output_root"])
    summary = run_aggregate(config)
    for entry in summary["selection_bias"]:
        key = entry["checkpoint"], entry["dataset"]
        assert {c["lr"]: c["top1_mean"] for c in entry["lrs"]} == pytest.approx(expected["selection_bias"][key])
        best = max(expected["selection_bias"][key].items(), key=lambda item: (item[1], -item[0]))
        assert (entry["best_lr"], entry["best_top1"]) == pytest.approx(best)
        assert entry["inflation"] == pytest.approx(best[1] - expected["results"][key])
        assert entry["headline"]["top1_mean"] == pytest.approx(expected["results"][key])
    before = {name: (root / "aggregate" / name).read_bytes() for name in ("comparison.csv", "runs.csv")}
    for ck, ds in matrix.selection_bias_pairs(config):  # every LR on test now scores 99.87
        path = root / "selection_bias" / ck / f"{ds}.json"
        record = json.loads(path.read_text())
        for run in record["runs"]:
            run["top1"] = 99.87
        _json(path, record)
    _, page = build_report(tmp_path, config)
    after = json.loads((root / "aggregate" / "summary.json").read_text())
    assert {name: (root / "aggregate" / name).read_bytes() for name in before} == before
    for key in ("comparison", "pairs", "verdicts", "runs"):
        assert after[key] == summary[key], key
    assert all(c["top1_mean"] == pytest.approx(99.87) for e in after["selection_bias"] for c in e["lrs"])
    sections = page.split('<section id="')
    bias = next(s for s in sections if s.startswith("selection-bias"))
    assert "99.87" in bias and "not the headline" in bias
    assert "99.87" not in "".join(s for s in sections if not s.startswith("selection-bias"))
    assert bias.count('<table id="selection-bias-') == len(matrix.selection_bias_pairs(config))


def test_protocol_variants_against_the_paper_protocol(tmp_path):
    config = load_config("demo/config.yaml", tmp_path)
    expected = make_results(config)
    _, page = build_report(tmp_path, config)
    root = Path(config["output_root"])
    summary = json.loads((root / "aggregate" / "summary.json").read_text())
    [variant] = summary["variants"]
    assert (variant["variant"], variant["checkpoint"], variant["dataset"]) == matrix.variant_pairs(config)[0]
    ours = stats.top1_interval([expected["variants"]["batch32", "demo_mixer_p4", "digits_arrays"]], 360)
    paper = stats.top1_interval([expected["results"]["demo_mixer_p4", "digits_arrays"]], 360)
    difference = stats.difference_interval(ours, paper)
    assert (variant["top1_mean"], variant["ci_low"], variant["ci_high"]) == pytest.approx((ours.value, ours.low,
                                                                                         ours.high))
    assert (variant["difference"], variant["difference_low"], variant["difference_high"]) == pytest.approx(
        (difference.value, difference.low, difference.high))
    assert variant["variant_label"] == config["variants"]["batch32"]["label"]
    assert variant["differs"] == (not difference.low <= 0 <= difference.high)
    table = page.split('id="variants-table"')[1].split("</table>")[0]
    assert html.escape(config["variants"]["batch32"]["label"]) in table
    assert f"{difference.value:+.2f} [{difference.low:+.2f}, {difference.high:+.2f}]" in table
    assert "quadrature" in page.split('id="variants"')[1].split("</section>")[0]
    md = (root / "aggregate" / "comparison.md").read_text()
    assert "## Protocol variants" in md and config["variants"]["batch32"]["label"] in md


def test_final_models_without_retraining(tmp_path):
    """retrain_on_full_train off: the dev-split runs of the selected LR are the final models (runs.csv shows their
    test figures); a result file from the other setting is refused, naming the config key."""
    config = load_config("demo/config.yaml", tmp_path)
    config["finetune"]["retrain_on_full_train"] = False
    expected = make_results(config)
    _, page = build_report(tmp_path, config)
    root = Path(config["output_root"])
    assert "The final models are the dev-split runs" in html.unescape(page)
    runs = list(csv.DictReader((root / "aggregate" / "runs.csv").open()))
    for r in runs:
        assert (r["test_top1"] != "") == (r["selected"] == "True")
    tested = {(r["checkpoint"], r["dataset"]): float(r["test_top1"]) for r in runs if r["test_top1"]}
    assert tested == pytest.approx({pair: expected["results"][pair] for pair in matrix.pairs(config)})
    config["finetune"]["retrain_on_full_train"] = True
    with pytest.raises(PipelineError, match=r"evaluate/demo_mixer_p4/digits_jpeg/official\.json: its models were "
                                            r"trained on train, but config key 'finetune\.retrain_on_full_train'"):
        run_aggregate(config)


def test_a_selection_bias_file_must_hold_the_whole_sweep(tmp_path):
    config = load_config("demo/config.yaml", tmp_path)
    make_results(config)
    path = Path(config["output_root"]) / "selection_bias" / "demo_mixer_p4" / "digits.json"
    record = json.loads(path.read_text())
    record["runs"] = record["runs"][:-1]
    _json(path, record)
    with pytest.raises(PipelineError, match=re.escape(str(path)) + r": holds the runs \(lr, seed\) .* but the sweep"):
        run_aggregate(config)
    assert not (Path(config["output_root"]) / "aggregate").exists()


def test_git_state_reads_a_checkout_owned_by_another_user(tmp_path, monkeypatch):
    """A bind-mounted workspace read by root: git refuses with "dubious ownership"; the provenance still has the
    commit. GIT_TEST_ASSUME_DIFFERENT_OWNER is git's own switch for that case (`make test-hostile` chowns a clone)."""
    repo = tmp_path / "checkout"
    repo.mkdir()
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    for args in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "one"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, env=env, capture_output=True)
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True,
                            text=True).stdout.strip()
    (repo / "new.txt").write_text("")
    monkeypatch.setenv("GIT_TEST_ASSUME_DIFFERENT_OWNER", "1")
    refused = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert refused.returncode != 0 and "dubious ownership" in refused.stderr  # what the old code recorded as None
    state = aggregate.git_state(repo)
    assert (state["commit"], state["dirty"], state["dirty_files"]) == (commit, True, ["?? new.txt"])
    assert "owned by another user" in state["note"]
    assert aggregate.git_state(tmp_path / "not_a_checkout")["commit"] is None
