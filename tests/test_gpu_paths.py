"""The CUDA-only paths, checked on the CPU (team issue #15): what a GPU run saves and restores, what it
keeps in device memory, how it evaluates, how it fails, and how the benchmark names GPUs. Devices,
device counts, allocation failures and process groups are faked; the code under test is the real one."""
from __future__ import annotations

import datetime
import io
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file

from tests import tiny as tiny_files
from tests.test_finetune import PROTOCOL as FINETUNE_PROTOCOL
from workflow_scripts import bench, evaluate, finetune, model_io
from workflow_scripts.common import run_cli
from workflow_scripts.devices import is_out_of_memory
from workflow_scripts.protocol import Protocol

REPO = Path(__file__).resolve().parents[1]
ARCH = {"patch_size": 4, "hidden_dim": 16, "num_blocks": 1, "tokens_mlp_dim": 8, "channels_mlp_dim": 32,
        "num_classes": 3, "image_size": 8}
# test_finetune's protocol, smaller and without randomness: these tests compare runs, not augmentations.
PROTOCOL = dict(FINETUNE_PROTOCOL, batch_size=8, warmup_steps=1, inception_crop=False, random_flip=False,
                deterministic=False, checkpoint_every=2, eval_every=2, log_every=2)

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    """These tests mean the CPU (the GPU is faked where a test needs one: FakeCuda): on a GPU node torch
    would otherwise save a CUDA generator state and fine-tune and evaluate on the device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny converted checkpoint and a 3-class array dataset (train with a minival fraction, test)."""
    return tiny_files.write_random(tmp_path_factory.mktemp("gpu_paths"), ARCH, {"train": 40, "test": 12}, 8,
                                   ["a", "b", "c"], minival_fraction=0.2)


def finetune_args(tiny: Path, out: Path, protocol: dict | None = None, steps: int = 4) -> list[str]:
    """The finetune CLI's arguments as the finetune rule passes them (without --attempt)."""
    return ["--checkpoint", str(tiny / "ckpt.safetensors"), "--data", str(tiny / "dataset.json"),
            "--model-out", str(out / "run" / "model.safetensors"), "--metrics-out", str(out / "run" / "metrics.jsonl"),
            "--summary-out", str(out / "run" / "summary.json"), "--resume-dir", str(out / "resume"),
            "--lr", "0.1", "--seed", "0", "--steps", str(steps), "--protocol", json.dumps(protocol or PROTOCOL),
            "--threads", "1"]


def exit_code_of(argv: list[str]) -> int:
    """The finetune CLI's exit code, run in this process through run_cli as `python -m` runs it."""
    with pytest.raises(SystemExit) as exited:
        run_cli(finetune.main, argv)
    return exited.value.code


# ---------------------------------------------------------------------------------------------
# 1. RNG state: only the run's own device

