"""Factorization self-attention (FaSA), the token mixer of FaViT.

Paper: "Factorization Vision Transformer: Modeling Long Range Dependency with Local Window
Cost", arXiv 2312.08614 (official code: github q2479036243/FaViT, ``classification/favit.py``).

The channels of the normalised tokens ``x`` (``B, N = H * W, C``) are split into branches:
``2:7:7`` (global : local : dilated) when the spatial-reduction ratio ``sr > 1`` and ``1:7``
(global : local) when ``sr == 1``.

- Global branch, one head over ``Cg`` channels: a ``sr x sr`` stride-``sr`` convolution reduces
  the grid, LayerNorm, a linear layer makes K and V, a depthwise 3x3 convolution of V (on the
  reduced grid) is added to V.
- Window branches, ``num_heads`` heads of ``c = Ci / num_heads`` channels each, fed by one
  depthwise 3x3 + pointwise 1x1 convolution over all their channels. Branch ``i`` cuts the
  (reflection-padded) grid into ``window x window`` windows, contiguous (dilation 1) or dilated
  by ``sr``; windows do not overlap (stride ``dilation * (window - 1) + 1``). For every head
  and every one of the ``window**2`` window positions, the ``L`` windows' values (``L x c``,
  window-major) are flattened and average-pooled in ``c`` contiguous chunks of ``L``: this
  mixes windows and channels exactly like the official ``AdaptiveAvgPool2d`` over the
  flattened window-channel axis. Two linear layers (``c -> c``, ``c -> 2c``) make K and V;
  a depthwise 3x3 convolution over the ``window x window`` grid is added to V.
- Every query attends to its branch's small key set (``window**2`` keys per head, ``Ng``
  reduced-grid keys for the global branch), so the cost is linear in ``N``. The branch
  outputs are concatenated (global, local, dilated) and projected.

Queries follow the official channel order: the first ``Cg`` channels of ``q`` go to the global
branch; the rest are split into ``num_heads`` heads first and each head's channels then into
the window branches.

Two paths compute the same function:

- ``forward``: the fast path, written to launch few kernels (eager training is bound by kernel
  launches). Window pooling is one strided view (a single exactly tiling branch) or one gather
  of whole head rows for all branches, then one mean per branch, with no unfold copies; the
  branches' value convolutions run as one depthwise convolution, and their attention
  as one ``scaled_dot_product_attention`` call; splits replace slices (one concatenation in
  the backward) and the output is assembled by one concatenation. Tokens stay channels-last;
  no Python-side state, so it compiles with ``torch.compile``.
- ``forward_reference``: the plain path in the official order of operations (reflection pad,
  ``nn.functional.unfold``, adaptive average pooling, explicit softmax).

Where the official code fails (a padding wider than the grid, which ``ReflectionPad2d``
refuses: inputs below about 100 px), both paths keep reflecting at the borders as often as
needed (``mirror_indices``); where the official code runs, this equals ``ReflectionPad2d``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.layers.linear import Linear, linear

__all__ = [
    "FactorizationSelfAttention",
    "fasa_branch_dims",
    "mirror_indices",
    "pool_window_tokens",
    "pool_window_tokens_branches",
    "pool_window_tokens_reference",
]


def fasa_branch_dims(dim: int, sr_ratio: int) -> tuple[int, list[int], list[int]]:
    """Channels of the global branch, channels of each window branch, and their dilations."""
    weights = (2, 7, 7) if sr_ratio > 1 else (1, 7)
    dilations = [1, sr_ratio] if sr_ratio > 1 else [1]
    unit, rest = divmod(dim, sum(weights))
    if rest or unit == 0:
        split = ":".join(map(str, weights))
        raise ValueError(
            f"dim: expected a positive multiple of {sum(weights)} (channels split {split} for sr_ratio "
            f"{sr_ratio}), got {dim}"
        )
    return unit * weights[0], [unit * w for w in weights[1:]], dilations


def mirror_indices(positions: torch.Tensor, size: int) -> torch.Tensor:
    """Fold positions ``>= 0`` into ``[0, size)`` by reflection about the borders (edge not repeated).

    Equals ``ReflectionPad`` indexing wherever the padding is narrower than ``size`` and keeps
    reflecting beyond that; a grid of one cell repeats it.
    """
    if size == 1:
        return torch.zeros_like(positions)
    period = 2 * (size - 1)
    folded = torch.remainder(positions, period)
    return torch.where(folded >= size, period - folded, folded)


def _window_grid(size: int, window: int, dilation: int, device: torch.device) -> torch.Tensor:
    """Row (or column) index of each (window position, window) pair, shape ``(window, n_windows)``."""
    stride = dilation * (window - 1) + 1
    n_windows = -(-size // stride)
    offsets = torch.arange(window, device=device) * dilation
    starts = torch.arange(n_windows, device=device) * stride
    return mirror_indices(offsets[:, None] + starts[None, :], size)


def _branch_row_indices(
    H: int, W: int, heads: int, window: int, dilations: Sequence[int], device: torch.device
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Rows of the ``(B, H * W * branches * heads, c)`` feature view that the window branches sample.

    One flat index for all branches, ordered (branch, head, row in window, column in window,
    window row, window column), and the number of windows of each branch.
    """
    n_branches = len(dilations)
    head = torch.arange(heads, device=device).view(heads, 1, 1, 1, 1)
    parts, n_windows = [], []
    for branch, dilation in enumerate(dilations):
        rows = _window_grid(H, window, dilation, device)
        cols = _window_grid(W, window, dilation, device)
        pixel = rows.view(1, window, 1, -1, 1) * W + cols.view(1, 1, window, 1, -1)
        parts.append(((pixel * n_branches + branch) * heads + head).flatten())
        n_windows.append(rows.shape[1] * cols.shape[1])
    return torch.cat(parts), tuple(n_windows)


