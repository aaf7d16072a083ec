"""Metric sinks. The run folder's JSON is the source of truth; W&B mirrors it.

``WandbLogger`` keeps every W&B file inside the run folder, uses the harness run id as the W&B run id
(``resume="allow"``, so a requeued run continues the same W&B run) and the experiment name as the group.
It runs offline unless ``logger.mode`` or ``WANDB_MODE`` says otherwise. No credential is ever written. The run is
named ``<task>-<method>-<ratio>-s<seed>`` and tagged ``method:``, ``task:``, ``ratio:``; the summary is written in one
update, and tables keep their numeric columns numeric (one row per run for ``metrics``, so W&B can plot them).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from runners.schema import LoggerConfig

_USER_ENV = {k for k in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR") if k in os.environ}


class NullLogger:
    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def table(self, name: str, df: pd.DataFrame) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


def run_name(config: dict[str, Any]) -> str:
    """``<task>-<method>-<ratio>-s<seed>`` from a resolved run config (dense: ratio 0)."""
    task, method = config.get("task") or {}, config.get("method") or {}
    ratio = 0.0 if method.get("name") == "dense" else method.get("ratio")
    parts = [task.get("name"), method.get("name")] + ([f"{ratio:g}"] if isinstance(ratio, (int, float)) else [])
    return "-".join(map(str, parts + [f"s{config.get('seed')}"]))


def run_tags(config: dict[str, Any]) -> list[str]:
    """``method:<name>``, ``task:<name>``, ``ratio:<r>`` for the keys the config has."""
    task, method = config.get("task") or {}, config.get("method") or {}
    tags = [f"method:{method['name']}"] if method.get("name") else []
    tags += [f"task:{task['name']}"] if task.get("name") else []
    if isinstance(method.get("ratio"), (int, float)):
        tags.append(f"ratio:{0.0 if method.get('name') == 'dense' else method['ratio']:g}")
    return tags


def typed_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Numeric columns become floats, every other column text, missing values None (object dtype throughout), so
    W&B types each column once and can plot the numeric ones."""
    def column(s: pd.Series) -> pd.Series:
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            values = [None if v != v else v for v in s.astype(float)]
        else:
            values = [None if v is None or (isinstance(v, float) and v != v) else str(v) for v in s]
        return pd.Series(values, index=s.index, dtype=object)

    return pd.DataFrame({str(c): column(df[c]) for c in df.columns}, index=df.index)


class WandbLogger(NullLogger):
    def __init__(self, cfg: LoggerConfig, run_id: str, run_dir: Path, group: str, config: dict[str, Any],
                 out_dir: Path | None = None, job_type: str = "run", name: str | None = None):
        """W&B files go into ``run_dir``; caches and artifact staging into ``out_dir/.wandb`` (not the home dir).
        The run is named ``name`` (default ``run_name(config)``) and tagged with ``run_tags(config)``."""
        run_dir = Path(run_dir).resolve()
        state = Path(out_dir).resolve() / ".wandb" if out_dir else run_dir / ".wandb"
        for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"), ("WANDB_CONFIG_DIR", "config")):
            if var not in _USER_ENV:
                os.environ[var] = str(state / sub)
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        mode = cfg.mode or os.environ.get("WANDB_MODE") or "offline"
        self._wandb = wandb
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, id=run_id, name=name or run_name(config),
                              resume="allow", group=group, job_type=job_type, tags=run_tags(config) + list(cfg.tags),
                              dir=str(run_dir), mode=mode, config=config,
                              settings=wandb.Settings(console="off", x_disable_stats=True))

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        self.run.summary.update(dict(metrics))

    def table(self, name: str, df: pd.DataFrame) -> None:
        self.run.log({name: self._wandb.Table(dataframe=typed_frame(df))})

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def create_logger(cfg: LoggerConfig, run_id: str, run_dir: Path, group: str, config: dict[str, Any],
                  out_dir: Path | None = None, job_type: str = "run", name: str | None = None) -> NullLogger:
    if cfg.name == "wandb":
        return WandbLogger(cfg, run_id, run_dir, group, config, out_dir, job_type, name)
    return NullLogger()
