"""tuckerctl export: the exported directory loads with plain transformers in a process that
never imports tuckerctl and gives the patched model's outputs; the compressed directory
itself is refused by transformers instead of loading with random attention."""

import json
import subprocess
import sys

import pytest
import torch
from test_patch import CEILING, inputs, outputs, source

import tuckerctl
from tuckerctl.compress import compress
from tuckerctl.export import export

# Runs in a fresh interpreter: loads the directory with transformers only, prints outputs as JSON.
CHILD = r"""
import json, sys, torch, transformers as tf
path, kind, ids, mask = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
cls = {"lm": tf.AutoModelForCausalLM, "base": tf.AutoModel}[kind]
model = cls.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
y = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
assert not any(m.startswith("tuckerctl") for m in sys.modules)
print(json.dumps(y.tolist()))
"""


def run_child(path, kind, kw):
    res = subprocess.run([sys.executable, "-c", CHILD, str(path), kind, json.dumps(kw["input_ids"].tolist()),
                          json.dumps(kw["attention_mask"].tolist())], capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    return torch.tensor(json.loads(res.stdout))


@pytest.mark.parametrize("name,ranks,kind", [
    ("llama_gqa_bias", CEILING, "lm"),
    ("qwen3", "1,20,16", "lm"),  # qk-norm, truncated query/key subspaces (exactly materialised)
    ("gpt2_lm", CEILING, "lm"),  # fused Conv1D, tucker structure
    ("bert_mlm", CEILING, "base"),
])
def test_exported_directory_loads_without_tuckerctl_and_matches_the_patched_model(name, ranks, kind,
                                                                                  tmp_path_factory, tmp_path):
    original, path = source(name, tmp_path_factory)
    compress(path, tmp_path / "out", ranks=ranks, ranks_post=CEILING, hooi_iters=0, device="cpu", dtype="float32")
    doc = export(tmp_path / "out", tmp_path / "hf")
    assert doc["max_export_error"] <= 1e-6  # value-output at its ceiling: the split is exact (float32 factors)
    model = type(original).from_pretrained(path, attn_implementation="eager").eval()
    tuckerctl.patch(model, tmp_path / "out")
    kw, valid = inputs(model)
    want = outputs(model, kw)
    if kind == "base" and hasattr(model, "bert"):
        with torch.no_grad():
            want = model.bert(**kw).last_hidden_state
    got = run_child(tmp_path / "hf", kind, kw)
    assert float((got - want)[valid].abs().max() / want[valid].abs().max()) <= 2e-6


@pytest.mark.parametrize("name", ["gpt_neox", "falcon_40b", "falcon_7b", "falcon_rw_alibi", "bloom"])
def test_grouped_fused_layouts_export_exactly_at_the_ceilings(name, tmp_path_factory, tmp_path):
    """GPT-NeoX, Falcon (GQA, MQA, ALiBi) and Bloom store q/k/v interleaved per KV group: the
    exported fused tensor loads in transformers and gives the original model's logits
    (ceiling ranks, so exact to float32 rounding; both models run by transformers)."""
    original, path = source(name, tmp_path_factory)
    compress(path, tmp_path / "out", ranks=CEILING, ranks_post=CEILING, hooi_iters=0, device="cpu",
             dtype="float32")
    doc = export(tmp_path / "out", tmp_path / "hf")
    assert doc["max_export_error"] <= 1e-6
    impl = original.config._attn_implementation
    reference = type(original).from_pretrained(path, attn_implementation=impl).eval()
    exported = type(original).from_pretrained(tmp_path / "hf", attn_implementation=impl).eval()
    kw, valid = inputs(reference)
    want, got = outputs(reference, kw)[valid], outputs(exported, kw)[valid]
    assert float((got - want).abs().max() / want.abs().max()) <= 2e-6


def test_truncated_value_output_reports_the_split_error(tmp_path_factory, tmp_path):
    # MHA with the head mode of the value-output tensor truncated: each head's map mixes two core
    # slices, of rank up to 32 > d_h = 8, which the stock architecture cannot hold.
    _, path = source("llama_mha", tmp_path_factory)
    compress(path, tmp_path / "out", ranks=CEILING, ranks_post="2,32,32", device="cpu", dtype="float32")
    doc = export(tmp_path / "out", tmp_path / "hf")
    # Oracle: per head, the best rank-8 (d_h) approximation of the dense value-output map
    # V2 (sum_j V1[h, j] core_j) V3^T (Eckart-Young); the error is the dropped energy.
    tk, want = tuckerctl.load(tmp_path / "out"), 0.0
    for i in tk.layers:
        V1, V2, V3 = (t.double() for t in tk.layer(i).post_factors)
        dense = torch.einsum("hj,jab,ma,nb->hmn", V1, tk.layer(i).post_core.double(), V2, V3)
        s = torch.linalg.svdvals(dense)
        want = max(want, float((s[:, 8:] ** 2).sum() / (s ** 2).sum()) ** 0.5)
    assert want > 1e-3 and doc["max_export_error"] == pytest.approx(want, rel=1e-6)


def test_compressed_directory_is_refused_by_transformers(tmp_path_factory, tmp_path):
    _, path = source("mistral", tmp_path_factory)
    compress(path, tmp_path / "out", ranks=CEILING, device="cpu")
    res = subprocess.run([sys.executable, "-c", "import sys, transformers as tf; "
                          "tf.AutoModelForCausalLM.from_pretrained(sys.argv[1])", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "tuckerctl" in res.stderr


def _tree(root):
    """Every path under ``root`` with its bytes (files) or None (directories)."""
    return {p.relative_to(root): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_export_output_is_claimed_before_any_work(tmp_path_factory, tmp_path):
    from tuckerctl.errors import InputError

    _, path = source("llama_gqa_bias", tmp_path_factory)
    compress(path, tmp_path / "out", ranks=CEILING, hooi_iters=0, device="cpu", dtype="float32")
    unrelated = tmp_path / "mine"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("not tuckerctl's")
    before = _tree(tmp_path)
    for target, overwrite in [(tmp_path / "out", True), (tmp_path / "out" / "hf", True), (tmp_path, True),
                              (unrelated, True), (unrelated, False), (tmp_path / "out" / "config.json", True)]:
        with pytest.raises(InputError):
            export(tmp_path / "out", target, overwrite=overwrite)
        assert _tree(tmp_path) == before, target  # nothing of the input, or anything else, touched
    export(tmp_path / "out", tmp_path / "hf")
    with pytest.raises(InputError, match=r"already exists \(use overwrite=True to replace it\)"):
        export(tmp_path / "out", tmp_path / "hf")
    first = _tree(tmp_path / "hf")
    export(tmp_path / "out", tmp_path / "hf", overwrite=True)  # an earlier export may be replaced
    assert _tree(tmp_path / "hf").keys() == first.keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "mine", "out"]  # no temp or backup left
