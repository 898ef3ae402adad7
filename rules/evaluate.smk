# Model selection on minival; the test evaluations (a pair's final models with every protocol, the
# released checkpoints as they are, the protocol variants, and the sweep runs on test for the
# selection-bias table and the official code's figures), which share one rule body; ReaL-style top-1
# from stored predictions.


rule select_lr:
    """Pick the base LR by mean minival top-1 over seeds; reads training summaries only, never test."""
    input:
        lambda wc: pair_runs(wc, "summary.json"),
    output:
        selection_json("{ckpt}", "{dataset}"),
    log:
        log_file("select_lr", PAIR_JOB),
    benchmark:
        benchmark_file("select_lr", PAIR_JOB)
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.select_lr --checkpoint {wildcards.ckpt} --dataset {wildcards.dataset}"
        " --runs {input} --out {output} > {log} 2>&1"


rule evaluate:
    """Evaluate a pair's final model(s) (every seed) on the test split, once, with one protocol."""
    input:
        unpack(final_models),
        data=dataset_json("{dataset}"),
        preflight=shape_preflight,
    output:
        result=report(
            evaluation_json("{ckpt}", "{dataset}", "{protocol}"),
            caption="../report/evaluate.rst",
            category="Evaluation",
        ),
        predictions=predictions_file(evaluation_json("{ckpt}", "{dataset}", "{protocol}")),
    log:
        log_file("evaluate", PROTOCOL_JOB),
    benchmark:
        benchmark_file("evaluate", PROTOCOL_JOB)
    conda:
        "../envs/pipeline.yaml"
    threads: config["resources"]["evaluate"]["cpus"]
    resources:
        gpu=config["resources"]["evaluate"]["gpu"],
        gpu_model=config["resources"]["gpu_model"],
        mem_mb=config["resources"]["evaluate"]["mem_mb"],
        runtime=config["resources"]["evaluate"]["runtime_min"],
    params:
        what=models_arguments,
        protocol_name=lambda wc: wc.protocol,
        protocol=lambda wc: eval_protocol(wc.protocol, wc.ckpt),
        batch_size=config["evaluation"]["batch_size"],
        num_workers=config["protocol"]["num_workers"],
        decode_device=config["protocol"]["decode_device"],
        precision=config["protocol"]["precision"],
        pixel_mean=config["protocol"]["pixel_mean"],
        pixel_std=config["protocol"]["pixel_std"],
    shell:
        gpu_job(
            "python -m workflow_scripts.evaluate {params.what} --data {input.data}"
            " --protocol-name {params.protocol_name} --protocol {params.protocol:q}"
            " --batch-size {params.batch_size} --num-workers {params.num_workers} --threads {threads}"
            " --decode-device {params.decode_device} --precision {params.precision}"
            " --pixel-mean {params.pixel_mean} --pixel-std {params.pixel_std}"
            " --out {output.result} --predictions-out {output.predictions} > {log} 2>&1"
        )


use rule evaluate as baseline with:
    input:
        model=converted_model("{ckpt}"),
        data=dataset_json("{dataset}"),
        preflight=shape_preflight,
    output:
        result=baseline_json("{ckpt}", "{dataset}", "{protocol}"),
        predictions=predictions_file(baseline_json("{ckpt}", "{dataset}", "{protocol}")),
    log:
        log_file("baseline", BASELINE_JOB),
    benchmark:
        benchmark_file("baseline", BASELINE_JOB)
    params:
        what=lambda wc, input: f"--model {input.model}",


use rule evaluate as evaluate_variant with:
    input:
        models=lambda wc: [
            variant_run_file(wc.variant, wc.ckpt, wc.dataset, s, "model.safetensors")
            for s in config["finetune"]["seeds"]
        ],
        summaries=lambda wc: [
            variant_run_file(wc.variant, wc.ckpt, wc.dataset, s, "summary.json") for s in config["finetune"]["seeds"]
        ],
        data=dataset_json("{dataset}"),
        preflight=shape_preflight,
    output:
        result=variant_evaluation_json("{variant}", "{ckpt}", "{dataset}"),
        predictions=predictions_file(variant_evaluation_json("{variant}", "{ckpt}", "{dataset}")),
    log:
        log_file("evaluate_variant", VARIANT_PAIR_JOB),
    benchmark:
        benchmark_file("evaluate_variant", VARIANT_PAIR_JOB)
    params:
        what=models_arguments,
        protocol_name=config["evaluation"]["headline_protocol"],
        protocol=eval_protocol(),


