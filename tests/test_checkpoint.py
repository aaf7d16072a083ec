"""Compressed models round-trip through safetensors in their compact form."""
import pytest
import torch
from torch import nn

from core.errors import ConfigError
from methods.modules import LowRankLinear, masked_from_dense
from runners.checkpoint import load_compressed, save_compressed


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.c(self.b(self.a(self.emb(ids)))))


def compressed_net():
    torch.manual_seed(0)
    net = Net()
    masked = masked_from_dense(net.a)
    masked.set_mask(torch.rand(16, 16) > 0.7)
    net.a = masked
    net.b = LowRankLinear.from_factors(torch.randn(16, 4), torch.randn(4, 16), net.b.bias)
    net.c = LowRankLinear.from_factors(net.b.u.detach(), torch.randn(4, 16), None)
    net.c.u = net.b.u  # shared basis
    return net.eval()


def test_round_trip_restores_outputs_and_sharing(tmp_path):
    net = compressed_net()
    path = tmp_path / "m.safetensors"
    size = save_compressed(net, path)
    assert size == path.stat().st_size
    torch.manual_seed(1)
    fresh = Net().eval()
    load_compressed(fresh, path)
    ids = torch.arange(10)
    torch.testing.assert_close(fresh(ids), net(ids))
    assert fresh.c.u is fresh.b.u and fresh.head.weight is fresh.emb.weight
    assert torch.equal(fresh.a.mask, net.a.mask)


def test_compact_form_is_smaller_than_dense(tmp_path):
    net = compressed_net()
    dense_size = save_compressed(Net(), tmp_path / "dense.safetensors")
    assert save_compressed(net, tmp_path / "c.safetensors") < dense_size


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(ConfigError, match="cannot read checkpoint"):
        load_compressed(Net(), path)
