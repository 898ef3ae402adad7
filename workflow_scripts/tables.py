"""Table formatting: summary.json -> the report's tables, comparison.md, comparison.tex and CSV rows.

Pure functions of what the aggregate stage assembles (summary.json, docs/design.md: `results`, `comparison`,
`table3_rows`, `table3_columns`, `selection_bias`, `variants`); they read no file and know no results layout.
The tables, in the order the report shows them:
- Table 3 as Tolstikhin et al. 2021 print it: rows (pre-training, model, image size), columns ImNet, ReaL and
  Avg5; each cell ours (mean ± s.d. of the final runs, headline protocol) beside the paper's figure and the
  verdict (headline_grid);
- the per-dataset figures with every other reference of the cell, each against the run made its way
  (dataset_grid); the released models evaluated as they are, apart (released_grid);
- each final run's figure with the s.d. beside the paper's bound (seed_cells); every evaluation protocol
  (protocol_cells); every reference figure with its source, protocol and matched run(s) (comparison_cells);
- what explains a gap: protocol variants (variant_cells) and selection bias, one table (selection_bias_cells).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from workflow_scripts.common import atomic_path

# The status of a result or reference the config did not run.
NOT_RUN = "not run"
# The status of a named average some of whose members have no result (its cell shows "k of N", no number).
PARTIAL = "partial"
# A reference whose protocol no run of ours matches (as reported, or not stated): ours shown, no verdict.
NO_PROTOCOL_MATCH = "no protocol match"
# Every verdict of a comparison row (workflow_scripts.stats.verdict and the matching), in legend order.
VERDICTS = ("consistent", "below", "above", NOT_RUN, NO_PROTOCOL_MATCH)
# The verdicts of a reference figure this run did not reproduce.
NOT_REPRODUCED = ("below", "above")
# The column of a dataset's ReaL-style top-1 is named after the dataset (references.yaml: "ImageNet ReaL").
REAL_SUFFIX = " ReaL"
# Table 3's own column headers for our column labels.
PAPER_COLUMN_NAMES = {"ImageNet": "ImNet", "ImageNet ReaL": "ReaL"}
# Table 3 caption: "Mixer and ViT models are averaged over three fine-tuning runs, standard deviations are
# smaller than 0.15" (summary.json `paper_sd_bound`).
PAPER_SD_SOURCE = "Table 3 caption: “standard deviations are smaller than 0.15”"

# What each evaluation protocol is, with its source (config evaluation.protocols names them so).
PROTOCOL_DESCRIPTIONS = {
    "resmall_crop": "resmall-crop: the shorter side resized to 256 px, then the central 224 × 224 crop "
                    "(Appendix C (3)(ii): the protocol of Table 3; the same ratio at other sizes)",
    "resize_crop": "resize-crop: resized to 256 × 256 px, then the central 224 × 224 crop (Appendix C (3)(i): "
                   "the protocol of Table 2)",
    "official": "the official code's plain resize to the model's size (google-research/vision_transformer "
                "vit_jax/input_pipeline.py; its README's CIFAR-10 figures)",
    "timm": "timm's own evaluation transform for the released model (timm.data.resolve_data_config and "
            "create_transform; timm's results table)",
}
# The interpolation of every resize but timm's (the paper does not name it; config evaluation).
INTERPOLATION_ASSUMPTION = ("every resize is bilinear without antialiasing (TensorFlow's default): our assumption, "
                            "the paper does not name the interpolation")
INTERPOLATION_SHORT = "bilinear without antialiasing: our assumption"
# The protocol's sources, in the paper's words (the report's protocol section and comparison.md say them).
PROTOCOL_SOURCES = (
    "Fine-tuning follows the paper's Appendix C (“We follow the setup of [14]”, [14] = ViT, Dosovitskiy et al. "
    "2021): the LR is chosen on a held-out dev split from {0.003, 0.01, 0.03, 0.06} (Appendix C (1): “We exclude "
    "lr = 0.001 from the grid search and instead include lr = 0.06 for CIFAR-10, CIFAR-100, Flowers, and Pets”), "
    "then trained on the entire training split; Table 3's figures are “averaged over three fine-tuning runs”.",
    "Inception crop: Appendix A.2 says it “did not lead to any improvements” in experiments with JFT-300M "
    "pre-trained models; the official code applies it; we keep it on.",
    "Datasets: section 3.1 names the five downstream datasets (ImageNet, CIFAR-10, CIFAR-100, Oxford-IIIT Pets, "
    "Oxford Flowers-102; Table 3 prints only ImNet, ReaL and their average Avg5). Pets has 37 classes (the "
    "paper's “36” is a typo).",
)

# What a Table 3 cell holds (comparison.md, comparison.tex and the report say it in these words).
TABLE3_LEGEND = ("Top-1 accuracy (%) on the test split, shaped like Table 3 of Tolstikhin et al. 2021 "
                 "(arXiv:2105.01601): rows (pre-training, model, image size), columns ImNet, ReaL and Avg5. "
                 "Each cell: ours, the mean ± s.d. over the final fine-tuning runs evaluated with the headline "
                 "protocol (“k of N” for an average some of whose members were not run), beside the paper's "
                 "figure and the verdict: “consistent” (the paper's figure lies in our 95% interval), “below” / "
                 "“above” (our whole interval lies below / above it), “not run” (this config did not run it).")
# What the interval covers (workflow_scripts.stats; the README says more).
INTERVAL_LEGEND = ("95% interval: Wilson score interval over the test images (the same images for every seed), "
                   "with two or more seeds combined in quadrature with a Student-t interval over the seeds; ReaL: "
                   "Wilson over the images with a ReaL label; an average: its members' half-widths combined as "
                   "sqrt(sum of squares) / k. It does not cover the published figure's own uncertainty (unknown), "
                   "nor seed variance where there is one seed.")
RELEASED_LEGEND = ("As released: the released checkpoint evaluated as it is, not fine-tuned by us. Never a Table 3 "
                   "figure (Table 3's rows are fine-tuned models); compared only with references made the same "
                   "way (timm's results table, a user's evaluation), each at its own protocol.")


# ---------------------------------------------------------------------------------------------
# Protocols, sources and sentences
def eval_protocol_records(protocols: dict, headline: str) -> list[dict]:
    """summary.json's `eval_protocols`: [{"name", "settings", "headline", "note"}] in config order; the note
    says what the protocol is and where it comes from (PROTOCOL_DESCRIPTIONS; the name for another)."""
    return [{"name": name, "settings": settings, "headline": name == headline,
             "note": PROTOCOL_DESCRIPTIONS.get(name, name)} for name, settings in protocols.items()]


def other_protocol_names(eval_protocols: list[dict]) -> list[str]:
    return [p["name"] for p in eval_protocols if not p["headline"]]


def protocol_sentence(eval_protocols: list[dict]) -> str:
    """Which evaluation protocol the headline uses, what it is, and the interpolation assumption."""
    headline = next(p for p in eval_protocols if p["headline"])
    others = ", ".join(f"`{name}`" for name in other_protocol_names(eval_protocols))
    return (f"Headline evaluation protocol: `{headline['name']}`, {headline['note']}"
            + (f"; also evaluated: {others}" if others else "") + f". {INTERPOLATION_ASSUMPTION[0].upper()}"
            + f"{INTERPOLATION_ASSUMPTION[1:]}.")


def citation(refs: dict, source: str) -> str:
    """A source's citation (references.yaml `sources`: {key: {citation, made_by, protocol_note}})."""
    entry = refs["sources"][source]
    return entry["citation"] if isinstance(entry, dict) else str(entry)


