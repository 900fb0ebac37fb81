"""What the sweep's synthetic arms draw from, seed by seed: the adapter (a LoRA on the seed's shots,
or the one given), the leakage guard against the test set, the pre-filled synthetic pool, the
rare-class records of a pool and the smaller pools of the set-size arms.

The hash comparison itself is :func:`synthaug.evaluation.leakage.check_no_leakage`; this module
decides which adapters it must compare.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from synthaug.adapter import is_adapter_dir, read_adapter_config
from synthaug.cache.store import SyntheticCache
from synthaug.data.splits import write_images
from synthaug.data.study import StudyData
from synthaug.data.transforms import resize_image
from synthaug.evaluation.leakage import check_no_leakage
from synthaug.evaluation.sweep_config import SweepConfig
from synthaug.finetune import finetune_lora
from synthaug.generation.fill import fill_cache
from synthaug.generation.loading import load_generator

__all__ = [
    "check_leakage",
    "check_worker_labels",
    "generation_overrides",
    "pool_subset",
    "prefill_pool",
    "rare_seqs",
    "train_seed_adapter",
]


def check_leakage(cfg: SweepConfig, adapter: Optional[Path], data: StudyData, test_hashes: List[str]) -> Dict[str, Any]:
    """Check the test set against every adapter behind the synthetic images: ``--adapter`` (or
    this seed's LoRA) and each adapter a ``--cache``'s records name. Refuses when one of those
    is not here to read, unless ``leakage_check`` is off (then the summary says it was skipped)."""
    if not cfg.leakage_check:
        return {"checked": False, "shared": None, "why": "turned off (leakage_check: false)"}
    adapters = [adapter] if adapter is not None else []
    if cfg.cache:
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


def _cache_adapters(cache_path):
    """``({adapter path: adapter_hash} named by the cache's records, number of records naming none)``."""
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


def check_worker_labels(adapter: Path, data: StudyData) -> None:
    """A worker labels its records with the adapter's own label; the sweep's pool must carry the
    rare class's label of the dataset, so the two must agree."""
    a = read_adapter_config(adapter)
    if a.get("label") != data.rare or (a.get("class_name") not in (None, data.classes[data.rare])):
        raise ValueError(f"--worker: adapter {adapter} makes label {a.get('label')} ({a.get('class_name')!r}), but the rare class is "
                         f"{data.rare} ({data.classes[data.rare]!r}) in {data.name}; the worker would label its images wrongly. "
                         "Pre-fill only (drop --worker), which labels the pool with the rare class")


def generation_overrides(cfg: SweepConfig) -> Dict[str, Any]:
    """The generator settings the sweep was given (steps, scheduler, guidance); the adapter's own for the rest."""
    o = {"num_inference_steps": cfg.generation_steps, "scheduler": cfg.scheduler, "guidance_scale": cfg.guidance_scale}
    return {k: v for k, v in o.items() if v is not None}


def train_seed_adapter(cfg: SweepConfig, data: StudyData, seed: int, rare_idx, seed_dir: Path, log, progress: bool) -> Path:
    """This seed's LoRA on its ``shots`` rare images (reused when an earlier run finished it)."""
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


def prefill_pool(cfg: SweepConfig, data: StudyData, seed: int, adapter: Path, seed_dir: Path, log, progress: bool) -> SyntheticCache:
    """This seed's synthetic pool: ``synthetic_images`` images from ``adapter``, labelled as the rare class."""
    cache = SyntheticCache(seed_dir / "synthetic.lmdb", label_names=data.classes)
    missing = cfg.synthetic_images - len(cache)
    if missing <= 0:
        return cache

    def to_study_size(image):
        if data.prepare is None and image.shape[:2] == (data.size, data.size):
            return image
        return np.asarray(resize_image(image, data.size, data.mode))

    with load_generator(adapter, **generation_overrides(cfg)) as gen:
        done = fill_cache(gen, cache, missing, seed=seed * 1_000_000, label=data.rare, transform=to_study_size, batch_size=32,
                          progress=progress, desc=f"generate seed {seed}", leave=False)
    log(f"seed {seed}: generated {done.written} synthetic '{data.classes[data.rare]}' images in {done.seconds:.0f} s ({done.images_per_s:.1f} images/s)")
    return cache


def rare_seqs(cache: SyntheticCache, data: StudyData) -> List[int]:
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


def pool_subset(cache: SyntheticCache, seqs: Sequence[int], path: Path) -> SyntheticCache:
    """A cache holding the records ``seqs`` of ``cache`` (a set-size arm's pool: the first N
    rare-class records), with the source's label names, so its labels map as the full pool's do."""
    sub = SyntheticCache(path, label_names=cache.label_names)
    have = len(sub)
    if have < len(seqs):
        todo = list(seqs[have:])
        records = cache.get_many(todo)
        sub.append([r.image for r in records], [r.label for r in records], [dict(r.meta, source_seq=int(q)) for r, q in zip(records, todo)])
    return sub
