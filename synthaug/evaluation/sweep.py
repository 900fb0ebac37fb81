"""``synthaug sweep``: the paper's study, with the control its reviewer asked for.

For every seed (one few-shot split, one adapter, one classifier initialisation):

1. The imbalanced training set: ``shots`` real images of the rare class, ``per_class`` of every
   other class (multi-label CSVs: ``shots`` images with the finding, at most
   ``per_class × (labels − 1)`` without it).
2. The adapter: ``adapter`` if given (the same for every seed), else a LoRA trained on this
   seed's ``shots`` images (``base_model``, ``lora_steps``). The leakage guard refuses a test set
   holding any of the adapter's training images.
3. The synthetic pool: ``cache`` if given, else ``synthetic_images`` images generated into this
   seed's cache before training (``worker: true`` also keeps a GenerationWorker topping it up
   while the arms train).
4. The arms, each the same classifier trained the same number of steps with the same batch size
   and evaluated on the real test set only:

   * ``real_only``;
   * ``oversampled@r``: the real rare images repeated, mixed by the same RatioBatchSampler at the
     same ratio r as ``synthetic@r`` — the same count of rare-class draws (matched cardinality);
   * ``classic_aug@r``: ``oversampled@r`` with standard torchvision augmentation of the repeats;
   * ``synthetic@r``: the synthetic pool mixed at ratio r;
   * ``synthetic+classic_aug@r`` (optional): the same with the augmentation on synthetic images;
   * ``synthetic@r/n=N``: the pool cut to its first N images (the synthetic-set-size effect).

Outputs in ``out``: ``results.json`` (one row per arm × seed, written as each finishes, so an
interrupted sweep resumes where it stopped), ``summary.json`` and ``summary.md`` (mean ± std per
arm; every synthetic arm against ``real_only`` and its matched ``oversampled@r``: paired mean
difference, 95% bootstrap CI, sign-flip and t-test p-values), ``ratio_curves.png`` and
``set_size.png``, and ``sweep.log``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

__all__ = ["SweepConfig", "StudyData", "load_study_data", "run_sweep", "summarize_results", "ARM_KINDS"]

ARM_KINDS = ("real_only", "oversampled", "classic_aug", "synthetic", "synthetic+classic_aug")
COMPARED_METRICS = ("rare_recall", "rare_f1", "rare_precision", "rare_average_precision", "accuracy")
_RESULTS_VERSION = 1


@dataclass
class SweepConfig:
    """Settings of ``synthaug sweep`` (YAML keys = these field names; see ``synthaug sweep --help``)."""

    dataset: str = "fashion-mnist"
    data: Optional[str] = None
    rare_class: Optional[str] = None  # fashion-mnist: Shirt
    shots: int = 30
    per_class: Optional[int] = 1000
    ratios: List[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75])
    seeds: Union[int, List[int]] = 5
    epochs: float = 4.0
    steps: Optional[int] = None
    batch_size: int = 64
    lr: float = 1e-3
    model: str = "small-cnn"
    arms: List[str] = field(default_factory=lambda: ["real_only", "oversampled", "classic_aug", "synthetic"])
    adapter: Optional[str] = None
    cache: Optional[str] = None
    base_model: str = "builtin:fashion-mnist-ddpm"
    prompt: Optional[str] = None
    lora_steps: int = 400
    lora_rank: int = 8
    synthetic_images: int = 1000
    set_sizes: List[int] = field(default_factory=lambda: [30, 100, 300])
    set_size_ratio: float = 0.25
    generation_steps: Optional[int] = None
    scheduler: Optional[str] = None
    guidance_scale: Optional[float] = None
    worker: bool = False
    image_size: int = 64
    channels: Optional[int] = None
    test_size: Optional[int] = None
    num_workers: int = 0
    device: str = "auto"
    leakage_check: bool = True
    bootstrap: int = 10_000
    out: str = "sweep-report"
    overwrite: bool = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, values: Dict[str, Any], *, source: str = "config") -> "SweepConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
        return cls(**{k: _coerce(k, v, source) for k, v in values.items()})

    @classmethod
    def from_yaml(cls, path: Union[str, os.PathLike], **overrides: Any) -> "SweepConfig":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sweep config {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping of settings, not a {type(values).__name__}")
        values = {k.replace("-", "_"): v for k, v in values.items()}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values, source=str(path))

    @property
    def seed_list(self) -> List[int]:
        if isinstance(self.seeds, int):
            return list(range(self.seeds))
        return [int(s) for s in self.seeds]

    def check(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        self.ratios = [float(r) for r in (self.ratios or [])]
        self.set_sizes = [int(n) for n in (self.set_sizes or [])]
        if isinstance(self.arms, str):
            self.arms = [a.strip() for a in self.arms.split(",") if a.strip()]
        bad = [a for a in self.arms if a not in ARM_KINDS]
        if bad:
            raise ValueError(f"unknown arm(s) {bad}; choose from {list(ARM_KINDS)}")
        if not self.arms:
            raise ValueError("no arms to train")
        needs_ratio = any(a != "real_only" for a in self.arms)
        if needs_ratio and not self.ratios:
            raise ValueError("give at least one ratio (--ratios)")
        for r in self.ratios + ([self.set_size_ratio] if self.set_sizes else []):
            if not 0 < r < 1:
                raise ValueError(f"ratios must be in (0, 1), got {r}")
        if len(set(self.ratios)) != len(self.ratios):
            raise ValueError(f"--ratios holds duplicates: {self.ratios}")
        seeds = self.seed_list
        if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError(f"--seeds must be a positive count or distinct non-negative seeds, got {self.seeds!r}")
        for name in ("shots", "batch_size", "lora_steps", "lora_rank", "synthetic_images", "image_size", "bootstrap"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.per_class is not None and self.per_class < 1:
            raise ValueError(f"--per-class must be >= 1, got {self.per_class}")
        if self.steps is None and not self.epochs > 0:
            raise ValueError(f"--epochs must be > 0, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if any(n < 1 for n in self.set_sizes):
            raise ValueError(f"--set-sizes must be >= 1, got {self.set_sizes}")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"--channels must be 1 or 3, got {self.channels}")
        if self.cache and self.worker:
            raise ValueError("--worker fills the sweep's own pool from the adapter; with --cache given, run `synthaug worker` on that cache instead")
        from synthaug.evaluation.classifier import CLASSIFIERS

        if self.model not in CLASSIFIERS:
            raise ValueError(f"--model must be one of {CLASSIFIERS}, got {self.model!r}")
        self.dataset_kind()

    def dataset_kind(self):
        kind, _, arg = self.dataset.partition(":")
        if kind == "fashion-mnist" and not arg:
            return kind, self.data
        if kind in ("imagefolder", "csv") and arg:
            return kind, arg
        raise ValueError(f"--dataset must be fashion-mnist, imagefolder:DIR or csv:FILE, got {self.dataset!r}")

    def arm_plan(self) -> List[Dict[str, Any]]:
        """The arms each seed trains, in order: ``[{"arm", "kind", "ratio", "pool"}]``."""
        plan: List[Dict[str, Any]] = []
        if "real_only" in self.arms:
            plan.append({"arm": "real_only", "kind": "real_only", "ratio": 0.0, "pool": None})
        ratios = sorted(self.ratios)
        for r in ratios:
            for kind in ARM_KINDS[1:]:
                if kind in self.arms:
                    plan.append({"arm": f"{kind}@{r:g}", "kind": kind, "ratio": r, "pool": None})
        if "synthetic" in self.arms:
            for n in sorted(set(self.set_sizes)):
                if self.cache is None and n >= self.synthetic_images:
                    continue
                plan.append({"arm": f"synthetic@{self.set_size_ratio:g}/n={n}", "kind": "synthetic", "ratio": self.set_size_ratio, "pool": n})
            if self.set_sizes and self.set_size_ratio not in ratios:
                r = self.set_size_ratio
                plan.append({"arm": f"synthetic@{r:g}", "kind": "synthetic", "ratio": r, "pool": None})
                if "oversampled" in self.arms:
                    plan.append({"arm": f"oversampled@{r:g}", "kind": "oversampled", "ratio": r, "pool": None})
        return plan

    def identity(self) -> Dict[str, Any]:
        """The settings that decide the results (not where they go, nor how they are displayed)."""
        d = asdict(self)
        for k in ("out", "overwrite", "bootstrap"):
            d.pop(k)
        d["seeds"] = self.seed_list
        return d


_FLOAT_FIELDS = ("epochs", "lr", "set_size_ratio", "guidance_scale")
_INT_FIELDS = ("shots", "per_class", "steps", "batch_size", "lora_steps", "lora_rank", "synthetic_images", "generation_steps",
               "image_size", "channels", "test_size", "num_workers", "bootstrap")
_BOOL_FIELDS = ("worker", "overwrite", "leakage_check")


def _coerce(key: str, value: Any, source: str) -> Any:
    """A config value of the field's type (YAML reads ``1e-3`` as a string, ``5`` as an int)."""
    if value is None:
        return None

    def bad(kind: str):
        return ValueError(f"{source}: {key} must be {kind}, got {value!r}")

    try:
        if key in _FLOAT_FIELDS:
            if isinstance(value, bool):
                raise bad("a number")
            return float(value)
        if key in _INT_FIELDS:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise bad("an integer")
            return int(value)
        if key in ("ratios", "set_sizes"):
            items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
            return [float(v) if key == "ratios" else int(v) for v in items]
        if key == "seeds":
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, int):
                return value
            if isinstance(value, str):
                return int(value) if "," not in value else [int(v) for v in value.split(",") if v.strip()]
            return [int(v) for v in value]
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ValueError) and str(exc).startswith(f"{source}: "):
            raise
        raise bad({"ratios": "a list of numbers", "set_sizes": "a list of integers", "seeds": "a count or a list of seeds"}.get(
            key, "a number" if key in _FLOAT_FIELDS else "an integer")) from None
    if key in _BOOL_FIELDS and not isinstance(value, bool):
        raise bad("true or false")
    return value


