"""``synthaug cache inspect|verify|export|relabel|grid PATH``: look into (or relabel) a synthetic-image cache."""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from typing import Any, Dict, List

from synthaug.cache.liveness import dead_writer
from synthaug.cache.store import SyntheticCache
from synthaug.cli.finetune import add_class_arguments, classes_from_args
from synthaug.imaging import save_image_grid
from synthaug.outputs import output_dir

__all__ = ["register", "provenance_summary"]

# provenance fields summarized by `inspect` (distinct values, most common first)
_SUMMARY_KEYS = [
    "model",
    "adapter",
    "adapter_hash",
    "prompt",
    "negative_prompt",
    "label_name",
    "model_class_name",
    "scheduler",
    "num_inference_steps",
    "guidance_scale",
    "resolution",
    "mode",
    "strength",
]


def _open(path: str):
    return SyntheticCache(path, readonly=True)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def provenance_summary(metas: Dict[int, Dict[str, Any]], top: int = 5) -> Dict[str, Any]:
    """Distinct values of the main provenance fields, their counts, seed and time ranges."""
    out: Dict[str, Any] = {}
    for key in _SUMMARY_KEYS:
        counts = Counter(json.dumps(m[key], sort_keys=True) if isinstance(m.get(key), (dict, list)) else m[key] for m in metas.values() if key in m)
        if counts:
            out[key] = {"distinct": len(counts), "top": [[v, c] for v, c in counts.most_common(top)]}
    seeds = [m["seed"] for m in metas.values() if isinstance(m.get("seed"), int)]
    if seeds:
        out["seed"] = {"min": min(seeds), "max": max(seeds), "distinct": len(set(seeds))}
    times = sorted(m["created_at"] for m in metas.values() if "created_at" in m)
    if times:
        out["created_at"] = {"first": times[0], "last": times[-1]}
    missing = sum(1 for m in metas.values() if "seed" not in m or "model" not in m)
    out["records_without_seed_or_model"] = missing
    return out


def class_supply(cache) -> Dict[str, Dict[str, Any]]:
    """Per class index (as a string): ``{"name", "stored", "fresh", "served", "generated"}``.

    ``fresh``: records of the class at or after the smallest live cursor (every record while no
    consumer has one); ``served``: summed over the live cursors' ``served_by_class`` (``None``
    when no cursor counts it); ``generated``: by the workers whose heartbeat counts it per class
    (``None`` when none does). A multi-label record counts under each of its labels.
    """
    scan = cache.scan_classes(0)
    cursors = scan["cursors"]
    handed = min((int(c.get("next_seq", 0)) for c in cursors.values()), default=0)
    stored: Counter = Counter()
    fresh: Counter = Counter()
    for seq, cls in zip(scan["seqs"], scan["classes"]):
        for c in cls if isinstance(cls, tuple) else (cls,):
            stored[c] += 1
            if seq >= handed:
                fresh[c] += 1
    served: Dict[int, int] = {}
    for cur in cursors.values():
        for k, v in (cur.get("served_by_class") or {}).items():
            if str(k).lstrip("-").isdigit():
                served[int(k)] = served.get(int(k), 0) + int(v or 0)
    generated: Dict[int, int] = {}
    for hb in cache.heartbeats().values():
        for c in (hb.get("classes") or {}).values():
            generated[int(c["label"])] = generated.get(int(c["label"]), 0) + int(c.get("generated") or 0)
    names = cache.label_names or []
    out = {}
    for label in sorted(set(stored) | set(served) | set(generated)):
        out[str(label)] = {
            "name": names[label] if 0 <= label < len(names) and names[label] else None,
            "stored": stored.get(label, 0),
            "fresh": fresh.get(label, 0),
            "served": served.get(label) if served or any("served_by_class" in c for c in cursors.values()) else None,
            "generated": generated.get(label) if generated else None,
        }
    return out


