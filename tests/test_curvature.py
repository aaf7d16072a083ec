"""Curvature tools agree with dense linear algebra."""
import pytest
import torch

from methods.curvature import clip_low_curvature, high_curvature_energy, lanczos_topk, top_eigenpairs, weight_hvp


def psd(n, seed=0, decay=0.9):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    evals = decay ** torch.arange(n, dtype=torch.float64) * 10
    return (q * evals) @ q.T, evals


@pytest.mark.parametrize("solver", ["lanczos", "lobpcg"])
def test_top_eigenpairs_match_eigh(solver):
    a, evals = psd(120)
    lam, vec = top_eigenpairs(a, 12, solver=solver)
    torch.testing.assert_close(lam, evals[:12], rtol=1e-8, atol=1e-10)
    # eigenvectors up to sign: A v = lambda v and orthonormal
    torch.testing.assert_close(a @ vec, vec * lam, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(vec.T @ vec, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-8)


def test_lanczos_with_full_krylov_space_is_exact_for_all_pairs():
    a, _ = psd(30, decay=0.7)
    lam, vec = lanczos_topk(lambda v: a @ v, 30, 30, iters=30)
    ref = torch.linalg.eigvalsh(a).flip(0)
    torch.testing.assert_close(lam, ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(vec @ torch.diag(lam) @ vec.T, a, rtol=1e-8, atol=1e-9)


def test_weight_hvp_matches_the_explicit_hessian():
    torch.manual_seed(0)
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randn(16, 3, dtype=torch.float64)
    w = torch.randn(3, 5, dtype=torch.float64)

    def loss(weight):
        return torch.tanh(x @ weight.T - y).pow(2).mean()

    hess = torch.autograd.functional.hessian(loss, w).reshape(15, 15)
    hvp = weight_hvp(loss, w)
    v = torch.randn(15, dtype=torch.float64)
    torch.testing.assert_close(hvp(v), hess @ v, rtol=1e-10, atol=1e-12)
    lam, _ = lanczos_topk(hvp, 15, 4, iters=15)
    torch.testing.assert_close(lam, torch.linalg.eigvalsh(hess).flip(0)[:4], rtol=1e-8, atol=1e-10)


def test_energy_and_clip():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64))
    lam = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    delta = torch.randn(4, 8, dtype=torch.float64)
    expected = sum(lam[i] * (delta @ u[:, i]).pow(2).sum() for i in range(3))
    torch.testing.assert_close(high_curvature_energy(delta, u, lam), expected)
    low = clip_low_curvature(delta, u, tau=1e9)
    torch.testing.assert_close(low @ u, torch.zeros(4, 3, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(low + (delta @ u) @ u.T, delta)  # nothing clipped below the radius
    clipped = clip_low_curvature(delta, u, tau=0.1)
    assert float(clipped.norm()) == pytest.approx(0.1)
    assert float(clip_low_curvature(delta, u, tau=0.0).norm()) == 0.0
