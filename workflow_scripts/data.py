"""Prepared datasets: opening splits, the paper's train augmentation and the evaluation protocols.

Two storage layouts (both described by D/{dataset}/dataset.json, see docs/design.md):
- "arrays": <root>/<split>.npz with uint8 NHWC images; the whole split is moved to the device once and
  augmented there in batches (CIFAR-10, the demo's array store);
- "imagefolder": <root>/<split>/<class>/<image>; images are decoded and transformed in DataLoader
  workers (ImageNet, the demo's digits tree).

Both layouts go through the same resampling function (`resample`), so a protocol's geometry is
identical whichever layout holds the pixels. Resizing is bilinear with half-pixel centres and no
antialiasing, as tf.image.resize in the official input pipeline (vit_jax/input_pipeline.py); a
crop is cut out first, so samples never reach outside it (like tf.slice followed by resize).

Every random choice of a training sample (inception crop, flip) is a pure function of its aug seed
(a counter-based SplitMix64 stream), so resumed and multi-GPU runs see bitwise the same pixels.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .common import PipelineError, read_json

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}
# Inception crop aspect-ratio range (width / height): TF's default aspect_ratio_range of
# tf.image.sample_distorted_bounding_box, written as the decimals [0.75, 1.33] in TensorFlow's own code
# (not 4/3: over 100,000 draws the two give mean aspects 1.0420 vs 1.0400 on a 375x500 image).
ASPECT_RANGE = (0.75, 1.33)
CROP_ATTEMPTS = 100  # tf.image.sample_distorted_bounding_box's max_attempts default
DEFAULT_MINIVAL_SEED = 0


# ---------------------------------------------------------------------------------------------
# Dataset description and splits
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
            f"dataset '{dataset_record['name']}' has no split '{disk_split}' (it has {sorted(dataset_record['splits'])}); "
            f"fix datasets.{dataset_record['name']}.test_split / minival.split in the config"
        )
    root = Path(dataset_record["root"])
    if dataset_record["layout"] == "arrays":
        path = root / f"{disk_split}.npz"
        try:
            with np.load(path) as z:
                split = Split(disk_split, "arrays", dataset_record["classes"], z["labels"].astype(np.int64), images=z["images"])
        except FileNotFoundError:
            raise PipelineError(f"{path}: not found; rerun prepare_data for '{dataset_record['name']}'") from None
    elif dataset_record["layout"] == "imagefolder":
        files, labels = list_imagefolder(root / disk_split, dataset_record["classes"])
        split = Split(disk_split, "imagefolder", dataset_record["classes"], labels, files=files)
    else:
        raise PipelineError(f"dataset '{dataset_record['name']}': unknown layout '{dataset_record['layout']}'; rerun prepare_data")
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


# ---------------------------------------------------------------------------------------------
# Per-sample randomness: a SplitMix64 stream seeded by the sample's aug seed
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def seed_uniforms(seeds: Sequence[int] | np.ndarray, count: int) -> np.ndarray:
    """(len(seeds), count) float64 uniforms in [0, 1); row i depends only on seeds[i]."""
    s = np.asarray(seeds).astype(np.int64).astype(np.uint64).reshape(-1, 1)
    with np.errstate(over="ignore"):
        state = _mix64(s + _GOLDEN) + (np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN)[None, :]
        bits = _mix64(state)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def inception_crop_boxes(u: np.ndarray, height: np.ndarray, width: np.ndarray, min_area: float) -> np.ndarray:
    """Crop boxes (top, left, h, w), int64 (B, 4), as tf.image.sample_distorted_bounding_box draws them.

    Port of GenerateRandomCrop (tensorflow/core/kernels/image/sample_distorted_bounding_box_op.cc) with
    area_range (min_area, 1), aspect ratio (width/height) uniform in ASPECT_RANGE, min_object_covered 0,
    up to CROP_ATTEMPTS attempts and the whole image as fallback. u: (B, 2*CROP_ATTEMPTS + 2) uniforms.
    """
    a = CROP_ATTEMPTS
    H = np.asarray(height, dtype=np.float64).reshape(-1, 1)
    W = np.asarray(width, dtype=np.float64).reshape(-1, 1)
    ar = ASPECT_RANGE[0] + u[:, :a] * (ASPECT_RANGE[1] - ASPECT_RANGE[0])
    lo_area, hi_area = min_area * H * W, H * W
    h = np.rint(np.sqrt(lo_area / ar))
    max_h = np.rint(np.sqrt(hi_area / ar))
    too_wide = np.rint(max_h * ar) > W
    max_h = np.where(too_wide, np.floor((W + 0.5 - 1e-7) / ar), max_h)
    max_h = np.where(too_wide & (np.rint(max_h * ar) > W), max_h - 1, max_h)
    max_h = np.minimum(max_h, H)
    h = np.minimum(h, max_h)
    h = h + np.floor(u[:, a : 2 * a] * (max_h - h + 1))
    w = np.rint(h * ar)
    small = w * h < lo_area
    h = np.where(small, h + 1, h)
    w = np.where(small, np.rint(h * ar), w)
    large = w * h > hi_area
    h = np.where(large, h - 1, h)
    w = np.where(large, np.rint(h * ar), w)
    ok = (w * h >= lo_area) & (w * h <= hi_area) & (w <= W) & (h <= H) & (w > 0) & (h > 0)
    first = np.argmax(ok, axis=1)
    rows = np.arange(len(u))
    found = ok[rows, first]
    h = np.where(found, h[rows, first], H[:, 0])
    w = np.where(found, w[rows, first], W[:, 0])
    # TF draws the offset with Uniform(H - h), i.e. in [0, H - h), and uses 0 when the crop is full size.
    top = np.where(h < H[:, 0], np.floor(u[:, 2 * a] * (H[:, 0] - h)), 0)
    left = np.where(w < W[:, 0], np.floor(u[:, 2 * a + 1] * (W[:, 0] - w)), 0)
    return np.stack([top, left, h, w], axis=1).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Resampling shared by every path
def _axis(origin, scale, lo, hi, size: int) -> np.ndarray:
    """Source pixel-centre coordinates (B, size) of `size` output pixels: origin + (j + .5) * scale - .5."""
    j = np.arange(size, dtype=np.float64)[None, :] + 0.5
    src = np.asarray(origin, np.float64)[:, None] + j * np.asarray(scale, np.float64)[:, None] - 0.5
    return np.clip(src, np.asarray(lo, np.float64)[:, None], np.asarray(hi, np.float64)[:, None])


def resample(images_nhwc: torch.Tensor, ys: np.ndarray, xs: np.ndarray) -> torch.Tensor:
    """Bilinear samples of uint8 NHWC images at per-sample source rows ys (B, S) and columns xs (B, S).

    Returns float32 NCHW (B, 3, S, S) in 0..255. Coordinates are pixel centres, clamped by the caller.
    """
    _, height, width, _ = images_nhwc.shape
    device = images_nhwc.device
    gy = torch.from_numpy(((ys + 0.5) * (2.0 / height) - 1.0).astype(np.float32)).to(device, non_blocking=True)
    gx = torch.from_numpy(((xs + 0.5) * (2.0 / width) - 1.0).astype(np.float32)).to(device, non_blocking=True)
    b, s_y, s_x = gy.shape[0], gy.shape[1], gx.shape[1]
    grid = torch.stack([gx[:, None, :].expand(b, s_y, s_x), gy[:, :, None].expand(b, s_y, s_x)], dim=-1)
    images = images_nhwc.permute(0, 3, 1, 2).float()
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass(frozen=True)
class TrainAugment:
    """The official fine-tuning augmentation: inception crop (switchable), resize, random flip (switchable)."""

    image_size: int
    inception_crop: bool
    min_area: float
    flip: bool
    mean: float
    std: float

    def coords(self, seeds: Sequence[int] | np.ndarray, height, width) -> tuple[np.ndarray, np.ndarray]:
        """Source coordinates (ys, xs), each (B, image_size), for images of the given sizes."""
        seeds = np.asarray(seeds)
        n = len(seeds)
        H = np.broadcast_to(np.asarray(height, dtype=np.int64), (n,))
        W = np.broadcast_to(np.asarray(width, dtype=np.int64), (n,))
        u = seed_uniforms(seeds, 2 * CROP_ATTEMPTS + 3)
        if self.inception_crop:
            top, left, h, w = inception_crop_boxes(u[:, :-1], H, W, self.min_area).T
        else:
            top, left, h, w = np.zeros(n), np.zeros(n), H, W
        s = self.image_size
        ys = _axis(top, h / s, top, top + h - 1, s)
        xs = _axis(left, w / s, left, left + w - 1, s)
        if self.flip:  # tf: flip when uniform() > 0.5; flipping the output = reversing its columns
            flipped = u[:, -1] > 0.5
            xs = np.where(flipped[:, None], xs[:, ::-1], xs)
        return ys, xs

    def __call__(self, images_nhwc: torch.Tensor, seeds: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Augment uint8 NHWC images (all the same size) -> normalised float32 NCHW on their device."""
        ys, xs = self.coords(seeds, images_nhwc.shape[1], images_nhwc.shape[2])
        return (resample(images_nhwc, ys, xs) - self.mean) / self.std


