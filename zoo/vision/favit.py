"""FaViT: Factorization Vision Transformer, as timm models.

Paper: "Factorization Vision Transformer: Modeling Long Range Dependency with Local Window
Cost", Haolin Qin, Daquan Zhou, Tingfa Xu, Ziyang Bian, Jianan Li, arXiv 2312.08614.
Official code: github q2479036243/FaViT (``FaViT/classification/favit.py``).

A four-stage pyramid like PVTv2: an overlapping patch embedding per stage (7x7 stride 4, then
3x3 stride 2; LayerNorm eps 1e-5), pre-norm blocks (LayerNorm eps 1e-6) of factorization
self-attention (``zoo.layers.fasa``) and a Mix-FFN (fc1, depthwise 3x3, GELU, fc2), a norm
after every stage, a mean-pooled linear head and no positional embedding. Heads (1, 2, 4, 8),
MLP ratios (8, 6, 4, 4), spatial-reduction ratios (8, 4, 2, 1), window 7.

What differs from the official code: timm >= 1.0 model API (``pretrained_cfg``,
``forward_features`` / ``forward_head``, ``forward_intermediates`` and ``features_only``,
``reset_classifier``, gradient checkpointing), inputs of any size from 32 px and any aspect
ratio, channels-last tokens throughout, a fast FaSA path, and timm-style module names;
``checkpoint_filter_fn`` maps official checkpoints onto them.
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Callable, Optional, Sequence, Union

import torch
import torch.utils.checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from zoo.kernels.dwconv_gelu import dwconv3x3_gelu, dwconv3x3_gelu_supports
from zoo.layers.fasa import FactorizationSelfAttention
from zoo.layers.linear import Linear
from zoo.layers.norm import LayerNormAutocast

try:  # timm >= 1.0.4
    from timm.models import feature_take_indices
except ImportError:  # pragma: no cover - older timm
    from timm.models._features import feature_take_indices

__all__ = ["FaViT", "checkpoint_filter_fn", "MIN_INPUT_SIZE"]

# official training checkpoints pickle their argparse.Namespace next to the weights; allow that one
# harmless type so the weights-only loader of older timm versions reads them too
# (pretrained_cfg_overlay=dict(file=...)); recent timm allows it itself
torch.serialization.add_safe_globals([argparse.Namespace])

PAPER = (
    "Factorization Vision Transformer: Modeling Long Range Dependency with Local Window Cost",
    "2312.08614",
)
MIN_INPUT_SIZE = 32  # smallest image side: the first stage's 8x8 reduction needs an 8x8 grid


class MlpWithDepthwiseConv(nn.Module):
    """Mix-FFN: fc1, depthwise 3x3 convolution on the token grid, GELU, fc2.

    On CUDA (eager) the convolution, its bias and an exact GELU run as one Triton kernel
    (``zoo.kernels.dwconv_gelu``); under ``torch.compile`` the compiler fuses them itself.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        drop: float = 0.0,
    ):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.dwconv = nn.Conv2d(hidden_features, hidden_features, 3, padding=1, groups=hidden_features)
        self.act = act_layer()
        self._fused_gelu = isinstance(self.act, nn.GELU) and self.act.approximate == "none"
        self.fc2 = Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, feat_size: Sequence[int]) -> torch.Tensor:
        x = self.fc1(x)
        B, N, C = x.shape
        grid = x.view(B, feat_size[0], feat_size[1], C)
        if self._fused_gelu and dwconv3x3_gelu_supports(x) and not torch.compiler.is_compiling():
            x = dwconv3x3_gelu(grid, self.dwconv.weight, self.dwconv.bias).view(B, N, C)
        else:
            # channels-last view of the token grid: no copy, and cuDNN runs the convolution in NHWC
            x = self.dwconv(grid.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(B, N, C)
            x = self.act(x)
        x = self.drop(x)
        return self.drop(self.fc2(x))


class Block(nn.Module):
    """Pre-norm block: ``x + FaSA(norm1(x))``, then ``x + MixFFN(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        sr_ratio: int = 1,
        window_size: int = 7,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = FactorizationSelfAttention(
            dim,
            num_heads=num_heads,
            sr_ratio=sr_ratio,
            window_size=window_size,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = MlpWithDepthwiseConv(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, feat_size: Sequence[int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), feat_size))
        x = x + self.drop_path2(self.mlp(self.norm2(x), feat_size))
        return x


class OverlapPatchEmbed(nn.Module):
    """Strided convolution with ``kernel > stride`` (overlapping patches), then LayerNorm; NCHW in, NHWC out."""

    def __init__(self, patch_size: int = 7, stride: int = 4, in_chans: int = 3, embed_dim: int = 64):
        super().__init__()
        if patch_size <= stride:
            raise ValueError(f"patch_size: expected more than stride {stride}, got {patch_size}")
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = LayerNormAutocast(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class FaViTStage(nn.Module):
    """Optional 3x3 stride-2 patch embedding, ``depth`` blocks and a norm; NHWC in, NCHW (channels-last) out."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        depth: int,
        downsample: bool = True,
        num_heads: int = 1,
        sr_ratio: int = 1,
        mlp_ratio: float = 4.0,
        window_size: int = 7,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Union[Sequence[float], float] = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.grad_checkpointing = False
        if downsample:
            self.downsample = OverlapPatchEmbed(patch_size=3, stride=2, in_chans=dim, embed_dim=dim_out)
        else:
            if dim != dim_out:
                raise ValueError(f"dim_out: expected {dim} for a stage without downsampling, got {dim_out}")
            self.downsample = None
        self.blocks = nn.ModuleList(
            Block(
                dim=dim_out,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                sr_ratio=sr_ratio,
                window_size=window_size,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop,
                attn_drop=attn_drop,
                drop_path=drop_path[i] if isinstance(drop_path, (list, tuple)) else drop_path,
                norm_layer=norm_layer,
            )
            for i in range(depth)
        )
        self.norm = norm_layer(dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)  # NCHW -> NHWC
        B, H, W, C = x.shape
        feat_size = (H, W)
        x = x.reshape(B, H * W, C)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, feat_size, use_reentrant=False)
            else:
                x = blk(x, feat_size)
        x = self.norm(x)
        return x.reshape(B, H, W, C).permute(0, 3, 1, 2)  # NCHW view of NHWC memory


