"""Mixing: MixedDataset + RatioBatchSampler on real Fashion-MNIST and an LMDB cache.

The synthetic cache of these tests is a TEST FIXTURE (tests/helpers/stand_in_cache.py): real
Fashion-MNIST *test*-split images of one class stand in for generated ones, since the generator
is built elsewhere. The real data is the Fashion-MNIST training split (or a prefix of it).
"""

import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Subset

from synthaug import CorruptRecordError, MixedDataset, RatioBatchSampler, SyntheticCache, SyntheticExhaustedError, mixed_loader
from synthaug.cache.codec import HEADER_SIZE
from synthaug.data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST
from synthaug.mixing import SyntheticIndex, is_synthetic, plan_epoch
from synthaug.mixing.ratio import as_fraction
from tests.helpers.readme import readme_python
from tests.helpers.stand_in_cache import build_stand_in_cache, stand_in_images

REPO = Path(__file__).resolve().parents[1]
SHIRT = FASHION_MNIST_CLASSES.index("Shirt")
COAT = FASHION_MNIST_CLASSES.index("Coat")
TSHIRT = FASHION_MNIST_CLASSES.index("T-shirt/top")
pytestmark = pytest.mark.timeout(300)  # a hang (e.g. a wait that never ends) fails with a traceback
HYPO = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def train():
    return FashionMNIST(train=True)


@pytest.fixture(scope="module")
def shirts(tmp_path_factory):
    """TEST FIXTURE cache: 200 records of real Fashion-MNIST test-split Shirt images."""
    return build_stand_in_cache(tmp_path_factory.mktemp("mix") / "shirts", 200, "Shirt")


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    """TEST FIXTURE cache: 300 records cycling Shirt, Coat, T-shirt/top (test-split images)."""
    return build_stand_in_cache(tmp_path_factory.mktemp("mix") / "three", 300, classes=["Shirt", "Coat", "T-shirt/top"])


def to_tensor(image):
    """uint8 H×W tensor of a PIL "L" image (exact, so items can be compared byte for byte)."""
    return torch.from_numpy(np.asarray(image).copy())


def split(batch):
    return [i for i in batch if not is_synthetic(i)], [i.seq for i in batch if is_synthetic(i)]


def brute_force(n, b, r, drop_last):
    """Batches per epoch by simulation: (list of (real, synthetic) per batch)."""
    q = as_fraction(r) * b
    out, used, i = [], 0, 0
    while True:
        k = math.floor(q * (i + 1)) - math.floor(q * i)
        if used + b - k > n:
            break
        out.append((b - k, k))
        used += b - k
        i += 1
    left = n - used
    if left and not drop_last:
        rr = as_fraction(r)
        out.append((left, math.floor(left * rr / (1 - rr))))
    return out


# ---------------------------------------------------------------------------------- rules 1 and 2
@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 5000), b=st.integers(1, 300), r=st.fractions(0, Fraction(999, 1000), max_denominator=1000), drop=st.booleans())
def test_plan_matches_simulation(n, b, r, drop):
    plan = plan_epoch(n, b, r, drop_last=drop)
    expected = brute_force(n, b, r, drop)
    assert plan.num_batches == len(expected)
    assert [(plan.real_in(i), plan.synthetic_in(i)) for i in range(plan.num_batches)] == expected
    assert plan.real_items == sum(e[0] for e in expected) and plan.synthetic_items == sum(e[1] for e in expected)
    if plan.last_real:
        assert plan.last_real + plan.last_synthetic < b  # the short batch always fits


def test_ratio_is_read_as_a_small_fraction():
    assert as_fraction(0.3) == Fraction(3, 10)
    assert as_fraction(1 / 3) == Fraction(1, 3)
    assert as_fraction(Fraction(7, 9)) == Fraction(7, 9)
    for bad in (True, "0.2", float("nan"), float("inf"), None):
        with pytest.raises(ValueError, match="synthetic_ratio"):
            as_fraction(bad)


ratios = st.one_of(st.fractions(0, Fraction(19, 20), max_denominator=64), st.floats(0, 0.95))


@settings(max_examples=70, **HYPO)
@given(b=st.integers(1, 48), r=ratios, n=st.integers(1, 400), seed=st.integers(0, 2**31), epoch=st.integers(0, 1000), drop=st.booleans())
def test_batches_follow_the_rules(train, shirts, b, r, n, seed, epoch, drop):
    mixed = MixedDataset(Subset(train, range(n)), shirts)
    expected = brute_force(n, b, r, drop)
    make = lambda: RatioBatchSampler(mixed, batch_size=b, synthetic_ratio=r, seed=seed, drop_last=drop)  # noqa: E731
    if not expected:
        with pytest.raises(ValueError, match="no batch fits"):
            make()
        return
    sampler = make()
    sampler.set_epoch(epoch)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(expected)
    q = as_fraction(r) * b
    synthetic_so_far = 0
    all_real = []
    for i, (batch, (n_real, n_syn)) in enumerate(zip(batches, expected)):
        real, syn = split(batch)
        assert (len(real), len(syn)) == (n_real, n_syn), f"batch {i}"
        assert abs(len(syn) - float(q)) < 1 or i == len(expected) - 1  # rule 2: within one of r·B
        synthetic_so_far += len(syn)
        if len(real) + len(syn) == b:
            assert synthetic_so_far == math.floor(q * (i + 1))
        assert all(isinstance(x, int) for x in real) and all(s in range(200) for s in syn)
        all_real += real
    if drop:
        assert len(set(all_real)) == len(all_real) == sum(e[0] for e in expected)
    else:
        assert sorted(all_real) == list(range(n))  # each real index exactly once per epoch
    # same seed and epoch -> same batches (a new sampler over the same cache contents)
    twin = make()
    twin.set_epoch(epoch)
    assert list(twin) == batches
    # another epoch -> another real order
    if n >= 10:
        other = make()
        other.set_epoch(epoch + 1)
        assert [split(x)[0] for x in other] != [split(x)[0] for x in batches]