# ---------------------------------------------------------------------------------- data
class _Resized:
    """Images of ``dataset`` as PIL images of ``mode`` resized to ``size``×``size`` (targets kept)."""

    def __init__(self, dataset, size: int, mode: str) -> None:
        self.dataset, self.size, self.mode = dataset, size, mode

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return _resize(x, self.size, self.mode), y


def _resize(image, size: int, mode: str):
    from PIL import Image

    if not isinstance(image, Image.Image):
        from synthaug.imaging import to_hwc_uint8

        arr = to_hwc_uint8(image)
        image = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    image = image.convert(mode)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return image


class PILResize:
    """Picklable transform: a PIL image (or uint8 array) → ``mode`` at ``size``×``size``."""

    def __init__(self, size: int, mode: str) -> None:
        self.size, self.mode = size, mode

    def __call__(self, image):
        return _resize(image, self.size, self.mode)


@dataclass
class StudyData:
    """A dataset ready for the study: the full training pool and the test set.

    ``train``/``test`` return ``(PIL image, target)``; ``targets`` are the training pool's class
    indices (N) or multi-hot rows (N×L); ``prepare`` (PIL → PIL at the study's size, or ``None``)
    is applied to real images when the split is made and to synthetic images by the mixer;
    ``transform`` (PIL → normalized tensor) to every image after that.
    """

    name: str
    train: Any
    test: Any
    classes: List[str]
    rare: int
    multilabel: bool
    channels: int
    size: int
    targets: np.ndarray
    transform: Callable
    prepare: Optional[Callable] = None
    train_files: Optional[List[Path]] = None
    test_files: Optional[List[Path]] = None

    def split(self, *, shots: int, per_class: Optional[int], seed: int):
        """``(train_indices, rare_indices)`` of this seed's imbalanced training set."""
        if not self.multilabel:
            from synthaug.data.splits import few_shot_split

            s = few_shot_split(self.train, self.rare, shots=shots, per_class=per_class, seed=seed)
            return s.train, s.rare
        rng = np.random.default_rng(seed)
        has = np.nonzero(self.targets[:, self.rare] > 0)[0]
        without = np.nonzero(self.targets[:, self.rare] == 0)[0]
        if shots > len(has):
            raise ValueError(f"finding {self.classes[self.rare]!r} has {len(has)} training images; cannot draw {shots} shots")
        rare_idx = np.sort(rng.choice(has, size=shots, replace=False))
        cap = None if per_class is None else per_class * max(1, len(self.classes) - 1)
        others = without if cap is None or cap >= len(without) else rng.choice(without, size=cap, replace=False)
        return np.sort(np.concatenate([rare_idx, others])), rare_idx

    def real_subset(self, indices):
        import torch

        subset = torch.utils.data.Subset(self.train, [int(i) for i in indices])
        return subset if self.prepare is None else _Resized(subset, self.size, "L" if self.channels == 1 else "RGB")

    def image(self, index: int):
        x = self.train[int(index)][0]
        return x if self.prepare is None else self.prepare(x)


