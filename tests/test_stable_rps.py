"""STABLE-RPS, ROAST and HashedNet: mapping load, exactness at 1x, init-std invariance with Gamma, accounting, and
save/load of the shared array. All on CPU in float64 where trajectories are compared."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from core.errors import ConfigError
from methods.base import CompressContext
from methods.hashing import (
    HashedConv2d,
    HashedLinear,
    HashingConfig,
    hashednet_index,
    randomfold_index,
    roast_index,
    share_weights,
    slot_indices,
)
from methods.magnitude import kept_count
from methods.stable_rps import StableRPS, StableRPSConfig
from runners import accounting
from runners.checkpoint import load_compressed, save_compressed
from tasks.adapters import create_adapter
from tasks.models import resnet

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyNet(nn.Module):
    """conv -> BN -> ReLU -> conv -> ReLU -> global pool -> linear: 400 conv/linear weights."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.bn(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


def tiny(seed=0):
    torch.manual_seed(seed)
    return TinyNet().double()


def hashed(model, m, **cfg):
    """``model`` with its conv/linear weights shared through an array of ``m`` slots (run seed 0)."""
    adapter = create_adapter(model)
    scope = adapter.scope("prunable")
    share_weights(adapter, scope, m, HashingConfig(name="stable_rps", **cfg), 0, torch.Generator().manual_seed(0))
    return model


def weights(model):
    return [m.weight if isinstance(m, (nn.Conv2d, nn.Linear)) else m.dense_weight() for m in model.modules()
            if isinstance(m, (nn.Conv2d, nn.Linear, HashedConv2d, HashedLinear))]


