"""The step table's 95 % intervals (pcm.eval.intervals) against exact answers and simulated coverage."""

import math

import numpy as np
import pytest

from pcm.eval.fid import FeatureStats, fid
from pcm.eval.intervals import (
    bootstrap_fid,
    bootstrap_mean,
    centred_interval,
    cluster_labels,
    resample_counts,
    weighted_mean_cov,
)


def test_the_bootstrap_of_a_mean_is_the_direct_computation():
    """The same draws done by hand: P prompts with replacement, the mean of their values, numpy's percentiles."""
    values = np.array([0.3, 1.7, -2.0, 4.5, 0.0, 2.2, 9.1])
    groups = np.arange(7)
    got = bootstrap_mean(values, groups, 500, seed=11)
    rng = np.random.default_rng(11)
    counts = rng.multinomial(7, np.full(7, 1 / 7), size=500)
    means = np.array([np.repeat(values, c).mean() for c in counts])
    assert (got.low, got.high) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])), rel=1e-12)
    assert got.clusters == 7


def test_two_values_give_the_whole_range_and_constants_a_point():
    """Means of two prompts {0, 1} resampled: 0, 1/2, 1 with probability 1/4, 1/2, 1/4: the 2.5 % and 97.5 %
    quantiles are 0 and 1 exactly. A constant metric has a zero-width interval."""
    got = bootstrap_mean(np.array([0.0, 1.0]), np.array([0, 1]), 2000, seed=0)
    assert (got.low, got.high) == (0.0, 1.0)
    flat = bootstrap_mean(np.full(10, 0.25), np.arange(10), 300, seed=0)
    assert (flat.low, flat.high) == (0.25, 0.25)


