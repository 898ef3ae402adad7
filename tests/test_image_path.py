"""The image-file path: decoding, the fast uint8 crop + resize against the float reference, bad files,
worker counts and the loader-bottleneck timer (issue #13)."""
from __future__ import annotations

import functools
import re
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from workflow_scripts import data, splits
from workflow_scripts.common import PipelineError

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
OFFICIAL = {"name": "official", "resize": "direct"}
# The paper's two evaluation protocols (Appendix C (3)): (ii) resmall-crop, Table 3's; (i) resize-crop, Table 2's.
RESMALL_CROP = {"name": "resmall_crop", "resize": "shorter_side", "crop_fraction": 0.875}
RESIZE_CROP = {"name": "resize_crop", "resize": "square", "crop_fraction": 0.875}
MEAN = STD = 127.5
STEP = 1 / STD  # one grey level in normalised units (2/255)
# The fast path's bound against the float reference (see data.UINT8_PATH_MAX_ERROR).
ATOL = data.UINT8_PATH_MAX_ERROR * STEP
# Odd sizes on purpose: 1-pixel-wide and 1-pixel-high images, images smaller than the output, and
# (300, 240) / (240, 300), whose resmall-crop window ends at the image's own width or height.
SIZES = [(375, 500), (500, 375), (7, 9), (1, 40), (40, 1), (300, 240), (240, 300), (32, 32)]


