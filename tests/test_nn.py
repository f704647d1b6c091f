"""TuckerAttention (tuckerctl.nn) against independent oracles.

* transformers' own attention outputs (hooked) for tiny Llama, GPT-2, BERT and ViT models
  read back with ``open_checkpoint`` + ``detect``, at full Tucker rank;
* the dense float64 rebuild of tests/oracle.py;
* the module's own full causal forward (for the KV cache) and unpadded runs (padding).

Llama runs with every position id at 0, so RoPE is the identity there.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from oracle import rebuild_attention, rel_err, save_tiny
from torch.utils._python_dispatch import TorchDispatchMode

from tuckerctl.adapters import ModelSpec, detect
from tuckerctl.loader import open_checkpoint
from tuckerctl.multilinear import tucker
from tuckerctl.nn import (
    LATENT_ROPE_WARNING,
    NO_ROPE_WARNING,
    LatentKVCache,
    TuckerAttention,
    latent_rope,
)
from tuckerctl.ranks import tucker_params

N_TOKENS = 7
FULL = (10 ** 6,) * 3  # clamped by tucker() to each mode's size: full multilinear rank
INIT = 0.3  # O(1..10) logits: a far-from-uniform softmax, so wrong weights cannot hide


def capture_io(model, in_module, out_module, inputs: dict):
    """Run the model; return (input of ``in_module``, output of ``out_module``), whole batch, float64."""
    seen = {}

    def pre(mod, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    def post(mod, args, kwargs, out):
        seen["y"] = out[0] if isinstance(out, tuple) else out

    hooks = [in_module.register_forward_pre_hook(pre, with_kwargs=True),
             out_module.register_forward_hook(post, with_kwargs=True)]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    return seen["x"].double(), seen["y"].double()


def full_rank(layer, dtype=torch.float64):
    """Full-rank Tucker of both tensors from the float64 head stacks."""
    pre = tucker(layer.pre.to(dtype=torch.float64), FULL)
    post = tucker(layer.post.to(dtype=torch.float64), FULL)
    return pre, post


def module_for(layer, spec, ranks=None, post_ranks=None, dtype=torch.float64, **kw):
    pre = tucker(layer.pre.to(dtype=torch.float64), ranks or FULL)
    post = tucker(layer.post.to(dtype=torch.float64), post_ranks or ranks or FULL)
    bias = None if layer.out_bias is None else layer.out_bias.double()
    return TuckerAttention.from_tucker(pre, post, spec, out_bias=bias, dtype=dtype, **kw)


# ------------------------------------------------------------------ model fixtures

def _llama(tmp_path_factory, **extra):
    path = tmp_path_factory.mktemp("llama")
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                         max_position_embeddings=64, initializer_range=INIT, attn_implementation="eager",
                         **extra)
    model = save_tiny(tf.LlamaForCausalLM, cfg, path)
    ckpt = open_checkpoint(path)
    adapter, spec = detect(ckpt)
    layer = adapter.layer(ckpt, spec, 1)
    return model, spec, layer, path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """GQA Llama (H=4, G=2, d_h=8, d=32) with q/k/v/o biases: (model, spec, layer 1, path)."""
    return _llama(tmp_path_factory)


@pytest.fixture(scope="module")
def llama_full(llama):
    _, spec, layer, _ = llama
    return module_for(layer, spec)


@pytest.fixture
def x_batch():
    torch.manual_seed(1)
    return torch.randn(2, N_TOKENS, 32, dtype=torch.float64)


# ------------------------------------------------------------------ transformers oracles

def _case_llama(tmp):
    model, spec, layer, _ = _llama(tmp)
    ids = torch.randint(0, 64, (2, N_TOKENS))
    attn = model.model.layers[1].self_attn
    x, y = capture_io(model, attn, attn, dict(input_ids=ids, position_ids=torch.zeros_like(ids)))
    return spec, layer, x, y, True, model


def _case_gpt2(tmp):
    path = tmp.mktemp("gpt2")
    cfg = tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                        initializer_range=INIT, attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    model = save_tiny(tf.GPT2LMHeadModel, cfg, path)
    ckpt = open_checkpoint(path)
    adapter, spec = detect(ckpt)
    attn = model.transformer.h[1].attn
    x, y = capture_io(model, attn, attn, dict(input_ids=torch.randint(0, 64, (2, N_TOKENS))))
    return spec, adapter.layer(ckpt, spec, 1), x, y, True, model


def _case_bert(tmp):
    path = tmp.mktemp("bert")
    cfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=32, initializer_range=INIT,
                        attn_implementation="eager")
    model = save_tiny(tf.BertModel, cfg, path)
    ckpt = open_checkpoint(path)
    adapter, spec = detect(ckpt)
    att = model.encoder.layer[1].attention
    # BertSelfOutput adds the residual and a LayerNorm after o-proj: stop at o-proj (dense).
    x, y = capture_io(model, att.self, att.output.dense, dict(input_ids=torch.randint(0, 64, (2, N_TOKENS))))
    return spec, adapter.layer(ckpt, spec, 1), x, y, False, model


def _case_vit(tmp):
    path = tmp.mktemp("vit")
    cfg = tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                       image_size=12, patch_size=4, initializer_range=INIT, attn_implementation="eager")
    model = save_tiny(tf.ViTModel, cfg, path)
    ckpt = open_checkpoint(path)
    adapter, spec = detect(ckpt)
    layer = model.encoder.layer[1] if hasattr(model, "encoder") else model.layers[1]
    att = layer.attention
    out = att.output.dense if hasattr(att, "output") else att
    x, y = capture_io(model, att, out, dict(pixel_values=torch.randn(2, 3, 12, 12)))
    return spec, adapter.layer(ckpt, spec, 1), x, y, False, model


# family -> (builder, adapter module it needs)
ORACLE_CASES = {
    "llama": _case_llama,
    "gpt2": _case_gpt2,
    "bert": _case_bert,
    "vit": _case_vit,
}


@pytest.fixture(scope="module", params=list(ORACLE_CASES))
def oracle_case(request, tmp_path_factory):
    build = ORACLE_CASES[request.param]
    torch.manual_seed(3)
    return (request.param, *build(tmp_path_factory)[:5])


def test_full_rank_reproduces_transformers(oracle_case):
    family, spec, layer, x, y, causal = oracle_case
    pre, post = full_rank(layer)
    bias = None if layer.out_bias is None else layer.out_bias.double()
    attn = TuckerAttention.from_tucker(pre, post, spec, out_bias=bias)
    assert attn.causal == causal  # default inferred from the family
    y64 = attn(x)
    assert y64.shape == y.shape
    assert rel_err(y64.detach(), y) <= 1e-5, family
    # The same module in float32 (factors rounded): still within float32 rounding.
    attn32 = TuckerAttention.from_tucker(pre, post, spec, out_bias=bias, dtype=torch.float32)
    assert rel_err(attn32(x.float()).detach().double(), y) <= 1e-5, family
    # Negative control: the other masking is far off, so the comparison discriminates.
    assert rel_err(attn(x, causal=not causal).detach(), y) > 1e-2


def test_bert_padding_mask_matches_transformers(tmp_path_factory):
    spec, layer, *_, model = _case_bert(tmp_path_factory)
    mask = torch.ones(2, N_TOKENS, dtype=torch.long)
    mask[1, 4:] = 0
    att = model.encoder.layer[1].attention
    x, y = capture_io(model, att.self, att.output.dense,
                      dict(input_ids=torch.randint(0, 64, (2, N_TOKENS)), attention_mask=mask))
    attn = module_for(layer, spec)
    out = attn(x, attention_mask=mask.bool()).detach()
    assert rel_err(out[0], y[0]) <= 1e-5
    assert rel_err(out[1, :4], y[1, :4]) <= 1e-5
    assert rel_err(attn(x).detach()[1, :4], y[1, :4]) > 1e-3  # the mask matters


# ------------------------------------------------------------------ dense oracle

@pytest.mark.parametrize("causal", [True, False])
def test_full_rank_equals_dense_oracle(llama, llama_full, x_batch, causal):
    _, spec, layer, _ = llama
    assert spec.attention == "GQA" and spec.bias and layer.out_bias is not None
    assert llama_full.U2.shape[0] == 33 and llama_full.V3.shape[0] == 33  # homogeneous q/k and v
    for b in range(2):
        want = rebuild_attention(layer, spec, x_batch[b], causal)
        got = llama_full(x_batch, causal=causal)[b].detach()
        assert rel_err(got, want) <= 1e-10
    # Unbatched input gives the same rows.
    assert torch.allclose(llama_full(x_batch[0], causal=causal), llama_full(x_batch, causal=causal)[0])


def test_uses_sdpa_with_one_shared_kv(llama_full, x_batch, monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape, k.shape, k.stride(), v.shape, v.stride(), kw.get("scale")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    llama_full(x_batch, causal=True)
    (qs, ks, kstride, vs, vstride, scale), = calls
    r3, s3 = llama_full.pre_core.shape[2], llama_full.post_core.shape[2]
    assert qs == (2, 4, N_TOKENS, r3) and ks == (2, 4, N_TOKENS, r3) and vs == (2, 4, N_TOKENS, s3)
    assert kstride[1] == 0 and vstride[1] == 0  # heads share one K and V (a view, MQA)
    assert scale == pytest.approx(8 ** -0.5)


# ------------------------------------------------------------------ KV cache

@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_kv_cache_decoding_equals_full_causal(llama, x_batch, dtype, tol):
    _, spec, layer, _ = llama
    attn = module_for(layer, spec, ranks=(3, 20, 12), post_ranks=(4, 24, 10), dtype=dtype)
    x = x_batch.to(dtype)
    with torch.no_grad():
        full = attn(x, causal=True)
        y, cache = attn(x[:, :3], causal=True, use_cache=True)  # chunked prefill
        outs = [y]
        for t in range(3, N_TOKENS):
            y, cache = attn(x[:, t:t + 1], cache=cache, causal=True)
            outs.append(y)
            assert isinstance(cache, LatentKVCache) and cache.length == t + 1
    assert attn.kv_cache_width == 12 + 10
    assert cache.k.shape == (2, N_TOKENS, 12) and cache.v.shape == (2, N_TOKENS, 10)
    assert cache.width == attn.kv_cache_width
    assert rel_err(torch.cat(outs, 1).double(), full.double()) <= tol
    # Negative control: decoding with an emptied cache is a different computation.
    with torch.no_grad():
        alone = attn(x[:, -1:], causal=True)
    assert rel_err(alone.double(), full[:, -1:].double()) > 1e-2


# ------------------------------------------------------------------ padding

def test_padding_mask_equals_unpadded(llama_full, x_batch):
    attn = llama_full
    real = 5
    x = x_batch.clone()
    for causal in (False, True):
        # Row 0 right-padded, row 1 left-padded; pad content is garbage.
        mask = torch.zeros(2, N_TOKENS, dtype=torch.bool)
        mask[0, :real] = True
        mask[1, N_TOKENS - real:] = True
        xp = x.clone()
        xp[0, real:] = 100.0
        xp[1, :N_TOKENS - real] = -100.0
        out = attn(xp, attention_mask=mask, causal=causal).detach()
        assert torch.isfinite(out).all()
        ref0 = attn(x[0:1, :real], causal=causal).detach()
        ref1 = attn(x[1:2, N_TOKENS - real:], causal=causal).detach()
        assert rel_err(out[0, :real], ref0[0]) <= 1e-12
        assert rel_err(out[1, N_TOKENS - real:], ref1[0]) <= 1e-12
        # Negative control: without the mask the padded keys leak into real tokens.
        leak = attn(xp, causal=causal).detach()
        assert rel_err(leak[1, N_TOKENS - real:], ref1[0]) > 1e-2


def test_padding_with_cache(llama_full, x_batch):
    """Left-padded prefill, then decoding: real tokens match the unpadded run."""
    attn = llama_full
    pad = 2
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, :pad] = False
    prompt = x_batch[:, :4].clone()
    prompt[1, :pad] = 50.0
    with torch.no_grad():
        _, cache = attn(prompt, attention_mask=mask, causal=True, use_cache=True)
        y, cache = attn(x_batch[:, 4:5], cache=cache, causal=True)
        ref = attn(torch.cat([x_batch[1:2, pad:4], x_batch[1:2, 4:5]], 1), causal=True)
    assert cache.key_mask.shape == (2, 5) and not cache.key_mask[1, :pad].any()
    assert rel_err(y[1], ref[0, -1:]) <= 1e-12


# ------------------------------------------------------------------ latent RoPE

def test_latent_rope_function():
    torch.manual_seed(0)
    q, k = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    rot = lambda v, p: latent_rope(v[None], torch.tensor([p]), 100.0)[0]  # noqa: E731
    # Odd width: the last coordinate is untouched; rotations keep norms.
    assert rot(q, 3)[-1] == q[-1]
    assert torch.allclose(rot(q, 3).norm(), q.norm())
    assert torch.equal(rot(q, 0), q)
    # <R(i) q, R(j) k> depends only on i - j.
    for i, j in [(5, 2), (9, 6), (3, 0)]:
        assert torch.allclose(rot(q, i) @ rot(k, j), rot(q, 3) @ k)
    assert not torch.allclose(rot(q, 5) @ rot(k, 2), q @ k)  # and it does change the logit


def test_latent_rope_relative_positions(llama, x_batch):
    _, spec, layer, _ = llama
    with pytest.warns(UserWarning, match="positional kernel"):
        roped = module_for(layer, spec, ranks=(4, 24, 11), latent_rope=True)
    plain = module_for(layer, spec, ranks=(4, 24, 11))
    assert roped.rope_theta == spec.extras["rope_theta"]
    assert roped.approximation_note == LATENT_ROPE_WARNING
    assert plain.approximation_note == NO_ROPE_WARNING  # a RoPE model run without rotation
    x = x_batch
    zeros = torch.zeros(N_TOKENS, dtype=torch.long)
    ar = torch.arange(N_TOKENS)
    with torch.no_grad():
        assert rel_err(roped(x, positions=zeros), plain(x)) <= 1e-14
        y = roped(x, positions=ar)
        for shift in (5, 1000):
            assert rel_err(roped(x, positions=ar + shift), y) <= 1e-10
        per_row = torch.stack([ar, ar + 17])  # (B, N) positions
        assert rel_err(roped(x, positions=per_row), y) <= 1e-10
        assert rel_err(y, plain(x)) > 1e-3  # rotation is not a no-op
        # Decoding with the cache uses the right absolute positions.
        _, cache = roped(x[:, :4], use_cache=True)
        steps = [roped(x[:, t:t + 1], cache=cache) for t in range(4, N_TOKENS)]
        full = roped(x)  # causal default, positions arange
    assert rel_err(steps[0][0], full[:, 4:5]) <= 1e-12


def test_latent_rope_requires_rope_theta(llama):
    _, spec, layer, _ = llama
    d = spec.as_dict()
    d.update(rope=False, rope_theta=None)
    with pytest.raises(ValueError, match="no RoPE"):
        module_for(layer, ModelSpec.from_dict(d), ranks=(2, 4, 4), latent_rope=True)


@pytest.mark.parametrize("extra,what", [({"softcap": 30.0}, "softcap"), ({"alibi": True}, "ALiBi"),
                                        ({"qk_norm": True}, "qk-norm"), ({"clip_qkv": 8.0}, "clip_qkv")])
def test_unsupported_logit_features_raise(llama, extra, what):
    _, spec, layer, _ = llama
    d = {**spec.as_dict(), **extra}
    with pytest.raises(NotImplementedError, match=what):
        module_for(layer, ModelSpec.from_dict(d), ranks=(2, 4, 4))


# ------------------------------------------------------------------ low rank, structure

def test_low_rank_error_grows_as_ranks_shrink(llama, llama_full, x_batch):
    _, spec, layer, _ = llama
    ref = llama_full(x_batch, causal=True).detach()
    ladder = [(4, 32, 16), (4, 24, 12), (3, 16, 8), (2, 8, 4), (1, 2, 2)]
    errs = []
    for r in ladder:
        attn = module_for(layer, spec, ranks=r)
        errs.append(rel_err(attn(x_batch, causal=True).detach(), ref))
    assert errs[0] <= 1e-10
    assert all(a < b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] > 0.1


class _ShapeSpy(TorchDispatchMode):
    """Records the shape of every tensor produced while active."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_never_forms_dense_head_tensor(llama, x_batch):
    _, spec, layer, _ = llama
    H, d = spec.heads, spec.d
    ranks, post_ranks = (3, 20, 12), (2, 24, 10)
    attn = module_for(layer, spec, ranks=ranks, post_ranks=post_ranks)
    shapes = {n: tuple(p.shape) for n, p in attn.named_parameters()}
    assert shapes == {"pre_core": ranks, "U1": (H, 3), "U2": (d + 1, 20), "U3": (d + 1, 12),
                      "post_core": post_ranks, "V1": (H, 2), "V2": (d, 24), "V3": (d + 1, 10),
                      "out_bias": (d,)}
    # Both Tucker tensors (homogeneous q/k/v sides have d + 1 rows), plus out_bias.
    assert attn.parameter_count() == (tucker_params((H, d + 1, d + 1), ranks)
                                      + tucker_params((H, d, d + 1), post_ranks) + d)
    with _ShapeSpy() as spy:
        attn(x_batch, causal=True)
    big = [s for s in spy.shapes if sum(n >= d for n in s) >= 2 or torch.Size(s).numel() >= H * d * d]
    assert spy.shapes and not big, big
    # Positive control: the dense oracle does form H x d x d, and the spy sees it.
    with _ShapeSpy() as spy:
        rebuild_attention(layer, spec, x_batch[0], True)
    assert any(torch.Size(s).numel() >= H * d * d for s in spy.shapes)


