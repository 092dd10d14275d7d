"""Shared fixtures: small generated image folders and a tiny trained model (no downloads)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("FIXRES_NO_PROGRESS", "1")


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    try:
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
    except ImportError:
        pass


def write_random_folder(root, classes=("a", "b", "c"), per_class=4, sizes=((96, 80), (80, 120)), seed=0):
    """An ImageFolder of random-noise JPEG/PNG images of several sizes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            ext = "png" if i % 2 else "jpg"
            p = os.path.join(root, c, f"{c}_{i}.{ext}")
            Image.fromarray(arr).save(p)
            paths.append(p)
    return paths


@pytest.fixture
def random_folder(tmp_path):
    root = tmp_path / "imgs"
    write_random_folder(str(root))
    return str(root)


@pytest.fixture(scope="session")
def demo_small(tmp_path_factory):
    """The built-in demo data at a small size (a few seconds to generate)."""
    from fixres_deploy.data.demo import write_demo_data

    root = tmp_path_factory.mktemp("demo_small")
    write_demo_data(root, train_per_class=16, val_per_class=8)
    return str(root)


@pytest.fixture(scope="session")
def demo_trained(tmp_path_factory):
    """The demo recipe at test size: data + a tiny_resnet trained at 64 px (about a minute)."""
    from fixres_deploy.sweep.pipeline import prepare_demo_model

    root = tmp_path_factory.mktemp("demo_trained")
    return prepare_demo_model(str(root), size="test")
