"""Datasets: preparation (CIFAR-10 download path, ImageNet trees, digits), splits, augmentation, protocols."""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from workflow_scripts import data, prepare_data, splits
from workflow_scripts.common import PipelineError

torch.set_num_threads(1)
OFFICIAL = {"name": "official", "resize": "direct"}
RESMALL_CROP = {"name": "resmall_crop", "resize": "shorter_side", "crop_fraction": 0.875}  # paper App. C (3)(ii)
RESIZE_CROP = {"name": "resize_crop", "resize": "square", "crop_fraction": 0.875}  # paper App. C (3)(i)



def imagenet_json(tmp_path):
    """Where prepare_data writes the ImageNet test trees' dataset.json (the data goes beside it)."""
    return tmp_path / "data" / "imagenet" / "dataset.json"

def digits_spec(layout: str) -> dict:
    minival = {"split": "val"} if layout == "imagefolder" else {"fraction": 0.1}
    return {"label": "Digits", "source": {"kind": "sklearn_digits", "layout": layout}, "minival": minival,
            "test_split": "test", "steps": 1, "eval_protocol": "official"}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Digits prepared in both layouts through the CLI; {layout: dataset_record}."""
    root = tmp_path_factory.mktemp("data")
    records = {}
    for layout in ("imagefolder", "arrays"):
        name = f"digits_{layout}"
        prepare_data.main(["--name", name, "--dataset-config", json.dumps(digits_spec(layout)),
                          "--out", str(root / name / "dataset.json")])
        records[layout] = splits.load_dataset_record(root / name / "dataset.json")
    return records


# ---------------------------------------------------------------------------------------------
# Splits
def test_minival_indices_deterministic_disjoint_and_seeded():
    a = splits.minival_indices(1000, 0.02, 0)
    assert np.array_equal(a, splits.minival_indices(1000, 0.02, 0))
    assert len(a) == 20 and len(np.unique(a)) == 20 and a.min() >= 0 and a.max() < 1000
    assert not np.array_equal(a, splits.minival_indices(1000, 0.02, 1))
    with pytest.raises(PipelineError):
        splits.minival_indices(10, 1.0, 0)


def test_digits_prepared_in_both_layouts(digits):
    folder, arrays = digits["imagefolder"], digits["arrays"]
    assert folder["layout"] == "imagefolder" and arrays["layout"] == "arrays"
    assert folder["num_classes"] == arrays["num_classes"] == 10
    assert sum(folder["splits"].values()) == sum(arrays["splits"].values()) == 1797
    assert folder["splits"]["test"] == arrays["splits"]["test"] == 360  # 20 %, stratified
    assert arrays["splits"]["train"] == folder["splits"]["train"] + folder["splits"]["val"]
    assert folder["subset"] is False and folder["subset_note"] is None
    assert arrays["minival"] == {"fraction": 0.1, "seed": 0}
    # The same test images, in the same order, in both stores (PNG is lossless).
    f_test, a_test = splits.open_split(folder, "test"), splits.open_split(arrays, "test")
    assert np.array_equal(f_test.labels, a_test.labels)
    decoded = np.stack([data.load_image(p).numpy() for p in f_test.files])
    assert np.array_equal(decoded, a_test.images)
    assert np.bincount(a_test.labels).min() >= 35  # stratified: every class present in proportion


def test_train_and_minival_disjoint_and_cover_train(digits):
    dataset_record = digits["arrays"]
    train, minival = splits.open_split(dataset_record, "train"), splits.open_split(dataset_record, "minival")
    assert len(train) + len(minival) == dataset_record["splits"]["train"]
    assert len(minival) == round(0.1 * dataset_record["splits"]["train"])
    full = splits._open_disk_split(dataset_record, "train")
    held = splits.minival_indices(len(full), 0.1, 0)
    assert np.array_equal(minival.images, full.images[held])
    rows = {x.tobytes() + bytes([y]) for x, y in zip(full.images, full.labels)}
    assert len(rows) == len(full)  # digits are distinct, so disjointness can be checked on content
    train_rows = {x.tobytes() + bytes([y]) for x, y in zip(train.images, train.labels)}
    mini_rows = {x.tobytes() + bytes([y]) for x, y in zip(minival.images, minival.labels)}
    assert not train_rows & mini_rows and train_rows | mini_rows == rows
    # {split: val}: minival is the val folder, train the train folder.
    folder = digits["imagefolder"]
    assert len(splits.open_split(folder, "minival")) == folder["splits"]["val"]
    assert not set(splits.open_split(folder, "train").files) & set(splits.open_split(folder, "minival").files)


def test_split_count_change_is_detected(digits, tmp_path):
    dataset_record = dict(digits["arrays"], splits={"train": 5, "test": 360})
    with pytest.raises(PipelineError, match="rerun"):
        splits.open_split(dataset_record, "train")


# ---------------------------------------------------------------------------------------------
# Augmentation
def test_inception_crop_boxes_follow_the_official_ranges():
    u = data.seed_uniforms(np.arange(4000), 2 * data.CROP_ATTEMPTS + 2)
    top, left, h, w = data.inception_crop_boxes(u, 300, 400, 0.05).T
    area = h * w / (300 * 400)
    assert area.min() >= 0.05 and area.max() <= 1.0 and 0.2 < area.mean() < 0.6
    assert (w / h).min() >= 0.7 and (w / h).max() <= 1.4
    assert top.min() >= 0 and left.min() >= 0 and (top + h).max() <= 300 and (left + w).max() <= 400
    assert len(np.unique(np.stack([top, left, h, w]), axis=1).T) > 3000  # seeds give different crops


def test_augmentation_is_a_pure_function_of_the_seed():
    images = torch.randint(0, 256, (6, 20, 24, 3), dtype=torch.uint8)
    aug = data.TrainAugment(16, True, 0.05, True, 127.5, 127.5)
    seeds = np.array([11, 12, 13, 14, 15, 16])
    batch = aug(images, seeds)
    assert batch.shape == (6, 3, 16, 16) and batch.dtype == torch.float32
    assert torch.equal(batch, aug(images, seeds))
    # Alone, or in another batch order, a sample gets bitwise the same pixels.
    for i in (0, 3):
        assert torch.equal(aug(images[i:i + 1], seeds[i:i + 1])[0], batch[i])
    perm = [5, 3, 1, 0, 2, 4]
    assert torch.equal(aug(images[perm], seeds[perm]), batch[perm])
    assert not torch.equal(aug(images, seeds + 100), batch)


def test_crop_resize_and_flip_match_an_independent_computation():
    images = torch.randint(0, 256, (1, 20, 24, 3), dtype=torch.uint8)
    aug = data.TrainAugment(32, True, 0.05, True, 0.0, 1.0)
    for seed in range(20):
        u = data.seed_uniforms([seed], 2 * data.CROP_ATTEMPTS + 3)
        top, left, h, w = data.inception_crop_boxes(u[:, :-1], 20, 24, 0.05)[0]
        crop = images.permute(0, 3, 1, 2).float()[:, :, top:top + h, left:left + w]
        expected = F.interpolate(crop, size=(32, 32), mode="bilinear", align_corners=False, antialias=False)
        if u[0, -1] > 0.5:
            expected = expected.flip(-1)
        torch.testing.assert_close(aug(images, [seed]), expected, atol=2e-3, rtol=0)
    no_crop = data.TrainAugment(32, False, 0.05, False, 127.5, 127.5)
    whole = F.interpolate(images.permute(0, 3, 1, 2).float(), size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(no_crop(images, [3]), (whole - 127.5) / 127.5, atol=2e-5, rtol=0)


def test_eval_protocol_geometry_matches_torchvision():
    from torchvision.transforms.v2 import functional as TF

    image = torch.randint(0, 256, (1, 300, 400, 3), dtype=torch.uint8)
    chw = image.permute(0, 3, 1, 2).float()
    # Tolerance: float rounding of sample positions times steep random-pixel gradients (a shifted
    # sampling grid would differ by tens of grey levels).
    direct = data.EvalTransform(OFFICIAL, 224, 0.0, 1.0)(image)
    torch.testing.assert_close(direct, TF.resize(chw, [224, 224], antialias=False), atol=0.02, rtol=0)
    resmall_crop = data.EvalTransform(RESMALL_CROP, 224, 0.0, 1.0)(image)  # shorter side 256, centre crop 224
    expected = TF.center_crop(TF.resize(chw, [256], antialias=False), [224, 224])
    torch.testing.assert_close(resmall_crop, expected, atol=0.02, rtol=0)
    resize_crop = data.EvalTransform(RESIZE_CROP, 224, 0.0, 1.0)(image)  # 256 x 256, centre crop 224
    expected = TF.center_crop(TF.resize(chw, [256, 256], antialias=False), [224, 224])
    torch.testing.assert_close(resize_crop, expected, atol=0.02, rtol=0)
    normalised = data.EvalTransform(OFFICIAL, 224, 127.5, 127.5)(image)
    torch.testing.assert_close(normalised, (direct - 127.5) / 127.5)


def test_array_and_folder_loaders_agree(digits):
    """Same geometry through the device-array path (float) and the DataLoader-worker path (uint8), for
    every protocol: within the fast path's one grey level (data.UINT8_PATH_MAX_ERROR)."""
    one_step = data.UINT8_PATH_MAX_ERROR / 127.5
    f_test, a_test = splits.open_split(digits["imagefolder"], "test"), splits.open_split(digits["arrays"], "test")
    for protocol in (OFFICIAL, RESMALL_CROP, RESIZE_CROP):
        f = list(data.eval_loader(f_test, protocol, 32, 100, "cpu", 0, 127.5, 127.5))
        a = list(data.eval_loader(a_test, protocol, 32, 100, "cpu", 0, 127.5, 127.5))
        assert [len(x) for x, _ in f] == [100, 100, 100, 60]
        torch.testing.assert_close(torch.cat([x for x, _ in f]), torch.cat([x for x, _ in a]), atol=one_step, rtol=0)
        assert torch.equal(torch.cat([y for _, y in f]), torch.cat([y for _, y in a]))
    aug = data.TrainAugment(32, True, 0.3, True, 127.5, 127.5)
    plan = [(np.array([5, 300, 7]), np.array([1, 2, 3])), (np.array([9, 9]), np.array([4, 5]))]
    f = list(data.train_loader(f_test, aug, plan, "cpu", 0))
    a = list(data.train_loader(a_test, aug, plan, "cpu", 0))
    for (fx, fy), (ax, ay) in zip(f, a):
        torch.testing.assert_close(fx, ax, atol=one_step, rtol=0)
        assert torch.equal(fy, ay) and fy.dtype == torch.int64
    assert not torch.equal(f[1][0][0], f[1][0][1])  # same image, different seeds


