"""A tiny, fast training task for the loop, sharding and checkpoint tests.

A per-pixel denoiser (an MLP whose parameters carry the project's logical axis
names) learns velocity prediction on a deterministic synthetic RGB + depth
dataset served by a Grain iterator, so the tests exercise the real loop,
shardings, Orbax and Grain state without the TFDS data or the full DiT.

Run as a script it trains one process of a (possibly multi-process) job and
prints the per-step losses as JSON (used by the multi-process and preemption
tests):

  XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/tiny_task.py \
      --workdir DIR --num_steps N [--mesh=-1,2,1] \
      [--coordinator 127.0.0.1:PORT --num_processes 2 --process_id 0]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any, Mapping

import numpy as np

CHANNELS = {'rgb': 3, 'depth': 1}
NUM_CLASSES = 4


def tiny_config(**overrides: Any):
  """The base config shrunk to seconds: 8x8 RGB + depth, batch 16."""
  from mmgen_jax import config_schema, modalities  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = config_schema.base_config()
  c.modalities = ml_collections.ConfigDict(dict(
      rgb=modalities.spec(0, 'rgb', 1.0), depth=modalities.spec(1, 'depth', 0.5)))
  c.data.resolution = 8
  c.data.global_batch_size = 16
  c.data.num_classes = NUM_CLASSES
  c.model.hidden_size = 64
  c.optim.learning_rate = 1e-2
  c.optim.ema_decay = 0.9
  c.optim.grad_clip_norm = 1.0
  c.train.num_steps = 6
  c.train.log_every = 1
  c.train.checkpoint_every = 3
  c.train.keep_checkpoints = 5
  c.train.sample_every = 1000
  c.sample.num_steps = 2
  c.train.rng_impl = 'rbg'  # compiles in a fraction of threefry's time on CPU
  c.sample.num_images = 4
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  for key, value in overrides.items():
    target = c
    *parents, leaf = key.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c


def make_model_fn(config):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def part(init, names):
    return nnx.with_partitioning(init, names)

  class TinyDenoiser(nnx.Module):
    """v(x_t, t, y) per pixel: [x_t, t] -> width (+ class embedding) -> MLP block -> v."""

    def __init__(self, channels: int, width: int, num_classes: int, *, rngs: nnx.Rngs):
      lecun, zeros = nnx.initializers.lecun_normal(), nnx.initializers.zeros_init()
      def dense(n_in, n_out, names):
        return nnx.Linear(n_in, n_out, rngs=rngs, kernel_init=part(lecun, names),
                          bias_init=part(zeros, names[1:]))
      self.inp = dense(channels + 1, width, ('channels', 'embed'))
      self.label = nnx.Embed(num_classes, width, rngs=rngs,
                             embedding_init=part(nnx.initializers.normal(0.02), ('vocab', 'embed')))
      self.up = dense(width, 2 * width, ('embed', 'mlp'))
      self.down = dense(2 * width, width, ('mlp', 'embed'))
      self.out = dense(width, channels, ('embed', 'channels'))

    def __call__(self, x, t, y):
      n, h, w, _ = x.shape
      tt = jnp.broadcast_to(t[:, None, None, None], (n, h, w, 1))
      z = self.inp(jnp.concatenate([x, tt], -1)) + self.label(y)[:, None, None, :]
      z = z + self.down(nnx.gelu(self.up(nnx.gelu(z))))
      return self.out(z)

  channels = sum(CHANNELS.values())
  return lambda rngs: TinyDenoiser(channels, int(config.model.hidden_size), NUM_CLASSES, rngs=rngs)


def loss_fn(model, batch: Mapping[str, Any], rng):
  """Flow-matching velocity loss, per-modality MSE, weights as in the tiny config."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x0 = jnp.concatenate([batch[name] for name in CHANNELS], -1)
  k_t, k_eps = jax.random.split(rng)
  t = jax.random.uniform(k_t, (x0.shape[0],))
  eps = jax.random.normal(k_eps, x0.shape)
  x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
  err = (model(x_t, t, batch['label']) - (eps - x0)) ** 2
  rgb, depth = err[..., :3].mean(), err[..., 3:].mean()
  loss = 1.0 * rgb + 0.5 * depth
  return loss, {'loss/rgb': rgb, 'loss/depth': depth}


