"""What both LoRA trainers share: settings, input checks, output folder, checkpoints, plots.

Determinism: the batch (indices, flips), noise and timesteps of step ``s`` come from a CPU
generator seeded with ``(seed, s)``, so a run resumed from a checkpoint takes exactly the steps an
uninterrupted run would have taken (tested: 3 + 3 resumed steps give the same weights as 6).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from synthaug.adapter import image_sha256
from synthaug.data.folders import load_image_folder
from synthaug.outputs import output_dir

__all__ = [
    "FinetuneConfig",
    "TrainingImages",
    "named_class",
    "user_label_space",
    "load_training_images",
    "prepare_output_dir",
    "step_generator",
    "CheckpointManager",
    "check_plain_state",
    "load_plain_state",
    "save_loss_curve",
    "FINAL_LOSS_WINDOW",
    "final_loss",
    "noise_prediction_loss",
    "peak_rss_mb",
    "write_training_log",
    "to_gray",
]

logger = logging.getLogger("synthaug.finetune")


@dataclass
class FinetuneConfig:
    """Settings of one LoRA fine-tuning run (``None`` means: the backend's default).

    Attributes:
        prompt: text condition (Stable-Diffusion models), e.g. ``"a photo of sks crack"``.
        class_name: your class's name: every record generated from the adapter carries it, and
            :class:`~synthaug.MixedDataset` maps records by it into your dataset's classes. On a
            class-conditional base model that lacks the class, the LoRA trains a free
            conditioning slot (see :func:`synthaug.finetune.ddpm.resolve_class`).
        label: the class index the generated images get in *your* classifier's label space
            (default: the index of ``class_name`` in ``label_names``; else, for a class of the
            base model, the model's index; else 0).
        label_names: your classifier's class names in label order (e.g. an ImageFolder's
            ``classes``), so records carry your whole label space; optional.
        rank, alpha: LoRA rank and scaling numerator (``alpha=None``: equal to ``rank``).
        lr: AdamW learning rate (default 1e-4 for Stable Diffusion, 1e-3 for the pixel DDPM,
            whose LoRA is small and whose rare-class embedding slot starts untrained).
        steps: optimizer steps; batch_size: images per step (default 1 for SD, 16 pixel).
        resolution: training resolution in pixels (default 512 for SD; the pixel model's own).
        target_modules: module names for LoRA (default: the attention projections ``to_q``,
            ``to_k``, ``to_v``, ``to_out.0``; the pixel DDPM adds its ResNet convolutions
            ``conv1``, ``conv2`` because its only attention is the 8×8 middle block).
        train_class_embedding: pixel DDPM only: train the class-embedding table (peft
            ``modules_to_save``), so the rare class's slot learns its own embedding.
        seed: seeds the LoRA init and every step's batch, noise and timesteps.
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` (CUDA only).
        gradient_checkpointing: trade compute for memory (Stable Diffusion).
        snr_gamma: min-SNR loss weighting (e.g. 5.0); ``None``: plain MSE.
        validation_every: make a validation grid every N steps (and at the end).
        checkpoint_every: save a resumable checkpoint every N steps (and at the end).
        min_images: refuse fewer training images (a warning below 20).
        device: torch device (default CUDA when available).
    """

    prompt: Optional[str] = None
    negative_prompt: Optional[str] = None
    label: Optional[int] = None
    class_name: Optional[str] = None
    label_names: Optional[List[str]] = None
    rank: int = 8
    alpha: Optional[float] = None
    lr: Optional[float] = None
    steps: int = 500
    batch_size: Optional[int] = None
    resolution: Optional[int] = None
    target_modules: Optional[List[str]] = None
    train_class_embedding: bool = True
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    snr_gamma: Optional[float] = None
    max_grad_norm: float = 1.0
    validation_every: Optional[int] = None
    checkpoint_every: Optional[int] = None
    validation_steps: Optional[int] = None
    min_images: int = 5
    device: Optional[str] = None

    def check(self) -> None:
        """Refuse settings that cannot work, naming the setting."""
        if self.rank < 1:
            raise ValueError(f"--rank must be >= 1, got {self.rank}")
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"--resolution must be >= 8 pixels, got {self.resolution}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"--mixed-precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.label is not None and self.label < 0:
            raise ValueError(f"--label must be >= 0 (a class index of your classifier), got {self.label}")
        if self.class_name is not None and not str(self.class_name).strip():
            raise ValueError("--class-name must not be empty")
        if self.label_names is not None:
            names = [str(n) for n in self.label_names]
            if len(set(names)) != len(names) or not all(n.strip() for n in names):
                raise ValueError(f"--classes must be distinct, non-empty names, got {names}")
        if self.min_images < 1:
            raise ValueError(f"--min-images must be >= 1, got {self.min_images}")
        for name in ("validation_every", "checkpoint_every"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "FinetuneConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown fine-tuning setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**kwargs)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def named_class(cfg: "FinetuneConfig") -> Optional[str]:
    """The name of the class a run learns: ``class_name``, else the name ``label_names`` gives
    ``label``, else ``None``."""
    if cfg.class_name is not None:
        return str(cfg.class_name)
    if cfg.label_names and cfg.label is not None and 0 <= cfg.label < len(cfg.label_names):
        return str(cfg.label_names[cfg.label])
    return None


def user_label_space(class_name: str, label: Optional[int], label_names: Optional[Sequence[str]]) -> Tuple[int, List[str]]:
    """``(label, label_names)`` of your class in your classifier's label space.

    With ``label_names`` (your classes in label order) the label is ``class_name``'s index there
    (``label``, when given too, must agree). Without, the label is ``label`` (default 0) and the
    names list holds ``class_name`` at that index and ``""`` (a class this adapter does not
    know) elsewhere; a cache merges such lists (:meth:`SyntheticCache.adopt_label_names`).

    Raises:
        ValueError: the class is not among ``label_names``, or ``label`` disagrees with it.
    """
    if label_names:
        names = [str(n) for n in label_names]
        if class_name not in names:
            raise ValueError(f"--class-name {class_name!r} is not among --classes {names}")
        index = names.index(class_name)
        if label is not None and int(label) != index:
            raise ValueError(f"--label {label} disagrees with --classes, where {class_name!r} is class {index}; pass one of them")
        return index, names
    label = 0 if label is None else int(label)
    return label, [""] * label + [class_name]


@dataclass
class TrainingImages:
    """The real images a LoRA is trained on, with their provenance records."""

    images: List[np.ndarray]  # uint8 H×W×C as stored (C = 1 or 3)
    records: List[Dict[str, str]] = field(default_factory=list)  # [{"file", "sha256"}]
    skipped: Dict[str, str] = field(default_factory=dict)


def load_training_images(folder: Union[str, os.PathLike], *, min_images: int) -> TrainingImages:
    """Read and check the training folder (images as stored: gray stays 1 channel, others 3).

    Each image's record holds its file name and the SHA-256 of its decoded pixels as stored
    (:func:`synthaug.adapter.image_sha256`), which the evaluation's leakage guard compares.

    Raises:
        FileNotFoundError / ValueError: missing or empty folder, no readable image, fewer than
            ``min_images`` images (warns below 20, the method's intended minimum).
    """
    loaded = load_image_folder(folder)
    if len(loaded) < min_images:
        raise ValueError(
            f"{folder} holds {len(loaded)} readable image(s), fewer than --min-images {min_images}; "
            "add images or lower --min-images"
        )
    if len(loaded) < 20:
        warnings.warn(f"training a LoRA on only {len(loaded)} images (20–50 is the intended range); expect weak adaptation", stacklevel=2)
    for name, reason in loaded.skipped.items():
        logger.warning("skipping %s: %s", name, reason)
    records = [{"file": p.name, "sha256": image_sha256(im)} for p, im in zip(loaded.files, loaded.images)]
    return TrainingImages(images=loaded.images, records=records, skipped=dict(loaded.skipped))


def prepare_output_dir(out: Union[str, os.PathLike], *, resume: bool, overwrite: bool) -> Path:
    """Make ``out`` ready.

    An existing folder that is not a synthaug adapter is refused unless ``overwrite`` (then it is
    emptied). An existing adapter is continued with ``resume``, replaced with ``overwrite``, and
    otherwise refused, so a trained adapter is never lost silently. ``resume`` never deletes
    anything: with nothing to resume it is refused, whatever ``overwrite`` says.
    """
    out = Path(out)
    holds_adapter = (out / "synthaug.json").is_file() or (out / "checkpoints").is_dir()
    if resume:
        if holds_adapter:
            return out
        if out.exists():  # a file or a stranger's folder is refused as such
            output_dir(out, hint="it is not a synthaug adapter, so there is nothing to resume; choose the adapter's folder")
        raise FileNotFoundError(f"--resume given but {out} holds no checkpoints to resume from")
    hint = ("it already holds an adapter; pass --resume to continue it or --overwrite to replace it" if holds_adapter
            else "it is not a synthaug adapter; choose another folder or pass --overwrite")
    return output_dir(out, overwrite=overwrite, empty=True, hint=hint)


def step_generator(seed: int, step: int):
    """The CPU generator of training step ``step`` (batch, flips, noise, timesteps)."""
    import torch

    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# Checkpoint state is written with ``torch.save`` and read back with ``torch.load(...,
# weights_only=True)``: that unpickler builds only tensors and plain containers and values, never
# calls a function named in the file, so a checkpoint folder received from someone else cannot run
# code on --resume (torch >= 2.6; weights_only was bypassable before). This keeps optimizer state
# dicts (int keys, tuples, tensors) as torch writes them, which safetensors + JSON could not hold
# without a hand-written flattening. What may be stored is checked before saving.
_PLAIN_TYPES = (str, int, float, bool, type(None))  # exactly these: numpy.float64 subclasses float, yet pickles as numpy


def check_plain_state(state: Any, where: str = "state") -> None:
    """Refuse state that ``torch.load(..., weights_only=True)`` would not read back.

    Allowed: tensors, ``str``/``int``/``float``/``bool``/``None``, and dicts, lists and tuples of
    these (dict keys: plain values). Not allowed, for instance: numpy arrays or scalars, numpy or
    ``random`` RNG states, dataclasses; convert them to tensors, lists or ints first.

    Raises:
        TypeError: naming the first offending entry, e.g. ``state['rng'][1]``.
    """
    import torch

    if isinstance(state, torch.Tensor) or type(state) in _PLAIN_TYPES:
        return
    if type(state) in (dict, OrderedDict):  # module state dicts are OrderedDicts
        for key, value in state.items():
            if type(key) not in _PLAIN_TYPES:
                raise TypeError(f"checkpoint {where} has a key of type {type(key).__name__}; use str or int keys")
            check_plain_state(value, f"{where}[{key!r}]")
        return
    if type(state) in (list, tuple):
        for i, value in enumerate(state):
            check_plain_state(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint {where} is a {type(state).__module__}.{type(state).__qualname__}, which a safe "
        "(weights_only) load cannot read back; store it as tensors, lists or plain numbers"
    )


def load_plain_state(path: Union[str, os.PathLike], *, fix: str) -> Dict[str, Any]:
    """Read state written by ``torch.save`` of :func:`check_plain_state`-clean data, safely.

    Args:
        path: the state file.
        fix: what the user should do if the file is refused (ends the error message).

    Raises:
        ValueError: the file holds pickled objects other than tensors and plain values (a
            checkpoint of an older synthaug that pickled objects, or a file not written by
            synthaug); it is not unpickled, since that could run code.
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" (it names {found.group(1)})" if found else ""
        raise ValueError(
            f"checkpoint {path} holds pickled objects, not only tensors and plain values{what}: it was written by an "
            f"older synthaug or not by synthaug, and unpickling it could run code, so it is not loaded; {fix}"
        ) from None


class CheckpointManager:
    """Resumable checkpoints ``OUT/checkpoints/step-NNNNNN/``; keeps the newest ``keep``.

    Each holds ``weights.safetensors`` (the trainable weights) and ``state.pt``: a dict of
    tensors and plain values only (step, optimizer state dict, per-step losses, the training
    images' records, LoRA settings, ...), loaded with ``torch.load(..., weights_only=True)``, so
    loading a checkpoint never runs code from it (see :func:`load_plain_state`).
    """

    def __init__(self, out: Path, keep: int = 2) -> None:
        self.root = Path(out) / "checkpoints"
        self.keep = keep

    def latest(self) -> Optional[Path]:
        if not self.root.is_dir():
            return None
        done = sorted(p for p in self.root.iterdir() if p.name.startswith("step-") and (p / "state.pt").is_file())
        return done[-1] if done else None

    def save(self, step: int, weights: Dict[str, Any], state: Dict[str, Any]) -> Path:
        """Write checkpoint ``step`` atomically and drop all but the newest ``keep``.

        Raises:
            TypeError: ``state`` holds something other than tensors and plain values.
        """
        import torch
        from safetensors.torch import save_file

        check_plain_state(state)
        final = self.root / f"step-{step:06d}"
        tmp = self.root / f".tmp-step-{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        torch.save(state, tmp / "state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(p for p in self.root.iterdir() if p.name.startswith("step-"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, path: Optional[Path]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """``(weights, state)`` of checkpoint folder ``path`` (e.g. :meth:`latest`), read without
        running code from it.

        Raises:
            FileNotFoundError: ``path`` is ``None``: there is no complete checkpoint.
            ValueError: ``state.pt`` holds pickled objects (see :func:`load_plain_state`).
        """
        from safetensors.torch import load_file

        if path is None:
            raise FileNotFoundError(f"--resume given but {self.root} holds no complete checkpoint; rerun with --overwrite instead of --resume")
        state = load_plain_state(path / "state.pt", fix="rerun with --overwrite instead of --resume to train the adapter again from step 0")
        return load_file(str(path / "weights.safetensors")), state


def save_loss_curve(losses: Sequence[Tuple[int, float]], path: Union[str, os.PathLike], title: str) -> None:
    """PNG of the per-step loss and its moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([s for s, _ in losses])
    values = np.array([v for _, v in losses])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, values, lw=0.6, alpha=0.4, label="loss")
    if len(values) >= 10:
        k = max(5, len(values) // 25)
        smooth = np.convolve(values, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.6, label=f"moving average ({k} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("noise-prediction MSE")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


FINAL_LOSS_WINDOW = 20


def final_loss(losses: Sequence[Tuple[int, float]]) -> float:
    """The loss a run reports as final: the mean of the last :data:`FINAL_LOSS_WINDOW` steps'
    losses, as the progress bar shows it (a single step's loss is too noisy to compare)."""
    return float(np.mean([v for _, v in losses[-FINAL_LOSS_WINDOW:]]))


def write_training_log(out: Path, losses: Sequence[Tuple[int, float]]) -> None:
    with open(out / "training_log.jsonl", "w") as f:
        for step, loss in losses:
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")


def noise_prediction_loss(pred, target, t, noise_sched, snr_gamma: Optional[float]):
    """MSE between prediction and target; with ``snr_gamma``, min-SNR-gamma weighting
    (Hang et al. 2023) for epsilon or v-prediction as ``noise_sched`` says."""
    import torch
    import torch.nn.functional as F

    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float())
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_sched, t).to(pred.device)
    weights = torch.clamp(snr, max=snr_gamma)
    weights = weights / (snr + 1) if noise_sched.config.prediction_type == "v_prediction" else weights / snr
    per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    return (per * weights).mean()


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def to_gray(image: np.ndarray) -> np.ndarray:
    """uint8 H×W gray image from H×W×1 or H×W×3 (ITU-R 601 luma, as PIL's "L" conversion)."""
    if image.shape[2] == 1:
        return image[:, :, 0]
    from PIL import Image

    return np.asarray(Image.fromarray(image).convert("L"))
