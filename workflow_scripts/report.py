"""The self-contained HTML report, and the executed analysis notebook.

  python -m workflow_scripts.report --summary R/aggregate/summary.json --config R/aggregate/config.json \\
      --notebook-html R/report/analysis.html --logs-dir R/logs --out R/report/index.html --command "snakemake ..."
  python -m workflow_scripts.report notebook --notebook notebooks/analysis.ipynb \\
      --summary R/aggregate/summary.json --runs-csv R/aggregate/runs.csv --comparison-csv R/aggregate/comparison.csv \\
      --out-ipynb R/report/analysis.ipynb --out-html R/report/analysis.html

The page is rendered with jinja2 (autoescaped) from report/templates/, with report/report.css inlined
and every chart (workflow_scripts.charts, the same functions the notebook calls) embedded as a base64
PNG: one file, no external URLs. Every number on it comes from summary.json (the result files) or from
the cited reference figures. Both commands read only the files they are given.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from workflow_scripts import charts
from workflow_scripts.common import PipelineError, atomic_path, read_json, run_cli
from workflow_scripts.tables import (
    INTERPOLATION_ASSUMPTION,
    INTERPOLATION_SHORT,
    INTERVAL_LEGEND,
    NO_PROTOCOL_MATCH,
    NOT_RUN,
    PAPER_SD_SOURCE,
    PROTOCOL_SOURCES,
    RELEASED_LEGEND,
    SELECTION_BIAS_LEGEND,
    TABLE3_LEGEND,
    VERDICTS,
    citation,
    comparison_cells,
    dataset_grid,
    format_cell,
    format_figure,
    format_interval,
    format_reference,
    headline_grid,
    headline_not_run_grid,
    paper_column_name,
    protocol_cells,
    protocol_sentence,
    released_grid,
    seed_cells,
    selection_bias_cells,
    source_lines,
    training_sentence,
    variant_cells,
    verdict_sentence,
)

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "report" / "templates"
CSS = REPO / "report" / "report.css"
KERNEL_NAME = "mlp-mixer-report-python"


# ---------------------------------------------------------------------------------------------
# The page
def chart_png(fig) -> str | None:
    return charts.png_base64(fig) if fig is not None else None


def log_links(logs_dir: Path, out: Path) -> list[dict]:
    """Every job log under logs_dir, named relative to it and linked relative to the page."""
    return [{"name": str(p.relative_to(logs_dir)), "href": os.path.relpath(p, out.parent)}
            for p in sorted(logs_dir.rglob("*.log"))]


def report_context(summary: dict, config: dict, logs_dir: Path, notebook_html: Path, out: Path, command: str) -> dict:
    refs = summary["references"]
    comparison = summary["comparison"]
    return {
        "summary": summary,
        "refs": refs,
        "headline": headline_grid(summary),  # Table 3 as the paper prints it
        "headline_not_run": headline_not_run_grid(summary),  # its configurations this config did not run
        "per_dataset": dataset_grid(summary),
        "released": released_grid(summary),  # the "as released" rows, apart
        "seeds": seed_cells(summary),
        "comparison": comparison_cells(comparison),
        "protocols": protocol_cells(summary),
        "source_lines": [line.replace("`", "") for line in source_lines(refs)],
        "legend": TABLE3_LEGEND,
        "released_legend": RELEASED_LEGEND,
        "interval_legend": INTERVAL_LEGEND,
        "selection_bias_legend": SELECTION_BIAS_LEGEND,
        "paper_sd_source": PAPER_SD_SOURCE,
        "protocol_sources": PROTOCOL_SOURCES,
        "interpolation": INTERPOLATION_ASSUMPTION[0].upper() + INTERPOLATION_ASSUMPTION[1:],
        "interpolation_short": INTERPOLATION_SHORT,
        "headline_protocol_note": next(p["note"] for p in summary["eval_protocols"] if p["headline"]),
        "verdicts": VERDICTS,
        "verdict_sentence": verdict_sentence(summary["verdicts"]),
        "training_sentence": training_sentence(summary["final_models_trained_on"], summary["final_seeds"]),
        "protocol_sentence": protocol_sentence(summary["eval_protocols"]).replace("`", ""),
        "variants": variant_cells(summary["variants"]),
        "selection_bias": selection_bias_cells(summary["selection_bias"]),
        "not_run": NOT_RUN,
        "no_protocol_match": NO_PROTOCOL_MATCH,
        "n_run_with_reference": sum(r["verdict"] != NOT_RUN for r in comparison if r["is_primary"]),
        "accuracy_png": chart_png(charts.accuracy_chart(summary["results"], comparison)),
        "sweep_png": chart_png(charts.lr_sweep_chart(summary["pairs"])),
        "curve_charts": [{"pair": pair, "png": chart_png(charts.training_curves_chart(pair, summary["runs"],
                                                                                       summary["curves"]))}
                         for pair in summary["pairs"]],
        "logs": log_links(logs_dir, out),
        "notebook_href": os.path.relpath(notebook_html, out.parent),
        "command": command,
        "rendered_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        # The references are shown in their own section, with their sources.
        "config_json": json.dumps({k: v for k, v in config.items() if k != "references"}, indent=2),
    }


def render_report(summary_json, config_json, notebook_html, logs_dir, out, command: str) -> Path:
    """Render the HTML page `out` (atomically) from the aggregate's summary.json and config.json."""
    import jinja2
    from markupsafe import Markup

    out = Path(out)
    summary, config = read_json(summary_json), read_json(config_json)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = format_cell
    env.filters["ref"] = format_reference
    env.filters["citation"] = lambda source: citation(summary["references"], source)
    env.filters["paper_name"] = paper_column_name
    env.filters["interval"] = lambda record: format_interval(record["ci_low"], record["ci_high"])
    env.filters["figure"] = lambda record: format_figure(record["top1_mean"], record["ci_low"], record["ci_high"])
    context = report_context(summary, config, Path(logs_dir), Path(notebook_html), out, command)
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


