"""AAFM and GFM (Yu & Wu, "Compressing Transformers: Features Are Low-Rank, but Weights Are Not!", AAAI 2023):
low rank in the space of a layer's *output features*, not of its weights.

AFM, one layer y = W x + b (W: d2 x d1; a conv's output channels at every position): from the calibration
outputs, mean y_bar and covariance C = E[y y^T] - y_bar y_bar^T (float64 running sums); U_k = the top-k
eigenvectors of C. The layer becomes x -> U_k (U_k^T W x) + b' with b' = U_k U_k^T b + (I - U_k U_k^T) y_bar,
i.e. y is replaced by its projection y_bar + U_k U_k^T (y - y_bar) (the official demo ``afm_mlp.py`` keeps the inner
bias U_k^T b apart; here it is folded into b', which computes the same and stores k fewer numbers): a
``LowRankLinear`` (u = U_k, v = U_k^T W) or ``LowRankConv2d`` (a k-channel conv, then 1 x 1). It stores
k (d1 + d2) weights, so it saves only below k = d1 d2 / (d1 + d2); a layer can also stay dense.

``aafm`` (adaptive rank allocation; the paper does not give its exact procedure, so this is a reconstruction):
for every layer of the scope and ``rank_grid`` candidate ranks (j / G of its useful maximum, j = 1..G, and rank 1),
the sensitivity Delta = mean (f_l,k(x) - f(x))^2 / mean f(x)^2 of the model output when only that layer is
projected to rank k (``sensitivity: output``, one forward per candidate over
``sensitivity_images`` calibration inputs; ``energy`` uses the eigenvalue tail sum_{i>k} lambda_i / tr C of the
layer instead, no forwards). Starting from the dense model, the move (layer, lower rank) with the smallest increase
of Delta per parameter saved is taken (over the lower convex hull of each layer's curve) until the scope fits the
budget (1 - ratio); the budget left by the last move goes back, one rank at a time, to the layers whose
(interpolated) Delta falls most per parameter. ``allocation: uniform`` gives every layer the same fraction of its
weights instead (plain AFM).

``gfm`` = aafm followed by Global Feature Mimicking: every parameter of the compressed model (``gfm_params``) is
trained for ``epochs`` passes over the calibration inputs to match the dense model's outputs (MSE on the
logits), label-free; AdamW, cosine schedule, eval mode (``methods.reconstruction.train_steps``). At full rank the
compressed model is the dense one, the loss is at float rounding level and GFM leaves it there (steps with
loss < ``tol`` x mean(dense output^2) are skipped: Adam would turn rounding noise into lr-sized steps).

Calibration: on tasks with class-stratified batches (``stratified_batches``: timm_image), ``calib_images``
class-stratified unlabelled train images (2,000: the paper's headline DeiT-B setting); null, or other tasks: the
task's calibration set.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import ConfigError
from core.progress import progress_bar
from methods.base import METHODS, CompressContext, Method, MethodConfig
from methods.calibration import forward_batch
from methods.modules import LowRankConv2d, LowRankLinear
from methods.reconstruction import train_steps

ALLOCATIONS = ("adaptive", "uniform")
SENSITIVITIES = ("output", "energy")


@dataclass
class AAFMConfig(MethodConfig):
    allocation: str = "adaptive"  # adaptive (AAFM) | uniform (AFM: the same fraction of every layer)
    sensitivity: str = "output"  # output (model output change per candidate) | energy (eigenvalue tail)
    rank_grid: int = 8  # candidate ranks per layer for the sensitivity
    sensitivity_images: int | None = 256  # calibration inputs (images / sequences) for the sensitivity; null: all
    calib_images: int | None = 2000  # class-stratified train images (image tasks); null: the task's calibration
    batch_size: int = 64  # images per calibration batch

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = []
        if self.allocation not in ALLOCATIONS:
            bad.append(f"method.allocation={self.allocation!r}; valid: {', '.join(ALLOCATIONS)}")
        if self.sensitivity not in SENSITIVITIES:
            bad.append(f"method.sensitivity={self.sensitivity!r}; valid: {', '.join(SENSITIVITIES)}")
        for key in ("rank_grid", "batch_size", "sensitivity_images", "calib_images"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                bad.append(f"method.{key}={getattr(self, key)} must be >= 1")
        bad += self._more_checks()
        if bad:
            raise ConfigError("; ".join(bad))

    def _more_checks(self) -> list[str]:
        return []


@dataclass
class GFMConfig(AAFMConfig):
    epochs: int = 10  # passes of GFM over the calibration batches
    lr: float = 1e-4
    lr_min: float = 0.0
    weight_decay: float = 0.0  # 0: at full rank GFM keeps the dense model
    gfm_params: str = "all"  # all | compressed (only the factorised layers)
    tol: float = 1e-10  # a step whose loss is below tol x mean(dense output^2) is skipped (converged)

    def _more_checks(self) -> list[str]:
        bad = []
        if self.epochs < 0:
            bad.append(f"method.epochs={self.epochs} must be >= 0")
        if not self.lr > 0 or self.lr_min < 0 or self.weight_decay < 0:
            bad.append(f"method.lr={self.lr} > 0, lr_min={self.lr_min} >= 0, weight_decay={self.weight_decay} >= 0")
        if self.tol < 0:
            bad.append(f"method.tol={self.tol} must be >= 0")
        if self.gfm_params not in ("all", "compressed"):
            bad.append(f"method.gfm_params={self.gfm_params!r}; valid: all, compressed")
        return bad


# -- statistics and the AFM factorisation -------------------------------------------------------------------------
def _features(out: Tensor, layer: nn.Module) -> Tensor:
    """Output features as rows: (..., d2) for a linear, channels-last rows for a conv."""
    if isinstance(layer, nn.Conv2d):
        return out.detach().movedim(1, -1).reshape(-1, out.shape[1])
    return out.detach().reshape(-1, out.shape[-1])


@dataclass
class OutputStats:
    """Running float64 sums over output rows: ``total`` (d2), ``outer`` (d2 x d2), ``count``."""

    total: Tensor
    outer: Tensor
    count: int = 0

    @classmethod
    def zeros(cls, dim: int, device) -> "OutputStats":
        return cls(torch.zeros(dim, dtype=torch.float64, device=device),
                   torch.zeros(dim, dim, dtype=torch.float64, device=device))

    def add(self, rows: Tensor) -> None:
        rows = rows.to(self.outer.device, torch.float64)
        self.total += rows.sum(0)
        self.outer.addmm_(rows.T, rows)
        self.count += rows.shape[0]

    def mean(self) -> Tensor:
        return self.total / max(self.count, 1)

    def eig(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues (descending, clamped at 0) and eigenvectors (columns) of the covariance."""
        mean = self.mean()
        cov = self.outer / max(self.count, 1) - torch.outer(mean, mean)
        cov = (cov + cov.T) / 2
        vals, vecs = torch.linalg.eigh(cov)
        return vals.flip(0).clamp_min(0), vecs.flip(1)


