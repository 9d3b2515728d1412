"""Tiny models and corpora shared by the LLM tests (built locally, nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)

TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. Abandon, v. t. To cast or drive out; to banish; to expel. "
    "A hacker is a person who enjoys exploring the details of programmable systems. "
)


@pytest.fixture(scope="session")
def tiny_llama():
    """A random GQA Llama (4 query heads, 2 key/value heads, head dim 16) in eval mode."""
    from zoo.llm.model import build_llama

    torch.manual_seed(0)
    return build_llama(**TINY).eval()


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """Token files and a 300-token BPE built from a few sentences by `build_corpus`."""
    from zoo.llm.corpus import build_corpus

    out = tmp_path_factory.mktemp("lm_data")
    texts = {"a": (TEXT * 40) + "\n", "b": ("\n".join(TEXT.split(". ")) + "\n") * 40}
    meta = build_corpus(out, vocab_size=300, val_fraction=0.2, texts=texts)
    return out, meta
