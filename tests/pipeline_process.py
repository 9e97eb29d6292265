"""One process of the two-process pipeline test (tests/test_pipeline_multiprocess.py).

    python tests/pipeline_process.py PROCESS_ID PORT DATA_DIR BUILDER_CONFIG OUT_JSON

Joins a 2-process JAX cluster on 127.0.0.1:PORT (2 CPU devices each), reads its
shard of the split through the pipeline and writes what it saw to OUT_JSON.
"""

import json
import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402  (after the flags above)
import numpy as np  # noqa: E402


def main(process_id: int, port: int, data_dir: str, builder_config: str, out: str) -> None:
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                             process_id=process_id, initialization_timeout=60)
  # Imported after initialize: nothing may touch the JAX backend before it.
  from mmgen_jax import config_schema  # pylint: disable=g-import-not-at-top
  from mmgen_jax import parallel  # pylint: disable=g-import-not-at-top
  from mmgen_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  config = config_schema.base_config()
  config.data.builder_config = builder_config
  config.data.data_dir = data_dir
  config.data.global_batch_size = 4
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 1

  report = {'process_index': jax.process_index(), 'process_count': jax.process_count()}
  for split in ('train', 'validation'):
    source = pipeline.make_source(config, split)
    shard = list(pipeline.shard_indices(len(source), jax.process_index(), jax.process_count()))
    seen, batches = [], 0
    for batch in pipeline.make_iterator(config, split, train=False):
      batches += 1
      seen += batch['index'][batch['valid']].tolist()
    report[split] = {'num_records': len(source), 'shard': shard, 'seen': seen,
                     'seeds': [int(source[i]['seed']) for i in seen], 'batches': batches}

  # One global training batch: per-process halves assembled into a (4, ...) jax.Array.
  mesh = parallel.make_mesh(config.mesh)
  local = next(pipeline.make_iterator(config, 'train', train=True))
  batch = pipeline.to_global_batch(local, mesh, config.sharding_rules)
  local_rows = sorted(s.index[0].start for s in batch['index'].addressable_shards)
  report['global'] = {
      'devices': jax.device_count(),
      'rgb_shape': list(batch['rgb'].shape),
      'spec': [list(a) if isinstance(a, tuple) else a for a in batch['rgb'].sharding.spec],
      'local_index': local['index'].tolist(),
      'local_rows': local_rows,
      'addressable_index': np.concatenate(
          [np.asarray(s.data) for s in sorted(batch['index'].addressable_shards,
                                              key=lambda s: s.index[0].start)]).tolist(),
  }
  with open(out, 'w') as f:
    json.dump(report, f)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
