"""Generators without a model, for fast tests of the worker's protocol (no torch import, so a
spawned worker starts in about a second).

Both travel to a worker process through their spec's ``factory`` key.
"""

import os
import time
from typing import Any, Dict, Optional

import numpy as np

from synthaug.generation.base import GeneratedBatch, Generator, per_image_seeds

__all__ = ["PatternGenerator", "FailingGenerator", "StampGenerator", "pattern_image", "stamp_of"]


def pattern_image(seed: int, size: int = 8) -> np.ndarray:
    """The image a PatternGenerator makes for per-image seed ``seed`` (uint8 size×size×1)."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 1), dtype=np.uint8)


class PatternGenerator(Generator):
    """Random-pattern images from per-image seeds; ``delay`` seconds per ``generate`` call."""

    def __init__(self, *, size: int = 8, label: int = 0, delay: float = 0.0, device: Optional[str] = None, batch_size: Optional[int] = None) -> None:
        self.size, self.label, self.delay, self.device = int(size), int(label), float(delay), device
        self.calls = 0

    @property
    def spec(self) -> Dict[str, Any]:
        overrides = {"size": self.size, "label": self.label, "delay": self.delay}
        return {"factory": "tests.helpers.stub_generators:PatternGenerator", "source": "stub:pattern", "overrides": overrides}

    def generate(self, n: int, seed: int) -> GeneratedBatch:
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        seeds = per_image_seeds(n, seed)
        images = np.stack([pattern_image(s, self.size) for s in seeds]) if n else np.zeros((0, self.size, self.size, 1), np.uint8)
        metas = [{"source": "stub:pattern", "overrides": self.spec["overrides"], "seed": s, "pid": os.getpid()} for s in seeds]
        return GeneratedBatch(images=images, labels=[self.label] * n, meta=metas)


class FailingGenerator(PatternGenerator):
    """Like PatternGenerator, but ``generate`` raises ``RuntimeError(message)`` on call number
    ``fail_on`` (1-based)."""

    def __init__(self, *, message: str = "deliberate failure", fail_on: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.message, self.fail_on = message, int(fail_on)

    @property
    def spec(self) -> Dict[str, Any]:
        spec = super().spec
        spec["factory"] = "tests.helpers.stub_generators:FailingGenerator"
        spec["overrides"].update(message=self.message, fail_on=self.fail_on)
        return spec

    def generate(self, n: int, seed: int) -> GeneratedBatch:
        if self.calls + 1 >= self.fail_on:
            self.calls += 1
            raise RuntimeError(self.message)
        return super().generate(n, seed)


def stamp_of(image) -> int:
    """The seed a StampGenerator wrote into an image (H×W, H×W×1 or 1×H×W, array or tensor)."""
    a = np.asarray(image)
    a = a.reshape(a.shape[-2], a.shape[-1]) if a.ndim == 3 and a.shape[0] == 1 else (a[..., 0] if a.ndim == 3 else a)
    return int.from_bytes(bytes(a[0, :8].astype(np.uint8)), "big")


class StampGenerator(Generator):
    """28×28 gray images whose first 8 pixels hold the per-image seed (``stamp_of`` reads it
    back) and whose label is ``seed % classes``, so a reader can tell exactly which record it
    got and whether its label belongs to it. ``label_names`` ``c0, c1, ...``; ``delay`` seconds
    per ``generate`` call."""

    def __init__(self, *, classes: int = 10, delay: float = 0.0, names: bool = True, device: Optional[str] = None, batch_size: Optional[int] = None) -> None:
        self.classes, self.delay, self.names = int(classes), float(delay), bool(names)
        self.label_names = [f"c{i}" for i in range(self.classes)] if self.names else None

    @property
    def spec(self) -> Dict[str, Any]:
        overrides = {"classes": self.classes, "delay": self.delay, "names": self.names}
        return {"factory": "tests.helpers.stub_generators:StampGenerator", "source": "stub:stamp", "overrides": overrides}

    def generate(self, n: int, seed: int) -> GeneratedBatch:
        if self.delay:
            time.sleep(self.delay)
        seeds = per_image_seeds(n, seed)
        images = np.zeros((n, 28, 28, 1), np.uint8)
        for i, s in enumerate(seeds):
            images[i, 0, :8, 0] = np.frombuffer(int(s).to_bytes(8, "big"), np.uint8)
            images[i, 1:, :, 0] = (s * 37) % 251  # some content below the stamp
        labels = [s % self.classes for s in seeds]
        metas = [{"source": "stub:stamp", "seed": s, "pid": os.getpid()} for s in seeds]
        return GeneratedBatch(images=images, labels=labels, meta=metas)
