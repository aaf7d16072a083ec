"""FiPS: groups, ranks, SVD initialisation, block-wise reconstruction, RigL / GMP sparsity, accounting, compact
checkpoints, and runs through the run loop (tiny timm ViT / Swin, tiny random LLaMA, demo_lm, demo_vit)."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from core.errors import ConfigError
from core.io import read_json
from methods import CompressContext, create_method
from methods.calibration import capture_block_io
from methods.fips import FiPSConfig
from methods.fips_factors import group_rank, make_groups, mlp_layers, plan_groups, svd_init
from methods.modules import MaskedFactor, SharedFactorLinear
from methods.reconstruction import train_steps
from methods.sparse_training import GMP, RigL, make_sparsifier
from runners import accounting
from runners.checkpoint import load_compressed, save_compressed
from runners.record import METRICS_JSON, RUN_JSON
from runners.run import execute, plan
from tasks.adapters import create_adapter
from tasks.data import stratified_indices
from tests.toy import tiny_vit

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def tiny_swin(depths=(2, 2, 6, 2), seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=32, patch_size=2, window_size=2, embed_dim=8,
                             depths=depths, num_heads=(1, 1, 2, 2), num_classes=10).eval()


class Ctx(CompressContext):
    """Random calibration images (3 batches of 8) for a 16 x 16 (or ``size``) RGB model."""

    size = 16

    def provides(self, kind):
        return kind == "calibration_batches" or (self.task is not None and self.task.provides(kind))

    def calibration_batches(self):
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(3):
            yield torch.randn(8, 3, self.size, self.size, generator=g)


def ctx(seed: int = 0, size: int = 16) -> Ctx:
    c = Ctx(task=None, device=CPU, seed=seed, progress=False)
    c.size = size
    return c


def fips(model, **kw):
    method = create_method(FiPSConfig(**{"ratio": 0.5, **kw}))
    adapter = create_adapter(model)
    method.check(adapter)
    return method, adapter


def images(n: int = 4, size: int = 16, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- shapes, ranks, groups ------------------------------------------------------------------------------------------
def test_rank_formula_reproduces_the_official_ranks():
    """The official ranks (cemuyuk/FiPS ``compute_sparse_r``): DeiT-B groups of 4, Swin-L stage groups, Gemma-2-2B,
    Llama-3.1-8B (official form)."""
    deit = dict(d=768, cols=8 * 3072, n_layers=8)
    assert [group_rank(**deit, kept=p, sparsity=0.75) for p in (0.5, 0.4, 0.25)] == [1365, 1092, 682]
    assert group_rank(**deit, kept=0.5, sparsity=0.0) == 372
    swin = [(192, 2), (384, 2), (768, 6), (1536, 2)]  # (d, blocks in the group), 2 layers a block
    assert [group_rank(d, 2 * n * 4 * d, 2 * n, 0.4, 0.75) for d, n in swin] == [245, 491, 1134, 1966]
    assert [group_rank(2304, 3 * n * 9216, 3 * n, 0.5, 0.75) for n in (2, 8)] == [3949, 4423]
    # Llama-3.1-8B: d_ff = 3.5 d; the official expression assumes 4 d (7561), the exact one solves the budget
    assert group_rank(4096, 12 * 14336, 12, 0.5, 0.75, formula="official") == 7561
    exact = group_rank(4096, 12 * 14336, 12, 0.5, 0.75)
    assert 4096 * exact + 0.25 * exact * 12 * 14336 <= 0.5 * 12 * 4096 * 14336 < 4096 * (exact + 1) * 1.25 * 12 * 14336
    assert group_rank(768, 8 * 3072, 8, 0.5, 0.75, multiple=64) == 1344


def test_groups_are_contiguous_and_never_cross_a_swin_stage():
    vit = create_adapter(tiny_vit(depth=12))
    assert make_groups(vit, mlp_layers(vit), None, None) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert make_groups(vit, mlp_layers(vit), 5, None) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    # Swin-L's depths (2, 2, 18, 2): the official grouping [0,1] [2,3] [4-9] [10-15] [16-21] [22,23]
    swin = create_adapter(tiny_swin(depths=(2, 2, 18, 2)))
    layers = mlp_layers(swin)
    assert make_groups(swin, layers, None, None) == [[0, 1], [2, 3], list(range(4, 10)), list(range(10, 16)),
                                                     list(range(16, 22)), [22, 23]]
    stage = [swin.stage_of(p) for p in swin.block_paths()]
    for size in (1, 3, 4, 7, 100):
        groups = make_groups(swin, layers, size, None)
        assert [b for g in groups for b in g] == list(range(24))
        assert all(len({stage[b] for b in g}) == 1 and len(g) <= size for g in groups)
    with pytest.raises(ConfigError, match="crosses a stage"):
        make_groups(swin, layers, None, [[0, 1, 2], *[[b] for b in range(3, 24)]])
    with pytest.raises(ConfigError, match="contiguous"):
        make_groups(vit, mlp_layers(vit), None, [[0, 2], [1, 3], *[[b] for b in range(4, 12)]])
    with pytest.raises(ConfigError, match="cover"):
        make_groups(vit, mlp_layers(vit), None, [[0, 1]])
    # shapes: fc1 (d_ff x d) is transposed, fc2 (d x d_ff) is not; both oriented d x d_ff
    fc1, fc2 = layers[4]
    assert (fc1.role, fc1.transposed, fc1.d, fc1.cols) == ("fc1", True, 32, 128)
    assert (fc2.role, fc2.transposed, fc2.d, fc2.cols) == ("fc2", False, 32, 128)


def test_svd_init_is_exact_at_full_and_overcomplete_rank():
    m = torch.randn(6, 40, dtype=torch.float64)
    for rank in (6, 9, 20):  # overcomplete ranks pad U with zeros, V with scaled copies of its top rows
        u, v = svd_init(m, rank)
        assert u.shape == (6, rank) and v.shape == (rank, 40)
        torch.testing.assert_close(u @ v, m)
    u, v = svd_init(m, 9, tau=32.0)
    torch.testing.assert_close(v[6:9], v[0:3] / 32)
    assert torch.all(u[:, 6:] == 0)
    u, v = svd_init(m, 2)  # truncated: the best rank-2 approximation, singular values in V
    s = torch.linalg.svdvals(m)
    assert torch.linalg.matrix_norm(m - u @ v) ** 2 == pytest.approx(float((s[2:] ** 2).sum()))
    torch.testing.assert_close(v.norm(dim=1), s[:2])


def test_full_rank_zero_sparsity_reproduces_the_mlp_outputs():
    for rank in (32, 48):  # d = 32: full rank, and overcomplete
        model = tiny_vit()
        x = images()
        ref_out = {}
        hooks = [m.register_forward_hook(lambda mod, a, out, i=i: ref_out.__setitem__(i, out))
                 for i, m in enumerate(b.mlp for b in model.blocks)]
        with torch.no_grad():
            ref = model(x)
        for h in hooks:
            h.remove()
        method, adapter = fips(model, sparsity=0.0, rank=rank, steps=0)
        method.apply(model, adapter, ctx())
        assert all(isinstance(m, SharedFactorLinear) for m in adapter.scope("mlp").values())
        with torch.no_grad():
            for i, block in enumerate(model.blocks):
                torch.testing.assert_close(block.mlp(_mlp_input(model, x, i)),
                                           ref_out[i], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(model(x), ref, atol=2e-5, rtol=1e-4)


def _mlp_input(model, x, i):
    captured = {}
    h = model.blocks[i].mlp.register_forward_pre_hook(lambda mod, a: captured.__setitem__("x", a[0]))
    model(x)
    h.remove()
    return captured["x"]


@pytest.mark.parametrize("transposed", [True, False])
def test_shared_factor_linear_computes_its_dense_weight_on_both_paths(transposed):
    g = torch.Generator().manual_seed(0)
    basis = torch.nn.Parameter(torch.randn(8, 12, generator=g))
    layer = SharedFactorLinear.from_shared(basis, torch.randn(12, 32, generator=g), torch.randn(32 if transposed
                                                                                              else 8, generator=g),
                                           transposed)
    layer.v.set_mask(torch.rand(12, 32, generator=g) > 0.5)
    assert layer.dense_weight().shape == ((32, 8) if transposed else (8, 32)) and layer.u is basis
    for rows in (1, 500):  # few rows: factor by factor; many: rebuild W once
        x = torch.randn(rows, layer.in_features, generator=g)
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.dense_weight(), layer.bias),
                                   atol=1e-4, rtol=1e-4)
    stored = dict((id(t), n) for t, n in layer.stored_tensors(weights_only=True))
    assert stored[id(basis)] == 96 and sum(stored.values()) == 96 + int(layer.v.mask.sum())
    assert layer.index_bytes() == 48


def test_one_basis_per_group_shared_by_its_layers():
    model = tiny_vit(depth=6)
    method, adapter = fips(model, group_size=4, steps=0)
    rank = plan_groups(adapter, method.cfg)[0].rank
    method.apply(model, adapter, ctx())
    layers = list(adapter.scope("mlp").values())
    assert len({id(m.u) for m in layers}) == 2
    assert all(m.u is layers[0].u for m in layers[:8]) and all(m.u is layers[8].u for m in layers[8:])
    assert layers[0].transposed and not layers[1].transposed
    assert layers[0].u.shape == (32, rank)


# -- training and sparsity ------------------------------------------------------------------------------------------
def test_reconstruction_loss_falls_over_the_first_steps():
    model = tiny_vit()
    method, adapter = fips(model, steps=12, update_every=4, lr=1e-3)
    metrics = method.apply(model, adapter, ctx())
    hist = method.history
    assert len(hist) == 12 and all(math.isfinite(v) for v in hist)
    assert sum(hist[-3:]) / 3 < 0.7 * hist[0]
    assert metrics["method/loss_last"] == hist[-1] and metrics["method/v_sparsity"] == pytest.approx(0.75, abs=1e-4)
    # only the FiPS factors and MLP biases changed; attention and norms are the dense model's
    dense = tiny_vit()
    for name, p in model.named_parameters():
        if ".mlp." not in name:
            assert torch.equal(p, dense.get_parameter(name)), name


def test_tiny_swin_groups_per_stage_and_trains():
    model = tiny_swin()
    x = images(2, 32)
    method, adapter = fips(model, steps=4, update_every=2, ratio=0.6)
    groups = plan_groups(adapter, method.cfg)
    assert [g.blocks for g in groups] == [[0, 1], [2, 3], [4, 5, 6, 7, 8, 9], [10, 11]]
    assert [g.d for g in groups] == [8, 16, 32, 64]
    metrics = method.apply(model, adapter, ctx(size=32))
    assert metrics["method/groups"] == 4 and len(method.history) == 4
    c = accounting.count(adapter.scope("mlp").values(), weights_only=True)
    assert c["params_stored"] <= 0.4 * sum(2 * len(g.blocks) * 4 * g.d * g.d for g in groups)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


class FakeImageTask:
    name = "fake"

    def provides(self, kind):
        return kind == "training_batches"

    def training_batches(self, seed, batch_size):
        g = torch.Generator().manual_seed(seed)
        while True:
            yield torch.randn(batch_size, 3, 16, 16, generator=g), torch.randint(0, 10, (batch_size,), generator=g)


@pytest.mark.parametrize("loss", ["ce", "kd"])
def test_finetune_stage_trains_the_whole_model_and_keeps_v_sparse(loss):
    model = tiny_vit()
    method, adapter = fips(model, steps=2, finetune_steps=3, finetune_batch_size=4, finetune_loss=loss)
    c = ctx()
    c.task = FakeImageTask()
    c.calibration_batches = ctx().calibration_batches
    metrics = method.apply(model, adapter, c)
    assert math.isfinite(metrics["method/finetune_loss_last"])
    assert not torch.equal(model.blocks[0].attn.qkv.weight, tiny_vit().blocks[0].attn.qkv.weight)
    for m in adapter.scope("mlp").values():
        assert torch.all(m.v.weight[~m.v.mask] == 0)
    assert metrics["method/v_sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert not any(p.requires_grad for p in model.parameters())


def test_finetune_needs_a_task_with_training_batches():
    model = tiny_vit()
    method, adapter = fips(model, steps=1, finetune_steps=2)
    with pytest.raises(ConfigError, match="training batches"):
        method.apply(model, adapter, ctx())


def test_block_cache_shares_consecutive_tensors_and_stops_after_the_last_block():
    model = tiny_swin()
    adapter = create_adapter(model)
    cache = capture_block_io(adapter, [images(2, 32)], store="cpu")
    n = len(adapter.block_paths())
    assert len(cache.inputs) == n and all(len(x) == 1 for x in cache.inputs)
    stage = [adapter.stage_of(p) for p in adapter.block_paths()]
    for b in range(1, n):  # inside a stage, block b's input is block b-1's output; across, PatchMerging runs between
        assert (cache.inputs[b][0] is cache.targets[b - 1][0]) == (stage[b] == stage[b - 1])
    with torch.no_grad():
        y = adapter.blocks()[3](cache.inputs[3][0])
    torch.testing.assert_close(y, cache.targets[3][0])


def factors(shapes=((6, 20), (6, 30)), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for r, c in shapes:
        f = MaskedFactor(r, c)
        with torch.no_grad():
            f.weight.copy_(torch.randn(r, c, generator=g))
        out.append(f)
    return out


def fake_training(fs, sparsifier, steps, seed=0):
    """A loss pulling the factors towards random targets; returns the nnz after every step."""
    g = torch.Generator().manual_seed(seed)
    targets = [torch.randn(f.weight.shape, generator=g) for f in fs]
    seen = []

    def step(t):
        loss = sum(((f.effective() - y) ** 2).sum() for f, y in zip(fs, targets))
        loss.backward()
        return float(loss.detach())

    params = [f.weight for f in fs]
    orig = sparsifier.after_optimizer_step

    def after(opt):
        orig(opt)
        if opt is not None:
            seen.append((sparsifier.nnz(), [f.mask.clone() for f in fs]))
            for f in fs:
                assert torch.all(f.weight[~f.mask] == 0)
    sparsifier.after_optimizer_step = after
    train_steps(params, sparsifier, steps, step, lr=0.05, lr_min=0.0, weight_decay=0.05)
    return seen


def test_train_steps_skips_the_update_of_a_step_without_backward_and_refuses_a_non_finite_loss():
    """GFM's converged steps run no backward: parameters and the cosine schedule stay where they are."""
    w = torch.nn.Parameter(torch.ones(3))

    def step(t):
        loss = ((w - 2.0) ** 2).sum()
        if t != 2:
            loss.backward()
        return float(loss.detach())

    hist = train_steps([w], None, 3, step, lr=0.1, lr_min=0.0, weight_decay=0.0)
    ref = torch.nn.Parameter(torch.ones(3))

    def ref_step(t):  # the same two updates, the skipped step last
        loss = ((ref - 2.0) ** 2).sum()
        if t != 3:
            loss.backward()
        return float(loss.detach())

    ref_hist = train_steps([ref], None, 3, ref_step, lr=0.1, lr_min=0.0, weight_decay=0.0)
    assert hist[0] > hist[1] == hist[2] and hist[:2] == ref_hist[:2]
    torch.testing.assert_close(w.detach(), ref.detach())  # second update at the schedule's second lr, not its third
    with pytest.raises(FloatingPointError, match="step 1"):
        train_steps([w], None, 2, lambda t: float("nan"), lr=0.1, lr_min=0.0, weight_decay=0.0)


