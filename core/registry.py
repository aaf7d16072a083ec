"""A small name -> class registry that refuses duplicates and lists the valid names on a miss."""
from __future__ import annotations

import dataclasses
from typing import Generic, TypeVar

from core.errors import ConfigError

T = TypeVar("T")


def set_default(config: type, field: str, value: str) -> None:
    """Make ``value`` the default of the dataclass ``config``'s ``field``, both where the schema reads it (the
    field: OmegaConf, Hydra's ConfigStore) and where ``config(...)`` does (``__init__``)."""
    named = dataclasses.make_dataclass(config.__name__, [(field, str, dataclasses.field(default=value))],
                                       bases=(config,))
    config.__dataclass_fields__[field] = named.__dataclass_fields__[field]
    config.__init__ = named.__init__
    setattr(config, field, value)


class Registry(Generic[T]):
    """``config_key``: the field of each entry's ``config_class`` that holds the registered name; ``register`` makes
    the name its default, so the name is written once (in ``@REGISTRY.register("<name>")``)."""

    def __init__(self, kind: str, config_key: str):
        self.kind = kind
        self.config_key = config_key
        self._entries: dict[str, type[T]] = {}

    def register(self, name: str):
        def wrap(cls: type[T]) -> type[T]:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            config = cls.config_class
            for other, entry in self._entries.items():
                if entry.config_class is config:
                    raise KeyError(f"{self.kind} {name!r} shares its config class {config.__name__} with {other!r}: "
                                   f"each needs its own (it holds the name)")
            self._entries[name] = cls
            cls.name = name
            set_default(config, self.config_key, name)
            return cls

        return wrap

    def get(self, name: str) -> type[T]:
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
