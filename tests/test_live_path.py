"""The live path — a worker topping up a small cache while a prefetching DataLoader reads it — never
serves a record other than the one the sampler drew, and notices a dead writer within seconds.

Each test here fails on the code before the fix it names (the scripts in ``../shared/repros/``
show the defects): r09 eviction under prefetch, r01 replacement of another class, r07 two
workers, r14/r18 dead workers, r16 label names stored late, r10/r02 bad input, r13 fork while
reading, r19 the store's own eviction, r20 a destructor run by the garbage collector.
"""

import gc
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import synthaug
from synthaug import CacheFormatError, CorruptRecordError, GenerationWorker, GenerationWorkerError, MixedDataset, RatioBatchSampler, SyntheticCache
from synthaug.errors import CacheBusyError
from synthaug.mixing import SyntheticIndex, is_synthetic
from tests.helpers.stub_generators import StampGenerator, stamp_of
from tests.helpers.waiting import wait_for as _wait_for

REPO = Path(__file__).resolve().parents[1]
ENV_1T = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]


class Real:
    """A tiny real dataset: uint8 28×28 images whose pixels are 255 (never a stamp), int targets,
    classes ``c0..c9`` (so labels map by name)."""

    classes = [f"c{i}" for i in range(10)]
    class_to_idx = {c: i for i, c in enumerate(classes)}

    def __init__(self, n, reverse=False):
        self.n = n
        if reverse:  # the same names in another order: mapping by index would be wrong
            self.classes = list(reversed(Real.classes))
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= int(i) < self.n:
            raise IndexError(i)
        return np.full((28, 28), 255, np.uint8), int(i) % 10


class Logged:
    """A batch sampler wrapper that remembers what it yielded (the DataLoader's view)."""

    def __init__(self, sampler):
        self.sampler, self.log = sampler, []

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        for batch in self.sampler:
            self.log.append(batch)
            yield batch


def _slow(x):
    time.sleep(0.004)  # the DataLoader workers lag behind the sampler: prefetching matters
    return x


# ---------------------------------------------------------------------------------- r09
@pytest.mark.parametrize("on_exhausted,max_reuse", [("wait", None), ("reuse", None), ("reuse", 1)])
def test_a_prefetching_dataloader_gets_exactly_the_records_sampled_while_the_worker_evicts(tmp_path, on_exhausted, max_reuse):
    """r09: a worker tops up a cache of 24 records while 2 DataLoader workers prefetch 4 batches
    each (32 synthetic items in flight: more than the cache holds). Before the fix 392 of 400
    items were other records than the ones sampled, 344 with another label. With a reuse cap,
    batches must wait for records once all are at it; the records a batch drew before its wait
    must not keep the full cache from making room."""
    cache = SyntheticCache(tmp_path / "c")
    with GenerationWorker(cache, StampGenerator().spec, min_fresh=16, max_items=24, batch_size=8, poll_interval=0.01) as worker:
        _wait_for(lambda: cache.fresh_count() >= 16, what="the first records")
        mixed = MixedDataset(Real(400), cache, transform=_slow)
        sampler = RatioBatchSampler(mixed, batch_size=8, synthetic_ratio=0.5, cursor_interval=0, on_exhausted=on_exhausted,
                                    max_reuse=max_reuse, wait_timeout=60)
        logged = Logged(sampler)
        loader = DataLoader(mixed, batch_sampler=logged, num_workers=2, prefetch_factor=4, multiprocessing_context="fork",
                            collate_fn=lambda b: b)
        wrong, total = [], 0
        for b, items in enumerate(loader):
            for index, (image, target) in zip(logged.log[b], items):
                if is_synthetic(index):
                    total += 1
                    got = stamp_of(image)
                    if got != index.seq or target != index.seq % 10:
                        wrong.append((index.seq, got, target))
        worker.raise_if_failed()
    stats = cache.stats()
    assert total == 400 and wrong == []
    assert mixed.stats() == {"corrupt": 0, "missing": 0, "replaced": 0}
    assert sampler.stats()["evicted_unseen"] == 0
    assert stats["evicted"] > 0 and stats["count"] <= 24  # the worker did evict, within its limit
    if on_exhausted == "wait":
        assert sampler.stats()["reused"] == 0 and sampler.stats()["fresh"] == 400


