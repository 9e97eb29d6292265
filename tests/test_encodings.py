"""MMGen's data conventions (data/encodings.py): round trips, the pipeline, the scores."""

import ml_collections
import numpy as np
import pytest

from mmgen_jax import config_schema
from mmgen_jax import evaluate
from mmgen_jax import metrics
from mmgen_jax import modalities
from mmgen_jax.data import encodings as enc
from mmgen_jax.data import pipeline

RES = 8


def _unit(v):
  v = np.asarray(v, np.float64)
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


# ---- depth: 8-bit min-max disparity ---------------------------------------------------


def test_disparity_minmax_hand_case_near_is_bright():
  depth = np.array([[1.0, 2.0], [4.0, 1.0]])
  # disparity 1, 1/2, 1/4, 1 -> (d - 1/4) / (3/4) = 1, 1/3, 0, 1 -> round(· 255)
  u8 = enc.disparity_minmax_u8(enc.depth_to_disparity(depth))
  np.testing.assert_array_equal(u8, [[255, 85], [0, 255]])
  assert u8.dtype == np.uint8
  x = enc.encode_disparity_minmax(depth)
  assert x.shape == (2, 2, 1)
  assert x[0, 0, 0] == 1.0 and x[1, 0, 0] == -1.0  # nearest +1 (bright), farthest -1


def test_disparity_is_rounded_to_256_levels():
  ramp = np.linspace(0.0, 1.0, 5000)
  u8 = enc.disparity_minmax_u8(ramp)
  assert u8.dtype == np.uint8
  np.testing.assert_array_equal(np.unique(u8), np.arange(256))
  # round, not truncate: 0.999 · 255 = 254.7 -> 255
  assert enc.disparity_minmax_u8(np.array([0.0, 0.999, 1.0]))[1] == 255


def test_constant_depth_is_zero_disparity_and_three_channels_replicate():
  x = enc.encode_disparity_minmax(np.full((3, 4), 2.5), channels=3)
  assert x.shape == (3, 4, 3)
  np.testing.assert_array_equal(x, -1.0)  # MMGen: a flat map is all 0 before [-1, 1]
  depth = np.random.default_rng(0).uniform(1, 9, (5, 6))
  x3 = enc.encode_disparity_minmax(depth, channels=3)
  np.testing.assert_array_equal(x3[..., 0], x3[..., 2])


def test_disparity_round_trip_within_one_level():
  depth = np.random.default_rng(1).uniform(0.5, 20.0, (16, 16))
  rel = 1.0 / depth
  rel = (rel - rel.min()) / (rel.max() - rel.min())
  back = enc.decode_disparity(enc.encode_disparity_minmax(depth, 3))
  assert np.abs(back - rel).max() <= 0.5 / 255 + 1e-7


def test_stored_uint8_disparity_is_kept_as_is():
  u8 = np.random.default_rng(2).integers(0, 256, (4, 4), dtype=np.uint8)
  np.testing.assert_array_equal(enc.encode_disparity_minmax(u8)[..., 0],
                                u8.astype(np.float32) / 127.5 - 1.0)


# ---- normals: StableNormal RGB ----------------------------------------------------------


@pytest.mark.parametrize('opencv,rgb', [
    ((0.0, 0.0, -1.0), (127, 127, 255)),  # facing the camera: StableNormal z towards viewer
    ((0.0, -1.0, 0.0), (127, 255, 127)),  # facing up (OpenCV y is down): StableNormal y up
    ((1.0, 0.0, 0.0), (255, 127, 127)),   # facing right: x right in both frames
])
def test_stablenormal_axes_and_truncation(opencv, rgb):
  u8 = enc.stablenormal_rgb_u8(enc.opencv_to_stablenormal(np.array(opencv)))
  np.testing.assert_array_equal(u8, rgb)  # (0 + 1) / 2 · 255 = 127.5 truncates to 127
  np.testing.assert_allclose(enc.decode_stablenormal_rgb(np.array(rgb, np.uint8)), opencv,
                             atol=0.01)


def test_stablenormal_round_trips():
  n = _unit(np.random.default_rng(3).normal(size=(64, 64, 3))).astype(np.float32)
  back = enc.decode_stablenormal_rgb(enc.encode_stablenormal_rgb(n))
  assert metrics.normal_angles_deg(back, n).max() < 1.0  # 8-bit steps: under a degree
  # Stored bytes -> OpenCV normals -> bytes is exact (the pipeline relies on it).
  u8 = np.random.default_rng(4).integers(0, 256, (100, 100, 3), dtype=np.uint8)
  again = enc.stablenormal_rgb_u8(enc.opencv_to_stablenormal(
      enc.stablenormal_to_opencv(enc.to_model_space(u8))))
  np.testing.assert_array_equal(again, u8)


