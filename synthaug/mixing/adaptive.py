"""``AdaptiveRatio``: each rare class's synthetic ratio chosen during training from real validation data.

Give one to :class:`~synthaug.mixing.sampler.RatioBatchSampler` as ``synthetic_ratio`` and call
:meth:`AdaptiveRatio.observe` every ``interval`` steps with a metric computed on held-out **real**
validation images (e.g. each rare class's average precision, or its validation loss). The
controller moves each class's ratio ``r_c`` over a grid of ratios; the sampler applies every
change at a batch boundary it records (docs/DESIGN.md, "Adaptive ratio").

The algorithm: a hill climb with paired probes and a confidence rule
--------------------------------------------------------------------
For each class, the controller keeps a *centre* ratio on the grid and runs rounds of two probe
stretches, one at the grid neighbour above the centre and one at the neighbour below (the centre
itself at an end of the grid), each lasting from one :meth:`observe` to the next. A stretch's
*gain* is the change of the class's validation metric per step while it ran (sign-flipped for
``mode="min"``). After each round, ``d = gain(up) − gain(down)`` is a finite-difference estimate
of the slope of the class's reward at the centre. The centre moves one grid point towards the
better side once the mean of the round differences at this centre exceeds ``z`` standard errors
(their standard deviation pooled over every centre visited, so the noise of the metric is learned
as training goes) after at least ``min_pairs`` rounds; otherwise it stays and probes again. The
order of the two probes alternates from round to round, so a metric that improves by itself as
training goes on (every validation metric does) favours neither side over two rounds.

Why this one, and not the other published rules:

* An EXP3 bandit over the grid (Online Data Mixing, Albalak et al., 2023) needs many pulls of
  every arm: its reward is a training loss read every step, which is free. Our reward is an
  evaluation on validation images every ``interval`` steps; a short classifier run gives a few
  dozen of them, too few for a bandit over five or more arms to tell them apart. The bandit also
  treats the arms as unrelated, where the reward of neighbouring ratios is close.
* Aioli (Chen et al., 2024) fits a linear mixing law from probe runs at perturbed mixtures: the
  same finite differences, spent on a fitted update of the whole mixture. With one ratio per class
  and a reward that is noisy at every reading, the fitted step size is mostly noise; a grid step
  taken only when the sign is confidently known moves less but never far the wrong way.
* A reward on synthetic images (their training loss) is never used: the controller would chase
  whatever is easy to generate, not what helps on real images. :meth:`observe` takes validation
  metrics only, and the docs say they must come from real held-out images.

Convergence: for a stationary reward whose gain peaks at a grid ratio, with noise smaller than
the slope between neighbours, each move takes ``2·min_pairs`` observations, so the centre reaches
a peak ``m`` grid steps away after about ``4·m`` observations with the defaults and then stays
within one grid step of it (tests: a peak 4 steps away is reached and held within 40
observations). Several classes are climbed at once, each on its own metric; their interactions
are not modelled.

Ranks: under ``torch.distributed`` every rank calls :meth:`observe` at the same step (it is a
collective). The decision is rank 0's: only rank 0's ``metrics`` are read (all-reduce them first
if each rank evaluates a shard; the other ranks may pass ``None``), and its climbs and history
entry are sent to every rank, with the batch at which the change takes effect, the furthest any
rank's sampler has got, so every rank applies the same change at the same batch. A reading rank 0
refuses (a NaN, a missing class) raises ``ValueError`` on every rank.

Prefetching: a change takes effect at the next batch the sampler *yields*, which a DataLoader
does ``num_workers × prefetch_factor`` batches ahead of the loop, so the first that many steps
after an observation still train at the previous ratios while their gain is credited to the new
one. Keep ``interval`` several times that depth (the sweep uses at least 8 × ``num_workers``).
"""

from __future__ import annotations

import math
import numbers
import weakref
from fractions import Fraction
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from synthaug.mixing.ratio import as_fraction

__all__ = ["AdaptiveRatio", "plot_ratio_trajectory"]

_STATE_FORMAT = 1
ClassKey = Union[int, str]


def _grid(grid: Optional[Sequence[float]], low: Any, high: Any, step: Any) -> List[Fraction]:
    if grid is not None:
        if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or len(grid) < 2:
            raise ValueError(f"grid must be a list of at least two ratios, got {grid!r}")
        points = sorted({as_fraction(g, name="grid") for g in grid})
    else:
        lo, hi, st = as_fraction(low, name="min_ratio"), as_fraction(high, name="max_ratio"), as_fraction(step, name="step")
        if st <= 0:
            raise ValueError(f"step must be > 0, got {step!r}")
        if hi <= lo:
            raise ValueError(f"max_ratio ({float(hi):g}) must be above min_ratio ({float(lo):g})")
        points, r = [], lo
        while r <= hi:
            points.append(r)
            r += st
    if points[0] < 0 or points[-1] > 1:
        raise ValueError(f"every ratio of the grid must be in [0, 1], got {[float(p) for p in points]}")
    return points