def test_folder_loader_workers_reproduce_the_main_process(digits):
    split = splits.open_split(digits["imagefolder"], "train")
    aug = data.TrainAugment(32, True, 0.3, True, 127.5, 127.5)
    plan = [(np.arange(i, i + 4), np.arange(i, i + 4) * 7) for i in range(0, 24, 4)]
    inline = list(data.train_loader(split, aug, plan, "cpu", 0))
    workers = list(data.train_loader(split, aug, iter(plan), "cpu", 2))
    assert len(workers) == len(plan)
    for (x0, y0), (x1, y1) in zip(inline, workers):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    loader = data.eval_loader(split, OFFICIAL, 32, 64, "cpu", 2, 127.5, 127.5)
    first, second = [x for x, _ in loader], [x for x, _ in loader]  # re-iterable (persistent workers)
    assert len(first) == len(second) == len(loader) and all(torch.equal(a, b) for a, b in zip(first, second))


# ---------------------------------------------------------------------------------------------
# ImageNet-style trees
def make_tree(root: Path, classes=("n01", "n02", "n03"), train=3, val=2) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{c}_{i}.JPEG", format="JPEG")
    return root


def imagenet_spec(path, expected=None, allow_subset=False, ground_truth=None) -> dict:
    dataset_record = {"label": "ImageNet", "source": {"kind": "imagefolder", "path": str(path),
                                            "val_ground_truth": ground_truth},
            "minival": {"fraction": 0.2}, "test_split": "val", "steps": 1,
            "allow_subset": allow_subset}
    if expected:
        dataset_record["expected"] = expected
    return dataset_record


