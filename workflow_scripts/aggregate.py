"""Aggregate every result file into tidy tables and the summary the report renders.

  python -m workflow_scripts.aggregate --config-json '<config as JSON>' \\
      --summaries RUN/summary.json ... --metrics RUN/metrics.jsonl ... --finetune-benchmarks RUN.tsv ... \\
      --selections ... --evaluations ... --baselines ... --parity ... --downloads ... --datasets ... \\
      --reals R/real/CKPT/DATASET.json ... \\
      --runs-csv runs.csv --comparison-csv comparison.csv --comparison-md comparison.md \\
      --comparison-tex comparison.tex --summary-json summary.json --config-json-out config.json

It reads exactly the files it is given and writes exactly the files it is told (rules/common.smk
`aggregate_inputs` lists the inputs; formats in docs/design.md). Each input list comes in the order of
its workflow_scripts.matrix function and is paired here with that matrix: a list of another length, or a
file that records another checkpoint/dataset/LR/seed than its place says, is refused. Reference figures
come from the config's `references` (report/references.yaml), each with its source.

Results (workflow_scripts.matrix.results): a fine-tuned pair's from its test evaluation, a released
checkpoint's from its baseline at the dataset's own `eval_protocol`; a ReaL-style top-1 (real.py) is a
result of its own ("<dataset label> ReaL"), and so is each named average of `averages` per checkpoint.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.metadata
import io
import json
import math
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from workflow_scripts.common import PipelineError, atomic_path, json_arg, read_json, run_cli, write_json
from workflow_scripts.matrix import (
    baseline_runs,
    finetune_gpus,
    finetune_runs,
    lr_str,
    pairs,
    real_results,
    results,
    used_checkpoints,
    used_datasets,
)
from workflow_scripts.tables import (
    NOT_RUN,
    PARTIAL,
    comparison_latex,
    comparison_markdown,
    real_label,
    reference_sources,
    table3_columns,
    write_csv,
)

REPO = Path(__file__).resolve().parents[1]
# Packages whose versions the provenance section lists.
PROVENANCE_PACKAGES = ("torch", "torchvision", "timm", "safetensors", "numpy", "snakemake", "pandas",
                       "matplotlib", "jinja2", "papermill", "nbconvert", "scikit-learn")

RUN_COLUMNS = [
    "checkpoint", "label", "pretraining", "dataset", "dataset_label", "lr", "seed", "steps",
    "minival_top1", "minival_top5", "test_top1", "test_top5", "selected", "train_seconds",
    "wall_seconds", "gpus", "gpu_hours", "max_rss_mib", "device", "device_names", "precision",
    "inception_crop", "img_s", "started_utc", "finished_utc", "run_dir",
]


@dataclasses.dataclass(frozen=True)
class ResultFiles:
    """The files aggregate reads; each list in the order of the matrix function named in INPUT_LISTS."""
    summaries: Sequence[str | os.PathLike]
    metrics: Sequence[str | os.PathLike]
    selections: Sequence[str | os.PathLike]
    evaluations: Sequence[str | os.PathLike]
    baselines: Sequence[str | os.PathLike]
    parity: Sequence[str | os.PathLike]
    downloads: Sequence[str | os.PathLike]
    datasets: Sequence[str | os.PathLike]
    reals: Sequence[str | os.PathLike]
    # Snakemake benchmark TSVs of the finetune jobs; empty = none (stages run by hand): cost left unknown.
    finetune_benchmarks: Sequence[str | os.PathLike] = ()


@dataclasses.dataclass(frozen=True)
class AggregateOutputs:
    runs_csv: str | os.PathLike
    comparison_csv: str | os.PathLike
    comparison_md: str | os.PathLike
    comparison_tex: str | os.PathLike
    summary_json: str | os.PathLike
    config_json_out: str | os.PathLike  # the config as run


# Each ResultFiles list: the matrix function that orders it, and what one of its entries is.
INPUT_LISTS = {
    "summaries": (finetune_runs, "fine-tuning runs (summary.json)"),
    "metrics": (finetune_runs, "fine-tuning runs (metrics.jsonl)"),
    "finetune_benchmarks": (finetune_runs, "fine-tuning runs (Snakemake benchmark .tsv)"),
    "selections": (pairs, "checkpoint/dataset pairs (LR selection)"),
    "evaluations": (pairs, "checkpoint/dataset pairs (test evaluation)"),
    "baselines": (baseline_runs, "baseline evaluations (checkpoint, dataset, protocol)"),
    "parity": (used_checkpoints, "used checkpoints (parity record)"),
    "downloads": (used_checkpoints, "used checkpoints (download record)"),
    "datasets": (used_datasets, "used datasets (dataset.json)"),
    "reals": (real_results, "results with ReaL labels (ReaL top-1)"),
}
# The fields of a comparison row that come from this run (None where it did not run).
THIS_RUN_FIELDS = ("checkpoint", "dataset_name", "result_from", "eval_protocol", "coverage", "subset",
                   "top1_mean", "top1_std", "top5_mean", "top5_std", "num_seeds", "selected_lr")


# ---------------------------------------------------------------------------------------------
# Pairing the input lists with the matrix
def pair_with_matrix(config: dict, files: ResultFiles) -> dict[str, list[tuple]]:
    """{list name: [(matrix entry, path)]}; refuses a list whose length differs from its matrix."""
    paired = {}
    for name, (entries_of, what) in INPUT_LISTS.items():
        entries, given = entries_of(config), [Path(p) for p in getattr(files, name)]
        if name == "finetune_benchmarks" and not given:
            given = [None] * len(entries)
        if len(given) != len(entries):
            flag = "--" + name.replace("_", "-")
            raise PipelineError(
                f"{flag}: {len(given)} files given, but the config's matrix has {len(entries)} {what} "
                f"(workflow_scripts.matrix.{entries_of.__name__}); pass one file per entry, in that order, "
                "as the aggregate rule does (rules/common.smk aggregate_inputs)")
        paired[name] = list(zip(entries, given))
    return paired


def check_matches(path: Path, flag: str, found: dict, expected: dict) -> None:
    """A result file records what its place in the list says (catches a list in another order)."""
    if found != expected:
        raise PipelineError(
            f"{path} (in {flag}) is the result of {found}, but its place in the list is that of {expected}; "
            "list the files in workflow_scripts.matrix order (as rules/common.smk aggregate_inputs does)")


# ---------------------------------------------------------------------------------------------
# Readers
def read_jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found (did the finetune job that writes it run?)") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise PipelineError(f"{path}:{n}: not valid JSON ({e}); rerun the finetune job that wrote it") from None
    return records


def read_benchmark(path: Path) -> dict:
    """The first row of a Snakemake benchmark TSV (columns s, h:m:s, max_rss, ...)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PipelineError(f"{path}: benchmark file not found (Snakemake writes it when the finetune job ends); "
                            "rerun that job, or aggregate without --finetune-benchmarks") from None
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t"))
    if not rows or "s" not in rows[0]:
        raise PipelineError(f"{path}: not a Snakemake benchmark file (no 's' column); delete it and rerun the job")
    return rows[0]