def test_rigl_keeps_the_sparsity_exact_and_constant_while_moving_the_mask():
    fs = factors()
    rigl = RigL(fs, 0.75, steps=20, drop_fraction=0.3, update_every=2, end=0.75)
    seen = fake_training(fs, rigl, 20)
    kept = 300 - int(round(0.75 * 300))
    assert [n for n, _ in seen] == [kept] * 20 and rigl.nnz() == kept
    assert rigl.updates >= 3
    changed = [not all(torch.equal(a, b) for a, b in zip(m0, m1)) for (_, m0), (_, m1) in zip(seen, seen[1:])]
    assert any(changed) and not any(changed[15:])  # updates stop at t_end = 15
    assert rigl.drop_fraction(0) == pytest.approx(0.3) and rigl.drop_fraction(15) == pytest.approx(0.0)


def test_gmp_reaches_the_target_sparsity_on_its_schedule():
    fs = factors()
    gmp = GMP(fs, 0.75, steps=40, initial=0.05, accelerated=0.5, accel_at=0.25, update_every=5, end=0.75)
    gmp.prepare()
    assert gmp.sparsity() == pytest.approx(0.05, abs=1 / 300)
    seen = fake_training(fs, GMP(fs, 0.75, steps=40, update_every=5), 40)
    sparsity = [1 - n / 300 for n, _ in seen]
    assert sparsity[8] == pytest.approx(0.05, abs=1 / 300)  # t = 9 < t_accel = 10
    assert sparsity[9] == pytest.approx(0.5, abs=1 / 300)  # t = 10: the accelerated jump
    assert sparsity[29] == pytest.approx(0.75, abs=1 / 300) and sparsity[-1] == sparsity[29]  # t_end = 30
    assert all(a <= b for a, b in zip(sparsity, sparsity[1:]))
    s20 = 0.75 + (0.5 - 0.75) * (1 - 10 / 20) ** 3
    assert sparsity[19] == pytest.approx(s20, abs=1 / 300)
    # sparsimony's cubic term divides by t_end: it never reaches the target
    quirk = GMP(factors(), 0.75, steps=40, update_every=5, quirk=True)
    fake_training(quirk.factors, quirk, 40)
    assert quirk.sparsity() == pytest.approx(0.75 + (0.5 - 0.75) * (10 / 30) ** 3, abs=1 / 300)


