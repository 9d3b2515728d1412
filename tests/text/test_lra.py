"""LRA-style tasks: ListOps follows the LRA rules, the offline tasks are deterministic and leak-free."""

import re

import numpy as np
import pytest
import torch

from zoo.datasets import KJV_BOOKS, Verse
from zoo.text import lra
from zoo.text.lra import (
    KJV_DIVISIONS,
    FashionMNISTPixels,
    KJVDivisions,
    KJVSameBook,
    ListOps,
    collate,
    dataset_fingerprint,
    kjv_division_of_book,
    listops_value,
)

SMALL = dict(num_train=40, num_val=8, num_test=8, min_length=20, max_length=120, workers=1)


def evaluate_listops(tokens):
    """Independent evaluator with a stack (tokens with closing brackets); also returns depth and arities."""
    ops = {11: "MIN", 12: "MAX", 13: "MED", 14: "SM"}
    stack, depth, arities = [], 0, []
    for t in tokens:
        if t in ops:
            stack.append([ops[t]])
            depth = max(depth, len(stack))
        elif t == 15:
            op, *args = stack.pop()
            arities.append(len(args))
            if op == "MED":
                value = int(np.median(args))
            else:
                value = {"MIN": min, "MAX": max, "SM": lambda a: sum(a) % 10}[op](args)
            if not stack:
                return value, depth, arities
            stack[-1].append(value)
        else:
            value = t - 1
            if not stack:
                return value, depth, arities
            stack[-1].append(value)
    raise AssertionError("unbalanced expression")


def test_listops_labels_lengths_and_tree_shapes_follow_lra():
    task = ListOps(closing_brackets=True, **SMALL)
    data = task.split("train")
    for i in range(len(data)):
        tokens, label = data[i]
        value, depth, arities = evaluate_listops(tokens.tolist())
        assert value == label
        assert 20 < len(tokens) < 120
        assert depth <= 9 and all(2 <= a <= 10 for a in arities)  # root at depth 1, max_depth 10
    # without brackets the same examples lose only the ']' tokens (what LRA's tokenizer kept)
    plain = ListOps(closing_brackets=False, **SMALL).split("train")
    tokens, label = plain[3]
    assert 15 not in tokens and np.array_equal(tokens, data[3][0][data[3][0] != 15]) and label == data[3][1]


def test_listops_is_deterministic_and_deduplicated():
    a = ListOps(seed=1, **SMALL)
    b = ListOps(seed=1, **{**SMALL, "workers": 2})
    c = ListOps(seed=2, **SMALL)
    for split in ("train", "val", "test"):
        assert dataset_fingerprint(a.split(split), 50) == dataset_fingerprint(b.split(split), 50)
    assert dataset_fingerprint(a.split("train")) != dataset_fingerprint(c.split("train"))
    seqs = [
        bytes(a.split(s)[i][0].astype(np.uint8))
        for s in ("train", "val", "test")
        for i in range(len(a.split(s)))
    ]
    assert len(set(seqs)) == len(seqs) == 56
    # the cache returns the same data
    again = ListOps(seed=1, **SMALL)
    assert dataset_fingerprint(again.split("test"), 50) == dataset_fingerprint(a.split("test"), 50)


def test_listops_value_matches_lra_definitions():
    assert listops_value("MED", [1, 2, 3, 4]) == 2  # int(np.median) of 2.5
    assert listops_value("MED", [9, 0, 5]) == 5
    assert listops_value("SM", [9, 8, 7]) == 4
    assert listops_value("MIN", [3, 1]) == 1 and listops_value("MAX", [3, 1]) == 3
    rng = np.random.default_rng(0)
    for _ in range(200):
        args = rng.integers(0, 10, size=rng.integers(2, 11)).tolist()
        assert lra._fast_value(2, args) == int(np.median(args))
    with pytest.raises(ValueError, match="op: expected one of"):
        listops_value("FIRST", [1, 2])


def test_collate_pads_truncates_and_masks():
    items = [(np.array([5, 6, 7]), 1), (np.arange(1, 11), 0)]
    batch = collate(items, 6)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0, 0], [1, 2, 3, 4, 5, 6]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 6] and batch["labels"].tolist() == [1, 0]
    pair = collate([(np.array([1]), np.array([2, 3]), 1)], 4)
    assert pair["input_ids_2"].tolist() == [[2, 3, 0, 0]] and pair["attention_mask_2"].dtype == torch.bool


def fake_verses():
    """Every book, 12 chapters of 5 verses; each verse says where it comes from."""
    return [
        Verse(b, c, v, f"book{b:02d} chapter{c:02d} verse{v} " + "lorem ipsum " * (v + 3))
        for b in range(len(KJV_BOOKS))
        for c in range(1, 13)
        for v in range(1, 6)
    ]