def test_seeds_of_one_prompt_move_together():
    """Clusters are prompts: two seeds of a prompt with opposite values cancel, so the per-prompt means (all 0.5)
    have no spread, while resampling the samples one by one would spread."""
    values = np.array([0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    groups = cluster_labels(8, 4)
    assert list(groups) == [0, 0, 1, 1, 2, 2, 3, 3]
    clustered = bootstrap_mean(values, groups, 400, seed=3)
    assert (clustered.low, clustered.high) == pytest.approx((0.5, 0.5))
    assert bootstrap_mean(values, np.arange(8), 400, seed=3).high > 0.6


def test_the_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    trials, hits = 400, 0
    for t in range(trials):
        sample = rng.exponential(2.0, size=60)  # skewed, true mean 2
        interval = bootstrap_mean(sample, np.arange(60), 1000, seed=t)
        hits += interval.low <= 2.0 <= interval.high
    assert 0.90 <= hits / trials <= 0.985  # percentile intervals undercover a little at N = 60 (~0.93-0.94)


def test_one_prompt_gives_an_undefined_interval_not_a_crash_nor_a_false_certainty():
    for interval in (bootstrap_mean(np.array([0.7, 0.9]), np.array([0, 0]), 100, seed=0),
                     bootstrap_fid(np.ones((2, 3)), np.array([0, 0]), (np.zeros(3), np.eye(3)), 100, seed=0),
                     bootstrap_mean(np.array([0.7, 0.9]), np.array([0, 1]), 0, seed=0)):  # resamples 0: off
        assert math.isnan(interval.low) and math.isnan(interval.high)


def test_the_same_seed_gives_the_same_interval_and_draws_are_counts():
    counts = resample_counts(5, 50, seed=9)
    assert counts.shape == (50, 5) and (counts.sum(1) == 5).all()
    assert (counts == resample_counts(5, 50, seed=9)).all()
    x = np.random.default_rng(1).normal(size=(30, 4))
    assert bootstrap_fid(x, np.arange(30), (np.zeros(4), np.eye(4)), 50, seed=2) == \
        bootstrap_fid(x, np.arange(30), (np.zeros(4), np.eye(4)), 50, seed=2)


def test_weighted_statistics_equal_those_of_the_repeated_rows():
    x = np.random.default_rng(2).normal(size=(6, 3))
    weights = np.array([0.0, 2.0, 1.0, 0.0, 3.0, 0.0])
    stats = FeatureStats()
    stats.update(np.repeat(x, weights.astype(int), axis=0))
    mu, cov = weighted_mean_cov(x, weights)
    expected_mu, expected_cov = stats.mean_cov()
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-12)
    np.testing.assert_allclose(cov, expected_cov, rtol=1e-10, atol=1e-12)


def test_fid_of_identical_paired_sets_stays_at_zero_and_intervals_shrink_with_n():
    """FID-teacher resamples the same prompts on both sides: a model identical to the teacher has [0, 0]. Against a
    fixed set the interval narrows roughly as 1 / sqrt(N)."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(80, 5))
    same = bootstrap_fid(x, np.arange(80), x.copy(), 200, seed=0)
    assert same.high == pytest.approx(0.0, abs=1e-9) and same.low == 0.0
    reference = (np.full(5, 0.5), np.eye(5))
    widths = []
    for n in (50, 800):
        sample = rng.normal(size=(n, 5))
        interval = bootstrap_fid(sample, np.arange(n), reference, 300, seed=0)
        stats = FeatureStats()
        stats.update(sample)
        assert interval.low <= fid(stats, reference) <= interval.high
        widths.append(interval.high - interval.low)
    assert widths[1] < widths[0] / 2


def test_the_fid_interval_covers_the_expected_fid_at_this_n():
    """What the shifted interval claims: where FID at this N would land with another prompt set of the same size.
    E[FID_N] from 2000 Monte Carlo sets; 4-d features with a mean shift of 0.5 (true FID 1.0, E[FID_40] ~ 1.24)."""
    rng = np.random.default_rng(5)
    reference, n = (np.zeros(4), np.eye(4)), 40

    def one_fid(sample):
        stats = FeatureStats()
        stats.update(sample)
        return fid(stats, reference)

    expected = np.mean([one_fid(rng.normal(size=(n, 4)) + 0.5) for _ in range(2000)])
    trials, hits = 200, 0
    for t in range(trials):
        interval = bootstrap_fid(rng.normal(size=(n, 4)) + 0.5, np.arange(n), reference, 300, seed=t)
        hits += interval.low <= expected <= interval.high
    assert 0.88 <= hits / trials <= 0.99


def test_the_centred_interval_is_the_percentile_one_moved_by_the_bias():
    statistics = np.array([3.0, 4.0, 5.0, 6.0, 7.0])  # mean 5; point 2: bias 3
    low, high = centred_interval(statistics, 2.0, level=0.5)  # quartiles 4 and 6
    assert (low, high) == (1.0, 3.0)
    assert centred_interval(statistics, 0.5, level=0.5) == (0.0, 1.5)  # a distance: clipped at 0


def test_cluster_labels_need_equal_counts_per_prompt():
    assert list(cluster_labels(6, 2)) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="7 observations do not split evenly over 2 prompts"):
        cluster_labels(7, 2)


@pytest.mark.parametrize("paired", [False, True])
def test_the_gram_path_for_few_samples_in_many_dimensions_is_the_same_fid(paired):
    """n < D (2048-d Inception at small N) goes through n x n matrices: the same numbers as the D x D path."""
    from pcm.eval import intervals

    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(12, 40)), rng.normal(size=(12, 40)) + 0.2
    fixed = (rng.normal(size=40), np.cov(rng.normal(size=(100, 40)), rowvar=False))
    weights = np.array([0, 2, 1, 0, 3, 1, 1, 0, 2, 1, 1, 0], dtype=np.float64)
    other = y if paired else fixed
    direct = intervals._fd(*weighted_mean_cov(x, weights), *(weighted_mean_cov(y, weights) if paired else fixed), None)
    gram = intervals.GramFID(x, other)(weights)
    assert gram == pytest.approx(direct, rel=1e-6)  # the D x D path clips ~1e-14 eigenvalues of a rank-11 product
    stats = FeatureStats()
    stats.update(x)
    interval = bootstrap_fid(x, np.arange(12), other, 100, seed=0)  # takes the Gram path (12 < 40)
    assert interval.low <= fid(stats, (fid_stats(y) if paired else fixed)) <= interval.high


def fid_stats(x):
    stats = FeatureStats()
    stats.update(x)
    return stats


def test_the_step_tables_point_fid_takes_the_gram_path_below_d_samples_and_agrees():
    """A row's fid and fid_teacher from its kept samples (n < D: no D x D decomposition) equal the running-statistics
    FID; at n >= D the running statistics are used (None)."""
    from pcm.eval.intervals import sampled_fid

    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(10, 64)), rng.normal(size=(10, 64)) * 1.3 + 0.1
    fixed = (rng.normal(size=64), np.cov(rng.normal(size=(300, 64)), rowvar=False))
    assert sampled_fid(x, fixed) == pytest.approx(fid(fid_stats(x), fixed), rel=1e-6)
    assert sampled_fid(x, y) == pytest.approx(fid(fid_stats(x), fid_stats(y)), rel=1e-6)
    assert sampled_fid(x, x) == pytest.approx(0.0, abs=1e-9)
    assert sampled_fid(x + 300.0, y + 300.0) == pytest.approx(sampled_fid(x, y), rel=1e-6)  # a common offset: none
    assert sampled_fid(rng.normal(size=(64, 64)), fixed) is None
