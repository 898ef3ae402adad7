"""Each reference figure beside the reproduction made the way that figure was made.

report/references.yaml gives every source a `made_by`: which of our results was made its way (`result`)
and with which evaluation protocol (`protocol`):
- final: the pair's final runs at the selected LR, mean over finetune.final_seeds (the paper's Table 3);
- sweep_run: the LR sweep's run(s) at `base_lr`, trained on the dev-split remainder, evaluated on test
  (the official code's README figures: one run at LR 0.03 on 98% of train);
- released: the released checkpoint evaluated as it is (timm's results table, with timm's transform);
- as_reported: no run of ours is made that way (the earlier study).
A figure gets a verdict only against the reproduction that matches it; a source whose protocol is not
stated or not ours gets "no protocol match" (our headline figure is shown for orientation, no verdict).

Pure functions over the aggregate's records (workflow_scripts.aggregate.this_run); no file is read here.
"""
from __future__ import annotations

from workflow_scripts.matrix import lr_str, used_checkpoints, used_datasets
from workflow_scripts.stats import Interval, top1_interval, verdict
from workflow_scripts.tables import NOT_RUN, real_label

NO_MATCH = "no protocol match"


def checkpoint_of(config: dict, label: str, pretraining: str, image_size: int) -> str | None:
    """The used checkpoint with this label, pre-training and image size (None: not in this study)."""
    for ck in used_checkpoints(config):
        c = config["checkpoints"][ck]
        if (c["label"], c["pretraining"], c["architecture"]["image_size"]) == (label, pretraining, image_size):
            return ck
    return None


def column_of(config: dict, column: str) -> tuple[str, str] | None:
    """(kind, dataset or average name) of a Table 3 column label; None where this config has no such column."""
    for ds in used_datasets(config):
        label = config["datasets"][ds]["label"]
        if column == label:
            return "dataset", ds
        if column == real_label(label) and config["datasets"][ds].get("real_labels"):
            return "real", ds
    return ("average", column) if column in config["averages"] else None


def result_record(ours: dict, ck: str, kind: str, name: str, result_from: str) -> dict | None:
    """Our record of a (checkpoint, column) made as `result_from` ("finetune" or "released")."""
    if kind == "average":
        return ours["averages"].get((ck, name)) if result_from == "finetune" else None
    return ours["reals" if kind == "real" else "results"].get((ck, name, result_from))


def sweep_figure(sweeps: dict, ck: str, ds: str, protocol: str, base_lr: float) -> dict | None:
    """The sweep run(s) at base_lr evaluated with `protocol`: {per_seed, seeds, top1_mean, ...}."""
    record = sweeps.get((ck, ds, protocol))
    if record is None:
        return None
    runs = sorted((r for r in record["runs"] if lr_str(float(r["lr"])) == lr_str(base_lr)), key=lambda r: r["seed"])
    if not runs:
        return None
    interval = top1_interval([r["top1"] for r in runs], record["num_images"])
    return {"per_seed": [r["top1"] for r in runs], "seeds": [r["seed"] for r in runs], "top1_mean": interval.value,
            "ci_low": interval.low, "ci_high": interval.high, "ci_method": interval.method,
            "top1_std": record.get("top1_std") if len(runs) > 1 else None,
            "runs_text": f"sweep run at LR {lr_str(base_lr)}, " + ", ".join(f"s{r['seed']}" for r in runs)}


def runs_text(record: dict, result_from: str) -> str:
    if result_from == "released":
        return "released model, as it is"
    seeds = ", ".join(f"s{s}" for s in record.get("seeds") or [])
    if record["kind"] == "average":
        return f"final runs ({record['coverage']} datasets averaged), seeds {seeds}"
    return f"final runs {seeds} at LR {record['selected_lr']:g}" if record.get("selected_lr") else f"final runs {seeds}"