@dataclass(frozen=True)
class EvalTransform:
    """An evaluation protocol's geometry: "direct" resize, or "shorter_side" resize + centre crop."""

    protocol: dict
    image_size: int
    mean: float
    std: float

    def coords(self, n: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.image_size
        resize = self.protocol.get("resize")
        if resize == "direct":  # official code: tf.image.resize(im, [crop, crop])
            ys = _axis([0.0], [height / s], [0], [height - 1], s)
            xs = _axis([0.0], [width / s], [0], [width - 1], s)
        elif resize == "shorter_side":  # paper Table 3: shorter side to size/crop_fraction, centre crop
            fraction = self.protocol.get("crop_fraction")
            if fraction is None:
                raise PipelineError(f"evaluation protocol {self.protocol}: 'shorter_side' needs crop_fraction")
            short = math.floor(s / fraction + 1e-6)  # 224 / 0.875 = 256 (timm's convention)
            scale = short / min(height, width)
            new_h, new_w = max(short, round(height * scale)), max(short, round(width * scale))
            top, left = round((new_h - s) / 2), round((new_w - s) / 2)  # torchvision CenterCrop offsets
            ys = _axis([top * height / new_h], [height / new_h], [0], [height - 1], s)
            xs = _axis([left * width / new_w], [width / new_w], [0], [width - 1], s)
        else:
            raise PipelineError(f"evaluation protocol {self.protocol}: resize must be 'direct' or 'shorter_side'")
        return np.repeat(ys, n, axis=0), np.repeat(xs, n, axis=0)

    def __call__(self, images_nhwc: torch.Tensor, seeds=None) -> torch.Tensor:
        ys, xs = self.coords(images_nhwc.shape[0], images_nhwc.shape[1], images_nhwc.shape[2])
        return (resample(images_nhwc, ys, xs) - self.mean) / self.std


# ---------------------------------------------------------------------------------------------
# Loaders
def load_image(path: str) -> torch.Tensor:
    """An image file as a uint8 HWC RGB tensor."""
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy())


