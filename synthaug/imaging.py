"""Small image helpers shared by the CLI, the trainers and the reports (numpy + PIL only)."""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np

__all__ = ["image_grid", "save_image_grid", "to_hwc_uint8"]


def to_hwc_uint8(image) -> np.ndarray:
    """A uint8 H×W×C array (C = 1 or 3) from a PIL image, an H×W(×C) array or a C×H×W tensor."""
    if hasattr(image, "mode") and hasattr(image, "size"):  # PIL
        image = np.asarray(image.convert("L" if image.mode in ("L", "1", "I", "F") else "RGB"))
    elif type(image).__module__.startswith("torch"):
        image = image.detach().cpu()
        if image.ndim == 3:
            image = image.permute(1, 2, 0)
        image = image.numpy()
        if image.dtype != np.uint8:
            image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected an H×W, H×W×1 or H×W×3 image, got shape {image.shape} (drop the alpha channel of RGBA images)")
    return image


def image_grid(
    images: Sequence,
    cols: Optional[int] = None,
    *,
    pad: int = 2,
    scale: int = 1,
    background: int = 255,
) -> np.ndarray:
    """Tile images (all the same size) into one uint8 H×W×C array, row-major.

    Gray and RGB images may be mixed: gray ones are replicated to RGB then.
    """
    arrays = [to_hwc_uint8(im) for im in images]
    if not arrays:
        raise ValueError("no images to put in a grid")
    h, w = arrays[0].shape[:2]
    for i, a in enumerate(arrays):
        if a.shape[:2] != (h, w):
            raise ValueError(f"grid image {i} is {a.shape[:2]}, image 0 is {(h, w)}")
    channels = 3 if any(a.shape[2] == 3 for a in arrays) else 1
    if channels == 3:
        arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]
    n = len(arrays)
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, channels), background, np.uint8)
    for i, a in enumerate(arrays):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y : y + h, x : x + w] = a
    if scale > 1:
        canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    return canvas


def save_image_grid(images: Sequence, path: Union[str, os.PathLike], cols: Optional[int] = None, **kwargs) -> str:
    """Write :func:`image_grid` as a PNG; small images are enlarged so the grid is legible."""
    from PIL import Image

    if "scale" not in kwargs:
        h = to_hwc_uint8(images[0]).shape[0] if len(images) else 64
        kwargs["scale"] = max(1, 96 // max(1, h))
    grid = image_grid(images, cols, **kwargs)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid).save(path)
    return str(path)