def _loaded_equals_expected(loader, mixed, expected_batches):
    got = list(loader)
    assert len(got) == len(expected_batches)
    for (x, y), idx in zip(got, expected_batches):
        items = mixed.__getitems__(idx)
        assert torch.equal(x, torch.stack([it[0] for it in items]))
        assert y.tolist() == [it[1] for it in items]
    return got


@pytest.mark.parametrize("persistent", [False, True])
def test_through_a_dataloader_with_two_workers(train, shirts, persistent):
    mixed = MixedDataset(Subset(train, range(300)), shirts, transform=to_tensor)
    sampler = RatioBatchSampler(mixed, batch_size=16, synthetic_ratio=0.3, seed=5, consumer="dl")
    twin = RatioBatchSampler(mixed, batch_size=16, synthetic_ratio=0.3, seed=5, consumer="twin")
    loader = DataLoader(mixed, batch_sampler=sampler, num_workers=2, persistent_workers=persistent)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        twin.set_epoch(epoch)
        expected = list(twin)
        got = _loaded_equals_expected(loader, mixed, expected)
        # each position holds what the sampler put there: the cache record or the real item
        n_syn = 0
        for (x, y), idx in zip(got, expected):
            for pos, index in enumerate(idx):
                if is_synthetic(index):
                    n_syn += 1
                    assert torch.equal(x[pos], torch.from_numpy(shirts.get(index.seq).image[:, :, 0])) and int(y[pos]) == SHIRT
                else:
                    image, target = train[index]
                    assert torch.equal(x[pos], to_tensor(image)) and int(y[pos]) == target
        assert n_syn == sum(len(split(b)[1]) for b in expected) == sampler.stats()["epoch_served"] > 0
        assert [len(split(b)[1]) for b in expected[:-1]] == [brute_force(300, 16, 0.3, False)[i][1] for i in range(len(expected) - 1)]
        assert sorted(i for b in expected for i in split(b)[0]) == list(range(300))
    assert sampler.stats()["served"] == twin.stats()["served"] > 0


# ---------------------------------------------------------------------------------- rule 4: DDP
@pytest.mark.parametrize("n,drop", [(99, False), (100, False), (100, True)])
def test_simulated_ranks_are_disjoint_and_equal_length(train, shirts, n, drop):
    mixed = MixedDataset(Subset(train, range(n)), shirts)
    world = 3
    per_rank = []
    for rank in range(world):
        s = RatioBatchSampler(mixed, batch_size=8, synthetic_ratio=0.25, seed=11, drop_last=drop, num_replicas=world, rank=rank)
        assert s.consumer == f"mixing-rank{rank}"
        epochs = []
        for epoch in range(2):
            s.set_epoch(epoch)
            epochs.append(list(s))
        per_rank.append(epochs)
    per_rank_plan = s.plan()
    for epoch in range(2):
        lengths = {len(per_rank[r][epoch]) for r in range(world)}
        assert len(lengths) == 1, "every rank must yield the same number of batches"
        reals = [[i for b in per_rank[r][epoch] for i in split(b)[0]] for r in range(world)]
        syns = [[s for b in per_rank[r][epoch] for s in split(b)[1]] for r in range(world)]
        for r in range(world):
            assert all(s % world == r for s in syns[r])
        assert not set(syns[0]) & set(syns[1]) and not set(syns[1]) & set(syns[2]) and not set(syns[0]) & set(syns[2])
        counts = Counter(i for rr in reals for i in rr)
        if n % world == 0:
            assert sorted(counts) == list(range(n)) and set(counts.values()) == {1}  # disjoint, complete
        elif drop:
            used = per_rank_plan.real_items  # trimmed to 99, then each rank's short last batch dropped
            assert len(counts) == world * used and set(counts.values()) == {1} and used == 30
        else:
            assert sorted(counts) == list(range(n)) and sum(counts.values()) == n + world - n % world  # padded


def test_torchrun_two_ranks_gloo(tmp_path, shirts):
    out = tmp_path / "ddp.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tests.helpers.ddp_check", str(shirts.path), str(out), "101"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert [r["sampler"] for r in ranks] == [[2, 0], [2, 1]]  # taken from torch.distributed
    assert [r["consumer"] for r in ranks] == ["mixing-rank0", "mixing-rank1"]
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) > 0
    assert ranks[0]["loaded"] and len(ranks[0]["loaded"]) == len(ranks[1]["loaded"])
    real = [{i for b in r["batches"] for kind, i in b if kind == "r"} for r in ranks]
    syn = [{i for b in r["batches"] for kind, i in b if kind == "s"} for r in ranks]
    assert len(real[0] & real[1]) == 1 and len(real[0] | real[1]) == 101  # 101 items: one padded repeat
    assert not syn[0] & syn[1] and all(s % 2 == 0 for s in syn[0]) and all(s % 2 == 1 for s in syn[1])


