"""Adas against the plain reference of the official computation, on official-layout checkpoints."""

import pytest
import torch

import zoo
from zoo import checkpoints
from zoo.weather.adas import Adas, conv3d_as_2d, official_key_to_zoo, unify_mae
from zoo.weather.adas_reference import (
    OfficialConfig,
    adas_reference_forward,
    official_state_shapes,
    random_official_state,
)

# odd latitude count (721-like patch rule), 3 levels, windows that shrink at the deepest stage
CFG = OfficialConfig(grid=(17, 32), levels=3, dim=16, patch=(1, 2, 2), window=(2, 2, 4), depth=2, heads=2)
OVERRIDES = dict(
    grid=(17, 32), levels=3, dim=16, patch_size=(1, 2, 2), window_size=(2, 2, 4), depth=2, num_heads=2
)


def inputs(batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = 4 + 5 * CFG.levels
    bg = torch.randn(batch, C, *CFG.grid, generator=g)
    mask = (torch.rand(batch, C, *CFG.grid, generator=g) < 0.3).float()
    obs = torch.randn(batch, C, *CFG.grid, generator=g) * mask
    return bg, obs, mask


def test_registered_configs_have_the_published_sizes():
    info = zoo.model_info("adas_fengwu69_1p40625")
    assert info["params"] == pytest.approx(64.5e6, rel=2e-3)
    assert info["config"]["window_size"] == (2, 4, 8)
    info = zoo.model_info("adas_fengwu69_0p25")
    assert info["params"] == pytest.approx(291.3e6, rel=2e-3)
    assert info["config"]["patch_size"] == (1, 6, 6)


def test_official_layout_is_complete_and_loads_strictly(tmp_path):
    state = random_official_state(CFG)
    path = tmp_path / "best_model.pth"
    torch.save({"model": state}, path)
    model = zoo.create("adas_fengwu69_0p25", checkpoint=path, **OVERRIDES)
    ours = model.state_dict()
    mapped = {official_key_to_zoo(k) for k in state if not k.endswith("relative_position_index")}
    assert mapped == set(ours)
    for key, value in state.items():
        if not key.endswith("relative_position_index"):
            assert torch.equal(ours[official_key_to_zoo(key)], value), key


@pytest.mark.parametrize("fused", [True, False])
def test_official_checkpoint_gives_reference_analysis(tmp_path, fused):
    state = random_official_state(CFG, seed=3)
    path = tmp_path / "adas.pth"
    torch.save(state, path)
    model = zoo.create("adas_fengwu69_0p25", checkpoint=path, **OVERRIDES).eval()
    model.set_fused_attention(fused)
    bg, obs, mask = inputs(batch=2)
    with torch.no_grad():
        out = model(bg, obs, mask)
        ref = adas_reference_forward(state, bg, obs, mask, CFG)
    assert out.shape == bg.shape
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
    # the observations matter: a different observation changes the analysis
    with torch.no_grad():
        other = model(bg, torch.randn_like(obs) * mask, mask)
    assert ((other - out).norm() / out.norm()).item() > 1e-3


def test_official_checkpoint_missing_key_is_named(tmp_path):
    state = random_official_state(CFG)
    state.pop("layer3.crosslayer.obser2.attn.q.weight")
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(checkpoints.CheckpointError, match="cross.observation_attn_shifted.attn.q.weight"):
        zoo.create("adas_fengwu69_0p25", checkpoint=path, **OVERRIDES)


def test_wrong_relative_index_is_refused(tmp_path):
    state = random_official_state(CFG)
    key = "decoder.blocks.1.attn.relative_position_index"
    state[key] = state[key].flip(0)
    torch.save(state, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="relative_position_index"):
        zoo.create("adas_fengwu69_0p25", checkpoint=tmp_path / "x.pth", **OVERRIDES)


def test_own_layout_round_trip(tmp_path):
    model = zoo.create("adas_osse_tiny").eval()
    path = checkpoints.save(model.state_dict(), tmp_path / "adas.safetensors")
    again = zoo.create("adas_osse_tiny", checkpoint=path).eval()
    x = torch.randn(1, 3, 16, 32)
    m = (torch.rand_like(x) < 0.2).float()
    with torch.no_grad():
        torch.testing.assert_close(model(x, x * m, m), again(x, x * m, m))


def test_osse_configs_forward_backward():
    model = zoo.create("adas_osse_tiny", grad_checkpointing=True, residual=False)
    x = torch.randn(2, 3, 16, 32)
    m = (torch.rand_like(x) < 0.2).float()
    out = model(x, torch.randn_like(x) * m, m)
    unify_mae(out, torch.zeros_like(out)).backward()
    for name in (
        "embed_background.upper.weight",
        "embed_observation.upper.weight",
        "embed_mask.upper.weight",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.token_grid == (1, 8, 16)


def test_residual_variant_starts_from_the_background():
    model = zoo.create("adas_osse_tiny")
    assert model.residual
    x = torch.randn(2, 3, 16, 32)
    m = (torch.rand_like(x) < 0.2).float()
    out = model(x, x * m, m)
    torch.testing.assert_close(out, x)
    (out - torch.randn_like(x)).abs().mean().backward()
    assert model.recover.upper.weight.grad.abs().sum() > 0


def test_bad_input_shape():
    model = Adas(
        grid=(16, 32),
        levels=1,
        surface_variables=0,
        upper_variables=3,
        dim=8,
        patch_size=(1, 2, 2),
        window_size=(1, 2, 4),
        depth=1,
        num_heads=2,
    )
    x = torch.randn(1, 3, 16, 32)
    with pytest.raises(ValueError, match=r"mask: expected \(B, 3, 16, 32\)"):
        model(x, x, x[:, :2])


def test_unify_mae_hand_computed():
    pred = torch.tensor([[[[1.0]], [[4.0]], [[0.5]]]])  # (1, 3, 1, 1)
    target = torch.zeros_like(pred)
    # channel losses 1, 4, 0.5; each rescaled to channel 0's value 1: (1 + 1 + 1) / 3
    assert unify_mae(pred, target).item() == pytest.approx(1.0)
    pred.requires_grad_()
    unify_mae(pred, target).backward()
    # d/dx of l_i * (l_0 / l_i)_detached = sign * l_0 / l_i / 3
    torch.testing.assert_close(pred.grad.flatten(), torch.tensor([1 / 3, 1 / 12, 2 / 3]))


def test_official_shapes_cover_every_parameter():
    shapes = official_state_shapes(CFG)
    model = zoo.create("adas_fengwu69_0p25", **OVERRIDES)
    params = sum(p.numel() for p in model.parameters())
    official = sum(
        torch.Size(s).numel() for k, s in shapes.items() if not k.endswith("relative_position_index")
    )
    assert params == official


@pytest.mark.gpu
def test_cuda_official_checkpoint_gives_reference_analysis(tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    state = random_official_state(CFG, seed=5)
    torch.save(state, tmp_path / "adas.pth")
    model = zoo.create("adas_fengwu69_0p25", checkpoint=tmp_path / "adas.pth", **OVERRIDES).cuda().eval()
    bg, obs, mask = (t.cuda() for t in inputs(batch=2))
    with torch.no_grad():
        out = model(bg, obs, mask)
        ref = adas_reference_forward({k: v.cuda() for k, v in state.items()}, bg, obs, mask, CFG)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4


def _smooth_fields(g, n, amplitude, grid=(16, 32)):
    """Sums of random low-order cos(k lat) cos(m lon + phase) waves, shape ``(n, 3, *grid)``."""
    lat = torch.linspace(-1.4, 1.4, grid[0]).view(-1, 1)
    lon = torch.arange(grid[1]).view(1, -1) * (2 * torch.pi / grid[1])
    out = torch.zeros(n, 3, *grid)
    for _ in range(6):
        k = torch.randint(1, 4, (n, 3, 1, 1), generator=g).float()
        m = torch.randint(0, 4, (n, 3, 1, 1), generator=g).float()
        phase = 6.28 * torch.rand(n, 3, 1, 1, generator=g)
        out += torch.randn(n, 3, 1, 1, generator=g) * torch.cos(k * lat) * torch.cos(m * lon + phase)
    return amplitude * out / 2


def test_innovation_variant_equals_plain_adas_fed_scaled_departures():
    torch.manual_seed(0)
    model = zoo.create("adas_osse_tiny").eval()
    assert model.innovation and model.residual
    plain = zoo.create("adas_osse_tiny", innovation=False, residual=False).eval()
    with torch.no_grad():  # a non-zero increment head, so the check sees the output scaling too
        for p in model.recover.parameters():
            p.normal_(0.0, 0.05)
    scale = torch.tensor([0.05, 0.2, 0.7])
    model.set_increment_scale(scale)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "increment_scale"})
    g = torch.Generator().manual_seed(1)
    bg = torch.randn(2, 3, 16, 32, generator=g)
    mask = (torch.rand(2, 3, 16, 32, generator=g) < 0.1).float()
    obs = torch.randn(2, 3, 16, 32, generator=g)
    departure = (obs - bg) * mask / scale.view(1, 3, 1, 1)
    with torch.no_grad():
        expected = bg.double() + scale.view(1, 3, 1, 1).double() * plain(bg, departure, mask).double()
        got = model(bg, torch.where(mask > 0, obs, torch.full_like(obs, float("nan"))), mask)
    assert torch.isfinite(got).all()  # unobserved values, even NaN, never enter
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_increment_scale_is_saved_and_checked(tmp_path):
    model = zoo.create("adas_osse_tiny")
    model.set_increment_scale([0.1, 0.2, 0.3])
    path = checkpoints.save(model.state_dict(), tmp_path / "adas.safetensors")
    again = zoo.create("adas_osse_tiny", checkpoint=path)
    torch.testing.assert_close(again.increment_scale, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match=r"scale: expected 3 positive finite values, got \[0.1, 0.0, 0.3\]"):
        model.set_increment_scale([0.1, 0.0, 0.3])
    with pytest.raises(ValueError, match="scale: expected 3 positive"):
        model.set_increment_scale([0.1, 0.2])
    official = zoo.create("adas_fengwu69_0p25", **OVERRIDES)
    assert "increment_scale" not in official.state_dict()
    with pytest.raises(ValueError, match="neither residual nor innovation"):
        official.set_increment_scale([1.0] * official.channels)


def test_adas_learns_from_observations():
    """One background and one observing mask for all samples: only the observed values tell the
    samples apart, so the analysis error can fall well below the background's only through the
    observation stream (an Adas that ignores it stays near 0.9 of the background error)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n = 4
    bg = _smooth_fields(g, 1, 1.0).expand(n, -1, -1, -1)
    truth = bg + _smooth_fields(g, n, 0.05)
    mask = (torch.rand(1, 3, 16, 32, generator=g) < 0.1).float().expand(n, -1, -1, -1)
    obs = (truth + 0.005 * torch.randn(truth.shape, generator=g)) * mask
    model = zoo.create("adas_osse_tiny")
    model.set_increment_scale([0.05] * 3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss = unify_mae(model(bg, obs, mask), truth)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        analysis = model.eval()(bg, obs, mask)
    ratio = (analysis - truth).pow(2).mean().sqrt() / (bg - truth).pow(2).mean().sqrt()
    assert ratio < 0.6, float(ratio)


@pytest.mark.parametrize(
    "kernel,padding,depth,fold",
    [
        ((3, 5, 7), (1, 2, 3), 1, False),
        ((1, 1, 1), 0, 1, False),
        ((3, 3, 3), 1, 2, False),
        ((3, 3, 5), (1, 1, 2), 4, True),
        ((3, 5, 7), (1, 2, 3), 3, True),
        ((5, 1, 3), (2, 0, 1), 6, True),
    ],
)
def test_convolution_as_2d_equals_conv3d(kernel, padding, depth, fold):
    """Depth-1 inputs and depth-folded channels give the Conv3d's values and gradients (fp64)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(6, 4, kernel, padding=padding).double()
    x = torch.randn(2, 6, depth, 9, 12, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 4, depth, 9, 12, dtype=torch.float64)
    ref = conv(x)
    (ref * target).sum().backward()
    ref_grads = [t.grad.clone() for t in (x, conv.weight, conv.bias)]
    for t in (x, conv.weight, conv.bias):
        t.grad = None
    out = conv3d_as_2d(conv, x, fold_depth=fold)
    (out * target).sum().backward()
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref)
    for got, want in zip((x.grad, conv.weight.grad, conv.bias.grad), ref_grads):
        torch.testing.assert_close(got, want)
    if kernel[0] == 3 and depth == 1:  # only the centre slice meets data: the outer slices get no gradient
        assert conv.weight.grad[:, :, 0].abs().max() == 0 and conv.weight.grad[:, :, 1].abs().max() > 0