def _float_or_none(value) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def split_curves(metrics: list[dict]) -> dict:
    """Training lines (step, loss, lr) and evaluation lines (step, minival_top1) of a metrics.jsonl."""
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "minival_top1" in m]
    return {
        "step": [m["step"] for m in train], "loss": [m["loss"] for m in train], "lr": [m["lr"] for m in train],
        "eval_step": [m["step"] for m in evals], "minival_top1": [m["minival_top1"] for m in evals],
    }


def read_datasets(config: dict, paired: dict) -> dict:
    """Per used dataset: its dataset.json facts (the subset flag the headline shows) and its config."""
    datasets = {}
    for ds, path in paired["datasets"]:
        spec = read_json(path)
        check_matches(path, "--datasets", {"name": spec.get("name")}, {"name": ds})
        datasets[ds] = {"name": ds, "label": config["datasets"][ds]["label"], "subset": bool(spec.get("subset")),
                        "subset_note": spec.get("subset_note"), "splits": spec.get("splits"),
                        "num_classes": spec.get("num_classes"), "layout": spec.get("layout"),
                        "minival": spec.get("minival"), "test_split": spec.get("test_split"),
                        "eval_protocol": config["datasets"][ds]["eval_protocol"],
                        "steps": config["datasets"][ds]["steps"]}
    return datasets


