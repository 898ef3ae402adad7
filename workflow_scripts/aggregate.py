"""Aggregate every result file into tidy tables and the summary the report renders.

  python -m workflow_scripts.aggregate --config-json '<config as JSON>' \\
      --summaries RUN/summary.json ... --metrics RUN/metrics.jsonl ... --finetune-benchmarks RUN.tsv ... \\
      --selections ... --evaluations ... --variant-evaluations ... --sweep-evaluations ... --baselines ... \\
      --parity ... --downloads ... --datasets ... --reals R/real/CKPT/DATASET.json ... \\
      --runs-csv runs.csv --comparison-csv comparison.csv --comparison-md comparison.md \\
      --comparison-tex comparison.tex --summary-json summary.json --config-json-out config.json

It reads exactly the files it is given and writes exactly the files it is told (rules/common.smk
`aggregate_inputs` lists the inputs; formats in docs/design.md). Each input list comes in the order of
its workflow_scripts.matrix function and is paired here with that matrix: a list of another length, or a
file that records another checkpoint/dataset/LR/seed than its place says, is refused. Reference figures
come from the config's `references` (report/references.yaml), each with its source.

Results (workflow_scripts.matrix.results): a fine-tuned pair's from the test evaluations of its final
runs (one per protocol; the figure is the mean over finetune.final_seeds, each seed's kept), a released
checkpoint's from its baselines (a row of its own, "as released"); the headline figure is the one at
`evaluation.headline_protocol`, the others are kept beside it. A ReaL-style top-1 (real.py) is a result of
its own ("<dataset label> ReaL"), and so is each named average of `averages` per checkpoint. Every figure
carries a 95% interval (workflow_scripts.stats). Each reference figure is compared with the result made its
way (workflow_scripts.matching), with a verdict on that pair only. Two tables explain a gap: the protocol
variants (each against the paper-protocol result of its pair) and the selection bias (every LR of the
sweep on test); their numbers feed nothing else.
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

from workflow_scripts import eta
from workflow_scripts.common import PipelineError, atomic_path, json_arg, read_json, run_cli, write_json
from workflow_scripts.eta import planned_jobs
from workflow_scripts.matching import build_comparison, verdict_counts
from workflow_scripts.matrix import (
    baseline_runs,
    evaluations,
    final_seeds,
    finetune_gpus,
    finetune_runs,
    lr_str,
    npz_source,
    pair_runs,
    pairs,
    real_results,
    released,
    results,
    sweep_evaluations,
    used_checkpoints,
    used_datasets,
    variant_pairs,
)
from workflow_scripts.select_lr import choose_lr
from workflow_scripts.stats import Interval, average_interval, difference_interval, top1_interval
from workflow_scripts.tables import (
    PARTIAL,
    comparison_latex,
    comparison_markdown,
    eval_protocol_records,
    real_label,
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
    variant_evaluations: Sequence[str | os.PathLike]
    sweep_evaluations: Sequence[str | os.PathLike]
    baselines: Sequence[str | os.PathLike]
    parity: Sequence[str | os.PathLike]
    downloads: Sequence[str | os.PathLike]
    datasets: Sequence[str | os.PathLike]
    reals: Sequence[str | os.PathLike]
    model_stats: Sequence[str | os.PathLike]
    # Snakemake benchmark TSVs of the finetune jobs; empty = none (stages run by hand): cost left unknown.
    finetune_benchmarks: Sequence[str | os.PathLike] = ()
    # Snakemake benchmark TSVs of every job the ETA prices, and the preflight's summary.json with its estimate;
    # empty / None = the estimate is not checked (stages run by hand).
    job_benchmarks: Sequence[str | os.PathLike] = ()
    preflight_summary: str | os.PathLike | None = None


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
    "evaluations": (evaluations, "test evaluations (checkpoint, dataset, protocol)"),
    "variant_evaluations": (variant_pairs, "protocol variant evaluations (variant, checkpoint, dataset)"),
    "sweep_evaluations": (sweep_evaluations, "sweep runs on test (checkpoint, dataset, protocol)"),
    "baselines": (baseline_runs, "baseline evaluations (checkpoint, dataset, protocol)"),
    "parity": (used_checkpoints, "used checkpoints (parity record)"),
    "downloads": (used_checkpoints, "used checkpoints (download record)"),
    "datasets": (used_datasets, "used datasets (dataset.json)"),
    "reals": (real_results, "results with ReaL labels (ReaL top-1), per protocol"),
    "model_stats": (used_checkpoints, "used checkpoints (parameters and throughput)"),
    "job_benchmarks": (planned_jobs, "jobs of the ETA (Snakemake benchmark .tsv)"),
}
# Lists that may be left out (stages run by hand): their entries are then None.
OPTIONAL_LISTS = {"finetune_benchmarks", "job_benchmarks"}
# comparison.csv's columns (workflow_scripts.matching.comparison_row), in order.
COMPARISON_COLUMNS = ["source", "citation", "source_protocol", "source_protocol_note", "model", "pretraining",
                      "image_size", "column", "kind", "metric", "reference_value", "is_primary", "matched_result",
                      "matched_protocol", "matched_runs", "checkpoint", "per_seed", "ours", "ours_std", "ci_low",
                      "ci_high", "ci_method", "diff", "verdict"]
# The Table 3 caption: "standard deviations are smaller than 0.15" (shown beside ours).
PAPER_SD_BOUND = 0.15
# What the final models of the pairs were trained on (config finetune.retrain_on_full_train; runs[].trained_on).
TRAINED_ON = {True: "full", False: "train"}


# ---------------------------------------------------------------------------------------------
# Pairing the input lists with the matrix
def pair_with_matrix(config: dict, files: ResultFiles) -> dict[str, list[tuple]]:
    """{list name: [(matrix entry, path)]}; refuses a list whose length differs from its matrix."""
    paired = {}
    for name, (entries_of, what) in INPUT_LISTS.items():
        entries, given = entries_of(config), [Path(p) for p in getattr(files, name)]
        if name in OPTIONAL_LISTS and not given:
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
        raise PipelineError(f"{path}: benchmark file not found (Snakemake writes it when its job ends); "
                            "rerun that job, or aggregate without the benchmark files") from None
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
                        "steps": config["datasets"][ds]["steps"]}
    return datasets


def read_evaluation(path: Path, flag: str, checkpoint: str, dataset: str, protocol: str) -> dict:
    """An evaluation file (evaluate.seed_summary) that records the checkpoint, dataset and protocol of its place."""
    record = read_json(path)
    check_matches(path, flag, {"checkpoint": record.get("checkpoint"), "dataset": record.get("dataset"),
                               "protocol": (record.get("protocol") or {}).get("name")},
                  {"checkpoint": checkpoint, "dataset": dataset, "protocol": protocol})
    return record


def check_final_models(config: dict, path: Path, record: dict, selection: dict) -> None:
    """The evaluated models are the pair's final models: trained at the selected LR, on what
    finetune.retrain_on_full_train says (a file left from a run with the other setting is refused)."""
    expected = TRAINED_ON[bool(config["finetune"]["retrain_on_full_train"])]
    trained_on = sorted({run.get("trained_on", "train") for run in record["runs"]})
    if trained_on != [expected]:
        raise PipelineError(
            f"{path}: its models were trained on {' and '.join(trained_on)}, but config key "
            f"'finetune.retrain_on_full_train' is {config['finetune']['retrain_on_full_train']} (final models trained "
            f"on {expected}); rerun the evaluations with the config as it is (snakemake --forceall aggregate)")
    lrs = sorted({float(run["lr"]) for run in record["runs"]})
    if lrs != [float(selection["selected_lr"])]:
        raise PipelineError(f"{path}: its models were trained at LR {lrs}, but the LR selection chose "
                            f"{selection['selected_lr']}; rerun the evaluations (snakemake --forceall aggregate)")


def read_pair_results(config: dict, paired: dict) -> dict[str, dict]:
    """{"selections": {(ckpt, dataset): record}, "evaluations": {(ckpt, dataset): {protocol: record}},
    "evaluation_files": {(ckpt, dataset, protocol): path}}."""
    results = {"selections": {}, "evaluations": {}, "evaluation_files": {}}
    for (ck, ds), path in paired["selections"]:
        record = read_json(path)
        check_matches(path, "--selections", {"checkpoint": record.get("checkpoint"), "dataset": record.get("dataset")},
                      {"checkpoint": ck, "dataset": ds})
        results["selections"][ck, ds] = record
    for (ck, ds, protocol), path in paired["evaluations"]:
        record = read_evaluation(path, "--evaluations", ck, ds, protocol)
        check_final_models(config, path, record, results["selections"][ck, ds])
        results["evaluations"].setdefault((ck, ds), {})[protocol] = record
        results["evaluation_files"][ck, ds, protocol] = path
    return results


# ---------------------------------------------------------------------------------------------
# Fine-tuning runs
def run_row(config: dict, run: tuple, summary: dict, test: dict | None, selected: bool, bench: dict | None,
            run_dir: str) -> dict:
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
        "selected": selected, "train_seconds": summary["train_seconds"],
        "wall_seconds": wall, "gpus": gpus,
        "gpu_hours": wall * gpus / 3600 if wall is not None else None,
        "max_rss_mib": _float_or_none(bench.get("max_rss")) if bench else None,
        "device": summary["device"], "device_names": "; ".join(summary.get("device_names") or []),
        "precision": summary["precision"], "inception_crop": summary["inception_crop"],
        "img_s": summary["img_s"], "started_utc": summary["started_utc"],
        "finished_utc": summary["finished_utc"], "run_dir": run_dir,
    }


def selected_test_result(config: dict, run: tuple, pair_results: dict) -> dict | None:
    """The headline test evaluation of a sweep run: only a run of the selected LR when the final models are
    the sweep's runs (no retrain); None otherwise (the test split is evaluated once, on the final models)."""
    ck, ds, lr, seed = run
    if config["finetune"]["retrain_on_full_train"] or not is_selected(run, pair_results):
        return None
    protocol = config["evaluation"]["headline_protocol"]
    test = next((r for r in pair_results["evaluations"][ck, ds][protocol]["runs"] if int(r["seed"]) == seed), None)
    if test is None:
        raise PipelineError(f"{pair_results['evaluation_files'][ck, ds, protocol]} has no result for seed {seed} of "
                            f"the selected LR {lr}; rerun: snakemake -R evaluate")
    return test


