"""Metric sinks. The run folder's JSON is the source of truth; W&B mirrors it.

``WandbLogger`` keeps every W&B file inside the run folder, uses the harness run id as the W&B run id
(``resume="allow"``, so a requeued run continues the same W&B run) and the experiment name as the group.
It runs offline unless ``logger.mode`` or ``WANDB_MODE`` says otherwise. No credential is ever written.
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


class WandbLogger(NullLogger):
    def __init__(self, cfg: LoggerConfig, run_id: str, run_dir: Path, group: str, config: dict[str, Any],
                 out_dir: Path | None = None, job_type: str = "run"):
        """W&B files go into ``run_dir``; caches and artifact staging into ``out_dir/.wandb`` (not the home dir)."""
        run_dir = Path(run_dir).resolve()
        state = Path(out_dir).resolve() / ".wandb" if out_dir else run_dir / ".wandb"
        for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"), ("WANDB_CONFIG_DIR", "config")):
            if var not in _USER_ENV:
                os.environ[var] = str(state / sub)
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        mode = cfg.mode or os.environ.get("WANDB_MODE") or "offline"
        self._wandb = wandb
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, id=run_id, name=run_id, resume="allow",
                              group=group, job_type=job_type, tags=list(cfg.tags), dir=str(run_dir), mode=mode,
                              config=config, settings=wandb.Settings(console="off", x_disable_stats=True))

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():
            self.run.summary[k] = v

    def table(self, name: str, df: pd.DataFrame) -> None:
        self.run.log({name: self._wandb.Table(dataframe=df.astype(str))})

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def create_logger(cfg: LoggerConfig, run_id: str, run_dir: Path, group: str, config: dict[str, Any],
                  out_dir: Path | None = None, job_type: str = "run") -> NullLogger:
    if cfg.name == "wandb":
        return WandbLogger(cfg, run_id, run_dir, group, config, out_dir, job_type)
    return NullLogger()
