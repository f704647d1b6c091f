"""Fused-QKV adapters (Phi-3, GPT-2, GPT-NeoX, Falcon x 3 layouts, Bloom) against
transformers' own attention.

Each case builds a tiny random transformers model, saves it, reads it back with
``open_checkpoint`` + ``detect`` only, rebuilds one layer's attention output from the
head stacks (tests/oracle.py, float64) and compares it with what the model computed
(hooked). Position ids are all 0, so RoPE is the identity; ALiBi is added by hand from
transformers' own slope functions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
import transformers as tf
from oracle import build_case, capture, rebuild_attention, rel_err
from safetensors.torch import load_file, save_file
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
from transformers.models.falcon.modeling_falcon import build_alibi_tensor

from tuckerctl.adapters import detect
from tuckerctl.adapters.base import separate_layer
from tuckerctl.adapters.fused import split_contiguous
from tuckerctl.errors import InputError
from tuckerctl.loader import open_checkpoint

N = 7
VOCAB = 64
# Weights large enough that logits are O(1..10): a wrong head split cannot hide behind
# near-uniform attention.
INIT = 0.3
EAGER = dict(attn_implementation="eager")


def _falcon(**kw):
    return tf.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                           initializer_range=INIT, bias=True, **kw)


# name -> (model class, config, expected spec fields, path of the attention module,
#          attribute of its output projection when the module adds the residual itself)
CASES = {
    "phi3": (tf.Phi3ForCausalLM,
             tf.Phi3Config(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=48, num_hidden_layers=2, partial_rotary_factor=0.5,
                           pad_token_id=0, initializer_range=INIT, **EAGER),
             dict(family="phi3", attention="GQA", heads=4, kv_heads=2, head_dim=8, bias=False, rope=True,
                  prefix="model."),
             "model.layers.{i}.self_attn", None),
    # GPT-2 at INIT has logits ~1 (near-uniform attention): twice the init makes them O(1..10).
    "gpt2_lm": (tf.GPT2LMHeadModel,
                tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_head=4, n_layer=2, initializer_range=2 * INIT, **EAGER),
                dict(family="gpt2", attention="MHA", heads=4, kv_heads=4, head_dim=8, bias=True, rope=False,
                     prefix="transformer."),
                "transformer.h.{i}.attn", None),
    "gpt2_bare": (tf.GPT2Model,  # openai-community/gpt2 style: no "transformer." prefix
                  tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_head=4, n_layer=2, initializer_range=2 * INIT,
                                scale_attn_by_inverse_layer_idx=True, **EAGER),
                  dict(family="gpt2", attention="MHA", heads=4, kv_heads=4, head_dim=8, bias=True, prefix=""),
                  "h.{i}.attn", None),
    "gpt_neox": (tf.GPTNeoXForCausalLM,
                 tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                                  intermediate_size=48, initializer_range=INIT, **EAGER),
                 dict(family="gpt_neox", attention="MHA", heads=4, kv_heads=4, head_dim=8, bias=True, rope=True,
                      prefix="gpt_neox."),
                 "gpt_neox.layers.{i}.attention", None),
    "falcon_40b": (tf.FalconForCausalLM,  # new_decoder_architecture: G = num_kv_heads
                   _falcon(num_kv_heads=2, new_decoder_architecture=True, **EAGER),
                   dict(family="falcon", attention="GQA", heads=4, kv_heads=2, head_dim=8, bias=True, rope=True,
                        prefix="transformer."),
                   "transformer.h.{i}.self_attention", None),
    "falcon_7b": (tf.FalconForCausalLM,  # multi_query: G = 1
                  _falcon(multi_query=True, new_decoder_architecture=False, **EAGER),
                  dict(family="falcon", attention="MQA", heads=4, kv_heads=1, head_dim=8, bias=True, rope=True),
                  "transformer.h.{i}.self_attention", None),
    # Classic MHA Falcon with ALiBi. SDPA: transformers' eager ALiBi path adds the bias
    # twice (once in the mask, once in the scores), the SDPA path once, as Falcon-RW did.
    "falcon_rw_alibi": (tf.FalconForCausalLM,
                        _falcon(multi_query=False, new_decoder_architecture=False, alibi=True,
                                attn_implementation="sdpa"),
                        dict(family="falcon", attention="MHA", heads=4, kv_heads=4, head_dim=8, bias=True,
                             rope=False),
                        "transformer.h.{i}.self_attention", None),
    "bloom": (tf.BloomForCausalLM,
              tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_head=4, n_layer=2, initializer_range=INIT,
                             **EAGER),
              dict(family="bloom", attention="MHA", heads=4, kv_heads=4, head_dim=8, bias=True, rope=False,
                   prefix="transformer."),
              "transformer.h.{i}.self_attention", "dense"),  # BloomAttention adds the residual
}

def build(name, tmp_path_factory):
    """Save case ``name``'s tiny model once per session; return (model, dir)."""
    return build_case(CASES, name, tmp_path_factory)