def test_magnitude_sparsifier_keeps_the_largest_and_bad_kind_is_refused():
    fs = factors()
    sp = make_sparsifier("magnitude", fs, 0.5, steps=0)
    sp.prepare()
    w = torch.cat([f.weight.detach().abs().flatten() for f in fs])
    m = torch.cat([f.mask.flatten() for f in fs])
    assert int(m.sum()) == 150 and w[m].min() >= w[~m].max()
    with pytest.raises(ConfigError, match="sparsifier"):
        make_sparsifier("lottery", fs, 0.5, steps=10)


# -- accounting and checkpoints -------------------------------------------------------------------------------------
def test_accounting_counts_u_once_plus_nnz_v_and_the_mask_apart(tmp_path):
    model = tiny_vit(depth=6)
    dense_counts = accounting.dense_counts(model, create_adapter(model).scope("mlp"))
    method, adapter = fips(model, steps=3, update_every=1, group_size=4)
    groups = plan_groups(adapter, method.cfg)
    method.apply(model, adapter, ctx())
    scope = adapter.scope("mlp")
    u = sum(g.d * g.rank for g in groups)
    nnz = sum(int(m.v.mask.sum()) for m in scope.values())
    c = accounting.count(scope.values(), weights_only=True)
    assert c["params_stored"] == u + nnz
    assert c["index_overhead"] == sum(math.ceil(m.v.mask.numel() / 8) for m in scope.values())
    assert c["params_stored"] <= 0.5 * dense_counts["scope/params_dense"]
    assert c["params_stored"] == sum(g.stored_params(0.75) for g in groups)
    full = accounting.compressed_counts(model, scope, dense_counts)
    biases = sum(m.bias.numel() for m in scope.values())
    assert full["params_stored"] == dense_counts["params_dense"] - dense_counts["scope/params_dense"] + u + nnz
    assert full["scope/removed_fraction"] >= 0.5 and biases > 0