# ---------------------------------------------------------------------------------- rule 5: classes
def test_per_class_shares_and_class_restriction(train, three_classes):
    labels = three_classes.labels()
    mixed = MixedDataset(Subset(train, range(600)), three_classes)
    shares = {"Shirt": Fraction(1, 5), COAT: 0.1}
    s = RatioBatchSampler(mixed, batch_size=20, synthetic_ratio=shares, seed=2)
    assert s.ratio() == Fraction(3, 10)
    counts = {SHIRT: 0, COAT: 0}
    for i, batch in enumerate(s):
        syn = split(batch)[1]
        assert len(syn) == 6 or i == len(s) - 1
        for seq in syn:
            counts[labels[seq]] += 1  # KeyError would mean a T-shirt was drawn
        if i < len(s) - 1:
            assert abs(counts[SHIRT] - 4 * (i + 1)) < 2 and abs(counts[COAT] - 2 * (i + 1)) < 2
    only = RatioBatchSampler(mixed, batch_size=20, synthetic_ratio=0.25, classes=["Coat", TSHIRT])
    drawn = {labels[seq] for b in only for seq in split(b)[1]}
    assert drawn == {COAT, TSHIRT}
    with pytest.raises(ValueError, match="not both"):
        RatioBatchSampler(mixed, batch_size=20, synthetic_ratio={SHIRT: 0.1}, classes=[SHIRT])


# ---------------------------------------------------------------------------------- rule 6: resume
@pytest.mark.parametrize("k", [0, 3, 17, 40])
def test_resume_yields_exactly_the_remaining_batches(train, three_classes, k):
    mixed = MixedDataset(Subset(train, range(400)), three_classes)
    kw = dict(batch_size=12, synthetic_ratio={"Shirt": 0.25, "Coat": Fraction(1, 12)}, seed=7, max_reuse=5)
    original = RatioBatchSampler(mixed, consumer="orig", **kw)
    original.set_epoch(0)
    list(original)  # a whole epoch first: reuse counts and the cursor are part of the state
    original.set_epoch(1)
    it = iter(original)
    head = [next(it) for _ in range(k)]
    buf = io.BytesIO()
    torch.save(original.state_dict(), buf)
    rest = list(it)
    original.set_epoch(2)
    after = list(original)
    assert len(head) + len(rest) == len(original) == 50

    resumed = RatioBatchSampler(mixed, consumer="resumed", **kw)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    resumed.set_epoch(1)  # a resumed training loop calls it as usual; the position is kept
    assert list(resumed) == rest
    resumed.set_epoch(2)
    assert list(resumed) == after
    assert resumed.stats()["served"] == original.stats()["served"]

    other = RatioBatchSampler(mixed, consumer="x", **dict(kw, batch_size=10))
    with pytest.raises(ValueError, match="batch_size=12"):
        other.load_state_dict(original.state_dict())


def test_state_at_consumed_batches_through_a_prefetching_dataloader(train, shirts):
    mixed = MixedDataset(Subset(train, range(300)), shirts, transform=to_tensor)
    kw = dict(batch_size=10, synthetic_ratio=0.4, seed=1)
    twin = RatioBatchSampler(mixed, consumer="twin", **kw)
    expected = list(twin)
    sampler = RatioBatchSampler(mixed, consumer="live", **kw)
    loader = DataLoader(mixed, batch_sampler=sampler, num_workers=2, prefetch_factor=3)
    consumed = 0
    for _ in loader:
        consumed += 1
        if consumed == 7:
            break
    assert sampler.stats()["batch"] > consumed  # the loader fetched ahead
    state = sampler.state_dict(consumed=consumed)
    assert state["batch"] == consumed
    resumed = RatioBatchSampler(mixed, consumer="resumed", **kw)
    resumed.load_state_dict(state)
    assert list(resumed) == expected[consumed:]
    with pytest.raises(ValueError, match="consumed"):
        sampler.state_dict(consumed=10**6)


# ---------------------------------------------------------------------------------- rule 3: exhaustion
def test_reuse_is_least_reused_first_and_respects_max_reuse(tmp_path, train):
    cache = build_stand_in_cache(tmp_path / "c", 12)
    mixed = MixedDataset(Subset(train, range(80)), cache)
    s = RatioBatchSampler(mixed, batch_size=8, synthetic_ratio=0.5, seed=4)  # 20 batches, 80 draws
    served = Counter()
    for batch in s:
        served.update(split(batch)[1])
        assert max(served.values()) - min(served.values()) <= 1 or len(served) < 12
    assert set(served) == set(range(12)) and sum(served.values()) == 80
    st_ = s.stats()
    assert (st_["fresh"], st_["reused"]) == (12, 68)

    capped = RatioBatchSampler(mixed, batch_size=8, synthetic_ratio=0.5, seed=4, max_reuse=2, wait_timeout=0.3)
    served = Counter()
    with pytest.raises(SyntheticExhaustedError, match=r"max_reuse\+1 = 3 times") as err:
        for batch in capped:
            served.update(split(batch)[1])
    assert max(served.values()) <= 3 and sum(served.values()) == 36 - 36 % 4
    msg = str(err.value)
    assert str(cache.path) in msg and "mixing-rank0" in msg and "waited" in msg and "synthaug worker" in msg
    assert capped.stats()["waited_s"] >= 0.3


