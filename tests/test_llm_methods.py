"""SVD-LLM and Basis Sharing: block-wise calibration statistics, whitened truncation, shared bases, the coefficient
update, exact parameter counts and a save -> load round trip, on a tiny random LLaMA and the tiny trained demo LM."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from core.errors import ConfigError
from core.io import read_json
from methods import CompressContext, create_method
from methods.basis_sharing import (
    BasisSharingConfig,
    PlanFitter,
    SharingPlan,
    basis_rank,
    consecutive_groups,
    refit_coefficients,
)
from methods.calibration import Gram, capture_block_inputs, collect_grams, run_blocks
from methods.modules import LowRankLinear, SharedBasisLinear
from methods.svd import rank_for_ratio, truncated_svd
from methods.svd_llm import SVDLLMConfig, whitened_basis, whitened_error, whitening_factor
from runners import accounting
from runners.checkpoint import load_compressed
from runners.record import METRICS_JSON
from runners.run import execute, plan
from tasks.adapters import LlamaAdapter, create_adapter
from tests.toy import tiny_llama

ROLES = ("q", "k", "v", "o", "gate", "up", "down")


pytestmark = pytest.mark.usefixtures("one_thread")


class Ctx(CompressContext):
    """A compression context with fixed random calibration windows (4 batches of 2 x 24 tokens)."""

    def calibration_batches(self):
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(4):
            yield {"input_ids": torch.randint(0, 64, (2, 24), generator=gen)}

    def provides(self, kind):
        return kind == "calibration_batches"


def ctx(seed: int = 0) -> Ctx:
    return Ctx(task=None, device=torch.device("cpu"), seed=seed, progress=False)


def logits(model, seed: int = 5) -> torch.Tensor:
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def anisotropic(n: int, d: int, seed: int) -> torch.Tensor:
    """Inputs whose features differ in scale by three orders of magnitude and are correlated (float64)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, -3, d, dtype=torch.float64) @ mix


# -- calibration statistics ----------------------------------------------------------------------------------------
def test_blockwise_grams_equal_a_direct_computation_from_all_activations():
    """Running float64 sums, block by block, equal X^T X of every input of every linear captured from whole
    forwards at once (max relative difference 1e-6: both runs compute the same float32 activations)."""
    model = tiny_llama()
    adapter = LlamaAdapter(model)
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [model.get_submodule(adapter.role_path(r, i)).register_forward_hook(
        lambda m, a, o, key=(r, i): inputs.setdefault(key, []).append(a[0].reshape(-1, a[0].shape[-1]).double()))
        for r in ROLES for i in range(3)]
    for batch in ctx().calibration_batches():
        with torch.no_grad():
            model(**batch)
    for h in hooks:
        h.remove()
    grams = collect_grams(adapter, ctx().calibration_batches(), ROLES, progress=False)
    assert set(grams) == {(r, i) for r in ROLES for i in range(3)}
    for (role, i), gram in grams.items():
        x = torch.cat(inputs[(role, i)])
        assert gram.tokens == x.shape[0] == 4 * 2 * 24
        torch.testing.assert_close(gram.xtx, x.T @ x, rtol=1e-6, atol=1e-6 * float((x.T @ x).abs().max()))
    assert grams[("q", 1)] is grams[("k", 1)] is grams[("v", 1)] and grams[("gate", 2)] is grams[("up", 2)]
    assert grams[("o", 1)] is not grams[("q", 1)]


