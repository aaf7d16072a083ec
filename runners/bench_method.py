"""The benchmarks' door to the methods: a method config composed from ``conf/`` as a run composes it, applied with
``Method.apply`` on synthetic calibration data, so that a benchmarked model is the model a run of that config
produces (from random weights instead of trained ones)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch import nn

from methods import CompressContext, Method, MethodConfig, create_method
from runners.plan import CONF_DIR
from runners.schema import validate
from tasks.adapters import create_adapter
from tasks.base import Task, TaskConfig


def method_config(name: str, *overrides: str) -> MethodConfig:
    """The validated config of ``conf/method/<name>.yaml`` with ``overrides`` (``method.<field>=<value>``)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("run", overrides=["logger=none", f"method={name}", *overrides])
    GlobalHydra.instance().clear()
    return validate(cfg).method


class SyntheticTask(Task):
    """Calibration data for benchmarks: ``n`` batches drawn by ``draw(generator)`` (random token windows
    ``{"input_ids": (b, s)}`` or images (b, C, H, W)), on ``device``. The values only need to be plausible: the
    benchmarks measure speed and bytes, which depend on the stored structure, not on the fitted values."""

    name = "synthetic"

    def __init__(self, draw: Callable[[torch.Generator], Any], n: int, device: torch.device):
        super().__init__(TaskConfig(name="synthetic", family="synthetic"), Path("."), device, progress=False)
        self.draw, self.n = draw, n

    def calibration_batches(self, seed: int) -> Iterable[Any]:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(self.n):
            batch = self.draw(gen)
            yield {k: v.to(self.device) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(self.device)


def token_windows(vocab: int, n: int, seqlen: int, device: torch.device) -> SyntheticTask:
    """``n`` random windows of ``seqlen`` tokens below ``vocab``, one per batch."""
    return SyntheticTask(lambda g: {"input_ids": torch.randint(0, vocab, (1, seqlen), generator=g)}, n, device)


def random_images(shape: tuple[int, ...], n: int, batch: int, device: torch.device) -> SyntheticTask:
    """``n`` batches of ``batch`` standard-normal images of ``shape`` (C, H, W)."""
    return SyntheticTask(lambda g: torch.randn(batch, *shape, generator=g), n, device)


def apply_method(model: nn.Module, cfg: MethodConfig, task: Task | None, device: torch.device, seed: int = 0
                 ) -> tuple[Method, dict[str, float]]:
    """Compress ``model`` in place as a run of ``cfg`` does (``check``, then ``apply``); returns (method, metrics
    with the compression sub-stages' ``compress/<stage>_s`` and ``_peak_bytes``)."""
    method = create_method(cfg)
    adapter = create_adapter(model)
    method.check(adapter)
    ctx = CompressContext(task=task, device=device, seed=seed, progress=False)
    metrics = method.apply(model, adapter, ctx)
    return method, {**metrics, **ctx.stage_metrics}
