"""zoo.llm.sparse_prefill on a tiny random LlamaForCausalLM (GQA), through transformers' registry."""

from __future__ import annotations

import pytest
import torch

from zoo.llm import sparse_prefill, unpatch
from zoo.llm.patch import ATTENTION_NAME

FULL_BUDGET = [
    ("xattention", dict(block_size=16, stride=4, threshold=1.0)),
    ("pbs", dict(block_size=16, segment_size=32, threshold=1.0)),
    ("minference", dict(pattern="vertical_slash", block_size=16, vertical_size=500, slash_size=500)),
    ("minference", dict(pattern="block_sparse", block_size=16, topk=100)),
]


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 300, (2, 100), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method,cfg", FULL_BUDGET)
def test_full_budget_logits_equal_unpatched_model(tiny_llama, ids, method, cfg):
    with torch.no_grad():
        dense = tiny_llama(input_ids=ids).logits
        calls = []
        with sparse_prefill(tiny_llama, method, recorder=lambda layer, *rest: calls.append(layer), **cfg):
            assert tiny_llama.config._attn_implementation == ATTENTION_NAME
            sparse = tiny_llama(input_ids=ids).logits
    torch.testing.assert_close(sparse, dense, rtol=0, atol=2e-5)
    assert calls == [0, 1]  # every layer went through the sparse path


def test_sparse_threshold_changes_logits_and_unpatch_restores(tiny_llama, ids):
    with torch.no_grad():
        dense = tiny_llama(input_ids=ids).logits
        handle = sparse_prefill(tiny_llama, "xattention", block_size=16, stride=4, threshold=0.2)
        sparse = tiny_llama(input_ids=ids).logits
        assert (sparse - dense).abs().max() > 1e-3
        with pytest.raises(ValueError, match="already patched"):
            sparse_prefill(tiny_llama, "pbs")
        unpatch(tiny_llama)
        assert tiny_llama.config._attn_implementation == "sdpa"
        assert not any(hasattr(m, "_zoo_sparse_prefill") for m in tiny_llama.modules())
        torch.testing.assert_close(tiny_llama(input_ids=ids).logits, dense, rtol=0, atol=0)
        handle.unpatch()  # a second unpatch is harmless


def test_decode_stays_dense_and_generation_matches_at_full_budget(tiny_llama, ids):
    prompt = ids[:1, :80]
    with torch.no_grad():
        expected = tiny_llama.generate(prompt, max_new_tokens=6, do_sample=False)
        seen = []
        with sparse_prefill(
            tiny_llama,
            "xattention",
            block_size=16,
            stride=4,
            threshold=1.0,
            recorder=lambda *a: seen.append(a[1].shape[2]),
        ):
            got = tiny_llama.generate(prompt, max_new_tokens=6, do_sample=False)
        with sparse_prefill(tiny_llama, "pbs", block_size=16, segment_size=32, threshold=0.3):
            sparse_tokens = tiny_llama.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)
    assert seen == [80, 80]  # only the prefill (80 queries, both layers) was sparse
    assert sparse_tokens.shape == expected.shape


