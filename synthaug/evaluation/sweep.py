"""``synthaug sweep``: the paper's study, with the control its reviewer asked for.

For every seed (one few-shot split, one adapter, one classifier initialisation):

1. The imbalanced training set: ``shots`` real images of the rare class, ``per_class`` of every
   other class (multi-label CSVs: ``shots`` images with the finding, at most
   ``per_class × (labels − 1)`` without it).
2. The adapter: ``adapter`` if given (the same for every seed), else a LoRA trained on this
   seed's ``shots`` images (``base_model``, ``lora_steps``). The leakage guard refuses a test set
   holding any of the adapter's training images.
3. The synthetic pool: ``cache`` if given, else ``synthetic_images`` images generated into this
   seed's cache before training (``worker: true`` also keeps a GenerationWorker topping it up
   while the arms train).
4. The arms, each the same classifier trained the same number of steps with the same batch size
   and evaluated on the real test set only:

   * ``real_only``;
   * ``oversampled@r``: the real rare images repeated, mixed by the same RatioBatchSampler at the
     same ratio r as ``synthetic@r`` — the same count of rare-class draws (matched cardinality);
   * ``classic_aug@r``: ``oversampled@r`` with standard torchvision augmentation of the repeats;
   * ``synthetic@r``: the synthetic pool mixed at ratio r;
   * ``synthetic+classic_aug@r`` (optional): the same with the augmentation on synthetic images;
   * ``synthetic@r/n=N``: the pool cut to its first N images (the synthetic-set-size effect);
   * ``adaptive`` (optional): the synthetic pool mixed at a ratio an
     :class:`~synthaug.mixing.adaptive.AdaptiveRatio` moves over ``ratios`` during the run, from
     the rare class's one-vs-rest log loss (``adaptive_reward: loss``) or average precision
     (``ap``) on the seed's validation split, read every ``adaptive_interval`` steps, holding
     its chosen ratio for the last ``adaptive_settle`` share of the steps (one run instead of one
     per ratio).

Outputs in ``out``: ``results.json`` (one row per arm × seed, written as each finishes, so an
interrupted sweep resumes where it stopped), ``summary.json`` and ``summary.md`` (mean ± std per
arm; every synthetic arm against ``real_only`` and its matched ``oversampled@r``: paired mean
difference, 95% bootstrap CI, sign-flip and t-test p-values), ``ratio_curves.png`` and
``set_size.png``, and ``sweep.log``.

This module runs the loop; the settings are :mod:`~synthaug.evaluation.sweep_config`, the
datasets :mod:`synthaug.data.study`, the adapters, leakage guard and pools
:mod:`~synthaug.evaluation.sweep_pools`, the statistics and report
:mod:`~synthaug.evaluation.sweep_report` and :mod:`~synthaug.evaluation.sweep_plots`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from synthaug.adapter import read_adapter_config
from synthaug.cache.store import SyntheticCache
from synthaug.data.study import StudyData, check_patient_overlap, load_study_dataset
from synthaug.data.transforms import WithTransform, classic_augmentation
from synthaug.evaluation.arms import mixed_arm_loader, real_only_loader, real_rare_cache, train_and_evaluate
from synthaug.evaluation.leakage import dataset_image_hashes, file_image_hashes
from synthaug.evaluation.sweep_checks import preflight
from synthaug.evaluation.sweep_config import ARM_KINDS, SweepConfig
from synthaug.evaluation.sweep_pools import (
    check_leakage,
    check_worker_labels,
    combined_pool,
    gated_pool,
    generation_overrides,
    mode_overrides,
    pool_subset,
    prefill_pool,
    rare_seqs,
    seed_reference_classifier,
    train_seed_adapter,
    translate_sources,
    write_shots,
)
from synthaug.evaluation.sweep_plots import plot_pool_samples
from synthaug.evaluation.sweep_report import summarize_results
from synthaug.generation.gate import FidelityGate
from synthaug.generation.worker import GenerationWorker
from synthaug.outputs import jsonable, output_dir, write_json

# the sweep's entry points: its settings, the run, and the summary of a results.json
__all__ = ["ARM_KINDS", "SweepConfig", "run_sweep", "summarize_results"]

_RESULTS_VERSION = 1


class _Log:
    def __init__(self, out: Path) -> None:
        self.path = out / "sweep.log"

    def __call__(self, message: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(message)
        with open(self.path, "a") as f:
            f.write(time.strftime("%H:%M:%S ") + message + "\n")


def _prepare_out(out: Path, cfg: SweepConfig, inputs: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Create ``out``; return the rows of an interrupted sweep with the same settings and inputs
    (resume). ``--overwrite`` replaces an earlier sweep's folder, never any other folder; an earlier
    sweep that finished no arm (it failed early) is replaced without it."""
    config_path = out / "sweep_config.json"
    identity = jsonable({**cfg.identity(), "inputs": inputs})
    if out.is_dir() and any(out.iterdir()):
        if not config_path.is_file():
            raise FileExistsError(f"{out} is not empty and holds no sweep; choose another --out (an empty or new folder)")
        earlier = json.loads(config_path.read_text())
        results = out / "results.json"
        rows = json.loads(results.read_text())["rows"] if results.is_file() else []
        if earlier == identity and not cfg.overwrite:
            return rows
        changed = sorted(k for k in set(earlier) | set(identity) if earlier.get(k) != identity.get(k))
        if not cfg.overwrite and not rows:  # an earlier sweep that failed before its first arm finished: nothing to lose
            print(f"synthaug sweep: replacing {out}, an earlier sweep with other settings ({', '.join(changed)}) that finished no arm")
        elif not cfg.overwrite:
            raise FileExistsError(f"{out} holds a sweep with other settings or inputs ({', '.join(changed)}); choose another --out or "
                                  "pass --overwrite to replace it")
        for given in (cfg.cache, cfg.adapter):
            if given and Path(given).resolve().is_relative_to(out.resolve()):
                raise FileExistsError(f"--overwrite would delete {given}, which is inside {out}; choose another --out")
        shutil.rmtree(out)
    output_dir(out, what="--out")  # a file is refused; an empty or new folder is made ready
    write_json(config_path, identity)
    return []


