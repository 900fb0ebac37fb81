"""Reading a folder of images (the 20–50 real images a LoRA is trained on, img2img sources)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np

from synthaug.imaging import pil_to_array

__all__ = ["IMAGE_EXTENSIONS", "LoadedImages", "list_image_files", "load_image_folder", "read_image"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".pgm", ".ppm")


@dataclass
class LoadedImages:
    """Images read from a folder, in file-name order.

    Attributes:
        files: the files read, one per image.
        images: uint8 H×W×C arrays (C as requested, or 1/3 as stored).
        skipped: ``{file name: reason}`` of files that could not be used.
    """

    folder: Path
    files: List[Path] = field(default_factory=list)
    images: List[np.ndarray] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)


def list_image_files(folder: Union[str, os.PathLike]) -> List[Path]:
    """Files with an image extension directly inside ``folder`` (sorted by name)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_image(path: Union[str, os.PathLike], *, channels: Optional[int] = None) -> np.ndarray:
    """One image file as uint8 H×W×C: C as requested (1 gray, 3 RGB), or ``None`` to keep gray
    images gray (modes L, 1, I;16, I, F, LA) and make everything else RGB. The decoding every
    synthaug reader of real images shares, so that their pixel hashes agree."""
    from PIL import Image

    with Image.open(path) as pil:
        pil.load()
        return pil_to_array(pil, channels)


def load_image_folder(folder: Union[str, os.PathLike], *, channels: Optional[int] = None) -> LoadedImages:
    """Decode every image file in ``folder``.

    Args:
        channels: 1 (gray), 3 (RGB) or ``None`` (keep: gray stays 1, everything else 3).

    Raises:
        FileNotFoundError: ``folder`` does not exist or is not a directory.
        ValueError: the folder holds no files, or none that decode as images (the reasons of
            the first few are given).
    """
    from PIL import UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist or is not a directory")
    entries = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not entries:
        raise ValueError(f"image folder {folder} is empty")
    out = LoadedImages(folder=folder)
    for path in entries:
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            out.skipped[path.name] = f"not an image file extension ({path.suffix or 'none'})"
            continue
        try:
            arr = read_image(path, channels=channels)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            out.skipped[path.name] = f"cannot be decoded ({type(exc).__name__}: {exc})"
            continue
        out.files.append(path)
        out.images.append(arr)
    if not out.images:
        reasons = "; ".join(f"{k}: {v}" for k, v in list(out.skipped.items())[:3])
        raise ValueError(f"no readable images in {folder} ({len(out.skipped)} files skipped: {reasons})")
    return out