@pytest.mark.parametrize("tiles", [((3, 2), (7,)), ((5,), (4, 3)), ((3, 2), (5, 2)), ((1, 1, 3), (2, 2, 3))])
def test_tiled_depth_folding_equals_conv3d(tiles):
    """The (5, 7) kernel split into row and column tiles, one Conv2d each: the Conv3d's values and gradients (fp64)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(6, 4, (3, 5, 7), padding=(1, 2, 3)).double()
    x = torch.randn(2, 6, 3, 9, 12, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 4, 3, 9, 12, dtype=torch.float64)
    ref = conv(x)
    ref_grads = torch.autograd.grad((ref * target).sum(), [x, conv.weight, conv.bias])
    out = conv3d_as_2d(conv, x, fold_depth=True, tiles=tiles)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad((out * target).sum(), [x, conv.weight, conv.bias])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_bad_tiles_are_refused():
    conv = torch.nn.Conv3d(2, 2, (3, 5, 7), padding=(1, 2, 3))
    with pytest.raises(
        ValueError,
        match=r"tiles: expected row sizes summing to 5 and column sizes to 7, got \(3, 3\), \(7,\)",
    ):
        conv3d_as_2d(conv, torch.randn(1, 2, 2, 6, 8), fold_depth=True, tiles=((3, 3), (7,)))


def test_depth_folding_is_off_for_other_convolutions():
    """A strided or unpadded Conv3d runs as itself even when folding is asked for."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 4, 8, 8, dtype=torch.float64)
    for conv in (torch.nn.Conv3d(3, 2, 3, stride=2, padding=1), torch.nn.Conv3d(3, 2, 3)):
        conv = conv.double()
        torch.testing.assert_close(conv3d_as_2d(conv, x, fold_depth=True), conv(x))


