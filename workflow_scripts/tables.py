"""Table formatting: comparison rows -> CSV, Markdown, LaTeX and the cells of the report's HTML tables.

Pure functions of the rows the aggregate stage assembles (summary.json "comparison", "table3_columns",
"variants", "selection_bias", docs/design.md); they read no file and know no results layout. Shapes:
- the *Table 3* grid, shaped like Tolstikhin et al. 2021, Table 3: one row per (pre-training, model), one
  column per dataset (its ReaL column beside it), named average or other dataset; each cell this run with
  its 95% interval and the other protocols' figures, the column's primary published figure, the difference,
  the verdict and every other published figure with its source;
- the long form: one line per comparison row, one column per source (comparison_cells);
- the tables that explain a gap: protocol variants (variant_cells) and selection bias (selection_bias_cells).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from workflow_scripts.common import atomic_path

# The status of a comparison row whose (model, pre-training, dataset) the config did not run.
NOT_RUN = "not run"
# The status of a named average some of whose members have no result (its cell shows "k of N", no number).
PARTIAL = "partial"
# The column of a dataset's ReaL-style top-1 is named after the dataset (references.yaml: "ImageNet ReaL").
REAL_SUFFIX = " ReaL"
# The label of every evaluation protocol but the headline one (config evaluation.headline_protocol: the
# official code's, google-research/vision_transformer vit_jax/input_pipeline.py, the only one with a source).
UNVERIFIED_PROTOCOL = "not verified as the paper's"
# The verdicts (workflow_scripts.stats.verdict) of a published figure this run did not reproduce.
NOT_REPRODUCED = ("below", "above")


# What a Table 3 cell holds (comparison.md, comparison.tex and the report say it in these words).
TABLE3_LEGEND = ("Top-1 accuracy (%) on the test split, shaped like Table 3 of Tolstikhin et al. 2021 "
                 "(arXiv:2105.01601). Each cell: this run at the headline evaluation protocol (mean ± std over "
                 "seeds; “not run” where this config did not run it; “k of N” for an average some of whose "
                 "members were not run) with its 95% interval, the other evaluation protocols' figures (not "
                 "verified as the paper's), then the column's primary published figure with Δ = this run minus it "
                 "and the verdict (“consistent”: the published figure lies in the interval; “below” / “above”: "
                 "the whole interval lies below / above it), then every other published top-1 of the cell; each "
                 "figure names its source.")
# What the interval covers (workflow_scripts.stats; the README says more).
INTERVAL_LEGEND = ("95% interval: Wilson score interval over the test images (the same images for every seed), "
                   "with two or more seeds combined in quadrature with a Student-t interval over the seeds; ReaL: "
                   "Wilson over the images with a ReaL label; an average: its members' half-widths combined as "
                   "sqrt(sum of squares) / k. It does not cover the published figure's own uncertainty (unknown), "
                   "nor seed variance where there is one seed.")


def eval_protocol_records(protocols: dict, headline: str) -> list[dict]:
    """summary.json's `eval_protocols`: [{"name", "settings", "headline", "note"}] in config order; every
    protocol but the headline one is labelled UNVERIFIED_PROTOCOL."""
    return [{"name": name, "settings": settings, "headline": name == headline,
             "note": None if name == headline else UNVERIFIED_PROTOCOL} for name, settings in protocols.items()]


def other_protocol_names(eval_protocols: list[dict]) -> list[str]:
    return [p["name"] for p in eval_protocols if not p["headline"]]


def format_interval(low: float | None, high: float | None) -> str:
    return "" if low is None else f"95% CI {low:.2f}–{high:.2f}"


def verdict_sentence(counts: dict) -> str:
    """The headline's count (summary.json `verdicts`) in words."""
    not_reproduced = sum(counts[v] for v in NOT_REPRODUCED)
    return (f"Of {counts['published']} published figures (each cell's primary reference), {counts['consistent']} "
            f"{'was' if counts['consistent'] == 1 else 'were'} reproduced (consistent: inside this run's 95% "
            f"interval), {not_reproduced} not ({counts['below']} below, {counts['above']} above), and "
            f"{counts[NOT_RUN]} {'was' if counts[NOT_RUN] == 1 else 'were'} not run by this config.")


