"""The rehearsal of the real study: config.yaml plus tests/rehearsal/overlay.yaml, on stand-ins in the real
on-disk formats and checkpoints at the real shapes (tests/rehearsal/, README "Rehearsal").

The overlay may change only what a rehearsal must (checked here key by key), the plan must be the study's
own with one LR per dataset, and the run must execute every rule of the study at the real shapes. The run
is the full form by default (every job of the study and the report, as `make rehearsal`), or with
MIXER_REHEARSAL=short the two Mixer-B/16 checkpoints up to the aggregate. It runs in a temporary folder,
removed afterwards (several GiB), or in MIXER_REHEARSAL_DIR, kept (e.g. `rehearsal/` after `make rehearsal`:
Snakemake then finds nothing to do and the tests check what is there).
"""
from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from snakemake.utils import update_config

from tests.rehearsal import harness, standins
from workflow_scripts import matrix, model_io

FORM = os.environ.get("MIXER_REHEARSAL", "full")
# Every leaf the overlay may change (dotted paths, * = any name): the roots, where the sources are, the
# steps, one LR per dataset, the batch sizes and what a CPU-only machine needs.
MAY_CHANGE = [
    "output_root", "data_root", "weights_dir", "weights_lock",
    "checkpoints.*.url",
    "datasets.*.source.path", "datasets.*.source.val_ground_truth", "datasets.*.real_labels.url",
    "datasets.*.allow_subset", "datasets.*.steps", "datasets.*.base_lrs",
    "protocol.batch_size", "protocol.micro_batch_size", "protocol.checkpoint_every", "protocol.eval_every",
    "protocol.num_workers", "evaluation.batch_size",
    "resources.finetune.*", "resources.evaluate.*",
]
# Rules of the workflow that the study's config never plans (the demo's stand-in writers).
NOT_IN_THE_STUDY = {"synthesize_upstream", "synthesize_data"}


def leaves(tree, prefix=""):
    """{dotted path: value} of every leaf (a list is a leaf)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in leaves(sub, f"{prefix}.{key}" if prefix else key).items()}


def merged_config() -> dict:
    """config.yaml with the overlay, merged by Snakemake's own function (as `--configfile a b` does)."""
    config = copy.deepcopy(harness.study_config())
    update_config(config, harness.overlay_config())
    return config


def job_counts(output: str) -> dict[str, int]:
    block = output.split("Job stats:")[1].split("total")[0]
    return {line.split()[0]: int(line.split()[1]) for line in block.splitlines()[3:] if line.strip()}


