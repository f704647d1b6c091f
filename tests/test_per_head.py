"""Per-head structures with sides kept whole, the per_head value-output tensor, and
``--tensors pre|post`` for Tucker (issue #8 sections 4-5).

Oracles: the checkpoint's raw tensors rebuilt densely in float64 against the source
projections read by safetensors, and transformers' own models (patched vs original, or
vs an original whose q/k weights are set to the compressed ones)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from safetensors import safe_open

import tuckerctl
from tuckerctl.compress import compress
from tuckerctl.errors import InputError
from tuckerctl.export import materialise
from tuckerctl.tucker_format import TENSOR_PREFIX, load
from tuckerctl.verify import verify

D, H, G, DH = 64, 8, 2, 16


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A 2-layer GQA Llama with q/k/v/o biases (homogeneous rows on every side)."""
    path = tmp_path_factory.mktemp("per-head") / "src"
    torch.manual_seed(1)
    cfg = tf.LlamaConfig(hidden_size=D, num_attention_heads=H, num_key_value_heads=G, head_dim=DH,
                         num_hidden_layers=2, intermediate_size=32, vocab_size=50, attention_bias=True)
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def tensors_of(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k).double() for k in f.keys()}


def originals(src, i):
    """Per-head blocks of layer i as y = [x, 1] W: A (H, d+1, d_h), B, V (G, d+1, d_h), O_t (H, d, d_h)."""
    t = tensors_of(src)
    p = f"model.layers.{i}.self_attn."

    def homog(name, k):
        W = torch.cat([t[p + name + ".weight"].T, t[p + name + ".bias"][None]], 0)  # (d+1, k d_h)
        return W.reshape(D + 1, k, DH).permute(1, 0, 2)

    O_t = t[p + "o_proj.weight"].reshape(D, H, DH).permute(1, 0, 2)
    return homog("q_proj", H), homog("k_proj", G), homog("v_proj", G), O_t


def per_head_blocks(raw, i, tensor, names):
    """(left blocks, right blocks) rebuilt from the raw stored tensors: U @ coordinates, or
    the coordinates alone where the subspace is not written."""
    def side(u, c):
        U = raw.get(f"{TENSOR_PREFIX}.{i}.{tensor}.{u}")
        C = raw[f"{TENSOR_PREFIX}.{i}.{tensor}.{c}"]
        return C if U is None else U @ C
    return side(names[0], names[2]), side(names[1], names[3])


def rel(a, b):
    return float((a - b).norm() / b.norm())