def training_sentence(trained_on: str) -> str:
    """What the final (tested) models were trained on (summary.json `final_models_trained_on`)."""
    if trained_on == "full":
        return ("The final models were retrained at the selected learning rate on the full training split "
                "(training + dev split), as in the ViT fine-tuning setup the paper follows "
                "(finetune.retrain_on_full_train: true).")
    return ("The final models are the dev-split runs: the LR sweep's runs at the selected learning rate, trained "
            "without the held-out dev split (finetune.retrain_on_full_train: false).")



def real_label(dataset_label: str) -> str:
    """The column label of a dataset's ReaL-style top-1: "ImageNet" -> "ImageNet ReaL"."""
    return dataset_label + REAL_SUFFIX


def reference_sources(refs: dict, metric: str) -> list[str]:
    """Sources (in references.yaml order) that publish at least one figure of this metric."""
    cited = {f["source"] for f in refs["figures"] if f["metric"] == metric}
    return [s for s in refs["sources"] if s in cited]


def format_reference(value) -> str:
    """A published figure as printed (two decimals, more where the source gives more: 76.616)."""
    if value is None:
        return ""
    text = f"{value:.2f}"
    return text if float(text) == value else repr(value)


def format_this_run(row: dict, seeds: bool = True) -> str:
    """This run's test top-1 of a comparison row: mean ± std over seeds, with the subset flag.

    An average with members missing reads "k of N"; `seeds=False` leaves out "(1 seed)" (Table 3 cells).
    """
    if row["status"] == NOT_RUN:
        return NOT_RUN
    if row["status"] == PARTIAL:
        return row["coverage"]
    num_seeds = row["num_seeds"] or 0
    if num_seeds > 1:
        spread = f" ± {row['top1_std']:.2f} (n={num_seeds})"
    else:
        spread = " (1 seed)" if num_seeds == 1 and seeds else ""
    subset = " (subset)" if row["subset"] else ""
    return f"{row['top1_mean']:.2f}{spread}{subset}"


def format_diff_to_primary(row: dict) -> str:
    return "" if row["diff_to_primary"] is None else f"{row['diff_to_primary']:+.2f}"


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


def comparison_cells(rows: list[dict], refs: dict,
                     other_protocols: list[str] = ()) -> tuple[list[str], list[list[str]]]:
    """Header and string cells of the long-form comparison (the report's "every comparison row" table):
    one line per row, one column per source of a top-1 figure, one per other evaluation protocol.

    Rows without any published figure get no reference columns and no verdict (nothing to compare with).
    """
    sources = reference_sources(refs, "top1") if any(r["has_reference"] for r in rows) else []
    header = ["Model", "Pre-training", "Dataset", *sources, "This run (top-1, mean ± std)", "95% interval",
              *(f"{p} ({UNVERIFIED_PROTOCOL})" for p in other_protocols)]
    header += ["Δ vs primary", "Verdict"] if sources else ["Selected LR"]
    body = []
    for r in rows:
        cells = [r["model"], r["pretraining"], r["dataset"], *(format_reference(r[f"{s}_top1"]) for s in sources),
                 format_this_run(r), format_interval(r["ci_low"], r["ci_high"]),
                 *(format_figure(r[f"top1_{p}"], r[f"ci_low_{p}"], r[f"ci_high_{p}"]) for p in other_protocols)]
        lr = "–" if r["selected_lr"] is None else f"{r['selected_lr']:g}"
        body.append(cells + ([format_diff_to_primary(r), r["verdict"]] if sources else [lr]))
    return header, body


def format_figure(value: float | None, low: float | None, high: float | None) -> str:
    """A figure with its interval on one line: "74.90 [73.10, 76.50]"."""
    return "" if value is None else f"{value:.2f} [{low:.2f}, {high:.2f}]"


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


