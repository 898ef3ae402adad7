"""Fine-tune a converted Mixer with the paper's protocol; resumable, DDP when started by torchrun.

    python -m workflow_scripts.finetune --checkpoint R/converted/CKPT.safetensors \
        --data D/DATASET/dataset.json --model-out RUN/model.safetensors --metrics-out RUN/metrics.jsonl \
        --summary-out RUN/summary.json --resume-dir RESUME_DIR \
        --lr 0.03 --seed 0 --steps 10000 --protocol '{...config protocol block...}' --threads 8 [--attempt N]

Protocol (the config's protocol block, `protocol.Protocol`; google-research/vision_transformer
vit_jax/train.py): momentum SGD, a new zero-initialised head, effective batch `batch_size` reached by
accumulating micro-batches, the accumulated gradient clipped to global norm `grad_clip_norm`, linear
warmup then cosine decay to 0 (`lr_at`). Training uses the train split minus minival; each step's
samples and augmentation seeds are a pure function of (seed, step), so a resumed or multi-GPU run
sees exactly the same data.

Writes exactly the three files named on the command line (docs/design.md), all at the end.
Every `checkpoint_every` steps the full training state goes to RESUME_DIR (`resume_files`: the last two
checkpoints, each with its sha256), which is not a Snakemake output (Snakemake deletes the outputs of a
failed job); a rerun continues from the newest intact one. SIGTERM, SIGUSR1 (SLURM's notice before it
kills or requeues a job) and SIGINT (Ctrl-C) end the update in progress, save a checkpoint of it and exit
with 128 + the signal's number, so that Snakemake reruns or SLURM requeues the job and nothing is lost.

A failure that a retry cannot fix (out of device memory, NaN/inf) exits with code 3 (NOT_RETRYABLE_EXIT)
and is recorded in RESUME_DIR/failed.json; Snakemake's retry of the job (--attempt > 1, same arguments)
then stops at once with the same message instead of running into it again.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from workflow_scripts import data, evaluate, model_io, resume_files, splits
from workflow_scripts.common import PipelineError, atomic_path, json_arg, read_json, run_cli, sha256_file, write_json
from workflow_scripts.devices import autocast_context, is_out_of_memory, precision_name
from workflow_scripts.protocol import AUTO, Protocol

# Minival during fine-tuning uses the official code's evaluation preprocessing (plain resize).
MINIVAL_PROTOCOL = {"name": "official", "resize": "direct"}  # by-hand default; the workflow passes its headline
MINIVAL_KEYS = ("minival_top1", "minival_top5", "minival_loss")
# Part of the resume fingerprint: resume state written by an engine with another schedule or state
# layout is moved aside, not resumed from. 3: checkpoints with sha256 sidecars (resume_files).
STATE_VERSION = 3
# What SLURM sends before it kills or requeues a job (sbatch --signal, preemption) and Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


# ---------------------------------------------------------------------------------------------
# The protocol's pieces (pure functions the tests check one by one)

def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int) -> float:
    """Learning rate of update `step` (1..total_steps), exactly as the official code applies its schedule.

    vit_jax/train.py gives lr_fn = utils.create_learning_rate_schedule(total_steps, base_lr, "cosine",
    warmup_steps) to optax.sgd, and optax evaluates a schedule at its update count, which starts at 0
    (google-deepmind/optax optax/_src/transform.py, scale_by_schedule): update k uses lr_fn(k - 1).
    So update 1 has learning rate 0 and the last update lr_fn(total - 1), just above 0. With
    s = step - 1 (vit_jax/utils.py create_learning_rate_schedule):

        progress = clip((s - warmup) / (total - warmup), 0, 1)
        lr = base * 0.5 * (1 + cos(pi * progress)) * min(1, s / warmup)    (no warmup factor if warmup = 0)
    """
    s = step - 1
    progress = min(max((s - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
    lr = base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if warmup_steps:
        lr *= min(1.0, s / warmup_steps)
    return lr


def zero_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the classifier by a zero-initialised one for `num_classes` (ViT/Mixer fine-tuning)."""
    model.reset_classifier(num_classes)
    nn.init.zeros_(model.head.weight)
    nn.init.zeros_(model.head.bias)
    return model


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, train_size: int) -> np.ndarray:
    return np.random.default_rng([seed, 0, epoch]).permutation(train_size)


