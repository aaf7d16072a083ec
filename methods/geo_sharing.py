"""Geo-Sharing (arXiv 2511.06786; at ICML 2026 "Curvature-aware Graph Coloring", CGC): cross-layer basis sharing
fitted under the curvature of the loss, with layers coloured into sharing classes by their curvature profiles.

What the sources state (the project's Geo-Sharing specification, section 1.2): a sharing configuration is a
colouring alpha: layers -> classes, each class one shared low-rank basis; a second-order (Taylor / Hessian)
criterion aligns the sharing perturbation with the flat directions of the loss; layers "with similar curvature
profiles" are grouped (ICML abstract), not only adjacent ones; a trust region bounds the movement along flat
directions. The body, equations and code are not available; this is our reading, every step on Basis Sharing's
building blocks (``methods.basis_sharing``), each kept because it measurably lowers perplexity (BENCHMARKS.md,
"Geo-Sharing ablation"):

1. **Nodes**: one graph per matrix type (adapter role) and shape component. ``share_types`` (by model kind, as
   Basis Sharing's ``shared``: q, k, v, gate, up on LLaMA; the fused qkv and fc1 on timm ViT / Swin) are coloured;
   every other scope role is private (a class of one). Swin's stages are separate components.
2. **Loss curvature** (``hessian: loss``): the two-sided K-FAC metric of every layer, G (x) A
   (``methods.curvature``): A the layer's input Gram (block by block on the dense model, as Basis Sharing),
   G = E[g g^T] of the loss gradients at the layer's output, from one forward and backward of the dense model
   per calibration batch (LM cross-entropy of the windows; cross-entropy of the labelled calibration images). A
   class G_c is fitted by minimising sum_i tr(G_i D_i A_c D_i^T), D_i = C_i B - W_i (``metric_basis``: the SVD of
   the stacked L^T W_i^T R_i). The whitened fit (Basis Sharing, SVD-LLM) is the case G_i = I; G weights both the
   output directions and the layers of a class by how much the loss feels them. ``hessian: kfac`` is that
   input-only metric (``beta`` then does nothing). Evidence: the largest gain of the ablation on both language
   beds (demo_lm at 0.5, adjacent pairs: 123.25 -> 120.46; 12-layer WikiText-2 model: 152.35 -> 151.89).
3. **Trust region** (``beta``): Levenberg-Marquardt damping G + (mean eigenvalue of G / beta) I, the multiplier
   form of a trust region (the step of the damped model solves the radius-constrained one): the fit may use G's
   flat output directions only as far as the damping allows. beta = 0: fully damped (G_i -> its mean eigenvalue
   times I, curvature-blind directions); beta = inf: undamped. The clip-and-refit of earlier versions could only
   add whitened error (the fit is already the metric's projection) and is gone. Evidence: small; at 0.5 the
   sweep beta = 0, 1, 10, 100, inf gives 121.28, 120.44, 120.48, 120.46, 120.46 on demo_lm (optimum inside);
   on the 12-layer model it falls towards inf (152.11 at 0, 151.91 at 10, 151.89 at inf). Default 10: within
   0.02 of the best on both.
4. **Colouring** (``colouring: curvature``): a layer's curvature profile is P_i = Z_i Z_i^T with
   Z_i = L^T W_i^T R_i (L the component's pooled whitening, R_i the damped output factor): the loss curvature with
   respect to the layer's (whitened) input. Similarity = the cosine of profiles <P_i, P_j>_F / (|P_i| |P_j|);
   average-linkage clustering over any layers gives a dendrogram; the classes are the cut of the dendrogram that
   minimises J = sum over classes and layers of the predicted loss increase 1/2 tr(G_i D_i A_i D_i^T) (dynamic
   programming over the tree: 2L - 1 candidate classes, each scored without a fit by ``ClassCosts``). Every
   class gets the rank of its size under the ratio (Basis Sharing's ``basis_rank``), so every cut keeps the
   parameter budget and the number of classes is chosen by J, not by a rule; Basis Sharing's adjacent pairs are
   kept instead when their J is lower, so by its own criterion the colouring is never worse than pairs.
   ``num_classes: K`` cuts the dendrogram into exactly K classes instead; ``colouring: adjacent`` takes
   contiguous runs (K default ceil(L/2): Basis Sharing's pairs).
   Evidence: under the input-only metric it lowers perplexity at 0.3 and 0.5 on both language beds (demo_lm
   0.5: 123.25 -> 122.74; 12-layer 0.5: 152.35 -> 152.09, 3 non-adjacent classes); under the loss metric it
   helps at 4 of the ablation's 8 cells (up to -0.18) and hurts at 3 (up to +0.18): J ranks class choices only
   to about that size.
5. **Budget**: a class of n layers at rank k stores k d_in + n k d_out <= (1 - ratio) n d_in d_out (two-sided:
   k (d_in + d_out) + n k^2 under the same bound), whatever the colouring.
6. ``basis_form: two_sided`` stores W_i ~ U_b S_i V_b^T: the input basis V_b of step 2, an output basis U_b (top-k
   left singular vectors of the class's coefficients weighted by the basis's whitened Gram) shared too, and a
   k x k core S_i per layer (``TwoSidedSharedLinear``); the colouring scores the one-sided fit.

No step depends on an absolute size (no eigenpair count): every step acts on LLaMA-7B shapes and on demo models.
``colouring: adjacent, hessian: kfac`` is Basis Sharing exactly. Cost: one forward + backward of the dense model
per calibration batch (G), the block-wise pass (A), per coloured component two d_in x d_in products per layer
(H_i, K_i) and one Cholesky + eigh of d_in x d_in per candidate class (2L - 1 + ceil(L/2)), then the final fits.
Memory: G is d_out^2 per layer, kept on the CPU in float64 (LLaMA-7B: about 2.6 GB per block, mostly gate/up),
the coloured roles' A as before (about 0.27 GB per block); while a component is coloured, its H_i, K_i, A_i and
profiles on the device (LLaMA-7B: 32 x 4 x 134 MB = 17 GB in float64).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from core.errors import ConfigError
from methods.base import METHODS, CompressContext, Method
from methods.basis_sharing import DEFAULT_KIND, SharingPlan, basis_rank, install_shared_basis, shared_roles_for
from methods.calibration import Gram, capture_block_inputs, run_blocks
from methods.curvature import (
    damped_output_factor,
    labelled_loss_sum,
    lm_loss_sum,
    metric_basis,
    output_gradient_grams,
    predicted_increase,
)
from methods.modules import TwoSidedSharedLinear
from methods.svd import LowRankConfig
from methods.svd_llm import whitening_factor
from tasks.adapters import ModelAdapter

log = logging.getLogger("compbench")

COLOURINGS = ("curvature", "adjacent")
HESSIANS = ("loss", "kfac")
FORMS = ("one_sided", "two_sided")


@dataclass
class GeoSharingConfig(LowRankConfig):
    # roles coloured into sharing classes, by model kind (transformers' model_type; "vit" / "swin" for timm);
    # other kinds use "default"; every other role of the scope is private (one class per layer)
    share_types: dict[str, list[str]] = field(default_factory=lambda: {
        DEFAULT_KIND: ["q", "k", "v", "gate", "up"],
        "mistral": ["q", "gate", "up"],  # grouped-query k/v stay private, as Basis Sharing's Mistral configs
        "vit": ["qkv", "fc1"],
        "swin": ["qkv", "fc1"],
    })
    colouring: str = "curvature"  # curvature (profile dendrogram, J-minimising cut) | adjacent (contiguous runs)
    num_classes: int | None = None  # K per coloured component; None: curvature -> chosen by J, adjacent -> ceil(L/2)
    hessian: str = "loss"  # loss: two-sided K-FAC G (x) A | kfac: input-only A (the whitened fit)
    beta: float = 10.0  # trust region: damping G + (mean eigenvalue / beta) I; 0: curvature-blind, inf: none
    basis_form: str = "one_sided"  # one_sided: W_i ~ C_i B | two_sided: W_i ~ U_b S_i V_b^T

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, valid in (("colouring", COLOURINGS), ("hessian", HESSIANS), ("basis_form", FORMS)):
            if getattr(self, key) not in valid:
                raise ConfigError(f"method.{key}={getattr(self, key)!r}; valid: {', '.join(valid)}")
        if DEFAULT_KIND not in self.share_types:
            raise ConfigError(f"method.share_types needs a {DEFAULT_KIND!r} entry (roles coloured for other models)")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"method.num_classes={self.num_classes} must be >= 1 (or null: chosen by the method)")
        if not self.beta >= 0:
            raise ConfigError(f"method.beta={self.beta} must be >= 0 (0: fully damped, .inf: undamped)")


# -- budget ------------------------------------------------------------------------------------------------------
def num_classes_for(n_layers: int, ratio: float, exponent: float) -> int:
    """K = round(L (1 - ratio)^exponent) clipped to [1, L] (halves round up): the design notes' one data point
    (32 layers -> 12 bases at 50 %, exponent 1.415), kept as the speed benchmark's representative class count."""
    return max(1, min(n_layers, math.floor(n_layers * (1.0 - ratio) ** exponent + 0.5)))