def _inputs(cfg: SweepConfig) -> Dict[str, Any]:
    """What the sweep reads besides its settings, so a resume notices when it changed: the given
    adapter's weights hash and the given cache's record range."""
    out: Dict[str, Any] = {}
    if cfg.adapter:
        out["adapter_hash"] = read_adapter_config(cfg.adapter).get("adapter_hash")
    if cfg.cache:
        if not Path(cfg.cache).is_dir():
            raise FileNotFoundError(f"--cache {cfg.cache} does not exist")
        cache = SyntheticCache(cfg.cache, readonly=True)
        try:
            seqs = cache.seqs()
            out["cache"] = {"records": len(seqs), "first_seq": seqs[0] if seqs else None, "last_seq": seqs[-1] if seqs else None}
        finally:
            cache.close()
    return out


def _training_steps(cfg: SweepConfig, n_real: int) -> int:
    return int(cfg.steps) if cfg.steps is not None else max(1, math.ceil(cfg.epochs * n_real / cfg.batch_size))


def run_sweep(config: SweepConfig, *, progress: bool = True) -> Dict[str, Any]:
    """Run the sweep; returns the summary (also in ``OUT/summary.json``)."""
    import torch

    cfg = config
    cfg.check()
    out = Path(cfg.out)
    inputs = _inputs(cfg)
    # everything that can be checked before the sweep's folder is written or anything trains:
    # a mistake found here leaves nothing behind that blocks the corrected rerun
    data = load_study_dataset(cfg.dataset, data_dir=cfg.data, rare_class=cfg.rare_class, image_size=cfg.image_size, channels=cfg.channels)
    test = WithTransform(data.test, data.transform)
    if cfg.test_size:
        if cfg.test_size > len(data.test):
            raise ValueError(f"--test-size {cfg.test_size} is larger than the test set ({len(data.test)} images)")
        test = torch.utils.data.Subset(test, np.sort(np.random.default_rng(12345).choice(len(data.test), cfg.test_size, replace=False)).tolist())
    # a patient with images in both the training pool and the test set: refused (strict) or named, before any training
    overlap = check_patient_overlap(data, strict=cfg.strict, test_indices=getattr(test, "indices", None), warn=False)
    checks = preflight(cfg, data, getattr(test, "indices", None), steps_of=lambda n: _training_steps(cfg, n))
    done_rows = _prepare_out(out, cfg, inputs)
    log = _Log(out)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if overlap:
        log(f"WARNING: {overlap}")
    for warning in checks["warnings"]:
        log(f"WARNING: {warning}")
    if checks["too_small"]:
        log(f"WARNING: {checks['too_small']}")
    test_loader = torch.utils.data.DataLoader(test, batch_size=500, num_workers=cfg.num_workers)
    test_hashes = _test_hashes(data, test, progress)
    plan = cfg.arm_plan()
    seeds = cfg.seed_list
    done = {(r["arm"], r["seed"]) for r in done_rows}
    rows = list(done_rows)
    meta: Dict[str, Any] = {"dataset": data.name, "classes": data.classes, "rare_class": {"index": data.rare, "name": data.classes[data.rare]},
                            "multilabel": data.multilabel, "test_images": len(test), "device": device, "leakage": {}, "seeds": {},
                            "patient_overlap": overlap, "warnings": checks["warnings"], "too_small": checks["too_small"],
                            "rare_test_images": checks["rare_test"]}
    if done:
        log(f"resuming: {len(done)} of {len(plan) * len(seeds)} arm runs already in {out}/results.json")
    log(f"sweep: {data.name}, rare class '{data.classes[data.rare]}', {len(seeds)} seed{'s' if len(seeds) != 1 else ''} x {len(plan)} arms, classifier {cfg.model} on {device}")
    bar = None
    if progress:
        from synthaug.progress import progress_bar

        bar = progress_bar(total=len(plan) * len(seeds), initial=len(done), desc="sweep", unit="arm", dynamic_ncols=True)
    t_start = time.time()
    for seed in seeds:
        todo = [p for p in plan if (p["arm"], seed) not in done]
        seed_meta = _run_seed(cfg, data, seed, todo, test_loader, test_hashes, rows, out, log, device, bar, progress)
        meta["seeds"][str(seed)] = seed_meta
        meta["leakage"][str(seed)] = seed_meta.get("leakage")
        summarize_results(rows, out, cfg, meta=meta)  # results.json was written as each arm ended
    if bar is not None:
        bar.close()
    meta["wall_s"] = time.time() - t_start
    summary = summarize_results(rows, out, cfg, meta=meta)
    log((out / "summary.md").read_text())
    written = [name for name in ("results.json", "summary.json", "summary.md", "ratio_curves.png", "set_size.png") if (out / name).is_file()]
    log(f"sweep done in {meta['wall_s'] / 60:.1f} min: {out}/" + ", ".join(written)
        + (f" (WARNING: {checks['too_small']})" if checks["too_small"] else ""))
    return summary


