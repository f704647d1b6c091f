"""Independent oracles for the tests: tiny transformers models and dense attention.

``run_attention`` runs a transformers model on random inputs with every position id
at 0 (RoPE becomes the identity) and captures the input and output of one layer's
attention block; ``rebuild_attention`` recomputes that output from tuckerctl's head
stacks alone, densely in float64.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
import torch
from typer.main import get_command as _build_command

from tuckerctl.errors import InputError

torch.manual_seed(0)


def save_tiny(model_cls, config, path):
    """Instantiate a random model from ``config`` and ``save_pretrained`` it."""
    torch.manual_seed(0)
    model = model_cls(config).eval()
    # Random non-trivial norm gains / biases so that folding mistakes show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name.lower() else 0.0))
    model.save_pretrained(path)
    return model


def save_llama(path, **config):
    """A random ``LlamaForCausalLM`` (seed 0) of the given config sizes, saved with
    ``save_pretrained`` but without generation_config.json: weights and config only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(path)
    (path / "generation_config.json").unlink(missing_ok=True)
    return path


_BUILT: dict = {}


def save_llama_attention(path, dtype, seed: int, layers: int = 5, d: int = 48, heads: int = 6, groups: int = 2,
                         head_dim: int = 8):
    """A Llama-named GQA checkpoint with random attention tensors (and input norms) only, in
    ``dtype``, with its config.json: what analyze/compress read, nothing a model would run."""
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        a = f"model.layers.{i}.self_attn."
        tensors.update({a + "q_proj.weight": torch.randn(heads * head_dim, d, generator=g),
                        a + "k_proj.weight": torch.randn(groups * head_dim, d, generator=g),
                        a + "v_proj.weight": torch.randn(groups * head_dim, d, generator=g),
                        a + "o_proj.weight": torch.randn(d, heads * head_dim, generator=g),
                        f"model.layers.{i}.input_layernorm.weight": 1 + 0.1 * torch.randn(d, generator=g)})
    path.mkdir()
    save_file({k: v.to(dtype) for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": d, "num_attention_heads": heads, "num_key_value_heads": groups,
        "head_dim": head_dim, "num_hidden_layers": layers, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}))
    return path


def build_case(cases: dict, name: str, tmp_path_factory):
    """Save ``cases[name] = (model_cls, config, ...)`` once per session; return (model, dir)."""
    key = (id(cases), name)
    if key not in _BUILT:
        model_cls, cfg = cases[name][:2]
        path = tmp_path_factory.mktemp(name)
        _BUILT[key] = (save_tiny(model_cls, cfg, path), path)
    return _BUILT[key]


def capture(model, module, inputs: dict):
    """Run ``model(**inputs)`` and return (input hidden states, output) of ``module``."""
    seen = {}

    def hook(mod, args, kwargs, out):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        seen["y"] = out[0] if isinstance(out, tuple) else out

    h = module.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    h.remove()
    return seen["x"][0].double(), seen["y"][0].double()


def rebuild_attention(layer, spec, x, causal: bool, q_scale=None, k_scale=None, alibi=None):
    """Attention output from the head stacks: sum_h softmax(s x W[h] x^T) x Wt[h]^T + b_O.

    ``q_scale``/``k_scale``: optional per-token, per-head scalars (H, N) for qk-norm
    models (the 1/rms factors outside the bilinear form)."""
    W = layer.pre.to(dtype=torch.float64).dense()
    Wt = layer.post.to(dtype=torch.float64).dense()
    N = x.shape[0]
    ones = torch.ones(N, 1, dtype=x.dtype)
    xq = torch.cat([x, ones], 1) if W.shape[1] == x.shape[1] + 1 else x
    xv = torch.cat([x, ones], 1) if Wt.shape[2] == x.shape[1] + 1 else x
    logits = spec.scale * torch.einsum("id,hde,je->hij", xq, W, xq)
    if q_scale is not None:
        logits = logits * q_scale[:, :, None] * k_scale[:, None, :]
    if spec.extras.get("softcap"):
        c = spec.extras["softcap"]
        logits = c * torch.tanh(logits / c)
    if alibi is not None:
        logits = logits + alibi
    if causal:
        mask = torch.ones(N, N, dtype=torch.bool).triu(1)
        logits = logits.masked_fill(mask, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    y = torch.einsum("hij,je,hde->id", p, xv, Wt)
    if layer.out_bias is not None:
        y = y + layer.out_bias.double()
    return y


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())


def one_line_error(fn, *needles):
    """``fn()`` raises an InputError whose message is one line containing every needle."""
    with pytest.raises(InputError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


@dataclass
class CliRun:
    code: int
    stdout: str
    stderr: str


_COMMANDS: dict = {}


def _click_command(typer_app):
    """typer rebuilds the click command from every function signature (evaluating each
    annotation) on each call of the app: about half of an in-process run. A click command
    serves any number of invocations (each gets a fresh context), so build it once."""
    if typer_app not in _COMMANDS:
        _COMMANDS[typer_app] = _build_command(typer_app)
    return _COMMANDS[typer_app]


def run_cli(*args) -> CliRun:
    """``tuckerctl ARGS`` in this process: ``cli.main`` (with its exit-code mapping) inside
    typer's CliRunner isolation, which captures stdout and stderr. Saves the 4-5 s torch
    import of a subprocess; keep subprocesses for what needs the process boundary. The
    signal handlers ``main`` installs are put back afterwards."""
    import signal
    from unittest import mock

    import typer.main
    from typer.testing import CliRunner

    from tuckerctl.cli import main

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    with CliRunner().isolation() as (out, err, _), mock.patch.object(typer.main, "get_command", _click_command):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        sys.stdout.flush()  # the isolation's text wrappers buffer; the bytes are read below
        sys.stderr.flush()
        stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    return CliRun(code, stdout, stderr)


def assert_user_error(res, *fragments) -> str:
    """Exit 2 with exactly one stderr line containing every fragment, no traceback
    (``res``: a CliRun or a subprocess.CompletedProcess); returns that line."""
    code = res.code if isinstance(res, CliRun) else res.returncode
    assert code == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]
