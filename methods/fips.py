"""FiPS, Fine-grained Parameter Sharing (arXiv 2411.09816; official code cemuyuk/FiPS): the MLP weights of a group
of consecutive blocks share one dense basis U, every layer keeps its own sparse factor V.

Specification: the project's FiPS design notes (sections in brackets).

* Groups [1.1]: contiguous runs of blocks covering every MLP, never across a change of stage (Swin) or of width;
  ``group_size`` blocks each (default 4, Swin 6 within a stage: the official DeiT-B / Llama and Swin-B/L
  groupings), or explicit ``groups``.
* Shapes [1.2, 1.3]: every MLP linear is oriented d x d_ff (transposed when out > in: fc1, gate, up) and the
  group's matrices are concatenated along d_ff, block-major then role order: M = U [V_1 | ... | V_Fn], U (d x r)
  dense and shared, V_i (r x d_ff) sparse. fc1-type layers compute W = (U V_i)^T, fc2-type W = U V_i; biases stay.
* Rank [1.5]: r = floor(p d C / ((1 - s) C + d)) for the group's C = sum of d_ff columns, p = 1 - ratio kept,
  s = ``sparsity`` of V: the largest r with d r + (1 - s) r C <= p d C. With d_ff = 4d (ViT, Swin, Gemma-2) this
  is the official ``compute_sparse_r``; ``rank_formula: official`` uses the official expression, which assumes
  d_ff = 4d, for any model (it overshoots the budget when d_ff != 4d).
* SVD init [1.4]: thin SVD of M (float64); U = top-r left vectors, V = diag(S) W^T (singular values folded into V).
  r > rank(M) (overcomplete, e.g. DeiT-B at p = 0.5): U padded with zero columns, V with copies of its top rows
  divided by ``overcomplete_tau`` = 32, so U V = M exactly.
* Local error minimisation [1.7, 1.8], ``objective``:
  ``block`` (ViT recipe): the dense model's block inputs and outputs on the calibration images are cached once;
  every step sums MSE(block_b(x_b), y_b) over all blocks (teacher-forced: inputs from the dense model) and trains
  U, V and the MLP biases, everything else frozen, model in eval mode. AdamW (0.9, 0.999, eps 1e-8), cosine LR per
  step. Sparsifier RigL by default (constant s, drop fraction 0.1, every 50 steps up to 0.75 T; Swin-L config).
  ``mlp`` (LLM recipe): one MLP at a time, in block order, on the dense model's (input, output) pairs of that MLP
  (block-wise streamed, so only one block's activations are held), ``tokens_per_step`` random tokens a step,
  its own optimizer, schedule and sparsifier (GMP* by default, global over that MLP's V's); training a later MLP
  of a group keeps updating the shared U (as the official sequential script).
* Sparsity of V only (``methods.sparse_training``: rigl | gmp | magnitude) [1.9, 1.10].
* Optional end-to-end fine-tuning [1.11] (``finetune_steps`` > 0, image tasks): the whole model (or only the
  FiPS factors) on the task's train split, cross-entropy (``ce``) or distillation from the dense model (``kd``),
  masks kept fixed except under RigL, which keeps updating them at constant sparsity.
* Counting [1.6]: stored = U once per group + nnz(V) + biases; the mask is index overhead (one bit per entry of
  V; ``method/index_bytes_csr`` gives the CSR alternative). Checkpoints store V as values + mask bits.

Calibration [1.7]: on image tasks with ``stratified_calibration_batches`` (timm_image), ``calib_images``
class-stratified train images (3,840 as the official 30 x 128) in batches of ``batch_size``, unaugmented (the
official code applies one fixed random resize/crop/flip per image); null = the task's own calibration set, which
is also what language tasks use (``task.calib``).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import ConfigError
from core.progress import progress_bar
from methods.base import METHODS, CompressContext, Method, MethodConfig
from methods.calibration import _block_device, _forward, _to, capture_block_inputs
from methods.modules import MaskedFactor, SharedFactorLinear
from methods.sparse_training import SPARSIFIERS, Sparsifier, make_sparsifier
from tasks.adapters import LlamaAdapter, ModelAdapter

OBJECTIVES = ("auto", "block", "mlp")
CACHE_DTYPES: dict[str, torch.dtype | str] = {"auto": "auto", "float32": torch.float32, "float16": torch.float16,
                                              "bfloat16": torch.bfloat16}
# per-objective defaults of the fields left null: the official Swin-L distillation config (block) and the
# Gemma-2-2B / Llama-3.2-1B `_local` configs (mlp)
RECIPES: dict[str, dict[str, Any]] = {
    "block": {"epochs": 20, "lr": 1e-3, "lr_min": 1e-6, "weight_decay": 0.05, "sparsifier": "rigl"},
    "mlp": {"epochs": 40, "lr": 1e-5, "lr_min": 1e-6, "weight_decay": 0.1, "sparsifier": "gmp"},
}


@dataclass
class FiPSConfig(MethodConfig):
    name: str = "fips"
    scope: str = "mlp"  # FiPS compresses the MLPs only
    sparsity: float = 0.75  # of every V (U stays dense)
    group_size: int | None = None  # blocks per group; null: 4, or 6 within a stage for Swin
    groups: list[list[int]] | None = None  # explicit groups of block indices (contiguous, covering every block)
    rank: int | None = None  # fixed rank for every group instead of the budget formula (ablations, tests)
    rank_formula: str = "exact"  # exact | official (assumes d_ff = 4d)
    rank_multiple: int = 1  # round r down to a multiple (the official structured_sparsity uses 64)
    sparsity_block: int = 1  # b > 1: V pruned and regrown in b x b blocks (block-sparse inference kernels)
    overcomplete_tau: float = 32.0
    objective: str = "auto"  # auto (mlp for LLaMA-type models, block otherwise) | block | mlp
    epochs: int | None = None  # passes over the calibration batches; null: 20 (block), 40 (mlp)
    steps: int | None = None  # optimizer steps (per MLP for objective mlp) instead of epochs x batches
    lr: float | None = None  # null: 1e-3 (block), 1e-5 (mlp)
    lr_min: float | None = None  # cosine floor; null: 1e-6
    weight_decay: float | None = None  # AdamW; null: 0.05 (block), 0.1 (mlp)
    batch_size: int = 128  # block objective with calib_images: images per calibration batch (= per step)
    calib_images: int | None = 3840  # class-stratified train images (image tasks); null: the task's calibration
    tokens_per_step: int = 8192  # mlp objective
    sparsifier: str = "auto"  # auto (rigl for block, gmp for mlp) | rigl | gmp | magnitude (one-shot, fixed)
    update_every: int = 50  # steps between mask updates (RigL, GMP)
    update_end: float = 0.75  # mask updates stop at this fraction of the steps
    rigl_drop_fraction: float = 0.1  # 0.1 Swin-L config, 0.05 DeiT-B config
    gmp_initial: float = 0.05
    gmp_accelerated: float = 0.5
    gmp_accel_at: float = 0.25  # fraction of the steps at which GMP jumps to gmp_accelerated
    gmp_quirk: bool = False  # true: sparsimony's cubic term (divides by t_end; never reaches the sparsity)
    cache_dtype: str = "auto"  # teacher activations: auto (float32 when they fit in half the device's free memory,
    #                            else float16) | float32 | float16 | bfloat16
    cache_device: str = "auto"  # auto (the device when they take < half its free memory, else cpu) | cpu | device
    finetune_steps: int = 0  # end-to-end fine-tuning after the local stage (image tasks)
    finetune_lr: float = 1e-4
    finetune_lr_min: float = 1e-5
    finetune_weight_decay: float = 0.05
    finetune_batch_size: int = 128
    finetune_loss: str = "ce"  # ce (labels) | kd (KL divergence to the dense model's logits)
    finetune_params: str = "all"  # all | fips (U, V, MLP biases)

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = []
        if self.scope != "mlp":
            bad.append(f"method.scope={self.scope!r}: FiPS compresses the MLPs only (scope mlp)")
        if not 0.0 <= self.sparsity < 1.0:
            bad.append(f"method.sparsity={self.sparsity} must be in [0, 1)")
        for key, valid in (("rank_formula", ("exact", "official")), ("objective", OBJECTIVES),
                           ("sparsifier", ("auto", *SPARSIFIERS)), ("cache_dtype", tuple(CACHE_DTYPES)),
                           ("cache_device", ("auto", "cpu", "device")), ("finetune_loss", ("ce", "kd")),
                           ("finetune_params", ("all", "fips"))):
            if getattr(self, key) not in valid:
                bad.append(f"method.{key}={getattr(self, key)!r}; valid: {', '.join(valid)}")
        positive = {"rank_multiple": self.rank_multiple, "sparsity_block": self.sparsity_block,
                    "batch_size": self.batch_size,
                    "tokens_per_step": self.tokens_per_step, "update_every": self.update_every,
                    "finetune_batch_size": self.finetune_batch_size}
        for key in ("group_size", "rank", "calib_images"):
            if getattr(self, key) is not None:
                positive[key] = getattr(self, key)
        bad += [f"method.{k}={v} must be >= 1" for k, v in positive.items() if v < 1]
        for key in ("epochs", "steps", "finetune_steps"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                bad.append(f"method.{key}={getattr(self, key)} must be >= 0")
        for key in ("lr", "finetune_lr", "overcomplete_tau"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                bad.append(f"method.{key}={getattr(self, key)} must be > 0")
        for key in ("lr_min", "weight_decay", "finetune_lr_min", "finetune_weight_decay"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                bad.append(f"method.{key}={getattr(self, key)} must be >= 0")
        for key in ("update_end", "rigl_drop_fraction", "gmp_accel_at"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                bad.append(f"method.{key}={getattr(self, key)} must be in [0, 1]")
        if not 0.0 <= self.gmp_initial <= self.gmp_accelerated < 1.0:
            bad.append(f"method.gmp_initial={self.gmp_initial} <= gmp_accelerated={self.gmp_accelerated} < 1")
        if self.groups is not None and (not self.groups or any(not g for g in self.groups)):
            bad.append("method.groups must be a non-empty list of non-empty lists of block indices")
        if bad:
            raise ConfigError("; ".join(bad))

    def resolved(self, objective: str) -> dict[str, Any]:
        """The objective's recipe with this config's non-null values on top."""
        out = dict(RECIPES[objective])
        for key in out:
            if getattr(self, key) not in (None, "auto"):
                out[key] = getattr(self, key)
        return out


# -- layout, groups, ranks ---------------------------------------------------------------------------------------
@dataclass
class MLPLayer:
    """One MLP linear: block index, role, path, oriented shape (d, cols) and whether it is transposed."""

    block: int
    role: str
    path: str
    d: int
    cols: int
    transposed: bool


@dataclass
class Group:
    blocks: list[int]
    layers: list[MLPLayer]
    rank: int

    @property
    def d(self) -> int:
        return self.layers[0].d

    @property
    def cols(self) -> int:
        return sum(layer.cols for layer in self.layers)

    def dense_params(self) -> int:
        return self.d * self.cols

    def stored_params(self, sparsity: float) -> int:
        """U + the kept entries of the V's (as ``Sparsifier.kept``: each V's sparsifier rounds once)."""
        n = self.rank * self.cols
        return self.d * self.rank + n - int(round(sparsity * n))


def mlp_layers(adapter: ModelAdapter, method: str = "fips") -> dict[int, list[MLPLayer]]:
    """{block index: its MLP linears in role order}, every block of the model; ``ConfigError`` when the adapter
    names no MLP roles or a layer is not a plain ``nn.Linear``."""
    if not adapter.mlp_roles or not adapter.block_paths():
        raise ConfigError(f"{method} needs a transformer adapter with named MLP roles; "
                          f"{type(adapter.model).__name__} has none")
    out: dict[int, list[MLPLayer]] = {}
    for i, block in enumerate(adapter.block_paths()):
        for role in adapter.mlp_roles:
            path = f"{block}.{adapter.roles[role]}"
            layer = adapter.model.get_submodule(path)
            if type(layer) is not nn.Linear:
                raise ConfigError(f"{method} compresses nn.Linear MLP layers; {path} is {type(layer).__name__}")
            if layer.weight.device.type == "meta":
                raise ConfigError(f"{method}: {path} has meta (offloaded) weights")
            out_f, in_f = layer.weight.shape
            transposed = out_f > in_f
            d, cols = (in_f, out_f) if transposed else (out_f, in_f)
            out.setdefault(i, []).append(MLPLayer(i, role, path, d, cols, transposed))
    return out


def segments(adapter: ModelAdapter, layers: dict[int, list[MLPLayer]]) -> list[int]:
    """A segment id per block: consecutive blocks of one stage (``adapter.stage_of``, Swin) and one MLP shape."""
    keys, ids = [], []
    for i, block in enumerate(adapter.block_paths()):
        stage = adapter.stage_of(block) if hasattr(adapter, "stage_of") else 0
        key = (stage, tuple((m.d, m.cols) for m in layers[i]))
        if not keys or keys[-1] != key:
            keys.append(key)
        ids.append(len(keys) - 1)
    return ids


def default_group_size(adapter: ModelAdapter) -> int:
    return 6 if hasattr(adapter, "stage_of") else 4


def make_groups(adapter: ModelAdapter, layers: dict[int, list[MLPLayer]], group_size: int | None,
                groups: list[list[int]] | None) -> list[list[int]]:
    """Block-index groups: explicit ``groups`` (validated) or runs of ``group_size`` blocks inside every segment
    (the last run of a segment holds the remainder)."""
    seg = segments(adapter, layers)
    n = len(seg)
    if groups is None:
        size = group_size or default_group_size(adapter)
        out: list[list[int]] = []
        start = 0
        while start < n:
            end = start
            while end < n and seg[end] == seg[start] and end - start < size:
                end += 1
            out.append(list(range(start, end)))
            start = end
        return out
    out = [[int(b) for b in g] for g in groups]
    flat = [b for g in out for b in g]
    if sorted(flat) != list(range(n)):
        raise ConfigError(f"method.groups={out} must cover the blocks 0..{n - 1} once each (FiPS compresses "
                          f"every MLP)")
    for g in out:
        if g != list(range(g[0], g[0] + len(g))):
            raise ConfigError(f"method.groups: {g} is not a contiguous, increasing run of blocks")
        if len({seg[b] for b in g}) > 1:
            raise ConfigError(f"method.groups: {g} crosses a stage or a change of MLP width; a group shares one "
                              f"basis of one width")
    return out


def group_rank(d: int, cols: int, n_layers: int, kept: float, sparsity: float, formula: str = "exact",
               multiple: int = 1) -> int:
    """Rank of a group of ``n_layers`` oriented d x d_ff matrices (``cols`` = sum of their d_ff) keeping the
    fraction ``kept`` of their weights with V at ``sparsity``; ``official`` is the code's expression with
    d_ff = 4d: int(4 F n d^2 p / (4 F n d (1 - s) + d))."""
    if formula == "official":
        fn = n_layers
        r = int(4 * fn * d * d * kept / (4 * fn * d * (1 - sparsity) + d))
    else:
        r = int(kept * d * cols / ((1 - sparsity) * cols + d))
    return (r // multiple) * multiple


def plan_groups(adapter: ModelAdapter, cfg: FiPSConfig) -> list[Group]:
    layers = mlp_layers(adapter, cfg.name)
    out = []
    for blocks in make_groups(adapter, layers, cfg.group_size, cfg.groups):
        members = [m for b in blocks for m in layers[b]]
        if len({m.d for m in members}) > 1:
            raise ConfigError(f"fips: the MLPs of blocks {blocks} differ in width d; a group shares one basis")
        d, cols = members[0].d, sum(m.cols for m in members)
        multiple = math.lcm(cfg.rank_multiple, cfg.sparsity_block)  # block-sparse V needs whole blocks of rank
        rank = cfg.rank if cfg.rank is not None else group_rank(d, cols, len(members), 1.0 - cfg.ratio,
                                                                cfg.sparsity, cfg.rank_formula, multiple)
        uneven = sorted({n for n in (rank, *(m.cols for m in members)) if n % cfg.sparsity_block})
        if uneven:
            raise ConfigError(f"method.sparsity_block={cfg.sparsity_block} must divide the rank and every MLP width; "
                              f"{uneven} in the group of blocks {blocks} do not")
        if rank < 1:
            raise ConfigError(f"method.ratio={cfg.ratio} with sparsity {cfg.sparsity} leaves rank 0 for the group "
                              f"of blocks {blocks} (d={d})")
        out.append(Group(blocks, members, rank))
    return out


# -- factorisation ------------------------------------------------------------------------------------------------
def oriented(weight: Tensor, transposed: bool) -> Tensor:
    return weight.T if transposed else weight


def svd_init(matrix: Tensor, rank: int, tau: float = 32.0) -> tuple[Tensor, Tensor]:
    """(U, V) with U V ~ ``matrix`` (d x C): thin SVD in float64, singular values folded into V; past the matrix
    rank, U gets zero columns and V copies of its top rows divided by ``tau`` (exact: U V = M)."""
    u, s, vh = torch.linalg.svd(matrix.detach().to(torch.float64), full_matrices=False)
    sv = s[:, None] * vh
    q = s.numel()
    if rank <= q:
        return u[:, :rank], sv[:rank]
    extra = rank - q
    idx = torch.arange(extra, device=sv.device) % q
    return (torch.cat([u, u.new_zeros(u.shape[0], extra)], 1), torch.cat([sv, sv[idx] / tau], 0))


def factorize_group(adapter: ModelAdapter, group: Group, tau: float, device: torch.device | None = None
                    ) -> tuple[nn.Parameter, list[SharedFactorLinear]]:
    """SVD-initialised ``SharedFactorLinear`` twins of the group's (still dense) layers, not yet installed, and
    their shared basis Parameter (on the layers' device and dtype)."""
    dense = [adapter.model.get_submodule(m.path) for m in group.layers]
    ref = dense[0].weight
    work = device if device is not None else ref.device
    matrix = torch.cat([oriented(layer.weight.detach().to(work, torch.float64), m.transposed)
                        for layer, m in zip(dense, group.layers)], dim=1)
    u, v = svd_init(matrix, group.rank, tau)
    basis = nn.Parameter(u.to(ref.device, ref.dtype).contiguous())
    modules = []
    for layer, m, factor in zip(dense, group.layers, v.split([m.cols for m in group.layers], dim=1)):
        modules.append(SharedFactorLinear.from_shared(basis, factor.to(ref.device, ref.dtype), layer.bias,
                                                      m.transposed))
    return basis, modules


def install_factorised(model: nn.Module, adapter: ModelAdapter, groups: Sequence[Group], tau: float,
                       device: torch.device | None = None) -> tuple[list[SharedFactorLinear], list[nn.Parameter]]:
    """Replace every group's dense layers by their SVD-initialised ``SharedFactorLinear`` twins and freeze the
    rest of ``model``; returns the new modules and the trainable parameters (U once, V, biases)."""
    modules: list[SharedFactorLinear] = []
    for g in groups:
        _, mods = factorize_group(adapter, g, tau, device)
        for m, new in zip(g.layers, mods):
            adapter.replace(m.path, new)
        modules += mods
    for p in model.parameters():
        p.requires_grad_(False)
    params = fips_parameters(modules)
    for p in params:
        p.requires_grad_(True)
    return modules, params


def fips_parameters(modules: Iterable[SharedFactorLinear]) -> list[nn.Parameter]:
    """U (once), V and biases of ``modules``."""
    seen, out = set(), []
    for m in modules:
        for p in (m.u, m.v.weight, m.bias):
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


# -- the training loop ----------------------------------------------------------------------------------------------
def train_steps(params: list[nn.Parameter], sparsifier: Sparsifier, steps: int, loss_step, lr: float,
                lr_min: float, weight_decay: float, progress: bool = False, desc: str = "fips") -> list[float]:
    """``steps`` AdamW steps with a per-step cosine schedule; ``loss_step(t)`` runs the forward/backward passes
    of step t and returns the loss (a float). The sparsifier wraps every step (``methods.sparse_training``).
    Returns the loss of every step."""
    sparsifier.prepare()
    history: list[float] = []
    if steps > 0:
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr_min)
        bar = tqdm(range(1, steps + 1), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
        for t in bar:
            sparsifier.prepare_step(t)
            opt.zero_grad(set_to_none=True)
            loss = loss_step(t)
            if not math.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss is {loss} at step {t}")
            sparsifier.step(t)
            opt.step()
            sched.step()
            sparsifier.after_optimizer_step(opt)
            history.append(loss)
            if t % 10 == 0 or t == steps:
                bar.set_postfix(loss=f"{loss:.3g}")
    sparsifier.finalize()
    sparsifier.after_optimizer_step(None)
    return history


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class _Stop(Exception):
    pass


@dataclass
class BlockCache:
    """Dense-model inputs and outputs of every block for every calibration batch (an input equal to the previous
    block's output is the same stored tensor), plus each block's keyword arguments."""

    inputs: list[list[Tensor]]
    targets: list[list[Tensor]]
    kwargs: list[dict[str, Any]]

    def nbytes(self) -> int:
        seen, total = set(), 0
        for t in (t for per_block in (*self.inputs, *self.targets) for t in per_block):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None


@torch.no_grad()
def capture_block_io(adapter: ModelAdapter, batches: Iterable[Any], dtype: torch.dtype | str = "auto",
                     store: str = "auto", n_batches: int | None = None, progress: bool = False) -> BlockCache:
    """Run the (dense) model on ``batches`` and keep every block's input and output. The forward stops after the
    last block. After the first batch, the total is estimated (first batch x ``n_batches``) against half the free
    memory of the model's device: ``dtype`` auto is float32 when that fits, else float16; ``store`` auto is the
    device when the cache fits there at that dtype, else the CPU (``cpu`` / ``device`` force the place)."""
    model, blocks = adapter.model, adapter.blocks()
    device = _block_device(blocks[0])
    L = len(blocks)
    inputs: list[list[Tensor]] = [[] for _ in range(L)]
    targets: list[list[Tensor]] = [[] for _ in range(L)]
    kwargs: list[dict[str, Any] | None] = [None] * L
    state: dict[str, Any] = {"last": None, "where": torch.device("cpu") if store == "cpu" else device,
                             "dtype": torch.float32 if dtype == "auto" else dtype}

    def keep(t: Tensor) -> Tensor:
        return t.detach().to(state["where"], state["dtype"], copy=True)

    def pre(i: int):
        def hook(module, args, kw):
            if kwargs[i] is None:
                kwargs[i] = {k: v for k, v in kw.items() if k != "hidden_states"}
            h = args[0] if args else kw["hidden_states"]
            inputs[i].append(targets[i - 1][-1] if i > 0 and h is state["last"] else keep(h))
        return hook

    def post(i: int):
        def hook(module, args, out):
            out = _first(out)
            state["last"] = out
            targets[i].append(keep(out))
            if i == L - 1:
                raise _Stop
        return hook

    def decide() -> None:
        """Dtype and place from the first batch; the first batch is converted (sharing kept)."""
        free = _free_bytes(device)
        total32 = BlockCache(inputs, targets, []).nbytes() * (n_batches or 1) * 4 // state["dtype"].itemsize
        fits = (lambda nbytes: free is None or nbytes <= free / 2) if device.type != "cpu" else (lambda n: True)
        if dtype == "auto":
            state["dtype"] = torch.float32 if fits(total32) or device.type == "cpu" else torch.float16
        if store == "auto":
            state["where"] = device if fits(total32 * state["dtype"].itemsize // 4) else torch.device("cpu")
        moved: dict[int, Tensor] = {}
        for lst in (*inputs, *targets):
            if id(lst[0]) not in moved:
                moved[id(lst[0])] = lst[0].to(state["where"], state["dtype"])
            lst[0] = moved[id(lst[0])]

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post(i)) for i, b in enumerate(blocks)]
    try:
        for j, batch in enumerate(tqdm(batches, total=n_batches, desc="fips teacher", disable=not progress,
                                       leave=False, dynamic_ncols=True)):
            try:
                _forward(model, batch)
            except _Stop:
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


