"""``synthaug quality``: PSNR, SSIM, LPIPS, memorization and diversity of a synthetic set.

Compares the synthetic images of a cache with real rare-class images (a folder, or a class of
Fashion-MNIST) and writes ``quality.json``, ``quality_histograms.png`` and ``nearest_pairs.png``.
The definitions are in :mod:`synthaug.evaluation.quality`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

from synthaug.data.fashion_mnist import FashionMNIST
from synthaug.data.folders import load_image_folder
from synthaug.data.splits import class_index, targets_of
from synthaug.evaluation.quality import (
    image_quality_report,
    load_cache_images,
    lpips_status,
    train_images_from_adapter,
    write_quality_report,
)
from synthaug.outputs import output_dir

__all__ = ["register", "run"]

DATASETS = ("fashion-mnist",)


def _load_real(args: argparse.Namespace) -> Tuple[List[Any], Dict[str, Any]]:
    """Real rare-class images and a description of where they came from."""
    if args.real is not None:
        if args.rare_class is not None or args.split is not None or args.data is not None:
            raise ValueError("--rare-class, --split and --data go with --dataset, not with --real")
        try:
            loaded = load_image_folder(args.real)
        except (FileNotFoundError, ValueError) as exc:
            raise type(exc)(f"--real {args.real}: {exc}; give the folder of real rare-class images") from None
        if loaded.skipped:
            print(f"synthaug quality: note: skipped {len(loaded.skipped)} file(s) of {args.real} that are not readable images", file=sys.stderr)
        return loaded.images, {"source": "folder", "folder": str(args.real), "ids": [p.name for p in loaded.files], "skipped": loaded.skipped}

    split = args.split or "train"
    ds = FashionMNIST(root=args.data, train=split == "train")
    rare = args.rare_class if args.rare_class is not None else "Shirt"
    k = class_index(ds, int(rare) if str(rare).isdigit() else rare)
    if not 0 <= k < len(ds.classes):
        raise ValueError(f"--rare-class {rare}: Fashion-MNIST has classes 0..{len(ds.classes) - 1}")
    idx = (targets_of(ds) == k).nonzero()[0]
    images = [ds.data[int(i)].numpy() for i in idx]
    return images, {
        "source": "dataset",
        "dataset": args.dataset,
        "split": split,
        "root": str(ds.root),
        "rare_class": ds.classes[k],
        "rare_index": k,
        "ids": [int(i) for i in idx],
    }


def _load_train(args: argparse.Namespace, real: List[Any]):
    if args.adapter is not None:
        matched, info = train_images_from_adapter(args.adapter, real)
        if info["unmatched_files"]:
            print(
                f"synthaug quality: note: {len(info['unmatched_files'])} of the adapter's {info['listed']} training images are not "
                "among the real images loaded; memorization is measured against the other ones",
                file=sys.stderr,
            )
        return [real[i] for i in matched], {"source": "adapter", **info, "real_indices": matched}
    if args.train_images is not None:
        try:
            loaded = load_image_folder(args.train_images)
        except (FileNotFoundError, ValueError) as exc:
            raise type(exc)(f"--train-images {args.train_images}: {exc}; give the folder the adapter was trained on") from None
        return loaded.images, {"source": "folder", "folder": str(args.train_images), "ids": [p.name for p in loaded.files]}
    return None, None


def _fmt(value, spec: str, none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    # A file or a non-empty folder is refused now, before the work. A missing folder is not made
    # yet (write_quality_report makes it), so a run that fails leaves nothing behind.
    if out.exists():
        output_dir(out, overwrite=args.overwrite, what="--out")
    if not (Path(args.cache) / "data.mdb").is_file():
        raise FileNotFoundError(f"--cache {args.cache}: no synthetic cache there (no data.mdb); give the folder `synthaug generate` filled")

    if args.lpips == "auto":
        _, reason = lpips_status(args.lpips_backbone)
        if reason is not None:
            print(f"synthaug quality: LPIPS will not be computed (the other metrics will): {reason}", file=sys.stderr)
    real, real_info = _load_real(args)
    train, train_info = _load_train(args, real)
    synthetic, cache_info = load_cache_images(args.cache, label=args.label, limit=args.limit, seed=args.seed, progress=True)
    report = image_quality_report(
        synthetic,
        real,
        train_images=train,
        lpips={"auto": "auto", "on": True, "off": False}[args.lpips],
        lpips_backbone=args.lpips_backbone,
        threshold=args.threshold,
        max_pairs=args.max_pairs,
        seed=args.seed,
        progress=True,
    )
    report["inputs"]["synthetic"].update(cache_info)
    report["inputs"]["real"].update(real_info)
    if train_info is not None:
        report["inputs"]["train"].update(train_info)
    report["command"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    lp = report["lpips"]
    paths = write_quality_report(report, out, synthetic=synthetic, real=real, train_images=train, overwrite=args.overwrite)

    ps, ss, mem, div = report["psnr"]["summary"], report["ssim"]["summary"], report["memorization"], report["diversity"]
    print(f"PSNR         median {_fmt(ps['median'], '.2f')} dB, mean {_fmt(ps['mean'], '.2f')} dB ({ps['n_infinite']} identical to a real image)")
    print(f"SSIM         median {_fmt(ss['median'], '.4f')}, mean {_fmt(ss['mean'], '.4f')}")
    if lp["available"]:
        print(f"LPIPS        median {_fmt(lp['summary']['median'], '.4f')}, mean {_fmt(lp['summary']['mean'], '.4f')}")
    else:
        print("LPIPS        not computed (see quality.json: lpips.reason)")
    print(f"memorization {mem['rate']:.1%} ({mem['n_memorized']}/{mem['n']}) closer to a {mem['reference']} image than τ = {mem['threshold']:.4f}")
    print(
        f"diversity    synthetic {_fmt(div['synthetic']['mean'], '.4f')} vs real {_fmt(div['real']['mean'], '.4f')} "
        f"(ratio {_fmt(div['ratio'], '.3f')})"
    )
    n_syn, n_real = report["inputs"]["synthetic"]["n"], report["inputs"]["real"]["n"]
    print(f"wrote {Path(paths['json']).name}, {Path(paths['histograms']).name} and {Path(paths['pairs']).name} to {out} ({n_syn} synthetic vs {n_real} real images)")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "quality",
        help="PSNR/SSIM/LPIPS, memorization and diversity of a synthetic set against real images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("synthetic images")
    g.add_argument("--cache", required=True, metavar="PATH", help="synthetic-image cache directory (required)")
    g.add_argument("--label", type=int, default=None, metavar="N", help="use only records with this label (default: all records)")
    g.add_argument("--limit", type=int, default=0, metavar="N", help="use at most N records, drawn at random with --seed (default: 0 = all)")
    g.add_argument("--seed", type=int, default=0, help="seed of the --limit draw and of the diversity pair sample (default: 0)")

    g = p.add_argument_group("real rare-class images (one of --real / --dataset is required)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--real", metavar="DIR", default=None, help="folder of real rare-class images")
    src.add_argument("--dataset", choices=DATASETS, default=None, help="take the real images from a dataset's rare class")
    g.add_argument("--rare-class", default=None, metavar="NAME|INDEX", help="with --dataset: the rare class (default: Shirt)")
    g.add_argument("--split", choices=("train", "test"), default=None, help="with --dataset: the split to read (default: train, where an adapter's training images come from)")
    g.add_argument("--data", default=None, metavar="DIR", help="with --dataset: folder of its files (default: /usr/share/datasets/fashion-mnist)")

    g = p.add_argument_group("memorization reference (default: the real images)")
    ref = g.add_mutually_exclusive_group()
    ref.add_argument("--adapter", default=None, metavar="DIR", help="adapter folder: its synthaug.json train_images hashes pick its training images out of the real images")
    ref.add_argument("--train-images", default=None, metavar="DIR", help="folder of the images the adapter was trained on")
    g.add_argument("--threshold", type=float, default=None, metavar="T", help="memorization threshold τ in pixel-distance units (default: distance of the closest two distinct real images)")

    g = p.add_argument_group("metrics")
    g.add_argument("--lpips", choices=("auto", "on", "off"), default="auto", help="auto: LPIPS when the AlexNet weights are found, else reported as unavailable; on: fail without them; off: skip (default: auto)")
    g.add_argument("--lpips-backbone", default=None, metavar="PATH", help="torchvision's alexnet-owt-7be5be79.pth (default: looked for in torch.hub.get_dir()/checkpoints; never downloaded)")
    g.add_argument("--max-pairs", type=int, default=20_000, metavar="N", help="diversity: all pairs up to N, else N pairs sampled with --seed (default: 20000)")

    g = p.add_argument_group("output")
    g.add_argument("--out", default="quality-report", metavar="DIR", help="folder for quality.json, quality_histograms.png, nearest_pairs.png (default: quality-report)")
    g.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder (default: refuse)")
    p.set_defaults(func=run)
