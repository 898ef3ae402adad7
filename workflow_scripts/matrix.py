"""The study's job matrix as pure functions of the config: the Snakefile plans jobs with them and
the aggregate stage reads results with them, so both always agree on what a run consists of.

Vocabulary:
- a *pair* is a (checkpoint, dataset) the study fine-tunes: an LR sweep, one selection, one test
  evaluation. A checkpoint is not fine-tuned on its `head_dataset` (the dataset its released head
  already classifies, e.g. ImageNet for the ImageNet-1k checkpoints).
- a *released* result is a (checkpoint, head_dataset): the released model evaluated as it is, by the
  baseline stage, once per evaluation protocol.

Kept free of heavy imports: Snakemake imports this module when it parses the workflow.
"""
from __future__ import annotations


def lr_str(lr: float) -> str:
    """The LR as it appears in paths and wildcards (0.03 -> '0.03')."""
    return f"{lr:g}"


def head_dataset(config: dict, ckpt: str) -> str | None:
    """The dataset whose classes the checkpoint's released head already predicts (None: none)."""
    return config["checkpoints"][ckpt].get("head_dataset")


def pairs(config: dict) -> list[tuple[str, str]]:
    """Every (checkpoint, dataset) that is fine-tuned: an LR sweep, a selection and one test evaluation."""
    f = config["finetune"]
    return [(ck, ds) for ck in f["checkpoints"] for ds in f["datasets"] if ds != head_dataset(config, ck)]


def pair_runs(config: dict, ckpt: str, dataset: str) -> list[tuple[str, str, str, int]]:
    """The runs of one pair's LR sweep: (checkpoint, dataset, lr string, seed), LRs from the dataset's grid."""
    lrs = config["datasets"][dataset]["base_lrs"]
    return [(ckpt, dataset, lr_str(lr), seed) for lr in lrs for seed in config["finetune"]["seeds"]]


def finetune_runs(config: dict) -> list[tuple[str, str, str, int]]:
    """Every fine-tuning job: (checkpoint, dataset, lr string, seed)."""
    return [run for ck, ds in pairs(config) for run in pair_runs(config, ck, ds)]


def final_runs(config: dict) -> list[tuple[str, str, int]]:
    """The final run of each pair and seed at the selected LR on the whole training data (retrain on)."""
    if not config["finetune"]["retrain_on_full_train"]:
        return []
    return [(ck, ds, seed) for ck, ds in pairs(config) for seed in config["finetune"]["seeds"]]


def variant_runs(config: dict) -> list[tuple[str, str, str, int]]:
    """Every run of a protocol variant: (variant, checkpoint, dataset, seed), at the pair's selected LR."""
    return [(name, ck, ds, seed) for name, v in config["variants"].items() for ck, ds in v["pairs"]
            for seed in config["finetune"]["seeds"]]


def variant_pairs(config: dict) -> list[tuple[str, str, str]]:
    """(variant, checkpoint, dataset): one evaluation each, at the headline protocol."""
    return [(name, ck, ds) for name, v in config["variants"].items() for ck, ds in v["pairs"]]


def evaluations(config: dict) -> list[tuple[str, str, str]]:
    """Every test evaluation of a fine-tuned pair: (checkpoint, dataset, protocol), every protocol."""
    return [(ck, ds, p) for ck, ds in pairs(config) for p in config["evaluation"]["protocols"]]


def selection_bias_pairs(config: dict) -> list[tuple[str, str]]:
    """The pairs whose every sweep run is also evaluated on test, for the selection-bias table only."""
    return pairs(config) if config["finetune"]["selection_bias_table"] else []


def released(config: dict) -> list[tuple[str, str]]:
    """Every (checkpoint, head_dataset) of the study: the released model is the result, evaluated as it is."""
    f = config["finetune"]
    return [(ck, head_dataset(config, ck)) for ck in f["checkpoints"] if head_dataset(config, ck) in f["datasets"]]


def baseline_runs(config: dict) -> list[tuple[str, str, str]]:
    """Released checkpoints evaluated as they are: (checkpoint, dataset, evaluation protocol), every protocol."""
    return [(ck, ds, p) for ck, ds in released(config) for p in config["evaluation"]["protocols"]]


def results(config: dict) -> list[tuple[str, str, str]]:
    """Every (checkpoint, dataset) with a test result, and where it comes from: "finetune" or "released"."""
    return ([(ck, ds, "finetune") for ck, ds in pairs(config)]
            + [(ck, ds, "released") for ck, ds in released(config)])


def real_results(config: dict) -> list[tuple[str, str, str]]:
    """The results that also get a ReaL-style top-1: those of datasets with `real_labels`."""
    return [r for r in results(config) if config["datasets"][r[1]].get("real_labels")]


def used_checkpoints(config: dict) -> list[str]:
    return list(config["finetune"]["checkpoints"])


def used_datasets(config: dict) -> list[str]:
    return list(config["finetune"]["datasets"])


def finetune_gpus(config: dict, ckpt: str) -> int:
    """GPUs of one fine-tuning job of `ckpt` (resources.finetune.gpu unless overridden per checkpoint)."""
    res = config["resources"]
    return res["finetune_gpu_overrides"].get(ckpt, res["finetune"]["gpu"])


def job_shape(config: dict, ckpt: str) -> str:
    """The GPU job shape of `ckpt`'s fine-tuning and evaluation jobs: its body (the head is the dataset's
    after fine-tuning), image size and GPU count; checkpoints of one shape share one preflight."""
    a = config["checkpoints"][ckpt]["architecture"]
    body = f"p{a['patch_size']}-d{a['hidden_dim']}-b{a['num_blocks']}-t{a['tokens_mlp_dim']}-c{a['channels_mlp_dim']}"
    return f"{body}-{a['image_size']}px-{finetune_gpus(config, ckpt)}gpu"


def job_shapes(config: dict) -> dict[str, list[str]]:
    """Every job shape of the study, with the checkpoints it serves (in config order)."""
    shapes: dict[str, list[str]] = {}
    for ckpt in used_checkpoints(config):
        shapes.setdefault(job_shape(config, ckpt), []).append(ckpt)
    return shapes


# How hard a dataset's jobs load their images: ImageNet-style JPEG trees above all, then the other JPEG
# folders, then arrays already in memory (CIFAR), which cost the loader nothing.
_LOADER_COST = {"imagefolder": 3, "pets": 2, "flowers": 2}


def preflight_dataset(config: dict, ckpts: list[str]) -> str:
    """The dataset whose loader a shape's preflight times: of the datasets the checkpoints' jobs read (fine-tuned
    or evaluated as released), the hardest to load, then the one with the most steps; config order breaks ties."""
    used = {ds for ck, ds in pairs(config) + released(config) if ck in ckpts}

    def cost(ds: str) -> tuple[int, int]:
        source = config["datasets"][ds]["source"]
        folder = 1 if source.get("layout") == "imagefolder" else 0
        return _LOADER_COST.get(source["kind"], folder), config["datasets"][ds]["steps"]

    return max((ds for ds in used_datasets(config) if ds in used), key=cost)
