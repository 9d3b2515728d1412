"""Sparse prefill for Hugging Face causal LMs through transformers' attention-function registry.

``sparse_prefill(model, method="xattention", **cfg)`` registers one attention function (and the
SDPA mask builder under the same name) with ``transformers.AttentionInterface`` /
``AttentionMaskInterface`` and switches the model to it with ``set_attn_implementation``; no
modeling file is copied or edited. Every attention layer of the model (Llama, Qwen2, Mistral and
other models written against ``ALL_ATTENTION_FUNCTIONS``) then calls that function, which

- runs the sparse method (:class:`~zoo.layers.XAttention`, :class:`~zoo.layers.PBSAttention`,
  :class:`~zoo.layers.MInference`) on prefill calls: more than ``min_prefill`` new queries,
  causal, no sliding window; grouped-query attention is passed through unrepeated;
- falls back to transformers' SDPA attention for decoding (one new token), short prompts and
  anything else, so generation keeps its dense cache semantics;
- recomputes the last ``dense_last_rows`` query rows of each sparse call (1 by default) with
  dense attention: the prompt's last position produces the first generated token, so it is
  treated like a decoding step (``O(N)`` per head; the published block selection is
  unchanged). Block selection averages over a whole query block, and the few question tokens
  at the end of a prompt that look far back are outvoted by the block's other queries: on our
  needle test the first answer digit was then wrong while every later digit (dense decoding)
  was right;
- handles batch > 1 with padding: a padded row runs the method on its own valid span of keys
  (left or right padding, as the 4-d SDPA mask says), pad query rows get zeros.

``unpatch(model)`` (or ``handle.unpatch()``) restores the previous implementation; the handle is
also a context manager::

    with zoo.llm.sparse_prefill(model, method="pbs", threshold=0.9):
        model.generate(...)

A ``recorder(layer_idx, q, k, v, mask, out, causal, scale)`` callable receives every sparse call
(the accuracy harness uses it for per-layer, per-head statistics).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = [
    "ATTENTION_NAME",
    "METHODS",
    "SparsePrefillPatch",
    "build_method",
    "capture_attention_inputs",
    "sparse_prefill",
    "unpatch",
]

ATTENTION_NAME = "zoo_sparse_prefill"
METHODS = ("xattention", "pbs", "minference", "dense")
_REGISTERED = False


def build_method(method: str, **cfg: Any) -> nn.Module | None:
    """The sparse layer for ``method`` (``"dense"`` gives None: the layer stays dense)."""
    if method == "xattention":
        from zoo.layers import XAttention

        return XAttention(**cfg)
    if method == "pbs":
        from zoo.layers import PBSAttention

        return PBSAttention(**cfg)
    if method == "minference":
        from zoo.layers import MInference

        return MInference(**cfg)
    if method == "dense":
        if cfg:
            raise ValueError(f"dense: takes no configuration, got {sorted(cfg)}")
        return None
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


@dataclass
class _LayerState:
    layer_idx: int
    method: nn.Module | None
    min_prefill: int
    dense_last_rows: int = 1
    recorder: Callable | None = None
    capture: Callable | None = None


@dataclass
class SparsePrefillPatch:
    """What :func:`sparse_prefill` changed; ``unpatch()`` undoes it (also on leaving a ``with``)."""

    model: nn.Module
    method: str
    layers: dict[int, nn.Module | None]
    previous_implementation: str
    modules: list[nn.Module] = field(default_factory=list)
    active: bool = True

    def unpatch(self) -> None:
        if not self.active:
            return
        for module in self.modules:
            if hasattr(module, "_zoo_sparse_prefill"):
                del module._zoo_sparse_prefill
        _set_implementation(self.model, self.previous_implementation)
        if getattr(self.model, "_zoo_sparse_patch", None) is self:
            del self.model._zoo_sparse_patch
        self.active = False

    def set_recorder(self, recorder: Callable | None) -> None:
        """Install (or remove with None) the per-call recorder on every patched layer."""
        for module in self.modules:
            module._zoo_sparse_prefill.recorder = recorder

    def __enter__(self) -> SparsePrefillPatch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unpatch()


def attention_modules(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """``(layer_idx, module)`` for the attention layers of a transformers decoder."""
    found = []
    for module in model.modules():
        if (
            hasattr(module, "layer_idx")
            and hasattr(module, "head_dim")
            and any(hasattr(module, name) for name in ("q_proj", "qkv_proj", "query_key_value"))
        ):
            found.append((int(module.layer_idx), module))
    if not found:
        raise ValueError(
            f"model: found no attention layers with a layer_idx in {type(model).__name__}; expected a "
            "transformers causal LM (Llama, Qwen2, Mistral, ...)"
        )
    return sorted(found, key=lambda item: item[0])


def _set_implementation(model: nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older transformers: the config attribute is read at every forward
        model.config._attn_implementation = name


def _dense(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def _valid_spans(attention_mask: Tensor | None, n: int, m: int, causal: bool) -> list[tuple[int, int]] | None:
    """Per batch row ``(start, stop)`` of the valid keys when the 4-d mask is causal + padding.

    None when there is no padding; raises ``LookupError`` when the mask is anything else (packed
    sequences, custom masks), which sends the call to the dense path.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4:
        raise LookupError("not a 4-d mask")
    keep = (
        attention_mask
        if attention_mask.dtype == torch.bool
        else attention_mask > torch.finfo(attention_mask.dtype).min / 2
    )
    keep = keep[:, 0] if keep.shape[1] == 1 else keep.all(dim=1)
    keep = keep.expand(keep.shape[0], n, m)
    query_pos = (m - n) + torch.arange(n, device=keep.device)
    key_pos = torch.arange(m, device=keep.device)
    spans = []
    for row in keep:
        valid_keys = row.any(dim=0)
        idx = valid_keys.nonzero().flatten()
        if idx.numel() == 0:
            spans.append((0, 0))
            continue
        start, stop = int(idx[0]), int(idx[-1]) + 1
        expected = (key_pos[None, :] >= start) & (key_pos[None, :] < stop)
        if causal:
            expected = expected & (key_pos[None, :] <= query_pos[:, None])
        rows = (query_pos >= start) & (query_pos < stop)
        if int(valid_keys.sum()) != stop - start or not torch.equal(row[rows], expected[rows]):
            raise LookupError("mask is not causal + contiguous padding")
        spans.append((start, stop))
    if all(span == (0, m) for span in spans):
        return None
    return spans


