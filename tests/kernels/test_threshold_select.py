"""Cumulative-threshold block selection (``zoo.kernels.threshold_select``): XAttention
(arXiv 2503.16428) and PBS-Attn (arXiv 2510.21270) rules.

The PyTorch reference is checked against a row-by-row rule written out in Python. The Triton
kernel runs on the CPU through the interpreter in a separate process: this file run as a script
with TRITON_INTERPRET=1 prints one JSON line per case, and the tests below read them. On a GPU
(marker ``gpu``) it runs compiled at realistic sizes (Qb = Kb = 1024).

The kernel sums masses in another order than the reference's sorted cumulative sum, so rows whose
cut lies within ~1e-5 of ``tau * total`` (found with an fp64 ranking) may differ by one block;
every other row, and every row of integer-valued scores, must match exactly.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if __name__ == "__main__":
    sys.path.insert(0, ROOT)

from zoo.kernels.threshold_select import (  # noqa: E402
    threshold_select,
    threshold_select_reference,
    threshold_select_triton,
)

BORDER = 1e-5  # relative distance of a cut from tau * total below which rows may differ


# ------------------------------------------------------------------------------ helpers
def explicit_rule(scores, allowed, forced, tau, rule) -> torch.Tensor:
    """bool keep ``[..., Kb]``, one row at a time in Python; the threshold ``tau * total`` in fp32."""
    kb = scores.shape[-1]
    rows = scores.shape[:-1]
    s = scores.double().reshape(-1, kb).tolist()
    a = allowed.expand(scores.shape).reshape(-1, kb).tolist()
    f = forced.expand(scores.shape).reshape(-1, kb).tolist()
    taus = (tau.expand(rows) if isinstance(tau, torch.Tensor) else torch.full(rows, tau)).reshape(-1).tolist()
    keep = torch.zeros(len(s), kb, dtype=torch.bool)
    for r, (row, ok, must, t) in enumerate(zip(s, a, f, taus)):
        total = sum(row[j] for j in range(kb) if ok[j])
        target = float(torch.tensor(t, dtype=torch.float32) * torch.tensor(total, dtype=torch.float32))
        if t >= 1.0:
            chosen = {j for j in range(kb) if ok[j] or must[j]}
        elif rule == "xattention":  # forced first, their mass counts; at least one block
            chosen = {j for j in range(kb) if must[j]}
            acc = sum(row[j] for j in chosen if ok[j])
            for j in sorted((j for j in range(kb) if ok[j] and not must[j]), key=lambda j: (-row[j], j)):
                if acc < target or not chosen:
                    chosen.add(j)
                    acc += row[j]
                else:
                    break
        else:  # positive allowed blocks best first, forced ones added afterwards
            chosen, acc = set(), 0.0
            for j in sorted((j for j in range(kb) if ok[j] and row[j] > 0), key=lambda j: (-row[j], j)):
                if acc < target:
                    chosen.add(j)
                    acc += row[j]
                else:
                    break
            chosen |= {j for j in range(kb) if must[j]}
        keep[r, sorted(chosen)] = True
    return keep.reshape(scores.shape)


def lists_to_keep(counts: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Dense bool from (counts, ascending ids padded with Kb); checks the list format on the way."""
    kb = ids.shape[-1]
    valid = torch.arange(kb, device=ids.device) < counts[..., None].long()
    assert bool((torch.where(valid, ids, kb) == ids).all()), "padding must be Kb"
    assert bool((ids[..., 1:] >= ids[..., :-1]).all()), "lists must be ascending"
    assert bool((ids[..., 1:] > ids[..., :-1])[valid[..., 1:]].all()), "no repeated ids"
    keep = torch.zeros(*ids.shape[:-1], kb + 1, dtype=torch.bool, device=ids.device)
    keep.scatter_(-1, ids.long(), True)
    return keep[..., :kb]


