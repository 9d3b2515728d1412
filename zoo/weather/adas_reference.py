"""Plain-PyTorch reference of FengWu-Adas (arXiv 2312.12462) on the official parameter layout.

A functional forward pass that reads weights straight from a state dict under the official
key names (``patchembed.patch1.proj3d.weight``, ``layer2.crosslayer.back1.attn.q.weight``,
``decoder.blocks.3.attn.qkv.weight``, ...) and follows the official computation order step
by step: explicit ``q k^T`` logits, additive relative-position bias and ``-100`` shift mask
(built by labelling the three strips of each rolled axis, longitude never masked), softmax,
weighted sum. It shares no code with :mod:`zoo.weather.adas`; the tests use it to check
that ``zoo.create(..., checkpoint=official_file)`` gives the same analysis, and the speed
benchmark uses it as the upstream-style baseline.

``official_state_shapes`` lists every official key with its shape for a configuration, and
``random_official_state`` fills them with random weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["OfficialConfig", "adas_reference_forward", "official_state_shapes", "random_official_state"]


@dataclass(frozen=True)
class OfficialConfig:
    grid: tuple[int, int] = (721, 1440)
    levels: int = 13
    surface_variables: int = 4
    upper_variables: int = 5
    dim: int = 192
    patch: tuple[int, int, int] = (1, 6, 6)
    window: tuple[int, int, int] = (2, 5, 10)
    depth: int = 8
    heads: int = 8

    @property
    def latitude_kernel(self) -> int:
        return self.patch[1] + 1 if self.grid[0] % 2 else self.patch[1]

    @property
    def tokens(self) -> tuple[int, int, int]:
        H, W = self.grid
        return (
            self.levels // self.patch[0] + 1,
            (H - self.latitude_kernel) // self.patch[1] + 1,
            (W - self.patch[2]) // self.patch[2] + 1,
        )


STAGE_KERNELS = [(3, 5, 7), (3, 3, 5), (3, 3, 3), (3, 3, 5), (3, 5, 7)]
STAGE_WIDTHS = [1, 2, 4, 2, 1]
STAGE_SAMPLE = [None, "down", "down", "up", "up"]


def _window_index(window: tuple[int, int, int]) -> np.ndarray:
    wd, wh, ww = window
    d, h, w = (a.reshape(-1) for a in np.indices(window))
    rel_d = d[:, None] - d[None, :] + wd - 1
    rel_h = h[:, None] - h[None, :] + wh - 1
    rel_w = w[:, None] - w[None, :] + ww - 1
    return (rel_d * (2 * wh - 1) + rel_h) * (2 * ww - 1) + rel_w


def official_state_shapes(cfg: OfficialConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the official state dict with its shape (``relative_position_index`` included)."""
    d, S, V = cfg.dim, cfg.surface_variables, cfg.upper_variables
    pd, _, pw = cfg.patch
    kh = cfg.latitude_kernel
    wd, wh, ww = cfg.window
    table = (2 * wd - 1) * (2 * wh - 1) * (2 * ww - 1)
    n = wd * wh * ww
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(prefix: str, out_f: int, in_f: int, bias: bool = True) -> None:
        shapes[prefix + ".weight"] = (out_f, in_f)
        if bias:
            shapes[prefix + ".bias"] = (out_f,)

    def norm(prefix: str, width: int) -> None:
        shapes[prefix + ".weight"] = (width,)
        shapes[prefix + ".bias"] = (width,)

    def block(prefix: str, width: int, cross: bool) -> None:
        norm(prefix + ".norm1", width)
        shapes[prefix + ".attn.relative_position_bias_table"] = (table, cfg.heads)
        shapes[prefix + ".attn.relative_position_index"] = (n, n)
        if cross:
            for p in "qkv":
                linear(f"{prefix}.attn.{p}", width, width)
            norm(prefix + ".norm_condition", width)
        else:
            linear(prefix + ".attn.qkv", 3 * width, width)
        linear(prefix + ".attn.proj", width, width)
        norm(prefix + ".norm2", width)
        linear(prefix + ".mlp.fc1", 4 * width, width)
        linear(prefix + ".mlp.fc2", width, 4 * width)

    for i in (1, 2, 3):
        p = f"patchembed.patch{i}"
        shapes[p + ".proj3d.weight"] = (d, V, pd, kh, pw)
        shapes[p + ".proj3d.bias"] = (d,)
        shapes[p + ".proj2d.weight"] = (d, S, kh, pw)
        shapes[p + ".proj2d.bias"] = (d,)
        norm(p + ".norm", d)
    shapes["absolute_pos_embed"] = (1, d, *cfg.tokens)
    for i, (kernel, mult, sample) in enumerate(zip(STAGE_KERNELS, STAGE_WIDTHS, STAGE_SAMPLE), start=1):
        w = d * mult
        inch = 2 * w if sample == "up" else w
        for conv in ("conv", "gateconv", "gate"):
            shapes[f"layer{i}.{conv}.weight"] = (w, inch, *kernel)
            shapes[f"layer{i}.{conv}.bias"] = (w,)
        for b in ("back1", "back2", "obser1", "obser2"):
            block(f"layer{i}.crosslayer.{b}", w, cross=True)
        shapes[f"layer{i}.crosslayer.gate.weight"] = (w, w, 1, 1, 1)
        shapes[f"layer{i}.crosslayer.gate.bias"] = (w,)
        for j in (1, 2, 3):
            if sample == "down":
                half = w // 2
                linear(f"layer{i}.samplelayer.merge{j}.reduction", 2 * half, 4 * half, bias=False)
                norm(f"layer{i}.samplelayer.merge{j}.norm", 4 * half)
            elif sample == "up":
                wide = 2 * w
                linear(f"layer{i}.samplelayer.expand{j}.expansion", 2 * wide, wide, bias=False)
                norm(f"layer{i}.samplelayer.expand{j}.norm", wide)
    shapes["fusion.weight"] = (d, 3 * d, 3, 5, 7)
    shapes["fusion.bias"] = (d,)
    for i in range(cfg.depth):
        block(f"decoder.blocks.{i}", d, cross=False)
    shapes["patchunembed.proj3d.weight"] = (d, V, pd, kh, pw)
    shapes["patchunembed.proj3d.bias"] = (V,)
    shapes["patchunembed.proj2d.weight"] = (d, S, kh, pw)
    shapes["patchunembed.proj2d.bias"] = (S,)
    return shapes