class FaViT(nn.Module):
    """Factorization Vision Transformer (four stages of FaSA blocks)."""

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: Sequence[int] = (2, 2, 6, 2),
        embed_dims: Sequence[int] = (32, 64, 128, 256),
        num_heads: Sequence[int] = (1, 2, 4, 8),
        mlp_ratios: Sequence[float] = (8.0, 6.0, 4.0, 4.0),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        window_size: int = 7,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
    ):
        super().__init__()
        num_stages = len(depths)
        for name, value in (
            ("embed_dims", embed_dims),
            ("num_heads", num_heads),
            ("mlp_ratios", mlp_ratios),
            ("sr_ratios", sr_ratios),
        ):
            if len(value) != num_stages:
                raise ValueError(f"{name}: expected {num_stages} values (one per stage), got {tuple(value)}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool: expected 'avg' or '', got {global_pool!r}")
        norm_layer = norm_layer or (lambda d: LayerNormAutocast(d, eps=1e-6))
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.depths = tuple(depths)
        self.embed_dims = tuple(embed_dims)
        self.min_input_size = max(MIN_INPUT_SIZE, 4 * sr_ratios[0])
        self.feature_info = []

        self.patch_embed = OverlapPatchEmbed(
            patch_size=7, stride=4, in_chans=in_chans, embed_dim=embed_dims[0]
        )
        # stochastic depth grows linearly over all blocks of all stages, as in the official code
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages = []
        prev_dim, start = embed_dims[0], 0
        for i in range(num_stages):
            stages.append(
                FaViTStage(
                    dim=prev_dim,
                    dim_out=embed_dims[i],
                    depth=depths[i],
                    downsample=i > 0,
                    num_heads=num_heads[i],
                    sr_ratio=sr_ratios[i],
                    mlp_ratio=mlp_ratios[i],
                    window_size=window_size,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=rates[start : start + depths[i]],
                    norm_layer=norm_layer,
                )
            )
            prev_dim, start = embed_dims[i], start + depths[i]
            self.feature_info.append(dict(num_chs=prev_dim, reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        if self.patch_embed.proj.weight.device.type != "meta":  # nothing to draw for shape-only models
            self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool: expected 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        ref = next(self.parameters())
        self.head = (
            nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
        )

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"x: expected images (B, {self.in_chans}, H, W), got shape {tuple(x.shape)}")
        if x.shape[-2] < self.min_input_size or x.shape[-1] < self.min_input_size:
            raise ValueError(
                f"x: expected height and width of at least {self.min_input_size} px, got "
                f"{x.shape[-2]} x {x.shape[-1]}"
            )

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[list[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
        """Features of the stages named by ``indices`` (NCHW, each stage already normed).

        ``indices``: the last n stages if an int, all if None, else the stage indices.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt: expected 'NCHW' or 'NHWC', got {output_fmt!r}")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[: max_index + 1]
        intermediates = []
        x = self.patch_embed(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x if output_fmt == "NCHW" else x.permute(0, 2, 3, 1))
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, list[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last one ``indices`` needs (and the head)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if max_index < len(self.feature_info) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            prune_head = True
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last stage's normed features, ``(B, C, H / 32, W / 32)``."""
        self._check_input(x)
        return self.stages(self.patch_embed(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(-2, -1))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# official module names -> ours (inside each block's attention)
_OFFICIAL_ATTN_NAMES = {
    "kv_g.": "global_kv.",
    "sr.": "global_reduce.",
    "norm.": "global_norm.",
    "local_conv_g.": "global_v_conv.",
    "kv_l.depth_conv.": "window_dwconv.",
    "kv_l.point_conv.": "window_pwconv.",
    "fcs.": "window_fc.",
    "single_heads.": "window_kv.",
    "local_convs.": "window_v_conv.",
}


def _official_key_to_ours(key: str) -> str:
    m = re.match(r"^patch_embed(\d+)\.(.*)$", key)
    if m:
        stage = int(m.group(1)) - 1
        return f"patch_embed.{m.group(2)}" if stage == 0 else f"stages.{stage}.downsample.{m.group(2)}"
    m = re.match(r"^norm(\d+)\.(.*)$", key)
    if m:
        return f"stages.{int(m.group(1)) - 1}.norm.{m.group(2)}"
    m = re.match(r"^block(\d+)\.(\d+)\.(.*)$", key)
    if m:
        rest = m.group(3)
        if rest.startswith("attn."):
            inner = rest[len("attn.") :]
            for old, new in _OFFICIAL_ATTN_NAMES.items():
                if inner.startswith(old):
                    inner = new + inner[len(old) :]
                    break
            rest = "attn." + inner
        elif rest.startswith("mlp.dwconv.dwconv."):
            rest = "mlp.dwconv." + rest[len("mlp.dwconv.dwconv.") :]
        return f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.{rest}"
    return key


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an official FaViT state dict (``block1.0.attn.kv_l.depth_conv.weight``, ...) onto ours.

    A state dict already in our layout passes through unchanged.
    """
    if "patch_embed.proj.weight" in state_dict or not any(
        k.startswith(("patch_embed1.", "block1.")) for k in state_dict
    ):
        return dict(state_dict)
    return {_official_key_to_ours(k): v for k, v in state_dict.items()}


def _create_favit(variant: str, pretrained: bool = False, **kwargs) -> FaViT:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        FaViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(url: str = "", **kwargs) -> dict:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "min_input_size": (3, MIN_INPUT_SIZE, MIN_INPUT_SIZE),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "fixed_input_size": False,
        "paper_ids": f"arXiv:{PAPER[1]}",
        "paper_name": PAPER[0],
        **kwargs,
    }


def _shipped_cfgs() -> dict[str, dict]:
    """timm configs of the shipped weights (``favit_b0.fashion_mnist``, ...), read from their cards."""
    from zoo.registry import weights_dir
    from zoo.vision import shipped_weights

    cfgs = {}
    for card in shipped_weights():
        data = dict(card.get("data_config", {}))
        data["input_size"] = tuple(data.get("input_size", (3, 224, 224)))
        for key in ("mean", "std"):
            if key in data:
                data[key] = tuple(data[key])
        cfgs[f"{card['arch']}.{card['tag']}"] = _cfg(
            file=str(weights_dir() / card["file"]),
            num_classes=card.get("config", {}).get("num_classes", 1000),
            license="apache-2.0",
            **data,
        )
    return cfgs


# the untagged (architecture-only) config comes first: it stays the default of each name
default_cfgs = generate_default_cfgs(
    {
        "favit_b0": _cfg(),
        "favit_b1": _cfg(),
        "favit_b2": _cfg(),
        "favit_b3": _cfg(),
        **_shipped_cfgs(),
    }
)

# the variants, as data: (embed dims, depths); heads, MLP ratios and sr ratios are shared
VARIANTS = {
    "favit_b0": dict(embed_dims=(32, 64, 128, 256), depths=(2, 2, 6, 2)),
    "favit_b1": dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 6, 2)),
    "favit_b2": dict(embed_dims=(64, 128, 256, 512), depths=(2, 3, 18, 3)),
    "favit_b3": dict(embed_dims=(96, 192, 384, 768), depths=(2, 3, 14, 3)),
}


@register_model
def favit_b0(pretrained: bool = False, **kwargs) -> FaViT:
    model_args = dict(VARIANTS["favit_b0"])
    return _create_favit("favit_b0", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def favit_b1(pretrained: bool = False, **kwargs) -> FaViT:
    model_args = dict(VARIANTS["favit_b1"])
    return _create_favit("favit_b1", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def favit_b2(pretrained: bool = False, **kwargs) -> FaViT:
    model_args = dict(VARIANTS["favit_b2"])
    return _create_favit("favit_b2", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def favit_b3(pretrained: bool = False, **kwargs) -> FaViT:
    model_args = dict(VARIANTS["favit_b3"])
    return _create_favit("favit_b3", pretrained=pretrained, **dict(model_args, **kwargs))