def test_save_load_round_trip_is_identical_and_stores_v_sparse(tmp_path):
    model = tiny_vit(depth=5)
    method, adapter = fips(model, steps=4, update_every=2, group_size=3)
    method.apply(model, adapter, ctx())
    path = tmp_path / "fips.safetensors"
    save_compressed(model, path)
    fresh = load_compressed(tiny_vit(depth=5, seed=3), path).eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    layers = list(create_adapter(fresh).scope("mlp").values())
    assert all(m.u is layers[0].u for m in layers[:6]) and layers[6].u is not layers[0].u
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert "blocks.0.mlp.fc1.v.values" in keys and "blocks.0.mlp.fc1.v.weight" not in keys
        assert f.get_tensor("blocks.0.mlp.fc1.v.values").numel() == int(model.blocks[0].mlp.fc1.v.mask.sum())
        assert "blocks.0.mlp.fc1.u" in keys and "blocks.1.mlp.fc2.u" not in keys  # the shared basis, once
    assert sum(int(m.v.mask.sum()) for m in layers) == sum(int(m.v.mask.sum())
                                                          for m in create_adapter(model).scope("mlp").values())


# -- LLM MLPs -------------------------------------------------------------------------------------------------------
class LMCtx(Ctx):
    def calibration_batches(self):
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(3):
            yield {"input_ids": torch.randint(0, 64, (2, 16), generator=gen)}


