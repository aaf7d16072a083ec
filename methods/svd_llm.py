"""SVD-LLM (arXiv 2403.07378): truncation in the whitened space of the calibration inputs.

For a linear y = x W^T with inputs X (N x d_in) and M = X^T X = L L^T (Cholesky, L lower triangular), the rank-k
factorisation minimising ||X (W^T - W_hat^T)||_F is W_hat^T = L^{-T} U_k S_k V_k^T, from the SVD
L^T W^T = U S V^T: plain SVD of W weighs every input direction alike, this weighs them by how much the data
excites them. The same construction over several weights at once, [W_1^T | ... | W_n^T], with the pooled M of
their inputs, gives one basis L^{-T} U_k S_k shared by all of them (Basis Sharing); SVD-LLM is the case n = 1.

Rank: r = floor((1 - ratio) * m * n / (m + n)) per matrix, as plain ``svd``. Statistics: float64 running sums,
block by block over the dense model (``methods.calibration``); the compressed layers are ``LowRankLinear`` with
U = V_k (out x k) and V = (L^{-T} U_k S_k)^T (k x in) (SVD-LLM splits sqrt(S_k) over both; the product is the same).

``update: true`` adds SVD-LLM's parameter update (``whitening_local_update`` of the official code): a second stream
of the calibration windows runs through the compressed model as it is being built; for block i, the still dense
block is fed that stream (the compressed model's block input) and the inputs Z of its linears are summed as
Z^T Z, each layer is truncated as above, then U is refit with V fixed, U = argmin ||Z W^T - Z V^T U^T||_F (the
dense layer's outputs on the same inputs; ``refit_coefficients``), and the stream moves on through the compressed,
updated block. This holds a second copy of the cached hidden states.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from core.errors import ConfigError
from methods.base import METHODS, CompressContext, Method
from methods.calibration import (
    BlockInputs,
    Gram,
    block_device,
    capture_block_inputs,
    forward_block,
    input_keys,
    run_blocks,
)
from methods.modules import LowRankLinear
from methods.svd import LowRankConfig, rank_for_ratio

DAMPING = 1e-6  # relative to the mean eigenvalue, added above -lambda_min when X^T X is not positive definite


@dataclass
class SVDLLMConfig(LowRankConfig):
    update: bool = False  # SVD-LLM's parameter update: refit U on the compressed model's inputs (module docstring)


def dense_block_grams(adapter, stream: BlockInputs, index: int, roles: Sequence[str]) -> dict[str, Gram]:
    """X^T X (float64) of the inputs of the ``roles`` linears of block ``index`` (``grams[role]``, one ``Gram`` per
    input group) over the batches of ``stream``, that block's inputs; ``stream`` is left as it is."""
    keys = input_keys(adapter, roles)
    block = adapter.blocks()[index]
    device = block_device(block)
    grams: dict[str, Gram] = {}
    handles = []
    for key in dict.fromkeys(keys.values()):
        linear = block.get_submodule(adapter.roles[key])
        grams[key] = Gram.zeros(linear.in_features, device)
        handles.append(linear.register_forward_hook(lambda m, args, out, g=grams[key]: g.add(args[0])))
    try:
        for h in stream.hidden:  # one batch at a time: its output is dropped
            forward_block(adapter, BlockInputs([h], stream.block_kwargs), index, device)
    finally:
        for handle in handles:
            handle.remove()
    return {role: grams[key] for role, key in keys.items()}


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

    def check(self, adapter) -> None:
        super().check(adapter)
        adapter.check_block_linears(self.name, self.cfg.scope)
        for path, layer in adapter.scope(self.cfg.scope).items():
            if rank_for_ratio(layer.out_features, layer.in_features, self.cfg.ratio) < 1:
                raise ConfigError(f"method.ratio={self.cfg.ratio} leaves rank 0 for {path} "
                                  f"({layer.out_features}x{layer.in_features})")

    def semantic_config(self) -> dict[str, Any]:
        d = super().semantic_config()
        if not d["update"]:
            d.pop("update")  # added after run ids existed: without the update, the run id is the one before it
        return d

    def apply(self, model, adapter, ctx: CompressContext) -> dict[str, float]:
        from methods.basis_sharing import refit_coefficients  # basis_sharing builds on this module

        by_block = adapter.scope_roles(self.cfg.scope)
        roles = sorted({r for rs in by_block.values() for r in rs}, key=list(adapter.roles).index)
        ranks, damped, gains = [], 0, []
        with ctx.stage("calibration"):
            inputs = capture_block_inputs(adapter, ctx.calibration_batches(), ctx.progress)
        # the compressed model's block inputs; block 0 reads the embeddings, the same as the dense model's
        stream = BlockInputs([h.clone() for h in inputs.hidden], inputs.block_kwargs) if self.cfg.update else None

        def compress(i: int, grams: dict[str, Gram]) -> None:
            nonlocal damped
            update_grams = dense_block_grams(adapter, stream, i, by_block.get(i, ())) if stream is not None else {}
            factors: dict[int, tuple[torch.Tensor, bool]] = {}  # one Cholesky per input group
            for role in by_block.get(i, ()):
                path = adapter.role_path(role, i)
                layer = model.get_submodule(path)
                gram = grams[role]
                if id(gram) not in factors:
                    with ctx.stage("eigen"):
                        factors[id(gram)] = whitening_factor(gram.xtx)
                    damped += factors[id(gram)][1]
                rank = self.cfg.fit_rank(rank_for_ratio(layer.out_features, layer.in_features, self.cfg.ratio))
                w = layer.weight
                with ctx.stage("fitting"):
                    basis, (coeff,) = whitened_basis([w], factors[id(gram)][0], rank)
                low = LowRankLinear.from_factors(coeff.to(w.device, w.dtype), basis.to(w.device, w.dtype), layer.bias)
                adapter.replace(path, low)
                ranks.append(rank)
                if role in update_grams:
                    m = update_grams[role].xtx
                    before = whitened_error(w, low.dense_weight(), m)
                    (u,) = refit_coefficients(low.v, [w], m)
                    low.u.copy_(u)
                    after = whitened_error(w, low.dense_weight(), m)
                    gains.append(after / before if before > 0 else 1.0)
            if stream is not None:
                forward_block(adapter, stream, i, block_device(adapter.blocks()[i]))

        with ctx.stage("statistics"):  # the blocks' forwards and X^T X sums; eigen and fitting nest inside
            run_blocks(adapter, inputs, roles, compress, ctx.device, ctx.progress, desc="svd_llm")
        out = {"method/rank_mean": sum(ranks) / len(ranks), "method/rank_min": min(ranks),
               "method/damped_grams": damped}
        if gains:  # the output error on the update's inputs after / before the update, mean over layers
            out["method/update_error_ratio"] = sum(gains) / len(gains)
        return out