def test_complete_tree_is_prepared_and_loads(tmp_path):
    src = make_tree(tmp_path / "imagenet")
    record = prepare_data.prepare("imagenet", imagenet_spec(src, {"num_classes": 3, "train": 9, "val": 6}),
                                  imagenet_json(tmp_path))
    assert record["classes"] == ["n01", "n02", "n03"] and record["splits"] == {"train": 9, "val": 6}
    assert record["subset"] is False
    dataset_record = splits.load_dataset_record(imagenet_json(tmp_path))
    test = splits.open_split(dataset_record, "test")
    assert len(test) == 6 and list(test.labels) == [0, 0, 1, 1, 2, 2]
    assert len(splits.open_split(dataset_record, "train")) + len(splits.open_split(dataset_record, "minival")) == 9
    images, labels = next(iter(data.eval_loader(test, RESMALL_CROP, 16, 6, "cpu", 0, 127.5, 127.5)))
    assert images.shape == (6, 3, 16, 16) and images.abs().max() <= 1.0


def test_short_tree_is_rejected_naming_the_counts(tmp_path):
    src = make_tree(tmp_path / "imagenet")
    expected = {"num_classes": 1000, "train": 1281167, "val": 50000}
    with pytest.raises(PipelineError, match=r"3 of 1,000 classes, 9 of 1,281,167 train images, 6 of 50,000 val"):
        prepare_data.prepare("imagenet", imagenet_spec(src, expected), imagenet_json(tmp_path))
    assert not (imagenet_json(tmp_path)).exists()
    record = prepare_data.prepare("imagenet", imagenet_spec(src, expected, allow_subset=True), imagenet_json(tmp_path))
    assert record["subset"] is True and "9 of 1,281,167 train images" in record["subset_note"]
    saved = json.loads((imagenet_json(tmp_path)).read_text())
    assert saved["subset"] is True and saved["subset_note"] == record["subset_note"]
    with pytest.raises(PipelineError, match="more than expected"):
        prepare_data.prepare("imagenet", imagenet_spec(src, {"train": 5}, allow_subset=True), imagenet_json(tmp_path))


