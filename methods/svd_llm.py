"""SVD-LLM (arXiv 2403.07378): truncation in the whitened space of the calibration inputs.

For a linear y = x W^T with inputs X (N x d_in) and M = X^T X = L L^T (Cholesky, L lower triangular), the rank-k
factorisation minimising ||X (W^T - W_hat^T)||_F is W_hat^T = L^{-T} U_k S_k V_k^T, from the SVD
L^T W^T = U S V^T: plain SVD of W weighs every input direction alike, this weighs them by how much the data
excites them. The same construction over several weights at once, [W_1^T | ... | W_n^T], with the pooled M of
their inputs, gives one basis L^{-T} U_k S_k shared by all of them (Basis Sharing); SVD-LLM is the case n = 1.

Rank: r = floor((1 - ratio) * m * n / (m + n)) per matrix, as plain ``svd``. Statistics: float64 running sums,
block by block over the dense model (``methods.calibration``); the compressed layers are ``LowRankLinear`` with
U = V_k (out x k) and V = (L^{-T} U_k S_k)^T (k x in) (SVD-LLM splits sqrt(S_k) over both; the product is the same).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from core.errors import ConfigError
from methods.base import METHODS, CompressContext, Method
from methods.calibration import Gram, capture_block_inputs, run_blocks
from methods.modules import LowRankLinear
from methods.svd import LowRankConfig, rank_for_ratio

DAMPING = 1e-6  # relative to the mean eigenvalue, added above -lambda_min when X^T X is not positive definite


@dataclass
class SVDLLMConfig(LowRankConfig):
    name: str = "svd_llm"


def whitening_factor(gram: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(L, damped): lower-triangular L (float64) with L L^T = ``gram`` (d x d). A gram that is not numerically
    positive definite (a dead input feature, fewer tokens than features) is first shifted by
    (-lambda_min + 1e-6 * mean eigenvalue) * I, as SVD-LLM's fallback (which uses an absolute 1e-6)."""
    m = gram.to(torch.float64)
    chol, info = torch.linalg.cholesky_ex(m)
    if int(info) == 0:
        return chol, False
    shift = -torch.linalg.eigvalsh(m)[0] + DAMPING * m.diagonal().mean().clamp_min(1e-30)
    return torch.linalg.cholesky(m + shift * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)), True


def whitened_basis(weights: Sequence[torch.Tensor], chol: torch.Tensor, rank: int
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One basis for several weights reading inputs with X^T X = L L^T (``chol`` = L, d_in x d_in).

    ``weights``: W_i of shape (out_i, d_in). Returns ``basis`` (rank, d_in) = (L^{-T} U_k S_k)^T and
    ``coeffs[i]`` (out_i, rank), the block of V_k for W_i, where L^T [W_1^T | ... | W_n^T] = U S V^T. Then
    W_i ~ coeffs[i] @ basis, and sum_i ||X (W_i^T - basis^T coeffs[i]^T)||_F^2 is the smallest any rank-``rank``
    shared basis achieves. Computed in float64 on ``chol``'s device.
    """
    d_in = chol.shape[0]
    if any(w.shape[1] != d_in for w in weights):
        raise ValueError(f"weights {[tuple(w.shape) for w in weights]} do not all read {d_in} features")
    stacked = torch.cat([w.detach().to(chol.device, torch.float64).T for w in weights], dim=1)  # d_in x sum out
    if not 1 <= rank <= min(stacked.shape):
        raise ValueError(f"rank {rank} outside [1, {min(stacked.shape)}] for weights {tuple(stacked.shape)}")
    u, s, vh = torch.linalg.svd(chol.T @ stacked, full_matrices=False)
    basis = torch.linalg.solve_triangular(chol.T, u[:, :rank] * s[:rank], upper=True).T  # rank x d_in
    coeffs = [block.T for block in vh[:rank].split([w.shape[0] for w in weights], dim=1)]
    return basis, coeffs


def whitened_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """||X (W - W_hat)^T||_F^2 = tr((W - W_hat) M (W - W_hat)^T) for M = X^T X, in float64."""
    delta = (weight.detach().double() - approx.detach().double()).to(gram.device)
    return float(torch.einsum("oi,ij,oj->", delta, gram.double(), delta))


@METHODS.register("svd_llm")
class SVDLLM(Method):
    config_class = SVDLLMConfig
    needs_calibration = True

    def check(self, adapter) -> None:
        super().check(adapter)
        adapter.check_block_linears(self.name, self.cfg.scope)
        for path, layer in adapter.scope(self.cfg.scope).items():
            if rank_for_ratio(layer.out_features, layer.in_features, self.cfg.ratio) < 1:
                raise ConfigError(f"method.ratio={self.cfg.ratio} leaves rank 0 for {path} "
                                  f"({layer.out_features}x{layer.in_features})")

    def apply(self, model, adapter, ctx: CompressContext) -> dict[str, float]:
        by_block = adapter.scope_roles(self.cfg.scope)
        roles = sorted({r for rs in by_block.values() for r in rs}, key=list(adapter.roles).index)
        ranks, damped = [], 0

        def compress(i: int, grams: dict[str, Gram]) -> None:
            nonlocal damped
            factors: dict[int, tuple[torch.Tensor, bool]] = {}  # one Cholesky per input group
            for role in by_block.get(i, ()):
                path = adapter.role_path(role, i)
                layer = model.get_submodule(path)
                gram = grams[role]
                if id(gram) not in factors:
                    factors[id(gram)] = whitening_factor(gram.xtx)
                    damped += factors[id(gram)][1]
                rank = self.cfg.fit_rank(rank_for_ratio(layer.out_features, layer.in_features, self.cfg.ratio))
                w = layer.weight
                basis, (coeff,) = whitened_basis([w], factors[id(gram)][0], rank)
                adapter.replace(path, LowRankLinear.from_factors(coeff.to(w.device, w.dtype),
                                                                 basis.to(w.device, w.dtype), layer.bias))
                ranks.append(rank)

        inputs = capture_block_inputs(adapter, ctx.calibration_batches(), ctx.progress)
        run_blocks(adapter, inputs, roles, compress, ctx.device, ctx.progress, desc="svd_llm")
        return {"method/rank_mean": sum(ranks) / len(ranks), "method/rank_min": min(ranks),
                "method/damped_grams": damped}
