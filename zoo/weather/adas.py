"""Adas: the FengWu-Adas data-assimilation network.

Paper: "Towards an end-to-end artificial intelligence driven global weather forecasting
system" (Chen et al., arXiv 2312.12462); official code OpenEarthLab/FengWu-Adas.

Three inputs of ``C = S + V * L`` channels on a ``(lat, lon)`` grid, normalised: the
background (a short forecast), the observations (zero where unobserved) and the 0/1
observation mask. Each is patch-embedded into a ``(L + 1, H/p, W/p)`` token grid (the L
pressure levels plus one slab for the S surface variables); the mask stream goes through a
sigmoid and becomes the *gate* (a confidence). An absolute position embedding is added to
all three. A U-Net of five gated stages (widths d, 2d, 4d, 2d, d) follows; in each stage

    bg   = silu(conv(bg)),  gate = sigmoid(conv(gate)),  obs = silu(conv(obs)) * gate
    bg'  = bg (1 - g) + CrossBlock(bg g | obs)           (window, then shifted window)
    obs' = CrossBlock(obs | bg)
    gate = sigmoid(conv1x1(gate)); each stream adds its stage input (residual)

with patch merging (down) / expansion (up) applied to all three streams (the gate through a
sigmoid again) and skip concatenation on the way up. A Conv3d fuses ``[bg, obs, gate]``
into ``d`` channels, an 8-block 3D Swin decoder refines them and transposed convolutions
recover the analysis on the grid. Window attention is :class:`zoo.layers.WindowAttention3D`
with longitude periodic (no shift mask along it), as upstream.

Training loss (:func:`unify_mae`): per-channel L1, each channel rescaled to the first
channel's loss by a detached ratio, averaged over channels.

Keys: ``checkpoint_filter_fn`` maps the official layout (``patchembed.patch1...``,
``layer1.crosslayer.back1...``, ``decoder.blocks.0...``) onto ours; it drops the official
``relative_position_index`` buffers after checking they equal ours.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from zoo.layers.norm import LayerNormAutocast
from zoo.layers.window_attention import WindowTransformerBlock3D, relative_position_index_3d

__all__ = [
    "Adas",
    "adas_token_grid",
    "checkpoint_filter_fn",
    "conv3d_as_2d",
    "patch_embed",
    "patch_recover",
    "unify_mae",
]

LONGITUDE_PERIODIC = (False, False, True)


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(int(i) for i in v)  # type: ignore[return-value]


def adas_token_grid(
    levels: int, surface_variables: int, grid: tuple[int, int], patch: Sequence[int]
) -> tuple:
    """Token grid ``(depth, H', W')`` of the patch embedding for a ``(lat, lon)`` grid.

    An odd latitude count (721) uses a patch one row taller, as upstream, so 721 -> 120 rows.
    """
    pd, ph, pw = _triple(patch)
    H, W = grid
    kh = ph + 1 if H % 2 else ph
    depth = (levels - pd) // pd + 1 + (1 if surface_variables else 0)
    return depth, (H - kh) // ph + 1, (W - pw) // pw + 1


# (kh, kw) of the "same" Conv3d kernels that run faster as Conv2d over depth-folded channels, with
# the kernel's (rows, columns) split into tiles, one Conv2d per tile: cuDNN's 2D kernels on Hopper
# beat its 3D ones for these (bench/results/weather_conv_variants.json)
DEPTH_FOLDED_TILES: dict[tuple[int, int], tuple[tuple[int, ...], tuple[int, ...]]] = {
    (3, 5): ((3,), (5,)),
    (5, 7): ((5,), (4, 3)),
}


def conv3d_as_2d(
    conv: nn.Conv3d,
    x: torch.Tensor,
    fold_depth: bool | None = None,
    tiles: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
) -> torch.Tensor:
    """``conv(x)`` for a stride-1 "same" Conv3d, as 2D convolutions where that is cheaper.

    - Depth-1 input (one pressure level, no surface slab): with zero padding along depth only
      the centre depth slice of the kernel meets data, so ``conv2d`` with that slice gives the
      same values and gradients at a third (kernel depth 3) of the cost.
    - ``fold_depth`` (default: on CUDA for the kernels in ``DEPTH_FOLDED_TILES``): the ``kd``
      depth-shifted copies of the input are concatenated along channels and ``conv2d`` with the
      ``(C_out, kd * C_in, kh, kw)`` kernel runs over every depth slice at once; ``tiles``
      (row sizes, column sizes; default from ``DEPTH_FOLDED_TILES``, else one tile) splits the
      kernel into blocks, one unpadded ``conv2d`` each on the zero-padded input, summed.

    Anything else runs ``conv`` itself.
    """
    kd, kh, kw = conv.kernel_size
    same = (
        conv.stride == (1, 1, 1)
        and conv.dilation == (1, 1, 1)
        and conv.groups == 1
        and conv.padding == (kd // 2, kh // 2, kw // 2)
        and kd % 2 == 1
        and conv.padding_mode == "zeros"
    )
    if not same:
        return conv(x)
    if x.shape[2] == 1:
        weight = conv.weight[:, :, kd // 2]
        return F.conv2d(x[:, :, 0], weight, conv.bias, padding=conv.padding[1:]).unsqueeze(2)
    if fold_depth is None:
        fold_depth = x.is_cuda and (kh, kw) in DEPTH_FOLDED_TILES
    if not fold_depth or kd == 1:
        return conv(x)
    rows, cols = tiles or DEPTH_FOLDED_TILES.get((kh, kw), ((kh,), (kw,)))
    if sum(rows) != kh or sum(cols) != kw or min(rows + cols) < 1:
        raise ValueError(
            f"tiles: expected row sizes summing to {kh} and column sizes to {kw}, got {rows}, {cols}"
        )
    B, C, D, H, W = x.shape
    weight = conv.weight.transpose(1, 2).reshape(conv.out_channels, kd * C, kh, kw)
    one_tile = len(rows) == len(cols) == 1
    # kd depth-shifted copies side by side along channels: (B * D, H', W', kd * C), channels last;
    # with several tiles the rows and columns are zero-padded here, else by the convolution
    hw_pad = (0, 0, 0, 0) if one_tile else (kw // 2, kw // 2, kh // 2, kh // 2)
    channels_last = F.pad(x.movedim(1, -1), (0, 0, *hw_pad, kd // 2, kd // 2))
    stacked = torch.cat([channels_last[:, i : i + D] for i in range(kd)], dim=-1).flatten(0, 1)
    if one_tile:
        out = F.conv2d(stacked.permute(0, 3, 1, 2), weight, conv.bias, padding=(kh // 2, kw // 2))
    else:
        out = None
        row = 0
        for height in rows:
            col = 0
            for width in cols:
                part = stacked[:, row : row + H + height - 1, col : col + W + width - 1].permute(0, 3, 1, 2)
                tile = weight[:, :, row : row + height, col : col + width]
                out = F.conv2d(part, tile, conv.bias) if out is None else out + F.conv2d(part, tile)
                col += width
            row += height
    return out.permute(0, 2, 3, 1).reshape(B, D, H, W, conv.out_channels).movedim(-1, 1)


def patch_embed(x: torch.Tensor, conv: nn.Conv2d | nn.Conv3d) -> torch.Tensor:
    """``conv(x)`` of an unpadded patch-embedding convolution (kernel >= stride) as patches @ weight.

    Returns channels last, ``(B, *tokens, C_out)``: one matrix product instead of the strided
    convolution (for few input channels cuDNN has only slow kernels for it).
    """
    n = conv.weight.dim() - 2
    patches = x
    for axis, (size, step) in enumerate(zip(conv.kernel_size, conv.stride)):
        patches = patches.unfold(2 + axis, size, step)
    patches = patches.permute(0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n)).flatten(1 + n)
    return F.linear(patches, conv.weight.flatten(1), conv.bias)


def patch_recover(tokens: torch.Tensor, deconv: nn.ConvTranspose2d | nn.ConvTranspose3d) -> torch.Tensor:
    """``deconv(tokens)`` of an unpadded patch-recovery transposed convolution, from channels-last tokens.

    ``tokens (B, *T, C_in)``; returns ``(B, C_out, *out)``. Every token's patch is one matrix
    product; where the kernel exceeds the stride along one axis (721 latitudes: kernel 7, stride
    6) the overhanging rows are added onto the next patch's first rows.
    """
    n = deconv.weight.dim() - 2
    kernel, stride = deconv.kernel_size, deconv.stride
    B, T, C = tokens.shape[0], tokens.shape[1 : 1 + n], deconv.out_channels
    overlap = [a for a in range(n) if kernel[a] != stride[a]]
    if len(overlap) > 1 or any(not stride[a] < kernel[a] <= 2 * stride[a] for a in overlap):
        raise ValueError(f"deconv: expected kernel == stride but along one axis, got {kernel} / {stride}")
    patches = F.linear(tokens, deconv.weight.flatten(1).t()).view(*tokens.shape[: 1 + n], C, *kernel)

    def tile(part: torch.Tensor) -> torch.Tensor:  # (B, *T, C, *k) -> (B, C, T0 * k0, T1 * k1, ...)
        order = [0, 1 + n] + [d for a in range(n) for d in (1 + a, 2 + n + a)]
        sizes = [T[a] * part.shape[2 + n + a] for a in range(n)]
        return part.permute(order).reshape(B, C, *sizes)

    if not overlap:
        out = tile(patches)
    else:
        (a,) = overlap
        s, k = stride[a], kernel[a]
        out = F.pad(tile(patches.narrow(2 + n + a, 0, s)), [0, 0] * (n - 1 - a) + [0, s])
        rows = out.unflatten(2 + a, (T[a] + 1, s))
        rows.narrow(2 + a, 1, T[a]).narrow(3 + a, 0, k - s).add_(
            tile(patches.narrow(2 + n + a, s, k - s)).unflatten(2 + a, (T[a], k - s))
        )
        out = out.narrow(2 + a, 0, (T[a] - 1) * s + k)
    if deconv.bias is not None:
        out = out + deconv.bias.view(1, C, *[1] * n).to(out.dtype)
    return out


class StateEmbedding(nn.Module):
    """Patch embedding of one input stream: Conv3d over (variables as channels, levels as depth), Conv2d over surface variables."""

    def __init__(
        self, surface_variables: int, upper_variables: int, patch: tuple, dim: int, odd_lat: bool
    ) -> None:
        super().__init__()
        pd, ph, pw = patch
        kh = ph + 1 if odd_lat else ph
        self.surface_variables = surface_variables
        self.upper_variables = upper_variables
        self.upper = nn.Conv3d(upper_variables, dim, kernel_size=(pd, kh, pw), stride=patch)
        self.surface = (
            nn.Conv2d(surface_variables, dim, kernel_size=(kh, pw), stride=(ph, pw))
            if surface_variables
            else None
        )
        self.norm = LayerNormAutocast(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        S, V = self.surface_variables, self.upper_variables
        upper = patch_embed(x[:, S:].reshape(B, V, (C - S) // V, H, W), self.upper)
        if self.surface is not None:
            upper = torch.cat([upper, patch_embed(x[:, :S], self.surface).unsqueeze(1)], dim=1)
        return self.norm(upper).movedim(-1, 1)


class StateRecovery(nn.Module):
    """Inverse of :class:`StateEmbedding`: transposed convolutions back to ``(B, S + V * L, H, W)``."""

    def __init__(
        self, surface_variables: int, upper_variables: int, patch: tuple, dim: int, odd_lat: bool
    ) -> None:
        super().__init__()
        pd, ph, pw = patch
        kh = ph + 1 if odd_lat else ph
        self.upper = nn.ConvTranspose3d(dim, upper_variables, kernel_size=(pd, kh, pw), stride=patch)
        self.surface = (
            nn.ConvTranspose2d(dim, surface_variables, kernel_size=(kh, pw), stride=(ph, pw))
            if surface_variables
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, depth, H', W', dim)`` channels last -> ``(B, S + V * L, H, W)``."""
        if self.surface is None:
            return patch_recover(x, self.upper).flatten(1, 2)
        surface = patch_recover(x[:, -1], self.surface)
        upper = patch_recover(x[:, :-1], self.upper).flatten(1, 2)
        return torch.cat([surface, upper], dim=1)


