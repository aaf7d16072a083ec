"""Image classification tasks: the shared ``ImageTask`` base and the ``cifar_cnn`` family (CIFAR ResNet / VGG).

An image task either loads a dense model from a local ``.safetensors`` checkpoint or trains it with the task's recipe
(tasks/training.py) and caches the weights under ``<cache_dir>/<family>/<name>-<hash>.safetensors``, the hash being
that of the config fields that change the weights plus the seed. A file lock makes parallel runs train it once.

Metrics: ``acc/top1``, ``acc/top5`` (>= 5 classes), ``loss/test`` and ``protocol/{dataset,split,n_test,image_size}``.
Calibration (``labelled_calibration_batches``): 10 training images per class (the data-driven pruning convention of
Synaptic-Flow, arXiv 2006.05467), seeded, unaugmented. ``training_batches``: endless shuffled, augmented training
batches (fine-tuning stages of compression methods).
"""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from core.errors import ConfigError, MissingPathError
from core.io import atomic_path, file_lock, stable_hash
from tasks import data as image_data
from tasks import training
from tasks.base import TASKS, Task, TaskConfig
from tasks.data import DataConfig, ImageData
from tasks.training import TrainConfig

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when a change to models, data or training makes cached dense weights stale
NATIVE_SIZE = {"digits": 8, "fashion_mnist": 28, "cifar10": 32, "cifar100": 32}
NATIVE_CHANNELS = {"digits": 1, "fashion_mnist": 1, "cifar10": 3, "cifar100": 3, "imagefolder": 3}


@dataclass
class ImageTaskConfig(TaskConfig):
    """Fields shared by the image-classification families."""

    num_classes: int = 10
    in_chans: int = 3
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: str | None = None  # local .safetensors of the trained dense model; None: train it (cached)
    calib_per_class: int = 10  # calibration images per class, from the train split
    calib_batch_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_classes < 1 or self.in_chans < 1:
            raise ConfigError(f"task.num_classes={self.num_classes} and task.in_chans={self.in_chans} must be >= 1")
        if self.calib_per_class < 1 or self.calib_batch_size < 1:
            raise ConfigError("task.calib_per_class and task.calib_batch_size must be >= 1")


def _save_safetensors_atomic(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    with atomic_path(path) as tmp:
        save_model(model, tmp, force_contiguous=True)


def check_safetensors(path: str | Path) -> Path:
    """The checkpoint exists and its header parses; raise ``ConfigError`` otherwise."""
    from safetensors import safe_open

    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingPathError(f"checkpoint {p} does not exist")
    if p.suffix != ".safetensors":
        raise ConfigError(f"checkpoint {p}: a .safetensors file is expected")
    try:
        with safe_open(str(p), framework="pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ConfigError(f"checkpoint {p} is not a readable safetensors file: {e}") from e
    return p


def check_checkpoint_fits(model: nn.Module, path: str | Path) -> None:
    """The tensor names and shapes in the header of safetensors ``path`` fit ``model`` (a skeleton is enough: no
    tensor is read); names ``save_model`` drops for tied tensors may be missing. Raise ``ConfigError``."""
    from safetensors import safe_open

    p = check_safetensors(path)
    with safe_open(str(p), framework="pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    own = model.state_dict(keep_vars=True)
    stored_ids = {id(own[k]) for k in own if k in stored}
    missing = [k for k in own if k not in stored and id(own[k]) not in stored_ids]
    unexpected = [k for k in stored if k not in own]
    wrong = [f"{k} {list(stored[k])} (model {list(own[k].shape)})" for k in own
             if k in stored and stored[k] != tuple(own[k].shape)]
    problems = [f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)) if keys]
    if problems:
        raise ConfigError(f"checkpoint {p} does not fit {type(model).__name__}: {'; '.join(problems)}")


def load_safetensors_into(model: nn.Module, path: str | Path) -> None:
    """Load a full state dict (strict) from ``path``; a corrupt file or mismatching keys/shapes is a ``ConfigError``."""
    from safetensors.torch import load_file

    p = check_safetensors(path)
    try:
        state = load_file(str(p))
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"checkpoint {p} is corrupt: {e}") from e
    own = model.state_dict()
    # save_model drops the duplicate names of tensors that share memory; fill them back in from their twin
    missing = [k for k in own if k not in state]
    for k in missing:
        twin = next((j for j in own if j in state and own[k].numel() and own[j].data_ptr() == own[k].data_ptr()),
                    None)
        if twin is not None:
            state[k] = state[twin]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"checkpoint {p} does not fit {type(model).__name__}: {' '.join(str(e).split())[:500]}") \
            from e