def read_pair_results(paired: dict) -> dict[str, dict]:
    """{"selections": {(ckpt, dataset): record}, "evaluations": {...}, "evaluation_files": {...: path}}."""
    results = {"selections": {}, "evaluations": {}, "evaluation_files": {}}
    for name in ("selections", "evaluations"):
        for (ck, ds), path in paired[name]:
            record = read_json(path)
            check_matches(path, f"--{name}", {"checkpoint": record.get("checkpoint"), "dataset": record.get("dataset")},
                          {"checkpoint": ck, "dataset": ds})
            results[name][ck, ds] = record
            if name == "evaluations":
                results["evaluation_files"][ck, ds] = path
    return results


# ---------------------------------------------------------------------------------------------
# Fine-tuning runs
def run_row(config: dict, run: tuple, summary: dict, test: dict | None, bench: dict | None, run_dir: str) -> dict:
    """One row of runs.csv (RUN_COLUMNS)."""
    ck, ds, lr, seed = run
    wall = _float_or_none(bench["s"]) if bench else None
    gpus = finetune_gpus(config, ck)
    ck_cfg, ds_cfg = config["checkpoints"][ck], config["datasets"][ds]
    return {
        "checkpoint": ck, "label": ck_cfg["label"], "pretraining": ck_cfg["pretraining"],
        "dataset": ds, "dataset_label": ds_cfg["label"], "lr": float(lr), "seed": seed,
        "steps": summary["steps"],
        "minival_top1": summary["minival_top1"], "minival_top5": summary["minival_top5"],
        "test_top1": test["top1"] if test else None, "test_top5": test["top5"] if test else None,
        "selected": test is not None, "train_seconds": summary["train_seconds"],
        "wall_seconds": wall, "gpus": gpus,
        "gpu_hours": wall * gpus / 3600 if wall is not None else None,
        "max_rss_mib": _float_or_none(bench.get("max_rss")) if bench else None,
        "device": summary["device"], "device_names": "; ".join(summary.get("device_names") or []),
        "precision": summary["precision"], "inception_crop": summary["inception_crop"],
        "img_s": summary["img_s"], "started_utc": summary["started_utc"],
        "finished_utc": summary["finished_utc"], "run_dir": run_dir,
    }


def selected_test_result(run: tuple, pair_results: dict) -> dict | None:
    """The test evaluation of a run of the selected LR (None for the other LRs: test is evaluated once)."""
    ck, ds, lr, seed = run
    if lr_str(float(pair_results["selections"][ck, ds]["selected_lr"])) != lr:
        return None
    test = next((r for r in pair_results["evaluations"][ck, ds]["runs"] if int(r["seed"]) == seed), None)
    if test is None:
        raise PipelineError(f"{pair_results['evaluation_files'][ck, ds]} has no result for seed {seed} of the "
                            f"selected LR {lr}; rerun: snakemake -R evaluate")
    return test


def collect_runs(config: dict, paired: dict, pair_results: dict) -> tuple[list[dict], dict]:
    """One row per fine-tuning run, and the curves per run dir (relative to output_root, as in runs.csv)."""
    rows, curves = [], {}
    files = zip(paired["summaries"], paired["metrics"], paired["finetune_benchmarks"])
    for (run, summary_path), (_, metrics_path), (_, bench_path) in files:
        ck, ds, lr, seed = run
        summary = read_json(summary_path)
        found = {"checkpoint": summary.get("checkpoint"), "dataset": summary.get("dataset"),
                 "lr": lr_str(float(summary["lr"])) if "lr" in summary else None, "seed": summary.get("seed")}
        check_matches(summary_path, "--summaries", found, {"checkpoint": ck, "dataset": ds, "lr": lr, "seed": seed})
        run_dir = os.path.relpath(os.path.abspath(summary_path.parent), os.path.abspath(config["output_root"]))
        curves[run_dir] = split_curves(read_jsonl(metrics_path))
        bench = read_benchmark(bench_path) if bench_path else None
        rows.append(run_row(config, run, summary, selected_test_result(run, pair_results), bench, run_dir))
    return rows, curves


