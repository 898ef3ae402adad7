# Datasets: CIFAR-10 (torchvision), ImageNet (a tree on disk, validated), digits (demo).


rule prepare_data:
    """Fetch or validate a dataset and describe it in dataset.json (read by fine-tuning and evaluation)."""
    output:
        f"{D}/{{dataset}}/dataset.json",
    params:
        spec=lambda wc: as_json(config["datasets"][wc.dataset]),
        data_root=lambda wc, output: str(Path(output[0]).parent.parent),
    retries: 2
    log:
        f"{R}/logs/prepare_data/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/prepare_data/{{dataset}}.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.prepare_data --name {wildcards.dataset} --spec {params.spec:q}"
        " --data-root {params.data_root:q} > {log} 2>&1"
