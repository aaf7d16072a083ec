"""FiPS, Fine-grained Parameter Sharing (arXiv 2411.09816; official code cemuyuk/FiPS): the MLP weights of a group
of consecutive blocks share one dense basis U, every layer keeps its own sparse factor V.

* Groups: contiguous runs of blocks covering every MLP, never across a change of stage (Swin) or of width;
  ``group_size`` blocks each (default 4, Swin 6 within a stage: the official DeiT-B / Llama and Swin-B/L
  groupings), or explicit ``groups``.
* Shapes: every MLP linear is oriented d x d_ff (transposed when out > in: fc1, gate, up) and the group's matrices
  are concatenated along d_ff, block-major then role order: M = U [V_1 | ... | V_Fn], U (d x r) dense and shared,
  V_i (r x d_ff) sparse. fc1-type layers compute W = (U V_i)^T, fc2-type W = U V_i; biases stay.
* Rank: r = floor(p d C / ((1 - s) C + d)) for the group's C = sum of d_ff columns, p = 1 - ratio kept,
  s = ``sparsity`` of V: the largest r with d r + (1 - s) r C <= p d C. With d_ff = 4d (ViT, Swin, Gemma-2) this
  is the official ``compute_sparse_r``; ``rank_formula: official`` uses the official expression, which assumes
  d_ff = 4d, for any model (it overshoots the budget when d_ff != 4d).
* SVD init: thin SVD of M (float64); U = top-r left vectors, V = diag(S) W^T (singular values folded into V).
  r > rank(M) (overcomplete, e.g. DeiT-B at p = 0.5): U padded with zero columns, V with copies of its top rows
  divided by ``overcomplete_tau`` = 32, so U V = M exactly.
* Local error minimisation, ``objective`` (``methods.reconstruction``):
  ``block`` (ViT recipe): the dense model's block inputs and outputs on the calibration images are cached once
  (``methods.calibration.capture_block_io``); every step sums MSE(block_b(x_b), y_b) over all blocks
  (teacher-forced: inputs from the dense model) and trains U, V and the MLP biases, everything else frozen, model
  in eval mode. AdamW (0.9, 0.999, eps 1e-8), cosine LR per step. Sparsifier RigL by default (constant s, drop
  fraction 0.1, every 50 steps up to 0.75 T; the official Swin-L config).
  ``mlp`` (LLM recipe): one MLP at a time, in block order, on the dense model's (input, output) pairs of that MLP
  (block-wise streamed, so only one block's activations are held), ``tokens_per_step`` random tokens a step,
  its own optimizer, schedule and sparsifier (GMP* by default, global over that MLP's V's); training a later MLP
  of a group keeps updating the shared U (as the official sequential script).
* Sparsity of V only (``methods.sparse_training``: rigl | gmp | magnitude).
* Optional end-to-end fine-tuning (``finetune_steps`` > 0, tasks with training batches): the whole model (or only
  the FiPS factors) on the task's train split, cross-entropy (``ce``) or distillation from the dense model
  (``kd``), masks kept fixed except under RigL, which keeps updating them at constant sparsity.
* Counting: stored = U once per group + nnz(V) + biases; the mask is index overhead (one bit per entry of V;
  ``method/index_bytes_csr`` gives the CSR alternative). Checkpoints store V as values + mask bits.

Calibration: on tasks with class-stratified batches (``stratified_batches``: timm_image), ``calib_images``
class-stratified train images (3,840 as the official 30 x 128) in batches of ``batch_size``, unaugmented (the
official code applies one fixed random resize/crop/flip per image); null = the task's own calibration set, which
is also what language tasks use (``task.calib``).

Layout and factorisation live in ``methods.fips_factors``, the teacher capture in ``methods.calibration``, the
optimiser loop and the local losses in ``methods.reconstruction``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from core.errors import ConfigError
from core.progress import progress_bar
from methods.base import METHODS, CompressContext, Method, MethodConfig
from methods.calibration import block_device, capture_block_inputs, capture_block_io, first_output, forward_block
from methods.fips_factors import (
    Group,
    factor_state,
    factorize_group,
    fips_parameters,
    install_factorised,
    load_factor_state,
    plan_groups,
)
from methods.modules import MaskedFactor, SharedFactorLinear
from methods.reconstruction import block_loss_step, token_loss_step, train_steps
from methods.sparse_training import SPARSIFIERS, Sparsifier, make_sparsifier
from tasks.adapters import ModelAdapter

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


@METHODS.register("fips")
class FiPS(Method):
    config_class = FiPSConfig
    cfg: FiPSConfig

    def objective(self, adapter: ModelAdapter) -> str:
        if self.cfg.objective != "auto":
            return self.cfg.objective
        return "mlp" if adapter.causal_lm else "block"

    def check(self, adapter) -> None:
        super().check(adapter)
        plan_groups(adapter, self.cfg)
        if self.objective(adapter) == "mlp":
            try:
                adapter.mlp_path()
            except ConfigError as e:
                raise ConfigError(f"fips objective mlp: {e}") from None

    def apply(self, model, adapter, ctx: CompressContext) -> dict[str, float]:
        cfg = self.cfg
        groups = plan_groups(adapter, cfg)
        objective = self.objective(adapter)
        recipe = cfg.resolved(objective)
        if cfg.finetune_steps > 0 and not ctx.provides("training_batches"):
            raise ConfigError(f"method.finetune_steps={cfg.finetune_steps}: the task provides no training batches")
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
        """(calibration batches, their number where known): ``calib_images`` class-stratified train images where
        the task has them, else the task's calibration set."""
        if self.cfg.calib_images is not None and ctx.provides("stratified_batches"):
            return ctx.stratified_batches(self.cfg.calib_images, self.cfg.batch_size)
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
        with ctx.stage("calibration"):
            cache = capture_block_io(adapter, batches, CACHE_DTYPES[cfg.cache_dtype], cfg.cache_device, n_batches,
                                     ctx.progress, desc="fips teacher")
        with ctx.stage("factorise"):
            modules, params = install_factorised(model, adapter, groups, cfg.overcomplete_tau, ctx.device)
        steps = self.n_steps(recipe, len(cache.inputs[0]))
        self.steps_total = steps
        sparsifier = self._make_sparsifier(recipe["sparsifier"], [m.v for m in modules], steps)
        blocks = adapter.blocks()
        device = block_device(blocks[0])

        def train() -> dict[str, Any]:
            gen = torch.Generator().manual_seed(ctx.seed)
            hist = train_steps(params, sparsifier, steps, block_loss_step(blocks, cache, device, gen),
                               recipe["lr"], recipe["lr_min"], recipe["weight_decay"], ctx.progress, "fips local")
            return {"state": factor_state(modules), "history": torch.tensor(hist, dtype=torch.float64)}

        with ctx.stage("fitting"):
            result = ctx.checkpointed("fips_local", train)
        load_factor_state(modules, result["state"])
        self.history = [float(x) for x in result["history"]]
        return modules, sparsifier

    def _mlp_stage(self, model, adapter, groups, recipe, ctx):
        """One MLP at a time, block-wise streamed: the dense MLP's (input, output) pairs, then its training."""
        cfg = self.cfg
        parent = adapter.mlp_path()
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
            mlp = block.get_submodule(parent)
            xs, ys = [], []

            def record(mod, args, out, xs=xs, ys=ys) -> None:
                out = first_output(out)
                xs.append(args[0].detach().reshape(-1, args[0].shape[-1]).to(dtype))
                ys.append(out.detach().reshape(-1, out.shape[-1]).to(dtype))

            handle = mlp.register_forward_hook(record)
            try:
                forward_block(adapter, inputs, i, block_device(block))
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
                gen = torch.Generator().manual_seed(ctx.seed * 100_003 + i)  # per MLP: a resumed run draws the same
                step = token_loss_step(mlp, x, y, per_step, gen, mods[0].u.dtype)
                hist = train_steps(params, sparsifier, steps, step, recipe["lr"], recipe["lr_min"],
                                   recipe["weight_decay"], ctx.progress, f"fips mlp {i}")
                return {"state": factor_state(mods), "history": torch.tensor(hist, dtype=torch.float64)}

            result = ctx.checkpointed(f"fips_mlp{i}", train)
            load_factor_state(mods, result["state"])
            self.history += [float(v) for v in result["history"]]
            for p in params:
                p.requires_grad_(False)
            del x, y
        return modules, sparsifier

    def _finetune(self, model, modules, teacher, recipe, ctx) -> dict[str, float]:
        cfg = self.cfg
        if cfg.finetune_params == "all":
            params = [p for p in model.parameters()]
        else:
            params = fips_parameters(modules)
        for p in params:
            p.requires_grad_(True)
        kind = "rigl" if recipe["sparsifier"] == "rigl" else "magnitude"
        sparsifier = self._make_sparsifier(kind, [m.v for m in modules], cfg.finetune_steps)
        batches = iter(ctx.training_batches(cfg.finetune_batch_size))

        def step(t: int) -> float:
            x, y = next(batches)
            logits = first_output(model(x)).float()
            if teacher is not None:
                with torch.no_grad():
                    target = first_output(teacher(x)).float()
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
