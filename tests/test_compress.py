"""compress / verify / load: the compressed checkpoint against float64 dense oracles."""

import json
import os

import pytest
import tensorly as tl
import torch
from oracle import assert_user_error, rel_err, run_cli
from safetensors import safe_open

import tuckerctl
from tuckerctl.adapters import detect
from tuckerctl.allocate import TensorSpectra, allocate_budget, feasible, rank_step
from tuckerctl.compress import compress
from tuckerctl.errors import InputError
from tuckerctl.loader import open_checkpoint
from tuckerctl.multilinear import mode_spectra, reduce
from tuckerctl.ranks import tucker_params
from tuckerctl.verify import verify


def make_llama(path, heads=8, kv_heads=2, head_dim=8, d=48, layers=2, bias=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=d, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      num_hidden_layers=layers, intermediate_size=32, vocab_size=40, attention_bias=bias)
    model = LlamaForCausalLM(cfg)
    if bias:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_()
    model.save_pretrained(path)
    return path


def make_mla(path, q_lora=24):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = DeepseekV3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora,
                           kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                           num_hidden_layers=2, intermediate_size=32, moe_intermediate_size=16,
                           n_routed_experts=2, num_experts_per_tok=1, n_shared_experts=1, first_k_dense_replace=2,
                           vocab_size=40, n_group=1, topk_group=1)
    DeepseekV3ForCausalLM(cfg).save_pretrained(path)
    return path


MODELS = {
    "MHA": lambda p: make_llama(p, heads=6, kv_heads=6, d=48),
    "GQA": lambda p: make_llama(p),
    "MQA": lambda p: make_llama(p, kv_heads=1),
    "GQA-bias": lambda p: make_llama(p, bias=True),
    "MLA": make_mla,
}


def dense_error(stack, core, factors):
    W = stack.to(dtype=torch.float64).dense()
    U1, U2, U3 = (f.double() for f in factors)
    What = torch.einsum("abc,ha,ib,jc->hij", core.double(), U1, U2, U3)
    return float((W - What).norm() / W.norm())


def source_layers(path):
    ck = open_checkpoint(path)
    adapter, spec = detect(ck)
    return [adapter.layer(ck, spec, i) for i in range(spec.layers)]


@pytest.mark.parametrize("kind", MODELS)
def test_full_rank_compression_is_exact(kind, tmp_path):
    src = MODELS[kind](tmp_path / "src")
    compress(src, tmp_path / "out", structure="tucker", ranks="1000,100000,100000", hooi_iters=0, device="cpu")
    tk = tuckerctl.load(tmp_path / "out")
    for layer, t in zip(source_layers(src), tk):
        assert dense_error(layer.pre, t.pre_core, t.pre_factors) <= 1e-6
        assert dense_error(layer.post, t.post_core, t.post_factors) <= 1e-6
        assert tuple(t.pre_core.shape) == layer.pre.ceilings  # clamped to the ceilings


def test_gqa_at_its_ceilings_is_exact(tmp_path):
    src = make_llama(tmp_path / "src", heads=8, kv_heads=2, head_dim=8, d=48)
    # key ceiling G*d_h = 16: exact although 16 < d = 48
    info = compress(src, tmp_path / "out", structure="tucker", ranks="8,48,16", device="cpu", hooi_iters=0)
    assert info["summary"]["max_rel_error"] <= 1e-7
    res = verify(tmp_path / "out", src, device="cpu", max_error=1e-6)
    assert res["max_rel_error"] <= 1e-6 and res["passed"]


@pytest.mark.parametrize("kind", ["GQA-bias", "MHA", "MLA"])
def test_low_rank_reported_error_equals_dense_and_hooi_helps(kind, tmp_path):
    src = MODELS[kind](tmp_path / "src")
    info = compress(src, tmp_path / "out", structure="tucker", ranks="3,12,6", hooi_iters=3, device="cpu")
    tk = tuckerctl.load(tmp_path / "out")
    for layer, t, rec in zip(source_layers(src), tk, info["layers"]):
        for key, core, fs in (("pre", t.pre_core, t.pre_factors), ("post", t.post_core, t.post_factors)):
            stack = getattr(layer, key)
            dense = dense_error(stack, core, fs)
            # float32 storage of the factors perturbs the error at the 1e-6 level
            assert abs(rec[key]["rel_error"] - dense) <= 1e-5
            assert rec[key]["rel_error"] <= rec[key]["rel_error_hosvd"] + 1e-12
            spectra = mode_spectra(reduce(stack.to(dtype=torch.float64)))
            tails = sum(float((s[r:] ** 2).sum()) for s, r in zip(spectra, core.shape))
            assert rec[key]["rel_error_hosvd"] <= (tails / float((spectra.head ** 2).sum())) ** 0.5 + 1e-9