def layer_io(name, model, i):
    """(x, y) of layer i's attention block on fixed random tokens, positions all 0."""
    module_path, out_attr = CASES[name][3], CASES[name][4]
    module = model.get_submodule(module_path.format(i=i))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, N), generator=g)
    # An explicit mask: with repeated position ids and no mask, v5 reads packed sequences.
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.zeros_like(ids))
    x, y = capture(model, module, inputs)
    if out_attr:  # the block's output includes the residual: take the projection's output
        _, y = capture(model, getattr(module, out_attr), inputs)
    return x, y


def alibi_bias(name, spec):
    """(H, N, N) ALiBi logit bias from transformers' own slope functions, or None."""
    H = spec.heads
    if name == "bloom":  # alibi + scale * q.k, slope_h * key position
        slopes = _get_alibi_slopes(H, torch.device("cpu")).double()
        return (slopes[:, None, None] * torch.arange(N, dtype=torch.float64)).expand(H, N, N)
    if spec.extras.get("alibi"):  # Falcon: (q.k + alibi) * scale
        a = build_alibi_tensor(torch.ones(1, N, dtype=torch.long), H, torch.float32).reshape(H, 1, N)
        return (a.double() / math.sqrt(spec.head_dim)).expand(H, N, N)
    return None


def read(path, **kw):
    ckpt = open_checkpoint(path)
    adapter, spec = detect(ckpt, **kw)
    return ckpt, adapter, spec


def rebuild_error(name, model, spec, layer, i):
    x, y = layer_io(name, model, i)
    s = dataclasses.replace(spec, scale=spec.layer_scale(i))
    return rel_err(rebuild_attention(layer, s, x, causal=True, alibi=alibi_bias(name, spec)), y)


# ---------------------------------------------------------------- reproduction

@pytest.mark.parametrize("name", list(CASES))
def test_rebuilds_transformers_attention(name, tmp_path_factory):
    model, path = build(name, tmp_path_factory)
    ckpt, adapter, spec = read(path)
    assert spec.layers == 2 and spec.d == 32 and spec.value_dim == spec.head_dim and not spec.qk_norm
    for field, value in CASES[name][2].items():
        assert getattr(spec, field) == value, field
    assert spec.extras["causal"] is True
    d, H, G, dh = spec.d, spec.heads, spec.kv_heads, spec.head_dim
    for i in range(spec.layers):  # layer 1 too: GPT-2's per-layer scale differs there
        layer = adapter.layer(ckpt, spec, i)
        m = d + 1 if spec.bias else d  # bias as a last homogeneous row
        assert layer.pre.left.shape == (H, m, dh) and layer.pre.right.shape == (G, m, dh)
        assert layer.post.left.shape == (H, d, dh)
        # fused qkv [(H + 2G) d_h, d] + output [d, H d_h], biases excluded
        assert layer.params == (H + 2 * G) * dh * d + d * H * dh
        assert (layer.out_bias is not None) == (name != "phi3")
        err = rebuild_error(name, model, spec, layer, i)
        assert err <= 1e-5, f"{name} layer {i}: relative error {err:.2e}"


