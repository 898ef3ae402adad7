"""Evaluate models on a dataset's test split with a named preprocessing protocol.

Modes:
- `--selection SEL.json`: every run of the selected LR (one per seed) on the test split, once;
  writes R/evaluate/{ckpt}/{dataset}.json with the mean and standard deviation over seeds.
- `--model M.safetensors --split test`: a checkpoint as it is (the evaluation-pipeline baseline).

--protocol is a config entry of evaluation.protocols (data.eval_transform): `resize` "direct" (the official
code's plain resize), "shorter_side" (the paper's resmall-crop), "square" (the paper's resize-crop), or
"timm" with `timm_model` (timm's own evaluation transform for that model).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import data, model_io, splits
from .common import PipelineError, atomic_path, json_arg, read_json, run_cli, write_json
from .devices import autocast_context, is_out_of_memory, uses_bf16

# The evaluation precisions (the result's "precision"): a near-tie between two classes is decided by logits
# that bf16 would round to steps of 0.06-0.125 (for logits of 8-32), so the head always runs in fp32.
FP32 = "fp32"
BF16_FP32_HEAD = "bf16 autocast, fp32 head"


def has_separate_head(model: torch.nn.Module) -> bool:
    """timm models split into forward_features (the body) and forward_head (pooling and classifier)."""
    return callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))


def evaluation_precision(model: torch.nn.Module, precision: str, device) -> str:
    """What `fp32_logits` runs: the body in bf16 where `precision` asks for it (protocol.precision's values)
    and the model has a separate head; everything else in fp32."""
    return BF16_FP32_HEAD if uses_bf16(precision, device) and has_separate_head(model) else FP32


def fp32_logits(model: torch.nn.Module, images: torch.Tensor, precision: str) -> torch.Tensor:
    """The model's logits computed in fp32 by the classifier head (`evaluation_precision` says how the
    body ran), whatever autocast context the caller is in."""
    device_type = images.device.type
    if evaluation_precision(model, precision, images.device) == FP32:
        with torch.autocast(device_type, enabled=False):
            return model(images).float()
    with autocast_context(precision, images.device):
        features = model.forward_features(images)
    with torch.autocast(device_type, enabled=False):
        return model.forward_head(features.float())


def evaluate_model(model: torch.nn.Module, loader, num_classes: int, device, precision: str = "auto") -> dict:
    """Top-1/top-5 (%), mean cross-entropy, per-class top-1, confusion matrix (<= 100 classes), img/s,
    and `precision` (`evaluation_precision`: with "auto", bf16 body and fp32 head on CUDA, fp32 on CPU).

    Also `predictions`: {"top5": (N, k) int16/int32 class indices, best first, k = min(5, classes);
    "labels": (N,) int64}, numpy, in loader order (not JSON: `main` writes it with --predictions-out).
    Counts accumulate on the device without per-batch host syncs.
    """
    device = torch.device(device)
    k = min(5, num_classes)
    classes = torch.arange(num_classes, device=device)
    per_class = torch.zeros(num_classes, dtype=torch.int64, device=device)
    per_class_hits = torch.zeros(num_classes, dtype=torch.int64, device=device)
    topk_hits = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device) if num_classes <= 100 else None
    index_dtype = torch.int16 if num_classes <= torch.iinfo(torch.int16).max else torch.int32
    top_per_batch, labels_per_batch = [], []  # stay on the device; moved to the host once at the end
    model.eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for images, labels in loader:
            logits = fp32_logits(model, images, precision)
            if logits.shape[1] != num_classes:
                raise PipelineError(f"the model has {logits.shape[1]} outputs, the dataset {num_classes} classes")
            loss_sum += F.cross_entropy(logits, labels, reduction="sum")
            top = logits.topk(k, dim=1).indices
            is_label = labels[:, None] == classes  # one-hot without a device sync
            per_class += is_label.sum(0)
            per_class_hits += (is_label & (top[:, :1] == labels[:, None])).sum(0)
            topk_hits += (top == labels[:, None]).any(1).sum()
            top_per_batch.append(top.to(index_dtype))
            labels_per_batch.append(labels)
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
        "precision": evaluation_precision(model, precision, device),
        "predictions": {"top5": torch.cat(top_per_batch).cpu().numpy(),
                        "labels": torch.cat(labels_per_batch).cpu().numpy()},
    }


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluate_checkpoint(model_path, dataset_record: dict, split, protocol: dict, batch_size: int, num_workers: int,
                        mean: float, std: float, device, precision: str = "auto", decode_device: str = "cpu") -> dict:
    """One checkpoint on an opened split: an evaluation result with its preprocessing and precision recorded
    in its `protocol` (the config entry, image_size, pixel_mean/pixel_std, interpolation, transform: what
    the images went through; with the timm protocol also timm_data_config; precision)."""
    arch = model_io.read_architecture(model_path)
    if arch["num_classes"] != dataset_record["num_classes"]:
        raise PipelineError(
            f"{model_path}: head has {arch['num_classes']} classes but dataset '{dataset_record['name']}' has "
            f"{dataset_record['num_classes']}; evaluate a model whose head matches this dataset"
        )
    model = model_io.load_model(model_path).to(device)
    loader = data.eval_loader(split, protocol, arch["image_size"], batch_size, device, num_workers, mean, std,
                              decode_device)
    result = evaluate_model(model, loader, dataset_record["num_classes"], device, precision)
    result["protocol"] = {**protocol, "image_size": arch["image_size"], "pixel_mean": mean, "pixel_std": std,
                          **loader.transform.description(), "precision": result.pop("precision")}
    result["split"] = dataset_record["test_split"] if split.name == dataset_record["test_split"] else split.name
    result["model"] = str(model_path)
    result["dataset"] = dataset_record["name"]
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


def runs_to_evaluate(summaries: list, models: list, selected_lr: float | None) -> list[tuple[dict, str, str]]:
    """(summary, summary path, model path) of the runs to evaluate, by (lr, seed): all the runs given, or
    only those of selected_lr (the runs given are then every run of the sweep). `summaries` and `models`
    are the files of the same runs, in the same order."""
    if not summaries or len(summaries) != len(models):
        raise PipelineError(f"{len(summaries)} summaries and {len(models)} models; give one of each per run")
    runs = [(read_json(s), str(s), str(m)) for s, m in zip(summaries, models)]
    if selected_lr is not None:
        runs = [run for run in runs if float(run[0]["lr"]) == float(selected_lr)]
        if not runs:
            raise PipelineError(f"no run of lr {selected_lr} among the {len(summaries)} summaries given; "
                                "pass every run of the sweep (--summaries/--models)")
    return sorted(runs, key=lambda run: (run[0]["lr"], run[0]["seed"]))


def evaluate_runs(summaries: list, models: list, dataset_record: dict, protocol: dict, batch_size: int,
                  num_workers: int, device, mean: float | None = None, std: float | None = None,
                  precision: str = "auto", decode_device: str = "cpu", selection_path=None) -> dict:
    """Evaluate fine-tuned runs (e.g. one per seed) on the test split once; mean and std over them.

    With selection_path (select_lr's output), only the runs of the selected LR are evaluated."""
    selection = read_json(selection_path) if selection_path else None
    split = splits.open_split(dataset_record, "test")
    runs = []
    for summary, summary_path, model_path in runs_to_evaluate(summaries, models,
                                                              selection["selected_lr"] if selection else None):
        run_mean, run_std = _normalisation(summary, Path(summary_path), mean, std)
        result = evaluate_checkpoint(model_path, dataset_record, split, protocol, batch_size,
                                     num_workers, run_mean, run_std, device, precision, decode_device)
        runs.append({"checkpoint": summary.get("checkpoint"), "seed": summary["seed"], "lr": summary["lr"],
                     "trained_on": summary.get("train_on", "train"), **result})
        print(f"{model_path}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
              f"({result['images_per_s']:.0f} img/s)", flush=True)
    return seed_summary(runs, selection, selection_path)


def seed_summary(runs: list[dict], selection: dict | None, selection_path) -> dict:
    """The evaluation file: every run, and mean and sample std over them (std undefined for one run)."""
    top1, top5, lrs = [r["top1"] for r in runs], [r["top5"] for r in runs], {r["lr"] for r in runs}
    return {
        "checkpoint": runs[0]["checkpoint"],
        "dataset": runs[0]["dataset"],
        "selected_lr": selection["selected_lr"] if selection else (lrs.pop() if len(lrs) == 1 else None),
        "selection": str(selection_path) if selection_path else None,
        "protocol": runs[0]["protocol"],
        "runs": runs,
        "top1_mean": statistics.fmean(top1),
        "top1_std": statistics.stdev(top1) if len(runs) > 1 else None,
        "top5_mean": statistics.fmean(top5),
        "top5_std": statistics.stdev(top5) if len(runs) > 1 else None,
        "num_seeds": len({r["seed"] for r in runs}),
        "num_images": runs[0]["num_images"],
    }


def write_predictions(path, split: splits.Split, runs: list[dict]) -> None:
    """The per-image predictions of evaluation results (one per model, same split) as one .npz, atomically.

    Keys: `top5` (runs, N, k) int16/int32 class indices, best first, in split order; `labels` (N,);
    `models` (runs,) str; `seeds` (runs,) int64 when every run has one; `file_names` (N,) str, each
    image's base name, for image-folder splits (an array split has none: its order is the sample index).
    """
    for run in runs:  # the loader yields the split in order; its labels prove it
        if not np.array_equal(run["predictions"]["labels"], split.labels):
            raise PipelineError(f"{run['model']}: predictions are not in the order of split '{split.name}'")
    arrays = {"top5": np.stack([run["predictions"]["top5"] for run in runs]), "labels": split.labels,
              "models": np.array([str(run["model"]) for run in runs])}
    if all("seed" in run for run in runs):
        arrays["seeds"] = np.array([run["seed"] for run in runs], dtype=np.int64)
    if split.files is not None:
        arrays["file_names"] = np.array([Path(f).name for f in split.files])
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def run_evaluation(args: argparse.Namespace, dataset_record: dict, protocol: dict, device) -> dict:
    """The evaluation the command line asks for; running out of device memory is one clear error."""
    try:
        if args.models:
            return evaluate_runs(args.summaries, args.models, dataset_record, protocol, args.batch_size,
                                 args.num_workers, device, args.pixel_mean, args.pixel_std, args.precision,
                                 args.decode_device, args.selection)
        result = evaluate_checkpoint(args.model, dataset_record, splits.open_split(dataset_record, "test"), protocol,
                                     args.batch_size, args.num_workers, args.pixel_mean, args.pixel_std, device,
                                     args.precision, args.decode_device)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        raise PipelineError(f"out of memory on {device} evaluating batches of {args.batch_size} images; set "
                            f"evaluation.batch_size in the config to a smaller value (e.g. "
                            f"{max(1, args.batch_size // 2)}; it does not change the result) and rerun") from e
    print(f"{args.model}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--models", nargs="+", help="fine-tuned models (model.safetensors) to evaluate")
    mode.add_argument("--model", help="a converted checkpoint to evaluate as it is")
    p.add_argument("--summaries", nargs="+", default=[], help="--models: their summary.json, same order")
    p.add_argument("--selection", help="--models: select_lr's output; evaluate only the runs of its LR")
    p.add_argument("--data", required=True, help="dataset.json")
    p.add_argument("--split", default="test", choices=["test"], help="always the dataset's test split")
    p.add_argument("--protocol-name", required=True)
    p.add_argument("--protocol", required=True, help="the evaluation protocol's config entry as JSON")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", default="0", help="DataLoader workers, or auto (the job's CPUs minus one)")
    p.add_argument("--decode-device", choices=list(data.DECODE_DEVICES), default="cpu",
                   help="where JPEGs are decoded and cropped (config protocol.decode_device)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--pixel-mean", type=float, help="pixel normalisation (default: the run's training protocol)")
    p.add_argument("--pixel-std", type=float)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="the model body's precision (auto: bf16 on CUDA, fp32 on CPU); the head is always fp32")
    p.add_argument("--out", required=True, help="output JSON")
    p.add_argument("--predictions-out", help="also write each image's top-5 classes here (.npz, see write_predictions)")
    args = p.parse_args(argv)
    if args.model and (args.pixel_mean is None or args.pixel_std is None):
        p.error("--model needs --pixel-mean and --pixel-std (config protocol.pixel_mean / pixel_std)")
    torch.set_num_threads(max(1, args.threads))
    args.num_workers = data.resolve_num_workers(args.num_workers, args.threads)
    dataset_record = splits.load_dataset_record(args.data)
    protocol = {"name": args.protocol_name, **json_arg(args.protocol, "--protocol")}
    result = run_evaluation(args, dataset_record, protocol, _device())
    runs = result["runs"] if args.models else [result]
    if args.predictions_out:
        write_predictions(args.predictions_out, splits.open_split(dataset_record, "test"), runs)
    for run in runs:
        del run["predictions"]  # numpy arrays: they go to --predictions-out, not into the JSON
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    run_cli(main)
