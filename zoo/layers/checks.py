"""Input checks shared by the attention layers of ``zoo.layers``.

``check_qkv`` validates the (B, H, N, D) query/key/value tensors of self-attention with grouped
key/value heads (H a multiple of Hkv) and raises one ValueError naming the function, the
argument, what was expected and what came.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["check_qkv"]


def check_qkv(q: Tensor, k: Tensor, v: Tensor, fn: str) -> tuple[int, int, int]:
    """Return (H, Hkv, N) after checking the shapes; raise one ValueError naming the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be (B, H, N, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{fn}: {name} must be floating point, got {t.dtype}")
    B, H, N, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"{fn}: batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[-1] != D:
        raise ValueError(f"{fn}: k head dim must equal q's ({D}), got {k.shape[-1]}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"{fn}: k and v must agree in (B, Hkv, N), got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.shape[2] != N:
        raise ValueError(f"{fn}: self-attention needs k and q of equal length, got N={N} and {k.shape[2]}")
    Hkv = k.shape[1]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"{fn}: q heads ({H}) must be a multiple of k/v heads ({Hkv})")
    if N == 0:
        raise ValueError(f"{fn}: q must have at least one position, got N=0")
    return H, Hkv, N
