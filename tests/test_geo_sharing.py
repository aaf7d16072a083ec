"""Geo-Sharing: the budget rule, the curvature colouring (non-adjacent classes), the trust-region refit, the hvp
curvature, exact parameter counts, save -> load, and runs through the run loop, on tiny random LLaMA / ViT / Swin
models and the tiny embedded demo tasks."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import methods.geo_sharing as geo
from core.errors import ConfigError
from core.io import read_json
from methods import CompressContext, create_method
from methods.basis_sharing import BasisSharingConfig, consecutive_groups
from methods.calibration import Gram
from methods.curvature import top_eigenpairs
from methods.geo_sharing import (
    ClassScorer,
    Curvature,
    GeoSharingConfig,
    class_params,
    colour_component,
    contiguous_classes,
    hvp_curvature,
    lm_loss,
    num_classes_for,
    trust_region_target,
    two_sided_rank,
    weight_loss,
)
from methods.modules import SharedBasisLinear, TwoSidedSharedLinear
from runners import accounting
from runners.checkpoint import load_compressed, save_compressed
from runners.record import METRICS_JSON, RUN_JSON
from runners.run import execute, plan
from tasks.adapters import LlamaAdapter, TimmSwinAdapter, TimmViTAdapter, create_adapter
from tests.toy import tiny_llama

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
SHARED = ("q", "k", "v", "gate", "up")
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


class Ctx(CompressContext):
    """Fixed random calibration: 4 batches of 2 x 24 tokens, or of 8 images when ``images`` is set."""

    images: tuple[int, ...] | None = None

    def provides(self, kind):
        return kind == "calibration_batches"

    def calibration_batches(self):
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(4):
            if self.images is not None:
                yield torch.randn(8, *self.images, generator=gen)
            else:
                yield {"input_ids": torch.randint(0, 64, (2, 24), generator=gen)}


def ctx(images=None) -> Ctx:
    c = Ctx(task=None, device=CPU, seed=0, progress=False)
    c.images = images
    return c


def logits(model, seed: int = 5) -> torch.Tensor:
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def compress(model, **cfg) -> tuple[geo.GeoSharing, dict]:
    method = create_method(GeoSharingConfig(**cfg))
    adapter = create_adapter(model)
    method.check(adapter)
    return method, method.apply(model, adapter, ctx(getattr(model, "_images", None)))


def classes_of(model, adapter, role) -> list[tuple[int, ...]]:
    """The sharing classes of ``role``, read from the model: layers whose basis is one Parameter object."""
    out: dict[int, list[int]] = {}
    for i in range(len(adapter.block_paths())):
        out.setdefault(id(model.get_submodule(adapter.role_path(role, i)).v), []).append(i)
    return sorted(tuple(g) for g in out.values())


def full_rank(d_in, d_out, n, ratio, form="one_sided"):
    return min(d_in, n * d_out) if form == "one_sided" else min(d_in, d_out)


# -- budget and ranks ------------------------------------------------------------------------------------------------
def test_budget_rule_gives_the_seed_anchor_and_stays_in_range():
    assert num_classes_for(32, 0.5, 1.415) == 12  # the reported data point: 32 layers -> 12 bases at 50 %
    assert num_classes_for(32, 0.5, GeoSharingConfig().class_exponent) == 12
    assert math.isclose(GeoSharingConfig().class_exponent, math.log2(32 / 12), abs_tol=1e-3)
    assert num_classes_for(32, 1e-3, 1.415) == 32 and num_classes_for(32, 0.999, 1.415) == 1
    for layers in (1, 2, 3, 4, 7, 32, 80):
        ks = [num_classes_for(layers, r / 100, 1.415) for r in range(1, 100)]
        assert all(1 <= k <= layers for k in ks) and ks == sorted(ks, reverse=True)


def test_contiguous_classes_are_basis_sharing_pairs_at_half_the_layers():
    for n in range(1, 10):
        assert contiguous_classes(list(range(n)), math.ceil(n / 2)) == consecutive_groups(n, 2)
    assert [len(g) for g in contiguous_classes(list(range(32)), 12)] == [3] * 8 + [2] * 4


def test_two_sided_rank_is_the_largest_within_budget():
    for d_in, d_out, n, ratio in [(32, 32, 2, 0.5), (32, 48, 3, 0.2), (4096, 11008, 2, 0.5), (16, 64, 1, 0.7)]:
        k = two_sided_rank(d_in, d_out, n, ratio)
        budget = n * d_in * d_out * (1 - ratio)
        assert 1 <= k <= min(d_in, d_out)
        assert class_params(d_in, d_out, n, k, "two_sided") <= budget
        assert k == min(d_in, d_out) or class_params(d_in, d_out, n, k + 1, "two_sided") > budget


# -- against Basis Sharing and the dense model ---------------------------------------------------------------------
def test_beta0_t0_adjacent_colouring_is_basis_sharing():
    """beta = 0, t = 0 and contiguous classes of two: the same classes, ranks, bases and weights as basis_sharing
    (the refit towards W on the class's own statistics returns the shared SVD's coefficients)."""
    a, b = tiny_llama(3), tiny_llama(3)
    compress(a, ratio=0.4, beta=0.0, t=0, colouring="adjacent", num_classes=2)
    bs = create_method(BasisSharingConfig(ratio=0.4))
    bs.apply(b, LlamaAdapter(b), ctx())
    for role in ROLES:
        assert classes_of(a, LlamaAdapter(a), role) == classes_of(b, LlamaAdapter(b), role)
        for i in range(3):
            la, lb = (m.get_submodule(LlamaAdapter(m).role_path(role, i)) for m in (a, b))
            assert isinstance(la, SharedBasisLinear) and la.rank == lb.rank
            torch.testing.assert_close(la.v, lb.v, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(la.dense_weight(), lb.dense_weight(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(a), logits(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(num_classes=2), dict(basis_form="two_sided"),
                                dict(hessian="kfac", t=4, beta=0.1)])
def test_full_rank_at_a_tiny_ratio_reproduces_the_dense_model(monkeypatch, kw):
    """ratio -> 0 with ranks at full (one class per layer by the budget rule, or two classes sharing a full
    basis, or the two-sided form; a trust region on 4 curvature directions moves nothing: the perturbation is 0)."""
    monkeypatch.setattr(geo, "class_rank", full_rank)
    model = tiny_llama(3)
    dense = logits(model)
    _, out = compress(model, ratio=1e-3, **kw)
    assert out["method/bases"] == (2 * len(SHARED) + 3 * 2 if kw.get("num_classes") == 2 else 3 * len(ROLES))
    torch.testing.assert_close(logits(model), dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", ["one_sided", "two_sided"])
def test_stored_parameters_equal_the_rank_formula(form):
    """Unique stored parameters over the scope = sum over classes of k d_in + n k d_out (two-sided:
    k (d_in + d_out) + n k^2), with k the class's rank; the budget holds over the scope."""
    model = tiny_llama(5)
    adapter = LlamaAdapter(model)
    scope = adapter.scope("linear")
    dense = accounting.dense_counts(model, scope)
    method, out = compress(model, ratio=0.3, basis_form=form)
    shapes = {"q": (32, 32), "k": (32, 32), "v": (32, 32), "o": (32, 32), "gate": (48, 32), "up": (48, 32),
              "down": (32, 48)}  # (d_out, d_in)
    expected = 0
    for role, (d_out, d_in) in shapes.items():
        for g in classes_of(model, adapter, role):
            expected += class_params(d_in, d_out, len(g), geo.class_rank(d_in, d_out, len(g), 0.3, form), form)
    counts = accounting.compressed_counts(model, {p: model.get_submodule(p) for p in scope}, dense)
    assert counts["scope/params_stored"] == expected
    assert 0.3 <= counts["scope/removed_fraction"] <= 0.3 + 0.08
    assert out["method/bases"] == sum(len(classes_of(model, adapter, r)) for r in ROLES)
    if form == "two_sided":
        layers = model.model.layers
        assert all(isinstance(layers[i].mlp.up_proj, TwoSidedSharedLinear) for i in range(5))
        ups = classes_of(model, adapter, "up")
        shared = [g for g in ups if len(g) > 1][0]
        assert layers[shared[0]].mlp.up_proj.w is layers[shared[1]].mlp.up_proj.w


