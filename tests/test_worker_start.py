"""How a training run and its generation worker start together: the worker's first batch is
small when nothing is fresh (a trainer waiting for the first record waits for a few images, not
a full batch), and a trainer whose cache already holds fresh records never waits for the worker."""

import time

import numpy as np

from synthaug import GenerationWorker, SyntheticCache
from synthaug.generation.worker import FIRST_BATCH
from synthaug.mixing import mixed_loader
from tests.helpers.stub_generators import PatternGenerator, pattern_image
from tests.helpers.waiting import wait_for as _wait_for


class _Real:
    classes = [str(i) for i in range(10)]

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return np.zeros((8, 8, 1), np.uint8), i % 10


def test_first_batch_is_small_when_nothing_is_fresh_then_full_batches(tmp_path):
    cache = SyntheticCache(tmp_path / "c")
    with GenerationWorker(cache, PatternGenerator(delay=0.3), min_fresh=30, max_items=100, batch_size=16, seed=0, poll_interval=0.01):
        _wait_for(lambda: len(cache) > 0, what="the first append")
        assert len(cache) == FIRST_BATCH == 4
        _wait_for(lambda: len(cache) >= 30, what="min_fresh")
        time.sleep(0.5)
        assert len(cache) == 4 + 16 + 16  # then full batches, up to min_fresh
    # seeds follow the sequence rule whatever the batch sizes
    assert all(np.array_equal(cache.get(q).image, pattern_image(q, 8)) for q in (0, 3, 4, 19, 35))

    # restarted with fresh records in the cache: full batches at once
    cache.set_cursor("trainer", 20)  # 16 of the 36 stay fresh
    with GenerationWorker(cache, PatternGenerator(delay=0.3), min_fresh=30, max_items=100, batch_size=16, seed=0, poll_interval=0.01):
        _wait_for(lambda: len(cache) > 36, what="the restarted worker's first append")
        assert len(cache) == 36 + 16


def test_a_trainer_whose_cache_holds_min_fresh_never_waits_for_the_worker(tmp_path):
    cache = SyntheticCache(tmp_path / "c")
    cache.append(np.stack([pattern_image(q, 8) for q in range(32)]), [0] * 32)
    # a slow worker (10 s per batch): the trainer must not wait for it while records are fresh
    with GenerationWorker(cache, PatternGenerator(delay=10.0), min_fresh=64, max_items=1000, batch_size=16, seed=0, poll_interval=0.01):
        loader = mixed_loader(_Real(), cache, 16, 0.25, on_exhausted="reuse", consumer="trainer", batches_per_epoch=8)
        t0 = time.perf_counter()
        batches = list(loader)
        took = time.perf_counter() - t0
    stats = loader.batch_sampler.freshness()
    assert len(batches) == 8 and stats["served"] == 32 and stats["fresh"] == 32
    assert stats["waited_s"] == 0.0 and took < 5.0
