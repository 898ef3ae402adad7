# Fine-tuning: one job per checkpoint x dataset x base LR x seed. Resume state lives under
# R/.resume (not an output: Snakemake deletes the outputs of a failed job), so a rerun continues.


rule finetune:
    """Fine-tune with the paper's protocol on the training split; minival top-1 picks the LR later."""
    input:
        checkpoint=f"{R}/converted/{{ckpt}}.safetensors",
        data=f"{D}/{{dataset}}/dataset.json",
    output:
        model=f"{R}/finetune/{{ckpt}}/{{dataset}}/lr{{lr}}_s{{seed}}/model.safetensors",
        metrics=f"{R}/finetune/{{ckpt}}/{{dataset}}/lr{{lr}}_s{{seed}}/metrics.jsonl",
        summary=f"{R}/finetune/{{ckpt}}/{{dataset}}/lr{{lr}}_s{{seed}}/summary.json",
    params:
        resume_dir=lambda wc: f"{R}/.resume/{wc.ckpt}/{wc.dataset}/lr{wc.lr}_s{wc.seed}",
        steps=lambda wc: config["datasets"][wc.dataset]["steps"],
        protocol=as_json(config["protocol"]),
        lock_dir=config["gpu_lock_dir"],
    threads: config["resources"]["finetune"]["cpus"]
    resources:
        gpu=lambda wc: matrix.finetune_gpus(config, wc.ckpt),
        gpu_model=config["resources"]["gpu_model"],
        mem_mb=config["resources"]["finetune"]["mem_mb"],
        runtime=config["resources"]["finetune"]["runtime_min"],
    log:
        f"{R}/logs/finetune/{{ckpt}}/{{dataset}}/lr{{lr}}_s{{seed}}.log",
    benchmark:
        f"{R}/benchmarks/finetune/{{ckpt}}/{{dataset}}/lr{{lr}}_s{{seed}}.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.gpu_pool --gpus {resources.gpu} --lock-dir {params.lock_dir:q} --"
        " python -m workflow_scripts.finetune --checkpoint {input.checkpoint} --data {input.data}"
        " --model-out {output.model} --metrics-out {output.metrics} --summary-out {output.summary}"
        " --resume-dir {params.resume_dir} --lr {wildcards.lr}"
        " --seed {wildcards.seed} --steps {params.steps} --protocol {params.protocol:q}"
        " --threads {threads} > {log} 2>&1"
