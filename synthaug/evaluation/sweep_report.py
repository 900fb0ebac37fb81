"""The sweep's statistics and report: per-arm mean ± std over seeds, every synthetic arm paired
against ``real_only`` and its matched controls, the configuration chosen on validation data for
each seed with its test metrics (``summary.json``), the markdown tables (``summary.md``) and the
two figures (drawn by :mod:`synthaug.evaluation.sweep_plots`).

**Selection rule.** For each seed, among the arms that draw synthetic images (every generation
mode, variant and ratio; not the set-size arms), the one with the highest rare-class average
precision on the seed's *validation* split is chosen (ties: the first in the sweep's arm order);
its test metrics are what the sweep reports for "the synthetic method". It is compared, paired
over seeds, with ``oversampled@r`` at the chosen ratio (matched draws), with the ``oversampled``
ratio chosen on validation by the same rule, and with ``real_only``. :func:`select_on_validation`
reads validation metrics only: the test set decides nothing.

**Adaptive arm.** Each ``adaptive`` arm (one run whose ratio an AdaptiveRatio moves over the
sweep's ratios) is compared, paired over seeds, with every fixed ``synthetic@r`` of its generation
mode, with the fixed ratio chosen per seed on validation AP (the one-run-per-ratio way of choosing
it), with the fixed ratio best on *test* AP on average (an oracle no user has: the bar it would
have to clear), and with ``real_only``; beside them its cost: its training time, validation
readings included, against the fixed arms' total.

The paired statistics themselves are in :mod:`synthaug.evaluation.stats`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from synthaug.evaluation.stats import describe, format_mean_std, paired_comparison
from synthaug.evaluation.sweep_config import SweepConfig
from synthaug.evaluation.sweep_plots import plot_ratio_curves, plot_set_size
from synthaug.outputs import write_json

__all__ = ["COMPARED_METRICS", "SELECTION_METRIC", "markdown_summary", "select_on_validation", "summarize_results"]

COMPARED_METRICS = ("rare_recall", "rare_f1", "rare_precision", "rare_average_precision", "accuracy")
SELECTION_METRIC = "rare_average_precision"
_SYNTHETIC_KINDS = ("synthetic", "synthetic+classic_aug", "oversampled+synthetic")


def select_on_validation(rows: Sequence[Dict[str, Any]], kinds: Sequence[str] = _SYNTHETIC_KINDS,
                         metric: str = SELECTION_METRIC) -> Dict[int, str]:
    """``{seed: arm}``: for each seed, the arm of ``kinds`` (set-size arms excluded) with the
    highest validation ``metric``; ties go to the earliest row. Reads ``val_metrics`` only."""
    best: Dict[int, tuple] = {}
    for i, r in enumerate(rows):
        if r["kind"] not in kinds or "/n=" in r["arm"]:
            continue
        value = (r.get("val_metrics") or {}).get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        seed = int(r["seed"])
        if seed not in best or value > best[seed][0]:
            best[seed] = (value, r["arm"])
    return {seed: arm for seed, (_, arm) in sorted(best.items())}


def summarize_results(rows: Sequence[Dict[str, Any]], out: Optional[Path] = None, cfg: Optional[SweepConfig] = None, *,
                      meta: Optional[Dict[str, Any]] = None, n_boot: Optional[int] = None) -> Dict[str, Any]:
    """Per-arm statistics and paired comparisons from ``results.json`` rows; with ``out``, also
    write ``summary.json``, ``summary.md``, ``ratio_curves.png`` and ``set_size.png`` there."""
    n_boot = n_boot or (cfg.bootstrap if cfg is not None else 10_000)
    by_arm: Dict[str, Dict[int, Dict[str, Any]]] = {}
    info: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        by_arm.setdefault(r["arm"], {})[int(r["seed"])] = r
        info.setdefault(r["arm"], {"kind": r["kind"], "ratio": r["ratio"], "pool": r.get("pool"), "mode": r.get("mode"), "variant": r.get("variant")})
    arms = {}
    for arm, per_seed in by_arm.items():
        seeds = sorted(per_seed)
        metric_names = sorted({k for r in per_seed.values() for k, v in r["metrics"].items() if isinstance(v, (int, float))})
        arms[arm] = {**info[arm], "seeds": seeds,
                     "metrics": {k: {**describe([per_seed[s]["metrics"].get(k, float("nan")) for s in seeds]),
                                     "values": [per_seed[s]["metrics"].get(k) for s in seeds]} for k in metric_names},
                     "rare_draws": describe([per_seed[s]["rare_draws"] for s in seeds]),
                     "fresh_share": _fresh_share(per_seed.values())}
    comparisons = []
    for arm, per_seed in by_arm.items():
        kind, r = info[arm]["kind"], info[arm]["ratio"]
        if kind not in _SYNTHETIC_KINDS:
            continue
        baselines = ["real_only", f"oversampled@{r:g}"]
        if kind == "synthetic+classic_aug":
            baselines.append(f"classic_aug@{r:g}")
        for base in baselines:
            if base not in by_arm:
                continue
            seeds = sorted(set(per_seed) & set(by_arm[base]))
            if not seeds:
                continue
            for metric in COMPARED_METRICS:
                a = [per_seed[s]["metrics"].get(metric, float("nan")) for s in seeds]
                b = [by_arm[base][s]["metrics"].get(metric, float("nan")) for s in seeds]
                comparisons.append({"arm": arm, "baseline": base, "metric": metric, "seeds": seeds, **paired_comparison(a, b, n_boot=n_boot)})
    summary = {"arms": arms, "comparisons": comparisons, "selection": _selection(rows, by_arm, n_boot),
               "adaptive": _adaptive(by_arm, info, n_boot), "meta": meta or {}, "config": cfg.identity() if cfg is not None else None}
    if out is not None:
        out = Path(out)
        write_json(out / "summary.json", summary)
        (out / "summary.md").write_text(markdown_summary(summary))
        plot_ratio_curves(summary, out / "ratio_curves.png")
        plot_set_size(summary, out / "set_size.png")
        ran = [r for r in rows if r["kind"] == "adaptive" and (r.get("training") or {}).get("adaptive")]
        trajectories = [r["training"]["adaptive"] for r in ran]
        if trajectories:
            from synthaug.mixing.adaptive import plot_ratio_trajectory

            reward = next((r["training"].get("adaptive_reward") for r in rows if r["kind"] == "adaptive"), None) or "reading"
            what = {"loss": "validation log loss", "ap": "validation AP"}.get(reward, "validation reading")
            plot_ratio_trajectory(trajectories, out / "adaptive_trajectory.png", title=f"adaptive arm: rare-class ratio and {what}, per seed",
                                  labels=[f"{r['arm']}, seed {r['seed']}" for r in ran])
    return summary


def _adaptive(by_arm, info, n_boot: int) -> Dict[str, Any]:
    """The adaptive arms against the fixed ratios (see the module docstring); ``info``: each
    arm's kind, ratio, pool, mode and variant."""
    out: Dict[str, Any] = {}
    for arm, per_seed in by_arm.items():
        if info[arm]["kind"] != "adaptive":
            continue
        first = next(iter(per_seed.values()))
        mode = info[arm]["mode"] or "txt2img"
        fixed = {a: s for a, s in by_arm.items() if info[a]["kind"] == "synthetic" and "/n=" not in a
                 and not info[a]["variant"] and (info[a]["mode"] or "txt2img") == mode}
        if not fixed:
            continue
        fixed_rows = [r for a in fixed for r in fixed[a].values()]
        chosen = select_on_validation(fixed_rows, kinds=("synthetic",))
        common = set(per_seed).intersection(*(set(s) for s in fixed.values()))  # the oracle is judged on the seeds every arm has
        means = {a: float(np.mean([fixed[a][s]["metrics"].get(SELECTION_METRIC, float("nan")) for s in common])) if common else float("nan")
                 for a in fixed}
        finite = [a for a in fixed if math.isfinite(means[a])]
        oracle = max(finite, key=lambda a: means[a]) if finite else None
        by_ratio = sorted(fixed, key=lambda a: next(iter(fixed[a].values()))["ratio"])
        baselines: Dict[str, Dict[int, Dict[str, Any]]] = {a: {s: r["metrics"] for s, r in fixed[a].items()} for a in by_ratio}
        baselines["fixed ratio chosen on validation"] = {s: fixed[a][s]["metrics"] for s, a in chosen.items()}
        if oracle is not None:
            baselines[f"best fixed ratio on test ({oracle}, oracle)"] = {s: r["metrics"] for s, r in fixed[oracle].items()}
        if "real_only" in by_arm:
            baselines["real_only"] = {s: r["metrics"] for s, r in by_arm["real_only"].items()}
        comparisons = []
        for base, values in baselines.items():
            seeds = sorted(set(per_seed) & set(values))
            if not seeds:
                continue
            for metric in COMPARED_METRICS:
                a = [per_seed[s]["metrics"].get(metric, float("nan")) for s in seeds]
                b = [values[s].get(metric, float("nan")) for s in seeds]
                comparisons.append({"arm": arm, "baseline": base, "metric": metric, "seeds": seeds, **paired_comparison(a, b, n_boot=n_boot)})
        seeds_info = []
        for s, r in sorted(per_seed.items()):
            traj = (r.get("training") or {}).get("adaptive") or {}
            cls = next(iter((traj.get("classes") or {}).values()), {})
            seeds_info.append({"seed": s, "final_centre": cls.get("centre"), "moves": cls.get("moves"), "observations": traj.get("observations"),
                               "synthetic_share": (r.get("sampler") or {}).get("synthetic_share"),
                               "chosen_on_validation": fixed[chosen[s]][s]["ratio"] if s in chosen else None,
                               "wall_s": r["training"].get("wall_s_with_eval"), "eval_s": r["training"].get("adaptive_eval_s"),
                               "fixed_wall_s": sum(fixed[a][s]["training"].get("wall_s_with_eval", 0.0) for a in fixed if s in fixed[a])})
        out[arm] = {"mode": mode, "reward": (first.get("training") or {}).get("adaptive_reward"), "fixed_arms": sorted(fixed), "oracle": oracle,
                    "per_seed": seeds_info, "comparisons": comparisons}
    return out


