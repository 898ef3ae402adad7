"""The preflight (workflow_scripts.preflight): the micro-batch search under a forced memory cap, its messages,
one whole shape check on CPU, the summary with eta's plan, and `micro_batch_size: auto` in fine-tuning.
The demo's own preflight (and that a failing one keeps fine-tuning from starting) is in test_demo.py."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from tests import tiny as tiny_files
from workflow_scripts import eta, finetune, matrix, preflight, references
from workflow_scripts.common import PipelineError
from workflow_scripts.protocol import Protocol

REPO = Path(__file__).resolve().parents[1]
DEMO = references.load_config(REPO / "demo" / "config.yaml")  # as the rules see it
# Small enough to be cheap, large enough that activations (which grow with the micro-batch) dominate its memory.
ARCH = {"patch_size": 4, "hidden_dim": 64, "num_blocks": 2, "tokens_mlp_dim": 32, "channels_mlp_dim": 256,
        "num_classes": 10, "image_size": 32}
PROTOCOL = dict(DEMO["protocol"], batch_size=64, micro_batch_size=32, deterministic=False)
CPU = torch.device("cpu")

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A converted checkpoint of ARCH and a 10-class array dataset of 32 px images (train, test)."""
    return tiny_files.write_random(tmp_path_factory.mktemp("preflight"), ARCH, {"train": 128, "test": 32}, 32,
                                   [str(c) for c in range(10)], minival_fraction=0.1)


def shape_check(tiny: Path, protocol: dict, cap_mib: float | None = None) -> preflight.ShapeCheck:
    return preflight.ShapeCheck("tiny-shape", tiny / "ckpt.safetensors", tiny / "dataset.json",
                                Protocol.from_config(protocol), DEMO["evaluation"]["protocols"]["official"], 32,
                                gpus=0, threads=1, memory_cap_mib=cap_mib, updates=2, loader_images=64)


# ---------------------------------------------------------------------------------------------
# The search itself (memory as a known function of the micro-batch)

@pytest.mark.parametrize("configured, limit, chosen, tried", [
    (32, 100, 32, [32]),                 # fits: nothing else is tried
    (64, 20, 16, [64, 4, 16, 32]),       # binary search below 64 over 32, 16, 8, 4, 2, 1
    ("auto", 20, 16, [8, 32, 16]),       # auto: every valid size, 64 included
    ("auto", 1000, 64, [8, 32, 64]),     # auto on a roomy device: no accumulation at all
    (64, 0.5, None, [64, 4, 1]),         # nothing fits (the smallest size is always tried)
])
def test_search_finds_the_largest_micro_batch_that_fits(configured, limit, chosen, tried):
    protocol = Protocol.from_config(dict(PROTOCOL, micro_batch_size=configured))
    calls = []

    def run_trial(micro):
        calls.append(micro)
        return {"fits": micro <= limit}

    found, trials = preflight.search_micro_batch(protocol, 1, run_trial)
    assert found == chosen and calls == tried and set(trials) == set(tried)


def test_search_respects_the_gpu_count():
    protocol = Protocol.from_config(dict(PROTOCOL, batch_size=48, micro_batch_size="auto"))
    assert protocol.micro_batch_sizes(4) == [12, 6, 4, 3, 2, 1]  # 48 / m micro-batches shared by 4 GPUs
    found, _ = preflight.search_micro_batch(protocol, 4, lambda m: {"fits": m <= 7})
    assert found == 6


# ---------------------------------------------------------------------------------------------
# A real out-of-memory forced by a cap the test sets (CPU: the peak resident memory above the cap's margin)

