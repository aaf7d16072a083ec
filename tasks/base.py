"""The task plugin API: a task family builds a model, evaluates it and supplies calibration and example inputs."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable

import torch
from omegaconf import MISSING
from torch import nn

from core.errors import ConfigError
from core.registry import Registry

TASKS: Registry["Task"] = Registry("task family", config_key="family")


@dataclass
class MeasureInputs:
    """Batch shape used for latency, throughput, FLOPs and peak memory (recorded with every number)."""

    batch_size: int = 1
    seqlen: int = 128  # language tasks only


@dataclass
class TaskConfig:
    """Fields every task has. ``name`` is the config name, ``family`` picks the implementation in tasks/."""

    name: str = MISSING
    family: str = MISSING
    measure: MeasureInputs = field(default_factory=MeasureInputs)

    def __post_init__(self) -> None:
        if self.measure.batch_size < 1:
            raise ConfigError(f"task.measure.batch_size={self.measure.batch_size} must be >= 1")


class Task:
    """Base class of a task family. Subclasses register with ``@TASKS.register(family)``."""

    name: ClassVar[str]
    config_class: ClassVar[type[TaskConfig]] = TaskConfig

    def __init__(self, cfg: TaskConfig, cache_dir: Path, device: torch.device, progress: bool = True):
        self.cfg = cfg
        self.cache_dir = Path(cache_dir)
        self.device = device
        self.progress = progress  # progress bars on long stages (training, evaluation)

    def semantic_config(self) -> dict[str, Any]:
        """The fields that change results (hashed into the run id)."""
        return dataclasses.asdict(self.cfg)

    def main_metric(self) -> tuple[str, bool]:
        """(metrics.json key of the headline quality metric, higher is better), e.g. ("ppl/wikitext2", False)."""
        raise NotImplementedError

    def summary(self) -> dict[str, str]:
        """``model`` (the task config name, e.g. llama_7b) and ``dataset`` (headline eval dataset) for reports."""
        return {"model": self.cfg.name, "dataset": ""}

    def check(self) -> None:
        """Validate local paths and names before any model is built; raise ``ConfigError``."""

    def structure_model(self) -> nn.Module | None:
        """The model's skeleton without weights (parameters on the ``meta`` device, built from the config only: no
        weights loaded, no training), for the checks of ``runners.plan`` before any compute; None where the family
        cannot build one (its structure is then checked after ``build_model``)."""
        return None

    def check_model(self, skeleton: nn.Module) -> None:
        """Checks of the config against the model's structure (``structure_model``), e.g. checkpoint keys and
        shapes, positions, text lengths in tokens; raise ``ConfigError``."""

    def build_model(self, seed: int) -> nn.Module:
        """The dense model, trained or loaded, on ``self.device``, in eval mode."""
        raise NotImplementedError

    def fresh_model(self, seed: int) -> nn.Module:
        """An untrained model of the task's architecture (train-time methods compress it, then ``train`` it)."""
        raise ConfigError(f"task family {self.name} builds no untrained model, so train-time methods do not apply")

    @classmethod
    def supports_training(cls) -> bool:
        """Whether the family implements ``fresh_model`` and ``train`` (train-time methods need both)."""
        return cls.fresh_model is not Task.fresh_model and cls.train is not Task.train

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Quality metrics plus ``protocol/...`` fields that qualify them."""
        raise NotImplementedError

    # -- data a method may ask for (through ``CompressContext``); a family that lacks a kind raises ConfigError -----
    DATA_KINDS: ClassVar[tuple[str, ...]] = ("calibration_batches", "labelled_calibration_batches",
                                             "stratified_batches", "training_batches")

    def calibration_batches(self, seed: int) -> Iterable[Any]:
        """Batches for post-training methods (inputs the model's forward accepts), chosen by ``seed``."""
        raise ConfigError(f"task family {self.name} provides no calibration batches")

    def labelled_calibration_batches(self, seed: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, labels) batches of the calibration set on the device, chosen by ``seed`` (losses for Hessians)."""
        raise ConfigError(f"task family {self.name} provides no labelled calibration batches")

    def stratified_batches(self, seed: int, n_items: int, batch_size: int) -> tuple[Iterable[torch.Tensor], int]:
        """(model-ready batches of ``n_items`` unaugmented, class-stratified training inputs chosen by ``seed``,
        number of batches): the calibration protocol of FiPS (arXiv 2411.09816) and AAFM / GFM ("Features are
        low-rank, but weights are not!")."""
        raise ConfigError(f"task family {self.name} provides no class-stratified batches")

    def training_batches(self, seed: int, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """Endless shuffled (inputs, labels) training batches on the device, with the task's augmentation."""
        raise ConfigError(f"task family {self.name} provides no training batches")

    @classmethod
    def provides(cls, kind: str) -> bool:
        """Whether the family implements the data kind ``kind`` (one of ``DATA_KINDS``)."""
        if kind not in cls.DATA_KINDS:
            raise ValueError(f"unknown data kind {kind!r}; valid: {', '.join(cls.DATA_KINDS)}")
        return getattr(cls, kind) is not getattr(Task, kind)

    def example_inputs(self) -> tuple[Any, ...]:
        """Positional inputs for one forward at ``cfg.measure`` shape, for latency / FLOPs / memory."""
        raise NotImplementedError

    #: whether the task's model generates tokens (then the run measures batch-1 decode, ``measure.decode``)
    generates: bool = False

    def decode_prompt(self, n_tokens: int) -> torch.Tensor:
        """Token ids [1, n_tokens] on the model's input device, the prompt of the decode measurement."""
        raise NotImplementedError(f"task family {self.name} does not generate")

    def items_per_forward(self) -> int:
        """Items one example forward processes (tokens for LMs, images for vision), for throughput."""
        return self.cfg.measure.batch_size

    def train(self, model: nn.Module, seed: int, after_step=None, log=None, ckpt_path: Path | None = None
              ) -> dict[str, Any]:
        """Train ``model`` with the family's loop (train-time methods): ``after_step(model)`` runs after every
        optimizer step, ``log(dict)`` after every epoch; training state is checkpointed to ``ckpt_path`` every
        epoch and resumed from it."""
        raise ConfigError(f"task family {self.name} has no training loop, so train-time methods do not apply")


def create_task(cfg: TaskConfig, cache_dir: Path, device: torch.device, progress: bool = True) -> Task:
    return TASKS.get(cfg.family)(cfg, cache_dir, device, progress)
