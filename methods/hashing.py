"""Hashed weight sharing: every compressed weight is read from one global shared array M (HashedNet, ROAST,
STABLE-RPS; see the STABLE-RPS paper, arXiv 2310.11611, and ROAST, arXiv 2207.10702).

The scope's weights are laid end to end in a virtual vector of n entries: modules in scope order (the adapter's,
i.e. the model's definition order), each weight row-major in its native shape; module k starts at the global
offset L_k. The entry at global position l = L_k + t is recovered on the fly in the forward pass as

    W_k[t] = scale_k * sign(l) * M[h(l)],     M: (m,), m = n - round(ratio * n),

with a fixed random sign in {-1, +1}, scale_k = std(dense init of module k) / init_std and M ~ N(0, init_std^2), so
recovered weights start with each layer's own init std. No dense copy is stored; indices and signs are regenerated
from the seed (they are non-persistent buffers and cost no stored bytes). Mappings h:

* ``randomfold`` (STABLE-RPS): h(l) = (H(floor(l / m)) + l mod m) mod m, one random rotation H(p) of [0, m) per
  size-m partition p of the virtual vector, the same H for every module. Every slot receives floor(n/m) or
  ceil(n/m) weights, and at m = n the map is a bijection.
* ``hashednet``: h(l) = hash(l) mod m, element by element (balls into bins).
* ``roast``: a weight viewed as a (K, N) matrix (a Linear's transpose; a Conv2d's (in*kh*kw, out)) is cut into
  tiles of (B_K, B_N); tile (i, j) goes to one contiguous run M[b(i, j) : b(i, j) + B_K * B_N], b uniform in
  [0, m - B_K * B_N]. With ``tile_convs: false`` convolutions are hashed element by element, as the code the
  STABLE-RPS paper ran (only Linear layers were tiled there).

Gradient scaling Gamma (STABLE-RPS): before the optimizer sees it, the gradient of slot j is divided by
Gamma_j = (sum of the scales of the weights mapped to j)^2 / (their count)  (``v1``, the official default) or by the
sum of their squared scales (``v5``); ``none`` leaves it (ROAST, HashedNet). With v1/v5 the trajectory of the
recovered weights does not depend on init_std, and at m = n randomfold training equals dense training.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.compressed import CompressedModule
from core.errors import ConfigError
from methods import kernels
from methods.base import CompressContext, Method, MethodConfig
from methods.magnitude import kept_count

MAPPINGS = ("randomfold", "hashednet", "roast")
GAMMA_MODES = ("v1", "v5", "none")
_GOLDEN = 0x9E3779B97F4A7C15
_U64 = (1 << 64) - 1
# one salt per independent random function, so that the signs, offsets and tile bases of a seed are unrelated
_SALT = {"fold": 1, "element": 2, "tile": 3, "sign": 4}


# -- hashing -------------------------------------------------------------------------------------------------------
def mix64(x: np.ndarray, key: int) -> np.ndarray:
    """A well-mixed 64-bit hash of every integer of ``x`` under ``key`` (the splitmix64 finaliser), uint64."""
    z = x.astype(np.uint64) + np.uint64((key * _GOLDEN) & _U64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash_key(seed: int, purpose: str) -> int:
    """The key of one random function (``purpose`` in fold, element, tile, sign) for a seed."""
    return int(mix64(np.array([seed], dtype=np.uint64), _SALT[purpose])[0])


def randomfold_index(pos: np.ndarray, m: int, seed: int) -> np.ndarray:
    """RANDOMFOLD slots of global positions ``pos``: (H(pos // m) + pos mod m) mod m, int64."""
    pos = pos.astype(np.int64)
    rotation = (mix64(pos // m, hash_key(seed, "fold")) % np.uint64(m)).astype(np.int64)
    return (rotation + pos % m) % m


def hashednet_index(pos: np.ndarray, m: int, seed: int) -> np.ndarray:
    """Element-wise hashed slots of global positions ``pos``, int64."""
    return (mix64(pos, hash_key(seed, "element")) % np.uint64(m)).astype(np.int64)


def roast_index(shape: tuple[int, ...], offset: int, m: int, seed: int, tile: tuple[int, int]) -> np.ndarray:
    """ROAST slots of a weight of ``shape`` (out, ...) whose first global position is ``offset``; shape ``shape``.

    The weight is viewed as the (K = in * kh * kw, N = out) matrix and cut into ``tile`` = (B_K, B_N) tiles; tile
    (i, j) is keyed by the global position offset + (its index among the module's tiles), unique over the model.
    """
    bk, bn = tile
    if m < bk * bn:
        raise ConfigError(f"ROAST tiles of {bk}x{bn} need a shared array of at least {bk * bn} slots; m = {m}")
    out, k = shape[0], int(np.prod(shape[1:]))
    o = np.arange(out, dtype=np.int64)[:, None]
    q = np.arange(k, dtype=np.int64)[None, :]
    tiles_n = -(-out // bn)
    tile_id = (q // bk) * tiles_n + o // bn
    base = (mix64(offset + tile_id, hash_key(seed, "tile")) % np.uint64(m - bk * bn + 1)).astype(np.int64)
    return (base + (q % bk) * bn + o % bn).reshape(shape)


def random_signs(pos: np.ndarray, seed: int) -> np.ndarray:
    """A fixed random sign in {-1, +1} per global position, int8."""
    return ((mix64(pos, hash_key(seed, "sign")) >> np.uint64(63)).astype(np.int8) * 2 - 1).astype(np.int8)


def slot_indices(mapping: str, shape: tuple[int, ...], offset: int, m: int, seed: int,
                 tile: tuple[int, int] = (16, 16), tile_convs: bool = False) -> np.ndarray:
    """Slots in M of every entry of a weight of ``shape`` starting at global position ``offset``; shape ``shape``."""
    n = int(np.prod(shape))
    pos = np.arange(offset, offset + n, dtype=np.int64)
    if mapping == "randomfold":
        return randomfold_index(pos, m, seed).reshape(shape)
    if mapping == "hashednet" or (mapping == "roast" and len(shape) > 2 and not tile_convs):
        return hashednet_index(pos, m, seed).reshape(shape)
    if mapping == "roast":
        return roast_index(shape, offset, m, seed, tile)
    raise ConfigError(f"mapping={mapping!r}; valid: {', '.join(MAPPINGS)}")


# -- modules -------------------------------------------------------------------------------------------------------
class _Hashed(CompressedModule):
    """Weight recovered from the shared ``array`` as scale * sign * array[index]; bias dense.

    For training the slots and signed scales are cached in the non-persistent buffers ``index`` (int32) and
    ``coef`` (one value per weight: together twice a dense weight's bytes). ``for_inference()`` drops them for
    inference: the forward then recomputes the hash inside the matmul (``methods.kernels``; Triton on CUDA)."""

    array: nn.Parameter
    index: torch.Tensor | None
    coef: torch.Tensor | None

    def _init_hashing(self, shape: tuple[int, ...], array_size: int, offset: int, mapping: str, seed: int,
                      scale: float, tile: list[int], tile_convs: bool, array: nn.Parameter | None) -> None:
        self.dense_weight_shape = tuple(shape)
        self.array_size, self.offset, self.mapping, self.seed = array_size, offset, mapping, seed
        self.scale, self.tile, self.tile_convs = float(scale), [int(t) for t in tile], bool(tile_convs)
        if array is None:
            array = nn.Parameter(torch.empty(array_size))
        elif array.shape != (array_size,):
            raise ValueError(f"shared array has shape {tuple(array.shape)}, expected ({array_size},)")
        self.array = array
        idx = slot_indices(mapping, self.dense_weight_shape, offset, array_size, seed, tuple(self.tile), tile_convs)
        pos = np.arange(offset, offset + idx.size, dtype=np.int64)
        coef = torch.from_numpy(random_signs(pos, seed).astype(np.float64)).mul_(self.scale)
        self.register_buffer("index", torch.from_numpy(idx.reshape(-1).astype(np.int32)).to(array.device),
                             persistent=False)
        self.register_buffer("coef", coef.to(array.device, array.dtype), persistent=False)
        element_wise = mapping == "roast" and len(shape) > 2 and not tile_convs
        self.hash_spec = kernels.HashSpec(
            self.dense_weight_shape, offset, array_size, mapping, self.scale,
            *(kernels.addend(hash_key(seed, purpose)) for purpose in ("fold", "element", "tile", "sign")),
            tile=(self.tile[0], self.tile[1]), element_wise=element_wise)

    def for_inference(self) -> None:
        """Drop the cached slots and signs: the weight is then recomputed from the hash in every forward."""
        self.index = None
        self.coef = None

    def _hashing_spec(self) -> dict[str, Any]:
        return {"array_size": self.array_size, "offset": self.offset, "mapping": self.mapping, "seed": self.seed,
                "scale": self.scale, "tile": list(self.tile), "tile_convs": self.tile_convs}

    def hashed_weight(self) -> torch.Tensor:
        if self.index is None:
            return kernels.hashed_weight(self.hash_spec, self.array)
        return (self.array.index_select(0, self.index) * self.coef).view(self.dense_weight_shape)

    def dense_weight(self) -> torch.Tensor:
        return self.hashed_weight()

    def slot_counts(self) -> torch.Tensor:
        """How many of this module's weights read each slot of M, float64 (m,)."""
        index = self.index if self.index is not None else torch.from_numpy(slot_indices(
            self.mapping, self.dense_weight_shape, self.offset, self.array_size, self.seed, tuple(self.tile),
            self.tile_convs))
        return torch.bincount(index.reshape(-1).long().cpu(), minlength=self.array_size).double()


class HashedLinear(_Hashed):
    """An ``nn.Linear`` whose (out, in) weight is read from the shared array."""

    def __init__(self, in_features: int, out_features: int, array_size: int, offset: int, mapping: str, seed: int,
                 scale: float, tile: list[int], tile_convs: bool = False, bias: bool = True,
                 array: nn.Parameter | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_hashing((out_features, in_features), array_size, offset, mapping, seed, scale, tile, tile_convs,
                           array)
        self.bias = nn.Parameter(torch.zeros(out_features, device=self.array.device, dtype=self.array.dtype)) \
            if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return kernels.hashed_linear(x, self.array, self.hash_spec, self.bias)
        return F.linear(x, self.hashed_weight(), self.bias)

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                **self._hashing_spec()}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, mapping={self.mapping}, m={self.array_size}"


class HashedConv2d(_Hashed):
    """An ``nn.Conv2d`` (zero padding) whose (out, in / groups, kh, kw) weight is read from the shared array."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: list[int], array_size: int, offset: int,
                 mapping: str, seed: int, scale: float, tile: list[int], tile_convs: bool = False,
                 stride: list[int] = (1, 1), padding: list[int] | str = (0, 0), dilation: list[int] = (1, 1),
                 groups: int = 1, bias: bool = True, array: nn.Parameter | None = None):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = tuple(kernel_size), tuple(stride), tuple(dilation)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_hashing(shape, array_size, offset, mapping, seed, scale, tile, tile_convs, array)
        self.bias = nn.Parameter(torch.zeros(out_channels, device=self.array.device, dtype=self.array.dtype)) \
            if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.index is None and self.groups == 1 and not isinstance(self.padding, str):
            return kernels.hashed_conv2d(x, self.array, self.hash_spec, self.bias, self.stride, self.padding,
                                         self.dilation)
        return F.conv2d(x, self.hashed_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def spec(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None,
                **self._hashing_spec()}

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"mapping={self.mapping}, m={self.array_size}")


def hashed_from_dense(layer: nn.Module, array: nn.Parameter, offset: int, mapping: str, seed: int, scale: float,
                      tile: list[int], tile_convs: bool) -> _Hashed:
    """The hashed twin of ``layer`` (nn.Linear or zero-padded nn.Conv2d) reading ``array``; the bias is copied."""
    common = {"array_size": array.numel(), "offset": offset, "mapping": mapping, "seed": seed, "scale": scale,
              "tile": tile, "tile_convs": tile_convs, "bias": layer.bias is not None, "array": array}
    if isinstance(layer, nn.Linear):
        new = HashedLinear(layer.in_features, layer.out_features, **common)
    elif isinstance(layer, nn.Conv2d):
        new = HashedConv2d(layer.in_channels, layer.out_channels, list(layer.kernel_size), stride=list(layer.stride),
                           padding=layer.padding if isinstance(layer.padding, str) else list(layer.padding),
                           dilation=list(layer.dilation), groups=layer.groups, **common)
    else:
        raise TypeError(f"cannot hash a {type(layer).__name__}; expected nn.Linear or nn.Conv2d")
    if layer.bias is not None:
        with torch.no_grad():
            new.bias.copy_(layer.bias)
    return new


# -- gradient scaling ----------------------------------------------------------------------------------------------
def slot_gamma(modules: list[_Hashed], mode: str) -> torch.Tensor:
    """Per-slot gradient divisor Gamma (m,), float64: v1 = (sum of scales)^2 / count, v5 = sum of squared scales.

    Slots no weight reads get 1 (their gradient is 0 anyway).
    """
    m = modules[0].array_size
    count, s1, s2 = (torch.zeros(m, dtype=torch.float64) for _ in range(3))
    for mod in modules:
        c = mod.slot_counts()
        count += c
        s1 += mod.scale * c
        s2 += mod.scale ** 2 * c
    gamma = s1 ** 2 / count.clamp(min=1) if mode == "v1" else s2
    return torch.where(count > 0, gamma, torch.ones_like(gamma))


class GradScale:
    """Tensor hook dividing the gradient of the shared array by Gamma (moved to the gradient's device once)."""

    def __init__(self, gamma: torch.Tensor):
        self.gamma = gamma

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        if self.gamma.device != grad.device or self.gamma.dtype != grad.dtype:
            self.gamma = self.gamma.to(grad.device, grad.dtype)
        return grad / self.gamma


# -- the method ----------------------------------------------------------------------------------------------------
@dataclass
class HashingConfig(MethodConfig):
    """Shared by stable_rps, roast and hashednet (they differ in their defaults)."""

    mapping: str = "randomfold"  # randomfold | hashednet | roast
    gamma: str = "v1"  # gradient scaling: v1 | v5 | none
    init_std: float = 0.04  # std of M's N(0, init_std^2) init; scales are std(dense init) / init_std
    tile: list[int] = field(default_factory=lambda: [16, 16])  # ROAST tile (B_K, B_N)
    tile_convs: bool = False  # ROAST: tile convolutions too (false: element-wise, as in the paper's runs)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mapping not in MAPPINGS:
            raise ConfigError(f"method.mapping={self.mapping!r}; valid: {', '.join(MAPPINGS)}")
        if self.gamma not in GAMMA_MODES:
            raise ConfigError(f"method.gamma={self.gamma!r}; valid: {', '.join(GAMMA_MODES)}")
        if not self.init_std > 0:
            raise ConfigError(f"method.init_std={self.init_std} must be > 0")
        if len(self.tile) != 2 or min(self.tile) < 1:
            raise ConfigError(f"method.tile={list(self.tile)} must be two positive sizes (B_K, B_N)")


class HashedSharing(Method):
    """Replace every Linear/Conv2d of the scope by a hashed module reading one global shared array, then train."""

    config_class = HashingConfig
    cfg: HashingConfig
    train_time = True

    def check(self, adapter) -> None:
        super().check(adapter)
        scope = adapter.scope(self.cfg.scope)
        storages = set()
        for path, layer in scope.items():
            if isinstance(layer, CompressedModule) or type(layer) not in (nn.Linear, nn.Conv2d):
                raise ConfigError(f"{self.name} shares the weights of nn.Linear and nn.Conv2d layers; {path} is "
                                  f"{type(layer).__name__}")
            if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
                raise ConfigError(f"{self.name}: {path} pads with {layer.padding_mode!r}; only zero padding")
            weight = layer.weight  # a skeleton's (meta) weights have no storage: tied ones are the same object
            storages.add(id(weight) if weight.is_meta else weight.untyped_storage().data_ptr())
        if len(storages) != len(scope):
            raise ConfigError(f"{self.name}: the scope has tied weights; hashing them twice would count them twice")
        n = sum(layer.weight.numel() for layer in scope.values())
        m = kept_count(n, self.cfg.ratio)
        if m < 1:
            raise ConfigError(f"method.ratio={self.cfg.ratio} leaves no shared slot for {n} weights")
        tiled = self.cfg.mapping == "roast" and any(
            isinstance(layer, nn.Linear) or self.cfg.tile_convs for layer in scope.values())
        if tiled and m < self.cfg.tile[0] * self.cfg.tile[1]:
            raise ConfigError(f"method.ratio={self.cfg.ratio}: {m} shared slots for {n} weights is fewer than one "
                              f"ROAST tile of {self.cfg.tile[0]}x{self.cfg.tile[1]}; use a smaller method.tile")

    def apply(self, model, adapter, ctx: CompressContext) -> dict[str, float]:
        scope = adapter.scope(self.cfg.scope)
        n = sum(layer.weight.numel() for layer in scope.values())
        modules = share_weights(adapter, scope, kept_count(n, self.cfg.ratio), self.cfg, ctx.seed, ctx.generator)
        load = sum(mod.slot_counts() for mod in modules)
        return {"method/array_size": modules[0].array_size, "method/virtual_size": n,
                "method/empty_slots": float((load == 0).double().mean()), "method/max_load": float(load.max()),
                "method/min_load": float(load.min())}


def share_weights(adapter, scope: dict[str, nn.Module], m: int, cfg: HashingConfig, seed: int,
                  generator: torch.Generator) -> list[_Hashed]:
    """Replace every layer of ``scope`` (in order) by a hashed module reading one new shared array of ``m``
    floats, M ~ N(0, cfg.init_std^2) drawn from ``generator``; register Gamma on M. Returns the new modules."""
    ref = next(iter(scope.values())).weight
    array = nn.Parameter((torch.randn(m, generator=generator, dtype=torch.float64) * cfg.init_std)
                         .to(ref.device, ref.dtype))
    modules, offset = [], 0
    for path, layer in scope.items():
        std = float(layer.weight.detach().double().std(unbiased=False))
        if not std > 0:
            raise ConfigError(f"{path} has a constant initial weight, so its hashing scale is undefined")
        new = hashed_from_dense(layer, array, offset, cfg.mapping, seed, std / cfg.init_std, list(cfg.tile),
                                cfg.tile_convs)
        adapter.replace(path, new)
        modules.append(new)
        offset += layer.weight.numel()
    if cfg.gamma != "none":
        array.register_hook(GradScale(slot_gamma(modules, cfg.gamma)))
    return modules