def random_official_state(cfg: OfficialConfig, seed: int = 0, std: float = 0.05) -> dict[str, torch.Tensor]:
    """Random weights under the official names (norm weights near 1, index buffers exact)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_state_shapes(cfg).items():
        if key.endswith("relative_position_index"):
            state[key] = torch.from_numpy(_window_index(cfg.window)).long()
        elif ".norm" in key and key.endswith(".weight") or key.endswith("norm_condition.weight"):
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            state[key] = std * torch.randn(shape, generator=gen)
    return state


# ---------------------------------------------------------------- functional pieces


def _layer_norm(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps=1e-5)


def _linear(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    return F.linear(x, sd[prefix + ".weight"], sd.get(prefix + ".bias"))


def _window_and_shift(size, window, shift):
    win, sh = list(window), list(shift)
    for a in range(3):
        if size[a] <= window[a]:
            win[a], sh[a] = size[a], 0
    return tuple(win), tuple(sh)


def _partition(x: torch.Tensor, win) -> torch.Tensor:
    B, D, H, W, C = x.shape
    x = x.reshape(B, D // win[0], win[0], H // win[1], win[1], W // win[2], win[2], C)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, win[0] * win[1] * win[2], C)


def _merge(windows: torch.Tensor, win, B: int, D: int, H: int, W: int) -> torch.Tensor:
    x = windows.reshape(B, D // win[0], H // win[1], W // win[2], win[0], win[1], win[2], -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(B, D, H, W, -1)


@lru_cache(maxsize=64)
def _shift_mask(Dp: int, Hp: int, Wp: int, win, shift, device) -> torch.Tensor:
    """Strip labels as Swin's slices assign them; the longitude loop relabels every column, so it never masks."""
    labels = torch.zeros(Dp, Hp, Wp)
    count = 0
    for ds in (slice(-win[0]), slice(-win[0], -shift[0]), slice(-shift[0], None)):
        for hs in (slice(-win[1]), slice(-win[1], -shift[1]), slice(-shift[1], None)):
            for ws in (slice(-win[2]), slice(-win[2], 0), slice(0, None)):
                labels[ds, hs, ws] = count
                count += 1
    per_window = _partition(labels[None, ..., None], win).squeeze(-1)
    diff = per_window[:, None, :] - per_window[:, :, None]
    return torch.where(diff != 0, -100.0, 0.0).to(device)


