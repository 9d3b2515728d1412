"""Accuracy harness for sparse prefill (``zoo eval prefill``).

For a causal LM and a long text, every sparse method is compared with dense attention:

- per layer and head, on the queries/keys/values the patched model actually computes:
  **density** (kept blocks over causally reachable blocks), **coverage** (dense softmax mass of
  the kept elements, mean over queries; mapped through the PBS key permutation), **relative L1**
  and **cosine** of the attention output against dense attention on the same inputs;
- **perplexity** of the whole text with sparse prefill against the dense model;
- **needle in a haystack**: a sentence ``The secret number is NNNNN.`` hidden at several depths
  of the text, the question at the end, greedy decoding (sparse prefill, dense decode) must
  return the number; the score is compared with the dense model's.

The same statistics run on **synthetic** queries and keys with planted structure: attention sinks
(strong first keys), vertical lines (strong scattered keys), slash lines (fixed query-key
offsets) and a local band, built from per-channel codes so each pattern's logit boost is known;
``planted_recall`` is the fraction of planted (query, key) pairs inside the kept blocks.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from zoo.progress import get_logger

__all__ = [
    "DEFAULT_METHODS",
    "AttentionStatsRecorder",
    "attention_stats",
    "continuation_nll",
    "evaluate_lm",
    "evaluate_synthetic",
    "needle_test",
    "nll_increase_by_block_row",
    "planted_elements",
    "synthetic_qkv",
]

log = get_logger("zoo.llm.harness")

# name -> (method, config): every method at its published defaults
DEFAULT_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "xattention": ("xattention", {}),
    "pbs": ("pbs", {}),
    "minference_vertical_slash": ("minference", {"pattern": "vertical_slash"}),
    "minference_a_shape": ("minference", {"pattern": "a_shape"}),
    "minference_block_sparse": ("minference", {"pattern": "block_sparse"}),
}


# ------------------------------------------------------------------------------------ statistics
def _kept_original(mask, b: int, h: int, kv_h: int, rows: Tensor, m: int) -> Tensor:
    """bool ``[len(rows), M]``: keys (original positions) in the kept blocks of query rows ``rows``."""
    blocks = mask.to_dense()
    blocks = blocks[min(b, blocks.shape[0] - 1), min(h, blocks.shape[1] - 1)]
    slots = blocks[rows // mask.block_q][:, torch.arange(m, device=rows.device) // mask.block_k]
    if mask.key_perm is None:
        return slots
    perm = mask.key_perm[min(b, mask.key_perm.shape[0] - 1), min(kv_h, mask.key_perm.shape[1] - 1)].long()
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(m, device=perm.device)
    return slots[:, inverse]


@torch.no_grad()
def attention_stats(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask,
    out: Tensor,
    causal: bool = True,
    scale: float | None = None,
    chunk: int = 1024,
) -> dict[str, list[float]]:
    """Per query head (averaged over the batch): density, coverage, relative L1, cosine.

    ``out`` is the sparse output for ``q, k, v`` under ``mask``; the dense reference is computed
    here in fp32, ``chunk`` queries at a time (memory ``O(chunk * M)`` per head).
    """
    from zoo.kernels.block_mask import causal_reachable_blocks

    batch, heads, n, dim = q.shape
    kv_heads, m = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = dim**-0.5 if scale is None else scale
    dense_blocks = mask.to_dense().expand(batch, heads, -1, -1)
    if causal:
        reach = causal_reachable_blocks(n, m, mask.block_q, mask.block_k, q.device)
    else:
        reach = torch.ones(dense_blocks.shape[-2:], dtype=torch.bool, device=q.device)
    density = ((dense_blocks & reach).sum((-1, -2)).float() / reach.sum()).mean(0)
    stats = {"density": density.tolist(), "coverage": [], "rel_l1": [], "cosine": []}
    key_pos = torch.arange(m, device=q.device)
    for h in range(heads):
        hk = h // group
        coverage, abs_err, abs_ref, cosine, rows_seen = 0.0, 0.0, 0.0, 0.0, 0
        for b in range(batch):
            kf, vf = k[b, hk].float(), v[b, hk].float()
            for start in range(0, n, chunk):
                rows = torch.arange(start, min(start + chunk, n), device=q.device)
                logits = (q[b, h, rows].float() @ kf.T) * scale
                if causal:
                    logits = logits.masked_fill(key_pos[None, :] > (m - n + rows)[:, None], float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                kept = _kept_original(mask, b, h, hk, rows, m)
                coverage += float((probs * kept).sum())
                dense_out = probs @ vf
                sparse_out = out[b, h, rows].float()
                abs_err += float((sparse_out - dense_out).abs().sum())
                abs_ref += float(dense_out.abs().sum())
                cosine += float(
                    torch.nn.functional.cosine_similarity(sparse_out, dense_out, dim=-1, eps=1e-12).sum()
                )
                rows_seen += rows.numel()
        stats["coverage"].append(coverage / rows_seen)
        stats["rel_l1"].append(abs_err / max(abs_ref, 1e-30))
        stats["cosine"].append(cosine / rows_seen)
    return stats


class AttentionStatsRecorder:
    """Recorder for :func:`zoo.llm.sparse_prefill`: per-layer :func:`attention_stats` of each call."""

    def __init__(self, chunk: int = 1024) -> None:
        self.chunk = chunk
        self.layers: dict[int, dict[str, list[float]]] = {}

    def __call__(self, layer_idx, q, k, v, mask, out, causal, scale) -> None:
        self.layers[layer_idx] = attention_stats(q, k, v, mask, out, causal, scale, self.chunk)

    def summary(self) -> dict[str, float]:
        values: dict[str, list[float]] = {}
        for layer in self.layers.values():
            for key, per_head in layer.items():
                values.setdefault(key, []).extend(per_head)
        out = {f"mean_{key}": sum(v) / len(v) for key, v in values.items() if v}
        if "coverage" in values:
            out["min_coverage"] = min(values["coverage"])
        return out


# ------------------------------------------------------------------------------------- synthetic
@dataclass
class PlantedSpec:
    """Where the synthetic patterns were planted, per query head."""

    sinks: int
    verticals: list[list[int]]
    slashes: list[list[int]]
    local_width: int


def _rotary_code(positions: Tensor, freqs: Tensor) -> Tensor:
    angles = positions[:, None].double() * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def synthetic_qkv(
    n: int,
    heads: int = 4,
    kv_heads: int = 2,
    dim: int = 64,
    *,
    batch: int = 1,
    sinks: int = 4,
    verticals: int = 6,
    slashes: int = 3,
    local_width: int = 16,
    strength: float | None = None,
    noise: float = 0.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor, Tensor, PlantedSpec]:
    """Queries and keys whose logits (scale ``dim**-0.5`` applied) carry planted boosts.

    Channel groups of ``q . k``: a sink channel (first ``sinks`` keys, ``+strength + 3``), a
    vertical channel (``verticals`` random keys per key head, ``+strength + 1``), a slash code
    (random frequencies; ``+min(strength, 7)`` where ``query - key`` equals one of ``slashes``
    random offsets per key head), a local code (geometric frequencies as rotary embeddings;
    ``+strength + 2`` at distance 0, decaying over ``local_width`` with a long tail) and Gaussian
    noise with logit std ``noise``. ``strength`` defaults to
    ``ln(n)``, so the planted pairs hold most of the softmax mass at any length, as in trained
    LMs. Values are standard normal. ``dim`` must be at least 32.
    """
    if dim < 32:
        raise ValueError(f"dim: expected at least 32 channels for the planted codes, got {dim}")
    if heads % kv_heads:
        raise ValueError(f"kv_heads: expected a divisor of heads={heads}, got {kv_heads}")
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)  # the planted positions and frequencies
    noise_gen = torch.Generator(device=device).manual_seed(seed)  # bulk noise, drawn where it lives
    work = torch.float64 if dtype == torch.float64 else torch.float32
    base = math.log(n) if strength is None else float(strength)
    # the codes have side lobes (std ~ amplitude / sqrt(2 * frequencies)): a quarter of the channels each
    # and a capped slash amplitude keep them a small share of the mass
    sink_logit, vertical_logit, local_logit = base + 3.0, base + 1.0, base + 2.0
    slash_logit = min(base, 7.0)
    scale_inv = math.sqrt(dim)
    free = dim - 2
    local_f = max(4, free // 4)
    slash_f = max(4, free // 4)
    noise_dims = free - 2 * slash_f - 2 * local_f
    c0, c1 = 2, 2 + 2 * slash_f
    c2 = c1 + 2 * local_f
    pos = torch.arange(n, device=device)
    q = torch.zeros(batch, heads, n, dim, dtype=work, device=device)
    k = torch.zeros(batch, kv_heads, n, dim, dtype=work, device=device)
    group = heads // kv_heads
    vertical_ids, slash_ids = [], []
    for hk in range(kv_heads):
        cols = (torch.randperm(max(n - sinks, 1), generator=g)[:verticals] + sinks).clamp(max=n - 1).tolist()
        offs = (torch.randperm(max(n // 2 - local_width, 1), generator=g)[:slashes] + local_width).tolist()
        vertical_ids += [sorted(cols)] * group
        slash_ids += [sorted(offs)] * group
        slash_freqs = (torch.rand(slash_f, generator=g, dtype=torch.float64) * math.pi).to(device)
        # geometric frequencies from pi / (2 local_width) down to 1 / n, as rotary embeddings: a sharp local
        # peak with a slowly decaying long-range tail
        local_freqs = torch.logspace(
            math.log10(math.pi / (2 * local_width)), math.log10(1.0 / n), local_f, dtype=torch.float64
        ).to(device)
        k[:, hk, :sinks, 0] = 1.0
        k[:, hk, cols, 1] = 1.0
        # key j carries the codes of j + o: the query code of i meets it where i - j = o
        k[:, hk, :, c0:c1] = sum(_rotary_code(pos + o, slash_freqs) for o in offs).to(work)
        k[:, hk, :, c1:c2] = _rotary_code(pos, local_freqs).to(work)
        if noise_dims > 0:
            k[:, hk, :, c2:] = torch.randn(
                batch, n, noise_dims, generator=noise_gen, device=device, dtype=work
            )
        hs = slice(hk * group, (hk + 1) * group)
        q[:, hs, :, 0] = sink_logit * scale_inv
        q[:, hs, :, 1] = vertical_logit * scale_inv
        q[:, hs, :, c0:c1] = (_rotary_code(pos, slash_freqs) * (slash_logit * scale_inv / slash_f)).to(work)
        q[:, hs, :, c1:c2] = (_rotary_code(pos, local_freqs) * (local_logit * scale_inv / local_f)).to(work)
        if noise_dims > 0:
            q[:, hs, :, c2:] = torch.randn(
                batch, group, n, noise_dims, generator=noise_gen, device=device, dtype=work
            ) * (noise * scale_inv / math.sqrt(noise_dims))
    v = torch.randn(batch, kv_heads, n, dim, generator=noise_gen, device=device, dtype=work)
    spec = PlantedSpec(sinks=sinks, verticals=vertical_ids, slashes=slash_ids, local_width=local_width)
    return q.to(dtype), k.to(dtype), v.to(dtype), spec


def planted_elements(spec: PlantedSpec, n: int, device: str | torch.device = "cpu") -> Tensor:
    """bool ``[H, N, N]``: the planted (query, key) pairs, causal."""
    heads = len(spec.verticals)
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    out = torch.zeros(heads, n, n, dtype=torch.bool, device=device)
    for h in range(heads):
        planted = (j < spec.sinks) | ((i - j >= 0) & (i - j < spec.local_width))
        planted = planted | torch.isin(j, torch.tensor(spec.verticals[h], device=device))
        planted = planted | torch.isin(i - j, torch.tensor(spec.slashes[h], device=device))
        out[h] = planted & (j <= i)
    return out


def _build_methods(methods: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, nn.Module]:
    from zoo.llm.patch import build_method

    # a searched per-model pattern config (config_path) has no meaning on synthetic heads
    return {
        name: build_method(method, **cfg)
        for name, (method, cfg) in methods.items()
        if "config_path" not in cfg
    }


@torch.no_grad()
def evaluate_synthetic(
    methods: dict[str, tuple[str, dict[str, Any]]] | None = None,
    n: int = 2048,
    heads: int = 4,
    kv_heads: int = 2,
    dim: int = 64,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Every method on planted synthetic attention: stats averaged over heads, planted recall."""
    from zoo.kernels import block_sparse_attention

    methods = DEFAULT_METHODS if methods is None else methods
    q, k, v, spec = synthetic_qkv(n, heads, kv_heads, dim, seed=seed, device=device)
    planted = planted_elements(spec, n, device)
    results: dict[str, Any] = {"n": n, "heads": heads, "kv_heads": kv_heads, "dim": dim, "methods": {}}
    for name, layer in _build_methods(methods).items():
        mask = layer.estimate(q, k, causal=True)
        out = block_sparse_attention(q, k, v, mask, causal=True, backend=layer.backend)
        stats = attention_stats(q, k, v, mask, out, causal=True)
        recall = []
        rows = torch.arange(n, device=device)
        for h in range(heads):
            kept = _kept_original(mask, 0, h, h // (heads // kv_heads), rows, n)
            recall.append(float((kept & planted[h]).sum() / planted[h].sum()))
        row = {key: sum(vals) / len(vals) for key, vals in stats.items()}
        row["planted_recall"] = sum(recall) / len(recall)
        results["methods"][name] = row
    return results


# ------------------------------------------------------------------------------------------- LM
def _continue(model: nn.Module, out, input_ids: Tensor):
    """Run ``input_ids`` after the KV cache of the forward output ``out``."""
    # transformers 5.2x calls the KV cache ``cache``; earlier releases ``past_key_values``
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    past = out.get(name) if out.get(name) is not None else out.get("past_key_values")
    return model(input_ids=input_ids, use_cache=True, **{name: past})


@torch.no_grad()
def _greedy(model: nn.Module, input_ids: Tensor, new_tokens: int) -> list[int]:
    """Greedy continuation with the KV cache: prefill once, then one token per step."""
    out = model(input_ids=input_ids, use_cache=True)
    generated = []
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(new_tokens):
        generated.append(int(token))
        out = _continue(model, out, token)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return generated


def nll_increase_by_block_row(
    increase: Tensor, block_size: int, edges: Sequence[int] = (0, 8, 32, 64)
) -> dict:
    """Mean NLL increase ``[B, T - 1]`` (sparse minus dense, per predicting position) by the position's
    row inside its query block of ``block_size``: ``{"0-8": ..., "8-32": ..., ...}`` over rows at or
    after the first block (the first block attends to itself alone). Block selection is shared by a
    block's queries, so the first rows, whose recent context lies in the previous key block, show
    what selection costs them."""
    pos = torch.arange(increase.shape[-1], device=increase.device)
    row = pos % block_size
    bounds = [e for e in edges if e < block_size] + [block_size]
    out = {}
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        sel = (row >= lo) & (row < hi) & (pos >= block_size)
        if bool(sel.any()):
            out[f"{lo}-{hi}"] = float(increase[..., sel].double().mean())
    return out


@torch.no_grad()
def continuation_nll(
    model: nn.Module, input_ids: Tensor, continuation: int, prefill: Any = None
) -> tuple[float, int]:
    """Summed NLL of the last ``continuation`` tokens of ``input_ids [B, T]`` after a prefill of the rest.

    The first ``T - continuation`` tokens run in one forward pass inside ``prefill()`` (a context
    manager factory, e.g. ``lambda: sparse_prefill(model, "xattention")``; None: dense); the
    continuation then runs densely against that KV cache in one teacher-forced forward pass, as
    generation after a sparse prefill would. Its first token is predicted by the prompt's last row.
    """
    if input_ids.dim() != 2 or not 1 <= continuation < input_ids.shape[1]:
        raise ValueError(
            f"continuation: expected 1 to {input_ids.shape[1] - 1} tokens of input_ids {tuple(input_ids.shape)}, "
            f"got {continuation}"
        )
    split = input_ids.shape[1] - continuation
    with prefill() if prefill is not None else contextlib.nullcontext():
        out = model(input_ids=input_ids[:, :split], use_cache=True)
    rest = _continue(model, out, input_ids[:, split:])
    logits = torch.cat([out.logits[:, -1:], rest.logits[:, :-1]], dim=1).float()
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), input_ids[:, split:].reshape(-1), reduction="sum"
    )
    return float(nll), input_ids.shape[0] * continuation


