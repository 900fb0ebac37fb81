"""Generation modes on the tiny random-weight models (tests/helpers/tiny_sd.py): strength sets,
translation from other classes with hard and soft labels, feedback-guided sampling, and their
CLI flags.

Torch runs with one thread (see tests/test_generation.py).
"""

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import synthaug
from synthaug import GenerationWorker, SyntheticCache, load_generator
from synthaug.adapter import image_sha256
from synthaug.cache.codec import SoftLabel
from synthaug.data.folders import read_image
from synthaug.generation.ddpm import make_scheduler, sample_pixel_ddpm
from synthaug.generation.modes import STRENGTH_STREAM, strength_for_seed, strength_groups

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "a photo of sks shirt"
STRENGTHS = [0.25, 0.5, 0.75, 1.0]


def _save(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _canvas(images, size=16, top=2, left=2):
    """uint8 h×w×1 images on the tiny DDPM's 16×16 canvas in [-1, 1] (background -1)."""
    import torch

    x = torch.full((len(images), 1, size, size), -1.0)
    for i, im in enumerate(images):
        x[i, 0, top : top + im.shape[0], left : left + im.shape[1]] = torch.from_numpy(im[:, :, 0].astype(np.float32) / 127.5 - 1.0)
    return x


def _patterns(n, seed=0):
    """12×12 gray images of three classes: bright top half (a), left half (b), centre (c)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        c = i % 3
        x = rng.normal(60, 25, (12, 12))
        if c == 0:
            x[:6] += 120
        elif c == 1:
            x[:, :6] += 120
        else:
            x[3:9, 3:9] += 120
        images.append(np.clip(x, 0, 255).astype(np.uint8)[..., None])
        labels.append(c)
    return images, labels


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    """``DIR/b/`` (2 images) and ``DIR/c/`` (3 images): translate sources for target class a (0)."""
    root = tmp_path_factory.mktemp("translate-sources")
    rng = np.random.default_rng(1)
    for cls, n in (("b", 2), ("c", 3)):
        for i in range(n):
            _save(root / cls / f"{i}.png", rng.integers(0, 256, (12, 12), dtype=np.uint8))
    (root / "notes.txt").write_text("files beside the class folders are ignored")
    return root


@pytest.fixture(scope="module")
def reference_classifier(tmp_path_factory):
    """A reference classifier of the tiny DDPM's classes (a, b, c), trained in about a second."""
    import torch

    from synthaug.classifier import train_reference_classifier

    torch.set_num_threads(1)
    images, labels = _patterns(300)
    ref = train_reference_classifier(images, labels, ["a", "b", "c"], steps=100, batch_size=32, trained_on="patterns")
    return ref.save(tmp_path_factory.mktemp("reference") / "ref.pt")


# ---------------------------------------------------------------------------------- strength sets
def test_strength_draw_is_per_seed_and_independent_of_the_source():
    draws = [strength_for_seed(s, STRENGTHS) for s in range(400)]
    assert set(draws) == set(STRENGTHS)
    assert draws == [STRENGTHS[int(np.random.default_rng([s, STRENGTH_STREAM]).integers(4))] for s in range(400)]
    # the source is seed % len(sources): every (source, strength) pair occurs, also for 2 and 4 sources
    for n_sources in (2, 4):
        assert len({(s % n_sources, d) for s, d in enumerate(draws)}) == 4 * n_sources
    assert strength_for_seed(12345, [0.3]) == 0.3
    groups = strength_groups([10, 11, 12, 13, 14], STRENGTHS)
    assert sorted(p for _, ps in groups for p in ps) == list(range(5))
    assert all(strength_for_seed(10 + p, STRENGTHS) == s for s, ps in groups for p in ps)
    assert strength_groups([1, 2], None) == [(None, [0, 1])]


def test_pixel_strength_set_records_and_remakes_each_image(tiny_ddpm_dir, class_folder):
    gen = load_generator(tiny_ddpm_dir, label=0, mode="img2img", source_images=class_folder / "c", strength=STRENGTHS, batch_size=4, eta=0.5)
    batch = gen.generate(8, 100)
    strengths = [m["strength"] for m in batch.meta]
    assert strengths == [strength_for_seed(100 + i, STRENGTHS) for i in range(8)] and len(set(strengths)) >= 2
    assert [m["batch"] for m in batch.meta] == [[100, 4]] * 4 + [[104, 4]] * 4
    assert gen.spec["overrides"]["strength"] == STRENGTHS and batch.labels == [0] * 8
    for i, (image, m) in enumerate(zip(batch.images, batch.meta)):
        first, size = m["batch"]
        np.testing.assert_array_equal(gen.generate(size, first).images[m["seed"] - first], image)  # bit for bit
        one = gen.generate(1, 100 + i)  # one image alone: within CPU kernel rounding
        assert one.meta[0]["strength"] == m["strength"] and one.meta[0]["source_image"] == m["source_image"]
        assert np.abs(one.images[0].astype(int) - image.astype(int)).max() <= 1
    # the strength matters: the same seeds at one fixed strength give other images where it differs
    fixed = load_generator(tiny_ddpm_dir, label=0, mode="img2img", source_images=class_folder / "c", strength=1.0, batch_size=4, eta=0.5)
    other = [i for i, s in enumerate(strengths) if s != 1.0]
    assert np.abs(fixed.generate(8, 100).images[other].astype(int) - batch.images[other].astype(int)).mean() > 1


def test_pixel_single_strength_is_one_sampler_call(tiny_ddpm_dir, class_folder):
    """A single float strength makes exactly the images of one sampler call per batch (the
    behaviour before strength sets)."""
    gen = load_generator(tiny_ddpm_dir, label=2, mode="img2img", source_images=class_folder / "b", strength=0.5, batch_size=3)
    batch = gen.generate(3, 7)
    sources = [read_image(f, channels=1) for f in sorted((class_folder / "b").glob("*.png"))]
    x0 = _canvas([sources[s % 2] for s in (7, 8, 9)])
    direct = sample_pixel_ddpm(gen.unet, make_scheduler(tiny_ddpm_dir, "ddim"), seeds=[7, 8, 9], label=2, null_class=3,
                               num_inference_steps=4, image_size=16, crop=[2, 2, 12, 12], x0=x0, strength=0.5)
    np.testing.assert_array_equal(batch.images, direct)
    assert all(m["strength"] == 0.5 for m in batch.meta) and gen.spec["overrides"]["strength"] == 0.5


def test_sd_strength_set_and_single_strength(tiny_sd_dir, class_folder):
    from diffusers import AutoPipelineForImage2Image
    from PIL import Image
    import torch

    files = sorted((class_folder / "c").glob("*.png"))
    gen = load_generator(tiny_sd_dir, prompt=PROMPT, label=3, num_inference_steps=3, mode="img2img", source_images=files, strength=[0.5, 1.0], batch_size=3)
    batch = gen.generate(3, 20)
    assert [m["strength"] for m in batch.meta] == [strength_for_seed(s, [0.5, 1.0]) for s in (20, 21, 22)]
    assert len({m["strength"] for m in batch.meta}) == 2  # this batch mixes strengths: two pipeline calls
    for i in range(3):
        np.testing.assert_array_equal(gen.generate(3, 20).images[i], batch.images[i])
        assert gen.generate(1, 20 + i).meta[0]["strength"] == batch.meta[i]["strength"]
    # one float: one pipeline call, as a direct diffusers img2img call makes it
    single = load_generator(tiny_sd_dir, prompt=PROMPT, label=3, num_inference_steps=3, mode="img2img", source_images=files, strength=0.5)
    pipe = AutoPipelineForImage2Image.from_pipe(single.pipe)
    source = Image.open(files[21 % 3]).convert("RGB").resize((32, 32), Image.BICUBIC)
    out = pipe(prompt=[PROMPT], image=[source], strength=0.5, num_inference_steps=3, guidance_scale=single.guidance_scale,
               generator=[torch.Generator("cpu").manual_seed(21)], output_type="np").images
    np.testing.assert_array_equal(single.generate(1, 21).images[0], (np.clip(out[0], 0, 1) * 255).round().astype(np.uint8))


# ---------------------------------------------------------------------------------- translate
def _check_translated(batch, hashes, expect_classes, gamma):
    for label, m in zip(batch.labels, batch.meta):
        k = m["seed"] % len(hashes)
        assert m["mode"] == "translate" and m["source_index"] == k and m["source_image"] == hashes[k]
        assert m["source_class"] == expect_classes[k] and m["soft_label_gamma"] == gamma and m["strength"] in STRENGTHS
        s = m["strength"]
        if gamma is None:
            assert label == m["label"]
        elif s == 1.0:
            assert label == SoftLabel({m["label"]: 1.0})
        else:
            assert isinstance(label, SoftLabel) and list(label) == [m["label"], m["source_class"]]  # target first
            assert label[m["label"]] == s**gamma and label[m["source_class"]] == 1 - s**gamma
        json.dumps(m)


def test_pixel_translate_from_a_class_folder(tiny_ddpm_dir, class_folder, tmp_path):
    gen = load_generator(tiny_ddpm_dir, label=0, mode="translate", source_images=class_folder, strength=STRENGTHS, soft_label_gamma=0.5, batch_size=4)
    batch = gen.generate(10, 0)
    expect = [1, 1, 2, 2, 2]  # b/0.png, b/1.png, c/0.png, c/1.png, c/2.png
    hashes = [image_sha256(read_image(f, channels=1)) for f in sorted(class_folder.glob("*/*.png"))]
    _check_translated(batch, hashes, expect, 0.5)
    assert {m["source_class_name"] for m in batch.meta} == {"b", "c"}
    assert any(isinstance(lab, SoftLabel) and len(lab) == 2 for lab in batch.labels)
    # soft labels go through the cache exactly, filed under the target class
    cache = SyntheticCache(tmp_path / "c", label_names=["a", "b", "c"])
    seqs = cache.append(batch.images, batch.labels, batch.meta)
    for seq, label in zip(seqs, batch.labels):
        rec = cache.get(seq)
        assert rec.label == label and type(rec.label) is type(label) and rec.meta["source_class"] == batch.meta[seq]["source_class"]
    assert cache.labels() == dict(zip(seqs, batch.labels)) and cache.label_histogram() == {"0 (a)": 10}
    # the spec carries the folder; rebuilt elsewhere it makes the same records
    assert gen.spec["overrides"]["source_images"] == str(class_folder) and gen.spec["overrides"]["soft_label_gamma"] == 0.5
    again = synthaug.generator_from_spec(json.loads(json.dumps(gen.spec))).generate(4, 0)
    np.testing.assert_array_equal(again.images, batch.images[:4])
    assert again.labels == batch.labels[:4]
    # image i of a call is generate(1, seed + i), with its source and label
    one = gen.generate(1, 7)
    assert one.labels[0] == batch.labels[7] and one.meta[0]["source_image"] == batch.meta[7]["source_image"]
    # hard labels without gamma
    hard = load_generator(tiny_ddpm_dir, label=0, mode="translate", source_images=class_folder, strength=STRENGTHS).generate(5, 0)
    _check_translated(hard, hashes, expect, None)
    assert hard.labels == [0] * 5


def test_pixel_translate_from_files_with_classes_and_errors(tiny_ddpm_dir, class_folder, tmp_path):
    files = sorted(class_folder.glob("*/*.png"))
    gen = load_generator(tiny_ddpm_dir, label=1, mode="translate", source_images=files[2:4] + [files[0]], source_classes=["c", 2, "0"],
                         strength=0.75, soft_label_gamma=2.0)
    batch = gen.generate(3, 0)
    assert [m["source_class"] for m in batch.meta] == [2, 2, 0] and [m["source_class_name"] for m in batch.meta] == ["c", "c", "a"]
    assert batch.labels[2] == SoftLabel({1: 0.75**2, 0: 1 - 0.75**2})
    assert gen.spec["overrides"]["source_classes"] == ["c", 2, "0"]
    # a folder whose class folders are named by index
    by_index = tmp_path / "by-index"
    shutil.copytree(class_folder / "c", by_index / "2")
    assert {m["source_class"] for m in load_generator(tiny_ddpm_dir, label=0, mode="translate", source_images=by_index).generate(2, 0).meta} == {2}

    def refused(match, **kw):
        with pytest.raises(ValueError, match=match):
            load_generator(tiny_ddpm_dir, **{"label": 0, "mode": "translate", **kw})

    refused(r"translate makes class 0 \(a\) from images of other classes, but 1 source images are of that class", source_images=files[:2], source_classes=["b", "a"])
    same = tmp_path / "with-target"
    shutil.copytree(class_folder, same)
    shutil.copytree(class_folder / "b", same / "a")
    refused(r"2 source images are of that class", source_images=same)
    flat = tmp_path / "flat"
    shutil.copytree(class_folder / "b", flat)
    refused(r"has no class subfolders; lay it out as .*/<class name or index>/\*\.png", source_images=flat)
    refused(r"needs source_classes", source_images=files)
    unknown = tmp_path / "unknown"
    shutil.copytree(class_folder / "b", unknown / "zebra")
    refused(r"in .*unknown, class folder 'zebra' is not a class of this model: give one of \['a', 'b', 'c'\] or an index", source_images=unknown)
    refused(r"one class per source image: 5 images, 2 classes", source_images=files, source_classes=["b", "c"])
    refused(r"source_classes\[1\] 'zebra' is not a class of this model: give one of \['a', 'b', 'c'\]", source_images=files[:2], source_classes=["b", "zebra"])
    refused(r"source_classes\[0\] 7 is outside the model's 3 classes", source_images=files[:1], source_classes=[7])
    refused(r"drop source_classes", source_images=class_folder, source_classes=["b"])
    refused(r"soft_label_gamma must be a number > 0", source_images=class_folder, soft_label_gamma=0)
    refused(r"needs source_images", source_images=None)
    with pytest.raises(ValueError, match=r"soft_label_gamma applies to mode='translate' only"):
        load_generator(tiny_ddpm_dir, label=0, mode="img2img", source_images=files, soft_label_gamma=1.0)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        load_generator(tiny_ddpm_dir, label=0, mode="img2img", source_images=files, strength=[0.5, 1.5])


def test_sd_translate_names_sources_and_labels_softly(tiny_sd_dir, class_folder):
    files = sorted(class_folder.glob("*/*.png"))  # no label names without an adapter: classes by index
    with pytest.raises(ValueError, match=r"strength 0.25 × 3 steps leaves no denoising step .* at least 4"):
        load_generator(tiny_sd_dir, prompt=PROMPT, label=3, num_inference_steps=3, mode="img2img", source_images=files, strength=STRENGTHS)
    gen = load_generator(tiny_sd_dir, prompt=PROMPT, label=3, num_inference_steps=4, mode="translate", source_images=files,
                         source_classes=[1, 1, "2", 2, 2], strength=STRENGTHS, soft_label_gamma=1.0)
    batch = gen.generate(5, 40)
    _check_translated(batch, [image_sha256(read_image(f)) for f in files], [1, 1, 2, 2, 2], 1.0)
    assert all(m["source_class_name"] is None for m in batch.meta)
    np.testing.assert_array_equal(gen.generate(1, 42).images[0], batch.images[2])
    assert gen.generate(1, 42).labels[0] == batch.labels[2]
    assert gen.spec["overrides"]["source_images"] == [str(f.resolve()) for f in files]
    txt = load_generator(tiny_sd_dir, prompt=PROMPT, label=3, num_inference_steps=4).generate(5, 40).images
    assert np.abs(txt.astype(int) - batch.images.astype(int)).mean() > 5
    with pytest.raises(ValueError, match="source images are of that class"):
        load_generator(tiny_sd_dir, prompt=PROMPT, label=3, mode="translate", source_images=files[:1], source_classes=[3])
    with pytest.raises(ValueError, match=r"mode='feedback' \(classifier-guided sampling\) is available for the pixel-DDPM backend only"):
        load_generator(tiny_sd_dir, prompt=PROMPT, label=3, mode="feedback", feedback_classifier="ref.pt")


def test_sd_translate_with_adapter_label_names(tiny_sd_dir, class_folder, tmp_path):
    from tests.helpers.tiny_sd import write_tiny_sd_lora_adapter

    adapter = write_tiny_sd_lora_adapter(tiny_sd_dir, tmp_path / "adapter", label=0, class_name="a", label_names=["a", "b", "c"],
                                         generation={"num_inference_steps": 2, "guidance_scale": 1.0})
    gen = load_generator(adapter, mode="translate", source_images=class_folder, strength=0.5, soft_label_gamma=1.0)
    batch = gen.generate(2, 2)  # sources 2 (c/0.png) and 3 (c/1.png)
    assert [m["source_class_name"] for m in batch.meta] == ["c", "c"] and batch.labels == [SoftLabel({0: 0.5, 2: 0.5})] * 2


def test_worker_translates_in_a_spawned_process(tmp_path, tiny_ddpm_dir, class_folder, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cache = SyntheticCache(tmp_path / "c")
    gen = load_generator(tiny_ddpm_dir, label=0, mode="translate", source_images=class_folder, strength=STRENGTHS, soft_label_gamma=1.0, batch_size=2)
    with GenerationWorker(cache, gen.spec, min_fresh=4, max_items=20, batch_size=2, seed=0, num_threads=1, poll_interval=0.02):
        deadline = time.monotonic() + 120
        while len(cache) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(cache) >= 4 and cache.verify()["corrupt"] == 0
    here = gen.generate(4, 0)
    for seq in range(4):
        rec = cache.get(seq)
        assert rec.meta["mode"] == "translate" and rec.meta["source_class_name"] in ("b", "c")
        assert rec.meta["source_image"] == here.meta[seq]["source_image"] and rec.meta["strength"] == here.meta[seq]["strength"]
        assert rec.label == here.labels[seq]
        np.testing.assert_array_equal(rec.image, here.images[seq])


# ---------------------------------------------------------------------------------- feedback
def _objective(path, images, objective, target=0):
    from synthaug.classifier import ReferenceClassifier

    p = ReferenceClassifier.load(path).probabilities(list(images)).astype(np.float64)
    if objective == "entropy":
        return -(p * np.log(np.clip(p, 1e-12, 1))).sum(axis=1)
    return -np.log(np.clip(p[:, target], 1e-12, 1))


@pytest.mark.parametrize("objective, scale", [("entropy", 5.0), ("loss", 0.5)])
def test_feedback_makes_images_the_classifier_finds_harder(tiny_ddpm_dir, reference_classifier, objective, scale):
    from synthaug.classifier import ReferenceClassifier

    plain = load_generator(tiny_ddpm_dir, label=0, batch_size=8).generate(16, 0)
    guided_gen = load_generator(tiny_ddpm_dir, label=0, mode="feedback", feedback_classifier=reference_classifier,
                                feedback_scale=scale, feedback_objective=objective, batch_size=8)
    guided = guided_gen.generate(16, 0)
    before, after = _objective(reference_classifier, plain.images, objective), _objective(reference_classifier, guided.images, objective)
    # measured over tiny models and classifiers of seeds 0-3: 1.17-4.5× the plain mean, >= 15 of 16 images higher
    assert after.mean() > 1.1 * before.mean() and (after > before).mean() >= 0.75, (before.mean(), after.mean())
    m = guided.meta[0]
    assert (m["mode"], m["feedback_objective"], m["feedback_scale"]) == ("feedback", objective, scale)
    assert m["feedback_classifier"] == str(Path(reference_classifier).resolve())
    assert m["feedback_classifier_sha256"] == ReferenceClassifier.load(reference_classifier).sha256
    # per-image seeds, as in every mode; the spec rebuilds it
    np.testing.assert_array_equal(guided_gen.generate(8, 8).images, guided.images[8:])
    assert np.abs(guided_gen.generate(1, 3).images[0].astype(int) - guided.images[3].astype(int)).max() <= 1
    again = synthaug.generator_from_spec(json.loads(json.dumps(guided_gen.spec))).generate(8, 0)
    np.testing.assert_array_equal(again.images, guided.images[:8])


def test_feedback_scale_zero_is_plain_sampling_and_errors(tiny_ddpm_dir, reference_classifier, tmp_path):
    import torch

    from synthaug.classifier import ReferenceClassifier

    plain = load_generator(tiny_ddpm_dir, label=1, eta=1.0).generate(4, 3)
    zero = load_generator(tiny_ddpm_dir, label=1, eta=1.0, mode="feedback", feedback_classifier=reference_classifier, feedback_scale=0).generate(4, 3)
    np.testing.assert_array_equal(zero.images, plain.images)
    assert zero.meta[0]["feedback_scale"] == 0.0 and zero.meta[0]["feedback_objective"] == "entropy"
    # the torch objective sees what the classifier sees in the stored uint8 images
    gen = load_generator(tiny_ddpm_dir, label=1, mode="feedback", feedback_classifier=reference_classifier)
    with torch.no_grad():
        values = gen.feedback.values(_canvas(list(plain.images))).numpy()
    np.testing.assert_allclose(values, _objective(reference_classifier, plain.images, "entropy"), rtol=1e-4, atol=1e-5)
    # a classifier of another label space cannot say what 'loss' is for this class
    other = ReferenceClassifier.load(reference_classifier)
    other.classes = ["x", "y", "z"]
    other.save(tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"needs the generator's class 'b' among the reference classifier's classes \['x', 'y', 'z'\]"):
        load_generator(tiny_ddpm_dir, label=1, mode="feedback", feedback_classifier=tmp_path / "other.pt", feedback_objective="loss")
    load_generator(tiny_ddpm_dir, label=1, mode="feedback", feedback_classifier=tmp_path / "other.pt")  # entropy needs no class
    with pytest.raises(ValueError, match="mode='feedback' needs feedback_classifier"):
        load_generator(tiny_ddpm_dir, label=1, mode="feedback")
    with pytest.raises(ValueError, match="feedback_scale must be a number >= 0"):
        load_generator(tiny_ddpm_dir, label=1, mode="feedback", feedback_classifier=reference_classifier, feedback_scale=-1)
    with pytest.raises(ValueError, match=r"feedback_objective must be one of \('entropy', 'loss'\)"):
        load_generator(tiny_ddpm_dir, label=1, mode="feedback", feedback_classifier=reference_classifier, feedback_objective="margin")
    with pytest.raises(ValueError, match=r"feedback_scale applies to mode='feedback' only"):
        load_generator(tiny_ddpm_dir, label=1, feedback_scale=1.0)
    with pytest.raises(FileNotFoundError, match="reference classifier .*missing.pt does not exist"):
        load_generator(tiny_ddpm_dir, label=1, mode="feedback", feedback_classifier=tmp_path / "missing.pt")


# ---------------------------------------------------------------------------------- CLI
def _cli(capsys, *args):
    from synthaug.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_translate_writes_source_classes(tmp_path, tiny_ddpm_dir, class_folder, capsys):
    code, out, err = _cli(capsys, "generate", "--model", tiny_ddpm_dir, "--label", 0, "--mode", "translate", "--source-images", class_folder,
                          "--strength", "0.5,1", "--soft-label-gamma", 1, "--cache", tmp_path / "c", "--count", 4, "--seed", 3)
    assert code == 0, err
    assert "wrote 4 images" in out
    cache = SyntheticCache(tmp_path / "c", readonly=True)
    assert cache.label_names == ["a", "b", "c"]
    for seq in range(4):
        rec = cache.get(seq)
        m = rec.meta
        assert m["mode"] == "translate" and m["source_class_name"] in ("b", "c") and m["strength"] in (0.5, 1.0) and m["seed"] == 3 + seq
        assert rec.label == (SoftLabel({0: 1.0}) if m["strength"] == 1.0 else SoftLabel({0: 0.5, m["source_class"]: 0.5}))
    # files with their classes
    files = sorted(class_folder.glob("*/*.png"))[:2]
    code, out, err = _cli(capsys, "generate", "--model", tiny_ddpm_dir, "--label", 2, "--mode", "translate", "--source-images", *files,
                          "--source-classes", "b,0", "--cache", tmp_path / "d", "--count", 2)
    assert code == 0, err
    d = SyntheticCache(tmp_path / "d", readonly=True)
    assert [d.get(q).meta["source_class"] for q in range(2)] == [1, 0] and [d.get(q).label for q in range(2)] == [2, 2]


def test_cli_bad_combinations_give_one_line(tmp_path, tiny_ddpm_dir, tiny_sd_dir, class_folder, reference_classifier, capsys):
    base = ["generate", "--model", tiny_ddpm_dir, "--label", 0, "--cache", tmp_path / "c", "--count", 1]
    cases = [
        (["--soft-label-gamma", 1], "--soft-label-gamma applies to --mode translate only"),
        (["--source-images", class_folder / "b", "--soft-label-gamma", 1], "--soft-label-gamma applies to --mode translate only"),
        (["--strength", "0.5"], "--strength applies to --mode img2img or translate, not txt2img"),
        (["--mode", "translate"], "--mode translate needs --source-images"),
        (["--mode", "translate", "--source-images", *sorted(class_folder.glob("*/*.png"))], "needs --source-classes"),
        (["--mode", "translate", "--source-images", class_folder, "--source-classes", "b"], "--source-classes is for a list of image files"),
        (["--source-classes", "b"], "--source-classes applies to --mode translate only"),
        (["--feedback-scale", 2], "--feedback-scale applies to --mode feedback only"),
        (["--mode", "feedback"], "--mode feedback needs --feedback-classifier FILE"),
    ]
    for extra, message in cases:
        code, out, err = _cli(capsys, *base, *extra)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0] and lines[0].startswith("synthaug generate: error:"), (extra, err)
    assert not (tmp_path / "c").exists()  # flags that do not go together are refused before the cache is created
    code, _, err = _cli(capsys, *base, "--mode", "translate", "--source-images", class_folder / "b")
    assert code == 2 and "has no class subfolders" in err and len(err.strip().splitlines()) == 1
    code, _, err = _cli(capsys, "generate", "--model", tiny_sd_dir, "--prompt", PROMPT, "--label", 0, "--cache", tmp_path / "s", "--count", 1,
                        "--mode", "feedback", "--feedback-classifier", reference_classifier)
    assert code == 2 and "available for the pixel-DDPM backend only" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as info:
        _cli(capsys, *base, "--mode", "img2img", "--source-images", class_folder / "b", "--strength", "0.5,2")
    assert info.value.code == 2 and "each strength must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(capsys, "generate", "--help")
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--mode {txt2img,img2img,translate,feedback}", "--strength S[,S...]", "--source-classes", "--soft-label-gamma",
                 "--feedback-classifier FILE", "--feedback-scale", "--feedback-objective {entropy,loss}", "ImageFolder"):
        assert flag in text, flag
    with pytest.raises(SystemExit):
        _cli(capsys, "worker", "--help")  # the worker takes the same generation flags
    assert "--mode {txt2img,img2img,translate,feedback}" in " ".join(capsys.readouterr().out.split())


def test_cli_feedback_run(tmp_path, tiny_ddpm_dir, reference_classifier, capsys):
    code, out, err = _cli(capsys, "generate", "--model", tiny_ddpm_dir, "--label", 1, "--mode", "feedback", "--feedback-classifier", reference_classifier,
                          "--feedback-scale", 2, "--feedback-objective", "loss", "--cache", tmp_path / "c", "--count", 2)
    assert code == 0, err
    m = SyntheticCache(tmp_path / "c", readonly=True).get(1).meta
    assert (m["mode"], m["feedback_scale"], m["feedback_objective"]) == ("feedback", 2.0, "loss") and os.path.isabs(m["feedback_classifier"])
