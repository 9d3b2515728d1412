"""Image datasets for the vision family: Fashion-MNIST from its IDX files and ImageFolder trees.

Fashion-MNIST (Xiao, Rasul, Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking
Machine Learning Algorithms", arXiv 1708.07747): 60k train / 10k test grey 28x28 images of 10
clothing classes, read by :func:`zoo.datasets.fashion_mnist` from the gzipped IDX files of the
Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``). Images come out
as PIL images (RGB by default, the grey value repeated) so timm's transforms apply unchanged.

Everything else goes through ``timm.data.create_dataset`` (ImageFolder / ImageTar trees,
``root/<split>/<class>/<image>``), exactly as timm's validate.py and train.py read it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from zoo.datasets import FASHION_MNIST_DIR, FASHION_MNIST_FILES, fashion_mnist, fashion_mnist_dir, read_idx

__all__ = [
    "DATASET_DEFAULTS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FashionMNIST",
    "create_image_dataset",
    "export_image_folder",
    "is_fashion_mnist",
    "read_idx",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_SPLIT_ALIASES = {"train": "train", "training": "train", "test": "test", "val": "test", "validation": "test"}
_DATASET_NAMES = ("fashion_mnist", "fashion-mnist", "fashionmnist", "fmnist")

# preprocessing and head size a dataset implies unless the command line says otherwise
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "fashion_mnist": dict(
        num_classes=10,
        input_size=(3, 64, 64),
        crop_pct=1.0,
        interpolation="bicubic",
        mean=(0.2860, 0.2860, 0.2860),
        std=(0.3530, 0.3530, 0.3530),
    ),
}


def is_fashion_mnist(name: str = "", root: Optional[str | os.PathLike] = None) -> bool:
    """Whether ``--dataset`` names Fashion-MNIST, or ``root`` is a folder of its IDX files."""
    if name:
        return name.lower().split("/")[-1] in _DATASET_NAMES
    if root is None:
        return False
    root = Path(root)
    return any((root / (FASHION_MNIST_FILES["test"][0] + ext)).is_file() for ext in (".gz", ""))


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST as ``(image, label)`` pairs; the image goes through ``transform`` (timm's or any).

    Parameters
    ----------
    root:
        Folder of the four IDX files (default ``$ZOO_FASHION_MNIST``, else
        ``/usr/share/datasets/fashion-mnist``).
    split:
        ``train`` or ``test`` (``validation`` and ``val`` mean ``test``).
    img_mode:
        PIL mode of the returned images: ``RGB`` (grey repeated, default) or ``L``.
    num_samples:
        Keep only the first ``num_samples`` images.
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(
        self,
        root: Optional[str | os.PathLike] = None,
        split: str = "train",
        transform: Optional[Callable] = None,
        target_transform: Optional[Callable] = None,
        img_mode: str = "RGB",
        num_samples: Optional[int] = None,
    ):
        key = _SPLIT_ALIASES.get(split.lower())
        if key is None:
            raise ValueError(f"split: expected one of {sorted(_SPLIT_ALIASES)}, got {split!r}")
        if img_mode not in ("RGB", "L"):
            raise ValueError(f"img_mode: expected 'RGB' or 'L', got {img_mode!r}")
        self.root = fashion_mnist_dir(root)
        self.split = key
        images, labels = fashion_mnist(key, self.root)
        if num_samples is not None:
            images, labels = images[:num_samples], labels[:num_samples]
        self.images = images
        self.targets = labels
        self.transform = transform
        self.target_transform = target_transform
        self.img_mode = img_mode

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, index: int):
        """The untransformed PIL image."""
        from PIL import Image

        img = Image.fromarray(self.images[index])  # uint8 (28, 28) -> mode "L"
        return img.convert(self.img_mode) if self.img_mode != "L" else img

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        img = self.image(index)
        target = int(self.targets[index])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        return f"{index:05d}.png" if basename else f"{self.split}/{index:05d}.png"

    def filenames(self, basename: bool = False, absolute: bool = False) -> list[str]:
        return [self.filename(i, basename) for i in range(len(self))]


def create_image_dataset(
    name: str = "",
    root: Optional[str | os.PathLike] = None,
    split: str = "validation",
    is_training: bool = False,
    img_mode: str = "RGB",
    num_samples: Optional[int] = None,
    class_map: str = "",
    seed: int = 42,
) -> torch.utils.data.Dataset:
    """Fashion-MNIST (by name or by its IDX folder) or, through ``timm.data.create_dataset``, anything timm reads."""
    if is_fashion_mnist(name, root if not name else None):
        return FashionMNIST(root=root, split=split, img_mode=img_mode, num_samples=num_samples)
    if not name and root is None:
        raise ValueError("dataset: expected a data folder or --dataset NAME, got neither")
    if root is not None and not name and not Path(root).exists():
        raise FileNotFoundError(f"data: no such folder {root}")
    from timm.data import create_dataset

    return create_dataset(
        name,
        root=None if root is None else str(root),
        split=split,
        is_training=is_training,
        class_map=class_map,
        num_samples=num_samples,
        input_img_mode=img_mode,
        seed=seed,
    )


def export_image_folder(
    dataset: FashionMNIST, out_dir: str | os.PathLike, limit: Optional[int] = None, ext: str = ".png"
) -> Path:
    """Write a Fashion-MNIST split as ``out_dir/<class index>_<class name>/<index>.png`` (an ImageFolder tree)."""
    out = Path(out_dir)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    for i in range(count):
        label = int(dataset.targets[i])
        folder = out / f"{label}_{FASHION_MNIST_CLASSES[label].replace('/', '-').replace(' ', '_')}"
        folder.mkdir(parents=True, exist_ok=True)
        dataset.image(i).save(folder / f"{i:05d}{ext}")
    return out
