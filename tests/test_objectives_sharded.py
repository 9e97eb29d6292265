"""Both objectives with the real DiT: a (2, 2, 2) mesh trains like one device.

Losses, gradients (leaf by leaf) and the parameters after a few steps are
compared. The start is randomised: at the zero initialisation (adaLN-Zero
gates, zero final layers) the blocks do not change the output and most
gradients are exactly zero, so agreement there would say little.
"""

import jax
import numpy as np
import optax
import pytest

from mmgen_jax import config_schema
from mmgen_jax import modalities as modalities_lib
from mmgen_jax import parallel
from mmgen_jax import train
from mmgen_jax import train_state as ts
from mmgen_jax.data import pipeline

NUM_STEPS = 3


def _config(objective: str):
  c = config_schema.base_config()
  c.data.resolution = 8
  c.data.global_batch_size = 8
  c.model.patch_size, c.model.hidden_size, c.model.depth, c.model.num_heads = 2, 32, 2, 2
  c.train.rng_impl = 'rbg'
  c.optim.learning_rate = 1e-2  # steps large enough to move every parameter visibly
  if objective == 'mt_elbo':
    c.modalities = config_schema.scenes_modalities(with_label_modality=True)
    c.objective.name, c.objective.path, c.objective.prediction = 'mt_elbo', 'vp_cosine', 'eps'
  return c


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  n, r = config.data.global_batch_size, config.data.resolution
  batch = {'label': rng.integers(0, config.data.num_classes, n).astype(np.int32)}
  for m in modalities_lib.from_config(config.modalities):
    batch[m.name] = (rng.uniform(-1, 1, (n, r, r, m.channels)).astype(np.float32) if m.is_image
                     else rng.integers(0, m.channels, n).astype(np.int32))
  return batch


def _randomised(state: ts.TrainState) -> ts.TrainState:
  """Every parameter plus N(0, 0.05²) noise, so zero-initialised layers take part."""
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda x: x + rng.normal(0.0, 0.05, x.shape).astype(x.dtype),
                        state.params)
  return state.replace(params=params, ema_params=params)


def _train(config, mesh, init):
  """NUM_STEPS steps from `init` (None: a randomised start) on `mesh`.

  Returns the losses, each step's gradients, the final parameters and the start.
  """
  parts = train.default_parts(config)
  schedule = ts.make_schedule(config.optim, 10)
  # optax.trace(decay=0) keeps each step's raw gradient in the optimizer state, so the
  # compiled step itself reports the gradients it applied.
  tx = optax.chain(optax.trace(decay=0.0), ts.make_optimizer(config.optim, schedule))
  plan = ts.plan_train_state(parts.model_fn, tx, mesh, config.sharding_rules, 0,
                             config.train.rng_impl)
  step = ts.jit_train_step(
      ts.make_train_step(plan.graphdef, parts.loss_fn, tx, schedule, ema_decay=0.9,
                         rng_impl=config.train.rng_impl),
      plan.shardings, parallel.batch_sharding(mesh, config.sharding_rules), mesh)
  if init is None:
    init = _randomised(jax.device_get(plan.init()))
  state = jax.device_put(init, plan.shardings)
  losses, grads = [], []
  for i in range(NUM_STEPS):
    batch = pipeline.to_global_batch(_batch(config, i), mesh, config.sharding_rules)
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
    grads.append(jax.device_get(state.opt_state[0].trace))
  return np.array(losses), grads, jax.device_get(state.params), init


def _assert_leaves_close(a, b, what: str, *, rtol: float, atol: float | None = None):
  """Leaf by leaf; `atol` defaults to `rtol` of each leaf's largest magnitude."""
  paths_a, paths_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  for (path, x), (path_b, y) in zip(paths_a, paths_b, strict=True):
    name = jax.tree_util.keystr(path)
    assert name == jax.tree_util.keystr(path_b), (name, jax.tree_util.keystr(path_b))
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * np.abs(y).max() if atol is None
                               else atol, err_msg=f'{what} {name}')


@pytest.mark.slow
@pytest.mark.parametrize('objective', ['decoupled', 'mt_elbo'])
def test_train_steps_are_the_same_on_a_2x2x2_mesh(objective):
  config = _config(objective)
  one = jax.make_mesh((1, 1, 1), parallel.MESH_AXES, devices=jax.devices()[:1],
                      axis_types=(jax.sharding.AxisType.Auto,) * 3)
  ref_losses, ref_grads, ref_params, init = _train(config, one, None)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  losses, grads, params, _ = _train(config, parallel.make_mesh(config.mesh), init)

  assert np.all(np.isfinite(ref_losses))
  for path, g in jax.tree_util.tree_leaves_with_path(ref_grads[0]):  # every block takes part
    assert np.any(g != 0), f'zero gradient for {jax.tree_util.keystr(path)}'
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  # Sharded sums add in another order: measured up to 5e-5 of a leaf's largest entry.
  for i, (g, ref) in enumerate(zip(grads, ref_grads, strict=True)):
    _assert_leaves_close(g, ref, f'step {i + 1} gradient of', rtol=3e-4)
  # Adam divides a gradient by its own size, so entries whose gradient is zero up to
  # round-off (the key bias: softmax ignores a shift shared by all keys) take steps
  # made of round-off: measured up to lr / 50 after 3 steps; every entry moved ~3 lr.
  _assert_leaves_close(params, ref_params, f'after {NUM_STEPS} steps,', rtol=0.0,
                       atol=config.optim.learning_rate / 10)