_INDEX_CACHE: dict[tuple, tuple[torch.Tensor, tuple[int, ...]]] = {}


def _cached_branch_row_indices(
    H: int, W: int, heads: int, window: int, dilations: Sequence[int], device: torch.device
) -> tuple[torch.Tensor, tuple[int, ...]]:
    if torch.compiler.is_compiling():
        return _branch_row_indices(H, W, heads, window, dilations, device)
    key = (H, W, heads, window, tuple(dilations), str(device))
    found = _INDEX_CACHE.get(key)
    if found is None:
        if len(_INDEX_CACHE) > 256:
            _INDEX_CACHE.clear()
        with torch.inference_mode(False):  # cached indices must also serve later autograd passes
            found = _INDEX_CACHE[key] = _branch_row_indices(H, W, heads, window, dilations, device)
    return found


def _chunk_mean(tokens: torch.Tensor, n_windows: int) -> torch.Tensor:
    """``(..., L * c)`` window-major values -> ``(..., c)`` means of ``c`` contiguous chunks of ``L``."""
    chunks = tokens.unflatten(-1, (-1, n_windows))
    return chunks.squeeze(-1) if n_windows == 1 else chunks.mean(-1)


def pool_window_tokens_branches(
    feats: torch.Tensor, num_heads: int, window: int, dilations: Sequence[int]
) -> list[torch.Tensor]:
    """Pooled window tokens of several window branches at once (fast path).

    Parameters
    ----------
    feats:
        ``(B, H, W, C)`` channels-last features; branch ``i`` owns the ``i``-th of
        ``len(dilations)`` equal channel blocks, split into ``num_heads`` heads.
    num_heads, window, dilations:
        Heads of each branch, window side and each branch's dilation; windows do not overlap.

    Returns
    -------
    One ``(B, num_heads, window**2, c)`` tensor per branch (see ``pool_window_tokens``). A
    single branch that tiles the grid exactly samples a strided view; otherwise one gather of
    whole ``c``-channel rows serves all branches.
    """
    B, H, W, C = feats.shape
    n_branches = len(dilations)
    head_dim = C // (n_branches * num_heads)
    strides = [d * (window - 1) + 1 for d in dilations]
    if n_branches == 1 and H % strides[0] == 0 and W % strides[0] == 0:
        stride, dilation = strides[0], dilations[0]
        n_h, n_w = H // stride, W // stride
        tokens = feats.view(B, n_h, stride, n_w, stride, num_heads, head_dim)
        if dilation > 1:
            tokens = tokens[:, :, ::dilation, :, ::dilation]
        # B, heads, row in window, col in window, win row, win col, c
        tokens = tokens.permute(0, 5, 2, 4, 1, 3, 6).reshape(B, num_heads, window * window, -1)
        return [_chunk_mean(tokens, n_h * n_w)]
    rows, n_windows = _cached_branch_row_indices(H, W, num_heads, window, dilations, feats.device)
    gathered = feats.reshape(B, H * W * n_branches * num_heads, head_dim).index_select(1, rows)
    sizes = [num_heads * window * window * n for n in n_windows]
    return [
        _chunk_mean(part.view(B, num_heads, window * window, -1), n)
        for part, n in zip(gathered.split(sizes, 1), n_windows)
    ]


