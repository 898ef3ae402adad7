"""Live status of a study, at any moment of a running or stopped one: Table 3's grid of cells with each
cell's state and figure, jobs done/total, device-hours spent and left, and the ETA.

  python -m workflow_scripts.status --config demo/config.yaml [--directory DIR] [--gpus N]

It prints the status and writes <output_root>/status.html (self-contained, the report's style). It never
guesses: the jobs are Snakemake's own DAG for the default target (built read-only, as `snakemake --summary
--nolock` builds it: every job's rule, wildcards, outputs, log and benchmark come from the rules), and each
job's state comes from files:
- done: every output exists and none carries Snakemake's incomplete marker (.snakemake/incomplete);
- running: an output carries the incomplete marker while a Snakemake process holds the working directory's
  lock (a lock left by a killed Snakemake reads as running until `snakemake --unlock`);
- failed: the job left a log but not its outputs and is not running (Snakemake removes the outputs of a failed
  job; a Snakemake stopped while the job ran leaves its marker): the log's last error line says why;
- waiting: none of these (not started yet).
A cell of the grid (a checkpoint's result on a dataset, its ReaL-style top-1, a named average) is done when
all its jobs are, else failed if one of them failed, else running if one runs, else waiting; done cells show
their figure at the headline evaluation protocol. Spent device-hours: the benchmark files of the GPU jobs
(wall seconds times the job's devices); left and the ETA: workflow_scripts.eta on the jobs not done, from the
rates the preflight measured (<output_root>/preflight/summary.json), or "unknown" without a preflight.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
from datetime import UTC, datetime
from pathlib import Path

from workflow_scripts import eta, matrix
from workflow_scripts.aggregate import config_columns, read_benchmark
from workflow_scripts.common import PipelineError, atomic_path, read_json, run_cli
from workflow_scripts.tables import table3_columns

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "report" / "templates"
CSS = REPO / "report" / "report.css"
STATES = ("done", "running", "failed", "waiting")
NOT_PLANNED = "not planned"
NO_RATES = "unknown: run make preflight"
# The rules whose jobs make a (checkpoint, dataset) result: a pair's sweep, selection, final runs and test
# evaluations (every protocol), or a released checkpoint's baselines.
RESULT_RULES = {"finetune": ("finetune", "select_lr", "final_finetune", "evaluate"), "released": ("baseline",)}


# ---------------------------------------------------------------------------------------------
# Snakemake's DAG and the state of each job
def dag_jobs(snakefile: Path, configfile: Path, workdir: Path) -> tuple[dict, list[dict], bool]:
    """(the config as the workflow validated it, every job of the default target's DAG, whether a Snakemake
    holds the lock), read-only. The one place that reaches into Snakemake: the calls `snakemake --summary
    --nolock` makes (Workflow._prepare_dag, _build_dag), pinned with snakemake in requirements.txt."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, Quietness, ResourceSettings

    output = OutputSettings(quiet={Quietness.ALL}, enable_file_logging=False)
    snakefile, configfile, workdir = snakefile.resolve(), configfile.resolve(), workdir.resolve()
    with contextlib.chdir(workdir), SnakemakeApi(output) as api:
        api_workflow = api.workflow(resource_settings=ResourceSettings(cores=1), snakefile=snakefile,
                                    config_settings=ConfigSettings(configfiles=[configfile]), workdir=workdir)
        api_workflow.dag(DAGSettings())
        workflow = api_workflow._workflow
        workflow._prepare_dag(forceall=False, ignore_incomplete=True, lock_warn_only=True, nolock=True)
        workflow._build_dag()
        persistence = workflow.persistence
        jobs = [{"rule": job.rule.name, "wildcards": dict(job.wildcards.items()),
                 "outputs": [str(f) for f in job.output], "named_outputs": dict(job.output.items()),
                 "log": [str(f) for f in job.log], "benchmark": str(job.benchmark) if job.benchmark else None,
                 "gpu": job.resources.get("gpu"),
                 "incomplete": bool(persistence._filter_incomplete_keys(str(f) for f in job.output))}
                for job in workflow.dag.jobs]
        return dict(workflow.config), jobs, persistence.locked


