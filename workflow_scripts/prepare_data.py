"""Fetch or validate one dataset and describe it in D/{dataset}/dataset.json (written last).

Source kinds (config `datasets.<name>.source.kind`):
- cifar10: torchvision's CIFAR-10 (its own download and md5 checks), or an existing torchvision
  CIFAR-10 folder (`source.path`); stored as uint8 arrays (train.npz, test.npz).
- imagefolder: an ImageNet-style tree at `source.path` (train/<wnid>/*, val/<wnid>/*), or a flat
  val folder plus `source.val_ground_truth`, sorted here into val/<wnid>/ with symlinks. The tree is
  checked against `expected` counts; a shortfall is an error unless `allow_subset: true`.
- sklearn_digits (demo): scikit-learn's bundled 8x8 digits, split train/val/test (stratified, fixed
  seed), written as a PNG image-folder tree (the ImageNet code path) or as arrays (the CIFAR-10 one).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import urllib.error
from pathlib import Path

import numpy as np

from .common import PipelineError, json_arg, atomic_path, run_cli, write_json
from .data import DEFAULT_MINIVAL_SEED, IMAGE_SUFFIXES

# The demo's digits split: stratified fractions of the 1,797 images, with a fixed seed.
DIGITS_TEST_FRACTION = 0.2
DIGITS_VAL_FRACTION = 0.1
DIGITS_SPLIT_SEED = 0


# ---------------------------------------------------------------------------------------------
# Array store (CIFAR-10 layout)
def write_arrays(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """<split>.npz with images uint8 (N, H, W, 3) and labels int64 (N,), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=np.ascontiguousarray(images, dtype=np.uint8), labels=np.asarray(labels, dtype=np.int64))


def prepare_cifar10(source: dict, out_dir: Path) -> dict:
    from torchvision.datasets import CIFAR10

    if source.get("path"):
        root = Path(source["path"])
        if root.name == CIFAR10.base_folder:  # accept the extracted folder itself as well as its parent
            root = root.parent
        download = False
    else:
        root, download = out_dir / "raw", True
    try:
        train = CIFAR10(str(root), train=True, download=download)
        test = CIFAR10(str(root), train=False, download=False)
    except (urllib.error.URLError, OSError) as e:  # torchvision does not retry; DNS, refused, 404 all land here
        key = f"datasets.{out_dir.name}.source.path"
        if not download:
            raise PipelineError(f"reading CIFAR-10 from {root} failed ({e}); check {key}") from None
        raise PipelineError(
            f"downloading CIFAR-10 from {CIFAR10.url} into {root} failed ({getattr(e, 'reason', e)}). Point {key} "
            f"at a local copy: the {CIFAR10.base_folder}/ folder extracted from {CIFAR10.filename} (from a mirror), "
            f"or the folder holding it; or put {CIFAR10.filename} (md5 {CIFAR10.tgz_md5}) into {root} and rerun"
        ) from None
    except RuntimeError as e:  # torchvision: missing files or an md5 mismatch
        key = f"datasets.{out_dir.name}.source.path"
        fix = (f"rerun to download it again, or point {key} at an intact local copy" if download
               else f"point {key} at an intact copy (the {CIFAR10.base_folder}/ folder or the folder holding it)")
        raise PipelineError(f"{root / CIFAR10.base_folder}: {e} (torchvision's md5 check); {fix}") from None
    splits = {}
    for name, ds in (("train", train), ("test", test)):
        write_arrays(out_dir / f"{name}.npz", ds.data, np.asarray(ds.targets, dtype=np.int64))
        splits[name] = len(ds.targets)
    return {"layout": "arrays", "classes": list(train.classes), "splits": splits}


