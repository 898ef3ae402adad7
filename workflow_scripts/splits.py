"""Prepared datasets on disk: dataset.json, the splits it records, and the held-out minival split.

Kept apart from `data` (images, augmentation, loaders) so that stages which only list files or labels
(prepare_data, real) start without importing torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .common import PipelineError, read_json

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}
DEFAULT_MINIVAL_SEED = 0


def load_dataset_record(dataset_json: str | os.PathLike) -> dict:
    """Read dataset.json; a relative "root" is relative to the folder of dataset.json."""
    path = Path(dataset_json)
    dataset_record = read_json(path)
    for key in ("name", "layout", "root", "classes", "num_classes", "splits", "train_split", "test_split", "minival"):
        if key not in dataset_record:
            raise PipelineError(f"{path}: key '{key}' is missing; rerun prepare_data for this dataset")
    root = Path(dataset_record["root"])
    dataset_record["root"] = str(root if root.is_absolute() else (path.parent / root).resolve())
    return dataset_record


def minival_indices(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the `fraction` of n training samples held out as minival (at least one).

    A pure function of (n, fraction, seed): the same split every run, on every rank.
    """
    if not 0 < fraction < 1:
        raise PipelineError(f"minival.fraction must lie in (0, 1), got {fraction}")
    count = max(1, int(round(n * fraction)))
    if count >= n:
        raise PipelineError(f"minival.fraction {fraction} of {n} training images leaves nothing to train on")
    perm = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    return np.sort(perm[:count])


@dataclass
class Split:
    """One split of a prepared dataset: labels plus either the images (arrays) or their files."""

    name: str
    layout: str
    classes: list[str]
    labels: np.ndarray  # int64 (N,)
    images: np.ndarray | None = None  # arrays layout: uint8 (N, H, W, 3)
    files: list[str] | None = None  # imagefolder layout: one path per sample

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def concat(self, other: "Split") -> "Split":
        """This split followed by another of the same dataset (e.g. train + a held-out split on disk)."""
        return Split(
            name=f"{self.name}+{other.name}",
            layout=self.layout,
            classes=self.classes,
            labels=np.concatenate([self.labels, other.labels]),
            images=None if self.images is None else np.concatenate([self.images, other.images]),
            files=None if self.files is None else self.files + other.files,
        )

    def subset(self, indices: np.ndarray, name: str) -> "Split":
        return Split(
            name=name,
            layout=self.layout,
            classes=self.classes,
            labels=self.labels[indices],
            images=None if self.images is None else self.images[indices],
            files=None if self.files is None else [self.files[i] for i in indices],
        )


def list_imagefolder(split_dir: Path, classes: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Files and labels of <split_dir>/<class>/<image>, ordered by class then file name."""
    files, labels = [], []
    for label, cls in enumerate(classes):
        class_dir = split_dir / cls
        if not class_dir.is_dir():
            raise PipelineError(f"{class_dir}: class folder is missing; rerun prepare_data")
        names = sorted(e.name for e in os.scandir(class_dir) if Path(e.name).suffix.lower() in IMAGE_SUFFIXES)
        files += [str(class_dir / n) for n in names]
        labels += [label] * len(names)
    return files, np.asarray(labels, dtype=np.int64)


def _open_disk_split(dataset_record: dict, disk_split: str) -> Split:
    if disk_split not in dataset_record["splits"]:
        raise PipelineError(
            f"dataset '{dataset_record['name']}' has no split '{disk_split}' "
            f"(it has {sorted(dataset_record['splits'])}); "
            f"fix datasets.{dataset_record['name']}.test_split / minival.split in the config"
        )
    root = Path(dataset_record["root"])
    if dataset_record["layout"] == "arrays":
        path = root / f"{disk_split}.npz"
        try:
            with np.load(path) as z:
                split = Split(disk_split, "arrays", dataset_record["classes"], z["labels"].astype(np.int64),
                              images=z["images"])
        except FileNotFoundError:
            raise PipelineError(f"{path}: not found; rerun prepare_data for '{dataset_record['name']}'") from None
    elif dataset_record["layout"] == "imagefolder":
        files, labels = list_imagefolder(root / disk_split, dataset_record["classes"])
        split = Split(disk_split, "imagefolder", dataset_record["classes"], labels, files=files)
    else:
        raise PipelineError(f"dataset '{dataset_record['name']}': unknown layout '{dataset_record['layout']}'; "
                            "rerun prepare_data")
    if len(split) != dataset_record["splits"][disk_split]:
        raise PipelineError(
            f"{root / disk_split}: {len(split)} images on disk but dataset.json recorded "
            f"{dataset_record['splits'][disk_split]}; the data changed since prepare_data ran; rerun it"
        )
    return split


def open_split(dataset_record: dict, which: str) -> Split:
    """Open "train" (minus the held-out minival), "minival", "full" (the entire training data: train and
    minival together, for the final run at the selected LR) or "test" (the dataset's test split)."""
    minival = dataset_record["minival"]
    if which == "test":
        return _open_disk_split(dataset_record, dataset_record["test_split"])
    if which not in ("train", "minival", "full"):
        raise ValueError(f"open_split: which must be 'train', 'minival', 'full' or 'test', not {which!r}")
    if which == "full":
        train = _open_disk_split(dataset_record, dataset_record["train_split"])
        return train if "split" not in minival else train.concat(_open_disk_split(dataset_record, minival["split"]))
    if "split" in minival:
        return _open_disk_split(dataset_record, dataset_record["train_split"] if which == "train" else minival["split"])
    train = _open_disk_split(dataset_record, dataset_record["train_split"])
    held_out = minival_indices(len(train), minival["fraction"], minival.get("seed", DEFAULT_MINIVAL_SEED))
    if which == "minival":
        return train.subset(held_out, "minival")
    keep = np.setdiff1d(np.arange(len(train)), held_out, assume_unique=True)
    return train.subset(keep, "train")
