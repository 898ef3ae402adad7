"""Aggregate every result file into tidy tables and the summary the report renders.

Reads the files the other stages wrote (docs/design.md) for the matrix the config defines and writes
R/aggregate/{runs.csv, comparison.csv, comparison.md, comparison.tex, summary.json, config.json}.
Reference figures come from the config's `references` (report/references.yaml), each with its source.
"""
from __future__ import annotations

import argparse
import csv
import importlib.metadata
import io
import json
import math
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from workflow_scripts.matrix import (baseline_runs, finetune_gpus, finetune_runs, lr_str, pairs,
                                     used_checkpoints, used_datasets)
from workflow_scripts.common import PipelineError, json_arg, atomic_path, read_json, run_cli, write_json

REPO = Path(__file__).resolve().parents[1]
# Packages whose versions the provenance section lists.
PROVENANCE_PACKAGES = ("torch", "torchvision", "timm", "safetensors", "numpy", "snakemake", "pandas",
                       "matplotlib", "jinja2", "papermill", "nbconvert", "scikit-learn")
NOT_RUN = "not run"

RUN_COLUMNS = [
    "checkpoint", "label", "pretraining", "dataset", "dataset_label", "lr", "seed", "steps",
    "minival_top1", "minival_top5", "test_top1", "test_top5", "selected", "train_seconds",
    "wall_seconds", "gpus", "gpu_hours", "max_rss_mib", "device", "device_names", "precision",
    "inception_crop", "img_s", "started_utc", "finished_utc", "run_dir",
]


# ---------------------------------------------------------------------------------------------
# The matrix the config defines (the same one rules/common.smk builds its jobs from)
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


def read_benchmark(path: Path) -> dict | None:
    """The first row of a Snakemake benchmark TSV (columns s, h:m:s, max_rss, ...); None if absent.

    Benchmarks exist only for jobs Snakemake ran, so a stage run by hand has none.
    """
    if not path.exists():
        return None
    rows = list(csv.DictReader(io.StringIO(path.read_text()), delimiter="\t"))
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


# ---------------------------------------------------------------------------------------------
# Tables
def collect_runs(config: dict, root: Path, inputs: list[str]) -> tuple[list[dict], dict, dict, dict]:
    """One row per fine-tuning run, the curves per run dir, and the selection and evaluation per pair."""
    selections, evaluations = {}, {}
    for ck, ds in pairs(config):
        sel_path, ev_path = root / "selection" / ck / f"{ds}.json", root / "evaluate" / ck / f"{ds}.json"
        selections[ck, ds], evaluations[ck, ds] = read_json(sel_path), read_json(ev_path)
        inputs += [str(sel_path), str(ev_path)]

    rows, curves = [], {}
    for ck, ds, lr, seed in finetune_runs(config):
        rel = f"finetune/{ck}/{ds}/lr{lr}_s{seed}"
        summary_path, metrics_path = root / rel / "summary.json", root / rel / "metrics.jsonl"
        summary = read_json(summary_path)
        curves[rel] = split_curves(read_jsonl(metrics_path))
        bench_path = root / "benchmarks" / "finetune" / ck / ds / f"lr{lr}_s{seed}.tsv"
        bench = read_benchmark(bench_path)
        inputs += [str(summary_path), str(metrics_path)] + ([str(bench_path)] if bench else [])

        selected = lr_str(float(selections[ck, ds]["selected_lr"])) == lr
        test = next((r for r in evaluations[ck, ds]["runs"] if int(r["seed"]) == seed), None) if selected else None
        if selected and test is None:
            raise PipelineError(f"{root}/evaluate/{ck}/{ds}.json has no result for seed {seed} of the selected "
                                f"LR {lr}; rerun: snakemake -R evaluate")
        wall = _float_or_none(bench["s"]) if bench else None
        gpus = finetune_gpus(config, ck)
        ck_cfg, ds_cfg = config["checkpoints"][ck], config["datasets"][ds]
        rows.append({
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
            "finished_utc": summary["finished_utc"], "run_dir": rel,
        })
    return rows, curves, selections, evaluations


def reference_sources(refs: dict, metric: str) -> list[str]:
    """Sources (in references.yaml order) that publish at least one figure of this metric."""
    cited = {f["source"] for f in refs["figures"] if f["metric"] == metric}
    return [s for s in refs["sources"] if s in cited]


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


def fmt_reference(x) -> str:
    """A published figure as printed (two decimals, more where the source gives more: 76.616)."""
    if x is None:
        return ""
    text = f"{x:.2f}"
    return text if float(text) == x else repr(x)


def fmt_ours(row: dict) -> str:
    if row["status"] == NOT_RUN:
        return NOT_RUN
    spread = f" ± {row['top1_std']:.2f} (n={row['num_seeds']})" if row["num_seeds"] > 1 else " (1 seed)"
    subset = " (subset)" if row["subset"] else ""
    return f"{row['top1_mean']:.2f}{spread}{subset}"