# -- the colouring ---------------------------------------------------------------------------------------------------
def test_colouring_is_a_partition_with_the_budgets_number_of_classes():
    model = tiny_llama(5)
    adapter = LlamaAdapter(model)
    _, out = compress(model, ratio=0.5)
    k = num_classes_for(5, 0.5, 1.415)
    assert k == 2
    for role in ROLES:
        classes = classes_of(model, adapter, role)
        assert sorted(i for g in classes for i in g) == list(range(5))  # every layer in exactly one class
        assert len(classes) == (k if role in SHARED else 5)
        assert out[f"method/classes/{role}"] == len(classes)
    assert out["method/objective"] <= out["method/objective_adjacent"] + 1e-9


def synthetic_layers(n_out=12, d=10, seed=0):
    """Four layers: 0 and 2 alike, 1 and 3 alike (W_2 = W_0 + small noise), identical isotropic inputs."""
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(n_out, d, generator=g, dtype=torch.float64) for _ in range(2))
    weights = {0: a, 1: b, 2: a + 0.01 * torch.randn(n_out, d, generator=g, dtype=torch.float64),
               3: b + 0.01 * torch.randn(n_out, d, generator=g, dtype=torch.float64)}
    x = torch.randn(200, d, generator=g, dtype=torch.float64)
    grams = {i: Gram(x.T @ x, 200) for i in weights}
    curvature = {i: Curvature.from_gram(grams[i], 4, "eigh") for i in weights}
    return weights, grams, curvature


