"""The ETA: the list scheduler on hand-made DAGs (known answers) and the plan's prices from measured rates."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from workflow_scripts import eta, matrix, references
from workflow_scripts.common import PipelineError

REPO = Path(__file__).resolve().parents[1]


def dag_job(name: str, hours: float, devices: int = 1, depends_on: tuple[str, ...] = ()) -> dict:
    return {"id": name, "hours": hours, "devices": devices, "depends_on": list(depends_on)}


def test_three_independent_jobs_and_a_dependent_one_take_two_hours_on_two_devices():
    times = eta.schedule([dag_job("a", 1), dag_job("b", 1), dag_job("c", 1), dag_job("d", 1, depends_on=("a",))], 2)
    assert times == {"a": (0, 1), "b": (0, 1), "c": (1, 2), "d": (1, 2)}


def test_a_two_device_job_blocks_both_devices():
    """`wide` needs both devices: it waits for `a` to end and nothing runs beside it; `c` fills the idle device
    at the start (as Snakemake fills free resources), and `after` waits for `wide`."""
    times = eta.schedule([dag_job("a", 1), dag_job("wide", 2, devices=2), dag_job("c", 0.5),
                          dag_job("after", 1, depends_on=("wide",))], 2)
    assert times["wide"] == (1, 3)
    assert times["c"] == (0, 0.5)
    assert times["after"] == (3, 4)


def test_a_chain_is_sequential_and_deviceless_jobs_take_no_device():
    """A select_lr-like job (0 devices, 0 hours) between two stages does not delay its dependants."""
    times = eta.schedule([dag_job("x", 2), dag_job("y", 2), dag_job("pick", 0, devices=0, depends_on=("x", "y")),
                          dag_job("final", 1, depends_on=("pick",))], 1)
    assert times["pick"] == (4, 4) and times["final"] == (4, 5)


def test_a_job_wider_than_the_node_is_refused_with_the_key():
    with pytest.raises(PipelineError, match="finetune_gpu_overrides"):
        eta.schedule([dag_job("wide", 1, devices=2)], 1)


def demo_config(tmp_path: Path) -> dict:
    config = references.load_config(REPO / "demo" / "config.yaml")
    config["data_root"] = str(tmp_path / "data")
    for name, ds in config["datasets"].items():  # prepared records with invented counts
        record = {"splits": {"train": 1000, "val": 200, "test": 300}, "train_split": "train"}
        path = eta.dataset_json_path(config, name)
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(record))
    return config


def test_estimate_prices_every_planned_job_from_the_rates(tmp_path):
    config = demo_config(tmp_path)
    rates = {shape: {"train_img_s": 64.0, "eval_img_s": 100.0 * (i + 1)}
             for i, shape in enumerate(matrix.job_shapes(config))}
    result = eta.estimate(config, rates, 2)
    jobs = {(j["rule"], j["job"]): j for j in result["jobs"]}
    # every job of the matrix, named as the rules name its log
    assert len([j for j in jobs if j[0] == "finetune"]) == len(matrix.finetune_runs(config))
    assert len([j for j in jobs if j[0] == "evaluate"]) == len(matrix.evaluations(config))
    ck, ds, lr, seed = matrix.finetune_runs(config)[0]
    sweep = jobs["finetune", f"{ck}/{ds}/lr{lr}_s{seed}"]
    steps, every = config["datasets"][ds]["steps"], config["protocol"]["eval_every"]
    batch = config["protocol"]["batch_size"]
    minival = eta.minival_images(config, ds)
    evals = -(-steps // every)  # every eval_every steps and at the last one
    rate = rates[matrix.job_shape(config, ck)]
    assert sweep["device_hours"] == pytest.approx((steps * batch / 64.0 + evals * minival / rate["eval_img_s"]) / 3600)
    final = jobs["final_finetune", f"{ck}/{ds}/s{seed}"]  # trains on the full data: no minival
    assert final["device_hours"] == pytest.approx(steps * batch / 64.0 / 3600)
    assert final["depends_on"] == [f"select_lr/{ck}/{ds}"]
    evaluation = jobs["evaluate", f"{ck}/{ds}/official"]
    test = {"train": 1000, "val": 200, "test": 300}[config["datasets"][ds]["test_split"]]
    seeds = len(matrix.final_seeds(config))  # the final runs, one per final seed
    assert evaluation["device_hours"] == pytest.approx(test * seeds / rate["eval_img_s"] / 3600)
    assert result["device_hours"] == pytest.approx(sum(j["device_hours"] for j in result["jobs"]))
    # two devices: no faster than half the device-hours, no slower than all of them in a row
    assert result["device_hours"] / 2 <= result["eta_hours"] <= result["device_hours"]
    assert all(jobs[tuple(d.split("/", 1))]["end_h"] <= j["start_h"] for j in result["jobs"] for d in j["depends_on"])


def test_estimate_leaves_out_done_jobs_and_says_what_is_unknown(tmp_path):
    config = demo_config(tmp_path)
    rates = {shape: {"train_img_s": 64.0, "eval_img_s": 100.0} for shape in matrix.job_shapes(config)}
    everything = eta.estimate(config, rates, 1)
    done = {f"{j['rule']}/{j['job']}" for j in everything["jobs"] if j["rule"] == "finetune"}
    rest = eta.estimate(config, rates, 1, done=frozenset(done))
    assert {j["rule"] for j in rest["jobs"]} == {j["rule"] for j in everything["jobs"]} - {"finetune"}
    assert rest["eta_hours"] < everything["eta_hours"]
    missing = eta.estimate(config, {}, 1)
    assert missing["eta_hours"] is None and missing["device_hours"] is None
    assert any("run the preflight" in why for why in missing["unknown"])


def test_the_check_puts_each_jobs_benchmark_beside_its_estimate(tmp_path):
    """eta.check: per job and per rule, actual device-hours (benchmark wall seconds x the job's devices) over the
    estimate; a job without benchmark is counted, not compared; CPU-only jobs (priced 0) are left out."""
    config = demo_config(tmp_path)
    rates = {shape: {"train_img_s": 64.0, "eval_img_s": 100.0} for shape in matrix.job_shapes(config)}
    summary = {**eta.estimate(config, rates, 2), "shapes": [{"device": "cpu", "device_name": "Fixture CPU"}]}
    planned = eta.planned_jobs(config)
    priced = {(j["rule"], j["job"]): j["device_hours"] for j in summary["jobs"]}
    seconds = {job: 2 * priced[job] * 3600 for job in planned}  # everything took twice its estimate...
    evaluations = [job for job in planned if job[0] == "evaluate"]
    seconds[evaluations[0]] = None  # ...and one evaluation has no benchmark file
    check = eta.check(summary, seconds)
    assert check["available"] and check["devices"] == ["Fixture CPU"]
    assert check["jobs_without_benchmark"] == 1 and check["jobs_not_in_plan"] == 0
    assert check["jobs_compared"] == len([job for job in planned if priced[job]]) - 1
    assert check["ratio"] == pytest.approx(2.0)
    rules = {r["rule"]: r for r in check["by_rule"]}
    assert "select_lr" not in rules and "real" not in rules  # priced 0: CPU work
    assert rules["evaluate"]["jobs"] == len(evaluations) and rules["evaluate"]["with_benchmark"] == len(evaluations) - 1
    assert all(r["ratio"] == pytest.approx(2.0) for r in rules.values())
    [finetune] = [j for j in check["jobs"] if (j["rule"], j["job"]) == planned[0]]
    assert finetune["actual_hours"] == pytest.approx(2 * finetune["estimated_hours"])
    # a job holding 2 devices (a DDP override) costs its wall time twice, in this summary and in one written
    # before the job rows carried "devices" (derived from device-hours over scheduled hours)
    config["resources"]["finetune_gpu_overrides"] = {planned[0][1].split("/")[0]: 2}
    rates = {shape: {"train_img_s": 64.0, "eval_img_s": 100.0} for shape in matrix.job_shapes(config)}
    wide = {**eta.estimate(config, rates, 2), "shapes": summary["shapes"]}
    [row] = [j for j in wide["jobs"] if (j["rule"], j["job"]) == planned[0]]
    assert row["devices"] == 2
    old = {**wide, "jobs": [{k: v for k, v in j.items() if k != "devices"} for j in wide["jobs"]]}
    for s in (wide, old):
        [job] = [j for j in eta.check(s, {planned[0]: 3600.0})["jobs"] if (j["rule"], j["job"]) == planned[0]]
        assert job["actual_hours"] == pytest.approx(2.0)
    # a preflight of another config: its jobs that this plan lacks are counted apart
    fewer = {job: s for job, s in seconds.items() if job[0] != "finetune"}
    assert eta.check(summary, fewer)["jobs_not_in_plan"] == len([j for j in planned if j[0] == "finetune"])


def test_the_check_says_why_it_cannot_compare():
    assert "make preflight" in eta.check(None, {})["why"]
    unknown = eta.check({"device_hours": None, "unknown": ["no measured rate for job shape x"]}, {})
    assert not unknown["available"] and "no measured rate for job shape x" in unknown["why"]