# ---------------------------------------------------------------------------------------------
# Image-folder trees (ImageNet layout)
def scan_class_tree(split_dir: Path) -> dict[str, int]:
    """{class folder: image count} of <split_dir>/<class>/<images>; anything else is an error."""
    if not split_dir.is_dir():
        raise PipelineError(f"{split_dir}: folder not found; the tree needs train/<class>/* and val/<class>/*")
    counts = {}
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if not entry.is_dir():
            raise PipelineError(f"{entry.path}: stray file; {split_dir} may hold class folders only; move it away")
        n = 0
        for item in os.scandir(entry.path):
            if not item.is_file() or Path(item.name).suffix.lower() not in IMAGE_SUFFIXES:
                raise PipelineError(
                    f"{item.path}: not an image file ({sorted(IMAGE_SUFFIXES)}); class folders may hold images only"
                )
            n += 1
        if n == 0:
            raise PipelineError(f"{entry.path}: empty class folder; remove it or restore its images")
        counts[entry.name] = n
    if not counts:
        raise PipelineError(f"{split_dir}: no class folders")
    return counts


def _flat_images(val_dir: Path) -> list[str]:
    if not val_dir.is_dir():
        raise PipelineError(f"{val_dir}: folder not found; source.val_ground_truth needs the flat val images there")
    names = []
    for entry in os.scandir(val_dir):
        if entry.is_dir():
            raise PipelineError(
                f"{entry.path}: a folder inside the flat validation folder; with val/<wnid>/ class folders "
                f"set source.val_ground_truth to null"
            )
        if Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES:
            raise PipelineError(f"{entry.path}: not an image file; the flat validation folder may hold images only")
        names.append(entry.name)
    return sorted(names)