def test_parameters_are_trainable(llama, x_batch):
    _, spec, layer, _ = llama
    attn = module_for(layer, spec, ranks=(2, 8, 4))
    attn(x_batch, causal=True).square().sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_constructor_validates_shapes(llama):
    _, spec, layer, _ = llama
    pre, post = full_rank(layer)
    with pytest.raises(ValueError, match="heads"):
        TuckerAttention(pre.core, pre.factors, post.core[:2], [post.factors[0][:3, :2], *post.factors[1:]], 0.3)
    with pytest.raises(ValueError, match="query factor"):
        bad = [pre.factors[0], torch.cat([pre.factors[1], pre.factors[1][:3]]), pre.factors[2]]
        TuckerAttention(pre.core, bad, post.core, post.factors, 0.3)
    attn = TuckerAttention(pre.core, pre.factors, post.core, post.factors, 0.3)
    with pytest.raises(ValueError, match="input width"):
        attn(torch.zeros(1, 3, 31, dtype=torch.float64))
    text = repr(attn)
    assert "kv_cache_width=" in text and "pre_ranks=(4, 32, 16)" in text


# ------------------------------------------------------------------ from_checkpoint

def test_from_checkpoint_round_trip(llama, tmp_path):
    """Factors written with tucker_format.write_checkpoint, read back by from_checkpoint,
    reproduce transformers' own attention output (full rank, positions 0)."""
    from tuckerctl import tucker_format as tfmt

    model, spec, layer, path = llama
    pre, post = full_rank(layer)
    factors = {tfmt.factor_name(1, t, "core"): tk.core.float() for t, tk in (("pre", pre), ("post", post))}
    for t, tk in (("pre", pre), ("post", post)):
        for part, u in zip(tfmt.PARTS[t][1:], tk.factors):
            factors[tfmt.factor_name(1, t, part)] = u.float()
    factors[f"{tfmt.TENSOR_PREFIX}.1.out_bias"] = layer.out_bias.float()
    info = {"schema": tfmt.SCHEMA, "model": spec.as_dict(), "layers": [{"index": 1}]}
    out = tmp_path / "tucker"
    tfmt.write_checkpoint(out, open_checkpoint(path), set(layer.tensors), factors, info)
    attn = TuckerAttention.from_checkpoint(out, 1, device="cpu")
    assert attn.causal and attn.pre_core.dtype == torch.float32
    ids = torch.randint(0, 64, (2, N_TOKENS))
    x, y = capture_io(model, model.model.layers[1].self_attn, model.model.layers[1].self_attn,
                      dict(input_ids=ids, position_ids=torch.zeros_like(ids)))
    assert rel_err(attn(x.float()).detach().double(), y) <= 1e-5


