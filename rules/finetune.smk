# Fine-tuning: one job per checkpoint x dataset x base LR x seed. Resume state lives outside the
# outputs (Snakemake deletes the outputs of a failed job), so a rerun continues where it stopped.


rule finetune:
    """Fine-tune with the paper's protocol on the training split; minival top-1 picks the LR later."""
    input:
        checkpoint=converted_model("{ckpt}"),
        data=dataset_json("{dataset}"),
    output:
        model=run_file("{ckpt}", "{dataset}", "{lr}", "{seed}", "model.safetensors"),
        metrics=run_file("{ckpt}", "{dataset}", "{lr}", "{seed}", "metrics.jsonl"),
        summary=run_file("{ckpt}", "{dataset}", "{lr}", "{seed}", "summary.json"),
    log:
        log_file("finetune", RUN_JOB),
    benchmark:
        benchmark_file("finetune", RUN_JOB)
    conda:
        "../envs/pipeline.yaml"
    threads: config["resources"]["finetune"]["cpus"]
    resources:
        gpu=lambda wc: matrix.finetune_gpus(config, wc.ckpt),
        gpu_model=config["resources"]["gpu_model"],
        mem_mb=config["resources"]["finetune"]["mem_mb"],
        runtime=config["resources"]["finetune"]["runtime_min"],
        # Snakemake's attempt number: a retry of a job that failed for a reason a retry cannot fix
        # (out of memory, NaN) stops at once (finetune's failed.json; docs/slurm.md).
        attempt=lambda wc, attempt: attempt,
    params:
        resume_dir=lambda wc: resume_dir(wc.ckpt, wc.dataset, wc.lr, wc.seed),
        steps=lambda wc: config["datasets"][wc.dataset]["steps"],
        protocol=as_json(config["protocol"]),
    shell:
        gpu_job(
            "python -m workflow_scripts.finetune --checkpoint {input.checkpoint} --data {input.data}"
            " --model-out {output.model} --metrics-out {output.metrics} --summary-out {output.summary}"
            " --resume-dir {params.resume_dir} --lr {wildcards.lr}"
            " --seed {wildcards.seed} --steps {params.steps} --protocol {params.protocol:q}"
            " --threads {threads} --attempt {resources.attempt} > {log} 2>&1"
        )