def needle_prompts(
    tokenizer, haystack: Sequence[int], length: int, depths: Sequence[float], numbers: Sequence[int]
) -> list[tuple[list[int], int, float]]:
    """``(prompt ids, number, depth)``: haystack text with the needle at ``depth``, then the question."""
    from zoo.llm.corpus import needle_tokens
    from zoo.llm.model import BOS_ID

    prompts = []
    for number in numbers:
        needle, question, _ = needle_tokens(tokenizer, number)
        room = length - len(needle) - len(question) - 1
        if room < 1:
            raise ValueError(
                f"needle length: expected more than the {length - room} tokens of needle and question, got {length}"
            )
        if len(haystack) < room:
            raise ValueError(f"needle haystack: expected at least {room} tokens, got {len(haystack)}")
        for depth in depths:
            at = int(room * depth)
            ids = [BOS_ID, *haystack[:at], *needle, *haystack[at:room], *question]
            prompts.append((ids, number, depth))
    return prompts


def needle_test(
    model: nn.Module,
    tokenizer,
    prompts: list[tuple[list[int], int, float]],
    device: str | torch.device,
    new_tokens: int = 6,
) -> dict[str, Any]:
    """Fraction of prompts whose greedy answer starts with the hidden number."""
    hits, details = 0, []
    for ids, number, depth in prompts:
        answer = tokenizer.decode(_greedy(model, torch.tensor([ids], device=device), new_tokens))
        found = re.findall(r"\d+", answer)
        ok = bool(found) and found[0] == str(number)
        hits += ok
        details.append({"depth": depth, "number": number, "answer": answer.strip(), "correct": ok})
    return {"accuracy": hits / max(len(prompts), 1), "trials": details}