def test_append_within_a_limit_evicts_only_what_consumers_released_in_its_own_transaction(tmp_path):
    cache = SyntheticCache(tmp_path / "c")
    cache.append(np.zeros((10, 4, 4, 1), np.uint8), 0)
    # no consumer yet: nobody has seen a record, so the worker's mode evicts none
    assert cache.append(np.zeros((3, 4, 4, 1), np.uint8), 0, fit_within=10) == []
    assert cache.supply()["evict_request"] == 0 + 10 + 3 - 10  # it asks for the room it lacked
    cache.set_cursor("a", 8, hold=3)  # handed 0..7, still reading 3..7
    cache.set_cursor("b", 10, hold=5)
    sup = cache.supply()
    assert (sup["fresh"], sup["evictable"]) == (2, 3)
    assert cache.append(np.zeros((5, 4, 4, 1), np.uint8), 0, fit_within=10) == [10, 11, 12]  # room for 3 only
    assert cache.seqs() == list(range(3, 13))
    assert cache.supply()["evict_request"] == 5  # all 5 would fit once 0..4 are released: asked of the consumers
    with pytest.raises(ValueError, match="hold"):
        cache.set_cursor("a", 8, hold=9)
    # the store's own max_items and trim spare held records too (r19)
    assert cache.trim(keep_last=2) == 0 and len(cache) == 10
    cache.remove_cursor("a")
    assert cache.trim(keep_last=2) == 2 and cache.seqs()[0] == 5


def test_the_stores_own_max_items_never_evicts_what_a_live_consumer_holds(tmp_path):
    """r19: a second writer (e.g. ``synthaug generate``) appending to a cache with max_items
    evicted records a live consumer had never been handed."""
    cache = SyntheticCache(tmp_path / "c", max_items=5)
    cache.append(np.zeros((5, 4, 4, 1), np.uint8), 1)
    cache.set_cursor("trainer", 0)
    cache.append(np.zeros((5, 4, 4, 1), np.uint8), 1)
    assert cache.seqs() == list(range(10)) and cache.stats()["evicted"] == 0
    assert cache.supply()["evict_request"] == 5  # consumers are asked to release 0..4
    cache.set_cursor("trainer", 7)  # handed and released 0..6
    cache.append(np.zeros((1, 4, 4, 1), np.uint8), 1)
    assert cache.seqs() == list(range(6, 11))  # back to the limit, only released records went
    cache.remove_cursor("trainer")
    cache.append(np.zeros((2, 4, 4, 1), np.uint8), 1)  # no consumer: the oldest, as documented
    assert cache.seqs() == list(range(8, 13))


# ---------------------------------------------------------------------------------- r01
def _damage(cache, seq, offset=None):
    """Flip one byte of record ``seq`` (``offset``), or delete it (``None``), behind the cache's back."""
    handle = cache._env()
    db = handle.dbs["records"]
    key = struct.pack(">Q", seq)

    def write(txn):
        if offset is None:
            txn.delete(key, db=db)
            return
        value = bytearray(txn.get(key, db=db))
        value[offset] ^= 0xFF
        txn.put(key, bytes(value), db=db)

    handle.write(write)


def _stamped(path, n, *, start=0):
    cache = SyntheticCache(path, label_names=Real.classes)
    batch = StampGenerator().generate(n, start)
    cache.append(batch.images, batch.labels, batch.meta)
    return cache


