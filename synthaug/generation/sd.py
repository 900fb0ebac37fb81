"""The Stable-Diffusion-family backend: SD 1.x/2.x and SDXL through diffusers' auto pipelines.

The pipeline is loaded with ``AutoPipelineForText2Image.from_pretrained`` (a local diffusers
folder or a hub id already in the local Hugging Face cache); image-to-image mode reuses its
components through ``AutoPipelineForImage2Image.from_pipe``. A synthaug adapter's LoRA is loaded
with diffusers' own ``load_lora_weights`` and fused into the weights, so sampling costs the same
with or without it. Several adapters can share one pipeline (:func:`load_pipeline` with
``fuse=False``, ``StableDiffusionGenerator(pipeline=...)``): see :mod:`synthaug.generation.multi`.

Speed settings (each overridable): SDPA attention (diffusers' default on torch 2), xformers when
installed and on CUDA; fp16 on CUDA and fp32 on CPU (``dtype="bf16"`` for bf16);
``channels_last`` on CUDA; ``compile=True`` wraps the UNet in ``torch.compile``.

Determinism: image ``i`` of ``generate(n, seed)`` starts from noise drawn by a CPU
``torch.Generator`` seeded with ``seed + i`` (diffusers gets one generator per image, which also
drives VAE-encoder sampling in img2img and any noise an ancestral scheduler adds), so the same
seed gives the same image on the same device and dtype. Images made in one pipeline call of
``batch_size`` images can still differ in the last bits of their floats from images made one at a
time: CPU BLAS (MKL) and oneDNN pick different kernels, with different summation orders, for
different matrix sizes, and the batch is one of the sizes (measured: 1e-6 relative; after
quantization to uint8 about one pixel in 10^4 moves by one level). Hence:

* the default ``batch_size`` on CPU is 1, where ``generate(1, seed + i)`` reproduces image ``i``
  of any ``generate(n, seed)`` bit for bit;
* every record's meta holds ``batch`` = ``[first_seed, size]`` of the pipeline call that made it,
  so ``generate(size, first_seed).images[seed - first_seed]`` reproduces it bit for bit at any
  batch size (same device, dtype and library versions).

Modes: ``"txt2img"``, ``"img2img"`` (SDEdit from real images) and ``"translate"`` (SDEdit from
real images of other classes into the generator's class, labelled hard or soft), with one
strength or a set of strengths drawn per image (:mod:`synthaug.generation.modes`). Feedback-guided
sampling (``mode="feedback"``) is for the pixel-DDPM backend only and is refused here.

The safety checker of SD 1.x/2.x checkpoints is not loaded: it replaces images it flags with black
ones, which would enter a training set as labeled examples of the class.
"""

from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from synthaug.adapter import image_sha256, read_adapter_config
from synthaug.data.folders import load_image_folder, read_image
from synthaug.generation.base import GeneratedBatch, Generator, default_device, default_dtype, dtype_kwargs, per_image_seeds
from synthaug.generation.modes import check_mode_settings, mode_overrides, parse_strengths, source_provenance, strength_groups, translate_sources
from synthaug.generation.sources import looks_like_hub_id
from synthaug.imaging import to_hwc_uint8

__all__ = ["StableDiffusionGenerator", "SCHEDULERS", "ATTENTION", "load_pipeline", "resolve_pipeline_source"]

#: scheduler names accepted by ``scheduler=`` -> (diffusers class, extra config). A diffusers
#: scheduler class name (e.g. ``"EulerDiscreteScheduler"``) is accepted too.
SCHEDULERS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}
#: values of ``attention=``
ATTENTION = ("auto", "sdpa", "xformers", "eager")
_DEFAULTS = {"num_inference_steps": 30, "guidance_scale": 7.5}
_GPU_BATCH = 8


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub always comes with diffusers
        return False