def is_selected(run: tuple, pair_results: dict) -> bool:
    ck, ds, lr, _ = run
    return lr_str(float(pair_results["selections"][ck, ds]["selected_lr"])) == lr


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
        rows.append(run_row(config, run, summary, selected_test_result(config, run, pair_results),
                            is_selected(run, pair_results), bench, run_dir))
    return rows, curves


def pair_records(config: dict, pair_results: dict) -> list[dict]:
    """Per (checkpoint, dataset): the LR selection and the test result at the headline protocol, with its
    interval, and every protocol's figure (`protocols`)."""
    records, headline = [], config["evaluation"]["headline_protocol"]
    for ck, ds in pairs(config):
        sel, evs = pair_results["selections"][ck, ds], pair_results["evaluations"][ck, ds]
        ev, protocols = evs[headline], {p: figure(evaluation_interval(evs[p])) for p in evs}
        records.append({"checkpoint": ck, "dataset": ds, "label": config["checkpoints"][ck]["label"],
                        "dataset_label": config["datasets"][ds]["label"],
                        "selected_lr": sel["selected_lr"], "criterion": sel["criterion"],
                        "candidates": sel["candidates"], **protocols[headline],
                        "top1_std": ev["top1_std"], "top5_mean": ev["top5_mean"], "top5_std": ev["top5_std"],
                        "num_seeds": ev["num_seeds"], "num_images": ev["num_images"], "protocol": ev["protocol"],
                        "trained_on": ev["runs"][0].get("trained_on", "train"), "protocols": protocols})
    return records


