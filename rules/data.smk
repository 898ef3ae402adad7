# Datasets: CIFAR-10 (torchvision), ImageNet (a tree on disk, validated), digits (demo).


rule prepare_data:
    """Fetch or validate a dataset and describe it in dataset.json (read by fine-tuning and evaluation)."""
    output:
        dataset_json("{dataset}"),
    params:
        dataset_config=lambda wc: as_json(config["datasets"][wc.dataset]),
    retries: 2
    log:
        log_file("prepare_data", "{dataset}"),
    benchmark:
        benchmark_file("prepare_data", "{dataset}")
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.prepare_data --name {wildcards.dataset}"
        " --dataset-config {params.dataset_config:q} --out {output} > {log} 2>&1"
