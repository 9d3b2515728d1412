"""Mix-FFN's middle as one Triton kernel: depthwise 3x3 convolution + bias + GELU on channels-last tokens.

"PVT v2: Improved Baselines with Pyramid Vision Transformer" (Wang et al., arXiv 2106.13797)
puts a depthwise 3x3 convolution between the two linear layers of the feed-forward network
(Mix-FFN, also FaViT's): ``fc1 -> dwconv 3x3 (zero padding 1, bias) -> GELU -> fc2``. On the
token grid ``h (B, H, W, C)`` (channels last: ``fc1``'s output viewed as an image) the middle is

    z[b, i, j, c] = bias[c] + sum_{di, dj in -1..1} w[c, di + 1, dj + 1] * h[b, i + di, j + dj, c]
    y = GELU(z) = z * (1 + erf(z / sqrt(2))) / 2

with ``h`` zero outside the grid. Run as three kernels (convolution, bias add, GELU) the
hidden tensor, the largest of the network, crosses memory three times each way; here one
program reads a tile of ``BLOCK_P`` pixels x ``BLOCK_C`` channels and its one-pixel halo (from
cache), accumulates the nine taps in fp32, adds the bias, applies the exact (erf) GELU and
writes ``y`` (and ``z`` when a backward will need it) in ``h``'s dtype.

``dwconv3x3_gelu`` is differentiable: the backward takes ``z`` saved by the forward, the GELU
derivative, then the convolution's input/weight/bias gradients from ``torch``'s convolution
backward (cuDNN on channels-last views). ``dwconv3x3_gelu_reference`` is the plain
``conv2d`` + GELU path; CPU tensors run it unless the Triton interpreter is on.
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

__all__ = ["dwconv3x3_gelu", "dwconv3x3_gelu_reference", "dwconv3x3_gelu_supports"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(h: Tensor, weight: Tensor, bias: Tensor) -> None:
    if not isinstance(h, Tensor) or h.dim() != 4 or not h.is_floating_point():
        got = f"{h.dtype} {tuple(h.shape)}" if isinstance(h, Tensor) else type(h).__name__
        raise ValueError(f"h: expected a float tensor (B, H, W, C), got {got}")
    C = h.shape[-1]
    if not isinstance(weight, Tensor) or tuple(weight.shape) != (C, 1, 3, 3):
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight: expected a depthwise 3x3 kernel of shape ({C}, 1, 3, 3), got {got}")
    if not isinstance(bias, Tensor) or tuple(bias.shape) != (C,):
        got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"bias: expected shape ({C},), got {got}")


def dwconv3x3_gelu_reference(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``GELU(depthwise_conv3x3(h) + bias)`` with ``torch`` ops; ``h (B, H, W, C)`` -> same shape."""
    _check(h, weight, bias)
    C = h.shape[-1]
    z = F.conv2d(h.permute(0, 3, 1, 2), weight, bias, padding=1, groups=C)
    return F.gelu(z).permute(0, 2, 3, 1)


def dwconv3x3_gelu_supports(h: Tensor) -> bool:
    """Whether ``dwconv3x3_gelu`` runs the Triton kernel on ``h`` (CUDA, or CPU interpreted)."""
    return triton is not None and h.dtype in _DTYPES and triton_runs_on(h)


