"""`synthaug quality`: PSNR/SSIM/LPIPS, memorization and diversity on constructed and real cases;
with --fidelity, how a classifier trained on real images sees the synthetic images (fidelity,
confusion, CAS), on real Fashion-MNIST images."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from synthaug.cache.store import SyntheticCache

from synthaug.evaluation import quality as q
from synthaug.evaluation.quality import (
    common_representation,
    image_quality_report,
    metrics,
    pixel_distance,
    psnr,
    ssim,
    train_images_from_adapter,
    write_quality_report,
)

REPO = Path(__file__).resolve().parents[1]
SHIRT, TSHIRT, PULLOVER = 6, 0, 2


@pytest.fixture(scope="module")
def fmnist_test():
    from synthaug.data.fashion_mnist import FashionMNIST

    ds = FashionMNIST(train=False)
    return ds.data.numpy(), ds.targets.numpy()


@pytest.fixture(scope="module")
def shirts(fmnist_test):
    x, y = fmnist_test
    return x[y == SHIRT][:60]


@pytest.fixture
def no_hub_weights(tmp_path, monkeypatch):
    """An empty torch hub dir, so LPIPS's backbone is absent whatever this machine holds."""
    import torch

    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


def _strict_json(path):
    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token} in {path}")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


# ------------------------------------------------------------------ the constructed cases
def test_copies_of_training_images_are_memorized(shirts, tmp_path, no_hub_weights):
    train = shirts[:30]
    report = image_quality_report(train.copy(), shirts, train_images=train)
    mem = report["memorization"]
    assert report["memorization_reference"] == "train"
    assert mem["rate"] == 1.0 and mem["n_memorized"] == 30
    assert mem["threshold"] > 0 and max(mem["nearest_distance"]) == 0.0
    assert mem["nearest_index"] == list(range(30))
    assert all(v == float("inf") for v in report["psnr"]["per_image"])
    assert report["psnr"]["summary"]["n_infinite"] == 30 and report["psnr"]["summary"]["mean"] is None
    assert report["ssim"]["per_image"] == [1.0] * 30
    assert report["nearest_real"]["n_identical"] == 30
    paths = write_quality_report(report, tmp_path / "out", synthetic=train, real=shirts, train_images=train)
    doc = _strict_json(paths["json"])  # valid JSON: inf written as null, no Infinity/NaN tokens
    assert doc["psnr"]["per_image"] == [None] * 30 and doc["memorization"]["rate"] == 1.0
    for key in ("histograms", "pairs"):
        assert Path(paths[key]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_uniform_noise_is_not_memorized(shirts, no_hub_weights):
    noise = np.random.default_rng(0).integers(0, 256, (100, 28, 28), dtype=np.uint8)
    report = image_quality_report(noise, shirts, train_images=shirts[:30])
    assert report["memorization"]["rate"] == 0.0
    assert report["ssim"]["summary"]["mean"] < 0.05 and report["ssim"]["summary"]["max"] < 0.2
    assert report["psnr"]["summary"]["max"] < 12.0  # noise is far from every shirt


def test_identical_images_have_zero_diversity(shirts, no_hub_weights):
    same = np.repeat(shirts[:1], 20, axis=0)
    for max_pairs in (100_000, 50):  # all 190 pairs, and a sample of 50
        div = image_quality_report(same, shirts, max_pairs=max_pairs, lpips=False)["diversity"]
        assert div["synthetic"]["mean"] == 0.0 and div["ratio"] == 0.0
        assert div["synthetic"]["all_pairs"] is (max_pairs >= 190)
    bw = np.stack([np.zeros((16, 16), np.uint8), np.full((16, 16), 255, np.uint8)])
    div = image_quality_report(bw, bw, lpips=False)["diversity"]
    assert div["synthetic"]["mean"] == 1.0 and div["real"]["n_pairs"] == 1 and div["ratio"] == 1.0


def test_memorization_threshold_is_strict_and_ignores_duplicate_reals():
    a = np.zeros((16, 16), np.uint8)
    b = a.copy()
    b[0, 0] = 1
    c = a.copy()
    c[5, 5] = 1  # as far from `a` as `b` is: exactly tau
    real = np.stack([a, b, a])  # the duplicate `a` must not make tau 0
    report = image_quality_report(np.stack([c, a]), real, lpips=False)
    mem = report["memorization"]
    assert mem["threshold"] == pytest.approx(1 / 255 / 16) and mem["closest_distinct_real_pair"] == [0, 1]
    assert report["memorization_reference"] == "real" and report["inputs"]["real"]["distinct"] == 2
    assert mem["nearest_distance"][0] == mem["threshold"]  # d == tau: not memorized (d < tau is the rule)
    assert mem["n_memorized"] == 1 and mem["rate"] == 0.5
    with pytest.raises(ValueError, match="fewer than two distinct"):
        image_quality_report(np.stack([c]), np.stack([a, a]), lpips=False)
    given = image_quality_report(np.stack([c]), np.stack([a, a]), lpips=False, threshold=0.01)["memorization"]
    assert given["threshold_source"] == "given" and given["rate"] == 1.0


# ------------------------------------------------------------------ the metrics themselves
def test_ssim_matches_torchmetrics_and_known_values(shirts):
    tm = pytest.importorskip("torchmetrics.functional.image")
    import torch

    rng = np.random.default_rng(1)
    rgb_a = rng.integers(0, 256, (4, 32, 40, 3), dtype=np.uint8)
    rgb_b = np.clip(rgb_a.astype(int) + rng.integers(-40, 41, rgb_a.shape), 0, 255).astype(np.uint8)
    gray_a, gray_b = shirts[:8, :, :, None], shirts[8:16, :, :, None]
    for a, b in ((rgb_a, rgb_b), (gray_a, gray_b)):
        ours = ssim(a, b)
        # torchmetrics' SSIM map, averaged over the valid region (it averages over its
        # reflect-padded full map, which Wang et al.'s 'valid' filtering leaves out)
        _, full = tm.structural_similarity_index_measure(
            torch.from_numpy(a).permute(0, 3, 1, 2).double(), torch.from_numpy(b).permute(0, 3, 1, 2).double(),
            data_range=255.0, reduction="none", return_full_image=True,
        )
        ref = full[:, :, 5:-5, 5:-5].mean(dim=(1, 2, 3)).numpy()
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9)
    assert ssim(shirts[0], shirts[0]) == 1.0
    assert ssim(shirts[0], shirts[1]) == pytest.approx(ssim(shirts[1], shirts[0]), abs=1e-12)
    # flat images: variances are 0, so SSIM = (2·a·b + C1) / (a² + b² + C1)
    c1 = (0.01 * 255) ** 2
    flat = ssim(np.full((12, 12), 100, np.uint8), np.full((12, 12), 50, np.uint8))
    assert flat == pytest.approx((2 * 100 * 50 + c1) / (100**2 + 50**2 + c1), abs=1e-12)
    with pytest.raises(ValueError, match="11×11"):
        ssim(np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8))


