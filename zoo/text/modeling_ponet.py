"""PoNet encoders: masked LM, pretraining and classification heads, Hugging Face key layout.

PoNet: Pooling Network for Efficient Token Mixing in Long Sequences (Tan et al., ICLR 2022,
arXiv 2110.02442; code github lxchtan/PoNet, ``models/modeling_ponet.py``). A BERT encoder
whose self-attention is replaced by PoNet's pooling mixer (``zoo.layers.PoNetMixer``):
global aggregation + segment max-pooling + local max-pooling, fused per head. Everything
else is BERT: embeddings (word + position + token type, LayerNorm), post-LayerNorm layers
(self-output dense + residual + LayerNorm, FFN), a tanh pooler on the first token, an MLM
head tied to the word embeddings and a 3-way sentence-structure head (``seq_relationship``).

Module names equal the Hugging Face checkpoint (``chtan/ponet-base-uncased``), so its state
dict loads as is; ``checkpoint_filter_fn`` only drops the buffers and aliases that old
``transformers`` versions saved (``embeddings.position_ids``, ``cls.predictions.decoder.bias``),
restores the tied decoder weight when it was not saved, strips or adds the ``ponet.``
prefix, and drops pretraining heads the model does not have.

Segments: by default sentences split at [CLS]/[SEP] (ids ``cls_token_id``/``sep_token_id``,
101/102 as in upstream); ``segment_num`` switches to the LRA chunking (equal chunks of
``N // segment_num + 1`` tokens); explicit ``segment_ids`` override both. ``clsgsepg`` keeps
[CLS]/[SEP] out of local windows and gives them zero segment/local terms (upstream default).

Additions of ours, for the Long Range Arena comparisons at equal budget: ``mixer`` swaps the
token mixer for BERT's SDPA self-attention (``"sdpa"``) or FNet's Fourier transform
(``"fnet"``, arXiv 2105.03824); ``classifier_pooling="mean"`` + ``classifier_hidden`` give the
LRA head (masked mean over tokens, two-layer ReLU MLP); ``PoNetForDocumentMatching`` is
the LRA two-tower retrieval head on ``[u, v, u * v, u - v]``. LRA variants keep this
BERT-style post-LN encoder; upstream's LRA code uses pre-LN blocks instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.layers.ponet import PoNetMixer, equal_segment_size, segment_ids_from_separators

__all__ = [
    "FourierMixer",
    "PoNetConfig",
    "PoNetForDocumentMatching",
    "PoNetForMaskedLM",
    "PoNetForPreTraining",
    "PoNetForSequenceClassification",
    "PoNetLayer",
    "PoNetModel",
    "SDPASelfAttention",
    "checkpoint_filter_fn",
]

MIXERS = ("ponet", "sdpa", "fnet")


@dataclass
class PoNetConfig:
    """Hyper-parameters; names follow the Hugging Face ``config.json`` of PoNet (a BertConfig)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1  # used by the "sdpa" mixer only
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    clsgsepg: bool = True
    cls_token_id: int = 101
    sep_token_id: int = 102
    # ours
    segment_num: int | None = None  # None: sentences split at [CLS]/[SEP]; int: LRA equal chunks
    local_kernel: int = 3
    mixer: str = "ponet"  # "ponet" | "sdpa" | "fnet"
    num_labels: int = 2
    classifier_pooling: str = "cls"  # "cls": tanh pooler on the first token | "mean": masked mean
    classifier_hidden: int = 0  # 0: one linear layer; > 0: two-layer ReLU MLP (LRA)
    classifier_dropout: float | None = None  # None: hidden_dropout_prob

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} should be divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer: expected one of {MIXERS}, got {self.mixer!r}")
        if self.classifier_pooling not in ("cls", "mean"):
            raise ValueError(f"classifier_pooling: expected 'cls' or 'mean', got {self.classifier_pooling!r}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act: expected one of {sorted(_ACTIVATIONS)}, got {self.hidden_act!r}")
        if self.segment_num is not None and self.segment_num < 1:
            raise ValueError(f"segment_num: expected None or a positive int, got {self.segment_num}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PoNetConfig:
        """From our dict or a Hugging Face ``config.json`` (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


_ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": lambda: nn.ReLU(),
}


# ----------------------------------------------------------------------------- outputs


@dataclass
class PoNetModelOutput:
    last_hidden_state: Tensor
    pooler_output: Tensor | None = None


@dataclass
class PoNetPreTrainingOutput:
    prediction_logits: Tensor
    seq_relationship_logits: Tensor
    loss: Tensor | None = None
    mlm_loss: Tensor | None = None
    sso_loss: Tensor | None = None


@dataclass
class MaskedLMOutput:
    logits: Tensor
    loss: Tensor | None = None


@dataclass
class SequenceClassifierOutput:
    logits: Tensor
    loss: Tensor | None = None


# ----------------------------------------------------------------------------- mixers


class SDPASelfAttention(nn.Module):
    """BERT self-attention (``query``/``key``/``value``) through ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} should be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)

    def forward(
        self, x: Tensor, padding_mask: Tensor | None = None, segment_ids: Tensor | None = None, **_: Any
    ) -> Tensor:
        B, N, C = x.shape
        H = self.num_heads

        def heads(t: Tensor) -> Tensor:
            return t.view(B, N, H, C // H).transpose(1, 2)

        mask = None
        if padding_mask is not None:
            visible = padding_mask | ~padding_mask.any(dim=1, keepdim=True)  # no NaN on all-pad rows
            mask = visible[:, None, None, :]
        out = F.scaled_dot_product_attention(
            heads(self.query(x)),
            heads(self.key(x)),
            heads(self.value(x)),
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        out = out.transpose(1, 2).reshape(B, N, C)
        return out if padding_mask is None else out.masked_fill(~padding_mask[..., None], 0.0)


class FourierMixer(nn.Module):
    """FNet token mixing: real part of the 2D DFT over (tokens, channels); pads zeroed first and after."""

    def forward(
        self, x: Tensor, padding_mask: Tensor | None = None, segment_ids: Tensor | None = None, **_: Any
    ) -> Tensor:
        if padding_mask is not None:
            x = x.masked_fill(~padding_mask[..., None], 0.0)
        out = torch.fft.fft2(x.float(), dim=(-2, -1)).real.to(x.dtype)
        return out if padding_mask is None else out.masked_fill(~padding_mask[..., None], 0.0)


def _make_mixer(config: PoNetConfig) -> nn.Module:
    if config.mixer == "ponet":
        return PoNetMixer(config.hidden_size, config.num_attention_heads, local_kernel=config.local_kernel)
    if config.mixer == "sdpa":
        return SDPASelfAttention(
            config.hidden_size, config.num_attention_heads, config.attention_probs_dropout_prob
        )
    return FourierMixer()


# ----------------------------------------------------------------------------- encoder


class PoNetEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout (BERT)."""

    def __init__(self, config: PoNetConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.max_positions = config.max_position_embeddings

    def forward(
        self,
        input_ids: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        B, N = inputs_embeds.shape[:2]
        if position_ids is None:
            if N > self.max_positions:
                raise ValueError(
                    f"input: expected at most {self.max_positions} tokens (max_position_embeddings), got {N}"
                )
            position_ids = torch.arange(N, device=inputs_embeds.device)[None]
        if token_type_ids is None:
            token_type_ids = torch.zeros(B, N, dtype=torch.long, device=inputs_embeds.device)
        x = (
            inputs_embeds
            + self.position_embeddings(position_ids)
            + self.token_type_embeddings(token_type_ids)
        )
        return self.dropout(self.LayerNorm(x))


class _DenseLayerNorm(nn.Module):
    """``LayerNorm(dropout(dense(h)) + residual)``: BERT's self-output and output blocks."""

    def __init__(self, in_features: int, config: PoNetConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class PoNetAttention(nn.Module):
    def __init__(self, config: PoNetConfig) -> None:
        super().__init__()
        self.self = _make_mixer(config)
        self.output = _DenseLayerNorm(config.hidden_size, config)

    def forward(self, x: Tensor, **mixing: Any) -> Tensor:
        return self.output(self.self(x, **mixing), x)


class PoNetIntermediate(nn.Module):
    def __init__(self, config: PoNetConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = _ACTIVATIONS[config.hidden_act]()

    def forward(self, x: Tensor) -> Tensor:
        return self.intermediate_act_fn(self.dense(x))


class PoNetLayer(nn.Module):
    """Token mixer + self-output (dense, residual, LayerNorm) + FFN (post-LN, as BERT)."""

    def __init__(self, config: PoNetConfig) -> None:
        super().__init__()
        self.attention = PoNetAttention(config)
        self.intermediate = PoNetIntermediate(config)
        self.output = _DenseLayerNorm(config.intermediate_size, config)

    def forward(self, x: Tensor, **mixing: Any) -> Tensor:
        h = self.attention(x, **mixing)
        return self.output(self.intermediate(h), h)


class PoNetEncoder(nn.Module):
    def __init__(self, config: PoNetConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(PoNetLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: Tensor, **mixing: Any) -> Tensor:
        for layer in self.layer:
            x = layer(x, **mixing)
        return x


class PoNetPooler(nn.Module):
    def __init__(self, config: PoNetConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden: Tensor) -> Tensor:
        return self.activation(self.dense(hidden[:, 0]))


def _as_padding_mask(attention_mask: Tensor | None, shape: tuple[int, int]) -> Tensor | None:
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(
            f"attention_mask: expected shape {tuple(shape)} (1 = real token), got {tuple(attention_mask.shape)}"
        )
    return attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0


class _PoNetPreTrainedModel(nn.Module):
    """Weight init of the Hugging Face PoNet (normal(0, initializer_range), zero biases)."""

    config: PoNetConfig

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def init_weights(self) -> None:
        self.apply(self._init_weights)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the MLM decoder weight with the word embeddings (when there is an MLM head)."""
        predictions = getattr(getattr(self, "cls", None), "predictions", None)
        if predictions is not None:
            predictions.decoder.weight = self.ponet.embeddings.word_embeddings.weight


class PoNetModel(_PoNetPreTrainedModel):
    """The bare encoder: ``last_hidden_state`` (and ``pooler_output`` with the pooler)."""

    def __init__(self, config: PoNetConfig, add_pooling_layer: bool = True) -> None:
        super().__init__()
        self.config = config
        self.embeddings = PoNetEmbeddings(config)
        self.encoder = PoNetEncoder(config)
        self.pooler = PoNetPooler(config) if add_pooling_layer else None
        self.apply(self._init_weights)

    def mixing_arguments(
        self, input_ids: Tensor | None, padding_mask: Tensor | None, segment_ids: Tensor | None, seq_len: int
    ) -> dict[str, Any]:
        """Segments and special tokens for the mixers, from the config and the token ids."""
        cfg = self.config
        special = None
        if input_ids is not None and cfg.clsgsepg:
            special = (input_ids == cfg.cls_token_id) | (input_ids == cfg.sep_token_id)
        args: dict[str, Any] = {"padding_mask": padding_mask, "special_mask": special}
        if segment_ids is not None:
            args["segment_ids"] = segment_ids
        elif cfg.segment_num is not None:
            args["segment_size"] = equal_segment_size(seq_len, cfg.segment_num)
        elif input_ids is not None:
            args["segment_ids"] = segment_ids_from_separators(
                (input_ids == cfg.cls_token_id) | (input_ids == cfg.sep_token_id)
            )
        return args

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        segment_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> PoNetModelOutput:
        """Encode ``input_ids`` ``(B, N)`` (or ``inputs_embeds`` ``(B, N, C)``).

        ``attention_mask``: ``(B, N)``, 1/True = real token. ``segment_ids``: ``(B, N)`` ids that
        override the config's segmentation.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids and inputs_embeds: give exactly one of them")
        if input_ids is not None and (input_ids.dim() != 2 or input_ids.is_floating_point()):
            raise ValueError(
                f"input_ids: expected a (B, N) integer tensor, got {tuple(input_ids.shape)} {input_ids.dtype}"
            )
        B, N = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        padding_mask = _as_padding_mask(attention_mask, (B, N))
        x = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        x = self.encoder(x, **self.mixing_arguments(input_ids, padding_mask, segment_ids, N))
        pooled = self.pooler(x) if self.pooler is not None else None
        return PoNetModelOutput(last_hidden_state=x, pooler_output=pooled)


class PoNetPredictionHeadTransform(nn.Module):
    def __init__(self, config: PoNetConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = _ACTIVATIONS[config.hidden_act]()
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(x)))


class PoNetLMPredictionHead(nn.Module):
    """Transform, then a decoder tied to the word embeddings plus its own output bias."""

    def __init__(self, config: PoNetConfig) -> None:
        super().__init__()
        self.transform = PoNetPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.transform(x)) + self.bias


class PoNetPreTrainingHeads(nn.Module):
    def __init__(self, config: PoNetConfig) -> None:
        super().__init__()
        self.predictions = PoNetLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 3)

    def forward(self, sequence_output: Tensor, pooled_output: Tensor) -> tuple[Tensor, Tensor]:
        return self.predictions(sequence_output), self.seq_relationship(pooled_output)


class PoNetOnlyMLMHead(nn.Module):
    def __init__(self, config: PoNetConfig) -> None:
        super().__init__()
        self.predictions = PoNetLMPredictionHead(config)

    def forward(self, sequence_output: Tensor) -> Tensor:
        return self.predictions(sequence_output)


def _config(config: PoNetConfig | Mapping[str, Any] | None, **overrides: Any) -> PoNetConfig:
    if config is None:
        return PoNetConfig(**overrides)
    if isinstance(config, PoNetConfig):
        return PoNetConfig.from_dict({**config.to_dict(), **overrides})
    return PoNetConfig.from_dict({**dict(config), **overrides})


class PoNetForPreTraining(_PoNetPreTrainedModel):
    """Encoder + MLM head + 3-way sentence-structure head (``seq_relationship``).

    ``loss = mlm_loss + sso_loss`` when ``labels`` (``-100`` = ignored) and
    ``next_sentence_label`` (0, 1, 2) are given.
    """

    def __init__(self, config: PoNetConfig | Mapping[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__()
        self.config = _config(config, **overrides)
        self.ponet = PoNetModel(self.config)
        self.cls = PoNetPreTrainingHeads(self.config)
        self.init_weights()

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        segment_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        next_sentence_label: Tensor | None = None,
    ) -> PoNetPreTrainingOutput:
        enc = self.ponet(input_ids, attention_mask, token_type_ids, segment_ids, position_ids, inputs_embeds)
        logits, sso_logits = self.cls(enc.last_hidden_state, enc.pooler_output)
        out = PoNetPreTrainingOutput(prediction_logits=logits, seq_relationship_logits=sso_logits)
        if labels is not None:
            out.mlm_loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
            out.loss = out.mlm_loss
        if next_sentence_label is not None:
            out.sso_loss = F.cross_entropy(sso_logits.float(), next_sentence_label.flatten())
            out.loss = out.sso_loss if out.loss is None else out.loss + out.sso_loss
        return out


class PoNetForMaskedLM(_PoNetPreTrainedModel):
    """Encoder (no pooler) + MLM head; ``loss`` with ``labels`` (``-100`` = ignored)."""

    def __init__(self, config: PoNetConfig | Mapping[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__()
        self.config = _config(config, **overrides)
        self.ponet = PoNetModel(self.config, add_pooling_layer=False)
        self.cls = PoNetOnlyMLMHead(self.config)
        self.init_weights()

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        segment_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> MaskedLMOutput:
        enc = self.ponet(input_ids, attention_mask, token_type_ids, segment_ids, position_ids, inputs_embeds)
        logits = self.cls(enc.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(logits=logits, loss=loss)


def _classifier(in_features: int, config: PoNetConfig) -> nn.Module:
    if config.classifier_hidden > 0:
        return nn.Sequential(
            nn.Linear(in_features, config.classifier_hidden),
            nn.ReLU(),
            nn.Linear(config.classifier_hidden, config.num_labels),
        )
    return nn.Linear(in_features, config.num_labels)


def _masked_mean(hidden: Tensor, padding_mask: Tensor | None) -> Tensor:
    if padding_mask is None:
        return hidden.mean(dim=1)
    w = padding_mask.to(hidden.dtype)[..., None]
    return (hidden * w).sum(dim=1) / w.sum(dim=1).clamp_min(1)


class PoNetForSequenceClassification(_PoNetPreTrainedModel):
    """Encoder + pooled representation (tanh pooler on [CLS], or masked mean) + classifier."""

    def __init__(self, config: PoNetConfig | Mapping[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__()
        self.config = _config(config, **overrides)
        cfg = self.config
        self.ponet = PoNetModel(cfg, add_pooling_layer=cfg.classifier_pooling == "cls")
        drop = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        self.dropout = nn.Dropout(drop)
        self.classifier = _classifier(cfg.hidden_size, cfg)
        self.init_weights()

    def pooled(self, input_ids: Tensor | None, attention_mask: Tensor | None, **kwargs: Any) -> Tensor:
        enc = self.ponet(input_ids, attention_mask, **kwargs)
        if self.config.classifier_pooling == "cls":
            return enc.pooler_output
        shape = enc.last_hidden_state.shape[:2]
        return _masked_mean(enc.last_hidden_state, _as_padding_mask(attention_mask, shape))

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        segment_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> SequenceClassifierOutput:
        pooled = self.pooled(
            input_ids,
            attention_mask,
            token_type_ids=token_type_ids,
            segment_ids=segment_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
        )
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(logits=logits, loss=loss)


class PoNetForDocumentMatching(_PoNetPreTrainedModel):
    """Two documents through one encoder; classifier on ``[u, v, u * v, u - v]`` of their mean pools (LRA retrieval)."""

    def __init__(self, config: PoNetConfig | Mapping[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__()
        self.config = _config(config, **overrides)
        cfg = self.config
        self.ponet = PoNetModel(cfg, add_pooling_layer=False)
        drop = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        self.dropout = nn.Dropout(drop)
        self.classifier = _classifier(4 * cfg.hidden_size, cfg)
        self.init_weights()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        input_ids_2: Tensor,
        attention_mask_2: Tensor | None,
        labels: Tensor | None = None,
    ) -> SequenceClassifierOutput:
        u = _masked_mean(
            self.ponet(input_ids, attention_mask).last_hidden_state,
            _as_padding_mask(attention_mask, input_ids.shape),
        )
        v = _masked_mean(
            self.ponet(input_ids_2, attention_mask_2).last_hidden_state,
            _as_padding_mask(attention_mask_2, input_ids_2.shape),
        )
        logits = self.classifier(self.dropout(torch.cat([u, v, u * v, u - v], dim=-1)))
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(logits=logits, loss=loss)


# ----------------------------------------------------------------------------- checkpoints

_ALIASES_TO_DROP = ("embeddings.position_ids", "cls.predictions.decoder.bias")


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Map a Hugging Face PoNet state dict (``chtan/ponet-base-uncased`` layout) onto ``model``.

    Our module names are the Hugging Face ones; this drops saved buffers/aliases
    (``*.embeddings.position_ids``, ``cls.predictions.decoder.bias`` = ``cls.predictions.bias``),
    fills ``cls.predictions.decoder.weight`` from the tied word embeddings when absent,
    adds or strips the ``ponet.`` prefix (bare ``PoNetModel`` vs models with heads) and drops
    heads the model lacks (``cls.*`` for a bare encoder; ``ponet.pooler``/``cls.seq_relationship``
    for ``PoNetForMaskedLM``), as ``transformers`` does. Everything else is left for the strict
    load to report.
    """
    own = model.state_dict()
    state = dict(state_dict)
    bare = not any(k.startswith("ponet.") for k in own)
    if bare and any(k.startswith("ponet.") for k in state):
        state = {k[len("ponet.") :]: v for k, v in state.items() if k.startswith("ponet.")}
    elif (
        not bare
        and not any(k.startswith("ponet.") for k in state)
        and any(k.startswith("embeddings.") for k in state)
    ):
        state = {(k if k.startswith("cls.") else f"ponet.{k}"): v for k, v in state.items()}
    if "cls.predictions.bias" not in state and "cls.predictions.decoder.bias" in state:
        state["cls.predictions.bias"] = state["cls.predictions.decoder.bias"]
    state = {k: v for k, v in state.items() if not any(k.endswith(a) for a in _ALIASES_TO_DROP)}
    if "cls.predictions.decoder.weight" in own and "cls.predictions.decoder.weight" not in state:
        word = state.get("ponet.embeddings.word_embeddings.weight")
        if word is not None:
            state["cls.predictions.decoder.weight"] = word
    for prefix in ("ponet.pooler.", "pooler.", "cls.seq_relationship.", "cls.predictions."):
        if not any(k.startswith(prefix) for k in own):
            state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    return state
