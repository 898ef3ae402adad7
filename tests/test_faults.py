"""Faults a fine-tuning job survives: damaged resume files never block it, and a stop signal (SIGTERM,
SIGUSR1, Ctrl-C; one or two DDP processes) saves the update in progress; every rerun ends with the bytes
of an uninterrupted run. The tiny model and data come from tests/test_finetune.py."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_finetune import PROTOCOL, REPO, run_finetune, tiny  # noqa: F401 (tiny: a fixture)

from workflow_scripts import finetune, gpu_pool, resume_files
from workflow_scripts.common import sha256_file

STEPS = 120
# Checkpoints every 10 updates, no minival until the end: a stop lands between two checkpoints.
FAULT_PROTOCOL = dict(PROTOCOL, checkpoint_every=10, log_every=10, eval_every=STEPS)
FINGERPRINT = {"state_version": finetune.STATE_VERSION, "lr": 0.1}


# ---------------------------------------------------------------------------------------------
# resume_files on its own: the last two checkpoints, checksums, moving aside

def save_steps(folder: Path, steps, fingerprint=FINGERPRINT) -> None:
    for step in steps:
        resume_files.save(folder, step, {"step": step, "w": torch.full((3,), float(step))}, fingerprint)


def test_only_the_last_two_checkpoints_stay_each_with_its_checksum(tmp_path):
    save_steps(tmp_path, [10, 20, 30])
    assert resume_files.checkpoint_steps(tmp_path) == [30, 20]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "state-000000020.json", "state-000000020.pt", "state-000000030.json", "state-000000030.pt"]
    record = json.loads((tmp_path / "state-000000030.json").read_text())
    assert record == {"step": 30, "bytes": (tmp_path / "state-000000030.pt").stat().st_size,
                      "sha256": sha256_file(tmp_path / "state-000000030.pt"), "fingerprint": FINGERPRINT}
    step, state = resume_files.newest_usable(tmp_path, FINGERPRINT, "cpu")
    assert step == 30 and torch.equal(state["w"], torch.full((3,), 30.0))


def damage(path: Path, how: str) -> None:
    """What a full disk, a node crash or an older engine leaves behind."""
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "zero-byte":
        path.write_bytes(b"")
    elif how == "flipped-byte":  # same size: only the sha256 can tell
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
    elif how == "no-sidecar":
        path.with_suffix(".json").unlink()
    elif how == "wrong-version":
        sidecar = path.with_suffix(".json")
        record = json.loads(sidecar.read_text())
        record["fingerprint"]["state_version"] = finetune.STATE_VERSION - 1
        sidecar.write_text(json.dumps(record))
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(("how", "reason"), [("truncated", "corrupt"), ("zero-byte", "corrupt"),
                                             ("flipped-byte", "corrupt"), ("no-sidecar", "corrupt"),
                                             ("wrong-version", "old-version")])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_older_one_used(tmp_path, capsys, how, reason):
    save_steps(tmp_path, [10, 20])
    newest = tmp_path / "state-000000020.pt"
    damage(newest, how)
    step, state = resume_files.newest_usable(tmp_path, FINGERPRINT, "cpu")
    assert step == 10 and torch.equal(state["w"], torch.full((3,), 10.0))
    warning = capsys.readouterr().err
    assert f"resume file {newest} " in warning and f"state-000000020.pt.{reason}" in warning
    assert (tmp_path / f"state-000000020.pt.{reason}").exists()  # renamed, never deleted
    assert resume_files.checkpoint_steps(tmp_path) == [10]


def test_when_every_checkpoint_fails_the_run_starts_at_step_0(tmp_path, capsys):
    save_steps(tmp_path, [10, 20])
    damage(tmp_path / "state-000000020.pt", "zero-byte")
    save_steps(tmp_path / "other", [10])  # written by another run: another fingerprint
    (tmp_path / "state-000000010.json").write_text((tmp_path / "other" / "state-000000010.json").read_text()
                                                  .replace('"lr": 0.1', '"lr": 0.5'))
    (tmp_path / "state.pt").write_bytes(b"the single resume file of state version 2")
    assert resume_files.newest_usable(tmp_path, FINGERPRINT, "cpu") is None
    warnings = capsys.readouterr().err
    assert "state.pt was written by an earlier version" in warnings and "belongs to a different run" in warnings
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "state-000000010.json.other-run", "state-000000010.pt.other-run",
        "state-000000020.json.corrupt", "state-000000020.pt.corrupt", "state.pt.old-version"]


def test_moving_aside_never_overwrites_an_earlier_one(tmp_path):
    for n in range(3):
        (tmp_path / "state-000000010.pt").write_text(str(n))
        resume_files.move_aside(tmp_path / "state-000000010.pt", "corrupt")
    assert sorted(p.read_text() for p in tmp_path.iterdir()) == ["0", "1", "2"]
    assert (tmp_path / "state-000000010.pt.corrupt-3").read_text() == "2"


# ---------------------------------------------------------------------------------------------
# The fine-tuning CLI: stop signals and damaged files, against an uninterrupted run

def wait_for_checkpoints(proc: subprocess.Popen, resume_dir: Path, count: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while len(list(resume_dir.glob("state-*.json"))) < count:
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {count} checkpoints"
        assert time.monotonic() < deadline, f"no {count} checkpoints after {timeout} s"
        time.sleep(0.01)


def stop_with(proc: subprocess.Popen, signum: int) -> tuple[int, str]:
    proc.send_signal(signum)
    log = proc.communicate(timeout=300)[0]
    return proc.returncode, log


def stopped_step(log: str, signame: str) -> int:
    """The step the run says it stopped after (its message names the signal and the saved file)."""
    lines = [line for line in log.splitlines() if line.startswith(f"finetune: {signame}: stopped after step ")]
    assert len(lines) == 1, log  # one message: rank 0's
    step = int(lines[0].split("stopped after step ")[1].split()[0])
    assert str(resume_files.state_path(Path("resume"), step).name) in lines[0]
    return step


def run_outputs(out: Path) -> dict[str, str]:
    return {name: sha256_file(out / "run" / name) for name in ("model.safetensors", "metrics.jsonl")}


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("uninterrupted")
    code, log = run_finetune(tiny, out, steps=STEPS, protocol=FAULT_PROTOCOL)
    assert code == 0, log
    return run_outputs(out)


@pytest.fixture(scope="module")
def stopped(tiny, tmp_path_factory):  # noqa: F811
    """A run stopped by SIGTERM after its second checkpoint: its resume folder and the step it stopped at."""
    out = tmp_path_factory.mktemp("stopped")
    proc = run_finetune(tiny, out, steps=STEPS, protocol=FAULT_PROTOCOL, wait=False)
    wait_for_checkpoints(proc, out / "resume", 2)
    code, log = stop_with(proc, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, log
    step = stopped_step(log, "SIGTERM")
    assert not (out / "run").exists() and 20 <= step < STEPS
    # The checkpoint of the step it stopped at, and the one before it.
    older = step - 10 if step % 10 == 0 else step - step % 10
    assert resume_files.checkpoint_steps(out / "resume") == [step, older]
    return out, step, older


def rerun_from(tiny, tmp_path: Path, resume_dir: Path, how: str | None = None) -> tuple[dict, str]:  # noqa: F811
    """Copy resume_dir to tmp_path/resume, damage its newest checkpoint `how` (if given), rerun to the end."""
    shutil.copytree(resume_dir, tmp_path / "resume")
    if how:
        damage(resume_files.state_path(tmp_path / "resume", resume_files.checkpoint_steps(resume_dir)[0]), how)
    code, log = run_finetune(tiny, tmp_path, steps=STEPS, protocol=FAULT_PROTOCOL)
    assert code == 0, log
    return json.loads((tmp_path / "run" / "summary.json").read_text()), log


def test_sigterm_saves_the_current_step_and_the_rerun_gives_the_same_bytes(tiny, stopped, uninterrupted,  # noqa: F811
                                                                           tmp_path):
    out, step, _ = stopped
    summary, log = rerun_from(tiny, tmp_path, out / "resume")
    assert summary["resumed_from_step"] == step and f"resuming from step {step} " in log
    assert run_outputs(tmp_path) == uninterrupted
    assert resume_files.checkpoint_steps(tmp_path / "resume") == []  # done: the outputs hold everything


@pytest.mark.parametrize(("how", "reason"), [("truncated", "corrupt"), ("zero-byte", "corrupt"),
                                             ("wrong-version", "old-version")])
def test_a_damaged_resume_file_falls_back_to_the_older_checkpoint(tiny, stopped, uninterrupted, tmp_path,  # noqa: F811
                                                                  how, reason):
    out, step, older = stopped
    summary, log = rerun_from(tiny, tmp_path, out / "resume", how)
    newest = resume_files.state_path(tmp_path / "resume", step)
    assert f"resume file {newest} " in log and newest.with_name(f"{newest.name}.{reason}").exists(), log
    assert summary["resumed_from_step"] == older and f"resuming from step {older} " in log
    assert run_outputs(tmp_path) == uninterrupted


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGINT])
def test_sigusr1_and_ctrl_c_through_gpu_pool_stop_at_the_current_step(tiny, tmp_path, signum):  # noqa: F811
    """The job as the finetune rule starts it: gpu_pool (CPU: --gpus 0) passes the signal on."""
    proc = run_finetune(tiny, tmp_path, steps=STEPS, protocol=FAULT_PROTOCOL, wait=False,
                        prefix=[sys.executable, "-m", "workflow_scripts.gpu_pool", "--gpus", "0",
                              "--lock-dir", str(tmp_path / "locks"), "--"])
    wait_for_checkpoints(proc, tmp_path / "resume", 1)
    code, log = stop_with(proc, signum)
    assert code == 128 + signum, log
    step = stopped_step(log, signal.Signals(signum).name)
    assert resume_files.checkpoint_steps(tmp_path / "resume")[0] == step


def test_ddp_ranks_stop_after_the_same_update_and_resume_from_it(tiny, tmp_path):  # noqa: F811
    """SIGUSR1 to torchrun (as gpu_pool starts a 2-GPU job; here 2 CPU processes): torchrun passes it to both
    ranks, they agree on the step, rank 0 saves it; the resumed run ends with the uninterrupted run's bytes."""
    protocol = dict(FAULT_PROTOCOL, threads=2)
    code, log = run_finetune(tiny, tmp_path / "straight", steps=STEPS, protocol=protocol, ranks=2)
    assert code == 0, log
    proc = run_finetune(tiny, tmp_path / "stopped", steps=STEPS, protocol=protocol, ranks=2, wait=False)
    wait_for_checkpoints(proc, tmp_path / "stopped" / "resume", 1)
    code, log = stop_with(proc, signal.SIGUSR1)
    assert code != 0, log
    step = stopped_step(log, "SIGUSR1")
    assert resume_files.checkpoint_steps(tmp_path / "stopped" / "resume")[0] == step
    # The ranks exited cleanly (torchrun itself prints the SignalException it stops on).
    assert "finetune.py" not in log and "ChildFailedError" not in log, log
    code, log = run_finetune(tiny, tmp_path / "stopped", steps=STEPS, protocol=protocol, ranks=2)
    assert code == 0, log
    summary = json.loads((tmp_path / "stopped" / "run" / "summary.json").read_text())
    assert summary["resumed_from_step"] == step and summary["world_size"] == 2
    assert run_outputs(tmp_path / "stopped") == run_outputs(tmp_path / "straight")


@pytest.mark.parametrize("signum", gpu_pool.FORWARDED_SIGNALS)
def test_gpu_pool_passes_each_stop_signal_on(tmp_path, signum):
    ready = tmp_path / "ready"
    child = ("import pathlib, signal, sys, time\n"
             f"signal.signal({int(signum)}, lambda s, _: sys.exit(100 + s))\n"
             f"pathlib.Path({str(ready)!r}).touch()\n"
             "time.sleep(60)")
    job = subprocess.Popen([sys.executable, "-m", "workflow_scripts.gpu_pool", "--gpus", "0", "--lock-dir",
                            str(tmp_path / "locks"), "--", sys.executable, "-c", child],
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline and job.poll() is None
        time.sleep(0.02)
    job.send_signal(signum)
    assert job.wait(timeout=30) == 100 + signum
