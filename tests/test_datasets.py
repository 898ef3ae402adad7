"""The torchvision-backed dataset kinds (cifar100, pets, flowers): torchvision's own download and md5
code run against a loopback HTTP server serving small fakes in each dataset's real on-disk format,
and existing folders given as source.path. No network."""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import pickle
import shutil
import socket
import tarfile
import threading
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import numpy as np
import pytest
import yaml
from PIL import Image

from workflow_scripts import data, prepare_data, splits
from workflow_scripts.common import PipelineError

REPO = Path(__file__).resolve().parents[1]
STUDY = yaml.safe_load((REPO / "config.yaml").read_text())

# Fake Oxford-IIIT Pet: breeds named so that alphabetical order is not label order (label = position + 1).
PET_BREEDS = [("Siamese", 1), ("american_bulldog", 2), ("Bengal", 1)]  # (file-name prefix, species 1 cat 2 dog)
PET_TRAINVAL, PET_TEST = 3, 2  # images per breed
FLOWER_LABELS = {"train": [1, 2, 3], "val": [3, 2, 1], "test": [2, 1, 3, 3, 1, 2]}  # 1-based, as in the .mat


def write_jpeg(path: Path, rng: np.random.Generator, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, format="JPEG")


def tar_folder(archive: Path, folder: Path) -> str:
    """archive (.tar.gz) holding folder under its own name; returns its md5."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return md5(archive)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def fake_pets(base: Path, served: Path) -> list[str]:
    """oxford-iiit-pet/{images,annotations} at base, and its two archives in served; returns the md5s."""
    rng = np.random.default_rng(2)
    for split, per_breed in (("trainval", PET_TRAINVAL), ("test", PET_TEST)):
        lines = []
        for label, (breed, species) in enumerate(PET_BREEDS, 1):
            for i in range(per_breed):
                image_id = f"{breed}_{split}{i}"
                write_jpeg(base / "images" / f"{image_id}.jpg", rng, 20 + 3 * i, 28 - 2 * label)
                lines.append(f"{image_id} {label} {species} {i + 1}\n")
        (base / "annotations").mkdir(parents=True, exist_ok=True)
        (base / "annotations" / f"{split}.txt").write_text("".join(lines))
    return [tar_folder(served / "images.tar.gz", base / "images"),
            tar_folder(served / "annotations.tar.gz", base / "annotations")]


def fake_flowers(base: Path, served: Path) -> dict[str, str]:
    """flowers-102/{jpg,imagelabels.mat,setid.mat} at base, served as torchvision downloads them; md5s."""
    from scipy.io import savemat

    rng = np.random.default_rng(3)
    labels, set_ids = [], {}
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        set_ids[key] = np.arange(len(labels) + 1, len(labels) + len(FLOWER_LABELS[split]) + 1)
        labels += FLOWER_LABELS[split]
    for image_id in range(1, len(labels) + 1):
        write_jpeg(base / "jpg" / f"image_{image_id:05d}.jpg", rng, 16 + image_id, 30 - image_id)
    savemat(base / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    savemat(base / "setid.mat", {k: v[None, :] for k, v in set_ids.items()})
    for name in ("imagelabels.mat", "setid.mat"):
        shutil.copy(base / name, served / name)
    return {"image": tar_folder(served / "102flowers.tgz", base / "jpg"),
            "label": md5(base / "imagelabels.mat"), "setid": md5(base / "setid.mat")}


def fake_cifar100(served: Path) -> tuple[str, dict[str, str], dict, list[str]]:
    """cifar-100-python.tar.gz in torchvision's format: (archive md5, file md5s, {split: (images, labels)}, names)."""
    rng = np.random.default_rng(4)
    folder = served / "staging" / "cifar-100-python"
    folder.mkdir(parents=True)
    arrays = {}
    for split, n in (("train", 12), ("test", 5)):
        flat = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        (folder / split).write_bytes(pickle.dumps({"data": flat, "fine_labels": fine, "coarse_labels": [0] * n}))
        arrays[split] = (flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.array(fine))
    names = [f"fine{i:02d}" for i in range(100)]
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": names, "coarse_label_names": ["c"] * 20}))
    files = {p.name: md5(p) for p in folder.iterdir()}
    return tar_folder(served / "cifar-100-python.tar.gz", folder), files, arrays, names


