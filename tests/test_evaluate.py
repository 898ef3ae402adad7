"""Evaluation: metrics against hand-computed values, both CLI modes, the benchmark command."""
from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
import torch
from torch import nn

from workflow_scripts import data, evaluate, model_io, prepare_data, splits
from workflow_scripts.common import PipelineError

torch.set_num_threads(1)
# The paper's evaluation protocols (Appendix C (3)): (ii) resmall-crop, Table 3's; (i) resize-crop, Table 2's.
RESMALL_CROP = {"resize": "shorter_side", "crop_fraction": 0.875}
RESIZE_CROP = {"resize": "square", "crop_fraction": 0.875}
ARCH = {"patch_size": 4, "hidden_dim": 16, "num_blocks": 1, "tokens_mlp_dim": 8, "channels_mlp_dim": 32,
        "num_classes": 10, "image_size": 16}


def test_metrics_match_hand_computed_values():
    logits = torch.tensor([
        [5.0, 1.0, 0.0, 0.0, 0.0, 0.0],   # label 0: top-1 hit
        [3.0, 2.0, 0.0, 0.0, 0.0, -1.0],  # label 1: second place -> top-5 hit only
        [0.5, 0.4, -9.0, 1.0, 2.0, 3.0],  # label 2: last place -> miss
        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],   # label 5: top-1 hit
    ])
    labels = torch.tensor([0, 1, 2, 5])
    loader = [(logits[:3], labels[:3]), (logits[3:], labels[3:])]  # the "model" passes logits through
    result = evaluate.evaluate_model(nn.Identity(), loader, 6, "cpu")
    assert result["top1"] == 50.0 and result["top5"] == 75.0 and result["top5_note"] is None
    by_hand = [math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(logits.tolist(), labels.tolist())]
    assert result["loss"] == pytest.approx(sum(by_hand) / 4, rel=1e-6)
    assert result["num_images"] == 4 and result["num_classes"] == 6
    assert result["per_class_top1"] == [100.0, 0.0, 0.0, None, None, 100.0]
    confusion = np.zeros((6, 6), dtype=int)
    for true, pred in ((0, 0), (1, 0), (2, 5), (5, 5)):
        confusion[true, pred] += 1
    assert result["confusion"] == confusion.tolist()
    assert result["images_per_s"] > 0


def test_top5_with_fewer_than_five_classes():
    logits = torch.tensor([[0.1, 0.2, 0.3], [3.0, 2.0, 1.0], [0.0, 1.0, 0.5]])
    labels = torch.tensor([0, 2, 2])
    result = evaluate.evaluate_model(nn.Identity(), [(logits, labels)], 3, "cpu")
    assert result["top1"] == 0.0 and result["top5"] == 100.0
    assert "top-3" in result["top5_note"] and "3 classes" in result["top5_note"]
    two = evaluate.evaluate_model(nn.Identity(), [(logits[:, :2], torch.tensor([0, 0, 0]))], 2, "cpu")
    assert two["top1"] == pytest.approx(100 / 3) and two["top5"] == 100.0 and "top-2" in two["top5_note"]


def test_no_confusion_matrix_above_100_classes():
    logits = torch.eye(101)[:7]
    result = evaluate.evaluate_model(nn.Identity(), [(logits, torch.arange(7))], 101, "cpu")
    assert result["confusion"] is None and len(result["per_class_top1"]) == 101 and result["top1"] == 100.0


def test_model_output_width_must_match_the_classes():
    with pytest.raises(PipelineError, match="4 outputs"):
        evaluate.evaluate_model(nn.Identity(), [(torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64))], 6, "cpu")


# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    dataset_record = {"label": "Digits", "source": {"kind": "sklearn_digits", "layout": "arrays"},
            "minival": {"fraction": 0.1}, "test_split": "test", "steps": 1}
    prepare_data.prepare("digits", dataset_record, root / "digits" / "dataset.json")
    return root / "digits" / "dataset.json"


def save_random_model(path, seed, num_classes=10):
    torch.manual_seed(seed)
    arch = dict(ARCH, num_classes=num_classes)
    model = model_io.build_model(arch)
    nn.init.normal_(model.head.weight)  # timm zero-initialises the head: every logit would tie
    model_io.save_model(model, arch, path)
    return path


