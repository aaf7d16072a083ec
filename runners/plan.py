"""The plan of a run: its config validated into objects and its run id, before any model is built."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from core.errors import ConfigError
from methods import Method, create_method
from runners.record import make_run_id
from runners.schema import RunConfig, register_configs, validate
from tasks import Task, create_task

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
register_configs()


@dataclass
class Plan:
    """A validated run: everything known before a model is built."""

    run: RunConfig
    task: Task
    method: Method
    run_id: str
    run_dir: Path
    device: torch.device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available on this machine")
    return torch.device(name)


def plan(cfg: DictConfig) -> Plan:
    """Validate ``cfg`` and derive the run id; builds no model and writes nothing."""
    run = validate(cfg)
    device = resolve_device(run.device)
    task = create_task(run.task, Path(run.cache_dir), device, run.progress)
    method = create_method(run.method)
    task.check()
    if method.train_time and not task.supports_training():
        raise ConfigError(f"method {method.name} trains the model, but task family {run.task.family} has no "
                          f"training loop")
    if run.measure.decode == "graph" and device.type != "cuda" and task.generates:
        raise ConfigError("measure.decode=graph captures CUDA graphs and needs a CUDA device; use "
                          "measure.decode=eager on the CPU")
    semantic = {"task": task.semantic_config(), "method": method.semantic_config(), "seed": run.seed}
    run_id = make_run_id(run.task.name, method.name, semantic)
    return Plan(run, task, method, run_id, Path(run.out_dir) / "runs" / run_id, device)
