"""PoNet encoders: official Hugging Face checkpoint layout, heads, classification, registry."""

import math

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo import checkpoints
from zoo.text import PoNetForMaskedLM, PoNetForPreTraining, PoNetModel, checkpoint_filter_fn
from zoo.text.modeling_ponet import PoNetConfig

TINY = dict(
    vocab_size=120,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=40,
    hidden_dropout_prob=0.0,
)


def official_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the key names of chtan/ponet-base-uncased (transformers 4.7 save)."""
    gen = torch.Generator().manual_seed(seed)
    C, F_, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    def layer_norm(prefix):
        return {f"{prefix}.weight": 1 + rnd(C, scale=0.1), f"{prefix}.bias": rnd(C, scale=0.1)}

    def linear(prefix, out_f, in_f):
        return {f"{prefix}.weight": rnd(out_f, in_f), f"{prefix}.bias": rnd(out_f, scale=0.1)}

    sd = {
        "ponet.embeddings.position_ids": torch.arange(cfg["max_position_embeddings"])[None],
        "ponet.embeddings.word_embeddings.weight": rnd(V, C, scale=1.0),
        "ponet.embeddings.position_embeddings.weight": rnd(cfg["max_position_embeddings"], C, scale=1.0),
        "ponet.embeddings.token_type_embeddings.weight": rnd(2, C, scale=1.0),
        **layer_norm("ponet.embeddings.LayerNorm"),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"ponet.encoder.layer.{i}"
        for name in ("dense_q", "dense_k", "dense_o", "dense_local", "dense_segment"):
            sd.update(linear(f"{p}.attention.self.{name}", C, C))
        sd.update(linear(f"{p}.attention.output.dense", C, C))
        sd.update(layer_norm(f"{p}.attention.output.LayerNorm"))
        sd.update(linear(f"{p}.intermediate.dense", F_, C))
        sd.update(linear(f"{p}.output.dense", C, F_))
        sd.update(layer_norm(f"{p}.output.LayerNorm"))
    sd.update(linear("ponet.pooler.dense", C, C))
    sd.update(linear("cls.predictions.transform.dense", C, C))
    sd.update(layer_norm("cls.predictions.transform.LayerNorm"))
    sd["cls.predictions.bias"] = rnd(V, scale=0.1)
    sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"]
    sd["cls.predictions.decoder.weight"] = sd["ponet.embeddings.word_embeddings.weight"]
    sd.update(linear("cls.seq_relationship", 3, C))
    return sd


def upstream_forward(sd, input_ids, attention_mask, cfg, cls_id=101, sep_id=102):
    """The upstream Hugging Face PoNet forward, written from its equations with its constants
    (-10000 additive mask, -10000 fills, MaxPool1d, segment index = cumsum - 1 at [CLS]/[SEP])."""
    sd = {k: v.double() for k, v in sd.items()}
    C, H = cfg["hidden_size"], cfg["num_attention_heads"]
    D = C // H
    B, N = input_ids.shape
    eps = 1e-12

    def lin(x, p):
        return x @ sd[f"{p}.weight"].T + sd[f"{p}.bias"]

    def ln(x, p):
        return F.layer_norm(x, (C,), sd[f"{p}.weight"], sd[f"{p}.bias"], eps)

    def heads(t):
        return t.view(B, N, H, D).permute(0, 2, 1, 3)

    x = (
        sd["ponet.embeddings.word_embeddings.weight"][input_ids]
        + sd["ponet.embeddings.position_embeddings.weight"][torch.arange(N)][None]
        + sd["ponet.embeddings.token_type_embeddings.weight"][0]
    )
    x = ln(x, "ponet.embeddings.LayerNorm")
    ext = (1.0 - attention_mask.double())[:, None, None, :] * -10000.0
    special = (input_ids == cls_id) | (input_ids == sep_id)
    mark = special.long()
    mark = mark + torch.cat([torch.zeros_like(mark[:, :1]), mark[:, :-1]], dim=1)
    seg_index = mark.cumsum(1) - 1
    pad = ext.squeeze(1).unsqueeze(-1) < -1  # (B, 1, N, 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"ponet.encoder.layer.{i}.attention.self"
        Q, K, O = heads(lin(x, f"{p}.dense_q")), heads(lin(x, f"{p}.dense_k")), heads(lin(x, f"{p}.dense_o"))
        Qm = Q.masked_fill(pad, 0.0)
        q = Qm.sum(-2) / torch.ones_like(pad).double().masked_fill(pad, 0.0).sum(-2)
        att = torch.einsum("bdh,bdlh->bdl", q, K) / math.sqrt(D) + ext.squeeze(1)
        v = torch.einsum("bdlh,bdl->bdh", K, att.softmax(-1))
        seg = lin(x, f"{p}.dense_segment").masked_fill(pad.squeeze(1), -10000.0)
        loc = lin(x, f"{p}.dense_local").masked_fill(pad.squeeze(1), -10000.0)
        loc = loc.masked_fill(special[..., None], -10000.0)
        loc = torch.nn.MaxPool1d(3, stride=1, padding=1)(loc.permute(0, 2, 1)).permute(0, 2, 1)
        seg_max = torch.empty_like(seg)
        for b in range(B):
            for s in seg_index[b].unique():
                members = seg_index[b] == s
                seg_max[b, members] = seg[b, members].amax(0)
        seg_max = seg_max.masked_fill(special[..., None], 0.0)
        loc = loc.masked_fill(special[..., None], 0.0)
        ctx = (v.unsqueeze(-2) + heads(seg_max)) * O + heads(loc)
        ctx = ctx.permute(0, 2, 1, 3).reshape(B, N, C).masked_fill(pad.squeeze(1), 0.0)
        p = f"ponet.encoder.layer.{i}"
        h = ln(lin(ctx, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
        inter = F.gelu(lin(h, f"{p}.intermediate.dense"))
        x = ln(lin(inter, f"{p}.output.dense") + h, f"{p}.output.LayerNorm")
    pooled = torch.tanh(lin(x[:, 0], "ponet.pooler.dense"))
    t = ln(F.gelu(lin(x, "cls.predictions.transform.dense")), "cls.predictions.transform.LayerNorm")
    mlm = t @ sd["cls.predictions.decoder.weight"].T + sd["cls.predictions.bias"]
    return mlm, lin(pooled, "cls.seq_relationship")


def sentence_pair_batch():
    ids = torch.tensor(
        [
            [101, 7, 8, 9, 102, 10, 11, 102, 0, 0, 0, 0],
            [101, 12, 13, 102, 14, 15, 16, 17, 18, 102, 19, 102],
        ]
    )
    return ids, (ids != 0).long()


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_official_checkpoint_gives_same_logits(tmp_path, suffix):
    sd = official_state_dict(TINY)
    path = tmp_path / f"pytorch_model{suffix}"
    if suffix == ".bin":
        torch.save(sd, path)
    else:  # newer transformers save tied weights once and drop the decoder.bias alias
        checkpoints.save({k: v for k, v in sd.items() if not k.startswith("cls.predictions.decoder")}, path)
    model = zoo.create("ponet_base_uncased", checkpoint=path, **TINY).double().eval()
    ids, mask = sentence_pair_batch()
    out = model(ids, mask)
    mlm, sso = upstream_forward(sd, ids, mask, TINY)
    assert out.prediction_logits.shape == (
        2,
        12,
        TINY["vocab_size"],
    ) and out.seq_relationship_logits.shape == (2, 3)
    torch.testing.assert_close(out.prediction_logits, mlm, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.seq_relationship_logits, sso, rtol=1e-10, atol=1e-10)
    assert model.cls.predictions.decoder.weight is model.ponet.embeddings.word_embeddings.weight


def test_checkpoint_missing_or_misnamed_key_is_refused(tmp_path):
    sd = official_state_dict(TINY)
    sd.pop("ponet.encoder.layer.1.attention.self.dense_local.weight")
    sd["ponet.encoder.layer.1.attention.self.dense_v.weight"] = torch.zeros(32, 32)
    torch.save(sd, tmp_path / "bad.bin")
    with pytest.raises(checkpoints.CheckpointError) as err:
        zoo.create("ponet_base_uncased", checkpoint=tmp_path / "bad.bin", **TINY)
    assert "layer.1.attention.self.dense_local.weight" in str(err.value) and "dense_v" in str(err.value)


def test_masked_lm_and_bare_encoder_load_the_pretraining_checkpoint():
    sd = official_state_dict(TINY)
    cfg = PoNetConfig(**TINY)
    pre = PoNetForPreTraining(cfg).double().eval()
    checkpoints.load_into(pre, sd, filter_fn=checkpoint_filter_fn)
    mlm = PoNetForMaskedLM(cfg).double().eval()
    checkpoints.load_into(mlm, sd, filter_fn=checkpoint_filter_fn)  # strict: pooler, seq_relationship dropped
    bare = PoNetModel(cfg).double().eval()
    checkpoints.load_into(bare, sd, filter_fn=checkpoint_filter_fn)  # strict: ponet. prefix stripped
    ids, mask = sentence_pair_batch()
    ref = pre(ids, mask)
    torch.testing.assert_close(mlm(ids, mask).logits, ref.prediction_logits)
    torch.testing.assert_close(bare(ids, mask).pooler_output, pre.ponet(ids, mask).pooler_output)
    # and our own save of a model loads back through the same path
    checkpoints.load_into(pre, bare.state_dict(), filter_fn=checkpoint_filter_fn, strict=False)


def test_pretraining_heads_and_losses():
    model = PoNetForPreTraining(PoNetConfig(**TINY)).eval()
    ids, mask = sentence_pair_batch()
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 5] = 9, 15
    sso_labels = torch.tensor([0, 2])
    out = model(ids, mask, labels=labels, next_sentence_label=sso_labels)
    mlm = F.cross_entropy(out.prediction_logits[labels != -100], labels[labels != -100])
    sso = F.cross_entropy(out.seq_relationship_logits, sso_labels)
    torch.testing.assert_close(out.mlm_loss, mlm)
    torch.testing.assert_close(out.sso_loss, sso)
    torch.testing.assert_close(out.loss, mlm + sso)
    out.loss.backward()
    assert model.ponet.encoder.layer[0].attention.self.dense_segment.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mixer", ["ponet", "sdpa", "fnet"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_sequence_classification_ignores_pads(mixer, pooling):
    model = zoo.create(
        "ponet_lra_listops",
        mixer=mixer,
        classifier_pooling=pooling,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
    ).eval()
    ids = torch.randint(1, 16, (3, 40))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    mask[2, 10:] = 0
    out = model(ids, mask, labels=torch.tensor([0, 3, 9]))
    assert out.logits.shape == (3, 10) and out.loss.ndim == 0
    ids2 = ids.masked_fill(mask == 0, 5)
    torch.testing.assert_close(model(ids2, mask).logits, out.logits, rtol=1e-5, atol=1e-6)
    # a row alone gives the same logits as in the batch, truncated to its real length
    alone = model(ids[2:3, :10], mask[2:3, :10]).logits
    if mixer != "fnet" and pooling == "mean":  # the DFT over tokens depends on the padded length
        torch.testing.assert_close(alone[0], out.logits[2], rtol=1e-5, atol=1e-6)


def test_lra_segment_num_uses_equal_chunks():
    model = zoo.create("ponet_lra_listops", max_position_embeddings=128).eval()
    args = model.ponet.mixing_arguments(None, None, None, 100)
    assert args["segment_size"] == 100 // 64 + 1
    base = zoo.create("ponet_base_uncased", **TINY)
    ids, mask = sentence_pair_batch()
    args = base.ponet.mixing_arguments(ids, mask.bool(), None, ids.shape[1])
    assert args["segment_ids"][0].tolist() == [0, 1, 1, 1, 2, 3, 3, 4, 5, 5, 5, 5]
    assert args["special_mask"][0].tolist() == [bool(t in (101, 102)) for t in ids[0].tolist()]


def test_every_text_variant_builds_and_trains_a_step():
    for name in zoo.list_models(family="text"):
        overrides = dict(max_position_embeddings=64)
        if name == "ponet_base_uncased":
            overrides.update(TINY)
        model = zoo.create(name, **overrides)
        ids = torch.randint(1, 30, (2, 24))
        mask = torch.ones_like(ids)
        if name == "ponet_lra_retrieval":
            out = model(ids, mask, ids.flip(1), mask, labels=torch.tensor([0, 1]))
        elif name == "ponet_base_uncased":
            out = model(ids, mask, labels=ids, next_sentence_label=torch.tensor([0, 1]))
        else:
            out = model(ids, mask, labels=torch.tensor([0, 1]))
        out.loss.backward()
        assert torch.isfinite(out.loss)
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) >= 0.9 * len(grads)


def test_model_errors():
    with pytest.raises(ValueError, match="hidden_size 30 should be divisible by num_attention_heads 4"):
        PoNetConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="mixer: expected one of"):
        zoo.create("ponet_lra_listops", mixer="flash")
    model = zoo.create("ponet_lra_listops", max_position_embeddings=16)
    with pytest.raises(ValueError, match="expected at most 16 tokens"):
        model(torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids: expected a \\(B, N\\) integer tensor"):
        model(torch.ones(1, 4))
    with pytest.raises(ValueError, match="attention_mask: expected shape \\(1, 4\\)"):
        model(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 5))
