"""Factorization self-attention (FaViT, arXiv 2312.08614): fast path vs the official-order reference,
the window pooling vs its definition, the limiting case of one window, gradients and bad inputs."""

import pytest
import torch
import torch.nn.functional as F

from zoo.layers.fasa import (
    FactorizationSelfAttention,
    fasa_branch_dims,
    mirror_indices,
    pool_window_tokens,
    pool_window_tokens_reference,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def pooled_by_definition(feats: torch.Tensor, heads: int, window: int, dilation: int) -> torch.Tensor:
    """Loops straight from the definition: windows of the mirrored grid, flattened (window, channel), chunk means."""
    B, H, W, C = feats.shape
    c = C // heads
    stride = dilation * (window - 1) + 1
    n_h, n_w = -(-H // stride), -(-W // stride)

    def mirror(p: int, size: int) -> int:
        if size == 1:
            return 0
        while p >= size:  # reflect about the far edge, then about the near edge, ...
            p = 2 * (size - 1) - p
            if p < 0:
                p = -p
        return p

    out = torch.zeros(B, heads, window * window, c, dtype=feats.dtype)
    L = n_h * n_w
    for hd in range(heads):
        for ki in range(window):
            for kj in range(window):
                seq = []  # window-major, channel-minor
                for a in range(n_h):
                    for b in range(n_w):
                        r = mirror(a * stride + ki * dilation, H)
                        s = mirror(b * stride + kj * dilation, W)
                        seq.append(feats[:, r, s, hd * c : (hd + 1) * c])
                flat = torch.cat(seq, dim=-1)  # B, L * c
                out[:, hd, ki * window + kj] = flat.view(B, c, L).mean(-1)
    return out


def test_branch_split_follows_the_paper():
    assert fasa_branch_dims(32, 8) == (4, [14, 14], [1, 8])
    assert fasa_branch_dims(256, 1) == (32, [224], [1])
    assert fasa_branch_dims(384, 2) == (48, [168, 168], [1, 2])


def test_mirror_indices_equal_reflection_pad_and_keep_reflecting():
    x = torch.arange(5.0).view(1, 1, 5)
    padded = F.pad(x, (0, 4), mode="reflect").flatten()
    assert mirror_indices(torch.arange(9), 5).tolist() == padded.long().tolist()
    # wider than the grid: 0 1 2 | 1 0 1 2 1 0 1
    assert mirror_indices(torch.arange(10), 3).tolist() == [0, 1, 2, 1, 0, 1, 2, 1, 0, 1]
    assert mirror_indices(torch.arange(4), 1).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize(
    "H,W,heads,window,dilation",
    [(8, 12, 1, 4, 1), (9, 11, 2, 3, 1), (8, 8, 2, 3, 2), (5, 13, 1, 3, 3), (2, 3, 2, 3, 4)],
)
def test_window_pooling_matches_definition(H, W, heads, window, dilation):
    feats = torch.randn(2, H, W, 4 * heads, dtype=torch.float64)
    expected = pooled_by_definition(feats, heads, window, dilation)
    fast = pool_window_tokens(feats, heads, window, dilation)
    reference = pool_window_tokens_reference(feats.permute(0, 3, 1, 2), heads, window, dilation)
    torch.testing.assert_close(fast, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reference, expected, rtol=1e-12, atol=1e-12)


CASES = [
    # dim, heads, sr, H, W
    (32, 1, 8, 16, 16),  # favit_b0 stage 1 at 64 px: dilated windows wider than the grid
    (32, 2, 4, 14, 9),  # odd grid, padding on both axes
    (64, 4, 2, 7, 12),
    (16, 2, 1, 5, 3),  # stage-4 form: global + one local branch
    (32, 1, 2, 28, 14),  # exact multiples: the no-padding view path
]


@pytest.mark.parametrize("dim,heads,sr,H,W", CASES)
def test_fast_path_equals_reference(dim, heads, sr, H, W):
    layer = FactorizationSelfAttention(dim, heads, sr).double()
    x = torch.randn(2, H * W, dim, dtype=torch.float64)
    ref = layer.forward_reference(x, (H, W))
    assert rel_err(layer(x, (H, W)), ref) < 1e-12
    layer.pad_head_dim = True  # the CUDA dispatch: head dims zero-padded to a multiple of 8
    assert rel_err(layer(x, (H, W)), ref) < 1e-12
    layer.fused_attn = False
    assert rel_err(layer(x, (H, W)), ref) < 1e-12
    # fp32 fast path vs fp64 reference: the project's 1e-4 tolerance
    layer32 = FactorizationSelfAttention(dim, heads, sr)
    layer32.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    assert rel_err(layer32(x.float(), (H, W)), ref) < 1e-4


def dense_attention_over_one_window(layer: FactorizationSelfAttention, x: torch.Tensor, H: int, W: int):
    """sr = 1, H = W = window: every branch is dense multi-head attention over all tokens (no pooling)."""
    B, N, C = x.shape
    Cg, heads, c = layer.global_dim, layer.num_heads, layer.head_dim
    q = x @ layer.q.weight.T + layer.q.bias
    xg = x[..., :Cg]
    kg = F.linear(
        layer.global_norm(F.linear(xg, layer.global_reduce.weight.flatten(1), layer.global_reduce.bias)),
        layer.global_kv.weight,
        layer.global_kv.bias,
    )
    k_g, v_g = kg[..., :Cg], kg[..., Cg:]
    v_g = v_g + layer.global_v_conv(v_g.transpose(1, 2).reshape(B, Cg, H, W)).flatten(2).transpose(1, 2)
    a = torch.softmax(q[..., :Cg] @ k_g.transpose(1, 2) / Cg**0.5, -1)
    outs = [a @ v_g]
    t = layer.window_pwconv(layer.window_dwconv(x[..., Cg:].transpose(1, 2).reshape(B, -1, H, W)))
    t = t.flatten(2).transpose(1, 2)  # B, N, Cl: one window, its N tokens are the keys
    kv = layer.window_kv[0](layer.window_fc[0](t.view(B, N, heads, c).transpose(1, 2)))
    k, v = kv[..., :c], kv[..., c:]
    v = v + layer.window_v_conv[0](v.transpose(2, 3).reshape(B, heads * c, H, W)).view(
        B, heads, c, N
    ).transpose(2, 3)
    qw = q[..., Cg:].view(B, N, heads, c).transpose(1, 2)
    outs.append((torch.softmax(qw @ k.transpose(-1, -2) / c**0.5, -1) @ v).transpose(1, 2).reshape(B, N, -1))
    return layer.proj(torch.cat(outs, -1))


def test_one_window_is_dense_attention_over_its_tokens():
    layer = FactorizationSelfAttention(24, num_heads=3, sr_ratio=1, window_size=5).double()
    x = torch.randn(2, 25, 24, dtype=torch.float64)
    expected = dense_attention_over_one_window(layer, x, 5, 5)
    assert rel_err(layer(x, (5, 5)), expected) < 1e-12


def test_gradients_of_fast_path_equal_reference_and_pass_gradcheck():
    layer = FactorizationSelfAttention(16, 1, 2, window_size=3).double()
    x = torch.randn(1, 5 * 7, 16, dtype=torch.float64, requires_grad=True)
    g_ref = torch.autograd.grad(layer.forward_reference(x, (5, 7)).pow(2).sum(), [x, *layer.parameters()])
    for pad in (False, True):
        layer.pad_head_dim = pad
        g_fast = torch.autograd.grad(layer(x, (5, 7)).pow(2).sum(), [x, *layer.parameters()])
        for a, b in zip(g_fast, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    layer.pad_head_dim = None
    assert torch.autograd.gradcheck(lambda t: layer(t, (5, 7)), (x,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_training_after_inference_mode_on_the_same_grid():
    from zoo.layers import fasa

    fasa._INDEX_CACHE.clear()  # the first call below fills it, under inference mode
    layer = FactorizationSelfAttention(32, 1, 4)
    x = torch.randn(1, 10 * 9, 32)  # needs padded (gathered) windows
    with torch.inference_mode():
        expected = layer(x, (10, 9))
    out = layer(x.requires_grad_(), (10, 9))
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bf16_and_channels_last_inputs():
    layer = FactorizationSelfAttention(32, 2, 4)
    x = torch.randn(2, 12 * 10, 32)
    ref = layer.forward_reference(x, (12, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, (12, 10))
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), ref) < 2e-2
    # a channels-last NCHW grid viewed as tokens is the same tokens
    grid = x.view(2, 12, 10, 32).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    tokens = grid.permute(0, 2, 3, 1).reshape(2, 120, 32)
    assert rel_err(layer(tokens, (12, 10)), ref) < 1e-6


def test_bad_arguments_raise_one_clear_error():
    with pytest.raises(ValueError, match="dim: expected a positive multiple of 16"):
        FactorizationSelfAttention(40, 1, 2)
    with pytest.raises(ValueError, match="num_heads: expected a divisor"):
        FactorizationSelfAttention(32, 4, 2)  # window branches have 14 channels
    with pytest.raises(ValueError, match="sr_ratio"):
        FactorizationSelfAttention(32, 1, 0)
    layer = FactorizationSelfAttention(32, 1, 4)
    with pytest.raises(ValueError, match=r"x: expected tokens \(B, H \* W, 32\)"):
        layer(torch.randn(2, 16, 16), (4, 4))
    with pytest.raises(ValueError, match="feat_size: expected H \\* W == 16 tokens, got 4 x 5"):
        layer(torch.randn(2, 16, 32), (4, 5))
    with pytest.raises(ValueError, match="at least sr_ratio x sr_ratio = 4 x 4, got 2 x 8"):
        layer(torch.randn(2, 16, 32), (2, 8))
