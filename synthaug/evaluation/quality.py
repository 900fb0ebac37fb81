"""Image quality, memorization and diversity of a synthetic set against real rare-class images.

:func:`image_quality_report` compares every synthetic image with the real images and returns one
JSON-ready dict; :func:`write_quality_report` writes it as ``quality.json`` with the histograms
(``quality_histograms.png``) and the closest synthetic/reference pairs (``nearest_pairs.png``).
``synthaug quality`` is the command-line front end.

Definitions (every number in the report follows them):

* **Common representation.** Both sets are brought to one size and channel count before any
  comparison. The size is the most common H×W among the real images (ties: the first seen); the
  channel count is 3 if any real image is RGB, else 1. An image of another size is resized with
  PIL's bilinear filter (antialiased when shrinking; the aspect ratio follows the target, nothing is
  cropped). Gray becomes RGB by replicating the channel; RGB becomes gray by PIL's ITU-R 601-2 luma
  (``L = 0.299 R + 0.587 G + 0.114 B``). The report counts the images changed.
* **Pixel distance** ``d(a, b) = sqrt(mean((a - b)²)) / 255`` over all H·W·C values of two uint8
  images in the common representation: the root-mean-square difference in units of the full
  range, 0 for identical images, 1 for black against white. It is computed from exact integer sums
  of squared differences, so identical images are at exactly 0.
* **Nearest real image** of a synthetic image: the real image at the smallest pixel distance (the
  first one on ties). PSNR, SSIM and LPIPS are all measured against this one image, so the three
  scores and ``nearest_pairs.png`` describe the same pair.
* **PSNR** ``= 10·log10(255² / MSE)`` on uint8 values (``= −20·log10(d)``). An identical pair has
  PSNR = +inf: the Python report keeps ``float("inf")``, ``quality.json`` writes ``null``, the
  summaries are taken over the finite values and ``n_infinite`` counts the identical pairs.
* **SSIM**: Wang, Bovik, Sheikh & Simoncelli (2004): an 11×11 Gaussian window with σ = 1.5
  (normalized to sum 1), K1 = 0.01, K2 = 0.03, L = 255, weighted (biased) local variances, the SSIM
  map over the *valid* region only (no padding: an H×W image gives an (H−10)×(W−10) map), averaged
  over the map and over channels (RGB: each channel on its own, then the mean), as in the
  authors' MATLAB code. The local SSIM values equal ``torchmetrics``'
  ``structural_similarity_index_measure`` map (Gaussian kernel); torchmetrics 1.9 averages that
  map over the whole reflect-padded image instead of the valid region, which on 28×28 images
  differs by ~1e-3.
* **LPIPS** (Zhang et al. 2018, ``lpips`` package, AlexNet trunk, v0.1 linear layers) between a
  synthetic image and its nearest real image (by pixel distance, as above). Inputs are RGB in
  [−1, 1] (gray replicated); images with a side below 64 px are enlarged bilinearly so the short
  side is 64, because AlexNet's pooling leaves no spatial extent below ~32 px. It needs
  torchvision's ImageNet AlexNet weights (``alexnet-owt-7be5be79.pth``); they are looked for in
  ``torch.hub.get_dir()/checkpoints/`` or taken from an explicit path, and never downloaded: where
  they are absent the report says so and gives every other metric.
* **Memorization.** The threshold τ is the smallest pixel distance between two *distinct* real
  images (distinct = different pixels in the common representation; exact duplicates are dropped
  first). A synthetic image is *memorized* when its distance to the nearest **reference** image is
  strictly below τ (``d < τ``): it is closer to a reference image than any two different real
  images are to each other. The reference is the adapter's training images when they are known,
  else the real set (``"memorization_reference": "real"``). The rate is the share memorized.
* **Diversity**: the mean pixel distance over pairs of distinct indices (i < j) within a set, for
  the synthetic and the real set, and their ratio (synthetic / real). All pairs are used when there
  are at most ``max_pairs`` of them; otherwise ``max_pairs`` pairs (i ≠ j) are drawn uniformly with
  replacement by ``numpy.random.default_rng([seed, k])`` (k = 0 synthetic, 1 real).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from synthaug.version import __version__

__all__ = [
    "ALEXNET_WEIGHTS_FILE",
    "SSIM_SETTINGS",
    "common_representation",
    "find_lpips_backbone",
    "image_quality_report",
    "load_cache_images",
    "lpips_status",
    "pixel_distance",
    "plot_nearest_pairs",
    "plot_quality_histograms",
    "psnr",
    "ssim",
    "train_images_from_adapter",
    "write_quality_report",
]

#: torchvision's file name of the ImageNet AlexNet weights LPIPS(net="alex") uses
ALEXNET_WEIGHTS_FILE = "alexnet-owt-7be5be79.pth"
_ALEXNET_URL = "https://download.pytorch.org/models/" + ALEXNET_WEIGHTS_FILE
#: the SSIM constants used (Wang et al. 2004)
SSIM_SETTINGS = {"window": "gaussian", "window_size": 11, "sigma": 1.5, "k1": 0.01, "k2": 0.03, "data_range": 255, "region": "valid", "channels": "per channel, averaged"}
LPIPS_MIN_SIDE = 64
_BLOCK_BYTES = 64 << 20  # float64 bytes per block of images in the distance computations
_MAX_BLOCK_ROWS = 2048

ImageSet = Union[np.ndarray, Sequence[Any]]


# ---------------------------------------------------------------------------------- inputs
def _as_image_list(images: ImageSet, name: str) -> List[np.ndarray]:
    """uint8 H×W×C arrays (C = 1 or 3) from an N×H×W(×C) array or a sequence of images."""
    from synthaug.imaging import to_hwc_uint8

    if isinstance(images, np.ndarray):
        if images.ndim not in (3, 4):
            raise ValueError(f"{name}: expected a uint8 array N×H×W×C or N×H×W, got shape {images.shape}")
        images = list(images)
    out = []
    for i, im in enumerate(images):
        try:
            arr = to_hwc_uint8(im)
        except ValueError as exc:
            raise ValueError(f"{name}[{i}]: {exc}; convert the images to uint8 (0..255) first") from None
        if arr.ndim != 3 or arr.shape[2] not in (1, 3):
            raise ValueError(f"{name}[{i}] has shape {arr.shape}; expected H×W, H×W×1 or H×W×3 (convert RGBA/other modes to RGB)")
        out.append(arr)
    if not out:
        raise ValueError(f"{name}: no images given; pass at least one uint8 H×W×C image")
    return out


def _common_target(real: List[np.ndarray]) -> Tuple[int, int, int]:
    sizes = Counter(im.shape[:2] for im in real)
    top = max(sizes.values())
    size = next(im.shape[:2] for im in real if sizes[im.shape[:2]] == top)  # first seen among the most common
    channels = 3 if any(im.shape[2] == 3 for im in real) else 1
    return int(size[0]), int(size[1]), channels


def common_representation(images: ImageSet, *, height: int, width: int, channels: int) -> Tuple[np.ndarray, Dict[str, int]]:
    """Bring uint8 images to one ``height``×``width``×``channels`` (rule in the module doc).

    Args:
        images: uint8 N×H×W(×C) array or a sequence of H×W(×C) images (C = 1 or 3).
        height, width: target size in pixels; channels: 1 or 3.

    Returns:
        ``(array N×height×width×channels uint8, {"resized": k, "channels_converted": m})``.
    """
    from PIL import Image

    if channels not in (1, 3) or height < 1 or width < 1:
        raise ValueError(f"common_representation: need height, width >= 1 and channels 1 or 3, got {height}×{width}×{channels}")
    images = _as_image_list(images, "images")
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
def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1)


def _block_rows(dim: int) -> int:
    return int(max(1, min(_MAX_BLOCK_ROWS, _BLOCK_BYTES // (8 * dim))))


def _to_distance(ssd, dim: int):
    """Pixel distance from sums of squared uint8 differences over ``dim`` values."""
    return np.sqrt(np.asarray(ssd, np.float64) / (dim * 255.0**2))


def _gram_blocks(a: np.ndarray, b: np.ndarray):
    """Yield ``(i0, j0, ssd_block)`` with the exact sums of squared differences of rows of ``a``
    and ``b`` (uint8, flattened). The float64 arithmetic is exact: every operand and partial sum
    is an integer below 2**53."""
    fa, fb = _flat(a), _flat(b)
    rows = _block_rows(fa.shape[1])
    for i0 in range(0, len(fa), rows):
        A = fa[i0 : i0 + rows].astype(np.float64)
        na = np.einsum("ij,ij->i", A, A)
        for j0 in range(0, len(fb), rows):
            B = fb[j0 : j0 + rows].astype(np.float64)
            nb = np.einsum("ij,ij->i", B, B)
            yield i0, j0, np.maximum(na[:, None] + nb[None, :] - 2.0 * (A @ B.T), 0.0)


def _nearest(a: np.ndarray, b: np.ndarray, *, exclude_self: bool = False, bar=None) -> Tuple[np.ndarray, np.ndarray]:
    """For each row of ``a``: index of the nearest row of ``b`` and the sum of squared
    differences to it (int64). ``exclude_self`` (``a is b``) skips the pair (i, i)."""
    best = np.full(len(a), np.inf)
    idx = np.zeros(len(a), np.int64)
    last_i0 = -1
    for i0, j0, g in _gram_blocks(a, b):
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
    out = _to_distance(_ssd(x, y), x[0].size)
    return float(out[0]) if single else out


def psnr(x, y) -> Union[float, np.ndarray]:
    """Peak signal-to-noise ratio in dB, ``10·log10(255² / MSE)``, of uint8 images.

    Args:
        x, y: uint8 arrays H×W(×C) (one pair) or N×H×W×C (N pairs), of equal shape.

    Returns:
        a float (one pair) or float64 array (N,); ``inf`` where the images are identical.
    """
    x, y, single = _pair(x, y, "psnr")
    out = _psnr_from_ssd(_ssd(x, y), x[0].size)
    return float(out[0]) if single else out


def _psnr_from_ssd(ssd: np.ndarray, dim: int) -> np.ndarray:
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


# ---------------------------------------------------------------------------------- LPIPS
def find_lpips_backbone(path: Optional[Union[str, os.PathLike]] = None) -> Optional[Path]:
    """The AlexNet ImageNet weights file LPIPS needs, without downloading anything.

    Args:
        path: an explicit weights file (a torchvision ``alexnet`` state dict); must exist.

    Returns:
        ``path``, else ``torch.hub.get_dir()/checkpoints/alexnet-owt-*.pth`` when present, else
        ``None``.

    Raises:
        FileNotFoundError: ``path`` was given and is not a file.
    """
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"LPIPS backbone weights {p} do not exist; give torchvision's {ALEXNET_WEIGHTS_FILE}")
        return p
    import torch

    found = sorted((Path(torch.hub.get_dir()) / "checkpoints").glob("alexnet-owt-*.pth"))
    return found[0] if found else None


def _lpips_missing_reason() -> str:
    import torch

    where = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"torchvision's ImageNet AlexNet weights ({ALEXNET_WEIGHTS_FILE}) are not in {where} and no "
        f"backbone file was given. On a machine with internet run `python -c \"import torchvision; "
        f"torchvision.models.alexnet(weights='IMAGENET1K_V1')\"` (or download {_ALEXNET_URL}), then "
        f"copy the file to {where} or pass it with --lpips-backbone PATH (lpips_backbone=PATH)"
    )


def lpips_status(backbone: Optional[Union[str, os.PathLike]] = None) -> Tuple[Optional[Path], Optional[str]]:
    """Whether LPIPS can be computed here, without downloading anything.

    Args:
        backbone: explicit AlexNet weights file (see :func:`find_lpips_backbone`).

    Returns:
        ``(weights path, None)`` when it can, ``(None, reason)`` when not; the reason says how to
        get the weights.
    """
    try:
        import lpips  # noqa: F401
    except ImportError:
        return None, "the lpips package is not installed (pip install lpips)"
    found = find_lpips_backbone(backbone)
    return (found, None) if found is not None else (None, _lpips_missing_reason())


def _build_lpips(backbone: Path):
    """``lpips.LPIPS(net="alex")`` with its trunk loaded from ``backbone`` (no download): the
    model is built with a random trunk (``pnet_rand=True``, which only skips torchvision's
    download), then the trunk's five conv layers get the file's ``features.*`` weights, strictly."""
    import lpips
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation notice for lpips' `pretrained=` call
        model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    try:
        state = torch.load(backbone, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
        raise ValueError(f"LPIPS backbone {backbone} cannot be read as a torch state dict ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    trunk = {}
    for key in model.net.state_dict():
        src = "features." + key.split(".", 1)[1]  # slice<k>.<i>.weight -> features.<i>.weight
        if src not in state:
            raise ValueError(f"LPIPS backbone {backbone} lacks {src}; it must be torchvision's alexnet state dict ({ALEXNET_WEIGHTS_FILE})")
        trunk[key] = state[src]
    try:
        model.net.load_state_dict(trunk, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"LPIPS backbone {backbone} does not fit AlexNet: {exc}") from None
    return model.eval()


def _lpips_scores(a: np.ndarray, b: np.ndarray, backbone: Path, *, progress: bool, batch: int = 32) -> np.ndarray:
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    model = _build_lpips(backbone)

    def prep(z: np.ndarray) -> "torch.Tensor":
        t = torch.from_numpy(np.ascontiguousarray(z)).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
        if t.shape[1] == 1:
            t = t.repeat(1, 3, 1, 1)
        h, w = t.shape[2:]
        if min(h, w) < LPIPS_MIN_SIDE:
            s = LPIPS_MIN_SIDE / min(h, w)
            t = F.interpolate(t, size=(max(LPIPS_MIN_SIDE, round(h * s)), max(LPIPS_MIN_SIDE, round(w * s))), mode="bilinear", align_corners=False)
        return t

    out = np.empty(len(a))
    with torch.no_grad():
        for s in tqdm(range(0, len(a), batch), desc="LPIPS", unit="batch", disable=not progress, dynamic_ncols=True):
            out[s : s + batch] = model(prep(a[s : s + batch]), prep(b[s : s + batch])).flatten().double().numpy()
    return out


# ---------------------------------------------------------------------------------- summaries
def _summary(values) -> Dict[str, Any]:
    """n, mean, std, min, percentiles and max of the finite values (``n_infinite`` counts ±inf)."""
    v = np.asarray(values, np.float64)
    finite = v[np.isfinite(v)]
    out: Dict[str, Any] = {"n": int(v.size), "n_finite": int(finite.size), "n_infinite": int(np.isinf(v).sum())}
    keys = ("mean", "std", "min", "p5", "p25", "median", "p75", "p95", "max")
    if finite.size == 0:
        out.update({k: None for k in keys})
        return out
    p = np.percentile(finite, [5, 25, 50, 75, 95])
    out.update(
        mean=float(finite.mean()), std=float(finite.std()), min=float(finite.min()),
        p5=float(p[0]), p25=float(p[1]), median=float(p[2]), p75=float(p[3]), p95=float(p[4]), max=float(finite.max()),
    )
    return out


def _distinct(x: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct image (by pixel hash)."""
    seen: Dict[bytes, int] = {}
    keep = []
    for i in range(len(x)):
        h = hashlib.sha256(x[i].tobytes()).digest()
        if h not in seen:
            seen[h] = i
            keep.append(i)
    return np.asarray(keep, np.int64)


