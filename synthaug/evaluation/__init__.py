"""Evaluation on real held-out data: classifiers, metrics, image quality, the sweep harness."""

__all__: list = []
