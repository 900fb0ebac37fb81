"""The study's datasets: a training pool and a real test set, named by one string.

``fashion-mnist`` (the IDX files), ``imagefolder:DIR`` (``DIR/train/<class>/`` and
``DIR/test/<class>/``) or ``csv:FILE`` (multi-label, ChestX-ray14 style). :func:`parse_dataset_spec`
is the one place that reads that string; :func:`load_study_dataset` loads what it names as a
:class:`StudyData`, ready for the sweep's few-shot splits.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from synthaug.data.csv_images import CsvImageDataset
from synthaug.data.fashion_mnist import FashionMNIST
from synthaug.data.splits import class_index, few_shot_split
from synthaug.data.transforms import PILResize, WithTransform, fashion_mnist_transform, normalize_transform

__all__ = ["StudyData", "check_patient_overlap", "load_study_dataset", "parse_dataset_spec"]


@dataclass
class StudyData:
    """A dataset ready for the study: the full training pool and the test set.

    ``train``/``test`` return ``(PIL image, target)``; ``targets`` are the training pool's class
    indices (N) or multi-hot rows (N×L); ``prepare`` (PIL → PIL at the study's size, or ``None``)
    is applied to real images when the split is made and to synthetic images by the mixer;
    ``transform`` (PIL → normalized tensor) to every image after that. ``train_patients`` and
    ``test_patients`` are each image's patient id (a CSV with a patient column; else ``None``).
    """

    name: str
    train: Any
    test: Any
    classes: List[str]
    rare: int
    multilabel: bool
    channels: int
    size: int
    targets: np.ndarray
    transform: Callable
    prepare: Optional[Callable] = None
    train_files: Optional[List[Path]] = None
    test_files: Optional[List[Path]] = None
    train_patients: Optional[List[str]] = None
    test_patients: Optional[List[str]] = None

    @property
    def mode(self) -> str:
        """The PIL mode of the study's images: ``"L"`` (1 channel) or ``"RGB"``."""
        return _mode(self.channels)

    def split(self, *, shots: int, per_class: Optional[int], seed: int):
        """``(train_indices, rare_indices)`` of this seed's imbalanced training set."""
        if not self.multilabel:
            s = few_shot_split(self.train, self.rare, shots=shots, per_class=per_class, seed=seed)
            return s.train, s.rare
        rng = np.random.default_rng(seed)
        has = np.nonzero(self.targets[:, self.rare] > 0)[0]
        without = np.nonzero(self.targets[:, self.rare] == 0)[0]
        if shots > len(has):
            raise ValueError(f"finding {self.classes[self.rare]!r} has {len(has)} training images; cannot draw {shots} shots")
        rare_idx = np.sort(rng.choice(has, size=shots, replace=False))
        cap = None if per_class is None else per_class * max(1, len(self.classes) - 1)
        others = without if cap is None or cap >= len(without) else rng.choice(without, size=cap, replace=False)
        return np.sort(np.concatenate([rare_idx, others])), rare_idx

    def validation_split(self, train_indices, *, val_shots: int, val_per_class: Optional[int], seed: int) -> np.ndarray:
        """Indices of a validation set drawn from the training pool *outside* ``train_indices``:
        ``val_shots`` images of the rare class and ``val_per_class`` of every other class (a
        multi-label set: ``val_shots`` with the finding, ``val_per_class × (labels − 1)`` without).
        Its own random stream, so the training split of a seed is the same with or without it;
        never the test set. Configurations are chosen on it; the test set is read for the final
        numbers only.

        A class with fewer images left than asked for gives what it has, with a warning (small
        datasets); the rare class must keep at least one.

        Raises:
            ValueError: no image of the rare class is left outside the training split.
        """
        rng = np.random.default_rng([seed, 0x7A1])
        free = np.ones(len(self.targets), bool)
        free[np.asarray(train_indices, dtype=np.int64)] = False
        name = self.classes[self.rare]
        if self.multilabel:
            has = self.targets[:, self.rare] > 0
            groups = [(np.nonzero(free & has)[0], val_shots, f"with finding {name!r}", True),
                      (np.nonzero(free & ~has)[0], None if val_per_class is None else val_per_class * max(1, len(self.classes) - 1), "without it", False)]
        else:
            groups = [(np.nonzero(free & (self.targets == c))[0], val_shots if c == self.rare else val_per_class, repr(self.classes[c]), c == self.rare)
                      for c in range(len(self.classes))]
        chosen = []
        for idx, want, what, is_rare in groups:
            if want is None:
                chosen.append(idx)
                continue
            if want > len(idx):
                if is_rare and not len(idx):
                    raise ValueError(f"no image {what} is left outside the training split for validation; lower --shots")
                warnings.warn(f"the validation split has {len(idx)} images {what}, fewer than the {want} asked for: "
                              "all that remain outside the training split", stacklevel=2)
                want = len(idx)
            chosen.append(rng.choice(idx, size=want, replace=False))
        return np.sort(np.concatenate(chosen))

    def real_subset(self, indices):
        """The training images at ``indices``, at the study's size."""
        import torch

        subset = torch.utils.data.Subset(self.train, [int(i) for i in indices])
        return subset if self.prepare is None else WithTransform(subset, self.prepare)

    def image(self, index: int):
        """Training image ``index`` at the study's size."""
        x = self.train[int(index)][0]
        return x if self.prepare is None else self.prepare(x)


def check_patient_overlap(data: StudyData, *, strict: bool = False, test_indices: Optional[Sequence[int]] = None,
                          warn: bool = True) -> Optional[str]:
    """Find patients with images on both sides: the training pool (training, validation) and the
    test set (its images at ``test_indices`` if given), a leak that flatters the test scores.

    Returns the message naming them (``None``: no patient ids, or no patient on both sides), also
    given as a ``UserWarning`` when ``warn``.

    Raises:
        ValueError: ``strict`` and some patient is on both sides.
    """
    if data.train_patients is None or data.test_patients is None:
        return None
    train = {p for p in data.train_patients if p}
    test = data.test_patients if test_indices is None else [data.test_patients[int(i)] for i in test_indices]
    shared = sorted({p for p in test if p in train})
    if not shared:
        return None
    n_images = sum(p in train for p in test)
    example = ", ".join(shared[:5]) + (", ..." if len(shared) > 5 else "")
    message = (f"{data.name}: {len(shared)} patient{'s' if len(shared) != 1 else ''} (e.g. {example}) "
               f"{'have' if len(shared) != 1 else 'has'} images in both train and test: {n_images} test image{'s' if n_images != 1 else ''}")
    if strict:
        raise ValueError(f"{message}; refused (--strict): split the CSV by patient, or drop --strict to only warn")
    message += "; their test scores are optimistic (--strict refuses this)"
    if warn:
        warnings.warn(message, stacklevel=2)
    return message


def _mode(channels: int) -> str:
    return "L" if channels == 1 else "RGB"


def parse_dataset_spec(spec: str) -> Tuple[str, Optional[str]]:
    """``(kind, argument)`` of a dataset string: ``("fashion-mnist", None)``,
    ``("imagefolder", DIR)`` or ``("csv", FILE)``.

    Raises:
        ValueError: any other string.
    """
    kind, _, arg = spec.partition(":")
    if kind == "fashion-mnist" and not arg:
        return kind, None
    if kind in ("imagefolder", "csv") and arg:
        return kind, arg
    raise ValueError(f"--dataset must be fashion-mnist, imagefolder:DIR or csv:FILE, got {spec!r}")


def load_study_dataset(
    spec: str,
    *,
    data_dir: Optional[str] = None,
    rare_class: Optional[str] = None,
    image_size: int,
    channels: Optional[int] = None,
) -> StudyData:
    """The training pool and test set named by ``spec`` (see :func:`parse_dataset_spec`), and
    the rare class's index.

    Args:
        data_dir: folder of the Fashion-MNIST IDX files (default: the Debian package's).
        rare_class: the rare class, or a CSV dataset's rare finding (default: ``Shirt`` for
            fashion-mnist; required otherwise).
        image_size: side in pixels an imagefolder or CSV dataset's images are resized to
            (Fashion-MNIST stays 28×28).
        channels: 1 (gray) or 3 (RGB) for imagefolder/CSV (default: 3 for imagefolder, 1 for CSV).

    Raises:
        FileNotFoundError / ValueError: a missing folder or file, an unknown rare class, a folder
            without ``train/`` and ``test/``, or test classes that differ from the training ones.
    """
    kind, arg = parse_dataset_spec(spec)
    if kind == "fashion-mnist":
        train, test = FashionMNIST(data_dir, train=True), FashionMNIST(data_dir, train=False)
        rare = class_index(train, rare_class if rare_class is not None else "Shirt")
        return StudyData("fashion-mnist", train, test, list(train.classes), rare, False, 1, 28, np.asarray(train.targets), fashion_mnist_transform())
    if kind == "imagefolder":
        from torchvision.datasets import ImageFolder

        root = Path(arg)
        if not (root / "train").is_dir() or not (root / "test").is_dir():
            raise FileNotFoundError(f"imagefolder:{root} needs {root}/train/<class>/ and {root}/test/<class>/ folders")
        channels = channels or 3
        prep = PILResize(image_size, _mode(channels))
        train, test = ImageFolder(str(root / "train")), ImageFolder(str(root / "test"))
        if train.classes != test.classes:
            raise ValueError(f"{root}: train classes {train.classes} differ from test classes {test.classes}")
        if rare_class is None:
            raise ValueError("--rare-class is required for an imagefolder dataset")
        rare = class_index(train, rare_class)
        return StudyData(f"imagefolder:{root}", train, WithTransform(test, prep), list(train.classes), rare, False, channels,
                         image_size, np.asarray(train.targets), normalize_transform(channels), prep,
                         [Path(p) for p, _ in train.samples], [Path(p) for p, _ in test.samples])
    channels = channels or 1
    prep = PILResize(image_size, _mode(channels))
    train, test = CsvImageDataset(arg, "train", mode=prep.mode), CsvImageDataset(arg, "test", mode=prep.mode)
    if rare_class is None:
        raise ValueError(f"--rare-class is required for a CSV dataset (one of its findings: {', '.join(train.classes)})")
    if rare_class not in train.class_to_idx:
        raise ValueError(f"finding {rare_class!r} is not a label of {arg}; its labels are {', '.join(train.classes)}")
    rare = train.class_to_idx[rare_class]  # both sides share the CSV's label list
    return StudyData(f"csv:{arg}", train, WithTransform(test, prep), list(train.classes), rare, True, channels, image_size,
                     train.targets, normalize_transform(channels), prep, list(train.files), list(test.files), train.patients, test.patients)
