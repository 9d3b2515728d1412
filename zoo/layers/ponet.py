"""PoNet pooling token mixer.

PoNet: Pooling Network for Efficient Token Mixing in Long Sequences (Tan et al., ICLR 2022,
arXiv 2110.02442). Attention is replaced by three poolings of linear projections of the
hidden states ``X`` (``B, N, C``), mixed per head (``H`` heads of ``D = C / H`` channels):

- global aggregation: ``q = mean of dense_q(X)`` over the real (non-pad) tokens, per head;
  ``a = softmax(q . K^T / sqrt(D))`` over the real tokens with ``K = dense_k(X)``;
  ``g = sum_n a_n K_n`` (``K`` is also the value: there is no ``dense_v``);
- segment max-pooling: ``S_t = max of dense_segment(X)`` over the real tokens of the segment
  of token ``t`` (sentences, or equal chunks in the Long Range Arena setting);
- local max-pooling: ``L_t = max of dense_local(X)`` over the window ``t-1 .. t+1``
  (``MaxPool1d(3, stride=1, padding=1)``), real tokens only;
- fusion: ``O_t = (g + S_t) * dense_o(X)_t + L_t``; pads output zero.

With ``special_mask`` (the upstream ``clsgsepg`` option, True at [CLS]/[SEP]) the special
tokens take no part in local windows and get zero segment and local terms.

Upstream (github lxchtan/PoNet, ``models/modeling_ponet.py``) fills pads with ``-1e4`` before
the max-poolings; here pads and excluded tokens are left out exactly (``-inf``), which equals
upstream whenever the real values are above ``-1e4``. Segments are numbered per sequence;
``segment_ids_from_separators`` reproduces upstream's split at [CLS]/[SEP] (each special
token its own segment) and ``equal_segment_size`` the LRA chunking (``N // segment_num + 1``
tokens per chunk).

``ponet_mixing`` is the fast path: no Python loop over segments or tokens; the global
step runs as three small GEMMs; segment max is a reshape + ``amax`` for equal chunks or a
``scatter_reduce("amax")`` for arbitrary ids (pads go to a spare bucket); the local max is an
``unfold`` + ``amax``. Time and memory are linear in ``N``. ``ponet_mixing_reference`` is the
plain per-head computation with a dense ``N x N`` same-segment mask (small inputs only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PoNetMixer",
    "equal_segment_ids",
    "equal_segment_size",
    "ponet_mixing",
    "ponet_mixing_reference",
    "segment_ids_from_separators",
]

_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- segments


def segment_ids_from_separators(is_separator: Tensor) -> Tensor:
    """Segment index per token for sentences split at [CLS]/[SEP].

    Every separator token is a segment of its own; the tokens between two separators share
    one. Ids start at 0 and increase along the sequence (they may skip values). This is
    upstream's ``get_segment_index`` rule, made to start at 0 also when the first token is
    not a separator.

    Parameters
    ----------
    is_separator:
        ``(B, N)`` bool, True at [CLS]/[SEP] tokens.

    Returns
    -------
    ``(B, N)`` long tensor of segment ids.
    """
    if is_separator.dtype != torch.bool or is_separator.dim() != 2:
        raise ValueError(
            f"is_separator: expected a (B, N) bool tensor, got {tuple(is_separator.shape)} {is_separator.dtype}"
        )
    mark = is_separator.long()
    starts = mark.clone()
    starts[:, 1:] += mark[:, :-1]  # the token after a separator opens a segment too
    starts[:, 0] = 1
    return starts.cumsum(dim=1) - 1


def equal_segment_size(seq_len: int, num_segments: int) -> int:
    """Tokens per chunk in the LRA setting: ``seq_len // num_segments + 1`` (upstream's formula)."""
    if num_segments < 1:
        raise ValueError(f"num_segments: expected a positive int, got {num_segments}")
    return seq_len // num_segments + 1


def equal_segment_ids(seq_len: int, segment_size: int, device: torch.device | str | None = None) -> Tensor:
    """``(N,)`` segment ids of contiguous chunks of ``segment_size`` tokens."""
    if segment_size < 1:
        raise ValueError(f"segment_size: expected a positive int, got {segment_size}")
    return torch.arange(seq_len, device=device) // segment_size


# ----------------------------------------------------------------------------- checks


