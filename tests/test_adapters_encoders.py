"""Separate-projection MHA adapters (BERT / RoBERTa / MiniLM, ViT / DeiT, OPT) against
transformers' own attention, plus the real all-MiniLM-L6-v2 checkpoint.

Each case builds a tiny random transformers model, saves it, reads it back with
``open_checkpoint`` + ``detect`` only, rebuilds one layer's attention output from the
head stacks (tests/oracle.py, float64) and compares it with what the model computed.
BERT's attention block ends in ``BertSelfOutput`` (dense + dropout + residual +
LayerNorm), so there the output is the ``attention.output.dense`` Linear's output.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers as tf
from oracle import build_case, capture, rebuild_attention, rel_err
from realmodels import MINILM, needs_minilm

from tuckerctl.adapters import detect
from tuckerctl.errors import InputError
from tuckerctl.loader import open_checkpoint

N = 7
VOCAB = 64
INIT = 0.3  # logits O(1..10): a wrong head split cannot hide behind uniform attention
TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
            intermediate_size=48, initializer_range=INIT, attn_implementation="eager")
IMAGE = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=48,
             image_size=8, patch_size=4, initializer_range=INIT, attn_implementation="eager")

# name -> (model class, config, expected spec fields, module giving x, module giving y)
CASES = {
    "bert_bare": (tf.BertModel, tf.BertConfig(**TEXT),  # sentence-transformers style: no prefix
                  dict(family="bert", prefix=""),
                  "encoder.layer.{i}.attention.self", "encoder.layer.{i}.attention.output.dense"),
    "bert_mlm": (tf.BertForMaskedLM, tf.BertConfig(**TEXT),
                 dict(family="bert", prefix="bert."),
                 "bert.encoder.layer.{i}.attention.self", "bert.encoder.layer.{i}.attention.output.dense"),
    "roberta": (tf.RobertaForMaskedLM, tf.RobertaConfig(**TEXT),
                dict(family="roberta", prefix="roberta."),
                "roberta.encoder.layer.{i}.attention.self", "roberta.encoder.layer.{i}.attention.output.dense"),
    # v5 names ViT's modules layers.N.attention.{q,k,v,o}_proj in memory only; the files
    # keep encoder.layer.N.attention.attention.{query,key,value} / attention.output.dense.
    "vit": (tf.ViTForImageClassification, tf.ViTConfig(**IMAGE),
            dict(family="vit", prefix="vit."), "vit.layers.{i}.attention", "vit.layers.{i}.attention"),
    "vit_bare_no_qkv_bias": (tf.ViTModel, tf.ViTConfig(**IMAGE, qkv_bias=False),
                             dict(family="vit", prefix="", bias=False), "layers.{i}.attention",
                             "layers.{i}.attention"),
    "deit": (tf.DeiTForImageClassification, tf.DeiTConfig(**IMAGE),
             dict(family="deit", prefix="deit."), "deit.layers.{i}.attention", "deit.layers.{i}.attention"),
    "opt": (tf.OPTForCausalLM,
            tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                         ffn_dim=48, word_embed_proj_dim=32, init_std=INIT, attn_implementation="eager"),
            dict(family="opt", prefix="model.decoder."),
            "model.decoder.layers.{i}.self_attn", "model.decoder.layers.{i}.self_attn"),
}

def build(name, tmp_path_factory):
    """Save case ``name``'s tiny model once per session; return (model, dir)."""
    return build_case(CASES, name, tmp_path_factory)