def fmt_diff(row: dict) -> str:
    return "" if row["diff_to_primary"] is None else f"{row['diff_to_primary']:+.2f}"


def table_cells(rows: list[dict], refs: dict) -> tuple[list[str], list[list[str]]]:
    """Header and string cells of a top-1 comparison table (Markdown, LaTeX and the HTML page).

    Rows without any published figure get no reference columns (nothing to compare with).
    """
    sources = reference_sources(refs, "top1") if any(r["has_reference"] for r in rows) else []
    header = ["Model", "Pre-training", "Dataset", *sources, "This run (top-1, mean ± std)"]
    header += ["Δ vs primary"] if sources else ["Selected LR"]
    body = []
    for r in rows:
        cells = [r["model"], r["pretraining"], r["dataset"], *(fmt_reference(r[f"{s}_top1"]) for s in sources),
                 fmt_ours(r)]
        body.append(cells + [fmt_diff(r) if sources else f"{r['selected_lr']:g}"])
    return header, body


def comparison_markdown(rows: list[dict], refs: dict, title: str, subset_datasets: list[dict]) -> str:
    def table(subset_rows):
        header, body = table_cells(subset_rows, refs)
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |" for cells in body]
        return "\n".join(lines)

    with_refs = [r for r in rows if r["has_reference"]]
    without = [r for r in rows if not r["has_reference"]]
    parts = [f"# {title}", ""]
    parts += [f"**Subset:** {d['label']} was run on a subset of the dataset ({d['subset_note'] or 'see dataset.json'}); "
              "its figures are not comparable with the published ones.\n" for d in subset_datasets]
    parts += ["Top-1 accuracy (%) on the test split; references as published.", "", table(with_refs), ""]
    if without:
        parts += ["## Runs without a published reference", "", table(without), ""]
    parts += ["Sources:", ""] + [f"- `{k}`: {v}" for k, v in refs["sources"].items()]
    parts += ["", "Δ vs primary: this run minus the primary reference for the dataset ("
              + ", ".join(f"{d}: `{s}`" for d, s in refs["primary"].items()) + ")."]
    return "\n".join(parts) + "\n"


def latex_escape(text: str) -> str:
    repl = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
            "±": r"$\pm$", "Δ": r"$\Delta$"}
    return "".join(repl.get(c, c) for c in text)


def comparison_latex(rows: list[dict], refs: dict) -> str:
    def table(subset_rows, caption):
        header, body = table_cells(subset_rows, refs)
        lines = [r"\begin{table}[t]", r"\centering", r"\small",
                 r"\begin{tabular}{lll" + "r" * (len(header) - 3) + "}", r"\toprule",
                 " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
        lines += [" & ".join(latex_escape(c) for c in cells) + r" \\" for cells in body]
        lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{latex_escape(caption)}}}", r"\end{table}"]
        return "\n".join(lines)

    cites = "; ".join(f"{k}: {v}" for k, v in refs["sources"].items())
    parts = ["% Requires \\usepackage{booktabs}.",
             table([r for r in rows if r["has_reference"]], f"Top-1 accuracy (%). Sources: {cites}.")]
    without = [r for r in rows if not r["has_reference"]]
    if without:
        parts.append(table(without, "Top-1 accuracy (%) of runs without a published reference."))
    return "\n\n".join(parts) + "\n"


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with atomic_path(path) as tmp:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="raise")
            writer.writeheader()
            writer.writerows(rows)


# ---------------------------------------------------------------------------------------------
# Provenance
def git_state(repo: Path) -> dict:
    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)

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


