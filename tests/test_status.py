"""The live status: each job's state from its files, and the Table 3 grid of an output folder where nothing ran,
of the finished demo (the session's demo_run, read only) and of a demo killed halfway (a copy of it, altered)."""
from __future__ import annotations

import json
import re
import shutil
import statistics
from pathlib import Path

import pytest

from workflow_scripts import eta, matrix, references, status
from workflow_scripts.common import PipelineError

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "demo" / "config.yaml"
SNAKEFILE = REPO / "Snakefile"


def hand_job(tmp_path: Path, outputs: bool = False, log: str | None = None, incomplete: bool = False) -> dict:
    """A job as status.dag_jobs describes it, its files under tmp_path."""
    job = {"rule": "finetune", "wildcards": {}, "outputs": ["out/model.safetensors"], "log": ["logs/x.log"],
           "incomplete": incomplete}
    if outputs:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "model.safetensors").write_text("")
    if log is not None:
        (tmp_path / "logs").mkdir()
        (tmp_path / "logs" / "x.log").write_text(log)
    return job


@pytest.mark.parametrize("files, locked, expected", [
    ({"outputs": True, "log": "ok"}, False, "done"),
    ({}, False, "waiting"),
    ({"log": "step 10\nerror: out of device memory at micro-batch 64\nTraceback\n"}, False, "failed"),
    ({"log": "step 10\n", "incomplete": True}, True, "running"),
    ({"log": "step 10\n", "incomplete": True}, False, "failed"),  # Snakemake stopped while it ran
])
def test_job_state_comes_from_files_and_markers(tmp_path, files, locked, expected):
    state, why = status.job_state(hand_job(tmp_path, **files), tmp_path, locked)
    assert state == expected
    if files.get("log", "").startswith("step 10\nerror"):
        assert why.startswith("error: out of device memory") and "logs/x.log" in why


def grid_states(result: dict) -> dict[tuple[str, str], tuple[str, float | None]]:
    return {(row["checkpoint"], column): (cell["state"], cell["figure"])
            for row in result["grid"]["rows"] for column, cell in zip(result["grid"]["columns"], row["cells"])}


def html_states(page: str) -> dict[tuple[str, str], str]:
    """(checkpoint, column) -> the state word of each cell of status.html's grid."""
    cells = {}
    for row, body in re.findall(r'<tr data-row="([^"]+)">(.*?)</tr>', page, re.S):
        for column, state, word in re.findall(r'data-column="([^"]+)" data-state="([^"]+)">.*?'
                                              r'<span class="state">([^<]+)</span>', body, re.S):
            assert state == word, (row, column)  # the colour's state is the word's
            cells[row, column] = word
    return cells


def test_benchmark_seconds_of_a_finished_a_running_and_a_broken_job(tmp_path):
    finished = tmp_path / "finished.tsv"
    finished.write_text("s\th:m:s\tmax_rss\n12.5\t0:00:12\t100.0\n")  # as Snakemake writes it
    assert status.benchmark_seconds(finished) == 12.5
    assert status.benchmark_seconds(tmp_path / "running.tsv") is None  # written when the job ends
    broken = tmp_path / "broken.tsv"
    broken.write_text("not a benchmark\n")
    with pytest.raises(PipelineError, match=r"broken\.tsv: not a Snakemake benchmark file"):
        status.benchmark_seconds(broken)


def test_status_of_an_output_folder_where_nothing_ran(tmp_path, capsys):
    status.main(["--config", str(DEMO_CONFIG), "--directory", str(tmp_path)])
    printed = capsys.readouterr().out
    assert re.search(r"Jobs: 0 of \d+ done, 0 running, 0 failed, \d+ waiting", printed)
    assert status.NO_RATES in printed
    page = (tmp_path / "demo_results" / "status.html").read_text()
    states = html_states(page)
    config = status_config()
    datasets = matrix.used_datasets(config)
    columns = datasets + [ds for ds in datasets if config["datasets"][ds].get("real_labels")] + list(config["averages"])
    assert len(states) == len(matrix.used_checkpoints(config)) * len(columns)  # datasets, their ReaL, averages
    assert set(states.values()) == {"waiting"}
    assert "<link" not in page and "<script" not in page  # self-contained


def status_config() -> dict:
    return references.load_config(DEMO_CONFIG)


def demo_figures(root: Path, config: dict) -> dict[tuple[str, str], float]:
    """The finished demo's figures per (checkpoint, column), read from its result files."""
    headline = config["evaluation"]["headline_protocol"]
    figures = {}
    for ck, ds, source in matrix.results(config):
        if source != "finetune":  # a released model as it is is no Table 3 figure
            continue
        label = config["datasets"][ds]["label"]
        figures[ck, label] = json.loads((root / "evaluate" / ck / ds / f"{headline}.json").read_text())["top1_mean"]
        if config["datasets"][ds].get("real_labels"):
            real = root / "real" / "finetune" / ck / ds / f"{headline}.json"
            figures[ck, f"{label} ReaL"] = json.loads(real.read_text())["real_top1"]
    for name, members in config["averages"].items():
        for ck in matrix.used_checkpoints(config):
            figures[ck, name] = statistics.fmean(figures[ck, config["datasets"][ds]["label"]] for ds in members)
    return figures