def test_gpt2_inverse_layer_idx_scale_reaches_the_module(tmp_path_factory, tmp_path):
    """GPT-2 with ``scale_attn_by_inverse_layer_idx`` divides layer i's logits by i + 1:
    a compressed checkpoint read back with from_checkpoint(layer=1), and verify's own
    reference attention, reproduce transformers' layer 1 (full rank, float64)."""
    from tuckerctl.compress import compress
    from tuckerctl.verify import original_attention

    path = tmp_path_factory.mktemp("gpt2-inv")
    cfg = tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                        initializer_range=2 * INIT, attn_implementation="eager", bos_token_id=0,
                        eos_token_id=0, scale_attn_by_inverse_layer_idx=True)
    model = save_tiny(tf.GPT2LMHeadModel, cfg, path)
    attn_module = model.transformer.h[1].attn
    x, y = capture_io(model, attn_module, attn_module, dict(input_ids=torch.randint(0, 64, (2, N_TOKENS))))
    compress(path, tmp_path / "out", ranks="4,33,33", hooi_iters=0, dtype="float32", device="cpu")
    attn = TuckerAttention.from_checkpoint(tmp_path / "out", 1, dtype=torch.float64)
    assert attn.scale == pytest.approx(8 ** -0.5 / 2)
    assert rel_err(attn(x).detach(), y) <= 1e-5
    ckpt = open_checkpoint(path)
    adapter, spec = detect(ckpt)
    layer = adapter.layer(ckpt, spec, 1)
    pre, post = (s.to(dtype=torch.float64) for s in (layer.pre, layer.post))
    _, y_ref = original_attention(pre, post, x[0], spec.layer_scale(1), True, layer.out_bias.double())
    assert rel_err(y_ref, y[0]) <= 1e-5  # transformers ran in float32
    # Negative control: the plain scale (what both used before) is far off at layer 1.
    _, y_plain = original_attention(pre, post, x[0], spec.scale, True, layer.out_bias.double())
    assert rel_err(y_plain, y[0]) > 1e-2
    with pytest.raises(ValueError, match="pass layer=i"):
        TuckerAttention.from_tucker(*full_rank(layer), spec)


# ------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_gpu_matches_cpu(llama, x_batch, dtype, tol):
    _, spec, layer, _ = llama
    want = rebuild_attention(layer, spec, x_batch[0], True)
    cpu = module_for(layer, spec, dtype=dtype)
    gpu = module_for(layer, spec, dtype=dtype).to("cuda")
    with torch.no_grad():
        y_cpu = cpu(x_batch.to(dtype), causal=True)
        y_gpu = gpu(x_batch.to(dtype).cuda(), causal=True).cpu()
        assert rel_err(y_gpu[0].double(), want) <= tol
        assert rel_err(y_gpu.double(), y_cpu.double()) <= tol
        _, cache = gpu(x_batch.to(dtype).cuda()[:, :4], causal=True, use_cache=True)
        step, _ = gpu(x_batch.to(dtype).cuda()[:, 4:5], cache=cache, causal=True)
    assert rel_err(step.cpu().double(), y_cpu[:, 4:5].double()) <= tol
