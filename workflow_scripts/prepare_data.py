"""Fetch or validate one dataset and describe it in D/{dataset}/dataset.json (written last).

Source kinds (config `datasets.<name>.source.kind`):
- cifar10, cifar100: torchvision's CIFAR10 / CIFAR100 (its own download and md5 checks), or an existing
  torchvision folder (`source.path`); stored as uint8 arrays (train.npz, test.npz).
- pets, flowers: torchvision's OxfordIIITPet (trainval -> train, test) and Flowers102 (train + val ->
  train, test), downloaded or at `source.path`; the JPEG files are linked, not re-encoded, into an
  image-folder tree <split>/<label:03d>_<class>/<file>, so the sorted folders are torchvision's labels.
- imagefolder: an ImageNet-style tree at `source.path` (train/<wnid>/*, val/<wnid>/*), or a flat
  val folder plus `source.val_ground_truth`, sorted here into val/<wnid>/ with symlinks.
- sklearn_digits (demo): scikit-learn's bundled 8x8 digits, split train/val/test (stratified, fixed
  seed), written as a PNG image-folder tree (the ImageNet code path) or as arrays (the CIFAR-10 one).
Every kind's class and image counts are checked against `expected` when the config gives it, and the
held-out splits of the image-folder kinds against the training classes: a shortfall (fewer images, or a
held-out split without images of some training classes) is an error unless `allow_subset: true`, and
then dataset.json says what is missing. A prepared image-folder split has a folder for every training
class (empty where the split has no image of it), so its labels are the training labels.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import urllib.error
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .common import PipelineError, atomic_path, json_arg, run_cli, write_json
from .splits import DEFAULT_MINIVAL_SEED, IMAGE_SUFFIXES

# The demo's digits split: stratified fractions of the 1,797 images, with a fixed seed.
DIGITS_TEST_FRACTION = 0.2
DIGITS_VAL_FRACTION = 0.1
DIGITS_SPLIT_SEED = 0
# The folders torchvision's OxfordIIITPet and Flowers102 keep their files in, below the root they are given.
PETS_FOLDER = "oxford-iiit-pet"
FLOWERS_FOLDER = "flowers-102"


# ---------------------------------------------------------------------------------------------
# Array store (CIFAR-10 layout)
def write_arrays(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """<split>.npz with images uint8 (N, H, W, 3) and labels int64 (N,), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=np.ascontiguousarray(images, dtype=np.uint8), labels=np.asarray(labels, dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# torchvision's datasets: its own download and md5 checks, or an existing folder (source.path)
def _source_fix(name: str, source: dict, root: Path) -> str:
    """How to repair a missing, broken or incomplete torchvision folder; names the config key."""
    if source.get("path"):
        return f"point datasets.{name}.source.path ({source['path']}) at an intact copy, or set it to null to download"
    return (f"delete {root} and rerun to download it again (datasets.{name}.source.path is null), "
            f"or set datasets.{name}.source.path to an intact copy")


def open_torchvision(name: str, source: dict, out_dir: Path, base_folder: str, origin: str,
                     open_splits: Callable[[str, bool], dict], extracted: tuple[str, ...] = ()) -> tuple[Path, dict]:
    """(root, open_splits(root, download)): torchvision's datasets, every failure one PipelineError.

    Downloads go to out_dir/raw. torchvision checksums the archives but not the files it extracts
    from them (`extracted`, folders inside base_folder): they count only once a marker says the
    extraction finished, so a killed extraction is redone from the verified archives on rerun.
    """
    if source.get("path"):
        root, download = Path(source["path"]).resolve(), False
        if root.name == base_folder:  # accept the extracted folder itself as well as its parent
            root = root.parent
    else:
        root, download = out_dir / "raw", True
    marker = root / f".{base_folder}.extracted"
    if download and extracted and not marker.exists():
        for folder in extracted:
            shutil.rmtree(root / base_folder / folder, ignore_errors=True)
    try:
        splits = open_splits(str(root), download)
    except (urllib.error.URLError, OSError) as e:  # torchvision does not retry: DNS, refused, 404 all land here
        if download:
            raise PipelineError(
                f"datasets.{name}: downloading {origin} into {root} failed ({getattr(e, 'reason', e)}). Point "
                f"datasets.{name}.source.path at a local copy (the {base_folder}/ folder, or the folder holding "
                f"it, e.g. unpacked from a mirror), or put the archive(s) into {root} and rerun"
            ) from None
        raise PipelineError(f"{root / base_folder}: {e}; {_source_fix(name, source, root)}") from None
    except RuntimeError as e:  # torchvision: files missing, or an md5 mismatch
        raise PipelineError(
            f"{root / base_folder}: {e} (torchvision's check of the files and their md5); "
            f"{_source_fix(name, source, root)}"
        ) from None
    if download and extracted:
        marker.touch()
    return root, splits


def prepare_cifar(name: str, dataset_config: dict, out_dir: Path) -> dict:
    """CIFAR-10 or CIFAR-100 (by source.kind) through torchvision; stored as uint8 arrays."""
    from torchvision.datasets import CIFAR10, CIFAR100

    source = dataset_config["source"]
    cifar = CIFAR100 if source["kind"] == "cifar100" else CIFAR10

    def open_splits(root: str, download: bool) -> dict:
        return {"train": cifar(root, train=True, download=download), "test": cifar(root, train=False)}

    _, splits = open_torchvision(name, source, out_dir, cifar.base_folder, cifar.url, open_splits)
    for split, ds in splits.items():
        write_arrays(out_dir / f"{split}.npz", ds.data, np.asarray(ds.targets, dtype=np.int64))
    return {"layout": "arrays", "classes": list(splits["train"].classes),
            "splits": {split: len(ds.targets) for split, ds in splits.items()}}


def _labelled_files(ds) -> list[tuple[Path, int]]:
    """(image file, label) of a torchvision OxfordIIITPet or Flowers102 split, in its order."""
    files = ds._images if hasattr(ds, "_images") else getattr(ds, "_image_files", None)
    labels = getattr(ds, "_labels", None)
    if files is None or labels is None or not len(files) == len(labels) == len(ds):
        import torchvision

        raise PipelineError(
            f"torchvision {torchvision.__version__}: {type(ds).__name__} no longer lists its files as "
            f"_images/_image_files and _labels; install the torchvision version pinned in requirements.txt"
        )
    return [(Path(f), int(label)) for f, label in zip(files, labels)]


def class_folder_names(class_names: list[str], count: int) -> list[str]:
    """'<label:03d>_<name>' per label 0..count-1: sorted folders are the label order, names readable."""
    return [f"{i:03d}_{re.sub(r'[^a-z0-9]+', '_', class_names[i].lower()).strip('_')}" for i in range(count)]


def link_image_splits(name: str, source: dict, root: Path, splits: dict[str, list], class_names: list[str],
                      out_dir: Path) -> dict:
    """Link each split's images (torchvision datasets, concatenated) into out_dir/<split>/<class>/."""
    samples = {split: [s for ds in datasets for s in _labelled_files(ds)] for split, datasets in splits.items()}
    fix = _source_fix(name, source, root)
    missing = [path for items in samples.values() for path, _ in items if not path.is_file()]
    if missing:
        total = sum(map(len, samples.values()))
        raise PipelineError(
            f"{root}: {len(missing):,} of the {total:,} images the split files list are missing "
            f"(first: {missing[0]}); {fix}"
        )
    count = min(len({label for _, label in samples["train"]}), len(class_names))
    for split, items in samples.items():
        # count is the number of training labels: a gap among them also puts a label outside 0..count - 1
        if {label for _, label in items} - set(range(count)):
            raise PipelineError(
                f"{root}: the {split} split has labels outside 0..{count - 1} (of {len(class_names)} classes): the "
                f"training split must have images of every label from 0 up, a held-out split only of those; {fix}"
            )
    classes = class_folder_names(class_names, count)
    for split, items in samples.items():
        link_class_tree(out_dir / split, ((classes[label], path.resolve()) for path, label in items), classes)
    return {"layout": "imagefolder", "classes": classes,
            "splits": {split: len(items) for split, items in samples.items()},
            "uncovered": {split: uncovered_classes(classes, (classes[label] for _, label in items))
                          for split, items in samples.items()}}


def uncovered_classes(classes: list[str], found: Iterable[str]) -> list[str]:
    """The classes (in order) of which a split has no image."""
    have = set(found)
    return [c for c in classes if c not in have]


def prepare_pets(name: str, dataset_config: dict, out_dir: Path) -> dict:
    """Oxford-IIIT Pet: the trainval split is the training set, test the test set (37 breeds)."""
    from torchvision.datasets import OxfordIIITPet

    source = dataset_config["source"]

    def open_splits(root: str, download: bool) -> dict:
        trainval = OxfordIIITPet(root, split="trainval", download=download)
        return {"train": [trainval], "test": [OxfordIIITPet(root, split="test")]}

    origin = " and ".join(url for url, _ in OxfordIIITPet._RESOURCES)
    root, splits = open_torchvision(name, source, out_dir, PETS_FOLDER, origin, open_splits,
                                    extracted=("images", "annotations"))
    return link_image_splits(name, source, root, splits, splits["train"][0].classes, out_dir)


def prepare_flowers(name: str, dataset_config: dict, out_dir: Path) -> dict:
    """Oxford Flowers-102: train + val are the training set, test the test set (102 classes)."""
    from torchvision.datasets import Flowers102

    source = dataset_config["source"]

    def open_splits(root: str, download: bool) -> dict:
        train = Flowers102(root, split="train", download=download)
        return {"train": [train, Flowers102(root, split="val")], "test": [Flowers102(root, split="test")]}

    root, splits = open_torchvision(name, source, out_dir, FLOWERS_FOLDER, Flowers102._download_url_prefix,
                                    open_splits, extracted=("jpg",))
    return link_image_splits(name, source, root, splits, Flowers102.classes, out_dir)


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


def link_class_tree(out: Path, links: Iterable[tuple[str, Path]], classes: Iterable[str] = ()) -> None:
    """out/<class>/<file name> symlinks to (class, target file) pairs, and a folder (maybe empty) for each of
    `classes`; built beside out, then renamed onto it."""
    tmp = out.with_name(f".{out.name}.linking")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for cls in classes:
        (tmp / cls).mkdir()
    for cls, target in links:
        (tmp / cls).mkdir(exist_ok=True)
        (tmp / cls / target.name).symlink_to(target)
    if out.is_symlink():
        out.unlink()
    elif out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def val_images(src: Path, source: dict, classes: list[str]) -> list[tuple[str, Path]]:
    """(wnid, file) of every validation image: the flat folder with source.val_ground_truth, or val/<wnid>/*."""
    val_dir = src / "val"
    if source.get("val_ground_truth"):
        labels = read_ground_truth(Path(source["val_ground_truth"]), _flat_images(val_dir), classes)
        return [(wnid, val_dir.resolve() / name) for name, wnid in labels.items()]
    counts = scan_class_tree(val_dir)
    only_val = sorted(set(counts) - set(classes))
    if only_val:
        raise PipelineError(f"{src}: class folders of val/ that train/ lacks: {only_val[:5]}"
                            f"{'...' if len(only_val) > 5 else ''}; every validation class must be a training class")
    return [(cls, val_dir.resolve() / cls / name) for cls in counts for name in sorted(os.listdir(val_dir / cls))]


def _expected_counts(name: str, dataset_config: dict, found: dict[str, int],
                     uncovered: dict[str, list[str]]) -> tuple[bool, str | None]:
    """Compare found counts ({"num_classes", <split>: images}) with dataset_config["expected"], and take in
    the held-out splits' uncovered classes ({split: [classes without an image]}).

    Returns (subset, note) or raises.
    """
    expected = dataset_config.get("expected") or {}
    unknown = sorted(set(expected) - set(found))
    if unknown:
        raise PipelineError(
            f"datasets.{name}.expected: {unknown} not prepared (have {sorted(found)}); fix the key names"
        )
    short, over = [], []
    for key, count in found.items():
        if key in expected and count != expected[key]:
            label = "classes" if key == "num_classes" else f"{key} images"
            (short if count < expected[key] else over).append(f"{count:,} of {expected[key]:,} {label}")
    if over:
        raise PipelineError(
            f"dataset '{name}': more than expected ({', '.join(over)}); fix datasets.{name}.expected or the tree"
        )
    for split, missing in uncovered.items():
        if missing:
            short.append(f"{split} images of {found['num_classes'] - len(missing):,} of {found['num_classes']:,} "
                         f"classes (none of {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if not short:
        return False, None
    if not dataset_config.get("allow_subset", False):
        raise PipelineError(
            f"dataset '{name}' is incomplete: {', '.join(short)}. Complete the data at "
            f"datasets.{name}.source.path, or set "
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
    val = val_images(src, source, classes)
    uncovered = uncovered_classes(classes, (cls for cls, _ in val))
    if source.get("val_ground_truth") or uncovered:  # a tree of links, with a folder for every class
        link_class_tree(out_dir / "val", val, classes)
    else:
        _replace_with_symlink(out_dir / "val", src / "val")
    splits = {"train": sum(train_counts.values()), "val": len(val)}
    return {"layout": "imagefolder", "classes": classes, "splits": splits, "uncovered": {"val": uncovered}}


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


def prepare_digits(name: str, dataset_config: dict, out_dir: Path) -> dict:
    source = dataset_config["source"]
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


PREPARE_BY_KIND = {
    "cifar10": prepare_cifar,
    "cifar100": prepare_cifar,
    "pets": prepare_pets,
    "flowers": prepare_flowers,
    "imagefolder": prepare_imagefolder,
    "sklearn_digits": prepare_digits,
}


def prepare(name: str, dataset_config: dict, out_json: str | os.PathLike) -> dict:
    """Prepare the data in the folder of out_json (dataset.json), then write out_json last."""
    out_dir = Path(out_json).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = dataset_config["source"]["kind"]
    if kind not in PREPARE_BY_KIND:
        raise PipelineError(f"datasets.{name}.source.kind: unknown kind '{kind}' (one of {sorted(PREPARE_BY_KIND)})")
    prepared = PREPARE_BY_KIND[kind](name, dataset_config, out_dir)
    found = {"num_classes": len(prepared["classes"]), **prepared["splits"]}
    uncovered = prepared.get("uncovered", {})
    prepared["subset"], prepared["subset_note"] = _expected_counts(name, dataset_config, found, uncovered)
    record = dataset_record(name, dataset_config, prepared)
    write_json(out_json, record)
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="dataset name (config key under datasets)")
    p.add_argument("--dataset-config", required=True, help="the dataset's config entry as JSON")
    p.add_argument("--out", required=True, help="dataset.json to write; the data goes into its folder")
    args = p.parse_args(argv)
    record = prepare(args.name, json_arg(args.dataset_config, "--dataset-config"), args.out)
    print(json.dumps({k: record[k] for k in ("name", "layout", "num_classes", "splits", "subset", "subset_note")}))
    return 0


if __name__ == "__main__":
    run_cli(main)
