"""Validate every point of a command line before Hydra launches anything.

The sweep (command-line sweeps plus an experiment's ``hydra.sweeper.params``) is expanded exactly as Hydra's
basic sweeper does, and each point is composed and planned (config checked, local paths checked). Hydra's
multi-line composition errors become one line.
"""
from __future__ import annotations

import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from core.errors import ConfigError
from runners.plan import plan

PASS_THROUGH_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--info", "-i", "--cfg", "-c", "--resolve",
                      "--shell-completion", "-sc", "--config-path", "-cp", "--config-name", "-cn",
                      "--config-dir", "-cd", "--experimental-rerun"}


def one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf error text folded into one line (available options listed inline)."""
    text = str(exc)
    options = re.findall(r"^\t(\S+)$", text, flags=re.M)
    head = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    head = re.sub(r"^In '[^']*': ", "", head)
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        head += f" ({str(cause).strip().splitlines()[0]})"
    if options:
        head += f"; available: {', '.join(options)}"
    return head


def sweep_points(overrides: list[str], conf_dir: Path) -> list[list[str]]:
    """The override list of every job the command line launches (one list when nothing is swept)."""
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(one_line(e)) from e
    # the sweeper's params come from the fixed group choices (experiment=..., hydra/...=...); value overrides such
    # as task.train.epochs=1 may only exist in the swept tasks, so they are checked per point by the caller
    choices = [o.input_line for o in parsed if not o.is_sweep_override()
               and ("." not in o.get_key_element() or o.get_key_element().startswith("hydra."))]
    try:
        hcfg = compose("run", overrides=choices, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(one_line(e)) from e
    cli_keys = {o.get_key_element() for o in parsed}
    from_config = [f"{k}={v}" for k, v in (hcfg.hydra.sweeper.get("params") or {}).items() if k not in cli_keys]
    all_overrides = parser.parse_overrides(from_config) + parsed
    return [job for batch in BasicSweeper.split_arguments(all_overrides, None) for job in batch]


def preflight(argv: list[str], conf_dir: Path) -> int:
    """Compose and plan every point; return the number of points. Raises ``ConfigError``."""
    if any(a.split("=")[0] in PASS_THROUGH_FLAGS for a in argv):
        return 0
    overrides = [a for a in argv if not a.startswith("-")]
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        points = sweep_points(overrides, conf_dir)
        for job in points:
            try:
                cfg = compose("run", overrides=job)
            except (HydraException, OmegaConfBaseException) as e:
                raise ConfigError(one_line(e)) from e
            plan(cfg)
    GlobalHydra.instance().clear()
    return len(points)
