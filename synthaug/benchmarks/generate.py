"""Generator throughput: images/s of the pixel DDPM on CPU, and of a Stable-Diffusion-1.5
architecture at 512 px in diffusers' default configuration versus ours, on CUDA.

Questions:

1. CPU, the embedded pixel DDPM (``builtin:fashion-mnist-ddpm``, or ``--model``): images/s per
   batch size with 40 DDIM steps; what classifier-free guidance 2 costs against 1 (a second UNet
   pass); what DPM-Solver++ at 20 steps gains against DDIM at 40.
2. CUDA only: an SD-1.5-architecture pipeline (UNet, VAE and CLIP text encoder built from the
   SD-1.5 configs written below, random weights: the cost is the architecture's, so no download)
   at 512×512, 30 steps, guidance 7.5, in diffusers' default configuration
   (``StableDiffusionPipeline.from_pretrained``: fp32, one image per call) against
   ``StableDiffusionGenerator`` (fp16 or bf16, SDPA or xformers, batch 8, channels_last, with and
   without ``torch.compile``, and with tiny-VAE decoding: TAESD's architecture, random weights).
   Goal: >= 3× the default's images/s. Skipped, with the reason, on a machine without CUDA.

Timing: every configuration is warmed up (a first call, which also compiles), then timed on whole
``generate`` calls (noise, text encoding, denoising, VAE decode, conversion to uint8),
alternating configurations run by run (``interleaved``). Model loading is excluded.

    python benchmarks/generate.py [--quick] [--model SRC] [--threads N] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from synthaug.benchmarks.common import interleaved, print_table, rate, write_result
from synthaug.generation.base import dtype_kwargs
from synthaug.generation.loading import load_generator
from synthaug.generation.sd import StableDiffusionGenerator

__all__ = [
    "run", "main", "compare_sd", "write_random_sd_pipeline", "write_sd15_random_pipeline", "GPU_CONFIGS",
    "SD15_UNET", "SD15_VAE", "SD15_TEXT_ENCODER", "TINY_UNET", "TINY_VAE", "TINY_TEXT_ENCODER",
]

DEFAULT_MODEL = "builtin:fashion-mnist-ddpm"

# Stable Diffusion 1.5's component configs (runwayml/stable-diffusion-v1-5), written out so the
# benchmark needs no download. 860 M UNet parameters, 84 M VAE, 123 M text encoder.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    center_input_sample=False,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
)
SD15_VAE = dict(
    sample_size=512,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    act_fn="silu",
    scaling_factor=0.18215,
)
SD15_TEXT_ENCODER = dict(  # CLIP ViT-L/14 text tower
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
# A tiny SD-1.x pipeline (a few MB; VAE scale factor 2) for smoke runs of the same code path
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4,
)
TINY_VAE = dict(
    sample_size=32, in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
)
TINY_TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
)
ARCHITECTURES = {"sd15": (SD15_UNET, SD15_VAE, SD15_TEXT_ENCODER), "tiny": (TINY_UNET, TINY_VAE, TINY_TEXT_ENCODER)}
SD15_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
)
_PROMPT = "a photo of a shirt"


def _write_clip_tokenizer(folder: Path, words=("a", "photo", "of", "shirt", "flower")):
    """A CLIP BPE tokenizer over a small vocabulary (every letter, and the prompt's words built
    by merges), so no tokenizer download is needed; ids stay far below the text encoder's
    vocabulary size, and the prompt tokenizes into known tokens."""
    from transformers import CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]
    merges: List[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            if f"{left} {right}" not in merges:
                merges.append(f"{left} {right}")
            left += right
            if left not in tokens:
                tokens.append(left)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def write_sd15_random_pipeline(folder: Path, seed: int = 0) -> Path:
    """Write an SD-1.5-architecture pipeline with random weights (fp32, ~4.3 GB) to ``folder``."""
    return write_random_sd_pipeline(folder, "sd15", seed)


def write_random_sd_pipeline(folder: Path, arch: str = "sd15", seed: int = 0) -> Path:
    """Write a Stable-Diffusion-1.x pipeline with random weights to ``folder``: ``"sd15"``, the
    SD-1.5 architecture (fp32, ~4.3 GB; the real cost), or ``"tiny"`` (a few MB, for smoke runs).
    Its tokenizer knows the words of "a photo of a shirt" and "a photo of a flower"."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    unet, vae, text = ARCHITECTURES[arch]
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _write_clip_tokenizer(Path(tmp))
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**unet),
        vae=AutoencoderKL(**vae),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
        tokenizer=tokenizer,
        scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# ---------------------------------------------------------------------------------- CPU: pixel DDPM
