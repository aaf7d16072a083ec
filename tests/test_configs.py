"""Every yaml in conf/ composes, validates and plans (no model is built)."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from core.errors import ConfigError, MissingPathError
from methods import METHODS as METHODS_REGISTRY
from runners.preflight import sweep_points
from runners.run import plan
from tasks import TASKS as TASKS_REGISTRY

CONF = Path(__file__).resolve().parents[1] / "conf"
TASKS = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SAFE = ["logger=none", "device=cpu"]
MAX_PLANNED = 100  # points planned per experiment (the paper grids have thousands)


def test_every_yaml_is_covered_by_a_test_below():
    groups = {p.parent.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml")} - {"."}
    assert groups <= {"task", "method", "experiment", "logger", "hydra/launcher", "local"}, groups
    assert TASKS and METHODS and EXPERIMENTS


def plan_with_stand_in_data(cfg, root):
    """Plan; a config of a local dataset this machine lacks is planned again with an empty stand-in root."""
    try:
        return plan(cfg)
    except MissingPathError:
        cfg.task.data.root = str(root)
        return plan(cfg)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("method", METHODS)
def test_task_x_method_composes_and_plans(compose_cfg, task, method, tmp_path):
    cfg = compose_cfg(f"task={task}", f"method={method}", *SAFE)
    if METHODS_REGISTRY.get(cfg.method.name).train_time and not TASKS_REGISTRY.get(cfg.task.family).supports_training():
        with pytest.raises(ConfigError, match="no training loop"):  # refused before anything is built
            plan(cfg)
        return
    p = plan_with_stand_in_data(cfg, tmp_path)
    assert p.run.task.name == task and p.method.name == method
    assert p.run_dir.name == p.run_id


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_point_composes_and_plans(experiment, tmp_path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        points = sweep_points([f"experiment={experiment}", *SAFE], CONF)
        assert points
        ids = set()
        for job in points[::-(-len(points) // MAX_PLANNED)]:  # Hydra composes ~0.1 s a point: a spread sample
            ids.add(plan_with_stand_in_data(compose("run", overrides=job), tmp_path).run_id)
    GlobalHydra.instance().clear()
    assert len(ids) > 1


@pytest.mark.parametrize("logger", sorted(p.stem for p in (CONF / "logger").glob("*.yaml")))
def test_every_logger_composes(compose_cfg, logger):
    assert compose_cfg(f"logger={logger}").logger.name == logger


@pytest.mark.parametrize("launcher", sorted(p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml")))
def test_every_launcher_composes(launcher):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("run", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert cfg.hydra.launcher._target_


def test_demo_experiment_is_the_documented_grid():
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        points = sweep_points(["experiment=demo"], CONF)
        run_ids = {plan(compose("run", overrides=job)).run_id for job in points}
    GlobalHydra.instance().clear()
    assert len(points) == 2 * 3 * 2
    assert len(run_ids) == 2 * (1 + 2 * 2)  # dense runs once per task whatever the ratio


def test_experiment_values_override_the_base_config(compose_cfg):
    cfg = compose_cfg("experiment=demo")
    assert cfg.experiment_name == "demo" and cfg.out_dir == "results/demo"
    assert compose_cfg("experiment=demo", "out_dir=elsewhere").out_dir == "elsewhere"
