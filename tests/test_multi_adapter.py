"""One generation worker serving several rare classes, one LoRA adapter each (issue 18, part 2):
one base model loaded once, adapters swapped per batch with the same images as single-adapter
generators, each class's fresh records following demand (given, or read from the consumers'
cursors), seeds unique across classes and restarts, adapters on different base models refused.

Real parts throughout: the tiny Stable-Diffusion pipeline and LoRA adapters of
tests/helpers/tiny_sd.py, the built-in pixel DDPM with adapters trained by ``finetune_lora`` (one
step each: the test is about swapping, not quality), and model-free stub generators where only
the demand rule is under test. Torch runs on one thread (here and in the worker processes).
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from synthaug import GenerationWorker, GenerationWorkerError, SyntheticCache, load_generator
from synthaug.generation.multi import MultiAdapterGenerator, check_class_specs
from tests.helpers.stub_generators import PatternGenerator, pattern_image
from tests.helpers.tiny_sd import write_tiny_sd_lora_adapter
from tests.helpers.waiting import wait_for

REPO = Path(__file__).resolve().parents[1]
ENV_1T = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
SD_CLASSES = {"Shirt": 6, "Coat": 4, "Pullover": 2}
DDPM_CLASSES = {"Shirt": 6, "Coat": 4, "Pullover": 2}  # Fashion-MNIST class indices of the built-in model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _one_thread_in_workers(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned workers


@pytest.fixture(scope="module")
def sd_adapters(tiny_sd_dir, tmp_path_factory):
    """Three LoRA adapters (different random weights, prompts and labels) on the tiny SD pipeline."""
    root = tmp_path_factory.mktemp("sd-adapters")
    return {name: write_tiny_sd_lora_adapter(tiny_sd_dir, root / name, seed=10 + i, label=label, class_name=name,
                                             prompt=f"a photo of sks {['shirt', 'clothing', 'dress'][i]}")
            for i, (name, label) in enumerate(SD_CLASSES.items())}


@pytest.fixture(scope="module")
def ddpm_adapters(tmp_path_factory):
    """Three adapters of the built-in Fashion-MNIST DDPM, one optimizer step each on 5 real images
    of their class, with 2 sampling steps (fast; the tests are about swapping, not quality)."""
    from PIL import Image

    from synthaug.data.fashion_mnist import FashionMNIST
    from synthaug.finetune import finetune_lora

    ds = FashionMNIST(train=True)
    targets = ds.targets.numpy()
    root = tmp_path_factory.mktemp("ddpm-adapters")
    out = {}
    for name, label in DDPM_CLASSES.items():
        images = root / f"{name}-images"
        images.mkdir()
        for i in np.flatnonzero(targets == label)[:5]:
            Image.fromarray(ds.data[i].numpy()).save(images / f"{i}.png")
        out[name] = finetune_lora("builtin:fashion-mnist-ddpm", images, root / name, class_name=name, steps=1, batch_size=2,
                                  min_images=5, validation_steps=1, progress=False)
    return out


def _specs(adapters, **overrides):
    return {name: {"source": str(folder), "overrides": dict(overrides)} for name, folder in adapters.items()}


def _fill(cache, adapters, *, min_fresh, batch_size, demand=None, timeout=120, **overrides):
    """Run a 3-class worker until every class has reached its target; returns the final heartbeat."""
    w = GenerationWorker(cache, _specs(adapters, **overrides), min_fresh=min_fresh, max_items=1000, batch_size=batch_size, seed=0,
                         num_threads=1, poll_interval=0.02, demand=demand)
    with w:
        def settled():
            w.raise_if_failed()
            hb = cache.heartbeat() or {}
            classes = hb.get("classes") or {}
            return bool(classes) and all(_at_target(c) for c in classes.values()) and hb["state"] == "running"

        wait_for(settled, timeout=timeout, what="every class at its target")
    return cache.heartbeat()


def _at_target(c):
    return c["target"] is not None and c["fresh"] >= c["target"]


def _per_class(cache):
    return Counter(cache.labels().values())


# ---------------------------------------------------------------------------------- one model, adapters swapped
def test_sd_classes_share_one_pipeline_and_make_their_single_adapter_images(tiny_sd_dir, sd_adapters, monkeypatch):
    from diffusers import AutoPipelineForText2Image

    loads = []
    real = AutoPipelineForText2Image.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        loads.append(args[0] if args else kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoPipelineForText2Image, "from_pretrained", classmethod(counted))
    multi = MultiAdapterGenerator(_specs(sd_adapters))
    assert len(loads) == 1 and multi.loads == 1  # one base model for three adapters
    pipes = {id(multi.for_class(n).inner.pipe) for n in SD_CLASSES}
    assert len(pipes) == 1 and multi.labels == SD_CLASSES
    # each class's images are its single-adapter generator's, whatever was active before (A, B, C, A)
    for name in ["Shirt", "Coat", "Pullover", "Shirt"]:
        batch = multi.for_class(name).generate(2, 40)
        single = load_generator(sd_adapters[name]).generate(2, 40)
        np.testing.assert_array_equal(batch.images, single.images)
        assert batch.labels == [SD_CLASSES[name]] * 2 and batch.meta[0]["adapter_hash"] == single.meta[0]["adapter_hash"]
    assert multi.switch.swaps == 4  # Shirt, Coat, Pullover, Shirt: one swap per change of class
    # the adapters differ: the same seeds give other images under another adapter
    assert not np.array_equal(multi.for_class("Shirt").generate(1, 7).images, multi.for_class("Coat").generate(1, 7).images)


def test_ddpm_classes_share_one_unet_and_make_their_single_adapter_images(ddpm_adapters):
    multi = MultiAdapterGenerator(_specs(ddpm_adapters, num_inference_steps=2))
    assert multi.loads == 1 and len({id(multi.for_class(n).inner.unet) for n in DDPM_CLASSES}) == 1
    for name in ["Coat", "Shirt", "Pullover", "Coat"]:
        batch = multi.for_class(name).generate(3, 100)
        single = load_generator(ddpm_adapters[name], num_inference_steps=2).generate(3, 100)
        np.testing.assert_array_equal(batch.images, single.images)  # merged the same way: bit for bit
        assert batch.labels == [DDPM_CLASSES[name]] * 3


# ---------------------------------------------------------------------------------- supply follows demand
@pytest.mark.parametrize("backend", ["stable-diffusion", "pixel-ddpm"])
def test_a_three_class_worker_fills_each_class_in_proportion_to_demand(backend, sd_adapters, ddpm_adapters, tmp_path):
    adapters, overrides, batch = (sd_adapters, {}, 2) if backend == "stable-diffusion" else (ddpm_adapters, {"num_inference_steps": 2}, 4)
    min_fresh = 8 if backend == "stable-diffusion" else 16
    cache = SyntheticCache(tmp_path / "c")
    hb = _fill(cache, adapters, min_fresh=min_fresh, batch_size=batch, demand={"Shirt": 2, "Coat": 1, "Pullover": 1}, **overrides)
    counts = _per_class(cache)
    targets = {"Shirt": min_fresh / 2, "Coat": min_fresh / 4, "Pullover": min_fresh / 4}
    for name, label in adapters_labels(adapters).items():
        # each class reaches its share and overshoots it by less than one batch
        assert targets[name] <= counts[label] < targets[name] + batch, (name, counts)
        assert hb["classes"][name]["generated"] == hb["classes"][name]["fresh"] == counts[label]
    assert hb["demand_source"] == "demand"
    # the records of each class are its single-adapter generator's images, at their seeds
    metas = cache.metas()
    for name, label in adapters_labels(adapters).items():
        seq = min(s for s, m in metas.items() if m["label"] == label)
        again = load_generator(adapters[name], **overrides).generate(1, metas[seq]["seed"])
        np.testing.assert_array_equal(again.images[0], cache.get(seq).image)
        assert metas[seq]["adapter"] == str(adapters[name])
    assert [m["seed"] for m in metas.values()] == cache.seqs()  # the sequence rule across classes


def adapters_labels(adapters):
    return {name: json.loads((Path(folder) / "synthaug.json").read_text())["label"] for name, folder in adapters.items()}


def test_demand_is_read_from_the_consumers_cursor_ratios(tmp_path):
    """Cursors of this (live) process carry per-class ratios: they outweigh demand=; "*" states no
    preference; a waiting consumer's class is made first, beyond its target."""
    cache = SyntheticCache(tmp_path / "c")
    cache.set_cursor("rank0", 0, ratios={"0": 0.1, "1": 0.3, "*": 0.2}, served_by_class={"0": 5, "1": 7})
    cache.set_cursor("rank1", 0, ratios={"1": 0.2, "*": 0.4}, served_by_class={"1": 3})
    gens = {name: PatternGenerator(label=label).spec for name, label in (("a", 0), ("b", 1), ("c", 2))}
    with GenerationWorker(cache, gens, min_fresh=24, max_items=500, batch_size=2, seed=0, poll_interval=0.02, demand={"c": 1}) as w:
        wait_for(lambda: (w.raise_if_failed() or (cache.heartbeat() or {}).get("classes") or {}).get("b", {}).get("fresh", 0) >= 18,
                 what="class b at its target")
        wait_for(lambda: (cache.heartbeat() or {}).get("classes", {}).get("a", {}).get("fresh", 0) >= 4, what="class a at its target")
        time.sleep(0.3)  # settled: nothing more to make
        counts = _per_class(cache)
        # weights a 0.1, b 0.5, c 0 (named by no cursor; demand= is only the fallback): targets 4, 20, 0
        assert 4 <= counts[0] < 6 and 20 <= counts[1] < 22 and counts[2] == 0, counts
        hb = cache.heartbeat()
        assert hb["demand_source"] == "cursors" and hb["classes"]["b"]["target"] == 20.0
        assert hb["classes"]["a"]["served"] == 5 and hb["classes"]["b"]["served"] == 10 and hb["classes"]["c"]["served"] == 0
        # a consumer waiting for class c is served first, though c has no share of min_fresh
        cache.set_cursor("rank2", 0, ratios={"2": 0.5}, waiting=True)
        wait_for(lambda: _per_class(cache)[2] >= 4, what="records for the waiting consumer")
        cache.remove_cursor("rank2")
    seeds = [m["seed"] for m in cache.metas().values()]
    assert seeds == cache.seqs() and all(np.array_equal(cache.get(q).image, pattern_image(q)) for q in cache.seqs()[:5])


