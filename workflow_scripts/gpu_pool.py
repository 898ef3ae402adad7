"""Give a job its own GPU(s): per-device lock files, CUDA_VISIBLE_DEVICES, torchrun for several GPUs.

Snakemake's `--resources gpu=N` only limits how many GPU jobs one run starts at once; it does not say which
device a job may use, and it knows nothing of other runs on the node. Each GPU job therefore starts as

    python -m workflow_scripts.gpu_pool --gpus N --lock-dir DIR -- CMD...

which takes N per-device locks, sets CUDA_VISIBLE_DEVICES to those devices and runs CMD as a child while
holding them. N > 1 runs CMD under torchrun (DDP, one process per device). N = 0 hides all GPUs.
SIGTERM, SIGINT and SIGUSR1 are passed on to CMD, and by torchrun to each rank (FORWARDED_SIGNALS), so a
fine-tuning job stopped by SLURM or Ctrl-C saves its state before it exits.

Locks: fcntl.flock on DIR/gpu<id>.lock; the kernel frees them when the holder dies, so a killed job never leaves
a stale lock. Jobs take turns through DIR/queue.lock: the job whose turn it is keeps the devices it got and waits
for the rest, while the jobs behind it wait without holding any device. So no two jobs each hold part of what
the other needs (no deadlock), and a 2-GPU job is not starved by 1-GPU jobs that come and go (while it waits, a
device it has already taken stays idle). The kernel wakes the jobs behind in no promised order.
DIR is node-wide (config gpu_lock_dir, /tmp/mixer-gpu-locks) so that every run on the node, the study, the demo
or another user's, draws from one pool. It is created world-writable with the sticky bit (like /tmp), its lock
files readable and writable by everyone; while a job holds devices it also holds a shared flock on DIR, which
tells systemd-tmpfiles not to age its files away (tmpfiles.d(5); python/cpython#81831).

Devices: the entries of CUDA_VISIBLE_DEVICES when it is set (the pool never hands out others), else 0..count-1;
count is torch's device count, or MIXER_GPU_COUNT (a fake count for tests; it trims CUDA_VISIBLE_DEVICES too).

SLURM (SLURM_JOB_ID set): the allocation's GPUs are CUDA_VISIBLE_DEVICES, or where it is not set
SLURM_STEP_GPUS / SLURM_JOB_GPUS. Exactly as many as the job asks for (the SLURM executor: one job per
allocation or job step): the job uses them as they are, without locks. More (Snakemake running local jobs inside
salloc or an sbatch script): the job locks among them, in DIR/slurm-<SLURM_JOB_ID>/ (allocations never share a
GPU, and SLURM's device cgroup may number each allocation's GPUs from 0). None named: SLURM does not manage the
GPUs, and the node's pool is used as outside SLURM.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from workflow_scripts.common import PipelineError, run_cli

DEVICE_COUNT_ENV = "MIXER_GPU_COUNT"  # overrides the detected device count (tests, odd machines)
QUEUE_LOCK = "queue.lock"
_PR_SET_PDEATHSIG = 1
# Passed on to the job, which stops cleanly on each (finetune: ends the update, saves it, exits 128 + signal):
# SIGTERM and SIGUSR1 are what SLURM sends before it kills or requeues a job, SIGINT is Ctrl-C.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# torchrun passes these on to its ranks (its default list lacks SIGUSR1, which would kill torchrun) and then
# waits this long for them to exit before it kills them: time to finish an update and save the state.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
TORCHRUN_SHUTDOWN_S = 300
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


def _ids(value: str) -> list[str]:
    return [d.strip() for d in value.split(",") if d.strip()]


def visible_devices(env: Mapping[str, str] | None = None) -> list[str]:
    """The device ids (CUDA_VISIBLE_DEVICES values) this machine offers to the pool."""
    env = os.environ if env is None else env
    override = env.get(DEVICE_COUNT_ENV)
    if override is not None:
        if not override.isdigit():
            raise PipelineError(f"environment variable {DEVICE_COUNT_ENV}={override!r} must be a device count")
        count = int(override)
    else:
        import torch

        count = torch.cuda.device_count()
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(i) for i in range(count)]
    # torch numbers the devices within CUDA_VISIBLE_DEVICES; hand out (and lock) the ids it names.
    return _ids(visible)[:count]


def slurm_devices(env: Mapping[str, str] | None = None) -> list[str] | None:
    """The GPUs of this SLURM job step or allocation; None outside SLURM or where SLURM names none."""
    env = os.environ if env is None else env
    if not env.get("SLURM_JOB_ID"):
        return None
    # CUDA_VISIBLE_DEVICES is what CUDA uses (renumbered from 0 under a device cgroup); the SLURM_*_GPUS lists
    # hold the node's ids, the step's first (a step inherits SLURM_JOB_GPUS from its allocation).
    for name in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if env.get(name) is not None:
            return _ids(env[name])
    return None


def choose_devices(n: int, lock_dir: str | os.PathLike,
                   env: Mapping[str, str] | None = None) -> tuple[list[str], Path | None]:
    """(devices to take n from, folder of their locks); no folder: use the devices as they are, unlocked."""
    allocated = slurm_devices(env)
    if allocated is None:
        return visible_devices(env), Path(lock_dir)
    if len(allocated) < n:
        raise PipelineError(
            f"the SLURM allocation has {len(allocated)} GPU(s) ({','.join(allocated) or 'none'}) but the job "
            f"needs {n}; check the profile's gpu resource, or run Snakemake in an allocation with at least {n}")
    if len(allocated) == n:
        return allocated, None
    env = os.environ if env is None else env
    return allocated, shared_dir(lock_dir) / f"slurm-{env['SLURM_JOB_ID']}"


# ---------------------------------------------------------------------------------------------
# Lock files in a folder that every user of the node shares


def shared_dir(path: str | os.PathLike) -> Path:
    """The lock folder, created like /tmp: anyone may add files, nobody may delete another's."""
    path = Path(path)
    if path.is_dir():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another job created it meanwhile
            path.mkdir()
            os.chmod(path, 0o1777)  # after mkdir: the umask would have narrowed mkdir's mode
    except OSError as e:
        raise PipelineError(f"gpu_lock_dir {path}: cannot create it ({e.strerror}); set gpu_lock_dir in the "
                            f"config to a folder that every user of this node can write") from None
    if not path.is_dir():
        raise PipelineError(f"gpu_lock_dir {path} is not a folder; set gpu_lock_dir in the config to a folder")
    return path


