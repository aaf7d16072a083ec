"""Image tasks: CIFAR CNNs, datasets, the training loop and the cifar_cnn / timm_image families (CPU only)."""
from __future__ import annotations

import gzip
import os
import struct
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from core.errors import ConfigError
from tasks import TASKS, training
from tasks.adapters import CnnAdapter, TimmViTAdapter, create_adapter
from tasks.cifar_cnn import CifarCnnConfig, CifarCnnTask
from tasks.data import DataConfig, load_digits_split, load_fashion_mnist, load_image_data
from tasks.models import resnet, vgg
from tasks.timm_image import TimmImageConfig, TimmImageTask
from tasks.training import TrainConfig, evaluate_classifier, fit

CPU = torch.device("cpu")
TINY_VIT = dict(img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2, global_pool="avg")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_train(**kw) -> TrainConfig:
    base = dict(epochs=1, lr=0.05, milestones=[1], batch_size=128, augment=False, weight_decay=1e-4)
    return TrainConfig(**{**base, **kw})


def cnn_task(tmp_path: Path, **kw) -> CifarCnnTask:
    cfg = CifarCnnConfig(name="tiny_cnn", family="cifar_cnn", arch="resnet8", width=4, num_classes=10, in_chans=1,
                         data=DataConfig(dataset="digits"), train=tiny_train())
    return CifarCnnTask(replace(cfg, **kw), tmp_path / "cache", CPU)


def vit_task(tmp_path: Path, **kw) -> TimmImageTask:
    cfg = TimmImageConfig(name="tiny_vit", family="timm_image", model="vit_tiny_patch16_224",
                          model_kwargs=dict(TINY_VIT), num_classes=10, in_chans=1,
                          data=DataConfig(dataset="digits"), train=tiny_train(optimizer="adamw", lr=3e-3))
    return TimmImageTask(replace(cfg, **kw), tmp_path / "cache", CPU)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- models --------------------------------------------------------------------------------------------------------
def test_resnet20_parameter_count_matches_architecture():
    def conv(i, o, k=3):
        return i * o * k * k

    def bn(c):
        return 2 * c

    def block(i, o):  # two 3x3 convs + two BN, plus a 1x1 conv + BN shortcut where the width changes
        return conv(i, o) + bn(o) + conv(o, o) + bn(o) + (conv(i, o, 1) + bn(o) if i != o else 0)

    stem = conv(3, 16) + bn(16)
    stages = 3 * block(16, 16) + block(16, 32) + 2 * block(32, 32) + block(32, 64) + 2 * block(64, 64)
    fc = 64 * 10 + 10
    expected = stem + stages + fc
    assert expected == 272_474  # the "0.27 M" of the STABLE-RPS / Synaptic-Flow papers

    model = resnet(20, num_classes=10, in_chans=3, width=16)
    assert sum(p.numel() for p in model.parameters()) == expected
    weights = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weights) == 22 and sum(m.weight.numel() for m in weights) == 270_896
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in resnet(20, num_classes=100).parameters()) == 278_324
    with pytest.raises(ConfigError):
        resnet(21)


def test_vgg11_bn_shapes_and_count():
    model = vgg(11, num_classes=10, in_chans=3).eval()
    assert sum(p.numel() for p in model.parameters()) == 9_231_114
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert all(c.kernel_size == (3, 3) and c.bias is not None for c in convs)
    assert model.fc.in_features == 512 and model.fc.out_features == 10
    x = torch.randn(2, 3, 32, 32)
    sizes = []
    for name in model.block_names():
        x = model.get_submodule(name)(x)
        sizes.append(tuple(x.shape[1:]))
    assert sizes == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2), (512, 2, 2)]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)  # global pooling: Tiny-ImageNet size works too


def test_block_names_resolve_in_forward_order():
    model = resnet(20, in_chans=1)
    names = model.block_names()
    assert names == [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    order = []
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: order.append(n)) for n in names]
    model(torch.randn(1, 1, 8, 8))
    for h in hooks:
        h.remove()
    assert order == names


