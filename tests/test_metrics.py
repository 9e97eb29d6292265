"""Metric math against hand-computed cases and the pytorch-fid reference values."""

import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from mmgen_jax import metrics


def test_depth_alignment_recovers_affine_prediction():
  rng = np.random.default_rng(0)
  gt = rng.uniform(1.0, 10.0, size=(3, 8, 8))
  pred = (gt - 4.0) / 3.0  # an affine transform of the truth, per-image exact
  m = metrics.depth_metrics(pred, gt)
  assert m['depth/abs_rel'] < 1e-9
  assert m['depth/delta1'] == 1.0
  assert metrics.depth_metrics(pred, gt, align=False)['depth/abs_rel'] > 0.5


def test_depth_metrics_known_values():
  gt = np.full((1, 2, 2), 2.0)
  pred = np.array([[[2.0, 2.0], [2.0, 3.0]]])
  m = metrics.depth_metrics(pred, gt, align=False)
  assert m['depth/abs_rel'] == pytest.approx(0.125)
  assert m['depth/delta1'] == pytest.approx(0.75)   # 3/2 = 1.5 fails the 1.25 test
  assert m['depth/rmse'] == pytest.approx(0.5)


def test_unnormalize_depth_inverts_affine_normalisation():
  depth = np.array([[[1.0, 3.0], [2.0, 5.0]]])
  lo, hi = depth.min(), depth.max()
  norm = (depth - lo) / (hi - lo) * 2 - 1
  np.testing.assert_allclose(metrics.unnormalize_depth(norm, [lo], [hi]), depth)


def test_normal_angles():
  gt = np.array([[0.0, 0.0, -1.0]] * 3)
  pred = np.array([[0.0, 0.0, -2.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
  np.testing.assert_allclose(metrics.normal_angles_deg(pred, gt), [0.0, 90.0, 180.0], atol=1e-6)
  m = metrics.normal_metrics(pred, gt)
  assert m['normal/median_deg'] == pytest.approx(90.0)
  assert m['normal/within_11.25'] == pytest.approx(1 / 3)


def test_normal_angles_are_exact_near_zero():
  """float32 unit normals against themselves, and a 0.001° rotation."""
  rng = np.random.default_rng(0)
  gt = rng.normal(size=(1000, 3))
  gt = (gt / np.linalg.norm(gt, axis=-1, keepdims=True)).astype(np.float32)
  np.testing.assert_allclose(metrics.normal_angles_deg(gt, gt), 0.0, atol=1e-6)
  a = np.radians(1e-3)
  turned = np.array([[np.sin(a), 0.0, np.cos(a)]])
  np.testing.assert_allclose(metrics.normal_angles_deg(turned, np.array([[0.0, 0.0, 1.0]])),
                             [1e-3], rtol=1e-6)


def test_segmentation_miou():
  gt = np.array([[0, 0, 1, 1]])
  pred = np.array([[0, 1, 1, 1]])
  m = metrics.segmentation_metrics(pred, gt, num_classes=5)
  # class 0: IoU 1/2, class 1: IoU 2/3; classes 2-4 absent and not averaged.
  assert m['segmentation/miou'] == pytest.approx((1 / 2 + 2 / 3) / 2)
  assert m['segmentation/pixel_acc'] == pytest.approx(0.75)
  with pytest.raises(ValueError, match=r'expected \[0, 1\)'):
    metrics.segmentation_metrics(pred, gt, num_classes=1)


@pytest.mark.parametrize('case', ['gauss', 'singular'])
def test_frechet_distance_matches_pytorch_fid(parity_dir, case):
  d = load_file(os.path.join(parity_dir, 'frechet_cases.safetensors'))
  mu1, s1 = metrics.feature_statistics(d[f'inputs/fd_{case}_feats1'])
  mu2, s2 = metrics.feature_statistics(d[f'inputs/fd_{case}_feats2'])
  ref = float(d[f'outputs/fid_value_{case}'][0])
  assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6 if case == 'gauss' else 1e-5)


def test_frechet_distance_of_identical_statistics_is_zero(parity_dir):
  d = load_file(os.path.join(parity_dir, 'frechet_cases.safetensors'))
  mu, s = metrics.feature_statistics(d['inputs/fd_gauss_feats1'])
  assert abs(metrics.frechet_distance(mu, s, mu, s)) < 1e-6