def step_plan(seed: int, step: int, train_size: int, batch_size: int,
              micro_batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The micro-batches of update `step` (1-based): (indices into the training split, aug seeds).

    A pure function of (seed, step): samples are read epoch after epoch, each epoch in a seeded
    random order, so any step can be rebuilt without replaying the ones before it.
    """
    positions = np.arange((step - 1) * batch_size, step * batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(positions, train_size)
    indices = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        chosen = epochs == epoch
        indices[chosen] = _epoch_order(seed, int(epoch), train_size)[offsets[chosen]]
    aug_seeds = np.random.default_rng([seed, 1, step]).integers(0, 2**31, size=batch_size, dtype=np.int64)
    return [(indices[i:i + micro_batch_size], aug_seeds[i:i + micro_batch_size])
            for i in range(0, batch_size, micro_batch_size)]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator, num_micro: int,
               lr: float, grad_clip_norm: float, loss_scale: float,
               autocast: contextlib.AbstractContextManager) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer update from `num_micro` micro-batches; returns (summed loss, gradient norm) as tensors.

    Each micro-batch's summed loss is scaled by loss_scale (world_size / batch_size), so the
    accumulated (and, under DDP, averaged) gradient is the mean over the full batch whatever the
    micro-batch size. Nothing here waits for the device: the caller reads the tensors when it logs.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=next(model.parameters()).device)
    for i in range(num_micro):
        images, labels = next(batches)
        # Under DDP, all-reduce the gradients once per update, on the last micro-batch.
        sync = not isinstance(model, DistributedDataParallel) or i == num_micro - 1
        with contextlib.nullcontext() if sync else model.no_sync():
            with autocast:
                logits = model(images)
            loss = F.cross_entropy(logits.float(), labels, reduction="sum")
            (loss * loss_scale).backward()
        loss_sum += loss.detach()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


# ---------------------------------------------------------------------------------------------
# Setup: the process, the data, the model

@dataclass(frozen=True)
class Outputs:
    """The three files a run writes, all at the end (the finetune rule's outputs)."""

    model: Path
    metrics: Path
    summary: Path


@dataclass(frozen=True)
class Process:
    """This process's share of the job: its DDP rank among world_size (torchrun's env) and its device."""

    rank: int
    world_size: int
    device: torch.device
    cpus: int  # this process's share of the job's CPUs (torch threads; "auto" data workers follow it)


def world_size_of_job() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_process(protocol: Protocol, seed: int, threads: int) -> Process:
    """Device, DDP process group (nccl on CUDA, gloo on CPU), CPU threads, determinism, torch seed."""
    world_size, rank = world_size_of_job(), int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        # An explicit timeout (NCCL's default is 10 min) well above the longest time the other ranks wait for
        # rank 0 (minival, writing the resume state to a slow shared filesystem).
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=protocol.ddp_timeout_min))
    cpus = max(1, (protocol.threads or threads) // world_size)
    torch.set_num_threads(cpus)
    if protocol.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(seed)
    return Process(rank, world_size, device, cpus)


def device_names(device: torch.device, world_size: int) -> list[str]:
    if device.type == "cuda":
        return [torch.cuda.get_device_name(i) for i in range(min(world_size, torch.cuda.device_count()))]
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return [line.split(":", 1)[1].strip()]
    return [platform.processor() or platform.machine()]


def training_batches(split: splits.Split, protocol: Protocol, image_size: int, seed: int, first_step: int,
                     steps: int, process: Process) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's augmented micro-batches of updates first_step..steps, on its device: rank r takes
    micro-batches r, r + world_size, ... of each update's step_plan."""
    def plan() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for step in range(first_step, steps + 1):
            micro_batches = step_plan(seed, step, len(split), protocol.batch_size, protocol.micro_batch_size)
            yield from micro_batches[process.rank::process.world_size]

    augment = data.TrainAugment(image_size, protocol.inception_crop, protocol.inception_crop_min_area,
                                protocol.random_flip, protocol.pixel_mean, protocol.pixel_std)
    workers = data.resolve_num_workers(protocol.num_workers, process.cpus)
    loader = data.train_loader(split, augment, plan(), process.device, workers, protocol.decode_device)
    return data.TimedBatches(loader)  # the log says when the loader, not the model, is the bottleneck


def minival_loader(split: splits.Split, protocol: Protocol, image_size: int, process: Process,
                   minival_protocol: dict):
    workers = data.resolve_num_workers(protocol.num_workers, process.cpus)
    return data.eval_loader(split, minival_protocol, image_size, protocol.micro_batch_size, process.device,
                            workers, protocol.pixel_mean, protocol.pixel_std, protocol.decode_device)


def model_and_optimizer(checkpoint: str | os.PathLike, num_classes: int, protocol: Protocol,
                        device: torch.device) -> tuple[nn.Module, dict, torch.optim.Optimizer]:
    """The checkpoint with a zero head for `num_classes`, its architecture record, and momentum SGD."""
    architecture = dict(model_io.read_architecture(checkpoint), num_classes=num_classes)
    model = zero_head(model_io.load_model(checkpoint), num_classes).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=protocol.momentum,
                                weight_decay=protocol.weight_decay)
    return model, architecture, optimizer


