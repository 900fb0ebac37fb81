"""Training arms of the study, built the same way for the demo and the sweep.

* ``real_only``: the imbalanced real training set, shuffled.
* ``oversampled@r``: the matched-cardinality control. The real rare images are put in a small
  LMDB cache of their own and mixed in by the *same* ``RatioBatchSampler`` at the same ratio as
  the synthetic arm, so every batch carries exactly as many extra rare-class draws as the
  synthetic arm's batch does, only repeated real images instead of generated ones.
* ``classic_aug@r``: the same, with standard torchvision augmentation of those repeated images.
* ``synthetic@r``: generated rare-class images from the cache, mixed at ratio ``r``.
* ``adaptive``: the same, at a ratio an :class:`~synthaug.mixing.adaptive.AdaptiveRatio` moves
  during training from a reading of the rare class on the real validation set, its log loss or
  AP (``train_and_evaluate(controller=..., controller_reward=...)``).

All arms train the same model for the same number of optimizer steps with the same batch size,
and are evaluated on the real held-out test set only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np

from synthaug.cache.store import SyntheticCache
from synthaug.data.transforms import WithTransform
from synthaug.classifier import build_classifier, predict, refit_last_layer, train_classifier
from synthaug.evaluation.metrics import multilabel_rare_metrics, rare_class_metrics
from synthaug.imaging import to_hwc_uint8
from synthaug.outputs import jsonable

__all__ = [
    "ArmResult",
    "mixed_arm_loader",
    "real_only_loader",
    "real_rare_cache",
    "train_and_evaluate",
]


def real_only_loader(real, *, batch_size: int, seed: int, transform: Callable, num_workers: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(WithTransform(real, transform), batch_size=batch_size, shuffle=True, generator=g, num_workers=num_workers)


def real_rare_cache(images: Sequence, label, path, *, label_names=None, indices: Optional[Sequence[int]] = None):
    """An LMDB cache holding the real rare images once each (the oversampled control's pool).

    ``label``: one class index for all, or one label per image (a list of indices for a
    multi-label image); ``indices``: where each image sits in its dataset (recorded in the meta;
    default 0, 1, ...)."""
    cache = SyntheticCache(path, label_names=label_names)
    if len(cache) == 0:
        arrays = [to_hwc_uint8(im) for im in images]
        where = range(len(arrays)) if indices is None else indices
        cache.append(arrays, label, [{"source": "real", "kind": "oversampled-real", "index": int(i)} for i in where])
    return cache


def mixed_arm_loader(
    real,
    cache,
    *,
    ratio: float,
    batch_size: int,
    seed: int,
    transform: Callable,
    synthetic_transform: Optional[Callable] = None,
    on_exhausted: str = "reuse",
    wait_timeout: float = 600.0,
    max_reuse: Optional[int] = None,
    consumer: Optional[str] = None,
    num_workers: int = 0,
    classes: Optional[Sequence] = None,
    soft_targets: bool = False,
    mark_synthetic: bool = False,
):
    """``(DataLoader, RatioBatchSampler)`` mixing ``cache`` into ``real`` at ``ratio``
    (``classes``: draw only records of these classes; ``soft_targets``, ``mark_synthetic``: as
    for :class:`~synthaug.mixing.dataset.MixedDataset`): the loader of
    :func:`synthaug.mixing.loader.mixed_loader` and its sampler, ``loader.batch_sampler``."""
    from synthaug.mixing.loader import mixed_loader  # imports torch, which the arms import only when they run

    loader = mixed_loader(
        real,
        cache,
        batch_size,
        ratio,
        transform=transform,
        synthetic_transform=synthetic_transform,
        seed=seed,
        on_exhausted=on_exhausted,
        wait_timeout=wait_timeout,
        max_reuse=max_reuse,
        consumer=consumer,
        classes=classes,
        num_workers=num_workers,
        soft_targets=soft_targets,
        mark_synthetic=mark_synthetic,
    )
    return loader, loader.batch_sampler


@dataclass
class ArmResult:
    """One trained arm: its test metrics on real data, its metrics on the real validation set
    (``None`` without one), training summary and sampler counters."""

    name: str
    metrics: Dict[str, float]
    training: Dict[str, Any]
    sampler: Dict[str, Any] = field(default_factory=dict)
    rare_draws: int = 0
    val_metrics: Optional[Dict[str, float]] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"arm": self.name, "metrics": self.metrics, "val_metrics": self.val_metrics, "training": self.training,
                "sampler": self.sampler, "rare_draws": self.rare_draws}


def train_and_evaluate(
    name: str,
    loader,
    test_loader,
    *,
    rare: int,
    steps: int,
    seed: int,
    model: str = "small-cnn",
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: Optional[int] = None,
    lr: float = 1e-3,
    device: str = "cpu",
    sampler=None,
    progress: bool = True,
    multilabel: bool = False,
    val_loader=None,
    synthetic_weight: float = 1.0,
    refit_loader=None,
    refit_steps: int = 0,
    controller=None,
    controller_reward: str = "loss",
) -> ArmResult:
    """Train a fresh classifier (init seeded by ``seed``) for ``steps`` steps on ``loader``,
    counting rare-class draws, and evaluate it on ``test_loader`` (and ``val_loader``, the real
    validation set configurations are chosen on).

    ``multilabel``: targets are multi-hot vectors (``num_classes`` labels, BCE loss) and ``rare``
    is the finding's label index; the metrics are :func:`multilabel_rare_metrics`. Targets may be
    class-probability vectors (soft labels; an item counts as a rare draw when it gives the rare
    class any weight), and batches ``(x, y, is_synthetic)``, weighted by ``synthetic_weight``.
    ``refit_loader``, ``refit_steps``: afterwards re-fit the last layer on that real data,
    class-balanced (:func:`synthaug.classifier.refit_last_layer`). ``controller``: the loader's
    :class:`~synthaug.mixing.adaptive.AdaptiveRatio`; every ``controller.interval`` steps the
    rare class's ``controller_reward`` on ``val_loader`` (real images) is measured and observed:
    ``"loss"``, its one-vs-rest log loss (give the controller ``mode="min"``), or ``"ap"``, its
    average precision (``mode="max"``). The seconds spent on it are
    ``training["adaptive_eval_s"]``, the trajectory ``training["adaptive"]``."""
    import torch

    torch.manual_seed(seed)
    net = build_classifier(model, in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    rare_draws = [0]

    if controller is not None and val_loader is None:
        raise ValueError("an adaptive ratio reads its reward from real validation data: pass val_loader")
    if controller_reward not in ("loss", "ap"):
        raise ValueError(f"controller_reward must be 'loss' or 'ap', got {controller_reward!r}")
    eval_s = [0.0]

    def count(step, x, y):
        rare_draws[0] += int((y[:, rare] > 0).sum()) if y.ndim > 1 else int((y == rare).sum())
        if controller is not None and controller.due(step):
            t = time.time()
            controller.observe(step, {rare: reward(val_loader)})
            eval_s[0] += time.time() - t

    def evaluate(eval_loader) -> Dict[str, float]:
        y, pred, scores = predict(net, eval_loader, device=device, multilabel=multilabel)
        return multilabel_rare_metrics(y, scores, rare) if multilabel else rare_class_metrics(y, pred, rare, scores)

    def reward(eval_loader) -> float:
        """The controller's reading on real validation images (predict() leaves the net in train mode)."""
        if controller_reward == "ap":
            return evaluate(eval_loader)["rare_average_precision"]
        y, _, scores = predict(net, eval_loader, device=device, multilabel=multilabel)
        positive = (y[:, rare] > 0) if y.ndim > 1 else (y == rare)
        p = np.clip(scores[:, rare].astype(np.float64), 1e-7, 1 - 1e-7)
        return float(-np.mean(np.where(positive, np.log(p), np.log1p(-p))))

    t0 = time.time()
    training = train_classifier(net, loader, steps=steps, lr=lr, device=device, progress=progress, desc=name, on_step=count, multilabel=multilabel,
                                synthetic_weight=synthetic_weight)
    if refit_loader is not None and refit_steps:
        training["refit"] = refit_last_layer(net, refit_loader, steps=refit_steps, lr=lr, seed=seed, device=device)
    if controller is not None:
        training["adaptive_eval_s"] = eval_s[0]
        training["adaptive"] = controller.stats()
        training["adaptive_reward"] = controller_reward

    metrics = evaluate(test_loader)
    val_metrics = evaluate(val_loader) if val_loader is not None else None
    training["wall_s_with_eval"] = time.time() - t0
    stats = sampler.stats() if sampler is not None and hasattr(sampler, "stats") else {}
    if hasattr(sampler, "class_stats"):
        stats.update({k: v for k, v in sampler.class_stats().items() if k != "controller"})  # the controller's trajectory is training["adaptive"]
    return ArmResult(name, metrics, training, jsonable(stats), rare_draws[0], val_metrics)