def borderline_rows(scores, allowed, forced, tau, rule, rel: float = BORDER) -> torch.Tensor:
    """bool ``[...]``: rows where some candidate's fp64 mass-before lies within ``rel * total`` of the cut."""
    s = scores.double()
    a, f = allowed.expand(s.shape), forced.expand(s.shape)
    masked = torch.where(a, s, 0.0)
    total = masked.sum(-1)
    if rule == "xattention":
        candidate, base = a & ~f, torch.where(f, masked, 0.0).sum(-1)
    else:
        candidate, base = a & (masked > 0), torch.zeros_like(total)
    ranked = torch.sort(torch.where(candidate, masked, -1.0), dim=-1, descending=True, stable=True).values
    valid = ranked >= 0
    ranked = ranked.clamp_min(0.0)
    before = base[..., None] + torch.cumsum(ranked, -1) - ranked
    taus = tau.double().expand(total.shape) if isinstance(tau, torch.Tensor) else torch.full_like(total, tau)
    target = taus * total
    near = (valid & ((before - target[..., None]).abs() <= rel * total[..., None])).any(-1)
    return near & (target > 0) & (taus < 1)


def compare(got, want, border: torch.Tensor) -> dict:
    """Row-wise agreement of two (counts, ids) results."""
    differ = (got[0] != want[0]) | (got[1] != want[1]).any(-1)
    return {
        "rows": differ.numel(),
        "differ": int(differ.sum()),
        "differ_outside_border": int((differ & ~border).sum()),
        "border": int(border.sum()),
    }


# ------------------------------------------------------------------------------- inputs
def make_case(name: str, seed: int, device: str = "cpu"):
    """(scores, allowed, forced, tau, rule, exact): tiny inputs with ties, zeros and empty rows."""
    g = torch.Generator().manual_seed(seed)

    def integer(*shape):
        return torch.randint(0, 4, shape, generator=g).float()

    def with_ties_and_zeros(*shape):
        x = torch.rand(*shape, generator=g)
        x[..., ::3] = 0.25
        return torch.where(x < 0.1, 0.0, x)

    exact = name.endswith("integer") or name.startswith("all_zero")
    if name.startswith("xattention"):
        qb, kb = (6, 13) if name != "xattention_pow2_noncausal" else (4, 16)
        q_block = torch.arange(qb)[:, None]
        k_block = torch.arange(kb)[None, :]
        if name == "xattention_pow2_noncausal":
            allowed, forced = torch.ones(qb, kb, dtype=torch.bool), torch.zeros(qb, kb, dtype=torch.bool)
        else:
            allowed = k_block <= q_block + kb - qb
            forced = ((k_block == q_block + kb - qb) | (k_block == 0)) & allowed
            forced[2] = False  # rows with no forced block keep their best candidate
            forced[4] = False
        heads = 4
        tau = torch.tensor([0.0, 0.5, 0.9, 1.0]).view(1, heads, 1)
        scores = integer(1, heads, qb, kb) if exact else with_ties_and_zeros(1, heads, qb, kb)
        scores[0, 1, 0] = 0.0  # an all-zero row
        rule = "xattention"
        if name == "xattention_float_tau":
            tau = 0.9
    elif name.startswith("pbs"):
        batch, kv_heads, group, qb, kb = 1, 2, 2, 4, 11
        allowed = torch.rand(batch, kv_heads, 1, qb, kb, generator=g) < 0.7
        forced = (torch.rand(batch, kv_heads, 1, qb, kb, generator=g) < 0.2) & ~allowed
        allowed[0, 1, 0, 2] = False  # a row with nothing to select
        if exact:
            scores = integer(batch, kv_heads, group, qb, kb)
        else:  # softmax over the allowed blocks, as the layer does
            logits = 2 * torch.randn(batch, kv_heads, group, qb, kb, generator=g)
            scores = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
            scores = scores.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
        scores = torch.where(allowed, scores, 0.0)
        tau = {"pbs_tau_one": 1.0}.get(name, 0.5)
        if name == "pbs_tau_per_head":
            tau = torch.tensor([0.9, 0.0]).view(1, kv_heads, 1, 1)
        rule = "pbs"
    elif name.startswith("all_zero"):
        rule = name.rsplit("_", 1)[1]
        scores = torch.zeros(2, 3, 9)
        allowed = torch.rand(3, 9, generator=g) < 0.6
        forced = (torch.rand(3, 9, generator=g) < 0.2) & (allowed if rule == "xattention" else ~allowed)
        tau = 0.9
    elif name == "folded_row_dims":  # 5 row dims: leading ones folded by the launcher
        rule = "xattention"
        scores = with_ties_and_zeros(2, 1, 2, 1, 3, 7)
        allowed = torch.rand(3, 7, generator=g) < 0.8
        forced = torch.zeros(3, 7, dtype=torch.bool)
        tau = 0.75
    elif name == "single_block":
        rule = "xattention"
        scores = torch.rand(3, 1, generator=g)
        allowed = torch.tensor([[True], [True], [False]])
        forced = torch.tensor([[False], [True], [False]])
        tau = 0.5
    else:
        raise KeyError(name)
    to = dict(device=device)
    tau = tau.to(**to) if isinstance(tau, torch.Tensor) else tau
    return scores.to(**to), allowed.to(**to), forced.to(**to), tau, rule, exact


