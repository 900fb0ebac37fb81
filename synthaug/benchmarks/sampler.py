"""Sampler: which sampler, step count and options of the embedded pixel DDPM keep its garments
recognisable while raising images/s on CPU.

For each configuration of ``builtin:fashion-mnist-ddpm`` (or ``--model``):

* images/s on one torch thread (``torch.set_num_threads(1)``): whole ``generate`` calls of
  ``--timed`` images (noise, denoising, conversion to uint8), model loading excluded, every
  generator warmed up by one call first (the warm-up, which also compiles with
  ``torch.compile``, is reported), median, min and max of ``--repeats`` runs alternating between
  configurations (``interleaved``); ``vs default``: the median over that of today's default
  (DPM-Solver++, 20 steps, guidance 2, batch 16);
* recognition: ``--per-class`` images of each of the model's trained classes, from the same
  seeds for every configuration, classified by a reference CNN trained once on real
  Fashion-MNIST (:func:`synthaug.classifier.train_reference_classifier`, all ten classes);
  the accuracy with its binomial standard error ``sqrt(p(1-p)/n)``, and the difference to the
  default with the standard error of a paired difference (same seeds: the per-image
  agreement is used, McNemar-style).

Rule for the recommendation: a configuration *keeps recognition* when its accuracy is not below
the default's by more than twice the paired standard error (``Δ >= -2·se(Δ)``); the recommended
configuration is the fastest (median images/s) of those that keep recognition.

Configurations: DPM-Solver++ at 6, 8, 10, 12, 15, 20 steps, UniPC at 6, 8, 10, 12, 15 (guidance
2, batch 16); then, at the fewest steps that keep recognition (the first phase's best), guidance
1 (no classifier-free guidance: half the UNet work), 1.5 and 3, batch 32, ``channels_last``,
``torch.compile``, and both. Accuracy is measured once per image-producing setting: configurations
that differ only in batch size share it (another batch size only changes the float summation order
of CPU kernels).

    python benchmarks/sampler.py [--quick] [--model SRC] [--per-class N] [--repeats R] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from synthaug.benchmarks.common import interleaved, print_table, rate, write_result

__all__ = ["run", "main", "reference_cnn", "recognition", "paired_difference", "DEFAULT_CONFIG", "COLUMNS"]

DEFAULT_MODEL = "builtin:fashion-mnist-ddpm"
#: the baseline: the embedded model's sampler settings (synthaug_model.json "generation", the demo's
#: batch size) in the contiguous memory format (``channels_last`` became the default after this study)
DEFAULT_CONFIG = {"scheduler": "dpm++", "steps": 20, "guidance": 2.0, "batch_size": 16, "channels_last": False, "compile": False}
STEP_SWEEP = {"dpm++": (6, 8, 10, 12, 15, 20), "unipc": (6, 8, 10, 12, 15)}
COLUMNS = ["config", "images/s", "min", "max", "vs default", "warm-up s", "accuracy", "± se", "Δ vs default", "± se(Δ)", "keeps"]


def _name(c: Dict[str, Any]) -> str:
    name = f"{c['scheduler']} {c['steps']} g{c['guidance']:g} b{c['batch_size']}"
    if c["channels_last"]:
        name += " +cl"
    if c["compile"]:
        name += " +compile"
    return name


def _config(**kw: Any) -> Dict[str, Any]:
    c = dict(DEFAULT_CONFIG)
    c.update(kw)
    return c


def _image_key(c: Dict[str, Any]) -> Tuple:
    """What decides the images (up to float summation order): everything but the batch size."""
    return (c["scheduler"], c["steps"], c["guidance"], c["channels_last"], c["compile"])


def reference_cnn(per_class: int = 1000, steps: int = 800, seed: int = 0, n_test: int = 2000):
    """A small CNN trained on ``per_class`` real Fashion-MNIST training images of each of the ten
    classes (:func:`~synthaug.classifier.train_reference_classifier`: balanced batches, flips and
    shifts); returns ``(classifier, info)`` with its accuracy on the first ``n_test`` real test
    images."""
    from synthaug.classifier import train_reference_classifier
    from synthaug.data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST

    t0 = time.perf_counter()
    train = FashionMNIST(train=True)
    rng = np.random.default_rng(seed)
    targets = train.targets.numpy()
    idx = np.concatenate([rng.choice(np.flatnonzero(targets == c), per_class, replace=False) for c in range(10)])
    images = train.data.numpy()[idx][..., None]
    ref = train_reference_classifier(list(images), targets[idx], list(FASHION_MNIST_CLASSES), steps=steps, seed=seed,
                                     trained_on=f"fashion-mnist train, {per_class} per class")
    test = FashionMNIST(train=False)
    test_x, test_y = test.data.numpy()[:n_test][..., None], test.targets.numpy()[:n_test]
    pred = ref.probabilities(list(test_x)).argmax(1)
    info = {"per_class": per_class, "steps": steps, "seed": seed, "real_test_images": int(n_test),
            "real_test_accuracy": float((pred == test_y).mean()), "train_s": time.perf_counter() - t0}
    return ref, info


def paired_difference(correct: np.ndarray, base: np.ndarray) -> Tuple[float, float]:
    """Mean of ``correct - base`` (0/1 per image, same seeds) and its standard error."""
    d = correct.astype(np.float64) - base.astype(np.float64)
    n = len(d)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def _class_images(gen, label: int, seeds: Sequence[int]) -> np.ndarray:
    """The generator's images of model class ``label`` from ``seeds`` (its own sampling path,
    batch by batch; the class is switched on the one generator so a compiled UNet is reused)."""
    gen.slot = int(label)
    b = gen.batch_size
    return np.concatenate([gen._sample(list(seeds[i : i + b])) for i in range(0, len(seeds), b)])


def recognition(gen, ref, classes: Sequence[int], per_class: int, seed: int = 0) -> Dict[str, Any]:
    """Generate ``per_class`` images of each class (seeds ``seed + 1000·c + i``, the same for
    every configuration) and classify them; accuracy, its binomial standard error, per class."""
    correct, per = [], {}
    t0 = time.perf_counter()
    for c in classes:
        images = _class_images(gen, c, [seed + 1000 * int(c) + i for i in range(per_class)])
        ok = ref.probabilities(list(images)).argmax(1) == int(c)
        per[str(c)] = float(ok.mean())
        correct.append(ok)
    flags = np.concatenate(correct)
    p = float(flags.mean())
    return {"accuracy": p, "se": math.sqrt(p * (1 - p) / len(flags)), "n": int(len(flags)), "per_class": per,
            "correct": flags, "generate_s": time.perf_counter() - t0}


def _load(model: str, c: Dict[str, Any], label: int):
    from synthaug.generation.loading import load_generator

    return load_generator(model, label=label, scheduler=c["scheduler"], num_inference_steps=c["steps"], guidance_scale=c["guidance"],
                          batch_size=c["batch_size"], channels_last=c["channels_last"], compile=c["compile"], device="cpu", dtype="fp32")


def run(quick: bool = False, *, model: str = DEFAULT_MODEL, per_class: int = 0, repeats: int = 0, timed: int = 0,
        classifier_steps: int = 0, guidances: Sequence[float] = (2.0,), steps: Optional[Sequence[int]] = None,
        schedulers: Optional[Sequence[str]] = None, variants: bool = True, log=print) -> Dict[str, Any]:
    """Measure; returns ``{"rows": [...], "recommended": row, "classifier": {...}, "settings": {...}}``.

    The step sweep runs each of ``schedulers`` (default: both of :data:`STEP_SWEEP`) at its
    ``steps`` (default: :data:`STEP_SWEEP`'s) and each of ``guidances``; ``variants``: the second
    phase (guidance, batch size and options at the sweep's best)."""
    import json

    import torch

    from synthaug.generation.loading import resolve_source

    t_start = time.perf_counter()
    torch.set_num_threads(1)
    per_class = per_class or (2 if quick else 32)
    repeats = repeats or (1 if quick else 3)
    timed = timed or (4 if quick else 32)
    src = resolve_source(model)
    info = json.loads((src.path / "synthaug_model.json").read_text())
    classes = list(info.get("trained_classes") or range(len(info.get("classes") or [])))
    ref, ref_info = reference_cnn(per_class=100 if quick else 1000, steps=classifier_steps or (30 if quick else 800))
    log(f"reference CNN: {ref_info['real_test_accuracy']:.3f} on {ref_info['real_test_images']} real test images ({ref_info['train_s']:.0f} s)")

    gens: Dict[str, Any] = {}
    warmup: Dict[str, float] = {}
    acc: Dict[Tuple, Dict[str, Any]] = {}
    configs: Dict[str, Dict[str, Any]] = {}

    def measure(c: Dict[str, Any]) -> None:
        name = _name(c)
        if name in configs:
            return
        gen = _load(model, c, classes[0])
        t0 = time.perf_counter()
        gen.generate(c["batch_size"], 10**6)  # warm-up (compiles, with compile)
        warmup[name] = time.perf_counter() - t0
        gens[name], configs[name] = gen, c
        key = _image_key(c)
        if key not in acc:
            acc[key] = recognition(gen, ref, classes, per_class)
            log(f"  {name}: accuracy {acc[key]['accuracy']:.3f} ± {acc[key]['se']:.3f} ({acc[key]['generate_s']:.0f} s, warm-up {warmup[name]:.1f} s)")

    def keeps(c: Dict[str, Any]) -> bool:
        d, se = paired_difference(acc[_image_key(c)]["correct"], acc[_image_key(base)]["correct"])
        return d >= -2 * se or d >= 0

    if quick:
        sweep = [_config(scheduler="dpm++", steps=4), _config(scheduler="unipc", steps=4)]
    else:
        sweep = [_config(scheduler=s, steps=n, guidance=float(g)) for g in guidances for s, default_steps in STEP_SWEEP.items()
                 if schedulers is None or s in schedulers for n in (steps or default_steps)]
    base = _config() if not quick else sweep[0]
    log(f"phase 1: step sweep, {per_class} images per class of {classes}")
    measure(base)
    for c in sweep:
        measure(c)
    best = base
    if not quick and variants:
        passing = [c for c in sweep if keeps(c)]
        # fewest steps (the cost), then the higher accuracy
        best = min(passing, key=lambda c: (c["steps"], -acc[_image_key(c)]["accuracy"]))
        log(f"phase 2: variants of the step sweep's best, {_name(best)}")
        for kw in ({"guidance": 1.0}, {"guidance": 1.5}, {"guidance": 3.0}, {"batch_size": 32}, {"channels_last": True},
                   {"compile": True}, {"channels_last": True, "compile": True}):
            measure(dict(best, **kw))

    log(f"timing: {len(gens)} configurations, {timed} images per run, {repeats} interleaved repeats")
    fns = {name: (lambda gen=gen: rate(timed, lambda: gen.generate(timed, 0))) for name, gen in gens.items()}
    timing = interleaved(fns, repeats)
    base_ips = timing[_name(base)]["median"]
    base_acc = acc[_image_key(base)]
    rows: List[Dict[str, Any]] = []
    for name, c in configs.items():
        a = acc[_image_key(c)]
        d, se_d = paired_difference(a["correct"], base_acc["correct"])
        t = timing[name]
        rows.append({
            "config": name, **{k: c[k] for k in ("scheduler", "steps", "guidance", "batch_size", "channels_last", "compile")},
            "images/s": t["median"], "min": t["min"], "max": t["max"], "vs default": t["median"] / base_ips, "warm-up s": warmup[name],
            "accuracy": a["accuracy"], "± se": a["se"], "Δ vs default": d, "± se(Δ)": se_d, "keeps": "yes" if keeps(c) else "no",
            "n_images": a["n"], "per_class_accuracy": a["per_class"], "timing": t,
        })
    recommended = max((r for r in rows if r["keeps"] == "yes"), key=lambda r: r["images/s"])
    for gen in gens.values():
        getattr(gen, "close", lambda: None)()
    return {
        "quick": quick, "model": model, "threads": torch.get_num_threads(), "rows": rows, "recommended": recommended,
        "default": _name(base), "phase1_best": _name(best), "classifier": ref_info,
        "settings": {"per_class": per_class, "classes": classes, "seeds": "1000·class + i", "repeats": repeats, "timed_images": timed,
                     "rule": "keeps recognition: Δ >= -2·se(Δ) (paired, same seeds); recommended: the fastest that keeps it"},
        "bf16": "not measured: this CPU has no avx512_bf16/AMX, bf16 convolutions are emulated (a one-off probe: ~50× slower than fp32)",
        "total_s": time.perf_counter() - t_start,
    }


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 configurations, 2 images per class, 1 repeat (a smoke test, not figures)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="pixel-DDPM model (builtin:<name> or a folder)")
    p.add_argument("--per-class", type=int, default=0, help="images per trained class for the recognition test (0: 32, quick 2)")
    p.add_argument("--repeats", type=int, default=0, help="interleaved timing repeats (0: 3, quick 1)")
    p.add_argument("--timed", type=int, default=0, help="images per timed generate call (0: 32, quick 4)")
    p.add_argument("--guidance", type=float, nargs="+", default=[2.0], help="guidance scales of the step sweep")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="step counts of the sweep (default: dpm++ 6 8 10 12 15 20, unipc 6 8 10 12 15)")
    p.add_argument("--schedulers", nargs="+", default=None, choices=sorted(STEP_SWEEP), help="samplers of the sweep (default: both)")
    p.add_argument("--no-variants", action="store_true", help="skip the second phase (guidance, batch, channels_last, compile at the sweep's best)")
    p.add_argument("--name", default="sampler", help="the JSON's name (NAME.json)")
    p.add_argument("--out", default=None, help="folder for sampler.json (default benchmarks/results)")
    args = p.parse_args(argv)
    result = run(args.quick, model=args.model, per_class=args.per_class, repeats=args.repeats, timed=args.timed,
                 guidances=args.guidance, steps=args.steps, schedulers=args.schedulers, variants=not args.no_variants)
    print(f"\npixel DDPM {args.model} on CPU, {result['threads']} torch thread; recognition by a reference CNN "
          f"({result['classifier']['real_test_accuracy']:.3f} on real test images), {result['settings']['per_class']} images per class:")
    print_table(result["rows"], COLUMNS)
    rec = result["recommended"]
    print(f"rule: {result['settings']['rule']}")
    print(f"recommended: {rec['config']}: {rec['images/s']:.2f} images/s, {rec['vs default']:.2f}× the default ({result['default']}), "
          f"accuracy {rec['accuracy']:.3f} ± {rec['± se']:.3f}")
    print(f"total {result['total_s']:.0f} s")
    path = write_result(args.name + ("_quick" if args.quick else ""), result, args.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
