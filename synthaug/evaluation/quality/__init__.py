"""Image quality, memorization and diversity of a synthetic set against real rare-class images,
and how a classifier trained on real images sees it (fidelity, confusion, CAS).

:func:`image_quality_report` compares every synthetic image with the real images and returns one
JSON-ready dict; :func:`fidelity_report` and :func:`classification_accuracy_score` add the
classifier's view; :func:`write_quality_report` writes it all as ``quality.json`` with the
histograms (``quality_histograms.png``), the closest synthetic/reference pairs
(``nearest_pairs.png``) and, with a fidelity section, ``fidelity.png``. ``synthaug quality`` is
the command-line front end.

Definitions (every number in the report follows them):

* **Common representation.** Both sets are brought to one size and channel count before any
  comparison. The size is the most common H×W among the real images (ties: the first seen); the
  channel count is 3 if any real image is RGB, else 1. An image of another size is resized with
  PIL's bilinear filter (antialiased when shrinking; the aspect ratio follows the target, nothing is
  cropped). Gray becomes RGB by replicating the channel; RGB becomes gray by PIL's ITU-R 601-2 luma
  (``L = 0.299 R + 0.587 G + 0.114 B``). The report counts the images changed.
* **Pixel distance** ``d(a, b) = sqrt(mean((a - b)²)) / 255`` over all H·W·C values of two uint8
  images in the common representation: the root-mean-square difference in units of the full
  range, 0 for identical images, 1 for black against white. It is computed from exact integer sums
  of squared differences, so identical images are at exactly 0.
* **Nearest real image** of a synthetic image: the real image at the smallest pixel distance (the
  first one on ties). PSNR, SSIM and LPIPS are all measured against this one image, so the three
  scores and ``nearest_pairs.png`` describe the same pair.
* **PSNR** ``= 10·log10(255² / MSE)`` on uint8 values (``= −20·log10(d)``). An identical pair has
  PSNR = +inf: the Python report keeps ``float("inf")``, ``quality.json`` writes ``null``, the
  summaries are taken over the finite values and ``n_infinite`` counts the identical pairs.
* **SSIM**: Wang, Bovik, Sheikh & Simoncelli (2004): an 11×11 Gaussian window with σ = 1.5
  (normalized to sum 1), K1 = 0.01, K2 = 0.03, L = 255, weighted (biased) local variances, the SSIM
  map over the *valid* region only (no padding: an H×W image gives an (H−10)×(W−10) map), averaged
  over the map and over channels (RGB: each channel on its own, then the mean), as in the
  authors' MATLAB code. The local SSIM values equal ``torchmetrics``'
  ``structural_similarity_index_measure`` map (Gaussian kernel); torchmetrics 1.9 averages that
  map over the whole reflect-padded image instead of the valid region, which on 28×28 images
  differs by ~1e-3.
* **LPIPS** (Zhang et al. 2018, ``lpips`` package, AlexNet trunk, v0.1 linear layers) between a
  synthetic image and its nearest real image (by pixel distance, as above). Inputs are RGB in
  [−1, 1] (gray replicated); images with a side below 64 px are enlarged bilinearly so the short
  side is 64, because AlexNet's pooling leaves no spatial extent below ~32 px. It needs
  torchvision's ImageNet AlexNet weights (``alexnet-owt-7be5be79.pth``); they are looked for in
  ``torch.hub.get_dir()/checkpoints/`` or taken from an explicit path, and never downloaded: where
  they are absent the report says so and gives every other metric.
* **Memorization.** The threshold τ is the smallest pixel distance between two *distinct* real
  images (distinct = different pixels in the common representation; exact duplicates are dropped
  first). A synthetic image is *memorized* when its distance to the nearest **reference** image is
  strictly below τ (``d < τ``): it is closer to a reference image than any two different real
  images are to each other. The reference is the adapter's training images when they are known,
  else the real set (``"memorization_reference": "real"``). The rate is the share memorized.
* **Diversity**: the mean pixel distance over pairs of distinct indices (i < j) within a set, for
  the synthetic and the real set, and their ratio (synthetic / real). All pairs are used when there
  are at most ``max_pairs`` of them; otherwise ``max_pairs`` pairs (i ≠ j) are drawn uniformly with
  replacement by ``numpy.random.default_rng([seed, k])`` (k = 0 synthetic, 1 real).

* **Fidelity** (``--fidelity``; :func:`fidelity_report`). A *reference classifier* is trained on
  real images only (:class:`~synthaug.classifier.ReferenceClassifier`), from outside the study's
  training set (Fashion-MNIST: training images not in the few-shot splits named by
  ``--exclude-seeds``/``--exclude-shots``/``--exclude-per-class``, or in ``--exclude-indices
  FILE``) and never from the test set; ``quality.json`` lists the images (``trained_on``). A
  synthetic image counts as its intended class when the classifier's most probable class is
  that class; the *fidelity* is the share that do, reported with the mean (median, 5th and 95th
  percentile) probability of the intended class. The *confusion* is the histogram of the most
  probable class over all synthetic images (count and share per class; ``instead``: those taken
  for another class, ``most_common_instead``). The real test images of the class are judged
  the same way (``fidelity["real"]``, ``confusion["real_taken_for"]``): a class that is hard to
  tell apart is missed on real images too, and the synthetic rate reads against that one.
* **CAS** (Classification Accuracy Score, Ravuri & Vinyals 2019; :func:`classification_accuracy_score`),
  adapted to one synthetic rare class: a fresh classifier trained on the synthetic rare images
  plus real images of every other class (from the same pool as the reference classifier) is
  tested on the real test set (accuracy, the rare class's recall and average precision), beside
  the same classifier trained on real images of every class with as many real rare images as
  synthetic ones. Both arms draw class-balanced batches, with the same architecture, steps and seed.

The package has five modules: :mod:`~synthaug.evaluation.quality.metrics` (common representation,
pixel distance, PSNR, SSIM), :mod:`~synthaug.evaluation.quality.lpips_metric` (LPIPS and its
AlexNet weights), :mod:`~synthaug.evaluation.quality.report` (the report, its inputs and its
folder), :mod:`~synthaug.evaluation.quality.fidelity` (fidelity, confusion, CAS and the real
images they may be trained on) and :mod:`~synthaug.evaluation.quality.plots` (its figures).
"""

