"""q/k/v captured from the LRA Transformer (``mixer="sdpa"``) are the attention the model computed."""

import json

import numpy as np
import pytest
import torch

import zoo
from zoo import checkpoints
from zoo.layers.approx_eval import exact_attention, load_samples
from zoo.text.capture_qkv import capture_self_attention_qkv, main, select_examples

TINY = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)


def _tiny_model(mixer="sdpa", seed=0, **overrides):
    torch.manual_seed(seed)
    model = zoo.create("ponet_lra_image", mixer=mixer, **{**TINY, **overrides})
    with torch.no_grad():  # weights large enough for peaked, head-dependent attention
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.6)
    return model


def _hook_layers(model):
    """Inputs and outputs of every attention mixer, recorded independently of the capture."""
    seen = []
    handles = [
        layer.attention.self.register_forward_hook(
            lambda m, args, out: seen.append((args[0].detach().double(), out.detach().double()))
        )
        for layer in model.ponet.encoder.layer
    ]
    return seen, handles


def test_captured_qkv_reproduce_each_layers_attention():
    model = _tiny_model()
    ids = torch.randint(0, 256, (3, 40))
    seen, handles = _hook_layers(model)
    samples = capture_self_attention_qkv(model, ids, torch.ones(3, 40, dtype=torch.bool), label="t")
    for h in handles:
        h.remove()
    assert [s.name for s in samples] == [f"t.ponet.encoder.layer.{i}.attention.self" for i in range(2)]
    for s, (x, context), layer in zip(samples, seen, model.ponet.encoder.layer):
        assert s.q.shape == s.k.shape == s.v.shape == (3, 2, 40, 8) and not s.causal
        # q, k, v: the layer's projections of its input, split into heads (B, H, N, D)
        for t, proj in ((s.q, layer.attention.self.query), (s.k, layer.attention.self.key),
                        (s.v, layer.attention.self.value)):  # fmt: skip
            ref = (x @ proj.weight.double().T + proj.bias.double()).view(3, 40, 2, 8).transpose(1, 2)
            torch.testing.assert_close(t.double(), ref, rtol=1e-5, atol=1e-5)
        # softmax(q k^T / sqrt(d)) v, written out in fp64, is the context before the output projection
        q, k, v = s.q.double(), s.k.double(), s.v.double()
        out = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v
        torch.testing.assert_close(out.transpose(1, 2).reshape(3, 40, 16), context, rtol=1e-5, atol=1e-5)
        # the attention is far from uniform: the check above tells heads and positions apart
        probs = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
        assert probs.max() > 0.5
        assert not torch.allclose(s.q[:, 0], s.q[:, 1])


def test_model_is_left_as_it_was_and_output_unchanged():
    model = _tiny_model(attention_probs_dropout_prob=0.5)
    model.train()
    ids = torch.randint(0, 256, (2, 24))
    model.eval()
    expected = model(ids).logits
    model.train()
    samples = capture_self_attention_qkv(model, ids)
    assert model.training and len(samples) == 2
    assert not model.ponet.encoder.layer[0].attention.self._forward_hooks
    model.eval()
    torch.testing.assert_close(model(ids).logits, expected)


def test_file_is_what_approx_eval_reads(tmp_path):
    from zoo.layers.approx_eval import save_samples

    model = _tiny_model()
    ids = torch.randint(0, 256, (2, 32))
    seen, handles = _hook_layers(model)
    samples = capture_self_attention_qkv(model, ids)
    for h in handles:
        h.remove()
    loaded = load_samples(save_samples(samples, tmp_path / "qkv.safetensors"))
    assert [s.name for s in loaded] == [s.name for s in samples]
    for s, (_, context) in zip(loaded, seen):
        assert not s.causal
        out = exact_attention(s.q, s.k, s.v, causal=False)
        torch.testing.assert_close(out.transpose(1, 2).reshape(2, 32, 16), context, rtol=1e-5, atol=1e-5)


def test_a_layer_that_is_not_plain_attention_is_refused():
    model = _tiny_model()
    model.ponet.encoder.layer[1].attention.self.register_forward_hook(lambda m, a, out: 2 * out)
    with pytest.raises(RuntimeError, match="layer ponet.encoder.layer.1.attention.self differs"):
        capture_self_attention_qkv(model, torch.randint(0, 256, (1, 16)))


