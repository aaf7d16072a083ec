"""Reconstruction training: the optimiser loop shared by FiPS (arXiv 2411.09816, local error minimisation and
fine-tuning) and GFM (Yu & Wu, "Compressing Transformers: Features Are Low-Rank, but Weights Are Not!", AAAI 2023,
Global Feature Mimicking), and FiPS's two local losses.

``train_steps`` runs ``steps`` AdamW steps (betas 0.9, 0.999, eps 1e-8) under a per-step cosine schedule; a loss
closure ``loss_step(t)`` does the forward and backward passes of step t (t = 1, 2, ...) and returns the loss as a
float. An optional ``Sparsifier`` (``methods.sparse_training``) wraps every step to maintain masks.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.progress import progress_bar
from methods.calibration import BlockCache, first_output, move_to
from methods.sparse_training import Sparsifier

LossStep = Callable[[int], float]


def train_steps(params: list[nn.Parameter], sparsifier: Sparsifier | None, steps: int, loss_step: LossStep,
                lr: float, lr_min: float, weight_decay: float, progress: bool = False,
                desc: str = "reconstruction") -> list[float]:
    """``steps`` AdamW steps on ``params`` with a cosine schedule from ``lr`` to ``lr_min`` (one scheduler step per
    optimizer step). A step whose ``loss_step`` ran no backward (no parameter has a gradient: GFM at convergence)
    changes neither the parameters nor the schedule. ``FloatingPointError`` on a non-finite loss. Returns the loss
    of every step."""
    if sparsifier is not None:
        sparsifier.prepare()
    history: list[float] = []
    if steps > 0:
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr_min)
        bar = progress_bar(range(1, steps + 1), desc, enabled=progress)
        for t in bar:
            if sparsifier is not None:
                sparsifier.prepare_step(t)
            opt.zero_grad(set_to_none=True)
            loss = loss_step(t)
            if not math.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss is {loss} at step {t}")
            if any(p.grad is not None for p in params):
                if sparsifier is not None:
                    sparsifier.step(t)
                opt.step()
                sched.step()
                if sparsifier is not None:
                    sparsifier.after_optimizer_step(opt)
            history.append(loss)
            if t % 10 == 0 or t == steps:
                bar.set_postfix(loss=f"{loss:.3g}")
    if sparsifier is not None:
        sparsifier.finalize()
        sparsifier.after_optimizer_step(None)
    return history


def block_loss_step(blocks: list[nn.Module], cache: BlockCache, device: torch.device,
                    generator: torch.Generator) -> LossStep:
    """FiPS's block objective: at step t, calibration batch ``order[t]`` (a fresh permutation from ``generator``
    every pass over the batches); the sum over blocks of MSE(block_b(x_b), y_b) with the dense model's inputs x_b
    and outputs y_b (teacher forcing), backward block by block (the gradients equal those of the sum)."""
    n = len(cache.inputs[0])
    order: list[int] = []
    kwargs = [move_to(k, device) for k in cache.kwargs]

    def step(t: int) -> float:
        if not order:
            order.extend(torch.randperm(n, generator=generator).tolist())
        j = order.pop(0)
        total = 0.0
        for b, block in enumerate(blocks):
            p = next(block.parameters())
            x = cache.inputs[b][j].to(device, p.dtype, non_blocking=True)
            y = cache.targets[b][j].to(device, torch.float32, non_blocking=True)
            loss = F.mse_loss(first_output(block(x, **kwargs[b])).float(), y)
            loss.backward()
            total += float(loss.detach())
        return total

    return step


def token_loss_step(module: nn.Module, x: Tensor, y: Tensor, per_step: int, generator: torch.Generator,
                    dtype: torch.dtype) -> LossStep:
    """FiPS's mlp objective: MSE(module(x_i), y_i) over ``per_step`` of the cached (input, output) rows ``x``, ``y``
    (tokens x features) a step, drawn without replacement from a fresh permutation every pass (the remainder of a
    pass is dropped); inputs cast to ``dtype`` (the module's)."""
    n = x.shape[0]
    order: list[Tensor] = []

    def step(t: int) -> float:
        if not order:
            perm = torch.randperm(n, generator=generator)
            order.extend(perm[k:k + per_step] for k in range(0, n - per_step + 1, per_step))
        idx = order.pop(0).to(x.device)
        loss = F.mse_loss(first_output(module(x[idx].to(dtype))).float(), y[idx].float())
        loss.backward()
        return float(loss.detach())

    return step
