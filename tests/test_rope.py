"""RoPE offset-averaged spectra (tuckerctl.rope) against transformers' rotary embedding applied to
dense tensors, offset by offset, in float64."""

import pytest
import torch

from tuckerctl.multilinear import HeadStack, mode_spectra
from tuckerctl.rope import Rotation, averaged_side_bases, averaged_spectra

f64 = dict(dtype=torch.float64)


def hf_rotations(head_dim, theta, partial, offsets):
    """R(t) for t < offsets from transformers' (Phi) rotary embedding and apply_rotary_pos_emb:
    row a of R(t) is the unit vector e_a rotated at position t (q R(i) R(j)^T k^T is the logit)."""
    from transformers import PhiConfig
    from transformers.models.phi.modeling_phi import PhiRotaryEmbedding, apply_rotary_pos_emb

    # Phi's rotary embedding honours partial_rotary_factor (Llama's uses the full head width).
    cfg = PhiConfig(hidden_size=head_dim * 2, num_attention_heads=2, rope_theta=theta,
                    partial_rotary_factor=partial, max_position_embeddings=offsets)
    emb = PhiRotaryEmbedding(cfg)
    pos = torch.arange(offsets)[None]
    eye = torch.eye(head_dim, **f64)[None, None].expand(1, offsets, head_dim, head_dim)  # (1, T, a, d_h)
    cos, sin = emb(eye.float(), pos)
    rot = int(head_dim * partial)
    cos, sin = cos.double()[..., :rot], sin.double()[..., :rot]
    # apply_rotary_pos_emb broadcasts cos/sin over dim 1 ("heads"): put offsets there.
    q = eye.permute(1, 0, 2, 3)  # (T, 1, a, d_h): batch = offset
    qr, _ = apply_rotary_pos_emb(q[..., :rot], q[..., :rot], cos[0][:, None, :], sin[0][:, None, :],
                                 unsqueeze_dim=1)
    return torch.cat([qr, q[..., rot:]], dim=-1)[:, 0]  # (T, d_h, d_h)


def dense_averaged(stack, R):
    """Singular values of the unfoldings stacked over offsets, / sqrt(T)."""
    T = R.shape[0]
    A = stack.left
    B = stack.right[stack.group_of]
    W = torch.einsum("hia,tab,hjb->thij", A, R, B)  # (T, H, m, n)
    H, m, n = W.shape[1:]
    sv = [torch.linalg.svdvals(W.permute(1, 0, 2, 3).reshape(H, -1)),
          torch.linalg.svdvals(W.permute(2, 0, 1, 3).reshape(m, -1)),
          torch.linalg.svdvals(W.permute(3, 0, 1, 2).reshape(n, -1))]
    return [s / T ** 0.5 for s in sv], W


@pytest.mark.parametrize("H,G,d,dh,partial", [(4, 2, 24, 8, 1.0), (3, 3, 20, 6, 1.0), (4, 1, 30, 8, 0.5)])
def test_averaged_spectra_match_transformers_rotations(H, G, d, dh, partial):
    g = torch.Generator().manual_seed(H * 10 + G)
    st = HeadStack(torch.randn(H, d, dh, generator=g, **f64), torch.randn(G, d, dh, generator=g, **f64))
    T, theta = 64, 100.0
    R = hf_rotations(dh, theta, partial, T)
    want, _ = dense_averaged(st, R)
    got = averaged_spectra(st, Rotation.from_theta(dh, theta, partial), T)
    for w, x in zip(want, got):
        k = min(len(w), len(x))
        # transformers computes cos/sin in float32: agreement to its rounding.
        assert torch.allclose(x[:k], w[:k], rtol=2e-6, atol=2e-6 * float(w[0]))
        assert all(float(v) <= 1e-6 * float(w[0]) for v in x[k:])
    # Offset 0 alone is the zero-offset form.
    z = averaged_spectra(st, Rotation.from_theta(dh, theta, partial), 1)
    for a, b in zip(z, mode_spectra(st)):
        k = min(len(a), len(b))
        assert torch.allclose(a[:k], b[:k], rtol=1e-8, atol=1e-8 * float(b[0]))


def test_averaged_bases_minimise_the_offset_averaged_projection_error():
    g = torch.Generator().manual_seed(7)
    H, G, d, dh, T = 4, 2, 24, 8, 48
    st = HeadStack(torch.randn(H, d, dh, generator=g, **f64) * torch.logspace(0, -1, d, **f64)[:, None],
                   torch.randn(G, d, dh, generator=g, **f64))
    rotation = Rotation.from_theta(dh, 50.0)
    _, W = dense_averaged(st, hf_rotations(dh, 50.0, 1.0, T))
    U2, U3 = averaged_side_bases(st, rotation, 6, 5, T)
    assert torch.allclose(U2.T @ U2, torch.eye(6, **f64), atol=1e-10)

    def err_left(U):
        return float(((W - torch.einsum("ia,ja,thjk->thik", U, U, W)) ** 2).sum() / T)

    def err_right(U):
        return float(((W - torch.einsum("thik,ka,ja->thij", W, U, U)) ** 2).sum() / T)

    # Zero-offset bases (leading left singular vectors of the t = 0 unfoldings) do worse.
    W0 = W[0]
    Z2 = torch.linalg.svd(W0.permute(1, 0, 2).reshape(d, -1), full_matrices=False)[0][:, :6]
    Z3 = torch.linalg.svd(W0.permute(2, 0, 1).reshape(d, -1), full_matrices=False)[0][:, :5]
    assert err_left(U2) <= err_left(Z2) + 1e-12
    assert err_right(U3) <= err_right(Z3) + 1e-12
    # And they are optimal: the error is the tail of the averaged spectrum.
    s = averaged_spectra(st, rotation, T)
    assert err_left(U2) == pytest.approx(float((s.left[6:] ** 2).sum()), rel=1e-8)
    assert err_right(U3) == pytest.approx(float((s.right[5:] ** 2).sum()), rel=1e-8)


@pytest.mark.parametrize("H,G", [(6, 3), (7, 7)])
def test_averaged_head_gram_in_blocks_of_heads_matches_the_dense_one(H, G, monkeypatch):
    # Blocks of 2 heads (the last one partial at H = 7): each block's rows from its diagonal
    # block on, mirrored below; against mean_t <W_t[h], W_t[h']> of the dense rotated tensors.
    import tuckerctl.rope as rope
    from tuckerctl.multilinear import reduce

    g = torch.Generator().manual_seed(H)
    d, dh, T = 20, 8, 32
    st = HeadStack(torch.randn(H, d, dh, generator=g, **f64), torch.randn(G, d, dh, generator=g, **f64))
    monkeypatch.setattr(rope, "_HEAD_BLOCK_ELEMENTS", 2 * H * dh * dh)
    _, W = dense_averaged(st, hf_rotations(dh, 100.0, 1.0, T))
    want = torch.einsum("thij,tkij->hk", W, W) / T
    got = rope._head_gram(reduce(st), Rotation.from_theta(dh, 100.0).averager(T))
    assert torch.allclose(got, want, rtol=2e-6, atol=2e-6 * float(want.abs().max()))
    assert torch.equal(got[2:, :2], got[:2, 2:].T)  # mirrored, not recomputed

