"""``fill_cache`` / ``generate_into``: the one generate-then-append loop (``synthaug generate``,
the sweep's pre-fill, the worker's batches), its seed rule and its clean stop."""

import os
import signal

import numpy as np
import pytest

from synthaug.cache.store import SyntheticCache
from synthaug.generation.fill import fill_cache, generate_into
from synthaug.generation.stopping import StopRequested, StopSignal
from tests.helpers.stub_generators import PatternGenerator, pattern_image


@pytest.fixture
def restore_signals():
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in old.items():
        signal.signal(sig, handler)


def test_record_q_has_seed_base_plus_q_across_runs_and_batch_sizes(tmp_path):
    cache = SyntheticCache(tmp_path / "c.lmdb")
    gen = PatternGenerator(label=2)
    first = fill_cache(gen, cache, 10, seed=1000, batch_size=4)
    assert first.seqs == list(range(10)) and not first.interrupted
    assert gen.calls == 3  # 4 + 4 + 2
    second = fill_cache(gen, cache, 5, seed=1000, batch_size=3)  # a later run continues the sequence
    assert second.seqs == list(range(10, 15))
    for seq in range(15):
        record = cache.get(seq)
        assert record.meta["seed"] == 1000 + seq
        assert np.array_equal(record.image, pattern_image(1000 + seq))
        assert record.label == 2


def test_label_and_transform_apply_to_every_record_and_provenance_keeps_the_generators(tmp_path):
    cache = SyntheticCache(tmp_path / "c.lmdb")
    seen = []

    def brighter(image):
        seen.append(image.shape)
        return np.minimum(image.astype(np.int32) + 1, 255).astype(np.uint8)

    done = fill_cache(PatternGenerator(label=2), cache, 3, seed=7, label=5, transform=brighter)
    assert seen == [(8, 8, 1)] * 3  # one uint8 H×W×C image at a time
    for seq in done.seqs:
        record = cache.get(seq)
        assert record.label == 5
        assert record.meta["overrides"]["label"] == 2
        assert np.array_equal(record.image, np.minimum(pattern_image(7 + seq).astype(np.int32) + 1, 255))


class _SignalDuringAppend:
    """A cache whose ``append`` receives SIGTERM while it runs (the worst moment for a stop)."""

    def __init__(self, cache, on_call: int) -> None:
        self.cache, self.on_call, self.calls = cache, on_call, 0

    def bounds(self):
        return self.cache.bounds()

    def append(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.on_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.cache.append(*args, **kwargs)


def test_a_stop_during_an_append_finishes_it_and_reports_it(tmp_path, restore_signals):
    cache = SyntheticCache(tmp_path / "c.lmdb")
    stop = StopSignal()
    stop.install()
    done = fill_cache(PatternGenerator(), _SignalDuringAppend(cache, on_call=2), 100, seed=0, batch_size=4, stop=stop)
    assert done.interrupted and stop.signum == signal.SIGTERM
    assert done.seqs == list(range(8)) == cache.seqs()  # the append in flight was finished and counted


def test_a_stop_during_generation_abandons_that_batch_only(tmp_path, restore_signals):
    class SignalOnThirdCall(PatternGenerator):
        def generate(self, n, seed):
            if self.calls == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().generate(n, seed)

    cache = SyntheticCache(tmp_path / "c.lmdb")
    stop = StopSignal()
    stop.install()
    done = fill_cache(SignalOnThirdCall(), cache, 100, seed=0, batch_size=4, stop=stop)
    assert done.interrupted and done.seqs == list(range(8)) == cache.seqs()


def test_without_a_stop_signal_the_stop_is_not_swallowed(tmp_path):
    class Stops(PatternGenerator):
        def generate(self, n, seed):
            raise StopRequested()

    with pytest.raises(StopRequested):
        generate_into(Stops(), SyntheticCache(tmp_path / "c.lmdb"), 2, 0, seed=0)


def test_the_workers_limit_may_store_fewer_and_the_caller_sees_which(tmp_path):
    cache = SyntheticCache(tmp_path / "c.lmdb")
    cache.set_cursor("trainer", 0)  # a live consumer that has been handed nothing: nothing may go
    fill_cache(PatternGenerator(), cache, 3, seed=0)
    stored = []
    seqs = generate_into(PatternGenerator(), cache, 4, cache.bounds()[1], seed=0, fit_within=5, stored=stored.extend)
    assert seqs == stored == [3, 4]
    assert len(cache) == 5
