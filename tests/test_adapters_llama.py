"""The Llama-like adapter against transformers' own attention.

Each case builds a tiny random transformers model, saves it, reads it back with
``open_checkpoint`` + ``detect`` only (config.json and safetensors), rebuilds the
attention output of a layer from the extracted head stacks (tests/oracle.py, float64)
and compares it with the output the model computed (hooked). Position ids are all 0,
so RoPE is the identity and the weight-only bilinear forms are the whole story.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers as tf
from oracle import capture, one_line_error, rebuild_attention, rel_err, save_tiny
from safetensors.torch import load_file, save_file

from tuckerctl.adapters import detect
from tuckerctl.adapters.base import find_layers
from tuckerctl.loader import open_checkpoint
from tuckerctl.multilinear import HeadStack

N_TOKENS = 7
# Large enough weights that the logits are O(1..10): the softmax is far from uniform,
# so a wrong head stack cannot hide behind near-constant attention weights.
INIT = 0.3
COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              max_position_embeddings=64, initializer_range=INIT, attn_implementation="eager")

# name -> (config class, model class, config kwargs, expected spec fields, qk-norm kind)
CASES = {
    "llama_mha": (tf.LlamaConfig, tf.LlamaForCausalLM,
                  dict(num_attention_heads=4, num_key_value_heads=4),
                  dict(attention="MHA", heads=4, kv_heads=4, head_dim=8, bias=False), None),
    "llama_gqa_bias": (tf.LlamaConfig, tf.LlamaForCausalLM,
                       dict(num_attention_heads=4, num_key_value_heads=2, head_dim=12, attention_bias=True),
                       dict(attention="GQA", heads=4, kv_heads=2, head_dim=12, bias=True), None),
    "llama_mqa_bias": (tf.LlamaConfig, tf.LlamaForCausalLM,
                       dict(num_attention_heads=4, num_key_value_heads=1, head_dim=12, attention_bias=True),
                       dict(attention="MQA", heads=4, kv_heads=1, head_dim=12, bias=True), None),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM,
                dict(num_attention_heads=4, num_key_value_heads=2),
                dict(attention="GQA", heads=4, kv_heads=2, head_dim=8, bias=False), None),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM,
              dict(num_attention_heads=4, num_key_value_heads=2),
              dict(attention="GQA", heads=4, kv_heads=2, head_dim=8, bias=True), None),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM,
              dict(num_attention_heads=4, num_key_value_heads=2, head_dim=12),
              dict(attention="GQA", heads=4, kv_heads=2, head_dim=12, bias=False, qk_norm=True), "per_head"),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM,
              dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16),
              dict(attention="MQA", heads=4, kv_heads=1, head_dim=16, bias=False), None),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM,
               dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    query_pre_attn_scalar=10, attn_logit_softcapping=3.0),
               dict(attention="GQA", heads=4, kv_heads=2, head_dim=16, scale=10 ** -0.5), None),
    "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
                    dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=10),
                    dict(attention="GQA", heads=4, kv_heads=2, head_dim=16, qk_norm=True, scale=10 ** -0.5),
                    "per_head_1p"),
    "olmo": (tf.OlmoConfig, tf.OlmoForCausalLM,
             dict(num_attention_heads=4, num_key_value_heads=4, clip_qkv=1e4),  # clip inactive
             dict(attention="MHA", heads=4, kv_heads=4, head_dim=8, bias=False), None),
    "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM,
              dict(num_attention_heads=4, num_key_value_heads=2),
              dict(attention="GQA", heads=4, kv_heads=2, head_dim=8, qk_norm=True), "full_width"),
    "olmo3": (tf.Olmo3Config, tf.Olmo3ForCausalLM,
              dict(num_attention_heads=4, num_key_value_heads=2),
              dict(attention="GQA", heads=4, kv_heads=2, head_dim=8, qk_norm=True), "full_width"),
    "starcoder2": (tf.Starcoder2Config, tf.Starcoder2ForCausalLM,
                   dict(num_attention_heads=4, num_key_value_heads=2, use_bias=True),
                   dict(attention="GQA", heads=4, kv_heads=2, head_dim=8, bias=True), None),
}

_BUILT: dict = {}


def build(name, tmp_path_factory):
    """Save the tiny model of case ``name`` once per session; return (model, dir)."""
    if name not in _BUILT:
        cfg_cls, model_cls, kwargs, _, _ = CASES[name]
        path = tmp_path_factory.mktemp(name)
        model = save_tiny(model_cls, cfg_cls(**COMMON, **kwargs), path)
        _BUILT[name] = (model, path)
    return _BUILT[name]


def attention(model, i):
    """Layer i's attention module (causal LM, or the language model of a multimodal one)."""
    inner = model.model
    return (inner.language_model if hasattr(inner, "language_model") else inner).layers[i].self_attn


