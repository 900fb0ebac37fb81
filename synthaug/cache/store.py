"""``SyntheticCache``: an LMDB store of synthetic images with provenance.

One writer and many readers (DataLoader workers, DDP ranks, other processes) share one cache
directory. Each ``append`` is one write transaction: a killed writer leaves every committed record
intact and no partial one. Reads use short transactions, and the environment is opened lazily in
each process that uses it (see :mod:`synthaug.cache.lmdb_env`), so a cache object may be handed to
forked or spawned workers.

Layout (named databases of one LMDB environment):

* ``records``: key = 8-byte big-endian sequence number, value = one record (:mod:`.codec`).
* ``meta``: format version, image spec, label names, next seq, byte and eviction counters,
  ``max_items``, ``evict_request``, ``heartbeat/<seed block>``: each generation worker's
  heartbeat, and ``seeds/<seed block>``: the block's seed counter once a writer reserves seeds
  (:meth:`SyntheticCache.reserve_seeds`).
* ``cursors``: one entry per consumer (a ``RatioBatchSampler``): ``next_seq``, the next sequence
  number it has not been handed yet (records at or after the smallest are *fresh*), and ``hold``,
  the oldest record it may still read (it has handed records out that a DataLoader has not read
  yet, or keeps served ones to reuse). Writers evict only records below every live consumer's
  ``hold``; ``meta["evict_request"]`` is how a writer that needs room asks consumers to raise it.
  See docs of :meth:`SyntheticCache.set_cursor` and :meth:`SyntheticCache.supply`.

One concept in one module (longer than the ~600 lines the project aims at, on purpose): the
``SyntheticCache`` class, whose methods share its environment handle and its transaction rules.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from synthaug.cache import codec, liveness
from synthaug.cache.codec import Encoding, Label, Record, RecordBatch, SoftLabel
from synthaug.cache.lmdb_env import EnvHandle, NotCreatedYetError, acquire_env, release_env
from synthaug.cache.writers import seed_block
from synthaug.errors import CacheFormatError, CorruptRecordError
from synthaug.version import __version__

__all__ = ["SyntheticCache", "DEFAULT_ENCODING", "merge_label_names"]

DEFAULT_ENCODING = "raw"  # chosen from benchmarks/cache.py: see README "Choosing the encoding"
_KEY = struct.Struct(">Q")
_SCAN_CHUNK = 4096
_CREATION_WAIT_S = 3.0
_HEARTBEAT_PREFIX = b"heartbeat/"
_SEEDS_PREFIX = b"seeds/"


class _NotCreatedYet(Exception):
    """The cache's file exists but its creator has not written its meta yet."""


def _key(seq: int) -> bytes:
    return _KEY.pack(seq)


def _seq(key) -> int:
    return _KEY.unpack(key)[0]


def _jload(value, default=None):
    return default if value is None else json.loads(bytes(value))


