"""Independent NumPy forward pass of the official Flax MLP-Mixer, the yardstick the conversion is checked against.

Written from vit_jax/models_mixer.py (google-research/vision_transformer) and the paper's Appendix E, with
the defaults of the flax.linen ops it uses:
  nn.Conv(hidden, (p, p), strides=(p, p))  padding 'SAME' = no padding when p divides the image; HWIO kernel
  nn.LayerNorm()                            epsilon 1e-6, learned scale and bias, statistics over the last axis
  nn.gelu                                   approximate=True (tanh form)
  nn.Dense                                  x @ kernel + bias, kernel (in, out)
It reads the parameters in the official .npz layout (Flax paths joined with '/') and shares no code with the
PyTorch conversion (no torch, no timm).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

LAYERNORM_EPS = 1e-6


def layer_norm(x: np.ndarray, params: Mapping[str, np.ndarray], prefix: str) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = np.square(x - mean).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + np.float32(LAYERNORM_EPS)) * params[f"{prefix}/scale"] + params[f"{prefix}/bias"]


def gelu(x: np.ndarray) -> np.ndarray:
    c = np.float32(np.sqrt(2.0 / np.pi))
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))


def dense(x: np.ndarray, params: Mapping[str, np.ndarray], prefix: str) -> np.ndarray:
    return x @ params[f"{prefix}/kernel"] + params[f"{prefix}/bias"]


def mlp_block(x: np.ndarray, params: Mapping[str, np.ndarray], prefix: str) -> np.ndarray:
    """MlpBlock: Dense(mlp_dim) -> gelu -> Dense(back to the input width), on the last axis."""
    return dense(gelu(dense(x, params, f"{prefix}/Dense_0")), params, f"{prefix}/Dense_1")


def mixer_block(x: np.ndarray, params: Mapping[str, np.ndarray], prefix: str) -> np.ndarray:
    """x: (n, tokens, channels). LayerNorm -> token MLP on the swapped axes -> residual; LayerNorm -> channel MLP."""
    y = layer_norm(x, params, f"{prefix}/LayerNorm_0")
    y = np.swapaxes(y, 1, 2)
    y = mlp_block(y, params, f"{prefix}/token_mixing")
    x = x + np.swapaxes(y, 1, 2)
    y = layer_norm(x, params, f"{prefix}/LayerNorm_1")
    return x + mlp_block(y, params, f"{prefix}/channel_mixing")


def stem(images_nhwc: np.ndarray, params: Mapping[str, np.ndarray]) -> np.ndarray:
    """Conv with kernel = stride = p as a matmul over non-overlapping patches; tokens in row-major (h, w) order."""
    kernel = params["stem/kernel"]  # (p, p, in, hidden)
    p, _, c_in, hidden = kernel.shape
    n, h, w, c = images_nhwc.shape
    if h % p or w % p or c != c_in:
        raise ValueError(f"images of shape {images_nhwc.shape} do not fit a {p}x{p}x{c_in} patch stem")
    patches = images_nhwc.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, (h // p) * (w // p), p * p * c)  # 'n h w c -> n (h w) c' after the conv
    return patches @ kernel.reshape(p * p * c, hidden) + params["stem/bias"]


def forward(params: Mapping[str, np.ndarray], images_nhwc: np.ndarray) -> np.ndarray:
    """Logits (n, classes) of the official MlpMixer for normalized float32 NHWC images."""
    x = stem(np.asarray(images_nhwc, np.float32), params)
    num_blocks = 1 + max(int(k.split("/")[0].split("_")[1]) for k in params if k.startswith("MixerBlock_"))
    for i in range(num_blocks):
        x = mixer_block(x, params, f"MixerBlock_{i}")
    x = layer_norm(x, params, "pre_head_layer_norm")
    return dense(x.mean(axis=1), params, "head")
