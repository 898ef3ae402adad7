# Config validation and the helpers the rule files use (they stay thin and take paths, params and
# resources from here, each running one `python -m workflow_scripts.<stage>` command).
import json
import os
import shlex
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
import jsonschema

sys.path.insert(0, workflow.basedir)  # the job matrix lives in workflow_scripts/matrix.py (shared with aggregate)
from workflow_scripts import matrix

# Stages are the workflow_scripts package next to this Snakefile; make it importable by every job,
# whatever the working directory (--directory) or environment (--sdm conda, SLURM).
# Without --sdm conda, jobs use the interpreter Snakemake runs in (a .venv works without activating it).
from snakemake.settings.types import DeploymentMethod


def _escape(path):
    return shlex.quote(path).replace("{", "{{").replace("}", "}}")  # the prefix is format-expanded


_prefix = "set -euo pipefail; export PYTHONPATH={}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ".format(_escape(workflow.basedir))
if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    _prefix += "export PATH={}:$PATH; ".format(_escape(str(Path(sys.executable).parent)))
shell.prefix(_prefix)

def config_error(key, problem, fix):
    raise WorkflowError(f"config key '{key}': {problem}. Fix: {fix}")


def validate_against_schema(obj, schema_name, source):
    """Check obj against a JSON schema; every problem becomes one line naming the dotted key."""
    schema = yaml.safe_load((Path(workflow.basedir) / "rules" / "schemas" / schema_name).read_text())
    problems = []
    for err in jsonschema.Draft202012Validator(schema).iter_errors(obj):
        key = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        if err.validator == "additionalProperties":
            allowed = sorted(err.schema.get("properties", {}))
            for extra in sorted(set(err.instance) - set(allowed)):
                k = f"{key}.{extra}" if err.absolute_path else extra
                problems.append(f"config key '{k}' is not known (misspelled?); allowed here: {allowed}")
        elif err.validator == "required":
            problems.append(f"config key '{key}': {err.message}; add it (see config.yaml for an example)")
        else:
            problems.append(f"config key '{key}': {err.message}")
    if problems:
        raise WorkflowError(f"{source} is not valid:\n  " + "\n  ".join(sorted(problems)))


validate_against_schema(config, "config.schema.yaml", "the config (" + ", ".join(map(str, workflow.configfiles)) + ")")


def _workflow_file(path):
    """A path in the config that names a file of the workflow (relative to the Snakefile)."""
    p = Path(path)
    return p if p.is_absolute() else Path(workflow.basedir) / p


def _load_references():
    if isinstance(config["references"], dict):
        return config["references"]
    path = _workflow_file(config["references"])
    if not path.exists():
        config_error("references", f"file {path} does not exist", "point it at report/references.yaml")
    refs = yaml.safe_load(path.read_text())
    validate_against_schema(refs, "references.schema.yaml", str(path))
    for i, fig in enumerate(refs["figures"]):
        if fig["source"] not in refs["sources"]:
            raise WorkflowError(
                f"{path}: figures[{i}] cites source '{fig['source']}', which is not listed under "
                f"'sources'. Fix: add it there with its citation."
            )
    return refs


config["references"] = _load_references()


def _check_cross_references():
    ckpts, dsets = config["checkpoints"], config["datasets"]
    for key, names, known in (
        ("finetune.checkpoints", config["finetune"]["checkpoints"], ckpts),
        ("finetune.datasets", config["finetune"]["datasets"], dsets),
        ("resources.finetune_gpu_overrides", config["resources"]["finetune_gpu_overrides"], ckpts),
    ):
        for name in names:
            if name not in known:
                config_error(key, f"'{name}' is not defined", f"define it or use one of {sorted(known)}")
    for i, entry in enumerate(config["evaluation"]["baseline"]):
        if entry["checkpoint"] not in ckpts:
            config_error(f"evaluation.baseline[{i}].checkpoint", f"'{entry['checkpoint']}' is not defined",
                         f"use one of {sorted(ckpts)}")
        if entry["dataset"] not in dsets:
            config_error(f"evaluation.baseline[{i}].dataset", f"'{entry['dataset']}' is not defined",
                         f"use one of {sorted(dsets)}")
    for name, ds in dsets.items():
        if ds["eval_protocol"] not in config["evaluation"]["protocols"]:
            config_error(f"datasets.{name}.eval_protocol", f"'{ds['eval_protocol']}' is not a protocol",
                         f"use one of {sorted(config['evaluation']['protocols'])}")
    for name, ck in ckpts.items():
        if "synthesize" in ck and ck["url"] != f"file:{synthesized_path(name)}":
            config_error(f"checkpoints.{name}.url", "a synthesized checkpoint is fetched from the file "
                         "synthesize_upstream writes", f"set it to file:{synthesized_path(name)}")
    p = config["protocol"]
    if p["batch_size"] % p["micro_batch_size"]:
        config_error("protocol.micro_batch_size", f"{p['micro_batch_size']} does not divide "
                     f"protocol.batch_size {p['batch_size']}", "choose a divisor of the batch size")
    accum = p["batch_size"] // p["micro_batch_size"]
    for ck in config["finetune"]["checkpoints"]:
        gpus = matrix.finetune_gpus(config, ck)
        if gpus > 1 and accum % gpus:
            config_error("protocol.micro_batch_size", f"{accum} micro-batches per step cannot be shared "
                         f"evenly by the {gpus} GPUs of checkpoint {ck}",
                         "pick a micro-batch size that makes batch_size/micro_batch_size a multiple of the GPU count")


