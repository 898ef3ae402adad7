"""The GPU lock pool, with a fake device count and fake SLURM environments (no GPU needed)."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
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


def job_env(env_extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without what says which devices exist (SLURM_*, CUDA_VISIBLE_DEVICES: the
    user's, or the suite's "" from conftest): each test sets its own, with a fake device count."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "CUDA_VISIBLE_DEVICES"}
    env.update(PYTHONPATH=str(REPO), **(env_extra or {}))
    return env


def pool(*args: str, env_extra: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    env = job_env(env_extra)
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


def test_too_many_gpus_is_one_clear_error(tmp_path):
    with pytest.raises(PipelineError, match=r"asks for 3 GPU.*has 2 for the pool \(0,1;"):
        with gpu_pool.acquire(3, tmp_path, 2):
            pass


def test_multi_gpu_command_runs_under_torchrun():
    cmd = gpu_pool.torchrun_command(["python", "-m", "workflow_scripts.finetune", "--lr", "0.1"], 2)
    assert cmd == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout", "300",
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


# ---------------------------------------------------------------------------------------------
# Mixed 1- and 2-GPU jobs: no shared device, no deadlock, no starvation

# Takes n of `count` devices through acquire() and holds them hold_s, once for n > 1, else again and again
# until the stop file appears (a stream of 1-GPU jobs); records each hold.
HOLDER = """
import json, os, sys, time
from pathlib import Path
from workflow_scripts import gpu_pool
lock_dir, n, count, record, hold_s, stop = sys.argv[1:7]
deadline = time.monotonic() + 60
while True:
    with gpu_pool.acquire(int(n), lock_dir, int(count), poll_s=0.02) as devices:
        start = time.monotonic()
        time.sleep(float(hold_s))
        end = time.monotonic()
    with open(record, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "n": int(n), "devices": devices, "start": start, "end": end}) + "\\n")
    if int(n) > 1 or Path(stop).exists() or time.monotonic() > deadline:
        break