def two_sided_rank(d_in: int, d_out: int, n: int, ratio: float) -> int:
    """The largest k with k (d_in + d_out) + n k^2 <= n d_in d_out (1 - ratio), at most min(d_in, d_out)."""
    budget = n * d_in * d_out * (1.0 - ratio)
    a = d_in + d_out
    k = int((-a + math.sqrt(a * a + 4.0 * n * budget)) / (2 * n))
    while k > 0 and k * a + n * k * k > budget:
        k -= 1
    while (k + 1) * a + n * (k + 1) ** 2 <= budget:
        k += 1
    return min(k, d_in, d_out)


def class_rank(d_in: int, d_out: int, n: int, ratio: float, form: str = "one_sided") -> int:
    """Rank of a class of ``n`` layers: Basis Sharing's ``basis_rank`` (one-sided) or ``two_sided_rank``."""
    return two_sided_rank(d_in, d_out, n, ratio) if form == "two_sided" else basis_rank(d_in, d_out, n, ratio)


def class_params(d_in: int, d_out: int, n: int, k: int, form: str = "one_sided") -> int:
    """Parameters a class of ``n`` layers stores at rank ``k``."""
    return k * (d_in + d_out) + n * k * k if form == "two_sided" else k * d_in + n * k * d_out


def contiguous_classes(layers: Sequence[int], k: int) -> list[tuple[int, ...]]:
    """``layers`` cut into ``k`` contiguous runs whose sizes differ by at most one, the larger ones first (for
    k = ceil(L/2): Basis Sharing's consecutive pairs and its remainder class)."""
    n = len(layers)
    k = max(1, min(k, n))
    size, extra = divmod(n, k)
    out, start = [], 0
    for j in range(k):
        end = start + size + (j < extra)
        out.append(tuple(layers[start:end]))
        start = end
    return out


