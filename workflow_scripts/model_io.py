"""Model I/O every stage shares: a timm MlpMixer built from an architecture, saved and loaded as safetensors.

A converted or fine-tuned checkpoint is a float32 timm state dict in a .safetensors file whose metadata
holds one entry, `mixer`, a JSON object {"format": FORMAT, "architecture": {...}} with sorted keys. One
entry, because safetensors stores metadata as a hash map whose order changes from process to process:
with a single key the same weights always give the same bytes, so a file's sha256 is its provenance.
"""
from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from timm.models.mlp_mixer import MlpMixer
from torch import nn

from workflow_scripts.common import PipelineError, atomic_path

FORMAT = "mixer-timm/2"
METADATA_KEY = "mixer"
ARCH_KEYS = ("patch_size", "hidden_dim", "num_blocks", "tokens_mlp_dim", "channels_mlp_dim", "num_classes",
             "image_size")
# Flax defaults the official model relies on (flax.linen.LayerNorm epsilon 1e-6, flax.linen.gelu
# approximate=True), as used by vit_jax/models_mixer.py.
FLAX_LAYERNORM_EPS = 1e-6
# Paper / vit_jax/configs/models.py names, used only to describe an architecture in messages.
_NAMED_SIZES = {(512, 8): "S", (768, 12): "B", (1024, 24): "L", (1280, 32): "H"}


def check_architecture(architecture: Mapping, source: str = "architecture") -> dict:
    """The architecture dict with exactly ARCH_KEYS as positive ints, else an error naming the key."""
    if not isinstance(architecture, Mapping):
        raise PipelineError(f"{source}: expected a mapping with keys {list(ARCH_KEYS)}, got {architecture!r}")
    missing = [k for k in ARCH_KEYS if k not in architecture]
    extra = sorted(set(architecture) - set(ARCH_KEYS))
    if missing or extra:
        raise PipelineError(f"{source}: missing keys {missing}, unknown keys {extra}; "
                            f"an architecture has exactly {list(ARCH_KEYS)}")
    arch = {}
    for k in ARCH_KEYS:
        v = architecture[k]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise PipelineError(f"{source}: key '{k}' must be a positive integer, got {v!r}")
        arch[k] = v
    if arch["image_size"] % arch["patch_size"]:
        raise PipelineError(f"{source}: image_size {arch['image_size']} is not a multiple of "
                            f"patch_size {arch['patch_size']}")
    return arch


def architecture_name(arch: Mapping) -> str:
    """A readable name for messages, e.g. 'Mixer-B/16 (hidden 768, 12 blocks, ...)'."""
    size = _NAMED_SIZES.get((arch["hidden_dim"], arch["num_blocks"]), "custom")
    return (f"Mixer-{size}/{arch['patch_size']} (hidden {arch['hidden_dim']}, {arch['num_blocks']} blocks, "
            f"tokens MLP {arch['tokens_mlp_dim']}, channels MLP {arch['channels_mlp_dim']}, "
            f"{arch['num_classes']} classes, {arch['image_size']} px)")


def build_model(architecture: Mapping) -> nn.Module:
    """timm MlpMixer with the official model's ops: tanh-approximate GELU and LayerNorm eps 1e-6 (Flax defaults)."""
    arch = check_architecture(architecture)
    d = arch["hidden_dim"]
    tokens, channels = arch["tokens_mlp_dim"], arch["channels_mlp_dim"]
    model = MlpMixer(
        num_classes=arch["num_classes"],
        img_size=arch["image_size"],
        patch_size=arch["patch_size"],
        num_blocks=arch["num_blocks"],
        embed_dim=d,
        # timm computes int(ratio * dim): the +0.5 keeps float round-off from truncating to dim - 1.
        mlp_ratio=((tokens + 0.5) / d, (channels + 0.5) / d),
        act_layer=partial(nn.GELU, approximate="tanh"),
        norm_layer=partial(nn.LayerNorm, eps=FLAX_LAYERNORM_EPS),
    )
    block = model.blocks[0]
    built = (block.mlp_tokens.fc1.out_features, block.mlp_channels.fc1.out_features)
    assert built == (tokens, channels), f"timm built MLP dims {built}, requested {(tokens, channels)}"
    return model


def module_from_state(arch: dict, state: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Build the module without allocating its own weights and adopt `state` (every key, every shape)."""
    with torch.device("meta"):
        model = build_model(arch)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k, shape in expected.items():
        if k not in state:
            raise PipelineError(f"{source}: tensor '{k}' missing for {architecture_name(arch)}")
        if tuple(state[k].shape) != shape:
            raise PipelineError(f"{source}: tensor '{k}' has shape {tuple(state[k].shape)}, "
                                f"{architecture_name(arch)} needs {shape}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise PipelineError(f"{source}: unexpected tensors {extra[:5]} for {architecture_name(arch)}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def save_state_dict(state: Mapping[str, torch.Tensor], architecture: Mapping, path: str | os.PathLike) -> None:
    """Write a checkpoint (float32, contiguous, architecture in the metadata); same weights, same bytes."""
    arch = check_architecture(architecture)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    module_from_state(arch, tensors, str(path))  # refuse a state dict the architecture cannot load
    record = json.dumps({"format": FORMAT, "architecture": arch}, sort_keys=True, separators=(",", ":"))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: record})


def save_model(model: nn.Module, architecture: Mapping, path: str | os.PathLike) -> None:
    save_state_dict(model.state_dict(), architecture, path)


def read_architecture(path: str | os.PathLike) -> dict:
    """The architecture stored in a converted or fine-tuned checkpoint (reads the header only)."""
    if not Path(path).is_file():
        raise PipelineError(f"{path}: file not found (did the stage that writes it run?)")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise PipelineError(f"{path}: not a readable safetensors file ({e}); delete it and rerun the stage "
                            f"that writes it") from None
    try:
        record = json.loads(meta[METADATA_KEY])
    except (KeyError, json.JSONDecodeError, TypeError):
        record = {}
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise PipelineError(f"{path}: not a Mixer checkpoint of this pipeline (metadata '{METADATA_KEY}' should "
                            f"hold format '{FORMAT}'); rewrite it with workflow_scripts.convert (or rerun the "
                            f"stage that wrote it)")
    return check_architecture(record.get("architecture"), f"{path} metadata architecture")


def load_model(path: str | os.PathLike, num_classes: int | None = None) -> nn.Module:
    """The eval-mode timm module of a converted or fine-tuned checkpoint."""
    arch = read_architecture(path)
    if num_classes is not None and num_classes != arch["num_classes"]:
        raise PipelineError(f"{path}: head has {arch['num_classes']} classes, {num_classes} were expected "
                            f"(a fine-tuned model of another dataset?)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise PipelineError(f"{path}: cannot read tensors ({e}); delete it and rerun the stage that writes it") \
            from None
    return module_from_state(arch, state, str(path))
