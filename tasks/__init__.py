"""Task families: one file per family, registered by family name in ``TASKS``; named configs in conf/task/."""
import importlib
import pkgutil

from tasks.base import TASKS, Task, TaskConfig, create_task

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in {"base", "adapters", "data", "training", "models", "cache"}:
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["TASKS", "Task", "TaskConfig", "create_task"]
