"""Offline WordPiece tokenizer for PoNet (BERT-uncased conventions).

PoNet (arXiv 2110.02442) uses BERT's uncased WordPiece tokenizer: lower-casing and accent
stripping, splitting on whitespace and punctuation, greedy longest-match WordPiece with
``##`` continuation pieces, ``[CLS] A [SEP] B [SEP]`` with token types 0/1.

Without a network we cannot fetch ``bert-base-uncased``'s vocabulary, so we build our own
with the ``tokenizers`` package's WordPiece trainer from offline English text (GCIDE
dictionary definitions and, when available, the King James Bible; see ``zoo.datasets``)
and cache it as ``$ZOO_CACHE/text/wordpiece-uncased-<size>/vocab.txt``. The special tokens
take BERT's ids (``[PAD]`` 0, ``[unused0..98]`` 1-99, ``[UNK]`` 100, ``[CLS]`` 101, ``[SEP]``
102, ``[MASK]`` 103), which PoNet's segment split relies on (101/102). Our pieces after id
103 are not BERT's: weights trained with BERT's vocabulary (the official PoNet checkpoint)
need BERT's ``vocab.txt``, passed as ``vocab_file``.

``zoo train text-vocab`` builds the vocabulary; ``load_tokenizer()`` builds it on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from zoo.datasets import gcide_paragraphs, kjv_verses
from zoo.progress import get_logger
from zoo.text.corpus import cache_dir

__all__ = [
    "SPECIAL_TOKENS",
    "build_wordpiece_vocab",
    "default_vocab_path",
    "encode",
    "load_tokenizer",
    "training_corpus",
]

log = get_logger(__name__)

SPECIAL_TOKENS = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 100, 101, 102, 103


def default_vocab_path(vocab_size: int = 30522) -> Path:
    return cache_dir() / f"wordpiece-uncased-{vocab_size}" / "vocab.txt"


def training_corpus(max_bytes: int | None = None) -> Iterator[str]:
    """Offline English text: KJV verses (if the KJV is available), then GCIDE paragraphs."""
    seen = 0
    try:
        verses = kjv_verses()
    except FileNotFoundError as err:
        log.warning("KJV text not available, using GCIDE only (%s)", err)
        verses = []
    for v in verses:
        yield v.text
        seen += len(v.text)
        if max_bytes is not None and seen >= max_bytes:
            return
    yield from gcide_paragraphs(max_bytes=None if max_bytes is None else max(0, max_bytes - seen))


def _pipeline(tokenizer, lowercase: bool):
    from tokenizers import decoders, normalizers, pre_tokenizers

    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def build_wordpiece_vocab(
    out: str | Path | None = None,
    vocab_size: int = 30522,
    texts: Iterable[str] | None = None,
    max_bytes: int | None = None,
    min_frequency: int = 2,
    lowercase: bool = True,
) -> Path:
    """Train a WordPiece vocabulary (BERT special-token ids) and write ``vocab.txt``; returns its path."""
    from tokenizers import Tokenizer, models, trainers

    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size: expected more than {len(SPECIAL_TOKENS)} (the special tokens), got {vocab_size}"
        )
    path = Path(out) if out is not None else default_vocab_path(vocab_size)
    if path.suffix != ".txt":
        path = path / "vocab.txt"
    tokenizer = _pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]")), lowercase)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts if texts is not None else training_corpus(max_bytes), trainer)
    vocab = tokenizer.get_vocab()
    ordered = sorted(vocab, key=vocab.__getitem__)
    if ordered[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
        raise ValueError("WordPiece trainer did not put the special tokens first")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{tok}\n" for tok in ordered), encoding="utf-8")
    tmp.replace(path)
    log.info("wrote %d WordPiece tokens to %s", len(ordered), path)
    return path


def load_tokenizer(
    vocab_file: str | Path | None = None,
    vocab_size: int = 30522,
    lowercase: bool = True,
    max_length: int = 512,
    build: bool = True,
):
    """A ``tokenizers.Tokenizer``: BERT-uncased pipeline, ``[CLS] A [SEP] (B [SEP])``, padding with ``[PAD]``.

    ``vocab_file``: a BERT-style ``vocab.txt`` (e.g. ``bert-base-uncased``'s, for the official
    PoNet weights); default: our offline vocabulary, built on first use when ``build``.
    """
    from tokenizers import Tokenizer, models, processors

    path = Path(vocab_file) if vocab_file is not None else default_vocab_path(vocab_size)
    if not path.is_file():
        if vocab_file is not None or not build:
            raise FileNotFoundError(
                f"vocab_file: no such file {path} (build one with `zoo train text-vocab`)"
            )
        log.info("building the offline WordPiece vocabulary (%d tokens) once, into %s", vocab_size, path)
        build_wordpiece_vocab(path, vocab_size=vocab_size)
    tokenizer = _pipeline(Tokenizer(models.WordPiece.from_file(str(path), unk_token="[UNK]")), lowercase)
    cls_id, sep_id, pad_id = (tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    if None in (cls_id, sep_id, pad_id):
        raise ValueError(f"vocab_file {path}: expected [CLS], [SEP] and [PAD] tokens")
    from tokenizers import AddedToken

    tokenizer.add_special_tokens(
        [AddedToken(t, special=True) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=pad_id, pad_token="[PAD]")
    return tokenizer


def encode(tokenizer, texts: Sequence[str], pairs: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Batch-encode to ``input_ids``, ``attention_mask``, ``token_type_ids`` (long tensors, padded)."""
    inputs = list(zip(texts, pairs)) if pairs is not None else list(texts)
    encodings = tokenizer.encode_batch(inputs)
    return {
        "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),
        "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long),
        "token_type_ids": torch.tensor([e.type_ids for e in encodings], dtype=torch.long),
    }