def _normalize(channels: int):
    from torchvision import transforms as T

    return T.Compose([T.ToTensor(), T.Normalize((0.5,) * channels, (0.5,) * channels)])


def load_study_data(cfg: SweepConfig) -> StudyData:
    """The training pool and test set named by ``cfg.dataset``, and the rare class's index.

    Raises:
        FileNotFoundError / ValueError: a missing folder or file, an unknown rare class, a folder
            without ``train/`` and ``test/``, or test classes that differ from the training ones.
    """
    from synthaug.data.splits import class_index

    kind, arg = cfg.dataset_kind()
    if kind == "fashion-mnist":
        from synthaug.data.fashion_mnist import FashionMNIST
        from synthaug.evaluation.arms import fashion_mnist_transform

        train, test = FashionMNIST(arg, train=True), FashionMNIST(arg, train=False)
        rare = class_index(train, cfg.rare_class if cfg.rare_class is not None else "Shirt")
        return StudyData("fashion-mnist", train, test, list(train.classes), rare, False, 1, 28, np.asarray(train.targets), fashion_mnist_transform())
    if kind == "imagefolder":
        from torchvision.datasets import ImageFolder

        root = Path(arg)
        if not (root / "train").is_dir() or not (root / "test").is_dir():
            raise FileNotFoundError(f"imagefolder:{root} needs {root}/train/<class>/ and {root}/test/<class>/ folders")
        channels = cfg.channels or 3
        mode = "L" if channels == 1 else "RGB"
        train, test = ImageFolder(str(root / "train")), ImageFolder(str(root / "test"))
        if train.classes != test.classes:
            raise ValueError(f"{root}: train classes {train.classes} differ from test classes {test.classes}")
        if cfg.rare_class is None:
            raise ValueError("--rare-class is required for an imagefolder dataset")
        rare = class_index(train, cfg.rare_class)
        prep = PILResize(cfg.image_size, mode)
        return StudyData(f"imagefolder:{root}", train, _Resized(test, cfg.image_size, mode), list(train.classes), rare, False, channels,
                         cfg.image_size, np.asarray(train.targets), _normalize(channels), prep,
                         [Path(p) for p, _ in train.samples], [Path(p) for p, _ in test.samples])
    from synthaug.data.csv_images import CsvImageDataset

    channels = cfg.channels or 1
    mode = "L" if channels == 1 else "RGB"
    train, test = CsvImageDataset(arg, "train", mode=mode), CsvImageDataset(arg, "test", mode=mode)
    if cfg.rare_class is None:
        raise ValueError(f"--rare-class is required for a CSV dataset (one of its findings: {', '.join(train.classes)})")
    if cfg.rare_class not in train.class_to_idx:
        raise ValueError(f"finding {cfg.rare_class!r} is not a label of {arg}; its labels are {', '.join(train.classes)}")
    rare = train.class_to_idx[cfg.rare_class]  # both sides share the CSV's label list
    prep = PILResize(cfg.image_size, mode)
    return StudyData(f"csv:{arg}", train, _Resized(test, cfg.image_size, mode), list(train.classes), rare, True, channels, cfg.image_size,
                     train.targets, _normalize(channels), prep, list(train.files), list(test.files))


