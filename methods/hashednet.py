"""HashedNet with one global shared array (element-wise hashing, random signs, per-module scale), no gradient
scaling: the "HashedNet-global" baseline of the STABLE-RPS paper. The module code is in ``methods/hashing.py``."""
from __future__ import annotations

from dataclasses import dataclass

from methods.base import METHODS
from methods.hashing import HashedSharing, HashingConfig


@dataclass
class HashedNetConfig(HashingConfig):
    mapping: str = "hashednet"
    gamma: str = "none"


@METHODS.register("hashednet")
class HashedNet(HashedSharing):
    config_class = HashedNetConfig
