"""Compression methods: one file per method, registered by name in ``METHODS``."""
import importlib
import pkgutil

from methods.base import METHODS, CompressContext, Method, MethodConfig, create_method

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in {"base", "modules"}:
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "CompressContext", "Method", "MethodConfig", "create_method"]