def data_parallel(model: nn.Module, process: Process) -> nn.Module:
    if process.world_size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[process.device.index] if process.device.type == "cuda" else None)


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# The run's records: metrics, timings, the interval meter, the NaN/inf check

@dataclass
class RunState:
    """What the run has recorded so far; a resumed run starts from the saved one."""

    start_step: int          # updates already done when this process started (0 unless resumed)
    metrics: list[dict]      # the lines of metrics.jsonl: no wall-clock values (byte-identical reruns)
    timings: list[dict]      # one {"step", "img_s", "elapsed_s"} per training line (summary.json)
    elapsed_before: float    # training seconds of the attempts before a resume
    started_utc: str
    interval: dict | None = None  # the open logging interval at a stop between two lines (IntervalMeter)


class IntervalMeter:
    """The updates since the last training line: loss and gradient-norm sums and the first non-finite
    step, kept on the device (read only when logging: no per-update host sync); and the wall clock."""

    def __init__(self, device: torch.device, steps: int, start_step: int):
        self.loss, self.grad_norm = torch.zeros((), device=device), torch.zeros((), device=device)
        self.first_bad_step = torch.full((), steps + 1, dtype=torch.int64, device=device)
        self.steps, self.last_step, self.images = steps, start_step, 0
        self.images_before = 0  # of the open interval, before a resume: in the mean loss, not in images/s
        self.loop_start = self.last_log = time.perf_counter()
        self.eval_seconds = 0.0

    def add(self, step: int, loss_sum: torch.Tensor, grad_norm: torch.Tensor, images: int) -> None:
        self.loss += loss_sum
        self.grad_norm += grad_norm
        finite = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
        self.first_bad_step = torch.where(finite, self.first_bad_step, self.first_bad_step.clamp(max=step))
        self.images += images

    def check_finite(self, world_size: int, base_lr: float) -> None:
        bad = self.first_bad_step.clone()
        if world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        if bad.item() <= self.steps:
            raise NotRetryable(f"the loss or gradient became NaN/inf at step {bad.item()} "
                               f"(lr {base_lr}); lower the learning rate or check the data")

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (minival) out of the training throughput."""
        self.eval_seconds += seconds
        self.last_log += seconds

    def seconds(self) -> float:
        return time.perf_counter() - self.loop_start

    def read(self, step: int, world_size: int) -> tuple[float, float, float]:
        """(mean loss per image, mean gradient norm per update, images/s) since the last read; resets."""
        if world_size > 1:
            dist.all_reduce(self.loss)
        now = time.perf_counter()
        result = (self.loss.item() / (self.images_before + self.images),
                  self.grad_norm.item() / (step - self.last_step), self.images / (now - self.last_log))
        self.loss.zero_()
        self.grad_norm.zero_()
        self.images, self.images_before, self.last_step, self.last_log = 0, 0, step, now
        return result

    def interval_state(self, world_size: int) -> dict:
        """The open interval's sums, for a checkpoint between two training lines (all ranks call it: each
        rank's loss sum is kept, as they are added up only when the line is logged)."""
        losses = [self.loss]
        if world_size > 1:
            losses = [torch.zeros_like(self.loss) for _ in range(world_size)]
            dist.all_gather(losses, self.loss)
        return {"loss": [loss.cpu() for loss in losses], "grad_norm": self.grad_norm.cpu(),
                "last_step": self.last_step, "images": self.images_before + self.images}

    def restore_interval(self, interval: dict | None, rank: int) -> None:
        """Continue the interval a resumed checkpoint was saved in: the next line equals an uninterrupted run's."""
        if interval is not None:
            self.loss.copy_(interval["loss"][rank])
            self.grad_norm.copy_(interval["grad_norm"])
            self.last_step, self.images_before = interval["last_step"], interval["images"]


