"""Generators and the GenerationWorker, on tiny random-weight models loaded through the real
``from_pretrained`` paths (tests/helpers/tiny_sd.py) and on model-free stub generators
(tests/helpers/stub_generators.py) where only the worker's protocol is under test.

Torch runs with one thread here (and in the worker processes and CLI runs these tests start): on
a small shared machine, OpenMP threads of two busy processes spin against each other and make
every operator ~100× slower.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import synthaug
from synthaug import GenerationWorker, GenerationWorkerError, SyntheticCache, load_generator
from synthaug.adapter import image_sha256
from synthaug.generation.worker import FIRST_BATCH
from tests.helpers.readme import readme_python
from tests.helpers.stub_generators import FailingGenerator, PatternGenerator, pattern_image
from tests.helpers.waiting import wait_for as _wait_for

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a photo of sks shirt"
# provenance every record must carry (synthaug/generation/base.py module docstring)
META_KEYS = {
    "source", "overrides", "model", "adapter", "adapter_hash", "backend", "mode", "seed", "prompt",
    "negative_prompt", "label", "label_name", "scheduler", "num_inference_steps", "guidance_scale",
    "resolution", "device", "dtype",
}
ENV_1T = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sd(tiny_sd_dir, **kw):
    settings = dict(prompt=PROMPT, label=3, num_inference_steps=3, guidance_scale=2.0)
    settings.update(kw)
    return load_generator(tiny_sd_dir, **settings)


@pytest.fixture(scope="module")
def sd_gen(tiny_sd_dir):
    return _sd(tiny_sd_dir)


# ---------------------------------------------------------------------------------- SD backend
def test_same_seed_same_images_different_seed_different(sd_gen):
    a = sd_gen.generate(3, 5)
    b = sd_gen.generate(3, 5)
    assert a.images.shape == (3, 32, 32, 3) and a.images.dtype == np.uint8
    np.testing.assert_array_equal(a.images, b.images)
    assert [m["seed"] for m in a.meta] == [5, 6, 7] and a.labels == [3, 3, 3]
    other = sd_gen.generate(3, 1000).images
    assert all(np.abs(other[i].astype(int) - a.images[i].astype(int)).mean() > 5 for i in range(3))
    assert np.abs(a.images[0].astype(int) - a.images[1].astype(int)).mean() > 5  # seeds differ within a call
    assert a.images.std() > 10  # not a constant image


def test_batch_size_does_not_change_images(sd_gen, tiny_sd_dir):
    # batch 1 (the CPU default): image i of generate(n, s) is generate(1, s + i), bit for bit
    ref = sd_gen.generate(5, 10)
    for i in range(5):
        np.testing.assert_array_equal(sd_gen.generate(1, 10 + i).images[0], ref.images[i])
    # batch 3: a different pipeline call shape. CPU BLAS/oneDNN kernels then sum in another
    # order (last float bits differ); after uint8 quantization at most a few pixels move by one.
    g3 = _sd(tiny_sd_dir, batch_size=3)
    b3 = g3.generate(5, 10)
    diff = np.abs(b3.images.astype(int) - ref.images.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert [m["batch"] for m in b3.meta] == [[10, 3]] * 3 + [[13, 2]] * 2
    # ... and meta["batch"] names the call that made each image, which regenerates it exactly
    for img, m in zip(b3.images, b3.meta):
        first, size = m["batch"]
        np.testing.assert_array_equal(g3.generate(size, first).images[m["seed"] - first], img)


def test_provenance_and_spec_round_trip(sd_gen):
    batch = sd_gen.generate(2, 40)
    for m in batch.meta:
        assert META_KEYS <= set(m), META_KEYS - set(m)
        json.dumps(m)  # JSON-serializable, as the cache requires
        assert m["backend"] == "stable-diffusion" and m["mode"] == "txt2img" and m["prompt"] == PROMPT
        assert m["num_inference_steps"] == 3 and m["guidance_scale"] == 2.0 and m["resolution"] == [32, 32]
        assert m["scheduler"] == "DDIMScheduler" and m["device"] == "cpu" and m["dtype"] == "float32"
    spec = sd_gen.spec
    assert json.loads(json.dumps(spec)) == spec and spec["source"] == batch.meta[0]["source"]
    again = synthaug.generator_from_spec(spec).generate(2, 40)
    np.testing.assert_array_equal(again.images, batch.images)


def test_lora_adapter_defaults_and_effect(tiny_sd_dir, tiny_sd_adapter):
    gen = load_generator(tiny_sd_adapter)
    assert gen.spec == {"source": str(tiny_sd_adapter), "overrides": {}, "backend": "stable-diffusion"}
    batch = gen.generate(2, 0)
    m = batch.meta[0]
    cfg = json.loads((tiny_sd_adapter / "synthaug.json").read_text())
    assert m["adapter_hash"] == cfg["adapter_hash"] and m["adapter"] == str(tiny_sd_adapter)
    assert m["model"] == str(tiny_sd_dir) and m["label"] == 6 and m["label_name"] == "Shirt"
    assert m["prompt"] == PROMPT and m["num_inference_steps"] == 4 and m["guidance_scale"] == 2.0
    assert batch.labels == [6, 6]
    base = _sd(tiny_sd_dir, label=6, num_inference_steps=4).generate(2, 0).images
    assert np.abs(base.astype(int) - batch.images.astype(int)).mean() > 2  # the LoRA changes the model
    # overrides win over the adapter's settings
    g2 = load_generator(tiny_sd_adapter, num_inference_steps=2, label=1, scheduler="dpm++")
    m2 = g2.generate(1, 0).meta[0]
    assert (m2["num_inference_steps"], m2["label"], m2["scheduler"]) == (2, 1, "dpm++")
    assert g2.spec["overrides"] == {"num_inference_steps": 2, "label": 1, "scheduler": "dpm++"}


def test_img2img_names_its_source_images(tiny_sd_dir, tmp_path):
    from PIL import Image

    src = tmp_path / "real"
    src.mkdir()
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    rgb = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(gray).save(src / "a.png")
    Image.fromarray(rgb).save(src / "b.png")
    gen = _sd(tiny_sd_dir, mode="img2img", source_images=src, strength=0.5)
    batch = gen.generate(4, 0)
    hashes = [image_sha256(gray), image_sha256(rgb)]
    assert [m["source_image"] for m in batch.meta] == [hashes[0], hashes[1], hashes[0], hashes[1]]
    assert all(m["mode"] == "img2img" and m["strength"] == 0.5 for m in batch.meta)
    np.testing.assert_array_equal(gen.generate(1, 3).images[0], batch.images[3])
    txt = _sd(tiny_sd_dir).generate(4, 0).images
    assert np.abs(txt.astype(int) - batch.images.astype(int)).mean() > 5
    assert gen.spec["overrides"]["source_images"] == str(src.resolve())  # a worker can rebuild it
    np.testing.assert_array_equal(synthaug.generator_from_spec(gen.spec).generate(1, 1).images[0], batch.images[1])


def test_grayscale_and_output_size(tiny_sd_dir, sd_gen):
    gen = _sd(tiny_sd_dir, grayscale=True, output_size=(12, 16))
    batch = gen.generate(2, 5)
    assert batch.images.shape == (2, 12, 16, 1)
    assert batch.meta[0]["resolution"] == [12, 16] and batch.meta[0]["generation_resolution"] == [32, 32]
    from PIL import Image

    rgb = sd_gen.generate(1, 5).images[0]
    small = np.asarray(Image.fromarray(rgb).resize((16, 12), Image.LANCZOS)).astype(np.float32)
    luma = np.clip((small @ np.array([0.299, 0.587, 0.114], np.float32)).round(), 0, 255)
    np.testing.assert_array_equal(batch.images[0, :, :, 0], luma.astype(np.uint8))


def test_gray_label_space_from_the_adapter(tiny_sd_adapter, tmp_path):
    import shutil

    gray = tmp_path / "gray-adapter"
    shutil.copytree(tiny_sd_adapter, gray)
    cfg = json.loads((gray / "synthaug.json").read_text())
    cfg.update(channels=3, target_channels=1, output_size=[28, 28])  # model RGB, real images gray
    (gray / "synthaug.json").write_text(json.dumps(cfg))
    batch = load_generator(gray).generate(1, 0)
    assert batch.images.shape == (1, 28, 28, 1) and batch.meta[0]["resolution"] == [28, 28]


def test_schedulers_are_deterministic_per_image(tiny_sd_dir):
    for name in ("dpm++", "euler-a", "EulerDiscreteScheduler"):
        gen = _sd(tiny_sd_dir, scheduler=name, guidance_scale=1.0)
        pair = gen.generate(2, 7)
        np.testing.assert_array_equal(gen.generate(1, 8).images[0], pair.images[1])
        assert pair.meta[0]["scheduler"] == name


def test_pixel_ddpm_unipc_is_deterministic_per_image(tiny_ddpm_dir):
    # batch 1: image i of generate(n, s) is generate(1, s + i), bit for bit
    gen = load_generator(tiny_ddpm_dir, label=1, scheduler="unipc", num_inference_steps=4, guidance_scale=2.0, batch_size=1)
    pair = gen.generate(2, 7)
    np.testing.assert_array_equal(gen.generate(2, 7).images, pair.images)
    np.testing.assert_array_equal(gen.generate(1, 8).images[0], pair.images[1])
    assert np.abs(pair.images[0].astype(int) - pair.images[1].astype(int)).mean() > 5  # seeds differ
    assert pair.meta[0]["scheduler"] == "unipc" and gen.spec["overrides"]["scheduler"] == "unipc"
    np.testing.assert_array_equal(synthaug.generator_from_spec(gen.spec).generate(1, 7).images[0], pair.images[0])
    dpm = load_generator(tiny_ddpm_dir, label=1, scheduler="dpm++", num_inference_steps=4, guidance_scale=2.0, batch_size=1)
    assert not np.array_equal(dpm.generate(1, 7).images[0], pair.images[0])  # another sampler, not an alias


def test_pixel_ddpm_channels_last_makes_the_same_images(tiny_ddpm_dir):
    off = load_generator(tiny_ddpm_dir, label=2, num_inference_steps=3, guidance_scale=2.0, batch_size=2, channels_last=False)
    assert off.spec["overrides"]["channels_last"] is False and not synthaug.generator_from_spec(off.spec).channels_last
    plain = off.generate(2, 3).images
    gen = load_generator(tiny_ddpm_dir, label=2, num_inference_steps=3, guidance_scale=2.0, batch_size=2)  # on by default
    assert "channels_last" not in gen.spec["overrides"] and synthaug.generator_from_spec(gen.spec).channels_last
    fast = gen.generate(2, 3).images
    assert np.abs(fast.astype(int) - plain.astype(int)).max() <= 1  # other kernels: float rounding at most


def test_bad_inputs_give_clear_errors(tiny_sd_dir, tiny_sd_adapter, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown built-in model 'builtin:nope'.*available"):
        load_generator("builtin:nope")
    not_pipeline = tmp_path / "not-a-pipeline"
    not_pipeline.mkdir()
    (not_pipeline / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match=str(not_pipeline)):
        load_generator(not_pipeline)
    # an adapter whose base model folder is gone
    import shutil

    orphan = tmp_path / "orphan"
    shutil.copytree(tiny_sd_adapter, orphan)
    cfg = json.loads((orphan / "synthaug.json").read_text())
    cfg["base_model"] = str(tmp_path / "deleted-base")
    (orphan / "synthaug.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match=rf"adapter {orphan} needs its base model {tmp_path / 'deleted-base'}"):
        load_generator(orphan)
    # a hub id that is not in the local cache, offline: no 20 s of retries, a clear instruction
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"nobody-here/no-such-model.*not in the local Hugging Face cache.*download it first"):
        load_generator("nobody-here/no-such-model", prompt="x", label=0)
    with pytest.raises(FileNotFoundError, match=r"missing/folder does not exist \(no such folder\)"):
        load_generator(tmp_path / "missing" / "folder")
    with pytest.raises(ValueError, match="unknown scheduler 'warp-drive'"):
        _sd(tiny_sd_dir, scheduler="warp-drive")
    with pytest.raises(ValueError, match="pass label="):
        load_generator(tiny_sd_dir, prompt="x")
    with pytest.raises(ValueError, match="pass prompt="):
        load_generator(tiny_sd_dir, label=0)
    with pytest.raises(ValueError, match="height must be a positive multiple of 8"):
        _sd(tiny_sd_dir, height=30)
    with pytest.raises(ValueError, match="needs source_images"):
        _sd(tiny_sd_dir, mode="img2img")
    with pytest.raises(ValueError, match="strength must be in"):
        _sd(tiny_sd_dir, mode="img2img", source_images=tmp_path, strength=0)
    with pytest.raises(TypeError):
        load_generator(tiny_sd_dir, prompt="x", label=0, no_such_option=1)


# ---------------------------------------------------------------------------------- worker protocol
def test_one_reading_of_a_model_source_for_generation_and_finetuning(tiny_sd_dir, tiny_sd_adapter, tiny_ddpm_dir, tmp_path, monkeypatch):
    from synthaug.builtin import resolve_builtin
    from synthaug.generation.sources import resolve_source

    builtin = resolve_source("builtin:fashion-mnist-ddpm")
    assert (builtin.backend, builtin.ref, builtin.path, builtin.adapter) == ("pixel-ddpm", "builtin:fashion-mnist-ddpm", resolve_builtin("builtin:fashion-mnist-ddpm"), None)
    assert resolve_source(tiny_ddpm_dir).backend == "pixel-ddpm"
    assert resolve_source(tiny_sd_dir) == resolve_source(tiny_sd_dir, adapters=False)
    assert resolve_source(tiny_sd_dir).backend == "stable-diffusion"
    adapter = resolve_source(tiny_sd_adapter)
    assert (adapter.backend, adapter.adapter) == ("stable-diffusion", Path(tiny_sd_adapter))
    assert adapter.ref == json.loads((Path(tiny_sd_adapter) / "synthaug.json").read_text())["base_model"]
    assert resolve_source("org/model") == resolve_source("org/model", adapters=False)
    assert resolve_source("org/model").path == "org/model"
    with pytest.raises(ValueError, match="is a synthaug adapter; fine-tune its base model instead"):
        resolve_source(tiny_sd_adapter, adapters=False)  # finetune_lora's reading
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"model .*f.bin is a file"):
        resolve_source(tmp_path / "f.bin", what="model")
    with pytest.raises(FileNotFoundError, match=r"model source \./nowhere does not exist \(no such folder\)$"):
        resolve_source("./nowhere")
    # org/name is a hub id, unless a local folder org/ makes it a (missing) path
    monkeypatch.chdir(tmp_path)
    assert resolve_source("runwayml/stable-diffusion-v1-5").path == "runwayml/stable-diffusion-v1-5"
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match=r"^adapter runs/missing does not exist \(no such folder\); with a local folder runs/"):
        resolve_source("runs/missing", what="adapter")
    with pytest.raises(FileNotFoundError, match=r"model nowhere does not exist \(no such folder\), and it is not a hub id"):
        resolve_source("nowhere", what="model")


def test_worker_keeps_min_fresh_within_max_items(tmp_path):
    cache = SyntheticCache(tmp_path / "c")
    worker = GenerationWorker(cache, PatternGenerator(), min_fresh=12, max_items=20, batch_size=4, seed=100, poll_interval=0.02)
    seen_max = []
    watching = threading.Event()

    def watch():
        while not watching.is_set():
            seen_max.append(len(cache))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        worker.start(wait=True, timeout=60)
        # no consumer yet: every record is fresh; it stops at min_fresh (12 = 3 batches)
        _wait_for(lambda: len(cache) >= 12, what="12 records")
        time.sleep(0.3)
        assert len(cache) == 12 and worker.status()["state"] == "running"
        # a consumer takes 10: fresh drops to 2, the worker tops up to >= 12 fresh, but may only
        # evict what the consumer has passed (seq < 10)
        cache.set_cursor("rank0", 10)
        _wait_for(lambda: cache.fresh_count() >= 12, what="top-up")
        time.sleep(0.3)
        assert len(cache) <= 20 and cache.seqs()[0] <= 10
        # fresh is counted from the slowest consumer: one that has passed nothing makes every
        # stored record fresh for it, so the worker idles (a stale cursor must be removed)
        cache.set_cursor("slow", 0)
        cache.set_cursor("rank0", cache.stats()["next_seq"])
        n_before = cache.stats()["next_seq"]
        time.sleep(0.3)
        assert cache.stats()["next_seq"] == n_before and cache.fresh_count() == len(cache) == 20
        cache.remove_cursor("slow")
        _wait_for(lambda: cache.fresh_count() >= 12, what="top-up once the stale cursor is gone")
        assert len(cache) <= 20
        hb = cache.heartbeat()
        assert hb["worker_id"] == worker.worker_id and hb["pid"] == worker.pid
        assert set(hb) >= {"worker_id", "pid", "time", "state", "generated", "images_per_s", "next_seed", "last_error"}
        assert hb["state"] in ("running", "paused") and hb["last_error"] is None
    finally:
        final = worker.stop()
        watching.set()
        watcher.join()
    assert max(seen_max) <= 20
    assert final["state"] == "stopped" and final["exitcode"] == 0 and not worker.is_alive()
    assert cache.heartbeat()["state"] == "stopped"
    worker.raise_if_failed()  # no error
    for seq, meta in cache.metas().items():
        assert meta["seed"] == 100 + seq
        np.testing.assert_array_equal(cache.get(seq).image, pattern_image(100 + seq))


def test_worker_pauses_instead_of_evicting_unseen_records(tmp_path):
    # the cache's own limit (8) is below min_fresh: the worker fills it and pauses, and evicts
    # only records the consumer has passed
    cache = SyntheticCache(tmp_path / "c", max_items=8)
    with GenerationWorker(cache, PatternGenerator(), min_fresh=12, max_items=20, batch_size=3, poll_interval=0.02) as w:
        _wait_for(lambda: (cache.heartbeat() or {}).get("state") == "paused", what="paused")
        assert cache.seqs() == list(range(8)) and w.status()["state"] == "paused"
        cache.set_cursor("rank0", 5)  # passed 0..4
        _wait_for(lambda: cache.stats()["next_seq"] >= 13, what="room made from passed records")
        _wait_for(lambda: (cache.heartbeat() or {}).get("state") == "paused", what="paused again")
        assert cache.seqs() == list(range(5, 13)) and cache.stats()["evicted"] == 5


def test_worker_seeds_never_repeat_across_restarts(tmp_path):
    cache = SyntheticCache(tmp_path / "c")
    gen = PatternGenerator()
    w = GenerationWorker(cache, gen, min_fresh=8, max_items=1000, batch_size=3, seed=7, poll_interval=0.02)
    with w:
        _wait_for(lambda: len(cache) >= 8, what="first fill")
    cache.set_cursor("c", len(cache))  # consumed: the next worker must generate again
    w.start(wait=True)  # the same object restarts
    _wait_for(lambda: cache.fresh_count() >= 8, what="second fill")
    w.stop()
    cache.set_cursor("c", cache.stats()["next_seq"])
    with GenerationWorker(cache.path, gen.spec, min_fresh=5, max_items=1000, batch_size=2, seed=7, poll_interval=0.02):
        _wait_for(lambda: cache.fresh_count() >= 5, what="third fill")
    seeds = [m["seed"] for m in cache.metas().values()]
    assert len(seeds) == len(set(seeds)) == len(cache) >= 21
    assert seeds == [7 + q for q in cache.seqs()]
    assert cache.heartbeat()["next_seed"] == 7 + cache.stats()["next_seq"]


def test_worker_sigkill_mid_write_then_new_worker_continues(tmp_path):
    # big records (16 × 128×128×3 per append) so that kills land inside transactions too
    cache = SyntheticCache(tmp_path / "c", map_size=1 << 22)
    gen = PatternGenerator(size=128)
    rng = np.random.default_rng(0)
    for round_ in range(5):
        w = GenerationWorker(cache, gen, min_fresh=10_000, max_items=10_000, batch_size=16, seed=0, poll_interval=0.01)
        w.start(wait=True, timeout=60)
        before = len(cache)
        _wait_for(lambda: len(cache) > before, what="appends")
        time.sleep(float(rng.uniform(0.0, 0.2)))
        killed_at = time.time()
        os.kill(w.pid, signal.SIGKILL)
        _wait_for(lambda: not w.is_alive(), what="the killed worker to be reaped")
        assert w.status()["exitcode"] == -signal.SIGKILL
        with pytest.raises(GenerationWorkerError, match="killed by signal SIGKILL"):
            w.raise_if_failed()
        _wait_for(lambda: (cache.heartbeat() or {}).get("state") == "failed", what="post-mortem heartbeat")
        hb = cache.heartbeat()  # written on the dead worker's behalf, stamped when its death was seen
        assert hb["pid"] == w.pid and killed_at <= hb["time"] <= time.time() and "status -9" in hb["last_error"]
        report = cache.verify()
        assert report["corrupt"] == 0 and report["problems"] == [] and report["ok"] == len(cache)
        assert (len(cache) - FIRST_BATCH) % 16 == 0  # whole appends only (the first worker's first: FIRST_BATCH)
    seqs = cache.seqs()
    assert seqs == list(range(len(seqs)))
    assert [m["seed"] for m in cache.metas().values()] == seqs


def test_sd_worker_killed_then_a_new_one_continues(tmp_path, tiny_sd_adapter):
    """The same with the real Stable-Diffusion generator (tiny pipeline through from_pretrained
    and load_lora_weights): a worker SIGKILLed while generating and appending leaves a cache that
    verifies clean, and a new worker continues its seed sequence."""
    cache = SyntheticCache(tmp_path / "c")
    w = GenerationWorker(cache, str(tiny_sd_adapter), min_fresh=10_000, max_items=10_000, batch_size=2, seed=0, num_threads=1, poll_interval=0.01)
    w.start(wait=True, timeout=120)
    _wait_for(lambda: len(cache) >= 4, timeout=120, what="SD records")
    os.kill(w.pid, signal.SIGKILL)
    _wait_for(lambda: not w.is_alive(), what="the killed worker to be reaped")
    with pytest.raises(GenerationWorkerError, match="killed by signal SIGKILL"):
        w.raise_if_failed()
    report = cache.verify()
    assert report["corrupt"] == 0 and report["ok"] == len(cache) and len(cache) % 2 == 0
    killed_at = len(cache)
    with GenerationWorker(cache, str(tiny_sd_adapter), min_fresh=killed_at + 4, max_items=10_000, batch_size=2, seed=0, num_threads=1, poll_interval=0.01):
        _wait_for(lambda: len(cache) >= killed_at + 4, timeout=120, what="the new worker's records")
    assert cache.verify()["corrupt"] == 0
    metas = cache.metas()
    assert [m["seed"] for m in metas.values()] == cache.seqs() == list(range(len(cache)))  # no seed repeated or skipped
    assert all(m["adapter_hash"] == metas[0]["adapter_hash"] and m["backend"] == "stable-diffusion" for m in metas.values())


def test_stop_abandons_generation_and_exits_cleanly(tmp_path):
    cache = SyntheticCache(tmp_path / "c")
    w = GenerationWorker(cache, PatternGenerator(delay=30.0), min_fresh=4, max_items=10, batch_size=4)
    w.start(wait=True, timeout=60)
    time.sleep(0.3)  # inside the 30 s generate call
    t0 = time.monotonic()
    final = w.stop(timeout=20)
    assert time.monotonic() - t0 < 10 and final["exitcode"] == 0 and final["state"] == "stopped"
    assert len(cache) == 0 and cache.heartbeat()["state"] == "stopped"


def test_generator_error_reaches_the_caller(tmp_path):
    cache = SyntheticCache(tmp_path / "c")
    gen = FailingGenerator(message="GPU on fire (test)", fail_on=3)
    with pytest.raises(GenerationWorkerError) as info:
        with GenerationWorker(cache, gen, min_fresh=100, max_items=200, batch_size=2, poll_interval=0.02) as w:
            _wait_for(lambda: not w.is_alive(), what="the failure")
    err = info.value
    assert err.exc_type == "RuntimeError" and err.message == "GPU on fire (test)" and err.exitcode == 1
    assert "GPU on fire (test)" in str(err) and "stub_generators.py" in err.worker_traceback
    hb = cache.heartbeat()
    assert hb["state"] == "failed" and hb["last_error"] == "RuntimeError: GPU on fire (test)"
    assert len(cache) == 4 and cache.verify()["corrupt"] == 0  # two good batches, then the failure
    assert w.status()["state"] == "failed"
    # a model that cannot be loaded fails start(wait=True) with the path in the message
    bad = GenerationWorker(cache, str(tmp_path / "no-such-adapter"), min_fresh=1, max_items=10)
    with pytest.raises(GenerationWorkerError, match=r"FileNotFoundError: .*no-such-adapter"):
        bad.start(wait=True, timeout=60)
    # an error is not raised over another exception already propagating
    with pytest.raises(KeyError):
        with GenerationWorker(cache, FailingGenerator(), min_fresh=100, max_items=200, poll_interval=0.02) as w2:
            _wait_for(lambda: not w2.is_alive(), what="the failure")
            raise KeyError("the training loop's own error")


def test_worker_argument_checks(tmp_path, sd_gen, tiny_sd_dir):
    cache = SyntheticCache(tmp_path / "c")
    with pytest.raises(ValueError, match=r"max_items \(5\) must be >= min_fresh \(10\)"):
        GenerationWorker(cache, PatternGenerator(), min_fresh=10, max_items=5)
    with pytest.raises(ValueError, match="min_fresh must be a positive int"):
        GenerationWorker(cache, PatternGenerator(), min_fresh=0, max_items=5)
    with pytest.raises(ValueError, match="read-only"):
        GenerationWorker(SyntheticCache(tmp_path / "c", readonly=True), PatternGenerator(), min_fresh=1, max_items=5)
    in_memory = _sd(tiny_sd_dir, mode="img2img", source_images=[np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(ValueError, match="in memory"):
        GenerationWorker(cache, in_memory, min_fresh=1, max_items=5)
    w = GenerationWorker(cache, sd_gen, min_fresh=1, max_items=5, device="cpu")
    assert w.spec["overrides"]["device"] == "cpu" and w.status()["state"] == "not started" and w.pid is None


def test_import_stays_light():
    code = (
        "import sys, synthaug; synthaug.GenerationWorker; synthaug.load_generator; synthaug.GenerationWorkerError; "
        "import synthaug.cli.generate, synthaug.cli.worker; "
        "heavy = [m for m in ('torch', 'diffusers', 'peft', 'transformers') if m in sys.modules]; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---------------------------------------------------------------------------------- real models in a worker
def test_worker_with_tiny_sd_records_regenerate_from_their_meta(tmp_path, tiny_sd_adapter, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned worker
    cache = SyntheticCache(tmp_path / "c")
    with GenerationWorker(cache, str(tiny_sd_adapter), min_fresh=6, max_items=50, batch_size=3, seed=11, num_threads=1) as w:
        _wait_for(lambda: len(cache) >= 6, timeout=120, what="6 records")
        st = w.status()
        assert st["state"] == "running" and st["generated"] >= 6 and st["images_per_s"] > 0
    assert cache.verify()["corrupt"] == 0 and cache.heartbeat()["state"] == "stopped"
    regen = {}
    for seq, meta in cache.metas().items():
        assert meta["seed"] == 11 + seq and meta["adapter"] == str(tiny_sd_adapter) and meta["batch"] == [meta["seed"], 1]
        key = (meta["source"], json.dumps(meta["overrides"], sort_keys=True))
        if key not in regen:
            regen[key] = load_generator(meta["source"], **meta["overrides"])
        np.testing.assert_array_equal(regen[key].generate(1, meta["seed"]).images[0], cache.get(seq).image)


class _RealImages:
    """A real dataset of 32×32 RGB uint8 images (numpy H×W×C) with labels 0..5."""

    def __init__(self, n=16):
        rng = np.random.default_rng(3)
        self.images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(i % 6)


def test_worker_feeds_a_waiting_sampler_through_a_dataloader(tmp_path, tiny_sd_adapter, monkeypatch):
    from synthaug import RatioBatchSampler
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cache = SyntheticCache(tmp_path / "c")  # empty: the sampler must wait for the worker
    mixed = synthaug.MixedDataset(_RealImages(16), cache)
    sampler = RatioBatchSampler(mixed, batch_size=4, synthetic_ratio=0.5, on_exhausted="wait", wait_timeout=120, seed=0)
    loader = torch.utils.data.DataLoader(mixed, batch_sampler=sampler, num_workers=2)
    sizes, stop_watch = [], threading.Event()

    def watch():
        while not stop_watch.is_set():
            sizes.append(len(cache))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    worker = GenerationWorker(cache, str(tiny_sd_adapter), min_fresh=8, max_items=24, batch_size=4, seed=0, num_threads=1)
    synthetic_seen = 0
    try:
        with worker:
            for epoch in range(2):  # 2 epochs × 8 batches × 2 synthetic = 32 > max_items: eviction needed
                sampler.set_epoch(epoch)
                for x, y in loader:
                    assert x.shape == (4, 32, 32, 3) and x.dtype == torch.uint8
                    assert int((y == 6).sum()) == 2  # exactly r·B synthetic items, label from the adapter
                    synthetic_seen += 2
            assert worker.is_alive()
            pid = worker.pid
        assert not worker.is_alive() and worker.status()["exitcode"] == 0
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        stop_watch.set()
        watcher.join()
    assert synthetic_seen == 32 and max(sizes) <= 24 and cache.stats()["evicted"] > 0
    assert cache.verify()["corrupt"] == 0 and cache.heartbeat()["state"] == "stopped"
    seeds = [m["seed"] for m in cache.metas().values()]
    assert seeds == cache.seqs()  # seed 0 + seq, never repeated


def test_a_failed_worker_ends_a_waiting_sampler_at_once(tmp_path):
    """A sampler waiting (through DataLoader workers) for records from a worker that has failed
    raises the worker's error within seconds, not after wait_timeout; the context manager raises
    the worker's own error with its traceback."""
    import torch

    from synthaug import MixedDataset, RatioBatchSampler

    cache = SyntheticCache(tmp_path / "c")
    mixed = MixedDataset(_RealImages(16), cache)
    sampler = RatioBatchSampler(mixed, batch_size=4, synthetic_ratio=0.5, on_exhausted="wait", wait_timeout=300, seed=0)
    loader = torch.utils.data.DataLoader(mixed, batch_sampler=sampler, num_workers=2)
    gen = FailingGenerator(message="CUDA out of memory (test)", fail_on=2, size=32)
    t0 = time.monotonic()
    with pytest.raises(GenerationWorkerError) as info:
        with GenerationWorker(cache, gen, min_fresh=100, max_items=200, batch_size=2, poll_interval=0.02):
            for epoch in range(2):  # 2 synthetic per batch: the two records made before the failure run out
                sampler.set_epoch(epoch)
                for _ in loader:
                    pass
    assert time.monotonic() - t0 < 60  # not the 300 s timeout
    err = info.value
    assert err.exc_type == "RuntimeError" and err.message == "CUDA out of memory (test)"
    assert "stub_generators.py" in err.worker_traceback  # the worker's own report, not only the heartbeat's
    assert len(cache) == 2 and cache.verify()["corrupt"] == 0

    # a sampler that starts waiting after the failure (no GenerationWorker object in this process)
    # reads the failure from the heartbeat
    fresh = RatioBatchSampler(mixed, batch_size=4, synthetic_ratio=1.0, batches_per_epoch=3, on_exhausted="wait", wait_timeout=300, seed=1)
    t0 = time.monotonic()
    with pytest.raises(GenerationWorkerError, match=r"CUDA out of memory \(test\).*restart the worker"):
        list(fresh)
    assert time.monotonic() - t0 < 30
    # a failure older than wait_timeout belongs to a past run: the wait runs to its own timeout
    time.sleep(max(0.0, cache.heartbeat()["time"] + 2.5 - time.time()))
    patient = RatioBatchSampler(mixed, batch_size=4, synthetic_ratio=1.0, batches_per_epoch=3, on_exhausted="wait", wait_timeout=2, seed=2)
    with pytest.raises(synthaug.SyntheticExhaustedError, match="waited"):
        list(patient)


