# Fine-tuning: the LR sweep (one job per checkpoint x dataset x base LR x seed), the final run at the
# selected LR on the whole training data, and the protocol variants. The three share one rule body.
# Resume state lives outside the outputs (Snakemake deletes the outputs of a failed job), so a rerun
# continues where it stopped.


rule finetune:
    """Fine-tune with the paper's protocol on the training split; minival top-1 picks the LR later."""
    input:
        checkpoint=converted_model("{ckpt}"),
        data=dataset_json("{dataset}"),
        preflight=shape_preflight,
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
        lr=lambda wc: f"--lr {wc.lr} --train-on train",
        resume_dir=lambda wc, output: resume_dir(output.model),
        steps=lambda wc: config["datasets"][wc.dataset]["steps"],
        protocol=lambda wc: as_json(checkpoint_protocol(wc.ckpt).as_dict()),
        minival_protocol=minival_protocol(),
    shell:
        gpu_job(
            "python -m workflow_scripts.finetune --checkpoint {input.checkpoint} --data {input.data}"
            " --model-out {output.model} --metrics-out {output.metrics} --summary-out {output.summary}"
            " --resume-dir {params.resume_dir} {params.lr} --preflight {input.preflight}"
            " --seed {wildcards.seed} --steps {params.steps} --protocol {params.protocol:q}"
            " --minival-protocol {params.minival_protocol:q}"
            " --threads {threads} --attempt {resources.attempt} > {log} 2>&1"
        )


use rule finetune as final_finetune with:
    input:
        checkpoint=converted_model("{ckpt}"),
        data=dataset_json("{dataset}"),
        selection=selection_json("{ckpt}", "{dataset}"),
        preflight=shape_preflight,
    output:
        model=final_run_file("{ckpt}", "{dataset}", "{seed}", "model.safetensors"),
        metrics=final_run_file("{ckpt}", "{dataset}", "{seed}", "metrics.jsonl"),
        summary=final_run_file("{ckpt}", "{dataset}", "{seed}", "summary.json"),
    log:
        log_file("final_finetune", FINAL_JOB),
    benchmark:
        benchmark_file("final_finetune", FINAL_JOB)
    params:
        lr=lambda wc, input: f"--lr-from {input.selection} --train-on full",


use rule finetune as variant_finetune with:
    input:
        checkpoint=converted_model("{ckpt}"),
        data=dataset_json("{dataset}"),
        selection=selection_json("{ckpt}", "{dataset}"),
        preflight=shape_preflight,
    output:
        model=variant_run_file("{variant}", "{ckpt}", "{dataset}", "{seed}", "model.safetensors"),
        metrics=variant_run_file("{variant}", "{ckpt}", "{dataset}", "{seed}", "metrics.jsonl"),
        summary=variant_run_file("{variant}", "{ckpt}", "{dataset}", "{seed}", "summary.json"),
    log:
        log_file("variant_finetune", VARIANT_JOB),
    benchmark:
        benchmark_file("variant_finetune", VARIANT_JOB)
    params:
        # Trained on what the paper-protocol model it is compared with was trained on.
        lr=lambda wc, input: f"--lr-from {input.selection} --train-on {final_training_data()}",
        protocol=lambda wc: as_json(variant_protocol(wc.variant).as_dict()),