def selection_bias_cells(entry: dict) -> tuple[list[str], list[list[str]]]:
    """One pair's selection-bias table (a summary.json `selection_bias` entry): every LR's test top-1."""
    header = ["Base LR", "Test top-1 (mean over seeds) [95% CI]", "Selected on the dev split", "Best on test"]
    body = [[f"{c['lr']:g}", format_figure(c["top1_mean"], c["ci_low"], c["ci_high"]),
             "yes" if c["selected"] else "", "yes" if c["best_on_test"] else ""] for c in entry["lrs"]]
    return header, body


def selection_bias_sentence(entry: dict) -> str:
    """What picking the LR on test would have reported, beside the honest headline figure."""
    honest = entry["headline"]
    text = (f"Picking the LR on test, as the earlier study did, would choose LR {entry['best_lr']:g} and report "
            f"{entry['best_top1']:.2f}. The honest figure (LR {entry['selected_lr']:g}, chosen on the dev split: the "
            f"headline) is {honest['top1_mean']:.2f} [{honest['ci_low']:.2f}, {honest['ci_high']:.2f}]; inflation "
            f"{entry['inflation']:+.2f} points.")
    if entry["trained_on"] == "full":  # the headline model is not one of the sweep's runs
        text += (f" Among the sweep's own runs, the LR picked on test beats the dev-split choice by "
                 f"{entry['inflation_by_selection']:+.2f}; the rest of the difference is the retraining on the full "
                 "training split.")
    return text


# ---------------------------------------------------------------------------------------------
# The Table 3 grid
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


def this_run_lines(row: dict, other_protocols: list[str]) -> list[dict]:
    """A cell's first lines: this run, its interval, each other protocol's figure, a released model's note."""
    lines = [{"kind": "this_run", "text": format_this_run(row, seeds=False)}]
    if row["ci_low"] is not None:
        lines.append({"kind": "interval", "text": format_interval(row["ci_low"], row["ci_high"])})
    for p in other_protocols:
        if row.get(f"top1_{p}") is not None:
            lines.append({"kind": "protocol", "text": f"{p}: {row[f'top1_{p}']:.2f} ({UNVERIFIED_PROTOCOL})"})
    if row["status"] != NOT_RUN and row.get("result_from") == "released":
        lines.append({"kind": "note", "text": "released model, not fine-tuned"})
    return lines


def table3_cell(row: dict | None, column: str, refs: dict, other_protocols: list[str] = ()) -> dict:
    """One cell: {"status", "verdict", "lines": [{"kind", "text", "source"?}]}; the lines are this_run_lines
    ("not run", or "k of N" for an average with members missing), the column's primary figure, the difference
    to it and the verdict, then every other published top-1 of the cell, each with its source."""
    if row is None:
        return {"status": NOT_RUN, "verdict": None, "lines": [{"kind": "this_run", "text": NOT_RUN}]}
    lines = this_run_lines(row, other_protocols)
    primary = refs["primary"].get(column)
    sources = reference_sources(refs, "top1")
    for source in sorted(sources, key=lambda s: s != primary):  # the primary first, the others in file order
        value = row.get(f"{source}_top1")
        if value is None:
            continue
        lines.append({"kind": "primary" if source == primary else "other", "source": source,
                      "text": f"{source}: {format_reference(value)}"})
        if source == primary and row["diff_to_primary"] is not None:
            lines.append({"kind": "diff", "text": f"Δ {row['diff_to_primary']:+.2f}"})
            lines.append({"kind": "verdict", "text": row["verdict"]})
    verdict = row["verdict"] if row["primary_top1"] is not None else None
    return {"status": row["status"], "verdict": verdict, "lines": lines}


