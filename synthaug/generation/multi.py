"""Several LoRA adapters on one loaded base model: a generator for each class, its adapter swapped
in before each of its batches. This is the generator of a GenerationWorker that serves several
rare classes (``GenerationWorker(cache, {"Shirt": adapter_a, "Coat": adapter_b})``).

Loading. The base model is loaded once and every adapter is injected into it under its own peft
adapter name (``class0``, ``class1``, ... in the order of the classes): for the pixel DDPM with
:func:`~synthaug.generation.ddpm.load_lora_into_unet` (peft ``inject_adapter_in_model``), for a
Stable-Diffusion pipeline with diffusers' ``load_lora_weights(..., adapter_name=...)``
(:func:`~synthaug.generation.sd.load_pipeline`). Each class then gets an ordinary backend
generator built on the shared model (``PixelDDPMGenerator(unet=...)``,
``StableDiffusionGenerator(pipeline=...)``), so its settings, labels and provenance are exactly
those of a single-adapter generator of that adapter.

Swapping (:class:`AdapterSwitch`). With ``fuse=True`` (the default) the active adapter is merged
into the weights, as a single-adapter generator merges its one adapter: the switch keeps a copy
of the original weights of every layer a LoRA adapts, and a swap restores them and merges the
next adapter (peft ``set_adapter`` + ``merge``). Sampling then costs what it costs with one
adapter, a swap costs one pass over the adapted layers (``benchmarks/adapters.py`` measures it),
the copy costs the adapted layers' memory once, and each class's images are the ones its
single-adapter generator makes (same arithmetic: original weight + the adapter's delta). A
restore-then-merge never subtracts a delta, so no rounding drift builds up over many swaps.
``fuse=False`` only switches peft's active adapter (peft's ``set_adapter`` on the UNet): swaps are
nearly free, each denoising step pays the LoRA layers' extra matmuls, and images match the merged
ones only up to float rounding.

All classes must be adapters on one base model (checked before anything loads,
:func:`check_class_specs`); a spec with a ``"factory"`` (a generator class of your own) is
built on its own, and swapping to it does nothing.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from synthaug.adapter import read_adapter_config
from synthaug.generation.base import GeneratedBatch, Generator, default_device, default_dtype, dtype_kwargs
from synthaug.generation.loading import generator_from_spec
from synthaug.generation.sources import ModelSource, resolve_source

__all__ = ["AdapterSwitch", "ClassSpec", "MultiAdapterGenerator", "SHARED_SETTINGS", "check_class_specs", "load_class_generators"]

#: overrides that belong to the one loaded model, so every class must agree on them
SHARED_SETTINGS = ("device", "dtype", "compile", "channels_last", "attention", "tiny_vae")


@dataclass(frozen=True)
class ClassSpec:
    """One class of a multi-adapter generator, as checked before loading.

    Attributes:
        name: the class's name (the key the user gave).
        spec: its generator spec (``{"source": ..., "overrides": ...}`` or a ``"factory"`` spec).
        source: the resolved adapter (``None`` for a factory spec).
        label: the class index its records get (``None`` when only the loaded generator knows).
    """

    name: str
    spec: Dict[str, Any]
    source: Optional[ModelSource]
    label: Optional[int]


def _base_identity(src: ModelSource) -> str:
    """What makes two adapters' base models the same model: the resolved folder, or the hub id."""
    path = Path(str(src.path)).expanduser()
    return str(path.resolve()) if path.exists() else str(src.path)