def test_llm_mlps_one_at_a_time_with_gmp():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=64, num_hidden_layers=5, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32, use_cache=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.model.layers.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    method, adapter = fips(model, steps=6, update_every=2, lr=1e-3, tokens_per_step=32)
    groups = plan_groups(adapter, method.cfg)
    assert [g.blocks for g in groups] == [[0, 1, 2, 3], [4]] and method.objective(adapter) == "mlp"
    metrics = method.apply(model, adapter, LMCtx(task=None, device=CPU, seed=0, progress=False))
    layers = adapter.scope("mlp")
    assert [m.transposed for m in list(layers.values())[:3]] == [True, True, False]  # gate, up / down
    assert metrics["method/steps"] == 5 * 6 and len(method.history) == 30
    for m in layers.values():  # GMP reaches the target on every MLP (global over that MLP's three V's)
        assert isinstance(m, SharedFactorLinear)
    for b in range(5):
        block = [layers[f"model.layers.{b}.mlp.{r}"] for r in ("gate_proj", "up_proj", "down_proj")]
        n = sum(m.v.mask.numel() for m in block)
        assert sum(int(m.v.mask.sum())for m in block) == n - round(0.75 * n)
    stored = accounting.count(layers.values(), weights_only=True)["params_stored"]
    assert stored <= 0.5 * 5 * 3 * 16 * 64