def test_family_extras(tmp_path_factory):
    """What lies outside the bilinear forms is reported."""
    spec = read(build("phi3", tmp_path_factory)[1])[2]
    assert spec.extras["partial_rotary_factor"] == 0.5
    spec = read(build("gpt_neox", tmp_path_factory)[1])[2]
    assert spec.extras["partial_rotary_factor"] == 0.25  # rotary_pct default
    spec = read(build("gpt2_bare", tmp_path_factory)[1])[2]
    assert spec.extras["scale_attn_by_inverse_layer_idx"] is True
    assert spec.layer_scale(1) == pytest.approx(8 ** -0.5 / 2)
    assert any("(i + 1)" in n for n in spec.notes)
    spec = read(build("falcon_rw_alibi", tmp_path_factory)[1])[2]
    assert spec.extras["alibi"] is True and spec.extras["alibi_scaled"] is True
    spec = read(build("bloom", tmp_path_factory)[1])[2]
    assert spec.extras["alibi"] is True and spec.extras["alibi_scaled"] is False


def test_per_layer_scale_matters(tmp_path_factory):
    """GPT-2 with scale_attn_by_inverse_layer_idx: layer 1 with the plain scale is wrong."""
    model, path = build("gpt2_bare", tmp_path_factory)
    ckpt, adapter, spec = read(path)
    layer = adapter.layer(ckpt, spec, 1)
    x, y = layer_io("gpt2_bare", model, 1)
    assert rel_err(rebuild_attention(layer, spec, x, causal=True), y) > 1e-2


@pytest.mark.parametrize("name", ["bloom", "falcon_rw_alibi"])
def test_alibi_matters(name, tmp_path_factory):
    """Without (or with twice) its ALiBi bias the rebuild is off: the bias is active and
    enters exactly once."""
    model, path = build(name, tmp_path_factory)
    ckpt, adapter, spec = read(path)
    layer = adapter.layer(ckpt, spec, 0)
    x, y = layer_io(name, model, 0)
    a = alibi_bias(name, spec)
    assert rel_err(rebuild_attention(layer, spec, x, causal=True, alibi=a), y) <= 1e-5
    for wrong in (0 * a, 2 * a):
        assert rel_err(rebuild_attention(layer, spec, x, causal=True, alibi=wrong), y) > 1e-3


# ---------------------------------------------------------------- without a config

@pytest.mark.parametrize("name,kw", [("gpt2_lm", dict(heads=4)), ("falcon_40b", dict(heads=4))])
def test_without_config(name, kw, tmp_path_factory, tmp_path):
    """Tensor names + --heads only: GPT-2 d from c_attn; Falcon G from the fused rows."""
    model, path = build(name, tmp_path_factory)
    shutil.copy(path / "model.safetensors", tmp_path / "model.safetensors")
    ckpt, adapter, spec = read(tmp_path / "model.safetensors", **kw)
    assert type(adapter).__name__ == ("GPT2" if name == "gpt2_lm" else "Falcon")
    assert (spec.d, spec.heads, spec.kv_heads) == (32, 4, CASES[name][2]["kv_heads"])
    assert spec.notes
    err = rebuild_error(name, model, spec, adapter.layer(ckpt, spec, 0), 0)
    assert err <= 1e-5


