# The one place that knows the layout and validates the config. Rule files stay thin: they take
# paths, params and resources from here and run one `python -m workflow_scripts.<stage>` command.
import json
import os
import shlex
import sys
from pathlib import Path

import jsonschema
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.settings.types import DeploymentMethod

sys.path.insert(0, workflow.basedir)  # workflow_scripts: the pure job matrix and the typed protocol
from workflow_scripts import eta, matrix, references  # noqa: E402
from workflow_scripts.common import PipelineError  # noqa: E402
from workflow_scripts.protocol import Protocol  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Every job imports the workflow_scripts package next to this Snakefile, whatever the working
# directory (--directory) or environment (--sdm conda, SLURM). Without --sdm conda, jobs use the
# interpreter Snakemake runs in (a .venv works without being activated).
def _escape(path):
    return shlex.quote(path).replace("{", "{{").replace("}", "}}")  # the prefix is format-expanded


_prefix = "set -euo pipefail; export PYTHONPATH={}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ".format(_escape(workflow.basedir))
if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    _prefix += "export PATH={}:$PATH; ".format(_escape(str(Path(sys.executable).parent)))
shell.prefix(_prefix)


# ---------------------------------------------------------------------------------------------
# Validation, once, at the Snakemake boundary: the schema, then what a schema cannot express.
def config_error(key, problem, fix):
    raise WorkflowError(f"config key '{key}': {problem}. Fix: {fix}")


def _schema_problem(err):
    key = ".".join(str(p) for p in err.absolute_path) or "(top level)"
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extras = sorted(set(err.instance) - set(allowed))
        keys = [f"{key}.{extra}" if err.absolute_path else extra for extra in extras]
        return [f"config key '{k}' is not known (misspelled?); allowed here: {allowed}" for k in keys]
    if err.validator == "required":
        return [f"config key '{key}': {err.message}; add it (see config.yaml for an example)"]
    hint = err.schema.get("errorMessage")  # the schema's own explanation, e.g. where a key moved
    return [f"config key '{key}': {hint or err.message}"]


def validate_against_schema(obj, schema_name, source):
    """Check obj against a JSON schema; every problem becomes one line naming the dotted key."""
    schema = yaml.safe_load((Path(workflow.basedir) / "rules" / "schemas" / schema_name).read_text())
    problems = [p for err in jsonschema.Draft202012Validator(schema).iter_errors(obj) for p in _schema_problem(err)]
    if problems:
        raise WorkflowError(f"{source} is not valid:\n  " + "\n  ".join(sorted(problems)))


def load_references(value):
    """The config's `references` (workflow_scripts.references: loaded, merged, checked)."""
    try:
        return references.load(value, workflow.basedir, config["evaluation"]["protocols"])
    except PipelineError as e:
        raise WorkflowError(str(e)) from None


def _check_names(key, names, known, what="defined"):
    for name in names:
        if name not in known:
            config_error(key, f"'{name}' is not {what}", f"define it or use one of {sorted(known)}")


def check_cross_references(config):
    ckpts, dsets = config["checkpoints"], config["datasets"]
    _check_names("finetune.checkpoints", config["finetune"]["checkpoints"], ckpts)
    _check_names("finetune.datasets", config["finetune"]["datasets"], dsets)
    _check_names("resources.finetune_gpu_overrides", config["resources"]["finetune_gpu_overrides"], ckpts)
    for name, members in config["averages"].items():
        _check_names(f"averages.{name}", members, dsets)
    _check_protocols(config)
    for name, ds in dsets.items():
        _check_synthesized_dataset(name, ds)
    for name, ck in ckpts.items():
        if "synthesize" in ck and ck["url"] != f"file:{upstream_npz(name)}":
            config_error(
                f"checkpoints.{name}.url",
                "a synthesized checkpoint is fetched from the file " "synthesize_upstream writes",
                f"set it to file:{upstream_npz(name)}",
            )
        _check_head_dataset(name, ck, dsets)
        _check_base_checkpoint(name, ck, ckpts)
    _check_batch_split(config)
    _check_variants(config)