@pytest.fixture
def served(tmp_path, monkeypatch):
    """Fakes of the three datasets on a loopback server, torchvision's URLs and md5s pointed at them.

    Also returns the unpacked folders (`staged`), usable as an existing source.path.
    """
    from torchvision.datasets import CIFAR100, Flowers102, OxfordIIITPet

    root, staged = tmp_path / "served", tmp_path / "staged"
    root.mkdir()
    pets_md5 = fake_pets(staged / prepare_data.PETS_FOLDER, root)
    flowers_md5 = fake_flowers(staged / prepare_data.FLOWERS_FOLDER, root)
    cifar_md5, cifar_files, cifar_arrays, cifar_names = fake_cifar100(root)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    monkeypatch.setattr(OxfordIIITPet, "_RESOURCES", ((url + "images.tar.gz", pets_md5[0]),
                                                      (url + "annotations.tar.gz", pets_md5[1])))
    monkeypatch.setattr(Flowers102, "_download_url_prefix", url)
    monkeypatch.setattr(Flowers102, "_file_dict", {"image": ("102flowers.tgz", flowers_md5["image"]),
                                                   "label": ("imagelabels.mat", flowers_md5["label"]),
                                                   "setid": ("setid.mat", flowers_md5["setid"])})
    monkeypatch.setattr(CIFAR100, "url", url + "cifar-100-python.tar.gz")
    monkeypatch.setattr(CIFAR100, "tgz_md5", cifar_md5)
    monkeypatch.setattr(CIFAR100, "train_list", [["train", cifar_files["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", cifar_files["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names", "md5": cifar_files["meta"]})
    yield SimpleNamespace(url=url, root=root, staged=staged, cifar_arrays=cifar_arrays, cifar_names=cifar_names)
    server.shutdown()
    server.server_close()


def study_entry(name: str, path: str | None = None, **changes) -> dict:
    """The study's own config entry for the dataset (config.yaml), with source.path and other keys changed."""
    entry = json.loads(json.dumps(STUDY["datasets"][name]))
    entry["source"]["path"] = path
    entry.pop("expected", None)  # the fakes are tiny; the real counts are tested on their own below
    return {**entry, **changes}


def prepare_cli(name: str, entry: dict, out_json: Path) -> dict:
    prepare_data.main(["--name", name, "--dataset-config", json.dumps(entry), "--out", str(out_json)])
    return splits.load_dataset_record(out_json)


def assert_same_as_torchvision(record: dict, torchvision_splits: dict[str, list]) -> None:
    """Each split holds the very files torchvision lists, under torchvision's labels (public API only)."""
    for split, datasets in torchvision_splits.items():
        ours = splits._open_disk_split(record, split)
        theirs = sorted((label, np.asarray(image).tobytes()) for ds in datasets for image, label in ds)
        mine = sorted((int(label), data.load_image(f).numpy().tobytes()) for f, label in zip(ours.files, ours.labels))
        assert mine == theirs, split


# ---------------------------------------------------------------------------------------------
def test_study_config_declares_the_new_kinds_and_passes_the_schema():
    schema = yaml.safe_load((REPO / "rules" / "schemas" / "config.schema.yaml").read_text())
    jsonschema.Draft202012Validator(schema).validate(STUDY)
    kinds = {name: STUDY["datasets"][name]["source"]["kind"] for name in ("cifar100", "pets", "flowers")}
    assert kinds == {"cifar100": "cifar100", "pets": "pets", "flowers": "flowers"}
    assert set(prepare_data.PREPARE_BY_KIND) == set(schema["properties"]["datasets"]["additionalProperties"]
                                                    ["properties"]["source"]["properties"]["kind"]["enum"])


def test_cifar100_download_and_existing_folder(tmp_path, served):
    record = prepare_cli("cifar100", study_entry("cifar100"), tmp_path / "d" / "cifar100" / "dataset.json")
    assert record["layout"] == "arrays" and record["classes"] == served.cifar_names and record["num_classes"] == 100
    assert record["splits"] == {"train": 12, "test": 5} and record["test_split"] == "test"
    for split, (images, labels) in served.cifar_arrays.items():
        with np.load(tmp_path / "d" / "cifar100" / f"{split}.npz") as z:
            assert z["images"].dtype == np.uint8 and np.array_equal(z["images"], images)
            assert np.array_equal(z["labels"], labels)  # the fine labels
    # An existing folder: its parent or cifar-100-python itself; verified by torchvision's md5s.
    folder = tmp_path / "d" / "cifar100" / "raw" / "cifar-100-python"
    for path in (folder.parent, folder):
        entry = study_entry("cifar100", str(path))
        assert prepare_data.prepare("c2", entry, tmp_path / "d" / "c2" / "dataset.json")["splits"]["train"] == 12
    (folder / "test").write_bytes(b"corrupt")
    with pytest.raises(PipelineError, match=r"md5.*datasets\.c3\.source\.path"):
        prepare_data.prepare("c3", study_entry("cifar100", str(folder)), tmp_path / "d" / "c3" / "dataset.json")
    assert not (tmp_path / "d" / "c3" / "dataset.json").exists()


def test_pets_download_links_torchvision_files_under_its_labels(tmp_path, served):
    from torchvision.datasets import OxfordIIITPet

    out = tmp_path / "d" / "pets"
    record = prepare_cli("pets", study_entry("pets"), out / "dataset.json")
    assert record["layout"] == "imagefolder" and record["test_split"] == "test"
    assert record["classes"] == ["000_siamese", "001_american_bulldog", "002_bengal"]  # label order, not a-z
    assert record["splits"] == {"train": 3 * PET_TRAINVAL, "test": 3 * PET_TEST}
    assert record["minival"] == {"fraction": 0.1, "seed": 0}
    raw = out / "raw"
    assert_same_as_torchvision(record, {"train": [OxfordIIITPet(raw, split="trainval")],
                                        "test": [OxfordIIITPet(raw, split="test")]})
    # JPEGs are linked, not re-encoded.
    link = out / "train" / "001_american_bulldog" / "american_bulldog_trainval2.jpg"
    original = raw / prepare_data.PETS_FOLDER / "images" / "american_bulldog_trainval2.jpg"
    assert link.is_symlink() and link.resolve() == original.resolve()
    assert link.read_bytes() == (served.staged / prepare_data.PETS_FOLDER / "images" / link.name).read_bytes()
    # Variable image sizes go through the image-folder loader; a rerun rebuilds the same tree.
    test = splits.open_split(record, "test")
    images, labels = next(iter(data.eval_loader(test, {"resize": "direct"}, 16, 6, "cpu", 0, 127.5, 127.5)))
    assert images.shape == (6, 3, 16, 16) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    written = json.loads((out / "dataset.json").read_text())
    assert prepare_data.prepare("pets", study_entry("pets"), out / "dataset.json") == written


def test_flowers_training_set_is_train_plus_val(tmp_path, served):
    from torchvision.datasets import Flowers102

    out = tmp_path / "d" / "flowers"
    record = prepare_cli("flowers", study_entry("flowers"), out / "dataset.json")
    assert record["classes"] == ["000_pink_primrose", "001_hard_leaved_pocket_orchid", "002_canterbury_bells"]
    assert record["splits"] == {"train": 6, "test": 6}
    raw = out / "raw"
    assert_same_as_torchvision(record, {"train": [Flowers102(raw, split="train"), Flowers102(raw, split="val")],
                                        "test": [Flowers102(raw, split="test")]})
    assert (out / "test" / "001_hard_leaved_pocket_orchid" / "image_00007.jpg").is_symlink()  # test id 7: label 2


@pytest.mark.parametrize("kind", ["pets", "flowers"])
def test_existing_folder_is_used_in_place_and_checked_file_by_file(tmp_path, served, kind):
    folder = served.staged / (prepare_data.PETS_FOLDER if kind == "pets" else prepare_data.FLOWERS_FOLDER)
    out_json = tmp_path / "d" / kind / "dataset.json"
    for path in (folder.parent, folder):  # the parent torchvision expects, or the dataset folder itself
        record = prepare_data.prepare(kind, study_entry(kind, str(path)), out_json)
        assert record["splits"]["test"] == 6
    assert not (tmp_path / "d" / kind / "raw").exists()  # nothing downloaded
    linked = sorted((out_json.parent / "train").rglob("*.jpg"))[0]
    assert linked.resolve().parent.parent == folder.resolve()
    linked.resolve().unlink()
    out_json.unlink()
    with pytest.raises(PipelineError, match=rf"1 of the 1[25] images .* are missing .*datasets\.{kind}\.source\.path"):
        prepare_data.prepare(kind, study_entry(kind, str(folder)), out_json)
    assert not out_json.exists()


def test_existing_flowers_folder_with_a_bad_split_file_fails_torchvisions_md5(tmp_path, served):
    folder = served.staged / prepare_data.FLOWERS_FOLDER
    (folder / "setid.mat").write_bytes(b"not the split file")
    with pytest.raises(PipelineError, match=r"corrupted.*md5.*datasets\.flowers\.source\.path"):
        prepare_data.prepare("flowers", study_entry("flowers", str(folder)), tmp_path / "d" / "dataset.json")
    assert not (tmp_path / "d" / "dataset.json").exists()


def test_download_failures_name_the_source_key(tmp_path, served, monkeypatch):
    from torchvision.datasets import OxfordIIITPet

    good = OxfordIIITPet._RESOURCES
    monkeypatch.setattr(OxfordIIITPet, "_RESOURCES", (good[0], (good[1][0], "0" * 32)))  # a corrupted download
    out_json = tmp_path / "d" / "pets" / "dataset.json"
    with pytest.raises(PipelineError, match=r"corrupted\. \(torchvision's check .* md5\); delete .*raw and rerun"
                                            r".*datasets\.pets\.source\.path"):
        prepare_data.prepare("pets", study_entry("pets"), out_json)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/"
    monkeypatch.setattr(OxfordIIITPet, "_RESOURCES", ((closed + "images.tar.gz", good[0][1]), good[1]))
    shutil.rmtree(out_json.parent)
    with pytest.raises(PipelineError, match=r"datasets\.pets: downloading .*images\.tar\.gz.* failed .*"
                                            r"datasets\.pets\.source\.path"):
        prepare_data.prepare("pets", study_entry("pets"), out_json)
    assert not out_json.exists()
    monkeypatch.setattr(OxfordIIITPet, "_RESOURCES", good)  # the network is back: the rerun succeeds
    assert prepare_data.prepare("pets", study_entry("pets"), out_json)["splits"]["train"] == 9


def test_killed_extraction_is_redone_from_the_verified_archive(tmp_path, served):
    out_json = tmp_path / "d" / "flowers" / "dataset.json"
    prepare_data.prepare("flowers", study_entry("flowers"), out_json)
    raw = out_json.parent / "raw"
    marker = raw / f".{prepare_data.FLOWERS_FOLDER}.extracted"
    image = raw / prepare_data.FLOWERS_FOLDER / "jpg" / "image_00004.jpg"
    assert marker.exists()
    # Extraction finished (marker present) but a file went missing since: an error, not a silent subset.
    image.unlink()
    with pytest.raises(PipelineError, match=r"1 of the 12 images .* missing .*delete .*raw and rerun"):
        prepare_data.prepare("flowers", study_entry("flowers"), out_json)
    # A job killed mid-extraction leaves no marker: the extracted files are not trusted and are redone.
    marker.unlink()
    (served.root / "102flowers.tgz").rename(served.root / "moved.tgz")  # must come from the kept archive
    record = prepare_data.prepare("flowers", study_entry("flowers"), out_json)
    assert image.is_file() and marker.exists() and record["splits"] == {"train": 6, "test": 6}


def test_expected_counts_are_the_real_ones_and_checked(tmp_path, served):
    entry = dict(study_entry("pets"), expected=STUDY["datasets"]["pets"]["expected"])
    out_json = tmp_path / "d" / "pets" / "dataset.json"
    with pytest.raises(PipelineError, match=r"3 of 37 classes, 9 of 3,680 train images, 6 of 3,669 test images"
                                            r".*datasets\.pets\.source\.path.*allow_subset"):
        prepare_data.prepare("pets", entry, out_json)
    assert not out_json.exists()
    record = prepare_data.prepare("pets", dict(entry, allow_subset=True), out_json)
    assert record["subset"] is True and "6 of 3,669 test images" in record["subset_note"]
    assert STUDY["datasets"]["flowers"]["expected"] == {"num_classes": 102, "train": 1020 + 1020, "test": 6149}
    with pytest.raises(PipelineError, match=r"datasets\.pets\.expected: \['val'\] not prepared"):
        prepare_data.prepare("pets", dict(entry, expected={"val": 6}), out_json)


def test_class_folder_names_sort_in_label_order():
    names = [f"class {chr(122 - i % 26)}{i}" for i in range(102)]  # z.., y.., reverse alphabetical
    folders = prepare_data.class_folder_names(names, 102)
    assert sorted(folders) == folders and folders[0] == "000_class_z0" and folders[101] == "101_class_c101"
    assert prepare_data.class_folder_names(["colt's foot", "pink-yellow dahlia?"], 2) == [
        "000_colt_s_foot", "001_pink_yellow_dahlia"]


def test_test_split_of_some_training_classes_is_a_flagged_subset(tmp_path, served):
    """allow_subset: a test split without images of some breeds is prepared under the training labels and
    flagged; without it, refused. A test label the training split lacks is refused either way."""
    folder = served.staged / prepare_data.PETS_FOLDER
    test_txt = folder / "annotations" / "test.txt"
    lines = test_txt.read_text().splitlines(keepends=True)
    test_txt.write_text("".join(line for line in lines if not line.startswith("american_bulldog")))
    out_json = tmp_path / "d" / "pets" / "dataset.json"
    with pytest.raises(PipelineError, match=r"incomplete: test images of 2 of 3 classes \(none of "
                                            r"001_american_bulldog\).*datasets\.pets\.allow_subset: true"):
        prepare_data.prepare("pets", study_entry("pets", str(folder)), out_json)
    assert not out_json.exists()
    record = prepare_data.prepare("pets", study_entry("pets", str(folder), allow_subset=True), out_json)
    assert record["subset"] is True and record["splits"] == {"train": 9, "test": 4}
    assert record["classes"] == ["000_siamese", "001_american_bulldog", "002_bengal"]
    test = splits.open_split(splits.load_dataset_record(out_json), "test")
    assert test.labels.tolist() == [0, 0, 2, 2] and not any((out_json.parent / "test" / record["classes"][1]).iterdir())
    trainval = folder / "annotations" / "trainval.txt"
    trainval.write_text("".join(line for line in trainval.read_text().splitlines(keepends=True)
                                if not line.startswith("Bengal")))
    test_txt.write_text("".join(lines))
    with pytest.raises(PipelineError, match=r"the test split has labels outside 0\.\.1"):
        prepare_data.prepare("pets", study_entry("pets", str(folder), allow_subset=True), out_json)
