"""The fine-tuning engine: each piece of the protocol, resume after SIGKILL, DDP on CPU, NaN guard."""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from workflow_scripts import data, finetune, gpu_pool, model_io

REPO = Path(__file__).resolve().parents[1]
TINY_ARCH = {"patch_size": 4, "hidden_dim": 16, "num_blocks": 1, "tokens_mlp_dim": 8,
             "channels_mlp_dim": 32, "num_classes": 7, "image_size": 8}
PROTOCOL = {"batch_size": 16, "micro_batch_size": 4, "warmup_steps": 3, "momentum": 0.9, "weight_decay": 0.0,
            "grad_clip_norm": 1.0, "inception_crop": True, "inception_crop_min_area": 0.05, "random_flip": True,
            "pixel_mean": 127.5, "pixel_std": 127.5, "precision": "auto", "deterministic": True,
            "checkpoint_every": 5, "eval_every": 10, "log_every": 5, "num_workers": 0, "threads": 1}

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny converted checkpoint and a tiny 3-class array dataset whose images encode their index."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model_io.save_model(model_io.build_model(TINY_ARCH), TINY_ARCH, root / "ckpt.safetensors")
    rng = np.random.default_rng(0)
    sizes = {"train": 120, "test": 30}
    for split, n in sizes.items():
        labels = np.arange(n, dtype=np.int64) % 3
        images = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
        for c in range(3):
            images[labels == c, :4, :, c] = 255  # a learnable cue per class
        images[:, 0, 0, 0], images[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256  # the index
        np.savez(root / f"{split}.npz", images=images, labels=labels)
    (root / "dataset.json").write_text(json.dumps({
        "name": "tiny", "label": "Tiny", "layout": "arrays", "root": str(root), "classes": ["a", "b", "c"],
        "num_classes": 3, "splits": sizes, "train_split": "train", "test_split": "test",
        "minival": {"fraction": 0.1, "seed": 0}, "subset": False, "subset_note": None}))
    return root


def run_finetune(tiny: Path, out: Path, *, steps: int = 20, lr: float = 0.1, protocol: dict | None = None,
                 ranks: int = 1, wait: bool = True):
    """The CLI as the finetune rule calls it, on the CPU; with ranks > 1 under torchrun, as gpu_pool runs it."""
    cmd = [sys.executable, "-m", "workflow_scripts.finetune", "--checkpoint", str(tiny / "ckpt.safetensors"),
           "--data", str(tiny / "dataset.json"), "--out-dir", str(out / "run"), "--resume-dir",
           str(out / "resume"), "--lr", str(lr), "--seed", "0", "--steps", str(steps),
           "--protocol", json.dumps(protocol or PROTOCOL), "--threads", "1"]
    if ranks > 1:
        cmd = gpu_pool.torchrun_command(cmd, ranks)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    log = proc.communicate(timeout=300)[0]
    return proc.returncode, log


# ---------------------------------------------------------------------------------------------
# Pure pieces of the protocol

def test_schedule_warms_up_linearly_then_cosine_decays_to_zero():
    base, total, warmup = 0.03, 1000, 100
    assert finetune.lr_at(0, base, total, warmup) == 0.0
    assert finetune.lr_at(50, base, total, warmup) == pytest.approx(base / 2)
    assert finetune.lr_at(warmup, base, total, warmup) == pytest.approx(base)
    assert finetune.lr_at(550, base, total, warmup) == pytest.approx(base / 2)  # half-way through the cosine
    assert finetune.lr_at(325, base, total, warmup) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi / 4)))
    assert finetune.lr_at(total, base, total, warmup) == pytest.approx(0.0, abs=1e-12)
    assert finetune.lr_at(10, base, total, 0) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 0.01)))


def tiny_model(num_classes: int = 7) -> torch.nn.Module:
    torch.manual_seed(1)
    model = model_io.build_model(dict(TINY_ARCH, num_classes=num_classes)).train()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # timm zero-initialises it: give the body gradients
    return model


def one_update(model, images, labels, micro, lr=0.5, momentum=0.9, clip=1.0):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=momentum)
    batches = iter(zip(images.split(micro), labels.split(micro)))
    return finetune.train_step(model, optimizer, batches, len(images) // micro, lr, clip,
                               1.0 / len(images), finetune.autocast_context("fp32", torch.device("cpu")))


