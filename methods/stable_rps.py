"""STABLE-RPS (arXiv 2310.11611): one global shared array, RANDOMFOLD mapping, gradient scaling Gamma v1.

The module code, the mappings and Gamma are in ``methods/hashing.py``; this file names the configuration.
"""
from __future__ import annotations

from dataclasses import dataclass

from methods.base import METHODS
from methods.hashing import HashedSharing, HashingConfig


@dataclass
class StableRPSConfig(HashingConfig):
    mapping: str = "randomfold"
    gamma: str = "v1"


@METHODS.register("stable_rps")
class StableRPS(HashedSharing):
    config_class = StableRPSConfig
