# Aggregation, the executed analysis notebook, and the self-contained HTML report. Each stage reads
# exactly the files its rule names (the aggregate's inputs: rules/common.smk aggregate_inputs).


rule aggregate:
    """One tidy table of every run plus the Table-3-shaped comparison with the paper (CSV, Markdown, LaTeX)."""
    input:
        unpack(aggregate_inputs),
    output:
        runs=report(aggregate_file("runs.csv"), caption="../report/runs.rst", category="Tables"),
        comparison=report(aggregate_file("comparison.csv"), caption="../report/comparison.rst", category="Tables"),
        markdown=aggregate_file("comparison.md"),
        latex=aggregate_file("comparison.tex"),
        summary=aggregate_file("summary.json"),
        config=aggregate_file("config.json"),
    log:
        log_file("aggregate", "aggregate"),
    benchmark:
        benchmark_file("aggregate", "aggregate")
    conda:
        "../envs/pipeline.yaml"
    params:
        config=lambda wc: as_ordered_json(config),
    shell:
        "python -m workflow_scripts.aggregate --config-json {params.config:q}"
        " --summaries {input.summaries} --metrics {input.metrics}"
        " --finetune-benchmarks {input.finetune_benchmarks} --selections {input.selections}"
        " --evaluations {input.evaluations} --variant-evaluations {input.variant_evaluations}"
        " --sweep-evaluations {input.sweep_evaluations} --baselines {input.baselines} --parity {input.parity}"
        " --downloads {input.downloads} --datasets {input.datasets} --reals {input.reals}"
        " --model-stats {input.model_stats} --job-benchmarks {input.job_benchmarks}"
        " --preflight-summary {input.preflight_summary}"
        " --runs-csv {output.runs} --comparison-csv {output.comparison} --comparison-md {output.markdown}"
        " --comparison-tex {output.latex} --summary-json {output.summary} --config-json-out {output.config}"
        " > {log} 2>&1"


rule notebook:
    """Execute the analysis notebook with papermill on the aggregate's files, then render it to HTML."""
    input:
        notebook=workflow.source_path("../notebooks/analysis.ipynb"),
        summary=aggregate_file("summary.json"),
        runs=aggregate_file("runs.csv"),
        comparison=aggregate_file("comparison.csv"),
    output:
        ipynb=report_file("analysis.ipynb"),
        html=report(report_file("analysis.html"), caption="../report/notebook.rst", category="Report"),
    log:
        log_file("notebook", "notebook"),
    benchmark:
        benchmark_file("notebook", "notebook")
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.report notebook --notebook {input.notebook} --summary {input.summary}"
        " --runs-csv {input.runs} --comparison-csv {input.comparison}"
        " --out-ipynb {output.ipynb} --out-html {output.html} > {log} 2>&1"


rule report:
    """Render the self-contained HTML report: paper vs reproduction, curves, parity, provenance."""
    input:
        summary=aggregate_file("summary.json"),
        config=aggregate_file("config.json"),
        notebook=report_file("analysis.html"),
    output:
        report(report_file("index.html"), caption="../report/report.rst", category="Report"),
    log:
        log_file("report", "report"),
    benchmark:
        benchmark_file("report", "report")
    conda:
        "../envs/pipeline.yaml"
    params:
        logs_dir=logs_dir(),  # every job's log is linked from the page
    shell:
        "python -m workflow_scripts.report --summary {input.summary} --config {input.config}"
        " --notebook-html {input.notebook} --logs-dir {params.logs_dir} --out {output}"
        ' --command "${{MIXER_COMMAND_LINE:-}}" > {log} 2>&1'
        " && echo 'Report: {output}'"
