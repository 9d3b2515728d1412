"""LayerNorm that keeps autocast's dtype and runs row-blocked Triton kernels on CUDA.

"Layer Normalization" (Ba, Kiros, Hinton, arXiv 1607.06450): each token's ``C`` features are
normalised to zero mean and unit (biased) variance, then scaled and shifted per feature.
The layer itself is ``nn.LayerNorm`` (same parameters and keys); only where and in which dtype
it computes differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.kernels.layer_norm import layer_norm, layer_norm_supports

__all__ = ["LayerNormAutocast"]


class LayerNormAutocast(nn.LayerNorm):
    """LayerNorm that keeps autocast's dtype: under autocast it normalises in that dtype.

    Autocast runs ``layer_norm`` in fp32, so every norm and residual add of a pre-norm network
    moves fp32 tensors and each following layer casts them back. Here the input is cast to the
    autocast dtype (statistics still accumulate in fp32) and the output keeps it, so the
    residual stream stays in that dtype too (what timm calls fast norm). On CUDA (eager) the
    norm runs as Triton kernels that normalise many rows per program (``zoo.kernels.layer_norm``):
    the rows of vision and weather grids are short (32-768 channels) and numerous. Outside
    autocast and on the CPU the result is ``nn.LayerNorm``'s.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        if autocast:
            x = x.to(torch.get_autocast_dtype(device_type))
        if self.elementwise_affine and self.bias is not None and layer_norm_supports(x):
            if not torch.compiler.is_compiling():
                return layer_norm(x, self.weight, self.bias, self.eps)
        if not autocast:
            return super().forward(x)
        weight = self.weight.to(x.dtype) if self.weight is not None else None
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
