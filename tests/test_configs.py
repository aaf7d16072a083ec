"""Every yaml in conf/ composes, validates and plans (no model is built); method yamls agree with their schema."""
import dataclasses
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from core.errors import ConfigError, MissingPathError
from core.registry import Registry
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
# (family, method) pairs whose architectures the method cannot compress with its default config: the plan refuses
# them on a skeleton of the model, before anything is built
INCOMPATIBLE = {("cifar_cnn", m) for m in ("basis_sharing", "fips", "geo_sharing", "svd_llm")} | {
    ("timm_image", "basis_sharing")}


def test_every_yaml_is_covered_by_a_test_below():
    groups = {p.parent.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml")} - {"."}
    assert groups <= {"task", "method", "experiment", "logger", "hydra/launcher", "local", "demo_point"}, groups
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
    if (cfg.task.family, cfg.method.name) in INCOMPATIBLE:
        with pytest.raises(ConfigError, match=r"ResNet|VGG|Timm"):
            plan_with_stand_in_data(cfg, tmp_path)
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
        plans = [plan(compose("run", overrides=job)) for job in points]
    GlobalHydra.instance().clear()
    run_ids = {p.run_id for p in plans}
    points_dir = sorted(f.stem for f in (CONF / "demo_point").glob("*.yaml"))
    assert sorted(job[0].split("=")[1] for job in points) == points_dir  # every point file, each once
    assert len(run_ids) == len(points) == 7 + 3 + 3  # demo_lm: dense + 3 methods x 2 ratios; resnet 3; vit 3
    assert {p.method.name for p in plans if p.run.task.name == "demo_lm"} >= {"svd_llm", "basis_sharing", "geo_sharing"}
    assert {p.method.name for p in plans if p.run.task.name == "demo_resnet"} >= {"stable_rps", "synflow"}
    assert {(p.method.name, p.run.method.ratio) for p in plans if p.run.task.name == "demo_resnet"} >= \
        {("stable_rps", 0.9), ("synflow", 0.9)}
    assert "fips" in {p.method.name for p in plans if p.run.task.name == "demo_vit"}


def test_experiment_values_override_the_base_config(compose_cfg):
    cfg = compose_cfg("experiment=demo")
    assert cfg.experiment_name == "demo" and cfg.out_dir == "results/demo"
    assert compose_cfg("experiment=demo", "out_dir=elsewhere").out_dir == "elsewhere"


def schema_of(path: Path, registry: Registry) -> DictConfig:
    """The structured config a conf/<group>/*.yaml composes onto (its ``/schema/<group>/<key>@_here_`` default)."""
    (key,) = re.findall(r"^\s*- /schema/\w+/(\w+)@_here_", path.read_text(), flags=re.M)
    return OmegaConf.structured(registry.get(key).config_class)


def restated_differently(stated: DictConfig, schema: DictConfig, where: str) -> list[str]:
    """Paths of ``stated`` (nested dicts walked) whose value differs from the schema's default there."""
    out = []
    for key, value in stated.items():
        path = f"{where}.{key}"
        if key == "defaults":
            continue
        if key not in schema or OmegaConf.is_missing(schema, key):
            out.append(f"{path}={value} (the dataclass has no default)")
        elif isinstance(value, DictConfig) and isinstance(schema[key], DictConfig):
            out += restated_differently(value, schema[key], path)
        else:
            ours = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            default = OmegaConf.to_container(schema[key]) if OmegaConf.is_config(schema[key]) else schema[key]
            if ours != default:
                out.append(f"{path}: yaml {ours!r}, dataclass {default!r}")
    return out


@pytest.mark.parametrize("method", METHODS)
def test_method_yaml_restates_its_dataclass_defaults(method):
    """A method yaml documents its defaults: every value it states is the config dataclass's default (change both
    together). Task yamls are named instances whose values override their family's defaults, so they are not."""
    path = CONF / "method" / f"{method}.yaml"
    assert restated_differently(OmegaConf.load(path), schema_of(path, METHODS_REGISTRY), "method") == []


def test_a_restated_default_with_another_value_is_found(tmp_path):
    path = tmp_path / "svd.yaml"
    path.write_text("defaults:\n  - /schema/method/geo_sharing@_here_\nscope: mlp\nshare_types:\n  default: [q]\n")
    found = restated_differently(OmegaConf.load(path), schema_of(path, METHODS_REGISTRY), "method")
    assert [f.split(":")[0] for f in found] == ["method.scope", "method.share_types.default"]


@pytest.mark.parametrize("group,registry", [("method", METHODS_REGISTRY), ("task", TASKS_REGISTRY)])
def test_registered_names_are_written_once(group, registry):
    """``@METHODS.register("svd")`` / ``@TASKS.register("hf_lm")`` is the only spelling: the yamls leave
    ``method.name`` / ``task.family`` to the schema, whose default the registry sets."""
    for path in sorted((CONF / group).glob("*.yaml")):
        assert registry.config_key not in OmegaConf.load(path), path.name
        assert getattr(schema_of(path, registry), registry.config_key) in registry


def test_registering_sets_the_config_default_and_refuses_a_shared_config_class():
    @dataclasses.dataclass
    class Cfg:
        name: str = "???"
        size: int = 1

    registry = Registry("thing", config_key="name")

    @registry.register("first")
    class First:
        config_class = Cfg

    assert Cfg().name == "first" and Cfg(size=2).name == "first" and First.name == "first"
    assert OmegaConf.structured(Cfg).name == "first"
    with pytest.raises(KeyError, match="shares its config class"):
        @registry.register("second")
        class Second:
            config_class = Cfg


def test_composition_supplies_the_registered_names(compose_cfg):
    cfg = compose_cfg("task=llama_7b", "method=geo_sharing")
    assert (cfg.method.name, cfg.task.family, cfg.task.name) == ("geo_sharing", "hf_lm", "llama_7b")