def pool_window_tokens(feats: torch.Tensor, num_heads: int, window: int, dilation: int) -> torch.Tensor:
    """Pooled window tokens of one window branch (fast path).

    Parameters
    ----------
    feats:
        ``(B, H, W, C)`` channels-last features of the branch.
    num_heads, window, dilation:
        Heads (``C % num_heads == 0``), window side and dilation; windows do not overlap.

    Returns
    -------
    ``(B, num_heads, window**2, C // num_heads)``: for each head and window position, the
    ``L`` windows x ``c`` channels values flattened window-major and averaged in ``c``
    contiguous chunks of ``L``.
    """
    return pool_window_tokens_branches(feats, num_heads, window, [dilation])[0]


def _reflect_pad_right_bottom(x: torch.Tensor, pad_right: int, pad_bottom: int) -> torch.Tensor:
    """``ReflectionPad2d((0, pad_right, 0, pad_bottom))``, reflecting again where it is wider than the grid."""
    H, W = x.shape[-2:]
    if pad_right < W and pad_bottom < H:
        return F.pad(x, (0, pad_right, 0, pad_bottom), mode="reflect") if pad_right or pad_bottom else x
    rows = mirror_indices(torch.arange(H + pad_bottom, device=x.device), H)
    cols = mirror_indices(torch.arange(W + pad_right, device=x.device), W)
    return x.index_select(-2, rows).index_select(-1, cols)


def pool_window_tokens_reference(
    feats_nchw: torch.Tensor, num_heads: int, window: int, dilation: int
) -> torch.Tensor:
    """Pooled window tokens in the official order: reflection pad, unfold, adaptive average pool."""
    B, C, H, W = feats_nchw.shape
    head_dim = C // num_heads
    stride = dilation * (window - 1) + 1
    pad_right = (stride - W % stride) % stride
    pad_bottom = (stride - H % stride) % stride
    padded = _reflect_pad_right_bottom(feats_nchw, pad_right, pad_bottom)
    cols = F.unfold(padded, kernel_size=window, dilation=dilation, stride=stride)  # B, C * window**2, L
    cols = cols.reshape(B, num_heads, head_dim, window * window, -1).permute(0, 1, 3, 4, 2)
    cols = cols.reshape(B, num_heads, window * window, -1)  # B, heads, window**2, L * c
    return F.adaptive_avg_pool2d(cols, (window * window, head_dim))


