"""Crash campaign: a real cache writer SIGKILLed again and again while readers read beside it.

What it proves (README "The cache"): each ``SyntheticCache.append`` is one LMDB write
transaction, so a writer killed at any moment leaves every committed record intact and no partial
one; the map grows by itself when full; with ``max_items`` the oldest records are evicted in the
same transaction as the append that overflows.

How:

* **Writer** (``python -m synthaug.benchmarks.crash --writer ...``, a real process): appends
  batches forever to two caches ("lanes": 32×32 gray, ``max_items`` 256, batches of 1–32; and
  192×192 RGB, ``max_items`` 32, batches of 1–8), each append in a random encoding (raw or
  png). Seeds follow the generation worker's rule (:mod:`synthaug.generation.worker`,
  "Seeds"): record ``q`` of a lane gets per-image seed ``lane_seed + q``, with ``q`` from the
  cache's own ``next_seq`` read before generating, so a restarted writer continues the sequence.
  Each image and label is derived from its seed alone; the meta holds the seed and
  ``sha256(shape | label | pixels)[:16]``, so every byte is checked.
  It prints ``begin LANE Q N ENC`` before each append and ``committed LANE FIRST LAST`` right
  after it returns, then ``state LANE NEXT_SEQ MAP_SIZE EVICTED MTIME_NS SIZE``. Every lane
  starts with a 64 KiB map (and every restart asks for 64 KiB again), so maps double many times.
* **Kills**: the parent starts the writer, waits a random time drawn from a seeded RNG, sends
  ``SIGKILL`` and starts it again, ``--kills`` times. Delays come in three kinds: during start-up
  (import, open, creation), anywhere after start-up, and aimed inside an append (a random
  fraction of that append's expected duration after its ``begin`` line). Where each kill landed is
  measured, not assumed: during start-up; between appends; inside an append (last line
  ``begin``), split into "committed, not yet reported", "data file already written" (the commit
  had written pages: ``data.mdb`` changed, no new record) and "before the commit wrote".
* **Readers** (``--readers`` processes, default 2) loop over both caches the whole time: ``len``,
  ``seqs`` (must be dense), ``get`` and ``get_many`` of random stored seqs, ``scan_labels``; each
  record is checked against its meta hash and regenerated from its seed. A ``KeyError`` for a
  seq below the cache's first seq by then (evicted between listing and reading) is expected;
  anything else is an error, kept with its message. They open with a tiny map, so they adopt
  every grown map (``MapResizedError``), and rest as long as each loop took (about one core in all).
* **Checks after every kill**, per lane: ``cache.verify()``; every record decodes and matches its
  hash, its seed (``lane_seed + seq``) and its regenerated image; seqs are dense and
  ``count == min(next_seq, max_items)``; ``next_seq == last + 1``; meta counters agree
  (``appended == next_seq``, ``evicted == next_seq - count``); every seq the writer reported
  committed is stored, or below the first seq of a full cache (evicted); no record observed
  earlier has changed (same hash, same writing run); no seed stored twice. At the end also the
  stored ``value_bytes`` against the records' real sizes (read with py-lmdb directly).

Every bad count must be 0; ``main`` exits with status 1 otherwise and keeps the work folder (the
caches and the writer's and readers' logs) for the evidence.

    python benchmarks/crash.py [--kills 200] [--seed 0] [--quick] [--readers 2] [--workdir DIR] [--out DIR]

One concept in one module (longer than the ~600 lines the project aims at, on purpose): the
campaign, whose writer and reader processes run this same file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import synthaug.cache
from synthaug.benchmarks.common import print_table, write_result
from synthaug.cache.store import SyntheticCache
from synthaug.errors import CacheFormatError, CorruptRecordError
from synthaug.outputs import output_dir

__all__ = ["run", "main", "Lane", "default_lanes", "image_for", "label_for", "record_hash", "cache_code_fingerprint", "BAD_COUNTS"]

INITIAL_MAP_SIZE = 64 * 1024
ENCODINGS = ("raw", "png")
QUICK_KILLS = 20
DEFAULT_KILLS = 200
LANE_SEED_STRIDE = 1_000_000_000  # lane i's seeds are seed + i·10⁹ + q: disjoint between lanes
_READY_TIMEOUT_S = 60.0
_READER_STOP_TIMEOUT_S = 60.0
# the counts that must all be 0 (result["bad"])
BAD_COUNTS = (
    "committed_records_lost",
    "torn_or_corrupt_records",
    "records_changed",
    "reader_errors",
    "seeds_repeated",
    "seed_seq_mismatches",
    "meta_inconsistencies",
    "writer_failures",
)


# ---------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Lane:
    """One cache of the campaign: its image shape, limit, batch sizes and seed offset."""

    name: str
    path: str
    height: int
    width: int
    channels: int
    max_items: int
    max_batch: int
    seed: int  # record q has per-image seed seed + q

    @property
    def shape(self) -> Tuple[int, int, int]:
        return (self.height, self.width, self.channels)


def default_lanes(workdir: Path, seed: int) -> List[Lane]:
    """The two caches: many small records (long scans, eviction every append once full) and few
    large ones (long appends: up to ~0.9 MB in one transaction). Batches never exceed
    ``max_items``, so every append that overflows evicts only older records."""
    return [
        Lane("small", str(workdir / "small.lmdb"), 32, 32, 1, max_items=256, max_batch=32, seed=seed),
        Lane("large", str(workdir / "large.lmdb"), 192, 192, 3, max_items=32, max_batch=8, seed=seed + LANE_SEED_STRIDE),
    ]


def image_for(seed: int, shape: Tuple[int, int, int]) -> np.ndarray:
    """The image of per-image seed ``seed``: 8×8 blocks of random gray levels with low-bit noise
    (deterministic; compressible, so png records are smaller than raw ones)."""
    h, w, c = shape
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, c), dtype=np.uint8)
    blocks = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:h, :w]
    return blocks ^ rng.integers(0, 8, (h, w, c), dtype=np.uint8)


def label_for(seed: int) -> int:
    """The label of per-image seed ``seed``."""
    return (seed * 7919) % 10


def record_hash(image: np.ndarray, label: Any) -> str:
    """``sha256(shape | label | pixels)``, first 16 hex characters."""
    h = hashlib.sha256(f"{tuple(image.shape)}|{label!r}|".encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()[:16]


def check_record(rec: Any, seq: int, lane: Lane) -> Optional[str]:
    """What is wrong with the record read at ``seq`` (``None`` when every byte is right)."""
    meta = rec.meta
    seed = meta.get("seed")
    if seed != lane.seed + seq:
        return f"{lane.name} seq={seq}: meta seed {seed!r}, expected {lane.seed + seq} (lane seed + seq)"
    if record_hash(rec.image, rec.label) != meta.get("hash"):
        return f"{lane.name} seq={seq}: pixels/label do not match the meta hash {meta.get('hash')!r}"
    if rec.label != label_for(seed) or not np.array_equal(rec.image, image_for(seed, lane.shape)):
        return f"{lane.name} seq={seq}: record differs from the image/label regenerated from seed {seed}"
    return None


def _file_stat(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(os.path.join(path, "data.mdb"))
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size)


def cache_code_fingerprint() -> Dict[str, str]:
    """sha256 (first 12 hex) of each module of :mod:`synthaug.cache`: the code every writer and
    reader process imports when it starts. Compared before and after the campaign, since a
    writer restarted after an edit runs the edited code."""
    folder = Path(synthaug.cache.__file__).parent
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:12] for f in sorted(folder.glob("*.py"))}


def _lanes_from_json(text: str) -> List[Lane]:
    return [Lane(**d) for d in json.loads(text)]


# ---------------------------------------------------------------------------------------- writer
def writer_main(lanes: Sequence[Lane], run_index: int, seed: int) -> None:
    """The writer process: append forever, announcing each append before and after (never returns)."""
    rng = random.Random(f"crash-writer-{seed}-{run_index}")
    caches: Dict[str, Dict[str, SyntheticCache]] = {}
    for lane in lanes:
        first = SyntheticCache(lane.path, map_size=INITIAL_MAP_SIZE, max_items=lane.max_items, encoding=ENCODINGS[0])
        caches[lane.name] = {ENCODINGS[0]: first}
        for enc in ENCODINGS[1:]:  # same environment (one per process), another encoding for new records
            caches[lane.name][enc] = SyntheticCache(lane.path, map_size=INITIAL_MAP_SIZE, encoding=enc)
        print(f"open {lane.name} {first.stats()['map_size']}", flush=True)
    print(f"ready {os.getpid()}", flush=True)
    while True:
        lane = rng.choice(list(lanes))
        enc = rng.choice(ENCODINGS)
        n = rng.randint(1, lane.max_batch)
        cache = caches[lane.name][enc]
        q = cache.stats()["next_seq"]
        seeds = [lane.seed + q + i for i in range(n)]
        images = np.stack([image_for(s, lane.shape) for s in seeds])
        labels = [label_for(s) for s in seeds]
        metas = [{"seed": s, "hash": record_hash(im, lab), "run": run_index, "encoding": enc}
                 for s, im, lab in zip(seeds, images, labels)]
        print(f"begin {lane.name} {q} {n} {enc}", flush=True)
        seqs = cache.append(images, labels, metas)
        print(f"committed {lane.name} {seqs[0]} {seqs[-1]}", flush=True)
        if seqs != list(range(q, q + n)):
            print(f"bug {lane.name}: next_seq read before generating was {q}, so seeds {seeds[0]}..{seeds[-1]} were used, "
                  f"but append gave seqs {seqs[0]}..{seqs[-1]}", flush=True)
        st = cache.stats()
        fs = _file_stat(lane.path) or (0, 0)
        print(f"state {lane.name} {st['next_seq']} {st['map_size']} {st['evicted']} {fs[0]} {fs[1]}", flush=True)
        if rng.random() < 0.15:
            time.sleep(rng.uniform(0.0, 0.02))  # idle moments: kills land between transactions too


# ---------------------------------------------------------------------------------------- readers
def _open_reader(lane: Lane):
    """The lane's cache opened read-only with a tiny map (so every growth is adopted), or
    ``None`` while the writer has not created it yet."""
    try:
        return SyntheticCache(lane.path, readonly=True, map_size=4096)
    except (FileNotFoundError, CacheFormatError):
        return None


def _read_round(cache, lane: Lane, rng: random.Random, counts: Counter, errors: List[str], maps: Dict[str, int]) -> None:
    """One pass over a lane: len, seqs, get, get_many, scan_labels, every record checked."""

    def error(msg: str) -> None:
        counts["errors"] += 1
        if len(errors) < 50:
            errors.append(msg)

    def missing(seqs_asked: Sequence[int], exc: KeyError) -> None:
        first = cache.first_seq()
        if first is None or min(seqs_asked) < first:
            counts["expected_missing"] += 1  # evicted between listing and reading
        else:
            error(f"{lane.name}: KeyError for seqs {sorted(seqs_asked)[:8]} though the first stored seq is {first} "
                  f"(a record vanished without eviction): {exc}")

    n = len(cache)
    if not 0 <= n <= lane.max_items:
        error(f"{lane.name}: len {n} outside 0..max_items {lane.max_items}")
    map_size = cache.stats()["map_size"]
    if map_size != maps.get(lane.name):
        if lane.name in maps:
            counts["map_adoptions"] += 1  # the writer grew the map and this reader took the new size
        maps[lane.name] = map_size
    seqs = cache.seqs()
    if not seqs:
        return
    if seqs != list(range(seqs[0], seqs[-1] + 1)):
        error(f"{lane.name}: seqs() is not dense: {len(seqs)} seqs from {seqs[0]} to {seqs[-1]}")
    for s in rng.sample(seqs, min(4, len(seqs))):
        try:
            rec = cache.get(s)
        except KeyError as exc:
            missing([s], exc)
            continue
        problem = check_record(rec, s, lane)
        counts["reads"] += 1
        if problem:
            error(problem)
    many = rng.sample(seqs, min(16, len(seqs)))
    try:
        recs = cache.get_many(many)
    except KeyError as exc:
        missing(many, exc)
        recs = []
    for s, rec in zip(many, recs):
        counts["reads"] += 1
        problem = check_record(rec, s, lane)
        if problem:
            error(problem)
    labels, corrupt = cache.scan_labels()
    if corrupt:
        error(f"{lane.name}: scan_labels found corrupt records {corrupt[:8]}")
    wrong = [s for s, lab in labels.items() if lab != label_for(lane.seed + s)]
    if wrong:
        error(f"{lane.name}: scan_labels gave labels that do not match the seed rule at seqs {wrong[:8]}")
    counts["labels_scanned"] += len(labels)


def reader_main(lanes: Sequence[Lane], reader_id: int, seed: int) -> None:
    """A reader process: loop over the lanes until stdin closes, then print a JSON summary."""
    stop = threading.Event()

    def wait_for_eof() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    rng = random.Random(f"crash-reader-{seed}-{reader_id}")
    counts: Counter = Counter()
    errors: List[str] = []
    caches: Dict[str, Any] = {}
    maps: Dict[str, int] = {}  # the map size this reader's handle has, per lane
    t0 = time.monotonic()
    while not stop.is_set():
        loop_t0 = time.monotonic()
        for lane in lanes:
            if caches.get(lane.name) is None:
                caches[lane.name] = _open_reader(lane)
                if caches[lane.name] is None:
                    continue
            try:
                _read_round(caches[lane.name], lane, rng, counts, errors, maps)
            except Exception as exc:  # every other failure is an error, kept with its message
                counts["errors"] += 1
                if len(errors) < 50:
                    errors.append(f"{lane.name}: {type(exc).__name__}: {exc}")
        counts["loops"] += 1
        # busy half the time at most: two readers then take about one core, the writer keeps its own
        stop.wait(max(0.005, time.monotonic() - loop_t0))
    summary = dict(counts)
    summary.update(reader=reader_id, errors=counts["errors"], messages=errors, wall_s=time.monotonic() - t0)
    print(json.dumps(summary), flush=True)


# ---------------------------------------------------------------------------------------- parent
class _Lines:
    """The writer's stdout, line by line with arrival times, read by a thread."""

    def __init__(self, stream) -> None:
        self.items: List[Tuple[float, str]] = []
        self.eof = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            with self.cond:
                self.items.append((time.monotonic(), line.rstrip("\n")))
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def wait_for(self, pred: Callable[[List[Tuple[float, str]]], Any], timeout: float) -> Any:
        """Wait until ``pred(lines)`` is truthy (returns it), the stream ends or ``timeout`` passes (``None``)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                got = pred(self.items)
                if got or self.eof:
                    return got or None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)


@dataclass
class _Ledger:
    """What the parent knows of one lane across the campaign."""

    reported: List[Tuple[int, int]]  # committed (first, last) ranges the writer reported
    observed: Dict[int, Tuple[str, int]]  # seq -> (hash, writing run) when first read
    seeds: Dict[int, int]  # seed -> seq
    lost: set
    bad_records: set  # seqs found corrupt, mismatched or changed
    changed: set
    appends: int = 0
    records: int = 0
    appends_evicting: int = 0
    growths: int = 0
    map_end: int = INITIAL_MAP_SIZE
    map_max: int = INITIAL_MAP_SIZE
    max_txn_records: int = 0

    @classmethod
    def new(cls) -> "_Ledger":
        return cls([], {}, {}, set(), set(), set())


class _Campaign:
    """The parent side: start, kill and restart the writer; check the caches after every kill."""

    def __init__(self, lanes: List[Lane], workdir: Path, seed: int, n_readers: int) -> None:
        self.lanes = lanes
        self.by_name = {lane.name: lane for lane in lanes}
        self.workdir = workdir
        self.seed = seed
        self.n_readers = n_readers
        self.rng = random.Random(f"crash-kills-{seed}")
        self.ledgers = {lane.name: _Ledger.new() for lane in lanes}
        self.bad: Counter = Counter({k: 0 for k in BAD_COUNTS})
        self.problems: List[str] = []
        self.landings: Counter = Counter()
        self.modes: Counter = Counter()
        self.per_image_s: Dict[Tuple[str, str], float] = {}
        self.append_s: List[float] = []
        self.kills = 0
        self.env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        self.lanes_json = json.dumps([asdict(lane) for lane in lanes])
        self.writer_log = workdir / "writer.log"

    # ------------------------------------------------------------------ bookkeeping
    def problem(self, kind: str, message: str, n: int = 1) -> None:
        self.bad[kind] += n
        if len(self.problems) < 200:
            self.problems.append(f"[{kind}] {message}")

    def _module_cmd(self, *args: str) -> List[str]:
        return [sys.executable, "-m", "synthaug.benchmarks.crash", *args, "--lanes", self.lanes_json, "--seed", str(self.seed)]

    # ------------------------------------------------------------------ readers
    def start_readers(self) -> List[Tuple[subprocess.Popen, Any]]:
        readers = []
        for i in range(self.n_readers):
            log = open(self.workdir / f"reader-{i}.log", "w")
            proc = subprocess.Popen(self._module_cmd("--reader", "--id", str(i)), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=log, env=self.env, text=True)
            readers.append((proc, log))
        return readers

    def stop_readers(self, readers) -> List[Dict[str, Any]]:
        summaries = []
        for i, (proc, log) in enumerate(readers):
            try:
                out, _ = proc.communicate(input="", timeout=_READER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
                self.problem("reader_errors", f"reader {i} did not stop within {_READER_STOP_TIMEOUT_S:.0f} s of its stdin closing "
                             f"(see {self.workdir / f'reader-{i}.log'})")
            log.close()
            lines = [line for line in out.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                tail = (self.workdir / f"reader-{i}.log").read_text()[-2000:]
                self.problem("reader_errors", f"reader {i} exited with status {proc.returncode} without its summary; stderr: {tail}")
                continue
            s = json.loads(lines[-1])
            summaries.append(s)
            for msg in s.get("messages", []):
                self.problems.append(f"[reader_errors] reader {i}: {msg}")
            self.bad["reader_errors"] += int(s.get("errors", 0))
        return summaries

    # ------------------------------------------------------------------ one kill
    def kill_once(self, run_index: int) -> None:
        baseline = {lane.name: _file_stat(lane.path) for lane in self.lanes}
        with open(self.writer_log, "a") as log:
            log.write(f"--- run {run_index}\n")
            log.flush()
            proc = subprocess.Popen(self._module_cmd("--writer", "--run", str(run_index)), stdout=subprocess.PIPE, stderr=log,
                                    stdin=subprocess.DEVNULL, env=self.env, text=True, bufsize=1)
        lines = _Lines(proc.stdout)
        mode = self.rng.choices(("startup", "anytime", "in_append"), weights=(0.1, 0.4, 0.5))[0]
        self.modes[mode] += 1
        r1, r2 = self.rng.random(), self.rng.randint(1, 6)  # drawn every kill: the sequence does not depend on timing
        if mode == "startup":
            time.sleep(0.3 * r1)
        else:
            ready = lines.wait_for(lambda items: any(l.startswith("ready") for _, l in items), _READY_TIMEOUT_S)
            if not ready and proc.poll() is None:
                self.problem("writer_failures", f"run {run_index}: the writer printed no 'ready' within {_READY_TIMEOUT_S:.0f} s "
                             f"(stalled opening the caches?); see {self.writer_log}")
            elif mode == "anytime":
                time.sleep(0.6 * r1)
            else:
                def nth_begin(items):
                    begins = [l for _, l in items if l.startswith("begin")]
                    return begins[r2 - 1] if len(begins) >= r2 else None

                begin = lines.wait_for(nth_begin, _READY_TIMEOUT_S)
                if begin:
                    _, name, _q, n, enc = begin.split()
                    expected = self.per_image_s.get((name, enc), 0.002) * int(n)
                    time.sleep(1.2 * expected * r1)
        exited = proc.poll()
        if exited is not None:
            tail = self.writer_log.read_text()[-3000:]
            self.problem("writer_failures", f"run {run_index}: the writer exited by itself with status {exited} before its kill; "
                         f"its stderr ends: {tail}")
        else:
            os.kill(proc.pid, signal.SIGKILL)
            self.kills += 1
        proc.wait()
        lines.thread.join(10)
        proc.stdout.close()
        self._account(run_index, lines.items, baseline, killed=exited is None)

    def _account(self, run_index: int, items: List[Tuple[float, str]], baseline, killed: bool) -> None:
        """Read the writer's lines of one run, check every lane, and classify where the kill landed."""
        last_state: Dict[str, Tuple[int, int]] = {}
        map_now: Dict[str, int] = {}
        begin_at: Optional[Tuple[float, str, int, int, str]] = None
        for t, line in items:
            parts = line.split()
            if not parts:
                continue
            kind = parts[0]
            if kind == "open":
                map_now[parts[1]] = int(parts[2])
            elif kind == "begin":
                begin_at = (t, parts[1], int(parts[2]), int(parts[3]), parts[4])
            elif kind == "committed":
                name, first, last = parts[1], int(parts[2]), int(parts[3])
                led, lane = self.ledgers[name], self.by_name[name]
                led.reported.append((first, last))
                led.appends += 1
                led.records += last - first + 1
                led.max_txn_records = max(led.max_txn_records, last - first + 1)
                if last + 1 > lane.max_items:  # the cache held min(first, max_items) before: this append overflowed
                    led.appends_evicting += 1
                if begin_at is not None and begin_at[1] == name:
                    dt = t - begin_at[0]
                    self.append_s.append(dt)
                    key = (name, begin_at[4])
                    per = dt / max(1, begin_at[3])
                    self.per_image_s[key] = per if key not in self.per_image_s else 0.8 * self.per_image_s[key] + 0.2 * per
                begin_at = None
            elif kind == "state":
                name, map_size = parts[1], int(parts[3])
                led = self.ledgers[name]
                if map_size > map_now.get(name, map_size):
                    led.growths += 1
                map_now[name] = map_size
                led.map_end = map_size
                led.map_max = max(led.map_max, map_size)
                last_state[name] = (int(parts[5]), int(parts[6]))
            elif kind == "bug":
                self.problem("seed_seq_mismatches", f"run {run_index}: writer: {line[4:]}")
        stored_last = {lane.name: self.check_lane(lane) for lane in self.lanes}
        last_line = items[-1][1] if items else ""
        if not killed:
            landing = "writer exited"
        elif not any(l.startswith("ready") for _, l in items):
            landing = "during start-up"
        elif last_line.startswith("begin") and begin_at is not None:
            _, name, q, n, _enc = begin_at
            now = _file_stat(self.by_name[name].path)
            before = last_state.get(name, baseline.get(name))
            if stored_last[name] is not None and stored_last[name] >= q + n - 1:
                landing = "in append: committed, not yet reported"
            elif now != before:
                landing = "in append: data file written, not committed"
            else:
                landing = "in append: before the commit wrote"
        else:
            landing = "between appends"
        self.landings[landing] += 1

    # ------------------------------------------------------------------ checks
    def check_lane(self, lane: Lane) -> Optional[int]:
        """Check one lane's cache against everything known of it; returns its last stored seq."""
        led = self.ledgers[lane.name]
        reported = sum(b - a + 1 for a, b in led.reported)
        try:
            cache = SyntheticCache(lane.path, readonly=True, map_size=4096)
        except (FileNotFoundError, CacheFormatError) as exc:
            if reported:
                self.problem("committed_records_lost", f"{lane.name}: {reported} records were reported committed but the cache "
                             f"cannot be opened: {exc}", reported)
            return None
        with cache:
            st = cache.stats()
            report = cache.verify()
            seqs = cache.seqs()
            first, last, count, next_seq = st["first_seq"], st["last_seq"], st["count"], st["next_seq"]
            for s in report["corrupt_seqs"]:
                if s not in led.bad_records:
                    led.bad_records.add(s)
                    self.problem("torn_or_corrupt_records", f"{lane.name} seq={s}: verify(): {report['errors'][s]}")
            for p in report["problems"]:
                self.problem("meta_inconsistencies", f"{lane.name}: verify(): {p}")
            if seqs and seqs != list(range(seqs[0], seqs[-1] + 1)):
                self.problem("meta_inconsistencies", f"{lane.name}: stored seqs are not dense ({len(seqs)} from {seqs[0]} to {seqs[-1]})")
            if count != min(next_seq, lane.max_items) or count != len(seqs):
                self.problem("meta_inconsistencies", f"{lane.name}: count {count} ({len(seqs)} seqs listed) but next_seq {next_seq} "
                             f"and max_items {lane.max_items}: expected min(next_seq, max_items)")
            if last is not None and next_seq != last + 1:
                self.problem("meta_inconsistencies", f"{lane.name}: next_seq {next_seq} but the last record is {last}")
            if st["appended"] != next_seq or st["evicted"] != next_seq - count:
                self.problem("meta_inconsistencies", f"{lane.name}: counters appended={st['appended']} evicted={st['evicted']} "
                             f"do not fit next_seq {next_seq} and count {count}")
            if st["max_items"] != lane.max_items:
                self.problem("meta_inconsistencies", f"{lane.name}: stored max_items {st['max_items']}, set {lane.max_items}")
            for i in range(0, len(seqs), 256):
                chunk = [s for s in seqs[i : i + 256] if s not in report["corrupt_seqs"]]
                try:
                    recs = cache.get_many(chunk)
                except (KeyError, CorruptRecordError) as exc:
                    self.problem("torn_or_corrupt_records", f"{lane.name}: get_many after verify failed: {exc}")
                    continue
                for s, rec in zip(chunk, recs):
                    self._check_one(lane, led, s, rec)
        # committed and reported: stored, or evicted (below the first seq of a full cache)
        full = count >= lane.max_items
        lost_now = []
        for a, b in led.reported:
            lo = max(a, first) if (full and first is not None) else a
            for s in range(lo, b + 1):
                if last is None or s > last or s < first:
                    lost_now.append(s)
        new_lost = [s for s in lost_now if s not in led.lost]
        if new_lost:
            led.lost.update(new_lost)
            self.problem("committed_records_lost", f"{lane.name}: {len(new_lost)} records reported committed are gone, seqs "
                         f"{new_lost[:10]}{'...' if len(new_lost) > 10 else ''} (stored {first}..{last}, count {count}, "
                         f"max_items {lane.max_items})", len(new_lost))
        return last

    def _check_one(self, lane: Lane, led: _Ledger, s: int, rec) -> None:
        problem = check_record(rec, s, lane)
        if problem:
            if s not in led.bad_records:
                led.bad_records.add(s)
                kind = "seed_seq_mismatches" if problem.endswith("(lane seed + seq)") else "torn_or_corrupt_records"
                self.problem(kind, problem)
            return
        meta = rec.meta
        seed, h, run_index = meta["seed"], meta["hash"], meta.get("run")
        seen = led.observed.get(s)
        if seen is None:
            led.observed[s] = (h, run_index)
        elif seen != (h, run_index) and s not in led.changed:
            led.changed.add(s)
            self.problem("records_changed", f"{lane.name} seq={s}: was hash {seen[0]} written by run {seen[1]}, now hash {h} "
                         f"written by run {run_index} (a committed record was replaced)")
        other = led.seeds.setdefault(seed, s)
        if other != s:
            self.problem("seeds_repeated", f"{lane.name}: seed {seed} stored at seq {other} and at seq {s}")

    def check_value_bytes(self) -> None:
        """At the end, with every handle closed: stored ``value_bytes`` against the records' sizes."""
        import lmdb

        for lane in self.lanes:
            if _file_stat(lane.path) is None:
                continue
            try:
                env = lmdb.open(lane.path, readonly=True, lock=False, max_dbs=4, subdir=True)
            except lmdb.Error as exc:  # still open in this process: skip this extra check
                self.problems.append(f"[note] {lane.name}: value_bytes not checked ({exc})")
                continue
            try:
                rec_db, meta_db = env.open_db(b"records", create=False), env.open_db(b"meta", create=False)
                with env.begin() as txn:
                    real = sum(len(v) for _, v in txn.cursor(db=rec_db))
                    stored = json.loads(bytes(txn.get(b"value_bytes", db=meta_db) or b"0"))
            finally:
                env.close()
            if real != stored:
                self.problem("meta_inconsistencies", f"{lane.name}: meta value_bytes {stored} but the records hold {real} bytes")


