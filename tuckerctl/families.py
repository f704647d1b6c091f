"""What tuckerctl knows about each model family, as data: one row per config ``model_type``.

The adapters (:mod:`tuckerctl.adapters`) read the tensors of a *layout*; the rows say which
layout a family uses and the facts that differ between families of one layout (norm-gain
convention, logit scale rule, default masking, ALiBi, the llama.cpp architecture name and
what its converter changed). A family whose layout exists is added with one row here, one
oracle test (``tests/test_adapters_*.py``) and one README line (docs/families.md says how).
No torch, no I/O: the GGUF reader, the adapters and ``nn`` all import it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """One ``model_type``. ``adapter``: the adapter class that reads its tensors (the layout)."""

    model_type: str
    adapter: str
    causal: bool = True  # default masking when the config does not say (encoders: bidirectional)
    qk_norm_one_plus_w: bool = False  # qk-norm gains applied as (1 + w) (Gemma3's RMSNorm)
    pre_attn_scalar: bool = False  # logit scale query_pre_attn_scalar^-0.5 instead of head_dim^-0.5
    post_attention_norm: bool = False  # a norm on the attention output before the residual
    alibi: bool = False  # ALiBi position biases whatever the config says
    rope_pairing: str = "rotate_half"  # RoPE pairs: "rotate_half" (i, i + d/2) or "interleaved" (2i, 2i + 1)
    rope_interleave_key: bool = False  # config's rope_interleave: false switches to rotate_half (DeepSeek-V3)
    layer_types: bool = False  # layers differ (sliding-window/global, per-layer RoPE): only patching runs them
    # transformers' attention module (tuckerctl.patching): how q/k/v are stored, their leaf names, the output's
    hf_layout: str | None = None  # separate | fixed | contiguous | interleaved | split; None: not patchable
    hf_qkv: tuple[str, ...] = ()
    hf_out: str = ""
    gguf_arch: str | None = None  # llama.cpp's general.architecture for this family
    gguf_permuted: bool = False  # the converter permuted Q/K rows within each head (RoPE "NORM" type)
    gguf_norm_plus_one: bool = False  # the converter stored qk-norm gains as (1 + w)


_QKVO = {"hf_layout": "separate", "hf_qkv": ("q_proj", "k_proj", "v_proj"), "hf_out": "o_proj"}
_BERT = {"causal": False, "hf_layout": "separate", "hf_qkv": ("query", "key", "value"), "hf_out": "dense"}
_GEMMA2 = {**_QKVO, "pre_attn_scalar": True, "post_attention_norm": True, "layer_types": True}
_GEMMA3 = {**_GEMMA2, "qk_norm_one_plus_w": True}

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    # separate q/k/v/o under layers.N.self_attn (adapters/llama.py)
    Family("llama", "LlamaLike", **_QKVO, gguf_arch="llama", gguf_permuted=True),  # also Mistral, SmolLM2 in GGUF
    Family("mistral", "LlamaLike", **_QKVO),
    Family("qwen2", "LlamaLike", **_QKVO, gguf_arch="qwen2"),
    Family("qwen3", "LlamaLike", **_QKVO, gguf_arch="qwen3"),
    Family("gemma", "LlamaLike", **_QKVO, gguf_arch="gemma"),
    Family("gemma2", "LlamaLike", **_GEMMA2, gguf_arch="gemma2", gguf_norm_plus_one=True),
    Family("gemma3_text", "LlamaLike", **_GEMMA3, gguf_arch="gemma3", gguf_norm_plus_one=True),
    Family("gemma3", "LlamaLike", **_GEMMA3),  # multimodal wrapper: fields under text_config
    Family("olmo", "LlamaLike", **_QKVO, gguf_arch="olmo", gguf_permuted=True),
    Family("olmo2", "LlamaLike", **_QKVO, post_attention_norm=True, gguf_arch="olmo2"),
    Family("olmo3", "LlamaLike", **_QKVO, post_attention_norm=True),
    Family("starcoder2", "LlamaLike", **_QKVO, gguf_arch="starcoder2"),
    # separate projections with other names (adapters/encoders.py)
    Family("bert", "Bert", **_BERT),
    Family("roberta", "Bert", **_BERT),
    Family("vit", "ViT", **_BERT),
    Family("deit", "ViT", **_BERT),
    # OPT reshapes q/k/v with a fixed head count: every width must be H d_h (qk_input only)
    Family("opt", "OPT", hf_layout="fixed", hf_qkv=("q_proj", "k_proj", "v_proj"), hf_out="out_proj"),
    # fused QKV (adapters/fused.py)
    Family("phi3", "Phi3", hf_layout="contiguous", hf_qkv=("qkv_proj",), hf_out="o_proj", gguf_arch="phi3"),
    Family("gpt2", "GPT2", hf_layout="split", hf_qkv=("c_attn",), hf_out="c_proj"),
    Family("gpt_neox", "GPTNeoX", hf_layout="interleaved", hf_qkv=("query_key_value",), hf_out="dense"),
    Family("falcon", "Falcon"),
    Family("RefinedWeb", "Falcon"),
    Family("RefinedWebModel", "Falcon"),
    Family("bloom", "Bloom", alibi=True),
    # multi-head latent attention (adapters/mla.py)
    Family("deepseek_v2", "MLA", rope_pairing="interleaved"),
    Family("deepseek_v3", "MLA", rope_pairing="interleaved", rope_interleave_key=True),
    Family("kimi_k2", "MLA", rope_pairing="interleaved", rope_interleave_key=True),
    Family("minicpm3", "MLA"),
)}


def families_of(adapter: str) -> tuple[str, ...]:
    """The model types read by the adapter class named ``adapter``, in table order."""
    return tuple(f.model_type for f in FAMILIES.values() if f.adapter == adapter)


def facts(model_type: str | None) -> Family:
    """The row of ``model_type``; for a family tuckerctl does not know, a row of defaults
    (causal, w gains, head_dim^-0.5 scale, no ALiBi)."""
    return FAMILIES.get(model_type or "") or Family(model_type or "", adapter="")


GGUF_ARCHITECTURES: dict[str, Family] = {f.gguf_arch: f for f in FAMILIES.values() if f.gguf_arch}
