"""The embedded default model (``builtin:fashion-mnist-ddpm``) and ``synthaug demo``.

The built-in model is checked for real structure the way a user would judge it: a small CNN
trained on real Fashion-MNIST recognises most of the images the model generates for the nine
classes it was trained on (noise, blobs or the wrong garment would score near chance, 1/9), and
the pixel statistics of its images are close to the real ones. The demo's pipeline runs end to end
in a real ``synthaug demo`` process, in a reduced setting, and writes its report.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from synthaug.data.fashion_mnist import FASHION_MNIST_CLASSES, find_fashion_mnist

REPO = Path(__file__).resolve().parents[1]
ENV_1T = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}

pytestmark = [
    pytest.mark.skipif(
        find_fashion_mnist() is None,
        reason="Fashion-MNIST is not installed (sudo apt-get install dataset-fashion-mnist; scripts/bootstrap.sh does it as root)",
    ),
    pytest.mark.usefixtures("one_torch_thread"),
]


def _train_reference_cnn(train, steps=400, per_class=400, seed=0):
    """A small CNN trained on real images of all ten classes (about 81% test accuracy)."""
    import torch

    from synthaug.data.transforms import FASHION_MNIST_MEAN, FASHION_MNIST_STD
    from synthaug.classifier import build_classifier, train_classifier

    rng = np.random.default_rng(seed)
    targets = train.targets.numpy()
    idx = np.concatenate([rng.choice(np.flatnonzero(targets == c), per_class, replace=False) for c in range(10)])
    x = (train.data[idx].float()[:, None] / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    y = train.targets[idx]
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    net = build_classifier("small-cnn", in_channels=1, num_classes=10)
    train_classifier(net, loader, steps=steps)
    return net.eval()


def _classify(net, images_u8):
    import torch

    from synthaug.data.transforms import FASHION_MNIST_MEAN, FASHION_MNIST_STD

    x = (torch.from_numpy(images_u8).float().permute(0, 3, 1, 2) / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    with torch.no_grad():
        return net(x).argmax(1).numpy()


def test_builtin_model_loads_offline_and_generates_recognisable_garments():
    import synthaug
    from synthaug.builtin import available_builtins
    from synthaug.data.fashion_mnist import FashionMNIST

    assert "fashion-mnist-ddpm" in available_builtins()
    folder = available_builtins()["fashion-mnist-ddpm"]
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.is_file() and weights.stat().st_size < 8 * 2**20  # a few MB, shipped in the package
    info = json.loads((folder / "synthaug_model.json").read_text())
    rare = info["rare_class_index"]
    assert FASHION_MNIST_CLASSES[rare] == "Shirt" and rare not in info["trained_classes"]

    train = FashionMNIST(train=True)
    test = FashionMNIST(train=False)
    net = _train_reference_cnn(train)
    real_test = test.data[:1000].numpy()[..., None]
    real_acc = float((_classify(net, real_test) == test.targets[:1000].numpy()).mean())
    assert real_acc > 0.75, f"the reference CNN is too weak to judge the generator ({real_acc:.2f})"

    per_class, correct, generated = 12, {}, []
    for c in info["trained_classes"]:
        gen = synthaug.load_generator("builtin:fashion-mnist-ddpm", label=c, num_inference_steps=20, scheduler="dpm++",
                                      device="cpu", batch_size=per_class)
        batch = gen.generate(per_class, seed=100 * c)
        assert batch.images.shape == (per_class, 28, 28, 1) and batch.images.dtype == np.uint8
        assert batch.labels == [c] * per_class and batch.meta[0]["model"] == "builtin:fashion-mnist-ddpm"
        correct[FASHION_MNIST_CLASSES[c]] = float((_classify(net, batch.images) == c).mean())
        generated.append(batch.images)
    accuracy = float(np.mean(list(correct.values())))
    # chance is 1/9 among the generated classes; the model's garments must be recognised as the
    # class asked for most of the time
    assert accuracy >= 0.6, f"generated images recognised as their class only {accuracy:.2f} of the time: {correct}"

    gen_all = np.concatenate(generated).astype(np.float64)
    keep = np.isin(train.targets.numpy(), info["trained_classes"])
    real_all = train.data.numpy()[keep][:5000].astype(np.float64)
    assert abs(gen_all.mean() - real_all.mean()) < 15, (gen_all.mean(), real_all.mean())
    assert abs(gen_all.std() - real_all.std()) < 15, (gen_all.std(), real_all.std())
    # background (the border) is dark as in the data, garments are not blank
    border = np.concatenate([gen_all[:, 0].ravel(), gen_all[:, -1].ravel(), gen_all[:, :, 0].ravel(), gen_all[:, :, -1].ravel()])
    assert border.mean() < 25 and gen_all[:, 8:20, 8:20].mean() > 60


def test_demo_runs_end_to_end_in_a_reduced_setting(tmp_path):
    out = tmp_path / "report"
    cmd = [
        sys.executable, "-m", "synthaug", "demo", "--out", str(out), "--shots", "10", "--per-class", "60",
        "--lora-steps", "20", "--train-steps", "25", "--batch-size", "32", "--ratio", "0.25",
        "--generation-steps", "4", "--min-fresh", "24", "--max-items", "400", "--test-size", "400",
    ]
    run = subprocess.run(cmd, cwd=tmp_path, env=ENV_1T, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for name in ("report.json", "arms.png", "samples.png", "adapter/validation.png", "adapter/loss.png", "adapter/synthaug.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert [a["arm"] for a in report["arms"]] == ["real_only", "oversampled", "synthetic"]
    assert report["rare_class"] == {"index": 6, "name": "Shirt"}
    assert report["data"]["train"] == 10 + 9 * 60 and report["data"]["test"] == 400
    for arm in report["arms"]:
        m = arm["metrics"]
        assert 0 <= m["rare_recall"] <= 1 and 0 <= m["rare_f1"] <= 1 and 0 <= m["accuracy"] <= 1
        assert arm["training"]["steps"] == 25
    # the two mixed arms draw r·B = 8 extra rare items per full batch of 32 (rule 2; the epoch's
    # shorter last batch, here batch 23 of 550 real items at 24 per batch, keeps the ratio)
    for arm in report["arms"][1:]:
        s = arm["sampler"]
        assert 24 * 8 <= s["served"] <= 25 * 8 and abs(s["synthetic_share"] - 0.25) < 0.005, s
        assert arm["rare_draws"] >= s["served"]
    syn = report["arms"][2]["sampler"]
    assert syn["fresh"] + syn["reused"] == syn["served"]
    assert report["worker"]["state"] == "stopped" and report["worker"]["generated"] > 0
    assert report["cache"]["count"] > 0 and report["cache"]["count"] <= 400
    assert set(report["timings"]) >= {"data_s", "lora_s", "arms_s", "total_s"}
    # the table is printed, and the last line says where the report is
    assert "| synthetic |" in run.stdout and str(out) in run.stdout.strip().splitlines()[-1]
    # the synthetic records carry the adapter's provenance
    from synthaug import SyntheticCache

    cache = SyntheticCache(out / "cache.lmdb", readonly=True)
    rec = cache.get(cache.seqs()[0])
    assert rec.label == 6 and rec.image.shape == (28, 28, 1)
    assert rec.meta["model"] == "builtin:fashion-mnist-ddpm" and rec.meta["adapter_hash"] and rec.meta["num_inference_steps"] == 4
    # made around the real shots (the default img2img): each record names its shot and strength
    shots = sorted((out / "train_images").iterdir())
    assert report["config"]["generation"] == "img2img" and len(shots) == 10
    metas = cache.metas()
    assert {m["mode"] for m in metas.values()} == {"img2img"}
    assert {m["strength"] for m in metas.values()} <= {0.25, 0.5, 0.75, 1.0} and len({m["strength"] for m in metas.values()}) > 1
    assert {m["source_index"] for m in metas.values()} <= set(range(10))
    assert len({m["source_image"] for m in metas.values()}) > 1 and all(len(m["source_image"]) == 64 for m in metas.values())


def test_demo_bad_input_is_one_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "synthaug", "demo", *args], cwd=tmp_path, env=ENV_1T,
                              capture_output=True, text=True, timeout=120)

    r = run("--ratio", "1.5", "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "--ratio must be in [0, 1)" in r.stderr and "Traceback" not in r.stderr
    r = run("--rare-class", "Kilt", "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "Kilt" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "precious.txt").write_text("keep me")
    r = run("--out", str(tmp_path / "c"))
    assert r.returncode == 2 and "not an earlier demo report" in r.stderr
    assert (tmp_path / "c" / "precious.txt").read_text() == "keep me"
    r = run("--help")
    assert r.returncode == 0 and "--shots" in r.stdout and "default: 30" in r.stdout