"""


def assert_no_device_shared(holds: list[dict]) -> None:
    by_device: dict[str, list[tuple[float, float]]] = {}
    for h in holds:
        assert len(set(h["devices"])) == h["n"] == len(h["devices"]), h
        for dev in h["devices"]:
            by_device.setdefault(dev, []).append((h["start"], h["end"]))
    for dev, spans in by_device.items():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert end <= start, f"device {dev} held twice at once"


def test_mixed_jobs_share_no_device_and_pairs_are_not_starved(tmp_path):
    """Three 1-GPU jobs keep 3 devices busy, retaking a device the moment they free one; two 2-GPU jobs that
    arrive meanwhile each get a pair within seconds (polling for two free devices at once would wait forever)."""
    record, stop, locks = tmp_path / "holds.jsonl", tmp_path / "stop", tmp_path / "locks"
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def job(n: int, hold_s: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", HOLDER, str(locks), str(n), "3", str(record), str(hold_s),
                                 str(stop)], env=env, stderr=subprocess.PIPE, text=True)

    singles = [job(1, 0.15) for _ in range(3)]
    pairs = []
    try:
        deadline = time.monotonic() + 30
        while not record.exists() or len(record.read_text().splitlines()) < 6:  # the stream is flowing
            assert time.monotonic() < deadline and all(p.poll() is None for p in singles)
            time.sleep(0.05)
        pairs_started = time.monotonic()
        pairs = [job(2, 0.3) for _ in range(2)]
        logs = [p.communicate(timeout=30)[1] for p in pairs]
        assert [p.returncode for p in pairs] == [0, 0], logs
        pairs_done = time.monotonic()
        time.sleep(0.5)  # the 1-GPU stream goes on after the pairs (nobody is left stuck)
        stop.touch()
        assert [p.wait(timeout=30) for p in singles] == [0, 0, 0]
    finally:
        for p in singles + pairs:
            if p.poll() is None:
                p.kill()
    holds = [json.loads(line) for line in record.read_text().splitlines()]
    assert_no_device_shared(holds)
    pair_holds = [h for h in holds if h["n"] == 2]
    assert len(pair_holds) == 2 and pairs_done - pairs_started < 20
    assert any(h["n"] == 1 and h["start"] > max(p["end"] for p in pair_holds) for h in holds)


def test_the_job_at_the_head_keeps_its_devices_and_goes_first(tmp_path):
    """A 2-GPU job holding device 1 and waiting for device 0 is served before a 1-GPU job that came later."""
    locks, record, stop = tmp_path / "locks", tmp_path / "holds.jsonl", tmp_path / "stop"
    stop.touch()  # the 1-GPU job below runs once
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def job(n: int, hold_s: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", HOLDER, str(locks), str(n), "2", str(record), str(hold_s),
                                 str(stop)], env=env, stderr=subprocess.PIPE, text=True)

    with gpu_pool.acquire(1, locks, 2, poll_s=0.02) as first:
        assert first == ["0"]
        pair = job(2, 0.3)
        deadline = time.monotonic() + 30
        while _free(locks / "gpu1.lock"):  # until the 2-GPU job has taken device 1
            assert time.monotonic() < deadline and pair.poll() is None
            time.sleep(0.05)
        single = job(1, 0.0)
        time.sleep(1.0)
        assert not record.exists() and single.poll() is None  # behind the pair, holding nothing
    logs = {name: p.communicate(timeout=30)[1] for name, p in (("pair", pair), ("single", single))}
    assert pair.returncode == single.returncode == 0, logs
    holds = {h["n"]: h for h in map(json.loads, record.read_text().splitlines())}
    assert holds[2]["devices"] == ["1", "0"] and holds[1]["start"] >= holds[2]["end"]
    assert "1 more of 2 device(s) needed" in logs["pair"] and "0 (pid " in logs["pair"]  # what it waits for, on whom
    assert "waiting behind it" in logs["single"]


def _free(path: Path) -> bool:
    fd = gpu_pool._try_lock(path)
    if fd is None:
        return False
    os.close(fd)
    return True


# ---------------------------------------------------------------------------------------------
# Which devices: CUDA_VISIBLE_DEVICES, the fake count, SLURM


def test_visible_devices_honour_cuda_visible_devices():
    count = gpu_pool.DEVICE_COUNT_ENV
    assert gpu_pool.visible_devices({count: "3"}) == ["0", "1", "2"]
    assert gpu_pool.visible_devices({count: "3", "CUDA_VISIBLE_DEVICES": "5,7"}) == ["5", "7"]
    assert gpu_pool.visible_devices({count: "1", "CUDA_VISIBLE_DEVICES": "5, 7"}) == ["5"]
    assert gpu_pool.visible_devices({count: "3", "CUDA_VISIBLE_DEVICES": ""}) == []
    with pytest.raises(PipelineError, match="MIXER_GPU_COUNT='two' must be a device count"):
        gpu_pool.visible_devices({count: "two"})


def test_jobs_only_get_devices_from_cuda_visible_devices(tmp_path):
    record, locks = tmp_path / "record.jsonl", tmp_path / "locks"
    jobs = [pool("--gpus", "1", "--lock-dir", str(locks), "--", sys.executable, "-c", RECORDER, str(record), "0.4",
                 env_extra={gpu_pool.DEVICE_COUNT_ENV: "3", "CUDA_VISIBLE_DEVICES": "5,7"},
                 stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    logs = [job.communicate(timeout=60)[1] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0, 0], logs
    runs = [json.loads(line) for line in record.read_text().splitlines()]
    assert {r["devices"] for r in runs} == {"5", "7"}
    assert_no_device_shared([{"n": 1, "devices": [r["devices"]], "start": r["start"], "end": r["end"]}
                             for r in runs])
    assert sorted(p.name for p in locks.glob("gpu*.lock")) == ["gpu5.lock", "gpu7.lock"]


SLURM_ENV = {"SLURM_JOB_ID": "77"}


def test_slurm_choice_of_devices(tmp_path):
    locks = tmp_path / "locks"
    # The SLURM executor: a job step with exactly the GPUs it asked for (renumbered from 0 by the cgroup).
    step = {**SLURM_ENV, "SLURM_JOB_GPUS": "2,3", "SLURM_STEP_GPUS": "3", "CUDA_VISIBLE_DEVICES": "0"}
    assert gpu_pool.choose_devices(1, locks, step) == (["0"], None)
    assert gpu_pool.choose_devices(2, locks, {**SLURM_ENV, "SLURM_JOB_GPUS": "2,3"}) == (["2", "3"], None)
    # Local jobs inside salloc / sbatch with more GPUs than one job needs: locks among the allocated ones.
    alloc = {**SLURM_ENV, "SLURM_JOB_GPUS": "2,3", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert gpu_pool.choose_devices(1, locks, alloc) == (["0", "1"], locks / "slurm-77")
    assert gpu_pool.choose_devices(1, locks, {**SLURM_ENV, "SLURM_STEP_GPUS": "4,6"}) == (["4", "6"],
                                                                                          locks / "slurm-77")
    with pytest.raises(PipelineError, match=r"SLURM allocation has 1 GPU\(s\) \(0\) but the job needs 2"):
        gpu_pool.choose_devices(2, locks, {**SLURM_ENV, "CUDA_VISIBLE_DEVICES": "0"})
    # SLURM names no GPUs (it does not manage them): the node's pool, as outside SLURM.
    fake = {gpu_pool.DEVICE_COUNT_ENV: "2"}
    assert gpu_pool.choose_devices(1, locks, {**SLURM_ENV, **fake}) == (["0", "1"], locks)
    assert gpu_pool.choose_devices(1, locks, fake) == (["0", "1"], locks)


def _run_pool(gpus: int, locks: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workflow_scripts.gpu_pool", "--gpus", str(gpus), "--lock-dir",
                           str(locks), "--", sys.executable, "-c",
                           "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES'))"],
                          env=job_env(env_extra), capture_output=True, text=True, timeout=60)


def test_slurm_allocation_of_exactly_the_job_is_used_as_is(tmp_path):
    locks = tmp_path / "locks"
    res = _run_pool(1, locks, {**SLURM_ENV, "SLURM_STEP_GPUS": "3", "CUDA_VISIBLE_DEVICES": "3",
                               gpu_pool.DEVICE_COUNT_ENV: "0"})
    assert res.returncode == 0 and res.stdout.strip() == "3", res.stderr
    assert "used as they are" in res.stderr and not locks.exists()
    res = _run_pool(2, locks, {**SLURM_ENV, "CUDA_VISIBLE_DEVICES": "0"})
    assert res.returncode == 2 and "allocation has 1 GPU(s) (0) but the job needs 2" in res.stderr


def test_local_jobs_inside_a_slurm_allocation_do_not_share_its_gpus(tmp_path):
    """salloc --gpus=2 (or sbatch), Snakemake running local 1-GPU jobs: each gets one of the two."""
    record, locks = tmp_path / "record.jsonl", tmp_path / "locks"
    alloc = {**SLURM_ENV, "SLURM_JOB_GPUS": "2,3", "CUDA_VISIBLE_DEVICES": "0,1"}
    jobs = [pool("--gpus", "1", "--lock-dir", str(locks), "--", sys.executable, "-c", RECORDER, str(record), "0.4",
                 env_extra=alloc, stderr=subprocess.PIPE, text=True)
            for _ in range(3)]
    logs = [job.communicate(timeout=60)[1] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0, 0], logs
    runs = [json.loads(line) for line in record.read_text().splitlines()]
    assert {r["devices"] for r in runs} == {"0", "1"}
    assert_no_device_shared([{"n": 1, "devices": [r["devices"]], "start": r["start"], "end": r["end"]}
                             for r in runs])
    assert sorted(p.name for p in (locks / "slurm-77").glob("gpu*.lock")) == ["gpu0.lock", "gpu1.lock"]


# ---------------------------------------------------------------------------------------------
# One node-wide folder, shared by users


def test_lock_folder_is_shared_and_kept_from_cleaners(tmp_path):
    locks = tmp_path / "node" / "locks"
    old_umask = os.umask(0o077)
    try:
        with gpu_pool.acquire(1, locks, 1) as devices:
            assert devices == ["0"]
            assert locks.stat().st_mode & 0o7777 == 0o1777
            assert (locks / "gpu0.lock").stat().st_mode & 0o777 == 0o666
            assert (locks / gpu_pool.QUEUE_LOCK).stat().st_mode & 0o777 == 0o666
            assert (locks / "gpu0.lock").read_text() == f"pid {os.getpid()} uid {os.getuid()}\n"
            folder = os.open(locks, os.O_RDONLY)
            try:  # held shared while the job runs: systemd-tmpfiles skips a locked folder
                with pytest.raises(BlockingIOError):
                    fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(folder)
    finally:
        os.umask(old_umask)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(PipelineError, match="gpu_lock_dir .*a_file/locks: cannot create it"):
        with gpu_pool.acquire(1, tmp_path / "a_file" / "locks", 1):
            pass


def test_a_lock_file_replaced_after_opening_is_not_trusted(tmp_path, monkeypatch):
    path = tmp_path / "gpu0.lock"
    stale = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    path.unlink()
    path.write_text("")  # a new file under the name: a later job would lock that one
    monkeypatch.setattr(gpu_pool, "_open_lock_file", lambda _path: stale)
    assert gpu_pool._try_lock(path) is None


USER_JOB = """
import sys
from workflow_scripts import gpu_pool
with gpu_pool.acquire(int(sys.argv[2]), sys.argv[1], 2, poll_s=0.02) as devices:
    print(",".join(devices), flush=True)
    sys.stdin.readline()
