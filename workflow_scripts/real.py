"""ImageNet ReaL top-1 from stored test predictions (the model is not run again).

Definition: Beyer et al. 2020, "Are we done with ImageNet?" (arXiv:2006.07159) and its data,
google-research/reassessed-imagenet `real.json`: a JSON list of 50,000 lists of class indices
(0..999), one per validation image in the order of the validation file names sorted
(ILSVRC2012_val_00000001.JPEG first). Images whose list is empty are left out; ReaL top-1 is the
share of the remaining images whose top-1 prediction is in their list, in %.

The predictions come from `evaluate --predictions-out` in split order (class folder, then file name),
so they are reordered by file name here before they meet real.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from . import splits
from .common import PipelineError, run_cli, sha256_file, write_json

DEFINITION = ('Beyer et al. 2020, "Are we done with ImageNet?" (arXiv:2006.07159), '
              "google-research/reassessed-imagenet real.json; images with an empty label list left out")
SOURCE_FIX = ("point it at real.json of google-research/reassessed-imagenet (one list of class indices per "
              "validation image, in sorted file-name order)")


def load_real_labels(path, num_images: int, num_classes: int, dataset: str = "imagenet") -> list[list[int]]:
    """real.json as a list of label lists, checked; any problem is one error naming the config key."""
    key = f"datasets.{dataset}.real_labels"
    try:
        raw = Path(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise PipelineError(f"{path}: file not found ({key}); {SOURCE_FIX}") from None
    except OSError as e:
        raise PipelineError(f"{path}: cannot be read ({e}) ({key}); {SOURCE_FIX}") from None
    try:
        labels = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path}: not valid JSON ({e}) ({key}); {SOURCE_FIX}") from None
    if not isinstance(labels, list):
        raise PipelineError(f"{path}: a {type(labels).__name__}, not a JSON list of lists ({key}); {SOURCE_FIX}")
    for i, entry in enumerate(labels):
        if not isinstance(entry, list) or not all(_is_class(c, num_classes) for c in entry):
            raise PipelineError(
                f"{path}: entry {i} is {json.dumps(entry)[:80]}, not a list of class indices 0..{num_classes - 1} "
                f"({key}); {SOURCE_FIX}"
            )
    if len(labels) != num_images:
        raise PipelineError(
            f"{path}: {len(labels):,} label lists but the validation split has {num_images:,} images ({key}); "
            f"ReaL needs one list per validation image: {SOURCE_FIX}, and the complete validation set "
            "(a subset tree, allow_subset: true, cannot be scored with it)"
        )
    return labels


def _is_class(value, num_classes: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < num_classes


def load_predictions(path) -> dict[str, np.ndarray]:
    """An `evaluate --predictions-out` file: top5 (runs, N, k), labels (N,), models, seeds?, file_names?"""
    try:
        with np.load(path, allow_pickle=False) as z:
            predictions = {key: z[key] for key in z.files}
    except FileNotFoundError:
        raise PipelineError(f"{path}: predictions file not found; run evaluate with --predictions-out") from None
    except (ValueError, OSError) as e:
        raise PipelineError(f"{path}: not a predictions .npz ({e}); delete it and rerun evaluate") from None
    missing = sorted({"top5", "labels", "models"} - set(predictions))
    if missing:
        raise PipelineError(f"{path}: not a predictions file of evaluate (no {missing}); delete it and rerun evaluate")
    shape, runs, images = predictions["top5"].shape, len(predictions["models"]), len(predictions["labels"])
    if len(shape) != 3 or shape[:2] != (runs, images) or runs == 0:
        raise PipelineError(f"{path}: top5 has shape {shape}, expected ({runs} runs >= 1, {images} images, k); "
                            "delete it and rerun evaluate")
    return predictions


def file_name_order(predictions: dict[str, np.ndarray]) -> np.ndarray:
    """Indices that put the predictions in sorted file-name order (real.json's order).

    Without file names (an array split) the split's own sample order is real.json's order.
    """
    if "file_names" not in predictions:
        return np.arange(predictions["top5"].shape[1])
    names = predictions["file_names"]
    order = np.argsort(names, kind="stable")
    repeated = names[order][1:][names[order][1:] == names[order][:-1]]
    if len(repeated):
        raise PipelineError(f"validation file name {str(repeated[0])!r} occurs in more than one class folder; "
                            "the file names must be unique to be matched with real.json")
    return order


def real_top1(top1_by_name: np.ndarray, real_labels: list[list[int]]) -> dict:
    """ReaL top-1 (%) of top-1 predictions given in real.json's image order, and the images counted."""
    hits = used = 0
    for predicted, labels in zip(top1_by_name.tolist(), real_labels, strict=True):
        if labels:
            used += 1
            hits += predicted in labels
    if used == 0:
        raise PipelineError("every label list of real.json is empty: there is nothing to score")
    return {"real_top1": 100.0 * hits / used, "num_images": used, "num_excluded_empty": len(real_labels) - used}


def evaluate_real(predictions_path, real_labels_path, dataset_record: dict) -> dict:
    """ReaL top-1 of every run in a predictions file: per run, and the mean and std over runs."""
    predictions = load_predictions(predictions_path)
    num_images = dataset_record["splits"][dataset_record["test_split"]]
    if predictions["top5"].shape[1] != num_images:
        raise PipelineError(f"{predictions_path}: {predictions['top5'].shape[1]:,} images but the test split of "
                            f"'{dataset_record['name']}' has {num_images:,}; rerun evaluate on this dataset")
    real_labels = load_real_labels(real_labels_path, num_images, dataset_record["num_classes"], dataset_record["name"])
    order = file_name_order(predictions)
    seeds = predictions["seeds"].tolist() if "seeds" in predictions else [None] * len(predictions["models"])
    runs = []
    for top5, model, seed in zip(predictions["top5"], predictions["models"].tolist(), seeds):
        counts = real_top1(top5[order, 0], real_labels)  # the image counts are the same for every run
        top1 = 100.0 * float(np.mean(top5[:, 0] == predictions["labels"]))  # the original labels, as a check
        runs.append({"model": model, "seed": seed, "real_top1": counts["real_top1"], "top1": top1})
    scores = [run["real_top1"] for run in runs]
    return {
        "dataset": dataset_record["name"],
        "real_top1": statistics.fmean(scores),
        "real_top1_std": statistics.stdev(scores) if len(scores) > 1 else None,  # sample std, as evaluate
        "num_images": counts["num_images"],
        "num_excluded_empty": counts["num_excluded_empty"],
        "num_validation_images": num_images,
        "runs": runs,
        "image_order": "file names sorted" if "file_names" in predictions else "split sample order",
        "predictions": str(predictions_path),
        "predictions_sha256": sha256_file(predictions_path),
        "real_labels": str(real_labels_path),
        "real_labels_sha256": sha256_file(real_labels_path),
        "definition": DEFINITION,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--predictions", required=True, help="evaluate --predictions-out file (.npz)")
    p.add_argument("--real-labels", required=True, help="real.json (config datasets.<name>.real_labels)")
    p.add_argument("--data", required=True, help="dataset.json of the dataset the predictions were made on")
    p.add_argument("--protocol", help="the evaluation protocol the predictions were made with (recorded)")
    p.add_argument("--out", required=True, help="output JSON")
    args = p.parse_args(argv)
    result = evaluate_real(args.predictions, args.real_labels, splits.load_dataset_record(args.data))
    result["protocol"] = args.protocol
    print(f"{args.predictions}: ReaL top-1 {result['real_top1']:.2f}% on {result['num_images']:,} images "
          f"({result['num_excluded_empty']:,} without a label left out)")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    run_cli(main)