# ---- segmentation: random colours ---------------------------------------------------


def test_random_colors_deterministic_per_seed_and_record():
  ids = np.random.default_rng(5).integers(0, 12, (16, 16))
  a = enc.random_colors(ids, seed=0, index=3)
  np.testing.assert_array_equal(a, enc.random_colors(ids, seed=0, index=3))
  assert not np.array_equal(a, enc.random_colors(ids, seed=1, index=3))
  assert not np.array_equal(a, enc.random_colors(ids, seed=0, index=4))
  # A segment's colour does not depend on which other segments the crop kept.
  only_7 = np.full((2, 2), 7)
  np.testing.assert_array_equal(enc.random_colors(only_7, 0, 3)[0, 0], a[ids == 7][0])


def test_random_colors_distinct_per_segment():
  table = enc.color_table(seed=0, index=0, num_colors=enc.MAX_SEGMENTS).astype(np.float64)
  dist = np.sqrt(((table[:, None] - table[None]) ** 2).sum(-1))
  np.fill_diagonal(dist, np.inf)
  assert dist.min() >= 16.0  # > a decoding bin's diagonal, 7·√3
  with pytest.raises(ValueError, match=r'segment ids span \[0, 256\]'):
    enc.random_colors(np.array([[0, 256]]), 0, 0)


def test_colour_maps_decode_back_to_segments():
  rng = np.random.default_rng(6)
  ids = np.repeat(np.repeat(rng.integers(0, 30, (8, 8)), 4, 0), 4, 1)  # 32×32, 4×4 blocks
  colors = enc.random_colors(ids, seed=0, index=0)
  assert metrics.matched_iou(enc.ids_from_exact_colors(colors), ids) == 1.0
  assert metrics.matched_iou(enc.ids_from_colors(colors), ids) == 1.0
  # Generated maps are noisy (here 3.2 levels per channel) and overshoot [-1, 1]:
  # still the same segments.
  noisy = enc.to_model_space(colors) + rng.normal(0, 0.025, colors.shape)
  assert metrics.matched_iou(enc.ids_from_colors(noisy), ids) == 1.0
  # Larger segments under more noise (5 levels): a segment first splits into nearby
  # modes, which the refinement brings together.
  rng = np.random.default_rng(0)
  ids = np.repeat(np.repeat(rng.integers(0, 16, (4, 4)), 8, 0), 8, 1)
  noisy = enc.to_model_space(enc.random_colors(ids, 0, 0)) + rng.normal(0, 0.04, (32, 32, 3))
  assert metrics.matched_iou(enc.ids_from_colors(noisy), ids) == 1.0


# ---- scores ----------------------------------------------------------------------------


def test_matched_iou_ignores_label_names():
  gt = np.random.default_rng(7).integers(0, 5, (12, 12))
  perm = np.array([3, 0, 4, 1, 2]) + 10
  assert metrics.matched_iou(perm[gt], gt) == 1.0


def test_matched_iou_hand_case():
  gt = np.array([0, 0, 1, 1])
  pred = np.array([5, 9, 9, 9])
  # IoU(gt0, p5) = 1/2, IoU(gt0, p9) = 1/4, IoU(gt1, p5) = 0, IoU(gt1, p9) = 2/3:
  # the best matching pairs gt0-p5 and gt1-p9, (1/2 + 2/3) / 2.
  assert metrics.matched_iou(pred, gt) == pytest.approx(7 / 12)
  # One-to-one: both truths like prediction 1 best (3/7 and 4/8), but only one may have it;
  # the best assignment gives 1 to truth 0 and 2 to truth 1 (IoU 1/5).
  gt = np.array([0, 0, 0, 1, 1, 1, 1, 1])
  pred = np.array([1, 1, 1, 1, 1, 1, 1, 2])
  assert metrics.matched_iou(pred, gt) == pytest.approx((3 / 7 + 1 / 5) / 2)
  # More truth than prediction: unmatched segments score 0.
  assert metrics.matched_iou(np.zeros(4, int), np.array([0, 0, 1, 2])) == pytest.approx(0.5 / 3)


def test_disparity_alignment_recovers_a_known_scale_and_shift():
  gt = np.random.default_rng(8).uniform(1.0, 10.0, (2, 16, 16))
  scale, shift = 3.0, 0.2
  pred = (1.0 / gt - shift) / scale  # s·pred + b = 1/gt
  np.testing.assert_allclose(metrics.disparity_to_depth_least_squares(pred, gt), gt, rtol=1e-9)
  m = metrics.disparity_depth_metrics(pred, gt)
  assert m['depth/abs_rel'] < 1e-9 and m['depth/delta1'] == 1.0 and m['depth/floored_frac'] == 0
  # Aligned in depth instead, the same prediction is off: the map is affine in 1/depth.
  assert metrics.depth_metrics(pred, gt)['depth/abs_rel'] > 0.05


