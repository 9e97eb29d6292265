"""The metric math: pure numpy functions; the only I/O reads and writes FID statistics.

Conventions follow the dense-prediction literature (Marigold's evaluation):
depth predicted up to an affine transform is aligned to the ground truth by
least squares before AbsRel and δ1; normals are compared by the angle between
unit vectors; segmentation by per-class IoU over classes that occur.
"""

from __future__ import annotations

import os
from typing import Any

from etils import epath
import numpy as np


def _check_same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
  if a.shape != b.shape:
    raise ValueError(f'{what}: prediction shape {a.shape} != ground-truth shape {b.shape}.')


# ---- depth -------------------------------------------------------------------

def align_depth_least_squares(pred: np.ndarray, gt: np.ndarray,
                              valid: np.ndarray | None = None) -> np.ndarray:
  """Per image, the scale s and shift b minimising |s·pred + b − gt|² on valid pixels.

  pred, gt: (N, H, W). Returns s·pred + b, same shape.
  """
  _check_same_shape(pred, gt, 'align_depth_least_squares')
  pred = pred.astype(np.float64)
  gt = gt.astype(np.float64)
  valid = np.ones_like(gt, bool) if valid is None else valid
  out = np.empty_like(pred)
  for i in range(pred.shape[0]):
    p, g = pred[i][valid[i]], gt[i][valid[i]]
    if p.size < 2:
      raise ValueError(f'image {i}: {p.size} valid depth pixels; need at least 2 to align.')
    a = np.stack([p, np.ones_like(p)], axis=1)
    (s, b), *_ = np.linalg.lstsq(a, g, rcond=None)
    out[i] = s * pred[i] + b
  return out


def depth_metrics(pred: np.ndarray, gt: np.ndarray, *, align: bool = True,
                  min_depth: float = 1e-3) -> dict[str, float]:
  """AbsRel, RMSE and δ1 (fraction with max(p/g, g/p) < 1.25) over pixels with gt > min_depth.

  Aligned predictions can come out at or below zero on a few pixels; those are
  counted (`depth/nonpositive_frac`) and floored at min_depth for the ratios.
  """
  _check_same_shape(pred, gt, 'depth_metrics')
  valid = np.isfinite(gt) & (gt > min_depth)
  p = align_depth_least_squares(pred, gt, valid) if align else pred.astype(np.float64)
  p, g = p[valid], gt[valid].astype(np.float64)
  nonpositive = float(np.mean(p <= min_depth))
  p = np.maximum(p, min_depth)
  ratio = np.maximum(p / g, g / p)
  return {
      'depth/abs_rel': float(np.mean(np.abs(p - g) / g)),
      'depth/rmse': float(np.sqrt(np.mean((p - g) ** 2))),
      'depth/delta1': float(np.mean(ratio < 1.25)),
      'depth/nonpositive_frac': nonpositive,
  }


def unnormalize_depth(pred_minus1_1: np.ndarray, depth_min: np.ndarray,
                      depth_max: np.ndarray) -> np.ndarray:
  """Inverse of the per-image affine normalisation to [-1, 1] (for oracle-range evaluation)."""
  lo = np.asarray(depth_min).reshape(-1, 1, 1)
  hi = np.asarray(depth_max).reshape(-1, 1, 1)
  return (pred_minus1_1 + 1.0) / 2.0 * (hi - lo) + lo


# ---- normals -----------------------------------------------------------------

