"""tuckerctl heal: layer-wise distillation of the Tucker factors on a tiny Llama, and the
end-to-end pass on the next-token KL divergence (``--kl-steps``).

Oracles: the original model's own attention outputs (transformers, captured by hooks)
against the healed checkpoint run through ``tuckerctl.patch`` (the inference path,
independent of the training modules); raw safetensors bytes for everything heal must
not touch. Text: Python's ``pydoc_data/topics.py`` prose (tests/textdata.py), healing on the
calibration topics, measuring on the disjoint evaluation topics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from oracle import assert_user_error, capture, rel_err, run_cli
from textdata import save_tiny_lm, write_texts

import tuckerctl
from tuckerctl.compress import compress
from tuckerctl.heal import _orthonormal, factor_tensors, heal, heal_end_to_end, retract, student_attention
from tuckerctl.tucker_format import TENSOR_PREFIX, load
from tuckerctl.verify import verify

RANKS, RANKS_POST = "8,20,10", "4,20,10"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir with a character tokenizer, its compressed checkpoint, healing text file, eval ids):
    a 2-layer GQA Llama with anisotropic inputs (so that real hidden states matter)."""
    root = tmp_path_factory.mktemp("heal")
    src = root / "model"
    save_tiny_lm(src)
    text, evaluation = write_texts(root)
    comp = root / "compressed"
    compress(src, comp, ranks=RANKS, ranks_post=RANKS_POST, device="cpu", dtype="float32")
    tokenizer = tf.AutoTokenizer.from_pretrained(src)
    eval_ids = torch.tensor(tokenizer(evaluation.read_text()[:1024])["input_ids"][:256]).reshape(1, -1)
    return src, comp, text, eval_ids


def attention_errors(src, ckpt, ids) -> list[float]:
    """Per layer: relative error of the patched model's attention output against the
    original's, each on the ORIGINAL model's hidden states (teacher inputs)."""
    original = tf.LlamaForCausalLM.from_pretrained(src).eval()
    patched = tuckerctl.patch(tf.LlamaForCausalLM.from_pretrained(src).eval(), ckpt)
    errs = []
    for i, layer in enumerate(original.model.layers):
        x, y = capture(original, layer.self_attn, {"input_ids": ids})
        seen: dict = {}
        h = original.model.layers[i].self_attn.register_forward_hook(
            lambda m, a, kw, out, seen=seen: seen.update(kw=kw), with_kwargs=True)
        with torch.no_grad():
            original(input_ids=ids)
        h.remove()
        kw = {k: v for k, v in seen["kw"].items() if k in ("position_embeddings", "attention_mask")}
        with torch.no_grad():
            y_hat = patched.model.layers[i].self_attn(hidden_states=x[None].float(), **kw)[0][0]
        errs.append(rel_err(y_hat.double(), y))
    return errs


@pytest.fixture(scope="module")
def healed(tiny, tmp_path_factory):
    src, comp, text, _ = tiny
    out = tmp_path_factory.mktemp("healed") / "out"
    record = heal(comp, src, text, out, tokens=3072, steps=40, seq_len=128, batch=2, device="cpu")
    return out, record


HEAL = dict(tokens=3072, seq_len=128, batch=2, device="cpu")


@pytest.fixture(scope="module")
def healed_kl(tiny, tmp_path_factory):
    """Layer-wise (the same settings as ``healed``) followed by the end-to-end KL pass."""
    src, comp, text, _ = tiny
    out = tmp_path_factory.mktemp("healed_kl") / "out"
    return out, heal(comp, src, text, out, steps=40, kl_steps=30, kl_lr=0.01, **HEAL)


@pytest.fixture(scope="module")
def kl_only(tiny, tmp_path_factory):
    """The end-to-end pass alone, from the compressed checkpoint's own factors."""
    src, comp, text, _ = tiny
    out = tmp_path_factory.mktemp("kl_only") / "out"
    return out, heal(comp, src, text, out, steps=0, kl_steps=30, kl_lr=0.01, **HEAL)