def read_ground_truth(path: Path, files: list[str], classes: list[str]) -> dict[str, str]:
    """{file name: wnid} from lines "<wnid>" (in sorted file-name order) or "<file name> <wnid>"."""
    try:
        lines = [line.split() for line in Path(path).read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise PipelineError(f"{path}: source.val_ground_truth file not found") from None
    widths = {len(parts) for parts in lines}
    if not lines or len(widths) != 1 or widths - {1, 2}:
        raise PipelineError(f"{path}: every line must be '<wnid>' or '<file name> <wnid>' (one form throughout)")
    known = set(classes)
    for number, parts in enumerate(lines, 1):
        wnid = parts[-1]
        if wnid.lstrip("-").isdigit():
            raise PipelineError(
                f"{path}:{number}: integer label '{wnid}'. The devkit's ILSVRC2012_validation_ground_truth.txt "
                f"holds ILSVRC2012_IDs, which are not indices of the sorted wnids; write the wnid instead "
                f"(map ID -> wnid with the devkit's meta.mat, or use LOC_val_solution.csv)"
            )
        if wnid not in known:
            raise PipelineError(f"{path}:{number}: '{wnid}' is not a class folder of train/")
    if widths == {1}:
        if len(lines) != len(files):
            raise PipelineError(f"{path}: {len(lines)} labels for {len(files)} validation images; they must match")
        return {name: parts[0] for name, parts in zip(files, lines)}
    mapping = {parts[0]: parts[1] for parts in lines}
    missing = sorted(set(files) - set(mapping))
    extra = sorted(set(mapping) - set(files))
    if missing or extra or len(mapping) != len(lines):
        raise PipelineError(
            f"{path}: names must match the {len(files)} validation images once each "
            f"(unlabelled: {missing[:3]}, not found: {extra[:3]}, repeated: {len(lines) - len(mapping)})"
        )
    return mapping


def _replace_with_symlink(link: Path, target: Path) -> None:
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(target, target_is_directory=True)
    os.replace(tmp, link)


def sort_flat_val(val_dir: Path, ground_truth: Path, classes: list[str], out: Path) -> None:
    """Build out/<wnid>/<file> symlinks to the flat validation images (written beside, then renamed)."""
    files = _flat_images(val_dir)
    labels = read_ground_truth(ground_truth, files, classes)
    tmp = out.with_name(f".{out.name}.sorting")
    if tmp.exists():
        shutil.rmtree(tmp)
    for wnid in sorted(set(labels.values())):
        (tmp / wnid).mkdir(parents=True)
    for name, wnid in labels.items():
        (tmp / wnid / name).symlink_to(val_dir.resolve() / name)
    if out.is_symlink():
        out.unlink()
    elif out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _expected_counts(name: str, dataset_config: dict, found: dict[str, int]) -> tuple[bool, str | None]:
    """Compare found counts with dataset_config["expected"]; returns (subset, note) or raises."""
    expected = dataset_config.get("expected") or {}
    short, over = [], []
    for key, label in (("num_classes", "classes"), ("train", "train images"), ("val", "val images")):
        if key not in expected:
            continue
        if found[key] != expected[key]:
            (short if found[key] < expected[key] else over).append(f"{found[key]:,} of {expected[key]:,} {label}")
    if over:
        raise PipelineError(
            f"dataset '{name}': more than expected ({', '.join(over)}); fix datasets.{name}.expected or the tree"
        )
    if not short:
        return False, None
    if not dataset_config.get("allow_subset", False):
        raise PipelineError(
            f"dataset '{name}' is incomplete: {', '.join(short)}. Complete the tree, or set "
            f"datasets.{name}.allow_subset: true to run on a subset (the report says so)"
        )
    return True, f"subset of {dataset_config.get('label', name)}: {', '.join(short)} (allow_subset: true)"


def prepare_imagefolder(name: str, dataset_config: dict, out_dir: Path) -> dict:
    source = dataset_config["source"]
    if not source.get("path"):
        raise PipelineError(f"datasets.{name}.source.path is not set; point it at the folder holding train/ and val/")
    src = Path(source["path"]).resolve()
    if not src.is_dir():
        raise PipelineError(f"{src}: datasets.{name}.source.path does not exist")
    train_counts = scan_class_tree(src / "train")
    classes = sorted(train_counts)
    out_dir.mkdir(parents=True, exist_ok=True)
    _replace_with_symlink(out_dir / "train", src / "train")
    if source.get("val_ground_truth"):
        sort_flat_val(src / "val", Path(source["val_ground_truth"]), classes, out_dir / "val")
        val_counts = scan_class_tree(out_dir / "val")
    else:
        val_counts = scan_class_tree(src / "val")
        _replace_with_symlink(out_dir / "val", src / "val")
    if set(val_counts) != set(classes):
        only_train = sorted(set(classes) - set(val_counts))
        only_val = sorted(set(val_counts) - set(classes))
        raise PipelineError(
            f"{src}: class folders of train/ and val/ differ (only in train: {only_train[:5]}"
            f"{'...' if len(only_train) > 5 else ''}, only in val: {only_val[:5]}{'...' if len(only_val) > 5 else ''})"
        )
    splits = {"train": sum(train_counts.values()), "val": sum(val_counts.values())}
    subset, note = _expected_counts(name, dataset_config, {"num_classes": len(classes), **splits})
    return {"layout": "imagefolder", "classes": classes, "splits": splits, "subset": subset, "subset_note": note}


# ---------------------------------------------------------------------------------------------
# The demo's digits
def digits_splits() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Digits as uint8 RGB (N, 8, 8, 3), labels, and stratified train/val/test indices (class, index order)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    pixels, labels = load_digits(return_X_y=True)  # values 0..16
    images = np.rint(pixels.reshape(-1, 8, 8) * (255 / 16)).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)
    labels = labels.astype(np.int64)
    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=DIGITS_TEST_FRACTION, stratify=labels,
                                  random_state=DIGITS_SPLIT_SEED)
    train, val = train_test_split(rest, test_size=DIGITS_VAL_FRACTION / (1 - DIGITS_TEST_FRACTION),
                                  stratify=labels[rest], random_state=DIGITS_SPLIT_SEED)
    ordered = {k: v[np.lexsort((v, labels[v]))] for k, v in (("train", train), ("val", val), ("test", test))}
    return images, labels, ordered


