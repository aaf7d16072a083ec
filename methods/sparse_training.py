"""Sparse training of ``MaskedFactor`` tensors (FiPS's V factors): one-shot magnitude, RigL and GMP*, global over
all the factors a sparsifier holds (one threshold over their concatenation, as sparsimony's ``global_pruning``).

Protocol of a training step (sparsimony's order): forward and backward; ``sparsifier.step(t)`` (t = 1, 2, ... the
number of the step) may change the masks; ``optimizer.step()``; ``sparsifier.after_optimizer_step(optimizer)``
zeroes the pruned weights and their optimizer state (momentum), so pruned entries stay exactly zero and a
regrown entry starts from zero. Before the forward, ``sparsifier.prepare_step(t)`` turns on recording of dense
gradients when step t updates a RigL mask.

* ``magnitude``: prune to the target sparsity once (``prepare``), masks fixed afterwards.
* ``rigl`` (RigL, arXiv 1911.11134; sparsimony ``RigL`` with ``CosineDecayScheduler``, the FiPS ViT configs): the target
  sparsity from step 0 (global magnitude pruning of the initial factors); every ``update_every`` steps up to
  ``t_end`` = ``end`` x steps, drop the fraction a_t = a/2 (1 + cos(pi t / t_end)) of the active weights with the
  smallest |w| and regrow as many inactive ones with the largest dense-gradient magnitude (gradient of the masked
  product over the step's backward passes; just-dropped entries may come back). Regrown weights start at zero
  (RigL; sparsimony's ``grown_weights_init=0``, which its code at f4af0e4 computes but discards). The number of
  non-zeros never changes.
* ``gmp`` (GMP*, arXiv 2210.06384; sparsimony ``GMP`` + ``AcceleratedCubicScheduler``, the FiPS LLM configs): prune to
  ``initial`` at ``prepare``; at every multiple of ``update_every`` up to ``t_end`` (and at ``t_end`` itself):
  sparsity ``initial`` before ``t_accel``, then s_f + (s_acc - s_f) (1 - (t - t_accel) / (t_end - t_accel))^3,
  which is s_acc at t_accel and exactly s_f at t_end. ``quirk=True`` divides by t_end instead, as sparsimony does
  (so the schedule never reaches s_f), and skips the final pruning to s_f that ``finalize`` does
  otherwise. Pruning only removes weights (global magnitude over the active ones).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from core.errors import ConfigError
from methods.magnitude import global_score_masks
from methods.modules import MaskedFactor

SPARSIFIERS = ("magnitude", "rigl", "gmp")


class Sparsifier:
    """Masks of ``factors`` kept at a global sparsity (fraction of zeros over all their entries).

    ``block`` = b > 1 prunes and regrows whole b x b blocks (scored by the sum of |w| or |grad| over the block), so
    every mask is block-constant and V can run as a block-sparse matrix (``SharedFactorLinear.for_inference``);
    the sparsity is then exact in blocks. Every factor's shape must be a multiple of b."""

    def __init__(self, factors: Sequence[MaskedFactor], sparsity: float, block: int = 1):
        if not 0.0 <= sparsity < 1.0:
            raise ConfigError(f"sparsity={sparsity} must be in [0, 1)")
        self.factors = list(factors)
        self.target = float(sparsity)
        self.block = int(block)
        uneven = [tuple(f.weight.shape) for f in self.factors if any(n % self.block for n in f.weight.shape)]
        if self.block < 1 or uneven:
            raise ConfigError(f"sparsity block {block} must be >= 1 and divide every factor's shape; {uneven[:3]} "
                              f"do not divide (round the rank to a multiple of the block)")
        self.total = sum(f.weight.numel() for f in self.factors) // self.block ** 2   # units: entries or blocks
        self.updates = 0

    # -- helpers -----------------------------------------------------------------------------------------------------
    def units(self, x: torch.Tensor) -> torch.Tensor:
        """Per unit (entry, or b x b block) of a factor-shaped tensor: |x| summed (float64), or any() for masks."""
        b = self.block
        if b == 1:
            return x if x.dtype == torch.bool else x.detach().abs().to(torch.float64)
        blocks = x.reshape(x.shape[0] // b, b, x.shape[1] // b, b)
        return blocks.any(3).any(1) if x.dtype == torch.bool else blocks.detach().abs().to(torch.float64).sum((1, 3))

    def expand(self, unit_mask: torch.Tensor) -> torch.Tensor:
        b = self.block
        return unit_mask if b == 1 else unit_mask.repeat_interleave(b, 0).repeat_interleave(b, 1)

    def set_unit_masks(self, unit_masks: Sequence[torch.Tensor]) -> None:
        for f, m in zip(self.factors, unit_masks):
            f.set_mask(self.expand(m.view(f.weight.shape[0] // self.block, -1)))

    def active_units(self) -> int:
        return sum(int(self.units(f.mask).sum()) for f in self.factors)

    def nnz(self) -> int:
        return sum(int(f.mask.sum()) for f in self.factors)

    def sparsity(self) -> float:
        return 1.0 - self.active_units() / self.total if self.total else 0.0

    def kept(self, sparsity: float) -> int:
        """Units kept at ``sparsity``: total - round(sparsity * total) (as ``magnitude.kept_count``)."""
        return self.total - int(round(sparsity * self.total))

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        """Keep the ``kept(sparsity)`` largest units by |w| among the active ones (never regrows)."""
        n_keep = self.kept(sparsity)
        if n_keep >= self.active_units():
            return
        scores = [torch.where(self.units(f.mask), self.units(f.weight), -1.0) for f in self.factors]
        self.set_unit_masks(global_score_masks(scores, n_keep))

    # -- protocol ----------------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        self.prune_to(self.target)

    def prepare_step(self, t: int) -> None:
        """Before the forward of step ``t``."""

    def step(self, t: int) -> None:
        """After the backward of step ``t``, before the optimizer step."""

    @torch.no_grad()
    def after_optimizer_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        for f in self.factors:
            f.weight.mul_(f.mask)
            if optimizer is not None:
                for value in optimizer.state.get(f.weight, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == f.weight.shape:
                        value.mul_(f.mask)

    def finalize(self) -> None:
        """After the last step."""
        for f in self.factors:
            f.track_dense_grad, f.dense_grad = False, None


class RigL(Sparsifier):
    def __init__(self, factors, sparsity: float, steps: int, drop_fraction: float = 0.1, update_every: int = 50,
                 end: float = 0.75, block: int = 1):
        super().__init__(factors, sparsity, block)
        self.alpha, self.every = float(drop_fraction), int(update_every)
        self.t_end = int(end * steps)

    def updates_at(self, t: int) -> bool:
        return self.target > 0 and t % self.every == 0 and t <= self.t_end

    def drop_fraction(self, t: int) -> float:
        return self.alpha / 2 * (1 + math.cos(math.pi * t / self.t_end))

    def prepare_step(self, t: int) -> None:
        for f in self.factors:
            f.track_dense_grad, f.dense_grad = self.updates_at(t), None

    @torch.no_grad()
    def step(self, t: int) -> None:
        if not self.updates_at(t):
            return
        masks = torch.cat([self.units(f.mask).flatten() for f in self.factors])
        weights = torch.cat([self.units(f.weight).flatten() for f in self.factors])
        grads = torch.cat([self.units(f.dense_grad if f.dense_grad is not None else torch.zeros_like(f.weight))
                           .flatten() for f in self.factors])
        n = int(self.drop_fraction(t) * int(masks.sum()))  # units
        n = min(n, int(masks.sum()), int((~masks).sum()) + n)
        if n > 0:
            drop = torch.topk(torch.where(masks, -weights, -math.inf), n, sorted=False).indices
            new = masks.clone()
            new[drop] = False
            grow = torch.topk(torch.where(new, -math.inf, grads), n, sorted=False).indices
            new[grow] = True
            sizes = [f.weight.numel() // self.block ** 2 for f in self.factors]
            self.set_unit_masks(new.split(sizes))
            self.updates += 1
        for f in self.factors:
            f.track_dense_grad, f.dense_grad = False, None


class GMP(Sparsifier):
    def __init__(self, factors, sparsity: float, steps: int, initial: float = 0.05, accelerated: float = 0.5,
                 accel_at: float = 0.25, update_every: int = 50, end: float = 0.75, quirk: bool = False,
                 block: int = 1):
        super().__init__(factors, sparsity, block)
        if not 0 <= initial <= accelerated <= sparsity and sparsity > 0:
            raise ConfigError(f"GMP needs 0 <= initial ({initial}) <= accelerated ({accelerated}) <= sparsity "
                              f"({sparsity})")
        self.initial, self.accelerated, self.every, self.quirk = initial, accelerated, int(update_every), quirk
        self.t_end = int(end * steps)
        self.t_accel = int(accel_at * steps)

    def schedule(self, t: int) -> float:
        """The sparsity the schedule sets at an update step ``t``."""
        if t < self.t_accel:
            return self.initial
        span = self.t_end if self.quirk else self.t_end - self.t_accel
        if span <= 0:
            return self.target
        frac = min(max((t - self.t_accel) / span, 0.0), 1.0)
        return self.target + (self.accelerated - self.target) * (1 - frac) ** 3

    def updates_at(self, t: int) -> bool:
        return self.target > 0 and t <= self.t_end and (t % self.every == 0 or t == self.t_end)

    def prepare(self) -> None:
        self.prune_to(min(self.initial, self.target))

    def step(self, t: int) -> None:
        if self.updates_at(t):
            before = self.active_units()
            self.prune_to(self.schedule(t))
            self.updates += int(self.active_units() != before)

    def finalize(self) -> None:
        super().finalize()
        if not self.quirk:
            self.prune_to(self.target)


def make_sparsifier(kind: str, factors: Sequence[MaskedFactor], sparsity: float, steps: int, *,
                    update_every: int = 50, end: float = 0.75, rigl_drop_fraction: float = 0.1,
                    gmp_initial: float = 0.05, gmp_accelerated: float = 0.5, gmp_accel_at: float = 0.25,
                    gmp_quirk: bool = False, block: int = 1) -> Sparsifier:
    if kind == "magnitude" or sparsity == 0 or steps == 0 and kind == "rigl":
        return Sparsifier(factors, sparsity, block)
    if kind == "rigl":
        return RigL(factors, sparsity, steps, rigl_drop_fraction, update_every, end, block)
    if kind == "gmp":
        return GMP(factors, sparsity, steps, min(gmp_initial, sparsity), min(gmp_accelerated, sparsity),
                   gmp_accel_at, update_every, end, gmp_quirk, block)
    raise ConfigError(f"sparsifier={kind!r}; valid: {', '.join(SPARSIFIERS)}")
