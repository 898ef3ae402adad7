"""ImageNet ReaL: real.json checks, hand-computed ReaL top-1, file-name order, evaluate's predictions file."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from torch import nn

from workflow_scripts import data, evaluate, model_io, prepare_data, real, splits
from workflow_scripts.common import PipelineError

torch.set_num_threads(1)
KEY = "datasets.imagenet.real_labels"
# Six validation images ILSVRC2012_val_0000000{n}: class folder of each, the class a lookup "model"
# predicts for it, and its real.json list. Class order (c0: 4, 6; c1: 1, 5; c2: 2, 3) differs from name order.
CLASS_OF = {1: 1, 2: 2, 3: 2, 4: 0, 5: 1, 6: 0}
PREDICTED = {1: 0, 2: 2, 3: 1, 4: 0, 5: 1, 6: 2}
REAL = [[0, 1], [], [2], [0], [1, 2], [0]]  # name order: hit, left out, miss, hit, hit, miss -> 3 of 5


def val_name(number: int) -> str:
    return f"ILSVRC2012_val_{number:08d}.png"


def test_real_top1_by_hand():
    result = real.real_top1(np.array([PREDICTED[n] for n in range(1, 7)]), REAL)
    assert result == {"real_top1": 60.0, "num_images": 5, "num_excluded_empty": 1}
    several = real.real_top1(np.array([3, 7, 7, 0]), [[1, 3, 5], [7], [], [2, 4]])
    assert several == {"real_top1": pytest.approx(200 / 3), "num_images": 3, "num_excluded_empty": 1}
    with pytest.raises(PipelineError, match="every label list of real.json is empty"):
        real.real_top1(np.array([0, 1]), [[], []])


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    ("[[1], [2", "not valid JSON"),
    ('{"0": [1]}', "a dict, not a JSON list of lists"),
    ("[[1], 2, [3]]", "entry 1 is 2, not a list of class indices 0..9"),
    ('[[1], ["3"], [3]]', "entry 1 is"),
    ("[[1], [3.0], [3]]", "entry 1 is"),
    ("[[1], [true], [3]]", "entry 1 is"),
    ("[[1], [2], [10]]", "entry 2 is"),
    ("[[1], [-1], [3]]", "entry 1 is"),
    ("[[1], [2]]", "2 label lists but the validation split has 3 images"),
    ("[[1], [2], [3], []]", "4 label lists but the validation split has 3 images"),
])
def test_malformed_real_json_is_one_error_naming_the_key(tmp_path, content, message):
    path = tmp_path / "real.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PipelineError, match=message) as error:
        real.load_real_labels(path, num_images=3, num_classes=10)
    assert KEY in str(error.value) and "reassessed-imagenet" in str(error.value)


def test_valid_real_json_loads(tmp_path):
    path = tmp_path / "real.json"
    path.write_text("[[1, 9], [], [0]]")
    assert real.load_real_labels(path, num_images=3, num_classes=10) == [[1, 9], [], [0]]


# ---------------------------------------------------------------------------------------------
class LookupModel(nn.Module):
    """Reads the image number n from a flat grey image of value 10 n; outputs one-hot(PREDICTED[n])."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.zeros(len(PREDICTED) + 1, 3))
        for number, cls in PREDICTED.items():
            self.table[number, cls] = 1.0

    def forward(self, images):
        return self.table[(images.mean((1, 2, 3)) / 10).round().long()]


