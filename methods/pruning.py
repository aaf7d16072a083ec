"""Pruning at initialisation with Synaptic-Flow semantics (Tanaka et al., arXiv 2006.05467): ``mag``, ``random``,
``snip``, ``grasp``, ``synflow``.

The scope's Linear/Conv2d weights (stem and classifier included; biases and norms stay dense) get one global mask.
Scores are computed in eval mode on the freshly initialised model; for ``iterations`` = E rounds the model is scored
with the current masks and the mask is recomputed from scratch at density (1 - ratio)^(k / E) (the exponential
schedule), ending at exactly ``kept_count(n, ratio)`` weights. Between rounds only the masks change: the weights
stay as initialised (a weight masked in one round and kept in a later one starts training at its initial value, as
in Synaptic-Flow's loop); the pruned weights are zeroed after the last round. The masked model is then trained with
the task's recipe, the masks re-imposed after every optimizer step.

Scores (higher is kept):
  mag      |w|
  random   standard normal noise, drawn again every round
  snip     |sum over batches of dL/dW (.) w|  (the mask gradient; abs after the sum)
  grasp    (H g) (.) w with g = sum over batches of dL/dw, outputs divided by ``temperature`` (keep the largest,
           i.e. remove the largest -w (.) Hg of the GraSP paper)
  synflow  |dR/dw (.) w|, R = sum of the output of the network with every parameter and buffer replaced by its
           absolute value, on one all-ones input (no data); float64 by default
Data-driven scores (snip, grasp) use the task's calibration data: 10 unaugmented training images per class.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.compressed import CompressedModule
from core.errors import ConfigError
from methods.base import METHODS, CompressContext, Method, MethodConfig
from methods.magnitude import global_score_masks, kept_count
from methods.modules import MaskedConv2d, MaskedLinear, masked_from_dense

Masked = (MaskedLinear, MaskedConv2d)


# -- scores --------------------------------------------------------------------------------------------------------
def magnitude_scores(layers: list[nn.Module]) -> list[Tensor]:
    """|w (.) mask|: the magnitudes of the weights the current masks keep."""
    return [layer.masked_weight().detach().abs() for layer in layers]


def random_scores(layers: list[nn.Module], generator: torch.Generator) -> list[Tensor]:
    return [torch.randn(layer.weight.shape, generator=generator, dtype=torch.float64) for layer in layers]


def snip_scores(model: nn.Module, layers: list[nn.Module], batches: Iterable[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """|sum_b dL_b/dW_eff (.) w| with L_b the mean cross-entropy of batch b (W_eff = w (.) mask, masks at 1)."""
    weights = [layer.weight for layer in layers]
    total = [torch.zeros_like(w) for w in weights]
    for x, y in batches:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), weights)
        total = [t + g for t, g in zip(total, grads)]
    return [(t * w).detach().abs() for t, w in zip(total, weights)]


def grasp_scores(model: nn.Module, layers: list[nn.Module], batches: Iterable[tuple[Tensor, Tensor]],
                 temperature: float) -> list[Tensor]:
    """(H g) (.) w: g = sum_b dL_b/dw, Hg = sum_b d(g . dL_b/dw)/dw, L_b the cross-entropy of logits / T."""
    weights = [layer.weight for layer in layers]
    batches = list(batches)

    def loss(x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x) / temperature, y)

    g = [torch.zeros_like(w) for w in weights]
    for x, y in batches:
        g = [a + b for a, b in zip(g, torch.autograd.grad(loss(x, y), weights))]
    hg = [torch.zeros_like(w) for w in weights]
    for x, y in batches:
        grads = torch.autograd.grad(loss(x, y), weights, create_graph=True)
        dot = sum((gi.detach() * gr).sum() for gi, gr in zip(g, grads))
        hg = [a + b for a, b in zip(hg, torch.autograd.grad(dot, weights))]
    return [(h * w).detach() for h, w in zip(hg, weights)]


def linearized_copy(model: nn.Module, double: bool = True) -> nn.Module:
    """An eval-mode copy of ``model`` (float64 when ``double``) with every parameter and buffer replaced by its
    absolute value: SynFlow's network, whose output on an all-ones input is R = sum(f(1; |theta|))."""
    net = copy.deepcopy(model).eval()
    if double:
        net = net.double()
    with torch.no_grad():
        for t in [*net.parameters(), *net.buffers()]:
            if t.is_floating_point():
                t.abs_()
    return net


def synflow_scores(net: nn.Module, paths: list[str], input_shape: tuple[int, ...]) -> list[Tensor]:
    """|dR/dw (.) w| for the weights at ``paths`` of a ``linearized_copy``; ``input_shape`` excludes the batch."""
    ref = next(iter(net.parameters()))
    weights = [net.get_submodule(p).weight for p in paths]
    out = net(torch.ones(1, *input_shape, dtype=ref.dtype, device=ref.device))
    grads = torch.autograd.grad(out.sum(), weights)
    return [(g * w).detach().abs() for g, w in zip(grads, weights)]


def labelled_calibration(ctx: CompressContext) -> list[tuple[Tensor, Tensor]]:
    """The task's (x, y) calibration batches (10 training images per class for the image tasks); ``ConfigError``
    where the task has no labels."""
    return list(ctx.labelled_calibration_batches())


def enforce_masks(model: nn.Module) -> None:
    """Zero every masked-out weight (after every optimizer step)."""
    for module in model.modules():
        if isinstance(module, Masked):
            module.enforce_mask()


