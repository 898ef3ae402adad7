"""Every benchmark of the pipeline, each against a bare baseline measured in the same run.

    python -m workflow_scripts.bench [training|evaluation|conversion|image_train|image_eval|image_gpu_decode ...]
        [--threads 2] [--steps 4] [--rounds 5]

With no name, all of them run (`make bench`). Each prints one JSON line last:
- training: the fine-tuning engine against a bare timm + torch loop (below);
- evaluation: the evaluation engine against a bare timm forward loop, same model, batches and threads;
- conversion: converting a synthesized Mixer-B/16 (21843 classes) in child processes, time and memory;
- image_train, image_eval: the image-file path of a DataLoader worker (read, decode, crop + resize to
  uint8) on generated ImageNet-like JPEGs, per core, against torchvision.io.decode_jpeg alone in the
  same run (ratio; ratio_to_opencv_decode: against OpenCV's decode, the one the path uses), and the
  cores one H100 needs for Mixer-B/16 at 40% utilisation (issue #13);
- image_gpu_decode: decode_device "cuda" (nvJPEG + crop on the GPU), img/s; skipped without CUDA.

Training:
The engine is `finetune.train` itself (accumulation, clipping, schedule, the real array data path
with on-device augmentation, logging) on a synthetic array dataset; its img/s is read from the
metrics it logs, leaving out the first (warm-up) interval. The bare loop trains the same timm model
with the same micro-batch, threads, device and precision on pre-normalised batches already in
memory: forward, backward, optimizer step, nothing else. Rounds alternate between the two so both
see the same machine load. On CUDA, Mixer-B/16 at 224 px in bf16 is measured the same way and its
model FLOP utilisation reported (FLOPs counted from the architecture, peak from PEAK_BF16_TFLOPS).

The last line printed is a JSON object with engine_img_s, bare_img_s and ratio (median over rounds of engine / bare).
"""
from __future__ import annotations

import argparse
import datetime
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from workflow_scripts import data, evaluate, finetune, model_io
from workflow_scripts.common import PipelineError, run_cli
from workflow_scripts.convert import random_official_params
from workflow_scripts.protocol import Protocol

REPO = Path(__file__).resolve().parents[1]
# The small Mixer of the CPU benchmark (0.57 M parameters, 32 px) and Mixer-B/16 (vit_jax configs).
SMALL_MIXER = {"patch_size": 4, "hidden_dim": 128, "num_blocks": 4, "tokens_mlp_dim": 64,
               "channels_mlp_dim": 512, "num_classes": 10, "image_size": 32}
MIXER_B16 = {"patch_size": 16, "hidden_dim": 768, "num_blocks": 12, "tokens_mlp_dim": 384,
             "channels_mlp_dim": 3072, "num_classes": 10, "image_size": 224}
# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, by the exact name CUDA reports (torch.cuda.get_device_name),
# from NVIDIA's datasheets (where a sheet gives only the figure with sparsity, half of it). Exact names only: a
# substring would give the L40 the L4's peak, the H100 NVL or PCIe the SXM's, and a MIG slice ("... MIG 1g.10gb")
# the whole GPU's. A name not listed gets no MFU ("unknown peak").
PEAK_BF16_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.5,    # H100 SXM5: 1,979 with sparsity (H100 datasheet)
    "NVIDIA H100 PCIe": 756.5,         # 1,513 with sparsity
    "NVIDIA H100 NVL": 835.5,          # 1,671 with sparsity
    "NVIDIA H200": 989.5,              # H200 SXM: 1,979 with sparsity (H200 datasheet)
    "NVIDIA H200 NVL": 835.5,          # 1,671 with sparsity
    "NVIDIA GH200 480GB": 989.5,       # its H100 as the SXM5 one (GH200 datasheet)
    "NVIDIA A100-SXM4-40GB": 312.0,    # A100 datasheet: 312 for every A100 form factor
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA L40S": 362.05,             # L40S datasheet
    "NVIDIA L40": 181.05,              # L40 datasheet
    "NVIDIA L4": 121.0,                # 242 with sparsity (L4 datasheet)
    "NVIDIA A10": 125.0,               # A10 datasheet
}


