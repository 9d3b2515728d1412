"""PoNet mixer: fast path == plain reference == a per-token loop written from the paper (fp64)."""

import math

import pytest
import torch

from zoo.layers import PoNetMixer
from zoo.layers.ponet import (
    equal_segment_ids,
    equal_segment_size,
    ponet_mixing,
    ponet_mixing_reference,
    segment_ids_from_separators,
)


def per_token_ponet(q, k, o, local, segment, num_heads, real, seg_ids, special, kernel):
    """PoNet written token by token and channel by channel with Python floats."""
    B, N, C = q.shape
    D = C // num_heads
    out = torch.zeros(B, N, C, dtype=torch.float64)
    for b in range(B):
        reals = [n for n in range(N) if real[b, n]]
        if not reals:
            continue
        g = [0.0] * C
        for h in range(num_heads):
            chans = range(h * D, (h + 1) * D)
            q_mean = [sum(float(q[b, n, c]) for n in reals) / len(reals) for c in chans]
            scores = [
                sum(qm * float(k[b, n, c]) for qm, c in zip(q_mean, chans)) / math.sqrt(D) for n in reals
            ]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            total = sum(weights)
            for c in chans:
                g[c] = sum(w / total * float(k[b, n, c]) for w, n in zip(weights, reals))
        for t in reals:
            same = [s for s in reals if int(seg_ids[b, s]) == int(seg_ids[b, t])]
            window = [
                s
                for s in range(t - kernel // 2, t + kernel // 2 + 1)
                if 0 <= s < N and real[b, s] and not special[b, s]
            ]
            for c in range(C):
                if special[b, t]:
                    seg_term = loc_term = 0.0
                else:
                    seg_term = max(float(segment[b, s, c]) for s in same)
                    loc_term = max(float(local[b, s, c]) for s in window)
                out[b, t, c] = (g[c] + seg_term) * float(o[b, t, c]) + loc_term
    return out


def random_inputs(B=2, N=11, C=8, dtype=torch.float64, requires_grad=False):
    return [torch.randn(B, N, C, dtype=dtype, requires_grad=requires_grad) for _ in range(5)]


def sentence_batch(B=2, N=11):
    """[CLS] w w [SEP] w w w [SEP] pad ... with a different length per row."""
    real = torch.zeros(B, N, dtype=torch.bool)
    special = torch.zeros(B, N, dtype=torch.bool)
    lengths = [N, N - 3][:B] + [N - 4] * max(0, B - 2)
    for b, n in enumerate(lengths):
        real[b, :n] = True
        special[b, [0, 3, n - 1]] = True
    return real, special


CASES = {
    "no_mask_one_segment": lambda B, N: dict(),
    "padding": lambda B, N: dict(padding_mask=sentence_batch(B, N)[0]),
    "sentences_from_separators": lambda B, N: dict(
        padding_mask=sentence_batch(B, N)[0], segment_ids=segment_ids_from_separators(sentence_batch(B, N)[1])
    ),
    "sentences_clsgsepg": lambda B, N: dict(
        padding_mask=sentence_batch(B, N)[0],
        segment_ids=segment_ids_from_separators(sentence_batch(B, N)[1]),
        special_mask=sentence_batch(B, N)[1],
    ),
    "equal_chunks": lambda B, N: dict(padding_mask=sentence_batch(B, N)[0], segment_size=4),
    "one_exact_chunk": lambda B, N: dict(padding_mask=sentence_batch(B, N)[0], segment_size=N),
    "chunk_longer_than_sequence": lambda B, N: dict(segment_size=2 * N),
    "non_contiguous_ids": lambda B, N: dict(
        padding_mask=sentence_batch(B, N)[0], segment_ids=torch.randint(0, 3, (B, N))
    ),
    "shared_ids_1d": lambda B, N: dict(segment_ids=torch.arange(N) % 4, special_mask=sentence_batch(B, N)[1]),
}


def _loop_arguments(case, B, N):
    real = case.get("padding_mask", torch.ones(B, N, dtype=torch.bool))
    special = case.get("special_mask", torch.zeros(B, N, dtype=torch.bool))
    if "segment_size" in case:
        ids = equal_segment_ids(N, case["segment_size"]).expand(B, N)
    elif "segment_ids" in case:
        ids = case["segment_ids"].expand(B, N)
    else:
        ids = torch.zeros(B, N, dtype=torch.long)
    return real, ids, special


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("kernel", [3, 5])
def test_fast_equals_reference_equals_per_token_loop(name, kernel):
    B, N, C, H = 2, 11, 8, 2
    case = CASES[name](B, N)
    inputs = random_inputs(B, N, C)
    fast = ponet_mixing(*inputs, H, local_kernel=kernel, **case)
    ref = ponet_mixing_reference(*inputs, H, local_kernel=kernel, **case)
    loop = per_token_ponet(*inputs, H, *_loop_arguments(case, B, N), kernel)
    torch.testing.assert_close(ref, loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast, loop, rtol=1e-12, atol=1e-12)


def test_padding_never_reaches_real_tokens():
    torch.manual_seed(1)
    mixer = PoNetMixer(16, 4).double()
    real, special = sentence_batch(3, 13)
    ids = segment_ids_from_separators(special)
    x = torch.randn(3, 13, 16, dtype=torch.float64, requires_grad=True)
    out = mixer(x, real, ids, special_mask=special)
    x2 = x.detach().clone()
    x2[~real] = 1e3 * torch.randn(int((~real).sum()), 16, dtype=torch.float64)  # huge pad content
    out2 = mixer(x2, real, ids, special_mask=special)
    assert torch.equal(out[real], out2[real])
    assert (out[~real] == 0).all() and (out2[~real] == 0).all()
    # nor does any gradient of a real output flow into a pad input
    out[real].sum().backward()
    assert (x.grad[~real] == 0).all() and (x.grad[real] != 0).any()


def test_pad_content_with_plain_masking_would_leak():
    """Guard for the test above: without the padding mask, pad content does change real outputs."""
    mixer = PoNetMixer(8, 2).double()
    real, _ = sentence_batch(2, 9)
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[~real] += 5.0
    assert not torch.equal(mixer(x)[real], mixer(x2)[real])


def test_all_pad_row_gives_zeros_and_finite_gradients():
    inputs = random_inputs(2, 6, 4, requires_grad=True)
    real = torch.ones(2, 6, dtype=torch.bool)
    real[1] = False
    for fn in (ponet_mixing, ponet_mixing_reference):
        out = fn(*inputs, 2, padding_mask=real, segment_size=2)
        assert (out[1] == 0).all() and torch.isfinite(out).all()
        grads = torch.autograd.grad(out.square().sum(), inputs)
        assert all(torch.isfinite(gr).all() for gr in grads)


def test_segment_ids_follow_upstream_rule():
    # [CLS] a b [SEP] c d [SEP] pad pad: each special token its own segment, pads after the last [SEP] one more
    sep = torch.tensor([[1, 0, 0, 1, 0, 0, 1, 0, 0]], dtype=torch.bool)
    assert segment_ids_from_separators(sep).tolist() == [[0, 1, 1, 2, 3, 3, 4, 5, 5]]
    # adjacent separators and a first token that is not a separator
    sep = torch.tensor([[0, 0, 1, 1, 0]], dtype=torch.bool)
    assert segment_ids_from_separators(sep).tolist() == [[0, 0, 1, 3, 4]]


def test_derived_and_explicit_segment_ids_give_the_same_output():
    mixer = PoNetMixer(8, 2).double()
    real, special = sentence_batch(2, 11)
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    derived = segment_ids_from_separators(special)
    explicit = torch.tensor([[0, 1, 1, 2, 3, 3, 3, 3, 3, 3, 4], [0, 1, 1, 2, 3, 3, 3, 4, 5, 5, 5]])
    assert torch.equal(derived, explicit)
    relabelled = explicit * 7 % 11  # any distinct labels name the same segments
    out = mixer(x, real, explicit, special_mask=special)
    torch.testing.assert_close(mixer(x, real, derived, special_mask=special), out, rtol=0, atol=0)
    torch.testing.assert_close(mixer(x, real, relabelled, special_mask=special), out, rtol=1e-15, atol=1e-15)
    # and the split matters: one segment for everything gives something else
    assert not torch.allclose(mixer(x, real, None, special_mask=special), out)


def test_equal_chunks_match_explicit_ids_and_upstream_sizes():
    assert equal_segment_size(2000, 64) == 32 and equal_segment_size(1024, 32) == 33
    assert equal_segment_size(4000, 4096) == 1
    inputs = random_inputs(2, 13, 8)
    real, _ = sentence_batch(2, 13)
    by_size = ponet_mixing(*inputs, 2, padding_mask=real, segment_size=5)
    by_ids = ponet_mixing(*inputs, 2, padding_mask=real, segment_ids=equal_segment_ids(13, 5))
    torch.testing.assert_close(by_size, by_ids, rtol=0, atol=0)


def test_limiting_cases_have_closed_forms():
    q, k, o, local, segment = random_inputs(2, 7, 6)
    # one-token segments and a one-token window: S = dense_segment(X), L = dense_local(X)
    out = ponet_mixing(q, k, o, local, segment, 3, segment_size=1, local_kernel=1)
    B, N, C = q.shape
    D = C // 3
    qh, kh = q.view(B, N, 3, D), k.view(B, N, 3, D)
    attn = torch.softmax(torch.einsum("bhd,bnhd->bnh", qh.mean(1), kh) / math.sqrt(D), dim=1)
    g = torch.einsum("bnh,bnhd->bhd", attn, kh).reshape(B, 1, C)
    torch.testing.assert_close(out, (g + segment) * o + local, rtol=1e-12, atol=1e-12)
    # one segment over the whole sequence and a window covering it: both are the sequence max
    wide = ponet_mixing(q, k, o, local, segment, 3, local_kernel=2 * N + 1)
    expect = (g + segment.amax(1, keepdim=True)) * o + local.amax(1, keepdim=True)
    torch.testing.assert_close(wide, expect, rtol=1e-12, atol=1e-12)


def test_gradients_match_reference_and_finite_differences():
    real, special = sentence_batch(2, 9)
    ids = segment_ids_from_separators(special)
    kwargs = dict(padding_mask=real, segment_ids=ids, special_mask=special)
    inputs = random_inputs(2, 9, 4, requires_grad=True)
    weight = torch.randn(2, 9, 4, dtype=torch.float64)
    fast = torch.autograd.grad((ponet_mixing(*inputs, 2, **kwargs) * weight).sum(), inputs)
    ref = torch.autograd.grad((ponet_mixing_reference(*inputs, 2, **kwargs) * weight).sum(), inputs)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: ponet_mixing(*t, 2, **kwargs), tuple(inputs))
    assert torch.autograd.gradcheck(lambda *t: ponet_mixing(*t, 2, segment_size=3), tuple(inputs))


