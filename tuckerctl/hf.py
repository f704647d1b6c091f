"""The bridge to transformers: loading a source checkpoint as a runnable model, its
tokenizer, and finding each layer's attention projections inside it.

transformers is an optional extra (``pip install tuckerctl[eval]``): it is imported
only here, inside the functions, so ``analyze`` and a plain ``compress`` never need it.
Every failure to load is an :class:`InputError` naming the path.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch

from .errors import InputError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model")

# Attention projections by module name: (regex with the layer index as group 1, role).
# Roles: q, k, v take the normed hidden states; o takes the attention output.
_PROJECTIONS = [
    (re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(q|k|v|o)_proj$"), None),  # Llama, Mistral, Qwen2, ...
    (re.compile(r"(?:^|\.)layer\.(\d+)\.attention\.self\.(query|key|value)$"), None),  # BERT, RoBERTa
    (re.compile(r"(?:^|\.)layer\.(\d+)\.attention\.output\.(dense)$"), None),
]
_ROLE = {"q": "q", "k": "k", "v": "v", "o": "o", "query": "q", "key": "k", "value": "v", "dense": "o"}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise InputError("this command needs transformers: pip install 'tuckerctl[eval]'") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


@contextlib.contextmanager
def _quiet_tqdm():
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    old = getattr(gguf_utils, "tqdm", None)
    gguf_utils.tqdm = lambda iterable, **_: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = old


def _split(path: Path) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) of a checkpoint path."""
    path = Path(path)
    if path.suffix == ".gguf":
        return path.parent, path.name
    return (path if path.is_dir() else path.parent), None


def is_causal(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or bool(getattr(config, "is_decoder", False))


def load_model(path, device: torch.device | None = None):
    """(model, causal) for a safetensors checkpoint directory/file or a GGUF file, in
    float32 and eval mode. Causal LMs load with their LM head; others as the bare encoder."""
    tf = _transformers()
    directory, gguf = _split(path)
    if not Path(path).exists():
        raise InputError(f"{path}: no such file or directory")
    if gguf is None and not (directory / "config.json").is_file():
        raise InputError(f"{directory}: no config.json (needed to run the model)")
    try:
        config = tf.AutoConfig.from_pretrained(directory, gguf_file=gguf)
        causal = gguf is not None or is_causal(config)
        cls = tf.AutoModelForCausalLM if causal else tf.AutoModel
        with _quiet_tqdm():  # transformers' GGUF loader draws its own bar on stderr
            model = cls.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: transformers cannot load it ({first})") from None
    model.eval()
    if device is not None:
        model.to(device)
    return model, causal


def load_tokenizer(*candidates):
    """The tokenizer of the first candidate that has one: tokenizer files beside a
    checkpoint, or a GGUF file's own vocabulary."""
    tf = _transformers()
    for path in candidates:
        if path is None:
            continue
        directory, gguf = _split(Path(path))
        if gguf is None and not any((directory / f).is_file() for f in TOKENIZER_FILES):
            continue
        try:
            return tf.AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"{path}: cannot load its tokenizer ({first})") from None
    names = ", ".join(str(p) for p in candidates if p is not None)
    raise InputError(f"no tokenizer found beside {names} (expected one of {', '.join(TOKENIZER_FILES)} "
                     "or a .gguf file)")


def projections(model) -> dict[int, dict[str, tuple[torch.nn.Module, str]]]:
    """{layer: {role: (parent module, attribute name)}} for every attention projection
    (roles q, k, v, o). An InputError when the family's layout is not one we know."""
    found: dict[int, dict[str, tuple[torch.nn.Module, str]]] = {}
    modules = dict(model.named_modules())
    for name in modules:
        for rx, _ in _PROJECTIONS:
            m = rx.search(name)
            if m:
                parent_name, _, attr = name.rpartition(".")
                found.setdefault(int(m.group(1)), {})[_ROLE[m.group(2)]] = (modules[parent_name], attr)
    if not found or any(len(v) != 4 for v in found.values()):
        raise InputError(f"{type(model).__name__}: no separate q/k/v/o attention projections found "
                         "(calibration and the svd method support Llama-style and BERT-style layouts)")
    return dict(sorted(found.items()))
