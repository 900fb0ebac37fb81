"""The sweep's figures: rare-class recall, F1 and AP against the synthetic ratio
(``ratio_curves.png``) and against the synthetic-set size (``set_size.png``), with the controls
as bands. Both read a summary of :func:`synthaug.evaluation.sweep_report.summarize_results`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from synthaug.imaging import image_grid

__all__ = ["plot_pool_samples", "plot_ratio_curves", "plot_set_size"]


def _curve(summary, kind: str, metric: str, *, pooled: bool = False, mode: Optional[str] = None):
    """(x, mean, std) of one kind's arms (of one generation ``mode``, plain variant) by ratio, or
    by pool size for the set-size arms."""
    pts = []
    for arm, a in summary["arms"].items():
        if a["kind"] != kind or ("/n=" in arm) != pooled or metric not in a["metrics"] or a.get("variant"):
            continue
        if mode is not None and (a.get("mode") or "txt2img") != mode:
            continue
        m = a["metrics"][metric]
        pts.append((a["pool"] if pooled else a["ratio"], m["mean"], m["std"]))
    pts.sort()
    return [np.array(v) for v in zip(*pts)] if pts else None


_PLOTTED = (("rare_recall", "rare-class recall"), ("rare_f1", "rare-class F1"), ("rare_average_precision", "rare-class average precision"))


def plot_ratio_curves(summary: Dict[str, Any], path: Path) -> Optional[Path]:
    """Synthetic ratio → rare-class recall, F1 and AP (mean ± std over seeds) with the controls as
    bands: ``real_only`` (flat), ``oversampled@r`` and ``classic_aug@r`` (per ratio)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not summary["arms"]:
        return None
    fig, axes = plt.subplots(1, len(_PLOTTED), figsize=(5.5 * len(_PLOTTED), 4.2), dpi=110)
    ratios = sorted({a["ratio"] for a in summary["arms"].values() if a["kind"] != "real_only"}) or [0.0, 1.0]
    x_lo, x_hi = min(ratios) - 0.03, max(ratios) + 0.03
    for ax, (metric, label) in zip(axes, _PLOTTED):
        ro = summary["arms"].get("real_only", {}).get("metrics", {}).get(metric)
        if ro:
            ax.axhspan(ro["mean"] - ro["std"], ro["mean"] + ro["std"], xmin=0, xmax=1, color="0.6", alpha=0.25)
            ax.axhline(ro["mean"], color="0.35", lw=1.2, ls="--", label="real_only (mean ± std)")
        for kind, color in (("oversampled", "tab:orange"), ("classic_aug", "tab:green")):
            c = _curve(summary, kind, metric)
            if c is not None:
                x, mu, sd = c
                ax.fill_between(x, mu - sd, mu + sd, color=color, alpha=0.18, lw=0)
                ax.plot(x, mu, color=color, lw=1.3, ls="--", marker=".", label=f"{kind}@r (matched draws, ± std)")
        modes = sorted({a.get("mode") or "txt2img" for a in summary["arms"].values() if a["kind"] not in ("real_only", "oversampled", "classic_aug")})
        colors = iter(["tab:blue", "tab:purple", "tab:red", "tab:brown", "tab:olive", "tab:cyan", "tab:pink", "tab:gray", "black"])
        for kind in ("synthetic", "synthetic+classic_aug", "oversampled+synthetic"):
            for mode in modes:
                c = _curve(summary, kind, metric, mode=mode)
                if c is not None:
                    x, mu, sd = c
                    tag = "" if mode == "txt2img" else f"[{mode}]"
                    ax.errorbar(x, mu, yerr=sd, color=next(colors), lw=2, marker="o", capsize=4, label=f"{kind}{tag}@r (± std)")
        n = max((len(a["seeds"]) for a in summary["arms"].values()), default=0)
        ax.set_xlim(x_lo, x_hi)
        _label_axes(ax, "synthetic (or repeated-real) share of every batch, r", label, f"{label} vs ratio ({n} seeds)")
    return _save(fig, axes, path)


def plot_pool_samples(rows: Sequence[Tuple[str, Sequence[np.ndarray]]], path: Path, *, per_row: int = 12) -> Path:
    """One row of images per pool (``(title, images)``: the real shots, then each generation
    mode's first records), so a reader sees what each mode makes beside what it was given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(per_row * 0.75, 1.05 * len(rows) + 0.3), dpi=110, squeeze=False)
    for ax, (title, images) in zip(axes[:, 0], rows):
        shown = [np.asarray(im) for im in list(images)[:per_row]]
        if shown:
            grid = image_grid(shown, cols=per_row, pad=2, background=255)
            ax.imshow(grid[:, :, 0] if grid.shape[2] == 1 else grid, cmap="gray" if grid.shape[2] == 1 else None, vmin=0, vmax=255)
        ax.set_title(title, fontsize=8, loc="left")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _label_axes(ax, xlabel: str, metric_label: str, title: str) -> None:
    ax.set_ylim(bottom=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric_label}, real test set")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def _save(fig, axes, path: Path) -> Path:
    import matplotlib.pyplot as plt

    axes[0].legend(fontsize=7.5, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_set_size(summary: Dict[str, Any], path: Path) -> Optional[Path]:
    """Synthetic-set size → rare-class recall, F1 and AP at one ratio (the paper's Figure 2), with
    that ratio's ``oversampled`` control and ``real_only`` as bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sized = {arm: a for arm, a in summary["arms"].items() if "/n=" in arm}
    if not sized:
        return None
    r = next(iter(sized.values()))["ratio"]
    full = summary["arms"].get(f"synthetic@{r:g}")
    fig, axes = plt.subplots(1, len(_PLOTTED), figsize=(5.5 * len(_PLOTTED), 4.2), dpi=110)
    for ax, (metric, label) in zip(axes, _PLOTTED):
        pts = sorted((a["pool"], a["metrics"][metric]["mean"], a["metrics"][metric]["std"]) for a in sized.values() if metric in a["metrics"])
        if full and metric in full["metrics"] and full.get("pool"):
            pts.append((full["pool"], full["metrics"][metric]["mean"], full["metrics"][metric]["std"]))
        pts.sort()
        if not pts:
            ax.set_visible(False)
            continue
        x, mu, sd = (np.array(v) for v in zip(*pts))
        for base, color, text in (("real_only", "0.5", "real_only"), (f"oversampled@{r:g}", "tab:orange", f"oversampled@{r:g} (real shots repeated)")):
            b = summary["arms"].get(base, {}).get("metrics", {}).get(metric)
            if b:
                ax.axhspan(b["mean"] - b["std"], b["mean"] + b["std"], color=color, alpha=0.2)
                ax.axhline(b["mean"], color=color, ls="--", lw=1.2, label=f"{text} (mean ± std)")
        ax.errorbar(x, mu, yerr=sd, color="tab:blue", lw=2, marker="o", capsize=4, label=f"synthetic@{r:g} (± std)")
        ax.set_xscale("log")
        ax.set_xticks(x, [str(int(v)) for v in x])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        _label_axes(ax, "distinct synthetic images in the pool", label, f"{label} vs synthetic-set size (ratio {r:g})")
    return _save(fig, axes, path)
