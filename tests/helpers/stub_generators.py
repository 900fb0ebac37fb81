"""Generators without a model, for fast tests of the worker's protocol (no torch import, so a
spawned worker starts in about a second).

Both travel to a worker process through their spec's ``factory`` key.

Added for the fidelity gate: ``FashionGenerator`` (real Fashion-MNIST test images by seed; it
reads the dataset, with torch) and ``fashion_reference_classifier`` (a tiny reference classifier).
"""

import os
import time
from typing import Any, Dict, Optional

import numpy as np

from synthaug.generation.base import GeneratedBatch, Generator, per_image_seeds

__all__ = ["PatternGenerator", "FailingGenerator", "StampGenerator", "pattern_image", "stamp_of",
           "FashionGenerator", "fashion_mnist_arrays", "fashion_reference_classifier"]


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


# ---------------------------------------------------------------------------------- real images by seed
_FASHION: Dict[bool, Any] = {}


def fashion_mnist_arrays(train: bool = False):
    """Fashion-MNIST images (uint8 N×28×28) and labels of one split, read once per process."""
    from synthaug.data.fashion_mnist import FashionMNIST

    if train not in _FASHION:
        ds = FashionMNIST(train=train)
        _FASHION[train] = (ds.data.numpy(), ds.targets.numpy())
    return _FASHION[train]


class FashionGenerator(Generator):
    """Real Fashion-MNIST *test* images chosen by per-image seed: seed ``s`` shows, with
    probability ``off_share``, an image of class ``off_class``, else one of class ``label`` (the
    choice and the image are drawn by ``default_rng(s)``); every image is labelled ``label``. A
    "Shirt generator" that also makes trousers, for gates and fidelity reports. ``meta`` has
    ``seed`` and ``shown_class`` (the class the image really is). Label names: Fashion-MNIST's.
    ``self.seeds`` lists every per-image seed this instance made, in order."""

    def __init__(self, *, label: int = 6, off_class: int = 1, off_share: float = 0.5, device: Optional[str] = None,
                 batch_size: Optional[int] = None) -> None:
        from synthaug.data.fashion_mnist import FASHION_MNIST_CLASSES

        self.label, self.off_class, self.off_share = int(label), int(off_class), float(off_share)
        self.label_names = list(FASHION_MNIST_CLASSES)
        self.seeds: list = []

    @property
    def spec(self) -> Dict[str, Any]:
        overrides = {"label": self.label, "off_class": self.off_class, "off_share": self.off_share}
        return {"factory": "tests.helpers.stub_generators:FashionGenerator", "source": "stub:fashion", "overrides": overrides}

    def generate(self, n: int, seed: int) -> GeneratedBatch:
        x, y = fashion_mnist_arrays(train=False)
        seeds = per_image_seeds(n, seed)
        self.seeds.extend(seeds)
        images = np.zeros((n, 28, 28, 1), np.uint8)
        metas = []
        for i, s in enumerate(seeds):
            rng = np.random.default_rng(s)
            shown = self.off_class if rng.random() < self.off_share else self.label
            pick = np.nonzero(y == shown)[0]
            images[i, :, :, 0] = x[pick[rng.integers(len(pick))]]
            metas.append({"source": "stub:fashion", "seed": s, "shown_class": int(shown), "pid": os.getpid()})
        return GeneratedBatch(images=images, labels=[self.label] * n, meta=metas)


_REFERENCES: Dict[Any, Any] = {}


def fashion_reference_classifier(folder, classes=("Trouser", "Shirt", "Bag"), per_class: int = 100, steps: int = 80):
    """The path of a tiny :class:`~synthaug.classifier.ReferenceClassifier` trained on the first
    ``per_class`` Fashion-MNIST *training* images of each of ``classes`` (saved in ``folder`` as
    ``reference.pt``; trained once per process and set of arguments, a few seconds on one thread).
    Without augmentation: at 80 steps an augmented classifier is still undertrained (it kept 24% of
    real test trousers as shirts, against 4.5% without), and 100 images a class are not few enough
    to be memorized."""
    from pathlib import Path

    from synthaug.classifier import train_reference_classifier
    from synthaug.data.fashion_mnist import FASHION_MNIST_CLASSES

    key = (tuple(classes), per_class, steps)
    if key in _REFERENCES and Path(_REFERENCES[key]).is_file():
        return _REFERENCES[key]
    x, y = fashion_mnist_arrays(train=True)
    idx = np.concatenate([np.nonzero(y == FASHION_MNIST_CLASSES.index(c))[0][:per_class] for c in classes])
    labels = np.asarray([list(classes).index(FASHION_MNIST_CLASSES[int(t)]) for t in y[idx]])
    ref = train_reference_classifier(x[idx][:, :, :, None], labels, list(classes), steps=steps, batch_size=32, augment=False,
                                     trained_on=f"fashion-mnist train, first {per_class} of each of {list(classes)}")
    _REFERENCES[key] = ref.save(Path(folder) / "reference.pt")
    return _REFERENCES[key]
