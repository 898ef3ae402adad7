"""Official .npz -> timm conversion: parity with the NumPy Flax reference, strictness, round trip, CLI."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from workflow_scripts import common, convert, flax_reference, model_io
from workflow_scripts.common import PipelineError, sha256_file

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]

SMALL = {"patch_size": 4, "hidden_dim": 32, "num_blocks": 2, "tokens_mlp_dim": 16, "channels_mlp_dim": 64,
         "num_classes": 10, "image_size": 16}
# google-research/vision_transformer vit_jax/configs/models.py.
B16_21K = {"patch_size": 16, "hidden_dim": 768, "num_blocks": 12, "tokens_mlp_dim": 384, "channels_mlp_dim": 3072,
           "num_classes": 21843, "image_size": 224}
NAMED = {
    "S/32": {"patch_size": 32, "hidden_dim": 512, "num_blocks": 8, "tokens_mlp_dim": 256, "channels_mlp_dim": 2048,
             "num_classes": 1000, "image_size": 224},
    "S/16": {"patch_size": 16, "hidden_dim": 512, "num_blocks": 8, "tokens_mlp_dim": 256, "channels_mlp_dim": 2048,
             "num_classes": 1000, "image_size": 224},
    "B/32": dict(B16_21K, patch_size=32),
    "B/16": B16_21K,
    "L/16": {"patch_size": 16, "hidden_dim": 1024, "num_blocks": 24, "tokens_mlp_dim": 512,
             "channels_mlp_dim": 4096, "num_classes": 21843, "image_size": 224},
    "H/14": {"patch_size": 14, "hidden_dim": 1280, "num_blocks": 32, "tokens_mlp_dim": 640,
             "channels_mlp_dim": 5120, "num_classes": 1000, "image_size": 224},
}


def torch_logits(model: nn.Module, images_nhwc: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)).numpy()


def module_for(params: dict[str, np.ndarray]) -> nn.Module:
    state, arch = convert.npz_to_state_dict(params)
    model = model_io.build_model(arch)
    model.load_state_dict(state, strict=True)
    return model.eval()


def write_npz(path: Path, params: dict[str, np.ndarray]) -> Path:
    with open(path, "wb") as f:
        np.savez(f, **params)
    return path


def assert_no_outputs(tmp_path: Path, *names: str) -> None:
    left = sorted(p.name for p in tmp_path.iterdir() if p.name in names or p.name.endswith(".tmp"))
    assert left == [], f"left behind: {left}"


# ---------------------------------------------------------------------------------------------
# Faithfulness


def test_parity_at_b16_shapes_with_21k_head():
    params = convert.random_official_params(B16_21K, seed=1)
    images = convert.parity_input(B16_21K)
    reference = flax_reference.forward(params, images)
    logits = torch_logits(module_for(params), images)
    assert reference.shape == logits.shape == (1, 21843)
    assert np.abs(reference).max() > 0.5  # a non-trivial function of the input, not a zero head
    assert np.abs(logits - reference).max() <= 1e-4


def wrong_layer_norm_eps(model):
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = 1e-5  # PyTorch's default instead of Flax's 1e-6


def exact_gelu(model):
    for m in model.modules():
        if isinstance(m, nn.GELU):
            m.approximate = "none"  # PyTorch's default instead of flax.linen.gelu's tanh form


def layer_norm_twice(model):
    for block in model.blocks:  # the earlier study's bug
        block.norm1 = nn.Sequential(block.norm1, block.norm1)
        block.norm2 = nn.Sequential(block.norm2, block.norm2)


@pytest.mark.parametrize("defect", [wrong_layer_norm_eps, exact_gelu, layer_norm_twice])
def test_parity_check_catches_a_port_that_departs_from_flax(defect):
    params = convert.random_official_params(SMALL, seed=2)
    # Small stem outputs make the LayerNorm epsilon matter, as it does for low-variance activations.
    params["stem/kernel"] *= 1e-3
    params["stem/bias"] *= 1e-3
    images = convert.parity_input(SMALL, num_images=2)
    reference = flax_reference.forward(params, images)
    model = module_for(params)
    assert np.abs(torch_logits(model, images) - reference).max() <= 1e-5
    defect(model)
    tolerance = convert.PARITY_RTOL * max(1.0, np.abs(reference).max())  # what convert() allows
    assert np.abs(torch_logits(model, images) - reference).max() > tolerance


def test_layer_norm_runs_once_per_sub_block():
    model = model_io.build_model(SMALL).eval()
    calls = []
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm):
            m.register_forward_hook(lambda mod, inp, out, name=name: calls.append(name))
    model(torch.zeros(1, 3, SMALL["image_size"], SMALL["image_size"]))
    expected = [f"blocks.{i}.norm{j}" for i in range(SMALL["num_blocks"]) for j in (1, 2)] + ["norm"]
    assert calls == expected


def test_build_model_uses_flax_defaults_and_exact_dims():
    model = model_io.build_model(SMALL)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    gelus = [m for m in model.modules() if isinstance(m, nn.GELU)]
    assert len(norms) == 2 * SMALL["num_blocks"] + 1 and {m.eps for m in norms} == {1e-6}
    assert len(gelus) == 2 * SMALL["num_blocks"] and {m.approximate for m in gelus} == {"tanh"}
    # Widths where int(ratio * dim) truncates when the ratio is tokens / dim: build must still be exact.
    for hidden, tokens, channels in [(100, 29, 7), (49, 57, 343), (1000, 3, 3001), (768, 384, 3072)]:
        arch = dict(SMALL, hidden_dim=hidden, tokens_mlp_dim=tokens, channels_mlp_dim=channels)
        with torch.device("meta"):
            block = model_io.build_model(arch).blocks[0]
        assert (block.mlp_tokens.fc1.out_features, block.mlp_channels.fc1.out_features) == (tokens, channels)


# ---------------------------------------------------------------------------------------------
# Architecture inference


def shaped(arch: dict) -> dict[str, np.ndarray]:
    """Arrays with the official shapes that take no memory (for shape-only checks of big models)."""
    return {k: np.broadcast_to(np.float32(0), shape) for k, (_, shape) in convert.official_layout(arch).items()}


@pytest.mark.parametrize("name", sorted(NAMED))
def test_infers_named_architectures_and_timm_shapes_match(name):
    arch = NAMED[name]
    assert convert.infer_architecture(shaped(arch)) == arch
    assert model_io.architecture_name(arch).startswith(f"Mixer-{name} ")
    with torch.device("meta"):
        timm_shapes = {k: tuple(v.shape) for k, v in model_io.build_model(arch).state_dict().items()}
    layout = convert.official_layout(arch)
    assert sorted(timm_shapes) == sorted(t for t, _ in layout.values())
    for key, (timm_key, shape) in layout.items():
        if len(shape) == 4:
            shape = (shape[3], shape[2], shape[0], shape[1])  # HWIO -> OIHW
        elif len(shape) == 2:
            shape = shape[::-1]
        assert timm_shapes[timm_key] == shape, key


@pytest.mark.parametrize("patch_size, image_size", [(7, 28), (5, 35), (3, 9), (16, 32)])
def test_odd_patch_sizes_convert_faithfully(patch_size, image_size):
    arch = dict(SMALL, patch_size=patch_size, image_size=image_size, num_classes=7)
    params = convert.random_official_params(arch, seed=patch_size)
    state, inferred = convert.npz_to_state_dict(params)
    assert inferred == arch
    images = convert.parity_input(arch, num_images=2)
    reference = flax_reference.forward(params, images)
    assert np.abs(torch_logits(module_for(params), images) - reference).max() <= 1e-5


# ---------------------------------------------------------------------------------------------
# Strictness: one clear error, no output left behind


def renamed(params):
    params["MixerBlock_1/LayerNorm_1/gamma"] = params.pop("MixerBlock_1/LayerNorm_1/scale")
    return "MixerBlock_1/LayerNorm_1/scale"


def missing(params):
    del params["MixerBlock_1/channel_mixing/Dense_1/bias"]
    return "MixerBlock_1/channel_mixing/Dense_1/bias"


def extra(params):
    params["MixerBlock_0/LayerNorm_2/scale"] = np.ones(SMALL["hidden_dim"], np.float32)
    return "MixerBlock_0/LayerNorm_2/scale"


def wrong_shape(params):
    params["MixerBlock_0/token_mixing/Dense_1/kernel"] = np.ones((16, 15), np.float32)
    return "MixerBlock_0/token_mixing/Dense_1/kernel"


def nan_weight(params):
    params["MixerBlock_1/token_mixing/Dense_0/bias"][3] = np.nan
    return "MixerBlock_1/token_mixing/Dense_0/bias"


def missing_block(params):
    for key in [k for k in params if k.startswith("MixerBlock_0/")]:
        del params[key]
    return "MixerBlock_0/"


def pickled_object(params):
    params["head/bias"] = np.array([{"a": 1}], dtype=object)
    return "allow_pickle"


@pytest.mark.parametrize("corrupt", [renamed, missing, extra, wrong_shape, nan_weight, missing_block,
                                     pickled_object])
def test_bad_checkpoint_is_one_clear_error_and_writes_nothing(tmp_path, corrupt):
    params = convert.random_official_params(SMALL, seed=3)
    key = corrupt(params)
    npz = write_npz(tmp_path / "in.npz", params)
    with pytest.raises(PipelineError) as err:
        convert.convert(npz, tmp_path / "out.safetensors", SMALL, parity_path=tmp_path / "parity.json")
    assert str(npz) in str(err.value) and key in str(err.value)
    assert_no_outputs(tmp_path, "out.safetensors", "parity.json")


@pytest.mark.parametrize("how", ["truncated", "text"])
def test_truncated_or_foreign_file_is_a_clear_error(tmp_path, how):
    npz = write_npz(tmp_path / "in.npz", convert.random_official_params(SMALL, seed=4))
    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) * 2 // 3] if how == "truncated" else b"<html>404 Not Found</html>")
    with pytest.raises(PipelineError, match="not an .npz .zip. archive.*download it again") as err:
        convert.convert(npz, tmp_path / "out.safetensors", parity_path=tmp_path / "parity.json")
    assert str(npz) in str(err.value)
    assert_no_outputs(tmp_path, "out.safetensors", "parity.json")


def test_corrupt_member_is_a_clear_error(tmp_path):
    npz = write_npz(tmp_path / "in.npz", convert.random_official_params(SMALL, seed=4))
    with zipfile.ZipFile(npz) as z:
        info = z.getinfo("head/kernel.npy")
    data = bytearray(npz.read_bytes())
    data[info.header_offset + 200] ^= 0xFF  # inside the member's data: CRC mismatch
    npz.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match="cannot read the arrays"):
        convert.convert(npz, tmp_path / "out.safetensors")
    assert_no_outputs(tmp_path, "out.safetensors")


def test_wrong_expected_architecture_names_both(tmp_path):
    npz = write_npz(tmp_path / "in.npz", convert.random_official_params(SMALL, seed=5))
    expected = dict(SMALL, hidden_dim=48, num_blocks=3)
    with pytest.raises(PipelineError, match="hidden_dim 32 vs 48, num_blocks 2 vs 3"):
        convert.convert(npz, tmp_path / "out.safetensors", expected, parity_path=tmp_path / "parity.json")
    assert_no_outputs(tmp_path, "out.safetensors", "parity.json")
    with pytest.raises(PipelineError) as err:
        convert.check_expected(NAMED["L/16"], B16_21K, "Mixer-L_16.npz")
    assert "holds Mixer-L/16" in str(err.value) and "expects Mixer-B/16" in str(err.value)


def test_failed_parity_writes_nothing(tmp_path, monkeypatch):
    npz = write_npz(tmp_path / "in.npz", convert.random_official_params(SMALL, seed=6))
    real_forward = flax_reference.forward
    monkeypatch.setattr(flax_reference, "forward", lambda p, x: real_forward(p, x) + 1e-2)
    with pytest.raises(PipelineError, match="differs from the Flax reference"):
        convert.convert(npz, tmp_path / "out.safetensors", parity_path=tmp_path / "parity.json")
    assert_no_outputs(tmp_path, "out.safetensors", "parity.json")


# ---------------------------------------------------------------------------------------------
# Round trip, loading, CLI


def test_round_trip_npz_safetensors_npz_is_identical(tmp_path):
    params = convert.random_official_params(SMALL, seed=7)
    npz = write_npz(tmp_path / "in.npz", params)
    convert.convert(npz, tmp_path / "model.safetensors")
    model = model_io.load_model(tmp_path / "model.safetensors")
    convert.export_npz(model.state_dict(), tmp_path / "back.npz")
    with np.load(tmp_path / "back.npz", allow_pickle=False) as back:
        assert sorted(back.files) == sorted(params)
        for key in params:
            assert back[key].dtype == np.float32 and back[key].shape == params[key].shape, key
            assert back[key].tobytes() == params[key].tobytes(), key


def test_load_model_and_read_architecture(tmp_path):
    model = model_io.build_model(SMALL)
    path = tmp_path / "m.safetensors"
    model_io.save_model(model, SMALL, path)
    assert model_io.read_architecture(path) == SMALL
    loaded = model_io.load_model(path, num_classes=10)
    assert not loaded.training
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(x), model.eval()(x))
    with pytest.raises(PipelineError, match="head has 10 classes, 1000 were expected"):
        model_io.load_model(path, num_classes=1000)
    with pytest.raises(PipelineError, match="cannot load|needs"):
        model_io.save_model(model, dict(SMALL, num_classes=11), tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_files_that_are_not_converted_checkpoints_are_named(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 5)
    for path, message in [(plain, "not a Mixer checkpoint of this pipeline"), (garbage, "not a readable safetensors"),
                          (tmp_path / "absent.safetensors", "file not found")]:
        with pytest.raises(PipelineError, match=message) as err:
            model_io.load_model(path)
        assert str(path) in str(err.value)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workflow_scripts.convert", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_model_and_parity_record(tmp_path):
    params = convert.random_official_params(SMALL, seed=8)
    npz = write_npz(tmp_path / "demo.npz", params)
    out, parity = tmp_path / "converted" / "demo.safetensors", tmp_path / "converted" / "demo.parity.json"
    proc = run_cli(npz, out, "--checkpoint", "demo", "--expect-architecture", json.dumps(SMALL), "--parity", parity)
    assert proc.returncode == 0, proc.stderr
    assert "parity: max |logit diff|" in proc.stdout and "peak RSS" in proc.stdout
    record = json.loads(parity.read_text())
    for field in ["checkpoint", "npz_sha256", "safetensors_sha256", "num_params", "architecture",
                  "max_abs_logit_diff", "reference", "input", "convert_seconds", "peak_rss_mib", "npz_mib"]:
        assert field in record, field
    assert record["checkpoint"] == "demo" and record["architecture"] == SMALL
    assert record["num_params"] == sum(a.size for a in params.values())
    assert 0 <= record["max_abs_logit_diff"] <= record["tolerance"]
    assert record["npz_sha256"] == sha256_file(npz) and record["safetensors_sha256"] == sha256_file(out)
    assert record["input"]["shape"] == list(convert.parity_input(SMALL).shape)
    images = convert.parity_input(SMALL, num_images=2)
    model = model_io.load_model(out)
    assert np.abs(torch_logits(model, images) - flax_reference.forward(params, images)).max() <= 1e-5


def test_cli_error_is_one_line_and_exit_2(tmp_path):
    npz = write_npz(tmp_path / "demo.npz", convert.random_official_params(SMALL, seed=9))
    proc = run_cli(npz, tmp_path / "o.safetensors", "--expect-architecture", json.dumps(dict(SMALL, patch_size=8)),
                   "--parity", tmp_path / "p.json")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "patch_size 4 vs 8" in proc.stderr
    assert_no_outputs(tmp_path, "o.safetensors", "p.json")


def test_synthesized_upstream_is_deterministic_and_converts(tmp_path):
    from workflow_scripts.synthesize_upstream import synthesize

    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        synthesize(SMALL, seed, tmp_path / f"{name}.npz")
    def read(name):
        return (tmp_path / f"{name}.npz").read_bytes()

    assert read("a") == read("b") != read("c")
    record = convert.convert(tmp_path / "a.npz", tmp_path / "a.safetensors", SMALL)
    assert record["max_abs_logit"] > 0.1  # random head: the demo's parity check compares real logits
    with pytest.raises(PipelineError, match="config checkpoints.<name>.architecture"):
        synthesize({"patch_size": 4}, 1, tmp_path / "bad.npz")
    assert not (tmp_path / "bad.npz").exists()


def test_same_weights_give_the_same_bytes_in_every_process(tmp_path):
    # safetensors keeps metadata in a hash map whose order varies between processes; model_io stores
    # one metadata entry so that a file's sha256 can serve as provenance.
    code = ("import sys, torch; from workflow_scripts import model_io; torch.manual_seed(0); "
            f"a = {SMALL!r}; model_io.save_model(model_io.build_model(a), a, sys.argv[1])")
    digests = set()
    for i in range(6):
        out = tmp_path / f"m{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO, check=True, timeout=120)
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1
    with safe_open(str(out), framework="np") as f:
        assert list(f.metadata()) == [model_io.METADATA_KEY]


# ---------------------------------------------------------------------------------------------
# Higher resolution (paper Appendix C)


def base_state(arch: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random, non-symmetric weights: a token order that is wrong anywhere changes the logits."""
    state, _ = convert.npz_to_state_dict(convert.random_official_params(arch, seed=seed))
    return {k: v.contiguous() for k, v in state.items()}