def test_llm_block_objective_passes_the_decoder_layers_their_keyword_arguments():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32, use_cache=False)
    model = LlamaForCausalLM(cfg).eval()
    method, adapter = fips(model, objective="block", steps=4, update_every=2, lr=1e-3)
    metrics = method.apply(model, adapter, LMCtx(task=None, device=CPU, seed=0, progress=False))
    assert metrics["method/objective_block"] == 1.0 and len(method.history) == 4
    assert all(math.isfinite(v) for v in method.history)


# -- configuration and the run loop -------------------------------------------------------------------------------
@pytest.mark.parametrize("override,match", [
    ("method.objective=joint", "objective"), ("method.sparsifier=lottery", "sparsifier"),
    ("method.scope=linear", "MLPs only"), ("method.sparsity=1.0", "sparsity"), ("method.cache_dtype=int8", "cache"),
    ("method.rank_formula=paper", "rank_formula"), ("method.group_size=0", "group_size"),
    ("method.finetune_loss=mse", "finetune_loss"), ("method.gmp_initial=0.9", "gmp_initial"),
])
def test_bad_switch_values_are_refused_before_anything_is_built(task_cfg, override, match):
    with pytest.raises(ConfigError, match=match):
        plan(task_cfg("demo_vit", "method=fips", override))