def held_out_windows(src, text) -> torch.Tensor:
    """The windows heal holds out with HEAL's settings (every 8th of 128 tokens), tokenised afresh."""
    tokenizer = tf.AutoTokenizer.from_pretrained(src)
    ids = torch.tensor(tokenizer(Path(text).read_text(), add_special_tokens=False)["input_ids"][:3072]).reshape(-1, 128)
    return ids[7::8]


def next_token_kl(src, ckpt, ids) -> float:
    """Mean KL(original || patched ckpt) of the next-token distributions, in float64, over the
    positions that have a next token (the eval convention)."""
    original = tf.LlamaForCausalLM.from_pretrained(src).eval()
    patched = tuckerctl.patch(tf.LlamaForCausalLM.from_pretrained(src).eval(), ckpt)
    with torch.no_grad():
        p = torch.log_softmax(original(input_ids=ids).logits[:, :-1].double(), -1)
        q = torch.log_softmax(patched(input_ids=ids).logits[:, :-1].double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_student_is_the_patched_attention_and_retraction_keeps_it(tiny):
    """The trainable modules compute what tuckerctl.patch installs; the QR retraction leaves the
    function unchanged and the factors orthonormal."""
    src, comp, _, ids = tiny
    original = tf.LlamaForCausalLM.from_pretrained(src).eval()
    patched = tuckerctl.patch(tf.LlamaForCausalLM.from_pretrained(src).eval(), comp)
    layer = load(comp).layer(1)
    student = student_attention(original.model.layers[1].self_attn, layer, 64, 16)
    x = torch.randn(1, 12, 64)
    pos = original.model.rotary_emb(x, torch.arange(12)[None])
    with torch.no_grad():
        a = patched.model.layers[1].self_attn(hidden_states=x, position_embeddings=pos, attention_mask=None)[0]
        b = student(hidden_states=x, position_embeddings=pos, attention_mask=None)[0]
        assert rel_err(b, a) < 1e-5
        # perturb off the manifold, then retract: same output as before the retraction, orthonormal factors
        for p in student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p) * p.abs().mean())
        before = student(hidden_states=x, position_embeddings=pos, attention_mask=None)[0]
        retract(student)
        after = student(hidden_states=x, position_embeddings=pos, attention_mask=None)[0]
    assert rel_err(after, before) < 1e-5
    for U in (student.q_proj.down.U, student.k_proj.down.U, student.v_proj.U, student.o_proj.output,
              student.o_proj.head):
        eye = torch.eye(U.shape[1])
        assert float((U.T @ U - eye).detach().abs().max()) < 1e-5
    Q, R = _orthonormal(torch.randn(9, 4))
    assert (torch.diagonal(R) > 0).all()


def test_healing_reduces_the_layer_output_loss(tiny, healed):
    """Measured independently through tuckerctl.patch on held-out (evaluation) text: each layer's
    attention output is closer to the original's after healing."""
    src, comp, _, ids = tiny
    out, record = healed
    before, after = attention_errors(src, comp, ids), attention_errors(src, out, ids)
    assert all(a < b for a, b in zip(after, before)), (before, after)
    for layer in record["layers"]:
        assert layer["val_loss_final"] < layer["val_loss_initial"]


def test_healing_improves_a_calibrated_checkpoint(tiny, tmp_path):
    """Calibrated compression stores oblique (non-orthonormal) factors: the gauge is fixed by a
    first retraction, and healing still lowers every layer's held-out loss."""
    src, _, text, _ = tiny
    comp = tmp_path / "calibrated"
    compress(src, comp, ranks=RANKS, ranks_post=RANKS_POST, device="cpu", dtype="float32", calibrate=text,
             calib_tokens=2048)
    rec = heal(comp, src, text, tmp_path / "out", tokens=2048, steps=30, seq_len=128, batch=2, device="cpu")
    for layer in rec["layers"]:
        assert layer["val_loss_final"] < layer["val_loss_initial"]


@pytest.mark.slow
def test_healing_loss_decreases_in_expectation_over_seeds(tiny, tmp_path):
    """Over several seeds (window orders), the held-out loss averaged across seeds decreases
    from each validation point to the next, and every run ends below where it started."""
    src, comp, text, _ = tiny
    curves = []
    for seed in range(3):
        rec = heal(comp, src, text, tmp_path / f"s{seed}", tokens=2048, steps=30, seq_len=128, batch=2,
                   device="cpu", seed=seed)
        for layer in rec["layers"]:
            assert layer["val_loss_final"] < layer["val_loss_initial"]
            curves.append([v for _, v in layer["val_curve"]])
    mean = torch.tensor(curves).mean(0)
    assert (mean[1:] < mean[:-1]).all(), mean


