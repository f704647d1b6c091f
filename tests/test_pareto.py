"""Error-vs-parameter math (tuckerctl.pareto) against dense float64 oracles.

The oracles never use pareto's own code: dense tensors are built from random factors,
their unfoldings are SVD'd with numpy, HOSVD truncations and GQA/MLA-format
reconstructions are formed explicitly, and frontiers are recomputed by brute force.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tuckerctl import pareto
from tuckerctl.adapters.base import LayerWeights
from tuckerctl.analysis import analyze_layer
from tuckerctl.multilinear import HeadStack
from tuckerctl.ranks import tucker_params

ENERGY = (0.9, 0.99, 0.999)
HYP = settings(max_examples=40, deadline=None)


# ----------------------------------------------------------------------------- helpers

def unfold(W: np.ndarray, mode: int) -> np.ndarray:
    return np.moveaxis(W, mode, 0).reshape(W.shape[mode], -1)


def dense_spectra(W: np.ndarray) -> list[np.ndarray]:
    return [np.linalg.svd(unfold(W, k), compute_uv=False) for k in range(3)]


def hosvd_error(W: np.ndarray, ranks) -> float:
    """Exact relative error of the truncated HOSVD at ``ranks`` (dense projections)."""
    Wh = W
    for k, r in enumerate(ranks):
        U = np.linalg.svd(unfold(W, k), full_matrices=False)[0][:, :r]
        Wh = np.moveaxis(np.tensordot(U @ U.T, np.moveaxis(Wh, k, 0), axes=1), 0, k)
    return float(np.linalg.norm(W - Wh) / np.linalg.norm(W))


def gqa_stack(H, G, d, dh, seed=0) -> HeadStack:
    g = torch.Generator().manual_seed(seed)
    return HeadStack(torch.randn(H, d, dh, generator=g, dtype=torch.float64),
                     torch.randn(G, d, dh, generator=g, dtype=torch.float64))


def dense_stack(W: np.ndarray) -> HeadStack:
    """Any (H, m, n) tensor as a head stack: W[h] = W[h] @ I."""
    n = W.shape[2]
    return HeadStack(torch.from_numpy(W), torch.eye(n, dtype=torch.float64)[None])


def analysis_of(layers: list[tuple[HeadStack, HeadStack]], model: dict) -> dict:
    """A minimal analysis document built with tuckerctl.analysis.analyze_layer."""
    docs = []
    for i, (pre, post) in enumerate(layers):
        lw = LayerWeights(i, pre, post, None, [], 0)
        docs.append(analyze_layer(lw, ENERGY, 1e-12, torch.device("cpu")))
    return {"schema": "tuckerctl.analysis/2", "model": model, "settings": {"energy": list(ENERGY), "tol": 1e-12},
            "layers": docs, "summary": {"verdicts": []}}


def gqa_model(d, H, G, dh) -> dict:
    att = "MHA" if G == H else ("MQA" if G == 1 else "GQA")
    return dict(family="test", attention=att, layers=1, d=d, heads=H, kv_heads=G, head_dim=dh, value_dim=dh)


def brute_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Pareto frontier by definition: points not dominated by a cheaper-or-equal, better one."""
    out = []
    for p, e in points:
        if not any((q <= p and f < e) or (q < p and f <= e) for q, f in points):
            out.append((p, e))
    return sorted(set(out))


spectrum = st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=9).map(lambda v: sorted(v, reverse=True))


def random_analysis(spectra_per_layer, H, shape) -> dict:
    """An analysis document with arbitrary (descending) spectra, each mode scaled to the
    same total energy as the head mode (as for any real tensor)."""
    layers = []
    for i, (s1, s2, s3) in enumerate(spectra_per_layer):
        norm_sq = sum(x * x for x in s1)
        modes = {}
        for name, s in zip(("head", "a", "b"), (s1, s2, s3)):
            scale = math.sqrt(norm_sq / sum(x * x for x in s))
            modes[name] = {"singular_values": [x * scale for x in s], "ceiling": len(s), "size": 0}
        tensor = {"shape": list(shape), "norm": math.sqrt(norm_sq),
                  "modes": dict(zip(("head", "query", "key"), modes.values()))}
        post = {**tensor, "modes": dict(zip(("head", "output", "value"), modes.values()))}
        layers.append({"index": i, "pre": tensor, "post": post})
    return {"model": gqa_model(shape[1], H, 1, 2), "layers": layers}