def test_blockwise_grams_cross_swin_stages_through_the_patch_merging():
    """Swin merges patches between stages, so block i's output is not block i+1's input: the adapter's transition
    is applied and the statistics equal those of whole forwards."""
    import timm

    from tasks.adapters import TimmSwinAdapter

    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=16, patch_size=2,
                              embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=4, num_classes=5,
                              in_chans=1).eval()
    adapter = create_adapter(model)
    assert isinstance(adapter, TimmSwinAdapter)
    assert [adapter.transition(i) is not None for i in range(4)] == [False, False, True, False]
    batches = [torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    inputs: dict[tuple[str, int], list[torch.Tensor]] = {}
    hooks = [model.get_submodule(adapter.role_path(r, i)).register_forward_hook(
        lambda m, a, o, key=(r, i): inputs.setdefault(key, []).append(a[0].reshape(-1, a[0].shape[-1]).double()))
        for r in ("qkv", "fc2") for i in range(4)]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    grams = collect_grams(adapter, batches, ["qkv", "fc2"], progress=False)
    for (role, i), gram in grams.items():
        x = torch.cat(inputs[(role, i)])
        assert gram.tokens == x.shape[0]
        torch.testing.assert_close(gram.xtx, x.T @ x, rtol=1e-5, atol=1e-5 * float((x.T @ x).abs().max()))


def test_calibration_passes_leave_the_model_unchanged_and_cache_one_input_per_batch():
    model = tiny_llama()
    before = logits(model)
    inputs = capture_block_inputs(LlamaAdapter(model), ctx().calibration_batches(), progress=False)
    assert len(inputs.hidden) == 4 and inputs.hidden[0].shape == (2, 24, 32) and len(inputs.block_kwargs) == 3
    run_blocks(LlamaAdapter(model), inputs, ["q"], lambda i, g: None, progress=False)
    with torch.no_grad():  # after the last block, the cached states are the model's final hidden states
        final = model.model(**next(iter(ctx().calibration_batches()))).last_hidden_state
    torch.testing.assert_close(model.model.norm(inputs.hidden[0]), final)
    torch.testing.assert_close(logits(model), before)


def test_whitening_falls_back_to_damping_on_a_singular_gram():
    x = anisotropic(20, 8, 0)
    x[:, 3] = 0  # a dead input feature
    chol, damped = whitening_factor(x.T @ x)
    assert damped and torch.isfinite(chol).all()
    assert not whitening_factor(anisotropic(50, 8, 1).T @ anisotropic(50, 8, 1))[1]


# -- whitened truncation and shared bases ----------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 3, 6])
def test_whitened_truncation_is_optimal_and_beats_plain_svd(rank):
    """||X(W - W_hat)^T||_F^2 of SVD-LLM equals the Eckart-Young tail of L^T W^T, and plain SVD does worse."""
    x = anisotropic(200, 12, 0)
    w = torch.randn(10, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gram = x.T @ x
    chol, _ = whitening_factor(gram)
    basis, (coeff,) = whitened_basis([w], chol, rank)
    err = whitened_error(w, coeff @ basis, gram)
    assert err == pytest.approx(float((x @ (w - coeff @ basis).T).pow(2).sum()), rel=1e-9)
    tail = torch.linalg.svdvals(chol.T @ w.T)[rank:].pow(2).sum()
    assert err == pytest.approx(float(tail), rel=1e-8)
    u, v = truncated_svd(w, rank)
    assert err < 0.9 * whitened_error(w, u @ v, gram)


def test_shared_basis_is_optimal_for_the_pooled_gram_and_exact_at_full_rank():
    g = torch.Generator().manual_seed(2)
    xs = [anisotropic(100, 12, s) for s in (3, 4)]
    ws = [torch.randn(7, 12, generator=g, dtype=torch.float64) for _ in xs]
    gram = sum(x.T @ x for x in xs)
    chol, _ = whitening_factor(gram)
    basis, coeffs = whitened_basis(ws, chol, 5)
    assert basis.shape == (5, 12) and [c.shape for c in coeffs] == [(7, 5), (7, 5)]
    pooled = sum(whitened_error(w, c @ basis, gram) for w, c in zip(ws, coeffs))
    stacked = torch.cat([w.T for w in ws], dim=1)
    assert pooled == pytest.approx(float(torch.linalg.svdvals(chol.T @ stacked)[5:].pow(2).sum()), rel=1e-8)
    # one basis for both costs more than one each, and less than any basis from the unweighted SVD
    private = sum(whitened_error(w, whitened_basis([w], chol, 5)[1][0] @ whitened_basis([w], chol, 5)[0], gram)
                  for w in ws)
    plain = torch.linalg.svd(stacked, full_matrices=False)[0][:, :5].T
    assert private <= pooled < sum(whitened_error(w, c @ plain, gram) for w, c in
                                   zip(ws, refit_coefficients(plain, ws, gram)))
    basis, coeffs = whitened_basis(ws, chol, 12)
    for w, c in zip(ws, coeffs):
        torch.testing.assert_close(c @ basis, w, rtol=1e-9, atol=1e-9)


def test_refit_matches_least_squares_on_the_activations_and_reduces_the_error():
    """The closed-form update equals lstsq on the raw activations (a slow reference) and never increases the
    whitened error of the coefficients it replaces."""
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(6, 10, generator=g, dtype=torch.float64) for _ in range(2)]
    fit_x, new_x = anisotropic(80, 10, 5), anisotropic(90, 10, 6) + 0.3
    basis, coeffs = whitened_basis(ws, whitening_factor(fit_x.T @ fit_x)[0], 4)
    new_gram = new_x.T @ new_x
    refit = refit_coefficients(basis, ws, new_gram)
    for w, c_old, c_new in zip(ws, coeffs, refit):
        reference = torch.linalg.lstsq(new_x @ basis.T, new_x @ w.T).solution.T
        torch.testing.assert_close(c_new, reference, rtol=1e-7, atol=1e-9)
        assert whitened_error(w, c_new @ basis, new_gram) < whitened_error(w, c_old @ basis, new_gram)


# -- the methods on a model ----------------------------------------------------------------------------------------
def test_full_rank_plan_reproduces_the_dense_model():
    """A plan at full rank (classes of 2 and a remainder of 1, every role) is the dense model again."""
    model = tiny_llama()
    dense = logits(model)
    adapter = LlamaAdapter(model)
    groups = {r: consecutive_groups(3, 2) for r in ROLES}
    ranks = {r: [min(model.get_submodule(adapter.role_path(r, 0)).in_features,
                     len(g) * model.get_submodule(adapter.role_path(r, 0)).out_features) for g in groups[r]]
             for r in ROLES}
    fitter = PlanFitter(adapter, SharingPlan(groups, ranks))
    run_blocks(adapter, capture_block_inputs(adapter, ctx().calibration_batches(), False), ROLES, fitter,
               progress=False)
    assert len(fitter.bases) == 2 * len(ROLES) and not fitter.grams
    assert all(isinstance(model.get_submodule(adapter.role_path(r, i)), SharedBasisLinear)
               for r in ROLES for i in range(3))
    torch.testing.assert_close(logits(model), dense, rtol=1e-4, atol=1e-4)


def test_svd_llm_at_full_rank_reproduces_the_dense_model(monkeypatch):
    model = tiny_llama()
    dense = logits(model)
    monkeypatch.setattr("methods.svd_llm.rank_for_ratio", lambda out_f, in_f, ratio: min(out_f, in_f))
    create_method(SVDLLMConfig(ratio=0.5)).apply(model, LlamaAdapter(model), ctx())
    assert isinstance(model.model.layers[0].mlp.down_proj, LowRankLinear)
    torch.testing.assert_close(logits(model), dense, rtol=1e-4, atol=1e-4)


def test_rank_formula_matches_the_official_llama_7b_ranks():
    """q/k/v, o, up/gate, down of LLaMA-7B at 20 % and 50 % (n = 2 for shared types, 1 for private)."""
    shapes = {"qkv": (4096, 4096, 2), "o": (4096, 4096, 1), "up": (4096, 11008, 2), "down": (11008, 4096, 1)}
    assert [basis_rank(*shapes[k], 0.2) for k in shapes] == [2184, 1638, 2762, 2388]
    assert [basis_rank(*shapes[k], 0.5) for k in shapes] == [1365, 1024, 1726, 1492]


@pytest.mark.parametrize("ratio", [0.2, 0.45])
def test_basis_sharing_stores_exactly_the_rank_formula(ratio):
    model = tiny_llama()
    adapter = LlamaAdapter(model)
    scope = adapter.scope("linear")
    dense = accounting.dense_counts(model, scope)
    method = create_method(BasisSharingConfig(ratio=ratio))
    method.check(adapter)
    out = method.apply(model, adapter, ctx())
    shape = {"q": (32, 32), "k": (32, 32), "v": (32, 32), "o": (32, 32), "gate": (48, 32), "up": (48, 32),
             "down": (32, 48)}  # (d_out, d_in)
    expected = 0
    for role, (d_out, d_in) in shape.items():
        sizes = [2, 1] if role in ("q", "k", "v", "gate", "up") else [1, 1, 1]
        for n in sizes:
            k = int(n * d_in * d_out * (1 - ratio) // (d_in + n * d_out))
            expected += k * d_in + n * k * d_out
    counts = accounting.compressed_counts(model, {p: model.get_submodule(p) for p in scope}, dense)
    assert counts["scope/params_stored"] == expected == method.plan(LlamaAdapter(tiny_llama())).stored_params(shape)
    assert ratio <= counts["scope/removed_fraction"] <= ratio + 0.06
    assert out["method/bases"] == 5 * 2 + 2 * 3
    layers = model.model.layers
    assert layers[0].self_attn.q_proj.v is layers[1].self_attn.q_proj.v is not layers[2].self_attn.q_proj.v
    assert layers[0].self_attn.q_proj.v is not layers[0].self_attn.k_proj.v
    assert layers[0].self_attn.o_proj.v is not layers[1].self_attn.o_proj.v


def test_group_size_one_is_svd_llm():
    a, b = tiny_llama(), tiny_llama()
    create_method(BasisSharingConfig(ratio=0.4, group_size=1)).apply(a, LlamaAdapter(a), ctx())
    create_method(SVDLLMConfig(ratio=0.4)).apply(b, LlamaAdapter(b), ctx())
    for r in ROLES:
        for i in range(3):
            ma, mb = (m.get_submodule(LlamaAdapter(m).role_path(r, i)) for m in (a, b))
            assert ma.rank == mb.rank
            torch.testing.assert_close(ma.dense_weight(), mb.dense_weight(), rtol=1e-5, atol=1e-6)


def test_coefficient_update_reduces_the_whitened_error_on_the_compressed_inputs():
    """With update=true the bases stay, and every class's coefficients lower sum_i ||X'(W_i - C_i B)^T||_F^2
    for X'^T X' the class's pooled inputs in the compressed (pre-update) model, the statistics the update uses."""
    plain, updated, dense = tiny_llama(), tiny_llama(), tiny_llama()
    create_method(BasisSharingConfig(ratio=0.5)).apply(plain, LlamaAdapter(plain), ctx())
    method = create_method(BasisSharingConfig(ratio=0.5, update=True))
    method.apply(updated, LlamaAdapter(updated), ctx())
    grams = collect_grams(LlamaAdapter(plain), ctx().calibration_batches(), ROLES, progress=False)
    gains = []
    for role, group, _ in method.plan(LlamaAdapter(dense)).classes():
        gram = Gram.pooled([grams[(role, i)] for i in group]).xtx
        paths = [LlamaAdapter(dense).role_path(role, i) for i in group]
        errors = [sum(whitened_error(dense.get_submodule(p).weight, model.get_submodule(p).dense_weight(), gram)
                      for p in paths) for model in (plain, updated)]
        torch.testing.assert_close(plain.get_submodule(LlamaAdapter(plain).role_path(role, group[0])).v,
                                   updated.get_submodule(LlamaAdapter(updated).role_path(role, group[0])).v)
        assert errors[1] <= errors[0] * (1 + 1e-9), (role, group, errors)
        gains.append(errors[0] - errors[1])
    assert max(gains) > 0


def test_bad_configurations_are_refused_before_compute():
    with pytest.raises(ConfigError, match="group_size"):
        BasisSharingConfig(group_size=0)
    with pytest.raises(ConfigError, match="default"):
        BasisSharingConfig(shared={"llama": ["q"]})
    model = tiny_llama()
    with pytest.raises(ConfigError, match="roles qkv unknown"):
        create_method(BasisSharingConfig(shared={"default": ["qkv"]})).check(LlamaAdapter(model))
    with pytest.raises(ConfigError, match="leaves rank 0"):
        create_method(BasisSharingConfig(ratio=0.999)).check(LlamaAdapter(model))
    toy = torch.nn.Sequential(torch.nn.Linear(4, 4))
    for cfg in (SVDLLMConfig(), BasisSharingConfig()):
        with pytest.raises(ConfigError, match="named linear roles"):
            create_method(cfg).check(create_adapter(toy))


# -- the trained demo LM through the run loop ------------------------------------------------------------------------
def test_whitened_truncation_beats_plain_svd_on_the_trained_demo_lm(task_cfg):
    """On every linear of the (tiny) trained demo LM, at 40 %: SVD-LLM's ||X(W - W_hat)^T||_F is below plain SVD's."""
    p = plan(task_cfg("demo_lm", "method=svd_llm", "method.ratio=0.4"))
    model = p.task.build_model(0)
    adapter = create_adapter(model)
    grams = collect_grams(adapter, p.task.calibration_batches(0), ROLES, progress=False)
    plain = {path: layer.weight.detach().clone() for path, layer in adapter.scope("linear").items()}
    for path, w in plain.items():
        u, v = truncated_svd(w, rank_for_ratio(w.shape[0], w.shape[1], 0.4))
        plain[path] = (w, u @ v)
    p.method.apply(model, adapter, CompressContext(p.task, torch.device("cpu"), 0, progress=False))
    index = {adapter.role_path(r, i): (r, i) for r in ROLES for i in range(len(adapter.block_paths()))}
    for path, (w, plain_hat) in plain.items():
        gram = grams[index[path]].xtx
        assert whitened_error(w, model.get_submodule(path).dense_weight(), gram) < whitened_error(w, plain_hat, gram)


def test_basis_sharing_run_round_trips_through_safetensors(task_cfg):
    """A basis_sharing run saved with save_model reloads onto a fresh dense model with its bases shared again,
    each stored once, and gives the recorded perplexity."""
    cfg = task_cfg("demo_lm", "method=basis_sharing", "method.ratio=0.4", "method.update=true", "save_model=true")
    p = plan(cfg)
    assert execute(cfg, []) == "done"
    metrics = read_json(p.run_dir / METRICS_JSON)
    assert 0.4 <= metrics["scope/removed_fraction"] <= 0.46
    n_blocks = len(p.task.build_model(0).model.layers)
    # measured in the inference layout: (q, k, v) and (gate, up) fused in every block; no Triton on the CPU
    assert metrics["protocol/fused_input_groups"] == 2 * n_blocks and metrics["protocol/kernels"] == "torch"
    path = p.run_dir / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys, aliases = set(f.keys()), json.loads(f.metadata()["aliases"])
    assert "model.layers.1.self_attn.q_proj.v" in aliases and "model.layers.1.self_attn.q_proj.v" not in keys
    assert "model.layers.1.self_attn.o_proj.v" in keys
    model = load_compressed(p.task.build_model(0), path).eval()
    layers = model.model.layers
    assert layers[0].mlp.up_proj.v is layers[1].mlp.up_proj.v and isinstance(layers[1].mlp.up_proj, SharedBasisLinear)
    assert p.task.evaluate(model)["ppl/demo"] == pytest.approx(metrics["ppl/demo"], rel=1e-6)


@pytest.mark.parametrize("name", ["svd", "svd_llm", "basis_sharing", "geo_sharing"])
def test_rank_multiple_rounds_every_rank_down_to_the_hardware_tile(name):
    """rank_multiple=4: every stored rank is the budget's rank rounded down to a multiple of 4 (never below 4), so
    the model keeps no more than the budget; rank_multiple=1 is the exact budget."""
    from methods import METHODS
    from core.compressed import CompressedModule

    def ranks(multiple):
        model = tiny_llama()
        cfg = METHODS.get(name).config_class(ratio=0.5, rank_multiple=multiple)
        method = create_method(cfg)
        adapter = LlamaAdapter(model)
        method.check(adapter)
        method.apply(model, adapter, ctx())
        return {path: module.rank for path, module in model.named_modules() if isinstance(module, CompressedModule)
                and hasattr(module, "rank")}

    exact, rounded = ranks(1), ranks(4)
    assert exact.keys() == rounded.keys() and exact
    assert any(r % 4 for r in exact.values())   # the check can fail: some exact ranks are not multiples of 4
    for path, r in exact.items():
        if name == "geo_sharing":  # its classes are chosen under the rounded ranks, so they may differ: tiles only
            assert rounded[path] % 4 == 0 and rounded[path] >= 4, path
        else:
            assert rounded[path] == max(4, r // 4 * 4), path
    with pytest.raises(ConfigError, match="rank_multiple=0"):
        METHODS.get(name).config_class(ratio=0.5, rank_multiple=0)
