"""ROAST (arXiv 2207.10702): global tile hashing of a shared array, without gradient scaling.

The module code is in ``methods/hashing.py``. Default variant: what the STABLE-RPS paper compared against, i.e.
16x16 tiles for Linear layers and element-wise hashing for convolutions (``tile_convs: true`` tiles them too).
"""
from __future__ import annotations

from dataclasses import dataclass

from methods.base import METHODS
from methods.hashing import HashedSharing, HashingConfig


@dataclass
class RoastConfig(HashingConfig):
    mapping: str = "roast"
    gamma: str = "none"


@METHODS.register("roast")
class Roast(HashedSharing):
    config_class = RoastConfig
