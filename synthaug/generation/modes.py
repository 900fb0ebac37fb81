"""What the generation modes share across backends: strength sets, translation sources and
their labels, and the checks of the mode settings.

* **Strength sets** (img2img, translate; DA-Fusion): ``strength`` is one float or a list of floats
  in (0, 1]. With a list, each image's strength is drawn from it by its own per-image seed
  (:func:`strength_for_seed`), so ``generate(1, seed + i)`` remakes image ``i`` with its strength;
  the draw uses a random stream of its own, not ``seed % len``, which would tie the strength to the
  source image (chosen as ``seed % len(sources)``).
* **Translation** (Diff-Mix): SDEdit from real images of *other* classes into the generator's
  class. :func:`translate_sources` reads the sources (a torchvision ``ImageFolder`` layout, or a
  list of images with their classes) and :func:`translate_label` gives each image its label:
  hard, or soft with weight ``s**gamma`` on the target class and ``1 - s**gamma`` on the source's.

Nothing here imports torch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from synthaug.cache.codec import SoftLabel
from synthaug.data.folders import list_image_files

__all__ = [
    "FEEDBACK_OBJECTIVES",
    "MODES",
    "STRENGTH_STREAM",
    "check_mode_settings",
    "class_index",
    "mode_overrides",
    "parse_strengths",
    "source_provenance",
    "strength_for_seed",
    "strength_groups",
    "translate_label",
    "translate_sources",
]

#: every generation mode; the pixel DDPM has them all, Stable Diffusion all but "feedback"
MODES = ("txt2img", "img2img", "translate", "feedback")
#: what feedback-guided sampling maximizes: the reference classifier's predictive entropy, or
#: its cross-entropy loss for the generator's class
FEEDBACK_OBJECTIVES = ("entropy", "loss")
#: the second entropy word of the strength draw: ``default_rng([seed, STRENGTH_STREAM])``
STRENGTH_STREAM = 0x5354524E  # "STRN"


def parse_strengths(strength: Union[float, Sequence[float]]) -> Tuple[float, ...]:
    """``strength`` (a number or a non-empty sequence of numbers, each in (0, 1]) as a tuple of
    floats. Repeating a value makes it proportionally more likely to be drawn."""
    if isinstance(strength, (str, bytes)):
        raise ValueError(f"strength must be a number in (0, 1] or a list of such numbers, got {strength!r}")
    values = list(strength) if isinstance(strength, (list, tuple, np.ndarray)) else [strength]
    if not values:
        raise ValueError("strength is an empty list; give one number in (0, 1] or several")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not 0.0 < float(v) <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {v!r}; it is the share of the denoising re-run from the source image")
        out.append(float(v))
    return tuple(out)


def strength_for_seed(seed: int, strengths: Sequence[float]) -> float:
    """The strength of the image with per-image ``seed``: the only one, or one drawn uniformly
    from ``strengths`` by ``np.random.default_rng([seed, STRENGTH_STREAM])``."""
    if len(strengths) == 1:
        return float(strengths[0])
    return float(strengths[int(np.random.default_rng([int(seed), STRENGTH_STREAM]).integers(len(strengths)))])


def strength_groups(seeds: Sequence[int], strengths: Optional[Sequence[float]]) -> List[Tuple[Optional[float], List[int]]]:
    """``[(strength, positions in seeds), ...]``: the images of one sampler call grouped by their
    strength, groups in order of first appearance, positions ascending. ``strengths=None`` (a mode
    without strength) gives one group of every position with strength ``None``."""
    if not strengths:
        return [(None, list(range(len(seeds))))] if len(seeds) else []
    groups: dict = {}
    for i, s in enumerate(seeds):
        groups.setdefault(strength_for_seed(s, strengths), []).append(i)
    return list(groups.items())


def class_index(cls: Union[int, str], label_names: Optional[Sequence[str]], *, what: str = "source class") -> int:
    """A class of the generator's label space, by name (one of ``label_names``) or by index (an
    int, or a string of digits that is not a class name, e.g. a folder ``3/``)."""
    names = list(label_names or [])
    if isinstance(cls, bool):
        raise ValueError(f"{what} {cls!r} is not a class name or index")
    if isinstance(cls, (int, np.integer)):
        idx = int(cls)
    elif isinstance(cls, str) and cls in names:
        idx = names.index(cls)
    elif isinstance(cls, str) and cls.strip().isdigit():
        idx = int(cls.strip())
    else:
        known = f"one of {names} or an index" if names else "a class index (this model has no class names)"
        raise ValueError(f"{what} {cls!r} is not a class of this model: give {known}")
    if idx < 0 or (names and idx >= len(names)):
        raise ValueError(f"{what} {cls!r} is outside the model's {len(names)} classes" if names else f"{what} {cls!r} is not a class index >= 0")
    return idx


def translate_sources(
    source_images: Any,
    source_classes: Optional[Sequence[Union[int, str]]],
    *,
    label: int,
    label_names: Optional[Sequence[str]],
) -> Tuple[List[Any], List[int]]:
    """The sources of translate mode and their classes: ``(images, classes)``.

    Args:
        source_images: a folder in torchvision ``ImageFolder`` layout (``DIR/<class>/*.png``; a
            subfolder is named by a class name or index; files directly in ``DIR`` are ignored),
            or a list of images (files, PIL images or arrays) with ``source_classes``.
        source_classes: one class (name or index) per image of a list; not with a folder.
        label, label_names: the generator's class and label space.

    Returns:
        the images as the backend's ``_load_sources`` takes them (files of a folder sorted by
        class folder, then file name) and their class indices.

    Raises:
        ValueError: a missing or mismatched ``source_classes``, a folder without class
            subfolders or with an empty one, an unknown class, or a source of the target class.
    """
    if source_images is None:
        raise ValueError("mode='translate' needs source_images: a folder DIR/<class>/*.png, or a list of images with source_classes")
    if isinstance(source_images, (str, os.PathLike)):
        folder = Path(source_images)
        if source_classes is not None:
            raise ValueError(f"the classes of translate sources in folder {folder} are its subfolders; drop source_classes (it is for a list of images)")
        if not folder.is_dir():
            raise FileNotFoundError(f"translate source folder {folder} does not exist or is not a directory")
        subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not subdirs:
            raise ValueError(f"translate source folder {folder} has no class subfolders; lay it out as {folder}/<class name or index>/*.png (torchvision ImageFolder)")
        images: List[Any] = []
        classes: List[int] = []
        for sub in subdirs:
            cls = class_index(sub.name, label_names, what=f"in {folder}, class folder")
            files = list_image_files(sub)
            if not files:
                raise ValueError(f"class folder {sub} holds no image files")
            images += files
            classes += [cls] * len(files)
    else:
        images = list(source_images)
        if source_classes is None:
            raise ValueError("a list of translate source images needs source_classes: one class (name or index) per image")
        if isinstance(source_classes, (str, bytes)) or len(source_classes) != len(images):
            n = "a string" if isinstance(source_classes, (str, bytes)) else f"{len(source_classes)} classes"
            raise ValueError(f"source_classes must list one class per source image: {len(images)} images, {n}")
        classes = [class_index(c, label_names, what=f"source_classes[{i}]") for i, c in enumerate(source_classes)]
    if not images:
        raise ValueError("source_images holds no images")
    same = [i for i, c in enumerate(classes) if c == int(label)]
    if same:
        name = f" ({label_names[label]})" if label_names and int(label) < len(label_names) else ""
        first = images[same[0]]
        where = f" e.g. {first}" if isinstance(first, (str, os.PathLike)) else f" e.g. source {same[0]}"
        raise ValueError(
            f"translate makes class {label}{name} from images of other classes, but {len(same)} source images are of that class"
            f"{where}; leave them out (use mode='img2img' for images of the class itself)"
        )
    return images, classes


def translate_label(label: int, source_class: int, strength: float, gamma: Optional[float]) -> Union[int, SoftLabel]:
    """The label of an image translated from ``source_class`` into ``label`` at ``strength``
    ``s``: ``label`` when ``gamma`` is ``None``, else ``SoftLabel({label: s**gamma,
    source_class: 1 - s**gamma})`` (just ``{label: 1.0}`` at ``s = 1``)."""
    if gamma is None:
        return int(label)
    weight = float(strength) ** float(gamma)
    if weight >= 1.0:
        return SoftLabel({int(label): 1.0})
    return SoftLabel({int(label): weight, int(source_class): 1.0 - weight})


def source_provenance(
    seed: int,
    *,
    mode: str,
    label: int,
    strengths: Sequence[float],
    source_hashes: Sequence[str],
    source_classes: Sequence[int],
    label_names: Optional[Sequence[str]],
    soft_label_gamma: Optional[float],
) -> Tuple[Dict[str, Any], Union[int, SoftLabel]]:
    """``(meta keys, label)`` of the image with per-image ``seed`` in img2img or translate mode:
    its source (``seed % len(sources)``) and strength, and in translate mode the source's class and
    the image's (soft) label (:func:`translate_label`)."""
    k = int(seed) % len(source_hashes)
    strength = strength_for_seed(seed, strengths)
    meta: Dict[str, Any] = {"strength": strength, "source_image": source_hashes[k], "source_index": k}
    if mode != "translate":
        return meta, int(label)
    c = source_classes[k]
    meta.update(source_class=c, source_class_name=label_names[c] if label_names else None, soft_label_gamma=soft_label_gamma)
    return meta, translate_label(label, c, strength, soft_label_gamma)


def mode_overrides(
    mode: str,
    strength: Union[float, Sequence[float]],
    source_classes: Optional[Sequence[Union[int, str]]],
    soft_label_gamma: Optional[float],
) -> Dict[str, Any]:
    """The spec overrides of the mode settings that were given (JSON values): ``strength`` in
    img2img and translate mode (a float as given, a list as a list of floats),
    ``source_classes`` and ``soft_label_gamma`` when set."""
    out: Dict[str, Any] = {}
    if mode in ("img2img", "translate"):
        out["strength"] = list(parse_strengths(strength)) if isinstance(strength, (list, tuple, np.ndarray)) else strength
    if source_classes is not None:
        out["source_classes"] = [c if isinstance(c, str) else int(c) for c in source_classes]
    if soft_label_gamma is not None:
        out["soft_label_gamma"] = float(soft_label_gamma)
    return out


def check_mode_settings(
    mode: str,
    *,
    source_images: Any = None,
    source_classes: Any = None,
    soft_label_gamma: Optional[float] = None,
    feedback_classifier: Any = None,
    feedback_scale: Optional[float] = None,
    feedback_objective: Optional[str] = None,
    modes: Sequence[str] = MODES,
) -> None:
    """Refuse a setting that does not belong to ``mode`` (before any model is loaded).

    Raises:
        ValueError: an unknown mode, or a setting of another mode.
    """
    if mode not in modes:
        if mode == "feedback":
            raise ValueError(
                "mode='feedback' (classifier-guided sampling) is available for the pixel-DDPM backend only: it steers "
                "each step through the model's own x0 estimate in pixel space"
            )
        raise ValueError(f"mode must be one of {', '.join(repr(m) for m in modes)}, got {mode!r}")
    if source_images is not None and mode not in ("img2img", "translate"):
        raise ValueError(f"source_images are used only with mode='img2img' or 'translate', not {mode!r}")
    if mode in ("img2img", "translate") and source_images is None:
        raise ValueError(f"mode={mode!r} needs source_images (a folder, a list of image files, or images)")
    if source_classes is not None and mode != "translate":
        raise ValueError("source_classes applies to mode='translate' only")
    if soft_label_gamma is not None:
        if mode != "translate":
            raise ValueError("soft_label_gamma applies to mode='translate' only (the soft label mixes the target class with the source image's)")
        if not _number(soft_label_gamma) or not soft_label_gamma > 0:
            raise ValueError(f"soft_label_gamma must be a number > 0, got {soft_label_gamma!r}")
    given = {"feedback_classifier": feedback_classifier, "feedback_scale": feedback_scale, "feedback_objective": feedback_objective}
    stray = [k for k, v in given.items() if v is not None]
    if stray and mode != "feedback":
        raise ValueError(f"{', '.join(stray)} applies to mode='feedback' only")
    if mode == "feedback":
        if feedback_classifier is None:
            raise ValueError(
                "mode='feedback' needs feedback_classifier: the path of a reference classifier (synthaug.classifier.ReferenceClassifier.save)"
            )
        if feedback_scale is not None and (not _number(feedback_scale) or not feedback_scale >= 0):
            raise ValueError(f"feedback_scale must be a number >= 0 (0 = plain sampling), got {feedback_scale!r}")
        if feedback_objective is not None and feedback_objective not in FEEDBACK_OBJECTIVES:
            raise ValueError(f"feedback_objective must be one of {FEEDBACK_OBJECTIVES}, got {feedback_objective!r}")


def _number(value: Any) -> bool:
    """A finite real number (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, (int, float, np.number)) and math.isfinite(float(value))