def _check_variants(config):
    for name, variant in config["variants"].items():
        key = f"variants.{name}"
        unknown = sorted(set(variant["protocol"]) - set(Protocol.key_names()))
        if unknown:
            config_error(
                f"{key}.protocol", f"{unknown} are not protocol keys", f"use keys of {list(Protocol.key_names())}"
            )
        for i, (ck, ds) in enumerate(variant["pairs"]):  # pairs outside the plan (a subset) are left out
            _check_names(f"{key}.pairs[{i}]", [ck], config["checkpoints"])
            _check_names(f"{key}.pairs[{i}]", [ds], config["datasets"])
        for ck, _ in variant["pairs"]:  # the variant's jobs run on the GPUs of the checkpoint's jobs
            try:
                variant_protocol(name).check_batch_split(max(1, matrix.finetune_gpus(config, ck)))
            except PipelineError as e:
                raise WorkflowError(f"config key '{key}.protocol': {e} (checkpoint {ck})") from None


def _check_protocols(config):
    ev = config["evaluation"]
    protocols, headline = ev["protocols"], ev["headline_protocol"]
    _check_names("evaluation.headline_protocol", [headline], protocols, "a protocol")
    if matrix.is_timm_protocol(config, headline):
        config_error(
            "evaluation.headline_protocol",
            f"'{headline}' is timm's transform, which applies to " "released models only",
            "name a protocol with resize direct, shorter_side or square",
        )


def _check_base_checkpoint(name, ck, ckpts):
    """A higher-resolution entry (Appendix C): built from its base's .npz by convert --image-size K."""
    if "base_checkpoint" not in ck:
        if "url" not in ck:
            config_error(f"checkpoints.{name}", "has neither url nor base_checkpoint", "add the .npz's url")
        return
    key, base_name = f"checkpoints.{name}.base_checkpoint", ck["base_checkpoint"]
    _check_names(key, [base_name], ckpts)
    base = ckpts[base_name]
    for field in ("url", "synthesize", "sha256", "size_mib", "head_dataset", "timm_model"):
        if field in ck:
            config_error(f"checkpoints.{name}.{field}", f"is the base's ({base_name}) to set", "remove it here")
    if "base_checkpoint" in base:
        config_error(key, f"'{base_name}' is itself built from another checkpoint", "name the released one")
    a, b = ck["architecture"], base["architecture"]
    k, rest = a["image_size"] // b["image_size"], ("patch_size", "hidden_dim", "num_blocks", "channels_mlp_dim")
    if (
        a["image_size"] % b["image_size"]
        or any(a[f] != b[f] for f in rest)
        or a["tokens_mlp_dim"] != k * k * b["tokens_mlp_dim"]
    ):
        config_error(
            f"checkpoints.{name}.architecture",
            f"is not {base_name}'s at an integer multiple K of its image size {b['image_size']} (Appendix C: same "
            "patch size and widths, tokens MLP K^2 times wider)",
            f"use image_size {b['image_size']}*K and tokens_mlp_dim {b['tokens_mlp_dim']}*K^2",
        )


def _check_head_dataset(name, ck, dsets):
    if ck.get("timm_model") and "head_dataset" not in ck:
        config_error(
            f"checkpoints.{name}.timm_model",
            "names a released timm model but the checkpoint has no "
            "head_dataset (the dataset that released model classifies)",
            "add head_dataset or remove it",
        )
    if "head_dataset" not in ck:
        return
    _check_names(f"checkpoints.{name}.head_dataset", [ck["head_dataset"]], dsets)
    expected = dsets[ck["head_dataset"]].get("expected", {}).get("num_classes")
    if expected is not None and expected != ck["architecture"]["num_classes"]:
        config_error(
            f"checkpoints.{name}.head_dataset",
            f"the head has {ck['architecture']['num_classes']} "
            f"classes but dataset '{ck['head_dataset']}' expects {expected}",
            "name the dataset this released head classifies, or remove the key",
        )


