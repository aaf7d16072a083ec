"""Global unstructured magnitude pruning over the scope's weights (biases and norms stay dense)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.base import METHODS, CompressContext, Method, MethodConfig
from methods.modules import CompressedModule, masked_from_dense


@dataclass
class MagnitudeConfig(MethodConfig):
    name: str = "magnitude"


def global_magnitude_masks(weights: list[torch.Tensor], ratio: float) -> list[torch.Tensor]:
    """Masks keeping the largest-|w| entries over all ``weights`` together; exactly round(ratio * n) are pruned.

    Ties at the threshold are broken by position (stable sort), so the pruned count is exact.
    """
    flat = torch.cat([w.detach().abs().flatten().float().cpu() for w in weights])
    n_prune = int(round(ratio * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if n_prune > 0:
        order = torch.sort(flat, stable=True).indices
        keep[order[:n_prune]] = False
    masks, start = [], 0
    for w in weights:
        masks.append(keep[start:start + w.numel()].view_as(w).to(w.device))
        start += w.numel()
    return masks


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