def test_no_ratios_anywhere_means_equal_shares(tmp_path):
    cache = SyntheticCache(tmp_path / "c")
    gens = {name: PatternGenerator(label=label).spec for name, label in (("a", 0), ("b", 1), ("c", 2))}
    cache.set_cursor("old-style", 0, ratios={"*": 0.25})  # "any class": no preference
    with GenerationWorker(cache, gens, min_fresh=12, max_items=500, batch_size=2, seed=0, poll_interval=0.02):
        wait_for(lambda: all(n >= 4 for n in (_per_class(cache)[k] for k in range(3))), what="equal shares")
        time.sleep(0.3)
    assert sorted(_per_class(cache).values()) == [4, 4, 4] and cache.heartbeat()["demand_source"] == "equal"


# ---------------------------------------------------------------------------------- refusals
def test_adapters_on_different_base_models_are_refused_up_front(tiny_sd_dir, sd_adapters, ddpm_adapters, tmp_path):
    other = write_tiny_sd_lora_adapter(tiny_sd_dir, tmp_path / "other", base_model=str(tmp_path / "another-sd-pipeline"), label=1)
    cache = SyntheticCache(tmp_path / "c")
    with pytest.raises(ValueError) as info:
        GenerationWorker(cache, {"Shirt": str(sd_adapters["Shirt"]), "Other": str(other)}, min_fresh=4, max_items=10)
    message = str(info.value)
    assert message.startswith("adapters on different base models cannot share one worker")
    for part in ("'Shirt'", str(sd_adapters["Shirt"]), str(tiny_sd_dir), "'Other'", str(other), str(tmp_path / "another-sd-pipeline")):
        assert part in message
    with pytest.raises(ValueError, match=r"class 'Coat' .* is on builtin:fashion-mnist-ddpm \(pixel-ddpm\)"):
        check_class_specs(_specs({"Shirt": sd_adapters["Shirt"], "Coat": ddpm_adapters["Coat"]}))
    with pytest.raises(ValueError, match="is a model without an adapter"):
        check_class_specs({"Shirt": {"source": str(tiny_sd_dir), "overrides": {"prompt": "a shirt", "label": 6}}})
    with pytest.raises(ValueError, match="both make label 6"):
        check_class_specs({"Shirt": {"source": str(sd_adapters["Shirt"])}, "Coat": {"source": str(sd_adapters["Coat"]), "overrides": {"label": 6}}})
    with pytest.raises(ValueError, match="demand names class 'Dress'"):
        GenerationWorker(cache, _specs(sd_adapters), min_fresh=4, max_items=10, demand={"Dress": 1})
    assert not any(cache.path.glob("writer-*.lock"))  # refused before any process started