# ---------------------------------------------------------------------------------- running
class _Log:
    def __init__(self, out: Path) -> None:
        self.path = out / "sweep.log"

    def __call__(self, message: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(message)
        with open(self.path, "a") as f:
            f.write(time.strftime("%H:%M:%S ") + message + "\n")


def _prepare_out(out: Path, cfg: SweepConfig, inputs: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Create ``out``; return the rows of an interrupted sweep with the same settings and inputs
    (resume). ``--overwrite`` replaces an earlier sweep's folder, never any other folder."""
    config_path = out / "sweep_config.json"
    identity = _plain({**cfg.identity(), "inputs": inputs})
    if out.exists() and any(out.iterdir()):
        if not config_path.is_file():
            raise FileExistsError(f"{out} is not empty and holds no sweep; choose another --out (an empty or new folder)")
        earlier = json.loads(config_path.read_text())
        if earlier == identity and not cfg.overwrite:
            results = out / "results.json"
            return json.loads(results.read_text())["rows"] if results.is_file() else []
        if not cfg.overwrite:
            changed = sorted(k for k in set(earlier) | set(identity) if earlier.get(k) != identity.get(k))
            raise FileExistsError(f"{out} holds a sweep with other settings or inputs ({', '.join(changed)}); choose another --out or "
                                  "pass --overwrite to replace it")
        for given in (cfg.cache, cfg.adapter):
            if given and Path(given).resolve().is_relative_to(out.resolve()):
                raise FileExistsError(f"--overwrite would delete {given}, which is inside {out}; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(identity, indent=2) + "\n")
    return []


def _inputs(cfg: SweepConfig) -> Dict[str, Any]:
    """What the sweep reads besides its settings, so a resume notices when it changed: the given
    adapter's weights hash and the given cache's record range."""
    out: Dict[str, Any] = {}
    if cfg.adapter:
        from synthaug.adapter import read_adapter_config

        out["adapter_hash"] = read_adapter_config(cfg.adapter).get("adapter_hash")
    if cfg.cache:
        from synthaug.cache.store import SyntheticCache

        if not Path(cfg.cache).is_dir():
            raise FileNotFoundError(f"--cache {cfg.cache} does not exist")
        cache = SyntheticCache(cfg.cache, readonly=True)
        try:
            seqs = cache.seqs()
            out["cache"] = {"records": len(seqs), "first_seq": seqs[0] if seqs else None, "last_seq": seqs[-1] if seqs else None}
        finally:
            cache.close()
    return out


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_plain(obj), indent=2, allow_nan=True) + "\n")
    os.replace(tmp, path)


def _plain(obj):
    return json.loads(json.dumps(obj, default=str))


def _training_steps(cfg: SweepConfig, n_real: int) -> int:
    return int(cfg.steps) if cfg.steps is not None else max(1, math.ceil(cfg.epochs * n_real / cfg.batch_size))


def run_sweep(config: SweepConfig, *, progress: bool = True) -> Dict[str, Any]:
    """Run the sweep; returns the summary (also in ``OUT/summary.json``)."""
    import torch

    cfg = config
    cfg.check()
    out = Path(cfg.out)
    done_rows = _prepare_out(out, cfg, _inputs(cfg))
    log = _Log(out)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    data = load_study_data(cfg)
    test = _TransformedTest(data)
    if cfg.test_size:
        test = torch.utils.data.Subset(test, np.sort(np.random.default_rng(12345).choice(len(data.test), cfg.test_size, replace=False)).tolist())
    test_loader = torch.utils.data.DataLoader(test, batch_size=500, num_workers=cfg.num_workers)
    test_hashes = _test_hashes(data, test, progress)
    plan = cfg.arm_plan()
    seeds = cfg.seed_list
    done = {(r["arm"], r["seed"]) for r in done_rows}
    rows = list(done_rows)
    meta: Dict[str, Any] = {"dataset": data.name, "classes": data.classes, "rare_class": {"index": data.rare, "name": data.classes[data.rare]},
                            "multilabel": data.multilabel, "test_images": len(test), "device": device, "leakage": {}, "seeds": {}}
    if done:
        log(f"resuming: {len(done)} of {len(plan) * len(seeds)} arm runs already in {out}/results.json")
    log(f"sweep: {data.name}, rare class '{data.classes[data.rare]}', {len(seeds)} seeds x {len(plan)} arms, classifier {cfg.model} on {device}")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan) * len(seeds), initial=len(done), desc="sweep", unit="arm", dynamic_ncols=True)
    t_start = time.time()
    for seed in seeds:
        todo = [p for p in plan if (p["arm"], seed) not in done]
        seed_meta = _run_seed(cfg, data, seed, todo, test_loader, test_hashes, rows, out, log, device, bar, progress)
        meta["seeds"][str(seed)] = seed_meta
        meta["leakage"][str(seed)] = seed_meta.get("leakage")
        summarize_results(rows, out, cfg, meta=meta)  # results.json was written as each arm ended
    if bar is not None:
        bar.close()
    meta["wall_s"] = time.time() - t_start
    summary = summarize_results(rows, out, cfg, meta=meta)
    log((out / "summary.md").read_text())
    log(f"sweep done in {meta['wall_s'] / 60:.1f} min: {out}/results.json, summary.json, summary.md, ratio_curves.png, set_size.png")
    return summary


class _TransformedTest:
    def __init__(self, data: StudyData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data.test)

    def __getitem__(self, i):
        x, y = self.data.test[i]
        return self.data.transform(x), y


def _test_hashes(data: StudyData, test, progress: bool) -> List[str]:
    """Pixel hashes of the test images as stored (files decoded as finetune decodes its inputs;
    Fashion-MNIST's arrays as they are), the ones a leakage check compares."""
    from synthaug.evaluation.leakage import dataset_image_hashes, file_image_hashes

    indices = getattr(test, "indices", None)
    if data.test_files is not None:
        files = data.test_files if indices is None else [data.test_files[i] for i in indices]
        return file_image_hashes(files, progress=progress)
    raw = data.test
    if indices is not None:
        import torch

        raw = torch.utils.data.Subset(raw, indices)
    return dataset_image_hashes(raw, progress=progress)