@pytest.mark.parametrize("variant", ["healed", "healed_kl", "kl_only"])
def test_heal_touches_only_the_trained_factors(tiny, variant, request):
    """Every other tensor is byte-identical to the compressed input; the trained ones keep their
    names, shapes and dtypes (same structure and ranks); layer-wise, end to end and both."""
    _, comp, _, _ = tiny
    out, _ = request.getfixturevalue(variant)
    a, b = load(comp).ckpt, load(out).ckpt
    assert sorted(a.names()) == sorted(b.names())
    trained = {"query", "key", "query_heads", "key_groups", "core", "head", "output", "value"}
    changed = []
    for name in a.names():
        assert a.shape(name) == b.shape(name) and a.dtype(name) == b.dtype(name), name
        if a.raw_bytes(name) != b.raw_bytes(name):
            changed.append(name)
    assert changed and all(n.startswith(TENSOR_PREFIX) and n.rsplit(".", 1)[1] in trained for n in changed)
    untouched = [n for n in a.names() if not n.startswith(TENSOR_PREFIX)]
    assert untouched and not set(untouched) & set(changed)


@pytest.mark.parametrize("variant", ["healed", "healed_kl", "kl_only"])
def test_healed_checkpoint_round_trips(tiny, variant, request):
    """load, verify and the metadata record of the healing; factors stay orthonormal."""
    src, _, text, _ = tiny
    out, record = request.getfixturevalue(variant)
    tk = load(out)
    info = tk.info["healing"]
    assert info == json.loads(json.dumps(record))
    assert info["text"]["sha256"] == __import__("hashlib").sha256(Path(text).read_bytes()).hexdigest()
    assert info["text"]["tokens"] == 3072
    if variant == "kl_only":
        assert info["steps"] == 0 and info["layers"] == [] and info["loss"] is None
    else:
        assert info["steps"] == 40 and len(info["layers"]) == 2
        assert info["loss"]["val_final_mean"] < info["loss"]["val_initial_mean"]
    e2e = info["end_to_end"]
    if variant == "healed":
        assert e2e is None
    else:
        assert e2e["steps"] == 30 and e2e["lr"] == 0.01 and e2e["val_kl_final"] < e2e["val_kl_initial"]
    json.dumps(tk.info, allow_nan=False)
    for i in tk.layers:
        layer = tk.layer(i)
        for U in (layer.pre_factors[1], layer.pre_factors[2], *layer.post_factors):
            assert float((U.T @ U - torch.eye(U.shape[1])).abs().max()) < 1e-4
    doc = verify(out, src, device="cpu")
    assert doc["passed"] is None and all(torch.isfinite(torch.tensor(r["output_rel_error"])) for r in doc["layers"])


def test_cli_heal_and_its_errors(tiny, tmp_path):
    src, comp, text, _ = tiny
    res = run_cli("heal", comp, "--against", src, "--text", text, "-o", tmp_path / "h", "--tokens", "1024",
                  "--steps", "3", "--seq-len", "128", "--json", "--device", "cpu")
    assert res.code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schema"] == "tuckerctl.heal/1" and doc["steps"] == 3
    for args, needle in (([comp, "--against", src, "--text", tmp_path / "none.txt", "-o", tmp_path / "x"],
                          "none.txt"),
                         ([comp, "--against", src, "--text", text, "-o", tmp_path / "h"], "already exists"),
                         ([comp, "--against", src, "--text", text, "-o", src / "inside"], "input"),
                         ([src, "--against", src, "--text", text, "-o", tmp_path / "y"], "not a tuckerctl")):
        assert_user_error(run_cli("heal", *args), needle)


