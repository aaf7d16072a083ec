"""Mathematical properties of the first methods and of the compressed modules."""
import pytest
import torch
from torch import nn

from methods.magnitude import global_magnitude_masks
from methods.modules import LowRankConv2d, LowRankLinear, MaskedConv2d, MaskedLinear, masked_from_dense
from methods.svd import rank_for_ratio, truncated_svd


def test_low_rank_linear_at_full_rank_is_exact():
    torch.manual_seed(0)
    dense = nn.Linear(12, 7)
    u, v = truncated_svd(dense.weight, 7)
    lr = LowRankLinear.from_factors(u, v, dense.bias)
    x = torch.randn(5, 12)
    torch.testing.assert_close(lr(x), dense(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lr.dense_weight(), dense.weight, rtol=1e-5, atol=1e-6)


def test_low_rank_conv_at_full_rank_is_exact():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True)
    u, v = truncated_svd(conv.weight.flatten(1), 8)
    lr = LowRankConv2d.from_conv(conv, u, v)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(lr(x), conv(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lr.dense_weight(), conv.weight, rtol=1e-5, atol=1e-6)


def test_truncated_svd_error_is_eckart_young():
    torch.manual_seed(1)
    w = torch.randn(20, 30, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    for r in (1, 5, 19):
        u, v = truncated_svd(w, r)
        err = torch.linalg.norm(w - u @ v) ** 2
        torch.testing.assert_close(err, (s[r:] ** 2).sum(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("m,n,ratio", [(64, 64, 0.5), (4096, 11008, 0.2), (7, 300, 0.9), (128, 32, 0.01)])
def test_rank_formula_keeps_at_most_the_budget(m, n, ratio):
    r = rank_for_ratio(m, n, ratio)
    assert r * (m + n) <= (1 - ratio) * m * n < (r + 1) * (m + n)


def test_magnitude_masks_prune_exactly_with_ties():
    w1 = torch.tensor([[1.0, -1.0, 2.0, 0.5]])
    w2 = torch.tensor([1.0, 1.0, -3.0, 0.0])
    masks = global_magnitude_masks([w1, w2], 0.5)
    kept = torch.cat([m.flatten() for m in masks])
    assert int((~kept).sum()) == 4
    # the four smallest magnitudes are 0.0, 0.5 and two of the four 1.0s
    assert not masks[1][3] and not masks[0][0, 3]
    assert masks[0][0, 2] and masks[1][2]


def test_magnitude_masks_keep_largest():
    torch.manual_seed(0)
    ws = [torch.randn(10, 10), torch.randn(5, 20)]
    masks = global_magnitude_masks(ws, 0.7)
    kept = torch.cat([w[m] for w, m in zip(ws, masks)]).abs()
    pruned = torch.cat([w[~m] for w, m in zip(ws, masks)]).abs()
    assert pruned.numel() == 140 and kept.min() >= pruned.max()


@pytest.mark.parametrize("layer", [nn.Linear(8, 6), nn.Conv2d(3, 4, 3, padding=1)])
def test_masked_weights_stay_zero_after_optimizer_steps(layer):
    torch.manual_seed(0)
    masked = masked_from_dense(layer)
    assert isinstance(masked, (MaskedLinear, MaskedConv2d))
    mask = torch.rand_like(masked.weight) > 0.5
    masked.set_mask(mask)
    opt = torch.optim.SGD(masked.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    x = torch.randn(4, 8) if isinstance(layer, nn.Linear) else torch.randn(2, 3, 5, 5)
    for _ in range(5):
        opt.zero_grad()
        masked(x).pow(2).sum().backward()
        opt.step()
        masked.enforce_mask()
    assert torch.all(masked.weight[~mask] == 0)
    assert int(torch.count_nonzero(masked.weight)) <= int(mask.sum())


def test_masked_linear_matches_dense_with_full_mask():
    torch.manual_seed(0)
    dense = nn.Linear(8, 6)
    masked = MaskedLinear.from_dense(dense)
    x = torch.randn(3, 8)
    torch.testing.assert_close(masked(x), dense(x))
