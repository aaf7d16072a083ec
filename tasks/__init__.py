"""Task families: one module per family at the top of this package, registered by family name in ``TASKS``; named
configs in conf/task/. Every top-level module is imported here so that the families register themselves; support
code that only families use lives in subpackages (``tasks.models``, ``tasks.lm``), which are not imported here."""
import importlib
import pkgutil

from tasks.base import TASKS, Task, TaskConfig, create_task

for _info in pkgutil.iter_modules(__path__):
    if not _info.ispkg:
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["TASKS", "Task", "TaskConfig", "create_task"]