def tiled(tiles: torch.Tensor, k: int) -> torch.Tensor:
    """(B, K*K, C, s, s) -> (B, C, K s, K s): tile p placed at row p // K, column p % K."""
    b, _, c, s, _ = tiles.shape
    image = torch.empty(b, c, k * s, k * s)
    for p in range(k * k):
        r, col = divmod(p, k)
        image[:, :, r * s:(r + 1) * s, col * s:(col + 1) * s] = tiles[:, p]
    return image


def tiling_gap(base: dict, upscaled: dict, arch: dict, k: int) -> tuple[float, float]:
    """max |K-times logits on tiled images - mean of the base logits on the tiles|, and max |mean logit|."""
    s = arch["image_size"]
    tiles = torch.from_numpy(np.random.default_rng(k).uniform(-1, 1, (2, k * k, 3, s, s)).astype(np.float32))
    base_model = model_io.module_from_state(arch, base, "base")
    model = model_io.module_from_state(convert.upscaled_architecture(arch, k * s), upscaled, "upscaled")
    with torch.inference_mode():
        expected = base_model(tiles.flatten(0, 1)).reshape(2, k * k, -1).mean(1)
        logits = model(tiled(tiles, k))
    return float((logits - expected).abs().max()), float(expected.abs().max())


@pytest.mark.parametrize("k", [2, 3])
def test_upscaled_logits_on_tiles_are_the_mean_of_the_base_logits(k):
    state = base_state(SMALL, seed=20 + k)
    upscaled, arch = convert.upscale_state_dict(state, SMALL, k * SMALL["image_size"])
    assert arch == dict(SMALL, image_size=k * 16, tokens_mlp_dim=k * k * 16)
    gap, scale = tiling_gap(state, upscaled, SMALL, k)
    assert scale > 0.1 and gap <= 1e-5 * scale


