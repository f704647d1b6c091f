"""Model-level comparison metrics of a compressed model against its original.

Pure functions of logits / hidden states (no I/O, no transformers): the figures that
``llama-perplexity --kl-divergence`` reports for causal LMs (perplexity of both models,
KL divergence of the compressed next-token distribution from the original's, top-1
agreement) and, for encoders, cosine similarity of the final hidden states.

Per-token values are reduced in float64 as each window arrives (:class:`CausalTally`,
:class:`EncoderTally`), so memory is a few numbers per token whatever the text length.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def token_stats(original: Tensor, compressed: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Per-position statistics of two models' next-token logits (N, V) on ``targets`` (N,).

    Returns float64 tensors of length N: ``nll_original``, ``nll_compressed`` (negative
    log-likelihood of the target), ``kld`` (KL(original || compressed), in nats) and the
    boolean ``same_top1``."""
    lp = torch.log_softmax(original.double(), dim=-1)
    lq = torch.log_softmax(compressed.double(), dim=-1)
    t = targets.reshape(-1, 1)
    kld = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0)  # >= 0 up to rounding
    return {
        "nll_original": -lp.gather(1, t).squeeze(1),
        "nll_compressed": -lq.gather(1, t).squeeze(1),
        "kld": kld,
        "same_top1": original.argmax(-1) == compressed.argmax(-1),
    }


class CausalTally:
    """Accumulates :func:`token_stats` over windows; :meth:`result` gives the summary."""

    def __init__(self):
        self.nll_original = 0.0
        self.nll_compressed = 0.0
        self.same = 0
        self.klds: list[Tensor] = []  # float32 per token: p99 needs them all (4 bytes/token)
        self.kld_sum = 0.0

    @property
    def tokens(self) -> int:
        return sum(k.numel() for k in self.klds)

    def add(self, original: Tensor, compressed: Tensor, targets: Tensor) -> None:
        s = token_stats(original, compressed, targets)
        self.nll_original += float(s["nll_original"].sum())
        self.nll_compressed += float(s["nll_compressed"].sum())
        self.kld_sum += float(s["kld"].sum())
        self.same += int(s["same_top1"].sum())
        self.klds.append(s["kld"].float().cpu())

    def result(self) -> dict:
        n = self.tokens
        if n == 0:
            raise ValueError("no tokens scored")
        kld = torch.cat(self.klds).double()
        ppl_o, ppl_c = _exp(self.nll_original / n), _exp(self.nll_compressed / n)
        return {
            "perplexity": {"original": ppl_o, "compressed": ppl_c, "ratio": ppl_c / ppl_o},
            "kl_divergence": {"mean": self.kld_sum / n, "p99": float(torch.quantile(kld, 0.99)),
                              "max": float(kld.max())},
            "top1_agreement": self.same / n,
            "tokens": n,
        }


def _exp(x: float) -> float:
    return math.exp(x) if x < 709 else math.inf  # beyond float64: reported as non-finite


def cosine_rows(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of matching rows, float64 (a zero row against a zero row is 1)."""
    a, b = a.double(), b.double()
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    cos = (a * b).sum(-1) / (na * nb).clamp_min(1e-300)
    return torch.where((na == 0) & (nb == 0), torch.ones_like(cos), cos)


class EncoderTally:
    """Cosine similarity of final hidden states, per token and mean-pooled per window."""

    def __init__(self):
        self.token_cos: list[Tensor] = []
        self.pooled_cos: list[Tensor] = []

    def add(self, original: Tensor, compressed: Tensor) -> None:
        """``original``/``compressed``: (N, d) hidden states of one window (no padding)."""
        self.token_cos.append(cosine_rows(original, compressed).cpu())
        self.pooled_cos.append(cosine_rows(original.double().mean(0, keepdim=True),
                                           compressed.double().mean(0, keepdim=True)).cpu())

    def result(self) -> dict:
        if not self.token_cos:
            raise ValueError("no tokens scored")
        tok = torch.cat(self.token_cos)
        pooled = torch.cat(self.pooled_cos)
        return {
            "cosine": {"mean": float(tok.mean()), "min": float(tok.min()),
                       "pooled_mean": float(pooled.mean()), "pooled_min": float(pooled.min())},
            "tokens": tok.numel(),
            "windows": pooled.numel(),
        }
