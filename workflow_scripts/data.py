"""Images of prepared datasets: the paper's train augmentation, the evaluation protocols, the loaders.

Two storage layouts (both described by the dataset.json that prepare_data writes; `splits` opens them):
- "arrays": <root>/<split>.npz with uint8 NHWC images; the whole split is moved to the device once and
  augmented there in batches (CIFAR-10, the demo's array store);
- "imagefolder": <root>/<split>/<class>/<image>; images are decoded and transformed in DataLoader
  workers (ImageNet, the demo's digits tree), or with decode_device "cuda" decoded on the GPU.

Every path follows one geometry per sample (`TrainAugment.geometry`, `EvalTransform.geometry`: a crop
box, a resize, an output window, a flip). Resizing is bilinear with half-pixel centres and no
antialiasing, as tf.image.resize in the official input pipeline (vit_jax/input_pipeline.py); a crop is
cut out first, so samples never reach outside it (like tf.slice followed by resize). Array splits
sample it in float (`resample`, the reference); image files take the fast path (`crop_resize`: decode
with libjpeg-turbo, cut the integer box, resize only the crop in uint8), within one grey level of it.
The one exception is the `timm` evaluation protocol (`TimmEvalTransform`): timm's own transform for a
timm model, applied per image to PIL images as timm does, with its own interpolation and normalisation.

Every random choice of a training sample (inception crop, flip) is a pure function of its aug seed
(a counter-based SplitMix64 stream), so resumed and multi-GPU runs see bitwise the same pixels.
"""
from __future__ import annotations

import atexit
import functools
import io
import math
import multiprocessing
import os
import signal
import time
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from .common import PipelineError
from .splits import Split

# Inception crop aspect-ratio range (width / height): TF's default aspect_ratio_range of
# tf.image.sample_distorted_bounding_box, written as the decimals [0.75, 1.33] in TensorFlow's own code
# (not 4/3: over 100,000 draws the two give mean aspects 1.0420 vs 1.0400 on a 375x500 image).
ASPECT_RANGE = (0.75, 1.33)
CROP_ATTEMPTS = 100  # tf.image.sample_distorted_bounding_box's max_attempts default


# ---------------------------------------------------------------------------------------------
# Per-sample randomness: a SplitMix64 stream seeded by the sample's aug seed
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def seed_uniforms(seeds: Sequence[int] | np.ndarray, count: int) -> np.ndarray:
    """(len(seeds), count) float64 uniforms in [0, 1); row i depends only on seeds[i]."""
    s = np.asarray(seeds).astype(np.int64).astype(np.uint64).reshape(-1, 1)
    with np.errstate(over="ignore"):
        state = _mix64(s + _GOLDEN) + (np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN)[None, :]
        bits = _mix64(state)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def inception_crop_boxes(u: np.ndarray, height: np.ndarray, width: np.ndarray, min_area: float) -> np.ndarray:
    """Crop boxes (top, left, h, w), int64 (B, 4), as tf.image.sample_distorted_bounding_box draws them.

    Port of GenerateRandomCrop (tensorflow/core/kernels/image/sample_distorted_bounding_box_op.cc) with
    area_range (min_area, 1), aspect ratio (width/height) uniform in ASPECT_RANGE, min_object_covered 0,
    up to CROP_ATTEMPTS attempts and the whole image as fallback. u: (B, 2*CROP_ATTEMPTS + 2) uniforms.
    """
    a = CROP_ATTEMPTS
    H = np.asarray(height, dtype=np.float64).reshape(-1, 1)
    W = np.asarray(width, dtype=np.float64).reshape(-1, 1)
    ar = ASPECT_RANGE[0] + u[:, :a] * (ASPECT_RANGE[1] - ASPECT_RANGE[0])
    lo_area, hi_area = min_area * H * W, H * W
    h = np.rint(np.sqrt(lo_area / ar))
    max_h = np.rint(np.sqrt(hi_area / ar))
    too_wide = np.rint(max_h * ar) > W
    max_h = np.where(too_wide, np.floor((W + 0.5 - 1e-7) / ar), max_h)
    max_h = np.where(too_wide & (np.rint(max_h * ar) > W), max_h - 1, max_h)
    max_h = np.minimum(max_h, H)
    h = np.minimum(h, max_h)
    h = h + np.floor(u[:, a : 2 * a] * (max_h - h + 1))
    w = np.rint(h * ar)
    small = w * h < lo_area
    h = np.where(small, h + 1, h)
    w = np.where(small, np.rint(h * ar), w)
    large = w * h > hi_area
    h = np.where(large, h - 1, h)
    w = np.where(large, np.rint(h * ar), w)
    ok = (w * h >= lo_area) & (w * h <= hi_area) & (w <= W) & (h <= H) & (w > 0) & (h > 0)
    first = np.argmax(ok, axis=1)
    rows = np.arange(len(u))
    found = ok[rows, first]
    h = np.where(found, h[rows, first], H[:, 0])
    w = np.where(found, w[rows, first], W[:, 0])
    # TF draws the offset with Uniform(H - h), i.e. in [0, H - h), and uses 0 when the crop is full size.
    top = np.where(h < H[:, 0], np.floor(u[:, 2 * a] * (H[:, 0] - h)), 0)
    left = np.where(w < W[:, 0], np.floor(u[:, 2 * a + 1] * (W[:, 0] - w)), 0)
    return np.stack([top, left, h, w], axis=1).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Geometry shared by every path
