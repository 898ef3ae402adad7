"""workflow_scripts.matching: each reference figure is compared with the run made its way, and only that one.

The records are built by hand in the shapes aggregate.this_run and aggregate.read_sweeps give them, with
numbers chosen so that a figure matched with the wrong run gets another value (and another verdict).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from workflow_scripts import matching, matrix, references
from workflow_scripts.common import PipelineError
from workflow_scripts.stats import top1_interval

N = 10_000
REPO = Path(__file__).resolve().parents[1]


def protocol_fig(per_seed, top5=None):
    interval = top1_interval(per_seed, N)
    return {
        "top1_mean": interval.value,
        "ci_low": interval.low,
        "ci_high": interval.high,
        "ci_method": interval.method,
        "per_seed": per_seed,
        "top1_std": None,
        "top5_mean": top5,
        "top5_per_seed": [top5] if top5 is not None else [],
    }


def record(ck, ds, result_from, protocols, kind="dataset", seeds=(0, 1, 2)):
    return {
        "checkpoint": ck,
        "dataset_name": ds,
        "kind": kind,
        "status": "run",
        "result_from": result_from,
        "eval_protocol": "resmall_crop",
        "coverage": None,
        "seeds": list(seeds),
        "selected_lr": 0.03,
        "num_images": N,
        "protocols": protocols,
        **protocols["resmall_crop"],
    }


@pytest.fixture()
def study():
    refs = {
        "sources": {
            "paper": {
                "citation": "paper",
                "protocol_note": "t3",
                "made_by": {"result": "final", "protocol": "resmall_crop"},
            },
            "code": {
                "citation": "code",
                "protocol_note": "readme",
                "made_by": {"result": "sweep_run", "base_lr": 0.03, "protocol": "official"},
            },
            "timm": {
                "citation": "timm",
                "protocol_note": "timm",
                "made_by": {"result": "released", "protocol": "timm"},
            },
            "user": {"citation": "user", "protocol_note": "?", "made_by": {"result": "released", "protocol": None}},
            "old": {"citation": "old", "protocol_note": "own", "made_by": {"result": "as_reported", "protocol": None}},
        },
        "figures": [
            {
                "source": "paper",
                "label": "B",
                "pretraining": "1k",
                "image_size": 224,
                "dataset": "ImageNet",
                "metric": "top1",
                "value": 76.0,
            },
            {
                "source": "code",
                "label": "B",
                "pretraining": "1k",
                "image_size": 224,
                "dataset": "CIFAR-10",
                "metric": "top1",
                "value": 96.7,
            },
            {
                "source": "timm",
                "label": "B",
                "pretraining": "1k",
                "image_size": 224,
                "dataset": "ImageNet",
                "metric": "top1",
                "value": 76.6,
            },
            {
                "source": "timm",
                "label": "B",
                "pretraining": "1k",
                "image_size": 224,
                "dataset": "ImageNet",
                "metric": "top5",
                "value": 92.2,
            },
            {
                "source": "user",
                "label": "B",
                "pretraining": "1k",
                "image_size": 224,
                "dataset": "ImageNet",
                "metric": "top1",
                "value": 72.6,
            },
            {
                "source": "old",
                "label": "B",
                "pretraining": "1k",
                "image_size": 224,
                "dataset": "ImageNet",
                "metric": "top1",
                "value": 73.6,
            },
            {
                "source": "paper",
                "label": "L",
                "pretraining": "1k",
                "image_size": 224,
                "dataset": "ImageNet",
                "metric": "top1",
                "value": 71.8,
            },
            {
                "source": "paper",
                "label": "B",
                "pretraining": "1k",
                "image_size": 448,
                "dataset": "ImageNet",
                "metric": "top1",
                "value": 80.0,
            },
        ],
        "primary": {"ImageNet": "paper", "CIFAR-10": "code"},
    }
    config = {
        "checkpoints": {
            "b": {
                "label": "B",
                "pretraining": "1k",
                "architecture": {"image_size": 224},
                "head_dataset": "imagenet",
                "timm_model": "mixer_b16_224",
            }
        },
        "datasets": {
            "imagenet": {"label": "ImageNet", "base_lrs": [0.01, 0.03]},
            "cifar10": {"label": "CIFAR-10", "base_lrs": [0.01, 0.03]},
        },
        "finetune": {"checkpoints": ["b"], "datasets": ["imagenet", "cifar10"], "selection_bias_table": True},
        "evaluation": {
            "headline_protocol": "resmall_crop",
            "protocols": {
                "resmall_crop": {"resize": "shorter_side"},
                "official": {"resize": "direct"},
                "timm": {"resize": "timm"},
            },
        },
        "averages": {},
        "references": refs,
    }
    finetuned = record(
        "b",
        "imagenet",
        "finetune",
        {"resmall_crop": protocol_fig([76.1, 76.2, 76.0]), "official": protocol_fig([75.0, 75.1, 74.9])},
    )
    released = record(
        "b",
        "imagenet",
        "released",
        {
            "resmall_crop": protocol_fig([74.0]),
            "official": protocol_fig([73.0]),
            "timm": protocol_fig([76.6], top5=92.3),
        },
        seeds=(),
    )
    cifar = record(
        "b",
        "cifar10",
        "finetune",
        {"resmall_crop": protocol_fig([97.5, 97.6, 97.4]), "official": protocol_fig([97.0, 97.1, 97.2])},
    )
    ours = {
        "results": {
            ("b", "imagenet", "finetune"): finetuned,
            ("b", "imagenet", "released"): released,
            ("b", "cifar10", "finetune"): cifar,
        },
        "reals": {},
        "averages": {},
    }
    sweep_runs = [{"lr": 0.01, "seed": 0, "top1": 90.0}, {"lr": 0.03, "seed": 0, "top1": 96.6}]
    sweeps = {("b", "cifar10", "official"): {"runs": sweep_runs, "num_images": N, "top1_std": None}}
    return config, ours, sweeps


def rows_by(comparison):
    return {(r["source"], r["metric"], r["model"], r["image_size"]): r for r in comparison}


def test_each_reference_is_compared_with_the_run_made_its_way(study):
    rows = rows_by(matching.build_comparison(*study))
    paper = rows["paper", "top1", "B", 224]
    assert (paper["matched_result"], paper["matched_protocol"]) == ("final", "resmall_crop")
    assert paper["per_seed"] == [76.1, 76.2, 76.0] and paper["ours"] == pytest.approx(76.1)
    assert paper["verdict"] == "consistent" and paper["matched_runs"] == "final runs s0, s1, s2 at LR 0.03"
    code = rows["code", "top1", "B", 224]  # the sweep run at LR 0.03 with the official protocol, not the final runs
    assert (code["matched_result"], code["matched_protocol"], code["per_seed"]) == ("sweep_run", "official", [96.6])
    assert code["matched_runs"] == "sweep run at LR 0.03, s0" and code["verdict"] == "consistent"
    timm = rows["timm", "top1", "B", 224]  # the released model with timm's transform, not the fine-tuned one
    assert (timm["matched_result"], timm["ours"], timm["verdict"]) == ("released", 76.6, "consistent")
    top5 = rows["timm", "top5", "B", 224]
    assert top5["ours"] == pytest.approx(92.3) and top5["verdict"] == "consistent"


def test_a_source_whose_protocol_is_unknown_gets_no_verdict(study):
    rows = rows_by(matching.build_comparison(*study))
    for source in ("user", "old"):
        row = rows[source, "top1", "B", 224]
        assert row["verdict"] == matching.NO_MATCH and row["matched_result"] is None
        assert row["ours"] is not None  # shown for orientation
    assert rows["user", "top1", "B", 224]["ours"] == pytest.approx(74.0)  # the released model, headline protocol


def test_figures_of_models_or_resolutions_not_in_the_study_are_not_run(study):
    rows = rows_by(matching.build_comparison(*study))
    assert rows["paper", "top1", "L", 224]["verdict"] == "not run"
    assert rows["paper", "top1", "B", 448]["verdict"] == "not run"  # the image size is part of the row
    counts = matching.verdict_counts(matching.build_comparison(*study))
    assert counts == {"published": 4, "consistent": 2, "below": 0, "above": 0, "not run": 2}


def test_a_missing_sweep_evaluation_is_not_run_and_a_far_figure_is_below(study):
    config, ours, sweeps = study
    rows = rows_by(matching.build_comparison(config, ours, {}))
    assert rows["code", "top1", "B", 224]["verdict"] == "not run"
    config["references"]["figures"][0]["value"] = 80.0
    assert rows_by(matching.build_comparison(config, ours, sweeps))["paper", "top1", "B", 224]["verdict"] == "below"


def test_the_plan_evaluates_the_sweep_with_the_protocols_references_need(study):
    config = study[0]
    assert matrix.sweep_evaluations(config) == [
        ("b", "imagenet", "resmall_crop"),
        ("b", "cifar10", "resmall_crop"),
        ("b", "cifar10", "official"),
    ]
    config["finetune"]["selection_bias_table"] = False
    assert matrix.sweep_evaluations(config) == [("b", "cifar10", "official")]


# ---------------------------------------------------------------------------------------------
# Loading the references (workflow_scripts.references): what the rules and these tests see
def test_demo_config_loads_the_studys_references_and_its_stand_ins():
    config = references.load_config(REPO / "demo" / "config.yaml")
    refs = config["references"]
    assert {"paper_table3", "official_repo", "demo_standin_final"} <= set(refs["sources"])
    assert any(f["source"] == "demo_standin_official" for f in refs["figures"]) and refs["models"]
    assert refs["throughput_baseline"] == {"label": "Mixer-B/16", "image_size": 224}
    assert ("demo_mixer_p4_32", "digits_arrays", "official") in matrix.sweep_evaluations(config)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["sources"]["official_repo"]["made_by"].update(protocol="tta"), "'tta' is not a protocol"),
    (lambda r: r["sources"]["paper_table3"]["made_by"].update(protocol="timm"), "applies to released checkpoints"),
    (lambda r: r["figures"][0].update(source="a_blog_post"), "cites source 'a_blog_post'"),
    (lambda r: r["sources"]["official_repo"]["made_by"].pop("base_lr"), "'base_lr' is a required property"),
])
def test_a_reference_file_that_cannot_be_matched_is_refused(tmp_path, edit, message):
    refs = yaml.safe_load((REPO / "report" / "references.yaml").read_text())
    edit(refs)
    (tmp_path / "refs.yaml").write_text(yaml.safe_dump(refs))
    protocols = yaml.safe_load((REPO / "config.yaml").read_text())["evaluation"]["protocols"]
    with pytest.raises(PipelineError, match=re.escape(message)):
        references.load("refs.yaml", tmp_path, protocols)


def test_a_source_defined_in_two_files_is_refused():
    protocols = yaml.safe_load((REPO / "config.yaml").read_text())["evaluation"]["protocols"]
    with pytest.raises(PipelineError, match=r"defines source\(s\) \['earlier_study'"):
        references.load(["report/references.yaml", "report/references.yaml"], REPO, protocols)
