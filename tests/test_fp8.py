"""Block-FP8 checkpoints (DeepSeek-V3, Kimi-K2): ``Checkpoint.get`` dequantises an
F8_E4M3 ``weight`` with its float32 ``weight_scale_inv`` of shape
[ceil(out/b0), ceil(in/b1)] (W = W_fp8 * scale over each b0 x b1 block).

The files are written by hand from a known float32 matrix whose shape is not a
multiple of the block, and the result is checked against an independent per-block
loop (exactly) and against the float32 original (within FP8 E4M3 rounding)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from tuckerctl.errors import InputError
from tuckerctl.loader import open_checkpoint

FP8_MAX = 448.0  # largest finite float8_e4m3fn
NAME = "model.layers.0.self_attn.q_a_proj.weight"


def quantise(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax quantisation: (fp8 weight, float32 scale_inv [ceil(r/b0), ceil(c/b1)])."""
    b0, b1 = block
    rows, cols = w.shape
    scale = torch.empty(math.ceil(rows / b0), math.ceil(cols / b1))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = w[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1]
            scale[i, j] = blk.abs().max() / FP8_MAX
            q[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] = (blk / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def by_blocks(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Reference dequantisation, one block at a time (float32 product, as the reader does)."""
    b0, b1 = block
    out = torch.empty(q.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            sl = (slice(i * b0, (i + 1) * b0), slice(j * b1, (j + 1) * b1))
            out[sl] = q[sl].to(torch.float32) * scale[i, j]
    return out


def write(tmp_path, tensors: dict, config: dict | None | bool):
    """Save ``tensors`` as model.safetensors (+ config.json unless ``config`` is False)."""
    tmp_path.mkdir(exist_ok=True)
    save_file(tensors, tmp_path / "model.safetensors")
    if config is not False:
        (tmp_path / "config.json").write_text(json.dumps(config))
    return open_checkpoint(tmp_path)


def fp8_case(shape=(200, 300), block=(128, 128), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w[:64, :64] *= 1e-3  # a block of small values: subnormal range relative to its neighbours
    q, scale = quantise(w, block)
    return w, q, scale


@pytest.mark.parametrize("block", [(128, 128), (64, 128)])
def test_dequantise_block_fp8(block, tmp_path):
    w, q, scale = fp8_case(block=block)
    assert scale.shape == (math.ceil(200 / block[0]), math.ceil(300 / block[1]))
    other = torch.randn(7, 5, dtype=torch.bfloat16)
    ckpt = write(tmp_path, {NAME: q, NAME + "_scale_inv": scale, "model.norm.weight": other},
                 {"model_type": "deepseek_v3", "quantization_config": {
                     "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)}})
    assert ckpt.dtype(NAME) == "F8_E4M3"
    got = ckpt.get(NAME)
    assert got.dtype == torch.float32 and got.shape == (200, 300)
    assert torch.equal(got, by_blocks(q, scale, block))
    # E4M3 keeps 3 mantissa bits: relative rounding <= 2^-4, plus half the smallest
    # subnormal step (2^-10) times the block scale near zero.
    full = scale.repeat_interleave(block[0], 0)[:200].repeat_interleave(block[1], 1)[:, :300]
    assert bool(((got - w).abs() <= 2 ** -4 * w.abs() + 2 ** -10 * full).all())
    assert float((got - w).norm() / w.norm()) < 0.05
    assert torch.equal(ckpt.get("model.norm.weight"), other.float())  # non-FP8 untouched


def test_dequantise_whole_tiles_equals_per_block(tmp_path):
    """Weights that are whole tiles (the reader broadcasts the scales instead of expanding them)."""
    w, q, scale = fp8_case(shape=(256, 384), block=(128, 64))
    ckpt = write(tmp_path, {NAME: q, NAME + "_scale_inv": scale},
                 {"quantization_config": {"weight_block_size": [128, 64]}})
    assert scale.shape == (2, 6)
    assert torch.equal(ckpt.get(NAME), by_blocks(q, scale, (128, 64)))


def test_wrong_block_size_in_config_is_not_applied(tmp_path):
    """A scale that does not tile the weight in the configured blocks is refused."""
    _, q, scale = fp8_case(block=(128, 128))  # scale [2, 3]
    ckpt = write(tmp_path, {NAME: q, NAME + "_scale_inv": scale},
                 {"quantization_config": {"weight_block_size": [64, 128]}})  # implies [4, 3]
    with pytest.raises(InputError, match="_scale_inv"):
        ckpt.get(NAME)


@pytest.mark.parametrize("config", [False, {"model_type": "deepseek_v3"}, {"quantization_config": None}])
def test_block_size_defaults_to_128(config, tmp_path):
    """Without weight_block_size the DeepSeek default 128x128 is used. Guessing the
    block from the scale's shape would be ambiguous: here 200 rows over 2 scale rows
    would read as 100-row blocks."""
    w, q, scale = fp8_case(block=(128, 128))
    ckpt = write(tmp_path, {NAME: q, NAME + "_scale_inv": scale}, config)
    assert torch.equal(ckpt.get(NAME), by_blocks(q, scale, (128, 128)))


def test_missing_scale_inv_is_input_error(tmp_path):
    _, q, _ = fp8_case()
    ckpt = write(tmp_path, {NAME: q}, {"quantization_config": {"weight_block_size": [128, 128]}})
    with pytest.raises(InputError) as e:
        ckpt.get(NAME)
    msg = str(e.value)
    assert NAME + "_scale_inv" in msg and "\n" not in msg
