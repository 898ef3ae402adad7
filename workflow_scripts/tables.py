"""Table formatting: comparison rows -> CSV, Markdown, LaTeX and the cells of the report's HTML tables.

Pure functions of the rows the aggregate stage assembles (summary.json "comparison", docs/design.md);
they read no file and know no results layout.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from workflow_scripts.common import atomic_path

# The status of a comparison row whose (model, pre-training, dataset) the config did not run.
NOT_RUN = "not run"


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


def format_this_run(row: dict) -> str:
    """This run's test top-1 of a comparison row: mean ± std over seeds, with the subset flag."""
    if row["status"] == NOT_RUN:
        return NOT_RUN
    spread = f" ± {row['top1_std']:.2f} (n={row['num_seeds']})" if row["num_seeds"] > 1 else " (1 seed)"
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
    """Header and string cells of a top-1 comparison table (Markdown, LaTeX and the HTML page).

    Rows without any published figure get no reference columns (nothing to compare with).
    """
    sources = reference_sources(refs, "top1") if any(r["has_reference"] for r in rows) else []
    header = ["Model", "Pre-training", "Dataset", *sources, "This run (top-1, mean ± std)"]
    header += ["Δ vs primary"] if sources else ["Selected LR"]
    body = []
    for r in rows:
        cells = [r["model"], r["pretraining"], r["dataset"],
                 *(format_reference(r[f"{s}_top1"]) for s in sources), format_this_run(r)]
        body.append(cells + [format_diff_to_primary(r) if sources else f"{r['selected_lr']:g}"])
    return header, body


def markdown_table(rows: list[dict], refs: dict) -> str:
    header, body = comparison_cells(rows, refs)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |" for cells in body]
    return "\n".join(lines)


def comparison_markdown(rows: list[dict], refs: dict, title: str, subset_datasets: list[dict]) -> str:
    """comparison.md: the top-1 tables with their sources, ready to paste."""
    with_refs = [r for r in rows if r["has_reference"]]
    without = [r for r in rows if not r["has_reference"]]
    parts = [f"# {title}", ""]
    parts += [f"**Subset:** {d['label']} was run on a subset of the dataset "
              f"({d['subset_note'] or 'see dataset.json'}); its figures are not comparable with the published ones.\n"
              for d in subset_datasets]
    parts += ["Top-1 accuracy (%) on the test split; references as published.", "",
              markdown_table(with_refs, refs), ""]
    if without:
        parts += ["## Runs without a published reference", "", markdown_table(without, refs), ""]
    parts += ["Sources:", ""] + [f"- `{k}`: {v}" for k, v in refs["sources"].items()]
    parts += ["", "Δ vs primary: this run minus the primary reference for the dataset ("
              + ", ".join(f"{d}: `{s}`" for d, s in refs["primary"].items()) + ")."]
    return "\n".join(parts) + "\n"


def latex_escape(text: str) -> str:
    repl = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
            "±": r"$\pm$", "Δ": r"$\Delta$"}
    return "".join(repl.get(c, c) for c in text)


def latex_table(rows: list[dict], refs: dict, caption: str) -> str:
    header, body = comparison_cells(rows, refs)
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{lll" + "r" * (len(header) - 3) + "}", r"\toprule",
             " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(c) for c in cells) + r" \\" for cells in body]
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{latex_escape(caption)}}}", r"\end{table}"]
    return "\n".join(lines)


def comparison_latex(rows: list[dict], refs: dict) -> str:
    """comparison.tex: the top-1 tables as booktabs LaTeX, sources in the caption."""
    cites = "; ".join(f"{k}: {v}" for k, v in refs["sources"].items())
    parts = ["% Requires \\usepackage{booktabs}.",
             latex_table([r for r in rows if r["has_reference"]], refs, f"Top-1 accuracy (%). Sources: {cites}.")]
    without = [r for r in rows if not r["has_reference"]]
    if without:
        parts.append(latex_table(without, refs, "Top-1 accuracy (%) of runs without a published reference."))
    return "\n\n".join(parts) + "\n"


def write_csv(path: str | os.PathLike, rows: list[dict], columns: list[str]) -> None:
    """One CSV row per dict, in the given column order (a key outside them is an error)."""
    with atomic_path(Path(path)) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="raise")
        writer.writeheader()
        writer.writerows(rows)
