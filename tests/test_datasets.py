"""Offline data readers: IDX parsing, the KJV parser and text, the GCIDE cache, missing-package errors."""

import gzip
import itertools
import shutil
import struct

import numpy as np
import pytest

from zoo import datasets
from zoo.datasets import KJV_BOOKS, Verse

# what `bible -l100000 ...` prints (verse 175 as the narrow default width wraps it)
BIBLE_SAMPLE = """
Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form, and void; and darkness was upon the face of the deep.

Song of Solomon 1

  1 The song of songs, which is Solomon's.

Psalms 119

  175 Let my soul live, and it shall praise thee; and let thy judgments help
me.

3 John 1

  14 But I trust I shall shortly see thee.
"""


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_idx(path, array: np.ndarray, code: int) -> None:
    """IDX by its definition: 0, 0, type code, ndim, then big-endian sizes and big-endian values."""
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + body)


def write_fashion_mnist(folder, num_train=6, num_test=3, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, count in (("train", num_train), ("test", num_test)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        images_file, labels_file = datasets.FASHION_MNIST_FILES[split]
        write_idx(folder / f"{images_file}.gz", images, 0x08)
        write_idx(folder / f"{labels_file}.gz", labels, 0x08)
        arrays[split] = images, labels
    return arrays


def test_read_idx_gives_shape_dtype_and_values(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    write_idx(tmp_path / "images.gz", images, 0x08)
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "images.gz"), images)
    wide = rng.integers(-30000, 30000, (3, 7)).astype(np.int16)
    write_idx(tmp_path / "wide.idx", wide, 0x0B)  # raw (not gzipped), big-endian int16
    read = datasets.read_idx(tmp_path / "wide.idx")
    assert read.dtype == np.int16 and read.dtype.isnative
    np.testing.assert_array_equal(read, wide)
    floats = rng.standard_normal(6).astype(np.float32)
    write_idx(tmp_path / "floats.gz", floats, 0x0D)
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "floats.gz"), floats)


def test_read_idx_rejects_other_files(tmp_path):
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x01\x02\x03\x04"))
    with pytest.raises(ValueError, match="not an IDX file"):
        datasets.read_idx(tmp_path / "bad.gz")
    short = bytes([0, 0, 0x08, 2]) + struct.pack(">2I", 3, 4) + bytes(11)  # 12 values promised, 11 given
    (tmp_path / "short.idx").write_bytes(short)
    with pytest.raises(ValueError, match=r"holds 11 values, its header says \(3, 4\)"):
        datasets.read_idx(tmp_path / "short.idx")


