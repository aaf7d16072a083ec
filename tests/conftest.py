import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("MPLBACKEND", "Agg")

import tests.toy  # noqa: E402,F401  (registers the toy task family)
from runners.schema import register_configs  # noqa: E402

register_configs()


@pytest.fixture
def compose_cfg():
    """compose_cfg(*overrides) -> the composed run config (no hydra node), as the runner receives it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def _compose(*overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            return compose("run", overrides=list(overrides))

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture
def toy_cfg(compose_cfg, tmp_path):
    """toy_cfg(method=..., **task_fields) -> a run config on the toy task writing into tmp_path."""
    from omegaconf import OmegaConf

    def _make(*overrides, **task_fields):
        cfg = compose_cfg("logger=none", f"out_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}",
                          "progress=false", "measure.min_run_time_s=0.01", "measure.warmup=1", *overrides)
        OmegaConf.set_struct(cfg, False)
        cfg.task = OmegaConf.structured(tests.toy.ToyConfig(**task_fields))
        OmegaConf.set_struct(cfg, True)
        return cfg

    return _make