def train(model, steps=4, seed=1, lr=0.05):
    """``steps`` of SGD (Nesterov momentum 0.9, weight decay 1e-3) on random data; the model in train mode."""
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-3)
    model.train()
    for _ in range(steps):
        x = torch.randn(6, 2, 6, 6, generator=g, dtype=dtype)
        y = torch.randint(0, 5, (6,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


N_TINY = 2 * 4 * 9 + 4 * 8 * 9 + 8 * 5


# -- mappings -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,m", [(1000, 1000), (1000, 999), (1000, 7), (270_896, 2709), (270_896, 271), (50, 3)])
def test_randomfold_every_slot_gets_floor_or_ceil_of_n_over_m(n, m):
    load = np.bincount(randomfold_index(np.arange(n), m, seed=3), minlength=m)
    assert load.sum() == n and load.min() >= n // m and load.max() <= -(-n // m)


def test_randomfold_load_over_a_whole_resnet20_is_optimal_and_hashednet_is_not():
    """Through the modules (global offsets in scope order): at 1x a bijection, at ~10x loads of floor/ceil."""
    for m_of_n in (lambda n: n, lambda n: kept_count(n, 0.9)):
        torch.manual_seed(0)
        model = resnet(20, 10, 3, 16)
        n = sum(w.numel() for w in weights(model))
        assert n == 270_896  # the spec's count of ResNet-20's conv + linear weights
        m = m_of_n(n)
        modules = [mod for mod in hashed(model, m).modules() if isinstance(mod, (HashedConv2d, HashedLinear))]
        load = sum(mod.slot_counts() for mod in modules)
        assert int(load.sum()) == n and load.min() >= n // m and load.max() <= -(-n // m)
    empty = (np.bincount(hashednet_index(np.arange(n), n, seed=0), minlength=n) == 0).mean()
    assert abs(empty - 1 / math.e) < 0.01  # balls into bins: about 1/e of the slots stay empty at m = n


def test_roast_tiles_are_contiguous_runs_of_the_shared_array():
    bk, bn, m = 4, 8, 1000
    idx = roast_index((20, 13), offset=77, m=m, seed=0, tile=(bk, bn))  # a Linear (out=20, in=13)
    assert idx.min() >= 0 and idx.max() < m
    view = idx.T  # (K = in, N = out)
    for i in range(0, 13, bk):
        for j in range(0, 20, bn):
            t = view[i:i + bk, j:j + bn]
            base = t[0, 0]
            rows, cols = np.meshgrid(np.arange(t.shape[0]), np.arange(t.shape[1]), indexing="ij")
            assert (t == base + rows * bn + cols).all()
    with pytest.raises(ConfigError, match="at least 32"):
        roast_index((20, 13), 0, 31, 0, (bk, bn))


def test_paper_roast_hashes_convs_element_wise_and_tiles_linears():
    conv = slot_indices("roast", (8, 4, 3, 3), 0, 500, 0, (4, 4), tile_convs=False)
    assert (conv.reshape(-1) == hashednet_index(np.arange(8 * 36), 500, 0)).all()
    tiled = slot_indices("roast", (8, 4, 3, 3), 0, 500, 0, (4, 4), tile_convs=True)
    assert (tiled.reshape(-1) != conv.reshape(-1)).any()


# -- training ---------------------------------------------------------------------------------------------------------
def test_stable_rps_training_at_1x_equals_dense_training():
    """m = n: RANDOMFOLD is a bijection and Gamma v1 = scale^2, so SGD on M moves the weights exactly as SGD on
    the dense weights (momentum, Nesterov and weight decay included)."""
    rps = hashed(tiny(), N_TINY, gamma="v1")
    dense = tiny()
    with torch.no_grad():
        for d, w in zip(weights(dense), weights(rps)):
            d.copy_(w)
    start = [w.detach().clone() for w in weights(dense)]
    train(rps), train(dense)
    for d, w in zip(weights(dense), weights(rps)):
        torch.testing.assert_close(w, d, rtol=1e-10, atol=1e-12)
    assert max((d - s).abs().max() for d, s in zip(weights(dense), start)) > 1e-2  # it did train


@pytest.mark.parametrize("gamma", ["v1", "v5"])
def test_gamma_makes_training_independent_of_the_init_std(gamma):
    """At 4x (collisions), the recovered weights after training do not depend on init_std with Gamma v1 / v5."""
    runs = [train(hashed(tiny(), N_TINY // 4, gamma=gamma, init_std=s)) for s in (0.001, 0.04, 3.0)]
    for other in runs[1:]:
        for a, b in zip(weights(runs[0]), weights(other)):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_without_gamma_training_depends_on_the_init_std():
    a, b = (train(hashed(tiny(), N_TINY // 4, gamma="none", init_std=s), lr=1e-4) for s in (0.04, 0.4))
    assert max((x - y).abs().max() for x, y in zip(weights(a), weights(b))) > 1e-3


def test_scale_is_the_layers_init_std_over_the_arrays():
    dense = tiny()
    rps = hashed(tiny(), 100, init_std=0.04)
    for d, mod in zip(weights(dense), (rps.conv1, rps.conv2, rps.fc)):
        assert mod.scale == pytest.approx(float(d.detach().std(unbiased=False)) / 0.04, rel=1e-12)


# -- accounting, storage --------------------------------------------------------------------------------------------
def test_one_shared_array_is_counted_once():
    model = hashed(tiny(), 100)
    mods = [m for m in model.modules() if isinstance(m, (HashedConv2d, HashedLinear))]
    assert all(m.array is mods[0].array for m in mods)
    scope = accounting.count(mods, weights_only=True)
    assert scope["params_stored"] == 100 and scope["index_overhead"] == 0
    whole = accounting.count(accounting.model_modules(model))
    assert whole["params_stored"] == 100 + 8 + 5 + 2 * 4  # M + conv2/fc biases + BN affine
    assert sum(1 for p in model.parameters() if p.numel() == 100) == 1  # the optimizer sees M once


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9, 0.99, 0.999])
def test_ratio_is_honoured_from_2x_to_1000x(ratio):
    torch.manual_seed(0)
    model = resnet(20, 10, 3, 16)
    method = StableRPS(StableRPSConfig(ratio=ratio))
    adapter = create_adapter(model)
    method.check(adapter)
    out = method.apply(model, adapter, CompressContext(task=None, device=torch.device("cpu"), seed=0))
    n = 270_896
    assert out["method/array_size"] == n - round(ratio * n)
    assert abs(1 - out["method/array_size"] / n - ratio) <= 0.5 / n


def test_roast_refuses_an_array_smaller_than_a_tile():
    from methods.roast import Roast, RoastConfig
    model = resnet(20, 10, 3, 16)
    with pytest.raises(ConfigError, match="ROAST tile"):
        Roast(RoastConfig(ratio=0.999, tile=[32, 32])).check(create_adapter(model))


def test_save_and_load_rebuild_the_shared_array(tmp_path):
    model = train(hashed(tiny().float(), 150, mapping="roast", tile=[4, 4], tile_convs=True)).eval()
    x = torch.randn(3, 2, 6, 6)
    save_compressed(model, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert {k for k in keys if k.endswith(".array")} == {"conv1.array"}  # written once, then aliased
    assert not any(k.endswith((".index", ".coef")) for k in keys)  # regenerated from the seed
    again = load_compressed(tiny(seed=5).float(), tmp_path / "m.safetensors").eval()
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    mods = [m for m in again.modules() if isinstance(m, (HashedConv2d, HashedLinear))]
    assert all(m.array is mods[0].array for m in mods)


def test_hashed_layers_compute_with_their_recovered_weight():
    model = hashed(tiny(), 200, mapping="hashednet").eval()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    h = F.relu(model.bn(F.conv2d(x, model.conv1.dense_weight(), None, 1, 1)))
    ref = F.relu(F.conv2d(h, model.conv2.dense_weight(), model.conv2.bias, 2, 1)).mean((2, 3))
    torch.testing.assert_close(model(x), F.linear(ref, model.fc.dense_weight(), model.fc.bias))


# -- the paper grid -------------------------------------------------------------------------------------------------
def test_the_paper_grid_is_methods_x_compressions_x_seeds_x_datasets_x_architectures(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from runners.preflight import sweep_points
    from runners.run import plan

    for folder in ("cifar10", "cifar100", "tiny-imagenet-200"):
        (tmp_path / folder).mkdir()
    monkeypatch.setenv("COMPBENCH_DATA", str(tmp_path))
    conf = Path(__file__).resolve().parents[1] / "conf"
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(conf), version_base="1.3"):
        points = sweep_points(["experiment=stable_rps_cifar", "logger=none", "device=cpu"], conf)
        grid = {tuple(sorted(o for o in job if o.split("=")[0] in ("task", "method", "method.ratio", "seed")))
                for job in points}
        assert len(points) == len(grid) == 6 * 10 * 10 * 3
        values = {key: sorted({o.split("=")[1] for job in points for o in job if o.startswith(key + "=")})
                  for key in ("task", "method", "method.ratio", "seed")}
        assert values["method"] == sorted(["dense", "stable_rps", "roast", "hashednet", "mag", "random", "snip",
                                           "grasp", "synflow", "ltr"])
        compressions = sorted(round(1 / (1 - float(r))) for r in values["method.ratio"])
        assert compressions == [2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
        assert values["seed"] == ["0", "1", "2"]
        assert values["task"] == sorted(f"{arch}_{data}" for arch in ("resnet20", "vgg11")
                                        for data in ("cifar10", "cifar100", "tiny_imagenet"))
        for job in points[::300]:
            p = plan(compose("run", overrides=job))
            assert p.run.task.train.epochs == 160 and p.method.train_time == (p.method.name != "dense")
    GlobalHydra.instance().clear()
