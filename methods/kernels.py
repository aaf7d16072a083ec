"""Inference kernels of compressed layers: Triton on CUDA, plain PyTorch everywhere else.

* ``lowrank_linear(x, v, u, bias)``: y = (x V^T) U^T + b, V (rank, in), U (out, rank). For a few rows (batch-1
  decode) one fused Triton kernel reads V and U once each: every program reduces a block of the rank dimension,
  h_b = V_b x, and adds U[:, b] h_b into the fp32 output (so the (rows, rank) intermediate never leaves registers
  and the two skinny GEMVs are one launch). More rows: two library GEMMs.
* ``sparse_matmul``: x S with S^T stored as CSR or, for block-structured factors (FiPS with ``sparsity_block``),
  BSR; on CUDA a Triton kernel multiplies only the stored b x b blocks.
* ``hashed_linear`` / ``hashed_conv2d``: a layer whose weight is read from a shared array (``methods.hashing``),
  W[t] = scale * sign(L + t) * M[h(L + t)]. The Triton kernels are ROAST-MM-style matmuls (the convolution an
  implicit GEMM): each weight tile is recomputed from the hash inside the kernel and gathered from M into
  registers, so no dense weight and no index buffer is ever stored. The PyTorch path recomputes the same hash
  with int64 arithmetic and materialises the weight transiently.

Which path runs: ``set_backend("auto")`` (Triton for CUDA tensors where Triton is installed), ``"torch"`` (never
Triton) or ``"triton"`` (always; on CPU tensors only under ``TRITON_INTERPRET=1``, which is how the tests compare
the kernels with the PyTorch references without a GPU).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton ships with the CUDA builds of torch on Linux
    triton = None

BACKENDS = ("auto", "torch", "triton")
DECODE_ROWS = 8  # at most this many input rows take the fused low-rank kernel
_backend = "auto"
# Triton's interpreter (CPU tensors) mis-reads bf16 operands of tl.dot: interpreted kernels multiply in fp32
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# splitmix64 (methods.hashing.mix64) and its constants
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1, _MUL2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_U64 = (1 << 64) - 1
MAPPING_CODES = {"randomfold": 0, "hashednet": 1, "roast": 2}


def set_backend(name: str) -> None:
    """Choose the kernels: ``auto`` | ``torch`` | ``triton`` (process-wide)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernel backend {name!r}; valid: {', '.join(BACKENDS)}")
    if name == "triton" and triton is None:
        raise RuntimeError("kernel backend 'triton' requested but Triton is not installed")
    _backend = name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def current_backend() -> str:
    return _backend


def triton_active(device: torch.device) -> bool:
    """Whether tensors on ``device`` take the Triton kernels under the current backend."""
    if _backend == "torch" or triton is None:
        return False
    return _backend == "triton" or device.type == "cuda"


def _use_triton(x: torch.Tensor) -> bool:
    return triton_active(x.device)


# -- low rank ------------------------------------------------------------------------------------------------------
def lowrank_linear(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = (x V^T) U^T + b for x (..., in), V (rank, in), U (out, rank); shape (..., out), x's dtype."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not (_use_triton(x) and 0 < rows <= DECODE_ROWS and not torch.is_grad_enabled()):
        return F.linear(F.linear(x, v), u, bias)
    x2 = x.reshape(rows, x.shape[-1]).contiguous()
    v, u = v.contiguous(), u.contiguous()
    rank, d_in = v.shape
    d_out = u.shape[0]
    y = torch.zeros(rows, d_out, device=x.device, dtype=torch.float32)
    block_r = 16
    _lowrank_rows_kernel[(rows, triton.cdiv(rank, block_r))](
        x2, v, u, y, d_in, rank, d_out, BLOCK_R=block_r, BLOCK_K=128, BLOCK_O=128)
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], d_out)


