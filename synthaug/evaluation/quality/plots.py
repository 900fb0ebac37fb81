"""The figures of a quality report: histograms of the per-image scores
(``quality_histograms.png``), the synthetic images closest to their memorization reference
beside that image (``nearest_pairs.png``) and, with ``--fidelity``, how a reference classifier
sees the synthetic images (``fidelity.png``). matplotlib is imported only when a figure is drawn."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from synthaug.evaluation.quality.metrics import ImageSet, as_image_list, common_representation

__all__ = ["plot_fidelity", "plot_nearest_pairs", "plot_quality_histograms"]


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
    syn = as_image_list([synthetic[int(i)] for i in order], "synthetic")
    ref = as_image_list([ref_all[int(mem["nearest_index"][int(i)])] for i in order], "reference")
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


def plot_fidelity(report: Dict[str, Any], path: Union[str, os.PathLike]) -> str:
    """The fidelity diagnosis as a PNG: the reference classifier's probability of the intended
    class per synthetic image (histogram), what the images are taken for (a bar per class, the
    intended one highlighted), and, when the report has ``cas``, the CAS figures of the
    synthetic arm beside the real arm. Returns the path."""
    fid, conf, cas = report["fidelity"], report["confusion"], report.get("cas")
    fig, axes = _figure(1, 3 if cas else 2, (13.5 if cas else 9.5, 3.8))
    ax = axes[0][0]
    ax.hist(fid["per_image"]["probability"], bins=np.linspace(0.0, 1.0, 21), color="tab:blue")
    ax.set_xlabel(f"p({fid['intended']}) under the reference classifier")
    ax.set_ylabel("synthetic images")
    ax.set_title(f"mean p = {fid['mean_probability']:.3f}", fontsize=9)

    ax = axes[0][1]
    names = list(conf["taken_for"])
    shares = [conf["taken_for"][c]["share"] for c in names]
    colors = ["tab:green" if c == conf["intended"] else "tab:red" for c in names]
    real = conf.get("real_taken_for")
    width = 0.8 if real is None else 0.42
    offset = 0.0 if real is None else -0.21
    bars = ax.bar(np.arange(len(names)) + offset, shares, width, color=colors, label="synthetic")
    for bar, c in zip(bars, names):
        n = conf["taken_for"][c]["count"]
        if n:
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), str(n), ha="center", va="bottom", fontsize=7)
    if real is not None:
        ax.bar(np.arange(len(names)) + 0.21, [real.get(c, 0.0) for c in names], width, color="0.6",
               label=f"real {fid['intended']} (test, {fid['real']['n']})")
        ax.legend(fontsize=7, loc="upper right")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("share of images")
    real_rate = f"; real: {fid['real']['rate']:.1%}" if "real" in fid else ""
    ax.set_title(f"taken for {fid['intended']!r}: {fid['rate']:.1%} ({fid['n_intended']}/{fid['n']}){real_rate}", fontsize=9)

    if cas:
        ax = axes[0][2]
        metrics = [m for m in ("accuracy", "rare_recall", "rare_average_precision") if m in cas["synthetic"]]
        xs = np.arange(len(metrics))
        ax.bar(xs - 0.2, [cas["synthetic"][m] for m in metrics], 0.4, label=f"synthetic {fid['intended']} ({cas['train']['synthetic_rare']})",
               color="tab:orange")
        ax.bar(xs + 0.2, [cas["real"][m] for m in metrics], 0.4, label=f"real {fid['intended']} ({cas['train']['real_rare']})", color="0.5")
        ax.set_xticks(xs)
        ax.set_xticklabels([m.replace("rare_average_precision", "rare AP").replace("_", " ") for m in metrics], fontsize=8)
        ax.set_ylim(0, 1.0)
        ax.set_title(f"CAS on the real test set ({cas['test']['n']} images)", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{fid['n']} synthetic images judged by a classifier trained on real images", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    return str(path)
