"""The evaluation job with injected predictors: perfect, image-blind, and on two processes."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmgen_jax import evaluate
from mmgen_jax import parallel
from mmgen_jax.data import palettes
from mmgen_jax.data import pipeline
from tests.conftest import SCENES_TEST_BUILD
from tests import multiprocess
from tests.evaluate_process import eval_config, image_predictor

NUM_RECORDS = 8  # validation records of SCENES_TEST_BUILD


@pytest.fixture(scope='module')
def config(scenes_data_dir):
  return eval_config(scenes_data_dir, SCENES_TEST_BUILD)


@pytest.fixture(scope='module')
def mesh():
  return parallel.make_mesh(dict(data=-1, fsdp=1, tensor=1), jax.devices()[:4])


def _truth_predictor(batch, index):
  """The ground truth itself, in model space (normalised depth, palette colours)."""
  del index
  return {name: batch[name] for name in ('depth', 'normal', 'segmentation')}


def test_the_truth_scores_perfectly(config, mesh):
  scores = evaluate.evaluate_predictor(config, _truth_predictor, mesh)
  assert scores['eval/num_examples'] == NUM_RECORDS and scores['eval/skipped_records'] == 0
  assert scores['eval/depth/abs_rel'] < 1e-6  # float32 normalisation, undone by alignment
  assert scores['eval/depth/delta1'] == 1.0
  assert scores['eval/normal/mean_deg'] < 1e-5
  assert scores['eval/normal/within_11.25'] == 1.0
  assert scores['eval/segmentation/miou'] == 1.0
  assert scores['eval/segmentation/pixel_acc'] == 1.0


def _split_truth(config):
  """Raw depth (N, H, W), normals (N, H, W, 3) and semantic ids (N, H, W) of the split."""
  batches = list(pipeline.make_iterator(config, config.data.eval_split, train=False))
  def field(name):
    return np.concatenate([b[name][b['valid']] for b in batches])
  return field('depth_raw')[..., 0], field('normal'), field('segmentation_ids')


def test_a_constant_predictor_scores_the_image_blind_baseline(config, mesh):
  """The baselines are what the docstring says: per-row median depth, the mean normal
  and the most frequent class per row, the same for every image."""
  depth, normal, ids = _split_truth(config)
  assert len(depth) == NUM_RECORDS
  rows = np.broadcast_to(np.median(depth, axis=(0, 2))[:, None], depth.shape[1:])
  mean = normal.reshape(-1, 3).mean(0, dtype=np.float64)
  counts = np.stack([(ids == c).sum(axis=(0, 2)) for c in range(len(palettes.get('scenes')))])
  modes = np.broadcast_to(counts.argmax(0)[:, None], ids.shape[1:])
  constant = {'depth': rows[..., None],
              'normal': np.broadcast_to(mean / np.linalg.norm(mean), normal.shape[1:]),
              'segmentation': palettes.colorize(modes, 'scenes') / 127.5 - 1.0}

  def predict(batch, index):
    del index
    n = batch['rgb'].shape[0]
    return {k: jnp.broadcast_to(jnp.asarray(v, jnp.float32), (n, *v.shape))
            for k, v in constant.items()}

  scores = evaluate.evaluate_predictor(config, predict, mesh)
  baseline = {k.replace('baseline/', ''): v for k, v in scores.items() if '/baseline/' in k}
  assert sorted(baseline) == sorted(
      f'eval/{m}/{metric}' for m, metric in [
          ('depth', 'abs_rel'), ('depth', 'rmse'), ('depth', 'delta1'),
          ('depth', 'nonpositive_frac'), ('normal', 'mean_deg'), ('normal', 'median_deg'),
          ('normal', 'within_11.25'), ('normal', 'within_22.5'), ('normal', 'within_30'),
          ('segmentation', 'miou'), ('segmentation', 'pixel_acc')])
  assert 0 < baseline['eval/depth/abs_rel'] and baseline['eval/segmentation/miou'] < 1
  # Equal up to the float32 rounding of the predictions.
  assert {k: scores[k] for k in baseline} == pytest.approx(baseline, rel=1e-6, abs=1e-9)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_score_like_one(config, mesh, scenes_data_dir, tmp_path):
  """2 processes x 2 devices read disjoint shards (each padded) and report the
  scores of one process with 4 devices."""
  script = os.path.join(os.path.dirname(__file__), 'evaluate_process.py')
  reports = multiprocess.run_workers(script, scenes_data_dir, SCENES_TEST_BUILD, out_dir=tmp_path)
  assert [r['process_index'] for r in reports] == [0, 1]

  one = evaluate.evaluate_predictor(config, image_predictor, mesh)
  assert one['eval/num_examples'] == NUM_RECORDS
  assert reports[0]['scores'] == reports[1]['scores']  # every process scores everything
  # The same examples in another order: sums may differ in the last bits.
  assert reports[0]['scores'] == pytest.approx(one, rel=1e-12)