@pytest.mark.parametrize("damage, message", [
    (lambda r: __import__("shutil").rmtree(r / "train"), r"imagenet/train: folder not found"),
    (lambda r: (r / "train" / "README.txt").write_text("x"), r"train/README.txt: stray file"),
    (lambda r: (r / "train" / "n02" / "labels.csv").write_text("x"), r"n02/labels.csv: not an image"),
    (lambda r: (r / "train" / "n04").mkdir(), r"train/n04: empty class folder"),
    (lambda r: __import__("shutil").rmtree(r / "val" / "n03"),
     r"incomplete: val images of 2 of 3 classes \(none of n03\).*datasets\.imagenet\.allow_subset: true"),
    (lambda r: (r / "val" / "n01").rename(r / "val" / "n09"), r"class folders of val/ that train/ lacks: \['n09'\]"),
])
def test_malformed_tree_is_rejected_naming_the_path(tmp_path, damage, message):
    src = make_tree(tmp_path / "imagenet")
    damage(src)
    with pytest.raises(PipelineError, match=message):
        prepare_data.prepare("imagenet", imagenet_spec(src), imagenet_json(tmp_path))
    assert not (imagenet_json(tmp_path)).exists()


def flatten_val(src: Path) -> list[tuple[str, str]]:
    """Move val/<wnid>/x into a flat val/ folder; returns (file, wnid) pairs."""
    pairs = []
    for class_dir in sorted((src / "val").iterdir()):
        for f in sorted(class_dir.iterdir()):
            f.rename(src / "val" / f"val_{len(pairs):03d}.JPEG")
            pairs.append((f"val_{len(pairs):03d}.JPEG", class_dir.name))
        class_dir.rmdir()
    return pairs