def _check_inputs(
    q: Tensor,
    k: Tensor,
    o: Tensor,
    local: Tensor,
    segment: Tensor,
    num_heads: int,
    padding_mask: Tensor | None,
    segment_ids: Tensor | None,
    segment_size: int | None,
    special_mask: Tensor | None,
    local_kernel: int,
    check_id_values: bool = True,
) -> None:
    """``ValueError`` for bad arguments. ``check_id_values=False`` leaves the range of
    ``segment_ids`` (a device-to-host copy) to the caller."""
    if q.dim() != 3 or not q.is_floating_point():
        raise ValueError(f"q: expected a (B, N, C) floating tensor, got {tuple(q.shape)} {q.dtype}")
    for name, t in (("k", k), ("o", o), ("local", local), ("segment", segment)):
        if t.shape != q.shape:
            raise ValueError(f"{name}: expected shape {tuple(q.shape)} like q, got {tuple(t.shape)}")
    B, N, C = q.shape
    if num_heads < 1 or C % num_heads:
        raise ValueError(f"num_heads: expected a divisor of the channel count {C}, got {num_heads}")
    if local_kernel < 1 or local_kernel % 2 == 0:
        raise ValueError(f"local_kernel: expected an odd positive int, got {local_kernel}")
    for name, m in (("padding_mask", padding_mask), ("special_mask", special_mask)):
        if m is None:
            continue
        if m.dtype != torch.bool:
            raise ValueError(
                f"{name}: expected a bool tensor (True = {_MASK_MEANING[name]}), got dtype {m.dtype}"
            )
        if tuple(m.shape) != (B, N):
            raise ValueError(f"{name}: expected shape {(B, N)}, got {tuple(m.shape)}")
    if segment_ids is not None and segment_size is not None:
        raise ValueError("segment_ids and segment_size: give at most one of them")
    if segment_size is not None and (not isinstance(segment_size, int) or segment_size < 1):
        raise ValueError(f"segment_size: expected a positive int, got {segment_size!r}")
    if segment_ids is not None:
        if segment_ids.dtype in (torch.bool,) or segment_ids.is_floating_point() or segment_ids.is_complex():
            raise ValueError(f"segment_ids: expected an integer tensor, got dtype {segment_ids.dtype}")
        if tuple(segment_ids.shape) not in ((B, N), (N,)):
            raise ValueError(
                f"segment_ids: expected shape {(B, N)} or {(N,)}, got {tuple(segment_ids.shape)}"
            )
        if check_id_values:
            _check_segment_id_values(segment_ids, N)


