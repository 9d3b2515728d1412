"""How close each approximate attention gets to exact attention, against what it costs.

Behind ``zoo eval approx-attention`` and ``bench/approx_attention.py``. Compares, on real queries
and keys, the approximations of this library:

- SEA (arXiv 2310.01777): its mask predictor fitted by distillation on held-out q/k/v of the same
  layer, gates fixed at 1 (so the error is that of the estimated mask);
- Scatterbrain (arXiv 2110.15343), LSH and local supports, and its two parts alone at the same
  cost (the paper's central claim: the combination beats both);
- Combiner (arXiv 2107.05768), Fixed / Logsparse / Axial / Mixture;
- SPT's PQ sparse attention (arXiv 2312.10365);
- the block-sparse methods on the shared kernel: XAttention, MInference (vertical-slash), PBS-Attn,
  and an oracle that keeps the top blocks of the true attention mass (a bound, not a method).

Error: ``||out - exact|| / ||exact||`` per head stack, exact = fp64 softmax attention.
Budget, per head, as a fraction of dense attention with the same causality:
``score_fraction`` = exact query-key scores computed / dense scores, and ``flops_fraction`` =
the method's attention FLOPs (features, estimation, summaries, correction included) / dense.

Sources of q/k/v (``AttentionSample``): any ``nn.Module`` whose attention goes through
``F.scaled_dot_product_attention`` (captured by ``capture_sdpa_qkv`` while the model runs on real
data), a ``.safetensors`` file of q/k/v (``save_samples`` / ``load_samples``), or the byte-level
causal LM of ``sea_distill`` trained by this command on offline English text.

A time / peak-memory sweep over N (``sweep``) runs on one GPU; ``plot`` draws error vs budget and
the sweep with matplotlib.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.progress import get_logger

__all__ = [
    "AttentionSample",
    "Method",
    "capture_sdpa_qkv",
    "equal_budget_scatterbrain",
    "evaluate",
    "exact_attention",
    "fit_sea_predictor",
    "load_samples",
    "model_samples",
    "method_suite",
    "plot",
    "read_token_file",
    "relative_error",
    "save_samples",
    "parse_capture_arguments",
    "save_captured_samples",
    "select_examples",
    "sweep",
]

log = get_logger("zoo.layers.approx_eval")


# ----------------------------------------------------------------------------- samples
@dataclass
class AttentionSample:
    """q (B, H, N, D), k and v (B, Hkv, N, D) of one attention call, and where they came from."""

    name: str
    q: Tensor
    k: Tensor
    v: Tensor
    causal: bool
    source: str = ""

    def __post_init__(self) -> None:
        for label, t in (("q", self.q), ("k", self.k), ("v", self.v)):
            if t.dim() != 4:
                raise ValueError(
                    f"AttentionSample {self.name}: {label} must be (B, H, N, D), got {tuple(t.shape)}"
                )
        if (
            self.k.shape != self.v.shape
            or self.k.shape[2] != self.q.shape[2]
            or self.q.shape[1] % self.k.shape[1]
        ):
            raise ValueError(
                f"AttentionSample {self.name}: need k, v (B, Hkv, N, D) with Hkv dividing H and the q length, "
                f"got q {tuple(self.q.shape)}, k {tuple(self.k.shape)}, v {tuple(self.v.shape)}"
            )


def parse_capture_arguments(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, *, checkpoint_help: str, unit: str
) -> tuple[argparse.Namespace, Path]:
    """The flags every capture script shares (``--checkpoint``, ``--split``, ``--count``, ``--out``,
    ``--threads``) added to ``parser`` and parsed; sets the thread count and returns the arguments
    with the checkpoint path, which must exist."""
    parser.add_argument("--checkpoint", required=True, help=checkpoint_help)
    parser.add_argument("--split", default="test", help="held-out split (default: %(default)s)")
    parser.add_argument(
        "--count", type=int, default=8, help=f"{unit}, spread evenly over the split (default: %(default)s)"
    )
    parser.add_argument(
        "--out", required=True, help="output .safetensors (a .json sidecar is written beside it)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise ValueError(f"checkpoint: no such file {checkpoint}")
    return args, checkpoint


def save_captured_samples(
    samples: list[AttentionSample],
    path: str | Path,
    *,
    checkpoint: str | Path,
    split: str,
    indices: list[int],
    labels: Tensor,
    predictions: Tensor,
    command: str,
    unit: str = "examples",
    **details: Any,
) -> Path:
    """Write captured samples (``save_samples``) and a JSON sidecar beside them saying where they came from:
    the checkpoint and its sha256, ``details`` (model, task, ...), the held-out split, example indices,
    labels, the model's predictions and its accuracy on them, each sample's shape and source, the command.
    """
    from zoo.registry import sha256_of

    out = save_samples(samples, path)
    info = {
        "qkv": str(out),
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_of(checkpoint),
        **details,
        "split": split,
        "indices": indices,
        "labels": labels.tolist(),
        "predictions": predictions.tolist(),
        "accuracy_on_these": float((predictions == labels).float().mean()),
        "samples": [{"name": s.name, "shape": list(s.q.shape), "source": s.source} for s in samples],
        "command": command,
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    for s in samples:
        print(f"{s.name}: q/k/v {tuple(s.q.shape)}; {s.source}")
    print(f"accuracy on these {len(indices)} {unit}: {info['accuracy_on_these']:.3f}; wrote {out}")
    return out


def select_examples(num_examples: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(num_examples)`` (the first one included)."""
    if count < 1 or count > num_examples:
        raise ValueError(f"count: expected 1 to {num_examples} examples, got {count}")
    return [i * num_examples // count for i in range(count)]


@contextlib.contextmanager
def capture_sdpa_qkv(model: nn.Module, *, max_per_module: int = 1, to_cpu: bool = True):
    """Record q, k, v of every ``F.scaled_dot_product_attention`` call made inside ``model``.

    Yields the list being filled with ``AttentionSample``s named after the innermost module that
    made the call. Calls with an explicit ``attn_mask`` are recorded as non-causal with a warning
    in ``source``. Works for timm and Hugging Face SDPA attention, this library's models, and
    nn.MultiheadAttention with need_weights=False outside its fused inference fast path (in
    training mode or with gradients enabled).
    """
    samples: list[AttentionSample] = []
    counts: dict[str, int] = {}
    stack: list[str] = []
    names = {id(m): n or "model" for n, m in model.named_modules()}
    original = F.scaled_dot_product_attention

    def pre(mod, args):
        stack.append(names.get(id(mod), type(mod).__name__))

    def post(mod, args, out):
        if stack:
            stack.pop()

    def recording(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        where = stack[-1] if stack else "model"
        if counts.get(where, 0) < max_per_module and query.dim() == 4 and key.shape[-2] == query.shape[-2]:
            counts[where] = counts.get(where, 0) + 1
            grab = (lambda t: t.detach().float().cpu()) if to_cpu else (lambda t: t.detach())
            note = "attn_mask ignored" if attn_mask is not None else ""
            if scale is not None and abs(scale - query.shape[-1] ** -0.5) > 1e-6:
                query = query * (scale / query.shape[-1] ** -0.5)  # fold a custom scale into q
            samples.append(
                AttentionSample(where, grab(query), grab(key), grab(value), bool(is_causal), note.strip())
            )
        kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        return original(query, key, value, **kwargs)

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    handles += [m.register_forward_hook(post) for m in model.modules()]
    F.scaled_dot_product_attention = recording
    try:
        yield samples
    finally:
        F.scaled_dot_product_attention = original
        for h in handles:
            h.remove()


def save_samples(samples: list[AttentionSample], path: str | Path) -> Path:
    """Write samples to one .safetensors file (q/k/v per sample, names and causality as metadata)."""
    from safetensors.torch import save_file

    tensors, meta = {}, []
    for i, s in enumerate(samples):
        for label, t in (("q", s.q), ("k", s.k), ("v", s.v)):
            tensors[f"{i:04d}.{label}"] = t.contiguous().cpu()
        meta.append({"name": s.name, "causal": s.causal, "source": s.source})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"samples": json.dumps(meta)})
    return path


