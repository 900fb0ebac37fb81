"""LoRA fine-tuning of a class-conditional pixel DDPM (the embedded default's backend).

The class to learn is conditioned through the model's class embedding. By default the
embedding table is trained too (peft ``modules_to_save``): the rare class's slot, which the base
model never trained, learns its own embedding the way textual inversion learns a new token, while
LoRA adapts the UNet's convolutions and attention. The adapter file holds the peft state dict with
``unet.``-prefixed keys (diffusers' convention); ``load_generator(out)`` loads it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from synthaug.adapter import ADAPTER_WEIGHTS, file_sha256, write_adapter_config
from synthaug.finetune.common import (
    CheckpointManager,
    FinetuneConfig,
    TrainingImages,
    to_gray,
    named_class,
    user_label_space,
    FINAL_LOSS_WINDOW,
    final_loss,
    noise_prediction_loss,
    peak_rss_mb,
    save_loss_curve,
    step_generator,
    write_training_log,
)
from synthaug.generation.base import default_device
from synthaug.generation.ddpm import extend_class_embedding, make_scheduler, model_generation_settings, sample_pixel_ddpm
from synthaug.generation.sources import ModelSource
from synthaug.imaging import save_image_grid

__all__ = ["ClassChoice", "finetune_pixel_ddpm", "resolve_class", "PIXEL_TARGET_MODULES"]

PIXEL_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
_DEFAULT_LR = 1e-3
_DEFAULT_BATCH = 16


def _canvas(images: List[np.ndarray], size: int, crop) -> "torch.Tensor":
    """float N×1×size×size in [-1, 1]: each image resized to the crop and placed on background -1."""
    import torch
    from PIL import Image

    top, left, h, w = crop
    out = torch.full((len(images), 1, size, size), -1.0)
    for i, im in enumerate(images):
        g = to_gray(im)
        if g.shape != (h, w):
            g = np.asarray(Image.fromarray(g).resize((w, h), Image.BILINEAR))
        out[i, 0, top : top + h, left : left + w] = torch.from_numpy(g.astype(np.float32) / 127.5 - 1.0)
    return out


def generation_defaults(model_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The generation settings an adapter of this model records: sampler, steps and guidance as
    the generator would use them for the bare model."""

    settings = model_generation_settings(model_cfg)
    return {k: settings[k] for k in ("num_inference_steps", "guidance_scale", "scheduler")}


def _validation_grid(unet, model_dir: Path, label: int, null_class: int, size: int, crop, real: List[np.ndarray], steps: int, path: Path,
                     generation: Dict[str, Any]) -> None:

    was_training = unet.training
    unet.eval()
    # the sampler, guidance and spacing the generator will use (only the step count may differ)
    sched = make_scheduler(model_dir, generation["scheduler"])
    fake = sample_pixel_ddpm(unet, sched, seeds=list(range(16)), label=label, null_class=null_class, num_inference_steps=steps,
                             guidance_scale=float(generation["guidance_scale"]), image_size=size, crop=crop)
    if was_training:
        unet.train()
    from PIL import Image

    h, w = crop[2], crop[3]
    row = [np.asarray(Image.fromarray(to_gray(r)).resize((w, h), Image.BILINEAR))[:, :, None] for r in real[:8]]
    save_image_grid(row + list(fake), path, cols=8)


@dataclass
class ClassChoice:
    """What a pixel-DDPM LoRA learns and how its records are labelled.

    Attributes:
        slot: the base model's conditioning class the LoRA trains (``class_labels`` of the UNet).
        slot_name: the base model's name of that slot (``None`` for a slot it never had).
        label, class_name: the records' label and class name, in your classifier's label space.
        label_names: your label space's names (``None``: the base model's classes are it).
        extend: the slot is new, one past the null class (the base model has no free slot).
    """

    slot: int
    slot_name: Optional[str]
    label: int
    class_name: str
    label_names: Optional[List[str]]
    extend: bool = False


def _free_slots(model_cfg: Dict[str, Any], n_classes: int) -> List[int]:
    """Class slots the base model never trained (known from ``trained_classes``), the model's
    rare class first."""
    trained = model_cfg.get("trained_classes")
    if trained is None:
        return []
    free = [i for i in range(n_classes) if i not in set(int(t) for t in trained)]
    rare = model_cfg.get("rare_class_index")
    return sorted(free, key=lambda i: (i != rare, i))


