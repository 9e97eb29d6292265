"""Build, compile and time one train step: the shared part of the benchmarks.

`prepare(config)` compiles the step of a config on one fixed random batch and
warms it up; `PreparedStep.run(n)` times n steps. `mmgen_config` is MMGen's
released recipe (configs/imagenet256_xl2.py) at any size; models with a REPA
projector train with MMGen's projection loss against random stand-in targets
(the objectives leave that loss out: the data carries no encoder features).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import platform
import statistics
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmgen_jax import config_validation
from mmgen_jax import modalities as modalities_lib
from mmgen_jax import parallel
from mmgen_jax import plan as plan_lib
from mmgen_jax import train
from mmgen_jax import train_state
from mmgen_jax.models import build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPA_COEFF = 0.5  # MMGen's --proj-coeff


# ---- configs ------------------------------------------------------------------------


def load_config(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file (what --config=path does)."""
  spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def mmgen_config(dtype: str, batch: int, *, hidden: int = 384, depth: int = 12, heads: int = 6,
                 latent_side: int = 32, num_modalities: int = 4) -> ml_collections.ConfigDict:
  """MMGen's released recipe resized: `num_modalities` × 4 latent channels, patch 2.

  Modalities past MMGen's four are extra depth-like maps; REPA reads block
  min(8, depth) as MMGen's --encoder-depth=8 does when the trunk is deep enough.
  """
  c = load_config(os.path.join(REPO, 'configs', 'imagenet256_xl2.py'))
  if num_modalities < 1:
    raise ValueError(f'num_modalities={num_modalities} must be >= 1.')
  mods = {name: spec for name, spec in c.modalities.items() if spec.slot < num_modalities}
  for slot in range(len(mods), num_modalities):
    mods[f'extra{slot}'] = modalities_lib.spec(slot, 'depth', 0.1)
  with c.unlocked():
    c.modalities = ml_collections.ConfigDict(mods)
  c.data.resolution = 8 * latent_side  # the SD-VAE codec downsamples by 8
  c.data.global_batch_size = batch
  c.objective.group_size = batch
  c.model.hidden_size, c.model.depth, c.model.num_heads = hidden, depth, heads
  c.model.repa_encoder_depth = min(8, depth)
  c.model.dtype = dtype
  return c


# ---- MMGen's REPA loss --------------------------------------------------------------


def repa_loss(zs: tuple[jax.Array, ...], target: jax.Array) -> jax.Array:
  """MMGen's projection loss: -cos(projected token, target feature), mean over samples,
  tokens and projectors (loss.py with torch's F.normalize, eps 1e-12)."""
  def unit(v):
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
  return jnp.mean(jnp.stack([-(unit(z) * unit(target)).sum(-1).mean() for z in zs]))


class _KeepZs:
  """Calls the model and keeps the REPA projections it returns."""

  def __init__(self, model):
    self.model, self.zs = model, ()

  def __call__(self, *args, **kwargs):
    out = self.model(*args, **kwargs)
    self.zs = out.zs
    return out


def with_repa_loss(loss_fn: Callable, coeff: float) -> Callable:
  """loss_fn plus coeff × `repa_loss` of the model's projections to batch['repa_features']."""
  def loss(model, batch: Mapping[str, jax.Array], rng):
    keep = _KeepZs(model)
    value, metrics = loss_fn(keep, batch, rng)
    proj = repa_loss(keep.zs, batch['repa_features'])
    return value + coeff * proj, {**metrics, 'proj_loss': proj}
  return loss


# ---- timing ---------------------------------------------------------------------------


