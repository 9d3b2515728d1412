"""q/k/v captured from an image classifier's SDPA attention are the attention the model computed."""

import json

import numpy as np
import pytest
import timm
import torch
from torch import nn

from zoo import checkpoints
from zoo.layers.approx_eval import exact_attention, load_samples
from zoo.vision.capture_qkv import capture_image_attention_qkv, main

TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def _tiny_vit(seed=0, **overrides):
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", **{**TINY_VIT, **overrides})
    with torch.no_grad():  # weights large enough for peaked, head-dependent attention
        for block in model.blocks:
            block.attn.qkv.weight.normal_(0.0, 0.5)
    return model


def _attention_inputs_and_outputs(model):
    """(normed input, attention output before proj) of every block, recorded independently of the capture."""
    seen = []
    handles = [
        block.attn.proj.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().double()))
        for block in model.blocks
    ]
    inputs = []
    handles += [
        block.norm1.register_forward_hook(lambda m, args, out: inputs.append(out.detach().double()))
        for block in model.blocks
    ]
    return inputs, seen, handles


def test_captured_qkv_reproduce_each_blocks_attention():
    model = _tiny_vit()
    images = torch.randn(3, 3, 16, 16)
    inputs, contexts, handles = _attention_inputs_and_outputs(model)
    samples, logits = capture_image_attention_qkv(model, images, label="t")
    for h in handles:
        h.remove()
    assert model.training  # restored
    assert [s.name for s in samples] == ["t.blocks.0.attn", "t.blocks.1.attn"]
    for s, x, context, block in zip(samples, inputs, contexts, model.blocks):
        assert (
            s.q.shape == s.k.shape == s.v.shape == (3, 2, 17, 16) and not s.causal
        )  # 16 patches + class token
        # q, k, v: the block's qkv projection of its normed input, split into heads
        qkv = x @ block.attn.qkv.weight.double().T + block.attn.qkv.bias.double()
        ref = qkv.view(3, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
        for t, r in zip((s.q, s.k, s.v), ref):
            torch.testing.assert_close(t.double(), r, rtol=1e-5, atol=1e-5)
        out = exact_attention(s.q.double(), s.k.double(), s.v.double(), causal=False)
        torch.testing.assert_close(out.transpose(1, 2).reshape(3, 17, 32), context, rtol=1e-5, atol=1e-5)
        probs = torch.softmax(s.q.double() @ s.k.double().transpose(-1, -2) / 4, -1)
        assert probs.max() > 0.5  # far from uniform: the checks above tell positions apart
    with torch.no_grad():
        torch.testing.assert_close(logits, model.eval()(images))  # the output of the same forward pass


def test_a_model_without_sdpa_or_with_masks_is_refused():
    model = _tiny_vit()
    for block in model.blocks:
        block.attn.fused_attn = False  # attention written out by hand: nothing to capture
    with pytest.raises(ValueError, match="model: expected attention through F.scaled_dot_product_attention"):
        capture_image_attention_qkv(model, torch.randn(1, 3, 16, 16))

    class Causal(nn.Module):
        def forward(self, x):
            q = x.flatten(2).transpose(1, 2)[:, None]
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)

    with pytest.raises(RuntimeError, match="called with a mask or is_causal"):
        capture_image_attention_qkv(Causal(), torch.randn(1, 4, 4, 4))


def test_bad_images():
    model = _tiny_vit()
    with pytest.raises(
        ValueError, match=r"images: expected a \(B, C, H, W\) floating tensor, got \(3, 16, 16\)"
    ):
        capture_image_attention_qkv(model, torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match=r"images: expected a \(B, C, H, W\) floating tensor.*torch.uint8"):
        capture_image_attention_qkv(model, torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def _write_idx(folder, split, images, labels):
    import gzip

    n = len(labels)
    with gzip.open(folder / f"{split}-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + images.tobytes())
    with gzip.open(folder / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + labels.tobytes())


def test_main_writes_what_approx_eval_reads(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "fm"
    data.mkdir()
    _write_idx(
        data, "t10k", rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), np.arange(10, dtype=np.uint8)
    )
    model = _tiny_vit(img_size=28, patch_size=7)
    meta = {"model": "vit_tiny_patch16_224", "num_classes": "10",
            "model_kwargs": json.dumps({k: v for k, v in {**TINY_VIT, "img_size": 28, "patch_size": 7}.items()
                                        if k != "num_classes"}),
            "data_config": json.dumps({"input_size": [3, 28, 28]})}  # fmt: skip
    ckpt = checkpoints.save(model.state_dict(), tmp_path / "model.safetensors", metadata=meta)
    out = tmp_path / "qkv.safetensors"
    assert main(["--checkpoint", str(ckpt), "--data-dir", str(data), "--count", "4", "--out", str(out)]) == 0
    samples = load_samples(out)
    assert [s.name for s in samples] == [
        f"vit_tiny_patch16_224_fashion_mnist.blocks.{i}.attn" for i in range(2)
    ]
    assert samples[0].q.shape == (4, 2, 17, 16)
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["indices"] == [0, 2, 5, 7] and info["labels"] == [0, 2, 5, 7]
    assert len(info["predictions"]) == 4 and 0.0 <= info["accuracy_on_these"] <= 1.0
    with pytest.raises(ValueError, match="count: expected 1 to 10 examples, got 11"):
        main(["--checkpoint", str(ckpt), "--data-dir", str(data), "--count", "11", "--out", str(out)])