def _run_seed(cfg, data: StudyData, seed: int, todo, test_loader, test_hashes, rows, out: Path, log, device, bar, progress) -> Dict[str, Any]:
    import torch

    from synthaug.cache.store import SyntheticCache

    seed_dir = out / "seeds" / f"seed-{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    train_idx, rare_idx = data.split(shots=cfg.shots, per_class=cfg.per_class, seed=seed)
    real_train = data.real_subset(train_idx)
    steps = _training_steps(cfg, len(real_train))
    info: Dict[str, Any] = {"train_images": len(real_train), "rare_train_images": len(rare_idx), "steps": steps}
    needs_synthetic = any(p["kind"].startswith("synthetic") for p in todo)
    caches: List[Any] = []  # closed when the seed is done

    # adapter, leakage guard, synthetic pool
    adapter = None
    cache = None
    if any(p["kind"].startswith("synthetic") for p in cfg.arm_plan()):
        adapter = Path(cfg.adapter) if cfg.adapter else None
        if adapter is None and cfg.cache is None:
            done_adapter = seed_dir / "adapter"
            adapter = _seed_adapter(cfg, data, seed, rare_idx, seed_dir, log, progress) if needs_synthetic or not done_adapter.is_dir() else done_adapter
        info["leakage"] = _leakage(cfg, adapter, data, test_hashes)
        if info["leakage"]["checked"]:
            log(f"seed {seed}: leakage check passed ({info['leakage']['train_images']} adapter training images, {len(test_hashes)} test images, none shared)")
        else:
            log(f"seed {seed}: WARNING: leakage check skipped: {info['leakage']['why']}")
        if needs_synthetic:
            cache = SyntheticCache(cfg.cache) if cfg.cache else _prefill(cfg, data, seed, adapter, seed_dir, log, progress)
            caches.append(cache)
            rare_pool = _rare_seqs(cache, data)
            info["synthetic_pool"] = len(rare_pool)
            too_big = sorted({p["pool"] for p in todo if p["pool"] is not None and p["pool"] > len(rare_pool)})
            if too_big:
                for c in caches:
                    c.close()
                raise ValueError(f"the synthetic pool holds {len(rare_pool)} images of '{data.classes[data.rare]}'; the set-size arm(s) "
                                 f"{too_big} need more: lower --set-sizes or give a larger pool")
            if cfg.worker:
                _check_worker_labels(adapter, data)
    if not todo:
        for c in caches:
            c.close()
        return info

    from synthaug.evaluation.arms import real_rare_cache

    rare_labels = [np.nonzero(data.targets[i])[0].tolist() for i in rare_idx] if data.multilabel else data.rare
    real_cache = real_rare_cache([data.image(i) for i in rare_idx], rare_labels, seed_dir / "real_rare.lmdb", label_names=data.classes,
                                 indices=[int(i) for i in rare_idx])
    caches.append(real_cache)
    worker = None
    threads = torch.get_num_threads()
    try:
        if cfg.worker and cache is not None:
            from synthaug.generation.worker import GenerationWorker

            torch.set_num_threads(max(1, threads - 1))  # the worker gets one core of its own
            worker = GenerationWorker(cache, {"source": str(adapter), "overrides": _gen_overrides(cfg)}, min_fresh=cfg.synthetic_images,
                                      max_items=max(cfg.synthetic_images * 20, 10_000), seed=seed * 1_000_000 + 500_000, num_threads=1)
            worker.start(wait=True, timeout=600)  # model loaded before the first arm draws
        for p in todo:
            pool = None
            if p["kind"] in ("oversampled", "classic_aug"):
                pool = real_cache
            elif p["kind"] != "real_only":
                pool = cache if p["pool"] is None else _pool_subset(cache, rare_pool[:p["pool"]], seed_dir / f"synthetic-n{p['pool']}.lmdb")
                if pool is not cache:
                    caches.append(pool)
            row = _run_arm(cfg, data, p, seed, steps, real_train, pool, test_loader, device, progress)
            if p["kind"].startswith("synthetic") and p["pool"] is None:
                row["pool"] = len(_rare_seqs(cache, data))  # the rare-class images in the pool (a worker may have added some)
            rows.append(_plain(row))
            _write_json(out / "results.json", {"version": _RESULTS_VERSION, "config": cfg.identity(), "rows": rows})
            m = row["metrics"]
            log(f"seed {seed} {p['arm']:<28} recall {m['rare_recall']:.3f}  precision {m['rare_precision']:.3f}  F1 {m['rare_f1']:.3f}  "
                f"AP {m.get('rare_average_precision', float('nan')):.3f}  accuracy {m['accuracy']:.3f}  ({row['training']['wall_s']:.0f} s, {row['rare_draws']} rare draws)")
            if bar is not None:
                bar.update(1)
    finally:
        if worker is not None:
            info["worker"] = _plain(worker.stop())
        torch.set_num_threads(threads)
        for c in caches:
            c.close()
    return info


def _run_arm(cfg, data: StudyData, p: Dict[str, Any], seed: int, steps: int, real_train, pool, test_loader, device, progress) -> Dict[str, Any]:
    """Train and evaluate one arm; its row for ``results.json``."""
    from synthaug.evaluation.arms import classic_augmentation, mixed_arm_loader, real_only_loader, train_and_evaluate

    kind, r = p["kind"], p["ratio"]
    if kind == "real_only":
        loader, sampler = real_only_loader(real_train, batch_size=cfg.batch_size, seed=seed, transform=data.transform, num_workers=cfg.num_workers), None
    else:
        syn_tf = data.prepare
        if kind in ("classic_aug", "synthetic+classic_aug"):
            aug = classic_augmentation(None, size=data.size)
            if data.prepare is not None:
                from torchvision import transforms as T

                aug = T.Compose([data.prepare, aug])
            syn_tf = aug
        # classes=[rare]: only rare-class records are drawn, so each synthetic arm and its
        # oversampled control draw the rare class equally often even from a mixed cache
        loader, sampler = mixed_arm_loader(real_train, pool, ratio=r, batch_size=cfg.batch_size, seed=seed, transform=data.transform,
                                           synthetic_transform=syn_tf, consumer=f"sweep-{p['arm']}-seed{seed}", num_workers=cfg.num_workers,
                                           classes=[data.rare])
    try:
        result = train_and_evaluate(p["arm"], loader, test_loader, sampler=sampler, rare=data.rare, steps=steps, seed=seed, model=cfg.model,
                                    in_channels=data.channels, num_classes=len(data.classes), image_size=data.size, lr=cfg.lr, device=device, progress=progress,
                                    multilabel=data.multilabel).to_dict()
    finally:
        if sampler is not None:
            # a finished arm's cursor must not pin the pool's fresh count (a worker would idle)
            pool.remove_cursor(sampler.consumer)
    return {"arm": p["arm"], "kind": kind, "ratio": r, "pool": p["pool"], "seed": seed,
            **{k: result[k] for k in ("metrics", "training", "sampler", "rare_draws")}}


def _leakage(cfg: SweepConfig, adapter: Optional[Path], data: StudyData, test_hashes: List[str]) -> Dict[str, Any]:
    """Check the test set against every adapter behind the synthetic images: ``--adapter`` (or
    this seed's LoRA) and each adapter a ``--cache``'s records name. Refuses when one of those
    is not here to read, unless ``leakage_check`` is off (then the summary says it was skipped)."""
    from synthaug.evaluation.leakage import check_no_leakage

    if not cfg.leakage_check:
        return {"checked": False, "shared": None, "why": "turned off (leakage_check: false)"}
    adapters = [adapter] if adapter is not None else []
    if cfg.cache:
        from synthaug.adapter import read_adapter_config

        named, unnamed = _cache_adapters(cfg.cache)
        given_hash = read_adapter_config(adapter).get("adapter_hash") if adapter is not None else None
        # a recorded adapter that is not here is fine when --adapter is the same weights (same hash)
        missing = sorted(a for a, h in named.items() if not Path(a).is_dir() and (given_hash is None or h != given_hash))
        if missing or (unnamed and adapter is None):
            why = (f"cache {cfg.cache} was made by adapter(s) {missing} that are not here" if missing
                   else f"{unnamed} record(s) of cache {cfg.cache} name no adapter")
            raise ValueError(f"cannot check the test set for leakage: {why}. Pass --adapter with the adapter folder that made the "
                             "cache, or set leakage_check: false (--no-leakage-check) if you know the test images are not among its training images")
        adapters += [Path(a) for a in sorted(named) if Path(a).is_dir() and (adapter is None or Path(a).resolve() != adapter.resolve())]
    result = check_no_leakage(adapters, test_hashes, test_name=f"the test set of {data.name}")
    return {"checked": True, **result}


