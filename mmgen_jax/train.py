"""`train_and_evaluate(config, workdir)`: the training loop, top to bottom.

mesh -> data -> model (sharded init) -> optimizer/EMA -> checkpoint restore ->
loop (jitted step, metrics, checkpoints, sample grids) -> final checkpoint.

What is trained comes from `Parts` (model, loss, data, sampler); `default_parts`
builds them from the config, tests pass small stand-ins.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping

from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
from etils import epath
from flax import nnx
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from mmgen_jax import checkpoint as checkpoint_lib
from mmgen_jax import codec as codec_lib
from mmgen_jax import modalities as modalities_lib
from mmgen_jax import parallel
from mmgen_jax import plan as plan_lib
from mmgen_jax import train_state as ts_lib

Batch = Mapping[str, Any]


# Steps dispatched ahead of the newest finished one: 2 keeps the device busy
# while the host prepares the next batch.
_MAX_STEPS_IN_FLIGHT = 2


@dataclasses.dataclass(frozen=True)
class Parts:
  """What the loop trains; everything else comes from the config.

  model_fn(rngs) -> model; loss_fn(model, batch, rng) -> (loss, metrics);
  make_data_iter(process_index, process_count) -> checkpointable iterator of
  this process's numpy batches (`get_state`/`set_state`); to_global_batch(batch,
  mesh, rules) -> global jax.Arrays; sample_fn(model, rng) -> {name: uint8 grid}.
  """
  model_fn: Callable[[nnx.Rngs], nnx.Module]
  loss_fn: ts_lib.LossFn
  make_data_iter: Callable[[int, int], Iterator[Batch]]
  to_global_batch: Callable[[Batch, jax.sharding.Mesh, Any], dict[str, jax.Array]]
  sample_fn: Callable[[nnx.Module, jax.Array], dict[str, np.ndarray]] | None = None


# ---- the real parts ------------------------------------------------------------------


def default_parts(config: ml_collections.ConfigDict) -> Parts:
  """Model, objective, Grain pipeline and sample grids named by the config."""
  from mmgen_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mmgen_jax.models import build  # pylint: disable=g-import-not-at-top

  name = config.objective.name
  if name == 'decoupled':
    from mmgen_jax.diffusion import decoupled  # pylint: disable=g-import-not-at-top
    loss_fn = decoupled.make_loss_fn(config)
    model_fn = lambda rngs: build.build_model(config, rngs=rngs)
  elif name == 'mt_elbo':
    from mmgen_jax.diffusion import mt_elbo  # pylint: disable=g-import-not-at-top
    loss_fn = mt_elbo.make_loss_fn(config)
    model_fn = _mt_diffusion_fn(config)
  else:
    raise ValueError(f"config.objective.name={name!r} is not one of ['decoupled', 'mt_elbo'].")

  def make_data_iter(process_index: int, process_count: int):
    return pipeline.make_iterator(config, config.data.train_split, train=True,
                                  process_index=process_index, process_count=process_count)

  if config.codec.name == 'identity':
    return Parts(model_fn=model_fn, loss_fn=loss_fn, make_data_iter=make_data_iter,
                 to_global_batch=pipeline.to_global_batch, sample_fn=make_sample_fn(config))

  # Latents: the step draws them from posterior moments (the latent cache's, or
  # computed here from pixel batches by the VAE placed on the step's mesh).
  codecs = []  # one VAE, placed on the mesh of the first batch (a run has one mesh)

  def codec_on(mesh):
    if not codecs:
      codecs.append(codec_lib.from_config(config, mesh))
    return codecs[0]

  mask_pixels = None  # masked-image training (mt_elbo): boxes cut in pixels before the VAE
  if name == 'mt_elbo':
    mask_pixels = mt_elbo.make_pixel_masker(config)

  def to_global_batch(batch, mesh, rules):
    codec, batch = codec_on(mesh), pipeline.to_global_batch(batch, mesh, rules)
    return codec.add_moments(mask_pixels(batch, codec) if mask_pixels else batch)

  return Parts(model_fn=model_fn, loss_fn=codec_lib.wrap_loss(loss_fn, config),
               make_data_iter=make_data_iter, to_global_batch=to_global_batch,
               sample_fn=make_sample_fn(config, codec_on))


def _mt_diffusion_fn(config: ml_collections.ConfigDict) -> Callable[[nnx.Rngs], nnx.Module]:
  """MT-Diffusion: the DiT trunk laid out by `mt_encoders.trunk_spec`, plus the encoders."""
  # pylint: disable=g-import-not-at-top
  from mmgen_jax.models import build, dit, mt_encoders
  kwargs = build.model_kwargs(config)  # the trunk laid out by mt_encoders.trunk_spec
  side = kwargs['input_size']
  return lambda rngs: mt_encoders.build(dit.MMDiT(**kwargs, rngs=rngs), config,
                                        spatial=(side, side), rngs=rngs)


def held_out_records(config: ml_collections.ConfigDict, n: int,
                     source: Any = None) -> dict[str, np.ndarray]:
  """The first n records of config.data.eval_split as evaluation reads them (fixed
  order and prompt kinds; the same on every process), without the padding of its last
  batch: fewer than n when the split holds fewer (logged). `source` replaces the
  TFDS source (tests)."""
  from mmgen_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  split = config.data.eval_split
  it = pipeline.make_iterator(config, split, train=False, process_index=0, process_count=1,
                              source=source)
  parts, count = [], 0
  for batch in it:
    size = len(next(v for v in batch.values() if np.ndim(v)))
    arrays = {k: np.asarray(v) for k, v in batch.items()
              if not k.startswith('_') and np.ndim(v) and len(v) == size}
    keep = arrays.pop('valid', np.ones(size, bool)).astype(bool)  # padding repeats a record
    parts.append({k: v[keep] for k, v in arrays.items()})
    count += int(keep.sum())
    if count >= n:
      break
  if not count:
    raise ValueError(f'split {split!r} of {config.data.name!r} has no valid record to show in '
                     'the sample grids.')
  if count < n:
    logging.warning('Split %r holds %d records: grids of held-out records show %d columns, '
                    'not config.sample.num_images=%d.', split, count, count, n)
  return {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}


def make_sample_fn(config: ml_collections.ConfigDict, codec_on: Callable | None = None, *,
                   eval_source: Any = None
                   ) -> Callable[[nnx.Module, jax.Array], dict[str, np.ndarray]]:
  """Sample grids: joint generation from class labels or prompts, and understanding from RGB.

  Each grid has one labelled row per modality (depth as a colour map, normals
  as RGB, segmentation in its palette colours); tiles are enlarged to at least
  64 pixels. The RGB inputs for understanding are the first validation records
  (`held_out_records`: at most config.sample.num_images, the same on every
  process); their grid shows the input, then the predictions ('pred/…'), then the
  truths ('true/…'). A prompt model (config.prompt.name) generates from the
  prompts of the same records instead of class labels, with config.sample's
  prompt guidance: its 'prompt' grid (prompt_grid.make_prompt_grid) shows each
  prompt (words and entity images) above what it generated. With a latent codec
  the samples are latents, decoded for the grids (`codec_on(mesh)` shares the
  training run's VAE). `eval_source` replaces the validation records' TFDS source.
  """
  from mmgen_jax import prompt_grid  # pylint: disable=g-import-not-at-top
  from mmgen_jax import visualize  # pylint: disable=g-import-not-at-top
  mods = modalities_lib.from_config(config.modalities)
  images = modalities_lib.images(mods)
  n, res = int(config.sample.num_images), int(config.data.resolution)
  num_classes = int(config.data.num_classes)
  prompted = bool(config.get('prompt') and config.prompt.get('name'))
  grid = functools.partial(visualize.make_grid, scale=max(1, -(-64 // res)), labels=True)
  cache = {}

  def current_codec(_) -> codec_lib.Codec:  # placed on the mesh sampling runs under
    if 'codec' not in cache:
      mesh = jax.sharding.get_mesh()
      cache['codec'] = codec_lib.from_config(config, None if mesh.empty else mesh)
    return cache['codec']

  def held_out() -> dict[str, np.ndarray]:
    if 'batch' not in cache:
      cache['batch'] = held_out_records(config, n, eval_source)
    return cache['batch']

  def rows(arrays: Mapping[str, Any], prefix: str = '') -> dict[str, np.ndarray]:
    return {prefix + m.name: visualize.modality_to_rgb(parallel.to_host(arrays[m.name]), m.encoding,
                                                       m.palette)
            for m in images if m.name in arrays}

  def sample_prompted(model, rng, codec, kw) -> np.ndarray:
    from mmgen_jax.diffusion import samplers  # pylint: disable=g-import-not-at-top
    from mmgen_jax.models import prompt_encoder  # pylint: disable=g-import-not-at-top
    ref = held_out()
    prompt = prompt_encoder.from_batch(ref)
    if prompt is None:
      raise ValueError(f'config.prompt.name={config.prompt.name!r} but the records of split '
                       f'{config.data.eval_split!r} hold no prompt (keys: {sorted(ref)}).')
    out = codec.decode(samplers.sample(
        model, rng, shape=codec.model_shape(len(prompt.tokens), res), y=None, prompt=prompt,
        **{**kw, 'cfg_scale': 1.0}, **samplers.prompt_settings_from_config(config)))
    return prompt_grid.make_prompt_grid(ref, rows(out), prompt_grid.tile_scale(res))

  def sample_decoupled(model, rng) -> dict[str, np.ndarray]:
    from mmgen_jax.diffusion import samplers  # pylint: disable=g-import-not-at-top
    codec = (codec_on or current_codec)(None)
    kw = dict(mods=mods, channels=codec.model_channels(), num_classes=num_classes,
              **samplers.settings_from_config(config))
    k_joint, k_cond, k_enc = jax.random.split(rng, 3)
    if prompted:
      grids = {'prompt': sample_prompted(model, k_joint, codec, kw)}
    else:
      y = np.arange(n, dtype=np.int32) % num_classes
      grids = {'joint': grid(rows(codec.decode(samplers.sample(
          model, k_joint, y=y, shape=codec.model_shape(n, res), **kw))))}
    first = images[0].name
    if len(images) > 1:
      ref = held_out()
      num_ref = len(ref[first])  # fewer than n when the split holds fewer
      cond = codec.encode({first: ref[first]}, k_enc)
      out = codec.decode(samplers.sample(
          model, k_cond, y=np.full((num_ref,), num_classes, np.int32),
          shape=codec.model_shape(num_ref, res), condition=cond, **kw))
      given = rows({first: ref[first]}, 'input/')
      truth = rows({m.name: ref[m.name] for m in images[1:]}, 'true/')
      pred = rows({m.name: out[m.name] for m in images[1:]}, 'pred/')
      grids[f'from_{first}'] = grid({**given, **pred, **truth})
    return grids

  def sample_mt(model, rng) -> dict[str, np.ndarray]:
    from mmgen_jax.diffusion import mt_elbo  # pylint: disable=g-import-not-at-top
    # With a class modality the label is generated (read from its head), not given.
    y = None if modalities_lib.classes(mods) else np.arange(n, dtype=np.int32) % num_classes
    out = mt_elbo.sample(model, rng, mods=mods, cfg=config.objective, num=n,
                         num_classes=num_classes, y=y, num_steps=int(config.sample.num_steps))
    codec = (codec_on or current_codec)(None)  # latents -> pixels (identity: as they are)
    return {'joint': grid(rows(codec.decode({m.name: out[m.name] for m in images})))}

  return sample_mt if config.objective.name == 'mt_elbo' else sample_decoupled


# ---- stopping on SIGTERM / SIGINT --------------------------------------------------------


class StopSignals:
  """Turns SIGTERM/SIGINT into "save and stop at the next step boundary".

  One process: Python handlers set a flag. Several processes must stop at the
  same step, so there SIGTERM is left to JAX's preemption service (installed
  by `jax.distributed.initialize`), which agrees on a step across processes:
  `multihost_utils.reached_preemption_sync_point`.
  """

  def __init__(self):
    self.received: str | None = None
    self._previous: dict[int, Any] = {}
    self._multi = jax.process_count() > 1

  def __enter__(self) -> 'StopSignals':
    if threading.current_thread() is not threading.main_thread():
      logging.warning('Not in the main thread: SIGTERM/SIGINT will not stop training cleanly.')
      return self
    for sig in (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame) -> None:
    del frame
    self.received = signal.Signals(signum).name
    logging.warning('%s received: saving a checkpoint at the next step boundary, then '
                    'stopping.', self.received)

  def should_stop(self, step: int) -> bool:
    if self._multi:
      if multihost_utils.reached_preemption_sync_point(step):
        self.received = self.received or 'preemption notice'
        return True
      if self.received:  # SIGINT on this process only: cannot stop alone
        raise KeyboardInterrupt(f'{self.received} at step {step}')
      return False
    return self.received is not None


# ---- metrics --------------------------------------------------------------------------------


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the message names the step and the modality losses."""


