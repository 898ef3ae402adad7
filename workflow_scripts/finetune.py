"""Fine-tune a converted Mixer with the paper's protocol; resumable, DDP when started by torchrun.

    python -m workflow_scripts.finetune --checkpoint R/converted/CKPT.safetensors \
        --data D/DATASET/dataset.json --out-dir RUN_DIR --resume-dir RESUME_DIR \
        --lr 0.03 --seed 0 --steps 10000 --protocol '{...config protocol block...}' --threads 8

Protocol (FACTS.md; every constant comes from the config's protocol block): momentum SGD, a new
zero-initialised head, effective batch `batch_size` reached by accumulating micro-batches, the
accumulated gradient clipped to global norm `grad_clip_norm`, linear warmup then cosine decay to 0.
Training uses the train split minus minival; each step's samples and augmentation seeds are a pure
function of (seed, step), so a resumed or multi-GPU run sees exactly the same data.

Writes RUN_DIR/{model.safetensors, metrics.jsonl, summary.json} (docs/design.md), all at the end.
Every `checkpoint_every` steps the full training state goes to RESUME_DIR/state.pt, which is not a
Snakemake output (Snakemake deletes the outputs of a failed job); a rerun continues from it.
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
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from workflow_scripts import data, evaluate, model_io
from workflow_scripts.common import PipelineError, json_arg, atomic_path, run_cli, sha256_file, write_json

PROTOCOL_KEYS = ("batch_size", "micro_batch_size", "warmup_steps", "momentum", "weight_decay",
                 "grad_clip_norm", "inception_crop", "inception_crop_min_area", "random_flip",
                 "pixel_mean", "pixel_std", "precision", "deterministic", "checkpoint_every",
                 "eval_every", "log_every", "num_workers", "threads")
# Keys that change how a run executes but not what it computes: a run may resume across them
# (e.g. a smaller micro_batch_size after an out-of-memory error).
EXECUTION_KEYS = ("micro_batch_size", "checkpoint_every", "eval_every", "log_every", "num_workers", "threads")
# Minival during fine-tuning uses the official code's evaluation preprocessing (plain resize).
MINIVAL_PROTOCOL = {"name": "official", "resize": "direct"}
STATE_FILE = "state.pt"


# ---------------------------------------------------------------------------------------------
# The protocol's pieces (pure functions the tests check one by one)

def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int) -> float:
    """Learning rate of update `step` (1..total_steps), as vit_jax/utils.py create_learning_rate_schedule
    with decay_type="cosine":

        progress = clip((step - warmup) / (total - warmup), 0, 1)
        lr = base * 0.5 * (1 + cos(pi * progress)) * min(1, step / warmup)

    i.e. linear warmup from 0 to base over `warmup_steps`, then cosine decay to 0 at `total_steps`.
    As in vit_jax/train.py, updates are numbered from 1 and update `step` uses lr_at(step).
    """
    progress = min(max((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
    lr = base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if warmup_steps:
        lr *= min(1.0, step / warmup_steps)
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
# Setup helpers

def parse_protocol(text: str) -> dict:
    protocol = json_arg(text, "--protocol")
    missing = [k for k in PROTOCOL_KEYS if k not in protocol]
    if missing:
        raise PipelineError(f"--protocol lacks {missing}; add them to the config's protocol block (see config.yaml)")
    if protocol["batch_size"] % protocol["micro_batch_size"]:
        raise PipelineError(f"protocol.micro_batch_size {protocol['micro_batch_size']} does not divide "
                            f"protocol.batch_size {protocol['batch_size']}; choose a divisor")
    return protocol


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA for "auto" (fp32 on CPU, where bf16 is several times slower)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


def precision_name(precision: str, device: torch.device) -> str:
    return "bf16" if precision == "bf16" or (precision == "auto" and device.type == "cuda") else "fp32"


def device_names(device: torch.device, world_size: int) -> list[str]:
    if device.type == "cuda":
        return [torch.cuda.get_device_name(i) for i in range(min(world_size, torch.cuda.device_count()))]
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return [line.split(":", 1)[1].strip()]
    return [platform.processor() or platform.machine()]


def minival_metrics(model: nn.Module, loader, num_classes: int, device: torch.device) -> dict:
    result = evaluate.evaluate_model(model, loader, num_classes, device)  # bf16 on CUDA, like training
    model.train()
    return {"minival_top1": result["top1"], "minival_top5": result["top5"], "minival_loss": result["loss"]}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Resume state

def load_state(resume_dir: Path, fingerprint: dict, device: torch.device) -> dict | None:
    path = resume_dir / STATE_FILE
    if not path.exists():
        return None
    state = torch.load(path, map_location=device, weights_only=True)
    if state["fingerprint"] != fingerprint:
        print(f"finetune: {path} belongs to a different run (checkpoint, data or protocol changed); "
              "starting from step 0", file=sys.stderr, flush=True)
        return None
    return state


def save_state(resume_dir: Path, state: dict) -> None:
    with atomic_path(resume_dir / STATE_FILE) as tmp:
        torch.save(state, tmp)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ---------------------------------------------------------------------------------------------
# The training run

def train(checkpoint: str | os.PathLike, dataset_json: str | os.PathLike, out_dir: str | os.PathLike,
          resume_dir: str | os.PathLike, lr: float, seed: int, steps: int, protocol: dict,
          threads: int) -> dict | None:
    """Fine-tune and write out_dir/{model.safetensors, metrics.jsonl, summary.json}.

    Returns the summary on rank 0 (None on the other DDP ranks, which write nothing).
    """
    started_utc = utc_now()
    out_dir, resume_dir = Path(out_dir), Path(resume_dir)
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.set_num_threads(max(1, (protocol["threads"] or threads) // world_size))
    if protocol["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(seed)

    batch_size, micro = protocol["batch_size"], protocol["micro_batch_size"]
    num_micro = batch_size // micro
    if num_micro % world_size:
        raise PipelineError(f"{num_micro} micro-batches per step cannot be shared by {world_size} processes; "
                            "choose protocol.micro_batch_size so that batch_size / micro_batch_size is a "
                            "multiple of the GPU count")
    local_micro = num_micro // world_size

    dataset_record = data.load_dataset_record(dataset_json)
    train_split, minival_split = data.open_split(dataset_record, "train"), data.open_split(dataset_record, "minival")
    architecture = dict(model_io.read_architecture(checkpoint), num_classes=train_split.num_classes)
    image_size = architecture["image_size"]
    model = zero_head(model_io.load_model(checkpoint), train_split.num_classes).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=protocol["momentum"],
                                weight_decay=protocol["weight_decay"])
    autocast = autocast_context(protocol["precision"], device)

    fingerprint = {"checkpoint_sha256": sha256_file(checkpoint), "dataset": dataset_record["name"],
                   "train_size": len(train_split), "lr": lr, "seed": seed, "steps": steps,
                   "protocol": {k: v for k, v in protocol.items() if k not in EXECUTION_KEYS}}
    state = load_state(resume_dir, fingerprint, device)
    start_step, metrics, elapsed_before = 0, [], 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"])
        start_step, metrics, elapsed_before = state["step"], state["metrics"], state["elapsed_s"]
        started_utc = state["started_utc"]
        if rank == 0:
            print(f"finetune: resuming from step {start_step} ({resume_dir / STATE_FILE})", file=sys.stderr)
    ddp_model = (DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
                 if world_size > 1 else model)

    def my_micro_batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for step in range(start_step + 1, steps + 1):
            yield from step_plan(seed, step, len(train_split), batch_size, micro)[rank::world_size]

    augment = data.TrainAugment(image_size, protocol["inception_crop"], protocol["inception_crop_min_area"],
                                protocol["random_flip"], protocol["pixel_mean"], protocol["pixel_std"])
    batches = iter(data.train_loader(train_split, augment, my_micro_batches(), device, protocol["num_workers"]))
    minival_loader = data.eval_loader(minival_split, MINIVAL_PROTOCOL, image_size, micro, device,
                                      protocol["num_workers"], protocol["pixel_mean"], protocol["pixel_std"]
                                      ) if rank == 0 else None  # only rank 0 evaluates

    # Device-side accumulators, read only when logging (no per-step host sync).
    interval_loss = torch.zeros((), device=device)
    interval_grad_norm = torch.zeros((), device=device)
    first_bad_step = torch.full((), steps + 1, dtype=torch.int64, device=device)

    def check_finite() -> None:
        bad = first_bad_step.clone()
        if world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        if bad.item() <= steps:
            raise PipelineError(f"the loss or gradient became NaN/inf at step {bad.item()} "
                                f"(lr {lr}); lower the learning rate or check the data")

    progress = tqdm(total=steps, initial=start_step, desc="finetune", unit="step", file=sys.stderr,
                    disable=rank != 0, mininterval=5.0)
    loop_start = last_log = time.perf_counter()
    eval_seconds, images_since_log, last_log_step = 0.0, 0, start_step
    try:
        for step in range(start_step + 1, steps + 1):
            loss_sum, grad_norm = train_step(
                ddp_model, optimizer, batches, local_micro, lr_at(step, lr, steps, protocol["warmup_steps"]),
                protocol["grad_clip_norm"], world_size / batch_size, autocast)
            interval_loss += loss_sum
            interval_grad_norm += grad_norm
            first_bad_step = torch.where(torch.isfinite(loss_sum) & torch.isfinite(grad_norm),
                                         first_bad_step, first_bad_step.clamp(max=step))
            images_since_log += batch_size
            progress.update(1)

            if step % protocol["log_every"] == 0 or step == steps:
                check_finite()
                if world_size > 1:
                    dist.all_reduce(interval_loss)
                now = time.perf_counter()
                line = {"step": step, "loss": interval_loss.item() / images_since_log,
                        "lr": lr_at(step, lr, steps, protocol["warmup_steps"]),
                        "grad_norm": interval_grad_norm.item() / (step - last_log_step),
                        "img_s": images_since_log / (now - last_log),
                        "elapsed_s": elapsed_before + now - loop_start}
                metrics.append(line)
                if rank == 0:
                    tqdm.write(json.dumps(line), file=sys.stdout)
                    sys.stdout.flush()
                    progress.set_postfix(loss=f"{line['loss']:.4f}")
                interval_loss.zero_()
                interval_grad_norm.zero_()
                images_since_log, last_log_step, last_log = 0, step, now

            if rank == 0 and (step % protocol["eval_every"] == 0 or step == steps):
                eval_start = time.perf_counter()
                line = {"step": step, **minival_metrics(model, minival_loader, minival_split.num_classes, device)}
                metrics.append(line)
                tqdm.write(json.dumps(line), file=sys.stdout)
                sys.stdout.flush()
                eval_seconds += time.perf_counter() - eval_start
                last_log += time.perf_counter() - eval_start  # img_s counts training time only

            if step % protocol["checkpoint_every"] == 0 and step < steps:
                check_finite()
                if rank == 0:
                    save_state(resume_dir, {
                        "fingerprint": fingerprint, "step": step, "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "rng": rng_state(), "metrics": metrics,
                        "elapsed_s": elapsed_before + time.perf_counter() - loop_start,
                        "started_utc": started_utc})
    except torch.OutOfMemoryError:
        raise PipelineError(
            f"CUDA out of memory with micro-batches of {micro} images on {device}; set "
            f"protocol.micro_batch_size to a smaller divisor of {batch_size} (e.g. {max(1, micro // 2)}) "
            "and rerun: the job resumes from its last checkpoint with the same result") from None
    finally:
        progress.close()
    loop_seconds = time.perf_counter() - loop_start

    if world_size > 1:
        dist.destroy_process_group()
    if rank != 0:
        return None
    final = metrics[-1]
    summary = {
        "checkpoint": Path(checkpoint).name.removesuffix(".safetensors"), "dataset": dataset_record["name"],
        "lr": lr, "seed": seed, "steps": steps, "batch_size": batch_size, "micro_batch_size": micro,
        "world_size": world_size, "device": device.type, "device_names": device_names(device, world_size),
        "precision": precision_name(protocol["precision"], device), "inception_crop": protocol["inception_crop"],
        "minival_top1": final["minival_top1"], "minival_top5": final["minival_top5"],
        "minival_loss": final["minival_loss"], "train_seconds": elapsed_before + loop_seconds,
        "img_s": (steps - start_step) * batch_size / max(loop_seconds - eval_seconds, 1e-9),
        "resumed_from_step": start_step or None, "protocol": protocol,
        "started_utc": started_utc, "finished_utc": utc_now(),
    }
    model_io.save_model(model, architecture, out_dir / "model.safetensors")  # atomic itself
    with atomic_path(out_dir / "metrics.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(m) + "\n" for m in metrics))
    write_json(out_dir / "summary.json", summary)
    (resume_dir / STATE_FILE).unlink(missing_ok=True)  # the outputs now hold everything
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="converted .safetensors (convert_weights)")
    parser.add_argument("--data", required=True, help="dataset.json written by prepare_data")
    parser.add_argument("--out-dir", required=True, help="run folder for model, metrics and summary")
    parser.add_argument("--resume-dir", required=True, help="folder for resume state (not a Snakemake output)")
    parser.add_argument("--lr", type=float, required=True, help="base learning rate")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True, help="optimizer updates")
    parser.add_argument("--protocol", required=True, help="the config's protocol block as JSON")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (protocol.threads overrides)")
    args = parser.parse_args(argv)
    for flag, path in (("--checkpoint", args.checkpoint), ("--data", args.data)):
        if not Path(path).is_file():
            raise PipelineError(f"{flag} {path}: file not found (did the stage that writes it run?)")
    train(args.checkpoint, args.data, args.out_dir, args.resume_dir, args.lr, args.seed, args.steps,
          parse_protocol(args.protocol), args.threads)
    return 0


if __name__ == "__main__":
    run_cli(main)