def _check_worker_labels(adapter: Path, data: StudyData) -> None:
    """A worker labels its records with the adapter's own label; the sweep's pool must carry the
    rare class's label of the dataset, so the two must agree."""
    from synthaug.adapter import read_adapter_config

    a = read_adapter_config(adapter)
    if a.get("label") != data.rare or (a.get("class_name") not in (None, data.classes[data.rare])):
        raise ValueError(f"--worker: adapter {adapter} makes label {a.get('label')} ({a.get('class_name')!r}), but the rare class is "
                         f"{data.rare} ({data.classes[data.rare]!r}) in {data.name}; the worker would label its images wrongly. "
                         "Pre-fill only (drop --worker), which labels the pool with the rare class")


def _gen_overrides(cfg: SweepConfig) -> Dict[str, Any]:
    o = {"num_inference_steps": cfg.generation_steps, "scheduler": cfg.scheduler, "guidance_scale": cfg.guidance_scale}
    return {k: v for k, v in o.items() if v is not None}


def _seed_adapter(cfg: SweepConfig, data: StudyData, seed: int, rare_idx, seed_dir: Path, log, progress: bool) -> Path:
    """This seed's LoRA on its ``shots`` rare images (reused when an earlier run finished it)."""
    from synthaug.adapter import is_adapter_dir, read_adapter_config
    from synthaug.data.splits import write_images
    from synthaug.finetune import finetune_lora

    adapter = seed_dir / "adapter"
    if is_adapter_dir(adapter):
        try:
            read_adapter_config(adapter)
            return adapter
        except (FileNotFoundError, ValueError):
            pass
    images = seed_dir / "train_images"
    if images.exists():
        shutil.rmtree(images)
    images.mkdir(parents=True)
    name = data.classes[data.rare]
    # the images as stored (files copied, arrays as they are, never resized), so the adapter's
    # hashes are taken as the leakage guard takes the test set's
    if data.train_files is not None:
        for i in rare_idx:
            src = data.train_files[int(i)]
            shutil.copy(src, images / f"{int(i):06d}_{src.name}")
    else:
        write_images(data.train, rare_idx, images, prefix=name.replace("/", "-").lower())
    kwargs: Dict[str, Any] = {}
    if cfg.prompt:
        kwargs.update(prompt=cfg.prompt, label=data.rare, class_name=name)
    elif data.name == "fashion-mnist":
        kwargs.update(class_name=name)
    t0 = time.time()
    path = finetune_lora(cfg.base_model, images, adapter, steps=cfg.lora_steps, rank=cfg.lora_rank, seed=seed, progress=progress,
                         overwrite=True, min_images=min(5, len(rare_idx)), **kwargs)
    log(f"seed {seed}: LoRA ({cfg.lora_steps} steps, rank {cfg.lora_rank}) on {len(rare_idx)} '{name}' images in {time.time() - t0:.0f} s")
    return path


def _prefill(cfg: SweepConfig, data: StudyData, seed: int, adapter: Path, seed_dir: Path, log, progress: bool):
    """This seed's synthetic pool: ``synthetic_images`` images from ``adapter``, labelled as the rare class."""
    from synthaug.cache.store import SyntheticCache
    from synthaug.generation.fill import fill_cache
    from synthaug.generation.loading import load_generator

    cache = SyntheticCache(seed_dir / "synthetic.lmdb", label_names=data.classes)
    missing = cfg.synthetic_images - len(cache)
    if missing <= 0:
        return cache
    mode = "L" if data.channels == 1 else "RGB"

    def to_study_size(image):
        if data.prepare is None and image.shape[:2] == (data.size, data.size):
            return image
        return np.asarray(_resize(image, data.size, mode))

    with load_generator(adapter, **_gen_overrides(cfg)) as gen:
        done = fill_cache(gen, cache, missing, seed=seed * 1_000_000, label=data.rare, transform=to_study_size, batch_size=32,
                          progress=progress, desc=f"generate seed {seed}", leave=False)
    log(f"seed {seed}: generated {done.written} synthetic '{data.classes[data.rare]}' images in {done.seconds:.0f} s ({done.images_per_s:.1f} images/s)")
    return cache


def _rare_seqs(cache, data: StudyData) -> List[int]:
    """Sequence numbers of the cache's records of the rare class, oldest first: labels mapped into
    the dataset's label space by name when the cache names its labels, else by index (as
    MixedDataset maps them); a multi-label record counts when it carries the rare label."""
    names = cache.label_names
    index = {c: i for i, c in enumerate(data.classes)}

    def mapped(label: int) -> Optional[int]:
        if names is not None:
            return index.get(names[label]) if 0 <= label < len(names) else None
        return int(label)

    labels, _corrupt = cache.scan_labels(0, int(cache.stats()["next_seq"]))
    out = []
    for seq, label in labels.items():
        values = label if isinstance(label, (list, tuple)) else [label]
        if any(mapped(int(v)) == data.rare for v in values):
            out.append(int(seq))
    return sorted(out)


def _pool_subset(cache, seqs: Sequence[int], path: Path):
    """A cache holding the records ``seqs`` of ``cache`` (a set-size arm's pool: the first N
    rare-class records), with the source's label names, so its labels map as the full pool's do."""
    from synthaug.cache.store import SyntheticCache

    sub = SyntheticCache(path, label_names=cache.label_names)
    have = len(sub)
    if have < len(seqs):
        todo = list(seqs[have:])
        records = cache.get_many(todo)
        sub.append([r.image for r in records], [r.label for r in records], [dict(r.meta, source_seq=int(q)) for r, q in zip(records, todo)])
    return sub


def _cache_adapters(cache_path):
    """``({adapter path: adapter_hash} named by the cache's records, number of records naming none)``."""
    from synthaug.cache.store import SyntheticCache

    cache = SyntheticCache(cache_path, readonly=True)
    names: Dict[str, Optional[str]] = {}
    unnamed = 0
    try:
        seqs = cache.seqs()
        for i in range(0, len(seqs), 256):
            for record in cache.get_many(seqs[i:i + 256]):
                adapter = record.meta.get("adapter")
                if adapter:
                    names.setdefault(adapter, record.meta.get("adapter_hash"))
                else:
                    unnamed += 1
    finally:
        cache.close()
    return names, unnamed


