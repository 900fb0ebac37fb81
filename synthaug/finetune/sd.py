"""LoRA fine-tuning of a Stable-Diffusion-family model (SD 1.x/2.x, SDXL) on a few images.

The recipe of diffusers' ``train_text_to_image_lora.py``, for a handful of images and one prompt:
peft ``LoraConfig`` on the UNet's attention projections (only LoRA parameters train), AdamW, the
noise-prediction loss (epsilon or v-prediction as the scheduler says; min-SNR weighting optional),
random horizontal flip, resize + center crop to ``resolution``, gray images replicated to RGB.
VAE latent distributions of every image and its mirror are computed once; each step samples from
them. The prompt is encoded once with the pipeline's own ``encode_prompt``. The weights are saved
with the pipeline's ``save_lora_weights``, in diffusers' LoRA format, so
``StableDiffusionPipeline.from_pretrained(base).load_lora_weights(out)`` works.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from synthaug.adapter import ADAPTER_WEIGHTS, file_sha256, write_adapter_config
from synthaug.finetune.common import (
    CheckpointManager,
    FinetuneConfig,
    TrainingImages,
    FINAL_LOSS_WINDOW,
    final_loss,
    named_class,
    user_label_space,
    noise_prediction_loss,
    peak_rss_mb,
    save_loss_curve,
    step_generator,
    write_training_log,
)
from synthaug.generation.base import default_device, dtype_kwargs
from synthaug.generation.sources import ModelSource
from synthaug.imaging import save_image_grid

__all__ = ["finetune_stable_diffusion", "SD_TARGET_MODULES", "load_sd_pipeline"]

SD_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
_DEFAULT_LR = 1e-4


def load_sd_pipeline(source: ModelSource, torch_dtype):
    """``AutoPipelineForText2Image.from_pretrained`` with errors that say what to do offline."""
    from diffusers import AutoPipelineForText2Image


    try:
        return AutoPipelineForText2Image.from_pretrained(source.path, safety_checker=None, **dtype_kwargs(torch_dtype))
    except (OSError, ValueError) as exc:
        if isinstance(source.path, str):
            raise FileNotFoundError(
                f"could not load {source.ref!r} from the Hugging Face hub or its local cache ({type(exc).__name__}); "
                "download it first (huggingface-cli download) or pass a local pipeline folder"
            ) from None
        raise ValueError(f"{source.path} could not be loaded as a diffusers pipeline: {exc}") from None


def _prepare_images(images: List[np.ndarray], resolution: int):
    """float N×3×R×R in [-1, 1]: shorter side resized to R (bilinear), center-cropped."""
    import torch
    from PIL import Image

    out = []
    for im in images:
        pil = Image.fromarray(im[:, :, 0] if im.shape[2] == 1 else im).convert("RGB")
        w, h = pil.size
        scale = resolution / min(w, h)
        pil = pil.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BILINEAR)
        w, h = pil.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        pil = pil.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(pil).astype(np.float32) / 127.5 - 1.0
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(out)


def check_settings(source, cfg) -> None:
    """Refuse settings that would make an unusable adapter, before anything is written.

    Raises:
        ValueError: no prompt, no class (``--class-name`` or ``--label``: the images need a
            class in the classifier's label space), or a ``--label``/``--classes`` conflict.
    """
    if not cfg.prompt:
        raise ValueError(f"{source.ref} is a text-conditioned model: pass --prompt (e.g. 'a photo of sks {cfg.class_name or 'object'}')")
    resolve_sd_class(source, cfg)


def resolve_sd_class(source, cfg):
    """``(label, class_name, label_names)`` of a Stable-Diffusion adapter's records: your class's
    name and label as :func:`~synthaug.finetune.common.user_label_space` resolves them."""
    name = named_class(cfg)
    if name is None:
        if cfg.label is None:
            raise ValueError(
                f"{source.ref} is a text-conditioned model: pass --class-name NAME (and --label N, the class index its images "
                "get in your classifier's label space, if your loader does not map classes by name)"
            )
        return int(cfg.label), None, None
    label, names = user_label_space(str(name), cfg.label, cfg.label_names)
    return label, name, names


def finetune_stable_diffusion(source: ModelSource, train: TrainingImages, out: Path, cfg: FinetuneConfig, *, resume: bool, progress: bool = True) -> Path:
    """Train the LoRA; write the adapter folder ``out``; return it."""
    import torch
    from diffusers import DDPMScheduler
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from synthaug.progress import progress_bar


    check_settings(source, cfg)
    label, class_name, label_names = resolve_sd_class(source, cfg)
    device = default_device(cfg.device)
    if cfg.mixed_precision != "no" and not device.startswith("cuda"):
        raise ValueError(f"--mixed-precision {cfg.mixed_precision} needs a CUDA device; on {device} use --mixed-precision no")
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]

    pipe = load_sd_pipeline(source, weight_dtype)
    pipe.set_progress_bar_config(disable=True)
    unet, vae = pipe.unet, pipe.vae
    is_sdxl = getattr(pipe, "text_encoder_2", None) is not None
    resolution = cfg.resolution or int(unet.config.sample_size * pipe.vae_scale_factor)
    lr = cfg.lr or _DEFAULT_LR
    batch_size = cfg.batch_size or 1
    alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
    targets = list(cfg.target_modules or SD_TARGET_MODULES)
    peft_config = {"r": cfg.rank, "lora_alpha": alpha, "target_modules": targets, "init_lora_weights": "gaussian"}

    pipe.to(device)
    for module in (vae, unet, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False)
    with torch.no_grad():
        pixels = _prepare_images(train.images, resolution).to(device, dtype=vae.dtype)
        both = torch.cat([pixels, pixels.flip(-1)])
        dist = vae.encode(both).latent_dist
        lat_mean, lat_std = dist.mean.float().cpu(), dist.std.float().cpu()
        if is_sdxl:
            embeds, _, pooled, _ = pipe.encode_prompt(cfg.prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
            proj_dim = pipe.text_encoder_2.config.projection_dim
            time_ids = pipe._get_add_time_ids((resolution, resolution), (0, 0), (resolution, resolution), dtype=embeds.dtype, text_encoder_projection_dim=proj_dim).to(device)
        else:
            embeds, _ = pipe.encode_prompt(cfg.prompt, device, 1, False)
    scaling = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0

    torch.manual_seed(cfg.seed)
    try:
        unet.add_adapter(LoraConfig(**peft_config))
    except ValueError as exc:
        raise ValueError(f"--target-modules {targets} do not fit {source.ref}: {exc}") from None
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # LoRA weights train in fp32 even when the frozen model is half precision
        p.data = p.data.float()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    n_train_t = noise_sched.config.num_train_timesteps

    ckpts = CheckpointManager(out)
    step, losses, elapsed_before = 0, [], 0.0
    if resume:
        weights, state = ckpts.load(ckpts.latest())
        if state.get("train_images") != train.records or state.get("peft_config") != peft_config or state.get("prompt") != cfg.prompt:
            raise ValueError(f"cannot resume {out}: its checkpoint was made with other images, prompt or LoRA settings")
        set_peft_model_state_dict(unet, weights)
        opt.load_state_dict(state["optimizer"])
        step, losses, elapsed_before = state["step"], state["losses"], state.get("elapsed_s", 0.0)
        if step >= cfg.steps:
            raise ValueError(f"{out} already trained {step} steps; pass a larger --steps to continue")
    validation_every = cfg.validation_every or max(1, cfg.steps // 4)
    checkpoint_every = cfg.checkpoint_every or validation_every
    val_steps = cfg.validation_steps or 25
    (out / "validation").mkdir(exist_ok=True)
    autocast = torch.autocast("cuda", dtype=weight_dtype) if weight_dtype != torch.float32 else _null_ctx()

    def validate(path: Path) -> None:
        unet.eval()
        gens = [torch.Generator().manual_seed(s) for s in range(4)]
        with torch.no_grad(), autocast:
            imgs = pipe([cfg.prompt] * 4, negative_prompt=[cfg.negative_prompt] * 4 if cfg.negative_prompt else None, num_inference_steps=val_steps, height=resolution, width=resolution, generator=gens, output_type="np").images
        unet.train()
        fake = [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in imgs]
        real = [np.asarray(_to_rgb(im, resolution)) for im in train.images[:4]]
        save_image_grid(real + fake, path, cols=4)

    t0 = time.time()
    unet.train()
    bar = progress_bar(total=cfg.steps, initial=step, desc="LoRA", unit="step", disable=not progress, dynamic_ncols=True)
    while step < cfg.steps:
        g = step_generator(cfg.seed, step)
        idx = torch.randint(0, len(train.images), (batch_size,), generator=g)
        flip = (torch.rand(batch_size, generator=g) < 0.5).long()
        k = idx + flip * len(train.images)
        latents = lat_mean[k] + lat_std[k] * torch.randn(lat_mean[k].shape, generator=g)
        latents = (latents - shift) * scaling
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, n_train_t, (batch_size,), generator=g)
        noisy = noise_sched.add_noise(latents, noise, t).to(device, weight_dtype)
        if noise_sched.config.prediction_type == "v_prediction":
            target = noise_sched.get_velocity(latents, noise, t)
        else:
            target = noise
        kwargs: Dict[str, Any] = {"encoder_hidden_states": embeds.expand(batch_size, -1, -1)}
        if is_sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.expand(batch_size, -1), "time_ids": time_ids.expand(batch_size, -1)}
        with autocast:
            pred = unet(noisy, t.to(device), **kwargs).sample
        loss = noise_prediction_loss(pred, target.to(device), t, noise_sched, cfg.snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        step += 1
        losses.append((step, float(loss.item())))
        bar.update(1)
        bar.set_postfix(loss=f"{final_loss(losses):.4f}")
        if step % validation_every == 0 or step == cfg.steps:
            validate(out / "validation" / f"step-{step:06d}.png")
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
                    "prompt": cfg.prompt,
                    "elapsed_s": elapsed_before + time.time() - t0,
                },
            )
    bar.close()
    wall = elapsed_before + time.time() - t0

    lora_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    type(pipe).save_lora_weights(out, unet_lora_layers=lora_layers, weight_name=ADAPTER_WEIGHTS, safe_serialization=True)
    final_grid = out / "validation" / f"step-{cfg.steps:06d}.png"
    if final_grid.exists():
        (out / "validation.png").write_bytes(final_grid.read_bytes())
    save_loss_curve(losses, out / "loss.png", f"LoRA r={cfg.rank} on {len(train.images)} images: {cfg.prompt!r}")
    write_training_log(out, losses)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    write_adapter_config(
        out,
        {
            "backend": "stable-diffusion",
            "base_model": source.ref,
            "pipeline_class": type(pipe).__name__,
            "weights": ADAPTER_WEIGHTS,
            "adapter_hash": file_sha256(out / ADAPTER_WEIGHTS),
            "prompt": cfg.prompt,
            "negative_prompt": cfg.negative_prompt,
            "label": label,
            "class_name": class_name,
            "label_names": label_names,
            "resolution": resolution,
            # gray training images (X-rays, Fashion-MNIST): the generator converts its RGB output
            "channels": 1 if all(im.shape[2] == 1 for im in train.images) else 3,
            "lora": {"rank": cfg.rank, "alpha": alpha, "target_modules": targets, "peft_config": peft_config},
            "training": {
                **cfg.to_dict(),
                "lr": lr,
                "batch_size": batch_size,
                "resolution": resolution,
                "final_loss": final_loss(losses),
                "final_loss_window": FINAL_LOSS_WINDOW,
                "wall_time_s": round(wall, 1),
                "peak_rss_mb": peak_rss_mb(),
                "peak_cuda_mb": peak,
                "device": device,
            },
            "train_images": train.records,
            "skipped_files": train.skipped,
            "generation": {"num_inference_steps": 30, "guidance_scale": 7.5, "height": resolution, "width": resolution},
        },
    )
    return out


def _to_rgb(im: np.ndarray, resolution: int):
    from PIL import Image

    pil = Image.fromarray(im[:, :, 0] if im.shape[2] == 1 else im).convert("RGB")
    return pil.resize((resolution, resolution), Image.BILINEAR)


class _null_ctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