def test_wait_blocks_until_a_writer_process_appends(tmp_path, train):
    cache = build_stand_in_cache(tmp_path / "c", 4)
    mixed = MixedDataset(Subset(train, range(16)), cache)
    s = RatioBatchSampler(mixed, batch_size=4, synthetic_ratio=0.5, on_exhausted="wait", wait_timeout=60)
    writer = (
        "import sys, time; from synthaug import SyntheticCache; from tests.helpers.stand_in_cache import stand_in_images\n"
        "time.sleep(0.5)\n"
        "c = SyntheticCache(sys.argv[1])\n"
        "for k in range(3):\n"
        "    c.append(stand_in_images(4, 'Shirt', offset=4 * k), 6, {'writer': k}); time.sleep(0.2)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer, str(cache.path)], cwd=REPO)
    try:
        batches = list(s)
    finally:
        proc.wait(timeout=60)
    seqs = [seq for b in batches for seq in split(b)[1]]
    assert sorted(seqs) == list(range(16)) and seqs == sorted(seqs)  # fresh only, oldest first
    assert s.stats()["waited_s"] > 0.3 and s.stats()["reused"] == 0
    assert cache.cursors()["mixing-rank0"]["next_seq"] == 16


def test_wait_times_out_with_a_clear_message(tmp_path, train):
    cache = build_stand_in_cache(tmp_path / "c", 2)
    mixed = MixedDataset(Subset(train, range(40)), cache)
    s = RatioBatchSampler(mixed, batch_size=4, synthetic_ratio=0.5, on_exhausted="wait", wait_timeout=0.3, consumer="exp1-r{rank}")
    t0 = time.monotonic()
    with pytest.raises(SyntheticExhaustedError) as err:
        list(s)
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    for part in ("waited 0.", "wait_timeout=0.3", "'exp1-r0'", str(cache.path), "2 records", "synthaug worker", "on_exhausted='reuse'"):
        assert part in msg, (part, msg)
    assert s.stats()["batch"] == 1 and s.stats()["served"] == 2  # the failed batch left no trace


def test_error_policy_and_empty_cache(tmp_path, train):
    cache = build_stand_in_cache(tmp_path / "c", 3)
    mixed = MixedDataset(Subset(train, range(40)), cache)
    s = RatioBatchSampler(mixed, batch_size=4, synthetic_ratio=0.5, on_exhausted="error")
    with pytest.raises(SyntheticExhaustedError, match="on_exhausted='error'"):
        list(s)
    empty = MixedDataset(Subset(train, range(40)), SyntheticCache(tmp_path / "empty"))
    s = RatioBatchSampler(empty, batch_size=4, synthetic_ratio=0.5, wait_timeout=0.2)  # reuse: waits for the first records
    with pytest.raises(SyntheticExhaustedError, match="holds 0 records"):
        list(s)


def test_records_added_during_an_epoch_are_used_in_it_and_the_cursor_is_recorded(tmp_path, train):
    cache = build_stand_in_cache(tmp_path / "c", 4)
    mixed = MixedDataset(Subset(train, range(200)), cache)
    calls = []
    real_set_cursor = cache.set_cursor
    cache.set_cursor = lambda *a, **k: (calls.append(a), real_set_cursor(*a, **k))[1]
    s = RatioBatchSampler(mixed, batch_size=10, synthetic_ratio=0.2, cursor_interval=3600)
    it = iter(s)
    first = [split(next(it))[1] for _ in range(3)]
    assert first[:2] == [[0, 1], [2, 3]] and s.stats()["reused"] == 2  # then reuse
    cache.append(stand_in_images(6, "Shirt", offset=50), SHIRT)  # a worker delivers mid-epoch
    nxt = split(next(it))[1] + split(next(it))[1] + split(next(it))[1]
    assert nxt[:6] == [4, 5, 6, 7, 8, 9]  # fresh first, oldest first
    rest = list(it)
    assert len(calls) == 2  # the first batch, then the epoch end: throttled, not one write per batch
    assert cache.cursors()["mixing-rank0"]["next_seq"] == 10 and cache.fresh_count("mixing-rank0") == 0
    assert len(rest) == len(s) - 6


def test_fresh_records_evicted_before_use_are_counted(tmp_path, train):
    cache = build_stand_in_cache(tmp_path / "c", 10, max_items=10)
    mixed = MixedDataset(Subset(train, range(100)), cache)
    s = RatioBatchSampler(mixed, batch_size=10, synthetic_ratio=0.2)
    it = iter(s)
    assert split(next(it))[1] == [0, 1]
    # the store's own max_items spares what a live consumer holds: nothing goes, the cache overflows
    cache.append(stand_in_images(5, "Shirt", offset=20), SHIRT)
    assert len(cache) == 15 and cache.stats()["evicted"] == 0
    assert split(next(it))[1] == [2, 3]
    # without the consumer's cursor (removed, e.g. its run judged dead), records go unseen
    s.close()
    cache.append(stand_in_images(1, "Shirt", offset=30), SHIRT)  # evicts seqs 0..5, two of them unseen
    assert cache.seqs()[0] == 6
    assert split(next(it))[1] == [6, 7]
    assert s.stats()["evicted_unseen"] == 2


# ---------------------------------------------------------------------------------- bad records
def _flip(path, seq, offset):
    import lmdb

    env = lmdb.open(str(path), max_dbs=4)
    db = env.open_db(b"records")
    with env.begin(write=True) as txn:
        value = bytearray(txn.get(seq.to_bytes(8, "big"), db=db))
        value[offset] ^= 0xFF
        txn.put(seq.to_bytes(8, "big"), bytes(value), db=db)
    env.close()


def _flip_elsewhere(path, seq, offset):
    """Damage a record from another process, while this one has the cache open."""
    code = f"from tests.test_mixing import _flip; _flip({str(path)!r}, {seq}, {offset})"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_corrupt_records_are_replaced_counted_and_warned_once(tmp_path, train):
    path = tmp_path / "c"
    classes = ["Shirt", "Coat", "T-shirt/top"]  # record i has class classes[i % 3]
    build_stand_in_cache(path, 21, classes=classes).close()
    _flip(path, 9, 0)  # the magic: the sampler cannot read its label
    _flip(path, 12, HEADER_SIZE + 4 + 200)  # inside the image: the CRC of the label scan fails
    cache = SyntheticCache(path)
    mixed = MixedDataset(Subset(train, range(60)), cache, transform=to_tensor)
    s = RatioBatchSampler(mixed, batch_size=8, synthetic_ratio=0.25, seed=0, max_reuse=0, on_exhausted="reuse", wait_timeout=0.2)
    batches = []
    with pytest.raises(SyntheticExhaustedError):
        for b in s:
            batches.append(b)
    served = {seq for b in batches for seq in split(b)[1]}
    assert 9 not in served and 12 not in served and s.stats()["corrupt_skipped"] == 2
    # damaged after it was sampled: the dataset replaces it when the batch is read, by the
    # nearest older record of the same class (already served: no fresh record is used up)
    _flip_elsewhere(path, 5, HEADER_SIZE + 4 + 200)
    bad = next(b for b in batches if 5 in split(b)[1])
    with pytest.warns(RuntimeWarning, match=r"seq=5 .* is corrupt; served seq=2 \(same label 0"):
        items = mixed.__getitems__(bad)
    with _no_warning():
        mixed.__getitems__(bad)  # warned once per process
    assert mixed.stats() == {"corrupt": 2, "missing": 0, "replaced": 2}
    image, target = items[bad.index(SyntheticIndex(5))]
    assert torch.equal(image, to_tensor(cache.get(2).image[:, :, 0])) and target == TSHIRT == FASHION_MNIST_CLASSES.index(classes[5 % 3])
    # counted in DataLoader worker processes too (shared memory)
    loader = DataLoader(mixed, batch_sampler=[bad, bad], num_workers=2)
    assert len(list(loader)) == 2 and mixed.stats()["corrupt"] == 4
    spawned = DataLoader(mixed, batch_sampler=[bad], num_workers=1, multiprocessing_context="spawn")
    assert len(list(spawned)) == 1 and mixed.stats()["corrupt"] == 5
    strict = MixedDataset(Subset(train, range(60)), cache, on_corrupt="raise")
    with pytest.raises(CorruptRecordError, match=r"seq=5\b"):
        strict.__getitems__(bad)
    # gone between sampling and reading (deleted behind the sampler's back: its hold keeps
    # writers from it, so its cursor is removed first): replaced by an older one of its class
    s.close()
    cache.trim(keep_last=18)  # seqs 0..2 go
    seven = next(i for b in batches for i in b if is_synthetic(i) and i.seq == 7)
    _flip_elsewhere_delete(path, 7)
    assert mixed.__getitems__([seven])[0][1] == COAT and mixed.stats()["missing"] == 1  # seq 4, a Coat
    _flip_elsewhere_delete(path, 3)
    with pytest.raises(CorruptRecordError, match="no readable record with its label"):
        mixed.__getitems__([SyntheticIndex(3, SHIRT)])  # 0 (the older Shirt) is gone too: no other class instead


def _delete(path, seq):
    import lmdb

    env = lmdb.open(str(path), max_dbs=4)
    db = env.open_db(b"records")
    with env.begin(write=True) as txn:
        txn.delete(seq.to_bytes(8, "big"), db=db)
    env.close()


def _flip_elsewhere_delete(path, seq):
    code = f"from tests.test_mixing import _delete; _delete({str(path)!r}, {seq})"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


class _no_warning:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)