def dry_run(workdir: Path, configfiles: list[Path]) -> dict[str, int]:
    snakemake = Path(sys.executable).with_name("snakemake")
    res = subprocess.run([str(snakemake), "-s", str(harness.REPO / "Snakefile"), "--configfile",
                          *map(str, configfiles), "-n", "--cores", "2"],
                         cwd=workdir, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return job_counts(res.stdout)


# ---------------------------------------------------------------------------------------------
def test_overlay_changes_only_what_a_rehearsal_may_change():
    study, overlay, config = harness.study_config(), harness.overlay_config(), merged_config()
    before, after = leaves(study), leaves(config)
    assert set(leaves(overlay)) <= set(before), "the overlay adds keys the study does not have"
    changed = sorted(k for k in after if after[k] != before.get(k))
    assert changed, "the overlay changes nothing"
    assert [k for k in changed if not any(fnmatch.fnmatchcase(k, p) for p in MAY_CHANGE)] == []
    for name, ds in config["datasets"].items():
        assert len(ds["base_lrs"]) == 1 and ds["base_lrs"][0] in study["datasets"][name]["base_lrs"], name
        # a subset is flagged wherever the study states the real counts (`expected`, which the overlay keeps)
        assert ds.get("allow_subset", False) is ("expected" in ds), name
    for name, ck in config["checkpoints"].items():
        assert ck["architecture"] == study["checkpoints"][name]["architecture"]  # the real shapes
        assert ck["url"] == f"file:{harness.STANDINS}/checkpoints/{name}.npz"
    assert config["finetune"] == study["finetune"] and config["averages"] == study["averages"]


def test_dry_run_plans_the_studys_jobs_with_one_lr_per_dataset(tmp_path):
    """Snakemake merges the two --configfile files: the plan is the study's, every rule as often, except that
    each sweep has one LR instead of the study's grid."""
    study_counts = dry_run(tmp_path, [harness.STUDY])
    counts = dry_run(tmp_path, [harness.STUDY, harness.OVERLAY])
    config, study = merged_config(), harness.study_config()
    assert counts["finetune"] == len(matrix.finetune_runs(config)) == len(matrix.pairs(study)) == 18
    assert study_counts["finetune"] == len(matrix.finetune_runs(study)) == 72
    assert {r: n for r, n in counts.items() if r != "finetune"} == \
        {r: n for r, n in study_counts.items() if r != "finetune"}
    assert counts["baseline"] == 4 and counts["real"] == 4 and counts["report"] == 1


def test_torchvision_accepts_the_standins_only_with_their_md5_tables(tmp_path):
    """The stand-ins fail torchvision's md5 checks (they are not the real files); the rehearsal's sitecustomize
    is what makes them pass, in a fresh interpreter like a job's, through prepare_data's own CLI."""
    rng = np.random.default_rng(0)
    tables = {"torchvision.datasets.cifar": {"CIFAR10": standins.write_cifar10(tmp_path, rng),
                                             "CIFAR100": standins.write_cifar100(tmp_path, rng)},
              "torchvision.datasets.flowers102": {"Flowers102": standins.write_flowers(tmp_path, rng)}}
    (tmp_path / "torchvision_md5.json").write_text(json.dumps(tables))
    study = harness.study_config()["datasets"]
    env = dict(os.environ, PYTHONPATH=str(harness.REPO))
    patched = dict(env, PYTHONPATH=f"{harness.HERE / 'site'}{os.pathsep}{harness.REPO}",
                   MIXER_REHEARSAL_MD5=str(tmp_path / "torchvision_md5.json"))
    for name in ("cifar10", "cifar100", "flowers"):
        entry = dict(study[name], source={"kind": study[name]["source"]["kind"], "path": str(tmp_path / name)},
                     allow_subset=True)
        command = [sys.executable, "-m", "workflow_scripts.prepare_data", "--name", name,
                   "--dataset-config", json.dumps(entry), "--out", str(tmp_path / "data" / name / "dataset.json")]
        refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "md5" in refused.stderr, (name, refused.stderr)
        accepted = subprocess.run(command, env=patched, capture_output=True, text=True, timeout=120)
        assert accepted.returncode == 0, (name, accepted.stderr)
        record = json.loads((tmp_path / "data" / name / "dataset.json").read_text())
        assert record["num_classes"] == {"cifar10": 10, "cifar100": 100, "flowers": 102}[name]


# ---------------------------------------------------------------------------------------------
# The rehearsal itself
@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    given = os.environ.get("MIXER_REHEARSAL_DIR")
    workdir = Path(given) if given else tmp_path_factory.mktemp("rehearsal")
    short = FORM == "short"
    start = time.monotonic()
    res = harness.run(workdir, short=short, capture_output=True, text=True, timeout=3600)
    elapsed = time.monotonic() - start
    config = merged_config()
    if short:
        update_config(config, harness.SHORT_FORM)
    root = workdir / config["output_root"]
    if res.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted((root / "logs").rglob("*.log")))
        if not given:
            shutil.rmtree(workdir, ignore_errors=True)
        pytest.fail(f"rehearsal failed (exit {res.returncode}):\n{res.stderr[-4000:]}\n{logs[-20000:]}")
    print(f"rehearsal ({FORM} form) wall time: {elapsed:.0f} s")
    yield workdir, root, config, short
    if not given:
        shutil.rmtree(workdir, ignore_errors=True)  # several GiB of checkpoints


@pytest.mark.slow
def test_rehearsal_runs_every_rule_of_the_study(rehearsal, tmp_path):
    workdir, root, config, short = rehearsal
    study_rules = set(dry_run(tmp_path, [harness.STUDY])) - {"all"}
    assert NOT_IN_THE_STUDY.isdisjoint(study_rules)
    ran = {p.name for p in (root / "logs").iterdir() if any(p.rglob("*.log"))}
    # the short form stops at the aggregate: the report and the preflight's summary are not upstream of it
    expected = study_rules - ({"notebook", "report", "preflight"} if short else set())
    assert expected <= ran, sorted(expected - ran)
    assert not ran & NOT_IN_THE_STUDY  # the stand-ins come from the fixture, not from the demo's rules


