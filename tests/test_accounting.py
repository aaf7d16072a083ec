"""Parameter accounting counts unique storage: tied and shared tensors once, masked weights by their non-zeros."""
import torch
from torch import nn

from methods.modules import LowRankLinear, MaskedLinear
from runners.accounting import compressed_counts, count, dense_counts, model_modules


def test_tied_weights_count_once():
    emb = nn.Embedding(100, 16)
    head = nn.Linear(16, 100, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    assert count(model_modules(model))["params_stored"] == 1600
    # a naive count doubles it
    assert sum(p.numel() for m in model.modules() for p in m.parameters(recurse=False)) == 3200


def test_shared_basis_counts_once_and_scope_uses_weights_only():
    torch.manual_seed(0)
    layers = [LowRankLinear(32, 32, 4, bias=True) for _ in range(3)]
    shared = layers[0].u
    for layer in layers[1:]:
        layer.u = shared  # one basis referenced by three layers
    model = nn.Sequential(*layers)
    whole = count(model_modules(model))
    scope = count(model.children(), weights_only=True)
    assert whole["params_stored"] == 32 * 4 + 3 * 4 * 32 + 3 * 32
    assert scope["params_stored"] == 32 * 4 + 3 * 4 * 32


def test_masked_counts_nonzeros_and_mask_bits():
    layer = MaskedLinear(10, 10)
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[:3] = True
    layer.set_mask(mask)
    c = count([layer])
    assert c["params_stored"] == 30 + 10
    assert c["index_overhead"] == 13  # ceil(100 / 8) bytes of bitmask
    assert count([layer], weights_only=True)["params_stored"] == 30


def test_compressed_counts_ratio_and_prefixes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    scope = dict(model.named_children())
    dense = dense_counts(model, scope)
    assert dense == {"params_dense": 2 * (256 + 16), "scope/params_dense": 512}
    model[0] = LowRankLinear.from_factors(torch.randn(16, 4), torch.randn(4, 16), model[0].bias)
    out = compressed_counts(model, dict(model.named_children()), dense)
    assert out["scope/params_stored"] == 128 + 256
    assert out["scope/removed_fraction"] == 1 - 384 / 512
    assert out["params_stored"] == 384 + 32
    assert out["compression_x"] == 544 / 416
