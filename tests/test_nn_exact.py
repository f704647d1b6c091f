"""QKInputAttention (the qk_input structure in tuckerctl.nn) against transformers' own
attention modules at real positions: RoPE, partial rotary, qk-norm (per head and over
all heads), biases, GQA; and decoding with the latent cache equals the full pass."""

import pytest
import torch
from oracle import capture
from test_patch import CEILING, source

from tuckerctl.compress import compress
from tuckerctl.nn import QKInputAttention, TuckerAttention

ATTENTION = {"phi3": "model.layers.1.self_attn", "gpt_neox": "gpt_neox.layers.1.attention"}


@pytest.mark.parametrize("name", ["llama_gqa_bias", "qwen2", "qwen3", "olmo2", "starcoder2", "phi3", "gpt_neox"])
def test_exact_rope_layer_matches_transformers_at_real_positions(name, tmp_path_factory, tmp_path):
    model, path = source(name, tmp_path_factory)
    compress(path, tmp_path / "out", ranks=CEILING, hooi_iters=0, device="cpu", dtype="float32")
    attn = TuckerAttention.from_checkpoint(tmp_path / "out", layer=1)
    assert isinstance(attn, QKInputAttention)
    module = model.get_submodule(ATTENTION.get(name, "model.layers.1.self_attn"))
    ids = torch.randint(0, model.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(2))
    x, y = capture(model, module, {"input_ids": ids})  # positions 0..10: RoPE is active
    x = x.float()
    with torch.no_grad():
        got = attn(x)
        first, cache = attn(x[:6], use_cache=True)
        rest, cache = attn(x[6:], cache=cache)
    assert float((got.double() - y).abs().max() / y.abs().max()) <= 2e-6
    assert torch.allclose(torch.cat([first, rest]), got, atol=1e-6 * float(got.abs().max()))
    assert cache.width == attn.kv_cache_width == attn.U3.shape[1] + attn.post_core.shape[2]
