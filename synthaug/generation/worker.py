"""``GenerationWorker``: a background process that keeps a synthetic cache topped up.

The worker runs in its own process (``spawn`` start method: it never inherits the training
process's CUDA context, threads or open LMDB handles). It rebuilds the generator there from its
``spec`` (:func:`~synthaug.generation.loading.generator_from_spec`, with ``device`` overridden when
given) and reopens the cache from its path. The same loop runs in the foreground as
``synthaug worker`` (:func:`run_worker`).

Protocol
--------
**Fresh records.** A record is *fresh* while no consumer has been handed it: consumers
(``RatioBatchSampler``) record cursors in the cache, the next sequence number they have not been
handed, and fresh = records at or after the smallest cursor (every record when no consumer has a
cursor yet; :meth:`SyntheticCache.fresh_count`). While fewer than ``min_fresh`` records are
fresh, or a consumer says it is waiting for a record (its cursor's ``waiting`` flag: one drawing
only some classes may want none of the fresh records), the worker generates ``batch_size``
images and appends them in one transaction. Its first batch (the first of the process), when
nothing is fresh, holds at most ``FIRST_BATCH`` (4) images: a trainer that started with the
worker waits for those, not for a full batch (sampled in a smaller batch, images can differ in a
few pixels by one level from their batched selves, see :mod:`synthaug.generation.sd`; their seeds
do not change).

**max_items.** The cache never holds more than ``max_items`` records (nor more than the cache's
own stored ``max_items``, if smaller). To make room the worker evicts the oldest records inside
the transaction of its append (``cache.append(..., fit_within=max_items)``), and only records
that every live consumer has been handed *and released*: a consumer (``RatioBatchSampler``)
publishes, beside its cursor, a ``hold`` — the oldest record it may still read, because a
DataLoader has not read it yet or because it keeps served records to reuse. When the next append
will need room, the worker asks for it first (``cache.request_eviction``); consumers raise their
holds as far as their in-flight batches allow, the next time they draw a batch. If that is not
enough the worker appends fewer images or none and waits in state ``"paused"``: generated images
are never evicted unseen, and records are never evicted between a sampler's choice and the
DataLoader's read. A consumer whose process has exited no longer counts; one that is alive but
stopped drawing keeps what it holds (``sampler.close()`` or ``cache.remove_cursor(name)`` ends
that).

**Seeds.** Per-image seeds follow the rules of :mod:`synthaug.generation.fill`. Without a gate,
on a seed block without a seed counter (the *sequence rule*): the images appended as sequence
numbers ``q, q+1, ...`` are generated with ``generate(k, seed + q)``, so record ``q`` has per-image
seed ``seed + q``. The counter is the cache's own ``next_seq``, which is advanced in the same
transaction as the append: a worker restarted on the same cache with the same ``seed`` continues
the sequence (no seed repeats, whether the previous worker stopped or was killed), and a batch lost
to a kill is simply generated again. If another writer appends between the worker's read of
``next_seq`` and its append, seeds and sequence numbers no longer coincide (each record's meta
still holds its seed), and the worker prints a warning. With a gate (or on a block a gated writer
has used: the *counter rule*), a batch of ``k`` gets the seeds ``c .. c+k-1``, ``c = max(seed +
next_seq, seed_counter)``, reserved in the cache (:meth:`SyntheticCache.reserve_seeds`, one
transaction) *before* the batch is generated: no seed is used twice, whether its image was
stored, rejected or lost to a kill (a killed batch's seeds are skipped). A worker holds the cache's writer lock for its seed block (``seed // 10**9``,
:mod:`synthaug.cache.writers`) for its whole life: a second worker with seeds in the same block is
refused with :class:`~synthaug.errors.CacheBusyError` naming the first; several workers share a
cache with seeds in different blocks (``seed = k * 10**9``, ``synthaug worker --seed-offset k``).

**Several classes.** ``GenerationWorker(cache, {"Shirt": adapter_a, "Coat": adapter_b, ...})``
(``synthaug worker --adapter Shirt=DIR --adapter Coat=DIR``): one process, one loaded base model,
one LoRA adapter per class swapped in before each of that class's batches
(:mod:`synthaug.generation.multi`; adapters on different base models are refused before the
process starts). Which class a batch is for follows demand (:mod:`synthaug.generation.demand`):
each class keeps ``min_fresh · w_c / Σw`` fresh records of its label, ``w`` being the live
consumers' per-class ratios from their cursors (``ratios``), else ``demand=``, else equal; the
class with the largest relative deficit goes next, and a consumer waiting for records is served
first. Fresh records are counted per label from the records' headers, reading each record once
(:class:`~synthaug.generation.demand.ClassTally`). The seed rules do not change: they are
per seed block, not per class, so a batch of any class stored as sequence numbers ``q, q+1, ...``
has seeds ``seed + q, ...`` (sequence rule), or seeds reserved from the block's counter (counter
rule); every record's seed is unique across the classes and across restarts, and
``meta["label"]``/``meta["adapter"]`` say which class and adapter made it. The first batch of
each class, when none of its records is fresh, holds at most ``FIRST_BATCH`` images.

**Fidelity gate.** ``gate=`` (a :class:`~synthaug.generation.gate.FidelityGate`, sent as its
spec and rebuilt in the worker process): each generated batch is scored and only the accepted
images are appended, with ``meta["gate_score"]`` and ``meta["gate"]``. The worker counts accepted
and rejected images and fails (``RuntimeError`` naming the rate) when fewer than 1% of at least
300 generated images passed (:func:`~synthaug.generation.gate.check_acceptance`).

**Heartbeat.** The worker writes ``cache.write_heartbeat(...)`` about once a second — from a
thread, so also while the model loads and during a long ``generate()`` — and at once on every
change of state. One heartbeat per seed block (key ``heartbeat/<block>`` of the cache's meta;
``cache.heartbeats()``); schema::

    {"worker_id": str,          # this worker (GenerationWorker(worker_id=...), default host-random)
     "pid": int, "host": str,   # its process and host
     "pid_start": int | None,   # the process's start time (Linux clock ticks): a reused pid is told apart
     "time": float,             # time.time() of the write
     "state": "starting" | "running" | "paused" | "stopped" | "failed",
     "generated": int,          # images appended by this process since it started
     "accepted": int,           # images that passed the gate (all made, without one; >= generated
                                #   when some found no room), since it started
     "rejected": int,           # images the gate refused
     "acceptance_rate": float | None,  # accepted / (accepted + rejected); None before any
     "images_per_s": float,     # recent rate of appended (accepted) images, generation, gating
                                #   and append included, images per second
     "next_seed": int | None,   # per-image seed of the next image made
     "seed_counter": int | None,  # the block's seed counter (counter rule), None: sequence rule
     "gate": dict | None,       # label_name, low, high of the gate, None without one
     "last_error": str | None,  # "ExceptionType: message" when state is "failed"
     "seed": int, "min_fresh": int, "max_items": int,
     "fresh": int, "count": int,   # fresh and stored records at the last check
     "classes": {name: {"label": int,       # several classes only (else None), per class:
                        "generated": int,   #   images appended by this process
                        "fresh": int,       #   fresh records of its label at the last check
                        "served": int | None,  # summed over live cursors' served_by_class (None: no cursor counts)
                        "target": float | None}},  # fresh records the demand rule aims at (None before its first check)
     "demand_source": "cursors" | "demand" | "equal" | None}  # where the classes' weights came from

``"running"`` covers both generating and idling with ``min_fresh`` reached. A failed worker
writes ``"failed"`` and ``last_error`` before it exits, so readers in other processes can stop
waiting at once; if a worker dies without writing its final state (SIGKILL, OOM killer), the
``GenerationWorker`` that started it writes ``"failed"`` (or ``"stopped"``, if it was being
stopped) on its behalf, stamped with the time it noticed. A foreground worker (``synthaug
worker``) has no such parent: readers on its host see that its pid is gone
(:func:`synthaug.cache.liveness.dead_writer`), readers elsewhere that its heartbeat stopped.

**Stopping.** SIGTERM and SIGINT request a stop: an append (or heartbeat write) in progress is
finished, a generation in progress is abandoned, ``"stopped"`` is written and the process exits
with status 0. :meth:`GenerationWorker.stop` sends SIGTERM, waits ``timeout`` seconds, then sends
SIGKILL (LMDB transactions are atomic: a killed worker leaves no partial record). A stopped or
killed worker can be started again, or a new one started on the same cache: it continues.

**Errors.** An exception in the worker (loading the model, generating, appending) is written to
the heartbeat and sent to the parent with its traceback; :meth:`GenerationWorker.raise_if_failed`
and the context manager's exit raise it as :class:`~synthaug.errors.GenerationWorkerError`. The
cache stays valid: a failure can only happen between transactions.

One concept in one module (longer than the ~600 lines the project aims at, on purpose): the worker,
its protocol (above), its loop and the process that runs it. The generate-and-append step is
:func:`synthaug.generation.fill.generate_into`; stopping is :mod:`synthaug.generation.stopping`.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Mapping, Optional, Tuple

from synthaug.cache.store import SyntheticCache
from synthaug.cache.writers import WriterLock, seed_block
from synthaug.generation.base import Generator
from synthaug.generation.demand import ClassTally, plan_class, served_by_class
from synthaug.generation.fill import Batch, generate_into
from synthaug.generation.gate import FidelityGate, check_acceptance
from synthaug.generation.loading import generator_from_spec
from synthaug.generation.multi import MultiAdapterGenerator, check_class_specs, load_class_generators
from synthaug.generation.stopping import StopRequested, StopSignal
from synthaug.errors import GenerationWorkerError, SyntheticExhaustedError

__all__ = ["GenerationWorker", "WorkerSettings", "run_worker", "STATES"]

STATES = ("starting", "running", "paused", "stopped", "failed")
_STATE_CODE = {name: i for i, name in enumerate(STATES)}
FIRST_BATCH = 4  # images in a worker's first batch when nothing is fresh (module docstring)
_MAX_TRACEBACK = 20_000  # characters sent to the parent (a pipe message must not fill the pipe)


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker process is told (picklable; the generator travels as its spec)."""

    min_fresh: int
    max_items: int
    batch_size: int
    seed: int = 0
    worker_id: str = ""
    poll_interval: float = 0.2
    heartbeat_interval: float = 1.0
    num_threads: Optional[int] = None
    gate: Optional[Dict[str, Any]] = None  # FidelityGate.spec
    demand: Optional[Dict[str, float]] = None  # the classes' weights when no cursor states ratios


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:1000]