# ---------------------------------------------------------------------------------------- run
def run(kills: int = DEFAULT_KILLS, *, seed: int = 0, quick: bool = False, readers: int = 2, workdir: Optional[str] = None,
        out: Optional[str] = None, progress: bool = True, write: bool = True) -> Dict[str, Any]:
    """Run the crash campaign and return its result dict (``result["ok"]``: every bad count is 0).

    Args:
        kills: SIGKILLs of the writer (each followed by a restart, and checks of both caches).
        seed: seeds the kill delays, the writer's batches and the records' per-image seeds.
        quick: only names the result ``crash_quick.json`` (the kill count is the caller's).
        readers: reader processes beside the writer.
        workdir: an empty or new folder for the caches and logs, kept afterwards; default a
            temporary folder, removed when every check passed and kept (its path printed) otherwise.
        out: folder for the JSON (default ``benchmarks/results``).
        progress: show a tqdm bar over the kills.
        write: write the JSON (and print the tables).
    """
    from synthaug.progress import progress_bar

    if kills < 1:
        raise ValueError(f"kills must be >= 1, got {kills}")
    if readers < 0:
        raise ValueError(f"readers must be >= 0, got {readers}")
    own_tmp = workdir is None
    folder = Path(tempfile.mkdtemp(prefix="synthaug-crash-")) if own_tmp else Path(workdir)
    if not own_tmp:
        output_dir(folder, what="--workdir", hint="give a new or empty folder for the caches and logs")
    lanes = default_lanes(folder, seed)
    camp = _Campaign(lanes, folder, seed, readers)
    code_before = cache_code_fingerprint()
    t0 = time.perf_counter()
    reader_procs = camp.start_readers()
    try:
        bar = progress_bar(range(kills), desc="crash", unit="kill", dynamic_ncols=True, disable=not progress)
        for k in bar:
            camp.kill_once(k)
            bar.set_postfix(appends=sum(led.appends for led in camp.ledgers.values()), bad=sum(camp.bad.values()), refresh=False)
        bar.close()
        summaries = camp.stop_readers(reader_procs)
    except BaseException:
        for proc, log in reader_procs:
            if proc.poll() is None:
                proc.kill()
            log.close()
        raise
    camp.check_value_bytes()
    wall = time.perf_counter() - t0
    code_after = cache_code_fingerprint()
    code_changed = sorted(set(code_before.items()) ^ set(code_after.items()))

    lane_rows = []
    for lane in lanes:
        led = camp.ledgers[lane.name]
        st = _final_stats(lane)
        lane_rows.append({
            "lane": lane.name, "image": f"{lane.height}x{lane.width}x{lane.channels}", "max_items": lane.max_items,
            "appends": led.appends, "records": led.records, "evicting_appends": led.appends_evicting,
            "evicted": st.get("evicted", 0), "stored": st.get("count", 0), "next_seq": st.get("next_seq", 0),
            "map_start": INITIAL_MAP_SIZE, "map_end": led.map_end, "map_max": led.map_max, "growths": led.growths,
            "largest_append": led.max_txn_records, "lost": len(led.lost), "corrupt": len(led.bad_records),
        })
    in_append = sum(v for k, v in camp.landings.items() if k.startswith("in append"))
    reads = sum(s.get("reads", 0) for s in summaries)
    totals = {
        "kills": camp.kills,
        "kills_in_append": in_append,
        "appends_committed": sum(r["appends"] for r in lane_rows),
        "records_committed": sum(r["records"] for r in lane_rows),
        "appends_evicting": sum(r["evicting_appends"] for r in lane_rows),
        "evictions": sum(r["evicted"] for r in lane_rows),
        "map_growths": sum(r["growths"] for r in lane_rows),
        "map_size_start": INITIAL_MAP_SIZE,
        "map_size_end": {r["lane"]: r["map_end"] for r in lane_rows},
        "reader_reads": reads,
        "reader_labels_scanned": sum(s.get("labels_scanned", 0) for s in summaries),
        "reader_expected_missing": sum(s.get("expected_missing", 0) for s in summaries),
        "reader_map_adoptions": sum(s.get("map_adoptions", 0) for s in summaries),
        "reader_loops": sum(s.get("loops", 0) for s in summaries),
        "median_append_ms": 1000 * statistics.median(camp.append_s) if camp.append_s else None,
        "max_append_ms": 1000 * max(camp.append_s) if camp.append_s else None,
        "wall_s": wall,
    }
    bad = {k: int(camp.bad[k]) for k in BAD_COUNTS}
    ok = all(v == 0 for v in bad.values())
    settings = {"kills": kills, "seed": seed, "quick": quick, "readers": readers, "encodings": list(ENCODINGS),
                "initial_map_size": INITIAL_MAP_SIZE, "lanes": [asdict(lane) | {"path": Path(lane.path).name} for lane in lanes],
                "kill_modes": dict(camp.modes), "cache_code": code_before}
    result = {"ok": ok, "settings": settings, "totals": totals, "bad": bad, "landings": dict(camp.landings), "lanes": lane_rows,
              "problems": camp.problems, "readers": summaries}
    if code_changed:
        result["cache_code_changed_during_run"] = sorted({name for name, _ in code_changed})
        result["cache_code_at_end"] = code_after
    kept = None
    if ok and own_tmp:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        kept = str(folder)
        result["workdir"] = kept
    if write:
        _print_report(result, print_table)
        path = write_result("crash" + ("_quick" if quick else ""), result, out)
        result["path"] = str(path)
        verdict = "every check passed" if ok else f"FAILED: {', '.join(f'{k}={v}' for k, v in bad.items() if v)}"
        where = f"; caches and logs kept in {kept}" if kept else "; caches removed"
        if code_changed:
            print(f"warning: synthaug/cache/{', '.join(result['cache_code_changed_during_run'])} changed during the campaign: "
                  "later writer runs used the edited code; rerun on a quiet tree for figures of one version")
        print(f"crash: {camp.kills} kills, {totals['appends_committed']:,} appends, {reads:,} reader reads in {wall:.0f} s: "
              f"{verdict}; wrote {path}{where}")
    return result


