"""Read llama.cpp GGUF files as if they were Hugging Face checkpoints.

:func:`open_gguf` returns a :class:`~tuckerctl.checkpoint.Checkpoint` whose attention
tensors carry Hugging Face names (``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``,
``.bias``, ``q_norm``/``k_norm``) and whose ``config`` is a HF-style dict built from
the GGUF metadata, so the ordinary adapters read it unchanged. Other tensors keep
their GGUF names (``token_embd.weight``, ``blk.0.ffn_up.weight``, ...).

What has to be undone to get HF tensors back (docs/families.md, "Files"):

* GGUF dims are reversed; ``gguf.quants.dequantize`` already yields torch's
  [out, in] layout as float32.
* llama.cpp's converter permutes the rows of Q and K (and their biases) inside each
  head for archs whose HF source uses rotate_half but whose llama.cpp RoPE is the
  interleaved "NORM" type (llama, which includes Mistral and SmolLM2, and olmo).
  The inverse is ``w.reshape(n, d_h/2, 2, in).swapaxes(2, 1).reshape(out, in)``
  with n = H for Q and n = G for K.
* A fused ``attn_qkv`` is contiguous [Q; K; V]; it is split into q/k/v, except for
  phi3, whose HF checkpoints store the same fused ``qkv_proj``.
* Gemma2/3 converters store norm gains as 1 + w; the HF value w is restored.

Tensors are dequantised lazily, one at a time, when :meth:`get` asks for them.
The ``gguf`` package is an optional dependency, imported only here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import Checkpoint, TensorInfo, require_finite
from .errors import InputError
from .families import GGUF_ARCHITECTURES
from .strict import regular_file

# GGUF ``general.architecture`` -> the family's row (HF model_type, what the converter changed).
ARCHITECTURES = GGUF_ARCHITECTURES
# GGUF block tensor -> HF self_attn module.
_ATTN = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
         "attn_q_norm": "q_norm", "attn_k_norm": "k_norm"}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# Arrays longer than this (tokenizer vocabularies) are summarised in ``metadata``.
_MAX_META_ARRAY = 64


@dataclass(frozen=True)
class _Source:
    """How one presented tensor is made from a GGUF tensor."""

    tensor: Any  # gguf ReaderTensor
    rows: slice | None = None  # part of a fused tensor
    unpermute_heads: int | None = None  # undo llama.cpp's Q/K permutation over n heads
    minus_one: bool = False  # gemma's stored (1 + w) norm gains


@dataclass
class GGUFCheckpoint(Checkpoint):
    """A GGUF file presented with HF tensor names; data dequantised on demand."""

    format: str = "gguf"
    _sources: dict[str, _Source] = field(default_factory=dict, repr=False)
    _cache: tuple = field(default=(None, None), repr=False)  # last fused tensor dequantised

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantise one tensor, in HF layout and order, as ``dtype``."""
        info = self._info(name)
        src = self._sources[name]
        w = self._dequantised(src.tensor).reshape(_hf_shape(src.tensor))
        if src.rows is not None:
            w = w[src.rows]
        if src.unpermute_heads is not None:
            w = unpermute(w, src.unpermute_heads)
        if src.minus_one:
            w = w - 1.0
        assert tuple(w.shape) == info.shape
        return require_finite(w.to(dtype), self.path, name)

    def _dequantised(self, t) -> torch.Tensor:
        if self._cache[0] == t.name:
            return self._cache[1]
        from gguf.quants import dequantize

        try:
            arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise InputError(f"{self.path}: tensor {t.name!r} uses {t.tensor_type.name}, which the "
                             f"installed gguf package cannot dequantise") from None
        w = torch.from_numpy(np.array(arr, dtype=np.float32))  # own copy, not the read-only map
        self._cache = (t.name, w)
        return w


