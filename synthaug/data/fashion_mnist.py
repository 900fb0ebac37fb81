"""Fashion-MNIST from its IDX files, without a download.

The reader looks in the folder the caller names, then in the Debian package's folder
``/usr/share/datasets/fashion-mnist/`` (``apt-get install dataset-fashion-mnist``); no
environment variable is read. Where none
holds the files and ``download=True`` is passed, torchvision's downloader is used.

Items are ``(PIL.Image mode "L", int)`` like ``torchvision.datasets.FashionMNIST``, and the
dataset exposes ``data`` (uint8 N×28×28 tensor), ``targets`` (int64 N tensor), ``classes`` and
``class_to_idx``.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

__all__ = [
    "FASHION_MNIST_CLASSES",
    "DEBIAN_FASHION_MNIST_DIR",
    "FashionMNIST",
    "find_fashion_mnist",
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

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type codes (http://yann.lecun.com/exdb/mnist/): only unsigned bytes occur in (Fashion-)MNIST.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array of its stored shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{type_code:02x}")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != expected:
        raise ValueError(f"{path}: truncated IDX file ({len(body)} bytes of data, expected {expected})")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def _find_file(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        p = folder / name
        if p.is_file():
            return p
    return None


def find_fashion_mnist(root: Optional[Union[str, os.PathLike]] = None) -> Optional[Path]:
    """The folder that holds the four Fashion-MNIST IDX files, or ``None``.

    ``root`` is searched first (itself and ``root/FashionMNIST/raw`` as torchvision lays it out),
    then the Debian package's folder.
    """
    candidates = []
    if root is not None:
        root = Path(root)
        candidates += [root, root / "FashionMNIST" / "raw", root / "fashion-mnist"]
    candidates.append(DEBIAN_FASHION_MNIST_DIR)
    for folder in candidates:
        if all(_find_file(folder, s) for pair in _FILES.values() for s in pair):
            return folder
    return None


class FashionMNIST:
    """Fashion-MNIST as a map-style torch dataset (works with ``torch.utils.data.DataLoader``).

    Args:
        root: folder holding the IDX files (``None``: the Debian package's folder).
        train: the 60,000-image training split (``True``) or the 10,000-image test split.
        transform: applied to the PIL image (mode ``"L"``, 28×28).
        target_transform: applied to the int label.
        download: where the files are not found, fetch them with torchvision into ``root``
            (needs the internet; refused otherwise with the install hint).
    """

    classes: Sequence[str] = FASHION_MNIST_CLASSES

    def __init__(
        self,
        root: Optional[Union[str, os.PathLike]] = None,
        train: bool = True,
        transform: Optional[Callable] = None,
        target_transform: Optional[Callable] = None,
        download: bool = False,
    ) -> None:
        import torch

        folder = find_fashion_mnist(root)
        if folder is None and download:
            from torchvision.datasets import FashionMNIST as _TV

            target = Path(root) if root is not None else Path.home() / ".cache" / "synthaug" / "data"
            _TV(str(target), train=train, download=True)
            folder = find_fashion_mnist(target)
        if folder is None:
            where = f"{root} or " if root is not None else ""
            raise FileNotFoundError(
                f"Fashion-MNIST IDX files not found in {where}{DEBIAN_FASHION_MNIST_DIR}. "
                "Install them with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
                "pass the folder that holds them, or use download=True where the internet is reachable."
            )
        images_stem, labels_stem = _FILES[bool(train)]
        images = read_idx(_find_file(folder, images_stem))
        labels = read_idx(_find_file(folder, labels_stem))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{folder}: IDX files do not hold N×28×28 images with N labels")
        self.root = folder
        self.train = bool(train)
        self.data = torch.from_numpy(images.copy())
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.transform = transform
        self.target_transform = target_transform
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        from PIL import Image

        img = Image.fromarray(self.data[index].numpy())  # uint8 2-D -> mode "L"
        target = int(self.targets[index])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        return f"FashionMNIST(split={split}, n={len(self)}, root={self.root})"