def test_interrupted_heal_leaves_nothing(tiny, tmp_path, monkeypatch):
    src, comp, text, _ = tiny
    import tuckerctl.heal as module

    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = module.heal_layer
    monkeypatch.setattr(module, "heal_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        heal(comp, src, text, tmp_path / "out", tokens=1024, steps=2, seq_len=128, device="cpu")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("variant", ["healed", "healed_kl"])
def test_healed_checkpoint_exports_to_the_stock_architecture(tiny, variant, request, tmp_path):
    """export reads a healed checkpoint like any other: the folder loads with plain transformers
    and, where export reports no split error, gives the patched healed model's logits."""
    from tuckerctl.export import export

    src, _, _, ids = tiny
    out, _ = request.getfixturevalue(variant)
    doc = export(out, tmp_path / "hf")
    stock = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    patched = tuckerctl.patch(tf.LlamaForCausalLM.from_pretrained(src).eval(), out)
    with torch.no_grad():
        got, want = stock(input_ids=ids).logits, patched(input_ids=ids).logits
    assert torch.isfinite(got).all()
    if doc["max_export_error"] <= 1e-6:
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
    else:  # the head mode of the value-output tensor was truncated: export says by how much
        assert rel_err(got.double(), want.double()) < 1.0


def test_heal_output_and_options_refused_before_any_work(tiny, tmp_path, monkeypatch):
    import tuckerctl.heal as module

    def never(*a, **k):
        raise AssertionError("heal ran although its arguments are refused")

    monkeypatch.setattr(module, "heal", never)
    src, comp, text, _ = tiny
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not tuckerctl's")
    base = [comp, "--against", src, "--text", text]
    for args, needle in (([*base, "-o", comp / "inside"], "input"), ([*base, "-o", src], "input"),
                         ([*base, "-o", tmp_path / "mine", "--overwrite"], "mine"),
                         ([*base, "-o", tmp_path / "y", "--steps", "0"], "--steps"),
                         ([*base, "-o", tmp_path / "y", "--steps", "0", "--kl-steps", "0"], "--steps"),
                         ([*base, "-o", tmp_path / "y", "--steps", "-1", "--kl-steps", "3"], "--steps"),
                         ([*base, "-o", tmp_path / "y", "--kl-steps", "-2"], "--kl-steps"),
                         ([*base, "-o", tmp_path / "y", "--kl-steps", "2", "--kl-lr", "0"], "--kl-lr"),
                         ([*base, "-o", tmp_path / "y", "--kl-steps", "2", "--kl-lr", "inf"], "--kl-lr"),
                         ([*base, "-o", tmp_path / "y", "--lr", "nan"], "--lr")):
        res = run_cli("heal", *args)
        assert_user_error(res, needle)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "not tuckerctl's" and not (tmp_path / "y").exists()


def test_end_to_end_pass_lowers_the_next_token_kl(tiny, healed, healed_kl, kl_only):
    """Measured independently (tuckerctl.patch on the written checkpoints, float64 KL against the
    original transformers model): on heal's held-out windows the recorded KLs are the real ones,
    the pass starts where the layer-wise one ended and lowers the KL; on the disjoint evaluation
    text it lowers the KL too, after the layer-wise pass and on its own."""
    src, comp, text, ids = tiny
    val = held_out_windows(src, text)
    e2e, alone = healed_kl[1]["end_to_end"], kl_only[1]["end_to_end"]
    layerwise = next_token_kl(src, healed[0], val)
    assert e2e["val_kl_initial"] == pytest.approx(layerwise, rel=1e-4)
    assert e2e["val_kl_final"] == pytest.approx(next_token_kl(src, healed_kl[0], val), rel=1e-4)
    assert alone["val_kl_initial"] == pytest.approx(next_token_kl(src, comp, val), rel=1e-4)
    assert alone["val_kl_final"] == pytest.approx(next_token_kl(src, kl_only[0], val), rel=1e-4)
    assert e2e["val_kl_final"] < 0.9 * e2e["val_kl_initial"] and alone["val_kl_final"] < 0.9 * alone["val_kl_initial"]
    held_out = ids.reshape(2, 128)
    assert next_token_kl(src, healed_kl[0], held_out) < next_token_kl(src, healed[0], held_out)
    assert next_token_kl(src, kl_only[0], held_out) < next_token_kl(src, comp, held_out)


def test_end_to_end_pass_trains_only_the_factors_and_keeps_the_best_iterate(tiny):
    """In memory: the original model's weights (shared with the student) are bit-identical after
    the pass; only the factor tensors move; a step size far too large is caught by the best-iterate
    rule (the factors come back exactly as they went in, after the initial retraction)."""
    src, comp, text, _ = tiny
    from tuckerctl.heal import _windows

    model = tf.LlamaForCausalLM.from_pretrained(src).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tk = load(comp)
    attn = {i: student_attention(model.model.layers[i].self_attn, tk.layer(i), 64, 16) for i in tk.layers}
    for m in attn.values():
        retract(m)
    start = {i: {k: v.detach().clone() for k, v in factor_tensors(m).items()} for i, m in attn.items()}
    tokenizer = tf.AutoTokenizer.from_pretrained(src)
    ids = torch.tensor(tokenizer(Path(text).read_text(), add_special_tokens=False)["input_ids"][:1024])
    train, val = _windows(ids, 128, 2)
    rec = heal_end_to_end(model, attn, train, val, steps=6, lr=0.01)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert rec["val_kl_final"] <= rec["val_kl_initial"]
    assert any(not torch.equal(start[i][k], v) for i, m in attn.items() for k, v in factor_tensors(m).items())
    rec = heal_end_to_end(model, attn, train, val, steps=3, lr=1e4)  # diverges: the input is kept
    assert rec["best_step"] == 0 and rec["val_kl_final"] == rec["val_kl_initial"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_interrupted_end_to_end_pass_leaves_nothing(tiny, tmp_path, monkeypatch):
    src, comp, text, _ = tiny
    import tuckerctl.heal as module

    calls = []
    real = module._kl_sum

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "_kl_sum", interrupted)
    with pytest.raises(KeyboardInterrupt):
        heal(comp, src, text, tmp_path / "out", tokens=1024, steps=1, kl_steps=5, seq_len=128, device="cpu")
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []


def test_healing_a_healed_checkpoint_keeps_the_earlier_record(tiny, healed, tmp_path):
    """An end-to-end pass run on a layer-wise healed checkpoint (what benchmarks/heal_smollm2.py
    does) starts from its factors and keeps its healing record under ``previous``."""
    src, _, text, _ = tiny
    out, first = healed
    rec = heal(out, src, text, tmp_path / "again", steps=0, kl_steps=3, **HEAL)
    info = load(tmp_path / "again").info
    assert info["healing"]["previous"] == json.loads(json.dumps(first))
    assert sum("healed (tuckerctl heal)" in n for n in info["notes"]) == 1
    assert rec["end_to_end"]["val_kl_final"] <= rec["end_to_end"]["val_kl_initial"]


def test_heal_function_refuses_bad_end_to_end_values(tiny, tmp_path):
    from oracle import one_line_error

    src, comp, text, _ = tiny
    for kwargs, needle in (({"kl_steps": -1}, "kl_steps: -1"),
                           ({"steps": 0}, "steps: 0 layer-wise steps and no kl_steps"),
                           ({"kl_steps": 2, "kl_lr": float("nan")}, "kl_lr: nan"),
                           ({"kl_steps": 2, "kl_lr": -1.0}, "kl_lr: -1.0"), ({"warmup": 1.0}, "warmup"),
                           ({"warmup": -0.1}, "warmup")):
        one_line_error(lambda kw=kwargs: heal(comp, src, text, tmp_path / "x", **kw), needle)
    assert not (tmp_path / "x").exists()


def test_schedule_warms_up_over_its_fraction_then_decays_to_a_tenth():
    from tuckerctl.heal import lr_factor

    for steps, warmup in ((60, 0.3), (40, 0.05), (8, 0.3), (100, 0.0)):
        f = [lr_factor(k, steps, warmup) for k in range(steps)]
        warm = max(1, round(steps * warmup))
        assert f[:warm] == pytest.approx([(k + 1) / warm for k in range(warm)])  # linear, reaching 1
        assert max(f) == pytest.approx(1.0) and all(a >= b for a, b in zip(f[warm - 1:], f[warm:]))
        assert f[-1] > 0.1 and lr_factor(steps, steps, warmup) == pytest.approx(0.1)