@pytest.mark.parametrize("init", ["pairs", "adjacent"])
def test_curvature_colouring_shares_non_adjacent_layers(init):
    weights, grams, curvature = synthetic_layers()
    scorer = ClassScorer(weights, grams, curvature, lambda n: geo.class_rank(10, 12, n, 0.5))
    partition, info = colour_component(scorer, [0, 1, 2, 3], 2, "curvature", init, rounds=5)
    assert partition == ((0, 2), (1, 3))
    assert info["objective"] < 0.9 * info["objective_adjacent"]
    assert colour_component(None, [0, 1, 2, 3], 2, "adjacent")[0] == ((0, 1), (2, 3))


def test_a_model_whose_first_and_last_blocks_are_alike_shares_them():
    """Block 2 is a copy of block 0, block 1 differs: every coloured role puts layers 0 and 2 in one class."""
    model = tiny_llama(3)
    model.model.layers[2].load_state_dict(model.model.layers[0].state_dict())
    adapter = LlamaAdapter(model)
    _, out = compress(model, ratio=0.5, num_classes=2)
    for role in SHARED:
        assert classes_of(model, adapter, role) == [(0, 2), (1,)], role
    assert out["method/non_adjacent_classes"] == len(SHARED)


# -- trust region ----------------------------------------------------------------------------------------------------
def test_trust_region_target_keeps_the_high_curvature_part_and_clips_the_rest():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 16, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 16, dtype=torch.float64)
    curv = Curvature.from_gram(Gram(x.T @ x, 100), 5, "lanczos")
    w = torch.randn(8, 16, generator=g, dtype=torch.float64)
    approx = w + 0.5 * torch.randn(8, 16, generator=g, dtype=torch.float64)
    for beta in (0.0, 0.01, 0.05, 10.0):
        update = trust_region_target(w, approx, curv, beta) - w
        tau = beta * float(w.norm())
        assert float(update.norm()) <= tau * (1 + 1e-12) + 1e-15
        torch.testing.assert_close(update @ curv.u, torch.zeros(8, 5, dtype=torch.float64), rtol=0, atol=1e-12)
    low = (approx - w) - (approx - w) @ curv.u @ curv.u.T  # nothing clipped inside the radius
    torch.testing.assert_close(trust_region_target(w, approx, curv, 10.0) - w, low)


def test_trust_region_updates_of_a_run_are_low_curvature_and_within_tau(monkeypatch):
    """In a run with t < d_in: every layer's refit target W' differs from W by a vector orthogonal to its top-t
    curvature directions, of norm <= beta ||W||_F (at the radius here: the perturbation is larger)."""
    seen = []

    def spy(weight, approx, curvature, beta):
        target = trust_region_target(weight, approx, curvature, beta)
        seen.append((weight, target, curvature, beta))
        return target

    monkeypatch.setattr(geo, "trust_region_target", spy)
    model = tiny_llama(3)
    _, out = compress(model, ratio=0.5, t=6, beta=0.05)
    assert len(seen) == 3 * len(ROLES)
    for w, target, curv, beta in seen:
        update = target - w
        assert curv.u.shape[1] == 6 and float(update.norm()) <= beta * float(w.norm()) * (1 + 1e-9)
        assert float((update @ curv.u).norm()) <= 1e-9 * float(w.norm())
    assert out["method/tr_at_radius"] == 1.0 and out["method/tr_low_rel_mean"] == pytest.approx(0.05)