def _test_hashes(data: StudyData, test, progress: bool) -> List[str]:
    """Pixel hashes of the test images as stored (files decoded as finetune decodes its inputs;
    Fashion-MNIST's arrays as they are), the ones a leakage check compares."""
    indices = getattr(test, "indices", None)
    if data.test_files is not None:
        files = data.test_files if indices is None else [data.test_files[i] for i in indices]
        return file_image_hashes(files, progress=progress)
    raw = data.test
    if indices is not None:
        import torch

        raw = torch.utils.data.Subset(raw, indices)
    return dataset_image_hashes(raw, progress=progress)


def _run_seed(cfg, data: StudyData, seed: int, todo, test_loader, test_hashes, rows, out: Path, log, device, bar, progress) -> Dict[str, Any]:
    import torch

    seed_dir = out / "seeds" / f"seed-{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    train_idx, rare_idx = data.split(shots=cfg.shots, per_class=cfg.per_class, seed=seed)
    val_idx = data.validation_split(train_idx, val_shots=cfg.val_shots, val_per_class=cfg.val_per_class(), seed=seed)
    real_train = data.real_subset(train_idx)
    steps = _training_steps(cfg, len(real_train))
    info: Dict[str, Any] = {"train_images": len(real_train), "rare_train_images": len(rare_idx), "val_images": len(val_idx), "steps": steps}
    needs_synthetic = any(_draws_synthetic(p) for p in todo)
    caches: List[Any] = []  # closed when the seed is done
    pools: Dict[Any, Any] = {}  # (mode, "gated" or None) -> the pre-filled pool

    # adapter, leakage guard, reference classifier, synthetic pools
    adapter = None
    if any(_draws_synthetic(p) for p in cfg.arm_plan()):
        adapter = Path(cfg.adapter) if cfg.adapter else None
        if adapter is None and cfg.cache is None:
            done_adapter = seed_dir / "adapter"
            adapter = train_seed_adapter(cfg, data, seed, rare_idx, seed_dir, log, progress) if needs_synthetic or not done_adapter.is_dir() else done_adapter
        info["leakage"] = check_leakage(cfg, adapter, data, test_hashes)
        if info["leakage"]["checked"]:
            log(f"seed {seed}: leakage check passed ({info['leakage']['train_images']} adapter training images, {len(test_hashes)} test images, none shared)")
        else:
            log(f"seed {seed}: WARNING: leakage check skipped: {info['leakage']['why']}")
    try:
        if needs_synthetic:
            if cfg.cache:
                pools[("txt2img", None)] = SyntheticCache(cfg.cache)
            else:
                _fill_pools(cfg, data, seed, adapter, train_idx, rare_idx, val_idx, todo, seed_dir, pools, info, log, progress)
            caches.extend(pools.values())
            first = pools.get((cfg.generation[0], None))
            rare_pool = rare_seqs(first, data) if first is not None else []
            info["synthetic_pool"] = len(rare_pool)
            too_big = sorted({p["pool"] for p in todo if p["pool"] is not None and p["pool"] > len(rare_pool)})
            if too_big:
                raise ValueError(f"the synthetic pool holds {len(rare_pool)} images of '{data.classes[data.rare]}'; the set-size arm(s) "
                                 f"{too_big} need more: lower --set-sizes or give a larger pool")
            if cfg.worker:
                check_worker_labels(adapter, data)
        if not todo:
            return info

        rare_labels = [np.nonzero(data.targets[i])[0].tolist() for i in rare_idx] if data.multilabel else data.rare
        real_cache = real_rare_cache([data.image(i) for i in rare_idx], rare_labels, seed_dir / "real_rare.lmdb", label_names=data.classes,
                                     indices=[int(i) for i in rare_idx])
        caches.append(real_cache)
        val_loader = torch.utils.data.DataLoader(WithTransform(data.real_subset(val_idx), data.transform), batch_size=500, num_workers=cfg.num_workers)
        refit_loader = torch.utils.data.DataLoader(WithTransform(real_train, data.transform), batch_size=500, num_workers=cfg.num_workers)
        _train_arms(cfg, data, seed, adapter, todo, steps, real_train, real_cache, pools, rare_pool if needs_synthetic else [], caches, seed_dir,
                    test_loader, val_loader, refit_loader, rows, out, log, device, bar, progress, info)
    finally:
        for c in caches:
            c.close()
    return info


