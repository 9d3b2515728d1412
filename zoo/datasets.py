"""Offline data from Debian packages, read in one place: the KJV Bible, GCIDE, the Jargon File, Fashion-MNIST.

Every family, layer and experiment reads its real data through this module (it imports nothing
from the rest of ``zoo``). Sources (see DESIGN.md, "Data available offline"):

- KJV (King James Bible): ``bible-kjv-text`` holds the text LZW-compressed in windows without a
  verse index; the index lives in the reader program ``bible`` (package ``bible-kjv``). The
  verses are read once through it (``bible -l100000 Gen1:1-Rev22:21``) and cached as
  ``$ZOO_CACHE/text/kjv_verses.tsv.gz`` (book, chapter, verse, text; about 1.3 MB).
  :func:`kjv_verses` gives the 31102 verses, :func:`kjv_text` / :func:`kjv_bytes` the whole
  text (a ``Book C`` heading per chapter, one verse per line).
- GCIDE (GNU Collaborative International Dictionary of English): ``dict-gcide``'s
  ``/usr/share/dictd/gcide.dict.dz`` is dictzip, i.e. gzip. :func:`gcide_paragraphs` streams its
  paragraphs as they are; :func:`gcide_text` gives the entries cleaned of editorial markers,
  cached as ``$ZOO_CACHE/text/gcide_clean.txt.gz``.
- Jargon File: ``jargon-text``'s ``/usr/share/doc/jargon-text/jargon.txt.gz`` (:func:`jargon_text`).
- Fashion-MNIST (Xiao, Rasul, Vollgraf, arXiv 1708.07747): ``dataset-fashion-mnist``'s gzipped
  IDX files under ``/usr/share/datasets/fashion-mnist`` or the folder ``$ZOO_FASHION_MNIST``
  (:func:`fashion_mnist`, :func:`read_idx`).

``ZOO_CACHE`` defaults to ``~/.cache/attnzoo``. A machine without the packages runs on a copy
made by :func:`export` on one that has them. A missing source raises FileNotFoundError naming
the Debian package to install.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_FILES",
    "GCIDE_PATH",
    "JARGON_PATH",
    "KJV_BOOKS",
    "Verse",
    "cache_dir",
    "clean_gcide",
    "export",
    "fashion_mnist",
    "fashion_mnist_dir",
    "find_idx_file",
    "gcide_paragraphs",
    "gcide_text",
    "jargon_text",
    "kjv_bytes",
    "kjv_text",
    "kjv_verses",
    "parse_bible_output",
    "read_idx",
]

GCIDE_PATH = Path("/usr/share/dictd/gcide.dict.dz")
JARGON_PATH = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
KJV_CACHE_NAME = "kjv_verses.tsv.gz"
GCIDE_CACHE_NAME = "gcide_clean.txt.gz"


def cache_dir(*parts: str) -> Path:
    """``$ZOO_CACHE/<parts...>`` (default ``~/.cache/attnzoo``), created on demand."""
    root = os.environ.get("ZOO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "attnzoo")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------- KJV

KJV_BOOKS: tuple[str, ...] = (
    "Genesis",
    "Exodus",
    "Leviticus",
    "Numbers",
    "Deuteronomy",
    "Joshua",
    "Judges",
    "Ruth",
    "1 Samuel",
    "2 Samuel",
    "1 Kings",
    "2 Kings",
    "1 Chronicles",
    "2 Chronicles",
    "Ezra",
    "Nehemiah",
    "Esther",
    "Job",
    "Psalms",
    "Proverbs",
    "Ecclesiastes",
    "Song of Solomon",
    "Isaiah",
    "Jeremiah",
    "Lamentations",
    "Ezekiel",
    "Daniel",
    "Hosea",
    "Joel",
    "Amos",
    "Obadiah",
    "Jonah",
    "Micah",
    "Nahum",
    "Habakkuk",
    "Zephaniah",
    "Haggai",
    "Zechariah",
    "Malachi",
    "Matthew",
    "Mark",
    "Luke",
    "John",
    "Acts",
    "Romans",
    "1 Corinthians",
    "2 Corinthians",
    "Galatians",
    "Ephesians",
    "Philippians",
    "Colossians",
    "1 Thessalonians",
    "2 Thessalonians",
    "1 Timothy",
    "2 Timothy",
    "Titus",
    "Philemon",
    "Hebrews",
    "James",
    "1 Peter",
    "2 Peter",
    "1 John",
    "2 John",
    "3 John",
    "Jude",
    "Revelation",
)


@dataclass(frozen=True)
class Verse:
    book: int  # index into KJV_BOOKS
    chapter: int
    verse: int
    text: str


_HEADER = re.compile(r"^(\S.*?) (\d+)$")
_VERSE = re.compile(r"^\s+(\d+) (.*)$")


def parse_bible_output(text: str) -> list[Verse]:
    """Verses from the output of ``bible -l100000 <range>`` ("Book N" headers, "  v text" lines)."""
    verses: list[Verse] = []
    book = chapter = -1
    for line in text.splitlines():
        if not line.strip():
            continue
        head = _HEADER.match(line)
        if head and not line[0].isspace():
            if head.group(1) not in KJV_BOOKS:
                raise ValueError(f"KJV text: unknown book {head.group(1)!r}")
            book, chapter = KJV_BOOKS.index(head.group(1)), int(head.group(2))
            continue
        verse = _VERSE.match(line)
        if verse and book >= 0:
            verses.append(Verse(book, chapter, int(verse.group(1)), verse.group(2).strip()))
        elif verses:  # a wrapped line continues the previous verse
            last = verses[-1]
            verses[-1] = Verse(last.book, last.chapter, last.verse, f"{last.text} {line.strip()}")
    return verses


def kjv_verses(cache: Path | str | None = None) -> list[Verse]:
    """All 31102 verses of the KJV, from the cache or (once) from the ``bible`` program."""
    path = Path(cache) if cache is not None else cache_dir("text") / KJV_CACHE_NAME
    if path.is_file():
        verses = []
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                book, chapter, verse, text = line.rstrip("\n").split("\t")
                verses.append(Verse(int(book), int(chapter), int(verse), text))
        return verses
    missing = (
        f"KJV text: no cache at {path} and no working `bible` program; install the Debian packages "
        f"bible-kjv-text and bible-kjv (the reader holds the verse index), or copy {KJV_CACHE_NAME} "
        "from a machine that has them into $ZOO_CACHE/text/"
    )
    program = shutil.which("bible")
    if program is None:
        raise FileNotFoundError(missing)
    done = subprocess.run(
        [program, "-l100000", "Gen1:1-Rev22:21"], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise FileNotFoundError(f"{missing} (`bible` exited with {done.returncode}: {done.stderr.strip()})")
    verses = parse_bible_output(done.stdout)
    if len(verses) < 31000 or len({v.book for v in verses}) != len(KJV_BOOKS):
        raise ValueError(f"KJV text: expected 31102 verses in 66 books from `bible`, got {len(verses)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        for v in verses:
            f.write(f"{v.book}\t{v.chapter}\t{v.verse}\t{v.text}\n")
    tmp.replace(path)
    return verses


def kjv_text(verse_numbers: bool = True) -> str:
    """The KJV as plain text: a ``Book C`` line opens each chapter, then one verse per line
    (``"v text"``, or the text alone with ``verse_numbers=False``)."""
    lines: list[str] = []
    chapter = None
    for v in kjv_verses():
        if (v.book, v.chapter) != chapter:
            chapter = (v.book, v.chapter)
            lines.append(f"{KJV_BOOKS[v.book]} {v.chapter}")
        lines.append(f"{v.verse} {v.text}" if verse_numbers else v.text)
    return "\n".join(lines) + "\n"


def kjv_bytes(verse_numbers: bool = True) -> bytes:
    """:func:`kjv_text` as UTF-8 bytes (for byte-level models)."""
    return kjv_text(verse_numbers).encode("utf-8")


# ----------------------------------------------------------------------------- GCIDE, Jargon File


def _package_file(path: Path | str, what: str, package: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such file {path}; install the Debian package {package}")
    return path


def gcide_paragraphs(path: Path | str = GCIDE_PATH, max_bytes: int | None = None) -> Iterator[str]:
    """Paragraphs of the GCIDE dictionary as they stand (markers kept), whitespace-normalised."""
    path = _package_file(path, "GCIDE", "dict-gcide")
    seen = 0
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        block: list[str] = []
        for line in f:
            if line.strip():
                block.append(line.strip())
                continue
            if block:
                text = " ".join(block)
                block = []
                seen += len(text)
                yield text
                if max_bytes is not None and seen >= max_bytes:
                    return
        if block:
            yield " ".join(block)


_GCIDE_MARKER = r"\[(?:1913 Webster|WordNet[^\]]*|PJC|Century[^\]]*|Webster[^\]]*|RHD|JEB|MW[^\]]*)\]"
_GCIDE_DROP = re.compile(rf"^\s*{_GCIDE_MARKER}\s*$")


def clean_gcide(raw: str) -> str:
    """Dictionary entries as paragraphs, one a line: editorial markers and the database header
    removed, wrapped lines joined, ``{cross references}`` unbraced."""
    start = raw.find("\nA \\")
    body = raw[start + 1 :] if start >= 0 else raw
    paragraphs: list[str] = []
    current: list[str] = []
    for line in body.splitlines():
        if _GCIDE_DROP.match(line):
            continue
        if not line.strip():
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        current.append(line.strip())
    if current:
        paragraphs.append(" ".join(current))
    text = "\n".join(p for p in paragraphs if not p.startswith(("Begin file", "00-database")))
    text = re.sub(rf" ?{_GCIDE_MARKER}", "", text)
    return text.replace("{", "").replace("}", "") + "\n"


def gcide_text(path: Path | str = GCIDE_PATH) -> str:
    """The GCIDE entries cleaned by :func:`clean_gcide` (about 31 MB).

    Read from the default path, the result is cached as ``$ZOO_CACHE/text/gcide_clean.txt.gz``,
    which also stands in for the package on machines without it.
    """
    path = Path(path)
    default_source = path == GCIDE_PATH
    cached = cache_dir("text") / GCIDE_CACHE_NAME if default_source else None
    if cached is not None and cached.is_file():
        with gzip.open(cached, "rt", encoding="utf-8") as f:
            return f.read()
    if cached is not None and not path.is_file():
        raise FileNotFoundError(
            f"GCIDE: no such file {path}; install the Debian package dict-gcide, "
            f"or copy {GCIDE_CACHE_NAME} from a machine that has it into $ZOO_CACHE/text/"
        )
    with gzip.open(_package_file(path, "GCIDE", "dict-gcide"), "rb") as f:
        text = clean_gcide(f.read().decode("utf-8", errors="replace"))
    if cached is not None:
        tmp = cached.with_suffix(".tmp")
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=6) as f:
            f.write(text)
        tmp.replace(cached)
    return text


def jargon_text(path: Path | str = JARGON_PATH) -> str:
    """The Jargon File as plain text (runs of blank lines shortened to one)."""
    with gzip.open(_package_file(path, "Jargon File", "jargon-text"), "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    return re.sub(r"\n{3,}", "\n\n", text)


# ----------------------------------------------------------------------------- Fashion-MNIST

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw): big-endian header ``0, 0, dtype, ndim``, ndim sizes, data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"read_idx: {path} is not an IDX file (header {raw[:4]!r})")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"read_idx: {path} ends inside its header ({len(raw)} bytes, {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(shape)) if shape else 0
    available = (len(raw) - 4 - 4 * ndim) // dtype.itemsize
    if available < count:
        raise ValueError(f"read_idx: {path} holds {available} values, its header says {shape}")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=4 + 4 * ndim)
    return data.reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def fashion_mnist_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir``, else ``$ZOO_FASHION_MNIST``, else ``/usr/share/datasets/fashion-mnist``."""
    return Path(data_dir or os.environ.get("ZOO_FASHION_MNIST") or FASHION_MNIST_DIR)


