"""Evaluate models on a dataset's test split with a named preprocessing protocol.

Modes:
- `--selection SEL.json`: every run of the selected LR (one per seed) on the test split, once;
  writes R/evaluate/{ckpt}/{dataset}.json with the mean and standard deviation over seeds.
- `--model M.safetensors --split test`: a checkpoint as it is (the evaluation-pipeline baseline).
- `--bench`: the evaluation engine against a bare timm forward loop on CPU, same model and data;
  the last line printed is JSON {"eval_img_s", "bare_img_s", "ratio"}.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import convert, data
from .common import PipelineError, json_arg, read_json, run_cli, write_json

INTERPOLATION = "bilinear, half-pixel centres, no antialias (as tf.image.resize in the official code)"


def evaluate_model(model: torch.nn.Module, loader, num_classes: int, device) -> dict:
    """Top-1/top-5 (%), mean cross-entropy, per-class top-1, confusion matrix (<= 100 classes), img/s.

    Counts accumulate on the device without per-batch host syncs; bf16 autocast on CUDA, fp32 on CPU.
    """
    device = torch.device(device)
    k = min(5, num_classes)
    classes = torch.arange(num_classes, device=device)
    per_class = torch.zeros(num_classes, dtype=torch.int64, device=device)
    per_class_hits = torch.zeros(num_classes, dtype=torch.int64, device=device)
    topk_hits = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device) if num_classes <= 100 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    model.eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for images, labels in loader:
            with autocast:
                logits = model(images)
            logits = logits.float()
            if logits.shape[1] != num_classes:
                raise PipelineError(f"the model has {logits.shape[1]} outputs, the dataset {num_classes} classes")
            loss_sum += F.cross_entropy(logits, labels, reduction="sum")
            top = logits.topk(k, dim=1).indices
            is_label = labels[:, None] == classes  # one-hot without a device sync
            per_class += is_label.sum(0)
            per_class_hits += (is_label & (top[:, :1] == labels[:, None])).sum(0)
            topk_hits += (top == labels[:, None]).any(1).sum()
            if confusion is not None:
                confusion += (is_label[:, :, None] & (top[:, :1] == classes)[:, None, :]).sum(0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    counts, hits = per_class.cpu(), per_class_hits.cpu()
    n = int(counts.sum())
    if n == 0:
        raise PipelineError("evaluation saw no images (empty split?)")
    return {
        "top1": 100.0 * int(hits.sum()) / n,
        "top5": 100.0 * int(topk_hits) / n,
        "top5_note": None if k == 5 else f"top-{k}: the dataset has {num_classes} classes (k = min(5, classes))",
        "loss": float(loss_sum) / n,
        "num_images": n,
        "num_classes": num_classes,
        "per_class_top1": [100.0 * h / c if c else None for h, c in zip(hits.tolist(), counts.tolist())],
        "confusion": None if confusion is None else confusion.cpu().tolist(),
        "images_per_s": n / seconds,
    }


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluate_checkpoint(model_path, spec: dict, split, protocol: dict, batch_size: int, num_workers: int,
                        mean: float, std: float, device) -> dict:
    """One checkpoint on an opened split: an evaluation result with its preprocessing recorded."""
    arch = convert.read_architecture(model_path)
    if arch["num_classes"] != spec["num_classes"]:
        raise PipelineError(
            f"{model_path}: head has {arch['num_classes']} classes but dataset '{spec['name']}' has "
            f"{spec['num_classes']}; evaluate a model whose head matches this dataset"
        )
    model = convert.load_model(model_path).to(device)
    loader = data.eval_loader(split, protocol, arch["image_size"], batch_size, device, num_workers, mean, std)
    result = evaluate_model(model, loader, spec["num_classes"], device)
    result["protocol"] = {**protocol, "image_size": arch["image_size"], "pixel_mean": mean, "pixel_std": std,
                          "interpolation": INTERPOLATION}
    result["split"] = spec["test_split"] if split.name == spec["test_split"] else split.name
    result["model"] = str(model_path)
    result["dataset"] = spec["name"]
    return result


def _normalisation(summary: dict, path: Path, mean: float | None, std: float | None) -> tuple[float, float]:
    """The pixel normalisation the run was trained with; the CLI values must agree when given."""
    trained = summary.get("protocol") or {}
    pair = (trained.get("pixel_mean", mean), trained.get("pixel_std", std))
    if None in pair:
        raise PipelineError(f"{path}: no protocol.pixel_mean/pixel_std recorded; pass --pixel-mean/--pixel-std")
    if (mean is not None and mean != pair[0]) or (std is not None and std != pair[1]):
        raise PipelineError(f"{path}: trained with pixel mean/std {pair}, but --pixel-mean/--pixel-std say "
                            f"{(mean, std)}; they must match")
    return pair


def evaluate_selection(selection_path, spec: dict, protocol: dict, batch_size: int, num_workers: int,
                       device, mean: float | None = None, std: float | None = None) -> dict:
    """Evaluate each selected run (one per seed) on the test split once; mean and std over seeds."""
    selection = read_json(selection_path)
    if not selection.get("selected_runs"):
        raise PipelineError(f"{selection_path}: no selected_runs; rerun select_lr")
    split = data.open_split(spec, "test")
    runs = []
    for run_dir in selection["selected_runs"]:
        summary_path = Path(run_dir) / "summary.json"
        summary = read_json(summary_path)
        run_mean, run_std = _normalisation(summary, summary_path, mean, std)
        result = evaluate_checkpoint(Path(run_dir) / "model.safetensors", spec, split, protocol, batch_size,
                                     num_workers, run_mean, run_std, device)
        runs.append({"seed": summary["seed"], "lr": summary["lr"], **result})
        print(f"{run_dir}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
              f"({result['images_per_s']:.0f} img/s)", flush=True)
    top1, top5 = [r["top1"] for r in runs], [r["top5"] for r in runs]
    return {
        "checkpoint": selection["checkpoint"],
        "dataset": selection["dataset"],
        "selected_lr": selection["selected_lr"],
        "selection": str(selection_path),
        "protocol": runs[0]["protocol"],
        "runs": runs,
        "top1_mean": statistics.fmean(top1),
        "top1_std": statistics.stdev(top1) if len(runs) > 1 else None,  # sample std; undefined for one seed
        "top5_mean": statistics.fmean(top5),
        "top5_std": statistics.stdev(top5) if len(runs) > 1 else None,
        "num_seeds": len(runs),
    }


# ---------------------------------------------------------------------------------------------
BENCH_ARCHITECTURE = {"patch_size": 4, "hidden_dim": 128, "num_blocks": 4, "tokens_mlp_dim": 64,
                      "channels_mlp_dim": 512, "num_classes": 10, "image_size": 32}


def bench(threads: int, batch_size: int, batches: int, rounds: int) -> dict:
    """Evaluation engine vs a bare timm forward loop on CPU: same model, batches and threads.

    The two alternate (order swapped every round) and the ratio is the median of the per-round
    ratios, so a load spike from other processes hits both sides of a round alike.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = convert.build_model(BENCH_ARCHITECTURE).eval()
    size, classes = BENCH_ARCHITECTURE["image_size"], BENCH_ARCHITECTURE["num_classes"]
    loader = [(torch.randn(batch_size, 3, size, size), torch.randint(0, classes, (batch_size,)))
              for _ in range(batches)]

    def bare() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for images, _ in loader:
                model(images)
        return batch_size * batches / (time.perf_counter() - start)

    def engine() -> float:
        return evaluate_model(model, loader, classes, "cpu")["images_per_s"]

    bare(), engine()  # warm-up
    eval_img_s, bare_img_s = [], []
    for i in range(rounds):
        if i % 2:
            bare_img_s.append(bare())
            eval_img_s.append(engine())
        else:
            eval_img_s.append(engine())
            bare_img_s.append(bare())
    ratios = [e / b for e, b in zip(eval_img_s, bare_img_s)]
    return {"eval_img_s": round(statistics.median(eval_img_s), 1), "bare_img_s": round(statistics.median(bare_img_s), 1),
            "ratio": round(statistics.median(ratios), 3), "threads": threads, "batch_size": batch_size,
            "rounds": rounds, "architecture": BENCH_ARCHITECTURE}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--selection", help="select_lr output: evaluate its selected runs")
    mode.add_argument("--model", help="a converted checkpoint to evaluate as it is")
    mode.add_argument("--bench", action="store_true", help="benchmark against a bare timm loop and exit")
    p.add_argument("--data", help="dataset.json")
    p.add_argument("--split", default="test", choices=["test"], help="always the dataset's test split")
    p.add_argument("--protocol-name")
    p.add_argument("--protocol", help="the evaluation protocol's config entry as JSON")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--pixel-mean", type=float, help="pixel normalisation (default: the run's training protocol)")
    p.add_argument("--pixel-std", type=float)
    p.add_argument("--batches", type=int, default=2, help="--bench: batches per timed pass")
    p.add_argument("--rounds", type=int, default=15, help="--bench: timed passes of each loop")
    p.add_argument("--out", help="output JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    if args.bench:
        result = bench(max(1, args.threads), args.batch_size, args.batches, args.rounds)
        print(json.dumps(result))
        return 0
    for flag in ("data", "protocol_name", "protocol", "out"):
        if getattr(args, flag) is None:
            p.error(f"--{flag.replace('_', '-')} is required")
    spec = data.load_spec(args.data)
    protocol = {"name": args.protocol_name, **json_arg(args.protocol, "--protocol")}
    device = _device()
    if args.selection:
        result = evaluate_selection(args.selection, spec, protocol, args.batch_size, args.num_workers, device,
                                    args.pixel_mean, args.pixel_std)
    else:
        if args.pixel_mean is None or args.pixel_std is None:
            p.error("--model needs --pixel-mean and --pixel-std (config protocol.pixel_mean / pixel_std)")
        result = evaluate_checkpoint(args.model, spec, data.open_split(spec, "test"), protocol, args.batch_size,
                                     args.num_workers, args.pixel_mean, args.pixel_std, device)
        print(f"{args.model}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    run_cli(main)