def made_by_text(made_by: dict | None) -> str:
    """How a source made its figures (a comparison row's `source_protocol`), in words."""
    if not made_by:
        return "not stated"
    result = {"final": "final runs at the selected LR (mean)", "released": "the released model as it is",
              "as_reported": "as reported (its own fine-tuning)",
              "sweep_run": f"one sweep run at LR {made_by.get('base_lr') or 0:g}"}.get(made_by["result"],
                                                                                 made_by["result"])
    return f"{result}; {made_by.get('protocol') or 'protocol not stated'}"


def format_interval(low: float | None, high: float | None) -> str:
    return "" if low is None else f"95% CI {low:.2f}–{high:.2f}"


def format_figure(value: float | None, low: float | None, high: float | None) -> str:
    """A figure with its interval on one line: "74.90 [73.10, 76.50]"."""
    if value is None:
        return ""
    return f"{value:.2f}" if low is None else f"{value:.2f} [{low:.2f}, {high:.2f}]"


def format_reference(value) -> str:
    """A published figure as printed (two decimals, more where the source gives more: 76.616)."""
    if value is None:
        return ""
    text = f"{value:.2f}"
    return text if float(text) == value else repr(value)


def format_cell(value, digits: int = 2) -> str:
    """One value of an HTML table cell: floats rounded, booleans as yes/no, a missing value as a dash."""
    if value is None or value == "":
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={format_cell(v, digits)}" for k, v in value.items())
    return str(value)