# -- colouring -----------------------------------------------------------------------------------------------------
Partition = tuple[tuple[int, ...], ...]


def canonical(groups) -> Partition:
    return tuple(sorted((tuple(sorted(g)) for g in groups if g), key=lambda g: g[0]))


def profile_similarity(profiles: Sequence[torch.Tensor]) -> torch.Tensor:
    """Cosine similarity <P_i, P_j>_F / (|P_i|_F |P_j|_F) (n, n) of curvature profiles P_i (d_in, d_in)."""
    n = len(profiles)
    sim = torch.empty(n, n, dtype=torch.float64)
    for a in range(n):
        for b in range(a, n):
            sim[a, b] = sim[b, a] = float((profiles[a] * profiles[b]).sum())
    norms = sim.diagonal().sqrt().clamp_min(1e-300)
    return sim / norms[:, None] / norms[None, :]


class ClassCosts:
    """Step 4's cost of a candidate class of one coloured component: J = sum over its layers of the predicted loss
    increase 1/2 tr(G_i D_i A_i D_i^T) of ``GeoSharing.fit_class``, from per-layer (d_in, d_in) statistics instead
    of a class fit.

    fit_class's basis spans the top-k left singular vectors U of L^T [W_1^T R_1 | ...] (L L^T the class's pooled
    input Gram, R_i the damped output factor), i.e. the top-k eigenvectors of L^T (sum_i H_i) L with
    H_i = W_i^T R_i R_i^T W_i; its layers' error is D_i = -W_i (I - E F^T), E = L U, F = L^{-T} U. So
    J_i = 1/2 [tr(K_i A_i) - 2 <K_i E, A_i F> + <E^T K_i E, F^T A_i F>] with K_i = W_i^T G_i W_i (G_i undamped;
    I under ``hessian: kfac``) and A_i the layer's mean input Gram. A class costs one Cholesky and one eigh of
    d_in x d_in whatever its size, plus O(d_in^2 k) per layer (a fit: an SVD of d_in x n d_out). H_i, K_i, A_i are
    held on ``device`` in float64 for the component's layers (3 d_in^2 each)."""

    def __init__(self, weights: dict[int, torch.Tensor], grams: dict[int, Gram],
                 out_grams: dict[int, torch.Tensor] | None, beta: float, rank: Callable[[tuple[int, ...]], int],
                 device: torch.device):
        self.grams, self.rank, self.device = grams, rank, device
        self.h: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}
        self.a: dict[int, torch.Tensor] = {}
        self.base: dict[int, float] = {}
        for i, w in weights.items():
            w = w.detach().to(device, torch.float64)
            if out_grams is None:
                self.h[i] = self.k[i] = w.T @ w
            else:
                g = out_grams[i].to(device, torch.float64)
                scaled = damped_output_factor(g, beta).T @ w  # R_i^T W_i
                self.h[i], self.k[i] = scaled.T @ scaled, w.T @ (g @ w)
            self.a[i] = grams[i].xtx.to(device) / max(grams[i].tokens, 1)
            self.base[i] = float((self.k[i] * self.a[i]).sum())

    def profiles(self, layers: Sequence[int]) -> list[torch.Tensor]:
        """Curvature profiles P_i = L^T H_i L (d_in, d_in) of ``layers`` under their pooled whitening L: the loss
        curvature with respect to the layer's whitened input (Z_i Z_i^T for Z_i = L^T W_i^T R_i)."""
        chol, _ = whitening_factor(Gram.pooled([self.grams[i] for i in layers], self.device).xtx)
        return [chol.T @ self.h[i] @ chol for i in layers]

    def __call__(self, group: tuple[int, ...]) -> float:
        chol, _ = whitening_factor(Gram.pooled([self.grams[i] for i in group], self.device).xtx)
        total = self.h[group[0]].clone()
        for i in group[1:]:
            total += self.h[i]
        u = torch.linalg.eigh(chol.T @ total @ chol).eigenvectors[:, -self.rank(group):]  # top-k, ascending order
        e = chol @ u
        f = torch.linalg.solve_triangular(chol.T, u, upper=True)
        cost = 0.0
        for i in group:
            ke, af = self.k[i] @ e, self.a[i] @ f
            cost += 0.5 * (self.base[i] - 2.0 * float((ke * af).sum()) + float(((e.T @ ke) * (f.T @ af)).sum()))
        return cost


