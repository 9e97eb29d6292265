"""Several processes: two JAX processes reading disjoint shards; Grain worker processes."""

import os

import numpy as np
import pytest

from mmgen_jax.data import pipeline
from mmgen_jax.data import tfds_scenes
from tests import multiprocess
from tests.test_pipeline import assert_batches_equal, make_config, take

BUILDER_CONFIG = 'res32_n24_10'  # 10 validation records: shards of 5, batches of 2 pad the last


@pytest.fixture(scope='session')
def tiny_data_dir(scenes_data_dir):
  return scenes_data_dir


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_read_disjoint_shards_covering_the_split(tmp_path):
  data_dir = tmp_path / 'tfds'
  tfds_scenes.build(BUILDER_CONFIG, data_dir)
  script = os.path.join(os.path.dirname(__file__), 'pipeline_process.py')
  reports = multiprocess.run_workers(script, str(data_dir), BUILDER_CONFIG, out_dir=tmp_path,
                                     timeout=120)

  assert [r['process_index'] for r in reports] == [0, 1]
  assert all(r['process_count'] == 2 for r in reports)
  for split, offset in (('train', 0), ('validation', tfds_scenes.SPLIT_SEED_OFFSETS['validation'])):
    n = reports[0][split]['num_records']
    shards = [set(r[split]['shard']) for r in reports]
    assert not shards[0] & shards[1], split
    assert shards[0] | shards[1] == set(range(n)), split
    for r in reports:  # each process read exactly its shard, each record once
      assert sorted(r[split]['seen']) == sorted(r[split]['shard']), split
      assert r[split]['seeds'] == [offset + i for i in r[split]['seen']], split
    seeds = [set(r[split]['seeds']) for r in reports]
    assert not seeds[0] & seeds[1]
    # Equal batch counts: a process with a shorter shard pads instead of stopping early.
    assert reports[0][split]['batches'] == reports[1][split]['batches'], split

  for r in reports:
    g = r['global']
    assert g['devices'] == 4
    assert g['rgb_shape'] == [4, 32, 32, 3]
    assert g['spec'] == [['data', 'fsdp']]
    # This process's two rows of the global batch are its own local batch.
    assert g['addressable_index'] == g['local_index']
    assert set(g['local_index']) <= set(r['train']['shard'])
  assert reports[0]['global']['local_rows'] != reports[1]['global']['local_rows']


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_workers_are_deterministic_and_resume_exactly(tiny_data_dir):
  """mp_prefetch with 2 worker processes: same batches for the same seed; state resumes."""
  config = make_config(tiny_data_dir, crop_min_scale=0.6, hflip=True, worker_count=2)
  it = pipeline.make_iterator(config, 'train', train=True)
  first = take(it, 2)
  state = it.get_state()
  expected = take(it, 2)
  it.close()
  again = pipeline.make_iterator(config, 'train', train=True)
  for x, y in zip(first, take(again, 2), strict=True):
    assert_batches_equal(x, y)
  again.set_state(state)
  for x, y in zip(expected, take(again, 2), strict=True):
    assert_batches_equal(x, y)
  again.close()
  # Workers batch different positions (worker w takes positions w, w + 2, ...), but each
  # position keeps its record and augmentation: the first 16 positions match 0 workers'.
  plain = make_config(tiny_data_dir, crop_min_scale=0.6, hflip=True)
  single = take(pipeline.make_iterator(plain, 'train', train=True), 2)
  def by_index(batches):
    return {int(i): (b['rgb'][n], b['normal'][n], b['intrinsics'][n])
            for b in batches for n, i in enumerate(b['index'])}
  multi, ref = by_index(first), by_index(single)
  assert multi.keys() == ref.keys() and len(ref) == 16
  for i in ref:
    for a, b in zip(multi[i], ref[i], strict=True):
      np.testing.assert_array_equal(a, b, err_msg=f'record {i}')
