"""The generation-metrics test set-up, and one process of its two-process test.

    python tests/generation_eval_process.py PROCESS_ID PORT DATA_DIR BUILDER_CONFIG WORKDIR OUT_JSON

Joins a 2-process JAX cluster on 127.0.0.1:PORT (2 CPU devices each), runs the
job on the shared WORKDIR twice (stopped after one shard, then resumed) and
writes both results to OUT_JSON.
"""

import json
import os
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

NUM_SAMPLES, BATCH, SHARD = 16, 8, 8  # two shards of one batch each


class TinyInception(nnx.Module):
  """Stand-in for the FID Inception (its interface, fixed random projections): the real
  network's 299 px forward would take most of the test file's time budget."""

  def __init__(self):
    rng = np.random.default_rng(0)
    self.proj = nnx.Param(jnp.asarray(rng.normal(size=(48, 32)), jnp.float32))
    self.fc = nnx.Param(jnp.asarray(rng.normal(size=(32, 10)), jnp.float32))

  def features_and_logits(self, images):
    assert images.shape[-1] == 3
    x = jax.image.resize(images, (images.shape[0], 4, 4, 3), 'linear').reshape(-1, 48)
    feats = jax.nn.relu((2.0 * x - 1.0) @ self.proj[...])
    return feats, feats @ self.fc[...]


def gen_config(data_dir: str, build: str, **gen):
  """A 1-block DiT of patch 8 sampled in 2 steps; 16 samples in 2 shards; eval.gen overrides."""
  from mmgen_jax import config_schema  # pylint: disable=g-import-not-at-top
  c = config_schema.base_config()
  c.data.builder_config, c.data.data_dir = build, data_dir
  c.data.global_batch_size = 8
  c.model.patch_size, c.model.hidden_size, c.model.depth, c.model.num_heads = 8, 32, 1, 2
  c.allow_narrow_patch = True
  c.sample.num_steps = 2
  c.train.rng_impl = 'rbg'
  g = c.eval.gen
  g.num_samples, g.batch, g.shard_size = NUM_SAMPLES, BATCH, SHARD
  g.features = 'inception,scenes'
  g.reference_split = 'validation'
  g.scenes_net.widths = (8, 16)
  for k, v in gen.items():
    g[k] = v
  return c


def make_parts(config, mesh):
  """(model, extractor): the random DiT replicated on the mesh, the stand-in Inception and
  untrained scenes networks; the same on every process."""
  from mmgen_jax import generation_eval as ge  # pylint: disable=g-import-not-at-top
  from mmgen_jax import parallel  # pylint: disable=g-import-not-at-top
  from mmgen_jax import train  # pylint: disable=g-import-not-at-top
  from mmgen_jax.models import scenes_features  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(train.default_parts(config).model_fn(nnx.Rngs(0)))
  model = nnx.merge(graphdef, jax.device_put(state, parallel.replicated(mesh)))
  scenes = scenes_features.build(scenes_features.net_config(config), seed=0)
  return model, ge.make_extractor(config, '', mesh, inception_model=TinyInception(),
                                  scenes_model=scenes)


def main(process_id: int, port: int, data_dir: str, build: str, workdir: str, out: str) -> None:
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                             process_id=process_id, initialization_timeout=60)
  from mmgen_jax import generation_eval as ge  # pylint: disable=g-import-not-at-top
  from mmgen_jax import parallel  # pylint: disable=g-import-not-at-top
  config = gen_config(data_dir, build)
  mesh = parallel.make_mesh(config.mesh)
  model, extractor = make_parts(config, mesh)
  first = ge.evaluate_generation(config, workdir, model, 7, mesh, extractor=extractor,
                                 max_new_shards=1)
  shards = sorted(os.listdir(ge.shard_dir(workdir, 7)))
  scores = ge.evaluate_generation(config, workdir, model, 7, mesh, extractor=extractor)
  with open(out, 'w') as f:
    json.dump({'process_index': jax.process_index(), 'first': first, 'shards_after_stop': shards,
               'scores': scores}, f)
  jax.distributed.shutdown()


if __name__ == '__main__':
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
  os.environ['JAX_PLATFORMS'] = 'cpu'
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:7])