def _cpu_rows(model: str, quick: bool, repeats: int) -> List[Dict[str, Any]]:
    label = 0
    steps = 4 if quick else 40
    fast_steps = 2 if quick else 20
    batch_sizes = [1, 8] if quick else [1, 8, 32, 64]
    n_images = 8 if quick else 64
    configs = []  # (name, batch size, scheduler, steps, guidance)
    for b in batch_sizes:
        configs.append((f"ddim{steps}-g1-b{b}", b, "ddim", steps, 1.0))
    big = batch_sizes[-1]
    configs.append((f"ddim{steps}-g2-b{big}", big, "ddim", steps, 2.0))
    configs.append((f"dpm++{fast_steps}-g1-b{big}", big, "dpm++", fast_steps, 1.0))
    gens, fns = {}, {}
    for name, b, sched, st, g in configs:
        gen = load_generator(model, label=label, batch_size=b, scheduler=sched, num_inference_steps=st, guidance_scale=g, device="cpu")
        gen.generate(min(b, 2), 0)  # warm-up
        gens[name] = (gen, b, sched, st, g)
        fns[name] = (lambda gen=gen: rate(n_images, lambda: gen.generate(n_images, 1000)))
    timing = interleaved(fns, repeats)
    base = timing[f"ddim{steps}-g1-b{big}"]["median"]
    rows = []
    for name, (gen, b, sched, st, g) in gens.items():
        ips = timing[name]["median"]
        rows.append({
            "model": model, "device": "cpu", "scheduler": sched, "steps": st, "guidance": g, "batch size": b,
            "images/s": ips, "ms/image": 1000.0 / ips, f"vs ddim{steps} g1 b{big}": ips / base, "timing": timing[name],
        })
    return rows


# ---------------------------------------------------------------------------------- CUDA: SD 1.5
GPU_CONFIGS = {
    "ours fp16 b8": dict(dtype="fp16", batch_size=8, compile=False),
    "ours fp16 b8 compile": dict(dtype="fp16", batch_size=8, compile=True),
    "ours bf16 b8 compile": dict(dtype="bf16", batch_size=8, compile=True),
}


def compare_sd(
    folder: Path,
    *,
    device: str,
    size: int,
    steps: int,
    configs: Dict[str, Dict[str, Any]],
    n_default: int,
    n_ours: int,
    repeats: int,
) -> List[Dict[str, Any]]:
    """images/s of the pipeline in ``folder``: diffusers' default configuration (fp32,
    ``StableDiffusionPipeline.from_pretrained`` as is, one image per call) against
    ``StableDiffusionGenerator`` with each of ``configs`` (keyword arguments), same prompt, size,
    steps and guidance. One row per configuration, the default first."""
    import torch
    from diffusers import StableDiffusionPipeline

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    default = StableDiffusionPipeline.from_pretrained(folder, **dtype_kwargs(torch.float32)).to(device)
    default.set_progress_bar_config(disable=True)

    def run_default(n: int) -> None:
        for i in range(n):
            g = torch.Generator("cpu").manual_seed(i)
            default(_PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, generator=g, output_type="np")
        sync()

    gens, warmup_s = {}, {}
    for name, kw in configs.items():
        gen = StableDiffusionGenerator(folder, prompt=_PROMPT, label=0, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, device=device, **kw)
        t0 = time.perf_counter()
        gen.generate(gen.batch_size, 0)  # warm-up (compiles, when compiling)
        sync()
        warmup_s[name] = time.perf_counter() - t0
        gens[name] = gen
    t0 = time.perf_counter()
    run_default(1)
    warmup_s["diffusers default"] = time.perf_counter() - t0
    fns = {"diffusers default": lambda: rate(n_default, lambda: run_default(n_default))}
    for name, gen in gens.items():
        fns[name] = lambda gen=gen: rate(n_ours, lambda: gen.generate(n_ours, 100))
    timing = interleaved(fns, repeats)
    base = timing["diffusers default"]["median"]
    rows = [{
        "config": "diffusers default", "dtype": "float32", "attention": "diffusers default (SDPA)", "batch size": 1,
        "channels_last": False, "compile": False, "images/s": base, "vs default": 1.0,
        "warm-up s": warmup_s["diffusers default"], "timing": timing["diffusers default"],
    }]
    for name, gen in gens.items():
        ips = timing[name]["median"]
        rows.append({
            "config": name, "dtype": str(gen.dtype).replace("torch.", ""), "attention": gen.attention, "batch size": gen.batch_size,
            "channels_last": gen.channels_last, "compile": bool(gen._compile), "images/s": ips, "vs default": ips / base,
            "warm-up s": warmup_s[name], "timing": timing[name],
        })
        gen.close()
    del default
    return rows


