"""Tiny diffusion models made from configs with random (seeded) weights, saved to folders, so
tests run the real loading paths (``from_pretrained``) without downloading anything.

* :func:`write_tiny_sd` — a Stable-Diffusion-1.x pipeline folder (UNet2DConditionModel, VAE, CLIP
  text encoder and a CLIP BPE tokenizer built from a small ``vocab.json`` + ``merges.txt``), about
  0.4 M parameters, sampling 32×32 RGB images in a few milliseconds per step on a CPU.
* :func:`write_tiny_sd_lora_adapter` — a synthaug adapter directory (``synthaug.json`` +
  ``pytorch_lora_weights.safetensors`` in diffusers' LoRA format) for such a pipeline.
* :func:`write_tiny_pixel_ddpm` — a class-conditional pixel-DDPM folder laid out like the export of
  :mod:`synthaug.builtin.train_fashion_mnist_ddpm` (``unet/``, ``scheduler/``,
  ``synthaug_model.json``).

The vocabulary covers :data:`WORDS` (and every lower-case letter and digit), so prompts made of
those words tokenize into real tokens, not the unknown token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

__all__ = ["WORDS", "write_tiny_sd", "write_tiny_sd_lora_adapter", "write_tiny_pixel_ddpm"]

#: words that get their own token (prompts of the tests are made of these)
WORDS = (
    "a", "photo", "of", "shirt", "sks", "blurry", "low", "quality", "dress", "on", "white",
    "background", "grayscale", "clothing", "product", "the", "an", "image", "tiny", "red",
)
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def _vocab_and_merges(words: Iterable[str]):
    """A byte-level BPE vocabulary in CLIP's format: every character alone and as word end
    (``c</w>``), and each word built left to right by merges (``s h``, ``sh i``, ...)."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(",.!?-'")
    tokens = [_BOS, _EOS] + chars + [c + "</w>" for c in chars]
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merged = left + right
            if f"{left} {right}" not in merges:
                merges.append(f"{left} {right}")
            if merged not in tokens:
                tokens.append(merged)
            left = merged
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tiny_sd(
    folder: Union[str, Path],
    *,
    seed: int = 0,
    sample_size: int = 16,
    words: Sequence[str] = WORDS,
) -> Path:
    """Write a tiny Stable-Diffusion-1.x pipeline folder with seeded random weights.

    Args:
        folder: where to write (created); the pipeline's ``model_index.json`` lands in it.
        seed: torch seed of the random weights (same seed, same folder contents).
        sample_size: latent size; images are ``2 * sample_size`` pixels square (the VAE has two
            blocks, a scale factor of 2).
        words: words the tokenizer knows as whole tokens.

    Returns:
        ``folder`` as a Path.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from synthaug.benchmarks.generate import TINY_UNET, TINY_VAE

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok_dir = folder / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    vocab, merges = _vocab_and_merges(words)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**dict(TINY_UNET, sample_size=sample_size))
    vae = AutoencoderKL(**dict(TINY_VAE, sample_size=2 * sample_size))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=vocab[_BOS],
            eos_token_id=vocab[_EOS],
            pad_token_id=vocab[_EOS],
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(vocab),
            max_position_embeddings=77,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def write_tiny_sd_lora_adapter(
    pipeline_dir: Union[str, Path],
    adapter_dir: Union[str, Path],
    *,
    base_model: Optional[str] = None,
    seed: int = 1,
    rank: int = 4,
    prompt: str = "a photo of sks shirt",
    label: int = 6,
    class_name: str = "Shirt",
    generation: Optional[dict] = None,
    **config,
) -> Path:
    """Write a synthaug adapter for the pipeline in ``pipeline_dir``: a LoRA on the UNet's
    attention projections with random (seeded, non-zero) weights, saved with diffusers'
    ``save_lora_weights``, and its ``synthaug.json``.

    ``base_model`` is what ``synthaug.json`` names (default: ``pipeline_dir``); extra keyword
    arguments go into ``synthaug.json`` too.
    """
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    from synthaug.adapter import ADAPTER_WEIGHTS, file_sha256, write_adapter_config

    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:  # peft initializes B to zero: make the LoRA actually change the model
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(adapter_dir, unet_lora_layers=layers, weight_name=ADAPTER_WEIGHTS, safe_serialization=True)
    cfg = {
        "backend": "stable-diffusion",
        "base_model": str(base_model if base_model is not None else pipeline_dir),
        "weights": ADAPTER_WEIGHTS,
        "adapter_hash": file_sha256(adapter_dir / ADAPTER_WEIGHTS),
        "prompt": prompt,
        "negative_prompt": None,
        "label": label,
        "class_name": class_name,
        "resolution": None,
        "lora": {"rank": rank, "alpha": rank, "target_modules": targets},
        "generation": generation or {"num_inference_steps": 4, "guidance_scale": 2.0},
        **config,
    }
    write_adapter_config(adapter_dir, cfg)
    return adapter_dir


def write_tiny_pixel_ddpm(folder: Union[str, Path], *, seed: int = 0, classes: Sequence[str] = ("a", "b", "c")) -> Path:
    """Write a tiny class-conditional pixel-DDPM folder: 16×16 canvas, 12×12 images after the
    crop, 1 channel, ``len(classes)`` classes plus the null class for guidance."""
    import torch
    from diffusers import DDIMScheduler, UNet2DModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=len(classes) + 1,
    )
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True).save_pretrained(folder / "scheduler")
    meta = {
        "synthaug_model": "pixel-ddpm",
        "name": "tiny-pixel-ddpm",
        "classes": list(classes),
        "null_class": len(classes),
        "image_size": 16,
        "crop": [2, 2, 12, 12],
        "channels": 1,
        "generation": {"num_inference_steps": 4},
    }
    (folder / "synthaug_model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder
