"""``synthaug sweep``: a reduced real sweep (per-seed LoRA on the built-in model, generation,
every arm, statistics, plots), resume, the leakage guard, multi-label CSV and image-folder
datasets, the CSV reader, and bad input."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from synthaug.data.fashion_mnist import FASHION_MNIST_CLASSES, find_fashion_mnist
from synthaug.evaluation.sweep import SweepConfig, run_sweep
from synthaug.evaluation.sweep_report import markdown_summary

SHIRT = FASHION_MNIST_CLASSES.index("Shirt")
REPO = Path(__file__).resolve().parents[1]
needs_fmnist = pytest.mark.skipif(find_fashion_mnist() is None, reason="Fashion-MNIST is not installed (scripts/bootstrap.sh installs it as root)")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _is_png(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as im:
        return im.format == "PNG" and im.size[0] > 300


@needs_fmnist
def test_reduced_fashion_mnist_sweep_writes_results_summary_and_plots(tmp_path, capsys):
    cfg = SweepConfig(ratios=[0.25, 0.5], seeds=2, per_class=60, shots=12, steps=25, batch_size=32, lora_steps=3,
                      arms=["real_only", "oversampled", "classic_aug", "synthetic", "synthetic+classic_aug", "adaptive"], adaptive_interval=5,
                      synthetic_images=24, set_sizes=[8], test_size=400, bootstrap=2000, out=str(tmp_path / "sweep"))
    summary = run_sweep(cfg, progress=False)
    out = tmp_path / "sweep"
    rows = json.loads((out / "results.json").read_text())["rows"]
    arms = ["real_only", "oversampled@0.25", "classic_aug@0.25", "synthetic@0.25", "synthetic+classic_aug@0.25", "oversampled@0.5",
            "classic_aug@0.5", "synthetic@0.5", "synthetic+classic_aug@0.5", "adaptive", "synthetic@0.25/n=8"]
    # one row per arm x seed, each with the real-test metrics and the same number of steps
    assert sorted((r["arm"], r["seed"]) for r in rows) == sorted((a, s) for a in arms for s in (0, 1))
    assert {r["training"]["steps"] for r in rows} == {25}
    for r in rows:
        assert 0 <= r["metrics"]["rare_recall"] <= 1 and r["metrics"]["rare_support"] > 0
    by = {(r["arm"], r["seed"]): r for r in rows}
    for s in (0, 1):
        # matched cardinality: the oversampled control draws the rare class exactly as often as the synthetic arm
        assert by[("oversampled@0.5", s)]["rare_draws"] == by[("synthetic@0.5", s)]["rare_draws"]
        assert by[("synthetic@0.5", s)]["sampler"]["served"] == by[("oversampled@0.5", s)]["sampler"]["served"] > 0
        assert by[("synthetic@0.25", s)]["pool"] == 24 and by[("synthetic@0.25/n=8", s)]["pool"] == 8
        assert by[("real_only", s)]["rare_draws"] < by[("oversampled@0.25", s)]["rare_draws"]
    # per seed: a LoRA on that seed's shots, a pool of generated images, the leakage check
    for s in (0, 1):
        meta = json.loads((out / "seeds" / f"seed-{s}" / "adapter" / "synthaug.json").read_text())
        assert len(meta["train_images"]) == 12 and meta["class_name"] == "Shirt"
    assert summary["meta"]["leakage"]["0"]["shared"] == 0 and summary["meta"]["leakage"]["0"]["test_images"] == 400
    # statistics: per arm over both seeds, comparisons against real_only and the matched control
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["arms"]["synthetic@0.5"]["metrics"]["rare_f1"]["n"] == 2
    pairs = {(c["arm"], c["baseline"], c["metric"]) for c in on_disk["comparisons"]}
    assert ("synthetic@0.5", "oversampled@0.5", "rare_recall") in pairs and ("synthetic@0.25/n=8", "real_only", "rare_f1") in pairs
    assert ("synthetic+classic_aug@0.5", "classic_aug@0.5", "rare_average_precision") in pairs
    c = next(c for c in on_disk["comparisons"] if c["arm"] == "synthetic@0.5" and c["baseline"] == "real_only" and c["metric"] == "rare_f1")
    f1 = lambda arm: np.array(on_disk["arms"][arm]["metrics"]["rare_f1"]["values"])  # noqa: E731
    assert c["mean_diff"] == pytest.approx(np.mean(f1("synthetic@0.5") - f1("real_only")))
    md = (out / "summary.md").read_text()
    assert "| synthetic@0.5 | oversampled@0.5 |" in md and "| real_only | 2 |" in md
    assert _is_png(out / "ratio_curves.png") and _is_png(out / "set_size.png")
    # the adaptive arm: one run per seed, its ratio moved over the sweep's ratios by validation AP
    for s in (0, 1):
        row = by[("adaptive", s)]
        assert row["ratio"] == 0.25 and row["training"]["adaptive"]["observations"] == 5  # start: the lower middle; 25 steps / 5
        assert row["training"]["adaptive"]["grid"] == [0.25, 0.5] and row["training"]["adaptive_eval_s"] > 0
        assert set(row["sampler"]["served_by_class"]) == {str(SHIRT)}
    ad = on_disk["adaptive"]["adaptive"]
    assert ad["fixed_arms"] == ["synthetic@0.25", "synthetic@0.5"] and len(ad["per_seed"]) == 2
    bases = {c["baseline"] for c in ad["comparisons"]}
    assert {"synthetic@0.25", "synthetic@0.5", "fixed ratio chosen on validation", "real_only"} <= bases
    assert any(b.startswith("best fixed ratio on test") for b in bases)
    assert "## adaptive: the ratio chosen during the run" in md and _is_png(out / "adaptive_trajectory.png")

    # resume: the same settings again train nothing; a lost row is trained again, alone
    before = (out / "results.json").read_text()
    run_sweep(SweepConfig(**{**cfg.__dict__}), progress=False)
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(before)["rows"]
    kept = json.loads(before)
    lost = kept["rows"].pop()
    (out / "results.json").write_text(json.dumps(kept))
    capsys.readouterr()
    run_sweep(SweepConfig(**{**cfg.__dict__}), progress=False)
    again = json.loads((out / "results.json").read_text())["rows"]
    assert len(again) == len(rows) and (again[-1]["arm"], again[-1]["seed"]) == (lost["arm"], lost["seed"])
    assert f"resuming: {len(rows) - 1} of {len(rows)}" in capsys.readouterr().out
    # other settings in the same folder are refused, not mixed in
    with pytest.raises(FileExistsError, match=r"other settings or inputs \(steps\)"):
        run_sweep(SweepConfig(**{**cfg.__dict__, "steps": 26}), progress=False)


@needs_fmnist
def test_sweep_with_a_worker_topping_up_the_pool(tmp_path):
    """worker: true — a GenerationWorker keeps adding images while the arms train; both synthetic
    arms see a pool larger than the pre-filled one (the first arm's cursor does not pin it)."""
    cfg = SweepConfig(ratios=[0.25, 0.5], seeds=1, per_class=30, shots=8, steps=200, batch_size=32, lora_steps=2, synthetic_images=8,
                      arms=["synthetic"], set_sizes=[], worker=True, test_size=200, bootstrap=200, out=str(tmp_path / "sweep"))
    summary = run_sweep(cfg, progress=False)
    rows = json.loads((tmp_path / "sweep" / "results.json").read_text())["rows"]
    pools = [r["pool"] for r in rows]
    assert [r["arm"] for r in rows] == ["synthetic@0.25", "synthetic@0.5"]
    assert 8 < pools[0] <= pools[1], pools
    worker = summary["meta"]["seeds"]["0"]["worker"]
    assert worker["state"] == "stopped" and worker["generated"] == pools[1] - 8
    assert rows[1]["sampler"]["fresh"] > 0  # the second arm got images the first one never saw


@needs_fmnist
def test_sweep_refuses_an_adapter_trained_on_test_images(tmp_path, tiny_ddpm_dir):
    """An adapter whose training images include Fashion-MNIST test images: the sweep stops before
    generating anything, naming the shared image."""
    from PIL import Image

    from synthaug.data.fashion_mnist import FashionMNIST
    from synthaug.evaluation.leakage import DataLeakageError
    from synthaug.finetune import finetune_lora

    test = FashionMNIST(train=False)
    images = tmp_path / "images"
    images.mkdir()
    for i in (3, 17, 40, 41, 99):
        test[i][0].save(images / f"test_{i}.png")
    adapter = finetune_lora(tiny_ddpm_dir, images, tmp_path / "adapter", steps=2, class_name="a", progress=False, min_images=5)
    cfg = SweepConfig(ratios=[0.5], seeds=1, per_class=20, shots=5, steps=5, arms=["real_only", "synthetic"], set_sizes=[],
                      adapter=str(adapter), out=str(tmp_path / "sweep"))
    with pytest.raises(DataLeakageError, match=r"shares 5 image\(s\) with the training images of adapter .*test_17.png = test image 17"):
        run_sweep(cfg, progress=False)
    assert not (tmp_path / "sweep" / "seeds" / "seed-0" / "synthetic.lmdb").exists()
    # a subset of the test set without those images passes the guard
    from synthaug.evaluation.leakage import check_no_leakage, dataset_image_hashes

    import torch

    clean = torch.utils.data.Subset(test, [0, 1, 2, 4, 5])
    assert check_no_leakage([adapter], dataset_image_hashes(clean))["shared"] == 0


def _digits_images(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.kron(d.images, np.ones((2, 2))) / 16.0 * 255
    return images.astype(np.uint8), d.target


def _write_digit_csv(tmp_path, n_train=900):
    """A ChestX-ray14-shaped CSV: 16×16 gray images, '|'-separated findings, 'No Finding', a split
    column. Findings: Even (even digit), Round (0, 6, 8, 9), Seven (the rare finding)."""
    from PIL import Image

    images, target = _digits_images(tmp_path)
    root = tmp_path / "xray"
    (root / "images").mkdir(parents=True)
    rows = []
    for i, (im, t) in enumerate(zip(images, target)):
        name = f"{i:05d}.png"
        Image.fromarray(im).save(root / "images" / name)
        findings = [f for f, on in (("Even", t % 2 == 0), ("Round", t in (0, 6, 8, 9)), ("Seven", t == 7)) if on]
        rows.append({"Image Index": name, "Finding Labels": "|".join(findings) or "No Finding", "split": "train" if i < n_train else "test"})
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["Image Index", "Finding Labels", "split"])
        w.writeheader()
        w.writerows(rows)
    return root / "labels.csv", images, target


def test_multilabel_csv_sweep_with_a_given_cache(tmp_path):
    from synthaug.cache.store import SyntheticCache

    csv_path, images, target = _write_digit_csv(tmp_path)
    # a pool of 'Seven' images (test fixture: real training-side digits, mirrored, standing in for generated ones)
    # its label space is its own (one name, index 0): labels must map by name, in the set-size subsets too
    # and it holds other images too (label "Even"), interleaved: arms and set-size pools use the sevens only
    sevens = images[:900][target[:900] == 7][:20, :, ::-1]
    evens = images[:900][target[:900] == 2][:20, :, ::-1]
    cache = SyntheticCache(tmp_path / "pool.lmdb", label_names=["Seven", "Even"])
    for i in range(0, 20, 5):
        cache.append(sevens[i:i + 5], 0, {"source": "test-fixture"})
        cache.append(evens[i:i + 5], 1, {"source": "test-fixture"})
    cache.close()
    cfg = SweepConfig(dataset=f"csv:{csv_path}", rare_class="Seven", shots=6, per_class=150, ratios=[0.25], seeds=2, steps=15,
                      batch_size=16, arms=["real_only", "oversampled", "synthetic"], cache=str(tmp_path / "pool.lmdb"), set_sizes=[10],
                      image_size=16, bootstrap=500, out=str(tmp_path / "sweep"))
    # the records name no adapter: the leakage check cannot run, and the sweep says so instead of passing
    with pytest.raises(ValueError, match=r"cannot check the test set for leakage: 40 record\(s\) of cache .* name no adapter"):
        run_sweep(cfg, progress=False)
    cfg = SweepConfig(**{**cfg.__dict__, "leakage_check": False, "overwrite": True})
    summary = run_sweep(cfg, progress=False)
    rows = json.loads((tmp_path / "sweep" / "results.json").read_text())["rows"]
    assert sorted({r["arm"] for r in rows}) == ["oversampled@0.25", "real_only", "synthetic@0.25", "synthetic@0.25/n=10"]
    assert len(rows) == 8
    for r in rows:
        m = r["metrics"]
        assert m["rare_support"] == int(np.sum(target[900:] == 7)) and "rare_auroc" in m and 0 <= m["rare_f1"] <= 1
    by = {(r["arm"], r["seed"]): r for r in rows}
    for arm in ("synthetic@0.25", "synthetic@0.25/n=10"):
        assert by[(arm, 0)]["rare_draws"] == by[("oversampled@0.25", 0)]["rare_draws"] > by[("real_only", 0)]["rare_draws"]
        assert by[(arm, 0)]["sampler"]["served"] == 15 * 4
    assert by[("synthetic@0.25", 0)]["pool"] == 20 and by[("synthetic@0.25/n=10", 0)]["pool"] == 10
    sub = SyntheticCache(tmp_path / "sweep" / "seeds" / "seed-0" / "synthetic-n10.lmdb", readonly=True)
    assert {r.label for r in sub.get_many(sub.seqs())} == {0} and sub.label_names == ["Seven", "Even"]
    sub.close()
    assert summary["meta"]["multilabel"] is True
    assert summary["meta"]["leakage"]["0"]["checked"] is False
    assert "Leakage check skipped" in (tmp_path / "sweep" / "summary.md").read_text()
    # 15 steps per arm: the summary says the run is too small to compare arms, beside the table, and so does the log
    assert "**Warning: too small to compare arms: 15 optimizer steps per arm" in (tmp_path / "sweep" / "summary.md").read_text()
    assert "WARNING: too small to compare arms: 15 optimizer steps" in (tmp_path / "sweep" / "sweep.log").read_text()
    assert "WARNING: leakage check skipped" in (tmp_path / "sweep" / "sweep.log").read_text()
    # finished arms leave no cursor behind (a worker topping up the pool would otherwise idle)
    assert SyntheticCache(tmp_path / "pool.lmdb", readonly=True).cursors(include_dead=True) == {}


def test_imagefolder_sweep_controls_only(tmp_path):
    from PIL import Image

    images, target = _digits_images(tmp_path)
    for i, (im, t) in enumerate(zip(images, target)):
        folder = tmp_path / "digits" / ("train" if i < 1000 else "test") / f"d{t}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.stack([im, im // 2, 255 - im], axis=2)).save(folder / f"{i}.png")
    from synthaug.cache.store import SyntheticCache

    # a 16×16 pool (test fixture: training-side threes, mirrored) for 20×20 training: the sweep resizes it
    threes = np.stack([images[:1000][target[:1000] == 3][:12, :, ::-1]] * 3, axis=3)
    cache = SyntheticCache(tmp_path / "pool.lmdb", label_names=["d3"])
    cache.append(threes, 0, {"source": "test-fixture"})
    cache.close()
    cfg = SweepConfig(dataset=f"imagefolder:{tmp_path / 'digits'}", rare_class="d3", shots=5, per_class=40, ratios=[0.5], seeds=[7],
                      steps=10, batch_size=16, arms=["real_only", "oversampled", "classic_aug", "synthetic"], set_sizes=[], image_size=20,
                      cache=str(tmp_path / "pool.lmdb"), leakage_check=False, out=str(tmp_path / "sweep"))
    summary = run_sweep(cfg, progress=False)
    assert sorted(summary["arms"]) == ["classic_aug@0.5", "oversampled@0.5", "real_only", "synthetic@0.5"]
    assert summary["arms"]["real_only"]["seeds"] == [7]
    assert summary["arms"]["synthetic@0.5"]["rare_draws"]["mean"] == summary["arms"]["oversampled@0.5"]["rare_draws"]["mean"]
    assert summary["meta"]["test_images"] == len(images) - 1000
    done = [line for line in (tmp_path / "sweep" / "sweep.log").read_text().splitlines() if "sweep done" in line][-1]
    assert "ratio_curves.png" in done and "set_size.png" not in done  # --set-sizes '' wrote none, and the line says so


def test_imagefolder_leakage_check_sees_gray_files_as_finetune_does(tmp_path, tiny_ddpm_dir):
    """ImageFolder loads every file as RGB; finetune hashed the gray files as gray. The guard hashes
    the test files the way finetune does, so a gray test image among the adapter's is caught."""
    import shutil

    from PIL import Image

    from synthaug.evaluation.leakage import DataLeakageError
    from synthaug.finetune import finetune_lora

    images, target = _digits_images(tmp_path)
    for i, (im, t) in enumerate(zip(images[:400], target[:400])):
        folder = tmp_path / "digits" / ("train" if i < 300 else "test") / f"d{t}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(folder / f"{i}.png")
    shots = tmp_path / "shots"
    shots.mkdir()
    for f in sorted((tmp_path / "digits" / "test" / "d3").iterdir())[:5]:
        shutil.copy(f, shots / f.name)
    adapter = finetune_lora(tiny_ddpm_dir, shots, tmp_path / "adapter", steps=1, class_name="a", progress=False, min_images=5)
    cfg = SweepConfig(dataset=f"imagefolder:{tmp_path / 'digits'}", rare_class="d3", shots=5, per_class=10, ratios=[0.5], seeds=1, steps=2,
                      arms=["real_only", "synthetic"], set_sizes=[], adapter=str(adapter), image_size=16, out=str(tmp_path / "sweep"))
    with pytest.raises(DataLeakageError, match=r"shares 5 image\(s\)"):
        run_sweep(cfg, progress=False)


def test_read_image_csv_forms_and_patient_split(tmp_path):
    from PIL import Image

    from synthaug.data.csv_images import CsvImageDataset, read_image_csv

    for i in range(10):
        Image.fromarray(np.full((4, 4), i * 20, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "onehot.csv").write_text("path,Patient ID,cat,dog\n" + "".join(f"{i}.png,p{i // 2},{i % 2},{int(i > 6)}\n" for i in range(10)))
    rows, col, labels, targets = read_image_csv(tmp_path / "onehot.csv")
    assert col == "path" and labels == ["cat", "dog"] and targets.sum(0).tolist() == [5, 3]
    train, test = CsvImageDataset(tmp_path / "onehot.csv", "train"), CsvImageDataset(tmp_path / "onehot.csv", "test")
    assert len(train) + len(test) == 10 and len(test) == 2  # one patient of five, both of their images
    assert not {f.name for f in train.files} & {f.name for f in test.files}
    image, y = test[0]
    assert image.mode == "L" and y.dtype.is_floating_point and y.shape == (2,)
    (tmp_path / "bad.csv").write_text("path,cat\n0.png,maybe\n")
    with pytest.raises(ValueError, match="must hold 0 or 1"):
        read_image_csv(tmp_path / "bad.csv")
    (tmp_path / "nocol.csv").write_text("name,cat\n0.png,1\n")
    with pytest.raises(ValueError, match="no image column"):
        read_image_csv(tmp_path / "nocol.csv")
    (tmp_path / "missing.csv").write_text("path,cat,split\nnope.png,1,train\n0.png,1,test\n")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        CsvImageDataset(tmp_path / "missing.csv", "train")
    with pytest.raises(ValueError, match="the train side of the split is empty"):
        CsvImageDataset(tmp_path / "onehot.csv", "train", test_fraction=1.0)


def test_example_config_is_the_default_study():
    cfg = SweepConfig.from_yaml(REPO / "examples" / "sweep_fashion_mnist.yaml")
    cfg.check()
    assert cfg.seed_list == [0, 1, 2, 3, 4] and cfg.ratios == [0.1, 0.25, 0.5, 0.75]
    plan = [p["arm"] for p in cfg.arm_plan()]
    assert plan[0] == "real_only" and len(plan) == 1 + 3 * 4 + 3 and "synthetic@0.25/n=30" in plan
    assert SweepConfig.from_yaml(REPO / "examples" / "sweep_fashion_mnist.yaml", seeds=2).seed_list == [0, 1]
    adaptive = SweepConfig.from_yaml(REPO / "examples" / "sweep_fashion_mnist_adaptive.yaml")
    adaptive.check()
    assert [p["arm"] for p in adaptive.arm_plan()] == ["synthetic@0.1", "synthetic@0.25", "synthetic@0.5", "synthetic@0.75", "adaptive"]
    assert adaptive.adaptive_start() == 0.25 and adaptive.adaptive_interval_for(565) == 23 and adaptive.adaptive_settle_at(565) == 471


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ratios", "0.2,1.5"], "ratios must be in (0, 1)"),
        (["--arms", "real_only,mixup"], "unknown arm(s) ['mixup']"),
        (["--dataset", "mnist"], "--dataset must be fashion-mnist, imagefolder:DIR or csv:FILE"),
        (["--seeds", "0,0"], "--seeds must be"),
        (["--model", "small-cnn", "--shots", "0"], "--shots must be >= 1"),
        (["--dataset", "imagefolder:nowhere"], "imagefolder:nowhere needs nowhere/train/<class>/"),
        (["--config", "nope.yaml"], "sweep config nope.yaml does not exist"),
        (["--cache", "pool.lmdb", "--worker"], "with --cache given, run `synthaug worker` on that cache instead"),
    ],
)
def test_cli_bad_input_fails_in_one_line(args, message, tmp_path, capsys, monkeypatch):
    from synthaug.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("synthaug sweep: error:") and message in err and "\n" not in err


