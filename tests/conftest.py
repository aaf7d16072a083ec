import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("MPLBACKEND", "Agg")
if not torch.cuda.is_available():  # the Triton kernels run on CPU tensors in Triton's interpreter (test_kernels)
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
            search = [] if any(o.startswith("hydra.searchpath=") for o in overrides) else \
                [f"hydra.searchpath=[file://{ROOT / 'tests' / 'conf'}]"]
            return compose("run", overrides=[*search, *overrides])

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture
def toy_cfg(compose_cfg, tmp_path):
    """toy_cfg(method=..., **task_fields) -> a run config on the toy task writing into tmp_path."""
    def _make(*overrides, **task_fields):
        fields = [f"task.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in task_fields.items()]
        return compose_cfg("task=toy", "logger=none", f"out_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}",
                           "progress=false", "measure.min_run_time_s=0.01", "measure.warmup=1", *fields, *overrides)

    return _make


# Smaller versions of the embedded demo tasks for tests (the shipped configs are sized for the demo's quality).
TINY = {
    "toy": [],
    "demo_lm": ["task.embedded.steps=30", "task.embedded.num_layers=2", "task.embedded.hidden_size=64",
                "task.embedded.intermediate_size=128", "task.calib.n_samples=4", "task.eval.max_windows=8"],
    "demo_resnet": ["task.train.epochs=1"],
    "demo_vit": ["task.train.epochs=1"],
}


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One cache of trained embedded models for the whole test session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def task_cfg(compose_cfg, tmp_path, shared_cache):
    """task_cfg(task, *overrides) -> a run config on a tiny version of ``task`` writing into tmp_path."""

    def _make(task, *overrides):
        return compose_cfg(f"task={task}", *TINY[task], "logger=none", f"out_dir={tmp_path / 'out'}",
                           f"cache_dir={shared_cache}", "progress=false", "measure.min_run_time_s=0.01",
                           "measure.warmup=1", *overrides)

    return _make


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: as fast, and immune to oversubscribed CPUs (where two threads
    can be 20x slower). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
