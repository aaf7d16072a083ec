"""Input-group fusion: the fused layout computes the same function, stores no tensor twice, and decodes."""
import pytest
import torch

from methods import create_method
from methods.basis_sharing import BasisSharingConfig
from methods.fuse import FusedMember, fuse_input_groups
from methods.modules import LowRankLinear, SharedBasisLinear
from methods.svd import truncated_svd
from methods.svd_llm import SVDLLMConfig
from runners import measure
from tasks.adapters import LlamaAdapter
from tests.test_llm_methods import ctx, logits
from tests.toy import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def compressed(cfg):
    model = tiny_llama()
    adapter = LlamaAdapter(model)
    method = create_method(cfg)
    method.check(adapter)
    method.apply(model, adapter, ctx())
    return model.eval(), adapter


@pytest.mark.parametrize("cfg", [SVDLLMConfig(ratio=0.5), BasisSharingConfig(ratio=0.5)], ids=["svd_llm", "bs"])
def test_fused_model_computes_the_same_logits_with_the_same_resident_bytes(cfg):
    model, adapter = compressed(cfg)
    expected, bytes_before = logits(model), measure.weight_bytes(model)
    assert fuse_input_groups(model, adapter) == 2 * 3   # (q, k, v) and (gate, up) in each of 3 blocks
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    assert measure.weight_bytes(model) == bytes_before
    layers = model.model.layers
    assert isinstance(layers[0].self_attn.k_proj, FusedMember) and isinstance(layers[2].mlp.up_proj, FusedMember)
    assert not isinstance(layers[0].self_attn.o_proj, FusedMember)   # a group of one stays as it was


def test_blocks_sharing_bases_share_one_stacked_basis():
    model, adapter = compressed(BasisSharingConfig(ratio=0.5))   # groups of blocks (0, 1), (2,)
    fuse_input_groups(model, adapter)
    attn = [layer.self_attn for layer in model.model.layers]
    assert attn[0].fused_inputs[0] is attn[1].fused_inputs[0] is not attn[2].fused_inputs[0]
    v_cat = attn[0].fused_inputs[0].v_cat
    assert v_cat.shape[0] == sum(attn[0].get_submodule(n).stop - attn[0].get_submodule(n).start
                                 for n in ("q_proj", "k_proj", "v_proj"))


def test_a_basis_shared_across_groupings_is_left_unfused():
    """q of blocks 0 and 1 share a basis, k does not: stacking per block would store q's basis twice."""
    model = tiny_llama().eval()
    adapter = LlamaAdapter(model)
    basis = torch.nn.Parameter(truncated_svd(model.model.layers[0].self_attn.q_proj.weight, 8)[1])
    for i in range(3):
        attn = model.model.layers[i].self_attn
        for role in ("q_proj", "k_proj", "v_proj"):
            u, v = truncated_svd(getattr(attn, role).weight, 8)
            if role == "q_proj" and i < 2:
                setattr(attn, role, SharedBasisLinear.from_shared(basis, u, None))
            else:
                setattr(attn, role, LowRankLinear.from_factors(u, v, None))
    expected, bytes_before = logits(model), measure.weight_bytes(model)
    assert fuse_input_groups(model, adapter) == 1   # block 2 only
    assert measure.weight_bytes(model) == bytes_before
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)


def test_fused_model_decodes_like_the_unfused_one():
    model, adapter = compressed(BasisSharingConfig(ratio=0.5))
    prompt = torch.arange(5).unsqueeze(0)
    expected, _ = measure.greedy_static_decode(model, prompt, n_steps=6)
    fuse_input_groups(model, adapter)
    tokens, _ = measure.greedy_static_decode(model, prompt, n_steps=6)
    assert torch.equal(tokens, expected)


def test_a_member_called_outside_its_parent_is_an_error():
    model, adapter = compressed(SVDLLMConfig(ratio=0.5))
    fuse_input_groups(model, adapter)
    with pytest.raises(RuntimeError, match="outside its parent's forward"):
        model.model.layers[0].self_attn.q_proj(torch.randn(1, 32))


def test_offloaded_members_are_left_unfused():
    model, adapter = compressed(SVDLLMConfig(ratio=0.5))
    attn = model.model.layers[1].self_attn
    attn.k_proj.to("meta")   # as accelerate leaves an offloaded layer between forwards
    assert fuse_input_groups(model, adapter) == 2 * 3 - 1
    assert not isinstance(attn.q_proj, FusedMember) and not hasattr(attn, "fused_inputs")