def eta_check(files: ResultFiles, paired: dict) -> dict:
    """The preflight's estimate beside each job's benchmark time (workflow_scripts.eta.check)."""
    preflight = read_json(Path(files.preflight_summary)) if files.preflight_summary else None
    seconds = {job: float(read_benchmark(path)["s"]) if path else None for job, path in paired["job_benchmarks"]}
    return eta.check(preflight, seconds)


def cost_of(runs: list[dict]) -> dict:
    wall = [r["wall_seconds"] for r in runs if r["wall_seconds"] is not None]
    gpu_hours = [r["gpu_hours"] for r in runs if r["gpu_hours"] is not None]
    return {"wall_seconds": sum(wall) if wall else None, "gpu_hours": sum(gpu_hours) if gpu_hours else None,
            "runs_with_benchmark": len(wall), "runs": len(runs)}


# ---------------------------------------------------------------------------------------------
# Figures with their 95% intervals (workflow_scripts.stats), as summary.json stores them
def figure(interval: Interval | None) -> dict:
    """{"top1_mean", "ci_low", "ci_high", "ci_method"} of an interval (all None without one)."""
    if interval is None:
        return {"top1_mean": None, "ci_low": None, "ci_high": None, "ci_method": None}
    return {"top1_mean": interval.value, "ci_low": interval.low, "ci_high": interval.high, "ci_method": interval.method}


def interval_of(record: dict) -> Interval | None:
    """The interval of a record holding figure()'s fields (None when it has no number)."""
    if record["top1_mean"] is None:
        return None
    return Interval(record["top1_mean"], record["ci_low"], record["ci_high"], record["ci_method"])


def interval_bounds(interval: Interval) -> dict:
    return {"ci_low": interval.low, "ci_high": interval.high}


def evaluation_interval(record: dict) -> Interval:
    """The test top-1 of an evaluation file over its seeds: Wilson over its test images, t over the seeds."""
    return top1_interval([run["top1"] for run in record["runs"]], record["num_images"])


