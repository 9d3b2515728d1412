"""3D (shifted) window attention, self or cross, with a relative position bias.

Video Swin Transformer (Liu et al., arXiv 2106.13230) extends Swin's windows (arXiv 2103.14030)
to a 3D token grid ``(D, H, W)``: tokens attend only inside non-overlapping windows of
``(Wd, Wh, Ww)`` tokens; every other block rolls the grid by half a window first, so that
information crosses window borders, and masks pairs of tokens that the roll brought
together from opposite ends of the grid. A learned bias indexed by the relative offset of
the two tokens is added to the attention logits.

FengWu (arXiv 2304.02948) and FengWu-Adas (arXiv 2312.12462) use it with ``D`` = pressure
levels (or variable groups), ``H`` = latitude, ``W`` = longitude. Longitude is periodic on
the globe, so the roll along it is physically right and needs no mask: ``periodic_axes``
says which axes are left unmasked (Adas: only longitude). Adas also uses the *cross*
form, where queries come from one stream and keys/values from another (``context``).

Details that decide numerical equality with the published models:
- the input is zero-padded up to a multiple of the window after normalisation; padded
  tokens are not masked out (they act as keys, as in Video Swin);
- where the grid is not larger than the window along an axis, the window shrinks to the
  grid and the shift along that axis is 0; the bias then uses the leading ``N x N`` block of
  the full window's relative-position index;
- the shift mask adds ``-100`` (not ``-inf``) to pairs from different regions.

``WindowAttention3D.forward`` takes channel-last grids ``(B, D, H, W, C)``. Tokens enter the
windows by one gather (the roll and the partition folded into a cached permutation of the
padded grid) and leave by another (the inverse permutation, cropped). Inference on CUDA runs
``zoo.kernels.window_attention`` (bias and border masks inside one Triton kernel); otherwise the
fast path calls ``torch.nn.functional.scaled_dot_product_attention`` and runs windows that need
no shift mask (the interior ones) apart from those that do, so the ``(windows, heads, N, N)``
mask is built only for border windows. ``fused=False`` is the plain reference: explicit
logits, softmax and weighted sum over all windows.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.kernels.window_attention import MAX_HEAD_DIM, MAX_TOKENS, window_attention
from zoo.layers.norm import LayerNormAutocast

__all__ = [
    "WindowAttention3D",
    "WindowTransformerBlock3D",
    "effective_window",
    "relative_position_index_3d",
    "shifted_window_mask_3d",
    "window_partition_3d",
    "window_reverse_3d",
]

Size3 = tuple[int, int, int]


def _triple(value: int | Sequence[int], name: str) -> Size3:
    if isinstance(value, int):
        return (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"{name}: expected an int or 3 ints (depth, height, width), got {value}")
    return value  # type: ignore[return-value]


def effective_window(grid: Size3, window: Size3, shift: Size3) -> tuple[Size3, Size3]:
    """Window and shift actually used on ``grid``: an axis not longer than the window is one window, unshifted."""
    use_window = list(window)
    use_shift = list(shift)
    for axis in range(3):
        if grid[axis] <= window[axis]:
            use_window[axis] = grid[axis]
            use_shift[axis] = 0
    return tuple(use_window), tuple(use_shift)  # type: ignore[return-value]


def window_partition_3d(x: torch.Tensor, window: Size3) -> torch.Tensor:
    """``(B, D, H, W, C)`` -> ``(B * num_windows, Wd * Wh * Ww, C)``; windows and tokens in (d, h, w) order."""
    B, D, H, W, C = x.shape
    wd, wh, ww = window
    x = x.view(B, D // wd, wd, H // wh, wh, W // ww, ww, C)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wd * wh * ww, C)


def window_reverse_3d(windows: torch.Tensor, window: Size3, batch: int, grid: Size3) -> torch.Tensor:
    """Inverse of :func:`window_partition_3d`: ``(B * num_windows, N, C)`` -> ``(B, D, H, W, C)``."""
    D, H, W = grid
    wd, wh, ww = window
    x = windows.view(batch, D // wd, H // wh, W // ww, wd, wh, ww, -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(batch, D, H, W, -1)


@lru_cache(maxsize=32)
def relative_position_index_3d(window: Size3) -> torch.Tensor:
    """``(N, N)`` index into a ``(2Wd-1)(2Wh-1)(2Ww-1)`` bias table for every pair of tokens of a window."""
    wd, wh, ww = window
    coords = torch.stack(
        torch.meshgrid(*(torch.arange(n, device="cpu") for n in (wd, wh, ww)), indexing="ij")
    ).flatten(1)  # 3, N
    offset = coords[:, :, None] - coords[:, None, :]  # 3, N, N
    d = offset[0] + wd - 1
    h = offset[1] + wh - 1
    w = offset[2] + ww - 1
    return d * (2 * wh - 1) * (2 * ww - 1) + h * (2 * ww - 1) + w


def _region_labels(length: int, window: int, shift: int, periodic: bool) -> torch.Tensor:
    """Label of each position along one padded axis after a roll by ``shift``: 0, 1 or 2 for the three strips."""
    labels = torch.zeros(length, dtype=torch.long, device="cpu")
    if periodic or shift == 0:
        return labels
    labels[length - window : length - shift] = 1
    labels[length - shift :] = 2
    return labels


@lru_cache(maxsize=64)
def _shift_mask_cached(
    padded: Size3, window: Size3, shift: Size3, periodic: tuple[bool, bool, bool], fill: float
) -> torch.Tensor:
    labels = [_region_labels(padded[a], window[a], shift[a], periodic[a]) for a in range(3)]
    region = labels[0][:, None, None] * 9 + labels[1][None, :, None] * 3 + labels[2][None, None, :]
    region = region.to(torch.float32)[None, ..., None]  # 1, D, H, W, 1
    per_window = window_partition_3d(region, window).squeeze(-1)  # nW, N
    differs = per_window[:, None, :] != per_window[:, :, None]
    return torch.zeros(differs.shape, device="cpu").masked_fill(differs, fill)


def shifted_window_mask_3d(
    padded: Size3,
    window: Size3,
    shift: Size3,
    periodic_axes: Sequence[bool] = (False, False, False),
    fill: float = -100.0,
) -> torch.Tensor:
    """Additive ``(num_windows, N, N)`` mask for a grid rolled by ``-shift``: ``fill`` between tokens of different regions.

    Along a periodic axis the roll wraps real neighbours together, so nothing is masked there.
    """
    return _shift_mask_cached(
        tuple(padded), tuple(window), tuple(shift), tuple(bool(p) for p in periodic_axes), float(fill)
    )


@lru_cache(maxsize=64)
def _split_mask_on_device(
    padded: Size3,
    window: Size3,
    shift: Size3,
    periodic: tuple[bool, bool, bool],
    fill: float,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Border windows' masks ``(nb, N, N)`` with the indices of border and interior windows, on ``device``."""
    mask = _shift_mask_cached(padded, window, shift, periodic, fill)
    border = (mask != 0).flatten(1).any(1)
    border_idx = border.nonzero().squeeze(1)
    inner_idx = (~border).nonzero().squeeze(1)
    return mask[border_idx].to(device), border_idx.to(device), inner_idx.to(device)