def prepare_digits(source: dict, out_dir: Path) -> dict:
    images, labels, splits = digits_splits()
    classes = [str(c) for c in range(10)]
    if source.get("layout", "imagefolder") == "arrays":
        train = np.concatenate([splits["train"], splits["val"]])
        splits = {"train": train[np.lexsort((train, labels[train]))], "test": splits["test"]}
        for split, idx in splits.items():
            write_arrays(out_dir / f"{split}.npz", images[idx], labels[idx])
        return {"layout": "arrays", "classes": classes, "splits": {k: len(v) for k, v in splits.items()}}
    from PIL import Image

    for split, idx in splits.items():
        split_dir = out_dir / split
        if split_dir.exists():
            shutil.rmtree(split_dir)
        for i in idx:
            path = split_dir / classes[labels[i]] / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(path)
    # The same checks and counting as an ImageNet tree.
    counts = {split: scan_class_tree(out_dir / split) for split in splits}
    return {"layout": "imagefolder", "classes": sorted(counts["train"]),
            "splits": {split: sum(c.values()) for split, c in counts.items()}}


# ---------------------------------------------------------------------------------------------
def dataset_record(name: str, dataset_config: dict, prepared: dict) -> dict:
    """The dataset.json record; checks the config's split names against what was prepared."""
    splits = prepared["splits"]
    test_split = dataset_config["test_split"]
    if test_split not in splits:
        raise PipelineError(f"datasets.{name}.test_split: '{test_split}' is not one of {sorted(splits)}")
    minival = dict(dataset_config["minival"])
    if "split" in minival:
        if minival["split"] not in splits or minival["split"] in ("train", test_split):
            raise PipelineError(
                f"datasets.{name}.minival.split: '{minival['split']}' must be a held-out split other than "
                f"train and the test split '{test_split}' (have {sorted(splits)}); nothing is selected on test"
            )
    else:
        minival.setdefault("seed", DEFAULT_MINIVAL_SEED)
    if test_split == "train":
        raise PipelineError(f"datasets.{name}.test_split must not be the training split")
    return {
        "name": name,
        "label": dataset_config.get("label", name),
        "layout": prepared["layout"],
        "root": ".",
        "classes": prepared["classes"],
        "num_classes": len(prepared["classes"]),
        "splits": splits,
        "train_split": "train",
        "test_split": test_split,
        "minival": minival,
        "subset": prepared.get("subset", False),
        "subset_note": prepared.get("subset_note"),
    }


def prepare(name: str, dataset_config: dict, data_root: str | os.PathLike) -> dict:
    out_dir = Path(data_root) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = dataset_config["source"]["kind"]
    if kind == "cifar10":
        prepared = prepare_cifar10(dataset_config["source"], out_dir)
    elif kind == "imagefolder":
        prepared = prepare_imagefolder(name, dataset_config, out_dir)
    elif kind == "sklearn_digits":
        prepared = prepare_digits(dataset_config["source"], out_dir)
    else:
        raise PipelineError(f"datasets.{name}.source.kind: unknown kind '{kind}'")
    record = dataset_record(name, dataset_config, prepared)
    write_json(out_dir / "dataset.json", record)
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="dataset name (config key under datasets)")
    p.add_argument("--spec", dest="dataset_config", required=True, help="the dataset's config entry as JSON")
    p.add_argument("--data-root", required=True, help="folder that receives <name>/dataset.json and the data")
    args = p.parse_args(argv)
    record = prepare(args.name, json_arg(args.dataset_config, "--spec"), args.data_root)
    print(json.dumps({k: record[k] for k in ("name", "layout", "num_classes", "splits", "subset", "subset_note")}))
    return 0


if __name__ == "__main__":
    run_cli(main)
