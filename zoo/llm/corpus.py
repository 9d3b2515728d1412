"""Offline English text, our own byte-level BPE tokenizer, and token files for LM training.

Sources (Debian packages, nothing from a hub; read by :mod:`zoo.datasets`):

- ``bible``: the King James Bible (``bible-kjv-text`` through the ``bible`` program of
  ``bible-kjv``), chapter headings and one numbered verse per line, about 4.2 MB;
- ``gcide``: the GNU Collaborative International Dictionary of English (``dict-gcide``),
  cleaned of editorial markers, about 31 MB;
- ``jargon``: the Jargon File (``jargon-text``).

``build_corpus`` cleans each source, holds out the last ``val_fraction`` of each as validation
text (contiguous, so long validation windows exist), trains a byte-level BPE
(Sennrich et al., "Neural Machine Translation of Rare Words with Subword Units", arXiv 1508.07909;
byte-level as GPT-2) with the ``tokenizers`` library on the training text only, and writes

    tokenizer.json  train.bin  val.bin (uint16 token ids; sources joined by <eos>)  meta.json

``zoo train lm-data`` is its command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from zoo.datasets import clean_gcide, gcide_text, jargon_text, kjv_text
from zoo.progress import get_logger

__all__ = [
    "SOURCES",
    "build_corpus",
    "clean_gcide",
    "load_token_file",
    "load_tokenizer",
    "read_source",
    "train_tokenizer",
]

log = get_logger("zoo.llm.corpus")


SOURCES: dict[str, Callable[[], str]] = {"bible": kjv_text, "gcide": gcide_text, "jargon": jargon_text}


def read_source(name: str) -> str:
    if name not in SOURCES:
        raise ValueError(f"source: expected one of {sorted(SOURCES)}, got {name!r}")
    return SOURCES[name]()


def split_train_val(text: str, val_fraction: float) -> tuple[str, str]:
    """The last ``val_fraction`` of ``text`` (cut at a line start) is validation text."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a float in (0, 1), got {val_fraction}")
    cut = int(len(text) * (1.0 - val_fraction))
    newline = text.find("\n", cut)
    cut = newline + 1 if newline >= 0 else cut
    return text[:cut], text[cut:]


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, special_tokens: Sequence[str] | None = None
):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``; special tokens get ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from zoo.llm.model import SPECIAL_TOKENS

    special = list(special_tokens or SPECIAL_TOKENS)
    if vocab_size < 256 + len(special):
        raise ValueError(
            f"vocab_size: expected at least {256 + len(special)} (bytes + special tokens), got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer: no such file {path}")
    return Tokenizer.from_file(str(path))


def _chunks(text: str, size: int = 1 << 16) -> list[str]:
    """Line-aligned pieces of ``text`` (the tokenizer never sees a split inside a line)."""
    out, start = [], 0
    while start < len(text):
        stop = text.find("\n", start + size)
        stop = len(text) if stop < 0 else stop + 1
        out.append(text[start:stop])
        start = stop
    return out


def encode_text(tokenizer, text: str) -> np.ndarray:
    pieces = _chunks(text)
    ids = [np.asarray(e.ids, dtype=np.uint16) for e in tokenizer.encode_batch(pieces)]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.uint16)


def build_corpus(
    out_dir: str | Path,
    sources: Sequence[str] = ("bible", "gcide", "jargon"),
    vocab_size: int = 4096,
    val_fraction: float = 0.02,
    max_chars: int | None = None,
    texts: dict[str, str] | None = None,
) -> dict:
    """Write ``tokenizer.json``, ``train.bin``, ``val.bin`` and ``meta.json`` into ``out_dir``.

    ``texts`` (name -> text) replaces reading the named sources (tests, other corpora);
    ``max_chars`` truncates each source (quick runs).
    """
    from zoo.llm.model import EOS_ID

    if vocab_size > 65535:
        raise ValueError(f"vocab_size: token files are uint16, expected <= 65535, got {vocab_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = dict(texts) if texts is not None else {name: read_source(name) for name in sources}
    if not texts:
        raise ValueError("sources: expected at least one source")
    train_parts, val_parts, stats = {}, {}, {}
    for name, text in texts.items():
        if max_chars is not None:
            text = text[:max_chars]
        train_parts[name], val_parts[name] = split_train_val(text, val_fraction)
        log.info(
            "%s: %d train / %d validation characters", name, len(train_parts[name]), len(val_parts[name])
        )
    tokenizer = train_tokenizer((c for t in train_parts.values() for c in _chunks(t, 1 << 14)), vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))
    eos = np.asarray([EOS_ID], dtype=np.uint16)
    for split, parts in (("train", train_parts), ("val", val_parts)):
        arrays = []
        for name, text in parts.items():
            ids = encode_text(tokenizer, text)
            stats[f"{split}_tokens_{name}"] = int(ids.size)
            arrays += [ids, eos]
        tokens = np.concatenate(arrays)
        tokens.tofile(out / f"{split}.bin")
        stats[f"{split}_tokens"] = int(tokens.size)
    meta = {
        "sources": list(texts),
        "vocab_size": tokenizer.get_vocab_size(),
        "val_fraction": val_fraction,
        "characters": {name: len(train_parts[name]) + len(val_parts[name]) for name in texts},
        "dtype": "uint16",
        **stats,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    log.info("corpus: %d train / %d validation tokens in %s", stats["train_tokens"], stats["val_tokens"], out)
    return meta


def load_token_file(path: str | Path) -> np.ndarray:
    """uint16 token ids written by :func:`build_corpus`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokens: no such file {path} (build it with `zoo train lm-data`)")
    return np.fromfile(path, dtype=np.uint16)


# --------------------------------------------------------------------------- needle in a haystack
NEEDLE = " The secret number is {number}."
NEEDLE_QUESTION = " What is the secret number? The secret number is"


def needle_tokens(tokenizer, number: int) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the needle sentence, of the question, and of the expected answer ``" {number}."``.

    Training inserts ``needle`` into some windows and ends them with ``question + answer``
    (:mod:`zoo.llm.train`); the harness asks ``question`` and checks the greedy answer.
    """
    needle = tokenizer.encode(NEEDLE.format(number=number)).ids
    question = tokenizer.encode(NEEDLE_QUESTION).ids
    answer = tokenizer.encode(f" {number}.").ids
    return needle, question, answer
