"""The study's job matrix as pure functions of the config: the Snakefile plans jobs with them and
the aggregate stage reads results with them, so both always agree on what a run consists of.

Vocabulary:
- a *pair* is a (checkpoint, dataset) the study fine-tunes: an LR sweep, one selection, the final runs
  (one per final seed) and their test evaluations. Every checkpoint is fine-tuned on every dataset, its
  `head_dataset` included: Table 3's ImageNet rows of the ImageNet-pre-trained models are fine-tuned
  models too (paper, Table 3 caption: "averaged over three fine-tuning runs").
- a *released* result is a (checkpoint, head_dataset): the released model evaluated as it is, by the
  baseline stage, once per evaluation protocol that applies to it; a row of its own ("as released"),
  never a Table 3 figure.
- an evaluation protocol with `resize: timm` is timm's own transform for the checkpoint's `timm_model`:
  it applies to released checkpoints that name one (timm's results table evaluates those), only.

Kept free of heavy imports: Snakemake imports this module when it parses the workflow.
"""
from __future__ import annotations

from workflow_scripts.tables import real_label

# The job name of each kind of job, as in its log and benchmark paths (rules/common.smk log_file,
# benchmark_file): a job's id is "<rule>/<job>" (workflow_scripts.eta, workflow_scripts.status).
RUN_JOB = "{ckpt}/{dataset}/lr{lr}_s{seed}"
FINAL_JOB = "{ckpt}/{dataset}/s{seed}"
VARIANT_JOB = "{variant}/{ckpt}/{dataset}/s{seed}"
PROTOCOL_JOB = "{ckpt}/{dataset}/{protocol}"
VARIANT_PAIR_JOB = "{variant}/{ckpt}/{dataset}"
PAIR_JOB = "{ckpt}/{dataset}"
REAL_JOB = "{source}/{ckpt}/{dataset}/{protocol}"
BASELINE_JOB = PROTOCOL_JOB


def lr_str(lr: float) -> str:
    """The LR as it appears in paths and wildcards (0.03 -> '0.03')."""
    return f"{lr:g}"


def head_dataset(config: dict, ckpt: str) -> str | None:
    """The dataset whose classes the checkpoint's released head already predicts (None: none)."""
    return config["checkpoints"][ckpt].get("head_dataset")


def pairs(config: dict) -> list[tuple[str, str]]:
    """Every (checkpoint, dataset) that is fine-tuned: an LR sweep, a selection, the final runs, evaluations."""
    f = config["finetune"]
    return [(ck, ds) for ck in f["checkpoints"] for ds in f["datasets"]]


def pair_runs(config: dict, ckpt: str, dataset: str) -> list[tuple[str, str, str, int]]:
    """The runs of one pair's LR sweep: (checkpoint, dataset, lr string, seed), LRs from the dataset's grid."""
    lrs = config["datasets"][dataset]["base_lrs"]
    return [(ckpt, dataset, lr_str(lr), seed) for lr in lrs for seed in config["finetune"]["seeds"]]


def finetune_runs(config: dict) -> list[tuple[str, str, str, int]]:
    """Every fine-tuning job: (checkpoint, dataset, lr string, seed)."""
    return [run for ck, ds in pairs(config) for run in pair_runs(config, ck, ds)]


def final_seeds(config: dict) -> list[int]:
    """The seeds of a pair's final models: finetune.final_seeds (retrain on), else the sweep's seeds."""
    f = config["finetune"]
    return list(f["final_seeds"] if f["retrain_on_full_train"] else f["seeds"])


def final_runs(config: dict) -> list[tuple[str, str, int]]:
    """The final runs of each pair at the selected LR on the whole training data, one per final seed
    (retrain on; Table 3 caption: "averaged over three fine-tuning runs")."""
    if not config["finetune"]["retrain_on_full_train"]:
        return []
    return [(ck, ds, seed) for ck, ds in pairs(config) for seed in config["finetune"]["final_seeds"]]


def variant_pairs(config: dict) -> list[tuple[str, str, str]]:
    """(variant, checkpoint, dataset): one evaluation each, at the headline protocol; a variant's pairs that the
    study does not fine-tune (a subset of checkpoints or datasets) are left out."""
    fine_tuned = set(pairs(config))
    return [(name, ck, ds) for name, v in config["variants"].items() for ck, ds in v["pairs"] if (ck, ds) in fine_tuned]


def variant_runs(config: dict) -> list[tuple[str, str, str, int]]:
    """Every run of a protocol variant: (variant, checkpoint, dataset, seed), at the pair's selected LR."""
    return [(name, ck, ds, seed) for name, ck, ds in variant_pairs(config) for seed in config["finetune"]["seeds"]]


def is_timm_protocol(config: dict, protocol: str) -> bool:
    return config["evaluation"]["protocols"][protocol].get("resize") == "timm"