def job_id(config: dict, job: dict) -> str:
    """The job's id: its log's path below the logs folder without ".log" (eta.job_id's form)."""
    logs = Path(config["output_root"]) / "logs"
    for log in job["log"]:
        with contextlib.suppress(ValueError):
            return str(Path(log).relative_to(logs).with_suffix(""))
    return eta.job_id(job["rule"], "/".join(job["wildcards"].values()))


def last_error_line(log: Path) -> str:
    """The log's last line that names an error, else its last line (what a user reads first)."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "exception" in line.lower()]
    return (errors or lines or ["(empty log)"])[-1][:300]


def job_state(job: dict, workdir: Path, locked: bool) -> tuple[str, str | None]:
    """(state, why) of one job, from its files and Snakemake's markers (module docstring)."""
    if job["incomplete"]:
        if locked:
            return "running", None
        return "failed", "stopped while running (Snakemake's incomplete marker remains; a rerun restarts it)"
    if all((workdir / f).exists() for f in job["outputs"]):
        return "done", None
    logs = [workdir / log for log in job["log"] if (workdir / log).exists()]
    if logs:
        return "failed", f"{last_error_line(logs[0])} (log: {job['log'][0]})"
    return "waiting", None


def read_jobs(config: dict, jobs: list[dict], workdir: Path, locked: bool) -> list[dict]:
    """Every job with its id, state, why (failed jobs) and devices (GPU jobs: their GPUs, at least one); a target
    rule's job (`all`: no outputs, no work) is left out."""
    out = []
    for job in (j for j in jobs if j["outputs"]):
        state, why = job_state(job, workdir, locked)
        devices = max(1, job["gpu"]) if isinstance(job["gpu"], int) else 0
        out.append({**job, "id": job_id(config, job), "state": state, "why": why, "devices": devices})
    return out


# ---------------------------------------------------------------------------------------------
# The grid
def combined_state(states: list[str]) -> str:
    if states and all(s == "done" for s in states):
        return "done"
    for state in ("failed", "running"):
        if state in states:
            return state
    return "waiting"


def progress(jobs: list[dict]) -> list[int]:
    """[jobs done, jobs] of a cell."""
    return [sum(j["state"] == "done" for j in jobs), len(jobs)]


def result_cells(config: dict, jobs: list[dict], workdir: Path) -> dict[tuple[str, str, str], dict]:
    """{(checkpoint, dataset, kind "dataset" | "real"): {"state", "figure"}} of every planned Table 3 result: the
    fine-tuned models' at the headline protocol (a released model as it is is no Table 3 figure)."""
    headline = config["evaluation"]["headline_protocol"]
    cells = {}
    for ck, ds, source in matrix.results(config):
        if source != "finetune":
            continue
        mine = [j for j in jobs if j["rule"] in RESULT_RULES[source]
                and (j["wildcards"].get("ckpt"), j["wildcards"].get("dataset")) == (ck, ds)]
        state = combined_state([j["state"] for j in mine])
        result = next((j for j in mine if j["rule"] in ("evaluate", "baseline")
                       and j["wildcards"].get("protocol") == headline), None)
        figure = None
        if state == "done" and result is not None:
            record = read_json(workdir / result["named_outputs"]["result"])
            figure = record["top1_mean"] if "top1_mean" in record else record["top1"]
        cells[ck, ds, "dataset"] = {"state": state, "figure": figure, "jobs": mine, "progress": progress(mine)}
    for ck, ds, source, protocol in matrix.real_results(config):
        if (source, protocol) != ("finetune", headline):
            continue
        mine = cells[ck, ds, "dataset"]["jobs"] + [j for j in jobs if j["rule"] == "real" and (
            j["wildcards"]["ckpt"], j["wildcards"]["dataset"], j["wildcards"]["source"], j["wildcards"]["protocol"])
            == (ck, ds, source, protocol)]
        state = combined_state([j["state"] for j in mine])
        real = [j for j in mine if j["rule"] == "real"]
        figure = read_json(workdir / real[0]["outputs"][0])["real_top1"] if state == "done" and real else None
        cells[ck, ds, "real"] = {"state": state, "figure": figure, "jobs": mine, "progress": progress(mine)}
    return cells


