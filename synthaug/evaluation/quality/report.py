"""The quality report: every synthetic image against the real images (PSNR, SSIM, LPIPS,
memorization, diversity) in one JSON-ready dict, where its images come from (a cache, an
adapter's training images), and the report folder that holds it.

:func:`image_quality_report` computes the report, :func:`write_quality_report` writes
``quality.json`` with its two figures; :func:`load_cache_images` and
:func:`train_images_from_adapter` load the synthetic images and the memorization reference. The
definitions are in :mod:`synthaug.evaluation.quality`.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from synthaug.adapter import image_sha256, read_adapter_config
from synthaug.cache.store import SyntheticCache
from synthaug.environment import package_versions
from synthaug.evaluation.quality.lpips_metric import LPIPS_MIN_SIDE, lpips_scores, lpips_status
from synthaug.evaluation.quality.metrics import (
    SSIM_SETTINGS,
    ImageSet,
    as_image_list,
    common_target,
    flatten_images,
    gram_blocks,
    nearest_images,
    psnr_from_ssd,
    ssd_to_distance,
    common_representation,
    ssim,
)
from synthaug.evaluation.quality.plots import plot_fidelity, plot_nearest_pairs, plot_quality_histograms
from synthaug.outputs import output_dir, write_json
from synthaug.progress import progress_bar
from synthaug.version import __version__

__all__ = ["image_quality_report", "load_cache_images", "train_images_from_adapter", "write_quality_report"]


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
    dim = flatten_images(x[:1]).shape[1]
    if n < 2:
        return {"mean": None, "std": None, "n_images": n, "n_pairs": 0, "all_pairs": True, "note": "fewer than two images"}
    if total <= max_pairs:
        s = s2 = 0.0
        for i0, j0, g in gram_blocks(x, x):
            if j0 + g.shape[1] <= i0:
                continue
            rows = np.arange(i0, i0 + g.shape[0])[:, None]
            cols = np.arange(j0, j0 + g.shape[1])[None, :]
            d = ssd_to_distance(g[cols > rows], dim)
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
    fx = flatten_images(x)
    d = np.empty(max_pairs)
    step = max(1, (32 << 20) // (4 * dim))
    for s in range(0, max_pairs, step):
        diff = fx[i[s : s + step]].astype(np.int32) - fx[j[s : s + step]].astype(np.int32)
        d[s : s + step] = ssd_to_distance(np.einsum("nd,nd->n", diff, diff, dtype=np.int64), dim)
        if bar is not None:
            bar.update(len(diff))
    return {"mean": float(d.mean()), "std": float(d.std()), "n_images": n, "n_pairs": int(max_pairs), "all_pairs": False, "pairs_available": total}


def _versions(with_lpips: bool) -> Dict[str, Optional[str]]:
    """Installed versions (``None``: not installed) of Python and of the libraries the numbers
    depend on; torch, torchvision and lpips only when LPIPS was computed."""
    packages = ("numpy", "scipy", "pillow") + (("torch", "torchvision", "lpips") if with_lpips else ())
    return {"synthaug": __version__, "python": sys.version.split()[0], **package_versions(packages)}


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
    """Quality, memorization and diversity of ``synthetic`` against ``real`` (definitions in
    :mod:`synthaug.evaluation.quality`).

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
    if lpips not in ("auto", True, False):
        raise ValueError(f"lpips must be 'auto', True or False, got {lpips!r}")
    if threshold is not None and not (0.0 < float(threshold) <= 1.0):
        raise ValueError(f"threshold must be a pixel distance in (0, 1], got {threshold}")
    if int(max_pairs) < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    syn_list = as_image_list(synthetic, "synthetic")
    real_list = as_image_list(real, "real")
    train_list = as_image_list(train_images, "train_images") if train_images is not None else None

    # LPIPS availability is settled first, so a required-but-missing backbone fails before the work.
    backbone: Optional[Path] = None
    lpips_reason: Optional[str] = None
    if lpips is False:
        lpips_reason = "disabled (lpips=False / --lpips off)"
    else:
        backbone, lpips_reason = lpips_status(lpips_backbone)
        if lpips is True and lpips_reason is not None:
            raise ValueError(f"LPIPS was required but cannot be computed: {lpips_reason}")

    h, w, c = common_target(real_list)
    if h < 11 or w < 11:
        raise ValueError(f"real images are {h}×{w}; SSIM needs at least 11×11 pixels")
    R, real_conv = common_representation(real_list, height=h, width=w, channels=c)
    S, syn_conv = common_representation(syn_list, height=h, width=w, channels=c)
    T, train_conv = common_representation(train_list, height=h, width=w, channels=c) if train_list is not None else (None, None)
    dim = h * w * c

    def bar(total: int, desc: str):
        return progress_bar(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True, leave=False)

    # nearest real image of each synthetic image (pixel distance)
    with bar(len(S), "nearest real") as b:
        near_idx, near_ssd = nearest_images(S, R, bar=b)
    near_d = ssd_to_distance(near_ssd, dim)
    psnr_vals = psnr_from_ssd(near_ssd, dim)
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
            nn_idx, nn_ssd = nearest_images(R[uniq], R[uniq], exclude_self=True, bar=b)
        nn_d = ssd_to_distance(nn_ssd, dim)
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
            ref_idx, ref_ssd = nearest_images(S, T, bar=b)
        reference = "train"
    else:
        ref_idx, ref_ssd = near_idx, near_ssd
        reference = "real"
    ref_d = ssd_to_distance(ref_ssd, dim)
    memorized = ref_d < tau

    # diversity
    with progress_bar(total=None, desc="diversity", unit="pair", disable=not progress, dynamic_ncols=True, leave=False) as b:
        div_syn = _diversity(S, max_pairs=int(max_pairs), rng_key=[int(seed), 0], bar=b)
        div_real = _diversity(R, max_pairs=int(max_pairs), rng_key=[int(seed), 1], bar=b)
    ratio = div_syn["mean"] / div_real["mean"] if div_syn["mean"] is not None and div_real["mean"] else None

    # LPIPS
    lpips_block: Dict[str, Any]
    if backbone is not None:
        vals = lpips_scores(S, R[near_idx], backbone, progress=progress)
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
        with progress_bar(total=len(seqs), desc="read cache", unit="img", disable=not progress, dynamic_ncols=True, leave=False) as bar:
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


