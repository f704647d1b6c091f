"""``tuckerctl eval`` and the metrics, against direct float64 computations from
transformers' own logits; calibration moments against the model's hidden states."""

import json
import math

import pytest
import torch
from oracle import assert_user_error, run_cli
from safetensors.torch import load_file
from textdata import save_tiny_lm, write_texts

from tuckerctl.calibrate import collect_moments, windows
from tuckerctl.metrics import CausalTally, EncoderTally


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("evallm")
    model = save_tiny_lm(root / "model")
    calib, evaluation = write_texts(root / "text")
    return model, root / "model", calib, evaluation


def test_metrics_against_direct_formulas():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 7, generator=gen), torch.randn(40, 7, generator=gen)
    t = torch.randint(0, 7, (40,), generator=gen)
    tally = CausalTally()
    tally.add(a[:25], b[:25], t[:25])
    tally.add(a[25:], b[25:], t[25:])
    r = tally.result()
    p, q = torch.softmax(a.double(), -1), torch.softmax(b.double(), -1)
    nll_p = -torch.log(p[torch.arange(40), t]).mean()
    nll_q = -torch.log(q[torch.arange(40), t]).mean()
    kld = (p * torch.log(p / q)).sum(-1)
    assert r["tokens"] == 40
    assert r["perplexity"]["original"] == pytest.approx(math.exp(nll_p), rel=1e-12)
    assert r["perplexity"]["compressed"] == pytest.approx(math.exp(nll_q), rel=1e-12)
    assert r["kl_divergence"]["mean"] == pytest.approx(float(kld.mean()), rel=1e-12)
    assert r["kl_divergence"]["p99"] == pytest.approx(float(torch.quantile(kld, 0.99)), rel=1e-6)
    assert r["top1_agreement"] == pytest.approx(float((a.argmax(-1) == b.argmax(-1)).double().mean()))
    enc = EncoderTally()
    enc.add(a, b)
    cos = (a.double() * b.double()).sum(-1) / (a.double().norm(dim=-1) * b.double().norm(dim=-1))
    e = enc.result()
    assert e["cosine"]["mean"] == pytest.approx(float(cos.mean()), rel=1e-12)
    assert e["cosine"]["min"] == pytest.approx(float(cos.min()), rel=1e-12)


def test_windows_cover_the_tokens_without_overlap():
    ids = torch.arange(23)
    ws = list(windows(ids, 10))
    assert [w.tolist() for w in ws] == [list(range(0, 10)), list(range(10, 20)), [20, 21, 22]]
    wrapped = list(windows(ids, 6, (100, 101)))
    assert all(w[0] == 100 and w[-1] == 101 and w.numel() <= 6 for w in wrapped)
    assert torch.cat([w[1:-1] for w in wrapped]).tolist() == ids.tolist()