def test_adapters_match_demo_models(tmp_path):
    cnn = cnn_task(tmp_path, arch="resnet20", width=16)._fresh_model(0)
    adapter = create_adapter(cnn)
    assert type(adapter) is CnnAdapter
    assert adapter.block_paths() == cnn.block_names()
    prunable = adapter.scope("prunable")
    assert len(prunable) == 22 and "conv1" in prunable and "fc" in prunable
    assert adapter.scope("auto") == prunable

    vit = vit_task(tmp_path)._fresh_model(0)
    adapter = create_adapter(vit)
    assert type(adapter) is TimmViTAdapter
    linear = adapter.scope("linear")
    roles = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    assert list(linear) == [f"blocks.{b}.{r}" for b in range(2) for r in roles]
    assert adapter.scope("auto") == linear
    assert "head" in adapter.scope("prunable") and "patch_embed.proj" in adapter.scope("prunable")


# -- data ----------------------------------------------------------------------------------------------------------
def test_digits_split_is_fixed_stratified_and_disjoint():
    tr1, te1 = load_digits_split()
    tr2, te2 = load_digits_split()
    assert torch.equal(tr1.images, tr2.images) and torch.equal(te1.source_index, te2.source_index)
    a, b = set(tr1.source_index.tolist()), set(te1.source_index.tolist())
    assert not a & b and len(a | b) == 1797 and len(b) == 360
    assert torch.bincount(te1.targets).tolist() == pytest.approx([36] * 10, abs=1)
    assert tr1.images.shape[1:] == (1, 8, 8) and 0.0 <= tr1.images.min() and tr1.images.max() <= 1.0


def test_per_class_options_keep_fixed_stratified_subsets():
    full = load_image_data(DataConfig(dataset="digits"))
    sub = load_image_data(DataConfig(dataset="digits", train_per_class=20))
    again = load_image_data(DataConfig(dataset="digits", train_per_class=20))
    assert torch.bincount(sub.train.targets).tolist() == [20] * 10
    assert torch.equal(sub.train.source_index, again.train.source_index)
    assert set(sub.train.source_index.tolist()) <= set(full.train.source_index.tolist())
    assert torch.equal(sub.test.images, full.test.images)  # untouched unless test_per_class is set
    small_test = load_image_data(DataConfig(dataset="digits", test_per_class=5))
    assert torch.bincount(small_test.test.targets).tolist() == [5] * 10 and len(small_test.train) == len(full.train)
    with pytest.raises(ConfigError, match="train_per_class"):
        DataConfig(dataset="imagefolder", root="x", train_per_class=5)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_reader_and_missing_root(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "fmnist"
    root.mkdir()
    for prefix, n in (("train", 20), ("t10k", 10)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    train, test = load_fashion_mnist(root)
    assert train.images.shape == (20, 1, 28, 28) and test.targets.tolist() == list(range(10))
    data = load_image_data(DataConfig(dataset="fashion_mnist", root=str(root)))
    x, y = next(data.batches("test", 4))
    assert x.shape == (4, 1, 28, 28) and data.num_classes == 10

    with pytest.raises(ConfigError, match="does not exist"):
        load_fashion_mnist(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="needs task.data.root"):
        load_image_data(DataConfig(dataset="fashion_mnist"))
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ConfigError, match="t10k-labels-idx1-ubyte"):
        load_fashion_mnist(root)


FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist


@pytest.mark.skipif(not FASHION_ROOT.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_debian_files():
    train, test = load_fashion_mnist(FASHION_ROOT)
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert torch.bincount(test.targets).tolist() == [1000] * 10


def test_cifar_missing_root_without_download_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_image_data(DataConfig(dataset="cifar10", root=str(tmp_path / "cifar"), download=False))
    task = CifarCnnTask(CifarCnnConfig(name="c", family="cifar_cnn", data=DataConfig(dataset="cifar10",
                                                                                     root=str(tmp_path / "x"))),
                        tmp_path, CPU)
    with pytest.raises(ConfigError, match="does not exist"):
        task.check()


def _write_png_folder(root: Path, classes=("ant", "bee", "cat"), per_class=3, size=10) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size + 2, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


def test_imagefolder_tiny_tree(tmp_path):
    _write_png_folder(tmp_path / "imgs")
    data = load_image_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "imgs"), image_size=8))
    assert data.num_classes == 3 and data.channels == 3 and len(data.train) == 9 and len(data.test) == 9
    x, y = next(data.batches("test", 16))
    assert x.shape == (9, 3, 8, 8) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]

    task = cnn_task(tmp_path, in_chans=3, num_classes=3, train=tiny_train(batch_size=4, augment=True, crop_padding=1),
                    data=DataConfig(dataset="imagefolder", root=str(tmp_path / "imgs"), image_size=8))
    task.check()
    metrics = task.evaluate(task.build_model(0))
    assert metrics["protocol/n_test"] == 9 and metrics["protocol/split"] == "val" and "acc/top5" not in metrics
    with pytest.raises(ConfigError, match="test split"):
        load_image_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "imgs"), test_split="test"))