class _WorkerLoop:
    """The worker's loop; runs in the worker process (or in the foreground for ``synthaug worker``)."""

    def __init__(
        self,
        cache,
        spec: Dict[str, Any],
        settings: WorkerSettings,
        stop: StopSignal,
        *,
        shared: Optional[Tuple[Any, Any]] = None,
        parent_alive: Optional[Callable[[], bool]] = None,
        progress: Optional[Callable[[Dict[str, Any]], None]] = None,
    ) -> None:
        self.cache = cache
        self.spec = spec
        self.s = settings
        self.stop = stop
        self.shared = shared
        self.parent_alive = parent_alive
        self.progress = progress
        self.state = "starting"
        self.generated = 0
        self.discarded = 0
        self.accepted = 0
        self.rejected = 0
        self.next_seed: Optional[int] = None
        self.seed_counter: Optional[int] = None  # the counter rule's counter, once it applies
        self.counted = False  # whether the counter rule applies (a gate, or a block with a counter)
        self.fresh = 0
        self.count = 0
        self.last_error: Optional[str] = None
        self._window: Deque[Tuple[int, float]] = deque(maxlen=20)
        self._last_beat = 0.0
        self._beat_state: Optional[str] = None
        self._warned_writer = False
        self._planned: set = set()  # the classes this process has planned a batch of (FIRST_BATCH; None: the one generator)
        # the heartbeat thread and the loop write heartbeats under this lock; after the final
        # state ("stopped"/"failed") nothing else is written
        self._beat_lock = threading.Lock()
        self._final = False
        self._pulse_stop = threading.Event()
        self._pulse: Optional[threading.Thread] = None
        # several classes (one LoRA adapter each): their labels, counts and the demand rule's state
        self.class_labels: Optional[Dict[str, int]] = None
        self.class_generated: Dict[str, int] = {}
        self.class_fresh: Dict[str, int] = {}
        self.class_served: Dict[str, Optional[int]] = {}
        self.class_targets: Dict[str, float] = {}
        self.demand_source: Optional[str] = None
        self._tally: Optional[ClassTally] = None

    # ------------------------------------------------------------------ reporting
    @property
    def images_per_s(self) -> float:
        n = sum(k for k, _ in self._window)
        t = sum(dt for _, dt in self._window)
        return n / t if t > 0 else 0.0

    @property
    def acceptance_rate(self) -> Optional[float]:
        made = self.accepted + self.rejected
        return round(self.accepted / made, 6) if made else None

    def info(self) -> Dict[str, Any]:
        return {
            "worker_id": self.s.worker_id,
            "pid": os.getpid(),
            "time": time.time(),
            "state": self.state,
            "generated": self.generated,
            "discarded": self.discarded,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "acceptance_rate": self.acceptance_rate,
            "images_per_s": round(self.images_per_s, 4),
            "next_seed": self.next_seed,
            "seed_counter": self.seed_counter,
            "gate": None if self.s.gate is None else {k: self.s.gate[k] for k in ("label_name", "low", "high")},
            "last_error": self.last_error,
            "seed": self.s.seed,
            "min_fresh": self.s.min_fresh,
            "max_items": self.s.max_items,
            "fresh": self.fresh,
            "count": self.count,
            "classes": self._classes_info(),
            "demand_source": self.demand_source,
        }

    def _classes_info(self) -> Optional[Dict[str, Dict[str, Any]]]:
        if self.class_labels is None:
            return None
        return {
            name: {
                "label": label,
                "generated": self.class_generated.get(name, 0),
                "fresh": self.class_fresh.get(name, 0),
                "served": self.class_served.get(name),
                "target": round(self.class_targets[name], 3) if name in self.class_targets else None,
            }
            for name, label in self.class_labels.items()
        }

    def beat(self, state: str, *, force: bool = False) -> None:
        """Publish the state: shared memory always, the cache heartbeat when due or changed."""
        self.state = state
        if self.shared is not None:
            ints, floats = self.shared
            ints[0] = _STATE_CODE[state]
            ints[1] = self.generated
            ints[2] = -1 if self.next_seed is None else self.next_seed
            ints[3] = self.fresh
            ints[4] = self.accepted
            ints[5] = self.rejected
            floats[0] = self.images_per_s
        now = time.monotonic()
        if force or state != self._beat_state or now - self._last_beat >= self.s.heartbeat_interval:
            with self._beat_lock:
                if self._final:
                    return
                self._final = state in ("stopped", "failed")
                info = self.info()
                with self.stop.critical():
                    self.cache.write_heartbeat(info)
                self._last_beat = now
                self._beat_state = state
            if self.progress is not None:
                self.progress(info)

    def start_pulse(self) -> None:
        """Write the heartbeat every ``heartbeat_interval`` s from a thread, so readers see the
        worker alive while it loads its model or runs one long ``generate()``."""
        self._pulse = threading.Thread(target=self._pulse_loop, name="synthaug-worker-heartbeat", daemon=True)
        self._pulse.start()

    def stop_pulse(self) -> None:
        self._pulse_stop.set()
        if self._pulse is not None:
            self._pulse.join()

    def _pulse_loop(self) -> None:
        while not self._pulse_stop.wait(self.s.heartbeat_interval):
            if time.monotonic() - self._last_beat < self.s.heartbeat_interval * 0.5:
                continue  # the loop has just written one
            with self._beat_lock:
                if self._final:
                    return
                try:
                    self.cache.write_heartbeat(self.info())
                    self._last_beat = time.monotonic()
                except Exception:  # the loop meets the same error at its next write and reports it
                    pass

    def _sleep(self) -> None:
        time.sleep(self.s.poll_interval)

    # ------------------------------------------------------------------ the loop
    def run(self):
        self.seed_counter = self.cache.seed_counter(self.s.seed)
        self.counted = self.s.gate is not None or self.seed_counter is not None
        self.start_pulse()
        self.beat("starting", force=True)
        if self.s.num_threads:
            import torch

            torch.set_num_threads(int(self.s.num_threads))
        multi = "classes" in self.spec
        generator = load_class_generators(self.spec) if multi else generator_from_spec(self.spec)
        try:
            if multi:
                self._start_classes(generator)
            gate = FidelityGate.from_spec(self.s.gate) if self.s.gate is not None else None
            with self.stop.critical():
                self._prepare_cache(generator)
                self.beat("running")  # the model is loaded: start(wait=True) returns
            while True:
                if self.parent_alive is not None and not self.parent_alive():
                    break  # the process that started us is gone: nobody consumes any more
                with self.stop.critical():
                    plan = self._plan()
                if plan is None:
                    self._sleep()
                    continue
                name, first_seq, k, limit = plan
                making = generator.for_class(name) if multi else generator
                first_seed = self.next_seed
                if self.counted:  # counter rule: reserve the batch's seeds in the cache first
                    with self.stop.critical():
                        first_seed = self.cache.reserve_seeds(self.s.seed, k)
                        self.seed_counter = self.next_seed = first_seed + k
                t0 = time.perf_counter()
                # evicting for it (only what every consumer released) and appending are one
                # transaction: nothing a consumer holds can go between a decision and the trim
                generate_into(making, self.cache, k, first_seed, gate=gate, fit_within=limit, stop=self.stop,
                              stored=lambda out: self._stored(out, first_seq, t0, name))
                if gate is not None:
                    check_acceptance(self.accepted, self.accepted + self.rejected, gate)
        finally:
            generator.close()

    def _start_classes(self, generator: MultiAdapterGenerator) -> None:
        """The classes' labels (from their loaded generators) and the tally of their records."""
        labels = {}
        for name in generator.classes:
            label = generator.labels.get(name)
            if label is None or isinstance(label, bool) or not isinstance(label, int):
                raise ValueError(f"class {name!r}: its generator has no single int label ({label!r}); the worker counts records by label")
            labels[name] = label
        self.class_labels = labels
        self.class_generated = {name: 0 for name in labels}
        self._tally = ClassTally(list(labels.values()))

    def _stored(self, out: Batch, first_seq: int, t0: float, name: Optional[str] = None) -> None:
        """Account for one generated batch and its append (inside its critical section)."""
        self.accepted += out.accepted
        self.rejected += out.rejected
        seqs = out.seqs
        if len(seqs) < out.accepted:  # another writer filled the room meanwhile
            self.discarded += out.accepted - len(seqs)
        if out.accepted and not seqs:
            self.beat("paused")
            return
        k = len(seqs)
        self._window.append((k, time.perf_counter() - t0))  # a batch the gate refused whole counts as 0 images
        self.generated += k
        if name is not None:
            self.class_generated[name] += k
            self.class_fresh[name] = self.class_fresh.get(name, 0) + k
        if not self.counted and seqs:
            self.next_seed = self.s.seed + seqs[-1] + 1
        self.fresh += k
        self.count += k
        if not self.counted and seqs and seqs[0] != first_seq and not self._warned_writer:
            self._warned_writer = True
            print(
                f"synthaug worker: another writer appended to {self.cache.path} while this worker generated; "
                "records' seeds no longer equal seed + seq (each record's meta holds its seed).",
                file=sys.stderr,
            )
        self.beat("running")

    def _prepare_cache(self, generator) -> None:
        multi = isinstance(generator, MultiAdapterGenerator)
        for gen in [generator.for_class(name) for name in generator.classes] if multi else [generator]:
            names = getattr(gen, "label_names", None)
            if names:
                self.cache.adopt_label_names(names)  # refuses a cache whose names disagree

    def _plan(self) -> Optional[Tuple[Optional[str], int, int, int]]:
        """``(class, first seq, number of images, limit)`` to generate now (class ``None``: the
        one generator), or ``None`` (and the state) to wait. Asks consumers for room ahead of
        need, so it is free by the time of the append."""
        self.cache.check_present()  # a deleted cache would swallow every record
        name = None
        if self._tally is None:
            snap = self.cache.supply()
        else:
            scan = self._tally.update(self.cache)
            snap, cursors = scan["supply"], scan["cursors"]
            handed = min((int(c.get("next_seq", 0)) for c in cursors.values()), default=0)
            self.class_fresh = {n: self._tally.fresh(lab, handed) for n, lab in self.class_labels.items()}
            self.class_served = {n: served_by_class(cursors, lab) for n, lab in self.class_labels.items()}
            demand = plan_class(self.class_fresh, self.class_labels, cursors, self.s.min_fresh, self.s.demand)
            self.class_targets, self.demand_source, name = demand.targets, demand.source, demand.choice
        count, next_seq = snap["count"], snap["next_seq"]
        limit = min(self.s.max_items, snap["max_items"] or self.s.max_items)
        self.count, self.fresh, self.next_seed = count, snap["fresh"], self.s.seed + next_seq
        if self.counted:
            self.next_seed = max(self.next_seed, self.seed_counter if self.seed_counter is not None else 0)
        if self._tally is None and snap["fresh"] >= self.s.min_fresh and not snap["waiting"]:
            self.beat("running")
            return None
        if self._tally is not None and name is None:  # every class at its share of min_fresh, nobody waiting
            self.beat("running")
            return None
        # room for this batch and the next: consumers release while this one is generated
        wanted = snap["first_seq"] + count + 2 * self.s.batch_size - limit
        if wanted > snap["first_seq"] and wanted > snap["evict_request"] and snap["consumers"]:
            self.cache.request_eviction(min(wanted, next_seq))
        room = limit - count + snap["evictable"]
        if room <= 0:
            self.beat("paused")
            return None
        k = min(self.s.batch_size, room)
        nothing_fresh = not snap["fresh"] if name is None else not self.class_fresh[name]
        if name not in self._planned and nothing_fresh:
            k = min(k, FIRST_BATCH)  # a trainer may be waiting for the first record (of this class): make a few first
        self._planned.add(name)
        return name, next_seq, k, limit