# ---------------------------------------------------------------------------------- CLI
def _peek(path):
    """A read-only view of a cache another process is creating (``None`` until it exists)."""
    try:
        return SyntheticCache(path, readonly=True)
    except (FileNotFoundError, synthaug.CacheFormatError):
        return None


def _run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "synthaug", *map(str, args)], cwd=REPO, env=ENV_1T, capture_output=True, text=True, timeout=timeout)


def test_cli_generate_prefills_and_regenerates(tmp_path, tiny_sd_adapter):
    out = _run_cli("generate", "--adapter", tiny_sd_adapter, "--cache", tmp_path / "c", "--count", 3, "--seed", 5)
    assert out.returncode == 0, out.stderr
    assert f"wrote 3 images (seq 0..2, seeds 5..7) from {tiny_sd_adapter} to {tmp_path / 'c'}" in out.stdout
    assert "generate: 3/3 img (100%)" in out.stderr and "\r" not in out.stderr  # the progress, as lines in a redirected log
    assert "No LoRA keys associated" not in out.stderr  # diffusers' notice about the text encoder, true of every adapter
    cache = SyntheticCache(tmp_path / "c", readonly=True)
    rec = cache.get(1)
    assert rec.meta["seed"] == 6 and rec.label == 6
    again = load_generator(rec.meta["source"], **rec.meta["overrides"]).generate(1, rec.meta["seed"])
    np.testing.assert_array_equal(again.images[0], rec.image)
    # errors: one line, no traceback, naming what was wrong
    bad = _run_cli("generate", "--model", "builtin:nope", "--label", 0, "--cache", tmp_path / "d", "--count", 1)
    assert bad.returncode == 2 and "synthaug generate: error: unknown built-in model 'builtin:nope'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_cli_missing_adapter_or_model_is_named_and_no_cache_is_created(tmp_path):
    (tmp_path / "runs").mkdir()
    for args, message in (
        (["generate", "--adapter", "DOES_NOT_EXIST", "--count", 1], "adapter DOES_NOT_EXIST does not exist (no such folder)"),
        (["generate", "--adapter", "runs/DOES_NOT_EXIST", "--count", 1], "adapter runs/DOES_NOT_EXIST does not exist (no such folder)"),
        (["generate", "--model", "runs/missing", "--label", 0, "--count", 1], "model runs/missing does not exist (no such folder)"),
        (["worker", "--adapter", "runs/DOES_NOT_EXIST", "--min-fresh", 1, "--max-items", 2], "adapter runs/DOES_NOT_EXIST does not exist"),
    ):
        out = subprocess.run([sys.executable, "-m", "synthaug", *map(str, args), "--cache", "new.lmdb"], cwd=tmp_path, env=ENV_1T,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and f"synthaug {args[0]}: error: {message}" in out.stderr, out.stderr
        assert not (tmp_path / "new.lmdb").exists(), args


def test_cli_generate_ctrl_c_leaves_a_valid_cache(tmp_path, tiny_ddpm_dir):
    path = tmp_path / "c"
    proc = subprocess.Popen(
        [sys.executable, "-m", "synthaug", "generate", "--model", str(tiny_ddpm_dir), "--label", "1", "--cache", str(path),
         "--count", "100000", "--batch-size", "2", "--steps", "20"],
        cwd=REPO, env=ENV_1T, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_for(lambda: _peek(path) is not None and len(_peek(path)) >= 4, timeout=120, what="records")
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    cache = SyntheticCache(path, readonly=True)
    n = len(cache)
    assert f"interrupted after writing {n} images" in stdout and str(path) in stdout
    assert cache.verify()["corrupt"] == 0 and n % 2 == 0
    assert [m["seed"] for m in cache.metas().values()] == list(range(n))


def test_cli_worker_runs_until_ctrl_c(tmp_path, tiny_ddpm_dir):
    path = tmp_path / "c"
    proc = subprocess.Popen(
        [sys.executable, "-m", "synthaug", "worker", "--model", str(tiny_ddpm_dir), "--label", "2", "--cache", str(path),
         "--min-fresh", "6", "--max-items", "10", "--batch-size", "3", "--poll-interval", "0.05", "--worker-id", "cli-test"],
        cwd=REPO, env=ENV_1T, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        def ready():
            c = _peek(path)
            return c is not None and len(c) >= 6 and (c.heartbeat() or {}).get("state") == "running"

        _wait_for(ready, timeout=120, what="the worker to fill the cache")
        cache = SyntheticCache(path, readonly=True)
        assert len(cache) == 6  # idle at min_fresh
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    hb = cache.heartbeat()
    assert hb["state"] == "stopped" and hb["worker_id"] == "cli-test" and hb["generated"] == 6
    assert "stopped by Ctrl-C after generating 6 images" in stdout and cache.label_names == ["a", "b", "c"]


# ---------------------------------------------------------------------------------- docs and benchmark
def test_readme_generating_snippet_runs(tmp_path, tiny_sd_adapter, monkeypatch):
    code = readme_python("## Generating")
    code = code.replace('"cache/adapters/shirt"', repr(str(tiny_sd_adapter))).replace('"cache/shirt.lmdb"', repr(str(tmp_path / "shirt.lmdb")))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    exec(compile(code, "README.md#generating", "exec"), {})
    cache = SyntheticCache(tmp_path / "shirt.lmdb", readonly=True)
    assert cache.fresh_count() >= 16 and cache.heartbeat()["state"] == "stopped"


def test_benchmark_quick_smoke(tmp_path, tiny_ddpm_dir, tiny_sd_dir):
    from synthaug.benchmarks import generate as bench

    result = bench.main(["--quick", "--model", str(tiny_ddpm_dir), "--no-gpu", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "generate_quick.json").read_text())
    assert saved["device"] and len(saved["cpu"]["rows"]) == len(result["cpu"]["rows"]) == 4
    assert all(r["images/s"] > 0 for r in saved["cpu"]["rows"])
    assert result["gpu"]["skipped"]
    # the GPU comparison's code path, shrunk to the tiny pipeline on CPU (no compile, no timing claims)
    rows = bench.compare_sd(tiny_sd_dir, device="cpu", size=32, steps=2, configs={"ours bf16 b2": dict(dtype="bf16", batch_size=2)}, n_default=1, n_ours=2, repeats=1)
    assert [r["config"] for r in rows] == ["diffusers default", "ours bf16 b2"] and rows[1]["dtype"] == "bfloat16"