def _check_segment_id_values(segment_ids: Tensor | None, N: int) -> None:
    if segment_ids is not None and N and bool(((segment_ids < 0) | (segment_ids >= N)).any()):
        lo, hi = int(segment_ids.min()), int(segment_ids.max())
        raise ValueError(
            f"segment_ids: expected values in [0, {N - 1}] (at most one segment per token), got [{lo}, {hi}]"
        )


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 at least: half-precision logits are normalised in fp32."""
    return torch.promote_types(dtype, torch.float32)


_MASK_MEANING = {"padding_mask": "real token", "special_mask": "[CLS]/[SEP] token"}


# ----------------------------------------------------------------------------- reference


def ponet_mixing_reference(
    q: Tensor,
    k: Tensor,
    o: Tensor,
    local: Tensor,
    segment: Tensor,
    num_heads: int,
    padding_mask: Tensor | None = None,
    segment_ids: Tensor | None = None,
    segment_size: int | None = None,
    special_mask: Tensor | None = None,
    local_kernel: int = 3,
) -> Tensor:
    """Plain PoNet mixing, per head, with a dense ``(B, N, N)`` same-segment mask.

    Same arguments and result as ``ponet_mixing``; memory is ``O(B N^2 C)``: small inputs only.
    """
    _check_inputs(
        q,
        k,
        o,
        local,
        segment,
        num_heads,
        padding_mask,
        segment_ids,
        segment_size,
        special_mask,
        local_kernel,
    )
    B, N, C = q.shape
    H, D = num_heads, C // num_heads
    real = torch.ones(B, N, dtype=torch.bool, device=q.device) if padding_mask is None else padding_mask
    special = torch.zeros_like(real) if special_mask is None else special_mask

    def heads(t: Tensor) -> Tensor:  # (B, N, C) -> (B, H, N, D)
        return t.reshape(B, N, H, D).transpose(1, 2)

    Q, K, O = heads(q), heads(k), heads(o)
    m = real[:, None, :, None].to(q.dtype)
    q_mean = (Q * m).sum(2) / m.sum(2).clamp_min(1)  # (B, H, D)
    logits = torch.einsum("bhd,bhnd->bhn", q_mean, K) / math.sqrt(D)
    logits = logits.to(_softmax_dtype(q.dtype)).masked_fill(~real[:, None, :], _NEG_INF)
    attn = torch.softmax(logits, dim=-1).nan_to_num(0.0).to(q.dtype)  # all-pad rows: zeros
    g = torch.einsum("bhn,bhnd->bhd", attn, K)

    if segment_size is not None:
        segment_ids = equal_segment_ids(N, segment_size, q.device)
    if segment_ids is None:
        segment_ids = torch.zeros(N, dtype=torch.long, device=q.device)
    if segment_ids.dim() == 1:
        segment_ids = segment_ids.expand(B, N)
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & real[:, None, :]  # (B, N_t, N_s)
    seg = segment[:, None, :, :].masked_fill(~same[..., None], _NEG_INF).amax(2)  # (B, N, C)

    loc_in = local.masked_fill(~(real & ~special)[..., None], _NEG_INF)
    pool = nn.MaxPool1d(local_kernel, stride=1, padding=local_kernel // 2)
    loc = pool(loc_in.transpose(1, 2)).transpose(1, 2)

    keep = (real & ~special)[..., None]
    seg = torch.where(keep, seg, torch.zeros_like(seg))
    loc = torch.where(keep, loc, torch.zeros_like(loc))
    out = (g[:, :, None, :] + heads(seg)) * O + heads(loc)  # (B, H, N, D)
    out = out.transpose(1, 2).reshape(B, N, C)
    return out.masked_fill(~real[..., None], 0.0)


# ----------------------------------------------------------------------------- fast path


def _global_aggregation(q: Tensor, k: Tensor, real: Tensor | None, num_heads: int) -> Tensor:
    """``g`` of every head, flattened to ``(B, C)``; three skinny GEMMs, linear in N."""
    B, N, C = q.shape
    H, D = num_heads, C // num_heads
    if real is None:
        q_mean = q.mean(dim=1)
    else:
        w = real.to(q.dtype)
        count = w.sum(dim=1, keepdim=True).clamp_min(1)
        q_mean = torch.bmm(w[:, None, :], q)[:, 0] / count  # (B, C)
    # block-diagonal (C, H) matrix per batch: column h holds q_mean of head h in its rows
    eye = torch.eye(H, dtype=q.dtype, device=q.device)
    q_block = (q_mean.view(B, H, D, 1) * eye.view(1, H, 1, H)).reshape(B, C, H)
    logits = torch.bmm(k, q_block).to(_softmax_dtype(q.dtype)) * (D**-0.5)  # (B, N, H)
    if real is not None:
        # a row without any real token keeps its logits finite; its outputs are zeroed later
        visible = real | ~real.any(dim=1, keepdim=True)
        logits = logits.masked_fill(~visible[..., None], _NEG_INF)
    attn = torch.softmax(logits, dim=1).to(k.dtype)  # over tokens
    g_all = torch.bmm(attn.transpose(1, 2), k)  # (B, H, C): head h against every channel
    return g_all.view(B, H, H, D).diagonal(dim1=1, dim2=2).transpose(1, 2).reshape(B, C)


def _segment_max(
    segment: Tensor, real: Tensor | None, segment_ids: Tensor | None, segment_size: int | None
) -> Tensor:
    """Per-token max of ``segment`` over the real tokens of its segment, ``(B, N, C)``."""
    B, N, C = segment.shape
    if segment_ids is None and segment_size is None:
        segment_size = max(N, 1)
    x = segment if real is None else segment.masked_fill(~real[..., None], _NEG_INF)
    if segment_size is not None:
        full, rest = divmod(N, segment_size)
        parts = []
        if full:
            parts.append(x[:, : full * segment_size].view(B, full, segment_size, C).amax(dim=2))
        if rest:  # the last, shorter chunk: reduced apart instead of padding a copy of x
            parts.append(x[:, full * segment_size :].amax(dim=1, keepdim=True))
        chunk_max = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        num_chunks = chunk_max.shape[1]
        out = chunk_max[:, :, None, :].expand(B, num_chunks, segment_size, C).reshape(B, -1, C)
        return out[:, :N]
    ids = segment_ids.expand(B, N) if segment_ids.dim() == 1 else segment_ids
    ids = ids.long()
    if real is not None:
        ids = ids.masked_fill(~real, N)  # pads go to a spare bucket that no real token reads
    index = ids[..., None].expand(B, N, C)
    buckets = segment.new_full((B, N + 1, C), _NEG_INF)
    buckets = buckets.scatter_reduce(1, index, segment, reduce="amax", include_self=False)
    return buckets.gather(1, index)


def _local_max(local: Tensor, excluded: Tensor | None, kernel: int) -> Tensor:
    """Max over the window ``t - kernel//2 .. t + kernel//2`` of the tokens not excluded."""
    x = local if excluded is None else local.masked_fill(excluded[..., None], _NEG_INF)
    if kernel == 1:
        return x
    half = kernel // 2
    x = F.pad(x, (0, 0, half, half), value=_NEG_INF)
    return x.unfold(1, kernel, 1).amax(dim=-1)


