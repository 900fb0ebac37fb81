"""SyntheticCache: round trips, crash safety with a killed writer, forked readers, corruption,
eviction, map growth, bad input."""

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synthaug import CorruptRecordError, SyntheticCache
from synthaug.cache.codec import HEADER_SIZE
from tests.helpers.cache_writer import image_for
from tests.helpers.damage import flip_record_byte

REPO = Path(__file__).resolve().parents[1]


def _images(n, h=28, w=28, c=1, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


# ---------------------------------------------------------------------------------- round trip
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20)
)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
labels_st = st.one_of(st.integers(-(2**31), 2**31 - 1), st.lists(st.integers(0, 1000), min_size=0, max_size=6))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    c=st.sampled_from([1, 3]),
    n=st.integers(1, 4),
    encoding=st.sampled_from(["raw", "png", "jpeg", "webp"]),
    labels=st.data(),
    meta=st.dictionaries(st.text(min_size=1, max_size=12), json_values, max_size=6),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip(h, w, c, n, encoding, labels, meta, seed):
    images = np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)
    labs = [labels.draw(labels_st) for _ in range(n)]
    with tempfile.TemporaryDirectory() as d:
        with SyntheticCache(Path(d) / "c", encoding=encoding) as cache:
            seqs = cache.append(images, labs, [dict(meta, i=i) for i in range(n)])
            assert seqs == list(range(n))
            for i, seq in enumerate(seqs):
                rec = cache.get(seq)
                assert rec.image.shape == (h, w, c) and rec.image.dtype == np.uint8
                assert rec.image.flags.writeable
                if encoding in ("raw", "png"):
                    np.testing.assert_array_equal(rec.image, images[i])
                expected_label = tuple(labs[i]) if isinstance(labs[i], list) else labs[i]
                assert rec.label == expected_label
                assert rec.meta == dict(meta, i=i, created_at=rec.meta["created_at"])
            assert cache.verify()["corrupt"] == 0