def random_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Random pixels (the steepest gradients: a shifted sampling grid differs by tens of grey levels)."""
    rng = np.random.default_rng([height, width, seed])
    return torch.from_numpy(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def assert_within_one_step(fast: torch.Tensor, reference: torch.Tensor) -> None:
    """Within one grey level (plus the fixed-point slack of data.UINT8_PATH_MAX_ERROR): rounding only.
    On random pixels a sampling grid shifted by a tenth of a pixel is off by several levels."""
    diff = (fast - reference).abs() / STEP
    assert diff.max().item() <= data.UINT8_PATH_MAX_ERROR, diff.max().item()


def fast_path(images_hwc: list[torch.Tensor], transform, seeds) -> torch.Tensor:
    uint8 = data.transform_images([im.permute(2, 0, 1) for im in images_hwc], transform, seeds)
    assert uint8.dtype == torch.uint8
    return data.normalise(uint8, transform.mean, transform.std)


# ---------------------------------------------------------------------------------------------
# Parity with the float reference on the same decoded image and seeds
@pytest.mark.parametrize("inception_crop", [True, False])
@pytest.mark.parametrize("flip", [True, False])
def test_train_fast_path_matches_the_reference(inception_crop, flip):
    seeds = np.arange(12) * 7919
    for size in (224, 32):
        aug = data.TrainAugment(size, inception_crop, 0.05, flip, MEAN, STD)
        for height, width in SIZES:
            image = random_image(height, width)
            reference = aug(image[None].expand(len(seeds), -1, -1, -1), seeds)
            fast = fast_path([image] * len(seeds), aug, seeds)
            assert fast.shape == reference.shape == (len(seeds), 3, size, size) and fast.is_contiguous()
            assert_within_one_step(fast, reference)
            flips = aug.geometry(seeds, height, width)[:, 8]
            assert flips.any() == (flip and flips.any()) and (flip or not flips.any())


@pytest.mark.parametrize("protocol", [OFFICIAL, RESMALL_CROP, RESIZE_CROP], ids=["direct", "shorter_side", "square"])
def test_eval_fast_path_matches_the_reference(protocol):
    for size in (224, 32):
        transform = data.EvalTransform(protocol, size, MEAN, STD)
        for height, width in SIZES:
            image = random_image(height, width)
            assert_within_one_step(fast_path([image], transform, [0]), transform(image[None]))


@pytest.mark.parametrize("protocol", [RESMALL_CROP, RESIZE_CROP], ids=["shorter_side", "square"])
def test_centre_crop_resizes_only_the_prefix_it_reads(protocol):
    """resmall-crop and resize-crop resize the prefix of the image that their window's outputs read, at the
    whole resize's scale: bitwise the window of OpenCV's whole resize, for sizes up- and downscaled, 2x
    exactly included."""
    cv2 = data._opencv()
    transform = data.EvalTransform(protocol, 224, MEAN, STD)
    rng = np.random.default_rng(5)
    sizes = [(1, 1), (1, 300), (255, 256), (375, 500), (512, 512), (512, 1024), (1500, 2000)]
    for height, width in sizes + [tuple(rng.integers(1, 700, 2)) for _ in range(150)]:
        image = random_image(int(height), int(width))
        row = transform.image_geometry(int(height), int(width))
        _, _, _, _, resize_h, resize_w, top, left, _ = row
        whole = cv2.resize(image.numpy(), (resize_w, resize_h), interpolation=cv2.INTER_LINEAR)
        out = np.empty((224, 224, 3), dtype=np.uint8)
        data._resize_box_into(image.permute(2, 0, 1), row, 224, out)
        assert np.array_equal(out, whole[top:top + 224, left:left + 224]), (height, width)


def test_one_pixel_wide_crops_and_every_window():
    """Geometry rows cut anywhere (1-pixel boxes, windows at every edge) sample what the reference samples."""
    image = random_image(37, 41)
    rows = [(5, 7, 1, 20, 16, 16, 0, 0, 0), (5, 7, 20, 1, 16, 16, 0, 0, 1), (0, 0, 1, 1, 16, 16, 0, 0, 0),
            (3, 4, 30, 30, 40, 20, 24, 4, 0), (0, 0, 37, 41, 16, 30, 0, 14, 1), (2, 0, 35, 41, 16, 16, 0, 0, 1)]
    for row in rows:
        ys, xs = data.sample_coords(np.array([row]), 16)
        reference = data.normalise(data.resample(image[None], ys, xs), MEAN, STD)[0]
        fast = data.normalise(data.crop_resize(image.permute(2, 0, 1), row, 16), MEAN, STD)
        assert_within_one_step(fast, reference)


# ---------------------------------------------------------------------------------------------
# Decoding: OpenCV's libjpeg-turbo for JPEGs, PIL for the rest; the same pixels as PIL and torchvision
def write_image(path: Path, kind: str, size=(60, 80)) -> Path:
    """An image file of `kind`; smooth content plus noise, like a photo."""
    height, width = size
    y, x = np.mgrid[0:height, 0:width, 0:3][:2]
    base = 128 + 60 * np.sin(x / 9.0) * np.cos(y / 7.0 + np.arange(3))
    noisy = np.clip(base + np.random.default_rng(1).normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    im = Image.fromarray(noisy)
    if kind == "rgb420":
        im.save(path, format="JPEG", quality=90)
    elif kind == "rgb444":
        im.save(path, format="JPEG", quality=95, subsampling=0)
    elif kind == "rgb422":
        im.save(path, format="JPEG", quality=85, subsampling=1)
    elif kind == "progressive":  # a later frame marker (SOF2)
        im.save(path, format="JPEG", quality=90, progressive=True)
    elif kind == "exif_rotated":  # orientation 6 in a large APP1 segment before SOF0: not applied (TF does not)
        exif = Image.Exif()
        exif[0x0112] = 6
        im.save(path, format="JPEG", quality=90, exif=exif.tobytes() + bytes(30000))
    elif kind == "gray":
        im.convert("L").save(path, format="JPEG", quality=90)
    elif kind == "cmyk":
        im.convert("CMYK").save(path, format="JPEG", quality=90)
    elif kind == "png_named_jpeg":  # ImageNet has a few of these
        im.save(path, format="PNG")
    else:
        raise ValueError(kind)
    return path


IMAGE_KINDS = ["rgb420", "rgb444", "rgb422", "progressive", "exif_rotated", "gray", "cmyk", "png_named_jpeg"]


def pil_pixels(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy())


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_decoder_gives_pils_pixels(tmp_path, kind):
    path = write_image(tmp_path / f"{kind}.JPEG", kind, size=(45, 61))
    image = data.read_image(str(path))
    assert image.dtype == torch.uint8 and image.shape == (3, 45, 61)
    assert torch.equal(image.permute(1, 2, 0), pil_pixels(path))  # both are libjpeg-turbo
    assert torch.equal(data.load_image(str(path)), pil_pixels(path))


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_opencv_decodes_jpegs_as_torchvision_does(tmp_path, kind):
    """The CPU path decodes JPEGs with OpenCV's libjpeg-turbo: bitwise torchvision.io.decode_jpeg's pixels."""
    encoded = data.read_encoded(str(write_image(tmp_path / f"{kind}.JPEG", kind, size=(45, 61))))
    header = data.jpeg_header(encoded)
    if kind == "png_named_jpeg":
        assert header is None
        return
    assert header == (45, 61, {"gray": 1, "cmyk": 4}.get(kind, 3))
    if kind != "cmyk":  # CMYK goes to PIL (neither OpenCV's nor torchvision's conversion is PIL's)
        opencv = data._decode_jpeg_opencv(encoded, header[2]).expand(3, -1, -1)
        assert torch.equal(opencv, data._decode_jpeg(encoded).expand(3, -1, -1))


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_jpeg_header_gives_the_size_from_the_frame_header(tmp_path, kind):
    path = write_image(tmp_path / f"{kind}.JPEG", kind, size=(37, 53))
    encoded = data.read_encoded(str(path))
    header = data.jpeg_header(encoded)
    assert (None if header is None else header[:2]) == (None if kind == "png_named_jpeg" else (37, 53))
    assert data.jpeg_header(encoded[:40]) is None or kind == "png_named_jpeg"  # cut before its frame header
    assert tuple(data.read_image(str(path)).shape[1:]) == (37, 53)


def test_decode_and_transform_equals_decoding_first(tmp_path, monkeypatch):
    """The workers' interleaved path (sizes from the JPEG headers, PNGs decoded first) gives the batch that
    transform_images gives on the decoded images, bitwise; a header that lies about the size is an error."""
    split = image_split(tmp_path, IMAGE_KINDS * 2)
    encoded = [data.read_encoded(p) for p in split.files]
    seeds = list(range(50, 50 + len(split)))
    for transform in (data.TrainAugment(32, True, 0.05, True, MEAN, STD),
                      data.EvalTransform(RESMALL_CROP, 32, MEAN, STD), data.EvalTransform(RESIZE_CROP, 32, MEAN, STD)):
        decoded = [data.decode_image_bytes(e, p) for e, p in zip(encoded, split.files)]
        assert torch.equal(data.decode_and_transform(encoded, split.files, transform, seeds),
                           data.transform_images(decoded, transform, seeds))
    monkeypatch.setattr(data, "jpeg_header", lambda encoded: (7, 9, 3))
    with pytest.raises(PipelineError, match=re.escape(f"{split.files[0]}: its JPEG header says 7x9")):
        data.decode_and_transform(encoded, split.files, transform, seeds)


def image_split(tmp_path: Path, kinds=IMAGE_KINDS) -> splits.Split:
    files = [str(write_image(tmp_path / f"{i}_{kind}.JPEG", kind, size=(50 + 7 * i, 70 - 3 * i)))
             for i, kind in enumerate(kinds)]
    return splits.Split("train", "imagefolder", ["a", "b"], np.arange(len(files)) % 2, files=files)


def test_files_through_the_loaders_match_the_reference_on_pils_pixels(tmp_path):
    """What the jobs run, end to end, against the path before issue #13: PIL decode + float resampling."""
    split = image_split(tmp_path)
    aug = data.TrainAugment(32, True, 0.05, True, MEAN, STD)
    plan = [(np.arange(len(split)), np.arange(len(split)) + 100)]
    (images, labels), = list(data.train_loader(split, aug, plan, "cpu", 0))
    for i, path in enumerate(split.files):
        assert_within_one_step(images[i:i + 1], aug(pil_pixels(path)[None], [100 + i]))
    assert torch.equal(labels, torch.from_numpy(split.labels))
    for protocol in (OFFICIAL, RESMALL_CROP, RESIZE_CROP):
        transform = data.EvalTransform(protocol, 32, MEAN, STD)
        (images, _), = list(data.eval_loader(split, protocol, 32, 64, "cpu", 0, MEAN, STD))
        for i, path in enumerate(split.files):
            assert_within_one_step(images[i:i + 1], transform(pil_pixels(path)[None]))