@dataclass
class Dendrogram:
    """Average-linkage merges of ``layers`` by similarity: ``merges[j]`` = (a, b) the two clusters merged at step j
    (most similar first; ties to the lowest layers)."""

    layers: tuple[int, ...]
    merges: list[tuple[tuple[int, ...], tuple[int, ...]]]

    @classmethod
    def build(cls, layers: Sequence[int], sim: torch.Tensor) -> "Dendrogram":
        pos = {layer: j for j, layer in enumerate(layers)}
        clusters = [(i,) for i in layers]
        merges = []
        while len(clusters) > 1:
            best = None
            for a in range(len(clusters)):
                for b in range(a + 1, len(clusters)):
                    link = float(sum(sim[pos[i], pos[j]] for i in clusters[a] for j in clusters[b])) / (
                        len(clusters[a]) * len(clusters[b]))
                    if best is None or link > best[0]:
                        best = (link, a, b)
            _, a, b = best
            merges.append((clusters[a], clusters[b]))
            clusters[a] = tuple(sorted(clusters[a] + clusters[b]))
            del clusters[b]
        return cls(tuple(layers), merges)

    def cut(self, k: int) -> Partition:
        """The ``k`` clusters left after the first L - k merges."""
        clusters = [(i,) for i in self.layers]
        for a, b in self.merges[:max(0, len(self.layers) - k)]:
            clusters = [c for c in clusters if c not in (a, b)] + [tuple(sorted(a + b))]
        return canonical(clusters)

    def best_cut(self, cost: Callable[[tuple[int, ...]], float]) -> tuple[Partition, float]:
        """The partition into dendrogram clusters with the least total ``cost`` (best(c) = min(cost(c), best(left)
        + best(right)), from the leaves up; a tie keeps the split): 2L - 1 evaluations of ``cost``."""
        best: dict[tuple[int, ...], tuple[float, Partition]] = {(i,): (cost((i,)), ((i,),)) for i in self.layers}
        for a, b in self.merges:
            merged = tuple(sorted(a + b))
            own = cost(merged)
            split = best[a][0] + best[b][0]
            best[merged] = (own, (merged,)) if own < split else (split, best[a][1] + best[b][1])
        root = tuple(sorted(self.layers))
        return canonical(best[root][1]), best[root][0]


