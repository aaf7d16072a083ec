"""Geo-Sharing: the loss-metric fit and its damping limits, the curvature-profile colouring (dendrogram, the cut
that minimises the predicted loss, non-adjacent classes), exact parameter counts, Basis Sharing as a special case,
save -> load, and runs through the run loop, on tiny random LLaMA / ViT / Swin models and the tiny demo tasks."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

import methods.geo_sharing as geo
from core.errors import ConfigError
from core.io import read_json
from methods import CompressContext, create_method
from methods.basis_sharing import BasisSharingConfig, basis_rank, consecutive_groups
from methods.geo_sharing import (
    Dendrogram,
    GeoSharingConfig,
    class_params,
    contiguous_classes,
    num_classes_for,
    profile_similarity,
    two_sided_rank,
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
    """Fixed random calibration: 4 batches of 2 x 24 tokens, or of 8 images (with labels of 5 classes) when
    ``images`` is set."""

    images: tuple[int, ...] | None = None

    def provides(self, kind):
        return kind == "calibration_batches" or (kind == "labelled_calibration_batches" and self.images is not None)

    def labelled_calibration_batches(self):
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(4):
            yield torch.randn(8, *self.images, generator=gen), torch.randint(0, 5, (8,), generator=gen)

    def calibration_batches(self):
        if self.images is not None:
            yield from (x for x, _ in self.labelled_calibration_batches())
            return
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(4):
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
def test_the_speed_benchmarks_class_count_gives_the_seed_anchor():
    assert num_classes_for(32, 0.5, 1.415) == 12  # the design notes: 32 layers -> 12 bases at 50 %
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


# -- the colouring: dendrogram and cut -------------------------------------------------------------------------------
def test_profile_similarity_is_the_cosine_of_the_profiles():
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    ps = [z @ z.T for z in zs]
    ps.append(4.0 * ps[0])  # the same profile at another scale
    sim = profile_similarity(ps)
    for a in range(4):
        for b in range(4):
            ref = (ps[a] * ps[b]).sum() / (ps[a].norm() * ps[b].norm())
            torch.testing.assert_close(sim[a, b], ref)
    assert float(sim[0, 3]) == pytest.approx(1.0)


@pytest.mark.parametrize("kw", [dict(), dict(beta=0.0), dict(beta=math.inf), dict(hessian="kfac")])
def test_class_costs_equal_the_predicted_increase_of_a_class_fit(monkeypatch, kw):
    """ClassCosts (one eigh of d_in x d_in per class) gives the J of fit_class (an SVD of d_in x n d_out) for
    adjacent and non-adjacent classes of every size, and its profiles are Z_i Z_i^T with Z_i = L^T W_i^T R_i."""
    checked = []
    colour = geo.GeoSharing.colour

    def spy(self, adapter, layout, stats, out_grams, device):
        for role in ("q", "gate"):
            layers = layout.graph[role][0]
            weights = {i: adapter.model.get_submodule(adapter.role_path(role, i)).weight for i in layers}
            costs = geo.ClassCosts(weights, {i: stats.grams[(role, i)] for i in layers},
                                   None if out_grams is None else {i: out_grams[(role, i)] for i in layers},
                                   self.cfg.beta, lambda group: self.rank(layout, role, group), device)
            for group in [(0,), (3,), (0, 1), (1, 3), (0, 2, 4), (0, 1, 2, 3, 4)]:
                fit = self.fit_class(adapter, layout, role, group, [stats.grams[(role, i)] for i in group],
                                     out_grams, device, install=False)
                assert costs(group) == pytest.approx(sum(fit["increase"]), rel=1e-8), (role, group)
                checked.append(group)
            chol, _ = geo.whitening_factor(geo.Gram.pooled([stats.grams[(role, i)] for i in layers]).xtx)
            for i, p in zip(layers, costs.profiles(layers)):
                z = chol.T @ weights[i].detach().double().T
                if out_grams is not None:
                    z = z @ geo.damped_output_factor(out_grams[(role, i)], self.cfg.beta)
                torch.testing.assert_close(p, z @ z.T)
        return colour(self, adapter, layout, stats, out_grams, device)

    monkeypatch.setattr(geo.GeoSharing, "colour", spy)
    compress(tiny_llama(5), ratio=0.4, **kw)
    assert len(checked) == 12


def test_dendrogram_merges_the_most_similar_first_across_non_adjacent_layers():
    sim = torch.tensor([[1.0, 0.1, 0.9, 0.2], [0.1, 1.0, 0.2, 0.8], [0.9, 0.2, 1.0, 0.1], [0.2, 0.8, 0.1, 1.0]])
    tree = Dendrogram.build([0, 1, 2, 3], sim)
    assert tree.merges[0] == ((0,), (2,)) and tree.merges[1] == ((1,), (3,))
    assert tree.cut(2) == ((0, 2), (1, 3)) and tree.cut(4) == ((0,), (1,), (2,), (3,)) and tree.cut(1) == ((0, 1, 2, 3),)


def test_best_cut_is_the_least_cost_partition_of_dendrogram_clusters():
    sim = torch.tensor([[1.0, 0.1, 0.9, 0.2], [0.1, 1.0, 0.2, 0.8], [0.9, 0.2, 1.0, 0.1], [0.2, 0.8, 0.1, 1.0]])
    tree = Dendrogram.build([0, 1, 2, 3], sim)
    calls = []

    def cost(group):
        calls.append(group)
        return {(0, 2): 1.0, (1, 3): 5.0, (0, 1, 2, 3): 7.0}.get(group, 2.0)  # singles 2 each

    partition, j = tree.best_cut(cost)
    assert partition == ((0, 2), (1,), (3,)) and j == pytest.approx(5.0)
    assert len(set(calls)) == 2 * 4 - 1  # one cost per dendrogram cluster
    every_cut = [sum(cost(g) for g in tree.cut(k)) for k in range(1, 5)]
    assert j <= min(every_cut)


def test_every_colouring_keeps_the_parameter_budget():
    """Any partition the cut can choose stores at most (1 - ratio) of the dense parameters: every class of n layers
    has the rank of its size."""
    d_in, d_out, ratio = 4096, 11008, 0.4
    for sizes in ([1] * 32, [2] * 16, [32], [3, 5, 7, 17]):
        stored = sum(class_params(d_in, d_out, n, basis_rank(d_in, d_out, n, ratio)) for n in sizes)
        assert stored <= (1 - ratio) * 32 * d_in * d_out


# -- against Basis Sharing and the dense model ---------------------------------------------------------------------
def test_adjacent_colouring_with_the_input_metric_is_basis_sharing():
    """hessian = kfac (input-only metric, G = I), beta = 0 and contiguous classes of two: the same classes, ranks,
    bases and weights as basis_sharing."""
    a, b = tiny_llama(3), tiny_llama(3)
    compress(a, ratio=0.4, beta=0.0, hessian="kfac", colouring="adjacent", num_classes=2)
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


def test_full_damping_of_a_private_layer_is_the_whitened_fit():
    """beta = 0 replaces G by its mean eigenvalue times I: one layer's fit is then SVD-LLM's whatever G is (a scalar
    metric does not change a single layer's SVD); shared classes differ only by the layers' loss weights."""
    a, b = tiny_llama(3), tiny_llama(3)
    compress(a, ratio=0.4, beta=0.0, colouring="adjacent", num_classes=2)
    compress(b, ratio=0.4, hessian="kfac", colouring="adjacent", num_classes=2)
    for role in ("o", "down"):
        for i in range(3):
            la, lb = (m.get_submodule(LlamaAdapter(m).role_path(role, i)) for m in (a, b))
            torch.testing.assert_close(la.dense_weight(), lb.dense_weight(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(), dict(num_classes=2), dict(basis_form="two_sided", num_classes=3),
                                dict(hessian="kfac")])
def test_full_rank_at_a_tiny_ratio_reproduces_the_dense_model(monkeypatch, kw):
    """ratio -> 0 with ranks at full: every class reproduces its layers whatever the metric (two-sided: one class
    per layer, as a shared output basis of full rank does not span several layers' outputs)."""
    monkeypatch.setattr(geo, "class_rank", full_rank)
    model = tiny_llama(3)
    dense = logits(model)
    _, out = compress(model, ratio=1e-3, **kw)
    if kw.get("num_classes") == 2:
        assert out["method/bases"] == 2 * len(SHARED) + 3 * 2
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
        ups = [g for g in classes_of(model, adapter, "up") if len(g) > 1]
        assert not ups or layers[ups[0][0]].mlp.up_proj.w is layers[ups[0][1]].mlp.up_proj.w


# -- the colouring on a model ----------------------------------------------------------------------------------------
def test_colouring_is_a_partition_chosen_by_the_predicted_loss():
    model = tiny_llama(5)
    adapter = LlamaAdapter(model)
    _, out = compress(model, ratio=0.5)
    for role in ROLES:
        classes = classes_of(model, adapter, role)
        assert sorted(i for g in classes for i in g) == list(range(5))  # every layer in exactly one class
        assert out[f"method/classes/{role}"] == len(classes)
        if role not in SHARED:
            assert len(classes) == 5
    assert out["method/objective"] <= out["method/objective_pairs"] + 1e-12  # pairs are a candidate
    assert out["method/classes_scored"] >= 2 * 5 - 1


def test_a_model_whose_first_and_last_blocks_are_alike_shares_them():
    """Block 2 is a copy of block 0, block 1 differs: every coloured role puts layers 0 and 2 in one class, and the
    metrics count the non-adjacent classes."""
    model = tiny_llama(3)
    model.model.layers[2].load_state_dict(model.model.layers[0].state_dict())
    adapter = LlamaAdapter(model)
    _, out = compress(model, ratio=0.5, num_classes=2)
    for role in SHARED:
        assert classes_of(model, adapter, role) == [(0, 2), (1,)], role
        assert out[f"method/non_adjacent/{role}"] == 1
    assert out["method/non_adjacent_classes"] == len(SHARED)


def test_the_loss_metric_and_beta_change_the_stored_factors():
    base, loss, damped = tiny_llama(3), tiny_llama(3), tiny_llama(3)
    kw = dict(ratio=0.5, colouring="adjacent", num_classes=2)
    compress(base, hessian="kfac", **kw)
    _, out = compress(loss, beta=math.inf, **kw)
    compress(damped, beta=1.0, **kw)
    w = [m.model.layers[0].self_attn.q_proj.dense_weight() for m in (base, loss, damped)]
    assert (w[0] - w[1]).abs().max() > 1e-4 and (w[1] - w[2]).abs().max() > 1e-4
    assert out["method/predicted_increase"] > 0


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


def test_vit_roles_are_coloured_as_the_adapter_defines_them():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, embed_dim=16,
                              depth=4, num_heads=2, num_classes=5, in_chans=1, global_pool="avg").eval()
    model._images = (1, 8, 8)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    adapter = create_adapter(model)
    assert isinstance(adapter, TimmViTAdapter)
    _, out = compress(model, ratio=0.5, num_classes=2)
    assert out["method/classes/qkv"] == out["method/classes/fc1"] == 2
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
    compress(model, ratio=0.3, num_classes=1)
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
    with pytest.raises(ConfigError, match="hessian"):
        GeoSharingConfig(hessian="fisher")
    with pytest.raises(ConfigError, match="beta"):
        GeoSharingConfig(beta=-1.0)
    with pytest.raises(ConfigError, match="num_classes"):
        GeoSharingConfig(num_classes=0)
    with pytest.raises(ConfigError, match="default"):
        GeoSharingConfig(share_types={"llama": ["q"]})
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
    assert metrics["method/objective"] <= metrics["method/objective_pairs"] + 1e-12
    model = load_compressed(p.task.build_model(0), p.run_dir / "model.safetensors").eval()
    assert p.task.evaluate(model)["ppl/demo"] == pytest.approx(metrics["ppl/demo"], rel=1e-6)


def test_demo_vit_run(task_cfg):
    cfg = task_cfg("demo_vit", "method=geo_sharing", "method.ratio=0.4")
    p = plan(cfg)
    assert execute(cfg, []) == "done", read_json(p.run_dir / RUN_JSON).get("traceback")
    metrics = read_json(p.run_dir / METRICS_JSON)
    assert 0.4 <= metrics["scope/removed_fraction"] <= 0.46
    assert 1 <= metrics["method/classes/qkv"] <= 4
    assert 0.0 <= metrics["acc/top1"] <= 1.0
