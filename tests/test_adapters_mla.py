"""The MLA adapter (DeepSeek-V2/V3, Kimi-K2, MiniCPM3) against transformers' own attention.

Each case builds a tiny random transformers model, saves it, reads it back with
``open_checkpoint`` + ``detect`` only, rebuilds layer attention outputs from the
extracted head stacks in float64 and compares them with what the model computed
(hooked), at position ids 0 (RoPE is the identity; YaRN's cos/sin attention factor
still applies and is part of W).

MLA's latent RMSNorms sit outside the bilinear forms as per-token scalars: the
query-latent 1/rms scales the whole logit, the c_kv 1/rms scales only the nope part
of the logit (the shared rope key is not normalised) and every value. The oracle
below computes both scalars from the model's raw projections and rebuilds the
logits as nope part + rope part, so ``oracle.rebuild_attention`` is not used.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers as tf
from oracle import capture, one_line_error, rel_err, save_tiny
from safetensors.torch import load_file, save_file

from tuckerctl.adapters import detect, mla
from tuckerctl.loader import open_checkpoint
from tuckerctl.multilinear import HeadStack, mode_spectra

N_TOKENS = 7
INIT = 0.3  # logits O(1..10): a wrong stack cannot hide behind near-uniform attention
D, H, R_Q, R_KV, D_N, D_R, D_V = 64, 4, 24, 16, 8, 4, 8
COMMON = dict(vocab_size=64, hidden_size=D, intermediate_size=48, num_hidden_layers=2,
              max_position_embeddings=64, initializer_range=INIT, attn_implementation="eager",
              num_attention_heads=H, num_key_value_heads=H,  # the V3 default (128) would break
              q_lora_rank=R_Q, kv_lora_rank=R_KV, qk_nope_head_dim=D_N, qk_rope_head_dim=D_R,
              v_head_dim=D_V)
# Dense MLPs only (MoE from layer first_k_dense_replace on), and a tiny MoE just in case.
DENSE = dict(first_k_dense_replace=2, n_routed_experts=4, moe_intermediate_size=16,
             num_experts_per_tok=2, n_group=1, topk_group=1)
# YaRN with mscale != mscale_all_dim: both the logit mscale^2 and the rope attention
# factor (on cos/sin) differ from 1.
YARN = dict(max_position_embeddings=256,
            rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64,
                                 mscale=1.0, mscale_all_dim=0.5, rope_theta=10000.0))

# name -> (config class, model class, config kwargs, expected rope pairing)
CASES = {
    "v3_qlora": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM, dict(DENSE), "interleaved"),
    "v3_qlora_bias_yarn": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM,
                           dict(DENSE, attention_bias=True, **YARN), "interleaved"),
    "v3_no_qlora_rotate_half": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM,
                                dict(DENSE, q_lora_rank=None, rope_interleave=False), "rotate_half"),
    "v2_qlora": (tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM, dict(DENSE), "interleaved"),
    "v2_no_qlora_bias_yarn": (tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM,
                              dict(DENSE, q_lora_rank=None, attention_bias=True, **YARN), "interleaved"),
    "minicpm3": (tf.MiniCPM3Config, tf.MiniCPM3ForCausalLM,
                 dict(v_head_dim=None, scale_depth=1.4), "rotate_half"),  # d_v defaults to d/H = 16
}

_BUILT: dict = {}


def build(name, tmp_path_factory):
    """Save the tiny model of case ``name`` once per session; return (model, dir)."""
    if name not in _BUILT:
        cfg_cls, model_cls, kwargs, _ = CASES[name]
        path = tmp_path_factory.mktemp(name)
        model = save_tiny(model_cls, cfg_cls(**{**COMMON, **kwargs}), path)
        _BUILT[name] = (model, path)
    return _BUILT[name]


def read(path, **kw):
    ckpt = open_checkpoint(path)
    adapter, spec = detect(ckpt, **kw)
    return ckpt, adapter, spec


def layer_io(model, i):
    """(x, y) of layer i's attention module on fixed random tokens, positions all 0."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, COMMON["vocab_size"], (1, N_TOKENS), generator=g)
    inputs = dict(input_ids=ids, position_ids=torch.zeros_like(ids), attention_mask=torch.ones_like(ids))
    return capture(model, model.model.layers[i].self_attn, inputs)