def test_decode_on_device_path_shares_the_geometry(tmp_path):
    """The decode_device "cuda" code run on CPU tensors: the workers only read, the main process decodes
    (batched decode_jpeg, PIL for the rest) and crops on the device with the same geometry rows."""
    split = image_split(tmp_path)
    aug = data.TrainAugment(32, True, 0.05, True, MEAN, STD)
    plan = [(np.arange(len(split)), np.arange(len(split)) * 3), (np.array([4, 0, 2]), np.array([7, 8, 9]))]
    in_workers = list(data._folder_batches(data._folder_loader(split, aug, data._plan_keys(plan), "cpu", 0),
                                           aug, torch.device("cpu")))
    on_device = list(data._folder_batches(data._folder_loader(split, aug, data._plan_keys(plan), "cpu", 0, True),
                                          aug, torch.device("cpu")))
    for (x0, y0), (x1, y1) in zip(in_workers, on_device, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    # On CUDA the crop is resized in float (exact=True): the reference's geometry up to float rounding.
    decoded = data.decode_on_device([data.read_encoded(p) for p in split.files], split.files, "cpu")
    exact = data.normalise(data.transform_images(decoded, aug, list(range(len(split))), exact=True), MEAN, STD)
    for i, image in enumerate(decoded):
        reference = aug(image.permute(1, 2, 0)[None], [i])
        torch.testing.assert_close(exact[i:i + 1], reference, atol=0.02 * STEP, rtol=0)


def test_decode_device_is_checked(tmp_path):
    split = image_split(tmp_path, ["rgb420"])
    aug = data.TrainAugment(32, True, 0.05, True, MEAN, STD)
    with pytest.raises(PipelineError, match="decode_device is 'cuda' but this job runs on cpu"):
        data.train_loader(split, aug, [], "cpu", 0, decode_device="cuda")
    with pytest.raises(PipelineError, match=r"decode_device must be one of \['cpu', 'cuda'\]"):
        data.eval_loader(split, OFFICIAL, 32, 8, "cpu", 0, MEAN, STD, decode_device="gpu")


# ---------------------------------------------------------------------------------------------
# The evaluation protocols against their definitions (issue 19): the paper's resmall-crop and resize-crop
# (Appendix C (3)) on CIFAR-like arrays and on portrait and landscape JPEGs; timm's against timm's transform
TIMM = {"name": "timm", "resize": "timm", "timm_model": "mixer_b16_224.goog_in21k_ft_in1k"}
RESIZED_SIDE = {224: 256, 448: 512}  # the paper's "256 pixels" for 224; the same ratio (0.875) at 448


def by_definition(pixels_hwc: torch.Tensor, protocol: dict, size: int) -> torch.Tensor:
    """A protocol computed from the paper's words, not from data's geometry rows: resize the whole image
    (bilinear, half-pixel centres, no antialias) so that its shorter side is 256 (resmall-crop) or to 256 x 256
    (resize-crop), then take the central size x size crop (the margin's floor half, as TensorFlow's pipelines)."""
    height, width = pixels_hwc.shape[:2]
    side = RESIZED_SIDE[size]
    if protocol["name"] == "resize_crop":
        resized_hw = (side, side)
    elif height <= width:
        resized_hw = (side, round(width * side / height))
    else:
        resized_hw = (round(height * side / width), side)
    image = pixels_hwc.permute(2, 0, 1)[None].float()
    resized = F.interpolate(image, size=resized_hw, mode="bilinear", align_corners=False, antialias=False)
    top, left = (resized_hw[0] - size) // 2, (resized_hw[1] - size) // 2
    return (resized[..., top:top + size, left:left + size] - MEAN) / STD


@pytest.mark.parametrize("protocol", [RESMALL_CROP, RESIZE_CROP], ids=["resmall_crop", "resize_crop"])
def test_resmall_and_resize_crop_are_what_the_paper_defines(tmp_path, protocol):
    """32x32 CIFAR-like arrays (the float path) and portrait and landscape JPEGs (decoded by OpenCV, resized in
    uint8: within one grey level) at 224 and 448: each image exactly its definition."""
    arrays = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    array_split = splits.Split("test", "arrays", ["a", "b"], np.arange(3) % 2, images=arrays.numpy())
    # Portrait and landscape, odd margins included: 333 x 250 at 224 gives 341 x 256, a margin of 117 (the floor
    # half and torchvision's rounding agree); 335 x 250 gives 343, a margin of 119 (they differ by 1 px).
    shapes = [(333, 250), (250, 335), (375, 500), (500, 375)]
    files = [str(write_image(tmp_path / f"{h}x{w}.JPEG", "rgb420", size=(h, w))) for h, w in shapes]
    file_split = splits.Split("test", "imagefolder", ["a", "b"], np.arange(len(files)) % 2, files=files)
    for size in (224, 448):
        (images, _), = list(data.eval_loader(array_split, protocol, size, 8, "cpu", 0, MEAN, STD))
        expected = torch.cat([by_definition(image, protocol, size) for image in arrays])
        torch.testing.assert_close(images, expected, atol=0.02 * STEP, rtol=0)  # float rounding only
        (images, _), = list(data.eval_loader(file_split, protocol, size, 8, "cpu", 0, MEAN, STD))
        assert images.shape == (len(files), 3, size, size)
        for i, path in enumerate(files):
            assert_within_one_step(images[i:i + 1], by_definition(pil_pixels(path), protocol, size))
    # Not the same protocol: on a non-square image the two differ (so the test above tells them apart).
    other = RESIZE_CROP if protocol is RESMALL_CROP else RESMALL_CROP
    assert (by_definition(pil_pixels(files[0]), other, 448) - images[:1]).abs().max() > 10 * STEP


@functools.cache
def timms_transform(name: str):
    """timm's evaluation transform for a model, built here the way timm documents it (not through data.py)."""
    import timm
    import timm.data

    model = timm.create_model(name, pretrained=False)
    return timm.data.create_transform(**timm.data.resolve_data_config(model=model), is_training=False)


def test_timm_protocol_is_timms_own_transform(tmp_path):
    """The timm protocol's images are bitwise those of timm's transform on the PIL image, as timm's own
    dataset opens it (Image.open(...).convert("RGB")): JPEGs through loader workers, CIFAR-like arrays."""
    reference = timms_transform(TIMM["timm_model"])
    kinds = ["rgb420", "gray", "cmyk", "png_named_jpeg"]
    files = [str(write_image(tmp_path / f"{i}_{kind}.JPEG", kind, size=(333 - 83 * i, 250 + 83 * i)))
             for i, kind in enumerate(kinds)]  # portrait, landscape and in between
    split = splits.Split("test", "imagefolder", ["a", "b"], np.arange(len(files)) % 2, files=files)
    loader = data.eval_loader(split, TIMM, 224, 3, "cpu", 2, MEAN, STD)
    images = torch.cat([x for x, _ in loader])
    for i, path in enumerate(files):
        with Image.open(path) as im:
            assert torch.equal(images[i], reference(im.convert("RGB"))), path
    assert loader.transform.description()["transform"] == str(reference)
    arrays = np.random.default_rng(4).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    array_split = splits.Split("test", "arrays", ["a", "b"], np.arange(3) % 2, images=arrays)
    (images, _), = list(data.eval_loader(array_split, TIMM, 224, 8, "cpu", 0, MEAN, STD))
    assert torch.equal(images, torch.stack([reference(Image.fromarray(a)) for a in arrays]))


def test_timm_protocol_errors_name_the_mismatch():
    with pytest.raises(PipelineError, match="makes 224x224 images but the model evaluated takes 32x32"):
        data.eval_transform(TIMM, 32, MEAN, STD)
    with pytest.raises(PipelineError, match="timm_model 'mixer_b16_999' is not a timm model"):
        data.eval_transform(dict(TIMM, timm_model="mixer_b16_999"), 224, MEAN, STD)
    with pytest.raises(PipelineError, match=r"normalises with mean \(0.5, 0.5, 0.5\)"):
        data.eval_transform(TIMM, 224, 0.0, 1.0)
    with pytest.raises(PipelineError, match="resize must be one of .*'square', 'timm'"):
        data.eval_transform({"resize": "shorter"}, 224, MEAN, STD)
    with pytest.raises(PipelineError, match="'square' needs crop_fraction"):
        data.eval_transform({"resize": "square"}, 224, MEAN, STD)


# ---------------------------------------------------------------------------------------------
# A file that cannot be decoded stops the job with one error naming it
def damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:600])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "not_an_image":
        path.write_text("<html>404 Not Found</html>\n")


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("how", ["truncated", "empty", "not_an_image"])
def test_undecodable_file_stops_the_loader_naming_it(tmp_path, how, num_workers):
    split = image_split(tmp_path, ["rgb420"] * 4)
    bad = Path(split.files[2])
    damage(bad, how)
    aug = data.TrainAugment(32, True, 0.05, True, MEAN, STD)
    plan = [(np.array([0, 1]), np.array([1, 2])), (np.array([3, 2]), np.array([3, 4]))]
    batches = data.train_loader(split, aug, iter(plan), "cpu", num_workers)
    assert next(batches)[0].shape == (2, 3, 32, 32)  # the good batch before it arrives
    start = time.monotonic()
    with pytest.raises(PipelineError) as caught:
        next(batches)
    assert time.monotonic() - start < 60
    message = str(caught.value)
    assert message.startswith(f"{bad}: ") and "\n" not in message and "rerun prepare_data" in message