class _Climb:
    """One class's hill climb (see the module docstring); plain data, so it pickles and saves."""

    def __init__(self, grid: List[Fraction], start: int) -> None:
        self.grid = grid
        self.centre = start
        self.probe: Optional[str] = None  # "up" / "down" while a probe runs, None before the first observation
        self.order = 1  # +1: this round probes up first
        self.rounds = 0
        self.gains: Dict[str, float] = {}
        self.diffs: List[float] = []  # round differences at this centre
        self.pooled_ss = 0.0  # squared deviations of finished centres' differences from their means
        self.pooled_dof = 0
        self.moves = 0
        self.settled = False  # probing over: the centre holds to the end

    def index(self) -> int:
        if self.probe == "up":
            return min(self.centre + 1, len(self.grid) - 1)
        if self.probe == "down":
            return max(self.centre - 1, 0)
        return self.centre

    def ratio(self) -> Fraction:
        return self.grid[self.index()]

    def first_probe(self) -> str:
        return "up" if self.order > 0 else "down"

    def step(self, gain: Optional[float], z: float, min_pairs: int) -> None:
        """The metric of the stretch that just ended gave ``gain`` (``None``: the first
        observation, nothing ran under the controller yet): start the next probe."""
        if self.settled:
            return
        if self.probe is None or gain is None:
            self.probe = self.first_probe()
            return
        self.gains[self.probe] = gain
        if self.probe == self.first_probe():
            self.probe = "down" if self.probe == "up" else "up"
            return
        self.diffs.append(self.gains["up"] - self.gains["down"])
        self.gains = {}
        self.rounds += 1
        self.order = -self.order
        self._decide(z, min_pairs)
        self.probe = self.first_probe()

    def noise(self) -> Tuple[float, int]:
        n = len(self.diffs)
        mean = sum(self.diffs) / n if n else 0.0
        ss = self.pooled_ss + sum((d - mean) ** 2 for d in self.diffs)
        dof = self.pooled_dof + max(n - 1, 0)
        return ss, dof

    def _decide(self, z: float, min_pairs: int) -> None:
        n = len(self.diffs)
        if n < min_pairs:
            return
        mean = sum(self.diffs) / n
        ss, dof = self.noise()
        se = math.sqrt(ss / dof) / math.sqrt(n) if dof else 0.0
        if abs(mean) <= z * se or mean == 0:
            return
        target = self.centre + (1 if mean > 0 else -1)
        if not 0 <= target < len(self.grid):
            return  # the better side is past the grid's end: stay at the end
        self.pooled_ss += sum((d - mean) ** 2 for d in self.diffs)
        self.pooled_dof += n - 1
        self.diffs = []
        self.centre = target
        self.moves += 1

    def settle(self) -> None:
        """Stop probing: the centre is the ratio from now on."""
        self.settled = True
        self.probe = None

    def state(self) -> Dict[str, Any]:
        return {"centre": self.centre, "probe": self.probe, "order": self.order, "rounds": self.rounds, "gains": dict(self.gains),
                "diffs": list(self.diffs), "pooled_ss": self.pooled_ss, "pooled_dof": self.pooled_dof, "moves": self.moves,
                "settled": self.settled}

    def load(self, state: Mapping[str, Any]) -> None:
        for key in ("centre", "probe", "order", "rounds", "pooled_ss", "pooled_dof", "moves"):
            setattr(self, key, state[key])
        self.settled = bool(state.get("settled", False))
        self.gains = {str(k): float(v) for k, v in state["gains"].items()}
        self.diffs = [float(d) for d in state["diffs"]]