def resolve_class(source, cfg) -> ClassChoice:
    """The class the LoRA learns and the label its records get; checked before anything is written.

    * ``--class-name`` a class of the base model: the LoRA trains that class's slot; the records'
      label is the model's index unless ``--label`` or ``--classes`` put it elsewhere.
    * ``--class-name`` the model lacks (your own class): the LoRA trains a slot the model never
      trained (the built-in model's Shirt slot, held out of its pretraining), or, when the model
      trained all its slots, a new slot added after the null class and started from the null
      embedding (the null-adjacent slot); records carry your name and ``--label`` (default: its
      index in ``--classes``, else 0), provenance the slot.
    * neither: the model's rare class (``--label`` alone must name that class's index).

    Raises:
        ValueError: a prompt for this text-free model, a ``--label``/``--classes`` conflict, or
            ``--label`` without ``--class-name`` that is not the model's rare class.
    """
    model_cfg = json.loads((Path(source.path) / "synthaug_model.json").read_text())
    classes: List[str] = list(model_cfg.get("classes") or [])
    if cfg.prompt or cfg.negative_prompt:
        raise ValueError(f"{source.ref} is a class-conditional pixel model without text input; use --class-name (and --label), not --prompt")
    if not cfg.train_class_embedding and (cfg.class_name is not None and cfg.class_name not in classes):
        raise ValueError(f"--class-name {cfg.class_name!r} is not a class of {source.ref}, so its conditioning slot must learn an "
                         "embedding; drop --no-train-class-embedding")
    name, label = named_class(cfg), cfg.label
    if name is None:
        rare = model_cfg.get("rare_class_index")
        if rare is None:
            raise ValueError(f"pass --class-name NAME: which class should the LoRA learn on {source.ref}?")
        rare = int(rare)
        if label is not None and label != rare:
            raise ValueError(
                f"--label {label} without --class-name: name your class with --class-name NAME (the LoRA then learns a free slot "
                f"of {source.ref} and your records carry NAME and label {label})"
            )
        name = classes[rare]
        return ClassChoice(slot=rare, slot_name=name, label=rare, class_name=name, label_names=None)
    if name in classes:
        slot = classes.index(name)
        if (label is None or label == slot) and (not cfg.label_names or list(cfg.label_names) == classes):
            return ClassChoice(slot=slot, slot_name=name, label=slot, class_name=name, label_names=None)
        label, names = user_label_space(name, label, cfg.label_names)
        return ClassChoice(slot=slot, slot_name=name, label=label, class_name=name, label_names=names)
    label, names = user_label_space(name, label, cfg.label_names)
    free = _free_slots(model_cfg, len(classes))
    if free:
        return ClassChoice(slot=free[0], slot_name=classes[free[0]], label=label, class_name=name, label_names=names)
    unet_cfg = json.loads((Path(source.path) / "unet" / "config.json").read_text())
    return ClassChoice(slot=int(unet_cfg.get("num_class_embeds") or len(classes) + 1), slot_name=None, label=label, class_name=name,
                       label_names=names, extend=True)