def test_process_exits_after_a_workers_error_while_the_error_is_still_referenced(tmp_path):
    """The workers ignore SIGTERM (a signal to the whole job must not kill them), which is how
    multiprocessing's exit handler stops leftover daemon workers: a job whose loader failed on a bad file
    must still exit, not hang, even when its traceback keeps the loader's iterator alive."""
    split = image_split(tmp_path, ["rgb420"] * 3)
    damage(Path(split.files[1]), "truncated")
    code = f"""
import sys
import numpy as np
from workflow_scripts import data, splits
split = splits.Split("train", "imagefolder", ["a", "b"], np.arange(3) % 2, files={split.files!r})
batches = data.train_loader(split, data.TrainAugment(32, True, 0.05, True, 127.5, 127.5),
                            iter([(np.arange(3), np.arange(3))]), "cpu", 2)
try:
    next(batches)
except data.PipelineError as e:
    kept = e  # the traceback holds the generator, which holds the workers' iterator
    print("error:", e, flush=True)
sys.exit(3)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and f"error: {split.files[1]}: cannot be decoded" in proc.stdout, proc.stderr


@pytest.mark.parametrize("decode_on_device", [False, True])
def test_undecodable_file_stops_evaluation_from_workers(tmp_path, decode_on_device):
    split = image_split(tmp_path, ["rgb420"] * 3)
    damage(Path(split.files[1]), "truncated")
    transform = data.EvalTransform(RESMALL_CROP, 32, MEAN, STD)
    loader = data._FolderEvalLoader(split, transform, 2, "cpu", 2, decode_on_device)
    expected = rf"^{re.escape(split.files[1])}: cannot be decoded as an image \(.*[Tt]runcated"
    with pytest.raises(PipelineError, match=expected):
        list(loader)


# ---------------------------------------------------------------------------------------------
# Worker count and the loader-bottleneck timer
def test_num_workers_auto_follows_the_jobs_cpus():
    assert [data.resolve_num_workers("auto", cpus) for cpus in (1, 2, 8)] == [0, 1, 7]
    assert data.resolve_num_workers(3, 8) == 3 and data.resolve_num_workers("4", 1) == 4
    for bad in (-1, "many", True, 2.5):
        with pytest.raises(PipelineError, match="protocol.num_workers must be 'auto' or an integer"):
            data.resolve_num_workers(bad, 8)
    schema = yaml.safe_load((REPO / "rules" / "schemas" / "config.schema.yaml").read_text())
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    validator = jsonschema.Draft202012Validator(schema)

    def problems(**protocol):
        return list(validator.iter_errors(dict(config, protocol=dict(config["protocol"], **protocol))))

    for ok in ({"num_workers": "auto"}, {"num_workers": 0}, {"decode_device": "cuda"}, {"decode_device": "cpu"}):
        assert not problems(**ok), ok
    for bad in ({"num_workers": "many"}, {"num_workers": -1}, {"decode_device": "gpu"}):
        assert problems(**bad), bad


def slow_batches(count: int, seconds: float):
    for i in range(count):
        time.sleep(seconds)
        yield i


def test_timed_batches_tell_a_slow_loader_from_a_slow_step():
    # Generous margins: the machine may be loaded (a sleep can overrun, never underrun).
    loader_bound = data.TimedBatches(slow_batches(6, 0.06))
    for _ in loader_bound:
        time.sleep(0.001)
    stats = loader_bound.take()
    assert stats["data_wait_fraction"] > data.LOADER_BOUND_WAIT_FRACTION and stats["data_wait_s"] >= 0.3
    assert loader_bound.startup_s >= 0.06  # the first batch's wait is kept apart
    assert "the data loader is the bottleneck" in data.loader_bottleneck_note(stats)

    model_bound = data.TimedBatches(slow_batches(6, 0.0))
    for _ in model_bound:
        time.sleep(0.03)
    stats = model_bound.take()
    assert stats["data_wait_fraction"] < 0.05 and stats["step_s"] > 0.15
    assert data.loader_bottleneck_note(stats) is None
    assert model_bound.take()["step_s"] < 0.01  # take() restarts the counters


def test_image_path_bench_prints_rates_against_the_decoder(tmp_path):
    from workflow_scripts import bench

    files = bench.write_imagenet_like_jpegs(tmp_path, 4)
    for path, (height, width) in zip(files, bench.IMAGENET_LIKE_SIZES):
        with Image.open(path) as im:
            assert im.size == (width, height) and im.format == "JPEG"
        assert 80 < Path(path).stat().st_size / 1024 < 120  # ImageNet's ~100 KiB
    result = bench.image_path_bench("eval", rounds=1, count=4)
    assert result["protocol"] == "resmall_crop" and "official" in result and result["bar"] == 0.85
    assert 0.3 < result["ratio"] < 1.2 and 0.1 < result["previous_ratio"] < 1.2
    assert 0.3 < result["ratio_to_opencv_decode"] < 1.2 and result["decode_opencv_img_s_per_core"] > 0
    needed = 0.4 * bench.PEAK_BF16_TFLOPS["NVIDIA H100 80GB HBM3"] * 1e12 / bench.forward_flops(bench.MIXER_B16)
    assert result["h100_img_s_needed"] == round(needed)
    assert result["h100_cores_needed"] == round(needed / result["img_s_per_core"], 1)
    assert result["h100_cores_needed_decode_only"] == round(needed / result["decode_only_img_s_per_core"], 1)
    if not torch.cuda.is_available():
        assert bench.gpu_decode_bench(rounds=1) == {"skipped": "no CUDA device"}


def test_image_path_bench_core_counts_agree_with_the_printed_rates(monkeypatch):
    """A measured rate on a rounding edge (500.951 img/s: 31.4 cores unrounded, 31.3 from the printed 501.0): the
    printed core count is the printed rates' quotient, by construction."""
    from workflow_scripts import bench

    edge = 500.951
    # the headline protocol (the first transform) and decode-only on the edge; the other loops at 600 img/s
    monkeypatch.setattr(bench, "image_path_rates", lambda files, transforms, rounds: {
        name: [edge if name in (next(iter(transforms)), "decode") else 600.0]
        for name in (*transforms, "decode", "decode_opencv", "previous")})
    result = bench.image_path_bench("eval", rounds=1, count=1)
    needed = bench.h100_img_s_needed(bench.forward_flops(bench.MIXER_B16))
    assert result["img_s_per_core"] == result["decode_only_img_s_per_core"] == 501.0
    assert result["h100_cores_needed"] == result["h100_cores_needed_decode_only"] == round(needed / 501.0, 1)
    assert round(needed / edge, 1) != round(needed / 501.0, 1)  # the edge: the unrounded rate gives another figure
