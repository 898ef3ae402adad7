"""The self-contained HTML report, and the executed analysis notebook.

  python -m workflow_scripts.report --aggregate-dir R/aggregate --results-root R \
      --notebook-html R/report/analysis.html --out R/report/index.html --command "snakemake ..."
  python -m workflow_scripts.report notebook --notebook notebooks/analysis.ipynb --results-root R \
      --out-ipynb R/report/analysis.ipynb --out-html R/report/analysis.html

The page is rendered with jinja2 (autoescaped) from report/templates/, with report/report.css inlined
and every chart embedded as a base64 PNG: one file, no external URLs. Every number on it comes from
R/aggregate/summary.json (the result files) or from the cited reference figures.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from workflow_scripts.aggregate import NOT_RUN, fmt_reference, reference_sources, table_cells
from workflow_scripts.common import PipelineError, atomic_path, read_json, run_cli

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "report" / "templates"
CSS = REPO / "report" / "report.css"
KERNEL_NAME = "mlp-mixer-report-python"


# ---------------------------------------------------------------------------------------------
# Charts (matplotlib, embedded as base64 PNG)
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _text(s: str) -> str:
    """Plain text for matplotlib: a '$' would start mathtext."""
    return str(s).replace("$", r"\$")


def png_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def accuracy_chart(comparison: list[dict], refs: dict) -> str | None:
    """This run's test top-1 (mean ± std) beside every published top-1 figure of the same row."""
    rows = [r for r in comparison if r["status"] != NOT_RUN]
    if not rows:
        return None
    plt = _plt()
    sources = [s for s in reference_sources(refs, "top1") if any(r[f"{s}_top1"] is not None for r in rows)]
    series = [("this run", [r["top1_mean"] for r in rows], [r["top1_std"] or 0 for r in rows])]
    series += [(s, [r[f"{s}_top1"] for r in rows], None) for s in sources]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows) + 2), 3.8))
    for i, (name, values, errors) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
        present = [(x, v, e) for x, v, e in zip(xs, values, errors or [0] * len(values)) if v is not None]
        if present:
            bars = ax.bar([p[0] for p in present], [p[1] for p in present], width,
                          yerr=[p[2] for p in present] if errors else None, capsize=3, label=_text(name))
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([_text(f"{r['model']}\n{r['pretraining']}\n{r['dataset']}" + (" (subset)" if r["subset"] else ""))
                        for r in rows], fontsize=8)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="y", alpha=0.3)
    return png_base64(fig)


