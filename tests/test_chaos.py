"""Chaos: the demo survives fine-tuning jobs, evaluation jobs and Snakemake itself being killed.

The demo (demo/config.yaml, through the real Snakefile, in a temporary working directory) runs once
uninterrupted, then again in the same place while faults are injected at random moments drawn from a
printed seed (MIXER_CHAOS_SEED=<n> replays them): SIGKILL or SIGTERM to a fine-tuning job (SIGTERM goes
to its gpu_pool, which passes it on), SIGKILL or SIGTERM to an evaluation job, and Snakemake itself killed
with its jobs (SIGKILL to its process group, a crash), stopped gracefully (SIGTERM) or interrupted (SIGINT
to its process group, Ctrl-C). After each fault the same command runs again (with --rerun-incomplete;
after `snakemake --unlock` when the directory is locked) until it completes. Then every file of the
output tree must equal the uninterrupted run's:

- byte for byte: the data files (models .safetensors, metrics.jsonl, predictions .npz, selections,
  dataset.json and the data, the ReaL results, the aggregate's tables, ...);
- JSON and CSV records that carry wall-clock timings: equal after removing exactly the fields listed in
  VOLATILE_FIELDS below (the one place that lists them): timings, throughputs, memory peaks, wall-clock
  dates, and `resumed_from_step`, which records the interruption itself;
- not compared, because they narrate each attempt: job logs and benchmark TSVs (every column a
  measurement), and the rendered notebook and report, which show those timings and link the logs. The
  report is checked to render with every pair's top-1 (the aggregate it is made from is compared above).

Resume folders must hold no checkpoint at the end. Leftover `.<name>.<random>.tmp` files of atomic writes
cut short by SIGKILL are listed, not compared.

`make test` runs the short form (one checkpoint, one dataset, 3 faults, about 3 CPU minutes);
`make chaos` the whole demo with 6 faults (MIXER_CHAOS_FULL=1).
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "demo" / "config.yaml"
FULL = os.environ.get("MIXER_CHAOS_FULL") == "1"
# The short form: one fine-tuning pair (two LRs) of the demo, the rest of the pipeline as it is.
SHORT_OVERLAY = {"finetune": {"checkpoints": ["demo_mixer_p8"], "datasets": ["digits_arrays"]},
                 "averages": {"AvgDemo": ["digits_arrays"]},
                 "variants": {"batch32": {"pairs": [["demo_mixer_p8", "digits_arrays"]]}}}
ATTEMPT_TIMEOUT_S = 1200
MAX_ATTEMPTS = 20

# Fields that hold wall-clock time, throughput, memory or the interruption itself; removed (at any depth)
# before two records are compared. Keys: a glob under the output root. CSV files: the columns.
RUN_TIMING = {"train_seconds", "img_s", "started_utc", "finished_utc"}
PARITY_TIMING = {"convert_seconds", "peak_rss_mib", "rss_at_start_mib", "peak_rss_at_start_mib"}
AGGREGATE_RUN_TIMING = RUN_TIMING | {"wall_seconds", "gpu_hours", "max_rss_mib"}  # the last two: from benchmarks
VOLATILE_FIELDS = {
    "finetune/*/*/*/summary.json": RUN_TIMING | {"timings", "resumed_from_step"},
    "final/*/*/*/summary.json": RUN_TIMING | {"timings", "resumed_from_step"},
    "variants/*/*/*/*/summary.json": RUN_TIMING | {"timings", "resumed_from_step"},
    "variants/*/*/*/evaluation.json": {"images_per_s"},
    "selection_bias/*/*.json": {"images_per_s"},
    "evaluate/*/*/*.json": {"images_per_s"},
    "converted/*.parity.json": PARITY_TIMING,
    "weights/*.download.json": {"seconds"},
    "weights/real_labels/*.download.json": {"seconds"},
    "weights.lock": {"recorded_utc"},
    "evaluate/*/*.json": {"images_per_s"},
    "baseline/*/*/*.json": {"images_per_s"},
    "aggregate/summary.json": AGGREGATE_RUN_TIMING | PARITY_TIMING | {"aggregated_utc", "seconds", "images_per_s"},
    "aggregate/runs.csv": AGGREGATE_RUN_TIMING,
}
# Folders not compared: they narrate each attempt (see the docstring); .resume is checked on its own.
NOT_COMPARED = ("logs", "benchmarks", "report", ".resume")
ATOMIC_LEFTOVER = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")  # common.atomic_path's temporary names


# ---------------------------------------------------------------------------------------------
# Running the demo

def snakemake_cmd(overlay: Path | None) -> list[str]:
    configs = [str(DEMO_CONFIG)] + ([str(overlay)] if overlay else [])
    return [str(Path(sys.executable).with_name("snakemake")), "-s", str(REPO / "Snakefile"),
            "--configfile", *configs, "--cores", "2", "--rerun-incomplete"]


def job_env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def start(cmd: list[str], workdir: Path, log: Path) -> subprocess.Popen:
    """Snakemake in its own process group (a group signal reaches it and its jobs, as Ctrl-C does)."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=workdir, env=job_env(), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=ATTEMPT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"snakemake did not finish in {ATTEMPT_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
    return code, log.read_text()


# ---------------------------------------------------------------------------------------------
# Faults

@dataclass
class Fault:
    target: str          # "finetune", "evaluate" or "snakemake"
    signum: int
    # When: `delay_s` after a target job (for "snakemake": a fine-tuning job) started or, with
    # after_checkpoints k > 0, after it saved the resume checkpoint of step k * checkpoint_every.
    after_checkpoints: int
    delay_s: float
    injected: dict = field(default_factory=dict)


def plan_faults(seed: int, full: bool) -> list[Fault]:
    """Fine-tuning and Snakemake faults in a random order, then the evaluation ones (those jobs come last)."""
    rng = random.Random(seed)
    per_target = 2 if full else 1
    signals = {"finetune": [signal.SIGKILL, signal.SIGTERM], "evaluate": [signal.SIGKILL, signal.SIGTERM],
               "snakemake": [signal.SIGKILL, signal.SIGTERM, signal.SIGINT]}

    def draw(target: str) -> list[Fault]:
        faults = []
        for signum in rng.sample(signals[target], per_target):
            # A fine-tuning job (demo: 60 steps, a checkpoint every 20, 1-3 s apart): during its start,
            # or within 1 s after its first or second checkpoint. An evaluation job: anywhere in its few seconds.
            after = rng.choice([0, 1, 2]) if target != "evaluate" else 0
            delay = rng.uniform(0.3, 4.0) if target == "evaluate" or after == 0 else rng.uniform(0.0, 1.0)
            faults.append(Fault(target, signum, after, round(delay, 2)))
        return faults

    early = draw("finetune") + draw("snakemake")
    rng.shuffle(early)
    return early + draw("evaluate")


def job_processes(root_pid: int, target: str) -> list[psutil.Process]:
    """The live python processes of the target's jobs under Snakemake (root_pid)."""
    module = "workflow_scripts.evaluate" if target == "evaluate" else "workflow_scripts.finetune"
    try:
        procs = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for proc in procs:
        try:
            if proc.cmdline()[1:3] == ["-m", module]:
                found.append(proc)
        except (psutil.Error, IndexError):
            continue
    return found


def arg(proc: psutil.Process, flag: str) -> str | None:
    cmd = proc.cmdline()
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


def ready_since(proc: psutil.Process, fault: Fault, workdir: Path, checkpoint_every: int) -> float | None:
    """Since when the job has been where the fault waits for it (started, or saved checkpoint k); None: not yet."""
    if fault.after_checkpoints == 0:
        return proc.create_time()
    resume_dir = workdir / arg(proc, "--resume-dir")
    wanted = resume_dir / f"state-{fault.after_checkpoints * checkpoint_every:09d}.json"
    try:  # (a checkpoint left by an earlier attempt counts from this job's start)
        return max(wanted.stat().st_mtime, proc.create_time())
    except FileNotFoundError:
        return None


def send(fault: Fault, proc: psutil.Process, snakemake: subprocess.Popen) -> str:
    """Signal the fault's victim; returns what was signalled."""
    if fault.target == "snakemake":
        if fault.signum == signal.SIGTERM:  # Snakemake's graceful stop: it waits for its running jobs
            os.kill(snakemake.pid, fault.signum)
            return "snakemake"
        os.killpg(snakemake.pid, fault.signum)  # a crash (SIGKILL) or Ctrl-C (SIGINT): Snakemake and its jobs
        return "snakemake's process group"
    parent = proc.parent()
    if fault.signum == signal.SIGTERM and parent is not None and "workflow_scripts.gpu_pool" in parent.cmdline():
        parent.send_signal(fault.signum)  # the job's own top process, which passes it on
        return "its gpu_pool"
    proc.send_signal(fault.signum)
    return "the job's python process"


def inject(fault: Fault, snakemake: subprocess.Popen, workdir: Path, checkpoint_every: int, started: float) -> bool:
    """Wait for the fault's moment in some target job and send its signal; False if Snakemake ended first."""
    while snakemake.poll() is None:
        for proc in job_processes(snakemake.pid, fault.target):
            try:
                since = ready_since(proc, fault, workdir, checkpoint_every)
                if since is None or time.time() - since < fault.delay_s:
                    continue
                job = arg(proc, "--model-out") or arg(proc, "--out")
                to = send(fault, proc, snakemake)
            except psutil.Error:
                continue  # it finished meanwhile: wait for another one
            fault.injected = {"at_s": round(time.monotonic() - started, 1), "job": job, "to": to}
            return True
        time.sleep(0.05)
    return False


def describe(fault: Fault) -> str:
    where, moment = fault.injected, (f"{fault.delay_s} s after its checkpoint {fault.after_checkpoints}"
                                     if fault.after_checkpoints else f"{fault.delay_s} s after it started")
    return (f"{signal.Signals(fault.signum).name} to {fault.target} ({where['to']}) while {where['job']} ran, "
            f"{moment}, {where['at_s']} s into the attempt")


def run_with_faults(workdir: Path, overlay: Path | None, faults: list[Fault], label: str) -> list[str]:
    """Run the demo, injecting each fault in turn (at most one per attempt) and rerunning until it completes."""
    cmd, attempts, pending = snakemake_cmd(overlay), [], list(faults)
    checkpoint_every = yaml.safe_load(DEMO_CONFIG.read_text())["protocol"]["checkpoint_every"]
    while len(attempts) < MAX_ATTEMPTS:
        log = workdir.parent / f"{label}-attempt{len(attempts) + 1}.log"
        proc, started = start(cmd, workdir, log), time.monotonic()
        fault = pending[0] if pending else None
        if fault is not None and inject(fault, proc, workdir, checkpoint_every, started):
            pending.pop(0)
        code, out = finish(proc, log)
        attempts.append(f"attempt {len(attempts) + 1}: exit {code}" + (f" after {describe(fault)}"
                                                                         if fault and fault.injected else ""))
        if code == 0 and not (fault and fault.injected):
            return attempts
        if "LockException" in out or "cannot be locked" in out:
            subprocess.run([*cmd, "--unlock"], cwd=workdir, env=job_env(), capture_output=True, check=True)
            attempts[-1] += " (locked: snakemake --unlock)"
    pytest.fail("the demo did not complete in {} attempts:\n{}".format(MAX_ATTEMPTS, "\n".join(attempts)))


# ---------------------------------------------------------------------------------------------
# Comparing two output trees

def volatile_fields(rel: str) -> set[str] | None:
    for pattern, fields in VOLATILE_FIELDS.items():
        if Path(rel).match(pattern) and len(Path(rel).parts) == len(Path(pattern).parts):
            return fields
    return None


def without(obj, fields: set[str]):
    if isinstance(obj, dict):
        return {k: without(v, fields) for k, v in obj.items() if k not in fields}
    if isinstance(obj, list):
        return [without(v, fields) for v in obj]
    return obj


def comparable(path: Path, fields: set[str]):
    if path.suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
        return [without(row, fields) for row in rows]
    return without(json.loads(path.read_text()), fields)


def output_files(root: Path) -> tuple[dict[str, Path], list[str]]:
    """{relative path: file} of the tree, minus NOT_COMPARED; and the atomic-write leftovers."""
    files, leftovers = {}, []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel.split("/")[0] in NOT_COMPARED:
            continue
        if ATOMIC_LEFTOVER.fullmatch(path.name):
            leftovers.append(rel)
            continue
        files[rel] = path
    return files, leftovers


def differences(reference: Path, candidate: Path) -> tuple[list[str], list[str], int]:
    """(what differs, atomic-write leftovers, files compared)."""
    ref_files, _ = output_files(reference)
    got_files, leftovers = output_files(candidate)
    problems = [f"missing: {rel}" for rel in sorted(set(ref_files) - set(got_files))]
    problems += [f"extra: {rel}" for rel in sorted(set(got_files) - set(ref_files))]
    for rel in sorted(set(ref_files) & set(got_files)):
        fields = volatile_fields(rel)
        a, b = ref_files[rel], got_files[rel]
        same = comparable(a, fields) == comparable(b, fields) if fields else a.read_bytes() == b.read_bytes()
        if not same:
            problems.append(f"differs: {rel}" + (f" (after removing {sorted(fields)})" if fields else ""))
    return problems, leftovers, len(ref_files)


# ---------------------------------------------------------------------------------------------
# The test

@pytest.mark.slow
def test_demo_survives_killed_jobs_and_snakemake(tmp_path):
    seed = int(os.environ.get("MIXER_CHAOS_SEED") or random.SystemRandom().randrange(10**6))
    faults = plan_faults(seed, FULL)
    print(f"\nchaos seed {seed} ({'full' if FULL else 'short'} form; replay: MIXER_CHAOS_SEED={seed})")
    overlay = None
    if not FULL:
        overlay = tmp_path / "short.yaml"
        overlay.write_text(yaml.safe_dump(SHORT_OVERLAY))
    workdir = tmp_path / "run"
    workdir.mkdir()
    # The uninterrupted run, in the same directory as the chaos run (paths in the records are the same).
    assert run_with_faults(workdir, overlay, [], "reference") == ["attempt 1: exit 0"]
    workdir.rename(tmp_path / "reference")
    workdir.mkdir()
    attempts = run_with_faults(workdir, overlay, faults, "chaos")
    injected = [f for f in faults if f.injected]
    print("\n".join(attempts))
    print(f"faults injected and survived: {len(injected)} of {len(faults)} planned")
    for n, fault in enumerate(injected, 1):
        print(f"  {n}. {describe(fault)}")

    root_name = yaml.safe_load(DEMO_CONFIG.read_text())["output_root"]
    for summary in sorted((workdir / root_name / "finetune").glob("*/*/*/summary.json")):
        if step := json.loads(summary.read_text())["resumed_from_step"]:
            print(f"  {summary.parent.relative_to(workdir / root_name)} resumed from step {step}")
    problems, leftovers, compared = differences(tmp_path / "reference" / root_name, workdir / root_name)
    if leftovers:
        print(f"leftovers of atomic writes cut short (not compared): {leftovers}")
    assert not problems, f"seed {seed}: the interrupted run's files differ:\n" + "\n".join(problems)
    assert compared > 20
    assert len(injected) >= (5 if FULL else 3), f"seed {seed}: only {len(injected)} faults injected"
    assert {f.target for f in injected} == {"finetune", "evaluate", "snakemake"}
    resume = workdir / root_name / ".resume"
    assert not list(resume.rglob("state-*.pt")) and not list(resume.rglob("state-*.json"))
    report = (workdir / root_name / "report" / "index.html").read_text()
    for summary in (workdir / root_name / "evaluate").glob("*/*.json"):
        assert f"{json.loads(summary.read_text())['top1_mean']:.2f}" in report, summary
