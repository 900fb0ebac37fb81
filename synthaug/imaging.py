"""Small image helpers shared by the CLI, the trainers and the reports (numpy + PIL only)."""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np

__all__ = ["GRAY_MODES", "image_grid", "pil_channels", "pil_to_array", "save_image_grid", "to_hwc_uint8"]

#: PIL modes read as one gray channel (besides "I;16" and the other "I;" modes)
GRAY_MODES = ("1", "L", "LA", "I", "F")


def pil_channels(mode: str) -> int:
    """1 for PIL's gray modes (``1``, ``L``, ``LA``, ``I``, ``I;16``..., ``F``), 3 for the rest."""
    return 1 if mode in GRAY_MODES or mode.startswith("I;") else 3


def pil_to_array(image, channels: Optional[int] = None) -> np.ndarray:
    """A PIL image as uint8 H×W×C: C = ``channels`` (1 gray, 3 RGB), or by its mode (gray modes
    stay one channel, every other mode, alpha and palettes included, becomes RGB)."""
    channels = channels or pil_channels(image.mode)
    arr = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    return arr[:, :, None] if arr.ndim == 2 else arr


def to_hwc_uint8(image, *, name: str = "image") -> np.ndarray:
    """A uint8 H×W×C array (C = 1 or 3) from a PIL image, an H×W or H×W×C uint8 array (or nested
    lists of one), or an H×W or C×H×W uint8 tensor: the one conversion every synthaug reader of
    images uses.

    Float images are refused, never rescaled: whether 1.0 means white or almost black is the
    caller's to say. ``name`` names the image in errors (e.g. ``"image 3"``).

    Raises:
        ValueError: a dtype other than uint8, a shape that is no image, or another type.
    """
    if hasattr(image, "mode") and hasattr(image, "size") and hasattr(image, "convert"):  # PIL
        return pil_to_array(image)
    if type(image).__module__.startswith("torch") and hasattr(image, "numpy"):
        if str(image.dtype) != "torch.uint8":
            raise ValueError(
                f"{name} is a {image.dtype} tensor; images must be uint8 (0..255). "
                "Convert float images with (x * 255).round().clamp(0, 255).to(torch.uint8)."
            )
        if image.ndim not in (2, 3):
            raise ValueError(f"{name} tensor must be H×W or C×H×W, got shape {tuple(image.shape)}")
        image = image.detach().cpu()
        image = (image if image.ndim == 2 else image.permute(1, 2, 0)).numpy()
    elif isinstance(image, (list, tuple)):  # nested lists of pixel values
        image = np.asarray(image)
    elif not isinstance(image, np.ndarray):
        raise ValueError(f"{name} is a {type(image).__name__}; expected a PIL image, numpy array or tensor")
    if image.dtype != np.uint8:
        raise ValueError(
            f"{name} has dtype {image.dtype}; images must be uint8 (0..255). "
            "Convert float images with (x * 255).round().clip(0, 255).astype(np.uint8)."
        )
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"{name} must be H×W or H×W×C with C = 1 or 3, got shape {image.shape} (drop the alpha channel of RGBA images)")
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
