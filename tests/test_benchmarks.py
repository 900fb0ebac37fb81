"""``synthaug bench``: every benchmark runs in its ``--quick`` form and writes its JSON (smoke
tests: no timing is asserted); the ratio benchmark's counts are checked, since they do not depend
on the machine; ``RatioBatchSampler.freshness``."""

import json
from pathlib import Path

import numpy as np
import pytest

from synthaug.data.fashion_mnist import find_fashion_mnist

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bench(capsys, *args):
    from synthaug.cli import main

    assert main(["bench", *args]) == 0
    return capsys.readouterr().out


def test_ratio_benchmark_our_sampler_is_exact_on_every_rank(tmp_path, capsys):
    out = _bench(capsys, "ratio", "--quick", "--out", str(tmp_path))
    assert "| ratio_batch_sampler | 0.25 | 1 |" in out
    result = json.loads((tmp_path / "ratio_quick.json").read_text())
    assert result["device"] and result["env"] and result["settings"]["world"] == 2
    rows = result["rows"]
    ours = [r for r in rows if r["method"] == "ratio_batch_sampler"]
    assert {(r["ratio"], r["rank"]) for r in ours} == {(q, k) for q in (0.1, 0.25, 0.5) for k in (0, 1)}
    for r in ours:
        # rule 2: every batch within one item of r times its size; over the epoch (one here) floor(q·n)
        # synthetic items after n batches, and the short last batch rounds once more: under 2 items off
        assert r["within_one_item"] == 1.0 and abs(r["total_error_items"]) < 2
    for method in ("coin_flip", "weighted_random_sampler"):
        spread = [r["std_share"] for r in rows if r["method"] == method and r["ratio"] == 0.25]
        assert min(spread) > 0.02  # Binomial(64, 0.25): sd 0.054 of a batch
    assert (tmp_path / "ratio_histogram_quick.png").stat().st_size > 10_000


@pytest.mark.skipif(find_fashion_mnist() is None, reason="Fashion-MNIST is not installed")
def test_overlap_benchmark_quick(tmp_path, capsys):
    out = _bench(capsys, "overlap", "--quick", "--out", str(tmp_path))
    assert "rule: the trainer wants" in out
    result = json.loads((tmp_path / "overlap_quick.json").read_text())
    runs = {r["run"]: r for r in result["rows"]}
    assert list(runs) == ["generate", "real_only", "pregenerate", "on_the_fly"]
    assert runs["generate"]["generated"] >= 16 and runs["generate"]["generator_images_per_s"] > 0
    for name in ("pregenerate", "on_the_fly"):
        r = runs[name]
        assert r["synthetic_draws"] == 20 * 16  # 20 steps x 0.25 x 64
        # every distinct image served was generated in that run's cache (16 pre-generated, or what the worker made)
        assert 1 <= r["distinct_synthetic"] <= r["generated"] and r["synthetic_draws"] >= r["distinct_synthetic"]
    assert runs["on_the_fly"]["waited_s"] > 0  # the cache starts empty: the first batch waits for the worker
    assert result["rule"]["max_reuse_for_no_wait"] >= 0


def test_overlap_benchmark_rgb256_quick(tmp_path, capsys):
    """The 256 px RGB setting: JPEGs in an ImageFolder, ResNet-18 with the ImageNet stem, a
    Stable-Diffusion pipeline (tiny, random weights, loaded with from_pretrained) in the worker."""
    out = _bench(capsys, "overlap", "--setting", "rgb256", "--quick", "--out", str(tmp_path))
    assert "overlap (rgb256): resnet18 at 256 px" in out
    result = json.loads((tmp_path / "overlap_rgb256_quick.json").read_text())
    settings = result["settings"]
    assert (settings["setting"], settings["model"], settings["image_size"], settings["batch_size"]) == ("rgb256", "resnet18", 256, 8)
    assert settings["generation"]["height"] == settings["generation"]["width"] == 256
    assert settings["real_train_images"] == 20  # 16 china crops + 4 flower crops
    runs = {r["run"]: r for r in result["rows"]}
    assert list(runs) == ["generate", "real_only", "pregenerate", "on_the_fly"]
    assert runs["generate"]["generated"] >= 2
    for name in ("pregenerate", "on_the_fly"):
        r = runs[name]
        assert r["synthetic_draws"] == 2 * 2  # 2 steps x 0.25 x 8
        assert 1 <= r["distinct_synthetic"] <= r["generated"]