@pytest.mark.parametrize("encoding", ["jpeg", "webp"])
@pytest.mark.parametrize("channels", [1, 3])
def test_lossy_encodings_keep_the_picture(tmp_path, encoding, channels):
    """JPEG/WebP are lossy, so pixels are compared with a tolerance, on smooth content (noise
    would be destroyed by any lossy codec): each channel stays in its place and close to the
    original, and the image is not shifted or flipped (either would put the red square and the
    gradients far from where they were)."""
    yy, xx = np.mgrid[0:48, 0:64]
    rgb = np.stack([xx * 255 // 63, yy * 255 // 47, np.full_like(xx, 200)], axis=-1).astype(np.uint8)
    rgb[10:20, 30:40] = (250, 10, 10)  # a red square: channel order and position show
    image = rgb if channels == 3 else rgb[:, :, :1]
    cache = SyntheticCache(tmp_path / "c", encoding=encoding)
    seq = cache.append(image[None], 0)[0]
    got = cache.get(seq).image.astype(int)
    assert got.shape == image.shape
    err = np.abs(got - image.astype(int))
    assert err.mean() < 3.0, err.mean()
    for ch in range(channels):
        assert np.abs(got[:, :, ch].mean() - image[:, :, ch].mean()) < 2.0
    assert err[12:18, 32:38].max() < 40  # inside the square, away from its compressed edges


def test_accepts_pil_torch_and_lists(tmp_path):
    import torch
    from PIL import Image

    cache = SyntheticCache(tmp_path / "c")
    gray = _images(3, 8, 8, 1)
    seqs = cache.append([Image.fromarray(im[:, :, 0]) for im in gray], [1, 2, 3], {"src": "pil"})
    np.testing.assert_array_equal(cache.get(seqs[1]).image, gray[1])
    chw = torch.from_numpy(np.ascontiguousarray(gray.transpose(0, 3, 1, 2)))
    seqs = cache.append(chw, 4)
    assert [cache.get(s).label for s in seqs] == [4, 4, 4]
    np.testing.assert_array_equal(cache.get(seqs[2]).image, gray[2])
    seqs = cache.append(gray[:, :, :, 0], np.array([7, 8, 9]))  # N×H×W numpy
    assert cache.get(seqs[0]).label == 7
    image, label, meta = cache.get(seqs[0])
    assert image.shape == (8, 8, 1) and label == 7 and "created_at" in meta


def test_iteration_stats_and_labels(tmp_path):
    cache = SyntheticCache(tmp_path / "c", label_names=["a", "b", "c"])
    cache.append(_images(5), [0, 1, 2, 1, 1], {"model": "m", "seed": 3})
    assert list(cache) == [0, 1, 2, 3, 4]
    assert 3 in cache and 9 not in cache
    assert cache.seqs(2, 4) == [2, 3]
    assert cache.labels(3) == {3: 1, 4: 1}
    stats = cache.stats()
    assert stats["count"] == 5 and stats["first_seq"] == 0 and stats["last_seq"] == 4 and stats["next_seq"] == 5
    assert stats["bytes"] > 5 * 28 * 28 and stats["encoding"] == "raw" and stats["format_version"] == 1
    assert cache.label_histogram() == {"0 (a)": 1, "1 (b)": 3, "2 (c)": 1}
    with pytest.raises(KeyError, match="seq=99"):
        cache.get(99)


def test_cursors_fresh_count_heartbeat(tmp_path):
    cache = SyntheticCache(tmp_path / "c")
    cache.append(_images(10), 0)
    assert cache.fresh_count() == 10
    cache.set_cursor("rank0", 4)
    cache.set_cursor("rank1", 7)
    assert cache.fresh_count() == 6 and cache.fresh_count("rank1") == 3
    assert set(cache.cursors()) == {"rank0", "rank1"}
    cache.remove_cursor("rank0")
    assert cache.fresh_count() == 3
    cache.write_heartbeat({"generated": 10})
    hb = cache.heartbeat()
    assert hb["generated"] == 10 and hb["pid"] == os.getpid()


def test_pickle_reopens_in_copy(tmp_path):
    import pickle

    cache = SyntheticCache(tmp_path / "c")
    cache.append(_images(2), [5, 6])
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.get(1).label == 6 and len(copy) == 2


def test_import_is_light():
    code = (
        "import sys, synthaug; synthaug.SyntheticCache; "
        "heavy = [m for m in ('torch', 'diffusers', 'peft', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---------------------------------------------------------------------------------- retention, growth
def test_eviction_under_max_items(tmp_path):
    cache = SyntheticCache(tmp_path / "c", max_items=10)
    for k in range(6):
        cache.append(_images(4, seed=k), k)
    assert len(cache) == 10 and cache.seqs() == list(range(14, 24))
    stats = cache.stats()
    assert stats["evicted"] == 14 and stats["appended"] == 24
    assert stats["bytes"] == sum(len_value for len_value in _value_sizes(cache))
    cache.append(_images(12, seed=9), 1)  # one append larger than the limit keeps its newest 10
    assert cache.seqs() == list(range(26, 36))
    # the limit is stored: a second writer obeys it without being told
    other = SyntheticCache(tmp_path / "c")
    assert other.max_items == 10
    assert cache.trim(keep_last=3) == 7 and cache.seqs() == [33, 34, 35]


def _value_sizes(cache):
    handle = cache._env()
    with handle.read() as txn:
        return [len(v) for _, v in txn.cursor(db=handle.dbs["records"])]


def test_map_grows_from_tiny_map_size(tmp_path):
    cache = SyntheticCache(tmp_path / "c", map_size=64 * 1024)
    first = cache.stats()["map_size"]
    big = _images(8, 64, 64, 3)  # ~100 KB per append: more than the whole initial map
    for k in range(10):
        cache.append(big, k)
    assert cache.stats()["map_size"] > first and len(cache) == 80
    np.testing.assert_array_equal(cache.get(79).image, big[7])
    reopened = SyntheticCache(tmp_path / "c", readonly=True)
    assert len(reopened) == 80 and reopened.verify()["ok"] == 80


# ---------------------------------------------------------------------------------- crash safety
def _start_writer(path, start_batch, map_size, encoding, batch_size=8, size=48, pause=0.0):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.cache_writer", str(path), str(start_batch), str(batch_size), str(size), str(map_size), encoding, str(pause)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def _check_all_records(cache, batch_size, size):
    """Every stored record matches its (batch, index); batches are whole and contiguous."""
    per_batch = {}
    for rec in cache.get_many(cache.seqs()):
        b, i = rec.meta["batch"], rec.meta["index"]
        np.testing.assert_array_equal(rec.image, image_for(b, i, size))
        assert rec.label == b % 10
        per_batch.setdefault(b, []).append(i)
    for b, idx in per_batch.items():
        assert sorted(idx) == list(range(batch_size)), f"batch {b} is partial: {sorted(idx)}"
    if per_batch:
        assert sorted(per_batch) == list(range(max(per_batch) + 1))
    return max(per_batch, default=-1)


def test_writer_killed_with_sigkill_never_leaves_partial_records(tmp_path):
    path = tmp_path / "c"
    rng = random.Random(1234)
    batch_size, size = 8, 48
    next_batch = 0
    kills = 0
    grew = False
    map_size = 128 * 1024  # small: the map grows several times during the series
    while kills < 22:
        encoding = "raw" if kills % 2 == 0 else "png"
        proc = _start_writer(path, next_batch, map_size, encoding, batch_size, size)
        time.sleep(rng.uniform(0.0, 0.35))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        kills += 1
        committed = [int(line.split()[1]) for line in out.splitlines() if line.startswith("committed")]
        cache = SyntheticCache(path)
        report = cache.verify()
        assert report["corrupt"] == 0 and report["problems"] == [], report
        last_batch = _check_all_records(cache, batch_size, size)
        if committed:
            assert last_batch >= committed[-1], "a committed batch was lost"
        assert cache.stats()["next_seq"] == (last_batch + 1) * batch_size
        grew = grew or cache.stats()["map_size"] > map_size
        cache.close()
        next_batch = last_batch + 1
    assert next_batch > 20, "the writer barely wrote; the kills did not exercise appends"
    assert grew, "the map never grew during the kill series"


# ---------------------------------------------------------------------------------- concurrent readers
class _ReadDataset:
    """Reads a prefilled record and the newest record per item, checking both byte for byte."""

    def __init__(self, cache, n_prefilled, size):
        self.cache, self.n, self.size = cache, n_prefilled, size

    def __len__(self):
        return 400

    def __getitem__(self, i):
        rec = self.cache.get(i % self.n)
        ok = np.array_equal(rec.image, image_for(rec.meta["batch"], rec.meta["index"], self.size))
        last = self.cache.stats()["last_seq"]
        newest = self.cache.get(last)
        ok = ok and np.array_equal(newest.image, image_for(newest.meta["batch"], newest.meta["index"], self.size))
        return int(ok), int(last), os.getpid()


@pytest.mark.parametrize("context,workers", [("fork", 4), ("spawn", 2)])
def test_dataloader_workers_read_while_writer_appends(tmp_path, context, workers):
    import torch

    path = tmp_path / "c"
    batch_size, size = 8, 48
    writer = _start_writer(path, 0, 1 << 20, "raw", batch_size, size, pause=0.02)
    threading.Thread(target=writer.stdout.read, daemon=True).start()  # keep its pipe from filling
    try:
        while SyntheticCache(path).stats()["next_seq"] < 8 * batch_size:
            time.sleep(0.05)
        cache = SyntheticCache(path)  # opened in this process before the workers fork
        ds = _ReadDataset(cache, 8 * batch_size, size)
        loader = torch.utils.data.DataLoader(ds, batch_size=10, num_workers=workers, multiprocessing_context=context)
        oks, lasts, pids = [], [], set()
        for ok, last, pid in loader:
            oks += ok.tolist()
            lasts += last.tolist()
            pids |= set(pid.tolist())
            cache.get(int(last[-1]))  # the parent keeps reading between batches
        assert all(oks) and len(oks) == 400
        assert len(pids) == workers and os.getpid() not in pids
        assert max(lasts) > min(lasts), "the writer appended nothing while the workers read"
        cache.append(_images(1, size, size, 3), 0, {"batch": -1, "index": 0})  # parent still writes after fork
    finally:
        writer.kill()
        writer.wait()
    assert SyntheticCache(path).verify()["corrupt"] == 0


def test_fork_waits_for_open_transactions(tmp_path):
    """A transaction open in another thread at fork would lose its reader slot in the child's
    cleanup; the fork guard delays fork until it ends."""
    cache = SyntheticCache(tmp_path / "c")
    cache.append(_images(2), 0)
    in_txn, done = threading.Event(), threading.Event()

    def hold():
        with cache._env().read() as txn:
            in_txn.set()
            time.sleep(0.5)
            txn.get(b"x")
            done.set()

    t = threading.Thread(target=hold)
    t.start()
    in_txn.wait()
    pid = os.fork()
    if pid == 0:  # child: a fresh environment of its own works
        try:
            os._exit(0 if cache.get(1).label == 0 else 1)
        except BaseException:
            os._exit(2)
    assert done.is_set(), "fork happened while a transaction was open"
    _, status = os.waitpid(pid, 0)
    t.join()
    assert os.WEXITSTATUS(status) == 0
    assert cache.get(0).label == 0


# ---------------------------------------------------------------------------------- corruption
_flip = flip_record_byte


def test_corruption_is_reported_and_named(tmp_path):
    path = tmp_path / "c"
    cache = SyntheticCache(path)
    cache.append(_images(10), list(range(10)))
    cache.close()
    _flip(path, 3, HEADER_SIZE + 4 + 30)  # a byte inside the metadata/image area
    _flip(path, 7, 10)  # a header byte (height)
    cache = SyntheticCache(path)
    report = cache.verify()
    assert report["corrupt"] == 2 and report["corrupt_seqs"] == [3, 7] and report["ok"] == 8
    with pytest.raises(CorruptRecordError, match=r"seq=3\b") as err:
        cache.get(3)
    assert err.value.seq == 3
    with pytest.raises(CorruptRecordError, match=r"seq=7\b"):
        cache.get_many([6, 7])
    assert cache.get(4).label == 4 and cache.get(8).label == 8

    from synthaug.cli import main

    assert main(["cache", "verify", str(path), "--json"]) == 1


# ---------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_with_clear_errors(tmp_path):
    cache = SyntheticCache(tmp_path / "c")
    with pytest.raises(ValueError, match="uint8"):
        cache.append(np.zeros((2, 8, 8, 1), np.float32), 0)
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        cache.append(_images(2), [0, 1, 2])
    with pytest.raises(ValueError, match="2 images but 1 meta"):
        cache.append(_images(2), 0, [{}])
    with pytest.raises(ValueError, match="C = 1 or 3"):
        cache.append(np.zeros((1, 8, 8, 2), np.uint8), 0)
    with pytest.raises(ValueError, match="'bad'"):
        cache.append(_images(1), 0, {"bad": object()})
    with pytest.raises(ValueError, match="label 0"):
        cache.append(_images(1), ["x"])
    cache.append(_images(1), 0)
    with pytest.raises(ValueError, match="another image size"):
        cache.append(_images(1, 16, 16), 0)
    assert len(cache) == 1  # nothing of the refused appends was written
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        SyntheticCache(afile)
    with pytest.raises(FileNotFoundError, match="no synthetic cache"):
        SyntheticCache(tmp_path / "missing", readonly=True)
    (tmp_path / "notcache").mkdir()
    (tmp_path / "notcache" / "x.txt").write_text("x")
    from synthaug.errors import CacheFormatError

    with pytest.raises(CacheFormatError, match="holds no cache"):
        SyntheticCache(tmp_path / "notcache")
    with pytest.raises(ValueError, match="unknown image encoding"):
        SyntheticCache(tmp_path / "c2", encoding="gif")
    ro = SyntheticCache(tmp_path / "c", readonly=True)
    with pytest.raises(PermissionError, match="read-only"):
        ro.append(_images(1), 0)


def test_reopened_copy_does_not_reapply_constructor_settings(tmp_path):
    import pickle

    first = SyntheticCache(tmp_path / "c", max_items=100, label_names=["a", "b"])
    first.append(_images(2), 0)
    copy = pickle.loads(pickle.dumps(first))  # what a DataLoader worker or spawned process gets
    SyntheticCache(tmp_path / "c", max_items=50)  # the limit changed meanwhile
    assert copy.get(1).label == 0  # the copy opens its environment here
    assert SyntheticCache(tmp_path / "c").max_items == 50, "a reopened copy restored its old max_items"


def test_reader_waits_for_a_cache_being_created(tmp_path):
    path = tmp_path / "c"
    path.mkdir()
    lmdb.open(str(path), max_dbs=4).close()  # the file exists, the creator has not set it up yet

    def create_later():
        time.sleep(0.4)
        SyntheticCache(path).append(_images(1), 3)

    t = threading.Thread(target=create_later)
    t.start()
    reader = SyntheticCache(path, readonly=True)  # waits instead of failing
    t.join()
    deadline = time.time() + 5
    while len(reader) == 0 and time.time() < deadline:
        time.sleep(0.05)
    assert reader.get(0).label == 3


def test_cli_reports_a_damaged_lmdb_file_in_one_line(tmp_path, capsys):
    from synthaug.cli import main

    path = tmp_path / "c"
    SyntheticCache(path).append(_images(2), 0)
    import synthaug.cache.lmdb_env as env_mod

    for handle in list(env_mod._ENVS.values()):  # close this process's handle before damaging the file
        if handle.path == os.path.realpath(path):
            env_mod._ENVS.pop(handle.path).env.close()
    (path / "data.mdb").write_bytes(b"\0" * 100 + b"not an lmdb file" * 500)
    assert main(["cache", "inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "LMDB" in err[0] and "Traceback" not in err[0], err


def test_cursors_of_exited_consumers_do_not_pin_the_fresh_count(tmp_path):
    path = tmp_path / "c"
    cache = SyntheticCache(path)
    cache.append(_images(10), 0)
    code = f"from synthaug import SyntheticCache; SyntheticCache({str(path)!r}).set_cursor('crashed-run', 2)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    cache.set_cursor("live", 7)
    assert set(cache.cursors()) == {"live"}
    assert set(cache.cursors(include_dead=True)) == {"live", "crashed-run"}
    assert cache.fresh_count() == 3  # from the live consumer only, not pinned at 8 by the dead one
    cache.remove_cursor("live")
    assert cache.fresh_count() == 10


def test_scan_labels_skips_damaged_records_and_checks_crc(tmp_path):
    path = tmp_path / "c"
    cache = SyntheticCache(path)
    cache.append(_images(6), [0, 1, 2, 3, 4, 5])
    cache.close()
    _flip(path, 2, HEADER_SIZE)  # a label byte: only the CRC can tell
    cache = SyntheticCache(path)
    labels, corrupt = cache.scan_labels()
    assert corrupt == [2] and labels == {0: 0, 1: 1, 3: 3, 4: 4, 5: 5}
    with pytest.raises(CorruptRecordError, match=r"seq=2\b"):
        cache.labels()
    assert cache.first_seq() == 0


def test_cli_inspect_export_grid_and_env(tmp_path, capsys):
    """The cache commands on a healthy cache: what `inspect` reports, the files `export` and
    `grid` write (PNG pixels equal to the records), and `synthaug env`'s versions."""
    from PIL import Image

    from synthaug.cli import main

    path = tmp_path / "c"
    cache = SyntheticCache(path, label_names=["cat", "dog", "shirt"])
    images = _images(6, 8, 8, 3, seed=4)
    metas = [{"model": "builtin:m", "seed": 10 + i, "prompt": "a photo of sks shirt", "num_inference_steps": 4} for i in range(6)]
    cache.append(images, [2, 2, 2, 2, 0, 1], metas)
    cache.close()

    assert main(["cache", "inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stats"]["count"] == 6 and report["stats"]["encoding"] == "raw"
    assert report["label_histogram"] == {"0 (cat)": 1, "1 (dog)": 1, "2 (shirt)": 4}
    prov = report["provenance"]
    assert prov["model"]["top"] == [["builtin:m", 6]] and prov["seed"] == {"min": 10, "max": 15, "distinct": 6}
    assert main(["cache", "inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "records      6" in text and "8×8×3" in text and "shirt" in text

    out = tmp_path / "png"
    assert main(["cache", "export", str(path), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["seq"] for r in rows] == list(range(6)) and rows[4]["label"] == 0 and rows[0]["meta"]["seed"] == 10
    for r in rows:
        np.testing.assert_array_equal(np.asarray(Image.open(out / r["file_name"])), images[r["seq"]])
    assert main(["cache", "export", str(path), "--out", str(out)]) == 2  # not empty: refused
    assert "not empty" in capsys.readouterr().err

    grid = tmp_path / "grid.png"
    assert main(["cache", "grid", str(path), "--out", str(grid), "--n", "4", "--cols", "2"]) == 0
    im = np.asarray(Image.open(grid))
    assert im.ndim == 3 and im.shape[0] >= 16 and im.shape[1] >= 16 and im.std() > 10

    assert main(["env"]) == 0
    env_text = capsys.readouterr().out
    for name in ("python", "torch", "torchvision", "diffusers", "peft", "lmdb", "cuda", "xformers"):
        assert name in env_text.lower(), name


def test_soft_labels_are_stored_validated_and_returned_exactly(tmp_path):
    from synthaug.cache.codec import SoftLabel

    cache = SyntheticCache(tmp_path / "c.lmdb", label_names=[f"c{i}" for i in range(10)])
    images = np.zeros((3, 4, 4, 1), np.uint8)
    seqs = cache.append(images, [{6: 0.7, 2: 0.3}, 5, {"c1": 0.25, "c3": 0.75}], {})
    got = [cache.get(q).label for q in seqs]
    assert got[0] == {6: 0.7, 2: 0.3} and isinstance(got[0], SoftLabel) and got[0].target == 6
    assert got[1] == 5 and got[2] == {1: 0.25, 3: 0.75} and got[2].target == 1
    assert cache.scan_labels()[0] == dict(zip(seqs, got)) and cache.verify()["corrupt"] == 0
    assert cache.label_histogram() == {"1 (c1)": 1, "5 (c5)": 1, "6 (c6)": 1}  # filed under the class made for
    for bad, message in [({6: 0.7, 2: 0.2}, "weights sum to 0.9, not 1"), ({6: 1.5, 2: -0.5}, "must be a finite number > 0"),
                         ({"shirt": 1.0}, "names class 'shirt', which cannot be resolved"), ({}, "at least one class")]:
        with pytest.raises(ValueError, match=message):
            cache.append(images[:1], [bad])
    assert len(cache) == 3  # nothing of a refused append
    with pytest.raises(TypeError, match="immutable"):
        got[0][6] = 1.0


def test_seed_reservations_never_hand_out_a_seed_twice_and_follow_the_sequence(tmp_path):
    cache = SyntheticCache(tmp_path / "c.lmdb")
    cache.append(np.zeros((3, 4, 4, 1), np.uint8), 0)  # next_seq 3
    assert cache.seed_counter(100) is None  # no reservation yet: records carry seed + seq
    assert cache.reserve_seeds(100, 5) == 103 and cache.seed_counter(100) == 108  # starts at seed + next_seq
    assert cache.reserve_seeds(100, 2) == 108  # a lost batch's seeds are not handed out again
    cache.append(np.zeros((10, 4, 4, 1), np.uint8), 0)  # next_seq 13: seed + next_seq = 113 > counter 110
    assert cache.reserve_seeds(100, 1) == 113
    assert cache.seed_counter(10**9 + 7) is None and cache.reserve_seeds(10**9 + 7, 4) == 10**9 + 7 + 13  # per seed block
    cache.close()
    reader = SyntheticCache(tmp_path / "c.lmdb", readonly=True)
    assert reader.seed_counter(100) == 114
    with pytest.raises(PermissionError, match="read-only"):
        reader.reserve_seeds(100, 1)