def resolve_pipeline_source(model: str, *, adapter: Optional[Path] = None) -> Tuple[Dict[str, Any], bool]:
    """Check that ``model`` is a diffusers pipeline that can be loaded here, without loading it.

    Returns:
        ``(model_index, local_files_only)``: the pipeline's ``model_index.json`` and whether it
        must be loaded from local files (a hub id found in the local Hugging Face cache).

    Raises:
        FileNotFoundError: a folder that does not exist; a hub id that is neither in the local
            cache nor downloadable (offline); an adapter's base model that is missing.
        ValueError: a folder without ``model_index.json``.
    """
    from diffusers import DiffusionPipeline

    needed_by = f"adapter {adapter} needs its base model {model}, which " if adapter is not None else f"model {model} "
    path = Path(model).expanduser()
    if path.exists() or not looks_like_hub_id(model):
        if not path.exists():
            raise FileNotFoundError(f"{needed_by}does not exist (no such folder)")
        if not path.is_dir():
            raise ValueError(f"{needed_by}is a file; give a diffusers pipeline folder (with model_index.json)")
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{needed_by}is not a diffusers pipeline folder: {path} has no model_index.json")
        return DiffusionPipeline.load_config(str(path)), True
    try:  # a hub id: the local cache first, so nothing is fetched when it is there
        return DiffusionPipeline.load_config(model, local_files_only=True), True
    except (OSError, ValueError):
        pass
    hint = (
        "download it first on a machine with internet access (e.g. `hf download "
        f"{model}`), or pass a local diffusers pipeline folder"
    )
    if _hub_offline():
        raise FileNotFoundError(f"{needed_by}is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: {hint}")
    try:
        return DiffusionPipeline.load_config(model), False
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"{needed_by}could not be found locally or fetched from the Hugging Face hub ({exc}); {hint}") from None


def _size_pair(value: Union[None, int, Sequence[int]], name: str) -> Optional[Tuple[int, int]]:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(f"{name} must be an int or [height, width], got {value!r}")