def wrong_orders(k: int) -> dict[str, torch.Tensor]:
    side = k * SMALL["image_size"] // SMALL["patch_size"]
    right = convert.part_major_index(SMALL["image_size"] // SMALL["patch_size"], k)
    return {"concatenated row-major (no permutation)": torch.arange(side * side),
            "each part column-major": right.reshape(side, side).T.flatten()}


@pytest.mark.parametrize("wrong", ["concatenated row-major (no permutation)", "each part column-major"])
def test_tiling_property_fails_with_a_wrong_token_order(wrong, monkeypatch):
    k = 2
    state = base_state(SMALL, seed=30)
    order = wrong_orders(k)[wrong]
    monkeypatch.setattr(convert, "part_major_index", lambda g, factor: order)
    upscaled, _ = convert.upscale_state_dict(state, SMALL, k * SMALL["image_size"])
    gap, scale = tiling_gap(state, upscaled, SMALL, k)
    assert gap > 1e-2 * scale


def test_upscaled_token_mlp_is_block_diagonal_in_each_parts_row_major_order():
    k, g, d_s = 2, SMALL["image_size"] // SMALL["patch_size"], SMALL["tokens_mlp_dim"]
    state = base_state(SMALL, seed=40)
    upscaled, _ = convert.upscale_state_dict(state, SMALL, k * SMALL["image_size"])
    for i in range(SMALL["num_blocks"]):
        key = f"blocks.{i}.mlp_tokens"
        w1, b1, w2, b2 = (state[f"{key}.{n}"] for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))
        big_w1, big_w2 = upscaled[f"{key}.fc1.weight"], upscaled[f"{key}.fc2.weight"]
        assert big_w1.shape == (k * k * d_s, k * k * g * g) and big_w2.shape == (k * k * g * g, k * k * d_s)
        assert torch.equal(upscaled[f"{key}.fc1.bias"], b1.repeat(k * k))
        for r in range(k * g):
            for c in range(k * g):
                token, part, local = r * k * g + c, (r // g) * k + c // g, (r % g) * g + c % g
                rows = slice(part * d_s, (part + 1) * d_s)
                column = torch.zeros(k * k * d_s)
                column[rows] = w1[:, local]
                assert torch.equal(big_w1[:, token], column), (r, c)
                assert torch.equal(big_w2[token, rows], w2[local]) and big_w2[token].count_nonzero() == \
                    w2[local].count_nonzero()
                assert upscaled[f"{key}.fc2.bias"][token] == b2[local]
    for key, tensor in state.items():
        if ".mlp_tokens." not in key:
            assert torch.equal(upscaled[key], tensor), key


@pytest.mark.parametrize("image_size", [8, 24, 0, -16, 17])
def test_image_size_that_is_not_a_multiple_is_refused_naming_both_sizes(image_size):
    with pytest.raises(PipelineError) as err:
        convert.upscaled_architecture(SMALL, image_size)
    assert f"image size {image_size} " in str(err.value) and "checkpoint's image size 16" in str(err.value)


def run_main(*args) -> int:
    """The CLI in this process (argument parsing, error line, exit code) without a new interpreter's imports."""
    with pytest.raises(SystemExit) as exit_:
        common.run_cli(convert.main, [str(a) for a in args])
    return exit_.value.code


def test_cli_writes_the_upscaled_model_that_model_io_loads(tmp_path):
    params = convert.random_official_params(SMALL, seed=50)
    npz = write_npz(tmp_path / "base.npz", params)
    out, parity = tmp_path / "up.safetensors", tmp_path / "up.parity.json"
    expected = dict(SMALL, image_size=32, tokens_mlp_dim=64)
    assert run_main(npz, out, "--image-size", 32, "--expect-architecture", json.dumps(expected), "--parity",
                    parity) == 0
    assert model_io.read_architecture(out) == expected
    model = model_io.load_model(out)
    block = model.blocks[0].mlp_tokens
    assert (block.fc1.in_features, block.fc1.out_features) == (64, 64)
    record = json.loads(parity.read_text())
    assert record["architecture"] == expected and record["upscale"]["factor"] == 2
    assert record["upscale"]["base_architecture"] == SMALL and record["input"]["shape"] == [1, 16, 16, 3]
    assert record["upscale"]["tiling_max_abs_logit_diff"] <= record["upscale"]["tiling_tolerance"]
    assert record["num_params"] == sum(t.numel() for t in model.state_dict().values())
    base, _ = convert.npz_to_state_dict(params)
    gap, scale = tiling_gap({k: v.contiguous() for k, v in base.items()}, model.state_dict(), SMALL, 2)
    assert gap <= 1e-5 * scale


def test_cli_refuses_an_image_size_that_is_not_a_multiple(tmp_path, capsys):
    npz = write_npz(tmp_path / "base.npz", convert.random_official_params(SMALL, seed=51))
    assert run_main(npz, tmp_path / "o.safetensors", "--image-size", 40, "--parity", tmp_path / "p.json") == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and stderr.count("\n") == 1
    assert "image size 40 " in stderr and "checkpoint's image size 16" in stderr
    assert_no_outputs(tmp_path, "o.safetensors", "p.json")


def test_expected_higher_resolution_without_image_size_points_at_the_flag(tmp_path):
    npz = write_npz(tmp_path / "base.npz", convert.random_official_params(SMALL, seed=52))
    with pytest.raises(PipelineError, match="image_size 16 vs 32.*or its --image-size"):
        convert.convert(npz, tmp_path / "o.safetensors", dict(SMALL, image_size=32, tokens_mlp_dim=64))
    assert_no_outputs(tmp_path, "o.safetensors")


def test_image_size_of_the_checkpoint_itself_writes_the_same_bytes(tmp_path):
    npz = write_npz(tmp_path / "base.npz", convert.random_official_params(SMALL, seed=53))
    plain = convert.convert(npz, tmp_path / "plain.safetensors")
    same = convert.convert(npz, tmp_path / "same.safetensors", SMALL, image_size=16)  # K = 1: nothing to upscale
    assert same["safetensors_sha256"] == plain["safetensors_sha256"] and same["upscale"] is None
