"""Inference kernels against their PyTorch references: fp32 within 1e-5 relative, bf16 within 1e-2 (relative to the
largest output). Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1); on a CUDA machine the same tests run them compiled."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods import kernels
from methods.hashing import MAPPINGS, hashed_from_dense, slot_indices
from methods.modules import LowRankLinear
from runners.measure import weight_bytes

pytestmark = pytest.mark.usefixtures("one_thread")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    err = (actual.double() - expected.double()).abs().max() / expected.double().abs().max()
    assert err <= TOLERANCE[dtype], f"relative error {err:.2e} above {TOLERANCE[dtype]:g}"


def hashed(layer: nn.Module, mapping: str, m: int, tile_convs: bool = False, offset: int = 37):
    array = nn.Parameter(torch.randn(m, generator=torch.Generator().manual_seed(3)))
    return hashed_from_dense(layer, array, offset, mapping, seed=5, scale=0.7, tile=[4, 8], tile_convs=tile_convs)


def test_backend_names_are_checked():
    with pytest.raises(ValueError, match="kernel backend 'cuda'"):
        kernels.set_backend("cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
def test_fused_lowrank_kernel_matches_two_gemms(dtype, rows):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(19, 70, generator=g).to(DEVICE, dtype)   # rank 19, in 70: no dimension a block multiple
    u = torch.randn(145, 19, generator=g).to(DEVICE, dtype)
    b = torch.randn(145, generator=g).to(DEVICE, dtype)
    x = torch.randn(rows, 1, 70, generator=g).to(DEVICE, dtype)
    expected = F.linear(F.linear(x.double(), v.double()), u.double(), b.double()).to(dtype)
    with torch.no_grad(), kernels.backend("triton"):
        assert_close(kernels.lowrank_linear(x, v, u, b), expected, dtype)


def test_lowrank_module_uses_the_kernel_for_decode_rows_only():
    layer = LowRankLinear.from_factors(torch.randn(40, 8), torch.randn(8, 24), torch.randn(40)).to(DEVICE)
    calls = []
    original = kernels._lowrank_rows_kernel

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return original[grid]

    kernels._lowrank_rows_kernel = Spy()
    try:
        with torch.no_grad(), kernels.backend("triton"):
            for rows in (1, kernels.DECODE_ROWS, kernels.DECODE_ROWS + 1):
                x = torch.randn(rows, 24, device=DEVICE)
                assert_close(layer(x), F.linear(x, layer.dense_weight(), layer.bias), torch.float32)
    finally:
        kernels._lowrank_rows_kernel = original
    assert [grid[0] for grid in calls] == [1, kernels.DECODE_ROWS]


@pytest.mark.parametrize("mapping", MAPPINGS)
def test_hash_recomputed_in_torch_equals_the_cached_slots(mapping):
    for layer, tile_convs in ((nn.Linear(23, 17), False), (nn.Conv2d(3, 5, 3), False), (nn.Conv2d(3, 5, 3), True)):
        module = hashed(layer, mapping, m=61, tile_convs=tile_convs)
        expected = module.hashed_weight()
        module.for_inference()
        assert module.index is None and module.coef is None
        assert torch.equal(module.hashed_weight(), expected)
        idx = slot_indices(mapping, tuple(layer.weight.shape), 37, 61, 5, (4, 8), tile_convs)
        assert np.array_equal(np.bincount(idx.ravel(), minlength=61), module.slot_counts().numpy())


def test_hash_survives_keys_and_positions_above_2_to_63():
    """Positions near 2^40 and addends above 2^63: the int64 torch hash equals splitmix64 in uint64."""
    spec = kernels.HashSpec((3, 4), 2 ** 40 + 11, 1009, "hashednet", 1.0,
                            *(kernels.addend(k) for k in (2 ** 64 - 1, 2 ** 63 + 5, 7, 2 ** 63)))
    w = kernels.hashed_weight(spec, torch.arange(1009, dtype=torch.float64))  # |w| = slot
    pos = np.arange(2 ** 40 + 11, 2 ** 40 + 23, dtype=np.uint64)
    z = pos + np.uint64(spec.element_addend)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    slots = (z ^ (z >> np.uint64(31))) % np.uint64(1009)
    assert np.array_equal(w.abs().reshape(-1).numpy().astype(np.uint64), slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mapping", MAPPINGS)
@pytest.mark.parametrize("rows", [(1,), (2, 9)])
def test_hashed_linear_kernel_reads_the_shared_array(mapping, dtype, rows):
    module = hashed(nn.Linear(70, 45), mapping, m=211).to(DEVICE, dtype)
    x = torch.randn(*rows, 70, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    with torch.no_grad():
        expected = F.linear(x.double(), module.hashed_weight().double(), module.bias.double()).to(dtype)
        module.for_inference()
        with kernels.backend("triton"):
            assert_close(module(x), expected, dtype)
        with kernels.backend("torch"):
            assert_close(module(x), expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mapping,tile_convs", [("randomfold", False), ("hashednet", False), ("roast", False),
                                                ("roast", True)])
@pytest.mark.parametrize("conv", [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=3, dilation=2),
                                  dict(kernel_size=1)])
def test_hashed_conv_kernel_is_an_implicit_gemm(mapping, tile_convs, conv, dtype):
    module = hashed(nn.Conv2d(3, 6, **conv), mapping, m=97, tile_convs=tile_convs).to(DEVICE, dtype)
    x = torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    with torch.no_grad():
        expected = F.conv2d(x.double(), module.hashed_weight().double(), module.bias.double(), module.stride,
                            module.padding, module.dilation).to(dtype)
        module.for_inference()
        with kernels.backend("triton"):
            assert_close(module(x), expected, dtype)


def test_inference_layout_frees_twice_the_dense_bytes_and_keeps_the_checkpoint():
    module = hashed(nn.Linear(64, 32), "randomfold", m=256)
    before, state = weight_bytes(module), {k: v.clone() for k, v in module.state_dict().items()}
    module.for_inference()
    assert before - weight_bytes(module) == 64 * 32 * (4 + 4)   # int32 slot + fp32 signed scale per weight
    assert state.keys() == module.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())


@pytest.mark.parametrize("mapping", ["randomfold", "roast"])
def test_a_hashed_resnet20_runs_from_the_array_alone_and_is_smaller_than_dense(mapping):
    """STABLE-RPS / ROAST at 10x on ResNet-20: with the index buffers dropped every conv and linear runs the
    in-kernel hash (Triton), logits equal the cached-index model's, and the resident bytes are about a tenth of
    dense (only the array, biases and BN stay)."""
    from methods.hashing import HashingConfig, share_weights
    from tasks.adapters import create_adapter
    from tasks.models.cifar import resnet

    torch.manual_seed(0)
    dense = resnet(20).eval().to(DEVICE)
    model = resnet(20).eval().to(DEVICE)
    model.load_state_dict(dense.state_dict())
    adapter = create_adapter(model)
    scope = adapter.scope("prunable")
    n = sum(module.weight.numel() for module in scope.values())
    share_weights(adapter, scope, n // 10, HashingConfig(name="stable_rps", mapping=mapping), 0,
                  torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        expected = model(x)
        for module in model.modules():
            if hasattr(module, "for_inference"):
                module.for_inference()
        with kernels.backend("triton"):
            assert_close(model(x), expected, torch.float32)
    assert weight_bytes(model) < 0.12 * weight_bytes(dense)


def test_kernel_choice_is_checked_before_any_compute():
    from core.errors import ConfigError
    from runners.schema import MeasureConfig

    with pytest.raises(ConfigError, match="measure.kernels='fast'"):
        MeasureConfig(kernels="fast")


@pytest.mark.parametrize("transposed", [True, False])
def test_fips_inference_layout_stores_v_as_csr_with_the_same_outputs(transposed):
    from methods.modules import SharedFactorLinear

    g = torch.Generator().manual_seed(4)
    d, rank, cols = 24, 16, 40
    basis = nn.Parameter(torch.randn(d, rank, generator=g))
    layer = SharedFactorLinear.from_shared(basis, torch.randn(rank, cols, generator=g), torch.randn(d if not
                                           transposed else cols, generator=g), transposed)
    layer.v.set_mask(torch.rand(rank, cols, generator=g) > 0.75)
    x = torch.randn(3, 5, layer.in_features, generator=g)
    with torch.no_grad():
        expected, w = layer(x), layer.dense_weight()
        before = weight_bytes(layer)
        layer.for_inference()
        assert layer.v is None
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.dense_weight(), w)
    nnz = layer.v_values.numel()
    assert 0.15 * rank * cols < nnz < 0.35 * rank * cols
    # dense V (4 bytes) + mask (1 byte) per entry became value + column index per non-zero
    assert before - weight_bytes(layer) == rank * cols * 5 - nnz * 8 - (layer.v_shape[0] + 1) * 4


def test_pruned_layers_fold_their_mask_for_inference():
    from methods.modules import MaskedConv2d, MaskedLinear

    for layer, x in ((MaskedLinear.from_dense(nn.Linear(12, 7)), torch.randn(3, 12)),
                     (MaskedConv2d.from_dense(nn.Conv2d(3, 4, 3, padding=1)), torch.randn(2, 3, 6, 6))):
        layer.set_mask(torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.6)
        with torch.no_grad():
            layer.weight.add_(1.0)   # as an optimizer step would, before the mask is enforced again
            expected = layer(x)
            layer.for_inference()
            assert layer.mask is None
            torch.testing.assert_close(layer(x), expected)


def block_mask(rows: int, cols: int, b: int, density: float, seed: int = 0) -> torch.Tensor:
    keep = torch.rand(rows // b, cols // b, generator=torch.Generator().manual_seed(seed)) < density
    return keep.repeat_interleave(b, 0).repeat_interleave(b, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 37])
def test_block_sparse_kernel_visits_only_the_stored_blocks(dtype, rows):
    g = torch.Generator().manual_seed(6)
    st = (torch.randn(96, 64, generator=g) * block_mask(96, 64, 16, 0.3)).to(DEVICE, dtype)   # S^T (N, K)
    bsr = st.to_sparse_bsr((16, 16))
    x = torch.randn(rows, 64, generator=g).to(DEVICE, dtype)
    expected = (x.double() @ st.double().T).to(dtype)
    with kernels.backend("triton"):
        assert_close(kernels.sparse_matmul(x, bsr.crow_indices().int(), bsr.col_indices().int(), bsr.values(),
                                           (96, 64)), expected, dtype)
    with kernels.backend("torch"):
        assert_close(kernels.sparse_matmul(x, bsr.crow_indices().int(), bsr.col_indices().int(), bsr.values(),
                                           (96, 64)), expected, dtype)


@pytest.mark.parametrize("transposed", [True, False])
def test_fips_block_sparse_v_is_stored_as_bsr(transposed):
    from methods.modules import SharedFactorLinear

    g = torch.Generator().manual_seed(4)
    d, rank, cols = 24, 32, 64
    layer = SharedFactorLinear.from_shared(nn.Parameter(torch.randn(d, rank, generator=g)),
                                           torch.randn(rank, cols, generator=g), None, transposed)
    layer.v.set_mask(block_mask(rank, cols, 16, 0.25))
    x = torch.randn(7, layer.in_features, generator=g)
    with torch.no_grad():
        expected = layer(x)
        layer.for_inference()
        assert layer.v_values.shape[1:] == (16, 16)   # BSR blocks
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        with kernels.backend("triton"):
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_every_family_in_its_inference_layout_compiles_into_one_graph():
    """torch.compile(fullgraph=True) of each compressed family after ``inference_layout`` (the PyTorch kernels):
    no Python in the hot path that would break a CUDA-graph capture. Low rank with fused input groups (a shared
    basis), hashed (hash recomputed), FiPS V as CSR and as BSR, folded pruning masks."""
    import torch._dynamo

    from methods.basis_sharing import BasisSharingConfig
    from methods.fuse import inference_layout
    from methods.hashing import HashingConfig, share_weights
    from methods.modules import MaskedLinear, SharedFactorLinear
    from tasks.adapters import create_adapter
    from tasks.models.cifar import resnet
    from tests.test_fuse import compressed

    llama, adapter = compressed(BasisSharingConfig(ratio=0.5))
    cnn = resnet(20).eval()
    cnn_adapter = create_adapter(cnn)
    share_weights(cnn_adapter, cnn_adapter.scope("prunable"), 5000, HashingConfig(name="stable_rps"), 0,
                  torch.Generator().manual_seed(0))
    fips_layers = []
    for mask in (torch.rand(32, 64) > 0.75, block_mask(32, 64, 16, 0.3)):
        layer = SharedFactorLinear.from_shared(nn.Parameter(torch.randn(24, 32)), torch.randn(32, 64), None, True)
        layer.v.set_mask(mask)
        fips_layers.append(layer)
    pruned = MaskedLinear.from_dense(nn.Linear(8, 4))
    pruned.set_mask(torch.rand(4, 8) > 0.5)
    cases = [(llama, adapter, {"input_ids": torch.randint(0, 64, (2, 9))}),
             (cnn, cnn_adapter, {"x": torch.randn(2, 3, 8, 8)}),
             *((layer, None, {"x": torch.randn(3, 24)}) for layer in fips_layers),
             (pruned, None, {"x": torch.randn(2, 8)})]
    with torch.no_grad(), kernels.backend("torch"):
        for model, model_adapter, inputs in cases:
            expected = model(**inputs)
            with kernels.backend("auto"):   # the inference layout; the PyTorch kernels below
                inference_layout(model, model_adapter or create_adapter(model), torch.device("cpu"))
            compiled = torch.compile(model, backend="eager", fullgraph=True)
            out = compiled(**inputs)
            out, expected = (getattr(out, "logits", out), getattr(expected, "logits", expected))
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
            torch._dynamo.reset()
