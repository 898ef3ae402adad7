"""Table formatting: comparison rows -> CSV, Markdown, LaTeX and the cells of the report's HTML tables.

Pure functions of the rows the aggregate stage assembles (summary.json "comparison" and "table3_columns",
docs/design.md); they read no file and know no results layout. Two shapes:
- the *Table 3* grid, shaped like Tolstikhin et al. 2021, Table 3: one row per (pre-training, model), one
  column per dataset (its ReaL column beside it), named average or other dataset; each cell this run, the
  column's primary published figure, the difference and every other published figure with its source;
- the long form: one line per comparison row, one column per source (comparison_cells).
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


# What a Table 3 cell holds (comparison.md, comparison.tex and the report say it in these words).
TABLE3_LEGEND = ("Top-1 accuracy (%) on the test split, shaped like Table 3 of Tolstikhin et al. 2021 "
                 "(arXiv:2105.01601). Each cell: this run (mean ± std over seeds; “not run” where this config did "
                 "not run it; “k of N” for an average some of whose members were not run), then the column's "
                 "primary published figure with Δ = this run minus it, then every other published top-1 of the "
                 "cell; each figure names its source.")


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


def comparison_cells(rows: list[dict], refs: dict) -> tuple[list[str], list[list[str]]]:
    """Header and string cells of the long-form comparison (the report's "every comparison row" table):
    one line per row, one column per source of a top-1 figure.

    Rows without any published figure get no reference columns (nothing to compare with).
    """
    sources = reference_sources(refs, "top1") if any(r["has_reference"] for r in rows) else []
    header = ["Model", "Pre-training", "Dataset", *sources, "This run (top-1, mean ± std)"]
    header += ["Δ vs primary"] if sources else ["Selected LR"]
    body = []
    for r in rows:
        cells = [r["model"], r["pretraining"], r["dataset"],
                 *(format_reference(r[f"{s}_top1"]) for s in sources), format_this_run(r)]
        lr = "–" if r["selected_lr"] is None else f"{r['selected_lr']:g}"
        body.append(cells + [format_diff_to_primary(r) if sources else lr])
    return header, body


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


def table3_cell(row: dict | None, column: str, refs: dict) -> dict:
    """One cell: {"status", "lines": [{"kind", "text", "source"?}]}; the lines are this run ("not run", or
    "k of N" for an average with members missing), a note for a released model, the column's primary
    figure and the difference to it, then every other published top-1 of the cell, each with its source."""
    if row is None:
        return {"status": NOT_RUN, "lines": [{"kind": "this_run", "text": NOT_RUN}]}
    lines = [{"kind": "this_run", "text": format_this_run(row, seeds=False)}]
    if row["status"] != NOT_RUN and row.get("result_from") == "released":
        lines.append({"kind": "note", "text": "released model, not fine-tuned"})
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
    return {"status": row["status"], "lines": lines}


def table3(comparison: list[dict], columns: list[dict], refs: dict, keys: list[tuple[str, str]]) -> dict:
    """The grid of the (model, pre-training) rows `keys`: {"columns", "rows": [{"model", "pretraining",
    "cells"}]}; only the columns in which one of these rows has a comparison row."""
    by_key = {(r["model"], r["pretraining"], r["dataset"]): r for r in comparison}
    shown = [c for c in columns if any((model, pre, c["label"]) in by_key for model, pre in keys)]
    rows = [{"model": model, "pretraining": pre,
             "cells": [table3_cell(by_key.get((model, pre, c["label"])), c["label"], refs) for c in shown]}
            for model, pre in keys]
    return {"columns": shown, "rows": rows}


def table3_tables(comparison: list[dict], columns: list[dict], refs: dict) -> tuple[dict, dict | None]:
    """Two grids: the rows with a published figure (the paper's configurations, "not run" where this config
    did not run them), and this config's rows without any (None when there are none); rows in comparison order."""
    keys = list(dict.fromkeys((r["model"], r["pretraining"]) for r in comparison))
    published = {(r["model"], r["pretraining"]) for r in comparison if r["has_reference"]}
    unpublished = [k for k in keys if k not in published]
    return (table3(comparison, columns, refs, [k for k in keys if k in published]),
            table3(comparison, columns, refs, unpublished) if unpublished else None)


def cell_text(cell: dict) -> str:
    """A Table 3 cell on one line: "75.12 (paper_table3: 76.44; Δ -1.32; earlier_study: 73.64)"."""
    first, *rest = (line["text"] for line in cell["lines"])
    return f"{first} ({'; '.join(rest)})" if rest else first


def table3_markdown(grid: dict) -> str:
    header = ["Pre-training", "Model", *(c["label"] for c in grid["columns"])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in grid["rows"]:
        cells = [row["pretraining"], row["model"], *map(cell_text, row["cells"])]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def markdown_subset_notes(subset_datasets: list[dict]) -> list[str]:
    return [f"**Subset:** {d['label']} was run on a subset of the dataset ({d['subset_note'] or 'see dataset.json'}); "
            "its figures are not comparable with the published ones.\n" for d in subset_datasets]


def comparison_markdown(rows: list[dict], columns: list[dict], refs: dict, title: str,
                        subset_datasets: list[dict]) -> str:
    """comparison.md: the Table 3 grids with their sources, ready to paste."""
    published, unpublished = table3_tables(rows, columns, refs)
    parts = [f"# {title}", "", *markdown_subset_notes(subset_datasets), TABLE3_LEGEND, "",
             table3_markdown(published), ""]
    if unpublished:
        parts += ["## Runs without a published figure", "", table3_markdown(unpublished), ""]
    parts += ["Sources:", ""] + [f"- `{k}`: {v}" for k, v in refs["sources"].items()]
    parts += ["", "Primary reference per column (Δ = this run minus it): "
              + ", ".join(f"{d}: `{s}`" for d, s in refs["primary"].items()) + "."]
    return "\n".join(parts) + "\n"


def latex_escape(text: str) -> str:
    repl = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
            "±": r"$\pm$", "Δ": r"$\Delta$"}
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


def comparison_latex(rows: list[dict], columns: list[dict], refs: dict) -> str:
    """comparison.tex: the Table 3 grids as booktabs LaTeX, sources in the caption."""
    published, unpublished = table3_tables(rows, columns, refs)
    cites = "; ".join(f"{k}: {v}" for k, v in refs["sources"].items())
    parts = ["% Requires \\usepackage{booktabs}.", table3_latex(published, f"{TABLE3_LEGEND} Sources: {cites}.")]
    if unpublished:
        parts.append(table3_latex(unpublished, "Top-1 accuracy (%) of runs without a published figure."))
    return "\n\n".join(parts) + "\n"


def write_csv(path: str | os.PathLike, rows: list[dict], columns: list[str]) -> None:
    """One CSV row per dict, in the given column order (a key outside them is an error)."""
    with atomic_path(Path(path)) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="raise")
        writer.writeheader()
        writer.writerows(rows)