def _jdump(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class SyntheticCache:
    """A directory holding an LMDB cache of synthetic images.

    Args:
        path: the cache directory (created with its parents when missing, unless ``readonly``).
        readonly: open an existing cache for reading only; a missing one raises
            ``FileNotFoundError``.
        encoding: image encoding of new records, ``"raw"``, ``"png"``, ``"jpeg"`` or ``"webp"``;
            ``None`` keeps the cache's own (``"raw"`` for a new cache).
        quality: JPEG/WebP quality of new records (1..100).
        max_items: keep at most this many records: an append that overflows evicts the oldest
            records in its own transaction, but never one a live consumer still holds (see
            :meth:`set_cursor`); while consumers hold them the cache holds more, and the excess
            goes at a later append. Stored in the cache, so every writer obeys it; ``None`` keeps
            the stored value (unbounded for a new cache), ``0`` removes it.
        label_names: class names of the label indices (stored once; used to map labels by name).
        map_size: initial LMDB map size in bytes; it doubles whenever it fills.
        max_readers: reader slots in the lock table; at least ranks × (workers + 2) per node.
        sync: fsync each commit (durable against power loss). A killed *process* never loses a
            committed record either way.
        verify: when the batch read path (:meth:`read_batch`, :meth:`get_many`, ``MixedDataset``)
            checks a record's CRC-32C: ``"always"`` (default: on every read), or ``"once"``: on its
            first read in each process, then not again while its stored CRC is the same (a
            relabelled record is checked anew). Records never change in place, so what ``"once"``
            gives up is catching damage to the file *after* a record was checked (a failing disk
            during the run; ``synthaug cache verify`` still finds it). On large raw images the CRC
            costs more than the copy out of the map (benchmarks/README.md, cache.py).

    Records: ``append(images, labels, meta)`` returns the sequence numbers given, ``get(seq)``
    a :class:`Record`. The object is picklable: a copy opens its own environment in the process
    that uses it.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        *,
        readonly: bool = False,
        encoding: Optional[str] = None,
        quality: int = 95,
        max_items: Optional[int] = None,
        label_names: Optional[Sequence[str]] = None,
        map_size: int = 1 << 30,
        max_readers: int = 1024,
        sync: bool = True,
        verify: str = "always",
    ) -> None:
        self._path = Path(path)
        if verify not in ("always", "once"):
            raise ValueError(f"verify must be 'always' or 'once', got {verify!r}")
        self._verified: Optional[Dict[int, int]] = {} if verify == "once" else None
        if self._path.exists() and not self._path.is_dir():
            raise ValueError(f"cache path {self._path} is a file; a cache is a directory (give a new or existing folder)")
        if readonly and not (self._path / "data.mdb").exists():
            raise FileNotFoundError(
                f"no synthetic cache at {self._path} (no data.mdb); check the path, or fill one with "
                "`synthaug generate` (or SyntheticCache(path) without readonly=True)"
            )
        if not readonly and self._path.is_dir() and not (self._path / "data.mdb").exists() and any(self._path.iterdir()):
            raise CacheFormatError(
                f"{self._path} exists, is not empty and holds no cache (no data.mdb); choose a new or empty folder"
            )
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"quality must be in 1..100, got {quality}")
        if max_items is not None and int(max_items) < 0:
            raise ValueError(f"max_items must be >= 1 (or 0 to remove the limit), got {max_items}")
        if map_size < 4096:
            raise ValueError(f"map_size must be at least 4096 bytes, got {map_size}")
        self._readonly = bool(readonly)
        self._encoding_arg = Encoding.parse(encoding) if encoding is not None else None
        self._quality = int(quality)
        self._max_items_arg = max_items
        self._label_names_arg = list(label_names) if label_names is not None else None
        self._map_size = int(map_size)
        self._max_readers = int(max_readers)
        self._sync = bool(sync)
        self._handle: Optional[EnvHandle] = None
        self._pid: Optional[int] = None
        if not readonly:
            try:
                self._path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise PermissionError(exc.errno, f"cannot create the cache folder {self._path}: {exc.strerror}") from None
        self._open(apply_settings=True)
        self._identity = _file_identity(self._path)

    # ------------------------------------------------------------------ environment
    def _open(self, *, apply_settings: bool = False) -> EnvHandle:
        """Open this process's handle and read the stored settings.

        ``apply_settings`` (only in ``__init__``): store the constructor's ``max_items`` and
        ``label_names``. A copy reopened in another process (unpickled, forked) never writes them
        again, so it cannot undo a change made meanwhile. A cache still being created by another
        process (its file exists, its databases or meta not yet) is waited for, briefly.
        """
        deadline = time.monotonic() + _CREATION_WAIT_S
        while True:
            try:
                handle = acquire_env(
                    str(self._path),
                    readonly=self._readonly,
                    map_size=self._map_size,
                    max_readers=self._max_readers,
                    sync=self._sync,
                )
            except NotCreatedYetError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise
            try:
                self._load_meta(handle, apply_settings)
            except _NotCreatedYet:
                release_env(handle)
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise CacheFormatError(f"{self._path} is not a synthaug cache (no format version in its meta)") from None
            except BaseException:
                release_env(handle)
                raise
            self._handle = handle
            self._pid = os.getpid()
            return handle

    def check_present(self) -> None:
        """Raise ``FileNotFoundError`` if the cache's data file is gone or was replaced since this
        object first opened it (the folder deleted, or made anew, while this process used it).

        A process that has the cache open goes on reading what it had: LMDB's map keeps the
        deleted file alive. But nothing written to it reaches anyone else any more, so writers and
        waiting readers check this (the worker at every poll, a waiting sampler once a second).
        """
        if _file_identity(self._path) != self._identity:
            raise FileNotFoundError(
                f"cache {self._path} was deleted or replaced while this process used it (its data.mdb is "
                f"{'gone' if not (self._path / 'data.mdb').exists() else 'another file now'}); records written now would "
                "reach no one. Recreate the cache and restart the writer and the training"
            )

    def _env(self) -> EnvHandle:
        """This process's handle, opened here on first use (after fork or unpickling)."""
        handle = self._handle
        if handle is None or self._pid != os.getpid() or handle._stale:
            handle = self._open()
        return handle

    def _load_meta(self, handle: EnvHandle, apply_settings: bool) -> None:
        meta_db = handle.dbs["meta"]
        keys = ("format_version", "encoding", "max_items", "label_names")

        def read(txn) -> Dict[str, Any]:
            return {k: _jload(txn.get(k.encode(), db=meta_db)) for k in keys}

        with handle.read() as txn:
            stored = read(txn)
        if stored["format_version"] is not None and stored["format_version"] > codec.FORMAT_VERSION:
            raise CacheFormatError(
                f"cache {self._path} has format version {stored['format_version']}, newer than this synthaug "
                f"({codec.FORMAT_VERSION}); upgrade synthaug to read it"
            )
        wants_max = apply_settings and self._max_items_arg is not None and stored["max_items"] != (self._max_items_arg or None)
        wants_names = apply_settings and self._label_names_arg is not None and stored["label_names"] != self._label_names_arg
        if stored["format_version"] is None or wants_max or wants_names:
            if self._readonly:
                if stored["format_version"] is None:
                    raise _NotCreatedYet()
            else:
                stored = handle.write(lambda txn: self._write_meta(txn, meta_db, apply_settings, read))
        if stored["label_names"] is not None and self._label_names_arg is not None and apply_settings:
            if stored["label_names"] != self._label_names_arg:
                raise ValueError(f"cache {self._path} already has label names {stored['label_names']}, not {self._label_names_arg}")
        self._stored_encoding = Encoding.parse(stored["encoding"])
        self._max_items = stored["max_items"]
        self._label_names = stored["label_names"]

    def _write_meta(self, txn, meta_db, apply_settings: bool, read) -> Dict[str, Any]:
        """Initialize a new cache and/or store the constructor's settings, deciding inside the
        write transaction (writers are serialized), so two processes creating one cache at once
        cannot reset each other's counters."""
        stored = read(txn)
        updates: Dict[bytes, Any] = {}
        if stored["format_version"] is None:
            updates.update(
                {
                    b"format_version": codec.FORMAT_VERSION,
                    b"created_at": _now(),
                    b"synthaug_version": __version__,
                    b"next_seq": 0,
                    b"value_bytes": 0,
                    b"appended": 0,
                    b"evicted": 0,
                    b"encoding": (self._encoding_arg or Encoding.parse(DEFAULT_ENCODING)).name,
                }
            )
        if apply_settings and self._max_items_arg is not None:
            updates[b"max_items"] = int(self._max_items_arg) or None
        if apply_settings and self._label_names_arg is not None and stored["label_names"] is None:
            updates[b"label_names"] = self._label_names_arg
        for k, v in updates.items():
            txn.put(k, _jdump(v), db=meta_db)
        return read(txn)

    def close(self) -> None:
        """Release this object's hold on the environment (closed when no object of this process uses it)."""
        self._release(blocking=True)

    def _release(self, *, blocking: bool) -> None:
        handle, self._handle = self._handle, None
        if handle is not None and self._pid == os.getpid():
            release_env(handle, blocking=blocking)

    def __enter__(self) -> "SyntheticCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # never wait for a lock here: the garbage collector may run this in a thread that holds it
        try:
            self._release(blocking=False)
        except Exception:
            pass

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_pid"] = None
        if state.get("_verified") is not None:
            state["_verified"] = {}  # a copy checks for itself (and the table can be large)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------------------ properties
    @property
    def path(self) -> Path:
        return self._path

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def encoding(self) -> str:
        """Encoding of new records."""
        return (self._encoding_arg or self._stored_encoding).name

    @property
    def max_items(self) -> Optional[int]:
        return self._max_items

    @property
    def label_names(self) -> Optional[List[str]]:
        """Class names of the label indices, read from the cache (so names another process set
        after this object opened are seen)."""
        handle = self._env()
        with handle.read() as txn:
            names = _jload(txn.get(b"label_names", db=handle.dbs["meta"]))
        self._label_names = names
        return names

    # ------------------------------------------------------------------ writing
    def append(self, images, labels, meta=None, *, fit_within: Optional[int] = None) -> List[int]:
        """Store images with their labels and provenance in one write transaction.

        Args:
            images: a batch, always with its batch axis: uint8 numpy N×H×W×C (C = 1 or 3) or
                N×H×W (gray, W not 1 or 3); a uint8 torch tensor N×C×H×W (torchvision layout)
                or N×H×W (gray, N not 3, W not 1 or 3); or a list of PIL images / H×W×C arrays /
                C×H×W tensors. Pass one image as ``image[None]`` or ``[image]``: a 3-D array that
                looks like one H×W×C image, or a 3×H×W tensor, is refused as ambiguous.
            labels: one label per image, or one for all: an int; a list of ints (multi-label); or
                a soft label ``{class: weight}`` (classes as indices or label names, weights > 0
                summing to 1; its first entry is the class the image was made for), returned
                by :meth:`get` as a :class:`~synthaug.cache.codec.SoftLabel`.
            meta: one provenance dict per image (JSON-serializable), or one dict for all.
                ``created_at`` is added where missing.
            fit_within: the generation worker's mode. Store only as many of the images (the
                first ones) as fit in a cache of at most this many records (and at most the
                stored ``max_items``), evicting for them only records that every live consumer
                has been handed and released (below every ``hold``; none while no consumer has a
                cursor): nothing is evicted unseen or while a DataLoader may still read it. The
                decision and the eviction are made inside this append's transaction. When not
                all fit, an eviction request is left for the consumers (:meth:`request_eviction`).
                ``None``: store all; the stored ``max_items`` then evicts the oldest records no
                live consumer holds (any record while no consumer has a cursor).

        Returns:
            The sequence numbers given to the records, in order (with ``fit_within``, possibly
            fewer than the images, or none).

        Raises:
            ValueError: on float images, wrong or ambiguous shapes (e.g. one H×W×C image without
                its batch axis), mismatched lengths, or metadata that is not JSON; nothing is
                written then.
        """
        if self._readonly:
            raise PermissionError(f"cache {self._path} was opened read-only; open it without readonly=True to append")
        if fit_within is not None and (isinstance(fit_within, bool) or not isinstance(fit_within, int) or fit_within < 1):
            raise ValueError(f"fit_within must be a number of records >= 1, got {fit_within!r}")
        imgs = codec.as_image_batch(images)
        n = len(imgs)
        labs = codec.as_labels(labels, n, lambda: self.label_names)
        metas = codec.as_metas(meta, n)
        if n == 0:
            return []
        shape = imgs[0].shape
        for i, im in enumerate(imgs):
            if im.shape != shape:
                raise ValueError(f"image {i} has shape {im.shape} but image 0 has {shape}; one append holds one image size")
        spec = {"height": shape[0], "width": shape[1], "channels": shape[2]}
        stamp = _now()
        values = []
        enc = self._encoding_arg or self._stored_encoding
        for im, lab, m in zip(imgs, labs, metas):
            m.setdefault("created_at", stamp)
            values.append(codec.encode_record(im, lab, codec.encode_meta(m), enc, quality=self._quality))
        handle = self._env()
        meta_db, rec_db = handle.dbs["meta"], handle.dbs["records"]

        def write(txn) -> List[int]:
            stored_spec = _jload(txn.get(b"image_spec", db=meta_db))
            if stored_spec is None:
                txn.put(b"image_spec", _jdump(spec), db=meta_db)
            elif stored_spec != spec:
                raise ValueError(
                    f"cache {self._path} holds {stored_spec['height']}×{stored_spec['width']}×{stored_spec['channels']} "
                    f"images; these are {spec['height']}×{spec['width']}×{spec['channels']}. Use another cache for another image size."
                )
            sup = self._supply(txn, handle, evict_unheld=fit_within is None)
            count, first = sup["count"], sup["first_seq"]
            limit = sup["max_items"]
            if fit_within is not None:
                limit = min(fit_within, limit) if limit else fit_within
            k = n
            if fit_within is not None:
                k = max(0, min(n, limit - count + sup["evictable"]))
                if k < n:  # ask consumers for the room this append lacked
                    self._request(txn, meta_db, first + count + n - limit)
            if k == 0:
                return []
            next_seq = sup["next_seq"]
            value_bytes = _jload(txn.get(b"value_bytes", db=meta_db), 0)
            seqs = list(range(next_seq, next_seq + k))
            for s_, v in zip(seqs, values):
                txn.put(_key(s_), v, db=rec_db, append=True)
                value_bytes += len(v)
            txn.put(b"next_seq", _jdump(next_seq + k), db=meta_db)
            evicted = 0
            excess = count + k - limit if limit else 0
            if excess > 0:
                # the store's own limit with no live consumer: oldest first, the new records too
                # (an append larger than the limit keeps its newest); else only released ones,
                # all older than this append
                evictable = count + k if fit_within is None and not sup["consumers"] else sup["evictable"]
                evicted, freed = _delete_oldest(txn, rec_db, min(excess, evictable))
                value_bytes -= freed
                if evicted < excess:
                    self._request(txn, meta_db, first + excess)
            txn.put(b"value_bytes", _jdump(value_bytes), db=meta_db)
            txn.put(b"appended", _jdump(_jload(txn.get(b"appended", db=meta_db), 0) + k), db=meta_db)
            if evicted:
                txn.put(b"evicted", _jdump(_jload(txn.get(b"evicted", db=meta_db), 0) + evicted), db=meta_db)
            return seqs

        return handle.write(write)

    def trim(self, keep_last: int) -> int:
        """Delete the oldest records so at most ``keep_last`` remain, sparing those a live
        consumer still holds (see :meth:`set_cursor`; any record while no consumer has a
        cursor); returns how many went."""
        if keep_last < 0:
            raise ValueError(f"keep_last must be >= 0, got {keep_last}")
        handle = self._env()
        meta_db, rec_db = handle.dbs["meta"], handle.dbs["records"]

        def write(txn) -> int:
            sup = self._supply(txn, handle, evict_unheld=True)
            excess = min(sup["count"] - keep_last, sup["evictable"])
            if excess <= 0:
                return 0
            evicted, freed = _delete_oldest(txn, rec_db, excess)
            txn.put(b"value_bytes", _jdump(_jload(txn.get(b"value_bytes", db=meta_db), 0) - freed), db=meta_db)
            txn.put(b"evicted", _jdump(_jload(txn.get(b"evicted", db=meta_db), 0) + evicted), db=meta_db)
            return evicted

        return handle.write(write)

    def request_eviction(self, below_seq: int) -> None:
        """Ask live consumers to release the records below ``below_seq`` (a writer that needs
        room calls this before generating). A consumer raises its ``hold`` towards it, as far as
        the records it has in flight allow, the next time it draws a batch; the request only
        grows (the largest one stands)."""
        handle = self._env()
        handle.write(lambda txn: self._request(txn, handle.dbs["meta"], int(below_seq)))

    @staticmethod
    def _request(txn, meta_db, below_seq: int) -> None:
        current = _jload(txn.get(b"evict_request", db=meta_db), 0)
        if below_seq > current:
            txn.put(b"evict_request", _jdump(below_seq), db=meta_db)

    def set_label_names(self, names: Sequence[str]) -> None:
        """Record the class names of the label indices (refused if different names are stored)."""
        names = [str(n) for n in names]
        current = self.label_names
        if current is not None and current != names:
            raise ValueError(f"cache {self._path} already has label names {current}, not {names}")
        handle = self._env()
        handle.write(lambda txn: txn.put(b"label_names", _jdump(names), db=handle.dbs["meta"]))
        self._label_names = names

    def adopt_label_names(self, names: Sequence[str]) -> List[str]:
        """Take a generator's label names into the cache, merged with those stored.

        ``""`` is a class the names' owner does not know (an adapter of one class of your label
        space names only that class), so ``["", "", "crack"]`` and ``["ok", "", ""]`` merge into
        ``["ok", "", "crack"]``. Returns the names now stored.

        Raises:
            ValueError: a label index named differently by the two lists; the records would
                carry one class's label under another's name.
        """
        handle = self._env()

        def merge(txn):
            stored = _jload(txn.get(b"label_names", db=handle.dbs["meta"]))
            merged = merge_label_names(stored, names, where=f"cache {self._path}")
            if merged != stored:
                txn.put(b"label_names", _jdump(merged), db=handle.dbs["meta"])
            return merged

        self._label_names = handle.write(merge)
        return list(self._label_names)

    def relabel(self, mapping: Mapping[int, int], label_names: Optional[Sequence[str]] = None, *, note: Optional[Dict[str, Any]] = None,
                batch_size: int = 256, progress: bool = False) -> Dict[str, int]:
        """Give every record labelled ``old`` the label ``mapping[old]`` (in multi-label records
        and soft labels too), and store ``label_names`` as the cache's names.

        Each batch of records is rewritten in its own write transaction (readers keep reading
        meanwhile; a crash leaves whole batches done), image bytes untouched. Each changed
        record's metadata gets ``label``/``label_name`` updated and an entry appended to its
        ``"relabeled"`` list: ``{"id", "from", "to", "from_name", "to_name", "at"}`` plus
        ``note``. ``id`` is derived from the mapping and names, so running the same relabel again
        (after a crash) skips the records already done. Damaged records are left alone and
        counted.

        Returns:
            ``{"changed", "unchanged", "already", "corrupt"}`` record counts.
        """
        import hashlib

        mapping = {int(k): int(v) for k, v in mapping.items()}
        old_names = self.label_names or []
        new_names = [str(n) for n in label_names] if label_names is not None else list(old_names)
        op_id = hashlib.sha256(json.dumps([sorted(mapping.items()), new_names]).encode()).hexdigest()[:16]
        at = _now()

        def name(names, label):  # the name of the class a label is filed under (a multi-label record: its first)
            i = codec.label_class(label)
            i = i[0] if isinstance(i, tuple) else i
            return names[i] if 0 <= i < len(names) and names[i] else None

        def plain(label):  # a label as JSON holds it
            return list(label) if isinstance(label, tuple) else dict(label) if isinstance(label, SoftLabel) else label

        def remap(label):
            if isinstance(label, SoftLabel):
                return SoftLabel([(mapping.get(c, c), w) for c, w in label.items()])
            if isinstance(label, tuple):
                return tuple(mapping.get(v, v) for v in label)
            return mapping.get(label, label)

        counts = {"changed": 0, "unchanged": 0, "already": 0, "corrupt": 0}
        handle = self._env()
        # the names first (a crash midway leaves old labels unnamed, refused by readers, never
        # named as another class), with a note of the relabel under way for a rerun to finish
        pending = {"id": op_id, "mapping": sorted(mapping.items()), "label_names": new_names, "started_at": at}

        def start(txn):
            txn.put(b"relabel_pending", _jdump(pending), db=handle.dbs["meta"])
            # counted, so a writer that remembers labels it scanned knows to read them again
            txn.put(b"relabels", _jdump(_jload(txn.get(b"relabels", db=handle.dbs["meta"]), 0) + 1), db=handle.dbs["meta"])
            if label_names is not None:
                txn.put(b"label_names", _jdump(new_names), db=handle.dbs["meta"])

        handle.write(start)
        if label_names is not None:
            self._label_names = new_names
        seqs = self.seqs()
        bar = None
        if progress:
            from synthaug.progress import progress_bar

            bar = progress_bar(total=len(seqs), desc="relabel", unit="rec")
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start : start + batch_size]

            def rewrite(txn, chunk=chunk):
                done = {"changed": 0, "unchanged": 0, "already": 0, "corrupt": 0}
                for seq in chunk:
                    value = txn.get(_key(seq), db=handle.dbs["records"])
                    if value is None:  # evicted meanwhile
                        continue
                    try:
                        label = codec.peek_label(value, seq, self._path)
                        meta = codec.peek_meta(value, seq, self._path)
                    except CorruptRecordError:
                        done["corrupt"] += 1
                        continue
                    history = list(meta.get("relabeled") or [])
                    if any(h.get("id") == op_id for h in history):
                        done["already"] += 1
                        continue
                    new = remap(label)
                    if new == label:
                        done["unchanged"] += 1
                        continue
                    entry = {"id": op_id, "from": plain(label), "to": plain(new), "from_name": name(old_names, label),
                             "to_name": name(new_names, new), "at": at, **(note or {})}
                    meta = dict(meta, relabeled=history + [entry])
                    if "label" in meta:
                        meta["label"] = entry["to"]
                    if "label_name" in meta:
                        meta["label_name"] = entry["to_name"]
                    txn.put(_key(seq), codec.relabel_record(value, new, codec.encode_meta(meta), seq, self._path), db=handle.dbs["records"])
                    done["changed"] += 1
                return done

            for k, v in handle.write(rewrite).items():
                counts[k] += v
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        handle.write(lambda txn: txn.delete(b"relabel_pending", db=handle.dbs["meta"]))
        return counts

    def pending_relabel(self) -> Optional[Dict[str, Any]]:
        """The relabel a crash interrupted (``{"id", "mapping", "label_names", "started_at"}``),
        or ``None``: running :meth:`relabel` with the same mapping and names finishes it."""
        handle = self._env()
        with handle.read() as txn:
            return _jload(txn.get(b"relabel_pending", db=handle.dbs["meta"]))

    # ------------------------------------------------------------------ reading
    def get(self, seq: int) -> Record:
        """The record with sequence number ``seq``.

        Raises:
            KeyError: no such record (never written, or evicted).
            CorruptRecordError: the record fails its CRC or cannot be decoded (names ``seq``).
        """
        handle = self._env()
        with handle.read() as txn:
            buf = txn.get(_key(seq), db=handle.dbs["records"])
            if buf is None:
                raise KeyError(self._missing(seq, txn, handle))
            return codec.decode_record(buf, seq, path=self._path)

    def get_many(self, seqs: Iterable[int]) -> List[Record]:
        """Records for ``seqs`` read in one transaction (same errors as :meth:`get`); read as
        :meth:`read_batch` reads them, so their images are views of one batch array."""
        return self.read_batch(seqs).records()

    def read_batch(self, seqs: Iterable[int], *, out=None, with_meta: bool = True) -> RecordBatch:
        """The records ``seqs`` read in one transaction, their images in one N×H×W×C array.

        The fast read path (what ``MixedDataset`` and ``get_many`` use): each value is looked at
        in place in the memory map (no copy of the record), its header parsed once, its CRC-32C
        checked, and its image copied once, into its row of the batch array (``out`` when given:
        a C-contiguous uint8 array of that shape, reused across batches to skip the allocation).
        Records of different shapes come back as a list of arrays instead. ``with_meta=False``
        skips copying out the provenance (a training loop does not read it).

        Raises:
            KeyError: a record does not exist (never written, or evicted).
            CorruptRecordError: a record fails its CRC or cannot be decoded (names its ``seq``).
        """
        seqs = [int(q) for q in seqs]
        handle = self._env()
        with handle.read() as txn:
            get, db, pack = txn.get, handle.dbs["records"], _KEY.pack
            bufs = []
            for seq in seqs:
                buf = get(pack(seq), db=db)
                if buf is None:
                    raise KeyError(self._missing(seq, txn, handle))
                bufs.append(buf)
            return codec.decode_batch(bufs, seqs, out=out, with_meta=with_meta, verified=self._verified, path=self._path)

    def _missing(self, seq: int, txn, handle: EnvHandle) -> str:
        cur = txn.cursor(db=handle.dbs["records"])
        first = _seq(cur.key()) if cur.first() else None
        return f"no record seq={seq} in {self._path} (first seq {first}; evicted or never written)"

    def __len__(self) -> int:
        handle = self._env()
        with handle.read() as txn:
            return txn.stat(handle.dbs["records"])["entries"]

    def __contains__(self, seq: int) -> bool:
        handle = self._env()
        with handle.read() as txn:
            return txn.get(_key(seq), db=handle.dbs["records"]) is not None

    def __iter__(self) -> Iterator[int]:
        """Sequence numbers in ascending order (read in chunks of short transactions)."""
        start = 0
        while True:
            chunk = self.seqs(start, limit=_SCAN_CHUNK)
            yield from chunk
            if len(chunk) < _SCAN_CHUNK:
                return
            start = chunk[-1] + 1

    def seqs(self, start: int = 0, stop: Optional[int] = None, *, limit: Optional[int] = None) -> List[int]:
        """Stored sequence numbers in ``[start, stop)``, ascending, at most ``limit`` of them."""
        handle = self._env()
        out: List[int] = []
        with handle.read() as txn:
            cur = txn.cursor(db=handle.dbs["records"])
            if not cur.set_range(_key(max(0, start))):
                return out
            for key in cur.iternext(keys=True, values=False):
                s = _seq(key)
                if stop is not None and s >= stop:
                    break
                out.append(s)
                if limit is not None and len(out) >= limit:
                    break
        return out

    def labels(self, start: int = 0, stop: Optional[int] = None) -> Dict[int, Label]:
        """``{seq: label}`` for records in ``[start, stop)``, images not decoded, CRC checked.

        Raises:
            CorruptRecordError: at the first damaged record (see :meth:`scan_labels` to skip them).
        """
        return self._scan(start, stop, codec.peek_label)

    def scan_labels(self, start: int = 0, stop: Optional[int] = None) -> Tuple[Dict[int, Label], List[int]]:
        """``({seq: label}, corrupt_seqs)`` for records in ``[start, stop)``: damaged records
        (bad header or CRC) are listed apart instead of stopping the scan."""
        corrupt: List[int] = []
        return self._scan(start, stop, codec.peek_label, corrupt=corrupt), corrupt

    def metas(self, start: int = 0, stop: Optional[int] = None, *, skip_corrupt: bool = False) -> Dict[int, Dict[str, Any]]:
        """``{seq: provenance dict}`` for records in ``[start, stop)`` (images not decoded, CRC checked).

        Raises:
            CorruptRecordError: at the first damaged record, unless ``skip_corrupt`` (then it is
                left out).
        """
        return self._scan(start, stop, codec.peek_meta, corrupt=[] if skip_corrupt else None)

    def first_seq(self) -> Optional[int]:
        """The oldest stored sequence number (``None`` when the cache is empty)."""
        handle = self._env()
        with handle.read() as txn:
            cur = txn.cursor(db=handle.dbs["records"])
            return _seq(cur.key()) if cur.first() else None

    def _scan(self, start: int, stop: Optional[int], read, corrupt: Optional[List[int]] = None) -> Dict[int, Any]:
        handle = self._env()
        out: Dict[int, Any] = {}
        with handle.read() as txn:
            cur = txn.cursor(db=handle.dbs["records"])
            if not cur.set_range(_key(max(0, start))):
                return out
            for key, value in cur:
                s = _seq(key)
                if stop is not None and s >= stop:
                    break
                try:
                    out[s] = read(value, s, self._path)
                except CorruptRecordError:
                    if corrupt is None:
                        raise
                    corrupt.append(s)
        return out

    # ------------------------------------------------------------------ consumers and worker
    def set_cursor(self, consumer: str, next_seq: int, *, hold: Optional[int] = None, **info: Any) -> None:
        """Record that ``consumer`` has been handed every record below ``next_seq``, and that it
        may still read records from ``hold`` on (default: ``next_seq``).

        Writers never evict a record at or above the smallest ``hold`` of the live consumers
        (:meth:`append`, :meth:`trim`), and count as fresh the records at or after the smallest
        ``next_seq`` (:meth:`supply`). A consumer's entry counts while its process runs (same
        host; see :mod:`synthaug.cache.liveness`); :meth:`remove_cursor` ends it sooner.
        """
        next_seq = int(next_seq)
        hold = next_seq if hold is None else int(hold)
        if hold > next_seq:
            raise ValueError(f"hold ({hold}) must be <= next_seq ({next_seq}): a consumer cannot release records it was not handed")
        value = {"next_seq": next_seq, "hold": hold, "updated_at": time.time(), **liveness.identity(), **info}
        handle = self._env()
        handle.write(lambda txn: txn.put(consumer.encode(), _jdump(value), db=handle.dbs["cursors"]))

    def cursors(self, *, include_dead: bool = False) -> Dict[str, Dict[str, Any]]:
        """Consumers' cursors: ``{name: {"next_seq", "hold", "updated_at", "pid", "host", ...}}``.

        Cursors of consumers whose process has exited on this host are left out unless
        ``include_dead``: a crashed or finished run must not pin the fresh count (and stall the
        generation worker) forever. Cursors written on other hosts are always kept (their
        liveness cannot be checked; LMDB caches are node-local anyway).
        """
        handle = self._env()
        with handle.read() as txn:
            return self._cursors(txn, handle, include_dead=include_dead)

    @staticmethod
    def _cursors(txn, handle: EnvHandle, *, include_dead: bool = False) -> Dict[str, Dict[str, Any]]:
        found = {bytes(k).decode(): _jload(v) for k, v in txn.cursor(db=handle.dbs["cursors"])}
        return found if include_dead else {k: v for k, v in found.items() if liveness.is_alive(v) is not False}

    def remove_cursor(self, consumer: str) -> bool:
        handle = self._env()
        return bool(handle.write(lambda txn: txn.delete(consumer.encode(), db=handle.dbs["cursors"])))

    def supply(self) -> Dict[str, Any]:
        """What writers decide by, read in one transaction.

        Returns:
            ``{"count", "first_seq", "next_seq", "fresh", "evictable", "max_items",
            "evict_request", "consumers", "waiting"}``: ``fresh`` counts the records no live
            consumer has been handed (at or after the smallest ``next_seq``; every record while
            no consumer has a cursor); ``evictable`` the oldest records every live consumer has
            released (below the smallest ``hold``; none while no consumer has a cursor, since
            then nobody has seen them); ``waiting`` the live consumers blocked for want of a
            record (a writer generates for them even when ``fresh`` looks plenty: a consumer
            restricted to some classes may want none of the fresh records); ``first_seq`` is
            ``next_seq`` for an empty cache.
        """
        handle = self._env()
        with handle.read() as txn:
            return self._supply(txn, handle, evict_unheld=False)

    def _supply(self, txn, handle: EnvHandle, *, evict_unheld: bool) -> Dict[str, Any]:
        """:meth:`supply` inside ``txn``; ``evict_unheld``: with no live consumer, every record
        is evictable (the store's own ``max_items``) instead of none (the worker's rule)."""
        rec_db, meta_db = handle.dbs["records"], handle.dbs["meta"]
        count = txn.stat(rec_db)["entries"]
        next_seq = _jload(txn.get(b"next_seq", db=meta_db), 0)
        cur = txn.cursor(db=rec_db)
        first = _seq(cur.key()) if cur.first() else next_seq
        cursors = self._cursors(txn, handle)
        waiting = sum(1 for c in cursors.values() if c.get("waiting"))
        if cursors:
            handed = min(int(c.get("next_seq", 0)) for c in cursors.values())
            held = min(int(c.get("hold", c.get("next_seq", 0))) for c in cursors.values())
        else:
            handed, held = 0, (next_seq if evict_unheld else first)
        fresh = _fresh(count, first, next_seq, handed)
        evictable = max(0, min(held, next_seq) - first) if count else 0
        return {
            "count": count,
            "first_seq": first,
            "next_seq": next_seq,
            "fresh": fresh,
            "evictable": min(evictable, count),
            "max_items": _jload(txn.get(b"max_items", db=meta_db)),
            "evict_request": _jload(txn.get(b"evict_request", db=meta_db), 0),
            "consumers": len(cursors),
            "waiting": waiting,
        }

    def scan_classes(self, start: int = 0) -> Dict[str, Any]:
        """The class of every record at or after ``start`` and the :meth:`supply` snapshot, read in
        one transaction: what a writer serving several classes decides by.

        Only each record's header and label bytes are read (no CRC, no image): a record whose
        header is damaged is left out (``synthaug cache verify`` names it). Cheap enough to call
        every poll when ``start`` is the first seq not scanned before (``supply["next_seq"]`` of
        the previous call): each record is read once.

        Returns:
            ``{"seqs": [seq, ...], "classes": [class, ...], "supply": {...}, "cursors": {...},
            "relabels": int, "relabeling": bool}``:
            ``classes[i]`` is the class record ``seqs[i]`` is filed under
            (:func:`~synthaug.cache.codec.label_class`: an int, or a tuple of ints for a
            multi-label record); ``supply`` as :meth:`supply` returns it; ``cursors`` the live
            consumers' entries as :meth:`cursors` returns them; ``relabels`` counts the
            :meth:`relabel` runs ever started on the cache and ``relabeling`` says one is under
            way (when the count changes, or while one runs, labels read before may have changed:
            scan again from the start).
        """
        handle = self._env()
        seqs: List[int] = []
        classes: List[Any] = []
        with handle.read() as txn:
            supply = self._supply(txn, handle, evict_unheld=False)
            cursors = self._cursors(txn, handle)
            relabels = _jload(txn.get(b"relabels", db=handle.dbs["meta"]), 0)
            relabeling = txn.get(b"relabel_pending", db=handle.dbs["meta"]) is not None
            cur = txn.cursor(db=handle.dbs["records"])
            if cur.set_range(_key(max(0, int(start), supply["first_seq"]))):
                for key, value in cur:
                    s = _seq(key)
                    try:
                        label = codec.peek_label(value, s, self._path, check_crc=False)
                    except CorruptRecordError:
                        continue
                    seqs.append(s)
                    classes.append(codec.label_class(label))
        return {"seqs": seqs, "classes": classes, "supply": supply, "cursors": cursors, "relabels": relabels, "relabeling": relabeling}

    def fresh_count(self, consumer: Optional[str] = None) -> int:
        """Records no live consumer has been handed yet (``consumer``: that one only).

        With no cursor recorded, every stored record counts as fresh. Cursors of consumers
        whose process has exited are ignored (see :meth:`cursors`).
        """
        if consumer is None:
            return self.supply()["fresh"]
        handle = self._env()
        with handle.read() as txn:
            start = self._cursors(txn, handle).get(consumer, {}).get("next_seq", 0)
            sup = self._supply(txn, handle, evict_unheld=False)
        return _fresh(sup["count"], sup["first_seq"], sup["next_seq"], start)

    def bounds(self) -> Tuple[int, int, int]:
        """``(first_seq, next_seq, evict_request)`` in one short read: the oldest stored record
        (``next_seq`` when empty), the next sequence number to be given, and the seq below
        which a writer asked consumers to release records (0: no request)."""
        handle = self._env()
        with handle.read() as txn:
            meta_db = handle.dbs["meta"]
            next_seq = _jload(txn.get(b"next_seq", db=meta_db), 0)
            cur = txn.cursor(db=handle.dbs["records"])
            first = _seq(cur.key()) if cur.first() else next_seq
            return first, next_seq, _jload(txn.get(b"evict_request", db=meta_db), 0)

    def seed_counter(self, seed: int) -> Optional[int]:
        """The seed counter of ``seed``'s block (meta ``seeds/<block>``): every per-image seed of
        the block below it has been used or reserved. ``None`` while no writer of the block has
        reserved seeds (its records then have seed ``seed + seq``; :mod:`synthaug.generation.fill`)."""
        handle = self._env()
        with handle.read() as txn:
            return _jload(txn.get(_SEEDS_PREFIX + str(seed_block(int(seed))).encode(), db=handle.dbs["meta"]))

    def reserve_seeds(self, seed: int, n: int) -> int:
        """Reserve ``n`` per-image seeds of ``seed``'s block in one write transaction and return the
        first: ``max(seed + next_seq, counter)``; the counter becomes ``first + n``. A seed so
        reserved is never handed out again, whether its image is stored, rejected by a gate, or
        lost to a kill. The block's writer (one per block, :mod:`synthaug.cache.writers`) calls it
        before generating."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a count of seeds >= 0, got {n!r}")
        if self._readonly:
            raise PermissionError(f"cache {self._path} was opened read-only; open it without readonly=True to reserve seeds")
        key = _SEEDS_PREFIX + str(seed_block(int(seed))).encode()
        handle = self._env()
        meta_db = handle.dbs["meta"]

        def write(txn) -> int:
            counter = _jload(txn.get(key, db=meta_db))
            first = int(seed) + _jload(txn.get(b"next_seq", db=meta_db), 0)
            if counter is not None:
                first = max(first, int(counter))
            txn.put(key, _jdump(first + n), db=meta_db)
            return first

        return handle.write(write)

    def write_heartbeat(self, info: Dict[str, Any]) -> None:
        """Store a writer's liveness record, one per seed block (``info["seed"]``, default 0;
        see :mod:`synthaug.cache.writers`). ``time`` is always the time of this write (a failure
        written on a dead worker's behalf carries the time it was detected); ``pid``, ``host``
        and ``pid_start`` are this process's unless ``info`` names the writer."""
        value = {**liveness.identity(), **info, "time": time.time()}
        key = _HEARTBEAT_PREFIX + str(seed_block(int(value.get("seed") or 0))).encode()
        handle = self._env()
        handle.write(lambda txn: txn.put(key, _jdump(value), db=handle.dbs["meta"]))

    def heartbeats(self) -> Dict[int, Dict[str, Any]]:
        """Every writer's last heartbeat, by seed block (``{}`` when no worker ever ran)."""
        handle = self._env()
        with handle.read() as txn:
            return self._heartbeats(txn, handle)

    @staticmethod
    def _heartbeats(txn, handle: EnvHandle) -> Dict[int, Dict[str, Any]]:
        out: Dict[int, Dict[str, Any]] = {}
        cur = txn.cursor(db=handle.dbs["meta"])
        if cur.set_range(_HEARTBEAT_PREFIX):
            for k, v in cur:
                k = bytes(k)
                if not k.startswith(_HEARTBEAT_PREFIX):
                    break
                out[int(k[len(_HEARTBEAT_PREFIX) :])] = _jload(v)
        return out

    def heartbeat(self) -> Optional[Dict[str, Any]]:
        """The most recently written heartbeat (of any seed block), or ``None``."""
        beats = self.heartbeats()
        return max(beats.values(), key=lambda hb: float(hb.get("time") or 0.0)) if beats else None

    # ------------------------------------------------------------------ reports
    def meta(self) -> Dict[str, Any]:
        """Everything stored in the ``meta`` database, decoded."""
        handle = self._env()
        with handle.read() as txn:
            return {bytes(k).decode(): _jload(v) for k, v in txn.cursor(db=handle.dbs["meta"])}

    def stats(self) -> Dict[str, Any]:
        """Counts and sizes, without reading the records.

        Keys: ``count``, ``first_seq``, ``last_seq``, ``next_seq``, ``bytes`` (stored values),
        ``disk_bytes`` (data file), ``map_size``, ``encoding``, ``format_version``, ``image_spec``,
        ``label_names``, ``max_items``, ``appended``, ``evicted``, ``consumers``, ``heartbeat``
        (the latest), ``heartbeats`` (by seed block).
        """
        handle = self._env()
        with handle.read() as txn:
            rec_db = handle.dbs["records"]
            count = txn.stat(rec_db)["entries"]
            cur = txn.cursor(db=rec_db)
            first = _seq(cur.key()) if cur.first() else None
            last = _seq(cur.key()) if cur.last() else None
            m = {bytes(k).decode(): _jload(v) for k, v in txn.cursor(db=handle.dbs["meta"])}
            consumers = txn.stat(handle.dbs["cursors"])["entries"]
            beats = self._heartbeats(txn, handle)
        data_file = self._path / "data.mdb"
        return {
            "path": str(self._path),
            "count": count,
            "first_seq": first,
            "last_seq": last,
            "next_seq": m.get("next_seq", 0),
            "bytes": m.get("value_bytes", 0),
            "disk_bytes": data_file.stat().st_size if data_file.exists() else 0,
            "map_size": handle.map_size(),
            "encoding": self.encoding,
            "format_version": m.get("format_version"),
            "image_spec": m.get("image_spec"),
            "label_names": m.get("label_names"),
            "max_items": m.get("max_items"),
            "appended": m.get("appended", 0),
            "evicted": m.get("evicted", 0),
            "consumers": consumers,
            "heartbeat": max(beats.values(), key=lambda hb: float(hb.get("time") or 0.0)) if beats else None,
            "heartbeats": beats,
            "created_at": m.get("created_at"),
        }

    def class_counts(self, *, every_class: bool = False, corrupt: Optional[List[int]] = None) -> Counter:
        """Records per class index: a multi-label record counts once per label, a soft label under
        the class its image was made for (``every_class``: under each class it weighs).

        Damaged records are not counted; pass a list as ``corrupt`` to get their sequence numbers
        appended to it.
        """
        counts: Counter = Counter()
        labels, bad = self.scan_labels()
        if corrupt is not None:
            corrupt.extend(bad)
        for lab in labels.values():
            if isinstance(lab, tuple):
                counts.update(lab)
            elif isinstance(lab, SoftLabel) and every_class:
                counts.update(lab.keys())
            else:
                counts[codec.label_class(lab)] += 1
        return counts

    def label_histogram(self, *, corrupt: Optional[List[int]] = None) -> Dict[str, int]:
        """Records per label (multi-label records count once per label, a soft label under the
        class its image was made for), keyed by label text.

        Damaged records (bad header or CRC) are not counted; pass a list as ``corrupt`` to get
        their sequence numbers appended to it.
        """
        counts = self.class_counts(corrupt=corrupt)
        names = self.label_names
        return {
            (f"{k} ({names[k]})" if names and 0 <= k < len(names) else str(k)): v for k, v in sorted(counts.items())
        }

    def verify(self, *, progress: bool = False) -> Dict[str, Any]:
        """Read and decode every record, checking its CRC.

        Returns:
            ``{"ok": int, "corrupt": int, "corrupt_seqs": [...], "errors": {seq: reason},
            "count": int, "problems": [...]}``; ``problems`` lists inconsistencies of the meta
            (e.g. ``next_seq`` not past the last record).
        """
        handle = self._env()
        ok, bad, errors = 0, [], {}
        problems = []
        total = len(self)
        bar = None
        if progress:
            from synthaug.progress import progress_bar

            bar = progress_bar(total=total, desc="verify", unit="rec", dynamic_ncols=True)
        start = 0
        last_seen = None
        while True:
            n_chunk = 0
            with handle.read() as txn:
                cur = txn.cursor(db=handle.dbs["records"])
                more = cur.set_range(_key(start))
                while more and n_chunk < _SCAN_CHUNK:
                    seq = _seq(cur.key())
                    try:
                        codec.decode_record(cur.value(), seq, path=self._path)
                        ok += 1
                    except CorruptRecordError as exc:
                        bad.append(seq)
                        errors[seq] = exc.reason
                    last_seen = seq
                    n_chunk += 1
                    more = cur.next()
            if bar is not None:
                bar.update(n_chunk)
            if not more:
                break
            start = last_seen + 1
        if bar is not None:
            bar.close()
        m = self.meta()
        if m.get("format_version") != codec.FORMAT_VERSION:
            problems.append(f"format_version is {m.get('format_version')!r}, expected {codec.FORMAT_VERSION}")
        if last_seen is not None and m.get("next_seq", 0) <= last_seen:
            problems.append(f"next_seq {m.get('next_seq')} is not past the last record {last_seen}")
        return {"ok": ok, "corrupt": len(bad), "corrupt_seqs": bad, "errors": errors, "count": ok + len(bad), "problems": problems}

    def __repr__(self) -> str:
        try:
            n = len(self)
        except Exception:
            n = "?"
        return f"SyntheticCache({str(self._path)!r}, count={n}, encoding={self.encoding!r})"


def merge_label_names(stored: Optional[Sequence[str]], names: Sequence[str], *, where: str = "the cache") -> List[str]:
    """``stored`` and ``names`` as one list of label names (``""``: a class not named there).

    Raises:
        ValueError: an index the two name differently.
    """
    a = [str(n) for n in (stored or [])]
    b = [str(n) for n in names]
    merged = []
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else ""
        y = b[i] if i < len(b) else ""
        if x and y and x != y:
            raise ValueError(
                f"{where} has label {i} named {x!r}, but these records would name it {y!r}: their label spaces disagree "
                f"(stored {a}, new {b}); use another cache, or relabel with `synthaug cache relabel`"
            )
        merged.append(x or y)
    while merged and not merged[-1]:  # unnamed trailing labels say nothing
        merged.pop()
    return merged


def _fresh(count: int, first_seq: int, next_seq: int, handed: int) -> int:
    """The fresh-count rule: the stored records at or after ``handed`` (a consumer's cursor, or
    the smallest live one; 0 when no consumer has one, so every record is fresh). Sequence
    numbers are dense from ``first_seq`` to ``next_seq - 1``: eviction removes only the oldest."""
    return max(0, next_seq - max(first_seq, handed)) if count else 0


def _delete_oldest(txn, rec_db, n: int):
    """Delete the ``n`` lowest-seq records; returns (deleted, bytes freed)."""
    cur = txn.cursor(db=rec_db)
    deleted = freed = 0
    if not cur.first():
        return 0, 0
    while deleted < n:
        freed += len(cur.value())
        deleted += 1
        if not cur.delete():
            break
    return deleted, freed


def _file_identity(path: Path) -> Optional[Tuple[int, int]]:
    """``(device, inode)`` of a cache's data file (``None`` when it does not exist)."""
    try:
        st = os.stat(path / "data.mdb")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