INTERPRETED_CASES = [
    "xattention_integer",
    "xattention_random",
    "xattention_float_tau",
    "xattention_pow2_noncausal",
    "pbs_integer",
    "pbs_softmax",
    "pbs_tau_per_head",
    "pbs_tau_one",
    "all_zero_xattention",
    "all_zero_pbs",
    "folded_row_dims",
    "single_block",
]


# ---------------------------------------------------------------- interpreter (script mode)
def _interpreted_case(name: str, seed: int) -> dict:
    scores, allowed, forced, tau, rule, exact = make_case(name, seed)
    got = threshold_select_triton(scores, allowed, forced, tau, rule=rule)
    want = threshold_select_reference(scores, allowed, forced, tau, rule=rule)
    lists_to_keep(*got)
    border = (
        torch.zeros_like(want[0], dtype=torch.bool)
        if exact
        else borderline_rows(scores, allowed, forced, tau, rule)
    )
    shapes_ok = got[0].shape == want[0].shape and got[1].shape == want[1].shape
    dtypes_ok = got[0].dtype == got[1].dtype == torch.int32
    return {"exact": exact, "shapes_ok": shapes_ok, "dtypes_ok": dtypes_ok, **compare(got, want, border)}


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1")
    for seed, name in enumerate(INTERPRETED_CASES):
        try:
            row = _interpreted_case(name, seed)
        except Exception as err:  # reported per case by the test
            row = {"error": f"{type(err).__name__}: {err}"}
        print(json.dumps({"name": name, **row}), flush=True)


# -------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", INTERPRETED_CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_equals_row_by_row_rule(name, seed):
    scores, allowed, forced, tau, rule, exact = make_case(name, 100 + seed)
    counts, ids = threshold_select_reference(scores, allowed, forced, tau, rule=rule)
    keep = lists_to_keep(counts, ids)
    assert torch.equal(counts, keep.sum(-1, dtype=torch.int32))
    expected = explicit_rule(scores, allowed, forced, tau, rule)
    differ = (keep != expected).any(-1)
    if exact:
        assert not differ.any()
    else:
        border = borderline_rows(scores, allowed, forced, tau, rule)
        assert not (differ & ~border).any()
        assert border.float().mean() < 0.05


def test_reference_in_float64_equals_the_rule():
    scores, allowed, forced, tau, rule, _ = make_case("pbs_softmax", 7)
    counts, ids = threshold_select_reference(scores.double(), allowed, forced, tau, rule=rule)
    assert torch.equal(lists_to_keep(counts, ids), explicit_rule(scores.double(), allowed, forced, tau, rule))


