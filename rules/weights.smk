# Upstream checkpoints: (synthesize ->) download -> convert to timm safetensors with a parity record.


rule synthesize_upstream:
    """Write a small random-init Mixer in the official .npz layout (demo checkpoints, via the inverse export)."""
    output:
        f"{R}/upstream/{{ckpt}}.npz",
    params:
        architecture=lambda wc: as_json(config["checkpoints"][wc.ckpt]["architecture"]),
        seed=lambda wc: config["checkpoints"][wc.ckpt]["synthesize"]["seed"],
    log:
        f"{R}/logs/synthesize_upstream/{{ckpt}}.log",
    benchmark:
        f"{R}/benchmarks/synthesize_upstream/{{ckpt}}.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.synthesize_upstream --architecture {params.architecture:q}"
        " --seed {params.seed} --out {output} > {log} 2>&1"


rule download_weights:
    """Fetch a checkpoint (https, file: or a local mirror), resumable, sha256 recorded and verified."""
    input:
        synthesize_input,
    output:
        npz=f"{W}/{{ckpt}}.npz",
        record=f"{W}/{{ckpt}}.download.json",
    params:
        url=lambda wc: config["checkpoints"][wc.ckpt]["url"],
        lock=config["weights_lock"],
        extra=download_args,
    retries: 3
    log:
        f"{R}/logs/download_weights/{{ckpt}}.log",
    benchmark:
        f"{R}/benchmarks/download_weights/{{ckpt}}.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.download --checkpoint {wildcards.ckpt} --url {params.url:q}"
        " --out {output.npz} --record {output.record} --lock {params.lock:q} {params.extra} > {log} 2>&1"


rule convert_weights:
    """Official Flax .npz -> timm safetensors; strict key/shape checks; parity vs a NumPy reference."""
    input:
        f"{W}/{{ckpt}}.npz",
    output:
        model=f"{R}/converted/{{ckpt}}.safetensors",
        parity=report(
            f"{R}/converted/{{ckpt}}.parity.json",
            caption="../report/parity.rst",
            category="Conversion",
        ),
    params:
        architecture=lambda wc: as_json(config["checkpoints"][wc.ckpt]["architecture"]),
    log:
        f"{R}/logs/convert_weights/{{ckpt}}.log",
    benchmark:
        f"{R}/benchmarks/convert_weights/{{ckpt}}.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.convert {input} {output.model} --checkpoint {wildcards.ckpt}"
        " --expect-architecture {params.architecture:q} --parity {output.parity} > {log} 2>&1"