class _FolderSamples(torch.utils.data.Dataset):
    """Image-folder samples keyed by (index, aug seed); decoded and transformed in the worker."""

    def __init__(self, files: list[str], labels: np.ndarray, transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        image = self.transform(load_image(self.files[index])[None], [seed])[0]
        return image, int(self.labels[index])


class _KeyBatches:
    """A batch sampler over precomputed batches of (index, seed) keys."""

    def __init__(self, batches: Iterable[Sequence[tuple[int, int]]]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _plan_keys(plan: Iterable[tuple[Sequence[int], Sequence[int]]]) -> Iterator[list[tuple[int, int]]]:
    for indices, seeds in plan:
        yield [(int(i), int(s)) for i, s in zip(indices, seeds)]


def _folder_loader(split: Split, transform, batches, device, num_workers: int):
    device = torch.device(device)
    return torch.utils.data.DataLoader(
        _FolderSamples(split.files, split.labels, transform),
        batch_sampler=_KeyBatches(batches),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
    )


def _to_device(loader, device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for images, labels in loader:
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def _device_arrays(split: Split, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split as uint8 NHWC images and int64 labels on the device (moved once)."""
    return torch.from_numpy(split.images).to(device), torch.from_numpy(split.labels).to(device)


def train_loader(split: Split, augment: TrainAugment, plan, device, num_workers: int):
    """Yield (images float32 NCHW, labels int64) on `device` for each (indices, aug_seeds) in plan."""
    device = torch.device(device)
    if split.layout == "arrays":
        return _array_train_batches(split, augment, plan, device)
    return _to_device(_folder_loader(split, augment, _plan_keys(plan), device, num_workers), device)


def _array_train_batches(split: Split, augment: TrainAugment, plan, device):
    images, labels = _device_arrays(split, device)
    for indices, seeds in plan:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64)).to(device, non_blocking=True)
        yield augment(images.index_select(0, idx), seeds), labels.index_select(0, idx)


class _ArrayEvalLoader:
    """Evaluation batches of an array split, transformed on the device; iterable any number of times."""

    def __init__(self, split: Split, transform: EvalTransform, batch_size: int, device):
        self.images, self.labels = _device_arrays(split, device)
        self.transform, self.batch_size = transform, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.labels), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            yield self.transform(self.images[chunk]), self.labels[chunk]


class _FolderEvalLoader:
    """Evaluation batches of an image-folder split from DataLoader workers (they persist across passes)."""

    def __init__(self, split: Split, transform: EvalTransform, batch_size: int, device, num_workers: int):
        n = len(split)
        batches = [[(i, 0) for i in range(s, min(n, s + batch_size))] for s in range(0, n, batch_size)]
        self.device = torch.device(device)
        self.loader = _folder_loader(split, transform, batches, self.device, num_workers)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return _to_device(self.loader, self.device)


def eval_loader(split: Split, protocol: dict, image_size: int, batch_size: int, device, num_workers: int,
                mean: float, std: float):
    """A re-iterable loader of (images float32 NCHW, labels int64) on `device`, in split order.

    Create it once and iterate it at each evaluation: array splits stay on the device and
    image-folder workers persist between passes.
    """
    transform = EvalTransform(dict(protocol), image_size, mean, std)
    if split.layout == "arrays":
        return _ArrayEvalLoader(split, transform, batch_size, device)
    return _FolderEvalLoader(split, transform, batch_size, device, num_workers)