# ---------------------------------------------------------------------------------- forms and labels
class ArrayFashion:
    """Real Fashion-MNIST items with the image as a uint8 numpy H×W, a uint8 tensor 1×H×W or a
    float tensor (a dataset that applies its own transform)."""

    classes = FASHION_MNIST_CLASSES

    def __init__(self, base, form, n=50):
        self.base, self.form, self.n = base, form, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        img, y = self.base[i]
        arr = np.asarray(img)
        if self.form == "numpy":
            return arr.copy(), y
        if self.form == "tensor":
            return torch.from_numpy(arr.copy())[None], y
        return torch.from_numpy(arr.copy()).float()[None] / 255, y


def test_synthetic_items_take_the_real_form(train, shirts, tmp_path):
    raw = shirts.get(0).image
    x, y = MixedDataset(Subset(train, range(50)), shirts)[SyntheticIndex(0)]
    assert x.mode == "L" and np.array_equal(np.asarray(x), raw[:, :, 0]) and y == SHIRT and type(y) is int
    x, _ = MixedDataset(ArrayFashion(train, "numpy"), shirts)[SyntheticIndex(0)]
    assert x.dtype == np.uint8 and x.shape == (28, 28) and np.array_equal(x, raw[:, :, 0])
    x, _ = MixedDataset(ArrayFashion(train, "tensor"), shirts)[SyntheticIndex(0)]
    assert x.dtype == torch.uint8 and x.shape == (1, 28, 28)
    with pytest.raises(ValueError, match="pass synthetic_transform"):
        MixedDataset(ArrayFashion(train, "float"), shirts)
    m = MixedDataset(ArrayFashion(train, "float"), shirts, synthetic_transform=lambda pil: torch.from_numpy(np.asarray(pil).copy()).float()[None] / 255)
    x, _ = m[SyntheticIndex(0)]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28)
    big = SyntheticCache(tmp_path / "big")
    big.append(np.zeros((2, 32, 32, 3), np.uint8), SHIRT)
    with pytest.raises(ValueError, match="32×32 images but the real dataset's are 28×28"):
        MixedDataset(Subset(train, range(50)), big)
    x, _ = MixedDataset(Subset(train, range(50)), big, synthetic_transform=lambda im: im.resize((28, 28)))[SyntheticIndex(1)]
    assert x.size == (28, 28) and x.mode == "L"  # RGB record converted to the real mode
    # transforms apply to both kinds alike; the real items are exactly the real dataset's
    m = MixedDataset(Subset(train, range(50)), shirts, transform=to_tensor, target_transform=lambda t: t + 100)
    assert torch.equal(m[3][0], to_tensor(train[3][0])) and m[3][1] == train[3][1] + 100
    assert m[SyntheticIndex(2)][1] == SHIRT + 100
    assert MixedDataset(Subset(train, range(50)), shirts)[7] == train[7]