def _run_loop(loop: _WorkerLoop) -> Dict[str, Any]:
    """Run ``loop`` until stopped, holding the cache's writer lock for its seed block; write the
    final state. Re-raises errors after reporting them (a refused lock writes no heartbeat: the
    heartbeat of that seed block belongs to the worker that holds it)."""
    lock = WriterLock(loop.cache.path, loop.s.seed, worker_id=loop.s.worker_id, kind="worker").acquire()
    try:
        try:
            loop.run()
        except StopRequested:
            pass
        except BaseException as exc:
            loop.last_error = _error_text(exc)
            try:
                with loop.stop.final():
                    loop.beat("failed", force=True)
            except Exception:
                pass
            raise
        with loop.stop.final():
            loop.beat("stopped", force=True)
        return loop.info()
    finally:
        loop.stop_pulse()
        lock.release()


def _child_main(cache, spec, settings: WorkerSettings, shared, conn) -> None:
    """Entry point of the worker process."""
    import multiprocessing

    stop = StopSignal()
    stop.install()
    parent = multiprocessing.parent_process()
    loop = _WorkerLoop(cache, spec, settings, stop, shared=shared, parent_alive=parent.is_alive if parent else None)
    try:
        _run_loop(loop)
    except BaseException as exc:
        stop.shield()  # report the error even if a stop signal arrives now
        tb = traceback.format_exc()
        if len(tb) > _MAX_TRACEBACK:
            tb = "...\n" + tb[-_MAX_TRACEBACK:]
        try:
            conn.send({"exc_type": type(exc).__name__, "message": str(exc)[:_MAX_TRACEBACK], "traceback": tb})
        except Exception:
            pass
        sys.exit(1)
    finally:
        conn.close()