@pytest.fixture
def unsorted_imagenet(tmp_path):
    """An ImageNet-style tree whose class-then-name order is not its name order, prepared by prepare_data."""
    from PIL import Image

    source = tmp_path / "imagenet"
    for cls in range(3):
        (source / "train" / f"c{cls}").mkdir(parents=True)
        Image.new("RGB", (5, 4), (0, 0, 0)).save(source / "train" / f"c{cls}" / "t.png")
    for number, cls in CLASS_OF.items():
        (source / "val" / f"c{cls}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (5, 4), (10 * number,) * 3).save(source / "val" / f"c{cls}" / val_name(number))
    dataset_config = {"label": "ImageNet", "source": {"kind": "imagefolder", "path": str(source)},
                      "minival": {"fraction": 0.5}, "test_split": "val", "steps": 1, "eval_protocol": "official"}
    prepare_data.prepare("imagenet", dataset_config, tmp_path / "data" / "dataset.json")
    return tmp_path / "data" / "dataset.json"


def test_real_top1_through_evaluation_of_a_folder_not_sorted_by_name(tmp_path, unsorted_imagenet):
    record = splits.load_dataset_record(unsorted_imagenet)
    split = splits.open_split(record, "test")
    assert [n[-6:-4] for n in map(str, split.files)] == ["04", "06", "01", "05", "02", "03"]  # class, then name
    loader = data.eval_loader(split, {"resize": "direct"}, 4, 4, "cpu", 0, 0.0, 1.0)  # two batches
    result = evaluate.evaluate_model(LookupModel(), loader, 3, "cpu")
    assert result["top1"] == 50.0  # against the folder labels: 4 and 5 and 2 right, 6 and 1 and 3 wrong
    result["model"] = "lookup"
    evaluate.write_predictions(tmp_path / "pred.npz", split, [result])
    real_json = tmp_path / "real.json"
    real_json.write_text(json.dumps(REAL))
    out = tmp_path / "real" / "imagenet.json"
    real.main(["--predictions", str(tmp_path / "pred.npz"), "--real-labels", str(real_json),
               "--data", str(unsorted_imagenet), "--out", str(out)])
    scored = json.loads(out.read_text())
    assert scored["real_top1"] == 60.0 and scored["num_images"] == 5 and scored["num_excluded_empty"] == 1
    assert scored["real_top1_std"] is None and scored["num_validation_images"] == 6
    assert scored["runs"] == [{"model": "lookup", "seed": None, "real_top1": 60.0, "top1": 50.0}]
    assert scored["real_labels_sha256"] == hashlib.sha256(real_json.read_bytes()).hexdigest()
    assert scored["predictions"] == str(tmp_path / "pred.npz") and scored["image_order"] == "file names sorted"
    # Scoring in split order instead of name order would give 2 of 5: the reordering is what is tested.
    in_split_order = np.array([PREDICTED[int(str(f)[-6:-4])] for f in split.files])
    assert real.real_top1(in_split_order, REAL)["real_top1"] == 40.0


def test_predictions_must_match_the_dataset(tmp_path, unsorted_imagenet):
    real_json = tmp_path / "real.json"
    real_json.write_text(json.dumps(REAL))
    with pytest.raises(PipelineError, match="predictions file not found"):
        real.evaluate_real(tmp_path / "none.npz", real_json, splits.load_dataset_record(unsorted_imagenet))
    np.savez(tmp_path / "short.npz", top5=np.zeros((1, 5, 3), np.int16), labels=np.zeros(5, np.int64),
             models=np.array(["m"]))
    with pytest.raises(PipelineError, match="5 images but the test split of 'imagenet' has 6"):
        real.evaluate_real(tmp_path / "short.npz", real_json, splits.load_dataset_record(unsorted_imagenet))
    np.savez(tmp_path / "bad.npz", top5=np.zeros((5, 3), np.int16), labels=np.zeros(5), models=np.array(["m"]))
    with pytest.raises(PipelineError, match="top5 has shape"):
        real.load_predictions(tmp_path / "bad.npz")
    names = np.array(["a.png", "b.png", "a.png"])
    with pytest.raises(PipelineError, match="'a.png' occurs in more than one class folder"):
        real.file_name_order({"top5": np.zeros((1, 3, 1)), "file_names": names})


# ---------------------------------------------------------------------------------------------
ARCH = {"patch_size": 4, "hidden_dim": 16, "num_blocks": 1, "tokens_mlp_dim": 8, "channels_mlp_dim": 32,
        "num_classes": 10, "image_size": 16}


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "dataset.json"
    prepare_data.prepare("digits", {"label": "Digits", "source": {"kind": "sklearn_digits", "layout": "imagefolder"},
                                    "minival": {"split": "val"}, "test_split": "test", "steps": 1,
                                    "eval_protocol": "official"}, out)
    return out


def random_mixer(path, seed):
    torch.manual_seed(seed)
    model = model_io.build_model(ARCH)
    nn.init.normal_(model.head.weight)  # timm zero-initialises the head: every logit would tie
    model_io.save_model(model, ARCH, path)
    return str(path)


def check_predictions(npz, runs: list[dict], split: splits.Split):
    """The stored top-5 reproduce each run's own top-1 and top-5; names and labels follow the split."""
    with np.load(npz, allow_pickle=False) as z:
        top5, labels, names, models = z["top5"], z["labels"], z["file_names"], z["models"]
    assert top5.shape == (len(runs), len(split), 5) and top5.dtype == np.int16
    assert np.array_equal(labels, split.labels) and list(models) == [run["model"] for run in runs]
    assert list(names) == [f.rsplit("/", 1)[-1] for f in split.files]
    for stored, run in zip(top5, runs):
        assert 100.0 * np.mean(stored[:, 0] == labels) == pytest.approx(run["top1"], abs=1e-9)
        assert 100.0 * np.mean((stored == labels[:, None]).any(1)) == pytest.approx(run["top5"], abs=1e-9)
        assert all(len(set(row)) == 5 for row in stored.tolist())


def test_evaluate_writes_predictions_consistent_with_its_top1(tmp_path, digits_folder):
    split = splits.open_split(splits.load_dataset_record(digits_folder), "test")
    common = ["--data", str(digits_folder), "--protocol-name", "official", "--protocol", '{"resize": "direct"}',
              "--batch-size", "100", "--threads", "1", "--pixel-mean", "127.5", "--pixel-std", "127.5"]
    model = random_mixer(tmp_path / "m.safetensors", 0)
    evaluate.main(["--model", model, *common, "--out", str(tmp_path / "b.json"), "--predictions-out",
                   str(tmp_path / "b.npz")])
    baseline = json.loads((tmp_path / "b.json").read_text())
    assert "predictions" not in baseline
    check_predictions(tmp_path / "b.npz", [baseline], split)
    with np.load(tmp_path / "b.npz") as z:
        assert "seeds" not in z.files

    summaries, models = [], []
    for seed in (1, 0):
        summary = tmp_path / f"s{seed}.json"
        summary.write_text(json.dumps({"lr": 0.1, "seed": seed, "protocol": {"pixel_mean": 127.5, "pixel_std": 127.5}}))
        summaries.append(str(summary))
        models.append(random_mixer(tmp_path / f"m{seed}.safetensors", 10 + seed))
    selection = tmp_path / "selection.json"
    selection.write_text(json.dumps({"checkpoint": "ck", "dataset": "digits", "selected_lr": 0.1}))
    evaluate.main(["--selection", str(selection), "--summaries", *summaries, "--models", *models, *common,
                   "--out", str(tmp_path / "e.json"), "--predictions-out", str(tmp_path / "e.npz")])
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert all("predictions" not in run for run in evaluated["runs"])
    check_predictions(tmp_path / "e.npz", evaluated["runs"], split)
    with np.load(tmp_path / "e.npz") as z:
        assert z["seeds"].tolist() == [0, 1]