@lru_cache(maxsize=64)
def _bias_index(window: tuple, tokens: int, device) -> torch.Tensor:
    return torch.from_numpy(_window_index(window)[:tokens, :tokens].reshape(-1)).to(device)


def _swin_block(
    x: torch.Tensor, sd: dict, p: str, cfg: OfficialConfig, shifted: bool, cond: torch.Tensor | None = None
) -> torch.Tensor:
    """One Video-Swin block (B, D, H, W, C); cross attention when ``cond`` is given."""
    B, D, H, W, C = x.shape
    heads = cfg.heads
    win, shift = _window_and_shift((D, H, W), cfg.window, tuple(w // 2 for w in cfg.window))
    mask_shift = shift
    if not shifted:
        shift = (0, 0, 0)
    pads = [(win[a] - n % win[a]) % win[a] for a, n in enumerate((D, H, W))]

    def prepare(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        if any(shift):
            t = torch.roll(t, shifts=(-shift[0], -shift[1], -shift[2]), dims=(1, 2, 3))
        return _partition(t, win)

    shortcut = x
    xw = prepare(_layer_norm(x, sd, p + ".norm1"))
    Bw, N, _ = xw.shape
    hd = C // heads
    if cond is not None:
        cw = prepare(_layer_norm(cond, sd, p + ".norm_condition"))
        q = _linear(xw, sd, p + ".attn.q").reshape(Bw, N, heads, hd).transpose(1, 2)
        k = _linear(cw, sd, p + ".attn.k").reshape(Bw, N, heads, hd).transpose(1, 2)
        v = _linear(cw, sd, p + ".attn.v").reshape(Bw, N, heads, hd).transpose(1, 2)
    else:
        qkv = _linear(xw, sd, p + ".attn.qkv").reshape(Bw, N, 3, heads, hd)
        q, k, v = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
    logits = (q * hd**-0.5) @ k.transpose(-2, -1)
    index = _bias_index(cfg.window, N, x.device)
    bias = sd[p + ".attn.relative_position_bias_table"][index].reshape(N, N, heads).permute(2, 0, 1)
    logits = logits + bias[None]
    if any(shift):
        Dp, Hp, Wp = D + pads[0], H + pads[1], W + pads[2]
        mask = _shift_mask(Dp, Hp, Wp, win, mask_shift, x.device)
        nW = mask.shape[0]
        logits = (logits.reshape(Bw // nW, nW, heads, N, N) + mask[None, :, None]).reshape(Bw, heads, N, N)
    out = (torch.softmax(logits, dim=-1) @ v).transpose(1, 2).reshape(Bw, N, C)
    out = _linear(out, sd, p + ".attn.proj")
    out = _merge(out, win, B, D + pads[0], H + pads[1], W + pads[2])
    if any(shift):
        out = torch.roll(out, shifts=shift, dims=(1, 2, 3))
    x = shortcut + out[:, :D, :H, :W]
    hidden = F.gelu(_linear(_layer_norm(x, sd, p + ".norm2"), sd, p + ".mlp.fc1"))
    return x + _linear(hidden, sd, p + ".mlp.fc2")


def _embed(x: torch.Tensor, sd: dict, p: str, cfg: OfficialConfig) -> torch.Tensor:
    B, C, H, W = x.shape
    S, V = cfg.surface_variables, cfg.upper_variables
    stride = cfg.patch
    upper = F.conv3d(
        x[:, S:].reshape(B, V, (C - S) // V, H, W),
        sd[p + ".proj3d.weight"],
        sd[p + ".proj3d.bias"],
        stride=stride,
    )
    surface = F.conv2d(x[:, :S], sd[p + ".proj2d.weight"], sd[p + ".proj2d.bias"], stride=stride[1:])
    y = torch.cat([upper, surface[:, :, None]], dim=2)
    return _layer_norm(y.permute(0, 2, 3, 4, 1), sd, p + ".norm").permute(0, 4, 1, 2, 3)


def _merging(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    x = x.permute(0, 2, 3, 4, 1)
    H, W = x.shape[2], x.shape[3]
    if H % 2 or W % 2:
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
    parts = [x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]]
    x = _linear(_layer_norm(torch.cat(parts, -1), sd, p + ".norm"), sd, p + ".reduction")
    return x.permute(0, 4, 1, 2, 3)


def _expanding(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    x = x.permute(0, 2, 3, 4, 1)
    B, D, H, W, C = x.shape
    if H % 2 or W % 2:
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        H, W = H + H % 2, W + W % 2
    x = _linear(_layer_norm(x, sd, p + ".norm"), sd, p + ".expansion")
    x = x.reshape(B, D, H, W, 2, 2, C // 2).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, D, 2 * H, 2 * W, C // 2)
    return x.permute(0, 4, 1, 2, 3)


def _stage(i: int, streams: list, sd: dict, cfg: OfficialConfig, prev: list | None = None) -> list:
    p = f"layer{i}"
    kernel = STAGE_KERNELS[i - 1]
    pad = tuple(k // 2 for k in kernel)
    sample = STAGE_SAMPLE[i - 1]
    if sample == "down":
        bg, ob, g = (_merging(s, sd, f"{p}.samplelayer.merge{j}") for j, s in enumerate(streams, 1))
        streams = [bg, ob, torch.sigmoid(g)]
    elif sample == "up":
        bg, ob, g = (_expanding(s, sd, f"{p}.samplelayer.expand{j}") for j, s in enumerate(streams, 1))
        streams = [bg, ob, torch.sigmoid(g)]
    bg, ob, g = streams
    if prev is not None:
        bg, ob, g = (torch.cat([a, b], 1) for a, b in zip(streams, prev))

    def conv(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.conv3d(t, sd[f"{p}.{name}.weight"], sd[f"{p}.{name}.bias"], padding=pad)

    bg = F.silu(conv(bg, "conv"))
    g = torch.sigmoid(conv(g, "gate"))
    ob = F.silu(conv(ob, "gateconv")) * g
    cl = lambda t: t.permute(0, 2, 3, 4, 1)
    bgc, obc, gc = cl(bg), cl(ob), cl(g)
    c = f"{p}.crosslayer"
    bg_mid = bgc * (1 - gc) + _swin_block(bgc * gc, sd, c + ".back1", cfg, False, obc)
    ob_mid = _swin_block(obc, sd, c + ".obser1", cfg, False, bgc)
    bg_new = bg_mid * (1 - gc) + _swin_block(bg_mid * gc, sd, c + ".back2", cfg, True, ob_mid)
    ob_new = _swin_block(ob_mid, sd, c + ".obser2", cfg, True, bg_mid)
    g_new = torch.sigmoid(F.conv3d(g, sd[c + ".gate.weight"], sd[c + ".gate.bias"]))
    cf = lambda t: t.permute(0, 4, 1, 2, 3)
    return [cf(bg_new) + streams[0], cf(ob_new) + streams[1], g_new + streams[2]]


def adas_reference_forward(
    state: dict[str, torch.Tensor],
    background: torch.Tensor,
    observation: torch.Tensor,
    mask: torch.Tensor,
    cfg: OfficialConfig,
) -> torch.Tensor:
    """The official Adas forward pass, evaluated from an official-layout state dict."""
    sd = state
    streams = [
        _embed(background, sd, "patchembed.patch1", cfg),
        _embed(observation, sd, "patchembed.patch2", cfg),
        torch.sigmoid(_embed(mask, sd, "patchembed.patch3", cfg)),
    ]
    streams = [s + sd["absolute_pos_embed"] for s in streams]
    s1 = _stage(1, streams, sd, cfg)
    s2 = _stage(2, s1, sd, cfg)
    x = _stage(3, s2, sd, cfg)
    x = _stage(4, x, sd, cfg, s2)
    x = _stage(5, x, sd, cfg, s1)
    x = F.conv3d(torch.cat(x, 1), sd["fusion.weight"], sd["fusion.bias"], padding=(1, 2, 3))
    x = x.permute(0, 2, 3, 4, 1)
    for i in range(cfg.depth):
        x = _swin_block(x, sd, f"decoder.blocks.{i}", cfg, shifted=bool(i % 2))
    x = x.permute(0, 4, 1, 2, 3)
    stride = cfg.patch
    surface = F.conv_transpose2d(
        x[:, :, -1], sd["patchunembed.proj2d.weight"], sd["patchunembed.proj2d.bias"], stride=stride[1:]
    )
    upper = F.conv_transpose3d(
        x[:, :, :-1], sd["patchunembed.proj3d.weight"], sd["patchunembed.proj3d.bias"], stride=stride
    )
    return torch.cat([surface, upper.flatten(1, 2)], 1)
