"""SEA (arXiv 2310.01777) memory: queries in chunks, no N x N attention state in inference or training."""

import torch
import torch.nn.functional as F

import zoo.layers.sea as sea_module
from zoo.layers.sea import SEAAttention, compressed_column_of_key, sparse_attention_on_columns
from zoo.layers.sea_distill import PeakLiveBytes


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _sea_peak(n: int) -> tuple[int, int, int]:
    """Peak live bytes of a no-grad SEA call at length n, its largest tensor, and the bytes of one
    (B, H, n, n) fp32 matrix."""
    torch.manual_seed(0)
    B, H, D = 1, 4, 16
    m = SEAAttention(H * D, H, causal=True, k=16, compressed_len=64, max_len=n).eval()
    q, k, v = (torch.randn(B, H, n, D) for _ in range(3))
    with torch.no_grad(), PeakLiveBytes() as tracker:
        m.attend(q, k, v)
    return tracker.peak, tracker.largest[0], B * H * n * n * 4


def test_inference_never_holds_an_n_by_n_attention_matrix():
    peak, largest, one_matrix = _sea_peak(2048)
    assert largest <= one_matrix / 8, (largest, one_matrix)
    assert peak < 0.6 * one_matrix, (peak, one_matrix)


def test_inference_memory_grows_linearly_not_quadratically():
    small = _sea_peak(1024)[0]
    large = _sea_peak(2048)[0]
    assert large < 2.5 * small, (small, large)


def test_peak_tracker_counts_what_is_alive_at_once():
    with PeakLiveBytes() as tracker:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 8000 alive
        del a
        c = b + 1  # b and c: 8000 alive
        del b, c
        d = torch.zeros(500, dtype=torch.float64)  # 4000 alive
    assert tracker.peak == 8000 and tracker.largest[0] == 4000
    del d


def _saved_for_backward_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of ``fn()``."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_sparse_step_keeps_no_n_by_n_scores_for_the_backward():
    torch.manual_seed(0)
    B, H, N, D, T = 1, 2, 512, 8, 16
    q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
    selected = torch.rand(B, H, N, T) < 0.5
    saved, out = _saved_for_backward_bytes(
        lambda: sparse_attention_on_columns(q, k, v, selected, causal=True, query_chunk=64, path="dense")[0]
    )
    assert saved < 0.25 * B * H * N * N * 4, saved  # chunks are recomputed, not stored
    # the recomputed backward is the backward of masked dense attention
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    col = compressed_column_of_key(N, T, True)
    keep = torch.gather(selected, -1, col.clamp_min(0).expand(B, H, N, N)) & (col >= 0)
    logits = (qd @ kd.transpose(-1, -2)) * D**-0.5
    ref = torch.nan_to_num(torch.softmax(logits.masked_fill(~keep, float("-inf")), -1)) @ vd
    ref.square().sum().backward()
    for got, want in zip(grads, (qd.grad, kd.grad, vd.grad)):
        assert _rel(got.double(), want) < 1e-5


def test_chunked_estimate_rows_equal_the_whole_image():
    torch.manual_seed(0)
    for causal in (False, True):
        m = SEAAttention(32, 4, causal=causal, k=4, compressed_len=16).double()
        q, k, v = (torch.randn(2, 4, 41, 8, dtype=torch.float64) for _ in range(3))
        whole, features = m.estimate(q, k, v)
        for s, e in ((0, 7), (7, 19), (19, 41), (3, 4)):
            assert torch.allclose(m.estimate_rows(features, s, e), whole[:, :, s:e], atol=1e-12, rtol=0)


def test_attend_in_small_chunks_equals_one_chunk(monkeypatch):
    torch.manual_seed(0)
    for causal in (False, True):
        m = SEAAttention(32, 4, num_kv_heads=2, causal=causal, k=6, compressed_len=8, gate_init=0.3).double()
        q = torch.randn(2, 4, 37, 8, dtype=torch.float64, requires_grad=True)
        k, v = (torch.randn(2, 2, 37, 8, dtype=torch.float64) for _ in range(2))
        whole = m.attend(q, k, v, return_details=True)
        (g_whole,) = torch.autograd.grad(whole.output.sum(), q)
        monkeypatch.setattr(sea_module, "_query_chunk", lambda *a: 5)
        parts = m.attend(q, k, v, return_details=True)
        (g_parts,) = torch.autograd.grad(parts.output.sum(), q)
        monkeypatch.undo()
        for name in ("output", "sparse_output", "estimated_probs", "gates", "average_weights"):
            assert torch.allclose(getattr(parts, name), getattr(whole, name), atol=1e-12, rtol=0), name
        assert torch.equal(parts.selected_columns, whole.selected_columns)
        assert torch.equal(parts.kept_keys, whole.kept_keys)
        assert torch.allclose(g_parts, g_whole, atol=1e-12, rtol=0)


def test_dense_limit_holds_in_chunks(monkeypatch):
    monkeypatch.setattr(sea_module, "_query_chunk", lambda *a: 4)
    m = SEAAttention(32, 4, causal=True, k=10**6, compressed_len=16, fixed_gates=True).double()
    q, k, v = (torch.randn(1, 4, 23, 8, dtype=torch.float64) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert _rel(m.attend(q, k, v), ref) < 1e-12
