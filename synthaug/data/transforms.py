"""Image transforms of the study's datasets: resizing, normalization, augmentation, and a dataset
wrapper that applies one.

Every transform here is a picklable object (or a torchvision ``Compose``), so it travels to
DataLoader workers. torchvision and PIL are imported when a transform is built or called, so
importing this module stays light.
"""

from __future__ import annotations

from typing import Callable, Optional

from synthaug.imaging import to_hwc_uint8

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "PILResize",
    "WithTransform",
    "classic_augmentation",
    "fashion_mnist_transform",
    "normalize_transform",
    "resize_image",
]

FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


def fashion_mnist_transform():
    """PIL "L" 28×28 → float tensor 1×28×28, normalized with Fashion-MNIST's mean and std."""
    from torchvision import transforms as T

    return T.Compose([T.ToTensor(), T.Normalize((FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,))])


def normalize_transform(channels: int):
    """PIL image → float tensor C×H×W scaled to [-1, 1] (mean 0.5 and std 0.5 per channel)."""
    from torchvision import transforms as T

    return T.Compose([T.ToTensor(), T.Normalize((0.5,) * channels, (0.5,) * channels)])


def classic_augmentation(base: Optional[Callable] = None, *, size: int = 28):
    """Standard light augmentation (flip, ±10° rotation, ±2 px shift, 0.9–1.1 scale) then ``base``."""
    from torchvision import transforms as T

    aug = T.Compose([T.RandomHorizontalFlip(), T.RandomAffine(degrees=10, translate=(2 / size, 2 / size), scale=(0.9, 1.1))])
    return T.Compose([aug, base]) if base is not None else aug


def resize_image(image, size: int, mode: str):
    """A PIL image (or a uint8 array, H×W or H×W×C) as a PIL image of ``mode`` at
    ``size``×``size`` (bicubic; an image already that size is not resampled)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        arr = to_hwc_uint8(image)
        image = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    image = image.convert(mode)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return image


class PILResize:
    """Picklable transform: a PIL image (or uint8 array) → ``mode`` at ``size``×``size``."""

    def __init__(self, size: int, mode: str) -> None:
        self.size, self.mode = size, mode

    def __call__(self, image):
        return resize_image(image, self.size, self.mode)


class WithTransform:
    """A dataset whose images pass through ``transform`` (targets unchanged)."""

    def __init__(self, dataset, transform: Callable) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return self.transform(x), y