use rule evaluate as evaluate_sweep with:
    input:
        models=lambda wc: pair_runs(wc, "model.safetensors"),
        summaries=lambda wc: pair_runs(wc, "summary.json"),
        data=dataset_json("{dataset}"),
        preflight=shape_preflight,
    output:
        result=sweep_evaluation_json("{ckpt}", "{dataset}", "{protocol}"),
        predictions=predictions_file(sweep_evaluation_json("{ckpt}", "{dataset}", "{protocol}")),
    log:
        log_file("evaluate_sweep", PROTOCOL_JOB),
    benchmark:
        benchmark_file("evaluate_sweep", PROTOCOL_JOB)
    params:
        what=models_arguments,


rule model_stats:
    """Table 1's parameters (head excluded) and Table 3's throughput column: inference images/s per device of a
    converted checkpoint at its resolution, in the study's precision, on the study's devices."""
    input:
        converted_model("{ckpt}"),
    output:
        model_stats_json("{ckpt}"),
    log:
        log_file("model_stats", "{ckpt}"),
    benchmark:
        benchmark_file("model_stats", "{ckpt}")
    conda:
        "../envs/pipeline.yaml"
    threads: config["resources"]["evaluate"]["cpus"]
    resources:
        gpu=config["resources"]["evaluate"]["gpu"],
        gpu_model=config["resources"]["gpu_model"],
        mem_mb=config["resources"]["evaluate"]["mem_mb"],
        runtime=config["resources"]["evaluate"]["runtime_min"],
    params:
        precision=config["protocol"]["precision"],
        batch_size=config["throughput"]["batch_size"],
        warmup=config["throughput"]["warmup_batches"],
        rounds=config["throughput"]["rounds"],
        iterations=config["throughput"]["batches_per_round"],
    shell:
        gpu_job(
            "python -m workflow_scripts.model_stats {input} --out {output} --name {wildcards.ckpt}"
            " --precision {params.precision} --batch-size {params.batch_size} --warmup {params.warmup}"
            " --rounds {params.rounds} --iterations {params.iterations} --threads {threads} > {log} 2>&1"
        )


rule download_real_labels:
    """Fetch a dataset's ReaL labels (real.json) through the checkpoints' download code, sha256 pinned."""
    input:
        synthesize_data_input,
    output:
        labels=real_labels_json("{dataset}"),
        record=real_labels_record("{dataset}"),
    log:
        log_file("download_real_labels", "{dataset}"),
    benchmark:
        benchmark_file("download_real_labels", "{dataset}")
    retries: 3
    conda:
        "../envs/pipeline.yaml"
    params:
        url=lambda wc: config["datasets"][wc.dataset]["real_labels"]["url"],
        lock=config["weights_lock"],
        extra=real_labels_download_args,
    shell:
        "python -m workflow_scripts.download --key datasets.{wildcards.dataset}.real_labels --content json"
        " --url {params.url:q} --out {output.labels} --record {output.record} --lock {params.lock:q}"
        " {params.extra} > {log} 2>&1"


rule real:
    """ReaL-style top-1 of a test result from its stored predictions (the model is not run again)."""
    input:
        unpack(real_input),
    output:
        real_json("{ckpt}", "{dataset}", "{source}", "{protocol}"),
    log:
        log_file("real", REAL_JOB),
    benchmark:
        benchmark_file("real", REAL_JOB)
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.real --predictions {input.predictions} --real-labels {input.labels}"
        " --data {input.data} --protocol {wildcards.protocol} --out {output} > {log} 2>&1"
