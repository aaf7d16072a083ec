"""Basis Sharing (arXiv 2410.03765): one whitened low-rank basis shared by consecutive layers.

For each matrix type (role) and each *sharing class* G of layers, the weights W_i (i in G) are factorised as
W_i ~ C_i B with one basis B (k x d_in) for the whole class and private coefficients C_i (d_out x k): the
whitened SVD of [W_1^T | ... | W_n^T] with the pooled input statistics M_G = sum_{i in G} X_i^T X_i
(``methods.svd_llm.whitened_basis``). As the official code:

* classes are consecutive groups of ``group_size`` layers ([0, 1], [2, 3], ...; a remainder forms a smaller
  last class), for the ``shared`` roles (q, k, v, gate, up on LLaMA); every other role of the scope is private
  (one class per layer, i.e. SVD-LLM);
* rank k = floor(n d_in d_out (1 - ratio) / (d_in + n d_out)) for a class of n layers, so a class stores
  k d_in + n k d_out <= (1 - ratio) n d_in d_out parameters. (The official code gives a smaller remainder
  class the rank of a full one; here every class gets the rank of its own size, so the budget holds everywhere.)
* statistics of the dense model, block by block (``methods.calibration``); classes are fitted as soon as their
  last layer's statistics are in, so at most ``group_size`` blocks of statistics are held.
* ``update: true`` re-solves the coefficients on the compressed model's own inputs, the closed form
  C = (B^T M B)^-1 B^T M W of the official ``update_model`` (configured there for 40-60 %, never called):
  M is the class's pooled X^T X measured by a second block-wise pass over the compressed model, W the dense
  weights (kept on the CPU meanwhile).

The building blocks take an explicit ``SharingPlan`` (any partition of the layers into classes, per role), so
methods with other colourings of layers (not only adjacent ones) reuse ``fit_plan_streaming``,
``install_shared_basis`` and ``refit_coefficients`` unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from core.errors import ConfigError
from methods.base import METHODS, CompressContext, Method
from methods.calibration import Gram, capture_block_inputs, run_blocks
from methods.modules import SharedBasisLinear
from methods.svd import LowRankConfig
from methods.svd_llm import whitened_basis, whitening_factor
from tasks.adapters import ModelAdapter

DEFAULT_KIND = "default"


@dataclass
class BasisSharingConfig(LowRankConfig):
    group_size: int = 2  # layers per sharing class
    # roles whose basis is shared, per model type (transformers' config.model_type); other types use "default"
    shared: dict[str, list[str]] = field(default_factory=lambda: {
        DEFAULT_KIND: ["q", "k", "v", "gate", "up"],
        "mistral": ["q", "gate", "up"],  # grouped-query k/v stay private, as the official Mistral configs
    })
    update: bool = False  # refit the coefficients on the compressed model's inputs (second calibration pass)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size < 1:
            raise ConfigError(f"method.group_size={self.group_size} must be >= 1")
        if DEFAULT_KIND not in self.shared:
            raise ConfigError(f"method.shared needs a {DEFAULT_KIND!r} entry (roles shared for other model types)")


def basis_rank(d_in: int, d_out: int, n: int, ratio: float) -> int:
    """k = floor(n d_in d_out (1 - ratio) / (d_in + n d_out)): the largest rank whose basis (k x d_in) and n
    coefficient blocks (d_out x k) keep at most (1 - ratio) of n d_in d_out parameters (Basis Sharing's
    ``compute_num_basis``, same float arithmetic)."""
    return int((n * d_in * d_out * (1.0 - ratio)) // (d_in + n * d_out))


def consecutive_groups(n_layers: int, size: int) -> list[tuple[int, ...]]:
    """[(0, .., size-1), (size, ..), ...]; the last group holds the remainder."""
    return [tuple(range(s, min(s + size, n_layers))) for s in range(0, n_layers, size)]


@dataclass
class SharingPlan:
    """Sharing classes per role: ``groups[role]`` partitions the layers (block indices) that the scope holds for
    that role; ``ranks[role][j]`` is the basis rank of class ``groups[role][j]``."""

    groups: dict[str, list[tuple[int, ...]]]
    ranks: dict[str, list[int]]

    def classes(self) -> list[tuple[str, tuple[int, ...], int]]:
        return [(role, g, k) for role in self.groups for g, k in zip(self.groups[role], self.ranks[role])]

    def complete_at(self) -> dict[int, list[tuple[str, tuple[int, ...], int]]]:
        """{block index: the classes whose last layer is that block}."""
        out: dict[int, list[tuple[str, tuple[int, ...], int]]] = {}
        for role, g, k in self.classes():
            out.setdefault(max(g), []).append((role, g, k))
        return out

    def stored_params(self, shapes: dict[str, tuple[int, int]]) -> int:
        """Parameters the factorised scope stores: sum over classes of k d_in + |G| k d_out, for
        ``shapes[role]`` = (d_out, d_in)."""
        return sum(k * shapes[role][1] + len(g) * k * shapes[role][0] for role, g, k in self.classes())


def install_shared_basis(adapter: ModelAdapter, role: str, group: Sequence[int], basis: torch.Tensor,
                         coeffs: Sequence[torch.Tensor]) -> nn.Parameter:
    """Replace the ``role`` linear of every layer in ``group`` by a ``SharedBasisLinear`` computing with one basis
    Parameter (``basis``, rank x d_in) and its own coefficients (``coeffs[j]``, d_out x rank); biases are kept.
    Dtype and device follow the first layer's weight. Returns the shared Parameter."""
    layers = [adapter.model.get_submodule(adapter.role_path(role, i)) for i in group]
    ref = layers[0].weight
    shared = nn.Parameter(basis.detach().to(ref.device, ref.dtype).contiguous())
    for i, layer, coeff in zip(group, layers, coeffs):
        adapter.replace(adapter.role_path(role, i), SharedBasisLinear.from_shared(shared, coeff, layer.bias))
    return shared