def test_psnr_and_distance_known_answers():
    a = np.zeros((28, 28), np.uint8)
    b = a.copy()
    b[3, 4] = 1
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 * 784))
    assert psnr(a, a) == float("inf")
    assert pixel_distance(a, np.full_like(a, 255)) == 1.0
    assert psnr(np.stack([a, a])[..., None], np.stack([a, b])[..., None]).shape == (2,)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, np.zeros((27, 28), np.uint8))


def test_blocked_nearest_search_is_exact(monkeypatch):
    """Force many tiny blocks: indices and squared distances must equal a brute-force search."""
    monkeypatch.setattr(metrics, "_MAX_BLOCK_ROWS", 7)
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (23, 12, 12, 1), dtype=np.uint8)
    b = rng.integers(0, 256, (31, 12, 12, 1), dtype=np.uint8)
    diff = a.reshape(23, 1, -1).astype(np.int64) - b.reshape(1, 31, -1)
    brute = (diff**2).sum(-1)
    idx, ssd = metrics.nearest_images(a, b)
    assert idx.tolist() == brute.argmin(1).tolist() and ssd.tolist() == brute.min(1).tolist()
    self_diff = b.reshape(31, 1, -1).astype(np.int64) - b.reshape(1, 31, -1)
    self_brute = (self_diff**2).sum(-1) + np.diag([np.iinfo(np.int64).max // 2] * 31)
    idx, ssd = metrics.nearest_images(b, b, exclude_self=True)
    assert idx.tolist() == self_brute.argmin(1).tolist() and ssd.tolist() == self_brute.min(1).tolist()


def test_sizes_and_channels_are_brought_together(shirts, no_hub_weights):
    red = np.zeros((10, 10, 3), np.uint8)
    red[..., 0] = 255
    gray, info = common_representation([red], height=5, width=5, channels=1)
    assert gray.shape == (1, 5, 5, 1) and int(gray[0, 0, 0, 0]) == 76  # ITU-R 601-2 luma of pure red
    assert info == {"resized": 1, "channels_converted": 1}
    big_rgb = np.repeat(np.repeat(np.repeat(shirts[:10, :, :, None], 2, 1), 2, 2), 3, 3)  # 56×56 RGB
    report = image_quality_report(big_rgb, shirts, lpips=False)
    assert report["settings"]["common_size"] == [28, 28] and report["settings"]["channels"] == 1
    assert report["inputs"]["synthetic"]["resized"] == 10 and report["inputs"]["synthetic"]["channels_converted"] == 10
    assert report["nearest_real"]["index"] == list(range(10))  # each downsized copy is nearest its original
    assert report["ssim"]["summary"]["min"] > 0.8
    with pytest.raises(ValueError, match=r"synthetic\[0\].*uint8"):
        image_quality_report([np.zeros((28, 28), np.float32)], shirts)
    with pytest.raises(ValueError, match="synthetic: no images"):
        image_quality_report([], shirts)


def test_adapter_hashes_pick_the_training_images(shirts, tmp_path):
    from synthaug.adapter import image_sha256

    ad = tmp_path / "adapter"
    ad.mkdir()
    (ad / "pytorch_lora_weights.safetensors").write_bytes(b"")
    listed = [{"file": f"s{i}.png", "sha256": image_sha256(shirts[i])} for i in (3, 5, 8)] + [{"file": "gone.png", "sha256": "0" * 64}]
    cfg = {"synthaug_adapter": 1, "backend": "pixel-ddpm", "base_model": "builtin:x", "weights": "pytorch_lora_weights.safetensors", "train_images": listed}
    (ad / "synthaug.json").write_text(json.dumps(cfg))
    idx, info = train_images_from_adapter(ad, list(shirts))
    assert idx == [3, 5, 8] and info["matched"] == 3 and info["unmatched_files"] == ["gone.png"]
    with pytest.raises(ValueError, match="none of the 4 training images"):
        train_images_from_adapter(ad, list(shirts[10:20]))


# ------------------------------------------------------------------ LPIPS
def test_lpips_absent_is_reported_and_the_rest_still_computed(shirts, no_hub_weights):
    report = image_quality_report(shirts[:10], shirts, lpips="auto")
    lp = report["lpips"]
    assert lp["available"] is False
    assert q.ALEXNET_WEIGHTS_FILE in lp["reason"] and "--lpips-backbone" in lp["reason"] and str(no_hub_weights) in lp["reason"]
    assert report["ssim"]["summary"]["n"] == 10 and report["memorization"]["rate"] == 1.0
    assert image_quality_report(shirts[:3], shirts, lpips=False)["lpips"]["reason"].startswith("disabled")
    with pytest.raises(ValueError, match="LPIPS was required"):
        image_quality_report(shirts[:3], shirts, lpips=True)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        image_quality_report(shirts[:3], shirts, lpips_backbone=no_hub_weights / "nope.pth")


def test_lpips_present_path_matches_the_lpips_package(tmp_path):
    """With a stand-in backbone file (random AlexNet weights, NOT ImageNet's), the report's LPIPS
    must equal what the lpips package computes when it loads the same file itself. This checks
    the loading, preprocessing and pairing code; it cannot check values with the real weights."""
    import warnings

    import lpips
    import torch
    import torchvision

    torch.manual_seed(0)
    sd = torchvision.models.alexnet(weights=None).state_dict()
    # the classifier is never used by LPIPS: store it as stride-0 views to keep the file small
    sd = {k: (v if k.startswith("features.") else torch.zeros(1).expand(v.shape)) for k, v in sd.items()}
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    backbone = hub / "checkpoints" / q.ALEXNET_WEIGHTS_FILE
    torch.save(sd, backbone)

    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    syn = np.clip(real[[2, 0, 5]].astype(int) + rng.integers(-30, 31, (3, 64, 64, 3)), 0, 255).astype(np.uint8)
    report = image_quality_report(syn, real, lpips=True, lpips_backbone=backbone)
    lp = report["lpips"]
    assert lp["available"] and lp["backbone"] == str(backbone) and report["nearest_real"]["index"] == [2, 0, 5]

    old = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))  # the stock model finds the file there, so it downloads nothing
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stock = lpips.LPIPS(net="alex", verbose=False)
    finally:
        torch.hub.set_dir(old)
    to_t = lambda z: torch.from_numpy(z).permute(0, 3, 1, 2).float() / 127.5 - 1  # noqa: E731
    with torch.no_grad():
        expected = stock(to_t(syn), to_t(real[[2, 0, 5]])).flatten().numpy()
    np.testing.assert_allclose(lp["per_image"], expected, rtol=1e-5, atol=1e-6)

    small = image_quality_report(syn[:2, :28, :28, :1].copy(), real[:4, :28, :28, :1].copy(), lpips=True, lpips_backbone=backbone)["lpips"]
    assert small["available"] and all(np.isfinite(small["per_image"]))  # 28×28 gray: enlarged to 64, replicated to RGB
    same = image_quality_report(real[:2], real, lpips=True, lpips_backbone=backbone)["lpips"]
    assert same["per_image"] == [0.0, 0.0]


