"""The Snakemake spine: the study's job matrix, lint, and config validation errors."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def snakemake(*args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(
        [SNAKEMAKE, "-s", str(REPO / "Snakefile"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def job_counts(stdout: str) -> dict[str, int]:
    block = stdout.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", block, re.M)}


def write_config(tmp_path: Path, edit) -> Path:
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    edit(cfg)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_study_dry_run_lists_the_whole_of_table3(tmp_path):
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    res = snakemake("-n", "--configfile", str(REPO / "config.yaml"), "--cores", "all",
                    "--resources", "gpu=2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr + res.stdout
    counts = job_counts(res.stdout)
    datasets = cfg["finetune"]["datasets"]
    assert set(datasets) == {"imagenet", "cifar10", "cifar100", "pets", "flowers"}
    released = {ck for ck, c in cfg["checkpoints"].items() if c.get("head_dataset") == "imagenet"}
    assert released == {"mixer_b16_in1k", "mixer_l16_in1k"}
    # Every (checkpoint, dataset, lr, seed) is its own job: all five datasets for every checkpoint, ImageNet
    # included for the ImageNet-1k ones (Table 3's ImageNet rows are fine-tuned models, three runs averaged).
    jobs = set(re.findall(r"finetune/(\w+)/(\w+)/lr([0-9.e-]+)_s(\d+)/model\.safetensors", res.stdout))
    expected = {(c, d, f"{lr:g}", str(s)) for c in cfg["finetune"]["checkpoints"] for d in datasets
                for lr in cfg["datasets"][d]["base_lrs"] for s in cfg["finetune"]["seeds"]}
    assert jobs == expected and counts["finetune"] == len(expected) == 5 * 5 * 4
    # The paper's Appendix C: every dataset's grid is {0.003, 0.01, 0.03, 0.06}.
    assert all(cfg["datasets"][d]["base_lrs"] == [0.003, 0.01, 0.03, 0.06] for d in datasets)
    n_pairs = 5 * 5  # the 448 px row (Appendix C) included
    assert counts["select_lr"] == n_pairs
    assert counts["evaluate"] == n_pairs * 3  # resmall_crop, resize_crop, official (timm's: released models only)
    # Three final runs per pair at the selected LR on train + dev split (Table 3 caption), the variants the
    # config asks for, every sweep run tested with the headline protocol for the selection-bias table, and
    # the LR-0.03 runs of CIFAR-10 also with the official code's protocol (its README's figures).
    assert cfg["finetune"]["final_seeds"] == [0, 1, 2]
    finals = set(re.findall(r"final/(\w+)/(\w+)/s(\d+)/model\.safetensors", res.stdout))
    assert finals == {(c, d, s) for c in cfg["finetune"]["checkpoints"] for d in datasets for s in "012"}
    assert counts["final_finetune"] == n_pairs * 3
    assert counts["variant_finetune"] == sum(len(v["pairs"]) for v in cfg["variants"].values())
    assert counts["evaluate_variant"] == counts["variant_finetune"]
    sweeps = set(re.findall(r"sweep_on_test/(\w+)/(\w+)/(\w+)\.json", res.stdout))
    assert sweeps == ({(c, d, "resmall_crop") for c in cfg["finetune"]["checkpoints"] for d in datasets}
                      | {(c, "cifar10", "official") for c in cfg["finetune"]["checkpoints"] if "448" not in c})
    # The released ImageNet-1k models are evaluated as they are, with every protocol and timm's own; one ReaL
    # job per ImageNet result (5 fine-tuned + 2 released) and one for Table 2's ReaL (448 px, resize_crop),
    # from a real.json fetched once.
    assert counts["baseline"] == len(released) * len(cfg["evaluation"]["protocols"])
    assert counts["real"] == 8 and counts["download_real_labels"] == 1
    assert set(re.findall(r"real/finetune/(\w+)/imagenet/resmall_crop\.json", res.stdout)) == set(cfg["checkpoints"])
    assert set(re.findall(r"real/released/(\w+)/imagenet/resmall_crop\.json", res.stdout)) == released
    # The 448 px entry is built from mixer_l16_in21k's .npz: 4 downloads, 5 conversions, 5 throughputs.
    assert counts["download_weights"] == 4 and counts["convert_weights"] == counts["model_stats"] == 5
    assert counts["prepare_data"] == 5
    assert counts["report"] == counts["aggregate"] == counts["notebook"] == 1
    assert cfg["averages"] == {"Avg5": ["imagenet", "cifar10", "cifar100", "pets", "flowers"]}
    assert not (tmp_path / "results").exists(), "a dry run must not create outputs"


def test_demo_dry_run_never_mixes_with_the_study(tmp_path):
    res = snakemake("-n", "--configfile", str(REPO / "demo" / "config.yaml"), "--cores", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr + res.stdout
    counts = job_counts(res.stdout)
    assert counts["synthesize_upstream"] == 2 and counts["synthesize_data"] == 1
    # Both checkpoints on two datasets (2 LRs each), p8's head's dataset among them; two final seeds each; p8
    # as released with three protocols (no timm_model); ReaL for both fine-tuned models and the released one.
    assert counts["finetune"] == 8 and counts["final_finetune"] == 8
    assert counts["baseline"] == 3 and counts["real"] == 3
    # The headline protocol for the selection-bias table on every pair, the official one where a stand-in
    # reference of one sweep run (demo/references.yaml) needs it.
    assert counts["evaluate_sweep"] == 4 + 1
    assert "results/" not in res.stdout.replace("demo_results/", "")
    assert "mixer_b16_in21k" not in res.stdout


def test_lint_is_clean():
    res = snakemake("--lint", cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr


def test_conda_env_pins_match_requirements():
    req = {line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
           if line.strip() and not line.startswith("#")}
    env = yaml.safe_load((REPO / "envs" / "pipeline.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert set(pip) == req


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda c: c["protocol"].update(micro_batch_sise=c["protocol"].pop("micro_batch_size")),
         "config key 'protocol.micro_batch_sise' is not known"),
        (lambda c: c["protocol"].update(batch_size="512"),
         "config key 'protocol.batch_size': '512' is not of type 'integer'"),
        (lambda c: c["finetune"].update(datasets=["svhn"]),
         "config key 'finetune.datasets': 'svhn' is not defined"),
        (lambda c: c["protocol"].update(micro_batch_size=100),
         "protocol.micro_batch_size 100 does not divide protocol.batch_size 512"),
        (lambda c: c["evaluation"].update(headline_protocol="tta"),
         "config key 'evaluation.headline_protocol': 'tta' is not a protocol"),
        (lambda c: c["evaluation"].update(headline_protocol="timm"),
         "config key 'evaluation.headline_protocol': 'timm' is timm's transform, which applies to released"),
        (lambda c: c["finetune"].pop("final_seeds"),
         "config key 'finetune': 'final_seeds' is a required property"),
        (lambda c: c["checkpoints"]["mixer_b16_in21k"].update(timm_model="mixer_b16_224"),
         "config key 'checkpoints.mixer_b16_in21k.timm_model': names a released timm model but the checkpoint"),
        (lambda c: c["evaluation"]["protocols"].update(resize_crop={"resize": "square"}),
         "'crop_fraction' is a required property"),
        (lambda c: c["datasets"]["cifar10"].update(eval_protocol="official"),
         "config key 'datasets.cifar10.eval_protocol': has been removed"),
        (lambda c: c["checkpoints"]["mixer_b16_in21k"].update(sha256="abc"),
         "config key 'checkpoints.mixer_b16_in21k.sha256'"),
        (lambda c: c["finetune"].update(base_lrs=[0.01]),
         "config key 'finetune.base_lrs': has moved to datasets.<name>.base_lrs"),
        (lambda c: c["evaluation"].update(baseline=[{"checkpoint": "mixer_b16_in1k", "dataset": "imagenet"}]),
         "config key 'evaluation.baseline': has been replaced: set checkpoints.<name>.head_dataset"),
        (lambda c: c["checkpoints"]["mixer_b16_in1k"].update(head_dataset="pets"),
         "config key 'checkpoints.mixer_b16_in1k.head_dataset': the head has 1000 classes but dataset 'pets'"),
        (lambda c: c["averages"].update(Avg6=["imagenet", "svhn"]),
         "config key 'averages.Avg6': 'svhn' is not defined"),
        (lambda c: c.update(output_root="/abs/results"),
         "config key 'output_root'"),
        (lambda c: c.update(references="report/nope.yaml"),
         "config key 'references': file"),
    ],
    ids=["misspelled-key", "wrong-type", "unknown-dataset", "micro-batch", "eval-protocol", "timm-headline",
         "final-seeds-missing", "timm-model-without-head", "square-without-crop", "removed-eval-protocol",
         "sha256",
         "moved-lr-grid", "replaced-baseline", "head-classes", "average-member", "absolute-output",
         "references-file"],
)
def test_bad_config_fails_with_a_message_naming_the_key(tmp_path, edit, expected):
    path = write_config(tmp_path, edit)
    res = snakemake("-n", "--configfile", str(path), "--cores", "1", cwd=tmp_path)
    assert res.returncode != 0
    assert expected in res.stdout + res.stderr, res.stdout + res.stderr


def test_reference_figure_citing_an_unknown_source_is_rejected(tmp_path):
    refs = yaml.safe_load((REPO / "report" / "references.yaml").read_text())
    refs["figures"][0]["source"] = "a_blog_post"
    ref_path = tmp_path / "refs.yaml"
    ref_path.write_text(yaml.safe_dump(refs))
    path = write_config(tmp_path, lambda c: c.update(references=str(ref_path)))
    res = snakemake("-n", "--configfile", str(path), "--cores", "1", cwd=tmp_path)
    assert res.returncode != 0
    assert "cites source 'a_blog_post'" in res.stdout + res.stderr


def test_every_rule_has_log_benchmark_and_conda():
    rules = [body for p in sorted((REPO / "rules").glob("*.smk")) if p.name != "common.smk"
             for body in re.split(r"^rule ", p.read_text(), flags=re.M)[1:]]
    assert len(rules) >= 11
    for body in rules:
        name = body.split(":")[0]
        for directive in ("log:", "benchmark:", "conda:", "shell:"):
            assert directive in body, f"rule {name} lacks {directive}"
        assert not re.search(r"^\s+run:", body, re.M), f"rule {name} has logic in a run: block"


def test_a_skip_fails_the_suite_in_ci(tmp_path):
    """Skipped in a test, by a marker, or while collecting a module (importorskip): each fails in CI."""
    (tmp_path / "test_skipping.py").write_text("import pytest\n\ndef test_x():\n    pytest.skip('no browser')\n\n\n"
                                               "@pytest.mark.skipif(True, reason='not root')\ndef test_y():\n"
                                               "    pass\n")
    (tmp_path / "test_module_skip.py").write_text("import pytest\n\npytest.importorskip('no_such_module_xyz')\n\n\n"
                                                  "def test_z():\n    pass\n")
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    run = lambda ci: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)], cwd=tmp_path,
        env=dict(os.environ, CI=ci), capture_output=True, text=True, timeout=120)
    in_ci, locally = run("true"), run("")
    assert in_ci.returncode == 1, in_ci.stdout
    for reason in ("no browser", "not root", "no_such_module_xyz"):
        assert any("skipped in CI" in line and reason in line for line in in_ci.stdout.splitlines()), reason
    assert locally.returncode == 0 and "3 skipped" in locally.stdout, locally.stdout


def test_ci_is_any_value_but_the_false_ones(monkeypatch):
    from tests import conftest

    for value, expected in (("true", True), ("1", True), ("True", True), ("yes", True), ("", False),
                            ("false", False), ("0", False), ("no", False), ("OFF", False)):
        monkeypatch.setenv("CI", value)
        assert conftest.in_ci() == expected, value
    monkeypatch.delenv("CI")
    assert not conftest.in_ci()


def long_functions(max_lines: int = 60) -> list[str]:
    """Functions of workflow_scripts/ longer than max_lines (decorators and docstring included)."""
    import ast

    found = []
    for path in sorted((REPO / "workflow_scripts").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > max_lines:
                    found.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - start + 1} lines)")
    return found


def test_no_function_in_workflow_scripts_is_over_60_lines():
    assert long_functions() == []


def test_ci_entry_point_says_it_is_ci_and_pins_the_chaos_seed():
    """.ci/run is CI whoever starts it (skips fail there) and replays one chaos plan."""
    text = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^export CI=true$", text, re.M)
    assert re.search(r'^export MIXER_CHAOS_SEED="\$\{MIXER_CHAOS_SEED:-\d+\}"$', text, re.M)
    assert text.index("export CI=true") < text.index("make test")
