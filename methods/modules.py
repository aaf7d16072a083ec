"""Modules that methods put in place of dense layers.

Every compressed module derives from ``CompressedModule`` and tells the accounting what it stores
(``stored_tensors``), what index structures it needs (``index_bytes``), how to rebuild it empty
(``spec``) and what dense weight it computes (``dense_weight``, for tests and references).
Parameters shared by several modules are the same ``nn.Parameter`` object, so they are stored,
counted and moved to a device once. Forwards go through ``methods.kernels`` where a fused kernel exists.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.compressed import CompressedModule
from methods import kernels


class LowRankLinear(CompressedModule):
    """y = (x V^T) U^T + b with U: (out, rank), V: (rank, in). Replaces an ``nn.Linear`` (out, in)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.dense_weight_shape = (out_features, in_features)
        self.u = nn.Parameter(torch.empty(out_features, rank))
        self.v = nn.Parameter(torch.empty(rank, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> "LowRankLinear":
        m = cls(v.shape[1], u.shape[0], u.shape[1], bias is not None)
        with torch.no_grad():
            m.u.copy_(u)
            m.v.copy_(v)
            if bias is not None:
                m.bias.copy_(bias)
        return m.to(u.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.lowrank_linear(x, self.v, self.u, self.bias)

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.bias is not None}

    def dense_weight(self) -> torch.Tensor:
        return self.u @ self.v

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


class LowRankConv2d(CompressedModule):
    """A k x k conv to ``rank`` channels followed by a 1 x 1 conv to ``out_channels``: the rank-``rank`` factorisation
    of the dense weight reshaped to (out, in * k * k). V: (rank, in, k, k), U: (out, rank, 1, 1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank: int, stride=1, padding=0,
                 dilation=1, bias: bool = False):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.kernel_size, self.stride, self.padding, self.dilation = (kh, kw), _pair(stride), _pair(padding), _pair(dilation)
        self.dense_weight_shape = (out_channels, in_channels, kh, kw)
        self.v = nn.Parameter(torch.empty(rank, in_channels, kh, kw))
        self.u = nn.Parameter(torch.empty(out_channels, rank, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, u: torch.Tensor, v: torch.Tensor) -> "LowRankConv2d":
        """``u`` (out, rank) and ``v`` (rank, in * kh * kw) factor ``conv.weight`` reshaped to a matrix."""
        if conv.groups != 1 or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise TypeError("LowRankConv2d replaces ungrouped, zero-padded convolutions with numeric padding")
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, u.shape[1], conv.stride, conv.padding,
                conv.dilation, conv.bias is not None).to(conv.weight.device, conv.weight.dtype)
        with torch.no_grad():
            m.u.copy_(u.reshape(m.u.shape))
            m.v.copy_(v.reshape(m.v.shape))
            if conv.bias is not None:
                m.bias.copy_(conv.bias)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self.v, None, self.stride, self.padding, self.dilation)
        return F.conv2d(h, self.u, self.bias)

    def spec(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "rank": self.rank, "stride": list(self.stride),
                "padding": list(self.padding), "dilation": list(self.dilation), "bias": self.bias is not None}

    def dense_weight(self) -> torch.Tensor:
        return (self.u.flatten(1) @ self.v.flatten(1)).view(self.dense_weight_shape)


def _block_size(nonzero: torch.Tensor) -> int:
    """The largest b in (64, 32, 16) such that every b x b block of ``nonzero`` (bool, 2-D) is all True or all
    False; 1 if none."""
    rows, cols = nonzero.shape
    for b in (64, 32, 16):
        if rows % b == 0 and cols % b == 0:
            blocks = nonzero.reshape(rows // b, b, cols // b, b)
            if torch.equal(blocks.any(3).any(1), blocks.all(3).all(1)):
                return b
    return 1


def _pair(x) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)


class _Masked(CompressedModule):
    """Unstructured sparsity: ``weight * mask``; the stored size is nnz(mask), the mask costs one bit per weight."""

    mask: torch.Tensor | None

    def _init_mask(self) -> None:
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))
        self.dense_weight_shape = tuple(self.weight.shape)

    def set_mask(self, mask: torch.Tensor) -> None:
        self.mask.copy_(mask.to(torch.bool))
        self.enforce_mask()

    @torch.no_grad()
    def enforce_mask(self) -> None:
        """Zero the pruned weights (call after every optimizer step in train-time pruning)."""
        self.weight.mul_(self.mask)

    def masked_weight(self) -> torch.Tensor:
        return self.weight if self.mask is None else self.weight * self.mask

    @torch.no_grad()
    def for_inference(self) -> None:
        """Fold the mask into the weight (pruned entries become exact zeros) and drop it: the forward is then a
        dense layer's, with no per-call masking (unstructured sparsity gains no speed from dense kernels)."""
        self.enforce_mask()
        self.mask = None

    def stored_tensors(self, weights_only: bool = False) -> list[tuple[torch.Tensor, int]]:
        out = [(self.masked_weight(), int(self.mask.sum()))]
        if not weights_only and self.bias is not None:
            out.append((self.bias, self.bias.numel()))
        return out

    def index_bytes(self) -> int:
        return math.ceil(self.mask.numel() / 8)

    def dense_weight(self) -> torch.Tensor:
        return self.masked_weight()


class MaskedLinear(_Masked, nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self._init_mask()

    @classmethod
    def from_dense(cls, layer: nn.Linear) -> "MaskedLinear":
        m = cls(layer.in_features, layer.out_features, layer.bias is not None).to(layer.weight.device, layer.weight.dtype)
        m.load_state_dict(layer.state_dict(), strict=False)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}


class MaskedConv2d(_Masked, nn.Conv2d):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros"):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                           padding_mode)
        self._init_mask()

    @classmethod
    def from_dense(cls, layer: nn.Conv2d) -> "MaskedConv2d":
        m = cls(**_conv_spec(layer)).to(layer.weight.device, layer.weight.dtype)
        m.load_state_dict(layer.state_dict(), strict=False)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)

    def spec(self) -> dict[str, Any]:
        return _conv_spec(self)


def _conv_spec(layer: nn.Conv2d) -> dict[str, Any]:
    return {"in_channels": layer.in_channels, "out_channels": layer.out_channels,
            "kernel_size": list(layer.kernel_size), "stride": list(layer.stride),
            "padding": layer.padding if isinstance(layer.padding, str) else list(layer.padding),
            "dilation": list(layer.dilation), "groups": layer.groups, "bias": layer.bias is not None,
            "padding_mode": layer.padding_mode}


def masked_from_dense(layer: nn.Module) -> _Masked:
    if isinstance(layer, nn.Linear):
        return MaskedLinear.from_dense(layer)
    if isinstance(layer, nn.Conv2d):
        return MaskedConv2d.from_dense(layer)
    raise TypeError(f"cannot mask a {type(layer).__name__}; expected nn.Linear or nn.Conv2d")


class SharedBasisLinear(LowRankLinear):
    """A ``LowRankLinear`` whose ``v`` (rank, in) is a basis shared by every layer of its sharing class, the same
    ``nn.Parameter`` object in each (so it is stored, counted, moved and saved once); ``u`` (out, rank) holds this
    layer's own coefficients. y = (x V^T) U^T + b."""

    @classmethod
    def from_shared(cls, basis: nn.Parameter, coeff: torch.Tensor, bias: torch.Tensor | None) -> "SharedBasisLinear":
        """A layer computing with ``basis`` itself (not a copy) and a copy of ``coeff`` (out, rank) and ``bias``."""
        with torch.device("meta"):
            m = cls(basis.shape[1], coeff.shape[0], basis.shape[0], bias is not None)
        m.v = basis
        m.u = nn.Parameter(coeff.detach().to(basis.device, basis.dtype, copy=True))
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().to(basis.device, basis.dtype, copy=True))
        return m

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared basis"