def format_ours(result: dict | None) -> str:
    """Our figure of a result: "80.12 ± 0.08" (mean ± s.d. over the final seeds), "k of N", or "not run"."""
    if result is None or result["status"] == NOT_RUN:
        return NOT_RUN
    if result["status"] == PARTIAL:
        return result["coverage"]
    spread = f" ± {result['top1_std']:.2f}" if result.get("top1_std") is not None else ""
    return f"{result['top1_mean']:.2f}{spread}" + (" (subset)" if result.get("subset") else "")


def seeds_text(result: dict | None) -> str:
    """How many runs a figure is the mean of: "3 runs", "1 run", "released"."""
    if result is None or result["status"] != "run":
        return ""
    if result["result_from"] == "released":
        return "released model"
    runs = len(result.get("seeds") or []) or result.get("num_seeds") or 0  # an average: its members' seeds
    return f"{runs} run{'s' if runs != 1 else ''}"


def verdict_sentence(counts: dict) -> str:
    """The headline's count (summary.json `verdicts`) in words."""
    not_reproduced = sum(counts[v] for v in NOT_REPRODUCED)
    return (f"Of {counts['published']} published figures (each cell's primary reference), {counts['consistent']} "
            f"{'was' if counts['consistent'] == 1 else 'were'} reproduced (consistent: inside our 95% "
            f"interval), {not_reproduced} not ({counts['below']} below, {counts['above']} above), and "
            f"{counts[NOT_RUN]} {'was' if counts[NOT_RUN] == 1 else 'were'} not run by this config.")


def training_sentence(trained_on: str, final_seeds: list[int] = ()) -> str:
    """What the final (tested) models were trained on (summary.json `final_models_trained_on`, `final_seeds`)."""
    seeds = (f", once per final seed ({', '.join(map(str, final_seeds))}); our figure is their mean, as Table 3's "
             "is the mean of three fine-tuning runs") if final_seeds else ""
    if trained_on == "full":
        return ("The final models were trained at the selected learning rate on the entire training split "
                f"(training + dev split){seeds} (finetune.retrain_on_full_train: true).")
    return ("The final models are the dev-split runs: the LR sweep's runs at the selected learning rate, trained "
            f"without the held-out dev split{seeds} (finetune.retrain_on_full_train: false).")


def real_label(dataset_label: str) -> str:
    """The column label of a dataset's ReaL-style top-1: "ImageNet" -> "ImageNet ReaL"."""
    return dataset_label + REAL_SUFFIX


def reference_sources(refs: dict, metric: str) -> list[str]:
    """Sources (in references.yaml order) that publish at least one figure of this metric."""
    cited = {f["source"] for f in refs["figures"] if f["metric"] == metric}
    return [s for s in refs["sources"] if s in cited]


def paper_column_name(label: str) -> str:
    """Table 3's header for a column ("ImageNet" -> "ImNet"), else the label."""
    return PAPER_COLUMN_NAMES.get(label, label)