def print_line(line: dict) -> None:
    """One JSON line in the job log (above the progress bar)."""
    tqdm.write(json.dumps(line), file=sys.stdout)
    sys.stdout.flush()


def log_training(run: RunState, meter: IntervalMeter, step: int, lr: float, process: Process,
                 progress: tqdm, batches: data.TimedBatches) -> None:
    loss, grad_norm, img_s = meter.read(step, process.world_size)
    line = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm}
    loader = batches.take()  # wall-clock time waiting for batches vs in the step: a timing, not a metric
    timing = {"step": step, "img_s": img_s, "elapsed_s": run.elapsed_before + meter.seconds(), **loader}
    run.metrics.append(line)
    run.timings.append(timing)
    if process.rank == 0:
        print_line({**line, **timing})
        progress.set_postfix(loss=f"{loss:.4f}")
        note = data.loader_bottleneck_note(loader)
        if note:
            print(f"finetune: step {step}: {note}", file=sys.stderr, flush=True)


def log_minival(run: RunState, meter: IntervalMeter, step: int, model: nn.Module, loader, num_classes: int,
                device: torch.device, precision: str) -> None:
    """Minival top-1/top-5/loss of the model now (the body in the training precision, the head in fp32:
    evaluate.fp32_logits); rank 0 only."""
    start = time.perf_counter()
    result = evaluate.evaluate_model(model, loader, num_classes, device, precision)
    model.train()
    line = {"step": step, "minival_top1": result["top1"], "minival_top5": result["top5"],
            "minival_loss": result["loss"]}
    run.metrics.append(line)
    print_line(line)
    meter.exclude(time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Resume state

def run_fingerprint(checkpoint: str | os.PathLike, dataset_record: dict, train_size: int, lr: float,
                    seed: int, steps: int, protocol: Protocol) -> dict:
    """What decides the result; resume state with another fingerprint belongs to another run (or code version)."""
    return {"state_version": STATE_VERSION, "checkpoint_sha256": sha256_file(checkpoint),
            "dataset": dataset_record["name"], "train_size": train_size, "lr": lr, "seed": seed,
            "steps": steps, "protocol": protocol.fingerprint()}


def load_state(resume_dir: Path, fingerprint: dict, process: Process) -> dict | None:
    """The newest usable saved state of this run, the same one on every rank; None: start at step 0.

    Rank 0 checks the checkpoints and moves failing ones aside (resume_files.newest_usable); the other
    ranks then load the step it chose. Into host memory: restoring copies the weights and momentum onto
    the device, so the device never holds a second copy of them (0.24 GB for B/16, 0.83 GB for L/16, with
    the momentum as much again).
    """
    host = torch.device("cpu")
    found = resume_files.newest_usable(resume_dir, fingerprint, host) if process.rank == 0 else None
    if process.world_size == 1:
        return found[1] if found else None
    chosen = [found[0] if found else None]
    dist.broadcast_object_list(chosen, src=0)
    if chosen[0] is None:
        return None
    return found[1] if process.rank == 0 else resume_files.load(resume_dir, chosen[0], host)


def resume(resume_dir: Path, fingerprint: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
           process: Process, started_utc: str) -> RunState:
    """The saved state of this run, loaded into model and optimizer; a fresh RunState without one.
    Of the loaded tensors only those the optimizer adopts (its momentum, on the CPU) outlive this call."""
    state = load_state(resume_dir, fingerprint, process)
    if state is None:
        return RunState(0, [], [], 0.0, started_utc)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    restore_rng(state["rng"])
    if process.rank == 0:
        path = resume_files.state_path(resume_dir, state["step"])
        print(f"finetune: resuming from step {state['step']} ({path})", file=sys.stderr, flush=True)
    return RunState(state["step"], state["metrics"], state["timings"], state["elapsed_s"], state["started_utc"],
                    state["interval"])


def save_checkpoint(resume_dir: Path, fingerprint: dict, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, run: RunState, meter: IntervalMeter, interval: dict) -> Path:
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(),
             "metrics": run.metrics, "timings": run.timings, "elapsed_s": run.elapsed_before + meter.seconds(),
             "started_utc": run.started_utc, "interval": interval}
    return resume_files.save(resume_dir, step, state, fingerprint)


