"""The study's job matrix as pure functions of the config: the Snakefile plans jobs with them and
the aggregate stage reads results with them, so both always agree on what a run consists of.

Kept free of heavy imports: Snakemake imports this module when it parses the workflow.
"""
from __future__ import annotations


def lr_str(lr: float) -> str:
    """The LR as it appears in paths and wildcards (0.03 -> '0.03')."""
    return f"{lr:g}"


def finetune_runs(config: dict) -> list[tuple[str, str, str, int]]:
    """Every fine-tuning job: (checkpoint, dataset, lr string, seed)."""
    f = config["finetune"]
    return [(ck, ds, lr_str(lr), seed) for ck in f["checkpoints"] for ds in f["datasets"]
            for lr in f["base_lrs"] for seed in f["seeds"]]


def pair_runs(config: dict, ckpt: str, dataset: str) -> list[tuple[str, str, str, int]]:
    """The runs of one (checkpoint, dataset) LR sweep, in finetune_runs order."""
    return [run for run in finetune_runs(config) if run[:2] == (ckpt, dataset)]


def pairs(config: dict) -> list[tuple[str, str]]:
    """Every (checkpoint, dataset) that gets an LR selection and one test evaluation."""
    f = config["finetune"]
    return [(ck, ds) for ck in f["checkpoints"] for ds in f["datasets"]]


def baseline_runs(config: dict) -> list[tuple[str, str, str]]:
    """Released checkpoints evaluated as they are: (checkpoint, dataset, evaluation protocol)."""
    ev = config["evaluation"]
    return [(b["checkpoint"], b["dataset"], p) for b in ev["baseline"] for p in ev["protocols"]]


def used_checkpoints(config: dict) -> list[str]:
    names = list(config["finetune"]["checkpoints"])
    return names + [b["checkpoint"] for b in config["evaluation"]["baseline"] if b["checkpoint"] not in names]


def used_datasets(config: dict) -> list[str]:
    names = list(config["finetune"]["datasets"])
    return names + [b["dataset"] for b in config["evaluation"]["baseline"] if b["dataset"] not in names]


def finetune_gpus(config: dict, ckpt: str) -> int:
    """GPUs of one fine-tuning job of `ckpt` (resources.finetune.gpu unless overridden per checkpoint)."""
    res = config["resources"]
    return res["finetune_gpu_overrides"].get(ckpt, res["finetune"]["gpu"])