# ---------------------------------------------------------------------------------------------
# The Table 3 grids
def table3_columns(config_columns: list[dict], reference_labels: list[str]) -> list[dict]:
    """Every column of the Table 3 grid, in the paper's order: each dataset with a ReaL column followed by
    it, then the named averages, then the other datasets ([{"label", "kind"}]).

    `config_columns`: the columns the config defines, kind "dataset", "real" or "average"; `reference_labels`:
    the datasets of references.yaml's figures. A label only the references use is a ReaL column when it is
    "<another label> ReaL", else kind None (the config does not say what it is: an other dataset). Within a
    group, columns come in the order of the references, then of the config.
    """
    kinds = dict.fromkeys(reference_labels)
    kinds.update({c["label"]: c["kind"] for c in config_columns})
    order = list(kinds)
    for label in order:
        if kinds[label] is None and label.endswith(REAL_SUFFIX) and label.removesuffix(REAL_SUFFIX) in kinds:
            kinds[label] = "real"

    def base(label: str) -> str:
        return label.removesuffix(REAL_SUFFIX) if kinds[label] == "real" else label

    with_real = {base(label) for label in order if kinds[label] == "real"}

    def position(label: str) -> tuple:
        group = 0 if base(label) in with_real else 1 if kinds[label] == "average" else 2
        return group, order.index(base(label)), kinds[label] == "real"

    return [{"label": label, "kind": kinds[label]} for label in sorted(order, key=position)]


def headline_columns(columns: list[dict]) -> list[dict]:
    """Table 3's columns: each dataset with a ReaL column, its ReaL column and the averages (ImNet, ReaL, Avg5)."""
    with_real = {c["label"].removesuffix(REAL_SUFFIX) for c in columns if c["kind"] == "real"}
    return [c for c in columns if c["kind"] in ("real", "average") or c["label"] in with_real]


def dataset_columns(columns: list[dict]) -> list[dict]:
    """The per-dataset columns (ImageNet, CIFAR-10, CIFAR-100, Pets, Flowers in the study)."""
    return [c for c in columns if c["kind"] not in ("real", "average")]


def row_key(item: dict) -> tuple:
    """(model, pre-training, image size) of a result, a Table 3 row or a comparison row."""
    return item.get("label") or item["model"], item["pretraining"], item["image_size"]


def reference_line(ref: dict, refs: dict, headline_protocol: str) -> dict:
    """One reference figure in a cell: its source, value, verdict and, where that is not the cell's own figure
    (the final runs at the headline protocol), the run it was compared with and that run's figure."""
    own = ref["matched_result"] == "final" and ref["matched_protocol"] == headline_protocol
    matched = "" if own or not ref["matched_runs"] else ", ".join(filter(None, [
        f"ours {ref['ours']:.2f}" if ref["ours"] is not None else "", ref["matched_runs"], ref["matched_protocol"]]))
    return {"source": ref["source"], "citation": citation(refs, ref["source"]),
            "value": format_reference(ref["reference_value"]), "verdict": ref["verdict"], "matched": matched,
            "diff": "" if ref["diff"] is None else f"{ref['diff']:+.2f}", "primary": ref["is_primary"]}


def grid_cell(result: dict | None, refs_of_cell: list[dict], refs: dict, headline_protocol: str) -> dict:
    """One cell: ours, how many runs, the references shown in it (reference_line) and the primary's verdict."""
    lines = [reference_line(r, refs, headline_protocol) for r in refs_of_cell]
    primary = next((line for line in lines if line["primary"]), None)
    status = NOT_RUN if result is None else result["status"]
    return {"status": status, "ours": format_ours(result), "runs": seeds_text(result),
            "interval": "" if result is None else format_interval(result.get("ci_low"), result.get("ci_high")),
            "references": lines, "primary": primary, "verdict": primary["verdict"] if primary else None}