@pytest.mark.slow
def test_status_of_the_finished_demo(demo_run):
    """Every cell done with the demo's own figures, every job done; the ETA module names every GPU job as the
    rules name its log (eta.plan's ids are Snakemake's)."""
    workdir, root, config = demo_run
    result = status.study_status(SNAKEFILE, DEMO_CONFIG, workdir)
    figures = demo_figures(root, config)
    states = grid_states(result)
    assert set(states) == set(figures)
    for key, (state, figure) in states.items():
        assert state == "done" and figure == pytest.approx(figures[key]), key
    assert result["jobs"]["done"] == result["jobs_total"] and result["failed"] == [] == result["running"]
    assert result["hours"]["spent"] > 0
    planned = {j["id"] for j in eta.plan(config)}
    assert planned <= set(result["job_states"]), sorted(planned - set(result["job_states"]))[:5]


def kill_halfway(workdir: Path, config: dict) -> tuple[str, str]:
    """Alter a copy of the finished demo into one killed halfway: (p4, digits_jpeg) never reached its final run (its
    final runs, evaluations and everything after them removed with their logs: waiting), and a sweep run of
    (p8, digits_arrays) failed (its outputs removed, its log kept with an error line appended; what follows it
    removed with logs). Returns the failed job's id and its error line."""
    _, jobs, _ = status.dag_jobs(SNAKEFILE, DEMO_CONFIG, workdir)
    p4, p8 = matrix.used_checkpoints(config)
    failed = next(j for j in jobs if j["rule"] == "finetune" and j["wildcards"]["ckpt"] == p8
                  and j["wildcards"]["dataset"] == "digits_arrays")
    error = "error: planted by test_status: out of device memory"

    def never_ran(job: dict) -> bool:
        wc = job["wildcards"]
        pair = (wc.get("ckpt"), wc.get("dataset"))
        after_final = pair == (p4, "digits_jpeg") and job["rule"] not in ("finetune", "select_lr", "prepare_data")
        after_failed = pair == (p8, "digits_arrays") and job["rule"] != "finetune"
        return after_final or after_failed or job["rule"] in ("aggregate", "notebook", "report")

    for job in jobs:
        if never_ran(job) or job is failed:
            for path in job["outputs"] + ([job["benchmark"]] if job["benchmark"] else []):
                (workdir / path).unlink(missing_ok=True)
        if never_ran(job):
            for log in job["log"]:
                (workdir / log).unlink(missing_ok=True)
    with (workdir / failed["log"][0]).open("a") as f:
        f.write(error + "\n")
    return status.job_id(config, failed), error


@pytest.mark.slow
def test_status_of_a_demo_killed_halfway(demo_run, tmp_path):
    """A copy of the finished demo's output folder, altered by kill_halfway (cheaper than a second demo); with a
    preflight summary planted, the hours left and the ETA are eta.estimate's on the jobs not done."""
    workdir, root, config = demo_run
    shutil.copytree(root, tmp_path / root.name)
    failed_id, error = kill_halfway(tmp_path, config)
    rates = {shape: {"train_img_s": 50.0, "eval_img_s": 500.0} for shape in matrix.job_shapes(config)}
    (tmp_path / root.name / "preflight").mkdir(exist_ok=True)
    (tmp_path / root.name / "preflight" / "summary.json").write_text(json.dumps(
        {"shapes": [{"shape": s, **r} for s, r in rates.items()], "gpus": 2}))

    result = status.study_status(SNAKEFILE, DEMO_CONFIG, tmp_path)
    printed = status.render_text(result)
    status.write_html(result, tmp_path / "status.html")
    states = html_states((tmp_path / "status.html").read_text())
    p4, p8 = matrix.used_checkpoints(config)
    waiting = {(p4, "Digits (JPEG tree)"), (p4, "Digits (JPEG tree) ReaL"), (p4, "AvgDemo")}
    failed = {(p8, "Digits (array store)"), (p8, "AvgDemo")}
    for key, state in states.items():
        assert state == ("waiting" if key in waiting else "failed" if key in failed else "done"), key
    assert f"failed: {failed_id}: {error}" in printed
    assert re.search(r"Jobs: \d+ of \d+ done, 0 running, 1 failed, \d+ waiting", printed)

    done = frozenset(i for i, s in result["job_states"].items() if s == "done")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        expected = eta.estimate(config, rates, 2, done=done)
    assert result["hours"]["left"] == pytest.approx(expected["device_hours"]) and expected["device_hours"] > 0
    assert result["hours"]["eta_hours"] == pytest.approx(expected["eta_hours"])
    assert f"ETA {expected['eta_hours']:.2f} h on 2 device(s)" in printed