def test_accumulating_4x128_equals_one_batch_of_512():
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn(512, 3, 8, 8, generator=gen), torch.randint(0, 7, (512,), generator=gen)
    whole, accumulated = tiny_model(), tiny_model()
    before = copy.deepcopy(whole.state_dict())
    loss_whole, norm_whole = one_update(whole, images, labels, micro=512, clip=1e9)
    loss_acc, norm_acc = one_update(accumulated, images, labels, micro=128, clip=1e9)
    torch.testing.assert_close(loss_acc, loss_whole, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(norm_acc, norm_whole, rtol=1e-5, atol=1e-6)
    changed = 0
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(accumulated.state_dict()[name], value, rtol=1e-5, atol=1e-6)
        changed += not torch.equal(value, before[name])
    assert changed == len(before)  # every tensor moved: the comparison is not vacuous
    # The accumulated gradient is the mean over the batch: the mean cross-entropy's gradient.
    reference = tiny_model()
    torch.nn.functional.cross_entropy(reference(images), labels).backward()
    expected_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()]))
    torch.testing.assert_close(norm_whole, expected_norm, rtol=1e-5, atol=1e-6)


def test_clipping_scales_the_accumulated_gradient_to_the_global_norm():
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn(64, 3, 8, 8, generator=gen) * 50, torch.randint(0, 7, (64,), generator=gen)
    for clip in (1e-3, 1e9):
        model = tiny_model()
        before = [p.detach().clone() for p in model.parameters()]
        # lr 1, no momentum: the update is exactly the (clipped) gradient.
        _, norm = one_update(model, images, labels, micro=16, lr=1.0, momentum=0.0, clip=clip)
        step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
        assert norm > 1e-3  # the raw norm is returned, before clipping
        expected = min(clip, norm.item())
        assert step.norm().item() == pytest.approx(expected, rel=1e-4)


def test_zero_head_replaces_the_classifier_with_zeros():
    model = tiny_model(num_classes=7)
    body = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    finetune.zero_head(model, 3)
    assert model.head.out_features == 3 and model.num_classes == 3
    assert not model.head.weight.any() and not model.head.bias.any()
    assert not model(torch.randn(2, 3, 8, 8)).any()
    for k, v in body.items():
        assert torch.equal(model.state_dict()[k], v)


def test_step_plan_is_a_pure_function_of_seed_and_step():
    n, batch = 50, 16
    plan = finetune.step_plan(3, 7, n, batch, 4)
    assert len(plan) == 4 and all(len(i) == len(s) == 4 for i, s in plan)
    again = finetune.step_plan(3, 7, n, batch, 4)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(plan, again))
    # The micro-batch size only splits the same samples and seeds.
    whole = finetune.step_plan(3, 7, n, batch, 16)[0]
    assert np.array_equal(np.concatenate([i for i, _ in plan]), whole[0])
    assert np.array_equal(np.concatenate([s for _, s in plan]), whole[1])
    # Consecutive steps walk through epochs: each epoch visits every training sample exactly once.
    stream = np.concatenate([finetune.step_plan(3, s, n, 10, 10)[0][0] for s in range(1, 11)])
    for epoch in stream.reshape(2, n):
        assert sorted(epoch) == list(range(n))
    assert not np.array_equal(stream[:n], stream[n:])
    assert not np.array_equal(finetune.step_plan(4, 7, n, batch, 16)[0][0], whole[0])


def test_minival_is_disjoint_from_training_and_deterministic(tiny):
    dataset_record = data.load_dataset_record(tiny / "dataset.json")

    def ids(split):
        return set((split.images[:, 0, 0, 0].astype(int) + 256 * split.images[:, 0, 0, 1].astype(int)).tolist())

    train, minival = data.open_split(dataset_record, "train"), data.open_split(dataset_record, "minival")
    assert len(minival) == 12 and len(train) == 108
    assert ids(train).isdisjoint(ids(minival)) and ids(train) | ids(minival) == set(range(120))
    assert ids(data.open_split(dataset_record, "minival")) == ids(minival)
    # The engine indexes the training split only (never minival).
    seen = np.concatenate([i for s in range(1, 30) for i, _ in finetune.step_plan(0, s, len(train), 16, 4)])
    assert seen.min() >= 0 and seen.max() < len(train)


# ---------------------------------------------------------------------------------------------
# Whole runs through the CLI