def _encoded_mods():
  return modalities.from_config(ml_collections.ConfigDict(dict(
      rgb=modalities.spec(0, 'rgb'),
      depth=modalities.spec(1, 'disparity_minmax', channels=3),
      normal=modalities.spec(2, 'stablenormal_rgb'),
      segmentation=modalities.spec(3, 'random_colors', color_seed=4))))


def test_score_of_the_encoded_truth():
  rng = np.random.default_rng(9)
  depth = rng.uniform(1.0, 8.0, (3, 16, 16))
  normal = _unit(rng.normal(size=(3, 16, 16, 3))).astype(np.float32)
  ids = np.repeat(np.repeat(rng.integers(0, 6, (3, 4, 4)), 4, 1), 4, 2)
  rel = 1.0 / depth
  predicted = {
      'depth': np.repeat((2 * rel / rel.max(axis=(1, 2), keepdims=True) - 1)[..., None], 3, -1),
      'normal': np.stack([enc.encode_stablenormal_rgb(n) for n in normal]),
      'segmentation': np.stack([enc.to_model_space(enc.random_colors(s, 4, i))
                                for i, s in enumerate(ids)]),
  }
  truth = {'depth': depth[..., None], 'normal': normal, 'segmentation': ids}
  scores = evaluate.score(predicted, truth, _encoded_mods())
  assert scores['eval/depth/abs_rel'] < 1e-6
  assert scores['eval/normal/mean_deg'] < 1.0
  assert scores['eval/segmentation/matched_iou'] == 1.0
  assert scores['eval/baseline/segmentation/matched_iou'] < 1.0
  assert 'eval/baseline/depth/abs_rel' in scores and 'eval/baseline/normal/mean_deg' in scores


def test_disparity_records_without_depth_are_counted_and_the_rest_scored():
  rng = np.random.default_rng(11)
  depth = rng.uniform(1.0, 8.0, (3, 8, 8))
  depth[1] = np.nan  # a record that stores 8-bit disparity only
  rel = 1.0 / np.nan_to_num(depth, nan=1.0)
  pred = np.repeat((2 * rel / rel.max(axis=(1, 2), keepdims=True) - 1)[..., None], 3, -1)
  mods = _encoded_mods()[:2]
  scores = evaluate.score({'depth': pred}, {'depth': depth[..., None]}, mods)
  assert scores['eval/depth/num_scored'] == 2 and scores['eval/depth/abs_rel'] < 1e-6


def test_the_disparity_baseline_is_aligned_like_the_model():
  # The image-blind baseline must be scored under the model's protocol (alignment in
  # disparity space), not the metric-depth one: on the same truth the two differ.
  depth = np.random.default_rng(12).uniform(1.0, 9.0, (2, 8, 8))
  pred = np.zeros((2, 8, 8, 3))
  scores = evaluate.score({'depth': pred}, {'depth': depth[..., None]}, _encoded_mods()[:2])
  row_disparity = np.broadcast_to(np.median(1.0 / depth, axis=(0, 2), keepdims=True), depth.shape)
  same = metrics.disparity_depth_metrics(row_disparity, depth)['depth/abs_rel']
  row_depth = np.broadcast_to(np.median(depth, axis=(0, 2), keepdims=True), depth.shape)
  other = metrics.depth_metrics(row_depth, depth)['depth/abs_rel']
  assert abs(same - other) > 1e-3
  np.testing.assert_allclose(scores['eval/baseline/depth/abs_rel'], same, rtol=1e-9)


# ---- the pipeline ---------------------------------------------------------------------


def _config(mods_cfg):
  c = config_schema.base_config()
  c.modalities = mods_cfg
  c.data.resolution = RES
  c.data.global_batch_size = 2
  c.data.augment.hflip = False
  return c


def _records(n=4, stored_uint8=False):
  rng = np.random.default_rng(10)
  out = []
  for _ in range(n):
    r = dict(rgb=rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8),
             depth=rng.uniform(1.0, 5.0, (RES, RES)).astype(np.float32),
             normal=_unit(rng.normal(size=(RES, RES, 3))).astype(np.float32),
             segmentation=rng.integers(0, 5, (RES, RES)).astype(np.uint8),
             label=np.int64(rng.integers(0, 4)))
    if stored_uint8:  # as MMGen's preprocessing stores them
      r['depth'] = enc.disparity_minmax_u8(1.0 / r['depth'])
      r['normal'] = enc.stablenormal_rgb_u8(enc.opencv_to_stablenormal(r['normal']))
      r['segmentation'] = enc.random_colors(r['segmentation'], 99, 0)
    out.append(r)
  return out


