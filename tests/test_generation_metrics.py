"""Generation metrics: FID (pytorch-fid reference values and hand cases), Inception Score,
improved precision/recall, FID statistics files."""

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mmgen_jax import metrics

FRECHET_CASES = Path(__file__).resolve().parent / 'data' / 'frechet_cases.safetensors'


# ---- Fréchet distance -------------------------------------------------------------


@pytest.fixture(scope='module')
def cases():
  return load_file(FRECHET_CASES)


@pytest.mark.parametrize('case,rtol', [('gauss', 1e-6), ('singular', 1e-5)])
def test_fid_from_features_matches_pytorch_fid(cases, case, rtol):
  got = metrics.fid_from_features(cases[f'inputs/fd_{case}_feats1'],
                                  cases[f'inputs/fd_{case}_feats2'])
  assert got == pytest.approx(float(cases[f'outputs/fid_value_{case}'][0]), rel=rtol)


def test_fid_of_a_set_with_itself_is_zero(cases):
  feats = cases['inputs/fd_gauss_feats1']
  assert abs(metrics.fid_from_features(feats, feats)) < 1e-6
  assert abs(float(cases['outputs/fid_value_same'][0])) < 1e-6


def test_frechet_distance_of_singular_diagonal_covariances():
  # Commuting covariances: d² = |Δmu|² + Σ (√a − √b)², zero variances included.
  a, b = np.array([4.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0])
  d = metrics.frechet_distance(np.array([1.0, 2.0, 0.0]), np.diag(a), np.zeros(3), np.diag(b))
  assert d == pytest.approx(5.0 + 1.0 + 0.0 + 1.0, abs=1e-12)
  assert metrics.frechet_distance(np.zeros(3), np.zeros((3, 3)), np.zeros(3),
                                  np.zeros((3, 3))) == 0.0


def test_frechet_distance_of_low_rank_covariances():
  # Rank 3 in 8 dims: σ1σ2 is singular and non-symmetric; its eigenvalues are real and
  # non-negative, and Tr √(σ1σ2) is the sum of their roots.
  rng = np.random.default_rng(0)
  f1, f2 = rng.normal(size=(8, 3)), rng.normal(size=(8, 3))
  s1, s2 = f1 @ f1.T, f2 @ f2.T
  mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
  eig = np.linalg.eigvals(s1 @ s2)
  tr_sqrt = np.sum(np.sqrt(np.maximum(eig.real, 0.0)))
  ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
  assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)


# ---- Inception Score ------------------------------------------------------------------


def test_inception_score_of_uniform_predictions_is_one():
  for x in (np.full((20, 7), 1 / 7), np.zeros((20, 7))):  # probabilities, equal logits
    mean, std = metrics.inception_score(x, splits=4)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_one_hot_distinct_classes_is_the_class_count():
  # 10 splits of 4 samples, each split predicting 4 distinct classes with certainty.
  labels = np.array([(s * 3 + j) % 10 for s in range(10) for j in range(4)])
  probs = np.eye(10)[labels]
  assert metrics.inception_score(probs, splits=10) == pytest.approx((4.0, 0.0), abs=1e-12)
  mean, _ = metrics.inception_score(60.0 * probs, splits=10)  # as logits
  assert mean == pytest.approx(4.0, rel=1e-9)
  # Two splits: 2 then 4 distinct classes -> scores 2 and 4.
  uneven = np.eye(6)[[0, 1, 0, 1, 2, 3, 4, 5]]
  assert metrics.inception_score(uneven, splits=2) == pytest.approx((3.0, 1.0), abs=1e-12)


def test_inception_score_hand_computed_kl():
  p = np.array([[0.5, 0.5], [1.0, 0.0]])
  marginal = np.array([0.75, 0.25])
  kl = [0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25), np.log(1 / 0.75)]
  assert marginal.tolist() == p.mean(0).tolist()
  assert metrics.inception_score(p, splits=1)[0] == pytest.approx(np.exp(np.mean(kl)), rel=1e-12)


