"""Vision-family test helpers: one CPU thread per test (the suite shares two cores), tiny image trees."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_image_folder(tmp_path):
    """root/validation/<class>/<image>.png: 3 classes, 4 random RGB images each, odd sizes."""
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    root = tmp_path / "folder"
    for c, name in enumerate(["ant", "bee", "cat"]):
        folder = root / "validation" / name
        folder.mkdir(parents=True)
        for i in range(4):
            h, w = 40 + 3 * i, 52 - 2 * c
            pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root
