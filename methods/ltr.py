"""Lottery ticket rewinding (Frankle et al., arXiv 1912.05671; OpenLTH semantics): iterative global magnitude
pruning of the scope's Linear/Conv2d weights, ``prune_fraction`` of the remaining weights per level, survivors
rewound to their values after ``rewind_epoch`` epochs of the dense run (the number of optimizer steps k that makes is
recorded as ``method/ltr_rewind_iteration``; one CIFAR epoch at batch 128 is k = 391).

Level 0 trains the dense model (its weights after ``rewind_epoch`` epochs are kept); every level then prunes the
smallest surviving |w| of the trained model, rewinds every parameter and buffer to the saved state, applies the masks
and trains again; the last level prunes to exactly ``kept_count(n, ratio)`` weights and is trained by the run loop.
Each level uses the task's full recipe from the rewound weights (OpenLTH resumes the learning-rate schedule at the
rewind step instead; with a rewind point of a few hundred steps the difference is under 1% of the schedule). The
levels are checkpointed in the run's stage folder, so a killed run resumes at the level it was in.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.errors import ConfigError
from methods.base import METHODS, CompressContext, Method, MethodConfig
from methods.magnitude import global_score_masks, kept_count
from methods.modules import masked_from_dense
from methods.pruning import check_prunable, density_metrics, enforce_masks

log = logging.getLogger(__name__)


@dataclass
class LtrConfig(MethodConfig):
    prune_fraction: float = 0.2  # of the remaining weights, per level (OpenLTH: 0.2)
    rewind_epoch: int = 1  # epochs of the dense run whose weights the survivors rewind to (0: the init, i.e. IMP)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.prune_fraction < 1:
            raise ConfigError(f"method.prune_fraction={self.prune_fraction} must be in (0, 1)")
        if self.rewind_epoch < 0:
            raise ConfigError(f"method.rewind_epoch={self.rewind_epoch} must be >= 0")


def level_counts(n: int, n_final: int, prune_fraction: float) -> list[int]:
    """Weights kept after each pruning level: ceil(prune_fraction * remaining) pruned per level, the last level
    stopping at ``n_final``."""
    counts, remaining = [], n
    while remaining > n_final:
        remaining = max(remaining - math.ceil(prune_fraction * remaining), n_final)
        counts.append(remaining)
    return counts


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@METHODS.register("ltr")
class Ltr(Method):
    config_class = LtrConfig
    cfg: LtrConfig
    train_time = True

    def check(self, adapter) -> None:
        super().check(adapter)
        check_prunable(self, adapter)

    def apply(self, model, adapter, ctx: CompressContext) -> dict[str, Any]:
        scope = adapter.scope(self.cfg.scope)
        paths = list(scope)
        layers = [masked_from_dense(layer) for layer in scope.values()]
        for path, layer in zip(paths, layers):
            adapter.replace(path, layer)
        n = sum(layer.weight.numel() for layer in layers)
        counts = level_counts(n, kept_count(n, self.cfg.ratio), self.cfg.prune_fraction)
        levels: list[dict[str, Any]] = []
        for level, n_keep in enumerate(counts):
            if level > 0:
                self._rewind(model, layers, levels[0]["rewind"], levels[-1]["masks"])
            levels.append(ctx.checkpointed(f"ltr_level{level}", lambda: self._train_level(model, layers, level,
                                                                                            n_keep, ctx)))
            log.info("ltr level %d: top-1 %s, pruned to %d of %d weights", level, levels[-1]["acc"], n_keep, n)
        self._rewind(model, layers, levels[0]["rewind"], levels[-1]["masks"])
        out: dict[str, Any] = {"method/ltr_levels": len(counts),
                               "method/ltr_rewind_iteration": levels[0]["rewind_iteration"],
                               "method/pruned_weights": n - counts[-1], **density_metrics(paths, layers)}
        out.update({f"ltr/level{i}/acc_top1_final": r["acc"] for i, r in enumerate(levels) if r["acc"] is not None})
        return out

    def _train_level(self, model: nn.Module, layers: list[nn.Module], level: int, n_keep: int,
                     ctx: CompressContext) -> dict[str, Any]:
        """Train (level 0: the dense model, saving the rewind point), then prune to ``n_keep`` by magnitude."""
        saved: dict[str, Any] = {}
        steps = 0

        def after_step(m: nn.Module) -> None:
            nonlocal steps
            enforce_masks(m)
            steps += 1

        def after_epoch(record: dict[str, Any]) -> None:
            if level == 0 and record["epoch"] == self.cfg.rewind_epoch:
                saved.update(rewind=_state(model), rewind_iteration=steps)

        if level == 0 and self.cfg.rewind_epoch == 0:
            saved.update(rewind=_state(model), rewind_iteration=0)
        # level 0 is not resumed mid-way: the rewind point lives in memory until the level ends
        ckpt = ctx.stage_dir / f"ltr_level{level}_train.pt" if ctx.stage_dir is not None and level > 0 else None
        result = ctx.train(model, after_step=after_step, log=after_epoch, ckpt_path=ckpt)
        if level == 0 and "rewind" not in saved:
            log.warning("ltr: training has fewer than rewind_epoch=%d epochs; rewinding to its end (step %d)",
                        self.cfg.rewind_epoch, steps)
            saved.update(rewind=_state(model), rewind_iteration=steps)
        scores = [torch.where(layer.mask, layer.weight.detach().abs(), -1.0) for layer in layers]
        saved["masks"] = global_score_masks(scores, n_keep)
        saved["acc"] = result.get("acc/top1_final")  # None for tasks without an accuracy
        return saved

    def after_optimizer_step(self, model: nn.Module) -> None:
        enforce_masks(model)

    @staticmethod
    def _rewind(model: nn.Module, layers: list[nn.Module], state: dict[str, torch.Tensor],
                masks: list[torch.Tensor]) -> None:
        model.load_state_dict(state)
        for layer, mask in zip(layers, masks):
            layer.set_mask(mask)