def test_run_writes_model_metrics_and_summary(tiny, tmp_path):
    code, log = run_finetune(tiny, tmp_path, steps=20)
    assert code == 0, log
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["batch_size"] == 16 and summary["micro_batch_size"] == 4
    assert summary["world_size"] == 1 and summary["device"] == "cpu" and summary["precision"] == "fp32"
    assert summary["resumed_from_step"] is None and summary["protocol"] == PROTOCOL
    assert 0 <= summary["minival_top1"] <= 100 and summary["minival_top1"] <= summary["minival_top5"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in lines if "loss" in m]
    eval_lines = [m for m in lines if "minival_top1" in m]
    assert [m["step"] for m in train_lines] == [5, 10, 15, 20]
    assert [m["step"] for m in eval_lines] == [10, 20]
    assert eval_lines[-1]["minival_top1"] == summary["minival_top1"]
    assert train_lines[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert all(m["loss"] > 0 and m["grad_norm"] > 0 and m["img_s"] > 0 for m in train_lines)
    assert model_io.read_architecture(run / "model.safetensors") == dict(TINY_ARCH, num_classes=3)
    assert model_io.load_model(run / "model.safetensors", num_classes=3).head.weight.any()
    assert not (tmp_path / "resume" / finetune.STATE_FILE).exists()
    assert "finetune" in log and '"step": 20' in log  # progress bar and metric lines in the job log


def test_sigkill_then_rerun_gives_bitwise_the_same_weights(tiny, tmp_path):
    protocol = dict(PROTOCOL, checkpoint_every=10, log_every=10, eval_every=50)
    steps = 300
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = run_finetune(tiny, killed, steps=steps, protocol=protocol, wait=False)
    state = killed / "resume" / finetune.STATE_FILE
    deadline = time.monotonic() + 120
    while not state.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert not (killed / "run" / "summary.json").exists(), "the run finished before it was killed"
    assert torch.load(state, weights_only=True)["step"] < steps

    code, log = run_finetune(tiny, killed, steps=steps, protocol=protocol)
    assert code == 0, log
    resumed = json.loads((killed / "run" / "summary.json").read_text())["resumed_from_step"]
    assert resumed and resumed % 10 == 0 and f"resuming from step {resumed}" in log
    code, log = run_finetune(tiny, straight, steps=steps, protocol=protocol)
    assert code == 0, log
    a, b = load_file(straight / "run" / "model.safetensors"), load_file(killed / "run" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(run):
        return [(m["step"], m.get("loss"), m.get("minival_top1"))
                for m in map(json.loads, (run / "run" / "metrics.jsonl").read_text().splitlines())]

    assert losses(straight) == losses(killed)


def test_ddp_two_processes_match_one_process(tiny, tmp_path):
    protocol = dict(PROTOCOL, deterministic=False, threads=2)
    code, log = run_finetune(tiny, tmp_path / "one", steps=10, protocol=protocol)
    assert code == 0, log
    code, log = run_finetune(tiny, tmp_path / "two", steps=10, protocol=protocol, ranks=2)
    assert code == 0, log
    summary = json.loads((tmp_path / "two" / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2
    a, b = (load_file(tmp_path / ranks / "run" / "model.safetensors") for ranks in ("one", "two"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(a[k], model_io.load_model(tiny / "ckpt.safetensors").state_dict()[k])
               for k in a if not k.startswith("head."))


def test_nan_loss_stops_with_the_step(tiny, tmp_path):
    # An infinite learning rate: update 1 runs on the zero head (finite loss) and makes the weights
    # non-finite, so the loss of update 2 is NaN.
    code, log = run_finetune(tiny, tmp_path, steps=20, lr=float("inf"))
    assert code == 2, log
    assert "NaN/inf at step 2 " in log
    assert not (tmp_path / "run").exists() and not (tmp_path / "resume" / finetune.STATE_FILE).exists()


def test_bad_protocol_is_one_clear_error(tiny, tmp_path):
    code, log = run_finetune(tiny, tmp_path, protocol=dict(PROTOCOL, micro_batch_size=5))
    assert code == 2 and "protocol.micro_batch_size 5 does not divide" in log


def test_bench_flop_count_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from workflow_scripts import bench

    arch = dict(TINY_ARCH, image_size=16)
    model = model_io.build_model(arch)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 16, 16))
    assert bench.forward_flops(arch) == counter.get_total_flops()
    assert bench.forward_flops(bench.MIXER_B16) / 1e9 == pytest.approx(25.2, abs=0.1)  # README's estimate
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
