# Aggregation, the executed analysis notebook, and the self-contained HTML report.


rule aggregate:
    """One tidy table of every run plus paper-vs-reproduction tables (CSV, Markdown, LaTeX)."""
    input:
        unpack(aggregate_inputs),
    output:
        runs=report(aggregate_file("runs.csv"), caption="../report/runs.rst", category="Tables"),
        comparison=report(
            aggregate_file("comparison.csv"), caption="../report/comparison.rst", category="Tables"
        ),
        markdown=aggregate_file("comparison.md"),
        latex=aggregate_file("comparison.tex"),
        summary=aggregate_file("summary.json"),
        config=aggregate_file("config.json"),
    params:
        config=as_json(config),
        results_root=results_root,
        out_dir=lambda wc, output: str(Path(output.runs).parent),
    log:
        log_file("aggregate", "aggregate"),
    benchmark:
        benchmark_file("aggregate", "aggregate")
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.aggregate --config-json {params.config:q}"
        " --results-root {params.results_root} --out-dir {params.out_dir} > {log} 2>&1"


rule notebook:
    """Execute the analysis notebook with papermill on the aggregated results, then render it to HTML."""
    input:
        notebook=workflow.source_path("../notebooks/analysis.ipynb"),
        runs=aggregate_file("runs.csv"),
        comparison=aggregate_file("comparison.csv"),
    output:
        ipynb=report_file("analysis.ipynb"),
        html=report(report_file("analysis.html"), caption="../report/notebook.rst", category="Report"),
    params:
        results_root=results_root,
    log:
        log_file("notebook", "notebook"),
    benchmark:
        benchmark_file("notebook", "notebook")
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.report notebook --notebook {input.notebook}"
        " --results-root {params.results_root} --out-ipynb {output.ipynb} --out-html {output.html}"
        " > {log} 2>&1"


rule report:
    """Render the self-contained HTML report: paper vs reproduction, curves, parity, provenance."""
    input:
        aggregate=aggregate_file("summary.json"),
        notebook=report_file("analysis.html"),
    output:
        report(report_file("index.html"), caption="../report/report.rst", category="Report"),
    params:
        results_root=results_root,
        aggregate_dir=lambda wc, input: str(Path(input.aggregate).parent),
    log:
        log_file("report", "report"),
    benchmark:
        benchmark_file("report", "report")
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.report --aggregate-dir {params.aggregate_dir} --results-root {params.results_root}"
        " --notebook-html {input.notebook} --out {output} --command \"${{MIXER_COMMAND_LINE:-}}\" > {log} 2>&1"
        " && echo 'Report: {output}'"
