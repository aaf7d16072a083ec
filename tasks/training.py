"""The image-classification training loop (dense demo models and train-time methods) and its evaluation.

SGD with Nesterov momentum 0.9 (or AdamW, for small ViTs trained from scratch), MultiStepLR (x0.1 at the
milestones), weight decay, cross-entropy; optional CIFAR augmentation (random crop with zero padding + horizontal
flip, on raw pixels). Deterministic for a seed: the shuffle and the augmentation draw from their own
``torch.Generator``s, data loading is single-process, and an interrupted run resumed from its per-epoch checkpoint
ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import ConfigError
from core.io import atomic_path
from core.progress import progress_bar

CKPT_VERSION = 1
OPTIMIZERS = ("sgd", "adamw")


@dataclass
class TrainConfig:
    """Training recipe; the defaults are Synaptic-Flow's (arXiv 2006.05467) CIFAR recipe (160 epochs, drops at 60
    and 120)."""

    epochs: int = 160
    optimizer: str = "sgd"  # sgd (momentum, Nesterov) | adamw (decoupled weight decay; small ViTs from scratch)
    lr: float = 0.1
    milestones: list[int] = field(default_factory=lambda: [60, 120])
    gamma: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    batch_size: int = 128
    eval_batch_size: int = 256
    label_smoothing: float = 0.0
    augment: bool = True  # random crop with padding + horizontal flip
    crop_padding: int = 4

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"task.train.optimizer={self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        if self.epochs < 0 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError(f"task.train: epochs={self.epochs} must be >= 0, batch sizes >= 1")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError(f"task.train: lr={self.lr} > 0, weight_decay={self.weight_decay} >= 0, "
                              f"momentum={self.momentum} in [0, 1)")
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ConfigError("task.train.nesterov needs momentum > 0")
        if list(self.milestones) != sorted(self.milestones) or any(m < 1 for m in self.milestones):
            raise ConfigError(f"task.train.milestones={list(self.milestones)} must be increasing epochs >= 1")
        if not 0 <= self.label_smoothing < 1 or self.crop_padding < 0:
            raise ConfigError(f"task.train: label_smoothing={self.label_smoothing} in [0, 1), crop_padding >= 0")


# -- augmentation ------------------------------------------------------------------------------------------------
def random_crop_flip(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Per-image random crop of the zero-padded batch (torchvision RandomCrop(pad)) and horizontal flip (p = 0.5)."""
    b, c, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator)
    flips = torch.rand(b, generator=generator) < 0.5
    if padding > 0:
        xp = F.pad(x, (padding,) * 4)
        rows = (offsets[0, :, None] + torch.arange(h)).to(x.device)  # (B, H)
        cols = (offsets[1, :, None] + torch.arange(w)).to(x.device)  # (B, W)
        bi = torch.arange(b, device=x.device)[:, None, None, None]
        ci = torch.arange(c, device=x.device)[None, :, None, None]
        x = xp[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]
    flips = flips.to(x.device)[:, None, None, None]
    return torch.where(flips, x.flip(-1), x)


# -- evaluation --------------------------------------------------------------------------------------------------
def _batches_of(data: Any, batch_size: int) -> Iterable[tuple[Tensor, Tensor]]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        x, y = data
        for i in range(0, len(y), batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
    else:
        yield from data


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader_or_tensors: Any, device: torch.device | str,
                        batch_size: int = 256) -> dict[str, float]:
    """Top-1, top-5 (only with >= 5 classes) accuracy and mean cross-entropy over model-ready (x, y) batches.

    ``loader_or_tensors`` is an iterable of (x, y) batches or an (x, y) pair of tensors (cut into ``batch_size``).
    The model runs in eval mode; its previous mode is restored.
    """
    was_training = model.training
    model.eval()
    n, top1, top5, loss_sum, num_classes = 0, 0, 0, 0.0, 0
    try:
        for x, y in _batches_of(loader_or_tensors, batch_size):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            if not isinstance(logits, Tensor):  # e.g. a (logits, distillation logits) pair
                logits = logits[0]
            logits = logits.float()
            num_classes = logits.shape[1]
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            k = min(5, num_classes)
            topk = logits.topk(k, dim=1).indices
            hit = topk == y[:, None]
            top1 += hit[:, 0].sum().item()
            top5 += hit.any(dim=1).sum().item()
            n += len(y)
    finally:
        model.train(was_training)
    if n == 0:
        raise ConfigError("evaluation set is empty")
    out = {"acc/top1": top1 / n, "loss": loss_sum / n}
    if num_classes >= 5:
        out["acc/top5"] = top5 / n
    return out