def grid(summary: dict, result_from: str, columns: list[dict], keep, rows_of: str = "all") -> dict:
    """The grid of the Table 3 rows made `result_from` over `columns`: {"columns", "rows": [{"label",
    "pretraining", "image_size", "cells"}]}; `keep(comparison row)` picks the references each cell shows.
    Rows (`rows_of`): "config", this config's (summary.json `table3_rows`); "published", the configurations
    only a reference has (not run here); "all", both. Columns where no row has a result or a reference are
    left out."""
    results = {(*row_key(r), r["column"]): r for r in summary["results"] if r["result_from"] == result_from}
    references: dict[tuple, list[dict]] = {}
    for ref in summary["comparison"]:
        if ref["metric"] == "top1" and keep(ref):
            references.setdefault((*row_key(ref), ref["column"]), []).append(ref)
    ours = [r for r in summary["table3_rows"] if r["result_from"] == result_from]
    labels = {c["label"] for c in columns}
    published = [dict(zip(("label", "pretraining", "image_size"), key), result_from=result_from)
                 for key in dict.fromkeys(k[:3] for k in references if k[3] in labels)
                 if key not in {row_key(r) for r in ours}]
    rows = {"config": ours, "published": published, "all": ours + published}[rows_of]
    shown = [c for c in columns if any((*row_key(r), c["label"]) in results or (*row_key(r), c["label"])
                                       in references for r in rows)]
    return {"columns": shown,
            "rows": [{"label": r["label"], "pretraining": r["pretraining"], "image_size": r["image_size"],
                      "cells": [grid_cell(results.get((*row_key(r), c["label"])),
                                          references.get((*row_key(r), c["label"]), []), summary["references"],
                                          summary["headline_protocol"])
                                for c in shown]} for r in rows]}


def is_table3_reference(ref: dict) -> bool:
    """A Table 3 cell's reference: the column's primary one, made from final runs (or not run here)."""
    return ref["is_primary"] and ref["matched_result"] in ("final", None)


def headline_grid(summary: dict) -> dict:
    """Table 3 as the paper prints it, for this config's fine-tuned rows: columns ImNet, ReaL, Avg5, each cell
    ours beside the column's primary reference (the paper's figure) and its verdict."""
    return grid(summary, "finetune", headline_columns(summary["table3_columns"]), is_table3_reference, "config")


def headline_not_run_grid(summary: dict) -> dict:
    """Table 3's published configurations this config did not run (a subset, the demo): every cell "not run"."""
    return grid(summary, "finetune", headline_columns(summary["table3_columns"]), is_table3_reference, "published")


def dataset_grid(summary: dict) -> dict:
    """The per-dataset figures of this config's fine-tuned rows, each cell with every reference of the cell that
    is not a released model's, each against the run made its way (the others: the comparison section)."""
    return grid(summary, "finetune", dataset_columns(summary["table3_columns"]),
                lambda ref: ref["source_protocol"].get("result") != "released", "config")


def released_grid(summary: dict) -> dict:
    """The released models as they are ("as released" rows), with the references made from released models."""
    return grid(summary, "released", summary["table3_columns"],
                lambda ref: ref["source_protocol"].get("result") == "released")


# ---------------------------------------------------------------------------------------------
# The tables beside Table 3
def sd_against_bound(std: float | None, bound: float) -> str:
    """Our s.d. over the final runs against the paper's bound: "< 0.15: yes" / "no" (none for one run)."""
    if std is None:
        return "– (one run)"
    return f"yes (< {bound:g})" if std < bound else f"no (≥ {bound:g})"


