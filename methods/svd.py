"""Per-matrix truncated SVD of the scope's linears (and convs, as (out, in*k*k) matrices), rank from the ratio:
r = floor((1 - ratio) * m * n / (m + n)) so that the two factors keep at most (1 - ratio) of the weights."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from core.errors import ConfigError
from core.progress import progress_bar
from methods.base import METHODS, CompressContext, Method, MethodConfig
from methods.modules import LowRankConv2d, LowRankLinear


@dataclass
class LowRankConfig(MethodConfig):
    """Fields of the methods that store factors (svd, svd_llm, basis_sharing, geo_sharing)."""

    # round every rank down to a multiple of this (GPU tiles want 64 or 128; never below one multiple, which can
    # keep more than the budget for small matrices: the accounting reports the parameters actually kept); 1: off
    rank_multiple: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank_multiple < 1:
            raise ConfigError(f"method.rank_multiple={self.rank_multiple} must be >= 1")

    def fit_rank(self, rank: int) -> int:
        """``rank`` rounded down to a multiple of ``rank_multiple`` (at least one multiple; 0 stays 0)."""
        if rank < 1 or self.rank_multiple == 1:
            return rank
        return max(self.rank_multiple, rank // self.rank_multiple * self.rank_multiple)


@dataclass
class SVDConfig(LowRankConfig):
    """No fields beyond LowRankConfig's."""


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """Largest rank whose factors U (out x r) and V (r x in) keep at most (1 - ratio) of out*in parameters."""
    return int((1.0 - ratio) * out_features * in_features // (out_features + in_features))


def truncated_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (U sqrt(S), sqrt(S) V^T) of the best rank-``rank`` approximation, computed in float64."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(weight.dtype), (root[:, None] * vh[:rank]).to(weight.dtype)


@METHODS.register("svd")
class SVD(Method):
    config_class = SVDConfig

    def check(self, adapter) -> None:
        super().check(adapter)
        for path, layer in adapter.scope(self.cfg.scope).items():
            if not isinstance(layer, (nn.Linear, nn.Conv2d)) or (isinstance(layer, nn.Conv2d) and layer.groups != 1):
                raise ConfigError(f"svd compresses nn.Linear and ungrouped nn.Conv2d layers; {path} is {layer}")

    def apply(self, model, adapter, ctx: CompressContext) -> dict[str, float]:
        scope = adapter.scope(self.cfg.scope)
        ranks = []
        for path, layer in progress_bar(scope.items(), "svd", enabled=ctx.progress):
            matrix = layer.weight.flatten(1)
            rank = self.cfg.fit_rank(rank_for_ratio(matrix.shape[0], matrix.shape[1], self.cfg.ratio))
            if rank < 1:
                raise ConfigError(f"method.ratio={self.cfg.ratio} leaves rank 0 for {path} "
                                  f"({matrix.shape[0]}x{matrix.shape[1]})")
            u, v = truncated_svd(matrix, rank)
            if isinstance(layer, nn.Conv2d):
                adapter.replace(path, LowRankConv2d.from_conv(layer, u, v))
            else:
                adapter.replace(path, LowRankLinear.from_factors(u, v, layer.bias))
            ranks.append(rank)
        return {"method/rank_mean": sum(ranks) / len(ranks), "method/rank_min": min(ranks)}
