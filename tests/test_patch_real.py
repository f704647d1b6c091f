"""tuckerctl.patch on real weights: SmolLM2-135M (GGUF, RoPE, GQA) and MiniLM (BERT)."""

import pytest
import torch
from test_export import run_child
from test_real_checkpoints import MINILM, SMOL, needs_minilm, needs_smol

import tuckerctl
from tuckerctl.compress import compress
from tuckerctl.export import export

CEILING = "100000,100000,100000"
PROSE = "The quick brown fox jumps over the lazy dog because it wants to reach the river before dark."


@needs_smol
@pytest.mark.slow
def test_smollm2_patched_at_the_ceilings_equals_the_original_and_generates_the_same(tmp_path):
    import transformers as tf

    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    compress(SMOL / gguf, tmp_path / "out", ranks=CEILING, hooi_iters=0, device="cpu")
    tok = tf.AutoTokenizer.from_pretrained(SMOL, gguf_file=gguf)
    original = tf.AutoModelForCausalLM.from_pretrained(SMOL, gguf_file=gguf, dtype=torch.float32).eval()
    model = tf.AutoModelForCausalLM.from_pretrained(SMOL, gguf_file=gguf, dtype=torch.float32).eval()
    tuckerctl.patch(model, tmp_path / "out")
    ids = tok(PROSE, return_tensors="pt")
    with torch.no_grad():
        a, b = original(**ids).logits, model(**ids).logits
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-5
    g0 = original.generate(**ids, max_new_tokens=16, do_sample=False)
    g1 = model.generate(**ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(g0, g1) and g1.shape[1] == ids["input_ids"].shape[1] + 16
    # export: a plain transformers directory, loaded in a process without tuckerctl
    doc = export(tmp_path / "out", tmp_path / "hf")
    assert doc["max_export_error"] <= 1e-5
    got = run_child(tmp_path / "hf", "lm", ids)
    assert float((got - b).abs().max() / b.abs().max()) <= 1e-5
    assert (tmp_path / "hf" / "tokenizer.json").is_file() or (tmp_path / "hf" / "tokenizer_config.json").is_file()


@needs_minilm
def test_minilm_patched_at_the_ceilings_equals_the_original(tmp_path):
    import transformers as tf

    compress(MINILM / "model", tmp_path / "out", ranks=CEILING, hooi_iters=0, device="cpu")
    tok = tf.AutoTokenizer.from_pretrained(MINILM / "model")
    original = tf.AutoModel.from_pretrained(MINILM / "model").eval()
    model = tf.AutoModel.from_pretrained(MINILM / "model").eval()
    tuckerctl.patch(model, tmp_path / "out")
    batch = tok([PROSE, "A short one."], return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = original(**batch).last_hidden_state, model(**batch).last_hidden_state
    valid = batch["attention_mask"].bool()
    assert float((a - b)[valid].abs().max() / a[valid].abs().max()) <= 1e-5