@pytest.mark.parametrize("name,buffers", [
    ("gpt2_bare", ("attn.bias", "attn.masked_bias")),  # as in openai-community/gpt2
    ("gpt_neox", ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")),
])
def test_mask_buffers_are_not_biases(name, buffers, tmp_path_factory, tmp_path):
    """Old files carry causal-mask / frequency buffers named like biases: never read."""
    model, path = build(name, tmp_path_factory)
    shutil.copytree(path, tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    stack = "h." if name == "gpt2_bare" else "gpt_neox.layers."
    for i in range(2):
        tensors[f"{stack}{i}.{buffers[0]}"] = torch.tril(torch.ones(16, 16)).reshape(1, 1, 16, 16)
        for extra in buffers[1:]:
            tensors[f"{stack}{i}.{extra}"] = torch.tensor([-1e4] if "masked" in extra else [1.0, 0.1])
    save_file(tensors, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    ckpt, adapter, spec = read(tmp_path / "m")
    layer = adapter.layer(ckpt, spec, 0)
    assert not {f"{stack}0.{b}" for b in buffers} & set(layer.tensors)
    assert f"{stack}0.{buffers[0]}" in ckpt
    assert rebuild_error(name, model, spec, layer, 0) <= 1e-5


# ---------------------------------------------------------------- negative controls

def _contiguous_error(name, tmp_path_factory):
    """Rebuild error when the fused rows are (wrongly) split as contiguous [Q; K; V]."""
    model, path = build(name, tmp_path_factory)
    ckpt, adapter, spec = read(path)
    H, G, dh = spec.heads, spec.kv_heads, spec.head_dim
    base = f"{spec.prefix}{adapter.stack}0."
    w = ckpt.get(base + adapter.qkv + ".weight")
    b = ckpt.get(base + adapter.qkv + ".bias")
    q, k, v = split_contiguous(w, H, G, dh)
    bq, bk, bv = split_contiguous(b, H, G, dh)
    o, bo = ckpt.get(base + adapter.out + ".weight"), ckpt.get(base + adapter.out + ".bias")
    wrong = separate_layer(0, q, k, v, o, H, G, dh, bq=bq, bk=bk, bv=bv, bo=bo)
    right = adapter.layer(ckpt, spec, 0)
    return rebuild_error(name, model, spec, right, 0), rebuild_error(name, model, spec, wrong, 0)


def test_negative_neox_contiguous_split(tmp_path_factory):
    right, wrong = _contiguous_error("gpt_neox", tmp_path_factory)
    assert right <= 1e-5 and wrong > 0.3


def test_negative_falcon40b_contiguous_split(tmp_path_factory):
    right, wrong = _contiguous_error("falcon_40b", tmp_path_factory)
    assert right <= 1e-5 and wrong > 0.3


# ---------------------------------------------------------------- error paths

def _edited(name, tmp_path_factory, tmp_path, **changes):
    """A copy of case ``name``'s checkpoint with config.json fields changed."""
    _, path = build(name, tmp_path_factory)
    shutil.copytree(path, tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(changes)
    cfg_path.write_text(json.dumps(cfg))
    return tmp_path / "m"


@pytest.mark.parametrize("name,changes,needle", [
    ("gpt2_lm", dict(n_head=5), "'n_head'"),  # 32 not divisible by 5
    ("gpt_neox", dict(hidden_size=48), "query_key_value"),
    ("phi3", dict(num_key_value_heads=4), "qkv_proj"),  # rows (4 + 8) * 8 != 64
    ("falcon_40b", dict(num_kv_heads=1), "query_key_value"),
    ("falcon_rw_alibi", dict(num_kv_heads=2), "'num_kv_heads'"),
    ("bloom", dict(hidden_size=48), "query_key_value"),
    ("gpt2_lm", dict(n_layer=3), "h.2.attn.c_attn.weight"),
    ("falcon_40b", dict(bias=False), "'bias'"),
])
def test_inconsistent_config_is_input_error(name, changes, needle, tmp_path_factory, tmp_path):
    path = _edited(name, tmp_path_factory, tmp_path, **changes)
    with pytest.raises(InputError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        read(path)