# -- checkpoints -------------------------------------------------------------------------------------------------
def _rng_state(shuffle: torch.Generator, augment: torch.Generator) -> dict[str, Any]:
    state = {"shuffle": shuffle.get_state(), "augment": augment.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], shuffle: torch.Generator, augment: torch.Generator) -> None:
    shuffle.set_state(state["shuffle"])
    augment.set_state(state["augment"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _scheduler_state(sched: torch.optim.lr_scheduler.MultiStepLR) -> dict[str, Any]:
    state = dict(sched.state_dict())
    state["milestones"] = {int(k): int(v) for k, v in state["milestones"].items()}  # plain dict, not Counter
    return state


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a bad checkpoint
        raise ConfigError(f"training checkpoint {path} is unreadable: {e}") from e


# -- the loop ----------------------------------------------------------------------------------------------------
def fit(model: nn.Module, data, cfg: TrainConfig, seed: int, device: torch.device | str,
        after_step: Callable[[nn.Module], None] | None = None, log: Callable[[dict[str, Any]], None] | None = None,
        ckpt_path: str | Path | None = None, ckpt_key: str = "", progress: bool = True) -> dict[str, Any]:
    """Train ``model`` (already on ``device``) on ``data`` (a ``tasks.data.ImageData``) and evaluate every epoch.

    ``after_step(model)`` runs after every optimizer step; ``log(record)`` after every epoch with ``epoch``,
    ``lr``, ``loss/train``, ``acc/train``, ``acc/top1`` (test), ``loss/test`` (and ``acc/top5``). With ``ckpt_path``
    the state is saved after every epoch and a matching checkpoint (same ``ckpt_key``) is resumed from. Returns the
    final and best-epoch test accuracy (Synaptic-Flow reports the best over epochs) and the per-epoch history.
    The model is left in eval mode.
    """
    device = torch.device(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                              weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.milestones), gamma=cfg.gamma)
    shuffle_gen = torch.Generator().manual_seed(seed)
    augment_gen = torch.Generator().manual_seed(seed + 1_000_003)
    torch.manual_seed(seed)  # dropout and other in-model randomness
    history: list[dict[str, Any]] = []
    start_epoch = 0

    ckpt = Path(ckpt_path) if ckpt_path is not None else None
    if ckpt is not None and ckpt.exists():
        try:
            state = load_checkpoint(ckpt)
        except ConfigError as e:  # a damaged checkpoint (truncated, full disk): start again rather than fail
            logging.getLogger(__name__).warning("%s; training from epoch 0", e)
            state = {}
        if state.get("version") == CKPT_VERSION and state.get("key") == ckpt_key:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            sched.milestones = Counter(sched.milestones)
            _set_rng_state(state["rng"], shuffle_gen, augment_gen)
            history = list(state["history"])
            start_epoch = int(state["epoch"])

    augment = (lambda x: random_crop_flip(x, cfg.crop_padding, augment_gen)) if cfg.augment else None
    n_batches = data.num_batches("train", cfg.batch_size)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        lr = opt.param_groups[0]["lr"]
        loss_sum, correct, seen = 0.0, 0, 0
        batches = data.batches("train", cfg.batch_size, device, generator=shuffle_gen, augment=augment)
        bar = progress_bar(batches, f"epoch {epoch + 1}/{cfg.epochs}", n_batches, enabled=progress)
        for x, y in bar:
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step(model)
            loss_val = loss.item()
            if not math.isfinite(loss_val):
                raise FloatingPointError(f"training loss is {loss_val} at epoch {epoch + 1}")
            loss_sum += loss_val * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        sched.step()
        test = evaluate_classifier(model, data.batches("test", cfg.eval_batch_size, device), device)
        record = {"epoch": epoch + 1, "lr": lr, "loss/train": loss_sum / max(seen, 1),
                  "acc/train": correct / max(seen, 1), "acc/top1": test["acc/top1"], "loss/test": test["loss"]}
        if "acc/top5" in test:
            record["acc/top5"] = test["acc/top5"]
        history.append(record)
        if ckpt is not None:
            with atomic_path(ckpt) as tmp:
                torch.save({"version": CKPT_VERSION, "key": ckpt_key, "epoch": epoch + 1,
                            "model": model.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": _scheduler_state(sched), "rng": _rng_state(shuffle_gen, augment_gen),
                            "history": history}, tmp)
        if log is not None:
            log(dict(record))
    model.eval()
    return summarize(history)


def summarize(history: list[dict[str, Any]]) -> dict[str, Any]:
    if not history:
        return {"train/epochs": 0, "history": []}
    best = max(history, key=lambda r: r["acc/top1"])
    last = history[-1]
    return {"train/epochs": last["epoch"], "acc/top1_final": last["acc/top1"], "acc/top1_best": best["acc/top1"],
            "train/best_epoch": best["epoch"], "loss/train_final": last["loss/train"], "history": history}
