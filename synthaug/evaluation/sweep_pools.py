"""What the sweep's synthetic arms draw from, seed by seed: the adapter (a LoRA on the seed's shots,
or the one given), the leakage guard against the test set, the reference classifier (trained on
the seed's real training split only), the pre-filled synthetic pool of each generation mode
(txt2img, img2img from the shots, translation from the classes most confused with the rare one,
feedback-guided), gated pools, the combined real + synthetic pool, the rare-class records of a
pool and the smaller pools of the set-size arms.

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
from synthaug.cache.codec import label_class
from synthaug.cache.store import SyntheticCache
from synthaug.classifier import ReferenceClassifier, train_reference_classifier
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
    "combined_pool",
    "gated_pool",
    "generation_overrides",
    "pool_subset",
    "prefill_pool",
    "rare_seqs",
    "seed_reference_classifier",
    "train_seed_adapter",
    "translate_sources",
    "write_shots",
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
    images = write_shots(data, rare_idx, seed_dir / "train_images")
    name = data.classes[data.rare]
    kwargs: Dict[str, Any] = {}
    if cfg.prompt:
        kwargs.update(prompt=cfg.prompt, label=data.rare, class_name=name)
    else:  # the study's class and label space: a class the base model lacks trains a free slot
        kwargs.update(class_name=name, label_names=list(data.classes))
    t0 = time.time()
    path = finetune_lora(cfg.base_model, images, adapter, steps=cfg.lora_steps, rank=cfg.lora_rank, seed=seed, progress=progress,
                         overwrite=True, min_images=min(5, len(rare_idx)), **kwargs)
    log(f"seed {seed}: LoRA ({cfg.lora_steps} steps, rank {cfg.lora_rank}) on {len(rare_idx)} '{name}' images in {time.time() - t0:.0f} s")
    return path


def write_shots(data: StudyData, indices, folder: Path, *, prefix: Optional[str] = None) -> Path:
    """The training images at ``indices`` as files in ``folder`` (rewritten), as stored: files
    copied, arrays written as they are, never resized, so an adapter's recorded hashes are taken
    as the leakage guard takes the test set's."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if data.train_files is not None:
        for i in indices:
            src = data.train_files[int(i)]
            shutil.copy(src, folder / f"{int(i):06d}_{src.name}")
    else:
        write_images(data.train, indices, folder, prefix=prefix or data.classes[data.rare].replace("/", "-").lower())
    return folder


def seed_reference_classifier(data: StudyData, seed: int, train_idx, seed_dir: Path, log, progress: bool, *, steps: int) -> Path:
    """This seed's reference classifier: trained class-balanced on the seed's real training split
    only (never the validation or test set), saved as ``reference.pt`` (reused when present). It
    picks the classes to translate from, steers feedback sampling and gates pools."""
    path = seed_dir / "reference.pt"
    if path.is_file():
        return path
    t0 = time.time()
    images = [np.asarray(data.image(i)) for i in train_idx]
    labels = data.targets[np.asarray(train_idx)]
    ref = train_reference_classifier(images, labels, data.classes, steps=steps, seed=seed, progress=progress,
                                     trained_on=f"{data.name}: seed {seed}'s real training split ({len(train_idx)} images)")
    ref.save(path)
    log(f"seed {seed}: reference classifier on the {len(train_idx)} real training images in {time.time() - t0:.0f} s")
    return path