class FakeCuda:
    """torch.cuda's generator functions for `visible` fake devices, `current` the one setup_process set.

    The *_all functions are torch's own loops over the devices, so restoring more states than there are
    devices raises IndexError exactly as torch.cuda.set_rng_state_all does (default_generators[i])."""

    def __init__(self, monkeypatch, visible: int, current: int = 0):
        self.visible, self.current = visible, current
        self.states = {i: torch.full((16,), 10 * current + i, dtype=torch.uint8) for i in range(visible)}
        for name in ("is_available", "device_count", "current_device", "get_rng_state", "set_rng_state",
                     "get_rng_state_all", "set_rng_state_all"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.visible

    def current_device(self) -> int:
        return self.current

    def _index(self, device) -> int:
        if isinstance(device, int):
            return device
        device = torch.device(device)
        return self.current if device.index is None else device.index

    def get_rng_state(self, device="cuda") -> torch.Tensor:
        return self.states[self._index(device)].clone()

    def set_rng_state(self, state: torch.Tensor, device="cuda") -> None:
        index = self._index(device)
        if index >= self.visible:
            raise IndexError("tuple index out of range")  # torch.cuda.default_generators[index]
        self.states[index] = state.clone()

    def get_rng_state_all(self) -> list[torch.Tensor]:
        return [self.get_rng_state(i) for i in range(self.visible)]

    def set_rng_state_all(self, states) -> None:
        for i, state in enumerate(states):
            self.set_rng_state(state, i)


def through_a_file(state: dict) -> dict:
    """What resume reads back of a state saved with torch.save (as state.pt)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("saved_on, resumed_on", [(2, 1), (1, 2), (4, 2)])
def test_resume_with_another_number_of_visible_gpus(monkeypatch, saved_on, resumed_on):
    cpu_state = torch.get_rng_state()
    before = FakeCuda(monkeypatch, visible=saved_on, current=saved_on - 1)  # the run used its last device
    saved = through_a_file(finetune.rng_state())
    own_generator = before.states[saved_on - 1]

    after = FakeCuda(monkeypatch, visible=resumed_on)  # resumed through gpu_pool on another device set
    finetune.restore_rng(saved)  # the old code: IndexError on every retry when fewer devices are visible
    assert torch.equal(after.states[0], own_generator)  # the run's generator went to the run's device
    assert all(torch.equal(after.states[i], torch.full((16,), i, dtype=torch.uint8)) for i in range(1, resumed_on))
    assert torch.equal(torch.get_rng_state(), cpu_state)
    # What is saved does not depend on how many devices are visible: one CPU and one device state.
    assert set(saved) == {"torch", "cuda"} and saved["cuda"].shape == own_generator.shape


def test_a_cpu_state_resumes_on_cuda_and_a_cuda_state_on_the_cpu(monkeypatch):
    cpu_saved = through_a_file(finetune.rng_state())  # on the CPU (cpu_only), whatever the machine has
    assert "cuda" not in cpu_saved
    with monkeypatch.context() as patched:
        fake = FakeCuda(patched, visible=1)
        finetune.restore_rng(cpu_saved)  # nothing to restore on the device: its generator is left alone
        assert torch.equal(fake.states[0], torch.zeros(16, dtype=torch.uint8))
        cuda_saved = through_a_file(finetune.rng_state())
    finetune.restore_rng(cuda_saved)  # back on the CPU: the device state is ignored


# ---------------------------------------------------------------------------------------------
# 3. Evaluation runs on one GPU: more is rejected before any job runs

def test_evaluation_on_several_gpus_is_rejected_with_a_message(tmp_path):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["resources"]["evaluate"]["gpu"] = 2
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake = Path(sys.executable).with_name("snakemake")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    res = subprocess.run([str(snakemake), "-s", str(REPO / "Snakefile"), "-n", "--configfile", "config.yaml",
                          "--cores", "1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert ("config key 'resources.evaluate.gpu': must be 0 or 1: evaluation runs on one GPU"
            in res.stdout + res.stderr), res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------
# 4. A resumed run keeps no second copy of the weights

def tensors_in(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_in(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_in(v)]
    return []


def test_resume_frees_the_loaded_state(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = finetune.zero_head(model_io.build_model(ARCH), 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    fingerprint = {"state_version": finetune.STATE_VERSION, "run": "test"}
    cpu = torch.device("cpu")
    finetune.save_resume_state(tmp_path, fingerprint, 5, model, optimizer, finetune.RunState(0, [], [], 0.0, "t0"),
                               finetune.IntervalMeter(cpu, 10, 0), finetune.Process(0, 1, cpu, cpus=1), 0.1)

    loaded, map_locations, torch_load = [], [], torch.load

    def spy_load(*args, **kwargs):
        obj = torch_load(*args, **kwargs)
        map_locations.append(kwargs.get("map_location"))
        loaded.extend(weakref.ref(t) for t in tensors_in(obj))
        return obj

    monkeypatch.setattr(torch, "load", spy_load)
    restored = finetune.zero_head(model_io.build_model(dict(ARCH, num_classes=5)), 3)
    restored_optimizer = torch.optim.SGD(restored.parameters(), lr=0.1, momentum=0.9)
    # The run's device is a GPU: the state must still be read into host memory, not onto the device
    # (the old code loaded it there: on this machine without one, torch.load failed).
    process = finetune.Process(0, 1, torch.device("cuda", 0), cpus=1)
    run = finetune.resume(tmp_path, fingerprint, restored, restored_optimizer, process, "t1")
    assert run.start_step == 5 and [str(m) for m in map_locations] == ["cpu"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values()))
    # Freed by reference counting alone (no gc pass): nothing of the weights survives; what does is the
    # optimizer's adopted momentum and the open logging interval's scalar sums (kept for metrics.jsonl).
    alive = [t for t in (ref() for ref in loaded) if t is not None]
    momentum = {id(buf) for state in restored_optimizer.state.values() for buf in state.values()}
    others = [t for t in alive if id(t) not in momentum]
    assert len(loaded) > len(momentum) > 0 and all(t.numel() == 1 for t in others), [t.shape for t in others]


# ---------------------------------------------------------------------------------------------
# 6. Evaluation: the head runs in fp32, and every evaluation JSON says so

def test_head_logits_are_fp32_under_autocast():
    torch.manual_seed(0)
    model = model_io.build_model(ARCH).eval()
    dtypes = {}
    model.head.register_forward_hook(lambda m, i, out: dtypes.__setitem__("head", out.dtype))
    model.blocks[0].mlp_channels.fc1.register_forward_hook(lambda m, i, out: dtypes.__setitem__("body", out.dtype))
    images = torch.randn(4, 3, 8, 8)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(images).dtype == torch.bfloat16  # the defect: bf16 logits under autocast
        logits = evaluate.fp32_logits(model, images, "bf16")
    assert logits.dtype == torch.float32 and dtypes == {"head": torch.float32, "body": torch.bfloat16}
    with torch.inference_mode():
        features = model.forward_features(images)
        torch.testing.assert_close(logits, model.head(features.mean(1)), atol=0.05, rtol=0.05)

    labels = torch.arange(4) % 3
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an outer autocast does not reach the head either
        result = evaluate.evaluate_model(model, [(images, labels)], 3, "cpu", precision="bf16")
    assert result["precision"] == evaluate.BF16_FP32_HEAD == "bf16 autocast, fp32 head"
    assert dtypes == {"head": torch.float32, "body": torch.bfloat16}
    assert evaluate.evaluate_model(model, [(images, labels)], 3, "cpu")["precision"] == "fp32"  # auto on CPU
    assert dtypes["body"] == torch.float32


def test_every_evaluation_json_records_its_precision(tiny, tmp_path):
    out = tmp_path / "baseline.json"
    with pytest.raises(SystemExit) as exited:
        run_cli(evaluate.main, ["--model", str(tiny / "ckpt.safetensors"), "--data", str(tiny / "dataset.json"),
                                "--protocol-name", "official", "--protocol", '{"resize": "direct"}',
                                "--pixel-mean", "127.5", "--pixel-std", "127.5", "--threads", "1",
                                "--precision", "bf16", "--out", str(out)])
    assert exited.value.code == 0
    assert json.loads(out.read_text())["protocol"]["precision"] == evaluate.BF16_FP32_HEAD


def test_report_shows_the_evaluation_precision():
    import jinja2

    template = (REPO / "report" / "templates" / "report.html.j2").read_text()
    line = next(line for line in template.splitlines() if "Evaluation precision" in line)
    pairs = [{"protocol": {"precision": "fp32"}}, {"protocol": {"precision": "fp32"}}, {"protocol": {}}]
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)  # as report.py renders
    html = environment.from_string(line).render(summary={"pairs": pairs})
    assert "–" in environment.from_string(line).render(summary={"pairs": []})
    assert "fp32, not recorded" in html


# ---------------------------------------------------------------------------------------------
# 7. Every out-of-memory failure gets the micro-batch message; a retry cannot fix it

NCCL_OOM = ("NCCL error in: /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:3356, unhandled cuda error "
            "(run with NCCL_DEBUG=INFO for details), NCCL version 2.27.5\nncclUnhandledCudaError: Call to CUDA "
            "function failed.\nLast error:\nCuda failure 2 'out of memory'")


def test_out_of_memory_is_recognised_in_every_form():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be reported later"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert is_out_of_memory(dist.DistBackendError(NCCL_OOM))
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as e:
            raise RuntimeError("Caught an error in the pin memory thread") from e
    except RuntimeError as wrapped:
        assert is_out_of_memory(wrapped)
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert not is_out_of_memory(ValueError("out of memory"))


def fails_with(error: BaseException):
    def fail(*args, **kwargs):
        raise error
    return fail


@pytest.mark.parametrize("where, error", [
    ("model.to", RuntimeError("CUDA error: out of memory\nCompile with `TORCH_USE_CUDA_DSA`")),
    ("process group", dist.DistBackendError(NCCL_OOM)),
    ("training step", RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")),
    ("minival", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 79.1 GiB total)")),
], ids=["model.to", "nccl", "cublas", "minival"])
def test_every_out_of_memory_failure_names_the_micro_batch(tiny, tmp_path, monkeypatch, capsys, where, error):
    if where == "model.to":
        monkeypatch.setattr(torch.nn.Module, "to", fails_with(error))
    elif where == "process group":
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setattr(dist, "init_process_group", fails_with(error))
    elif where == "training step":
        monkeypatch.setattr(finetune, "train_step", fails_with(error))
    else:
        monkeypatch.setattr(evaluate, "evaluate_model", fails_with(error))
    assert exit_code_of(finetune_args(tiny, tmp_path)) == finetune.NOT_RETRYABLE_EXIT == 3
    message = capsys.readouterr().err
    assert f"out of device memory with micro-batches of 4 images ({str(error).splitlines()[0]}" in message
    # 2 halves the micro-batch and still shares the batch of 8 evenly among 2 ranks (the NCCL case).
    assert "set protocol.micro_batch_size to 2 " in message and "--rerun-triggers mtime input" in message
    assert not (tmp_path / "run").exists()


def test_a_retry_of_an_out_of_memory_failure_stops_at_once(tiny, tmp_path, monkeypatch, capsys):
    args = finetune_args(tiny, tmp_path)
    failure_file = tmp_path / "resume" / finetune.FAILURE_FILE
    allocation_failure = RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    def fail_on_attempt_1() -> str:
        with monkeypatch.context() as patched:
            patched.setattr(finetune, "train_step", fails_with(allocation_failure))
            assert exit_code_of([*args, "--attempt", "1"]) == 3
        assert json.loads(failure_file.read_text())["attempt"] == 1
        return capsys.readouterr().err

    first = fail_on_attempt_1()
    # Snakemake's retry (attempt 2) with the same settings fails at once, without training (which would
    # succeed now: nothing is patched any more).
    with monkeypatch.context() as patched:
        patched.setattr(finetune, "train", fails_with(AssertionError("a retry must not train again")))
        assert exit_code_of([*args, "--attempt", "2"]) == 3
    retry = capsys.readouterr().err
    assert "not run again on attempt 2: attempt 1 failed the same way" in retry
    assert first.split("error: ", 1)[1].strip() in retry

    # A retry with other settings (the smaller micro-batch the message asks for) runs.
    smaller = finetune_args(tiny, tmp_path, dict(PROTOCOL, micro_batch_size=2))
    assert exit_code_of([*smaller, "--attempt", "2"]) == 0
    assert (tmp_path / "run" / "model.safetensors").exists() and not failure_file.exists()
    # So does a new Snakemake run (attempt 1; also without --attempt): the cause may have been fixed.
    fail_on_attempt_1()
    assert exit_code_of(args) == 0 and not failure_file.exists()


def test_smaller_micro_batch_respects_the_gpu_count():
    protocol = Protocol.from_config(dict(PROTOCOL, batch_size=512, micro_batch_size=64))
    assert protocol.smaller_micro_batch(1) == 32 and protocol.smaller_micro_batch(8) == 32
    assert Protocol.from_config(dict(PROTOCOL, batch_size=24, micro_batch_size=6)).smaller_micro_batch(2) == 4
    assert Protocol.from_config(dict(PROTOCOL, batch_size=8, micro_batch_size=1)).smaller_micro_batch(1) is None


# ---------------------------------------------------------------------------------------------
# 8. An explicit process-group timeout

def test_the_configured_timeout_reaches_init_process_group(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    process = finetune.setup_process(Protocol.from_config(dict(PROTOCOL, ddp_timeout_min=45)), seed=0, threads=2)
    assert (process.rank, process.world_size) == (1, 2)
    assert calls == [(("gloo",), {"timeout": datetime.timedelta(minutes=45)})]
    torch.set_num_threads(1)


def test_the_study_waits_well_above_nccls_default():
    protocol = yaml.safe_load((REPO / "config.yaml").read_text())["protocol"]
    assert protocol["ddp_timeout_min"] >= 30 and "ddp_timeout_min" in Protocol.execution_keys()


# ---------------------------------------------------------------------------------------------
# 9. The benchmark's peak table matches exact names

def test_peak_table_matches_exact_device_names():
    peaks = {name: bench.peak_tflops(name) for name in (
        "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA L40S", "NVIDIA L40",
        "NVIDIA L4", "NVIDIA A10", "NVIDIA A100-SXM4-80GB")}
    assert peaks == {"NVIDIA H100 80GB HBM3": 989.5, "NVIDIA H100 PCIe": 756.5, "NVIDIA H100 NVL": 835.5,
                     "NVIDIA H200": 989.5, "NVIDIA L40S": 362.05, "NVIDIA L40": 181.05, "NVIDIA L4": 121.0,
                     "NVIDIA A10": 125.0, "NVIDIA A100-SXM4-80GB": 312.0}
    for unknown in ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", "NVIDIA H100 80GB HBM3 MIG 3g.40gb", "NVIDIA A10G",
                    "NVIDIA L4 (virtual)", "NVIDIA GeForce RTX 4090", "H100", ""):
        assert bench.peak_tflops(unknown) is None, unknown


def test_unknown_peak_gives_no_mfu(capsys):
    result = bench.with_utilisation({"model": bench.MIXER_B16, "engine_img_s": 3000.0, "bare_img_s": 3100.0},
                                    "NVIDIA A100-SXM4-40GB MIG 3g.20gb")
    assert result["peak_bf16_tflops"] == "unknown peak" and result["engine_mfu"] is None
    assert "unknown peak" in capsys.readouterr().out
    known = bench.with_utilisation({"model": bench.MIXER_B16, "engine_img_s": 3000.0, "bare_img_s": 3100.0},
                                   "NVIDIA H100 80GB HBM3")
    assert known["engine_mfu"] == pytest.approx(3000 * 3 * bench.forward_flops(bench.MIXER_B16) / 989.5e12)


# ---------------------------------------------------------------------------------------------
# The end-to-end CPU run still trains and resumes through the changed paths

def test_cpu_run_resumes_and_matches_an_uninterrupted_one(tiny, tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert exit_code_of(finetune_args(tiny, straight, steps=6)) == 0
    real_save = finetune.save_checkpoint

    def save_then_stop(resume_dir, fingerprint, step, *args):
        real_save(resume_dir, fingerprint, step, *args)
        raise KeyboardInterrupt  # stopped right after its first checkpoint (step 2)

    with monkeypatch.context() as patched:
        patched.setattr(finetune, "save_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            run_cli(finetune.main, finetune_args(tiny, resumed, steps=6))
    assert exit_code_of(finetune_args(tiny, resumed, steps=6)) == 0
    assert json.loads((resumed / "run" / "summary.json").read_text())["resumed_from_step"] == 2
    a, b = (load_file(run / "run" / "model.safetensors") for run in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
