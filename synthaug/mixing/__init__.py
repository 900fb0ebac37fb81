"""Mixing real and synthetic items at an exact ratio: ``MixedDataset``, ``RatioBatchSampler``,
``mixed_loader``, ``AdaptiveRatio``. Imports torch (not diffusers, peft or transformers)."""

from synthaug.mixing.adaptive import AdaptiveRatio
from synthaug.mixing.columns import ColumnDataset
from synthaug.mixing.dataset import MixedDataset
from synthaug.mixing.index import SyntheticIndex, is_synthetic
from synthaug.mixing.loader import mixed_loader
from synthaug.mixing.ratio import EpochPlan, plan_epoch
from synthaug.mixing.sampler import RatioBatchSampler

__all__ = ["AdaptiveRatio", "ColumnDataset", "MixedDataset", "RatioBatchSampler", "SyntheticIndex", "is_synthetic", "mixed_loader", "EpochPlan", "plan_epoch"]