def test_timm_transform_mode_builds(tmp_path):
    _write_png_folder(tmp_path / "imgs", size=20)
    task = TimmImageTask(TimmImageConfig(
        name="vit_folder", family="timm_image", model="deit_tiny_patch16_224", num_classes=3, in_chans=3,
        model_kwargs=dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2),
        data=DataConfig(dataset="imagefolder", root=str(tmp_path / "imgs"), transform="timm"),
        train=tiny_train(batch_size=4)), tmp_path / "cache", CPU)
    task.check()
    tcfg = task.data_transform_config()
    assert tcfg["input_size"] == (3, 16, 16) and tcfg["interpolation"] == "bicubic"
    x, _ = next(task.data.batches("test", 4))
    assert x.shape == (4, 3, 16, 16) and task.data.normalized
    assert task.example_inputs()[0].shape == (1, 3, 16, 16)
    metrics = task.evaluate(task._fresh_model(0))
    assert 0.0 <= metrics["acc/top1"] <= 1.0 and metrics["protocol/image_size"] == 16
    with pytest.raises(ConfigError, match="imagefolder"):
        DataConfig(dataset="digits", transform="timm")


# -- training ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return load_image_data(DataConfig(dataset="digits"))


def _tiny_resnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return resnet(8, num_classes=10, in_chans=1, width=4)


def test_training_is_deterministic_and_calls_after_step(digits):
    cfg = tiny_train(epochs=2, augment=True, crop_padding=1)
    calls = []
    a = _tiny_resnet(0)
    res = fit(a, digits, cfg, seed=3, device=CPU, after_step=lambda m: calls.append(m is a), progress=False)
    assert calls == [True] * (2 * digits.num_batches("train", 128))
    assert res["train/epochs"] == 2 and len(res["history"]) == 2 and not a.training
    b = _tiny_resnet(0)
    fit(b, digits, cfg, seed=3, device=CPU, progress=False)
    assert same_weights(a, b)
    c = _tiny_resnet(0)
    fit(c, digits, cfg, seed=4, device=CPU, progress=False)
    assert not same_weights(a, c)


class Interrupted(Exception):
    pass


def test_resume_from_checkpoint_equals_uninterrupted(digits, tmp_path):
    cfg = tiny_train(epochs=2, augment=True, crop_padding=1, milestones=[1])
    full = _tiny_resnet(0)
    full_res = fit(full, digits, cfg, seed=0, device=CPU, progress=False)

    ckpt = tmp_path / "train.pt"

    def stop_after_first(record):
        if record["epoch"] == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        fit(_tiny_resnet(0), digits, cfg, seed=0, device=CPU, ckpt_path=ckpt, ckpt_key="k", log=stop_after_first,
            progress=False)
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 1
    resumed = _tiny_resnet(7)  # other initial weights: the checkpoint must replace them
    epochs_seen = []
    res = fit(resumed, digits, cfg, seed=0, device=CPU, ckpt_path=ckpt, ckpt_key="k",
              log=lambda r: epochs_seen.append(r["epoch"]), progress=False)
    assert epochs_seen == [2]
    assert same_weights(full, resumed)
    assert res["history"] == full_res["history"]
    # a checkpoint of another run (other key) is ignored, not resumed
    other = _tiny_resnet(0)
    fit(other, digits, replace(cfg, epochs=1), seed=0, device=CPU, ckpt_path=ckpt, ckpt_key="other", progress=False)
    assert torch.load(ckpt, weights_only=True)["key"] == "other"


