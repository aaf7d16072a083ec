"""Download every hub model and dataset a sweep needs, on a node with internet, into the caches the runs read.

    uv run python slurm/prefetch.py experiment=<x> [overrides, sweeps as with runners.run -m]
    uv run python slurm/prefetch.py --dry-run experiment=<x>      # list what would be fetched

Every point of the sweep is composed and validated as ``runners.run`` does, and for each task family:

* ``hf_lm``: the model's hub repository (``huggingface_hub.snapshot_download`` at ``task.revision``; one weight
  format: safetensors when the repository has it) and the named corpora of evaluation and calibration, loaded once
  through the corpus's own loader (so the ``datasets`` cache holds exactly what a run reads), and the datasets of
  the lm-eval zero-shot tasks (``lm_eval.tasks.get_task_dict``);
* ``timm_image`` with ``pretrained: true``: timm's pretrained weights (``timm.create_model(pretrained=True)``);
* ``cifar_cnn`` / ``timm_image`` on CIFAR-10/100: torchvision's download into ``task.data.root``.

Caches are the libraries' usual ones (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_DATASETS_CACHE``): set the same variables
for the compute jobs, which then run with ``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1`` (the Slurm launcher's setup
exports them). Local files, local model folders and the embedded demo models need nothing.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.errors import HydraException  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from core.errors import ConfigError  # noqa: E402
from runners.preflight import one_line, sweep_points  # noqa: E402
from runners.run import CONF_DIR  # noqa: E402  (also registers the config schema)
from runners.schema import validate  # noqa: E402
from tasks import Task, create_task  # noqa: E402

# weight files that duplicate the safetensors ones, or serve other frameworks
OTHER_FORMATS = ("*.msgpack", "*.h5", "*.ot", "*.onnx", "*.gguf", "*.tflite", "original/*")
TORCH_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt")


@dataclass(frozen=True)
class Fetch:
    """One thing to download: ``kind`` (hub_model, corpus, lm_eval_tasks, timm_weights, torchvision), ``name`` and
    ``detail`` (revision, split or target folder) identify it; ``run`` downloads it."""

    kind: str
    name: str
    detail: str
    run: Callable[[], object] = field(compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.kind} {self.name} ({self.detail})"


def snapshot_model(repo_id: str, revision: str | None) -> str:
    """The hub repository ``repo_id`` into the hub cache, in one weight format; returns its local folder."""
    import huggingface_hub

    files = huggingface_hub.list_repo_files(repo_id, revision=revision)
    ignore = list(OTHER_FORMATS)
    if any(f.endswith(".safetensors") for f in files):
        ignore += TORCH_PICKLES
    return huggingface_hub.snapshot_download(repo_id, revision=revision, ignore_patterns=ignore)


def hf_lm_fetches(task: Task) -> list[Fetch]:
    from tasks.hf_lm import _looks_like_path
    from tasks.lm.corpora import CORPORA
    from tasks.lm.embedded import EMBEDDED

    cfg = task.cfg
    out = []
    if cfg.model != EMBEDDED and not _looks_like_path(cfg.model):
        out.append(Fetch("hub_model", cfg.model, cfg.revision or "default branch",
                         lambda: snapshot_model(cfg.model, cfg.revision)))
    wanted = [(name, "eval_split") for name in cfg.eval.datasets]
    if cfg.calib.dataset:
        wanted.append((cfg.calib.dataset, "calib_split"))
    for name, which in wanted:
        if name not in CORPORA:
            raise ConfigError(f"corpus {name!r} is unknown; valid: {', '.join(sorted(CORPORA))}")
        corpus = CORPORA[name]
        split = getattr(corpus, which)
        out.append(Fetch("corpus", name, split, lambda corpus=corpus, split=split: corpus.load(split)))
    z = cfg.zeroshot
    if z.tasks:
        out.append(Fetch("lm_eval_tasks", ",".join(z.tasks), z.include_path or "lm-eval's tasks",
                         lambda: lm_eval_datasets(list(z.tasks), z.include_path, z.include_defaults)))
    return out


def lm_eval_datasets(names: list[str], include_path: str | None, include_defaults: bool) -> dict:
    """Build lm-eval's task objects, which download their datasets into the ``datasets`` cache."""
    from lm_eval.tasks import TaskManager, get_task_dict

    return get_task_dict(names, TaskManager(include_path=include_path, include_defaults=include_defaults))


def image_fetches(task: Task) -> list[Fetch]:
    from tasks.data import load_cifar

    cfg = task.cfg
    out = []
    if getattr(cfg, "pretrained", False):
        out.append(Fetch("timm_weights", cfg.model, "pretrained", task.create_model))
    data = cfg.data
    if data.dataset in ("cifar10", "cifar100"):
        if not data.root:
            raise ConfigError(f"dataset {data.dataset} needs task.data.root: the folder to download it into")
        root = str(Path(data.root).expanduser())
        out.append(Fetch("torchvision", data.dataset, root, lambda: load_cifar(data.dataset, root, download=True)))
    return out


FETCHERS: dict[str, Callable[[Task], list[Fetch]]] = {
    "hf_lm": hf_lm_fetches,
    "cifar_cnn": image_fetches,
    "timm_image": image_fetches,
}


def plan_fetches(overrides: list[str]) -> list[Fetch]:
    """What the sweep of ``overrides`` needs from the network, each item once, in sweep order."""
    out: dict[Fetch, None] = {}
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            for job in sweep_points(overrides, CONF_DIR):
                try:
                    cfg = compose("run", overrides=job)
                except (HydraException, OmegaConfBaseException) as e:
                    raise ConfigError(one_line(e)) from e
                run = validate(cfg)
                task = create_task(run.task, Path(run.cache_dir), torch.device("cpu"), progress=run.progress)
                for item in FETCHERS.get(run.task.family, lambda _: [])(task):
                    out.setdefault(item)
    finally:
        GlobalHydra.instance().clear()
    return list(out)


def main(argv: list[str]) -> int:
    dry_run = "--dry-run" in argv
    overrides = [a for a in argv if not a.startswith("-")]  # -m and the like mean nothing here
    try:
        items = plan_fetches(overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not items:
        print("nothing to download: every model and dataset of this sweep is local")
    for item in items:
        if dry_run:
            print(f"would fetch {item}")
            continue
        t0 = time.perf_counter()
        item.run()
        print(f"fetched {item} in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
