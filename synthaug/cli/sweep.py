"""``synthaug sweep``: the paper's study — ratio sweep, real-only and matched-cardinality
oversampling controls, several seeds, paired statistics and plots."""

from __future__ import annotations

import argparse

from synthaug.evaluation.sweep import run_sweep
from synthaug.evaluation.sweep_config import ARM_KINDS, GENERATION_MODES, VARIANTS, SweepConfig

__all__ = ["register"]


def _list_of(cast, what: str):
    def parse(text: str):
        try:
            return [cast(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None

    return parse


_floats = _list_of(float, "numbers")
_ints = _list_of(int, "integers")
_names = _list_of(str.strip, "names")


def _gamma(text: str):
    """A float, or "none" (hard labels)."""
    if text.strip().lower() in ("none", "off", "hard"):
        return "none"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _seeds(text: str):
    values = _ints(text)
    return values[0] if "," not in text and len(values) == 1 else values


def run(args: argparse.Namespace) -> int:
    given = {k: v for k, v in vars(args).items() if k in SweepConfig.__dataclass_fields__ and v is not None}
    if given.get("soft_label_gamma") == "none":
        given["soft_label_gamma"] = None
    if args.overwrite is False:
        given.pop("overwrite", None)
    if args.worker is False:
        given.pop("worker", None)
    if args.strict is False:
        given.pop("strict", None)
    if args.no_leakage_check:
        given["leakage_check"] = False
    cfg = SweepConfig.from_yaml(args.config, **given) if args.config else SweepConfig.from_dict(given, source="command line")
    run_sweep(cfg, progress=not args.no_progress)
    return 0


def register(sub) -> None:
    d = SweepConfig()
    p = sub.add_parser(
        "sweep",
        help="the paper's study: ratio sweep with real-only and oversampling controls, seeds, statistics, plots",
        description=__doc__ + " Settings come from --config (YAML, keys = the long flag names with '_' for '-'), "
        "then the flags given here, then the defaults shown. An interrupted sweep resumes when run again with the same settings and --out.",
    )
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of settings (e.g. examples/sweep_fashion_mnist.yaml)")
    p.add_argument("--dataset", help=f"fashion-mnist, imagefolder:DIR (DIR/train/<class>/, DIR/test/<class>/) or csv:FILE (multi-label, ChestX-ray14 style) (default: {d.dataset})")
    p.add_argument("--data", help="folder of the Fashion-MNIST IDX files (default: the Debian package's)")
    p.add_argument("--rare-class", help="the rare class (a CSV dataset: the rare finding) (default: Shirt for fashion-mnist; required otherwise)")
    p.add_argument("--shots", type=int, help=f"real training images of the rare class (default: {d.shots})")
    p.add_argument("--per-class", type=int, help=f"real training images of every other class (default: {d.per_class})")
    p.add_argument("--ratios", type=_floats, help=f"synthetic ratios, comma-separated (default: {','.join(f'{r:g}' for r in d.ratios)})")
    p.add_argument("--seeds", type=_seeds, help=f"number of seeds (0..N-1) or a comma-separated list (default: {d.seeds})")
    p.add_argument("--epochs", type=float, help=f"training length in passes over the real training set, the same step count for every arm (default: {d.epochs:g})")
    p.add_argument("--steps", type=int, help="training steps per arm (overrides --epochs)")
    p.add_argument("--batch-size", type=int, help=f"classifier batch size (default: {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"classifier learning rate, Adam (default: {d.lr:g})")
    p.add_argument("--model", choices=["small-cnn", "resnet18"], help=f"classifier (default: {d.model})")
    p.add_argument("--arms", help=f"comma-separated arm kinds out of {','.join(ARM_KINDS)} (default: {','.join(d.arms)})")
    p.add_argument("--adapter", help="LoRA adapter folder used for every seed (default: train one per seed on its shots)")
    p.add_argument("--cache", help="an existing synthetic cache to mix from (default: generate --synthetic-images per seed)")
    p.add_argument("--base-model", help=f"base model of the per-seed LoRA (default: {d.base_model})")
    p.add_argument("--prompt", help="prompt of a Stable-Diffusion base model's LoRA")
    p.add_argument("--lora-steps", type=int, help=f"LoRA training steps (default: {d.lora_steps})")
    p.add_argument("--lora-rank", type=int, help=f"LoRA rank (default: {d.lora_rank})")
    p.add_argument("--synthetic-images", type=int, help=f"synthetic images generated per seed before training (default: {d.synthetic_images})")
    p.add_argument("--set-sizes", type=_ints, help=f"smaller synthetic pools for the set-size plot, comma-separated; '' for none (default: {','.join(map(str, d.set_sizes))})")
    p.add_argument("--set-size-ratio", type=float, help=f"ratio of the set-size arms (default: {d.set_size_ratio:g})")
    p.add_argument("--generation-steps", type=int, help="denoising steps (default: the adapter's)")
    p.add_argument("--scheduler", help="sampler: ddim, dpm++, ... (default: the adapter's)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the adapter's)")
    g = p.add_argument_group("generation around the real data, variants, and selection on validation")
    g.add_argument("--generation", type=_names, help=f"generation modes of the synthetic pools, comma-separated, out of {','.join(GENERATION_MODES)}: "
                   "txt2img from noise; img2img from the rare shots (SDEdit); translate from real images of the classes most confused "
                   f"with the rare one, soft-labelled; feedback, steered toward images the reference classifier finds hard (default: {','.join(d.generation)})")
    g.add_argument("--strengths", type=_floats, help=f"img2img/translate strengths, one drawn per image (default: {','.join(f'{v:g}' for v in d.strengths)})")
    g.add_argument("--translate-from", type=_names, help="classes to translate from, comma-separated, or 'auto': the --translate-classes "
                   "classes a reference classifier (trained on the seed's real training split) most confuses with the rare one on validation (default: auto)")
    g.add_argument("--translate-classes", type=int, help=f"how many classes 'auto' picks (default: {d.translate_classes})")
    g.add_argument("--soft-label-gamma", type=_gamma, help=f"translation soft labels: the rare class gets strength**gamma, the source class the "
                   f"rest; 'none' for hard labels (default: {d.soft_label_gamma})")
    g.add_argument("--feedback-scale", type=float, help=f"feedback guidance scale (default: {d.feedback_scale:g})")
    g.add_argument("--feedback-objective", choices=["entropy", "loss"], help=f"what feedback guidance maximizes (default: {d.feedback_objective})")
    g.add_argument("--variants", type=_names, help=f"variants of each synthetic arm, comma-separated, out of {','.join(VARIANTS)}: "
                   "weighted (synthetic items' loss × --synthetic-weight), gated (a pool filtered by the reference classifier, --gate), "
                   "refit (the last layer re-fit on real data, class-balanced, --refit-steps) (default: none)")
    g.add_argument("--synthetic-weight", type=float, help=f"loss weight of synthetic items in the weighted variant; real items weigh 1 (default: {d.synthetic_weight:g})")
    g.add_argument("--gate", type=_floats, help=f"LOW,HIGH: the gated variant keeps images whose rare-class probability is in [LOW, HIGH] (default: {','.join(f'{v:g}' for v in d.gate)})")
    g.add_argument("--refit-steps", type=int, help=f"steps of the refit variant (default: {d.refit_steps})")
    g.add_argument("--real-share", type=float, help=f"oversampled+synthetic: share of the rare draws that are real repeats (default: {d.real_share:g})")
    g.add_argument("--reference-steps", type=int, help=f"training steps of each seed's reference classifier (auto translation, feedback, gate) (default: {d.reference_steps})")
    g.add_argument("--val-shots", type=int, help=f"images of every class in the validation split configurations are chosen on (balanced, "
                   f"as the test set is); drawn outside the training split, never from the test set (default: {d.val_shots})")
    g.add_argument("--adaptive-interval", type=int, help="training steps between two validation readings of the adaptive arm (an AdaptiveRatio "
                   "hill-climbing the rare class's ratio over --ratios on the validation split, --adaptive-reward; default: steps // 24, at least 5 "
                   "and 8 x --num-workers, so a DataLoader's prefetch stays a small part of each reading)")
    g.add_argument("--adaptive-settle", type=float, help="the adaptive arm's last share of the training steps held at the ratio it chose, "
                   f"without probes, so the classifier ends at that ratio; 0 probes to the end (default: {d.adaptive_settle:.3g})")
    g.add_argument("--adaptive-reward", choices=["loss", "ap"], help="what the adaptive arm reads on the validation split: loss, the rare "
                   "class's one-vs-rest log loss (a proper score over every validation image; smoother than AP on a few rare images), "
                   f"or ap, its average precision (default: {d.adaptive_reward})")
    p.add_argument("--worker", action="store_true", default=None, help="keep a GenerationWorker topping up the pool while the arms train (default: pre-fill only)")
    p.add_argument("--image-size", type=int, help=f"image side for imagefolder/csv datasets (default: {d.image_size})")
    p.add_argument("--channels", type=int, choices=[1, 3], help="1 (gray) or 3 (RGB) for imagefolder/csv (default: 3 for imagefolder, 1 for csv)")
    p.add_argument("--test-size", type=int, help="evaluate on a fixed random subset of the test set (default: all of it)")
    p.add_argument("--num-workers", type=int, help=f"DataLoader workers (default: {d.num_workers})")
    p.add_argument("--device", help=f"cpu, cuda, cuda:N or auto (default: {d.device})")
    p.add_argument("--bootstrap", type=int, help=f"bootstrap resamples of each CI (default: {d.bootstrap})")
    p.add_argument("--no-leakage-check", action="store_true", help="skip the check that no test image is among the adapter's training "
                   "images (only when the adapter that made --cache is not at hand; the summary then says the check was skipped)")
    p.add_argument("--strict", action="store_true", default=None, help="refuse instead of warn on data mismatches: a patient in both train "
                   "and test, an adapter whose resolution or channels differ from the study's images")
    p.add_argument("--out", help=f"report folder (default: {d.out})")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace --out when it holds an earlier sweep with other settings (default: refuse; same settings: resume)")
    # --no-progress (args.no_progress) is the shared option synthaug.cli adds to every subcommand
    p.set_defaults(func=run)