def rng_state() -> dict:
    """The CPU generator and, on CUDA, the generator of the run's own device (the current one, which
    setup_process set) only: a state of every visible device could not be restored where fewer are
    visible (a resume through gpu_pool with other devices, or with another GPU count)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    """rng_state's generators, the CUDA one into the current device (a run saved on the CPU, or on CUDA
    and resumed on the CPU, has none to restore)."""
    torch.set_rng_state(state["torch"].cpu())
    if isinstance(state.get("cuda"), torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def save_resume_state(resume_dir: Path, fingerprint: dict, step: int, model: nn.Module,
                      optimizer: torch.optim.Optimizer, run: RunState, meter: IntervalMeter, process: Process,
                      base_lr: float) -> None:
    """Checkpoint after `step` (rank 0; every rank takes part), never of a NaN/inf state."""
    meter.check_finite(process.world_size, base_lr)
    interval = meter.interval_state(process.world_size)
    if process.rank == 0:
        save_checkpoint(resume_dir, fingerprint, step, model, optimizer, run, meter, interval)


# ---------------------------------------------------------------------------------------------
# Stopping on a signal: finish the update, save it, exit non-zero

class StoppedBySignal(Exception):
    """The run saved its state after `step` on a stop signal; the process exits with 128 + signum."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum, self.step = signum, step


class StopRequest:
    """Notes SIGTERM, SIGUSR1 and SIGINT instead of dying at once (the loop asks after each update).

    Under DDP the ranks get a signal at different moments (torchrun forwards it to each in turn), so
    `requested` all-reduces the flag (MAX) every update: all ranks stop after the same one. It runs on a
    CPU (gloo) group, so it never waits for the GPU; it costs one small loopback message per update.
    """

    def __init__(self, process: Process):
        self.signum, self.world_size, self.group = 0, process.world_size, None
        if process.world_size > 1 and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")  # collective: every rank creates it here
        self.previous = {signum: signal.signal(signum, self._note) for signum in STOP_SIGNALS}

    def _note(self, signum: int, _frame) -> None:
        self.signum = self.signum or signum  # later signals (SLURM repeats SIGTERM) change nothing

    def requested(self) -> int:
        """The stop signal's number if any rank got one (the same answer on every rank), else 0."""
        if self.world_size == 1:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())

    def finish(self, signum: int, step: int, steps: int, resume_dir: Path, process: Process) -> None:
        """After the state of `step` is saved: every rank waits for rank 0's save, then raises StoppedBySignal."""
        if self.world_size > 1:
            dist.barrier(group=self.group)
            dist.destroy_process_group()
        if process.rank == 0:  # tqdm.write: on a line of its own, above the progress bar
            tqdm.write(f"finetune: {signal.Signals(signum).name}: stopped after step {step} of {steps}; its state is "
                       f"in {resume_files.state_path(resume_dir, step)}; rerun the job to continue from there",
                       file=sys.stderr)
        raise StoppedBySignal(signum, step)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


# ---------------------------------------------------------------------------------------------
# The end: summary and outputs

def run_summary(checkpoint: str | os.PathLike, dataset_record: dict, lr: float, seed: int, steps: int,
                protocol: Protocol, process: Process, run: RunState, meter: IntervalMeter, train_on: str,
                micro_batch_from: str = "protocol.micro_batch_size") -> dict:
    """summary.json: the run's record, with its timings (metrics.jsonl has none)."""
    loop_seconds = meter.seconds()
    # The last line is the final minival; a run on the full training data has none.
    final = run.metrics[-1] if "minival_top1" in run.metrics[-1] else dict.fromkeys(MINIVAL_KEYS)
    return {
        "checkpoint": Path(checkpoint).name.removesuffix(".safetensors"), "dataset": dataset_record["name"],
        "lr": lr, "seed": seed, "steps": steps, "batch_size": protocol.batch_size,
        "micro_batch_size": protocol.micro_batch_size, "micro_batch_from": micro_batch_from,
        "world_size": process.world_size,
        "device": process.device.type, "device_names": device_names(process.device, process.world_size),
        "precision": precision_name(protocol.precision, process.device), "inception_crop": protocol.inception_crop,
        "minival_top1": final["minival_top1"], "minival_top5": final["minival_top5"],
        "minival_loss": final["minival_loss"], "train_seconds": run.elapsed_before + loop_seconds,
        "img_s": (steps - run.start_step) * protocol.batch_size / max(loop_seconds - meter.eval_seconds, 1e-9),
        "resumed_from_step": run.start_step or None, "protocol": protocol.as_dict(), "train_on": train_on,
        "started_utc": run.started_utc, "finished_utc": utc_now(), "timings": run.timings,
    }


