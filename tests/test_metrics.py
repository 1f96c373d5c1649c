"""The PerceiverS metric suite on pieces whose values are known by construction, the
distribution comparisons on samples with known answers, and repetition measures."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from perceiver_music.evaluate import metrics, repetition
from perceiver_music.tokens.performance import Notes


def notes_of(rows) -> Notes:
    """Notes from (start_s, end_s, pitch, velocity) rows."""
    a = np.array(rows, np.float64).reshape(-1, 4)
    return Notes(a[:, 0], a[:, 1], a[:, 2].astype(np.int16), a[:, 3].astype(np.int16))


# At 120 BPM a quarter note lasts 0.5 s: mgeval's length class 2; an eighth (0.25 s) is class 3.
CHROMATIC = notes_of([(0.5 * i, 0.5 * i + 0.5, 60 + i, 80) for i in range(12)])
CHORD = notes_of([(0.25 * k, 0.25 * k + 0.25, p, 70) for k in range(8) for p in (60, 64, 67)])


def test_chromatic_scale():
    f = metrics.piece_features(CHROMATIC)
    assert f["PC"][0] == 12 and f["NC"][0] == 12 and f["PR"][0] == 11
    assert f["PI"][0] == 1.0 and f["IOI"][0] == pytest.approx(0.5)
    np.testing.assert_allclose(f["PCH"], np.full(12, 1 / 12))
    # Each note ends exactly where the next begins: 11 transitions k -> k + 1, nothing else.
    expected = np.zeros((12, 12))
    expected[np.arange(11), np.arange(1, 12)] = 1
    np.testing.assert_array_equal(f["PCTM"].reshape(12, 12), expected)
    assert f["NLH"][2] == 1.0 and f["NLH"].sum() == pytest.approx(1.0)
    nltm = np.zeros((12, 12))
    nltm[2, 2] = 11
    np.testing.assert_array_equal(f["NLTM"].reshape(12, 12), nltm)
    # 64 segments of 6 s / 64: note i starts in segment floor(0.5 i * 64 / 6).
    segs = [math.floor(0.5 * i * 64 / 6) for i in range(12)]
    expected_nc = np.zeros(64)
    expected_nc[segs] = 1
    np.testing.assert_array_equal(f["NC/seg"], expected_nc)
    np.testing.assert_array_equal(f["PC/seg"], expected_nc)
    np.testing.assert_array_equal(f["IOI/seg"], np.zeros(64))  # one onset per segment: no interval
    pch_seg = f["PCH/seg"].reshape(64, 12)
    for i, s in enumerate(segs):
        assert pch_seg[s, i] == 1.0 and pch_seg[s].sum() == 1.0


def test_repeated_chord():
    f = metrics.piece_features(CHORD)
    assert f["PC"][0] == 3 and f["NC"][0] == 24 and f["PR"][0] == 7
    np.testing.assert_allclose(f["PCH"][[0, 4, 7]], [1 / 3] * 3)
    # Onset order 60 64 67 60 64 67 ...: intervals 4, 3, 7 repeating, 23 of them.
    assert f["PI"][0] == pytest.approx((7 * (4 + 3 + 7) + 4 + 3) / 23)
    assert f["IOI"][0] == pytest.approx(1.75 / 23)  # chords count their zero gaps, as in mgeval
    assert f["NLH"][3] == 1.0
    # Every chord ends where the next starts: each of its three classes goes to each of three,
    # seven times.
    pctm = f["PCTM"].reshape(12, 12)
    assert pctm[np.ix_([0, 4, 7], [0, 4, 7])].tolist() == [[7] * 3] * 3 and pctm.sum() == 63


def test_fixed_rhythm_segments():
    # Sixteenths (0.125 s at 120 BPM) for 8 s: every segment of 0.125 s holds exactly one onset.
    rng = np.random.default_rng(0)
    piece = notes_of([(0.125 * i, 0.125 * i + 0.125, int(rng.integers(40, 90)), 64) for i in range(64)])
    f = metrics.piece_features(piece)
    assert f["IOI"][0] == pytest.approx(0.125) and f["NLH"][4] == 1.0
    np.testing.assert_array_equal(f["NC/seg"], np.ones(64))
    # With 8 segments each holds eight onsets 0.125 s apart.
    f8 = metrics.piece_features(piece, segments=8)
    np.testing.assert_allclose(f8["IOI/seg"], np.full(8, 0.125))
    np.testing.assert_array_equal(f8["NC/seg"], np.full(8, 8))


def test_a_piece_without_notes_is_refused():
    with pytest.raises(ValueError, match="no notes"):
        metrics.piece_features(Notes.empty())


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 60), st.integers(1, 12), st.integers(21, 108)), min_size=1, max_size=40)
)
def test_pitch_class_transitions_match_the_full_distance_matrix(rows):
    # Times on a 25 ms grid so many ends fall exactly 50 ms from onsets, where float noise would
    # decide a plain test; in grid units the strict |end - onset| < 50 ms is exact: < 2.
    piece = notes_of([(0.025 * s, 0.025 * (s + d), p, 80) for s, d, p in rows])
    reference = np.zeros((12, 12))
    for s_i, d_i, p_i in rows:
        for s_j, _, p_j in rows:
            if abs(s_i + d_i - s_j) < 2:
                reference[p_i % 12, p_j % 12] += 1
    np.testing.assert_array_equal(metrics.pitch_class_transitions(piece), reference)


# ---------------------------------------------------------------- comparing distributions


def test_identical_samples_overlap_fully():
    x = np.random.default_rng(0).gamma(2.0, 1.0, 500)
    r = metrics.compare_distributions(x, x.copy())
    assert r["overlap"] == pytest.approx(1.0, abs=1e-9) and r["kl"] == pytest.approx(0.0, abs=1e-9)


def test_disjoint_samples_do_not_overlap():
    rng = np.random.default_rng(1)
    r = metrics.compare_distributions(rng.normal(0, 1, 400), rng.normal(100, 1, 400))
    assert r["overlap"] < 1e-6 and r["kl"] > 100 and math.isfinite(r["kl"])


def test_two_gaussians_give_the_analytic_answer():
    # KDEs of N(0,1) and N(1,1) samples are (nearly) N(0, 1+h^2) and N(1, 1+h^2), h Scott's factor.
    n = 20_000
    rng = np.random.default_rng(2)
    var = 1 + n ** (-2 / 5)
    r = metrics.compare_distributions(rng.normal(0, 1, n), rng.normal(1, 1, n))
    assert r["kl"] == pytest.approx(1 / (2 * var), abs=0.02)
    assert r["overlap"] == pytest.approx(2 * norm.cdf(-0.5 / math.sqrt(var)), abs=0.02)


def test_binned_density_matches_the_kernel_sum():
    rng = np.random.default_rng(4)
    sample = np.concatenate([rng.normal(0, 1, 300), rng.normal(6, 0.5, 100)])
    density = metrics.Density.fit(sample, scale=10)
    grid = np.linspace(-6, 12, 2048)
    z = (grid[:, None] - sample[None, :]) / density.bandwidth
    exact = np.exp(-0.5 * z * z).sum(axis=1) / (len(sample) * density.bandwidth * math.sqrt(2 * math.pi))
    np.testing.assert_allclose(density(grid), exact, atol=2e-4 * exact.max())


def test_degenerate_samples_do_not_break():
    same = np.full(30, 3.0)
    r = metrics.compare_distributions(same, same)
    assert r["overlap"] == pytest.approx(1.0, abs=1e-6) and r["kl"] == pytest.approx(0.0, abs=1e-6)
    r = metrics.compare_distributions(same, np.full(30, 7.0))
    assert r["overlap"] < 1e-6 and math.isfinite(r["kl"])


def test_compare_sets_identical_sets_are_close_and_different_ones_far():
    rng = np.random.default_rng(3)

    def random_piece(low, high):
        starts = np.sort(rng.uniform(0, 30, 80))
        return metrics.piece_features(
            notes_of([(s, s + rng.uniform(0.1, 1), int(rng.integers(low, high)), 80) for s in starts])
        )

    ref = metrics.stack_features([random_piece(40, 80) for _ in range(12)])
    near = metrics.stack_features([random_piece(40, 80) for _ in range(12)])
    far = metrics.stack_features([random_piece(90, 100) for _ in range(12)])
    close, distant = metrics.compare_sets(near, ref), metrics.compare_sets(far, ref)
    for m in ("PC", "PR", "PCH", "PI"):
        assert close[m]["overlap"] > 0.5 > distant[m]["overlap"], m
        assert close[m]["kl"] < distant[m]["kl"], m
    assert set(close) == set(metrics.METRICS)
    assert close["PC"]["intra_reference"]["n"] == 12 * 11 // 2 and close["PC"]["inter"]["n"] == 144


def test_intra_set_needs_two_pieces():
    with pytest.raises(ValueError, match="at least two"):
        metrics.intra_set_distances(np.zeros((1, 3)))


# ---------------------------------------------------------------- repetition


def test_a_looped_figure_is_repetition_and_a_scale_is_not():
    figure = [60, 62, 64, 67]
    loop = notes_of([(0.2 * i, 0.2 * i + 0.2, figure[i % 4], 80) for i in range(20)])
    mask = repetition.repeated_notes(loop)
    assert mask.tolist() == [False] * 4 + [True] * 16  # every copy after the first
    assert not repetition.repeated_notes(CHROMATIC).any()
    # A period-3 loop (the chord) is found too: all but the first chord.
    assert repetition.repeated_notes(CHORD).sum() == 21
    # The mask follows the order the notes were given in, whatever it is.
    perm = np.random.default_rng(0).permutation(len(loop))
    assert repetition.repeated_notes(loop.take(perm)).tolist() == mask[perm].tolist()


def test_a_repeat_needs_matching_rhythm():
    figure = [60, 62, 64, 67]
    times = np.cumsum([0.2, 0.2, 0.2, 0.2, 0.4, 0.4, 0.4, 0.4])  # same pitches, twice as slow
    piece = notes_of([(t, t + 0.2, figure[i % 4], 80) for i, t in enumerate(times)])
    assert not repetition.repeated_notes(piece)[5:].any()


def test_repetition_profile_locates_the_loop():
    # Ten seconds of a scale-like walk, then ten seconds of a looped figure.
    walk = [(0.25 * i, 0.25 * i + 0.25, 40 + (i * 7) % 40, 80) for i in range(40)]
    loop = [(10 + 0.25 * i, 10 + 0.25 * i + 0.25, [60, 62, 64, 67][i % 4], 80) for i in range(40)]
    profile = repetition.repetition_profile(notes_of(walk + loop), segments=2)
    assert profile["per_segment"][0] == 0 and profile["per_segment"][1] == pytest.approx(36 / 10)
    assert profile["repeated_per_second"] == pytest.approx(36 / 20)


def test_token_autocorrelation():
    x = np.tile([1, 5], 200)  # alternating: -1 at odd lags, +1 at even ones (less the edge)
    r = repetition.token_autocorrelation(x, max_lag=4)
    n = len(x)
    np.testing.assert_allclose(r, [-(n - 1) / n, (n - 2) / n, -(n - 3) / n, (n - 4) / n])
    rng = np.random.default_rng(0)
    assert np.abs(repetition.token_autocorrelation(rng.integers(0, 100, 20_000), 8)).max() < 0.05
    assert np.isnan(repetition.token_autocorrelation(np.full(100, 7), 4)).all()
    assert np.isnan(repetition.token_autocorrelation(np.arange(3), 4)).all()


# ------------------------------------------------ the KL divergence against scipy's exact KDE


def scipy_kl(a: np.ndarray, b: np.ndarray, points: int = 2048) -> float:
    """KL(a || b) from scipy's gaussian_kde (exact kernel sums, logpdf in log space) on the grid
    and with the bandwidths that compare_distributions uses."""
    from scipy.integrate import trapezoid
    from scipy.special import logsumexp
    from scipy.stats import gaussian_kde

    scale = float(max(np.abs(a).max(), np.abs(b).max()))
    da, db = metrics.Density.fit(a, scale), metrics.Density.fit(b, scale)
    grid = metrics.shared_grid(da, db, points)
    log_p = gaussian_kde(a, bw_method=da.bandwidth / a.std(ddof=1)).logpdf(grid)
    log_q = gaussian_kde(b, bw_method=db.bandwidth / b.std(ddof=1)).logpdf(grid)
    log_w = np.log(np.full(points, grid[1] - grid[0]) * np.r_[0.5, np.ones(points - 2), 0.5])
    log_p -= logsumexp(log_p + log_w)
    log_q -= logsumexp(log_q + log_w)
    return float(trapezoid(np.exp(log_p) * (log_p - log_q), grid))


RNG = np.random.default_rng(7)
KL_CASES = {
    # b's density is tiny, not zero, where a lives: the tails decide the KL.
    "far apart": (RNG.normal(0, 1, 300), RNG.normal(20, 1, 300)),
    "one wider": (RNG.normal(0, 1, 1000), RNG.normal(0, 3, 1000)),
    "shifted": (RNG.normal(0, 1, 2000), RNG.normal(1, 1, 2000)),
    "a few outliers": (RNG.gamma(2, 1, 1000), np.r_[RNG.gamma(2, 1.2, 1000), RNG.normal(40, 1, 5)]),
    "narrow against wide": (RNG.normal(5, 0.1, 200), RNG.normal(5, 2, 200)),
}


@pytest.mark.parametrize("case", list(KL_CASES))
def test_kl_matches_scipys_kde(case):
    a, b = KL_CASES[case]
    want = scipy_kl(a, b)
    assert math.isfinite(want)
    assert metrics.compare_distributions(a, b)["kl"] == pytest.approx(want, rel=2e-3, abs=1e-4)


def test_log_density_in_the_tails_matches_scipy():
    from scipy.stats import gaussian_kde

    sample = np.random.default_rng(9).normal(0, 1, 500)
    density = metrics.Density.fit(sample, scale=4)
    grid = np.linspace(-40, 40, 2048)
    want = gaussian_kde(sample, bw_method=density.bandwidth / sample.std(ddof=1)).logpdf(grid)
    assert want.min() < -1000  # far beyond float64's smallest density
    np.testing.assert_allclose(density.log_on_grid(grid), want, rtol=2e-3, atol=1e-3)
