"""Global unstructured magnitude pruning over the scope's weights (biases and norms stay dense)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from core.compressed import CompressedModule
from methods.base import METHODS, CompressContext, Method, MethodConfig
from methods.modules import masked_from_dense


@dataclass
class MagnitudeConfig(MethodConfig):
    """No fields beyond MethodConfig's."""


def kept_count(n: int, ratio: float) -> int:
    """Weights (or shared slots) kept when ``ratio`` of ``n`` is removed: n - round(ratio * n).

    Every pruning and weight-sharing method uses it, so all store the same number of values at a given ratio.
    """
    return n - int(round(ratio * n))


def global_score_masks(scores: list[torch.Tensor], n_keep: int) -> list[torch.Tensor]:
    """Masks keeping the ``n_keep`` highest scores over all tensors together (one global threshold).

    Ties at the threshold are broken by position (stable sort), so exactly ``n_keep`` entries are kept. Scores are
    compared in float64 on their device, so float64 scores (SynFlow) keep their full range.
    """
    flat = torch.cat([s.detach().flatten().to(torch.float64) for s in scores])
    if not 0 <= n_keep <= flat.numel():
        raise ValueError(f"cannot keep {n_keep} of {flat.numel()} entries")
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    n_prune = flat.numel() - n_keep
    if n_prune > 0:
        keep[torch.sort(flat, stable=True).indices[:n_prune]] = False
    masks, start = [], 0
    for s in scores:
        masks.append(keep[start:start + s.numel()].view_as(s).to(s.device))
        start += s.numel()
    return masks


def global_magnitude_masks(weights: list[torch.Tensor], ratio: float) -> list[torch.Tensor]:
    """Masks keeping the largest-|w| entries over all ``weights`` together; exactly round(ratio * n) are pruned."""
    n = sum(w.numel() for w in weights)
    return global_score_masks([w.detach().abs() for w in weights], kept_count(n, ratio))


@METHODS.register("magnitude")
class Magnitude(Method):
    config_class = MagnitudeConfig

    def apply(self, model, adapter, ctx: CompressContext) -> dict[str, float]:
        scope = adapter.scope(self.cfg.scope)
        for path, layer in scope.items():
            if isinstance(layer, CompressedModule):
                raise TypeError(f"{path} is already compressed ({type(layer).__name__})")
        masks = global_magnitude_masks([m.weight for m in scope.values()], self.cfg.ratio)
        for (path, layer), mask in zip(scope.items(), masks):
            masked = masked_from_dense(layer)
            masked.set_mask(mask)
            adapter.replace(path, masked)
        kept = sum(int(m.sum()) for m in masks)
        total = sum(m.numel() for m in masks)
        return {"method/pruned_weights": total - kept}