@pytest.mark.parametrize("form", ["wnid", "name_wnid"])
def test_flat_val_is_sorted_by_the_ground_truth(tmp_path, form):
    src = make_tree(tmp_path / "imagenet")
    pairs = flatten_val(src)
    gt = tmp_path / "gt.txt"
    shuffled = pairs[::-1]
    gt.write_text("".join(f"{w}\n" for _, w in pairs) if form == "wnid" else
                  "".join(f"{n} {w}\n" for n, w in shuffled))
    record = prepare_data.prepare("imagenet", imagenet_spec(src, ground_truth=str(gt)), imagenet_json(tmp_path))
    assert record["splits"]["val"] == 6
    val = tmp_path / "data" / "imagenet" / "val"
    for name, wnid in pairs:
        link = val / wnid / name
        assert link.is_symlink() and link.resolve() == (src / "val" / name).resolve()


def test_flat_val_ground_truth_errors(tmp_path):
    src = make_tree(tmp_path / "imagenet")
    pairs = flatten_val(src)
    gt = tmp_path / "gt.txt"
    gt.write_text("".join(f"{i + 1}\n" for i in range(len(pairs))))
    with pytest.raises(PipelineError, match="integer label '1'.*ILSVRC2012_ID"):
        prepare_data.prepare("imagenet", imagenet_spec(src, ground_truth=str(gt)), imagenet_json(tmp_path))
    gt.write_text("n01\n" * (len(pairs) - 1))
    with pytest.raises(PipelineError, match="5 labels for 6 validation images"):
        prepare_data.prepare("imagenet", imagenet_spec(src, ground_truth=str(gt)), imagenet_json(tmp_path))
    gt.write_text("n09\n" * len(pairs))
    with pytest.raises(PipelineError, match="gt.txt:1: 'n09' is not a class folder"):
        prepare_data.prepare("imagenet", imagenet_spec(src, ground_truth=str(gt)), imagenet_json(tmp_path))


@pytest.mark.parametrize("flat", [False, True])
def test_val_of_some_training_classes_is_a_flagged_subset(tmp_path, flat):
    """allow_subset: a validation set without images of some training classes is prepared and flagged; its
    labels stay the training labels (every class has a folder, maybe empty), the source tree is untouched."""
    src = make_tree(tmp_path / "imagenet", classes=("n01", "n02", "n03", "n04"))
    for wnid in ("n01", "n03"):
        __import__("shutil").rmtree(src / "val" / wnid)
    gt = None
    if flat:
        gt = tmp_path / "gt.txt"
        gt.write_text("".join(f"{n} {w}\n" for n, w in flatten_val(src)))
    before = sorted(str(p.relative_to(src)) for p in src.rglob("*"))
    out_json = tmp_path / "data" / "imagenet" / "dataset.json"
    spec = imagenet_spec(src, allow_subset=True, ground_truth=gt and str(gt))
    record = prepare_data.prepare("imagenet", spec, out_json)
    assert sorted(str(p.relative_to(src)) for p in src.rglob("*")) == before
    assert record["classes"] == ["n01", "n02", "n03", "n04"] and record["splits"] == {"train": 12, "val": 4}
    assert record["subset"] is True and "val images of 2 of 4 classes (none of n01, n03)" in record["subset_note"]
    test = splits.open_split(splits.load_dataset_record(out_json), "test")
    assert list(test.labels) == [1, 1, 3, 3] and [Path(f).parent.name for f in test.files] == ["n02"] * 2 + ["n04"] * 2
    assert sorted(p.name for p in (out_json.parent / "val").iterdir()) == ["n01", "n02", "n03", "n04"]
    images, labels = next(iter(data.eval_loader(test, OFFICIAL, 16, 4, "cpu", 0, 127.5, 127.5)))
    assert images.shape == (4, 3, 16, 16) and labels.tolist() == [1, 1, 3, 3]
    # Without allow_subset the same tree is refused, and no dataset.json is written.
    out_json.unlink()
    with pytest.raises(PipelineError, match=r"incomplete: val images of 2 of 4 classes.*allow_subset: true"):
        prepare_data.prepare("imagenet", dict(spec, allow_subset=False), out_json)
    assert not out_json.exists()