def write_outputs(outputs: Outputs, model: nn.Module, architecture: dict, metrics: list[dict],
                  summary: dict) -> None:
    model_io.save_model(model, architecture, outputs.model)  # atomic itself, byte-deterministic
    with atomic_path(outputs.metrics) as tmp:
        tmp.write_text("".join(json.dumps(m) + "\n" for m in metrics))
    write_json(outputs.summary, summary)


# ---------------------------------------------------------------------------------------------
# Failures that a retry cannot fix

NOT_RETRYABLE_EXIT = 3  # the exit code of a NotRetryable failure (docs/slurm.md)
FAILURE_FILE = "failed.json"  # in the resume folder: what made an attempt fail (NotRetryable only)


class NotRetryable(PipelineError):
    """A failure that a rerun with the same settings meets again: out of device memory, a NaN/inf loss."""


def out_of_memory_error(protocol: Protocol, world_size: int, error: BaseException) -> NotRetryable:
    """The one message of every out-of-memory failure: which key to change, and to what."""
    micro, smaller = protocol.micro_batch_size, protocol.smaller_micro_batch(world_size)
    cause = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    if smaller is None:
        return NotRetryable(f"out of device memory with micro-batches of {micro} image(s) ({cause}), the smallest "
                            "possible; run this checkpoint on a GPU with more memory (resources.gpu_model)")
    return NotRetryable(
        f"out of device memory with micro-batches of {micro} images ({cause}); set protocol.micro_batch_size to "
        f"{smaller} (or another smaller divisor of protocol.batch_size {protocol.batch_size}) and rerun with "
        "--rerun-triggers mtime input (else the changed protocol parameter redoes the finished runs): the job "
        "resumes from its last checkpoint with the smaller micro-batch")


def failure_settings(args: argparse.Namespace) -> dict:
    """What an attempt ran with: its command line (but the attempt number) and its process count."""
    settings = {k: v for k, v in vars(args).items() if k != "attempt"}
    return json.loads(json.dumps({**settings, "world_size": world_size_of_job()}))


def stop_if_failed_before(failure_file: Path, attempt: int, settings: dict) -> None:
    """On a retry (attempt > 1) of a job whose earlier attempt failed NotRetryable with the same settings,
    fail at once with that error: Snakemake retries every failed job, whatever its exit code. A first
    attempt (a new Snakemake run, perhaps after the cause was fixed) forgets the earlier failure."""
    if attempt <= 1:
        failure_file.unlink(missing_ok=True)
        return
    try:
        earlier = read_json(failure_file) if failure_file.exists() else None
    except PipelineError:  # unreadable: run the job rather than trust it
        earlier = None
    if earlier and earlier.get("settings") == settings:
        raise NotRetryable(f"not run again on attempt {attempt}: attempt {earlier['attempt']} failed the same way "
                           f"with the same settings ({failure_file}): {earlier['error']}")


def record_failure(failure_file: Path, attempt: int, settings: dict, error: NotRetryable) -> None:
    write_json(failure_file, {"attempt": attempt, "settings": settings, "error": str(error)})


def exit_not_retryable(error: NotRetryable) -> int:
    print(f"error: {error}", file=sys.stderr, flush=True)  # as run_cli prints a PipelineError
    return NOT_RETRYABLE_EXIT


# ---------------------------------------------------------------------------------------------
# The training run

