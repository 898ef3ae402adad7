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

from workflow_scripts import aggregate, charts, matrix, references, report, stats, tables
from workflow_scripts.common import PipelineError

REPO = Path(__file__).resolve().parents[1]
REFS = yaml.safe_load((REPO / "report" / "references.yaml").read_text())
# As the rules run a stage: from the working directory, with the workflow's package importable.
WORKFLOW_ENV = dict(os.environ, PYTHONPATH=str(REPO))
BENCH_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time"


def load_config(name: str, tmp_path: Path, base_lrs: list[float] | None = None, **finetune) -> dict:
    """A workflow config as rules/common.smk passes it: references loaded (references.load_config), paths under
    tmp_path.

    `base_lrs` replaces every dataset's LR grid; `finetune` updates the finetune block (checkpoints, datasets, seeds).
    """
    config = references.load_config(REPO / name)
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
    """{(lr, seed): model path} of a pair's final models and what they were trained on (as the rules plan them:
    one final run per finetune.final_seeds, or the sweep's runs of the selected LR without retraining)."""
    seeds = matrix.final_seeds(config)
    if config["finetune"]["retrain_on_full_train"]:
        return {(lr, s): root / f"final/{ck}/{ds}/s{s}/model.safetensors" for s in seeds}, "full"
    return {(lr, s): root / f"finetune/{ck}/{ds}/lr{lr:g}_s{s}/model.safetensors" for s in seeds}, "train"


def make_results(config: dict, subset: tuple[str, ...] = (), rng_seed: int = 0) -> dict:
    """Write every file the aggregate stage reads (rules/common.smk aggregate_inputs), in the formats of
    docs/design.md.

    Returns {"results": {(ckpt, dataset): headline test top-1}, "protocols": {(ckpt, dataset, protocol): top-1},
    "reals": {(ckpt, dataset, result_from, protocol): ReaL top-1}, "variants": {(variant, ckpt, dataset): top-1},
    "sweeps": {(ckpt, dataset, protocol): {lr: test top-1 mean over seeds}}, "released": {(ckpt, dataset,
    protocol): top-1}}: every pair's mean over its final runs at every protocol, every released baseline.
    """
    rng = np.random.default_rng(rng_seed)
    root, headline = Path(config["output_root"]), config["evaluation"]["headline_protocol"]
    write_records(config, subset)
    expected = {"results": {}, "protocols": {}, "reals": {}, "variants": {}, "sweeps": {}, "released": {}}
    selections = {}
    for ck, ds in matrix.pairs(config):
        selections[ck, ds] = write_sweep(config, root, ck, ds, rng)
    for ck, ds, p in matrix.evaluations(config):
        models, trained_on = final_models(config, root, ck, ds, selections[ck, ds]["selected_lr"])
        record = evaluation_file(ck, ds, evaluated_runs(config, ck, ds, models, p, trained_on, rng),
                                 selections[ck, ds]["selected_lr"])
        _json(root / "evaluate" / ck / ds / f"{p}.json", record)
        expected["protocols"][ck, ds, p] = record["top1_mean"]
        if p == headline:
            expected["results"][ck, ds] = record["top1_mean"]
    for name, ck, ds in matrix.variant_pairs(config):
        lr = selections[ck, ds]["selected_lr"]
        models = {(lr, s): root / f"variants/{name}/{ck}/{ds}/s{s}/model.safetensors"
                  for s in config["finetune"]["seeds"]}
        record = evaluation_file(ck, ds, evaluated_runs(config, ck, ds, models, headline,
                                                        final_models(config, root, ck, ds, lr)[1], rng), lr)
        _json(root / "variants" / name / ck / ds / "evaluation.json", record)
        expected["variants"][name, ck, ds] = record["top1_mean"]
    for ck, ds, p in matrix.sweep_evaluations(config):
        models = {(float(lr), seed): root / f"finetune/{ck}/{ds}/lr{lr}_s{seed}/model.safetensors"
                  for _, _, lr, seed in matrix.pair_runs(config, ck, ds)}
        runs = evaluated_runs(config, ck, ds, models, p, "train", rng)
        _json(root / "sweep_on_test" / ck / ds / f"{p}.json", evaluation_file(ck, ds, runs, None))
        expected["sweeps"][ck, ds, p] = {lr: float(np.mean([r["top1"] for r in runs if r["lr"] == lr]))
                                         for lr in sorted({r["lr"] for r in runs})}
    for ck, ds, p in matrix.baseline_runs(config):
        top1 = RELEASED_TOP1.get(p, 12.75)
        _json(root / "baseline" / ck / ds / f"{p}.json", eval_result(top1, 52.5, 10, {"name": p}, "test",
                                                                     str(root / "converted" / f"{ck}.safetensors"), ds))
        _write(root / "logs" / "baseline" / ck / ds / f"{p}.log", "evaluating...\\n")
        expected["released"][ck, ds, p] = top1
    for ck, ds, source, p in matrix.real_results(config):
        expected["reals"][ck, ds, source, p] = write_real(root, ck, ds, source, p, headline, rng)
    return expected


# The released models' test top-1 per protocol in make_results (any other protocol: 12.75).
RELEASED_TOP1 = {"resmall_crop": 11.25}


def write_records(config: dict, subset: tuple[str, ...]) -> None:
    """dataset.json per used dataset; parity, download (a base_checkpoint entry's are its base's) and model_stats
    records per used checkpoint."""
    root, data, weights = Path(config["output_root"]), Path(config["data_root"]), Path(config["weights_dir"])
    for ds in matrix.used_datasets(config):
        _json(data / ds / "dataset.json", {
            "name": ds, "label": config["datasets"][ds]["label"], "layout": "arrays", "root": str(data / ds),
            "classes": [str(i) for i in range(10)], "num_classes": 10, "splits": {"train": 1200, "test": 360},
            "train_split": "train", "test_split": "test", "minival": {"fraction": 0.1, "seed": 0},
            "subset": ds in subset, "subset_note": "120 of 1000 classes" if ds in subset else None})
    for i, ck in enumerate(matrix.used_checkpoints(config)):
        arch, npz = config["checkpoints"][ck]["architecture"], matrix.npz_source(config, ck)
        _json(root / "converted" / f"{ck}.parity.json", {
            "checkpoint": ck, "npz_sha256": "a" * 64, "safetensors_sha256": "b" * 64, "num_params": 571_234,
            "architecture": arch, "max_abs_logit_diff": 3.1e-6, "reference": "flax_reference (NumPy)",
            "input": {"shape": [2, 32, 32, 3], "layout": "NHWC", "distribution": "uniform(-1, 1)", "seed": 0},
            "convert_seconds": 0.4, "peak_rss_mib": 310.0, "npz_mib": 2.2})
        _json(weights / f"{npz}.download.json", {
            "checkpoint": npz, "url": config["checkpoints"][npz]["url"], "path": str(weights / f"{npz}.npz"),
            "bytes": 2_306_000, "sha256": "a" * 64, "verified_against": "recorded", "seconds": 0.1})
        _json(root / "model_stats" / f"{ck}.json", {
            "model": ck, "image_size": arch["image_size"], "precision": "fp32", "device_name": "Fixture CPU",
            "img_s": 1000.0 / (i + 1), "batch_size": 64, "params_excluding_head": 500_000 + i})