def contiguous(group: Sequence[int], components: Sequence[Sequence[int]]) -> bool:
    """Whether ``group`` is a run of consecutive layers of its role component (block indices alone do not say for
    Swin, whose stages are separate components)."""
    layers = next(c for c in components if group[0] in c)
    pos = sorted(list(layers).index(i) for i in group)
    return pos[-1] - pos[0] + 1 == len(pos)


# -- the method ----------------------------------------------------------------------------------------------------
@dataclass
class Layout:
    """The scope's layers per role: ``graph[role]`` the coloured roles' components (block indices whose linears
    have one shape, dtype and device: only those can share a basis), ``private[role]`` the other roles' layers;
    ``shapes[(role, i)]`` = (d_out, d_in)."""

    graph: dict[str, list[list[int]]]
    private: dict[str, list[int]]
    shapes: dict[tuple[str, int], tuple[int, int]]

    def roles(self) -> list[str]:
        return list(dict.fromkeys([*self.graph, *self.private]))


class _Statistics:
    """Callback of the block-wise pass: the coloured roles' input Grams are kept (CPU) for the colouring; the
    private roles are fitted at once (a class of one)."""

    def __init__(self, method: "GeoSharing", adapter: ModelAdapter, layout: Layout,
                 out_grams: dict[tuple[str, int], torch.Tensor] | None, device: torch.device):
        self.method, self.adapter, self.layout, self.out_grams, self.device = method, adapter, layout, out_grams, device
        self.grams: dict[tuple[str, int], Gram] = {}
        self.per_layer: list[float] = []
        self.damped = 0

    def __call__(self, index: int, grams: dict[str, Gram]) -> None:
        stored: dict[int, Gram] = {}
        for role in self.layout.graph:
            if (role, index) in self.layout.shapes:
                g = grams[role]
                if id(g) not in stored:
                    stored[id(g)] = Gram(g.xtx.to("cpu"), g.tokens)
                self.grams[(role, index)] = stored[id(g)]
        for role in self.layout.private:
            if index in self.layout.private[role]:
                fit = self.method.fit_class(self.adapter, self.layout, role, (index,), [grams[role]], self.out_grams,
                                            self.device, install=True)
                self.per_layer += fit["increase"]
                self.damped += fit["damped"]


