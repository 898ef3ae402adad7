"""The reference figures (config key `references`: report/references.yaml, or a list of such files merged in
order), loaded and checked against rules/schemas/references.schema.yaml, their sources and the config's
evaluation protocols. The workflow loads them once (rules/common.smk); `load_config` gives a test or a stage
run by hand the same config the rules see.

Kept free of heavy imports: Snakemake imports this module when it parses the workflow.
"""
from __future__ import annotations

from pathlib import Path

import jsonschema
import yaml

from workflow_scripts.common import PipelineError

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "rules" / "schemas" / "references.schema.yaml"


def schema_problems(refs: dict) -> list[str]:
    schema = yaml.safe_load(SCHEMA.read_text())
    return sorted(f"'{'.'.join(map(str, e.absolute_path)) or '(top level)'}': {e.message}"
                  for e in jsonschema.Draft202012Validator(schema).iter_errors(refs))


def check_sources(refs: dict, path: str, protocols: dict) -> None:
    """Every figure cites a listed source; every source's protocol is one of the config's, timm's only for a
    released model."""
    for i, fig in enumerate(refs["figures"] + refs.get("models", [])):
        if fig["source"] not in refs["sources"]:
            raise PipelineError(f"{path}: figure {i} ({fig['label']}) cites source '{fig['source']}', which is not "
                                "listed under 'sources'. Fix: add it there with its citation.")
    for name, src in refs["sources"].items():
        protocol, result = src["made_by"]["protocol"], src["made_by"]["result"]
        if protocol is not None and protocol not in protocols:
            raise PipelineError(f"{path}: sources.{name}.made_by.protocol '{protocol}' is not a protocol of config key "
                                f"'evaluation.protocols' ({sorted(protocols)}). Fix: add the protocol there or "
                                "correct the name.")
        if protocol is not None and protocols[protocol].get("resize") == "timm" and result != "released":
            raise PipelineError(f"{path}: sources.{name}.made_by uses timm's transform '{protocol}' for a {result} "
                                "result; it applies to released checkpoints only. Fix: result: released, or another "
                                "protocol.")


def load_file(path: Path, protocols: dict) -> dict:
    if not path.exists():
        raise PipelineError(f"config key 'references': file {path} does not exist. Fix: point it at "
                            "report/references.yaml")
    refs = yaml.safe_load(path.read_text())
    problems = schema_problems(refs)
    if problems:
        raise PipelineError(f"{path} is not valid:\n  " + "\n  ".join(problems))
    check_sources(refs, str(path), protocols)
    return refs


def merge(parts: list[dict], paths: list[str]) -> dict:
    """Several reference files as one: sources (each defined once), figures, models and primary, in order."""
    merged: dict = {"sources": {}, "figures": [], "primary": {}, "models": []}
    for part, path in zip(parts, paths):
        twice = sorted(set(merged["sources"]) & set(part["sources"]))
        if twice:
            raise PipelineError(f"config key 'references': {path} defines source(s) {twice} again. Fix: define each "
                                "source in one file")
        merged["sources"].update(part["sources"])
        merged["figures"] += part["figures"]
        merged["models"] += part.get("models", [])
        merged["primary"].update(part["primary"])
        if part.get("throughput_baseline") and "throughput_baseline" not in merged:
            merged["throughput_baseline"] = part["throughput_baseline"]
    return merged


def load(value, base_dir: str | Path, protocols: dict) -> dict:
    """The config's `references` loaded: a mapping as it is, a path (relative to base_dir, the workflow's
    folder) or a list of paths merged."""
    if isinstance(value, dict):
        return value
    paths = value if isinstance(value, list) else [value]
    parts = [load_file(Path(p) if Path(p).is_absolute() else Path(base_dir) / p, protocols) for p in paths]
    return parts[0] if isinstance(value, str) else merge(parts, paths)


def load_config(path: str | Path, base_dir: str | Path = REPO) -> dict:
    """A config file as the rules see it: YAML with its references loaded (no other validation)."""
    config = yaml.safe_load(Path(path).read_text())
    config["references"] = load(config["references"], base_dir, config["evaluation"]["protocols"])
    return config
