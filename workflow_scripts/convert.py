"""Official Flax Mixer .npz <-> timm MlpMixer safetensors, proven faithful against a NumPy reference.

python -m workflow_scripts.convert IN.npz OUT.safetensors [--checkpoint NAME]
    [--expect-architecture JSON] [--parity PARITY.json] [--image-size PX]

--image-size K x the checkpoint's image size builds the higher-resolution Mixer of the paper's Appendix C
(`upscale_state_dict`). Parity with the Flax reference is proven at the checkpoint's own resolution, before
upscaling; the upscaled model is then proven by the property that defines it (`tiling_difference`).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import time
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from workflow_scripts import flax_reference
from workflow_scripts.common import PipelineError, atomic_path, json_arg, peak_rss_mib, run_cli, sha256_file, write_json
from workflow_scripts.model_io import (
    ARCH_KEYS,
    architecture_name,
    check_architecture,
    module_from_state,
    save_state_dict,
)
from workflow_scripts.model_stats import params_excluding_head

# Parity: allowed max |logit difference| per unit of logit magnitude (float32 round-off is ~1e-6 of it).
PARITY_RTOL = 1e-4
PARITY_IMAGES = 1  # the two B/16 forward passes dominate the conversion's cost; tests also use batches of 2
PARITY_SEED = 0


# ---------------------------------------------------------------------------------------------
# The official .npz layout


def official_layout(architecture: Mapping) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Official Flax parameter path -> (timm state-dict key, shape in the .npz) for an architecture."""
    a = check_architecture(architecture)
    p, d, c = a["patch_size"], a["hidden_dim"], a["num_classes"]
    tokens = (a["image_size"] // p) ** 2
    layout = {"stem/kernel": ("stem.proj.weight", (p, p, 3, d)), "stem/bias": ("stem.proj.bias", (d,))}

    def mlp(flax_prefix, timm_prefix, dim, hidden):
        for j, (n_in, n_out) in enumerate([(dim, hidden), (hidden, dim)]):
            layout[f"{flax_prefix}/Dense_{j}/kernel"] = (f"{timm_prefix}.fc{j + 1}.weight", (n_in, n_out))
            layout[f"{flax_prefix}/Dense_{j}/bias"] = (f"{timm_prefix}.fc{j + 1}.bias", (n_out,))

    def layer_norm(flax_prefix, timm_prefix):
        layout[f"{flax_prefix}/scale"] = (f"{timm_prefix}.weight", (d,))
        layout[f"{flax_prefix}/bias"] = (f"{timm_prefix}.bias", (d,))

    for i in range(a["num_blocks"]):
        layer_norm(f"MixerBlock_{i}/LayerNorm_0", f"blocks.{i}.norm1")
        mlp(f"MixerBlock_{i}/token_mixing", f"blocks.{i}.mlp_tokens", tokens, a["tokens_mlp_dim"])
        layer_norm(f"MixerBlock_{i}/LayerNorm_1", f"blocks.{i}.norm2")
        mlp(f"MixerBlock_{i}/channel_mixing", f"blocks.{i}.mlp_channels", d, a["channels_mlp_dim"])
    layer_norm("pre_head_layer_norm", "norm")
    layout["head/kernel"] = ("head.weight", (d, c))
    layout["head/bias"] = ("head.bias", (c,))
    return layout


def _to_timm(array: np.ndarray) -> torch.Tensor:
    """Flax kernel -> torch weight as a view (conv HWIO -> OIHW, dense (in, out) -> (out, in))."""
    t = torch.from_numpy(array)
    if t.ndim == 4:
        return t.permute(3, 2, 0, 1)
    return t.T if t.ndim == 2 else t


def _to_flax(tensor: torch.Tensor) -> np.ndarray:
    t = tensor.detach().to("cpu", torch.float32)
    if t.ndim == 4:
        t = t.permute(2, 3, 1, 0)
    elif t.ndim == 2:
        t = t.T
    return np.ascontiguousarray(t.numpy())


def _shape_of(params: Mapping[str, np.ndarray], key: str, ndim: int) -> tuple[int, ...]:
    if key not in params:
        raise PipelineError(f"key '{key}' missing; not an official Mixer checkpoint (keys like "
                            f"{sorted(params)[:3]})")
    shape = params[key].shape
    if len(shape) != ndim:
        raise PipelineError(f"key '{key}' has shape {shape}, expected {ndim} dimensions")
    return shape


def infer_architecture(params: Mapping[str, np.ndarray]) -> dict:
    """Architecture from the shapes of an official checkpoint (the image size from the token count)."""
    p, p2, in_ch, d = _shape_of(params, "stem/kernel", 4)
    if p != p2 or in_ch != 3:
        raise PipelineError(f"key 'stem/kernel' has shape {(p, p2, in_ch, d)}, expected (p, p, 3, hidden)")
    blocks = {int(m[1]) for k in params if (m := re.match(r"MixerBlock_(\d+)/", k))}
    if not blocks:
        raise PipelineError("no 'MixerBlock_<i>/...' keys; not an official Mixer checkpoint")
    num_tokens, tokens_mlp = _shape_of(params, "MixerBlock_0/token_mixing/Dense_0/kernel", 2)
    _, channels_mlp = _shape_of(params, "MixerBlock_0/channel_mixing/Dense_0/kernel", 2)
    _, num_classes = _shape_of(params, "head/kernel", 2)
    side = round(num_tokens ** 0.5)
    if side * side != num_tokens:
        raise PipelineError(f"key 'MixerBlock_0/token_mixing/Dense_0/kernel' has {num_tokens} tokens, "
                            f"not a square grid of patches")
    return check_architecture({"patch_size": p, "hidden_dim": d, "num_blocks": max(blocks) + 1,
                               "tokens_mlp_dim": tokens_mlp, "channels_mlp_dim": channels_mlp,
                               "num_classes": num_classes, "image_size": side * p}, "inferred architecture")


def npz_to_state_dict(npz: Mapping[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], dict]:
    """Strictly map official arrays to timm's keys: every key consumed, every shape checked.

    The tensors share memory with the arrays (transposes are views); save_state_dict packs them.
    """
    arch = infer_architecture(npz)
    layout = official_layout(arch)
    state = {}
    for key, (timm_key, shape) in layout.items():
        if key not in npz:
            raise PipelineError(f"key '{key}' missing for {architecture_name(arch)} (renamed or truncated checkpoint?)")
        if npz[key].shape != shape:
            raise PipelineError(f"key '{key}' has shape {npz[key].shape}, {architecture_name(arch)} needs {shape}")
        state[timm_key] = _to_timm(npz[key])
    extra = sorted(set(npz) - set(layout))
    if extra:
        raise PipelineError(f"unexpected keys {extra[:5]} (not part of {architecture_name(arch)}; renamed keys?)")
    return state, arch


def architecture_of_state(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Architecture from the shapes of a timm MlpMixer state dict."""
    try:
        d, _, p, _ = state_dict["stem.proj.weight"].shape
        tokens_mlp, num_tokens = state_dict["blocks.0.mlp_tokens.fc1.weight"].shape
        channels_mlp = state_dict["blocks.0.mlp_channels.fc1.weight"].shape[0]
        num_classes = state_dict["head.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise PipelineError(f"not a timm MlpMixer state dict ({e})") from None
    num_blocks = 1 + max(int(m[1]) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    return check_architecture({"patch_size": p, "hidden_dim": d, "num_blocks": num_blocks,
                               "tokens_mlp_dim": tokens_mlp, "channels_mlp_dim": channels_mlp,
                               "num_classes": num_classes, "image_size": round(num_tokens ** 0.5) * p},
                              "state dict architecture")


def export_npz(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Inverse of npz_to_state_dict: write a timm state dict in the official .npz layout (float32)."""
    layout = official_layout(architecture_of_state(state_dict))
    extra = sorted(set(state_dict) - {timm_key for timm_key, _ in layout.values()})
    if extra:
        raise PipelineError(f"state dict has tensors with no place in the official layout: {extra[:5]}")
    arrays = {}
    for key, (timm_key, shape) in layout.items():
        arrays[key] = _to_flax(state_dict[timm_key])
        if arrays[key].shape != shape:
            raise PipelineError(f"tensor '{timm_key}' has shape {tuple(state_dict[timm_key].shape)}, which does "
                                f"not fit '{key}' {shape}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append '.npz' to a path name
            np.savez(f, **arrays)


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The float32 arrays of a checkpoint, never unpickling; a truncated file or NaN/inf weight is an error."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found (did download_weights run?)")
    if not zipfile.is_zipfile(path):
        raise PipelineError(f"{path}: not an .npz (zip) archive ({path.stat().st_size} bytes; truncated or not a "
                            f"checkpoint); delete it and download it again")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise PipelineError(f"{path}: cannot read the arrays ({type(e).__name__}: {e}); delete it and download "
                            f"it again") from None
    for key, array in arrays.items():
        if not np.issubdtype(array.dtype, np.floating):
            raise PipelineError(f"{path}: key '{key}' has dtype {array.dtype}, expected float32 weights")
        arrays[key] = array.astype(np.float32, copy=False)
        if not np.isfinite(arrays[key]).all():
            raise PipelineError(f"{path}: key '{key}' holds NaN or inf values; the checkpoint is corrupt")
    return arrays


def random_official_params(architecture: Mapping, seed: int) -> dict[str, np.ndarray]:
    """Random weights in the official layout, every parameter non-trivial (LayerNorm scales too)."""
    rng = np.random.default_rng(seed)
    params = {}
    for key, (_, shape) in official_layout(architecture).items():
        a = rng.standard_normal(shape, dtype=np.float32)
        if key.endswith("/kernel"):
            a *= np.float32(1.0 / np.sqrt(np.prod(shape[:-1])))  # unit-variance activations (fan-in)
        elif key.endswith("/scale"):
            a *= np.float32(0.2)
            a += np.float32(1.0)
        else:
            a *= np.float32(0.1)
        params[key] = a
    return params


def parity_input(architecture: Mapping, num_images: int = PARITY_IMAGES) -> np.ndarray:
    """Fixed NHWC float32 images in the normalized pixel range [-1, 1]."""
    s = architecture["image_size"]
    rng = np.random.default_rng(PARITY_SEED)
    return rng.uniform(-1.0, 1.0, size=(num_images, s, s, 3)).astype(np.float32)


def logit_difference(model: nn.Module, params: Mapping[str, np.ndarray], images_nhwc: np.ndarray) \
        -> tuple[float, float]:
    """(max |torch - reference| logit difference, max |reference logit|) on the given images."""
    reference = flax_reference.forward(params, images_nhwc)
    with torch.inference_mode():
        logits = model(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)).numpy()
    return float(np.abs(logits - reference).max()), float(np.abs(reference).max())


# ---------------------------------------------------------------------------------------------
# Higher resolution: the paper's Appendix C


def resolution_factor(base_image_size: int, image_size: int) -> int:
    """K = image_size / base_image_size, which must be an integer >= 1 (patch size unchanged, Appendix C)."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < base_image_size \
            or image_size % base_image_size:
        raise PipelineError(f"image size {image_size!r} (--image-size) is not an integer multiple K >= 1 of the "
                            f"checkpoint's image size {base_image_size} (the paper's Appendix C raises the "
                            f"resolution by an integer factor K, patch size unchanged); use {base_image_size}, "
                            f"{2 * base_image_size}, {3 * base_image_size}, ...")
    return image_size // base_image_size


def upscaled_architecture(architecture: Mapping, image_size: int) -> dict:
    """The architecture at K x the resolution: K^2 x the tokens and K^2 x the token-mixing MLP's width."""
    arch = check_architecture(architecture)
    k = resolution_factor(arch["image_size"], image_size)
    return dict(arch, image_size=image_size, tokens_mlp_dim=k * k * arch["tokens_mlp_dim"])


def part_major_index(base_grid_side: int, factor: int) -> torch.Tensor:
    """For each token of the K x K larger grid, in the row-major order in which timm (and Flax) flatten the
    patches, its index in the concatenation of the K^2 spatial parts, each part in its own row-major order.

    Token (r, c) lies in part (r // g, c // g) (parts numbered row-major) at local index (r % g) * g + c % g,
    g = base_grid_side; its part-major index is part * g^2 + local.
    """
    g, k = base_grid_side, factor
    rows = torch.arange(g * k).unsqueeze(1)
    cols = torch.arange(g * k).unsqueeze(0)
    part = (rows // g) * k + cols // g
    local = (rows % g) * g + cols % g
    return (part * g * g + local).flatten()


def upscale_state_dict(state: Mapping[str, torch.Tensor], architecture: Mapping, image_size: int) \
        -> tuple[dict[str, torch.Tensor], dict]:
    """A timm Mixer state dict at `image_size` = K x the architecture's, initialised as in Appendix C.

    Each token-mixing MLP becomes K^2 copies of the pre-trained one working in parallel, copy p on the tokens
    of spatial part p in that part's own row-major order: in the part-major token basis (`part_major_index`)
    fc1's weight is block-diagonal with copies of W1 (K^2 D_S x K^2 S) and fc2's with copies of W2; fc1's bias
    is repeated per part, fc2's follows each token's local index. Hidden units are numbered part-major. Every
    other tensor is the same tensor object (nothing else depends on the token count). Returns (state, arch).
    """
    arch = check_architecture(architecture)
    upscaled = upscaled_architecture(arch, image_size)
    k = image_size // arch["image_size"]
    if k == 1:
        return dict(state), upscaled
    order = part_major_index(arch["image_size"] // arch["patch_size"], k)
    copies = k * k
    out = dict(state)
    for i in range(arch["num_blocks"]):
        prefix = f"blocks.{i}.mlp_tokens"
        w1, b1 = state[f"{prefix}.fc1.weight"], state[f"{prefix}.fc1.bias"]
        w2, b2 = state[f"{prefix}.fc2.weight"], state[f"{prefix}.fc2.bias"]
        out[f"{prefix}.fc1.weight"] = torch.block_diag(*[w1] * copies)[:, order]  # column t = token t's input
        out[f"{prefix}.fc1.bias"] = b1.repeat(copies)
        out[f"{prefix}.fc2.weight"] = torch.block_diag(*[w2] * copies)[order, :]  # row t = token t's output
        out[f"{prefix}.fc2.bias"] = b2.repeat(copies)[order]
    return out, upscaled


def tile_image(tiles: torch.Tensor) -> torch.Tensor:
    """K^2 images (K^2, C, s, s) -> one (1, C, K s, K s) image, tile p at row p // K, column p % K."""
    k = round(len(tiles) ** 0.5)
    if k * k != len(tiles):
        raise ValueError(f"{len(tiles)} tiles do not make a square")
    n, c, s, _ = tiles.shape
    return tiles.reshape(k, k, c, s, s).permute(2, 0, 3, 1, 4).reshape(1, c, k * s, k * s)


def tiling_difference(base_model: nn.Module, upscaled_model: nn.Module, tiles: torch.Tensor) -> tuple[float, float]:
    """(max |upscaled logits on the tiled image - mean of the base logits on the tiles|, max |that mean|).

    Zero up to rounding is the property that defines Appendix C's initialisation: the upscaled model sees each
    part as the base model sees the tile, and its mean pooling averages the parts' features.
    """
    with torch.inference_mode():
        expected = base_model(tiles).mean(0)
        logits = upscaled_model(tile_image(tiles))[0]
    return float((logits - expected).abs().max()), float(expected.abs().max())


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def check_expected(arch: Mapping, expected: Mapping, source: str) -> None:
    expected = check_architecture(expected, "expected architecture (config checkpoints.<name>.architecture)")
    if dict(arch) != expected:
        diff = ", ".join(f"{k} {arch[k]} vs {expected[k]}" for k in ARCH_KEYS if arch[k] != expected[k])
        hint = " or its --image-size" if arch["image_size"] != expected["image_size"] else ""
        raise PipelineError(f"{source} holds {architecture_name(arch)} but the config expects "
                            f"{architecture_name(expected)} "
                            f"({diff}); wrong file for this checkpoint: fix its url or its architecture{hint}")


def prove_parity(state: Mapping[str, torch.Tensor], arch: Mapping, params: Mapping[str, np.ndarray],
                 source: str) -> dict:
    """The converted module against the Flax reference on fixed images; the parity fields of the record."""
    model = module_from_state(arch, state, source)
    images = parity_input(arch)
    max_diff, max_logit = logit_difference(model, params, images)
    tolerance = PARITY_RTOL * max(1.0, max_logit)
    print(f"parity: max |logit diff| {max_diff:.3g} (tolerance {tolerance:.3g}, max |logit| {max_logit:.3g})",
          flush=True)
    if not max_diff <= tolerance:
        raise PipelineError(f"{source}: the converted module differs from the Flax reference by {max_diff:.3g} "
                            f"in the logits (tolerance {tolerance:.3g}); the conversion is wrong, nothing written")
    return {
        "max_abs_logit_diff": max_diff,
        "max_abs_logit": max_logit,
        "tolerance": tolerance,
        "reference": "workflow_scripts.flax_reference: NumPy port of vit_jax/models_mixer.py (Flax defaults)",
        "input": {"shape": list(images.shape), "layout": "NHWC", "distribution": "uniform(-1, 1)",
                  "seed": PARITY_SEED, "sha256": hashlib.sha256(images.tobytes()).hexdigest()},
    }


def upscale_and_prove(state: dict[str, torch.Tensor], base_arch: Mapping, image_size: int, source: str) \
        -> tuple[dict[str, torch.Tensor], dict | None]:
    """`upscale_state_dict`, then its tiling property checked on K^2 fixed tiles; (state, record | None at K = 1)."""
    upscaled, arch = upscale_state_dict(state, base_arch, image_size)
    k = image_size // base_arch["image_size"]
    if k == 1:
        return upscaled, None
    tiles = torch.from_numpy(parity_input(base_arch, k * k)).permute(0, 3, 1, 2)
    max_diff, max_logit = tiling_difference(module_from_state(dict(base_arch), state, source),
                                            module_from_state(arch, upscaled, source), tiles)
    tolerance = PARITY_RTOL * max(1.0, max_logit)
    print(f"upscaled to {image_size} px (K = {k}): max |logit - mean of the tiles' logits| {max_diff:.3g} "
          f"(tolerance {tolerance:.3g})", flush=True)
    if not max_diff <= tolerance:
        raise PipelineError(f"{source}: the {image_size} px model's logits on {k} x {k} tiles differ from the mean "
                            f"of the base model's by {max_diff:.3g} (tolerance {tolerance:.3g}); the upscaling is "
                            f"wrong, nothing written")
    return upscaled, {"from_image_size": base_arch["image_size"], "factor": k, "base_architecture": dict(base_arch),
                      "method": "paper Appendix C: token-mixing MLP block-diagonal with K^2 copies, one per "
                                "spatial part in its row-major token order",
                      "tiling_max_abs_logit_diff": max_diff, "tiling_max_abs_mean_logit": max_logit,
                      "tiling_tolerance": tolerance, "tiling_input": {"tiles": list(tiles.shape),
                                                                      "seed": PARITY_SEED}}


def convert(npz_path: str | os.PathLike, out_path: str | os.PathLike, expected_architecture: Mapping | None = None,
            *, checkpoint: str | None = None, parity_path: str | os.PathLike | None = None,
            image_size: int | None = None) -> dict:
    """Convert an official checkpoint to safetensors after proving parity; returns (and writes) the parity record.

    With `image_size` (K x the checkpoint's), the model written is Appendix C's higher-resolution Mixer:
    parity is proven at the checkpoint's resolution, then the upscaled model by its tiling property.
    Nothing is written unless every check passes; the model and the parity record appear together.
    """
    start, rss_at_start, peak_at_start = time.perf_counter(), _current_rss_mib(), peak_rss_mib()
    params = load_npz(npz_path)
    try:
        state, base_arch = npz_to_state_dict(params)
        arch = base_arch if image_size is None else upscaled_architecture(base_arch, image_size)
    except PipelineError as e:
        raise PipelineError(f"{npz_path}: {e}") from None
    print(f"{npz_path}: {architecture_name(base_arch)}, {len(params)} arrays", flush=True)
    if expected_architecture is not None:
        check_expected(arch, expected_architecture, str(npz_path))
    record = {"checkpoint": checkpoint, "npz": str(npz_path), "npz_sha256": sha256_file(npz_path),
              "npz_mib": round(Path(npz_path).stat().st_size / 2**20, 2), "safetensors": str(out_path),
              "safetensors_sha256": None, "num_params": None, "num_params_excluding_head": None,
              "architecture": arch, **prove_parity(state, base_arch, params, str(npz_path))}
    # Pack the transposed views one tensor at a time, dropping each npz array as soon as it is copied.
    params.clear()
    for key in list(state):
        state[key] = state[key].contiguous()
    state, record["upscale"] = upscale_and_prove(state, base_arch, arch["image_size"], str(npz_path))
    record["num_params"] = sum(t.numel() for t in state.values())
    record["num_params_excluding_head"] = params_excluding_head(state)
    with atomic_path(out_path) as tmp_model:
        save_state_dict(state, arch, tmp_model)
        record["safetensors_sha256"] = sha256_file(tmp_model)
        record["convert_seconds"] = round(time.perf_counter() - start, 3)
        record["rss_at_start_mib"] = round(rss_at_start, 1)  # what importing torch and timm costs
        record["peak_rss_at_start_mib"] = round(peak_at_start, 1)
        record["peak_rss_mib"] = round(peak_rss_mib(), 1)
        if parity_path is not None:
            write_json(parity_path, record)
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("npz", help="official Flax checkpoint (.npz)")
    ap.add_argument("out", help="converted checkpoint to write (.safetensors)")
    ap.add_argument("--checkpoint", help="checkpoint name, recorded in the parity record")
    ap.add_argument("--expect-architecture", help="JSON architecture the checkpoint must have (from the config)")
    ap.add_argument("--parity", help="parity record to write (.json)")
    ap.add_argument("--image-size", type=int, help="resolution of the model written: K x the checkpoint's "
                    "(K an integer >= 1; paper Appendix C); default: the checkpoint's own")
    args = ap.parse_args(argv)
    expected = None
    if args.expect_architecture is not None:
        expected = json_arg(args.expect_architecture, "--expect-architecture")
    record = convert(args.npz, args.out, expected, checkpoint=args.checkpoint, parity_path=args.parity,
                     image_size=args.image_size)
    print(f"wrote {args.out} ({record['num_params']:,} parameters) in {record['convert_seconds']:.2f} s, "
          f"peak RSS {record['peak_rss_mib']:.0f} MiB ({record['rss_at_start_mib']:.0f} MiB after imports) "
          f"for a {record['npz_mib']:.0f} MiB checkpoint")
    return 0


if __name__ == "__main__":
    run_cli(main)
