"""The contract of a compressed layer: what it stores, its index bytes, how to rebuild it and its dense weight.

Accounting, checkpoints and adapters read compressed layers through this interface only; the layers themselves
live in ``methods/modules.py``.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

MODULE_CLASSES: dict[str, type["CompressedModule"]] = {}


class CompressedModule(nn.Module):
    """Base class. Subclasses register themselves by class name for reloading saved models."""

    dense_weight_shape: tuple[int, ...]
    # tensor attribute names that are not part of the dense "weight" (kept when counting over a scope's weights only)
    non_weight_tensors: ClassVar[tuple[str, ...]] = ("bias",)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        MODULE_CLASSES[cls.__name__] = cls

    def stored_tensors(self, weights_only: bool = False) -> list[tuple[torch.Tensor, int]]:
        """(tensor, number of stored values) for each parameter this module keeps; shared ones appear in every sharer."""
        out = []
        for name, p in self.named_parameters(recurse=False):
            if weights_only and name in self.non_weight_tensors:
                continue
            out.append((p, p.numel()))
        return out

    def index_bytes(self) -> int:
        """Bytes of masks or sparse indices needed at inference, reported apart from parameters."""
        return 0

    def spec(self) -> dict[str, Any]:
        """JSON-able constructor keyword arguments: ``type(self)(**spec)`` builds an empty twin."""
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The dense weight this module computes with, shape ``dense_weight_shape``."""
        raise NotImplementedError

    def for_inference(self) -> None:
        """Switch to the inference layout (``methods.fuse.inference_layout``, before measurement): keep only what
        inference needs, same outputs. Accounting and saving happen before; training cannot continue after."""
