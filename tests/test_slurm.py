"""The demo pipeline as SLURM jobs on a real single-node SLURM (no mock scheduler).

tests/slurm/setup_slurm.sh starts Debian's slurm-wlm with munge and slurmdbd accounting on this
machine (two partitions, `cpu` and `gpu`, and two fake "a100" GPUs as GRES); the demo then runs
through `--executor slurm` with the shipped profile (profiles/slurm), unchanged. One checkpoint's
fine-tuning jobs ask for 2 GPUs, so they run as DDP (torchrun, gloo on CPU) inside a 2-GPU
allocation, and one of them is preempted (requeued, as SLURM's PreemptMode=REQUEUE does) once it
has saved resume state: on SIGTERM it saves the step it is at, and the requeued job resumes from
exactly that step. The demo's pair of that checkpoint with the array store only (every kind of job, not
every pair: the scheduler's overhead per job is the cost). Needs root and the Debian package registry;
skipped otherwise (a failure in CI).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from workflow_scripts import matrix, resume_files

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "demo" / "config.yaml"
PROFILE = REPO / "profiles" / "slurm"
SETUP = REPO / "tests" / "slurm" / "setup_slurm.sh"
TEARDOWN = REPO / "tests" / "slurm" / "teardown_slurm.sh"
SETUP_UNSUPPORTED = 2  # setup_slurm.sh's exit code for "this machine cannot host the cluster"
PIPELINE_TIMEOUT_S = 1200
DDP_GPUS = 2

pytestmark = pytest.mark.slow


def _run_logged(cmd, log_path, timeout):
    """Run cmd with its output in a file (a daemon it starts could hold a pipe open forever)."""
    with open(log_path, "w") as log:
        res = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             timeout=timeout)
    return res.returncode, Path(log_path).read_text()


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: installs Debian's slurm-wlm, munge and MariaDB and starts their daemons")
    logs = tmp_path_factory.mktemp("slurm_cluster")
    already_up = subprocess.run("scontrol ping", shell=True, capture_output=True).returncode == 0
    code, out = _run_logged(["bash", str(SETUP)], logs / "setup.log", timeout=900)
    if code == SETUP_UNSUPPORTED:
        pytest.skip(f"no SLURM test cluster on this machine: {out.strip().splitlines()[-1]}")
    if code != 0:
        pytest.fail(f"tests/slurm/setup_slurm.sh failed (exit {code}):\n{out[-4000:]}")
    yield
    if not already_up:  # leave a cluster someone else started as it was
        code, out = _run_logged(["bash", str(TEARDOWN)], logs / "teardown.log", timeout=180)
        assert code == 0, f"teardown_slurm.sh left daemons running:\n{out}"


def _squeue(*args):
    res = subprocess.run(["squeue", "-h", *args], capture_output=True, text=True, timeout=30)
    return res.stdout.splitlines() if res.returncode == 0 else []


def _newest_checkpoint(resume_dir):
    steps = resume_files.checkpoint_steps(resume_dir)
    return steps[0] if steps else None


def _settled_newest_checkpoint(resume_dir, quiet_s=3.0, timeout_s=30.0):
    """The newest checkpoint once none has appeared for quiet_s (the stopped job may still be saving)."""
    deadline, newest, since = time.monotonic() + timeout_s, _newest_checkpoint(resume_dir), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.2)
        if (now := _newest_checkpoint(resume_dir)) != newest:
            newest, since = now, time.monotonic()
    return newest


def _preempt_one_finetune_job(resume_root, ckpt):
    """Requeue the running fine-tuning job of ckpt that has saved resume state, if there is one yet.

    Returns {"job_id", "run", "newest_at_requeue", "stopped_at"} once done, else None. `scontrol requeue`
    is what preemption with PreemptMode=REQUEUE does: SIGTERM to the job's processes (fine-tuning saves
    the step it is at and exits), SIGKILL after KillWait, and the job queued again under the same id.
    """
    for sidecar in sorted(resume_root.glob(f"{ckpt}/*/*/state-*.json")):
        resume_dir = sidecar.parent
        dataset, run = resume_dir.parent.name, resume_dir.name
        lr, seed = re.fullmatch(r"lr(.+)_s(\d+)", run).groups()
        comment = f"rule_finetune_wildcards_{ckpt}_{dataset}_{lr}_{seed}"
        for line in _squeue("-t", "RUNNING", "-o", "%i|%k"):
            job_id, job_comment = line.split("|", 1)
            if job_comment == comment:
                newest_at_requeue = _newest_checkpoint(resume_dir)
                subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
                # Wait for the old run to end and save, then release the requeued job (it becomes eligible
                # only after a delay, BeginTime): the first checkpoint it finds is the one saved on SIGTERM.
                deadline = time.monotonic() + 60
                while any(state in ("RUNNING", "COMPLETING") for state in _squeue("-j", job_id, "-o", "%T")):
                    assert time.monotonic() < deadline, f"requeued job {job_id} is still running"
                    time.sleep(0.5)
                stopped_at = _settled_newest_checkpoint(resume_dir)
                while subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                                     capture_output=True, timeout=30).returncode != 0:
                    assert time.monotonic() < deadline, f"requeued job {job_id} never became pending"
                    time.sleep(1)
                return {"job_id": job_id, "run": f"{ckpt}/{dataset}/{run}", "newest_at_requeue": newest_at_requeue,
                        "stopped_at": stopped_at}
    return None


@pytest.fixture(scope="module")
def slurm_demo(slurm_cluster, tmp_path_factory):
    """Run the demo through the SLURM executor once; the tests below read what it left."""
    cfg = yaml.safe_load(DEMO_CONFIG.read_text())
    ddp_ckpt, dataset = cfg["finetune"]["checkpoints"][0], "digits_arrays"
    workdir = tmp_path_factory.mktemp("slurm_demo")
    overlay = workdir / "ddp.yaml"
    # One pair of the demo (its sweep, final runs, evaluations, variant and report), all of its training
    # as DDP: every kind of job goes through SLURM without paying the scheduler's overhead for the whole demo.
    subset = {"finetune": {"checkpoints": [ddp_ckpt], "datasets": [dataset]}, "averages": {"AvgDemo": [dataset]},
              "variants": {"batch32": {"pairs": [[ddp_ckpt, dataset]]}},
              "resources": {"finetune_gpu_overrides": {ddp_ckpt: DDP_GPUS}}}
    overlay.write_text(yaml.safe_dump(subset))
    cfg["finetune"].update(subset["finetune"])
    cmd = [
        str(Path(sys.executable).with_name("snakemake")), "-s", str(REPO / "Snakefile"),
        "--configfile", str(DEMO_CONFIG), str(overlay),
        "--executor", "slurm", "--workflow-profile", str(PROFILE), "--jobs", "10",
        # The test cluster has no accounts to pick (and the plugin's account guess fails on 22.05).
        "--slurm-no-account",
        # Demo jobs take seconds: poll sacct sooner than the profile does; fail at once, no retries.
        "--slurm-init-seconds-before-status-checks", "5", "--retries", "0",
    ]
    # Jobs inherit this environment (sbatch --export=ALL): the venv's python runs the stages. Not the
    # CUDA_VISIBLE_DEVICES of the suite (conftest) or the user: SLURM sets the GPU jobs' own.
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    log_path = workdir / "snakemake.log"
    root = workdir / cfg["output_root"]
    preempted = None
    deadline = time.monotonic() + PIPELINE_TIMEOUT_S
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        while (code := proc.poll()) is None and time.monotonic() < deadline:
            if preempted is None:
                preempted = _preempt_one_finetune_job(root / ".resume" / "finetune", ddp_ckpt)
            time.sleep(0.5)
        if code is None:
            proc.send_signal(signal.SIGINT)  # Snakemake scancels its jobs on Ctrl-C
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
    out = log_path.read_text()
    if code != 0:
        rule_logs = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}"
                              for p in sorted((root / "logs").rglob("*.log")) if p.stat().st_size)
        why = f"timed out after {PIPELINE_TIMEOUT_S} s" if code is None else f"exit {code}"
        pytest.fail(f"demo under SLURM failed ({why}):\n{out[-6000:]}\n{rule_logs[-6000:]}")
    run_id = re.search(r"SLURM run ID: (\S+)", out).group(1)
    return {"workdir": workdir, "root": root, "cfg": cfg, "out": out, "run_id": run_id,
            "ddp_ckpt": ddp_ckpt, "preempted": preempted}


def _job_stats(out):
    """Snakemake's 'Job stats' table: {rule: count}."""
    table = out.split("Job stats:", 1)[1].split("total", 1)[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def _sacct_jobs(run_id):
    """The run's SLURM jobs (the plugin names every job of a run by its run id)."""
    res = subprocess.run(
        ["sacct", "-X", "-n", "-P", "--name", run_id, "-S", "now-1days",
         "-o", "JobID,Comment,Partition,AllocTRES,State"],
        capture_output=True, text=True, timeout=60, check=True)
    jobs = []
    for line in res.stdout.splitlines():
        job_id, comment, partition, tres, state = line.split("|")
        # The plugin's comment: rule_<rule> or rule_<rule>_wildcards_<values joined by _>
        rule, _, wildcards = comment.removeprefix("rule_").partition("_wildcards_")
        jobs.append({"id": job_id, "rule": rule, "wildcards": wildcards, "partition": partition,
                     "tres": dict(kv.split("=", 1) for kv in tres.split(",") if kv), "state": state})
    return jobs


def test_report_shows_each_pair_top1(slurm_demo):
    root, cfg = slurm_demo["root"], slurm_demo["cfg"]
    html = (root / "report" / "index.html").read_text()
    headline = cfg["evaluation"]["headline_protocol"]
    for ckpt, ds in matrix.pairs(cfg):  # the fine-tuned pairs' headline figures
        result = json.loads((root / "evaluate" / ckpt / ds / f"{headline}.json").read_text())
        assert f"{result['top1_mean']:.2f}" in html, (ckpt, ds, result["top1_mean"])


def test_every_job_ran_under_slurm_on_the_right_partition(slurm_demo):
    jobs = _sacct_jobs(slurm_demo["run_id"])
    expected = {rule: n for rule, n in _job_stats(slurm_demo["out"]).items() if rule != "all"}
    assert Counter(j["rule"] for j in jobs) == expected
    assert {j["state"] for j in jobs} == {"COMPLETED"}, [j for j in jobs if j["state"] != "COMPLETED"]
    ddp_prefix = slurm_demo["ddp_ckpt"] + "_"
    training_rules = {"finetune", "final_finetune", "variant_finetune"}  # all run the DDP checkpoint's jobs on 2 GPUs
    ddp_shape = f"-{DDP_GPUS}gpu"  # its shape's preflight checks DDP on the same allocation (matrix.job_shape)
    ddp_jobs = [j for j in jobs if (j["rule"] in training_rules and ddp_prefix in j["wildcards"])
                or (j["rule"] == "preflight_shape" and j["wildcards"].endswith(ddp_shape))]
    assert ddp_jobs, "no fine-tuning job of the DDP checkpoint in sacct"
    for job in jobs:
        if job in ddp_jobs:
            # one task with both GPUs, cpus_per_gpu (= threads = 1) CPUs per GPU, on the GPU partition
            assert job["partition"] == "gpu", job
            assert job["tres"].get("gres/gpu") == str(DDP_GPUS), job
            assert job["tres"]["cpu"] == str(DDP_GPUS), job
        else:  # CPU-only jobs stay off the GPU partition and get no GPU
            assert job["partition"] == "cpu", job
            assert "gres/gpu" not in job["tres"], job


def test_ddp_runs_used_both_gpus_of_their_allocation(slurm_demo):
    root, cfg = slurm_demo["root"], slurm_demo["cfg"]
    summaries = sorted((root / "finetune").glob("*/*/*/summary.json"))
    assert len(summaries) == len(matrix.finetune_runs(cfg))  # every run of the sweep, per-dataset LR grids
    for path in summaries:
        summary = json.loads(path.read_text())
        expected = DDP_GPUS if summary["checkpoint"] == slurm_demo["ddp_ckpt"] else 1
        assert summary["world_size"] == expected, path


def test_logs_land_where_the_docs_say(slurm_demo):
    workdir, root = slurm_demo["workdir"], slurm_demo["root"]
    for job in _sacct_jobs(slurm_demo["run_id"]):
        # SLURM's own log of each job (profile: slurm-keep-successful-logs)
        sub = Path(job["wildcards"]) if job["wildcards"] else Path()
        assert (workdir / ".snakemake" / "slurm_logs" / f"rule_{job['rule']}" / sub / f"{job['id']}.log").exists(), job
    # each rule's own log
    assert sorted(p.name for p in (root / "logs").iterdir()) == sorted(
        r for r in _job_stats(slurm_demo["out"]) if r != "all")


def test_preempted_job_resumes_from_its_checkpoint(slurm_demo):
    preempted = slurm_demo["preempted"]
    assert preempted, "no fine-tuning job was caught running with resume state, so none was preempted"
    res = subprocess.run(["sacct", "-X", "-n", "-P", "-D", "-j", preempted["job_id"], "-o", "State"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert res.stdout.split() == ["REQUEUED", "COMPLETED"], res.stdout
    summary = json.loads((slurm_demo["root"] / "finetune" / preempted["run"] / "summary.json").read_text())
    # On SIGTERM the DDP job saved the step it was at, past its last periodic checkpoint, and the requeued
    # job resumed from exactly there (nothing lost).
    assert preempted["stopped_at"] > preempted["newest_at_requeue"], preempted
    assert summary["resumed_from_step"] == preempted["stopped_at"], (summary["resumed_from_step"], preempted)
    assert summary["world_size"] == DDP_GPUS


def test_report_provenance_names_the_slurm_command(slurm_demo):
    # The report job ran in a SLURM job; it still records the command that started the run.
    html = (slurm_demo["root"] / "report" / "index.html").read_text()
    assert "--executor slurm" in html