# ---------------------------------------------------------------------------------------------
# This run's results: datasets, ReaL and named averages
def row_keys(config: dict) -> dict[str, tuple[str, str, int]]:
    """(model label, pre-training, image size) per used checkpoint: its row of Table 3, one per checkpoint."""
    keys: dict[str, tuple[str, str, int]] = {}
    for ck in used_checkpoints(config):
        c = config["checkpoints"][ck]
        key = (c["label"], c["pretraining"], c["architecture"]["image_size"])
        same = [other for other, k in keys.items() if k == key]
        if same:
            raise PipelineError(f"config keys 'checkpoints.{same[0]}' and 'checkpoints.{ck}' have the same label, "
                                f"pretraining and image size {key}: their results would share one row of the report; "
                                "give each checkpoint its own label or pretraining")
        keys[ck] = key
    return keys


def protocol_figure(per_seed: list[float], top5_per_seed: list[float] | None, n_images: int) -> dict:
    """A result at one protocol: figure() of its interval, each seed's top-1, their sd and the top-5."""
    fig = figure(top1_interval(per_seed, n_images))
    top5 = [x for x in (top5_per_seed or []) if x is not None]
    return {**fig, "per_seed": list(per_seed), "top1_std": statistics.stdev(per_seed) if len(per_seed) > 1 else None,
            "top5_mean": statistics.fmean(top5) if top5 else None, "top5_per_seed": top5}


def evaluation_figure(record: dict) -> dict:
    """protocol_figure() of an evaluation file, its runs in seed order."""
    runs = sorted(record["runs"], key=lambda run: int(run["seed"]))
    return protocol_figure([r["top1"] for r in runs], [r.get("top5") for r in runs], record["num_images"])


def finetune_record(config: dict, evs: dict) -> dict:
    """The fields of a fine-tuned pair's result from its evaluation files ({protocol: record})."""
    ev = evs[config["evaluation"]["headline_protocol"]]
    runs = sorted(ev["runs"], key=lambda run: int(run["seed"]))
    return {"protocols": {p: evaluation_figure(evs[p]) for p in evs}, "seeds": [int(r["seed"]) for r in runs],
            "num_seeds": ev["num_seeds"], "selected_lr": ev["selected_lr"], "num_images": ev["num_images"],
            "trained_on": runs[0].get("trained_on", "train"), "models": [run.get("model") for run in runs]}


def released_record(config: dict, ck: str, ds: str, at_protocol: dict) -> dict:
    """The fields of a released checkpoint's result from its baselines (one per protocol that applies)."""
    found = {p: b for (c, d, p), b in at_protocol.items() if (c, d) == (ck, ds)}
    headline = found[config["evaluation"]["headline_protocol"]]
    return {"protocols": {p: protocol_figure([b["top1"]], [b["top5"]], b["num_images"]) for p, b in found.items()},
            "seeds": [], "num_seeds": None, "selected_lr": None, "num_images": headline["num_images"],
            "trained_on": None, "models": [headline["model"]]}


def dataset_results(config: dict, pair_results: dict, baselines: list[dict], datasets: dict) -> dict[tuple, dict]:
    """Per (checkpoint, dataset, result_from) of matrix.results: its test result, the headline protocol's figure
    at the top level and every protocol's in `protocols` (protocol_figure())."""
    headline = config["evaluation"]["headline_protocol"]
    at_protocol = {(b["checkpoint"], b["dataset"], b["protocol"]): b for b in baselines}
    found = {}
    for ck, ds, source in results(config):
        if source == "finetune":
            fields = finetune_record(config, pair_results["evaluations"][ck, ds])
        else:
            fields = released_record(config, ck, ds, at_protocol)
        top = fields["protocols"][headline]
        found[ck, ds, source] = {"checkpoint": ck, "dataset_name": ds, "kind": "dataset", "status": "run",
                                 "result_from": source, "eval_protocol": headline, "coverage": None,
                                 "subset": datasets[ds]["subset"], **fields, **top}
    return found


