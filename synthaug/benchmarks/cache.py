"""Cache throughput: append and read+decode records/s per encoding, against a bare py-lmdb loop.

Question: what does each image encoding cost to write and to read back, and how close is
``SyntheticCache``'s read path (header checks, CRC, labels, metadata) to the cheapest possible
loop over the same LMDB file (``txn.get`` + image decode, nothing else)?

A third loop, the bare one plus the CRC-32C check over the whole value, separates the price of
the integrity check (which lets a damaged record be reported instead of trained on) from the
rest of the read path (header fields, labels, metadata, the ``Record``).

All read loops visit the same records in the same random order, in batches of 64 per read
transaction, alternating run by run (see ``interleaved``), in one process. Images have
real-photo statistics (Fashion-MNIST for 28×28 gray, crops of photographs for 256×256 RGB),
since noise would make PNG/JPEG sizes meaningless.

    python benchmarks/cache.py [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import struct
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from synthaug.benchmarks.common import interleaved, print_table, rate, realistic_images, write_result
from synthaug.cache.codec import HEADER_SIZE, Encoding, decode_image
from synthaug.cache.store import SyntheticCache

__all__ = ["run", "main"]

_HEADER = struct.Struct(">4sBBBBHHH2xIII")
CONFIGS = [
    # name, size, channels, records (full), records (quick)
    ("28x28 gray", 28, 1, 20000, 3000),
    ("256x256 RGB", 256, 3, 1200, 200),
]
ENCODINGS = ["raw", "png", "jpeg", "webp"]
READ_BATCH = 64


def _bare_reader(cache: SyntheticCache, seq_batches: List[List[int]], crc: bool = False):
    """The cheapest loop over the same file: key from seq, get, locate image, decode; no checks
    (with ``crc``: plus the record's CRC-32C over the whole value, as ``SyntheticCache`` checks it)."""
    from crc32c import crc32c

    handle = cache._env()
    env, db = handle.env, handle.dbs["records"]
    pack = struct.Struct(">Q").pack

    def read() -> None:
        for seqs in seq_batches:
            with env.begin(buffers=True) as txn:
                for seq in seqs:
                    v = txn.get(pack(seq), db=db)
                    _m, _ver, enc, c, _f, h, w, n_labels, meta_len, image_len, _crc = _HEADER.unpack_from(v)
                    start = HEADER_SIZE + 4 * n_labels + meta_len
                    if crc:
                        crc32c(v)
                    decode_image(v[start : start + image_len], Encoding(enc), h, w, c)

    return read


def run(quick: bool = False, repeats: int = 0) -> Dict[str, Any]:
    repeats = repeats or (3 if quick else 5)
    rows: List[Dict[str, Any]] = []
    for name, size, channels, n_full, n_quick in CONFIGS:
        n = n_quick if quick else n_full
        images = realistic_images(n, size, channels, seed=0)
        labels = np.arange(n) % 10
        for encoding in ENCODINGS:
            with tempfile.TemporaryDirectory() as tmp:
                cache = SyntheticCache(Path(tmp) / "bench", encoding=encoding, map_size=1 << 28)
                meta = {"model": "builtin:fashion-mnist-ddpm", "seed": 0, "prompt": "", "num_inference_steps": 40}

                def append() -> None:
                    for s in range(0, n, 64):
                        cache.append(images[s : s + 64], labels[s : s + 64], meta)

                append_rate = rate(n, append)
                seqs = np.random.default_rng(1).permutation(cache.seqs())
                seq_batches = [seqs[i : i + READ_BATCH].tolist() for i in range(0, len(seqs), READ_BATCH)]
                bare = _bare_reader(cache, seq_batches)
                bare_crc = _bare_reader(cache, seq_batches, crc=True)

                def ours_batched() -> None:
                    for b in seq_batches:
                        cache.get_many(b)

                def ours_single() -> None:
                    for b in seq_batches:
                        for s in b:
                            cache.get(s)

                timing = interleaved(
                    {
                        "bare": lambda: rate(n, bare),
                        "bare_crc": lambda: rate(n, bare_crc),
                        "ours_get_many": lambda: rate(n, ours_batched),
                        "ours_get": lambda: rate(n, ours_single),
                    },
                    repeats,
                )
                stats = cache.stats()
                cache.close()
            row = {
                "images": name,
                "encoding": encoding,
                "records": n,
                "bytes/record": stats["bytes"] / n,
                "append rec/s": append_rate,
                "read rec/s (get_many)": timing["ours_get_many"]["median"],
                "read rec/s (get)": timing["ours_get"]["median"],
                "bare lmdb rec/s": timing["bare"]["median"],
                "get_many / bare": timing["ours_get_many"]["median"] / timing["bare"]["median"],
                "get / bare": timing["ours_get"]["median"] / timing["bare"]["median"],
                "bare+CRC rec/s": timing["bare_crc"]["median"],
                "get_many / bare+CRC": timing["ours_get_many"]["median"] / timing["bare_crc"]["median"],
                "timing": timing,
            }
            rows.append(row)
            print(f"  {name:<12} {encoding:<5} done", flush=True)
    return {"quick": quick, "repeats": repeats, "read_batch": READ_BATCH, "rows": rows}


COLUMNS = [
    "images",
    "encoding",
    "bytes/record",
    "append rec/s",
    "read rec/s (get_many)",
    "read rec/s (get)",
    "bare lmdb rec/s",
    "get_many / bare",
    "get / bare",
    "bare+CRC rec/s",
    "get_many / bare+CRC",
]


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer records and repeats (under a minute)")
    p.add_argument("--repeats", type=int, default=0, help="interleaved repeats (default 5, quick 3)")
    p.add_argument("--out", default=None, help="folder for cache.json (default benchmarks/results)")
    args = p.parse_args(argv)
    result = run(args.quick, args.repeats)
    print_table(result["rows"], COLUMNS)
    path = write_result("cache" + ("_quick" if args.quick else ""), result, args.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
