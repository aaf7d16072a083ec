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

The same engine serves every block-wise method: ``forward_block`` advances the cached inputs through one block
(hooks placed by the caller see its batches; FiPS's ``mlp`` objective records an MLP's inputs and outputs this
way), and ``capture_block_io`` keeps every block's dense input and output at once (FiPS's ``block`` objective,
teacher forcing). The helpers ``forward_batch``, ``first_output``, ``block_input``, ``move_to``, ``block_device``
and ``StopForward`` are the one way to run a batch, read a block's output and stop a forward early.
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


class StopForward(Exception):
    """Raised by a block hook once it has what it needs: the rest of the model's forward is not run."""


def first_output(out: Any) -> torch.Tensor:
    """A block's (or module's) hidden-state output: the first element of a tuple / list output, else ``out``."""
    return out[0] if isinstance(out, (tuple, list)) else out


def block_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a block receives, from its forward pre-hook arguments (positional or keyword)."""
    return args[0] if args else kwargs["hidden_states"]


def move_to(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor inside (tuples, lists, dicts, nested) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(move_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    return obj


def forward_batch(model: nn.Module, batch: Any) -> Any:
    """The model's output on one calibration batch: keyword inputs (a dict; transformers models run without a KV
    cache) or a tensor of inputs."""
    if isinstance(batch, dict):
        kwargs = dict(batch)
        if getattr(model, "config", None) is not None:
            kwargs.setdefault("use_cache", False)
        return model(**kwargs)
    return model(batch)


def block_device(block: nn.Module) -> torch.device:
    """The device of a block's weights; ``ConfigError`` for meta (disk-offloaded) weights."""
    p = next(block.parameters(), None)
    if p is None or p.device.type == "meta":
        raise ConfigError("block-wise calibration needs every block's weights in memory (meta / disk-offloaded "
                          "weights are not supported)")
    return p.device


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
                hidden.append(block_input(args, kwargs))
        return hook

    def stop(module, args, kwargs):
        hidden.append(block_input(args, kwargs))
        raise StopForward

    handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ConfigError("the task yielded no calibration batch")
    try:
        forward_batch(model, first)
    finally:
        for h in handles:
            h.remove()
    if any(k is None for k in block_kwargs):
        raise ConfigError(f"{type(model).__name__}: not every block ran in a forward pass; cannot calibrate")
    handle = blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for batch in progress_bar(batches, "calibration inputs", enabled=progress):
            try:
                forward_batch(model, batch)
            except StopForward:
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


@torch.no_grad()
def forward_block(adapter: ModelAdapter, inputs: BlockInputs, index: int, device: torch.device) -> None:
    """Replace the cached hidden states ``inputs.hidden`` (block ``index``'s inputs) by the block's outputs, one
    batch at a time on ``device`` (where the block must sit); the adapter's ``transition(index)`` (Swin's patch
    merging between stages) runs first, where its own weights are. Hooks on the block see every batch."""
    block = adapter.blocks()[index]
    kwargs = move_to(inputs.block_kwargs[index], device)
    transition = adapter.transition(index)
    for j, h in enumerate(inputs.hidden):
        h = h.to(device)
        if transition is not None:
            h = transition(h.to(block_device(transition))).to(device)
        inputs.hidden[j] = first_output(block(h, **kwargs))


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
        home = block_device(block)
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
        try:
            forward_block(adapter, inputs, i, run_on)
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


@dataclass
class BlockCache:
    """The dense model's input and output of every block for every calibration batch, ``inputs[b][j]`` and
    ``targets[b][j]`` (block b, batch j; an input equal to the previous block's output is the same stored
    tensor), and the keyword arguments ``kwargs[b]`` block b receives."""

    inputs: list[list[torch.Tensor]]
    targets: list[list[torch.Tensor]]
    kwargs: list[dict[str, Any]]

    def nbytes(self) -> int:
        seen, total = set(), 0
        for t in (t for per_block in (*self.inputs, *self.targets) for t in per_block):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total


def _free_bytes(device: torch.device) -> int | None:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


@torch.no_grad()
def capture_block_io(adapter: ModelAdapter, batches: Iterable[Any], dtype: torch.dtype | str = "auto",
                     store: str = "auto", n_batches: int | None = None, progress: bool = False,
                     desc: str = "block outputs") -> BlockCache:
    """Run the (dense) model on ``batches`` and keep every block's input and output; the forward stops after the
    last block. After the first batch, the total is estimated (first batch x ``n_batches``) against half the free
    memory of the model's device: ``dtype`` auto is float32 when that fits, else float16; ``store`` auto is the
    device when the cache fits there at that dtype, else the CPU (``cpu`` / ``device`` force the place)."""
    model, blocks = adapter.model, adapter.blocks()
    device = block_device(blocks[0])
    n = len(blocks)
    inputs: list[list[torch.Tensor]] = [[] for _ in range(n)]
    targets: list[list[torch.Tensor]] = [[] for _ in range(n)]
    kwargs: list[dict[str, Any] | None] = [None] * n
    state: dict[str, Any] = {"last": None, "where": torch.device("cpu") if store == "cpu" else device,
                             "dtype": torch.float32 if dtype == "auto" else dtype}

    def keep(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(state["where"], state["dtype"], copy=True)

    def pre(i: int):
        def hook(module, args, kw):
            if kwargs[i] is None:
                kwargs[i] = {k: v for k, v in kw.items() if k != "hidden_states"}
            h = block_input(args, kw)
            inputs[i].append(targets[i - 1][-1] if i > 0 and h is state["last"] else keep(h))
        return hook

    def post(i: int):
        def hook(module, args, out):
            out = first_output(out)
            state["last"] = out
            targets[i].append(keep(out))
            if i == n - 1:
                raise StopForward
        return hook

    def decide() -> None:
        """Dtype and place from the first batch; the first batch is converted (sharing kept)."""
        free = _free_bytes(device)
        total32 = BlockCache(inputs, targets, []).nbytes() * (n_batches or 1) * 4 // state["dtype"].itemsize
        fits = (lambda nbytes: free is None or nbytes <= free / 2) if device.type != "cpu" else (lambda nbytes: True)
        if dtype == "auto":
            state["dtype"] = torch.float32 if fits(total32) or device.type == "cpu" else torch.float16
        if store == "auto":
            state["where"] = device if fits(total32 * state["dtype"].itemsize // 4) else torch.device("cpu")
        moved: dict[int, torch.Tensor] = {}
        for lst in (*inputs, *targets):
            if id(lst[0]) not in moved:
                moved[id(lst[0])] = lst[0].to(state["where"], state["dtype"])
            lst[0] = moved[id(lst[0])]

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post(i)) for i, b in enumerate(blocks)]
    try:
        for j, batch in enumerate(progress_bar(batches, desc, n_batches, enabled=progress)):
            try:
                forward_batch(model, batch)
            except StopForward:
                pass
            state["last"] = None
            if j == 0 and inputs[0]:
                decide()
    finally:
        for h in handles:
            h.remove()
    if not inputs[0]:
        raise ConfigError("the task yielded no calibration batch")
    if any(k is None for k in kwargs):
        raise ConfigError(f"{type(model).__name__}: not every block ran in a forward pass")
    return BlockCache(inputs, targets, kwargs)  # type: ignore[arg-type]
