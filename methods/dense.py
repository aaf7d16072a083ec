"""The uncompressed model: the reference every table row is compared against."""
from __future__ import annotations

from dataclasses import dataclass

from methods.base import METHODS, CompressContext, Method, MethodConfig


@dataclass
class DenseConfig(MethodConfig):
    """No fields beyond MethodConfig's (each method has its own config class: it carries the name)."""


@METHODS.register("dense")
class Dense(Method):
    """Leaves the model as it is; ``ratio`` is ignored (and left out of the run id), the removed fraction is 0."""

    config_class = DenseConfig
    uses_ratio = False

    def check(self, adapter) -> None:
        pass

    def apply(self, model, adapter, ctx: CompressContext) -> dict[str, float]:
        return {}
