# The preflight: one job per GPU job shape (matrix.job_shape: body x image size x GPU count) on the node the
# study uses, before any fine-tuning or evaluation job of that shape (they take its result as an ancient()
# input: rules/common.smk shape_preflight), and the plan's ETA from the rates it measured.


rule preflight_shape:
    """Memory, speed, micro-batch, DDP, loader and numerics of one job shape; fails naming the key to change."""
    input:
        unpack(preflight_input),
    output:
        preflight_json("{shape}"),
    log:
        log_file("preflight_shape", "{shape}"),
    benchmark:
        benchmark_file("preflight_shape", "{shape}")
    conda:
        "../envs/pipeline.yaml"
    threads: config["resources"]["finetune"]["cpus"]
    resources:
        gpu=lambda wc: matrix.finetune_gpus(config, shape_checkpoint(wc.shape)),
        gpu_model=config["resources"]["gpu_model"],
        mem_mb=config["resources"]["finetune"]["mem_mb"],
        runtime=min(30, config["resources"]["finetune"]["runtime_min"]),
    params:
        protocol=lambda wc: as_json(checkpoint_protocol(shape_checkpoint(wc.shape)).as_dict()),
        eval_protocol=eval_protocol(),
        eval_batch_size=config["evaluation"]["batch_size"],
    shell:
        gpu_job(
            "python -m workflow_scripts.preflight shape --shape {wildcards.shape} --checkpoint {input.checkpoint}"
            " --data {input.data} --protocol {params.protocol:q} --eval-protocol {params.eval_protocol:q}"
            " --eval-batch-size {params.eval_batch_size} --gpus {resources.gpu} --threads {threads}"
            " --out {output} > {log} 2>&1"
        )


rule preflight:
    """Every shape's preflight and the plan's device-hours and ETA (`make preflight`); prints the table."""
    input:
        shapes=[preflight_json(shape) for shape in matrix.job_shapes(config)],
        # eta counts each job's images from the prepared datasets
        datasets=[dataset_json(ds) for ds in matrix.used_datasets(config)],
    output:
        preflight_summary(),
    log:
        log_file("preflight", "summary"),
    benchmark:
        benchmark_file("preflight", "summary")
    conda:
        "../envs/pipeline.yaml"
    params:
        config=lambda wc: as_ordered_json(config),
        gpus=preflight_gpus(),
    shell:
        "python -m workflow_scripts.preflight summary --config-json {params.config:q} --shapes {input.shapes}"
        " --out {output} {params.gpus} 2>&1 | tee {log}"
