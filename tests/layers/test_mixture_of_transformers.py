"""Mixture-of-Transformers block (arXiv 2411.04996, upstream facebookresearch/Mixture-of-Transformers)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from zoo.layers import MoTBlock


def _randomise_norms(block):
    with torch.no_grad():
        for name in ("attn_norm", "ffn_norm", "q_norm", "k_norm"):
            if hasattr(block, name):
                getattr(block, name).add_(0.2 * torch.randn_like(getattr(block, name)))
    return block


def rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def mot_fp64(block, x, modality):
    """Token-by-token weights, explicit causal softmax over all tokens of all modalities."""
    b, n, c = x.shape
    h, d = block.num_heads, block.head_dim
    out = torch.empty_like(x)
    for bi in range(b):
        ms = modality[bi].tolist()
        q = torch.stack([block.wq[m] @ x[bi, t] for t, m in enumerate(ms)]).view(n, h, d)
        k = torch.stack([block.wk[m] @ x[bi, t] for t, m in enumerate(ms)]).view(n, h, d)
        v = torch.stack([block.wv[m] @ x[bi, t] for t, m in enumerate(ms)]).view(n, h, d)
        if block.qk_norm:
            q = torch.stack([rms(q[t], block.q_norm[m], block.norm_eps) for t, m in enumerate(ms)])
            k = torch.stack([rms(k[t], block.k_norm[m], block.norm_eps) for t, m in enumerate(ms)])
        for t, m in enumerate(ms):
            keys = range(t + 1) if block.causal else range(n)
            heads = []
            for hh in range(h):
                s = torch.stack([q[t, hh] @ k[j, hh] / math.sqrt(d) for j in keys])
                p = torch.exp(s - s.max())
                p = p / p.sum()
                heads.append(sum(p[i] * v[j, hh] for i, j in enumerate(keys)))
            attn = block.wo[m] @ torch.cat(heads)
            hid = x[bi, t] + rms(attn, block.attn_norm[m], block.norm_eps)
            ffn = block.w2[m] @ (F.silu(block.w1[m] @ hid) * (block.w3[m] @ hid))
            out[bi, t] = hid + rms(ffn, block.ffn_norm[m], block.norm_eps)
    return out


def dense_block_fp64(block, x):
    """The dense transformer block (modality 0's weights for every token), written as matrices."""
    b, n, c = x.shape
    h, d = block.num_heads, block.head_dim
    split = lambda t: t.view(b, n, h, d).transpose(1, 2)
    q, k, v = split(x @ block.wq[0].t()), split(x @ block.wk[0].t()), split(x @ block.wv[0].t())
    if block.qk_norm:
        q, k = rms(q, block.q_norm[0], block.norm_eps), rms(k, block.k_norm[0], block.norm_eps)
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    if block.causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    a = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    hid = x + rms(a @ block.wo[0].t(), block.attn_norm[0], block.norm_eps)
    ffn = (F.silu(hid @ block.w1[0].t()) * (hid @ block.w3[0].t())) @ block.w2[0].t()
    return hid + rms(ffn, block.ffn_norm[0], block.norm_eps)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_one_modality_is_the_dense_transformer(qk_norm):
    block = _randomise_norms(MoTBlock(12, 3, num_modalities=1, hidden=20, qk_norm=qk_norm).double())
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    torch.testing.assert_close(
        block(x, torch.zeros(2, 6, dtype=torch.long)), dense_block_fp64(block, x), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("qk_norm", [False, True])
def test_identical_weights_in_every_modality_is_the_dense_transformer(qk_norm):
    block = _randomise_norms(MoTBlock(12, 3, num_modalities=3, hidden=20, qk_norm=qk_norm).double())
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(p[0:1].expand_as(p))
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    modality = torch.randint(0, 3, (2, 6))
    torch.testing.assert_close(block(x, modality), dense_block_fp64(block, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_matches_token_by_token_reference(qk_norm, use_sdpa):
    block = _randomise_norms(
        MoTBlock(8, 2, num_modalities=3, hidden=12, qk_norm=qk_norm, use_sdpa=use_sdpa).double()
    )
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    modality = torch.tensor([[0, 1, 2, 1, 0, 0, 2], [2, 2, 1, 1, 1, 0, 0]])
    expected = mot_fp64(block, x, modality)
    torch.testing.assert_close(block(x, modality), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(expected, dense_block_fp64(block, x))  # the modalities really differ


def test_absent_modality_gets_zero_gradients():
    block = MoTBlock(8, 2, num_modalities=2, hidden=12, qk_norm=True).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    block(x, torch.zeros(2, 5, dtype=torch.long)).pow(2).sum().backward()
    for name, p in block.named_parameters():
        assert p.grad[1].abs().max() == 0, name
        assert p.grad[0].abs().sum() > 0, name


def test_cross_modal_attention_gradients_are_nonzero():
    block = MoTBlock(8, 2, num_modalities=2, hidden=12).double()
    x = torch.randn(1, 6, 8, dtype=torch.float64, requires_grad=True)
    modality = torch.tensor([[1, 1, 1, 0, 0, 0]])  # image tokens first, then text
    loss = block(x, modality)[:, 3:].pow(2).sum()  # a loss on the text tokens only
    grads = torch.autograd.grad(loss, [x, block.wk, block.wv, block.wq, block.w1])
    gx, gk, gv, gq, gw1 = grads
    assert gx[0, :3].abs().sum() > 0  # text reads the image tokens
    assert gk[1].abs().sum() > 0 and gv[1].abs().sum() > 0  # through the image modality's keys and values
    assert gq[1].abs().max() == 0 and gw1[1].abs().max() == 0  # but not its queries or FFN


def test_flops_per_token_equal_the_dense_transformer():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 32)
    modality = torch.randint(0, 3, (2, 16))
    flops = []
    for m in (1, 3):
        block = MoTBlock(32, 4, num_modalities=m)
        with FlopCounterMode(display=False) as counter:
            block(x, modality if m > 1 else torch.zeros_like(modality))
        flops.append(counter.get_total_flops())
    assert flops[0] > 0 and flops[0] == flops[1]
    dense_params = sum(p.numel() for p in MoTBlock(32, 4, num_modalities=1).parameters())
    assert sum(p.numel() for p in MoTBlock(32, 4, num_modalities=3).parameters()) == 3 * dense_params


def test_bad_inputs_raise_clear_errors():
    block = MoTBlock(8, 2, num_modalities=2)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"modality: expected shape \[2, 5\], got \[2, 4\]"):
        block(x, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="modality: expected an integer"):
        block(x, torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"modality: expected ids in \[0, 1\], got values in \[0, 2\]"):
        block(x, torch.tensor([[0, 1, 2, 0, 0]] * 2))
    with pytest.raises(ValueError, match=r"x: expected \[B, N, 8\]"):
        block(torch.randn(2, 5, 6), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="num_heads: expected a positive divisor of dim=8, got 3"):
        MoTBlock(8, 3)


def test_mot_command_runs_end_to_end(tmp_path):
    import json
    import shutil
    from pathlib import Path

    from zoo.cli import main

    if shutil.which("bible") is None or not Path("/usr/share/datasets/fashion-mnist").exists():
        pytest.skip("needs Debian bible-kjv and dataset-fashion-mnist")
    argv = f"train mot --dim 16 --depth 1 --heads 2 --batch 2 --text-len 8 --steps 2 --eval-every 2 --eval-batches 1 --out {tmp_path}"
    assert main(argv.split()) == 0
    result = json.loads((tmp_path / "routing_mot.json").read_text())
    flops = result["forward_flops_per_token"]
    assert flops["mot"] == flops["dense"] > 0
    assert result["results"]["mot"]["params"] > result["results"]["dense"]["params"]
    assert result["sequence"]["length"] == 8 + 16 + 49


def test_runs_under_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    block = MoTBlock(16, 4, num_modalities=2, qk_norm=True)
    x = torch.randn(2, 8, 16)
    modality = torch.randint(0, 2, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = block(x, modality)
    ref = block(x, modality)
    assert (low.float() - ref).norm() / ref.norm() < 3e-2