# ------------------------------------------------------------------ the command line
def _synthaug(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "synthaug", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def cli_case(tmp_path_factory, fmnist_test):
    """A real LMDB cache: 60 T-shirt/top test images and 5 copies of "training" shirts labelled as
    Shirt (6), 10 Pullovers as 2; a folder of 40 real Shirt images; an adapter listing 20 of them."""
    from PIL import Image

    from synthaug.adapter import image_sha256
    from synthaug.cache.store import SyntheticCache

    x, y = fmnist_test
    root = tmp_path_factory.mktemp("quality_cli")
    real = x[y == SHIRT][:40]
    (root / "real").mkdir()
    for i, im in enumerate(real):
        Image.fromarray(im).save(root / "real" / f"shirt_{i:03d}.png")
    cache = SyntheticCache(root / "cache.lmdb")
    cache.append(x[y == TSHIRT][:60, :, :, None], SHIRT, {"source": "fashion-mnist test T-shirt/top"})
    cache.append(real[[1, 4, 9, 12, 19], :, :, None], SHIRT, {"source": "copy of a training image"})
    cache.append(x[y == PULLOVER][:10, :, :, None], PULLOVER, {"source": "fashion-mnist test Pullover"})
    cache.close()
    ad = root / "adapter"
    ad.mkdir()
    (ad / "pytorch_lora_weights.safetensors").write_bytes(b"")
    cfg = {
        "synthaug_adapter": 1, "backend": "pixel-ddpm", "base_model": "builtin:fashion-mnist-ddpm",
        "weights": "pytorch_lora_weights.safetensors",
        "train_images": [{"file": f"shirt_{i:03d}.png", "sha256": image_sha256(real[i])} for i in range(20)],
    }
    (ad / "synthaug.json").write_text(json.dumps(cfg))
    return root


def test_cli_end_to_end_on_a_real_cache(cli_case, tmp_path):
    out = tmp_path / "report"
    res = _synthaug(
        "quality", "--cache", cli_case / "cache.lmdb", "--label", SHIRT, "--real", cli_case / "real",
        "--adapter", cli_case / "adapter", "--out", out, env_extra={"TORCH_HOME": str(tmp_path / "torch")},
    )
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "LPIPS will not be computed" in res.stderr
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("wrote quality.json, quality_histograms.png and nearest_pairs.png to") and str(out) in last
    doc = _strict_json(out / "quality.json")
    assert doc["inputs"]["synthetic"]["n"] == 65 and doc["inputs"]["synthetic"]["label"] == SHIRT
    assert doc["inputs"]["train"]["matched"] == 20 and doc["memorization_reference"] == "train"
    mem = doc["memorization"]
    memorized = [doc["inputs"]["synthetic"]["seqs"][i] for i, d in enumerate(mem["nearest_distance"]) if d < mem["threshold"]]
    assert memorized == [60, 61, 62, 63, 64] and mem["n_memorized"] == 5  # exactly the copies
    assert doc["psnr"]["summary"]["n_infinite"] == 5 and doc["lpips"]["available"] is False
    assert doc["diversity"]["ratio"] is not None and 0 < doc["diversity"]["ratio"] < 2
    for name in ("quality_histograms.png", "nearest_pairs.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"

    # the dataset path: Fashion-MNIST's test Shirts, a seeded sample of the cache, no reference given
    out2 = tmp_path / "report2"
    res = _synthaug(
        "quality", "--cache", cli_case / "cache.lmdb", "--dataset", "fashion-mnist", "--split", "test",
        "--limit", 20, "--seed", 1, "--lpips", "off", "--out", out2,
    )
    assert res.returncode == 0, res.stderr
    doc = _strict_json(out2 / "quality.json")
    assert doc["inputs"]["real"]["n"] == 1000 and doc["inputs"]["real"]["rare_class"] == "Shirt"
    assert doc["inputs"]["synthetic"]["n"] == 20 and doc["memorization_reference"] == "real"
    assert doc["lpips"]["reason"].startswith("disabled")


@pytest.mark.parametrize(
    "case,expect",
    [
        ("missing_cache", "--cache"),
        ("empty_real", "is empty"),
        ("label_nothing", "label 3 selects no record"),
        ("out_not_empty", "not empty; pass --overwrite"),
        ("rare_class_with_real", "go with --dataset"),
        ("fidelity_with_real", "--fidelity needs --dataset"),
        ("fidelity_without_classifier", "--reference-classifier FILE, or --train-reference"),
        ("fidelity_without_exclusion", "--exclude-seeds S[,S...]"),
        ("fidelity_flag_alone", "--train-reference go with --fidelity"),
        ("fidelity_missing_reference", "--reference-classifier"),
    ],
)
def test_cli_bad_input_is_one_clear_line(cli_case, tmp_path, capsys, case, expect):
    from synthaug.cli import main

    (tmp_path / "empty").mkdir()
    full = tmp_path / "full"
    full.mkdir()
    (full / "x.txt").write_text("x")
    args = {
        "missing_cache": ["--cache", tmp_path / "nope.lmdb", "--real", cli_case / "real"],
        "empty_real": ["--cache", cli_case / "cache.lmdb", "--real", tmp_path / "empty"],
        "label_nothing": ["--cache", cli_case / "cache.lmdb", "--real", cli_case / "real", "--label", 3],
        "out_not_empty": ["--cache", cli_case / "cache.lmdb", "--real", cli_case / "real", "--out", full],
        "rare_class_with_real": ["--cache", cli_case / "cache.lmdb", "--real", cli_case / "real", "--rare-class", "Shirt"],
        "fidelity_with_real": ["--cache", cli_case / "cache.lmdb", "--real", cli_case / "real", "--fidelity", "--train-reference"],
        "fidelity_without_classifier": ["--cache", cli_case / "cache.lmdb", "--dataset", "fashion-mnist", "--fidelity", "--exclude-nothing"],
        "fidelity_without_exclusion": ["--cache", cli_case / "cache.lmdb", "--dataset", "fashion-mnist", "--fidelity", "--train-reference"],
        "fidelity_flag_alone": ["--cache", cli_case / "cache.lmdb", "--dataset", "fashion-mnist", "--train-reference"],
        "fidelity_missing_reference": ["--cache", cli_case / "cache.lmdb", "--dataset", "fashion-mnist", "--fidelity",
                                       "--reference-classifier", tmp_path / "no.pt", "--exclude-nothing"],
    }[case]
    if case != "out_not_empty":
        args += ["--out", tmp_path / "out"]
    rc = main(["quality", "--lpips", "off", *map(str, args)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("synthaug quality: error:") and expect in err[0], err
    assert not (tmp_path / "out").exists()


def test_cli_error_has_no_traceback_in_a_real_process(tmp_path):
    res = _synthaug("quality", "--cache", tmp_path / "nope.lmdb", "--real", tmp_path, "--lpips", "off", "--out", tmp_path / "o")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [f"synthaug quality: error: --cache {tmp_path / 'nope.lmdb'}: no synthetic cache there (no data.mdb); give the folder `synthaug generate` filled"]


# ------------------------------------------------------------------ fidelity, confusion, CAS
@pytest.fixture(scope="module")
def fmnist_train():
    from tests.helpers.stub_generators import fashion_mnist_arrays

    return fashion_mnist_arrays(train=True)


@pytest.fixture(scope="module")
def reference_3(tmp_path_factory, one_torch_thread):
    """A Trouser/Shirt/Bag reference classifier trained on 300 real training images."""
    from tests.helpers.stub_generators import fashion_reference_classifier

    return fashion_reference_classifier(tmp_path_factory.mktemp("reference"))


def test_fidelity_and_confusion_say_what_the_images_are_taken_for(fmnist_test, reference_3):
    x, y = fmnist_test
    images = np.concatenate([x[y == SHIRT][:20], x[y == 1][:10]])  # 20 shirts, 10 trousers, all meant as shirts
    report = q.fidelity_report(images, "Shirt", reference_3)
    fid, conf = report["fidelity"], report["confusion"]
    assert fid["n"] == conf["n"] == 30 and fid["intended"] == "Shirt" and fid["intended_index"] == 1
    assert 17 <= fid["n_intended"] <= 22 and fid["rate"] == fid["n_intended"] / 30
    assert len(fid["per_image"]["probability"]) == 30 and fid["per_image"]["predicted"][20:].count("Trouser") >= 8
    assert fid["mean_probability"] == pytest.approx(np.mean(fid["per_image"]["probability"]))
    assert sum(v["count"] for v in conf["taken_for"].values()) == 30 and list(conf["taken_for"]) == ["Trouser", "Shirt", "Bag"]
    assert conf["taken_for"]["Shirt"]["count"] == fid["n_intended"] and conf["instead"]["count"] == 30 - fid["n_intended"]
    assert conf["most_common_instead"] == "Trouser" and conf["taken_for"]["Trouser"]["share"] >= 8 / 30
    assert fid["reference"]["sha256"] and fid["reference"]["classes"] == ["Trouser", "Shirt", "Bag"]
    assert q.fidelity_report(images[:3], 1, reference_3)["fidelity"]["intended"] == "Shirt"
    assert "real" not in fid and "real_taken_for" not in conf
    # real shirts judged alike: the rate the synthetic one reads against; the synthetic figures do not change
    with_real = q.fidelity_report(images, "Shirt", reference_3, real_images=x[y == SHIRT][20:120])
    real = with_real["fidelity"]["real"]
    assert real["n"] == 100 and real["rate"] >= 0.8 and real["taken_for"]["Shirt"] == real["rate"] and sum(real["taken_for"].values()) == pytest.approx(1)
    assert with_real["confusion"]["real_taken_for"] == real["taken_for"] and with_real["fidelity"]["per_image"] == fid["per_image"]
    trousers = q.fidelity_report(images, "Shirt", reference_3, real_images=x[y == 1][:50])["fidelity"]["real"]
    assert trousers["rate"] <= 0.2 and trousers["taken_for"]["Trouser"] >= 0.8
    with pytest.raises(ValueError, match="real_images: no images"):
        q.fidelity_report(images, "Shirt", reference_3, real_images=x[:0])
    with pytest.raises(ValueError, match="not one of the reference classifier's classes"):
        q.fidelity_report(images, "Dress", reference_3)


def test_cas_of_real_rare_images_is_close_to_the_real_reference(fmnist_train, fmnist_test, one_torch_thread):
    """Synthetic = real shirts the classifiers never saw: CAS ~ its real reference. Synthetic =
    trousers labelled as shirts: the rare class's average precision collapses."""
    from synthaug.data.fashion_mnist import FASHION_MNIST_CLASSES

    x, y = fmnist_train
    xt, yt = fmnist_test
    pool = q.outside_indices(y, range(1000), per_class=60, seed=0)
    assert not set(pool.tolist()) & set(range(1000)) and len(pool) == 600
    unseen_shirts = x[np.setdiff1d(np.nonzero(y == SHIRT)[0], np.concatenate([pool, np.arange(1000)]))[:60]]
    test = np.random.default_rng(0).choice(len(yt), 600, replace=False)
    kw = dict(rare=SHIRT, train_images=x[pool], train_labels=y[pool], test_images=xt[test], test_labels=yt[test],
              classes=FASHION_MNIST_CLASSES, steps=100, batch_size=32)
    cas = q.classification_accuracy_score(unseen_shirts, **kw)
    assert cas["train"] == {"synthetic_rare": 60, "real_rare": 60, "real_rare_available": 60, "other": 540,
                            "other_per_class": {c: 60 for c in FASHION_MNIST_CLASSES if c != "Shirt"}}
    assert cas["test"] == {"n": 600, "rare_support": int((yt[test] == SHIRT).sum())}
    assert abs(cas["difference"]["accuracy"]) < 0.05 and abs(cas["difference"]["rare_average_precision"]) < 0.1
    assert cas["real"]["accuracy"] > 0.6 and set(cas["ratio"]) == set(q.CAS_METRICS)
    wrong = q.classification_accuracy_score(x[y == 1][:60], **kw)  # trousers passed off as shirts
    assert wrong["synthetic"]["rare_recall"] < 0.05 and wrong["difference"]["rare_average_precision"] < -0.1
    assert wrong["real"] == cas["real"]  # the same real arm: same images, steps and seed


def test_cli_fidelity_end_to_end_writes_fidelity_confusion_and_cas(tmp_path, fmnist_train, one_torch_thread):
    from synthaug.classifier import ReferenceClassifier
    from synthaug.cli import main
    from synthaug.data.fashion_mnist import FashionMNIST
    from synthaug.data.splits import few_shot_split
    from synthaug.generation.fill import fill_cache
    from tests.helpers.stub_generators import FashionGenerator

    cache = SyntheticCache(tmp_path / "c.lmdb")
    fill_cache(FashionGenerator(off_share=0.3), cache, 40, seed=0)  # test-split shirts and trousers, labelled Shirt
    cache.close()
    out = tmp_path / "report"
    common = ["quality", "--cache", str(tmp_path / "c.lmdb"), "--dataset", "fashion-mnist", "--split", "test", "--lpips", "off",
              "--fidelity", "--fidelity-per-class", "50", "--fidelity-steps", "30", "--test-size", "300"]
    rc = main(common + ["--train-reference", "--exclude-seeds", "0,1", "--exclude-per-class", "100", "--out", str(out)])
    assert rc == 0
    doc = _strict_json(out / "quality.json")
    fid, conf, cas, trained = doc["fidelity"], doc["confusion"], doc["cas"], doc["trained_on"]
    assert fid["n"] == 40 and fid["intended"] == "Shirt" and conf["taken_for"]["Trouser"]["count"] > 0
    # beside it, the same classifier on the real test shirts of the --test-size sample
    assert 10 <= fid["real"]["n"] <= 60 and 0 <= fid["real"]["rate"] <= 1 and conf["real_taken_for"] == fid["real"]["taken_for"]
    assert set(cas) >= {"synthetic", "real", "difference", "train", "test"} and cas["test"]["n"] == 300
    assert cas["train"]["synthetic_rare"] == 40 and all(0 <= cas[a]["rare_average_precision"] <= 1 for a in ("synthetic", "real"))
    # trained outside both seeds' few-shot splits (30 shirts + 100 of each other class), never on the test split
    train = FashionMNIST(train=True)
    split = set(few_shot_split(train, "Shirt", shots=30, per_class=100, seed=0).train.tolist())
    split |= set(few_shot_split(train, "Shirt", shots=30, per_class=100, seed=1).train.tolist())
    assert trained["split"] == "train" and trained["excluded"]["n"] == len(split) and trained["excluded"]["seeds"] == [0, 1]
    assert len(trained["indices"]) == trained["n"] == 500 and not split & set(trained["indices"])
    assert trained["used_by"] == ["reference classifier", "cas"] and set(trained["class_counts"].values()) == {50}
    ref = ReferenceClassifier.load(out / "reference_classifier.pt")
    assert fid["reference"]["path"] == str(out / "reference_classifier.pt") and fid["reference"]["sha256"] == ref.sha256
    assert "outside" in ref.trained_on and fid["reference"]["trained_on"] == ref.trained_on
    assert (out / "fidelity.png").read_bytes()[:4] == b"\x89PNG"
    # the classifier it wrote, given back, with the excluded indices from a file: the same judgement
    (tmp_path / "excluded.json").write_text(json.dumps(sorted(split)))
    rc = main(common + ["--reference-classifier", str(out / "reference_classifier.pt"), "--exclude-indices", str(tmp_path / "excluded.json"),
                        "--out", str(tmp_path / "again")])
    again = _strict_json(tmp_path / "again" / "quality.json")
    assert rc == 0 and again["fidelity"]["per_image"] == fid["per_image"] and again["trained_on"]["indices"] == trained["indices"]
    assert again["trained_on"]["used_by"] == ["cas"] and not (tmp_path / "again" / "reference_classifier.pt").exists()