def latent_scales(attn, x):
    """Per-token 1/rms of the query latent q_a_proj(x) (ones without q-LoRA) and of
    c_kv = the first r_kv outputs of kv_a_proj_with_mqa(x), as the model's RMSNorms
    compute them (x * rsqrt(mean(x^2) + eps) * gain), from the raw projections."""
    def raw(lin):
        return torch.nn.functional.linear(x, lin.weight.detach().double(),
                                          None if lin.bias is None else lin.bias.detach().double())

    if attn.q_lora_rank is not None:
        sq = (raw(attn.q_a_proj).pow(2).mean(-1) + attn.q_a_layernorm.variance_epsilon).rsqrt()
    else:
        sq = torch.ones(len(x), dtype=x.dtype)
    c = raw(attn.kv_a_proj_with_mqa)[:, :attn.kv_lora_rank]
    skv = (c.pow(2).mean(-1) + attn.kv_a_layernorm.variance_epsilon).rsqrt()
    return sq, skv


def mla_rebuild(layer, spec, x, sq, skv):
    """Causal attention output from the head stacks: logits = s * sq_i * (skv_j x_i^T
    W_nope[h] x_j + x_i^T W_rope[h] x_j), values skv_j Wt[h] x_j, plus the o bias."""
    d_n = spec.extras["qk_nope_head_dim"]
    pre = layer.pre.to(dtype=torch.float64)

    def part(cols):
        return HeadStack(pre.left[..., cols], pre.right[..., cols], pre.left_basis, pre.right_basis).dense()

    w_nope, w_rope = part(slice(None, d_n)), part(slice(d_n, None))
    wt = layer.post.to(dtype=torch.float64).dense()
    n = len(x)

    def homog(m):
        return torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1) if m == x.shape[1] + 1 else x

    xq, xv = homog(w_nope.shape[1]), homog(wt.shape[2])
    nope = torch.einsum("id,hde,je->hij", xq, w_nope, xq) * skv[None, None, :]
    rope = torch.einsum("id,hde,je->hij", xq, w_rope, xq)
    logits = spec.scale * sq[None, :, None] * (nope + rope)
    logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(logits, -1)
    y = torch.einsum("hij,j,je,hde->id", p, skv, xv, wt)
    if layer.out_bias is not None:
        y = y + layer.out_bias.double()
    return y


def rebuild_error(model, spec, layer, i):
    x, y = layer_io(model, i)
    sq, skv = latent_scales(model.model.layers[i].self_attn, x)
    return rel_err(mla_rebuild(layer, spec, x, sq, skv), y)


def attn_params(attn) -> int:
    names = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    return sum(getattr(attn, n).weight.numel() for n in names if getattr(attn, n, None) is not None)


def expected_ceilings(spec):
    """docs/mathematics.md section 2's MLA rows (with and without q-LoRA)."""
    ex, d = spec.extras, spec.d
    r_q, r_kv, d_r, d_v = ex["q_lora_rank"], ex["kv_lora_rank"], ex["qk_rope_head_dim"], ex["v_head_dim"]
    query = r_q if r_q is not None else min(d, spec.heads * spec.head_dim)
    return (spec.heads, query, r_kv + d_r), (spec.heads, min(d, spec.heads * d_v), r_kv)


# ---------------------------------------------------------------- reproduction

