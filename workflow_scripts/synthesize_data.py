"""Write a stand-in dataset in ImageNet's on-disk layout: the demo's substitute for an ImageNet download.

python -m workflow_scripts.synthesize_data --seed N --out-dir TREE

TREE receives what a user points the study at for ImageNet, in the same formats:
- train/<class>/<n>.JPEG: JPEG files of varying sizes and aspect ratios (like ImageNet, Pets, Flowers);
- val/<name>.JPEG: one flat validation folder, file names sorted like ILSVRC2012_val_00000001.JPEG;
- val_ground_truth.txt: "<file name> <class>" per line (one of the forms prepare_data accepts);
- real.json: ReaL-style relabels in the format of google-research/reassessed-imagenet's real.json: one
  list of class indices per validation file in sorted-name order; some images carry several labels,
  some none (ReaL leaves those out).
The pictures are scikit-learn's bundled 8x8 digits, upscaled: the pipeline reads them through the same
prepare_data, image-folder loader and ReaL code as the real ImageNet tree. manifest.json is written last.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from workflow_scripts.common import atomic_path, run_cli, write_json
from workflow_scripts.prepare_data import digits_splits

CLASSES = [f"digit_{d}" for d in range(10)]  # sorted order = class index, as ImageNet's sorted wnids
SIZE_RANGE = (12, 40)  # pixels of the shorter side
ASPECT_RANGE = (0.75, 1.33)  # longer / shorter side up to 4:3, as most photos (and ImageNet's 500x375)
# The digit is drawn on a background margin, as a photo's object sits inside its frame: the paper's
# resmall-crop (shorter side to 256/224 of the size, centre crop) then keeps the whole digit, as it keeps
# most of a photographed object.
MARGIN = 1  # background pixels around the 8x8 digit
SEVERAL_LABELS_EVERY = 7  # every 7th validation image also gets a second plausible label
NO_LABEL_EVERY = 11  # every 11th gets none (ReaL excludes such images)


def write_jpeg(path: Path, image: np.ndarray, size: tuple[int, int]) -> None:
    from PIL import Image

    framed = np.pad(image, [(MARGIN, MARGIN), (MARGIN, MARGIN)] + [(0, 0)] * (image.ndim - 2))
    with atomic_path(path) as tmp:
        Image.fromarray(framed).resize(size, Image.BILINEAR).save(tmp, format="JPEG", quality=90)


def draw_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) of one picture: a shorter side from SIZE_RANGE, an aspect ratio from ASPECT_RANGE."""
    short, aspect = int(rng.integers(*SIZE_RANGE)), float(rng.uniform(*ASPECT_RANGE))
    long = round(short * aspect)
    return (long, short) if rng.integers(2) else (short, long)


def relabels(true_labels: list[int]) -> list[list[int]]:
    """ReaL-style label lists: the true label, sometimes with a second one, sometimes none."""
    lists = []
    for i, label in enumerate(true_labels, 1):
        if i % NO_LABEL_EVERY == 0:
            lists.append([])
        elif i % SEVERAL_LABELS_EVERY == 0:
            lists.append(sorted({label, (label + 1) % len(CLASSES)}))
        else:
            lists.append([label])
    return lists


def synthesize(seed: int, out_dir: str | os.PathLike) -> dict:
    out_dir = Path(out_dir)
    images, labels, splits = digits_splits()
    rng = np.random.default_rng(seed)
    train = np.concatenate([splits["train"], splits["val"]])
    for n, i in enumerate(train):
        write_jpeg(out_dir / "train" / CLASSES[labels[i]] / f"{n:05d}.JPEG", images[i], draw_size(rng))
    names, val_labels = [], []
    for n, i in enumerate(rng.permutation(splits["test"]), 1):
        names.append(f"val_{n:08d}.JPEG")
        val_labels.append(int(labels[i]))
        write_jpeg(out_dir / "val" / names[-1], images[i], draw_size(rng))
    with atomic_path(out_dir / "val_ground_truth.txt") as tmp:
        tmp.write_text("".join(f"{name} {CLASSES[label]}\n" for name, label in zip(names, val_labels)))
    with atomic_path(out_dir / "real.json") as tmp:
        tmp.write_text(json.dumps(relabels(val_labels)))
    manifest = {"classes": CLASSES, "train": len(train), "val": len(names), "seed": seed}
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.synthesize_data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, required=True, help="image sizes are drawn from this seed")
    ap.add_argument("--out-dir", required=True, help="the tree to write (manifest.json last)")
    args = ap.parse_args(argv)
    manifest = synthesize(args.seed, args.out_dir)
    print(f"wrote {args.out_dir}: {manifest['train']} train and {manifest['val']} validation JPEGs, "
          f"{len(manifest['classes'])} classes")
    return 0


if __name__ == "__main__":
    run_cli(main)