def check_class_specs(specs: Mapping[str, Dict[str, Any]]) -> List[ClassSpec]:
    """Check the classes of a multi-adapter generator without loading any model.

    Args:
        specs: ``{class name: generator spec}``; each spec's ``"source"`` must be a synthaug
            adapter folder, all on one base model (or the spec has a ``"factory"``).

    Returns:
        The classes in the order given.

    Raises:
        ValueError: no classes; a class name that is not a non-empty string; a source that is a
            bare model, not an adapter; adapters on different base models or backends (naming
            both adapters and both base models); classes that disagree on a setting of the one
            loaded model (:data:`SHARED_SETTINGS`); two classes with the same label.
        FileNotFoundError: an adapter folder, or its base model, that does not exist.
    """
    if not specs:
        raise ValueError("a multi-adapter generator needs at least one class: {class name: adapter}")
    out: List[ClassSpec] = []
    first: Optional[ClassSpec] = None
    for name, spec in specs.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"class names must be non-empty strings, got {name!r}")
        if spec.get("factory"):
            label = (spec.get("overrides") or {}).get("label")
            out.append(ClassSpec(name, spec, None, None if label is None else int(label)))
            continue
        src = resolve_source(spec["source"], what=f"adapter of class {name!r}")
        if src.adapter is None:
            raise ValueError(
                f"class {name!r}: {spec['source']} is a model without an adapter; a worker serving several classes loads one "
                "base model and swaps LoRA adapters on it, so give each class a synthaug adapter folder (`synthaug finetune`)"
            )
        overrides = dict(spec.get("overrides") or {})
        cfg = read_adapter_config(src.adapter)
        label = overrides.get("label", cfg.get("label"))
        cs = ClassSpec(name, spec, src, None if label is None else int(label))
        if first is None:
            first = cs
        else:
            a, b = first.source, src
            if (a.backend, _base_identity(a)) != (b.backend, _base_identity(b)):
                raise ValueError(
                    f"adapters on different base models cannot share one worker: class {first.name!r} ({a.adapter}) is on "
                    f"{a.ref} ({a.backend}), class {name!r} ({b.adapter}) is on {b.ref} ({b.backend}); one worker loads one "
                    "base model: run a worker per base model (each with its own --seed-offset)"
                )
            mine, theirs = dict(first.spec.get("overrides") or {}), overrides
            for key in SHARED_SETTINGS:
                if mine.get(key) != theirs.get(key):
                    raise ValueError(
                        f"classes {first.name!r} and {name!r} ask for different {key} ({mine.get(key)!r} vs {theirs.get(key)!r}); "
                        f"they share one loaded model, so {key} must be the same for every class"
                    )
        out.append(cs)
    seen: Dict[int, str] = {}
    for cs in out:
        if cs.label is not None:
            if cs.label in seen:
                raise ValueError(
                    f"classes {seen[cs.label]!r} and {cs.name!r} both make label {cs.label}; each class of a worker needs its own "
                    "label (pass label= in a class's overrides)"
                )
            seen[cs.label] = cs.name
    return out


class AdapterSwitch:
    """Makes one of the peft LoRA adapters injected (unmerged) into ``model`` the active one.

    Args:
        model: a torch module holding peft tuner layers with several adapters.
        fuse: merge the active adapter into the weights (restoring the original weights first);
            ``False``: only switch peft's active adapter (LoRA computed at every forward).

    Attributes:
        active: the active adapter's name (``None`` before the first :meth:`activate`).
        swaps: number of swaps made; ``seconds``: time spent in them.
    """

    def __init__(self, model, *, fuse: bool = True) -> None:
        import torch
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.model = model
        self.fuse = bool(fuse)
        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        self._originals = []
        if self.fuse:
            with torch.no_grad():
                for layer in self.layers:
                    if layer.merged:
                        raise ValueError("AdapterSwitch needs the adapters loaded unmerged (merge=False, or diffusers' load_lora_weights)")
                    base = layer.get_base_layer()
                    bias = getattr(base, "bias", None)
                    self._originals.append((base.weight.detach().clone(), None if bias is None else bias.detach().clone()))
        self.active: Optional[str] = None
        self.swaps = 0
        self.seconds = 0.0

    def activate(self, name: str) -> None:
        """Make adapter ``name`` the one the model applies (nothing to do when it already is)."""
        if name == self.active:
            return
        import torch
        from peft.functional import set_adapter

        t0 = time.perf_counter()
        with torch.no_grad():
            if self.fuse:
                for layer, (weight, bias) in zip(self.layers, self._originals):
                    base = layer.get_base_layer()
                    base.weight.data.copy_(weight)
                    if bias is not None:
                        base.bias.data.copy_(bias)
                    layer.merged_adapters.clear()
            set_adapter(self.model, name, inference_mode=True)
            if self.fuse:
                for layer in self.layers:
                    layer.merge(adapter_names=[name])
        self.active = name
        self.swaps += 1
        self.seconds += time.perf_counter() - t0