# ---------------------------------------------------------------------------------- crash and restart
def test_a_sigkilled_multi_adapter_worker_restarted_continues_its_seeds(ddpm_adapters, tmp_path):
    cache = SyntheticCache(tmp_path / "c")
    specs = _specs(ddpm_adapters, num_inference_steps=2)
    w = GenerationWorker(cache, specs, min_fresh=10_000, max_items=10_000, batch_size=4, seed=0, num_threads=1, poll_interval=0.01)
    w.start(wait=True, timeout=120)
    wait_for(lambda: len(cache) >= 10, timeout=120, what="records of the first worker")
    os.kill(w.pid, signal.SIGKILL)
    wait_for(lambda: not w.is_alive(), what="the killed worker to be reaped")
    with pytest.raises(GenerationWorkerError, match="killed by signal SIGKILL"):
        w.raise_if_failed()
    killed_at = len(cache)
    cache.set_cursor("trainer", killed_at)  # all consumed: the new worker must make every class again
    with GenerationWorker(cache, specs, min_fresh=12, max_items=10_000, batch_size=4, seed=0, num_threads=1, poll_interval=0.01):
        wait_for(lambda: all(_at_target(c) for c in ((cache.heartbeat() or {}).get("classes") or {"-": {"target": None}}).values())
                 and (cache.heartbeat() or {}).get("pid") != w.pid, timeout=120, what="the restarted worker's records")
    cache.remove_cursor("trainer")
    assert cache.verify()["corrupt"] == 0
    metas = cache.metas()
    seeds = [m["seed"] for m in metas.values()]
    assert len(seeds) == len(set(seeds)) and seeds == cache.seqs() == list(range(len(cache)))  # none repeated or skipped
    after = Counter(m["label"] for s, m in metas.items() if s >= killed_at)
    assert set(after) == set(DDPM_CLASSES.values()) and all(n >= 4 for n in after.values())


