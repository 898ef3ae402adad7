"""How long the study takes: device-hours of every planned GPU job and the wall clock on N devices.

`estimate(config, rates, gpus)` plans the study's jobs from workflow_scripts.matrix (never re-deriving the
matrix), prices each from measured rates (the preflight's images per second per job shape,
`matrix.job_shape`), and schedules them in dependency order on `gpus` devices (`schedule`, a plain list
scheduler over a DAG). On CPU (a job with `gpu: 0`, the demo) a job takes one device, the CPU.

A job's price, in hours on its devices:
- fine-tuning (finetune, final_finetune, variant_finetune): steps x batch size / train_img_s, plus its
  minival evaluations (every `protocol.eval_every` steps and at the last one; runs on the training split
  only) / eval_img_s;
- evaluation (evaluate, baseline, evaluate_variant, evaluate_sweep): test images x models / eval_img_s;
- model_stats: its timed inference batches (config `throughput`) / eval_img_s;
- select_lr and real: CPU work of seconds, priced 0 and taking no device.
Its device-hours are those hours times its devices (a DDP job holds every one of its GPUs).

Image counts come from the prepared dataset.json where present, else the dataset's `expected` counts in the
config; where neither says, the job's price is None and its reason is listed under "unknown".
"""
from __future__ import annotations

import heapq
import json
from pathlib import Path

from workflow_scripts import matrix
from workflow_scripts.common import PipelineError
from workflow_scripts.matrix import (  # the job names of the rules' logs and benchmarks
    FINAL_JOB,
    PAIR_JOB,
    PROTOCOL_JOB,
    REAL_JOB,
    RUN_JOB,
    VARIANT_JOB,
    VARIANT_PAIR_JOB,
)


def job_id(rule: str, job: str) -> str:
    """A job's id: its log's path below the logs folder without ".log" (rules/common.smk log_file)."""
    return f"{rule}/{job}"


# ---------------------------------------------------------------------------------------------
# Image counts
def dataset_json_path(config: dict, dataset: str) -> Path:
    """Where prepare_data writes a dataset's record (rules/common.smk dataset_json)."""
    return Path(config["data_root"]) / dataset / "dataset.json"


def split_counts(config: dict, dataset: str) -> dict:
    """{"splits": {split: images}, "train_split", "source"}: from dataset.json, else the config's `expected`."""
    path = dataset_json_path(config, dataset)
    if path.exists():
        record = json.loads(path.read_text())
        return {"splits": record["splits"], "train_split": record["train_split"], "source": str(path)}
    expected = {k: v for k, v in config["datasets"][dataset].get("expected", {}).items() if k != "num_classes"}
    return {"splits": expected, "train_split": "train", "source": f"config datasets.{dataset}.expected"}


def test_images(config: dict, dataset: str) -> int | None:
    return split_counts(config, dataset)["splits"].get(config["datasets"][dataset]["test_split"])


def minival_images(config: dict, dataset: str) -> int | None:
    """The held-out split's size: a split of its own, or the fraction of the training split (splits.py)."""
    counts = split_counts(config, dataset)
    minival = config["datasets"][dataset]["minival"]
    if "split" in minival:
        return counts["splits"].get(minival["split"])
    train = counts["splits"].get(counts["train_split"])
    return None if train is None else max(1, int(round(train * minival["fraction"])))


# ---------------------------------------------------------------------------------------------
# The plan
def _job(config: dict, rule: str, job: str, ckpt: str | None, gpus: int, depends_on: list[str]) -> dict:
    shape = matrix.job_shape(config, ckpt) if ckpt is not None else None
    return {"id": job_id(rule, job), "rule": rule, "job": job, "shape": shape, "gpus": gpus,
            "devices": max(1, gpus) if shape else 0, "depends_on": depends_on}


def _finetune_job(config: dict, rule: str, job: str, ckpt: str, dataset: str, batch_size: int,
                  minival: bool, depends_on: list[str]) -> dict:
    entry = _job(config, rule, job, ckpt, matrix.finetune_gpus(config, ckpt), depends_on)
    steps = config["datasets"][dataset]["steps"]
    every = config["protocol"]["eval_every"]
    evals = steps // every + (1 if steps % every else 0) if minival else 0
    held_out = minival_images(config, dataset) if evals else 0
    entry["work"] = {"dataset": dataset, "train_images": steps * batch_size,
                     "eval_images": None if held_out is None else evals * held_out}
    return entry


