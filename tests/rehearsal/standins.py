"""Stand-ins for everything the real study downloads, in each source's real on-disk format (the rehearsal).

    write_all(STANDINS_DIR, config.yaml's checkpoints)  ->  STANDINS_DIR/
        checkpoints/<name>.npz        the official Flax .npz layout at the config's architecture (the real
                                      shapes: Mixer-B/16 and L/16, 21843- or 1000-class heads), random weights;
                                      released checkpoints only (not a `base_checkpoint` entry: convert
                                      builds that one from its base's file)
        cifar10/cifar-10-batches-py/  torchvision's CIFAR-10 pickles: data_batch_1..5, test_batch, batches.meta
        cifar100/cifar-100-python/    torchvision's CIFAR-100 pickles: train, test, meta (100 fine labels)
        pets/oxford-iiit-pet/         images/<Breed>_<n>.jpg, annotations/{trainval,test}.txt (37 breeds)
        flowers/flowers-102/          jpg/image_<n>.jpg, imagelabels.mat, setid.mat (102 classes)
        imagenet/                     train/<wnid>/<wnid>_<n>.JPEG for the 1000 ILSVRC-2012 wnids, the flat
                                      val/ILSVRC2012_val_<n>.JPEG, val_ground_truth.txt (one wnid per line in
                                      sorted file-name order) and real.json (one label list per val image)
        torchvision_md5.json          the md5 tables torchvision would check these files against (the
                                      rehearsal's sitecustomize puts them in place of the real ones)
        manifest.json                 written last: what was written, with the counts

Every dataset has its real number of classes; the training splits hold one image of every class, the test
splits a few images of a few classes (the overlay sets allow_subset where the study's config has `expected`).
Pixels are random: the rehearsal proves that the study runs, never what it measures.
"""
from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from workflow_scripts.common import atomic_path, write_json
from workflow_scripts.convert import random_official_params

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()
# Oxford-IIIT Pet breeds as its file names spell them (cats capitalised), in CLASS-ID order (1..37).
PET_BREEDS = (
    "Abyssinian american_bulldog american_pit_bull_terrier basset_hound beagle Bengal Birman Bombay boxer "
    "British_Shorthair chihuahua Egyptian_Mau english_cocker_spaniel english_setter german_shorthaired "
    "great_pyrenees havanese japanese_chin keeshond leonberger Maine_Coon miniature_pinscher newfoundland Persian "
    "pomeranian pug Ragdoll Russian_Blue saint_bernard samoyed scottish_terrier shiba_inu Siamese Sphynx "
    "staffordshire_bull_terrier wheaten_terrier yorkshire_terrier"
).split()
FLOWER_CLASSES = 102
CIFAR_TRAIN_PER_BATCH, CIFAR_TEST = 4, 4  # CIFAR-10: 5 training batches
CIFAR100_TRAIN = 20
TEST_IMAGES = 4  # Pets, Flowers and ImageNet validation: a few images, of a few classes
# ImageNet validation labels (indices into the sorted wnids) and their real.json lists: one image with
# several labels, one with none (ReaL leaves it out), the others their own label.
IMAGENET_VAL_LABELS = [65, 970, 230, 809, 516, 57]
IMAGENET_REAL = [[65], [970, 795], [230, 231], [], [516, 850], [57]]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_jpeg(path: Path, rng: np.random.Generator) -> None:
    """A small random JPEG of a random size (sizes and aspect ratios vary, as in the real sets)."""
    height, width = (int(v) for v in rng.integers(6, 24, size=2))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(tmp, format="JPEG")


