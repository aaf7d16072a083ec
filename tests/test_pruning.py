"""Pruning at initialisation (mag, random, snip, grasp, synflow) and LTR: exact sparsity, masks kept through
training, scores against direct slow implementations on tiny networks (float64), SynFlow's independence of data."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from methods import METHODS
from methods.base import CompressContext
from methods.ltr import level_counts
from methods.magnitude import kept_count
from methods.modules import MaskedConv2d, MaskedLinear
from methods.pruning import grasp_scores, linearized_copy, snip_scores, synflow_scores
from tasks.adapters import create_adapter
from tasks.models import resnet

pytestmark = pytest.mark.usefixtures("one_thread")

PRUNERS = ["mag", "random", "snip", "grasp", "synflow"]


class TinyCNN(nn.Module):
    """conv -> BN -> ReLU -> conv (bias) -> ReLU -> global pool -> linear: 36 + 144 + 12 = 192 prunable weights."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.bn(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


class FakeTask:
    """What the pruning methods use of a task: labelled calibration batches, example inputs, a training loop."""

    name = "fake"

    def __init__(self, data_seed: int = 0, steps: int = 5):
        g = torch.Generator().manual_seed(data_seed)
        self.x = torch.randn(12, 1, 5, 5, generator=g, dtype=torch.float64)
        self.y = torch.randint(0, 3, (12,), generator=g)
        self.steps = steps

    def labelled_calibration_batches(self, seed):
        yield self.x[:6], self.y[:6]
        yield self.x[6:], self.y[6:]

    def example_inputs(self):
        return (self.x[:2],)

    def train(self, model, seed, after_step=None, log=None, ckpt_path=None):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)
        model.train()
        for epoch in range(self.steps):  # one full-batch step per "epoch"
            opt.zero_grad()
            F.cross_entropy(model(self.x), self.y).backward()
            opt.step()
            if after_step is not None:
                after_step(model)
            if log is not None:
                log({"epoch": epoch + 1})
        model.eval()
        return {"acc/top1_final": 0.5}


def fresh(seed=0):
    torch.manual_seed(seed)
    return TinyCNN().double().eval()


def prune(name, ratio, model=None, task=None, seed=0, **cfg):
    """Apply method ``name`` to ``model`` (a fresh TinyCNN); return (model, method, metrics)."""
    model = fresh() if model is None else model
    method = METHODS.get(name)(METHODS.get(name).config_class(ratio=ratio, **cfg))
    adapter = create_adapter(model)
    method.check(adapter)
    out = method.apply(model, adapter, CompressContext(task=task or FakeTask(), device=torch.device("cpu"),
                                                       seed=seed))
    return model, method, out


def masked_layers(model):
    return [m for m in model.modules() if isinstance(m, (MaskedConv2d, MaskedLinear))]


N = 36 + 144 + 12


# -- sparsity -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRUNERS)
@pytest.mark.parametrize("ratio", [0.5, 0.9, 0.99, 0.999])
def test_masks_reach_the_exact_sparsity_from_2x_to_1000x(name, ratio):
    torch.manual_seed(0)
    model = resnet(20, 3, 1, 8).double().eval()  # ResNet-20 of width 8: 67,664 prunable weights
    model, _, out = prune(name, ratio, model=model, iterations=5 if name == "synflow" else 1)
    n = sum(m.mask.numel() for m in masked_layers(model))
    kept = sum(int(m.mask.sum()) for m in masked_layers(model))
    assert kept == kept_count(n, ratio) == n - round(ratio * n)
    assert abs((n - kept) / n - ratio) <= 0.5 / n
    assert out["method/pruned_weights"] == n - kept
    assert all(int(m.weight.count_nonzero()) <= int(m.mask.sum()) for m in masked_layers(model))


@pytest.mark.parametrize("name", PRUNERS + ["ltr"])
def test_masked_weights_stay_zero_through_training(name):
    task = FakeTask()
    cfg = {"rewind_epoch": 2} if name == "ltr" else {}
    model, method, _ = prune(name, 0.8, task=task, **cfg)
    masks = [m.mask.clone() for m in masked_layers(model)]
    before = [m.weight.detach().clone() for m in masked_layers(model)]
    task.train(model, 0, after_step=method.after_optimizer_step)
    for layer, mask in zip(masked_layers(model), masks):
        assert torch.equal(layer.mask, mask)
        assert (layer.weight[~mask] == 0).all()
    after = torch.cat([m.weight.detach()[m.mask] for m in masked_layers(model)])
    assert (after != torch.cat([w[m] for w, m in zip(before, masks)])).all()  # the survivors did train
    # biases and BN stay dense and trainable
    assert model.conv2.bias.requires_grad and model.bn.weight.requires_grad