class _TakeTokens(torch.autograd.Function):
    """``x.index_select(1, index)`` for distinct indices; the backward writes rows back with
    ``index_copy_`` (``index_select``'s own backward accumulates with atomic adds)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.tokens = x.shape[1]
        return x.index_select(1, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        out = grad.new_zeros(grad.shape[0], ctx.tokens, *grad.shape[2:])
        return out.index_copy_(1, index, grad), None


def _take_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Tokens ``index`` (distinct) of ``x (B, L, C)`` along dim 1."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _TakeTokens.apply(x, index)
    return x.index_select(1, index)


@lru_cache(maxsize=64)
def _window_token_order(
    grid: Size3, padded: Size3, window: Size3, shift: Size3, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices for one image: padded-grid token -> window order, and window order -> grid token.

    ``gather[j]`` is the flat index in the zero-padded ``padded`` grid of the ``j``-th token in
    window order after rolling the grid by ``-shift`` (what ``roll`` + ``window_partition_3d``
    produce); ``scatter[i]`` is the window-order position of the ``i``-th token of the unpadded
    ``grid`` (what ``window_reverse_3d`` + ``roll`` by ``+shift`` + crop undo). Both are
    permutations applied by one ``index_select`` each.
    """
    flat = torch.arange(padded[0] * padded[1] * padded[2]).view(1, *padded, 1)
    if any(shift):
        flat = torch.roll(flat, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
    gather = window_partition_3d(flat, window).reshape(-1)
    position = torch.empty_like(gather)
    position[gather] = torch.arange(gather.numel())
    D, H, W = grid
    kept = torch.arange(padded[0] * padded[1] * padded[2]).view(padded)[:D, :H, :W].reshape(-1)
    return gather.to(device), position[kept].to(device)


@lru_cache(maxsize=64)
def _mask_index_on_device(
    padded: Size3,
    window: Size3,
    shift: Size3,
    periodic: tuple[bool, bool, bool],
    fill: float,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Border windows' masks ``(nb, N, N)`` in ``dtype`` and, per window, its row there (``-1``: interior), on ``device``."""
    border_mask, border_idx, inner_idx = _split_mask_on_device(padded, window, shift, periodic, fill, device)
    index = torch.full((border_idx.numel() + inner_idx.numel(),), -1, dtype=torch.int32, device=device)
    index[border_idx] = torch.arange(border_idx.numel(), dtype=torch.int32, device=device)
    return border_mask.to(dtype), index


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    drop: float,
    scale: float,
    align: int | None = None,
) -> torch.Tensor:
    """SDPA; a head size that is not a multiple of ``align`` (8 on CUDA) is zero-padded so the fused kernels accept it."""
    hd = q.shape[-1]
    align = (8 if q.is_cuda else None) if align is None else align
    if align and hd % align:
        pad = (0, align - hd % align)
        q, k, v = (
            F.pad(t, pad) for t in (q, k, v)
        )  # zero columns change neither logits nor the kept outputs
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=scale)[..., :hd]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=scale)


