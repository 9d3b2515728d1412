"""A small Llama-style causal LM of our own, as a Hugging Face ``LlamaForCausalLM``.

"LLaMA: Open and Efficient Foundation Language Models" (Touvron et al., arXiv 2302.13971), with
grouped-query attention ("GQA: Training Generalized Multi-Query Transformer Models from
Multi-Head Checkpoints", Ainslie et al., arXiv 2305.13245) and rotary position embeddings
("RoFormer", Su et al., arXiv 2104.09864).

The architecture is built through ``transformers`` (imported inside the builder), so every
Hugging Face tool, and :func:`zoo.llm.sparse_prefill`, applies to it unchanged. It exists so that
the sparse-prefill methods can be trained, evaluated and demonstrated with nothing downloaded
from a hub: ``zoo train lm-data`` builds a byte-level BPE tokenizer and token files from offline
English text (King James Bible, GCIDE dictionary, Jargon File), ``zoo train lm`` trains it, and
the shipped weights (``zoo/weights``, bf16 safetensors under 20 MB) are registered from the
JSON record that the training command writes beside them.

Size: 9.2M parameters (vocabulary 4096, width 384, 6 layers, 6 query heads of 64 and 2 key/value
heads, SwiGLU width 768, tied embeddings), context 8192 with RoPE base 100000. Tens of millions
of parameters would not fit the 20 MB limit of shipped weights even in bf16 (2 bytes each).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo.registry import PretrainedTag, register_model, register_pretrained, weights_dir

__all__ = [
    "LLM_ARCHS",
    "PAD_ID",
    "BOS_ID",
    "EOS_ID",
    "build_llama",
    "load_pretrained_tokenizer",
    "register_shipped_weights",
    "sequence_nll",
    "token_nll",
]

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")

LLM_ARCHS: dict[str, dict[str, Any]] = {
    "zoo_llama_9m": dict(
        vocab_size=4096,
        hidden_size=384,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    ),
}
PAPER = ("LLaMA: Open and Efficient Foundation Language Models", "2302.13971")
EVAL_COMMAND = "zoo eval prefill --model zoo_llama_9m.kjv_gcide"


def _drop_tied_head(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State dicts of a tied model hold the embedding once (the head is the same tensor)."""
    state_dict.pop(prefix + "lm_head.weight", None)


def _keep_rotary_frequencies_fp32(model: nn.Module) -> None:
    """Keep RoPE's ``inv_freq`` exact in fp32 when the model is cast (``model.to(torch.bfloat16)``).

    A cast rounds the frequencies to 8 mantissa bits; at position p the phase then drifts by
    p times that error, which destroys retrieval a few thousand tokens back.
    """
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None or not isinstance(getattr(rotary, "inv_freq", None), torch.Tensor):
        return
    exact = rotary.inv_freq.detach().float().cpu().clone()

    def restore(module: nn.Module, args: tuple) -> None:
        if module.inv_freq.dtype != torch.float32:
            module.inv_freq = exact.to(module.inv_freq.device)

    rotary.register_forward_pre_hook(restore)


