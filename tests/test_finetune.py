"""LoRA fine-tuning: both backends on tiny real-architecture models, resume, and bad input."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from synthaug.finetune import finetune_lora
from tests.helpers.tiny_sd import write_tiny_pixel_ddpm, write_tiny_sd

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shirt_images(tmp_path_factory):
    """Eight real Fashion-MNIST shirts (28×28 gray PNG) and, for the SD model, the same as RGB 40×40."""
    from synthaug.data.fashion_mnist import FashionMNIST

    ds = FashionMNIST(train=True)
    idx = np.nonzero(ds.targets.numpy() == 6)[0][:8]
    gray = tmp_path_factory.mktemp("shirts_gray")
    rgb = tmp_path_factory.mktemp("shirts_rgb")
    for i in idx:
        arr = ds.data[i].numpy()
        Image.fromarray(arr).save(gray / f"shirt_{i}.png")
        Image.fromarray(arr).convert("RGB").resize((40, 40)).save(rgb / f"shirt_{i}.png")
    return gray, rgb


@pytest.fixture(scope="module")
def tiny_pixel(tmp_path_factory):
    return write_tiny_pixel_ddpm(tmp_path_factory.mktemp("pixel"), classes=("coat", "shirt", "bag"))


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("sd"))


# ---------------------------------------------------------------------------------- pixel DDPM
def test_pixel_ddpm_adapter_is_written_and_generates(tiny_pixel, shirt_images, tmp_path):
    from synthaug import load_generator

    out = finetune_lora(tiny_pixel, shirt_images[0], tmp_path / "lora", class_name="shirt", steps=4, batch_size=4, progress=False)
    for name in ("synthaug.json", "pytorch_lora_weights.safetensors", "validation.png", "loss.png", "training_log.jsonl"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "synthaug.json").read_text())
    assert cfg["backend"] == "pixel-ddpm" and cfg["label"] == 1 and cfg["class_name"] == "shirt"
    assert cfg["base_model"] == str(tiny_pixel) and cfg["adapter_hash"].startswith("sha256:")
    assert len(cfg["train_images"]) == 8 and all(len(r["sha256"]) == 64 for r in cfg["train_images"])
    assert cfg["training"]["steps"] == 4 and cfg["training"]["final_loss"] > 0
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert all(k.startswith("unet.") for k in weights) and any("lora_A" in k for k in weights)
    assert any("class_embedding" in k for k in weights)  # the rare class's embedding slot trains

    adapted = load_generator(out).generate(3, seed=5)
    assert adapted.images.shape == (3, 12, 12, 1) and adapted.labels == [1, 1, 1]
    assert adapted.meta[0]["adapter_hash"] == cfg["adapter_hash"]
    base = load_generator(tiny_pixel, label=1).generate(3, seed=5)
    assert not np.array_equal(adapted.images, base.images), "the adapter did not change the model's output"


def test_pixel_ddpm_resume_equals_uninterrupted_run(tiny_pixel, shirt_images, tmp_path):
    common = dict(class_name="shirt", batch_size=4, checkpoint_every=3, validation_every=3, progress=False)
    whole = finetune_lora(tiny_pixel, shirt_images[0], tmp_path / "whole", steps=6, **common)
    part = finetune_lora(tiny_pixel, shirt_images[0], tmp_path / "part", steps=3, **common)
    assert json.loads((part / "synthaug.json").read_text())["training"]["steps"] == 3
    resumed = finetune_lora(tiny_pixel, shirt_images[0], part, steps=6, resume=True, **common)
    log = [json.loads(line) for line in (resumed / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    a = load_file(str(whole / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k].numpy(), b[k].numpy()), f"{k} differs after resume"
    # the resume above read the safe format: state that loads without unpickling objects
    import torch

    state = torch.load(part / "checkpoints" / "step-000006" / "state.pt", weights_only=True)
    assert state["step"] == 6 and len(state["losses"]) == 6 and "state" in state["optimizer"]


class _WritesMarker:
    """Unpickling this calls ``open(marker, "w")``: the code a malicious checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_resume_refuses_a_pickled_checkpoint_without_running_it(tiny_pixel, shirt_images, tmp_path, capsys):
    import pickle

    import torch

    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_WritesMarker(control))).close()
    assert control.exists(), "the payload does not run code when unpickled; the test would prove nothing"

    out = finetune_lora(tiny_pixel, shirt_images[0], tmp_path / "lora", class_name="shirt", steps=2, batch_size=2,
                        checkpoint_every=2, validation_every=2, validation_steps=1, progress=False)
    state_file = out / "checkpoints" / "step-000002" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    marker = tmp_path / "marker"
    state["step"] = _WritesMarker(marker)  # as a received checkpoint folder could hold it
    torch.save(state, state_file)

    code, err = _cli(capsys, "--model", tiny_pixel, "--images", shirt_images[0], "--out", out, "--steps", 4,
                     "--class-name", "shirt", "--batch-size", 2, "--resume")
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert str(state_file) in lines[0] and "holds pickled objects" in lines[0] and re.search(r"it names \w+\.open\b", lines[0]), err
    assert "--overwrite" in lines[0], err
    assert not marker.exists(), "loading the checkpoint ran code from it"


