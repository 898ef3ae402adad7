# Aggregation, the executed analysis notebook, and the self-contained HTML report.


rule aggregate:
    """One tidy table of every run plus paper-vs-reproduction tables (CSV, Markdown, LaTeX)."""
    input:
        unpack(aggregate_inputs),
    output:
        runs=report(f"{R}/aggregate/runs.csv", caption="../report/runs.rst", category="Tables"),
        comparison=report(
            f"{R}/aggregate/comparison.csv", caption="../report/comparison.rst", category="Tables"
        ),
        markdown=f"{R}/aggregate/comparison.md",
        latex=f"{R}/aggregate/comparison.tex",
        summary=f"{R}/aggregate/summary.json",
        config=f"{R}/aggregate/config.json",
    params:
        config=as_json(config),
        results_root=lambda wc, output: results_root_of(output.runs),
        out_dir=lambda wc, output: str(Path(output.runs).parent),
    log:
        f"{R}/logs/aggregate/aggregate.log",
    benchmark:
        f"{R}/benchmarks/aggregate/aggregate.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.aggregate --config-json {params.config:q}"
        " --results-root {params.results_root} --out-dir {params.out_dir} > {log} 2>&1"


rule notebook:
    """Execute the analysis notebook with papermill on the aggregated results, then render it to HTML."""
    input:
        notebook=workflow.source_path("../notebooks/analysis.ipynb"),
        runs=f"{R}/aggregate/runs.csv",
        comparison=f"{R}/aggregate/comparison.csv",
    output:
        ipynb=f"{R}/report/analysis.ipynb",
        html=report(f"{R}/report/analysis.html", caption="../report/notebook.rst", category="Report"),
    params:
        results_root=lambda wc, input: results_root_of(input.runs),
    log:
        f"{R}/logs/notebook/notebook.log",
    benchmark:
        f"{R}/benchmarks/notebook/notebook.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.report notebook --notebook {input.notebook}"
        " --results-root {params.results_root} --out-ipynb {output.ipynb} --out-html {output.html}"
        " > {log} 2>&1"


rule report:
    """Render the self-contained HTML report: paper vs reproduction, curves, parity, provenance."""
    input:
        aggregate=f"{R}/aggregate/summary.json",
        notebook=f"{R}/report/analysis.html",
    output:
        report(f"{R}/report/index.html", caption="../report/report.rst", category="Report"),
    params:
        results_root=lambda wc, input: results_root_of(input.aggregate),
        aggregate_dir=lambda wc, input: str(Path(input.aggregate).parent),
    log:
        f"{R}/logs/report/report.log",
    benchmark:
        f"{R}/benchmarks/report/report.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.report --aggregate-dir {params.aggregate_dir} --results-root {params.results_root}"
        " --notebook-html {input.notebook} --out {output} --command \"${{MIXER_COMMAND_LINE:-}}\" > {log} 2>&1"
        " && echo 'Report: {output}'"
