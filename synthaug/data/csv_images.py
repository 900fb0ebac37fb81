"""Multi-label image datasets described by a CSV file (ChestX-ray14 style).

The CSV has one row per image: a column with the image's path and its labels, either

* one column of ``|``-separated findings (ChestX-ray14's ``Finding Labels``; the value
  ``No Finding`` means no label), named ``Finding Labels``, ``labels`` or given by
  ``label_column``; or
* one 0/1 column per label (every column but the image, split and id columns).

Which rows are training and which are test images, in this order of preference:

1. a ``split`` column with values ``train`` (or ``val``, ``train_val``) and ``test``;
2. ChestX-ray14's ``train_val_list.txt`` and ``test_list.txt`` next to the CSV;
3. a seeded 80/20 split by patient (the ``patient_column``, else a column named ``Patient ID``,
   ``patient_id`` or ``patient``, any case) or, without one, by row, so that no patient's images
   fall on both sides.

With 1. or 2. a patient may have images on both sides; ``patients`` holds each image's patient
so the study can find them (:func:`synthaug.data.study.check_patient_overlap`).

Image paths are resolved against ``root`` (default: the CSV's folder) and then its ``images/``
subfolder (ChestX-ray14's layout). Images are read as PIL images in ``mode`` (``"L"`` by
default: X-rays are grayscale); targets are float32 multi-hot tensors, as
``BCEWithLogitsLoss`` wants them.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

__all__ = ["CsvImageDataset", "patient_column_of", "read_image_csv"]

IMAGE_COLUMNS = ("path", "image", "Image Index", "file", "filename", "image_path")
LABEL_LIST_COLUMNS = ("Finding Labels", "labels", "label")
NO_FINDING = "No Finding"
ID_COLUMNS = ("split", "Patient ID", "patient", "patient_id", "Follow-up #", "Patient Age", "Patient Gender", "View Position",
              "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]")
PATIENT_COLUMNS = ("patient id", "patient_id", "patient")  # matched case-insensitively


def patient_column_of(header: Sequence[str], patient_column: Optional[str] = None, *, path: object = "the CSV") -> Optional[str]:
    """The CSV's patient column: ``patient_column`` if given (it must exist), else the first column
    named ``Patient ID``, ``patient_id`` or ``patient`` in any case, else ``None``."""
    if patient_column is not None:
        if patient_column not in header:
            raise ValueError(f"{path}: no patient column {patient_column!r} (columns: {list(header)})")
        return patient_column
    lowered = {c.strip().lower(): c for c in reversed(list(header))}
    return next((lowered[c] for c in PATIENT_COLUMNS if c in lowered), None)


def read_image_csv(path: Union[str, os.PathLike], *, image_column: Optional[str] = None, label_column: Optional[str] = None,
                   patient_column: Optional[str] = None):
    """``(rows, image_column, labels, targets)``: the CSV's rows (dicts), the image column, the
    sorted label names and the N×L multi-hot uint8 target matrix. The patient column (see
    :func:`patient_column_of`) is never a label column.

    Raises:
        FileNotFoundError: no such file.
        ValueError: no rows, no image column, no label column(s), or a 0/1 column holding other values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV file {path} does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    if not rows:
        raise ValueError(f"{path} holds no rows")
    if image_column is None:
        image_column = next((c for c in IMAGE_COLUMNS if c in header), None)
    if image_column not in header:
        raise ValueError(f"{path}: no image column; name one of {IMAGE_COLUMNS} or pass image_column (columns: {header})")
    if label_column is None:
        label_column = next((c for c in LABEL_LIST_COLUMNS if c in header), None)
    if label_column is not None:
        if label_column not in header:
            raise ValueError(f"{path}: no column {label_column!r} (columns: {header})")
        per_row = [[x.strip() for x in (r[label_column] or "").split("|") if x.strip() and x.strip() != NO_FINDING] for r in rows]
        labels = sorted({x for xs in per_row for x in xs})
        index = {name: i for i, name in enumerate(labels)}
        targets = np.zeros((len(rows), len(labels)), dtype=np.uint8)
        for i, xs in enumerate(per_row):
            targets[i, [index[x] for x in xs]] = 1
    else:
        patient = patient_column_of(header, patient_column, path=path)
        labels = [c for c in header if c != image_column and c != patient and c not in ID_COLUMNS]
        if not labels:
            raise ValueError(f"{path}: no label column; give a 'Finding Labels'/'labels' column of '|'-separated names or one 0/1 column per label")
        targets = np.zeros((len(rows), len(labels)), dtype=np.uint8)
        for j, name in enumerate(labels):
            for i, r in enumerate(rows):
                v = (r[name] or "0").strip()
                if v not in ("0", "1", "0.0", "1.0"):
                    raise ValueError(f"{path} row {i + 2}: label column {name!r} holds {v!r}; 0/1 label columns must hold 0 or 1")
                targets[i, j] = v in ("1", "1.0")
    if not labels:
        raise ValueError(f"{path}: no row carries a label")
    return rows, image_column, labels, targets