# A sample's geometry is one int64 row of GEOMETRY_FIELDS: cut the box (top, left, height, width) out of
# the decoded image, resize it to (resize_h, resize_w), keep the image_size window at (out_top, out_left),
# mirror it when flip is 1. The float reference (`resample` at `sample_coords`) and the fast uint8 path
# (`crop_resize`) both follow these rows, so the two compute the same geometry by construction.
GEOMETRY_FIELDS = ("top", "left", "height", "width", "resize_h", "resize_w", "out_top", "out_left", "flip")


def _axis(origin, scale, lo, hi, size: int) -> np.ndarray:
    """Source pixel-centre coordinates (B, size) of `size` output pixels: origin + (j + .5) * scale - .5."""
    j = np.arange(size, dtype=np.float64)[None, :] + 0.5
    src = np.asarray(origin, np.float64)[:, None] + j * np.asarray(scale, np.float64)[:, None] - 0.5
    return np.clip(src, np.asarray(lo, np.float64)[:, None], np.asarray(hi, np.float64)[:, None])


def sample_coords(geometry: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source rows ys and columns xs, each (B, size), that geometry rows sample (half-pixel centres,
    clamped to the box, as tf.image.resize after tf.slice)."""
    top, left, h, w, resize_h, resize_w, out_top, out_left, flip = np.asarray(geometry, dtype=np.int64).T
    ys = _axis(top + out_top * h / resize_h, h / resize_h, top, top + h - 1, size)
    xs = _axis(left + out_left * w / resize_w, w / resize_w, left, left + w - 1, size)
    # Flipping the output = reversing its columns (tf.image.random_flip_left_right after the resize).
    return ys, np.where(flip[:, None] > 0, xs[:, ::-1], xs)


def resample(images_nhwc: torch.Tensor, ys: np.ndarray, xs: np.ndarray) -> torch.Tensor:
    """Bilinear samples of uint8 NHWC images at per-sample source rows ys (B, S) and columns xs (B, S).

    Returns float32 NCHW (B, 3, S, S) in 0..255. Coordinates are pixel centres, clamped by the caller.
    The reference path: array splits use it on the device, and the fast path is tested against it.
    """
    _, height, width, _ = images_nhwc.shape
    device = images_nhwc.device
    gy = torch.from_numpy(((ys + 0.5) * (2.0 / height) - 1.0).astype(np.float32)).to(device, non_blocking=True)
    gx = torch.from_numpy(((xs + 0.5) * (2.0 / width) - 1.0).astype(np.float32)).to(device, non_blocking=True)
    b, s_y, s_x = gy.shape[0], gy.shape[1], gx.shape[1]
    grid = torch.stack([gx[:, None, :].expand(b, s_y, s_x), gy[:, :, None].expand(b, s_y, s_x)], dim=-1)
    images = images_nhwc.permute(0, 3, 1, 2).float()
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def normalise(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Pixels in 0..255 (uint8 or float, any memory format) -> contiguous float32 (x - mean) / std."""
    return (images.to(torch.float32, memory_format=torch.contiguous_format) - mean) / std


@dataclass(frozen=True)
class TrainAugment:
    """The official fine-tuning augmentation: inception crop (switchable), resize, random flip (switchable)."""

    image_size: int
    inception_crop: bool
    min_area: float
    flip: bool
    mean: float
    std: float

    def geometry(self, seeds: Sequence[int] | np.ndarray, heights, widths) -> np.ndarray:
        """Geometry rows (B, 9) for images of the given sizes, each a pure function of its aug seed."""
        seeds = np.asarray(seeds)
        n = len(seeds)
        H = np.broadcast_to(np.asarray(heights, dtype=np.int64), (n,))
        W = np.broadcast_to(np.asarray(widths, dtype=np.int64), (n,))
        u = seed_uniforms(seeds, 2 * CROP_ATTEMPTS + 3)
        if self.inception_crop:
            top, left, h, w = inception_crop_boxes(u[:, :-1], H, W, self.min_area).T
        else:
            top, left, h, w = np.zeros(n), np.zeros(n), H, W
        flip = u[:, -1] > 0.5 if self.flip else np.zeros(n, dtype=bool)  # tf: flip when uniform() > 0.5
        size, zero = np.full(n, self.image_size), np.zeros(n)
        return np.stack([top, left, h, w, size, size, zero, zero, flip], axis=1).astype(np.int64)

    def coords(self, seeds: Sequence[int] | np.ndarray, height, width) -> tuple[np.ndarray, np.ndarray]:
        """Source coordinates (ys, xs), each (B, image_size), for images of the given sizes."""
        return sample_coords(self.geometry(seeds, height, width), self.image_size)

    def __call__(self, images_nhwc: torch.Tensor, seeds: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Augment uint8 NHWC images (all the same size) -> normalised float32 NCHW on their device."""
        ys, xs = self.coords(seeds, images_nhwc.shape[1], images_nhwc.shape[2])
        return normalise(resample(images_nhwc, ys, xs), self.mean, self.std)


# How the geometry protocols resample (the eval record's "interpolation"). The paper does not name the
# interpolation of its evaluation resizes (Appendix C (3)); bilinear without antialiasing is our assumption:
# tf.image.resize's default, and what the official code's input pipeline uses.
EVAL_INTERPOLATION = "bilinear, half-pixel centres, no antialias (as tf.image.resize in the official code)"
GEOMETRY_RESIZES = ("direct", "shorter_side", "square")


@dataclass(frozen=True)
class EvalTransform:
    """An evaluation protocol's geometry (`resize` of its config entry):
    - "direct": resize to image_size x image_size (the official code: tf.image.resize(im, [crop, crop]));
    - "shorter_side": the shorter side to image_size / crop_fraction, keeping the aspect ratio, then the
      central image_size crop (the paper's "resmall-crop", Appendix C (3)(ii): 256 then 224);
    - "square": resize to (image_size / crop_fraction) squared, then the central image_size crop (the
      paper's "resize-crop", Appendix C (3)(i): 256 x 256 then 224).
    """

    protocol: dict
    image_size: int
    mean: float
    std: float

    def image_geometry(self, height: int, width: int) -> tuple[int, ...]:
        """The geometry row of one height x width image."""
        s = self.image_size
        resize = self.protocol.get("resize")
        if resize == "direct":
            return 0, 0, height, width, s, s, 0, 0, 0
        if resize not in GEOMETRY_RESIZES:
            raise PipelineError(f"evaluation protocol {self.protocol}: resize must be one of "
                                f"{[*GEOMETRY_RESIZES, 'timm']}; fix evaluation.protocols in the config")
        side = self.resized_side()
        if resize == "square":
            new_h = new_w = side
        else:
            scale = side / min(height, width)
            new_h, new_w = max(side, round(height * scale)), max(side, round(width * scale))
        # The margin's floor half, as TensorFlow pipelines take a central crop (google-research/big_vision
        # pp/ops_image.py central_crop: dy = (h - crop) // 2); torchvision rounds instead (1 px apart when the
        # margin is 4k + 3). The paper does not say: our assumption, with the interpolation's.
        top, left = (new_h - s) // 2, (new_w - s) // 2
        return 0, 0, height, width, new_h, new_w, top, left, 0

    def resized_side(self) -> int:
        """The side the image is resized to before the centre crop: image_size / crop_fraction (224 -> 256)."""
        fraction = self.protocol.get("crop_fraction")
        if fraction is None:
            raise PipelineError(f"evaluation protocol {self.protocol}: resize {self.protocol.get('resize')!r} needs "
                                "crop_fraction (0.875: 224 of 256); fix evaluation.protocols in the config")
        return math.floor(self.image_size / fraction + 1e-6)  # 224 / 0.875 = 256, 448 / 0.875 = 512

    def description(self) -> dict:
        """What the eval record says about this preprocessing: its interpolation and transform."""
        s, resize = self.image_size, self.protocol.get("resize")
        if resize == "direct":
            transform = f"resize to {s}x{s}"
        elif resize == "square":
            transform = f"resize to {self.resized_side()}x{self.resized_side()}, central {s}x{s} crop"
        else:
            transform = f"resize the shorter side to {self.resized_side()}, central {s}x{s} crop"
        return {"interpolation": EVAL_INTERPOLATION, "transform": transform}

    def geometry(self, seeds, heights, widths) -> np.ndarray:
        """Geometry rows (B, 9) for images of the given sizes (seeds are unused: evaluation is deterministic)."""
        rows = [self.image_geometry(int(h), int(w)) for h, w in zip(np.atleast_1d(heights), np.atleast_1d(widths))]
        return np.asarray(rows, dtype=np.int64).reshape(-1, len(GEOMETRY_FIELDS))

    def coords(self, n: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        ys, xs = sample_coords(self.geometry(None, [height], [width]), self.image_size)
        return np.repeat(ys, n, axis=0), np.repeat(xs, n, axis=0)

    def __call__(self, images_nhwc: torch.Tensor, seeds=None) -> torch.Tensor:
        ys, xs = self.coords(images_nhwc.shape[0], images_nhwc.shape[1], images_nhwc.shape[2])
        return normalise(resample(images_nhwc, ys, xs), self.mean, self.std)


@dataclass(frozen=True)
class TimmEvalTransform:
    """timm's own evaluation transform for one timm model (protocol {"resize": "timm", "timm_model": name}):
    the protocol behind timm's results table. Built by timm's functions from the model's pretrained_cfg
    (`build`), never re-written here; applied per image to PIL RGB images, as timm's own dataset does,
    and normalised by it (timm's mean and std, in 0..1 units)."""

    timm_model: str
    image_size: int
    transform: object  # timm's torchvision Compose
    data_config: dict  # timm.data.resolve_model_data_config's output

    @classmethod
    def build(cls, protocol: dict, image_size: int, mean: float, std: float) -> TimmEvalTransform:
        """timm's transform for protocol["timm_model"]; the model's image size and its normalisation (mean,
        std in 0..255 units) must be those the transform gives, else one PipelineError saying so."""
        import timm
        import timm.data

        name = protocol.get("timm_model")
        try:
            with torch.device("meta"):  # only its pretrained_cfg is read: no weights, nothing allocated
                model = timm.create_model(str(name), pretrained=False)
        except RuntimeError as e:
            raise PipelineError(f"evaluation protocol {protocol}: timm_model {name!r} is not a timm model ({e}); "
                                "fix evaluation.protocols in the config") from None
        config = timm.data.resolve_model_data_config(model)
        made = tuple(config["input_size"][1:])
        if made != (image_size, image_size):
            raise PipelineError(f"evaluation protocol {protocol}: timm's transform for {name} makes "
                                f"{made[0]}x{made[1]} images but the model evaluated takes {image_size}x{image_size}; "
                                "evaluate a model of that size or name a timm_model of this one's")
        if any(abs(m * 255 - mean) > 1e-6 or abs(s * 255 - std) > 1e-6 for m, s in zip(config["mean"], config["std"])):
            raise PipelineError(f"evaluation protocol {protocol}: timm's transform for {name} normalises with mean "
                                f"{config['mean']} and std {config['std']} (x 255 in pixel levels), but the model was "
                                f"trained with pixel mean {mean} and std {std} (protocol.pixel_mean/pixel_std); "
                                "evaluate it with another protocol or a timm_model that normalises as it was trained")
        return cls(str(name), image_size, timm.data.create_transform(**config, is_training=False), config)

    def description(self) -> dict:
        """What the eval record says about this preprocessing: timm's interpolation, and its transform."""
        return {"interpolation": f"{self.data_config['interpolation']} (timm's transform, on PIL images)",
                "transform": str(self.transform), "timm_data_config": self.data_config}

    def from_decoded(self, images_chw: Iterable[torch.Tensor]) -> torch.Tensor:
        """Decoded images (uint8 CHW RGB, any sizes) -> timm's transform of each -> float32 (B, 3, S, S)."""
        from PIL import Image

        return torch.stack([self.transform(Image.fromarray(np.ascontiguousarray(im.permute(1, 2, 0).cpu().numpy())))
                            for im in images_chw])

    def __call__(self, images_nhwc: torch.Tensor, seeds=None) -> torch.Tensor:
        """uint8 NHWC images (an array split's batch) -> normalised float32 NCHW on their device."""
        return self.from_decoded(images_nhwc.permute(0, 3, 1, 2)).to(images_nhwc.device)


def eval_transform(protocol: dict, image_size: int, mean: float, std: float) -> EvalTransform | TimmEvalTransform:
    """An evaluation protocol's config entry as its transform (`resize` says which)."""
    if protocol.get("resize") == "timm":
        return TimmEvalTransform.build(dict(protocol), image_size, mean, std)
    transform = EvalTransform(dict(protocol), image_size, mean, std)
    transform.image_geometry(1, 1)  # a bad entry fails here, before any worker starts
    return transform


# ---------------------------------------------------------------------------------------------
# The fast path of image files: decode with libjpeg-turbo, crop the integer box, resize only the crop
# How far the uint8 path may lie from the float reference, in grey levels: OpenCV's INTER_LINEAR keeps
# the horizontal pass in integers with 11-bit weights (1/2048 steps) and rounds once, after the vertical
# pass; its vectorised vertical pass drops the 4 low bits of each horizontal sum first. Together at most
# one level (measured: 0.83 on random pixels, the steepest gradients; README "Performance: image path").
UINT8_PATH_MAX_ERROR = 1.0


@functools.cache
def _opencv():
    """OpenCV (imported on first use: only image-file jobs need it), one thread: a loader worker is one core."""
    import cv2

    cv2.setNumThreads(1)
    return cv2


def _resize_box_into(image: torch.Tensor, geometry_row, size: int, out_hwc: np.ndarray) -> None:
    """The CPU uint8 path: one decoded image (uint8 CHW on the CPU) through its geometry row into out_hwc
    (size, size, 3), with OpenCV's bilinear resize (half-pixel centres, no antialiasing, samples clamped
    to the box: tf.image.resize after tf.slice), which is about twice as fast as torch's uint8 kernel."""
    cv2 = _opencv()
    top, left, h, w, resize_h, resize_w, out_top, out_left, flip = (int(v) for v in geometry_row)
    hwc = image.permute(1, 2, 0)
    if hwc.stride(1) != 3 or hwc.stride(2) != 1:  # a grayscale image expanded to RGB (stride 0), or CHW memory
        hwc = hwc.contiguous()
    box = hwc.numpy()[top:top + h, left:left + w]  # a view: OpenCV reads the box in place
    rows, cols = out_top + size, out_left + size
    if (rows, cols) == (resize_h, resize_w):
        resized = cv2.resize(box, (resize_w, resize_h), interpolation=cv2.INTER_LINEAR)
    else:  # a centre crop: resize only the box's prefix that the outputs up to the window's far edge read,
        # at the whole resize's scale (given as fx, fy, OpenCV keeps it exactly: those outputs are bitwise
        # the whole resize's; test_image_path). The near edge cannot be cut: it starts between two pixels.
        prefix = box[:_source_prefix(rows, h, resize_h), :_source_prefix(cols, w, resize_w)]
        resized = cv2.resize(prefix, None, fx=resize_w / w, fy=resize_h / h, interpolation=cv2.INTER_LINEAR)
    window = resized[out_top:out_top + size, out_left:out_left + size]
    if flip:
        cv2.flip(window, 1, dst=out_hwc)
    else:
        out_hwc[...] = window


def _source_prefix(needed: int, src: int, dst: int) -> int:
    """How many leading pixels of a src-long axis the first `needed` outputs of its half-pixel bilinear
    resize to dst read (the last one's two taps: floor((needed - 0.5) * src / dst - 0.5) and the next)."""
    last_tap = math.floor((needed - 0.5) * src / dst - 0.5) + 1
    return min(src, max(last_tap, 0) + 1)


def _resize_box_torch(image: torch.Tensor, geometry_row, size: int, exact: bool) -> torch.Tensor:
    """The device path: the same geometry through torch's bilinear kernel, (3, size, size) on the image's
    device; exact=True resizes in float32 without rounding (decode_device "cuda")."""
    top, left, h, w, resize_h, resize_w, out_top, out_left, flip = (int(v) for v in geometry_row)
    # The HWC view gives the box NHWC's batch stride (image[None] would not: pytorch issue 68430).
    crop = image.permute(1, 2, 0)[None, top:top + h, left:left + w].permute(0, 3, 1, 2)
    crop = crop.to(torch.float32 if exact else torch.uint8, memory_format=torch.channels_last, copy=True)
    # Resize to (resize_h, resize_w) but compute only the rows and columns up to the window's far edge:
    # with the scales given, the op samples as F.interpolate(size=(resize_h, resize_w)) and stops there.
    # The kernel skips a dimension whose output size equals its input size, so such a prefix is not cut.
    rows = out_top + size if out_top + size != h else resize_h
    cols = out_left + size if out_left + size != w else resize_w
    resized = torch.ops.aten.upsample_bilinear2d(crop, [rows, cols], False, resize_h / h, resize_w / w)
    window = resized[0, :, out_top:out_top + size, out_left:out_left + size]
    return window.flip(-1) if flip else window


def _uses_opencv(device: torch.device, exact: bool) -> bool:
    return device.type == "cpu" and not exact


def crop_resize(image: torch.Tensor, geometry_row, size: int, exact: bool = False) -> torch.Tensor:
    """One decoded image (uint8 CHW, on any device) through its geometry row -> (3, size, size).

    On the CPU with exact=False: uint8 through OpenCV, within UINT8_PATH_MAX_ERROR of the float reference.
    Otherwise torch's kernel on the image's device (exact=True: float32, not rounded).
    """
    if not _uses_opencv(image.device, exact):
        return _resize_box_torch(image, geometry_row, size, exact)
    out = np.empty((size, size, 3), dtype=np.uint8)
    _resize_box_into(image, geometry_row, size, out)
    return torch.from_numpy(out).permute(2, 0, 1)


def transform_images(images: Sequence[torch.Tensor], transform: TrainAugment | EvalTransform,
                     seeds: Sequence[int], exact: bool = False) -> torch.Tensor:
    """Decoded images of any sizes (uint8 CHW) -> (B, 3, S, S) in 0..255, uint8 (float32 if exact).

    The batch is channels-last (NHWC memory): each image's window is written into its slot as a plain
    copy, where an NCHW batch would cost a transpose per image; `normalise` on the device returns NCHW.
    """
    geometry = transform.geometry(seeds, [im.shape[1] for im in images], [im.shape[2] for im in images])
    size = transform.image_size
    device = images[0].device if len(images) else torch.device("cpu")
    if _uses_opencv(device, exact):
        return _resize_boxes_cpu(images, geometry, size)
    out = torch.empty((len(images), size, size, 3), dtype=torch.float32 if exact else torch.uint8, device=device)
    for i, (image, row) in enumerate(zip(images, geometry)):
        out[i] = _resize_box_torch(image, row, size, exact).permute(1, 2, 0)
    return out.permute(0, 3, 1, 2)


def _resize_boxes_cpu(images: Iterable[torch.Tensor], geometry: np.ndarray, size: int) -> torch.Tensor:
    """The CPU uint8 path of a batch: images (uint8 CHW, taken one at a time: they may be decoded on demand)
    through their geometry rows into one channels-last (B, 3, size, size) uint8 batch."""
    out = torch.empty((len(geometry), size, size, 3), dtype=torch.uint8)
    out_hwc = out.numpy()
    for i, (image, row) in enumerate(zip(images, geometry)):
        _resize_box_into(image, row, size, out_hwc[i])
    return out.permute(0, 3, 1, 2)


def read_encoded(path: str) -> torch.Tensor:
    """A file's bytes as a uint8 1-D tensor."""
    try:
        with open(path, "rb", buffering=0) as f:
            encoded = bytearray(os.fstat(f.fileno()).st_size)
            f.readinto(encoded)
    except OSError as e:
        raise PipelineError(f"{path}: cannot be read ({e.strerror or e}); the data changed since "
                            "prepare_data ran: restore the file or rerun prepare_data") from None
    return torch.frombuffer(encoded, dtype=torch.uint8) if encoded else torch.empty(0, dtype=torch.uint8)


def _is_jpeg(encoded: torch.Tensor) -> bool:
    return encoded.numel() > 2 and int(encoded[0]) == 0xFF and int(encoded[1]) == 0xD8


def _decode_jpeg(encoded, device="cpu"):
    # torchvision 0.29 deprecates its image decoders in favour of TorchCodec (not in this stack);
    # the pinned version keeps them, so its DeprecationWarning on every call is noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(encoded, mode=ImageReadMode.UNCHANGED, device=device)


def _decode_with_pil(encoded: torch.Tensor, path: str) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(encoded.numpy().tobytes())) as im:
            pixels = np.asarray(im.convert("RGB")).copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise PipelineError(f"{path}: cannot be decoded as an image ({e}); replace or delete the file, "
                            "then rerun prepare_data") from None
    return torch.from_numpy(pixels).permute(2, 0, 1)


def _decode_jpeg_opencv(encoded: torch.Tensor, components: int) -> torch.Tensor | None:
    """A 1- or 3-component JPEG -> uint8 CHW RGB through OpenCV's libjpeg-turbo, None if it cannot decode it.

    The same library and settings as torchvision and PIL (bitwise their pixels: test_image_path), and
    0.95 to 1.19 times torchvision.io.decode_jpeg's rate here (bench image_*). EXIF orientation is ignored, as
    torchvision and PIL do without being asked (and as TF's decode_jpeg does)."""
    cv2 = _opencv()
    mode = cv2.IMREAD_GRAYSCALE if components == 1 else cv2.IMREAD_COLOR_RGB
    pixels = cv2.imdecode(encoded.numpy(), mode | cv2.IMREAD_IGNORE_ORIENTATION)
    if pixels is None:
        return None
    return torch.from_numpy(pixels)[None] if components == 1 else torch.from_numpy(pixels).permute(2, 0, 1)


def decode_image_bytes(encoded: torch.Tensor, path: str, header: tuple | None | str = "parse") -> torch.Tensor:
    """A file's bytes -> uint8 CHW RGB (a view of HWC memory, as torchvision decodes).

    Grayscale and colour JPEGs go through libjpeg-turbo in OpenCV (bitwise PIL's and torchvision's
    pixels: all three are libjpeg-turbo); everything else (CMYK JPEGs, PNG, PNG-named-JPEG, JPEGs
    OpenCV rejects) through PIL, as before. A file neither can decode is a PipelineError naming it.
    `header`: jpeg_header(encoded) when the caller has it already.
    """
    if encoded.numel() == 0:
        raise PipelineError(f"{path}: empty file (0 bytes); replace or delete it, then rerun prepare_data")
    header = jpeg_header(encoded) if header == "parse" else header
    if header is not None and header[2] in (1, 3):
        image = _decode_jpeg_opencv(encoded, header[2])
        if image is not None:  # None: truncated or corrupt; PIL decides and names the problem
            return image.expand(3, -1, -1)
    return _decode_with_pil(encoded, path)


# JPEG frame headers (SOF0-SOF15 but DHT, JPG and DAC), which hold the image's height and width.
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_header(encoded: torch.Tensor) -> tuple[int, int, int] | None:
    """(height, width, components) from a JPEG's frame header without decoding it; None for anything else."""
    if not _is_jpeg(encoded):
        return None
    b, i = memoryview(encoded.numpy()), 2
    while i + 10 <= len(b) and b[i] == 0xFF:
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _JPEG_FRAME_MARKERS:
            return (b[i + 5] << 8) | b[i + 6], (b[i + 7] << 8) | b[i + 8], b[i + 9]
        elif marker == 0xDA:  # start of scan before any frame header: not a valid JPEG
            return None
        else:
            i += 2 + ((b[i + 2] << 8) | b[i + 3])
    return None


def decode_and_transform(encoded: Sequence[torch.Tensor], paths: Sequence[str],
                         transform: TrainAugment | EvalTransform | TimmEvalTransform,
                         seeds: Sequence[int]) -> torch.Tensor:
    """Files' bytes -> (B, 3, S, S) uint8 (channels-last), as transform_images on the decoded images;
    with timm's transform, its normalised float32 output.

    Each image is resized right after it is decoded, while its pixels are still in the CPU's cache
    (decoding the whole batch first costs several percent of the decoder's rate: bench image_eval). The
    batch's geometry needs every size first: JPEGs give it in their header, other files are decoded first.
    """
    if isinstance(transform, TimmEvalTransform):
        return transform.from_decoded(decode_image_bytes(e, p) for e, p in zip(encoded, paths))
    headers = [jpeg_header(e) for e in encoded]
    decoded = {i: decode_image_bytes(e, p, None) for i, (e, p, hw) in enumerate(zip(encoded, paths, headers))
               if hw is None}
    sizes = [tuple(decoded[i].shape[1:]) if hw is None else hw[:2] for i, hw in enumerate(headers)]
    geometry = transform.geometry(seeds, [h for h, _ in sizes], [w for _, w in sizes])

    def images() -> Iterator[torch.Tensor]:
        for i, (e, p) in enumerate(zip(encoded, paths)):
            image = decoded.pop(i) if i in decoded else decode_image_bytes(e, p, headers[i])
            if tuple(image.shape[1:]) != sizes[i]:
                raise PipelineError(f"{p}: its JPEG header says {sizes[i][0]}x{sizes[i][1]} (height x width) but "
                                    f"it decodes to {image.shape[1]}x{image.shape[2]}; replace or delete the file, "
                                    "then rerun prepare_data")
            yield image

    return _resize_boxes_cpu(images(), geometry, transform.image_size)


def read_image(path: str) -> torch.Tensor:
    """An image file as a uint8 CHW RGB tensor."""
    return decode_image_bytes(read_encoded(path), path)


def load_image(path: str) -> torch.Tensor:
    """An image file as a uint8 HWC RGB tensor."""
    return read_image(path).permute(1, 2, 0).contiguous()


def decode_on_device(encoded: Sequence[torch.Tensor], paths: Sequence[str], device) -> list[torch.Tensor]:
    """Decode a batch of files on `device`: JPEGs batched through torchvision.io.decode_jpeg(device=...)
    (nvJPEG on CUDA); other files, and any batch the device decoder rejects, one by one through
    decode_image_bytes on the CPU (which names a bad file), then moved."""
    device = torch.device(device)
    jpegs = [i for i, e in enumerate(encoded) if _is_jpeg(e)]
    images: list[torch.Tensor | None] = [None] * len(encoded)
    try:
        decoded = _decode_jpeg([encoded[i] for i in jpegs], device) if jpegs else []
    except (RuntimeError, ValueError):  # one bad file fails the whole batch: the loop below names it
        decoded = []
    for i, image in zip(jpegs, decoded):
        if image.shape[0] in (1, 3):
            images[i] = image.expand(3, -1, -1)
    return [image if image is not None else decode_image_bytes(e, p).to(device)
            for image, e, p in zip(images, encoded, paths)]


# ---------------------------------------------------------------------------------------------
# Loaders
def resolve_num_workers(setting: int | str, cpus: int) -> int:
    """protocol.num_workers as a DataLoader worker count; "auto" follows the job's CPUs.

    "auto": one worker per CPU beyond the one the training process keeps for itself (it steps the
    model and, with decode_device cuda, decodes); a 1-CPU job decodes in the main process (0 workers).
    """
    if setting == "auto":
        return max(0, int(cpus) - 1)
    if isinstance(setting, str) and setting.isdigit():
        setting = int(setting)
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise PipelineError(f"protocol.num_workers must be 'auto' or an integer >= 0, not {setting!r}; fix the config")
    return setting


DECODE_DEVICES = ("cpu", "cuda")


class _FolderBatches(torch.utils.data.Dataset):
    """Image-folder micro-batches keyed by lists of (index, aug seed), read and decoded in the worker.

    An item is {"images": uint8 (B, 3, S, S), "labels"}, or with decode_on_device {"encoded": [file
    bytes], "paths", "seeds", "labels"} for the main process to decode on its device. A file that
    cannot be read comes back as {"error": message}: the main process raises it as one PipelineError
    naming the file (a worker's exception would reach it wrapped in the worker's traceback).
    """

    def __init__(self, files: list[str], labels: np.ndarray, transform, decode_on_device: bool):
        self.files, self.labels, self.transform = files, labels, transform
        self.decode_on_device = decode_on_device

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, keys: Sequence[tuple[int, int]]) -> dict:
        indices, seeds = [int(i) for i, _ in keys], [int(s) for _, s in keys]
        paths = [self.files[i] for i in indices]
        labels = torch.from_numpy(self.labels[indices])
        try:
            encoded = [read_encoded(p) for p in paths]
            if self.decode_on_device:
                return {"encoded": encoded, "paths": paths, "seeds": seeds, "labels": labels}
            return {"images": decode_and_transform(encoded, paths, self.transform, seeds), "labels": labels}
        except PipelineError as e:
            return {"error": str(e)}


class _KeyBatches:
    """A sampler over precomputed batches of (index, seed) keys (each batch is one dataset item)."""

    def __init__(self, batches: Iterable[Sequence[tuple[int, int]]]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _plan_keys(plan: Iterable[tuple[Sequence[int], Sequence[int]]]) -> Iterator[list[tuple[int, int]]]:
    for indices, seeds in plan:
        yield [(int(i), int(s)) for i, s in zip(indices, seeds)]


def _folder_loader(split: Split, transform, batches, device, num_workers: int, decode_on_device: bool = False):
    device = torch.device(device)
    return torch.utils.data.DataLoader(
        _FolderBatches(split.files, split.labels, transform, decode_on_device),
        sampler=_KeyBatches(batches),
        batch_size=None,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        worker_init_fn=_ignore_stop_signals,
    )


def _ignore_stop_signals(worker_id: int) -> None:
    """A loader worker leaves SIGTERM/SIGUSR1/SIGINT to the training process, which finishes its update
    and saves (a signal sent to the whole job must not kill the workers it still reads from). The
    workers still end with their parent: torch's DataLoader watches it."""
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


@atexit.register  # registered after multiprocessing's own exit handler, so it runs before it
def _stop_loader_workers() -> None:
    """Kill loader workers still alive at exit. Without this, an iterator still referenced at exit (by the
    traceback of a bad file's error, say) leaves its workers to multiprocessing's exit handler, which stops
    daemon processes with SIGTERM, which the workers ignore (_ignore_stop_signals): the process would hang
    instead of exiting with the error."""
    for worker in multiprocessing.active_children():
        if worker.daemon:  # only loader workers are daemonic children of our stages
            worker.kill()
            worker.join()


def _folder_batches(loader, transform, device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(normalised float32 NCHW images, int64 labels) on `device` from _FolderBatches items."""
    for item in loader:
        if "error" in item:
            raise PipelineError(item["error"])
        if "encoded" in item:  # decode_on_device: the same geometry code on the device's tensors
            decoded = decode_on_device(item["encoded"], item["paths"], device)
            images = transform_images(decoded, transform, item["seeds"], exact=device.type != "cpu")
        else:
            images = item["images"].to(device, non_blocking=True)
        yield _model_input(images, transform), item["labels"].to(device, non_blocking=True)


def _model_input(images: torch.Tensor, transform) -> torch.Tensor:
    """A loader's batch as the model's input: normalised, unless timm's transform has done it already."""
    return images if isinstance(transform, TimmEvalTransform) else normalise(images, transform.mean, transform.std)


def _decode_on_device_flag(decode_device: str, device: torch.device) -> bool:
    if decode_device not in DECODE_DEVICES:
        raise PipelineError(f"protocol.decode_device must be one of {list(DECODE_DEVICES)}, not {decode_device!r}")
    if decode_device == "cuda" and device.type != "cuda":
        raise PipelineError(f"protocol.decode_device is 'cuda' but this job runs on {device}; set it to 'cpu'")
    return decode_device == "cuda"


def _device_arrays(split: Split, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split as uint8 NHWC images and int64 labels on the device (moved once)."""
    return torch.from_numpy(split.images).to(device), torch.from_numpy(split.labels).to(device)


def train_loader(split: Split, augment: TrainAugment, plan, device, num_workers: int, decode_device: str = "cpu"):
    """Yield (images float32 NCHW, labels int64) on `device` for each (indices, aug_seeds) in plan.

    Image-folder splits: decode_device "cpu" decodes and augments in `num_workers` DataLoader workers
    (uint8 until the device); "cuda" has the workers only read the files and decodes on `device`.
    """
    device = torch.device(device)
    if split.layout == "arrays":
        return _array_train_batches(split, augment, plan, device)
    on_device = _decode_on_device_flag(decode_device, device)
    return _folder_batches(_folder_loader(split, augment, _plan_keys(plan), device, num_workers, on_device),
                           augment, device)


def _array_train_batches(split: Split, augment: TrainAugment, plan, device):
    images, labels = _device_arrays(split, device)
    for indices, seeds in plan:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64)).to(device, non_blocking=True)
        yield augment(images.index_select(0, idx), seeds), labels.index_select(0, idx)


class _ArrayEvalLoader:
    """Evaluation batches of an array split, transformed on the device; iterable any number of times."""

    def __init__(self, split: Split, transform: EvalTransform | TimmEvalTransform, batch_size: int, device):
        self.images, self.labels = _device_arrays(split, device)
        self.transform, self.batch_size = transform, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.labels), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            yield self.transform(self.images[chunk]), self.labels[chunk]


class _FolderEvalLoader:
    """Evaluation batches of an image-folder split from DataLoader workers (they persist across passes)."""

    def __init__(self, split: Split, transform: EvalTransform | TimmEvalTransform, batch_size: int, device,
                 num_workers: int, decode_on_device: bool):
        n = len(split)
        batches = [[(i, 0) for i in range(s, min(n, s + batch_size))] for s in range(0, n, batch_size)]
        self.device, self.transform = torch.device(device), transform
        self.loader = _folder_loader(split, transform, batches, self.device, num_workers, decode_on_device)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return _folder_batches(self.loader, self.transform, self.device)


def eval_loader(split: Split, protocol: dict, image_size: int, batch_size: int, device, num_workers: int,
                mean: float, std: float, decode_device: str = "cpu"):
    """A re-iterable loader of (images float32 NCHW, labels int64) on `device`, in split order.

    Create it once and iterate it at each evaluation: array splits stay on the device and
    image-folder workers persist between passes. decode_device as in train_loader, except for timm's
    transform, a PIL transform: it runs in the CPU workers whatever decode_device says. The loader's
    `transform` (see `eval_transform`) describes itself for the eval record.
    """
    transform = eval_transform(protocol, image_size, mean, std)
    device = torch.device(device)
    if split.layout == "arrays":
        return _ArrayEvalLoader(split, transform, batch_size, device)
    on_device = _decode_on_device_flag(decode_device, device) and isinstance(transform, EvalTransform)
    return _FolderEvalLoader(split, transform, batch_size, device, num_workers, on_device)


# ---------------------------------------------------------------------------------------------
# Is the loader the bottleneck?
LOADER_BOUND_WAIT_FRACTION = 0.1  # a loader that keeps up leaves ~0 wait; 10% is well above timer noise


class TimedBatches:
    """An iterator wrapper that splits wall time into waiting for the next batch (in next()) and the
    rest (the consumer's step). The first batch's wait (worker start-up) is kept apart as startup_s."""

    def __init__(self, batches: Iterable):
        self._batches = iter(batches)
        self.startup_s: float | None = None
        self.wait_s = self.step_s = 0.0
        self._returned: float | None = None

    def __iter__(self) -> TimedBatches:
        return self

    def __next__(self):
        start = time.perf_counter()
        if self._returned is not None:
            self.step_s += start - self._returned
        item = next(self._batches)
        self._returned = time.perf_counter()
        if self.startup_s is None:
            self.startup_s = self._returned - start
        else:
            self.wait_s += self._returned - start
        return item

    def take(self) -> dict:
        """The time since the last take(): {"data_wait_s", "step_s", "data_wait_fraction"}; counters restart.

        Call it when logging, and after work that is not training (minival) to leave that out.
        """
        now = time.perf_counter()
        if self._returned is not None:
            self.step_s += now - self._returned
            self._returned = now
        total = self.wait_s + self.step_s
        stats = {"data_wait_s": self.wait_s, "step_s": self.step_s,
                 "data_wait_fraction": self.wait_s / total if total > 0 else 0.0}
        self.wait_s = self.step_s = 0.0
        return stats


def loader_bottleneck_note(stats: dict) -> str | None:
    """A log line when the loader, not the model, limited an interval (TimedBatches.take() stats), else None."""
    fraction = stats["data_wait_fraction"]
    if fraction < LOADER_BOUND_WAIT_FRACTION:
        return None
    return (f"the data loader is the bottleneck: {fraction:.0%} of the interval went to waiting for batches "
            f"({stats['data_wait_s']:.1f} s); give the job more CPUs (resources.*.cpus with protocol.num_workers "
            "auto) or set protocol.decode_device: cuda")
