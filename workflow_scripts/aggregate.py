"""Aggregate every result file into tidy tables and the summary the report renders.

  python -m workflow_scripts.aggregate --config-json '<config as JSON>' \\
      --summaries RUN/summary.json ... --metrics RUN/metrics.jsonl ... --finetune-benchmarks RUN.tsv ... \\
      --selections ... --evaluations ... --baselines ... --parity ... --downloads ... --datasets ... \\
      --runs-csv runs.csv --comparison-csv comparison.csv --comparison-md comparison.md \\
      --comparison-tex comparison.tex --summary-json summary.json --config-json-out config.json

It reads exactly the files it is given and writes exactly the files it is told (rules/common.smk
`aggregate_inputs` lists the inputs; formats in docs/design.md). Each input list comes in the order of
its workflow_scripts.matrix function and is paired here with that matrix: a list of another length, or a
file that records another checkpoint/dataset/LR/seed than its place says, is refused. Reference figures
come from the config's `references` (report/references.yaml), each with its source.
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
    used_checkpoints,
    used_datasets,
)
from workflow_scripts.tables import NOT_RUN, comparison_latex, comparison_markdown, reference_sources, write_csv

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
}


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
# This run beside the published figures
def build_comparison(config: dict, evaluations: dict, subsets: dict) -> list[dict]:
    """One row per (model, pre-training, dataset): every published figure, this run, and the difference.

    Rows come from the reference figures (shown "not run" until the config runs them) and from the
    config's pairs (pairs without any published figure, e.g. the demo's, are rows with no references).
    """
    refs = config["references"]
    values: dict[tuple, dict] = {}
    for fig in refs["figures"]:
        key = (fig["label"], fig["pretraining"], fig["dataset"])
        values.setdefault(key, {})[f"{fig['source']}_{fig['metric']}"] = fig["value"]

    ours = {}
    for (ck, ds), ev in evaluations.items():
        ck_cfg, ds_cfg = config["checkpoints"][ck], config["datasets"][ds]
        ours[ck_cfg["label"], ck_cfg["pretraining"], ds_cfg["label"]] = (ck, ds, ev)

    rows = []
    for key in list(values) + [k for k in ours if k not in values]:
        label, pretraining, dataset = key
        row = {"model": label, "pretraining": pretraining, "dataset": dataset,
               "has_reference": key in values, "status": "run" if key in ours else NOT_RUN}
        for metric in ("top1", "top5"):
            for src in reference_sources(refs, metric):
                row[f"{src}_{metric}"] = values.get(key, {}).get(f"{src}_{metric}")
        ck, ds, ev = ours.get(key, (None, None, None))
        row.update({
            "checkpoint": ck, "dataset_name": ds,
            "subset": bool(ds and subsets.get(ds, {}).get("subset")),
            "top1_mean": ev["top1_mean"] if ev else None, "top1_std": ev["top1_std"] if ev else None,
            "top5_mean": ev["top5_mean"] if ev else None, "top5_std": ev["top5_std"] if ev else None,
            "num_seeds": ev["num_seeds"] if ev else None, "selected_lr": ev["selected_lr"] if ev else None,
        })
        primary = refs["primary"].get(dataset)
        primary_value = row.get(f"{primary}_top1") if primary else None
        row["primary_source"] = primary if primary_value is not None else None
        row["primary_top1"] = primary_value
        row["diff_to_primary"] = (row["top1_mean"] - primary_value
                                  if ev and primary_value is not None else None)
        rows.append(row)
    return rows


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
    summary = {
        "title": config["report"]["title"],
        "aggregated_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "results_root": config["output_root"],
        "runs": runs,
        "curves": curves,
        "pairs": pair_records(config, pair_results),
        "comparison": build_comparison(config, pair_results["evaluations"], datasets),
        "references": refs,
        "datasets": datasets,
        "subset_datasets": [d for d in datasets.values() if d["subset"]],
        "checkpoints": read_checkpoints(config, paired),
        "baselines": read_baselines(config, paired),
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
        tmp.write_text(comparison_markdown(comparison, summary["references"], summary["title"],
                                           summary["subset_datasets"]))
    with atomic_path(outputs.comparison_tex) as tmp:
        tmp.write_text(comparison_latex(comparison, summary["references"]))
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
