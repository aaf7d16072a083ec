"""The ``timm_image`` family: any timm classifier (ViT / DeiT / Swin / ...) on an image dataset.

The dense model comes from a local ``checkpoint`` (.safetensors), from the hub (``pretrained: true``, where
reachable), or is trained from scratch with the task's recipe and cached like ``cifar_cnn`` (the small demo ViTs).
Evaluation, calibration, training batches and example inputs are those of ``tasks.cifar_cnn.ImageTask``; the family
adds the class-stratified calibration of FiPS (arXiv 2411.09816) and AAFM / GFM (``stratified_batches``). With
``data.transform: timm`` ImageFolder images go through the model's own eval transform (``resolve_data_config`` +
``create_transform(is_training=False)``).
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
from tasks.data import stratified_indices


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

    def create_model(self, pretrained: bool = True) -> nn.Module:
        import timm

        try:
            return timm.create_model(self.cfg.model, pretrained=pretrained and self.cfg.pretrained, **self._kwargs())
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

    # -- class-stratified calibration for methods with their own protocol (FiPS, AAFM / GFM) --------------------
    def stratified_batches(self, seed: int, n_items: int, batch_size: int) -> tuple[Iterator[Tensor], int]:
        """(model-ready batches [<= batch_size, C, H, W] of ``min(n_items, train size)`` unaugmented train images on
        the device, class-stratified as FiPS's sampler (``tasks.data.stratified_indices``) and chosen by ``seed``;
        number of batches)."""
        d = self.data
        n_batches = -(-min(n_items, len(d.split("train"))) // batch_size)
        idx = stratified_indices(d.targets("train"), n_items, torch.Generator().manual_seed(seed))
        return (x for x, _ in d.batches("train", batch_size, self.device, indices=idx)), n_batches
