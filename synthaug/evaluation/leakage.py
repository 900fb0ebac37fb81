"""The leakage guard: a test set must not hold any image an adapter was trained on.

A LoRA trained on a test image makes synthetic copies of it, and a classifier trained on those
then scores on that image: the evaluation would measure memorisation, not generalisation.
``synthaug finetune`` records the SHA-256 of every training image's decoded pixels in the
adapter's ``synthaug.json`` (:func:`synthaug.adapter.image_sha256`); this module hashes the test
images the same way and refuses on any match.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Union

from synthaug.adapter import image_sha256, read_adapter_config
from synthaug.data.folders import read_image
from synthaug.errors import SynthaugError

__all__ = ["DataLeakageError", "adapter_image_hashes", "check_no_leakage", "dataset_image_hashes", "file_image_hashes"]


class DataLeakageError(SynthaugError):
    """The test set shares images with an adapter's training images."""


def adapter_image_hashes(adapter: Union[str, os.PathLike]) -> Dict[str, str]:
    """``{sha256: file name}`` of the images the adapter was trained on (from ``synthaug.json``).

    Raises:
        ValueError: the adapter records no training-image hashes (made by something other than
            ``synthaug finetune``): the guard cannot run, and the sweep will not pretend it did.
    """
    cfg = read_adapter_config(adapter, require_weights=False)
    images = cfg.get("train_images") or []
    hashes = {im["sha256"]: im.get("file", "?") for im in images if im.get("sha256")}
    if not hashes:
        raise ValueError(f"adapter {adapter} records no training-image hashes (synthaug.json 'train_images'); the leakage check cannot run")
    return hashes


def dataset_image_hashes(dataset, *, progress: bool = False, desc: str = "hash test images") -> List[str]:
    """The :func:`~synthaug.adapter.image_sha256` of every image of ``dataset`` (``dataset[i][0]``)."""
    from synthaug.progress import progress_bar

    return [image_sha256(dataset[i][0]) for i in progress_bar(range(len(dataset)), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)]


def file_image_hashes(paths, *, progress: bool = False, desc: str = "hash test images") -> List[str]:
    """The pixel hashes of image files decoded as ``synthaug finetune`` decodes its training
    images (:func:`synthaug.data.folders.read_image`: gray stays gray), so a test image and the
    same picture among an adapter's training images hash alike whatever the dataset's loader
    converts them to."""
    from synthaug.progress import progress_bar

    return [image_sha256(read_image(p)) for p in progress_bar(list(paths), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)]


def check_no_leakage(adapters: Iterable[Union[str, os.PathLike]], test_hashes: Sequence[str], *, test_name: str = "the test set") -> Dict[str, Any]:
    """Refuse (raise :class:`DataLeakageError`) when a test image is one of an adapter's training
    images; otherwise return what was checked: ``{"adapters", "train_images", "test_images",
    "shared": 0}``."""
    test = {h: i for i, h in enumerate(test_hashes)}
    checked: List[str] = []
    n_train = 0
    for adapter in adapters:
        hashes = adapter_image_hashes(adapter)
        n_train += len(hashes)
        shared = [(name, test[h]) for h, name in hashes.items() if h in test]
        if shared:
            examples = ", ".join(f"{name} = test image {i}" for name, i in shared[:5])
            raise DataLeakageError(
                f"{test_name} shares {len(shared)} image(s) with the training images of adapter {adapter} ({examples}"
                f"{', ...' if len(shared) > 5 else ''}); evaluating on them would measure memorisation. Remove them from "
                "the test set, or train the adapter on images outside it"
            )
        checked.append(str(Path(adapter)))
    return {"adapters": checked, "train_images": n_train, "test_images": len(test), "shared": 0}