def translate_sources(cfg: SweepConfig, data: StudyData, seed: int, train_idx, val_idx, reference: Path, seed_dir: Path, log,
                      *, per_class: int = 200) -> Path:
    """An ImageFolder (``<class>/*.png``) of real training images of the classes to translate
    from: ``translate_from``'s, or with ``auto`` the ``translate_classes`` classes the seed's
    reference classifier most confuses with the rare class on the *validation* split (probability
    it gives the rare class on their images plus the probability it gives them on rare images)."""
    folder = seed_dir / "translate_sources"
    if cfg.translate_from != ["auto"]:
        chosen = list(cfg.translate_from)
        bad = [c for c in chosen if c not in data.classes or c == data.classes[data.rare]]
        if bad:
            raise ValueError(f"--translate-from {bad}: name classes of {data.name} other than the rare one; its classes are {data.classes}")
    else:
        ref = ReferenceClassifier.load(reference)
        val_idx = np.asarray(val_idx)
        probs = ref.probabilities([np.asarray(data.image(i)) for i in val_idx])
        y = data.targets[val_idx]
        rare = data.rare
        score = {}
        for c in range(len(data.classes)):
            if c != rare and (y == c).any():
                score[c] = float(probs[y == rare][:, c].mean() + probs[y == c][:, rare].mean())
        chosen = [data.classes[c] for c in sorted(score, key=lambda c: -score[c])[: cfg.translate_classes]]
        log(f"seed {seed}: translating from {chosen}, the classes most confused with '{data.classes[rare]}' on validation "
            f"({', '.join(f'{data.classes[c]} {v:.3f}' for c, v in sorted(score.items(), key=lambda kv: -kv[1])[:4])})")
    rng = np.random.default_rng([seed, 0x7EA])
    train_idx = np.asarray(train_idx)
    for name in chosen:
        c = data.classes.index(name)
        idx = train_idx[data.targets[train_idx] == c]
        pick = np.sort(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
        # the generator reads a class folder by name, or by index for a name no folder can hold
        # ("T-shirt/top": the study's index, the generator's too where both are Fashion-MNIST's)
        sub = name if "/" not in name and not name.isdigit() else str(c)
        write_shots(data, pick, folder / sub, prefix=name.replace("/", "-").lower())
    return folder


def _to_study_size(data: StudyData):
    def convert(image):
        if data.prepare is None and image.shape[:2] == (data.size, data.size):
            return image
        return np.asarray(resize_image(image, data.size, data.mode))

    return convert


def mode_overrides(cfg: SweepConfig, mode: str, *, shots: Optional[Path] = None, sources: Optional[Path] = None,
                   reference: Optional[Path] = None) -> Dict[str, Any]:
    """The generator settings of one generation mode, on top of :func:`generation_overrides`."""
    o = generation_overrides(cfg)
    if mode == "img2img":
        o.update(mode="img2img", source_images=str(shots), strength=list(cfg.strengths))
    elif mode == "translate":
        o.update(mode="translate", source_images=str(sources), strength=list(cfg.strengths), soft_label_gamma=cfg.soft_label_gamma)
    elif mode == "feedback":
        o.update(mode="feedback", feedback_classifier=str(reference), feedback_scale=cfg.feedback_scale, feedback_objective=cfg.feedback_objective)
    return o


def prefill_pool(cfg: SweepConfig, data: StudyData, seed: int, adapter: Path, seed_dir: Path, log, progress: bool, *,
                 mode: str = "txt2img", overrides: Optional[Dict[str, Any]] = None) -> SyntheticCache:
    """This seed's synthetic pool of one generation mode: ``synthetic_images`` images from
    ``adapter`` with ``overrides`` (default: :func:`generation_overrides`), brought to the study's
    image size. Every record is labelled as the rare class, except a translation's soft labels,
    which keep the generator's class names (the pool then maps them by name)."""
    name = "synthetic" + ("" if mode == "txt2img" else f"-{mode}")
    path = seed_dir / f"{name}.lmdb"
    if (path / "data.mdb").is_file():  # an earlier run's pool: complete, or continued below
        cache = SyntheticCache(path)
        if len(cache) >= cfg.synthetic_images:
            return cache
        cache.close()
    with load_generator(adapter, **(overrides if overrides is not None else generation_overrides(cfg))) as gen:
        soft = mode == "translate" and cfg.soft_label_gamma is not None
        if soft:
            names = list(getattr(gen, "label_names", None) or [])
            missing = [c for c in [data.classes[data.rare]] if c not in names]
            if missing:
                raise ValueError(f"translate with soft labels needs a generator that names its classes as {data.name} does; "
                                 f"{adapter} names {names or 'none'} (missing {missing}); pass --soft-label-gamma none for hard labels")
        cache = SyntheticCache(path, label_names=names if soft else data.classes)
        todo = cfg.synthetic_images - len(cache)
        if todo <= 0:
            return cache
        done = fill_cache(gen, cache, todo, seed=seed * 1_000_000, label=None if soft else data.rare, transform=_to_study_size(data),
                          batch_size=32, progress=progress, desc=f"{name} seed {seed}", leave=False)
    log(f"seed {seed}: generated {done.written} '{data.classes[data.rare]}' images ({mode}) in {done.seconds:.0f} s "
        f"({done.images_per_s:.1f} images/s)")
    return cache


def _derived_pool(path: Path, label_names, fill) -> SyntheticCache:
    """The pool at ``path``, made by ``fill(cache)`` the first time: built in ``path.partial``
    and renamed when complete, so a run killed while building leaves no pool that a resumed run
    would take for a whole one (the partial folder is rebuilt from scratch)."""
    if (path / "data.mdb").is_file():
        return SyntheticCache(path, label_names=label_names)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    cache = SyntheticCache(partial, label_names=label_names)
    try:
        fill(cache)
    finally:
        cache.close()
    partial.rename(path)
    return SyntheticCache(path, label_names=label_names)


def gated_pool(pool: SyntheticCache, gate, path: Path) -> SyntheticCache:
    """The records of ``pool`` the fidelity ``gate`` accepts (the gated variant's pool): the
    same images a gated generation would have kept from the same draws, without generating them
    again. Each record keeps its provenance plus ``gate_score``, ``gate`` and ``source_seq``."""

    def fill(out: SyntheticCache) -> None:
        seqs = pool.seqs()
        for start in range(0, len(seqs), 256):
            records = pool.get_many(seqs[start:start + 256])
            keep, scores = gate.filter([r.image for r in records])
            kept = [(r, float(sc)) for r, k, sc in zip(records, keep, scores) if k]
            if kept:
                out.append([r.image for r, _ in kept], [r.label for r, _ in kept],
                           [dict(r.meta, gate_score=sc, gate=gate.spec, source_seq=int(r.seq)) for r, sc in kept])

    return _derived_pool(path, pool.label_names, fill)


def combined_pool(real_cache: SyntheticCache, synthetic: SyntheticCache, data: StudyData, real_share: float, path: Path) -> SyntheticCache:
    """One pool of the real rare shots and a synthetic pool's rare records, for
    ``oversampled+synthetic@r``: each real shot stored ``k`` times so that real records make up
    ``real_share`` of the pool (``k = round(real_share / (1 − real_share) × synthetic / shots)``,
    at least 1), interleaved with the synthetic ones. The sampler serves a pool's records about
    equally often (fresh first, then least served), so about ``real_share`` of the arm's rare
    draws are real repeats and the rest synthetic images; the total is the ratio's, as in its
    ``oversampled@r`` control."""

    def fill(pool: SyntheticCache) -> None:
        real = real_cache.get_many(real_cache.seqs())
        syn_seqs = rare_seqs(synthetic, data)
        k = max(1, round(real_share / (1 - real_share) * len(syn_seqs) / max(1, len(real))))
        real_items = [(r.image, r.label, dict(r.meta, kind="real-copy", copy=j)) for j in range(k) for r in real]
        syn_items = []
        for start in range(0, len(syn_seqs), 256):
            for q, rec in zip(syn_seqs[start:start + 256], synthetic.get_many(syn_seqs[start:start + 256])):
                syn_items.append((rec.image, _relabel(rec.label, synthetic.label_names, data.classes), dict(rec.meta, source_seq=int(q))))
        n = len(real_items) + len(syn_items)
        order = sorted(range(n), key=lambda i: (i / len(real_items)) if i < len(real_items) else ((i - len(real_items)) / max(1, len(syn_items))))
        items = real_items + syn_items
        for start in range(0, n, 256):
            chunk = [items[i] for i in order[start:start + 256]]
            pool.append([c[0] for c in chunk], [c[1] for c in chunk], [c[2] for c in chunk])

    return _derived_pool(path, data.classes, fill)


def _relabel(label, names: Optional[List[str]], classes: List[str]):
    """A record's label in the study's label space (by name when the pool names its labels)."""
    if names is None or names == classes:
        return label
    if isinstance(label, dict):
        return {classes.index(names[c]): w for c, w in label.items()}
    if isinstance(label, tuple):
        return tuple(classes.index(names[c]) for c in label)
    return classes.index(names[label])


def study_class(label: int, names: Optional[Sequence[str]], classes: List[str]) -> Optional[int]:
    """A cache label as a class of the study, as MixedDataset maps it: by name when the cache
    names its labels (``None`` for a name the study lacks, or an unnamed label), else by index
    (``None`` outside the study's classes)."""
    if names is not None:
        name = names[label] if 0 <= label < len(names) else ""
        return classes.index(name) if name in classes else None
    return label if 0 <= label < len(classes) else None


def rare_seqs(cache: SyntheticCache, data: StudyData) -> List[int]:
    """Sequence numbers of the cache's records of the rare class, oldest first: labels mapped into
    the dataset's label space by name when the cache names its labels, else by index (as
    MixedDataset maps them); a multi-label record counts when it carries the rare label, a soft
    label when its first class (the one the image was made for) is the rare class."""
    names = cache.label_names
    labels, _corrupt = cache.scan_labels(0, int(cache.stats()["next_seq"]))
    out = []
    for seq, label in labels.items():
        label = label_class(label)  # a soft label: the class it was made for
        values = label if isinstance(label, (list, tuple)) else [label]
        if any(study_class(int(v), names, data.classes) == data.rare for v in values):
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