def _open_lock_file(path: Path) -> int:
    """An fd of the lock file, creating it readable and writable by every user."""
    with contextlib.suppress(FileExistsError, PermissionError):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o666)
        os.fchmod(fd, 0o666)  # the umask narrowed the mode; other users' jobs must open it too
        return fd
    # Opening an existing file without O_CREAT: fs.protected_regular refuses O_CREAT on another user's file
    # in a sticky folder. Read-only will do (another user's file from before it was world-writable): flock
    # needs no write access.
    for flags in (os.O_RDWR, os.O_RDONLY):
        try:
            return os.open(path, flags | _OPEN_FLAGS)
        except PermissionError as e:
            error = e
        except OSError as e:  # a symlink (O_NOFOLLOW), or gone again
            error = e
            break
    raise PipelineError(
        f"{path}: cannot create or open this GPU lock file as uid {os.getuid()} ({error.strerror}); make "
        f"{path.parent} writable by every user of the node (chmod 1777 {path.parent}) and its files by all "
        f"(chmod 666), or set gpu_lock_dir in the config to another folder")


def lock_path(lock_dir: Path, device: str) -> Path:
    return lock_dir / f"gpu{device.replace('/', '_')}.lock"  # MIG ids may hold slashes


def _try_lock(path: Path) -> int | None:
    """An fd holding the exclusive flock on path, or None while another process holds it."""
    fd = _open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Deleted or replaced since we opened it: the next job would lock the new file, not ours.
        if os.fstat(fd).st_ino != os.stat(path, follow_symlinks=False).st_ino:
            raise BlockingIOError
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        return None
    with contextlib.suppress(OSError):  # a read-only fd: the holder's pid is only a hint for the waiting
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} uid {os.getuid()}\n".encode(), 0)
    return fd


def _holders(lock_dir: Path, devices: list[str]) -> str:
    notes = []
    for dev in devices:
        with contextlib.suppress(OSError):
            notes.append(f"{dev} ({lock_path(lock_dir, dev).read_text().strip() or 'holder unknown'})")
    return ", ".join(notes)