def _selection(rows, by_arm, n_boot: int) -> Dict[str, Any]:
    """The configuration chosen on validation for each seed, its test metrics, and the paired
    comparisons of "the chosen synthetic arm" with the controls (see the module docstring)."""
    chosen = select_on_validation(rows)
    if not chosen:
        return {}
    chosen_over = select_on_validation(rows, kinds=("oversampled",))
    per_seed = []
    controls: Dict[str, Dict[int, Dict[str, Any]]] = {"oversampled@r (matched)": {}, "oversampled (chosen on validation)": {}, "real_only": {}}
    picked: Dict[int, Dict[str, Any]] = {}
    for seed, arm in chosen.items():
        row = by_arm[arm][seed]
        picked[seed] = row["metrics"]
        matched = by_arm.get(f"oversampled@{row['ratio']:g}", {}).get(seed)
        over = by_arm[chosen_over[seed]][seed] if seed in chosen_over else None
        real = by_arm.get("real_only", {}).get(seed)
        for name, other in (("oversampled@r (matched)", matched), ("oversampled (chosen on validation)", over), ("real_only", real)):
            if other is not None:
                controls[name][seed] = other["metrics"]
        per_seed.append({"seed": seed, "arm": arm, "val_metric": row["val_metrics"][SELECTION_METRIC], "metrics": row["metrics"],
                         "matched_control": matched["arm"] if matched else None,
                         "oversampled_chosen": over["arm"] if over else None})
    comparisons = []
    for name, base in controls.items():
        seeds = sorted(set(picked) & set(base))
        if not seeds:
            continue
        for metric in COMPARED_METRICS:
            a = [picked[s].get(metric, float("nan")) for s in seeds]
            b = [base[s].get(metric, float("nan")) for s in seeds]
            comparisons.append({"arm": "chosen on validation", "baseline": name, "metric": metric, "seeds": seeds,
                                **paired_comparison(a, b, n_boot=n_boot)})
    return {"rule": f"per seed, the synthetic arm with the highest validation {SELECTION_METRIC} (test metrics never read)",
            "per_seed": per_seed, "comparisons": comparisons}