def refit_coefficients(basis: torch.Tensor, weights: Sequence[torch.Tensor], gram: torch.Tensor
                       ) -> list[torch.Tensor]:
    """Coefficients C_i (out_i x k) minimising sum_i ||X (W_i^T - B^T C_i^T)||_F^2 for a fixed basis B (``basis``,
    k x d_in) and X^T X = ``gram``: C^T = (B M B^T)^-1 B M W^T, solved as a least-squares problem in the
    whitened space (L^T B^T C^T = L^T W^T, M = L L^T) in float64 on ``gram``'s device."""
    chol, _ = whitening_factor(gram)
    dev = chol.device
    lhs = chol.T @ basis.detach().to(dev, torch.float64).T  # d_in x k
    rhs = chol.T @ torch.cat([w.detach().to(dev, torch.float64).T for w in weights], dim=1)  # d_in x sum out
    solution = torch.linalg.lstsq(lhs, rhs).solution  # k x sum out
    return [block.T for block in solution.split([w.shape[0] for w in weights], dim=1)]


class PlanFitter:
    """``run_blocks`` callback fitting a ``SharingPlan`` while the statistics stream in: each block's grams are
    kept until every class containing that block is complete, and a class is fitted (whitened shared SVD on its
    pooled gram, ``install_shared_basis``) at its last layer. ``bases[(role, group)]`` holds the installed
    Parameters."""

    def __init__(self, adapter: ModelAdapter, plan: SharingPlan, device: torch.device | str | None = None):
        self.adapter, self.plan, self.device = adapter, plan, device
        self.pending = plan.complete_at()
        self.grams: dict[tuple[str, int], Gram] = {}
        self.bases: dict[tuple[str, tuple[int, ...]], nn.Parameter] = {}
        self.damped = 0

    def __call__(self, index: int, grams: dict[str, Gram]) -> None:
        roles = {role for role in self.plan.groups if any(index in g for g in self.plan.groups[role])}
        self.grams.update({(role, index): grams[role] for role in roles})
        factors: dict[tuple[tuple[int, ...], ...], torch.Tensor] = {}  # roles of one input group share a gram
        for role, group, rank in self.pending.pop(index, []):
            members = [self.grams[(role, i)] for i in group]
            key = (group, tuple(id(g) for g in members))
            if key not in factors:
                chol, damped = whitening_factor(Gram.pooled(members, self.device).xtx)
                factors[key] = chol
                self.damped += damped
            weights = [self.adapter.model.get_submodule(self.adapter.role_path(role, i)).weight for i in group]
            basis, coeffs = whitened_basis(weights, factors[key], rank)
            self.bases[(role, group)] = install_shared_basis(self.adapter, role, group, basis, coeffs)
            for i in group:
                del self.grams[(role, i)]


class PlanRefitter:
    """``run_blocks`` callback over a model compressed by ``PlanFitter``: once a class's statistics (its layers'
    inputs in the compressed model, pooled) are complete, its coefficients are re-solved against the dense
    weights ``dense[(role, layer)]`` with ``refit_coefficients``."""

    def __init__(self, adapter: ModelAdapter, plan: SharingPlan, dense: dict[tuple[str, int], torch.Tensor],
                 device: torch.device | str | None = None):
        self.adapter, self.plan, self.dense, self.device = adapter, plan, dense, device
        self.pending = plan.complete_at()
        self.grams: dict[tuple[str, int], Gram] = {}

    @torch.no_grad()
    def __call__(self, index: int, grams: dict[str, Gram]) -> None:
        roles = {role for role in self.plan.groups if any(index in g for g in self.plan.groups[role])}
        self.grams.update({(role, index): grams[role] for role in roles})
        for role, group, _ in self.pending.pop(index, []):
            gram = Gram.pooled([self.grams.pop((role, i)) for i in group], self.device).xtx
            layers = [self.adapter.model.get_submodule(self.adapter.role_path(role, i)) for i in group]
            coeffs = refit_coefficients(layers[0].v, [self.dense.pop((role, i)) for i in group], gram)
            for layer, coeff in zip(layers, coeffs):
                layer.u.copy_(coeff)