def _draws_synthetic(p: Dict[str, Any]) -> bool:
    return p["kind"].startswith("synthetic") or p["kind"] in ("oversampled+synthetic", "adaptive")


def _fill_pools(cfg, data: StudyData, seed: int, adapter: Path, train_idx, rare_idx, val_idx, todo, seed_dir: Path, pools, info, log, progress) -> None:
    """Pre-fill the pool of every generation mode (and gated pool) the arms still to train draw from."""
    wanted = {(p["mode"], "gated" if p.get("variant") == "gated" else None) for p in todo if _draws_synthetic(p)}
    needs_reference = any(mode == "feedback" or gated for mode, gated in wanted) or (
        any(mode == "translate" for mode, _ in wanted) and cfg.translate_from == ["auto"])
    reference = seed_reference_classifier(data, seed, train_idx, seed_dir, log, progress, steps=cfg.reference_steps) if needs_reference else None
    shots = write_shots(data, rare_idx, seed_dir / "shots") if any(mode == "img2img" for mode, _ in wanted) else None
    sources = (translate_sources(cfg, data, seed, train_idx, val_idx, reference, seed_dir, log)
               if any(mode == "translate" for mode, _ in wanted) else None)
    for mode in sorted({mode for mode, _ in wanted}, key=cfg.generation.index):
        overrides = mode_overrides(cfg, mode, shots=shots, sources=sources, reference=reference)
        pools[(mode, None)] = prefill_pool(cfg, data, seed, adapter, seed_dir, log, progress, mode=mode, overrides=overrides)
        if (mode, "gated") in wanted:
            gate = FidelityGate(reference, label=data.classes[data.rare], low=cfg.gate[0], high=cfg.gate[1])
            gated = pools[(mode, "gated")] = gated_pool(pools[(mode, None)], gate, seed_dir / f"synthetic-{mode}-gated.lmdb")
            log(f"seed {seed}: the fidelity gate [{cfg.gate[0]:g}, {cfg.gate[1]:g}] kept {len(gated)} of {len(pools[(mode, None)])} {mode} images")
    info["pools"] = {f"{mode}{'+gated' if gated else ''}": len(pool) for (mode, gated), pool in pools.items()}
    if not (seed_dir / "samples.png").is_file():  # a resumed seed fills only the pools its remaining arms draw from
        rows = [(f"real '{data.classes[data.rare]}' shots", [np.asarray(data.image(i)) for i in rare_idx])]
        for (mode, gated), pool in pools.items():
            title = f"{mode}{' after the gate' if gated else ''} ({len(pool)} images)"
            rows.append((title, [r.image for r in pool.get_many(pool.seqs()[:12])]))
        plot_pool_samples(rows, seed_dir / "samples.png")