@pytest.mark.parametrize("name", list(CASES))
def test_rebuilds_transformers_attention(name, tmp_path_factory):
    model, path = build(name, tmp_path_factory)
    cfg = model.config
    ckpt, adapter, spec = read(path)
    assert type(adapter) is mla.MLA and spec.family == cfg.model_type
    assert spec.attention == "MLA" and spec.layers == 2 and spec.d == D and spec.prefix == "model."
    assert spec.heads == spec.kv_heads == H and spec.rope and spec.qk_norm
    assert spec.head_dim == D_N + D_R != cfg.head_dim  # v5 writes head_dim = qk_rope_head_dim
    assert spec.value_dim == cfg.v_head_dim == (D // H if name == "minicpm3" else D_V)
    assert spec.bias == bool(cfg.attention_bias)
    assert spec.extras["q_lora_rank"] == cfg.q_lora_rank and spec.extras["kv_lora_rank"] == R_KV
    assert spec.extras["rope_pairing"] == CASES[name][3]
    assert spec.scale == pytest.approx(model.model.layers[0].self_attn.scaling, rel=1e-12)
    if "yarn" in name:
        assert spec.scale != pytest.approx((D_N + D_R) ** -0.5)  # mscale^2 is active
        assert spec.extras["rope_attention_factor"] != pytest.approx(1.0)
    if name == "minicpm3":
        assert spec.extras["residual_scale"] == pytest.approx(1.4 / 2 ** 0.5)
    for i in (0, 1):
        layer = adapter.layer(ckpt, spec, i)
        attn = model.model.layers[i].self_attn
        assert layer.params == attn_params(attn)
        assert (layer.out_bias is not None) == (attn.o_proj.bias is not None)
        err = rebuild_error(model, spec, layer, i)
        assert err <= 1e-5, f"{name} layer {i}: relative error {err:.2e}"


@pytest.mark.parametrize("name", list(CASES))
def test_shared_bases_and_ceilings(name, tmp_path_factory):
    """The stacks keep the latent projections as shared bases; the ceilings are
    docs/mathematics.md section 2's MLA row, and generic random weights reach them (dense ranks)."""
    _, path = build(name, tmp_path_factory)
    ckpt, adapter, spec = read(path)
    layer = adapter.layer(ckpt, spec, 0)
    m = D + (1 if spec.bias else 0)
    r_q = spec.extras["q_lora_rank"]
    if r_q is not None:
        assert layer.pre.left_basis.shape == (m, r_q) and layer.pre.left.shape == (H, r_q, D_N + D_R)
    else:
        assert layer.pre.left_basis is None and layer.pre.left.shape == (H, m, D_N + D_R)
    assert layer.pre.right_basis.shape == (m, R_KV + D_R) and layer.pre.right.shape == (H, R_KV + D_R, D_N + D_R)
    assert layer.post.left_basis is None and layer.post.right_basis.shape == (m, R_KV)
    pre_c, post_c = expected_ceilings(spec)
    assert layer.pre.ceilings == pre_c and layer.post.ceilings == post_c
    for stack, ceil in ((layer.pre, pre_c), (layer.post, post_c)):
        W = stack.to(dtype=torch.float64).dense()
        ranks = tuple(int(torch.linalg.matrix_rank(u, rtol=1e-9)) for u in unfoldings(W))
        assert ranks == ceil


def unfoldings(W):
    h, m, n = W.shape
    return W.reshape(h, m * n), W.permute(1, 0, 2).reshape(m, h * n), W.permute(2, 0, 1).reshape(n, h * m)


@pytest.mark.parametrize("name", ["v3_qlora", "v2_no_qlora_bias_yarn", "minicpm3"])
def test_structured_spectra_match_dense(name, tmp_path_factory):
    _, path = build(name, tmp_path_factory)
    ckpt, adapter, spec = read(path)
    layer = adapter.layer(ckpt, spec, 1)
    for stack in (layer.pre, layer.post):
        s64 = stack.to(dtype=torch.float64)
        structured = mode_spectra(s64)
        for got, unf in zip(structured, unfoldings(s64.dense())):
            dense = torch.linalg.svdvals(unf)
            top = dense[0]
            k = min(len(got), len(dense))
            assert float((got[:k] - dense[:k]).abs().max()) <= 1e-10 * top
            assert all(float(v) <= 1e-10 * top for v in (*got[k:], *dense[k:]))  # structural zeros


# ---------------------------------------------------------------- negative controls

def contiguous_kv_b(kv_b, heads, d_n, d_v):
    """The wrong reading of kv_b_proj: [all K rows; all V rows]."""
    k, v = kv_b[: heads * d_n], kv_b[heads * d_n:]
    return k.reshape(heads, d_n, -1), v.reshape(heads, d_v, -1)


@pytest.mark.parametrize("name", ["v3_qlora", "v2_no_qlora_bias_yarn"])
def test_negative_contiguous_kv_b_split(name, tmp_path_factory, monkeypatch):
    model, path = build(name, tmp_path_factory)
    ckpt, adapter, spec = read(path)
    assert rebuild_error(model, spec, adapter.layer(ckpt, spec, 0), 0) <= 1e-5
    monkeypatch.setattr(mla, "split_kv_b", contiguous_kv_b)
    assert rebuild_error(model, spec, adapter.layer(ckpt, spec, 0), 0) > 0.3


def test_negative_key_scalar_on_rope_part(tmp_path_factory):
    """The c_kv 1/rms must not touch the rope part of the logit: applying it to the
    whole logit (as for an ordinary qk-norm) is visibly wrong."""
    model, path = build("v3_qlora", tmp_path_factory)
    ckpt, adapter, spec = read(path)
    layer = adapter.layer(ckpt, spec, 0)
    x, y = layer_io(model, 0)
    sq, skv = latent_scales(model.model.layers[0].self_attn, x)
    assert rel_err(mla_rebuild(layer, spec, x, sq, skv), y) <= 1e-5
    spec.extras["qk_nope_head_dim"] = D_N + D_R  # every column treated as "nope"
    assert rel_err(mla_rebuild(layer, spec, x, sq, skv), y) > 0.01


def test_negative_yarn_attention_factor_matters(tmp_path_factory):
    """Without folding YaRN's cos/sin attention factor the rebuild is off."""
    model, path = build("v3_qlora_bias_yarn", tmp_path_factory)
    ckpt, adapter, spec = read(path)
    spec.extras.pop("rope_attention_factor")
    assert rebuild_error(model, spec, adapter.layer(ckpt, spec, 0), 0) > 0.01


def test_legacy_rope_scaling_config(tmp_path_factory, tmp_path):
    """Published DeepSeek configs carry ``rope_scaling: {type: yarn, ...}`` and a top-level
    rope_theta instead of v5's rope_parameters: same scale and attention factor."""
    _, path = build("v3_qlora_bias_yarn", tmp_path_factory)
    _, _, ref = read(path)
    cfg = saved_config(path)
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["rope_scaling"] = dict(rp, type=rp.pop("rope_type"))
    _, _, spec = read(copy_model(path, tmp_path / "legacy", cfg))
    assert spec.scale == pytest.approx(ref.scale, rel=1e-12)
    assert spec.extras["rope_attention_factor"] == pytest.approx(ref.extras["rope_attention_factor"], rel=1e-12)
    assert spec.extras["rope_theta"] == 10000.0


# ---------------------------------------------------------------- families, configs, errors

def copy_model(src, dst, config=None, rename=None, drop=()):
    """Copy a saved model into ``dst`` with an optional replacement config (False: none),
    a tensor-name prefix rename (old, new) and dropped tensors."""
    dst.mkdir()
    if rename is None and not drop:
        shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    else:
        tensors = load_file(src / "model.safetensors")
        tensors = {(k.replace(*rename, 1) if rename else k): v for k, v in tensors.items() if k not in drop}
        save_file(tensors, dst / "model.safetensors")
    if config is None:
        shutil.copy(src / "config.json", dst / "config.json")
    elif config is not False:
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def saved_config(path):
    return json.loads((path / "config.json").read_text())


def test_kimi_k2_and_k25_wrapper(tmp_path_factory, tmp_path):
    """Kimi-K2 is DeepSeek-V3 under model_type kimi_k2; Kimi-K2.5 wraps it as text_config."""
    model, path = build("v3_qlora", tmp_path_factory)
    cfg = dict(saved_config(path), model_type="kimi_k2")
    ckpt, adapter, spec = read(copy_model(path, tmp_path / "k2", cfg))
    assert spec.family == "kimi_k2" and spec.extras["rope_pairing"] == "interleaved"
    assert rebuild_error(model, spec, adapter.layer(ckpt, spec, 1), 1) <= 1e-5
    wrapper = {"model_type": "kimi_k25", "text_config": cfg, "vision_config": {"model_type": "kimi_k25_vision"}}
    k25 = copy_model(path, tmp_path / "k25", wrapper, rename=("model.", "language_model.model."))
    ckpt, adapter, spec = read(k25)
    assert spec.family == "kimi_k2" and spec.prefix == "language_model.model."
    assert rebuild_error(model, spec, adapter.layer(ckpt, spec, 0), 0) <= 1e-5


def test_minicpm3_v_head_dim_default(tmp_path_factory, tmp_path):
    _, path = build("minicpm3", tmp_path_factory)
    cfg = saved_config(path)
    del cfg["v_head_dim"]
    _, _, spec = read(copy_model(path, tmp_path / "m", cfg))
    assert spec.value_dim == D // H


def test_config_less_with_heads(tmp_path_factory, tmp_path):
    """Without config.json, --heads suffices: every MLA width follows from the shapes."""
    for name in ("v3_qlora", "v2_no_qlora_bias_yarn"):
        model, path = build(name, tmp_path_factory)
        _, _, ref = read(path)
        # q-LoRA files are recognised by tensor names alone; a q_proj file also matches the
        # Llama signature, so it needs --family.
        family = None if ref.extras["q_lora_rank"] else ref.family
        ckpt, adapter, spec = read(copy_model(path, tmp_path / name, config=False), heads=H, family=family)
        assert type(adapter) is mla.MLA
        for f in ("attention", "layers", "d", "heads", "kv_heads", "head_dim", "value_dim", "bias"):
            assert getattr(spec, f) == getattr(ref, f), f
        for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            assert spec.extras[k] == ref.extras[k], k
        assert spec.notes
        if name == "v3_qlora":  # no rope scaling: the default scale is the model's
            assert rebuild_error(model, spec, adapter.layer(ckpt, spec, 1), 1) <= 1e-5


@pytest.mark.parametrize("field, value, needle", [
    ("num_key_value_heads", 2, "num_key_value_heads"),
    ("kv_lora_rank", 12, "kv_a_proj_with_mqa.weight"),
    ("qk_nope_head_dim", 6, "q_b_proj.weight"),
    ("v_head_dim", 6, "kv_b_proj.weight"),
    ("q_lora_rank", 20, "q_a_proj.weight"),
    ("hidden_size", 48, "q_a_proj.weight"),
    ("q_lora_rank", None, "q_lora_rank"),
])
def test_config_inconsistent_with_shapes(field, value, needle, tmp_path_factory, tmp_path):
    _, path = build("v3_qlora", tmp_path_factory)
    cfg = dict(saved_config(path), **{field: value})

    def read_layer():
        ckpt, adapter, spec = read(copy_model(path, tmp_path / "bad", cfg))
        adapter.layer(ckpt, spec, 0)

    one_line_error(read_layer, needle)


def test_q_lora_rank_without_q_lora_tensors(tmp_path_factory, tmp_path):
    _, path = build("v2_no_qlora_bias_yarn", tmp_path_factory)
    cfg = dict(saved_config(path), q_lora_rank=24)
    one_line_error(lambda: read(copy_model(path, tmp_path / "bad", cfg)), "q_lora_rank", "q_proj.weight")


@pytest.mark.parametrize("gone", ["model.layers.1.self_attn.kv_b_proj.weight",
                                  "model.layers.1.self_attn.kv_a_layernorm.weight",
                                  "model.layers.1.self_attn.q_a_layernorm.weight",
                                  "model.layers.1.self_attn.o_proj.weight"])
def test_missing_tensor_of_a_layer(gone, tmp_path_factory, tmp_path):
    _, path = build("v3_qlora", tmp_path_factory)
    ckpt, adapter, spec = read(copy_model(path, tmp_path / "bad", drop=(gone,)))
    adapter.layer(ckpt, spec, 0)
    one_line_error(lambda: adapter.layer(ckpt, spec, 1), gone)


def test_mtp_layer_beyond_num_hidden_layers_ignored(tmp_path_factory, tmp_path):
    """DeepSeek-V3 ships its multi-token-prediction block as layer index L: not a layer."""
    _, path = build("v3_qlora", tmp_path_factory)
    tensors = load_file(path / "model.safetensors")
    extra = {k.replace("layers.1.", "layers.2."): v.clone() for k, v in tensors.items() if ".layers.1." in k}
    dst = tmp_path / "mtp"
    dst.mkdir()
    save_file({**tensors, **extra}, dst / "model.safetensors")
    shutil.copy(path / "config.json", dst / "config.json")
    _, _, spec = read(dst)
    assert spec.layers == 2