def example(index: int, resolution: int) -> dict[str, np.ndarray]:
  """Record `index`: a smooth random RGB image, its 'depth' (mean colour) and a class."""
  g = np.random.default_rng(index)
  coarse = g.uniform(-1, 1, (2, 2, 3)).astype(np.float32)
  rgb = np.kron(coarse, np.ones((resolution // 2, resolution // 2, 1), np.float32))
  return dict(rgb=rgb, depth=rgb.mean(-1, keepdims=True), label=np.int32(index % NUM_CLASSES))


def make_data_iter(config, process_index: int, process_count: int, nan_at_step: int = -1):
  """This process's share of each global batch: rows [p*L, (p+1)*L) of batch b.

  Batch b (0-based) of the whole job is records b*G .. b*G+G-1, so any process
  count sees the same global batches. `nan_at_step` poisons the batch used at
  that (1-based) step.
  """
  import grain  # pylint: disable=g-import-not-at-top
  g = int(config.data.global_batch_size)
  local = g // process_count
  res = int(config.data.resolution)

  def batch(b: int) -> dict[str, np.ndarray]:
    rows = [example(b * g + process_index * local + j, res) for j in range(local)]
    out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    if b + 1 == nan_at_step:
      out['rgb'][0, 0, 0, 0] = np.nan
    return out

  return iter(grain.MapDataset.range(10**6).map(batch).to_iter_dataset())


def sample_fn(model, rng) -> dict[str, np.ndarray]:
  """Two Euler steps from noise for four labels; one grid row per modality."""
  from mmgen_jax import parallel, visualize  # pylint: disable=g-import-not-at-top
  x = parallel.to_host(_euler(model, rng))
  return {'joint': visualize.make_grid({'rgb': visualize.modality_to_rgb(x[..., :3], 'rgb'),
                                        'depth': visualize.modality_to_rgb(x[..., 3:], 'depth')})}


def _euler(model, rng):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  @nnx.jit
  def run(model, rng):
    x = jax.random.normal(rng, (4, 8, 8, 4))
    y = jnp.arange(4) % NUM_CLASSES
    for t in (1.0, 0.5):
      x = x - 0.5 * model(x, jnp.full((4,), t), y)
    return x
  return run(model, rng)


def make_parts(config, nan_at_step: int = -1, sigterm_at_step: int = -1):
  """The loop's parts; `sigterm_at_step` sends SIGTERM to this process while that
  step's batch is being placed on the devices (a preemption notice mid-step).
  (Grain reads ahead, so the data pipeline itself cannot time it.)"""
  from mmgen_jax import train  # pylint: disable=g-import-not-at-top
  from mmgen_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  calls = []

  def to_global_batch(batch, mesh, rules):
    calls.append(None)
    if len(calls) == sigterm_at_step:
      os.kill(os.getpid(), signal.SIGTERM)
    return pipeline.to_global_batch(batch, mesh, rules)

  return train.Parts(
      model_fn=make_model_fn(config), loss_fn=loss_fn,
      make_data_iter=lambda p, n: make_data_iter(config, p, n, nan_at_step),
      to_global_batch=to_global_batch, sample_fn=sample_fn)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument('--workdir', required=True)
  ap.add_argument('--num_steps', type=int, default=4)
  ap.add_argument('--mesh', default='-1,1,1')
  ap.add_argument('--checkpoint_every', type=int, default=1000)
  ap.add_argument('--coordinator', default=None)
  ap.add_argument('--num_processes', type=int, default=None)
  ap.add_argument('--process_id', type=int, default=None)
  args = ap.parse_args(argv)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_default_matmul_precision', 'highest')
  from mmgen_jax import parallel, train  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)

  data, fsdp, tensor = (int(v) for v in args.mesh.split(','))
  config = tiny_config(**{'train.num_steps': args.num_steps, 'mesh.data': data,
                          'mesh.fsdp': fsdp, 'mesh.tensor': tensor,
                          'train.checkpoint_every': args.checkpoint_every})
  result = train.train_and_evaluate(config, args.workdir, parts=make_parts(config))
  print('RESULT ' + json.dumps({'process': jax.process_index(),
                                'loss_history': result['loss_history'],
                                'step': result['step'], 'preempted': result['preempted']}),
        flush=True)


if __name__ == '__main__':
  main()
