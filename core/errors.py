"""Errors the harness reports to the user as one line, before any compute."""


class ConfigError(ValueError):
    """Bad input: an unknown name, an out-of-range value, a missing path or a corrupt file."""


class MissingPathError(ConfigError):
    """A local path the config names (a dataset folder, a checkpoint) does not exist on this machine."""