def read_reals(config: dict, paired: dict, found: dict[tuple, dict]) -> dict[tuple, dict]:
    """Per (checkpoint, dataset, result_from) with ReaL labels: its ReaL result (real.py), a result of its own,
    at the headline protocol and at each other protocol a reference needs (matrix.real_results).

    A ReaL file records its dataset and the models whose predictions it scored: they must be those of the
    result its place in the list names."""
    reals, headline = {}, config["evaluation"]["headline_protocol"]
    for (ck, ds, source, protocol), path in paired["reals"]:
        real, result = read_json(path), found[ck, ds, source]
        check_matches(path, "--reals", {"dataset": real.get("dataset"), "protocol": real.get("protocol"),
                                        "models": sorted(str(run.get("model")) for run in real.get("runs") or [])},
                      {"dataset": ds, "protocol": protocol, "models": sorted(map(str, result["models"]))})
        # Wilson over the images scored with ReaL labels (those with an empty list are left out).
        by_model = {str(run.get("model")): run["real_top1"] for run in real["runs"]}
        real_figure = protocol_figure([by_model[str(m)] for m in result["models"]], None, real["num_images"])
        record = reals.setdefault((ck, ds, source), {**result, "kind": "real", "protocols": {}})
        record["protocols"][protocol] = real_figure
        if protocol == headline:
            record.update(**real_figure, original_top1=result["top1_mean"], num_images=real["num_images"],
                          num_excluded_empty=real["num_excluded_empty"],
                          num_validation_images=real["num_validation_images"], definition=real["definition"],
                          path=str(path))
    return reals


def average_figure(members: list[dict], protocol: str) -> dict:
    """A named average at one protocol: stats.average_interval of the members', and per seed the members' mean
    (so its sd is the seed-to-seed spread of the average) where every member has the same seeds."""
    figs = [m["protocols"][protocol] for m in members]
    fig = figure(average_interval([interval_of(f) for f in figs]))
    same_seeds = len({tuple(m["seeds"]) for m in members}) == 1 and members[0]["seeds"]
    per_seed = [statistics.fmean(vals) for vals in zip(*(f["per_seed"] for f in figs))] if same_seeds else []
    return {**fig, "per_seed": per_seed, "top1_std": statistics.stdev(per_seed) if len(per_seed) > 1 else None,
            "top5_mean": None, "top5_per_seed": []}


def average_results(config: dict, found: dict[tuple, dict]) -> dict[tuple, dict]:
    """Per used checkpoint and named average (config `averages`): the mean test top-1 of its fine-tuned
    members, per protocol, only when every member has a result; otherwise no number, status PARTIAL and the
    coverage "k of N"."""
    averages, headline = {}, config["evaluation"]["headline_protocol"]
    for ck in used_checkpoints(config):
        for name, members in config["averages"].items():
            have = [found[ck, ds, "finetune"] for ds in members if (ck, ds, "finetune") in found]
            complete = len(have) == len(members)
            protocols = {p: average_figure(have, p) for p in have[0]["protocols"]} if complete else {}
            averages[ck, name] = {
                "checkpoint": ck, "dataset_name": name, "kind": "average", "status": "run" if complete else PARTIAL,
                "result_from": "finetune", "trained_on": have[0]["trained_on"] if complete else None,
                "eval_protocol": headline if complete else None, "coverage": f"{len(have)} of {len(members)}",
                "members": list(members), "subset": any(r["subset"] for r in have),
                **protocols.get(headline, {**figure(None), "per_seed": [], "top1_std": None}),
                "protocols": protocols, "seeds": have[0]["seeds"] if complete else [], "num_seeds": None,
                "selected_lr": None, "models": []}
    return averages


def this_run(config: dict, paired: dict, pair_results: dict, baselines: list[dict], datasets: dict) -> dict:
    """{"results", "reals": {(checkpoint, dataset, result_from): record}, "averages": {(checkpoint, name): ...}}."""
    found = dataset_results(config, pair_results, baselines, datasets)
    return {"results": found, "reals": read_reals(config, paired, found), "averages": average_results(config, found)}


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
# This run's results as the report lists them, and their rows of Table 3
def result_rows(config: dict, ours: dict) -> list[dict]:
    """summary.json's `results`: every record of this_run with its row (label, pre-training, image size) and
    column; fine-tuned rows first, then the released ones, each in config order."""
    keys, rows = row_keys(config), []
    for source in ("finetune", "released"):
        for records in ours.values():
            for r in records.values():
                if r["result_from"] == source:
                    label, pretraining, image_size = keys[r["checkpoint"]]
                    rows.append({**{k: v for k, v in r.items() if k != "models"}, "label": label,
                                 "pretraining": pretraining, "image_size": image_size,
                                 "column": column_label(config, r)})
    return rows


def table3_rows(config: dict) -> list[dict]:
    """The rows of the report's Table 3: each used checkpoint fine-tuned, then each released one as it is."""
    keys = row_keys(config)
    rows = [dict(zip(("label", "pretraining", "image_size"), keys[ck]), result_from="finetune")
            for ck in used_checkpoints(config)]
    return rows + [dict(zip(("label", "pretraining", "image_size"), keys[ck]), result_from="released")
                   for ck, _ in released(config)]