def test_evaluate_classifier_metrics(digits):
    model = _tiny_resnet(0)
    res = evaluate_classifier(model, digits.batches("test", 100), CPU)
    assert 0.0 <= res["acc/top1"] <= res["acc/top5"] <= 1.0 and res["loss"] > 0
    x, y = next(digits.batches("test", 360))
    assert evaluate_classifier(model, (x, y), CPU, batch_size=50) == pytest.approx(res)
    two_class = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    assert "acc/top5" not in evaluate_classifier(two_class, (x, y % 2), CPU)


# -- tasks ---------------------------------------------------------------------------------------------------------
def test_families_registered():
    assert TASKS.get("cifar_cnn") is CifarCnnTask and TASKS.get("timm_image") is TimmImageTask


def test_cnn_task_build_cache_evaluate_calibrate(tmp_path, monkeypatch):
    calls = []
    real_fit = training.fit
    monkeypatch.setattr(training, "fit", lambda *a, **k: calls.append(1) or real_fit(*a, **k))
    task = cnn_task(tmp_path)
    task.check()
    assert task.main_metric() == ("acc/top1", True)
    m1 = task.build_model(0)
    assert calls == [1] and not m1.training
    assert task.cache_path(0).exists() and task.cache_path(0).parent == tmp_path / "cache" / "cifar_cnn"
    assert not list(task.cache_path(0).parent.glob("*.train.pt"))  # the resume file is gone once done
    m2 = cnn_task(tmp_path).build_model(0)  # a fresh task object: the cache answers
    assert calls == [1] and same_weights(m1, m2)
    assert cnn_task(tmp_path).cache_path(1) != task.cache_path(0)
    # fields that do not change the weights do not change the cache file; the recipe does
    assert cnn_task(tmp_path, name="tiny_cnn", calib_per_class=5).cache_path(0) == task.cache_path(0)
    assert cnn_task(tmp_path, train=tiny_train(lr=0.01)).cache_path(0) != task.cache_path(0)

    metrics = task.evaluate(m1)
    assert 0.0 <= metrics["acc/top1"] <= metrics["acc/top5"] <= 1.0 and metrics["loss/test"] > 0
    assert metrics["protocol/dataset"] == "digits" and metrics["protocol/n_test"] == 360
    assert metrics["protocol/image_size"] == 8 and metrics["protocol/split"] == "test"

    labeled = list(task.labelled_calibration_batches(0))
    ys = torch.cat([y for _, y in labeled])
    assert torch.bincount(ys).tolist() == [10] * 10
    xs = torch.cat([x for x in task.calibration_batches(0)])
    assert xs.shape == (100, 1, 8, 8) and torch.equal(xs, torch.cat([x for x, _ in labeled]))
    assert not torch.equal(xs, torch.cat(list(task.calibration_batches(1))))
    (x,) = task.example_inputs()
    assert x.shape == (1, 1, 8, 8) and torch.equal(x, task.example_inputs()[0])


