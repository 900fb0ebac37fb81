"""synthaug: LoRA-adapted diffusion models as a streaming source of rare-class training images.

The top-level names are loaded on first use, so ``import synthaug`` (e.g. to read a cache in a
DataLoader worker) imports neither diffusers, peft nor transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from synthaug.version import __version__

# public name -> module that defines it
_EXPORTS = {
    "SyntheticCache": "synthaug.cache.store",
    "Record": "synthaug.cache.codec",
    "Encoding": "synthaug.cache.codec",
    "SynthaugError": "synthaug.errors",
    "CorruptRecordError": "synthaug.errors",
    "CacheFormatError": "synthaug.errors",
    "SyntheticExhaustedError": "synthaug.errors",
    "GenerationWorkerError": "synthaug.errors",
    "load_generator": "synthaug.generation.loading",
    "generator_from_spec": "synthaug.generation.loading",
    "Generator": "synthaug.generation.base",
    "GeneratedBatch": "synthaug.generation.base",
    "GenerationWorker": "synthaug.generation.worker",
    "FidelityGate": "synthaug.generation.gate",
    "SoftLabel": "synthaug.cache.codec",
    "finetune_lora": "synthaug.finetune",
    "FinetuneConfig": "synthaug.finetune.common",
    "image_quality_report": "synthaug.evaluation.quality",
    "write_quality_report": "synthaug.evaluation.quality",
    "MixedDataset": "synthaug.mixing.dataset",
    "ColumnDataset": "synthaug.mixing.columns",
    "RatioBatchSampler": "synthaug.mixing.sampler",
    "AdaptiveRatio": "synthaug.mixing.adaptive",
    "SyntheticIndex": "synthaug.mixing.index",
    "mixed_loader": "synthaug.mixing.loader",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'synthaug' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover
    from synthaug.cache.codec import Encoding, Record
    from synthaug.cache.store import SyntheticCache
    from synthaug.errors import (
        CacheFormatError,
        CorruptRecordError,
        GenerationWorkerError,
        SynthaugError,
        SyntheticExhaustedError,
    )
    from synthaug.finetune import finetune_lora
    from synthaug.finetune.common import FinetuneConfig
    from synthaug.evaluation.quality import image_quality_report, write_quality_report
    from synthaug.generation.base import GeneratedBatch, Generator
    from synthaug.generation.loading import generator_from_spec, load_generator
    from synthaug.generation.worker import GenerationWorker
    from synthaug.generation.gate import FidelityGate
    from synthaug.cache.codec import SoftLabel
    from synthaug.mixing.dataset import MixedDataset
    from synthaug.mixing.index import SyntheticIndex
    from synthaug.mixing.loader import mixed_loader
    from synthaug.mixing.sampler import RatioBatchSampler
    from synthaug.mixing.adaptive import AdaptiveRatio