def _sparse_call(
    state: _LayerState, query: Tensor, key: Tensor, value: Tensor, causal: bool, scale: float | None
):
    from zoo.kernels import block_sparse_attention

    method = state.method
    mask = method.estimate(query, key, causal=causal)
    out = block_sparse_attention(query, key, value, mask, causal=causal, scale=scale, backend=method.backend)
    rows = min(state.dense_last_rows, query.shape[2])
    if rows > 0:
        dense = _dense_rows(query[:, :, -rows:], key, value, causal, scale)
        out = torch.cat([out[:, :, : out.shape[2] - rows], dense], dim=2)
    if state.recorder is not None:
        state.recorder(state.layer_idx, query, key, value, mask, out, causal, scale)
    return out


def _dense_rows(query: Tensor, key: Tensor, value: Tensor, causal: bool, scale: float | None) -> Tensor:
    """Exact attention of the last ``r`` query rows over all keys (causal: aligned to the last key)."""
    r, m = query.shape[2], key.shape[2]
    allowed = None
    if causal and r > 1:
        allowed = (
            torch.arange(m, device=query.device)[None, :]
            <= (m - r) + torch.arange(r, device=query.device)[:, None]
        )
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=allowed, scale=scale, enable_gqa=key.shape[1] != query.shape[1]
    ).to(query.dtype)


