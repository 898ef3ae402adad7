"""LR selection: mean minival top-1 over seeds, deterministic ties, never a test metric."""
from __future__ import annotations

import inspect
import json

import pytest

from workflow_scripts import select_lr
from workflow_scripts.common import PipelineError


def write_runs(root, minival: dict[float, dict[int, float]], extra=None):
    paths = []
    for lr, per_seed in minival.items():
        for seed, top1 in per_seed.items():
            run = root / f"lr{lr:g}_s{seed}"
            run.mkdir(parents=True)
            summary = {"checkpoint": "ck", "dataset": "ds", "lr": lr, "seed": seed, "minival_top1": top1,
                       "minival_top5": 99.0, "steps": 10, **((extra or {}).get((lr, seed), {}))}
            (run / "summary.json").write_text(json.dumps(summary))
            paths.append(str(run / "summary.json"))
    return paths


def test_selects_the_best_mean_over_seeds(tmp_path):
    # 0.03 has the best single seed, 0.01 the best mean.
    paths = write_runs(tmp_path, {0.01: {0: 90.0, 1: 92.0}, 0.03: {0: 95.0, 1: 80.0}, 0.06: {0: 70.0, 1: 71.0}})
    out = tmp_path / "sel.json"
    select_lr.main(["--checkpoint", "ck", "--dataset", "ds", "--runs", *paths[::-1], "--out", str(out)])
    sel = json.loads(out.read_text())
    assert sel["selected_lr"] == 0.01
    assert sel["selected_seeds"] == [0, 1]
    assert [c["lr"] for c in sel["candidates"]] == [0.01, 0.03, 0.06]
    assert sel["candidates"][0] == {"lr": 0.01, "seeds": [0, 1], "minival_top1_per_seed": [90.0, 92.0],
                                    "minival_top1_mean": 91.0}
    assert sel["checkpoint"] == "ck" and sel["dataset"] == "ds" and "minival" in sel["criterion"]


def test_ties_go_to_the_smaller_lr_whatever_the_input_order():
    table = {0.06: {0: 80.0}, 0.003: {0: 80.0}, 0.03: {0: 79.0}}
    assert select_lr.choose_lr(table)[0] == 0.003
    assert select_lr.choose_lr(dict(reversed(list(table.items()))))[0] == 0.003


def test_selection_cannot_see_test_metrics(tmp_path):
    """choose_lr takes minival values only; test fields in a summary change nothing."""
    assert list(inspect.signature(select_lr.choose_lr).parameters) == ["minival_top1"]
    minival = {0.01: {0: 90.0}, 0.03: {0: 91.0}}
    clean = select_lr.select("ck", "ds", write_runs(tmp_path / "a", minival))
    bogus = {(0.01, 0): {"test_top1": 100.0, "top1": 100.0, "test": {"top1": 100.0}},
             (0.03, 0): {"test_top1": 0.0, "top1": 0.0}}
    poisoned = select_lr.select("ck", "ds", write_runs(tmp_path / "b", minival, bogus))
    assert poisoned["selected_lr"] == clean["selected_lr"] == 0.03
    assert poisoned["candidates"] == clean["candidates"]
    assert "100.0" not in json.dumps(poisoned["candidates"])


def test_bad_inputs_are_clear_errors(tmp_path):
    paths = write_runs(tmp_path / "a", {0.01: {0: 90.0}}, {(0.01, 0): {"minival_top1": None}})
    with pytest.raises(PipelineError, match="'minival_top1' is missing"):
        select_lr.select("ck", "ds", paths)
    paths = write_runs(tmp_path / "b", {0.01: {0: 90.0}})
    with pytest.raises(PipelineError, match="belongs to ck x ds"):
        select_lr.select("other", "ds", paths)
    with pytest.raises(PipelineError, match="different seeds"):
        select_lr.choose_lr({0.01: {0: 1.0, 1: 2.0}, 0.03: {0: 1.0}})
