"""AAFM / GFM: output-feature PCA factorisation (exact at full rank, a projection below), adaptive rank allocation
under the budget, GFM's feature mimicking, on tiny timm ViTs, a tiny CNN and demo_vit through the run loop."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from core.errors import ConfigError
from core.io import read_json
from methods import CompressContext, create_method
from methods.afm import (
    AAFMConfig,
    GFMConfig,
    afm_layer,
    allocate,
    candidate_ranks,
    collect_output_stats,
    factor_params,
    max_useful_rank,
    model_outputs,
)
from methods.modules import LowRankConv2d, LowRankLinear
from runners import accounting
from runners.checkpoint import load_compressed, save_compressed
from runners.record import METRICS_JSON, RUN_JSON
from runners.run import execute, plan
from tasks.adapters import create_adapter
from tests.toy import tiny_vit

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


class Ctx(CompressContext):
    def provides(self, kind):
        return kind == "calibration_batches"

    def calibration_batches(self):
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(4):
            yield torch.randn(16, 3, 16, 16, generator=g)


def ctx(seed: int = 0) -> Ctx:
    return Ctx(task=None, device=CPU, seed=seed, progress=False)


def images(n: int = 6, seed: int = 9) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean() / b.pow(2).mean())


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.fc = nn.Linear(12 * 16 * 16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@torch.no_grad()
def test_afm_at_full_rank_is_exact_and_below_it_projects_the_outputs():
    torch.manual_seed(0)
    net = ConvNet().eval()
    lin = nn.Linear(12, 20)
    x = images()
    rows = torch.randn(200, 12) @ torch.randn(12, 12)
    layers = {"conv": net.conv, "fc": net.fc}
    stats = collect_output_stats(net, layers, [images(16, s) for s in range(3)], CPU)
    lin_stats = collect_output_stats(lin, {"lin": lin}, [rows], CPU)["lin"]
    for layer, st, inp in ((net.conv, stats["conv"], x), (lin, lin_stats, rows)):
        vals, vecs = st.eig()
        d2 = vecs.shape[0]
        full = afm_layer(layer, vecs, st.mean(), d2)
        assert isinstance(full, LowRankConv2d if isinstance(layer, nn.Conv2d) else LowRankLinear)
        torch.testing.assert_close(full(inp), layer(inp), atol=1e-4, rtol=1e-4)
        k = 3
        low = afm_layer(layer, vecs, st.mean(), k)
        y = layer(inp)
        y_rows = y.movedim(1, -1) if isinstance(layer, nn.Conv2d) else y
        u, mean = vecs[:, :k].float(), st.mean().float()
        proj = (y_rows - mean) @ u @ u.T + mean
        out = low(inp)
        torch.testing.assert_close(out.movedim(1, -1) if isinstance(layer, nn.Conv2d) else out, proj,
                                   atol=1e-4, rtol=1e-4)
        assert factor_params(layer, k) == k * (layer.weight[0].numel() + d2)
    # on its own calibration data, the retained variance is the top-k eigenvalues
    vals, vecs = lin_stats.eig()
    y = lin(rows)
    u = vecs[:, :4].float()
    resid = (y - lin_stats.mean().float()) @ (torch.eye(20) - u @ u.T)
    assert float(resid.pow(2).sum(1).mean()) == pytest.approx(float(vals[4:].sum()), rel=1e-3)


def test_allocation_meets_the_budget_and_favours_sensitive_layers():
    unit = {"a": 10, "b": 10}
    options = {k: [(None, 100, 0.0)] + [(r, 10 * r, (9 - r) * w) for r in (2, 4, 6, 8)]
               for k, w in (("a", 1.0), ("b", 10.0))}
    def stored(ranks):
        return sum(100 if r is None else 10 * r for r in ranks.values())

    # b dense + a at rank 2 (sensitivity 7) beats b at 8 + a at 4 (10 + 5)
    assert allocate(options, 120, unit) == {"a": 2, "b": None}
    ranks = allocate(options, 105, unit)  # the last move overshoots; the rest goes back one rank at a time
    assert 100 < stored(ranks) <= 105 or ranks == {"a": 2, "b": 8}
    ranks = allocate(options, 95, unit)
    assert 85 < stored(ranks) <= 95 and ranks["b"] > ranks["a"]
    assert allocate(options, 200, unit) == {"a": None, "b": None}
    with pytest.raises(ConfigError, match="budget"):
        allocate(options, 30, unit)
    assert candidate_ranks(25, 8) == [1, 3, 6, 9, 12, 16, 19, 22, 25] and candidate_ranks(2, 8) == [1, 2]
    assert candidate_ranks(0, 8) == []


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
def test_aafm_meets_the_budget_over_the_scope(ratio):
    model = tiny_vit(depth=3)
    x = images()
    with torch.no_grad():
        ref = model(x)
    method = create_method(AAFMConfig(ratio=ratio, scope="mlp", sensitivity_images=32))
    adapter = create_adapter(model)
    method.check(adapter)
    dense = accounting.count(adapter.scope("mlp").values(), weights_only=True)["params_stored"]
    metrics = method.apply(model, adapter, ctx())
    stored = accounting.count(adapter.scope("mlp").values(), weights_only=True)["params_stored"]
    assert ratio <= 1 - stored / dense <= ratio + 0.03
    assert metrics["method/layers_factored"] + metrics["method/layers_dense"] == 6
    with torch.no_grad():
        assert rel_err(model(x), ref) < 0.5


def test_uniform_and_energy_variants_and_bad_values():
    for kw in ({"allocation": "uniform"}, {"sensitivity": "energy"}):
        model = tiny_vit(depth=3)
        method = create_method(AAFMConfig(ratio=0.5, scope="mlp", **kw))
        adapter = create_adapter(model)
        dense = accounting.count(adapter.scope("mlp").values(), weights_only=True)["params_stored"]
        method.apply(model, adapter, ctx())
        stored = accounting.count(adapter.scope("mlp").values(), weights_only=True)["params_stored"]
        assert 0.5 <= 1 - stored / dense <= 0.56
        assert all(r is None or 1 <= r <= 25 for r in method.ranks.values())  # 25: fc1/fc2's largest useful rank
    with pytest.raises(ConfigError, match="allocation"):
        AAFMConfig(allocation="greedy")
    with pytest.raises(ConfigError, match="gfm_params"):
        GFMConfig(gfm_params="some")
    with pytest.raises(ConfigError, match="rank 1"):
        create_method(AAFMConfig(ratio=0.99, scope="mlp")).check(create_adapter(tiny_vit(depth=3)))


def test_gfm_at_full_rank_keeps_the_dense_model_and_lowers_the_error_below_it():
    # full rank: every MLP layer replaced by its AFM twin at rank d2, then GFM's training stage
    model = tiny_vit(depth=3)
    x = images()
    with torch.no_grad():
        ref = model(x)
    adapter = create_adapter(model)
    scope = adapter.scope("mlp")
    batches = list(ctx().calibration_batches())
    gfm = create_method(GFMConfig(ratio=0.5, scope="mlp", epochs=3, lr=1e-4))
    gfm._teacher = model_outputs(model, batches)
    stats = collect_output_stats(model, scope, batches, CPU)
    for path, layer in scope.items():
        vals, vecs = stats[path].eig()
        adapter.replace(path, afm_layer(layer, vecs, stats[path].mean(), vecs.shape[0]))
    metrics = gfm.after(model, adapter, batches, ctx(), scope)
    assert metrics["method/gfm_steps"] == 12 and metrics["method/gfm_loss_first"] < 1e-9
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-3)
    # below full rank GFM reduces the output error of AAFM (on the calibration inputs it mimics)
    x = torch.cat(batches)
    with torch.no_grad():
        ref = tiny_vit(depth=3)(x)
    errors = {}
    for name, cfg in (("aafm", AAFMConfig(ratio=0.6, scope="mlp")),
                      ("gfm", GFMConfig(ratio=0.6, scope="mlp", epochs=8, lr=1e-3))):
        model = tiny_vit(depth=3)
        method = create_method(cfg)
        out = method.apply(model, create_adapter(model), ctx())
        with torch.no_grad():
            errors[name] = rel_err(model(x), ref)
    assert out["method/gfm_loss_last"] < out["method/gfm_loss_first"]
    assert errors["gfm"] < errors["aafm"]


def test_aafm_compresses_convolutions_and_round_trips(tmp_path):
    torch.manual_seed(0)
    net = ConvNet().eval()
    x = images()
    method = create_method(AAFMConfig(ratio=0.5, scope="prunable", allocation="uniform"))
    adapter = create_adapter(net)
    method.check(adapter)
    method.apply(net, adapter, ctx())
    assert isinstance(net.conv, LowRankConv2d) and isinstance(net.fc, LowRankLinear)
    assert max_useful_rank(nn.Linear(12 * 256, 10)) == 9
    save_compressed(net, tmp_path / "m.safetensors")
    torch.manual_seed(5)
    fresh = load_compressed(ConvNet().eval(), tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))


def test_gfm_on_demo_vit_runs_through_the_run_loop(task_cfg):
    cfg = task_cfg("demo_vit", "method=gfm", "method.ratio=0.5", "method.scope=mlp", "method.calib_images=128",
                   "method.epochs=1", "method.sensitivity_images=64")
    p = plan(cfg)
    assert execute(cfg, []) == "done", read_json(p.run_dir / RUN_JSON).get("traceback")
    m = read_json(p.run_dir / METRICS_JSON)
    assert 0.5 <= m["scope/removed_fraction"] <= 0.56 and 0 <= m["acc/top1"] <= 1
    assert m["method/gfm_steps"] == 2
