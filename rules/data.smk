# Datasets: CIFAR-10/100, Pets, Flowers (torchvision), ImageNet-style trees (validated), digits and
# stand-in trees (demo).


rule synthesize_data:
    """Write a stand-in dataset tree in ImageNet's on-disk layout (demo), with ReaL-style relabels."""
    output:
        manifest=upstream_data_manifest("{dataset}"),
    log:
        log_file("synthesize_data", "{dataset}"),
    benchmark:
        benchmark_file("synthesize_data", "{dataset}")
    conda:
        "../envs/pipeline.yaml"
    params:
        seed=lambda wc: config["datasets"][wc.dataset]["source"]["synthesize"]["seed"],
        tree=lambda wc, output: str(Path(output.manifest).parent),
    shell:
        "python -m workflow_scripts.synthesize_data --seed {params.seed} --out-dir {params.tree} > {log} 2>&1"


rule prepare_data:
    """Fetch or validate a dataset and describe it in dataset.json (read by fine-tuning and evaluation)."""
    input:
        synthesize_data_input,
    output:
        dataset_json("{dataset}"),
    log:
        log_file("prepare_data", "{dataset}"),
    benchmark:
        benchmark_file("prepare_data", "{dataset}")
    retries: 2
    conda:
        "../envs/pipeline.yaml"
    params:
        dataset_config=lambda wc: as_json(config["datasets"][wc.dataset]),
    shell:
        "python -m workflow_scripts.prepare_data --name {wildcards.dataset}"
        " --dataset-config {params.dataset_config:q} --out {output} > {log} 2>&1"
