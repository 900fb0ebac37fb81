"""``synthaug quality``: PSNR, SSIM, LPIPS, memorization and diversity of a synthetic set.

Compares the synthetic images of a cache with real rare-class images (a folder, or a class of
Fashion-MNIST) and writes ``quality.json``, ``quality_histograms.png`` and ``nearest_pairs.png``.

With ``--fidelity`` (and ``--dataset``) it also shows where the synthetic images fall short, as
a classifier trained on real images sees them: the share it takes for the rare class
(``fidelity``), what it takes the others for (``confusion``), and the Classification Accuracy
Score (``cas``) beside a real reference; figure ``fidelity.png``. The classifiers are trained on
real training images outside the study's training set (name it with --exclude-seeds, or
--exclude-indices FILE; or say --exclude-nothing) and never on the test set; ``trained_on`` in
quality.json lists those images. ``--train-reference`` saves the reference classifier it
trains as ``reference_classifier.pt`` (usable as ``--gate-classifier`` of ``synthaug
generate``/``worker``).

The definitions are in :mod:`synthaug.evaluation.quality`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from synthaug.data.fashion_mnist import FashionMNIST
from synthaug.data.folders import load_image_folder
from synthaug.data.splits import class_index, targets_of
from synthaug.classifier import ReferenceClassifier, train_reference_classifier
from synthaug.evaluation.quality import (
    classification_accuracy_score,
    excluded_split_indices,
    fidelity_report,
    image_quality_report,
    load_cache_images,
    lpips_status,
    outside_indices,
    train_images_from_adapter,
    write_quality_report,
)
from synthaug.outputs import output_dir

__all__ = ["register", "run"]

DATASETS = ("fashion-mnist",)
REFERENCE_FILE = "reference_classifier.pt"
#: the flags that only go with --fidelity, with their defaults
_FIDELITY_FLAGS = {"reference_classifier": None, "train_reference": False, "exclude_seeds": None, "exclude_indices": None,
                   "exclude_nothing": False, "exclude_shots": 30, "exclude_per_class": 1000, "fidelity_per_class": 1000,
                   "fidelity_steps": 600, "test_size": 0, "fidelity_device": "cpu"}


def _rare_index(ds, args: argparse.Namespace) -> int:
    rare = args.rare_class if args.rare_class is not None else "Shirt"
    k = class_index(ds, int(rare) if str(rare).isdigit() else rare)
    if not 0 <= k < len(ds.classes):
        raise ValueError(f"--rare-class {rare}: Fashion-MNIST has classes 0..{len(ds.classes) - 1}")
    return k


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
    k = _rare_index(ds, args)
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


def _check_fidelity_args(args: argparse.Namespace) -> None:
    """Refuse a --fidelity run that cannot work, or fidelity flags without --fidelity, before any work."""
    if not args.fidelity:
        given = [f"--{k.replace('_', '-')}" for k, default in _FIDELITY_FLAGS.items() if getattr(args, k) != default]
        if given:
            raise ValueError(f"{', '.join(given)} go with --fidelity")
        return
    if args.dataset is None:
        raise ValueError("--fidelity needs --dataset: it trains classifiers on real images of every class and tests them on its test split")
    if args.reference_classifier is None and not args.train_reference:
        raise ValueError("--fidelity needs a classifier trained on real images: --reference-classifier FILE, or --train-reference to train one")
    if args.exclude_seeds is None and args.exclude_indices is None and not args.exclude_nothing:
        raise ValueError(
            "--fidelity trains on real training images outside the study's training set: name that set with --exclude-seeds S[,S...] "
            "(its few-shot splits, with --exclude-shots/--exclude-per-class as the study drew them), or --exclude-indices FILE; "
            "or pass --exclude-nothing if no study trained on these images"
        )
    if args.reference_classifier is not None and not Path(args.reference_classifier).is_file():
        raise FileNotFoundError(f"--reference-classifier {args.reference_classifier}: no such file")
    if args.exclude_indices is not None and not Path(args.exclude_indices).is_file():
        raise FileNotFoundError(f"--exclude-indices {args.exclude_indices}: no such file")
    for name in ("exclude_shots", "fidelity_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("exclude_per_class", "fidelity_per_class", "test_size"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0: all), got {getattr(args, name)}")


def _read_indices(path: str) -> List[int]:
    """Training-set indices from a file: a JSON list, or integers separated by white space or commas."""
    text = Path(path).read_text()
    try:
        values = json.loads(text) if text.lstrip().startswith("[") else [int(t) for t in text.replace(",", " ").split()]
        return [int(v) for v in values]
    except (ValueError, TypeError) as exc:
        raise ValueError(f"--exclude-indices {path}: not a list of training-set indices (a JSON list or integers separated by spaces): {exc}") from None


def _fidelity(args: argparse.Namespace, synthetic: List[Any], out: Path, workdir: Path) -> Tuple[Dict[str, Any], Optional[Path]]:
    """The ``fidelity``, ``confusion``, ``cas`` and ``trained_on`` sections, and the reference
    classifier file trained here (in ``workdir``; ``None`` when one was given)."""
    train = FashionMNIST(root=args.data, train=True)
    test = FashionMNIST(root=args.data, train=False)
    classes = list(train.classes)
    rare = _rare_index(train, args)
    x, y = train.data.numpy(), targets_of(train)
    if args.exclude_seeds is not None:
        try:
            seeds = [int(s) for s in str(args.exclude_seeds).split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--exclude-seeds {args.exclude_seeds}: give seeds as integers separated by commas") from None
        per_class = args.exclude_per_class or None
        excluded = excluded_split_indices(train, rare, seeds=seeds, shots=args.exclude_shots, per_class=per_class)
        exclusion = {"rule": "the few-shot training splits of these seeds, drawn as the sweep draws them (synthaug.data.splits.few_shot_split)",
                     "seeds": seeds, "shots": args.exclude_shots, "per_class": per_class}
    elif args.exclude_indices is not None:
        excluded = np.asarray(_read_indices(args.exclude_indices), np.int64)
        exclusion = {"rule": "the training-set indices listed in a file", "file": str(Path(args.exclude_indices).resolve())}
    else:
        excluded = np.zeros(0, np.int64)
        exclusion = {"rule": "none (--exclude-nothing)"}
    exclusion["n"] = int(len(np.unique(excluded)))
    pool = outside_indices(y, excluded, per_class=args.fidelity_per_class or None, seed=args.seed)
    counts = np.bincount(y[pool], minlength=len(classes))
    where = f"fashion-mnist training images outside {exclusion['n']} excluded ones ({exclusion['rule']})"
    trained_on = {
        "dataset": args.dataset,
        "root": str(train.root),
        "split": "train",
        "never": "the test split",
        "excluded": exclusion,
        "per_class": args.fidelity_per_class or None,
        "seed": int(args.seed),
        "n": int(len(pool)),
        "class_counts": {c: int(n) for c, n in zip(classes, counts)},
        "used_by": (["reference classifier"] if args.train_reference else []) + ["cas"],
        "indices": pool.tolist(),
    }
    if min(counts) == 0:
        empty = [c for c, n in zip(classes, counts) if n == 0]
        raise ValueError(f"no training image of {empty} is left outside the excluded ones; exclude fewer")
    ref_file: Optional[Path] = None
    if args.train_reference:
        ref = train_reference_classifier(x[pool][:, :, :, None], y[pool], classes, steps=args.fidelity_steps, seed=args.seed,
                                         device=args.fidelity_device, progress=True,
                                         trained_on=f"{where}: {len(pool)} images, at most {args.fidelity_per_class or 'all'} per class")
        ref_file = ref.save(workdir / REFERENCE_FILE)
    else:
        ref = ReferenceClassifier.load(args.reference_classifier, device=args.fidelity_device)
    xt, yt = test.data.numpy(), targets_of(test)
    if args.test_size and args.test_size < len(yt):
        sel = np.sort(np.random.default_rng(args.seed).choice(len(yt), args.test_size, replace=False))
        xt, yt = xt[sel], yt[sel]
    # the real test images of the class, judged alike: the rate the synthetic one reads against
    sections = fidelity_report(synthetic, classes[rare], ref, real_images=xt[yt == rare][:, :, :, None])
    if ref_file is not None:
        sections["fidelity"]["reference"].update(path=str(out / REFERENCE_FILE), trained_here=True)
    sections["cas"] = classification_accuracy_score(synthetic, rare=rare, train_images=x[pool], train_labels=y[pool], test_images=xt,
                                                    test_labels=yt, classes=classes, steps=args.fidelity_steps, seed=args.seed,
                                                    device=args.fidelity_device, progress=True)
    sections["trained_on"] = trained_on
    return sections, ref_file


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
    _check_fidelity_args(args)

    if args.lpips == "auto":
        _, reason = lpips_status(args.lpips_backbone)
        if reason is not None:
            print(f"synthaug quality: LPIPS will not be computed (the other metrics will): {reason}", file=sys.stderr)
    real, real_info = _load_real(args)
    train, train_info = _load_train(args, real)
    synthetic, cache_info = load_cache_images(args.cache, label=args.label, limit=args.limit, seed=args.seed, progress=True)
    workdir = Path(tempfile.mkdtemp(prefix="synthaug-quality-"))
    try:
        return _report(args, out, real, real_info, train, train_info, synthetic, cache_info, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _report(args, out: Path, real, real_info, train, train_info, synthetic, cache_info, workdir: Path) -> int:
    sections, ref_file = _fidelity(args, synthetic, out, workdir) if args.fidelity else ({}, None)
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
    report.update(sections)
    report["command"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    lp = report["lpips"]
    paths = write_quality_report(report, out, synthetic=synthetic, real=real, train_images=train, overwrite=args.overwrite)
    if ref_file is not None:
        shutil.move(str(ref_file), str(out / REFERENCE_FILE))

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
    if args.fidelity:
        fid, conf, cas = report["fidelity"], report["confusion"], report["cas"]
        instead = sorted(((v["count"], c) for c, v in conf["taken_for"].items() if c != fid["intended"] and v["count"]), reverse=True)
        shown = ", ".join(f"{c} {n}" for n, c in instead[:3]) or "none"
        print(f"fidelity     {fid['rate']:.1%} ({fid['n_intended']}/{fid['n']}) taken for {fid['intended']!r}, mean p = {fid['mean_probability']:.3f}; "
              f"instead: {shown}")
        if "real" in fid:
            real = sorted(((v, c) for c, v in fid["real"]["taken_for"].items() if c != fid["intended"] and v), reverse=True)
            print(f"             real test {fid['intended']!r} images: {fid['real']['rate']:.1%} taken for {fid['intended']!r}; instead: "
                  + (", ".join(f"{c} {v:.0%}" for v, c in real[:3]) or "none"))

        def arm(m):
            return f"accuracy {m['accuracy']:.3f}, {fid['intended']} recall {m['rare_recall']:.3f}, AP {m['rare_average_precision']:.3f}"

        print(f"CAS          synthetic {arm(cas['synthetic'])} | real {arm(cas['real'])} ({cas['test']['n']} test images)")
    n_syn, n_real = report["inputs"]["synthetic"]["n"], report["inputs"]["real"]["n"]
    names = [Path(paths[k]).name for k in ("json", "histograms", "pairs", "fidelity") if k in paths] + ([REFERENCE_FILE] if ref_file is not None else [])
    print(f"wrote {', '.join(names[:-1])} and {names[-1]} to {out} ({n_syn} synthetic vs {n_real} real images)")
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

    g = p.add_argument_group("fidelity: how a classifier trained on real images sees the synthetic images (needs --dataset)")
    g.add_argument("--fidelity", action="store_true", help="add fidelity, confusion and CAS (Classification Accuracy Score) to quality.json, and fidelity.png")
    ref = g.add_mutually_exclusive_group()
    ref.add_argument("--reference-classifier", default=None, metavar="FILE", help="a reference classifier file (synthaug.classifier.ReferenceClassifier) to judge with")
    ref.add_argument("--train-reference", action="store_true", help=f"train one on the real images outside the study's training set; saved as {REFERENCE_FILE}")
    ex = g.add_mutually_exclusive_group()
    ex.add_argument("--exclude-seeds", default=None, metavar="S[,S...]", help="leave out the few-shot training splits of these seeds (the sweep's seeds)")
    ex.add_argument("--exclude-indices", default=None, metavar="FILE", help="leave out these training-set indices (a JSON list, or integers separated by spaces)")
    ex.add_argument("--exclude-nothing", action="store_true", help="no study trained on Fashion-MNIST training images: use any of them")
    g.add_argument("--exclude-shots", type=int, default=30, metavar="N", help="with --exclude-seeds: rare-class shots of those splits (default: 30, the sweep's)")
    g.add_argument("--exclude-per-class", type=int, default=1000, metavar="N", help="with --exclude-seeds: images per other class of those splits, 0 = all (default: 1000, the sweep's)")
    g.add_argument("--fidelity-per-class", type=int, default=1000, metavar="N", help="real training images per class for the classifiers, 0 = all that are left (default: 1000)")
    g.add_argument("--fidelity-steps", type=int, default=600, metavar="N", help="training steps of each classifier trained here (default: 600)")
    g.add_argument("--test-size", type=int, default=0, metavar="N", help="CAS: test on N test images drawn with --seed, 0 = the whole test split (default: 0)")
    g.add_argument("--fidelity-device", default="cpu", metavar="DEVICE", help="torch device of those classifiers (default: cpu)")

    g = p.add_argument_group("output")
    g.add_argument("--out", default="quality-report", metavar="DIR", help="folder for quality.json, quality_histograms.png, nearest_pairs.png (default: quality-report)")
    g.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder (default: refuse)")
    p.set_defaults(func=run)
