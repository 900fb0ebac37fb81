"""Cache throughput: append and read+decode records/s per encoding, against a bare py-lmdb loop.

Question: what does each image encoding cost to write and to read back, and how close is
``SyntheticCache``'s read path (header checks, CRC, labels, metadata) to the cheapest possible
loop over the same LMDB file (``txn.get`` + image decode, nothing else)?

A third loop, the bare one plus the CRC-32C check over the whole value, separates the price of
the integrity check (which lets a damaged record be reported instead of trained on) from the
rest of the read path (header fields, labels, metadata, the ``Record``).

Our contenders: ``read_batch`` (the batch path ``MixedDataset`` uses: one transaction, values
seen in place, one copy per image into one batch array, CRC checked, provenance left out),
``get_many`` (the same, plus a ``Record`` and the provenance per record) and ``get`` (one
transaction per record); for raw records also ``read_batch`` on a cache opened with
``verify="once"`` (each CRC checked on a record's first read in the process; timed on records
read before). For raw records, the peers' storage as well: a folder of PNG files read
with PIL, as DA-Fusion, Diff-Mix and DataDream keep their synthetic images. Ratios are medians of
per-repeat ratios (the contenders run side by side in each repeat).

All read loops visit the same records in the same random order, in batches of 64 per read
transaction, alternating run by run (see ``interleaved``), in one process. Images have
real-photo statistics (Fashion-MNIST for 28×28 gray, crops of photographs for 256×256 RGB),
since noise would make PNG/JPEG sizes meaningless.

    python benchmarks/cache.py [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import statistics
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


def _png_folder(folder: Path, images: np.ndarray, labels: np.ndarray, seqs: List[int], seq_batches: List[List[int]]):
    """How DA-Fusion, Diff-Mix and DataDream keep synthetic images: one PNG file per image in a
    folder per class (PIL's default compression), read back with PIL into an array. Returns the
    reader of the same records in the same order."""
    from PIL import Image

    paths = {}
    for seq, image, label in zip(sorted(seqs), images, labels):  # seq k holds images[k] (appended in order)
        d = folder / str(int(label))
        d.mkdir(parents=True, exist_ok=True)
        paths[seq] = d / f"{seq:08d}.png"
        Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(paths[seq])
    mode = "L" if images.shape[3] == 1 else "RGB"

    def read() -> None:
        for batch in seq_batches:
            for seq in batch:
                with Image.open(paths[seq]) as im:
                    np.asarray(im.convert(mode) if im.mode != mode else im)

    return read


def _paired(a: Dict[str, Any], b: Dict[str, Any]) -> float:
    """Median of the per-repeat ratios a/b (the contenders ran side by side in each repeat)."""
    return statistics.median(x / y for x, y in zip(a["runs"], b["runs"]))


def _paired_range(a: Dict[str, Any], b: Dict[str, Any]) -> str:
    r = [x / y for x, y in zip(a["runs"], b["runs"])]
    return f"{min(r):.2f}–{max(r):.2f}"


def run(quick: bool = False, repeats: int = 0) -> Dict[str, Any]:
    repeats = repeats or (3 if quick else 9)
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

                def ours_read_batch() -> None:
                    for b in seq_batches:
                        cache.read_batch(b, with_meta=False)

                contenders = {
                    "bare": lambda: rate(n, bare),
                    "bare_crc": lambda: rate(n, bare_crc),
                    "ours_read_batch": lambda: rate(n, ours_read_batch),
                    "ours_get_many": lambda: rate(n, ours_batched),
                    "ours_get": lambda: rate(n, ours_single),
                }
                if encoding == "raw":
                    # verify="once", on records read before (its first pass checks every CRC)
                    once = SyntheticCache(Path(tmp) / "bench", verify="once")

                    def ours_read_batch_once() -> None:
                        for b in seq_batches:
                            once.read_batch(b, with_meta=False)

                    ours_read_batch_once()
                    contenders["ours_read_batch_once"] = lambda: rate(n, ours_read_batch_once)
                    # the peers' storage, once per image size
                    png_reader = _png_folder(Path(tmp) / "png", images, labels, seqs.tolist(), seq_batches)
                    contenders["png_folder"] = lambda: rate(n, png_reader)
                timing = interleaved(contenders, repeats)
                stats = cache.stats()
                if encoding == "raw":
                    once.close()
                cache.close()
            row = {
                "images": name,
                "encoding": encoding,
                "records": n,
                "bytes/record": stats["bytes"] / n,
                "append rec/s": append_rate,
                "read rec/s (read_batch)": timing["ours_read_batch"]["median"],
                "read_batch / bare": _paired(timing["ours_read_batch"], timing["bare"]),
                "read_batch / bare (min–max)": _paired_range(timing["ours_read_batch"], timing["bare"]),
                "read rec/s (get_many)": timing["ours_get_many"]["median"],
                "read rec/s (get)": timing["ours_get"]["median"],
                "bare lmdb rec/s": timing["bare"]["median"],
                "get_many / bare": _paired(timing["ours_get_many"], timing["bare"]),
                "get / bare": _paired(timing["ours_get"], timing["bare"]),
                "bare+CRC rec/s": timing["bare_crc"]["median"],
                "get_many / bare+CRC": _paired(timing["ours_get_many"], timing["bare_crc"]),
                "timing": timing,
            }
            if "ours_read_batch_once" in timing:
                row["read_batch verify=once / bare"] = _paired(timing["ours_read_batch_once"], timing["bare"])
                row["read_batch verify=once / bare (min–max)"] = _paired_range(timing["ours_read_batch_once"], timing["bare"])
            if "png_folder" in timing:
                row["PNG folder (PIL) rec/s"] = timing["png_folder"]["median"]
                row["read_batch / PNG folder"] = _paired(timing["ours_read_batch"], timing["png_folder"])
            rows.append(row)
            print(f"  {name:<12} {encoding:<5} done", flush=True)
    return {"quick": quick, "repeats": repeats, "read_batch": READ_BATCH, "rows": rows}


COLUMNS = [
    "images",
    "encoding",
    "bytes/record",
    "append rec/s",
    "bare lmdb rec/s",
    "read rec/s (read_batch)",
    "read_batch / bare",
    "read_batch / bare (min–max)",
    "read rec/s (get_many)",
    "read rec/s (get)",
    "get_many / bare",
    "get / bare",
    "bare+CRC rec/s",
    "get_many / bare+CRC",
    "read_batch verify=once / bare",
    "read_batch verify=once / bare (min–max)",
    "PNG folder (PIL) rec/s",
    "read_batch / PNG folder",
]


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer records and repeats (under a minute)")
    p.add_argument("--repeats", type=int, default=0, help="interleaved repeats (default 9, quick 3)")
    p.add_argument("--out", default=None, help="folder for cache.json (default benchmarks/results)")
    args = p.parse_args(argv)
    result = run(args.quick, args.repeats)
    print_table(result["rows"], COLUMNS)
    path = write_result("cache" + ("_quick" if args.quick else ""), result, args.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