@pytest.mark.slow
def test_checkpoints_are_converted_and_fine_tuned_at_the_real_shapes(rehearsal):
    _, root, config, _ = rehearsal
    for ckpt in matrix.used_checkpoints(config):
        parity = json.loads((root / "converted" / f"{ckpt}.parity.json").read_text())
        assert parity["architecture"] == config["checkpoints"][ckpt]["architecture"]
        assert parity["max_abs_logit_diff"] <= parity["tolerance"]
    classes = {"imagenet": 1000, "cifar10": 10, "cifar100": 100, "pets": 37, "flowers": 102}
    for ckpt, dataset, lr, seed in matrix.finetune_runs(config):
        model = root / "finetune" / ckpt / dataset / f"lr{lr}_s{seed}" / "model.safetensors"
        arch = model_io.read_architecture(model)
        assert arch == dict(config["checkpoints"][ckpt]["architecture"], num_classes=classes[dataset])
        with safe_open(str(model), framework="np") as f:  # the zero-initialised head took an update
            assert np.abs(f.get_tensor("head.weight")).max() > 0, (ckpt, dataset)


@pytest.mark.slow
def test_datasets_are_prepared_with_their_real_classes_and_flagged_as_subsets(rehearsal):
    _, root, config, _ = rehearsal
    classes = {"imagenet": 1000, "cifar10": 10, "cifar100": 100, "pets": 37, "flowers": 102}
    for name in matrix.used_datasets(config):
        record = json.loads((root / "data" / name / "dataset.json").read_text())
        assert record["num_classes"] == classes[name]
        assert record["subset"] is ("expected" in config["datasets"][name]), name


@pytest.mark.slow
def test_released_imagenet_heads_are_evaluated_and_real_is_scored(rehearsal):
    _, root, config, _ = rehearsal
    for ckpt, dataset, protocol in matrix.baseline_runs(config):
        result = json.loads((root / "baseline" / ckpt / dataset / f"{protocol}.json").read_text())
        assert result["num_classes"] == 1000 and result["num_images"] == len(standins.IMAGENET_VAL_LABELS)
    reals = matrix.real_results(config)
    assert {src for _, _, src in reals} == {"finetune", "released"}
    for ckpt, dataset, _ in reals:
        real = json.loads((root / "real" / ckpt / f"{dataset}.json").read_text())
        assert real["num_validation_images"] == len(standins.IMAGENET_REAL)
        assert real["num_excluded_empty"] == sum(not labels for labels in standins.IMAGENET_REAL)


@pytest.mark.slow
def test_report_renders_and_says_imagenet_is_a_subset(rehearsal):
    workdir, root, _, short = rehearsal
    if short:
        summary = json.loads((root / "aggregate" / "summary.json").read_text())
        assert "imagenet" in json.dumps(summary.get("subset_datasets", summary))
        return
    html = (root / "report" / "index.html").read_text()
    assert 'id="subset-warning"' in html and "subset of ImageNet" in html
    assert (root / "report" / "analysis.html").exists()


@pytest.mark.slow
def test_rerun_has_nothing_to_do(rehearsal):
    workdir, _, _, short = rehearsal
    res = harness.run(workdir, short=short, extra=["-n"], capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    # With --until (the short form) Snakemake prints an empty job table instead of "Nothing to be done".
    assert res.returncode == 0 and ("Nothing to be done" in out or re.search(r"^total\s+0$", out, re.M)), out[-3000:]


@pytest.mark.slow
def test_every_table3_cell_the_rehearsal_ran_is_in_the_comparison(rehearsal):
    _, root, config, _ = rehearsal
    rows = aggregate_rows(root / "aggregate" / "comparison.csv")
    for ckpt in matrix.used_checkpoints(config):
        label, pretraining = config["checkpoints"][ckpt]["label"], config["checkpoints"][ckpt]["pretraining"]
        for dataset in ("ImageNet", "ImageNet ReaL", *config["averages"]):
            assert rows[label, pretraining, dataset]["status"] == "run", (ckpt, dataset)


def aggregate_rows(path: Path) -> dict[tuple[str, str, str], dict]:
    import csv

    with open(path, newline="") as f:
        return {(row["model"], row["pretraining"], row["dataset"]): row for row in csv.DictReader(f)}
