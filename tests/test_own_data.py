"""Your own data, end to end: the README's "Your own data" path with a torchvision ImageFolder of
classes the built-in model does not know (finetune, generate, inspect, mix), ``cache relabel``
of a cache made before, and MixedDataset's mapping by name into an ImageFolder, the Fashion-MNIST
dataset, a Hugging Face ``datasets.Dataset`` and a plain ``(x, y)`` dataset with ``classes``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from synthaug import MixedDataset, SyntheticCache, mixed_loader

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "SYNTHAUG_PROGRESS": "lines"}
CLASSES = ["crack", "ok", "scratch"]  # none is a Fashion-MNIST class


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "synthaug", *map(str, args)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """ROOT/<class>/*.png, 28×28 gray: Fashion-MNIST images of three garments under the user's
    names (crack = shirts, 24 of them; ok = trousers, scratch = bags, 12 each)."""
    from synthaug.data.fashion_mnist import FashionMNIST

    ds = FashionMNIST(train=True)
    root = tmp_path_factory.mktemp("my_data")
    for name, garment, n in (("crack", 6, 24), ("ok", 1, 12), ("scratch", 8, 12)):
        (root / name).mkdir()
        for i in np.nonzero(ds.targets.numpy() == garment)[0][:n]:
            Image.fromarray(ds.data[i].numpy()).save(root / name / f"{i}.png")
    return root


def test_your_own_image_folder_end_to_end(image_folder, tmp_path):
    """finetune --class-name crack --classes-from ROOT on the built-in model, generate, inspect,
    and mix into torchvision's ImageFolder of ROOT: every record says 'crack' and lands on
    ImageFolder's index of crack; the adapter's progress, plot title and summary say crack."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    adapter, cache = tmp_path / "adapter", tmp_path / "cache.lmdb"
    out = _cli("finetune", "--model", "builtin:fashion-mnist-ddpm", "--images", image_folder / "crack", "--out", adapter,
               "--class-name", "crack", "--classes-from", image_folder, "--steps", 4, "--batch-size", 4, "--validation-every", 4)
    assert out.returncode == 0, out.stderr
    assert "class 'crack', label 0 on the base model's slot 6 (untrained 'Shirt')" in out.stdout
    assert "LoRA crack" in out.stderr and "\r" not in out.stderr  # its progress names the class; a redirected log has no bars
    assert "__array__" not in out.stderr  # no third-party warning the user cannot act on
    cfg = json.loads((adapter / "synthaug.json").read_text())
    assert (cfg["class_name"], cfg["label"], cfg["label_names"], cfg["model_class"]) == ("crack", 0, CLASSES, 6)

    out = _cli("generate", "--adapter", adapter, "--cache", cache, "--count", 6, "--steps", 2)
    assert out.returncode == 0, out.stderr
    out = _cli("cache", "inspect", cache, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["stats"]["label_names"] == CLASSES and list(report["label_histogram"]) == ["0 (crack)"]
    records = SyntheticCache(cache, readonly=True)
    metas = records.metas()
    assert {m["label_name"] for m in metas.values()} == {"crack"} and {m["model_class_name"] for m in metas.values()} == {"Shirt"}
    assert set(records.scan_labels()[0].values()) == {0}
    records.close()

    real = ImageFolder(str(image_folder), transform=transforms.Compose([transforms.Grayscale(), transforms.PILToTensor()]))
    # 48 real images at 6 real + 2 synthetic per batch: 8 batches want 16 synthetic; the 6 records are reused
    loader = mixed_loader(real, cache, batch_size=8, synthetic_ratio=0.25, num_workers=2, seed=0, mark_synthetic=True,
                          on_exhausted="reuse")
    batches = list(loader)
    assert len(batches) == 8
    for x, y, synthetic in batches:
        assert x.shape == (8, 1, 28, 28) and int(synthetic.sum()) == 2
        assert set(y[synthetic].tolist()) == {real.class_to_idx["crack"]}


def test_cache_relabel_fixes_a_cache_made_before(image_folder, tmp_path):
    """A cache of the built-in model's class (label 6, 'Shirt') is refused by the user's
    ImageFolder; `synthaug cache relabel --class-name crack --classes-from ROOT` rewrites it (images
    untouched, provenance of the change on each record), and then it mixes by name."""
    from torchvision.datasets import ImageFolder

    path = tmp_path / "old.lmdb"
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    cache = SyntheticCache(path, label_names=names)
    images = np.random.default_rng(0).integers(0, 255, (300, 28, 28, 1), dtype=np.uint8)
    cache.append(images, 6, meta={"label": 6, "label_name": "Shirt"})
    cache.close()
    real = ImageFolder(str(image_folder))
    with pytest.raises(ValueError, match="'Shirt'.*a class the real dataset lacks"):
        MixedDataset(real, path)

    out = _cli("cache", "relabel", path, "--class-name", "crack", "--classes-from", image_folder)
    assert out.returncode == 0, out.stderr
    assert "relabelled 300 record(s)" in out.stdout and "6 ('Shirt') -> 0 ('crack')" in out.stdout
    cache = SyntheticCache(path, readonly=True)
    assert cache.label_names == CLASSES
    recs = cache.get_many(cache.seqs())
    assert all(r.label == 0 and r.meta["label_name"] == "crack" for r in recs)
    assert all(np.array_equal(r.image, im) for r, im in zip(recs, images))
    change = recs[0].meta["relabeled"][-1]
    assert (change["from"], change["to"], change["from_name"], change["to_name"]) == (6, 0, "Shirt", "crack")
    mixed = MixedDataset(real, cache)
    assert mixed.map_label(0) == real.class_to_idx["crack"]
    del mixed
    cache.close()
    # the same relabel again finds everything done; one that would clash with another class is refused
    out = _cli("cache", "relabel", path, "--class-name", "crack", "--classes-from", image_folder)
    assert out.returncode == 0 and "relabelled 0 record(s)" in out.stdout
    out = _cli("cache", "relabel", path, "--class-name", "crack", "--from", "Shirt")
    assert out.returncode != 0 and "neither a label nor a name" in out.stderr


def test_relabel_is_refused_while_a_writer_holds_the_cache(tmp_path):
    from synthaug.cache.writers import WriterLock

    path = tmp_path / "c"
    cache = SyntheticCache(path, label_names=["a"])
    cache.append(np.zeros((2, 8, 8, 1), np.uint8), 0)
    with WriterLock(path, 0, kind="test writer"):
        out = _cli("cache", "relabel", path, "--class-name", "b")
    assert out.returncode != 0 and "live writer" in out.stderr
    assert SyntheticCache(path, readonly=True).label_names == ["a"]


def test_label_names_of_different_generators_merge_or_are_refused(tmp_path):
    cache = SyntheticCache(tmp_path / "c")
    assert cache.adopt_label_names(["", "", "crack"]) == ["", "", "crack"]
    assert cache.adopt_label_names(["ok"]) == ["ok", "", "crack"]
    with pytest.raises(ValueError, match="label 2 named 'crack', but these records would name it 'Shirt'"):
        cache.adopt_label_names(["", "Trouser", "Shirt"])


def _cache_of(path, names, label, n=4):
    cache = SyntheticCache(path, label_names=names)
    cache.append(np.full((n, 28, 28, 1), 7, np.uint8), label)
    return cache


def test_mixed_dataset_maps_by_name_into_each_kind_of_dataset(tmp_path):
    """The cache names its class 'Bag' at label 0 (a one-class adapter's label space); each real
    dataset puts Bag elsewhere and MixedDataset finds it by name."""
    import datasets
    from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

    from synthaug.data.fashion_mnist import FashionMNIST

    _cache_of(tmp_path / "c", ["Bag"], 0)
    # synthaug's Fashion-MNIST dataset (and torchvision's, which has the same classes)
    assert MixedDataset(FashionMNIST(train=False), tmp_path / "c").map_label(0) == 8
    assert TorchvisionFashionMNIST.classes.index("Bag") == 8
    # a Hugging Face datasets.Dataset with a ClassLabel column
    hf = datasets.Dataset.from_dict(
        {"picture": [Image.fromarray(np.full((28, 28), i, np.uint8)) for i in range(4)], "kind": [0, 1, 2, 1]},
        features=datasets.Features({"picture": datasets.Image(), "kind": datasets.ClassLabel(names=["Sandal", "Bag", "Coat"])}),
    )
    with pytest.raises(ValueError, match="pass image_column= and label_column="):
        MixedDataset(hf, tmp_path / "c")
    mixed = MixedDataset(hf, tmp_path / "c", image_column="picture", label_column="kind")
    assert mixed.map_label(0) == 1
    from torchvision import transforms

    loader = mixed_loader(hf, tmp_path / "c", batch_size=4, synthetic_ratio=0.5, image_column="picture", label_column="kind",
                          transform=transforms.PILToTensor(), num_workers=2, mark_synthetic=True)
    batches = list(loader)
    assert all(set(y[s].tolist()) == {1} for _, y, s in batches) and sum(int(s.sum()) for _, _, s in batches) == 4
    with pytest.raises(ValueError, match="'label' is not a column"):
        MixedDataset(hf, tmp_path / "c", image_column="picture", label_column="label")

    # any (x, y) dataset with `classes`
    class Plain(torch.utils.data.Dataset):
        classes = ["Trouser", "Bag"]

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.zeros(1, 28, 28, dtype=torch.uint8), i % 2

    assert MixedDataset(Plain(), tmp_path / "c").map_label(0) == 1
    # a name the dataset lacks is refused when the dataset is built, naming both sides
    _cache_of(tmp_path / "d", ["crack"], 0)
    with pytest.raises(ValueError, match="label 0 \\('crack'\\), a class the real dataset lacks"):
        MixedDataset(Plain(), tmp_path / "d")


def test_a_relabel_interrupted_midway_is_finished_by_the_next_run(tmp_path, monkeypatch):
    """A relabel that dies in its third batch: the batches before it are whole, the names already
    say the new class (the old label is left unnamed, so readers refuse it rather than misname it),
    and `synthaug cache relabel` without --from finishes the rest: every record relabelled once."""
    from synthaug.cache import codec
    from synthaug.cli import main

    path = tmp_path / "c"
    cache = SyntheticCache(path, label_names=["a", "b", "Shirt"])
    images = np.random.default_rng(1).integers(0, 255, (1000, 8, 8, 1), dtype=np.uint8)
    cache.append(images, 2)
    cache.close()
    real_relabel, calls = codec.relabel_record, {"n": 0}

    def dies_in_the_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * 256 + 10:
            raise KeyboardInterrupt  # as a kill: the batch's transaction is never committed
        return real_relabel(*args, **kwargs)

    monkeypatch.setattr(codec, "relabel_record", dies_in_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        SyntheticCache(path).relabel({2: 0}, ["crack"], note={"by": "test"})
    monkeypatch.setattr(codec, "relabel_record", real_relabel)
    cache = SyntheticCache(path, readonly=True)
    labels = cache.scan_labels()[0]
    assert sum(v == 0 for v in labels.values()) == 512 and sum(v == 2 for v in labels.values()) == 488
    assert cache.label_names == ["crack"] and cache.pending_relabel()["mapping"] == [[2, 0]]
    cache.close()

    assert main(["cache", "relabel", str(path), "--class-name", "crack"]) == 0
    cache = SyntheticCache(path, readonly=True)
    recs = cache.get_many(cache.seqs())
    assert all(r.label == 0 and len(r.meta["relabeled"]) == 1 for r in recs)
    assert all(np.array_equal(r.image, im) for r, im in zip(recs, images))
    assert cache.pending_relabel() is None and cache.label_names == ["crack"]
