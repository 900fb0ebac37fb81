"""The fidelity gate: keep a generated image only when a classifier trained on real images gives
its intended class a probability within ``[low, high]``.

ALIA (Dunlap et al. 2023) and SaSPA (Michaeli & Fried 2024) filter generated images this way with a
classifier trained on the real data: ``low`` drops images that no longer show their class
(``score < low``), ``high < 1`` drops images so easy for the classifier that they add little
(``score > high``; e.g. near-copies of the real images). The classifier is a
:class:`~synthaug.classifier.ReferenceClassifier` file, so a gate travels to a worker process as
its JSON :attr:`FidelityGate.spec` and is rebuilt there with :meth:`FidelityGate.from_spec`.

Where the gate acts: :func:`synthaug.generation.fill.generate_into` scores every generated image
(after the caller's ``transform``, i.e. as it would be stored), appends only the accepted ones and
writes ``meta["gate_score"]`` (the probability of the intended class) and ``meta["gate"]`` (the
gate's spec, with the classifier file's SHA-256) into their provenance. ``fill_cache``, the
:class:`~synthaug.generation.worker.GenerationWorker`, ``synthaug generate`` and ``synthaug worker``
take a gate; seeds under a gate follow the counter rule of :mod:`synthaug.generation.fill`.

A gate that accepts almost nothing would make a writer generate forever:
:func:`check_acceptance` stops it (``RuntimeError`` naming the acceptance rate) once fewer than
:data:`MIN_ACCEPTANCE` of at least :data:`ACCEPTANCE_PATIENCE` generated images passed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from synthaug.classifier import ReferenceClassifier

__all__ = ["ACCEPTANCE_PATIENCE", "MIN_ACCEPTANCE", "FidelityGate", "check_acceptance"]

#: a writer stops when fewer than this share of the images it generated passed the gate ...
MIN_ACCEPTANCE = 0.01
#: ... once it has generated at least this many
ACCEPTANCE_PATIENCE = 300


def _resolve_label(ref: ReferenceClassifier, label: Union[int, str]) -> int:
    """The index of ``label`` among the classifier's classes: by name first (exact, then
    ignoring case), then as an index (an int, or a string of digits as a command line gives)."""
    classes = list(ref.classes)
    if isinstance(label, str):
        if label in classes:
            return classes.index(label)
        lowered = [c.lower() for c in classes]
        if label.lower() in lowered:
            return lowered.index(label.lower())
        if not label.strip().isdigit():
            raise ValueError(f"label {label!r} is not one of the gate classifier's classes {classes}")
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        raise ValueError(f"label must be a class name or index of the gate classifier, got {label!r}")
    if not 0 <= int(label) < len(classes):
        raise ValueError(f"label {label} is outside the gate classifier's {len(classes)} classes {classes}")
    return int(label)


class FidelityGate:
    """Accept an image iff ``low <= p(label | image) <= high`` under a reference classifier.

    Args:
        classifier: the path of a :class:`~synthaug.classifier.ReferenceClassifier` file
            (``ReferenceClassifier.save``), or a loaded one that was saved (it needs its file to
            travel to a worker process and to be named in the records' provenance).
        label: the class the images are meant to be: a name of the classifier's classes (looked
            up first) or an index into them.
        low: the smallest accepted probability of ``label``, in [0, 1] (default 0.5: the
            classifier must find the class at least as likely as all others together).
        high: the largest accepted probability, in [low, 1] (default 1.0: no upper cut).
        device: torch device of the classifier (default: cpu).

    Raises:
        FileNotFoundError / ValueError: no such file, not a reference classifier, an unknown
            label, or bounds outside ``0 <= low <= high <= 1``.
    """

    def __init__(self, classifier: Union[str, os.PathLike, ReferenceClassifier], *, label: Union[int, str], low: float = 0.5,
                 high: float = 1.0, device: Optional[str] = None) -> None:
        for name, value in (("low", low), ("high", high)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        if float(low) > float(high):
            raise ValueError(f"low ({low}) must be <= high ({high}): no image could pass")
        if isinstance(classifier, ReferenceClassifier):
            if classifier.path is None or classifier.sha256 is None:
                raise ValueError("the gate's reference classifier has no file; save it first (ReferenceClassifier.save(path))")
            ref = classifier
            if device is not None:
                ref.model.to(device)
        elif isinstance(classifier, (str, os.PathLike)):
            ref = ReferenceClassifier.load(classifier, device=device or "cpu")
        else:
            raise ValueError(f"classifier must be a reference classifier file's path, got {type(classifier).__name__}")
        self.reference = ref
        self.label = _resolve_label(ref, label)
        self.low, self.high = float(low), float(high)
        self.device = None if device is None else str(device)

    @property
    def label_name(self) -> str:
        return self.reference.classes[self.label]

    @property
    def spec(self) -> Dict[str, Any]:
        """JSON-able description: ``classifier`` (absolute path), ``sha256`` (of that file),
        ``label`` (index), ``label_name``, ``low``, ``high``, ``device``; what
        :meth:`from_spec` takes and what each accepted record's ``meta["gate"]`` holds."""
        return {
            "classifier": str(Path(self.reference.path).resolve()),
            "sha256": self.reference.sha256,
            "label": self.label,
            "label_name": self.label_name,
            "low": self.low,
            "high": self.high,
            "device": self.device,
        }

    @classmethod
    def from_spec(cls, spec: Dict[str, Any], *, device: Optional[str] = None) -> "FidelityGate":
        """Rebuild a gate from its :attr:`spec` (``device`` overrides the spec's).

        Raises:
            ValueError: a malformed spec, or a classifier file whose SHA-256 differs from the
                spec's (the file was replaced since the gate was made).
        """
        if not isinstance(spec, dict) or "classifier" not in spec or "label" not in spec:
            raise ValueError(f"a gate spec is a dict with 'classifier' and 'label' (FidelityGate.spec), got {spec!r}")
        gate = cls(spec["classifier"], label=spec["label"], low=spec.get("low", 0.5), high=spec.get("high", 1.0),
                   device=device if device is not None else spec.get("device"))
        if spec.get("sha256") and spec["sha256"] != gate.reference.sha256:
            raise ValueError(
                f"gate classifier {spec['classifier']} changed since the gate was made (SHA-256 {gate.reference.sha256[:12]}..., "
                f"the gate names {spec['sha256'][:12]}...); make the gate again from the file as it is now"
            )
        if spec.get("label_name") not in (None, gate.label_name):
            raise ValueError(f"gate label {spec['label']} is {gate.label_name!r} in {spec['classifier']}, but the spec says {spec['label_name']!r}")
        return gate

    def scores(self, images: Sequence) -> np.ndarray:
        """The classifier's probability of the gate's label for each image (uint8 H×W×C arrays,
        an N×H×W×C array, PIL images; any size, 1 or 3 channels): float64, shape (N,)."""
        if len(images) == 0:
            return np.zeros(0, np.float64)
        return self.reference.probabilities(images)[:, self.label].astype(np.float64)

    def filter(self, images: Sequence) -> Tuple[np.ndarray, np.ndarray]:
        """``(keep, scores)``: a bool mask, True where ``low <= score <= high``, and the scores."""
        s = self.scores(images)
        return (s >= self.low) & (s <= self.high), s

    def describe(self) -> str:
        return f"p({self.label_name!r}) in [{self.low:g}, {self.high:g}] under {Path(self.reference.path).name}"

    def __repr__(self) -> str:
        return f"FidelityGate({str(self.reference.path)!r}, label={self.label_name!r}, low={self.low:g}, high={self.high:g})"


def check_acceptance(accepted: int, generated: int, gate: Optional[FidelityGate] = None) -> None:
    """Raise ``RuntimeError`` when at least :data:`ACCEPTANCE_PATIENCE` images were generated and
    fewer than :data:`MIN_ACCEPTANCE` of them passed the gate (the message names the rate)."""
    if generated < ACCEPTANCE_PATIENCE or accepted >= MIN_ACCEPTANCE * generated:
        return
    what = f" ({gate.describe()})" if gate is not None else ""
    raise RuntimeError(
        f"the fidelity gate{what} accepted {accepted} of {generated} generated images ({accepted / generated:.2%}), "
        f"below the {MIN_ACCEPTANCE:.0%} a writer needs to go on: the generator rarely makes what the classifier takes for "
        "the intended class. Check the gate's label, lower its low bound, or improve the generator."
    )
