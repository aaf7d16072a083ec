"""Calibration statistics of a transformer's linears, gathered block by block.

Post-training methods need, for every linear in the scope, the Gram matrix X^T X of its inputs over the
calibration tokens. Holding every activation at once is out of the question for a 7B model (256 windows x 2048
tokens x 11008 features), so the statistics are running sums computed one block at a time:

1. ``capture_block_inputs`` runs the model on every calibration batch up to its first block and keeps that
   block's input hidden states (and, from one full forward, the keyword arguments every block receives: masks,
   rotary embeddings, positions);
2. ``run_blocks`` feeds the cached hidden states through one block at a time with forward hooks that add
   X^T X (float64) at the input of one linear per *input group* (q, k and v read the same input, as do gate and
   up), hands the block's statistics to a callback that may compress it, and the block's outputs, computed
   before the callback, become the next block's inputs.

So the statistics of every block are those of the dense model (the SVD-LLM and Basis Sharing protocol); running
``run_blocks`` on an already compressed model measures the compressed model's inputs instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from core.errors import ConfigError
from core.progress import progress_bar
from tasks.adapters import ModelAdapter


@dataclass
class Gram:
    """Running sum over calibration tokens of x^T x: ``xtx`` (d_in, d_in) float64, ``tokens`` rows added."""

    xtx: torch.Tensor
    tokens: int = 0

    @classmethod
    def zeros(cls, dim: int, device: torch.device | str) -> "Gram":
        return cls(torch.zeros(dim, dim, dtype=torch.float64, device=device))

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (..., d_in), in float64."""
        rows = x.detach().reshape(-1, x.shape[-1]).to(self.xtx.device, torch.float64)
        self.xtx.addmm_(rows.T, rows)
        self.tokens += rows.shape[0]

    @classmethod
    def pooled(cls, grams: Sequence["Gram"], device: torch.device | str | None = None) -> "Gram":
        """The sum of ``grams`` (the statistics of all their tokens together), on ``device``."""
        device = device if device is not None else grams[0].xtx.device
        total = cls(grams[0].xtx.to(device, copy=True), grams[0].tokens)
        for g in grams[1:]:
            total.xtx += g.xtx.to(device)
            total.tokens += g.tokens
        return total


@dataclass
class BlockInputs:
    """Cached inputs of the current block: ``hidden`` one (batch, seq, d) tensor per calibration batch, and the
    keyword arguments ``block_kwargs[i]`` that block ``i`` receives from the model (identical for every batch)."""

    hidden: list[torch.Tensor]
    block_kwargs: list[dict[str, Any]]


class _Stop(Exception):
    """Raised by the hook on the first block once it has its input: the rest of the forward is not needed."""


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _forward(model: nn.Module, batch: Any) -> None:
    """One forward of a calibration batch: keyword inputs (a dict; transformers models without a KV cache) or a
    tensor of inputs."""
    if isinstance(batch, dict):
        kwargs = dict(batch)
        if getattr(model, "config", None) is not None:
            kwargs.setdefault("use_cache", False)
        model(**kwargs)
    else:
        model(batch)