def _train_arms(cfg, data: StudyData, seed: int, adapter, todo, steps: int, real_train, real_cache, pools, rare_pool, caches, seed_dir: Path,
                test_loader, val_loader, refit_loader, rows, out: Path, log, device, bar, progress, info) -> None:
    import torch

    worker = None
    threads = torch.get_num_threads()
    combined: Dict[str, Any] = {}
    try:
        cache = pools.get(("txt2img", None))
        if cfg.worker and cache is not None:
            torch.set_num_threads(max(1, threads - 1))  # the worker gets one core of its own
            worker = GenerationWorker(cache, {"source": str(adapter), "overrides": generation_overrides(cfg)},
                                      min_fresh=cfg.synthetic_images, max_items=max(cfg.synthetic_images * 20, 10_000), seed=seed * 1_000_000 + 500_000,
                                      num_threads=1)
            worker.start(wait=True, timeout=600)  # model loaded before the first arm draws
        for p in todo:
            kind, mode = p["kind"], p["mode"]
            pool = None
            if kind in ("oversampled", "classic_aug"):
                pool = real_cache
            elif kind == "oversampled+synthetic":
                if mode not in combined:
                    combined[mode] = combined_pool(real_cache, pools[(mode, None)], data, cfg.real_share, seed_dir / f"combined-{mode}.lmdb")
                    caches.append(combined[mode])
                pool = combined[mode]
            elif kind != "real_only":
                base = pools[(mode, "gated" if p.get("variant") == "gated" else None)]
                pool = base if p["pool"] is None else pool_subset(base, rare_pool[:p["pool"]], seed_dir / f"synthetic-n{p['pool']}.lmdb")
                if pool is not base:
                    caches.append(pool)
            if pool is not None and len(pool) == 0:  # e.g. a gate that kept nothing: nothing to draw
                why = f"its pool is empty ({p['mode']}{' after the gate' if p.get('variant') == 'gated' else ''})"
                info.setdefault("skipped", {})[p["arm"]] = why
                log(f"seed {seed} {p['arm']}: skipped, {why}")
                if bar is not None:
                    bar.update(1)
                continue
            row = _run_arm(cfg, data, p, seed, steps, real_train, pool, test_loader, val_loader, refit_loader, device, progress)
            if _draws_synthetic(p) and p["pool"] is None:
                row["pool"] = len(rare_seqs(pool, data))  # the rare-class images in the pool (a worker may have added some)
            rows.append(jsonable(row))
            write_json(out / "results.json", {"version": _RESULTS_VERSION, "config": cfg.identity(), "rows": rows})
            m, v = row["metrics"], row.get("val_metrics") or {}
            log(f"seed {seed} {p['arm']:<34} recall {m['rare_recall']:.3f}  precision {m['rare_precision']:.3f}  F1 {m['rare_f1']:.3f}  "
                f"AP {m.get('rare_average_precision', float('nan')):.3f} (val {v.get('rare_average_precision', float('nan')):.3f})  "
                f"accuracy {m['accuracy']:.3f}  ({row['training']['wall_s']:.0f} s, {row['rare_draws']} rare draws)")
            if bar is not None:
                bar.update(1)
    finally:
        if worker is not None:
            info["worker"] = jsonable(worker.stop())
        torch.set_num_threads(threads)


