"""The ``timm_image`` family: any timm classifier (ViT / DeiT / Swin / ...) on an image dataset.

The dense model comes from a local ``checkpoint`` (.safetensors), from the hub (``pretrained: true``, where reachable),
or is trained from scratch with the task's recipe and cached like ``cifar_cnn`` (the small demo ViTs). Evaluation,
calibration and example inputs are those of ``tasks.cifar_cnn.ImageTask``. With ``data.transform: timm`` ImageFolder
images go through the model's own eval transform (``resolve_data_config`` + ``create_transform(is_training=False)``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from omegaconf import MISSING
from torch import Tensor, nn

from core.errors import ConfigError
from tasks.base import TASKS
from tasks.cifar_cnn import ImageTask, ImageTaskConfig
from tasks.training import random_crop_flip


@dataclass
class TimmImageConfig(ImageTaskConfig):
    model: str = MISSING  # a timm model name, e.g. deit_tiny_patch16_224
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # timm.create_model kwargs: img_size, patch_size, ...
    pretrained: bool = False  # hub weights (needs the hub or its local cache)


@TASKS.register("timm_image")
class TimmImageTask(ImageTask):
    config_class = TimmImageConfig
    cfg: TimmImageConfig

    def _kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.cfg.model_kwargs)
        for key in ("num_classes", "in_chans"):
            value = getattr(self.cfg, key)
            if key in kwargs and kwargs[key] != value:
                raise ConfigError(f"task.model_kwargs.{key}={kwargs[key]} disagrees with task.{key}={value}")
            kwargs[key] = value
        return kwargs

    def check(self) -> None:
        import timm

        if not timm.is_model(self.cfg.model):
            similar = timm.list_models(f"*{self.cfg.model.split('_')[0]}*")[:12]
            raise ConfigError(f"unknown timm model {self.cfg.model!r}" + (f"; similar: {', '.join(similar)}"
                                                                          if similar else ""))
        if self.cfg.pretrained and self.cfg.checkpoint:
            raise ConfigError("task.pretrained and task.checkpoint are exclusive: pick one source of weights")
        self._kwargs()
        super().check()

    def has_weights(self) -> bool:
        return self.cfg.pretrained

    def create_model(self) -> nn.Module:
        import timm

        try:
            return timm.create_model(self.cfg.model, pretrained=self.cfg.pretrained, **self._kwargs())
        except TypeError as e:
            raise ConfigError(f"timm {self.cfg.model}: bad task.model_kwargs {dict(self.cfg.model_kwargs)}: {e}") \
                from e
        except (OSError, RuntimeError, ValueError) as e:
            if self.cfg.pretrained:
                raise ConfigError(f"timm {self.cfg.model}: hub weights unavailable ({type(e).__name__}: {e}); "
                                  f"set task.checkpoint to a local .safetensors instead") from e
            raise ConfigError(f"timm {self.cfg.model} with {dict(self.cfg.model_kwargs)}: {e}") from e

    def data_transform_config(self) -> dict[str, Any] | None:
        if self.cfg.data.transform != "timm":
            return None
        import timm
        from timm.data import resolve_data_config

        args: dict[str, Any] = {}
        size = self.cfg.data.image_size or self.cfg.model_kwargs.get("img_size")
        if size is not None:
            size = size if isinstance(size, int) else int(list(size)[0])
            args["input_size"] = (self.cfg.in_chans, size, size)
        if self.cfg.data.mean is not None:
            args["mean"], args["std"] = tuple(self.cfg.data.mean), tuple(self.cfg.data.std)
        pretrained_cfg = timm.models.get_pretrained_cfg(self.cfg.model)
        return resolve_data_config(args=args, pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else None)

    def input_shape(self) -> tuple[int, int, int]:
        if self.cfg.data.transform == "timm":
            return tuple(self.data_transform_config()["input_size"])
        return super().input_shape()

    # -- data for methods with their own calibration / fine-tuning protocol (FiPS, AAFM / GFM) -------------------
    def stratified_calibration_batches(self, seed: int, n_images: int, batch_size: int) -> Iterator[Tensor]:
        """Model-ready batches of ``n_images`` unaugmented train images on the device, class-stratified as FiPS's
        sampler (``stratified_indices``), chosen by ``seed``."""
        d = self.data
        idx = stratified_indices(d.targets("train"), n_images, torch.Generator().manual_seed(seed))
        for x, _ in d.batches("train", batch_size, self.device, indices=idx):
            yield x

    def training_batches(self, seed: int, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Endless shuffled (x, y) train batches on the device (a new permutation every pass), with the task's
        augmentation (``train.augment``: random crop + flip on raw pixels; none for ``data.transform: timm``)."""
        d = self.data
        shuffle = torch.Generator().manual_seed(seed)
        aug_gen = torch.Generator().manual_seed(seed + 1)
        augment = None
        if self.cfg.train.augment and not d.normalized:
            augment = lambda x: random_crop_flip(x, self.cfg.train.crop_padding, aug_gen)  # noqa: E731
        while True:
            yield from d.batches("train", batch_size, self.device, generator=shuffle, augment=augment)


def stratified_indices(labels: Tensor, n: int, generator: torch.Generator, per_pass: int = 3) -> Tensor:
    """``n`` indices drawn class by class as FiPS's stratified sampler: passes over the classes (in random order)
    take ``per_pass`` unused images of each class until ``n`` are taken (ImageNet, n = 3840: every class gets 3,
    then 280 classes 3 more); all images when ``n`` exceeds them. Returned shuffled."""
    labels = torch.as_tensor(labels)
    pools = [idx[torch.randperm(len(idx), generator=generator)]
             for idx in (torch.nonzero(labels == c).flatten() for c in torch.unique(labels).tolist())]
    taken, used, total = [], [0] * len(pools), min(n, len(labels))
    count = 0
    while count < total:
        for c in torch.randperm(len(pools), generator=generator).tolist():
            take = pools[c][used[c]:used[c] + min(per_pass, total - count)]
            used[c] += len(take)
            count += len(take)
            taken.append(take)
            if count >= total:
                break
    out = torch.cat(taken) if taken else torch.zeros(0, dtype=torch.long)
    return out[torch.randperm(len(out), generator=generator)]