def reproduction(config: dict, ours: dict, sweeps: dict, fig: dict) -> tuple[dict | None, str | None]:
    """(our figure made the way `fig`'s source made it, or None; why none where it matters)."""
    made_by = config["references"]["sources"][fig["source"]]["made_by"]
    ck = checkpoint_of(config, fig["label"], fig["pretraining"], fig["image_size"])
    column = column_of(config, fig["dataset"])
    if ck is None or column is None:
        return None, NOT_RUN
    kind, name = column
    result, protocol = made_by["result"], made_by["protocol"]
    if result == "sweep_run":
        found = sweep_figure(sweeps, ck, name, protocol, made_by["base_lr"]) if kind == "dataset" else None
        return ({**found, "checkpoint": ck}, None) if found else (None, NOT_RUN)
    result_from = "released" if result == "released" else "finetune"
    record = result_record(ours, ck, kind, name, result_from)
    if record is None or record["status"] != "run":
        return None, NOT_RUN
    known = protocol is not None and result != "as_reported"
    fig_at = record["protocols"].get(protocol if known else record["eval_protocol"])
    if fig_at is None or fig_at["top1_mean"] is None:
        return None, NOT_RUN
    metric = "top5_mean" if fig["metric"] == "top5" else "top1_mean"
    found = {**fig_at, "top1_mean": fig_at.get(metric), "checkpoint": ck, "seeds": record.get("seeds"),
             "runs_text": runs_text(record, result_from)}
    if metric == "top5_mean":  # the interval is the top-1's; a top-5 gets its own Wilson interval
        found.update(_top5_interval(fig_at, record))
    return found, (None if known else NO_MATCH)


def _top5_interval(fig_at: dict, record: dict) -> dict:
    if fig_at.get("top5_mean") is None or not record.get("num_images"):
        return {"ci_low": None, "ci_high": None, "ci_method": None, "per_seed": []}
    interval = top1_interval(fig_at.get("top5_per_seed") or [fig_at["top5_mean"]], record["num_images"])
    return {"ci_low": interval.low, "ci_high": interval.high, "ci_method": interval.method,
            "per_seed": fig_at.get("top5_per_seed") or [fig_at["top5_mean"]]}


def comparison_row(config: dict, ours: dict, sweeps: dict, fig: dict) -> dict:
    """One row of comparison.csv: a reference figure, how it was made, the run(s) matched, the verdict."""
    refs = config["references"]
    source = refs["sources"][fig["source"]]
    found, why = reproduction(config, ours, sweeps, fig)
    row = {"source": fig["source"], "citation": source["citation"], "source_protocol": source["made_by"],
           "source_protocol_note": source["protocol_note"], "model": fig["label"], "pretraining": fig["pretraining"],
           "image_size": fig["image_size"], "column": fig["dataset"],
           "kind": (column_of(config, fig["dataset"]) or (None,))[0], "metric": fig["metric"],
           "reference_value": fig["value"], "is_primary": refs["primary"].get(fig["dataset"]) == fig["source"],
           "matched_result": None, "matched_protocol": None, "matched_runs": None, "checkpoint": None,
           "per_seed": [], "ours": None, "ours_std": None, "ci_low": None, "ci_high": None, "ci_method": None,
           "diff": None, "verdict": why}
    if found is None:
        return row
    made_by = source["made_by"]
    row.update(matched_result=made_by["result"] if why is None else None,
               matched_protocol=made_by["protocol"] if why is None else None, matched_runs=found["runs_text"],
               checkpoint=found["checkpoint"], per_seed=list(found.get("per_seed") or []), ours=found["top1_mean"],
               ours_std=found.get("top1_std"), ci_low=found["ci_low"], ci_high=found["ci_high"],
               ci_method=found["ci_method"], diff=found["top1_mean"] - fig["value"])
    if why is None and found["ci_low"] is not None:
        row["verdict"], _ = verdict(fig["value"], _interval(found))
    return row


def _interval(found: dict) -> Interval:
    return Interval(found["top1_mean"], found["ci_low"], found["ci_high"], found["ci_method"])


def build_comparison(config: dict, ours: dict, sweeps: dict) -> list[dict]:
    """comparison.csv: one row per reference figure, in references.yaml order."""
    return [comparison_row(config, ours, sweeps, fig) for fig in config["references"]["figures"]]


def verdict_counts(comparison: list[dict]) -> dict:
    """How the primary figures (references.yaml `primary`) fared: consistent, below, above, not run."""
    verdicts = [r["verdict"] for r in comparison if r["is_primary"]]
    return {"published": len(verdicts), **{v: verdicts.count(v) for v in ("consistent", "below", "above", NOT_RUN)}}