def sparse_prefill_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The attention function registered as ``"zoo_sparse_prefill"`` (transformers' signature)."""
    state: _LayerState | None = getattr(module, "_zoo_sparse_prefill", None)
    n, m = query.shape[2], key.shape[2]
    if state is not None and state.capture is not None:
        state.capture(state.layer_idx, query, key, value, scaling)
    causal = bool(getattr(module, "is_causal", True))
    if (
        state is None
        or state.method is None
        or n < max(state.min_prefill, 2)
        or (dropout and module.training)
        or kwargs.get("sliding_window") is not None
        or kwargs.get("output_attentions", False)
        or n > m
    ):
        return _dense(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    try:
        spans = _valid_spans(attention_mask, n, m, causal)
    except LookupError:
        return _dense(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if spans is None:
        out = _sparse_call(state, query, key, value, causal, scaling)
    else:
        out = torch.zeros_like(query)
        for b, (start, stop) in enumerate(spans):
            q_start = max(start, m - n) - (m - n)
            q_stop = stop - (m - n)
            if q_stop <= q_start:
                continue
            sub = _sparse_call(
                state,
                query[b : b + 1, :, q_start:q_stop],
                key[b : b + 1, :, start:stop],
                value[b : b + 1, :, start:stop],
                causal,
                scaling,
            )
            out[b : b + 1, :, q_start:q_stop] = sub
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, sparse_prefill_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    _REGISTERED = True


def _per_layer_methods(
    method: str, num_layers: int, layer_ids: list[int], cfg: dict[str, Any], config_path: str | Path | None
) -> dict[int, nn.Module | None]:
    if config_path is not None and method == "xattention":
        return _xattention_from_config(num_layers, layer_ids, cfg, config_path)
    if config_path is not None:
        if method != "minference":
            raise ValueError(
                f"config_path: only method='minference' (pattern config) and 'xattention' (threshold "
                f"config) read a config, got method={method!r}"
            )
        from zoo.llm.pattern_search import load_pattern_config

        pattern_cfg = load_pattern_config(config_path)
        layers_cfg = pattern_cfg["layers"]
        if len(layers_cfg) != num_layers:
            raise ValueError(
                f"config_path: {config_path} has {len(layers_cfg)} layers, the model has {num_layers}"
            )
        block = cfg.pop("block_size", pattern_cfg.get("block_size", 64))
        return {
            i: build_method("minference", pattern=layers_cfg[i], block_size=block, **cfg) for i in layer_ids
        }
    return {i: build_method(method, **cfg) for i in layer_ids}


def _xattention_from_config(
    num_layers: int, layer_ids: list[int], cfg: dict[str, Any], config_path: str | Path
) -> dict[int, nn.Module | None]:
    """One :class:`~zoo.layers.XAttention` per layer with its profiled per-head thresholds."""
    from zoo.llm.threshold_profile import load_threshold_config

    config = load_threshold_config(config_path)
    table = config["thresholds"]
    if len(table) != num_layers:
        raise ValueError(f"config_path: {config_path} has {len(table)} layers, the model has {num_layers}")
    if "threshold" in cfg:
        raise ValueError("threshold: the config at config_path gives the thresholds; pass one or the other")
    for key in ("block_size", "stride"):
        if key in cfg and cfg[key] != config[key]:
            raise ValueError(
                f"{key}: the thresholds in {config_path} were profiled with {key}={config[key]}, got {cfg[key]}"
            )
        cfg[key] = config[key]
    return {
        i: build_method("xattention", threshold=torch.tensor(table[i], dtype=torch.float32), **cfg)
        for i in layer_ids
    }


def sparse_prefill(
    model: nn.Module,
    method: str = "xattention",
    *,
    layers: list[int] | None = None,
    skip_layers: tuple[int, ...] | list[int] = (),
    min_prefill: int = 0,
    dense_last_rows: int = 1,
    config_path: str | Path | None = None,
    recorder: Callable | None = None,
    capture: Callable | None = None,
    **cfg: Any,
) -> SparsePrefillPatch:
    """Make the prefill of a transformers causal LM sparse; decoding stays dense.

    Parameters
    ----------
    model:
        A transformers model whose attention goes through ``ALL_ATTENTION_FUNCTIONS``.
    method:
        ``"xattention"``, ``"pbs"``, ``"minference"`` or ``"dense"`` (patched but dense: a control).
    layers, skip_layers:
        The layers to make sparse (all by default) and layers to keep dense.
    min_prefill:
        Calls with fewer new queries stay dense (short prompts gain nothing).
    dense_last_rows:
        The last query rows of each sparse call recomputed densely (1: the position whose output
        is the first generated token; 0: the method alone, as published).
    config_path:
        MInference per-head pattern JSON written by ``zoo train minference-config``, or XAttention
        per-head thresholds written by ``zoo train xattention-thresholds``.
    recorder:
        Called as ``recorder(layer_idx, q, k, v, mask, out, causal, scale)`` after each sparse call.
    capture:
        Called as ``capture(layer_idx, q, k, v, scale)`` with the inputs of every attention call,
        dense or sparse (offline searches read each layer's q, k, v this way; see
        :func:`capture_attention_inputs`).
    **cfg:
        The method's hyperparameters, e.g. ``threshold=0.9``, ``block_size=64``, ``pattern=...``.

    Returns
    -------
    A :class:`SparsePrefillPatch`: ``unpatch()`` restores the model; usable as a context manager.
    """
    if getattr(model, "_zoo_sparse_patch", None) is not None and model._zoo_sparse_patch.active:
        raise ValueError("model: already patched for sparse prefill; unpatch it first")
    if isinstance(dense_last_rows, bool) or not isinstance(dense_last_rows, int) or dense_last_rows < 0:
        raise ValueError(f"dense_last_rows: expected an integer >= 0, got {dense_last_rows!r}")
    modules = attention_modules(model)
    num_layers = len(modules)
    chosen = list(range(num_layers)) if layers is None else [int(i) for i in layers]
    bad = [i for i in list(chosen) + list(skip_layers) if not 0 <= int(i) < num_layers]
    if bad:
        raise ValueError(f"layers/skip_layers: expected layer indices in [0, {num_layers}), got {bad}")
    chosen = [i for i in chosen if i not in set(skip_layers)]
    per_layer = _per_layer_methods(method, num_layers, chosen, dict(cfg), config_path)
    _register()
    previous = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if previous == ATTENTION_NAME:
        previous = "sdpa"
    if previous not in ("sdpa", "eager"):
        warnings.warn(
            f"sparse_prefill: the model used {previous!r}; dense calls now run transformers' SDPA attention",
            stacklevel=2,
        )
    patched = []
    for idx, module in modules:
        module._zoo_sparse_prefill = _LayerState(
            idx, per_layer.get(idx), int(min_prefill), dense_last_rows, recorder, capture
        )
        patched.append(module)
    _set_implementation(model, ATTENTION_NAME)
    handle = SparsePrefillPatch(
        model=model, method=method, layers=per_layer, previous_implementation=previous, modules=patched
    )
    model._zoo_sparse_patch = handle
    return handle


def capture_attention_inputs(model: nn.Module, input_ids: Tensor, capture: Callable) -> None:
    """One dense forward pass of ``input_ids`` calling ``capture(layer_idx, q, k, v, scale)`` in every attention layer."""
    with torch.no_grad(), sparse_prefill(model, "dense", capture=capture):
        model(input_ids=input_ids, use_cache=False)


def unpatch(model: nn.Module) -> None:
    """Undo :func:`sparse_prefill` on ``model`` (nothing happens when it is not patched)."""
    handle = getattr(model, "_zoo_sparse_patch", None)
    if handle is not None:
        handle.unpatch()


def describe(handle: SparsePrefillPatch) -> str:
    """One line per patched layer (method and hyperparameters)."""
    lines = [f"sparse prefill: {handle.method}"]
    for idx, layer in sorted(handle.layers.items()):
        lines.append(f"  layer {idx}: {layer!r}" if layer is not None else f"  layer {idx}: dense")
    return "\n".join(lines)
