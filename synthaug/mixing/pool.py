"""Which synthetic records one sampler hands out (docs/DESIGN.md, mixing rules 3 and 4).

A :class:`SyntheticPool` belongs to one consumer (one sampler on one rank). It reads record
labels from the cache in windows, keeps only records of its shard (``seq % world == rank``) and
of an allowed class, and serves them:

1. **fresh first, oldest first**: records with ``seq >= cursor`` that this consumer has never
   been handed; each class group has its own queue of scanned, not yet served records.
2. when a group has nothing fresh, ``on_exhausted`` decides: ``"reuse"`` takes a record this
   consumer has already served, from those served the fewest times, choosing among equals with
   the batch's seeded RNG; with ``max_serves`` a record leaves the pool once served that many
   times; ``"wait"`` polls the cache for a new record (the sampler first undoes the batch's
   draws, :class:`NeedRecords`, so they do not pin a full cache while it waits, then draws the
   batch again); ``"error"`` raises
   :class:`~synthaug.errors.SyntheticExhaustedError`. Under ``"reuse"``, an empty pool (an empty
   cache, or every record at its cap) waits like ``"wait"``. A wait ends at once with
   :class:`~synthaug.errors.GenerationWorkerError` when the cache's worker heartbeat says
   ``"failed"``, or says it runs although its process is gone (:func:`~synthaug.cache.liveness.dead_writer`),
   and that heartbeat is no older than ``wait_timeout`` (an older one belongs to a past run and is
   ignored, so a trainer may be started before a replacement worker).

The cursor (every record below it handed out or skipped by this consumer) is
``min(scan position, oldest unserved scanned record)``.

**Holds.** Beside the cursor the sampler publishes a *hold*: the oldest record this consumer may
still read. Writers never evict at or above the smallest hold (:meth:`SyntheticCache.set_cursor`),
and the pool never draws a record below the hold it has published (:attr:`SyntheticPool.hold`):
so a record is never evicted between its draw and the DataLoader's read of it. The sampler
raises the hold (never lowers it) as far as its batches in flight allow, when a writer asks for
room (``evict_request``) or, when this consumer never reuses, as soon as it can.

Every change is written to an undo journal (one list of operations per batch), so the sampler can
produce the state as it was some batches ago (``state_dict(consumed=...)``).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional

from synthaug.cache.codec import Label
from synthaug.cache.liveness import dead_writer
from synthaug.cache.store import SyntheticCache
from synthaug.errors import GenerationWorkerError, SyntheticExhaustedError

__all__ = ["SyntheticPool", "NeedRecords", "ON_EXHAUSTED"]

ON_EXHAUSTED = ("reuse", "wait", "error")
_WAIT_MIN_S = 0.02
_WAIT_MAX_S = 0.5
_HEARTBEAT_EVERY_S = 1.0


class NeedRecords(Exception):
    """Raised by :meth:`SyntheticPool.draw` when group ``group`` has nothing to serve and the
    policy is to wait (``capped``: every retained record reached ``max_reuse``); ``demand`` is
    what the batch asks of the group."""

    def __init__(self, group: int, capped: bool, demand: int) -> None:
        super().__init__(group, capped, demand)
        self.group, self.capped, self.demand = group, capped, demand


class SyntheticPool:
    """Fresh-first, least-reused-next selection of synthetic records for one consumer.

    Args:
        cache: the cache to read.
        rank, world: this consumer takes only records with ``seq % world == rank``.
        n_groups: class groups (1 when every allowed class shares one pool).
        group_of: maps ``(label, seq)`` to a group index, or ``None`` to skip the record; may
            raise ``ValueError`` for a label outside the real label space.
        max_serves: the most times one record is served (``None``: unbounded).
        on_exhausted, wait_timeout: see the module docstring.
        counters: the sampler's counter dict, updated in place (``fresh``, ``reused``,
            ``served``, ``waited_s``, ``evicted_unseen``, ``corrupt_skipped`` and their
            ``epoch_`` twins).
        describe: ``describe(group)`` names the consumer and classes in error messages.
        publish: ``publish(force)`` records the cursor and hold in the cache (forced before
            waiting; unforced while waiting, so a writer's eviction request is answered).
        before_map: called after each label scan, before ``group_of`` maps the labels read
            (the dataset re-reads label names that may have been stored meanwhile).
    """

    def __init__(
        self,
        cache: SyntheticCache,
        *,
        rank: int,
        world: int,
        n_groups: int,
        group_of: Callable[[Label, int], Optional[int]],
        max_serves: Optional[int],
        on_exhausted: str,
        wait_timeout: float,
        counters: Dict[str, float],
        describe: Callable[[int], str],
        publish: Callable[..., None],
        before_map: Optional[Callable[[], None]] = None,
        scan_window: int = 256,
    ) -> None:
        self.cache = cache
        self.rank, self.world = rank, world
        self.group_of = group_of
        self.max_serves = max_serves
        self.on_exhausted = on_exhausted
        self.wait_timeout = wait_timeout
        self.counters = counters
        self.describe = describe
        self.publish = publish
        self.before_map = before_map
        self.scan_window = scan_window
        self.scan_pos = 0
        self.pending: List[Deque[int]] = [deque() for _ in range(n_groups)]
        self.buckets: List[Dict[int, List[int]]] = [{} for _ in range(n_groups)]
        self.ops: Optional[List[tuple]] = None  # undo journal of the current batch
        self.hold = 0  # the hold last published: no record below it is drawn
        self.request = 0  # the latest eviction request a writer left in the cache
        self.drawn: List[int] = []  # records drawn for the batch being built (the sampler resets it)
        self.waiting = False  # blocked in a wait: published with the cursor, so writers generate
        self.labels: Dict[int, Label] = {}  # stored label of each record in the pool
        self._first = 0
        self._pruned_at = 0

    # ------------------------------------------------------------------ state
    def cursor(self) -> int:
        heads = [p[0] for p in self.pending if p]
        return min([self.scan_pos, *heads])

    def state(self) -> Dict[str, Any]:
        """A copy of the pool's state (plain lists and dicts)."""
        return {
            "scan_pos": self.scan_pos,
            "pending": [list(p) for p in self.pending],
            "buckets": [{c: list(v) for c, v in b.items() if v} for b in self.buckets],
        }

    def load(self, state: Dict[str, Any]) -> None:
        if len(state["pending"]) != len(self.pending):
            raise ValueError(
                f"state holds {len(state['pending'])} class groups but this sampler has {len(self.pending)}; "
                "load a state saved with the same classes / per-class ratios"
            )
        self.scan_pos = int(state["scan_pos"])
        self.pending = [deque(int(s) for s in p) for p in state["pending"]]
        self.buckets = [{int(c): [int(s) for s in v] for c, v in b.items()} for b in state["buckets"]]

    @staticmethod
    def undo(state: Dict[str, Any], ops: List[tuple]) -> None:
        """Revert one batch's operations on a :meth:`state` copy (``pending`` as deques)."""
        pending, buckets = state["pending"], state["buckets"]
        for op in reversed(ops):
            kind = op[0]
            if kind == "pos":
                state["scan_pos"] = op[1]
            elif kind == "app":
                pending[op[1]].pop()
            elif kind == "pl":
                pending[op[1]].appendleft(op[2])
            elif kind == "ps":
                lst = buckets[op[1]][op[2]]
                lst.pop()
                if not lst:
                    del buckets[op[1]][op[2]]
            elif kind == "tk":
                _, g, c, j, seq = op
                lst = buckets[g].setdefault(c, [])
                if j == len(lst):
                    lst.append(seq)
                else:
                    lst.append(lst[j])
                    lst[j] = seq

    def _log(self, op: tuple) -> None:
        if self.ops is not None:
            self.ops.append(op)

    # ------------------------------------------------------------------ drawing
    def label_of(self, seq: int) -> Optional[Label]:
        """The stored label of a record of the pool (read again from the cache for records that
        came in through a loaded state; ``None`` when it is gone or unreadable)."""
        label = self.labels.get(seq)
        if label is None:
            found, _ = self.cache.scan_labels(seq, seq + 1)
            label = found.get(seq)
        return label

    def refresh(self) -> None:
        """Read the oldest stored seq and a writer's eviction request (one short read)."""
        self._first, _next, self.request = self.cache.bounds()
        floor = max(self._first, self.hold)
        if floor - self._pruned_at >= 1024:  # forget labels of records that can no longer be drawn
            self.labels = {k: v for k, v in self.labels.items() if k >= floor}
            self._pruned_at = floor

    def draw(self, group: int, n: int, rng) -> List[int]:
        """``n`` sequence numbers for ``group``, by the rules of the module docstring."""
        out: List[int] = []
        self.refresh()
        fresh_left = True  # once a scan finds nothing, the rest of this draw does not read the cache again
        while len(out) < n:
            seq = self._take_fresh(group) if fresh_left else None
            fresh_left = seq is not None
            if seq is None and self.on_exhausted == "error":
                raise SyntheticExhaustedError(
                    f"no fresh synthetic record for {self.describe(group)}: {self._where()}; on_exhausted='error' "
                    "forbids reusing and waiting. Fill the cache with `synthaug generate`, run a generation "
                    "worker, or use on_exhausted='reuse' or 'wait'."
                )
            if seq is None and self.on_exhausted == "reuse":
                seq = self._take_reuse(group, rng)
            if seq is None:
                # the caller undoes this batch's draws, then waits (wait_for): records drawn for a
                # batch are held, and holding them while waiting could keep a full cache full
                raise NeedRecords(group, self.on_exhausted == "reuse" and self.max_serves is not None, n)
            out.append(seq)
            self.drawn.append(seq)
        return out

    def _take_fresh(self, g: int) -> Optional[int]:
        queue = self.pending[g]
        while True:
            while queue:
                seq = queue.popleft()
                self._log(("pl", g, seq))
                if seq < self._first:
                    self._bump("evicted_unseen")
                    continue
                self._push(g, seq, 1)
                self._bump("fresh")
                self._bump("served")
                return seq
            if not self._scan():
                return None

    def _take_reuse(self, g: int, rng) -> Optional[int]:
        buckets = self.buckets[g]  # count -> records served that often; empty lists are removed
        while True:
            if not buckets:
                return None
            c = min(buckets)
            lst = buckets[c]
            j = rng.randrange(len(lst))
            seq = lst[j]
            lst[j] = lst[-1]
            lst.pop()
            if not lst:
                del buckets[c]
            self._log(("tk", g, c, j, seq))
            if seq < self._first or seq < self.hold:  # evicted, or released for eviction: it leaves the pool
                continue
            self._push(g, seq, c + 1)
            self._bump("reused")
            self._bump("served")
            return seq

    def _push(self, g: int, seq: int, count: int) -> None:
        if self.max_serves is not None and count >= self.max_serves:
            return
        self.buckets[g].setdefault(count, []).append(seq)
        self._log(("ps", g, count))

    def _scan(self) -> int:
        """Read the labels of one window of records past the scan position into the groups'
        queues; returns how many records it looked at (0: none past the scan position)."""
        if self.scan_pos < self._first:
            self._log(("pos", self.scan_pos))
            self.scan_pos = self._first
        start = self.scan_pos
        labels, corrupt = self.cache.scan_labels(start, start + self.scan_window)
        if not labels and not corrupt:
            return 0
        if self.before_map is not None:
            self.before_map()
        for seq, label in labels.items():
            if seq % self.world != self.rank:
                continue
            g = self.group_of(label, seq)
            if g is None:
                continue
            self.pending[g].append(seq)
            self.labels[seq] = label
            self._log(("app", g))
        mine_corrupt = sum(1 for s in corrupt if s % self.world == self.rank)
        if mine_corrupt:
            self._bump("corrupt_skipped", mine_corrupt)
        self._log(("pos", start))
        self.scan_pos = max(max(labels, default=-1), max(corrupt, default=-1)) + 1
        return len(labels) + len(corrupt)

    def _enough(self, g: int, need: int) -> bool:
        """Whether group ``g`` can serve ``need`` items now (scanning new records as needed):
        each fresh record serves once (``max_serves`` times under ``"reuse"``), a retained one
        up to its cap; under uncapped ``"reuse"`` any record serves without end."""
        queue = self.pending[g]
        reuse = self.on_exhausted == "reuse"
        while True:
            while queue and queue[0] < self._first:
                self._log(("pl", g, queue[0]))
                queue.popleft()
                self._bump("evicted_unseen")
            floor = max(self._first, self.hold)
            if reuse and self.max_serves is None:
                if queue or any(q >= floor for seqs in self.buckets[g].values() for q in seqs):
                    return True
            else:
                serves = len(queue) * (self.max_serves if reuse else 1)
                if reuse:
                    for count, seqs in self.buckets[g].items():
                        serves += (self.max_serves - count) * sum(1 for q in seqs if q >= floor)
                if serves >= need:
                    return True
            if not self._scan():
                return False

    def wait_for(self, need: "NeedRecords") -> None:
        """Block until the group of ``need`` can serve its whole demand (after the batch's draws
        were undone); raise after ``wait_timeout`` s."""
        self._wait(need.group, need.capped, need.demand)

    def _wait(self, g: int, capped: bool, need: int = 1) -> None:
        """Block until ``g`` can serve ``need`` items, polling the cache; raise after ``wait_timeout`` s.
        Meanwhile the DataLoader reads the batches in flight, so the hold is republished as it
        can rise: a writer waiting for room gets it."""
        self.waiting = True
        self.publish(True)
        t0 = time.monotonic()
        failed_after = time.time() - self.wait_timeout  # a worker failure since then ends the wait
        next_beat = t0
        delay = _WAIT_MIN_S
        try:
            while True:
                elapsed = time.monotonic() - t0
                if time.monotonic() >= next_beat:
                    self.cache.check_present()
                    self._raise_if_worker_failed(g, failed_after)
                    next_beat = time.monotonic() + _HEARTBEAT_EVERY_S
                if elapsed >= self.wait_timeout:
                    why = (
                        f"every retained record of it has been served max_reuse+1 = {self.max_serves} times"
                        if capped
                        else "nothing fresh is left"
                    )
                    raise SyntheticExhaustedError(
                        f"waited {elapsed:.1f} s (wait_timeout={self.wait_timeout:g} s) for "
                        + ("a new synthetic record" if need == 1 else f"the {need} synthetic records one batch takes")
                        + f" for {self.describe(g)}, and none came: {why}; {self._where()}. Start a generation worker on "
                        "this cache (`synthaug worker`), pre-fill it with `synthaug generate`, raise wait_timeout"
                        + (", raise max_reuse" if capped else "")
                        + (", or use on_exhausted='reuse'." if self.on_exhausted == "wait" else ".")
                    )
                time.sleep(min(delay, max(0.0, self.wait_timeout - elapsed)))
                delay = min(delay * 1.5, _WAIT_MAX_S)
                self.refresh()
                self.publish(False)
                if self._enough(g, need):
                    return
        finally:
            self.waiting = False
            waited = time.monotonic() - t0
            self._bump("waited_s", waited)

    def _raise_if_worker_failed(self, g: int, since: float) -> None:
        """Raise :class:`GenerationWorkerError` if the cache's workers have failed or died, as a
        heartbeat written after ``since`` (wall time) tells: waiting would only run into the
        timeout. While any worker runs (or might: another host's, recently heard of), wait on."""
        try:
            beats = list(self.cache.heartbeats().values())
        except Exception:  # the heartbeat is advisory; the wait itself still times out
            return
        failure = None
        for hb in sorted(beats, key=lambda b: -float(b.get("time") or 0.0)):
            if float(hb.get("time") or 0.0) < since:
                continue
            dead = dead_writer(hb)
            if hb.get("state") == "failed" or dead:
                failure = failure or (hb, dead)
            elif hb.get("state") in ("starting", "running", "paused"):
                return  # a live worker can still deliver
        if failure is None:
            return
        hb, dead = failure
        when = time.strftime("%H:%M:%S", time.localtime(float(hb["time"])))
        what = dead or (hb.get("last_error") or "no error was reported")
        raise GenerationWorkerError(
            f"{what} (heartbeat of {when} in cache {self.cache.path}, while {self.describe(g)} waited for a new "
            "synthetic record; restart the worker, or pre-fill the cache with `synthaug generate`)",
            pid=hb.get("pid"),
        )

    def _bump(self, name: str, by: float = 1) -> None:
        self.counters[name] += by
        self.counters["epoch_" + name] += by

    def _where(self) -> str:
        stats = self.cache.stats()
        held = f"{stats['count']} records" + (f" (seqs {stats['first_seq']}..{stats['last_seq']})" if stats["count"] else "")
        return f"cache {self.cache.path} holds {held}, this consumer's cursor is at {self.cursor()}"