# ---------------------------------------------------------------------------------- the report folder
def write_quality_report(
    report: Dict[str, Any],
    out: Union[str, os.PathLike],
    *,
    synthetic: ImageSet,
    real: ImageSet,
    train_images: Optional[ImageSet] = None,
    overwrite: bool = False,
) -> Dict[str, str]:
    """Write ``quality.json``, ``quality_histograms.png`` and ``nearest_pairs.png`` into ``out``,
    and ``fidelity.png`` when the report has a ``fidelity`` section (:func:`~synthaug.evaluation.quality.fidelity.fidelity_report`).

    Args:
        report: what :func:`image_quality_report` returned (extra keys are written too).
        synthetic, real, train_images: the images the report was made from (for the pairs figure).
        overwrite: write into a non-empty folder (the three files are replaced, others kept).

    Returns:
        ``{"json", "histograms", "pairs"}`` (and ``"fidelity"``) → paths written. In the JSON, non-finite numbers
        (PSNR of identical pairs) are ``null``; the file holds no NaN/Infinity tokens.

    Raises:
        FileExistsError: ``out`` is a file, or a non-empty folder without ``overwrite``.
    """
    out = output_dir(out, overwrite=overwrite, hint="pass --overwrite (overwrite=True) or choose another folder")
    paths = {"json": str(out / "quality.json"), "histograms": str(out / "quality_histograms.png"), "pairs": str(out / "nearest_pairs.png")}
    plot_quality_histograms(report, paths["histograms"])
    reference = train_images if report["memorization"]["reference"] == "train" else real
    if reference is None:
        raise ValueError("report's memorization reference is the training images, but train_images was not given")
    plot_nearest_pairs(synthetic, reference, report, paths["pairs"])
    if "fidelity" in report:
        paths["fidelity"] = str(out / "fidelity.png")
        plot_fidelity(report, paths["fidelity"])
    doc = {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **report, "outputs": paths}
    write_json(paths["json"], doc, indent=1, finite=True)
    return paths