def build_llama(
    vocab_size: int = 4096,
    hidden_size: int = 384,
    intermediate_size: int = 768,
    num_hidden_layers: int = 6,
    num_attention_heads: int = 6,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 8192,
    rope_theta: float = 100000.0,
    rms_norm_eps: float = 1e-5,
    tie_word_embeddings: bool = True,
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """A ``transformers.LlamaForCausalLM`` with this config (random weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size % num_attention_heads:
        raise ValueError(
            f"hidden_size: expected a multiple of num_attention_heads={num_attention_heads}, got {hidden_size}"
        )
    if num_attention_heads % num_key_value_heads:
        raise ValueError(
            f"num_key_value_heads: expected a divisor of num_attention_heads={num_attention_heads}, "
            f"got {num_key_value_heads}"
        )
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        rms_norm_eps=rms_norm_eps,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        attn_implementation=attn_implementation,
    )
    model = LlamaForCausalLM(config)
    _keep_rotary_frequencies_fp32(model)
    if tie_word_embeddings:
        model.register_state_dict_post_hook(_drop_tied_head)
    return model


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Hugging Face ``save_pretrained`` layouts: drop a saved tied head, strip a ``model.`` wrapper."""
    own = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        if key not in own and key.startswith("model.model."):
            key = key[len("model.") :]
        out[key] = value
    if "lm_head.weight" not in own:
        out.pop("lm_head.weight", None)
    return out


for _name, _cfg in LLM_ARCHS.items():
    register_model(
        _name,
        family="llm",
        config=_cfg,
        paper=PAPER,
        checkpoint_filter_fn=checkpoint_filter_fn,
        eval_command=EVAL_COMMAND,
        description="small Llama-style causal LM (GQA, RoPE, 8k context) trained on offline English text",
    )(build_llama)


def register_shipped_weights(folder: str | Path | None = None) -> list[str]:
    """Register every ``<arch>.<tag>.json`` record (written by ``zoo train lm``) found in ``folder``.

    Returns the ``arch.tag`` names registered. Records of unknown architectures are skipped.
    """
    folder = Path(folder) if folder is not None else weights_dir()
    names = []
    for record in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            info = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if (
            not isinstance(info, dict)
            or info.get("kind") != "zoo.llm.pretrained"
            or info.get("arch") not in LLM_ARCHS
        ):
            continue
        file = info["file"]
        tag = PretrainedTag(
            tag=info["tag"],
            file=file if Path(file).is_absolute() or folder == weights_dir() else str(folder / file),
            sha256=info["sha256"],
            dataset=info.get("dataset", ""),
            metrics=dict(info.get("metrics", {})),
            config=dict(info.get("config", {})),
            command=info.get("command", ""),
            extra=dict(info.get("extra", {})),
        )
        register_pretrained(info["arch"], tag)
        names.append(f"{info['arch']}.{info['tag']}")
    return names


def load_pretrained_tokenizer(name: str):
    """The ``tokenizers.Tokenizer`` shipped with a pretrained LM tag (``arch.tag``)."""
    from zoo.llm.corpus import load_tokenizer
    from zoo.registry import get_entry

    entry, tag = get_entry(name)
    tag = tag or entry.default_tag
    if tag is None:
        raise ValueError(f"{name}: no pretrained weights (and tokenizer) are shipped")
    file = entry.tags[tag].extra.get("tokenizer")
    if not file:
        raise ValueError(f"{name}: the weights record names no tokenizer file")
    path = Path(file) if Path(file).is_absolute() else entry.tags[tag].path().parent / file
    return load_tokenizer(path)


@torch.no_grad()
def token_nll(model: nn.Module, input_ids: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Next-token negative log-likelihood (nats, fp32) ``[B, T - 1]``: entry ``p`` is that of token
    ``p + 1`` given tokens ``0..p``, from one forward pass over each row of ``input_ids [B, T]``."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids: expected [B, T] with T >= 2, got {tuple(input_ids.shape)}")
    logits = model(input_ids=input_ids, use_cache=False).logits
    parts = []
    step = chunk or logits.shape[1]
    for start in range(0, logits.shape[1] - 1, step):
        stop = min(start + step, logits.shape[1] - 1)
        part = logits[:, start:stop].float()
        nll = torch.nn.functional.cross_entropy(
            part.reshape(-1, part.shape[-1]), input_ids[:, start + 1 : stop + 1].reshape(-1), reduction="none"
        )
        parts.append(nll.view(input_ids.shape[0], -1))
    return torch.cat(parts, dim=1)


def sequence_nll(model: nn.Module, input_ids: torch.Tensor, chunk: int | None = None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) and the number of predicted tokens.

    ``input_ids [B, T]``: one forward pass over each row (no sliding window); every position but the
    first is predicted.
    """
    nll = token_nll(model, input_ids, chunk)
    return float(nll.double().sum()), nll.numel()


def perplexity(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / max(count, 1))
