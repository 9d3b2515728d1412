"""WindowAttention3D against a dense attention over the whole grid with window, shift and bias written out pairwise."""

import pytest
import torch

from zoo.layers.window_attention import (
    WindowAttention3D,
    WindowTransformerBlock3D,
    effective_window,
    shifted_window_mask_3d,
    window_partition_3d,
    window_reverse_3d,
)


def dense_reference(attn: WindowAttention3D, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """All tokens of the padded grid in one softmax: -inf across windows, mask_fill across shift regions."""
    B, D, H, W, C = x.shape
    window, shift = effective_window((D, H, W), attn.window_size, attn.shift_size)
    pad = [(window[a] - n % window[a]) % window[a] for a, n in enumerate((D, H, W))]
    P = [n + p for n, p in zip((D, H, W), pad)]
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
    cp = xp if context is None else torch.nn.functional.pad(context, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
    coords = torch.stack(torch.meshgrid(*[torch.arange(p) for p in P], indexing="ij"), -1).reshape(-1, 3)
    rolled = (coords - torch.tensor(shift)) % torch.tensor(P)  # position after the cyclic roll by -shift
    win_id = rolled // torch.tensor(window)
    local = rolled % torch.tensor(window)
    same_window = (win_id[:, None, :] == win_id[None, :, :]).all(-1)
    region = torch.zeros_like(rolled)
    for a in range(3):
        if shift[a] > 0 and not attn.periodic_axes[a]:
            region[:, a] = (rolled[:, a] >= P[a] - window[a]).long() + (
                rolled[:, a] >= P[a] - shift[a]
            ).long()
    same_region = (region[:, None, :] == region[None, :, :]).all(-1)
    wd, wh, ww = attn.window_size
    # tokens of a shrunken window use the leading block of the full window's index, as upstream
    n_eff = torch.tensor([window[1] * window[2], window[2], 1])
    flat_local = (local * n_eff).sum(-1)
    full_local = torch.stack([flat_local // (wh * ww), (flat_local // ww) % wh, flat_local % ww], -1)
    rel = full_local[:, None, :] - full_local[None, :, :] + torch.tensor(attn.window_size) - 1
    index = rel[..., 0] * (2 * wh - 1) * (2 * ww - 1) + rel[..., 1] * (2 * ww - 1) + rel[..., 2]
    bias = attn.relative_position_bias_table[index].permute(2, 0, 1).double()  # heads, T, T
    xs = xp.reshape(B, -1, C).double()
    cs = cp.reshape(B, -1, C).double()
    h, hd = attn.num_heads, attn.head_dim
    if attn.cross:
        q, k, v = (
            torch.nn.functional.linear(t, m.weight.double(), m.bias.double())
            for t, m in ((xs, attn.q), (cs, attn.k), (cs, attn.v))
        )
    else:
        q, k, v = torch.nn.functional.linear(xs, attn.qkv.weight.double(), attn.qkv.bias.double()).chunk(
            3, -1
        )
    q, k, v = (t.view(B, -1, h, hd).transpose(1, 2) for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) * attn.scale + bias
    logits = logits + torch.where(same_region, 0.0, attn.mask_fill).double()
    logits = logits.masked_fill(~same_window, float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, -1, C)
    out = torch.nn.functional.linear(out, attn.proj.weight.double(), attn.proj.bias.double())
    return out.view(B, *P, C)[:, :D, :H, :W].float()


CASES = [
    # grid, window, shift, cross, periodic
    ((2, 4, 8), (2, 2, 4), (0, 0, 0), False, (False, False, False)),
    ((2, 4, 8), (2, 2, 4), (1, 1, 2), False, (False, False, False)),
    ((3, 5, 8), (2, 2, 4), (1, 1, 2), True, (False, False, True)),  # padding on two axes, periodic longitude
    ((1, 4, 6), (2, 4, 4), (1, 2, 2), True, (False, False, True)),  # depth and latitude shrink to the grid
]


@pytest.mark.parametrize("grid,window,shift,cross,periodic", CASES)
@pytest.mark.parametrize("fused", [True, False])
def test_matches_dense_pairwise_reference(grid, window, shift, cross, periodic, fused):
    attn = WindowAttention3D(16, 2, window, shift, cross=cross, periodic_axes=periodic, fused=fused).eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    x = torch.randn(2, *grid, 16)
    ctx = torch.randn(2, *grid, 16) if cross else None
    with torch.no_grad():
        out = attn(x, ctx)
        ref = dense_reference(attn, x, ctx)
    assert out.shape == x.shape
    assert ((out - ref).norm() / ref.norm()) < 1e-5


def test_one_window_covering_the_grid_is_dense_attention():
    attn = WindowAttention3D(8, 2, (2, 3, 4)).eval()
    with torch.no_grad():
        attn.relative_position_bias_table.zero_()
    x = torch.randn(1, 2, 3, 4, 8)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    mha.in_proj_weight.data.copy_(attn.qkv.weight)
    mha.in_proj_bias.data.copy_(attn.qkv.bias)
    mha.out_proj.weight.data.copy_(attn.proj.weight)
    mha.out_proj.bias.data.copy_(attn.proj.bias)
    seq = x.reshape(1, -1, 8)
    ref, _ = mha(seq, seq, seq, need_weights=False)
    torch.testing.assert_close(attn(x), ref.view_as(x), rtol=1e-5, atol=1e-5)


def test_shift_mask_leaves_periodic_axis_unmasked():
    flat = shifted_window_mask_3d((2, 4, 8), (2, 2, 4), (1, 1, 2), (False, False, False))
    periodic = shifted_window_mask_3d((2, 4, 8), (2, 2, 4), (1, 1, 2), (False, False, True))
    assert (flat != 0).sum() > (periodic != 0).sum() > 0
    all_periodic = shifted_window_mask_3d((2, 4, 8), (2, 2, 4), (1, 1, 2), (True, True, True))
    assert (all_periodic == 0).all()
    assert set(flat.unique().tolist()) == {0.0, -100.0}


def test_partition_roundtrip():
    x = torch.randn(2, 4, 6, 8, 3)
    w = window_partition_3d(x, (2, 3, 4))
    assert w.shape == (2 * 2 * 2 * 2, 24, 3)
    torch.testing.assert_close(window_reverse_3d(w, (2, 3, 4), 2, (4, 6, 8)), x)
    # first window holds the first 2x3x4 block in (d, h, w) order
    torch.testing.assert_close(w[0], x[0, :2, :3, :4].reshape(24, 3))


def test_gradients_fused_equal_reference():
    torch.manual_seed(1)
    blocks = [
        WindowTransformerBlock3D(16, 2, (2, 2, 4), (1, 1, 2), cross=True, fused=f) for f in (True, False)
    ]
    blocks[1].load_state_dict(blocks[0].state_dict())
    x = torch.randn(1, 2, 4, 8, 16)
    c = torch.randn(1, 2, 4, 8, 16)
    grads = []
    for b in blocks:
        xi, ci = x.clone().requires_grad_(), c.clone().requires_grad_()
        (b(xi, ci) ** 2).sum().backward()
        grads.append((xi.grad, ci.grad, b.attn.relative_position_bias_table.grad))
    for a, b in zip(*grads):
        assert torch.isfinite(a).all() and a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_heads"):
        WindowAttention3D(10, 3, (2, 2, 2))
    with pytest.raises(ValueError, match="shift_size"):
        WindowAttention3D(8, 2, (2, 2, 2), (0, 2, 0))
    with pytest.raises(ValueError, match="window_size"):
        WindowAttention3D(8, 2, (2, 2))
    attn = WindowAttention3D(8, 2, (2, 2, 2), cross=True)
    with pytest.raises(ValueError, match="context"):
        attn(torch.randn(1, 2, 2, 2, 8))
    with pytest.raises(ValueError, match=r"x: expected \(B, D, H, W, 8\)"):
        attn(torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8))
    with pytest.raises(ValueError, match="self-attention"):
        WindowAttention3D(8, 2, (2, 2, 2))(torch.randn(1, 2, 2, 2, 8), torch.randn(1, 2, 2, 2, 8))


def test_head_padding_for_fused_kernels_is_exact():
    from zoo.layers.window_attention import _sdpa

    q, k, v = (torch.randn(3, 2, 10, 12) for _ in range(3))
    bias = torch.randn(1, 2, 10, 10)
    plain = _sdpa(q, k, v, bias, 0.0, 12**-0.5, align=0)
    padded = _sdpa(q, k, v, bias, 0.0, 12**-0.5, align=8)
    torch.testing.assert_close(padded, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dim,heads", [(96, 8), (64, 4)])
def test_cuda_fused_matches_reference(dim, heads):
    attn = (
        WindowAttention3D(dim, heads, (2, 4, 8), (1, 2, 4), cross=True, periodic_axes=(False, False, True))
        .cuda()
        .eval()
    )
    x, c = torch.randn(2, 4, 8, 16, dim, device="cuda"), torch.randn(2, 4, 8, 16, dim, device="cuda")
    with torch.no_grad():
        fused = attn(x, c)
        attn.fused = False
        ref = attn(x, c)
    assert ((fused - ref).norm() / ref.norm()) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("grid,window,shift,cross,periodic", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_inference_kernel_matches_dense_reference(grid, window, shift, cross, periodic, dtype):
    """Inference on CUDA runs zoo.kernels.window_attention (bias, border masks, padding, shrunken windows)."""
    import copy

    attn = WindowAttention3D(16, 2, window, shift, cross=cross, periodic_axes=periodic).eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    x = torch.randn(2, *grid, 16)
    ctx = torch.randn(2, *grid, 16) if cross else None
    gpu = copy.deepcopy(attn).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        assert gpu._use_kernel(x.cuda(), None if ctx is None else ctx.cuda(), 1)
        out = gpu(x.cuda(), None if ctx is None else ctx.cuda()).float().cpu()
        ref = dense_reference(attn, x, ctx)
    assert ((out - ref).norm() / ref.norm()) < (1e-4 if dtype == torch.float32 else 2e-2)


def test_token_gather_gradient_is_exact():
    from zoo.layers.window_attention import _take_tokens

    x = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([4, 0, 8, 2, 6])  # distinct, a crop of the 9 tokens
    assert torch.autograd.gradcheck(lambda t: _take_tokens(t, index), (x,))


@pytest.mark.parametrize("grid,window,shift,cross,periodic", CASES[1:3])
def test_input_gradient_matches_dense_pairwise_reference(grid, window, shift, cross, periodic):
    """Padding, roll and partition by gathers: the input gradient equals the dense computation's."""
    attn = WindowAttention3D(16, 2, window, shift, cross=cross, periodic_axes=periodic)
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    x = torch.randn(2, *grid, 16, requires_grad=True)
    ctx = torch.randn(2, *grid, 16, requires_grad=True) if cross else None
    weights = torch.randn(2, *grid, 16)
    inputs = (x,) if ctx is None else (x, ctx)
    got = torch.autograd.grad((attn(x, ctx) * weights).sum(), inputs)
    want = torch.autograd.grad((dense_reference(attn, x, ctx) * weights).sum(), inputs)
    for g, w in zip(got, want):
        assert ((g - w).norm() / w.norm()) < 1e-5


GRID_CASES = CASES[:2] + [((2, 4, 8), (2, 2, 4), (1, 1, 2), True, (False, False, True))]


@pytest.mark.parametrize("grid,window,shift,cross,periodic", GRID_CASES)
def test_windows_read_through_the_token_order_match_dense_reference(
    grid, window, shift, cross, periodic, monkeypatch
):
    """Unpadded inference path: projection on the grid, windows read in place (``token_order``), projection back."""
    attn = WindowAttention3D(16, 2, window, shift, cross=cross, periodic_axes=periodic).eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    import zoo.layers.window_attention as module

    orders = []
    kernel = module.window_attention
    monkeypatch.setattr(attn, "_use_kernel", lambda *args: True)
    monkeypatch.setattr(
        module,
        "window_attention",
        lambda *args, token_order=None, **kw: (
            orders.append(token_order) or kernel(*args, token_order=token_order, **kw)
        ),
    )
    x = torch.randn(2, *grid, 16)
    ctx = torch.randn(2, *grid, 16) if cross else None
    with torch.no_grad():
        out = attn(x, ctx)
        ref = dense_reference(attn, x, ctx)
    assert len(orders) == 1 and orders[0] is not None and out.shape == x.shape
    assert ((out - ref).norm() / ref.norm()) < 1e-5


def test_kernel_path_is_cuda_inference_only():
    attn = WindowAttention3D(16, 2, (2, 2, 4), (0, 0, 0))
    x = torch.randn(1, 2, 4, 8, 16)
    with torch.no_grad():
        assert not attn._use_kernel(x, None, 16)  # CPU