def layer_io(model, i):
    """(x, y) of layer i's attention block on fixed random tokens, positions all 0."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, COMMON["vocab_size"], (1, N_TOKENS), generator=g)
    inputs = dict(input_ids=ids, position_ids=torch.zeros_like(ids),
                  # An explicit mask: without it, repeated position ids read as packed sequences.
                  attention_mask=torch.ones_like(ids))
    return capture(model, attention(model, i), inputs)


def qk_scales(model, i, x, kind):
    """Per-token, per-head 1/rms of the raw q/k projections (H, N), as transformers'
    qk-norm computes them (RMSNorm: x * rsqrt(mean(x^2) + eps) * gain)."""
    attn = attention(model, i)
    cfg = model.config.get_text_config()
    H, G = cfg.num_attention_heads, cfg.num_key_value_heads
    eps = cfg.rms_norm_eps

    def inv_rms(proj, n):
        raw = torch.nn.functional.linear(x, proj.weight.detach().double(),
                                         None if proj.bias is None else proj.bias.detach().double())
        if kind == "full_width":  # one RMS over all heads (OLMo2/3), shared by every head
            return (raw.pow(2).mean(-1) + eps).rsqrt().expand(H, -1)
        # one RMS per head (Qwen3, Gemma3)
        return (raw.reshape(len(x), n, -1).pow(2).mean(-1) + eps).rsqrt().T

    sq, sk = inv_rms(attn.q_proj, H), inv_rms(attn.k_proj, G)
    if sk.shape[0] == G:  # per kv head -> per query head, g(h) = h // (H/G)
        sk = sk[torch.arange(H) // (H // G)]
    return sq, sk


def read(path, **kw):
    ckpt = open_checkpoint(path)
    adapter, spec = detect(ckpt, **kw)
    return ckpt, adapter, spec


def rebuild_error(model, spec, layer, i, stacks=None):
    """Relative error of the rebuilt attention output of layer i (optionally with
    replacement (pre, post) stacks)."""
    x, y = layer_io(model, i)
    kind = spec.extras.get("qk_norm_type")
    qs, ks = qk_scales(model, i, x, kind) if spec.qk_norm else (None, None)
    if stacks is not None:
        layer = type(layer)(layer.index, stacks[0], stacks[1], layer.out_bias, layer.tensors, layer.params)
    return rel_err(rebuild_attention(layer, spec, x, causal=True, q_scale=qs, k_scale=ks), y)


# ---------------------------------------------------------------- reproduction

@pytest.mark.parametrize("name", list(CASES))
def test_rebuilds_transformers_attention(name, tmp_path_factory):
    model, path = build(name, tmp_path_factory)
    _, _, _, expected, qk_kind = CASES[name]
    ckpt, adapter, spec = read(path)
    cfg = model.config
    assert spec.layers == 2 and spec.d == 32 and spec.prefix == "model."
    for field, value in expected.items():
        got = getattr(spec, field)
        assert got == pytest.approx(value) if field == "scale" else got == value, field
    if "scale" not in expected:
        assert spec.scale == pytest.approx(spec.head_dim ** -0.5)
    assert spec.qk_norm == (qk_kind is not None)
    assert spec.extras.get("qk_norm_type") == qk_kind
    assert spec.extras.get("softcap") == getattr(cfg, "attn_logit_softcapping", None)
    assert spec.value_dim == spec.head_dim and spec.rope
    rope = cfg.rope_parameters
    assert spec.extras["rope_theta"] == rope.get("full_attention", rope)["rope_theta"]
    if name == "olmo":
        assert spec.extras["clip_qkv"] == 1e4 and any("clip_qkv" in n for n in spec.notes)
    for i in (0, spec.layers - 1):
        layer = adapter.layer(ckpt, spec, i)
        H, G, dh = spec.heads, spec.kv_heads, spec.head_dim
        m = spec.d + (1 if spec.bias else 0)
        assert layer.pre.left.shape == (H, m, dh) and layer.pre.right.shape == (G, m, dh)
        assert layer.post.left.shape == (H, spec.d, dh)
        assert layer.params == 2 * spec.d * dh * (H + G)
        o_bias = model.model.layers[i].self_attn.o_proj.bias
        assert (layer.out_bias is not None) == (o_bias is not None)
        err = rebuild_error(model, spec, layer, i)
        assert err <= 1e-5, f"{name} layer {i}: relative error {err:.2e}"


def test_softcap_matters(tmp_path_factory):
    """Gemma2's softcap is active in this model: ignoring it gives a visible error."""
    model, path = build("gemma2", tmp_path_factory)
    ckpt, adapter, spec = read(path)
    layer = adapter.layer(ckpt, spec, 0)
    spec.extras.pop("softcap")
    assert rebuild_error(model, spec, layer, 0) > 0.05