def test_verify_weight_errors_match_dense(tmp_path):
    src = make_llama(tmp_path / "src", bias=True)
    compress(src, tmp_path / "out", structure="tucker", ranks="4,20,10", device="cpu")
    with tl.backend_context("numpy"):  # a user's process on another TensorLy backend
        res = verify(tmp_path / "out", src, device="cpu", tokens=32)
        assert tl.get_backend() == "numpy"  # verify's PyTorch backend did not leak
    tk = tuckerctl.load(tmp_path / "out")
    for layer, t, row in zip(source_layers(src), tk, res["layers"]):
        assert abs(row["pre"]["rel_error"] - dense_error(layer.pre, t.pre_core, t.pre_factors)) <= 1e-9
        assert abs(row["post"]["rel_error"] - dense_error(layer.post, t.post_core, t.post_factors)) <= 1e-9
        # The functional errors against a dense float64 oracle on verify's own tokens (seed 0).
        x = torch.randn(32, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        W, Wt = layer.pre.to(dtype=torch.float64).dense(), layer.post.to(dtype=torch.float64).dense()
        W_hat, Wt_hat = (tucker_dense(core, fs) for core, fs in ((t.pre_core, t.pre_factors),
                                                                 (t.post_core, t.post_factors)))
        logits, y = dense_attention(W, Wt, x, layer.out_bias.double())
        logits_hat, y_hat = dense_attention(W_hat, Wt_hat, x, t.out_bias.double())
        assert row["logits_rel_error"] == pytest.approx(rel_err(logits_hat, logits), rel=1e-6)
        assert row["output_rel_error"] == pytest.approx(rel_err(y_hat, y), rel=1e-6)
        assert row["output_rel_error"] > 1e-3  # rank 4,20,10 of 8,49,17: a real, not a vacuous, error


def tucker_dense(core, factors):
    U1, U2, U3 = (f.double() for f in factors)
    return torch.einsum("abc,ha,ib,jc->hij", core.double(), U1, U2, U3)


def dense_attention(W, Wt, x, out_bias):
    """(logits (H, N, N), causal output (N, d)) of dense homogeneous (H, d+1, d+1) tensors."""
    xh = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    logits = 8 ** -0.5 * torch.einsum("id,hde,je->hij", xh, W, xh)  # llama scale 1/sqrt(d_h)
    n = x.shape[0]
    p = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    return logits, torch.einsum("hij,je,hde->id", p, xh, Wt) + out_bias


def test_energy_ranks_follow_the_spectra(tmp_path):
    src = make_llama(tmp_path / "src")
    info = compress(src, tmp_path / "out", structure="tucker", energy=0.9, device="cpu", hooi_iters=0)
    from tuckerctl.ranks import energy_rank

    for layer, rec in zip(source_layers(src), info["layers"]):
        spectra = mode_spectra(reduce(layer.pre.to(dtype=torch.float64)))
        assert rec["pre"]["ranks"] == [energy_rank(s.tolist(), 0.9) for s in spectra]


def test_params_budget_is_met_within_one_rank_step(tmp_path):
    src = make_llama(tmp_path / "src", layers=3)
    info = compress(src, tmp_path / "out", structure="tucker", params=0.25, device="cpu", hooi_iters=1)
    budget = 0.25 * info["summary"]["params_original"]
    assert info["summary"]["params_tucker"] <= budget
    # Every triple is feasible, and no feasible single rank step of any mode still fits: the
    # budget is used up to one step.
    for rec in info["layers"]:
        for key in ("pre", "post"):
            shape, ranks = rec[key]["shape"], rec[key]["ranks"]
            assert feasible(ranks), ranks
            limits = (shape[0], min(shape[1], 64), min(shape[2], 16))
            for m in range(3):
                if ranks[m] < limits[m]:
                    bigger = list(ranks)
                    bigger[m] += rank_step(limits[m])
                    if feasible(bigger):
                        extra = tucker_params(shape, bigger) - tucker_params(shape, ranks)
                        assert info["summary"]["params_tucker"] + extra > budget


def test_allocation_prefers_energy_and_respects_budget():
    big = TensorSpectra((4, 16, 16), ([8.0, 1, 0.5, 0.1], [5.0] * 4 + [0.1] * 12, [5.0] * 4 + [0.1] * 12))
    flat = TensorSpectra((4, 16, 16), ([1.0] * 4, [1.0] * 16, [1.0] * 16))
    budget = tucker_params((4, 16, 16), (2, 4, 4)) * 2
    ranks = allocate_budget([big, flat], budget)
    assert sum(tucker_params(t.shape, r) for t, r in zip([big, flat], ranks)) <= budget
    assert ranks[0][1] >= 4 and ranks[0][2] >= 4  # the concentrated spectrum gets all its 4 big values
    with pytest.raises(ValueError):
        allocate_budget([big], 10)


def test_checkpoint_format_and_metadata(tmp_path):
    src = make_llama(tmp_path / "src", bias=True)
    compress(src, tmp_path / "out", structure="tucker", ranks="4,20,10", device="cpu")
    out = tmp_path / "out"
    # tokenizer/generation files travel along; config.json is wrapped (not loadable as the source model)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "tuckerctl" and cfg["source_config"] == json.loads((src / "config.json").read_text())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        names = set(f.keys())
    assert meta["format"] == "pt"
    info = json.loads(meta["tuckerctl"])
    assert info["schema"] == "tuckerctl.tucker/1" and len(info["source"]["sha256"]) == 64
    assert info["flags"]["latent_rope_needed"] is True
    assert [rec["pre"]["ranks"] for rec in info["layers"]] == [[4, 20, 10]] * 2
    assert {"tucker.layers.0.pre.core", "tucker.layers.1.post.value", "tucker.layers.1.out_bias"} <= names
    assert not any("q_proj" in n or "o_proj" in n for n in names)
    source = open_checkpoint(src)
    for n in source.names():
        if "self_attn" not in n:  # every non-attention tensor copied byte for byte
            with safe_open(str(out / "model.safetensors"), "pt") as f:
                assert torch.equal(f.get_tensor(n), source.get(n, source.get(n).dtype))


def test_sharded_output(tmp_path):
    from tuckerctl.tucker_format import write_checkpoint

    src = make_llama(tmp_path / "src")
    ck = open_checkpoint(src)
    write_checkpoint(tmp_path / "out", ck, set(), {}, {"schema": "x"}, shard_bytes=20_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = open_checkpoint(tmp_path / "out")
    for n in ck.names():
        assert torch.equal(again.get(n), ck.get(n))


def test_verify_exit_codes(tmp_path):
    src = make_llama(tmp_path / "src")
    assert run_cli("compress", src, "-o", tmp_path / "out", "--ranks", "4,20,8", "--no-check", "-q").code == 0
    res = run_cli("verify", tmp_path / "out", "--against", src, "--json", "--quiet")
    worst = json.loads(res.stdout)["max_rel_error"]
    assert res.code == 0 and 0 < worst < 1
    assert run_cli("verify", tmp_path / "out", "--against", src, "--max-error", worst * 1.01, "-q").code == 0
    res = run_cli("verify", tmp_path / "out", "--against", src, "--max-error", worst * 0.99, "--json")
    assert res.code == 1 and json.loads(res.stdout)["passed"] is False
    assert "exceeds --max-error" in res.stderr


def test_verify_against_wrong_model_and_corrupted_output(tmp_path):
    src = make_llama(tmp_path / "src")
    other_shape = make_llama(tmp_path / "other", d=64)
    same_shape = make_llama(tmp_path / "same", seed=1)
    assert run_cli("compress", src, "-o", tmp_path / "out", "--ranks", "4,20,8", "--no-check", "-q").code == 0
    assert_user_error(run_cli("verify", tmp_path / "out", "--against", other_shape), "different model")
    assert_user_error(run_cli("verify", tmp_path / "out", "--against", same_shape), "content hash mismatch")
    assert_user_error(run_cli("verify", src, "--against", src), "not a tuckerctl checkpoint")
    data = (tmp_path / "out" / "model.safetensors").read_bytes()
    (tmp_path / "out" / "model.safetensors").write_bytes(data[:-64])
    assert_user_error(run_cli("verify", tmp_path / "out", "--against", src), "truncated")


def test_bad_compress_arguments(tmp_path):
    src = make_llama(tmp_path / "src")
    assert_user_error(run_cli("compress", src, "-o", tmp_path / "o", "--ranks", "4,0,8"), "--ranks")
    assert_user_error(run_cli("compress", src, "-o", tmp_path / "o", "--ranks", "4,x"), "--ranks")
    assert_user_error(run_cli("compress", src, "-o", tmp_path / "o"), "exactly one of")
    assert_user_error(run_cli("compress", src, "-o", src, "--energy", "0.9"), "inside the input")
    assert_user_error(run_cli("compress", src, "-o", src, "--energy", "0.9", "--overwrite"), "inside the input")
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_interrupted_write_leaves_no_partial_output(tmp_path, monkeypatch):
    from tuckerctl import tucker_format

    src = make_llama(tmp_path / "src")
    compress(src, tmp_path / "out", structure="tucker", ranks="4,20,8", device="cpu")
    before = (tmp_path / "out" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tucker_format, "_write_shard", boom)
    with pytest.raises(KeyboardInterrupt):
        compress(src, tmp_path / "out", structure="tucker", ranks="2,10,4", device="cpu", overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        compress(src, tmp_path / "new", ranks="2,10,4", device="cpu")
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before  # old output intact
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]  # no temp directories left


def test_load_api(tmp_path):
    src = make_llama(tmp_path / "src", bias=True)
    compress(src, tmp_path / "out", structure="tucker", ranks="4,20,8", device="cpu")
    tk = tuckerctl.load(tmp_path / "out")
    assert tk.layers == [0, 1] and tk.spec["family"] == "llama"
    layer = tk[1]
    assert layer.pre_factors[1].shape == (49, 20)  # d + 1 rows: homogeneous bias row
    with pytest.raises(InputError):
        tk.layer(5)


@pytest.mark.gpu
def test_same_errors_on_cuda_as_on_cpu(tmp_path):
    src = make_llama(tmp_path / "src", bias=True)
    cpu = compress(src, tmp_path / "cpu", ranks="4,20,8", device="cpu")
    gpu = compress(src, tmp_path / "gpu", ranks="4,20,8", device="cuda")
    for a, b in zip(cpu["layers"], gpu["layers"]):
        for key in ("pre", "post"):
            assert abs(a[key]["rel_error"] - b[key]["rel_error"]) <= 1e-6
    vc = verify(tmp_path / "gpu", src, device="cpu")
    vg = verify(tmp_path / "gpu", src, device="cuda")
    for a, b in zip(vc["layers"], vg["layers"]):
        for key in ("pre", "post"):
            assert abs(a[key]["rel_error"] - b[key]["rel_error"]) <= 1e-9
        assert abs(a["output_rel_error"] - b["output_rel_error"]) <= 1e-6


@pytest.mark.parametrize("kind", ["GQA-bias", "MLA"])
def test_model_spec_round_trips_through_the_metadata(kind, tmp_path):
    """The spec a compressed checkpoint stores (as_dict) reads back as the detected ModelSpec."""
    import dataclasses

    from tuckerctl.adapters.base import ModelSpec

    src = MODELS[kind](tmp_path / "src")
    spec = detect(open_checkpoint(src))[1]
    compress(src, tmp_path / "out", ranks="2,8,4", hooi_iters=0, device="cpu")
    back = ModelSpec.from_dict(tuckerctl.load(tmp_path / "out").spec)
    assert back == dataclasses.replace(spec, prefix="")
    assert back.as_dict() == spec.as_dict()
    with pytest.raises(ValueError, match="lacks heads"):
        ModelSpec.from_dict({k: v for k, v in spec.as_dict().items() if k != "heads"})
