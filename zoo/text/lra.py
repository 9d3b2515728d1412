"""Long Range Arena style tasks, built offline.

Long Range Arena: A Benchmark for Efficient Transformers (Tay et al., arXiv 2011.04006) scores
sequence models on classification of long inputs. Its data come from downloads (ListOps TSVs,
IMDb, the ACL Anthology Network, CIFAR-10, Pathfinder images); here every task is generated or
read from Debian packages, so the whole pipeline runs without a network:

- ``listops`` (:class:`ListOps`): the LRA ListOps generator, same rules and sizes;
- ``image`` (:class:`FashionMNISTPixels`): Fashion-MNIST pixels as 784-token sequences, for
  LRA's grayscale CIFAR-10 (1024 tokens);
- ``text`` (:class:`KJVDivisions`): byte-level classification of 1-4 kB King James Bible
  passages into the six traditional divisions, for LRA's byte-level IMDb sentiment;
- ``retrieval`` (:class:`KJVSameBook`): byte-level matching of two 1-4 kB passages (same
  book or another book of the same division), for LRA's AAN citation matching;
- ``pathfinder`` (:class:`Pathfinder`): our generator of 32 x 32 "are the two dots on one
  dashed curve?" images, 1024 pixel tokens, for LRA's Pathfinder-32.

Each task class says how it differs from the original. Items are token arrays padded to the
task's fixed length by :func:`collate` (LRA pads to a fixed length too, and PoNet's LRA
segment chunking depends on it). Generated data are deterministic in ``seed`` and cached
under ``$ZOO_CACHE/text`` (default ``~/.cache/attnzoo/text``).
"""

from __future__ import annotations

import hashlib
import os
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.datasets import FASHION_MNIST_DIR, KJV_BOOKS, Verse, fashion_mnist, fashion_mnist_dir, kjv_verses
from zoo.progress import get_logger
from zoo.text.corpus import cache_dir

__all__ = [
    "TASKS",
    "FashionMNISTPixels",
    "KJVDivisions",
    "KJVSameBook",
    "LRATask",
    "ListOps",
    "Pathfinder",
    "collate",
    "dataset_fingerprint",
    "get_task",
    "listops_value",
]

log = get_logger(__name__)
SPLITS = ("train", "val", "test")


class LRATask:
    """A task: its splits as datasets, the sizes a model needs, and the model it was made for."""

    name = ""
    num_classes = 0
    max_length = 0
    vocab_size = 0
    pair = False  # two documents per example
    model = ""  # registered model made for it

    def split(self, split: str) -> Dataset:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "num_classes": self.num_classes,
            "max_length": self.max_length,
            "vocab_size": self.vocab_size,
            "pair": self.pair,
        }

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")