def test_checkpoint_state_that_a_safe_load_cannot_read_is_refused_before_writing(tmp_path):
    from synthaug.finetune.common import CheckpointManager

    ckpts = CheckpointManager(tmp_path)
    with pytest.raises(TypeError, match=r"state\['rng'\]\[1\] is a numpy.ndarray"):
        ckpts.save(1, {}, {"step": 1, "rng": np.random.RandomState(0).get_state()})
    assert not ckpts.root.exists(), "a refused checkpoint left files behind"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpts.load(ckpts.latest())


# ---------------------------------------------------------------------------------- base-model pretraining
@pytest.mark.usefixtures("one_torch_thread")
def test_pretrain_checkpoint_resumes_exactly_and_refuses_pickled_code(tmp_path):
    import torch

    from synthaug.builtin.train_fashion_mnist_ddpm import PretrainConfig, pretrain

    tiny = dict(batch_size=4, checkpoint_every=1, export_every=1000, log_every=1, sample_steps=1, sample_guidance=[1.0])
    for out, steps in (("whole", 2), ("part", 1), ("part", 2)):  # the last one resumes from step 1
        torch.manual_seed(0)  # pretrain draws the initial weights from torch's global generator
        pretrain(PretrainConfig(out=str(tmp_path / out), steps=steps, **tiny))
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 2
    for part in ("unet", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    assert all(torch.equal(a["opt"]["state"][i]["exp_avg"], b["opt"]["state"][i]["exp_avg"]) for i in a["opt"]["state"])

    bad = tmp_path / "bad"
    bad.mkdir()
    marker = tmp_path / "marker"
    torch.save({**a, "step": _WritesMarker(marker)}, bad / "checkpoint.pt")
    with pytest.raises(ValueError, match="holds pickled objects.*delete .*checkpoint.pt"):
        pretrain(PretrainConfig(out=str(bad), steps=2, **tiny))
    assert not marker.exists(), "loading the checkpoint ran code from it"


# ---------------------------------------------------------------------------------- Stable Diffusion
def test_sd_adapter_loads_in_diffusers_and_changes_output(tiny_sd, shirt_images, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    out = finetune_lora(
        tiny_sd, shirt_images[1], tmp_path / "lora", prompt="a photo of sks shirt", label=6, class_name="Shirt",
        steps=3, lr=1e-2, rank=4, progress=False,
    )
    cfg = json.loads((out / "synthaug.json").read_text())
    assert cfg["backend"] == "stable-diffusion" and cfg["resolution"] == 32 and cfg["prompt"] == "a photo of sks shirt"
    assert len(cfg["train_images"]) == 8

    def render(pipe):
        g = torch.Generator().manual_seed(3)
        return pipe("a photo of sks shirt", num_inference_steps=3, generator=g, output_type="np").images

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    before = render(pipe)
    pipe.load_lora_weights(out)  # diffusers' own loader reads our file
    after = render(pipe)
    assert np.abs(after - before).max() > 1e-4, "load_lora_weights left the output unchanged"

    from synthaug import load_generator

    batch = load_generator(out, num_inference_steps=3).generate(2, seed=0)
    assert batch.images.shape == (2, 32, 32, 3) and batch.labels == [6, 6]
    assert batch.meta[0]["adapter_hash"] == cfg["adapter_hash"] and batch.meta[0]["prompt"] == "a photo of sks shirt"


def test_sd_resume_continues_step_count(tiny_sd, shirt_images, tmp_path):
    common = dict(prompt="a photo of sks shirt", label=6, checkpoint_every=2, validation_every=2, rank=4, progress=False)
    out = finetune_lora(tiny_sd, shirt_images[1], tmp_path / "lora", steps=2, **common)
    finetune_lora(tiny_sd, shirt_images[1], out, steps=4, resume=True, **common)
    log = [json.loads(line)["step"] for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]
    assert json.loads((out / "synthaug.json").read_text())["training"]["steps"] == 4


# ---------------------------------------------------------------------------------- bad input (CLI)
def _cli(capsys, *args):
    from synthaug.cli import main

    code = main(["finetune", *map(str, args)])
    err = capsys.readouterr().err
    return code, err


def test_cli_bad_input_gives_one_line_errors(tiny_pixel, tiny_sd, shirt_images, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not an image")
    (junk / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(shirt_images[0].iterdir())[:3]:
        (few / p.name).write_bytes(p.read_bytes())
    notadapter = tmp_path / "occupied"
    notadapter.mkdir()
    (notadapter / "results.csv").write_text("x")
    cases = [
        ((tiny_pixel, empty, tmp_path / "o1"), "is empty"),
        ((tiny_pixel, junk, tmp_path / "o2"), "no readable images"),
        ((tiny_pixel, few, tmp_path / "o3"), "fewer than --min-images 5"),
        ((tmp_path / "no_such_model", shirt_images[0], tmp_path / "o4"), "no_such_model does not exist (no such folder)"),
        (("builtin:no-such-model", shirt_images[0], tmp_path / "o5"), "unknown built-in model"),
        ((tiny_pixel, shirt_images[0], notadapter), "not a synthaug adapter"),
    ]
    for (model, images, out), expected in cases:
        code, err = _cli(capsys, "--model", model, "--images", images, "--out", out, "--steps", 1, "--class-name", "shirt")
        assert code != 0, expected
        lines = [line for line in err.strip().splitlines() if line]
        assert len(lines) == 1 and expected in lines[0], (expected, err)
        assert "Traceback" not in err
    # label settings that would leave the adapter unusable or mislabelled
    label_cases = [
        ((tiny_sd, "--prompt", "a photo of sks shirt"), "pass --class-name NAME"),
        ((tiny_pixel, "--label", "0", "--class-name", "shirt", "--classes", "a", "shirt"), "--label 0 disagrees with --classes"),
        ((tiny_pixel, "--class-name", "crack", "--classes", "ok", "scratch"), "is not among --classes"),
        ((tiny_pixel, "--label", "2"), "pass --class-name NAME"),
        ((tiny_pixel, "--class-name", "shirt", "--prompt", "a shirt"), "not --prompt"),
    ]
    for (model, *extra), expected in label_cases:
        code, err = _cli(capsys, "--model", model, "--images", shirt_images[0], "--out", tmp_path / "o6", "--steps", 1, *extra)
        lines = [line for line in err.strip().splitlines() if line]
        assert code != 0 and len(lines) == 1 and expected in lines[0], (expected, err)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o6").exists(), "a refused run left an output folder behind"
    assert (notadapter / "results.csv").exists(), "a refused run touched the occupied folder"


def test_cli_shows_warnings_but_not_the_diffusers_numpy_copy_one(tmp_path, capsys, monkeypatch):
    """diffusers' DPM-Solver set_timesteps (every validation grid) calls np.array(tensor), and numpy 2
    warns that torch's Tensor.__array__ takes no copy=: not ours, not shown; other warnings are."""
    import warnings

    from diffusers import DPMSolverMultistepScheduler

    import synthaug.cli.finetune as cli

    def fake_finetune(*args, **kwargs):
        DPMSolverMultistepScheduler().set_timesteps(4)
        warnings.warn("a warning of ours", UserWarning)
        raise ValueError("stopped by the test")

    monkeypatch.setattr(cli, "finetune_lora", fake_finetune)
    code, err = _cli(capsys, "--model", "builtin:fashion-mnist-ddpm", "--images", tmp_path, "--out", tmp_path / "o")
    assert code == 2 and "stopped by the test" in err
    out = capsys.readouterr().out + err
    assert "copy keyword" not in out
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the test is not vacuous: the call does warn
        with pytest.raises(DeprecationWarning, match="copy keyword"):
            DPMSolverMultistepScheduler().set_timesteps(4)


def test_cli_error_exit_code_in_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "synthaug", "finetune", "--model", "builtin:nope", "--images", str(tmp_path), "--out", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "unknown built-in model" in proc.stderr


def test_help_documents_every_flag_with_its_default():
    from synthaug.cli import build_parser

    parser = build_parser()
    finetune = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("finetune"))
    for action in finetune._actions:
        if action.option_strings and action.dest != "help" and not action.required:
            assert action.help and "default" in action.help, f"{action.option_strings} lacks its default in --help"
    text = finetune.format_help()
    for flag in ("--rank", "--alpha", "--lr", "--steps", "--batch-size", "--resolution", "--target-modules", "--seed",
                 "--mixed-precision", "--gradient-checkpointing", "--validation-every", "--resume", "--label", "--class-name"):
        assert re.search(re.escape(flag) + r"\b", text), flag


def test_the_output_folder_is_never_lost_silently(tmp_path):
    from synthaug.finetune.common import prepare_output_dir

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    for resume, overwrite in ((True, True), (True, False), (False, False)):
        with pytest.raises(FileExistsError, match="is not a synthaug adapter"):
            prepare_output_dir(theirs, resume=resume, overwrite=overwrite)
    assert (theirs / "notes.txt").read_text() == "keep me"  # --resume never deletes, --overwrite was not given alone
    assert prepare_output_dir(theirs, resume=False, overwrite=True) == theirs and not any(theirs.iterdir())
    with pytest.raises(FileNotFoundError, match="holds no checkpoints"):
        prepare_output_dir(tmp_path / "new", resume=True, overwrite=False)
    assert not (tmp_path / "new").exists()
    adapter = tmp_path / "adapter"
    (adapter / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="already holds an adapter; pass --resume"):
        prepare_output_dir(adapter, resume=False, overwrite=False)
    assert prepare_output_dir(adapter, resume=True, overwrite=False) == adapter and (adapter / "checkpoints").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        prepare_output_dir(tmp_path / "file", resume=False, overwrite=True)


# ------------------------------------------------------------------------- your own class
def test_your_own_class_trains_a_new_slot_and_every_record_carries_your_name(tiny_pixel, shirt_images, tmp_path):
    """A class the base model lacks: with no untrained slot (the tiny model trained all three),
    the LoRA trains a slot added after the null class; records carry the user's name and label
    in the user's label space, provenance the slot; the base model's classes are untouched."""
    from synthaug import SyntheticCache, load_generator
    from synthaug.generation.fill import fill_cache

    out = finetune_lora(tiny_pixel, shirt_images[0], tmp_path / "lora", class_name="crack", label_names=["ok", "scratch", "crack"],
                        steps=2, batch_size=2, validation_every=2, progress=False)
    cfg = json.loads((out / "synthaug.json").read_text())
    assert (cfg["class_name"], cfg["label"], cfg["label_names"]) == ("crack", 2, ["ok", "scratch", "crack"])
    assert cfg["model_class"] == 4 and cfg["model_class_name"] is None and cfg["class_embeds"] == 5  # coat, shirt, bag, null, new
    gen = load_generator(out, num_inference_steps=2)
    batch = gen.generate(2, seed=0)
    assert batch.labels == [2, 2] and gen.label_names == ["ok", "scratch", "crack"]
    assert {batch.meta[0][k] for k in ("label_name",)} == {"crack"} and batch.meta[0]["model_class"] == 4
    # the new slot changed nothing the base model had: its classes sample as before from the same rows
    base = load_generator(tiny_pixel, label=0, num_inference_steps=2).generate(1, seed=0)
    assert base.meta[0]["model_class"] == 0
    cache = SyntheticCache(tmp_path / "c")
    cache.adopt_label_names(gen.label_names)
    fill_cache(gen, cache, 3, seed=0, progress=False)
    assert [r.meta["label_name"] for r in cache.get_many(cache.seqs())] == ["crack"] * 3 and cache.label_names == ["ok", "scratch", "crack"]


def test_a_free_slot_is_preferred_and_a_label_alone_defaults_to_zero(tmp_path, shirt_images):
    """A model that says which slots it never trained (the built-in one holds Shirt out): your
    class takes that slot; without --classes the label is --label (default 0) and the names list
    names only your class."""
    from synthaug.finetune.ddpm import resolve_class
    from synthaug.finetune.common import FinetuneConfig
    from synthaug.generation.sources import resolve_source

    source = resolve_source("builtin:fashion-mnist-ddpm", adapters=False, what="model")
    choice = resolve_class(source, FinetuneConfig(class_name="crack"))
    assert (choice.slot, choice.slot_name, choice.label, choice.label_names, choice.extend) == (6, "Shirt", 0, ["crack"], False)
    choice = resolve_class(source, FinetuneConfig(class_name="crack", label=3))
    assert (choice.label, choice.label_names) == (3, ["", "", "", "crack"])
    choice = resolve_class(source, FinetuneConfig(class_name="Bag"))  # one of the model's classes: its slot, its label space
    assert (choice.slot, choice.label, choice.label_names) == (8, 8, None)
    choice = resolve_class(source, FinetuneConfig())  # the model's rare class, as before
    assert (choice.slot, choice.label, choice.class_name) == (6, 6, "Shirt")
    choice = resolve_class(source, FinetuneConfig(class_name="Shirt", label_names=["Dress", "Shirt"]))  # a model class in your space
    assert (choice.slot, choice.label, choice.label_names) == (6, 1, ["Dress", "Shirt"])


def test_cli_finetune_classes_from_an_image_folder(tiny_pixel, shirt_images, tmp_path, capsys):
    root = tmp_path / "my_data"
    for name in ("zebra_crossing", "crack", "ok"):
        (root / name).mkdir(parents=True)
    from synthaug.cli import main

    code = main(["finetune", "--model", str(tiny_pixel), "--images", str(shirt_images[0]), "--out", str(tmp_path / "a"), "--steps", "2",
                 "--batch-size", "2", "--class-name", "crack", "--classes-from", str(root), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    cfg = json.loads((tmp_path / "a" / "synthaug.json").read_text())
    assert (cfg["label"], cfg["label_names"]) == (0, ["crack", "ok", "zebra_crossing"])  # sorted, as torchvision's ImageFolder
    # the summary names the class and says what "final loss" is, and it is the mean the log gives
    assert "class 'crack', label 0 on the base model's slot 4 (added)" in out and "mean of the last 20 steps" in out
    logged = [json.loads(line)["loss"] for line in (tmp_path / "a" / "training_log.jsonl").read_text().splitlines()]
    assert abs(cfg["training"]["final_loss"] - float(np.mean(logged[-20:]))) < 1e-9