def test_labels_map_by_name_and_out_of_space_labels_are_refused(tmp_path, train):
    reversed_names = list(reversed(FASHION_MNIST_CLASSES))
    cache = SyntheticCache(tmp_path / "rev", label_names=reversed_names)
    cache.append(stand_in_images(3, "Shirt"), reversed_names.index("Shirt"))
    assert MixedDataset(Subset(train, range(10)), cache)[SyntheticIndex(1)][1] == SHIRT
    odd = SyntheticCache(tmp_path / "odd", label_names=list(FASHION_MNIST_CLASSES) + ["Unicorn"])
    odd.append(stand_in_images(1, "Shirt"), 10)
    with pytest.raises(ValueError, match="'Unicorn'"):
        MixedDataset(Subset(train, range(10)), odd)
    nameless = SyntheticCache(tmp_path / "nameless")
    nameless.append(stand_in_images(1, "Shirt"), 12)
    with pytest.raises(ValueError, match=r"label 12, outside the real dataset's label space \(0..9\)"):
        MixedDataset(train, nameless)


class MultiHotFashion:
    """ChestX-ray14-style multi-hot targets on real Fashion-MNIST images: the class, plus an
    "upper body" tag (index 10) for tops."""

    classes = list(FASHION_MNIST_CLASSES) + ["upper body"]

    def __init__(self, base, n=60):
        self.base, self.n = base, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        img, y = self.base[i]
        t = torch.zeros(11)
        t[y] = 1
        if y in (0, 2, 4, 6):
            t[10] = 1
        return img, t