def protocol_records(config: dict) -> list[dict]:
    """summary.json's `eval_protocols`: every protocol, the headline one marked, the others labelled."""
    return eval_protocol_records(config["evaluation"]["protocols"], config["evaluation"]["headline_protocol"])


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
# Explaining a gap: protocol variants and selection bias (their numbers feed nothing above)
def pair_labels(config: dict, ck: str, ds: str) -> dict:
    return {"checkpoint": ck, "dataset": ds, "label": config["checkpoints"][ck]["label"],
            "pretraining": config["checkpoints"][ck]["pretraining"], "dataset_label": config["datasets"][ds]["label"]}


def read_variants(config: dict, paired: dict, pair_results: dict, found: dict) -> list[dict]:
    """Per (variant, checkpoint, dataset): its test top-1 at the headline protocol with its interval, and the
    difference to the paper-protocol final result of the pair (stats.difference_interval)."""
    headline, rows = config["evaluation"]["headline_protocol"], []
    for (name, ck, ds), path in paired["variant_evaluations"]:
        record = read_evaluation(path, "--variant-evaluations", ck, ds, headline)
        check_final_models(config, path, record, pair_results["selections"][ck, ds])
        ours, paper = evaluation_interval(record), interval_of(found[ck, ds, "finetune"])
        difference = difference_interval(ours, paper)
        rows.append({"variant": name, "variant_label": config["variants"][name]["label"],
                     "overrides": config["variants"][name]["protocol"], **pair_labels(config, ck, ds),
                     **figure(ours), "num_seeds": record["num_seeds"], "selected_lr": record["selected_lr"],
                     "paper_protocol": figure(paper), "difference": difference.value,
                     "difference_low": difference.low, "difference_high": difference.high,
                     "difference_method": difference.method,
                     "differs": not difference.low <= 0.0 <= difference.high, "path": str(path)})
    return rows


def sweep_on_test(config: dict, path: Path, record: dict, ck: str, ds: str) -> dict[float, dict[int, float]]:
    """{lr: {seed: test top-1}} of a sweep-on-test file, which must hold exactly the pair's sweep runs."""
    table: dict[float, dict[int, float]] = {}
    for run in record["runs"]:
        if run.get("trained_on", "train") != "train":
            raise PipelineError(f"{path}: holds a model trained on {run['trained_on']}, not a run of the LR sweep; "
                                "rerun: snakemake -R evaluate_sweep")
        table.setdefault(float(run["lr"]), {})[int(run["seed"])] = run["top1"]
    found = sorted((lr_str(lr), seed) for lr, per_seed in table.items() for seed in per_seed)
    expected = sorted((lr, seed) for _, _, lr, seed in pair_runs(config, ck, ds))
    if found != expected:
        raise PipelineError(f"{path}: holds the runs (lr, seed) {found}, but the sweep of {ck} x {ds} is {expected}; "
                            "rerun: snakemake -R evaluate_sweep")
    return table


def read_sweeps(config: dict, paired: dict) -> dict[tuple, dict]:
    """{(checkpoint, dataset, protocol): evaluation record} of the sweep runs on test, each checked to hold
    exactly the pair's sweep runs (the `table` field: {lr: {seed: top-1}}) and its path."""
    sweeps = {}
    for (ck, ds, protocol), path in paired["sweep_evaluations"]:
        record = read_evaluation(path, "--sweep-evaluations", ck, ds, protocol)
        sweeps[ck, ds, protocol] = {**record, "table": sweep_on_test(config, path, record, ck, ds), "path": str(path)}
    return sweeps


def read_selection_bias(config: dict, sweeps: dict, pair_results: dict, found: dict) -> list[dict]:
    """Per pair of matrix.selection_bias_pairs: every LR's test top-1 (with its interval), the LR picking on test
    would choose (select_lr.choose_lr fed test figures), the honest headline and how much the former inflates it."""
    headline, rows = config["evaluation"]["headline_protocol"], []
    for (ck, ds, protocol), record in sweeps.items():
        if protocol != headline:
            continue
        table, path = record["table"], record["path"]
        best_lr, _ = choose_lr(table)
        selected_lr = float(pair_results["selections"][ck, ds]["selected_lr"])
        lrs = [{"lr": lr, **figure(top1_interval([table[lr][s] for s in sorted(table[lr])], record["num_images"])),
                "per_seed": [table[lr][s] for s in sorted(table[lr])], "selected": lr == selected_lr,
                "best_on_test": lr == best_lr} for lr in sorted(table)]
        best = next(c for c in lrs if c["best_on_test"])
        at_selected = next(c for c in lrs if c["selected"])
        honest = found[ck, ds, "finetune"]
        rows.append({**pair_labels(config, ck, ds), "lrs": lrs, "best_lr": best_lr, "best_top1": best["top1_mean"],
                     "selected_lr": selected_lr, "sweep_top1_at_selected_lr": at_selected["top1_mean"],
                     "headline": {k: honest[k] for k in figure(None)}, "trained_on": honest["trained_on"],
                     "inflation": best["top1_mean"] - honest["top1_mean"],
                     "inflation_by_selection": best["top1_mean"] - at_selected["top1_mean"], "path": path})
    return rows


