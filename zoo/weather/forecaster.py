"""A FengWu-style forecaster: per-variable-group encoders, a cross-modal fusion transformer, per-group decoders.

FengWu (Chen et al., "FengWu: Pushing the Skillful Global Medium-range Weather Forecast
beyond 10 Days Lead", arXiv 2304.02948) treats each group of variables (surface, and each
upper-air variable over its levels) as a modality: a modality-specific encoder embeds its
channels from the two most recent states (t - 6 h, t) into a token grid, a cross-modal
transformer fuses the stacked modalities, and modality-specific decoders predict the state
at t + 6 h. This is a small version of that design on our window-attention layer:

- encoder g: Conv2d patch embedding of the group's ``history x channels`` -> ``dim`` tokens on
  ``(H/p, W/p)``, LayerNorm, ``encoder_depth`` (shifted) window blocks on the 2D grid;
- fusion: the G group grids stacked as a ``(G, H/p, W/p)`` 3D grid plus a learned group and
  position embedding, ``fusion_depth`` 3D window blocks whose windows span all groups (so
  every modality attends to every other), shifted along latitude/longitude every other block;
- decoder g: ``decoder_depth`` window blocks, a transposed-convolution patch recovery to the
  group's channels; the output is the increment added to the latest state (normalised).

Longitude is periodic in every shift. ``forward(x)`` takes ``(B, history, C, H, W)``
normalised states (channels in group order) and returns ``(B, C, H, W)``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from zoo.layers.window_attention import WindowTransformerBlock3D

__all__ = ["FengWuLite"]

PERIODIC = (False, False, True)


class _WindowStack(nn.Module):
    def __init__(
        self, dim: int, depth: int, heads: int, window: tuple, shift_every_other: bool = True
    ) -> None:
        super().__init__()
        shift = (0, window[1] // 2, window[2] // 2)
        self.blocks = nn.ModuleList(
            [
                WindowTransformerBlock3D(
                    dim,
                    heads,
                    window,
                    shift if (shift_every_other and i % 2) else (0, 0, 0),
                    periodic_axes=PERIODIC,
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class FengWuLite(nn.Module):
    """FengWu-style 6-hour forecaster over variable groups.

    Parameters
    ----------
    grid: ``(lat, lon)``; both divisible by ``patch_size``.
    group_channels: channels of each variable group, in channel order (e.g. ``(1, 1, 1)`` for
        z, u, v at one level; FengWu: ``(4, 13, 13, 13, 13, 13)``).
    dim, num_heads: token width and heads.
    patch_size: ``(lat, lon)`` patch; window_size: ``(lat, lon)`` window in tokens.
    encoder_depth, fusion_depth, decoder_depth: blocks in each part.
    history: input states (2: t - 6 h and t).
    """

    def __init__(
        self,
        grid: Sequence[int] = (64, 128),
        group_channels: Sequence[int] = (1, 1, 1),
        dim: int = 96,
        patch_size: Sequence[int] = (2, 2),
        window_size: Sequence[int] = (4, 8),
        encoder_depth: int = 2,
        fusion_depth: int = 4,
        decoder_depth: int = 2,
        num_heads: int = 4,
        history: int = 2,
    ) -> None:
        super().__init__()
        self.grid = tuple(int(g) for g in grid)
        self.group_channels = tuple(int(c) for c in group_channels)
        if any(c <= 0 for c in self.group_channels):
            raise ValueError(f"group_channels: expected positive counts, got {self.group_channels}")
        ph, pw = patch_size
        if self.grid[0] % ph or self.grid[1] % pw:
            raise ValueError(f"grid: expected multiples of patch_size {tuple(patch_size)}, got {self.grid}")
        self.channels = sum(self.group_channels)
        self.history = history
        groups = len(self.group_channels)
        tokens = (self.grid[0] // ph, self.grid[1] // pw)
        win2d = (1, window_size[0], window_size[1])
        win3d = (groups, window_size[0], window_size[1])
        self.embed = nn.ModuleList(
            [
                nn.Conv2d(history * c, dim, kernel_size=patch_size, stride=patch_size)
                for c in self.group_channels
            ]
        )
        self.embed_norm = nn.ModuleList([nn.LayerNorm(dim) for _ in self.group_channels])
        self.encoders = nn.ModuleList(
            [_WindowStack(dim, encoder_depth, num_heads, win2d) for _ in self.group_channels]
        )
        self.group_embed = nn.Parameter(torch.zeros(groups, 1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1, *tokens, dim))
        nn.init.trunc_normal_(self.group_embed, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.fusion = _WindowStack(dim, fusion_depth, num_heads, win3d)
        self.decoders = nn.ModuleList(
            [_WindowStack(dim, decoder_depth, num_heads, win2d) for _ in self.group_channels]
        )
        self.head_norm = nn.ModuleList([nn.LayerNorm(dim) for _ in self.group_channels])
        self.heads = nn.ModuleList(
            [
                nn.ConvTranspose2d(dim, c, kernel_size=patch_size, stride=patch_size)
                for c in self.group_channels
            ]
        )
        for head in self.heads:  # start as persistence
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        want = (self.history, self.channels, *self.grid)
        if x.dim() != 5 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x: expected (B, {', '.join(map(str, want))}), got {tuple(x.shape)}")
        B = x.shape[0]
        splits = torch.split(x, self.group_channels, dim=2)
        tokens = []
        for g, part in enumerate(splits):
            t = self.embed[g](part.flatten(1, 2)).permute(0, 2, 3, 1)  # B, H', W', dim
            t = self.embed_norm[g](t).unsqueeze(1) + self.pos_embed
            tokens.append(self.encoders[g](t))
        fused = torch.cat(tokens, dim=1) + self.group_embed  # B, G, H', W', dim
        fused = self.fusion(fused)
        out = []
        for g in range(len(self.group_channels)):
            t = self.decoders[g](fused[:, g : g + 1])
            t = self.head_norm[g](t[:, 0]).permute(0, 3, 1, 2)
            out.append(self.heads[g](t))
        del B
        return x[:, -1] + torch.cat(out, dim=1)