class StableDiffusionGenerator(Generator):
    """Text-to-image or image-to-image (SDEdit) sampling from a Stable-Diffusion-family pipeline.

    Args:
        model: a diffusers pipeline folder (holding ``model_index.json``) or a hub id in the local
            Hugging Face cache (SD 1.x/2.x, SDXL: whatever ``AutoPipelineForText2Image`` loads).
        adapter: a synthaug adapter directory (``synthaug.json`` + LoRA weights); its ``prompt``,
            ``negative_prompt``, ``label``, ``class_name``, ``resolution`` and ``generation``
            settings become the defaults. ``model`` is then its ``base_model``.
        prompt: text prompt (default: the adapter's). Required without an adapter.
        negative_prompt: what to steer away from (default: the adapter's, else none).
        height, width: generated image size in pixels, multiples of 8 (default: the adapter's
            ``generation.height/width``, else its ``resolution``, else the model's native size,
            e.g. 512 for SD 1.5).
        num_inference_steps: denoising steps (default: adapter, else 30).
        guidance_scale: classifier-free guidance weight (default: adapter, else 7.5; 1.0 turns
            guidance off and halves the cost).
        scheduler: a name from :data:`SCHEDULERS` (``"ddim"``, ``"dpm++"``, ``"euler-a"``, ...) or
            a diffusers scheduler class name; default: the adapter's, else the pipeline's own.
        label: class index the images get in the classifier's label space (default: the
            adapter's). Required without an adapter.
        batch_size: images per pipeline call (default 1 on CPU, where it keeps images bit-identical
            to one-at-a-time generation, see the module docstring; 8 on CUDA).
        device: torch device (default CUDA when available, else CPU).
        dtype: ``"fp32" | "fp16" | "bf16"`` (default fp16 on CUDA, fp32 on CPU).
        mode: ``"txt2img"`` (from noise), ``"img2img"`` (SDEdit: each image starts from a real
            image noised to ``strength`` and denoised with the adapted model) or ``"translate"``
            (SDEdit from real images of *other* classes into ``label``, Diff-Mix style).
            ``"feedback"`` is refused: it needs the pixel-DDPM backend.
        source_images: img2img sources: a folder of images, a list of image files, or in-memory
            images (PIL, H×W×C uint8 arrays; these cannot travel in ``spec``, so a worker process
            cannot use them). translate sources: a folder in torchvision ``ImageFolder`` layout
            (``DIR/<class name or index>/*.png``) or a list of images with ``source_classes``.
            Image ``i`` of a call starts from source ``(seed + i) % len(source_images)`` (a
            translate folder's files in class-folder, then file-name order); its meta names the
            source's SHA-256 (of its decoded pixels as stored, :func:`synthaug.adapter.image_sha256`).
        strength: img2img/translate noise level in (0, 1]: the share of the denoising trajectory
            re-run (1.0 ignores the source). A list of strengths: each image draws one from its
            own seed (:func:`~synthaug.generation.modes.strength_for_seed`), recorded in
            ``meta["strength"]``; images of one call are sampled in one pipeline call per strength.
        source_classes: translate with a list of ``source_images``: each image's class in the
            label space, by name (the adapter's ``label_names``) or index. None may be ``label``.
        soft_label_gamma: translate: ``None`` gives each record the hard label ``label``; a float
            ``g > 0`` gives ``SoftLabel({label: s**g, source_class: 1 - s**g})`` for strength ``s``.
        feedback_classifier, feedback_scale, feedback_objective: accepted only to refuse them
            clearly (feedback-guided sampling is a pixel-DDPM mode).
        compile: ``torch.compile`` the UNet (``True``, or a ``torch.compile`` mode name such as
            ``"max-autotune"``). The first call then takes minutes.
        channels_last: UNet and VAE in channels-last memory format (default: on CUDA only).
        tiny_vae: a folder holding a diffusers ``AutoencoderTiny`` (e.g. TAESD for SD-1.x) that
            decodes the latents instead of the model's VAE: much cheaper decoding at some loss of
            detail; txt2img only. Recorded in each record's provenance.
        attention: ``"auto"`` (xformers when installed and on CUDA, else SDPA), ``"sdpa"``,
            ``"xformers"`` or ``"eager"`` (diffusers' plain attention; for comparisons).
        grayscale: convert the RGB output to one-channel luma (ITU-R 601), for gray label spaces
            (default: ``True`` when the adapter's ``synthaug.json`` has ``"target_channels": 1``,
            or ``"channels": 1`` without ``target_channels``).
        output_size: resize the generated images to this size (int or ``[height, width]``,
            Lanczos) before they are returned, e.g. to the classifier's input size; default: the
            adapter's ``output_size``, else no resize.
        pipeline: a pipeline already loaded by :func:`load_pipeline` to share with other
            generators (:class:`~synthaug.generation.multi.MultiAdapterGenerator`: one base model,
            a generator per LoRA adapter). Nothing is loaded then: the adapter's LoRA, the device,
            ``dtype``, ``attention``, ``channels_last``, ``compile`` and ``tiny_vae`` are the
            sharer's (which activates this generator's adapter before each call); this generator
            keeps its own settings, sizes and scheduler (put on the pipeline before each call).
    """

    def __init__(
        self,
        model: Union[str, os.PathLike],
        *,
        adapter: Optional[Union[str, os.PathLike]] = None,
        prompt: Optional[str] = None,
        negative_prompt: Optional[str] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        scheduler: Optional[str] = None,
        label: Optional[int] = None,
        batch_size: Optional[int] = None,
        device: Optional[str] = None,
        dtype: Optional[str] = None,
        mode: str = "txt2img",
        source_images: Optional[Union[str, os.PathLike, Sequence]] = None,
        strength: Union[float, Sequence[float]] = 0.6,
        source_classes: Optional[Sequence[Union[int, str]]] = None,
        soft_label_gamma: Optional[float] = None,
        feedback_classifier: Optional[Union[str, os.PathLike]] = None,
        feedback_scale: Optional[float] = None,
        feedback_objective: Optional[str] = None,
        compile: Union[bool, str] = False,
        channels_last: Optional[bool] = None,
        attention: str = "auto",
        grayscale: Optional[bool] = None,
        output_size: Optional[Union[int, Sequence[int]]] = None,
        tiny_vae: Optional[Union[str, os.PathLike]] = None,
        pipeline: Optional[Any] = None,
    ) -> None:

        # ---- arguments that can be checked before anything is loaded
        check_mode_settings(
            mode, source_images=source_images, source_classes=source_classes, soft_label_gamma=soft_label_gamma,
            feedback_classifier=feedback_classifier, feedback_scale=feedback_scale, feedback_objective=feedback_objective,
            modes=("txt2img", "img2img", "translate"),
        )
        self.strengths = parse_strengths(strength)
        if tiny_vae is not None:
            if mode != "txt2img":
                raise ValueError(f"tiny_vae decodes txt2img latents; mode {mode!r} encodes images with the model's own VAE")
            if not (Path(tiny_vae) / "config.json").is_file():
                raise FileNotFoundError(f"tiny_vae {tiny_vae} is not a diffusers AutoencoderTiny folder (no config.json)")
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")

        self.adapter = Path(adapter) if adapter is not None else None
        self.adapter_config: Dict[str, Any] = {}
        if self.adapter is not None:
            self.adapter_config = read_adapter_config(self.adapter)
            if self.adapter_config["backend"] != "stable-diffusion":
                raise ValueError(f"adapter {self.adapter} is for backend {self.adapter_config['backend']!r}, not stable-diffusion")
        cfg = self.adapter_config
        self.model_ref = str(model)
        self.device = default_device(device)
        self.dtype = default_dtype(self.device, dtype)
        on_cuda = self.device.startswith("cuda")

        settings = dict(_DEFAULTS, scheduler=None)
        settings.update({k: v for k, v in (cfg.get("generation") or {}).items() if k in ("num_inference_steps", "guidance_scale", "scheduler")})
        given = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "scheduler": scheduler}
        settings.update({k: v for k, v in given.items() if v is not None})
        self.num_inference_steps = int(settings["num_inference_steps"])
        self.guidance_scale = float(settings["guidance_scale"])
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if mode in ("img2img", "translate") and int(self.num_inference_steps * min(self.strengths)) < 1:
            raise ValueError(
                f"strength {min(self.strengths)} × {self.num_inference_steps} steps leaves no denoising step (diffusers runs "
                f"int(steps × strength) of them); raise num_inference_steps to at least {math.ceil(1 / min(self.strengths))} or the strength"
            )
        self._scheduler_arg = settings["scheduler"]
        if self._scheduler_arg is not None:
            _scheduler_class(self._scheduler_arg)  # unknown names fail before the model loads

        self.prompt = prompt if prompt is not None else cfg.get("prompt")
        if self.prompt is None:
            raise ValueError(f"{self.model_ref}: pass prompt= (there is no adapter whose synthaug.json gives one)")
        self.negative_prompt = negative_prompt if negative_prompt is not None else cfg.get("negative_prompt")
        label_arg = label
        label = label if label is not None else cfg.get("label")
        if label is None:
            raise ValueError(f"{self.model_ref}: pass label= (the class index these images get in your classifier's label space)")
        self.label = int(label)
        self.label_name = cfg.get("class_name")
        self.label_names = list(cfg["label_names"]) if cfg.get("label_names") else None
        source_items, self._source_classes = source_images, []
        if mode == "translate":  # checked before the pipeline loads; decoded once its size is known
            source_items, self._source_classes = translate_sources(source_images, source_classes, label=self.label, label_names=self.label_names)
        # The label space's channels: "target_channels" (the real images'), else "channels".
        target_channels = cfg.get("target_channels", cfg.get("channels"))
        self.grayscale = bool(grayscale) if grayscale is not None else target_channels == 1
        self.output_size = _size_pair(output_size if output_size is not None else cfg.get("output_size"), "output_size")
        gen_cfg = cfg.get("generation") or {}
        if gen_cfg.get("height") and gen_cfg.get("width"):
            res = (int(gen_cfg["height"]), int(gen_cfg["width"]))
        else:
            res = _size_pair(cfg.get("resolution"), "the adapter's resolution")
        self.batch_size = int(batch_size) if batch_size is not None else (_GPU_BATCH if on_cuda else 1)
        self.mode = mode
        self.strength = self.strengths[0] if len(self.strengths) == 1 else self.strengths
        self.soft_label_gamma = float(soft_label_gamma) if soft_label_gamma is not None else None

        # ---- the pipeline: loaded here, or shared with other generators (one per LoRA adapter)
        self.shared = pipeline is not None
        if pipeline is None:
            adapters = {"synthaug": self.adapter} if self.adapter is not None else {}
            pipe = load_pipeline(self.model_ref, adapters=adapters, fuse=True, dtype=self.dtype, device=self.device, tiny_vae=tiny_vae,
                                 attention=attention, channels_last=channels_last, compile=compile, needed_by=self.adapter)
        else:
            pipe = pipeline
        self.tiny_vae = str(tiny_vae) if tiny_vae is not None else None
        self.vae_scale_factor = int(getattr(pipe, "vae_scale_factor", 8))
        native = int(pipe.unet.config.sample_size) * self.vae_scale_factor
        self.height = int(height if height is not None else (res[0] if res else native))
        self.width = int(width if width is not None else (res[1] if res else native))
        for name, v in (("height", self.height), ("width", self.width)):
            if v < 8 or v % 8:
                raise ValueError(f"{name} must be a positive multiple of 8 (the pipelines' constraint), got {v}")

        self.attention = getattr(pipe, "_synthaug_attention", attention)
        self.channels_last = bool(channels_last) if channels_last is not None else on_cuda
        # A shared pipeline serves generators with different schedulers: each keeps its own and
        # puts it on the pipeline before each call (_sample)
        scheduler_obj = pipe.scheduler if not self.shared else type(pipe.scheduler).from_config(pipe.scheduler.config)
        if self._scheduler_arg is not None:
            cls, kwargs = _scheduler_class(self._scheduler_arg)
            scheduler_obj = cls.from_config(pipe.scheduler.config, **kwargs)
        if not self.shared:
            pipe.scheduler = scheduler_obj
        self._scheduler = scheduler_obj
        self.scheduler_name = str(self._scheduler_arg or type(scheduler_obj).__name__)
        self._compile = compile
        self.pipe = pipe
        self._img2img = None
        self._sources: List[Any] = []
        self._source_hashes: List[str] = []
        if mode in ("img2img", "translate"):
            self._sources, self._source_hashes = self._load_sources(source_items)

        self._overrides = {
            k: v
            for k, v in dict(
                prompt=prompt,
                negative_prompt=negative_prompt,
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                scheduler=scheduler,
                label=label_arg,
                batch_size=batch_size,
                device=device,
                dtype=str(dtype).replace("torch.", "") if dtype is not None else None,
                mode=mode if mode != "txt2img" else None,
                **mode_overrides(mode, strength, source_classes, soft_label_gamma),
                compile=compile or None,
                channels_last=channels_last,
                attention=attention if attention != "auto" else None,
                grayscale=grayscale,
                output_size=list(self.output_size) if output_size is not None else None,
                tiny_vae=self.tiny_vae,
            ).items()
            if v is not None
        }
        if mode in ("img2img", "translate"):
            self._overrides["source_images"] = _spec_sources(source_images)

    # ------------------------------------------------------------------ loading helpers
    def _load_sources(self, source_images) -> Tuple[List[Any], List[str]]:
        """img2img sources as RGB PIL images of the generation size, and their pixel hashes."""
        from PIL import Image

        if isinstance(source_images, (str, os.PathLike)):
            arrays = load_image_folder(source_images).images
        else:
            arrays = []
            for im in source_images:
                if isinstance(im, (str, os.PathLike)):
                    if not Path(im).is_file():
                        raise FileNotFoundError(f"img2img source image {im} does not exist")
                    im = read_image(im)
                arrays.append(to_hwc_uint8(im))
        if not arrays:
            raise ValueError("source_images holds no images")
        pils, hashes = [], []
        for arr in arrays:
            hashes.append(image_sha256(arr))
            pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).convert("RGB")
            if pil.size != (self.width, self.height):
                pil = pil.resize((self.width, self.height), Image.BICUBIC)
            pils.append(pil)
        return pils, hashes

    # ------------------------------------------------------------------ contract
    @property
    def spec(self) -> Dict[str, Any]:
        source = str(self.adapter) if self.adapter is not None else self.model_ref
        return {"source": source, "overrides": dict(self._overrides), "backend": "stable-diffusion"}

    def generate(self, n: int, seed: int) -> GeneratedBatch:
        """``n`` images; image ``i`` from per-image seed ``seed + i``.

        Returns:
            :class:`GeneratedBatch` with uint8 images N×H×W×C (C = 3, or 1 with ``grayscale``;
            H×W = ``output_size`` or the generation size), ``n`` labels and ``n`` meta dicts.
        """
        import diffusers
        import torch

        seeds = per_image_seeds(n, seed)
        chunks: List[np.ndarray] = []
        metas: List[Dict[str, Any]] = []
        spec = self.spec
        base_meta = {
            "source": spec["source"],
            "overrides": spec["overrides"],
            "backend": "stable-diffusion",
            "model": self.model_ref,
            "adapter": str(self.adapter) if self.adapter is not None else None,
            "adapter_hash": self.adapter_config.get("adapter_hash"),
            "mode": self.mode,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "label": self.label,
            "label_name": self.label_name,
            "scheduler": self.scheduler_name,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "generation_resolution": [self.height, self.width],
            "device": self.device,
            "dtype": str(self.dtype).replace("torch.", ""),
            "torch_version": torch.__version__,
            "diffusers_version": diffusers.__version__,
        }
        labels: List[Any] = []
        with_strength = self.mode in ("img2img", "translate")
        for start in range(0, n, self.batch_size):
            chunk = seeds[start : start + self.batch_size]
            # one pipeline call per strength among the chunk's images (one call without strengths)
            parts = [(positions, self._sample([chunk[p] for p in positions], strength))
                     for strength, positions in strength_groups(chunk, self.strengths if with_strength else None)]
            images = np.empty((len(chunk),) + parts[0][1].shape[1:], np.uint8)
            for positions, part in parts:
                images[positions] = part
            chunks.append(images)
            for s in chunk:
                m = dict(base_meta, seed=s, batch=[chunk[0], len(chunk)], resolution=list(images.shape[1:3]))
                label: Any = self.label
                if with_strength:
                    keys, label = source_provenance(s, mode=self.mode, label=self.label, strengths=self.strengths, source_hashes=self._source_hashes,
                                                    source_classes=self._source_classes, label_names=self.label_names,
                                                    soft_label_gamma=self.soft_label_gamma)
                    m.update(keys)
                metas.append(m)
                labels.append(label)
        if chunks:
            images = np.concatenate(chunks)
        else:
            h, w = self.output_size or (self.height, self.width)
            images = np.zeros((0, h, w, 1 if self.grayscale else 3), np.uint8)
        return GeneratedBatch(images=images, labels=labels, meta=metas)

    def _sample(self, seeds: List[int], strength: Optional[float] = None) -> np.ndarray:
        """uint8 N×H×W×C images for the per-image ``seeds`` (one pipeline call; all of one
        ``strength`` in img2img and translate mode)."""
        import torch

        m = len(seeds)
        kwargs: Dict[str, Any] = dict(
            prompt=[self.prompt] * m,
            negative_prompt=[self.negative_prompt] * m if self.negative_prompt else None,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="np",
        )
        if self.mode in ("img2img", "translate"):
            if self._img2img is None:
                from diffusers import AutoPipelineForImage2Image

                self._img2img = AutoPipelineForImage2Image.from_pipe(self.pipe)
                self._img2img.set_progress_bar_config(disable=True)
            pipe = self._img2img
            kwargs.update(image=[self._sources[s % len(self._sources)] for s in seeds], strength=strength)
        else:
            pipe = self.pipe
            kwargs.update(height=self.height, width=self.width)
        if self.shared:  # the pipeline's scheduler is this generator's while it samples
            pipe.scheduler = self._scheduler
        with torch.inference_mode():
            out = pipe(**kwargs).images  # float32 N×H×W×3 in [0, 1]
        images = (np.clip(out, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        if self.output_size is not None and tuple(images.shape[1:3]) != self.output_size:
            from PIL import Image

            h, w = self.output_size
            images = np.stack([np.asarray(Image.fromarray(im).resize((w, h), Image.LANCZOS)) for im in images])
        if self.grayscale:
            luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            images = np.clip(luma.round(), 0, 255).astype(np.uint8)[..., None]
        return images

    def close(self) -> None:
        """Drop the pipeline and free its (GPU) memory."""
        self.pipe = None
        self._img2img = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # pragma: no cover
            pass

    def __repr__(self) -> str:
        src = f"adapter={str(self.adapter)!r}, " if self.adapter is not None else ""
        return f"StableDiffusionGenerator({self.model_ref!r}, {src}mode={self.mode!r}, {self.height}x{self.width}, device={self.device!r})"


def load_pipeline(
    model_ref: str,
    *,
    adapters: Dict[str, Union[str, os.PathLike]],
    fuse: bool,
    dtype,
    device: str,
    tiny_vae: Optional[Union[str, os.PathLike]] = None,
    attention: str = "auto",
    channels_last: Optional[bool] = None,
    compile: Union[bool, str] = False,
    needed_by: Optional[Path] = None,
):
    """Load the diffusers text-to-image pipeline ``model_ref`` on ``device`` with the speed
    settings of :class:`StableDiffusionGenerator`, and its LoRA ``adapters``.

    Args:
        adapters: ``{adapter name: synthaug adapter folder}``, each loaded with diffusers'
            ``load_lora_weights(..., adapter_name=name)``.
        fuse: fold the (one) adapter into the weights and drop its LoRA layers: no per-step
            overhead. ``False`` keeps every adapter's LoRA layers, unmerged, for
            :class:`~synthaug.generation.multi.AdapterSwitch` to choose among.
        needed_by: the adapter that names ``model_ref`` (for error messages).

    Returns:
        The pipeline; ``pipe._synthaug_attention`` records the attention implementation chosen.
    """
    import torch
    from diffusers import AutoPipelineForText2Image

    if fuse and len(adapters) > 1:
        raise ValueError("fuse=True folds one adapter into the weights; several adapters are loaded unfused")
    on_cuda = str(device).startswith("cuda")
    index, local_only = resolve_pipeline_source(model_ref, adapter=needed_by)
    extra: Dict[str, Any] = {}
    if "safety_checker" in index:
        extra.update(safety_checker=None, requires_safety_checker=False)
    extra.update(dtype_kwargs(dtype))
    with _quiet_loading():
        try:
            pipe = AutoPipelineForText2Image.from_pretrained(model_ref, local_files_only=local_only, **extra)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"could not load the diffusers pipeline {model_ref}: {exc}") from exc
        pipe.set_progress_bar_config(disable=True)
        with warnings.catch_warnings():  # peft warns that a second adapter makes several: that is the point
            warnings.filterwarnings("ignore", message=".*multiple adapters in the model.*")
            for name, folder in adapters.items():
                _load_lora(pipe, name, Path(folder), model_ref)
        if fuse and adapters:
            # Fold the LoRA into the weights: no per-step overhead, and torch.compile sees plain layers.
            pipe.fuse_lora(lora_scale=1.0)
            pipe.unload_lora_weights()
    if tiny_vae is not None:
        from diffusers import AutoencoderTiny

        try:
            pipe.vae = AutoencoderTiny.from_pretrained(str(tiny_vae), **dtype_kwargs(dtype))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"could not load the tiny VAE {tiny_vae}: {exc}") from exc
    pipe = pipe.to(device)
    pipe._synthaug_attention = _set_attention(pipe, attention, on_cuda)
    if bool(channels_last) if channels_last is not None else on_cuda:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if compile:
        pipe.unet = torch.compile(pipe.unet, mode=None if compile is True else str(compile))
    return pipe