def test_rules_differ_where_the_papers_do():
    """Forced mass counts (XAttention) or not (PBS); XAttention keeps at least one block."""
    scores = torch.tensor([[0.4, 0.3, 0.2, 0.1, 0.0]])
    allowed = torch.ones(1, 5, dtype=torch.bool)
    forced = torch.tensor([[False, False, True, False, False]])
    kept = {}
    for rule in ("xattention", "pbs"):
        for tau in (0.0, 0.5, 1.0):
            counts, ids = threshold_select_reference(scores, allowed, forced, tau, rule=rule)
            kept[rule, tau] = ids[0, : counts[0]].tolist()
    assert kept["xattention", 0.0] == kept["pbs", 0.0] == [2]
    assert kept["xattention", 0.5] == [0, 2]  # 0.2 forced counts: 0.2 < 0.5, then 0.6 >= 0.5
    assert kept["pbs", 0.5] == [0, 1, 2]  # 0 < 0.5, 0.4 < 0.5, then 0.7; block 2 added after
    assert kept["xattention", 1.0] == kept["pbs", 1.0] == [0, 1, 2, 3, 4]
    zeros, none_forced = torch.zeros(1, 5), torch.zeros_like(forced)
    counts, ids = threshold_select_reference(zeros, allowed, none_forced, 0.9, rule="xattention")
    assert ids[0, : counts[0]].tolist() == [0]  # at least one block: the first of the tied best
    counts, _ = threshold_select_reference(zeros, allowed, none_forced, 0.9, rule="pbs")
    assert counts.tolist() == [0]
    counts, ids = threshold_select_reference(scores, allowed, none_forced, 0.0, rule="xattention")
    assert ids[0, : counts[0]].tolist() == [0]
    counts, _ = threshold_select_reference(scores, allowed, none_forced, 0.0, rule="pbs")
    assert counts.tolist() == [0]


@pytest.fixture(scope="module")
def interpreted() -> dict:
    from .interpreter import run_interpreted  # here: this file also runs as the interpreter's script

    return run_interpreted(os.path.abspath(__file__))


@pytest.mark.parametrize("name", INTERPRETED_CASES)
def test_interpreted_kernel_matches_reference(interpreted, name):
    row = interpreted.get(name)
    assert row is not None, f"{name} did not run"
    assert "error" not in row, row["error"]
    assert row["shapes_ok"] and row["dtypes_ok"]
    assert row["differ_outside_border"] == 0, row
    if row["exact"]:
        assert row["differ"] == 0, row
    assert row["border"] <= 0.05 * row["rows"], row


def test_auto_runs_the_reference_on_cpu_and_wide_rows_fall_back(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    scores, allowed, forced, tau, rule, _ = make_case("xattention_random", 3)
    got = threshold_select(scores, allowed, forced, tau, rule=rule)
    want = threshold_select_reference(scores, allowed, forced, tau, rule=rule)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    wide = torch.rand(1, 8193, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(1, 8193, dtype=torch.bool)
    got = threshold_select(wide, ones, ~ones, 0.5, rule="pbs", backend="triton")  # no CUDA needed
    want = threshold_select_reference(wide, ones, ~ones, 0.5, rule="pbs")
    assert torch.equal(got[1], want[1])


def _ok_inputs():
    return torch.rand(2, 3, 5), torch.ones(3, 5, dtype=torch.bool), torch.zeros(3, 5, dtype=torch.bool)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"scores": torch.ones(2, 3, 5, dtype=torch.int64)}, "scores: expected a float32 or float64"),
        ({"scores": torch.rand(2, 3, 5).half()}, "scores: expected a float32 or float64"),
        ({"scores": torch.rand(2, 3, 0)}, "scores: expected at least one key block"),
        ({"allowed": torch.ones(4, 5, dtype=torch.bool)}, "allowed: expected a bool tensor broadcastable"),
        ({"forced": torch.zeros(3, 5)}, "forced: expected a bool tensor"),
        ({"tau": 1.5}, r"tau: expected a float in \[0, 1\]"),
        ({"tau": -0.1}, r"tau: expected a float in \[0, 1\]"),
        ({"tau": True}, r"tau: expected a float in \[0, 1\]"),
        ({"tau": torch.tensor([0.5, 1.2, 0.9]).view(1, 3)}, r"tau: expected values in \[0, 1\]"),
        ({"tau": torch.tensor([0.5, 0.9])}, "tau: expected a float or a float tensor broadcastable"),
        ({"tau": torch.tensor([1, 0, 1])}, "tau: expected a float or a float tensor broadcastable"),
        ({"rule": "minference"}, "rule: expected one of"),
        ({"backend": "cuda"}, "backend: expected"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, match):
    scores, allowed, forced = _ok_inputs()
    args = {"scores": scores, "allowed": allowed, "forced": forced, "tau": 0.9, "rule": "xattention"}
    args.update(change)
    with pytest.raises(ValueError, match=match):
        threshold_select(**args)