@contextlib.contextmanager
def _turn(lock_dir: Path) -> Iterator[None]:
    """Hold the queue lock: one job at a time takes devices; the others wait behind it, holding none."""
    fd = _open_lock_file(lock_dir / QUEUE_LOCK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"gpu_pool: another job is taking or waiting for devices in {lock_dir}; waiting behind it",
                  file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _take(n: int, lock_dir: Path, devices: list[str], held: dict[str, int], poll_s: float) -> None:
    """Lock free devices into `held` until it has n, keeping those it has while it waits for the rest."""
    waiting_since = None
    while True:
        for dev in devices:
            if len(held) < n and dev not in held and (fd := _try_lock(lock_path(lock_dir, dev))) is not None:
                held[dev] = fd
        if len(held) == n:
            break
        if waiting_since is None:
            waiting_since = time.monotonic()
            busy = [d for d in devices if d not in held]
            print(f"gpu_pool: {n - len(held)} more of {len(devices)} device(s) needed, waiting for locks in "
                  f"{lock_dir}; held elsewhere: {_holders(lock_dir, busy)}", file=sys.stderr, flush=True)
        time.sleep(poll_s)
    if waiting_since is not None:
        print(f"gpu_pool: got device(s) {','.join(held)} after {time.monotonic() - waiting_since:.0f} s",
              file=sys.stderr, flush=True)


@contextlib.contextmanager
def acquire(n: int, lock_dir: str | os.PathLike, devices: list[str] | int,
            poll_s: float = 1.0) -> Iterator[list[str]]:
    """Hold the locks of n devices (waiting for its turn and then for enough free ones); yield their ids.

    `devices` is the list of device ids (or a count: ids 0..count-1).
    """
    if isinstance(devices, int):
        devices = [str(i) for i in range(devices)]
    if n > len(devices):
        offered = ",".join(devices) or "none"
        raise PipelineError(
            f"the job asks for {n} GPU(s) but this machine has {len(devices)} for the pool ({offered}; those in "
            f"CUDA_VISIBLE_DEVICES where it is set); lower resources.finetune.gpu (or "
            f"resources.finetune_gpu_overrides) in the config")
    lock_dir = shared_dir(lock_dir)
    held: dict[str, int] = {}
    folder = os.open(lock_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(folder, fcntl.LOCK_SH)  # systemd-tmpfiles leaves a locked folder's files alone
        with _turn(lock_dir):
            _take(n, lock_dir, devices, held, poll_s)
        yield list(held)
    finally:
        for fd in held.values():
            os.close(fd)
        os.close(folder)


# ---------------------------------------------------------------------------------------------
# Running the job


def torchrun_command(cmd: list[str], nproc: int) -> list[str]:
    """`python -m mod args` or `python script.py args` -> the same under torchrun with nproc ranks."""
    if len(cmd) < 2 or "python" not in Path(cmd[0]).name:
        raise PipelineError(f"a multi-GPU job must be a python command to run under torchrun, got: {cmd}")
    return [cmd[0], "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "--signals-to-handle", TORCHRUN_SIGNALS, "--shutdown-timeout", str(TORCHRUN_SHUTDOWN_S), *cmd[1:]]


def _die_with_parent() -> None:
    # If the pool process is SIGKILLed its locks free; the child must not keep using the device.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def run_child(cmd: list[str], env: dict[str, str]) -> int:
    """Run cmd, forwarding FORWARDED_SIGNALS to it; return its exit code (128 + signal if killed)."""
    child = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)
    forwarded = []

    def forward(signum: int, _frame) -> None:
        forwarded.append(signum)
        child.send_signal(signum)

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    code = child.wait()
    code = 128 - code if code < 0 else code
    if forwarded:  # torchrun prints the exception it stops on: say what happened
        print(f"gpu_pool: passed {signal.Signals(forwarded[0]).name} on to the job, which exited with {code}",
              file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, required=True, help="devices the job needs (0 = CPU only)")
    parser.add_argument("--lock-dir", required=True, help="node-wide folder of the per-device lock files")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise PipelineError("gpu_pool: no command given; usage: gpu_pool --gpus N --lock-dir DIR -- CMD...")
    if args.gpus < 0:
        raise PipelineError(f"--gpus {args.gpus}: must be 0 or more")
    env = dict(os.environ)
    if args.gpus == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""
        return run_child(cmd, env)
    if args.gpus > 1:
        cmd = torchrun_command(cmd, args.gpus)
    devices, lock_dir = choose_devices(args.gpus, args.lock_dir)
    if lock_dir is None:
        print(f"gpu_pool: the SLURM allocation's GPU(s) {','.join(devices)} are this job's; used as they are",
              file=sys.stderr, flush=True)
        return run_child(cmd, env)
    with acquire(args.gpus, lock_dir, devices) as held:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(held)
        print(f"gpu_pool: CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}", file=sys.stderr, flush=True)
        return run_child(cmd, env)


if __name__ == "__main__":
    run_cli(main)