def _run_arm(cfg, data: StudyData, p: Dict[str, Any], seed: int, steps: int, real_train, pool, test_loader, val_loader, refit_loader,
             device, progress) -> Dict[str, Any]:
    """Train and evaluate one arm; its row for ``results.json``."""
    kind, r, variant = p["kind"], p["ratio"], p.get("variant")
    controller = None
    if kind == "adaptive":
        from synthaug.mixing.adaptive import AdaptiveRatio  # imports torch, which the CLI imports only when a command runs

        controller = AdaptiveRatio({data.rare: r}, grid=sorted(cfg.ratios), interval=cfg.adaptive_interval_for(steps),
                                   mode="min" if cfg.adaptive_reward == "loss" else "max", settle_at=cfg.adaptive_settle_at(steps))
    if kind == "real_only":
        loader, sampler = real_only_loader(real_train, batch_size=cfg.batch_size, seed=seed, transform=data.transform, num_workers=cfg.num_workers), None
    else:
        syn_tf = data.prepare
        if kind in ("classic_aug", "synthetic+classic_aug"):
            aug = classic_augmentation(None, size=data.size)
            if data.prepare is not None:
                from torchvision import transforms as T

                aug = T.Compose([data.prepare, aug])
            syn_tf = aug
        # classes=[rare]: only rare-class records are drawn, so each synthetic arm and its
        # oversampled control draw the rare class equally often even from a mixed cache
        # classes=[rare] (the adaptive controller names the rare class itself)
        loader, sampler = mixed_arm_loader(real_train, pool, ratio=controller or r, batch_size=cfg.batch_size, seed=seed, transform=data.transform,
                                           synthetic_transform=syn_tf, consumer=f"sweep-{p['arm']}-seed{seed}", num_workers=cfg.num_workers,
                                           classes=None if controller else [data.rare], soft_targets=_has_soft_labels(pool),
                                           mark_synthetic=variant == "weighted")
    try:
        result = train_and_evaluate(p["arm"], loader, test_loader, sampler=sampler, rare=data.rare, steps=steps, seed=seed, model=cfg.model,
                                    in_channels=data.channels, num_classes=len(data.classes), image_size=data.size, lr=cfg.lr, device=device,
                                    progress=progress, multilabel=data.multilabel, val_loader=val_loader,
                                    synthetic_weight=cfg.synthetic_weight if variant == "weighted" else 1.0,
                                    refit_loader=refit_loader if variant == "refit" else None, refit_steps=cfg.refit_steps,
                                    controller=controller, controller_reward=cfg.adaptive_reward).to_dict()
    finally:
        if sampler is not None:
            # a finished arm's cursor must not pin the pool's fresh count (a worker would idle)
            pool.remove_cursor(sampler.consumer)
    return {"arm": p["arm"], "kind": kind, "ratio": r, "pool": p["pool"], "mode": p.get("mode"), "variant": variant, "seed": seed,
            **{k: result[k] for k in ("metrics", "val_metrics", "training", "sampler", "rare_draws")}}


def _has_soft_labels(pool) -> bool:
    """Whether a pool holds soft labels (its first records tell: a pool is made by one mode)."""
    labels, _ = pool.scan_labels(0, pool.bounds()[1])
    return any(isinstance(label, dict) for label in labels.values())