@pytest.mark.parametrize("name", PRUNERS)
def test_iterative_rounds_change_masks_only_and_keep_the_initial_weights(name):
    """With iterations > 1 a weight masked in an early round and kept at the end starts training at its initial
    value (Synaptic-Flow's loop); only the finally pruned weights are zero."""
    model = fresh()
    initial = [layer.weight.detach().clone() for layer in (model.conv1, model.conv2, model.fc)]
    model, _, _ = prune(name, 0.9, model=model, iterations=5)
    for layer, w0 in zip(masked_layers(model), initial):
        assert torch.equal(layer.weight[layer.mask], w0[layer.mask])
        assert (layer.weight[~layer.mask] == 0).all()
    assert sum(int(m.mask.sum()) for m in masked_layers(model)) == kept_count(N, 0.9)


def test_random_masks_change_with_the_seed_and_are_about_uniform_per_layer():
    a, _, _ = prune("random", 0.5, seed=0)
    b, _, _ = prune("random", 0.5, seed=1)
    assert any(not torch.equal(x.mask, y.mask) for x, y in zip(masked_layers(a), masked_layers(b)))
    conv2 = masked_layers(a)[1].mask.double().mean()
    assert abs(float(conv2) - 0.5) < 0.15


def test_magnitude_at_init_keeps_the_largest_initial_weights():
    dense = fresh()
    model, _, _ = prune("mag", 0.75)
    w = torch.cat([m.weight.flatten() for m in (dense.conv1, dense.conv2, dense.fc)]).abs()
    kept = torch.cat([m.mask.flatten() for m in masked_layers(model)])
    assert w[kept].min() >= w[~kept].max()


# -- scores against direct slow implementations ---------------------------------------------------------------------
def weight_names(model):
    return ["conv1.weight", "conv2.weight", "fc.weight"]


def loss_of_weights(model, flat, batches, temperature=1.0):
    """Sum over batches of the mean cross-entropy (logits / temperature) as a function of the flat weights."""
    params = dict(model.named_parameters())
    sizes = [params[n].numel() for n in weight_names(model)]
    parts = dict(zip(weight_names(model), [p.view_as(params[n]) for p, n in zip(flat.split(sizes),
                                                                                  weight_names(model))]))
    return sum(F.cross_entropy(functional_call(model, {**params, **parts}, (x,)) / temperature, y)
               for x, y in batches)


def flat_weights(model):
    return torch.cat([dict(model.named_parameters())[n].detach().flatten() for n in weight_names(model)])


def test_snip_matches_central_differences_of_the_loss_in_each_mask_entry():
    model, task = fresh(), FakeTask()
    batches = list(task.labelled_calibration_batches(0))
    theta = flat_weights(model)
    eps = 1e-6
    ref = torch.empty_like(theta)
    for i in range(theta.numel()):  # L(w (.) m) with m_i = 1 +- eps
        up, down = theta.clone(), theta.clone()
        up[i] *= 1 + eps
        down[i] *= 1 - eps
        ref[i] = (loss_of_weights(model, up, batches) - loss_of_weights(model, down, batches)) / (2 * eps)
    layers = [model.conv1, model.conv2, model.fc]
    ours = torch.cat([s.flatten() for s in snip_scores(model, layers, batches)])
    torch.testing.assert_close(ours, ref.abs(), rtol=1e-5, atol=1e-9)


def test_grasp_matches_the_explicit_hessian_times_the_gradient():
    model, task = fresh(), FakeTask()
    batches = list(task.labelled_calibration_batches(0))
    theta = flat_weights(model)
    T = 200.0

    def f(flat):
        return loss_of_weights(model, flat, batches, T)

    g = torch.autograd.functional.jacobian(f, theta)
    hessian = torch.autograd.functional.hessian(f, theta, vectorize=True)  # (192, 192), sum over batches
    ref = theta * (hessian @ g)
    ours = torch.cat([s.flatten() for s in grasp_scores(model, [model.conv1, model.conv2, model.fc], batches, T)])
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-12)
    assert ref.abs().max() > 0