class ImageTask(Task):
    """Shared logic of the image families; subclasses implement ``create_model`` (seeded, untrained)."""

    config_class = ImageTaskConfig
    cfg: ImageTaskConfig

    def __init__(self, cfg: ImageTaskConfig, cache_dir: Path, device: torch.device, progress: bool = True):
        super().__init__(cfg, cache_dir, device, progress)
        self._data: ImageData | None = None

    # -- to implement ----------------------------------------------------------------------------------------------
    def create_model(self, pretrained: bool = True) -> nn.Module:
        """The model with fresh weights (the caller seeds the RNG); hub weights where the config asks for them and
        ``pretrained``."""
        raise NotImplementedError

    def has_weights(self) -> bool:
        """Whether ``create_model`` already returns trained weights (e.g. timm ``pretrained``)."""
        return False

    def data_transform_config(self) -> dict[str, Any] | None:
        """timm's data config, for ``data.transform: timm``."""
        return None

    # -- configuration -------------------------------------------------------------------------------------------
    def semantic_config(self) -> dict[str, Any]:
        d = dataclasses.asdict(self.cfg)
        d["data"].pop("download")  # where the files came from does not change results
        return d

    def weights_config(self) -> dict[str, Any]:
        """The fields that change trained dense weights (the cache key, with the seed)."""
        d = self.semantic_config()
        for k in ("name", "measure", "checkpoint", "calib_per_class", "calib_batch_size"):
            d.pop(k, None)
        d["train"].pop("eval_batch_size")
        return {"version": CACHE_VERSION, "family": self.name, **d}

    def summary(self) -> dict[str, str]:
        return {"model": self.cfg.name, "dataset": self.cfg.data.dataset}

    def main_metric(self) -> tuple[str, bool]:
        return ("acc/top1", True)

    def check(self) -> None:
        if self.cfg.checkpoint:
            check_safetensors(self.cfg.checkpoint)
        d = self.cfg.data
        expected = NATIVE_CHANNELS[d.dataset]
        if self.cfg.in_chans != expected:
            raise ConfigError(f"task.in_chans={self.cfg.in_chans} but {d.dataset} images have {expected} channel(s)")
        if d.dataset != "digits" and not d.root:
            raise ConfigError(f"dataset {d.dataset} needs task.data.root")
        if d.root and not d.download and not Path(d.root).expanduser().is_dir():
            raise MissingPathError(f"task.data.root={d.root} does not exist")
        if not self.cfg.checkpoint and not self.has_weights() and self.cfg.train.epochs < 1:
            raise ConfigError("no checkpoint and train.epochs=0: the dense model would be untrained")

    @property
    def data(self) -> ImageData:
        if self._data is None:
            data = image_data.load_image_data(self.cfg.data, self.data_transform_config())
            if data.channels != self.cfg.in_chans:
                raise ConfigError(f"task.in_chans={self.cfg.in_chans} but the {data.name} images have "
                                  f"{data.channels} channel(s)")
            if data.num_classes > self.cfg.num_classes:
                raise ConfigError(f"task.num_classes={self.cfg.num_classes} but {data.name} has "
                                  f"{data.num_classes} classes")
            self._data = data
        return self._data

    # -- the dense model -----------------------------------------------------------------------------------------
    def _fresh_model(self, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.create_model()
        return model

    def structure_model(self) -> nn.Module:
        """The architecture on the ``meta`` device (no hub weights, no RNG draws)."""
        with torch.device("meta"):
            return self.create_model(pretrained=False)

    def check_model(self, skeleton: nn.Module) -> None:
        if self.cfg.checkpoint:
            check_checkpoint_fits(skeleton, self.cfg.checkpoint)

    def fresh_model(self, seed: int) -> nn.Module:
        """The seeded, untrained model on the task's device, in eval mode (train-time methods start from it)."""
        return self._fresh_model(seed).to(self.device).eval()

    def cache_path(self, seed: int) -> Path:
        key = stable_hash({"weights": self.weights_config(), "seed": seed})
        return self.cache_dir / self.name / f"{self.cfg.name}-{key}.safetensors"

    def build_model(self, seed: int) -> nn.Module:
        model = self._fresh_model(seed)
        if self.cfg.checkpoint:
            load_safetensors_into(model, self.cfg.checkpoint)
        elif not self.has_weights():
            path = self.cache_path(seed)
            with file_lock(path.with_name(path.name + ".lock")):
                if path.exists():
                    try:
                        load_safetensors_into(model, path)
                    except ConfigError as e:  # a damaged cache (a truncated copy, a full disk) is rebuilt
                        log.warning("cached dense model %s is damaged (%s); training it again", path, e)
                        path.unlink()
                        model = self._fresh_model(seed)
                if not path.exists():
                    self._train_dense(model, seed, path)
        return model.to(self.device).eval()

    def _train_dense(self, model: nn.Module, seed: int, path: Path) -> None:
        log.info("training the dense %s (seed %d, %d epochs); cached at %s", self.cfg.name, seed,
                 self.cfg.train.epochs, path)
        model.to(self.device)
        resume = path.with_name(path.name + ".train.pt")  # per-epoch state: an interrupted build resumes
        result = training.fit(model, self.data, self.cfg.train, seed, self.device, ckpt_path=resume,
                              ckpt_key=path.name, log=lambda r: log.info("dense %s: %s", self.cfg.name, r),
                              progress=self.progress)
        log.info("dense %s: final top-1 %.4f, best %.4f", self.cfg.name, result["acc/top1_final"],
                 result["acc/top1_best"])
        _save_safetensors_atomic(model.cpu(), path)
        resume.unlink(missing_ok=True)

    # -- evaluation and inputs -----------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        d = self.data
        res = training.evaluate_classifier(model, d.batches("test", self.cfg.train.eval_batch_size, self.device),
                                           self.device)
        out: dict[str, Any] = {"acc/top1": res["acc/top1"]}
        if "acc/top5" in res:
            out["acc/top5"] = res["acc/top5"]
        out.update({"loss/test": res["loss"], "protocol/dataset": d.name, "protocol/split": d.test_split,
                    "protocol/n_test": len(d.test), "protocol/image_size": d.image_size})
        return out

    def labelled_calibration_batches(self, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(x, y) batches on the device: ``calib_per_class`` train images of every class, chosen by ``seed``."""
        d = self.data
        gen = torch.Generator().manual_seed(seed)
        idx = image_data.per_class_indices(d.targets("train"), self.cfg.calib_per_class, gen)
        yield from d.batches("train", self.cfg.calib_batch_size, self.device, indices=idx)

    def calibration_batches(self, seed: int) -> Iterator[Tensor]:
        for x, _ in self.labelled_calibration_batches(seed):
            yield x

    def training_batches(self, seed: int, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Endless shuffled (x, y) train batches on the device (a new permutation every pass), with the task's
        augmentation (``train.augment``: random crop + flip on raw pixels; none for ``data.transform: timm``)."""
        d = self.data
        shuffle = torch.Generator().manual_seed(seed)
        aug_gen = torch.Generator().manual_seed(seed + 1)
        augment = None
        if self.cfg.train.augment and not d.normalized:
            augment = lambda x: training.random_crop_flip(x, self.cfg.train.crop_padding, aug_gen)  # noqa: E731
        while True:
            yield from d.batches("train", batch_size, self.device, generator=shuffle, augment=augment)

    def input_shape(self) -> tuple[int, int, int]:
        d = self.cfg.data
        if d.image_size is not None:
            return (self.cfg.in_chans, d.image_size, d.image_size)
        if d.dataset in NATIVE_SIZE:
            return (self.cfg.in_chans, NATIVE_SIZE[d.dataset], NATIVE_SIZE[d.dataset])
        return (self.cfg.in_chans, self.data.image_size, self.data.image_size)

    def example_inputs(self) -> tuple[Any, ...]:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(self.cfg.measure.batch_size, *self.input_shape(), generator=gen)
        return (x.to(self.device),)

    def train(self, model: nn.Module, seed: int, after_step=None, log=None, ckpt_path=None) -> dict[str, Any]:
        """Train ``model`` (e.g. after a train-time method modified it) with the task's recipe; final/best top-1."""
        model.to(self.device)
        result = training.fit(model, self.data, self.cfg.train, seed, self.device, after_step=after_step, log=log,
                              ckpt_path=ckpt_path, progress=self.progress,
                              ckpt_key=stable_hash({"weights": self.weights_config(), "seed": seed}))
        result.pop("history", None)
        return result


ARCH_PATTERN = re.compile(r"resnet(\d+)|vgg(11|13|16)_bn")


@dataclass
class CifarCnnConfig(ImageTaskConfig):
    arch: str = "resnet20"  # resnet<6n+2> (resnet20, resnet32, resnet56, ...) | vgg11_bn | vgg13_bn | vgg16_bn
    width: int = 16  # ResNet base width (STABLE-RPS, arXiv 2310.11611: baselines 8, 4, 2)

    def __post_init__(self) -> None:
        super().__post_init__()
        m = ARCH_PATTERN.fullmatch(self.arch)
        if m is None or (m.group(1) is not None and (int(m.group(1)) < 8 or (int(m.group(1)) - 2) % 6)):
            raise ConfigError(f"task.arch={self.arch!r}; valid: resnet<6n+2> (resnet20, resnet32, resnet56, ...), "
                              f"vgg11_bn, vgg13_bn, vgg16_bn")
        if self.width < 1:
            raise ConfigError(f"task.width={self.width} must be >= 1")


@TASKS.register("cifar_cnn")
class CifarCnnTask(ImageTask):
    """CIFAR-style ResNet / VGG-bn trained with the Synaptic-Flow recipe (or loaded from a checkpoint)."""

    config_class = CifarCnnConfig
    cfg: CifarCnnConfig

    def create_model(self, pretrained: bool = True) -> nn.Module:
        from tasks.models import resnet, vgg

        arch = self.cfg.arch
        if arch.startswith("resnet"):
            return resnet(int(arch[len("resnet"):]), self.cfg.num_classes, self.cfg.in_chans, self.cfg.width)
        return vgg(int(arch[len("vgg"):].split("_")[0]), self.cfg.num_classes, self.cfg.in_chans, batch_norm=True)

    def check(self) -> None:
        super().check()
        if self.cfg.arch.startswith("vgg") and min(self.input_shape()[1:]) < 16:
            raise ConfigError(f"{self.cfg.arch} pools 4 times: images of {self.input_shape()[1]} px are too small")