@METHODS.register("geo_sharing")
class GeoSharing(Method):
    config_class = GeoSharingConfig
    cfg: GeoSharingConfig

    # -- structure ---------------------------------------------------------------------------------------------
    def shared_roles(self, adapter: ModelAdapter) -> list[str]:
        return shared_roles_for(adapter, self.cfg.share_types, "share_types")

    def layout(self, adapter: ModelAdapter) -> Layout:
        shared = self.shared_roles(adapter)
        layers: dict[str, list[int]] = {}
        for i, roles in adapter.scope_roles(self.cfg.scope).items():
            for role in roles:
                layers.setdefault(role, []).append(i)
        graph: dict[str, list[list[int]]] = {}
        private: dict[str, list[int]] = {}
        shapes: dict[tuple[str, int], tuple[int, int]] = {}
        for role in (r for r in adapter.roles if r in layers):
            components: dict[tuple, list[int]] = {}
            for i in layers[role]:
                w = adapter.model.get_submodule(adapter.role_path(role, i)).weight
                shapes[(role, i)] = (int(w.shape[0]), int(w.shape[1]))
                components.setdefault((tuple(w.shape), w.dtype, w.device), []).append(i)
                if class_rank(w.shape[1], w.shape[0], 1, self.cfg.ratio, self.cfg.basis_form) < 1:
                    raise ConfigError(f"method.ratio={self.cfg.ratio} leaves rank 0 for {role} "
                                      f"({w.shape[0]}x{w.shape[1]})")
            if role in shared:
                graph[role] = list(components.values())
            else:
                private[role] = layers[role]
        return Layout(graph, private, shapes)

    def rank(self, layout: Layout, role: str, group: Sequence[int]) -> int:
        d_out, d_in = layout.shapes[(role, group[0])]
        return self.cfg.fit_rank(class_rank(d_in, d_out, len(group), self.cfg.ratio, self.cfg.basis_form))

    def check(self, adapter) -> None:
        super().check(adapter)
        adapter.check_block_linears(self.name, self.cfg.scope)
        self.layout(adapter)

    # -- steps -------------------------------------------------------------------------------------------------
    def output_grams(self, model: nn.Module, adapter: ModelAdapter, layout: Layout, ctx: CompressContext
                     ) -> dict[tuple[str, int], torch.Tensor]:
        """Step 2's G of every scope linear, a mean over output rows (d_out, d_out), on the CPU: the task loss on
        the labelled calibration batches where the task has them, else the LM loss of the token windows."""
        if ctx.provides("labelled_calibration_batches"):
            batches, loss = ctx.labelled_calibration_batches, labelled_loss_sum
        else:
            batches, loss = ctx.calibration_batches, lm_loss_sum
        keys = sorted(layout.shapes, key=lambda x: (x[1], list(adapter.roles).index(x[0])))
        paths = [adapter.role_path(r, i) for r, i in keys]
        grams = output_gradient_grams(model, paths, batches, loss)
        return {k: grams[p].xtx / max(grams[p].tokens, 1) for k, p in zip(keys, paths)}

    def fit_class(self, adapter: ModelAdapter, layout: Layout, role: str, group: Sequence[int],
                  grams: Sequence[Gram], out_grams: dict[tuple[str, int], torch.Tensor] | None,
                  device: torch.device, install: bool) -> dict[str, Any]:
        """Fit one class under the metric (``metric_basis`` on its pooled input Gram and its layers' damped output
        factors) and, when ``install``, replace its layers. Returns {"increase": per-layer predicted loss increase
        1/2 tr(G_i D_i A_i D_i^T) (G_i = I under ``hessian: kfac``), "damped": whether the Gram was shifted}."""
        chol, damped = whitening_factor(Gram.pooled(list(grams), device).xtx)
        weights = [adapter.model.get_submodule(adapter.role_path(role, i)).weight for i in group]
        curv = None if out_grams is None else [out_grams[(role, i)].to(device) for i in group]
        factors = None if curv is None else [damped_output_factor(g, self.cfg.beta) for g in curv]
        basis, coeffs = metric_basis(weights, chol, factors, self.rank(layout, role, group))
        increase = []
        for j, (w, c, g) in enumerate(zip(weights, coeffs, grams)):
            delta = c @ basis - w.detach().to(device, torch.float64)
            a = g.xtx.to(device) / max(g.tokens, 1)
            out = curv[j] if curv is not None else torch.eye(delta.shape[0], dtype=torch.float64, device=device)
            increase.append(predicted_increase(delta, a, out))
        if install:
            install_shared_basis(adapter, role, group, basis, coeffs)
            if self.cfg.basis_form == "two_sided":
                self._two_sided(adapter, role, group, Gram.pooled(list(grams), device).xtx)
        return {"increase": increase, "damped": damped}

    def colour(self, adapter: ModelAdapter, layout: Layout, stats: _Statistics,
               out_grams: dict[tuple[str, int], torch.Tensor] | None, device: torch.device) -> dict[str, Any]:
        """Step 4: {"groups": {role: classes}, "objective": J of the classes, "objective_pairs": J of Basis
        Sharing's adjacent pairs, "classes_scored": candidate classes whose J was computed (``ClassCosts``)}."""
        groups: dict[str, list[list[int]]] = {}
        totals = {"objective": 0.0, "objective_pairs": 0.0, "classes_scored": 0.0}
        for role, components in layout.graph.items():
            groups[role] = []
            for layers in components:
                costs = ClassCosts(
                    {i: adapter.model.get_submodule(adapter.role_path(role, i)).weight for i in layers},
                    {i: stats.grams[(role, i)] for i in layers},
                    None if out_grams is None else {i: out_grams[(role, i)] for i in layers},
                    self.cfg.beta, lambda group, role=role: self.rank(layout, role, group), device)
                cache: dict[tuple[int, ...], float] = {}

                def cost(group: tuple[int, ...]) -> float:
                    if group not in cache:
                        cache[group] = costs(group)
                    return cache[group]

                k = self.cfg.num_classes
                pairs = canonical(contiguous_classes(layers, math.ceil(len(layers) / 2)))
                if self.cfg.colouring == "adjacent":
                    partition = canonical(contiguous_classes(layers, k)) if k is not None else pairs
                else:
                    tree = Dendrogram.build(layers, profile_similarity(costs.profiles(layers)))
                    partition = tree.cut(k) if k is not None else min(
                        (tree.best_cut(cost)[0], pairs), key=lambda p: sum(cost(g) for g in p))
                totals["objective"] += sum(cost(g) for g in partition)
                totals["objective_pairs"] += sum(cost(g) for g in pairs)
                totals["classes_scored"] += len(cache)
                groups[role] += [list(g) for g in partition]
                log.info("geo_sharing %s: layers %s -> %d classes %s", role, layers, len(partition), partition)
                del costs
        return {"groups": groups, **totals}

    @staticmethod
    def _two_sided(adapter: ModelAdapter, role: str, group: Sequence[int], gram: torch.Tensor) -> None:
        """Replace one-sided layers C_i B by U_b S_i B: U_b the top-k left singular vectors of [C_1 R | ... ] with
        R R^T = B M B^T (so the whitened error of the output projection is what is minimised), S_i = U_b^T C_i."""
        layers = [adapter.model.get_submodule(adapter.role_path(role, i)) for i in group]
        shared = layers[0].v
        basis = shared.detach().to(gram.device, torch.float64)
        k = basis.shape[0]
        r, _ = whitening_factor(basis @ gram @ basis.T)
        coeffs = [layer.u.detach().to(gram.device, torch.float64) for layer in layers]
        u = torch.linalg.svd(torch.cat([c @ r for c in coeffs], dim=1), full_matrices=False)[0][:, :k]
        out_basis = nn.Parameter(u.to(shared.device, shared.dtype).contiguous())
        for i, layer, c in zip(group, layers, coeffs):
            adapter.replace(adapter.role_path(role, i),
                            TwoSidedSharedLinear.from_shared(shared, out_basis, u.T @ c, layer.bias))

    # -- apply -------------------------------------------------------------------------------------------------
    def apply(self, model, adapter, ctx: CompressContext) -> dict[str, float]:
        layout = self.layout(adapter)
        out_grams = None
        if self.cfg.hessian == "loss":
            with ctx.stage("curvature"):  # the output-side K-FAC factors: one backward pass
                out_grams = ctx.checkpointed("geo_sharing_output_grams",
                                             lambda: self._keyed(self.output_grams(model, adapter, layout, ctx)))
            out_grams = {(k.rsplit(".", 1)[0], int(k.rsplit(".", 1)[1])): v.to("cpu") for k, v in out_grams.items()}
        stats = _Statistics(self, adapter, layout, out_grams, ctx.device)
        with ctx.stage("calibration"):
            inputs = capture_block_inputs(adapter, ctx.calibration_batches(), ctx.progress)
        with ctx.stage("statistics"):  # the blocks' forwards and X^T X sums; the private roles' fits nest inside
            run_blocks(adapter, inputs, layout.roles(), ctx.timed("fitting", stats), ctx.device, ctx.progress,
                       desc="geo_sharing")
        with ctx.stage("colouring"):
            colouring = ctx.checkpointed("geo_sharing_classes",
                                         lambda: self.colour(adapter, layout, stats, out_grams, ctx.device))
        groups = {role: [tuple(int(i) for i in g) for g in colouring["groups"][role]] for role in layout.graph}
        per_layer = list(stats.per_layer)
        damped = stats.damped
        for role, classes in groups.items():
            for group in classes:
                with ctx.stage("fitting"):
                    fit = self.fit_class(adapter, layout, role, group, [stats.grams[(role, i)] for i in group],
                                         out_grams, ctx.device, install=True)
                per_layer += fit["increase"]
                damped += fit["damped"]
        return self.metrics(adapter, layout, groups, colouring, per_layer, damped)

    @staticmethod
    def _keyed(grams: dict[tuple[str, int], torch.Tensor]) -> dict[str, torch.Tensor]:
        """String keys ("role.i") for the stage checkpoint."""
        return {f"{r}.{i}": g for (r, i), g in grams.items()}

    def metrics(self, adapter: ModelAdapter, layout: Layout, groups: dict[str, list[tuple[int, ...]]],
                colouring: dict[str, Any], per_layer: list[float], damped: int) -> dict[str, float]:
        out: dict[str, float] = {}
        all_groups = {**{r: [(i,) for i in idx] for r, idx in layout.private.items()}, **groups}
        for role in (r for r in adapter.roles if r in all_groups):
            gs = all_groups[role]
            out[f"method/classes/{role}"] = float(len(gs))
            out[f"method/rank/{role}"] = sum(self.rank(layout, role, g) for g in gs) / len(gs)
            out[f"method/non_adjacent/{role}"] = float(sum(
                len(g) > 1 and not contiguous(g, layout.graph[role]) for g in gs)) if role in groups else 0.0
        out["method/bases"] = float(sum(len(gs) for gs in all_groups.values()))
        out["method/non_adjacent_classes"] = float(sum(
            not contiguous(g, layout.graph[role]) for role, gs in groups.items() for g in gs))
        for key in ("objective", "objective_pairs", "classes_scored"):
            out[f"method/{key}"] = float(colouring[key])
        out["method/predicted_increase"] = float(sum(per_layer))
        out["method/damped_grams"] = float(damped)
        return out