class CsvImageDataset:
    """One side (``"train"`` or ``"test"``) of a CSV-described multi-label image dataset.

    Attributes:
        classes: label names; ``class_to_idx``; ``targets``: N×L uint8 multi-hot array;
        files: resolved image paths; ``patient_column`` and ``patients`` (each image's patient id),
        both ``None`` when the CSV has no patient column.
    """

    def __init__(
        self,
        csv_path: Union[str, os.PathLike],
        side: str = "train",
        *,
        root: Optional[Union[str, os.PathLike]] = None,
        image_column: Optional[str] = None,
        label_column: Optional[str] = None,
        patient_column: Optional[str] = None,
        mode: str = "L",
        seed: int = 0,
        test_fraction: float = 0.2,
    ) -> None:
        if side not in ("train", "test"):
            raise ValueError(f"side must be 'train' or 'test', got {side!r}")
        csv_path = Path(csv_path)
        rows, image_column, labels, targets = read_image_csv(csv_path, image_column=image_column, label_column=label_column,
                                                             patient_column=patient_column)
        root = Path(root) if root is not None else csv_path.parent
        patient_column = patient_column_of(list(rows[0]), patient_column, path=csv_path)
        is_test = _test_rows(rows, image_column, csv_path, seed=seed, test_fraction=test_fraction, patient_column=patient_column)
        keep = np.nonzero(is_test if side == "test" else ~is_test)[0]
        if keep.size == 0:
            raise ValueError(f"{csv_path}: the {side} side of the split is empty")
        self.csv_path, self.side, self.mode = csv_path, side, mode
        self.classes: List[str] = labels
        self.class_to_idx: Dict[str, int] = {c: i for i, c in enumerate(labels)}
        self.targets = targets[keep]
        self.files = [_resolve(root, rows[i][image_column], csv_path) for i in keep]
        self.patient_column = patient_column
        self.patients: Optional[List[str]] = None if patient_column is None else [(rows[i][patient_column] or "").strip() for i in keep]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        import torch
        from PIL import Image

        with Image.open(self.files[i]) as im:
            image = im.convert(self.mode)
        return image, torch.from_numpy(self.targets[i].astype(np.float32))

    def __repr__(self) -> str:
        return f"CsvImageDataset({str(self.csv_path)!r}, side={self.side!r}, images={len(self)}, labels={len(self.classes)})"


def _resolve(root: Path, name: str, csv_path: Path) -> Path:
    for candidate in (root / name, root / "images" / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{csv_path}: image {name!r} not found under {root} or {root / 'images'}")


def _test_rows(rows: Sequence[dict], image_column: str, csv_path: Path, *, seed: int, test_fraction: float,
               patient_column: Optional[str] = None) -> np.ndarray:
    if rows and "split" in rows[0]:
        values = [(r["split"] or "").strip().lower() for r in rows]
        bad = sorted(set(values) - {"train", "val", "train_val", "test"})
        if bad:
            raise ValueError(f"{csv_path}: the split column holds {bad}; use train, val, train_val or test")
        return np.array([v == "test" for v in values])
    test_list = csv_path.parent / "test_list.txt"
    if test_list.is_file() and (csv_path.parent / "train_val_list.txt").is_file():
        names = set(test_list.read_text().split())
        return np.array([r[image_column] in names for r in rows])
    # by patient: none of a patient's images on both sides (rows without a patient id: one group each)
    groups = [f"patient:{(r[patient_column] or '').strip()}" if patient_column and (r[patient_column] or "").strip() else f"row:{i}"
              for i, r in enumerate(rows)]
    unique = sorted(set(groups))
    rng = np.random.default_rng(seed)
    if not 0 <= test_fraction <= 1:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    n_test = int(round(test_fraction * len(unique))) if test_fraction in (0, 1) else min(len(unique) - 1, max(1, int(round(test_fraction * len(unique)))))
    test_groups = set(rng.choice(unique, size=n_test, replace=False).tolist())
    return np.array([g in test_groups for g in groups])
