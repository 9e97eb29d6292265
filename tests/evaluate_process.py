"""One process of the two-process evaluation test (tests/test_evaluate.py).

    python tests/evaluate_process.py PROCESS_ID PORT DATA_DIR BUILDER_CONFIG OUT_JSON

Joins a 2-process JAX cluster on 127.0.0.1:PORT (2 CPU devices each), scores
`image_predictor` on the validation split with `evaluate.evaluate_predictor`
and writes the scores to OUT_JSON.
"""

import json
import os
import sys


def eval_config(data_dir: str, builder_config: str):
  """Batches of 12: the 8 validation records of the test build leave every batch padded."""
  from mmgen_jax import config_schema  # pylint: disable=g-import-not-at-top
  c = config_schema.base_config()
  c.data.builder_config = builder_config
  c.data.data_dir = data_dir
  c.data.global_batch_size = 12
  c.eval.num_examples = 0  # all
  return c


def image_predictor(batch, index):
  """Depth, normals and segmentation colours read off the RGB pixels: image-dependent
  predictions with scores far from perfect and from the baselines, no model needed."""
  del index
  rgb = batch['rgb']
  return {'depth': rgb.mean(-1, keepdims=True), 'normal': rgb, 'segmentation': rgb[..., ::-1]}


def main(process_id: int, port: int, data_dir: str, builder_config: str, out: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                             process_id=process_id, initialization_timeout=60)
  # Imported after initialize: nothing may touch the JAX backend before it.
  from mmgen_jax import evaluate, parallel  # pylint: disable=g-import-not-at-top
  config = eval_config(data_dir, builder_config)
  scores = evaluate.evaluate_predictor(config, image_predictor, parallel.make_mesh(config.mesh))
  with open(out, 'w') as f:
    json.dump({'process_index': jax.process_index(), 'scores': scores}, f)
  jax.distributed.shutdown()


if __name__ == '__main__':
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
  os.environ['JAX_PLATFORMS'] = 'cpu'
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6])