def finetuned_protocols(config: dict) -> list[str]:
    """The evaluation protocols of fine-tuned models: all but timm's (which needs a released timm model)."""
    return [p for p in config["evaluation"]["protocols"] if not is_timm_protocol(config, p)]


def released_protocols(config: dict, ckpt: str) -> list[str]:
    """The protocols a released checkpoint is evaluated with: timm's only where it names its `timm_model`."""
    has_timm = bool(config["checkpoints"][ckpt].get("timm_model"))
    return [p for p in config["evaluation"]["protocols"] if has_timm or not is_timm_protocol(config, p)]


def evaluations(config: dict) -> list[tuple[str, str, str]]:
    """Every test evaluation of a pair's final models: (checkpoint, dataset, protocol), every protocol."""
    return [(ck, ds, p) for ck, ds in pairs(config) for p in finetuned_protocols(config)]


def selection_bias_pairs(config: dict) -> list[tuple[str, str]]:
    """The pairs whose every sweep run is also evaluated on test with the headline protocol (the table)."""
    return pairs(config) if config["finetune"]["selection_bias_table"] else []


def reference_protocols(config: dict, ckpt: str, column: str, result: str) -> list[str]:
    """The protocols of the loaded references made as `result` (made_by.result) that have a figure for this
    checkpoint (label, pre-training, image size) in this column (a dataset's label, or its ReaL column)."""
    refs, ck = config["references"], config["checkpoints"][ckpt]
    row = (ck["label"], ck["pretraining"], ck["architecture"]["image_size"])
    protocols = []
    for fig in refs["figures"]:
        made_by = refs["sources"][fig["source"]]["made_by"]
        if (made_by["result"] == result and (fig["label"], fig["pretraining"], fig["image_size"]) == row
                and fig["dataset"] == column and made_by["protocol"] not in protocols):
            protocols.append(made_by["protocol"])
    return protocols


def sweep_evaluations(config: dict) -> list[tuple[str, str, str]]:
    """(checkpoint, dataset, protocol): every sweep run of a pair evaluated on test with one protocol: the
    headline one for the selection-bias table (finetune.selection_bias_table), and the protocol of each
    reference made by one sweep run that has a figure for the pair (the official code's README figures:
    one run at LR 0.03, plain resize). Never used for selection."""
    headline, found = config["evaluation"]["headline_protocol"], []
    for ck, ds in pairs(config):
        wanted = [headline] if config["finetune"]["selection_bias_table"] else []
        label = config["datasets"][ds]["label"]
        wanted += [p for p in reference_protocols(config, ck, label, "sweep_run") if p not in wanted]
        found += [(ck, ds, p) for p in wanted]
    return found


def released(config: dict) -> list[tuple[str, str]]:
    """Every (checkpoint, head_dataset) of the study: the released model is the result, evaluated as it is."""
    f = config["finetune"]
    return [(ck, head_dataset(config, ck)) for ck in f["checkpoints"] if head_dataset(config, ck) in f["datasets"]]


def baseline_runs(config: dict) -> list[tuple[str, str, str]]:
    """Released checkpoints evaluated as they are: (checkpoint, dataset, evaluation protocol)."""
    return [(ck, ds, p) for ck, ds in released(config) for p in released_protocols(config, ck)]


def results(config: dict) -> list[tuple[str, str, str]]:
    """Every (checkpoint, dataset) with a test result, and where it comes from: "finetune" or "released"."""
    return ([(ck, ds, "finetune") for ck, ds in pairs(config)]
            + [(ck, ds, "released") for ck, ds in released(config)])


def real_results(config: dict) -> list[tuple[str, str, str, str]]:
    """(checkpoint, dataset, result_from, protocol): the results that also get a ReaL-style top-1 (datasets with
    `real_labels`), from the predictions of the headline protocol's evaluation and of each protocol a reference
    has a ReaL figure of (e.g. the paper's Table 2, resize-crop)."""
    headline, found = config["evaluation"]["headline_protocol"], []
    for ck, ds, source in results(config):
        if config["datasets"][ds].get("real_labels"):
            column = real_label(config["datasets"][ds]["label"])
            made_as = "final" if source == "finetune" else "released"
            wanted = [headline] + [p for p in reference_protocols(config, ck, column, made_as) if p != headline]
            found += [(ck, ds, source, p) for p in wanted]
    return found


def used_checkpoints(config: dict) -> list[str]:
    return list(config["finetune"]["checkpoints"])


def npz_source(config: dict, ckpt: str) -> str:
    """The checkpoint whose released .npz `ckpt` is built from: its `base_checkpoint` (a higher-resolution
    Mixer of the paper's Appendix C, made by convert --image-size), else itself."""
    return config["checkpoints"][ckpt].get("base_checkpoint", ckpt)


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