def shared_roles_for(adapter: ModelAdapter, table: dict[str, list[str]], key: str) -> list[str]:
    """The roles ``table`` (model kind -> roles, ``default`` for the rest; config field ``method.<key>``) shares
    for ``adapter``'s model, checked against the adapter's roles."""
    kind = adapter.model_kind()
    roles = table.get(kind, table[DEFAULT_KIND])
    unknown = [r for r in roles if r not in adapter.roles]
    if unknown:
        raise ConfigError(f"method.{key}: roles {', '.join(unknown)} unknown to {type(adapter).__name__} "
                          f"(model kind {kind!r}); valid: {', '.join(adapter.roles)}")
    return list(roles)


@METHODS.register("basis_sharing")
class BasisSharing(Method):
    config_class = BasisSharingConfig
    cfg: BasisSharingConfig

    def shared_roles(self, adapter: ModelAdapter) -> list[str]:
        return shared_roles_for(adapter, self.cfg.shared, "shared")

    def plan(self, adapter: ModelAdapter) -> SharingPlan:
        """Consecutive classes of ``group_size`` layers for the shared roles, one class per layer otherwise, over
        the layers the scope holds; ranks from the ratio."""
        shared = self.shared_roles(adapter)
        layers: dict[str, list[int]] = {}
        for i, roles in adapter.scope_roles(self.cfg.scope).items():
            for role in roles:
                layers.setdefault(role, []).append(i)
        groups, ranks = {}, {}
        for role in (r for r in adapter.roles if r in layers):
            idx = layers[role]
            size = self.cfg.group_size if role in shared else 1
            groups[role] = [tuple(idx[j] for j in g) for g in consecutive_groups(len(idx), size)]
            d_out, d_in = adapter.model.get_submodule(adapter.role_path(role, idx[0])).weight.shape
            ranks[role] = [self.cfg.fit_rank(basis_rank(d_in, d_out, len(g), self.cfg.ratio)) for g in groups[role]]
            if min(ranks[role]) < 1:
                raise ConfigError(f"method.ratio={self.cfg.ratio} leaves rank 0 for {role} ({d_out}x{d_in})")
            for g in groups[role]:
                weights = [adapter.model.get_submodule(adapter.role_path(role, i)).weight for i in g]
                if len({(w.device, w.dtype, tuple(w.shape)) for w in weights}) > 1:
                    raise ConfigError(f"basis_sharing: the {role} layers {list(g)} differ in device, dtype or shape; "
                                      "a shared basis needs one of each (place the model on one device)")
        return SharingPlan(groups, ranks)

    def check(self, adapter) -> None:
        super().check(adapter)
        adapter.check_block_linears(self.name, self.cfg.scope)
        self.plan(adapter)

    def apply(self, model, adapter, ctx: CompressContext) -> dict[str, float]:
        plan = self.plan(adapter)
        dense = {(role, i): model.get_submodule(adapter.role_path(role, i)).weight.detach().to("cpu", copy=True)
                 for role, g, _ in plan.classes() for i in g} if self.cfg.update else {}
        fitter = PlanFitter(adapter, plan, ctx.device)
        with ctx.stage("calibration"):
            inputs = capture_block_inputs(adapter, ctx.calibration_batches(), ctx.progress)
        with ctx.stage("statistics"):  # the blocks' forwards and X^T X sums; the fits (Cholesky + SVD) nest inside
            run_blocks(adapter, inputs, list(plan.groups), ctx.timed("fitting", fitter), ctx.device, ctx.progress,
                       desc="basis_sharing")
        if self.cfg.update:
            with ctx.stage("calibration"):
                inputs = capture_block_inputs(adapter, ctx.calibration_batches(), ctx.progress)
            with ctx.stage("statistics"):
                run_blocks(adapter, inputs, list(plan.groups),
                           ctx.timed("refit", PlanRefitter(adapter, plan, dense, ctx.device)), ctx.device,
                           ctx.progress, desc="basis_sharing update")
        out: dict[str, float] = {f"method/rank/{role}": float(ranks[0]) for role, ranks in plan.ranks.items()}
        out["method/bases"] = float(len(fitter.bases))
        out["method/damped_grams"] = float(fitter.damped)
        return out
