"""AdaptiveRatio: a per-class ratio changed during training, exact between changes, replayed on resume.

The synthetic cache is a TEST FIXTURE (tests/helpers/stand_in_cache.py): real Fashion-MNIST
test-split images stand in for generated ones. The real data is a prefix of the training split.
"""

import io
import json
import math
import os
import random
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Subset

from synthaug import MixedDataset, RatioBatchSampler
from synthaug.data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST
from synthaug.mixing import is_synthetic
from synthaug.mixing.adaptive import AdaptiveRatio, plot_ratio_trajectory
from tests.helpers.readme import readme_python
from tests.helpers.stand_in_cache import build_stand_in_cache

REPO = Path(__file__).resolve().parents[1]
SHIRT = FASHION_MNIST_CLASSES.index("Shirt")
COAT = FASHION_MNIST_CLASSES.index("Coat")
pytestmark = pytest.mark.timeout(300)
HYPO = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
GRID = [0.05, 0.1, 0.2, 0.3]


@pytest.fixture(scope="module")
def train():
    return FashionMNIST(train=True)


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory):
    """TEST FIXTURE cache: 300 records alternating Shirt and Coat (test-split images)."""
    return build_stand_in_cache(tmp_path_factory.mktemp("adaptive") / "two", 300, classes=["Shirt", "Coat"])


def labels_of(batch, labels):
    return [labels[i.seq] for i in batch if is_synthetic(i)]