def pair_records(config: dict, pair_results: dict) -> list[dict]:
    """Per (checkpoint, dataset): the LR selection and the test result."""
    records = []
    for ck, ds in pairs(config):
        sel, ev = pair_results["selections"][ck, ds], pair_results["evaluations"][ck, ds]
        records.append({"checkpoint": ck, "dataset": ds, "label": config["checkpoints"][ck]["label"],
                        "dataset_label": config["datasets"][ds]["label"],
                        "selected_lr": sel["selected_lr"], "criterion": sel["criterion"],
                        "candidates": sel["candidates"], "top1_mean": ev["top1_mean"],
                        "top1_std": ev["top1_std"], "top5_mean": ev["top5_mean"], "top5_std": ev["top5_std"],
                        "num_seeds": ev["num_seeds"], "protocol": ev["protocol"]})
    return records


def cost_of(runs: list[dict]) -> dict:
    wall = [r["wall_seconds"] for r in runs if r["wall_seconds"] is not None]
    gpu_hours = [r["gpu_hours"] for r in runs if r["gpu_hours"] is not None]
    return {"wall_seconds": sum(wall) if wall else None, "gpu_hours": sum(gpu_hours) if gpu_hours else None,
            "runs_with_benchmark": len(wall), "runs": len(runs)}


# ---------------------------------------------------------------------------------------------
# This run's results: datasets, ReaL and named averages
def row_keys(config: dict) -> dict[str, tuple[str, str]]:
    """(model label, pre-training) per used checkpoint: its row of the Table 3 grid, one row per checkpoint."""
    keys: dict[str, tuple[str, str]] = {}
    for ck in used_checkpoints(config):
        key = (config["checkpoints"][ck]["label"], config["checkpoints"][ck]["pretraining"])
        same = [other for other, k in keys.items() if k == key]
        if same:
            raise PipelineError(f"config keys 'checkpoints.{same[0]}' and 'checkpoints.{ck}' have the same label and "
                                f"pretraining {key}: their results would share one row of the report; give each "
                                "checkpoint its own label or pretraining")
        keys[ck] = key
    return keys


def dataset_results(config: dict, pair_results: dict, baselines: list[dict], datasets: dict) -> dict[tuple, dict]:
    """Per (checkpoint, dataset) of matrix.results: its test result, from the evaluation of a fine-tuned
    pair or from the baseline of a released checkpoint at the dataset's own eval_protocol."""
    at_protocol = {(b["checkpoint"], b["dataset"], b["protocol"]): b for b in baselines}
    found = {}
    for ck, ds, source in results(config):
        protocol = config["datasets"][ds]["eval_protocol"]
        record = {"checkpoint": ck, "dataset_name": ds, "kind": "dataset", "status": "run", "result_from": source,
                  "eval_protocol": protocol, "coverage": None, "subset": datasets[ds]["subset"]}
        if source == "finetune":
            ev = pair_results["evaluations"][ck, ds]
            record.update(top1_mean=ev["top1_mean"], top1_std=ev["top1_std"], top5_mean=ev["top5_mean"],
                          top5_std=ev["top5_std"], num_seeds=ev["num_seeds"], selected_lr=ev["selected_lr"],
                          models=[run.get("model") for run in ev["runs"]])
        else:
            baseline = at_protocol[ck, ds, protocol]
            record.update(top1_mean=baseline["top1"], top1_std=None, top5_mean=baseline["top5"], top5_std=None,
                          num_seeds=None, selected_lr=None, models=[baseline["model"]])
        found[ck, ds] = record
    return found


def read_reals(paired: dict, found: dict[tuple, dict]) -> dict[tuple, dict]:
    """Per (checkpoint, dataset) with ReaL labels: its ReaL result (real.py), as a result of its own.

    A ReaL file records its dataset and the models whose predictions it scored: they must be those of the
    result its place in the list names."""
    reals = {}
    for (ck, ds, _), path in paired["reals"]:
        real = read_json(path)
        result = found[ck, ds]
        check_matches(path, "--reals", {"dataset": real.get("dataset"),
                                        "models": sorted(str(run.get("model")) for run in real.get("runs") or [])},
                      {"dataset": ds, "models": sorted(map(str, result["models"]))})
        reals[ck, ds] = {**result, "kind": "real", "top1_mean": real["real_top1"], "top1_std": real["real_top1_std"],
                         "top5_mean": None, "top5_std": None, "original_top1": statistics.fmean(
                             run["top1"] for run in real["runs"]),
                         "num_images": real["num_images"], "num_excluded_empty": real["num_excluded_empty"],
                         "num_validation_images": real["num_validation_images"],
                         "definition": real["definition"], "path": str(path)}
    return reals


