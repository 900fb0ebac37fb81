"""The pixel-space DDPM backend: a class-conditional diffusers ``UNet2DModel`` sampled with DDIM,
DPM-Solver++ or UniPC.

This is the backend of the embedded default (``builtin:fashion-mnist-ddpm``). A model folder
holds ``unet/`` (``UNet2DModel.from_pretrained``), ``scheduler/`` and ``synthaug_model.json``
(class names, the null class used for classifier-free guidance, the crop that turns the model's
canvas back into dataset images, default generation settings). A LoRA adapter from
``synthaug finetune`` is injected with peft and merged into the weights, so sampling costs the
same with or without it. Several adapters can share one UNet (``PixelDDPMGenerator(unet=...)``,
``load_lora_into_unet(..., adapter_name=...)``): see :mod:`synthaug.generation.multi`.

Modes (``mode=``): ``"txt2img"`` (from noise), ``"img2img"`` (SDEdit from real images),
``"translate"`` (SDEdit from real images of other classes into the generator's class, labelled
hard or soft) and ``"feedback"`` (from noise, with classifier guidance toward images a reference
classifier finds hard, :class:`FeedbackGuidance`). Strength sets and translation sources are
shared with the Stable-Diffusion backend (:mod:`synthaug.generation.modes`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from synthaug.adapter import image_sha256, read_adapter_config
from synthaug.classifier import ReferenceClassifier
from synthaug.data.folders import load_image_folder, read_image
from synthaug.generation.base import GeneratedBatch, Generator, default_device, default_dtype, dtype_kwargs, per_image_seeds
from synthaug.generation.modes import check_mode_settings, mode_overrides, parse_strengths, source_provenance, strength_groups, translate_sources
from synthaug.imaging import to_hwc_uint8

__all__ = [
    "FEEDBACK_DEFAULTS",
    "FeedbackGuidance",
    "MODEL_CONFIG",
    "extend_class_embedding",
    "PixelDDPMGenerator",
    "SCHEDULERS",
    "load_lora_into_unet",
    "make_scheduler",
    "model_generation_settings",
    "sample_pixel_ddpm",
]

MODEL_CONFIG = "synthaug_model.json"
SCHEDULERS = ("ddim", "dpm++", "unipc")
_DEFAULTS = {"num_inference_steps": 40, "guidance_scale": 1.0, "scheduler": "ddim", "eta": 0.0}
#: feedback-guided sampling's defaults
FEEDBACK_DEFAULTS = {"feedback_scale": 1.0, "feedback_objective": "entropy"}


def load_lora_into_unet(unet, adapter_dir: Union[str, Path], config: Dict[str, Any], merge: bool = True, *,
                        adapter_name: str = "default") -> None:
    """Inject the adapter's LoRA (peft) into ``unet`` and load its weights.

    The weights file holds peft state-dict keys prefixed with ``unet.`` (diffusers' convention).
    With ``merge``, the LoRA deltas are folded into the base weights (no inference overhead).
    ``adapter_name``: the peft adapter name; several adapters can be injected under different
    names (unmerged) and switched (:class:`~synthaug.generation.multi.AdapterSwitch`). An
    adapter's class-embedding table smaller than the model's (another adapter added a class
    slot) is padded with copies of its last row: rows this adapter never conditions on.
    """
    import torch
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    lora = dict(config.get("lora") or {})
    peft_kwargs = dict(lora.get("peft_config") or {})
    if not peft_kwargs:
        peft_kwargs = {"r": lora["rank"], "lora_alpha": lora.get("alpha", lora["rank"]), "target_modules": lora["target_modules"]}
        if lora.get("modules_to_save"):
            peft_kwargs["modules_to_save"] = lora["modules_to_save"]
    emb = getattr(unet, "class_embedding", None)
    emb = getattr(emb, "original_module", emb)  # a table another adapter's modules_to_save wrapped
    n_rows = int(emb.num_embeddings) if isinstance(emb, torch.nn.Embedding) else None
    inject_adapter_in_model(LoraConfig(**peft_kwargs), unet, adapter_name=adapter_name)
    state = load_file(str(Path(adapter_dir) / config["weights"]))
    state = {k[len("unet."):] if k.startswith("unet.") else k: v for k, v in state.items()}
    if n_rows is not None:
        for k, v in state.items():
            if "class_embedding" in k and v.ndim == 2 and v.shape[0] < n_rows:
                state[k] = torch.cat([v, v[-1:].expand(n_rows - v.shape[0], -1)])
    result = set_peft_model_state_dict(unet, state, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k or "modules_to_save" in k]
    if unexpected:
        raise ValueError(f"adapter {adapter_dir} does not fit this model: unexpected keys {unexpected[:5]}")
    if merge:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in unet.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()


def extend_class_embedding(unet, slots: int, null_class: int) -> None:
    """Grow ``unet``'s class-embedding table to ``slots`` rows; new rows start as the null
    class's embedding, so a new class starts where the unconditional model is."""
    import torch

    emb = unet.class_embedding
    n, dim = emb.weight.shape
    if slots <= n:
        return
    new = torch.nn.Embedding(slots, dim).to(emb.weight.device, emb.weight.dtype)
    with torch.no_grad():
        new.weight[:n] = emb.weight
        new.weight[n:] = emb.weight[null_class]
    unet.class_embedding = new
    unet.register_to_config(num_class_embeds=slots)


def model_generation_settings(model_config: Dict[str, Any]) -> Dict[str, Any]:
    """Generation settings of a pixel-DDPM model folder: the generator's defaults, overridden by
    the model's own (``synthaug_model.json`` ``"generation"``). Keys as ``_DEFAULTS``."""
    settings = dict(_DEFAULTS)
    settings.update(model_config.get("generation") or {})
    return settings


def make_scheduler(model_dir: Union[str, Path], name: str):
    """The sampler ``name`` (one of :data:`SCHEDULERS`) built from the model's ``scheduler/``.

    It keeps the model's own timestep spacing ("leading" for the built-in model). Not
    "trailing": with the cosine schedule, alpha_bar at t = 999 is ~0, so the x0 estimate of the
    first step is divided by ~0; DDIM's clip_sample hides that, but DPM-Solver++ (no clipping)
    turns it into saturated noise. The same holds for UniPC (no clipping either).

    ``"unipc"``: UniPC (Zhao et al. 2023), diffusers' ``UniPCMultistepScheduler`` with its defaults:
    2nd-order multistep predictor with the UniC corrector (``bh2``), predicting x0 — the same
    model calls per step as DPM-Solver++ 2M. On the built-in model both are recognised alike at
    6–15 steps (``benchmarks/sampler.py``).
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    folder = Path(model_dir) / "scheduler"
    if name == "ddim":
        return DDIMScheduler.from_pretrained(folder)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_pretrained(folder, algorithm_type="dpmsolver++")
    if name == "unipc":
        return UniPCMultistepScheduler.from_pretrained(folder)
    raise ValueError(f"unknown scheduler {name!r} for the pixel DDPM; choose one of {SCHEDULERS}")


class PixelDDPMGenerator(Generator):
    """Class-conditional pixel DDPM sampling (text-free: the class index is the condition).

    Args:
        model_dir: folder with ``unet/``, ``scheduler/`` and ``synthaug_model.json``.
        model_ref: how the model is named in provenance (e.g. ``builtin:fashion-mnist-ddpm``).
        adapter: a synthaug adapter directory whose LoRA is applied (its ``label`` becomes the
            default label).
        label: class index to generate (the stored label). Required without an adapter.
        num_inference_steps: denoising steps (default from the adapter, then the model: 40).
        guidance_scale: classifier-free guidance weight (1.0 = conditional only, half the cost).
        scheduler: ``"ddim"`` (default), ``"dpm++"`` (DPM-Solver++ 2M, deterministic) or
            ``"unipc"`` (UniPC, deterministic; see :func:`make_scheduler`).
        eta: DDIM noise (0 = deterministic, 1 = DDPM-like ancestral sampling); its noise is drawn
            per image from the image's own seed, like the initial noise.
        batch_size: images per UNet call (images of one call with different strengths are
            sampled in one call per strength).
        device, dtype: torch device (default CUDA when available) and ``fp32|fp16|bf16``.
        mode: ``"txt2img"`` (from noise), ``"img2img"`` (SDEdit from ``source_images``),
            ``"translate"`` (SDEdit from ``source_images`` of *other* classes into ``label``) or
            ``"feedback"`` (from noise, steered by ``feedback_classifier``).
        source_images: img2img: real images (PIL, H×W(×1) uint8 arrays, image files, or a folder
            of images). translate: a folder in torchvision ``ImageFolder`` layout
            (``DIR/<class name or index>/*.png``) or a list of images with ``source_classes``.
            Image ``i`` of a call starts from source ``(seed + i) % len(source_images)`` (a
            folder's files in class-folder, then file-name order).
        strength: img2img/translate noise level in (0, 1]: the share of the denoising trajectory
            re-run. A list of strengths: each image draws one from its own seed
            (:func:`~synthaug.generation.modes.strength_for_seed`), recorded in ``meta["strength"]``.
        source_classes: translate with a list of ``source_images``: each image's class, a name
            of the model's classes or an index. None may be ``label``.
        soft_label_gamma: translate: ``None`` gives each record the hard label ``label``; a float
            ``g > 0`` gives ``SoftLabel({label: s**g, source_class: 1 - s**g})`` for strength ``s``.
        feedback_classifier: feedback: path of a :class:`~synthaug.classifier.ReferenceClassifier`
            file (trained on real images), loaded on ``device``.
        feedback_scale: feedback: guidance weight ``>= 0`` (0 = plain txt2img sampling; default 1.0).
        feedback_objective: feedback: ``"entropy"`` (default: maximize the classifier's predictive
            entropy) or ``"loss"`` (maximize its cross-entropy for ``label``; the class is found in
            the classifier's classes by the model's class name, or by index when the model has no
            class names).
        compile: ``torch.compile`` the UNet.
        channels_last: UNet weights in channels-last memory format (default: on; same images up
            to float rounding; on one CPU thread 1.17-1.28× the built-in model's images/s,
            ``benchmarks/sampler.py``). ``False`` keeps the contiguous format.
        unet: a UNet already loaded (with this adapter's LoRA among others) to share with other
            generators (:class:`~synthaug.generation.multi.MultiAdapterGenerator`). Nothing is
            loaded then: device, ``dtype``, ``channels_last``, ``compile`` and the adapter's
            weights are the sharer's, which activates this generator's adapter before each call.
    """

    def __init__(
        self,
        model_dir: Union[str, Path],
        *,
        model_ref: Optional[str] = None,
        adapter: Optional[Union[str, Path]] = None,
        label: Optional[int] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        scheduler: Optional[str] = None,
        eta: Optional[float] = None,
        batch_size: int = 64,
        device: Optional[str] = None,
        dtype: Optional[str] = None,
        mode: str = "txt2img",
        source_images: Optional[Union[str, Path, Sequence]] = None,
        strength: Union[float, Sequence[float]] = 0.6,
        source_classes: Optional[Sequence[Union[int, str]]] = None,
        soft_label_gamma: Optional[float] = None,
        feedback_classifier: Optional[Union[str, Path]] = None,
        feedback_scale: Optional[float] = None,
        feedback_objective: Optional[str] = None,
        compile: bool = False,
        channels_last: bool = True,
        height: Optional[int] = None,
        width: Optional[int] = None,
        prompt: Optional[str] = None,
        negative_prompt: Optional[str] = None,
        unet: Optional[Any] = None,
    ) -> None:
        import torch
        from diffusers import UNet2DModel

        self.model_dir = Path(model_dir)
        cfg_path = self.model_dir / MODEL_CONFIG
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{self.model_dir} is not a pixel-DDPM folder (no {MODEL_CONFIG})")
        self.model_config = json.loads(cfg_path.read_text())
        self.model_ref = model_ref or str(self.model_dir)
        self.adapter = Path(adapter) if adapter is not None else None
        self.adapter_config: Dict[str, Any] = {}
        if self.adapter is not None:
            self.adapter_config = read_adapter_config(self.adapter)
        if prompt is not None or negative_prompt is not None:
            raise ValueError(
                f"{self.model_ref} is a class-conditional pixel model without text input; "
                "choose the class with label= instead of prompt="
            )
        self.label_names = list(self.model_config.get("classes") or []) or None
        settings = model_generation_settings(self.model_config)
        settings.update(self.adapter_config.get("generation") or {})
        given = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "scheduler": scheduler, "eta": eta}
        settings.update({k: v for k, v in given.items() if v is not None})
        self.num_inference_steps = int(settings["num_inference_steps"])
        self.guidance_scale = float(settings["guidance_scale"])
        self.scheduler_name = str(settings["scheduler"]).lower()
        self.eta = float(settings["eta"])
        if self.scheduler_name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r} for the pixel DDPM; choose one of {SCHEDULERS}")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_classes = model_classes = list(self.label_names or [])
        self.null_class = int(self.model_config.get("null_class", len(model_classes)))
        # An adapter of *your* class (synthaug.json "label_names"): it conditions on the model slot
        # it trained ("model_class"); records carry your label and name, label= overrides the label.
        self.user_classes = bool(self.adapter_config.get("label_names"))
        if self.user_classes:
            self.label_names = [str(n) for n in self.adapter_config["label_names"]]
            self.slot = int(self.adapter_config["model_class"])
        if label is None:
            label = self.adapter_config.get("label")
        if label is None:
            names = ", ".join(f"{i}={n}" for i, n in enumerate(self.label_names or []))
            raise ValueError(f"{self.model_ref} is class-conditional: pass label= (one of {names})")
        self.label = int(label)
        if self.user_classes:
            if self.label < 0:
                raise ValueError(f"label {self.label} must be >= 0")
            if self.label >= len(self.label_names):
                self.label_names += [""] * (self.label + 1 - len(self.label_names))
            if not self.label_names[self.label]:
                self.label_names[self.label] = str(self.adapter_config.get("class_name") or "")
        else:
            n_classes = len(model_classes)
            if n_classes and not 0 <= self.label < n_classes:
                raise ValueError(f"label {self.label} is outside the model's {n_classes} classes")
            self.slot = self.label
        self.image_size = int(self.model_config.get("image_size", 32))
        self.crop = self.model_config.get("crop") or [0, 0, self.image_size, self.image_size]
        out_h, out_w = self.crop[2], self.crop[3]
        if (height not in (None, out_h)) or (width not in (None, out_w)):
            raise ValueError(f"{self.model_ref} makes {out_h}×{out_w} images; height/width cannot be changed")
        check_mode_settings(
            mode, source_images=source_images, source_classes=source_classes, soft_label_gamma=soft_label_gamma,
            feedback_classifier=feedback_classifier, feedback_scale=feedback_scale, feedback_objective=feedback_objective,
        )
        self.strengths = parse_strengths(strength)
        self.mode = mode
        self.strength = self.strengths[0] if len(self.strengths) == 1 else self.strengths
        self.soft_label_gamma = float(soft_label_gamma) if soft_label_gamma is not None else None
        self.batch_size = int(batch_size)
        self.device = default_device(device)
        self.dtype = default_dtype(self.device, dtype)
        self._dtype_name = str(dtype or "auto")
        self._sources: List[np.ndarray] = []
        self._source_hashes: List[str] = []
        self._source_classes: List[int] = []
        if mode == "img2img":
            self._sources, self._source_hashes = self._load_sources(source_images)
        elif mode == "translate":
            items, self._source_classes = translate_sources(source_images, source_classes, label=self.label, label_names=self.label_names)
            self._sources, self._source_hashes = self._load_sources(items)
        self.feedback: Optional[FeedbackGuidance] = None
        if mode == "feedback":
            self.feedback = self._feedback(feedback_classifier, feedback_scale, feedback_objective)

        self.channels_last = bool(channels_last)
        self.shared = unet is not None
        if unet is not None:
            self.unet = unet
        else:
            self.unet = UNet2DModel.from_pretrained(self.model_dir, subfolder="unet", **dtype_kwargs(self.dtype))
            if self.adapter is not None:
                embeds = self.adapter_config.get("class_embeds")
                if embeds and embeds > self.unet.class_embedding.weight.shape[0]:  # the adapter added a class slot
                    extend_class_embedding(self.unet, int(embeds), self.null_class)
                load_lora_into_unet(self.unet, self.adapter, self.adapter_config, merge=True)
            self.unet = self.unet.to(self.device).eval().requires_grad_(False)
            if self.channels_last:
                self.unet = self.unet.to(memory_format=torch.channels_last)
            if compile:
                self.unet = torch.compile(self.unet)
        self._compile = bool(compile)
        with_strength = mode in ("img2img", "translate")
        self._overrides = {
            k: v
            for k, v in dict(
                label=label,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                scheduler=scheduler,
                eta=eta,
                batch_size=batch_size,
                device=device,
                dtype=dtype,
                mode=mode if mode != "txt2img" else None,
                source_images=[str(p) for p in source_images] if isinstance(source_images, (list, tuple)) and all(isinstance(p, (str, Path)) for p in source_images) else (str(source_images) if isinstance(source_images, (str, Path)) else None),
                **mode_overrides(mode, strength, source_classes, soft_label_gamma),
                feedback_classifier=str(self.feedback.path) if self.feedback is not None else None,
                feedback_scale=feedback_scale,
                feedback_objective=feedback_objective,
                compile=compile or None,
                channels_last=None if channels_last else False,
            ).items()
            if v is not None
        }
        if with_strength and "source_images" not in self._overrides:
            self._overrides["source_images"] = None  # in-memory images: the spec cannot carry them

    # ------------------------------------------------------------------ helpers
    def _load_sources(self, source_images):
        if isinstance(source_images, (str, Path)):
            source_images = load_image_folder(source_images, channels=1).images
        arrays = []
        for i, im in enumerate(source_images):
            if isinstance(im, (str, Path)):
                im = read_image(im, channels=1)
            arr = to_hwc_uint8(im)
            if arr.shape[2] == 3:
                arr = (arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).round().astype(np.uint8)[..., None]
            if arr.shape[:2] != (self.crop[2], self.crop[3]):
                from PIL import Image

                arr = np.asarray(Image.fromarray(arr[:, :, 0]).resize((self.crop[3], self.crop[2]), Image.BILINEAR))[..., None]
            arrays.append(arr)
        if not arrays:
            raise ValueError("source_images holds no images")
        return arrays, [image_sha256(a) for a in arrays]

    def _feedback(self, path, scale, objective) -> "FeedbackGuidance":
        """The classifier guidance of feedback mode (the classifier loaded on this device)."""
        scale = float(scale) if scale is not None else FEEDBACK_DEFAULTS["feedback_scale"]
        objective = objective or FEEDBACK_DEFAULTS["feedback_objective"]
        prediction = make_scheduler(self.model_dir, self.scheduler_name).config.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise ValueError(f"mode='feedback' needs a model that predicts the noise (prediction_type 'epsilon'); {self.model_ref} predicts {prediction!r}")
        classifier = ReferenceClassifier.load(Path(path).resolve(), device=self.device)
        target = None
        if objective == "loss":
            name = self.label_names[self.label] if self.label_names else None
            if name is None:
                target = classifier.class_index(self.label)
            elif name in classifier.classes:
                target = classifier.classes.index(name)
            else:
                raise ValueError(
                    f"feedback_objective='loss' needs the generator's class {name!r} among the reference classifier's classes "
                    f"{classifier.classes} ({classifier.path}); train the classifier on this model's label space"
                )
        return FeedbackGuidance(classifier, objective=objective, scale=scale, target=target, crop=self.crop)

    def _scheduler(self):
        return make_scheduler(self.model_dir, self.scheduler_name)

    def _to_canvas(self, images: List[np.ndarray]):
        import torch

        top, left, h, w = self.crop
        x = torch.full((len(images), 1, self.image_size, self.image_size), -1.0)
        for i, im in enumerate(images):
            x[i, 0, top : top + h, left : left + w] = torch.from_numpy(im[:, :, 0].astype(np.float32) / 127.5 - 1.0)
        return x

    @property
    def spec(self) -> Dict[str, Any]:
        source = str(self.adapter) if self.adapter is not None else self.model_ref
        return {"source": source, "overrides": dict(self._overrides), "backend": "pixel-ddpm"}

    # ------------------------------------------------------------------ sampling
    def generate(self, n: int, seed: int) -> GeneratedBatch:
        """``n`` images; image ``i`` from per-image seed ``seed + i``.

        Returns:
            :class:`GeneratedBatch`: uint8 images N×h×w×1 (the model's crop), ``n`` labels (the
            class index; soft labels in translate mode with ``soft_label_gamma``), ``n`` meta dicts.
        """
        import torch

        seeds = per_image_seeds(n, seed)
        top, left, h, w = self.crop
        with_strength = self.mode in ("img2img", "translate")
        chunks = []
        batch_of = []  # [first seed, size] of the UNet batch each image was made in
        for start in range(0, n, self.batch_size):
            chunk = seeds[start : start + self.batch_size]
            out = np.empty((len(chunk), h, w, 1), np.uint8)
            # one sampler call per strength among the chunk's images (one call without strengths)
            for strength, positions in strength_groups(chunk, self.strengths if with_strength else None):
                out[positions] = self._sample([chunk[p] for p in positions], strength)
            chunks.append(out)
            batch_of += [[chunk[0], len(chunk)]] * len(chunk)
        images = np.concatenate(chunks) if chunks else np.zeros((0, h, w, 1), np.uint8)
        label_name = self.label_names[self.label] if self.label_names and self.label < len(self.label_names) else None
        base_meta = {
            "source": self.spec["source"],
            "overrides": self.spec["overrides"],
            "backend": "pixel-ddpm",
            "model": self.model_ref,
            "adapter": str(self.adapter) if self.adapter is not None else None,
            "adapter_hash": self.adapter_config.get("adapter_hash"),
            "mode": self.mode,
            "prompt": None,
            "negative_prompt": None,
            "label": self.label,
            "label_name": label_name,
            "model_class": self.slot,
            "model_class_name": self.model_classes[self.slot] if 0 <= self.slot < len(self.model_classes) else None,
            "scheduler": self.scheduler_name,
            "eta": self.eta,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "resolution": [h, w],
            "device": self.device,
            "dtype": str(self.dtype).replace("torch.", ""),
            "torch_version": torch.__version__,
        }
        if self.feedback is not None:
            base_meta.update(self.feedback.meta())
        metas, labels = [], []
        for s, batch in zip(seeds, batch_of):
            # CPU kernels may sum in another order for another batch size (last-bit float
            # differences, now and then one uint8 level): generate(*reversed(batch)) remakes the
            # record bit for bit; generate(1, seed) within that rounding.
            m = dict(base_meta, seed=s, batch=batch)
            label: Any = self.label
            if with_strength:
                keys, label = source_provenance(s, mode=self.mode, label=self.label, strengths=self.strengths, source_hashes=self._source_hashes,
                                                source_classes=self._source_classes, label_names=self.label_names, soft_label_gamma=self.soft_label_gamma)
                m.update(keys)
            metas.append(m)
            labels.append(label)
        return GeneratedBatch(images=images, labels=labels, meta=metas)

    def _sample(self, seeds: List[int], strength: Optional[float] = None) -> np.ndarray:
        """uint8 N×h×w×1 images for the per-image ``seeds`` (all of one ``strength`` in img2img
        and translate mode)."""
        x0 = None
        if self.mode in ("img2img", "translate"):
            x0 = self._to_canvas([self._sources[s % len(self._sources)] for s in seeds])
        return sample_pixel_ddpm(
            self.unet,
            self._scheduler(),
            seeds=seeds,
            label=self.slot,
            null_class=self.null_class,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            eta=self.eta if self.scheduler_name == "ddim" else 0.0,
            image_size=self.image_size,
            crop=self.crop,
            x0=x0,
            strength=strength if strength is not None else 1.0,
            feedback=self.feedback if self.feedback is not None and self.feedback.scale > 0 else None,
        )

    def __repr__(self) -> str:
        src = f"adapter={str(self.adapter)!r}, " if self.adapter is not None else ""
        return f"PixelDDPMGenerator({self.model_ref!r}, {src}label={self.label}, mode={self.mode!r}, device={self.device!r})"


class FeedbackGuidance:
    """Classifier feedback for :func:`sample_pixel_ddpm`: steer each denoising step toward images
    a reference classifier finds hard (Askari-Hemmat et al. 2024, feedback-guided synthesis).

    At step ``t`` with noise prediction ``eps`` (after classifier-free guidance) it forms the
    model's estimate of the clean image, ``x0 = (x_t - sqrt(1 - ᾱ_t)·eps) / sqrt(ᾱ_t)``, crops it
    to the image region, maps [-1, 1] to the classifier's input (scale to [0, 1], channels,
    bilinear resize, the classifier's mean/std: :meth:`ReferenceClassifier.inputs` in torch, so
    gradients flow), takes the gradient ``∇x0 J`` of the objective ``J`` summed over the batch,
    and shifts the noise prediction as classifier guidance does (Dhariwal & Nichol 2021, with
    ``∇x_t J ≈ ∇x0 J / sqrt(ᾱ_t)``): ``eps ← eps - scale·sqrt(1 - ᾱ_t)·∇x0 J / sqrt(ᾱ_t)``.
    No gradient flows through the UNet (one classifier forward and backward per step). The
    classifier is in eval mode, so each image's gradient depends on that image alone.

    Objectives (per image; maximized): ``"entropy"``, the predictive entropy
    ``-Σ p log p`` (nats); ``"loss"``, the cross-entropy ``-log p[target]``.

    Args:
        classifier: the reference classifier (on the sampler's device).
        objective: ``"entropy"`` or ``"loss"``.
        scale: guidance weight ``>= 0``.
        target: the classifier's class index for ``"loss"``.
        crop: ``[top, left, h, w]`` of the image region of the model's canvas.
    """

    def __init__(self, classifier: ReferenceClassifier, *, objective: str, scale: float, target: Optional[int], crop: Sequence[int]) -> None:
        if objective not in ("entropy", "loss"):
            raise ValueError(f"feedback objective must be 'entropy' or 'loss', got {objective!r}")
        if objective == "loss" and target is None:
            raise ValueError("feedback objective 'loss' needs the target class")
        self.classifier, self.objective, self.scale, self.target, self.crop = classifier, objective, float(scale), target, list(crop)
        self.classifier.model.eval().requires_grad_(False)

    @property
    def path(self) -> Optional[Path]:
        return self.classifier.path

    def meta(self) -> Dict[str, Any]:
        """The provenance keys of feedback mode."""
        return {
            "feedback_objective": self.objective,
            "feedback_scale": self.scale,
            "feedback_classifier": str(self.classifier.path) if self.classifier.path is not None else None,
            "feedback_classifier_sha256": self.classifier.sha256,
        }

    def classifier_input(self, canvas):
        """Float N×1×S×S canvases in [-1, 1] as the classifier's normalized input (differentiable)."""
        import torch
        import torch.nn.functional as F

        top, left, h, w = self.crop
        x = (canvas[:, :, top : top + h, left : left + w].clamp(-1, 1) + 1) / 2
        ref = self.classifier
        if x.shape[1] != ref.in_channels:
            x = x.repeat(1, ref.in_channels, 1, 1) if ref.in_channels == 3 else x.mean(dim=1, keepdim=True)
        if tuple(x.shape[2:]) != (ref.image_size, ref.image_size):
            x = F.interpolate(x, size=(ref.image_size, ref.image_size), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(ref.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(ref.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def values(self, canvas):
        """The objective per image (float N) of canvases N×1×S×S in [-1, 1]."""
        import torch

        logp = torch.log_softmax(self.classifier.model(self.classifier_input(canvas)).float(), dim=1)
        if self.objective == "entropy":
            return -(logp.exp() * logp).sum(dim=1)
        return -logp[:, self.target]

    def __call__(self, x, eps, alpha_bar: float):
        """The guided noise prediction for sample ``x`` at a step with cumulative alpha ``alpha_bar``."""
        import torch

        a = float(alpha_bar)
        param = next(self.classifier.model.parameters())
        with torch.enable_grad():
            x0 = ((x.float() - (1 - a) ** 0.5 * eps.float()) / a**0.5).to(param.device, param.dtype).detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.values(x0).sum(), x0)
        shift = self.scale * (1 - a) ** 0.5 / a**0.5 * grad.to(eps.device, torch.float32)
        return (eps.float() - shift).to(eps.dtype)


def sample_pixel_ddpm(
    unet,
    scheduler,
    *,
    seeds: Sequence[int],
    label: int,
    null_class: int,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    image_size: int = 32,
    crop: Optional[Sequence[int]] = None,
    x0=None,
    strength: float = 1.0,
    feedback: Optional["FeedbackGuidance"] = None,
) -> np.ndarray:
    """Sample a class-conditional pixel UNet; uint8 N×h×w×1 (the ``crop`` of the canvas).

    Image ``i`` starts from noise drawn on a CPU generator seeded with ``seeds[i]`` (and draws
    its DDIM ``eta`` noise from it), so images do not depend on which others share the batch.
    With ``x0`` (float N×1×S×S in [-1, 1]), the last ``strength`` share of the trajectory is run
    from ``x0`` noised to that level (SDEdit). With ``feedback``, each step's noise prediction
    (after classifier-free guidance) is shifted by ``feedback(x, eps, alpha_bar_t)``
    (:class:`FeedbackGuidance`).
    """
    import torch

    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    crop = list(crop) if crop is not None else [0, 0, image_size, image_size]
    with torch.no_grad():
        scheduler.set_timesteps(num_inference_steps)
        timesteps = scheduler.timesteps
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        shape = (1, image_size, image_size)
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
        if x0 is not None:
            n_keep = min(max(int(round(num_inference_steps * strength)), 1), num_inference_steps)
            begin = num_inference_steps - n_keep
            timesteps = timesteps[begin:]
            x = scheduler.add_noise(x0.float(), noise, timesteps[:1].repeat(len(seeds)))
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(begin)
        else:
            x = noise * scheduler.init_noise_sigma
        x = x.to(device, dtype)
        n = len(seeds)
        labels = torch.full((n,), int(label), dtype=torch.long, device=device)
        null = torch.full((n,), int(null_class), dtype=torch.long, device=device)
        for t in timesteps:
            tt = torch.full((n,), int(t), device=device, dtype=torch.long)
            xin = scheduler.scale_model_input(x, t)
            if guidance_scale == 1.0:
                eps = unet(xin, tt, class_labels=labels).sample
            else:
                both = unet(torch.cat([xin, xin]), torch.cat([tt, tt]), class_labels=torch.cat([labels, null])).sample
                cond, unc = both.chunk(2)
                eps = unc + guidance_scale * (cond - unc)
            if feedback is not None:
                eps = feedback(x, eps, float(scheduler.alphas_cumprod[int(t)]))
            kwargs = {}
            if eta > 0:
                var_noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
                kwargs = {"eta": eta, "variance_noise": var_noise.to(device)}
            x = scheduler.step(eps.float(), t, x.float(), **kwargs).prev_sample.to(dtype)
        top, left, h, w = crop
        x = x.float().clamp(-1, 1)[:, :, top : top + h, left : left + w]
        return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