# ---------------------------------------------------------------- negative controls

def test_negative_group_map_h_mod_G(tmp_path_factory):
    """g(h) = h % G instead of h // (H/G) on a GQA model fails at O(1)."""
    model, path = build("llama_gqa_bias", tmp_path_factory)
    ckpt, adapter, spec = read(path)
    layer = adapter.layer(ckpt, spec, 0)
    H, G = spec.heads, spec.kv_heads
    wrong = torch.arange(H) % G
    assert not torch.equal(wrong, layer.pre.group_of)
    pre = HeadStack(layer.pre.left, layer.pre.right[wrong])  # one key block per head
    post = HeadStack(layer.post.left, layer.post.right[wrong])
    assert rebuild_error(model, spec, layer, 0) <= 1e-5
    assert rebuild_error(model, spec, layer, 0, (pre, post)) > 0.3


def test_negative_olmo2_without_qk_gains(tmp_path_factory):
    model, path = build("olmo2", tmp_path_factory)
    ckpt, adapter, spec = read(path)
    layer = adapter.layer(ckpt, spec, 0)
    H, G, dh = spec.heads, spec.kv_heads, spec.head_dim
    attn = model.model.layers[0].self_attn
    gq = attn.q_norm.weight.detach().reshape(H, 1, dh)
    gk = attn.k_norm.weight.detach().reshape(G, 1, dh)
    pre = HeadStack(layer.pre.left / gq, layer.pre.right / gk)
    assert rebuild_error(model, spec, layer, 0, (pre, layer.post)) > 0.1


def test_negative_gemma3_norm_without_one_plus_w(tmp_path_factory):
    model, path = build("gemma3_text", tmp_path_factory)
    ckpt, adapter, spec = read(path)
    layer = adapter.layer(ckpt, spec, 0)
    attn = model.model.layers[0].self_attn
    wq, wk = attn.q_norm.weight.detach(), attn.k_norm.weight.detach()
    pre = HeadStack(layer.pre.left / (1 + wq) * wq, layer.pre.right / (1 + wk) * wk)
    assert rebuild_error(model, spec, layer, 0, (pre, layer.post)) > 0.1


# ---------------------------------------------------------------- error paths