def average_cell(config: dict, cells: dict, ckpt: str, members: list[str]) -> dict:
    """A named average: done when every member's result is (the aggregate averages only complete rows)."""
    parts = [cells.get((ckpt, ds, "dataset")) for ds in members]
    if any(p is None for p in parts):
        return {"state": NOT_PLANNED, "figure": None, "progress": None}
    state = combined_state([p["state"] for p in parts])
    return {"state": state, "figure": statistics.fmean(p["figure"] for p in parts) if state == "done" else None,
            "progress": [sum(p["progress"][i] for p in parts) for i in (0, 1)]}


def grid(config: dict, cells: dict) -> dict:
    """Table 3's grid: rows the checkpoints (pre-training, model, image size), columns as the report's."""
    columns = table3_columns(config_columns(config), [])
    by_label = {config["datasets"][ds]["label"]: ds for ds in matrix.used_datasets(config)}
    rows = []
    for ck in matrix.used_checkpoints(config):
        entry = config["checkpoints"][ck]
        row_cells = []
        for column in columns:
            label, kind = column["label"], column["kind"]
            if kind == "average":
                cell = average_cell(config, cells, ck, config["averages"][label])
            else:
                ds = by_label[label.removesuffix(" ReaL") if kind == "real" else label]
                cell = cells.get((ck, ds, kind), {"state": NOT_PLANNED, "figure": None, "progress": None})
            row_cells.append({"state": cell["state"], "figure": cell["figure"], "progress": cell["progress"]})
        rows.append({"checkpoint": ck, "pretraining": entry["pretraining"], "model": entry["label"],
                     "image_size": entry["architecture"]["image_size"], "cells": row_cells})
    return {"columns": [c["label"] for c in columns], "rows": rows}


# ---------------------------------------------------------------------------------------------
# Hours
def benchmark_seconds(path: Path) -> float | None:
    """Wall seconds of a finished job from its Snakemake benchmark file (column "s"), None if absent: a running
    job has none yet. A file that is not a benchmark is an error that names it (aggregate.read_benchmark)."""
    if not path.exists():
        return None
    return float(read_benchmark(path)["s"])


def hours(config: dict, jobs: list[dict], workdir: Path, gpus: int | None) -> dict:
    """Device-hours spent (benchmark files of the GPU jobs), and left and the ETA from the preflight's rates."""
    spent = 0.0
    for job in jobs:
        seconds = benchmark_seconds(workdir / job["benchmark"]) if job["devices"] and job["benchmark"] else None
        spent += (seconds or 0.0) * job["devices"] / 3600.0
    summary_path = workdir / config["output_root"] / "preflight" / "summary.json"
    if not summary_path.exists():
        return {"spent": spent, "left": None, "eta_hours": None, "gpus": gpus, "unknown": [NO_RATES]}
    rates, measured_gpus = read_rates(summary_path)
    gpus = measured_gpus if gpus is None else gpus
    try:
        with contextlib.chdir(workdir):  # the config's data_root is relative to the working directory
            estimate = eta.estimate(config, rates, gpus or 0,
                                    done=frozenset(j["id"] for j in jobs if j["state"] == "done"))
    except PipelineError as e:  # e.g. a 2-GPU job and --gpus 1: the status still shows, the ETA says why not
        return {"spent": spent, "left": None, "eta_hours": None, "gpus": gpus, "unknown": [str(e)]}
    return {"spent": spent, "left": estimate["device_hours"], "eta_hours": estimate["eta_hours"],
            "gpus": gpus, "unknown": estimate["unknown"]}


def read_rates(path: Path) -> tuple[dict, int | None]:
    """({shape: {"train_img_s", "eval_img_s"}}, the plan's GPU count) from the preflight's summary.json
    (workflow_scripts.preflight summarize: {"shapes": [{"shape", "train_img_s", "eval_img_s", ...}], "gpus", ...})."""
    summary = read_json(path)
    try:
        rates = {e["shape"]: {"train_img_s": float(e["train_img_s"]), "eval_img_s": float(e["eval_img_s"])}
                 for e in summary["shapes"]}
    except (KeyError, TypeError, ValueError) as e:
        raise PipelineError(f"{path}: a shape lacks its measured rates ({e}); run `make preflight` again") from None
    return rates, summary.get("gpus")