def seed_cells(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Each final run's figure (one column per final seed), the mean, the s.d. beside the paper's bound and the
    interval, for every fine-tuned result with a number; the protocol of every figure named."""
    seeds = summary["final_seeds"]
    bound = summary["paper_sd_bound"]
    header = ["Model", "Pre-training", "Size", "Column", "Protocol", "Selected LR",
              *(f"Seed {s}" for s in seeds), "Mean", "s.d.", f"s.d. < {bound:g}? (paper)", "95% interval"]
    body = []
    for r in summary["results"]:
        if r["result_from"] != "finetune" or r["status"] != "run":
            continue
        per_seed = dict(zip(r["seeds"], r["per_seed"]))
        body.append([r["label"], r["pretraining"], str(r["image_size"]), r["column"], r["eval_protocol"],
                     "–" if r["selected_lr"] is None else f"{r['selected_lr']:g}",
                     *(format_cell(per_seed.get(s)) for s in seeds), f"{r['top1_mean']:.2f}",
                     format_cell(r["top1_std"]), sd_against_bound(r["top1_std"], bound),
                     format_interval(r["ci_low"], r["ci_high"])])
    return header, body


def protocol_cells(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Every result at every evaluation protocol it was evaluated with: mean [95% interval]."""
    names = [p["name"] for p in summary["eval_protocols"]]
    header = ["Model", "Pre-training", "Size", "Result", "Column",
              *(f"{n} (headline)" if n == summary["headline_protocol"] else n for n in names)]
    body = []
    for r in summary["results"]:
        if r["status"] != "run":
            continue
        figures = r.get("protocols") or {}
        body.append([r["label"], r["pretraining"], str(r["image_size"]), result_from_text(r), r["column"],
                     *(format_figure(figures[n]["top1_mean"], figures[n]["ci_low"], figures[n]["ci_high"])
                       if figures.get(n) and figures[n]["top1_mean"] is not None else "–" for n in names)])
    return header, body


def result_from_text(result: dict) -> str:
    if result["result_from"] == "released":
        return "as released"
    return f"fine-tuned, {seeds_text(result)}"


COMPARISON_HEADER = ["Source", "Model", "Column", "Reference", "Source's protocol", "Compared with (ours, protocol)",
                     "Per seed", "Ours ± s.d.", "95% interval", "Δ ours − ref.", "Verdict"]


def comparison_cells(comparison: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Every reference figure (one line each): its source and that source's protocol, the run(s) of ours made
    the same way and their protocol, their per-seed values, mean ± s.d., interval, the difference and the
    verdict. A top-5 figure says so beside the column."""
    body = []
    for r in comparison:
        ours = "–" if r["ours"] is None else f"{r['ours']:.2f}" + (
            f" ± {r['ours_std']:.2f}" if r["ours_std"] is not None else "")
        body.append([r["source"] + (" (primary)" if r["is_primary"] else ""),
                     f"{r['model']} · {r['pretraining']} · {r['image_size']}",
                     r["column"] + ("" if r["metric"] == "top1" else f" ({r['metric']})"),
                     format_reference(r["reference_value"]), made_by_text(r["source_protocol"]),
                     "; ".join(filter(None, [r["matched_runs"], r["matched_protocol"]])) or "–",
                     ", ".join(f"{x:.2f}" for x in r["per_seed"] or []) or "–", ours,
                     "–" if r["ci_low"] is None else f"{r['ci_low']:.2f}–{r['ci_high']:.2f}",
                     "–" if r["diff"] is None else f"{r['diff']:+.2f}", r["verdict"]])
    return COMPARISON_HEADER, body


def variant_cells(variants: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The protocol-variant table (summary.json `variants`): each variant beside the paper-protocol result."""
    header = ["Variant", "Model", "Pre-training", "Dataset", "Variant top-1 [95% CI]", "Paper protocol [95% CI]",
              "Δ variant − paper protocol [95% CI]", "0 outside the interval"]
    body = [[v["variant_label"], v["label"], v["pretraining"], v["dataset_label"],
             format_figure(v["top1_mean"], v["ci_low"], v["ci_high"]),
             format_figure(v["paper_protocol"]["top1_mean"], v["paper_protocol"]["ci_low"],
                           v["paper_protocol"]["ci_high"]),
             f"{v['difference']:+.2f} [{v['difference_low']:+.2f}, {v['difference_high']:+.2f}]",
             "yes" if v["differs"] else "no"] for v in variants]
    return header, body


def selection_bias_cells(entries: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The selection-bias table, one row per pair: each LR's test top-1 (mean over the sweep's seeds), the LR
    best on test, the LR selected on the dev split, the honest headline and the inflation."""
    lrs = sorted({c["lr"] for e in entries for c in e["lrs"]})
    retrained = any(e["trained_on"] == "full" for e in entries)
    header = ["Model", "Pre-training", "Dataset", *(f"LR {lr:g}" for lr in lrs), "Best on test (LR)",
              "Selected on the dev split (LR)", "Headline (honest) [95% CI]", "Inflation",
              *(["of which the LR choice"] if retrained else [])]
    body = []
    for e in entries:
        by_lr = {c["lr"]: c["top1_mean"] for c in e["lrs"]}
        honest = e["headline"]
        body.append([e["label"], e["pretraining"], e["dataset_label"], *(format_cell(by_lr.get(lr)) for lr in lrs),
                     f"{e['best_lr']:g}", f"{e['selected_lr']:g}",
                     format_figure(honest["top1_mean"], honest["ci_low"], honest["ci_high"]),
                     f"{e['inflation']:+.2f}",
                     *([f"{e['inflation_by_selection']:+.2f}" if e["trained_on"] == "full" else "–"]
                       if retrained else [])])
    return header, body


SELECTION_BIAS_LEGEND = ("Not the headline: every LR of the sweep evaluated on test, never used for selection. "
                         "Picking the LR on test, as the earlier study did, would report the best column; the "
                         "honest figure is the headline (LR chosen on the dev split). Inflation = best on test − "
                         "headline; “of which the LR choice”: the part among the sweep's own runs (the rest is "
                         "the retraining on the entire training split).")


# ---------------------------------------------------------------------------------------------
# Text forms of the grids (comparison.md, comparison.tex, the notebook)
def grid_header(g: dict, with_reference: bool) -> list[str]:
    per_column = (lambda c: [f"{paper_column_name(c['label'])} ours", f"{paper_column_name(c['label'])} paper",
                             f"{paper_column_name(c['label'])} verdict"]) if with_reference else \
        (lambda c: [c["label"]])
    return ["Pre-training", "Model", "Size", *(h for c in g["columns"] for h in per_column(c))]


def grid_body(g: dict, with_reference: bool) -> list[list[str]]:
    """The rows of a grid as text: the headline's cells as (ours, paper, verdict); the others' cells ours
    followed by each reference ("official_repo 96.82: consistent, ours 96.50 (sweep run ...)")."""
    def cells(cell: dict) -> list[str]:
        if with_reference:
            primary = cell["primary"]
            return [cell["ours"], primary["value"] if primary else "–", cell["verdict"] or "none published"]
        refs = "; ".join(f"{line['source']} {line['value']}: {line['verdict']}"
                         + (f" vs {line['matched']}" if line["matched"] else "")
                         for line in cell["references"])
        return [cell["ours"] + (f" ({refs})" if refs else "")]
    return [[row["pretraining"], row["label"], str(row["image_size"]), *(t for c in row["cells"] for t in cells(c))]
            for row in g["rows"]]


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |" for cells in body]
    return "\n".join(lines)


def markdown_subset_notes(subset_datasets: list[dict]) -> list[str]:
    return [f"**Subset:** {d['label']} was run on a subset of the dataset ({d['subset_note'] or 'see dataset.json'}); "
            "its figures are not comparable with the published ones.\n" for d in subset_datasets]


def report_sections(summary: dict) -> list[tuple[str, str, tuple[list[str], list[list[str]]]]]:
    """(title, legend, (header, body)) of every table comparison.md and comparison.tex hold, in the report's
    order; a table without rows is left out."""
    head, per_dataset, released = headline_grid(summary), dataset_grid(summary), released_grid(summary)
    not_run = headline_not_run_grid(summary)
    bound = summary["paper_sd_bound"]
    sections = [
        ("Table 3", TABLE3_LEGEND, (grid_header(head, True), grid_body(head, True))),
        ("Table 3: published configurations this config did not run", "Every cell: not run.",
         (grid_header(not_run, True), grid_body(not_run, True))),
        ("Per dataset", "Ours (mean ± s.d. of the final runs, headline protocol), then every reference of the "
         "cell with its verdict, each against the run made its way.",
         (grid_header(per_dataset, False), grid_body(per_dataset, False))),
        ("As released (not fine-tuned; never a Table 3 figure)", RELEASED_LEGEND,
         (grid_header(released, False), grid_body(released, False))),
        ("Each final run", f"Each final run's top-1 and the s.d. over them, beside the paper's bound "
         f"({PAPER_SD_SOURCE}: s.d. < {bound:g}).", seed_cells(summary)),
        ("Every reference figure against the run made its way", "Each reference with its source's protocol and "
         "our run(s) made the same way.", comparison_cells(summary["comparison"])),
        ("Every evaluation protocol", INTERPOLATION_ASSUMPTION[0].upper() + INTERPOLATION_ASSUMPTION[1:] + ".",
         protocol_cells(summary)),
        ("Protocol variants", "Each variant at the selected LR against the paper-protocol final result of the same "
         "pair; the difference's interval combines the two half-widths in quadrature.",
         variant_cells(summary["variants"])),
        ("Selection bias (not the headline)", SELECTION_BIAS_LEGEND, selection_bias_cells(summary["selection_bias"])),
    ]
    return [s for s in sections if s[2][1]]


def source_lines(refs: dict) -> list[str]:
    """Each source: its citation, how it made its figures and the note on that protocol."""
    return [f"`{key}`: {citation(refs, key)}. Made by: {made_by_text(entry.get('made_by'))}"
            + (f" ({entry['protocol_note']})" if entry.get("protocol_note") else "")
            if isinstance(entry, dict) else f"`{key}`: {entry}" for key, entry in refs["sources"].items()]


def comparison_markdown(summary: dict) -> str:
    """comparison.md from summary.json: Table 3 with its verdicts, then every table of the report, ready to paste."""
    parts = [f"# {summary['title']}", "", *markdown_subset_notes(summary["subset_datasets"]),
             verdict_sentence(summary["verdicts"]), "",
             training_sentence(summary["final_models_trained_on"], summary["final_seeds"]), "",
             protocol_sentence(summary["eval_protocols"]), "", *(s for text in PROTOCOL_SOURCES for s in (text, ""))]
    for title, legend, (header, body) in report_sections(summary):
        parts += [f"## {title}", "", legend, "", markdown_table(header, body), ""]
    parts += [INTERVAL_LEGEND, "", "Sources:", "", *(f"- {line}" for line in source_lines(summary["references"]))]
    return "\n".join(parts) + "\n"


def latex_escape(text: str) -> str:
    repl = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
            "±": r"$\pm$", "Δ": r"$\Delta$", "–": "--", "−": "$-$", "≥": r"$\geq$", "×": r"$\times$",
            "“": "``", "”": "''"}
    return "".join(repl.get(c, c) for c in text)


def latex_table(header: list[str], body: list[list[str]], caption: str) -> str:
    """A plain booktabs table (first column left-aligned, the others right-aligned)."""
    lines = [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
             r"\toprule", " & ".join(map(latex_escape, header)) + r" \\", r"\midrule"]
    lines += [" & ".join(map(latex_escape, cells)) + r" \\" for cells in body]
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{latex_escape(caption)}}}", r"\end{table}"]
    return "\n".join(lines)


def comparison_latex(summary: dict) -> str:
    """comparison.tex from summary.json: every table of comparison.md as booktabs LaTeX, Table 3's caption with
    the verdict count, the final runs, the protocol and the sources."""
    cites = "; ".join(f"{k}: {citation(summary['references'], k)}" for k in summary["references"]["sources"])
    first = (f"{verdict_sentence(summary['verdicts'])} "
             f"{training_sentence(summary['final_models_trained_on'], summary['final_seeds'])} "
             f"{protocol_sentence(summary['eval_protocols'])} {INTERVAL_LEGEND} Sources: {cites}.")
    parts = ["% Requires \\usepackage{booktabs}."]
    for i, (title, legend, (header, body)) in enumerate(report_sections(summary)):
        parts.append(latex_table(header, body, f"{title}. {legend}" + (f" {first}" if i == 0 else "")))
    return "\n\n".join(parts) + "\n"


def write_csv(path: str | os.PathLike, rows: list[dict], columns: list[str]) -> None:
    """One CSV row per dict, in the given column order (a key outside them is an error)."""
    with atomic_path(Path(path)) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="raise")
        writer.writeheader()
        writer.writerows(rows)