class _PointwiseWeightMatrix(torch.autograd.Function):
    """A 1x1 convolution weight ``[O, I, 1, 1]`` as an ``[O, I]`` matrix whose gradient keeps the weight's strides.

    In channels-last format the weight's size-1 dimensions carry strides that a plain view's
    gradient (contiguous) does not; this keeps every gradient laid out exactly like its
    parameter, which multi-tensor (foreach) optimizer kernels check before their fast path.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> torch.Tensor:
        ctx.weight_shape, ctx.weight_stride = weight.shape, weight.stride()
        return weight.view(weight.shape[0], weight.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().view(ctx.weight_shape)
        if ctx.weight_stride[:2] == grad.stride()[:2]:  # same memory order: only size-1 strides differ
            return grad.as_strided(ctx.weight_shape, ctx.weight_stride)
        return torch.empty_strided(
            ctx.weight_shape, ctx.weight_stride, dtype=grad.dtype, device=grad.device
        ).copy_(grad)


def _conv_init_(conv: nn.Conv2d) -> None:
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class FactorizationSelfAttention(nn.Module):
    """FaSA over tokens ``(B, H * W, dim)`` of an ``H x W`` grid.

    Parameters
    ----------
    dim:
        Channels; a multiple of 16 when ``sr_ratio > 1`` (split 2:7:7), else of 8 (split 1:7).
    num_heads:
        Heads of each window branch (the global branch has one head); must divide each
        window branch's channels.
    sr_ratio:
        Spatial reduction of the global branch and dilation of the dilated window branch.
    window_size:
        Side of the windows (7 in FaViT); ``window_size**2`` keys per head.
    qkv_bias:
        Bias of the query, key and value projections (``q``, ``global_kv``, ``window_fc``,
        ``window_kv``).
    attn_drop, proj_drop:
        Dropout on the attention weights and on the output.
    fused_attn:
        Use ``scaled_dot_product_attention`` in the fast path (else the explicit softmax).
    pad_head_dim:
        Zero-pad head dims to a multiple of 8 before ``scaled_dot_product_attention`` so the
        flash / memory-efficient kernels apply (exact); ``None``: on CUDA tensors only.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        sr_ratio: int = 1,
        window_size: int = 7,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused_attn: bool = True,
        pad_head_dim: bool | None = None,
    ):
        super().__init__()
        if not isinstance(sr_ratio, int) or sr_ratio < 1:
            raise ValueError(f"sr_ratio: expected an integer >= 1, got {sr_ratio!r}")
        if not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"window_size: expected an integer >= 1, got {window_size!r}")
        global_dim, window_dims, dilations = fasa_branch_dims(dim, sr_ratio)
        if num_heads < 1 or any(d % num_heads for d in window_dims):
            raise ValueError(
                f"num_heads: expected a divisor of the window-branch channels {window_dims[0]} "
                f"(dim {dim}, sr_ratio {sr_ratio}), got {num_heads}"
            )
        self.dim = dim
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.window_size = window_size
        self.global_dim = global_dim
        self.window_dims = window_dims
        self.dilations = dilations
        self.head_dim = window_dims[0] // num_heads
        self.fused_attn = fused_attn
        self.pad_head_dim = pad_head_dim

        self.q = Linear(dim, dim, bias=qkv_bias)
        # global branch
        self.global_reduce = nn.Conv2d(global_dim, global_dim, kernel_size=sr_ratio, stride=sr_ratio)
        self.global_norm = nn.LayerNorm(global_dim)
        self.global_kv = nn.Linear(global_dim, 2 * global_dim, bias=qkv_bias)
        self.global_v_conv = nn.Conv2d(global_dim, global_dim, 3, padding=1, groups=global_dim)
        # window branches
        window_total = dim - global_dim
        self.window_dwconv = nn.Conv2d(window_total, window_total, 3, padding=1, groups=window_total)
        self.window_pwconv = nn.Conv2d(window_total, window_total, 1)
        self.window_fc = nn.ModuleList(
            nn.Linear(d // num_heads, d // num_heads, bias=qkv_bias) for d in window_dims
        )
        self.window_kv = nn.ModuleList(
            nn.Linear(d // num_heads, 2 * d // num_heads, bias=qkv_bias) for d in window_dims
        )
        self.window_v_conv = nn.ModuleList(nn.Conv2d(d, d, 3, padding=1, groups=d) for d in window_dims)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: truncated normal (std 0.02) linears, fan-out normal convolutions."""
        if self.q.weight.device.type == "meta":  # shape-only module: nothing to draw
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                _conv_init_(m)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, "
            f"window_size={self.window_size}, global_dim={self.global_dim}, window_dims={self.window_dims}"
        )

    def _check(self, x: torch.Tensor, feat_size: Sequence[int]) -> tuple[int, int]:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected tokens (B, H * W, {self.dim}), got shape {tuple(x.shape)}")
        H, W = int(feat_size[0]), int(feat_size[1])
        if H * W != x.shape[1]:
            raise ValueError(f"feat_size: expected H * W == {x.shape[1]} tokens, got {H} x {W}")
        if H < self.sr_ratio or W < self.sr_ratio:
            raise ValueError(
                f"feat_size: expected a grid of at least sr_ratio x sr_ratio = {self.sr_ratio} x "
                f"{self.sr_ratio}, got {H} x {W}"
            )
        return H, W

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of ``(..., heads, L, c)`` tensors; leading dims beyond four are flattened into the batch."""
        lead = q.shape[:-3]
        if self.fused_attn:
            p = self.attn_drop.p if self.training else 0.0
            head_dim = q.shape[-1]
            pad = self.pad_head_dim if self.pad_head_dim is not None else q.is_cuda
            pad = (-head_dim) % 8 if pad else 0
            if pad:
                # flash / memory-efficient kernels need head dims in multiples of 8 (else the fp32 math
                # fallback materialises the scores); zeros in q, k and v leave q.k and the output unchanged
                q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
            q, k, v = (t.flatten(0, t.dim() - 4) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=scale)
            out = out[..., :head_dim] if pad else out
            return out.unflatten(0, lead) if len(lead) > 1 else out
        attn = (q * scale) @ k.transpose(-2, -1)
        attn = self.attn_drop(attn.softmax(dim=-1))
        return attn @ v

    def forward(self, x: torch.Tensor, feat_size: Sequence[int]) -> torch.Tensor:
        """Fast path: ``x (B, H * W, dim)`` -> ``(B, H * W, dim)``."""
        H, W = self._check(x, feat_size)
        B, N, C = x.shape
        Cg, heads, c, ws = self.global_dim, self.num_heads, self.head_dim, self.window_size
        n_branches = len(self.window_dims)
        # split (not sliced) views: their gradients are assembled by one concatenation
        q_g, q_w = self.q(x).split([Cg, C - Cg], -1)
        x_g, x_w = x.view(B, H, W, C).split([Cg, C - Cg], -1)

        # global branch: one head over the sr-reduced grid
        reduced = self.global_reduce(x_g.permute(0, 3, 1, 2))
        Hg, Wg = reduced.shape[-2:]
        kv_g = self.global_kv(self.global_norm(reduced.flatten(2).transpose(1, 2)))
        k_g, v_g = kv_g.unflatten(-1, (2, Cg)).unbind(-2)
        v_img = v_g.transpose(1, 2).unflatten(-1, (Hg, Wg))
        v_g = v_g + self.global_v_conv(v_img).flatten(2).transpose(1, 2)
        o_g = self._attend(q_g.unsqueeze(1), k_g.unsqueeze(1), v_g.unsqueeze(1), Cg**-0.5).squeeze(1)

        # window branches: shared depthwise + pointwise convolution, pooled window keys
        feats = self.window_dwconv(x_w.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        pointwise = _PointwiseWeightMatrix.apply(self.window_pwconv.weight)
        feats = linear(feats, pointwise, self.window_pwconv.bias)
        pooled = pool_window_tokens_branches(feats, heads, ws, self.dilations)
        if n_branches == 1:
            k, v = self._window_keys_one_branch(pooled[0])
            q_w = q_w.unflatten(-1, (heads, c)).transpose(1, 2)
        else:
            k, v = self._window_keys_batched(pooled)
            # one attention call, the branches stacked on the batch: (branch, B, heads, N, c)
            q_w = q_w.unflatten(-1, (heads, n_branches, c)).permute(3, 0, 2, 1, 4)
        o_w = self._attend(q_w, k, v, c**-0.5)  # (branches,) B, heads, N, c
        o_w = o_w.view(n_branches, B, heads, N, c).permute(1, 3, 0, 2, 4).reshape(B, N, C - Cg)
        return self.proj_drop(self.proj(torch.cat([o_g, o_w], -1)))

    def _window_keys_one_branch(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(B, heads, ws**2, c)`` of a single window branch from its pooled tokens."""
        B, heads, P, c = pooled.shape
        ws = self.window_size
        if pooled.transpose(1, 2).is_contiguous():  # linear layers on the contiguous layout: no copy
            kv = self.window_kv[0](self.window_fc[0](pooled.transpose(1, 2))).transpose(1, 2)
        else:
            kv = self.window_kv[0](self.window_fc[0](pooled))
        k, v = kv.unflatten(-1, (2, c)).unbind(-2)
        v_img = v.transpose(2, 3).reshape(B, heads * c, ws, ws)
        v = v + self.window_v_conv[0](v_img).view(B, heads, c, P).transpose(2, 3)
        return k, v

    def _window_keys_batched(self, pooled: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(branches, B, heads, ws**2, c)`` of all window branches from their pooled tokens.

        Each branch's ``fc``/``kv`` layers run as plain matrix products (a batched product over the
        branches would be one launch fewer, but its weight gradient, a reduction over all pooled
        tokens into a ``c x c`` matrix, gets no split-K kernel and costs several times more); the
        value convolutions of all branches run as one depthwise convolution.
        """
        n_branches, (B, heads, P, c) = len(pooled), pooled[0].shape
        ws = self.window_size
        tokens = torch.stack([kv(fc(t)) for t, fc, kv in zip(pooled, self.window_fc, self.window_kv)])
        k, v = tokens.view(n_branches, B, heads, P, 2, c).unbind(-2)
        # depthwise convolution of every (branch, head, channel) over the window grid
        v_img = v.permute(1, 0, 2, 4, 3).reshape(B, n_branches * heads * c, ws, ws)
        v_conv = F.conv2d(
            v_img,
            torch.cat([conv.weight for conv in self.window_v_conv]),
            torch.cat([conv.bias for conv in self.window_v_conv]),
            padding=1,
            groups=n_branches * heads * c,
        )
        v = v + v_conv.view(B, n_branches, heads, c, P).permute(1, 0, 2, 4, 3)
        return k, v

    def forward_reference(self, x: torch.Tensor, feat_size: Sequence[int]) -> torch.Tensor:
        """Plain path in the official order of operations (reshape, unfold, pool, explicit softmax)."""
        H, W = self._check(x, feat_size)
        B, N, C = x.shape
        Cg, heads, ws = self.global_dim, self.num_heads, self.window_size
        q = self.q(x)

        q_g = q[:, :, :Cg].reshape(B, N, 1, Cg).permute(0, 2, 1, 3)
        x_g = x[:, :, :Cg].permute(0, 2, 1).reshape(B, Cg, H, W)
        x_g = self.global_reduce(x_g).reshape(B, Cg, -1).permute(0, 2, 1)
        x_g = self.global_norm(x_g)
        kv_g = self.global_kv(x_g).reshape(B, -1, 2, 1, Cg).permute(2, 0, 3, 1, 4)
        k_g, v_g = kv_g[0], kv_g[1]
        attn_g = self.attn_drop(((q_g @ k_g.transpose(-2, -1)) * Cg**-0.5).softmax(dim=-1))
        v_img = v_g.transpose(1, 2).reshape(B, -1, Cg).transpose(1, 2)
        v_img = v_img.reshape(B, Cg, H // self.sr_ratio, W // self.sr_ratio)
        v_g = v_g + self.global_v_conv(v_img).reshape(B, 1, Cg, -1).transpose(-1, -2)
        outputs = [(attn_g @ v_g).transpose(1, 2).reshape(B, N, Cg)]

        q_l = q[:, :, Cg:].reshape(B, N, heads, -1).permute(0, 2, 1, 3)
        x_l = x[:, :, Cg:].reshape(B, H, W, -1).permute(0, 3, 1, 2)
        kv_l = self.window_pwconv(self.window_dwconv(x_l))
        start = 0
        for i, (dim_i, dilation) in enumerate(zip(self.window_dims, self.dilations)):
            c = dim_i // heads
            q_i = q_l[:, :, :, i * c : (i + 1) * c]
            pooled = pool_window_tokens_reference(kv_l[:, start : start + dim_i], heads, ws, dilation)
            start += dim_i
            kv = self.window_kv[i](self.window_fc[i](pooled))
            k, v = kv[:, :, :, :c], kv[:, :, :, c:]
            attn = self.attn_drop(((q_i @ k.transpose(-2, -1)) * c**-0.5).softmax(dim=-1))
            v_img = v.transpose(2, 3).reshape(B, dim_i, ws, ws)
            v = v + self.window_v_conv[i](v_img).view(B, heads, c, ws * ws).transpose(2, 3)
            outputs.append((attn @ v).permute(0, 2, 1, 3).reshape(B, N, dim_i))
        return self.proj_drop(self.proj(torch.cat(outputs, -1)))