def block_loss_step(blocks: list[nn.Module], cache: BlockCache, device: torch.device, generator: torch.Generator):
    """``loss_step`` of the block objective: batch ``order[t]`` (a fresh permutation every pass over the batches);
    sum over blocks of MSE(block(x_in), y_out), backward block by block (the gradients equal those of the sum)."""
    n = len(cache.inputs[0])
    order: list[int] = []
    kwargs = [_to(k, device) for k in cache.kwargs]

    def step(t: int) -> float:
        if not order:
            order.extend(torch.randperm(n, generator=generator).tolist())
        j = order.pop(0)
        total = 0.0
        for b, block in enumerate(blocks):
            p = next(block.parameters())
            x = cache.inputs[b][j].to(device, p.dtype, non_blocking=True)
            y = cache.targets[b][j].to(device, torch.float32, non_blocking=True)
            loss = F.mse_loss(_first(block(x, **kwargs[b])).float(), y)
            loss.backward()
            total += float(loss.detach())
        return total

    return step


def _state(modules: list[SharedFactorLinear]) -> dict[str, Tensor]:
    """Trainable FiPS tensors (U once) for stage checkpoints."""
    out: dict[str, Tensor] = {}
    seen: dict[int, str] = {}
    for i, m in enumerate(modules):
        if id(m.u) not in seen:
            seen[id(m.u)] = f"{i}.u"
            out[f"{i}.u"] = m.u.detach().cpu()
        out[f"{i}.v"] = m.v.weight.detach().cpu()
        out[f"{i}.mask"] = m.v.mask.detach().cpu()
        if m.bias is not None:
            out[f"{i}.bias"] = m.bias.detach().cpu()
    return out


