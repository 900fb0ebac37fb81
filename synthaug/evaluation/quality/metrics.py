"""Image forms and distances: the common representation, pixel distance, PSNR and SSIM of uint8
images, and the blocked nearest-image search the report is built on.

The definitions (common representation, pixel distance, PSNR, SSIM) are in
:mod:`synthaug.evaluation.quality`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from synthaug.imaging import to_hwc_uint8

__all__ = ["ImageSet", "SSIM_SETTINGS", "common_representation", "pixel_distance", "psnr", "ssim"]

#: the SSIM constants used (Wang et al. 2004)
SSIM_SETTINGS = {"window": "gaussian", "window_size": 11, "sigma": 1.5, "k1": 0.01, "k2": 0.03, "data_range": 255, "region": "valid", "channels": "per channel, averaged"}
_BLOCK_BYTES = 64 << 20  # float64 bytes per block of images in the distance computations
_MAX_BLOCK_ROWS = 2048

#: a set of images: a uint8 N×H×W(×C) array, or a sequence of H×W(×C) arrays / PIL images / C×H×W tensors
ImageSet = Union[np.ndarray, Sequence[Any]]


# ---------------------------------------------------------------------------------- inputs
def as_image_list(images: ImageSet, name: str) -> List[np.ndarray]:
    """uint8 H×W×C arrays (C = 1 or 3) from an N×H×W(×C) array or a sequence of images, each
    converted by :func:`synthaug.imaging.to_hwc_uint8` (whose errors then name ``name[i]``)."""
    if isinstance(images, np.ndarray):
        if images.ndim not in (3, 4):
            raise ValueError(f"{name}: expected a uint8 array N×H×W×C or N×H×W, got shape {images.shape}")
        images = list(images)
    out = [to_hwc_uint8(im, name=f"{name}[{i}]") for i, im in enumerate(images)]
    if not out:
        raise ValueError(f"{name}: no images given; pass at least one uint8 H×W×C image")
    return out


def common_target(real: List[np.ndarray]) -> Tuple[int, int, int]:
    """``(height, width, channels)`` of the common representation the real images set."""
    sizes = Counter(im.shape[:2] for im in real)
    top = max(sizes.values())
    size = next(im.shape[:2] for im in real if sizes[im.shape[:2]] == top)  # first seen among the most common
    channels = 3 if any(im.shape[2] == 3 for im in real) else 1
    return int(size[0]), int(size[1]), channels


def common_representation(images: ImageSet, *, height: int, width: int, channels: int) -> Tuple[np.ndarray, Dict[str, int]]:
    """Bring uint8 images to one ``height``×``width``×``channels`` (the rule is in
    :mod:`synthaug.evaluation.quality`).

    Args:
        images: uint8 N×H×W(×C) array or a sequence of H×W(×C) images (C = 1 or 3).
        height, width: target size in pixels; channels: 1 or 3.

    Returns:
        ``(array N×height×width×channels uint8, {"resized": k, "channels_converted": m})``.
    """
    if channels not in (1, 3) or height < 1 or width < 1:
        raise ValueError(f"common_representation: need height, width >= 1 and channels 1 or 3, got {height}×{width}×{channels}")
    images = as_image_list(images, "images")
    out = np.empty((len(images), height, width, channels), np.uint8)
    resized = converted = 0
    for i, im in enumerate(images):
        if im.shape[2] != channels:
            converted += 1
            if channels == 3:
                im = np.repeat(im, 3, axis=2)
            else:
                im = np.asarray(Image.fromarray(im).convert("L"))[:, :, None]
        if im.shape[:2] != (height, width):
            resized += 1
            pil = Image.fromarray(im[:, :, 0] if channels == 1 else im)
            im = np.asarray(pil.resize((width, height), Image.BILINEAR)).reshape(height, width, channels)
        out[i] = im
    return out, {"resized": resized, "channels_converted": converted}


# ---------------------------------------------------------------------------------- distances
def flatten_images(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1)


def _block_rows(dim: int) -> int:
    return int(max(1, min(_MAX_BLOCK_ROWS, _BLOCK_BYTES // (8 * dim))))


def ssd_to_distance(ssd, dim: int):
    """Pixel distance from sums of squared uint8 differences over ``dim`` values."""
    return np.sqrt(np.asarray(ssd, np.float64) / (dim * 255.0**2))


def gram_blocks(a: np.ndarray, b: np.ndarray):
    """Yield ``(i0, j0, ssd_block)`` with the exact sums of squared differences of rows of ``a``
    and ``b`` (uint8, flattened). The float64 arithmetic is exact: every operand and partial sum
    is an integer below 2**53."""
    fa, fb = flatten_images(a), flatten_images(b)
    rows = _block_rows(fa.shape[1])
    for i0 in range(0, len(fa), rows):
        A = fa[i0 : i0 + rows].astype(np.float64)
        na = np.einsum("ij,ij->i", A, A)
        for j0 in range(0, len(fb), rows):
            B = fb[j0 : j0 + rows].astype(np.float64)
            nb = np.einsum("ij,ij->i", B, B)
            yield i0, j0, np.maximum(na[:, None] + nb[None, :] - 2.0 * (A @ B.T), 0.0)


def nearest_images(a: np.ndarray, b: np.ndarray, *, exclude_self: bool = False, bar=None) -> Tuple[np.ndarray, np.ndarray]:
    """For each row of ``a``: index of the nearest row of ``b`` and the sum of squared
    differences to it (int64). ``exclude_self`` (``a is b``) skips the pair (i, i)."""
    best = np.full(len(a), np.inf)
    idx = np.zeros(len(a), np.int64)
    last_i0 = -1
    for i0, j0, g in gram_blocks(a, b):
        if exclude_self:
            for r in range(g.shape[0]):
                c = i0 + r - j0
                if 0 <= c < g.shape[1]:
                    g[r, c] = np.inf
        k = np.argmin(g, axis=1)
        v = g[np.arange(len(k)), k]
        sl = slice(i0, i0 + len(k))
        better = v < best[sl]
        best[sl] = np.where(better, v, best[sl])
        idx[sl] = np.where(better, k + j0, idx[sl])
        if bar is not None and i0 != last_i0:
            bar.update(g.shape[0])
            last_i0 = i0
    return idx, best.astype(np.int64)


def _pair(x, y, name: str) -> Tuple[np.ndarray, np.ndarray, bool]:
    """``(x, y, single)``: both as uint8 N×H×W×C; ``single`` when one pair was given."""
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype != np.uint8 or y.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 images, got {x.dtype} and {y.dtype}")
    if x.shape != y.shape:
        raise ValueError(f"{name}: images differ in shape, {x.shape} vs {y.shape}; bring them to one size first (common_representation)")
    if x.ndim == 2:
        return x[None, :, :, None], y[None, :, :, None], True
    if x.ndim == 3:
        return x[None], y[None], True
    if x.ndim != 4:
        raise ValueError(f"{name}: expected H×W(×C) or N×H×W×C images, got shape {x.shape}")
    return x, y, False


def _ssd(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    diff = x.astype(np.int32) - y.astype(np.int32)
    return np.einsum("nhwc,nhwc->n", diff, diff, dtype=np.int64)


def pixel_distance(x, y) -> Union[float, np.ndarray]:
    """Pixel distance ``sqrt(mean((x − y)²)) / 255`` of uint8 images of equal shape.

    Args:
        x, y: uint8 arrays H×W(×C) (one pair) or N×H×W×C (N pairs).

    Returns:
        a float (one pair) or float64 array (N,), in [0, 1].
    """
    x, y, single = _pair(x, y, "pixel_distance")
    out = ssd_to_distance(_ssd(x, y), x[0].size)
    return float(out[0]) if single else out


def psnr(x, y) -> Union[float, np.ndarray]:
    """Peak signal-to-noise ratio in dB, ``10·log10(255² / MSE)``, of uint8 images.

    Args:
        x, y: uint8 arrays H×W(×C) (one pair) or N×H×W×C (N pairs), of equal shape.

    Returns:
        a float (one pair) or float64 array (N,); ``inf`` where the images are identical.
    """
    x, y, single = _pair(x, y, "psnr")
    out = psnr_from_ssd(_ssd(x, y), x[0].size)
    return float(out[0]) if single else out


def psnr_from_ssd(ssd: np.ndarray, dim: int) -> np.ndarray:
    ssd = np.asarray(ssd, np.float64)
    with np.errstate(divide="ignore"):
        return np.where(ssd > 0, 10.0 * np.log10(255.0**2 * dim / np.maximum(ssd, 1.0)), np.inf)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()


def ssim(x, y) -> Union[float, np.ndarray]:
    """Structural similarity (Wang et al. 2004) of uint8 images; settings in :data:`SSIM_SETTINGS`.

    Args:
        x, y: uint8 arrays H×W(×C) (one pair) or N×H×W×C (N pairs), of equal shape, with
            H, W ≥ 11.

    Returns:
        a float (one pair) or float64 array (N,) in [−1, 1]; exactly 1.0 for identical images.
    """
    from scipy.ndimage import correlate1d

    x, y, single = _pair(x, y, "ssim")
    n, h, w, c = x.shape
    size = SSIM_SETTINGS["window_size"]
    if h < size or w < size:
        raise ValueError(f"ssim: images are {h}×{w}; SSIM's {size}×{size} window needs at least {size}×{size} pixels")
    win = _gaussian_window(size, SSIM_SETTINGS["sigma"])
    r = size // 2
    c1 = (SSIM_SETTINGS["k1"] * 255.0) ** 2
    c2 = (SSIM_SETTINGS["k2"] * 255.0) ** 2

    def filt(z: np.ndarray) -> np.ndarray:
        z = correlate1d(z, win, axis=1, mode="reflect")
        z = correlate1d(z, win, axis=2, mode="reflect")
        return z[:, r : h - r, r : w - r, :]  # the valid region: no value there touched a padded pixel

    out = np.empty(n)
    step = max(1, (1 << 20) // (h * w * c))  # ~1M values per float64 temporary
    for s in range(0, n, step):
        a = x[s : s + step].astype(np.float64)
        b = y[s : s + step].astype(np.float64)
        mu_a, mu_b = filt(a), filt(b)
        saa = filt(a * a) - mu_a * mu_a
        sbb = filt(b * b) - mu_b * mu_b
        sab = filt(a * b) - mu_a * mu_b
        num = (2.0 * mu_a * mu_b + c1) * (2.0 * sab + c2)
        den = (mu_a * mu_a + mu_b * mu_b + c1) * (saa + sbb + c2)
        out[s : s + step] = (num / den).mean(axis=(1, 2, 3))
    return float(out[0]) if single else out

