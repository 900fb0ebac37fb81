"""Where synthetic images fall short, as a classifier trained on real images sees them:
fidelity, confusion and the Classification Accuracy Score.

* :func:`fidelity_report`: the share of synthetic images a *reference classifier* (trained on
  real images only, :class:`~synthaug.classifier.ReferenceClassifier`) takes for their intended
  class, the probability it gives that class, and what it takes the others for.
* :func:`classification_accuracy_score`: CAS (Ravuri & Vinyals 2019) adapted to one rare class.
* :func:`excluded_split_indices` and :func:`outside_indices`: the real images both may be trained
  on, those outside the study's training set (and never the test set).

The definitions are in :mod:`synthaug.evaluation.quality`.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterable, Optional, Sequence, Union

import numpy as np

from synthaug.classifier import ReferenceClassifier, train_reference_classifier
from synthaug.data.splits import few_shot_split
from synthaug.evaluation.metrics import rare_class_metrics
from synthaug.evaluation.quality.metrics import ImageSet, as_image_list, common_representation

__all__ = ["CAS_METRICS", "classification_accuracy_score", "excluded_split_indices", "fidelity_report", "outside_indices"]

#: the CAS figures compared between the synthetic and the real arm
CAS_METRICS = ("accuracy", "rare_recall", "rare_average_precision")


def _reference(reference: Union[ReferenceClassifier, str, os.PathLike], device: str = "cpu") -> ReferenceClassifier:
    if isinstance(reference, ReferenceClassifier):
        return reference
    return ReferenceClassifier.load(reference, device=device)


def _describe(ref: ReferenceClassifier) -> Dict[str, Any]:
    return {
        "path": None if ref.path is None else str(ref.path),
        "sha256": ref.sha256,
        "arch": ref.arch,
        "image_size": ref.image_size,
        "in_channels": ref.in_channels,
        "classes": list(ref.classes),
        "trained_on": ref.trained_on,
    }


def fidelity_report(
    images: ImageSet,
    intended: Union[int, str],
    reference: Union[ReferenceClassifier, str, os.PathLike],
    *,
    real_images: Optional[ImageSet] = None,
    batch_size: int = 256,
) -> Dict[str, Any]:
    """How a reference classifier sees synthetic images meant to be of class ``intended``.

    Args:
        images: the synthetic images (uint8 N×H×W(×C) array or a sequence of images; any size,
            1 or 3 channels: the classifier brings them to its input).
        intended: their class, a name (looked up first) or an index among the classifier's classes.
        reference: a :class:`~synthaug.classifier.ReferenceClassifier` or its file.
        real_images: real images of ``intended`` the classifier was not trained on (the test
            set's), judged the same way: the rate a synthetic set should be read against, since
            a hard class is missed on real images too (Fashion-MNIST shirts: a reference
            classifier trained on 1,000 of them took 38% of the real test shirts for shirts).

    Returns:
        ``{"fidelity": {...}, "confusion": {...}}``. ``fidelity``: ``intended``,
        ``intended_index``, ``n``, ``rate`` (share with argmax = intended), ``n_intended``,
        ``mean_probability`` / ``median_probability`` / ``p5_probability`` /
        ``p95_probability`` of the intended class, ``per_image`` (``probability`` and
        ``predicted`` class name, in the order of ``images``) and ``reference`` (the classifier's
        file, hash, classes and ``trained_on``). ``confusion``: ``taken_for`` (every class of the
        classifier → ``count`` and ``share`` of the images it is the argmax for; the intended
        class's entry is the fidelity), ``instead`` (count and share taken for another class) and
        ``most_common_instead`` (that class's name, ``None`` when there is none). With
        ``real_images``, ``fidelity["real"]`` holds ``n``, ``rate``, ``median_probability`` and
        ``taken_for`` (class name → share) of those, and ``confusion["real_taken_for"]`` the shares.

    Raises:
        ValueError: no images, or ``intended`` is not one of the classifier's classes.
    """
    ref = _reference(reference)
    imgs = as_image_list(images, "images")
    if not imgs:
        raise ValueError("images: no images to judge")
    k = _class_of(ref, intended)
    probs = ref.probabilities(imgs, batch_size=batch_size)
    pred = probs.argmax(1)
    p = probs[:, k].astype(np.float64)
    n = len(imgs)
    counts = np.bincount(pred, minlength=len(ref.classes))
    real = None
    if real_images is not None:
        real_list = as_image_list(real_images, "real_images")
        if not real_list:
            raise ValueError("real_images: no images; give the real images of the intended class, or none")
        real_probs = ref.probabilities(real_list, batch_size=batch_size)
        real_counts = np.bincount(real_probs.argmax(1), minlength=len(ref.classes))
        real = {
            "n": len(real_list),
            "rate": float(real_counts[k] / len(real_list)),
            "median_probability": float(np.median(real_probs[:, k])),
            "taken_for": {name: float(real_counts[c] / len(real_list)) for c, name in enumerate(ref.classes)},
        }
    others = [(int(counts[c]), c) for c in range(len(ref.classes)) if c != k and counts[c] > 0]
    most = max(others, key=lambda t: (t[0], -t[1]))[1] if others else None
    fidelity = {
        "intended": ref.classes[k],
        "intended_index": k,
        "n": n,
        "rule": "an image counts as its intended class when the reference classifier's most probable class is that class",
        "rate": float(counts[k] / n),
        "n_intended": int(counts[k]),
        "mean_probability": float(p.mean()),
        "median_probability": float(np.median(p)),
        "p5_probability": float(np.percentile(p, 5)),
        "p95_probability": float(np.percentile(p, 95)),
        "per_image": {"probability": p.tolist(), "predicted": [ref.classes[int(c)] for c in pred]},
        "reference": _describe(ref),
    }
    if real is not None:
        fidelity["real"] = real
    confusion = {
        "n": n,
        "intended": ref.classes[k],
        "taken_for": {name: {"count": int(counts[c]), "share": float(counts[c] / n)} for c, name in enumerate(ref.classes)},
        "instead": {"count": int(n - counts[k]), "share": float((n - counts[k]) / n)},
        "most_common_instead": None if most is None else ref.classes[most],
    }
    if real is not None:
        confusion["real_taken_for"] = real["taken_for"]
    return {"fidelity": fidelity, "confusion": confusion}


def _class_of(ref: ReferenceClassifier, cls: Union[int, str]) -> int:
    """A class of the reference classifier by name (exact, then ignoring case) or index."""
    if isinstance(cls, str):
        lowered = [c.lower() for c in ref.classes]
        if cls not in ref.classes and cls.lower() in lowered:
            return lowered.index(cls.lower())
        if cls not in ref.classes and cls.strip().isdigit():
            return ref.class_index(int(cls))
    return ref.class_index(cls if isinstance(cls, str) else int(cls))


# ---------------------------------------------------------------------------------- training data
def excluded_split_indices(dataset, rare_class: Union[int, str], *, seeds: Iterable[int], shots: int, per_class: Optional[int]) -> np.ndarray:
    """The training-set indices of the few-shot splits of ``seeds``, drawn as the study draws
    them (:func:`synthaug.data.splits.few_shot_split` with ``shots`` and ``per_class``): the
    images a classifier judging the study's synthetic images must not be trained on. Sorted,
    without repeats."""
    parts = [few_shot_split(dataset, rare_class, shots=shots, per_class=per_class, seed=int(s)).train for s in seeds]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def outside_indices(targets: Sequence[int], excluded: Iterable[int], *, per_class: Optional[int], seed: int = 0) -> np.ndarray:
    """Up to ``per_class`` indices of each class that are not ``excluded`` (``None``: all of
    them), drawn without replacement by ``numpy.random.default_rng(seed)``; sorted."""
    targets = np.asarray(targets)
    allowed = np.ones(len(targets), bool)
    excluded = np.asarray(list(excluded), np.int64)
    if excluded.size:
        if excluded.min() < 0 or excluded.max() >= len(targets):
            raise ValueError(f"excluded indices must lie in 0..{len(targets) - 1}")
        allowed[excluded] = False
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(targets):
        idx = np.nonzero((targets == c) & allowed)[0]
        if per_class is not None and len(idx) > per_class:
            idx = rng.choice(idx, size=int(per_class), replace=False)
        chosen.append(idx)
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


# ---------------------------------------------------------------------------------- CAS
def classification_accuracy_score(
    synthetic: ImageSet,
    *,
    rare: int,
    train_images: np.ndarray,
    train_labels: Sequence[int],
    test_images: np.ndarray,
    test_labels: Sequence[int],
    classes: Sequence[str],
    arch: str = "small-cnn",
    steps: int = 600,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
) -> Dict[str, Any]:
    """The Classification Accuracy Score of synthetic rare-class images, beside its real reference.

    Ravuri & Vinyals (2019) train a classifier on synthetic data only and test it on real data.
    With one synthetic class, the adaptation: the **synthetic arm** trains a fresh classifier on the
    synthetic rare images plus the real images of every other class; the **real arm** trains the
    same classifier (architecture, steps, seed, class-balanced batches) on real images of every
    class, with as many real rare images as there are synthetic ones (fewer if fewer exist). Both
    are tested on the real test set. The synthetic arm reaching the real arm means the synthetic
    images teach the class as well as as many real ones would.

    Args:
        synthetic: the synthetic rare-class images; brought to the real images' size and channels
            (the common-representation rule of :mod:`synthaug.evaluation.quality`).
        rare: the rare class's index in ``classes``.
        train_images, train_labels: real training images (uint8 N×H×W or N×H×W×C, one size) and
            class indices, from *outside* the study's training set and never the test set; the
            real rare images of the real arm are drawn from them (``default_rng(seed)``).
        test_images, test_labels: the real test set.
        classes: class names, in label order.
        arch, steps, batch_size, seed, device: training of both arms
            (:func:`~synthaug.classifier.train_reference_classifier`).

    Returns:
        ``{"definition", "synthetic": metrics, "real": metrics, "difference": {m: synthetic −
        real}, "ratio": {m: synthetic / real}, "train": counts, "test": counts, "settings"}``;
        the metrics are :func:`~synthaug.evaluation.metrics.rare_class_metrics` with the
        average precision (``accuracy``, ``rare_recall``, ``rare_average_precision``, ...).
    """
    x = np.asarray(train_images)
    x = x[..., None] if x.ndim == 3 else x
    y = np.asarray(train_labels, np.int64)
    xt = np.asarray(test_images)
    xt = xt[..., None] if xt.ndim == 3 else xt
    yt = np.asarray(test_labels, np.int64)
    if len(x) != len(y) or len(xt) != len(yt) or not len(xt):
        raise ValueError(f"give one label per image and a non-empty test set (train {len(x)}/{len(y)}, test {len(xt)}/{len(yt)})")
    if not 0 <= int(rare) < len(classes):
        raise ValueError(f"rare must be a class index in 0..{len(classes) - 1}, got {rare}")
    syn_list = as_image_list(synthetic, "synthetic")
    if not syn_list:
        raise ValueError("synthetic: no images")
    h, w, c = x.shape[1:]
    syn, _ = common_representation(syn_list, height=h, width=w, channels=c)
    others = np.nonzero(y != rare)[0]
    rare_real = np.nonzero(y == rare)[0]
    n_real_rare = min(len(syn), len(rare_real))
    if n_real_rare == 0:
        raise ValueError(f"train_images hold no real image of class {classes[rare]!r} for the real reference arm")
    real_pick = np.sort(np.random.default_rng(seed).choice(rare_real, size=n_real_rare, replace=False))
    arms = {
        "synthetic": (np.concatenate([x[others], syn]), np.concatenate([y[others], np.full(len(syn), rare, np.int64)])),
        "real": (np.concatenate([x[others], x[real_pick]]), np.concatenate([y[others], y[real_pick]])),
    }
    results: Dict[str, Dict[str, Any]] = {}
    for name, (images, labels) in arms.items():
        clf = train_reference_classifier(images, labels, list(classes), arch=arch, steps=steps, batch_size=batch_size, seed=seed,
                                         device=device, progress=progress)
        scores = clf.probabilities(xt)
        results[name] = rare_class_metrics(yt, scores.argmax(1), int(rare), scores)
    syn_m, real_m = results["synthetic"], results["real"]
    return {
        "definition": (
            "Classification Accuracy Score (Ravuri & Vinyals 2019) for one synthetic class: a classifier trained on the synthetic "
            "rare images + real images of the other classes, tested on the real test set; beside the same classifier trained "
            "on real images of every class (as many real rare images as synthetic ones)"
        ),
        "synthetic": syn_m,
        "real": real_m,
        "difference": {m: syn_m[m] - real_m[m] for m in CAS_METRICS},
        "ratio": {m: (syn_m[m] / real_m[m] if real_m[m] else None) for m in CAS_METRICS},
        "train": {
            "synthetic_rare": int(len(syn)),
            "real_rare": int(n_real_rare),
            "real_rare_available": int(len(rare_real)),
            "other": int(len(others)),
            "other_per_class": {classes[int(k)]: int(v) for k, v in zip(*np.unique(y[others], return_counts=True))},
        },
        "test": {"n": int(len(yt)), "rare_support": int((yt == rare).sum())},
        "settings": {"arch": arch, "steps": int(steps), "batch_size": int(batch_size), "seed": int(seed), "balanced": True,
                     "image": [int(h), int(w), int(c)]},
    }
