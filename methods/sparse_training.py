"""Sparse training of ``MaskedFactor`` tensors (FiPS's V factors): one-shot magnitude, RigL and GMP*, global over
all the factors a sparsifier holds (one threshold over their concatenation, as sparsimony's ``global_pruning``).

Protocol of a training step (sparsimony's order): forward and backward; ``sparsifier.step(t)`` (t = 1, 2, ... the
number of the step) may change the masks; ``optimizer.step()``; ``sparsifier.after_optimizer_step(optimizer)``
zeroes the pruned weights and their optimizer state (momentum), so pruned entries stay exactly zero and a
regrown entry starts from zero. Before the forward, ``sparsifier.prepare_step(t)`` turns on recording of dense
gradients when step t updates a RigL mask.

* ``magnitude``: prune to the target sparsity once (``prepare``), masks fixed afterwards.
* ``rigl`` (Evci et al. 2020; sparsimony ``RigL`` with ``CosineDecayScheduler``, the FiPS ViT configs): the target
  sparsity from step 0 (global magnitude pruning of the initial factors); every ``update_every`` steps up to
  ``t_end`` = ``end`` x steps, drop the fraction a_t = a/2 (1 + cos(pi t / t_end)) of the active weights with the
  smallest |w| and regrow as many inactive ones with the largest dense-gradient magnitude (gradient of the masked
  product over the step's backward passes; just-dropped entries may come back). Regrown weights start at zero
  (RigL; sparsimony's ``grown_weights_init=0``, which its code at f4af0e4 computes but discards). The number of
  non-zeros never changes.
* ``gmp`` (Kurtic et al.'s GMP*, sparsimony ``GMP`` + ``AcceleratedCubicScheduler``, the FiPS LLM configs): prune to
  ``initial`` at ``prepare``; at every multiple of ``update_every`` up to ``t_end`` (and at ``t_end`` itself):
  sparsity ``initial`` before ``t_accel``, then s_f + (s_acc - s_f) (1 - (t - t_accel) / (t_end - t_accel))^3,
  which is s_acc at t_accel and exactly s_f at t_end. ``quirk=True`` divides by t_end instead, as sparsimony does
  (so the schedule never reaches s_f; spec 1.9), and skips the final pruning to s_f that ``finalize`` does
  otherwise. Pruning only removes weights (global magnitude over the active ones).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from methods.magnitude import global_score_masks
from methods.modules import MaskedFactor
from runners.errors import ConfigError

SPARSIFIERS = ("magnitude", "rigl", "gmp")


class Sparsifier:
    """Masks of ``factors`` kept at a global sparsity (fraction of zeros over all their entries)."""

    def __init__(self, factors: Sequence[MaskedFactor], sparsity: float):
        if not 0.0 <= sparsity < 1.0:
            raise ConfigError(f"sparsity={sparsity} must be in [0, 1)")
        self.factors = list(factors)
        self.target = float(sparsity)
        self.total = sum(f.weight.numel() for f in self.factors)
        self.updates = 0

    # -- helpers -----------------------------------------------------------------------------------------------------
    def nnz(self) -> int:
        return sum(int(f.mask.sum()) for f in self.factors)

    def sparsity(self) -> float:
        return 1.0 - self.nnz() / self.total if self.total else 0.0

    def kept(self, sparsity: float) -> int:
        """Entries kept at ``sparsity``: total - round(sparsity * total) (as ``magnitude.kept_count``)."""
        return self.total - int(round(sparsity * self.total))

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        """Keep the ``kept(sparsity)`` largest |w| among the active entries (never regrows)."""
        n_keep = self.kept(sparsity)
        if n_keep >= self.nnz():
            return
        scores = [torch.where(f.mask, f.weight.detach().abs().to(torch.float64), -1.0) for f in self.factors]
        for f, m in zip(self.factors, global_score_masks(scores, n_keep)):
            f.set_mask(m)

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
                 end: float = 0.75):
        super().__init__(factors, sparsity)
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
        masks = torch.cat([f.mask.flatten() for f in self.factors])
        weights = torch.cat([f.weight.detach().flatten().abs().to(torch.float64) for f in self.factors])
        grads = torch.cat([(f.dense_grad if f.dense_grad is not None else torch.zeros_like(f.weight))
                           .detach().flatten().abs().to(torch.float64) for f in self.factors])
        n = int(self.drop_fraction(t) * int(masks.sum()))
        n = min(n, int(masks.sum()), int((~masks).sum()) + n)
        if n > 0:
            drop = torch.topk(torch.where(masks, -weights, -math.inf), n, sorted=False).indices
            new = masks.clone()
            new[drop] = False
            grow = torch.topk(torch.where(new, -math.inf, grads), n, sorted=False).indices
            new[grow] = True
            start = 0
            for f in self.factors:
                f.set_mask(new[start:start + f.weight.numel()].view_as(f.mask))
                start += f.weight.numel()
            self.updates += 1
        for f in self.factors:
            f.track_dense_grad, f.dense_grad = False, None


class GMP(Sparsifier):
    def __init__(self, factors, sparsity: float, steps: int, initial: float = 0.05, accelerated: float = 0.5,
                 accel_at: float = 0.25, update_every: int = 50, end: float = 0.75, quirk: bool = False):
        super().__init__(factors, sparsity)
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
            before = self.nnz()
            self.prune_to(self.schedule(t))
            self.updates += int(self.nnz() != before)

    def finalize(self) -> None:
        super().finalize()
        if not self.quirk:
            self.prune_to(self.target)


def make_sparsifier(kind: str, factors: Sequence[MaskedFactor], sparsity: float, steps: int, *,
                    update_every: int = 50, end: float = 0.75, rigl_drop_fraction: float = 0.1,
                    gmp_initial: float = 0.05, gmp_accelerated: float = 0.5, gmp_accel_at: float = 0.25,
                    gmp_quirk: bool = False) -> Sparsifier:
    if kind == "magnitude" or sparsity == 0 or steps == 0 and kind == "rigl":
        return Sparsifier(factors, sparsity)
    if kind == "rigl":
        return RigL(factors, sparsity, steps, rigl_drop_fraction, update_every, end)
    if kind == "gmp":
        return GMP(factors, sparsity, steps, min(gmp_initial, sparsity), min(gmp_accelerated, sparsity),
                   gmp_accel_at, update_every, end, gmp_quirk)
    raise ConfigError(f"sparsifier={kind!r}; valid: {', '.join(SPARSIFIERS)}")