def ponet_mixing(
    q: Tensor,
    k: Tensor,
    o: Tensor,
    local: Tensor,
    segment: Tensor,
    num_heads: int,
    padding_mask: Tensor | None = None,
    segment_ids: Tensor | None = None,
    segment_size: int | None = None,
    special_mask: Tensor | None = None,
    local_kernel: int = 3,
    backend: str = "auto",
) -> Tensor:
    """PoNet's mixing step on projected hidden states, linear in ``N``.

    Parameters
    ----------
    q, k, o, local, segment:
        ``(B, N, C)`` outputs of ``dense_q``, ``dense_k``, ``dense_o``, ``dense_local`` and
        ``dense_segment``.
    num_heads:
        ``H``; ``C`` must be a multiple of it.
    padding_mask:
        ``(B, N)`` bool, True = real token. ``None``: all real.
    segment_ids:
        ``(B, N)`` or ``(N,)`` integer ids in ``[0, N)``; tokens with the same id form one
        segment (they need not be contiguous).
    segment_size:
        Instead of ids: contiguous chunks of this many tokens (LRA). Neither: one segment.
    special_mask:
        ``(B, N)`` bool, True at [CLS]/[SEP] (upstream ``clsgsepg``): these tokens are left
        out of local windows and get zero segment and local terms.
    local_kernel:
        Odd window length of the local max-pooling (3 in PoNet).
    backend:
        ``"auto"``: the Triton kernels (``zoo.kernels.ponet_pool``) for CUDA tensors they
        cover, this module's PyTorch ops otherwise (CPU tensors, float64, segment ids that
        are not contiguous runs); ``"triton"``: the kernels or a ``ValueError`` (they run on
        the CPU under ``TRITON_INTERPRET=1``); ``"torch"``: the PyTorch ops. The kernels give
        the gradient of a max to its first maximal token; the PyTorch ops split it among ties.

    Returns
    -------
    ``(B, N, C)``; zero at pads.
    """
    _check_inputs(
        q,
        k,
        o,
        local,
        segment,
        num_heads,
        padding_mask,
        segment_ids,
        segment_size,
        special_mask,
        local_kernel,
        check_id_values=False,  # with the contiguity test below when the kernels run
    )
    mixing_args = (num_heads, padding_mask, segment_ids, segment_size, special_mask, local_kernel)
    ranks = _triton_segment_ranks(backend, q, (k, o, local, segment), segment_ids)
    if ranks is not None:
        from zoo.kernels.ponet_pool import ponet_pool_mixing

        return ponet_pool_mixing(
            q, k, o, local, segment, *mixing_args, segment_ranks=ranks if segment_ids is not None else None
        )
    _check_segment_id_values(segment_ids, q.shape[1])
    return _ponet_mixing_torch(q, k, o, local, segment, *mixing_args)


_BACKENDS = ("auto", "triton", "torch")


