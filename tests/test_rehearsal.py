"""The rehearsal of the real study: config.yaml plus tests/rehearsal/overlay.yaml, on stand-ins in the real
on-disk formats and checkpoints at the real shapes (tests/rehearsal/, README "Rehearsal").

The overlay may change only what a rehearsal must (checked here key by key), the plan must be the study's
own with one LR per dataset, and the run must execute every rule of the study at the real shapes. The run
is the full form by default (every job of the study and the report, as `make rehearsal`: the 448 px
Mixer-L/16 and three final seeds included), or with MIXER_REHEARSAL=short the two Mixer-B/16 checkpoints
up to the aggregate with one final seed (harness.SHORT_FORM). It runs in a temporary folder, removed
afterwards (several GiB), or in MIXER_REHEARSAL_DIR, kept (e.g. `rehearsal/` after `make rehearsal`:
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
from workflow_scripts import matrix, model_io, references

FORM = os.environ.get("MIXER_REHEARSAL", "full")
# Every leaf the overlay may change (dotted paths, * = any name): the roots, where the sources are, the
# steps, one LR per dataset, the batch sizes (a checkpoint's own micro-batch too), the throughput timing
# and what a CPU-only machine needs.
MAY_CHANGE = [
    "output_root", "data_root", "weights_dir", "weights_lock",
    "checkpoints.*.url", "checkpoints.*.micro_batch_size", "throughput.*",
    "datasets.*.source.path", "datasets.*.source.val_ground_truth", "datasets.*.real_labels.url",
    "datasets.*.allow_subset", "datasets.*.steps", "datasets.*.base_lrs",
    "protocol.batch_size", "protocol.micro_batch_size", "protocol.checkpoint_every", "protocol.eval_every",
    "protocol.num_workers", "evaluation.batch_size",
    "resources.finetune.*", "resources.evaluate.*",
]
# Rules of the workflow that the study's config never plans (the demo's stand-in writers).
NOT_IN_THE_STUDY = {"synthesize_upstream", "synthesize_data"}
CLASSES = {"imagenet": 1000, "cifar10": 10, "cifar100": 100, "pets": 37, "flowers": 102}
VERDICTS = {"consistent", "below", "above"}


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


def with_references(config: dict) -> dict:
    """The config as the rules see it: `references` loaded (workflow_scripts.matrix and matching read them)."""
    return dict(config, references=references.load(config["references"], harness.REPO,
                                                   config["evaluation"]["protocols"]))


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
    assert set(config["checkpoints"]) == set(study["checkpoints"])
    for name, ck in config["checkpoints"].items():
        assert ck["architecture"] == study["checkpoints"][name]["architecture"]  # the real shapes
        if "base_checkpoint" in study["checkpoints"][name]:
            # built from its base's stand-in by convert --image-size, as in the study: no file of its own
            assert "url" not in ck and ck["base_checkpoint"] == study["checkpoints"][name]["base_checkpoint"]
        else:
            assert ck["url"] == f"file:{harness.STANDINS}/checkpoints/{name}.npz"
        # every micro-batch splits the overlay's batch (the real one per checkpoint would not)
        micro = ck.get("micro_batch_size", config["protocol"]["micro_batch_size"])
        assert config["protocol"]["batch_size"] % micro == 0, name
    assert config["finetune"] == study["finetune"] and config["averages"] == study["averages"]
    assert config["evaluation"]["protocols"] == study["evaluation"]["protocols"]
    assert config["references"] == study["references"]


def test_standins_are_written_for_released_checkpoints_only(tmp_path):
    """An entry with base_checkpoint (Appendix C's 448 px Mixer) has no .npz: convert builds it from its base's."""
    small = {"patch_size": 4, "hidden_dim": 8, "num_blocks": 1, "tokens_mlp_dim": 4, "channels_mlp_dim": 8,
             "num_classes": 3, "image_size": 8}
    sizes = standins.write_checkpoints(tmp_path, {
        "small": {"architecture": small},
        "small_16": {"base_checkpoint": "small", "architecture": dict(small, image_size=16, tokens_mlp_dim=16)}})
    assert list(sizes) == ["small"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["small.npz"]


def test_dry_run_plans_the_studys_jobs_with_one_lr_per_dataset(tmp_path):
    """Snakemake merges the two --configfile files: the plan is the study's, every rule as often, except that
    each sweep has one LR instead of the study's grid."""
    study_counts = dry_run(tmp_path, [harness.STUDY])
    counts = dry_run(tmp_path, [harness.STUDY, harness.OVERLAY])
    config, study = merged_config(), with_references(harness.study_config())
    assert counts["finetune"] == len(matrix.finetune_runs(config)) == len(matrix.pairs(study)) == 25
    assert study_counts["finetune"] == len(matrix.finetune_runs(study)) == 100
    assert {r: n for r, n in counts.items() if r != "finetune"} == \
        {r: n for r, n in study_counts.items() if r != "finetune"}
    # five checkpoints (the 448 px one converted from its base's download), three final runs per pair,
    # the released in1k models with all four protocols (timm's included)
    assert counts["download_weights"] == 4 and counts["convert_weights"] == counts["model_stats"] == 5
    assert counts["final_finetune"] == len(matrix.final_runs(study)) == 25 * 3
    assert counts["evaluate"] == len(matrix.evaluations(study))
    assert counts["evaluate_sweep"] == len(matrix.sweep_evaluations(study))
    assert counts["baseline"] == len(matrix.baseline_runs(study)) == 2 * 4
    assert counts["real"] == len(matrix.real_results(study)) and counts["report"] == 1


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
    # the short form took 38 min under heavy load (README "Rehearsal"); the full form runs for hours on a CPU
    res = harness.run(workdir, short=short, capture_output=True, text=True, timeout=(2 if short else 12) * 3600)
    elapsed = time.monotonic() - start
    config = merged_config()
    if short:
        update_config(config, harness.SHORT_FORM)
    config = with_references(config)
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
    assert {"evaluate_sweep", "model_stats", "final_finetune", "real", "baseline"} <= study_rules
    ran = {p.name for p in (root / "logs").iterdir() if any(p.rglob("*.log"))}
    # the short form stops at the aggregate: the notebook and the report are not upstream of it (the
    # preflight's summary is: the aggregate puts its ETA beside each job's benchmark)
    expected = study_rules - ({"notebook", "report"} if short else set())
    assert expected <= ran, sorted(expected - ran)
    assert not ran & NOT_IN_THE_STUDY  # the stand-ins come from the fixture, not from the demo's rules
    # every final run of every pair, one per final seed, at the selected LR on the whole training data
    for ckpt, dataset, seed in matrix.final_runs(config):
        summary = json.loads((root / "final" / ckpt / dataset / f"s{seed}" / "summary.json").read_text())
        selection = json.loads((root / "selection" / ckpt / f"{dataset}.json").read_text())
        assert (summary["seed"], summary["train_on"]) == (seed, "full"), (ckpt, dataset)
        assert float(summary["lr"]) == float(selection["selected_lr"]), (ckpt, dataset)


@pytest.mark.slow
def test_checkpoints_are_converted_and_fine_tuned_at_the_real_shapes(rehearsal):
    _, root, config, short = rehearsal
    ckpts = config["checkpoints"]
    for ckpt in matrix.used_checkpoints(config):
        parity = json.loads((root / "converted" / f"{ckpt}.parity.json").read_text())
        assert parity["architecture"] == ckpts[ckpt]["architecture"]
        assert parity["max_abs_logit_diff"] <= parity["tolerance"]
        base = ckpts[ckpt].get("base_checkpoint")
        if base is None:
            assert parity["upscale"] is None, ckpt
            continue
        # Appendix C's higher-resolution Mixer, built from the base's (stand-in) download and proven by tiling
        up, base_arch = parity["upscale"], ckpts[base]["architecture"]
        assert up["base_architecture"] == base_arch and up["from_image_size"] == base_arch["image_size"]
        assert up["factor"] == ckpts[ckpt]["architecture"]["image_size"] // base_arch["image_size"]
        assert up["tiling_max_abs_logit_diff"] <= up["tiling_tolerance"]
    if not short:  # the full form runs Table 3's 448 px row at its real shape
        arch = ckpts["mixer_l16_in21k_448"]["architecture"]
        assert "mixer_l16_in21k_448" in matrix.used_checkpoints(config)
        assert ((arch["image_size"] // arch["patch_size"]) ** 2, arch["tokens_mlp_dim"]) == (784, 2048)
    models = [root / "finetune" / ck / ds / f"lr{lr}_s{seed}" for ck, ds, lr, seed in matrix.finetune_runs(config)]
    models += [root / "final" / ck / ds / f"s{seed}" for ck, ds, seed in matrix.final_runs(config)]
    for folder in models:
        ckpt, dataset = folder.parts[-3], folder.parts[-2]
        arch = model_io.read_architecture(folder / "model.safetensors")
        assert arch == dict(ckpts[ckpt]["architecture"], num_classes=CLASSES[dataset]), folder
        with safe_open(str(folder / "model.safetensors"), framework="np") as f:  # the zero-initialised head moved
            assert np.abs(f.get_tensor("head.weight")).max() > 0, folder


@pytest.mark.slow
def test_datasets_are_prepared_with_their_real_classes_and_flagged_as_subsets(rehearsal):
    _, root, config, _ = rehearsal
    for name in matrix.used_datasets(config):
        record = json.loads((root / "data" / name / "dataset.json").read_text())
        assert record["num_classes"] == CLASSES[name]
        assert record["subset"] is ("expected" in config["datasets"][name]), name


@pytest.mark.slow
def test_every_evaluation_runs_at_the_models_resolution(rehearsal):
    """The final models with every protocol (every seed), the sweep runs on test, the model stats."""
    _, root, config, _ = rehearsal
    seeds = matrix.final_seeds(config)
    for folder, (ckpt, dataset, protocol) in [("evaluate", e) for e in matrix.evaluations(config)] + \
            [("sweep_on_test", e) for e in matrix.sweep_evaluations(config)]:
        result = json.loads((root / folder / ckpt / dataset / f"{protocol}.json").read_text())
        size = config["checkpoints"][ckpt]["architecture"]["image_size"]
        assert result["protocol"]["name"] == protocol and result["protocol"]["image_size"] == size
        if protocol == "resmall_crop":  # the paper's 256 -> 224, scaled at 448 (shorter side 512)
            assert result["protocol"]["transform"] == \
                f"resize the shorter side to {size * 8 // 7}, central {size}x{size} crop"
        expected = seeds if folder == "evaluate" else config["finetune"]["seeds"]
        assert [r["seed"] for r in result["runs"]] == expected, (folder, ckpt, dataset, protocol)
    for ckpt in matrix.used_checkpoints(config):
        stats = json.loads((root / "model_stats" / f"{ckpt}.json").read_text())
        parity = json.loads((root / "converted" / f"{ckpt}.parity.json").read_text())
        assert stats["architecture"] == config["checkpoints"][ckpt]["architecture"]
        assert stats["params_excluding_head"] == parity["num_params_excluding_head"] and stats["img_s"] > 0


@pytest.mark.slow
def test_released_imagenet_heads_are_evaluated_with_every_protocol_and_real_is_scored(rehearsal):
    _, root, config, _ = rehearsal
    protocols = {}
    for ckpt, dataset, protocol in matrix.baseline_runs(config):
        result = json.loads((root / "baseline" / ckpt / dataset / f"{protocol}.json").read_text())
        assert result["num_classes"] == 1000 and result["num_images"] == len(standins.IMAGENET_VAL_LABELS)
        protocols.setdefault(ckpt, []).append(protocol)
        if protocol == "timm":  # timm's own transform for the released model, at its real 224 px
            assert result["protocol"]["timm_data_config"]["input_size"] == [3, 224, 224]
    # the in1k stand-ins name their timm model: every protocol of the study applies to them
    in1k = [ck for ck in matrix.used_checkpoints(config) if config["checkpoints"][ck].get("timm_model")]
    assert in1k and all(protocols[ck] == list(config["evaluation"]["protocols"]) for ck in in1k)
    reals = matrix.real_results(config)
    assert {src for _, _, src, _ in reals} == {"finetune", "released"}
    for ckpt, dataset, source, protocol in reals:
        real = json.loads((root / "real" / source / ckpt / dataset / f"{protocol}.json").read_text())
        assert real["protocol"] == protocol
        assert real["num_validation_images"] == len(standins.IMAGENET_REAL)
        assert real["num_excluded_empty"] == sum(not labels for labels in standins.IMAGENET_REAL)


@pytest.mark.slow
def test_report_renders_and_says_imagenet_is_a_subset(rehearsal):
    workdir, root, config, short = rehearsal
    summary = json.loads((root / "aggregate" / "summary.json").read_text())
    subsets = [name for name in matrix.used_datasets(config) if "expected" in config["datasets"][name]]
    assert sorted(d["name"] for d in summary["subset_datasets"]) == sorted(subsets) and "imagenet" in subsets
    if short:
        return
    html = (root / "report" / "index.html").read_text()
    for name in subsets:
        assert f"{config['datasets'][name]['label']} ({name}) was run on a subset" in html, name
    assert 'id="subset-warning"' in html and (root / "report" / "analysis.html").exists()


@pytest.mark.slow
def test_rerun_has_nothing_to_do(rehearsal):
    workdir, _, _, short = rehearsal
    res = harness.run(workdir, short=short, extra=["-n"], capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    # With --until (the short form) Snakemake prints an empty job table instead of "Nothing to be done".
    assert res.returncode == 0 and ("Nothing to be done" in out or re.search(r"^total\s+0$", out, re.M)), out[-3000:]


@pytest.mark.slow
def test_every_table3_cell_the_rehearsal_ran_is_in_the_comparison(rehearsal):
    """Every reference figure of a model the rehearsal ran is matched with the run made its way and gets a
    verdict (Table 3's and Table 2's with the final runs' mean, the official code's with the sweep run at
    its LR, timm's with the released model); a source with no protocol of ours gets none."""
    _, root, config, short = rehearsal
    summary = json.loads((root / "aggregate" / "summary.json").read_text())
    sources = config["references"]["sources"]
    ran = {(c["label"], c["pretraining"], c["architecture"]["image_size"]): ck
           for ck, c in ((ck, config["checkpoints"][ck]) for ck in matrix.used_checkpoints(config))}
    rows = summary["comparison"]
    assert len(rows) == len(config["references"]["figures"])
    matched = set()
    for row in rows:
        made_by = sources[row["source"]]["made_by"]
        ckpt = ran.get((row["model"], row["pretraining"], row["image_size"]))
        what = (row["source"], row["model"], row["pretraining"], row["image_size"], row["column"], row["metric"])
        if ckpt is None:
            assert row["verdict"] == "not run", what
        elif made_by["result"] == "as_reported" or made_by["protocol"] is None:
            assert row["verdict"] == "no protocol match", what
        else:
            assert row["verdict"] in VERDICTS and row["checkpoint"] == ckpt, what
            assert (row["matched_result"], row["matched_protocol"]) == (made_by["result"], made_by["protocol"]), what
            if made_by["result"] == "final":
                assert len(row["per_seed"]) == len(matrix.final_seeds(config)), what
                matched.add((ckpt, row["column"]))
    # Table 3's headline cells of every fine-tuned checkpoint (ImNet, ReaL, Avg5), each among them
    for ckpt in matrix.used_checkpoints(config):
        assert {(ckpt, column) for column in ("ImageNet", "ImageNet ReaL", "Avg5")} <= matched, ckpt
    results = {(r["checkpoint"], r["column"], r["result_from"]): r for r in summary["results"]}
    for ckpt in matrix.used_checkpoints(config):
        for column in ("ImageNet", "ImageNet ReaL", *config["averages"]):
            result = results[ckpt, column, "finetune"]
            assert result["status"] == "run", (ckpt, column)
            if result["kind"] != "average":  # an average has no seeds of its own
                assert result["num_seeds"] == len(matrix.final_seeds(config)), (ckpt, column)
    for ckpt, _ in matrix.released(config):
        assert results[ckpt, "ImageNet", "released"]["status"] == "run", ckpt