class AdaptiveRatio:
    """A per-class synthetic ratio that tunes itself on real validation data while training runs.

    Args:
        classes: ``{class: starting ratio}``, a class index or name per rare class (as for a dict
            ``synthetic_ratio``); each start is moved to the nearest grid ratio.
        grid: the ratios a class may take, e.g. ``[0.1, 0.25, 0.5, 0.75]``; default
            ``min_ratio, min_ratio + step, ..., max_ratio``.
        min_ratio, max_ratio, step: the grid when ``grid`` is not given (defaults 0, 0.5, 0.05).
        interval: steps between two :meth:`observe` calls the training loop should make
            (:meth:`due` tells when); the controller itself accepts any spacing.
        mode: ``"max"`` when a higher metric is better (average precision, recall), ``"min"``
            for a loss.
        z: how many standard errors the mean round difference must clear before the ratio moves
            (default 2: on a flat reward about one round in 23 moves the ratio, measured in the
            tests' simulation).
        min_pairs: probe rounds at a ratio before it may move (>= 1).
        sync: under ``torch.distributed``, make rank 0's decision every rank's (module
            docstring). ``False`` leaves each rank on its own.
        settle_at: from the first observation at or after this step, stop probing: each class
            holds its centre to the end of training (default: probe to the end). A run that ends
            in a probe leaves the classifier tuned to the probe's ratio, not the chosen one: its
            last steps set its bias for the class (the sweep holds the last sixth).

    The ratios of all classes together must stay at or below 1 (below 1 unless the sampler has
    ``batches_per_epoch``): the sampler checks the grid's largest sum when it is built.

    Use::

        ctrl = AdaptiveRatio({"Shirt": 0.25}, grid=[0.1, 0.25, 0.5, 0.75], interval=50)
        sampler = RatioBatchSampler(mixed, batch_size=64, synthetic_ratio=ctrl)
        for step, (x, y) in enumerate(loader, 1):
            ...
            if ctrl.due(step):
                ctrl.observe(step, {"Shirt": rare_ap_on_real_validation(model)})

    :meth:`stats` returns the trajectory; :func:`plot_ratio_trajectory` draws it. Give
    ``settle_at`` (e.g. the last sixth of the run) so training ends at the chosen ratios rather
    than in a probe.
    """

    def __init__(
        self,
        classes: Mapping[ClassKey, float],
        *,
        grid: Optional[Sequence[float]] = None,
        min_ratio: float = 0.0,
        max_ratio: float = 0.5,
        step: float = 0.05,
        interval: int = 50,
        mode: str = "max",
        z: float = 2.0,
        min_pairs: int = 2,
        sync: bool = True,
        settle_at: Optional[int] = None,
    ) -> None:
        if not isinstance(classes, Mapping) or not classes:
            raise ValueError(f"classes must be a non-empty dict {{class: starting ratio}}, got {classes!r}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' (higher metric is better) or 'min' (a loss), got {mode!r}")
        for name, value, minimum in (("interval", interval, 1), ("min_pairs", min_pairs, 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if isinstance(z, bool) or not isinstance(z, numbers.Real) or not z >= 0:
            raise ValueError(f"z must be a number >= 0, got {z!r}")
        self.grid = _grid(grid, min_ratio, max_ratio, step)
        self.classes: List[ClassKey] = list(classes)
        self.interval = int(interval)
        self.mode = mode
        self.z = float(z)
        self.min_pairs = int(min_pairs)
        self.sync = bool(sync)
        if settle_at is not None and (isinstance(settle_at, bool) or not isinstance(settle_at, numbers.Integral) or settle_at < 0):
            raise ValueError(f"settle_at must be a step >= 0 or None, got {settle_at!r}")
        self.settle_at = None if settle_at is None else int(settle_at)
        self._climbs: Dict[ClassKey, _Climb] = {}
        for key, start in classes.items():
            r = as_fraction(start, name=f"classes[{key!r}]")
            nearest = min(range(len(self.grid)), key=lambda i: (abs(self.grid[i] - r), i))
            self._climbs[key] = _Climb(self.grid, nearest)
        self._last: Optional[Tuple[int, Dict[ClassKey, float]]] = None
        self.history: List[Dict[str, Any]] = []  # one entry per observation
        self.changes: List[Dict[str, Any]] = []  # one entry per ratio change: step, epoch, batch, ratios
        self._samplers: List[weakref.ref] = []
        self._aliases: Dict[Any, ClassKey] = {}

    # ------------------------------------------------------------------ reading
    def ratios(self) -> Dict[ClassKey, Fraction]:
        """Each class's ratio now (the one the next batches are drawn at)."""
        return {key: climb.ratio() for key, climb in self._climbs.items()}

    def max_total(self) -> Fraction:
        """The largest ratio sum the classes can reach together."""
        return self.grid[-1] * len(self._climbs)

    def due(self, step: int) -> bool:
        """Whether ``step`` (counted from 1) is one to :meth:`observe` at: every ``interval`` steps."""
        return step > 0 and step % self.interval == 0

    # ------------------------------------------------------------------ observing
    def observe(self, step: int, metrics: Union[float, Mapping[ClassKey, float]]) -> Dict[ClassKey, float]:
        """Report the validation metric at training step ``step``; returns the ratios from now on.

        Args:
            step: the training step the metric was measured after (increasing).
            metrics: ``{class: metric}`` for every class of the controller (keys as given to it,
                or the class's index or name), or one number for every class. Computed on held-out
                **real** images: never a loss on synthetic images. Under torch.distributed only
                rank 0's are read (module docstring).

        Raises:
            ValueError: a missing class, a metric that is not a finite number, a step that did not
                increase.
        """
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise ValueError(f"step must be an int, got {step!r}")
        before = self.ratios()
        world = _world() if self.sync else None
        if world is None:
            self._step_climbs(int(step), metrics)
        else:
            self._observe_synced(int(step), metrics)
        after = self.ratios()
        if after != before:
            where = self._apply(after)
            self.changes.append({"step": int(step), "epoch": where[0] if where else None, "batch": where[1] if where else None,
                                 "ratios": {str(k): float(r) for k, r in after.items()}})
        return {k: float(r) for k, r in after.items()}

    def _step_climbs(self, step: int, metrics: Union[float, Mapping[ClassKey, float]]) -> None:
        """Check the reading and move every climb one observation on."""
        values = self._metric_values(metrics)
        if self._last is not None and step <= self._last[0]:
            raise ValueError(f"step must increase from one observe() to the next: got {step} after {self._last[0]}")
        sign = 1.0 if self.mode == "max" else -1.0
        for key, climb in self._climbs.items():
            gain = None if self._last is None else sign * (values[key] - self._last[1][key]) / (step - self._last[0])
            climb.step(gain, self.z, self.min_pairs)
            if self.settle_at is not None and step >= self.settle_at:
                climb.settle()
        self._last = (step, values)
        self.history.append({"step": step, "metrics": {str(k): v for k, v in values.items()},
                             "ratios": {str(k): float(r) for k, r in self.ratios().items()},
                             "centres": {str(k): float(self.grid[c.centre]) for k, c in self._climbs.items()}})

    def _observe_synced(self, step: int, metrics: Any) -> None:
        """Under torch.distributed (a collective): rank 0 decides from its reading; every rank
        takes its climbs and history entry, or raises rank 0's error, so no rank is left waiting."""
        import torch.distributed as dist

        payload: List[Any] = [None]
        if dist.get_rank() == 0:
            try:
                self._step_climbs(step, metrics)
                payload[0] = {"climbs": [c.state() for c in self._climbs.values()], "last": self._last_state(),
                              "entry": self.history[-1]}
            except ValueError as exc:
                payload[0] = {"error": str(exc)}
        dist.broadcast_object_list(payload, src=0)
        decided = payload[0]
        if "error" in decided:
            raise ValueError(f"observe() on rank 0: {decided['error']}")
        if dist.get_rank() != 0:
            for climb, state in zip(self._climbs.values(), decided["climbs"]):
                climb.load(state)
            self._set_last(decided["last"])
            self.history.append(dict(decided["entry"]))

    def _last_state(self) -> Optional[list]:
        return None if self._last is None else [self._last[0], [self._last[1][k] for k in self._climbs]]

    def _set_last(self, last: Optional[list]) -> None:
        self._last = None if last is None else (int(last[0]), dict(zip(self._climbs, (float(v) for v in last[1]))))

    def _metric_values(self, metrics: Union[float, Mapping[ClassKey, float]]) -> Dict[ClassKey, float]:
        if isinstance(metrics, numbers.Real) and not isinstance(metrics, bool):
            metrics = {key: metrics for key in self._climbs}
        if not isinstance(metrics, Mapping):
            raise ValueError(f"metrics must be {{class: value}} or one number, got {type(metrics).__name__}")
        values: Dict[ClassKey, float] = {}
        for given, value in metrics.items():
            key = given if given in self._climbs else self._aliases.get(given, self._aliases.get(str(given)))
            if key is None:
                raise ValueError(f"metrics name class {given!r}, which the controller does not tune (its classes: {self.classes})")
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
                raise ValueError(f"the metric of class {given!r} must be a finite number, got {value!r}")
            values[key] = float(value)
        missing = [k for k in self._climbs if k not in values]
        if missing:
            raise ValueError(f"metrics lack class(es) {missing}; give one value per class the controller tunes")
        return values

    def _apply(self, ratios: Dict[ClassKey, Fraction]) -> Optional[Tuple[int, int]]:
        """Tell the samplers: the change takes effect at the furthest batch any of them (on any
        rank) will yield next."""
        samplers = [s for s in (ref() for ref in self._samplers) if s is not None]
        positions = [s._next_position() for s in samplers]
        where = max(positions) if positions else None
        if self.sync and _world() is not None:
            import torch.distributed as dist

            gathered: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, where)
            known = [g for g in gathered if g is not None]
            where = tuple(max(known)) if known else None
        if where is not None:
            for s in samplers:
                s._record_change(tuple(where), ratios)
        return None if where is None else (int(where[0]), int(where[1]))

    # ------------------------------------------------------------------ sampler link
    def _attach(self, sampler: Any, aliases: Mapping[Any, ClassKey]) -> None:
        self._samplers = [r for r in self._samplers if r() is not None and r() is not sampler] + [weakref.ref(sampler)]
        self._aliases.update(aliases)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """The controller's state (also inside the sampler's ``state_dict``)."""
        return {
            "format": _STATE_FORMAT,
            "grid": [str(g) for g in self.grid],
            "classes": [str(k) for k in self._climbs],
            "climbs": [c.state() for c in self._climbs.values()],
            "last": self._last_state(),
            "history": [dict(h) for h in self.history],
            "changes": [dict(c) for c in self.changes],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the sampler's ``load_state_dict`` does it for you).

        Raises:
            ValueError: a state of another format, grid or classes.
        """
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not an AdaptiveRatio state (format {_STATE_FORMAT})")
        if state["grid"] != [str(g) for g in self.grid] or state["classes"] != [str(k) for k in self._climbs]:
            raise ValueError(f"the state belongs to a controller with grid {state['grid']} and classes {state['classes']}; this one has "
                             f"grid {[str(g) for g in self.grid]} and classes {[str(k) for k in self._climbs]}")
        self._load_own(state)

    def _load_own(self, state: Mapping[str, Any]) -> None:
        for climb, s in zip(self._climbs.values(), state["climbs"]):
            climb.load(s)
        self._set_last(state["last"])
        self.history = [dict(h) for h in state["history"]]
        self.changes = [dict(c) for c in state["changes"]]

    def stats(self) -> Dict[str, Any]:
        """The trajectory for logging and plots: ``ratios`` now, per class ``centre``, ``moves``,
        ``rounds``; ``observations``; ``history`` (step, metrics, ratios, centres per observation)
        and ``changes`` (step, epoch, batch where it took effect, ratios)."""
        return {
            "ratios": {str(k): float(r) for k, r in self.ratios().items()},
            "classes": {str(k): {"centre": float(self.grid[c.centre]), "moves": c.moves, "rounds": c.rounds, "settled": c.settled}
                        for k, c in self._climbs.items()},
            "observations": len(self.history),
            "grid": [float(g) for g in self.grid],
            "history": [dict(h) for h in self.history],
            "changes": [dict(c) for c in self.changes],
        }

    def __repr__(self) -> str:
        now = ", ".join(f"{k!r}: {float(r):g}" for k, r in self.ratios().items())
        return f"AdaptiveRatio({{{now}}}, grid={[float(g) for g in self.grid]}, interval={self.interval}, mode={self.mode!r})"


def _world() -> Optional[int]:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_world_size()
    return None


def plot_ratio_trajectory(stats: Mapping[str, Any], path, *, title: Optional[str] = None, labels: Optional[Sequence[str]] = None):
    """Draw each class's ratio (probes thin, centre thick) and its validation metric against the
    training step, from :meth:`AdaptiveRatio.stats` (or a list of them: one line each, e.g. seeds,
    named by ``labels``). Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(stats) if isinstance(stats, (list, tuple)) else [stats]
    fig, (ax_r, ax_m) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    for n, run in enumerate(runs):
        hist = run["history"]
        steps = [h["step"] for h in hist]
        for key in (hist[0]["ratios"] if hist else {}):
            run = labels[n] if labels is not None else (f"run {n}" if len(runs) > 1 else "")
            label = f"class {key}" + (f", {run}" if run else "")
            line, = ax_r.step(steps, [h["ratios"][key] for h in hist], where="post", alpha=0.3)
            ax_r.step(steps, [h["centres"][key] for h in hist], where="post", color=line.get_color(), lw=2, label=label)
            ax_m.plot(steps, [h["metrics"][key] for h in hist], color=line.get_color(), label=label)
    ax_r.set_ylabel("synthetic ratio (thin: probes)")
    ax_m.set_ylabel("validation metric")
    ax_m.set_xlabel("training step")
    if runs and runs[0].get("grid"):
        ax_r.set_yticks(runs[0]["grid"])
    ax_r.legend(fontsize=7, ncol=2)
    ax_r.set_title(title or "adaptive synthetic ratio")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