def check_prunable(method: Method, adapter) -> None:
    """The scope holds only plain nn.Linear / nn.Conv2d layers (the masked layers replace them)."""
    for path, layer in adapter.scope(method.cfg.scope).items():
        if isinstance(layer, CompressedModule) or not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise ConfigError(f"{method.name} prunes nn.Linear and nn.Conv2d weights; {path} is "
                              f"{type(layer).__name__}")
    n = sum(layer.weight.numel() for layer in adapter.scope(method.cfg.scope).values())
    if kept_count(n, method.cfg.ratio) < 1:
        raise ConfigError(f"method.ratio={method.cfg.ratio} keeps no weight of {n}")


def density_metrics(paths: list[str], layers: list[nn.Module]) -> dict[str, float]:
    """Fraction of weights kept per layer (``prune/density/<path>``), to spot layer collapse."""
    return {f"prune/density/{p}": float(layer.mask.float().mean()) for p, layer in zip(paths, layers)}


# -- the methods ---------------------------------------------------------------------------------------------------
@dataclass
class PruneAtInitConfig(MethodConfig):
    iterations: int = 1  # score-and-mask rounds, exponential density schedule (Synaptic-Flow: 100 for synflow)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.iterations < 1:
            raise ConfigError(f"method.iterations={self.iterations} must be >= 1")


class PruneAtInit(Method):
    """Mask the scope by a score at initialisation, then train with the masks enforced."""

    config_class = PruneAtInitConfig
    cfg: PruneAtInitConfig
    train_time = True

    def check(self, adapter) -> None:
        super().check(adapter)
        check_prunable(self, adapter)

    def scorer(self, model: nn.Module, paths: list[str], layers: list[nn.Module], ctx: CompressContext
               ) -> Callable[[], list[Tensor]]:
        """A function scoring ``layers`` (the masked scope of ``model``, at ``paths``) with their current masks."""
        raise NotImplementedError

    def apply(self, model, adapter, ctx: CompressContext) -> dict[str, Any]:
        scope = adapter.scope(self.cfg.scope)
        paths = list(scope)
        layers = [masked_from_dense(layer) for layer in scope.values()]
        for path, layer in zip(paths, layers):
            adapter.replace(path, layer)
        score = self.scorer(model, paths, layers, ctx)
        n = sum(layer.weight.numel() for layer in layers)
        n_final = kept_count(n, self.cfg.ratio)
        model.eval()
        for k in range(1, self.cfg.iterations + 1):
            scores = score()
            if any(not torch.isfinite(s).all() for s in scores):
                raise FloatingPointError(f"{self.name}: non-finite pruning scores in round {k}")
            n_keep = n_final if k == self.cfg.iterations else round(n * (n_final / n) ** (k / self.cfg.iterations))
            for layer, mask in zip(layers, global_score_masks(scores, n_keep)):
                layer.mask.copy_(mask)  # masks only: the weights stay intact between rounds
        for layer in layers:
            layer.enforce_mask()
        kept = sum(int(layer.mask.sum()) for layer in layers)
        return {"method/pruned_weights": n - kept, **density_metrics(paths, layers)}

    def after_optimizer_step(self, model: nn.Module) -> None:
        enforce_masks(model)


@dataclass
class MagConfig(PruneAtInitConfig):
    """No fields beyond PruneAtInitConfig's."""


@METHODS.register("mag")
class Mag(PruneAtInit):
    """Global magnitude pruning at initialisation (Synaptic-Flow's "mag"; ``magnitude`` prunes a trained model)."""

    config_class = MagConfig

    def scorer(self, model, paths, layers, ctx):
        return lambda: magnitude_scores(layers)


@dataclass
class RandomConfig(PruneAtInitConfig):
    """No fields beyond PruneAtInitConfig's."""


@METHODS.register("random")
class Random(PruneAtInit):
    """Random pruning at initialisation: a global threshold on i.i.d. noise (about uniform density per layer)."""

    config_class = RandomConfig

    def scorer(self, model, paths, layers, ctx):
        return lambda: random_scores(layers, ctx.generator)


@dataclass
class SnipConfig(PruneAtInitConfig):
    """No fields beyond PruneAtInitConfig's."""


@METHODS.register("snip")
class Snip(PruneAtInit):
    """SNIP (Lee et al., arXiv 1810.02340): connection sensitivity |g (.) w| on the calibration batches."""

    config_class = SnipConfig

    def scorer(self, model, paths, layers, ctx):
        data = labelled_calibration(ctx)
        return lambda: snip_scores(model, layers, data)


@dataclass
class GraspConfig(PruneAtInitConfig):
    temperature: float = 200.0  # logits are divided by it (Synaptic-Flow: 200)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.temperature > 0:
            raise ConfigError(f"method.temperature={self.temperature} must be > 0")


@METHODS.register("grasp")
class Grasp(PruneAtInit):
    """GraSP (Wang et al., arXiv 2002.07376): keep the largest (H g) (.) w, preserving gradient flow."""

    config_class = GraspConfig
    cfg: GraspConfig

    def scorer(self, model, paths, layers, ctx):
        data = labelled_calibration(ctx)
        return lambda: grasp_scores(model, layers, data, self.cfg.temperature)


@dataclass
class SynflowConfig(PruneAtInitConfig):
    iterations: int = 100
    double: bool = True  # score in float64 (deep or wide nets overflow or underflow in float32)


@METHODS.register("synflow")
class Synflow(PruneAtInit):
    """SynFlow (Tanaka et al., arXiv 2006.05467): iterative synaptic-flow conservation, data-free."""

    config_class = SynflowConfig
    cfg: SynflowConfig

    def scorer(self, model, paths, layers, ctx):
        net = linearized_copy(model, self.cfg.double)
        twins = [net.get_submodule(p) for p in paths]
        input_shape = tuple(ctx.task.example_inputs()[0].shape[1:])

        def score() -> list[Tensor]:
            for twin, layer in zip(twins, layers):
                twin.mask.copy_(layer.mask)
            return synflow_scores(net, paths, input_shape)

        return score