from __future__ import annotations

from synthaug.evaluation.quality.fidelity import (
    CAS_METRICS,
    classification_accuracy_score,
    excluded_split_indices,
    fidelity_report,
    outside_indices,
)
from synthaug.evaluation.quality.lpips_metric import ALEXNET_WEIGHTS_FILE, LPIPS_MIN_SIDE, find_lpips_backbone, lpips_status
from synthaug.evaluation.quality.metrics import SSIM_SETTINGS, ImageSet, common_representation, pixel_distance, psnr, ssim
from synthaug.evaluation.quality.plots import plot_fidelity, plot_nearest_pairs, plot_quality_histograms
from synthaug.evaluation.quality.report import (
    image_quality_report,
    load_cache_images,
    train_images_from_adapter,
    write_quality_report,
)

__all__ = [
    "ALEXNET_WEIGHTS_FILE",
    "CAS_METRICS",
    "ImageSet",
    "LPIPS_MIN_SIDE",
    "SSIM_SETTINGS",
    "classification_accuracy_score",
    "common_representation",
    "excluded_split_indices",
    "fidelity_report",
    "find_lpips_backbone",
    "image_quality_report",
    "load_cache_images",
    "lpips_status",
    "outside_indices",
    "pixel_distance",
    "plot_fidelity",
    "plot_nearest_pairs",
    "plot_quality_histograms",
    "psnr",
    "ssim",
    "train_images_from_adapter",
    "write_quality_report",
]