def _check_synthesized_dataset(name, ds):
    if "synthesize" not in ds["source"]:
        return
    tree = upstream_data(name)
    wanted = {"path": tree, "val_ground_truth": f"{tree}/val_ground_truth.txt"}
    for key, value in wanted.items():
        if ds["source"].get(key) != value:
            config_error(
                f"datasets.{name}.source.{key}",
                "a synthesized dataset is read from the tree " "synthesize_data writes",
                f"set it to {value}",
            )
    if ds.get("real_labels", {}).get("url", f"file:{tree}/real.json") != f"file:{tree}/real.json":
        config_error(
            f"datasets.{name}.real_labels.url",
            "the synthesized tree carries its own ReaL-style labels",
            f"set it to file:{tree}/real.json",
        )


def _check_batch_split(config):
    """The batch split of every checkpoint's fine-tuning jobs (the check lives in protocol.Protocol)."""
    for ck in config["finetune"]["checkpoints"]:
        try:
            checkpoint_protocol(ck).check_batch_split(max(1, matrix.finetune_gpus(config, ck)))  # 0 = CPU
        except PipelineError as e:
            raise WorkflowError(f"the config is not valid: {e} (checkpoint {ck})") from None


validate_against_schema(config, "config.schema.yaml", "the config (" + ", ".join(map(str, workflow.configfiles)) + ")")
config["references"] = load_references(config["references"])


# ---------------------------------------------------------------------------------------------
# Paths: the layout of every file the workflow reads or writes. Each helper takes wildcard
# values, or the wildcard patterns themselves ("{ckpt}") when a rule declares its files.
results_root = config["output_root"]
data_root = config["data_root"]
weights_dir = config["weights_dir"]


def upstream_npz(ckpt):
    """Where synthesize_upstream writes a stand-in checkpoint (the demo's file: URLs point here)."""
    return f"{results_root}/upstream/{ckpt}.npz"


def upstream_data(dataset):
    """Where synthesize_data writes a stand-in dataset tree in ImageNet's on-disk layout (demo)."""
    return f"{results_root}/upstream_data/{dataset}"


def upstream_data_manifest(dataset):
    """Written last by synthesize_data: the tree is complete."""
    return f"{upstream_data(dataset)}/manifest.json"


def weights_file(ckpt, suffix):
    """A released checkpoint's downloaded file: ".npz" or its ".download.json" record."""
    return f"{weights_dir}/{ckpt}{suffix}"


def downloaded_npz(ckpt):
    """The released .npz a checkpoint is converted from (its base_checkpoint's for a higher-resolution one)."""
    return weights_file(matrix.npz_source(config, ckpt), ".npz")


def download_record(ckpt):
    return weights_file(matrix.npz_source(config, ckpt), ".download.json")


def converted_model(ckpt):
    return f"{results_root}/converted/{ckpt}.safetensors"


def parity_record(ckpt):
    return f"{results_root}/converted/{ckpt}.parity.json"


def dataset_json(dataset):
    return f"{data_root}/{dataset}/dataset.json"


def run_file(ckpt, dataset, lr, seed, name):
    """A file of one fine-tuning run: model.safetensors, metrics.jsonl or summary.json."""
    return f"{results_root}/finetune/{ckpt}/{dataset}/lr{lr}_s{seed}/{name}"


def resume_dir(output_file):
    """Resume state of the job writing output_file: deliberately not an output (Snakemake deletes the
    outputs of a failed job), so a rerun continues where the job stopped."""
    relative = os.path.relpath(os.path.dirname(output_file), results_root)
    return f"{results_root}/.resume/{relative}"


def selection_json(ckpt, dataset):
    return f"{results_root}/selection/{ckpt}/{dataset}.json"


def evaluation_json(ckpt, dataset, protocol):
    """The test evaluation of a fine-tuned pair's final model(s) with one protocol."""
    return f"{results_root}/evaluate/{ckpt}/{dataset}/{protocol}.json"