def cmd_inspect(args: argparse.Namespace) -> int:
    cache = _open(args.path)
    stats = cache.stats()
    corrupt: List[int] = []
    report = {
        "stats": stats,
        "label_histogram": cache.label_histogram(corrupt=corrupt),
        "corrupt_seqs": corrupt,
        "classes": class_supply(cache),
        "provenance": provenance_summary(cache.metas(skip_corrupt=True)),
        "cursors": cache.cursors(),
        "workers": {str(block): {**hb, "dead": dead_writer(hb)} for block, hb in stats["heartbeats"].items()},
    }
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    spec = stats["image_spec"]
    shape = f"{spec['height']}×{spec['width']}×{spec['channels']}" if spec else "(none yet)"
    print(f"cache        {stats['path']}")
    print(f"records      {stats['count']} (seq {stats['first_seq']}..{stats['last_seq']}, next {stats['next_seq']})")
    print(f"appended     {stats['appended']}, evicted {stats['evicted']}, max_items {stats['max_items'] or 'unbounded'}")
    print(f"images       {shape}, encoding {stats['encoding']}")
    print(f"bytes        {_fmt_bytes(stats['bytes'])} in records, {_fmt_bytes(stats['disk_bytes'])} on disk, map {_fmt_bytes(stats['map_size'])}")
    print(f"format       version {stats['format_version']}, created {stats['created_at']}")
    for block, hb in sorted(report["workers"].items()):
        state = hb.get("state")
        if hb["dead"]:
            state = f"{state}, but its process is gone"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(hb.get("time") or 0)))
        extra = {k: v for k, v in hb.items() if k not in ("pid", "host", "time", "state", "dead", "pid_start", "classes")}
        print(f"worker       seeds block {block}: {state}; pid {hb.get('pid')} on {hb.get('host')}, heartbeat {when}: {json.dumps(extra)}")
        for name, c in (hb.get("classes") or {}).items():
            served = "?" if c.get("served") is None else c["served"]
            print(f"  class {name:<18} label {c.get('label')}: generated {c.get('generated')}, fresh {c.get('fresh')} "
                  f"(target {c.get('target')}), served {served}")
    if corrupt:
        shown = ", ".join(str(s) for s in corrupt[:10]) + (" ..." if len(corrupt) > 10 else "")
        print(f"corrupt      {len(corrupt)} record(s) with a bad header or CRC (seq {shown}): left out below; "
              f"`synthaug cache verify {stats['path']}` lists why")
    print("labels")
    for label, count in report["label_histogram"].items():
        print(f"  {label:<24} {count}")
    if report["classes"]:
        print("supply per class (fresh: not yet handed to the slowest live consumer; served: by live consumers that count it)")
        for label, c in report["classes"].items():
            name = f"{label} {c['name']}" if c["name"] else label
            served = "?" if c["served"] is None else c["served"]
            generated = "" if c["generated"] is None else f", generated {c['generated']} (workers' last heartbeats)"
            print(f"  {name:<24} stored {c['stored']}, fresh {c['fresh']}, served {served}{generated}")
    if report["cursors"]:
        print("consumers")
        for name, cur in report["cursors"].items():
            print(f"  {name:<24} next_seq {cur.get('next_seq')}, hold {cur.get('hold', cur.get('next_seq'))}, pid {cur.get('pid')} on {cur.get('host')}")
    print("provenance")
    for key, value in report["provenance"].items():
        if isinstance(value, dict) and "top" in value:
            tops = ", ".join(f"{v!r}×{c}" for v, c in value["top"])
            print(f"  {key:<20} {value['distinct']} distinct: {tops}")
        else:
            print(f"  {key:<20} {value}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    cache = _open(args.path)
    result = cache.verify(progress=not args.json)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['ok']} records ok, {result['corrupt']} corrupt")
        for seq in result["corrupt_seqs"][:50]:
            print(f"  seq {seq}: {result['errors'][seq]}")
        if result["corrupt"] > 50:
            print(f"  ... and {result['corrupt'] - 50} more")
        for problem in result["problems"]:
            print(f"  meta: {problem}")
    return 1 if result["corrupt"] or result["problems"] else 0


def _select(cache, limit: int, sample: bool, seed: int) -> List[int]:
    seqs = list(cache)
    if sample and limit and len(seqs) > limit:
        return sorted(random.Random(seed).sample(seqs, limit))
    return seqs[-limit:] if limit else seqs


def cmd_export(args: argparse.Namespace) -> int:
    from PIL import Image
    from synthaug.progress import progress_bar

    cache = _open(args.path)
    out = output_dir(args.out, overwrite=args.overwrite, what="export folder")
    seqs = _select(cache, args.limit, args.sample, args.seed)
    written = 0
    with open(out / "metadata.jsonl", "w") as f:
        for start in progress_bar(range(0, len(seqs), 256), desc="export", unit="batch", dynamic_ncols=True):
            for rec in cache.get_many(seqs[start : start + 256]):
                name = f"{rec.seq:08d}.png"
                img = rec.image[:, :, 0] if rec.image.shape[2] == 1 else rec.image
                Image.fromarray(img).save(out / name)
                label = list(rec.label) if isinstance(rec.label, tuple) else rec.label
                f.write(json.dumps({"file_name": name, "seq": rec.seq, "label": label, "meta": rec.meta}) + "\n")
                written += 1
    print(f"exported {written} images and metadata.jsonl to {out}")
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    cache = _open(args.path)
    seqs = _select(cache, args.n, not args.last, args.seed)
    if not seqs:
        raise ValueError(f"cache {args.path} holds no records to show")
    records = cache.get_many(seqs)
    path = save_image_grid([r.image for r in records], args.out, args.cols)
    print(f"wrote a grid of {len(records)} images to {path}")
    return 0