def table3(comparison: list[dict], columns: list[dict], refs: dict, keys: list[tuple[str, str]],
           other_protocols: list[str] = ()) -> dict:
    """The grid of the (model, pre-training) rows `keys`: {"columns", "rows": [{"model", "pretraining",
    "cells"}]}; only the columns in which one of these rows has a comparison row."""
    by_key = {(r["model"], r["pretraining"], r["dataset"]): r for r in comparison}
    shown = [c for c in columns if any((model, pre, c["label"]) in by_key for model, pre in keys)]
    rows = [{"model": model, "pretraining": pre,
             "cells": [table3_cell(by_key.get((model, pre, c["label"])), c["label"], refs, other_protocols)
                       for c in shown]}
            for model, pre in keys]
    return {"columns": shown, "rows": rows}


def table3_tables(comparison: list[dict], columns: list[dict], refs: dict,
                  other_protocols: list[str] = ()) -> tuple[dict, dict | None]:
    """Two grids: the rows with a published figure (the paper's configurations, "not run" where this config
    did not run them), and this config's rows without any (None when there are none); rows in comparison order.
    `other_protocols`: the evaluation protocols whose figures each cell shows beside the headline one."""
    keys = list(dict.fromkeys((r["model"], r["pretraining"]) for r in comparison))
    published = {(r["model"], r["pretraining"]) for r in comparison if r["has_reference"]}
    unpublished = [k for k in keys if k not in published]
    return (table3(comparison, columns, refs, [k for k in keys if k in published], other_protocols),
            table3(comparison, columns, refs, unpublished, other_protocols) if unpublished else None)


def cell_text(cell: dict) -> str:
    """A Table 3 cell on one line: "75.12 (paper_table3: 76.44; Δ -1.32; earlier_study: 73.64)"."""
    first, *rest = (line["text"] for line in cell["lines"])
    return f"{first} ({'; '.join(rest)})" if rest else first


def table3_markdown(grid: dict) -> str:
    header = ["Pre-training", "Model", *(c["label"] for c in grid["columns"])]
    return markdown_table(header, [[row["pretraining"], row["model"], *map(cell_text, row["cells"])]
                                   for row in grid["rows"]])


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |" for cells in body]
    return "\n".join(lines)


def markdown_subset_notes(subset_datasets: list[dict]) -> list[str]:
    return [f"**Subset:** {d['label']} was run on a subset of the dataset ({d['subset_note'] or 'see dataset.json'}); "
            "its figures are not comparable with the published ones.\n" for d in subset_datasets]


def protocol_sentence(eval_protocols: list[dict]) -> str:
    """Which evaluation protocol the headline uses and which are shown beside it."""
    headline = next(p["name"] for p in eval_protocols if p["headline"])
    others = ", ".join(f"`{name}`" for name in other_protocol_names(eval_protocols))
    return (f"Headline evaluation protocol: `{headline}`"
            + (f"; also shown: {others} ({UNVERIFIED_PROTOCOL})." if others else "."))


def gap_markdown(summary: dict) -> list[str]:
    """comparison.md's sections that explain a gap: the protocol variants and the selection bias."""
    parts = []
    if summary["variants"]:
        parts += ["## Protocol variants", "", "Each variant at the selected LR against the paper-protocol final result "
                  "of the same pair; the difference's interval combines the two half-widths in quadrature.", "",
                  markdown_table(*variant_cells(summary["variants"])), ""]
    for entry in summary["selection_bias"]:
        parts += [f"## Selection bias (not the headline): {entry['label']} · {entry['pretraining']} · "
                  f"{entry['dataset_label']}", "", markdown_table(*selection_bias_cells(entry)), "",
                  selection_bias_sentence(entry), ""]
    return parts


