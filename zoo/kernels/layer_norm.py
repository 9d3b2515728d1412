"""LayerNorm over the last dimension of many short rows, as Triton kernels (forward and backward).

"Layer Normalization" (Ba, Kiros, Hinton, arXiv 1607.06450): for each row ``x`` of ``C``
features, ``y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias`` (biased variance).

Vision backbones normalise hundreds of thousands of tokens of 32-512 channels per batch; a
kernel that gives every row its own thread block (``torch``'s) then spends its time scheduling
blocks. Here one program normalises ``BLOCK_M`` rows at once:

forward
    the rows' mean and reciprocal standard deviation in fp32, the output in the input's dtype
    (``weight`` and ``bias`` are read in their own dtype: bf16 activations with fp32
    parameters need no cast); the statistics are kept for the backward.
backward (``G`` the output gradient, ``xhat`` the normalised input, ``g = G * weight``)
    ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` per row, and per program the partial
    column sums ``sum G * xhat`` and ``sum G``; one ``sum`` over programs gives ``dweight`` and
    ``dbias`` in fp32.

``layer_norm_reference`` is ``torch.nn.functional.layer_norm``; CPU tensors run it unless the
Triton interpreter is on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.kernels.checks import triton_runs_on

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs without triton
    triton = None
    tl = None

__all__ = ["layer_norm", "layer_norm_reference", "layer_norm_supports"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_FEATURES = 4096  # one row lives in one program's registers


def layer_norm_reference(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """``F.layer_norm`` over the last dimension."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def layer_norm_supports(x: Tensor) -> bool:
    """Whether ``layer_norm`` runs the Triton kernels on ``x`` (CUDA, or CPU interpreted)."""
    return triton is not None and x.dtype in _DTYPES and 0 < x.shape[-1] <= MAX_FEATURES and triton_runs_on(x)


if triton is not None:

    @triton.jit
    def _row_tile(pid, M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """Program ``pid``'s rows and columns, their bounds, the tile mask and element offsets."""
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_C)
        row_ok = rows < M
        col_ok = cols < C
        mask = row_ok[:, None] & col_ok[None, :]
        offsets = rows.to(tl.int64)[:, None] * C + cols[None, :]
        return rows, cols, row_ok, col_ok, mask, offsets

    @triton.jit
    def _forward_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        y_ptr,
        mean_ptr,
        rstd_ptr,
        M,
        C,
        eps,
        STORE_STATS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        rows, cols, row_ok, col_ok, mask, offsets = _row_tile(tl.program_id(0), M, C, BLOCK_M, BLOCK_C)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / C
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / C + eps)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = centred * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
        if STORE_STATS:
            tl.store(mean_ptr + rows, mean, mask=row_ok)
            tl.store(rstd_ptr + rows, rstd, mask=row_ok)

    @triton.jit
    def _backward_kernel(
        grad_ptr,
        x_ptr,
        w_ptr,
        mean_ptr,
        rstd_ptr,
        dx_ptr,
        dw_part_ptr,
        db_part_ptr,
        M,
        C,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows, cols, row_ok, col_ok, mask, offsets = _row_tile(pid, M, C, BLOCK_M, BLOCK_C)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = grad * w[None, :]
        mean_g = tl.sum(g, axis=1) / C
        mean_gx = tl.sum(g * xhat, axis=1) / C
        dx = (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None]
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dw_part_ptr + pid * C + cols, tl.sum(grad * xhat, axis=0), mask=col_ok)
        tl.store(db_part_ptr + pid * C + cols, tl.sum(grad, axis=0), mask=col_ok)


def _tiles(C: int, cuda: bool) -> tuple[int, int, int]:
    """Rows per program, padded row width and warps: about 4096 elements (16 per thread) per program."""
    block_c = triton.next_power_of_2(C)
    if not cuda:
        return min(16, max(1, 256 // block_c)), block_c, 1
    block_m = max(1, min(128, 4096 // block_c))
    return block_m, block_c, 8 if block_c * block_m >= 4096 else 4


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        C = x.shape[-1]
        rows = x.reshape(-1, C)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        M = rows.shape[0]
        y = torch.empty_like(rows)
        needs_grad = any(ctx.needs_input_grad[:3])
        stats = torch.empty(2, M, device=x.device, dtype=torch.float32) if needs_grad else None
        block_m, block_c, num_warps = _tiles(C, x.is_cuda)
        _forward_kernel[(triton.cdiv(M, block_m),)](
            rows,
            weight,
            bias,
            y,
            stats[0] if needs_grad else y,
            stats[1] if needs_grad else y,
            M,
            C,
            eps,
            STORE_STATS=needs_grad,
            BLOCK_M=block_m,
            BLOCK_C=block_c,
            num_warps=num_warps,
        )
        if needs_grad:
            ctx.save_for_backward(rows, weight, stats)
            ctx.param_dtypes = (weight.dtype, bias.dtype)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        rows, weight, stats = ctx.saved_tensors
        M, C = rows.shape
        grad = grad_y.reshape(M, C)
        if not grad.is_contiguous():
            grad = grad.contiguous()
        block_m, block_c, num_warps = _tiles(C, rows.is_cuda)
        programs = triton.cdiv(M, block_m)
        dx = torch.empty_like(rows)
        parts = torch.empty(2, programs, C, device=rows.device, dtype=torch.float32)
        _backward_kernel[(programs,)](
            grad,
            rows,
            weight,
            stats[0],
            stats[1],
            dx,
            parts[0],
            parts[1],
            M,
            C,
            BLOCK_M=block_m,
            BLOCK_C=block_c,
            num_warps=num_warps,
        )
        dweight, dbias = parts.sum(1)
        w_dtype, b_dtype = ctx.param_dtypes
        return dx.view(grad_y.shape), dweight.to(w_dtype), dbias.to(b_dtype), None


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """LayerNorm of ``x (..., C)`` over its last dimension with affine ``weight``, ``bias`` ``(C,)``.

    The output has ``x``'s dtype; the parameters may be of another (fp32 with bf16 ``x``).
    CUDA tensors (and CPU ones under ``TRITON_INTERPRET=1``) run the Triton kernels, others
    ``F.layer_norm`` (parameters cast to ``x``'s dtype).
    """
    if not isinstance(x, Tensor) or x.dim() < 1 or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x: expected a float tensor (..., C), got {got}")
    C = x.shape[-1]
    for name, param in (("weight", weight), ("bias", bias)):
        if not isinstance(param, Tensor) or tuple(param.shape) != (C,):
            got = tuple(param.shape) if isinstance(param, Tensor) else type(param).__name__
            raise ValueError(f"{name}: expected shape ({C},) like x's last dimension, got {got}")
    if not layer_norm_supports(x) or x.numel() == 0:
        return layer_norm_reference(x, weight.to(x.dtype), bias.to(x.dtype), eps)
    return _LayerNorm.apply(x, weight, bias, float(eps))
