"""Shared fixtures: the notebook's .py imported without running, and tiny MNIST IDX files."""
import importlib.util
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "mnist_generative_models_complete.py"
NOTEBOOK = ROOT / "MNIST_Generative_Models_Complete.ipynb"


@pytest.fixture(scope="session")
def nb():
    """The notebook's code as a module; its guarded cells do not run on import."""
    spec = importlib.util.spec_from_file_location("mnist_gen", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["mnist_gen"] = module
    spec.loader.exec_module(module)
    return module


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an array in the IDX format of the MNIST files (uint8 payload)."""
    code = {1: 0x0801, 3: 0x0803}[array.ndim]
    with open(path, "wb") as f:
        f.write(struct.pack(">I", code))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def fake_digits(n: int, seed: int):
    """n 28x28 uint8 images of a crude per-class pattern (a bar at a class-specific row), with labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 30, size=(n, 28, 28))
    for i, y in enumerate(labels):
        images[i, 4 + 2 * y:6 + 2 * y, 6:22] = 255
    return images.astype(np.uint8), labels.astype(np.uint8)


def make_mnist_root(root: Path, n_train: int = 512, n_test: int = 128, folder: str = "MNIST") -> Path:
    """Tiny IDX files in root/<folder>/raw/ (folder FashionMNIST for --dataset fashion)."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = fake_digits(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory) -> Path:
    return make_mnist_root(tmp_path_factory.mktemp("data"))


def started(nb, cfg):
    """A run context after its first stage: device picked, data loaded (what each later stage needs)."""
    ctx = nb.Run(cfg)
    nb.start(ctx)
    return ctx
