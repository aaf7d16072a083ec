"""Errors the harness reports to the user as one line, before any compute."""


class ConfigError(ValueError):
    """Bad input: an unknown name, an out-of-range value, a missing path or a corrupt file."""