def test_a_forced_memory_cap_finds_the_micro_batch_that_fits_and_names_the_key(tiny, capsys):
    def trial(micro):
        return preflight.train_trial(tiny / "ckpt.safetensors", Protocol.from_config(PROTOCOL), micro, 1, 10, CPU, 2,
                                     None)

    trial(4)  # the process's one-time allocations (thread pools, first kernels) happen here, not below
    uncapped = trial(32)
    assert uncapped["fits"] and uncapped["peak_memory_mib"] > 0
    cap = 0.75 * uncapped["peak_memory_mib"]  # 32 cannot stay under 90% of it; about half of it can
    with pytest.raises(PipelineError) as failed:
        preflight.memory_and_speed(shape_check(tiny, PROTOCOL, cap), 10, CPU)
    message = str(failed.value)
    assert message.startswith("protocol.micro_batch_size 32 does not fit on ")
    chosen = int(message.split("set protocol.micro_batch_size to ")[1].split()[0])
    assert chosen < 32 and f"{preflight._mib(cap)} MiB cap" in message
    # micro_batch_size: auto takes that value instead of stopping, and records what each trial measured.
    protocol, record = preflight.memory_and_speed(shape_check(tiny, dict(PROTOCOL, micro_batch_size="auto"), cap),
                                                  10, CPU)
    assert protocol.micro_batch_size == record["micro_batch"] == chosen and record["micro_batch_configured"] == "auto"
    trials = {t["micro_batch"]: t for t in record["micro_batch_trials"]}
    assert trials[chosen]["fits"] and trials[chosen]["peak_memory_mib"] <= preflight.FIT_MARGIN * cap
    assert not trials[chosen * 2]["fits"]  # the next valid size up was tried and did not fit
    assert record["train_img_s"] > 0 and "VmHWM" in record["memory_measure"]
    assert "does not fit" in capsys.readouterr().out


def test_nothing_fits_names_the_gpu_keys():
    protocol = Protocol.from_config(dict(PROTOCOL, micro_batch_size=2, batch_size=4))
    trials = {2: {"out_of_memory": True, "error": "CUDA out of memory", "fits": False},
              1: {"out_of_memory": False, "peak_memory_mib": 50.0, "fits": False}}
    with pytest.raises(PipelineError, match=r"not even micro-batches of 1 image\(s\) fit on GPU X \(peak 50 MiB > "
                                            r"90% of the 40 MiB cap\).*resources.gpu_model.*finetune_gpu_overrides"):
        preflight.micro_batch_decision(protocol, 1, None, trials, 40.0, "GPU X")


# ---------------------------------------------------------------------------------------------
# One whole shape, through the CLI, and the summary

def test_a_shape_passes_on_cpu_and_writes_its_figures(tiny, tmp_path):
    out = tmp_path / "preflight" / "tiny-shape.json"
    code = preflight.main(["shape", "--shape", "tiny-shape", "--checkpoint", str(tiny / "ckpt.safetensors"),
                           "--data", str(tiny / "dataset.json"), "--protocol", json.dumps(PROTOCOL),
                           "--eval-protocol", json.dumps({"resize": "direct"}), "--eval-batch-size", "32",
                           "--gpus", "0", "--threads", "1", "--updates", "2", "--loader-images", "64",
                           "--out", str(out)])
    record = json.loads(out.read_text())
    assert code == 0 and record["shape"] == "tiny-shape" and record["device"] == "cpu"
    assert record["precision"] == "fp32" and record["micro_batch"] == 32 and record["ddp"] is None
    assert record["peak_bf16_tflops"] == "unknown peak" and record["mfu"] is None
    for key in ("peak_memory_mib", "train_img_s", "loader_img_s", "eval_img_s"):
        assert record[key] > 0, key
    assert record["eval_top1_agreement"] == 100.0 and record["eval_max_logit_diff"] == 0.0  # fp32 against fp32
    assert record["loader"]["images"] == 64 - 32  # the first micro-batch (start-up) is not timed


def test_broken_numerics_stop_naming_the_precision():
    broken = {"eval_finite": True, "eval_top1_agreement": 40.0, "eval_max_logit_diff": 7.5, "eval_precision": "bf16"}
    with pytest.raises(PipelineError, match="top-1 agreement 40.0%.*set protocol.precision to fp32"):
        preflight.check_numerics(broken, "auto")
    preflight.check_numerics(dict(broken, eval_top1_agreement=99.0), "auto")