class _ClassGenerator(Generator):
    """One class's generator on the shared model: activates its adapter, then generates."""

    def __init__(self, inner: Generator, activate: Callable[[], None]) -> None:
        self.inner = inner
        self._activate = activate
        self.label_names = getattr(inner, "label_names", None)

    @property
    def spec(self) -> Dict[str, Any]:
        return self.inner.spec

    @property
    def label(self) -> Optional[int]:
        return getattr(self.inner, "label", None)

    @property
    def batch_size(self) -> Optional[int]:
        return getattr(self.inner, "batch_size", None)

    def generate(self, n: int, seed: int) -> GeneratedBatch:
        self._activate()
        return self.inner.generate(n, seed)

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"<class generator {self.inner!r}>"


class MultiAdapterGenerator:
    """One base model with a LoRA adapter per class; :meth:`for_class` gives each class's generator.

    Args:
        specs: ``{class name: generator spec}`` (``{"source": adapter folder, "overrides": {...}}``,
            as ``Generator.spec``); every adapter on one base model (:func:`check_class_specs`).
        fuse: how adapters are swapped (module docstring, :class:`AdapterSwitch`).

    Attributes:
        classes: the class names, in order; ``labels``: ``{name: label}``.
        switch: the :class:`AdapterSwitch` of the shared model (``None`` when no class has an adapter).
        loads: how many times a base model was loaded (1 for adapters on one model).
    """

    def __init__(self, specs: Mapping[str, Dict[str, Any]], *, fuse: bool = True) -> None:
        checked = check_class_specs(specs)
        self.classes = [c.name for c in checked]
        self.fuse = bool(fuse)
        self.switch: Optional[AdapterSwitch] = None
        self.loads = 0
        adapters = [c for c in checked if c.source is not None]
        inner: Dict[str, Generator] = {}
        if adapters:
            load = _load_pixel if adapters[0].source.backend == "pixel-ddpm" else _load_sd
            inner.update(load(self, adapters))
            self.loads += 1
        for c in checked:
            if c.source is None:
                inner[c.name] = generator_from_spec(c.spec)
                self.loads += 1
        names = {c.name: f"class{i}" for i, c in enumerate(adapters)}
        self._generators: Dict[str, Generator] = {}
        for c in checked:
            gen = inner[c.name]
            if c.name in names:
                gen = _ClassGenerator(gen, (lambda key=names[c.name]: self.switch.activate(key)))
            self._generators[c.name] = gen
        self.labels: Dict[str, Optional[int]] = {n: getattr(g, "label", None) for n, g in self._generators.items()}
        self._specs = {c.name: dict(c.spec) for c in checked}

    @property
    def spec(self) -> Dict[str, Any]:
        """``{"classes": {name: spec}}``: what a worker process rebuilds this generator from."""
        return {"classes": {n: dict(s) for n, s in self._specs.items()}, "fuse": self.fuse}

    def for_class(self, name: str) -> Generator:
        """The generator of class ``name`` (its ``generate`` swaps its adapter in first)."""
        try:
            return self._generators[name]
        except KeyError:
            raise KeyError(f"no class {name!r}; this generator serves {self.classes}") from None

    def close(self) -> None:
        for gen in self._generators.values():
            gen.close()

    def __repr__(self) -> str:
        return f"MultiAdapterGenerator({self.classes}, fuse={self.fuse})"


def _shared_settings(classes: Sequence[ClassSpec]) -> Dict[str, Any]:
    overrides = dict(classes[0].spec.get("overrides") or {})
    return {k: overrides.get(k) for k in SHARED_SETTINGS}


