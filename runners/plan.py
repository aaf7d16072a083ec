"""The plan of a run: its config validated into objects, its run id and the paths it writes, before any model is
built.

Besides value ranges (the config dataclasses) the plan refuses keys the schema does not know (also those added
with ``+``), names that would become unsafe paths, paths outside ``out_dir``, an ``out_dir`` that cannot be
written, and everything that needs the model's structure but not its weights: the method's scope and its
compatibility with the architecture, checkpoint keys and shapes, positions and text lengths in tokens. Those run on
a skeleton of the model without weights (``Task.structure_model``, on the ``meta`` device).
"""
from __future__ import annotations

import dataclasses
import difflib
import errno
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from core.errors import ConfigError
from core.io import is_inside, stable_hash
from methods import Method, create_method
from runners.record import make_run_id
from runners.schema import RunConfig, register_configs, validate
from tasks import Task, create_task
from tasks.adapters import create_adapter

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
register_configs()

#: names that become file or folder names: a letter or digit, then letters, digits and ``_.=,+-``; never ``..``
SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=,+-]*")
#: an ``out_dir`` on a file system with less free space than this is full
MIN_FREE_BYTES = 1 << 20


@dataclass
class Plan:
    """A validated run: everything known before a model is built, and every path it writes (under ``out_dir``)."""

    run: RunConfig
    task: Task
    method: Method
    run_id: str
    run_dir: Path
    device: torch.device
    dense_path: Path  # the dense metrics cache shared by every run of this task and seed
    structure_checked: bool  # on a skeleton; otherwise the run checks the loaded model (``Task.check_model``)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available on this machine")
    return torch.device(name)


def check_slug(key: str, value: str) -> None:
    """``value`` (of config key ``key``) is safe as one path component: ``SLUG`` and no ``..``."""
    if not SLUG.fullmatch(str(value)) or ".." in str(value):
        raise ConfigError(f"{key}={value!r} becomes a file name: use letters, digits and _.=,+- (starting with a "
                          "letter or digit, no '..')")


def unknown_keys(node: Any, obj: Any, prefix: str = "") -> list[str]:
    """Keys of the composed config ``node`` (plain containers) that the validated object ``obj`` has no field for.
    Dataclass fields are the schema; a dict-typed field (e.g. ``task.eval.text_files``) takes any key."""
    if not isinstance(node, dict):
        return []
    out = []
    for key, value in node.items():
        if dataclasses.is_dataclass(obj):
            names = [f.name for f in dataclasses.fields(obj)]
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                out.append(f"{prefix}{key}" + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
                continue
            out += unknown_keys(value, getattr(obj, key), f"{prefix}{key}.")
        elif isinstance(obj, dict):
            out += unknown_keys(value, obj.get(key), f"{prefix}{key}.")
    return out


def check_keys(cfg: DictConfig, run: RunConfig) -> None:
    node = OmegaConf.to_container(cfg, resolve=False)
    node.pop("hydra", None)
    bad = unknown_keys(node, run)
    if bad:
        raise ConfigError(f"unknown config key{'s' if len(bad) > 1 else ''} {', '.join(bad)}")


def check_out_dir(out_dir: Path) -> None:
    """``out_dir`` is (or can become) a writable folder with free space: its nearest existing ancestor must be a
    folder where a probe file can be created and removed. Leaves nothing behind."""
    existing = Path(out_dir).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == Path(out_dir).absolute() else f"lies under the file {existing}"
        raise ConfigError(f"out_dir={out_dir} {where}, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".compbench-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
        free = shutil.disk_usage(existing).free
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ConfigError(f"out_dir={out_dir}: no space left on its file system") from e
        raise ConfigError(f"out_dir={out_dir}: {existing} is not writable ({e.strerror or e})") from e
    if free < MIN_FREE_BYTES:
        raise ConfigError(f"out_dir={out_dir}: no space left on its file system ({free} bytes free)")


# structure checks already passed in this process: {hash of (task, method) config}; skeletons per task config
_checked: set[str] = set()
_skeletons: dict[str, torch.nn.Module | None] = {}


def check_structure(task: Task, method: Method) -> bool:
    """The checks that need the model's structure, on a skeleton without weights (``Task.structure_model``):
    the task's own (``Task.check_model``: checkpoint keys and shapes, positions, text lengths) once per task
    config, then the method's scope and ``Method.check``. Returns False where the task has no skeleton (then the
    run checks the loaded model, before any evaluation)."""
    task_key = stable_hash({"family": task.name, "task": task.semantic_config()})
    key = stable_hash({"task": task_key, "method": method.name, "cfg": method.semantic_config()})
    if key in _checked:
        return _skeletons[task_key] is not None
    if task_key not in _skeletons:
        model = task.structure_model()
        if model is not None:
            task.check_model(model)
        _skeletons[task_key] = model
    model = _skeletons[task_key]
    if model is not None:
        adapter = create_adapter(model)
        if method.cfg.scope not in adapter.scope_names():
            raise ConfigError(f"method.scope={method.cfg.scope!r} is unknown; valid: {', '.join(adapter.scope_names())}")
        method.check(adapter)
    _checked.add(key)
    return model is not None


def plan(cfg: DictConfig) -> Plan:
    """Validate ``cfg`` (values, keys, names, paths, structure) and derive the run id; builds no model, loads no
    weights and writes nothing."""
    run = validate(cfg)
    check_keys(cfg, run)
    check_slug("task.name", run.task.name)
    check_slug("experiment_name", run.experiment_name)
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
    out_dir = Path(run.out_dir)
    run_dir = out_dir / "runs" / run_id
    dense_key = stable_hash({"task": task.semantic_config(), "seed": run.seed})
    dense_path = out_dir / "dense" / f"{run.task.name}-{dense_key}.json"
    for path in (run_dir, dense_path):
        if not is_inside(path, out_dir):
            raise ConfigError(f"{path} would lie outside out_dir={out_dir}")
    check_out_dir(out_dir)
    checked = check_structure(task, method)
    return Plan(run, task, method, run_id, run_dir, device, dense_path, checked)