def finetune_pixel_ddpm(source: ModelSource, train: TrainingImages, out: Path, cfg: FinetuneConfig, *, resume: bool, progress: bool = True) -> Path:
    """Train the LoRA; write the adapter folder ``out``; return it."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import save_file
    from synthaug.progress import progress_bar


    model_dir = Path(source.path)
    model_cfg = json.loads((model_dir / "synthaug_model.json").read_text())
    classes: List[str] = list(model_cfg.get("classes") or [])
    null_class = int(model_cfg.get("null_class", len(classes)))
    size = int(model_cfg.get("image_size", 32))
    crop = model_cfg.get("crop") or [0, 0, size, size]
    choice = resolve_class(source, cfg)
    label, class_name = choice.label, choice.class_name
    if cfg.resolution not in (None, crop[2]):
        raise ValueError(f"{source.ref} works at {crop[2]}×{crop[3]} pixels; --resolution {cfg.resolution} is not possible")
    if cfg.mixed_precision != "no":
        raise ValueError("--mixed-precision applies to Stable-Diffusion models on CUDA; the pixel DDPM trains in fp32")

    x_all = _canvas(train.images, size, crop)
    device = default_device(cfg.device)
    lr = cfg.lr or _DEFAULT_LR
    batch_size = cfg.batch_size or _DEFAULT_BATCH
    alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
    targets = list(cfg.target_modules or PIXEL_TARGET_MODULES)
    peft_config = {"r": cfg.rank, "lora_alpha": alpha, "target_modules": targets, "init_lora_weights": True}
    if cfg.train_class_embedding:
        peft_config["modules_to_save"] = ["class_embedding"]

    unet = UNet2DModel.from_pretrained(model_dir, subfolder="unet")
    if choice.extend:
        extend_class_embedding(unet, choice.slot + 1, null_class)
    class_embeds = int(unet.class_embedding.weight.shape[0])
    unet.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    try:
        inject_adapter_in_model(LoraConfig(**peft_config), unet)
    except ValueError as exc:
        raise ValueError(f"--target-modules {targets} do not fit {source.ref}: {exc}") from None
    unet.to(device).train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    noise_sched = DDPMScheduler.from_pretrained(model_dir / "scheduler")
    n_train_t = noise_sched.config.num_train_timesteps

    ckpts = CheckpointManager(out)
    step, losses, elapsed_before = 0, [], 0.0
    if resume:
        latest = ckpts.latest()
        weights, state = ckpts.load(latest)
        if state.get("train_images") != train.records or state.get("peft_config") != peft_config or state.get("label") != label \
                or state.get("slot", label) != choice.slot:
            raise ValueError(f"cannot resume {out}: its checkpoint was made with other images, LoRA settings or class")
        set_peft_model_state_dict(unet, weights)
        opt.load_state_dict(state["optimizer"])
        step, losses, elapsed_before = state["step"], state["losses"], state.get("elapsed_s", 0.0)
        if step >= cfg.steps:
            raise ValueError(f"{out} already trained {step} steps; pass a larger --steps to continue")
    validation_every = cfg.validation_every or max(1, cfg.steps // 4)
    checkpoint_every = cfg.checkpoint_every or validation_every
    generation = generation_defaults(model_cfg)
    val_steps = cfg.validation_steps or int(generation["num_inference_steps"])
    (out / "validation").mkdir(exist_ok=True)

    t0 = time.time()
    labels = torch.full((batch_size,), choice.slot, dtype=torch.long, device=device)
    bar = progress_bar(total=cfg.steps, initial=step, desc=f"LoRA {class_name}", unit="step", disable=not progress, dynamic_ncols=True)
    while step < cfg.steps:
        g = step_generator(cfg.seed, step)
        idx = torch.randint(0, len(x_all), (batch_size,), generator=g)
        x = x_all[idx]
        flip = torch.rand(batch_size, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        noise = torch.randn(x.shape, generator=g)
        t = torch.randint(0, n_train_t, (batch_size,), generator=g)
        noisy = noise_sched.add_noise(x, noise, t)
        pred = unet(noisy.to(device), t.to(device), class_labels=labels).sample
        loss = noise_prediction_loss(pred, noise.to(device), t, noise_sched, cfg.snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        step += 1
        losses.append((step, float(loss.item())))
        bar.update(1)
        bar.set_postfix(loss=f"{final_loss(losses):.4f}")
        if step % validation_every == 0 or step == cfg.steps:
            _validation_grid(unet, model_dir, choice.slot, null_class, size, crop, train.images, val_steps, out / "validation" / f"step-{step:06d}.png", generation)
        if step % checkpoint_every == 0 or step == cfg.steps:
            ckpts.save(
                step,
                get_peft_model_state_dict(unet),
                {
                    "step": step,
                    "optimizer": opt.state_dict(),
                    "losses": losses,
                    "train_images": train.records,
                    "peft_config": peft_config,
                    "label": label,
                    "slot": choice.slot,
                    "elapsed_s": elapsed_before + time.time() - t0,
                },
            )
    bar.close()
    wall = elapsed_before + time.time() - t0

    weights = {"unet." + k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(unet).items()}
    save_file(weights, str(out / ADAPTER_WEIGHTS))
    final_grid = out / "validation" / f"step-{cfg.steps:06d}.png"
    if final_grid.exists():
        (out / "validation.png").write_bytes(final_grid.read_bytes())
    save_loss_curve(losses, out / "loss.png", f"LoRA r={cfg.rank} on {len(train.images)} '{class_name}' images, {source.ref}")
    write_training_log(out, losses)
    write_adapter_config(
        out,
        {
            "backend": "pixel-ddpm",
            "base_model": source.ref,
            "weights": ADAPTER_WEIGHTS,
            "adapter_hash": file_sha256(out / ADAPTER_WEIGHTS),
            "prompt": None,
            "negative_prompt": None,
            "label": label,
            "class_name": class_name,
            "label_names": choice.label_names,
            # the base model's conditioning slot the LoRA trained (provenance; the generator
            # conditions on it) and the model's name for it (None: a slot added by this adapter)
            "model_class": choice.slot,
            "model_class_name": choice.slot_name,
            "class_embeds": class_embeds,
            "resolution": crop[2],
            "channels": 1,
            "lora": {
                "rank": cfg.rank,
                "alpha": alpha,
                "target_modules": targets,
                "modules_to_save": peft_config.get("modules_to_save", []),
                "peft_config": peft_config,
            },
            "training": {
                **cfg.to_dict(),
                "lr": lr,
                "batch_size": batch_size,
                "final_loss": final_loss(losses),
                "final_loss_window": FINAL_LOSS_WINDOW,
                "wall_time_s": round(wall, 1),
                "peak_rss_mb": peak_rss_mb(),
                "device": device,
            },
            "train_images": train.records,
            "skipped_files": train.skipped,
            "generation": generation,
        },
    )
    return out
