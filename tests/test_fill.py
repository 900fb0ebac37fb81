"""``fill_cache`` / ``generate_into``: the one generate-then-append loop (``synthaug generate``,
the sweep's pre-fill, the worker's batches), its seed rules (with and without a fidelity gate)
and its clean stop."""

import os
import signal

import numpy as np
import pytest

from synthaug.cache.store import SyntheticCache
from synthaug.generation.fill import fill_cache, generate_into
from synthaug.generation.gate import FidelityGate
from synthaug.generation.stopping import StopRequested, StopSignal
from tests.helpers.stub_generators import FashionGenerator, PatternGenerator, fashion_reference_classifier, pattern_image

SHIRT = 6


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
    assert second.seqs == list(range(10, 15)) and second.seeds == list(range(1010, 1015)) and second.next_seed == 1015
    assert second.generated == 5 and second.rejected == 0 and second.acceptance_rate == 1.0
    assert cache.seed_counter(1000) is None  # no gate, no counter: the sequence rule
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

    def __getattr__(self, name):
        return getattr(self.cache, name)

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
        generate_into(Stops(), SyntheticCache(tmp_path / "c.lmdb"), 2, 0)


def test_the_workers_limit_may_store_fewer_and_the_caller_sees_which(tmp_path):
    cache = SyntheticCache(tmp_path / "c.lmdb")
    cache.set_cursor("trainer", 0)  # a live consumer that has been handed nothing: nothing may go
    fill_cache(PatternGenerator(), cache, 3, seed=0)
    stored = []
    out = generate_into(PatternGenerator(), cache, 4, cache.bounds()[1], fit_within=5, stored=lambda b: stored.extend(b.seqs))
    assert out.seqs == stored == [3, 4] and out.seeds == [3, 4] and out.generated == 4
    assert len(cache) == 5


# ------------------------------------------------------------------ with a fidelity gate
@pytest.fixture(scope="module")
def gate(tmp_path_factory, one_torch_thread):
    return FidelityGate(fashion_reference_classifier(tmp_path_factory.mktemp("reference")), label="Shirt")


class _Crashes(FashionGenerator):
    """Dies inside ``generate`` (after its seeds were reserved), like a killed writer."""

    def generate(self, n, seed):
        raise RuntimeError("killed while generating (test)")


def test_a_gated_fill_counts_what_it_kept_and_no_seed_repeats_across_fills_a_crash_and_an_ungated_fill(tmp_path, gate):
    cache = SyntheticCache(tmp_path / "c.lmdb")
    gen1 = FashionGenerator()  # half shirts, half trousers, all labelled Shirt
    first = fill_cache(gen1, cache, 10, seed=500, gate=gate, batch_size=8)
    assert first.written == 10 and first.seqs == list(range(10)) and not first.interrupted
    assert first.generated == len(gen1.seeds) == first.accepted + first.rejected and first.accepted == 10 + first.surplus
    assert first.rejected > 0 and 0.2 < first.acceptance_rate < 0.9
    assert gen1.seeds == list(range(500, 500 + first.generated))  # consecutive from seed + next_seq (0)
    metas = cache.metas()
    assert [m["seed"] for m in metas.values()] == first.seeds
    assert all(m["gate_score"] >= 0.5 and m["gate"] == gate.spec for m in metas.values())
    assert np.mean([m["shown_class"] == SHIRT for m in metas.values()]) >= 0.9 and all(cache.get(q).label == SHIRT for q in first.seqs)
    assert cache.seed_counter(500) == first.next_seed == 500 + first.generated  # every seed made was reserved first

    # a writer that dies while generating: its batch's seeds were reserved first, so they are skipped
    with pytest.raises(RuntimeError, match="killed while generating"):
        fill_cache(_Crashes(), cache, 5, seed=500, gate=gate, batch_size=8)
    assert cache.seed_counter(500) == first.next_seed + 5  # the dead batch's 5 seeds stay used

    gen2 = FashionGenerator()
    second = fill_cache(gen2, cache, 5, seed=500, gate=gate, batch_size=8)
    assert gen2.seeds[0] == first.next_seed + 5 and second.seqs == list(range(10, 15))
    # an ungated fill of a block with a counter follows the counter too
    gen3 = FashionGenerator()
    third = fill_cache(gen3, cache, 4, seed=500, batch_size=8)
    assert gen3.seeds == third.seeds == list(range(second.next_seed, second.next_seed + 4)) and third.rejected == 0
    made = gen1.seeds + gen2.seeds + gen3.seeds
    assert len(made) == len(set(made))  # no seed made twice, stored or rejected
    stored = [m["seed"] for m in cache.metas().values()]
    assert stored == first.seeds + second.seeds + third.seeds and len(stored) == len(set(stored)) == 19
    assert cache.seed_counter(500) == third.next_seed and cache.seed_counter(10**9) is None  # per seed block


def test_a_gate_that_accepts_almost_nothing_stops_the_fill_naming_the_rate(tmp_path, gate):
    cache = SyntheticCache(tmp_path / "c.lmdb")
    nothing = FidelityGate(gate.reference, label="Shirt", low=0.5, high=0.5)  # a probability of exactly 0.5 only
    with pytest.raises(RuntimeError, match=r"accepted 0 of 330 generated images \(0\.00%\), below the 1%"):
        fill_cache(FashionGenerator(), cache, 10, seed=0, gate=nothing, batch_size=64)
    assert len(cache) == 0 and cache.seed_counter(0) == 330  # 10, then 64 a batch