def forward_flops(arch: dict) -> float:
    """Forward FLOPs of one image (2 per multiply-add; matrix products only: LayerNorm, GELU, biases
    and the token mean are under 1% of the total)."""
    tokens = (arch["image_size"] // arch["patch_size"]) ** 2
    d = arch["hidden_dim"]
    stem = 2 * tokens * arch["patch_size"] ** 2 * 3 * d
    token_mlp = 2 * 2 * d * tokens * arch["tokens_mlp_dim"]     # two Dense layers over the token axis
    channel_mlp = 2 * 2 * tokens * d * arch["channels_mlp_dim"]  # two Dense layers over the channel axis
    head = 2 * d * arch["num_classes"]
    return stem + arch["num_blocks"] * (token_mlp + channel_mlp) + head


def peak_tflops(device_name: str) -> float | None:
    """The device's dense bf16 peak, or None where its exact name is not in PEAK_BF16_TFLOPS."""
    return PEAK_BF16_TFLOPS.get(device_name.strip())


def write_workload(folder: Path, arch: dict, num_images: int) -> tuple[Path, Path]:
    """A converted checkpoint of `arch` and an array dataset of random images, as the pipeline writes them."""
    torch.manual_seed(0)
    checkpoint = folder / "model.safetensors"
    model_io.save_model(model_io.build_model(arch), arch, checkpoint)
    rng = np.random.default_rng(0)
    size, classes = arch["image_size"], arch["num_classes"]
    n_minival = max(classes, num_images // 50)
    for split, n in (("train", num_images), ("val", n_minival)):
        np.savez(folder / f"{split}.npz", images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                 labels=rng.integers(0, classes, n, dtype=np.int64))
    dataset = folder / "dataset.json"
    dataset.write_text(json.dumps({
        "name": "bench", "label": "random images", "layout": "arrays", "root": str(folder),
        "classes": [str(c) for c in range(classes)], "num_classes": classes,
        "splits": {"train": num_images, "val": n_minival}, "train_split": "train", "test_split": "val",
        "minival": {"split": "val"}, "subset": False, "subset_note": None}))
    return checkpoint, dataset


def engine_img_s(folder: Path, checkpoint: Path, dataset: Path, protocol: dict, steps: int, threads: int) -> float:
    """finetune.train's own training throughput, without its first (warm-up) logging interval."""
    run = folder / f"run{time.monotonic_ns()}"
    outputs = finetune.Outputs(run / "model.safetensors", run / "metrics.jsonl", run / "summary.json")
    summary = finetune.train(checkpoint, dataset, outputs, run / "resume", lr=0.01, seed=0, steps=steps,
                             protocol=Protocol.from_config(protocol), threads=threads)
    timed = summary["timings"][1:]
    images = protocol["batch_size"] * protocol["log_every"] * len(timed)
    return images / sum(protocol["batch_size"] * protocol["log_every"] / m["img_s"] for m in timed)


def bare_img_s(arch: dict, protocol: dict, steps: int, device: torch.device) -> float:
    """A bare timm + torch loop over pre-normalised micro-batches already on the device."""
    micro = protocol["micro_batch_size"]
    model = model_io.build_model(arch).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=protocol["momentum"])
    autocast = finetune.autocast_context(protocol["precision"], device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(micro, 3, arch["image_size"], arch["image_size"], generator=gen).to(device)
    labels = torch.randint(0, arch["num_classes"], (micro,), generator=gen).to(device)

    def run(iterations: int) -> None:
        for _ in range(iterations):
            with autocast:
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    per_step = protocol["batch_size"] // micro
    run(per_step)  # warm-up, as the engine's first interval
    start = time.perf_counter()
    run(per_step * (steps - 1))
    return per_step * (steps - 1) * micro / (time.perf_counter() - start)


def compare(arch: dict, protocol: dict, steps: int, rounds: int, threads: int, device: torch.device,
            num_images: int) -> dict:
    """Alternate engine and bare rounds; report median throughputs and the median per-round ratio
    (neighbouring measurements share the machine's load, which on a shared CPU varies a lot)."""
    torch.set_num_threads(threads)
    engine, bare = [], []
    with tempfile.TemporaryDirectory(prefix="mixer-bench-") as tmp:
        folder = Path(tmp)
        checkpoint, dataset = write_workload(folder, arch, num_images)
        for i in range(rounds):
            engine.append(engine_img_s(folder, checkpoint, dataset, protocol, steps, threads))
            bare.append(bare_img_s(arch, protocol, steps, device))
            print(f"bench: {describe(arch)} round {i + 1}/{rounds}: engine {engine[-1]:.1f} img/s, "
                  f"bare {bare[-1]:.1f} img/s", flush=True)
    result = {"model": arch, "batch_size": protocol["batch_size"], "micro_batch_size": protocol["micro_batch_size"],
              "precision": finetune.precision_name(protocol["precision"], device),
              "engine_img_s": statistics.median(engine), "bare_img_s": statistics.median(bare),
              "ratio": statistics.median(e / b for e, b in zip(engine, bare)),
              "engine_rounds": engine, "bare_rounds": bare}
    return result


def describe(arch: dict) -> str:
    return f"Mixer D{arch['hidden_dim']}x{arch['num_blocks']}/{arch['patch_size']} at {arch['image_size']} px"


def with_utilisation(result: dict, device_name: str) -> dict:
    train_flops = 3 * forward_flops(result["model"])  # backward = 2 x forward
    peak = peak_tflops(device_name)
    if peak is None:
        print(f"bench: unknown peak for {device_name!r} (not in bench.PEAK_BF16_TFLOPS: another GPU, or a MIG "
              "slice); no MFU reported", flush=True)
    result["train_gflops_per_image"] = train_flops / 1e9
    result["peak_bf16_tflops"] = peak if peak is not None else "unknown peak"
    for kind in ("engine", "bare"):
        result[f"{kind}_mfu"] = None if peak is None else result[f"{kind}_img_s"] * train_flops / (peak * 1e12)
    return result


# ---------------------------------------------------------------------------------------------
# Evaluation
EVAL_MIXER = {"patch_size": 4, "hidden_dim": 128, "num_blocks": 4, "tokens_mlp_dim": 64,
                      "channels_mlp_dim": 512, "num_classes": 10, "image_size": 32}


def evaluation_bench(threads: int, batch_size: int = 256, batches: int = 2, rounds: int = 15) -> dict:
    """Evaluation engine vs a bare timm forward loop on CPU: same model, batches and threads.

    The two alternate (order swapped every round) and the ratio is the median of the per-round
    ratios, so a load spike from other processes hits both sides of a round alike.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = model_io.build_model(EVAL_MIXER).eval()
    size, classes = EVAL_MIXER["image_size"], EVAL_MIXER["num_classes"]
    loader = [(torch.randn(batch_size, 3, size, size), torch.randint(0, classes, (batch_size,)))
              for _ in range(batches)]

    def bare() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for images, _ in loader:
                model(images)
        return batch_size * batches / (time.perf_counter() - start)

    def engine() -> float:
        return evaluate.evaluate_model(model, loader, classes, "cpu")["images_per_s"]

    bare(), engine()  # warm-up
    eval_img_s, bare_img_s = [], []
    for i in range(rounds):
        if i % 2:
            bare_img_s.append(bare())
            eval_img_s.append(engine())
        else:
            eval_img_s.append(engine())
            bare_img_s.append(bare())
    ratios = [e / b for e, b in zip(eval_img_s, bare_img_s)]
    return {"eval_img_s": round(statistics.median(eval_img_s), 1),
            "bare_img_s": round(statistics.median(bare_img_s), 1),
            "ratio": round(statistics.median(ratios), 3), "threads": threads, "batch_size": batch_size,
            "rounds": rounds, "architecture": EVAL_MIXER}



# ---------------------------------------------------------------------------------------------
# Conversion
# Mixer-B/16 with the ImageNet-21k head (vit_jax/configs/models.py; ~290 MiB of float32): the cost acceptance case.
CONVERT_MIXER = {"patch_size": 16, "hidden_dim": 768, "num_blocks": 12, "tokens_mlp_dim": 384,
                      "channels_mlp_dim": 3072, "num_classes": 21843, "image_size": 224}
BENCH_MAX_SECONDS = 10.0
BENCH_MAX_RSS_RATIO = 3.0


def conversion_bench(repeats: int = 3) -> dict:
    """Convert a synthesized B/16 checkpoint in child processes; print time and memory against the budget.

    The best of `repeats` wall times is judged (the machine may be shared); memory is the largest peak.
    """
    with tempfile.TemporaryDirectory() as tmp:
        npz_path, out, parity = Path(tmp, "bench.npz"), Path(tmp, "bench.safetensors"), Path(tmp, "parity.json")
        with open(npz_path, "wb") as f:
            np.savez(f, **random_official_params(CONVERT_MIXER, seed=0))
        file_mib = npz_path.stat().st_size / 2**20
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "workflow_scripts.convert", str(npz_path), str(out),
                            "--parity", str(parity)], check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - start)
            out.unlink()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak = usage.ru_maxrss / 1024
        record = json.loads(parity.read_text())
    seconds, base = min(times), record["rss_at_start_mib"]
    rows = [
        ("checkpoint", f"{model_io.architecture_name(CONVERT_MIXER)}, {file_mib:.1f} MiB npz"),
        ("process seconds, best of runs (with imports)",
         f"{seconds:.2f}  (runs: {', '.join(f'{t:.2f}' for t in times)})"),
        ("CPU seconds per run (user + sys)", f"{(usage.ru_utime + usage.ru_stime) / repeats:.2f}"),
        ("conversion seconds, last run (after imports)", f"{record['convert_seconds']:.2f}"),
        ("peak RSS MiB (process)", f"{peak:.0f}  = {peak / file_mib:.2f} x file"),
        ("RSS MiB after imports (torch, timm)",
         f"{base:.0f}  (peak during imports {record['peak_rss_at_start_mib']:.0f})"),
        ("conversion memory MiB (peak - after imports)", f"{peak - base:.0f}  = {(peak - base) / file_mib:.2f} x file"),
        ("max |logit diff| vs the Flax reference", f"{record['max_abs_logit_diff']:.3g}"),
    ]
    for name, value in rows:
        print(f"{name:46s} {value}")
    ok = seconds < BENCH_MAX_SECONDS and (peak - base) < BENCH_MAX_RSS_RATIO * file_mib
    print(f"budget (< {BENCH_MAX_SECONDS:g} s, conversion memory < {BENCH_MAX_RSS_RATIO:g} x file): "
          f"{'met' if ok else 'NOT met'}")
    return {"convert_seconds": round(seconds, 3), "conversion_memory_x_file": round((peak - base) / file_mib, 3),
            "peak_rss_x_file": round(peak / file_mib, 3), "max_abs_logit_diff": record["max_abs_logit_diff"],
            "budget_met": ok}



def training_bench(args) -> dict:
    base = yaml.safe_load(Path(args.config).read_text())["protocol"]
    # One logging interval per step; no resume checkpoints; minival only after the last step.
    protocol = dict(base, deterministic=False, log_every=1, eval_every=args.steps,
                    checkpoint_every=args.steps, threads=args.threads, num_workers=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else finetune.device_names(device, 1)[0]
    small = compare(SMALL_MIXER, protocol, args.steps, args.rounds, args.threads, device,
                    num_images=protocol["batch_size"] * args.steps)
    report = {"device": device.type, "device_name": device_name, "threads": args.threads,
              "engine_img_s": small["engine_img_s"], "bare_img_s": small["bare_img_s"], "ratio": small["ratio"],
              "small_mixer": small}
    if device.type == "cuda":
        b16 = compare(MIXER_B16, dict(protocol, precision="bf16"), args.steps, args.rounds, args.threads, device,
                      num_images=protocol["batch_size"] * args.steps)
        report["mixer_b16_224"] = with_utilisation(b16, device_name)
    return report


# ---------------------------------------------------------------------------------------------
# The image-file path (issue #13): per-core throughput against the JPEG decoder's own
IMAGENET_LIKE_SIZES = [(375, 500), (500, 375), (333, 500), (375, 500)]  # most ImageNet photos: <= 500 px a side
H100_UTILISATION = 0.4  # the model FLOP utilisation the study plans for (issue #13)


def write_imagenet_like_jpegs(folder: Path, count: int, seed: int = 0) -> list[str]:
    """Photo-like JPEGs of ImageNet's typical sizes and bytes (~100 KiB at quality 90, 4:2:0): smooth
    random waves plus sensor-like noise (the noise sets the entropy, hence the size and decode cost)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = []
    for i in range(count):
        height, width = IMAGENET_LIKE_SIZES[i % len(IMAGENET_LIKE_SIZES)]
        y, x = np.mgrid[0:height, 0:width] / 100.0
        pixels = np.full((height, width, 3), 128.0)
        for channel in range(3):
            for a, b, phase in rng.normal(size=(6, 3)):
                pixels[..., channel] += 30 * np.sin(3 * a * x + 3 * b * y + phase)
        pixels += rng.normal(0, 22, pixels.shape)
        path = folder / f"{i:04d}.JPEG"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)
        files.append(str(path))
    return files


def _previous_path(files: list[str], transform) -> None:
    """The image path before issue #13: PIL decode, then the float resampling of the whole image."""
    from PIL import Image

    for seed, path in enumerate(files):
        with Image.open(path) as im:
            pixels = torch.from_numpy(np.asarray(im.convert("RGB")).copy())
        transform(pixels[None], [seed])


def _cpu_img_s(run, count: int) -> float:
    """Images per CPU-second of this process: what one dedicated core would do (on a shared machine,
    time spent waiting for a core is not counted)."""
    start = time.process_time()
    run()
    return count / (time.process_time() - start)


def image_path_rates(files: list[str], transforms: dict, rounds: int, batch: int = 32) -> dict[str, list[float]]:
    """Per-core rates of loops over the same files, measured in turns in every round: for each transform
    the worker's own code (read, decode, crop + resize to uint8: data._FolderBatches), then decode_jpeg
    alone on the bytes in memory ("decode") and the previous path with the first transform ("previous")."""
    labels = np.zeros(len(files), dtype=np.int64)
    keys = [[(i, 1000 + i) for i in range(start, min(start + batch, len(files)))]
            for start in range(0, len(files), batch)]
    encoded = [data.read_encoded(f) for f in files]
    loops = {}
    for name, transform in transforms.items():
        dataset = data._FolderBatches(files, labels, transform, decode_on_device=False)
        loops[name] = lambda dataset=dataset: [dataset[k] for k in keys]
    loops["decode"] = lambda: [data._decode_jpeg(e) for e in encoded]
    # The decoder the path itself uses (data.decode_image_bytes), so its own share shows too.
    loops["decode_opencv"] = lambda: [data._decode_jpeg_opencv(e, 3) for e in encoded]
    loops["previous"] = lambda: _previous_path(files, next(iter(transforms.values())))
    for run in loops.values():
        run()  # warm-up: page cache, allocator, kernels
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for i in range(rounds):
        for name in list(loops) if i % 2 == 0 else list(loops)[::-1]:
            rates[name].append(_cpu_img_s(loops[name], len(files)))
    return rates


def h100_img_s_needed(flops_per_image: float) -> float:
    """Images per second one H100 consumes at H100_UTILISATION of its dense bf16 peak."""
    return H100_UTILISATION * PEAK_BF16_TFLOPS["NVIDIA H100 80GB HBM3"] * 1e12 / flops_per_image  # SXM5


def _rate_and_ratio(rates: dict[str, list[float]], name: str) -> tuple[float, float]:
    """Median rate of a loop and the median over rounds of its ratio to decode-only."""
    return (statistics.median(rates[name]),
            statistics.median(p / d for p, d in zip(rates[name], rates["decode"])))


def image_path_bench(kind: str, rounds: int, count: int = 64) -> dict:
    """One JSON line for the training ("train") or the evaluation ("eval") image path; evaluation is
    judged on the headline protocol of config.yaml (resmall_crop, paper Appendix C; the costlier) and also
    reports official."""
    torch.set_num_threads(1)  # one core: the rate of one DataLoader worker
    size = MIXER_B16["image_size"]
    if kind == "train":  # the study's protocol block: inception crop, flip
        transforms = {"train": data.TrainAugment(size, True, 0.05, True, 127.5, 127.5)}
        flops, bar = 3 * forward_flops(MIXER_B16), 0.8  # backward = 2 x forward
    else:
        transforms = {name: data.EvalTransform(protocol, size, 127.5, 127.5) for name, protocol in (
            ("resmall_crop", {"resize": "shorter_side", "crop_fraction": 0.875}), ("official", {"resize": "direct"}))}
        flops, bar = forward_flops(MIXER_B16), 0.85
    with tempfile.TemporaryDirectory(prefix="mixer-bench-jpegs-") as tmp:
        files = write_imagenet_like_jpegs(Path(tmp), count)
        kib = statistics.fmean(Path(f).stat().st_size for f in files) / 1024
        rates = image_path_rates(files, transforms, rounds)
    headline = next(iter(transforms))
    img_s, ratio = _rate_and_ratio(rates, headline)
    needed = h100_img_s_needed(flops)
    # The core counts come from the rates as printed: a reader dividing the printed figures gets the same.
    img_s, decode_img_s = round(img_s, 1), round(statistics.median(rates["decode"]), 1)
    result = {"path": kind, "protocol": headline, "img_s_per_core": img_s,
              "decode_only_img_s_per_core": decode_img_s, "ratio": round(ratio, 3),
              "bar": bar, "meets_bar": ratio >= bar, "h100_img_s_needed": round(needed),
              "h100_cores_needed": round(needed / img_s, 1),
              "h100_cores_needed_decode_only": round(needed / decode_img_s, 1),
              "decode_opencv_img_s_per_core": round(statistics.median(rates["decode_opencv"]), 1),
              "ratio_to_opencv_decode": round(statistics.median(
                  p / d for p, d in zip(rates[headline], rates["decode_opencv"])), 3)}
    for name in list(transforms)[1:]:
        other_img_s, other_ratio = _rate_and_ratio(rates, name)
        result[name] = {"img_s_per_core": round(other_img_s, 1), "ratio": round(other_ratio, 3)}
    previous_img_s, previous_ratio = _rate_and_ratio(rates, "previous")
    return dict(result, previous_img_s_per_core=round(previous_img_s, 1), previous_ratio=round(previous_ratio, 3),
                images=count, jpeg_kib_mean=round(kib, 1), rounds=rounds,
                cpu=finetune.device_names(torch.device("cpu"), 1)[0], date=datetime.date.today().isoformat())


def gpu_decode_bench(rounds: int, count: int = 256, batch: int = 64) -> dict:
    """decode_device "cuda": the main process decodes (nvJPEG, batched) and crops on the GPU; img/s of
    that step on wall-clock time (the workers only read files). Needs CUDA."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    device = torch.device("cuda")
    transform = data.TrainAugment(MIXER_B16["image_size"], True, 0.05, True, 127.5, 127.5)
    with tempfile.TemporaryDirectory(prefix="mixer-bench-jpegs-") as tmp:
        files = write_imagenet_like_jpegs(Path(tmp), count)
        encoded = [data.read_encoded(f) for f in files]

    def run() -> None:
        for start in range(0, count, batch):
            chunk = slice(start, start + batch)
            decoded = data.decode_on_device(encoded[chunk], files[chunk], device)
            seeds = range(start, start + len(decoded))
            data.normalise(data.transform_images(decoded, transform, seeds, exact=True), transform.mean, transform.std)
        torch.cuda.synchronize()

    run()  # warm-up: nvJPEG handles, kernels
    img_s = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        img_s.append(count / (time.perf_counter() - start))
    return {"path": "train, decode_device cuda", "img_s": round(statistics.median(img_s), 1),
            "h100_img_s_needed": round(h100_img_s_needed(3 * forward_flops(MIXER_B16))),
            "device_name": torch.cuda.get_device_name(device), "images": count, "batch": batch, "rounds": rounds,
            "date": datetime.date.today().isoformat()}


BENCHMARKS = {
    "training": training_bench,
    "evaluation": lambda args: evaluation_bench(max(1, args.threads)),
    "conversion": lambda args: conversion_bench(),
    "image_train": lambda args: image_path_bench("train", max(args.rounds, 7)),
    "image_eval": lambda args: image_path_bench("eval", max(args.rounds, 7)),
    "image_gpu_decode": lambda args: gpu_decode_bench(max(args.rounds, 5)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", choices=[[], *BENCHMARKS], help="benchmarks to run (default: all)")
    parser.add_argument("--config", default=str(REPO / "config.yaml"),
                        help="config whose protocol block the training engine runs")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads for both loops")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per measurement (first is warm-up)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating engine/bare measurements")
    args = parser.parse_args(argv)
    if args.steps < 2:
        raise PipelineError("--steps must be at least 2 (the first step is a warm-up)")
    for name in args.names or list(BENCHMARKS):
        result = BENCHMARKS[name](args)
        print(json.dumps({"benchmark": name, **result}), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