def write_pickle(path: Path, obj: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(pickle.dumps(obj, protocol=2))
    return md5(path)


def cifar_batch(rng: np.random.Generator, n: int, classes: int, label_key: str, name: str) -> dict:
    """One batch as torchvision reads it: data (n, 3072) uint8 rows (R, G, B planes), labels, file names."""
    labels = rng.integers(0, classes, n).tolist()
    batch = {"batch_label": name, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             label_key: labels, "filenames": [f"standin_{name}_{i}.png" for i in range(n)]}
    if label_key == "fine_labels":
        batch["coarse_labels"] = [label // 5 for label in labels]
    return batch


def write_cifar10(root: Path, rng: np.random.Generator) -> dict:
    folder = root / "cifar10" / "cifar-10-batches-py"
    train = [[f"data_batch_{i}", write_pickle(folder / f"data_batch_{i}",
                                              cifar_batch(rng, CIFAR_TRAIN_PER_BATCH, 10, "labels", f"batch {i}"))]
             for i in range(1, 6)]
    test = [["test_batch", write_pickle(folder / "test_batch", cifar_batch(rng, CIFAR_TEST, 10, "labels", "test"))]]
    meta = {"filename": "batches.meta", "key": "label_names", "md5": write_pickle(
        folder / "batches.meta", {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": CIFAR_TRAIN_PER_BATCH,
                                  "num_vis": 3072})}
    return {"train_list": train, "test_list": test, "meta": meta}


def write_cifar100(root: Path, rng: np.random.Generator) -> dict:
    folder = root / "cifar100" / "cifar-100-python"
    train = [["train", write_pickle(folder / "train", cifar_batch(rng, CIFAR100_TRAIN, 100, "fine_labels", "train"))]]
    test = [["test", write_pickle(folder / "test", cifar_batch(rng, CIFAR_TEST, 100, "fine_labels", "test"))]]
    coarse = [f"superclass_{i}" for i in range(20)]
    meta = {"filename": "meta", "key": "fine_label_names",
            "md5": write_pickle(folder / "meta", {"fine_label_names": CIFAR100_CLASSES, "coarse_label_names": coarse})}
    return {"train_list": train, "test_list": test, "meta": meta}


def write_pets(root: Path, rng: np.random.Generator) -> dict:
    """trainval: one image per breed; test: TEST_IMAGES images of as many breeds. Lines: id class species breed-id."""
    folder = root / "pets" / "oxford-iiit-pet"
    splits = {"trainval": list(range(len(PET_BREEDS))), "test": [0, 5, 11, 36][:TEST_IMAGES]}
    for split, labels in splits.items():
        lines = []
        for n, label in enumerate(labels):
            breed = PET_BREEDS[label]
            image_id = f"{breed}_{n + (1 if split == 'trainval' else 101)}"
            write_jpeg(folder / "images" / f"{image_id}.jpg", rng)
            species = 1 if breed[0].isupper() else 2  # the dataset's convention: cats are capitalised
            lines.append(f"{image_id} {label + 1} {species} {n + 1}\n")
        (folder / "annotations").mkdir(parents=True, exist_ok=True)
        (folder / "annotations" / f"{split}.txt").write_text("".join(lines))
    return {"trainval": len(splits["trainval"]), "test": len(splits["test"])}


def write_flowers(root: Path, rng: np.random.Generator) -> dict:
    """trnid: one image per class; valid: two; tstid: TEST_IMAGES. Labels 1-based, as in imagelabels.mat."""
    from scipy.io import savemat

    folder = root / "flowers" / "flowers-102"
    labels = {"trnid": list(range(1, FLOWER_CLASSES + 1)), "valid": [7, 42], "tstid": [1, 50, 77, 102][:TEST_IMAGES]}
    all_labels, set_ids = [], {}
    for key, split_labels in labels.items():
        set_ids[key] = np.arange(len(all_labels) + 1, len(all_labels) + len(split_labels) + 1)[None, :]
        all_labels += split_labels
    for image_id in range(1, len(all_labels) + 1):
        write_jpeg(folder / "jpg" / f"image_{image_id:05d}.jpg", rng)
    savemat(folder / "imagelabels.mat", {"labels": np.array([all_labels], dtype=np.uint8)})
    savemat(folder / "setid.mat", set_ids)
    # An existing folder's image archive is not checked (only jpg/ must exist): its entry stays as it is.
    return {"_file_dict": {"label": ["imagelabels.mat", md5(folder / "imagelabels.mat")],
                           "setid": ["setid.mat", md5(folder / "setid.mat")]}}


def write_imagenet(root: Path, rng: np.random.Generator) -> dict:
    """The 1000 ILSVRC-2012 wnids (timm's copy of the list), one training image each; a flat validation folder."""
    from timm.data import ImageNetInfo

    wnids = sorted(ImageNetInfo().label_names())
    folder = root / "imagenet"
    for wnid in wnids:
        write_jpeg(folder / "train" / wnid / f"{wnid}_1.JPEG", rng)
    names = [f"ILSVRC2012_val_{n:08d}.JPEG" for n in range(1, len(IMAGENET_VAL_LABELS) + 1)]
    for name in names:
        write_jpeg(folder / "val" / name, rng)
    (folder / "val_ground_truth.txt").write_text("".join(f"{wnids[label]}\n" for label in IMAGENET_VAL_LABELS))
    (folder / "real.json").write_text(json.dumps(IMAGENET_REAL))
    return {"classes": len(wnids), "train": len(wnids), "val": len(names)}


def write_checkpoints(root: Path, checkpoints: Mapping[str, dict]) -> dict:
    """Each released checkpoint at its config architecture, random weights, written like the official files
    (np.savez). An entry with `base_checkpoint` (the paper's Appendix C higher-resolution Mixer) has no
    file of its own: convert builds it from its base's .npz, as in the study."""
    sizes = {}
    released = sorted((name, ck) for name, ck in checkpoints.items() if "base_checkpoint" not in ck)
    for seed, (name, ck) in enumerate(released):
        path = root / "checkpoints" / f"{name}.npz"
        params = random_official_params(ck["architecture"], seed)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **params)
        sizes[name] = round(path.stat().st_size / 2**20, 2)
    return sizes


def write_all(root: str | Path, checkpoints: Mapping[str, dict], seed: int = 0) -> dict:
    """Write every stand-in under root (manifest.json last) and return the manifest."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    # {module: {class: {attribute: value}}}; a mapping value updates the attribute's own mapping.
    md5_tables = {"torchvision.datasets.cifar": {"CIFAR10": write_cifar10(root, rng),
                                                 "CIFAR100": write_cifar100(root, rng)},
                  "torchvision.datasets.flowers102": {"Flowers102": write_flowers(root, rng)}}
    write_json(root / "torchvision_md5.json", md5_tables)
    manifest = {"pets": write_pets(root, rng), "imagenet": write_imagenet(root, rng),
                "checkpoints_mib": write_checkpoints(root, checkpoints), "seed": seed}
    write_json(root / "manifest.json", manifest)
    return manifest