def _final_stats(lane: Lane) -> Dict[str, Any]:
    try:
        with SyntheticCache(lane.path, readonly=True, map_size=4096) as cache:
            return cache.stats()
    except (FileNotFoundError, CacheFormatError):
        return {}


def _print_report(result: Dict[str, Any], print_table) -> None:
    t, b = result["totals"], result["bad"]
    rows = [
        {"metric": "kills (SIGKILL of the writer)", "value": t["kills"], "must be": ""},
        {"metric": "kills inside an append", "value": t["kills_in_append"], "must be": ""},
        *({"metric": f"  landed {k}", "value": v, "must be": ""} for k, v in sorted(result["landings"].items())),
        {"metric": "appends committed (reported)", "value": t["appends_committed"], "must be": ""},
        {"metric": "records committed (reported)", "value": t["records_committed"], "must be": ""},
        {"metric": "appends that evicted", "value": t["appends_evicting"], "must be": ""},
        {"metric": "records evicted", "value": t["evictions"], "must be": ""},
        {"metric": "map growths seen", "value": t["map_growths"], "must be": ""},
        {"metric": "map size start -> end", "value": ", ".join(f"{k} {t['map_size_start'] // 1024} KiB -> {v / 2**20:.2f} MiB"
                                                                for k, v in t["map_size_end"].items()), "must be": ""},
        {"metric": "readers' reads (records checked)", "value": t["reader_reads"], "must be": ""},
        {"metric": "readers' labels scanned", "value": t["reader_labels_scanned"], "must be": ""},
        {"metric": "readers' expected KeyErrors (evicted)", "value": t["reader_expected_missing"], "must be": ""},
        {"metric": "readers' map adoptions", "value": t["reader_map_adoptions"], "must be": ""},
        *({"metric": k.replace("_", " "), "value": v, "must be": 0} for k, v in b.items()),
        {"metric": "wall time (s)", "value": round(t["wall_s"], 1), "must be": ""},
    ]
    print_table(rows, ["metric", "value", "must be"])
    print()
    print_table(result["lanes"], ["lane", "image", "max_items", "appends", "records", "evicting_appends", "evicted", "stored",
                                  "map_end", "growths", "largest_append", "lost", "corrupt"])
    for p in result["problems"][:20]:
        print(p)