def evaluate_lm(
    model: nn.Module,
    input_ids: Tensor,
    methods: dict[str, tuple[str, dict[str, Any]]] | None = None,
    *,
    tokenizer=None,
    needle_haystack: Sequence[int] | None = None,
    needle_length: int | None = None,
    needle_depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    needle_numbers: Sequence[int] = (48213, 70529),
    stats_chunk: int = 1024,
    continuation: int | None = None,
) -> dict[str, Any]:
    """Dense vs sparse prefill on one sequence ``input_ids [1, T]``: stats, perplexity, needle.

    Two perplexities per method: ``ppl`` of the whole sequence with every position computed by the
    method, and ``continuation_ppl`` of its last ``continuation`` tokens (default ``T // 8``) decoded
    densely after the method prefilled the rest (:func:`continuation_nll`).
    """
    from zoo.llm.model import perplexity, token_nll
    from zoo.llm.patch import sparse_prefill

    methods = DEFAULT_METHODS if methods is None else methods
    device = input_ids.device
    continuation = continuation or max(1, input_ids.shape[1] // 8)
    dense_tokens = token_nll(model, input_ids)
    nll, count = float(dense_tokens.double().sum()), dense_tokens.numel()
    c_nll, c_count = continuation_nll(model, input_ids, continuation)
    result: dict[str, Any] = {
        "tokens": int(input_ids.shape[1]),
        "continuation_tokens": continuation,
        "dense": {
            "nll": nll / count,
            "ppl": perplexity(nll, count),
            "continuation_ppl": perplexity(c_nll, c_count),
        },
        "methods": {},
    }
    prompts = None
    if tokenizer is not None and needle_haystack is not None:
        prompts = needle_prompts(
            tokenizer, needle_haystack, needle_length or input_ids.shape[1], needle_depths, needle_numbers
        )
        result["dense"]["needle"] = needle_test(model, tokenizer, prompts, device)
        log.info(
            "dense: ppl %.3f, needle %.2f", result["dense"]["ppl"], result["dense"]["needle"]["accuracy"]
        )
    for name, (method, cfg) in methods.items():
        recorder = AttentionStatsRecorder(stats_chunk)
        with sparse_prefill(model, method, recorder=recorder, **cfg) as handle:
            s_tokens = token_nll(model, input_ids)
            handle.set_recorder(None)
            row: dict[str, Any] = {"method": method, "config": {k: _plain(v) for k, v in cfg.items()}}
            row["ppl"] = perplexity(float(s_tokens.double().sum()), s_tokens.numel())
            row["ppl_ratio"] = row["ppl"] / result["dense"]["ppl"]
            block = next((m.block_size for m in handle.layers.values() if m is not None), 128)
            row["nll_increase_by_block_row"] = nll_increase_by_block_row(s_tokens - dense_tokens, block)
            row.update(recorder.summary())
            row["layers"] = [recorder.layers[i] for i in sorted(recorder.layers)]
            if prompts is not None:
                row["needle"] = needle_test(model, tokenizer, prompts, device)
        c_nll, c_count = continuation_nll(
            model,
            input_ids,
            continuation,
            lambda method=method, cfg=cfg: sparse_prefill(model, method, **cfg),
        )
        row["continuation_ppl"] = perplexity(c_nll, c_count)
        row["continuation_ppl_ratio"] = row["continuation_ppl"] / result["dense"]["continuation_ppl"]
        result["methods"][name] = row
        log.info(
            "%s: ppl %.3f (x%.4f), continuation x%.4f, density %.3f, coverage %.3f%s",
            name,
            row["ppl"],
            row["ppl_ratio"],
            row["continuation_ppl_ratio"],
            row.get("mean_density", float("nan")),
            row.get("mean_coverage", float("nan")),
            f", needle {row['needle']['accuracy']:.2f}" if prompts is not None else "",
        )
    return result


def targets(result: dict[str, Any]) -> dict[str, dict[str, bool]]:
    """The issue's accuracy targets per method: coverage >= 0.9, ppl within 2%, needle >= dense."""
    out = {}
    dense_needle = result["dense"].get("needle", {}).get("accuracy")
    for name, row in result["methods"].items():
        checks = {
            "coverage>=0.9": row.get("mean_coverage", 0.0) >= 0.9,
            "ppl_within_2pct": row["ppl_ratio"] <= 1.02,
        }
        if "continuation_ppl_ratio" in row:
            checks["continuation_ppl_within_2pct"] = row["continuation_ppl_ratio"] <= 1.02
        if dense_needle is not None and "needle" in row:
            checks["needle_as_good_as_dense"] = row["needle"]["accuracy"] >= dense_needle
        out[name] = checks
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    return value
