# Aggregation, the executed analysis notebook, and the self-contained HTML report. Each stage reads
# exactly the files its rule names (the aggregate's inputs: rules/common.smk aggregate_inputs).


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
    log:
        f"{R}/logs/aggregate/aggregate.log",
    benchmark:
        f"{R}/benchmarks/aggregate/aggregate.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.aggregate --config-json {params.config:q}"
        " --summaries {input.summaries} --metrics {input.metrics}"
        " --finetune-benchmarks {input.finetune_benchmarks} --selections {input.selections}"
        " --evaluations {input.evaluations} --baselines {input.baselines} --parity {input.parity}"
        " --downloads {input.downloads} --datasets {input.datasets}"
        " --runs-csv {output.runs} --comparison-csv {output.comparison} --comparison-md {output.markdown}"
        " --comparison-tex {output.latex} --summary-json {output.summary} --config-json-out {output.config}"
        " > {log} 2>&1"


rule notebook:
    """Execute the analysis notebook with papermill on the aggregate's files, then render it to HTML."""
    input:
        notebook=workflow.source_path("../notebooks/analysis.ipynb"),
        summary=f"{R}/aggregate/summary.json",
        runs=f"{R}/aggregate/runs.csv",
        comparison=f"{R}/aggregate/comparison.csv",
    output:
        ipynb=f"{R}/report/analysis.ipynb",
        html=report(f"{R}/report/analysis.html", caption="../report/notebook.rst", category="Report"),
    log:
        f"{R}/logs/notebook/notebook.log",
    benchmark:
        f"{R}/benchmarks/notebook/notebook.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.report notebook --notebook {input.notebook} --summary {input.summary}"
        " --runs-csv {input.runs} --comparison-csv {input.comparison}"
        " --out-ipynb {output.ipynb} --out-html {output.html} > {log} 2>&1"


rule report:
    """Render the self-contained HTML report: paper vs reproduction, curves, parity, provenance."""
    input:
        summary=f"{R}/aggregate/summary.json",
        config=f"{R}/aggregate/config.json",
        notebook=f"{R}/report/analysis.html",
    output:
        report(f"{R}/report/index.html", caption="../report/report.rst", category="Report"),
    params:
        logs_dir=f"{R}/logs",  # every job's log is linked from the page
    log:
        f"{R}/logs/report/report.log",
    benchmark:
        f"{R}/benchmarks/report/report.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.report --summary {input.summary} --config {input.config}"
        " --notebook-html {input.notebook} --logs-dir {params.logs_dir} --out {output}"
        " --command \"${{MIXER_COMMAND_LINE:-}}\" > {log} 2>&1"
        " && echo 'Report: {output}'"
