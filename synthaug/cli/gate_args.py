"""The ``--gate-*`` flags of ``synthaug generate`` and ``synthaug worker``: a fidelity gate
(:class:`~synthaug.generation.gate.FidelityGate`) between generating and storing.

``add_gate_arguments(parser)`` defines them; ``gate_from_args(args)`` builds the gate, or returns
``None`` when ``--gate-classifier`` is not given. Building the parser imports no torch; the gate
loads its classifier (torch) only in ``gate_from_args``.
"""

from __future__ import annotations

import argparse
from typing import Optional

from synthaug.generation.gate import FidelityGate

__all__ = ["add_gate_arguments", "gate_from_args"]


def add_gate_arguments(p: argparse.ArgumentParser) -> None:
    """``--gate-classifier FILE --gate-label NAME_OR_INDEX --gate-low P --gate-high P``."""
    g = p.add_argument_group("fidelity gate (store only images a reference classifier takes for their class)")
    g.add_argument("--gate-classifier", metavar="FILE", default=None,
                   help="reference classifier file (synthaug.classifier.ReferenceClassifier.save, or the reference_classifier.pt "
                        "that `synthaug quality --fidelity --train-reference` writes); enables the gate")
    g.add_argument("--gate-label", metavar="NAME|INDEX", default=None,
                   help="the class the images are meant to be, by name (looked up first) or index among the classifier's classes "
                        "(required with --gate-classifier)")
    g.add_argument("--gate-low", type=float, default=0.5, metavar="P",
                   help="keep an image only if the classifier gives its class a probability >= P (drops off-class images; default 0.5)")
    g.add_argument("--gate-high", type=float, default=1.0, metavar="P",
                   help="... and <= P (below 1 drops images too easy for the classifier; default 1.0: no upper cut)")
    g.add_argument("--gate-device", default=None, metavar="DEVICE", help="torch device of the gate's classifier (default: cpu)")


def gate_from_args(args: argparse.Namespace) -> Optional[FidelityGate]:
    """The gate the flags ask for, or ``None`` without ``--gate-classifier``.

    Raises:
        ValueError: gate flags without ``--gate-classifier``, ``--gate-classifier`` without
            ``--gate-label``, or what :class:`FidelityGate` refuses (the message names the flag).
    """
    classifier = getattr(args, "gate_classifier", None)
    if classifier is None:
        given = [f for f, default in (("--gate-label", None), ("--gate-low", 0.5), ("--gate-high", 1.0), ("--gate-device", None))
                 if getattr(args, f[2:].replace("-", "_"), default) != default]
        if given:
            raise ValueError(f"{', '.join(given)} configure the fidelity gate; give --gate-classifier FILE too")
        return None
    if args.gate_label is None:
        raise ValueError("--gate-classifier needs --gate-label NAME_OR_INDEX: the class the generated images are meant to be")
    try:
        return FidelityGate(classifier, label=args.gate_label, low=args.gate_low, high=args.gate_high, device=args.gate_device)
    except (FileNotFoundError, ValueError) as exc:
        raise type(exc)(f"--gate-classifier {classifier} / --gate-label {args.gate_label}: {exc}") from None
