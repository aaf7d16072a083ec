"""Loss curvature of linear layers for curvature-aware sharing (Geo-Sharing, arXiv 2511.06786): the two-sided
K-FAC metric, its Levenberg-Marquardt damping, shared-basis fits under it and the loss increase it predicts.

Conventions: a linear layer's weight W is (d_out, d_in). K-FAC ("Optimizing Neural Networks with
Kronecker-factored Approximate Curvature", arXiv 1503.05671) approximates the Fisher / Gauss-Newton block of W by
G (x) A, with A = E[x x^T] over the layer's input rows and G = E[g g^T] over the gradients g of the loss terms
with respect to the layer's output rows, so a perturbation D of W raises the loss by about
1/2 vec(D)^T (G (x) A) vec(D) = 1/2 tr(G D A D^T). Here A is a ``Gram`` of input rows and G a ``Gram`` of
output-gradient rows (both summed, with their row counts); "mean" below is the sum over the row count.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ConfigError
from methods.calibration import Gram, forward_batch
from methods.svd_llm import whitened_basis

LossSum = Callable[[nn.Module, Any], torch.Tensor]


def lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy of a token window ``{"input_ids": (b, s)}`` (b (s - 1) loss terms)."""
    if not (isinstance(batch, dict) and "input_ids" in batch):
        raise ConfigError("the loss curvature needs labelled calibration batches (image tasks) or token windows "
                          "({'input_ids': ...}, language models)")
    ids = batch["input_ids"]
    logits = forward_batch(model, batch).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")


def labelled_loss_sum(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy of an (inputs, labels) batch."""
    x, y = batch
    return F.cross_entropy(forward_batch(model, x).float(), y, reduction="sum")


# share of the device's free memory that the G sums of one pass may take (CUDA); the rest is for the model's forward
# and backward
DEVICE_MEMORY_SHARE = 0.3


def gradient_passes(sizes: Sequence[int], max_bytes: float | None) -> list[range]:
    """Consecutive runs of layers whose float64 G sums (``sizes``: d_out per layer) fit ``max_bytes`` together
    (at least one layer each); one run when ``max_bytes`` is None."""
    if max_bytes is None:
        return [range(len(sizes))]
    runs, start, used = [], 0, 0.0
    for j, d in enumerate(sizes):
        if j > start and used + 8.0 * d * d > max_bytes:
            runs.append(range(start, j))
            start, used = j, 0.0
        used += 8.0 * d * d
    return runs + [range(start, len(sizes))]


def output_gradient_grams(model: nn.Module, paths: Sequence[str], batches: Callable[[], Iterable[Any]],
                          loss_sum: LossSum, store: torch.device | str = "cpu",
                          max_bytes: float | None = None) -> dict[str, Gram]:
    """G of every linear in ``paths``: the sum over batches and output rows of g g^T, g the gradient of the batch's
    summed loss (``loss_sum``) w.r.t. that output row (one forward and backward of ``model`` per batch; no
    parameter gradient is formed). ``tokens`` counts the rows; float64, kept on ``store``.

    The sums are formed on each layer's device. ``paths`` (in forward order) are taken in passes whose G fit
    ``max_bytes`` (default: on CUDA, ``DEVICE_MEMORY_SHARE`` of the free memory; on the CPU, one pass), each pass a
    forward and backward per batch of ``batches()`` whose backward stops at the pass's first layer; a finished pass's
    G move to ``store``. LLaMA-7B's G are 83 GB in float64: about five passes on one H100."""
    modules = [model.get_submodule(p) for p in paths]
    if max_bytes is None and modules and modules[0].weight.is_cuda:
        max_bytes = DEVICE_MEMORY_SHARE * torch.cuda.mem_get_info(modules[0].weight.device)[0]
    weights = [m.weight for m in modules]
    flags = [w.requires_grad for w in weights]
    grams: dict[str, Gram] = {}
    try:
        for w in weights:
            w.requires_grad_(True)  # so the outputs are in the graph; only their gradients are computed
        for run in gradient_passes([m.out_features for m in modules], max_bytes):
            chunk = {paths[j]: Gram.zeros(modules[j].out_features, weights[j].device) for j in run}
            outputs: dict[str, torch.Tensor] = {}
            handles = [modules[j].register_forward_hook(
                lambda mod, args, out, path=paths[j]: outputs.__setitem__(path, out)) for j in run]
            try:
                with torch.enable_grad():
                    for batch in batches():
                        outputs.clear()
                        loss = loss_sum(model, batch)
                        for path, g in zip(outputs, torch.autograd.grad(loss, list(outputs.values()))):
                            chunk[path].add(g)
            finally:
                for h in handles:
                    h.remove()
            grams.update({p: Gram(g.xtx.to(store), g.tokens) for p, g in chunk.items()})
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    return grams


def damped_output_factor(g: torch.Tensor, beta: float) -> torch.Tensor:
    """Lower-triangular R (float64) with R R^T = G + (mean eigenvalue of G / beta) I: Levenberg-Marquardt damping
    of the output curvature ``g`` (d_out, d_out; a mean over rows). beta = inf: G itself (plus 1e-10 of its mean
    eigenvalue, so a rank-deficient G factorises); beta = 0: the curvature-blind sqrt(mean eigenvalue) I."""
    g = g.to(torch.float64)
    scale = float(g.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    if beta == 0:
        return scale ** 0.5 * eye
    return torch.linalg.cholesky(g + scale * (1.0 / beta + 1e-10) * eye)


def metric_basis(weights: Sequence[torch.Tensor], chol: torch.Tensor, out_factors: Sequence[torch.Tensor] | None,
                 rank: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One rank-``rank`` basis for several weights under the metric sum_i ||R_i^T (W_i - C_i B) L||_F^2.

    ``weights`` W_i (out_i, d_in); ``chol`` L with L L^T = the class's pooled X^T X; ``out_factors`` R_i (out_i,
    out_i) lower-triangular (``damped_output_factor``), or None for R_i = I: Basis Sharing's whitened fit
    (``whitened_basis``) exactly. With L^T [W_1^T R_1 | ... ] = U S V^T: basis B = (L^{-T} U_k S_k)^T (rank, d_in),
    C_i = R_i^{-T} V_i (V_i the block of V_k for W_i), the minimiser of the metric over shared bases. Float64 on
    ``chol``'s device."""
    if out_factors is None:
        return whitened_basis(weights, chol, rank)
    dev = chol.device
    factors = [r.to(dev, torch.float64) for r in out_factors]
    scaled = [(f.T @ w.detach().to(dev, torch.float64)) for w, f in zip(weights, factors)]  # R_i^T W_i
    basis, blocks = whitened_basis(scaled, chol, rank)
    return basis, [torch.linalg.solve_triangular(f.T, c, upper=True) for f, c in zip(factors, blocks)]


def predicted_increase(delta: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> float:
    """1/2 tr(G D A D^T): the K-FAC second-order loss increase of perturbing W by ``delta`` (d_out, d_in), for the
    mean input and output-gradient Grams ``a`` (d_in, d_in) and ``g`` (d_out, d_out)."""
    d = delta.to(a.device, torch.float64)
    return 0.5 * float(torch.einsum("oi,ij,pj,op->", d, a.double(), d, g.to(a.device, torch.float64)))