def comparison_markdown(summary: dict) -> str:
    """comparison.md from summary.json: the Table 3 grids with their verdicts and sources, then the tables
    that explain a gap, ready to paste."""
    rows, refs = summary["comparison"], summary["references"]
    published, unpublished = table3_tables(rows, summary["table3_columns"], refs,
                                           other_protocol_names(summary["eval_protocols"]))
    parts = [f"# {summary['title']}", "", *markdown_subset_notes(summary["subset_datasets"]),
             verdict_sentence(summary["verdicts"]), "", training_sentence(summary["final_models_trained_on"]), "",
             protocol_sentence(summary["eval_protocols"]), "", TABLE3_LEGEND, "", table3_markdown(published), ""]
    if unpublished:
        parts += ["## Runs without a published figure", "", table3_markdown(unpublished), ""]
    parts += [INTERVAL_LEGEND, "", *gap_markdown(summary), "Sources:", ""]
    parts += [f"- `{k}`: {v}" for k, v in refs["sources"].items()]
    parts += ["", "Primary reference per column (Δ = this run minus it): "
              + ", ".join(f"{d}: `{s}`" for d, s in refs["primary"].items()) + "."]
    return "\n".join(parts) + "\n"


def latex_escape(text: str) -> str:
    repl = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
            "±": r"$\pm$", "Δ": r"$\Delta$", "–": "--", "−": "$-$"}
    return "".join(repl.get(c, c) for c in text)


def latex_cell(cell: dict) -> str:
    """A Table 3 cell as stacked lines (a nested tabular: no package beyond booktabs)."""
    first, *rest = (latex_escape(line["text"]) for line in cell["lines"])
    if not rest:
        return first
    return r"\begin{tabular}[t]{@{}r@{}}" + r" \\ ".join([first, *(rf"{{\scriptsize {t}}}" for t in rest)]) \
        + r"\end{tabular}"


def table3_latex(grid: dict, caption: str) -> str:
    header = ["Pre-training", "Model", *(c["label"] for c in grid["columns"])]
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{ll" + "r" * len(grid["columns"]) + "}", r"\toprule",
             " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join([latex_escape(row["pretraining"]), latex_escape(row["model"]),
                          *map(latex_cell, row["cells"])]) + r" \\" for row in grid["rows"]]
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{latex_escape(caption)}}}", r"\end{table}"]
    return "\n".join(lines)


def latex_table(header: list[str], body: list[list[str]], caption: str) -> str:
    """A plain booktabs table (first column left-aligned, the others right-aligned)."""
    lines = [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
             r"\toprule", " & ".join(map(latex_escape, header)) + r" \\", r"\midrule"]
    lines += [" & ".join(map(latex_escape, cells)) + r" \\" for cells in body]
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{latex_escape(caption)}}}", r"\end{table}"]
    return "\n".join(lines)


def comparison_latex(summary: dict) -> str:
    """comparison.tex from summary.json: the Table 3 grids as booktabs LaTeX (verdicts and sources in the
    caption), then the protocol-variant and selection-bias tables."""
    refs = summary["references"]
    published, unpublished = table3_tables(summary["comparison"], summary["table3_columns"], refs,
                                           other_protocol_names(summary["eval_protocols"]))
    cites = "; ".join(f"{k}: {v}" for k, v in refs["sources"].items())
    caption = (f"{TABLE3_LEGEND} {verdict_sentence(summary['verdicts'])} "
               f"{training_sentence(summary['final_models_trained_on'])} {INTERVAL_LEGEND} Sources: {cites}.")
    parts = ["% Requires \\usepackage{booktabs}.", table3_latex(published, caption)]
    if unpublished:
        parts.append(table3_latex(unpublished, "Top-1 accuracy (%) of runs without a published figure."))
    if summary["variants"]:
        parts.append(latex_table(*variant_cells(summary["variants"]), "Protocol variants against the paper's "
                                 "protocol; the difference's 95% interval combines the half-widths in quadrature."))
    parts += [latex_table(*selection_bias_cells(e), f"Selection bias (not the headline), {e['label']}, "
                          f"{e['pretraining']}, {e['dataset_label']}: {selection_bias_sentence(e)}")
              for e in summary["selection_bias"]]
    return "\n\n".join(parts) + "\n"


def write_csv(path: str | os.PathLike, rows: list[dict], columns: list[str]) -> None:
    """One CSV row per dict, in the given column order (a key outside them is an error)."""
    with atomic_path(Path(path)) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="raise")
        writer.writeheader()
        writer.writerows(rows)