def train(checkpoint: str | os.PathLike, dataset_json: str | os.PathLike, outputs: Outputs,
          resume_dir: str | os.PathLike, lr: float, seed: int, steps: int, protocol: Protocol,
          threads: int, train_on: str = "train", minival_protocol: dict | None = None,
          micro_batch_from: str = "protocol.micro_batch_size") -> dict | None:
    """Fine-tune and write `outputs`. Returns the summary on rank 0 (None on the other DDP ranks,
    which write nothing). train_on: "train" (the LR sweep: minival held out and evaluated) or "full"
    (the final run at the selected LR on the entire training data: no minival). Running out of device
    memory anywhere (process group, model.to(device), a training step, minival) is one NotRetryable error
    naming protocol.micro_batch_size. micro_batch_from: where protocol.micro_batch_size came from (the summary
    records it; `resolve_micro_batch`)."""
    try:
        return _train(checkpoint, dataset_json, outputs, resume_dir, lr, seed, steps, protocol, threads, train_on,
                      minival_protocol or MINIVAL_PROTOCOL, micro_batch_from)
    except Exception as error:
        if isinstance(error, PipelineError) or not is_out_of_memory(error):
            raise
        raise out_of_memory_error(protocol, world_size_of_job(), error) from error


def _train(checkpoint: str | os.PathLike, dataset_json: str | os.PathLike, outputs: Outputs,
           resume_dir: str | os.PathLike, lr: float, seed: int, steps: int, protocol: Protocol,
           threads: int, train_on: str, minival_protocol: dict, micro_batch_from: str) -> dict | None:
    started_utc, resume_dir = utc_now(), Path(resume_dir)
    local_micro = protocol.micro_batches_per_process(world_size_of_job())  # before any process setup
    process = setup_process(protocol, seed, threads)
    dataset_record = splits.load_dataset_record(dataset_json)
    train_split = splits.open_split(dataset_record, train_on)
    minival_split = splits.open_split(dataset_record, "minival") if train_on == "train" else None
    model, architecture, optimizer = model_and_optimizer(checkpoint, train_split.num_classes, protocol, process.device)
    fingerprint = run_fingerprint(checkpoint, dataset_record, len(train_split), lr, seed, steps, protocol)
    fingerprint["train_on"] = train_on
    run = resume(resume_dir, fingerprint, model, optimizer, process, started_utc)
    ddp_model, image_size = data_parallel(model, process), architecture["image_size"]
    batches = training_batches(train_split, protocol, image_size, seed, run.start_step + 1, steps, process)
    evaluates = process.rank == 0 and minival_split is not None  # only rank 0 evaluates
    minival = minival_loader(minival_split, protocol, image_size, process, minival_protocol) if evaluates else None
    autocast = autocast_context(protocol.precision, process.device)
    # Each micro-batch's summed loss times world_size / batch_size: after DDP's average over the
    # processes, the gradient is that of the mean loss over the whole batch.
    loss_scale = process.world_size / protocol.batch_size
    meter = IntervalMeter(process.device, steps, run.start_step)
    meter.restore_interval(run.interval, process.rank)
    progress = tqdm(total=steps, initial=run.start_step, desc="finetune", unit="step", file=sys.stderr,
                    disable=process.rank != 0, mininterval=5.0)
    stop = StopRequest(process)
    try:
        for step in range(run.start_step + 1, steps + 1):
            step_lr = lr_at(step, lr, steps, protocol.warmup_steps)
            loss_sum, grad_norm = train_step(ddp_model, optimizer, batches, local_micro, step_lr,
                                             protocol.grad_clip_norm, loss_scale, autocast)
            meter.add(step, loss_sum, grad_norm, protocol.batch_size)
            progress.update(1)
            if step % protocol.log_every == 0 or step == steps:
                meter.check_finite(process.world_size, lr)
                log_training(run, meter, step, step_lr, process, progress, batches)
            if evaluates and (step % protocol.eval_every == 0 or step == steps):
                log_minival(run, meter, step, model, minival, minival_split.num_classes, process.device,
                            protocol.precision)
                batches.take()  # leave minival out of the loader's timing
            stop_signal = stop.requested() if step < steps else 0  # after the last update: finish instead
            if stop_signal or (step % protocol.checkpoint_every == 0 and step < steps):
                save_resume_state(resume_dir, fingerprint, step, model, optimizer, run, meter, process, lr)
            if stop_signal:
                stop.finish(stop_signal, step, steps, resume_dir, process)
    finally:
        stop.restore()
        progress.close()
    if process.world_size > 1:
        dist.destroy_process_group()
    if process.rank != 0:
        return None
    summary = run_summary(checkpoint, dataset_record, lr, seed, steps, protocol, process, run, meter, train_on,
                          micro_batch_from)
    write_outputs(outputs, model, architecture, run.metrics, summary)
    resume_files.remove_all(resume_dir)  # the outputs now hold everything
    return summary