def test_triton_path_refuses_cpu_without_interpreter_and_float64(monkeypatch):
    pytest.importorskip("triton")
    scores, allowed, forced = _ok_inputs()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="scores: the Triton kernel needs a CUDA tensor"):
        threshold_select(scores, allowed, forced, 0.9, rule="pbs", backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # checked before any kernel runs
    with pytest.raises(ValueError, match="scores: the Triton kernel needs float32"):
        threshold_select(scores.double(), allowed, forced, 0.9, rule="pbs", backend="triton")


# ---------------------------------------------------------------------------------- GPU
def _realistic(rule: str, integer: bool, seed: int):
    """Qb = Kb = 1024, 8 rows of heads: XAttention causal structure or PBS grouped masks."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    n = 1024
    if rule == "xattention":
        shape = (1, 8, n, n)
        q_block, k_block = torch.arange(n, device="cuda")[:, None], torch.arange(n, device="cuda")[None, :]
        allowed = k_block <= q_block
        forced = ((k_block == q_block) | (k_block == 0)) & allowed
        forced[::7] = False
        tau = torch.tensor([0.0, 0.5, 0.9, 1.0, 0.9, 0.95, 0.3, 0.8], device="cuda").view(1, 8, 1)
    else:
        shape = (1, 2, 4, n, n)
        allowed = torch.rand(1, 2, 1, n, n, device="cuda", generator=g) < 0.6
        forced = (torch.rand(1, 2, 1, n, n, device="cuda", generator=g) < 0.02) & ~allowed
        tau = 0.9
    if integer:
        scores = torch.randint(0, 8, shape, device="cuda", generator=g).float()
    else:
        logits = 3 * torch.randn(shape, device="cuda", generator=g)
        scores = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num_(0.0)
    return scores, allowed, forced, tau


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["xattention", "pbs"])
@pytest.mark.parametrize("integer", [True, False])
def test_compiled_kernel_matches_reference_at_1024_blocks(rule, integer):
    scores, allowed, forced, tau = _realistic(rule, integer, seed=11)
    got = threshold_select(scores, allowed, forced, tau, rule=rule)  # auto: Triton on CUDA
    want = threshold_select_reference(scores, allowed, forced, tau, rule=rule)
    lists_to_keep(*got)
    if integer:
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    else:
        border = borderline_rows(scores, allowed, forced, tau, rule)
        result = compare(got, want, border)
        assert result["differ_outside_border"] == 0, result
        assert result["border"] <= 0.05 * result["rows"], result


@pytest.mark.gpu
def test_xattention_select_on_gpu_equals_torch_backend():
    from zoo.layers.xattention import XAttention

    scores, *_ = _realistic("xattention", False, seed=12)
    taus = torch.tensor([0.0, 0.5, 0.9, 1.0, 0.9, 0.95, 0.3, 0.8])
    n = 1024 * 64
    fast = XAttention(block_size=64, stride=8, threshold=taus).select(scores, n, n)
    slow = XAttention(block_size=64, stride=8, threshold=taus, backend="torch").select(scores, n, n)
    allowed = torch.ones(1024, 1024, dtype=torch.bool, device="cuda").tril()
    forced = torch.eye(1024, dtype=torch.bool, device="cuda")
    forced[:, 0] = True
    border = borderline_rows(scores, allowed, forced, taus.cuda().view(1, 8, 1), "xattention")
    result = compare((fast.kv_num_blocks, fast.kv_indices), (slow.kv_num_blocks, slow.kv_indices), border)
    assert result["differ_outside_border"] == 0, result


if __name__ == "__main__":
    main()