def execute_notebook(notebook, parameters: dict, out_ipynb, out_html) -> None:
    """Execute the notebook with papermill (`parameters`: the values of its parameters cell), then convert it to HTML.

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
                                       parameters=parameters,
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


def notebook_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.report notebook",
                                 description="Execute the analysis notebook on the aggregate's files and render it "
                                             "to HTML.")
    ap.add_argument("--notebook", required=True)
    ap.add_argument("--summary", required=True, help="summary.json of the aggregate stage")
    ap.add_argument("--runs-csv", required=True, help="runs.csv of the aggregate stage")
    ap.add_argument("--comparison-csv", required=True, help="comparison.csv of the aggregate stage")
    ap.add_argument("--out-ipynb", required=True)
    ap.add_argument("--out-html", required=True)
    args = ap.parse_args(argv)
    # Absolute: the kernel runs in the notebook's folder.
    parameters = {"summary_json": os.path.abspath(args.summary), "runs_csv": os.path.abspath(args.runs_csv),
                  "comparison_csv": os.path.abspath(args.comparison_csv)}
    execute_notebook(args.notebook, parameters, args.out_ipynb, args.out_html)
    print(f"notebook executed -> {args.out_ipynb}, {args.out_html}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["notebook"]:
        return notebook_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.report", description=__doc__.splitlines()[0],
                                 epilog="Subcommand: `notebook` executes the analysis notebook (see --help there).")
    ap.add_argument("--summary", required=True, help="summary.json of the aggregate stage")
    ap.add_argument("--config", required=True, help="config.json of the aggregate stage (the config as run)")
    ap.add_argument("--notebook-html", required=True, help="the executed notebook, linked from the page")
    ap.add_argument("--logs-dir", required=True, help="the folder of the job logs, each linked from the page")
    ap.add_argument("--out", required=True, help="the HTML page to write")
    ap.add_argument("--command", default="", help="the command line that started the run (provenance)")
    args = ap.parse_args(argv)
    out = render_report(args.summary, args.config, args.notebook_html, args.logs_dir, args.out, args.command)
    print(f"report -> {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
