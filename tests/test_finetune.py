"""The fine-tuning engine: each piece of the protocol, the whole loop against a plain PyTorch reference,
byte-identical reruns, resume after SIGKILL, DDP on CPU, NaN guard."""
from __future__ import annotations

import copy
import dataclasses
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

from tests import tiny as tiny_files
from workflow_scripts import convert, data, finetune, gpu_pool, model_io, resume_files, splits, synthesize_upstream
from workflow_scripts.common import PipelineError, sha256_file
from workflow_scripts.protocol import Protocol

REPO = Path(__file__).resolve().parents[1]
TINY_ARCH = {"patch_size": 4, "hidden_dim": 16, "num_blocks": 1, "tokens_mlp_dim": 8,
             "channels_mlp_dim": 32, "num_classes": 7, "image_size": 8}
PROTOCOL = {"batch_size": 16, "micro_batch_size": 4, "warmup_steps": 3, "momentum": 0.9, "weight_decay": 0.0,
            "grad_clip_norm": 1.0, "inception_crop": True, "inception_crop_min_area": 0.05, "random_flip": True,
            "pixel_mean": 127.5, "pixel_std": 127.5, "precision": "auto", "deterministic": True,
            "checkpoint_every": 5, "eval_every": 10, "log_every": 5, "num_workers": 0, "threads": 1,
            "ddp_timeout_min": 30, "decode_device": "cpu"}

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny converted checkpoint and a tiny 3-class array dataset whose images encode their index."""
    root = tmp_path_factory.mktemp("tiny")
    tiny_files.write_checkpoint(root, TINY_ARCH)
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in {"train": 120, "test": 30}.items():
        images, labels = tiny_files.random_split(rng, n, 8, 3)
        for c in range(3):
            images[labels == c, :4, :, c] = 255  # a learnable cue per class
        images[:, 0, 0, 0], images[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256  # the index
        splits[split] = images, labels
    tiny_files.write_arrays(root, splits, ["a", "b", "c"], minival_fraction=0.1)
    return root


def run_finetune(tiny: Path, out: Path, *, steps: int = 20, lr: float = 0.1, protocol: dict | None = None,
                 ranks: int = 1, wait: bool = True, checkpoint: Path | None = None, prefix: list[str] = ()):
    """The CLI as the finetune rule calls it, on the CPU; with ranks > 1 under torchrun, as gpu_pool runs it;
    after `prefix` if given (e.g. gpu_pool ... --).

    Writes out/run/{model.safetensors, metrics.jsonl, summary.json}; resume state goes to out/resume.
    """
    run = out / "run"
    cmd = [sys.executable, "-m", "workflow_scripts.finetune",
           "--checkpoint", str(checkpoint or tiny / "ckpt.safetensors"), "--data", str(tiny / "dataset.json"),
           "--model-out", str(run / "model.safetensors"), "--metrics-out", str(run / "metrics.jsonl"),
           "--summary-out", str(run / "summary.json"), "--resume-dir", str(out / "resume"),
           "--lr", str(lr), "--seed", "0", "--steps", str(steps),
           "--protocol", json.dumps(protocol or PROTOCOL), "--threads", "1"]
    if ranks > 1:
        cmd = gpu_pool.torchrun_command(cmd, ranks)
    cmd = [*prefix, *cmd]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    log = proc.communicate(timeout=300)[0]
    return proc.returncode, log


# ---------------------------------------------------------------------------------------------
# Pure pieces of the protocol

def warmup_cosine(s: int, base: float, total: int, warmup: int) -> float:
    """vit_jax/utils.py create_learning_rate_schedule ("cosine") at optax's update count s, written out."""
    return base * min(1, s / warmup) * 0.5 * (1 + math.cos(math.pi * np.clip((s - warmup) / (total - warmup), 0, 1)))


def test_update_k_uses_the_official_schedule_at_k_minus_1():
    # optax counts updates from 0: update k (1-based) runs at lr_fn(k - 1), so update 1 runs at LR 0.
    base, total, warmup = 0.03, 1000, 100
    assert finetune.lr_at(1, base, total, warmup) == 0.0
    # first, inside warmup, end of warmup, middle of the decay, last
    for k in (1, 51, warmup + 1, warmup + (total - warmup) // 2 + 1, total):
        assert finetune.lr_at(k, base, total, warmup) == pytest.approx(warmup_cosine(k - 1, base, total, warmup),
                                                                       rel=1e-12, abs=0), k
    assert finetune.lr_at(51, base, total, warmup) == pytest.approx(base / 2)
    assert finetune.lr_at(warmup + 1, base, total, warmup) == pytest.approx(base)  # first update at the full LR
    assert finetune.lr_at(551, base, total, warmup) == pytest.approx(base / 2)  # half-way through the cosine
    assert 0 < finetune.lr_at(total, base, total, warmup) < 1e-5 * base  # lr_fn(total - 1): not yet 0
    # Without warmup vit_jax applies no warmup factor: update 1 runs at the full LR.
    assert finetune.lr_at(1, base, total, 0) == pytest.approx(base)
    assert finetune.lr_at(11, base, total, 0) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 0.01)))