def average_results(config: dict, found: dict[tuple, dict]) -> dict[tuple, dict]:
    """Per used checkpoint and named average (config `averages`): the mean test top-1 of its members, only
    when every member has a result; otherwise no number, status PARTIAL and the coverage "k of N"."""
    averages = {}
    for ck in used_checkpoints(config):
        for name, members in config["averages"].items():
            have = [found[ck, ds] for ds in members if (ck, ds) in found]
            complete = len(have) == len(members)
            averages[ck, name] = {
                "checkpoint": ck, "dataset_name": name, "kind": "average", "status": "run" if complete else PARTIAL,
                "result_from": None, "eval_protocol": None, "coverage": f"{len(have)} of {len(members)}",
                "members": list(members), "subset": any(r["subset"] for r in have),
                "top1_mean": statistics.fmean(r["top1_mean"] for r in have) if complete else None,
                "top1_std": None, "top5_mean": None, "top5_std": None, "num_seeds": None, "selected_lr": None}
    return averages


def this_run(config: dict, paired: dict, pair_results: dict, baselines: list[dict], datasets: dict) -> dict:
    """{"results", "reals", "averages"}: each {(checkpoint, dataset or average name): record}."""
    found = dataset_results(config, pair_results, baselines, datasets)
    return {"results": found, "reals": read_reals(paired, found), "averages": average_results(config, found)}


def column_label(config: dict, record: dict) -> str:
    """The Table 3 column of a result: the dataset's label, "<label> ReaL", or the average's name."""
    if record["kind"] == "average":
        return record["dataset_name"]
    label = config["datasets"][record["dataset_name"]]["label"]
    return real_label(label) if record["kind"] == "real" else label


def config_columns(config: dict) -> list[dict]:
    """The Table 3 columns the config defines: every used dataset (with its ReaL column if it has
    real_labels) and every named average."""
    columns = []
    for ds in used_datasets(config):
        label = config["datasets"][ds]["label"]
        columns.append({"label": label, "kind": "dataset"})
        if config["datasets"][ds].get("real_labels"):
            columns.append({"label": real_label(label), "kind": "real"})
    return columns + [{"label": name, "kind": "average"} for name in config["averages"]]


# ---------------------------------------------------------------------------------------------
# This run beside the published figures
def build_comparison(config: dict, ours: dict, columns: list[dict]) -> list[dict]:
    """One row per (model, pre-training, dataset): this run's result, every published figure and the difference.

    `ours`: this_run's records. Rows: this run's results (datasets, ReaL, averages; in config order), then
    the published figures' (model, pre-training, dataset) this config did not run ("not run").
    """
    refs, keys = config["references"], row_keys(config)
    values: dict[tuple, dict] = {}
    for fig in refs["figures"]:
        values.setdefault((fig["label"], fig["pretraining"], fig["dataset"]), {})[f"{fig['source']}_{fig['metric']}"] \
            = fig["value"]
    kinds = {c["label"]: c["kind"] for c in columns}
    order = [*keys.values()], [c["label"] for c in columns]
    run = {(*keys[r["checkpoint"]], column_label(config, r)): r for records in ours.values() for r in records.values()}
    run = dict(sorted(run.items(), key=lambda item: (order[0].index(item[0][:2]), order[1].index(item[0][2]))))
    rows = []
    for key in list(run) + [k for k in values if k not in run]:
        record = run.get(key)
        row = {"model": key[0], "pretraining": key[1], "dataset": key[2], "kind": kinds.get(key[2]),
               "has_reference": key in values, "status": record["status"] if record else NOT_RUN}
        for metric in ("top1", "top5"):
            for src in reference_sources(refs, metric):
                row[f"{src}_{metric}"] = values.get(key, {}).get(f"{src}_{metric}")
        row.update({field: record[field] if record else None for field in THIS_RUN_FIELDS})
        row["subset"] = bool(row["subset"])
        primary = refs["primary"].get(key[2])
        row["primary_top1"] = row.get(f"{primary}_top1") if primary else None
        row["primary_source"] = primary if row["primary_top1"] is not None else None
        row["diff_to_primary"] = (row["top1_mean"] - row["primary_top1"]
                                  if row["top1_mean"] is not None and row["primary_top1"] is not None else None)
        rows.append(row)
    return rows


