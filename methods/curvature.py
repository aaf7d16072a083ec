"""Curvature tools for curvature-aware sharing (Geo-Sharing, arXiv 2511.06786): top eigenpairs of a symmetric
operator by Lanczos or LOBPCG, Hessian-vector products of a loss w.r.t. one weight matrix, high-curvature energy
of a perturbation, and the trust-region clip of its low-curvature part.

Conventions: a linear layer's weight W is (d_out, d_in). With the layer-wise Gauss-Newton proxy
H ~ (X^T X) (x) I, curvature directions live in input space: ``u`` are (d_in, t) orthonormal columns and a
perturbation delta (d_out, d_in) has high-curvature energy sum_i lambda_i ||delta u_i||^2.
"""
from __future__ import annotations

from typing import Callable

import torch

MatVec = Callable[[torch.Tensor], torch.Tensor]


def lanczos_topk(matvec: MatVec, dim: int, k: int, iters: int | None = None, seed: int = 0,
                 dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest ``k`` eigenpairs of a symmetric operator of size ``dim`` (Lanczos with full reorthogonalisation).

    ``matvec(v)`` maps a (dim,) vector to (dim,). Returns eigenvalues (k,) in descending order and orthonormal
    eigenvectors (dim, k). ``iters`` Krylov steps (default min(dim, 2k + 20)); exact when iters == dim.
    """
    if not 0 < k <= dim:
        raise ValueError(f"k={k} must be in [1, dim={dim}]")
    m = min(dim, iters or 2 * k + 20)
    m = max(m, k)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(dim, generator=gen, dtype=dtype).to(device)
    q /= q.norm()
    basis = torch.zeros(dim, m, dtype=dtype, device=device)
    alpha = torch.zeros(m, dtype=dtype)
    beta = torch.zeros(max(m - 1, 0), dtype=dtype)
    steps = m
    for j in range(m):
        basis[:, j] = q
        w = matvec(q).to(dtype)
        alpha[j] = torch.dot(w, q).cpu()
        # full reorthogonalisation (twice is enough) keeps the Krylov basis orthonormal in finite precision
        for _ in range(2):
            w = w - basis[:, : j + 1] @ (basis[:, : j + 1].T @ w)
        if j == m - 1:
            break
        b = w.norm()
        if b < 1e-12 * max(1.0, float(alpha[: j + 1].abs().max())):
            steps = j + 1  # invariant subspace found: the spectrum restricted to it is exact
            break
        beta[j] = b.cpu()
        q = w / b
    t = torch.diag(alpha[:steps]) + torch.diag(beta[: steps - 1], 1) + torch.diag(beta[: steps - 1], -1)
    evals, evecs = torch.linalg.eigh(t)
    order = torch.argsort(evals, descending=True)[:k]
    ritz = basis[:, :steps] @ evecs[:, order].to(device)
    return evals[order].to(device), ritz


def top_eigenpairs(gram: torch.Tensor, k: int, solver: str = "lanczos", seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest ``k`` eigenpairs of a symmetric PSD matrix (e.g. X^T X), by ``lanczos``, ``lobpcg`` or ``eigh``."""
    n = gram.shape[0]
    k = min(k, n)
    g = gram.double()
    if solver == "eigh" or k * 3 >= n:  # LOBPCG needs n >= 3k; small problems are cheapest exactly
        evals, evecs = torch.linalg.eigh(g)
        return evals.flip(0)[:k], evecs.flip(1)[:, :k]
    if solver == "lanczos":
        return lanczos_topk(lambda v: g @ v, n, k, iters=min(n, 2 * k + 40), seed=seed, device=g.device)
    if solver == "lobpcg":
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x0 = torch.randn(n, k, generator=gen, dtype=torch.float64).to(g.device)
        evals, evecs = torch.lobpcg(g, k=k, X=x0, largest=True, tol=1e-8, niter=200)
        return evals, evecs
    raise ValueError(f"unknown eigensolver {solver!r}; valid: lanczos, lobpcg, eigh")


def weight_hvp(loss_fn: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor) -> MatVec:
    """Hessian-vector product of ``loss_fn(weight)`` w.r.t. ``weight``, on flattened vectors (numel,)."""
    w = weight.detach().requires_grad_(True)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(w)
        (grad,) = torch.autograd.grad(loss, w, create_graph=True)
        (hv,) = torch.autograd.grad(grad, w, grad_outputs=v.view_as(w).to(grad.dtype))
        return hv.reshape(-1).detach()

    return matvec


def high_curvature_energy(delta: torch.Tensor, u: torch.Tensor, lam: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i lam_i ||delta u_i||^2 (or the unweighted ||delta U||_F^2 when ``lam`` is None).

    ``delta`` (d_out, d_in), ``u`` (d_in, t) orthonormal, ``lam`` (t,).
    """
    proj = delta.double() @ u.double()
    if lam is None:
        return proj.pow(2).sum()
    return (proj.pow(2) * lam.double().clamp_min(0)).sum()


def clip_low_curvature(delta: torch.Tensor, u: torch.Tensor, tau: float) -> torch.Tensor:
    """The low-curvature part delta (I - U U^T), scaled down to Frobenius norm ``tau`` when it is longer."""
    low = delta.double() - (delta.double() @ u.double()) @ u.double().T
    norm = float(low.norm())
    if norm > tau:
        low = low * (tau / norm)
    return low.to(delta.dtype)