def run_worker(
    cache,
    generator,
    *,
    min_fresh: int,
    max_items: int,
    batch_size: Optional[int] = None,
    seed: int = 0,
    device: Optional[str] = None,
    worker_id: Optional[str] = None,
    num_threads: Optional[int] = None,
    poll_interval: float = 0.2,
    gate: Optional[Any] = None,
    demand: Optional[Mapping[str, float]] = None,
    progress: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> Dict[str, Any]:
    """Run the worker loop in this process until SIGTERM or SIGINT (``synthaug worker``).

    Arguments as :class:`GenerationWorker`; ``progress`` is called with the heartbeat dict each
    time one is written. Installs SIGTERM/SIGINT handlers for the duration (main thread only).

    Returns:
        The last heartbeat dict (``state == "stopped"``); ``info["signal"]`` is the signal number
        that stopped it.

    Raises:
        Whatever the generator or the cache raised (after writing ``state="failed"``).
    """
    cache_obj, spec, settings = _prepare(cache, generator, min_fresh, max_items, batch_size, seed, device, worker_id, num_threads, poll_interval, gate,
                                         demand)
    stop = StopSignal()
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    stop.install()
    try:
        info = _run_loop(_WorkerLoop(cache_obj, spec, settings, stop, progress=progress))
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    info["signal"] = stop.signum
    return info


def _one_spec(generator, device) -> Dict[str, Any]:
    """The checked spec of one generator argument (a Generator, a spec dict or a model source)."""
    if isinstance(generator, Generator):
        spec = generator.spec
    elif isinstance(generator, dict):
        spec = dict(generator)
    elif isinstance(generator, (str, os.PathLike)):
        spec = {"source": str(generator), "overrides": {}}
    else:
        raise ValueError(f"generator must be a Generator, a generator spec dict or a model source, got {type(generator).__name__}")
    if not ("source" in spec or "factory" in spec):
        raise ValueError(f"generator spec {spec!r} has no 'source'; use Generator.spec")
    overrides = dict(spec.get("overrides") or {})
    if overrides.get("mode") in ("img2img", "translate") and not overrides.get("source_images"):
        raise ValueError(
            f"this {overrides['mode']} generator holds its source images in memory, which a worker process cannot receive; "
            "create it with source_images=<folder or list of image files>"
        )
    if device is not None:
        overrides["device"] = str(device)
    return {**spec, "overrides": overrides}


def is_class_mapping(generator) -> bool:
    """Whether a worker's ``generator`` argument maps class names to generators (several
    classes, one adapter each) rather than being one generator spec (a dict with ``"source"``
    or ``"factory"``)."""
    return isinstance(generator, Mapping) and not ("source" in generator or "factory" in generator)


def _prepare(cache, generator, min_fresh, max_items, batch_size, seed, device, worker_id, num_threads, poll_interval, gate=None, demand=None):
    """Checked (cache, spec, settings) from the user's arguments."""
    if isinstance(cache, (str, os.PathLike)):
        cache = SyntheticCache(cache)
    if not isinstance(cache, SyntheticCache):
        raise ValueError(f"cache must be a SyntheticCache or a cache folder path, got {type(cache).__name__}")
    if cache.readonly:
        raise ValueError(f"cache {cache.path} was opened read-only; the worker appends to it, so open it writable")
    if is_class_mapping(generator):
        specs = {name: _one_spec(g, device) for name, g in generator.items()}
        check_class_specs(specs)  # one base model, one label per class: refused here, before a process starts
        spec: Dict[str, Any] = {"classes": specs}
        overrides = {}
        sizes = [int((s.get("overrides") or {}).get("batch_size") or 0) for s in specs.values()]
        if batch_size is None and all(sizes):
            batch_size = min(sizes)
        if gate is not None:
            raise ValueError("gate= checks one class; a worker serving several classes takes none: run a gated worker per class")
        if demand is not None:
            demand = _check_demand(demand, list(specs))
    else:
        if demand is not None:
            raise ValueError("demand= weighs the classes of a worker serving several; give the generator as {class name: adapter, ...}")
        spec = _one_spec(generator, device)
        overrides = spec["overrides"]
    for name, value in (("min_fresh", min_fresh), ("max_items", max_items)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if max_items < min_fresh:
        raise ValueError(
            f"max_items ({max_items}) must be >= min_fresh ({min_fresh}): the cache must be able to hold min_fresh unconsumed records"
        )
    if batch_size is None:
        batch_size = int(overrides.get("batch_size") or 8)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (images per append), got {batch_size!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if num_threads is not None and int(num_threads) < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    if poll_interval <= 0:
        raise ValueError(f"poll_interval must be > 0 seconds, got {poll_interval}")
    if isinstance(gate, dict):
        gate = FidelityGate.from_spec(gate)  # checked here, before a process starts
    if gate is not None and not isinstance(gate, FidelityGate):
        raise ValueError(f"gate must be a FidelityGate or its spec dict, got {type(gate).__name__}")
    settings = WorkerSettings(
        min_fresh=min_fresh,
        max_items=max_items,
        batch_size=batch_size,
        seed=seed,
        worker_id=worker_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}",
        poll_interval=float(poll_interval),
        num_threads=int(num_threads) if num_threads else None,
        gate=gate.spec if gate is not None else None,
        demand=demand,
    )
    return cache, spec, settings


def _check_demand(demand, classes) -> Dict[str, float]:
    if not isinstance(demand, Mapping):
        raise ValueError(f"demand must map class names to weights, e.g. {{{classes[0]!r}: 2}}, got {type(demand).__name__}")
    out = {}
    for name, weight in demand.items():
        if name not in classes:
            raise ValueError(f"demand names class {name!r}, which this worker does not serve; its classes are {classes}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"demand[{name!r}] must be a number >= 0, got {weight!r}")
        out[name] = float(weight)
    if not sum(out.values()) > 0:
        raise ValueError(f"demand {dict(demand)!r} weighs no class above 0")
    return out


class GenerationWorker:
    """Keeps ``min_fresh`` unconsumed synthetic records in ``cache`` from a background process.

    Args:
        cache: a :class:`~synthaug.SyntheticCache` (writable) or its folder path.
        generator: a :class:`~synthaug.generation.base.Generator` (its ``spec`` is sent to the
            worker, which loads its own copy of the model), a spec dict, or a model source as for
            ``load_generator``. Passing ``generator.spec`` or the source avoids loading the model
            in this process. Several classes: ``{class name: adapter}`` (each value one of the
            above, every adapter on one base model): the worker loads the base model once and
            swaps the adapters per batch (:mod:`synthaug.generation.multi`), keeping each class's
            fresh records in proportion to demand (module docstring, "Several classes").
            Adapters on different base models are refused here with ``ValueError``.
        min_fresh: keep at least this many records that no consumer has been handed (several
            classes: in all, shared among the classes by demand).
        max_items: the cache never holds more records than this (see the module docstring:
            records are only evicted once every consumer has passed them).
        batch_size: images per ``generate`` call and per append (default: the generator's
            ``batch_size`` override, else 8).
        seed: base seed; without a gate record ``q`` gets per-image seed ``seed + q`` (the seed
            rules: module docstring).
        device: device of the worker's model (e.g. ``"cuda:1"``); default: the generator's.
        worker_id: name in the heartbeat (default: host name + random suffix).
        num_threads: ``torch.set_num_threads`` in the worker (CPU generation beside CPU
            training: give each a share of the cores).
        poll_interval: seconds between checks of the cache while idle or paused.
        gate: a :class:`~synthaug.generation.gate.FidelityGate` (or its spec): only the images it
            accepts are appended (module docstring); the worker process loads its own copy of the
            classifier, on the gate's device. One class only.
        demand: several classes: ``{class name: weight}``, the classes' shares of ``min_fresh``
            while no consumer's cursor states its ratios per class (default: equal shares).

    Use as a context manager (started on entry; stopped on exit, which raises
    :class:`~synthaug.errors.GenerationWorkerError` if the worker failed), or call :meth:`start`
    and :meth:`stop`. The worker process uses the ``spawn`` start method: a script that starts
    one must guard its entry point with ``if __name__ == "__main__":``.
    """

    def __init__(
        self,
        cache,
        generator,
        *,
        min_fresh: int,
        max_items: int,
        batch_size: Optional[int] = None,
        seed: int = 0,
        device: Optional[str] = None,
        worker_id: Optional[str] = None,
        num_threads: Optional[int] = None,
        poll_interval: float = 0.2,
        gate: Optional[Any] = None,
        demand: Optional[Mapping[str, float]] = None,
    ) -> None:
        self._cache, self._spec, self._settings = _prepare(
            cache, generator, min_fresh, max_items, batch_size, seed, device, worker_id, num_threads, poll_interval, gate, demand
        )
        self._process = None
        self._conn = None
        self._shared = None
        self._error: Optional[Dict[str, Any]] = None
        self._stopping = False
        self._watcher: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        # The watcher thread is the only one that reaps the process (two threads waiting on one
        # child race in waitpid, and the loser sees no exit status): it sets these.
        self._exited = threading.Event()
        self._exitcode: Optional[int] = None

    # ------------------------------------------------------------------ properties
    @property
    def spec(self) -> Dict[str, Any]:
        """The generator spec the worker process builds its generator from."""
        return dict(self._spec)

    @property
    def settings(self) -> WorkerSettings:
        return self._settings

    @property
    def worker_id(self) -> str:
        return self._settings.worker_id

    @property
    def pid(self) -> Optional[int]:
        """Process id of the worker (``None`` before :meth:`start`)."""
        return self._process.pid if self._process is not None else None

    def is_alive(self) -> bool:
        """Whether the worker process runs (``False`` before :meth:`start` and once it exited)."""
        return self._process is not None and not self._exited.is_set()

    # ------------------------------------------------------------------ lifecycle
    def start(self, *, wait: bool = False, timeout: Optional[float] = None) -> "GenerationWorker":
        """Start the worker process (again, after :meth:`stop`).

        Args:
            wait: block until the worker has loaded its model and runs (state leaves
                ``"starting"``), raising :class:`GenerationWorkerError` if it fails first.
            timeout: with ``wait``, give up after this many seconds (``TimeoutError``).

        Raises:
            RuntimeError: the worker is already running.
        """
        import multiprocessing

        if self.is_alive():
            raise RuntimeError(f"generation worker {self.worker_id} is already running (pid {self.pid})")
        # refuse here, before a process starts, when another writer holds this seed block (the
        # worker process takes the lock itself and holds it for its life)
        WriterLock(self._cache.path, self._settings.seed).acquire().release()
        ctx = multiprocessing.get_context("spawn")
        ints = ctx.RawArray("q", [_STATE_CODE["starting"], 0, -1, 0, 0, 0])
        floats = ctx.RawArray("d", [0.0])
        recv, send = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=_child_main,
            args=(self._cache, self._spec, self._settings, (ints, floats), send),
            name=f"synthaug-worker-{self.worker_id}",
            daemon=True,  # ended (SIGTERM) if this process exits without stopping it
        )
        self._error = None
        self._stopping = False
        self._exited = threading.Event()
        self._exitcode = None
        self._shared = (ints, floats)
        self._conn = recv
        self._process = process
        process.start()
        send.close()  # the child holds the only write end: EOF here once it exits
        self._watcher = threading.Thread(target=self._watch, args=(process,), name="synthaug-worker-watch", daemon=True)
        self._watcher.start()
        if wait:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._state_code() == _STATE_CODE["starting"] and not self._exited.is_set():
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"generation worker {self.worker_id} did not start within {timeout} s")
                time.sleep(0.05)
            if self._state_code() == _STATE_CODE["failed"] or self._exited.is_set():
                self._exited.wait(10.0)  # its error report is sent just before it exits
            self.raise_if_failed()
        return self

    def stop(self, timeout: float = 30.0) -> Dict[str, Any]:
        """Stop the worker: SIGTERM, wait up to ``timeout`` s, then SIGKILL. Does not raise the
        worker's error (see :meth:`raise_if_failed`); returns the final :meth:`status`."""
        process = self._process
        if process is None:
            return self.status()
        self._stopping = True
        if not self._exited.is_set():
            try:
                os.kill(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if not self._exited.wait(timeout):
                process.kill()
        if self._watcher is not None:
            self._watcher.join()
        self._drain()
        return self.status()

    def __enter__(self) -> "GenerationWorker":
        if not self.is_alive():
            self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()
        if exc_type is None or isinstance(exc, GenerationWorkerError):
            self.raise_if_failed()
        elif isinstance(exc, SyntheticExhaustedError):
            # A sampler ran out of synthetic records while this worker had failed: the worker's
            # error is the cause, so raise it, chained to the sampler's. Other exceptions of the
            # body (the training loop's own) propagate unchanged.
            try:
                self.raise_if_failed()
            except GenerationWorkerError as worker_error:
                raise worker_error from exc

    def __del__(self) -> None:
        try:
            if self.is_alive():
                self.stop(timeout=5.0)
        except Exception:
            pass

    # ------------------------------------------------------------------ state
    def _state_code(self) -> int:
        return int(self._shared[0][0]) if self._shared is not None else -1

    def _drain(self) -> None:
        """Read the error report, if the worker sent one."""
        with self._lock:
            conn = self._conn
            if conn is None:
                return
            try:
                while conn.poll():
                    self._error = conn.recv()
            except (EOFError, OSError):
                pass
            except Exception as exc:  # a truncated message from a killed worker
                self._error = self._error or {"exc_type": None, "message": f"unreadable error report ({exc})", "traceback": ""}
            if self._exited.is_set():
                conn.close()
                self._conn = None

    def _watch(self, process) -> None:
        """Reap the worker when it exits; write its final state if it could not (killed)."""
        from multiprocessing.connection import wait

        wait([process.sentinel])
        process.join()
        code = process.exitcode
        deadline = time.monotonic() + 5.0
        while code is None and time.monotonic() < deadline:  # reaped elsewhere (active_children)
            time.sleep(0.01)
            code = process.exitcode
        self._exitcode = code
        self._exited.set()
        self._drain()
        if self._shared is None or self._state_code() in (_STATE_CODE["stopped"], _STATE_CODE["failed"]):
            return
        state = "stopped" if self._stopping else "failed"
        try:
            hb = self._cache.heartbeats().get(seed_block(self._settings.seed)) or {}
            if hb.get("worker_id") not in (None, self.worker_id):
                return  # another worker has taken over this seed block of the cache
            self._cache.write_heartbeat(
                {
                    "pid_start": None,
                    "seed": self._settings.seed,
                    **hb,
                    "worker_id": self.worker_id,
                    "pid": process.pid,
                    "state": state,
                    "last_error": None if state == "stopped" else f"worker process exited with status {code} without reporting an error",
                }
            )  # stamped with the time of this write: when the death was noticed
        except Exception:
            pass

    def status(self) -> Dict[str, Any]:
        """The worker's live state.

        Returns:
            ``{"worker_id", "state", "alive", "pid", "exitcode", "generated", "accepted",
            "rejected", "acceptance_rate", "images_per_s", "next_seed", "fresh", "last_error"}``;
            ``state`` is one of :data:`STATES` or ``"not started"``.
        """
        self._drain()
        process = self._process
        if process is None or self._shared is None:
            return {"worker_id": self.worker_id, "state": "not started", "alive": False, "pid": None, "exitcode": None,
                    "generated": 0, "accepted": 0, "rejected": 0, "acceptance_rate": None, "images_per_s": 0.0, "next_seed": None,
                    "fresh": None, "last_error": None}
        ints, floats = self._shared
        alive = self.is_alive()
        exitcode = self._exitcode
        state = STATES[int(ints[0])]
        last_error = None
        if self._error is not None:
            state = "failed"
            last_error = f"{self._error['exc_type']}: {self._error['message']}" if self._error.get("exc_type") else self._error["message"]
        elif not alive and state not in ("stopped", "failed"):
            state = "stopped" if self._stopping or exitcode == 0 else "failed"
            if state == "failed":
                last_error = f"worker process exited with status {exitcode} without reporting an error"
        return {
            "worker_id": self.worker_id,
            "state": state,
            "alive": alive,
            "pid": process.pid,
            "exitcode": exitcode,
            "generated": int(ints[1]),
            "accepted": int(ints[4]),
            "rejected": int(ints[5]),
            "acceptance_rate": int(ints[4]) / (int(ints[4]) + int(ints[5])) if int(ints[4]) + int(ints[5]) else None,
            "images_per_s": float(floats[0]),
            "next_seed": None if ints[2] < 0 else int(ints[2]),
            "fresh": int(ints[3]),
            "last_error": last_error,
        }

    def raise_if_failed(self) -> None:
        """Raise :class:`GenerationWorkerError` if the worker failed: it raised (the error carries
        the exception type, message and traceback text from the worker), or it died without being
        asked to stop (e.g. killed by the OS)."""
        self._drain()
        process = self._process
        if self._error is not None:
            raise GenerationWorkerError(
                self._error["message"],
                exc_type=self._error.get("exc_type"),
                worker_traceback=self._error.get("traceback", ""),
                pid=process.pid if process else None,
                exitcode=self._exitcode,
            )
        if process is not None and self._exited.is_set() and self._exitcode not in (0, None) and not self._stopping:
            code = self._exitcode
            how = f"killed by signal {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else f"exit status {code}"
            raise GenerationWorkerError(f"the worker process died ({how}) without reporting an error", pid=process.pid, exitcode=code)

    def __repr__(self) -> str:
        st = self.status()
        return f"GenerationWorker({str(self._cache.path)!r}, state={st['state']!r}, pid={st['pid']}, generated={st['generated']})"