# ---------------------------------------------------------------------------------- summary
def summarize_results(rows: Sequence[Dict[str, Any]], out: Optional[Path] = None, cfg: Optional[SweepConfig] = None, *,
                      meta: Optional[Dict[str, Any]] = None, n_boot: Optional[int] = None) -> Dict[str, Any]:
    """Per-arm statistics and paired comparisons from ``results.json`` rows; with ``out``, also
    write ``summary.json``, ``summary.md``, ``ratio_curves.png`` and ``set_size.png`` there."""
    from synthaug.evaluation.stats import describe, paired_comparison

    n_boot = n_boot or (cfg.bootstrap if cfg is not None else 10_000)
    by_arm: Dict[str, Dict[int, Dict[str, Any]]] = {}
    info: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        by_arm.setdefault(r["arm"], {})[int(r["seed"])] = r
        info.setdefault(r["arm"], {"kind": r["kind"], "ratio": r["ratio"], "pool": r.get("pool")})
    arms = {}
    for arm, per_seed in by_arm.items():
        seeds = sorted(per_seed)
        metric_names = sorted({k for r in per_seed.values() for k, v in r["metrics"].items() if isinstance(v, (int, float))})
        arms[arm] = {**info[arm], "seeds": seeds,
                     "metrics": {k: {**describe([per_seed[s]["metrics"].get(k, float("nan")) for s in seeds]),
                                     "values": [per_seed[s]["metrics"].get(k) for s in seeds]} for k in metric_names},
                     "rare_draws": describe([per_seed[s]["rare_draws"] for s in seeds]),
                     "fresh_share": _fresh_share(per_seed.values())}
    comparisons = []
    for arm, per_seed in by_arm.items():
        kind, r = info[arm]["kind"], info[arm]["ratio"]
        if not kind.startswith("synthetic"):
            continue
        baselines = ["real_only", f"oversampled@{r:g}"]
        if kind == "synthetic+classic_aug":
            baselines.append(f"classic_aug@{r:g}")
        for base in baselines:
            if base not in by_arm:
                continue
            seeds = sorted(set(per_seed) & set(by_arm[base]))
            if not seeds:
                continue
            for metric in COMPARED_METRICS:
                a = [per_seed[s]["metrics"].get(metric, float("nan")) for s in seeds]
                b = [by_arm[base][s]["metrics"].get(metric, float("nan")) for s in seeds]
                comparisons.append({"arm": arm, "baseline": base, "metric": metric, "seeds": seeds, **paired_comparison(a, b, n_boot=n_boot)})
    summary = {"arms": arms, "comparisons": comparisons, "meta": meta or {}, "config": cfg.identity() if cfg is not None else None}
    if out is not None:
        out = Path(out)
        _write_json(out / "summary.json", summary)
        (out / "summary.md").write_text(markdown_summary(summary))
        plot_ratio_curves(summary, out / "ratio_curves.png")
        plot_set_size(summary, out / "set_size.png")
    return summary


def _fresh_share(rows) -> Optional[float]:
    served = sum(int((r.get("sampler") or {}).get("served", 0) or 0) for r in rows)
    fresh = sum(int((r.get("sampler") or {}).get("fresh", 0) or 0) for r in rows)
    return fresh / served if served else None


def _arm_order(summary) -> List[str]:
    def key(arm):
        a = summary["arms"][arm]
        order = {"real_only": 0, "oversampled": 1, "classic_aug": 2, "synthetic": 3, "synthetic+classic_aug": 4}[a["kind"]]
        return (a["pool"] is not None and a["kind"] == "synthetic" and "/n=" in arm, a["ratio"], order, a["pool"] or 0)

    return sorted(summary["arms"], key=key)