def _diversity(x: np.ndarray, *, max_pairs: int, rng_key: List[int], bar=None) -> Dict[str, Any]:
    n = len(x)
    total = n * (n - 1) // 2
    dim = _flat(x[:1]).shape[1]
    if n < 2:
        return {"mean": None, "std": None, "n_images": n, "n_pairs": 0, "all_pairs": True, "note": "fewer than two images"}
    if total <= max_pairs:
        s = s2 = 0.0
        for i0, j0, g in _gram_blocks(x, x):
            if j0 + g.shape[1] <= i0:
                continue
            rows = np.arange(i0, i0 + g.shape[0])[:, None]
            cols = np.arange(j0, j0 + g.shape[1])[None, :]
            d = _to_distance(g[cols > rows], dim)
            s += float(d.sum())
            s2 += float((d * d).sum())
            if bar is not None:
                bar.update(int((cols > rows).sum()))
        mean = s / total
        return {"mean": mean, "std": math.sqrt(max(0.0, s2 / total - mean * mean)), "n_images": n, "n_pairs": total, "all_pairs": True}
    rng = np.random.default_rng(rng_key)
    i = rng.integers(0, n, max_pairs)
    j = rng.integers(0, n - 1, max_pairs)
    j = j + (j >= i)  # uniform over j != i
    fx = _flat(x)
    d = np.empty(max_pairs)
    step = max(1, (32 << 20) // (4 * dim))
    for s in range(0, max_pairs, step):
        diff = fx[i[s : s + step]].astype(np.int32) - fx[j[s : s + step]].astype(np.int32)
        d[s : s + step] = _to_distance(np.einsum("nd,nd->n", diff, diff, dtype=np.int64), dim)
        if bar is not None:
            bar.update(len(diff))
    return {"mean": float(d.mean()), "std": float(d.std()), "n_images": n, "n_pairs": int(max_pairs), "all_pairs": False, "pairs_available": total}


def _versions(with_lpips: bool) -> Dict[str, Optional[str]]:
    from importlib import metadata

    out: Dict[str, Optional[str]] = {"synthaug": __version__, "python": sys.version.split()[0]}
    for pkg in ("numpy", "scipy", "pillow") + (("torch", "torchvision", "lpips") if with_lpips else ()):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


# ---------------------------------------------------------------------------------- the report
def image_quality_report(
    synthetic: ImageSet,
    real: ImageSet,
    *,
    train_images: Optional[ImageSet] = None,
    lpips: Union[str, bool] = "auto",
    lpips_backbone: Optional[Union[str, os.PathLike]] = None,
    threshold: Optional[float] = None,
    max_pairs: int = 20_000,
    seed: int = 0,
    progress: bool = False,
) -> Dict[str, Any]:
    """Quality, memorization and diversity of ``synthetic`` against ``real`` (definitions in the
    module docstring).

    Args:
        synthetic: the synthetic images: a uint8 array N×H×W×C or N×H×W, or a sequence of uint8
            H×W(×C) arrays / PIL images / C×H×W tensors (C = 1 or 3).
        real: the real rare-class images, same forms; they set the common size and channels
            and the memorization threshold τ.
        train_images: the adapter's training images (the memorization reference), same forms;
            ``None``: the real set is the reference and the report says so.
        lpips: ``"auto"`` (compute LPIPS when the AlexNet weights are found, else report why
            not), ``True`` (required: missing weights raise), ``False`` (skip).
        lpips_backbone: explicit path of torchvision's ``alexnet-owt-7be5be79.pth``; default:
            looked for in ``torch.hub.get_dir()/checkpoints/``.
        threshold: use this τ (pixel-distance units, in (0, 1]) instead of the closest distinct
            real pair; needed when the real set holds fewer than two distinct images.
        max_pairs: diversity uses all pairs up to this many, else this many sampled pairs
            (cost ∝ max_pairs × pixels per image; 20,000 pairs put the mean within ~0.001).
        seed: seed of the diversity pair sample.
        progress: show tqdm progress bars.

    Returns:
        A JSON-ready dict: ``settings``, ``inputs`` (counts and conversions), ``psnr``, ``ssim``,
        ``lpips`` (``{"available": False, "reason": ...}`` when not computed), ``nearest_real``,
        ``memorization_reference`` (``"train"`` or ``"real"``), ``memorization``, ``diversity``,
        ``real_nearest_neighbour``, ``versions``. Per-image lists follow the order of
        ``synthetic``; PSNR of identical pairs is ``float("inf")`` (``null`` in JSON).

    Raises:
        ValueError: empty or malformed inputs, images below 11×11, fewer than two distinct real
            images without ``threshold``, a bad ``lpips``/``threshold``/``max_pairs`` value, or
            ``lpips=True`` without the weights.
    """
    from tqdm.auto import tqdm

    if lpips not in ("auto", True, False):
        raise ValueError(f"lpips must be 'auto', True or False, got {lpips!r}")
    if threshold is not None and not (0.0 < float(threshold) <= 1.0):
        raise ValueError(f"threshold must be a pixel distance in (0, 1], got {threshold}")
    if int(max_pairs) < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    syn_list = _as_image_list(synthetic, "synthetic")
    real_list = _as_image_list(real, "real")
    train_list = _as_image_list(train_images, "train_images") if train_images is not None else None

    # LPIPS availability is settled first, so a required-but-missing backbone fails before the work.
    backbone: Optional[Path] = None
    lpips_reason: Optional[str] = None
    if lpips is False:
        lpips_reason = "disabled (lpips=False / --lpips off)"
    else:
        backbone, lpips_reason = lpips_status(lpips_backbone)
        if lpips is True and lpips_reason is not None:
            raise ValueError(f"LPIPS was required but cannot be computed: {lpips_reason}")

    h, w, c = _common_target(real_list)
    if h < 11 or w < 11:
        raise ValueError(f"real images are {h}×{w}; SSIM needs at least 11×11 pixels")
    R, real_conv = common_representation(real_list, height=h, width=w, channels=c)
    S, syn_conv = common_representation(syn_list, height=h, width=w, channels=c)
    T, train_conv = common_representation(train_list, height=h, width=w, channels=c) if train_list is not None else (None, None)
    dim = h * w * c

    def bar(total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True, leave=False)

    # nearest real image of each synthetic image (pixel distance)
    with bar(len(S), "nearest real") as b:
        near_idx, near_ssd = _nearest(S, R, bar=b)
    near_d = _to_distance(near_ssd, dim)
    psnr_vals = _psnr_from_ssd(near_ssd, dim)
    ssim_vals = np.empty(len(S))
    step = 256
    with bar(len(S), "SSIM") as b:
        for s in range(0, len(S), step):
            ssim_vals[s : s + step] = ssim(S[s : s + step], R[near_idx[s : s + step]])
            b.update(min(step, len(S) - s))

    # τ: closest pair of distinct real images; each real image's nearest distinct neighbour
    uniq = _distinct(R)
    real_nn: Dict[str, Any]
    if len(uniq) >= 2:
        with bar(len(uniq), "real-real") as b:
            nn_idx, nn_ssd = _nearest(R[uniq], R[uniq], exclude_self=True, bar=b)
        nn_d = _to_distance(nn_ssd, dim)
        k = int(np.argmin(nn_ssd))
        tau_closest = float(nn_d[k])
        tau_pair = [int(uniq[k]), int(uniq[nn_idx[k]])]
        real_nn = {"distance": nn_d.tolist(), "index": uniq.tolist(), "neighbour": uniq[nn_idx].tolist(), "summary": _summary(nn_d)}
    else:
        tau_closest, tau_pair = None, None
        real_nn = {"distance": [], "index": uniq.tolist(), "neighbour": [], "summary": _summary([]), "note": "fewer than two distinct real images"}
    if threshold is not None:
        tau, tau_source = float(threshold), "given"
    elif tau_closest is not None:
        tau, tau_source = tau_closest, "closest pair of distinct real images"
    else:
        raise ValueError(
            f"real: the {len(R)} real image(s) hold fewer than two distinct images, so the memorization "
            "threshold (closest distinct real pair) is undefined; give more real images or pass threshold= (--threshold)"
        )

    # memorization against the training images (or the real set)
    if T is not None:
        with bar(len(S), "nearest train") as b:
            ref_idx, ref_ssd = _nearest(S, T, bar=b)
        reference = "train"
    else:
        ref_idx, ref_ssd = near_idx, near_ssd
        reference = "real"
    ref_d = _to_distance(ref_ssd, dim)
    memorized = ref_d < tau

    # diversity
    with tqdm(total=None, desc="diversity", unit="pair", disable=not progress, dynamic_ncols=True, leave=False) as b:
        div_syn = _diversity(S, max_pairs=int(max_pairs), rng_key=[int(seed), 0], bar=b)
        div_real = _diversity(R, max_pairs=int(max_pairs), rng_key=[int(seed), 1], bar=b)
    ratio = div_syn["mean"] / div_real["mean"] if div_syn["mean"] is not None and div_real["mean"] else None

    # LPIPS
    lpips_block: Dict[str, Any]
    if backbone is not None:
        vals = _lpips_scores(S, R[near_idx], backbone, progress=progress)
        lpips_block = {
            "available": True,
            "net": "alex",
            "version": "0.1",
            "backbone": str(backbone),
            "against": "nearest real image by pixel distance",
            "input_min_side": LPIPS_MIN_SIDE,
            "summary": _summary(vals),
            "per_image": vals.tolist(),
        }
    else:
        lpips_block = {"available": False, "reason": lpips_reason}

    return {
        "settings": {
            "common_size": [h, w],
            "channels": c,
            "size_rule": "most common real H×W; others resized with PIL bilinear (antialiased when shrinking), never cropped",
            "channel_rule": "3 if any real image is RGB else 1; gray->RGB by replication, RGB->gray by ITU-R 601-2 luma",
            "distance": "pixel RMS: sqrt(mean((a-b)^2))/255 over H·W·C of the common-size uint8 images (0 identical, 1 black vs white)",
            "nearest": "smallest pixel distance (first on ties)",
            "psnr": "10·log10(255²/MSE) against the nearest real image; identical pairs: +inf (null in JSON), summaries over finite values",
            "ssim": dict(SSIM_SETTINGS),
            "memorization_rule": "memorized if distance to the nearest reference image < tau (strict)",
            "max_pairs": int(max_pairs),
            "seed": int(seed),
        },
        "inputs": {
            "synthetic": {"n": len(S), **syn_conv},
            "real": {"n": len(R), "distinct": int(len(uniq)), **real_conv},
            "train": {"n": len(T), **train_conv} if T is not None else None,
        },
        "psnr": {"unit": "dB", "summary": _summary(psnr_vals), "per_image": psnr_vals.tolist()},
        "ssim": {"summary": _summary(ssim_vals), "per_image": ssim_vals.tolist()},
        "lpips": lpips_block,
        "nearest_real": {"index": near_idx.tolist(), "distance": near_d.tolist(), "n_identical": int((near_ssd == 0).sum())},
        "memorization_reference": reference,
        "memorization": {
            "reference": reference,
            "reference_size": int(len(T) if T is not None else len(R)),
            "threshold": tau,
            "threshold_source": tau_source,
            "closest_distinct_real_pair": tau_pair,
            "closest_distinct_real_distance": tau_closest,
            "rate": float(memorized.mean()),
            "n_memorized": int(memorized.sum()),
            "n": int(len(S)),
            "nearest_index": ref_idx.tolist(),
            "nearest_distance": ref_d.tolist(),
            "distance_summary": _summary(ref_d),
        },
        "diversity": {"synthetic": div_syn, "real": div_real, "ratio": ratio},
        "real_nearest_neighbour": real_nn,
        "versions": _versions(backbone is not None),
    }


# ---------------------------------------------------------------------------------- loading
def load_cache_images(
    path: Union[str, os.PathLike],
    *,
    label: Optional[int] = None,
    limit: int = 0,
    seed: int = 0,
    progress: bool = False,
) -> Tuple[List[np.ndarray], Dict[str, Any]]:
    """Read synthetic images from a :class:`~synthaug.cache.store.SyntheticCache`.

    Args:
        path: the cache directory.
        label: keep records with this label (multi-label records: those that hold it); ``None``:
            all records.
        limit: keep at most this many, drawn without replacement by
            ``numpy.random.default_rng(seed)`` and read in ascending seq order; 0: all.
        seed: seed of that draw.
        progress: show a tqdm bar while reading.

    Returns:
        ``(images, info)``: uint8 H×W×C arrays, and ``{"path", "records", "label", "limit",
        "seed", "selected", "seqs", "label_names"}`` (``seqs`` in the order of ``images``).

    Raises:
        FileNotFoundError: no cache at ``path``.
        ValueError: the cache is empty, ``label`` selects nothing, or ``limit`` is negative.
    """
    from tqdm.auto import tqdm

    from synthaug.cache.store import SyntheticCache

    if int(limit) < 0:
        raise ValueError(f"limit must be >= 0 (0: all records), got {limit}")
    cache = SyntheticCache(path, readonly=True)
    try:
        labels = cache.labels()
        if not labels:
            raise ValueError(f"cache {path} holds no records; fill it with `synthaug generate` first")
        if label is None:
            seqs = sorted(labels)
        else:
            seqs = sorted(s for s, lab in labels.items() if (label in lab if isinstance(lab, tuple) else lab == label))
            if not seqs:
                present = Counter(l for lab in labels.values() for l in (lab if isinstance(lab, tuple) else (lab,)))
                shown = ", ".join(f"{k} (×{v})" for k, v in sorted(present.items())[:10])
                raise ValueError(f"label {label} selects no record of cache {path}; labels present: {shown}")
        if limit and len(seqs) > limit:
            seqs = sorted(np.random.default_rng(int(seed)).choice(seqs, int(limit), replace=False).tolist())
        images: List[np.ndarray] = []
        with tqdm(total=len(seqs), desc="read cache", unit="img", disable=not progress, dynamic_ncols=True, leave=False) as bar:
            for s in range(0, len(seqs), 256):
                images.extend(r.image for r in cache.get_many(seqs[s : s + 256]))
                bar.update(min(256, len(seqs) - s))
        info = {
            "path": str(path),
            "records": len(labels),
            "label": label,
            "limit": int(limit),
            "seed": int(seed),
            "selected": len(seqs),
            "seqs": [int(s) for s in seqs],
            "label_names": cache.label_names,
        }
    finally:
        cache.close()
    return images, info


def train_images_from_adapter(adapter_dir: Union[str, os.PathLike], real: Sequence[np.ndarray]) -> Tuple[List[int], Dict[str, Any]]:
    """Which of the ``real`` images an adapter was trained on, by the pixel hashes its
    ``synthaug.json`` lists (``train_images[*].sha256``, :func:`synthaug.adapter.image_sha256`).

    Args:
        adapter_dir: a ``synthaug finetune`` output folder.
        real: uint8 H×W(×C) images as loaded (hashes are taken before any resizing).

    Returns:
        ``(indices into real, info)`` with ``info = {"adapter", "listed", "matched",
        "unmatched_files"}``. Some listed images may be missing from ``real`` (reported).

    Raises:
        FileNotFoundError / ValueError: not an adapter folder, it lists no training images, or
            none of them is among ``real``.
    """
    from synthaug.adapter import image_sha256, read_adapter_config

    cfg = read_adapter_config(adapter_dir, require_weights=False)
    listed = [r for r in cfg.get("train_images") or [] if isinstance(r, dict) and r.get("sha256")]
    if not listed:
        raise ValueError(f"adapter {adapter_dir} lists no train_images hashes in synthaug.json; pass the training folder with --train-images DIR")
    wanted = {r["sha256"] for r in listed}
    hashes = [image_sha256(im) for im in real]
    matched = [i for i, h in enumerate(hashes) if h in wanted]
    found = {hashes[i] for i in matched}
    unmatched = [r.get("file", r["sha256"][:12]) for r in listed if r["sha256"] not in found]
    if not matched:
        raise ValueError(
            f"none of the {len(listed)} training images listed by adapter {adapter_dir} is among the {len(real)} real images "
            "loaded (matched by pixel hash); load the real images the adapter was trained on (--real DIR or the right "
            "--dataset/--split), or give them with --train-images DIR"
        )
    return matched, {"adapter": str(adapter_dir), "listed": len(listed), "matched": len(found), "unmatched_files": unmatched}


# ---------------------------------------------------------------------------------- plots and files
def _figure(nrows: int, ncols: int, size: Tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def plot_quality_histograms(report: Dict[str, Any], path: Union[str, os.PathLike]) -> str:
    """Histograms of the per-image scores of a report (PSNR, SSIM, distance to the nearest
    reference image with τ marked and the real images' own nearest-neighbour distances for
    comparison, and LPIPS when available), written as a PNG. Returns the path."""
    panels = ["psnr", "ssim", "memorization"] + (["lpips"] if report["lpips"].get("available") else [])
    fig, axes = _figure(1, len(panels), (4.2 * len(panels), 3.6))
    n = report["inputs"]["synthetic"]["n"]
    bins = min(50, max(10, int(np.sqrt(n)) * 2))
    for ax, name in zip(axes[0], panels):
        if name == "psnr":
            v = np.asarray(report["psnr"]["per_image"], np.float64)
            finite = v[np.isfinite(v)]
            if finite.size:
                ax.hist(finite, bins=bins, color="tab:blue")
            ax.set_xlabel("PSNR to nearest real (dB)")
            inf = int(np.isinf(v).sum())
            if inf:
                ax.text(0.98, 0.95, f"{inf} identical (PSNR = ∞)\nnot shown", transform=ax.transAxes, ha="right", va="top", fontsize=8, color="tab:red")
        elif name == "ssim":
            ax.hist(report["ssim"]["per_image"], bins=bins, color="tab:green")
            ax.set_xlabel("SSIM to nearest real")
        elif name == "lpips":
            ax.hist(report["lpips"]["per_image"], bins=bins, color="tab:purple")
            ax.set_xlabel("LPIPS to nearest real (AlexNet)")
        else:
            mem = report["memorization"]
            ref = "training image" if mem["reference"] == "train" else "real image"
            d = np.asarray(mem["nearest_distance"])
            nn = np.asarray(report["real_nearest_neighbour"]["distance"])
            hi = max(float(d.max()), float(nn.max()) if nn.size else 0.0, mem["threshold"]) * 1.05 or 1.0
            edges = np.linspace(0.0, hi, bins + 1)
            ax.hist(d, bins=edges, color="tab:orange", label="synthetic → nearest " + ("train" if mem["reference"] == "train" else "real"))
            handles, labels = ax.get_legend_handles_labels()
            if nn.size:
                ax2 = ax.twinx()
                ax2.hist(nn, bins=edges, histtype="step", color="0.3", label="real → nearest other real (right axis)")
                ax2.set_ylabel("real images", fontsize=8, color="0.3")
                ax2.tick_params(labelsize=7, colors="0.3")
                h2, l2 = ax2.get_legend_handles_labels()
                handles, labels = handles + h2, labels + l2
            ax.axvline(mem["threshold"], color="tab:red", ls="--", lw=1.2)
            ax.text(mem["threshold"], 0.97, f" τ={mem['threshold']:.4f}", transform=ax.get_xaxis_transform(), color="tab:red", fontsize=8, va="top")
            ax.set_xlabel(f"pixel distance to nearest {ref}")
            ax.set_title(f"memorized: {mem['rate']:.1%} ({mem['n_memorized']}/{mem['n']})", fontsize=9)
            ax.legend(handles, labels, fontsize=7, loc="upper right")
        ax.set_ylabel("synthetic images")
    if not report["lpips"].get("available"):
        fig.text(0.01, 0.01, "LPIPS not computed: " + (report["lpips"].get("reason") or "")[:140] + "…", fontsize=6, color="0.4")
    fig.suptitle(f"{n} synthetic vs {report['inputs']['real']['n']} real images", fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    fig.savefig(path, dpi=110)
    return str(path)


def _ids(report: Dict[str, Any], which: str, n: int) -> Optional[List[Any]]:
    """Names of the images of one input set, when the report's inputs carry them (cache seqs,
    file names, dataset indices); ``None`` otherwise."""
    inputs = report.get("inputs", {})
    block = inputs.get(which) or {}
    ids = block.get("seqs") if which == "synthetic" else block.get("ids")
    if which == "train" and ids is None and block.get("real_indices") is not None:
        real_ids = (inputs.get("real") or {}).get("ids")
        ids = [real_ids[i] for i in block["real_indices"]] if real_ids else None
    return list(ids) if ids is not None and len(ids) == n else None


def plot_nearest_pairs(
    synthetic: ImageSet,
    reference: ImageSet,
    report: Dict[str, Any],
    path: Union[str, os.PathLike],
    *,
    n: int = 16,
) -> str:
    """The ``n`` synthetic images closest to their memorization reference, each beside that
    reference image (both in the report's common representation), with the distance and a
    "MEMORIZED" mark; a PNG for eyeballing copies. Returns the path.

    Images are named by cache seq / file name / dataset index where the report's ``inputs``
    carry them (as ``synthaug quality`` adds), else by their index in the given set.
    """
    mem = report["memorization"]
    h, w = report["settings"]["common_size"]
    c = report["settings"]["channels"]
    d = np.asarray(mem["nearest_distance"])
    order = np.argsort(d, kind="stable")[: max(1, int(n))]
    ref_all = reference if isinstance(reference, np.ndarray) else list(reference)
    syn = _as_image_list([synthetic[int(i)] for i in order], "synthetic")
    ref = _as_image_list([ref_all[int(mem["nearest_index"][int(i)])] for i in order], "reference")
    S, _ = common_representation(syn, height=h, width=w, channels=c)
    R, _ = common_representation(ref, height=h, width=w, channels=c)
    ref_name = "train" if mem["reference"] == "train" else "real"
    syn_ids = _ids(report, "synthetic", len(synthetic))
    ref_ids = _ids(report, mem["reference"], len(ref_all))
    syn_label = "seq" if syn_ids is not None else "#"
    gap = max(1, w // 8)
    cols = min(4, len(order))
    rows = int(np.ceil(len(order) / cols))
    fig, axes = _figure(rows, cols, (cols * 2.6, rows * 1.75 + 0.5))
    for ax in axes.flat:
        ax.axis("off")
    for k, i in enumerate(order):
        i = int(i)
        j = int(mem["nearest_index"][i])
        pair = np.full((h, 2 * w + gap, c), 255, np.uint8)
        pair[:, :w], pair[:, w + gap :] = S[k], R[k]
        ax = axes.flat[k]
        ax.imshow(pair[:, :, 0] if c == 1 else pair, cmap="gray" if c == 1 else None, vmin=0, vmax=255, interpolation="nearest")
        sname = f"{syn_label} {syn_ids[i] if syn_ids is not None else i}"
        rname = f"{ref_name} {ref_ids[j] if ref_ids is not None else '#' + str(j)}"
        ax.set_title(f"{sname} | {rname}", fontsize=7)
        memorized = d[i] < mem["threshold"]
        ax.text(0.5, -0.04, f"d={d[i]:.4f}" + ("  MEMORIZED" if memorized else ""), transform=ax.transAxes,
                ha="center", va="top", fontsize=7, color="tab:red" if memorized else "0.2")
    fig.suptitle(f"synthetic (left) beside its nearest {ref_name} image (right), closest first; memorized if d < τ = {mem['threshold']:.4f}", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    return str(path)


def _jsonable(value):
    """A copy with numpy scalars as Python numbers and non-finite floats as ``None``."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_quality_report(
    report: Dict[str, Any],
    out: Union[str, os.PathLike],
    *,
    synthetic: ImageSet,
    real: ImageSet,
    train_images: Optional[ImageSet] = None,
    overwrite: bool = False,
) -> Dict[str, str]:
    """Write ``quality.json``, ``quality_histograms.png`` and ``nearest_pairs.png`` into ``out``.

    Args:
        report: what :func:`image_quality_report` returned (extra keys are written too).
        synthetic, real, train_images: the images the report was made from (for the pairs figure).
        overwrite: write into a non-empty folder (the three files are replaced, others kept).

    Returns:
        ``{"json", "histograms", "pairs"}`` → paths written. In the JSON, non-finite numbers
        (PSNR of identical pairs) are ``null``; the file holds no NaN/Infinity tokens.

    Raises:
        FileExistsError: ``out`` is a file, or a non-empty folder without ``overwrite``.
    """
    import json
    from datetime import datetime, timezone

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {out} is not empty; pass --overwrite (overwrite=True) or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / "quality.json"), "histograms": str(out / "quality_histograms.png"), "pairs": str(out / "nearest_pairs.png")}
    plot_quality_histograms(report, paths["histograms"])
    reference = train_images if report["memorization"]["reference"] == "train" else real
    if reference is None:
        raise ValueError("report's memorization reference is the training images, but train_images was not given")
    plot_nearest_pairs(synthetic, reference, report, paths["pairs"])
    doc = {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **report, "outputs": paths}
    tmp = out / "quality.json.tmp"
    tmp.write_text(json.dumps(_jsonable(doc), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, paths["json"])
    return paths