def test_a_record_found_corrupt_when_read_is_replaced_by_an_older_one_of_its_class_and_shard(tmp_path):
    """r01: the replacement of a corrupt or vanished record had any label. Ten classes here
    (label = seq % 10), and the sampler is rank 1 of 2 (stride 2: odd seqs)."""
    cache = _stamped(tmp_path / "c", 60)
    mixed = MixedDataset(Real(100), cache)
    sampler = RatioBatchSampler(mixed, batch_size=10, synthetic_ratio=0.5, num_replicas=2, rank=1, shuffle=False, on_exhausted="error")
    it = iter(sampler)
    batches = [next(it) for _ in range(4)]
    drawn = [i for b in batches for i in b if is_synthetic(i)]
    assert [i.seq for i in drawn] == list(range(1, 40, 2)) and all(i.label == i.seq % 10 and i.stride == 2 for i in drawn)
    _damage(cache, 33, -1)  # damaged after it was drawn (the last image byte)
    with pytest.warns(RuntimeWarning, match=r"seq=33 .* is corrupt; served seq=23 \(same label 3"):
        items = mixed.__getitems__(batches[3])
    image, target = items[batches[3].index(SyntheticIndex(33))]
    assert stamp_of(image) == 23 and target == 3  # the nearest older record of label 3 in its shard
    assert mixed.stats() == {"corrupt": 1, "missing": 0, "replaced": 1}
    # never a newer record (it may still be served fresh), never another class: none older -> raise
    _damage(cache, 3, -1)
    with pytest.raises(CorruptRecordError, match="no readable record with its label 3 is older"):
        mixed.__getitems__([SyntheticIndex(3, 3, stride=2)])
    # a hand-made index of an unreadable record: the label is unknown, so it is not replaced
    with pytest.raises(CorruptRecordError, match="label is unknown"):
        mixed[SyntheticIndex(33)]
    # gone when read (deleted behind the sampler's back): replaced the same way
    _damage(cache, 37)
    image, target = mixed.__getitems__([SyntheticIndex(37, 7, stride=2)])[0]
    assert stamp_of(image) == 27 and target == 7 and mixed.stats()["missing"] == 1
    with pytest.raises(KeyError):
        MixedDataset(Real(100), cache, on_corrupt="raise").__getitems__([SyntheticIndex(37, 7, stride=2)])