def _eval_job(config: dict, rule: str, job: str, ckpt: str, dataset: str, models: int,
              depends_on: list[str]) -> dict:
    entry = _job(config, rule, job, ckpt, config["resources"]["evaluate"]["gpu"], depends_on)
    images = test_images(config, dataset)
    entry["work"] = {"dataset": dataset, "train_images": 0, "eval_images": None if images is None else images * models}
    return entry


def _sweep_ids(config: dict, ckpt: str, dataset: str) -> list[str]:
    return [job_id("finetune", RUN_JOB.format(ckpt=c, dataset=d, lr=lr, seed=s))
            for c, d, lr, s in matrix.pair_runs(config, ckpt, dataset)]


def _final_ids(config: dict, ckpt: str, dataset: str) -> list[str]:
    return [job_id("final_finetune", FINAL_JOB.format(ckpt=c, dataset=d, seed=run[-1]))
            for run in matrix.final_runs(config) for c, d in [run[:2]] if (c, d) == (ckpt, dataset)]


def _selection_id(ckpt: str, dataset: str) -> str:
    return job_id("select_lr", PAIR_JOB.format(ckpt=ckpt, dataset=dataset))


def training_jobs(config: dict) -> list[dict]:
    """The sweep runs, the selections, the final runs and the variant runs, in dependency order."""
    batch = config["protocol"]["batch_size"]
    jobs = [_finetune_job(config, "finetune", RUN_JOB.format(ckpt=ck, dataset=ds, lr=lr, seed=seed), ck, ds,
                          batch, True, []) for ck, ds, lr, seed in matrix.finetune_runs(config)]
    jobs += [_job(config, "select_lr", PAIR_JOB.format(ckpt=ck, dataset=ds), None, 0, _sweep_ids(config, ck, ds))
             for ck, ds in matrix.pairs(config)]
    for run in matrix.final_runs(config):
        ck, ds, seed = run[0], run[1], run[-1]
        jobs.append(_finetune_job(config, "final_finetune", FINAL_JOB.format(ckpt=ck, dataset=ds, seed=seed),
                                  ck, ds, batch, False, [_selection_id(ck, ds)]))
    on_train = not config["finetune"]["retrain_on_full_train"]  # a variant trains on what the final model did
    for variant, ck, ds, seed in matrix.variant_runs(config):
        vbatch = config["variants"][variant]["protocol"].get("batch_size", batch)
        jobs.append(_finetune_job(config, "variant_finetune",
                                  VARIANT_JOB.format(variant=variant, ckpt=ck, dataset=ds, seed=seed),
                                  ck, ds, vbatch, on_train, [_selection_id(ck, ds)]))
    return jobs


def evaluation_jobs(config: dict) -> list[dict]:
    """Every test evaluation (pairs, released checkpoints, variants, selection bias) and every ReaL job."""
    jobs = []
    for ck, ds, protocol in matrix.evaluations(config):
        finals = _final_ids(config, ck, ds)
        models = finals or _sweep_ids(config, ck, ds)
        deps = finals or [*models, _selection_id(ck, ds)]
        jobs.append(_eval_job(config, "evaluate", PROTOCOL_JOB.format(ckpt=ck, dataset=ds, protocol=protocol),
                              ck, ds, len(models), deps))
    jobs += [_eval_job(config, "baseline", PROTOCOL_JOB.format(ckpt=ck, dataset=ds, protocol=p), ck, ds, 1, [])
             for ck, ds, p in matrix.baseline_runs(config)]
    for variant, ck, ds in matrix.variant_pairs(config):
        runs = [job_id("variant_finetune", VARIANT_JOB.format(variant=v, ckpt=c, dataset=d, seed=s))
                for v, c, d, s in matrix.variant_runs(config) if (v, c, d) == (variant, ck, ds)]
        jobs.append(_eval_job(config, "evaluate_variant", VARIANT_PAIR_JOB.format(variant=variant, ckpt=ck, dataset=ds),
                              ck, ds, len(runs), runs))
    for ck, ds, protocol in matrix.sweep_evaluations(config):
        runs = _sweep_ids(config, ck, ds)
        jobs.append(_eval_job(config, "evaluate_sweep", PROTOCOL_JOB.format(ckpt=ck, dataset=ds, protocol=protocol),
                              ck, ds, len(runs), runs))
    for ck, ds, source, protocol in matrix.real_results(config):
        result = job_id("evaluate" if source == "finetune" else "baseline",
                        PROTOCOL_JOB.format(ckpt=ck, dataset=ds, protocol=protocol))
        jobs.append(_job(config, "real", REAL_JOB.format(source=source, ckpt=ck, dataset=ds, protocol=protocol),
                         None, 0, [result]))
    return jobs + model_stats_jobs(config)