def resolve_micro_batch(protocol: Protocol, preflight_json: str | os.PathLike | None,
                        world_size: int) -> tuple[Protocol, str]:
    """(the protocol with the micro-batch this job uses, where it came from). `micro_batch_size: auto` takes the
    largest valid size up to the one the shape's preflight chose (a variant's batch may split otherwise)."""
    if protocol.micro_batch_size != AUTO:
        return protocol, "protocol.micro_batch_size"
    if preflight_json is None:
        raise PipelineError("protocol.micro_batch_size is auto: pass --preflight R/preflight/<shape>.json (the "
                            "workflow does; run the preflight first), or set protocol.micro_batch_size to a number")
    chosen = read_json(preflight_json).get("micro_batch")
    if isinstance(chosen, bool) or not isinstance(chosen, int):
        raise PipelineError(f"{preflight_json}: no 'micro_batch'; rerun the preflight of this shape")
    return protocol.with_micro_batch(chosen, world_size), f"auto: the preflight {preflight_json} chose {chosen}"


def selected_lr(selection_json: str | os.PathLike) -> float:
    """The LR chosen on minival (select_lr's output): the final run and the variants train with it."""
    selection = read_json(selection_json)
    if not isinstance(selection, dict) or not isinstance(selection.get("selected_lr"), (int, float)):
        raise PipelineError(f"{selection_json}: no 'selected_lr'; rerun select_lr for this pair")
    return float(selection["selected_lr"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="converted .safetensors (convert_weights)")
    parser.add_argument("--data", required=True, help="dataset.json written by prepare_data")
    parser.add_argument("--model-out", required=True, help="fine-tuned model (.safetensors) to write")
    parser.add_argument("--metrics-out", required=True, help="metrics.jsonl to write (no wall-clock values)")
    parser.add_argument("--summary-out", required=True, help="summary.json to write (the record with timings)")
    parser.add_argument("--resume-dir", required=True, help="folder for resume state (not a Snakemake output)")
    lr = parser.add_mutually_exclusive_group(required=True)
    lr.add_argument("--lr", type=float, help="base learning rate")
    lr.add_argument("--lr-from", metavar="SELECTION_JSON", help="the LR select_lr chose (the final run, variants)")
    parser.add_argument("--minival-protocol", help="the evaluation protocol of the dev-split selection as JSON "
                        "with its name (the workflow passes evaluation.headline_protocol)")
    parser.add_argument("--train-on", choices=["train", "full"], default="train",
                        help="train: the sweep (minival held out); full: train and minival together")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True, help="optimizer updates")
    parser.add_argument("--protocol", required=True, help="the config's protocol block as JSON")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (protocol.threads overrides)")
    parser.add_argument("--preflight", help="the shape's preflight result (R/preflight/<shape>.json): the micro-batch "
                        "of protocol.micro_batch_size auto")
    parser.add_argument("--attempt", type=int, default=1,
                        help="Snakemake's attempt number: a retry after a failure a retry cannot fix stops at once")
    args = parser.parse_args(argv)
    for flag, path in (("--checkpoint", args.checkpoint), ("--data", args.data)):
        if not Path(path).is_file():
            raise PipelineError(f"{flag} {path}: file not found (did the stage that writes it run?)")
    protocol, micro_batch_from = resolve_micro_batch(Protocol.from_config(json_arg(args.protocol, "--protocol")),
                                                     args.preflight, world_size_of_job())
    outputs = Outputs(Path(args.model_out), Path(args.metrics_out), Path(args.summary_out))
    failure_file, settings = Path(args.resume_dir) / FAILURE_FILE, failure_settings(args)
    try:
        stop_if_failed_before(failure_file, args.attempt, settings)
    except NotRetryable as error:
        return exit_not_retryable(error)
    base_lr = args.lr if args.lr is not None else selected_lr(args.lr_from)
    try:
        minival_protocol = json_arg(args.minival_protocol, "--minival-protocol") if args.minival_protocol else None
        train(args.checkpoint, args.data, outputs, args.resume_dir, base_lr, args.seed, args.steps, protocol,
              args.threads, args.train_on, minival_protocol, micro_batch_from)
    except NotRetryable as error:
        record_failure(failure_file, args.attempt, settings, error)
        return exit_not_retryable(error)
    except StoppedBySignal as stopped:  # not a failure: the saved step is resumed by the rerun
        return 128 + stopped.signum  # what a shell reports for a process killed by that signal
    failure_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
