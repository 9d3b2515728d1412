"""Progress bars and logging shared by every long-running command.

- ``progress(iterable, desc=...)`` is a tqdm bar on stderr, silent when stderr is not a
  terminal or when quiet mode is on (``set_quiet(True)``, the CLI's ``--quiet``, or
  ``ZOO_QUIET=1``).
- ``get_logger(__name__)`` gives a logger under ``zoo``; messages go to stderr as
  ``zoo.vision: message``. Warnings always show; info shows unless quiet.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

__all__ = ["get_logger", "is_quiet", "progress", "set_quiet"]

_QUIET = os.environ.get("ZOO_QUIET", "") not in ("", "0")
_ROOT = logging.getLogger("zoo")


def set_quiet(quiet: bool) -> None:
    """Silence progress bars and info messages (warnings and errors still show)."""
    global _QUIET
    _QUIET = bool(quiet)
    _ROOT.setLevel(logging.WARNING if _QUIET else logging.INFO)


def is_quiet() -> bool:
    return _QUIET


def get_logger(name: str) -> logging.Logger:
    """A logger under ``zoo`` with one stderr handler on the root ``zoo`` logger."""
    if not _ROOT.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        _ROOT.addHandler(handler)
        _ROOT.setLevel(logging.WARNING if _QUIET else logging.INFO)
        _ROOT.propagate = False
    return logging.getLogger(name if name.startswith("zoo") else f"zoo.{name}")


def progress(
    iterable: Iterable[T],
    desc: str = "",
    total: int | None = None,
    unit: str = "it",
    leave: bool = False,
    disable: bool | None = None,
) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar unless quiet or stderr is not a terminal."""
    from tqdm.auto import tqdm

    if disable is None:
        disable = _QUIET or not sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=disable, dynamic_ncols=True)
