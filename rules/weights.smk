# Upstream checkpoints: (synthesize ->) download -> convert to timm safetensors with a parity record.


rule synthesize_upstream:
    """Write a small random-init Mixer in the official .npz layout (demo checkpoints, via the inverse export)."""
    output:
        upstream_npz("{ckpt}"),
    log:
        log_file("synthesize_upstream", "{ckpt}"),
    benchmark:
        benchmark_file("synthesize_upstream", "{ckpt}")
    conda:
        "../envs/pipeline.yaml"
    params:
        architecture=lambda wc: as_json(config["checkpoints"][wc.ckpt]["architecture"]),
        seed=lambda wc: config["checkpoints"][wc.ckpt]["synthesize"]["seed"],
    shell:
        "python -m workflow_scripts.synthesize_upstream --architecture {params.architecture:q}"
        " --seed {params.seed} --out {output} > {log} 2>&1"


rule download_weights:
    """Fetch a checkpoint (https, file: or a local mirror), resumable, sha256 recorded and verified."""
    input:
        synthesize_input,
    output:
        npz=weights_file("{ckpt}", ".npz"),
        record=weights_file("{ckpt}", ".download.json"),
    log:
        log_file("download_weights", "{ckpt}"),
    benchmark:
        benchmark_file("download_weights", "{ckpt}")
    retries: 3
    conda:
        "../envs/pipeline.yaml"
    params:
        url=lambda wc: config["checkpoints"][wc.ckpt]["url"],
        lock=config["weights_lock"],
        extra=download_args,
    shell:
        "python -m workflow_scripts.download --checkpoint {wildcards.ckpt} --url {params.url:q}"
        " --out {output.npz} --record {output.record} --lock {params.lock:q} {params.extra} > {log} 2>&1"


rule convert_weights:
    """Official Flax .npz -> timm safetensors; strict key/shape checks; parity vs a NumPy reference."""
    input:
        lambda wc: downloaded_npz(wc.ckpt),
    output:
        model=converted_model("{ckpt}"),
        parity=report(parity_record("{ckpt}"), caption="../report/parity.rst", category="Conversion"),
    log:
        log_file("convert_weights", "{ckpt}"),
    benchmark:
        benchmark_file("convert_weights", "{ckpt}")
    conda:
        "../envs/pipeline.yaml"
    params:
        architecture=lambda wc: as_json(config["checkpoints"][wc.ckpt]["architecture"]),
        # Appendix C's higher-resolution Mixer: K = image_size / the .npz's (1: the released model as it is).
        image_size=lambda wc: config["checkpoints"][wc.ckpt]["architecture"]["image_size"],
    shell:
        "python -m workflow_scripts.convert {input} {output.model} --checkpoint {wildcards.ckpt}"
        " --image-size {params.image_size} --expect-architecture {params.architecture:q}"
        " --parity {output.parity} > {log} 2>&1"