def batch_specs(config) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of one batch the config trains on, plus the REPA targets when it has a projector."""
  specs = dict(plan_lib.abstract_batch(config, config.data.global_batch_size))
  if int(config.model.repa_encoder_depth) > 0:
    side = build.model_kwargs(config)['input_size'] // int(config.model.patch_size)
    specs['repa_features'] = jax.ShapeDtypeStruct(
        (config.data.global_batch_size, side * side, int(config.model.repa_z_dim)), jnp.float32)
  return specs


def random_batch(config, sharding) -> dict[str, jax.Array]:
  """A fixed random batch of `batch_specs(config)`."""
  rng = np.random.default_rng(0)
  out = {}
  for key, spec in batch_specs(config).items():
    if jnp.issubdtype(spec.dtype, jnp.integer):
      x = rng.integers(0, config.data.num_classes, spec.shape).astype(spec.dtype)
    else:
      x = rng.uniform(-1, 1, spec.shape).astype(spec.dtype)
    out[key] = jax.device_put(x, sharding)
  return out


@dataclasses.dataclass
class PreparedStep:
  """A compiled train step with its state and one fixed batch, warmed up, ready to time."""
  config: ml_collections.ConfigDict
  compiled: Any
  state: Any
  batch: dict[str, jax.Array]
  mesh: jax.sharding.Mesh
  compile_s: float
  xla_flops: float          # XLA's count of the step (`xla_step_flops`), 0 if not taken
  analytic_flops: float     # matmul FLOPs: 3 × forward × batch
  params: int
  metrics: dict[str, Any] = dataclasses.field(default_factory=dict)

  def run(self, steps: int) -> list[float]:
    """Seconds of each of `steps` steps (the state carries over between calls)."""
    times = []
    with jax.set_mesh(self.mesh):
      for _ in range(steps):
        start = time.perf_counter()
        self.state, self.metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready(self.metrics)
        times.append(time.perf_counter() - start)
    return times


def _jitted_step(config: ml_collections.ConfigDict):
  """(state plan, jitted step, batch sharding, mesh) of `config`, with the REPA loss when the
  model has a projector."""
  parts = train.default_parts(config)
  loss_fn = parts.loss_fn
  if int(config.model.repa_encoder_depth) > 0:
    loss_fn = with_repa_loss(loss_fn, REPA_COEFF)
  mesh = parallel.make_mesh(config.mesh)
  schedule = train_state.make_schedule(config.optim, config.train.num_steps)
  tx = train_state.make_optimizer(config.optim, schedule)
  rng_impl = config.train.rng_impl
  plan = train_state.plan_train_state(parts.model_fn, tx, mesh, config.sharding_rules, 0,
                                      rng_impl)
  batch_sharding = parallel.batch_sharding(mesh, config.sharding_rules)
  step = train_state.jit_train_step(
      train_state.make_train_step(plan.graphdef, loss_fn, tx, schedule,
                                  ema_decay=float(config.optim.ema_decay), rng_impl=rng_impl),
      plan.shardings, batch_sharding, mesh)
  return plan, step, batch_sharding, mesh


def xla_step_flops(config: ml_collections.ConfigDict) -> float:
  """XLA's FLOP count of the whole step: lowered (not compiled) with the trunk's scan
  unrolled, since XLA counts a loop body once."""
  unrolled = config.copy_and_resolve_references()
  unrolled.model.scan_unroll = max(1, int(config.model.depth))
  plan, step, batch_sharding, mesh = _jitted_step(unrolled)
  with jax.set_mesh(mesh):
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
             for k, v in batch_specs(unrolled).items()}
    return train_state.step_flops(step.lower(plan.abstract, batch).cost_analysis())


def prepare(config: ml_collections.ConfigDict, *, count_xla_flops: bool = True) -> PreparedStep:
  """Builds, compiles and warms up the train step of `config`."""
  config_validation.validate(config)
  plan, step, batch_sharding, mesh = _jitted_step(config)
  with jax.set_mesh(mesh):
    state = plan.init()
    batch = random_batch(config, batch_sharding)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
  n = int(config.data.global_batch_size)
  prepared = PreparedStep(
      config=config, compiled=compiled, state=state, batch=batch, mesh=mesh,
      compile_s=compile_s, xla_flops=xla_step_flops(config) if count_xla_flops else 0.0,
      analytic_flops=3 * n * plan_lib.analytic_forward_flops(config),
      params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)))
  prepared.run(1)  # warm-up
  return prepared


def summary(prepared: PreparedStep, times: list[float]) -> dict[str, Any]:
  step_s = statistics.median(times)
  n = int(prepared.config.data.global_batch_size)
  return dict(params=prepared.params, batch=n, step_time_s=step_s, step_time_min_s=min(times),
              images_per_s=n / step_s, analytic_flops_per_step=prepared.analytic_flops,
              xla_flops_per_step=prepared.xla_flops,
              analytic_flops_per_s=prepared.analytic_flops / step_s,
              compile_s=prepared.compile_s, loss=float(prepared.metrics['loss']))


def machine() -> dict[str, Any]:
  """What the figures were measured on (the load average says how shared it was)."""
  devices = jax.devices()
  return dict(platform=platform.platform(), processor=platform.processor(),
              cpu_count=os.cpu_count(), cpus_usable=len(os.sched_getaffinity(0)),
              load_average_1min=os.getloadavg()[0], backend=jax.default_backend(),
              devices=len(devices), device_kind=devices[0].device_kind, jax=jax.__version__,
              xla_flags=os.environ.get('XLA_FLAGS', ''),
              ld_preload=os.environ.get('LD_PRELOAD', ''))
