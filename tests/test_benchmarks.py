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


def test_bench_help_and_unknown_benchmark(capsys):
    from synthaug.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("loader", "cache", "generate", "overlap", "ratio", "--quick"):
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