def test_mixer_reference_flag_and_bfloat16():
    mixer = PoNetMixer(32, 4)
    real, special = sentence_batch(2, 21)
    ids = segment_ids_from_separators(special)
    x = torch.randn(2, 21, 32)
    mixer.fused = False
    ref = mixer.double()(x.double(), real, ids, special_mask=special)
    mixer.fused = True
    low = mixer.bfloat16()(x.bfloat16(), real, ids, special_mask=special)
    assert low.dtype == torch.bfloat16
    err = (low.double() - ref).norm() / ref.norm()
    assert err < 1e-2, err


def test_bad_inputs_raise_clear_errors():
    mixer = PoNetMixer(8, 2)
    x = torch.randn(2, 5, 8)
    real = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, N, 8\), got \(2, 5, 6\)"):
        mixer(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match=r"x: expected shape"):
        mixer(torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"padding_mask: expected a bool tensor .* got dtype torch.float32"):
        mixer(x, real.float())
    with pytest.raises(ValueError, match=r"padding_mask: expected shape \(2, 5\), got \(2, 4\)"):
        mixer(x, real[:, :4])
    with pytest.raises(ValueError, match=r"special_mask: expected a bool tensor"):
        mixer(x, real, special_mask=real.long())
    with pytest.raises(ValueError, match=r"segment_ids: expected an integer tensor, got dtype torch.float32"):
        mixer(x, real, torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"segment_ids: expected values in \[0, 4\]"):
        mixer(x, real, torch.tensor([0, 1, 2, 3, 5]))
    with pytest.raises(ValueError, match=r"segment_ids: expected shape"):
        mixer(x, real, torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"give at most one"):
        mixer(x, real, torch.zeros(5, dtype=torch.long), segment_size=2)
    with pytest.raises(ValueError, match=r"segment_size: expected a positive int, got 0"):
        mixer(x, segment_size=0)
    with pytest.raises(ValueError, match=r"dim 10 should be divisible by num_heads 4"):
        PoNetMixer(10, 4)
    with pytest.raises(ValueError, match=r"local_kernel: expected an odd positive int, got 4"):
        PoNetMixer(8, 2, local_kernel=4)
    with pytest.raises(ValueError, match=r"is_separator: expected a \(B, N\) bool tensor"):
        segment_ids_from_separators(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"k: expected shape \(1, 3, 4\) like q"):
        ponet_mixing(torch.randn(1, 3, 4), torch.randn(1, 3, 2), *torch.randn(3, 1, 3, 4), 2)