def test_stratified_batches_count_and_balance(tmp_path):
    task = vit_task(tmp_path)
    batches, n = task.stratified_batches(0, 40, 16)
    xs = list(batches)
    assert n == len(xs) == 3 and [len(x) for x in xs] == [16, 16, 8] and xs[0].shape[1:] == (1, 8, 8)
    n_train = len(task.data.split("train"))
    batches, n = task.stratified_batches(0, 10 * n_train, 500)  # more than the split: all of it
    assert n == -(-n_train // 500) == len(list(batches))
    again, _ = task.stratified_batches(0, 40, 16)
    assert all(torch.equal(a, b) for a, b in zip(xs, again))
    other, _ = task.stratified_batches(1, 40, 16)
    assert not torch.equal(xs[0], next(iter(other)))


def test_training_batches_are_endless_shuffled_and_augmented(tmp_path):
    task = cnn_task(tmp_path, train=tiny_train(augment=True))
    n_train = len(task.data.split("train"))
    stream = task.training_batches(0, 500)
    first = [next(stream) for _ in range(-(-n_train // 500) + 1)]  # past the end of one pass
    assert all(x.shape[1:] == (1, 8, 8) and len(x) == len(y) for x, y in first)
    assert sum(len(y) for _, y in first[:-1]) == n_train
    x, y = next(task.training_batches(0, 500))
    assert torch.equal(x, first[0][0]) and torch.equal(y, first[0][1])
    plain = next(cnn_task(tmp_path).training_batches(0, 500))
    assert torch.equal(plain[1], y) and not torch.equal(plain[0], x)  # same order, augmentation on top


def test_parallel_builds_train_once(tmp_path, monkeypatch):
    calls = []
    real_fit = training.fit
    monkeypatch.setattr(training, "fit", lambda *a, **k: calls.append(1) or real_fit(*a, **k))
    models = {}
    threads = [threading.Thread(target=lambda i=i: models.__setitem__(i, cnn_task(tmp_path).build_model(0)))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1] and same_weights(models[0], models[1])


def test_task_train_hook(tmp_path):
    task = cnn_task(tmp_path)
    model = task._fresh_model(0)
    steps = []
    records = []
    res = task.train(model, seed=0, after_step=lambda m: steps.append(1), log=records.append)
    assert len(steps) == task.data.num_batches("train", 128) and [r["epoch"] for r in records] == [1]
    assert 0.0 <= res["acc/top1_final"] <= res["acc/top1_best"] <= 1.0 and "history" not in res


def test_checkpoint_loading_and_corrupt_file(tmp_path):
    from safetensors.torch import save_model

    task = cnn_task(tmp_path)
    source = task._fresh_model(5)
    good = tmp_path / "good.safetensors"
    save_model(source, str(good))
    loaded = cnn_task(tmp_path, checkpoint=str(good))
    loaded.check()
    assert same_weights(loaded.build_model(0), source)

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ConfigError, match="safetensors"):
        cnn_task(tmp_path, checkpoint=str(bad)).check()
    with pytest.raises(ConfigError):
        cnn_task(tmp_path, checkpoint=str(bad)).build_model(0)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ConfigError):
        cnn_task(tmp_path, checkpoint=str(truncated)).build_model(0)
    with pytest.raises(ConfigError, match="does not fit"):  # another architecture's weights
        cnn_task(tmp_path, width=8, checkpoint=str(good)).build_model(0)
    with pytest.raises(ConfigError, match="does not exist"):
        cnn_task(tmp_path, checkpoint=str(tmp_path / "missing.safetensors")).check()


def test_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="arch"):
        CifarCnnConfig(name="x", family="cifar_cnn", arch="resnet21")
    with pytest.raises(ConfigError, match="dataset"):
        DataConfig(dataset="mnist")
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ConfigError, match="in_chans"):
        cnn_task(tmp_path, in_chans=3).check()  # digits are grayscale
    with pytest.raises(ConfigError, match="unknown timm model"):
        vit_task(tmp_path, model="vit_nonexistent_patch99").check()
    with pytest.raises(ConfigError, match="disagrees"):
        vit_task(tmp_path, model_kwargs={**TINY_VIT, "num_classes": 5}).check()


def test_vit_task_trains_and_caches(tmp_path, monkeypatch):
    task = vit_task(tmp_path)
    task.check()
    model = task.build_model(0)
    assert isinstance(create_adapter(model), TimmViTAdapter)
    assert task.cache_path(0).exists()
    metrics = task.evaluate(model)
    assert 0.0 <= metrics["acc/top1"] <= metrics["acc/top5"] <= 1.0
    monkeypatch.setattr(training, "fit", lambda *a, **k: pytest.fail("retrained despite the cache"))
    assert same_weights(vit_task(tmp_path).build_model(0), model)
    assert next(iter(task.calibration_batches(0))).shape == (100, 1, 8, 8)


def test_demo_configs_compose():
    from hydra import compose, initialize_config_dir

    import runners.schema as schema

    schema.register_configs()
    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    with initialize_config_dir(conf, version_base="1.3"):
        for name, cls in (("demo_resnet", CifarCnnConfig), ("demo_vit", TimmImageConfig)):
            run = schema.validate(compose("run", overrides=[f"task={name}", "logger=none"]))
            assert isinstance(run.task, cls) and run.task.name == name and run.task.measure.batch_size == 64
            assert run.task.data.dataset == "digits" and run.task.in_chans == 1