def _load_lora(pipe, name: str, adapter: Path, model_ref: str) -> None:
    """Load a synthaug adapter's LoRA into ``pipe`` as adapter ``name`` (unfused)."""
    weights = read_adapter_config(adapter)["weights"]
    try:
        with _quiet_text_encoder_notice():
            pipe.load_lora_weights(str(adapter), weight_name=weights, adapter_name=name)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise ValueError(f"adapter {adapter} ({weights}) could not be loaded into {model_ref}: {exc}") from exc


def _set_attention(pipe, attention: str, on_cuda: bool) -> str:
    """Apply ``attention`` (one of :data:`ATTENTION`) to the pipeline's UNet and VAE; returns the one chosen."""
    import importlib.util

    if attention == "auto":
        attention = "xformers" if on_cuda and importlib.util.find_spec("xformers") is not None else "sdpa"
    if attention == "xformers":
        if not on_cuda:
            raise ValueError("attention='xformers' needs a CUDA device; use 'sdpa' (the default) on CPU")
        try:
            pipe.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError) as exc:
            raise ValueError(f"attention='xformers' is not available ({exc}); install xformers or use 'sdpa'") from exc
    elif attention == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())
        if hasattr(pipe.vae, "set_attn_processor"):  # a tiny VAE has no attention
            pipe.vae.set_attn_processor(AttnProcessor2_0())
    else:  # eager
        from diffusers.models.attention_processor import AttnProcessor

        pipe.unet.set_attn_processor(AttnProcessor())
        if hasattr(pipe.vae, "set_attn_processor"):
            pipe.vae.set_attn_processor(AttnProcessor())
    return attention


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """No loading progress bars from diffusers/transformers (ours are around the real work)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    d_on, t_on = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if d_on:
            dlog.enable_progress_bar()
        if t_on:
            tlog.enable_progress_bar()


def _scheduler_class(name: str):
    """(diffusers scheduler class, extra config) for a name of :data:`SCHEDULERS` or a class name."""
    import diffusers

    key = str(name)
    if key.lower() in SCHEDULERS:
        cls_name, kwargs = SCHEDULERS[key.lower()]
        return getattr(diffusers, cls_name), dict(kwargs)
    if key.endswith("Scheduler") and isinstance(getattr(diffusers, key, None), type):
        return getattr(diffusers, key), {}
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)} or a diffusers scheduler class name")


class _DropTextEncoderNotice:
    """A logging filter dropping diffusers' "No LoRA keys associated to CLIPTextModel found" notice:
    synthaug's adapters train the UNet only, so the notice is true of every adapter, printed on
    every load, and nothing a user can act on."""

    def filter(self, record) -> bool:
        message = record.getMessage()
        return not (message.startswith("No LoRA keys associated to") and "text_encoder" in message)


@contextmanager
def _quiet_text_encoder_notice():
    import logging

    loggers = [logging.getLogger(name) for name in ("diffusers.loaders.lora_base", "diffusers.loaders.peft")]
    drop = _DropTextEncoderNotice()
    for lg in loggers:
        lg.addFilter(drop)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(drop)


def _spec_sources(source_images) -> Optional[Union[str, List[str]]]:
    """``source_images`` as the spec can carry them (paths), or ``None`` for in-memory images."""
    if isinstance(source_images, (str, os.PathLike)):
        return str(Path(source_images).resolve())
    if isinstance(source_images, (list, tuple)) and all(isinstance(p, (str, os.PathLike)) for p in source_images):
        return [str(Path(p).resolve()) for p in source_images]
    return None  # in-memory images: this spec cannot re-create the generator elsewhere
