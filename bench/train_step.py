r"""Train-step speed on this machine, as JSON: step time, images/s, FLOPs and utilisation.

Cases:
  tiny      the tiny CPU config (pixel space, width 128, depth 4);
  dit_s2    tiny's data (10 pixel channels at 32×32) at DiT-S/2 size: width 384,
            depth 12, 6 heads, patch 2 (256 tokens);
  mmgen_s2  MMGen's recipe (configs/imagenet256_xl2.py) at SiT-S/2 size: 4
            modalities × 4 latent channels at 32×32, REPA projector after block 8
            with its loss (coefficient 0.5, against random stand-in features), the
            size `bench/peer_mmgen_torch.py` runs the official PyTorch model at;
  a path    any config file.
Each in float32 and bfloat16 compute, on every local device (one CPU device
unless XLA_FLAGS asks for more), timed after one warm-up step.

FLOPs: the analytic matmul count of `plan.analytic_forward_flops` × 3 (forward +
backward) × batch, and XLA's count beside it (the step lowered with the trunk's
scan unrolled: XLA counts a loop body once). Utilisation is the analytic FLOP rate over this machine's own matmul
peak (a square matmul timed in the same dtype right after each case; bfloat16
accumulates in float32 as the model does), not a datasheet figure.

  python bench/train_step.py [--steps=10] [--batch=8] [--cases=tiny,dit_s2,mmgen_s2,configs/x.py] \
      [--dtypes=float32,bfloat16] [--matmul_size=2048]
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Mapping

from absl import app
from absl import flags
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

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPA_COEFF = 0.5  # MMGen's --proj-coeff

_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per case (after one warm-up step).')
_BATCH = flags.DEFINE_integer('batch', 8, 'Global batch of the dit_s2 and mmgen_s2 cases.')
_CASES = flags.DEFINE_list('cases', ['tiny', 'dit_s2', 'mmgen_s2'], 'Which models.')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes.')
_MATMUL = flags.DEFINE_integer('matmul_size', 2048, 'Side of the square peak-matmul.')


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
  c = load_config(os.path.join(_REPO, 'configs', 'imagenet256_xl2.py'))
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


def case_config(name: str, dtype: str, batch: int) -> ml_collections.ConfigDict:
  """'tiny', 'dit_s2', 'mmgen_s2' (see the module docstring) or a config file path."""
  if name.endswith('.py'):
    c = load_config(name)
  elif name == 'mmgen_s2':
    return mmgen_config(dtype, batch)
  else:
    c = load_config(os.path.join(_REPO, 'configs', 'tiny_cpu.py'))
    if name == 'dit_s2':
      c.model.hidden_size, c.model.depth, c.model.num_heads, c.model.patch_size = 384, 12, 6, 2
      c.data.global_batch_size = batch
    elif name != 'tiny':
      raise ValueError(f'unknown case {name!r}; cases: tiny, dit_s2, mmgen_s2 or a config '
                       'file path.')
  c.model.dtype = dtype
  return c


# ---- the REPA loss (the objectives leave it out: the data carries no encoder features) --


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


def matmul_peak(dtype: str, n: int, repeats: int = 5) -> float:
  """Best FLOP/s of an n×n @ n×n matmul in `dtype` (float32 accumulation)."""
  a = jnp.ones((n, n), dtype)
  b = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  f(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best


def machine() -> dict[str, Any]:
  devices = jax.devices()
  return dict(platform=platform.platform(), processor=platform.processor(),
              cpu_count=os.cpu_count(), cpus_usable=len(os.sched_getaffinity(0)),
              load_average_1min=os.getloadavg()[0], backend=jax.default_backend(),
              devices=len(devices), device_kind=devices[0].device_kind, jax=jax.__version__,
              xla_flags=os.environ.get('XLA_FLAGS', ''))


def main(argv: list[str]) -> None:
  del argv
  results = []
  for name in _CASES.value:
    for dtype in _DTYPES.value:
      config = case_config(name, dtype, _BATCH.value)
      prepared = prepare(config)
      r = summary(prepared, prepared.run(_STEPS.value))
      # The peak is timed right after the case: on a shared machine both see the same load.
      peak = matmul_peak(dtype, _MATMUL.value)
      r.update(case=name, dtype=dtype, description=config_validation.describe(config),
               matmul_peak_flops_per_s=peak,
               utilisation_of_matmul_peak=r['analytic_flops_per_s'] / jax.device_count() / peak)
      results.append(r)
      print(json.dumps(r), flush=True)
  print(json.dumps(dict(machine=machine(), matmul_size=_MATMUL.value, results=results),
                   indent=1))


if __name__ == '__main__':
  app.run(main)