def test_multi_label_records_become_multi_hot(tmp_path, train):
    real = MultiHotFashion(train)
    cache = SyntheticCache(tmp_path / "ml", label_names=real.classes)
    cache.append(stand_in_images(4, "Shirt"), [[SHIRT, 10], [SHIRT, 10], [3], [SHIRT, 10]])
    mixed = MixedDataset(real, cache)
    _, t = mixed[SyntheticIndex(0)]
    assert t.dtype == torch.float32 and t.tolist() == [0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    assert mixed[SyntheticIndex(2)][1].tolist() == [0, 0, 0, 1] + [0] * 7
    s = RatioBatchSampler(mixed, batch_size=6, synthetic_ratio=Fraction(1, 3), classes=["upper body"])
    drawn = {seq for b in s for seq in split(b)[1]}
    assert drawn == {0, 1, 3}  # the record without the tag is skipped
    loader = DataLoader(mixed, batch_sampler=s, collate_fn=lambda items: torch.stack([t for _, t in items]))
    assert next(iter(loader)).shape == (6, 11)


# ---------------------------------------------------------------------------------- lengths and schedules
def test_batches_per_epoch_ratio_one_and_schedules(train, shirts):
    mixed = MixedDataset(Subset(train, range(30)), shirts)
    s = RatioBatchSampler(mixed, batch_size=8, synthetic_ratio=0.25, batches_per_epoch=4, seed=9)
    seen = Counter()
    for epoch in range(5):  # 5 epochs × 4 batches × 6 real = 120 = 4 passes over 30 items
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == 4 and all(len(split(b)[0]) == 6 and len(split(b)[1]) == 2 for b in batches)
        seen.update(i for b in batches for i in split(b)[0])
    assert set(seen.values()) == {4} and len(seen) == 30
    all_syn = RatioBatchSampler(mixed, batch_size=8, synthetic_ratio=1, batches_per_epoch=3)
    assert [len(split(b)[1]) for b in all_syn] == [8, 8, 8]
    sched = RatioBatchSampler(mixed, batch_size=10, synthetic_ratio=lambda e: [0.0, 0.5, 1.5][e])
    assert len(sched) == 3 and all(not split(b)[1] for b in sched)
    sched.set_epoch(1)
    assert len(sched) == 6 and [len(split(b)[1]) for b in sched] == [5] * 6
    with pytest.raises(ValueError, match=r"synthetic_ratio\(2\) \(the schedule at epoch 2\) is 1.5"):
        sched.set_epoch(2)


# ---------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_with_clear_errors(train, shirts, tmp_path):
    mixed = MixedDataset(Subset(train, range(20)), shirts)
    cases = [
        (dict(synthetic_ratio=-0.1), "synthetic_ratio must be >= 0"),
        (dict(synthetic_ratio=1.0), "pass batches_per_epoch"),
        (dict(synthetic_ratio=1.5, batches_per_epoch=3), "must be <= 1"),
        (dict(synthetic_ratio=0.2, batch_size=0), "batch_size must be >= 1"),
        (dict(synthetic_ratio=0.2, batch_size=2.5), "batch_size must be an int"),
        (dict(synthetic_ratio=0.2, classes=[12]), r"classes holds class 12, outside .* \(0..9\)"),
        (dict(synthetic_ratio=0.2, classes=["Unicorn"]), "'Unicorn', which the real dataset lacks"),
        (dict(synthetic_ratio={"Shirt": 0}), r"synthetic_ratio\['Shirt'\] must be > 0"),
        (dict(synthetic_ratio=0.2, on_exhausted="skip"), "on_exhausted must be one of"),
        (dict(synthetic_ratio=0.2, on_exhausted="wait", max_reuse=2), "never reuses"),
        (dict(synthetic_ratio=0.2, num_replicas=2, rank=2), "rank must be in 0..num_replicas-1"),
        (dict(synthetic_ratio=0.2, wait_timeout=0), "wait_timeout must be"),
        (dict(synthetic_ratio=0.2, seed=-1), "seed must be >= 0"),
        (dict(synthetic_ratio=0.2, batch_size=64, drop_last=True), "no batch fits"),
    ]
    for kwargs, pattern in cases:
        kwargs.setdefault("batch_size", 4)
        with pytest.raises(ValueError, match=pattern):
            RatioBatchSampler(mixed, **kwargs)
    with pytest.raises(ValueError, match="real_dataset is empty"):
        MixedDataset(Subset(train, []), shirts)
    with pytest.raises(ValueError, match="must be a synthaug.MixedDataset"):
        RatioBatchSampler(Subset(train, range(20)), batch_size=4, synthetic_ratio=0.2)
    with pytest.raises(ValueError, match=r"\(image, target\) pairs"):
        MixedDataset([1, 2, 3], shirts)
    with pytest.raises(ValueError, match="on_corrupt must be one of"):
        MixedDataset(train, shirts, on_corrupt="skip")
    with pytest.raises(ValueError, match="builds the batch sampler itself"):
        mixed_loader(train, shirts, 8, 0.25, sampler=None)
    with pytest.raises((TypeError, IndexError)):  # a synthetic index handed to a plain dataset fails loudly
        train.data[SyntheticIndex(3)]


# ---------------------------------------------------------------------------------- README, examples
def test_readme_mixing_snippet_runs(tmp_path, monkeypatch, capsys, train):
    code = readme_python("## Mixing")
    build_stand_in_cache(tmp_path / "cache" / "shirt.lmdb", 100).close()
    monkeypatch.chdir(tmp_path)
    import synthaug.data.fashion_mnist as fm

    monkeypatch.setattr(fm, "FashionMNIST", lambda train=True, **kw: Subset(FashionMNIST(train=train, **kw), range(384)))
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert capsys.readouterr().out.strip() == "0.25"
    assert namespace["loader"].batch_sampler.stats()["epoch"] == 1


def _load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("ex") / "shirt.lmdb"
    build_stand_in_cache(path, 300).close()
    return str(path)


def test_example_train_plain(example_cache, capsys):
    result = _load_example("train_plain").main(
        ["--cache", example_cache, "--epochs", "2", "--max-batches", "3", "--batch-size", "32", "--eval-batches", "1"]
    )
    assert result["stats"]["synthetic_share"] == 0.25 and result["stats"]["served"] == 2 * 3 * 8
    assert "realized synthetic share: 0.2500 (target 0.2500; 48 synthetic of 192 items" in capsys.readouterr().out


def test_example_train_lightning_fit_completes(example_cache, tmp_path, capsys):
    result = _load_example("train_lightning").main(
        ["--cache", example_cache, "--epochs", "2", "--max-batches", "3", "--batch-size", "32", "--default-root-dir", str(tmp_path),
         "--checkpoint-every", "2"]
    )
    assert result["global_step"] == 6 and result["stats"]["synthetic_share"] == 0.25
    assert result["stats"]["epoch"] == 1  # Lightning called set_epoch through batch_sampler.sampler
    assert "realized synthetic share: 0.2500" in capsys.readouterr().out
    # the sampler state is in the checkpoints, as of the batches the training step consumed
    states = {p.name: torch.load(p, weights_only=False)["MixedFashionMNIST"]["sampler"] for p in tmp_path.rglob("*.ckpt")}
    assert {(s["epoch"], s["batch"]) for s in states.values()} == {(0, 2), (1, 1), (1, 3)}, states.keys()


def test_example_train_ddp_under_torchrun(example_cache):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "examples/train_ddp.py",
           "--cache", example_cache, "--max-batches", "3", "--batch-size", "16", "--workers", "0"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batches in the last epoch per rank: [3, 3]" in proc.stdout
    assert "realized synthetic share: 0.2500 (target 0.2500; 24 synthetic of 96 items" in proc.stdout and "over 2 ranks" in proc.stdout


# ---------------------------------------------------------------------------------- cycles, GC
def test_no_reference_cycles_and_closing_a_cache_inside_another_ones_read_is_safe(tmp_path, train, shirts):
    import gc
    import weakref

    cache = build_stand_in_cache(tmp_path / "c", 10)
    mixed = MixedDataset(Subset(train, range(20)), cache)
    s = RatioBatchSampler(mixed, batch_size=4, synthetic_ratio=0.25)
    list(s)
    probe = weakref.ref(s)
    gc.disable()
    try:
        del s
        assert probe() is None, "the sampler is in a reference cycle: only the GC would free it (and its cache)"
    finally:
        gc.enable()
    # What made this suite hang before: the GC ran SyntheticCache.__del__ -> close() while another
    # cache's read transaction was open in the same thread; close() waited for that transaction.
    other = build_stand_in_cache(tmp_path / "other", 2)
    with shirts._env().read():
        other.close()
    assert len(SyntheticCache(tmp_path / "other")) == 2


# ---------------------------------------------------------------------------------- imports, benchmark
def test_mixing_imports_no_generation_stack():
    code = (
        "import sys, synthaug; synthaug.MixedDataset, synthaug.RatioBatchSampler, synthaug.mixed_loader; "
        "heavy = [m for m in ('diffusers', 'peft', 'transformers', 'lightning') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_loader_benchmark_smoke(tmp_path):
    from synthaug.benchmarks.loader import run

    result = run(quick=True, repeats=1, batches=3, configs=[("28x28 gray", 28, 1)], ratios=(0.25,), workers=(0,), n_real=256)
    assert result["mixed_over_plain"] > 0 and result["rows"]
    assert {r["loader"] for r in result["rows"]} == {"plain", "mixed r=0.25", "synthetic only"}


def test_example_train_ddp_two_nodes_with_a_worker_and_a_cache_per_node(tmp_path):
    """The multi-node recipe on one machine: two torchrun 'nodes' (c10d rendezvous on localhost),
    one rank each; each node's LOCAL_RANK 0 runs a GenerationWorker on its own cache, and the
    node's rank reads only that cache (cache_shard='local'); seeds never overlap between nodes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=synthaug-two-nodes", "examples/train_ddp.py",
               "--cache", str(tmp_path / f"node{node}.lmdb"), "--worker", "builtin:fashion-mnist-ddpm", "--worker-label", "0",
               "--max-batches", "3", "--batch-size", "16", "--workers", "0"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    text = outs[0][0] + outs[1][0]
    assert "batches in the last epoch per rank: [3, 3]" in text
    assert "realized synthetic share: 0.2500 (target 0.2500; 24 synthetic of 96 items" in text
    assert "node 0: worker made" in text and "node 1: worker made" in text
    seeds = {}
    for node in (0, 1):
        cache = SyntheticCache(tmp_path / f"node{node}.lmdb", readonly=True)
        assert len(cache) >= 1  # the node's rank drew its 3 x 4 synthetic items from these (reusing when none was fresh)
        seeds[node] = {r.meta["seed"] for r in cache.get_many(cache.seqs())}
        assert set(cache.cursors(include_dead=True)) == {f"mixing-rank{node}"}  # only this node's rank read it
        cache.close()
    assert max(seeds[0]) < 10**9 <= min(seeds[1])


def test_cache_shard_splits_a_node_local_cache_among_the_nodes_ranks(tmp_path, train, monkeypatch):
    """World 4 on two nodes: global ranks 2 and 3 (node 1) share node 1's cache, half each, while
    their real shards are the world's; a bad cache_shard fails in one line."""
    cache = build_stand_in_cache(tmp_path / "node1", 40)
    mixed = MixedDataset(Subset(train, range(64)), cache)
    taken = {}
    for rank, local in ((2, 0), (3, 1)):
        monkeypatch.setenv("LOCAL_RANK", str(local))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        s = RatioBatchSampler(mixed, batch_size=8, synthetic_ratio=0.5, num_replicas=4, rank=rank, cache_shard="local", consumer=f"r{rank}")
        batches = list(s)
        taken[rank] = {i.seq for b in batches for i in b if is_synthetic(i)}
        real = [i for b in batches for i in b if not is_synthetic(i)]
        assert len(real) == 16  # 64 real items over 4 ranks
        assert s.state_dict()["config"]["cache_shard"] == [local, 2]
    assert {q % 2 for q in taken[2]} == {0} and {q % 2 for q in taken[3]} == {1}
    assert len(taken[2]) == len(taken[3]) == 16  # 16 draws each, all fresh: no record is read by both ranks
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    with pytest.raises(ValueError, match="reads LOCAL_WORLD_SIZE from the environment"):
        RatioBatchSampler(mixed, batch_size=8, synthetic_ratio=0.5, cache_shard="local")
    with pytest.raises(ValueError, match=r"needs 0 <= index < count"):
        RatioBatchSampler(mixed, batch_size=8, synthetic_ratio=0.5, cache_shard=(2, 2))


class _Garments(torch.utils.data.Dataset):
    """Real items (28×28 uint8 arrays, class index) of four named classes."""

    classes = ["T-shirt", "Pullover", "Coat", "Shirt"]

    def __init__(self, n: int = 64) -> None:
        self.targets = [i % 4 for i in range(n)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return np.full((28, 28), 10 * self.targets[i], np.uint8), self.targets[i]


def test_a_soft_label_travels_from_the_cache_through_dataloader_workers_into_the_loss(tmp_path):
    from synthaug.classifier import build_classifier, train_classifier

    # the cache names its classes in another order than the real dataset: labels map by name
    cache = SyntheticCache(tmp_path / "soft.lmdb", label_names=["Shirt", "Coat", "Pullover", "T-shirt"])
    images = np.full((24, 28, 28, 1), 200, np.uint8)
    labels = [{"Shirt": 0.7, "Pullover": 0.3} if i % 2 else {"Shirt": 0.55, "Coat": 0.45} for i in range(20)] + [0] * 4
    cache.append(images, labels, [{"i": i} for i in range(24)])
    with pytest.raises(ValueError, match="has a soft label .*pass soft_targets=True"):
        MixedDataset(_Garments(), cache)
    loader = mixed_loader(_Garments(), cache, 8, 0.25, soft_targets=True, mark_synthetic=True, classes=["Shirt"], drop_last=True,
                          transform=lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32)[None] / 255, num_workers=2)
    want = {(0.0, 0.3, 0.0, 0.7), (0.0, 0.0, 0.45, 0.55), (0.0, 0.0, 0.0, 1.0)}  # real order: T-shirt, Pullover, Coat, Shirt
    seen_soft = 0
    for x, y, synthetic in loader:
        assert y.dtype == torch.float32 and y.shape == (8, 4) and torch.allclose(y.sum(1), torch.ones(8))
        assert int(synthetic.sum()) == 2  # r = 0.25 of 8, exactly
        for row in y[synthetic]:
            assert tuple(round(float(v), 6) for v in row) in want
            seen_soft += int(row.max() < 1)
        for row in y[~synthetic]:  # real items one-hot
            assert sorted(row.tolist()) == [0.0, 0.0, 0.0, 1.0]
    assert seen_soft >= 10  # records filed under "Shirt" (their first entry) are the ones drawn
    model = build_classifier("small-cnn", in_channels=1, num_classes=4)
    out = train_classifier(model, loader, steps=4, synthetic_weight=0.2)
    assert math.isfinite(out["final_loss"]) and out["synthetic_samples"] == 8
    loader.batch_sampler.close()
