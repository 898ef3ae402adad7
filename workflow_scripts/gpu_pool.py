"""Give a job its own GPU(s): per-device lock files, CUDA_VISIBLE_DEVICES, torchrun for several GPUs.

Snakemake's `--resources gpu=N` only limits how many GPU jobs run at once; it does not say which
device a job may use. Each GPU job therefore starts as

    python -m workflow_scripts.gpu_pool --gpus N --lock-dir DIR -- CMD...

which takes N per-device locks (fcntl.flock: the kernel frees them when the holder dies, so a killed
job never leaves a stale lock), sets CUDA_VISIBLE_DEVICES to those devices and runs CMD as a child
while holding them. N > 1 runs CMD under torchrun (DDP, one process per device). N = 0 hides all
GPUs. Under SLURM the allocation already chose the devices: it is used as it is.
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
from pathlib import Path
from typing import Iterator

from workflow_scripts.common import PipelineError, run_cli

DEVICE_COUNT_ENV = "MIXER_GPU_COUNT"  # overrides the detected device count (tests, odd machines)
_PR_SET_PDEATHSIG = 1


def visible_devices() -> list[str]:
    """The device ids this machine offers to the pool."""
    override = os.environ.get(DEVICE_COUNT_ENV)
    if override is not None:
        if not override.isdigit():
            raise PipelineError(f"environment variable {DEVICE_COUNT_ENV}={override!r} must be a device count")
        return [str(i) for i in range(int(override))]
    import torch

    count = torch.cuda.device_count()
    # torch numbers devices within an existing CUDA_VISIBLE_DEVICES; lock the real ids.
    already = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return already[:count] if already else [str(i) for i in range(count)]


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@contextlib.contextmanager
def acquire(n: int, lock_dir: str | os.PathLike, devices: list[str] | int,
            poll_s: float = 1.0) -> Iterator[list[str]]:
    """Hold the locks of n free devices (waiting while too few are free); yield their ids.

    `devices` is the list of device ids (or a count: ids 0..count-1). A partial set is released
    before waiting again, so two jobs that each need two devices cannot deadlock.
    """
    if isinstance(devices, int):
        devices = [str(i) for i in range(devices)]
    if n > len(devices):
        raise PipelineError(
            f"the job asks for {n} GPU(s) but this machine has {len(devices)}; lower "
            "resources.finetune.gpu (or resources.finetune_gpu_overrides) in the config")
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    waiting_since = None
    while True:
        held: dict[str, int] = {}
        for dev in devices:
            fd = _try_lock(lock_dir / f"gpu{dev}.lock")
            if fd is not None:
                held[dev] = fd
                if len(held) == n:
                    break
        if len(held) == n:
            break
        for fd in held.values():
            os.close(fd)
        if waiting_since is None:
            waiting_since = time.monotonic()
            print(f"gpu_pool: {len(devices)} device(s), fewer than {n} free; waiting for locks in "
                  f"{lock_dir}", file=sys.stderr, flush=True)
        time.sleep(poll_s)
    if waiting_since is not None:
        print(f"gpu_pool: got device(s) {','.join(held)} after {time.monotonic() - waiting_since:.0f} s",
              file=sys.stderr, flush=True)
    try:
        yield list(held)
    finally:
        for fd in held.values():
            os.close(fd)


def torchrun_command(cmd: list[str], nproc: int) -> list[str]:
    """`python -m mod args` or `python script.py args` -> the same under torchrun with nproc ranks."""
    if len(cmd) < 2 or "python" not in Path(cmd[0]).name:
        raise PipelineError(f"a multi-GPU job must be a python command to run under torchrun, got: {cmd}")
    return [cmd[0], "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *cmd[1:]]


def _die_with_parent() -> None:
    # If the pool process is SIGKILLed its locks free; the child must not keep using the device.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def run_child(cmd: list[str], env: dict[str, str]) -> int:
    """Run cmd, forwarding SIGTERM/SIGINT to it; return its exit code (128 + signal if killed)."""
    child = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)
    forward = lambda signum, _frame: child.send_signal(signum)  # noqa: E731
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = child.wait()
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, required=True, help="devices the job needs (0 = CPU only)")
    parser.add_argument("--lock-dir", required=True, help="folder of the per-device lock files")
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
    if os.environ.get("SLURM_JOB_ID"):
        # SLURM chose the devices; lock files on a shared filesystem would make jobs on different
        # nodes queue for each other. Without CUDA_VISIBLE_DEVICES the job's cgroup limits them.
        allocated = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if allocated and len(allocated) < args.gpus:
            raise PipelineError(f"the SLURM allocation has {len(allocated)} GPU(s) ({allocated}) but the job "
                                f"needs {args.gpus}; check the profile's gpu resource")
        return run_child(cmd, env)
    with acquire(args.gpus, args.lock_dir, visible_devices()) as devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        print(f"gpu_pool: CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}", file=sys.stderr, flush=True)
        return run_child(cmd, env)


if __name__ == "__main__":
    run_cli(main)