def test_synflow_matches_the_closed_form_of_a_linear_network_with_bn():
    """Linear -> BN -> ReLU -> Linear on |theta| and an all-ones input: R = 1' |W2| relu(bn(|W1| 1 + |b1|)) + ...,
    so dR/dW1_ij = (1'|W2|)_i |gamma_i| / sqrt(|var_i| + eps) and dR/dW2_ij = relu(bn(h))_j."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)).double().eval()
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([0.5, -1.5, 2.0, -0.3]))
        net[1].bias.copy_(torch.tensor([-0.1, 0.2, -0.3, 0.4]))
        net[1].running_mean.copy_(torch.tensor([-0.01, 0.02, -0.03, 0.01]))  # |mean| small: every unit active
        net[1].running_var.copy_(torch.tensor([0.5, 2.0, 1.0, 3.0]))
    w1, b1, w2 = net[0].weight.detach().abs(), net[0].bias.detach().abs(), net[3].weight.detach().abs()
    bn = net[1]
    factor = bn.weight.detach().abs() / (bn.running_var.abs() + bn.eps).sqrt()
    h = factor * (w1.sum(1) + b1 - bn.running_mean.abs()) + bn.bias.detach().abs()
    assert (h > 0).all()
    ref1 = w1 * (w2.sum(0) * factor)[:, None]
    ref2 = w2 * h[None, :]
    s1, s2 = synflow_scores(linearized_copy(net), ["0", "3"], (5,))
    torch.testing.assert_close(s1, ref1, rtol=1e-12, atol=0)
    torch.testing.assert_close(s2, ref2, rtol=1e-12, atol=0)
    assert net[1].weight[1] < 0  # the model itself is untouched (the copy was linearised)


def test_synflow_does_not_depend_on_the_data():
    a, _, _ = prune("synflow", 0.9, task=FakeTask(data_seed=0), iterations=20)
    b, _, _ = prune("synflow", 0.9, task=FakeTask(data_seed=7), iterations=20)
    for x, y in zip(masked_layers(a), masked_layers(b)):
        assert torch.equal(x.mask, y.mask)
    c, _, _ = prune("snip", 0.9, task=FakeTask(data_seed=0))
    d, _, _ = prune("snip", 0.9, task=FakeTask(data_seed=7))
    assert any(not torch.equal(x.mask, y.mask) for x, y in zip(masked_layers(c), masked_layers(d)))


def test_synflow_iterations_follow_the_exponential_schedule(monkeypatch):
    import methods.pruning as pruning

    seen = []
    real = pruning.global_score_masks
    monkeypatch.setattr(pruning, "global_score_masks", lambda s, k: seen.append(k) or real(s, k))
    prune("synflow", 0.99, iterations=4)
    n_final = kept_count(N, 0.99)
    assert seen == [round(N * (n_final / N) ** (k / 4)) for k in (1, 2, 3)] + [n_final]


# -- LTR ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.5, 0.9, 0.99, 0.999])
def test_ltr_levels_prune_a_fifth_of_the_remaining_until_the_target(ratio):
    n = 270_896
    counts = level_counts(n, kept_count(n, ratio), 0.2)
    assert counts[-1] == kept_count(n, ratio)
    previous = [n] + counts[:-1]
    for before, after in zip(previous[:-1], counts[:-1]):
        assert after == before - -(-before // 5)
    bound = math.ceil(math.log(n / counts[-1]) / math.log(1.25))  # levels of exactly 20%
    assert bound - 1 <= len(counts) <= bound


def test_ltr_rewinds_the_survivors_and_nests_the_masks():
    task = FakeTask(steps=4)
    model = fresh()
    init = {k: v.clone() for k, v in model.state_dict().items()}

    class Recording(FakeTask):
        def train(self, model, seed, after_step=None, log=None, ckpt_path=None):
            masks.append([m.mask.clone() for m in masked_layers(model)])
            return task.train(model, seed, after_step, log, ckpt_path)

    masks = []
    model, method, out = prune("ltr", 0.75, model=model, task=Recording(), rewind_epoch=0)
    assert out["method/ltr_rewind_iteration"] == 0
    assert out["method/ltr_levels"] == len(masks) == len(level_counts(N, kept_count(N, 0.75), 0.2)) == 6
    final = [m.mask for m in masked_layers(model)]
    for earlier, later in zip(masks, masks[1:] + [final]):
        for a, b in zip(earlier, later):
            assert not (b & ~a).any()  # a pruned weight never comes back
    assert sum(int(m.sum()) for m in final) == kept_count(N, 0.75)
    for name, layer in zip(weight_names(model), masked_layers(model)):  # rewound to the init (iteration 0)
        torch.testing.assert_close(layer.weight.detach(), init[name] * layer.mask, rtol=0, atol=0)
    torch.testing.assert_close(model.bn.weight.detach(), init["bn.weight"], rtol=0, atol=0)


def test_ltr_rewinds_to_the_dense_runs_weights_after_rewind_epoch():
    task = FakeTask(steps=4)
    dense = fresh()
    FakeTask(steps=2).train(dense, 0)  # the dense run's first 2 epochs (deterministic: full batch)
    model, _, out = prune("ltr", 0.5, task=task, rewind_epoch=2)
    assert out["method/ltr_rewind_iteration"] == 2
    for name, layer in zip(weight_names(model), masked_layers(model)):
        torch.testing.assert_close(layer.weight.detach(), dense.get_parameter(name).detach() * layer.mask,
                                   rtol=0, atol=0)
    torch.testing.assert_close(model.bn.running_mean, dense.bn.running_mean, rtol=0, atol=0)