# ---------------------------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``synthaug bench crash``: parse flags, run the campaign, exit 1 if any bad count is not 0."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=None, help=f"SIGKILLs of the writer (default {DEFAULT_KILLS}; --quick {QUICK_KILLS})")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill delays, the batches and the records' seeds (default 0)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_KILLS} kills, written as crash_quick.json (a smoke test)")
    p.add_argument("--readers", type=int, default=2, help="reader processes beside the writer (default 2)")
    p.add_argument("--workdir", default=None,
                   help="new or empty folder for the caches and logs, kept (default: a temp folder, removed unless a check failed)")
    p.add_argument("--out", default=None, help="folder for crash.json (crash_quick.json with --quick; default benchmarks/results)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # internal: the writer and reader processes the campaign starts
    p.add_argument("--writer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--reader", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lanes", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--id", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.writer or args.reader:
        if not args.lanes:
            p.error("--writer/--reader are started by the campaign itself, with --lanes JSON")
        lanes = _lanes_from_json(args.lanes)
        if args.writer:
            writer_main(lanes, args.run, args.seed)
        else:
            reader_main(lanes, args.id, args.seed)
        return {}
    kills = args.kills if args.kills is not None else (QUICK_KILLS if args.quick else DEFAULT_KILLS)
    if kills < 1:
        p.error(f"--kills must be at least 1, got {kills}")
    if args.readers < 0:
        p.error(f"--readers must be 0 or more, got {args.readers}")
    try:
        result = run(kills, seed=args.seed, quick=args.quick, readers=args.readers, workdir=args.workdir, out=args.out,
                     progress=not args.no_progress)
    except FileExistsError as exc:  # --workdir refused before the campaign starts: say it with the usage line
        p.error(str(exc))
    if not result["ok"]:
        print(f"crash campaign FAILED (seed {args.seed}, {kills} kills): see the problems above, {result['path']} and the "
              f"logs in {result.get('workdir')}; rerun with the same --seed to reproduce", file=sys.stderr)
        raise SystemExit(1)
    return result


if __name__ == "__main__":  # pragma: no cover
    main()
