"""Offline English text for the text family: the King James Bible and the GCIDE dictionary.

Both come from Debian packages (see DESIGN.md, "Data available offline"):

- KJV: ``bible-kjv-text`` holds the text LZW-compressed in windows, without a verse index;
  the index lives in the reader program ``bible`` (package ``bible-kjv``), so the verses are
  read once through it (``bible Gen1:1-Rev22:21``) and cached as
  ``$ZOO_CACHE/text/kjv_verses.tsv.gz`` (book, chapter, verse, text; about 1.4 MB). A machine
  without the reader can use a cache file copied from one that has it.
- GCIDE: ``dict-gcide``'s ``/usr/share/dictd/gcide.dict.dz`` is dictzip, i.e. gzip: read
  directly (about 40 MB of definitions).

``ZOO_CACHE`` defaults to ``~/.cache/attnzoo``.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

__all__ = ["KJV_BOOKS", "Verse", "cache_dir", "gcide_paragraphs", "kjv_verses"]

GCIDE_PATH = Path("/usr/share/dictd/gcide.dict.dz")

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


def cache_dir() -> Path:
    """``$ZOO_CACHE/text`` (default ``~/.cache/attnzoo/text``), created on demand."""
    root = os.environ.get("ZOO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "attnzoo")
    path = Path(root) / "text"
    path.mkdir(parents=True, exist_ok=True)
    return path


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


def kjv_verses(cache: Path | None = None) -> list[Verse]:
    """All 31102 verses of the KJV, from the cache or (once) from the ``bible`` program."""
    path = Path(cache) if cache is not None else cache_dir() / "kjv_verses.tsv.gz"
    if path.is_file():
        verses = []
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                book, chapter, verse, text = line.rstrip("\n").split("\t")
                verses.append(Verse(int(book), int(chapter), int(verse), text))
        return verses
    program = shutil.which("bible")
    if program is None:
        raise FileNotFoundError(
            f"KJV text: no cache at {path} and no `bible` program; install the Debian packages "
            "bible-kjv-text and bible-kjv (the reader holds the verse index), or copy kjv_verses.tsv.gz "
            "from a machine that has them into $ZOO_CACHE/text/"
        )
    done = subprocess.run(
        [program, "-l100000", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True, timeout=120
    )
    verses = parse_bible_output(done.stdout)
    if len(verses) < 31000 or len({v.book for v in verses}) != len(KJV_BOOKS):
        raise ValueError(f"KJV text: expected 31102 verses in 66 books from `bible`, got {len(verses)}")
    tmp = path.with_suffix(".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        for v in verses:
            f.write(f"{v.book}\t{v.chapter}\t{v.verse}\t{v.text}\n")
    tmp.replace(path)
    return verses


def gcide_paragraphs(path: Path | str = GCIDE_PATH, max_bytes: int | None = None) -> Iterator[str]:
    """Paragraphs of the GCIDE dictionary (dictzip is gzip), whitespace-normalised."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GCIDE: no such file {path}; install the Debian package dict-gcide")
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
