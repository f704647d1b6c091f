"""tuckerctl.patch on real weights: SmolLM2-135M (GGUF, RoPE, GQA) and MiniLM (BERT)."""

import copy

import pytest
import torch
from realmodels import MINILM, SMOL, needs_minilm, needs_smol
from test_export import run_child

import tuckerctl
from tuckerctl.export import export

PROSE = "The quick brown fox jumps over the lazy dog because it wants to reach the river before dark."


@needs_smol
@pytest.mark.slow
def test_smollm2_patched_at_the_ceilings_equals_the_original_and_generates_the_same(smollm2_full_rank, tmp_path):
    import transformers as tf

    src, out, _ = smollm2_full_rank  # the ceilings 9,576,192, no HOOI
    gguf = src.name
    tok = tf.AutoTokenizer.from_pretrained(SMOL, gguf_file=gguf)
    original = tf.AutoModelForCausalLM.from_pretrained(SMOL, gguf_file=gguf, dtype=torch.float32).eval()
    model = copy.deepcopy(original)  # the same weights without dequantising the GGUF file a second time
    tuckerctl.patch(model, out)
    ids = tok(PROSE, return_tensors="pt")
    with torch.no_grad():
        a, b = original(**ids).logits, model(**ids).logits
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-5
    g0 = original.generate(**ids, max_new_tokens=16, do_sample=False)
    g1 = model.generate(**ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(g0, g1) and g1.shape[1] == ids["input_ids"].shape[1] + 16
    # export: a plain transformers directory, loaded in a process without tuckerctl
    doc = export(out, tmp_path / "hf")
    assert doc["max_export_error"] <= 1e-5
    got = run_child(tmp_path / "hf", "lm", ids)
    assert float((got - b).abs().max() / b.abs().max()) <= 1e-5
    assert (tmp_path / "hf" / "tokenizer.json").is_file() or (tmp_path / "hf" / "tokenizer_config.json").is_file()


@needs_minilm
def test_minilm_patched_at_the_ceilings_equals_the_original(minilm_full_rank):
    import transformers as tf

    _, out, _ = minilm_full_rank  # 12,385,385: clamped to the ceilings, no HOOI
    tok = tf.AutoTokenizer.from_pretrained(MINILM / "model")
    original = tf.AutoModel.from_pretrained(MINILM / "model").eval()
    model = copy.deepcopy(original)
    tuckerctl.patch(model, out)
    batch = tok([PROSE, "A short one."], return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = original(**batch).last_hidden_state, model(**batch).last_hidden_state
    valid = batch["attention_mask"].bool()
    assert float((a - b)[valid].abs().max() / a[valid].abs().max()) <= 1e-5