def test_inception_score_rejects_bad_input():
  with pytest.raises(ValueError, match='need 1 <= splits <= N'):
    metrics.inception_score(np.eye(3), splits=4)
  with pytest.raises(ValueError, match='do not sum to 1'):
    metrics.inception_score(np.ones((4, 3)), splits=1, inputs='probs')


# ---- precision / recall -------------------------------------------------------------


def test_knn_radii_match_brute_force_in_blocks():
  x = np.random.default_rng(1).normal(size=(37, 5))
  d = ((x[:, None] - x[None]) ** 2).sum(-1)
  want = np.sort(d, axis=1)[:, 3]  # column 0 is the point itself
  for block in (4, 7, 2048):
    np.testing.assert_allclose(metrics.knn_radii(x, 3, block=block, dtype=np.float64), want,
                               rtol=1e-12, atol=1e-12)


def test_precision_recall_identical_and_disjoint_sets():
  x = np.random.default_rng(2).normal(size=(50, 16))
  assert metrics.precision_recall(x, x, k=3) == (1.0, 1.0)
  assert metrics.precision_recall(x, x + 1000.0, k=3) == (0.0, 0.0)


def test_precision_recall_constructed_fractions():
  # Real: 0..9 on a line (k=1 radius 1 each). Fake: 0.5 and 3.2 lie in real balls,
  # 20 and 30 do not -> precision 1/2. Fake k=1 radii: 2.7, 2.7, 10, 10; the real
  # points within 2.7 of 0.5 or 3.2 are 0..5 -> recall 6/10.
  line = lambda v: np.stack([np.asarray(v, float), np.zeros(len(v))], axis=1)
  real, fake = line(range(10)), line([0.5, 3.2, 20.0, 30.0])
  for block in (3, 2048):
    assert metrics.precision_recall(real, fake, k=1, block=block) == pytest.approx((0.5, 0.6))
  with pytest.raises(ValueError, match='1 <= k < N'):
    metrics.precision_recall(real, fake, k=4)


def test_precision_recall_ball_boundary_counts_as_inside():
  # Real 0, 1, 3 (k=1 radii 1, 1, 2); fake 5 lies exactly on the ball of 3 (integer
  # squared distances are exact) and counts as inside (<=, as the reference code).
  line = lambda v: np.stack([np.asarray(v, float), np.zeros(len(v))], axis=1)
  precision, _ = metrics.precision_recall(line([0, 1, 3]), line([5, 40]), k=1)
  assert precision == 0.5


# ---- statistics files -----------------------------------------------------------------


def test_statistics_round_trip_and_other_layouts(tmp_path):
  rng = np.random.default_rng(3)
  mu, sigma = rng.normal(size=4), np.eye(4) * 2.0
  ours = tmp_path / 'ours.npz'
  metrics.save_statistics(ours, mu, sigma)
  got_mu, got_sigma = metrics.load_statistics(ours)
  np.testing.assert_array_equal(got_mu, mu)
  np.testing.assert_array_equal(got_sigma, sigma)
  # pytorch-fid's file: mu, sigma (float32 here), read as float64.
  np.savez(tmp_path / 'pytorch_fid.npz', mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
  assert metrics.load_statistics(tmp_path / 'pytorch_fid.npz')[1].dtype == np.float64
  # ADM evaluator's reference batch: images plus pool and spatial statistics.
  np.savez(tmp_path / 'adm_ref.npz', arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu, sigma=sigma,
           mu_s=mu[:2], sigma_s=np.eye(2))
  np.testing.assert_array_equal(metrics.load_statistics(tmp_path / 'adm_ref.npz')[0], mu)
  np.testing.assert_array_equal(metrics.load_statistics(tmp_path / 'adm_ref.npz', spatial=True)[1],
                                np.eye(2))
  np.savez(tmp_path / 'adm_samples.npz', arr_0=np.zeros((2, 8, 8, 3), np.uint8))
  with pytest.raises(KeyError, match="only arr_0"):
    metrics.load_statistics(tmp_path / 'adm_samples.npz')
  np.savez(tmp_path / 'bad.npz', mu=mu, sigma=np.eye(3))
  with pytest.raises(ValueError, match=r'sigma \(D, D\); got \(4,\) and \(3, 3\)'):
    metrics.load_statistics(tmp_path / 'bad.npz')
