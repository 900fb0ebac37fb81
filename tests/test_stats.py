"""Statistics of the sweep on constructed cases with known answers."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synthaug.evaluation.stats import bootstrap_ci, describe, paired_comparison, sign_flip_pvalue


def test_describe_known_values():
    d = describe([1.0, 2.0, 3.0, float("nan")])
    assert d == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 3}
    assert describe([0.5])["std"] == 0.0
    assert describe([])["n"] == 0 and math.isnan(describe([])["mean"])


def test_paired_comparison_of_a_known_shift():
    b = np.array([0.2, 0.5, 0.1, 0.7, 0.4])
    d = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    c = paired_comparison(b + d, b, n_boot=20_000)
    assert c["n"] == 5 and c["mean_diff"] == pytest.approx(3.0)
    assert c["std_diff"] == pytest.approx(np.std(d, ddof=1))
    # bootstrap distribution of the mean of 5 draws from {1..5}: sd = sqrt(2/5) ≈ 0.632
    assert 1.6 < c["ci_low"] < 2.0 and 4.0 < c["ci_high"] < 4.4
    # all five differences positive: of the 32 sign patterns only all-plus and all-minus reach |mean| = 3
    assert c["p_sign_flip"] == pytest.approx(2 / 32)
    from scipy.stats import ttest_1samp

    assert c["p_ttest"] == pytest.approx(ttest_1samp(d, 0).pvalue)
    assert (c["wins"], c["losses"], c["ties"]) == (5, 0, 0)


def test_constant_and_null_differences():
    c = paired_comparison([0.5] * 4, [0.3] * 4)
    assert c["ci_low"] == pytest.approx(0.2) and c["ci_high"] == pytest.approx(0.2)
    assert c["p_sign_flip"] == pytest.approx(2 / 16)
    assert math.isnan(c["p_ttest"])  # no spread: the t statistic is undefined
    z = paired_comparison([0.4, 0.6, 0.1], [0.4, 0.6, 0.1])
    assert z["mean_diff"] == 0 and z["p_sign_flip"] == 1.0 and z["ties"] == 3
    sym = paired_comparison([1, -1, 2, -2], [0, 0, 0, 0])
    assert sym["p_sign_flip"] == 1.0


def test_exact_sign_flip_counts_patterns():
    d = np.array([0.3, -0.1, 0.2])
    observed = abs(d.mean())
    expected = np.mean([abs(np.dot(s, d)) / 3 >= observed - 1e-12 for s in itertools.product((1, -1), repeat=3)])
    assert sign_flip_pvalue(d) == pytest.approx(expected)
    assert expected == pytest.approx(4 / 8)  # |mean| >= 0.133 for (+,+,+), (-,-,-), (+,-,+), (-,+,-)


def test_monte_carlo_beyond_exact_range():
    rng = np.random.default_rng(0)
    shifted = rng.normal(1.0, 0.5, size=30)
    assert sign_flip_pvalue(shifted, n_perm=20_000) < 0.001
    centred = np.concatenate([shifted, -shifted])
    assert sign_flip_pvalue(centred, n_perm=20_000) > 0.99


def test_bad_input():
    with pytest.raises(ValueError, match="one length"):
        paired_comparison([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1, 2], confidence=1.5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1, 1, allow_nan=False).filter(lambda v: abs(v) > 1e-6), min_size=1, max_size=8), st.floats(0.1, 10))
def test_sign_flip_pvalue_invariances(diffs, scale):
    d = np.array(diffs)
    p = sign_flip_pvalue(d)
    assert 2 / 2 ** len(d) - 1e-12 <= p <= 1.0
    assert sign_flip_pvalue(-d) == pytest.approx(p)
    assert sign_flip_pvalue(d[::-1]) == pytest.approx(p)
    assert sign_flip_pvalue(d * scale) == pytest.approx(p)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=2, max_size=8))
def test_bootstrap_ci_lies_within_the_data(values):
    low, high = bootstrap_ci(values, n_boot=2000)
    assert min(values) - 1e-12 <= low <= high <= max(values) + 1e-12