def model_stats_jobs(config: dict) -> list[dict]:
    """The throughput measurement of each used checkpoint: its timed inference batches at eval_img_s."""
    t = config["throughput"]
    images = t["batch_size"] * (t["warmup_batches"] + t["rounds"] * t["batches_per_round"])
    jobs = []
    for ck in matrix.used_checkpoints(config):
        entry = _job(config, "model_stats", ck, ck, config["resources"]["evaluate"]["gpu"], [])
        entry["work"] = {"dataset": None, "train_images": 0, "eval_images": images}
        jobs.append(entry)
    return jobs


def plan(config: dict) -> list[dict]:
    """Every job of the study that the ETA counts, in dependency order (each after what it depends on)."""
    return training_jobs(config) + evaluation_jobs(config)


# ---------------------------------------------------------------------------------------------
# Prices and the schedule
def price(job: dict, rates: dict) -> tuple[float | None, str | None]:
    """(hours on the job's devices, None) or (None, why unknown)."""
    if not job["devices"]:
        return 0.0, None
    rate, work = rates.get(job["shape"]), job["work"]
    if rate is None:
        return None, f"no measured rate for job shape {job['shape']} (run the preflight)"
    if work["eval_images"] is None:
        return None, (f"image counts of dataset '{work['dataset']}' unknown: no dataset.json yet (run prepare_data) "
                      f"and no datasets.{work['dataset']}.expected in the config")
    seconds = work["train_images"] / rate["train_img_s"] if work["train_images"] else 0.0
    seconds += work["eval_images"] / rate["eval_img_s"] if work["eval_images"] else 0.0
    return seconds / 3600.0, None


def schedule(jobs: list[dict], devices: int) -> dict[str, tuple[float, float]]:
    """Start and end (hours) of each job of a DAG on `devices` devices, by list scheduling.

    `jobs`: [{"id", "hours", "devices", "depends_on": [ids]}] with each job after what it depends on. At time
    0 and whenever a job ends, every job whose dependencies have ended and whose devices are free starts, in
    list order (later jobs may start before an earlier one that waits for more devices, as Snakemake does).
    A job with `devices` 0 takes none. A job that needs more devices than there are is an error.
    """
    for job in jobs:
        if job["devices"] > devices:
            raise PipelineError(f"job {job['id']} needs {job['devices']} devices but the estimate has {devices}: "
                                "give at least that many GPUs, or lower resources.finetune_gpu_overrides")
    times: dict[str, tuple[float, float]] = {}
    pending, running, now, free = list(jobs), [], 0.0, devices
    while pending:
        for job in list(pending):
            if all(d in times and times[d][1] <= now for d in job["depends_on"]) and job["devices"] <= free:
                times[job["id"]] = (now, now + job["hours"])
                heapq.heappush(running, (now + job["hours"], job["id"], job["devices"]))
                free -= job["devices"]
                pending.remove(job)
        if not running:
            if pending:
                raise PipelineError(f"jobs {[j['id'] for j in pending][:3]} depend on jobs that never run")
            break
        now, _, released = heapq.heappop(running)
        free += released
        while running and running[0][0] <= now:
            free += heapq.heappop(running)[2]
    return times