def write_real(root: Path, ck: str, ds: str, source: str, protocol: str, headline: str, rng) -> float:
    """A ReaL result (real.py's format) for the models of the (ckpt, dataset) result scored from its evaluation
    with one protocol; returns its ReaL top-1."""
    if source == "finetune":
        evaluation = json.loads((root / "evaluate" / ck / ds / f"{headline}.json").read_text())
        models = [r["model"] for r in sorted(evaluation["runs"], key=lambda r: r["seed"])]
    else:
        models = [json.loads((root / "baseline" / ck / ds / f"{headline}.json").read_text())["model"]]
    scores = [float(np.round(rng.uniform(60, 99), 3)) for _ in models]
    _json(root / "real" / source / ck / ds / f"{protocol}.json", {
        "dataset": ds, "protocol": protocol, "real_top1": float(np.mean(scores)),
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
    """The files make_results wrote, listed as rules/common.smk aggregate_inputs lists them (matrix order)."""
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
        sweep_evaluations=[root / "sweep_on_test" / ck / ds / f"{p}.json"
                           for ck, ds, p in matrix.sweep_evaluations(config)],
        baselines=[root / "baseline" / ck / ds / f"{p}.json" for ck, ds, p in matrix.baseline_runs(config)],
        parity=[root / "converted" / f"{ck}.parity.json" for ck in matrix.used_checkpoints(config)],
        downloads=[weights / f"{matrix.npz_source(config, ck)}.download.json"
                   for ck in matrix.used_checkpoints(config)],
        datasets=[data / ds / "dataset.json" for ds in matrix.used_datasets(config)],
        reals=[root / "real" / src / ck / ds / f"{p}.json" for ck, ds, src, p in matrix.real_results(config)],
        model_stats=[root / "model_stats" / f"{ck}.json" for ck in matrix.used_checkpoints(config)],
    )


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


def row_label(config: dict, ckpt: str) -> str:
    """The data-row of a checkpoint's row in the page's Table 3 grids: pre-training | model | image size."""
    c = config["checkpoints"][ckpt]
    return f"{c['pretraining']} | {c['label']} | {c['architecture']['image_size']}"


def per_seed_of(root: Path, ck: str, ds: str, protocol: str, folder: str = "evaluate") -> list[float]:
    """The per-seed test top-1 make_results wrote for a pair's final runs at a protocol, in seed order."""
    record = json.loads((root / folder / ck / ds / f"{protocol}.json").read_text())
    return [r["top1"] for r in sorted(record["runs"], key=lambda r: r["seed"])]


def mean_sd(per_seed: list[float]) -> str:
    return f"{statistics.fmean(per_seed):.2f} ± {statistics.stdev(per_seed):.2f}"


def grid_of(page: str, table_id: str) -> dict[str, dict[str, list[str]]]:
    """{data-row: {data-column: texts}} of a per-dataset or as-released table."""
    return {attrs["data-row"]: {td["data-column"]: texts for td, texts in tds if "data-column" in td}
            for attrs, tds in table_rows(page, table_id)}


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
    expected = make_results(config, subset=("imagenet",))
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

    with (root / "aggregate" / "comparison.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == aggregate.COMPARISON_COLUMNS
        comp = list(reader)
    # One row per reference figure, in references.yaml order.
    assert [(r["source"], r["model"], r["pretraining"], r["image_size"], r["column"], r["metric"]) for r in comp] == [
        (f["source"], f["label"], f["pretraining"], str(f["image_size"]), f["dataset"], f["metric"])
        for f in config["references"]["figures"]]
    by = {(r["source"], r["model"], r["pretraining"], r["image_size"], r["column"]): r for r in comp if r["metric"] ==
          "top1"}
    # Table 3's ImageNet cell: the mean of the three final runs at resmall-crop, its interval and verdict.
    imagenet = by["paper_table3", "Mixer-B/16", "ImageNet-21k", "224", "ImageNet"]
    per_seed = per_seed_of(root, "mixer_b16_in21k", "imagenet", "resmall_crop")
    interval = stats.top1_interval(per_seed, 360)
    selected = json.loads((root / "selection/mixer_b16_in21k/imagenet.json").read_text())["selected_lr"]
    assert len(per_seed) == 3 and float(imagenet["ours"]) == pytest.approx(expected["results"]["mixer_b16_in21k",
                                                                                              "imagenet"])
    assert imagenet["per_seed"] == ";".join(f"{x:.4f}" for x in per_seed)
    assert float(imagenet["ours_std"]) == pytest.approx(statistics.stdev(per_seed))
    assert (float(imagenet["ci_low"]), float(imagenet["ci_high"])) == pytest.approx((interval.low, interval.high))
    assert imagenet["verdict"] == stats.verdict(80.64, interval)[0] and imagenet["is_primary"] == "True"
    assert (imagenet["matched_result"], imagenet["matched_protocol"], imagenet["matched_runs"]) == (
        "final", "resmall_crop", f"final runs s0, s1, s2 at LR {selected:g}")
    assert float(imagenet["diff"]) == pytest.approx(statistics.fmean(per_seed) - 80.64)
    # The official README's CIFAR-10 figure: the sweep runs at LR 0.03 evaluated with the official protocol.
    cifar = by["official_repo", "Mixer-B/16", "ImageNet-21k", "224", "CIFAR-10"]
    sweep = expected["sweeps"]["mixer_b16_in21k", "cifar10", "official"][0.03]
    assert float(cifar["ours"]) == pytest.approx(sweep)
    assert (cifar["matched_result"], cifar["matched_protocol"], cifar["matched_runs"]) == (
        "sweep_run", "official", "sweep run at LR 0.03, s0, s1")
    assert json.loads(cifar["source_protocol"]) == {"result": "sweep_run", "base_lr": 0.03, "protocol": "official"}
    # ReaL from the final models' predictions at the headline protocol.
    real = by["paper_table3", "Mixer-B/16", "ImageNet-21k", "224", "ImageNet ReaL"]
    assert float(real["ours"]) == pytest.approx(expected["reals"]["mixer_b16_in21k", "imagenet", "finetune",
                                                                  "resmall_crop"])
    # Avg5 has 2 of its 5 members: no number, no verdict; L/16 is not in this config.
    avg = by["paper_table3", "Mixer-B/16", "ImageNet-21k", "224", "Avg5"]
    assert (avg["ours"], avg["verdict"]) == ("", "not run")
    assert {r["verdict"] for k, r in by.items() if k[1] == "Mixer-L/16"} == {"not run"}
    assert summary["verdicts"] == {"published": sum(r["is_primary"] == "True" for r in comp),
                                   **{v: sum(r["verdict"] == v and r["is_primary"] == "True" for r in comp)
                                      for v in ("consistent", "below", "above", "not run")}}
    md = (root / "aggregate" / "comparison.md").read_text()
    assert f"{expected['results']['mixer_b16_in21k', 'imagenet']:.2f}" in md and "not run" in md
    assert "(subset)" in md and "**Subset:** ImageNet" in md and "120 of 1000 classes" in md
    tex = (root / "aggregate" / "comparison.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex and "not run" in tex
    assert summary["subset_datasets"][0]["name"] == "imagenet"
    assert json.loads((root / "aggregate" / "config.json").read_text())["finetune"]["seeds"] == [0, 1]
    assert str(root / "sweep_on_test" / "mixer_b16_in21k" / "cifar10" / "official.json") in summary["inputs"]
    assert [m["checkpoint"] for m in summary["model_stats"]] == ["mixer_b16_in21k"]


def test_aggregate_names_a_missing_input(tmp_path):
    config = load_config("demo/config.yaml", tmp_path)
    make_results(config)
    missing = result_files(config).evaluations[1]
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
    n_runs, n_reals = len(matrix.finetune_runs(config)), len(matrix.real_results(config))
    short = dataclasses.replace(files, summaries=files.summaries[:-1])
    with pytest.raises(PipelineError, match=rf"--summaries: {n_runs - 1} files given, but the config's matrix has "
                                            rf"{n_runs} fine-tuning runs.*matrix\.finetune_runs"):
        run_aggregate(config, short)
    extra = dataclasses.replace(files, datasets=[*files.datasets, files.datasets[0]])
    n_datasets = len(matrix.used_datasets(config))
    with pytest.raises(PipelineError,
                       match=rf"--datasets: {n_datasets + 1} files given, .* has {n_datasets} used datasets"):
        run_aggregate(config, extra)
    with pytest.raises(PipelineError, match=rf"--reals: 1 files given, .* has {n_reals} results with ReaL labels.*"
                                            r"matrix\.real_results"):
        run_aggregate(config, dataclasses.replace(files, reals=files.reals[:1]))
    # The ReaL files of the fine-tuned and the released checkpoint swapped: they name other models.
    with pytest.raises(PipelineError, match=re.escape(str(files.reals[-1])) + r" \(in --reals\) is the result of "):
        run_aggregate(config, dataclasses.replace(files, reals=files.reals[::-1]))
    with pytest.raises(PipelineError, match=re.escape(str(files.model_stats[-1])) + r" \(in --model-stats\)"):
        run_aggregate(config, dataclasses.replace(files, model_stats=files.model_stats[::-1]))
    with pytest.raises(PipelineError, match=re.escape(str(files.sweep_evaluations[-1])) +
                       r" \(in --sweep-evaluations\)"):
        run_aggregate(config, dataclasses.replace(files, sweep_evaluations=files.sweep_evaluations[::-1]))
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
            shutil.copy(path, dest)  # copied: a base_checkpoint shares its base's download record
            moved[name].append(dest)
    shutil.rmtree(config["output_root"])
    shutil.rmtree(config["data_root"])
    shutil.rmtree(config["weights_dir"])
    summary = run_aggregate(config, aggregate.ResultFiles(**moved))
    assert {(p["checkpoint"], p["dataset"]): p["top1_mean"] for p in summary["pairs"]} == {
        pair: expected[pair] for pair in matrix.pairs(config)}
    assert [r["path"] for r in summary["reals"]] == [str(p) for p in moved["reals"]]
    assert [m["path"] for m in summary["model_stats"]] == [str(p) for p in moved["model_stats"]]
    assert summary["inputs"] == [str(p) for name in aggregate.INPUT_LISTS for p in moved[name]]
    assert all(r["wall_seconds"] == pytest.approx(14.25) for r in summary["runs"])


def test_report_shows_each_pair_references_and_provenance(demo):
    config, expected, out, page = demo
    root = Path(config["output_root"])
    text = html.unescape(page)
    # Every pair's figure (mean ± s.d. of its final runs at the headline protocol) in the per-dataset table.
    rows = grid_of(page, "per-dataset-table")
    for ck, ds in matrix.pairs(config):
        cell = rows[row_label(config, ck)][config["datasets"][ds]["label"]]
        assert cell[0] == mean_sd(per_seed_of(root, ck, ds, "resmall_crop")), (ck, ds)
        assert cell[1].startswith(f"{len(matrix.final_seeds(config))} runs · 95% CI ")
    # Table 3 (headline): this config's rows only, ours beside the primary reference and its verdict.
    cells = headline_cells(page)
    assert list(dict.fromkeys(row for row, _ in cells)) == [row_label(config, ck)
                                                            for ck in config["finetune"]["checkpoints"]]
    summary = json.loads((root / "aggregate" / "summary.json").read_text())
    headline_columns = {column for _, column in cells}
    checked = 0
    for ref in summary["comparison"]:
        if ref["is_primary"] and ref["checkpoint"] and ref["column"] in headline_columns:
            key = f"{ref['pretraining']} | {ref['model']} | {ref['image_size']}", ref["column"]
            assert cells[key][1:] == (tables.format_reference(ref["reference_value"]), ref["verdict"]), key
            checked += 1
    assert checked >= 2  # the demo's stand-in figures of a dataset column and of its average
    # Table 3's published configurations this config did not run: rows of their own, every cell "not run".
    not_run = table_rows(page, "headline-not-run-table")
    assert {attrs["data-row"] for attrs, _ in not_run} >= {"ImageNet-21k | Mixer-B/16 | 224",
                                                           "ImageNet-21k | Mixer-L/16 | 224"}
    for citation in config["references"]["sources"].values():
        assert citation["citation"] in text
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
    ck, ds, lr, seed = matrix.finetune_runs(config)[0]
    assert f'href="../logs/finetune/{ck}/{ds}/lr{lr}_s{seed}.log"' in page
    assert 'href="analysis.html"' in page
    # The released model at every protocol that applies to it, checksums with where they were verified.
    baseline = page.split('id="baseline-table"')[1].split("</table>")[0]
    assert "11.25" in baseline and "12.75" in baseline
    assert "a" * 64 in page and "recorded" in page


def test_table3_of_the_demo_has_real_and_the_average(demo):
    """The demo's grids: its ReaL-labelled dataset and its ReaL column, the named average over its members' final
    runs (per seed, so it has an s.d.), and the released model as a row of its own."""
    config, expected, _, page = demo
    root = Path(config["output_root"])
    cells = headline_cells(page)
    summary = json.loads((root / "aggregate" / "summary.json").read_text())
    members = config["averages"]["AvgDemo"]
    for ck in config["finetune"]["checkpoints"]:
        row = row_label(config, ck)
        by_member = [per_seed_of(root, ck, ds, "resmall_crop") for ds in members]
        average = [statistics.fmean(seed) for seed in zip(*by_member)]
        assert cells[row, "AvgDemo"][0] == mean_sd(average)
        real = json.loads((root / "real" / "finetune" / ck / "digits_jpeg" / "resmall_crop.json").read_text())
        assert cells[row, "Digits (JPEG tree) ReaL"][0] == mean_sd([r["real_top1"] for r in real["runs"]])
    columns = list(dict.fromkeys(column for _, column in cells))
    assert columns[:2] == ["Digits (JPEG tree)", "Digits (JPEG tree) ReaL"] and "AvgDemo" in columns
    # demo_mixer_p8's head classifies digits_jpeg: its released model is a row "as released", never in Table 3.
    released = grid_of(page, "released-table")[row_label(config, "demo_mixer_p8")]
    interval = stats.wilson(11.25, 360)
    assert released["Digits (JPEG tree)"][:2] == ["11.25", f"released model · 95% CI {interval[0]:.2f}–"
                                                           f"{interval[1]:.2f}"]
    assert "11.25" not in "".join(v[0] for v in cells.values())
    assert [r["result_from"] for r in summary["table3_rows"]] == ["finetune", "finetune", "released"]


def test_table3_of_the_study(tmp_path):
    """The whole study: the paper's columns (ImNet, ReaL, Avg5) with each fine-tuned row (the 448 px Mixer-L/16
    a row of its own), the released ImageNet-1k models as rows apart, Avg5 over the five datasets."""
    config = load_config("config.yaml", tmp_path, base_lrs=[0.03])
    expected = make_results(config)
    _, page = build_report(tmp_path, config)
    root = Path(config["output_root"])
    cells = headline_cells(page)
    assert list(dict.fromkeys(column for _, column in cells)) == ["ImageNet", "ImageNet ReaL", "Avg5"]
    assert list(dict.fromkeys(row for row, _ in cells)) == [row_label(config, ck)
                                                            for ck in config["finetune"]["checkpoints"]]
    assert {"ImageNet-21k | Mixer-L/16 | 224", "ImageNet-21k | Mixer-L/16 | 448"} <= {row for row, _ in cells}
    assert 'id="headline-not-run-table"' not in page  # every published configuration is run
    summary = json.loads((root / "aggregate" / "summary.json").read_text())
    for ck in config["finetune"]["checkpoints"]:
        row = row_label(config, ck)
        average = [statistics.fmean(seed) for seed in zip(*(per_seed_of(root, ck, ds, "resmall_crop")
                                                             for ds in config["averages"]["Avg5"]))]
        paper = next(f["value"] for f in config["references"]["figures"] if f["source"] == "paper_table3"
                     and f["dataset"] == "Avg5" and row == f"{f['pretraining']} | {f['label']} | {f['image_size']}")
        ref = next(r for r in summary["comparison"] if r["source"] == "paper_table3" and r["column"] == "Avg5"
                   and r["checkpoint"] == ck)
        ours = f"{statistics.fmean(average):.2f}" + (f" ± {statistics.stdev(average):.2f}" if len(average) > 1
                                                      else "")
        assert cells[row, "Avg5"] == (ours, f"{paper:.2f}", ref["verdict"])
        assert ref["ours"] == pytest.approx(statistics.fmean(average))
        assert cells[row, "ImageNet"][0].startswith(f"{expected['results'][ck, 'imagenet']:.2f}")
    released = grid_of(page, "released-table")
    assert list(released) == [row_label(config, ck) for ck, _ in matrix.released(config)]
    assert released[row_label(config, "mixer_b16_in1k")]["ImageNet"][0] == "11.25"
    assert {(r["checkpoint"], r["dataset_name"], r["result_from"]) for r in summary["reals"]} == {
        r[:3] for r in matrix.real_results(config)}


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
    rows = grid_of(page, "per-dataset-table")
    assert not any(column.endswith("ReaL") for row in rows.values() for column in row)  # its dataset was not run
    cells = headline_cells(page)
    assert cells[row_label(config, "demo_mixer_p4_32"), "AvgDemo"][0] == "2 of 3"


def test_two_checkpoints_cannot_share_a_row(tmp_path):
    config = load_config("demo/config.yaml", tmp_path)
    config["checkpoints"]["demo_mixer_p8"].update(label="Mixer-T/4 (demo)")
    config["checkpoints"]["demo_mixer_p8"]["architecture"]["image_size"] = 32
    make_results(config)
    with pytest.raises(PipelineError, match=r"'checkpoints\.demo_mixer_p4_32' and 'checkpoints\.demo_mixer_p8' have "
                                            r"the same label, pretraining and image size"):
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
    config["checkpoints"]["demo_mixer_p4_32"]["label"] = "<script>alert('x')</script>"
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
    average = statistics.fmean(expected["demo_mixer_p4_32", ds] for ds in config["averages"]["AvgDemo"])
    assert "AvgDemo" in outputs and f"{average:.2f}" in outputs
    # The verdicts, the protocol variants and the selection-bias tables, as the report states them.
    summary = json.loads((root / "aggregate" / "summary.json").read_text())
    assert tables.verdict_sentence(summary["verdicts"]) in outputs
    assert config["variants"]["batch32"]["label"] in outputs
    header, body = tables.selection_bias_cells(summary["selection_bias"])
    assert "Best on test (LR)" in outputs and all(row[-2] in outputs for row in body)  # the inflation column
    # Table 3's throughput column as ratios and Table 1's parameters, from the same function as the report.
    header, body = tables.model_stats_cells(summary["model_stats"])
    assert "Ratio to B/16 at 224, ours" in outputs and all(row[3] in outputs for row in body)
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
# Verdicts end to end, the protocols, protocol variants and the selection-bias table
def set_evaluation(root: Path, ck: str, ds: str, per_seed: list[float], num_images: int,
                   protocol="resmall_crop") -> None:
    """Give a pair's evaluation file these per-seed top-1 figures over num_images test images."""
    path = root / "evaluate" / ck / ds / f"{protocol}.json"
    record = json.loads(path.read_text())
    for run, top1 in zip(sorted(record["runs"], key=lambda r: r["seed"]), per_seed, strict=True):
        run.update(top1=top1, num_images=num_images)
    record.update(top1_mean=statistics.fmean(per_seed), top1_std=statistics.stdev(per_seed), num_images=num_images)
    _json(path, record)


# A study-like fixture: (checkpoint, dataset) -> (per-seed top-1 of the three final runs, test images, verdict
# against Table 3).
STUDY_EVALUATIONS = {
    ("mixer_b16_in21k", "imagenet"): ([80.60, 80.64, 80.68], 50_000, "consistent"),  # paper_table3 80.64
    ("mixer_l16_in21k", "imagenet"): ([80.00, 80.10, 80.05], 50_000, "below"),       # paper_table3 82.89
    ("mixer_b16_in1k", "imagenet"): ([78.50, 78.60, 78.55], 50_000, "above"),        # paper_table3 76.44
}


@pytest.fixture
def study(tmp_path):
    """Three checkpoints of the study on ImageNet, figures set around the published ones."""
    config = load_config("config.yaml", tmp_path, base_lrs=[0.03], datasets=["imagenet"], seeds=[0],
                         checkpoints=["mixer_b16_in21k", "mixer_l16_in21k", "mixer_b16_in1k"])
    make_results(config)
    root = Path(config["output_root"])
    for (ck, ds), (per_seed, n, _) in STUDY_EVALUATIONS.items():
        set_evaluation(root, ck, ds, per_seed, n)
    _, page = build_report(tmp_path, config)
    return config, root, page


def test_verdicts_of_published_figures(study):
    """Published figures inside, below and above our intervals: the verdict in comparison.csv, in Table 3 and the
    count in the headline, the Markdown and LaTeX tables all agree."""
    config, root, page = study
    comp = [r for r in csv.DictReader((root / "aggregate" / "comparison.csv").open())]
    cells = headline_cells(page)
    for (ck, ds), (per_seed, n, expected) in STUDY_EVALUATIONS.items():
        c = config["checkpoints"][ck]
        row = next(r for r in comp if (r["source"], r["model"], r["pretraining"], r["column"]) ==
                   ("paper_table3", c["label"], c["pretraining"], "ImageNet"))
        interval = stats.top1_interval(per_seed, n)
        assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx((interval.low, interval.high))
        assert row["verdict"] == expected == stats.verdict(float(row["reference_value"]), interval)[0], ck
        assert cells[row_label(config, ck), "ImageNet"] == (mean_sd(per_seed), row["reference_value"], expected)
    summary = json.loads((root / "aggregate" / "summary.json").read_text())
    primary = [r for r in comp if r["is_primary"] == "True"]
    counts = {v: sum(r["verdict"] == v for r in primary) for v in ("consistent", "below", "above", "not run")}
    assert summary["verdicts"] == {"published": len(primary), **counts}
    assert counts["consistent"] >= 1 and counts["below"] >= 1 and counts["above"] >= 1
    sentence = tables.verdict_sentence(summary["verdicts"])
    assert f"Of {len(primary)} published figures" in sentence
    assert sentence in html.unescape(page.split('id="verdict-summary"')[1].split("</p>")[0])
    assert sentence in (root / "aggregate" / "comparison.md").read_text()
    assert tables.latex_escape(sentence) in (root / "aggregate" / "comparison.tex").read_text()


def test_both_protocols_and_the_final_models_are_stated(study):
    config, root, page = study
    text = html.unescape(re.sub(r"<[^>]+>", "", page))
    assert "trained at the selected learning rate on the entire training split" in text
    summary = json.loads((root / "aggregate" / "summary.json").read_text())
    result = next(r for r in summary["results"] if (r["checkpoint"], r["column"], r["result_from"]) ==
                  ("mixer_b16_in21k", "ImageNet", "finetune"))
    # Every protocol evaluated for it, each from its own evaluation file.
    assert set(result["protocols"]) == set(matrix.finetuned_protocols(config))
    for protocol, fig in result["protocols"].items():
        per_seed = per_seed_of(root, "mixer_b16_in21k", "imagenet", protocol)
        assert fig["per_seed"] == per_seed and fig["top1_mean"] == pytest.approx(statistics.fmean(per_seed))
    assert result["eval_protocol"] == "resmall_crop" and result["per_seed"] == [80.60, 80.64, 80.68]
    assert result["seeds"] == [0, 1, 2] and result["trained_on"] == "full"
    protocols = [[t[0] for _, t in tds] for _, tds in table_rows(page, "protocols-table")]
    assert any(row[:3] == ["Mixer-B/16", "ImageNet-21k", "224"] for row in protocols)


def test_selection_bias_numbers_never_feed_the_headline(tmp_path):
    """Every LR's test figure is in its own table; rewriting the sweep-on-test files changes that table and
    nothing else: not the selection, not the headline, not comparison.csv or runs.csv."""
    config = load_config("demo/config.yaml", tmp_path)
    config["references"]["figures"] = [f for f in config["references"]["figures"] if f["source"] !=
                                       "demo_standin_official"]  # the one reference matched with a sweep run
    expected = make_results(config)
    root, headline = Path(config["output_root"]), config["evaluation"]["headline_protocol"]
    summary = run_aggregate(config)
    for entry in summary["selection_bias"]:
        key = entry["checkpoint"], entry["dataset"]
        sweep = expected["sweeps"][(*key, headline)]
        assert {c["lr"]: c["top1_mean"] for c in entry["lrs"]} == pytest.approx(sweep)
        best = max(sweep.items(), key=lambda item: (item[1], -item[0]))
        assert (entry["best_lr"], entry["best_top1"]) == pytest.approx(best)
        assert entry["inflation"] == pytest.approx(best[1] - expected["results"][key])
        assert entry["headline"]["top1_mean"] == pytest.approx(expected["results"][key])
    before = {name: (root / "aggregate" / name).read_bytes() for name in ("comparison.csv", "runs.csv")}
    for ck, ds in matrix.selection_bias_pairs(config):  # every LR on test now scores 99.87
        path = root / "sweep_on_test" / ck / ds / f"{headline}.json"
        record = json.loads(path.read_text())
        for run in record["runs"]:
            run["top1"] = 99.87
        _json(path, record)
    _, page = build_report(tmp_path, config)
    after = json.loads((root / "aggregate" / "summary.json").read_text())
    assert {name: (root / "aggregate" / name).read_bytes() for name in before} == before
    for key in ("comparison", "pairs", "verdicts", "runs", "results"):
        assert after[key] == summary[key], key
    assert all(c["top1_mean"] == pytest.approx(99.87) for e in after["selection_bias"] for c in e["lrs"])
    sections = page.split('<section id="')
    bias = next(s for s in sections if s.startswith("selection-bias"))
    assert "99.87" in bias and "not the headline" in bias
    assert "99.87" not in "".join(s for s in sections if not s.startswith("selection-bias"))
    assert bias.count("<table") == 1  # one table, a row per pair
    assert len(table_rows(page, "selection-bias-table")) == len(matrix.selection_bias_pairs(config))


def test_protocol_variants_against_the_paper_protocol(tmp_path):
    config = load_config("demo/config.yaml", tmp_path)
    expected = make_results(config)
    _, page = build_report(tmp_path, config)
    root = Path(config["output_root"])
    summary = json.loads((root / "aggregate" / "summary.json").read_text())
    [variant] = summary["variants"]
    name, ck, ds = matrix.variant_pairs(config)[0]
    assert (variant["variant"], variant["checkpoint"], variant["dataset"]) == (name, ck, ds)
    ours = stats.top1_interval([expected["variants"][name, ck, ds]], 360)
    paper = stats.top1_interval(per_seed_of(root, ck, ds, "resmall_crop"), 360)
    difference = stats.difference_interval(ours, paper)
    assert (variant["top1_mean"], variant["ci_low"], variant["ci_high"]) == pytest.approx((ours.value, ours.low,
                                                                                         ours.high))
    assert (variant["difference"], variant["difference_low"], variant["difference_high"]) == pytest.approx(
        (difference.value, difference.low, difference.high))
    assert variant["variant_label"] == config["variants"][name]["label"]
    assert variant["differs"] == (not difference.low <= 0 <= difference.high)
    table = page.split('id="variants-table"')[1].split("</table>")[0]
    assert html.escape(config["variants"][name]["label"]) in table
    assert f"{difference.value:+.2f} [{difference.low:+.2f}, {difference.high:+.2f}]" in table
    assert "quadrature" in page.split('id="variants"')[1].split("</section>")[0]
    md = (root / "aggregate" / "comparison.md").read_text()
    assert "## Protocol variants" in md and config["variants"][name]["label"] in md


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
    first = result_files(config).evaluations[0]
    with pytest.raises(PipelineError, match=re.escape(str(first)) + r": its models were trained on train, but "
                                            r"config key 'finetune\.retrain_on_full_train'"):
        run_aggregate(config)


def test_a_selection_bias_file_must_hold_the_whole_sweep(tmp_path):
    config = load_config("demo/config.yaml", tmp_path)
    make_results(config)
    path = result_files(config).sweep_evaluations[1]
    record = json.loads(path.read_text())
    record["runs"] = record["runs"][:-1]
    _json(path, record)
    with pytest.raises(PipelineError, match=re.escape(str(path)) + r": holds the runs \(lr, seed\) .* but the sweep"):
        run_aggregate(config)
    assert not (Path(config["output_root"]) / "aggregate").exists()


# ---------------------------------------------------------------------------------------------
# The page, comparison.md and comparison.tex on a summary.json of the aggregate's contract, written by hand
# (no pipeline run): the study's shape, three final seeds, every verdict, released rows and one reference
# matched with a sweep run.
PAPER = {("Mixer-B/16", "ImageNet-21k"): {"ImageNet": 80.64, "ImageNet ReaL": 85.80, "Avg5": 92.50},
         ("Mixer-L/16", "ImageNet-21k"): {"ImageNet": 82.89, "ImageNet ReaL": 87.54, "Avg5": 93.63},
         ("Mixer-B/16", "ImageNet-1k"): {"ImageNet": 76.44, "ImageNet ReaL": 82.36, "Avg5": 88.33}}
COLUMNS = [("ImageNet", "dataset"), ("ImageNet ReaL", "real"), ("Avg5", "average"), ("CIFAR-10", "dataset"),
           ("CIFAR-100", "dataset"), ("Oxford-IIIT Pets", "dataset"), ("Oxford Flowers-102", "dataset")]
# Our final runs (three seeds) per (model, pre-training, column); L/16 ImageNet-21k is not run.
FINAL_RUNS = {("Mixer-B/16", "ImageNet-21k", "ImageNet"): [80.58, 80.66, 80.71],    # consistent with 80.64
              ("Mixer-B/16", "ImageNet-21k", "ImageNet ReaL"): [84.10, 84.30, 84.02],  # below 85.80
              ("Mixer-B/16", "ImageNet-21k", "CIFAR-10"): [97.61, 97.52, 97.70],
              ("Mixer-B/16", "ImageNet-21k", "CIFAR-100"): [87.01, 86.80, 87.13],
              ("Mixer-B/16", "ImageNet-21k", "Oxford-IIIT Pets"): [90.11, 89.52, 90.40],  # s.d. above 0.15
              ("Mixer-B/16", "ImageNet-21k", "Oxford Flowers-102"): [98.20, 98.31, 98.25],
              ("Mixer-B/16", "ImageNet-1k", "ImageNet"): [77.90, 78.02, 78.11]}          # above 76.44


def fixture_result(model, pre, column, kind, per_seed, result_from="finetune", n_images=10_000) -> dict:
    """A summary.json `results` entry (the contract): mean, sample s.d. and interval from the per-seed figures."""
    interval = stats.top1_interval(per_seed, n_images)
    std = statistics.stdev(per_seed) if len(per_seed) > 1 else None
    figure = {"top1_mean": statistics.fmean(per_seed), "top1_std": std, "ci_low": interval.low,
              "ci_high": interval.high, "ci_method": "fixture", "per_seed": per_seed}
    return {"checkpoint": f"{model}-{pre}", "label": model, "pretraining": pre, "image_size": 224,
            "result_from": result_from, "column": column, "kind": kind, "dataset_name": column, "status": "run",
            "coverage": f"{len(per_seed)} of {len(per_seed)}", "eval_protocol": "resmall_crop", **figure,
            "seeds": list(range(len(per_seed))) if result_from == "finetune" else [],
            "num_seeds": len(per_seed) if result_from == "finetune" else 0,
            "selected_lr": 0.03 if result_from == "finetune" else None,
            "trained_on": "full" if result_from == "finetune" else None, "subset": False,
            "protocols": {"resmall_crop": figure, "official": {**figure, "top1_mean": figure["top1_mean"] - 0.5}}}


def fixture_reference(source, made_by, result: dict | None, value, column, model, pre, primary,
                      matched=None, per_seed=None) -> dict:
    """A summary.json `comparison` entry: the reference beside the run made its way (`matched`: result kind,
    protocol, runs text), with the verdict of workflow_scripts.stats on that pair."""
    per_seed = per_seed if per_seed is not None else (result["per_seed"] if result else [])
    interval = stats.top1_interval(per_seed, 10_000) if per_seed else None
    if made_by["result"] == "as_reported":
        verdict, diff = "no protocol match", None
    else:
        verdict, diff = stats.verdict(value, interval)
    result_kind, protocol, runs = matched or (made_by["result"], made_by["protocol"], None)
    if interval is None:
        result_kind = protocol = runs = None
    return {"source": source, "citation": REFS["sources"][source]["citation"], "source_protocol": made_by,
            "source_protocol_note": REFS["sources"][source]["protocol_note"], "model": model, "pretraining": pre,
            "image_size": 224, "column": column, "kind": "dataset", "metric": "top1", "reference_value": value,
            "is_primary": primary, "matched_result": result_kind, "matched_protocol": protocol,
            "matched_runs": runs or ("final runs s0, s1, s2 at LR 0.03" if interval else None),
            "checkpoint": result["checkpoint"] if result else None, "per_seed": per_seed,
            "ours": interval.value if interval else None,
            "ours_std": statistics.stdev(per_seed) if len(per_seed) > 1 else None,
            "ci_low": interval.low if interval else None, "ci_high": interval.high if interval else None,
            "diff": diff, "verdict": verdict}


def fixture_results() -> list[dict]:
    results = [fixture_result(m, p, c, dict(COLUMNS)[c], seeds) for (m, p, c), seeds in FINAL_RUNS.items()]
    members = [c for c, kind in COLUMNS if kind == "dataset"]
    per_seed_avg5 = [statistics.fmean(FINAL_RUNS["Mixer-B/16", "ImageNet-21k", c][i] for c in members)
                     for i in range(3)]
    results.insert(2, fixture_result("Mixer-B/16", "ImageNet-21k", "Avg5", "average", per_seed_avg5))
    partial = fixture_result("Mixer-B/16", "ImageNet-1k", "Avg5", "average", [1.0])
    partial.update(status="partial", coverage="1 of 5", top1_mean=None, top1_std=None, ci_low=None, ci_high=None,
                   per_seed=[], protocols={})
    results.append(partial)
    results += [fixture_result("Mixer-B/16", "ImageNet-1k", "ImageNet", "dataset", [76.60], "released", 50_000),
                fixture_result("Mixer-B/16", "ImageNet-1k", "ImageNet ReaL", "real", [82.01], "released", 46_837)]
    return results


def fixture_comparison(results: list[dict]) -> list[dict]:
    by_cell = {(r["label"], r["pretraining"], r["column"], r["result_from"]): r for r in results}
    made_by = {key: entry["made_by"] for key, entry in REFS["sources"].items()}
    rows = [fixture_reference("paper_table3", made_by["paper_table3"], by_cell.get((m, p, c, "finetune")), value, c,
                              m, p, True) for (m, p), figures in PAPER.items() for c, value in figures.items()]
    cifar = by_cell["Mixer-B/16", "ImageNet-21k", "CIFAR-10", "finetune"]
    rows.append(fixture_reference("official_repo", made_by["official_repo"], cifar, 96.82, "CIFAR-10", "Mixer-B/16",
                                  "ImageNet-21k", True, ("sweep_run", "official", "sweep run at LR 0.03, s0"),
                                  [96.75]))
    released = by_cell["Mixer-B/16", "ImageNet-1k", "ImageNet", "released"]
    rows.append(fixture_reference("timm_results", made_by["timm_results"], released, 76.616, "ImageNet",
                                  "Mixer-B/16", "ImageNet-1k", False, ("released", "timm", "released model"),
                                  [76.58]))
    issue = fixture_reference("vit_issue_134", made_by["vit_issue_134"], released, 72.62, "ImageNet", "Mixer-B/16",
                              "ImageNet-1k", False, ("released", None, "released model"))
    issue.update(verdict="no protocol match", diff=None)
    rows.append(issue)
    rows.append(fixture_reference("earlier_study", made_by["earlier_study"],
                                  by_cell["Mixer-B/16", "ImageNet-1k", "ImageNet", "finetune"], 73.64, "ImageNet",
                                  "Mixer-B/16", "ImageNet-1k", False))
    return rows


def fixture_selection_bias() -> list[dict]:
    """Two pairs with different LR grids (the table's columns are their union)."""
    def entry(label, dataset, lrs, selected, best, honest, trained_on):
        return {"checkpoint": label, "dataset": dataset, "label": label, "pretraining": "ImageNet-21k",
                "dataset_label": dataset, "lrs": [{"lr": lr, "top1_mean": v, "ci_low": v - 1, "ci_high": v + 1,
                                                   "selected": lr == selected, "best_on_test": lr == best}
                                                  for lr, v in lrs.items()],
                "best_lr": best, "best_top1": lrs[best], "selected_lr": selected,
                "sweep_top1_at_selected_lr": lrs[selected], "trained_on": trained_on,
                "headline": {"top1_mean": honest, "ci_low": honest - 0.3, "ci_high": honest + 0.3},
                "inflation": lrs[best] - honest, "inflation_by_selection": lrs[best] - lrs[selected], "path": "x"}
    return [entry("Mixer-B/16", "CIFAR-10", {0.003: 97.11, 0.01: 97.44, 0.03: 97.58, 0.06: 97.91}, 0.03, 0.06,
                  97.61, "full"),
            entry("Mixer-B/16", "Oxford-IIIT Pets", {0.001: 88.05, 0.003: 89.12}, 0.001, 0.003, 88.40, "full")]


def contract_summary() -> dict:
    """A summary.json as the aggregate writes it after issue 19 (the keys the report reads)."""
    results = fixture_results()
    comparison = fixture_comparison(results)
    primary = [r for r in comparison if r["is_primary"]]
    protocols = {"resmall_crop": {"resize": "shorter_side", "crop_fraction": 0.875},
                 "resize_crop": {"resize": "square", "crop_fraction": 0.875}, "official": {"resize": "direct"},
                 "timm": {"resize": "timm"}}
    rows = [{"label": m, "pretraining": p, "image_size": 224, "result_from": "finetune"} for m, p in PAPER]
    rows.append({"label": "Mixer-B/16", "pretraining": "ImageNet-1k", "image_size": 224, "result_from": "released"})
    return {
        "title": "Fixture study", "aggregated_utc": "2026-01-01T00:00:00+00:00", "results_root": "/results",
        "results": results, "comparison": comparison, "table3_rows": rows,
        "table3_columns": [{"label": label, "kind": kind} for label, kind in COLUMNS],
        "verdicts": {"published": len(primary), **{v: sum(r["verdict"] == v for r in primary)
                                                   for v in ("consistent", "below", "above", "not run")}},
        "final_seeds": [0, 1, 2], "paper_sd_bound": 0.15, "selection_bias": fixture_selection_bias(),
        "variants": [], "references": REFS, "headline_protocol": "resmall_crop", "final_models_trained_on": "full",
        "eval_protocols": tables.eval_protocol_records(protocols, "resmall_crop"), "subset_datasets": [],
        "average_members": {"Avg5": ["imagenet", "cifar10", "cifar100", "pets", "flowers"]},
        "runs": [], "curves": {}, "pairs": [], "reals": [], "baselines": [], "datasets": {}, "checkpoints": {},
        "protocol": {"inception_crop": True, "inception_crop_min_area": 0.05, "random_flip": True, "batch_size": 512,
                     "micro_batch_size": 64, "momentum": 0.9, "weight_decay": 0.0, "grad_clip_norm": 1.0,
                     "warmup_steps": 500, "pixel_mean": 127.5, "pixel_std": 127.5, "precision": "bf16"},
        "cost": {"gpu_hours": None, "wall_seconds": None, "runs_with_benchmark": 0, "runs": 0},
        "provenance": {"git": {"commit": "f" * 40, "dirty": False, "note": None}, "packages": {},
                       "aggregate_host": {"hostname": "h", "cpu": "c", "cpu_count": 2, "platform": "p"},
                       "training_devices": [], "started_utc": None, "finished_utc": None},
        "inputs": [],
    }


def render_contract(tmp_path: Path, summary: dict) -> str:
    """The page of a hand-written summary.json (render_report as the rule runs it)."""
    _json(tmp_path / "summary.json", summary)
    _json(tmp_path / "config.json", {"title": summary["title"]})
    (tmp_path / "logs").mkdir(exist_ok=True)
    out = report.render_report(tmp_path / "summary.json", tmp_path / "config.json", tmp_path / "analysis.html",
                               tmp_path / "logs", tmp_path / "report" / "index.html", "snakemake --cores all")
    return out.read_text()


class _TableParser(HTMLParser):
    """The body rows of one table of the page: [(tr attributes, [(td attributes, [span-separated texts])])]."""

    def __init__(self, table_id: str):
        super().__init__()
        self.table_id, self.depth, self.rows, self.in_body = table_id, 0, [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and (self.depth or attrs.get("id") == self.table_id):
            self.depth += 1
        elif self.depth == 1 and tag == "tbody":
            self.in_body = True
        elif self.in_body and tag == "tr":
            self.rows.append((attrs, []))
        elif self.in_body and tag == "td":
            self.rows[-1][1].append((attrs, [""]))
        elif self.in_body and tag == "span" and self.rows and self.rows[-1][1]:
            self.rows[-1][1][-1][1].append("")

    def handle_endtag(self, tag):
        if tag == "table" and self.depth:
            self.depth -= 1
            self.in_body = self.in_body and self.depth > 0

    def handle_data(self, data):
        if self.in_body and self.rows and self.rows[-1][1]:
            self.rows[-1][1][-1][1][-1] += data


def table_rows(page: str, table_id: str) -> list[tuple[dict, list[tuple[dict, list[str]]]]]:
    parser = _TableParser(table_id)
    parser.feed(page)
    assert parser.rows, f"no table with id {table_id!r} and rows"
    return [(attrs, [(a, [t.strip() for t in texts if t.strip()]) for a, texts in cells]) for attrs, cells in
            parser.rows]


def headline_cells(page: str) -> dict[tuple[str, str], tuple[str, str, str]]:
    """The page's Table 3: {(pre-training | model, column): (ours, paper, verdict)}."""
    cells = {}
    for attrs, tds in table_rows(page, "headline"):
        for i, (td, texts) in enumerate(tds):
            if "data-column" in td:
                paper, verdict = tds[i + 1][1], tds[i + 2][1]
                cells[attrs["data-row"], td["data-column"]] = (texts[0], paper[0], verdict[0])
    return cells


def section(page: str, section_id: str) -> str:
    return page.split(f'<section id="{section_id}">')[1].split("</section>")[0]


def test_table3_headline_as_the_paper_prints_it(tmp_path):
    """Rows (pre-training, model, image size), columns ImNet, ReaL, Avg5; each cell ours (mean ± s.d. of the
    final runs) beside the paper's figure and the verdict as a word and a coloured badge; released rows apart."""
    summary = contract_summary()
    page = render_contract(tmp_path, summary)
    cells = headline_cells(page)
    assert list(dict.fromkeys(column for _, column in cells)) == ["ImageNet", "ImageNet ReaL", "Avg5"]
    assert list(dict.fromkeys(row for row, _ in cells)) == [f"{p} | {m} | 224" for m, p in PAPER]
    for (model, pre, column), per_seed in FINAL_RUNS.items():
        if column in ("ImageNet", "ImageNet ReaL"):
            ours = f"{statistics.fmean(per_seed):.2f} ± {statistics.stdev(per_seed):.2f}"
            expected = stats.verdict(PAPER[model, pre][column], stats.top1_interval(per_seed, 10_000))[0]
            assert cells[f"{pre} | {model} | 224", column] == (ours, f"{PAPER[model, pre][column]:.2f}", expected)
    assert {v for _, _, v in cells.values()} == {"consistent", "below", "above", "not run"}
    assert cells["ImageNet-21k | Mixer-L/16 | 224", "ImageNet"] == ("not run", "82.89", "not run")
    assert cells["ImageNet-1k | Mixer-B/16 | 224", "Avg5"] == ("1 of 5", "88.33", "not run")
    headline = page.split('id="headline"')[1].split("</table>")[0]
    assert "76.60" not in headline and "ImNet</th>" in headline and ">ReaL</th>" in headline
    # The verdict is a word and a colour: a badge per verdict, each with a background of its own.
    assert headline.count('<span class="verdict" data-verdict="') == len(cells)
    css = (REPO / "report" / "report.css").read_text()
    colours = {v: re.search(rf'span\.verdict\[data-verdict="{v}"\] {{ background: (#[0-9a-f]+)', css).group(1)
               for v in tables.VERDICTS}
    assert len(set(colours.values())) == len(tables.VERDICTS)
    protocol = html.unescape(re.sub(r"<[^>]+>", "", page.split('id="headline-protocol"')[1].split("</p>")[0]))
    assert "seeds 0, 1, 2" in protocol and "resmall_crop" in protocol and "Appendix C (3)(ii)" in protocol
    assert "bilinear without antialiasing: our assumption" in protocol


def test_per_dataset_and_released_figures_against_the_run_made_their_way(tmp_path):
    page = render_contract(tmp_path, contract_summary())
    rows = {attrs["data-row"]: {td["data-column"]: texts for td, texts in tds if "data-column" in td}
            for attrs, tds in table_rows(page, "per-dataset-table")}
    assert list(rows["ImageNet-21k | Mixer-B/16 | 224"]) == ["ImageNet", "CIFAR-10", "CIFAR-100", "Oxford-IIIT Pets",
                                                       "Oxford Flowers-102"]
    cifar = rows["ImageNet-21k | Mixer-B/16 | 224"]["CIFAR-10"]
    per_seed = FINAL_RUNS["Mixer-B/16", "ImageNet-21k", "CIFAR-10"]
    assert cifar[0] == f"{statistics.fmean(per_seed):.2f} ± {statistics.stdev(per_seed):.2f}"
    assert cifar[1].startswith("3 runs · 95% CI ")
    # The official README's figure beside the sweep run that matches it, with its protocol and verdict.
    assert cifar[2:] == ["official_repo 96.82", "consistent", "vs ours 96.75, sweep run at LR 0.03, s0, official"]
    assert rows["ImageNet-1k | Mixer-B/16 | 224"]["ImageNet"][4:6] == ["earlier_study 73.64", "no protocol match"]
    released = {attrs["data-row"]: {td["data-column"]: texts for td, texts in tds if "data-column" in td}
                for attrs, tds in table_rows(page, "released-table")}
    assert list(released) == ["ImageNet-1k | Mixer-B/16 | 224"]
    imagenet = released["ImageNet-1k | Mixer-B/16 | 224"]["ImageNet"]
    assert imagenet[:2] == ["76.60", "released model · 95% CI 76.23–76.97"]
    assert ["timm_results 76.616", "consistent", "vs ours 76.58, released model, timm"] == imagenet[2:5]
    as_released = page.split('id="as-released"')[1].split("<table")[0]
    assert "never a Table 3 figure" in as_released


def test_each_final_run_and_the_sd_beside_the_papers_bound(tmp_path):
    summary = contract_summary()
    page = render_contract(tmp_path, summary)
    header = page.split('id="seeds-table"')[1].split("</thead>")[0]
    assert "Seed 0" in header and "Seed 2" in header and "s.d. &lt; 0.15? (paper)" in header
    body = {(texts[0][0], texts[1][0], texts[3][0]): [t[0] if t else "" for t in texts]
            for _, tds in table_rows(page, "seeds-table") for texts in [[t for _, t in tds]]}
    assert len(body) == sum(r["result_from"] == "finetune" and r["status"] == "run" for r in summary["results"])
    for (model, pre, column), per_seed in FINAL_RUNS.items():
        row = body[model, pre, column]
        std = statistics.stdev(per_seed)
        assert row[4] == "resmall_crop" and row[6:9] == [f"{x:.2f}" for x in per_seed]
        assert row[10] == f"{std:.2f}" and row[11] == ("yes (< 0.15)" if std < 0.15 else "no (≥ 0.15)")
    assert body["Mixer-B/16", "ImageNet-21k", "Oxford-IIIT Pets"][11] == "no (≥ 0.15)"
    assert "standard deviations are smaller than 0.15" in html.unescape(section(page, "headline-section"))


def test_every_reference_with_its_source_protocol_and_matched_runs(tmp_path):
    summary = contract_summary()
    page = render_contract(tmp_path, summary)
    rows = [[t[0] if t else "" for _, t in tds] for _, tds in table_rows(page, "comparison-table")]
    assert len(rows) == len(summary["comparison"])
    for row, ref in zip(rows, summary["comparison"]):
        assert row[0].startswith(ref["source"]) and row[3] == tables.format_reference(ref["reference_value"])
        assert row[4] == tables.made_by_text(ref["source_protocol"]) and row[-1] == ref["verdict"]
    official = next(row for row in rows if row[0].startswith("official_repo"))
    assert official[4:] == ["one sweep run at LR 0.03; official", "sweep run at LR 0.03, s0; official", "96.75",
                            "96.75", "96.38–97.08", "-0.07", "consistent"]
    b16 = rows[0]
    assert b16[6] == ", ".join(f"{x:.2f}" for x in FINAL_RUNS["Mixer-B/16", "ImageNet-21k", "ImageNet"])
    sources = html.unescape(section(page, "comparison"))
    for key, entry in REFS["sources"].items():
        assert f"{key}: {entry['citation']}" in sources and entry["protocol_note"] in sources


def test_selection_bias_is_one_table(tmp_path):
    summary = contract_summary()
    page = render_contract(tmp_path, summary)
    bias = section(page, "selection-bias")
    assert bias.count("<table") == 1 and "<h3" not in bias
    header = re.findall(r"<th>([^<]*)</th>", bias.split("</thead>")[0])
    assert header == ["Model", "Pre-training", "Dataset", "LR 0.001", "LR 0.003", "LR 0.01", "LR 0.03", "LR 0.06",
                      "Best on test (LR)", "Selected on the dev split (LR)", "Headline (honest) [95% CI]", "Inflation",
                      "of which the LR choice"]
    rows = [[t[0] for _, t in tds] for _, tds in table_rows(page, "selection-bias-table")]
    assert rows[0][3:] == ["–", "97.11", "97.44", "97.58", "97.91", "0.06", "0.03", "97.61 [97.31, 97.91]", "+0.30",
                           "+0.33"]
    assert rows[1][3:5] == ["88.05", "89.12"] and rows[1][8:10] == ["0.003", "0.001"]


def test_markdown_and_latex_follow_the_page(tmp_path):
    summary = contract_summary()
    md = tables.comparison_markdown(summary)
    titles = re.findall(r"^## (.+)$", md, flags=re.M)
    assert titles == ["Table 3", "Per dataset", "As released (not fine-tuned; never a Table 3 figure)",
                      "Each final run", "Every reference figure against the run made its way",
                      "Every evaluation protocol", "Selection bias (not the headline)"]
    assert "| Pre-training | Model | Size | ImNet ours | ImNet paper | ImNet verdict | ReaL ours |" in md
    assert ("| ImageNet-21k | Mixer-B/16 | 224 | 80.65 ± 0.07 | 80.64 | consistent | 84.14 ± 0.14 | 85.80 | below |"
            in md)
    assert "official_repo 96.82: consistent vs ours 96.75, sweep run at LR 0.03, s0, official" in md
    assert md.count("| Mixer-B/16 | ImageNet-21k | CIFAR-10 |") == 1  # the selection-bias table's row
    tex = tables.comparison_latex(summary)
    assert tex.count(r"\begin{table}") == len(titles)
    assert r"80.64 & consistent" in tex and r"$\pm$" in tex and r"Selection bias (not the headline)" in tex
    assert "_" not in tex.replace(r"\_", "")  # every underscore escaped


def test_protocol_wording_follows_the_paper(tmp_path):
    page = html.unescape(re.sub(r"<[^>]+>", "", render_contract(tmp_path, contract_summary())))
    for words in ("Appendix C (“We follow the setup of [14]”", "“did not lead to any improvements”",
                  "JFT-300M", "we keep it on", "section 3.1", "Pets has 37 classes",
                  "bilinear without antialiasing (TensorFlow's default): our assumption"):
        assert words in page, words
    assert "Appendix B" not in page and "not verified as the paper" not in page


def test_published_configurations_not_run_are_rows_of_their_own(tmp_path):
    """A subset (or the demo) leaves some of Table 3's configurations out: they are a grid of their own, every cell
    "not run", and the config's grid shows only its own rows."""
    summary = contract_summary()
    summary["table3_rows"] = [r for r in summary["table3_rows"] if r["label"] != "Mixer-L/16"]
    page = render_contract(tmp_path, summary)
    assert "ImageNet-21k | Mixer-L/16 | 224" not in {row for row, _ in headline_cells(page)}
    rows = table_rows(page, "headline-not-run-table")
    assert [attrs["data-row"] for attrs, _ in rows] == ["ImageNet-21k | Mixer-L/16 | 224"]
    assert [t[0] for _, t in rows[0][1][3:]] == ["not run", "82.89", "not run", "not run", "87.54", "not run",
                                                 "not run", "93.63", "not run"]
    assert "## Table 3: published configurations this config did not run" in tables.comparison_markdown(summary)
    assert 'id="headline-not-run-table"' not in render_contract(tmp_path / "all", contract_summary())


# The study's fifth Table 3 row (Mixer-L/16 ImageNet-21k fine-tuned at 448, Appendix C), Table 2's row of the same
# runs evaluated with resize-crop, and the measured throughput and parameters (issue 20).
L448 = ("Mixer-L/16", "ImageNet-21k")
L448_RUNS = {"ImageNet": [83.85, 83.93, 83.97], "ImageNet ReaL": [87.70, 87.79, 87.74]}          # resmall-crop
L448_RESIZE_CROP = {"ImageNet": [84.01, 84.10, 84.20], "ImageNet ReaL": [86.90, 87.00, 87.10]}   # resize-crop
MODEL_STATS = [("Mixer-B/16", 224, 59_100_000, 2000.0, {"img_s_per_core": 1384, "params_m": 59}),
               ("Mixer-L/16", 224, 206_900_000, 640.0, {"img_s_per_core": 419, "params_m": 207}),
               ("Mixer-L/16", 448, 208_100_000, 150.0, {"img_s_per_core": 105})]


def contract_summary_448() -> dict:
    summary = contract_summary()
    made_by = {key: entry["made_by"] for key, entry in REFS["sources"].items()}
    at_448 = {column: {**fixture_result(*L448, column, kind, L448_RUNS[column]), "image_size": 448}
              for column, kind in (("ImageNet", "dataset"), ("ImageNet ReaL", "real"))}
    for column, result in at_448.items():
        other = stats.top1_interval(L448_RESIZE_CROP[column], 10_000)
        result["protocols"]["resize_crop"] = {"top1_mean": other.value, "ci_low": other.low, "ci_high": other.high,
                                              "per_seed": L448_RESIZE_CROP[column]}
    summary["results"] += list(at_448.values())
    rows = summary["table3_rows"]
    rows.insert(2, {"label": "Mixer-L/16", "pretraining": "ImageNet-21k", "image_size": 448, "result_from": "finetune"})
    for source, values, per_seed, protocol in (("paper_table3", (83.91, 87.75), L448_RUNS, "resmall_crop"),
                                               ("paper_table2", (84.15, 87.86), L448_RESIZE_CROP, "resize_crop")):
        for column, value in zip(("ImageNet", "ImageNet ReaL"), values):
            ref = fixture_reference(source, made_by[source], at_448[column], value, column, *L448,
                                    source == "paper_table3",
                                    ("final", protocol, "final runs s0, s1, s2 at LR 0.03"), per_seed[column])
            summary["comparison"].append({**ref, "image_size": 448})
    base = MODEL_STATS[0][3]
    summary["model_stats"] = [
        {"checkpoint": f"{label}-{size}", "label": label, "pretraining": "ImageNet-21k", "image_size": size,
         "params_excluding_head": params, "img_s": img_s, "img_s_ratio": img_s / base,
         "paper_img_s_ratio": published["img_s_per_core"] / 1384, "published": published,
         "device_name": "NVIDIA H200 (fixture)", "precision": "bf16", "batch_size": 64, "path": "x"}
        for label, size, params, img_s, published in MODEL_STATS]
    return summary


def test_the_448_row_is_a_row_of_its_own(tmp_path):
    """Mixer-L/16 ImageNet-21k at 224 and at 448: two rows of Table 3 (the row key names the image size)."""
    page = render_contract(tmp_path, contract_summary_448())
    cells = headline_cells(page)
    rows = list(dict.fromkeys(row for row, _ in cells))
    assert rows[:3] == ["ImageNet-21k | Mixer-B/16 | 224", "ImageNet-21k | Mixer-L/16 | 224",
                        "ImageNet-21k | Mixer-L/16 | 448"]
    per_seed = L448_RUNS["ImageNet"]
    verdict = stats.verdict(83.91, stats.top1_interval(per_seed, 10_000))[0]
    assert cells["ImageNet-21k | Mixer-L/16 | 448", "ImageNet"] == (mean_sd(per_seed), "83.91", verdict)
    assert cells["ImageNet-21k | Mixer-L/16 | 224", "ImageNet"] == ("not run", "82.89", "not run")
    assert "| ImageNet-21k | Mixer-L/16 | 448 |" in tables.comparison_markdown(contract_summary_448())


def test_table2_row_with_its_own_protocol_and_verdict(tmp_path):
    summary = contract_summary_448()
    page = render_contract(tmp_path, summary)
    rows = [[t[0] if t else "" for _, t in tds] for _, tds in table_rows(page, "table2-table")]
    assert [row[3:5] for row in rows] == [["ImageNet", "84.15"], ["ImageNet ReaL", "87.86"]]
    for row, column, value in zip(rows, ("ImageNet", "ImageNet ReaL"), (84.15, 87.86)):
        per_seed = L448_RESIZE_CROP[column]
        verdict = stats.verdict(value, stats.top1_interval(per_seed, 10_000))[0]
        assert row[:3] == ["Mixer-L/16", "ImageNet-21k", "448"]
        assert row[5:] == [mean_sd(per_seed), "resize_crop", "final runs s0, s1, s2 at LR 0.03",
                           f"{statistics.fmean(per_seed) - value:+.2f}", verdict]
    assert {row[-1] for row in rows} == {"consistent", "below"}
    assert "resize-crop" in section(page, "headline-section").split('id="table2"')[1]
    assert "## Table 2 (resize-crop)" in tables.comparison_markdown(summary)
    assert 'id="table2-table"' not in render_contract(tmp_path / "none", contract_summary())


def test_throughput_as_ratios_and_parameters_beside_the_paper(tmp_path):
    summary = contract_summary_448()
    page = render_contract(tmp_path, summary)
    rows = [[t[0] if t else "" for _, t in tds] for _, tds in table_rows(page, "throughput-table")]
    assert [row[:3] for row in rows] == [[label, "ImageNet-21k", str(size)] for label, size, *_ in MODEL_STATS]
    b16, l16, l448 = rows
    assert b16[3:9] == ["59.1", "59", "2000.0", "1.000", "1.000", "1384"]
    assert l16[3:9] == ["206.9", "207", "640.0", f"{640 / 2000:.3f}", "0.303", "419"]
    assert l448[3:9] == ["208.1", "–", "150.0", f"{150 / 2000:.3f}", "0.076", "105"]
    assert b16[9] == "NVIDIA H200 (fixture), bf16, batch 64"
    legend = html.unescape(section(page, "throughput"))
    assert "another device than the paper's" in legend and "NVIDIA H200 (fixture), bf16" in legend
    assert "TPU-v3" in legend and "1 : 0.303 : 0.076" in legend and "head excluded" in legend
    # No Mixer-B/16 at 224 in the study: no ratio of ours, the paper's still shown.
    summary["model_stats"] = [{**m, "img_s_ratio": None} for m in summary["model_stats"][1:]]
    rows = [[t[0] if t else "" for _, t in tds] for _, tds in
            table_rows(render_contract(tmp_path / "no-base", summary), "throughput-table")]
    assert [row[6:8] for row in rows] == [["–", "0.303"], ["–", "0.076"]]
    assert "## Throughput and parameters" in tables.comparison_markdown(summary)


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