# ---------------------------------------------------------------------------------------------
# Paths
R = config["output_root"]
D = config["data_root"]
W = config["weights_dir"]


def results_root_of(path):
    """output_root, recovered from a file two levels below it (R/<stage>/<file>)."""
    return str(Path(path).parent.parent)


def synthesized_path(ckpt):
    return f"{R}/upstream/{ckpt}.npz"


def run_dir(ckpt, dataset, lr, seed):
    return f"{R}/finetune/{ckpt}/{dataset}/lr{lr}_s{seed}"


# ---------------------------------------------------------------------------------------------
# Inputs and params (the only logic the rule files need)
def as_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def synthesize_input(wildcards):
    return [synthesized_path(wildcards.ckpt)] if "synthesize" in config["checkpoints"][wildcards.ckpt] else []


def download_args(wildcards):
    ck = config["checkpoints"][wildcards.ckpt]
    args = []
    if ck.get("sha256"):
        args += ["--sha256", ck["sha256"]]
    if ck.get("size_mib"):
        args += ["--size-mib", str(ck["size_mib"])]
    return " ".join(args)


def summaries_of_pair(wildcards):
    f = config["finetune"]
    return [
        f"{run_dir(wildcards.ckpt, wildcards.dataset, matrix.lr_str(lr), seed)}/summary.json"
        for lr in f["base_lrs"]
        for seed in f["seeds"]
    ]


def models_of_pair(wildcards):
    return [s.replace("summary.json", "model.safetensors") for s in summaries_of_pair(wildcards)]


def eval_protocol_of(dataset):
    name = config["datasets"][dataset]["eval_protocol"]
    return name, as_json(config["evaluation"]["protocols"][name])


def aggregate_inputs(wildcards):
    """Every file the aggregate stage reads, each list in workflow_scripts.matrix order (aggregate pairs them so)."""
    runs = matrix.finetune_runs(config)
    return {
        "summaries": [f"{run_dir(*r)}/summary.json" for r in runs],
        "metrics": [f"{run_dir(*r)}/metrics.jsonl" for r in runs],
        # The finetune rule's own benchmark: files (wall time, peak RSS -> GPU-hours in the report).
        "finetune_benchmarks": [
            rules.finetune.benchmark.format(ckpt=ck, dataset=ds, lr=lr, seed=seed) for ck, ds, lr, seed in runs
        ],
        "selections": [f"{R}/selection/{ck}/{ds}.json" for ck, ds in matrix.pairs(config)],
        "evaluations": [f"{R}/evaluate/{ck}/{ds}.json" for ck, ds in matrix.pairs(config)],
        "baselines": [f"{R}/baseline/{ck}/{ds}/{p}.json" for ck, ds, p in matrix.baseline_runs(config)],
        "parity": [f"{R}/converted/{ck}.parity.json" for ck in matrix.used_checkpoints(config)],
        "downloads": [f"{W}/{ck}.download.json" for ck in matrix.used_checkpoints(config)],
        # dataset.json carries the subset flag the report puts in its headline
        "datasets": [f"{D}/{ds}/dataset.json" for ds in matrix.used_datasets(config)],
    }




# The command line that started this run, for the report's provenance section. An environment
# variable, not a param of the report job: a param would rerun the report whenever the command line
# differs, and jobs Snakemake starts itself (e.g. on SLURM) inherit the original command this way.
os.environ.setdefault("MIXER_COMMAND_LINE", shlex.join(["snakemake"] + sys.argv[1:]))

_check_cross_references()

