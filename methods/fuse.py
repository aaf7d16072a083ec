"""Inference layout: factorised layers that read the same input (an adapter's ``input_groups``: q, k, v; gate, up)
run their input-side factors as one wider GEMM.

For a group whose members are all ``LowRankLinear`` (svd, svd_llm, basis_sharing, geo_sharing), y_j = U_j (V_j x)
becomes h = V_cat x with V_cat = [V_q; V_k; V_v] (sum of ranks x in), computed once by a forward pre-hook of the
members' common parent (the attention or MLP module), and y_j = U_j h[r_j] for each member. A V_cat is built once
for every block that has the same member bases, so a basis shared by several blocks stays one resident tensor; a
group whose bases are shared with differently grouped layers (e.g. a colouring that puts q of blocks 1, 2 and k of
blocks 2, 3 in classes) is left unfused rather than stored twice.

``inference_layout(model, adapter, device)`` applies it before measurement (``measure.kernels=auto``) together with
the kernels' needs; it changes the execution, not the function: outputs equal the unfused model's up to the GEMMs'
summation order.
"""
from __future__ import annotations

import inspect
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from core.compressed import CompressedModule
from methods import kernels
from methods.modules import LowRankLinear


class InputProjection(nn.Module):
    """Holds V_cat (sum of ranks, in) and, during a forward, h = x V_cat^T (..., sum of ranks) for the members."""

    def __init__(self, v_cat: nn.Parameter):
        super().__init__()
        self.v_cat = v_cat
        self.h: torch.Tensor | None = None

    def project(self, x: torch.Tensor) -> None:
        self.h = F.linear(x, self.v_cat)


class FusedMember(nn.Module):
    """One member of a fused group: y = h[..., start:stop] U^T + b, with h from the group's ``InputProjection``
    (not a child: the projection belongs to the members' parent). U (out, stop - start)."""

    def __init__(self, projection: InputProjection, start: int, stop: int, u: nn.Parameter,
                 bias: nn.Parameter | None):
        super().__init__()
        object.__setattr__(self, "projection", projection)
        self.start, self.stop = start, stop
        self.u, self.bias = u, bias
        self.in_features, self.out_features = projection.v_cat.shape[1], u.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.projection.h
        if h is None or h.shape[:-1] != x.shape[:-1]:
            raise RuntimeError("a fused member ran outside its parent's forward (the input projection is unset)")
        return F.linear(h[..., self.start:self.stop], self.u, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.stop - self.start}, fused input"


def _first_input(module: nn.Module):
    name = next(iter(inspect.signature(module.forward).parameters))

    def hook(mod, args, kwargs):
        x = args[0] if args else kwargs[name]
        for projection in mod.fused_inputs:
            projection.project(x)
    return hook


def _bases(members: list[LowRankLinear]) -> tuple[int, ...]:
    return tuple(id(m.v) for m in members)


def fuse_input_groups(model: nn.Module, adapter) -> int:
    """Fuse every input group of low-rank members in ``adapter``'s blocks; returns the number of groups fused."""
    candidates = []  # (block index, member paths, member modules)
    for block in adapter.block_paths():
        for roles in adapter.input_groups:
            if len(roles) < 2:
                continue
            paths = [f"{block}.{adapter.roles[r]}" for r in roles]
            members = [model.get_submodule(p) for p in paths]
            parents = {p.rpartition(".")[0] for p in paths}
            devices = {t.device for m in members for t in m.parameters()}
            # offloaded (meta) or split members keep their own layers: accelerate loads those on the fly
            if (len(parents) == 1 and all(isinstance(m, LowRankLinear) for m in members) and len(devices) == 1
                    and next(iter(devices)).type != "meta"):
                candidates.append((parents.pop(), paths, members))
    keys_using_basis: dict[int, set] = defaultdict(set)
    for _, _, members in candidates:
        for m in members:
            keys_using_basis[id(m.v)].add(_bases(members))
    projections: dict[tuple, InputProjection] = {}
    fused = 0
    for parent_path, paths, members in candidates:
        key = _bases(members)
        if any(len(keys_using_basis[id(m.v)]) > 1 for m in members):
            continue  # a basis also serves a different grouping: fusing would store it twice
        if key not in projections:
            v_cat = torch.cat([m.v.detach() for m in members], 0)
            projections[key] = InputProjection(nn.Parameter(v_cat, requires_grad=False))
        projection = projections[key]
        parent = model.get_submodule(parent_path)
        if not hasattr(parent, "fused_inputs"):
            parent.fused_inputs = nn.ModuleList()
            parent.register_forward_pre_hook(_first_input(parent), with_kwargs=True)
        parent.fused_inputs.append(projection)
        start = 0
        for path, m in zip(paths, members):
            adapter.replace(path, FusedMember(projection, start, start + m.rank, m.u, m.bias))
            start += m.rank
        fused += 1
    return fused


def inference_layout(model: nn.Module, adapter, device: torch.device) -> dict[str, int | str]:
    """Put ``model`` in the layout it is measured in under the current kernel backend: ``torch`` leaves the naive
    (training) layout; otherwise input groups are fused and compressed modules keep only what inference needs
    (``CompressedModule.for_inference``: hashed layers drop their index buffers, FiPS stores V as CSR), computing
    with the Triton kernels where they run. Returns the protocol fields to record."""
    if kernels.current_backend() == "torch":
        return {"protocol/kernels": "torch", "protocol/fused_input_groups": 0, "protocol/layout": "training"}
    fused = fuse_input_groups(model, adapter)
    for module in list(model.modules()):
        if isinstance(module, CompressedModule):
            module.for_inference()
    return {"protocol/kernels": "triton" if kernels.triton_active(device) else "torch",
            "protocol/fused_input_groups": fused, "protocol/layout": "inference"}