def drive(sampler, ctrl, metrics, interval, *, start_step=0, iterator=None, stop=None):
    """Iterate ``sampler`` as a training loop does, observing ``metrics[n]`` (one dict per
    observation, indexed by the observation's number) every ``interval`` steps; returns the batches."""
    out = []
    step = start_step
    for batch in iterator if iterator is not None else sampler:
        out.append(batch)
        step += 1
        if step % interval == 0:
            ctrl.observe(step, metrics[step // interval - 1])
        if stop is not None and step == stop:
            break
    return out, step


def random_metrics(seed, n, classes=("Shirt", "Coat")):
    rng = random.Random(seed)
    level = {c: 0.0 for c in classes}
    out = []
    for _ in range(n):
        level = {c: v + rng.uniform(-1, 1) for c, v in level.items()}
        out.append(dict(level))
    return out


def check_stretches(sampler, batches, labels, batch_size, shard_len, epoch=0, drop_last=False):
    """Every batch of the epoch holds the count the stretch rule gives, per-class slots within 2
    of their running target, and every real index once (drop_last: at most once)."""
    start = {SHIRT: sampler._static[0], COAT: sampler._static[1]}
    for c in sampler.changes():
        if (c["epoch"], c["batch"]) <= (epoch, 0):
            start = {k: as_frac(v) for k, v in c["ratios"].items()}
    changes = [(0, start)]
    changes += [(c["batch"], {k: as_frac(v) for k, v in c["ratios"].items()}) for c in sampler.changes() if c["epoch"] == epoch and c["batch"] > 0]
    real_seen = []
    for j, (start, ratios) in enumerate(changes):
        end = changes[j + 1][0] if j + 1 < len(changes) else len(batches)
        end = min(end, len(batches))
        q = sum(ratios.values(), Fraction(0)) * batch_size
        per_class = {c: 0 for c in ratios}
        for i in range(start, end):
            n = i - start
            syn = labels_of(batches[i], labels)
            real = [x for x in batches[i] if not is_synthetic(x)]
            real_seen += real
            if len(batches[i]) == batch_size:
                assert len(syn) == math.floor(q * (n + 1)) - math.floor(q * n), (i, start, q)
                for c in ratios:
                    per_class[c] += syn.count(c)
                    assert abs(per_class[c] - ratios[c] * batch_size * (n + 1)) < 2
            else:  # the epoch's last, shorter batch: share at most r
                assert i == len(batches) - 1 and len(syn) <= sum(ratios.values()) * len(batches[i])
    if drop_last:
        assert len(set(real_seen)) == len(real_seen) and shard_len - len(real_seen) < batch_size
    else:
        assert sorted(real_seen) == list(range(shard_len))


def as_frac(x):
    return Fraction(x).limit_denominator(10**6)


# ---------------------------------------------------------------------------------- exactness and resume
@settings(max_examples=25, **HYPO)
@given(
    b=st.integers(4, 16),
    seed=st.integers(0, 10**6),
    interval=st.integers(1, 5),
    k=st.integers(0, 40),
)
def test_exact_within_stretches_and_exact_resume_across_changes(train, two_classes, b, seed, interval, k):
    """Hypothesis: with changes made by the controller at arbitrary batches, every constant
    stretch holds floor(q(i+1)) - floor(qi) synthetic items per batch, each real index is used
    once, and a sampler resumed from a state taken at batch k (before or after changes) yields
    the same remaining batches, applying the recorded changes at the same batches."""
    labels = two_classes.labels()
    mixed = MixedDataset(Subset(train, range(240)), two_classes)
    metrics = random_metrics(seed, 400)
    kw = dict(grid=GRID, interval=interval, min_pairs=1, z=0.0)

    ctrl = AdaptiveRatio({"Shirt": 0.1, COAT: 0.05}, **kw)
    sampler = RatioBatchSampler(mixed, batch_size=b, synthetic_ratio=ctrl, seed=seed % 97, consumer="orig")
    batches, _ = drive(sampler, ctrl, metrics, interval)
    assert len(batches) == len(sampler)
    assert sampler.changes(), "the random metrics moved the ratio at least once"
    check_stretches(sampler, batches, labels, b, 240)

    # the same run, stopped after k batches, its state saved, resumed in a new sampler and controller
    k = min(k, len(batches))
    ctrl2 = AdaptiveRatio({"Shirt": 0.1, COAT: 0.05}, **kw)
    first = RatioBatchSampler(mixed, batch_size=b, synthetic_ratio=ctrl2, seed=seed % 97, consumer="first")
    it = iter(first)
    head, step = drive(first, ctrl2, metrics, interval, iterator=it, stop=k) if k else ([], 0)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    ctrl3 = AdaptiveRatio({"Shirt": 0.1, COAT: 0.05}, **kw)
    resumed = RatioBatchSampler(mixed, batch_size=b, synthetic_ratio=ctrl3, seed=seed % 97, consumer="resumed")
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    tail, _ = drive(resumed, ctrl3, metrics, interval, start_step=step)
    assert head + tail == batches
    assert resumed.changes() == sampler.changes()


class Recording(RatioBatchSampler):
    """Keeps the index batches it yields, in order (what a DataLoader asked it for)."""

    def __iter__(self):
        self.seen = getattr(self, "seen", [])
        for batch in super().__iter__():
            self.seen.append(batch)
            yield batch


def zeros(image):
    return torch.zeros(1)


def test_a_change_applies_at_the_next_batch_yielded_and_resume_from_consumed_replays_it(train, two_classes):
    """Through a prefetching DataLoader the change decided at step s takes effect at the batch the
    sampler yields next (s + the batches the loader fetched ahead); a state taken at the consumed
    count, rewound past that batch, replays the change there."""
    mixed = MixedDataset(Subset(train, range(300)), two_classes, transform=zeros)
    kw = dict(grid=GRID, interval=5, min_pairs=1, z=0.0)
    ctrl = AdaptiveRatio({"Shirt": 0.1, "Coat": 0.1}, **kw)
    live = Recording(mixed, batch_size=10, synthetic_ratio=ctrl, seed=4, consumer="live")
    loader = DataLoader(mixed, batch_sampler=live, num_workers=2, prefetch_factor=2)
    state = None
    for consumed, _ in enumerate(loader, 1):
        if consumed in (5, 10):
            ctrl.observe(consumed, {"Shirt": float(consumed), "Coat": -float(consumed)})
        if consumed == 10:
            state = live.state_dict(consumed=consumed)
    changes = live.changes()
    assert [c["batch"] for c in changes] == [5 + 4, 10 + 4]  # 2 workers x prefetch 2: four batches ahead
    assert state["batch"] == 10 and len(state["adaptive"]["changes"]) == 2
    syn = [sum(is_synthetic(i) for i in b) for b in live.seen]
    # start 0.1 + 0.1; from batch 9 the first probes (up): 0.2 + 0.2; from batch 14 the second (down): 0.05 + 0.05
    assert syn[:9] == [2] * 9 and syn[9:14] == [4] * 5 and syn[14] == 1

    resumed = RatioBatchSampler(mixed, batch_size=10, synthetic_ratio=AdaptiveRatio({"Shirt": 0.1, "Coat": 0.1}, **kw), seed=4,
                                consumer="resumed")
    resumed.load_state_dict(state)
    assert list(resumed) == live.seen[10:]
    assert resumed.changes() == changes


def test_batches_per_epoch_and_a_change_after_the_epoch_ends(train, two_classes):
    """With batches_per_epoch every batch is full, the stretch rule holds; a change observed after
    the epoch's last batch applies from the next epoch's first batch."""
    mixed = MixedDataset(Subset(train, range(100)), two_classes)
    ctrl = AdaptiveRatio({"Shirt": 0.3, "Coat": 0.2}, grid=[0.1, 0.2, 0.3, 0.5], min_pairs=1, z=0.0)
    s = RatioBatchSampler(mixed, batch_size=8, synthetic_ratio=ctrl, batches_per_epoch=6, seed=1)
    first = list(s)
    assert len(first) == 6 and all(len(b) == 8 for b in first)
    ctrl.observe(6, {"Shirt": 0.0, "Coat": 0.0})  # first observation: starts the first probe (up)
    assert s.changes() == [{"epoch": 0, "batch": 6, "ratios": {SHIRT: 0.5, COAT: 0.3}}]
    s.set_epoch(1)
    second = list(s)
    syn = [sum(is_synthetic(i) for i in b) for b in second]
    q = Fraction(8) * Fraction(8, 10)
    assert syn == [math.floor(q * (i + 1)) - math.floor(q * i) for i in range(6)]


def test_changes_across_epochs_with_drop_last_and_with_a_fixed_epoch_length(train, two_classes):
    """Changes every 3 batches over three epochs: each epoch keeps the stretch rule and uses each
    real index once (drop_last: the rest left out); with batches_per_epoch the real stream stays
    one pass after another across epochs."""
    labels = two_classes.labels()
    mixed = MixedDataset(Subset(train, range(170)), two_classes)
    metrics = random_metrics(5, 100)
    for drop in (True, False):
        ctrl = AdaptiveRatio({"Shirt": 0.1, COAT: 0.05}, grid=GRID, interval=3, min_pairs=1, z=0.0)
        s = RatioBatchSampler(mixed, batch_size=9, synthetic_ratio=ctrl, seed=2, drop_last=drop, shuffle=False)
        step = 0
        for epoch in range(3):
            s.set_epoch(epoch)
            batches, step = drive(s, ctrl, metrics, 3, start_step=step)
            check_stretches(s, batches, labels, 9, 170, epoch=epoch, drop_last=drop)
        assert len({c["epoch"] for c in s.changes()}) == 3
    ctrl = AdaptiveRatio({"Shirt": 0.1, COAT: 0.05}, grid=GRID, interval=3, min_pairs=1, z=0.0)
    s = RatioBatchSampler(mixed, batch_size=9, synthetic_ratio=ctrl, seed=2, batches_per_epoch=7)
    real, step = [], 0
    for epoch in range(4):
        s.set_epoch(epoch)
        batches, step = drive(s, ctrl, metrics, 3, start_step=step)
        assert len(batches) == 7 and all(len(b) == 9 for b in batches)
        real += [i for b in batches for i in b if not is_synthetic(i)]
    passes = [real[p:p + 170] for p in range(0, len(real) - 169, 170)]
    assert passes and all(sorted(p) == list(range(170)) for p in passes)  # every full pass uses each index once


def test_a_sampler_built_after_the_controller_moved_starts_where_it_is_and_resume_keeps_the_start(train, two_classes):
    mixed = MixedDataset(Subset(train, range(200)), two_classes)
    ctrl = AdaptiveRatio({"Shirt": 0.1, "Coat": 0.1}, grid=GRID, interval=5, min_pairs=1, z=0.0)
    ctrl.observe(5, {"Shirt": 1.0, "Coat": 1.0})  # e.g. a DataLoader rebuilt each epoch: the first probe went up
    assert {k: float(v) for k, v in ctrl.ratios().items()} == {"Shirt": 0.2, "Coat": 0.2}
    s = RatioBatchSampler(mixed, batch_size=10, synthetic_ratio=ctrl, seed=1, consumer="late")
    assert float(s.ratio()) == 0.4 and sum(is_synthetic(i) for i in next(iter(s))) == 4
    assert s.class_stats()["ratios"] == {str(SHIRT): 0.2, str(COAT): 0.2}
    state = s.state_dict()
    fresh = AdaptiveRatio({"Shirt": 0.1, "Coat": 0.1}, grid=GRID, interval=5, min_pairs=1, z=0.0)  # rebuilt at its start
    resumed = RatioBatchSampler(mixed, batch_size=10, synthetic_ratio=fresh, seed=1, consumer="again")
    resumed.load_state_dict(state)
    assert float(resumed.ratio()) == 0.4 and fresh.state_dict() == ctrl.state_dict()


# ---------------------------------------------------------------------------------- the controller
def simulated_run(seed, *, noise, n=60, peak=0.3, start=0.1):
    """A reward whose gain per step peaks at ``peak`` (+ a trend that shrinks as 'training' goes
    on, + Gaussian noise); returns the centre after each observation."""
    rng = random.Random(seed)
    ctrl = AdaptiveRatio({"Shirt": start}, min_ratio=0.0, max_ratio=0.5, step=0.05, interval=10)
    metric, centres = 0.0, []
    for k in range(n):
        r = float(ctrl.ratios()["Shirt"])
        metric += 10 * (0.05 / (1 + k / 10) - (r - peak) ** 2 + rng.gauss(0, noise))
        ctrl.observe(10 * (k + 1), {"Shirt": metric})
        centres.append(ctrl.stats()["classes"]["Shirt"]["centre"])
    return ctrl, centres


@pytest.mark.parametrize("seed", range(8))
def test_controller_converges_to_the_ratio_where_the_reward_peaks(seed):
    """Documented in synthaug.mixing.adaptive: a peak 4 grid steps away is reached within 40
    observations and held within one grid step afterwards (noise below the neighbours' slope)."""
    ctrl, centres = simulated_run(seed, noise=0.005)
    reached = next(i for i, c in enumerate(centres) if abs(c - 0.3) < 1e-9)
    assert reached < 40
    assert all(abs(c - 0.3) <= 0.05 + 1e-9 for c in centres[reached:])
    assert ctrl.stats()["classes"]["Shirt"]["moves"] >= 4


def test_a_loss_is_minimised_and_a_flat_reward_does_not_move_far():
    ctrl = AdaptiveRatio({"Shirt": 0.4}, grid=[0.1, 0.2, 0.3, 0.4, 0.5], mode="min", interval=1, min_pairs=1, z=0.0)
    loss = 10.0
    for step in range(1, 30):
        loss -= 0.01 + 0.1 * (0.5 - float(ctrl.ratios()["Shirt"]))  # a lower ratio lowers the loss faster
        ctrl.observe(step, {"Shirt": loss})
    assert ctrl.stats()["classes"]["Shirt"]["centre"] == 0.1
    moves = []
    for seed in range(50):  # a flat reward (a trend and noise, no ratio effect): the ratio seldom moves
        rng = random.Random(seed)
        flat = AdaptiveRatio({"Shirt": 0.3}, grid=[0.1, 0.2, 0.3, 0.4, 0.5], interval=1)
        level = 0.0
        for step in range(1, 41):
            level += 0.01 / (1 + step / 10) + rng.gauss(0, 0.01)
            flat.observe(step, level)
        moves.append(flat.stats()["classes"]["Shirt"]["moves"])
    assert sum(moves) / len(moves) < 1.5  # 20 rounds each; measured 0.8 moves on average with z = 2


def test_stats_plot_and_state_round_trip(tmp_path):
    ctrl, _ = simulated_run(0, noise=0.005, n=20)
    stats = ctrl.stats()
    assert stats["observations"] == 20 and len(stats["history"]) == 20 and stats["changes"]
    assert {"step", "metrics", "ratios", "centres"} <= set(stats["history"][0])
    png = plot_ratio_trajectory([stats, simulated_run(1, noise=0.005, n=20)[0].stats()], tmp_path / "trajectory.png")
    assert png.stat().st_size > 5_000
    other = AdaptiveRatio({"Shirt": 0.1}, min_ratio=0.0, max_ratio=0.5, step=0.05, interval=10)
    other.load_state_dict(json.loads(json.dumps(ctrl.state_dict())))
    assert other.stats() == stats
    with pytest.raises(ValueError, match="grid"):
        AdaptiveRatio({"Shirt": 0.1}, grid=[0.1, 0.2]).load_state_dict(ctrl.state_dict())


def test_bad_input_is_refused_with_clear_errors(train, two_classes):
    mixed = MixedDataset(Subset(train, range(100)), two_classes)
    with pytest.raises(ValueError, match="non-empty dict"):
        AdaptiveRatio({})
    with pytest.raises(ValueError, match="mode"):
        AdaptiveRatio({"Shirt": 0.1}, mode="up")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        AdaptiveRatio({"Shirt": 0.1}, grid=[0.5, 1.5])
    with pytest.raises(ValueError, match="below 1"):
        RatioBatchSampler(mixed, batch_size=8, synthetic_ratio=AdaptiveRatio({"Shirt": 0.1, "Coat": 0.1}, grid=[0.1, 0.5]))
    with pytest.raises(ValueError, match="classes"):
        RatioBatchSampler(mixed, batch_size=8, synthetic_ratio=AdaptiveRatio({"Shirt": 0.1}), classes=["Coat"])
    with pytest.raises(ValueError, match="Sandal|not|class"):
        RatioBatchSampler(mixed, batch_size=8, synthetic_ratio=AdaptiveRatio({"Gloves": 0.1}))
    ctrl = AdaptiveRatio({"Shirt": 0.1, "Coat": 0.1}, grid=GRID)
    RatioBatchSampler(mixed, batch_size=8, synthetic_ratio=ctrl)
    with pytest.raises(ValueError, match="lack"):
        ctrl.observe(1, {"Shirt": 0.5})
    with pytest.raises(ValueError, match="finite"):
        ctrl.observe(1, {"Shirt": float("nan"), "Coat": 0.1})
    ctrl.observe(5, {SHIRT: 0.5, "Coat": 0.1})  # a class's index is accepted beside its name
    with pytest.raises(ValueError, match="increase"):
        ctrl.observe(5, 0.2)


# ---------------------------------------------------------------------------------- DDP
def test_torchrun_two_ranks_apply_every_change_at_the_same_batch(tmp_path):
    # three classes in turn: each rank's shard of the cache (seq % 2) holds Shirts and Coats
    cache = build_stand_in_cache(tmp_path / "three", 300, classes=["Shirt", "Coat", "T-shirt/top"])
    out = tmp_path / "ddp.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tests.helpers.ddp_adaptive", str(cache.path), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert len(ranks) == 2
    assert ranks[0]["changes"] and ranks[0]["changes"] == ranks[1]["changes"]
    assert ranks[0]["controller"] == ranks[1]["controller"]  # rank 0's decision, though rank 1 saw other metrics
    assert ranks[0]["shapes"] == ranks[1]["shapes"]  # synthetic count of every batch, both epochs
    assert len(ranks[0]["shapes"][0]) == len(ranks[1]["shapes"][0]) > 0
    assert all("rank 0" in r["refused"] and "finite" in r["refused"] for r in ranks)


def test_readme_adaptive_snippet_runs(tmp_path, monkeypatch, train):
    code = readme_python("### A ratio that tunes itself")
    build_stand_in_cache(tmp_path / "cache" / "shirt.lmdb", 100).close()
    monkeypatch.chdir(tmp_path)
    import synthaug.data.fashion_mnist as fm

    monkeypatch.setattr(fm, "FashionMNIST", lambda train=True, **kw: Subset(FashionMNIST(train=train, **kw), range(3000)))
    losses = iter([1.0, 0.9, 0.7, 0.65, 0.5, 0.45, 0.3, 0.28, 0.2, 0.19] * 10)
    namespace = {"shirt_val_loss": lambda: next(losses)}
    exec(compile(code, "README.md#a-ratio-that-tunes-itself", "exec"), namespace)
    sampler = namespace["loader"].batch_sampler
    assert sampler.changes() and sampler.changes()[0]["batch"] == 20  # no workers: the batch after step 20
    assert namespace["ctrl"].stats()["observations"] == len(sampler) // 20


def test_settle_at_ends_probing_at_the_centre():
    ctrl = AdaptiveRatio({"Shirt": 0.25}, grid=[0.1, 0.25, 0.5], interval=10, settle_at=60)
    seen = []
    for k in range(1, 10):
        ctrl.observe(10 * k, {"Shirt": float(k % 3)})
        seen.append(float(ctrl.ratios()["Shirt"]))
    assert seen[:5] != [0.25] * 5  # probing before step 60
    assert seen[5:] == [0.25] * 4 and ctrl.stats()["classes"]["Shirt"]["settled"]  # the centre from step 60 on
    assert ctrl.changes[-1]["step"] == 60 and ctrl.changes[-1]["ratios"] == {"Shirt": 0.25}
    with pytest.raises(ValueError, match="settle_at"):
        AdaptiveRatio({"Shirt": 0.25}, settle_at=-1)