def _fresh_share(rows) -> Optional[float]:
    served = sum(int((r.get("sampler") or {}).get("served", 0) or 0) for r in rows)
    fresh = sum(int((r.get("sampler") or {}).get("fresh", 0) or 0) for r in rows)
    return fresh / served if served else None


def _arm_order(summary) -> List[str]:
    def key(arm):
        a = summary["arms"][arm]
        order = {"real_only": 0, "oversampled": 1, "classic_aug": 2, "synthetic": 3, "synthetic+classic_aug": 4, "oversampled+synthetic": 5,
                 "adaptive": 6}[a["kind"]]
        return (a["pool"] is not None and a["kind"] == "synthetic" and "/n=" in arm, a["ratio"], order, a.get("mode") or "", a.get("variant") or "",
                a["pool"] or 0)

    return sorted(summary["arms"], key=key)


def markdown_summary(summary: Dict[str, Any]) -> str:
    """The arm table (mean ± std over seeds) and the paired-comparison table, in markdown."""
    lines = []
    meta = summary.get("meta") or {}
    if meta.get("too_small"):
        lines += [f"**Warning: {meta['too_small']}.** The tables below are printed, but differences between arms this small a run "
                  "shows are not evidence.", ""]
    for warning in (meta.get("warnings") or []) + ([meta["patient_overlap"]] if meta.get("patient_overlap") else []):
        lines += [f"**Warning:** {warning}.", ""]
    leak = [v for v in meta.get("leakage", {}).values() if v]
    if leak:
        if all(v.get("checked") for v in leak):
            lines += [f"Leakage check passed for every seed: none of the {leak[0]['test_images']} test images is among the adapters' "
                      f"training images ({', '.join(str(v['train_images']) for v in leak)} per seed).", ""]
        else:
            lines += [f"**Leakage check skipped**: {next(v['why'] for v in leak if not v.get('checked'))}.", ""]
    lines += ["## Arms (mean ± std over seeds; real test set)", "",
             "| arm | seeds | rare recall | rare precision | rare F1 | rare AP | accuracy | rare draws/run |", "|---|---|---|---|---|---|---|---|"]
    for arm in _arm_order(summary):
        a = summary["arms"][arm]
        m = a["metrics"]
        lines.append(f"| {arm} | {len(a['seeds'])} | " + " | ".join(format_mean_std(m.get(k, {})) for k in
                     ("rare_recall", "rare_precision", "rare_f1", "rare_average_precision", "accuracy")) + f" | {a['rare_draws']['mean']:.0f} |")
    shown = ("rare_recall", "rare_f1", "rare_average_precision")
    comps = [c for c in summary["comparisons"] if c["metric"] in shown]
    n_seeds = max((c["n"] for c in comps), default=0)
    if comps:
        lines += ["", "## Synthetic arms against the controls (paired over seeds)", "",
                  "Δ = arm − baseline, mean over seeds, with its 95% bootstrap CI; p: two-sided sign-flip permutation test "
                  + (f"(exact; with {n_seeds} seeds its smallest possible value is {2 / 2 ** n_seeds:.4g})" if n_seeds <= 16 else "(Monte Carlo)")
                  + " and paired t-test; "
                  "W/L: seeds where the arm is better/worse. AP (average precision) does not depend on the decision threshold: "
                  "it tells whether the arm ranks real rare-class images better, not only predicts the class more often.", "",
                  "| arm | baseline | Δ recall [95% CI] | p (perm / t) | W/L | Δ F1 [95% CI] | p (perm / t) | W/L | Δ AP [95% CI] | p (perm / t) | W/L |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        pairs: Dict[tuple, Dict[str, Any]] = {}
        for c in comps:
            pairs.setdefault((c["arm"], c["baseline"]), {})[c["metric"]] = c
        order = {a: i for i, a in enumerate(_arm_order(summary))}
        for (arm, base), cs in sorted(pairs.items(), key=lambda kv: (order.get(kv[0][0], 0), kv[0][1] != "real_only")):
            cells = []
            for metric in shown:
                c = cs.get(metric)
                if c is None:
                    cells += ["–", "–", "–"]
                    continue
                cells += [f"{c['mean_diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]", f"{c['p_sign_flip']:.3f} / {_fmt_p(c['p_ttest'])}",
                          f"{c['wins']}/{c['losses']}"]
            lines.append(f"| {arm} | {base} | " + " | ".join(cells) + " |")
    lines += _selection_markdown(summary.get("selection") or {}, shown)
    lines += _adaptive_markdown(summary.get("adaptive") or {}, shown)
    return "\n".join(lines) + "\n"


def _adaptive_markdown(adaptive: Dict[str, Any], shown) -> List[str]:
    lines: List[str] = []
    for arm, a in adaptive.items():
        lines += ["", f"## {arm}: the ratio chosen during the run", "",
                  "One run per seed whose rare-class ratio an AdaptiveRatio moved over the sweep's ratios from a reading on the "
                  f"validation split ({a.get('reward') or 'see the config'}) "
                  "(`adaptive_trajectory.png`). Δ = adaptive − baseline, paired over seeds. The oracle is the fixed ratio with the best "
                  "mean *test* AP: no user can pick it, it is the bar.", "",
                  "| seed | final centre ratio | moves | validation readings | synthetic share of draws | fixed ratio chosen on validation | "
                  "adaptive run s (of it, validation) | all fixed runs s |", "|---|---|---|---|---|---|---|---|"]
        for s in a["per_seed"]:
            share = s["synthetic_share"]
            lines.append(f"| {s['seed']} | {_g(s['final_centre'])} | {_g(s['moves'])} | {_g(s['observations'])} | {'–' if share is None else f'{share:.3f}'} | "
                         f"{_g(s['chosen_on_validation'])} | {_g(s['wall_s'], '.0f')} ({_g(s['eval_s'], '.1f')}) | {_g(s['fixed_wall_s'], '.0f')} |")
        lines += _against_table(f"{arm} against", [c for c in a["comparisons"] if c["metric"] in shown], shown)
    return lines


def _against_table(title: str, comps: List[Dict[str, Any]], shown) -> List[str]:
    """One row per baseline: Δ with its CI and W/L per metric, the p-values for AP."""
    if not comps:
        return []
    lines = ["", f"| {title} | Δ recall [95% CI] | W/L | Δ F1 [95% CI] | W/L | Δ AP [95% CI] | p (perm / t) | W/L |",
             "|---|---|---|---|---|---|---|---|"]
    by_base: Dict[str, Dict[str, Any]] = {}
    for c in comps:
        by_base.setdefault(c["baseline"], {})[c["metric"]] = c
    for base, cs in by_base.items():
        cells = []
        for metric in shown:
            c = cs.get(metric)
            if c is None:
                cells += ["–", "–"] if metric != "rare_average_precision" else ["–", "–", "–"]
                continue
            cells.append(f"{c['mean_diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]")
            if metric == "rare_average_precision":
                cells.append(f"{c['p_sign_flip']:.3f} / {_fmt_p(c['p_ttest'])}")
            cells.append(f"{c['wins']}/{c['losses']}")
        lines.append(f"| {base} | " + " | ".join(cells) + " |")
    return lines


def _g(value, fmt: str = "g") -> str:
    return "–" if value is None else format(value, fmt)


def _selection_markdown(selection: Dict[str, Any], shown) -> List[str]:
    if not selection:
        return []
    lines = ["", "## Chosen on validation", "",
             f"Rule: {selection['rule']}. Each seed's validation split is drawn from the training pool outside its training "
             "split; the test set is read only for the numbers below.", "",
             "| seed | chosen arm | validation AP | test recall | test F1 | test AP | matched control | oversampled chosen on validation |",
             "|---|---|---|---|---|---|---|---|"]
    for s in selection["per_seed"]:
        m = s["metrics"]
        lines.append(f"| {s['seed']} | {s['arm']} | {s['val_metric']:.3f} | {m['rare_recall']:.3f} | {m['rare_f1']:.3f} | "
                     f"{m.get('rare_average_precision', float('nan')):.3f} | {s['matched_control'] or '–'} | {s['oversampled_chosen'] or '–'} |")
    return lines + _against_table("chosen synthetic arm against", [c for c in selection["comparisons"] if c["metric"] in shown], shown)


def _fmt_p(p: float) -> str:
    return "–" if p is None or (isinstance(p, float) and math.isnan(p)) else f"{p:.3f}"
