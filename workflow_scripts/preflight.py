"""Preflight: on the node the study will use, check each GPU job shape in minutes, and estimate the whole plan.

    python -m workflow_scripts.preflight shape --shape SHAPE --checkpoint R/converted/CKPT.safetensors \
        --data D/DATASET/dataset.json --protocol '{...protocol block...}' --eval-protocol '{...}' \
        --eval-batch-size 256 --gpus G --threads T --out R/preflight/SHAPE.json [--memory-cap-mib M]
    python -m workflow_scripts.preflight summary --config-json '{...config...}' --shapes R/preflight/*.json \
        --out R/preflight/summary.json [--gpus N]

A shape (matrix.job_shape: body x image size x GPU count) is checked with the converted model of its first
checkpoint at its real size, in the configured precision, on the device its jobs get (gpu_pool):
- memory and speed: a few updates through finetune's own code (model_and_optimizer, train_step: accumulation,
  clipping, momentum SGD) on synthetic batches already on the device, at the configured micro-batch; peak
  memory (CUDA: torch.cuda.max_memory_allocated; CPU: the growth of the process's peak resident memory),
  images/s and model FLOP utilisation against the device's bf16 peak (bench.PEAK_BF16_TFLOPS; "unknown
  peak" where the name is not listed). A micro-batch fits when it does not run out of memory and its peak is
  at most FIT_MARGIN of the memory cap (the device's memory, or --memory-cap-mib). If the configured one does
  not fit, the largest that does is searched (binary search over the valid sizes: memory grows with the
  micro-batch); `protocol.micro_batch_size: auto` uses it, a number stops with the message naming the key
  and that value.
- several GPUs (a shape with G > 1 runs under torchrun, G processes): an all-reduce and one DDP update across
  them with the study's backend (nccl on CUDA, gloo on CPU) within DDP_CHECK_TIMEOUT_MIN; every rank must end
  with the same weights.
- input pipeline: the job's own training loader (finetune.training_batches) on the real prepared dataset
  for --loader-images images with the job's CPUs, against the GPU's training rate; a slower loader is a
  warning that names the keys that help.
- numerics: the evaluation path (evaluate.fp32_logits) in the configured precision against fp32 on one
  test batch: top-1 agreement and the largest logit difference; under MIN_TOP1_AGREEMENT, or a non-finite
  logit, stops naming protocol.precision. Also the evaluation rate (model only) at evaluation.batch_size.

Writes OUT only when the shape passes (a failure exits 2 with one message naming the key to change).
`summary` reads the shapes' files and prices the plan with eta.estimate (device-hours, the wall clock on N
devices: --gpus, else the GPUs this process sees, else 1, the CPU), prints one table and writes OUT.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import gc
import itertools
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from workflow_scripts import bench, data, eta, evaluate, finetune, gpu_pool, model_io, splits
from workflow_scripts.common import PipelineError, json_arg, read_json, run_cli, write_json
from workflow_scripts.devices import autocast_context, is_out_of_memory, precision_name
from workflow_scripts.protocol import AUTO, Protocol

MIB = 1024 * 1024
# A micro-batch fits when its peak memory is at most this share of the cap: the rest is headroom for what a
# few synthetic updates do not show (fragmentation over thousands of steps, minival, the loader's pinned memory).
FIT_MARGIN = 0.9
# Set by a test (or a user who wants to leave room on a shared GPU): the cap in MiB, as --memory-cap-mib.
MEMORY_CAP_ENV = "MIXER_PREFLIGHT_MEMORY_CAP_MIB"
# A hanging interconnect shows within minutes; the study's own timeout (protocol.ddp_timeout_min) is longer.
DDP_CHECK_TIMEOUT_MIN = 5
# Assumption (no source): a sound bf16 body with an fp32 head changes the top-1 of a few near-ties in a
# hundred; a broken mixed-precision setup (overflow, a wrong cast) scrambles the ranking far below this.
MIN_TOP1_AGREEMENT = 90.0
TRAIN_LR = 1e-3  # any small LR: the updates are measured, not kept
# The per-shape figures of summary.json and of the printed table.
SUMMARY_FIELDS = ("shape", "device", "device_name", "gpus", "precision", "micro_batch", "micro_batch_configured",
                  "peak_memory_mib", "memory_measure", "memory_cap_mib", "train_img_s", "mfu", "peak_bf16_tflops",
                  "loader_img_s", "eval_img_s", "eval_top1_agreement", "eval_max_logit_diff", "warnings")


# ---------------------------------------------------------------------------------------------
# Memory

def _status_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM); None off Linux."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    """Hand freed heap memory back to the kernel (glibc), so that a trial's RSS growth is its own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """The peak memory of one trial, in MiB, and how it was measured (`measure`)."""

    def __init__(self, device: torch.device):
        self.device, self.base_kib = device, 0
        self.measure = "torch.cuda.max_memory_allocated (tensors; no allocator cache, no CUDA context)"

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        _trim_heap()
        if _reset_peak_rss() and _status_kib("VmRSS") is not None:
            self.measure = "CPU: peak resident memory of the process (VmHWM, reset per trial) above its level before"
            self.base_kib = _status_kib("VmRSS")
        else:  # the peak cannot be reset: growth of the lifetime peak (understates later, smaller trials)
            self.measure = "CPU: growth of the process's lifetime peak resident memory (ru_maxrss)"
            self.base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / MIB
        peak = _status_kib("VmHWM") if "VmHWM" in self.measure else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, peak - self.base_kib) / 1024


