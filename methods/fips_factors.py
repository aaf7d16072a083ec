"""FiPS (arXiv 2411.09816) layout and factorisation: which MLP linears form a group, each group's rank, the SVD
initialisation of the shared basis U and the per-layer sparse factors V, and the factors' stage checkpoints. The
formulas are in the docstring of ``methods.fips``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
from torch import Tensor, nn

from core.errors import ConfigError
from methods.modules import SharedFactorLinear
from tasks.adapters import ModelAdapter

if TYPE_CHECKING:
    from methods.fips import FiPSConfig


# -- layout, groups, ranks ---------------------------------------------------------------------------------------
@dataclass
class MLPLayer:
    """One MLP linear: block index, role, path, oriented shape (d, cols) and whether it is transposed."""

    block: int
    role: str
    path: str
    d: int
    cols: int
    transposed: bool


@dataclass
class Group:
    blocks: list[int]
    layers: list[MLPLayer]
    rank: int

    @property
    def d(self) -> int:
        return self.layers[0].d

    @property
    def cols(self) -> int:
        return sum(layer.cols for layer in self.layers)

    def dense_params(self) -> int:
        return self.d * self.cols

    def stored_params(self, sparsity: float) -> int:
        """U + the kept entries of the V's (as ``Sparsifier.kept``: each V's sparsifier rounds once)."""
        n = self.rank * self.cols
        return self.d * self.rank + n - int(round(sparsity * n))


def mlp_layers(adapter: ModelAdapter, method: str = "fips") -> dict[int, list[MLPLayer]]:
    """{block index: its MLP linears in role order}, every block of the model; ``ConfigError`` when the adapter
    names no MLP roles or a layer is not a plain ``nn.Linear``."""
    if not adapter.mlp_roles or not adapter.block_paths():
        raise ConfigError(f"{method} needs a transformer adapter with named MLP roles; "
                          f"{type(adapter.model).__name__} has none")
    out: dict[int, list[MLPLayer]] = {}
    for i, block in enumerate(adapter.block_paths()):
        for role in adapter.mlp_roles:
            path = f"{block}.{adapter.roles[role]}"
            layer = adapter.model.get_submodule(path)
            if type(layer) is not nn.Linear:
                raise ConfigError(f"{method} compresses nn.Linear MLP layers; {path} is {type(layer).__name__}")
            if layer.weight.device.type == "meta" and not adapter.is_skeleton():
                raise ConfigError(f"{method}: {path} has meta (offloaded) weights")
            out_f, in_f = layer.weight.shape
            transposed = out_f > in_f
            d, cols = (in_f, out_f) if transposed else (out_f, in_f)
            out.setdefault(i, []).append(MLPLayer(i, role, path, d, cols, transposed))
    return out


def segments(adapter: ModelAdapter, layers: dict[int, list[MLPLayer]]) -> list[int]:
    """A segment id per block: consecutive blocks of one stage (``adapter.stage_of``, Swin) and one MLP shape."""
    keys, ids = [], []
    for i, block in enumerate(adapter.block_paths()):
        stage = adapter.stage_of(block)
        key = (stage, tuple((m.d, m.cols) for m in layers[i]))
        if not keys or keys[-1] != key:
            keys.append(key)
        ids.append(len(keys) - 1)
    return ids


def default_group_size(adapter: ModelAdapter) -> int:
    """Blocks per group: 6 within a stage for staged models (Swin), else 4 (the official groupings)."""
    return 6 if adapter.has_stages else 4


def make_groups(adapter: ModelAdapter, layers: dict[int, list[MLPLayer]], group_size: int | None,
                groups: list[list[int]] | None) -> list[list[int]]:
    """Block-index groups: explicit ``groups`` (validated) or runs of ``group_size`` blocks inside every segment
    (the last run of a segment holds the remainder)."""
    seg = segments(adapter, layers)
    n = len(seg)
    if groups is None:
        size = group_size or default_group_size(adapter)
        out: list[list[int]] = []
        start = 0
        while start < n:
            end = start
            while end < n and seg[end] == seg[start] and end - start < size:
                end += 1
            out.append(list(range(start, end)))
            start = end
        return out
    out = [[int(b) for b in g] for g in groups]
    flat = [b for g in out for b in g]
    if sorted(flat) != list(range(n)):
        raise ConfigError(f"method.groups={out} must cover the blocks 0..{n - 1} once each (FiPS compresses "
                          f"every MLP)")
    for g in out:
        if g != list(range(g[0], g[0] + len(g))):
            raise ConfigError(f"method.groups: {g} is not a contiguous, increasing run of blocks")
        if len({seg[b] for b in g}) > 1:
            raise ConfigError(f"method.groups: {g} crosses a stage or a change of MLP width; a group shares one "
                              f"basis of one width")
    return out


def group_rank(d: int, cols: int, n_layers: int, kept: float, sparsity: float, formula: str = "exact",
               multiple: int = 1) -> int:
    """Rank of a group of ``n_layers`` oriented d x d_ff matrices (``cols`` = sum of their d_ff) keeping the
    fraction ``kept`` of their weights with V at ``sparsity``; ``official`` is the code's expression with
    d_ff = 4d: int(4 F n d^2 p / (4 F n d (1 - s) + d))."""
    if formula == "official":
        fn = n_layers
        r = int(4 * fn * d * d * kept / (4 * fn * d * (1 - sparsity) + d))
    else:
        r = int(kept * d * cols / ((1 - sparsity) * cols + d))
    return (r // multiple) * multiple


def plan_groups(adapter: ModelAdapter, cfg: FiPSConfig) -> list[Group]:
    layers = mlp_layers(adapter, cfg.name)
    out = []
    for blocks in make_groups(adapter, layers, cfg.group_size, cfg.groups):
        members = [m for b in blocks for m in layers[b]]
        if len({m.d for m in members}) > 1:
            raise ConfigError(f"fips: the MLPs of blocks {blocks} differ in width d; a group shares one basis")
        d, cols = members[0].d, sum(m.cols for m in members)
        multiple = math.lcm(cfg.rank_multiple, cfg.sparsity_block)  # block-sparse V needs whole blocks of rank
        rank = cfg.rank if cfg.rank is not None else group_rank(d, cols, len(members), 1.0 - cfg.ratio,
                                                                cfg.sparsity, cfg.rank_formula, multiple)
        uneven = sorted({n for n in (rank, *(m.cols for m in members)) if n % cfg.sparsity_block})
        if uneven:
            raise ConfigError(f"method.sparsity_block={cfg.sparsity_block} must divide the rank and every MLP width; "
                              f"{uneven} in the group of blocks {blocks} do not")
        if rank < 1:
            raise ConfigError(f"method.ratio={cfg.ratio} with sparsity {cfg.sparsity} leaves rank 0 for the group "
                              f"of blocks {blocks} (d={d})")
        out.append(Group(blocks, members, rank))
    return out


# -- factorisation ------------------------------------------------------------------------------------------------
def oriented(weight: Tensor, transposed: bool) -> Tensor:
    return weight.T if transposed else weight


def svd_init(matrix: Tensor, rank: int, tau: float = 32.0) -> tuple[Tensor, Tensor]:
    """(U, V) with U V ~ ``matrix`` (d x C): thin SVD in float64, singular values folded into V; past the matrix
    rank, U gets zero columns and V copies of its top rows divided by ``tau`` (exact: U V = M)."""
    u, s, vh = torch.linalg.svd(matrix.detach().to(torch.float64), full_matrices=False)
    sv = s[:, None] * vh
    q = s.numel()
    if rank <= q:
        return u[:, :rank], sv[:rank]
    extra = rank - q
    idx = torch.arange(extra, device=sv.device) % q
    return (torch.cat([u, u.new_zeros(u.shape[0], extra)], 1), torch.cat([sv, sv[idx] / tau], 0))


def factorize_group(adapter: ModelAdapter, group: Group, tau: float, device: torch.device | None = None
                    ) -> tuple[nn.Parameter, list[SharedFactorLinear]]:
    """SVD-initialised ``SharedFactorLinear`` twins of the group's (still dense) layers, not yet installed, and
    their shared basis Parameter (on the layers' device and dtype)."""
    dense = [adapter.model.get_submodule(m.path) for m in group.layers]
    ref = dense[0].weight
    work = device if device is not None else ref.device
    matrix = torch.cat([oriented(layer.weight.detach().to(work, torch.float64), m.transposed)
                        for layer, m in zip(dense, group.layers)], dim=1)
    u, v = svd_init(matrix, group.rank, tau)
    basis = nn.Parameter(u.to(ref.device, ref.dtype).contiguous())
    modules = []
    for layer, m, factor in zip(dense, group.layers, v.split([m.cols for m in group.layers], dim=1)):
        modules.append(SharedFactorLinear.from_shared(basis, factor.to(ref.device, ref.dtype), layer.bias,
                                                      m.transposed))
    return basis, modules


def install_factorised(model: nn.Module, adapter: ModelAdapter, groups: Sequence[Group], tau: float,
                       device: torch.device | None = None) -> tuple[list[SharedFactorLinear], list[nn.Parameter]]:
    """Replace every group's dense layers by their SVD-initialised ``SharedFactorLinear`` twins and freeze the
    rest of ``model``; returns the new modules and the trainable parameters (U once, V, biases)."""
    modules: list[SharedFactorLinear] = []
    for g in groups:
        _, mods = factorize_group(adapter, g, tau, device)
        for m, new in zip(g.layers, mods):
            adapter.replace(m.path, new)
        modules += mods
    for p in model.parameters():
        p.requires_grad_(False)
    params = fips_parameters(modules)
    for p in params:
        p.requires_grad_(True)
    return modules, params


def fips_parameters(modules: Iterable[SharedFactorLinear]) -> list[nn.Parameter]:
    """U (once), V and biases of ``modules``."""
    seen, out = set(), []
    for m in modules:
        for p in (m.u, m.v.weight, m.bias):
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


# -- stage checkpoints -------------------------------------------------------------------------------------------
def factor_state(modules: list[SharedFactorLinear]) -> dict[str, Tensor]:
    """Trainable FiPS tensors (U once) for stage checkpoints."""
    out: dict[str, Tensor] = {}
    seen: dict[int, str] = {}
    for i, m in enumerate(modules):
        if id(m.u) not in seen:
            seen[id(m.u)] = f"{i}.u"
            out[f"{i}.u"] = m.u.detach().cpu()
        out[f"{i}.v"] = m.v.weight.detach().cpu()
        out[f"{i}.mask"] = m.v.mask.detach().cpu()
        if m.bias is not None:
            out[f"{i}.bias"] = m.bias.detach().cpu()
    return out


@torch.no_grad()
def load_factor_state(modules: list[SharedFactorLinear], state: dict[str, Tensor]) -> None:
    for i, m in enumerate(modules):
        if f"{i}.u" in state:
            m.u.copy_(state[f"{i}.u"])
        m.v.weight.copy_(state[f"{i}.v"])
        m.v.mask.copy_(state[f"{i}.mask"])
        if m.bias is not None:
            m.bias.copy_(state[f"{i}.bias"])
