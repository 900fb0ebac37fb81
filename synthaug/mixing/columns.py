"""A dataset of records with named columns (a Hugging Face ``datasets.Dataset``) as ``(image, target)`` pairs."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

__all__ = ["ColumnDataset"]


class ColumnDataset:
    """``(item[image_column], item[label_column])`` of each item of ``dataset``.

    Made for a Hugging Face ``datasets.Dataset`` (items are dicts of columns), so it can stand as
    :class:`~synthaug.MixedDataset`'s real dataset (``MixedDataset(ds, cache, image_column="image",
    label_column="label")`` wraps it). ``classes`` are the names of the label column's
    ``ClassLabel`` feature (``ds.features[label_column].names``) when it has one, so synthetic
    records are mapped into the dataset's classes by name.

    Raises:
        ValueError: a column the dataset lacks (naming the columns it has).
    """

    def __init__(self, dataset: Any, image_column: str, label_column: str) -> None:
        columns = _columns(dataset)
        for what, name in (("image_column", image_column), ("label_column", label_column)):
            if columns is not None and name not in columns:
                raise ValueError(f"{what} {name!r} is not a column of the dataset; its columns are {columns}")
        self.dataset = dataset
        self.image_column = image_column
        self.label_column = label_column
        names = _class_label_names(dataset, label_column)
        if names is not None:
            self.classes: List[str] = names
            self.class_to_idx = {c: i for i, c in enumerate(names)}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[int(index)]
        return item[self.image_column], item[self.label_column]

    def __getitems__(self, indices: Sequence[int]):
        """Items of a batch in one read (a Hugging Face dataset reads rows by a list of indices
        in one call, and returns columns)."""
        if hasattr(self.dataset, "features") and hasattr(self.dataset, "column_names"):
            rows = self.dataset[[int(i) for i in indices]]
            return list(zip(rows[self.image_column], rows[self.label_column]))
        return [self[i] for i in indices]

    def __repr__(self) -> str:
        return f"ColumnDataset({type(self.dataset).__name__}, image_column={self.image_column!r}, label_column={self.label_column!r})"


def _columns(dataset: Any) -> Optional[List[str]]:
    names = getattr(dataset, "column_names", None)
    return list(names) if isinstance(names, (list, tuple)) else None


def _class_label_names(dataset: Any, column: str) -> Optional[List[str]]:
    features = getattr(dataset, "features", None)
    try:
        feature = features[column] if features is not None else None
    except (KeyError, TypeError):
        return None
    names = getattr(feature, "names", None)
    return [str(n) for n in names] if names else None