def estimate(config: dict, rates: dict, gpus: int, done: frozenset[str] = frozenset()) -> dict:
    """The plan's device-hours and wall clock on `gpus` devices from measured `rates` ({shape: {"train_img_s",
    "eval_img_s"}}); the jobs whose ids are in `done` are left out (their dependants may start at once).

    Returns {"device_hours", "gpus", "eta_hours", "unknown": [why], "jobs": [{"rule", "job", "shape", "gpus",
    "devices", "device_hours", "depends_on", "start_h", "end_h"}]} ("devices": what the job holds, 0 for CPU
    work); device_hours and eta_hours are None if a job's price is unknown.
    """
    jobs, unknown = [], []
    for job in plan(config):
        if job["id"] in done:
            continue
        hours, why = price(job, rates)
        unknown += [why] if why and why not in unknown else []
        jobs.append({**job, "hours": hours, "depends_on": [d for d in job["depends_on"] if d not in done],
                     "device_hours": None if hours is None else hours * job["devices"]})
    times = schedule([{**j, "hours": j["hours"] or 0.0} for j in jobs], max(1, gpus)) if not unknown else {}
    out = [{"rule": j["rule"], "job": j["job"], "shape": j["shape"], "gpus": j["gpus"],
            "devices": j["devices"], "device_hours": j["device_hours"], "depends_on": j["depends_on"],
            "start_h": times[j["id"]][0] if times else None, "end_h": times[j["id"]][1] if times else None}
           for j in jobs]
    return {"device_hours": None if unknown else sum(j["device_hours"] for j in jobs), "gpus": gpus,
            "eta_hours": max((t[1] for t in times.values()), default=0.0) if not unknown else None,
            "unknown": unknown, "jobs": out}


# ---------------------------------------------------------------------------------------------
# The estimate checked by the run: each job's benchmark time beside the preflight's price
def planned_jobs(config: dict) -> list[tuple[str, str]]:
    """(rule, job) of every job the ETA counts, in `plan` order: the rules' benchmark files are named so."""
    return [(job["rule"], job["job"]) for job in plan(config)]


def _ratio(actual: float | None, estimated: float | None) -> float | None:
    return actual / estimated if actual is not None and estimated else None


def _devices_of_old_summary(job: dict) -> float:
    """A summary.json written before its job rows carried "devices": device-hours over scheduled hours."""
    wall_h = job["end_h"] - job["start_h"]
    return job["device_hours"] / wall_h if wall_h > 0 else 1.0


def check(preflight_summary: dict | None, actual_seconds: dict[tuple[str, str], float | None]) -> dict:
    """What each device job took (its benchmark's wall seconds, times its devices) against the preflight's
    estimate of it, per job and per rule. Jobs the estimate priced at 0 (CPU-only work) are left out; jobs of the
    estimate that are not in `actual_seconds` (another config) are counted, not compared."""
    if preflight_summary is None:
        return {"available": False, "why": "no preflight summary was given (run the preflight: `make preflight`)"}
    if preflight_summary.get("device_hours") is None:
        return {"available": False, "why": "the preflight could not price every job: "
                + "; ".join(preflight_summary.get("unknown") or ["unknown"])}
    jobs, by_rule, not_planned = [], {}, 0
    for job in preflight_summary["jobs"]:
        if not job["device_hours"]:
            continue
        key = (job["rule"], job["job"])
        if key not in actual_seconds:
            not_planned += 1
            continue
        devices = job.get("devices") or _devices_of_old_summary(job)
        seconds = actual_seconds[key]
        actual = None if seconds is None else seconds / 3600.0 * devices
        jobs.append({"rule": job["rule"], "job": job["job"], "shape": job["shape"], "estimated_hours":
                     job["device_hours"], "actual_hours": actual, "ratio": _ratio(actual, job["device_hours"])})
        rule = by_rule.setdefault(job["rule"], {"rule": job["rule"], "jobs": 0, "with_benchmark": 0,
                                                "estimated_hours": 0.0, "actual_hours": 0.0})
        rule["jobs"] += 1
        if actual is not None:  # rule totals compare like with like: the jobs that have a benchmark
            rule["with_benchmark"] += 1
            rule["estimated_hours"] += job["device_hours"]
            rule["actual_hours"] += actual
    rules = [{**r, "ratio": _ratio(r["actual_hours"], r["estimated_hours"])} for r in by_rule.values()]
    measured = [j for j in jobs if j["actual_hours"] is not None]
    estimated = sum(j["estimated_hours"] for j in measured)
    actual = sum(j["actual_hours"] for j in measured)
    return {"available": True, "why": None, "gpus": preflight_summary["gpus"],
            "eta_hours": preflight_summary["eta_hours"], "device_hours": preflight_summary["device_hours"],
            "devices": sorted({s.get("device_name") or s.get("device") for s in preflight_summary["shapes"]}),
            "jobs_compared": len(measured), "jobs_without_benchmark": len(jobs) - len(measured),
            "jobs_not_in_plan": not_planned, "estimated_hours": estimated, "actual_hours": actual,
            "ratio": _ratio(actual, estimated), "by_rule": rules, "jobs": jobs}