# ---------------------------------------------------------------------------------------------
# The status and its two views
def study_status(snakefile: Path, configfile: Path, workdir: Path, gpus: int | None = None) -> dict:
    """Everything the status shows (module docstring), read from the files under `workdir`."""
    config, dag, locked = dag_jobs(snakefile, configfile, workdir)
    jobs = read_jobs(config, dag, workdir, locked)
    cells = result_cells(config, jobs, workdir)
    counts = {state: sum(j["state"] == state for j in jobs) for state in STATES}
    return {"title": config["report"]["title"], "config": str(configfile), "workdir": str(workdir.resolve()),
            "output_root": config["output_root"], "checked_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "snakemake_running": locked, "grid": grid(config, cells), "jobs_total": len(jobs), "jobs": counts,
            "hours": hours(config, jobs, workdir, gpus),
            "job_states": {j["id"]: j["state"] for j in jobs},
            "failed": [{"id": j["id"], "why": j["why"]} for j in jobs if j["state"] == "failed"],
            "running": [j["id"] for j in jobs if j["state"] == "running"]}


def cell_text(cell: dict) -> str:
    """"done 93.89", or the state with the cell's jobs done: "running 3/6"."""
    if cell["figure"] is not None:
        return f"{cell['state']} {cell['figure']:.2f}"
    return f"{cell['state']} {cell['progress'][0]}/{cell['progress'][1]}" if cell["progress"] else cell["state"]


def format_hours(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.2f}"


def summary_lines(status: dict) -> list[str]:
    """The lines above the grid: where, whether Snakemake runs, jobs, hours and the ETA."""
    h, jobs = status["hours"], status["jobs"]
    eta_line = (f"ETA {h['eta_hours']:.2f} h on {max(1, h['gpus'] or 0)} device(s)" if h["eta_hours"] is not None
                else "ETA " + "; ".join(h["unknown"]))
    return [f"{status['title']}: status at {status['checked_utc']} (working directory {status['workdir']})",
            "Snakemake: " + ("running (it holds the working directory's lock)" if status["snakemake_running"]
                             else "not running"),
            f"Jobs: {jobs['done']} of {status['jobs_total']} done, {jobs['running']} running, "
            f"{jobs['failed']} failed, {jobs['waiting']} waiting",
            f"Device-hours: {h['spent']:.2f} spent, {format_hours(h['left'])} left; {eta_line}"]


def render_text(status: dict) -> str:
    g = status["grid"]
    table = [["Pre-training", "Model", "Image", *g["columns"]]]
    table += [[r["pretraining"], r["model"], f"{r['image_size']}px", *map(cell_text, r["cells"])] for r in g["rows"]]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = summary_lines(status) + [""] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                                            for row in table]
    lines += [f"failed: {f['id']}: {f['why']}" for f in status["failed"]]
    lines += [f"running: {job}" for job in status["running"]]
    return "\n".join(lines)


def write_html(status: dict, path: Path) -> None:
    import jinja2
    from markupsafe import Markup

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    html = env.get_template("status.html.j2").render(status=status, summary_lines=summary_lines(status),
                                                     css=Markup(CSS.read_text()), cell_text=cell_text)
    with atomic_path(path) as tmp:
        tmp.write_text(html)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.status", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, type=Path, help="the study's config file (config.yaml, demo/...)")
    ap.add_argument("--directory", type=Path, default=Path("."), help="Snakemake's working directory (default: .)")
    ap.add_argument("--snakefile", type=Path, default=REPO / "Snakefile")
    ap.add_argument("--gpus", type=int, help="devices the ETA schedules on (default: what the preflight used)")
    args = ap.parse_args(argv)
    if not args.config.exists():
        raise PipelineError(f"--config {args.config}: file not found; name the study's config file")
    status = study_status(args.snakefile, args.config, args.directory, args.gpus)
    out = args.directory / status["output_root"] / "status.html"
    write_html(status, out)
    print(render_text(status))
    print(f"\nWritten: {out}")


if __name__ == "__main__":
    run_cli(main)