def test_cache_benchmark_quick_through_the_cli(tmp_path, capsys):
    out = _bench(capsys, "cache", "--quick", "--out", str(tmp_path))
    assert "get_many / bare" in out
    rows = json.loads((tmp_path / "cache_quick.json").read_text())["rows"]
    assert {r["encoding"] for r in rows} == {"raw", "png", "jpeg", "webp"}
    raw = [r for r in rows if r["encoding"] == "raw"]
    assert len(raw) == 2 and all(r["PNG folder (PIL) rec/s"] > 0 and r["read_batch / bare"] > 0 for r in raw)


@pytest.mark.skipif(find_fashion_mnist() is None, reason="Fashion-MNIST is not installed")
def test_sampler_benchmark_quick_through_the_cli(tmp_path, capsys):
    """`synthaug bench sampler --quick`: two samplers of the embedded model at 4 steps, timed and
    judged by a (briefly trained) reference CNN; no figures are asserted."""
    out = _bench(capsys, "sampler", "--quick", "--out", str(tmp_path))
    assert "recommended:" in out and "| unipc 4 g2 b16 |" in out
    result = json.loads((tmp_path / "sampler_quick.json").read_text())
    assert result["device"] and result["threads"] == 1
    rows = {r["config"]: r for r in result["rows"]}
    assert list(rows) == ["dpm++ 4 g2 b16", "unipc 4 g2 b16"] and rows["dpm++ 4 g2 b16"]["vs default"] == 1.0
    for r in rows.values():
        assert r["images/s"] > 0 and r["n_images"] == 18 and 0 <= r["accuracy"] <= 1 and r["± se"] >= 0
    assert result["recommended"]["config"] in rows


