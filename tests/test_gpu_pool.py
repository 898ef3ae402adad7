"""The GPU lock pool, with a fake device count (no GPU needed)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workflow_scripts import gpu_pool
from workflow_scripts.common import PipelineError

REPO = Path(__file__).resolve().parents[1]

# A job that records which devices it saw and when it held them.
RECORDER = """
import json, os, sys, time
start = time.time()
time.sleep(float(sys.argv[2]))
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({"devices": os.environ["CUDA_VISIBLE_DEVICES"], "start": start, "end": time.time()}) + "\\n")
"""


def pool(*args: str, env_extra: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    env.pop("SLURM_JOB_ID", None)
    return subprocess.Popen([sys.executable, "-m", "workflow_scripts.gpu_pool", *args], env=env, **kw)


def test_concurrent_jobs_never_share_a_device(tmp_path):
    record = tmp_path / "record.jsonl"
    jobs = [
        pool("--gpus", "1", "--lock-dir", str(tmp_path / "locks"), "--",
             sys.executable, "-c", RECORDER, str(record), "0.6",
             env_extra={gpu_pool.DEVICE_COUNT_ENV: "2"}, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    logs = [job.communicate(timeout=60)[1] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0, 0, 0], logs
    runs = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(runs) == 4 and {r["devices"] for r in runs} <= {"0", "1"}
    for a in runs:
        for b in runs:
            if a is not b and a["devices"] == b["devices"]:
                assert a["end"] <= b["start"] or b["end"] <= a["start"], (a, b)
    # 4 jobs on 2 devices: someone had to wait, and said so in its log.
    assert any("waiting" in log for log in logs)


def test_killed_holder_frees_its_lock_and_its_child_stops(tmp_path):
    locks, pid_file = tmp_path / "locks", tmp_path / "child.pid"
    holder = pool("--gpus", "1", "--lock-dir", str(locks), "--", sys.executable, "-c",
                  f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)",
                  env_extra={gpu_pool.DEVICE_COUNT_ENV: "1"})
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and holder.poll() is None
        time.sleep(0.05)
    assert gpu_pool._try_lock(locks / "gpu0.lock") is None, "the device is free while its holder lives"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    start = time.monotonic()
    with gpu_pool.acquire(1, locks, 1, poll_s=0.05) as devices:
        assert devices == ["0"]
    assert time.monotonic() - start < 5
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and "zombie" not in _state(child):
        assert time.monotonic() < deadline, "the child outlived its killed pool process"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return "zombie"


def test_no_gpu_hides_devices_and_passes_the_exit_code(tmp_path):
    job = pool("--gpus", "0", "--lock-dir", str(tmp_path), "--", sys.executable, "-c",
               "import os, sys; sys.exit(7 if os.environ['CUDA_VISIBLE_DEVICES'] == '' else 1)")
    assert job.wait(timeout=60) == 7


def test_slurm_allocation_is_used_as_is(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), SLURM_JOB_ID="1", CUDA_VISIBLE_DEVICES="3",
               **{gpu_pool.DEVICE_COUNT_ENV: "0"})
    res = subprocess.run([sys.executable, "-m", "workflow_scripts.gpu_pool", "--gpus", "1", "--lock-dir",
                          str(tmp_path / "locks"), "--", sys.executable, "-c",
                          "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "3", res.stderr
    assert not (tmp_path / "locks").exists()
    # An allocation that sets no CUDA_VISIBLE_DEVICES is used as it is too: no locks on a shared filesystem.
    env.pop("CUDA_VISIBLE_DEVICES")
    res = subprocess.run([sys.executable, "-m", "workflow_scripts.gpu_pool", "--gpus", "1", "--lock-dir",
                          str(tmp_path / "locks"), "--", sys.executable, "-c", "print('ran')"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ran" in res.stdout, res.stderr
    assert not (tmp_path / "locks").exists()


def test_too_many_gpus_is_one_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="asks for 3 GPU.*has 2"):
        with gpu_pool.acquire(3, tmp_path, 2):
            pass


def test_multi_gpu_command_runs_under_torchrun():
    cmd = gpu_pool.torchrun_command(["python", "-m", "workflow_scripts.finetune", "--lr", "0.1"], 2)
    assert cmd == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "workflow_scripts.finetune", "--lr", "0.1"]
    with pytest.raises(PipelineError, match="python command"):
        gpu_pool.torchrun_command(["bash", "-c", "true"], 2)


def test_sigterm_is_forwarded_to_the_child(tmp_path):
    ready = tmp_path / "ready"
    job = pool("--gpus", "1", "--lock-dir", str(tmp_path / "locks"), "--", sys.executable, "-c",
               "import pathlib, signal, sys, time\n"
               "signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))\n"
               f"pathlib.Path({str(ready)!r}).touch()\n"
               "time.sleep(60)",
               env_extra={gpu_pool.DEVICE_COUNT_ENV: "1"})
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline and job.poll() is None
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=30) == 3
