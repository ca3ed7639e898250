"""Metric math on cases with known answers (admrt.evaluation.metrics)."""
import numpy as np
import pytest

from admrt.evaluation.metrics import (FIDStatistics, frechet_distance, inception_score, manifold_radii,
                                      pairwise_sq_distances, precision_recall, trace_sqrt_product)


def _rotation(d, rng):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_fid_identical_sets_is_zero(method):
    x = np.random.default_rng(0).normal(size=(400, 12)) @ np.random.default_rng(1).normal(size=(12, 12))
    s = FIDStatistics.from_features(x)
    assert abs(frechet_distance(s, s, method=method)) < 1e-8


def test_fid_two_gaussians_closed_form():
    # Covariances with the same eigenvectors: tr((S1 S2)^1/2) = sum sqrt(a_i b_i), so
    # FID = |m1 - m2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(2)
    d = 10
    q = _rotation(d, rng)
    a, b = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    s1 = FIDStatistics(m1, q @ np.diag(a) @ q.T)
    s2 = FIDStatistics(m2, q @ np.diag(b) @ q.T)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(s1, s2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(s1, s2, method="sqrtm") == pytest.approx(expected, rel=1e-8)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
    assert frechet_distance(FIDStatistics(np.array([1.0]), np.array([[4.0]])),
                            FIDStatistics(np.array([-2.0]), np.array([[9.0]]))) == pytest.approx(9 + 1)


def test_fid_from_samples_approaches_closed_form():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200_000, 3)) * [1.0, 2.0, 0.5]
    y = rng.normal(size=(200_000, 3)) * [1.0, 1.0, 1.0] + [1.0, 0.0, 0.0]
    expected = 1.0 + 0 + 1.0 + 0.25
    fid = frechet_distance(FIDStatistics.from_features(x), FIDStatistics.from_features(y))
    assert fid == pytest.approx(expected, abs=0.03)


def test_trace_sqrt_matches_scipy_on_general_and_singular_covariances():
    from scipy import linalg
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(20, 8)), rng.normal(size=(20, 8))
    s1, s2 = a.T @ a, b.T @ b
    assert trace_sqrt_product(s1, s2) == pytest.approx(np.trace(linalg.sqrtm(s1 @ s2)).real, rel=1e-8)
    # N < D: rank-deficient covariances; the eigen path stays finite and symmetric.
    few1 = FIDStatistics.from_features(rng.normal(size=(5, 32)))
    few2 = FIDStatistics.from_features(rng.normal(size=(5, 32)))
    d12, d21 = frechet_distance(few1, few2), frechet_distance(few2, few1)
    assert np.isfinite(d12) and d12 > 0 and d12 == pytest.approx(d21, rel=1e-8)
    assert abs(frechet_distance(few1, few1)) < 1e-8


def test_fid_dimension_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(FIDStatistics(np.zeros(3), np.eye(3)), FIDStatistics(np.zeros(4), np.eye(4)))


def test_inception_score_known_values():
    assert inception_score(np.zeros((100, 10))) == pytest.approx(1.0)         # uniform p(y|x)
    confident = 60.0 * np.eye(10)[np.arange(100) % 10]                       # one-hot, balanced
    assert inception_score(confident) == pytest.approx(10.0, rel=1e-6)
    # Two classes: p(y|x) = (a, 1-a) or (1-a, a), alternating, so every split's marginal is
    # (1/2, 1/2): IS = exp(a log 2a + (1-a) log 2(1-a)).
    a = 0.8
    probs = np.where(np.arange(20)[:, None] % 2 == 0, [a, 1 - a], [1 - a, a])
    expected = np.exp(a * np.log(2 * a) + (1 - a) * np.log(2 * (1 - a)))
    assert inception_score(np.log(probs), num_splits=10) == pytest.approx(expected, rel=1e-10)


def test_inception_score_splits_follow_the_reference():
    # Split-wise: the first half all class 0, the second all class 1 -> each split has IS 1
    # with 2 splits, but 2 over one split.
    logits = 50.0 * np.eye(2)[np.repeat([0, 1], 10)]
    assert inception_score(logits, num_splits=2) == pytest.approx(1.0)
    assert inception_score(logits, num_splits=1) == pytest.approx(2.0, rel=1e-6)


def test_pairwise_and_radii_match_brute_force():
    import torch
    rng = np.random.default_rng(5)
    x = rng.normal(size=(57, 6)).astype(np.float32)
    d = ((x[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)
    got = pairwise_sq_distances(torch.from_numpy(x), torch.from_numpy(x)).numpy()
    assert np.allclose(got, d, atol=1e-4)
    expected = np.sort(d, axis=1)[:, 3]                                       # self is the 0-th
    for bs in (8, 57, 1000):
        assert np.allclose(manifold_radii(x, k=3, batch_size=bs), expected, rtol=1e-4, atol=1e-4)


def test_precision_recall_on_constructed_points():
    # 1-D. Reference 0..9: squared k=3 radii are 9 at the ends and 4 in the middle. Samples
    # 4.5, 5.5, 6.5, 7.5 lie inside; the outlier 100 does not -> precision 4/5. The outlier's
    # own radius (94.5^2) covers reference points 6..9, the others cover 2..8 -> recall 8/10.
    ref = np.arange(10, dtype=np.float32)[:, None]
    sam = np.array([4.5, 5.5, 6.5, 7.5, 100.0], dtype=np.float32)[:, None]
    assert manifold_radii(ref, k=3).tolist() == [9, 4, 4, 4, 4, 4, 4, 4, 4, 9]
    for bs in (2, 3, 4096):
        p, r = precision_recall(ref, sam, k=3, batch_size=bs)
        assert (p, r) == (pytest.approx(0.8), pytest.approx(0.8))
    # Identical sets: everything is inside.
    assert precision_recall(ref, ref, k=3) == (1.0, 1.0)
    # Disjoint far-apart sets: nothing is.
    assert precision_recall(ref, ref + 1000.0, k=3) == (0.0, 0.0)


def test_precision_recall_errors():
    with pytest.raises(ValueError, match="more than k=3"):
        manifold_radii(np.zeros((3, 2)), k=3)
    with pytest.raises(ValueError, match="D=2"):
        precision_recall(np.zeros((10, 2)), np.zeros((10, 3)))
