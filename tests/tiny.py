"""The tiny converted checkpoint and array dataset that the in-process fine-tuning, evaluation and preflight
tests share: the files the convert and prepare stages would have written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from workflow_scripts import model_io


def write_checkpoint(root: Path, arch: dict) -> Path:
    """A converted checkpoint of `arch` (seeded weights) at root/ckpt.safetensors."""
    torch.manual_seed(0)
    path = root / "ckpt.safetensors"
    model_io.save_model(model_io.build_model(arch), arch, path)
    return path


def write_arrays(root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str],
                 minival_fraction: float) -> Path:
    """An array-layout dataset (one {split}.npz of uint8 images and int64 labels per split) and its
    dataset.json as the prepare stage writes it; the train split holds the minival fraction."""
    for split, (images, labels) in splits.items():
        np.savez(root / f"{split}.npz", images=images, labels=labels)
    path = root / "dataset.json"
    path.write_text(json.dumps({
        "name": "tiny", "label": "Tiny", "layout": "arrays", "root": str(root), "classes": classes,
        "num_classes": len(classes), "splits": {split: len(labels) for split, (_, labels) in splits.items()},
        "train_split": "train", "test_split": "test", "minival": {"fraction": minival_fraction, "seed": 0},
        "subset": False, "subset_note": None}))
    return path


def random_split(rng: np.random.Generator, n: int, pixels: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """n random images of pixels x pixels, labelled 0, 1, ..., num_classes - 1, 0, ... in turn."""
    return (rng.integers(0, 256, (n, pixels, pixels, 3), dtype=np.uint8),
            np.arange(n, dtype=np.int64) % num_classes)


def write_random(root: Path, arch: dict, sizes: dict[str, int], pixels: int, classes: list[str],
                 minival_fraction: float) -> Path:
    """A checkpoint of `arch` and a dataset of random images (sizes: {split: n}) under root; returns root."""
    write_checkpoint(root, arch)
    rng = np.random.default_rng(0)
    splits = {split: random_split(rng, n, pixels, len(classes)) for split, n in sizes.items()}
    write_arrays(root, splits, classes, minival_fraction)
    return root