def copy_model(src, dst, config=None):
    """Copy a saved model's safetensors (and config.json unless ``config`` is False,
    or a replacement dict) into ``dst``."""
    dst.mkdir()
    shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    if config is None:
        shutil.copy(src / "config.json", dst / "config.json")
    elif config is not False:
        (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("field, value, tensor", [
    ("num_attention_heads", 2, "layers.0.self_attn.q_proj"),  # head_dim stays 12: q rows 2*12 != 48
    ("num_key_value_heads", 4, "layers.0.self_attn.k_proj"),
    ("head_dim", 8, "layers.0.self_attn.q_proj"),
    ("hidden_size", 48, "layers.0.self_attn.q_proj"),
    ("num_hidden_layers", 3, "layers.2.self_attn.q_proj"),
])
def test_config_inconsistent_with_shapes(field, value, tensor, tmp_path_factory, tmp_path):
    """Caught when the spec is built (detect), naming the tensor that disagrees."""
    _, path = build("llama_gqa_bias", tmp_path_factory)
    cfg = json.loads((path / "config.json").read_text())
    cfg[field] = value
    bad = copy_model(path, tmp_path / "bad", cfg)
    one_line_error(lambda: read(bad), f"'model.{tensor}.weight'")


def test_config_heads_not_dividing(tmp_path_factory, tmp_path):
    _, path = build("llama_gqa_bias", tmp_path_factory)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_key_value_heads"] = 3
    bad = copy_model(path, tmp_path / "bad", cfg)
    one_line_error(lambda: read(bad), "kv heads")


def resave(path, dst, drop=(), add=None):
    """Copy a saved model with tensors dropped/added (config.json unchanged)."""
    tensors = load_file(path / "model.safetensors")
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    dst.mkdir()
    save_file(tensors, dst / "model.safetensors")
    shutil.copy(path / "config.json", dst / "config.json")
    return dst


def read_all_layers(path):
    ckpt, adapter, spec = read(path)
    for i in range(spec.layers):
        adapter.layer(ckpt, spec, i)


@pytest.mark.parametrize("name, gone", [
    ("qwen2", "model.layers.1.self_attn.k_proj.weight"),
    ("qwen2", "model.layers.1.self_attn.k_proj.bias"),  # must not be read as a bias-free layer
    ("qwen2", "model.layers.1.self_attn.o_proj.weight"),
    ("qwen2", "model.layers.1.self_attn.q_proj.weight"),
    ("qwen2", "model.layers.0.self_attn.v_proj.weight"),
    ("qwen3", "model.layers.1.self_attn.k_norm.weight"),  # must not be read without its gain
    ("olmo2", "model.layers.0.self_attn.q_norm.weight"),
])
def test_missing_tensor_of_a_layer(name, gone, tmp_path_factory, tmp_path):
    _, path = build(name, tmp_path_factory)
    bad = resave(path, tmp_path / "bad", drop=[gone])
    one_line_error(lambda: read_all_layers(bad), gone)


@pytest.mark.parametrize("extra", ["model.layers.1.self_attn.q_proj.bias",
                                   "model.layers.1.self_attn.q_norm.weight"])
def test_tensor_that_layer_0_lacks(extra, tmp_path_factory, tmp_path):
    _, path = build("llama_mha", tmp_path_factory)
    bad = resave(path, tmp_path / "bad", add={extra: torch.ones(8 if "norm" in extra else 32)})
    one_line_error(lambda: read_all_layers(bad), extra)


def test_no_config_needs_heads(tmp_path_factory, tmp_path):
    _, path = build("llama_gqa_bias", tmp_path_factory)
    bare = copy_model(path, tmp_path / "bare", config=False)
    one_line_error(lambda: read(bare), "give config, or heads (and kv_heads/head_dim where needed)")


@pytest.mark.parametrize("name, given", [
    ("llama_gqa_bias", dict(heads=4, kv_heads=2, head_dim=12)),
    ("llama_gqa_bias", dict(heads=4)),  # head dim and kv heads inferred from shapes
    ("starcoder2", dict(heads=4, kv_heads=2)),
    ("qwen3", dict(heads=4)),  # per-head qk-norm, told from q_norm's shape
    ("olmo2", dict(heads=4)),  # full-width qk-norm, likewise
])
def test_config_less_with_heads(name, given, tmp_path_factory, tmp_path):
    model, path = build(name, tmp_path_factory)
    _, _, reference = read(path)
    bare = copy_model(path, tmp_path / "bare", config=False)
    ckpt, adapter, spec = read(bare, **given)
    for f in ("attention", "layers", "d", "heads", "kv_heads", "head_dim", "bias", "qk_norm", "scale"):
        assert getattr(spec, f) == getattr(reference, f), f
    assert spec.extras.get("qk_norm_type") == reference.extras.get("qk_norm_type")
    assert spec.notes  # the guesses are stated
    for i in (0, 1):
        assert rebuild_error(model, spec, adapter.layer(ckpt, spec, i), i) <= 1e-5


def test_config_less_wrong_heads(tmp_path_factory, tmp_path):
    _, path = build("llama_gqa_bias", tmp_path_factory)
    bare = copy_model(path, tmp_path / "bare", config=False)
    one_line_error(lambda: read(bare, heads=4, kv_heads=2, head_dim=8), "q_proj")
    one_line_error(lambda: read(bare, heads=5), "q_proj")  # 48 rows are not 5 heads
    gone = "model.layers.0.self_attn.q_proj.weight"
    holed = resave(path, tmp_path / "holed", drop=[gone])
    (holed / "config.json").unlink()
    one_line_error(lambda: read(holed, heads=4), gone)


def test_multimodal_picks_language_model(tmp_path):
    """A real (tiny) Gemma3ForConditionalGeneration: the language model sits under
    ``language_model.model.layers`` beside a SigLIP tower whose names also match
    ``layers.N.self_attn.q_proj``; its fields sit under ``text_config``."""
    text = tf.Gemma3TextConfig(**COMMON, **CASES["gemma3_text"][2])
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                  image_size=32, patch_size=8)
    config = tf.Gemma3Config(text_config=text.to_dict(), vision_config=vision, mm_tokens_per_image=4,
                             attn_implementation="eager")
    model = save_tiny(tf.Gemma3ForConditionalGeneration, config, tmp_path)
    assert any(n.startswith("vision_tower.") and "layers.2.self_attn.q_proj" in n
               for n in open_checkpoint(tmp_path).names())
    ckpt, adapter, spec = read(tmp_path)
    assert spec.prefix == "language_model.model." and spec.family == "gemma3_text"
    assert (spec.layers, spec.d, spec.heads, spec.kv_heads, spec.head_dim) == (2, 32, 4, 2, 16)
    assert spec.qk_norm and spec.extras["qk_norm_type"] == "per_head_1p"
    assert spec.scale == pytest.approx(10 ** -0.5)
    for i in (0, 1):
        layer = adapter.layer(ckpt, spec, i)
        assert layer.tensors[0] == f"language_model.model.layers.{i}.self_attn.q_proj.weight"
        assert rebuild_error(model, spec, layer, i) <= 1e-5


def test_find_layers_prefix_choice(tmp_path):
    names = {"vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2),
             "model.language_model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2),
             "model.language_model.layers.1.self_attn.q_proj.weight": torch.zeros(2, 2)}
    save_file(names, tmp_path / "a.safetensors")
    suffix = r"layers\.(?P<layer>\d+)\.self_attn\.q_proj\.weight"
    prefix, found = find_layers(open_checkpoint(tmp_path / "a.safetensors"), suffix)
    assert prefix == "model.language_model." and sorted(found) == [0, 1]
    # Two stacks and neither is the language model: refuse rather than guess.
    save_file({"a.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2),
               "b.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)}, tmp_path / "b.safetensors")
    one_line_error(lambda: find_layers(open_checkpoint(tmp_path / "b.safetensors"), suffix), "'a.'", "'b.'")