def memory_cap(device: torch.device, cap_mib: float | None) -> float | None:
    """The memory a job may use, MiB: `cap_mib` if given (on CUDA also enforced by the allocator), else the
    GPU's memory; on CPU None (no cap) unless given."""
    if device.type != "cuda":
        return cap_mib
    total = torch.cuda.get_device_properties(device).total_memory / MIB
    if cap_mib is None:
        return total
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_mib / total), device)
    return cap_mib


# ---------------------------------------------------------------------------------------------
# Memory and speed: training updates at one micro-batch size

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_updates(checkpoint: str | os.PathLike, protocol: Protocol, gpus: int, num_classes: int,
                  device: torch.device, updates: int) -> float:
    """Seconds of the updates after the first (warm-up; all of them if only one), each through finetune's own
    model_and_optimizer and train_step with this process's share of micro-batches of synthetic images."""
    micro, num_micro = protocol.micro_batch_size, protocol.micro_batches_per_process(gpus)
    model, architecture, optimizer = finetune.model_and_optimizer(checkpoint, num_classes, protocol, device)
    size = architecture["image_size"]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(micro, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, num_classes, (micro,), generator=generator).to(device)
    batches = itertools.repeat((images, labels))
    autocast = autocast_context(protocol.precision, device)
    loss_scale = gpus / protocol.batch_size  # as finetune: world_size / batch_size
    start = time.perf_counter()
    for update in range(updates):
        if update == 1:
            _synchronize(device)
            start = time.perf_counter()
        finetune.train_step(model, optimizer, batches, num_micro, TRAIN_LR, protocol.grad_clip_norm, loss_scale,
                            autocast)
    _synchronize(device)
    return time.perf_counter() - start


def train_trial(checkpoint: str | os.PathLike, protocol: Protocol, micro: int, gpus: int, num_classes: int,
                device: torch.device, updates: int, cap_mib: float | None) -> dict:
    """One micro-batch size tried: {"micro_batch", "fits", "out_of_memory", "peak_memory_mib",
    "train_img_s_per_gpu", "error"}."""
    trial = dataclasses.replace(protocol, micro_batch_size=micro)
    meter = PeakMemory(device)
    meter.start()
    seconds, error = None, None
    try:
        seconds = timed_updates(checkpoint, trial, gpus, num_classes, device, updates)
    except Exception as e:  # noqa: BLE001 - only out-of-memory failures are a result; the rest re-raised
        if not is_out_of_memory(e):
            raise
        error = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    peak = meter.peak_mib()  # the failed trial's tensors are gone with its frames
    images = micro * trial.micro_batches_per_process(gpus) * max(1, updates - 1)
    fits = error is None and (cap_mib is None or peak <= FIT_MARGIN * cap_mib)
    return {"micro_batch": micro, "fits": fits, "out_of_memory": error is not None,
            "peak_memory_mib": round(peak, 1), "train_img_s_per_gpu": images / seconds if seconds else None,
            "error": error, "memory_measure": meter.measure}