# ---------------------------------------------------------------------------------------------
# Checkpoints and the evaluation baseline
def read_checkpoints(config: dict, paired: dict) -> dict:
    """Per used checkpoint: its conversion parity and download records."""
    checkpoints = {}
    for (ck, parity_path), (_, download_path) in zip(paired["parity"], paired["downloads"]):
        parity, download = read_json(parity_path), read_json(download_path)
        check_matches(parity_path, "--parity", {"checkpoint": parity.get("checkpoint")}, {"checkpoint": ck})
        check_matches(download_path, "--downloads", {"checkpoint": download.get("checkpoint")},
                      {"checkpoint": npz_source(config, ck)})
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
        published = [f for f in refs["figures"] if (f["label"], f["pretraining"], f["image_size"], f["dataset"])
                     == (ck_cfg["label"], ck_cfg["pretraining"], ck_cfg["architecture"]["image_size"], ds_label)]
        baselines.append({"checkpoint": ck, "label": ck_cfg["label"], "pretraining": ck_cfg["pretraining"],
                          "dataset": ds, "dataset_label": ds_label, "protocol": protocol,
                          "protocol_settings": config["evaluation"]["protocols"][protocol],
                          "top1": result["top1"], "top5": result["top5"], "top5_note": result.get("top5_note"),
                          **interval_bounds(top1_interval([result["top1"]], result["num_images"])),
                          "model": result.get("model"),
                          "num_images": result["num_images"], "images_per_s": result.get("images_per_s"),
                          "published": published, "path": str(path)})
    return baselines


def read_model_stats(config: dict, paired: dict) -> list[dict]:
    """Per used checkpoint: its parameters without the head (Table 1) and inference images/s (Table 3's
    throughput column) as measured here, the latter also as a ratio to the references' `throughput_baseline`
    model (the paper: Mixer-B/16 at 224), beside the published figures of the same model (references `models`)."""
    refs, keys, rows = config["references"], row_keys(config), []
    for ck, path in paired["model_stats"]:
        stats = read_json(path)
        check_matches(path, "--model-stats", {"model": stats.get("model")}, {"model": ck})
        label, pretraining, image_size = keys[ck]
        published = {k: v for m in refs.get("models", []) if (m["label"], m["image_size"]) == (label, image_size)
                     for k, v in m.items() if k in ("img_s_per_core", "params_m")}
        rows.append({"checkpoint": ck, "label": label, "pretraining": pretraining, "image_size": image_size,
                     "params_excluding_head": stats["params_excluding_head"], "img_s": stats["img_s"],
                     "device_name": stats.get("device_name"), "precision": stats.get("precision"),
                     "batch_size": stats.get("batch_size"), "published": published, "path": str(path)})
    base = refs.get("throughput_baseline") or {}
    base_rows = [r for r in rows if (r["label"], r["image_size"]) == (base.get("label"), base.get("image_size"))]
    paper_base = next((m["img_s_per_core"] for m in refs.get("models", []) if "img_s_per_core" in m
                       and (m["label"], m["image_size"]) == (base.get("label"), base.get("image_size"))), None)
    for r in rows:
        r["img_s_ratio"] = r["img_s"] / base_rows[0]["img_s"] if base_rows else None
        paper = r["published"].get("img_s_per_core")
        r["paper_img_s_ratio"] = paper / paper_base if paper and paper_base else None
    return rows