def _check_finite(history: list[tuple[int, dict[str, float]]], last_saved: int | None) -> None:
  for step, m in history:
    if not np.isfinite(m['loss']):
      parts = ', '.join(f'{k}={v:.6g}' for k, v in sorted(m.items()) if k.startswith('loss/'))
      kept = (f'the last good checkpoint is step {last_saved}' if last_saved is not None
              else 'no checkpoint was saved')
      raise NonFiniteLossError(
          f'loss is {m["loss"]} at step {step} (modality losses: {parts or "none reported"}; '
          f'grad_norm={m.get("grad_norm", float("nan")):.6g}). This state is not saved; {kept}.')


def _mean_metrics(history: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
  keys = history[-1][1].keys()
  return {k: float(np.mean([m[k] for _, m in history])) for k in keys}


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  out = {}
  def walk(prefix, node):
    for k, v in node.items():
      if isinstance(v, (dict, ml_collections.ConfigDict)):
        walk(f'{prefix}{k}.', v)
      else:
        out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
  walk('', config.to_dict())
  return out


def _flops_per_step(config: ml_collections.ConfigDict) -> float:
  """Per-device FLOPs of one step, counted by XLA on the step with its scans unrolled.

  The compiled step's own cost analysis counts the scanned trunk's body once,
  so it would under-read by about the depth; `plan` lowers (without compiling)
  the step with the trunk unrolled and corrects for gradient accumulation.
  """
  try:
    return plan_lib.lowered_step_flops(config) / jax.device_count()
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('FLOPs per step not counted (%s); perf/tflops and perf/mfu are not reported.', e)
    return 0.0


# ---- the loop -------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       parts: Parts | None = None) -> dict[str, Any]:
  """Trains `config.train.num_steps` steps in `workdir`, resuming from its checkpoints.

  Returns the metrics of the last logged window plus 'step' (the last step
  done), 'preempted' and 'loss_history' ({step: loss} for the steps run here).
  """
  parts = parts or default_parts(config)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # local or gs://
  is_main = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  num_steps = int(config.train.num_steps)
  log_every = max(1, int(config.train.log_every))
  sample_every = int(config.train.sample_every)
  ckpt_every = max(1, int(config.train.checkpoint_every))

  # ---- mesh ----------------------------------------------------------------------------
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.rules_dict(config.sharding_rules)
  logging.info('Mesh %s over %d devices in %d processes.', dict(mesh.shape),
               mesh.devices.size, jax.process_count())

  # ---- data ----------------------------------------------------------------------------
  data_iter = parts.make_data_iter(jax.process_index(), jax.process_count())

  # ---- model and optimizer (created directly in their shards) -------------------------
  schedule = ts_lib.make_schedule(config.optim, num_steps)
  tx = ts_lib.make_optimizer(config.optim, schedule)
  rng_impl = config.train.rng_impl
  plan = ts_lib.plan_train_state(parts.model_fn, tx, mesh, rules, int(config.seed), rng_impl)

  # ---- checkpoint: resume or start --------------------------------------------------------
  ckpt = checkpoint_lib.Checkpointer(workdir, config)
  restored = ckpt.restore_latest(plan.abstract, data_iter)
  if restored is None:
    state, start = plan.init(), 0
    if config.train.init_from:  # a new run from another's weights; its optimizer starts afresh
      state = state.replace(**checkpoint_lib.load_weights(
          config.train.init_from, plan.abstract, fresh=state,
          fresh_pattern=config.train.get('init_fresh', '')))
    writer.write_hparams(_flat_hparams(config))
  else:
    state, start = restored
  last_saved = start if restored else None
  if is_main:
    parameter_overview.log_parameter_overview(state.params, include_stats=False,
                                              msg='Trainable parameters')

  # ---- the jitted step -----------------------------------------------------------------------
  step_fn = ts_lib.jit_train_step(
      ts_lib.make_train_step(plan.graphdef, parts.loss_fn, tx, schedule,
                             ema_decay=float(config.optim.ema_decay),
                             grad_accum_steps=int(config.optim.grad_accum_steps),
                             rng_impl=rng_impl),
      plan.shardings, parallel.batch_sharding(mesh, rules), mesh)
  sample_key = jax.random.fold_in(jax.random.key(int(config.seed), impl=rng_impl), 2)

  def write_samples(step: int) -> None:
    if parts.sample_fn is None:
      return
    params = state.ema_params if config.sample.use_ema else state.params
    model = ts_lib.merge_model(plan.graphdef, params, state.model_state)
    grids = parts.sample_fn(model, jax.random.fold_in(sample_key, step))
    writer.write_images(step, {f'samples/{k}': g[None] for k, g in grids.items()})
    if is_main:
      from mmgen_jax import visualize  # pylint: disable=g-import-not-at-top
      for k, g in grids.items():
        visualize.save_png(os.path.join(workdir, 'samples', f'step_{step:06d}_{k}.png'), g)

  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                           every_steps=log_every) if is_main else None

  compiled, flops = None, _flops_per_step(config)  # outside the mesh context: lowered abstractly
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  window: list[tuple[int, dict[str, float]]] = []
  loss_history: dict[int, float] = {}
  last_metrics: dict[str, float] = {}
  batch_size = 0
  window_start, window_steps = time.perf_counter(), 0
  step, preempted = start, False

  try:
    with StopSignals() as stop_signals, jax.set_mesh(mesh):
      for step in range(start + 1, num_steps + 1):
        with jax.profiler.StepTraceAnnotation('train', step_num=step):
          batch = parts.to_global_batch(next(data_iter), mesh, rules)
          if compiled is None:  # compile once, ahead of time
            compiled = step_fn.lower(state, batch).compile()
            batch_size = int(jax.tree.leaves(batch)[0].shape[0])
            window_start = time.perf_counter()
          state, metrics = compiled(state, batch)
        pending.append((step, metrics))
        window_steps += 1
        if len(pending) > _MAX_STEPS_IN_FLIGHT:
          # Dispatch is asynchronous: without this wait the loop runs ahead of the
          # device (unboundedly on CPU), holding every queued batch and making the
          # reported steps/s and ETA measure dispatch instead of training.
          jax.block_until_ready(pending[-_MAX_STEPS_IN_FLIGHT - 1][1])
        if report:
          report(step)  # steps/s and ETA

        stop = stop_signals.should_stop(step)
        save_due = step % ckpt_every == 0 or step == num_steps or stop
        sample_due = step == num_steps or (sample_every > 0 and step % sample_every == 0)
        if not (save_due or sample_due or stop or step % log_every == 0):
          continue

        # Fetching the metrics waits for the step; a bad loss stops before any save.
        fetched = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in pending]
        pending.clear()
        _check_finite(fetched, last_saved)
        window += fetched
        loss_history.update((s, m['loss']) for s, m in fetched)

        if step % log_every == 0 or step == num_steps or stop:
          elapsed = time.perf_counter() - window_start
          steps_per_sec = window_steps / max(elapsed, 1e-9)
          last_metrics = _mean_metrics(window)
          scalars = {f'train/{k}': v for k, v in last_metrics.items()}
          scalars['perf/steps_per_sec'] = steps_per_sec
          scalars['perf/images_per_sec'] = steps_per_sec * batch_size
          # XLA's count for one device's share of the step; with model.remat it includes
          # the recomputed forward, so the utilisation is of the hardware, not the model.
          if flops:
            scalars['perf/tflops_per_sec_per_device'] = flops * steps_per_sec / 1e12
            if float(config.train.peak_flops) > 0:
              scalars['perf/mfu'] = flops * steps_per_sec / float(config.train.peak_flops)
          data_stats = getattr(data_iter, 'stats', None)
          if data_stats is not None:  # every process reaches this step: sum their counts
            scalars['data/skipped_records'] = parallel.sum_over_processes(data_stats.skipped)
          writer.write_scalars(step, scalars)
          window.clear()
          window_start, window_steps = time.perf_counter(), 0

        io_start = time.perf_counter()
        if save_due and ckpt.save(step, state, data_iter, force=step == num_steps or stop):
          last_saved = step
        if sample_due:
          write_samples(step)
        window_start += time.perf_counter() - io_start  # throughput counts training only
        if stop:
          preempted = True
          logging.warning('Stopped at step %d after %s; the checkpoint of this step resumes '
                          'the run.', step, stop_signals.received)
          break
      writer.flush()
  finally:
    ckpt.close()  # waits for the async saves of good states
    writer.close()
    if getattr(data_iter, 'stats', None) is not None:
      data_iter.stats.log()  # batches read and bad records skipped, if any

  return {**last_metrics, 'step': step, 'preempted': preempted, 'loss_history': loss_history,
          'flops_per_step_per_device': flops}
