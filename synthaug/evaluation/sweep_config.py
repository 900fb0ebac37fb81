"""Settings of ``synthaug sweep``: :class:`SweepConfig` (from YAML, the command line or code), their
checks, and the arms each seed trains (:meth:`SweepConfig.arm_plan`).

A light module (no torch): the command line reads its defaults to build ``--help``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from synthaug.data.study import parse_dataset_spec
from synthaug.classifier import CLASSIFIERS

__all__ = ["ARM_KINDS", "GENERATION_MODES", "VARIANTS", "SweepConfig", "arm_name"]

ARM_KINDS = ("real_only", "oversampled", "classic_aug", "synthetic", "synthetic+classic_aug", "oversampled+synthetic", "adaptive")
#: how a synthetic pool is generated: from noise, around the rare shots (SDEdit), from other
#: classes' real images into the rare class (soft labels), or steered toward hard images
GENERATION_MODES = ("txt2img", "img2img", "translate", "feedback")
#: variants of a synthetic arm: synthetic items' loss weighted, a pool filtered by the fidelity
#: gate, the last layer re-fit on real data after training
VARIANTS = ("weighted", "gated", "refit")


def arm_name(kind: str, ratio: float, mode: str = "txt2img", variant: Optional[str] = None) -> str:
    """``synthetic@0.25`` (txt2img, the name the arm has always had), ``synthetic[img2img]@0.25``,
    ``oversampled+synthetic[translate]@0.25``, ``synthetic[feedback]+gated@0.25``."""
    tag = f"[{mode}]" if kind in ("synthetic", "synthetic+classic_aug", "oversampled+synthetic") and mode != "txt2img" else ""
    return f"{kind}{tag}{'+' + variant if variant else ''}@{ratio:g}"


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
    generation: List[str] = field(default_factory=lambda: ["txt2img"])
    strengths: List[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    translate_from: List[str] = field(default_factory=lambda: ["auto"])
    translate_classes: int = 2
    soft_label_gamma: Optional[float] = 0.5
    feedback_scale: float = 2.0
    feedback_objective: str = "entropy"
    variants: List[str] = field(default_factory=list)
    synthetic_weight: float = 0.2
    gate: List[float] = field(default_factory=lambda: [0.5, 1.0])
    refit_steps: int = 100
    real_share: float = 0.5
    val_shots: int = 10
    adaptive_interval: Optional[int] = None  # steps between the adaptive arm's validation readings (default: steps // 24, at least 5)
    adaptive_settle: float = 1 / 6  # the adaptive arm's last share of steps held at its chosen ratio (no probes; 0: probe to the end)
    adaptive_reward: str = "loss"  # the adaptive arm's reward on validation: "loss" (rare-vs-rest log loss) or "ap" (rare-class AP)
    reference_steps: int = 800
    worker: bool = False
    image_size: int = 64
    channels: Optional[int] = None
    test_size: Optional[int] = None
    num_workers: int = 0
    device: str = "auto"
    leakage_check: bool = True
    strict: bool = False  # refuse instead of warn on data mismatches (a patient in both train and test, ...)
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
        if self.model not in CLASSIFIERS:
            raise ValueError(f"--model must be one of {CLASSIFIERS}, got {self.model!r}")
        for name, allowed in (("generation", GENERATION_MODES), ("variants", VARIANTS)):
            values = getattr(self, name)
            if isinstance(values, str):
                values = [v.strip() for v in values.split(",") if v.strip()]
                setattr(self, name, values)
            bad = [v for v in values if v not in allowed]
            if bad or len(set(values)) != len(values):
                raise ValueError(f"--{name} must be distinct values out of {list(allowed)}, got {values}")
        if not self.generation:
            raise ValueError("--generation needs at least one mode")
        if isinstance(self.translate_from, str):
            self.translate_from = [v.strip() for v in self.translate_from.split(",") if v.strip()]
        if not self.translate_from or ("auto" in self.translate_from and len(self.translate_from) > 1):
            raise ValueError(f"--translate-from is 'auto' or a list of class names, got {self.translate_from}")
        if not self.strengths or any(not 0 < s <= 1 for s in self.strengths):
            raise ValueError(f"--strengths must be in (0, 1], got {self.strengths}")
        if self.soft_label_gamma is not None and not self.soft_label_gamma > 0:
            raise ValueError(f"--soft-label-gamma must be > 0 (or none for hard labels), got {self.soft_label_gamma}")
        if self.feedback_objective not in ("entropy", "loss"):
            raise ValueError(f"--feedback-objective must be entropy or loss, got {self.feedback_objective!r}")
        if not self.feedback_scale >= 0:
            raise ValueError(f"--feedback-scale must be >= 0, got {self.feedback_scale}")
        if not self.synthetic_weight >= 0:
            raise ValueError(f"--synthetic-weight must be >= 0, got {self.synthetic_weight}")
        if len(self.gate) != 2 or not 0 <= self.gate[0] < self.gate[1] <= 1:
            raise ValueError(f"--gate must be LOW,HIGH with 0 <= LOW < HIGH <= 1, got {self.gate}")
        if not 0 < self.real_share < 1:
            raise ValueError(f"--real-share must be in (0, 1), got {self.real_share}")
        if "adaptive" in self.arms and len(self.ratios) < 2:
            raise ValueError(f"the adaptive arm moves its ratio over --ratios: give at least two, got {self.ratios}")
        if self.adaptive_reward not in ("loss", "ap"):
            raise ValueError(f"--adaptive-reward must be loss or ap, got {self.adaptive_reward!r}")
        if not 0 <= self.adaptive_settle < 1:
            raise ValueError(f"--adaptive-settle must be in [0, 1), got {self.adaptive_settle}")
        if self.adaptive_interval is not None and self.adaptive_interval < 1:
            raise ValueError(f"--adaptive-interval must be >= 1, got {self.adaptive_interval}")
        for name in ("translate_classes", "refit_steps", "val_shots", "reference_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.cache and (self.generation != ["txt2img"] or self.variants):
            raise ValueError("--cache mixes a given pool; --generation modes and --variants make pools of their own (drop --cache)")
        if self.worker and (self.generation != ["txt2img"] or "gated" in self.variants):
            raise ValueError("--worker tops up the txt2img pool only; drop it for other --generation modes and the gated variant")
        parse_dataset_spec(self.dataset)

    def arm_plan(self) -> List[Dict[str, Any]]:
        """The arms each seed trains, in order: ``[{"arm", "kind", "ratio", "pool", "mode",
        "variant"}]``. Every synthetic kind is trained once per generation mode; each variant once
        per mode on the plain ``synthetic`` kind."""
        plan: List[Dict[str, Any]] = []

        def add(kind: str, r: float, mode: str = "txt2img", variant: Optional[str] = None, pool: Optional[int] = None) -> None:
            name = arm_name(kind, r, mode, variant) if pool is None else f"synthetic@{r:g}/n={pool}"
            plan.append({"arm": name, "kind": kind, "ratio": r, "pool": pool, "mode": mode, "variant": variant})

        if "real_only" in self.arms:
            plan.append({"arm": "real_only", "kind": "real_only", "ratio": 0.0, "pool": None, "mode": None, "variant": None})
        ratios = sorted(self.ratios)
        for r in ratios:
            for kind in ARM_KINDS[1:]:
                if kind not in self.arms or kind == "adaptive":  # one run per mode, below
                    continue
                if kind in ("oversampled", "classic_aug"):
                    add(kind, r)
                    continue
                for mode in self.generation:
                    add(kind, r, mode)
                    if kind == "synthetic":
                        for variant in self.variants:
                            add(kind, r, mode, variant)
        if "adaptive" in self.arms:
            start = self.adaptive_start()
            for mode in self.generation:
                plan.append({"arm": "adaptive" + ("" if mode == "txt2img" else f"[{mode}]"), "kind": "adaptive", "ratio": start, "pool": None,
                             "mode": mode, "variant": None})
        if "synthetic" in self.arms:
            first = self.generation[0]
            for n in sorted(set(self.set_sizes)):
                if self.cache is None and n >= self.synthetic_images:
                    continue
                add("synthetic", self.set_size_ratio, first, pool=n)
            if self.set_sizes and self.set_size_ratio not in ratios:
                r = self.set_size_ratio
                add("synthetic", r, first)
                if "oversampled" in self.arms:
                    add("oversampled", r)
        return plan

    def adaptive_start(self) -> float:
        """The adaptive arm's starting ratio: the middle of ``ratios`` (the lower of two middles)."""
        ratios = sorted(self.ratios)
        return ratios[(len(ratios) - 1) // 2]

    def adaptive_interval_for(self, steps: int) -> int:
        """Steps between the adaptive arm's validation readings: ``adaptive_interval``, else
        ``steps // 24`` (12 probe rounds per run), at least 5 and at least 8 × ``num_workers``
        (a DataLoader fetches ``2 × num_workers`` batches ahead, and those steps after a reading
        still run the previous ratio: :mod:`synthaug.mixing.adaptive`)."""
        return int(self.adaptive_interval) if self.adaptive_interval else max(5, steps // 24, 8 * int(self.num_workers or 0))

    def adaptive_settle_at(self, steps: int) -> Optional[int]:
        """The step from which the adaptive arm stops probing and holds its chosen ratio."""
        return steps - int(round(steps * self.adaptive_settle)) if self.adaptive_settle > 0 else None

    def val_per_class(self) -> int:
        """Validation images per other class: ``val_shots``, as many as of the rare class. The
        validation set has the test set's balance, not the training set's: average precision
        depends on how common the positives are, and with 10 rare images among 3,000 (the
        training imbalance) a first full-size run measured validation AP of 0.02–0.07 for arms
        whose test AP was 0.2–0.5, too noisy to choose by."""
        return self.val_shots

    def identity(self) -> Dict[str, Any]:
        """The settings that decide the results (not where they go, nor how they are displayed)."""
        d = asdict(self)
        for k in ("out", "overwrite", "bootstrap", "strict"):  # strict only refuses runs, never changes one
            d.pop(k)
        if "adaptive" not in self.arms:  # a setting of the adaptive arm alone: sweeps without it keep their identity
            d.pop("adaptive_interval")
            d.pop("adaptive_reward")
            d.pop("adaptive_settle")
        d["seeds"] = self.seed_list
        return d


_FLOAT_FIELDS = ("adaptive_settle", "epochs", "lr", "set_size_ratio", "guidance_scale", "soft_label_gamma", "feedback_scale", "synthetic_weight", "real_share")
_INT_FIELDS = ("shots", "per_class", "steps", "batch_size", "lora_steps", "lora_rank", "synthetic_images", "generation_steps",
               "image_size", "channels", "test_size", "num_workers", "bootstrap", "translate_classes", "refit_steps", "val_shots",
               "reference_steps", "adaptive_interval")
_LIST_FIELDS = {"ratios": float, "set_sizes": int, "strengths": float, "gate": float, "generation": str, "variants": str, "translate_from": str}
_BOOL_FIELDS = ("worker", "overwrite", "leakage_check", "strict")


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
        if key in _LIST_FIELDS:
            items = value if isinstance(value, (list, tuple)) else [v.strip() for v in str(value).split(",") if v.strip()]
            return [_LIST_FIELDS[key](v) for v in items]
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
        kinds = {float: "a list of numbers", int: "a list of integers", str: "a list of names"}
        raise bad(kinds[_LIST_FIELDS[key]] if key in _LIST_FIELDS else "a count or a list of seeds" if key == "seeds"
                  else "a number" if key in _FLOAT_FIELDS else "an integer") from None
    if key in _BOOL_FIELDS and not isinstance(value, bool):
        raise bad("true or false")
    return value