def normal_angles_deg(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
  """Angle in degrees between predicted and true normals, (..., 3) -> (...).

  The lengths do not matter; a zero-length prediction counts as 180°. The angle
  is atan2(|p × g|, p · g): arccos of the cosine loses precision near 0°, where
  float32 unit vectors alone would put a perfect prediction ~0.02° off.
  """
  _check_same_shape(pred, gt, 'normal_angles_deg')
  pred, gt = pred.astype(np.float64), gt.astype(np.float64)
  angle = np.arctan2(np.linalg.norm(np.cross(pred, gt), axis=-1), np.sum(pred * gt, axis=-1))
  return np.degrees(np.where(np.linalg.norm(pred, axis=-1) > 1e-12, angle, np.pi))


def normal_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
  ang = normal_angles_deg(pred, gt).ravel()
  return {
      'normal/mean_deg': float(np.mean(ang)),
      'normal/median_deg': float(np.median(ang)),
      'normal/within_11.25': float(np.mean(ang < 11.25)),
      'normal/within_22.5': float(np.mean(ang < 22.5)),
      'normal/within_30': float(np.mean(ang < 30.0)),
  }


# ---- segmentation ------------------------------------------------------------

def confusion_matrix(pred_ids: np.ndarray, gt_ids: np.ndarray, num_classes: int) -> np.ndarray:
  _check_same_shape(pred_ids, gt_ids, 'confusion_matrix')
  for name, ids in (('prediction', pred_ids), ('ground truth', gt_ids)):
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
      raise ValueError(f'{name} ids span [{ids.min()}, {ids.max()}]; expected [0, {num_classes}).')
  flat = gt_ids.astype(np.int64).ravel() * num_classes + pred_ids.astype(np.int64).ravel()
  return np.bincount(flat, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_metrics(pred_ids: np.ndarray, gt_ids: np.ndarray,
                         num_classes: int) -> dict[str, float]:
  """mIoU over the classes present in prediction or ground truth, and pixel accuracy."""
  cm = confusion_matrix(pred_ids, gt_ids, num_classes).astype(np.float64)
  tp = np.diag(cm)
  union = cm.sum(0) + cm.sum(1) - tp
  present = union > 0
  return {
      'segmentation/miou': float(np.mean(tp[present] / union[present])) if present.any() else 0.0,
      'segmentation/pixel_acc': float(tp.sum() / max(cm.sum(), 1.0)),
  }


# ---- classification ----------------------------------------------------------

def accuracy(logits_or_ids: np.ndarray, labels: np.ndarray) -> float:
  pred = logits_or_ids.argmax(-1) if logits_or_ids.ndim == labels.ndim + 1 else logits_or_ids
  return float(np.mean(pred == labels))


# ---- Fréchet distance (FID) ------------------------------------------------

def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance (N−1 denominator) of (N, D) features, in float64."""
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f'features must be (N >= 2, D); got shape {features.shape}.')
  f = features.astype(np.float64)
  return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((m + m.T) / 2)
  return (v * np.sqrt(np.maximum(w, 0.0))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """d² = |mu1 − mu2|² + Tr(σ1) + Tr(σ2) − 2 Tr((σ1 σ2)^½).

  Tr((σ1 σ2)^½) equals Tr((√σ1 σ2 √σ1)^½), whose argument is symmetric PSD, so
  both roots come from eigendecompositions; eigenvalues a round-off below zero
  are set to zero (covariances are PSD by construction).
  """
  mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
  sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f'statistics disagree: mu {mu1.shape} vs {mu2.shape}, '
                     f'sigma {sigma1.shape} vs {sigma2.shape}.')
  root1 = _sqrt_psd(sigma1)
  inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
  tr_covmean = np.sum(np.sqrt(np.maximum(inner, 0.0)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


# ---- generation metrics: FID from features, Inception Score, precision/recall --

def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """FID of two (N, D) feature sets: `frechet_distance` of their `feature_statistics`."""
  return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def inception_score(logits_or_probs: np.ndarray, splits: int = 10, *,
                    inputs: str = 'auto') -> tuple[float, float]:
  """Inception Score: per split exp(E_x KL(p(y|x) ‖ p(y))), p(y) the split's mean; (mean, std).

  logits_or_probs: (N, C) class logits (softmax taken here) or probabilities;
  `inputs` 'logits', 'probs' or 'auto' (probabilities when every row is
  non-negative and sums to 1 within 1e-3). Split i holds rows
  [i·N // splits, (i+1)·N // splits) and the std is over splits (ddof 0), as in
  improved-GAN's reference code; its 10 splits of 50k images are the ADM
  evaluator's 5000-image splits. The reference logits are the 1008-way
  `pool3 @ W` of the FID Inception, without the fc bias.
  """
  x = np.asarray(logits_or_probs, np.float64)
  if x.ndim != 2 or x.shape[1] < 2:
    raise ValueError(f'inception_score: expected (N, C >= 2) logits or probabilities; got {x.shape}.')
  if not 1 <= splits <= x.shape[0]:
    raise ValueError(f'inception_score: {splits} splits of {x.shape[0]} samples; need 1 <= splits <= N.')
  if inputs not in ('auto', 'logits', 'probs'):
    raise ValueError(f"inception_score: inputs must be 'auto', 'logits' or 'probs'; got {inputs!r}.")
  is_probs = bool(np.all(x >= 0) and np.allclose(x.sum(1), 1.0, atol=1e-3))
  if inputs == 'probs' and not is_probs:
    raise ValueError('inception_score: inputs="probs" but some rows are negative or do not sum to 1.')
  if inputs == 'logits' or (inputs == 'auto' and not is_probs):
    z = np.exp(x - x.max(axis=1, keepdims=True))
    x = z / z.sum(axis=1, keepdims=True)
  n = x.shape[0]
  scores = []
  for i in range(splits):
    part = x[i * n // splits:(i + 1) * n // splits]
    marginal = part.mean(axis=0, keepdims=True)
    # xlogy: 0·log 0 = 0 for classes a sample (or the whole split) never predicts.
    kl = np.sum(_xlogy(part, part) - _xlogy(part, marginal), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def _xlogy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """x·log(y), 0 where x == 0 (also for y == 0)."""
  y = np.broadcast_to(y, np.broadcast_shapes(np.shape(x), np.shape(y)))
  safe = np.where(x == 0, 1.0, y)
  return np.where(x == 0, 0.0, x * np.log(safe))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(n, m) squared Euclidean distances, |a|² + |b|² − 2ab floored at 0 (as the references)."""
  d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
  return np.maximum(d, 0.0)


def knn_radii(features: np.ndarray, k: int = 3, *, block: int = 2048,
              dtype: Any = np.float32) -> np.ndarray:
  """Squared distance of every row to its k-th nearest neighbour in the same set (self excluded).

  Computed in block × block pieces: each piece keeps its k+1 smallest per row
  (the row itself, at distance 0, is one of them), so memory stays O(block²).
  """
  f = np.asarray(features, dtype)
  n = f.shape[0]
  if f.ndim != 2 or not 1 <= k < n:
    raise ValueError(f'knn_radii: need (N, D) features with 1 <= k < N; got shape {f.shape}, k={k}.')
  radii = np.empty(n, dtype)
  for r0 in range(0, n, block):
    rows = f[r0:r0 + block]
    best = []
    for c0 in range(0, n, block):
      d = _squared_distances(rows, f[c0:c0 + block])
      kk = min(k + 1, d.shape[1])
      best.append(np.partition(d, kk - 1, axis=1)[:, :kk])
    radii[r0:r0 + block] = np.partition(np.concatenate(best, axis=1), k, axis=1)[:, k]
  return radii


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3, *,
                     block: int = 2048, dtype: Any = np.float32) -> tuple[float, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019); (precision, recall).

  Each sample's ball reaches its k-th nearest neighbour within its own set.
  Precision: fraction of fake samples inside at least one real ball (distance
  <= radius); recall: fraction of real samples inside at least one fake ball.
  Distances are squared Euclidean in `dtype` (float32 by default; the ADM
  evaluator uses float16 on GPU), computed block × block, never as a full
  N × M matrix.
  """
  real = np.asarray(real_features, dtype)
  fake = np.asarray(fake_features, dtype)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f'precision_recall: expected (N, D) and (M, D) features; got {real.shape} '
                     f'and {fake.shape}.')
  real_radii = knn_radii(real, k, block=block, dtype=dtype)
  fake_radii = knn_radii(fake, k, block=block, dtype=dtype)
  fake_in_real = np.zeros(len(fake), bool)
  real_in_fake = np.zeros(len(real), bool)
  for r0 in range(0, len(real), block):
    for c0 in range(0, len(fake), block):
      d = _squared_distances(real[r0:r0 + block], fake[c0:c0 + block])
      fake_in_real[c0:c0 + block] |= np.any(d <= real_radii[r0:r0 + block, None], axis=0)
      real_in_fake[r0:r0 + block] |= np.any(d <= fake_radii[None, c0:c0 + block], axis=1)
  return float(fake_in_real.mean()), float(real_in_fake.mean())


# ---- FID reference statistics files (.npz) ----------------------------------

def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Writes `mu` (D,) and `sigma` (D, D) as float64 to an .npz (pytorch-fid's layout)."""
  mu, sigma = _checked_statistics(np.asarray(mu), np.asarray(sigma), str(path))
  with epath.Path(path).open('wb') as f:
    np.savez(f, mu=mu, sigma=sigma)


def load_statistics(path: str | os.PathLike, *, spatial: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) in float64 from a statistics .npz.

  Reads `save_statistics` files, pytorch-fid's (`mu`, `sigma`) and the ADM
  evaluator's reference batches (`arr_0` images plus `mu`, `sigma` and the
  spatial `mu_s`, `sigma_s`, read with spatial=True; those spatial features are
  TF Inception `mixed_6/conv` channels, which pytorch-fid's network does not
  produce). An .npz holding only `arr_0` (an ADM sample batch) has images, not
  statistics: run them through the network first.
  """
  names = ('mu_s', 'sigma_s') if spatial else ('mu', 'sigma')
  with epath.Path(path).open('rb') as f, np.load(f, allow_pickle=False) as data:
    keys = sorted(data.files)
    if not all(n in keys for n in names):
      hint = (' It holds only arr_0 (images or activations, as an ADM sample batch): compute '
              'their features and statistics first.' if keys == ['arr_0'] else '')
      raise KeyError(f'{path}: no {names[0]!r}/{names[1]!r} statistics; keys {keys}.{hint}')
    return _checked_statistics(data[names[0]], data[names[1]], str(path))


def _checked_statistics(mu: np.ndarray, sigma: np.ndarray, where: str
                        ) -> tuple[np.ndarray, np.ndarray]:
  if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
    raise ValueError(f'{where}: expected mu (D,) and sigma (D, D); got {mu.shape} and {sigma.shape}.')
  mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ValueError(f'{where}: the statistics hold non-finite values.')
  return mu, sigma


# ---- relative disparity (MMGen's 'disparity_minmax' encoding) ----------------

def _disparity_to_depth(pred_disparity, gt_depth, valid, max_depth_ratio):
  """(depth, floored): the aligned depth and where its disparity was floored."""
  _check_same_shape(pred_disparity, gt_depth, 'disparity_to_depth_least_squares')
  gt_depth = gt_depth.astype(np.float64)
  valid = np.isfinite(gt_depth) & (gt_depth > 0) if valid is None else valid
  gt_disp = np.where(valid, 1.0 / np.where(valid, gt_depth, 1.0), 0.0)
  aligned = align_depth_least_squares(pred_disparity, gt_disp, valid)
  floor = np.stack([gt_disp[i][valid[i]].min() for i in range(len(aligned))]) / max_depth_ratio
  floored = aligned < floor[:, None, None]
  return 1.0 / np.where(floored, floor[:, None, None], aligned), floored


def disparity_to_depth_least_squares(pred_disparity: np.ndarray, gt_depth: np.ndarray,
                                     valid: np.ndarray | None = None,
                                     max_depth_ratio: float = 100.0) -> np.ndarray:
  """Depth from a prediction known up to an affine map of disparity (Marigold, Depth Anything).

  Per image, s and b minimise |s·pred + b − 1/gt|² on valid pixels (default:
  finite gt > 0); the depth is 1 / (s·pred + b), the aligned disparity floored
  at the image's smallest true disparity / max_depth_ratio (a pixel aligned to
  zero or below reads as far, not as infinite or negative).
  pred_disparity, gt_depth: (N, H, W).
  """
  return _disparity_to_depth(pred_disparity, gt_depth, valid, max_depth_ratio)[0]


def disparity_depth_metrics(pred_disparity: np.ndarray, gt_depth: np.ndarray, *,
                            min_depth: float = 1e-3) -> dict[str, float]:
  """`depth_metrics` of a relative-disparity prediction aligned in disparity space.

  Adds the fraction of valid pixels whose aligned disparity was floored
  (`depth/floored_frac`, see `disparity_to_depth_least_squares`).
  """
  _check_same_shape(pred_disparity, gt_depth, 'disparity_depth_metrics')
  valid = np.isfinite(gt_depth) & (gt_depth > min_depth)
  depth, floored = _disparity_to_depth(pred_disparity, gt_depth, valid, 100.0)
  return {**depth_metrics(depth, gt_depth, align=False, min_depth=min_depth),
          'depth/floored_frac': float(np.mean(floored[valid]))}


# ---- class-agnostic segmentation -------------------------------------------

def matched_iou(pred_ids: np.ndarray, gt_ids: np.ndarray) -> float:
  """Mean IoU of the ground-truth segments under a one-to-one matching to predicted ones.

  Segment ids carry no meaning (any permutation of the prediction's ids scores
  the same); the matching maximising the summed IoU (Hungarian) pairs segments,
  and each ground-truth segment scores its partner's IoU, 0 if it has none
  (more ground-truth than predicted segments). The score is the mean over
  ground-truth segments, each counted once whatever its size. One image: the
  arrays hold its pixels (any equal shapes).
  """
  from scipy import optimize  # pylint: disable=g-import-not-at-top  (a jax dependency)
  _check_same_shape(pred_ids, gt_ids, 'matched_iou')
  if not gt_ids.size:
    raise ValueError('matched_iou: empty segmentation.')
  _, g = np.unique(gt_ids.ravel(), return_inverse=True)
  _, p = np.unique(pred_ids.ravel(), return_inverse=True)
  num_g, num_p = int(g.max()) + 1, int(p.max()) + 1
  inter = np.bincount(g * num_p + p, minlength=num_g * num_p).reshape(num_g, num_p)
  inter = inter.astype(np.float64)
  union = inter.sum(1, keepdims=True) + inter.sum(0, keepdims=True) - inter
  iou = inter / union
  rows, cols = optimize.linear_sum_assignment(iou, maximize=True)
  return float(iou[rows, cols].sum() / num_g)


def matched_iou_metrics(pred_ids: np.ndarray, gt_ids: np.ndarray) -> dict[str, float]:
  """`matched_iou` per image of (N, H, W) id maps, averaged over the images."""
  _check_same_shape(pred_ids, gt_ids, 'matched_iou_metrics')
  scores = [matched_iou(p, g) for p, g in zip(pred_ids, gt_ids)]
  return {'segmentation/matched_iou': float(np.mean(scores)),
          'segmentation/num_segments_pred': float(np.mean([len(np.unique(p)) for p in pred_ids])),
          'segmentation/num_segments_gt': float(np.mean([len(np.unique(g)) for g in gt_ids]))}