def load_samples(path: str | Path) -> list[AttentionSample]:
    """Samples from a .safetensors file: written by ``save_samples``, or holding plain ``q``, ``k``, ``v``
    tensors (B, H, N, D) (then causal unless the metadata says ``{"causal": "false"}``)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"qkv: no such file {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        keys = set(f.keys())
        if "samples" in meta:
            out = []
            for i, m in enumerate(json.loads(meta["samples"])):
                q, k, v = (f.get_tensor(f"{i:04d}.{x}") for x in "qkv")
                out.append(AttentionSample(m["name"], q, k, v, bool(m["causal"]), m.get("source", str(path))))
            return out
        if {"q", "k", "v"} <= keys:
            causal = meta.get("causal", "true").lower() not in ("0", "false", "no")
            return [
                AttentionSample(
                    path.stem, f.get_tensor("q"), f.get_tensor("k"), f.get_tensor("v"), causal, str(path)
                )
            ]
    raise ValueError(
        f"qkv: {path} holds neither save_samples output nor tensors named q, k, v (has {sorted(keys)[:6]})"
    )


# ----------------------------------------------------------------------------- error and cost
def exact_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """fp64 softmax attention (GQA by repeating K/V here: this is the ground truth, not a method)."""
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1), is_causal=causal
    )


def relative_error(out: Tensor, exact: Tensor) -> float:
    return ((out.double() - exact).norm() / exact.norm().clamp_min(1e-300)).item()


def _per_head_error(out: Tensor, exact: Tensor) -> Tensor:
    """||out - exact|| / ||exact|| of each head (over batch, positions and channels): (H,) fp64."""
    diff = (out.double() - exact).square().sum(dim=(0, 2, 3)).sqrt()
    return diff / exact.square().sum(dim=(0, 2, 3)).sqrt().clamp_min(1e-300)


def _dense_entries(n: int, causal: bool) -> float:
    return n * (n + 1) / 2 if causal else float(n * n)


def _performer_flops(n: int, d: int, m: int, causal: bool, dv: int | None = None) -> float:
    dv = d if dv is None else dv
    flops = 4.0 * n * m * d + 4.0 * n * m * (dv + 1)
    if causal:
        c = min(128, n)
        flops += 2.0 * n * c * m + 2.0 * n * c * (dv + 1)
    return flops


def _local_band_entries(n: int, window: int, causal: bool) -> float:
    w = min(window, n)
    if causal:
        return float(sum(min(i + 1, w) for i in range(n))) if n <= 4096 else n * w - w * (w - 1) / 2
    return float(n * (2 * w - 1) - w * (w - 1))


@dataclass
class Method:
    """One configured approximation: ``run(q, k, v) -> out`` and its budget for a given N, D."""

    name: str
    family: str
    params: dict
    run: Callable[[Tensor, Tensor, Tensor], Tensor]
    score_entries: float
    flops: float
    oracle: bool = False
    extra: dict = field(default_factory=dict)


def _scatterbrain_methods(n, d, causal, feature_map: str = "cosh") -> list[Method]:
    from zoo.layers.scatterbrain import scatterbrain_attention

    out = []
    for sparse in ("lsh", "local"):
        for m in (16, 64):
            for window in (16, 64):
                if window >= n:
                    continue
                entries = (
                    _local_band_entries(n, window, causal)
                    if sparse == "local"
                    else n * window / (2 if causal else 1)
                )
                flops = _performer_flops(n, d, m, causal) + entries * (4.0 * d + 2.0 * m + 2.0)
                gen = torch.Generator().manual_seed(0)

                def run(q, k, v, sparse=sparse, m=m, window=window, gen=gen):
                    return scatterbrain_attention(
                        q, k, v, num_features=m, sparse=sparse, window=window, causal=causal, generator=gen,
                        feature_map=feature_map,
                    )  # fmt: skip

                out.append(Method(f"scatterbrain-{sparse} m={m} w={window}", f"scatterbrain-{sparse}",
                                  {"sparse": sparse, "num_features": m, "window": window, "feature_map": feature_map},
                                  run, entries, flops))  # fmt: skip
    return out


def _parts_methods(n, d, causal, feature_map: str = "cosh") -> list[Method]:
    """Scatterbrain's parts alone over a range of budgets (local band, LSH buckets, Performer)."""
    from zoo.layers.scatterbrain import performer_attention, scatterbrain_attention

    out = []
    for window in (8, 32, 128):
        if window >= n:
            continue
        entries = _local_band_entries(n, window, causal)

        def run_local(q, k, v, window=window):
            return scatterbrain_attention(
                q, k, v, sparse="local", window=window, causal=causal, mode="sparse"
            )

        out.append(
            Method(
                f"local w={window}", "sparse-local", {"window": window}, run_local, entries, 4.0 * entries * d
            )
        )
    for m in (16, 64, 256):
        gen = torch.Generator().manual_seed(0)

        def run_perf(q, k, v, m=m, gen=gen):
            from zoo.layers.scatterbrain import draw_feature_projection

            proj = draw_feature_projection(m, q.shape[-1], feature_map, generator=gen, device=q.device)
            return performer_attention(q, k, v, proj, causal=causal, feature_map=feature_map)

        out.append(Method(f"performer m={m}", "lowrank-performer", {"num_features": m, "feature_map": feature_map},
                          run_perf, 0.0, _performer_flops(n, d, m, causal)))  # fmt: skip
    return out