class PatchMerging2D(nn.Module):
    """Halve (lat, lon) of a channel-last grid: 2x2 neighbours concatenated as (h0w0, h0w1, h1w0, h1w1), norm, linear 4C -> 2C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = LayerNormAutocast(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, D, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        x = (
            x.view(B, D, H // 2, 2, W // 2, 2, C)
            .permute(0, 1, 2, 4, 3, 5, 6)
            .reshape(B, D, H // 2, W // 2, 4 * C)
        )
        return self.reduction(self.norm(x))


class PatchExpansion2D(nn.Module):
    """Double (lat, lon): norm, linear C -> 2C, each token split into 2x2 tokens of C/2 channels."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = LayerNormAutocast(dim)
        self.expansion = nn.Linear(dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, D, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        x = self.expansion(self.norm(x)).view(B, D, H, W, 2, 2, C // 2)
        return x.permute(0, 1, 2, 4, 3, 5, 6).reshape(B, D, 2 * H, 2 * W, C // 2)


class TriStreamResample(nn.Module):
    """The same resampling (merge or expand) applied to background, observation and gate; the gate through a sigmoid."""

    def __init__(self, dim: int, kind: str) -> None:
        super().__init__()
        make = PatchMerging2D if kind == "down" else PatchExpansion2D
        self.background = make(dim)
        self.observation = make(dim)
        self.gate = make(dim)

    def forward(self, streams: list[torch.Tensor]) -> list[torch.Tensor]:
        bg, obs, gate = (s.movedim(1, -1) for s in streams)
        bg = self.background(bg)
        obs = self.observation(obs)
        gate = torch.sigmoid(self.gate(gate))
        return [bg.movedim(-1, 1), obs.movedim(-1, 1), gate.movedim(-1, 1)]


class GatedCrossAttention(nn.Module):
    """Gated cross-attention between background and observation streams in (then shifted) 3D windows."""

    def __init__(self, dim: int, num_heads: int, window_size: tuple, fused: bool = True) -> None:
        super().__init__()
        shift = tuple(w // 2 for w in window_size)

        def block(shift_size: tuple) -> WindowTransformerBlock3D:
            return WindowTransformerBlock3D(
                dim,
                num_heads,
                window_size,
                shift_size,
                cross=True,
                qkv_bias=True,
                periodic_axes=LONGITUDE_PERIODIC,
                fused=fused,
            )

        self.background_attn = block((0, 0, 0))
        self.background_attn_shifted = block(shift)
        self.observation_attn = block((0, 0, 0))
        self.observation_attn_shifted = block(shift)
        self.gate_update = nn.Conv3d(dim, dim, 1)
        self.grad_checkpointing = False

    def _run(self, block: nn.Module, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, context, use_reentrant=False)
        return block(x, context)

    def forward(self, bg: torch.Tensor, obs: torch.Tensor, gate: torch.Tensor) -> list[torch.Tensor]:
        bg, obs, g = (t.movedim(1, -1) for t in (bg, obs, gate))
        bg_mid = bg * (1 - g) + self._run(self.background_attn, bg * g, obs)
        obs_mid = self._run(self.observation_attn, obs, bg)
        bg = bg_mid * (1 - g) + self._run(self.background_attn_shifted, bg_mid * g, obs_mid)
        obs = self._run(self.observation_attn_shifted, obs_mid, bg_mid)
        gate = torch.sigmoid(conv3d_as_2d(self.gate_update, gate))
        return [bg.movedim(-1, 1), obs.movedim(-1, 1), gate]


class GatedConvStage(nn.Module):
    """One U-Net stage: optional resampling, gated 3D convolutions, gated cross-attention, residuals.

    ``resample`` is ``None``, ``"down"`` (input width ``dim // 2``) or ``"up"`` (input width
    ``2 * dim``, then the skip of width ``dim`` is concatenated).
    """

    def __init__(
        self,
        dim: int,
        kernel: int | tuple,
        num_heads: int,
        window_size: tuple,
        resample: str | None = None,
        fused: bool = True,
    ) -> None:
        super().__init__()
        kernel = _triple(kernel)
        padding = tuple(k // 2 for k in kernel)
        in_dim = 2 * dim if resample == "up" else dim
        self.resample = None
        if resample == "down":
            self.resample = TriStreamResample(dim // 2, "down")
        elif resample == "up":
            self.resample = TriStreamResample(2 * dim, "up")
        elif resample is not None:
            raise ValueError(f"resample: expected None, 'down' or 'up', got {resample!r}")
        self.background_conv = nn.Conv3d(in_dim, dim, kernel, padding=padding)
        self.observation_conv = nn.Conv3d(in_dim, dim, kernel, padding=padding)
        self.gate_conv = nn.Conv3d(in_dim, dim, kernel, padding=padding)
        self.cross = GatedCrossAttention(dim, num_heads, window_size, fused=fused)

    def forward(
        self, streams: list[torch.Tensor], skip: list[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        if self.resample is not None:
            streams = self.resample(streams)
        bg, obs, gate = streams
        if skip is not None:
            bg, obs, gate = (torch.cat([a, b], dim=1) for a, b in zip(streams, skip))
        bg = F.silu(conv3d_as_2d(self.background_conv, bg))
        gate = torch.sigmoid(conv3d_as_2d(self.gate_conv, gate))
        obs = F.silu(conv3d_as_2d(self.observation_conv, obs)) * gate
        out = self.cross(bg, obs, gate)
        return [o + s for o, s in zip(out, streams)]


class Adas(nn.Module):
    """FengWu-Adas: ``analysis = Adas(background, observation, mask)``, all ``(B, S + V * L, H, W)`` normalised.

    Parameters
    ----------
    grid: ``(lat, lon)`` points.
    levels, surface_variables, upper_variables: channel layout ``S + V * L`` (surface first,
        then each upper-air variable over all levels).
    dim: width ``d`` of the first stage (d, 2d, 4d, 2d, d).
    patch_size: ``(levels, lat, lon)`` patch.
    window_size: 3D attention window ``(levels, lat, lon)`` in tokens.
    depth: decoder blocks; num_heads: heads everywhere.
    pos_embed: learned absolute position embedding added to the three streams.
    residual: predict the increment, ``analysis = background + increment_scale * output``
        (output zero at initialisation), instead of the analysis itself. Upstream predicts the
        analysis (``False``, the published configs); the small OSSE configs use ``True`` so that
        short trainings start from the background.
    innovation: feed the observation stream the innovation ``(observation - background) *
        mask / increment_scale`` (zero where unobserved) instead of the observations.
        Upstream feeds the observations (``False``); the OSSE configs use ``True``.

    ``increment_scale`` (a persistent per-channel buffer, present when ``residual`` or
    ``innovation`` is on; ones until :meth:`set_increment_scale`) is the typical size of a
    background error in normalised units (OSSE training uses the innovation's standard
    deviation, background and observation errors together, so that noisy observed values do
    not dwarf the informative ones). A 6-hour background is within a few hundredths of
    the truth in normalised units, so a network that must subtract two O(1) streams to find
    the correction, and emit a correction a hundred times smaller than its inputs, learns
    very slowly (bf16 alone resolves only about 1/256 of an O(1) value). Innovations and
    increments measured in units of the background error are O(1) on both ends, which
    leaves the network the job 3D-Var does: spreading observed departures in space and
    across variables. The architecture (streams, gates, U-Net, decoder) is unchanged.
    """

    def __init__(
        self,
        grid: Sequence[int] = (721, 1440),
        levels: int = 13,
        surface_variables: int = 4,
        upper_variables: int = 5,
        dim: int = 192,
        patch_size: Sequence[int] = (1, 6, 6),
        window_size: Sequence[int] = (2, 5, 10),
        depth: int = 8,
        num_heads: int = 8,
        drop_path_rate: float = 0.1,
        pos_embed: bool = True,
        grad_checkpointing: bool = False,
        fused_attention: bool = True,
        residual: bool = False,
        innovation: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim: expected a multiple of num_heads={num_heads}, got {dim}")
        patch = _triple(patch_size)
        window = _triple(window_size)
        self.grid = tuple(int(g) for g in grid)
        self.levels = levels
        self.surface_variables = surface_variables
        self.upper_variables = upper_variables
        self.channels = surface_variables + upper_variables * levels
        self.token_grid = adas_token_grid(levels, surface_variables, self.grid, patch)
        odd = bool(self.grid[0] % 2)
        self.embed_background = StateEmbedding(surface_variables, upper_variables, patch, dim, odd)
        self.embed_observation = StateEmbedding(surface_variables, upper_variables, patch, dim, odd)
        self.embed_mask = StateEmbedding(surface_variables, upper_variables, patch, dim, odd)
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, *self.token_grid)) if pos_embed else None
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        wide, narrow = (3, 5, 7), (3, 3, 5)
        self.stages = nn.ModuleList(
            [
                GatedConvStage(dim, wide, num_heads, window, None, fused_attention),
                GatedConvStage(2 * dim, narrow, num_heads, window, "down", fused_attention),
                GatedConvStage(4 * dim, 3, num_heads, window, "down", fused_attention),
                GatedConvStage(2 * dim, narrow, num_heads, window, "up", fused_attention),
                GatedConvStage(dim, wide, num_heads, window, "up", fused_attention),
            ]
        )
        self.fusion = nn.Conv3d(3 * dim, dim, kernel_size=wide, padding=(1, 2, 3))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        shift = tuple(w // 2 for w in window)
        self.decoder = nn.ModuleList(
            [
                WindowTransformerBlock3D(
                    dim,
                    num_heads,
                    window,
                    (0, 0, 0) if i % 2 == 0 else shift,
                    qkv_bias=True,
                    periodic_axes=LONGITUDE_PERIODIC,
                    drop_path=rates[i],
                    fused=fused_attention,
                )
                for i in range(depth)
            ]
        )
        self.recover = StateRecovery(surface_variables, upper_variables, patch, dim, odd)
        self.residual = residual
        self.innovation = innovation
        if residual or innovation:
            self.register_buffer("increment_scale", torch.ones(self.channels))
        self.apply(self._init_weights)
        if residual:  # start as the background itself
            for m in self.recover.modules():
                if isinstance(m, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
                    nn.init.zeros_(m.weight)
                    nn.init.zeros_(m.bias)
        self.set_grad_checkpointing(grad_checkpointing)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_increment_scale(self, scale: torch.Tensor | Sequence[float]) -> None:
        """Set the per-channel size of background errors (normalised units) used by ``residual``/``innovation``."""
        if not hasattr(self, "increment_scale"):
            raise ValueError("set_increment_scale: the model has neither residual nor innovation enabled")
        scale = torch.as_tensor(scale, dtype=torch.float32).flatten()
        if scale.numel() != self.channels or not bool((scale > 0).all() and scale.isfinite().all()):
            raise ValueError(
                f"scale: expected {self.channels} positive finite values, got {[round(v, 6) for v in scale.tolist()]}"
            )
        self.increment_scale.copy_(scale.to(self.increment_scale.device))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.cross.grad_checkpointing = enable

    def set_fused_attention(self, enable: bool = True) -> None:
        """Switch every window attention between SDPA (True) and the explicit reference (False)."""
        from zoo.layers.window_attention import WindowAttention3D

        for m in self.modules():
            if isinstance(m, WindowAttention3D):
                m.fused = enable

    def _check(self, name: str, x: torch.Tensor) -> None:
        want = (self.channels, *self.grid)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"{name}: expected (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(x.shape)}")

    def forward(
        self, background: torch.Tensor, observation: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        for name, x in (("background", background), ("observation", observation), ("mask", mask)):
            self._check(name, x)
        scale = self.increment_scale.view(1, -1, 1, 1) if hasattr(self, "increment_scale") else None
        if self.innovation:
            departure = (observation.float() - background.float()) / scale
            observation = torch.where(mask > 0, departure, torch.zeros_like(departure))
        streams = [
            self.embed_background(background),
            self.embed_observation(observation),
            torch.sigmoid(self.embed_mask(mask)),
        ]
        if self.pos_embed is not None:
            streams = [s + self.pos_embed for s in streams]
        s1 = self.stages[0](streams)
        s2 = self.stages[1](s1)
        x = self.stages[2](s2)
        x = self.stages[3](x, s2)
        x = self.stages[4](x, s1)
        x = conv3d_as_2d(self.fusion, torch.cat(x, dim=1)).movedim(1, -1)
        for block in self.decoder:
            x = (
                checkpoint(block, x, use_reentrant=False)
                if self.grad_checkpointing and self.training
                else block(x)
            )
        out = self.recover(x)
        return background + scale * out if self.residual else out


def unify_mae(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Adas's UnifyMAE: per-channel L1, each rescaled to channel 0's loss by a detached ratio, averaged."""
    if prediction.shape != target.shape or prediction.dim() < 2:
        raise ValueError(
            f"unify_mae: expected equal (B, C, ...) shapes, got {tuple(prediction.shape)}, {tuple(target.shape)}"
        )
    per_channel = (prediction - target).abs().transpose(0, 1).flatten(1).mean(1)
    first = per_channel[0]
    rest = per_channel[1:]
    scaled = rest / (rest / first).detach()
    return (scaled.sum() + first) / per_channel.numel()


# official key name -> ours, applied in order on dot-separated names
_OFFICIAL_RULES: list[tuple[str, str]] = [
    (r"^patchembed\.patch1\.", "embed_background."),
    (r"^patchembed\.patch2\.", "embed_observation."),
    (r"^patchembed\.patch3\.", "embed_mask."),
    (r"^patchunembed\.", "recover."),
    (r"\.proj3d\.", ".upper."),
    (r"\.proj2d\.", ".surface."),
    (r"^absolute_pos_embed$", "pos_embed"),
    (r"^layer([1-5])\.", lambda m: f"stages.{int(m.group(1)) - 1}."),
    (r"^(stages\.\d)\.conv\.", r"\1.background_conv."),
    (r"^(stages\.\d)\.gateconv\.", r"\1.observation_conv."),
    (r"^(stages\.\d)\.gate\.", r"\1.gate_conv."),
    (r"\.samplelayer\.(merge|expand)1\.", ".resample.background."),
    (r"\.samplelayer\.(merge|expand)2\.", ".resample.observation."),
    (r"\.samplelayer\.(merge|expand)3\.", ".resample.gate."),
    (r"\.crosslayer\.back1\.", ".cross.background_attn."),
    (r"\.crosslayer\.back2\.", ".cross.background_attn_shifted."),
    (r"\.crosslayer\.obser1\.", ".cross.observation_attn."),
    (r"\.crosslayer\.obser2\.", ".cross.observation_attn_shifted."),
    (r"\.crosslayer\.gate\.", ".cross.gate_update."),
    (r"\.norm_condition\.", ".norm_context."),
    (r"^decoder\.blocks\.", "decoder."),
]


def official_key_to_zoo(key: str) -> str:
    """Map one official FengWu-Adas parameter name onto this module's."""
    for pattern, repl in _OFFICIAL_RULES:
        key = re.sub(pattern, repl, key)
    return key


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official FengWu-Adas layout -> ours (our own layout passes through unchanged).

    The official ``relative_position_index`` buffers are derived from the window size; they
    are checked against ours and dropped.
    """
    if not any(k.startswith(("patchembed.", "layer1.", "patchunembed.")) for k in state_dict):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        if key.endswith("relative_position_index"):
            window = getattr(model, "token_grid", None)
            attn = model.get_submodule(official_key_to_zoo(key).rsplit(".", 1)[0])
            expected = relative_position_index_3d(attn.window_size)
            if tuple(value.shape) != tuple(expected.shape) or not torch.equal(value.long().cpu(), expected):
                raise ValueError(
                    f"checkpoint: {key} does not match window {attn.window_size} (token grid {window})"
                )
            continue
        out[official_key_to_zoo(key)] = value
    return out
