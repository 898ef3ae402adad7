"""What a model costs: parameters without the head (the paper's Table 1) and inference images per second per
device (Table 3's throughput column), measured on this machine in the precision the study runs in.

python -m workflow_scripts.model_stats MODEL.safetensors --out STATS.json [--name NAME] [--precision auto]
    [--device auto] [--batch-size 64] [--warmup 3] [--rounds 5] [--iterations 5] [--threads N]

The JSON: {"model", "image_size", "precision", "device", "device_name", "img_s", "batch_size",
"params_excluding_head", "architecture", "img_s_rounds", "warmup", "iterations", "threads"}. img_s is the
median over rounds of (batch_size x iterations) images over the round's wall time, the device synchronised
before the clock starts and stops. The paper's figures are img/s per TPU-v3 core: another device, so only
ratios between models measured here are comparable with its ratios.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from workflow_scripts import model_io
from workflow_scripts.common import PipelineError, run_cli, write_json
from workflow_scripts.devices import autocast_context, is_out_of_memory, precision_name

# Table 1 counts "parameters (head excluded)": the classifier is timm's `head` Linear; the pre-head
# LayerNorm (`norm`) is part of the body, as in the official model (vit_jax/models_mixer.py).
HEAD_PREFIX = "head."


def params_excluding_head(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> int:
    """Number of parameters of a timm MlpMixer (module or state dict) without its classifier head."""
    if isinstance(model_or_state, nn.Module):
        named = model_or_state.named_parameters()
    else:
        named = model_or_state.items()
    return sum(t.numel() for name, t in named if not name.startswith(HEAD_PREFIX))


def architecture_params_excluding_head(architecture: Mapping) -> int:
    """The count for an architecture, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return params_excluding_head(model_io.build_model(architecture))


def resolve_device(device: str) -> torch.device:
    """"auto": the first CUDA device if there is one (the GPU a job was given), else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise PipelineError(f"--device {device!r}: not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"--device {device}: no CUDA device here; use --device auto or cpu")
    return resolved


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput_rounds(model: nn.Module, image_size: int, batch_size: int, precision: str, device: torch.device,
                      warmup: int = 3, rounds: int = 5, iterations: int = 5) -> list[float]:
    """Inference images per second of `model` on `device`, one figure per round of `iterations` batches.

    The input is a fixed batch already on the device (no data loading: the model's own cost), forward only
    (inference mode), under the project's autocast (`devices.autocast_context`: "auto" is bf16 on CUDA, fp32
    on CPU). `warmup` batches first (kernel selection, allocator, caches), untimed.
    """
    if min(batch_size, rounds, iterations) < 1 or warmup < 0:
        raise PipelineError(f"batch size {batch_size}, rounds {rounds}, iterations {iterations} must be >= 1 and "
                            f"warm-up {warmup} >= 0")
    model = model.to(device).eval()
    images = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    images = images.to(device)
    rates = []
    with torch.inference_mode(), autocast_context(precision, device):
        for _ in range(warmup):
            model(images)
        for _ in range(rounds):
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(iterations):
                model(images)
            _synchronize(device)
            rates.append(batch_size * iterations / (time.perf_counter() - start))
    return rates


def model_stats(path: str | os.PathLike, *, name: str | None = None, precision: str = "auto", device: str = "auto",
                batch_size: int = 64, warmup: int = 3, rounds: int = 5, iterations: int = 5) -> dict:
    """Parameters without the head and inference throughput of a converted or fine-tuned checkpoint."""
    arch = model_io.read_architecture(path)
    model = model_io.load_model(path)
    target = resolve_device(device)
    try:
        rates = throughput_rounds(model, arch["image_size"], batch_size, precision, target, warmup, rounds,
                                  iterations)
    except Exception as e:
        if is_out_of_memory(e):
            raise PipelineError(f"{path}: out of memory at --batch-size {batch_size} on {device_name(target)}; "
                                f"give a smaller --batch-size") from None
        raise
    return {"model": name or Path(path).stem, "image_size": arch["image_size"],
            "precision": precision_name(precision, target), "device": str(target),
            "device_name": device_name(target), "img_s": statistics.median(rates), "batch_size": batch_size,
            "params_excluding_head": params_excluding_head(model), "architecture": arch, "img_s_rounds": rates,
            "warmup": warmup, "iterations": iterations, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.model_stats", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="converted or fine-tuned checkpoint (.safetensors)")
    ap.add_argument("--out", required=True, help="JSON to write")
    ap.add_argument("--name", help="the model's name in the JSON (default: the file name without .safetensors)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="as protocol.precision: auto = bf16 autocast on CUDA, fp32 on CPU")
    ap.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds; img_s is their median")
    ap.add_argument("--iterations", type=int, default=5, help="batches per timed round")
    ap.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    stats = model_stats(args.model, name=args.name, precision=args.precision, device=args.device,
                        batch_size=args.batch_size, warmup=args.warmup, rounds=args.rounds,
                        iterations=args.iterations)
    write_json(args.out, stats)
    print(f"{stats['model']}: {stats['img_s']:.3g} img/s at {stats['image_size']} px, batch {stats['batch_size']}, "
          f"{stats['precision']} on {stats['device_name']}; {stats['params_excluding_head']:,} parameters "
          f"without the head")
    return 0


if __name__ == "__main__":
    run_cli(main)