def _combiner_methods(n, d, causal) -> list[Method]:
    from zoo.layers.combiner import combiner_attention, default_segment_len

    out = []
    L = default_segment_len(n)
    S = math.ceil(n / L)
    lg = max(1, math.floor(math.log2(max(n - 1, 1))) + 1)
    half = 0.5 if causal else 1.0
    counts = {
        "fixed": (n * L * half + n * S * half, S * L),
        "logsparse": (n * (1 + lg * (1 if causal else 2)), n * lg),
        "axial": (n * L * half + n * S * half, n * L),
        "mixture": (n * (L * half + S * half + L + S), n * S * half + 2 * n * L),
    }
    for variant, (logits, summaries) in counts.items():
        if variant == "mixture" and not causal:
            continue

        def run(q, k, v, variant=variant):
            return combiner_attention(q, k, v, variant, None, causal)

        out.append(Method(f"combiner-{variant}", f"combiner-{variant}", {"segment_len": L}, run, logits,
                          4.0 * d * (logits + summaries)))  # fmt: skip
    return out


def _spt_methods(n, d, causal) -> list[Method]:
    from zoo.layers.spt_attention import pq_sparse_attention

    out = []
    S = math.ceil(d / 8)
    for frac in (16, 8, 4):
        top_k = max(1, n // frac)
        entries = n * top_k - (top_k * (top_k - 1) / 2 if causal else 0)

        def run(q, k, v, top_k=top_k):
            return pq_sparse_attention(q, k, v, top_k=top_k, causal=causal)

        flops = 4.0 * entries * d + _dense_entries(n, causal) * S + 2 * 2.0 * n * S * 16 * 8
        out.append(Method(f"spt top_k=N/{frac}", "spt", {"top_k": top_k}, run, entries, flops))
    return out


def _block_sparse_methods(n, d, causal) -> list[Method]:
    from zoo.kernels import BlockSparseMask, block_sparse_attention

    out = []
    block = 32 if n <= 512 else (64 if n <= 4096 else 128)
    dense = _dense_entries(n, causal)

    def masked(mask_fn):
        def run(q, k, v):
            mask = mask_fn(q, k)
            run.last_density = mask.density(causal)
            return block_sparse_attention(q, k, v, mask, causal=causal)

        run.last_density = None
        return run

    try:
        from zoo.layers.xattention import XAttention

        for tau in (0.8, 0.9, 0.95):
            xa = XAttention(block_size=block, stride=8, threshold=tau)
            run = masked(lambda q, k, xa=xa: xa.estimate(q, k, causal))
            out.append(Method(f"xattention tau={tau}", "xattention", {"threshold": tau, "block": block}, run,
                              float("nan"), float("nan"), extra={"estimate_flops": 2.0 * dense * d / 8}))  # fmt: skip
    except ImportError:  # pragma: no cover - the layer ships with the library
        pass
    if causal:
        try:
            from zoo.layers.pbs_attention import PBSAttention

            for tau in (0.9, 0.95):
                pbs = PBSAttention(block_size=block, segment_size=4 * block, threshold=tau)
                run = masked(lambda q, k, pbs=pbs: pbs.estimate(q, k, causal))
                out.append(Method(f"pbs tau={tau}", "pbs", {"threshold": tau, "block": block}, run, float("nan"),
                                  float("nan"), extra={"estimate_flops": 4.0 * n * block * d}))  # fmt: skip
        except ImportError:  # pragma: no cover
            pass
        try:
            from zoo.layers.minference import MInference

            for vert, slash in ((n // 16, n // 8), (n // 8, n // 4)):
                mi = MInference(
                    "vertical_slash", block_size=block, vertical_size=vert, slash_size=slash, last_q=64
                )
                run = masked(lambda q, k, mi=mi: mi.estimate(q, k, causal))
                out.append(Method(f"minference vs={vert}/{slash}", "minference", {"vertical": vert, "slash": slash},
                                  run, float("nan"), float("nan"), extra={"estimate_flops": 4.0 * 64 * n * d}))  # fmt: skip
        except ImportError:  # pragma: no cover
            pass

    def oracle_mask(q, k, keep):
        g = q.shape[1] // k.shape[1]
        p = torch.softmax(
            (q.float() @ k.float().repeat_interleave(g, 1).transpose(-1, -2)) * q.shape[-1] ** -0.5
            + (torch.full((n, n), float("-inf"), device=q.device).triu(1) if causal else 0),
            -1,
        )
        nb = math.ceil(n / block)
        pad = nb * block - n
        mass = F.pad(p, (0, pad, 0, pad)).view(*p.shape[:2], nb, block, nb, block).sum(dim=(3, 5))
        return BlockSparseMask.from_scores(mass, block, n, n, topk=keep, causal=causal)

    nb = math.ceil(n / block)
    for keep in sorted({max(1, nb // 8), max(1, nb // 4), max(1, nb // 2)}):
        run = masked(lambda q, k, keep=keep: oracle_mask(q, k, keep))
        out.append(Method(f"oracle top-{keep} blocks", "oracle-blocks", {"topk_blocks": keep, "block": block}, run,
                          float("nan"), float("nan"), oracle=True, extra={"estimate_flops": 2.0 * dense * d}))  # fmt: skip
    return out


def method_suite(
    n: int, d: int, causal: bool, families: Iterable[str] | None = None, *, feature_map: str = "cosh"
) -> list[Method]:
    """Every configured method for sequences of length n and head dim d (SEA is added by ``evaluate``).

    ``feature_map`` is the random-feature map of Scatterbrain and of the Performer baseline.
    """
    methods = (
        _scatterbrain_methods(n, d, causal, feature_map)
        + _parts_methods(n, d, causal, feature_map)
        + _combiner_methods(n, d, causal)
        + _spt_methods(n, d, causal)
        + _block_sparse_methods(n, d, causal)
    )
    if families is not None:
        wanted = set(families)
        methods = [m for m in methods if m.family in wanted or m.family.split("-")[0] in wanted]
    return methods


# ----------------------------------------------------------------------------- SEA
def fit_sea_predictor(
    train: list[AttentionSample],
    *,
    budget: int,
    steps: int,
    lr: float = 2e-3,
    width: int | None = None,
    device=None,
    seed: int = 0,
):
    """A SEAAttention whose mask predictor is distilled (estimation loss) on the given q/k/v.

    ``width`` is T (default 256 causal / 128 encoder, capped by N); gates are fixed at 1.
    """
    from zoo.layers.sea import SEAAttention, sea_distillation_loss

    s0 = train[0]
    B, H, N, D = s0.q.shape
    Hkv = s0.k.shape[1]
    width = min(width or (256 if s0.causal else 128), 4 * math.ceil(N / 4))
    torch.manual_seed(seed)
    sea = SEAAttention(H * D, H, Hkv, causal=s0.causal, k=budget, compressed_len=width, max_len=max(N, 16),
                       fixed_gates=True, output_norm=False)  # fmt: skip
    sea = sea.to(device or s0.q.device)
    params = [p for n_, p in sea.named_parameters() if n_.startswith("predictor") or n_ == "position_code"]
    opt = torch.optim.Adam(params, lr=lr)
    for step in range(steps):
        s = train[step % len(train)]
        q, k, v = (t.to(sea.projection.device).float() for t in (s.q, s.k, s.v))
        with torch.no_grad():
            g = H // Hkv
            logits = (q @ k.repeat_interleave(g, 1).transpose(-1, -2)) * D**-0.5
            if s.causal:
                logits = logits.masked_fill(
                    torch.ones(N, N, dtype=torch.bool, device=q.device).triu(1), float("-inf")
                )
            teacher = torch.softmax(logits, -1)
        scores, _ = sea.estimate(q, k, v)
        probs = torch.softmax(scores.float(), -1)
        loss = sea_distillation_loss(_Probs(probs), teacher, causal=s.causal)["estimation"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sea.eval()
    return sea


class _Probs:
    """Just the estimated probabilities, for ``sea_distillation_loss``'s estimation term."""

    def __init__(self, probs: Tensor) -> None:
        self.estimated_probs = probs


def _sea_methods(sea, n: int, d: int, heads: int, causal: bool, budgets: Iterable[int]) -> list[Method]:
    out = []
    width = sea.compressed_len
    m = sea.num_features
    hd = sea.head_dim
    cnn = 2 * (9 * (2 * heads) ** 2 * n * width / 4) * 2 + 2 * (2 * heads) * heads * n * width
    predictor = heads * n * (2 * 3 * hd * 2 * hd + 2 * 2 * hd * width / 2) + cnn

    def runner(budget: int):
        def run(q, k, v):
            with torch.no_grad():
                details = sea.attend(q.float(), k.float(), v.float(), return_details=True, budget=budget)
            run.kept = details.kept_keys.double().mean().item()
            return details.output

        run.kept = None
        return run

    for k in budgets:
        run = runner(k)
        out.append(Method(f"sea k={k}", "sea", {"k": k, "compressed_len": width}, run, float("nan"), float("nan"),
                          extra={"perf_flops": _performer_flops(n, d, m, causal, dv=2 * d),
                                 "predictor_flops_per_head": predictor / heads, "width": width}))  # fmt: skip
    return out


# ----------------------------------------------------------------------------- evaluation
def _finish_budget(method: Method, n: int, d: int, causal: bool, run) -> tuple[float, float]:
    dense = _dense_entries(n, causal)
    if method.family == "sea":
        kept = run.kept * n
        entries = kept + n * method.extra["width"]
        flops = 4.0 * kept * d + method.extra["perf_flops"] + method.extra["predictor_flops_per_head"]
        return entries / dense, flops / (4.0 * dense * d)
    if math.isnan(method.score_entries):
        density = getattr(run, "last_density", None) or 1.0
        entries = density * dense
        return density, (4.0 * entries * d + method.extra.get("estimate_flops", 0.0)) / (4.0 * dense * d)
    return method.score_entries / dense, method.flops / (4.0 * dense * d)


def evaluate(
    samples: list[AttentionSample],
    *,
    families: Iterable[str] | None = None,
    sea_train: list[AttentionSample] | None = None,
    sea_steps: int = 200,
    device=None,
    method_names: Iterable[str] | None = None,
    sea_width: int | None = None,
    feature_map: str = "cosh",
) -> list[dict]:
    """One row per (sample, method): relative error vs fp64 exact attention and the budget fractions.

    ``families`` / ``method_names`` restrict the suite (names as in ``method_suite``, e.g. "sea k=16").
    """
    names = set(method_names) if method_names is not None else None
    rows = []
    for s in samples:
        q, k, v = (t.to(device) if device else t for t in (s.q, s.k, s.v))
        B, H, N, D = q.shape
        exact = exact_attention(q, k, v, s.causal)
        methods = method_suite(N, D, s.causal, families, feature_map=feature_map)
        if names is not None:
            methods = [m for m in methods if m.name in names]
        if (families is None or "sea" in set(families)) and (
            names is None or any(x.startswith("sea") for x in names)
        ):
            train = [t for t in (sea_train or []) if t.q.shape == s.q.shape and t.causal == s.causal] or [s]
            sea = fit_sea_predictor(
                train, budget=max(1, N // 16), steps=sea_steps, width=sea_width, device=q.device
            )
            sea_methods = _sea_methods(
                sea, N, D, H, s.causal, sorted({max(1, N // 32), max(1, N // 16), max(1, N // 8)})
            )
            methods += [m for m in sea_methods if names is None or m.name in names]
        for m in methods:
            start = time.perf_counter()
            try:
                out = m.run(q.float(), k.float(), v.float())
            except Exception as err:  # a method that cannot run here is recorded, the others go on
                log.warning("%s on %s: %s", m.name, s.name, err)
                rows.append({"sample": s.name, "N": N, "method": m.name, "family": m.family,
                             "failed": f"{type(err).__name__}: {str(err)[:200]}"})  # fmt: skip
                continue
            score_frac, flops_frac = _finish_budget(m, N, D, s.causal, m.run)
            rows.append(
                {
                    "sample": s.name,
                    "source": s.source,
                    "N": N,
                    "D": D,
                    "H": H,
                    "causal": s.causal,
                    "method": m.name,
                    "family": m.family,
                    "params": m.params,
                    "oracle": m.oracle,
                    "rel_error": relative_error(out, exact),
                    "score_fraction": score_frac,
                    "flops_fraction": flops_frac,
                    "seconds": round(time.perf_counter() - start, 4),
                }
            )
    return rows


def _largest_window(n: int, causal: bool, sparse: str, d: int, budget: float, kind: str, start: int) -> int:
    """Largest local window / LSH bucket whose sparse-only cost stays within the budget."""

    def cost(w: int) -> float:
        entries = _local_band_entries(n, w, causal) if sparse == "local" else n * w / (2 if causal else 1)
        return entries * (4.0 * d if kind == "flops" else 1.0)

    w = start
    while w < n and cost(w + 1) <= budget:
        w += 1
    return w


def _scatterbrain_error(q, k, v, exact, *, sparse, num_features, window, causal, trials, feature_map):
    """Scatterbrain's relative error (and per head) averaged over ``trials`` draws of features and hashes."""
    from zoo.layers.scatterbrain import draw_feature_projection, scatterbrain_attention

    errors, heads = [], []
    for trial in range(trials):
        gen = torch.Generator().manual_seed(trial)
        proj = draw_feature_projection(num_features, q.shape[-1], feature_map, generator=gen, device=q.device)
        hv = torch.randn(1, q.shape[-1] + 2, generator=gen).to(q.device)
        out = scatterbrain_attention(q, k, v, sparse=sparse, window=window, causal=causal, projection=proj,
                                     hash_vectors=hv, feature_map=feature_map)  # fmt: skip
        errors.append(relative_error(out, exact))
        heads.append(_per_head_error(out, exact))
    return sum(errors) / trials, (sum(heads) / trials).tolist()


def _scatterbrain_cost(n: int, d: int, causal: bool, sparse: str, m: int, window: int, kind: str) -> float:
    """Scatterbrain's budget: attention FLOPs (``kind="flops"``) or stored attention entries."""
    entries = (
        _local_band_entries(n, window, causal) if sparse == "local" else n * window / (2 if causal else 1)
    )
    if kind == "flops":
        return _performer_flops(n, d, m, causal) + entries * (4.0 * d + 2.0 * m + 2.0)
    return n * m + entries


def _split_budget(n: int, d: int, causal: bool, sparse: str, budget: float, kind: str, share: float):
    """Scatterbrain's (features, window) spending about ``share`` of ``budget`` on features, the rest on the support."""
    m = 2  # cosh features come in pairs
    while _scatterbrain_cost(n, d, causal, sparse, m + 2, 1, kind) <= budget and (
        _scatterbrain_cost(n, d, causal, sparse, m + 2, 0, kind) <= share * budget
    ):
        m += 2
    w = 1
    while w < n and _scatterbrain_cost(n, d, causal, sparse, m, w + 1, kind) <= budget:
        w += 1
    return m, w


def equal_budget_scatterbrain(
    samples: list[AttentionSample],
    *,
    num_features: int = 32,
    window: int = 32,
    trials: int = 3,
    device=None,
    feature_map: str = "cosh",
    feature_shares: Sequence[float] = (),
) -> list[dict]:
    """Scatterbrain vs its sparse part and its low-rank part alone, each given Scatterbrain's budget.

    Two budgets: ``flops`` (attention FLOPs, features and correction included) and ``entries``
    (stored attention entries: N m for a rank-m factor, one per support entry, as the paper
    compares a rank-r + s-sparse matrix with rank-(r + s/N) and (N r + s)-sparse ones). Sparse-only
    gets the largest window (local band) or bucket (LSH) within the budget, low-rank-only the most
    random features; errors are averaged over ``trials`` draws of features and hashes. Scatterbrain
    and low-rank-only use the same ``feature_map`` ("cosh" or "positive").

    ``feature_shares``: also run Scatterbrain at other splits of the same budget (about that share
    spent on features, the rest on the support) and report the best split found on the sample
    (``best_split``: an upper bound on what tuning the split could give).
    """
    from zoo.layers.scatterbrain import (
        draw_feature_projection,
        performer_attention,
        scatterbrain_attention,
    )

    rows = []
    for s in samples:
        q, k, v = (t.to(device).float() if device else t.float() for t in (s.q, s.k, s.v))
        B, H, N, D = q.shape
        exact = exact_attention(q, k, v, s.causal)
        for sparse in ("local", "lsh"):
            budgets = {
                kind: _scatterbrain_cost(N, D, s.causal, sparse, num_features, window, kind)
                for kind in ("flops", "entries")
            }
            common = dict(sparse=sparse, causal=s.causal, trials=trials, feature_map=feature_map)
            sb_mean, sb_per_head = _scatterbrain_error(
                q, k, v, exact, num_features=num_features, window=window, **common
            )
            for kind, budget in budgets.items():
                w2 = _largest_window(N, s.causal, sparse, D, budget, kind, window)
                if kind == "flops":
                    m2 = num_features
                    while _performer_flops(N, D, m2 + 1, s.causal) <= budget:
                        m2 += 1
                else:
                    m2 = max(num_features, int(budget // N))
                sp_err, lr_err, sp_heads, lr_heads = [], [], [], []
                for trial in range(trials):
                    gen = torch.Generator().manual_seed(trial)
                    hv = torch.randn(1, D + 2, generator=gen).to(q.device)
                    proj2 = draw_feature_projection(m2, D, feature_map, generator=gen, device=q.device)
                    sp = scatterbrain_attention(q, k, v, sparse=sparse, window=w2, causal=s.causal, mode="sparse",
                                                hash_vectors=hv)  # fmt: skip
                    lr = performer_attention(q, k, v, proj2, causal=s.causal, feature_map=feature_map)
                    sp_err.append(relative_error(sp, exact))
                    lr_err.append(relative_error(lr, exact))
                    sp_heads.append(_per_head_error(sp, exact))
                    lr_heads.append(_per_head_error(lr, exact))
                heads = {
                    "scatterbrain": sb_per_head,
                    "sparse_only": (sum(sp_heads) / trials).tolist(),
                    "lowrank_only": (sum(lr_heads) / trials).tolist(),
                }
                best_heads = [
                    sb < min(sp, lr)
                    for sb, sp, lr in zip(heads["scatterbrain"], heads["sparse_only"], heads["lowrank_only"])
                ]
                mean = {
                    "scatterbrain": sb_mean,
                    "sparse_only": sum(sp_err) / trials,
                    "lowrank_only": sum(lr_err) / trials,
                }
                rows.append(
                    {
                        "sample": s.name,
                        "N": N,
                        "causal": s.causal,
                        "sparse": sparse,
                        "budget": kind,
                        "scatterbrain": {"num_features": num_features, "window": window, kind: budget},
                        "feature_map": feature_map,
                        "sparse_only": {"window": w2},
                        "lowrank_only": {"num_features": m2},
                        "rel_error": mean,
                        "ratio_vs_sparse_only": mean["scatterbrain"] / mean["sparse_only"],
                        "ratio_vs_lowrank_only": mean["scatterbrain"] / mean["lowrank_only"],
                        "scatterbrain_best": mean["scatterbrain"]
                        < min(mean["sparse_only"], mean["lowrank_only"]),
                        "rel_error_per_head": heads,
                        "scatterbrain_best_heads": sum(best_heads),
                        "heads": len(best_heads),
                    }
                )
                if feature_shares:
                    splits = [{"num_features": num_features, "window": window, "rel_error": sb_mean}]
                    for share in feature_shares:
                        m, w = _split_budget(N, D, s.causal, sparse, budget, kind, share)
                        if any((m, w) == (x["num_features"], x["window"]) for x in splits):
                            continue
                        err, _ = _scatterbrain_error(q, k, v, exact, num_features=m, window=w, **common)
                        splits.append({"num_features": m, "window": w, "rel_error": err})
                    best = min(splits, key=lambda x: x["rel_error"])
                    rows[-1]["splits"] = splits
                    rows[-1]["best_split"] = {
                        **best,
                        "ratio_vs_sparse_only": best["rel_error"] / mean["sparse_only"],
                        "ratio_vs_lowrank_only": best["rel_error"] / mean["lowrank_only"],
                        "below_both": best["rel_error"] < min(mean["sparse_only"], mean["lowrank_only"]),
                    }
    return rows


# ----------------------------------------------------------------------------- GPU sweep
def _pow2_sqrt(q: Tensor) -> int:
    """A power-of-two segment length near sqrt(N) (the kernel path needs multiples of 16)."""
    return 1 << round(math.log2(q.shape[-2]) / 2)


def sweep(
    lengths: Iterable[int],
    *,
    heads: int = 8,
    head_dim: int = 64,
    causal: bool = True,
    device: str = "cuda",
    dtype: torch.dtype = torch.float16,
    seconds_per_method: float = 30.0,
    total_seconds: float = 150.0,
    reps: int = 3,
) -> list[dict]:
    """Time (median of ``reps``) and peak memory of one attention call per method and length."""
    from zoo.layers.combiner import combiner_attention
    from zoo.layers.scatterbrain import scatterbrain_attention
    from zoo.layers.sea import SEAAttention
    from zoo.layers.spt_attention import build_codebook, pq_sparse_attention

    cuda = str(device).startswith("cuda")
    rows, dead, spent = [], set(), {}
    start_all = time.perf_counter()
    sea = SEAAttention(heads * head_dim, heads, causal=causal, k=256, max_len=max(lengths)).to(device).eval()

    def eager(q, k, v):
        s = (q @ k.transpose(-1, -2)) * head_dim**-0.5
        if causal:
            s = s.masked_fill(
                torch.ones(s.shape[-1], s.shape[-1], dtype=torch.bool, device=q.device).triu(1), float("-inf")
            )
        return torch.softmax(s.float(), -1).to(q.dtype) @ v

    methods: dict[str, Callable] = {
        "dense-sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
        "dense-eager": eager,
        "scatterbrain-lsh m=64 w=64": lambda q, k, v: scatterbrain_attention(q, k, v, 64, "lsh", 64, causal),
        "scatterbrain-local m=64 w=64": lambda q, k, v: scatterbrain_attention(
            q, k, v, 64, "local", 64, causal
        ),
        "performer m=64": lambda q, k, v: scatterbrain_attention(
            q, k, v, 64, "lsh", 64, causal, mode="lowrank"
        ),
        "combiner-fixed": lambda q, k, v: combiner_attention(q, k, v, "fixed", _pow2_sqrt(q), causal),
        "combiner-logsparse": lambda q, k, v: combiner_attention(q, k, v, "logsparse", None, causal),
        "combiner-axial": lambda q, k, v: combiner_attention(q, k, v, "axial", _pow2_sqrt(q), causal),
        "spt top_k=N/8": lambda q, k, v: pq_sparse_attention(q, k, v, None, causal, codebook=codebook),
        "sea k=256": lambda q, k, v: sea.attend(q.float(), k.float(), v.float()),
    }
    if causal:
        methods["combiner-mixture"] = lambda q, k, v: combiner_attention(
            q, k, v, "mixture", _pow2_sqrt(q), causal
        )
    try:
        from zoo.layers.xattention import XAttention

        xa = XAttention(block_size=128, stride=8, threshold=0.9)
        methods["xattention tau=0.9"] = lambda q, k, v: xa(q, k, v, causal=causal)
    except ImportError:  # pragma: no cover
        pass
    gen = torch.Generator().manual_seed(0)
    codebook = None
    for n in lengths:
        shape = (1, heads, n, head_dim)
        q = torch.randn(shape, generator=gen).to(device, dtype)
        k = torch.randn(shape, generator=gen).to(device, dtype)
        v = torch.randn(shape, generator=gen).to(device, dtype)
        if codebook is None:
            codebook = build_codebook(q.float(), k.float(), generator=gen)
        for name, fn in methods.items():
            row = {
                "method": name,
                "N": n,
                "heads": heads,
                "head_dim": head_dim,
                "causal": causal,
                "dtype": str(dtype),
            }
            if name in dead or time.perf_counter() - start_all > total_seconds:
                row["skipped"] = (
                    "earlier length too slow or out of memory" if name in dead else "sweep time budget spent"
                )
                rows.append(row)
                continue
            try:
                with torch.no_grad():
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                    t0 = time.perf_counter()
                    fn(q, k, v)  # warm up (compiles kernels)
                    if cuda:
                        torch.cuda.synchronize()
                    warm = time.perf_counter() - t0
                    times = [warm]
                    if warm > 10.0:  # too slow to repeat: report the first call
                        row["note"] = "single first call (includes compilation)"
                    else:
                        if cuda:
                            torch.cuda.reset_peak_memory_stats()
                        times = []
                        for _ in range(1 if warm > 2.0 else reps):
                            t0 = time.perf_counter()
                            fn(q, k, v)
                            if cuda:
                                torch.cuda.synchronize()
                            times.append(time.perf_counter() - t0)
                row["ms"] = round(1e3 * sorted(times)[len(times) // 2], 3)
                if cuda:
                    row["peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
                spent[name] = spent.get(name, 0.0) + warm + sum(times)
                if spent[name] > seconds_per_method or min(times) > 5.0:
                    dead.add(name)
            except torch.OutOfMemoryError:
                row["skipped"] = "out of memory"
                dead.add(name)
            except Exception as err:  # recorded; the sweep goes on with the other methods
                row["skipped"] = f"{type(err).__name__}: {str(err)[:200]}"
                dead.add(name)
            if cuda:
                torch.cuda.empty_cache()
            rows.append(row)
            log.info("sweep %s N=%d %s", name, n, row.get("ms", row.get("skipped")))
    return rows


# ----------------------------------------------------------------------------- plot
FAMILY_STYLE = {
    "sea": ("tab:red", "*"),
    "scatterbrain-lsh": ("tab:blue", "o"),
    "scatterbrain-local": ("tab:cyan", "o"),
    "sparse-local": ("tab:gray", "s"),
    "lowrank-performer": ("tab:olive", "v"),
    "combiner-fixed": ("tab:green", "D"),
    "combiner-logsparse": ("tab:green", "^"),
    "combiner-axial": ("tab:green", "<"),
    "combiner-mixture": ("tab:green", ">"),
    "spt": ("tab:purple", "P"),
    "xattention": ("tab:orange", "X"),
    "pbs": ("tab:brown", "X"),
    "minference": ("tab:pink", "X"),
    "oracle-blocks": ("black", "x"),
}


def plot(result: dict, path: str | Path) -> Path | None:
    """error vs FLOPs fraction (one marker per method and sample), and the GPU sweep when present."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (rerun with --plot-only on a machine that has it)")
        return None
    rows = [r for r in result.get("rows", []) if "rel_error" in r]
    has_sweep = any("ms" in r for r in result.get("sweep", []))
    fig, axes = plt.subplots(1, 2 if has_sweep else 1, figsize=(13 if has_sweep else 7, 5), squeeze=False)
    ax = axes[0, 0]
    seen = set()
    for r in rows:
        color, marker = FAMILY_STYLE.get(r["family"], ("gray", "."))
        label = r["family"] if r["family"] not in seen else None
        seen.add(r["family"])
        ax.scatter(max(r["flops_fraction"], 1e-4), max(r["rel_error"], 1e-6), c=color, marker=marker, label=label,
                   alpha=0.8, s=40)  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("attention FLOPs / dense")
    ax.set_ylabel("relative output error vs exact")
    srcs = sorted({r["sample"] for r in rows})
    ax.set_title(f"real attention ({len(srcs)} layers, N={sorted({r['N'] for r in rows})})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    if has_sweep:
        ax2 = axes[0, 1]
        by = {}
        for r in result["sweep"]:
            if "ms" in r:
                by.setdefault(r["method"], []).append((r["N"], r["ms"]))
        cmap = plt.get_cmap("tab20")
        for i, (name, pts) in enumerate(sorted(by.items())):
            pts.sort()
            style = "-" if name.startswith(("dense", "sea", "xattention")) else "--"
            ax2.plot(
                [p[0] for p in pts], [p[1] for p in pts], style, marker="o", color=cmap(i % 20), label=name
            )
        ax2.set_xscale("log", base=2)
        ax2.set_yscale("log")
        ax2.set_xlabel("N")
        ax2.set_ylabel("ms per call")
        ax2.set_title(f"one attention call, {result.get('gpu', result.get('device', ''))}", fontsize=9)
        ax2.grid(True, which="both", alpha=0.3)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- sources and the command
def lm_samples(
    *,
    checkpoint: str | None,
    text: str | None,
    train_seconds: float,
    length: int,
    windows: int,
    device,
    dim: int = 256,
    depth: int = 4,
    heads: int = 4,
    batch: int = 16,
    save_to: str | Path | None = None,
) -> tuple[list[AttentionSample], list[AttentionSample], dict]:
    """q/k/v of every layer of the byte LM on held-out text: (evaluation samples, SEA training samples, info)."""
    from zoo import checkpoints
    from zoo.layers.sea_distill import ByteLM, LMConfig, evaluate_perplexity, load_text_corpus, train_lm

    raw = torch.frombuffer(bytearray(load_text_corpus(text)), dtype=torch.uint8)
    split = int(0.95 * raw.numel())
    cfg = LMConfig(dim=dim, depth=depth, num_heads=heads, max_len=max(length, 16))
    model = ByteLM(cfg).to(device)
    info: dict = {
        "lm": {"dim": dim, "depth": depth, "heads": heads, "length": length},
        "text": {
            "path": str(text) if text else "default (KJV via bible-kjv-text, cached)",
            "bytes": int(raw.numel()),
        },
    }
    if checkpoint:
        checkpoints.load_into(model, checkpoint)
        info["lm"]["checkpoint"] = str(checkpoint)
    else:
        info["lm"]["training"] = train_lm(model, raw[:split], seconds=train_seconds, max_steps=100000, batch=batch,
                                          length=length, lr=1e-3, device=device)  # fmt: skip
        if save_to is not None:
            info["lm"]["weights"] = str(checkpoints.save(model.state_dict(), save_to))
    info["lm"]["val_perplexity"] = round(evaluate_perplexity(model, raw[split:], length, 16, 8, device), 4)
    model.eval()
    val = raw[split:]
    step = (val.numel() - length - 1) // max(windows, 1)
    tokens = torch.stack([val[i * step : i * step + length] for i in range(windows)]).long().to(device)
    with torch.no_grad(), capture_sdpa_qkv(model, max_per_module=1) as found:
        model(tokens)
    evals, trains = [], []
    for s in found:
        src = f"ByteLM on held-out KJV text ({s.name})"
        evals.append(AttentionSample(f"lm.{s.name}", s.q[-1:], s.k[-1:], s.v[-1:], s.causal, src))
        trains += [AttentionSample(f"lm.{s.name}.train{i}", s.q[i : i + 1], s.k[i : i + 1], s.v[i : i + 1], s.causal,
                                   src) for i in range(windows - 1)]  # fmt: skip
    return evals, trains, info


def read_token_file(path: str | Path) -> Tensor:
    """A flat token file (``zoo train lm``'s train.bin / val.bin) as int64; the dtype comes from
    meta.json beside it (default uint16)."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokens: no such file {path}")
    meta = path.parent / "meta.json"
    dtype = json.loads(meta.read_text()).get("dtype", "uint16") if meta.is_file() else "uint16"
    return torch.from_numpy(np.fromfile(str(path), dtype=dtype).astype("int64"))


def model_samples(
    model: nn.Module, tokens: Tensor, *, length: int, windows: int, label: str, device
) -> tuple[list[AttentionSample], list[AttentionSample]]:
    """q/k/v of every SDPA attention of a token model on ``windows`` evenly spaced windows of ``tokens``.

    Hugging Face Llama attention calls SDPA after the rotary embedding, so q and k are captured with
    RoPE applied, k and v with their own (GQA) heads. Returns (one window per layer for evaluation,
    the other windows for fitting SEA's predictor).
    """
    if tokens.numel() < length + windows:
        raise ValueError(f"tokens: need at least {length + windows} tokens, got {tokens.numel()}")
    step = (tokens.numel() - length) // max(windows, 1)
    batch = torch.stack([tokens[i * step : i * step + length] for i in range(windows)]).to(device)
    model.eval()
    with torch.no_grad(), capture_sdpa_qkv(model, max_per_module=1) as found:
        model(batch)
    evals, trains = [], []
    for s in found:
        src = f"{label} ({s.name}, q and k after RoPE)" + (f"; {s.source}" if s.source else "")
        evals.append(AttentionSample(f"{label}.{s.name}", s.q[-1:], s.k[-1:], s.v[-1:], s.causal, src))
        trains += [AttentionSample(f"{label}.{s.name}.train{i}", s.q[i : i + 1], s.k[i : i + 1], s.v[i : i + 1],
                                   s.causal, src) for i in range(windows - 1)]  # fmt: skip
    return evals, trains


def run(args) -> dict:
    """The ``zoo eval approx-attention`` handler (see ``commands.py`` for the flags)."""
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{args.name}.json"
    if args.plot_only:
        result = json.loads(Path(args.plot_only).read_text())
        png = plot(result, out_dir / f"{args.name}.png")
        print(f"wrote {png}")
        return result
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    result: dict = {
        "command": getattr(args, "command_line", ""),
        "device": device,
        "torch": torch.__version__,
    }
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name(0)
    samples: list[AttentionSample] = []
    sea_train: list[AttentionSample] = []
    for path in args.qkv or []:
        samples += load_samples(path)
        sidecar = Path(path).with_suffix(".json")  # written by the capture scripts: where the q/k/v came from
        if sidecar.is_file():
            info = json.loads(sidecar.read_text())
            keep = (
                "checkpoint",
                "checkpoint_sha256",
                "model",
                "task",
                "split",
                "accuracy_on_these",
                "command",
            )
            result.setdefault("qkv_sources", []).append(
                {"qkv": str(path), **{k: info[k] for k in keep if k in info}}
            )
    source = getattr(args, "model_source", None)  # (model, tokens, info) built by the command
    if source is not None:
        model, tokens, info = source
        evals, trains = model_samples(model.to(device), tokens, length=args.length, windows=args.windows,
                                      label=info["model"], device=device)  # fmt: skip
        samples += evals[: args.max_samples]
        sea_train += trains
        result["model_source"] = info
        if args.save_qkv:
            save_samples(evals, out_dir / f"{args.name}_qkv.safetensors")
    if args.lm or not samples:
        evals, trains, info = lm_samples(checkpoint=args.lm_checkpoint, text=args.text, train_seconds=args.lm_seconds,
                                         length=args.length, windows=args.windows, device=device, dim=args.lm_dim,
                                         depth=args.lm_depth, heads=args.lm_heads, batch=args.lm_batch,
                                         save_to=out_dir / f"{args.name}_lm.safetensors")  # fmt: skip
        samples += evals[: args.max_samples]
        sea_train += trains
        result.update(info)
        if args.save_qkv:
            save_samples(evals, out_dir / f"{args.name}_qkv.safetensors")
    families = args.families
    t0 = time.perf_counter()
    feature_map = getattr(args, "sb_feature_map", "cosh")
    result["feature_map"] = feature_map
    result["rows"] = evaluate(
        samples, families=families, sea_train=sea_train, sea_steps=args.sea_steps, device=device,
        feature_map=feature_map,
    )  # fmt: skip
    result["scatterbrain_equal_budget"] = equal_budget_scatterbrain(
        samples, device=device, num_features=args.sb_features, window=args.sb_window, trials=args.sb_trials,
        feature_map=feature_map, feature_shares=getattr(args, "sb_feature_shares", None) or (),
    )  # fmt: skip
    result["evaluate_seconds"] = round(time.perf_counter() - t0, 1)
    result["summary"] = _equal_budget_summary(result["scatterbrain_equal_budget"])
    if args.sweep:
        lengths = [n for n in (1024, 2048, 4096, 8192, 16384, 32768, 65536) if n <= args.sweep_max_n]
        result["sweep"] = sweep(lengths, device=device, total_seconds=args.sweep_seconds, causal=True)
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    json_path.write_text(json.dumps(result, indent=1, default=str))
    png = plot(result, out_dir / f"{args.name}.png")
    _print_table(result)
    print(f"wrote {json_path}" + (f" and {png}" if png else ""))
    return result


def _equal_budget_summary(rows: list[dict]) -> dict:
    """Per (budget, support): how often Scatterbrain beats both parts, and the median error ratios."""
    out = {}
    for key in sorted({(r["budget"], r["sparse"]) for r in rows}):
        sel = [r for r in rows if (r["budget"], r["sparse"]) == key]
        med = lambda xs: sorted(xs)[len(xs) // 2]
        out[f"{key[0]}/{key[1]}"] = {
            "samples": len(sel),
            "scatterbrain_best_fraction": sum(r["scatterbrain_best"] for r in sel) / len(sel),
            "median_ratio_vs_sparse_only": med([r["ratio_vs_sparse_only"] for r in sel]),
            "median_ratio_vs_lowrank_only": med([r["ratio_vs_lowrank_only"] for r in sel]),
        }
        tuned = [r["best_split"] for r in sel if "best_split" in r]
        if tuned:
            out[f"{key[0]}/{key[1]}"]["best_split"] = {
                "below_both_fraction": sum(b["below_both"] for b in tuned) / len(tuned),
                "median_ratio_vs_sparse_only": med([b["ratio_vs_sparse_only"] for b in tuned]),
                "median_ratio_vs_lowrank_only": med([b["ratio_vs_lowrank_only"] for b in tuned]),
            }
    return out


def _print_table(result: dict) -> None:
    best: dict[str, dict] = {}
    for r in result.get("rows", []):
        if "rel_error" not in r:
            print(f"{r['method']:34s} failed: {r['failed']}")
            continue
        key = r["method"]
        agg = best.setdefault(key, {"family": r["family"], "err": [], "flops": [], "score": []})
        agg["err"].append(r["rel_error"])
        agg["flops"].append(r["flops_fraction"])
        agg["score"].append(r["score_fraction"])
    print(f"{'method':34s} {'rel.err':>8s} {'flops/dense':>11s} {'scores/dense':>12s}")
    for name, a in sorted(best.items(), key=lambda kv: sum(kv[1]["flops"]) / len(kv[1]["flops"])):
        n = len(a["err"])
        print(f"{name:34s} {sum(a['err']) / n:8.4f} {sum(a['flops']) / n:11.4f} {sum(a['score']) / n:12.4f}")
    for r in result.get("scatterbrain_equal_budget", []):
        e = r["rel_error"]
        print(
            f"equal {r['budget']} {r['sample']} {r['sparse']}: scatterbrain {e['scatterbrain']:.4f}  "
            f"sparse-only {e['sparse_only']:.4f} (w={r['sparse_only']['window']})  "
            f"low-rank-only {e['lowrank_only']:.4f} (m={r['lowrank_only']['num_features']})"
        )