def test_stratified_calibration_sampler_follows_the_official_passes():
    labels = torch.arange(1000).repeat_interleave(8)
    idx = stratified_indices(labels, 3840, torch.Generator().manual_seed(0))
    counts = torch.bincount(labels[idx], minlength=1000)
    assert len(idx) == 3840 and len(set(idx.tolist())) == 3840
    assert sorted(torch.bincount(counts).nonzero().flatten().tolist()) == [3, 6]
    assert int((counts == 6).sum()) == 280
    small = stratified_indices(torch.tensor([0, 0, 1]), 10, torch.Generator().manual_seed(0))
    assert sorted(small.tolist()) == [0, 1, 2]


def test_fips_on_demo_lm_runs_through_the_run_loop(task_cfg):
    cfg = task_cfg("demo_lm", "method=fips", "method.ratio=0.5", "method.steps=5", "method.update_every=2")
    p = plan(cfg)
    assert execute(cfg, []) == "done", read_json(p.run_dir / RUN_JSON).get("traceback")
    m = read_json(p.run_dir / METRICS_JSON)
    assert 0.5 <= m["scope/removed_fraction"] <= 0.56 and m["method/v_sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert m["scope/params_stored"] == m["method/u_params"] + m["method/v_nnz"]
    assert m["scope/index_overhead"] > 0 and math.isfinite(m["ppl/demo"])


def test_fips_on_demo_vit_runs_through_the_run_loop_and_reloads(task_cfg):
    cfg = task_cfg("demo_vit", "method=fips", "method.ratio=0.5", "method.calib_images=96", "method.batch_size=32",
                   "method.steps=6", "method.update_every=2", "save_model=true")
    p = plan(cfg)
    assert execute(cfg, []) == "done", read_json(p.run_dir / RUN_JSON).get("traceback")
    m = read_json(p.run_dir / METRICS_JSON)
    assert 0.5 <= m["scope/removed_fraction"] <= 0.56 and 0 <= m["acc/top1"] <= 1
    assert m["method/steps"] == 6 and m["method/groups"] == 1 and m["method/loss_last"] < m["method/loss_first"]
    model = load_compressed(p.task.build_model(0), p.run_dir / "model.safetensors").eval()
    assert p.task.evaluate(model)["acc/top1"] == m["acc/top1"]


# -- the timm_image task family: named ImageNet configs, Swin kwargs, the benchmark script ---------------------------
@pytest.mark.parametrize("task,model", [("deit_base", "deit_base_patch16_224.fb_in1k"),
                                        ("swin_large", "swin_large_patch4_window7_224.ms_in22k_ft_in1k")])
def test_named_imagenet_configs_refuse_a_missing_root_before_anything_is_built(compose_cfg, tmp_path, task, model):
    from core.errors import MissingPathError

    cfg = compose_cfg(f"task={task}", "method=fips", "logger=none", f"task.data.root={tmp_path / 'nowhere'}")
    assert cfg.task.model == model and cfg.task.pretrained and cfg.task.data.transform == "timm"
    with pytest.raises(MissingPathError, match="does not exist"):
        plan(cfg)
    (tmp_path / "imagenet").mkdir()
    cfg.task.data.root = str(tmp_path / "imagenet")
    p = plan(cfg)
    assert p.task.data_transform_config()["input_size"] == (3, 224, 224)


def test_timm_task_builds_a_tiny_swin_from_yaml_lists(tmp_path):
    from tasks.adapters import TimmSwinAdapter
    from tasks.data import DataConfig
    from tasks.timm_image import TimmImageConfig, TimmImageTask
    from tasks.training import TrainConfig

    cfg = TimmImageConfig(name="tiny_swin", family="timm_image", model="swin_tiny_patch4_window7_224", num_classes=10,
                          in_chans=1, model_kwargs={"img_size": 8, "patch_size": 1, "window_size": 2, "embed_dim": 8,
                                                    "depths": [2, 2], "num_heads": [1, 2]},
                          data=DataConfig(dataset="digits"), train=TrainConfig(epochs=1, optimizer="adamw", lr=3e-3))
    task = TimmImageTask(cfg, tmp_path, CPU, progress=False)
    task.check()
    model = task._fresh_model(0)
    adapter = create_adapter(model)
    assert isinstance(adapter, TimmSwinAdapter) and len(adapter.block_paths()) == 4
    batches = list(task.stratified_batches(0, 40, 16)[0])
    assert [len(b) for b in batches] == [16, 16, 8] and batches[0].shape[1:] == (1, 8, 8)
    x, y = next(task.training_batches(0, 12))
    assert x.shape == (12, 1, 8, 8) and y.shape == (12,)


def test_bench_fips_runs_with_tiny_settings(tmp_path):
    from runners.bench_fips import main

    out = main(["--device", "cpu", "--images", "24", "--batch-size", "8", "--steps", "3", "--update-every", "2",
                "--model-kwargs", '{"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 2}',
                "--out", str(tmp_path / "bench.json")])
    r = out["result"]
    assert r["model"] == "deit_base_patch16_224" and r["steps"] == 3 and r["step_ms_mean"] > 0
    assert {"compress/calibration_s", "compress/factorise_s", "compress/fitting_s"} <= set(r["compress"])
    assert r["v_sparsity"] == pytest.approx(0.75, abs=1e-3) and (tmp_path / "bench.json").is_file()


def block_constant(mask: torch.Tensor, b: int) -> bool:
    blocks = mask.reshape(mask.shape[0] // b, b, mask.shape[1] // b, b)
    return torch.equal(blocks.any(3).any(1), blocks.all(3).all(1))


@pytest.mark.parametrize("kind", ["magnitude", "rigl", "gmp"])
def test_block_sparsifiers_keep_whole_blocks_at_the_exact_block_sparsity(kind):
    fs = factors(((8, 16), (8, 24)))   # 2 x 4 + 2 x 6 = 20 blocks of 4 x 4
    sp = make_sparsifier(kind, fs, 0.75, 20, update_every=2, rigl_drop_fraction=0.6, block=4)
    sp.prepare()
    seen = fake_training(fs, sp, 20)
    sp.finalize()
    kept = 20 - int(round(0.75 * 20))
    assert sp.active_units() == kept and sp.nnz() == kept * 16
    assert all(block_constant(f.mask, 4) for f in fs)
    if kind == "rigl":
        assert sp.updates >= 3 and {n for n, _ in seen} == {kept * 16}   # constant while the blocks move
    # the kept blocks are the largest by summed |w| at the last pruning (magnitude: at prepare)
    if kind == "magnitude":
        scores = torch.cat([sp.units(f.weight).flatten() for f in factors(((8, 16), (8, 24)))])
        chosen = torch.cat([sp.units(f.mask).flatten() for f in fs])
        assert torch.equal(chosen, scores >= scores.sort(descending=True).values[kept - 1])


def test_block_sparse_fips_plans_ranks_in_whole_blocks_and_runs_bsr_at_inference():
    model = tiny_vit()
    method, adapter = fips(model, steps=4, update_every=2, sparsity_block=16)
    method.apply(model, adapter, ctx())
    layers = [m for m in model.modules() if isinstance(m, SharedFactorLinear)]
    assert layers and all(m.rank % 16 == 0 and block_constant(m.v.mask, 16) for m in layers)
    x = images()
    with torch.no_grad():
        expected = model(x)
        for m in layers:
            m.for_inference()
        assert all(m.v_values.dim() == 3 for m in layers)   # BSR
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="sparsity_block=7 must divide"):
        fips(tiny_vit(), sparsity_block=7)