def _encoded_cfg():
  return ml_collections.ConfigDict(dict(
      rgb=modalities.spec(0, 'rgb'),
      depth=modalities.spec(1, 'disparity_minmax', 0.2, channels=3),
      normal=modalities.spec(2, 'stablenormal_rgb', 0.1),
      segmentation=modalities.spec(3, 'random_colors', 0.1, color_seed=4)))


def test_pipeline_encodes_float_records():
  records = _records()
  batch = next(pipeline.make_iterator(_config(_encoded_cfg()), 'train', train=False,
                                      source=records))
  for i, r in enumerate(records[:2]):
    np.testing.assert_array_equal(batch['depth'][i], enc.encode_disparity_minmax(r['depth'], 3))
    np.testing.assert_array_equal(batch['depth_raw'][i, ..., 0], r['depth'])
    np.testing.assert_array_equal(batch['normal'][i], enc.encode_stablenormal_rgb(r['normal']))
    np.testing.assert_allclose(batch['normal_raw'][i], r['normal'], atol=1e-6)
    np.testing.assert_array_equal(batch['segmentation_ids'][i], r['segmentation'])
    np.testing.assert_array_equal(
        batch['segmentation'][i], enc.to_model_space(enc.random_colors(r['segmentation'], 4, i)))


def test_pipeline_keeps_mmgens_stored_bytes():
  records = _records(stored_uint8=True)
  batch = next(pipeline.make_iterator(_config(_encoded_cfg()), 'train', train=False,
                                      source=records))
  for i, r in enumerate(records[:2]):
    np.testing.assert_array_equal(batch['depth'][i, ..., 1], enc.to_model_space(r['depth']))
    assert np.isnan(batch['depth_raw'][i]).all()  # no depth in an 8-bit disparity record
    np.testing.assert_array_equal(batch['normal'][i], enc.to_model_space(r['normal']))
    # One segment per stored colour (recoloured with this record's own colours).
    assert metrics.matched_iou(batch['segmentation_ids'][i],
                               enc.ids_from_exact_colors(r['segmentation'])) == 1.0


def test_hflip_of_stablenormal_rgb_negates_red_in_model_space():
  mods = modalities.from_config(_encoded_cfg())
  for stored in (False, True):
    r = _records(1, stored_uint8=stored)[0]
    ex = pipeline.decode_record(r, mods, split='train', index=0, num_classes=4, resolution=RES)
    plain = pipeline.normalise(ex, mods)
    flipped = pipeline.normalise(pipeline.hflip(ex, mods), mods)
    expected = plain['normal'][:, ::-1] * np.array([-1.0, 1.0, 1.0], np.float32)
    # Truncation of a flipped float can move one level; stored bytes flip exactly.
    np.testing.assert_allclose(flipped['normal'], expected, atol=1e-6 if stored else 1 / 127.5 + 1e-6)
    np.testing.assert_array_equal(flipped['segmentation_ids'], plain['segmentation_ids'][:, ::-1])


def test_pipeline_refuses_depth_without_disparity():
  records = _records()
  records[1]['depth'][2, 3] = 0.0
  it = pipeline.make_iterator(_config(_encoded_cfg()), 'train', train=False, source=records)
  with pytest.raises(pipeline.BadRecordError, match=r"train\[1\], field 'depth': depth <= 0"):
    next(it)


def test_spec_checks_channels_and_seed():
  with pytest.raises(ValueError, match=r'channels=2 is not allowed.*disparity_minmax'):
    modalities.from_config({'d': modalities.spec(0, 'disparity_minmax', channels=2)})
  with pytest.raises(ValueError, match=r"color_seed is only read by the 'random_colors'"):
    modalities.from_config({'d': modalities.spec(0, 'depth', color_seed=1)})


def _png(a):
  import io  # pylint: disable=g-import-not-at-top
  import PIL.Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  PIL.Image.fromarray(a).save(buf, format='PNG')
  return buf.getvalue()


def test_pipeline_reads_mmgens_pngs_as_their_arrays():
  arrays = _records(stored_uint8=True)
  pngs = [{k: _png(v) if k in ('depth', 'normal', 'segmentation') else v for k, v in r.items()}
          for r in arrays]
  config = _config(_encoded_cfg())
  a = next(pipeline.make_iterator(config, 'train', train=False, source=arrays))
  b = next(pipeline.make_iterator(config, 'train', train=False, source=pngs))
  for k in ('depth', 'normal', 'segmentation', 'segmentation_ids'):
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # Segment ids stored as a one-channel image are ids, not a colour map.
  ids = [dict(r, segmentation=r['segmentation'][..., None]) for r in _records()]
  c = next(pipeline.make_iterator(config, 'train', train=False, source=ids))
  np.testing.assert_array_equal(c['segmentation_ids'][..., None], [r['segmentation'] for r in ids[:2]])