def published_summary(config: dict, ours: dict) -> dict:
    """summary.json's view of the ReaL results and averages (the report's ReaL section and legends)."""
    keys, labels = row_keys(config), {ds: config["datasets"][ds]["label"] for ds in config["datasets"]}
    reals = [{**{k: v for k, v in r.items() if k != "models"}, "label": keys[r["checkpoint"]][0],
              "pretraining": keys[r["checkpoint"]][1], "dataset_label": labels[r["dataset_name"]]}
             for r in ours["reals"].values()]
    averages = [{**r, "label": keys[r["checkpoint"]][0], "pretraining": keys[r["checkpoint"]][1]}
                for r in ours["averages"].values()]
    members = {name: [labels[ds] for ds in ds_list] for name, ds_list in config["averages"].items()}
    return {"reals": reals, "averages": averages, "average_members": members}


# ---------------------------------------------------------------------------------------------
# Checkpoints and the evaluation baseline
def read_checkpoints(config: dict, paired: dict) -> dict:
    """Per used checkpoint: its conversion parity and download records."""
    checkpoints = {}
    for (ck, parity_path), (_, download_path) in zip(paired["parity"], paired["downloads"]):
        parity, download = read_json(parity_path), read_json(download_path)
        check_matches(parity_path, "--parity", {"checkpoint": parity.get("checkpoint")}, {"checkpoint": ck})
        check_matches(download_path, "--downloads", {"checkpoint": download.get("checkpoint")}, {"checkpoint": ck})
        checkpoints[ck] = {"name": ck, "label": config["checkpoints"][ck]["label"],
                           "pretraining": config["checkpoints"][ck]["pretraining"],
                           "parity": parity, "download": download}
    return checkpoints


def read_baselines(config: dict, paired: dict) -> list[dict]:
    """Released checkpoints evaluated as they are, each beside the published figures of the same model."""
    refs, baselines = config["references"], []
    for (ck, ds, protocol), path in paired["baselines"]:
        result = read_json(path)
        check_matches(path, "--baselines",
                      {"dataset": result.get("dataset"), "protocol": (result.get("protocol") or {}).get("name")},
                      {"dataset": ds, "protocol": protocol})
        ck_cfg, ds_label = config["checkpoints"][ck], config["datasets"][ds]["label"]
        published = [f for f in refs["figures"] if (f["label"], f["pretraining"], f["dataset"])
                     == (ck_cfg["label"], ck_cfg["pretraining"], ds_label)]
        baselines.append({"checkpoint": ck, "label": ck_cfg["label"], "pretraining": ck_cfg["pretraining"],
                          "dataset": ds, "dataset_label": ds_label, "protocol": protocol,
                          "protocol_settings": config["evaluation"]["protocols"][protocol],
                          "top1": result["top1"], "top5": result["top5"], "top5_note": result.get("top5_note"),
                          "model": result.get("model"),
                          "num_images": result["num_images"], "images_per_s": result.get("images_per_s"),
                          "published": published, "path": str(path)})
    return baselines


# ---------------------------------------------------------------------------------------------
# Provenance
def git_state(repo: Path) -> dict:
    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30, check=False)

    try:
        head = git("rev-parse", "HEAD")
    except FileNotFoundError:
        return {"commit": None, "dirty": None, "note": "git is not installed"}
    if head.returncode != 0:
        return {"commit": None, "dirty": None, "note": f"{repo} is not a git checkout"}
    status = git("status", "--porcelain")
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()),
            "dirty_files": status.stdout.splitlines()[:50], "note": None}


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PROVENANCE_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(runs: list[dict]) -> dict:
    return {
        "git": git_state(REPO), "packages": package_versions(),
        "aggregate_host": {"hostname": platform.node(), "platform": platform.platform(),
                           "cpu": cpu_name(), "cpu_count": os.cpu_count()},
        "training_devices": sorted({n for r in runs for n in r["device_names"].split("; ") if n}),
        "started_utc": min((r["started_utc"] for r in runs), default=None),
        "finished_utc": max((r["finished_utc"] for r in runs), default=None),
    }