def dense_pre(A, B):
    return A @ B[torch.arange(H) // (H // G)].transpose(1, 2)


def dense_post(O_t, V):
    return O_t @ V[torch.arange(H) // (H // G)].transpose(1, 2)


@pytest.mark.parametrize("params", [0.35, 0.7])
def test_params_budget_counts_what_is_written_and_errors_are_exact(src, tmp_path, params):
    info = compress(src, tmp_path / "out", params=params, device="cpu", dtype="float32", hooi_iters=0)
    raw = tensors_of(tmp_path / "out")
    stored = sum(v.numel() for k, v in raw.items() if k.startswith(TENSOR_PREFIX) and not k.endswith("out_bias"))
    # The count the budget holds is the stored numbers less the bias rows of sides kept whole.
    whole_bias_rows = sum(H * DH * (r["pre"]["whole_sides"][0]) + G * DH * r["pre"]["whole_sides"][1]
                          + G * DH * r["post"]["whole_sides"][1] for r in info["layers"])
    assert stored - whole_bias_rows == info["summary"]["params_tucker"]
    assert info["summary"]["ratio"] <= params
    for r in info["layers"]:
        i = r["index"]
        assert r["post"]["structure"] == "per_head"
        A, B, V, O_t = originals(src, i)
        Ah, Bh = per_head_blocks(raw, i, "pre", ("query", "key", "query_heads", "key_groups"))
        Oh, Vh = per_head_blocks(raw, i, "post", ("output", "value", "output_heads", "value_groups"))
        assert rel(dense_pre(Ah, Bh), dense_pre(A, B)) == pytest.approx(r["pre"]["rel_error"], abs=1e-5)
        assert rel(dense_post(Oh, Vh), dense_post(O_t, V)) == pytest.approx(r["post"]["rel_error"], abs=1e-5)
        for key, names in (("pre", ("query", "key")), ("post", ("output", "value"))):
            for whole, name in zip(r[key]["whole_sides"], names):
                assert (f"{TENSOR_PREFIX}.{i}.{key}.{name}" in raw) != whole
        # The loader's 3-mode view of the per_head tensor is the same tensor.
        layer = load(tmp_path / "out").layer(i, dtype=torch.float64)
        U1, U2, U3 = layer.post_factors
        view = torch.einsum("hj,jab,da,nb->hdn", U1, layer.post_core, U2, U3)
        assert rel(view, dense_post(Oh, Vh)) < 1e-12
    # verify reads the same files through the loader and rebuilds both tensors with TensorLy.
    doc = verify(tmp_path / "out", src, device="cpu")
    for row, r in zip(doc["layers"], info["layers"]):
        assert row["post"]["rel_error"] == pytest.approx(r["post"]["rel_error"], abs=1e-5)
        assert row["pre"]["rel_error"] == pytest.approx(r["pre"]["rel_error"], abs=1e-5)


def test_a_tight_budget_factors_the_sides_that_save(src, tmp_path):
    """At 0.35 every kept-whole side would cost more than the budget allows: something is
    factored on both tensors, and a factored side's rank is below its break-even."""
    info = compress(src, tmp_path / "out", params=0.35, device="cpu", dtype="float32", hooi_iters=0)
    for r in info["layers"]:
        for key in ("pre", "post"):
            assert not all(r[key]["whole_sides"])
            for side, (whole, rank) in enumerate(zip(r[key]["whole_sides"], r[key]["ranks"][1:])):
                rows, blocks = (D + (key == "pre"), H) if side == 0 else (D + 1, G)
                if not whole:
                    assert rank * (rows + blocks * DH) < min(rows, D) * blocks * DH


def patched_logits(src, out, ids):
    model = tuckerctl.patch(tf.LlamaForCausalLM.from_pretrained(src).eval(), out)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_full_budget_keeps_everything_whole_and_reproduces_the_model(src, tmp_path):
    info = compress(src, tmp_path / "out", params=1.0, device="cpu", dtype="float32")
    assert all(all(r[k]["whole_sides"]) for r in info["layers"] for k in ("pre", "post"))
    assert info["summary"]["ratio"] == 1.0
    assert not any(k.endswith((".pre.query", ".pre.key", ".post.output", ".post.value"))
                   for k in tensors_of(tmp_path / "out"))
    ids = torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(0))
    ref = tf.LlamaForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        a = ref(input_ids=ids).logits
    b = patched_logits(src, tmp_path / "out", ids)
    assert float((a - b).abs().max() / a.abs().max()) < 2e-6


@pytest.mark.parametrize("kept", ["pre", "post"])
def test_tensors_keeps_the_other_tensor_exact(src, tmp_path, kept):
    """--tensors pre|post: the other tensor's stored coordinates are the source projections
    bit for bit (no subspace written); only the chosen tensor is factored; and the patched
    model equals transformers' model with the compressed tensor's projections swapped in."""
    chosen = "post" if kept == "pre" else "pre"
    info = compress(src, tmp_path / "out", params=0.75, tensors=chosen, device="cpu", dtype="float32")
    raw = tensors_of(tmp_path / "out")
    ref = tf.LlamaForCausalLM.from_pretrained(src).eval()
    ck = load(tmp_path / "out")
    for r in info["layers"]:
        i = r["index"]
        assert r[kept].get("kept") and all(r[kept]["whole_sides"]) and r[kept]["rel_error"] == 0.0
        assert r[chosen]["rel_error"] > 0.01
        A, B, V, O_t = originals(src, i)
        names = ("query_heads", "key_groups") if kept == "pre" else ("output_heads", "value_groups")
        for name, want in zip(names, (A, B) if kept == "pre" else (O_t, V)):
            assert torch.equal(raw[f"{TENSOR_PREFIX}.{i}.{kept}.{name}"].float(), want.float())
        # The oracle model: transformers' own, with the compressed tensor materialised into it.
        parts = materialise(ck.layer(i), ck.spec)
        attn = ref.model.layers[i].self_attn
        with torch.no_grad():
            if chosen == "pre":
                for proj, f in ((attn.q_proj, parts["A"]), (attn.k_proj, parts["B"])):
                    proj.weight.copy_(f[:, :D].permute(0, 2, 1).reshape(-1, D))
                    proj.bias.copy_(f[:, D].reshape(-1))
            else:
                attn.v_proj.weight.copy_(parts["V"][:, :D].permute(0, 2, 1).reshape(-1, D))
                attn.v_proj.bias.copy_(parts["V"][:, D].reshape(-1))
                attn.o_proj.weight.copy_(parts["O_t"].permute(1, 0, 2).reshape(D, -1))
    ids = torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ref(input_ids=ids).logits
    b = patched_logits(src, tmp_path / "out", ids)
    assert float((a - b).abs().max() / a.abs().max()) < 2e-6


def test_tensors_with_the_tucker_structure_is_refused(src, tmp_path):
    with pytest.raises(InputError, match="^tensors='pre': "):
        compress(src, tmp_path / "out", params=0.5, tensors="pre", structure="tucker", device="cpu")


def test_energy_never_exceeds_the_original(src, tmp_path):
    info = compress(src, tmp_path / "out", energy=0.999, device="cpu", dtype="float32")
    assert info["summary"]["ratio"] <= 1.0 and not info["warnings"]


def test_calibrated_output_side_is_optimal_in_the_attention_output_metric(src, tmp_path):
    """Calibrated, the value-output tensor's output subspace minimises the error of o_proj's
    outputs on the real attention outputs z: with the value side kept whole, the stored
    W_O's error E||z (W_O - W_O_hat)||^2 equals the Eckart-Young tail of C_z^(1/2) W_O
    (dense float64 SVD, the per-matrix baseline's optimum), and the budget is kept."""
    from tuckerctl.calibrate import collect_moments

    model = tf.LlamaForCausalLM.from_pretrained(src).eval()
    g = torch.Generator().manual_seed(5)
    moments = collect_moments(model, [torch.randint(0, 50, (64,), generator=g) for _ in range(4)])
    info = compress(src, tmp_path / "out", params=0.75, tensors="post", moments=moments, device="cpu",
                    dtype="float32", hooi_iters=0)
    assert info["summary"]["ratio"] <= 0.75
    raw = tensors_of(tmp_path / "out")
    checked = 0
    for r in info["layers"]:
        i = r["index"]
        whole_out, whole_val = r["post"]["whole_sides"]
        if whole_out or not whole_val:
            continue
        _, _, _, O_t = originals(src, i)
        W_o = O_t.permute(1, 0, 2).reshape(D, H * DH).T  # y = z W_o, (H d_v, d)
        Oh, _ = per_head_blocks(raw, i, "post", ("output", "value", "output_heads", "value_groups"))
        W_hat = Oh.permute(1, 0, 2).reshape(D, H * DH).T
        Cz = moments[i].attn_out
        vals, vecs = torch.linalg.eigh(Cz)
        Sz = (vecs * vals.clamp_min(0).sqrt()) @ vecs.T
        err = float(torch.trace((W_o - W_hat).T @ Cz @ (W_o - W_hat)))
        rank = r["post"]["ranks"][1]
        sig = torch.linalg.svdvals(Sz @ W_o)
        assert err == pytest.approx(float((sig[rank:] ** 2).sum()), rel=1e-6)
        checked += 1
    assert checked


@pytest.mark.slow
def test_heal_reads_and_rewrites_a_per_head_checkpoint(tmp_path):
    """heal on a --params checkpoint (per_head value-output tensor, sides kept whole): the
    healed checkpoint keeps the structures, the stored tensor names and shapes (so the same
    parameter count: whole sides stay unwritten identities), changes the trained factors,
    runs, and its held-out loss went down."""
    from textdata import save_tiny_lm, write_texts

    from tuckerctl.heal import heal

    src = tmp_path / "model"
    save_tiny_lm(src)
    text, _ = write_texts(tmp_path / "text")
    compress(src, tmp_path / "comp", params=0.6, device="cpu", dtype="float32", calibrate=text, calib_tokens=1024)
    before = load(tmp_path / "comp")
    assert all(before.layer(i).post_structure == "per_head" for i in before.layers)
    rec = heal(tmp_path / "comp", src, text, tmp_path / "healed", tokens=2048, steps=30, seq_len=128, batch=2,
               device="cpu")
    after = load(tmp_path / "healed")
    shapes = lambda ck: {n: tuple(ck.ckpt.get(n).shape) for n in ck.ckpt.names() if n.startswith(TENSOR_PREFIX)}  # noqa: E731
    assert shapes(after) == shapes(before)
    sides = [f"{TENSOR_PREFIX}.{i}.{s}" for i in before.layers for s in ("pre.query", "pre.key", "post.output",
                                                                          "post.value")]
    assert any(n not in shapes(before) for n in sides)  # the case has sides kept whole (unwritten)
    changed = 0
    for i in after.layers:
        a, b = after.layer(i), before.layer(i)
        assert a.post_structure == "per_head" and after.info["layers"][i]["post"]["structure"] == "per_head"
        changed += not torch.equal(a.output_heads, b.output_heads)
    assert changed
    assert rec["loss"]["val_final_mean"] < rec["loss"]["val_initial_mean"]
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(0))
    model = tuckerctl.patch(tf.LlamaForCausalLM.from_pretrained(src).eval(), tmp_path / "healed")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.slow  # a fresh interpreter importing transformers per case
@pytest.mark.parametrize("name", ["llama_gqa_bias", "qwen3"])
def test_per_head_checkpoint_exports_exactly(name, tmp_path_factory, tmp_path):
    """A --params checkpoint (per_head value-output tensor, truncated and whole sides; qk-norm
    for qwen3) exports to the stock architecture with no split error, and the exported
    directory, loaded by transformers in a fresh process, gives the patched model's outputs."""
    from test_export import run_child
    from test_patch import inputs, outputs, source

    from tuckerctl.export import export

    original, path = source(name, tmp_path_factory)
    info = compress(path, tmp_path / "out", params=0.5, hooi_iters=0, device="cpu", dtype="float32")
    assert all(r["post"]["structure"] == "per_head" for r in info["layers"])
    doc = export(tmp_path / "out", tmp_path / "hf")
    assert doc["max_export_error"] <= 1e-6
    model = tuckerctl.patch(type(original).from_pretrained(path, attn_implementation="eager").eval(), tmp_path / "out")
    kw, valid = inputs(model)
    want = outputs(model, kw)
    got = run_child(tmp_path / "hf", "lm", kw)
    assert float((got - want)[valid].abs().max() / want[valid].abs().max()) <= 2e-6