class WindowAttention3D(nn.Module):
    """Multi-head attention inside 3D windows of a ``(B, D, H, W, C)`` grid, optionally shifted and/or cross.

    Parameters
    ----------
    dim: channels ``C``; ``num_heads`` must divide it.
    num_heads: attention heads.
    window_size: ``(Wd, Wh, Ww)`` tokens per window.
    shift_size: roll (tokens) before partitioning; ``(0, 0, 0)`` for plain windows. Each entry < window.
    cross: queries from ``x``, keys and values from ``context`` (separate ``q``, ``k``, ``v``
        projections); otherwise one ``qkv`` projection of ``x``.
    qkv_bias: bias on the q/k/v projections.
    periodic_axes: axes whose roll is not masked (the globe's longitude).
    mask_fill: additive logit between tokens the roll brought together (``-100`` as in Swin).
    qk_scale: softmax scale; ``head_dim ** -0.5`` by default.
    fused: use SDPA (True) or the explicit reference (False).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int | Sequence[int],
        shift_size: int | Sequence[int] = 0,
        cross: bool = False,
        qkv_bias: bool = True,
        periodic_axes: Sequence[bool] = (False, False, False),
        mask_fill: float = -100.0,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused: bool = True,
    ) -> None:
        super().__init__()
        if dim <= 0 or num_heads <= 0 or dim % num_heads:
            raise ValueError(
                f"WindowAttention3D: dim must be a positive multiple of num_heads, got {dim}, {num_heads}"
            )
        self.window_size = _triple(window_size, "window_size")
        self.shift_size = _triple(shift_size, "shift_size")
        if any(w <= 0 for w in self.window_size):
            raise ValueError(f"window_size: expected positive sizes, got {self.window_size}")
        if any(not 0 <= s < w for s, w in zip(self.shift_size, self.window_size)):
            raise ValueError(
                f"shift_size: expected 0 <= shift < window {self.window_size}, got {self.shift_size}"
            )
        if len(tuple(periodic_axes)) != 3:
            raise ValueError(f"periodic_axes: expected 3 booleans, got {periodic_axes}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim**-0.5
        self.cross = cross
        self.periodic_axes = tuple(bool(p) for p in periodic_axes)
        self.mask_fill = float(mask_fill)
        self.fused = fused
        wd, wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * wd - 1) * (2 * wh - 1) * (2 * ww - 1), num_heads)
        )
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer(
            "relative_position_index", relative_position_index_3d(self.window_size).clone(), persistent=False
        )
        if cross:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.k = nn.Linear(dim, dim, bias=qkv_bias)
            self.v = nn.Linear(dim, dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
            f"shift_size={self.shift_size}, cross={self.cross}, fused={self.fused}"
        )

    def relative_position_bias(self, tokens: int) -> torch.Tensor:
        """``(num_heads, N, N)`` bias for windows of ``N`` tokens (leading block of the full index)."""
        index = self.relative_position_index[:tokens, :tokens].reshape(-1)
        return self.relative_position_bias_table[index].view(tokens, tokens, -1).permute(2, 0, 1)

    def _check(self, x: torch.Tensor, context: torch.Tensor | None) -> None:
        if x.dim() != 5 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected (B, D, H, W, {self.dim}), got {tuple(x.shape)}")
        if self.cross:
            if context is None:
                raise ValueError("context: cross attention needs a context grid, got None")
            if context.shape != x.shape:
                raise ValueError(
                    f"context: expected the shape of x {tuple(x.shape)}, got {tuple(context.shape)}"
                )
        elif context is not None:
            raise ValueError("context: this WindowAttention3D is self-attention (cross=False); got a context")

    def _project(self, x_win: torch.Tensor, c_win: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        Bw, N, C = x_win.shape
        h, hd = self.num_heads, self.head_dim
        if self.cross:
            q = self.q(x_win).view(Bw, N, h, hd).transpose(1, 2)
            k = self.k(c_win).view(Bw, N, h, hd).transpose(1, 2)
            v = self.v(c_win).view(Bw, N, h, hd).transpose(1, 2)
        else:
            q, k, v = self.qkv(x_win).view(Bw, N, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def _attend_reference(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        logits = (q * self.scale) @ k.transpose(-2, -1) + bias.unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            logits = logits.view(-1, nW, *logits.shape[1:]) + mask[None, :, None]
            logits = logits.flatten(0, 1)
        weights = logits.softmax(dim=-1)
        weights = F.dropout(weights, self.attn_drop, self.training)
        return weights @ v

    def _attend_fused(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor,
        split: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        drop = self.attn_drop if self.training else 0.0
        bias = bias.to(q.dtype)
        if split is None:
            return _sdpa(q, k, v, bias.unsqueeze(0), drop, self.scale)
        border_mask, border_idx, inner_idx = split
        nW = border_idx.numel() + inner_idx.numel()
        Bw, h, N, hd = q.shape
        batch = Bw // nW
        q5, k5, v5 = (t.view(batch, nW, h, N, hd) for t in (q, k, v))
        out = torch.empty_like(q5)
        if inner_idx.numel():
            sel = [t.index_select(1, inner_idx).flatten(0, 1) for t in (q5, k5, v5)]
            res = _sdpa(*sel, bias.unsqueeze(0), drop, self.scale)
            out.index_copy_(1, inner_idx, res.view(batch, -1, h, N, hd))
        if border_idx.numel():
            sel = [t.index_select(1, border_idx).flatten(0, 1) for t in (q5, k5, v5)]
            full = bias.unsqueeze(0) + border_mask.to(q.dtype).unsqueeze(1)
            full = full.unsqueeze(0).expand(batch, -1, -1, -1, -1).reshape(-1, h, N, N)
            res = _sdpa(*sel, full, drop, self.scale)
            out.index_copy_(1, border_idx, res.view(batch, -1, h, N, hd))
        return out.view(Bw, h, N, hd)

    def _use_kernel(self, x: torch.Tensor, context: torch.Tensor | None, tokens: int) -> bool:
        """Inference on CUDA runs ``zoo.kernels.window_attention`` (no autograd, no dropout)."""
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad
            or (context is not None and context.requires_grad)
            or any(p.requires_grad for p in self.parameters())
        )
        return (
            self.fused
            and x.is_cuda
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and not needs_grad
            and not (self.training and self.attn_drop > 0)
            and tokens <= MAX_TOKENS
            and self.head_dim <= MAX_HEAD_DIM
            and not torch.compiler.is_compiling()
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Attend inside (shifted) windows of ``x`` ``(B, D, H, W, C)`` (keys/values from ``context`` if cross)."""
        self._check(x, context)
        B, D, H, W, C = x.shape
        window, shift = effective_window((D, H, W), self.window_size, self.shift_size)
        pad = [(window[a] - s % window[a]) % window[a] for a, s in enumerate((D, H, W))]
        padded = (D + pad[0], H + pad[1], W + pad[2])
        shifted = any(s > 0 for s in shift)
        N = window[0] * window[1] * window[2]
        gather, scatter = _window_token_order((D, H, W), padded, window, shift, x.device)
        use_kernel = self._use_kernel(x, context, N)
        on_grid = use_kernel and not any(pad)  # tokens stay in place; the kernel reads windows via `gather`

        def to_windows(t: torch.Tensor) -> torch.Tensor:  # pad, roll and partition as one gather
            if any(pad):
                t = F.pad(t, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
            return _take_tokens(t.reshape(B, -1, C), gather).view(-1, N, C)

        if on_grid:
            q, k, v = self._project(
                x.reshape(B, -1, C), None if context is None else context.reshape(B, -1, C)
            )
        else:
            q, k, v = self._project(to_windows(x), to_windows(context) if self.cross else None)
        bias = self.relative_position_bias(N)
        if use_kernel:
            masks = index = None
            if shifted:
                masks, index = _mask_index_on_device(
                    padded, window, shift, self.periodic_axes, self.mask_fill, x.device, q.dtype
                )
            rows, h, tokens, hd = q.shape
            out_tokens = torch.empty(rows, tokens, h, hd, device=q.device, dtype=q.dtype)
            out = window_attention(
                q,
                k,
                v,
                bias,
                self.scale,
                masks,
                index,
                out=out_tokens.transpose(1, 2),
                token_order=gather if on_grid else None,
            )
            if on_grid:
                return self.proj_drop(self.proj(out_tokens.view(B, D, H, W, C)))
        elif self.fused:
            split = None
            if shifted:
                key = (padded, window, shift, self.periodic_axes, self.mask_fill, x.device)
                split = _split_mask_on_device(*key)
            out = self._attend_fused(q, k, v, bias, split)
        else:
            mask = None
            if shifted:
                mask = shifted_window_mask_3d(padded, window, shift, self.periodic_axes, self.mask_fill)
                mask = mask.to(device=x.device, dtype=q.dtype)
            out = self._attend_reference(q, k, v, bias, mask)
        out = out.transpose(1, 2).reshape(-1, N, C)
        out = self.proj_drop(self.proj(out))
        return _take_tokens(out.reshape(B, -1, C), scatter).view(B, D, H, W, C)


class WindowTransformerBlock3D(nn.Module):
    """Pre-norm transformer block around :class:`WindowAttention3D`: ``x + attn(norm(x)[, norm(context)])``, then ``+ mlp(norm(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int | Sequence[int],
        shift_size: int | Sequence[int] = 0,
        cross: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        periodic_axes: Sequence[bool] = (False, False, False),
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        fused: bool = True,
    ) -> None:
        super().__init__()
        from timm.layers import DropPath, Mlp

        self.norm1 = LayerNormAutocast(dim)
        self.attn = WindowAttention3D(
            dim,
            num_heads,
            window_size,
            shift_size,
            cross=cross,
            qkv_bias=qkv_bias,
            periodic_axes=periodic_axes,
            attn_drop=attn_drop,
            proj_drop=drop,
            fused=fused,
        )
        self.norm_context = LayerNormAutocast(dim) if cross else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNormAutocast(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.norm_context is not None and context is not None:
            context = self.norm_context(context)
        x = x + self.drop_path(self.attn(self.norm1(x), context))
        return x + self.drop_path(self.mlp(self.norm2(x)))
