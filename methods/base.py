"""The method plugin API: a config dataclass, a ``Method`` class and the context a method runs in."""
from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Iterator

import torch
from omegaconf import MISSING
from torch import nn

from core import memory
from core.errors import ConfigError
from core.io import atomic_path
from core.registry import Registry

if TYPE_CHECKING:
    from tasks.adapters import ModelAdapter
    from tasks.base import Task

METHODS: Registry["Method"] = Registry("method", config_key="name")


@dataclass
class MethodConfig:
    """Fields every method has. ``ratio`` is the fraction of parameters removed inside ``scope`` (0.9 = 10x)."""

    name: str = MISSING
    ratio: float = 0.5
    scope: str = "auto"  # an adapter scope: auto (the architecture's default), linear, attention, mlp, prunable

    def __post_init__(self) -> None:
        if not 0.0 < float(self.ratio) < 1.0:
            raise ConfigError(f"method.ratio={self.ratio} is outside (0, 1): it is the fraction of parameters removed")


@dataclass
class CompressContext:
    """What a method may use while it compresses: the task (for calibration data), device, seeded RNG, and the
    run's ``stage_dir`` for checkpoints that let a killed or requeued run resume (see ``checkpointed``)."""

    task: "Task"
    device: torch.device
    seed: int
    progress: bool = True
    stage_dir: Path | None = None
    generator: torch.Generator = field(init=False)
    #: ``compress/<stage>_s`` (wall seconds outside nested stages, summed over entries) and
    #: ``compress/<stage>_peak_bytes`` (peak including nested stages) of every ``stage``
    stage_metrics: dict[str, float] = field(init=False, default_factory=dict)
    _open: list[list[float]] = field(init=False, default_factory=list)  # [segment start, seconds, peak] per stage

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a sub-stage of compression (``calibration``, ``statistics``, ``eigen``, ``fitting``, ``refit``)
        and its peak memory (``core.memory.peak_bytes``: CUDA allocator, or process RSS on the CPU) into
        ``stage_metrics``. Stages nest: an enclosing stage's clock pauses while an inner one runs (so the seconds
        of all stages add up to the whole), and its peak includes the inner stages' peaks."""
        now = time.perf_counter()
        for outer in self._open:
            outer[2] = max(outer[2], memory.peak_bytes(self.device))
        if self._open:
            self._open[-1][1] += now - self._open[-1][0]
        memory.reset_peak(self.device)
        self._open.append([time.perf_counter(), 0.0, 0])
        try:
            yield
        finally:
            start, seconds, peak = self._open.pop()
            now = time.perf_counter()
            peak = max(peak, memory.peak_bytes(self.device))
            for outer in self._open:
                outer[2] = max(outer[2], peak)
            if self._open:
                self._open[-1][0] = now
            key = f"compress/{name}"
            self.stage_metrics[f"{key}_s"] = self.stage_metrics.get(f"{key}_s", 0.0) + seconds + now - start
            self.stage_metrics[f"{key}_peak_bytes"] = max(self.stage_metrics.get(f"{key}_peak_bytes", 0), peak)

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with every call inside ``stage(name)``: for callbacks, e.g. ``run_blocks``'s per-block fit."""
        def run(*args: Any, **kwargs: Any) -> Any:
            with self.stage(name):
                return fn(*args, **kwargs)

        return run

    # -- the task's data: the only door methods use (``Task.DATA_KINDS``) ---------------------------------------
    def provides(self, kind: str) -> bool:
        """Whether the task supplies the data kind ``kind`` (e.g. ``stratified_batches``)."""
        return self.task.provides(kind)

    def calibration_batches(self) -> Iterable[Any]:
        """Model-ready calibration batches (token windows, images), chosen by the run's seed."""
        return self.task.calibration_batches(self.seed)

    def labelled_calibration_batches(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, labels) calibration batches; ``ConfigError`` where the task has no labels."""
        return self.task.labelled_calibration_batches(self.seed)

    def stratified_batches(self, n_items: int, batch_size: int) -> tuple[Iterable[torch.Tensor], int]:
        """(``n_items`` class-stratified training inputs in batches, number of batches)."""
        return self.task.stratified_batches(self.seed, n_items, batch_size)

    def training_batches(self, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """Endless shuffled, augmented (inputs, labels) training batches."""
        return self.task.training_batches(self.seed, batch_size)

    def train(self, model: nn.Module, after_step=None, log=None, ckpt_path: Path | None = None) -> dict[str, Any]:
        """The task's training loop on ``model`` (``Task.train``), for methods that train between their steps."""
        return self.task.train(model, self.seed, after_step=after_step, log=log, ckpt_path=ckpt_path)

    def checkpointed(self, name: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, saved to ``<stage_dir>/<name>.pt`` the first time and loaded (onto ``device``) instead of
        recomputed when a resumed run gets here again. For expensive intermediate results such as calibration
        statistics: tensors, numbers, strings, lists and dicts of them (``torch.load(weights_only=True)``)."""
        if self.stage_dir is None:
            return compute()
        path = Path(self.stage_dir) / f"{name}.pt"
        if path.is_file():
            try:
                return torch.load(path, map_location=self.device, weights_only=True)
            except Exception as e:  # noqa: BLE001 - a damaged checkpoint (truncated, full disk) is recomputed
                logging.getLogger(__name__).warning("stage checkpoint %s is unreadable (%s); recomputing", path, e)
        value = compute()
        with atomic_path(path) as tmp:
            torch.save(value, tmp)
        return value


class Method:
    """Base class. Subclasses set ``config_class`` and implement ``apply``; register with ``@METHODS.register(name)``."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    uses_ratio: ClassVar[bool] = True
    train_time: ClassVar[bool] = False

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg

    def semantic_config(self) -> dict[str, Any]:
        """The fields that change the result (the run id hashes these)."""
        d = dataclasses.asdict(self.cfg)
        if not self.uses_ratio:
            d.pop("ratio")
        return d

    def check(self, adapter: "ModelAdapter") -> None:
        """Refuse a model this method cannot compress, before any compute."""
        if not adapter.scope(self.cfg.scope):
            raise ConfigError(f"method {self.name}: scope {self.cfg.scope!r} holds no modules in "
                              f"{type(adapter.model).__name__}; scopes: {', '.join(adapter.scope_names())}")

    def apply(self, model: nn.Module, adapter: "ModelAdapter", ctx: CompressContext) -> dict[str, float]:
        """Compress ``model`` in place (replacing modules through ``adapter``); return method-specific numbers."""
        raise NotImplementedError

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Train-time methods: re-impose their constraint (e.g. masks) after every optimizer step."""


def create_method(cfg: MethodConfig) -> Method:
    return METHODS.get(cfg.name)(cfg)