def final_run_file(ckpt, dataset, seed, name):
    """A file of the final run at the selected LR on the whole training data (retrain_on_full_train)."""
    return f"{results_root}/final/{ckpt}/{dataset}/s{seed}/{name}"


def variant_run_file(variant, ckpt, dataset, seed, name):
    return f"{results_root}/variants/{variant}/{ckpt}/{dataset}/s{seed}/{name}"


def variant_evaluation_json(variant, ckpt, dataset):
    return f"{results_root}/variants/{variant}/{ckpt}/{dataset}/evaluation.json"


def sweep_evaluation_json(ckpt, dataset, protocol):
    """Every run of a pair's sweep evaluated on test with one protocol: for the selection-bias table and the
    references made by one sweep run (the official code's), never for selection."""
    return f"{results_root}/sweep_on_test/{ckpt}/{dataset}/{protocol}.json"


def baseline_json(ckpt, dataset, protocol):
    return f"{results_root}/baseline/{ckpt}/{dataset}/{protocol}.json"


def model_stats_json(ckpt):
    """A converted checkpoint's parameter count (Table 1) and inference images/s (Table 3's throughput)."""
    return f"{results_root}/model_stats/{ckpt}.json"


def predictions_file(result_json):
    """Per-image top-5 predictions stored beside an evaluation result (ReaL is computed from them)."""
    return result_json.removesuffix(".json") + ".predictions.npz"


def real_labels_json(dataset):
    return f"{weights_dir}/real_labels/{dataset}.json"


def real_labels_record(dataset):
    return f"{weights_dir}/real_labels/{dataset}.download.json"


def real_json(ckpt, dataset, source, protocol):
    """The ReaL-style top-1 of one (checkpoint, dataset) result, the fine-tuned models' or the released one's,
    from the predictions of its evaluation with one protocol."""
    return f"{results_root}/real/{source}/{ckpt}/{dataset}/{protocol}.json"


def result_json(ckpt, dataset, source, protocol=None):
    """The test result of a (checkpoint, dataset) with a protocol (default: the headline one): its
    evaluation, or the released model's baseline."""
    protocol = protocol or config["evaluation"]["headline_protocol"]
    if source == "finetune":
        return evaluation_json(ckpt, dataset, protocol)
    return baseline_json(ckpt, dataset, protocol)


def aggregate_file(name):
    return f"{results_root}/aggregate/{name}"


def report_file(name):
    return f"{results_root}/report/{name}"


def logs_dir():
    return f"{results_root}/logs"


def log_file(rule, job):
    return f"{logs_dir()}/{rule}/{job}.log"


def benchmark_file(rule, job):
    return f"{results_root}/benchmarks/{rule}/{job}.tsv"


def preflight_json(shape):
    """The preflight of one GPU job shape (matrix.job_shape): what it measured and the micro-batch it chose."""
    return f"{results_root}/preflight/{shape}.json"


def preflight_summary():
    """Every shape's preflight and the plan's ETA (the `preflight` target)."""
    return f"{results_root}/preflight/summary.json"


def shape_preflight(wildcards):
    """The preflight result a GPU job of `wildcards.ckpt` waits for. ancient(): a later preflight (a new node,
    another day) never makes finished jobs run again; a failed one still keeps new jobs from starting."""
    return ancient(preflight_json(matrix.job_shape(config, wildcards.ckpt)))


# The job name of each kind of job in its log and benchmark paths.
RUN_JOB = matrix.RUN_JOB
FINAL_JOB = matrix.FINAL_JOB
VARIANT_JOB = matrix.VARIANT_JOB
PROTOCOL_JOB = matrix.PROTOCOL_JOB
VARIANT_PAIR_JOB = matrix.VARIANT_PAIR_JOB
PAIR_JOB = matrix.PAIR_JOB
REAL_JOB = matrix.REAL_JOB
BASELINE_JOB = matrix.BASELINE_JOB