def cmd_relabel(args: argparse.Namespace) -> int:
    """Give the records of one class your class name and label (provenance of the change kept)."""
    import os
    from pathlib import Path

    from synthaug.cache.store import merge_label_names
    from synthaug.cache.writers import SEED_BLOCK, WriterLock
    from synthaug.finetune.common import user_label_space

    if not os.path.isfile(os.path.join(args.path, "data.mdb")):
        raise FileNotFoundError(f"no synthetic cache at {args.path} (no data.mdb)")
    classes = classes_from_args(args)
    cache = SyntheticCache(args.path)
    # hold every writer lock, so no worker appends records in the old label space meanwhile
    blocks = {0} | {int(p.stem.split("-", 1)[1]) for p in Path(args.path).glob("writer-*.lock") if p.stem.split("-", 1)[1].isdigit()}
    locks = [WriterLock(args.path, b * SEED_BLOCK, kind="synthaug cache relabel").acquire() for b in sorted(blocks)]
    try:
        names = cache.label_names or []
        present = cache.class_counts(every_class=True)  # a soft label's source classes keep their names
        if not present:
            raise ValueError(f"cache {args.path} holds no records to relabel")

        def shown(c):
            return f"{c} ({names[c]!r})" if 0 <= c < len(names) and names[c] else str(c)

        pending = cache.pending_relabel()
        if pending is not None and args.source is None:  # a relabel a crash interrupted: its class, unless --from says otherwise
            old = int(pending["mapping"][0][0])
            print(f"synthaug cache relabel: finishing the relabel of class {old} started {pending.get('started_at')} and interrupted")
        elif args.source is None:
            if len(present) > 1:
                raise ValueError(f"cache {args.path} holds several classes ({', '.join(shown(c) for c in sorted(present))}); "
                                 "choose the one to relabel with --from LABEL_OR_NAME")
            old = next(iter(present))
        elif args.source.lstrip("-").isdigit():
            old = int(args.source)
        elif args.source in names:
            old = names.index(args.source)
        else:
            raise ValueError(f"--from {args.source!r} is neither a label nor a name of cache {args.path} (its names: {names or 'none'})")
        if old not in present and pending is None:
            raise ValueError(f"cache {args.path} has no records of class {shown(old)}; it holds {', '.join(shown(c) for c in sorted(present))}")
        new, user_names = user_label_space(args.class_name, args.label, classes)
        others = [""] * max(len(names), 1)
        for c in present:
            if c != old and 0 <= c < len(names):
                others[c] = names[c]
        final = merge_label_names(others, user_names, where=f"cache {args.path} (its other classes)")
        counts = cache.relabel({old: new}, final, note={"by": "synthaug cache relabel"}, progress=True)
    finally:
        for lock in locks:
            lock.release()
    print(
        f"relabelled {counts['changed']} record(s) of {args.path}: class {shown(old)} -> {new} ({args.class_name!r})"
        + (f"; {counts['already']} already done by an earlier run" if counts["already"] else "")
        + (f"; {counts['corrupt']} damaged record(s) left alone (see `synthaug cache verify`)" if counts["corrupt"] else "")
        + f"; label names now {final}"
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser("cache", help="inspect, verify, export or preview a cache", description=__doc__)
    csub = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)

    q = csub.add_parser("inspect", help="counts, label histogram, bytes, encoding, provenance summary")
    q.add_argument("path", help="cache directory")
    q.add_argument("--json", action="store_true", help="print the full report as JSON")
    q.set_defaults(func=cmd_inspect)

    q = csub.add_parser("verify", help="read every record and check its CRC (exit 1 if any is corrupt)")
    q.add_argument("path", help="cache directory")
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    q.set_defaults(func=cmd_verify)

    q = csub.add_parser("export", help="write records as PNG files plus metadata.jsonl")
    q.add_argument("path", help="cache directory")
    q.add_argument("--out", required=True, help="folder to write into")
    q.add_argument("--limit", type=int, default=0, help="export at most N records (0: all); the newest unless --sample")
    q.add_argument("--sample", action="store_true", help="with --limit, pick records at random (seeded)")
    q.add_argument("--seed", type=int, default=0, help="seed of --sample")
    q.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    q.set_defaults(func=cmd_export)

    q = csub.add_parser(
        "relabel", help="give the records of one class your class name and label (e.g. a cache made before finetune --class-name)",
        description="Rewrite the label of every record of one class (one write transaction per batch; images untouched; "
        "each record's provenance keeps the change) and the cache's label names. Refused while a worker or generate "
        "writes the cache. Running it again after a crash finishes the records not yet done.",
    )
    q.add_argument("path", help="cache directory")
    q.add_argument("--class-name", required=True, help="your class's name, which the records will carry")
    q.add_argument("--label", type=int, default=None, help="the class's index in your classifier (default: its index in --classes/--classes-from, else 0)")
    add_class_arguments(q)
    q.add_argument("--from", dest="source", default=None, metavar="LABEL_OR_NAME", help="the class to relabel (default: the cache's only class)")
    q.set_defaults(func=cmd_relabel)

    q = csub.add_parser("grid", help="a PNG grid of sample images")
    q.add_argument("path", help="cache directory")
    q.add_argument("--out", default="grid.png", help="PNG file to write")
    q.add_argument("--n", type=int, default=64, help="number of images")
    q.add_argument("--cols", type=int, default=None, help="images per row (default: square)")
    q.add_argument("--last", action="store_true", help="show the newest N instead of a random sample")
    q.add_argument("--seed", type=int, default=0, help="seed of the random sample")
    q.set_defaults(func=cmd_grid)
