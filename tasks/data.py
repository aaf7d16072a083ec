"""Image classification data: small in-memory sets (sklearn digits, Fashion-MNIST, CIFAR) and ImageFolder trees.

Every loader returns an ``ImageData``: a train split (``None`` when the source has none), a test split, the class
count and the normalisation. Splits yield images in [0, 1] (C, H, W) and int64 labels; ``ImageData.normalize`` maps a
batch to model input, so augmentation (training.py) works on raw pixels as torchvision's transforms do. With
``transform: timm`` the ImageFolder transform is timm's eval transform, which normalises by itself.

Nothing here downloads unless the config says ``download: true`` (CIFAR only); a missing folder is a ``ConfigError``.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from core.errors import ConfigError

DATASETS = ("digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder")
TRANSFORMS = ("plain", "timm")

# mean / std per dataset (CIFAR: Synaptic-Flow's values, arXiv 2006.05467; digits: all its pixels in [0, 1];
# ImageFolder: ImageNet's)
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.305,), (0.376,)),
    "fashion_mnist": ((0.286,), (0.353,)),
    "cifar10": ((0.491, 0.482, 0.447), (0.247, 0.243, 0.262)),
    "cifar100": ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0  # fixed: the split never changes with the run seed
FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@dataclass
class DataConfig:
    """Which images a task trains and evaluates on."""

    dataset: str = "digits"  # digits | fashion_mnist | cifar10 | cifar100 | imagefolder
    root: str | None = None  # folder of the data (not used by digits)
    download: bool = False  # CIFAR only: let torchvision download into root when absent
    mean: list[float] | None = None  # None: the dataset's usual statistics (STATS)
    std: list[float] | None = None
    image_size: int | None = None  # None: native size; else resize (ImageFolder: resize + center crop; needed
    #                                when its images differ in size)
    transform: str = "plain"  # plain (ToTensor + Normalize) | timm (the model's eval transform; ImageFolder only)
    train_per_class: int | None = None  # keep a fixed stratified subset of the train split (seed 0), for quick
    #                                     CPU sweeps; None: all of it. In-memory datasets (not ImageFolder)
    test_per_class: int | None = None  # the same for the test split (protocol/n_test records the size)
    train_split: str = "train"  # ImageFolder: sub-folders of root ("" = root itself)
    test_split: str = "val"

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"task.data.dataset={self.dataset!r}; valid: {', '.join(DATASETS)}")
        if self.transform not in TRANSFORMS:
            raise ConfigError(f"task.data.transform={self.transform!r}; valid: {', '.join(TRANSFORMS)}")
        if self.transform == "timm" and self.dataset != "imagefolder":
            raise ConfigError("task.data.transform=timm applies to dataset=imagefolder only")
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"task.data.image_size={self.image_size} must be >= 1 (or null for the native size)")
        for key in ("train_per_class", "test_per_class"):
            value = getattr(self, key)
            if value is not None and (value < 1 or self.dataset == "imagefolder"):
                raise ConfigError(f"task.data.{key}={value}: an integer >= 1, and only for in-memory datasets "
                                  "(not imagefolder)")
        if (self.mean is None) != (self.std is None):
            raise ConfigError("task.data.mean and task.data.std are set together")
        if self.std is not None:
            if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
                raise ConfigError(f"task.data.mean={list(self.mean)} / std={list(self.std)}: same length, std > 0")


class TensorImages(Dataset):
    """Images held in memory as (N, C, H, W) uint8 (0..255) or float (0..1) with int64 labels."""

    def __init__(self, images: Tensor, labels: Tensor, source_index: Tensor | None = None):
        if images.dim() != 4 or len(images) != len(labels):
            raise ValueError(f"images {tuple(images.shape)} / labels {tuple(labels.shape)}")
        self.images, self.targets = images, labels.long()
        self.source_index = source_index  # positions in the original collection (digits: its split)

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        x = self.images[idx]
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        return x, self.targets[idx]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.batch(torch.tensor([i]))
        return x[0], y[0]


class ImageData:
    """Train / test splits plus what turns a raw batch into model input."""

    def __init__(self, name: str, train: Dataset | None, test: Dataset, num_classes: int, channels: int,
                 image_size: int, mean: tuple[float, ...], std: tuple[float, ...], normalized: bool = False,
                 test_split: str = "test", resize_to: int | None = None):
        self.name, self.train, self.test = name, train, test
        self.num_classes, self.channels, self.image_size = num_classes, channels, image_size
        self.mean, self.std, self.normalized = tuple(mean), tuple(std), normalized
        self.test_split, self.resize_to = test_split, resize_to
        if len(self.mean) not in (1, channels):
            raise ConfigError(f"task.data.mean has {len(self.mean)} values for {channels}-channel {name} images")

    def split(self, split: str) -> Dataset:
        ds = self.train if split == "train" else self.test
        if ds is None:
            raise ConfigError(f"dataset {self.name} has no {split} split here (training and calibration need one)")
        return ds

    def targets(self, split: str) -> Tensor:
        ds = self.split(split)
        return torch.as_tensor(ds.targets, dtype=torch.long)

    def normalize(self, x: Tensor) -> Tensor:
        """A raw batch in [0, 1] (already augmented) to model input: resize, then (x - mean) / std."""
        if self.resize_to is not None and x.shape[-1] != self.resize_to:
            x = F.interpolate(x, size=(self.resize_to, self.resize_to), mode="bilinear", align_corners=False,
                              antialias=True)
        if self.normalized:
            return x
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def raw_batches(self, split: str, batch_size: int, generator: torch.Generator | None = None,
                    indices: Tensor | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """(x in [0, 1], y) CPU batches; shuffled by ``generator`` when given (num_workers=0, so deterministic)."""
        ds = self.split(split)
        n = len(ds) if indices is None else len(indices)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        if indices is not None:
            order = indices[order]
        if isinstance(ds, TensorImages):
            for i in range(0, len(order), batch_size):
                yield ds.batch(order[i:i + batch_size])
            return
        loader = DataLoader(ds, batch_size=batch_size, sampler=order.tolist(), num_workers=0)
        for x, y in loader:
            yield x, y

    def batches(self, split: str, batch_size: int, device: torch.device | str = "cpu",
                generator: torch.Generator | None = None, indices: Tensor | None = None,
                augment: Callable[[Tensor], Tensor] | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Model-ready (x, y) batches on ``device``; ``augment`` acts on raw pixels before normalisation."""
        for x, y in self.raw_batches(split, batch_size, generator, indices):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if augment is not None:
                x = augment(x)
            yield self.normalize(x), y

    def num_batches(self, split: str, batch_size: int) -> int:
        return -(-len(self.split(split)) // batch_size)


# -- loaders ---------------------------------------------------------------------------------------------------
def _stats(cfg: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if cfg.mean is not None:
        return tuple(cfg.mean), tuple(cfg.std)
    return STATS[cfg.dataset]


def load_digits_split() -> tuple[TensorImages, TensorImages]:
    """sklearn's 8x8 digits (1797 images, values 0..16 scaled to [0, 1]); fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=DIGITS_TEST_FRACTION, stratify=d.target,
                              random_state=DIGITS_SPLIT_SEED)
    tr, te = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(te))
    return TensorImages(images[tr], labels[tr], tr), TensorImages(images[te], labels[te], te)


def read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format), gzip-compressed or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            b = f.read()
    except (OSError, EOFError) as e:
        raise ConfigError(f"cannot read idx file {path}: {e}") from e
    if len(b) < 4 or b[0] != 0 or b[1] != 0 or b[2] != 0x08:
        raise ConfigError(f"{path} is not an unsigned-byte idx file")
    nd = b[3]
    shape = tuple(int.from_bytes(b[4 + 4 * i:8 + 4 * i], "big") for i in range(nd))
    offset = 4 + 4 * nd
    if len(b) - offset != int(np.prod(shape)):
        raise ConfigError(f"{path}: header says {shape}, file holds {len(b) - offset} bytes of data")
    return np.frombuffer(b, dtype=np.uint8, offset=offset).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise ConfigError(f"Fashion-MNIST file {stem}.gz missing in {root}; the folder needs the four idx files "
                      f"({', '.join(s + '.gz' for pair in FASHION_FILES.values() for s in pair)}), e.g. from "
                      f"Debian's dataset-fashion-mnist package (/usr/share/datasets/fashion-mnist)")


def load_fashion_mnist(root: str | Path | None) -> tuple[TensorImages, TensorImages]:
    if not root:
        raise ConfigError("dataset fashion_mnist needs task.data.root: a folder with the four idx .gz files")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"Fashion-MNIST folder {root} does not exist")
    out = []
    for split in ("train", "test"):
        img_stem, lbl_stem = FASHION_FILES[split]
        images, labels = read_idx(_find_idx(root, img_stem)), read_idx(_find_idx(root, lbl_stem))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ConfigError(f"Fashion-MNIST {split} files in {root}: images {images.shape}, labels {labels.shape}")
        out.append(TensorImages(torch.from_numpy(images.copy()).unsqueeze(1),
                                torch.from_numpy(labels.astype(np.int64))))
    return out[0], out[1]


def load_cifar(name: str, root: str | Path | None, download: bool) -> tuple[TensorImages, TensorImages]:
    if not root:
        raise ConfigError(f"dataset {name} needs task.data.root (torchvision's CIFAR folder)")
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    out = []
    for train in (True, False):
        try:
            ds = cls(str(Path(root).expanduser()), train=train, download=download)
        except RuntimeError as e:
            hint = "" if download else " (task.data.download=false: nothing is downloaded)"
            raise ConfigError(f"{name} not found in {root}{hint}: {e}") from e
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        out.append(TensorImages(images, torch.as_tensor(ds.targets, dtype=torch.long)))
    return out[0], out[1]


def _folder(root: Path, split: str) -> Path:
    return root / split if split else root


def load_imagefolder(cfg: DataConfig, timm_data_config: dict[str, Any] | None = None):
    """``root/<train_split>/<class>/*`` and ``root/<test_split>/<class>/*`` (a missing train split is allowed)."""
    if not cfg.root:
        raise ConfigError("dataset imagefolder needs task.data.root")
    from torchvision import datasets, transforms

    root = Path(cfg.root).expanduser()
    test_dir = _folder(root, cfg.test_split)
    if not test_dir.is_dir():
        raise ConfigError(f"ImageFolder test split {test_dir} does not exist")
    if cfg.transform == "timm":
        from timm.data import create_transform

        tf = create_transform(**(timm_data_config or {}), is_training=False)
    else:
        steps: list[Any] = [transforms.Lambda(lambda im: im.convert("RGB"))]
        if cfg.image_size is not None:
            steps += [transforms.Resize(cfg.image_size), transforms.CenterCrop(cfg.image_size)]
        tf = transforms.Compose(steps + [transforms.ToTensor()])

    def folder(path: Path):
        try:
            return datasets.ImageFolder(str(path), transform=tf)
        except (FileNotFoundError, RuntimeError) as e:
            raise ConfigError(f"ImageFolder {path}: {e}") from e

    test = folder(test_dir)
    train_dir = _folder(root, cfg.train_split)
    train = folder(train_dir) if cfg.train_split != cfg.test_split and train_dir.is_dir() else None
    if train is not None and train.classes != test.classes:
        raise ConfigError(f"ImageFolder {root}: train and test splits have different class folders")
    return train, test


def load_image_data(cfg: DataConfig, timm_data_config: dict[str, Any] | None = None) -> ImageData:
    """Load ``cfg``'s dataset; ``timm_data_config`` (timm's resolved data config) is used by ``transform: timm``."""
    mean, std = _stats(cfg)
    if cfg.dataset == "imagefolder":
        train, test = load_imagefolder(cfg, timm_data_config)
        x0, _ = test[0]
        normalized = cfg.transform == "timm"
        if normalized:
            mean, std = tuple(timm_data_config["mean"]), tuple(timm_data_config["std"])
        return ImageData("imagefolder", train, test, len(test.classes), x0.shape[0], x0.shape[-1], mean, std,
                         normalized=normalized, test_split=cfg.test_split or "root")
    if cfg.dataset == "digits":
        train, test = load_digits_split()
    elif cfg.dataset == "fashion_mnist":
        train, test = load_fashion_mnist(cfg.root)
    else:
        train, test = load_cifar(cfg.dataset, cfg.root, cfg.download)
    num_classes = int(torch.cat([train.targets, test.targets]).max()) + 1
    train, test = stratified_subset(train, cfg.train_per_class), stratified_subset(test, cfg.test_per_class)
    native = test.images.shape[-1]
    size = cfg.image_size or native
    return ImageData(cfg.dataset, train, test, num_classes, test.images.shape[1], size, mean, std,
                     test_split="test", resize_to=size if size != native else None)


def stratified_subset(images: TensorImages, per_class: int | None) -> TensorImages:
    """A fixed (seed 0) subset of ``per_class`` images of every class, in their original order; None: all."""
    if per_class is None:
        return images
    keep = per_class_indices(images.targets, per_class, torch.Generator().manual_seed(0)).sort().values
    base = images.source_index if images.source_index is not None else torch.arange(len(images))
    return TensorImages(images.images[keep], images.targets[keep], base[keep])


def per_class_indices(labels: Tensor, per_class: int, generator: torch.Generator) -> Tensor:
    """``per_class`` random indices of every class (fewer where a class has fewer), shuffled together."""
    picks = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=generator)[:per_class]])
    out = torch.cat(picks)
    return out[torch.randperm(len(out), generator=generator)]


def stratified_indices(labels: Tensor, n: int, generator: torch.Generator, per_pass: int = 3) -> Tensor:
    """``n`` indices drawn class by class as FiPS's (arXiv 2411.09816) sampler: passes over the classes (in random
    order) take ``per_pass`` unused images of each class until ``n`` are taken (ImageNet, n = 3840: every class gets
    3, then 280 classes 3 more); all images when ``n`` exceeds them. Returned shuffled."""
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