def test_protocol_is_the_config_block_typed():
    protocol = Protocol.from_config(PROTOCOL)
    assert protocol.as_dict() == PROTOCOL and list(protocol.as_dict()) == list(Protocol.key_names())
    with pytest.raises(PipelineError, match=r"protocol\.threads missing"):
        Protocol.from_config({k: v for k, v in PROTOCOL.items() if k != "threads"})
    with pytest.raises(PipelineError, match=r"protocol\.batch_sise not known"):
        Protocol.from_config(dict(PROTOCOL, batch_sise=16))
    with pytest.raises(dataclasses.FrozenInstanceError):
        protocol.batch_size = 32


def test_fingerprint_leaves_out_only_the_execution_keys():
    execution = {"micro_batch_size": 8, "checkpoint_every": 1, "eval_every": 2, "log_every": 3,
                 "num_workers": 4, "threads": 5, "ddp_timeout_min": 6}
    assert set(Protocol.execution_keys()) == set(execution)
    fingerprint = Protocol.from_config(PROTOCOL).fingerprint()
    assert Protocol.from_config(dict(PROTOCOL, **execution)).fingerprint() == fingerprint
    for key in set(PROTOCOL) - set(execution):
        changed = dict(PROTOCOL, **{key: not PROTOCOL[key] if isinstance(PROTOCOL[key], bool) else "other"})
        assert Protocol.from_config(changed).fingerprint() != fingerprint, key


def test_batch_split_check_names_the_micro_batch_size_and_the_fix():
    protocol = Protocol.from_config(dict(PROTOCOL, batch_size=24, micro_batch_size=8))
    assert protocol.micro_batches_per_process(1) == 3 and protocol.micro_batches_per_process(3) == 1
    with pytest.raises(PipelineError, match=r"protocol\.micro_batch_size 8: the 3 micro-batches .* 2 GPUs.*e\.g\. 6\)"):
        protocol.micro_batches_per_process(2)
    with pytest.raises(PipelineError, match=r"protocol\.micro_batch_size 5 does not divide protocol\.batch_size 24"):
        Protocol.from_config(dict(PROTOCOL, batch_size=24, micro_batch_size=5)).micro_batches_per_process(1)
    with pytest.raises(PipelineError, match=r"none exists"):
        protocol.micro_batches_per_process(5)


def test_protocol_module_does_not_import_torch():
    # Snakemake imports it while parsing the workflow.
    code = "import sys, workflow_scripts.protocol; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


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
    dataset_record = splits.load_dataset_record(tiny / "dataset.json")

    def ids(split):
        return set((split.images[:, 0, 0, 0].astype(int) + 256 * split.images[:, 0, 0, 1].astype(int)).tolist())

    train, minival = splits.open_split(dataset_record, "train"), splits.open_split(dataset_record, "minival")
    assert len(minival) == 12 and len(train) == 108
    assert ids(train).isdisjoint(ids(minival)) and ids(train) | ids(minival) == set(range(120))
    assert ids(splits.open_split(dataset_record, "minival")) == ids(minival)
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
    # The lr of line k is that of update k; the last update runs at lr_fn(19), not 0.
    for m in train_lines:
        assert m["lr"] == pytest.approx(warmup_cosine(m["step"] - 1, 0.1, 20, PROTOCOL["warmup_steps"]), rel=1e-12)
    assert all(m["loss"] > 0 and m["grad_norm"] > 0 for m in train_lines)
    # Wall-clock values live in summary.json (and the job log), never in metrics.jsonl.
    assert all(set(m) == {"step", "loss", "lr", "grad_norm"} for m in train_lines)
    assert [t["step"] for t in summary["timings"]] == [5, 10, 15, 20]
    assert all(t["img_s"] > 0 and t["elapsed_s"] > 0 for t in summary["timings"])
    assert model_io.read_architecture(run / "model.safetensors") == dict(TINY_ARCH, num_classes=3)
    assert model_io.load_model(run / "model.safetensors", num_classes=3).head.weight.any()
    assert resume_files.checkpoint_steps(tmp_path / "resume") == []
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "model.safetensors", "summary.json"]
    assert "finetune" in log and '"step": 20' in log  # progress bar and metric lines in the job log
    assert '"img_s"' in log and '"elapsed_s"' in log


def test_same_computation_gives_the_same_bytes(tiny, tmp_path):
    """The demo's deterministic path twice in fresh folders: synthesize -> convert -> fine-tune."""
    digests = []
    for attempt in ("first", "second"):
        folder = tmp_path / attempt
        synthesize_upstream.synthesize(TINY_ARCH, 1, folder / "upstream.npz")
        convert.convert(folder / "upstream.npz", folder / "converted.safetensors", TINY_ARCH)
        code, log = run_finetune(tiny, folder, steps=10, checkpoint=folder / "converted.safetensors")
        assert code == 0, log
        files = [folder / "converted.safetensors", folder / "run" / "model.safetensors",
                 folder / "run" / "metrics.jsonl"]
        digests.append({f.name: sha256_file(f) for f in files})
    assert digests[0] == digests[1]
    # Not vacuous: the fine-tuned model differs from the converted one (and has another head).
    assert digests[0]["model.safetensors"] != digests[0]["converted.safetensors"]