# ----------------------------------------------------------------------------- tail bound

@given(spectrum, st.integers(0, 12))
def test_tail_sums_are_sums_of_the_tail(sigma, r):
    T = pareto.tail_sums(sigma)
    assert len(T) == len(sigma) + 1 and T[-1] == 0.0
    assert float(pareto.tail_at(T, r)) == pytest.approx(sum(s * s for s in sigma[r:]), rel=1e-12, abs=0)


def test_tail_bound_against_dense_hosvd():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((4, 6, 5)) * np.geomspace(1, 0.05, 6)[None, :, None]
    spectra = dense_spectra(W)
    for ranks in itertools.product(range(1, 5), range(1, 7), range(1, 6)):
        bound = pareto.tail_error(spectra, ranks)
        exact = hosvd_error(W, ranks)
        assert exact <= bound + 1e-12
        if sum(r < s for r, s in zip(ranks, W.shape)) == 1:  # one mode truncated: the bound is exact
            assert bound == pytest.approx(exact, rel=1e-9, abs=1e-12)
    assert pareto.tail_error(spectra, W.shape) == 0.0


def test_error_is_capped_at_one():
    # Three equal tails each holding all the energy would give sqrt(3) uncapped.
    spectra = [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    assert pareto.tail_error(spectra, (0, 0, 0)) == 1.0
    assert pareto.tail_error(spectra, (1, 1, 1)) == 1.0  # sqrt(3/2) uncapped
    assert pareto.tail_error(spectra, (2, 2, 1)) == pytest.approx(math.sqrt(0.5), rel=1e-12)


def test_layers_add_tails_and_energies():
    """Two layers: err^2 = (tail_1 + tail_2) / (||W_1||^2 + ||W_2||^2), same ranks in both."""
    rng = np.random.default_rng(2)
    Ws = [rng.standard_normal((3, 5, 4)), 3 * rng.standard_normal((3, 5, 4))]
    doc = analysis_of([(dense_stack(W), dense_stack(W)) for W in Ws], gqa_model(5, 3, 3, 1))
    tt = pareto.tensor_tails(doc["layers"], "pre")
    for ranks in [(1, 2, 3), (2, 5, 1), (3, 5, 4)]:
        tails = [sum(float((s[r:] ** 2).sum()) for s, r in zip(dense_spectra(W), ranks)) for W in Ws]
        want = math.sqrt(sum(tails) / sum(float((W ** 2).sum()) for W in Ws))
        assert float(tt.error(*ranks)) == pytest.approx(want, rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------- frontiers

@HYP
@given(st.lists(st.tuples(st.integers(1, 50), st.floats(0, 1)), min_size=1, max_size=40))
def test_pareto_front_is_monotone_and_dominates(points):
    params = np.array([p for p, _ in points], dtype=float)
    errors = np.array([e for _, e in points])
    idx = pareto.pareto_front(params, errors)
    fp, fe = params[idx], errors[idx]
    assert np.all(np.diff(fp) > 0) and np.all(np.diff(fe) < 0)  # more parameters, strictly less error
    for p, e in points:  # every point is matched or beaten by a frontier point no more expensive
        assert np.any((fp <= p) & (fe <= e))
    assert sorted(zip(fp.tolist(), fe.tolist())) == brute_front([(float(p), e) for p, e in points])


def test_tucker_frontier_equals_brute_force_over_all_triples():
    """Frontier over every rank triple (grid with more points than ranks) against an
    exhaustive loop using ranks.tucker_params and numpy spectra of the dense layers."""
    rng = np.random.default_rng(5)
    Ws = [rng.standard_normal((3, 6, 5)) * np.geomspace(1, 0.1, 5)[None, None, :] for _ in range(2)]
    doc = analysis_of([(dense_stack(W), dense_stack(W)) for W in Ws], gqa_model(6, 3, 3, 2))
    tt = pareto.tensor_tails(doc["layers"], "pre")
    front = pareto.tucker_frontier(tt, points=50)
    total = sum(float((W ** 2).sum()) for W in Ws)
    pts = []
    for ranks in itertools.product(range(1, 4), range(1, 7), range(1, 6)):
        tail = sum(float((s[r:] ** 2).sum()) for W in Ws for s, r in zip(dense_spectra(W), ranks))
        pts.append((float(sum(tucker_params(W.shape, ranks) for W in Ws)), min(1.0, math.sqrt(tail / total))))
    want = brute_front(pts)
    got = sorted(zip(front.params.tolist(), front.errors.tolist()))
    assert len(got) == len(want)
    for (p, e), (q, f) in zip(got, want):
        assert p == q and e == pytest.approx(f, rel=1e-8, abs=1e-12)


def test_rank_grid_and_parameter_counts():
    g = pareto.rank_grid(4096, 24, extra=(384, 5000, 0))
    assert g[0] == 1 and g[-1] == 4096 and 384 in g and len(g) < 40 and np.all(np.diff(g) > 0)
    doc = random_analysis([([3, 2, 1], [5, 4, 3, 2], [2, 1])] * 3, H=3, shape=(3, 10, 7))
    tt = pareto.tensor_tails(doc["layers"], "pre")
    c = pareto.tucker_points(tt, points=10)
    for p, r in zip(c.params, c.ranks):
        assert p == 3 * tucker_params((3, 10, 7), r)


@HYP
@given(st.lists(st.tuples(spectrum, spectrum, spectrum), min_size=1, max_size=3), st.integers(1, 8))
def test_shaped_formats_never_beat_tucker_frontier_in_tucker_parameters(spectra, H):
    """GQA-/MLA-shaped triples are Tucker triples: priced as Tucker formats, none lies
    below the Tucker frontier."""
    doc = random_analysis([(s1[:H], s2, s3) for s1, s2, s3 in spectra], H=H, shape=(H, 9, 9))
    for key in ("pre", "post"):
        t = pareto.tradeoff(doc, key, points=6, count="tucker")
        for curve in (t.gqa, t.mla):
            for p, e in zip(curve.params, curve.errors):
                assert np.any((t.tucker.params <= p) & (t.tucker.errors <= e + 1e-12)), (key, p, e)


def test_native_counts_let_gqa_beat_tucker_negative_control():
    """Priced natively, the model's own GQA point (error 0) beats every Tucker format of
    its size: the Tucker core does not exploit per-head rank d_h. This is why figure 4
    uses native counts and why the property above needs count='tucker'."""
    d, H, G, dh = 32, 8, 2, 4
    doc = analysis_of([(gqa_stack(H, G, d, dh, 1), gqa_stack(H, G, d, dh, 2))], gqa_model(d, H, G, dh))
    t = pareto.tradeoff(doc, "pre")
    assert t.model.error == 0.0
    assert pareto.best_error(t.tucker, t.model.params) > 0.05


# ----------------------------------------------------------------------------- the model's own point

@pytest.mark.parametrize("H,G", [(8, 2), (4, 1), (4, 4)])
def test_model_point_sits_at_its_ceilings(H, G):
    d, dh = 24, 3
    stacks = [(gqa_stack(H, G, d, dh, 2 * i), gqa_stack(H, G, d, dh, 2 * i + 1)) for i in range(2)]
    doc = analysis_of(stacks, gqa_model(d, H, G, dh))
    for k, key in enumerate(("pre", "post")):
        p = pareto.model_point(doc, key)
        assert p.error == 0.0  # nothing is stored beyond a ceiling: exactly zero
        assert p.ranks == (H, min(d, H * dh), min(d, G * dh))
        # Native count = the numbers in the per-head factors (A_h and B_g, or O_h and V_g).
        assert p.params == sum(s[k].left.numel() + s[k].right.numel() for s in stacks)
    # Negative control: a ceiling below the real rank leaves a positive tail.
    doc["layers"][0]["pre"]["modes"]["key"]["ceiling"] = G * dh - 1
    assert pareto.model_point(doc, "pre").error > 1e-3


def test_model_point_of_mla_counts_its_projections():
    model = dict(family="deepseek_v3", attention="MLA", layers=1, d=64, heads=4, kv_heads=4, head_dim=12,
                 value_dim=8, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=4)
    # q_a 64x24, q_b 24x(4*12), kv_a 64x(16+4), kv_b nope part 16x(4*8); kv_a c-rows again, kv_b v part, o_proj.
    assert pareto.native_params(model, "pre") == 64 * 24 + 24 * 48 + 64 * 20 + 16 * 32
    assert pareto.native_params(model, "post") == 64 * 16 + 16 * 32 + 32 * 64


# ----------------------------------------------------------------------------- native formats are real

def test_mla_shaped_point_is_achievable_with_its_parameter_count():
    """Build the MLA-format factors of the projection P2 W[h] P3 explicitly: their
    element count is the curve's parameter count, their error at most its tail bound."""
    d, H, G, dh, r2, r3 = 40, 4, 2, 3, 6, 5
    stack = gqa_stack(H, G, d, dh, 7)
    doc = analysis_of([(stack, gqa_stack(H, G, d, dh, 8))], gqa_model(d, H, G, dh))
    W = stack.dense().numpy()
    U2 = np.linalg.svd(unfold(W, 1), full_matrices=False)[0][:, :r2]
    U3 = np.linalg.svd(unfold(W, 2), full_matrices=False)[0][:, :r3]
    A, B = stack.left.numpy(), stack.right.numpy()
    q_up = [U2.T @ A[h] for h in range(H)]  # (r2, dh) per head
    k_up = [U3.T @ B[h // (H // G)] for h in range(H)]  # (r3, dh) per head
    numel = U2.size + sum(x.size for x in q_up) + U3.size + sum(x.size for x in k_up)
    What = np.stack([U2 @ q_up[h] @ k_up[h].T @ U3.T for h in range(H)])
    err = np.linalg.norm(W - What) / np.linalg.norm(W)
    curve = pareto.mla_points(pareto.tensor_tails(doc["layers"], "pre"), "pre", d, dh, points=50)
    i = int(np.flatnonzero((curve.ranks[:, 1] == r2) & (curve.ranks[:, 2] == r3))[0])
    assert curve.params[i] == numel
    assert err <= curve.errors[i] + 1e-12
    assert err == pytest.approx(hosvd_error(W, (H, r2, r3)), rel=1e-9)


def test_gqa_shaped_error_is_exact_or_a_lower_bound():
    """Best GQA-G' approximation, computed densely per group (each group of heads shares
    a d_h-wide key space: the group's key-mode tail), against the GQA-shaped points."""
    d, H, dh = 24, 4, 3
    stack = gqa_stack(H, H, d, dh, 11)  # MHA
    doc = analysis_of([(stack, gqa_stack(H, H, d, dh, 12))], gqa_model(d, H, H, dh))
    W = stack.dense().numpy()
    tt = pareto.tensor_tails(doc["layers"], "pre")
    curve = pareto.gqa_points(tt, d, dh, [1, 2, 4], own=H)
    assert curve.lower == (True, True, False) and curve.errors[2] == 0.0
    for i, (G, e) in enumerate(zip((1, 2), curve.errors[:2])):
        tail, What = 0.0, np.zeros_like(W)
        for g in range(G):
            heads = range(g * H // G, (g + 1) * H // G)
            Ug, s, _ = np.linalg.svd(np.concatenate([W[h].T for h in heads], axis=1), full_matrices=False)
            tail += float((s[dh:] ** 2).sum())
            K = Ug[:, :dh]  # the group's shared key matrix B_g
            for h in heads:
                What[h] = (W[h] @ K) @ K.T  # A'_h B_g^T: a genuine GQA-G head
        best = np.linalg.norm(W - What) / np.linalg.norm(W)
        assert best == pytest.approx(math.sqrt(tail) / np.linalg.norm(W), rel=1e-9)  # the oracle is consistent
        assert e <= best + 1e-12  # the plotted value never flatters GQA less than reality
        assert curve.params[i] == d * H * dh + d * G * dh


def test_best_error_and_params_for():
    c = pareto.Curve(np.array([10.0, 20.0, 40.0]), np.array([0.5, 0.1, 0.0]), np.zeros((3, 3), int))
    assert pareto.best_error(c, 25) == 0.1 and math.isnan(pareto.best_error(c, 5))
    assert pareto.params_for(c, 0.1) == 20 and pareto.params_for(c, 0.0) == 40
    assert math.isnan(pareto.params_for(c, -1))