def test_fashion_mnist_from_a_folder_and_from_the_environment(tmp_path, monkeypatch):
    arrays = write_fashion_mnist(tmp_path / "fm")
    images, labels = datasets.fashion_mnist("train", tmp_path / "fm")
    assert images.shape == (6, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64
    np.testing.assert_array_equal(images, arrays["train"][0])
    np.testing.assert_array_equal(labels, arrays["train"][1])
    monkeypatch.setenv("ZOO_FASHION_MNIST", str(tmp_path / "fm"))
    images, labels = datasets.fashion_mnist("test")
    np.testing.assert_array_equal(images, arrays["test"][0])
    np.testing.assert_array_equal(labels, arrays["test"][1])
    with pytest.raises(ValueError, match=r"split: expected one of \['test', 'train'\], got 'val'"):
        datasets.fashion_mnist("val")


def test_parse_bible_output_handles_headers_numbers_and_wrapping():
    verses = datasets.parse_bible_output(BIBLE_SAMPLE)
    assert verses == [
        Verse(0, 1, 1, "In the beginning God created the heaven and the earth."),
        Verse(
            0, 1, 2, "And the earth was without form, and void; and darkness was upon the face of the deep."
        ),
        Verse(KJV_BOOKS.index("Song of Solomon"), 1, 1, "The song of songs, which is Solomon's."),
        Verse(
            KJV_BOOKS.index("Psalms"),
            119,
            175,
            "Let my soul live, and it shall praise thee; and let thy judgments help me.",
        ),
        Verse(KJV_BOOKS.index("3 John"), 1, 14, "But I trust I shall shortly see thee."),
    ]
    with pytest.raises(ValueError, match="unknown book"):
        datasets.parse_bible_output("Hezekiah 1\n  1 x\n")


def test_kjv_text_from_the_verse_cache(private_cache, monkeypatch):
    monkeypatch.setattr(datasets.shutil, "which", lambda name: None)  # the cache alone must do
    (private_cache / "text").mkdir(parents=True)
    with gzip.open(private_cache / "text" / "kjv_verses.tsv.gz", "wt", encoding="utf-8") as f:
        f.write("0\t1\t1\tIn the beginning.\n0\t1\t2\tAnd the earth.\n0\t2\t1\tThus the heavens.\n")
        f.write("65\t22\t21\tAmen.\n")
    assert datasets.kjv_verses()[3] == Verse(65, 22, 21, "Amen.")
    assert datasets.kjv_text() == (
        "Genesis 1\n1 In the beginning.\n2 And the earth.\nGenesis 2\n1 Thus the heavens.\nRevelation 22\n21 Amen.\n"
    )
    assert datasets.kjv_bytes(verse_numbers=False) == (
        b"Genesis 1\nIn the beginning.\nAnd the earth.\nGenesis 2\nThus the heavens.\nRevelation 22\nAmen.\n"
    )


def test_gcide_text_is_cleaned_once_then_read_from_the_cache(private_cache, tmp_path, monkeypatch):
    source = tmp_path / "gcide.dict.dz"
    raw = "00-database-info\n  header\n\nA \\A\\ (named)\n   The first letter.\n   [1913 Webster]\n\nB \\B\\ {See} A.\n"
    source.write_bytes(gzip.compress(raw.encode()))
    monkeypatch.setattr(datasets, "GCIDE_PATH", source)
    text = datasets.gcide_text(source)
    assert text == "A \\A\\ (named) The first letter.\nB \\B\\ See A.\n"
    source.unlink()
    assert datasets.gcide_text(source) == text  # from $ZOO_CACHE/text/gcide_clean.txt.gz
    assert (private_cache / "text" / datasets.GCIDE_CACHE_NAME).is_file()


def test_missing_data_names_the_debian_package(private_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="bible-kjv-text and bible-kjv"):
        datasets.kjv_verses()
    with pytest.raises(FileNotFoundError, match="install the Debian package dict-gcide"):
        datasets.gcide_text(tmp_path / "gcide.dict.dz")
    with pytest.raises(FileNotFoundError, match="install the Debian package dict-gcide"):
        next(datasets.gcide_paragraphs(tmp_path / "gcide.dict.dz"))
    with pytest.raises(FileNotFoundError, match="install the Debian package jargon-text"):
        datasets.jargon_text(tmp_path / "jargon.txt.gz")
    with pytest.raises(FileNotFoundError, match="install the Debian package dataset-fashion-mnist"):
        datasets.fashion_mnist("train", tmp_path)


def test_export_serves_a_machine_without_the_packages(private_cache, tmp_path, monkeypatch):
    (private_cache / "text").mkdir(parents=True)
    with gzip.open(private_cache / "text" / "kjv_verses.tsv.gz", "wt", encoding="utf-8") as f:
        f.write("0\t1\t1\tIn the beginning.\n")
    with gzip.open(private_cache / "text" / datasets.GCIDE_CACHE_NAME, "wt", encoding="utf-8") as f:
        f.write("A \\A\\ The first letter.\n")
    arrays = write_fashion_mnist(tmp_path / "fm")
    monkeypatch.setenv("ZOO_FASHION_MNIST", str(tmp_path / "fm"))
    dest = datasets.export(tmp_path / "export")
    monkeypatch.setattr(datasets.shutil, "which", lambda name: None)
    monkeypatch.setattr(datasets, "GCIDE_PATH", tmp_path / "no_gcide.dict.dz")
    monkeypatch.setenv("ZOO_CACHE", str(dest))
    monkeypatch.setenv("ZOO_FASHION_MNIST", str(dest / "fashion-mnist"))
    assert datasets.kjv_text() == "Genesis 1\n1 In the beginning.\n"
    assert datasets.gcide_text(datasets.GCIDE_PATH) == "A \\A\\ The first letter.\n"
    np.testing.assert_array_equal(datasets.fashion_mnist("test")[0], arrays["test"][0])


@pytest.mark.skipif(shutil.which("bible") is None, reason="needs the Debian bible-kjv reader")
def test_real_kjv_has_every_verse(private_cache):
    verses = datasets.kjv_verses()
    assert len(verses) == 31102 and verses[0].text.startswith("In the beginning God created")
    assert {v.book for v in verses} == set(range(66))
    assert datasets.kjv_verses() == verses  # the second read comes from the cache


@pytest.mark.skipif(not datasets.GCIDE_PATH.is_file(), reason="needs the Debian dict-gcide package")
def test_real_gcide_paragraphs_are_readable():
    paragraphs = list(itertools.islice(datasets.gcide_paragraphs(max_bytes=200_000), 50))
    assert len(paragraphs) == 50 and all(isinstance(p, str) and p for p in paragraphs)
    assert any("Webster" in p or "WordNet" in p for p in paragraphs)