def reference_weights(tiny: Path, protocol: dict, steps: int, lr: float, seed: int = 0) -> dict:
    """The protocol as a plain PyTorch loop, independent of finetune's loop: the same samples
    (step_plan) and augmentation, the mean cross-entropy over the full batch, clip_grad_norm_,
    momentum SGD at the official schedule (update k at warmup_cosine(k - 1))."""
    dataset_record = splits.load_dataset_record(tiny / "dataset.json")
    train = splits.open_split(dataset_record, "train")
    images, labels = torch.from_numpy(train.images), torch.from_numpy(train.labels)
    augment = data.TrainAugment(TINY_ARCH["image_size"], protocol["inception_crop"],
                                protocol["inception_crop_min_area"], protocol["random_flip"],
                                protocol["pixel_mean"], protocol["pixel_std"])
    model = model_io.load_model(tiny / "ckpt.safetensors")
    model.reset_classifier(3)
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=protocol["momentum"])
    batch = protocol["batch_size"]
    for step in range(1, steps + 1):
        [(indices, aug_seeds)] = finetune.step_plan(seed, step, len(train), batch, batch)
        indices = torch.as_tensor(indices)
        loss = torch.nn.functional.cross_entropy(model(augment(images[indices], aug_seeds)), labels[indices])
        optimizer.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), protocol["grad_clip_norm"])
        assert 0 < norm < protocol["grad_clip_norm"] / 10  # clipping never acts: it cannot hide a scale error
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step - 1, lr, steps, protocol["warmup_steps"])
        optimizer.step()
    return model.state_dict()


def test_whole_loop_matches_a_plain_pytorch_reference(tiny, tmp_path):
    """finetune.train end to end (micro-batch sizes 4 and 8, 1 and 2 DDP processes) against the
    reference: the loop's own loss scale, accumulation, DDP averaging and schedule are all checked."""
    steps, lr = 6, 0.1
    protocol = dict(PROTOCOL, warmup_steps=2, grad_clip_norm=100.0, log_every=1, eval_every=steps,
                    checkpoint_every=steps)
    runs = {"micro4": (4, 1), "micro8": (8, 1), "micro4_ddp2": (4, 2)}
    weights = {}
    for name, (micro, ranks) in runs.items():
        code, log = run_finetune(tiny, tmp_path / name, steps=steps, lr=lr, ranks=ranks,
                                 protocol=dict(protocol, micro_batch_size=micro))
        assert code == 0, log
        metrics = (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()
        assert all(m["grad_norm"] < protocol["grad_clip_norm"] / 10
                   for m in map(json.loads, metrics) if "grad_norm" in m)
        weights[name] = load_file(tmp_path / name / "run" / "model.safetensors")
    reference = reference_weights(tiny, protocol, steps, lr)
    initial = model_io.load_model(tiny / "ckpt.safetensors").state_dict()
    assert weights["micro4"].keys() == reference.keys()
    for key, expected in reference.items():
        for name in runs:
            torch.testing.assert_close(weights[name][key], expected, rtol=1e-5, atol=1e-7,
                                       msg=lambda m, name=name, key=key: f"{name}, {key}: {m}")
    # Not vacuous: the weights moved by far more than the tolerance (the head from zero, the body from
    # the checkpoint; every body tensor moved, typically by 1e-2 here).
    moved = sorted((reference[k] - initial[k]).abs().max().item() for k in reference if not k.startswith("head."))
    assert moved[0] > 0 and moved[len(moved) // 2] > 1e-3
    assert reference["head.weight"].abs().max() > 1e-3


def test_sigkill_then_rerun_gives_bitwise_the_same_weights(tiny, tmp_path):
    protocol = dict(PROTOCOL, checkpoint_every=10, log_every=10, eval_every=50)
    steps = 300
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = run_finetune(tiny, killed, steps=steps, protocol=protocol, wait=False)
    deadline = time.monotonic() + 120
    while not list((killed / "resume").glob("state-*.json")):  # a checkpoint is complete with its sidecar
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert not (killed / "run" / "summary.json").exists(), "the run finished before it was killed"
    assert resume_files.checkpoint_steps(killed / "resume")[0] < steps

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
    # An infinite base learning rate: update 1 (schedule factor 0, inf * 0 = NaN) runs on the zero
    # head with a finite loss and makes the weights NaN, so the loss of update 2 is NaN.
    code, log = run_finetune(tiny, tmp_path, steps=20, lr=float("inf"))
    assert code == finetune.NOT_RETRYABLE_EXIT == 3, log  # a retry meets the same NaN
    assert "NaN/inf at step 2 " in log
    assert not (tmp_path / "run").exists() and resume_files.checkpoint_steps(tmp_path / "resume") == []


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