# ---------------------------------------------------------------------------------------------
def aggregate(config: dict, results_root: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Write every aggregate file into out_dir and return the summary (also written as summary.json)."""
    root, out_dir = Path(results_root), Path(out_dir)
    refs = config["references"]
    if not isinstance(refs, dict):
        raise PipelineError("config key 'references' must be the loaded references (a mapping), as the "
                            "workflow passes it; got a path: run through snakemake")
    inputs: list[str] = []

    datasets = {}
    for ds in used_datasets(config):
        spec_path = Path(config["data_root"]) / ds / "dataset.json"
        spec = read_json(spec_path)
        inputs.append(str(spec_path))
        datasets[ds] = {"name": ds, "label": config["datasets"][ds]["label"], "subset": bool(spec.get("subset")),
                        "subset_note": spec.get("subset_note"), "splits": spec.get("splits"),
                        "num_classes": spec.get("num_classes"), "layout": spec.get("layout"),
                        "minival": spec.get("minival"), "test_split": spec.get("test_split"),
                        "eval_protocol": config["datasets"][ds]["eval_protocol"],
                        "steps": config["datasets"][ds]["steps"]}

    runs, curves, selections, evaluations = collect_runs(config, root, inputs)
    comparison = build_comparison(config, evaluations, datasets)

    checkpoints = {}
    for ck in used_checkpoints(config):
        parity_path = root / "converted" / f"{ck}.parity.json"
        download_path = Path(config["weights_dir"]) / f"{ck}.download.json"
        checkpoints[ck] = {"name": ck, "label": config["checkpoints"][ck]["label"],
                           "pretraining": config["checkpoints"][ck]["pretraining"],
                           "parity": read_json(parity_path), "download": read_json(download_path)}
        inputs += [str(parity_path), str(download_path)]

    baselines = []
    for ck, ds, protocol in baseline_runs(config):
        path = root / "baseline" / ck / ds / f"{protocol}.json"
        result = read_json(path)
        inputs.append(str(path))
        ck_cfg, ds_label = config["checkpoints"][ck], config["datasets"][ds]["label"]
        published = [f for f in refs["figures"] if (f["label"], f["pretraining"], f["dataset"])
                     == (ck_cfg["label"], ck_cfg["pretraining"], ds_label)]
        baselines.append({"checkpoint": ck, "label": ck_cfg["label"], "pretraining": ck_cfg["pretraining"],
                          "dataset": ds, "dataset_label": ds_label, "protocol": protocol,
                          "protocol_settings": config["evaluation"]["protocols"][protocol],
                          "top1": result["top1"], "top5": result["top5"], "top5_note": result.get("top5_note"),
                          "num_images": result["num_images"], "images_per_s": result.get("images_per_s"),
                          "published": published, "path": str(path)})

    pair_records = []
    for ck, ds in pairs(config):
        sel, ev = selections[ck, ds], evaluations[ck, ds]
        pair_records.append({"checkpoint": ck, "dataset": ds, "label": config["checkpoints"][ck]["label"],
                             "dataset_label": config["datasets"][ds]["label"],
                             "selected_lr": sel["selected_lr"], "criterion": sel["criterion"],
                             "candidates": sel["candidates"], "top1_mean": ev["top1_mean"],
                             "top1_std": ev["top1_std"], "top5_mean": ev["top5_mean"], "top5_std": ev["top5_std"],
                             "num_seeds": ev["num_seeds"], "protocol": ev["protocol"]})

    wall = [r["wall_seconds"] for r in runs if r["wall_seconds"] is not None]
    gpu_hours = [r["gpu_hours"] for r in runs if r["gpu_hours"] is not None]
    summary = {
        "title": config["report"]["title"],
        "aggregated_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "results_root": str(root),
        "runs": runs,
        "curves": curves,
        "pairs": pair_records,
        "comparison": comparison,
        "references": refs,
        "datasets": datasets,
        "subset_datasets": [d for d in datasets.values() if d["subset"]],
        "checkpoints": checkpoints,
        "baselines": baselines,
        "protocol": config["protocol"],
        "eval_protocols": config["evaluation"]["protocols"],
        "cost": {"wall_seconds": sum(wall) if wall else None, "gpu_hours": sum(gpu_hours) if gpu_hours else None,
                 "runs_with_benchmark": len(wall), "runs": len(runs)},
        "provenance": {
            "git": git_state(REPO), "packages": package_versions(),
            "aggregate_host": {"hostname": platform.node(), "platform": platform.platform(),
                               "cpu": cpu_name(), "cpu_count": os.cpu_count()},
            "training_devices": sorted({n for r in runs for n in r["device_names"].split("; ") if n}),
            "started_utc": min((r["started_utc"] for r in runs), default=None),
            "finished_utc": max((r["finished_utc"] for r in runs), default=None),
        },
        "inputs": inputs,
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "runs.csv", runs, RUN_COLUMNS)
    comparison_columns = list(comparison[0]) if comparison else ["model", "pretraining", "dataset"]
    write_csv(out_dir / "comparison.csv", comparison, comparison_columns)
    with atomic_path(out_dir / "comparison.md") as tmp:
        tmp.write_text(comparison_markdown(comparison, refs, config["report"]["title"],
                                           [d for d in datasets.values() if d["subset"]]))
    with atomic_path(out_dir / "comparison.tex") as tmp:
        tmp.write_text(comparison_latex(comparison, refs))
    write_json(out_dir / "config.json", config)
    write_json(out_dir / "summary.json", summary)  # last: the report rule's input
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-json", required=True, help="the workflow config as JSON (references loaded)")
    ap.add_argument("--results-root", required=True, help="output_root of the run (R)")
    ap.add_argument("--out-dir", required=True, help="where to write the aggregate files (R/aggregate)")
    args = ap.parse_args(argv)
    summary = aggregate(json_arg(args.config_json, "--config-json"), args.results_root, args.out_dir)
    print(f"aggregated {len(summary['runs'])} runs, {len(summary['comparison'])} comparison rows -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