def search_micro_batch(protocol: Protocol, gpus: int, run_trial) -> tuple[int | None, dict[int, dict]]:
    """(the micro-batch to use, {size: trial}): the configured size if it fits, else (and with `auto`) the
    largest valid size that fits, by binary search (memory grows with the micro-batch); None if none fits.
    `run_trial(size) -> {"fits": bool, ...}`."""
    trials: dict[int, dict] = {}

    def fits(size: int) -> bool:
        if size not in trials:
            trials[size] = run_trial(size)
        return trials[size]["fits"]

    configured = protocol.micro_batch_size
    if configured != AUTO and fits(configured):
        return configured, trials
    candidates = [m for m in protocol.micro_batch_sizes(gpus) if configured == AUTO or m < configured]
    low, high = 0, len(candidates)  # the first index (largest size) that fits
    while low < high:
        middle = (low + high) // 2
        if fits(candidates[middle]):
            high = middle
        else:
            low = middle + 1
    return (candidates[low] if low < len(candidates) else None), trials


def _mib(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"  # a test's cap of 0.5 MiB stays 0.5


def _why_not(trial: dict, cap_mib: float | None) -> str:
    if trial["out_of_memory"]:
        return f"out of memory ({trial['error']})"
    return f"peak {_mib(trial['peak_memory_mib'])} MiB > {FIT_MARGIN:.0%} of the {_mib(cap_mib)} MiB cap"


def micro_batch_decision(protocol: Protocol, gpus: int, chosen: int | None, trials: dict[int, dict],
                         cap_mib: float | None, where: str) -> int:
    """The micro-batch the shape's jobs use; a PipelineError naming protocol.micro_batch_size otherwise."""
    configured, smallest = protocol.micro_batch_size, min(protocol.micro_batch_sizes(gpus))
    if chosen is None:
        raise PipelineError(
            f"not even micro-batches of {smallest} image(s) fit on {where} "
            f"({_why_not(trials[smallest], cap_mib)}): run this shape on GPUs with more memory "
            "(resources.gpu_model) or on more of them (resources.finetune_gpu_overrides)")
    if configured != AUTO and chosen != configured:
        why = _why_not(trials[configured], cap_mib)
        raise PipelineError(
            f"protocol.micro_batch_size {configured} does not fit on {where} ({why}); "
            f"set protocol.micro_batch_size to {chosen} (the largest that fits with peak memory at most "
            f"{FIT_MARGIN:.0%} of the cap), or to auto to have the jobs use it")
    return chosen


# ---------------------------------------------------------------------------------------------
# Several GPUs

def ddp_check(checkpoint: str | os.PathLike, protocol: Protocol, num_classes: int,
              process: finetune.Process) -> dict | None:
    """All-reduce and one DDP update (one image per rank, each its own) across the job's processes; every
    rank must end with the same weights. None for a single process. Leaves no process group behind."""
    if process.world_size == 1:
        return None
    backend, start = dist.get_backend(), time.perf_counter()
    try:
        ones = torch.ones(1, device=process.device)
        dist.all_reduce(ones)
        if int(ones.item()) != process.world_size:
            raise PipelineError(f"the all-reduce summed {ones.item()} over {process.world_size} ranks")
        all_reduce_s = time.perf_counter() - start
        one_each = dataclasses.replace(protocol, batch_size=process.world_size, micro_batch_size=1)
        model, architecture, optimizer = finetune.model_and_optimizer(checkpoint, num_classes, one_each, process.device)
        size = architecture["image_size"]
        generator = torch.Generator().manual_seed(process.rank)  # other images per rank: other gradients
        batch = (torch.randn(1, 3, size, size, generator=generator).to(process.device),
                 torch.randint(0, num_classes, (1,), generator=generator).to(process.device))
        finetune.train_step(finetune.data_parallel(model, process), optimizer, itertools.repeat(batch), 1, TRAIN_LR,
                            protocol.grad_clip_norm, process.world_size / one_each.batch_size,
                            autocast_context(protocol.precision, process.device))
        _same_weights_everywhere(model)
        dist.barrier()
        dist.destroy_process_group()
    except Exception as error:
        raise PipelineError(
            f"the {process.world_size}-GPU check failed ({backend}, timeout {DDP_CHECK_TIMEOUT_MIN} min): "
            f"{(str(error).strip().splitlines() or [type(error).__name__])[0][:300]}; check the node's GPU "
            "interconnect (NCCL_DEBUG=INFO shows what NCCL does), or run this checkpoint on one GPU "
            "(resources.finetune_gpu_overrides)") from error
    return {"backend": backend, "world_size": process.world_size, "timeout_min": DDP_CHECK_TIMEOUT_MIN,
            "all_reduce_s": all_reduce_s, "ddp_update_s": time.perf_counter() - start - all_reduce_s}


def _same_weights_everywhere(model: torch.nn.Module) -> None:
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if low.item() != high.item():
        raise PipelineError(f"after one DDP update the ranks' weights differ (checksums {low.item()} to {high.item()})")


# ---------------------------------------------------------------------------------------------
# Input pipeline and numerics

def loader_rate(dataset_record: dict, protocol: Protocol, image_size: int, device: torch.device, cpus: int,
                images: int) -> dict:
    """The job's training loader (one process's share of CPUs) on the dataset's training split: images/s
    after its first micro-batch (the workers' start-up, reported apart)."""
    split = splits.open_split(dataset_record, "train")
    steps = max(1, math.ceil(images / protocol.batch_size))
    process = finetune.Process(0, 1, device, cpus)
    start = time.perf_counter()
    batches = finetune.training_batches(split, protocol, image_size, 0, 1, steps, process)
    first, counted = None, 0
    for batch_images, _ in batches:
        if first is None:
            _synchronize(device)
            first = time.perf_counter()
        else:
            counted += len(batch_images)
    _synchronize(device)
    seconds = time.perf_counter() - (first or start)
    return {"dataset": dataset_record["name"], "layout": dataset_record["layout"], "cpus": cpus,
            "num_workers": data.resolve_num_workers(protocol.num_workers, cpus),
            "decode_device": protocol.decode_device, "images": counted, "startup_s": (first or start) - start,
            "loader_img_s_per_process": counted / seconds if counted and seconds > 0 else None}


def _eval_img_s(model: torch.nn.Module, images: torch.Tensor, precision: str) -> float:
    """One timed pass (after the untimed one that warmed the kernels up)."""
    _synchronize(images.device)
    start = time.perf_counter()
    evaluate.fp32_logits(model, images, precision)
    _synchronize(images.device)
    return len(images) / (time.perf_counter() - start)


def numerics(checkpoint: str | os.PathLike, dataset_record: dict, eval_protocol: dict, batch_size: int,
             protocol: Protocol, device: torch.device, cpus: int) -> dict:
    """The released model on one test batch: the configured precision against fp32 (top-1 agreement %, the
    largest logit difference), and the evaluation rate (model only) at evaluation.batch_size."""
    model = model_io.load_model(checkpoint).to(device).eval()
    image_size = model_io.read_architecture(checkpoint)["image_size"]
    workers = data.resolve_num_workers(protocol.num_workers, cpus)
    loader = data.eval_loader(splits.open_split(dataset_record, "test"), eval_protocol, image_size, batch_size,
                              device, workers, protocol.pixel_mean, protocol.pixel_std, protocol.decode_device)
    images, _ = next(iter(loader))
    precision = evaluate.evaluation_precision(model, protocol.precision, device)
    try:
        with torch.inference_mode():
            configured = evaluate.fp32_logits(model, images, protocol.precision)
            # fp32 already (CPU): the same pass is the reference (a big model on a CPU is slow)
            reference = configured if precision == evaluate.FP32 else evaluate.fp32_logits(model, images, "fp32")
            eval_img_s = _eval_img_s(model, images, protocol.precision)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        raise PipelineError(f"evaluation batches of {batch_size} images do not fit in device memory; set "
                            "evaluation.batch_size lower") from None
    agreement = 100.0 * (configured.argmax(1) == reference.argmax(1)).double().mean().item()
    return {"eval_img_s": eval_img_s, "eval_top1_agreement": agreement,
            "eval_max_logit_diff": (configured - reference).abs().max().item(),
            "eval_finite": bool(torch.isfinite(configured).all().item()), "eval_images": len(images),
            "eval_precision": precision}


def check_numerics(result: dict, precision: str) -> None:
    if not result["eval_finite"] or result["eval_top1_agreement"] < MIN_TOP1_AGREEMENT:
        raise PipelineError(
            f"the evaluation path in {result['eval_precision']} disagrees with fp32: top-1 agreement "
            f"{result['eval_top1_agreement']:.1f}% (at least {MIN_TOP1_AGREEMENT:.0f}% expected), largest logit "
            f"difference {result['eval_max_logit_diff']:.3g}, finite: {result['eval_finite']}; the mixed-precision "
            f"setup of this node is broken: set protocol.precision to fp32 (now {precision!r}) or fix the stack")


def loader_warning(loader_img_s: float | None, train_img_s: float, loader: dict) -> str | None:
    """What to change when the loader cannot feed the training rate (per process), else None."""
    if loader_img_s is None or loader_img_s >= train_img_s:
        return None
    return (f"the input pipeline is {train_img_s / loader_img_s:.1f}x slower than training ({loader_img_s:.0f} "
            f"against {train_img_s:.0f} img/s per GPU on {loader['dataset']}, {loader['cpus']} CPU(s), "
            f"{loader['num_workers']} worker(s)): the jobs will wait for data; more CPUs per job "
            "(resources.finetune.cpus), protocol.num_workers (auto: one per CPU but one) or "
            "protocol.decode_device: cuda help")


# ---------------------------------------------------------------------------------------------
# One shape

@dataclasses.dataclass(frozen=True)
class ShapeCheck:
    """What `check_shape` measures: the shape's first checkpoint, its hardest dataset, and how."""

    shape: str
    checkpoint: Path
    dataset_json: Path
    protocol: Protocol
    eval_protocol: dict
    eval_batch_size: int
    gpus: int                        # the shape's GPU count (0: a CPU job, one process)
    threads: int                     # the job's CPUs (resources.finetune.cpus)
    memory_cap_mib: float | None = None
    updates: int = 2
    loader_images: int = 256


def device_name(device: torch.device) -> str:
    return finetune.device_names(device, 1)[0]


def utilisation(architecture: dict, img_s_per_gpu: float, device: torch.device) -> dict:
    """Model FLOP utilisation against the device's dense bf16 peak (bench's table), where the peak is known."""
    flops = 3 * bench.forward_flops(architecture)  # backward = 2 x forward
    peak = bench.peak_tflops(device_name(device)) if device.type == "cuda" else None
    return {"train_gflops_per_image": flops / 1e9, "peak_bf16_tflops": peak if peak is not None else "unknown peak",
            "mfu": img_s_per_gpu * flops / (peak * 1e12) if peak else None}


def memory_and_speed(check: ShapeCheck, num_classes: int, device: torch.device) -> tuple[Protocol, dict]:
    """The micro-batch the shape's jobs use (the protocol with it) and what its trials measured."""
    processes = max(1, check.gpus)
    cap = memory_cap(device, check.memory_cap_mib)
    where = f"{device_name(device)} ({device.type})" + (f" with a {_mib(cap)} MiB cap" if cap is not None else "")

    def run_trial(micro: int) -> dict:
        trial = train_trial(check.checkpoint, check.protocol, micro, processes, num_classes, device,
                            check.updates, cap)
        print(f"preflight: micro-batch {micro}: {'fits' if trial['fits'] else 'does not fit'}, peak "
              f"{trial['peak_memory_mib']:.0f} MiB" + (f" ({trial['error']})" if trial["error"] else ""), flush=True)
        return trial

    chosen, trials = search_micro_batch(check.protocol, processes, run_trial)
    chosen = micro_batch_decision(check.protocol, processes, chosen, trials, cap, where)
    best = trials[chosen]
    return dataclasses.replace(check.protocol, micro_batch_size=chosen), {
        "micro_batch": chosen, "micro_batch_configured": check.protocol.micro_batch_size,
        "micro_batch_trials": [{k: v for k, v in t.items() if k != "memory_measure"} for t in trials.values()],
        "memory_cap_mib": cap, "fit_margin": FIT_MARGIN, "peak_memory_mib": best["peak_memory_mib"],
        "memory_measure": best["memory_measure"], "train_img_s_per_gpu": best["train_img_s_per_gpu"],
        "train_img_s": best["train_img_s_per_gpu"] * processes}


def check_shape(check: ShapeCheck) -> dict | None:
    """Every check of one shape; the record on rank 0 (None on the other DDP ranks). PipelineError: it fails."""
    if check.gpus > 1 and finetune.world_size_of_job() != check.gpus:
        raise PipelineError(f"a {check.gpus}-GPU shape is checked with {check.gpus} processes: run it through "
                            f"`python -m workflow_scripts.gpu_pool --gpus {check.gpus}` (as the rule does) or torchrun")
    short_timeout = dataclasses.replace(check.protocol, ddp_timeout_min=DDP_CHECK_TIMEOUT_MIN)
    process = finetune.setup_process(short_timeout, seed=0, threads=check.threads)
    dataset_record = splits.load_dataset_record(check.dataset_json)
    num_classes = dataset_record["num_classes"]
    ddp = ddp_check(check.checkpoint, check.protocol, num_classes, process)
    if process.rank != 0:
        return None
    device, started = process.device, time.perf_counter()
    protocol, memory = memory_and_speed(check, num_classes, device)
    architecture = dict(model_io.read_architecture(check.checkpoint), num_classes=num_classes)
    loader = loader_rate(dataset_record, protocol, architecture["image_size"], device, process.cpus,
                         check.loader_images)
    evaluation = numerics(check.checkpoint, dataset_record, check.eval_protocol, check.eval_batch_size, protocol,
                          device, process.cpus)
    check_numerics(evaluation, protocol.precision)
    per_process = loader["loader_img_s_per_process"]
    warning = loader_warning(per_process, memory["train_img_s_per_gpu"], loader)
    return {"shape": check.shape, "checkpoint": str(check.checkpoint), "dataset": dataset_record["name"],
            "device": device.type, "device_name": device_name(device), "gpus": check.gpus,
            "precision": precision_name(protocol.precision, device), "batch_size": protocol.batch_size, **memory,
            **utilisation(architecture, memory["train_img_s_per_gpu"], device),
            "loader_img_s": per_process * max(1, check.gpus) if per_process else None, "loader": loader,
            **evaluation, "min_top1_agreement": MIN_TOP1_AGREEMENT, "ddp": ddp,
            "warnings": [warning] if warning else [], "seconds": time.perf_counter() - started,
            "checked_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


# ---------------------------------------------------------------------------------------------
# The summary and the ETA

def seen_gpus() -> int:
    """The GPUs this process sees (gpu_pool.visible_devices); 1 (the CPU) where there are none."""
    return max(1, len(gpu_pool.visible_devices()))


def devices_to_schedule(config: dict, given: int | None) -> tuple[int, str | None]:
    """(devices the ETA schedules on, a note or None): the devices given (`--resources gpu=N`), else those this
    process sees; where it sees fewer than the widest job holds (a summary job on a SLURM CPU node, a DDP override),
    the widest job's count, said in the note: the study cannot run on fewer."""
    if given is not None:
        return given, None
    seen, widest = seen_gpus(), max((job["devices"] for job in eta.plan(config)), default=1)
    if widest <= seen:
        return seen, None
    return widest, (f"this process sees {seen} device(s) but the widest job holds {widest} "
                    f"(resources.finetune_gpu_overrides): the ETA is scheduled on {widest}; give the devices the "
                    "study will have with `--resources gpu=N` (make preflight GPUS=N)")


def summarize(config: dict, records: list[dict], gpus: int, gpus_note: str | None = None) -> dict:
    """summary.json: each shape's figures and the plan priced from their measured rates (eta.estimate)."""
    rates = {r["shape"]: {"train_img_s": r["train_img_s"], "eval_img_s": r["eval_img_s"]} for r in records}
    plan = eta.estimate(config, rates, gpus)
    return {"shapes": [{k: r.get(k) for k in SUMMARY_FIELDS} for r in records],
            "device_hours": plan["device_hours"], "gpus": plan["gpus"], "gpus_note": gpus_note,
            "eta_hours": plan["eta_hours"], "unknown": plan["unknown"], "jobs": plan["jobs"]}


def _figure(value, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def summary_table(summary: dict) -> str:
    """The figures of summary.json as a compact text table, the plan's line last."""
    header = ("shape", "device", "precision", "micro", "peak MiB", "train img/s", "MFU", "loader img/s",
              "eval img/s", "top-1 agree")
    rows = [(s["shape"], s["device"], s["precision"], str(s["micro_batch"]), _figure(s["peak_memory_mib"]),
             _figure(s["train_img_s"]), "-" if s["mfu"] is None else f"{s['mfu']:.0%}", _figure(s["loader_img_s"]),
             _figure(s["eval_img_s"]), f"{s['eval_top1_agreement']:.1f}%") for s in summary["shapes"]]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in [header, *rows]]
    lines += [f"warning ({s['shape']}): {w}" for s in summary["shapes"] for w in s["warnings"]]
    if summary["eta_hours"] is None:
        lines.append("plan: not priced: " + "; ".join(summary["unknown"]))
    else:
        lines.append(f"plan: {summary['device_hours']:.3g} device-hours; on {summary['gpus']} device(s) about "
                     f"{summary['eta_hours']:.3g} h of wall clock (from these measured rates)")
    if summary.get("gpus_note"):
        lines.append(f"note: {summary['gpus_note']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line

def _shape_command(args: argparse.Namespace) -> int:
    for flag, path in (("--checkpoint", args.checkpoint), ("--data", args.data)):
        if not Path(path).is_file():
            raise PipelineError(f"{flag} {path}: file not found (did the stage that writes it run?)")
    cap = args.memory_cap_mib if args.memory_cap_mib is not None else os.environ.get(MEMORY_CAP_ENV)
    check = ShapeCheck(args.shape, Path(args.checkpoint), Path(args.data),
                       Protocol.from_config(json_arg(args.protocol, "--protocol")),
                       json_arg(args.eval_protocol, "--eval-protocol"), args.eval_batch_size, args.gpus, args.threads,
                       None if cap is None else float(cap), args.updates, args.loader_images)
    record = check_shape(check)
    if record is not None:
        write_json(args.out, record)
        print(f"preflight: {check.shape} passed: micro-batch {record['micro_batch']}, peak "
              f"{record['peak_memory_mib']:.0f} MiB, {record['train_img_s']:.1f} train img/s", flush=True)
        for warning in record["warnings"]:
            print(f"preflight: warning: {warning}", file=sys.stderr, flush=True)
    return 0


def _summary_command(args: argparse.Namespace) -> int:
    config = json_arg(args.config_json, "--config-json")
    records = [read_json(path) for path in args.shapes]
    summary = summarize(config, records, *devices_to_schedule(config, args.gpus))
    write_json(args.out, summary)
    print(summary_table(summary), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    shape = commands.add_parser("shape", help="check one GPU job shape on this node")
    shape.add_argument("--shape", required=True, help="the shape's name (matrix.job_shape)")
    shape.add_argument("--checkpoint", required=True, help="converted .safetensors of the shape's first checkpoint")
    shape.add_argument("--data", required=True, help="dataset.json of the dataset whose loader is timed")
    shape.add_argument("--protocol", required=True, help="the config's protocol block as JSON")
    shape.add_argument("--eval-protocol", required=True, help="the headline evaluation protocol as JSON")
    shape.add_argument("--eval-batch-size", type=int, required=True, help="evaluation.batch_size")
    shape.add_argument("--gpus", type=int, required=True, help="the shape's GPU count (0: CPU)")
    shape.add_argument("--threads", type=int, default=1, help="the job's CPUs (protocol.threads overrides)")
    shape.add_argument("--memory-cap-mib", type=float, help=f"memory cap (default: ${MEMORY_CAP_ENV}, else the GPU's "
                       "memory; none on CPU); a trial whose peak exceeds FIT_MARGIN of it does not fit")
    shape.add_argument("--updates", type=int, default=2, help="training updates per trial (the first is warm-up; "
                       "two at least: the momentum buffers exist from the second on)")
    shape.add_argument("--loader-images", type=int, default=256, help="images the loader is timed on")
    shape.add_argument("--out", required=True, help="R/preflight/SHAPE.json (written only if the shape passes)")
    summary = commands.add_parser("summary", help="every shape's figures and the plan's ETA")
    summary.add_argument("--config-json", required=True, help="the whole config as JSON")
    summary.add_argument("--shapes", nargs="+", required=True, help="the shapes' preflight files")
    summary.add_argument("--gpus", type=int, help="devices to schedule the plan on (default: the GPUs seen, else 1)")
    summary.add_argument("--out", required=True, help="R/preflight/summary.json")
    args = parser.parse_args(argv)
    return _shape_command(args) if args.command == "shape" else _summary_command(args)


if __name__ == "__main__":
    run_cli(main)