def _gpu_rows(quick: bool, repeats: int, folder: Optional[Path]) -> Dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device: the SD-1.5 512-px comparison needs a GPU (run on one to fill this table)", "rows": []}
    steps, size = (10 if quick else 30), 512
    configs = {"ours fp16 b8": GPU_CONFIGS["ours fp16 b8"]} if quick else GPU_CONFIGS
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(folder) if folder is not None else Path(tmp) / "sd15-random"
        if not (path / "model_index.json").is_file():
            print(f"writing a random-weight SD-1.5 pipeline to {path} ...", flush=True)
            write_sd15_random_pipeline(path)
        if not quick:  # the tiny-VAE decoding option: TAESD's architecture, random weights (the cost is the architecture's)
            taesd = path.parent / f"{path.name}-taesd"
            if not (taesd / "config.json").is_file():
                from diffusers import AutoencoderTiny

                AutoencoderTiny().save_pretrained(taesd)
            configs = dict(configs, **{"ours fp16 b8 compile tiny-VAE": dict(GPU_CONFIGS["ours fp16 b8 compile"], tiny_vae=str(taesd))})
        rows = compare_sd(
            path, device="cuda", size=size, steps=steps, configs=configs,
            n_default=2 if quick else 4, n_ours=8 if quick else 16, repeats=repeats,
        )
    best = max(r["vs default"] for r in rows)
    return {"device": torch.cuda.get_device_name(0), "steps": steps, "size": size, "rows": rows, "best_speedup": best, "goal_met": best >= 3.0}


def run(quick: bool = False, *, model: str = DEFAULT_MODEL, repeats: int = 0, threads: Optional[int] = None,
        sd_folder: Optional[Path] = None, gpu: bool = True) -> Dict[str, Any]:
    """Measure; returns ``{"cpu": {"rows": [...]}, "gpu": {"rows": [...] or "skipped": why}}``."""
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    repeats = repeats or (1 if quick else 3)
    cpu = {"model": model, "threads": torch.get_num_threads(), "rows": _cpu_rows(model, quick, repeats)}
    gpu_part = _gpu_rows(quick, repeats, sd_folder) if gpu else {"skipped": "disabled with --no-gpu", "rows": []}
    return {"quick": quick, "repeats": repeats, "cpu": cpu, "gpu": gpu_part}


CPU_COLUMNS = ["scheduler", "steps", "guidance", "batch size", "images/s", "ms/image"]
GPU_COLUMNS = ["config", "dtype", "attention", "batch size", "channels_last", "compile", "images/s", "vs default", "warm-up s"]


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few steps, images and repeats (a smoke test, not figures)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="pixel-DDPM model for the CPU part (builtin:<name> or a folder)")
    p.add_argument("--repeats", type=int, default=0, help="interleaved repeats (0: 3, quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--sd-folder", default=None, help="reuse (or write once) the random SD-1.5 pipeline here instead of a temp folder")
    p.add_argument("--no-gpu", action="store_true", help="skip the SD-1.5 GPU comparison")
    p.add_argument("--out", default=None, help="folder for generate.json (default benchmarks/results)")
    args = p.parse_args(argv)
    result = run(args.quick, model=args.model, repeats=args.repeats, threads=args.threads,
                 sd_folder=Path(args.sd_folder) if args.sd_folder else None, gpu=not args.no_gpu)
    print(f"\npixel DDPM {args.model} on CPU ({result['cpu']['threads']} torch threads):")
    print_table(result["cpu"]["rows"], CPU_COLUMNS)
    if result["gpu"]["rows"]:
        print(f"\nSD-1.5 architecture, {result['gpu']['size']} px, {result['gpu']['steps']} steps, on CUDA:")
        print_table(result["gpu"]["rows"], GPU_COLUMNS)
        print(f"best speed-up over the default configuration: {result['gpu']['best_speedup']:.2f}× (goal 3×)")
    else:
        print(f"\nSD-1.5 comparison skipped: {result['gpu']['skipped']}")
    path = write_result("generate" + ("_quick" if args.quick else ""), result, args.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
