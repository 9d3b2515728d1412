"""Offline English text for the text family: the King James Bible and the GCIDE dictionary.

The readers live in :mod:`zoo.datasets` (one place for every family); this module names the
text family's cache folder, ``$ZOO_CACHE/text`` (``ZOO_CACHE`` defaults to
``~/.cache/attnzoo``), where the generated LRA data and the WordPiece vocabularies are kept,
and re-exports the readers the text family uses.
"""

from __future__ import annotations

from pathlib import Path

from zoo import datasets
from zoo.datasets import KJV_BOOKS, Verse, gcide_paragraphs, kjv_verses

__all__ = ["KJV_BOOKS", "Verse", "cache_dir", "gcide_paragraphs", "kjv_verses"]


def cache_dir() -> Path:
    """``$ZOO_CACHE/text`` (default ``~/.cache/attnzoo/text``), created on demand."""
    return datasets.cache_dir("text")