# ---------------------------------------------------------------------------------------------
# Inputs, params and commands (the only logic the rule files need)
def shape_checkpoint(shape):
    """The checkpoint a shape's preflight measures: its first (they share the body, image size, GPUs)."""
    return matrix.job_shapes(config)[shape][0]


def preflight_input(wildcards):
    """The converted model of the shape's first checkpoint and the dataset its jobs load the hardest."""
    ckpts = matrix.job_shapes(config)[wildcards.shape]
    return {
        "checkpoint": converted_model(ckpts[0]),
        "data": dataset_json(matrix.preflight_dataset(config, ckpts)),
    }


def preflight_gpus():
    """The devices the ETA schedules on: `--resources gpu=N` when given (as the study will run), else
    what the summary step sees (workflow_scripts.preflight counts them)."""
    gpu = getattr(workflow.global_resources.get("gpu"), "value", None)  # a snakemake Resource
    return f"--gpus {gpu}" if isinstance(gpu, int) and gpu > 0 else ""


def as_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def as_ordered_json(obj):
    """JSON keeping the mappings' order: the config as the aggregate reads it (its matrix order is the rules')."""
    return json.dumps(obj, separators=(",", ":"))


def gpu_job(command):
    """A shell command run on the GPUs the job reserves (resources.gpu), through gpu_pool's locks."""
    lock_dir = _escape(config["gpu_lock_dir"])
    # exec: no shell between Snakemake and gpu_pool, so a SIGTERM to the job reaches gpu_pool (which
    # passes it on to fine-tuning, which saves the step it is at) instead of killing a bash first.
    return f"exec python -m workflow_scripts.gpu_pool --gpus {{resources.gpu}} --lock-dir {lock_dir} -- {command}"


def synthesize_input(wildcards):
    return [upstream_npz(wildcards.ckpt)] if "synthesize" in config["checkpoints"][wildcards.ckpt] else []


def synthesize_data_input(wildcards):
    synthesized = "synthesize" in config["datasets"][wildcards.dataset]["source"]
    return [upstream_data_manifest(wildcards.dataset)] if synthesized else []


def download_args(wildcards):
    ck = config["checkpoints"][wildcards.ckpt]
    args = []
    if ck.get("sha256"):
        args += ["--sha256", ck["sha256"]]
    if ck.get("size_mib"):
        args += ["--size-mib", str(ck["size_mib"])]
    return " ".join(args)


def pair_runs(wildcards, name):
    """One file (summary.json or model.safetensors) of every run of a (checkpoint, dataset) sweep."""
    runs = matrix.pair_runs(config, wildcards.ckpt, wildcards.dataset)
    return [run_file(*run, name) for run in runs]


def minival_protocol():
    """The dev-split selection's evaluation protocol: the headline one, with its name (JSON)."""
    name = config["evaluation"]["headline_protocol"]
    return as_json({"name": name, **config["evaluation"]["protocols"][name]})


def checkpoint_protocol(ckpt):
    """The protocol block of a checkpoint's fine-tuning jobs: the study's, with the checkpoint's own
    micro_batch_size where it sets one (memory only: the result does not depend on it beyond rounding)."""
    own = config["checkpoints"][ckpt].get("micro_batch_size")
    return Protocol.from_config({**config["protocol"], **({"micro_batch_size": own} if own else {})})


def eval_protocol(name=None, ckpt=None):
    """An evaluation protocol's config entry as JSON (default: the headline protocol); timm's carries the
    checkpoint's timm_model (the model whose evaluation transform timm builds)."""
    entry = dict(config["evaluation"]["protocols"][name or config["evaluation"]["headline_protocol"]])
    if entry["resize"] == "timm":
        entry["timm_model"] = config["checkpoints"][ckpt]["timm_model"]
    return as_json(entry)


def final_training_data():
    """What the final model of a pair trains on: "full" (train + dev split) or "train" (the sweep's)."""
    return "full" if config["finetune"]["retrain_on_full_train"] else "train"