def test_fraction_schedule_starts_dense_and_ends_even():
    from zoo.weather.train import _fraction_weights

    torch.testing.assert_close(_fraction_weights(3, 0.0, 0.3), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(_fraction_weights(3, 0.15, 0.3), torch.tensor([2 / 3, 1 / 6, 1 / 6]))
    for progress, until in ((0.3, 0.3), (0.9, 0.3), (0.0, 0.0)):
        torch.testing.assert_close(_fraction_weights(3, progress, until), torch.full((3,), 1 / 3))


def test_train_adas_refuses_bad_options(tmp_path):
    from zoo.weather.train import train_adas

    with pytest.raises(ValueError, match="scale: expected 'innovation' or 'background', got 'obs'"):
        train_adas(tmp_path, tmp_path, scale="obs")
    with pytest.raises(ValueError, match=r"dense_until: expected a value in \[0, 1\], got 1.5"):
        train_adas(tmp_path, tmp_path, dense_until=1.5)
    with pytest.raises(ValueError, match="reuse: expected an integer >= 1, got 0"):
        train_adas(tmp_path, tmp_path, reuse=0)
    with pytest.raises(ValueError, match=r"fresh_until: expected a value in \[0, 1\], got -0.1"):
        train_adas(tmp_path, tmp_path, fresh_until=-0.1)


def test_evaluation_reserve_covers_a_year_of_cycles():
    from zoo.weather.train import evaluation_minutes

    # 1458 cycles took 75 s on the H200 (tensor cycle loop) and the rest of the evaluation about a minute
    assert evaluation_minutes(1460) * 60 > 75 + 60
    assert evaluation_minutes(0) < evaluation_minutes(240) < evaluation_minutes(1460)


@pytest.mark.parametrize(
    "kernel,stride,grid",
    [((1, 7, 6), (1, 6, 6), (3, 25, 24)), ((1, 2, 2), (1, 2, 2), (2, 8, 12)), ((7, 6), (6, 6), (19, 18))],
)
def test_patch_matmuls_equal_the_convolutions(kernel, stride, grid):
    """Patch embedding and recovery as matrix products give the (transposed) convolutions' values and gradients (fp64)."""
    from zoo.weather.adas import patch_embed, patch_recover

    torch.manual_seed(0)
    conv_cls, deconv_cls = (
        (torch.nn.Conv3d, torch.nn.ConvTranspose3d)
        if len(kernel) == 3
        else (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    )
    conv = conv_cls(5, 8, kernel, stride=stride).double()
    deconv = deconv_cls(8, 5, kernel, stride=stride).double()
    with torch.no_grad():
        deconv.bias.normal_()
    x = torch.randn(2, 5, *grid, dtype=torch.float64, requires_grad=True)
    tokens = conv(x)
    got = patch_embed(x, conv)
    torch.testing.assert_close(got, tokens.movedim(1, -1))
    t = tokens.detach().movedim(1, -1).contiguous().requires_grad_(True)
    want = deconv(t.movedim(-1, 1))
    out = patch_recover(t, deconv)
    assert out.shape == want.shape == x.shape
    torch.testing.assert_close(out, want)
    target = torch.randn_like(want)
    grads = torch.autograd.grad((want * target).sum(), [t, deconv.weight, deconv.bias])
    for g_got, g_want in zip(
        torch.autograd.grad((out * target).sum(), [t, deconv.weight, deconv.bias]), grads
    ):
        torch.testing.assert_close(g_got, g_want)
    grads = torch.autograd.grad((tokens * tokens.detach()).sum(), [x, conv.weight])
    emb = patch_embed(x, conv).movedim(-1, 1)
    for g_got, g_want in zip(torch.autograd.grad((emb * tokens.detach()).sum(), [x, conv.weight]), grads):
        torch.testing.assert_close(g_got, g_want)


def test_patch_recover_refuses_two_overlapping_axes():
    from zoo.weather.adas import patch_recover

    deconv = torch.nn.ConvTranspose2d(4, 2, (3, 3), stride=(2, 2))
    with pytest.raises(
        ValueError, match=r"deconv: expected kernel == stride but along one axis, got \(3, 3\) / \(2, 2\)"
    ):
        patch_recover(torch.randn(1, 4, 4, 4), deconv)
