"""Text and tiny runnable language models for the eval/calibration tests.

Text is the prose of Python's own ``pydoc_data/topics.py``, read at run time (never
copied into the repository). Its topics are split alternately into a calibration part
and an evaluation part, so the two never share a topic.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch


def python_docs(part: str) -> str:
    """``part`` = "calibration" (even-numbered topics, sorted by name) or "evaluation" (odd)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    chosen = keys[0::2] if part == "calibration" else keys[1::2]
    return "\n\n".join(topics[k] for k in chosen)


def write_texts(directory: Path) -> tuple[Path, Path]:
    """(calibration file, evaluation file) under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    calib, evaluation = directory / "calibration.txt", directory / "evaluation.txt"
    calib.write_text(python_docs("calibration"), encoding="utf-8")
    evaluation.write_text(python_docs("evaluation"), encoding="utf-8")
    return calib, evaluation


def save_char_tokenizer(path: Path, vocab_size: int) -> None:
    """A character-level tokenizer (the ``vocab_size - 1`` commonest characters of the
    documentation prose, plus [UNK]) saved as tokenizer.json beside a model."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    common = [c for c, _ in Counter(python_docs("calibration")).most_common(vocab_size - 1)]
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(common)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)


def save_tiny_lm(path: Path, anisotropic: bool = True, vocab_size: int = 64):
    """A 2-layer GQA Llama with a character tokenizer beside it. ``anisotropic``: the
    input norms' gains decay over the channels, as trained models' hidden states do,
    so that weighting by the real inputs matters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                      num_hidden_layers=2, intermediate_size=96, vocab_size=vocab_size,
                      max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    if anisotropic:
        with torch.no_grad():
            gain = torch.logspace(0.5, -1.5, cfg.hidden_size)[torch.randperm(cfg.hidden_size)]
            for layer in model.model.layers:
                layer.input_layernorm.weight.copy_(gain)
    model.save_pretrained(path)
    save_char_tokenizer(path, vocab_size)
    return model
