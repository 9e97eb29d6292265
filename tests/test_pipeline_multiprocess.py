"""Two local JAX processes each read their shard: disjoint shards covering the whole split."""

import json
import os
import socket
import subprocess
import sys

import pytest

from mmgen_jax.data import tfds_scenes

BUILDER_CONFIG = 'res32_n24_10'  # 10 validation records: shards of 5, batches of 2 pad the last


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_read_disjoint_shards_covering_the_split(tmp_path):
  data_dir = tmp_path / 'tfds'
  tfds_scenes.build(BUILDER_CONFIG, data_dir)
  port = _free_port()
  script = os.path.join(os.path.dirname(__file__), 'pipeline_process.py')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [repo, env.get('PYTHONPATH')]))
  procs, outs = [], []
  for i in range(2):
    outs.append(tmp_path / f'process{i}.json')
    procs.append(subprocess.Popen(
        [sys.executable, script, str(i), str(port), str(data_dir), BUILDER_CONFIG,
         str(outs[i])], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=120)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, p in enumerate(procs):
    assert p.returncode == 0, f'process {i} failed:\n{logs[i][-3000:]}'
  reports = [json.loads(o.read_text()) for o in outs]

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