# ---------------------------------------------------------------------------------------------
def aggregate(config: dict, files: ResultFiles, outputs: AggregateOutputs) -> dict:
    """Read `files`, write every file of `outputs` (summary.json last) and return the summary."""
    refs = config["references"]
    if not isinstance(refs, dict):
        raise PipelineError("config key 'references' must be the loaded references (a mapping), as the "
                            "workflow passes it; got a path: run through snakemake")
    paired = pair_with_matrix(config, files)
    datasets = read_datasets(config, paired)
    pair_results = read_pair_results(paired)
    runs, curves = collect_runs(config, paired, pair_results)
    baselines = read_baselines(config, paired)
    ours = this_run(config, paired, pair_results, baselines, datasets)
    columns = table3_columns(config_columns(config), [f["dataset"] for f in refs["figures"]])
    summary = {
        "title": config["report"]["title"],
        "aggregated_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "results_root": config["output_root"],
        "runs": runs,
        "curves": curves,
        "pairs": pair_records(config, pair_results),
        "comparison": build_comparison(config, ours, columns),
        "table3_columns": columns,
        **published_summary(config, ours),
        "references": refs,
        "datasets": datasets,
        "subset_datasets": [d for d in datasets.values() if d["subset"]],
        "checkpoints": read_checkpoints(config, paired),
        "baselines": baselines,
        "protocol": config["protocol"],
        "eval_protocols": config["evaluation"]["protocols"],
        "cost": cost_of(runs),
        "provenance": provenance(runs),
        "inputs": [str(path) for entries in paired.values() for _, path in entries if path is not None],
    }
    write_outputs(config, summary, outputs)
    return summary


def write_outputs(config: dict, summary: dict, outputs: AggregateOutputs) -> None:
    comparison = summary["comparison"]
    write_csv(outputs.runs_csv, summary["runs"], RUN_COLUMNS)
    comparison_columns = list(comparison[0]) if comparison else ["model", "pretraining", "dataset"]
    write_csv(outputs.comparison_csv, comparison, comparison_columns)
    with atomic_path(outputs.comparison_md) as tmp:
        tmp.write_text(comparison_markdown(comparison, summary["table3_columns"], summary["references"],
                                           summary["title"], summary["subset_datasets"]))
    with atomic_path(outputs.comparison_tex) as tmp:
        tmp.write_text(comparison_latex(comparison, summary["table3_columns"], summary["references"]))
    write_json(outputs.config_json_out, config)
    write_json(outputs.summary_json, summary)  # last: the report rule's input


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.aggregate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-json", required=True, help="the workflow config as JSON (references loaded)")
    inputs = ap.add_argument_group("inputs (each list in the order of its workflow_scripts.matrix function)")
    for name, (entries_of, what) in INPUT_LISTS.items():
        inputs.add_argument("--" + name.replace("_", "-"), nargs="*", type=Path, metavar="FILE",
                            required=name != "finetune_benchmarks",
                            default=[], help=f"one per {what}, in matrix.{entries_of.__name__} order")
    outputs = ap.add_argument_group("outputs")
    for field in dataclasses.fields(AggregateOutputs):
        outputs.add_argument("--" + field.name.replace("_", "-"), required=True, type=Path, metavar="FILE")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files = ResultFiles(**{name: getattr(args, name) for name in INPUT_LISTS})
    outputs = AggregateOutputs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(AggregateOutputs)})
    summary = aggregate(json_arg(args.config_json, "--config-json"), files, outputs)
    print(f"aggregated {len(summary['runs'])} runs, {len(summary['comparison'])} comparison rows "
          f"-> {outputs.summary_json}")
    return 0


if __name__ == "__main__":
    run_cli(main)