@torch.no_grad()
def _load_state(modules: list[SharedFactorLinear], state: dict[str, Tensor]) -> None:
    for i, m in enumerate(modules):
        if f"{i}.u" in state:
            m.u.copy_(state[f"{i}.u"])
        m.v.weight.copy_(state[f"{i}.v"])
        m.v.mask.copy_(state[f"{i}.mask"])
        if m.bias is not None:
            m.bias.copy_(state[f"{i}.bias"])


@METHODS.register("fips")
class FiPS(Method):
    config_class = FiPSConfig
    needs_calibration = True
    cfg: FiPSConfig

    def objective(self, adapter: ModelAdapter) -> str:
        if self.cfg.objective != "auto":
            return self.cfg.objective
        return "mlp" if isinstance(adapter, LlamaAdapter) else "block"

    def check(self, adapter) -> None:
        super().check(adapter)
        plan_groups(adapter, self.cfg)
        if self.objective(adapter) == "mlp":
            mlp_parent(adapter)

    def apply(self, model, adapter, ctx: CompressContext) -> dict[str, float]:
        cfg = self.cfg
        groups = plan_groups(adapter, cfg)
        objective = self.objective(adapter)
        recipe = cfg.resolved(objective)
        task = ctx.task
        if cfg.finetune_steps > 0 and not hasattr(task, "training_batches"):
            raise ConfigError(f"method.finetune_steps={cfg.finetune_steps}: task family "
                              f"{getattr(task, 'name', type(task).__name__)} provides no training batches")
        teacher = copy.deepcopy(model).eval() if cfg.finetune_steps > 0 and cfg.finetune_loss == "kd" else None
        self.history: list[float] = []
        self.steps_total = 0
        if objective == "block":
            modules, sparsifier = self._block_stage(model, adapter, groups, recipe, ctx)
        else:
            modules, sparsifier = self._mlp_stage(model, adapter, groups, recipe, ctx)
        finetuned = self._finetune(model, modules, teacher, recipe, ctx) if cfg.finetune_steps > 0 else {}
        metrics = {**self._metrics(groups, modules, objective, recipe), **finetuned}
        for p in model.parameters():
            p.requires_grad_(False)
        return metrics

    def n_steps(self, recipe: dict[str, Any], batches_per_epoch: int) -> int:
        return self.cfg.steps if self.cfg.steps is not None else recipe["epochs"] * batches_per_epoch

    # -- stages ------------------------------------------------------------------------------------------------------
    def calibration(self, ctx: CompressContext) -> tuple[Iterable[Any], int | None]:
        task = ctx.task
        if self.cfg.calib_images is not None and hasattr(task, "stratified_calibration_batches"):
            n = -(-min(self.cfg.calib_images, len(task.data.split("train"))) // self.cfg.batch_size)
            return task.stratified_calibration_batches(ctx.seed, self.cfg.calib_images, self.cfg.batch_size), n
        return ctx.calibration_batches(), None

    def _make_sparsifier(self, kind: str, factors: list[MaskedFactor], steps: int) -> Sparsifier:
        c = self.cfg
        return make_sparsifier(kind, factors, c.sparsity, steps, update_every=c.update_every, end=c.update_end,
                               rigl_drop_fraction=c.rigl_drop_fraction, gmp_initial=c.gmp_initial,
                               gmp_accelerated=c.gmp_accelerated, gmp_accel_at=c.gmp_accel_at,
                               gmp_quirk=c.gmp_quirk, block=c.sparsity_block)

    def _block_stage(self, model, adapter, groups, recipe, ctx):
        """All groups at once: teacher cache, SVD init, joint block-wise reconstruction."""
        cfg = self.cfg
        batches, n_batches = self.calibration(ctx)
        cache = capture_block_io(adapter, batches, CACHE_DTYPES[cfg.cache_dtype], cfg.cache_device, n_batches,
                                 ctx.progress)
        modules, params = install_factorised(model, adapter, groups, cfg.overcomplete_tau, ctx.device)
        steps = self.n_steps(recipe, len(cache.inputs[0]))
        self.steps_total = steps
        sparsifier = self._make_sparsifier(recipe["sparsifier"], [m.v for m in modules], steps)
        blocks = adapter.blocks()
        device = _block_device(blocks[0])

        def train() -> dict[str, Any]:
            gen = torch.Generator().manual_seed(ctx.seed)
            hist = train_steps(params, sparsifier, steps, block_loss_step(blocks, cache, device, gen),
                               recipe["lr"], recipe["lr_min"], recipe["weight_decay"], ctx.progress, "fips local")
            return {"state": _state(modules), "history": torch.tensor(hist, dtype=torch.float64)}

        result = ctx.checkpointed("fips_local", train)
        _load_state(modules, result["state"])
        self.history = [float(x) for x in result["history"]]
        del cache
        return modules, sparsifier

    def _mlp_stage(self, model, adapter, groups, recipe, ctx):
        """One MLP at a time, block-wise streamed: the dense MLP's (input, output) pairs, then its training."""
        cfg = self.cfg
        parent = mlp_parent(adapter)
        dtype = torch.float32 if cfg.cache_dtype == "auto" else CACHE_DTYPES[cfg.cache_dtype]
        group_of = {b: gi for gi, g in enumerate(groups) for b in g.blocks}
        built: dict[int, list[SharedFactorLinear]] = {}
        modules: list[SharedFactorLinear] = []
        for p in model.parameters():
            p.requires_grad_(False)
        inputs = capture_block_inputs(adapter, ctx.calibration_batches(), ctx.progress)
        blocks = adapter.blocks()
        sparsifier = None
        for i, block in enumerate(progress_bar(blocks, "fips blocks", enabled=ctx.progress)):
            device = _block_device(block)
            mlp = block.get_submodule(parent)
            xs, ys = [], []

            def record(mod, args, out, xs=xs, ys=ys) -> None:
                out = _first(out)
                xs.append(args[0].detach().reshape(-1, args[0].shape[-1]).to(dtype))
                ys.append(out.detach().reshape(-1, out.shape[-1]).to(dtype))

            handle = mlp.register_forward_hook(record)
            kwargs = _to(inputs.block_kwargs[i], device)
            try:
                with torch.no_grad():
                    for j, h in enumerate(inputs.hidden):
                        inputs.hidden[j] = _first(block(h.to(device), **kwargs))
            finally:
                handle.remove()
            x, y = torch.cat(xs), torch.cat(ys)
            del xs, ys
            gi = group_of[i]
            g = groups[gi]
            if gi not in built:
                built[gi] = factorize_group(adapter, g, cfg.overcomplete_tau, ctx.device)[1]
            mine = [(m, new) for m, new in zip(g.layers, built[gi]) if m.block == i]
            for m, new in mine:
                adapter.replace(m.path, new)
            mods = [new for _, new in mine]
            modules += mods
            params = fips_parameters(mods)
            for p in params:
                p.requires_grad_(True)
            per_step = min(cfg.tokens_per_step, x.shape[0])
            steps = self.n_steps(recipe, max(1, x.shape[0] // per_step))
            self.steps_total += steps
            sparsifier = self._make_sparsifier(recipe["sparsifier"], [m.v for m in mods], steps)

            def train(mlp=mlp, x=x, y=y, mods=mods, params=params, sparsifier=sparsifier, i=i, steps=steps,
                      per_step=per_step) -> dict[str, Any]:
                n = x.shape[0]
                order: list[Tensor] = []
                gen = torch.Generator().manual_seed(ctx.seed * 100_003 + i)  # per MLP: a resumed run draws the same

                def step(t: int) -> float:
                    if not order:
                        perm = torch.randperm(n, generator=gen)
                        order.extend(perm[k:k + per_step] for k in range(0, n - per_step + 1, per_step))
                    idx = order.pop(0).to(x.device)
                    p = mods[0].u
                    loss = F.mse_loss(_first(mlp(x[idx].to(p.dtype))).float(), y[idx].float())
                    loss.backward()
                    return float(loss.detach())

                hist = train_steps(params, sparsifier, steps, step, recipe["lr"], recipe["lr_min"],
                                   recipe["weight_decay"], ctx.progress, f"fips mlp {i}")
                return {"state": _state(mods), "history": torch.tensor(hist, dtype=torch.float64)}

            result = ctx.checkpointed(f"fips_mlp{i}", train)
            _load_state(mods, result["state"])
            self.history += [float(v) for v in result["history"]]
            for p in params:
                p.requires_grad_(False)
            del x, y
        return modules, sparsifier

    def _finetune(self, model, modules, teacher, recipe, ctx) -> dict[str, float]:
        cfg = self.cfg
        task = ctx.task
        if cfg.finetune_params == "all":
            params = [p for p in model.parameters()]
        else:
            params = fips_parameters(modules)
        for p in params:
            p.requires_grad_(True)
        kind = "rigl" if recipe["sparsifier"] == "rigl" else "magnitude"
        sparsifier = self._make_sparsifier(kind, [m.v for m in modules], cfg.finetune_steps)
        batches = task.training_batches(ctx.seed, cfg.finetune_batch_size)

        def step(t: int) -> float:
            x, y = next(batches)
            logits = _first(model(x)).float()
            if teacher is not None:
                with torch.no_grad():
                    target = _first(teacher(x)).float()
                loss = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target, -1), log_target=True,
                                reduction="batchmean")
            else:
                loss = F.cross_entropy(logits, y)
            loss.backward()
            return float(loss.detach())

        def train() -> dict[str, Any]:
            model.train()
            try:
                hist = train_steps(params, sparsifier, cfg.finetune_steps, step, cfg.finetune_lr,
                                   cfg.finetune_lr_min, cfg.finetune_weight_decay, ctx.progress, "fips finetune")
            finally:
                model.eval()
            return {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "history": torch.tensor(hist, dtype=torch.float64)}

        result = ctx.checkpointed("fips_finetune", train)
        with torch.no_grad():
            model.load_state_dict(result["model"])
        hist = [float(v) for v in result["history"]]
        return {"method/finetune_loss_first": hist[0], "method/finetune_loss_last": hist[-1]}

    def _metrics(self, groups: list[Group], modules: list[SharedFactorLinear], objective: str,
                 recipe: dict[str, Any]) -> dict[str, float]:
        nnz = sum(int(m.v.mask.sum()) for m in modules)
        total = sum(m.v.mask.numel() for m in modules)
        out: dict[str, float] = {f"method/rank/group{j}": float(g.rank) for j, g in enumerate(groups)}
        out.update({
            "method/groups": float(len(groups)),
            "method/u_params": float(sum(g.d * g.rank for g in groups)),
            "method/v_nnz": float(nnz),
            "method/v_sparsity": 1.0 - nnz / total if total else 0.0,
            # CSR of every V: int32 column index per non-zero + int32 row pointers
            "method/index_bytes_csr": float(4 * nnz + sum(4 * (m.v.rows + 1) for m in modules)),
            "method/steps": float(self.steps_total),
            "method/objective_block": float(objective == "block"),
        })
        if self.history:
            out["method/loss_first"] = self.history[0]
            out["method/loss_last"] = self.history[-1]
        return out


def mlp_parent(adapter: ModelAdapter) -> str:
    """The path, inside a block, of the module holding all MLP roles (e.g. ``mlp``)."""
    parents = {adapter.roles[r].rpartition(".")[0] for r in adapter.mlp_roles}
    if len(parents) != 1 or "" in parents:
        raise ConfigError(f"fips objective mlp needs the MLP roles under one submodule; "
                          f"{type(adapter).__name__} has {sorted(parents)}")
    return parents.pop()