class TwoSidedSharedLinear(CompressedModule):
    """y = ((x V^T) S^T) W^T + b: an input basis ``v`` (rank, in) and an output basis ``w`` (out, rank), both shared
    by every layer of the sharing class (the same ``nn.Parameter`` objects), and this layer's core ``s``
    (rank, rank). Geo-Sharing's ``basis_form: two_sided``, W_i ~ U_b S_i V_b^T."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.dense_weight_shape = (out_features, in_features)
        self.v = nn.Parameter(torch.empty(rank, in_features))
        self.w = nn.Parameter(torch.empty(out_features, rank))
        self.s = nn.Parameter(torch.empty(rank, rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_shared(cls, v: nn.Parameter, w: nn.Parameter, core: torch.Tensor, bias: torch.Tensor | None
                    ) -> "TwoSidedSharedLinear":
        """A layer computing with ``v`` and ``w`` themselves (not copies) and copies of ``core`` and ``bias``."""
        with torch.device("meta"):
            m = cls(v.shape[1], w.shape[0], v.shape[0], bias is not None)
        m.v, m.w = v, w
        m.s = nn.Parameter(core.detach().to(v.device, v.dtype, copy=True))
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().to(v.device, v.dtype, copy=True))
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(F.linear(x, self.v), self.s), self.w, self.bias)

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.bias is not None}

    def dense_weight(self) -> torch.Tensor:
        return self.w @ self.s @ self.v

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, shared input and output bases"


class MaskedFactor(_Masked):
    """A sparse factor (rows x cols) with its mask, held by a ``SharedFactorLinear`` as its child ``v``: stored as its
    non-zeros (the checkpoint writes values + a one-bit mask, as for ``MaskedLinear``). Not a layer: no forward.
    ``track_dense_grad`` makes ``effective()`` record the gradient of the masked product (dense, pruned entries
    included) in ``dense_grad``, for sparse training that regrows connections by gradient magnitude (RigL)."""

    def __init__(self, rows: int, cols: int):
        super().__init__()
        self.rows, self.cols = rows, cols
        self.weight = nn.Parameter(torch.zeros(rows, cols))
        self.bias = None
        self._init_mask()
        self.track_dense_grad = False
        self.dense_grad: torch.Tensor | None = None

    def effective(self) -> torch.Tensor:
        v = self.masked_weight()
        if self.track_dense_grad and v.requires_grad:
            v.register_hook(self._record_grad)
        return v

    def _record_grad(self, grad: torch.Tensor) -> None:
        g = grad.detach()
        self.dense_grad = g.clone() if self.dense_grad is None else self.dense_grad + g

    def forward(self, *args):
        raise TypeError("MaskedFactor is a factor of a SharedFactorLinear, not a layer")

    def spec(self) -> dict[str, Any]:
        return {"rows": self.rows, "cols": self.cols}

    def extra_repr(self) -> str:
        return f"{self.rows}x{self.cols}, nnz={int(self.mask.sum())}"


class SharedFactorLinear(CompressedModule):
    """A linear whose weight is the product of a dense basis ``u`` (d x rank), shared by every layer of its group
    (the same ``nn.Parameter`` object), and its own sparse factor ``v`` (``MaskedFactor``, rank x cols): FiPS's
    W = (U V)^T for ``transposed`` layers (in = d < out = cols: fc1, gate, up) and W = U V otherwise (out = d, in =
    cols: fc2, down). Stored: U once per group, nnz(V) per layer, the bias; the mask (one bit per entry of V) is
    index overhead. The forward rebuilds W or multiplies by the factors, whichever costs fewer multiply-adds for the
    number of rows of the input."""

    non_weight_tensors = ("bias",)

    def __init__(self, in_features: int, out_features: int, rank: int, transposed: bool, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.transposed = in_features, out_features, rank, transposed
        self.dense_weight_shape = (out_features, in_features)
        d, cols = (in_features, out_features) if transposed else (out_features, in_features)
        self.u = nn.Parameter(torch.zeros(d, rank))
        self.v = MaskedFactor(rank, cols)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_shared(cls, basis: nn.Parameter, factor: torch.Tensor, bias: torch.Tensor | None,
                    transposed: bool) -> "SharedFactorLinear":
        """A layer computing with ``basis`` itself (d x rank; not a copy) and copies of ``factor`` (rank x cols)
        and ``bias``, on ``basis``'s device and dtype."""
        d, rank = basis.shape
        cols = factor.shape[1]
        in_f, out_f = (d, cols) if transposed else (cols, d)
        with torch.device("meta"):
            m = cls(in_f, out_f, rank, transposed, bias is not None)
        m.u = basis
        m.v = MaskedFactor(rank, cols).to(basis.device, basis.dtype)
        with torch.no_grad():
            m.v.weight.copy_(factor)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().to(basis.device, basis.dtype, copy=True))
        return m

    def for_inference(self) -> None:
        """Store V compressed with int32 indices: BSR when its mask is block-constant (b = 64, 32 or 16: FiPS's
        ``sparsity_block``), else CSR; of V (rank x cols), or of V^T (cols x rank) for transposed layers. The dense
        V and its mask leave the module; the forward multiplies by the sparse factor (``kernels.sparse_matmul``)."""
        v, mask = self.v.masked_weight().detach(), self.v.mask
        st = (v.T if self.transposed else v).contiguous()   # S^T, where the forward multiplies by S
        block = _block_size(mask.T if self.transposed else mask)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            sparse = st.to_sparse_bsr((block, block)) if block > 1 else st.to_sparse_csr()
        self.v = None
        self.register_buffer("v_values", sparse.values().clone(), persistent=False)  # not a view of a sparse tensor
        self.register_buffer("v_crow", sparse.crow_indices().to(torch.int32), persistent=False)
        self.register_buffer("v_col", sparse.col_indices().to(torch.int32), persistent=False)
        self.v_shape = tuple(st.shape)

    def _sparse_forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.transposed:  # y = (x U) V
            y = kernels.sparse_matmul(F.linear(x2, self.u.T), self.v_crow, self.v_col, self.v_values, self.v_shape)
            y = y + self.bias if self.bias is not None else y
        else:  # y = (x V^T) U^T
            y = F.linear(kernels.sparse_matmul(x2, self.v_crow, self.v_col, self.v_values, self.v_shape), self.u,
                         self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.v is None:
            return self._sparse_forward(x)
        v = self.v.effective()
        d, cols = self.u.shape[0], v.shape[1]
        rows = x.numel() // max(x.shape[-1], 1)
        if d * self.rank * cols + rows * d * cols <= rows * self.rank * (d + cols):  # rebuild W, one matmul
            w = self.u @ v
            return F.linear(x, w.T if self.transposed else w, self.bias)
        if self.transposed:  # x (.., d) -> x U (.., r) -> (.., cols)
            h = F.linear(F.linear(x, self.u.T), v.T)
            return h + self.bias if self.bias is not None else h
        return F.linear(F.linear(x, v), self.u, self.bias)

    def stored_tensors(self, weights_only: bool = False) -> list[tuple[torch.Tensor, int]]:
        out = [(self.u, self.u.numel()), (self.v.masked_weight(), int(self.v.mask.sum()))]
        if not weights_only and self.bias is not None:
            out.append((self.bias, self.bias.numel()))
        return out

    def index_bytes(self) -> int:
        return self.v.index_bytes()

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "transposed": self.transposed, "bias": self.bias is not None}

    def dense_weight(self) -> torch.Tensor:
        if self.v is None:
            eye = torch.eye(self.v_shape[1], dtype=self.u.dtype, device=self.u.device)
            st = kernels.sparse_matmul(eye, self.v_crow, self.v_col, self.v_values, self.v_shape).T  # S^T
            return (self.u @ st.T).T if self.transposed else self.u @ st
        w = self.u @ self.v.masked_weight()
        return w.T if self.transposed else w

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"{'(U V)^T' if self.transposed else 'U V'}, shared basis")