def find_idx_file(folder: str | os.PathLike, stem: str) -> Path:
    """``folder/stem`` as ``stem.gz``, ``stem`` or ``stem`` with ``.idx`` (the names in use)."""
    folder = Path(folder)
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"Fashion-MNIST: no {stem}[.gz] under {folder}; install the Debian package dataset-fashion-mnist, "
        "set ZOO_FASHION_MNIST or pass the folder holding the IDX files"
    )


def fashion_mnist(split: str, data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` (``train``: 60000, ``test``: 10000) as uint8 images ``[N, 28, 28]``
    and int64 labels ``[N]`` (0-9), from the folder :func:`fashion_mnist_dir` names."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split: expected one of {sorted(FASHION_MNIST_FILES)}, got {split!r}")
    folder = fashion_mnist_dir(data_dir)
    images_file, labels_file = FASHION_MNIST_FILES[split]
    images = read_idx(find_idx_file(folder, images_file))
    labels = read_idx(find_idx_file(folder, labels_file)).astype(np.int64)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"Fashion-MNIST: images {images.shape} and labels {labels.shape} under {folder} do not match"
        )
    return images, labels


# ----------------------------------------------------------------------------- export


def export(dest: str | os.PathLike) -> Path:
    """Copy the offline data into ``dest`` for a machine without the Debian packages (about 42 MB).

    Writes ``dest/text/kjv_verses.tsv.gz``, ``dest/text/gcide_clean.txt.gz`` and
    ``dest/fashion-mnist/*-ubyte.gz``; there, set ``ZOO_CACHE=dest`` and
    ``ZOO_FASHION_MNIST=dest/fashion-mnist``.
    """
    dest = Path(dest)
    (dest / "text").mkdir(parents=True, exist_ok=True)
    kjv_verses()
    gcide_text()
    copies = [(cache_dir("text") / name, dest / "text" / name) for name in (KJV_CACHE_NAME, GCIDE_CACHE_NAME)]
    (dest / "fashion-mnist").mkdir(exist_ok=True)
    for stem in (*FASHION_MNIST_FILES["train"], *FASHION_MNIST_FILES["test"]):
        path = find_idx_file(fashion_mnist_dir(), stem)
        copies.append((path, dest / "fashion-mnist" / path.name))
    for source, target in copies:
        if not (target.exists() and target.samefile(source)):
            shutil.copyfile(source, target)
    return dest
