"""Table 1's parameter counts from our architectures, and the inference throughput measurement."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from workflow_scripts import convert, model_io, model_stats
from workflow_scripts.common import PipelineError, run_cli

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
TINY = {"patch_size": 4, "hidden_dim": 16, "num_blocks": 1, "tokens_mlp_dim": 8, "channels_mlp_dim": 32,
        "num_classes": 5, "image_size": 16}
# The paper's Table 1: "Mixer-B/16 59M, Mixer-L/16 207M" parameters, head excluded.
TABLE1_MILLIONS = {"Mixer-B/16": 59, "Mixer-L/16": 207}


def test_table1_parameter_counts_of_the_studys_architectures():
    checkpoints = yaml.safe_load((REPO / "config.yaml").read_text())["checkpoints"]
    counted = {}
    for entry in checkpoints.values():
        arch = entry["architecture"]
        if entry["label"] in TABLE1_MILLIONS and arch["image_size"] == 224:  # Table 1 is at 224
            counted.setdefault(entry["label"], set()).add(model_stats.architecture_params_excluding_head(arch))
    assert sorted(counted) == sorted(TABLE1_MILLIONS)
    for label, counts in counted.items():
        assert len(counts) == 1, f"{label}: the head is not excluded ({counts})"  # 21843- and 1000-class heads
        assert round(counts.pop() / 1e6) == TABLE1_MILLIONS[label], label


def test_head_is_excluded_and_module_and_state_dict_agree():
    model = model_io.build_model(TINY)
    total = sum(p.numel() for p in model.parameters())
    head = model.head.weight.numel() + model.head.bias.numel()
    assert model_stats.params_excluding_head(model) == total - head
    assert model_stats.params_excluding_head(model.state_dict()) == total - head
    assert model_stats.architecture_params_excluding_head(TINY) == total - head
    # At K = 2 only the token-mixing MLPs grow: S = 16 tokens and D_S = 8 hidden units, both x K^2, so each
    # weight gains (K^4 - 1) S D_S entries and the biases (K^2 - 1) (S + D_S).
    big = convert.upscaled_architecture(TINY, 32)
    grown = TINY["num_blocks"] * ((2**4 - 1) * 16 * 8 * 2 + (2**2 - 1) * (16 + 8))
    assert model_stats.architecture_params_excluding_head(big) == total - head + grown


class Sleeper(nn.Module):
    """A 'model' whose forward takes a known time, noting whether bf16 autocast was on."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds, self.autocast = seconds, []

    def forward(self, x):
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        time.sleep(self.seconds)
        return x


def test_throughput_counts_images_over_timed_batches_only():
    model = Sleeper(0.02)
    rates = model_stats.throughput_rounds(model, 4, batch_size=8, precision="auto", device=torch.device("cpu"),
                                          warmup=2, rounds=3, iterations=2)
    assert len(rates) == 3 and len(model.autocast) == 2 + 3 * 2
    assert all(100 < r <= 8 / 0.02 for r in rates), rates  # sleep() never returns early
    assert not any(model.autocast)  # auto on CPU: fp32
    bf16 = Sleeper(0.0)
    model_stats.throughput_rounds(bf16, 4, 2, "bf16", torch.device("cpu"), warmup=0, rounds=1, iterations=1)
    assert bf16.autocast == [True]
    with pytest.raises(PipelineError, match="must be >= 1"):
        model_stats.throughput_rounds(model, 4, 0, "auto", torch.device("cpu"))


def test_cli_writes_the_stats_of_a_converted_model(tmp_path, capsys):
    path = tmp_path / "tiny.safetensors"
    model_io.save_model(model_io.build_model(TINY), TINY, path)
    out = tmp_path / "stats" / "tiny.json"
    with pytest.raises(SystemExit) as exit_:  # the CLI in this process: no second import of torch and timm
        run_cli(model_stats.main, [str(path), "--out", str(out), "--name", "tiny_224", "--device", "cpu",
                                   "--batch-size", "4", "--warmup", "1", "--rounds", "2", "--iterations", "2",
                                   "--threads", "1"])
    assert exit_.value.code == 0
    stats = json.loads(out.read_text())
    assert {"model", "image_size", "precision", "device", "img_s", "batch_size", "params_excluding_head"} <= set(stats)
    assert stats["model"] == "tiny_224" and stats["image_size"] == 16 and stats["batch_size"] == 4
    assert stats["precision"] == "fp32" and stats["device"] == "cpu" and stats["threads"] == 1
    assert stats["img_s"] > 0 and len(stats["img_s_rounds"]) == 2
    assert stats["params_excluding_head"] == model_stats.architecture_params_excluding_head(TINY)
    assert "img/s at 16 px" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_cuda_is_a_clear_error():
    with pytest.raises(PipelineError, match="--device cuda: no CUDA device here"):
        model_stats.resolve_device("cuda")
    with pytest.raises(PipelineError, match="not a device name"):
        model_stats.resolve_device("tpu0")