def test_bad_inputs():
    model = _tiny_model()
    ids = torch.randint(0, 256, (2, 16))
    with pytest.raises(ValueError, match=r"input_ids: expected a \(B, N\) integer tensor"):
        capture_self_attention_qkv(model, ids.float())
    with pytest.raises(ValueError, match=r"input_ids: expected a \(B, N\) integer tensor, got \(16,\)"):
        capture_self_attention_qkv(model, ids[0])
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(2, 16\)"):
        capture_self_attention_qkv(model, ids, torch.ones(2, 15, dtype=torch.bool))
    padded = torch.ones(2, 16, dtype=torch.bool)
    padded[1, 12:] = False
    with pytest.raises(ValueError, match="attention_mask: expected no padding .* got 4 padded"):
        capture_self_attention_qkv(model, ids, padded)
    with pytest.raises(ValueError, match="model: expected SDPASelfAttention layers .*'ponet'"):
        capture_self_attention_qkv(_tiny_model(mixer="ponet"), ids)
    with pytest.raises(ValueError, match="count: expected 1 to 10 examples, got 11"):
        select_examples(10, 11)
    with pytest.raises(ValueError, match="count: expected 1 to 10 examples, got 0"):
        select_examples(10, 0)


def test_select_examples_spreads_over_the_split():
    assert select_examples(10, 4) == [0, 2, 5, 7]
    assert select_examples(3, 3) == [0, 1, 2]


@pytest.fixture
def tiny_fashion_mnist(tmp_path, monkeypatch, write_idx):
    rng = np.random.default_rng(0)
    data = tmp_path / "fmnist"
    data.mkdir()
    test_x = rng.integers(0, 256, (4, 784))
    write_idx(data / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (6, 784)))
    write_idx(data / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 6), labels=True)
    write_idx(data / "t10k-images-idx3-ubyte.gz", test_x)
    write_idx(data / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 4), labels=True)
    monkeypatch.setenv("ZOO_FASHION_MNIST", str(data))
    return test_x


def _run_dir(tmp_path, mixer):
    run = tmp_path / f"image_{mixer}"
    run.mkdir()
    config = {**TINY, "max_position_embeddings": 784, "mixer": mixer}
    model = _tiny_model(**config)
    checkpoints.save(model.state_dict(), run / "best.safetensors")
    (run / "results.json").write_text(json.dumps({"model": "ponet_lra_image", "model_config": config}))
    return run, model


def test_command_captures_held_out_images(tmp_path, tiny_fashion_mnist):
    run, model = _run_dir(tmp_path, "sdpa")
    out = tmp_path / "qkv.safetensors"
    assert main(["--checkpoint", str(run / "best.safetensors"), "--count", "2", "--out", str(out)]) == 0
    info = json.loads(out.with_suffix(".json").read_text())
    assert (
        info["indices"] == [0, 2] and info["split"] == "test" and info["config_from"].endswith("results.json")
    )
    loaded = load_samples(out)
    assert len(loaded) == 2 and all(s.q.shape == (2, 2, 784, 8) and not s.causal for s in loaded)
    # the first layer's q is the query projection of the embedded test images 0 and 2
    ids = torch.as_tensor(tiny_fashion_mnist[[0, 2]], dtype=torch.long)
    model.eval()
    with torch.no_grad():
        x = model.ponet.embeddings(ids)
        q = model.ponet.encoder.layer[0].attention.self.query(x).view(2, 784, 2, 8).transpose(1, 2)
    torch.testing.assert_close(loaded[0].q, q, rtol=1e-5, atol=1e-5)


def test_command_refuses_a_model_without_attention(tmp_path, tiny_fashion_mnist):
    run, _ = _run_dir(tmp_path, "fnet")
    with pytest.raises(ValueError, match="checkpoint: expected a model trained with mixer 'sdpa'.*'fnet'"):
        main(["--checkpoint", str(run / "best.safetensors"), "--out", str(tmp_path / "x.safetensors")])
    with pytest.raises(ValueError, match="checkpoint: no such file"):
        main(
            ["--checkpoint", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "x.safetensors")]
        )