def variant_protocol(name):
    """The protocol of a variant: the study's protocol block with the variant's overrides."""
    return Protocol.from_config({**config["protocol"], **config["variants"][name]["protocol"]})


def final_models(wildcards):
    """The final model(s) of a pair, one per seed, with their summaries: the runs on the whole training
    data (retrain on), or all runs of the sweep plus the selection that picks among them (retrain off)."""
    ck, ds = wildcards.ckpt, wildcards.dataset
    if config["finetune"]["retrain_on_full_train"]:
        seeds = matrix.final_seeds(config)
        return {
            "models": [final_run_file(ck, ds, s, "model.safetensors") for s in seeds],
            "summaries": [final_run_file(ck, ds, s, "summary.json") for s in seeds],
        }
    return {
        "selection": selection_json(ck, ds),
        "models": pair_runs(wildcards, "model.safetensors"),
        "summaries": pair_runs(wildcards, "summary.json"),
    }


def models_arguments(wildcards, input):
    """evaluate's arguments naming what to evaluate (see final_models)."""
    selection = f"--selection {input.selection} " if hasattr(input, "selection") else ""
    return f"{selection}--models {input.models} --summaries {input.summaries}"


def real_input(wildcards):
    """The predictions, ReaL labels and dataset record a ReaL job reads."""
    result = result_json(wildcards.ckpt, wildcards.dataset, wildcards.source, wildcards.protocol)
    return {
        "predictions": predictions_file(result),
        "labels": real_labels_json(wildcards.dataset),
        "data": dataset_json(wildcards.dataset),
    }


def real_labels_download_args(wildcards):
    expected = config["datasets"][wildcards.dataset]["real_labels"].get("sha256")
    return f"--sha256 {expected}" if expected else ""


def aggregate_inputs(wildcards):
    """Every file the aggregate stage reads, each list in workflow_scripts.matrix order (aggregate pairs them so)."""
    runs = matrix.finetune_runs(config)
    return {
        "summaries": [run_file(*r, "summary.json") for r in runs],
        "metrics": [run_file(*r, "metrics.jsonl") for r in runs],
        # The finetune jobs' benchmark files (wall time, peak RSS -> GPU-hours in the report).
        "finetune_benchmarks": [
            benchmark_file("finetune", RUN_JOB.format(ckpt=ck, dataset=ds, lr=lr, seed=seed))
            for ck, ds, lr, seed in runs
        ],
        "selections": [selection_json(ck, ds) for ck, ds in matrix.pairs(config)],
        "evaluations": [evaluation_json(*e) for e in matrix.evaluations(config)],
        "variant_evaluations": [variant_evaluation_json(*v) for v in matrix.variant_pairs(config)],
        "sweep_evaluations": [sweep_evaluation_json(*e) for e in matrix.sweep_evaluations(config)],
        "baselines": [baseline_json(*b) for b in matrix.baseline_runs(config)],
        "parity": [parity_record(ck) for ck in matrix.used_checkpoints(config)],
        "downloads": [download_record(ck) for ck in matrix.used_checkpoints(config)],
        # dataset.json carries the subset flag the report puts in its headline
        "datasets": [dataset_json(ds) for ds in matrix.used_datasets(config)],
        "model_stats": [model_stats_json(ck) for ck in matrix.used_checkpoints(config)],
        "reals": [real_json(*r) for r in matrix.real_results(config)],
        # The preflight's ETA beside what each job took (ancient: a later preflight reruns no aggregate).
        "job_benchmarks": [benchmark_file(rule, job) for rule, job in eta.planned_jobs(config)],
        "preflight_summary": ancient(preflight_summary()),
    }


# The command line that started this run, for the report's provenance section. An environment
# variable, not a param of the report job: a param would rerun the report whenever the command line
# differs, and jobs Snakemake starts itself (e.g. on SLURM) inherit the original command this way.
os.environ.setdefault("MIXER_COMMAND_LINE", shlex.join(["snakemake"] + sys.argv[1:]))

check_cross_references(config)