def _origins(tokens):
    text = bytes((np.asarray(tokens) - 1).astype(np.uint8)).decode()
    return {(int(b), int(c)) for b, c in re.findall(r"book(\d\d) chapter(\d\d)", text)}


def test_kjv_divisions_labels_splits_and_determinism():
    verses = fake_verses()
    chapter_index = {(v.book, v.chapter): i for i, v in enumerate(v for v in verses if v.verse == 1)}
    task = KJVDivisions(num_train=120, num_val=30, num_test=30, min_bytes=200, max_bytes=600, verses=verses)
    for split in ("train", "test"):
        data = task.split(split)
        labels = []
        for i in range(len(data)):
            tokens, label = data[i]
            assert 1 <= tokens.min() and tokens.max() <= 256 and len(tokens) <= 600
            origins = _origins(tokens)
            assert origins and {kjv_division_of_book(b) for b, _ in origins} == {label}
            assert len({b for b, _ in origins}) == 1  # one book per document
            assert {lra._split_of_chapter(chapter_index[o]) for o in origins} == {split}
            labels.append(label)
        assert set(labels) == set(range(len(KJV_DIVISIONS)))
    again = KJVDivisions(num_train=120, num_val=30, num_test=30, min_bytes=200, max_bytes=600, verses=verses)
    assert dataset_fingerprint(again.split("val"), 30) == dataset_fingerprint(task.split("val"), 30)
    other_seed = KJVDivisions(num_train=120, min_bytes=200, max_bytes=600, seed=5, verses=verses)
    assert dataset_fingerprint(other_seed.split("train")) != dataset_fingerprint(task.split("train"))


def test_kjv_same_book_pairs():
    task = KJVSameBook(num_train=200, min_bytes=200, max_bytes=600, verses=fake_verses())
    data = task.split("train")
    labels = []
    for i in range(len(data)):
        a, b, label = data[i]
        (book_a,), (book_b,) = {x for x, _ in _origins(a)}, {x for x, _ in _origins(b)}
        assert label == int(book_a == book_b)
        assert kjv_division_of_book(book_a) == kjv_division_of_book(book_b)
        if label:  # positives come from different runs of chapters
            assert not (_origins(a) & _origins(b))
        labels.append(label)
    assert 0.35 < np.mean(labels) < 0.65


def test_fashion_mnist_pixels_from_idx_files(tmp_path, write_idx):
    rng = np.random.default_rng(0)
    train_x, test_x = rng.integers(0, 256, (12, 784)), rng.integers(0, 256, (4, 784))
    train_y, test_y = rng.integers(0, 10, 12), rng.integers(0, 10, 4)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_x)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", train_y, labels=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test_x)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", test_y, labels=True)
    task = FashionMNISTPixels(data_dir=tmp_path, num_val=2)
    train, val, test = task.split("train"), task.split("val"), task.split("test")
    assert (len(train), len(val), len(test)) == (10, 2, 4)
    assert np.array_equal(val[1][0], train_x[11]) and val[1][1] == train_y[11]
    assert np.array_equal(test[3][0], test_x[3]) and test[3][1] == test_y[3]
    with pytest.raises(ValueError, match="split: expected one of"):
        task.split("dev")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        FashionMNISTPixels(data_dir=tmp_path / "nowhere").split("train")


def test_get_task_errors():
    with pytest.raises(ValueError, match="task: expected one of"):
        lra.get_task("pathfinder128")
    with pytest.raises(ValueError, match="ListOps: expected"):
        ListOps(min_length=50, max_length=40)


def test_pathfinder_markers_follow_the_label_and_builds_are_deterministic():
    from zoo.text.lra import Pathfinder, _PathfinderSampler

    sampler = _PathfinderSampler(32, 9, 4)
    labels = []
    for i in range(60):
        ex = sampler.example(np.random.default_rng((0, 0, i)))
        (first_start, first_end), (_, second_end) = ex["snakes"]
        expected = (first_start, first_end) if ex["label"] else (first_start, second_end)
        assert ex["markers"] == expected
        image = ex["image"].reshape(32, 32)
        for y, x in ex["markers"]:
            assert (image[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2] == 255).all()
        assert set(np.unique(image)) <= {0, 255} and 0.02 < (image > 0).mean() < 0.5
        labels.append(ex["label"])
    assert 0.3 < np.mean(labels) < 0.7
    from zoo.text.corpus import cache_dir

    a = Pathfinder(num_train=1500, num_val=10, num_test=10, workers=2).split("train")
    for cached in cache_dir().glob("pathfinder_*"):
        cached.unlink()  # rebuild on one worker: the same images
    b = Pathfinder(num_train=1500, num_val=10, num_test=10, workers=1).split("train")
    assert len(a) == 1500 and dataset_fingerprint(a, 1500) == dataset_fingerprint(b, 1500)
    first = sampler(np.random.default_rng((0, 0, 1234)))
    assert np.array_equal(a[1234][0], first[0]) and a[1234][1] == first[1]
