"""Offline WordPiece tokenizer: BERT special-token ids, pair encoding, PoNet segments from [CLS]/[SEP]."""

import pytest
import torch

from zoo.layers.ponet import segment_ids_from_separators
from zoo.text.tokenizer import SPECIAL_TOKENS, build_wordpiece_vocab, encode, load_tokenizer

CORPUS = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "Abandon: to give up absolutely; to forsake entirely.",
] * 10


@pytest.fixture
def vocab(tmp_path):
    return build_wordpiece_vocab(tmp_path, vocab_size=300, texts=CORPUS, min_frequency=1)


def test_special_tokens_take_bert_ids(vocab):
    lines = vocab.read_text().splitlines()
    assert lines[:104] == SPECIAL_TOKENS
    assert (lines[0], lines[100], lines[101], lines[102], lines[103]) == (
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
    )
    assert len(lines) == len(set(lines)) <= 300 and any(t.startswith("##") for t in lines)


def test_pair_encoding_types_padding_and_ponet_segments(vocab):
    tok = load_tokenizer(vocab, max_length=64)
    batch = encode(tok, ["The Earth was VOID.", "Abandon"], ["darkness upon the deep", "forsake"])
    ids, types, mask = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    assert ids.shape == types.shape == mask.shape and ids.dtype == torch.long
    row = ids[0].tolist()
    first_sep = row.index(102)
    assert row[0] == 101 and row.count(102) == 2
    assert types[0, : first_sep + 1].eq(0).all() and types[0, first_sep + 1 : int(mask[0].sum())].eq(1).all()
    assert ids[1, int(mask[1].sum()) :].eq(0).all()  # padded with [PAD] = 0
    # lower-cased, accent-stripped WordPiece that decodes back to the text
    assert tok.decode(row) == "the earth was void. darkness upon the deep"
    seg = segment_ids_from_separators((ids == 101) | (ids == 102))[0].tolist()
    n = int(mask[0].sum())
    assert (
        seg[0] == 0 and seg[1] == seg[first_sep - 1] == 1 and seg[first_sep] == 2 and seg[first_sep + 1] == 3
    )
    assert seg[n - 1] == 4


def test_unknown_words_map_to_unk_and_truncation(vocab):
    tok = load_tokenizer(vocab, max_length=8)
    ids = encode(tok, ["zzzz quixotic xylophone " * 5])["input_ids"][0].tolist()
    assert len(ids) == 8 and ids[0] == 101 and ids[-1] == 102 and 100 in ids


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size: expected more than 104"):
        build_wordpiece_vocab(tmp_path, vocab_size=50, texts=CORPUS)
    with pytest.raises(FileNotFoundError, match="vocab_file: no such file"):
        load_tokenizer(tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"expected \[CLS\], \[SEP\] and \[PAD\]"):
        load_tokenizer(tmp_path / "bad.txt")
