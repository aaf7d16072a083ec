"""Structured configs: the run schema plus every registered task family's and method's dataclass.

Named yamls in conf/task/ and conf/method/ start with ``defaults: [/schema/task/<family>@_here_, _self_]``
(resp. ``/schema/method/<name>@_here_``) so Hydra checks their keys and types on composition; the schema supplies
``task.family`` and ``method.name`` (the registries make the registered name the config class's default), and
value ranges are checked by the dataclasses' ``__post_init__`` when ``validate`` turns the config into objects.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

import methods
import tasks
from core.errors import ConfigError

DECODE_MODES = ("none", "eager", "graph")
KERNEL_CHOICES = ("auto", "torch")
SEED_MAX = 2**32 - 1  # numpy.random.seed's limit (torch takes up to 2**64 - 1)


@dataclass
class MeasureConfig:
    """Efficiency measurements after compression (shapes come from ``task.measure``)."""

    latency: bool = True
    flops: bool = True
    memory: bool = True
    min_run_time_s: float = 0.5  # timed seconds per model, at least (after warm-up)
    min_repeats: int = 10  # timed blocks per model, at least; median and IQR over them
    noisy_rel_iqr: float = 0.1  # latency IQR / median above this marks the result latency_noisy
    paired_dense: bool = True  # time the dense model interleaved with the compressed one: speedup/latency
    threads: int = 0  # torch intra-op threads; 0: COMPBENCH_THREADS, else picked from the free usable CPUs
    warmup: int = 3
    # batch-1 greedy decode with a static KV cache, for tasks that generate (language models): none | eager |
    # graph (torch.compile mode reduce-overhead: CUDA graphs; needs a CUDA device)
    decode: str = "eager"
    decode_prompt: int = 32  # prompt tokens prefilled before the timed steps
    decode_tokens: int = 64  # timed steps (after ``warmup`` untimed ones); median and IQR ms/token
    # auto: the inference layout (methods.fuse.inference_layout): low-rank layers reading one input share one GEMM,
    # hashed layers drop their index buffers (hash recomputed per forward), FiPS stores V as CSR, and on CUDA the
    # Triton kernels run (methods.kernels); torch: the naive training layout with library kernels, for comparison
    kernels: str = "auto"

    def __post_init__(self) -> None:
        if self.decode not in DECODE_MODES:
            raise ConfigError(f"measure.decode={self.decode!r}; valid: {', '.join(DECODE_MODES)}")
        if self.kernels not in KERNEL_CHOICES:
            raise ConfigError(f"measure.kernels={self.kernels!r}; valid: {', '.join(KERNEL_CHOICES)}")
        if self.min_repeats < 1 or self.min_run_time_s < 0 or self.noisy_rel_iqr <= 0 or self.threads < 0:
            raise ConfigError(f"measure: min_repeats={self.min_repeats} must be >= 1, min_run_time_s="
                              f"{self.min_run_time_s} >= 0, noisy_rel_iqr={self.noisy_rel_iqr} > 0, "
                              f"threads={self.threads} >= 0")
        if self.decode_prompt < 1 or self.decode_tokens < 1 or self.warmup < 0:
            raise ConfigError(f"measure: decode_prompt={self.decode_prompt} and decode_tokens={self.decode_tokens} "
                              f"must be >= 1, warmup={self.warmup} >= 0")


@dataclass
class LoggerConfig:
    name: str = "none"  # wandb | none
    project: str = "compbench"
    entity: str | None = None
    mode: str | None = None  # online | offline | disabled; None: WANDB_MODE, else offline
    tags: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    task: Any = MISSING
    method: Any = MISSING
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    seed: int = 0
    out_dir: str = "results/adhoc"
    cache_dir: str = ".cache/compbench"
    experiment_name: str = "adhoc"
    device: str = "auto"  # auto | cpu | cuda | cuda:<i>
    save_model: bool = False  # keep model.safetensors in the run folder (its size is measured either way)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed} must be >= 0")
        if self.seed > SEED_MAX:
            raise ConfigError(f"seed={self.seed} must be <= {SEED_MAX} (numpy's seed range)")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device={self.device!r}; valid: auto, cpu, cuda, cuda:<index>")
        if self.logger.name not in ("wandb", "none"):
            raise ConfigError(f"logger={self.logger.name!r}; valid: wandb, none")


def help_config_groups() -> str:
    """The config groups a user picks from (``group: option, ...`` per line) for ``--help``: Hydra's own listing
    less the ``schema/`` groups, which type-check the yamls and are not choices."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    groups = [g for g in sorted(loader.list_groups("")) if g not in ("hydra", "schema")]
    return "\n".join(f"{g}: {', '.join(sorted(loader.get_group_options(g)))}" for g in groups
                     if loader.get_group_options(g))


def register_configs() -> None:
    OmegaConf.register_new_resolver("help_config_groups", help_config_groups, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for family in tasks.TASKS.names():
        cs.store(group="schema/task", name=family, node=tasks.TASKS.get(family).config_class)
    for name in methods.METHODS.names():
        cs.store(group="schema/method", name=name, node=methods.METHODS.get(name).config_class)


def validate(cfg: DictConfig) -> RunConfig:
    """Resolve ``cfg`` into dataclasses (task and method as their own config classes); raise ``ConfigError``."""
    for part, registry in (("method", methods.METHODS), ("task", tasks.TASKS)):
        key = cfg[part].get(registry.config_key)  # the schema's default: the name it is registered under
        if key is None:
            raise ConfigError(f"{part} config without {registry.config_key}: its yaml must start with the "
                              f"/schema/{part}/<{registry.config_key}>@_here_ default")
        registry.get(key)  # raises with the valid names
    try:
        run = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as e:  # omegaconf validation errors: missing values, wrong types
        raise ConfigError(str(e).splitlines()[0]) from e
    for part, registry, key in ((run.task, tasks.TASKS, cfg.task.family), (run.method, methods.METHODS, cfg.method.name)):
        expected = registry.get(key).config_class
        if not isinstance(part, expected):
            raise ConfigError(f"{type(part).__name__} config for {key!r}: its yaml must start with the "
                              f"/schema/.../{key}@_here_ default ({expected.__name__})")
    return run