# ---------------------------------------------------------------------------------------------
# Provenance
def git_state(repo: Path) -> dict:
    """The checkout's commit and whether it is dirty. A checkout owned by another user (a bind-mounted
    workspace, root running the pipeline) makes git refuse ("dubious ownership"); it is read anyway, with
    safe.directory for this path only and the repository's fsmonitor hook off (reading runs nothing of it)."""
    def git(*args, trust=()):
        return subprocess.run(["git", *trust, "-C", str(repo), *args], capture_output=True, text=True, timeout=30,
                              check=False)

    try:
        head, trust = git("rev-parse", "HEAD"), ()
    except FileNotFoundError:
        return {"commit": None, "dirty": None, "note": "git is not installed"}
    note = None
    if head.returncode != 0 and "dubious ownership" in head.stderr:
        trust = ("-c", f"safe.directory={Path(repo).resolve()}", "-c", "core.fsmonitor=false")
        head = git("rev-parse", "HEAD", trust=trust)
        note = f"{repo} is owned by another user (uid {Path(repo).stat().st_uid}); read with git's safe.directory"
    if head.returncode != 0:
        return {"commit": None, "dirty": None, "note": f"{repo} is not a git checkout"}
    status = git("status", "--porcelain", trust=trust)
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()),
            "dirty_files": status.stdout.splitlines()[:50], "note": note}


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
    pair_results = read_pair_results(config, paired)
    runs, curves = collect_runs(config, paired, pair_results)
    baselines = read_baselines(config, paired)
    ours = this_run(config, paired, pair_results, baselines, datasets)
    sweeps = read_sweeps(config, paired)
    columns = table3_columns(config_columns(config), [f["dataset"] for f in refs["figures"]])
    comparison = build_comparison(config, ours, sweeps)
    summary = {
        "title": config["report"]["title"],
        "aggregated_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "results_root": config["output_root"],
        "runs": runs,
        "curves": curves,
        "pairs": pair_records(config, pair_results),
        "results": result_rows(config, ours),
        "comparison": comparison,
        "verdicts": verdict_counts(comparison),
        "table3_rows": table3_rows(config),
        "table3_columns": columns,
        "final_seeds": final_seeds(config),
        "paper_sd_bound": PAPER_SD_BOUND,
        **published_summary(config, ours),
        "references": refs,
        "datasets": datasets,
        "subset_datasets": [d for d in datasets.values() if d["subset"]],
        "checkpoints": read_checkpoints(config, paired),
        "baselines": baselines,
        "protocol": config["protocol"],
        "eval_protocols": protocol_records(config),
        "headline_protocol": config["evaluation"]["headline_protocol"],
        "final_models_trained_on": TRAINED_ON[bool(config["finetune"]["retrain_on_full_train"])],
        "model_stats": read_model_stats(config, paired),
        "variants": read_variants(config, paired, pair_results, ours["results"]),
        "selection_bias": read_selection_bias(config, sweeps, pair_results, ours["results"]),
        "cost": cost_of(runs),
        "eta_check": eta_check(files, paired),
        "provenance": provenance(runs),
        "inputs": [str(path) for entries in paired.values() for _, path in entries if path is not None],
    }
    write_outputs(config, summary, outputs)
    return summary


def write_outputs(config: dict, summary: dict, outputs: AggregateOutputs) -> None:
    comparison = summary["comparison"]
    write_csv(outputs.runs_csv, summary["runs"], RUN_COLUMNS)
    write_csv(outputs.comparison_csv, [{**row, "per_seed": ";".join(f"{x:.4f}" for x in row["per_seed"]),
                                        "source_protocol": json.dumps(row["source_protocol"], sort_keys=True)}
                                       for row in comparison], COMPARISON_COLUMNS)
    with atomic_path(outputs.comparison_md) as tmp:
        tmp.write_text(comparison_markdown(summary))
    with atomic_path(outputs.comparison_tex) as tmp:
        tmp.write_text(comparison_latex(summary))
    write_json(outputs.config_json_out, config)
    write_json(outputs.summary_json, summary)  # last: the report rule's input


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.aggregate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-json", required=True, help="the workflow config as JSON (references loaded)")
    inputs = ap.add_argument_group("inputs (each list in the order of its workflow_scripts.matrix function)")
    for name, (entries_of, what) in INPUT_LISTS.items():
        inputs.add_argument("--" + name.replace("_", "-"), nargs="*", type=Path, metavar="FILE",
                            required=name not in OPTIONAL_LISTS,
                            default=[], help=f"one per {what}, in matrix.{entries_of.__name__} order")
    inputs.add_argument("--preflight-summary", type=Path, metavar="FILE",
                        help="the preflight's summary.json: its ETA is put beside what each job took")
    outputs = ap.add_argument_group("outputs")
    for field in dataclasses.fields(AggregateOutputs):
        outputs.add_argument("--" + field.name.replace("_", "-"), required=True, type=Path, metavar="FILE")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files = ResultFiles(**{name: getattr(args, name) for name in INPUT_LISTS},
                        preflight_summary=args.preflight_summary)
    outputs = AggregateOutputs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(AggregateOutputs)})
    summary = aggregate(json_arg(args.config_json, "--config-json"), files, outputs)
    print(f"aggregated {len(summary['runs'])} runs, {len(summary['comparison'])} comparison rows "
          f"-> {outputs.summary_json}")
    return 0


if __name__ == "__main__":
    run_cli(main)