@torch.no_grad()
def capture_block_inputs(adapter: ModelAdapter, batches: Iterable[Any], progress: bool = True) -> BlockInputs:
    """The first block's input for every calibration batch (the model stops there) and the keyword arguments of
    every block (from one full forward of the first batch). All batches must have the same shape."""
    model, blocks = adapter.model, adapter.blocks()
    if not blocks:
        raise ConfigError(f"{type(model).__name__} has no repeated blocks to calibrate block by block")
    hidden: list[torch.Tensor] = []
    block_kwargs: list[dict[str, Any] | None] = [None] * len(blocks)

    def record(index: int):
        def hook(module, args, kwargs):
            block_kwargs[index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if index == 0:
                hidden.append(args[0] if args else kwargs["hidden_states"])
        return hook

    def stop(module, args, kwargs):
        hidden.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ConfigError("the task yielded no calibration batch")
    try:
        _forward(model, first)
    finally:
        for h in handles:
            h.remove()
    if any(k is None for k in block_kwargs):
        raise ConfigError(f"{type(model).__name__}: not every block ran in a forward pass; cannot calibrate")
    handle = blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for batch in progress_bar(batches, "calibration inputs", enabled=progress):
            try:
                _forward(model, batch)
            except _Stop:
                pass
            if hidden[-1].shape != hidden[0].shape:
                raise ConfigError(f"calibration batches differ in shape ({tuple(hidden[0].shape)} then "
                                  f"{tuple(hidden[-1].shape)}); block-wise calibration needs one shape")
    finally:
        handle.remove()
    return BlockInputs(hidden, block_kwargs)  # type: ignore[arg-type]


def input_keys(adapter: ModelAdapter, roles: Sequence[str]) -> dict[str, str]:
    """role -> the role whose input statistics it uses: the first of ``roles`` in its adapter input group."""
    keys = {}
    for role in roles:
        group = next((g for g in adapter.input_groups if role in g), (role,))
        keys[role] = next(r for r in group if r in roles)
    return keys


def _block_device(block: nn.Module) -> torch.device:
    p = next(block.parameters(), None)
    if p is None or p.device.type == "meta":
        raise ConfigError("block-wise calibration needs every block's weights in memory (meta / disk-offloaded "
                          "weights are not supported)")
    return p.device


@torch.no_grad()
def run_blocks(adapter: ModelAdapter, inputs: BlockInputs, roles: Sequence[str],
               on_block: Callable[[int, dict[str, Gram]], None], device: torch.device | str | None = None,
               progress: bool = True, desc: str = "calibration") -> None:
    """Feed ``inputs`` through the blocks in order, accumulating X^T X of the inputs of the ``roles`` linears.

    For block ``i``: the cached hidden states go through the adapter's ``transition(i)`` if any (Swin's patch
    merging between stages), then through the block one batch at a time, with forward hooks adding each
    input group's rows to a ``Gram``; the outputs replace the cached inputs; then ``on_block(i, grams)`` runs,
    with ``grams[role]`` for every role (roles of one input group share one ``Gram`` object). The callback may
    replace the block's linears: the next block's inputs are already computed.

    A block whose weights sit on the CPU is moved to ``device`` (when that is a GPU) for its turn and moved back
    afterwards, so a model larger than the GPU compresses one block at a time. ``inputs`` is consumed.
    """
    keys = input_keys(adapter, roles)
    target = torch.device(device) if device is not None else None
    for i, block in enumerate(progress_bar(adapter.blocks(), desc, enabled=progress)):
        home = _block_device(block)
        run_on = target if (target is not None and home.type == "cpu" and target.type != "cpu") else home
        if run_on != home:
            block.to(run_on)
        grams: dict[str, Gram] = {}
        handles = []
        for key in dict.fromkeys(keys.values()):
            linear = block.get_submodule(adapter.roles[key])
            gram = Gram.zeros(_in_features(linear), run_on)
            grams[key] = gram
            handles.append(linear.register_forward_hook(lambda m, args, out, g=gram: g.add(args[0])))
        kwargs = _to(inputs.block_kwargs[i], run_on)
        transition = adapter.transition(i)
        try:
            for j, h in enumerate(inputs.hidden):
                h = h.to(run_on)
                if transition is not None:  # e.g. Swin's patch merging between stages (it stays where it is)
                    h = transition(h.to(_block_device(transition))).to(run_on)
                out = block(h, **kwargs)
                inputs.hidden[j] = out[0] if isinstance(out, (tuple, list)) else out
        finally:
            for handle in handles:
                handle.remove()
        on_block(i, {role: grams[key] for role, key in keys.items()})
        if run_on != home:
            block.to(home)


def _in_features(linear: nn.Module) -> int:
    if hasattr(linear, "in_features"):
        return int(linear.in_features)
    raise ConfigError(f"{type(linear).__name__} has no in_features; block-wise statistics need linear layers")


def collect_grams(adapter: ModelAdapter, batches: Iterable[Any], roles: Sequence[str],
                  device: torch.device | str | None = None, store: torch.device | str = "cpu",
                  progress: bool = True) -> dict[tuple[str, int], Gram]:
    """Every block's statistics at once, ``{(role, block index): Gram}`` kept on ``store`` (roles of one input
    group share one ``Gram``). For methods that need all layers before compressing any; streaming methods pass
    their own ``on_block`` to ``run_blocks`` instead."""
    out: dict[tuple[str, int], Gram] = {}

    def keep(i: int, grams: dict[str, Gram]) -> None:
        moved = {id(g): Gram(g.xtx.to(store), g.tokens) for g in grams.values()}
        out.update({(role, i): moved[id(g)] for role, g in grams.items()})

    run_blocks(adapter, capture_block_inputs(adapter, batches, progress), roles, keep, device, progress)
    return out