def inputs_for(model):
    g = torch.Generator().manual_seed(1)
    if model.config.model_type in ("vit", "deit"):
        return dict(pixel_values=torch.randn(1, 3, 8, 8, generator=g))
    ids = torch.randint(0, model.config.vocab_size, (1, N), generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def layer_io(model, x_path, y_path, i):
    """(x, y): the attention block's input and its output projection's output."""
    inputs = inputs_for(model)
    x, y = capture(model, model.get_submodule(x_path.format(i=i)), inputs)
    if y_path != x_path:
        _, y = capture(model, model.get_submodule(y_path.format(i=i)), inputs)
    return x, y


def read(path, **kw):
    ckpt = open_checkpoint(path)
    adapter, spec = detect(ckpt, **kw)
    return ckpt, adapter, spec


def rebuild_error(model, name, spec, layer, i):
    x, y = layer_io(model, CASES[name][3], CASES[name][4], i)
    return rel_err(rebuild_attention(layer, spec, x, causal=spec.extras["causal"]), y)


# ---------------------------------------------------------------- reproduction

@pytest.mark.parametrize("name", list(CASES))
def test_rebuilds_transformers_attention(name, tmp_path_factory):
    model, path = build(name, tmp_path_factory)
    ckpt, adapter, spec = read(path)
    expected = dict(attention="MHA", layers=2, d=32, heads=4, kv_heads=4, head_dim=8, value_dim=8,
                    bias=True, rope=False, qk_norm=False, scale=8 ** -0.5)
    expected.update(CASES[name][2])
    for field, value in expected.items():
        assert getattr(spec, field) == value, field
    assert spec.extras["causal"] is (name == "opt")
    for i in range(spec.layers):
        layer = adapter.layer(ckpt, spec, i)
        m = 33 if spec.bias else 32
        assert layer.pre.left.shape == (4, m, 8) and layer.pre.right.shape == (4, m, 8)
        assert layer.post.left.shape == (4, 32, 8)
        assert layer.params == 4 * 32 * 32  # q, k, v, o weights; biases excluded
        assert layer.out_bias is not None
        err = rebuild_error(model, name, spec, layer, i)
        assert err <= 1e-5, f"{name} layer {i}: relative error {err:.2e}"


def test_causality_matters(tmp_path_factory):
    """OPT read as bidirectional (or BERT as causal) is visibly wrong."""
    for name in ("opt", "bert_bare"):
        model, path = build(name, tmp_path_factory)
        ckpt, adapter, spec = read(path)
        x, y = layer_io(model, CASES[name][3], CASES[name][4], 0)
        wrong = not spec.extras["causal"]
        assert rel_err(rebuild_attention(adapter.layer(ckpt, spec, 0), spec, x, causal=wrong), y) > 1e-2


def test_key_bias_matters(tmp_path_factory):
    """The homogeneous bias row carries a key-only logit term that survives softmax:
    dropping the q bias row changes the output."""
    model, path = build("bert_bare", tmp_path_factory)
    ckpt, adapter, spec = read(path)
    layer = adapter.layer(ckpt, spec, 0)
    layer.pre.left[:, -1, :] = 0
    assert rebuild_error(model, "bert_bare", spec, layer, 0) > 1e-2


# ---------------------------------------------------------------- without a config

@pytest.mark.parametrize("name,kw,adapter_name", [
    ("bert_mlm", dict(heads=4), "Bert"),
    ("vit", dict(heads=4), "ViT"),
    ("opt", dict(heads=4, family="opt"), "OPT"),  # q_proj alone would read as Llama
])
def test_without_config(name, kw, adapter_name, tmp_path_factory, tmp_path):
    model, path = build(name, tmp_path_factory)
    shutil.copy(path / "model.safetensors", tmp_path / "model.safetensors")
    ckpt, adapter, spec = read(tmp_path / "model.safetensors", **kw)
    assert type(adapter).__name__ == adapter_name
    assert (spec.d, spec.heads, spec.layers) == (32, 4, 2) and spec.notes
    assert rebuild_error(model, name, spec, adapter.layer(ckpt, spec, 0), 0) <= 1e-5


# ---------------------------------------------------------------- error paths

@pytest.mark.parametrize("name,changes,needle", [
    ("bert_bare", dict(num_attention_heads=5), "'num_attention_heads'"),  # 32 % 5 != 0
    ("bert_mlm", dict(hidden_size=48), r"attention\.self\.query\.weight"),
    ("vit", dict(qkv_bias=False), "'qkv_bias'"),
    ("deit", dict(head_dim=16), "head_dim"),
    ("opt", dict(num_hidden_layers=3), r"layers\.2\.self_attn\.q_proj\.weight"),
    ("opt", dict(enable_bias=False), "'enable_bias'"),
])
def test_inconsistent_config_is_input_error(name, changes, needle, tmp_path_factory, tmp_path):
    _, path = build(name, tmp_path_factory)
    shutil.copytree(path, tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **changes}))
    with pytest.raises(InputError, match=needle):
        read(tmp_path / "m")


# ---------------------------------------------------------------- real checkpoint

@needs_minilm
def test_real_minilm_l6():
    path = MINILM / "model"
    ckpt, adapter, spec = read(path)
    assert (spec.family, spec.layers, spec.d, spec.heads, spec.head_dim, spec.bias) == \
        ("bert", 6, 384, 12, 32, True)
    assert spec.prefix == "" and spec.attention == "MHA" and spec.extras["causal"] is False
    layer = adapter.layer(ckpt, spec, 0)
    assert layer.params == 4 * 384 * 384
    model = tf.BertModel.from_pretrained(path, local_files_only=True, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1000, model.config.vocab_size, (1, 12), generator=g)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    x, _ = capture(model, model.encoder.layer[0].attention.self, inputs)
    _, y = capture(model, model.encoder.layer[0].attention.output.dense, inputs)
    err = rel_err(rebuild_attention(layer, spec, x, causal=False), y)
    assert err <= 1e-5, f"MiniLM layer 0: relative error {err:.2e}"