def test_cli_unknown_yaml_key_and_non_sweep_folder(tmp_path, capsys):
    from synthaug.cli import main

    (tmp_path / "c.yaml").write_text("ratios: [0.5]\nratio_typo: 3\n")
    assert main(["sweep", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "unknown key(s) ['ratio_typo']" in capsys.readouterr().err
    # YAML reads 1e-3 as a string: values are converted to the setting's type, or refused at once
    (tmp_path / "t.yaml").write_text("lr: 1e-3\nseeds: [3, 4]\nepochs: 2\n")
    cfg = SweepConfig.from_yaml(tmp_path / "t.yaml")
    assert cfg.lr == 0.001 and cfg.seed_list == [3, 4] and isinstance(cfg.epochs, float)
    (tmp_path / "bad.yaml").write_text("steps: many\n")
    assert main(["sweep", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "steps must be an integer, got 'many'" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["sweep", "--out", str(tmp_path / "busy"), "--seeds", "1", "--overwrite"]) == 2  # never deletes a non-sweep folder
    assert "is not empty and holds no sweep" in capsys.readouterr().err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_cli_help_lists_the_study_settings(capsys):
    from synthaug.cli import main

    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag in ("--config", "--dataset", "--rare-class", "--shots", "--ratios", "--seeds", "--epochs", "--model", "--adapter", "--out",
                 "default: 0.1,0.25,0.5,0.75", "default: 5"):
        assert flag in out


def test_leakage_check_of_a_given_cache_names_its_adapters(tmp_path, tiny_ddpm_dir):
    """A --cache whose records name an adapter folder that is not here: refused, unless --adapter
    is given with the same weights (its hash matches the records'), which is then checked."""
    from types import SimpleNamespace

    from PIL import Image

    from synthaug.adapter import read_adapter_config
    from synthaug.cache.store import SyntheticCache
    from synthaug.evaluation.leakage import DataLeakageError
    from synthaug.evaluation.sweep_pools import check_leakage
    from synthaug.finetune import finetune_lora

    shots = tmp_path / "shots"
    shots.mkdir()
    for i in range(5):
        Image.fromarray(np.full((12, 12), 40 * i, np.uint8)).save(shots / f"{i}.png")
    adapter = finetune_lora(tiny_ddpm_dir, shots, tmp_path / "adapter", steps=1, class_name="a", progress=False, min_images=5)
    h = read_adapter_config(adapter)["adapter_hash"]
    cache = SyntheticCache(tmp_path / "pool.lmdb")
    cache.append(np.zeros((3, 12, 12, 1), np.uint8), 0, {"adapter": "/elsewhere/adapter", "adapter_hash": h})
    cache.close()
    data = SimpleNamespace(name="test data")
    cfg = SweepConfig(cache=str(tmp_path / "pool.lmdb"))
    with pytest.raises(ValueError, match=r"made by adapter\(s\) \['/elsewhere/adapter'\] that are not here"):
        check_leakage(cfg, None, data, ["0" * 64])
    assert check_leakage(cfg, adapter, data, ["0" * 64])["checked"] is True
    from synthaug.adapter import image_sha256

    test_hashes = [image_sha256(np.full((12, 12), 80, np.uint8))]  # shot 2 is in the "test set"
    with pytest.raises(DataLeakageError):
        check_leakage(cfg, adapter, data, test_hashes)


def test_the_validation_split_is_outside_training_and_test_and_selection_never_reads_the_test_set():
    from synthaug.data.study import load_study_dataset
    from synthaug.evaluation.sweep_report import select_on_validation, summarize_results

    data = load_study_dataset("fashion-mnist", image_size=28)
    cfg = SweepConfig(shots=30, per_class=1000, val_shots=10)
    for seed in (0, 1):
        train, rare = data.split(shots=cfg.shots, per_class=cfg.per_class, seed=seed)
        val = data.validation_split(train, val_shots=cfg.val_shots, val_per_class=cfg.val_per_class(), seed=seed)
        assert not set(val) & set(train)  # disjoint from the training split (the test set is another file)
        counts = np.bincount(data.targets[val], minlength=10)
        assert set(counts) == {10}  # balanced, as the test set is
        again, _ = data.split(shots=cfg.shots, per_class=cfg.per_class, seed=seed)
        assert np.array_equal(again, train)  # drawing the validation split leaves the training split as it was

    rng = np.random.default_rng(0)
    arms = [("real_only", "real_only", 0.0), ("oversampled@0.25", "oversampled", 0.25), ("oversampled@0.5", "oversampled", 0.5),
            ("synthetic@0.25", "synthetic", 0.25), ("synthetic[img2img]@0.25", "synthetic", 0.25), ("synthetic[img2img]@0.5", "synthetic", 0.5),
            ("oversampled+synthetic[translate]@0.25", "oversampled+synthetic", 0.25), ("synthetic@0.25/n=8", "synthetic", 0.25)]

    def rows(test_noise: float):
        out = []
        for seed in range(3):
            for i, (arm, kind, r) in enumerate(arms):
                val_ap = 0.1 * ((i * 7 + seed * 3) % 8)
                out.append({"arm": arm, "kind": kind, "ratio": r, "seed": seed, "pool": 8 if "/n=" in arm else None, "rare_draws": 10,
                            "val_metrics": {"rare_average_precision": val_ap},
                            "metrics": {k: float(rng.random()) * test_noise for k in ("rare_recall", "rare_f1", "rare_precision", "rare_average_precision", "accuracy")}})
        return out

    a, b = rows(1.0), rows(5.0)  # the same validation metrics, other test metrics
    chosen = select_on_validation(a)
    assert chosen == select_on_validation(b)
    for seed, arm in chosen.items():
        candidates = [r for r in a if r["seed"] == seed and r["kind"] in ("synthetic", "oversampled+synthetic") and "/n=" not in r["arm"]]
        best = max(r["val_metrics"]["rare_average_precision"] for r in candidates)
        assert next(r for r in candidates if r["arm"] == arm)["val_metrics"]["rare_average_precision"] == best
    summary = summarize_results(a, n_boot=200)
    sel = summary["selection"]
    assert [s["arm"] for s in sel["per_seed"]] == [chosen[s] for s in range(3)]
    by = {(r["arm"], r["seed"]): r for r in a}
    for s in sel["per_seed"]:
        assert s["metrics"] == by[(s["arm"], s["seed"])]["metrics"]
        ratio = by[(s["arm"], s["seed"])]["ratio"]
        assert s["matched_control"] == f"oversampled@{ratio:g}"
    assert {c["baseline"] for c in sel["comparisons"]} == {"oversampled@r (matched)", "oversampled (chosen on validation)", "real_only"}
    assert "## Chosen on validation" in markdown_summary(summary) and "test metrics never read" in markdown_summary(summary)


def test_a_sweep_of_every_generation_mode_with_variants_and_the_combined_arm(tmp_path):
    """The modes and variants end to end on the built-in model, small: every arm trains and is
    evaluated on validation and test, translation records are soft-labelled by the classes the
    reference classifier confuses with the rare one, the gated pool is a gated subset of its mode's
    pool, and the summary names one chosen arm per seed."""
    from synthaug.cache.codec import SoftLabel
    from synthaug.cache.store import SyntheticCache

    out = tmp_path / "modes"
    cfg = SweepConfig(ratios=[0.25], seeds=1, per_class=60, shots=12, steps=12, batch_size=32, lora_steps=2, generation_steps=4,
                      arms=["real_only", "oversampled", "synthetic", "oversampled+synthetic"], generation=["txt2img", "img2img", "translate", "feedback"],
                      variants=["weighted", "gated", "refit"], gate=[0.05, 1.0], synthetic_images=16, set_sizes=[], test_size=300, bootstrap=200,
                      val_shots=4, refit_steps=5, reference_steps=60, out=str(out))
    summary = run_sweep(cfg, progress=False)
    rows = json.loads((out / "results.json").read_text())["rows"]
    want = {"real_only", "oversampled@0.25"} | {f"synthetic{t}@0.25" for t in ("", "[img2img]", "[translate]", "[feedback]")}
    want |= {f"synthetic{t}+{v}@0.25" for t in ("", "[img2img]", "[translate]", "[feedback]") for v in ("weighted", "gated", "refit")}
    want |= {f"oversampled+synthetic{t}@0.25" for t in ("", "[img2img]", "[translate]", "[feedback]")}
    assert {r["arm"] for r in rows} == want
    for r in rows:
        assert r["val_metrics"]["rare_support"] == 4 and r["metrics"]["rare_support"] > 0  # validation: the 4 val shots
        assert r["training"]["steps"] == 12
    by = {r["arm"]: r for r in rows}
    assert "refit" in by["synthetic[img2img]+refit@0.25"]["training"] and "refit" not in by["synthetic[img2img]@0.25"]["training"]
    assert by["synthetic+weighted@0.25"]["training"]["synthetic_samples"] > 0
    assert by["oversampled+synthetic[translate]@0.25"]["rare_draws"] == by["oversampled@0.25"]["rare_draws"]  # matched draws
    seed_dir = out / "seeds" / "seed-0"
    translated = SyntheticCache(seed_dir / "synthetic-translate.lmdb", readonly=True)
    folders = [p.name for p in (seed_dir / "translate_sources").iterdir()]  # named by class, or by index ("T-shirt/top")
    chosen = {translated.label_names[int(n)] if n.isdigit() else n for n in folders}
    assert len(chosen) == cfg.translate_classes and "Shirt" not in chosen
    for q in translated.seqs():
        rec = translated.get(q)
        assert isinstance(rec.label, SoftLabel) and translated.label_names[rec.label.target] == "Shirt"
        assert rec.meta["mode"] == "translate" and rec.meta["source_class_name"] in chosen and rec.meta["strength"] in cfg.strengths
    full, gated = (SyntheticCache(seed_dir / f"synthetic-feedback{s}.lmdb", readonly=True) for s in ("", "-gated"))
    assert 0 < len(gated) <= len(full)
    for q in gated.seqs():
        m = gated.get(q).meta
        assert m["gate_score"] >= 0.05 and m["source_seq"] in full.seqs()
    from PIL import Image

    with Image.open(seed_dir / "samples.png") as im:  # the real shots and one row per pool
        assert im.size[0] > 400 and im.size[1] > 300
    selection = summary["selection"]["per_seed"][0]
    assert selection["arm"] in want - {"real_only", "oversampled@0.25"} and selection["matched_control"] == "oversampled@0.25"


def test_a_derived_pool_killed_while_built_is_rebuilt_whole(tmp_path):
    """A gated pool whose building failed half-way is not taken for a whole one on resume: it is
    built in a partial folder, renamed when complete, and built again from scratch after a failure."""
    from synthaug.cache.store import SyntheticCache
    from synthaug.evaluation.sweep_pools import gated_pool

    pool = SyntheticCache(tmp_path / "pool.lmdb")
    pool.append(np.stack([np.full((8, 8, 1), i % 256, np.uint8) for i in range(600)]), [6] * 600, [{"i": i} for i in range(600)])

    class EvenGate:
        spec = {"kind": "even pixels"}
        calls = 0
        fail_at = None

        def filter(self, images):
            EvenGate.calls += 1
            if EvenGate.calls == EvenGate.fail_at:
                raise RuntimeError("killed")
            values = np.array([int(im[0, 0, 0]) for im in images])
            return values % 2 == 0, values / 255.0

    EvenGate.fail_at = 2  # the second batch of 256: the first batch's 128 kept records are already stored
    with pytest.raises(RuntimeError, match="killed"):
        gated_pool(pool, EvenGate(), tmp_path / "gated.lmdb")
    assert not (tmp_path / "gated.lmdb").exists()
    EvenGate.calls, EvenGate.fail_at = 0, None
    gated = gated_pool(pool, EvenGate(), tmp_path / "gated.lmdb")
    assert len(gated) == 300 and not (tmp_path / "gated.lmdb.partial").exists()
    assert sorted(m["source_seq"] for m in gated.metas().values()) == list(range(0, 600, 2))
    calls = EvenGate.calls
    assert len(gated_pool(pool, EvenGate(), tmp_path / "gated.lmdb")) == 300 and EvenGate.calls == calls  # reused, not rebuilt


# ------------------------------------------------------------------ mismatches caught before work
@needs_fmnist
def test_sweep_mismatches_are_refused_before_anything_is_written(tmp_path):
    """Each mistake is one clear line, found before the sweep's folder is written or anything
    trains, so the corrected rerun is not refused for "other settings"."""
    from synthaug.cache.store import SyntheticCache

    out = tmp_path / "sweep"
    base = dict(ratios=[0.5], seeds=2, per_class=20, shots=5, steps=5, arms=["real_only", "synthetic"], set_sizes=[], out=str(out),
                base_model="builtin:fashion-mnist-ddpm")
    wrong = SyntheticCache(tmp_path / "wrong.lmdb", label_names=["crack"])
    wrong.append(np.zeros((4, 28, 28, 1), np.uint8), 0, {"adapter": "somewhere"})
    wrong.close()
    cases = [
        (dict(per_class=7000), r"class 'T-shirt/top' \(label 0\) has 6000 training images; cannot draw 7000 for --per-class: lower --per-class to at most 6000"),
        (dict(shots=6001), r"cannot draw 6001 for --shots"),
        (dict(cache=str(tmp_path / "wrong.lmdb")), r"holds records of classes fashion-mnist lacks: 0 \('crack'\) ×4 .*synthaug cache relabel"),
        (dict(synthetic_images=8, set_sizes=[4, 30]), r"--set-sizes \[30\] are larger than the synthetic pool \(the pool holds --synthetic-images 8\)"),
        (dict(test_size=20000), r"--test-size 20000 is larger than the test set \(10000 images\)"),
    ]
    for settings, expected in cases:
        with pytest.raises(ValueError, match=expected):
            run_sweep(SweepConfig(**{**base, **settings}), progress=False)
        assert not out.exists(), settings


def test_an_adapter_of_another_image_size_is_named_and_refused_with_strict(tmp_path):
    """A csv study of 16-pixel images with the 28-pixel built-in model: a warning with both sizes;
    --strict refuses before any training."""
    from synthaug.data.study import load_study_dataset
    from synthaug.evaluation.sweep_checks import preflight

    csv_path, _images, _target = _write_digit_csv(tmp_path)
    cfg = SweepConfig(dataset=f"csv:{csv_path}", rare_class="Seven", shots=6, per_class=150, ratios=[0.25], seeds=1, steps=15,
                      arms=["real_only", "synthetic"], set_sizes=[], image_size=16, base_model="builtin:fashion-mnist-ddpm",
                      out=str(tmp_path / "sweep"))
    data = load_study_dataset(cfg.dataset, rare_class=cfg.rare_class, image_size=16)
    checks = preflight(cfg, data, None, steps_of=lambda n: 15)
    assert checks["warnings"] == ["base model builtin:fashion-mnist-ddpm makes 28×28 images with 1 channel(s), but the study's images are "
                                  "16×16 with 1: synthetic images are resized and converted to fit, which may not look like the real ones"]
    # and the run is too small to mean anything: 15 steps, one seed
    assert checks["too_small"].startswith("too small to compare arms: 15 optimizer steps per arm (under 100")
    assert "one seed" in checks["too_small"]
    with pytest.raises(ValueError, match=r"makes 28×28 images .* --strict refuses it"):
        run_sweep(SweepConfig(**{**cfg.__dict__, "strict": True}), progress=False)
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_that_finished_no_arm_does_not_block_the_corrected_rerun(tmp_path):
    from synthaug.evaluation.sweep import _prepare_out

    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep_config.json").write_text(json.dumps({"per_class": 1000}))
    (out / "seeds").mkdir()
    cfg = SweepConfig(ratios=[0.5], seeds=1, per_class=20, shots=5, steps=5, set_sizes=[], out=str(out))
    assert _prepare_out(out, cfg, {}) == [] and not (out / "seeds").exists()
    # one that finished an arm is kept: its results are refused to be thrown away without --overwrite
    (out / "results.json").write_text(json.dumps({"rows": [{"arm": "real_only", "seed": 0}]}))
    (out / "sweep_config.json").write_text(json.dumps({"per_class": 1000}))
    with pytest.raises(FileExistsError, match="holds a sweep with other settings"):
        _prepare_out(out, cfg, {})
