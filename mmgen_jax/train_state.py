"""Train state, optimizer and the pure train step.

The state is a pytree of arrays only (parameters as `nnx.to_pure_dict`
dicts), so the step is a pure function `train_step(state, batch) -> (state,
metrics)` that jit can shard and donate, and Orbax can save as is. The model's
structure (`nnx.GraphDef`) stays outside and is merged back inside the step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
import optax

from mmgen_jax import parallel

LossFn = Callable[[nnx.Module, Mapping[str, jax.Array], jax.Array],
                  tuple[jax.Array, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: number of optimizer updates done
  params: Any            # trainable parameters (nested dict, f32)
  ema_params: Any        # exponential moving average of `params`
  opt_state: Any         # optax state (f32)
  rng: jax.Array         # base key; the step's key is fold_in(rng, step)
  model_state: Any       # non-trainable model variables ({} for the DiT)


# ---- optimizer ----------------------------------------------------------------


def make_schedule(optim_cfg: Any, num_steps: int) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then constant or cosine decay to 0 at `num_steps`."""
  lr, warmup = float(optim_cfg.learning_rate), int(optim_cfg.warmup_steps)
  if optim_cfg.schedule == 'constant':
    after = optax.constant_schedule(lr)
  elif optim_cfg.schedule == 'cosine':
    after = optax.cosine_decay_schedule(lr, max(1, num_steps - warmup))
  else:
    raise ValueError(f"config.optim.schedule={optim_cfg.schedule!r} is not one of "
                     "['constant', 'cosine'].")
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(optim_cfg: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (decoupled weight decay)."""
  parts = []
  if float(optim_cfg.grad_clip_norm) > 0:
    parts.append(optax.clip_by_global_norm(float(optim_cfg.grad_clip_norm)))
  parts.append(optax.adamw(schedule, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2),
                           weight_decay=float(optim_cfg.weight_decay)))
  return optax.chain(*parts)


# ---- creation -------------------------------------------------------------------


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, Any, Any]:
  """(graphdef, params, other variables), the last two as pure dicts."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def merge_model(graphdef: nnx.GraphDef, params: Any, model_state: Any) -> nnx.Module:
  return nnx.merge(graphdef, params, model_state)


def state_shardings(abstract_model: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: Any) -> TrainState:
  """Shardings of every TrainState leaf: parameters and their moments by the rules."""
  _, params, rest = nnx.split(abstract_model, nnx.Param, ...)
  param_sh = parallel.model_shardings(params, mesh, rules)
  rest_sh = parallel.model_shardings(rest, mesh, rules)
  repl = parallel.replicated(mesh)
  abstract_opt = jax.eval_shape(tx.init, nnx.to_pure_dict(params))
  # Optimizer moments mirror the parameters; counters and the like are replicated.
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sh,
                                 transform_non_params=lambda _: repl,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))
  return TrainState(step=repl, params=param_sh, ema_params=param_sh, opt_state=opt_sh,
                    rng=repl, model_state=rest_sh)


@dataclasses.dataclass(frozen=True)
class StatePlan:
  """Everything about the train state known before any memory is used."""
  graphdef: nnx.GraphDef
  shardings: TrainState     # NamedSharding per leaf
  abstract: TrainState      # ShapeDtypeStructs carrying those shardings (restore target)
  init: Callable[[], TrainState]  # creates the state directly in its shards


def plan_train_state(model_fn: Callable[[nnx.Rngs], nnx.Module],
                     tx: optax.GradientTransformation, mesh: Mesh, rules: Any, seed: int,
                     rng_impl: str = 'threefry2x32') -> StatePlan:
  """Shapes and shardings of the state, and how to create it.

  Parameters come from `nnx.Rngs(key(seed))`; the train-time key is derived
  from the same key, so one seed fixes the run. The key is stored as raw
  uint32 data (`rng_impl` says how to read it) so Orbax saves it like any array.
  """
  key = jax.random.key(seed, impl=rng_impl)
  abstract_model = parallel.abstract_model(model_fn, key)
  graphdef = nnx.split(abstract_model, nnx.Param, ...)[0]
  shardings = state_shardings(abstract_model, tx, mesh, rules)

  def init_fn() -> TrainState:
    with nnx.use_eager_sharding(False):  # placement comes from `shardings`
      _, params, rest = split_model(model_fn(nnx.Rngs(key)))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.fold_in(key, 1)),
                      model_state=rest)

  shapes = jax.eval_shape(init_fn)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
  return StatePlan(graphdef=graphdef, shardings=shardings, abstract=abstract,
                   init=lambda: parallel.sharded_init(init_fn, shardings, mesh))