# ---------------------------------------------------------------------------------------------
# CIFAR-10 through torchvision's own download, from a loopback HTTP server
def fake_cifar_archive(folder: Path, n_train=10, n_test=4):
    """A small cifar-10-python.tar.gz in torchvision's expected format, plus md5s and the arrays."""
    rng = np.random.default_rng(1)
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    arrays = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_train
        flat = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        (batches / name).write_bytes(pickle.dumps({"data": flat, "labels": labels}))
        arrays[name] = (flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.array(labels))
    label_names = [f"class{i}" for i in range(10)]
    (batches / "batches.meta").write_bytes(pickle.dumps({"label_names": label_names}))
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in batches.iterdir()}
    archive = folder / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(batches, arcname="cifar-10-batches-py")
    return archive, md5, arrays, label_names


@pytest.fixture
def cifar_server(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    served = tmp_path / "served"
    archive, md5, arrays, label_names = fake_cifar_archive(served)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(CIFAR10, "url", f"http://127.0.0.1:{server.server_address[1]}/{archive.name}")
    monkeypatch.setattr(CIFAR10, "tgz_md5", hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                          "md5": md5["batches.meta"]})
    yield CIFAR10, arrays, label_names
    server.shutdown()


CIFAR_SPEC = {"label": "CIFAR-10", "source": {"kind": "cifar10", "path": None}, "minival": {"fraction": 0.02},
              "test_split": "test", "steps": 1, "eval_protocol": "official"}


def test_cifar10_download_path(tmp_path, cifar_server):
    _, arrays, label_names = cifar_server
    prepare_data.main(["--name", "cifar10", "--dataset-config", json.dumps(CIFAR_SPEC),
                       "--out", str(tmp_path / "d/cifar10/dataset.json")])
    dataset_record = splits.load_dataset_record(tmp_path / "d/cifar10/dataset.json")
    assert dataset_record["layout"] == "arrays" and dataset_record["classes"] == label_names
    assert dataset_record["splits"] == {"train": 50, "test": 4}
    assert dataset_record["minival"] == {"fraction": 0.02, "seed": 0}
    test = splits.open_split(dataset_record, "test")
    assert np.array_equal(test.images, arrays["test_batch"][0]) and np.array_equal(test.labels, arrays["test_batch"][1])
    with np.load(tmp_path / "d" / "cifar10" / "train.npz") as z:
        assert z["images"].dtype == np.uint8 and z["labels"].dtype == np.int64 and z["images"].shape == (50, 32, 32, 3)
        assert np.array_equal(z["images"][:10], arrays["data_batch_1"][0])
    assert len(splits.open_split(dataset_record, "minival")) == 1
    assert len(splits.open_split(dataset_record, "train")) == 49
    # An existing torchvision folder (source.path) is used as it is, and verified by md5.
    spec2 = dict(CIFAR_SPEC, source={"kind": "cifar10", "path": str(tmp_path / "d" / "cifar10" / "raw")})
    assert prepare_data.prepare("c2", spec2, tmp_path / "d/c2/dataset.json")["splits"] == {"train": 50, "test": 4}
    (tmp_path / "d" / "cifar10" / "raw" / "cifar-10-batches-py" / "test_batch").write_bytes(b"corrupt")
    with pytest.raises(PipelineError, match="md5"):
        prepare_data.prepare("c3", spec2, tmp_path / "d/c3/dataset.json")


def test_cifar10_corrupted_download_is_rejected(tmp_path, cifar_server, monkeypatch):
    CIFAR10, _, _ = cifar_server
    monkeypatch.setattr(CIFAR10, "tgz_md5", "0" * 32)
    with pytest.raises(PipelineError):
        prepare_data.prepare("cifar10", CIFAR_SPEC, tmp_path / "d/cifar10/dataset.json")
    assert not (tmp_path / "d/cifar10/dataset.json").exists()


def test_config_split_names_are_checked(tmp_path):
    with pytest.raises(PipelineError, match="test_split: 'val' is not one of"):
        prepare_data.prepare("d", dict(digits_spec("arrays"), test_split="val"), tmp_path / "d" / "dataset.json")
    with pytest.raises(PipelineError, match="nothing is selected on test"):
        prepare_data.prepare("d", dict(digits_spec("imagefolder"), minival={"split": "test"}),
                             tmp_path / "d" / "dataset.json")