def _load_pixel(multi: MultiAdapterGenerator, classes: Sequence[ClassSpec]) -> Dict[str, Generator]:
    """The pixel DDPM loaded once, every class's adapter injected under its own name."""
    import json

    import torch
    from diffusers import UNet2DModel

    from synthaug.generation.ddpm import MODEL_CONFIG, PixelDDPMGenerator, extend_class_embedding, load_lora_into_unet

    src = classes[0].source
    shared = _shared_settings(classes)
    device = default_device(shared["device"])
    dtype = default_dtype(device, shared["dtype"])
    model_cfg = json.loads((Path(src.path) / MODEL_CONFIG).read_text())
    null_class = int(model_cfg.get("null_class", len(model_cfg.get("classes") or [])))
    unet = UNet2DModel.from_pretrained(src.path, subfolder="unet", **dtype_kwargs(dtype))
    configs = [read_adapter_config(c.source.adapter) for c in classes]
    embeds = max((int(cfg.get("class_embeds") or 0) for cfg in configs), default=0)
    if embeds > unet.class_embedding.weight.shape[0]:  # an adapter added a class slot
        extend_class_embedding(unet, embeds, null_class)
    with warnings.catch_warnings():  # peft warns that a second adapter makes several: that is the point
        warnings.filterwarnings("ignore", message=".*multiple adapters in the model.*")
        for i, (c, cfg) in enumerate(zip(classes, configs)):
            load_lora_into_unet(unet, c.source.adapter, cfg, merge=False, adapter_name=f"class{i}")
    unet = unet.to(device).eval().requires_grad_(False)
    if shared["channels_last"] is not False:
        unet = unet.to(memory_format=torch.channels_last)
    multi.switch = AdapterSwitch(unet, fuse=multi.fuse)
    model = torch.compile(unet) if shared["compile"] else unet
    out = {}
    for c in classes:
        overrides = dict(c.spec.get("overrides") or {})
        out[c.name] = PixelDDPMGenerator(src.path, model_ref=src.ref, adapter=c.source.adapter, unet=model, **overrides)
    return out


def _load_sd(multi: MultiAdapterGenerator, classes: Sequence[ClassSpec]) -> Dict[str, Generator]:
    """The Stable-Diffusion pipeline loaded once, every class's LoRA loaded under its own name."""
    import torch

    from synthaug.generation.sd import StableDiffusionGenerator, load_pipeline

    src = classes[0].source
    shared = _shared_settings(classes)
    device = default_device(shared["device"])
    dtype = default_dtype(device, shared["dtype"])
    adapters = {f"class{i}": c.source.adapter for i, c in enumerate(classes)}
    pipe = load_pipeline(src.ref, adapters=adapters, fuse=False, dtype=dtype, device=device, tiny_vae=shared["tiny_vae"],
                         attention=shared["attention"] or "auto", channels_last=shared["channels_last"], compile=False,
                         needed_by=src.adapter)
    from peft.tuners.tuners_utils import BaseTunerLayer

    for part in ("text_encoder", "text_encoder_2"):  # the switch swaps the UNet's LoRA only (synthaug's adapters train no other)
        module = getattr(pipe, part, None)
        if module is not None and any(isinstance(m, BaseTunerLayer) for m in module.modules()):
            raise ValueError(f"an adapter of {[str(c.source.adapter) for c in classes]} holds {part} LoRA weights; a worker serving several "
                             "classes swaps UNet adapters only: run a worker per class for adapters that also train the text encoder")
    multi.switch = AdapterSwitch(pipe.unet, fuse=multi.fuse)
    if shared["compile"]:
        compile = shared["compile"]
        pipe.unet = torch.compile(pipe.unet, mode=None if compile is True else str(compile))
    out = {}
    for c in classes:
        overrides = dict(c.spec.get("overrides") or {})
        out[c.name] = StableDiffusionGenerator(src.ref, adapter=c.source.adapter, pipeline=pipe, **overrides)
    return out


def load_class_generators(spec: Dict[str, Any]) -> MultiAdapterGenerator:
    """A :class:`MultiAdapterGenerator` from its :attr:`~MultiAdapterGenerator.spec` (in a worker process)."""
    return MultiAdapterGenerator(spec["classes"], fuse=bool(spec.get("fuse", True)))

