"""``mixed_loader``: a DataLoader over a real dataset and a synthetic cache, wired correctly."""

from __future__ import annotations

import os
from typing import Any, Union

from torch.utils.data import DataLoader

from synthaug.cache.store import SyntheticCache
from synthaug.mixing.dataset import MixedDataset
from synthaug.mixing.sampler import Ratio, RatioBatchSampler

__all__ = ["mixed_loader", "DATASET_KWARGS", "SAMPLER_KWARGS"]

DATASET_KWARGS = ("transform", "synthetic_transform", "target_transform", "on_corrupt", "soft_targets", "mark_synthetic", "image_column", "label_column")
SAMPLER_KWARGS = (
    "shuffle",
    "seed",
    "drop_last",
    "num_replicas",
    "rank",
    "cache_shard",
    "classes",
    "on_exhausted",
    "max_reuse",
    "wait_timeout",
    "batches_per_epoch",
    "consumer",
    "cursor_interval",
    "history",
)
_REFUSED = ("batch_sampler", "sampler", "batch_size")


def mixed_loader(
    real: Any,
    cache: Union[SyntheticCache, str, os.PathLike],
    batch_size: int,
    synthetic_ratio: Ratio,
    **kwargs: Any,
) -> DataLoader:
    """A DataLoader of batches mixing ``real`` and ``cache`` at ``synthetic_ratio`` (exactly).

    Builds ``MixedDataset(real, cache, ...)`` and ``RatioBatchSampler(mixed, batch_size=...,
    synthetic_ratio=..., ...)`` and passes the sampler as the DataLoader's ``batch_sampler``.
    Keyword arguments are routed by name: ``transform``, ``synthetic_transform``,
    ``target_transform``, ``on_corrupt``, ``soft_targets``, ``mark_synthetic``, ``image_column``, ``label_column`` go to
    :class:`MixedDataset`; ``shuffle``, ``seed``,
    ``drop_last``, ``num_replicas``, ``rank``, ``classes``, ``on_exhausted``, ``max_reuse``,
    ``wait_timeout``, ``batches_per_epoch``, ``consumer``, ``cursor_interval``, ``history``,
    ``cache_shard`` to
    :class:`RatioBatchSampler`; everything else (``num_workers``, ``pin_memory``,
    ``persistent_workers``, ``collate_fn``, ``prefetch_factor``, ...) to the DataLoader.

    The sampler is ``loader.batch_sampler`` (call its ``set_epoch`` each epoch, read its
    ``stats()``), the dataset ``loader.dataset``.

    Raises:
        ValueError: ``sampler``/``batch_sampler``/``batch_size`` among the DataLoader arguments
            (the mixing sampler is the batch sampler), and every error of the two classes.
    """
    for name in _REFUSED:
        if name in kwargs:
            raise ValueError(f"mixed_loader builds the batch sampler itself; remove {name}= (batch_size is the third argument)")
    dataset_kwargs = {k: kwargs.pop(k) for k in DATASET_KWARGS if k in kwargs}
    sampler_kwargs = {k: kwargs.pop(k) for k in SAMPLER_KWARGS if k in kwargs}
    mixed = MixedDataset(real, cache, **dataset_kwargs)
    sampler = RatioBatchSampler(mixed, batch_size=batch_size, synthetic_ratio=synthetic_ratio, **sampler_kwargs)
    return DataLoader(mixed, batch_sampler=sampler, **kwargs)
