"""FaViT models (arXiv 2312.08614): sizes of the paper, official checkpoints, timm API, any input size."""

import argparse
import math
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

import zoo
from zoo import checkpoints
from zoo.vision.favit import FaViT

HEADS, MLP, SR = (1, 2, 4, 8), (8, 6, 4, 4), (8, 4, 2, 1)
B0 = dict(dims=(32, 64, 128, 256), depths=(2, 2, 6, 2))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------------------------
# the official layout, written from the official model's description, and its forward pass


def branch_dims(dim, sr):
    weights = (2, 7, 7) if sr > 1 else (1, 7)
    unit = dim // sum(weights)
    return [unit * w for w in weights]


def official_state_dict(dims, depths, num_classes=10, in_chans=3, ws=7, seed=0):
    """Random weights under the official key names (``block1.0.attn.kv_l.depth_conv.weight``, ...)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def weight(name, *shape):
        fan_in = math.prod(shape[1:])
        sd[name] = torch.randn(shape, generator=g) / math.sqrt(fan_in)

    def bias(name, n, center=0.0):
        sd[name] = center + 0.1 * torch.randn(n, generator=g)

    def norm(prefix, n):
        bias(prefix + ".weight", n, 1.0)
        bias(prefix + ".bias", n)

    for i, d in enumerate(dims):
        k, cin = (7, in_chans) if i == 0 else (3, dims[i - 1])
        weight(f"patch_embed{i + 1}.proj.weight", d, cin, k, k)
        bias(f"patch_embed{i + 1}.proj.bias", d)
        norm(f"patch_embed{i + 1}.norm", d)
        cg, *branches = branch_dims(d, SR[i])
        cl, h = d - cg, HEADS[i]
        for j in range(depths[i]):
            b = f"block{i + 1}.{j}."
            norm(b + "norm1", d)
            weight(b + "attn.q.weight", d, d)
            bias(b + "attn.q.bias", d)
            weight(b + "attn.kv_g.weight", 2 * cg, cg)
            bias(b + "attn.kv_g.bias", 2 * cg)
            weight(b + "attn.kv_l.depth_conv.weight", cl, 1, 3, 3)
            bias(b + "attn.kv_l.depth_conv.bias", cl)
            weight(b + "attn.kv_l.point_conv.weight", cl, cl, 1, 1)
            bias(b + "attn.kv_l.point_conv.bias", cl)
            weight(b + "attn.sr.weight", cg, cg, SR[i], SR[i])
            bias(b + "attn.sr.bias", cg)
            norm(b + "attn.norm", cg)
            weight(b + "attn.local_conv_g.weight", cg, 1, 3, 3)
            bias(b + "attn.local_conv_g.bias", cg)
            for n, db in enumerate(branches):
                c = db // h
                weight(b + f"attn.fcs.{n}.weight", c, c)
                bias(b + f"attn.fcs.{n}.bias", c)
                weight(b + f"attn.single_heads.{n}.weight", 2 * c, c)
                bias(b + f"attn.single_heads.{n}.bias", 2 * c)
                weight(b + f"attn.local_convs.{n}.weight", db, 1, 3, 3)
                bias(b + f"attn.local_convs.{n}.bias", db)
            weight(b + "attn.proj.weight", d, d)
            bias(b + "attn.proj.bias", d)
            norm(b + "norm2", d)
            hidden = d * MLP[i]
            weight(b + "mlp.fc1.weight", hidden, d)
            bias(b + "mlp.fc1.bias", hidden)
            weight(b + "mlp.dwconv.dwconv.weight", hidden, 1, 3, 3)
            bias(b + "mlp.dwconv.dwconv.bias", hidden)
            weight(b + "mlp.fc2.weight", d, hidden)
            bias(b + "mlp.fc2.bias", d)
        norm(f"norm{i + 1}", d)
    weight("head.weight", num_classes, dims[-1])
    bias("head.bias", num_classes)
    return sd


def official_attention(sd, p, x, H, W, dim, heads, sr, ws=7):
    B, N, C = x.shape
    cg, *branches = branch_dims(dim, sr)
    q = F.linear(x, sd[p + "q.weight"], sd[p + "q.bias"])
    g = F.conv2d(
        x[..., :cg].transpose(1, 2).reshape(B, cg, H, W), sd[p + "sr.weight"], sd[p + "sr.bias"], stride=sr
    )
    hg, wg = g.shape[-2:]
    g = F.layer_norm(
        g.flatten(2).transpose(1, 2), (cg,), sd[p + "norm.weight"], sd[p + "norm.bias"], eps=1e-5
    )
    kv = F.linear(g, sd[p + "kv_g.weight"], sd[p + "kv_g.bias"])
    k, v = kv[..., :cg], kv[..., cg:]
    vconv = F.conv2d(
        v.transpose(1, 2).reshape(B, cg, hg, wg),
        sd[p + "local_conv_g.weight"],
        sd[p + "local_conv_g.bias"],
        padding=1,
        groups=cg,
    )
    v = v + vconv.flatten(2).transpose(1, 2)
    outs = [torch.softmax(q[..., :cg] @ k.transpose(1, 2) * cg**-0.5, -1) @ v]
    cl = C - cg
    loc = x[..., cg:].transpose(1, 2).reshape(B, cl, H, W)
    loc = F.conv2d(
        loc, sd[p + "kv_l.depth_conv.weight"], sd[p + "kv_l.depth_conv.bias"], padding=1, groups=cl
    )
    loc = F.conv2d(loc, sd[p + "kv_l.point_conv.weight"], sd[p + "kv_l.point_conv.bias"])
    q_heads = q[..., cg:].reshape(B, N, heads, -1)
    start = 0
    for n, db in enumerate(branches):
        c, dil = db // heads, (1 if n == 0 else sr)
        stride = dil * (ws - 1) + 1
        t = F.pad(loc[:, start : start + db], (0, (-W) % stride, 0, (-H) % stride), mode="reflect")
        start += db
        cols = F.unfold(t, ws, dilation=dil, stride=stride)
        L = cols.shape[-1]
        cols = cols.view(B, heads, c, ws * ws, L).permute(0, 1, 3, 4, 2).reshape(-1, 1, L * c)
        pooled = F.adaptive_avg_pool1d(cols, c).view(B, heads, ws * ws, c)
        kv = F.linear(
            F.linear(pooled, sd[p + f"fcs.{n}.weight"], sd[p + f"fcs.{n}.bias"]),
            sd[p + f"single_heads.{n}.weight"],
            sd[p + f"single_heads.{n}.bias"],
        )
        k, v = kv[..., :c], kv[..., c:]
        vconv = F.conv2d(
            v.transpose(2, 3).reshape(B, db, ws, ws),
            sd[p + f"local_convs.{n}.weight"],
            sd[p + f"local_convs.{n}.bias"],
            padding=1,
            groups=db,
        )
        v = v + vconv.view(B, heads, c, ws * ws).transpose(2, 3)
        qb = q_heads[..., n * c : (n + 1) * c].transpose(1, 2)
        o = torch.softmax(qb @ k.transpose(-1, -2) * c**-0.5, -1) @ v
        outs.append(o.transpose(1, 2).reshape(B, N, db))
    return F.linear(torch.cat(outs, -1), sd[p + "proj.weight"], sd[p + "proj.bias"])


def official_forward(sd, x, dims, depths):
    B = x.shape[0]
    for i, d in enumerate(dims):
        p = f"patch_embed{i + 1}."
        k, s = (7, 4) if i == 0 else (3, 2)
        x = F.conv2d(x, sd[p + "proj.weight"], sd[p + "proj.bias"], stride=s, padding=k // 2)
        H, W = x.shape[-2:]
        x = F.layer_norm(
            x.flatten(2).transpose(1, 2), (d,), sd[p + "norm.weight"], sd[p + "norm.bias"], eps=1e-5
        )
        for j in range(depths[i]):
            b = f"block{i + 1}.{j}."
            h = F.layer_norm(x, (d,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
            x = x + official_attention(sd, b + "attn.", h, H, W, d, HEADS[i], SR[i])
            h = F.layer_norm(x, (d,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
            h = F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])
            hidden = h.shape[-1]
            h = F.conv2d(
                h.transpose(1, 2).reshape(B, hidden, H, W),
                sd[b + "mlp.dwconv.dwconv.weight"],
                sd[b + "mlp.dwconv.dwconv.bias"],
                padding=1,
                groups=hidden,
            )
            h = F.gelu(h.flatten(2).transpose(1, 2))
            x = x + F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        x = F.layer_norm(x, (d,), sd[f"norm{i + 1}.weight"], sd[f"norm{i + 1}.bias"], eps=1e-6)
        if i < len(dims) - 1:
            x = x.transpose(1, 2).reshape(B, d, H, W)
    return F.linear(x.mean(1), sd["head.weight"], sd["head.bias"])


def use_reference_attention(model):
    for module in model.modules():
        if hasattr(module, "forward_reference"):
            module.forward = module.forward_reference
    return model


@pytest.fixture(scope="module")
def official_b0():
    return official_state_dict(**B0)


# ---------------------------------------------------------------------------------------------


def test_param_counts_match_the_paper():
    counts = {
        n: round(zoo.model_info(n)["params"] / 1e6, 2)
        for n in ("favit_b0", "favit_b1", "favit_b2", "favit_b3")
    }
    assert counts == {"favit_b0": 3.43, "favit_b1": 12.96, "favit_b2": 24.92, "favit_b3": 48.75}


@pytest.mark.parametrize("fmt", ["training_pth", "bare_pth", "safetensors"])
def test_official_checkpoint_gives_same_logits(official_b0, tmp_path, fmt):
    sd = official_b0
    if fmt == "training_pth":
        path = tmp_path / "favit_b0.pth"
        torch.save({"model": sd, "args": argparse.Namespace(model="favit_b0", lr=1e-3), "epoch": 1}, path)
    elif fmt == "bare_pth":
        path = tmp_path / "favit_b0_bare.pth"
        torch.save(sd, path)
    else:
        path = checkpoints.save(sd, tmp_path / "favit_b0.safetensors")
    model = zoo.create("favit_b0", num_classes=10, checkpoint=path).eval()
    x = torch.randn(2, 3, 112, 144)  # sizes where the official reflection padding works
    with torch.no_grad():
        expected = official_forward(sd, x, **B0)
        out = model(x)
        assert rel_err(out, expected) < 1e-4
        if fmt == "training_pth":
            assert rel_err(use_reference_attention(model)(x), expected) < 1e-4


@pytest.mark.parametrize("fmt", ["safetensors", "training_pth"])
def test_official_checkpoint_loads_through_timm(official_b0, tmp_path, fmt):
    if fmt == "safetensors":
        path = checkpoints.save(official_b0, tmp_path / "favit_b0.safetensors")
    else:
        path = tmp_path / "favit_b0.pth"
        torch.save({"model": official_b0, "args": argparse.Namespace(lr=1e-3), "epoch": 300}, path)
    overlay = dict(file=str(path), num_classes=10)
    model = timm.create_model(
        "favit_b0", pretrained=True, num_classes=10, pretrained_cfg_overlay=overlay
    ).eval()
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert rel_err(model(x), official_forward(official_b0, x, **B0)) < 1e-4


def test_incomplete_official_checkpoint_is_refused_by_name(official_b0, tmp_path):
    sd = dict(official_b0)
    del sd["block3.5.attn.fcs.1.weight"]
    path = checkpoints.save(sd, tmp_path / "broken.safetensors")
    with pytest.raises(
        checkpoints.CheckpointError, match=r"stages\.2\.blocks\.5\.attn\.window_fc\.1\.weight"
    ):
        zoo.create("favit_b0", num_classes=10, checkpoint=path)


def test_any_input_from_32px_and_any_aspect_ratio(official_b0):
    model = zoo.create("favit_b0", num_classes=10)
    model.load_state_dict(zoo.vision.favit.checkpoint_filter_fn(official_b0, model))
    model.eval()
    with torch.no_grad():
        for size in [(32, 32), (33, 47), (40, 96), (64, 36)]:
            x = torch.randn(1, 3, *size)
            out = model(x)
            assert out.shape == (1, 10) and torch.isfinite(out).all()
        reference = use_reference_attention(zoo.create("favit_b0", num_classes=10))
        reference.load_state_dict(model.state_dict())
        x = torch.randn(2, 3, 37, 61)
        assert rel_err(model(x), reference.eval()(x)) < 1e-5


def test_bad_inputs_raise_one_clear_error():
    model = zoo.create("favit_b0", num_classes=10)
    with pytest.raises(ValueError, match="at least 32 px, got 31 x 64"):
        model(torch.randn(1, 3, 31, 64))
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\), got shape \(1, 1, 64, 64\)"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"expected images .* got shape \(3, 64, 64\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="unknown config override"):
        zoo.create("favit_b0", depths=(1, 1, 1, 1))


def test_features_only_and_intermediates():
    model = timm.create_model("favit_b0", features_only=True, out_indices=(1, 3))
    assert model.feature_info.channels() == [64, 256]
    assert model.feature_info.reduction() == [8, 32]
    feats = model(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, 64, 8, 12), (2, 256, 2, 3)]

    full = zoo.create("favit_b0")
    x = torch.randn(1, 3, 64, 64)
    last, inter = full.forward_intermediates(x, indices=2)
    assert [f.shape[1] for f in inter] == [128, 256]
    torch.testing.assert_close(inter[-1], full.forward_features(x))
    torch.testing.assert_close(last, inter[-1])
    nhwc = full.forward_intermediates(x, indices=[0], output_fmt="NHWC", intermediates_only=True)
    assert nhwc[0].shape == (1, 16, 16, 32)


def test_head_api():
    model = zoo.create("favit_b0", num_classes=7).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pooled, feats.mean((-2, -1)))
        torch.testing.assert_close(model.forward_head(feats), model.get_classifier()(pooled))
        model.reset_classifier(5)
        assert model(x).shape == (2, 5)
        model.reset_classifier(0)
        assert model(x).shape == (2, 256)
    assert model.no_weight_decay() == set()


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = zoo.create("favit_b0", num_classes=3, drop_path_rate=0.0)
    x = torch.randn(2, 3, 40, 40)
    model(x).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_group_matcher_covers_every_parameter():
    from timm.models import group_parameters

    model = zoo.create("favit_b0")
    for coarse in (True, False):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        named = [n for names in groups.values() for n in names]
        assert sorted(named) == sorted(n for n, _ in model.named_parameters())
    # layer-wise decay relies on it
    from timm.optim import create_optimizer_v2

    create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.8)


def test_small_custom_config_and_default_cfg():
    model = FaViT(num_classes=4, embed_dims=(16, 32, 64, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))
    out = model(torch.randn(2, 3, 32, 48))
    out.sum().backward()
    assert out.shape == (2, 4)
    cfg = timm.create_model("favit_b1").pretrained_cfg
    assert (cfg["crop_pct"], cfg["interpolation"], cfg["first_conv"], cfg["classifier"]) == (
        0.875,
        "bicubic",
        "patch_embed.proj",
        "head",
    )
    assert cfg["mean"] == (0.485, 0.456, 0.406)


def test_timm_sees_favit_after_import_zoo_without_importing_timm_early():
    code = (
        "import sys, zoo\n"
        "assert 'timm' not in sys.modules, 'import zoo imported timm'\n"
        "import timm\n"
        "assert timm.list_models('favit*') == ['favit_b0', 'favit_b1', 'favit_b2', 'favit_b3']\n"
        "import torch\n"
        "with torch.device('meta'):\n"
        "    m = timm.create_model('favit_b2', num_classes=3)\n"
        "print(type(m).__name__, sum(p.numel() for p in m.parameters()))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["FaViT", str(24_919_896 - 1000 * 513 + 3 * 513)]


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    model = zoo.create("favit_b0", num_classes=10).eval()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-5


def test_norms_keep_the_autocast_dtype():
    """Under autocast the norms run in its dtype (residual stream included); outside, plain LayerNorm."""
    from zoo.layers.norm import LayerNormAutocast

    norm = LayerNormAutocast(24, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 5, 24) * 4 + 1
    assert torch.equal(norm(x), F.layer_norm(x, (24,), norm.weight, norm.bias, 1e-6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16
    want = F.layer_norm(
        x.bfloat16().double(), (24,), norm.weight.bfloat16().double(), norm.bias.bfloat16().double()
    )
    assert rel_err(y, want) < 1e-2
    y.float().sum().backward()  # gradients reach the fp32 parameters in their dtype
    assert norm.weight.grad.dtype == torch.float32 and norm.weight.grad.abs().sum() > 0

    model = FaViT(
        num_classes=5, embed_dims=(16, 32, 64, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)
    ).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        exact = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = model.forward_intermediates(images, intermediates_only=True)
            logits = model(images)
    assert all(f.dtype == torch.bfloat16 for f in features)
    assert rel_err(logits, exact) < 5e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fused_mix_ffn_equals_the_plain_path(dtype, monkeypatch):
    """The Triton depthwise conv + GELU path of the Mix-FFN against the cuDNN + GELU path: outputs and gradients."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 means fp32 on both paths
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    model = FaViT(num_classes=7, embed_dims=(32, 64, 128, 256), depths=(1, 1, 2, 1)).cuda()
    images = torch.randn(4, 3, 96, 128, device="cuda")
    results = []
    for fused in (True, False):
        for m in model.modules():
            if hasattr(m, "_fused_gelu"):
                m._fused_gelu = fused
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = model(images)
        out.float().square().mean().backward()
        results.append((out.float(), [p.grad.clone() for p in model.parameters()]))
    (out_fused, grads_fused), (out_plain, grads_plain) = results
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert rel_err(out_fused, out_plain) < tol
    assert max(rel_err(a, b) for a, b in zip(grads_fused, grads_plain)) < 10 * tol