def _triton_segment_ranks(
    backend: str, q: Tensor, others: tuple[Tensor, ...], segment_ids: Tensor | None
) -> tuple[Tensor, int] | tuple[()] | None:
    """``None``: run PyTorch. Else the Triton kernels run, with these segment run numbers
    (``()`` without ``segment_ids``, whose range is checked here, in the one device-to-host
    copy of the contiguity test). ``backend="triton"`` that cannot run raises ``ValueError``."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and not q.is_cuda):
        return None
    from zoo.kernels.ponet_pool import contiguous_segment_ranks, ponet_pool_supports

    reason, ranks = ponet_pool_supports(q), ()
    if reason is None and any(t.dtype != q.dtype or t.device != q.device for t in others):
        reason = "the kernels need q, k, o, local and segment of one dtype and device"
    if reason is None and segment_ids is not None:
        ranks = contiguous_segment_ranks(segment_ids.to(q.device), q.shape[0], check_range=True)
        if ranks is None:
            reason = "the kernels need every segment to be one contiguous run of tokens"
    if reason is not None:
        if backend == "triton":
            raise ValueError(f"backend: 'triton' cannot run here: {reason}")
        return None
    return ranks


def _ponet_mixing_torch(
    q: Tensor,
    k: Tensor,
    o: Tensor,
    local: Tensor,
    segment: Tensor,
    num_heads: int,
    padding_mask: Tensor | None,
    segment_ids: Tensor | None,
    segment_size: int | None,
    special_mask: Tensor | None,
    local_kernel: int,
) -> Tensor:
    real = padding_mask
    g = _global_aggregation(q, k, real, num_heads)
    seg = _segment_max(segment, real, segment_ids, segment_size)
    if real is None and special_mask is None:
        drop = None
    elif special_mask is None:
        drop = ~real
    else:
        drop = special_mask if real is None else (special_mask | ~real)
    loc = _local_max(local, drop, local_kernel)
    if drop is not None:
        seg = seg.masked_fill(drop[..., None], 0.0)
        loc = loc.masked_fill(drop[..., None], 0.0)
    out = torch.addcmul(loc, g[:, None, :] + seg, o)  # (g + S) * O + L
    if real is not None:
        out = out.masked_fill(~real[..., None], 0.0)
    return out


# ----------------------------------------------------------------------------- module


class PoNetMixer(nn.Module):
    """PoNet token mixer: projections ``dense_{q,k,o,segment,local}`` and the pooling fusion.

    The parameter names are those of the Hugging Face PoNet checkpoints
    (``...attention.self.dense_q`` ...). The output has no output projection (the encoder
    layer's ``attention.output.dense`` follows it, as in BERT).

    Parameters
    ----------
    dim:
        Channels ``C`` of the input and output.
    num_heads:
        Heads ``H`` of the global aggregation and the fusion; ``dim % num_heads == 0``.
    local_kernel:
        Odd window of the local max-pooling (3).
    bias:
        Biases in the projections.
    """

    def __init__(self, dim: int, num_heads: int, local_kernel: int = 3, bias: bool = True) -> None:
        super().__init__()
        if dim < 1 or num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim {dim} should be divisible by num_heads {num_heads} (both positive)")
        if local_kernel < 1 or local_kernel % 2 == 0:
            raise ValueError(f"local_kernel: expected an odd positive int, got {local_kernel}")
        self.dim = dim
        self.num_heads = num_heads
        self.local_kernel = local_kernel
        self.fused = True  # False: the plain reference path (dense N x N segment mask)
        self.backend = "auto"  # of the fused path: "auto" | "triton" | "torch" (see ponet_mixing)
        self.dense_q = nn.Linear(dim, dim, bias=bias)
        self.dense_k = nn.Linear(dim, dim, bias=bias)
        self.dense_o = nn.Linear(dim, dim, bias=bias)
        self.dense_local = nn.Linear(dim, dim, bias=bias)
        self.dense_segment = nn.Linear(dim, dim, bias=bias)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, local_kernel={self.local_kernel}, "
            f"fused={self.fused}, backend={self.backend}"
        )

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
        *,
        segment_size: int | None = None,
        special_mask: Tensor | None = None,
    ) -> Tensor:
        """Mix ``x`` (``B, N, C``); see ``ponet_mixing`` for the arguments. Returns ``(B, N, C)``."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected shape (B, N, {self.dim}), got {tuple(x.shape)}")
        projected = self.project(x)
        q, k, o, local, segment = projected.split(self.dim, dim=-1)
        args = (self.num_heads, padding_mask, segment_ids, segment_size, special_mask, self.local_kernel)
        if not self.fused:
            return ponet_mixing_reference(q, k, o, local, segment, *args)
        _check_inputs(q, k, o, local, segment, *args, check_id_values=False)
        ranks = _triton_segment_ranks(self.backend, q, (), segment_ids)
        if ranks is None:
            _check_segment_id_values(segment_ids, x.shape[1])
            return _ponet_mixing_torch(q, k, o, local, segment, *args)
        from zoo.kernels.ponet_pool import ponet_pool_mixing_packed

        return ponet_pool_mixing_packed(
            projected, *args, segment_ranks=ranks if segment_ids is not None else None
        )

    def project(self, x: Tensor) -> Tensor:
        """``cat([dense_q(x), dense_k(x), dense_o(x), dense_local(x), dense_segment(x)], -1)``, one GEMM.

        The five weights (``5 C x C``, small next to the activations) are concatenated at
        each call, so the parameters and their gradients stay those of the five layers.
        """
        layers = (self.dense_q, self.dense_k, self.dense_o, self.dense_local, self.dense_segment)
        weight = torch.cat([layer.weight for layer in layers])
        biases = [layer.bias for layer in layers]
        bias = None if any(b is None for b in biases) else torch.cat(biases)
        return F.linear(x, weight, bias)