# ---- the step -------------------------------------------------------------------------


def _micro_batches(batch: Mapping[str, jax.Array], k: int) -> dict[str, jax.Array]:
  """(B, ...) -> (k, B/k, ...), micro-batch i = rows i, i+k, ...

  Strided rather than contiguous so that each device's rows stay local.
  """
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f'batch size {x.shape[0]} is not divisible by '
                       f'config.optim.grad_accum_steps={k}.')
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
  return {name: split(x) for name, x in batch.items()}


StepFn = Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]


def ema_decay_at(step: jax.Array, ema_decay: float) -> jax.Array:
  """EMA decay with a warm-up: min(decay, (1 + step) / (10 + step)).

  A fixed 0.999 would keep ~37% of the zero-initialised (adaLN-Zero) weights
  after 1,000 steps, so a short run's EMA model predicts a velocity far too
  small and its samples stay close to the initial noise.
  """
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, ema_decay: float, grad_accum_steps: int = 1,
                    rng_impl: str = 'threefry2x32') -> StepFn:
  """The pure update: loss and grads (optionally accumulated), AdamW, EMA.

  The step's key is fold_in(state.rng, state.step), so a resumed run draws the
  same noise as an uninterrupted one. Metrics: everything `loss_fn` returns
  (averaged over micro-batches) plus 'loss', 'grad_norm' (before clipping)
  and 'learning_rate'.
  """
  if grad_accum_steps < 1:
    raise ValueError(f'config.optim.grad_accum_steps={grad_accum_steps} must be >= 1.')

  def loss_of(params, model_state, batch, rng):
    loss, metrics = loss_fn(merge_model(graphdef, params, model_state), batch, rng)
    return loss, {**metrics, 'loss': loss}

  grad_fn = jax.value_and_grad(loss_of, has_aux=True)

  def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl=rng_impl), state.step)
    if grad_accum_steps == 1:
      (_, metrics), grads = grad_fn(state.params, state.model_state, batch, rng)
    else:
      def accumulate(carry, xs):
        i, micro = xs
        (_, m), g = grad_fn(state.params, state.model_state, micro, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (g, m)), None
      micro = _micro_batches(batch, grad_accum_steps)
      (_, m_shapes), g_shapes = jax.eval_shape(
          grad_fn, state.params, state.model_state, jax.tree.map(lambda x: x[0], micro), rng)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (g_shapes, m_shapes))
      (grads, metrics), _ = jax.lax.scan(
          accumulate, zeros, (jnp.arange(grad_accum_steps), micro))
      grads, metrics = jax.tree.map(lambda x: x / grad_accum_steps, (grads, metrics))

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, ema_decay)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    metrics = {**metrics, 'grad_norm': optax.global_norm(grads),
               'learning_rate': schedule(state.step)}
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                              opt_state=opt_state)
    return new_state, metrics

  return train_step


def step_flops(cost: Any, grad_accum_steps: int = 1) -> float:
  """FLOPs of one train step from XLA's `cost_analysis()` (lowered or compiled; 0 if absent).

  XLA counts a loop body once, and gradient accumulation runs the forward and
  backward in a scan of `grad_accum_steps` iterations, so the count is scaled.
  """
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', 0.0)) * grad_accum_steps


def jit_train_step(train_step: StepFn, shardings: TrainState, batch_sharding: NamedSharding,
                   mesh: Mesh) -> StepFn:
  """jit with explicit shardings; the old state's buffers are donated to the new one.

  The step is traced under `mesh` whether or not the caller is in `jax.set_mesh(mesh)`:
  the model's batch constraints (prompt encoder, DiT trunk) apply only under a mesh,
  and without them XLA's partitioner computed wrong values for the prompt path on a
  (2, 2, 2) mesh (jax 0.10.2; tests/test_prompt_model.py).
  """
  repl = parallel.replicated(mesh)

  def step_under_mesh(state, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return train_step(state, batch)

  return jax.jit(step_under_mesh, in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, repl), donate_argnums=0)