def test_beta_changes_the_stored_coefficients_and_t_is_clipped_to_d_in():
    base, moved = tiny_llama(3), tiny_llama(3)
    _, out = compress(base, ratio=0.5, t=6, beta=0.0)
    compress(moved, ratio=0.5, t=6, beta=0.2)
    diff = (base.model.layers[0].self_attn.q_proj.u - moved.model.layers[0].self_attn.q_proj.u).abs().max()
    assert diff > 1e-4
    _, out = compress(tiny_llama(3), ratio=0.5)  # t = 550 on a 32-wide model
    assert out["method/t_min"] == 32


# -- hvp curvature ---------------------------------------------------------------------------------------------------
def test_hvp_eigenpairs_match_the_explicit_hessian_of_the_lm_loss():
    model = tiny_llama(1, hidden=8, inter=12, heads=2).double()
    batches = list(ctx().calibration_batches())[:1]
    path = "model.layers.0.self_attn.q_proj"
    curv = hvp_curvature(model, path, batches, lm_loss, t=4, seed=0)
    w = model.get_submodule(path).weight.detach()
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernel has no double backward
        hess = torch.autograd.functional.hessian(weight_loss(model, path, batches, lm_loss), w).reshape(64, 64)
    ref = torch.linalg.eigvalsh(hess).flip(0)[:4]
    assert curv.flat and curv.u.shape == (64, 4)
    torch.testing.assert_close(curv.lam, ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(hess @ curv.u, curv.u * curv.lam, rtol=1e-5, atol=1e-8)


def test_hvp_of_a_quadratic_layer_loss_agrees_with_the_kfac_proxy():
    """For L(W) = 1/2 mean_x ||x W^T - y||^2 the Hessian is (X^T X / N) (x) I: Lanczos on its Hessian-vector
    products finds the distinct eigenvalues, which are the proxy's top_eigenpairs of X^T X / N."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64) * torch.linspace(1, 3, 6, dtype=torch.float64)
    y = torch.randn(64, 5, generator=g, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(6, 5, bias=False)).double()
    curv = hvp_curvature(model, "0", [(x, y)], lambda call, b: 0.5 * (call(b[0]) - b[1]).pow(2).sum(1).mean(), t=6)
    proxy = Curvature.from_gram(Gram(x.T @ x, 64), 6, "eigh")
    torch.testing.assert_close(curv.lam, proxy.lam, rtol=1e-8, atol=1e-10)
    lam, _ = top_eigenpairs(x.T @ x / 64, 3, solver="lanczos")
    torch.testing.assert_close(curv.lam[:3], lam, rtol=1e-8, atol=1e-10)


def test_hvp_mode_compresses_a_tiny_model():
    model = tiny_llama(2, hidden=16, inter=24, heads=2)
    dense = logits(model)
    _, out = compress(model, ratio=0.4, hessian="hvp", t=3, hvp_samples=1, scope="attention", num_classes=1)
    assert out["method/t_min"] == 3 and out["method/classes/q"] == 1
    assert model.model.layers[0].self_attn.q_proj.v is model.model.layers[1].self_attn.q_proj.v
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)  # outside the scope
    after = logits(model)
    assert torch.isfinite(after).all() and not torch.allclose(after, dense)


# -- checkpoints and other architectures -----------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["one_sided", "two_sided"])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, form):
    model = tiny_llama(4)
    compress(model, ratio=0.5, basis_form=form)
    before = logits(model)
    save_compressed(model, tmp_path / "m.safetensors")
    loaded = load_compressed(tiny_llama(4, seed=1), tmp_path / "m.safetensors").eval()
    torch.testing.assert_close(logits(loaded), before, rtol=0, atol=0)
    for role in ROLES:
        assert classes_of(loaded, LlamaAdapter(loaded), role) == classes_of(model, LlamaAdapter(model), role)
    scopes = [{p: m.get_submodule(p) for p in LlamaAdapter(m).scope("linear")} for m in (model, loaded)]
    assert len({accounting.count(s.values(), weights_only=True)["params_stored"] for s in scopes}) == 1


def test_vit_roles_are_coloured_as_the_adapter_defines_them(monkeypatch):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, embed_dim=16,
                              depth=4, num_heads=2, num_classes=5, in_chans=1, global_pool="avg").eval()
    model._images = (1, 8, 8)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    adapter = create_adapter(model)
    assert isinstance(adapter, TimmViTAdapter)
    _, out = compress(model, ratio=0.5)
    assert out["method/classes/qkv"] == out["method/classes/fc1"] == num_classes_for(4, 0.5, 1.415) == 2
    assert out["method/classes/proj"] == out["method/classes/fc2"] == 4
    assert torch.isfinite(model(x)).all()


def test_swin_stages_are_coloured_apart_and_full_rank_is_exact(monkeypatch):
    def swin():
        m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=16, patch_size=2,
                              embed_dim=16, depths=(3, 2), num_heads=(2, 2), window_size=4, num_classes=5,
                              in_chans=1).eval()
        m._images = (1, 16, 16)
        return m

    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    model = swin()
    adapter = create_adapter(model)
    assert isinstance(adapter, TimmSwinAdapter)
    _, out = compress(model, ratio=0.3, num_classes=1)
    for role in ("qkv", "fc1"):  # one class per stage: blocks 0-2 (width 16) and 3-4 (width 32)
        assert classes_of(model, adapter, role) == [(0, 1, 2), (3, 4)]
    assert classes_of(model, adapter, "proj") == [(i,) for i in range(5)]
    assert torch.isfinite(model(x)).all()
    monkeypatch.setattr(geo, "class_rank", full_rank)
    model = swin()
    with torch.no_grad():
        dense = model(x)
    compress(model, ratio=1e-3, num_classes=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense, rtol=1e-4, atol=1e-4)


def test_bad_configurations_are_refused_before_compute():
    with pytest.raises(ConfigError, match="colouring"):
        GeoSharingConfig(colouring="random")
    with pytest.raises(ConfigError, match="t=0"):
        GeoSharingConfig(t=0)
    with pytest.raises(ConfigError, match="hessian"):
        GeoSharingConfig(hessian="fisher")
    with pytest.raises(ConfigError, match="default"):
        GeoSharingConfig(share_types={"llama": ["q"]})
    GeoSharingConfig(t=0, colouring="adjacent")
    model = tiny_llama(2)
    with pytest.raises(ConfigError, match="roles qkv unknown"):
        create_method(GeoSharingConfig(share_types={"default": ["qkv"]})).check(LlamaAdapter(model))
    with pytest.raises(ConfigError, match="leaves rank 0"):
        create_method(GeoSharingConfig(ratio=0.999)).check(LlamaAdapter(model))
    with pytest.raises(ConfigError, match="named linear roles"):
        create_method(GeoSharingConfig()).check(create_adapter(nn.Sequential(nn.Linear(4, 4))))


# -- the run loop ----------------------------------------------------------------------------------------------------
def test_demo_lm_run_saves_and_reloads_with_the_recorded_perplexity(task_cfg):
    cfg = task_cfg("demo_lm", "method=geo_sharing", "method.ratio=0.5", "save_model=true")
    p = plan(cfg)
    assert execute(cfg, []) == "done", read_json(p.run_dir / RUN_JSON).get("traceback")
    metrics = read_json(p.run_dir / METRICS_JSON)
    assert 0.5 <= metrics["scope/removed_fraction"] <= 0.56
    assert metrics["method/classes/q"] == num_classes_for(2, 0.5, 1.415)
    model = load_compressed(p.task.build_model(0), p.run_dir / "model.safetensors").eval()
    layers = model.model.layers
    assert layers[0].self_attn.q_proj.v is layers[1].self_attn.q_proj.v
    assert p.task.evaluate(model)["ppl/demo"] == pytest.approx(metrics["ppl/demo"], rel=1e-6)


def test_demo_vit_run(task_cfg):
    cfg = task_cfg("demo_vit", "method=geo_sharing", "method.ratio=0.4", "method.refine_iters=2")
    p = plan(cfg)
    assert execute(cfg, []) == "done", read_json(p.run_dir / RUN_JSON).get("traceback")
    metrics = read_json(p.run_dir / METRICS_JSON)
    assert 0.4 <= metrics["scope/removed_fraction"] <= 0.46
    assert metrics["method/classes/qkv"] == num_classes_for(4, 0.4, 1.415) == 2
    assert 0.0 <= metrics["acc/top1"] <= 1.0
