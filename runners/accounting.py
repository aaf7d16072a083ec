"""Parameter accounting that counts unique storage: a tensor shared by several layers (tied embeddings, a shared
basis, a hashed array) counts once; masked weights count their non-zeros; masks and indices are reported apart.

Over a *scope* (the modules a method compresses) only the weight tensors count (biases and norms stay dense).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from core.compressed import CompressedModule


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def _module_tensors(module: nn.Module, weights_only: bool) -> list[tuple[torch.Tensor, int]]:
    if isinstance(module, CompressedModule):
        return module.stored_tensors(weights_only=weights_only)
    out = []
    for name, p in module.named_parameters(recurse=False):
        if weights_only and name != "weight":
            continue
        out.append((p, p.numel()))
    return out


def count(modules: Iterable[nn.Module], weights_only: bool = False) -> dict[str, int]:
    """``params_stored``, ``params_nonzero`` and ``index_overhead`` (bytes) over ``modules``, storage de-duplicated.

    ``modules`` are visited without recursion into their children; pass ``model.modules()`` for a whole model.
    """
    seen: set[tuple[str, int]] = set()
    alive: list[torch.Tensor] = []  # temporaries stay referenced so no address is reused while counting
    stored = nonzero = index = 0
    visited: set[int] = set()
    for module in modules:
        if id(module) in visited:
            continue
        visited.add(id(module))
        if isinstance(module, CompressedModule):
            index += module.index_bytes()
        for tensor, n_stored in _module_tensors(module, weights_only):
            alive.append(tensor)
            key = _storage_key(tensor)
            if key in seen:
                continue
            seen.add(key)
            stored += n_stored
            nonzero += int(torch.count_nonzero(tensor.detach()))
    return {"params_stored": stored, "params_nonzero": nonzero, "index_overhead": index}


def model_modules(model: nn.Module) -> list[nn.Module]:
    """Every module, children of a ``CompressedModule`` excluded (it reports their storage itself)."""
    out, skip = [], set()
    for name, m in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        out.append(m)
        if isinstance(m, CompressedModule) and name:
            skip.add(name)
    return out


def dense_counts(model: nn.Module, scope: dict[str, nn.Module]) -> dict[str, int]:
    """Reference counts of the dense model: ``params_dense`` and ``scope/params_dense``."""
    return {"params_dense": count(model_modules(model))["params_stored"],
            "scope/params_dense": count(scope.values(), weights_only=True)["params_stored"]}


def compressed_counts(model: nn.Module, scope: dict[str, nn.Module], dense: dict[str, int]) -> dict[str, float]:
    """Flat accounting metrics over the whole model and (``scope/`` prefix) over the method's scope."""
    out: dict[str, float] = {}
    for prefix, counts, n_dense in (("", count(model_modules(model)), dense["params_dense"]),
                                    ("scope/", count(scope.values(), weights_only=True), dense["scope/params_dense"])):
        stored = counts["params_stored"]
        out.update({
            f"{prefix}params_dense": n_dense,
            f"{prefix}params_stored": stored,
            f"{prefix}params_nonzero": counts["params_nonzero"],
            f"{prefix}index_overhead": counts["index_overhead"],
            f"{prefix}removed_fraction": 1.0 - stored / n_dense if n_dense else 0.0,
            f"{prefix}compression_x": n_dense / stored if stored else float("inf"),
        })
    return out