def test_a_slow_loader_is_named_with_the_keys_that_help():
    loader = {"dataset": "imagenet", "cpus": 4, "num_workers": 3}
    warning = preflight.loader_warning(500.0, 1500.0, loader)
    assert "3.0x slower" in warning and "resources.finetune.cpus" in warning
    assert "protocol.num_workers" in warning and "protocol.decode_device: cuda" in warning
    assert preflight.loader_warning(2000.0, 1500.0, loader) is None


def test_summary_prices_the_demo_plan_with_eta(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for ds in DEMO["finetune"]["datasets"]:  # what prepare_data would have written (eta reads the image counts)
        path = Path(DEMO["data_root"]) / ds / "dataset.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"splits": {"train": 1000, "val": 200, "test": 300}, "train_split": "train"}))
    records = [{"shape": shape, "device": "cpu", "precision": "fp32", "micro_batch": 32, "peak_memory_mib": 80.0,
                "train_img_s": 640.0, "mfu": None, "loader_img_s": 900.0, "eval_img_s": 1280.0,
                "eval_top1_agreement": 100.0, "warnings": []} for shape in matrix.job_shapes(DEMO)]
    summary = preflight.summarize(DEMO, records, 2)
    plan = eta.estimate(DEMO, {r["shape"]: {"train_img_s": 640.0, "eval_img_s": 1280.0} for r in records}, 2)
    assert summary["device_hours"] == pytest.approx(plan["device_hours"]) and summary["device_hours"] > 0
    assert summary["gpus"] == 2 and 0 < summary["eta_hours"] <= summary["device_hours"]
    assert [s["shape"] for s in summary["shapes"]] == [r["shape"] for r in records]
    table = preflight.summary_table(summary)
    assert records[-1]["shape"] in table and "640" in table and "100.0%" in table
    assert table.splitlines()[-1].startswith(f"plan: {summary['device_hours']:.3g} device-hours; on 2 device(s)")


def test_the_eta_is_scheduled_on_the_widest_job_where_fewer_devices_are_seen(monkeypatch):
    """A summary step on a SLURM CPU node, or a node with fewer GPUs than a DDP override holds: the ETA is
    scheduled on the widest job's devices, with a note naming the override and --resources gpu=N; devices given
    on the command line are taken as they are (eta.schedule refuses too few)."""
    monkeypatch.setattr(preflight, "seen_gpus", lambda: 1)
    assert preflight.devices_to_schedule(DEMO, None) == (1, None)
    ddp = copy.deepcopy(DEMO)
    ddp["resources"]["finetune_gpu_overrides"] = {DEMO["finetune"]["checkpoints"][0]: 2}
    gpus, note = preflight.devices_to_schedule(ddp, None)
    assert gpus == 2 and "sees 1 device(s) but the widest job holds 2" in note and "--resources gpu=N" in note
    assert preflight.devices_to_schedule(ddp, 4) == (4, None)


# ---------------------------------------------------------------------------------------------
# micro_batch_size: auto in fine-tuning

def test_auto_micro_batch_takes_the_preflights_choice(tmp_path):
    record = tmp_path / "shape.json"
    record.write_text(json.dumps({"micro_batch": 16}))
    auto = Protocol.from_config(dict(PROTOCOL, micro_batch_size="auto"))
    protocol, source = finetune.resolve_micro_batch(auto, record, 1)
    assert protocol.micro_batch_size == 16 and source == f"auto: the preflight {record} chose 16"
    # a variant's other batch: the largest valid size up to the preflight's
    variant = Protocol.from_config(dict(PROTOCOL, micro_batch_size="auto", batch_size=24))
    assert finetune.resolve_micro_batch(variant, record, 1)[0].micro_batch_size == 12
    explicit = Protocol.from_config(PROTOCOL)
    assert finetune.resolve_micro_batch(explicit, record, 1) == (explicit, "protocol.micro_batch_size")
    with pytest.raises(PipelineError, match="protocol.micro_batch_size is auto: pass --preflight"):
        finetune.resolve_micro_batch(auto, None, 1)
    with pytest.raises(PipelineError, match="protocol.micro_batch_size is auto"):
        auto.micro_batches_per_process(1)