if triton is not None:

    @triton.jit
    def _dwconv3x3_gelu_kernel(
        h_ptr,
        w_ptr,
        b_ptr,
        y_ptr,
        z_ptr,
        H,
        W,
        C,
        STORE_Z: tl.constexpr,
        EVEN_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        pid_p = tl.program_id(0)
        pid_c = tl.program_id(1)
        image = tl.program_id(2).to(tl.int64) * H * W * C
        pixels = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        channels = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        in_grid = pixels < H * W
        row = pixels // W
        col = pixels - row * W
        # offsets inside one image fit in int32; each tap is one scalar shift of the tile
        tile = pixels[:, None] * C + channels[None, :]
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for tap in tl.static_range(9):
            di = tap // 3 - 1
            dj = tap % 3 - 1
            ok = in_grid & (row + di >= 0) & (row + di < H) & (col + dj >= 0) & (col + dj < W)
            if EVEN_C:
                vals = tl.load(h_ptr + image + (tile + (di * W + dj) * C), mask=ok[:, None], other=0.0)
                taps = tl.load(w_ptr + channels * 9 + tap)
            else:
                in_channels = channels < C
                mask = ok[:, None] & in_channels[None, :]
                vals = tl.load(h_ptr + image + (tile + (di * W + dj) * C), mask=mask, other=0.0)
                taps = tl.load(w_ptr + channels * 9 + tap, mask=in_channels, other=0.0)
            acc += vals.to(tl.float32) * taps.to(tl.float32)[None, :]
        if EVEN_C:
            acc += tl.load(b_ptr + channels).to(tl.float32)[None, :]
            out_mask = in_grid[:, None]
        else:
            acc += tl.load(b_ptr + channels, mask=channels < C, other=0.0).to(tl.float32)[None, :]
            out_mask = in_grid[:, None] & (channels < C)[None, :]
        if STORE_Z:
            tl.store(z_ptr + image + tile, acc.to(z_ptr.dtype.element_ty), mask=out_mask)
        y = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        tl.store(y_ptr + image + tile, y.to(y_ptr.dtype.element_ty), mask=out_mask)

    # tiles (pixels x channels, warps) chosen per grid and width on the first CUDA call
    _dwconv3x3_gelu_kernel_tuned = triton.autotune(
        configs=[
            triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w)
            for p, c, w in [
                (32, 64, 2),
                (32, 128, 4),
                (64, 32, 2),
                (64, 64, 4),
                (128, 32, 4),
                (128, 64, 4),
                (128, 64, 8),
                (256, 32, 8),
            ]
        ],
        key=["H", "W", "C", "STORE_Z"],
    )(triton.heuristics({"EVEN_C": lambda args: args["C"] % args["BLOCK_C"] == 0})(_dwconv3x3_gelu_kernel))


def _launch(h: Tensor, weight: Tensor, bias: Tensor, store_z: bool) -> tuple[Tensor, Tensor | None]:
    B, H, W, C = h.shape
    h = h.contiguous()
    y = torch.empty_like(h)
    z = torch.empty_like(h) if store_z else None
    args = (h, weight.contiguous(), bias.contiguous(), y, z if store_z else y, H, W, C)
    if h.is_cuda:  # tiles autotuned per grid and width
        grid = lambda meta: (triton.cdiv(H * W, meta["BLOCK_P"]), triton.cdiv(C, meta["BLOCK_C"]), B)  # noqa: E731
        _dwconv3x3_gelu_kernel_tuned[grid](*args, STORE_Z=store_z)
    else:  # the interpreter: small fixed tiles
        block_c = min(16, triton.next_power_of_2(C))
        grid = (triton.cdiv(H * W, 16), triton.cdiv(C, block_c), B)
        _dwconv3x3_gelu_kernel[grid](
            *args, STORE_Z=store_z, EVEN_C=C % block_c == 0, BLOCK_P=16, BLOCK_C=block_c, num_warps=1
        )
    return y, z


class _DwConvGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        needs_grad = any(ctx.needs_input_grad)
        y, z = _launch(h, weight, bias, store_z=needs_grad)
        if needs_grad:
            ctx.save_for_backward(h, weight, z)
            ctx.bias_dtype = bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        h, weight, z = ctx.saved_tensors
        C = h.shape[-1]
        grad_z = torch.ops.aten.gelu_backward(grad_y.to(z.dtype), z)
        # channels-last views of NHWC memory: cuDNN runs the backward without copies
        grad_h, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_z.permute(0, 3, 1, 2),
            h.permute(0, 3, 1, 2),
            weight.to(h.dtype),
            [C],
            [1, 1],
            [1, 1],
            [1, 1],
            False,
            [0, 0],
            C,
            list(ctx.needs_input_grad),
        )
        return (
            grad_h.permute(0, 2, 3, 1) if grad_h is not None else None,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(ctx.bias_dtype) if grad_b is not None else None,
        )


def dwconv3x3_gelu(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``GELU(depthwise_conv3x3(h, weight, padding 1) + bias)`` on channels-last ``h (B, H, W, C)``.

    ``weight (C, 1, 3, 3)`` and ``bias (C,)`` as in ``nn.Conv2d(C, C, 3, padding=1, groups=C)``;
    they are read in their own dtype and the sums run in fp32, so under autocast ``h`` may be
    bf16 while the parameters stay fp32. Returns ``h``'s dtype and shape. CUDA tensors (and
    CPU ones under ``TRITON_INTERPRET=1``) run the fused kernel; others the reference.
    """
    _check(h, weight, bias)
    if not dwconv3x3_gelu_supports(h):
        return dwconv3x3_gelu_reference(h, weight.to(h.dtype), bias.to(h.dtype))
    if h.numel() == 0:
        return torch.empty_like(h)
    return _DwConvGelu.apply(h, weight, bias)
