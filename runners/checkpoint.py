"""Compressed models on disk, in safetensors, in their compact form.

* A tensor shared by several modules (a shared basis, tied embeddings) is written once; the others are aliases.
* Masked (pruned) weights are written as their non-zero values plus a one-bit-per-weight mask.
* The metadata names the class and constructor arguments of every compressed module, so ``load_compressed``
  rebuilds the compressed structure on a freshly built dense model and loads the tensors into it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from core.compressed import MODULE_CLASSES, CompressedModule
from core.errors import ConfigError
from core.io import atomic_path
from methods.modules import _Masked

FORMAT = "compbench-1"


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.detach().cpu().numpy().reshape(-1)))


def _unpack_bits(bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(bits.numpy())[:n].astype(bool)).view(shape)


def _local_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's own tensors (no recursion); masked weights as values + packed mask."""
    if isinstance(module, _Masked):
        out = {"values": module.weight.detach()[module.mask], "mask_bits": _pack_bits(module.mask)}
        if module.bias is not None:
            out["bias"] = module.bias.detach()
        return out
    tensors = {n: p.detach() for n, p in module.named_parameters(recurse=False)}
    tensors.update({n: b for n, b in module.named_buffers(recurse=False)
                    if n not in module._non_persistent_buffers_set})
    return tensors


def save_compressed(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> int:
    """Write ``model`` to ``path`` (atomically); return the file's size in bytes."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    owners: dict[tuple[str, int], str] = {}
    modules: dict[str, dict] = {}
    for mpath, module in model.named_modules():
        if isinstance(module, CompressedModule):
            modules[mpath] = {"class": type(module).__name__, "spec": module.spec()}
        for name, t in _local_tensors(module).items():
            key = f"{mpath}.{name}" if mpath else name
            skey = (str(t.device), t.untyped_storage().data_ptr())
            if skey in owners and not isinstance(module, _Masked):
                aliases[key] = owners[skey]
                continue
            owners[skey] = key
            tensors[key] = t.contiguous().cpu()
    meta = {"format": FORMAT, "modules": json.dumps(modules), "aliases": json.dumps(aliases), **(metadata or {})}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path.stat().st_size


def read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"cannot read checkpoint {path}: {e}") from e
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a compressed-model checkpoint of this harness (format {meta.get('format')!r})")
    return meta


def load_compressed(model: nn.Module, path: Path) -> nn.Module:
    """Rebuild the compressed structure of ``path`` on the dense ``model`` (same architecture) and load it."""
    meta = read_metadata(path)
    try:  # every tensor is read before the model is touched: a damaged file leaves ``model`` as it was
        with safe_open(str(path), framework="pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"cannot read checkpoint {path}: {e}") from e
    for mpath, entry in json.loads(meta["modules"]).items():
        cls = MODULE_CLASSES.get(entry["class"])
        if cls is None:
            raise ConfigError(f"{path}: unknown compressed module class {entry['class']!r}")
        old = model.get_submodule(mpath)
        ref = next(iter(old.parameters()), None)
        new = cls(**entry["spec"])
        if ref is not None:
            new = new.to(ref.device, ref.dtype)
        parent, _, attr = mpath.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    with torch.no_grad():
        for mpath, module in model.named_modules():
            prefix = f"{mpath}." if mpath else ""
            if isinstance(module, _Masked):
                mask = _unpack_bits(stored.pop(prefix + "mask_bits"), tuple(module.weight.shape))
                weight = torch.zeros_like(module.weight)
                weight[mask.to(weight.device)] = stored.pop(prefix + "values").to(weight.device, weight.dtype)
                module.weight.copy_(weight)
                module.mask.copy_(mask)
                if module.bias is not None:
                    module.bias.copy_(stored.pop(prefix + "bias"))
                continue
            for name, t in _local_tensors(module).items():
                if prefix + name in stored:
                    t.copy_(stored.pop(prefix + name))
    aliases = json.loads(meta["aliases"])
    for alias, owner in aliases.items():
        opath, _, oname = owner.rpartition(".")
        apath, _, aname = alias.rpartition(".")
        target = getattr(model.get_submodule(opath) if opath else model, oname)
        setattr(model.get_submodule(apath) if apath else model, aname, target)
    if stored:
        raise ConfigError(f"{path}: tensors that match no module: {', '.join(sorted(stored)[:5])}")
    return model