# ---------------------------------------------------------------------------------- the command line
def test_cli_worker_takes_one_adapter_per_class(ddpm_adapters, tmp_path):
    from synthaug.cli import build_parser
    from synthaug.cli.worker import adapter_classes

    parser = build_parser()
    args = parser.parse_args(["worker", "--adapter", f"Shirt={ddpm_adapters['Shirt']}", "--adapter", f"Coat={ddpm_adapters['Coat']}",
                              "--demand", "Shirt=2", "--cache", str(tmp_path / "x"), "--min-fresh", "4", "--max-items", "8"])
    assert adapter_classes(args.adapter) == {"Shirt": str(ddpm_adapters["Shirt"]), "Coat": str(ddpm_adapters["Coat"])}
    assert args.demand == [("Shirt", 2.0)]
    one = parser.parse_args(["worker", "--adapter", str(ddpm_adapters["Shirt"]), "--cache", "x", "--min-fresh", "4", "--max-items", "8"])
    assert adapter_classes(one.adapter) is None  # the single form: one generator, as before
    plain = adapter_classes([str(ddpm_adapters["Shirt"]), f"Knit={ddpm_adapters['Pullover']}"])
    assert plain == {"Shirt": str(ddpm_adapters["Shirt"]), "Knit": str(ddpm_adapters["Pullover"])}  # named by its class_name
    help_text = subprocess.run([sys.executable, "-m", "synthaug", "worker", "--help"], cwd=REPO, env=ENV_1T, capture_output=True, text=True).stdout
    assert "--adapter Shirt=runs/shirt --adapter Coat=runs/coat" in help_text and "--demand" in help_text

    path = tmp_path / "c"
    proc = subprocess.Popen(
        [sys.executable, "-m", "synthaug", "worker", "--adapter", f"Shirt={ddpm_adapters['Shirt']}", "--adapter", f"Coat={ddpm_adapters['Coat']}",
         "--demand", "Shirt=3", "--demand", "Coat=1", "--steps", "2", "--cache", str(path), "--min-fresh", "16", "--max-items", "64",
         "--batch-size", "4", "--poll-interval", "0.05", "--threads", "1"],
        cwd=REPO, env=ENV_1T, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        def filled():
            try:
                hb = SyntheticCache(path, readonly=True).heartbeat() or {}
            except FileNotFoundError:
                return False
            classes = hb.get("classes") or {}
            return bool(classes) and all(_at_target(c) for c in classes.values())

        wait_for(filled, timeout=120, what="the CLI worker to fill both classes")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    counts = _per_class(SyntheticCache(path, readonly=True))
    assert 12 <= counts[6] < 16 and 4 <= counts[4] < 8, counts
    assert "(Shirt " in stdout and ", Coat " in stdout
    inspect = subprocess.run([sys.executable, "-m", "synthaug", "cache", "inspect", str(path)], cwd=REPO, env=ENV_1T, capture_output=True, text=True)
    assert inspect.returncode == 0, inspect.stderr
    assert "class Shirt" in inspect.stdout and f"6 Shirt                  stored {counts[6]}, fresh {counts[6]}" in inspect.stdout

    # different base models: refused with one line, and no cache is created
    refused = subprocess.run([sys.executable, "-m", "synthaug", "worker", "--adapter", f"Shirt={ddpm_adapters['Shirt']}", "--adapter",
                              f"Other={tmp_path / 'nowhere'}", "--cache", str(tmp_path / "never"), "--min-fresh", "4", "--max-items", "8"],
                             cwd=REPO, env=ENV_1T, capture_output=True, text=True)
    assert refused.returncode == 2 and "does not exist" in refused.stderr and not (tmp_path / "never").exists()