def out_features(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def in_size(layer: nn.Module) -> int:
    """d1: the weight's row length (in, or in * kh * kw for a conv)."""
    return layer.weight[0].numel()


def max_useful_rank(layer: nn.Module) -> int:
    """Largest k whose factors store fewer weights than the dense layer (and k <= d2)."""
    d1, d2 = in_size(layer), out_features(layer)
    return min(d2, (d1 * d2 - 1) // (d1 + d2))


def factor_params(layer: nn.Module, rank: int | None) -> int:
    """Weights stored by ``layer`` at ``rank`` (None: dense)."""
    d1, d2 = in_size(layer), out_features(layer)
    return d1 * d2 if rank is None else rank * (d1 + d2)


@torch.no_grad()
def collect_output_stats(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[Any],
                         device: torch.device, progress: bool = False) -> dict[str, OutputStats]:
    """Output statistics of every layer of ``layers`` over ``batches`` (one pass), kept on ``device``."""
    stats = {path: OutputStats.zeros(out_features(layer), device) for path, layer in layers.items()}
    handles = [layer.register_forward_hook(lambda m, a, out, s=stats[path]: s.add(_features(out, m)))
               for path, layer in layers.items()]
    try:
        for batch in progress_bar(batches, "afm statistics", enabled=progress):
            forward_batch(model, batch)
    finally:
        for h in handles:
            h.remove()
    return stats


def _project_hook(basis: Tensor, mean: Tensor):
    """Forward hook replacing a layer's output y by y_bar + U U^T (y - y_bar)."""
    def hook(module, args, out):
        rows = out.movedim(1, -1) if isinstance(module, nn.Conv2d) else out
        b, m = basis.to(rows.dtype), mean.to(rows.dtype)
        proj = (rows - m) @ b @ b.T + m
        return proj.movedim(-1, 1) if isinstance(module, nn.Conv2d) else proj
    return hook


@torch.no_grad()
def afm_layer(layer: nn.Module, vecs: Tensor, mean: Tensor, rank: int) -> nn.Module:
    """The AFM replacement of ``layer`` at ``rank`` (``vecs``: eigenvectors as columns, descending)."""
    w, dt, dev = layer.weight, layer.weight.dtype, layer.weight.device
    u = vecs[:, :rank].to(dev, torch.float64)
    mean = mean.to(dev, torch.float64)
    wm = w.detach().to(torch.float64).flatten(1)
    v = u.T @ wm
    b = layer.bias.detach().to(torch.float64) if layer.bias is not None else torch.zeros_like(mean)
    bias = u @ (u.T @ b) + mean - u @ (u.T @ mean)
    if isinstance(layer, nn.Linear):
        return LowRankLinear.from_factors(u.to(dt), v.to(dt), bias.to(dt))
    conv = LowRankConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, rank, layer.stride,
                         layer.padding, layer.dilation, bias=True).to(dev, dt)
    conv.u.copy_(u.reshape(conv.u.shape))
    conv.v.copy_(v.reshape(conv.v.shape))
    conv.bias.copy_(bias)
    return conv


def _output(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


def model_output(model: nn.Module, batch: Any) -> Tensor:
    """The model's output tensor (logits) on ``batch``, in float32."""
    return _output(forward_batch(model, batch)).float()


@torch.no_grad()
def model_outputs(model: nn.Module, batches: list[Any]) -> list[Tensor]:
    return [model_output(model, b).detach() for b in batches]


# -- rank allocation ----------------------------------------------------------------------------------------------
def candidate_ranks(cap: int, grid: int) -> list[int]:
    """Rank 1 and the distinct ranks round(j cap / grid), j = 1..grid, ascending (rank 1 keeps every budget that
    ``check`` accepts reachable)."""
    return sorted({1} | {max(1, round(j * cap / grid)) for j in range(1, grid + 1)}) if cap >= 1 else []


def allocate(options: dict[str, list[tuple[int | None, int, float]]], budget: int, unit: dict[str, int]
             ) -> dict[str, int | None]:
    """Ranks (None = dense) minimising the summed sensitivity within ``budget`` stored weights.

    ``options[layer]`` = (rank, params, delta) candidates, the dense one first (params largest, delta 0);
    ``unit[layer]`` = params per unit of rank (d1 + d2). Greedy over the lower convex hull of every layer's
    (params, delta) curve until the budget holds, then the budget left goes back one rank at a time to the layers
    whose linearly interpolated delta falls most per parameter."""
    opts = {k: sorted(v, key=lambda o: -o[1]) for k, v in options.items()}
    state = {k: 0 for k in opts}
    total = sum(opts[k][0][1] for k in opts)
    while total > budget:
        best = None
        for k, cands in opts.items():
            cur = cands[state[k]]
            for j in range(state[k] + 1, len(cands)):
                saved = cur[1] - cands[j][1]
                if saved <= 0:
                    continue
                slope = (cands[j][2] - cur[2]) / saved
                if best is None or slope < best[0]:
                    best = (slope, k, j)
        if best is None:
            raise ConfigError(f"the budget ({budget} weights) is below what the lowest candidate ranks store "
                              f"({total}); lower method.ratio")
        _, k, j = best
        total -= opts[k][state[k]][1] - opts[k][j][1]
        state[k] = j
    ranks = {k: opts[k][state[k]][0] for k in opts}

    def delta_at(k: str, r: int) -> float:
        pts = sorted((o[0], o[2]) for o in opts[k] if o[0] is not None)
        if r >= pts[-1][0]:
            return pts[-1][1]
        for (r0, d0), (r1, d1) in zip(pts, pts[1:]):
            if r0 <= r <= r1:
                return d0 + (d1 - d0) * (r - r0) / (r1 - r0)
        return pts[0][1]

    caps = {k: max(o[0] for o in opts[k] if o[0] is not None) for k in opts if any(o[0] for o in opts[k])}
    heap = []
    for k, r in ranks.items():
        if r is not None and r < caps[k]:
            heapq.heappush(heap, (-(delta_at(k, r) - delta_at(k, r + 1)) / unit[k], k))
    left = budget - total
    while heap:
        _, k = heapq.heappop(heap)
        r = ranks[k]
        if unit[k] > left or r >= caps[k]:
            continue
        ranks[k] = r + 1
        left -= unit[k]
        if r + 1 < caps[k]:
            heapq.heappush(heap, (-(delta_at(k, r + 1) - delta_at(k, r + 2)) / unit[k], k))
    return ranks


@METHODS.register("aafm")
class AAFM(Method):
    config_class = AAFMConfig
    cfg: AAFMConfig

    def check(self, adapter) -> None:
        super().check(adapter)
        scope = adapter.scope(self.cfg.scope)
        seen: dict[int, str] = {}
        for path, layer in scope.items():
            ok = type(layer) is nn.Linear or (type(layer) is nn.Conv2d and layer.groups == 1
                                              and not isinstance(layer.padding, str)
                                              and layer.padding_mode == "zeros")
            if not ok:
                raise ConfigError(f"{self.name} factorises nn.Linear and ungrouped, zero-padded nn.Conv2d layers; "
                                  f"{path} is {type(layer).__name__}")
            if id(layer.weight) in seen:
                raise ConfigError(f"{self.name}: {path} shares its weight with {seen[id(layer.weight)]}")
            seen[id(layer.weight)] = path
        dense = sum(factor_params(m, None) for m in scope.values())
        low = sum(factor_params(m, 1) if max_useful_rank(m) >= 1 else factor_params(m, None) for m in scope.values())
        if low > (1 - self.cfg.ratio) * dense:
            raise ConfigError(f"method.ratio={self.cfg.ratio}: even rank 1 everywhere keeps {low / dense:.3f} of the "
                              f"scope's weights")

    def calibration(self, ctx: CompressContext) -> list[Any]:
        """``calib_images`` class-stratified train images where the task has them, else its calibration set."""
        if self.cfg.calib_images is not None and ctx.provides("stratified_batches"):
            batches, _ = ctx.stratified_batches(self.cfg.calib_images, self.cfg.batch_size)
        else:
            batches = ctx.calibration_batches()
        out = list(batches)
        if not out:
            raise ConfigError("the task yielded no calibration batch")
        return out

    def apply(self, model, adapter, ctx: CompressContext) -> dict[str, float]:
        cfg = self.cfg
        scope = adapter.scope(cfg.scope)
        batches = self.calibration(ctx)
        device = next(iter(scope.values())).weight.device
        stats = ctx.checkpointed("afm_stats", lambda: {
            p: {"total": s.total, "outer": s.outer, "count": torch.tensor(s.count)}
            for p, s in collect_output_stats(model, scope, batches, device, ctx.progress).items()})
        eigs = {p: OutputStats(s["total"], s["outer"], int(s["count"])).eig() for p, s in stats.items()}
        means = {p: s["total"] / max(int(s["count"]), 1) for p, s in stats.items()}
        dense = sum(factor_params(m, None) for m in scope.values())
        budget = dense - int(round(cfg.ratio * dense))
        if cfg.allocation == "uniform":
            ranks: dict[str, int | None] = {}
            for p, m in scope.items():
                r = int((1 - cfg.ratio) * factor_params(m, None) // (in_size(m) + out_features(m)))
                ranks[p] = max(1, min(r, max_useful_rank(m))) if max_useful_rank(m) >= 1 else None
        else:
            options = self.options(model, scope, eigs, means, batches, ctx)
            ranks = allocate(options, budget, {p: in_size(m) + out_features(m) for p, m in scope.items()})
        self.ranks = ranks
        for p, m in scope.items():
            if ranks[p] is not None:
                adapter.replace(p, afm_layer(m, eigs[p][1], means[p], ranks[p]))
        kept = [r for r in ranks.values() if r is not None]
        out = {"method/layers_factored": float(len(kept)), "method/layers_dense": float(len(ranks) - len(kept)),
               "method/rank_mean": sum(kept) / len(kept) if kept else 0.0,
               "method/rank_min": float(min(kept)) if kept else 0.0}
        out.update(self.after(model, adapter, batches, ctx, scope))
        return out

    def options(self, model, scope, eigs, means, batches, ctx) -> dict[str, list[tuple[int | None, int, float]]]:
        """(rank, params, sensitivity) candidates per layer, dense first."""
        cfg = self.cfg
        out: dict[str, list[tuple[int | None, int, float]]] = {}
        if cfg.sensitivity == "output":
            sens = _take(batches, cfg.sensitivity_images, max(cfg.batch_size, max(map(_size, batches))))
            reference = model_outputs(model, sens)
            scale = sum(float(r.pow(2).mean()) for r in reference) / len(reference) or 1.0
        todo = [(p, r) for p, m in scope.items() for r in candidate_ranks(max_useful_rank(m), cfg.rank_grid)]
        bar = progress_bar(todo, f"{self.name} sensitivity", enabled=ctx.progress)
        for p, m in scope.items():
            out[p] = [(None, factor_params(m, None), 0.0)]
        for p, r in bar:
            m = scope[p]
            vals, vecs = eigs[p]
            if cfg.sensitivity == "energy":
                delta = float(vals[r:].sum() / vals.sum().clamp_min(1e-30))
            else:
                handle = m.register_forward_hook(_project_hook(vecs[:, :r].to(m.weight.device), means[p]
                                                               .to(m.weight.device)))
                try:
                    with torch.no_grad():
                        delta = sum(float((model_output(model, b) - ref).pow(2).mean())
                                    for b, ref in zip(sens, reference))
                finally:
                    handle.remove()
                delta = delta / len(sens) / scale
            out[p].append((r, factor_params(m, r), delta))
        return out

    def after(self, model, adapter, batches, ctx, scope) -> dict[str, float]:
        return {}


def _size(batch: Any) -> int:
    return len(next(iter(batch.values()))) if isinstance(batch, dict) else len(batch)


def _cat(batches: list[Any]) -> Any:
    if isinstance(batches[0], dict):
        return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    return torch.cat(batches)


def _shape(batch: Any) -> Any:
    if isinstance(batch, dict):
        return tuple((k, tuple(v.shape[1:])) for k, v in batch.items())
    return tuple(batch.shape[1:])


def _take(batches: list[Any], n: int | None, per_batch: int) -> list[Any]:
    """The first ``n`` inputs of ``batches`` (all when None), regrouped into batches of up to ``per_batch``
    inputs where their shapes agree (fewer, larger forwards for the sensitivity)."""
    pieces, count = [], 0
    for b in batches:
        size = _size(b)
        if n is not None and count + size > n:
            b = {k: v[:n - count] for k, v in b.items()} if isinstance(b, dict) else b[:n - count]
            size = n - count
        if size > 0:
            pieces.append(b)
        count += size
        if n is not None and count >= n:
            break
    out: list[Any] = []
    group: list[Any] = []
    for b in pieces:
        if group and (_shape(group[0]) != _shape(b) or sum(map(_size, group)) + _size(b) > per_batch):
            out.append(_cat(group))
            group = []
        group.append(b)
    if group:
        out.append(_cat(group))
    return out


@METHODS.register("gfm")
class GFM(AAFM):
    config_class = GFMConfig
    cfg: GFMConfig

    def apply(self, model, adapter, ctx: CompressContext) -> dict[str, float]:
        self._teacher: list[Tensor] | None = None
        self._model = model
        return super().apply(model, adapter, ctx)

    def calibration(self, ctx: CompressContext) -> list[Any]:
        batches = super().calibration(ctx)
        # the dense model's outputs, before any layer is replaced (on the CPU: they wait for the GFM stage)
        self._teacher = [t.cpu() for t in model_outputs(self._model, batches)]
        return batches

    def after(self, model, adapter, batches, ctx, scope) -> dict[str, float]:
        cfg = self.cfg
        steps = cfg.epochs * len(batches)
        if steps == 0:
            return {}
        if cfg.gfm_params == "all":
            params = list(model.parameters())
        else:
            params = [p for path in scope for p in model.get_submodule(path).parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        teacher = self._teacher
        power = [float(t.pow(2).mean()) for t in teacher]
        gen = torch.Generator().manual_seed(ctx.seed)
        order: list[int] = []

        def step(t: int) -> float:
            if not order:
                order.extend(torch.randperm(len(batches), generator=gen).tolist())
            j = order.pop(0)
            out = model_output(model, batches[j])
            loss = F.mse_loss(out, teacher[j].to(out.device))
            value = float(loss.detach())
            if value >= cfg.tol * power[j]:  # at rounding-level error Adam would turn noise into lr-sized steps
                loss.backward()
            return value

        def train() -> dict[str, Any]:
            hist = train_steps(params, None, steps, step, cfg.lr, cfg.lr_min, cfg.weight_decay, ctx.progress, "gfm")
            return {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "history": torch.tensor(hist, dtype=torch.float64)}

        result = ctx.checkpointed("gfm", train)
        with torch.no_grad():
            model.load_state_dict(result["model"])
        for p in model.parameters():
            p.requires_grad_(False)
        hist = [float(v) for v in result["history"]]
        self.history = hist
        return {"method/gfm_steps": float(steps), "method/gfm_loss_first": hist[0], "method/gfm_loss_last": hist[-1]}
