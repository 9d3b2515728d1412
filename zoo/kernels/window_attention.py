"""Attention inside small windows with a relative position bias and per-window masks, as one Triton kernel.

Swin-style window attention (Liu et al., "Swin Transformer", arXiv 2103.14030; in 3D, Video
Swin, arXiv 2106.13230) attends among the ``N`` tokens of each window, for every head:

    out = softmax(scale * q k^T + bias[head] + mask[window]) v

with a learned ``(heads, N, N)`` relative position bias and, in shifted blocks, an additive
``(N, N)`` mask for the windows that the roll assembled from opposite ends of the grid. With
windows of tens of tokens and heads of 8-32 channels, ``torch``'s fused attention kernels do not
take the bias (the call falls back to explicit fp32 logits); here one program holds up to 64
queries of one window-head: it loads them and the window's ``k``, ``v`` (any strides, head size
padded in registers only), computes the logits in fp32, adds the bias and the window's mask
(looked up through ``mask_index``: ``-1`` for the windows without one), and writes the
normalised output. Half-precision calls read the bias and masks in their own dtype.

Forward only (inference): training runs ``torch``'s ``scaled_dot_product_attention``.
``window_attention_reference`` is the explicit computation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zoo.kernels.checks import triton_runs_on

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs without triton
    triton = None
    tl = None

__all__ = ["window_attention", "window_attention_reference", "window_attention_supports"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TOKENS = 256  # one window's logits live in one program's registers
MAX_HEAD_DIM = 64


def _check(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor,
    masks: Tensor | None,
    mask_index: Tensor | None,
    token_order: Tensor | None = None,
) -> int:
    """Validate the arguments; returns the number of windows."""
    layout = "(images, heads, L, head_dim)" if token_order is not None else "(windows, heads, N, head_dim)"
    if not isinstance(q, Tensor) or q.dim() != 4 or not q.is_floating_point():
        got = f"{q.dtype} {tuple(q.shape)}" if isinstance(q, Tensor) else type(q).__name__
        raise ValueError(f"q: expected a float tensor {layout}, got {got}")
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.shape != q.shape:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected the shape of q {tuple(q.shape)}, got {got}")
    _, heads, N, _ = q.shape
    windows = q.shape[0]
    if token_order is not None:
        N = bias.shape[-1] if isinstance(bias, Tensor) and bias.dim() == 3 else N
        L = q.shape[2]
        if (
            not isinstance(token_order, Tensor)
            or token_order.dtype not in (torch.int32, torch.int64)
            or tuple(token_order.shape) != (L,)
            or L % N
        ):
            got = (
                f"{token_order.dtype} {tuple(token_order.shape)}"
                if isinstance(token_order, Tensor)
                else token_order
            )
            raise ValueError(
                f"token_order: expected a permutation of the {L} tokens of an image, windows of {N} after each other, got {got}"
            )
        windows = q.shape[0] * (L // N)
    if not isinstance(bias, Tensor) or tuple(bias.shape) != (heads, N, N):
        got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"bias: expected shape ({heads}, {N}, {N}), got {got}")
    if (masks is None) != (mask_index is None):
        raise ValueError("masks, mask_index: expected both or neither")
    if masks is not None:
        if masks.dim() != 3 or tuple(masks.shape[1:]) != (N, N):
            raise ValueError(f"masks: expected shape (num_masks, {N}, {N}), got {tuple(masks.shape)}")
        if (
            mask_index.dim() != 1
            or mask_index.dtype not in (torch.int32, torch.int64)
            or mask_index.numel() == 0
        ):
            raise ValueError(
                f"mask_index: expected a non-empty 1-D integer tensor, got {mask_index.dtype} {tuple(mask_index.shape)}"
            )
        if windows % mask_index.numel():
            raise ValueError(
                f"mask_index: expected a length dividing the {windows} windows, got {mask_index.numel()}"
            )
    return windows


def _to_windows(t: Tensor, token_order: Tensor, N: int) -> Tensor:
    """``(images, heads, L, d)`` -> ``(images * L / N, heads, N, d)`` in ``token_order``."""
    images, heads, L, d = t.shape
    return t[:, :, token_order].view(images, heads, L // N, N, d).transpose(1, 2).flatten(0, 1)


def window_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor,
    scale: float,
    masks: Tensor | None = None,
    mask_index: Tensor | None = None,
    token_order: Tensor | None = None,
) -> Tensor:
    """Explicit ``softmax(scale q k^T + bias + mask) v`` in fp32; ``q, k, v (windows, heads, N, d)``.

    Window ``w`` uses ``masks[mask_index[w % len(mask_index)]]`` (none where the index is -1).
    With ``token_order``, ``q, k, v`` are ``(images, heads, L, d)`` and window ``w`` of an image
    holds its tokens ``token_order[w N : (w + 1) N]``; the output keeps the image order.
    """
    _check(q, k, v, bias, masks, mask_index, token_order)
    if token_order is not None:
        N = bias.shape[-1]
        windowed = window_attention_reference(
            *(_to_windows(t, token_order, N) for t in (q, k, v)), bias, scale, masks, mask_index
        )
        images, heads, L, d = q.shape
        out = torch.empty_like(q)
        out[:, :, token_order] = windowed.view(images, L // N, heads, N, d).transpose(1, 2).flatten(2, 3)
        return out
    logits = scale * q.float() @ k.float().transpose(-2, -1) + bias.float()
    if masks is not None:
        per_window = torch.cat([torch.zeros_like(masks[:1]), masks]).float()[mask_index.long() + 1]
        logits = logits.view(-1, mask_index.numel(), *logits.shape[1:]) + per_window[None, :, None]
        logits = logits.flatten(0, 1)
    return (logits.softmax(-1) @ v.float()).to(q.dtype)


def window_attention_supports(q: Tensor, tokens: int | None = None) -> bool:
    """Whether ``window_attention`` runs the Triton kernel on ``q`` (CUDA, or CPU interpreted).

    ``tokens``: the window size ``N`` when ``q`` holds whole images (``token_order`` calls).
    """
    tokens = q.shape[2] if tokens is None and q.dim() == 4 else tokens
    return (
        triton is not None
        and q.dtype in _DTYPES
        and q.dim() == 4
        and 0 < tokens <= MAX_TOKENS
        and 0 < q.shape[3] <= MAX_HEAD_DIM
        and triton_runs_on(q)
    )


if triton is not None:

    @triton.jit
    def _window_attention_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        bias_ptr,
        masks_ptr,
        mask_index_ptr,
        order_ptr,
        out_ptr,
        sqw,  # (window or image, head, token) strides of q, k, v and out; the feature stride is 1
        sqh,
        sqn,
        skw,
        skh,
        skn,
        svw,
        svh,
        svn,
        sow,
        soh,
        son,
        heads,
        N,
        D,
        num_indexed,
        windows_per_image,
        scale,
        HAS_MASKS: tl.constexpr,
        HAS_ORDER: tl.constexpr,
        IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        window = pid // heads
        head = pid - window * heads
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        tokens = tl.arange(0, BLOCK_N)
        feats = tl.arange(0, BLOCK_D)
        row_ok = rows < N
        tok_ok = tokens < N
        feat_ok = feats < D
        if HAS_ORDER:  # tokens stay in image order; the window's rows are read through token_order
            image = window // windows_per_image
            first = (window - image * windows_per_image) * N
            base = image.to(tl.int64)
            q_rows = tl.load(order_ptr + first + rows, mask=row_ok, other=0).to(tl.int64)
            kv_rows = tl.load(order_ptr + first + tokens, mask=tok_ok, other=0).to(tl.int64)
        else:
            base = window.to(tl.int64)
            q_rows = rows
            kv_rows = tokens
        q = tl.load(
            q_ptr + base * sqw + head * sqh + q_rows[:, None] * sqn + feats[None, :],
            mask=row_ok[:, None] & feat_ok[None, :],
            other=0.0,
        )
        tile_mask = tok_ok[:, None] & feat_ok[None, :]
        k = tl.load(
            k_ptr + base * skw + head * skh + kv_rows[:, None] * skn + feats[None, :],
            mask=tile_mask,
            other=0.0,
        )
        v = tl.load(
            v_ptr + base * svw + head * svh + kv_rows[:, None] * svn + feats[None, :],
            mask=tile_mask,
            other=0.0,
        )
        if IEEE:
            logits = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            logits = tl.dot(q, tl.trans(k))
        pair_mask = row_ok[:, None] & tok_ok[None, :]
        pairs = rows[:, None] * N + tokens[None, :]
        logits = logits * scale + tl.load(bias_ptr + head * N * N + pairs, mask=pair_mask, other=0.0).to(
            tl.float32
        )
        if HAS_MASKS:
            which = tl.load(mask_index_ptr + window % num_indexed)
            extra = tl.load(
                masks_ptr + which.to(tl.int64) * N * N + pairs, mask=pair_mask & (which >= 0), other=0.0
            )
            logits += extra.to(tl.float32)
        logits = tl.where(tok_ok[None, :], logits, float("-inf"))
        row_max = tl.max(logits, axis=1)
        weights = tl.exp(logits - row_max[:, None])
        total = tl.sum(weights, axis=1)
        if IEEE:
            out = tl.dot(weights, v.to(tl.float32), input_precision="ieee")
        else:
            out = tl.dot(weights.to(v.dtype), v)
        out = out / total[:, None]
        o_ptrs = out_ptr + base * sow + head * soh + q_rows[:, None] * son + feats[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & feat_ok[None, :])


def window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor,
    scale: float,
    masks: Tensor | None = None,
    mask_index: Tensor | None = None,
    out: Tensor | None = None,
    token_order: Tensor | None = None,
) -> Tensor:
    """``softmax(scale q k^T + bias[head] + masks[mask_index[w]]) v`` per window ``w`` and head.

    ``q, k, v (windows, heads, N, d)`` of one dtype, any strides with unit feature stride;
    ``bias (heads, N, N)``; optional ``masks (M, N, N)`` with ``mask_index`` (one entry per
    window of an image, ``-1`` for none; window ``w`` reads entry ``w % len(mask_index)``).
    Returns ``(windows, heads, N, d)`` in ``q``'s dtype, written into ``out`` when given (any
    strides with unit feature stride, e.g. a transposed ``(windows, N, heads, d)`` buffer). CUDA
    tensors (and CPU ones under ``TRITON_INTERPRET=1``) run the kernel (no autograd); others the
    reference.

    ``token_order``: ``q, k, v`` (and the output) are whole images ``(images, heads, L, d)`` in
    their own token order, and window ``w`` of an image is made of the tokens
    ``token_order[w N : (w + 1) N]`` (a permutation of ``range(L)``); the kernel reads and writes
    them in place, so no copy of the tokens into window order is made.
    """
    windows = _check(q, k, v, bias, masks, mask_index, token_order)
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1):
        raise ValueError(
            f"out: expected {q.dtype} {tuple(q.shape)} with unit last stride, got {out.dtype} {tuple(out.shape)}"
        )
    N = bias.shape[-1]
    if not window_attention_supports(q, N) or q.dtype != k.dtype or q.dtype != v.dtype:
        result = window_attention_reference(q, k, v, bias, scale, masks, mask_index, token_order)
        return result if out is None else out.copy_(result)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    heads, D = q.shape[1], q.shape[3]
    if out is None:
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    if windows == 0:
        return out
    table_dtype = torch.float32 if q.dtype == torch.float32 else q.dtype
    bias = bias.to(table_dtype).contiguous()
    has_masks = masks is not None
    has_order = token_order is not None
    masks_arg = masks.to(table_dtype).contiguous() if has_masks else bias
    index_arg = mask_index.to(torch.int32).contiguous() if has_masks else bias
    order_arg = token_order.to(q.device).contiguous() if has_order else bias  # int32 or int64 rows
    block_n = max(16, triton.next_power_of_2(N))
    block_d = max(16, triton.next_power_of_2(D))
    block_m = min(block_n, 64)
    _window_attention_kernel[(windows * heads, triton.cdiv(N, block_m))](
        q,
        k,
        v,
        bias,
        masks_arg,
        index_arg,
        order_arg,
        out,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *out.stride()[:3],
        heads,
        N,
        D,
        mask_index.numel() if has_masks else 1,
        q.shape[2] // N if has_order else 1,
        float(scale),
        HAS_MASKS=has_masks,
        HAS_ORDER=has_order,
        IEEE=q.dtype == torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out