# -- sparse factors ------------------------------------------------------------------------------------------------
def sparse_matmul(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                  shape: tuple[int, int]) -> torch.Tensor:
    """x @ S for x (rows, K), where S^T (``shape`` = (N, K)) is stored compressed by rows: CSR (``values`` 1-D) or
    BSR (``values`` (nnz blocks, b, b): the blocks of S^T). BSR on CUDA runs a Triton kernel that visits only the
    stored blocks; otherwise the library's sparse matmul (in fp32 where the CPU has no half-precision kernel)."""
    n_out, k = shape
    if values.dim() == 3 and _use_triton(x) and values.shape[1] >= 16:
        b = values.shape[1]
        x = x.contiguous()
        y = torch.empty(x.shape[0], n_out, device=x.device, dtype=x.dtype)
        block_m = 16 if x.shape[0] <= 16 else 64
        _bsr_matmul_kernel[(triton.cdiv(x.shape[0], block_m), n_out // b)](
            x, crow, col, values, y, x.shape[0], k, n_out, B=b, BLOCK_M=block_m,
            F32_DOT=x.dtype == torch.float32 or _INTERPRETED)
        return y
    return _library_sparse_matmul(x, crow, col, values, n_out, k)


@torch.library.custom_op("compbench::sparse_matmul", mutates_args=())
def _library_sparse_matmul(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                           n_out: int, k: int) -> torch.Tensor:
    """The library path of ``sparse_matmul``, as one opaque op so that torch.compile captures a model using it in
    one graph (it does not trace the construction of sparse tensors)."""
    make = torch.sparse_bsr_tensor if values.dim() == 3 else torch.sparse_csr_tensor
    st = make(crow, col, values, (n_out, k), check_invariants=False)
    if x.device.type == "cpu" and x.dtype not in (torch.float32, torch.float64):
        return torch.sparse.mm(st.to(torch.float32), x.T.float()).T.to(x.dtype).contiguous()
    return torch.sparse.mm(st, x.T).T.contiguous()


@_library_sparse_matmul.register_fake
def _(x, crow, col, values, n_out, k):
    return x.new_empty(x.shape[0], n_out)


# -- hashed weights ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HashSpec:
    """Where a hashed weight reads the shared array: ``weight_shape`` (out, ...) starting at global position
    ``offset`` of a virtual vector mapped onto ``m`` slots by ``mapping``; ``tile`` = (B_K, B_N) for roast;
    ``element_wise`` for a roast weight hashed element by element (untiled convolutions). The ``*_addend`` fields
    are the splitmix64 addends of the seed's random functions (``key * golden ratio`` mod 2^64)."""

    weight_shape: tuple[int, ...]
    offset: int
    m: int
    mapping: str
    scale: float
    fold_addend: int
    element_addend: int
    tile_addend: int
    sign_addend: int
    tile: tuple[int, int] = (16, 16)
    element_wise: bool = False

    @property
    def code(self) -> int:
        return MAPPING_CODES["hashednet"] if self.element_wise else MAPPING_CODES[self.mapping]


def addend(key: int) -> int:
    return (key * _GOLDEN) & _U64


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 tensors holding uint64 bits."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix64_torch(z: torch.Tensor, add: int) -> torch.Tensor:
    """splitmix64 of int64 tensors (uint64 bits, wrapping arithmetic), as ``methods.hashing.mix64``."""
    z = z + _signed(add)
    z = (z ^ _srl(z, 30)) * _signed(_MUL1)
    z = (z ^ _srl(z, 27)) * _signed(_MUL2)
    return z ^ _srl(z, 31)


def _umod(z: torch.Tensor, m: int) -> torch.Tensor:
    """(uint64 bits of z) mod m, for 0 < m < 2^62."""
    return ((_srl(z, 1) % m) * 2 + (z & 1)) % m


def hashed_weight(spec: HashSpec, array: torch.Tensor) -> torch.Tensor:
    """The weight (``spec.weight_shape``) recomputed from ``array`` with the hash (PyTorch reference path)."""
    out = spec.weight_shape[0]
    k = 1
    for s in spec.weight_shape[1:]:
        k *= s
    o = torch.arange(out, device=array.device, dtype=torch.int64)[:, None]
    q = torch.arange(k, device=array.device, dtype=torch.int64)[None, :]
    pos = spec.offset + o * k + q
    if spec.code == 0:
        slot = (_umod(_mix64_torch(pos // spec.m, spec.fold_addend), spec.m) + pos % spec.m) % spec.m
    elif spec.code == 1:
        slot = _umod(_mix64_torch(pos, spec.element_addend), spec.m)
    else:
        bk, bn = spec.tile
        tile_id = (q // bk) * -(-out // bn) + o // bn
        base = _umod(_mix64_torch(spec.offset + tile_id, spec.tile_addend), spec.m - bk * bn + 1)
        slot = base + (q % bk) * bn + o % bn
    sign = _srl(_mix64_torch(pos, spec.sign_addend), 63).to(array.dtype) * 2 - 1
    return (array[slot] * sign * spec.scale).view(spec.weight_shape)


def hashed_linear(x: torch.Tensor, array: torch.Tensor, spec: HashSpec, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + b with W (out, in) read from ``array`` through ``spec``; x (..., in) -> (..., out)."""
    if not _use_triton(x):
        return F.linear(x, hashed_weight(spec, array), bias)
    d_out, d_in = spec.weight_shape
    x2 = x.reshape(-1, d_in).contiguous()
    rows = x2.shape[0]
    y = torch.empty(rows, d_out, device=x.device, dtype=x.dtype)
    block_m = 16 if rows <= 16 else 64
    grid = (triton.cdiv(rows, block_m), triton.cdiv(d_out, 64))
    _hashed_matmul_kernel[grid](
        x2, array, y, rows, d_in, d_out, *_hash_args(spec), d_in, 1, 1, 1, 1, 1, 1, 1, 0, 1,
        MAPPING=spec.code, TILE_K=spec.tile[0], TILE_N=spec.tile[1], CONV=False, F32_DOT=x.dtype == torch.float32 or _INTERPRETED,
        BLOCK_M=block_m, BLOCK_O=64, BLOCK_K=32)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], d_out)


def hashed_conv2d(x: torch.Tensor, array: torch.Tensor, spec: HashSpec, bias: torch.Tensor | None,
                  stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """F.conv2d (groups 1, numeric zero padding) of x (N, C, H, W) with the weight (out, C, kh, kw) read from
    ``array``; the Triton path is an implicit GEMM over (N * Ho * Wo) x out with K = C * kh * kw."""
    if not _use_triton(x):
        return F.conv2d(x, hashed_weight(spec, array), bias, stride, padding, dilation)
    d_out, c, kh, kw = spec.weight_shape
    n, _, h, w = x.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    x = x.contiguous()
    y = torch.empty(n, d_out, ho, wo, device=x.device, dtype=x.dtype)
    rows = n * ho * wo
    block_m = 16 if rows <= 16 else 64
    grid = (triton.cdiv(rows, block_m), triton.cdiv(d_out, 64))
    _hashed_matmul_kernel[grid](
        x, array, y, rows, c * kh * kw, d_out, *_hash_args(spec), c, h, w, kh, kw, ho * wo, wo,
        stride[0] * 65536 + stride[1], padding[0] * 65536 + padding[1], dilation[0] * 65536 + dilation[1],
        MAPPING=spec.code, TILE_K=spec.tile[0], TILE_N=spec.tile[1], CONV=True, F32_DOT=x.dtype == torch.float32 or _INTERPRETED,
        BLOCK_M=block_m, BLOCK_O=64, BLOCK_K=32)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y


def _hash_args(spec: HashSpec) -> tuple:
    tiles_n = -(-spec.weight_shape[0] // spec.tile[1])
    return (spec.offset, spec.m, spec.scale, spec.fold_addend, spec.element_addend, spec.tile_addend,
            spec.sign_addend, tiles_n)


# -- Triton kernels ------------------------------------------------------------------------------------------------
if triton is not None:
    @triton.jit
    def _lowrank_rows_kernel(x_ptr, v_ptr, u_ptr, y_ptr, D_IN, RANK, D_OUT,
                             BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr):
        """Program (row, b): h = V[b] x[row] over the rank block b, then y[row] += U[:, b] h (fp32 atomics)."""
        row = tl.program_id(0).to(tl.int64)
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = r < RANK
        h = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, D_IN, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < D_IN
            xk = tl.load(x_ptr + row * D_IN + k, mask=k_ok, other=0.0).to(tl.float32)
            vk = tl.load(v_ptr + r[:, None].to(tl.int64) * D_IN + k[None, :], mask=r_ok[:, None] & k_ok[None, :],
                         other=0.0).to(tl.float32)
            h += tl.sum(vk * xk[None, :], axis=1)
        for o0 in range(0, D_OUT, BLOCK_O):
            o = o0 + tl.arange(0, BLOCK_O)
            o_ok = o < D_OUT
            uo = tl.load(u_ptr + o[:, None].to(tl.int64) * RANK + r[None, :], mask=o_ok[:, None] & r_ok[None, :],
                         other=0.0).to(tl.float32)
            tl.atomic_add(y_ptr + row * D_OUT + o, tl.sum(uo * h[None, :], axis=1), mask=o_ok)

    @triton.jit
    def _mix64(z, add):
        z = z + add
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        return z ^ (z >> 31)

    @triton.jit
    def _hashed_matmul_kernel(x_ptr, a_ptr, y_ptr, ROWS, K, D_OUT,
                              offset, m, scale, fold_add, elem_add, tile_add, sign_add, tiles_n,
                              C, H, W, KH, KW, HWO, WO, STRIDE, PAD, DIL,
                              MAPPING: tl.constexpr, TILE_K: tl.constexpr, TILE_N: tl.constexpr, CONV: tl.constexpr,
                              F32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr,
                              BLOCK_K: tl.constexpr):
        """y = X W^T over (ROWS, K) x (D_OUT, K) tiles, W's tile recomputed from the hash and gathered from the
        shared array. CONV: rows are output pixels (n, ho, wo) and X's tile is gathered from the NCHW input
        (implicit GEMM, K ordered c, dy, dx as the weight's row-major layout); STRIDE, PAD, DIL pack (h, w) as
        h * 65536 + w. F32_DOT: multiply in fp32 (ieee), for fp32 inputs and in the interpreter."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        o = (tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
        row_ok = rows < ROWS
        o_ok = o < D_OUT
        if CONV:
            img = rows // HWO
            pix = rows % HWO
            hi0 = (pix // WO) * (STRIDE // 65536) - PAD // 65536
            wi0 = (pix % WO) * (STRIDE % 65536) - PAD % 65536
        acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
        mu = m.to(tl.uint64)
        for k0 in range(0, K, BLOCK_K):
            q = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            q_ok = q < K
            if CONV:
                ch = q // (KH * KW)
                dy = (q // KW) % KH
                dx = q % KW
                hi = hi0[:, None] + dy[None, :] * (DIL // 65536)
                wi = wi0[:, None] + dx[None, :] * (DIL % 65536)
                x_ok = row_ok[:, None] & q_ok[None, :] & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
                x_off = ((img[:, None].to(tl.int64) * C + ch[None, :]) * H + hi) * W + wi
            else:
                x_ok = row_ok[:, None] & q_ok[None, :]
                x_off = rows[:, None].to(tl.int64) * K + q[None, :]
            xt = tl.load(x_ptr + x_off, mask=x_ok, other=0.0)
            pos = offset + o[:, None] * K + q[None, :]
            upos = pos.to(tl.uint64)
            if MAPPING == 0:
                rot = (_mix64((pos // m).to(tl.uint64), fold_add.to(tl.uint64)) % mu).to(tl.int64)
                slot = (rot + pos % m) % m
            elif MAPPING == 1:
                slot = (_mix64(upos, elem_add.to(tl.uint64)) % mu).to(tl.int64)
            else:
                tile_id = (q[None, :] // TILE_K) * tiles_n + o[:, None] // TILE_N
                span = (m - TILE_K * TILE_N + 1).to(tl.uint64)
                base = (_mix64((offset + tile_id).to(tl.uint64), tile_add.to(tl.uint64)) % span).to(tl.int64)
                slot = base + (q[None, :] % TILE_K) * TILE_N + o[:, None] % TILE_N
            sign = (_mix64(upos, sign_add.to(tl.uint64)) >> 63).to(tl.float32) * 2.0 - 1.0
            w_ok = o_ok[:, None] & q_ok[None, :]
            wt = tl.load(a_ptr + slot, mask=w_ok, other=0.0).to(tl.float32) * sign
            if F32_DOT:
                acc += tl.dot(xt.to(tl.float32), tl.trans(wt), input_precision="ieee")
            else:
                acc += tl.dot(xt, tl.trans(wt.to(xt.dtype)))
        acc = acc * scale
        if CONV:
            y_off = (img[:, None].to(tl.int64) * D_OUT + o[None, :]) * HWO + pix[:, None]
        else:
            y_off = rows[:, None].to(tl.int64) * D_OUT + o[None, :]
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & o_ok[None, :])

    @triton.jit
    def _bsr_matmul_kernel(x_ptr, crow_ptr, col_ptr, blk_ptr, y_ptr, ROWS, K, N, B: tl.constexpr,
                           BLOCK_M: tl.constexpr, F32_DOT: tl.constexpr):
        """Program (row tile, n): y[rows, n-th block of B columns] = sum over the stored blocks (n, kb) of S^T of
        x[rows, kb-th block] @ block^T."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        nb = tl.program_id(1)
        row_ok = rows < ROWS
        i = tl.arange(0, B)
        acc = tl.zeros((BLOCK_M, B), dtype=tl.float32)
        start = tl.load(crow_ptr + nb).to(tl.int64)
        count = tl.load(crow_ptr + nb + 1) - tl.load(crow_ptr + nb)
        for j in range(0, count):
            p = start + j
            kb = tl.load(col_ptr + p).to(tl.int64)
            xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + kb * B + i[None, :], mask=row_ok[:, None],
                         other=0.0)
            blk = tl.load(blk_ptr + p * B * B + i[:, None] * B + i[None, :])
            if F32_DOT:
                acc += tl.dot(xt.to(tl.float32), tl.trans(blk.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(xt, tl.trans(blk))
        tl.store(y_ptr + rows[:, None].to(tl.int64) * N + nb * B + i[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