def markdown_summary(summary: Dict[str, Any]) -> str:
    """The arm table (mean ± std over seeds) and the paired-comparison table, in markdown."""
    from synthaug.evaluation.stats import format_mean_std

    lines = []
    leak = [v for v in (summary.get("meta") or {}).get("leakage", {}).values() if v]
    if leak:
        if all(v.get("checked") for v in leak):
            lines += [f"Leakage check passed for every seed: none of the {leak[0]['test_images']} test images is among the adapters' "
                      f"training images ({', '.join(str(v['train_images']) for v in leak)} per seed).", ""]
        else:
            lines += [f"**Leakage check skipped**: {next(v['why'] for v in leak if not v.get('checked'))}.", ""]
    lines += ["## Arms (mean ± std over seeds; real test set)", "",
             "| arm | seeds | rare recall | rare precision | rare F1 | rare AP | accuracy | rare draws/run |", "|---|---|---|---|---|---|---|---|"]
    for arm in _arm_order(summary):
        a = summary["arms"][arm]
        m = a["metrics"]
        lines.append(f"| {arm} | {len(a['seeds'])} | " + " | ".join(format_mean_std(m.get(k, {})) for k in
                     ("rare_recall", "rare_precision", "rare_f1", "rare_average_precision", "accuracy")) + f" | {a['rare_draws']['mean']:.0f} |")
    shown = ("rare_recall", "rare_f1", "rare_average_precision")
    comps = [c for c in summary["comparisons"] if c["metric"] in shown]
    n_seeds = max((c["n"] for c in comps), default=0)
    if comps:
        lines += ["", "## Synthetic arms against the controls (paired over seeds)", "",
                  "Δ = arm − baseline, mean over seeds, with its 95% bootstrap CI; p: two-sided sign-flip permutation test "
                  + (f"(exact; with {n_seeds} seeds its smallest possible value is {2 / 2 ** n_seeds:.4g})" if n_seeds <= 16 else "(Monte Carlo)")
                  + " and paired t-test; "
                  "W/L: seeds where the arm is better/worse. AP (average precision) does not depend on the decision threshold: "
                  "it tells whether the arm ranks real rare-class images better, not only predicts the class more often.", "",
                  "| arm | baseline | Δ recall [95% CI] | p (perm / t) | W/L | Δ F1 [95% CI] | p (perm / t) | W/L | Δ AP [95% CI] | p (perm / t) | W/L |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        pairs: Dict[tuple, Dict[str, Any]] = {}
        for c in comps:
            pairs.setdefault((c["arm"], c["baseline"]), {})[c["metric"]] = c
        order = {a: i for i, a in enumerate(_arm_order(summary))}
        for (arm, base), cs in sorted(pairs.items(), key=lambda kv: (order.get(kv[0][0], 0), kv[0][1] != "real_only")):
            cells = []
            for metric in shown:
                c = cs.get(metric)
                if c is None:
                    cells += ["–", "–", "–"]
                    continue
                cells += [f"{c['mean_diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]", f"{c['p_sign_flip']:.3f} / {_fmt_p(c['p_ttest'])}",
                          f"{c['wins']}/{c['losses']}"]
            lines.append(f"| {arm} | {base} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt_p(p: float) -> str:
    return "–" if p is None or (isinstance(p, float) and math.isnan(p)) else f"{p:.3f}"


def _curve(summary, kind: str, metric: str, *, pooled: bool = False):
    pts = []
    for arm, a in summary["arms"].items():
        if a["kind"] != kind or ("/n=" in arm) != pooled or metric not in a["metrics"]:
            continue
        m = a["metrics"][metric]
        pts.append((a["pool"] if pooled else a["ratio"], m["mean"], m["std"]))
    pts.sort()
    return [np.array(v) for v in zip(*pts)] if pts else None


_PLOTTED = (("rare_recall", "rare-class recall"), ("rare_f1", "rare-class F1"), ("rare_average_precision", "rare-class average precision"))


def plot_ratio_curves(summary: Dict[str, Any], path: Path) -> Optional[Path]:
    """Synthetic ratio → rare-class recall, F1 and AP (mean ± std over seeds) with the controls as
    bands: ``real_only`` (flat), ``oversampled@r`` and ``classic_aug@r`` (per ratio)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not summary["arms"]:
        return None
    fig, axes = plt.subplots(1, len(_PLOTTED), figsize=(5.5 * len(_PLOTTED), 4.2), dpi=110)
    ratios = sorted({a["ratio"] for a in summary["arms"].values() if a["kind"] != "real_only"}) or [0.0, 1.0]
    x_lo, x_hi = min(ratios) - 0.03, max(ratios) + 0.03
    for ax, (metric, label) in zip(axes, _PLOTTED):
        ro = summary["arms"].get("real_only", {}).get("metrics", {}).get(metric)
        if ro:
            ax.axhspan(ro["mean"] - ro["std"], ro["mean"] + ro["std"], xmin=0, xmax=1, color="0.6", alpha=0.25)
            ax.axhline(ro["mean"], color="0.35", lw=1.2, ls="--", label="real_only (mean ± std)")
        for kind, color in (("oversampled", "tab:orange"), ("classic_aug", "tab:green")):
            c = _curve(summary, kind, metric)
            if c is not None:
                x, mu, sd = c
                ax.fill_between(x, mu - sd, mu + sd, color=color, alpha=0.18, lw=0)
                ax.plot(x, mu, color=color, lw=1.3, ls="--", marker=".", label=f"{kind}@r (matched draws, ± std)")
        for kind, color in (("synthetic", "tab:blue"), ("synthetic+classic_aug", "tab:purple")):
            c = _curve(summary, kind, metric)
            if c is not None:
                x, mu, sd = c
                ax.errorbar(x, mu, yerr=sd, color=color, lw=2, marker="o", capsize=4, label=f"{kind}@r (± std)")
        n = max((len(a["seeds"]) for a in summary["arms"].values()), default=0)
        ax.set_xlim(x_lo, x_hi)
        _label_axes(ax, "synthetic (or repeated-real) share of every batch, r", label, f"{label} vs ratio ({n} seeds)")
    return _save(fig, axes, path)


def _label_axes(ax, xlabel: str, metric_label: str, title: str) -> None:
    ax.set_ylim(bottom=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric_label}, real test set")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def _save(fig, axes, path: Path) -> Path:
    import matplotlib.pyplot as plt

    axes[0].legend(fontsize=7.5, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_set_size(summary: Dict[str, Any], path: Path) -> Optional[Path]:
    """Synthetic-set size → rare-class recall, F1 and AP at one ratio (the paper's Figure 2), with
    that ratio's ``oversampled`` control and ``real_only`` as bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sized = {arm: a for arm, a in summary["arms"].items() if "/n=" in arm}
    if not sized:
        return None
    r = next(iter(sized.values()))["ratio"]
    full = summary["arms"].get(f"synthetic@{r:g}")
    fig, axes = plt.subplots(1, len(_PLOTTED), figsize=(5.5 * len(_PLOTTED), 4.2), dpi=110)
    for ax, (metric, label) in zip(axes, _PLOTTED):
        pts = sorted((a["pool"], a["metrics"][metric]["mean"], a["metrics"][metric]["std"]) for a in sized.values() if metric in a["metrics"])
        if full and metric in full["metrics"] and full.get("pool"):
            pts.append((full["pool"], full["metrics"][metric]["mean"], full["metrics"][metric]["std"]))
        pts.sort()
        if not pts:
            ax.set_visible(False)
            continue
        x, mu, sd = (np.array(v) for v in zip(*pts))
        for base, color, text in (("real_only", "0.5", "real_only"), (f"oversampled@{r:g}", "tab:orange", f"oversampled@{r:g} (real shots repeated)")):
            b = summary["arms"].get(base, {}).get("metrics", {}).get(metric)
            if b:
                ax.axhspan(b["mean"] - b["std"], b["mean"] + b["std"], color=color, alpha=0.2)
                ax.axhline(b["mean"], color=color, ls="--", lw=1.2, label=f"{text} (mean ± std)")
        ax.errorbar(x, mu, yerr=sd, color="tab:blue", lw=2, marker="o", capsize=4, label=f"synthetic@{r:g} (± std)")
        ax.set_xscale("log")
        ax.set_xticks(x, [str(int(v)) for v in x])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        _label_axes(ax, "distinct synthetic images in the pool", label, f"{label} vs synthetic-set size (ratio {r:g})")
    return _save(fig, axes, path)