class RaggedTokens(Dataset):
    """Variable-length token sequences stored end to end, with integer labels."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, labels: np.ndarray, drop: int | None = None):
        self.tokens, self.offsets, self.labels, self.drop = tokens, offsets, labels, drop

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        seq = self.tokens[self.offsets[i] : self.offsets[i + 1]]
        if self.drop is not None:
            seq = seq[seq != self.drop]
        return seq, int(self.labels[i])


def collate(items: Sequence[tuple], max_length: int) -> dict[str, torch.Tensor]:
    """Pad to ``max_length`` (truncating longer ones): ``input_ids``, ``attention_mask``, ``labels``
    (and ``input_ids_2``, ``attention_mask_2`` for pairs). Token 0 is padding."""

    def pad(seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(seqs), max_length, dtype=torch.long)
        mask = torch.zeros(len(seqs), max_length, dtype=torch.bool)
        for row, seq in enumerate(seqs):
            n = min(len(seq), max_length)
            ids[row, :n] = torch.from_numpy(np.asarray(seq[:n], dtype=np.int64))
            mask[row, :n] = True
        return ids, mask

    batch: dict[str, torch.Tensor] = {}
    batch["input_ids"], batch["attention_mask"] = pad([it[0] for it in items])
    if len(items[0]) == 3:
        batch["input_ids_2"], batch["attention_mask_2"] = pad([it[1] for it in items])
    batch["labels"] = torch.tensor([it[-1] for it in items], dtype=torch.long)
    return batch


# ----------------------------------------------------------------------------- ListOps

LISTOPS_OPERATORS = ("MIN", "MAX", "MED", "SM")


def listops_value(op: str, args: Sequence[int]) -> int:
    """Value of one ListOps operator (MED as LRA: ``int(np.median(args))``, SM: sum mod 10)."""
    if op == "MIN":
        return min(args)
    if op == "MAX":
        return max(args)
    if op == "MED":
        return int(np.median(args))
    if op == "SM":
        return sum(args) % 10
    raise ValueError(f"op: expected one of {LISTOPS_OPERATORS}, got {op!r}")


class _TooLong(Exception):
    pass


def _listops_tree(
    rng: random.Random, depth: int, max_depth: int, max_args: int, out: list[int], limit: int
) -> int:
    """Append one LRA ListOps tree to ``out`` (token ids, prefix order, ``]`` closing); return its value.

    LRA's rule: below ``max_depth`` a node is an operator with probability 0.25 (else a digit),
    with 2..max_args arguments. Raises ``_TooLong`` once the sequence reaches ``limit`` tokens,
    as such a tree is rejected anyway.
    """
    if len(out) >= limit:
        raise _TooLong
    draw = rng.random
    if depth < max_depth and draw() <= 0.25:
        op = int(draw() * 4)
        out.append(ListOps.FIRST_OP + op)
        args = [
            _listops_tree(rng, depth + 1, max_depth, max_args, out, limit)
            for _ in range(2 + int(draw() * (max_args - 1)))
        ]
        out.append(ListOps.CLOSE)
        return _fast_value(op, args)
    digit = int(draw() * 10)
    out.append(ListOps.FIRST_DIGIT + digit)
    return digit


def _fast_value(op: int, args: list[int]) -> int:
    """``listops_value`` on digits, without numpy (MED of an even count: floor of the mean of the middle two)."""
    if op == 0:
        return min(args)
    if op == 1:
        return max(args)
    if op == 2:
        ordered = sorted(args)
        half = len(ordered) // 2
        return ordered[half] if len(ordered) % 2 else (ordered[half - 1] + ordered[half]) // 2
    return sum(args) % 10


def _listops_chunk(job: tuple[int, int, int, int, int, int, int]) -> list[tuple[bytes, int]]:
    seed, chunk, size, min_length, max_length, max_depth, max_args = job
    rng = random.Random(seed * 1_000_003 + chunk)
    found: list[tuple[bytes, int]] = []
    while len(found) < size:
        out: list[int] = []
        try:
            value = _listops_tree(rng, 1, max_depth, max_args, out, max_length)
        except _TooLong:
            continue
        if min_length < len(out) < max_length:
            found.append((bytes(out), value))
    return found


class ListOps(LRATask):
    """ListOps (Nangia and Bowman 2018) as generated for LRA.

    Same generator as LRA's ``lra_benchmarks/data/listops.py``: operators MIN, MAX, MED (median,
    truncated to int) and SM (sum mod 10) over digits, trees of depth <= 10 with 2..10
    arguments per operator, an operator with probability 0.25 below the maximum depth, kept
    when ``500 < length < 2000`` (length counting operators, digits and closing brackets),
    duplicates removed, 96k / 2k / 2k examples, 10 classes.

    Differences: our own random streams (LRA's files came from an unseeded run, so the examples
    differ but follow the same distribution). Tokens are what LRA's input pipeline kept: its
    ``tfds`` tokenizer keeps alphanumeric tokens only, so the closing brackets ``]`` (and the
    parentheses) never reached the models; ``closing_brackets=True`` keeps ``]`` as a token
    (as S4's pipeline does), which makes the expressions unambiguous.

    Token ids: 0 pad, 1-10 digits 0-9, 11-14 MIN MAX MED SM, 15 ``]``.
    """

    name = "listops"
    num_classes = 10
    max_length = 2000
    vocab_size = 16
    model = "ponet_lra_listops"
    FIRST_DIGIT, FIRST_OP, CLOSE = 1, 11, 15

    def __init__(
        self,
        num_train: int = 96_000,
        num_val: int = 2_000,
        num_test: int = 2_000,
        seed: int = 0,
        closing_brackets: bool = False,
        min_length: int = 500,
        max_length: int = 2000,
        max_depth: int = 10,
        max_args: int = 10,
        workers: int | None = None,
        cache: bool = True,
    ) -> None:
        if min(num_train, num_val, num_test) < 0 or min_length >= max_length - 1:
            raise ValueError(
                f"ListOps: expected non-negative sizes and min_length < max_length - 1, got "
                f"{num_train}/{num_val}/{num_test}, {min_length}..{max_length}"
            )
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.seed, self.closing_brackets = seed, closing_brackets
        self.lengths = (min_length, max_length)
        self.max_depth, self.max_args = max_depth, max_args
        self.max_length = max_length
        self.workers, self.cache = workers, cache
        self._data: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def _cache_path(self) -> Path:
        total = sum(self.sizes.values())
        lo, hi = self.lengths
        return (
            cache_dir() / f"listops_s{self.seed}_n{total}_d{self.max_depth}_a{self.max_args}_l{lo}-{hi}.npz"
        )

    def generate(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All examples (train, then val, then test): concatenated tokens, offsets, labels."""
        if self._data is not None:
            return self._data
        path = self._cache_path()
        if self.cache and path.is_file():
            with np.load(path) as f:
                self._data = (f["tokens"], f["offsets"], f["labels"])
            return self._data
        total = sum(self.sizes.values())
        chunk = 250
        lo, hi = self.lengths
        jobs = [
            (self.seed, c, chunk, lo, hi, self.max_depth, self.max_args) for c in range(-(-total // chunk))
        ]
        workers = self.workers if self.workers is not None else min(16, os.cpu_count() or 1)
        seen: set[bytes] = set()
        examples: list[tuple[bytes, int]] = []
        log.info("generating %d ListOps examples with %d worker(s)", total, workers)

        def consume(results) -> None:
            for part in results:
                for seq, value in part:
                    if seq not in seen and len(examples) < total:
                        seen.add(seq)
                        examples.append((seq, value))
                if len(examples) >= total:
                    return

        while len(examples) < total:
            if workers > 1 and total > chunk:
                with ProcessPoolExecutor(workers) as pool:
                    consume(pool.map(_listops_chunk, jobs))
            else:
                consume(map(_listops_chunk, jobs))
            start = jobs[-1][1] + 1  # duplicates left us short: more chunks
            jobs = [
                (self.seed, c, chunk, lo, hi, self.max_depth, self.max_args) for c in range(start, start + 4)
            ]
        offsets = np.zeros(total + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(s) for s, _ in examples])
        tokens = np.frombuffer(b"".join(s for s, _ in examples), dtype=np.uint8).copy()
        labels = np.array([v for _, v in examples], dtype=np.int64)
        self._data = (tokens, offsets, labels)
        if self.cache:
            tmp = path.with_name(path.name + ".tmp.npz")
            np.savez_compressed(tmp, tokens=tokens, offsets=offsets, labels=labels)
            tmp.replace(path)
        return self._data

    def split(self, split: str) -> RaggedTokens:
        self._check_split(split)
        tokens, offsets, labels = self.generate()
        start = {"train": 0, "val": self.sizes["train"], "test": self.sizes["train"] + self.sizes["val"]}[
            split
        ]
        stop = start + self.sizes[split]
        return RaggedTokens(
            tokens,
            offsets[start : stop + 1],
            labels[start:stop],
            drop=None if self.closing_brackets else self.CLOSE,
        )


# ----------------------------------------------------------------------------- image


class ArrayTokens(Dataset):
    def __init__(self, tokens: np.ndarray, labels: np.ndarray):
        self.tokens, self.labels = tokens, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.tokens[i], int(self.labels[i])


class FashionMNISTPixels(LRATask):
    """Fashion-MNIST images as sequences of 784 pixel intensities (tokens 0-255), 10 classes.

    Stands in for LRA's "Image" task (CIFAR-10 in grayscale, 32 x 32 = 1024 pixel tokens,
    45k / 5k / 10k). Differences: Fashion-MNIST is 28 x 28 (784 tokens), 55k / 5k / 10k (the
    last 5000 training images are the validation split), and its classes are clothing items,
    an easier problem than CIFAR-10, so accuracies are not comparable to LRA's. As in LRA,
    the pixels are read in raster order with no 2D information.

    Source: ``/usr/share/datasets/fashion-mnist`` (Debian ``dataset-fashion-mnist``) or another
    directory with the four ``*-ubyte.gz`` files (``data_dir`` or ``$ZOO_FASHION_MNIST``). Read
    from the default directory, the arrays are also saved as ``$ZOO_CACHE/text/fashion_mnist.npz``,
    which stands in for that directory on machines without the package.
    """

    name = "image"
    num_classes = 10
    max_length = 784
    vocab_size = 256
    model = "ponet_lra_image"

    def __init__(self, data_dir: str | Path | None = None, num_val: int = 5000) -> None:
        self.data_dir = fashion_mnist_dir(data_dir)
        self.num_val = num_val
        self._arrays: dict[str, np.ndarray] | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is not None:
            return self._arrays
        default_source = self.data_dir.resolve() == FASHION_MNIST_DIR.resolve()
        cached = cache_dir() / "fashion_mnist.npz"  # only ever a copy of the default source
        try:
            (train_x, train_y), (test_x, test_y) = (
                fashion_mnist(s, self.data_dir) for s in ("train", "test")
            )
        except FileNotFoundError as missing:
            if default_source and cached.is_file():
                with np.load(cached) as f:
                    self._arrays = {k: f[k] for k in f.files}
                return self._arrays
            raise FileNotFoundError(f"{missing}, or copy fashion_mnist.npz into {cache_dir()}") from None
        self._arrays = {
            "train_x": train_x.reshape(len(train_x), -1),
            "train_y": train_y,
            "test_x": test_x.reshape(len(test_x), -1),
            "test_y": test_y,
        }
        if default_source and not cached.is_file():
            np.savez(cached, **self._arrays)
        return self._arrays

    def split(self, split: str) -> ArrayTokens:
        self._check_split(split)
        a = self.arrays()
        if split == "test":
            return ArrayTokens(a["test_x"], a["test_y"])
        cut = len(a["train_y"]) - self.num_val
        part = slice(0, cut) if split == "train" else slice(cut, None)
        return ArrayTokens(a["train_x"][part], a["train_y"][part])


# ----------------------------------------------------------------------------- KJV tasks

KJV_DIVISIONS = (
    ("Law", "Genesis", "Deuteronomy"),
    ("History", "Joshua", "Esther"),
    ("Wisdom", "Job", "Song of Solomon"),
    ("Prophets", "Isaiah", "Malachi"),
    ("Gospels and Acts", "Matthew", "Acts"),
    ("Epistles and Revelation", "Romans", "Revelation"),
)


def kjv_division_of_book(book: int) -> int:
    """Index into ``KJV_DIVISIONS`` of a book index into ``KJV_BOOKS``."""
    for d, (_, first, last) in enumerate(KJV_DIVISIONS):
        if KJV_BOOKS.index(first) <= book <= KJV_BOOKS.index(last):
            return d
    raise ValueError(f"book: expected an index in [0, {len(KJV_BOOKS)}), got {book}")


def _split_of_chapter(index: int) -> str:
    """Chapters in Bible order: every 10th (from the 6th) is test, every 10th (from the 8th) val."""
    return {5: "test", 7: "val"}.get(index % 10, "train")


class _KJVPassages:
    """The verses of one split, as runs of consecutive same-split chapters within a book."""

    def __init__(self, verses: Sequence[Verse], split: str) -> None:
        chapter_index: dict[tuple[int, int], int] = {}
        for v in verses:
            chapter_index.setdefault((v.book, v.chapter), len(chapter_index))
        runs: list[list[bytes]] = []
        run_book: list[int] = []
        last: tuple[int, int] | None = None
        for v in verses:
            key = (v.book, v.chapter)
            if _split_of_chapter(chapter_index[key]) != split:
                last = None
                continue
            if last is None or last[0] != v.book:
                runs.append([])
                run_book.append(v.book)
            runs[-1].append(v.text.encode("utf-8"))
            last = key
        if not runs:
            raise ValueError(f"KJV: no verses for split {split!r}")
        self.runs = runs
        self.run_book = np.array(run_book)
        self.run_bytes = np.array([sum(len(t) + 1 for t in r) for r in runs], dtype=np.float64)

    def pick_run(self, rng: np.random.Generator, candidates: np.ndarray) -> int:
        weights = self.run_bytes[candidates]
        return int(candidates[rng.choice(len(candidates), p=weights / weights.sum())])

    def window(self, rng: np.random.Generator, run: int, min_bytes: int, max_bytes: int) -> np.ndarray:
        """Consecutive verses from a random start, up to a random length in [min_bytes, max_bytes]."""
        verses = self.runs[run]
        target = int(rng.integers(min_bytes, max_bytes + 1))
        start = int(rng.integers(len(verses)))
        parts, size = [], 0
        for text in verses[start:]:
            if parts and size + 1 + len(text) > target:
                break
            parts.append(text)
            size += len(text) + (1 if len(parts) > 1 else 0)
        doc = b" ".join(parts)[:max_bytes]
        return np.frombuffer(doc, dtype=np.uint8).astype(np.int64) + 1  # bytes 1..256, 0 = pad


class _LazySamples(Dataset):
    """Examples made on demand by ``sample(rng)`` with ``rng`` seeded by ``(seed, split, index)``:
    deterministic, nothing stored, picklable for data-loader workers."""

    def __init__(self, sample, size: int, seed: int, split: str):
        self.sample, self.size, self.seed, self.split_code = sample, size, seed, SPLITS.index(split)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        if not 0 <= i < self.size:
            raise IndexError(i)
        return self.sample(np.random.default_rng((self.seed, self.split_code, i)))


class _DivisionSampler:
    """A passage of a uniformly drawn division."""

    def __init__(self, passages: _KJVPassages, num_classes: int, min_bytes: int, max_bytes: int):
        self.passages, self.num_classes = passages, num_classes
        self.min_bytes, self.max_bytes = min_bytes, max_bytes
        self.division = np.array([kjv_division_of_book(b) for b in passages.run_book])

    def __call__(self, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        label = int(rng.integers(self.num_classes))
        run = self.passages.pick_run(rng, np.flatnonzero(self.division == label))
        return self.passages.window(rng, run, self.min_bytes, self.max_bytes), label


class _SameBookSampler(_DivisionSampler):
    """Two passages: same book (different chapter runs) or two books of one division, half and half."""

    def __call__(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        books = self.passages.run_book
        runs = np.arange(len(books))
        label = int(rng.integers(2))
        if label:
            runs_per_book = np.bincount(books, minlength=len(KJV_BOOKS))
            first = self.passages.pick_run(rng, np.flatnonzero(runs_per_book[books] >= 2))
            second = self.passages.pick_run(rng, np.flatnonzero((books == books[first]) & (runs != first)))
        else:
            first = self.passages.pick_run(rng, runs)
            same_division = self.division == self.division[first]
            second = self.passages.pick_run(rng, np.flatnonzero(same_division & (books != books[first])))
        a = self.passages.window(rng, first, self.min_bytes, self.max_bytes)
        b = self.passages.window(rng, second, self.min_bytes, self.max_bytes)
        return a, b, label


class KJVDivisions(LRATask):
    """Byte-level classification of King James Bible passages into its six divisions.

    Stands in for LRA's byte-level IMDb sentiment task (25k / 25k reviews up to 4000 bytes, 2
    classes). A document is a run of consecutive verses of one book, 1000-4000 bytes (UTF-8
    bytes, tokens 1-256), labelled Law, History, Wisdom, Prophets, Gospels and Acts, or Epistles
    and Revelation (6 classes, drawn uniformly). Every 10th chapter is held out for test and
    another 10th for validation, so no test text is seen in training; windows within a split
    may overlap. Differences from LRA: other text and labels (topic and style rather than
    sentiment), 6 balanced classes, and examples made on demand (``num_train`` of them).

    Source: :func:`zoo.datasets.kjv_verses` (Debian ``bible-kjv``; cached).
    """

    name = "text"
    num_classes = len(KJV_DIVISIONS)
    max_length = 4000
    vocab_size = 257
    model = "ponet_lra_text"

    def __init__(
        self,
        num_train: int = 25_000,
        num_val: int = 2_000,
        num_test: int = 4_000,
        seed: int = 0,
        min_bytes: int = 1000,
        max_bytes: int = 4000,
        verses: Sequence[Verse] | None = None,
    ) -> None:
        if not 1 <= min_bytes <= max_bytes:
            raise ValueError(f"min_bytes, max_bytes: expected 1 <= min <= max, got {min_bytes}, {max_bytes}")
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.seed, self.min_bytes, self.max_bytes = seed, min_bytes, max_bytes
        self.max_length = max_bytes
        self._verses = verses
        self._passages: dict[str, _KJVPassages] = {}

    def passages(self, split: str) -> _KJVPassages:
        if split not in self._passages:
            if self._verses is None:
                self._verses = kjv_verses()
            self._passages[split] = _KJVPassages(self._verses, split)
        return self._passages[split]

    def split(self, split: str) -> Dataset:
        self._check_split(split)
        sampler = _DivisionSampler(self.passages(split), self.num_classes, self.min_bytes, self.max_bytes)
        return _LazySamples(sampler, self.sizes[split], self.seed, split)


class KJVSameBook(KJVDivisions):
    """Byte-level matching of two King James Bible passages: from the same book or not.

    Stands in for LRA's retrieval task (AAN: do two papers cite each other? two documents of
    up to 4000 bytes, 2 classes, a two-tower model). A pair is two passages as in
    :class:`KJVDivisions`; positives come from the same book (different chapters), negatives
    from two books of the same division, so the division's style does not give the answer.
    Labels are balanced. Differences from LRA: the relation (same book instead of a citation
    link), the text, and examples made on demand.
    """

    name = "retrieval"
    num_classes = 2
    pair = True
    model = "ponet_lra_retrieval"

    def split(self, split: str) -> Dataset:
        self._check_split(split)
        sampler = _SameBookSampler(self.passages(split), len(KJV_DIVISIONS), self.min_bytes, self.max_bytes)
        return _LazySamples(sampler, self.sizes[split], self.seed, split)


# ----------------------------------------------------------------------------- Pathfinder


def _draw_snake(
    canvas: np.ndarray, rng: np.random.Generator, dashes: int, dash: float, gap: float, turn: float
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Draw a dashed curve (``dashes`` strokes of ``dash`` px with ``gap`` px gaps, the heading
    changing by at most ``turn`` radians per stroke, turning away from the borders); return
    its two end pixels."""
    size = canvas.shape[0]
    low, high = 2.0, size - 3.0
    pos = rng.uniform(low, high, size=2)
    heading = rng.uniform(0, 2 * np.pi)
    start = (int(round(pos[0])), int(round(pos[1])))
    last = start
    ticks = np.linspace(0.0, dash, int(dash * 4) + 1)[:, None]
    for _ in range(dashes):
        heading += rng.uniform(-turn, turn)
        for _ in range(8):
            direction = np.array([np.cos(heading), np.sin(heading)])
            end = pos + (dash + gap) * direction
            if low <= end[0] <= high and low <= end[1] <= high:
                break
            heading += rng.uniform(np.pi / 2, 3 * np.pi / 2)  # turn away from the border
        else:
            break
        points = np.rint(pos + ticks * direction).astype(np.int64)
        canvas[points[:, 0], points[:, 1]] = 1.0
        last = (int(points[-1, 0]), int(points[-1, 1]))
        pos = end
    return start, last


def _mark(canvas: np.ndarray, point: tuple[int, int]) -> None:
    y, x = point
    canvas[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2] = 1.0


class _PathfinderSampler:
    """One image: two dashed curves, ``distractors`` shorter ones, two 3 x 3 markers."""

    def __init__(self, size: int, dashes: int, distractors: int):
        self.size, self.dashes, self.distractors = size, dashes, distractors

    def example(self, rng: np.random.Generator) -> dict[str, Any]:
        canvas = np.zeros((self.size, self.size), dtype=np.float32)
        label = int(rng.integers(2))
        first = _draw_snake(canvas, rng, self.dashes, 1.5, 1.0, np.pi / 5)
        second = _draw_snake(canvas, rng, self.dashes, 1.5, 1.0, np.pi / 5)
        for _ in range(self.distractors):
            _draw_snake(canvas, rng, max(2, self.dashes // 2), 1.5, 1.0, np.pi / 5)
        markers = (first[0], first[1]) if label else (first[0], second[1])
        for point in markers:
            _mark(canvas, point)
        image = (255 * canvas).astype(np.uint8).reshape(-1)
        return {"image": image, "label": label, "snakes": (first, second), "markers": markers}

    def __call__(self, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        example = self.example(rng)
        return example["image"], example["label"]


class Pathfinder(LRATask):
    """Pathfinder (Linsley et al. 2018): are the two marked points joined by one dashed curve?

    As LRA's Pathfinder-32: 32 x 32 grayscale images read as 1024 pixel tokens, 2 balanced
    classes; each image holds two dashed curves and short distractor curves; a positive image
    marks both ends of one curve, a negative one an end of each curve (same number of curves
    and markers in both classes). Differences: our own simple generator (strokes of 1.5 px,
    1 px gaps, turns up to 36 degrees, turning away from a 2-pixel border, binary
    intensities), not the original one, so difficulty and accuracies are not comparable to
    LRA's; 100k / 10k / 10k images made in parallel and cached.
    """

    name = "pathfinder"
    num_classes = 2
    max_length = 1024
    vocab_size = 256
    model = "ponet_lra_pathfinder"

    def __init__(
        self,
        num_train: int = 100_000,
        num_val: int = 10_000,
        num_test: int = 10_000,
        seed: int = 0,
        size: int = 32,
        dashes: int = 9,
        distractors: int = 4,
        workers: int | None = None,
    ) -> None:
        if size < 8 or dashes < 1 or distractors < 0:
            raise ValueError(
                f"Pathfinder: expected size >= 8, dashes >= 1, distractors >= 0, got {size}, {dashes}, {distractors}"
            )
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.seed = seed
        self.max_length = size * size
        self.sampler = _PathfinderSampler(size, dashes, distractors)
        self.workers = workers
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def split(self, split: str) -> Dataset:
        """Images made once (in parallel, deterministic in ``seed``) and cached in ``$ZOO_CACHE/text``."""
        self._check_split(split)
        if split not in self._arrays:
            self._arrays[split] = self._build(split)
        images, labels = self._arrays[split]
        return ArrayTokens(images, labels)

    def _build(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        count = self.sizes[split]
        s = self.sampler
        path = cache_dir() / (
            f"pathfinder_s{self.seed}_{split}{count}_px{s.size}_d{s.dashes}_x{s.distractors}.npz"
        )
        if path.is_file():
            with np.load(path) as f:
                return f["images"], f["labels"]
        code = SPLITS.index(split)
        jobs = [(s, self.seed, code, start, min(start + 1000, count)) for start in range(0, count, 1000)]
        workers = self.workers if self.workers is not None else min(16, os.cpu_count() or 1)
        log.info("generating %d Pathfinder images (%s) with %d worker(s)", count, split, workers)
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(workers) as pool:
                parts = list(pool.map(_pathfinder_chunk, jobs))
        else:
            parts = [_pathfinder_chunk(job) for job in jobs]
        images = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, s.size * s.size), np.uint8)
        labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, images=images, labels=labels)
        tmp.replace(path)
        return images, labels


def _pathfinder_chunk(job) -> tuple[np.ndarray, np.ndarray]:
    sampler, seed, code, start, stop = job
    items = [sampler(np.random.default_rng((seed, code, i))) for i in range(start, stop)]
    return np.stack([it[0] for it in items]), np.array([it[1] for it in items], dtype=np.int64)


TASKS: dict[str, type[LRATask]] = {
    "listops": ListOps,
    "image": FashionMNISTPixels,
    "text": KJVDivisions,
    "retrieval": KJVSameBook,
    "pathfinder": Pathfinder,
}


def get_task(name: str, **kwargs: Any) -> LRATask:
    """A task by name (``listops``, ``image``, ``text``, ``retrieval``, ``pathfinder``) with its keyword options."""
    if name not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name](**kwargs)


def dataset_fingerprint(dataset: Dataset, count: int = 16) -> str:
    """sha256 of the first ``count`` examples (to check that two builds are the same)."""
    digest = hashlib.sha256()
    for i in range(min(count, len(dataset))):  # type: ignore[arg-type]
        for part in dataset[i]:
            digest.update(np.asarray(part, dtype=np.int64).tobytes())
    return digest.hexdigest()
