"""The loss-curvature tools of Geo-Sharing agree with dense linear algebra: output-gradient Grams, the damped
output factor and its limits, the shared-basis fit under the two-sided K-FAC metric, the predicted increase."""
import math

import pytest
import torch
from torch import nn

from methods.curvature import (
    damped_output_factor,
    gradient_passes,
    labelled_loss_sum,
    metric_basis,
    output_gradient_grams,
    predicted_increase,
)
from methods.svd_llm import whitened_basis, whitening_factor


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def metric_error(weights, approx, gram, out):
    return sum(float(torch.einsum("oi,ij,pj,op->", w - a, gram, w - a, g)) for w, a, g in zip(weights, approx, out))


def test_output_gradient_grams_match_explicit_gradients():
    """Two stacked linears under a summed cross-entropy: G of each is the sum over rows of the gradient of the loss
    w.r.t. that output row, outer-producted, as autograd gives it row by row."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    batches = [(rand(4, 5, seed=s), torch.tensor([0, 1, 2, 1])) for s in (1, 2)]
    grams = output_gradient_grams(model, ["0", "2"], lambda: batches, labelled_loss_sum)
    ref = {0: torch.zeros(7, 7, dtype=torch.float64), 2: torch.zeros(3, 3, dtype=torch.float64)}
    for x, y in batches:
        h = model[0](x)
        out = model[2](torch.tanh(h))
        gh, go = torch.autograd.grad(nn.functional.cross_entropy(out, y, reduction="sum"), [h, out])
        ref[0] += gh.T @ gh
        ref[2] += go.T @ go
    torch.testing.assert_close(grams["0"].xtx, ref[0])
    torch.testing.assert_close(grams["2"].xtx, ref[2])
    assert grams["0"].tokens == 8 and all(p.grad is None for p in model.parameters())


def test_gradient_passes_fit_the_byte_budget():
    assert gradient_passes([4, 4, 8], None) == [range(3)]
    assert gradient_passes([4, 4, 8], 8 * 32) == [range(2), range(2, 3)]  # 2 x 4^2 fit; 8^2 alone over budget
    assert gradient_passes([4, 4, 8], 1) == [range(1), range(1, 2), range(2, 3)]


def test_output_gradient_grams_in_several_passes_equal_one_pass():
    """A byte budget below any two layers' G: one pass per layer (the backward stopping at that layer), the same
    G as one pass over every layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    batches = [(rand(4, 5, seed=s), torch.tensor([0, 1, 2, 1])) for s in (1, 2)]
    calls = []

    def counted():
        calls.append(1)
        return iter(batches)

    one = output_gradient_grams(model, ["0", "2", "4"], counted, labelled_loss_sum)
    assert len(calls) == 1
    passes = output_gradient_grams(model, ["0", "2", "4"], counted, labelled_loss_sum, max_bytes=8 * 6 * 6)
    assert len(calls) == 1 + 3
    for p in one:
        torch.testing.assert_close(passes[p].xtx, one[p].xtx, rtol=0, atol=0)
        assert passes[p].tokens == one[p].tokens == 8


def test_damping_limits():
    g = rand(6, 6)
    g = g @ g.T
    scale = float(g.diagonal().mean())
    r0 = damped_output_factor(g, 0.0)
    torch.testing.assert_close(r0, math.sqrt(scale) * torch.eye(6, dtype=torch.float64))  # curvature-blind
    rinf = damped_output_factor(g, math.inf)
    torch.testing.assert_close(rinf @ rinf.T, g, rtol=1e-8, atol=1e-8)  # undamped
    r = damped_output_factor(g, 2.0)
    torch.testing.assert_close(r @ r.T, g + scale / 2.0 * torch.eye(6, dtype=torch.float64))
    singular = rand(6, 2, seed=1) @ rand(2, 6, seed=1)  # rank 2 symmetric PSD after the next line
    singular = singular @ singular.T
    assert torch.isfinite(damped_output_factor(singular, math.inf)).all()


def test_identity_output_factors_are_the_whitened_fit_exactly():
    x = rand(64, 8)
    chol, _ = whitening_factor(x.T @ x)
    weights = [rand(5, 8, seed=2), rand(5, 8, seed=3)]
    eye = [torch.eye(5, dtype=torch.float64)] * 2
    b1, c1 = metric_basis(weights, chol, None, 4)
    b2, c2 = metric_basis(weights, chol, eye, 4)
    b3, c3 = whitened_basis(weights, chol, 4)
    torch.testing.assert_close(b1, b3, rtol=0, atol=0)
    for a, b, c in zip(c1, c2, c3):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
        torch.testing.assert_close(b, c)


def test_metric_fit_minimises_the_metric_and_reaches_the_svd_bound():
    """Under sum_i tr(G_i D_i A D_i^T) the metric fit beats the whitened fit (and the whitened fit wins under its own
    metric); for one layer its error is the tail of the squared singular values of R^T W L."""
    x = rand(80, 10, seed=4) * torch.logspace(0, -1, 10, dtype=torch.float64)
    a = x.T @ x
    chol, _ = whitening_factor(a)
    weights = [rand(6, 10, seed=5), rand(6, 10, seed=6)]
    gs = []
    for s in (7, 8):
        m = rand(6, 6, seed=s) * torch.logspace(0, -2, 6, dtype=torch.float64)
        gs.append(m @ m.T)
    factors = [torch.linalg.cholesky(g) for g in gs]
    basis, coeffs = metric_basis(weights, chol, factors, 4)
    wb, wc = whitened_basis(weights, chol, 4)
    fit = [c @ basis for c in coeffs]
    white = [c @ wb for c in wc]
    eye = [torch.eye(6, dtype=torch.float64)] * 2
    assert metric_error(weights, fit, a, gs) < metric_error(weights, white, a, gs)
    assert metric_error(weights, white, a, eye) < metric_error(weights, fit, a, eye)
    b1, (c1,) = metric_basis(weights[:1], chol, factors[:1], 3)
    s = torch.linalg.svdvals(factors[0].T @ weights[0] @ chol)
    assert metric_error(weights[:1], [c1 @ b1], a, gs[:1]) == pytest.approx(float(s[3:].pow(2).sum()), rel=1e-8)


def test_predicted_increase_is_the_kronecker_quadratic_form():
    d, a, g = rand(4, 3, seed=9), rand(3, 3, seed=10), rand(4, 4, seed=11)
    a, g = a @ a.T, g @ g.T
    vec = d.reshape(-1)  # row-major: vec index o * d_in + i
    ref = 0.5 * float(vec @ torch.kron(g, a) @ vec)
    assert predicted_increase(d, a, g) == pytest.approx(ref, rel=1e-10)
