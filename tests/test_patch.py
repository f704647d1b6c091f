"""tuckerctl.patch: compressed checkpoints at the ceiling ranks run inside transformers'
own models and reproduce the original model's outputs (RoPE, qk-norm, biases, GQA,
softcap, partial rotary, fused layouts), with real positions, padding and the KV cache."""

from __future__ import annotations

import pytest
import test_adapters_encoders as enc
import test_adapters_fused as fused
import test_adapters_llama as llama
import torch
import transformers as tf
from oracle import build_case, save_tiny

import tuckerctl
from tuckerctl.compress import compress
from tuckerctl.errors import InputError

CEILING = "100000,100000,100000"
# Decoders: the tiny builders of the adapter tests (eager attention, random norm gains/biases).
DECODERS = ["llama_gqa_bias", "llama_mqa_bias", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
            "olmo2", "starcoder2"]
FUSED = ["phi3", "gpt2_lm", "gpt_neox"]
ENCODERS = ["bert_mlm", "roberta", "vit", "opt"]


def _olmo(tmp_path_factory):
    cfg = tf.OlmoConfig(**llama.COMMON, num_attention_heads=4, num_key_value_heads=4)  # no clip_qkv
    path = tmp_path_factory.mktemp("olmo_noclip")
    return save_tiny(tf.OlmoForCausalLM, cfg, path), path


def source(name, tmp_path_factory):
    if name == "olmo":
        return _olmo(tmp_path_factory)
    if name in llama.CASES:
        return llama.build(name, tmp_path_factory)
    cases = fused.CASES if name in fused.CASES else enc.CASES
    return build_case(cases, name, tmp_path_factory)


def inputs(model, batch=2, n=9, pad=3):
    """Random tokens (or images) with left padding on the second row."""
    g = torch.Generator().manual_seed(3)
    cfg = model.config
    if getattr(cfg, "model_type", "") in ("vit", "deit"):
        return {"pixel_values": torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g)}, None
    vocab = getattr(cfg, "vocab_size", None) or cfg.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (batch, n), generator=g)
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[1, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}, mask.bool()


def outputs(model, kw):
    with torch.no_grad():
        out = model(**kw, output_hidden_states=True)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def check_patched(name, tmp_path_factory, tmp_path, impl="eager"):
    original, path = source(name, tmp_path_factory)
    # OPT reshapes with a fixed head count: only the per-head (qk_input) structure fits it
    structure = "qk-input" if name == "opt" else "auto"
    compress(path, tmp_path / "out", ranks=CEILING, hooi_iters=0, device="cpu", dtype="float32",
             structure=structure)
    model = type(original).from_pretrained(path, attn_implementation=impl).eval()
    reference = type(original).from_pretrained(path, attn_implementation=impl).eval()
    tuckerctl.patch(model, tmp_path / "out")
    kw, valid = inputs(model)
    a, b = outputs(reference, kw), outputs(model, kw)
    if valid is not None:  # outputs at padded positions are meaningless in both
        a, b = a[valid], b[valid]
    err = float((a - b).abs().max() / a.abs().max())
    assert err <= 2e-6, f"{name}: max relative deviation {err:.2e}"
    return reference, model, kw


@pytest.mark.parametrize("name", DECODERS + ["olmo"] + FUSED + ENCODERS)
def test_patched_model_reproduces_the_original_at_the_ceilings(name, tmp_path_factory, tmp_path):
    check_patched(name, tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name,impl", [("llama_gqa_bias", "sdpa"), ("qwen3", "sdpa"), ("gemma2", "eager"),
                                       ("gpt2_lm", "sdpa")])
def test_greedy_generate_equals_the_original(name, impl, tmp_path_factory, tmp_path):
    reference, model, kw = check_patched(name, tmp_path_factory, tmp_path, impl=impl)
    g0 = reference.generate(**kw, max_new_tokens=6, do_sample=False)
    g1 = model.generate(**kw, max_new_tokens=6, do_sample=False)
    assert torch.equal(g0, g1)


def test_patch_uses_the_factorised_modules(tmp_path_factory, tmp_path):
    """Not a weight copy: the patched projections are the latent ones, of the compressed widths."""
    original, path = source("llama_gqa_bias", tmp_path_factory)
    compress(path, tmp_path / "out", ranks="1,20,10", ranks_post="2,12,6", device="cpu", dtype="float32")
    model = type(original).from_pretrained(path).eval()
    tuckerctl.patch(model, tmp_path / "out")
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.down.out_features == 20 and attn.k_proj.down.out_features == 10
    assert attn.v_proj.down.out_features == 12  # latent value 6, padded to a multiple of d_h = 12
    kw, valid = inputs(model)
    assert torch.isfinite(outputs(model, kw)[valid]).all()


def test_patch_refuses_a_mismatched_model(tmp_path_factory, tmp_path):
    _, path = source("qwen2", tmp_path_factory)
    other, _ = source("mistral", tmp_path_factory)
    compress(path, tmp_path / "out", ranks=CEILING, device="cpu")
    with pytest.raises(InputError, match="compressed from a 'qwen2' model"):
        tuckerctl.patch(other, tmp_path / "out")


def test_tucker_structure_on_rope_model_is_refused(tmp_path_factory, tmp_path):
    original, path = source("mistral", tmp_path_factory)
    compress(path, tmp_path / "out", ranks=CEILING, device="cpu", structure="tucker")
    with pytest.raises(InputError, match="latent RoPE is an approximation"):
        tuckerctl.patch(original, tmp_path / "out")
