"""The fidelity gate: a tiny reference classifier trained on real Fashion-MNIST images keeps real
shirts and refuses trousers; its spec travels to a spawned worker, which counts what it accepted
and rejected, and never uses a seed twice."""

import argparse
import subprocess
import sys

import numpy as np
import pytest

from synthaug import GenerationWorker, SyntheticCache
from synthaug.classifier import ReferenceClassifier
from synthaug.cli.gate_args import add_gate_arguments, gate_from_args
from synthaug.generation.fill import fill_cache
from synthaug.generation.gate import FidelityGate
from synthaug.generation.worker import FIRST_BATCH
from tests.helpers.stub_generators import FashionGenerator, fashion_mnist_arrays, fashion_reference_classifier
from tests.helpers.waiting import wait_for as _wait_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHIRT, TROUSER = 6, 1
ENV_1T = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A 3-class (Trouser, Shirt, Bag) reference classifier trained on 300 real training images."""
    return fashion_reference_classifier(tmp_path_factory.mktemp("reference"))


def test_the_gate_keeps_real_shirts_and_refuses_trousers(reference):
    x, y = fashion_mnist_arrays(train=False)  # test images: the classifier never saw them
    gate = FidelityGate(reference, label="Shirt")
    keep, scores = gate.filter(x[y == SHIRT][:200])
    assert keep.dtype == bool and scores.shape == (200,) and ((scores >= 0) & (scores <= 1)).all()
    assert keep.mean() >= 0.85
    assert gate.filter(x[y == TROUSER][:200])[0].mean() <= 0.15
    # the label by index and by a command line's digits: the same class ("Shirt" is class 1 of the classifier)
    assert FidelityGate(reference, label=1).label == FidelityGate(reference, label="1").label == gate.label == 1
    assert FidelityGate(reference, label="shirt").label_name == "Shirt"
    # high < 1 drops the easiest images: a subset of what low alone keeps
    capped, s = FidelityGate(reference, label="Shirt", high=0.99).filter(x[y == SHIRT][:200])
    assert np.array_equal(s, scores) and not (capped & ~keep).any() and capped.sum() < keep.sum()
    assert (capped == ((s >= 0.5) & (s <= 0.99))).all()


def test_the_spec_is_json_and_rebuilds_the_same_gate(reference, tmp_path):
    import json

    gate = FidelityGate(reference, label="Shirt", low=0.6, high=0.95)
    spec = json.loads(json.dumps(gate.spec))
    assert spec["sha256"] == ReferenceClassifier.load(reference).sha256 and spec["label_name"] == "Shirt"
    again = FidelityGate.from_spec(spec)
    x, y = fashion_mnist_arrays(train=False)
    np.testing.assert_array_equal(again.scores(x[:20]), gate.scores(x[:20]))
    with pytest.raises(ValueError, match="changed since the gate was made"):
        FidelityGate.from_spec({**spec, "sha256": "0" * 64})
    with pytest.raises(ValueError, match="not one of the gate classifier's classes"):
        FidelityGate(reference, label="Sneaker")
    with pytest.raises(ValueError, match="outside the gate classifier's 3 classes"):
        FidelityGate(reference, label=7)
    with pytest.raises(ValueError, match=r"low \(0.9\) must be <= high \(0.5\)"):
        FidelityGate(reference, label="Shirt", low=0.9, high=0.5)
    with pytest.raises(ValueError, match="high must be a probability"):
        FidelityGate(reference, label="Shirt", high=1.5)
    unsaved = ReferenceClassifier.load(reference)
    unsaved.path = unsaved.sha256 = None
    with pytest.raises(ValueError, match="save it first"):
        FidelityGate(unsaved, label="Shirt")
    with pytest.raises(FileNotFoundError):
        FidelityGate(tmp_path / "missing.pt", label="Shirt")


def test_the_command_line_flags_build_the_gate(reference):
    p = argparse.ArgumentParser()
    add_gate_arguments(p)
    gate = gate_from_args(p.parse_args(["--gate-classifier", str(reference), "--gate-label", "Shirt", "--gate-high", "0.9"]))
    assert (gate.label_name, gate.low, gate.high) == ("Shirt", 0.5, 0.9)
    assert gate_from_args(p.parse_args([])) is None
    with pytest.raises(ValueError, match="needs --gate-label"):
        gate_from_args(p.parse_args(["--gate-classifier", str(reference)]))
    with pytest.raises(ValueError, match="--gate-low configure the fidelity gate; give --gate-classifier"):
        gate_from_args(p.parse_args(["--gate-low", "0.7"]))
    with pytest.raises(ValueError, match="--gate-label Dress: label 'Dress' is not one of"):
        gate_from_args(p.parse_args(["--gate-classifier", str(reference), "--gate-label", "Dress"]))
    code = ("import sys, argparse; from synthaug.cli.gate_args import add_gate_arguments; add_gate_arguments(argparse.ArgumentParser()); "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_a_gated_worker_counts_what_it_kept_and_a_fill_after_it_repeats_no_seed(reference, tmp_path):
    cache = SyntheticCache(tmp_path / "c")
    gate = FidelityGate(reference, label="Shirt")
    worker = GenerationWorker(cache, FashionGenerator().spec, min_fresh=16, max_items=100, batch_size=8, seed=0, gate=gate,
                              num_threads=1, poll_interval=0.02)
    with worker:
        _wait_for(lambda: len(cache) >= 16, what="16 accepted images")
        status = worker.status()
    assert status["accepted"] >= 16 and status["rejected"] > 0
    hb = cache.heartbeat()
    assert hb["state"] == "stopped" and hb["accepted"] >= len(cache) == hb["generated"] and hb["rejected"] > 0
    assert hb["acceptance_rate"] == pytest.approx(hb["accepted"] / (hb["accepted"] + hb["rejected"]), abs=1e-6)
    assert hb["gate"] == {"label_name": "Shirt", "low": 0.5, "high": 1.0}
    made = hb["accepted"] + hb["rejected"]
    # a first batch of FIRST_BATCH (the cache was empty), then batches of 8; every batch's seeds reserved before it was made
    assert (made - FIRST_BATCH) % 8 == 0 and hb["seed_counter"] == hb["next_seed"] >= made
    metas = cache.metas()
    assert all(m["gate_score"] >= 0.5 and m["gate"]["sha256"] == gate.reference.sha256 for m in metas.values())
    assert np.mean([m["shown_class"] == SHIRT for m in metas.values()]) >= 0.9  # the generator makes half trousers
    # a gated fill on the same seed block continues the worker's counter: no seed twice
    gen = FashionGenerator()
    done = fill_cache(gen, cache, 6, seed=0, gate=gate, batch_size=8)
    assert min(gen.seeds) == hb["seed_counter"] and done.written == 6
    seeds = [m["seed"] for m in cache.metas().values()]
    assert len(seeds) == len(set(seeds)) == len(cache)
    with pytest.raises(FileNotFoundError):
        GenerationWorker(cache, FashionGenerator().spec, min_fresh=1, max_items=10, gate={"classifier": str(tmp_path / "no.pt"), "label": 1})