def unpermute(w: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of llama.cpp's ``LlamaModel.permute`` on the rows of ``w`` (n heads):
    interleaved RoPE pairs back to HF's rotate_half order."""
    rows = w.shape[0]
    return w.reshape(n, rows // n // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_shape(t) -> tuple[int, ...]:
    return tuple(int(x) for x in reversed(t.shape.tolist()))


def _value(f) -> Any:
    """The Python value of a GGUF metadata field (scalar, string or list)."""
    from gguf import GGUFValueType

    def one(idx: int, kind) -> Any:
        part = f.parts[idx]
        return bytes(part).decode("utf-8", "replace") if kind == GGUFValueType.STRING else part.tolist()[0]

    if not f.types or not f.data:
        return None
    if f.types[0] == GGUFValueType.ARRAY:
        if len(f.types) < 2:
            return []
        return [one(i, f.types[1]) for i in f.data]
    return one(f.data[0], f.types[0])


def _read(path: Path):
    """``gguf.GGUFReader(path)``, with every failure turned into an InputError."""
    try:
        import gguf
    except ImportError:
        raise InputError(f"{path}: reading GGUF needs the 'gguf' package (pip install gguf)") from None
    if not path.exists():
        raise InputError(f"{path}: no such file")
    regular_file(path)
    try:
        reader = gguf.GGUFReader(path)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError, ... on bad bytes
        raise InputError(f"{path}: not a valid GGUF file or truncated ({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise InputError(f"{path}: truncated: tensor {t.name!r} ends at byte "
                             f"{t.data_offset + t.n_bytes} but the file has {size}")
    return reader


def _metadata(reader) -> dict[str, Any]:
    meta = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if f.types and f.types[0].name == "ARRAY" and len(f.data) > _MAX_META_ARRAY:
            meta[key] = f"<array of {len(f.data)}>"
        else:
            meta[key] = _value(f)
    return meta


def _config(path: Path, meta: dict, arch: str, model_type: str) -> dict:
    """HF-style config keys from ``{arch}.*`` metadata."""

    def get(key: str, required: bool = False):
        full = f"{arch}.{key}"
        value = meta.get(full)
        if isinstance(value, list):  # per-layer values: fine only when all equal
            if not value or any(v != value[0] for v in value):
                raise InputError(f"{path}: metadata {full!r} varies per layer ({value}); not supported")
            value = value[0]
        if value is None and required:
            raise InputError(f"{path}: missing GGUF metadata key {full!r}")
        return value

    d = int(get("embedding_length", True))
    H = int(get("attention.head_count", True))
    G = int(get("attention.head_count_kv") or H)
    layers = int(get("block_count", True))
    if H <= 0 or d <= 0 or G <= 0 or layers <= 0:
        raise InputError(f"{path}: GGUF metadata gives d={d}, heads={H}, kv_heads={G}, layers={layers}")
    head_dim = int(get("attention.key_length") or d // H)
    value_length = get("attention.value_length")
    if head_dim <= 0 or (value_length is not None and int(value_length) <= 0):
        raise InputError(f"{path}: GGUF metadata gives head width {head_dim} (d={d}, heads={H}, "
                         f"value_length={value_length}); must be positive")
    cfg: dict[str, Any] = {
        "model_type": model_type,
        "hidden_size": d,
        "num_attention_heads": H,
        "num_key_value_heads": G,
        "head_dim": head_dim,
        "num_hidden_layers": layers,
        "rope_theta": float(get("rope.freq_base") or 10000.0),  # llama.cpp's default
    }
    value_dim = get("attention.value_length")
    if value_dim is not None and int(value_dim) != head_dim:
        cfg["value_head_dim"] = int(value_dim)
    rope_dims = get("rope.dimension_count")
    if rope_dims and int(rope_dims) != head_dim:
        cfg["partial_rotary_factor"] = int(rope_dims) / head_dim
    for key, hf in (("context_length", "max_position_embeddings"), ("feed_forward_length", "intermediate_size"),
                    ("vocab_size", "vocab_size"), ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
                    ("attention.sliding_window", "sliding_window"),
                    ("attn_logit_softcapping", "attn_logit_softcapping"),
                    ("attention.clamp_kqv", "clip_qkv")):
        value = get(key)
        if value is not None:
            cfg[hf] = value
    if ARCHITECTURES[arch].pre_attn_scalar:
        # llama.cpp scales Gemma2/3 logits by (d/H)^-0.5 for the 27B models, which it
        # recognises by layer count, and by d_h^-0.5 otherwise (unless given explicitly).
        scale = get("attention.scale")
        big = (arch, layers) in (("gemma2", 46), ("gemma3", 62))
        cfg["query_pre_attn_scalar"] = scale ** -2 if scale else (d // H if big else head_dim)
    return cfg


def open_gguf(path: str | Path) -> GGUFCheckpoint:
    """Open a GGUF file lazily, with HF tensor names and a HF-like config dict."""
    path = Path(path)
    reader = _read(path)
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch is None:
        raise InputError(f"{path}: missing GGUF metadata key 'general.architecture'")
    if arch not in ARCHITECTURES:
        raise InputError(f"{path}: GGUF architecture {arch!r} is not supported "
                         f"(supported: {', '.join(ARCHITECTURES)})")
    model_type, permuted = ARCHITECTURES[arch].model_type, ARCHITECTURES[arch].gguf_permuted
    cfg = _config(path, meta, arch, model_type)
    H, G, dh = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    dv = cfg.get("value_head_dim", dh)

    sources: dict[str, _Source] = {}
    for t in reader.tensors:
        m = _BLOCK.match(t.name)
        part = m and m.group(2)
        if not m or (part not in _ATTN and part != "attn_qkv"):
            sources[t.name] = _Source(t)
            continue
        base = f"model.layers.{m.group(1)}.self_attn."
        kind = m.group(3)
        if part == "attn_qkv" and arch == "phi3":
            sources[f"{base}qkv_proj.{kind}"] = _Source(t)
        elif part == "attn_qkv":
            rows = _hf_shape(t)[0]
            widths = {"q_proj": H * dh, "k_proj": G * dh, "v_proj": G * dv}
            if rows != sum(widths.values()):
                raise InputError(f"{path}: tensor {t.name!r} has {rows} rows, but heads={H}, "
                                 f"kv_heads={G}, head_dim={dh} imply {sum(widths.values())}")
            start = 0
            for proj, width in widths.items():
                heads = {"q_proj": H, "k_proj": G}.get(proj) if permuted else None
                sources[f"{base}{proj}.{kind}"] = _Source(t, slice(start, start + width), heads)
                start += width
        else:
            proj = _ATTN[part]
            heads = {"q_proj": H, "k_proj": G}.get(proj) if permuted else None
            minus_one = proj.endswith("norm") and ARCHITECTURES[arch].gguf_norm_plus_one
            sources[f"{base}{proj}.{kind}"] = _Source(t, None, heads, minus_one)

    tensors = {}
    for name, src in sources.items():
        shape = _hf_shape(src.tensor)
        if src.rows is not None:
            shape = (src.rows.stop - src.rows.start, *shape[1:])
        if src.unpermute_heads is not None:
            n = src.unpermute_heads
            if shape[0] % (2 * n):
                raise InputError(f"{path}: tensor {src.tensor.name!r} has {shape[0]} rows, which "
                                 f"{n} heads of even width cannot split (RoPE permutation)")
        tensors[name] = TensorInfo(path, src.tensor.tensor_type.name, shape)
    return GGUFCheckpoint(path=path, tensors=tensors, config=cfg, config_path=None,
                          metadata=meta, _sources=sources)


# GGUF names of the non-attention tensors -> HF names, for the archs whose HF layout is Llama's.
_HF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_HF_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def hf_layout(ckpt: GGUFCheckpoint) -> tuple[dict[str, str], dict] | None:
    """({GGUF or presented name: HF name} for every tensor, a transformers config) for
    archs with Llama's layout, so a compressed checkpoint of a GGUF source holds a whole
    transformers model; None for other archs."""
    arch = ckpt.metadata.get("general.architecture")
    if arch not in _HF_CLASSES:
        return None
    names = {}
    for name in ckpt.names():
        m = _BLOCK.match(name)
        if name.startswith("model.layers."):
            names[name] = name  # attention tensors are presented with HF names already
        elif name in _HF_GLOBAL:
            names[name] = _HF_GLOBAL[name]
        elif m and m.group(2) in _HF_BLOCK:
            names[name] = f"model.layers.{m.group(1)}.{_HF_BLOCK[m.group(2)]}.{m.group(3)}"
        else:
            return None  # a tensor we cannot place: do not pretend to a complete model
    cfg = dict(ckpt.config)
    cfg["architectures"] = [_HF_CLASSES[arch]]
    cfg["tie_word_embeddings"] = "output.weight" not in ckpt
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        value = ckpt.metadata.get(f"tokenizer.ggml.{key}")
        if isinstance(value, int):
            cfg[key.replace("padding", "pad")] = value
    cfg.setdefault("attention_bias", any(n.endswith("self_attn.q_proj.bias") for n in ckpt.names()))
    return names, cfg


__all__ = ["ARCHITECTURES", "hf_layout", "GGUFCheckpoint", "open_gguf", "unpermute"]