def lr_sweep_chart(pairs: list[dict]) -> str | None:
    """Mean minival top-1 against base LR per pair (points: seeds); the selected LR is starred."""
    if not pairs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for p in pairs:
        cands = sorted(p["candidates"], key=lambda c: c["lr"])
        line, = ax.plot([c["lr"] for c in cands], [c["minival_top1_mean"] for c in cands], marker="o",
                        label=_text(f"{p['label']} / {p['dataset_label']}"))
        for c in cands:
            ax.scatter([c["lr"]] * len(c["minival_top1_per_seed"]), c["minival_top1_per_seed"],
                       s=10, color=line.get_color(), alpha=0.5)
        chosen = [c for c in cands if float(c["lr"]) == float(p["selected_lr"])]
        ax.scatter([c["lr"] for c in chosen], [c["minival_top1_mean"] for c in chosen], marker="*", s=220,
                   color=line.get_color(), edgecolor="black", zorder=5)
    ax.set_xscale("log")
    ax.set_xlabel("base learning rate")
    ax.set_ylabel("minival top-1 (%)")
    ax.set_title("LR sweep (★ = selected on minival)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_base64(fig)


def curves_chart(runs: list[dict], curves: dict) -> str:
    """Loss, learning rate and minival top-1 against step, one line per run of a pair."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for run in runs:
        c = curves[run["run_dir"]]
        name = _text(f"lr {run['lr']:g}, seed {run['seed']}" + (" (selected)" if run["selected"] else ""))
        axes[0].plot(c["step"], c["loss"], label=name)
        axes[1].plot(c["step"], c["lr"], label=name)
        axes[2].plot(c["eval_step"], c["minival_top1"], marker="o", label=name)
    for ax, ylabel in zip(axes, ("training loss", "learning rate", "minival top-1 (%)")):
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    return png_base64(fig)


# ---------------------------------------------------------------------------------------------
# The page
def _fmt(value, digits: int = 2) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v, digits)}" for k, v in value.items())
    return str(value)


def report_context(summary: dict, config: dict, results_root: Path, notebook_html: Path, out: Path, command: str) -> dict:
    refs = summary["references"]
    comparison = summary["comparison"]
    with_refs = [r for r in comparison if r["has_reference"]]
    without = [r for r in comparison if not r["has_reference"]]
    runs_by_pair = defaultdict(list)
    for run in summary["runs"]:
        runs_by_pair[run["checkpoint"], run["dataset"]].append(run)
    logs = sorted((results_root / "logs").rglob("*.log"))
    return {
        "s": summary,
        "refs": refs,
        "headline": table_cells(with_refs, refs),
        "unreferenced": table_cells(without, refs) if without else None,
        "not_run": NOT_RUN,
        "n_run_with_reference": sum(r["status"] != NOT_RUN for r in with_refs),
        "accuracy_png": accuracy_chart(comparison, refs),
        "sweep_png": lr_sweep_chart(summary["pairs"]),
        "curves": [{"pair": p, "png": curves_chart(runs_by_pair[p["checkpoint"], p["dataset"]], summary["curves"])}
                   for p in summary["pairs"]],
        "logs": [{"name": str(p.relative_to(results_root / "logs")), "href": os.path.relpath(p, out.parent)}
                 for p in logs],
        "notebook_href": os.path.relpath(notebook_html, out.parent),
        "command": command,
        "rendered_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # The references are shown in their own section, with their sources.
        "config_json": json.dumps({k: v for k, v in config.items() if k != "references"}, indent=2),
    }


def render_report(aggregate_dir, results_root, notebook_html, out, command: str) -> Path:
    """Render R/report/index.html (atomically) from the aggregate summary; returns the output path."""
    import jinja2
    from markupsafe import Markup

    aggregate_dir, results_root, out = Path(aggregate_dir), Path(results_root), Path(out)
    summary = read_json(aggregate_dir / "summary.json")
    config = read_json(aggregate_dir / "config.json")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    env.filters["ref"] = fmt_reference
    context = report_context(summary, config, results_root, Path(notebook_html), out, command)
    context["css"] = Markup(CSS.read_text())  # our own stylesheet, inlined verbatim
    html = env.get_template("report.html.j2").render(**context)
    with atomic_path(out) as tmp:
        tmp.write_text(html)
    return out


# ---------------------------------------------------------------------------------------------
# The notebook
def running_kernelspec(kernels_dir: Path) -> str:
    """A kernelspec that starts this very interpreter (venv or `--sdm conda` env); returns its name."""
    spec_dir = kernels_dir / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})", "language": "python",
    }))
    return KERNEL_NAME


@contextlib.contextmanager
def _private_jupyter_dirs(tmp: Path) -> Iterator[str]:
    """Point Jupyter at a temporary kernelspec of this interpreter (and temporary runtime/IPython dirs,
    so a read-only or shared home does not matter); yields the kernel name and restores the environment."""
    names = ("JUPYTER_PATH", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR")
    saved = {name: os.environ.get(name) for name in names}
    os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(tmp / "jupyter"), saved["JUPYTER_PATH"]]))
    os.environ["JUPYTER_RUNTIME_DIR"] = str(tmp / "runtime")
    os.environ["IPYTHONDIR"] = str(tmp / "ipython")
    try:
        yield running_kernelspec(tmp / "jupyter")
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def execute_notebook(notebook, results_root, out_ipynb, out_html) -> None:
    """Execute the notebook with papermill on results_root, then convert it to HTML.

    Both outputs appear only if everything succeeded (temporary files, renamed at the end).
    """
    import nbconvert
    import nbformat
    import papermill

    notebook = Path(notebook)
    if not notebook.exists():
        raise PipelineError(f"{notebook}: notebook not found")
    with tempfile.TemporaryDirectory(prefix="report-kernel-") as tmp, _private_jupyter_dirs(Path(tmp)) as kernel:
        executed = Path(tmp) / "analysis.ipynb"
        try:
            papermill.execute_notebook(str(notebook), str(executed), kernel_name=kernel,
                                       parameters={"results_root": str(Path(results_root).resolve())},
                                       cwd=str(notebook.parent.resolve()), progress_bar=False)
        except papermill.PapermillExecutionError as e:
            raise PipelineError(f"{notebook}: cell {e.exec_count} failed with {e.ename}: {e.evalue}. "
                                f"No notebook output was written; fix the notebook or the results it reads") from None
        exporter = nbconvert.HTMLExporter(embed_images=True, template_name="notebook_offline",
                                          extra_template_basedirs=[str(TEMPLATES)])
        html, _ = exporter.from_notebook_node(nbformat.read(executed, as_version=4))
        with atomic_path(out_ipynb) as tmp_ipynb, atomic_path(out_html) as tmp_html:
            shutil.copyfile(executed, tmp_ipynb)
            tmp_html.write_text(html)


# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["notebook"]:
        ap = argparse.ArgumentParser(prog="python -m workflow_scripts.report notebook",
                                     description="Execute the analysis notebook and render it to HTML.")
        ap.add_argument("--notebook", required=True)
        ap.add_argument("--results-root", required=True)
        ap.add_argument("--out-ipynb", required=True)
        ap.add_argument("--out-html", required=True)
        args = ap.parse_args(argv[1:])
        execute_notebook(args.notebook, args.results_root, args.out_ipynb, args.out_html)
        print(f"notebook executed -> {args.out_ipynb}, {args.out_html}")
        return 0
    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.report", description=__doc__.splitlines()[0],
                                 epilog="Subcommand: `notebook` executes the analysis notebook (see --help there).")
    ap.add_argument("--aggregate-dir", required=True, help="R/aggregate (summary.json, config.json)")
    ap.add_argument("--results-root", required=True, help="output_root of the run (R); logs are linked from it")
    ap.add_argument("--notebook-html", required=True, help="the executed notebook, linked from the page")
    ap.add_argument("--out", required=True, help="the HTML page to write")
    ap.add_argument("--command", default="", help="the command line that started the run (provenance)")
    args = ap.parse_args(argv)
    out = render_report(args.aggregate_dir, args.results_root, args.notebook_html, args.out, args.command)
    print(f"report -> {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
