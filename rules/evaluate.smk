# Model selection on minival, one test evaluation of the selected runs, and the evaluation-pipeline
# baseline (released ImageNet-1k checkpoints evaluated as they are, with every protocol).


rule select_lr:
    """Pick the base LR by mean minival top-1 over seeds; reads training summaries only, never test."""
    input:
        summaries_of_pair,
    output:
        f"{R}/selection/{{ckpt}}/{{dataset}}.json",
    log:
        f"{R}/logs/select_lr/{{ckpt}}/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/select_lr/{{ckpt}}/{{dataset}}.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.select_lr --checkpoint {wildcards.ckpt} --dataset {wildcards.dataset}"
        " --runs {input} --out {output} > {log} 2>&1"


rule evaluate:
    """Evaluate the selected LR's runs (every seed) on the test split, once."""
    input:
        selection=f"{R}/selection/{{ckpt}}/{{dataset}}.json",
        data=f"{D}/{{dataset}}/dataset.json",
        models=models_of_pair,
    output:
        report(
            f"{R}/evaluate/{{ckpt}}/{{dataset}}.json",
            caption="../report/evaluate.rst",
            category="Evaluation",
        ),
    params:
        protocol_name=lambda wc: eval_protocol_of(wc.dataset)[0],
        protocol=lambda wc: eval_protocol_of(wc.dataset)[1],
        batch_size=config["evaluation"]["batch_size"],
        num_workers=config["protocol"]["num_workers"],
        pixel_mean=config["protocol"]["pixel_mean"],
        pixel_std=config["protocol"]["pixel_std"],
        lock_dir=config["gpu_lock_dir"],
    threads: config["resources"]["evaluate"]["cpus"]
    resources:
        gpu=config["resources"]["evaluate"]["gpu"],
        gpu_model=config["resources"]["gpu_model"],
        mem_mb=config["resources"]["evaluate"]["mem_mb"],
        runtime=config["resources"]["evaluate"]["runtime_min"],
    log:
        f"{R}/logs/evaluate/{{ckpt}}/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{{ckpt}}/{{dataset}}.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.gpu_pool --gpus {resources.gpu} --lock-dir {params.lock_dir:q} --"
        " python -m workflow_scripts.evaluate --selection {input.selection} --data {input.data}"
        " --protocol-name {params.protocol_name} --protocol {params.protocol:q}"
        " --batch-size {params.batch_size} --num-workers {params.num_workers} --threads {threads}"
        " --pixel-mean {params.pixel_mean} --pixel-std {params.pixel_std} --out {output} > {log} 2>&1"


rule baseline:
    """Evaluate a released checkpoint directly (no fine-tuning) with one evaluation protocol."""
    input:
        model=f"{R}/converted/{{ckpt}}.safetensors",
        data=f"{D}/{{dataset}}/dataset.json",
    output:
        f"{R}/baseline/{{ckpt}}/{{dataset}}/{{protocol}}.json",
    params:
        protocol=lambda wc: as_json(config["evaluation"]["protocols"][wc.protocol]),
        batch_size=config["evaluation"]["batch_size"],
        num_workers=config["protocol"]["num_workers"],
        pixel_mean=config["protocol"]["pixel_mean"],
        pixel_std=config["protocol"]["pixel_std"],
        lock_dir=config["gpu_lock_dir"],
    threads: config["resources"]["evaluate"]["cpus"]
    resources:
        gpu=config["resources"]["evaluate"]["gpu"],
        gpu_model=config["resources"]["gpu_model"],
        mem_mb=config["resources"]["evaluate"]["mem_mb"],
        runtime=config["resources"]["evaluate"]["runtime_min"],
    log:
        f"{R}/logs/baseline/{{ckpt}}/{{dataset}}/{{protocol}}.log",
    benchmark:
        f"{R}/benchmarks/baseline/{{ckpt}}/{{dataset}}/{{protocol}}.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.gpu_pool --gpus {resources.gpu} --lock-dir {params.lock_dir:q} --"
        " python -m workflow_scripts.evaluate --model {input.model} --data {input.data} --split test"
        " --protocol-name {wildcards.protocol} --protocol {params.protocol:q}"
        " --batch-size {params.batch_size} --num-workers {params.num_workers} --threads {threads}"
        " --pixel-mean {params.pixel_mean} --pixel-std {params.pixel_std} --out {output} > {log} 2>&1"