def test_batch_with_left_padding_equals_dense_on_valid_tokens(tiny_llama, ids):
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :37] = 0
    with torch.no_grad():
        dense = tiny_llama(input_ids=ids, attention_mask=attention_mask).logits
        shapes = []
        with sparse_prefill(
            tiny_llama,
            "pbs",
            block_size=16,
            segment_size=32,
            threshold=1.0,
            recorder=lambda *a: shapes.append(a[1].shape),
        ):
            sparse = tiny_llama(input_ids=ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(sparse[0], dense[0], rtol=0, atol=2e-5)
    torch.testing.assert_close(sparse[1, 37:], dense[1, 37:], rtol=0, atol=2e-5)
    # each padded row ran on its own valid span: 100 and 63 tokens
    assert sorted({tuple(s)[2] for s in shapes}) == [63, 100]


def test_layer_selection_and_context_manager(tiny_llama, ids):
    calls = []
    with (
        torch.no_grad(),
        sparse_prefill(
            tiny_llama,
            "xattention",
            block_size=16,
            stride=4,
            skip_layers=[0],
            recorder=lambda layer, *a: calls.append(layer),
        ) as handle,
    ):
        tiny_llama(input_ids=ids)
        assert handle.layers == {1: handle.layers[1]} and handle.layers[1] is not None
    assert calls == [1]
    assert tiny_llama.config._attn_implementation == "sdpa"
    with (
        torch.no_grad(),
        sparse_prefill(tiny_llama, "xattention", min_prefill=200, recorder=lambda *a: calls.append(-1)),
    ):
        tiny_llama(input_ids=ids)  # 100 new tokens < min_prefill: dense
    assert calls == [1]


def test_bad_arguments_raise_clear_errors(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="method"):
        sparse_prefill(tiny_llama, "flash")
    with pytest.raises(ValueError, match="layer indices"):
        sparse_prefill(tiny_llama, "xattention", layers=[0, 5])
    with pytest.raises(ValueError, match="config_path: only method='minference'"):
        sparse_prefill(tiny_llama, "pbs", config_path=tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="config_path: no such file"):
        sparse_prefill(tiny_llama, "xattention", config_path=tmp_path / "x.json")
    with pytest.raises(ValueError, match="threshold"):
        sparse_prefill(tiny_llama, "xattention", threshold=2.0)
    with pytest.raises(ValueError, match="no attention layers"):
        sparse_prefill(torch.nn.Linear(2, 2), "xattention")
    assert tiny_llama.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", ["Qwen2", "Mistral"])
def test_other_decoder_families_patch_the_same_way(family, ids):
    import transformers

    config = getattr(transformers, f"{family}Config")(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, sliding_window=None, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    calls = []
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        with sparse_prefill(
            model,
            "pbs",
            block_size=16,
            segment_size=32,
            threshold=1.0,
            recorder=lambda *a: calls.append(a[0]),
        ):
            sparse = model(input_ids=ids).logits
    torch.testing.assert_close(sparse, dense, rtol=0, atol=2e-5)
    assert calls == [0, 1]


def test_capture_attention_inputs_sees_every_layer_of_a_dense_pass(tiny_llama):
    from zoo.llm.patch import capture_attention_inputs

    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(5))
    seen = {}
    capture_attention_inputs(tiny_llama, ids, lambda i, q, k, v, scale: seen.setdefault(i, (q, k, v, scale)))
    assert sorted(seen) == [0, 1]
    q, k, v, scale = seen[0]
    assert q.shape == (1, 4, 40, 16) and k.shape == v.shape == (1, 2, 40, 16)  # GQA kept unrepeated
    assert scale == pytest.approx(16**-0.5)
    assert tiny_llama.config._attn_implementation == "sdpa"  # restored
    # the layer's own attention on the captured inputs is what the dense model computes
    kr, vr = (t.repeat_interleave(2, dim=1) for t in (k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    captured_out = {}

    def keep_output(mod, args, out):
        captured_out["o"] = out[0]

    hook = tiny_llama.model.layers[0].self_attn.register_forward_hook(keep_output)
    try:
        with torch.no_grad():
            tiny_llama(input_ids=ids)
    finally:
        hook.remove()
    expected = tiny_llama.model.layers[0].self_attn.o_proj(ref.transpose(1, 2).reshape(1, 40, 64))
    torch.testing.assert_close(captured_out["o"], expected, rtol=1e-4, atol=1e-5)


def _dense_causal_reference(q, k, v):
    """fp64 causal attention with the keys repeated for grouped-query heads."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    n, m = q.shape[2], k.shape[2]
    future = torch.arange(m)[None, :] > (m - n) + torch.arange(n)[:, None]
    return scores.masked_fill(future, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("rows", [0, 1, 5])
def test_last_rows_of_a_sparse_call_are_dense(rows):
    """The last ``dense_last_rows`` query rows are exact attention; the rows before are the method's own."""
    from zoo.layers import XAttention
    from zoo.llm.patch import _LayerState, _sparse_call

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 96, 16, generator=gen) for h in (4, 2, 2))
    method = XAttention(block_size=16, stride=4, threshold=0.2)
    plain = _sparse_call(_LayerState(0, method, 0, dense_last_rows=0), q, k, v, True, None)
    out = _sparse_call(_LayerState(0, method, 0, dense_last_rows=rows), q, k, v, True, None)
    exact = _dense_causal_reference(q, k, v)
    assert (plain - exact).abs().amax(dim=(0, 1, 3))[-1] > 1e-3  # the method alone misses the last row
    if rows:
        torch.testing.assert_close(out[:, :, -rows:].double(), exact[:, :, -rows:], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:, :, : 96 - rows], plain[:, :, : 96 - rows], rtol=0, atol=0)


def test_dense_last_rows_must_be_a_count(tiny_llama):
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="dense_last_rows: expected an integer >= 0"):
            sparse_prefill(tiny_llama, "xattention", dense_last_rows=bad)