def test_moments_match_the_normed_hidden_states(lm):
    model, path, calib, _ = lm
    ids = torch.arange(1, 61) % 64
    moments = collect_moments(model, windows(ids, 30))
    assert sorted(moments) == [0, 1]
    with torch.no_grad():
        hs = [model(input_ids=w.reshape(1, -1), output_hidden_states=True).hidden_states for w in windows(ids, 30)]
    for i, layer in enumerate(model.model.layers):
        x = torch.cat([layer.input_layernorm(h[i])[0] for h in hs]).double()
        assert moments[i].tokens == 60
        torch.testing.assert_close(moments[i].inputs, x.T @ x / 60, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(moments[i].mean, x.mean(0), rtol=1e-5, atol=1e-7)
        hom = moments[i].homogeneous()
        xh = torch.cat([x, torch.ones(60, 1, dtype=torch.float64)], 1)
        torch.testing.assert_close(hom, xh.T @ xh / 60, rtol=1e-5, atol=1e-7)


def _direct_scores(model, dense_model, ids, seq_len):
    """Perplexities, mean KLD and top-1 agreement straight from transformers' logits."""
    nll_o, nll_c, kld, same, n = 0.0, 0.0, 0.0, 0, 0
    with torch.no_grad():
        for s in range(0, ids.numel(), seq_len):
            w = ids[s:s + seq_len]
            if w.numel() < 2:
                break
            lo = model(input_ids=w[None]).logits[0, :-1].double()
            lc = dense_model(input_ids=w[None]).logits[0, :-1].double()
            po, pc = torch.log_softmax(lo, -1), torch.log_softmax(lc, -1)
            tgt = w[1:]
            nll_o -= float(po[torch.arange(len(tgt)), tgt].sum())
            nll_c -= float(pc[torch.arange(len(tgt)), tgt].sum())
            kld += float((po.exp() * (po - pc)).sum())
            same += int((lo.argmax(-1) == lc.argmax(-1)).sum())
            n += len(tgt)
    return math.exp(nll_o / n), math.exp(nll_c / n), kld / n, same / n, n


def test_eval_svd_checkpoint_matches_a_direct_computation(lm, tmp_path):
    """Compress (per-matrix SVD, half the parameters), eval via the CLI, and recompute every
    figure from a model whose projections were overwritten with the dense products of the
    stored factors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, path, calib, evaluation = lm
    out = tmp_path / "svd"
    res = run_cli("compress", path, "-o", out, "--method", "svd", "--params", "0.5", "--json", "-q")
    assert res.code == 0, res.stderr
    res = run_cli("eval", out, "--against", path, "--text", evaluation, "--max-tokens", "300", "--seq-len", "128",
              "--json", "-q")
    assert res.code == 0, res.stderr
    doc = json.loads(res.stdout)
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tensors = load_file(out / "model.safetensors")
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
    for i, layer in enumerate(dense.model.layers):
        for role, attr in names.items():
            key = f"lowrank.layers.{i}.{role}"
            W = tensors.get(f"{key}.weight")
            W = tensors[f"{key}.down"] @ tensors[f"{key}.up"] if W is None else W
            with torch.no_grad():
                getattr(layer.self_attn, attr).weight.copy_(W.T)
    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor(tok(evaluation.read_text(), add_special_tokens=False)["input_ids"][:300])
    ppl_o, ppl_c, kld, top1, n = _direct_scores(model, dense, ids, 128)
    assert doc["tokens"] == n
    assert doc["perplexity"]["original"] == pytest.approx(ppl_o, rel=1e-9)
    assert doc["perplexity"]["compressed"] == pytest.approx(ppl_c, rel=1e-5)
    assert doc["kl_divergence"]["mean"] == pytest.approx(kld, rel=1e-3, abs=1e-7)
    assert doc["top1_agreement"] == pytest.approx(top1, abs=2 / n)
    assert 0 < kld and doc["perplexity"]["compressed"] != doc["perplexity"]["original"]  # not a no-op


@pytest.mark.slow
def test_calibrated_beats_uncalibrated_at_equal_parameters(lm, tmp_path):
    """Measured, not assumed: same budget, both methods, calibration text disjoint from the
    evaluation text; scored by eval (in process: the library behind the CLI)."""
    from tuckerctl.compress import compress
    from tuckerctl.evaluate import evaluate

    model, path, calib, evaluation = lm
    for method in ("svd", "tucker"):
        docs = {}
        for name, extra in (("plain", {}), ("calibrated", {"calibrate": calib, "calib_tokens": 1500})):
            out = tmp_path / f"{method}-{name}"
            comp = compress(path, out, method=method, params=0.4, device="cpu", **extra)
            docs[name] = (comp, evaluate(out, path, evaluation, max_tokens=400, seq_len=200, device="cpu"))
        (cp, ep), (cc, ec) = docs["plain"], docs["calibrated"]
        assert cc["summary"]["ratio"] <= 0.4 and cp["summary"]["ratio"] <= 0.4
        assert abs(cc["summary"]["ratio"] - cp["summary"]["ratio"]) < 0.05  # equal budgets, both nearly used
        assert ec["kl_divergence"]["mean"] < ep["kl_divergence"]["mean"], method
        assert ec["top1_agreement"] >= ep["top1_agreement"] - 0.02, method


def test_eval_bad_inputs_are_one_line_exit_2(lm, tmp_path):
    model, path, calib, evaluation = lm
    res = run_cli("eval", tmp_path / "nope", "--against", path, "--text", evaluation)
    assert_user_error(res, "nope")
    res = run_cli("eval", path, "--against", path, "--text", tmp_path / "missing.txt")
    assert_user_error(res, "missing.txt")
    res = run_cli("eval", path, "--against", path, "--text", evaluation, "--seq-len", "1")
    assert_user_error(res, "--seq-len")


def test_eval_exit_codes_missing_tokenizer_and_bounds(lm, tmp_path):
    import shutil

    model, path, calib, evaluation = lm
    out = tmp_path / "svd"
    assert run_cli("compress", path, "-o", out, "--method", "svd", "--params", "0.3", "-q").code == 0
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(path / f, bare / f)
    bare_out = tmp_path / "bare-out"  # compress carries tokenizer files along: a copy without them
    shutil.copytree(out, bare_out)
    for f in bare_out.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            f.unlink()
    res = run_cli("eval", bare_out, "--against", bare, "--text", evaluation, "--max-tokens", "100")
    assert_user_error(res, "no tokenizer found")
    res = run_cli("eval", out, "--against", path, "--text", evaluation, "--max-tokens", "100", "--max-kld", "0",
              "--json", "-q")
    assert res.code == 1, res.stderr
    doc = json.loads(res.stdout)
    assert not doc["checks"]["passed"] and doc["kl_divergence"]["mean"] > 0
    res = run_cli("eval", out, "--against", path, "--text", evaluation, "--max-tokens", "100", "--max-kld", "100",
              "--max-ppl-ratio", "1000", "--json", "-q")
    assert res.code == 0 and json.loads(res.stdout)["checks"]["passed"]


def test_compressed_copy_shares_the_weights_and_leaves_the_original(tmp_path_factory, tmp_path):
    """eval's compressed model is a module-tree copy sharing every tensor: patching it changes
    its outputs, not the original's, and only the attention projections are new tensors."""
    from test_patch import inputs, outputs, source

    import tuckerctl
    from tuckerctl.compress import compress
    from tuckerctl.evaluate import weight_sharing_copy

    original, path = source("llama_gqa_bias", tmp_path_factory)
    compress(path, tmp_path / "out", ranks="2,12,8", device="cpu", dtype="float32")
    model = type(original).from_pretrained(path, attn_implementation="eager").eval()
    kw, valid = inputs(model)
    before = outputs(model, kw)
    small = tuckerctl.patch(weight_sharing_copy(model), tmp_path / "out")
    assert torch.equal(outputs(model, kw), before)
    assert float((outputs(small, kw) - before)[valid].abs().max()) > 1e-3  # really compressed
    old = {p.data_ptr() for p in model.parameters()}
    new = [n for n, p in small.named_parameters() if p.data_ptr() not in old]
    assert new and all(".self_attn." in n for n in new), new
    assert small.lm_head.weight is model.lm_head.weight