"""


def as_other_user(uid: int, python: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", python, *args],
                            preexec_fn=lambda: os.umask(0o022), text=True, **kw)


def package_for_everyone(base: Path) -> tuple[str, dict[str, str]]:
    """A copy of the pool's modules (stdlib only) that any user can read, and an interpreter any user can run:
    the checkout (and its .venv) may sit in a folder only its owner can enter (a clone in root's home)."""
    package = base / "pkg" / "workflow_scripts"
    package.mkdir(parents=True)
    for name in ("__init__.py", "common.py", "gpu_pool.py"):
        shutil.copyfile(REPO / "workflow_scripts" / name, package / name)
    for path in (base / "pkg", package, *package.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    env = dict(os.environ, PYTHONPATH=str(base / "pkg"))
    tried = []
    for python in dict.fromkeys([sys.executable, os.path.realpath(sys.executable), shutil.which("python3") or ""]):
        if python:
            probe = as_other_user(65534, python, "-c", "import workflow_scripts.gpu_pool", env=env, cwd=base,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            tried.append(f"{python}: {probe.communicate(timeout=60)[0].strip()[-300:]}")
            if probe.returncode == 0:
                return python, env
    pytest.skip("no Python interpreter that uid 65534 can run:\n" + "\n".join(tried))


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="runs jobs as two other users, which needs root and util-linux's setpriv")
def test_two_users_share_one_pool():
    base = Path(tempfile.mkdtemp(prefix="gpu-pool-users-", dir="/tmp"))
    os.chmod(base, 0o1777)  # stands for /tmp
    locks = base / "locks"
    jobs = []

    def as_user(uid: int, n: int) -> subprocess.Popen:
        job = as_other_user(uid, python, "-c", USER_JOB, str(locks), str(n), env=env, cwd=base,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        jobs.append(job)
        return job

    try:
        python, env = package_for_everyone(base)
        first = as_user(65534, 1)  # creates the folder and gpu0.lock
        assert first.stdout.readline().strip() == "0", first.stderr.read()
        second = as_user(4242, 1)  # opens the first user's gpu0.lock, finds it busy, creates gpu1.lock
        assert second.stdout.readline().strip() == "1", second.stderr.read()
        assert locks.stat().st_mode & 0o7777 == 0o1777 and locks.stat().st_uid == 65534
        for name, uid in (("gpu0.lock", 65534), ("gpu1.lock", 4242), (gpu_pool.QUEUE_LOCK, 65534)):
            assert ((locks / name).stat().st_uid, (locks / name).stat().st_mode & 0o777) == (uid, 0o666), name
        first.communicate("\n", timeout=30)
        second.communicate("\n", timeout=30)
        # Another user's lock file that predates world-writable files still locks (flock needs no write access).
        os.chmod(locks / "gpu0.lock", 0o644)
        both = as_user(4242, 2)
        assert both.stdout.readline().strip() == "0,1", both.stderr.read()
        both.communicate("\n", timeout=30)
        assert [j.returncode for j in jobs] == [0, 0, 0]
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
        shutil.rmtree(base)