def test_bench_help_and_unknown_benchmark(capsys):
    from synthaug.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("loader", "cache", "generate", "overlap", "ratio", "crash", "soak", "--quick"):
        assert name in text
    with pytest.raises(SystemExit):
        main(["bench", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_freshness_report(tmp_path):
    """Ten records, 80 real items at r = 0.5 in batches of 8: 20 batches, 80 synthetic draws, 10
    fresh and 70 reused, each record served eight times;
    with max_reuse=1 each record serves twice, then the sampler waits (and times out here)."""
    from synthaug import MixedDataset, RatioBatchSampler, SyntheticCache
    from synthaug.errors import SyntheticExhaustedError

    class Real:
        targets = np.zeros(80, dtype=np.int64)

        def __len__(self):
            return 80

        def __getitem__(self, i):
            return np.zeros((4, 4), np.uint8), 0

    cache = SyntheticCache(tmp_path / "c.lmdb")
    cache.append(np.zeros((10, 4, 4, 1), np.uint8), 0, {"source": "test"})
    mixed = MixedDataset(Real(), cache)
    sampler = RatioBatchSampler(mixed, batch_size=8, synthetic_ratio=0.5, seed=0, consumer="a")
    batches = list(sampler)
    assert len(batches) == 20
    f = sampler.freshness()
    assert (f["served"], f["fresh"], f["reused"], f["distinct_served"]) == (80, 10, 70, 10)
    assert f["fresh_share"] == 0.125 and f["mean_serves_per_image"] == 8.0
    assert f["serve_histogram"] == {8: 10} and f["max_reuse"] is None
    capped = RatioBatchSampler(mixed, batch_size=8, synthetic_ratio=0.5, seed=0, consumer="b", max_reuse=1, wait_timeout=0.5)
    with pytest.raises(SyntheticExhaustedError):
        list(capped)
    g = capped.freshness()
    assert g["served"] == 20 and g["fresh"] == 10 and g["max_reuse"] == 1 and g["waited_s"] >= 0.5


def test_crash_campaign_quick_kills_a_real_writer_20_times(tmp_path, capsys):
    """`synthaug bench crash --quick`: 20 SIGKILLs of a real writer process while two reader
    processes read; nothing committed is lost or torn, and the campaign really exercised what it
    claims (kills inside appends, map growth from 64 KiB, eviction, reads)."""
    out = _bench(capsys, "crash", "--quick", "--no-progress", "--out", str(tmp_path))
    assert "every check passed" in out and "| committed records lost | 0 | 0 |" in out
    result = json.loads((tmp_path / "crash_quick.json").read_text())
    assert result["ok"] is True and result["device"] and result["settings"]["kills"] == 20
    assert result["bad"] and all(v == 0 for v in result["bad"].values()), result["problems"]
    t = result["totals"]
    assert t["kills"] == 20
    assert t["kills_in_append"] >= 1, result["landings"]  # the writer's last line was "begin": killed mid-append
    assert t["appends_committed"] >= 40 and t["records_committed"] > t["appends_committed"]
    assert t["map_growths"] >= 4 and all(v > 4 * t["map_size_start"] for v in t["map_size_end"].values())
    assert t["evictions"] > 0 and t["appends_evicting"] >= t["appends_committed"] // 3
    assert t["reader_reads"] >= 200 and len(result["readers"]) == 2
    assert {r["lane"] for r in result["lanes"]} == {"small", "large"}
    assert "workdir" not in result  # the temp caches were removed after a clean run


def test_crash_checks_catch_a_lost_and_a_torn_record(tmp_path):
    """The campaign's checker is not vacuous: after a few real kills, a reported record deleted
    behind the cache's back counts as lost, and a flipped byte in a record as torn."""
    import lmdb

    from synthaug.benchmarks.crash import _Campaign, default_lanes

    lanes = default_lanes(tmp_path, seed=3)
    camp = _Campaign(lanes, tmp_path, seed=3, n_readers=0)
    small = next(lane for lane in lanes if lane.name == "small")
    for k in range(30):  # until the writer has reported records in the small cache (a few kills; more on a loaded machine)
        camp.kill_once(k)
        if sum(b - a + 1 for a, b in camp.ledgers["small"].reported) >= 2:
            break
    assert sum(camp.bad.values()) == 0, camp.problems
    last = max(b for a, b in camp.ledgers["small"].reported)
    env = lmdb.open(small.path, max_dbs=4, map_size=1 << 30)
    rec_db = env.open_db(b"records")
    with env.begin(write=True) as txn:
        assert txn.delete(last.to_bytes(8, "big"), db=rec_db)  # a committed record vanishes
        cur = txn.cursor(db=rec_db)
        assert cur.first()
        value = bytearray(cur.value())
        value[-1] ^= 0x01  # and one pixel byte of the oldest record flips
        txn.put(cur.key(), bytes(value), db=rec_db)
    env.close()
    camp.check_lane(small)
    assert camp.bad["committed_records_lost"] >= 1 and camp.bad["torn_or_corrupt_records"] >= 1, camp.problems


def test_soak_quick_two_prefetching_trainers_beside_an_evicting_worker(tmp_path, capsys):
    """`synthaug bench soak --quick`: 60 s of a worker keeping a 96-record cache turning over
    while two training processes (4 DataLoader workers, prefetch 4 each) read it; every item the
    training loops get is the one their sampler drew."""
    out = _bench(capsys, "soak", "--quick", "--no-progress", "--out", str(tmp_path))
    assert "every check passed" in out
    result = json.loads((tmp_path / "soak_quick.json").read_text())
    t = result["totals"]
    assert result["ok"] is True and all(t[k] == 0 for k in ("wrong_items", "errors", "replaced", "missing", "evicted_unseen"))
    assert t["synthetic_items"] >= 2000 and t["real_items"] > t["synthetic_items"]  # both trainers did read
    assert t["evicted"] >= 1000 and t["final_count"] <= 96  # eviction never rested, within the limit
    assert {r["name"] for r in result["trainers"]} == {"trainer0", "trainer1"} and all(r["batches"] > 0 for r in result["trainers"])


def test_soak_check_tells_a_wrong_record_or_label_from_the_right_one(tmp_path):
    """The soak's per-item check is not vacuous."""
    import numpy as np

    from synthaug import MixedDataset, SyntheticCache
    from synthaug.benchmarks.soak import RealStandIn, StampGenerator, expected_image, item_is_right
    from synthaug.mixing import SyntheticIndex

    cache = SyntheticCache(tmp_path / "c", label_names=StampGenerator.label_names)
    batch = StampGenerator().generate(20, 0)
    cache.append(batch.images, batch.labels, batch.meta)
    mixed = MixedDataset(RealStandIn(30), cache)
    right = SyntheticIndex(13, 3)
    assert item_is_right(right, expected_image(13), 3, mixed)
    assert not item_is_right(right, expected_image(12), 3, mixed)  # another record
    assert not item_is_right(right, expected_image(13), 2, mixed)  # another label
    torn = expected_image(13).copy()
    torn[20, 20] ^= 1
    assert not item_is_right(right, torn, 3, mixed)  # one byte off
    image, target = mixed.real_dataset[7]
    assert item_is_right(7, image, target, mixed) and not item_is_right(8, image, target, mixed)