# ---------------------------------------------------------------------------------- r07
def test_a_second_worker_with_seeds_of_the_same_block_is_refused_and_another_block_is_welcome(tmp_path):
    cache = SyntheticCache(tmp_path / "c")
    first = GenerationWorker(cache, StampGenerator(delay=0.2).spec, min_fresh=40, max_items=1000, batch_size=4, seed=0, worker_id="first")
    with first.start(wait=True, timeout=60):
        second = GenerationWorker(cache, StampGenerator().spec, min_fresh=40, max_items=1000, batch_size=4, seed=5, worker_id="second")
        with pytest.raises(CacheBusyError, match=rf"live writer for seeds 0\.\.999999999: pid {first.pid} on \S+ \(worker first\), started .*--seed-offset 1"):
            second.start()
        assert second.pid is None  # refused before a process was started
        # the foreground worker and `synthaug generate` are refused the same way, in one line
        out = subprocess.run([sys.executable, "-m", "synthaug", "generate", "--model", "builtin:fashion-mnist-ddpm", "--label", "1",
                              "--cache", str(cache.path), "--count", "1"], cwd=REPO, env=ENV_1T, capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and "already has a live writer" in out.stderr and "Traceback" not in out.stderr
        # seeds of another block: both write, no seed twice
        other = GenerationWorker(cache, StampGenerator().spec, min_fresh=40, max_items=1000, batch_size=4, seed=10**9, worker_id="other")
        with other:
            _wait_for(lambda: len(cache) >= 40, what="both workers' records")
        assert other.status()["state"] == "stopped"
    seeds = [m["seed"] for m in cache.metas().values()]
    assert len(seeds) == len(set(seeds))
    assert {s // 10**9 for s in seeds} == {0, 1}
    assert set(cache.heartbeats()) == {0, 1} and {hb["worker_id"] for hb in cache.heartbeats().values()} == {"first", "other"}
    # the lock dies with its holder: a new worker of block 0 starts at once after a SIGKILL
    w = GenerationWorker(cache, StampGenerator(delay=30).spec, min_fresh=10**6, max_items=10**6, batch_size=2, seed=0)
    w.start(wait=True, timeout=60)
    os.kill(w.pid, signal.SIGKILL)
    _wait_for(lambda: not w.is_alive(), what="the kill")
    GenerationWorker(cache, StampGenerator().spec, min_fresh=1, max_items=10**6, seed=0).start(wait=True, timeout=60).stop()


# ---------------------------------------------------------------------------------- r14, r18
def test_a_sigkilled_worker_is_noticed_by_a_waiting_sampler_within_seconds(tmp_path):
    """r14: the post-mortem "failed" heartbeat kept the dead worker's old time, so a waiting
    sampler took it for a past run's and waited its whole timeout."""
    cache = SyntheticCache(tmp_path / "c")
    w = GenerationWorker(cache, StampGenerator(delay=40).spec, min_fresh=4, max_items=100, batch_size=4)
    w.start(wait=True, timeout=60)
    time.sleep(2.5)  # inside the 40 s generate(): the heartbeat thread keeps writing meanwhile
    hb = cache.heartbeat()
    assert hb["state"] == "running" and time.time() - hb["time"] < 2.0 and hb["pid"] == w.pid
    sampler = RatioBatchSampler(MixedDataset(Real(40), cache), batch_size=4, synthetic_ratio=0.5, on_exhausted="wait", wait_timeout=120)
    threading.Timer(1.0, os.kill, (w.pid, signal.SIGKILL)).start()
    t0 = time.time()
    with pytest.raises(GenerationWorkerError, match="exited with status -9"):
        next(iter(sampler))
    assert time.time() - t0 < 6
    hb = cache.heartbeat()
    assert hb["state"] == "failed" and hb["pid"] == w.pid and hb["time"] >= t0 + 0.9  # stamped when noticed


def test_a_sigkilled_foreground_worker_is_noticed_by_its_pid(tmp_path):
    """r18: ``synthaug worker`` / ``run_worker`` killed by SIGKILL left "running" forever."""
    cache = SyntheticCache(tmp_path / "c")
    code = (
        "from synthaug.generation.worker import run_worker; "
        f"run_worker({str(cache.path)!r}, {StampGenerator(delay=60).spec!r}, min_fresh=4, max_items=100, batch_size=4)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=ENV_1T)
    try:
        _wait_for(lambda: (cache.heartbeat() or {}).get("state") == "running", what="the foreground worker")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert cache.heartbeat()["state"] == "running"  # nobody wrote its death: readers must see it
    sampler = RatioBatchSampler(MixedDataset(Real(20), cache), batch_size=4, synthetic_ratio=0.5, on_exhausted="wait", wait_timeout=120)
    t0 = time.time()
    with pytest.raises(GenerationWorkerError, match=rf"pid {proc.pid} .* is no longer running"):
        next(iter(sampler))
    assert time.time() - t0 < 5
    out = subprocess.run([sys.executable, "-m", "synthaug", "cache", "inspect", str(cache.path)], cwd=REPO, env=ENV_1T, capture_output=True, text=True)
    assert "running, but its process is gone" in out.stdout


# ---------------------------------------------------------------------------------- r16
def test_label_names_stored_after_the_dataset_was_built_are_used(tmp_path):
    cache = SyntheticCache(tmp_path / "c")  # empty: the worker has not started yet
    early = MixedDataset(Real(20, reverse=True), cache)
    sampler = RatioBatchSampler(early, batch_size=2, synthetic_ratio=0.5, classes=["c6"], on_exhausted="error")
    cache.set_label_names(Real.classes)  # what a worker does when it starts
    batch = StampGenerator().generate(10, 0)
    cache.append(batch.images, batch.labels, batch.meta)
    first = next(iter(sampler))
    assert [i.seq for i in first if is_synthetic(i)] == [6]  # drawn by name: c6 is index 3 of the reversed classes
    items = early.__getitems__(first)
    assert items[-1][1] == early.class_to_idx["c6"] == 3


# ---------------------------------------------------------------------------------- r10, r02
def test_a_reader_never_creates_a_cache_and_foreign_or_garbage_lmdb_is_refused(tmp_path):
    missing = tmp_path / "typo-cache"
    with pytest.raises(FileNotFoundError, match="no synthetic cache at .*typo-cache.*A reader does not create"):
        MixedDataset(Real(5), missing)
    with pytest.raises(FileNotFoundError):
        synthaug.mixed_loader(Real(5), str(missing), 4, 0.25)
    assert not missing.exists()
    foreign = tmp_path / "foreign"
    env = lmdb.open(str(foreign))
    with env.begin(write=True) as txn:
        txn.put(b"user-key", b"user-value")
    env.close()
    for readonly in (False, True):
        with pytest.raises(CacheFormatError, match=r"not a synthaug cache .*b'user-key'"):
            SyntheticCache(foreign, readonly=readonly)
    env = lmdb.open(str(foreign), max_dbs=4, readonly=True)
    with env.begin() as txn:
        assert [bytes(k) for k, _ in txn.cursor()] == [b"user-key"]  # untouched
    env.close()
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "data.mdb").write_bytes(b"not an lmdb" * 1000)
    for readonly in (False, True):
        t0 = time.monotonic()
        with pytest.raises(CacheFormatError, match="data.mdb is not a readable LMDB file"):
            SyntheticCache(garbage, readonly=readonly)
        assert time.monotonic() - t0 < 1.0  # refused at once, not retried as a cache being created


def test_cache_inspect_reports_corrupt_records_instead_of_failing(tmp_path):
    """r15"""
    cache = _stamped(tmp_path / "c", 10)
    _damage(cache, 4, -1)
    _damage(cache, 6, 0)  # the magic: even the header is unreadable
    cache.close()
    out = subprocess.run([sys.executable, "-m", "synthaug", "cache", "inspect", str(tmp_path / "c")], cwd=REPO, env=ENV_1T, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "corrupt      2 record(s) with a bad header or CRC (seq 4, 6)" in out.stdout
    assert "8 distinct" not in out.stdout and "records      10" in out.stdout


# ---------------------------------------------------------------------------------- r13, r20
def test_fork_while_another_thread_reads_is_quick_and_the_child_reads(tmp_path):
    cache = _stamped(tmp_path / "c", 8)
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            len(cache)

    t = threading.Thread(target=reader)
    t.start()
    try:
        time.sleep(0.1)
        for _ in range(3):
            t0 = time.monotonic()
            pid = os.fork()
            if pid == 0:
                try:
                    os._exit(0 if len(cache) == 8 and stamp_of(cache.get(5).image) == 5 else 1)
                except BaseException:
                    os._exit(2)
            forked_in = time.monotonic() - t0
            _, status = os.waitpid(pid, 0)
            assert os.WEXITSTATUS(status) == 0
            assert forked_in < 1.0  # it was 10 s: the reader thread starved the fork guard
    finally:
        stop.set()
        t.join()


def test_a_cache_destructor_run_by_the_garbage_collector_inside_open_does_not_deadlock(tmp_path):
    """r20: the GC ran ``SyntheticCache.__del__`` while this thread held the module lock inside
    ``acquire_env`` (simulated by collecting where ``lmdb.open`` allocates)."""
    code = f"""
import faulthandler, gc, sys
faulthandler.dump_traceback_later(20, exit=True)
import synthaug, synthaug.cache.lmdb_env as envmod
a, b = {str(tmp_path / "a")!r}, {str(tmp_path / "b")!r}
synthaug.SyntheticCache(a).close()
class Holder:
    def __init__(self):
        self.cache = synthaug.SyntheticCache(a); self.me = self
gc.disable()
Holder()
real_open = envmod.lmdb.open
class L:
    def __getattr__(self, n): return getattr(envmod.__dict__["_lmdb"], n)
    @staticmethod
    def open(*args, **kw):
        gc.collect()
        return real_open(*args, **kw)
envmod.__dict__["_lmdb"] = envmod.lmdb
envmod.lmdb = L()
synthaug.SyntheticCache(b)
envmod.lmdb = envmod.__dict__["_lmdb"]
synthaug.SyntheticCache(a).close()  # the queued release ran: a reopens cleanly
print("no deadlock")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV_1T, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "no deadlock", out.stderr[-2000:]


# ---------------------------------------------------------------------------------- full disk, read-only, deleted
@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs mounted for the test (needs root and the right to mount, as in CI)."""
    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root; run the suite as root (CI does) to test a full disk")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); the full-disk test needs one")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_fails_the_append_clearly_and_loses_nothing_committed(small_fs):
    cache = SyntheticCache(small_fs / "c", map_size=64 * 1024)
    mixed = MixedDataset(Real(64), cache)
    # 10 ms per batch: the disk fills in ~1 s, not before start(wait=True) has seen the worker run
    worker = GenerationWorker(cache, StampGenerator(delay=0.01).spec, min_fresh=10**6, max_items=10**6, batch_size=16, poll_interval=0.01)
    worker.start(wait=True, timeout=60)
    _wait_for(lambda: not worker.is_alive(), timeout=120, what="the worker to fill the disk")
    with pytest.raises(GenerationWorkerError, match=r"CacheDiskFullError: cache .*small-fs/c: the disk is full \(\d[\d,]* bytes free of 2,097,152"):
        worker.raise_if_failed()
    hb = cache.heartbeat()
    assert hb["state"] == "failed" and hb["last_error"].startswith("CacheDiskFullError: cache ") and "disk is full" in hb["last_error"]
    report = cache.verify()
    n = len(cache)
    assert n > 500 and report["corrupt"] == 0 and report["problems"] == []
    assert all(stamp_of(cache.get(s).image) == s for s in cache.seqs()[:: max(1, n // 50)])
    with pytest.raises(synthaug.errors.CacheDiskFullError, match="every record committed before it is intact"):
        cache.append(StampGenerator().generate(64, 10**6).images, 0)
    assert len(cache) == n  # nothing of the failed append
    # readers go on with what exists
    sampler = RatioBatchSampler(mixed, batch_size=8, synthetic_ratio=0.5, on_exhausted="reuse")
    loader = DataLoader(mixed, batch_sampler=sampler, num_workers=2, collate_fn=lambda b: b)
    got = [stamp_of(im) for items in loader for im, _ in items if np.asarray(im)[0, 0] != 255]
    assert len(got) == 64 and all(0 <= s < n for s in got)
    cache.close()


def test_a_read_only_cache_folder_is_read_and_writers_are_refused_clearly(tmp_path, small_fs):
    _stamped(small_fs / "c", 20).close()
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    code = f"""
import synthaug, numpy as np
from synthaug.mixing import is_synthetic
from tests.test_live_path import Real
try:
    synthaug.SyntheticCache({str(small_fs / "c")!r})
except PermissionError as e:
    print("writer:", e)
c = synthaug.SyntheticCache({str(small_fs / "c")!r}, readonly=True)
print("reader:", len(c), c.verify()["corrupt"])
c.close()
m = synthaug.MixedDataset(Real(16), {str(small_fs / "c")!r})
s = synthaug.RatioBatchSampler(m, batch_size=4, synthetic_ratio=0.5)
print("sampler:", sum(1 for b in s for i in b if is_synthetic(i)), m.cache.readonly)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV_1T, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "writer: [Errno 30] cache " in out.stdout and "is on a read-only file system; open it with SyntheticCache(path, readonly=True)" in out.stdout
    assert "reader: 20 0" in out.stdout and "sampler: 16 True" in out.stdout  # 16 real items, r = 0.5


def test_a_cache_deleted_while_in_use_is_still_read_and_stops_writers_and_waits(tmp_path):
    import shutil

    cache = _stamped(tmp_path / "c", 12)
    mixed = MixedDataset(Real(40), cache)
    cache.check_present()
    shutil.rmtree(tmp_path / "c")
    assert len(cache) == 12 and stamp_of(cache.get(7).image) == 7  # the open map still reads
    with pytest.raises(FileNotFoundError, match="was deleted or replaced while this process used it"):
        cache.check_present()
    with pytest.raises(FileNotFoundError, match="no synthetic cache"):
        SyntheticCache(tmp_path / "c", readonly=True)
    waiting = RatioBatchSampler(mixed, batch_size=8, synthetic_ratio=0.5, on_exhausted="wait", wait_timeout=60)
    it = iter(waiting)
    next(it)
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError, match="deleted"):
        next(it)  # 12 records, 4 per batch: the fourth batch waits, and learns why within a second
        next(it)
        next(it)
    assert time.monotonic() - t0 < 10
    # a worker on it stops instead of writing into a file no one can see
    (tmp_path / "d").mkdir()
    live = SyntheticCache(tmp_path / "d")
    w = GenerationWorker(live, StampGenerator(delay=0.05).spec, min_fresh=10**6, max_items=10**6, batch_size=4, poll_interval=0.01)
    w.start(wait=True, timeout=60)
    shutil.rmtree(tmp_path / "d")
    _wait_for(lambda: not w.is_alive(), what="the worker to notice")
    with pytest.raises(GenerationWorkerError, match="FileNotFoundError: cache .* was deleted"):
        w.raise_if_failed()