def reference_top1(model_path, dataset_json, protocol, mean, std) -> float:
    """Top-1 computed directly: protocol transform of the whole test split, one forward, argmax."""
    split = splits.open_split(splits.load_dataset_record(dataset_json), "test")
    images = data.EvalTransform(protocol, ARCH["image_size"], mean, std)(torch.from_numpy(split.images))
    with torch.no_grad():
        pred = model_io.load_model(model_path)(images).argmax(1).numpy()
    return 100.0 * float((pred == split.labels).mean())


@pytest.mark.parametrize("name, protocol, transform", [
    ("resmall_crop", RESMALL_CROP, "resize the shorter side to 18, central 16x16 crop"),
    ("resize_crop", RESIZE_CROP, "resize to 18x18, central 16x16 crop")], ids=["resmall_crop", "resize_crop"])
def test_baseline_mode_evaluates_a_checkpoint_as_it_is(tmp_path, digits, name, protocol, transform):
    model = save_random_model(tmp_path / "m.safetensors", 0)
    out = tmp_path / "baseline.json"
    evaluate.main(["--model", str(model), "--data", str(digits), "--split", "test", "--protocol-name", name,
                   "--protocol", json.dumps(protocol), "--batch-size", "64", "--num-workers", "0", "--threads", "1",
                   "--pixel-mean", "127.5", "--pixel-std", "127.5", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["num_images"] == 360 and result["split"] == "test" and result["dataset"] == "digits"
    assert result["protocol"]["name"] == name and result["protocol"]["resize"] == protocol["resize"]
    assert result["protocol"]["image_size"] == 16 and "no antialias" in result["protocol"]["interpolation"]
    assert result["protocol"]["transform"] == transform  # 16 / 0.875 = 18.3: 18
    assert result["top1"] == pytest.approx(reference_top1(model, digits, protocol, 127.5, 127.5), abs=1e-9)
    assert len(result["confusion"]) == 10 and sum(map(sum, result["confusion"])) == 360


TIMM = {"resize": "timm", "timm_model": "mixer_b16_224.goog_in21k_ft_in1k"}


def test_timm_protocol_evaluates_with_timms_own_transform(tmp_path, digits):
    """The timm protocol: every image through the transform timm builds for the model (built here as timm
    documents it, applied to each image as a PIL image), normalised by it; the record names the transform."""
    import timm
    import timm.data
    from PIL import Image

    arch = dict(ARCH, image_size=224, patch_size=32)  # the timm model's size; a small Mixer otherwise
    torch.manual_seed(3)
    model = model_io.build_model(arch)
    nn.init.normal_(model.head.weight)
    model_io.save_model(model, arch, tmp_path / "m224.safetensors")
    out = tmp_path / "timm.json"
    evaluate.main(["--model", str(tmp_path / "m224.safetensors"), "--data", str(digits), "--protocol-name", "timm",
                   "--protocol", json.dumps(TIMM), "--batch-size", "128", "--threads", "1",
                   "--pixel-mean", "127.5", "--pixel-std", "127.5", "--out", str(out)])
    result = json.loads(out.read_text())
    reference = timm.data.create_transform(**timm.data.resolve_data_config(
        model=timm.create_model(TIMM["timm_model"], pretrained=False)), is_training=False)
    assert result["protocol"]["transform"] == str(reference) and result["protocol"]["timm_model"] == TIMM["timm_model"]
    assert result["protocol"]["timm_data_config"]["interpolation"] == "bicubic"
    assert result["protocol"]["interpolation"].startswith("bicubic")
    split = splits.open_split(splits.load_dataset_record(digits), "test")
    with torch.no_grad():
        images = torch.stack([reference(Image.fromarray(image)) for image in split.images])
        predicted = model_io.load_model(tmp_path / "m224.safetensors")(images).argmax(1).numpy()
    assert result["top1"] == pytest.approx(100.0 * float((predicted == split.labels).mean()), abs=1e-9)
    with pytest.raises(PipelineError, match="makes 224x224 images but the model evaluated takes 16x16"):
        evaluate.main(["--model", str(save_random_model(tmp_path / "m16.safetensors", 0)), "--data", str(digits),
                       "--protocol-name", "timm", "--protocol", json.dumps(TIMM), "--pixel-mean", "127.5",
                       "--pixel-std", "127.5", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_baseline_head_must_match_the_dataset(tmp_path, digits):
    model = save_random_model(tmp_path / "m7.safetensors", 0, num_classes=7)
    with pytest.raises(PipelineError, match="head has 7 classes but dataset 'digits' has 10"):
        evaluate.main(["--model", str(model), "--data", str(digits), "--protocol-name", "official",
                       "--protocol", '{"resize": "direct"}', "--pixel-mean", "127.5", "--pixel-std", "127.5",
                       "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_selection_mode_evaluates_each_seed_of_the_selected_lr_once(tmp_path, digits):
    runs, summaries, models = [], [], []
    for lr, seed in ((0.01, 0), (0.03, 1), (0.01, 1), (0.03, 0)):  # the sweep, in no particular order
        run = tmp_path / f"lr{lr}_s{seed}"
        run.mkdir()
        save_random_model(run / "model.safetensors", int(100 * lr) + seed)
        (run / "summary.json").write_text(json.dumps(
            {"checkpoint": "ck", "dataset": "digits", "lr": lr, "seed": seed, "minival_top1": 50.0,
             "protocol": {"pixel_mean": 127.5, "pixel_std": 127.5}}))
        summaries.append(str(run / "summary.json"))
        models.append(str(run / "model.safetensors"))
        if lr == 0.03:
            runs.append(str(run))
    runs.sort()
    selection = tmp_path / "selection.json"
    selection.write_text(json.dumps({"checkpoint": "ck", "dataset": "digits", "selected_lr": 0.03,
                                     "selected_seeds": [0, 1]}))
    out = tmp_path / "evaluate.json"
    args = ["--selection", str(selection), "--summaries", *summaries, "--models", *models,
            "--data", str(digits), "--protocol-name", "resmall_crop",
            "--protocol", json.dumps(RESMALL_CROP), "--batch-size", "100", "--num-workers", "0", "--threads", "1"]
    evaluate.main(args + ["--out", str(out)])
    result = json.loads(out.read_text())
    assert result["checkpoint"] == "ck" and result["selected_lr"] == 0.03 and result["num_seeds"] == 2
    assert [r["seed"] for r in result["runs"]] == [0, 1]
    top1 = [reference_top1(f"{r}/model.safetensors", digits, RESMALL_CROP, 127.5, 127.5) for r in runs]
    assert [r["top1"] for r in result["runs"]] == pytest.approx(top1, abs=1e-9)
    assert result["top1_mean"] == pytest.approx(statistics.fmean(top1))
    assert result["top1_std"] == pytest.approx(statistics.stdev(top1))
    assert result["protocol"]["name"] == "resmall_crop" and result["protocol"]["pixel_mean"] == 127.5
    with pytest.raises(PipelineError, match="must match"):
        evaluate.main(args + ["--pixel-mean", "0", "--out", str(tmp_path / "bad.json")])


def test_evaluation_bench_compares_with_a_bare_loop():
    from workflow_scripts import bench

    last = bench.evaluation_bench(threads=1, batch_size=16, batches=1, rounds=3)
    assert last["eval_img_s"] > 0 and last["bare_img_s"] > 0
    assert 0.3 < last["ratio"] < 3.0  # median of paired per-round ratios; a per-sample engine would fail


def test_models_mode_evaluates_every_run_given(tmp_path, digits):
    """Without a selection (the final runs on the whole training data, the selection-bias table),
    every model given is evaluated, in (lr, seed) order, and the mean is over them."""
    summaries, models = [], []
    for lr, seed in ((0.03, 1), (0.01, 0)):
        run = tmp_path / f"lr{lr}_s{seed}"
        run.mkdir()
        save_random_model(run / "model.safetensors", 7 + seed)
        (run / "summary.json").write_text(json.dumps(
            {"checkpoint": "ck", "dataset": "digits", "lr": lr, "seed": seed, "train_on": "full",
             "protocol": {"pixel_mean": 127.5, "pixel_std": 127.5}}))
        summaries.append(str(run / "summary.json"))
        models.append(str(run / "model.safetensors"))
    out = tmp_path / "all.json"
    evaluate.main(["--summaries", *summaries, "--models", *models, "--data", str(digits),
                   "--protocol-name", "official", "--protocol", '{"resize": "direct"}', "--batch-size", "100",
                   "--threads", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [(r["lr"], r["seed"], r["trained_on"]) for r in result["runs"]] == [(0.01, 0, "full"), (0.03, 1, "full")]
    assert result["selected_lr"] is None and result["selection"] is None and result["checkpoint"] == "ck"
    assert result["top1_mean"] == pytest.approx(statistics.fmean(r["top1"] for r in result["runs"]))
    with pytest.raises(PipelineError, match="1 summaries and 2 models"):
        evaluate.main(["--summaries", summaries[0], "--models", *models, "--data", str(digits),
                       "--protocol-name", "official", "--protocol", '{"resize": "direct"}', "--out", str(out)])
