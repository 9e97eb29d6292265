"""The evaluation job: dense prediction from RGB with the latest checkpoint.

For every validation image (up to `config.eval.num_examples`) the model is
conditioned on the RGB slot (task 1, MMGen's understanding mode) and samples
the other image modalities; each is scored against the exact ground truth:

  depth         AbsRel, RMSE, δ1 after per-image least-squares scale and shift
                (the prediction is affine-normalised, like the training target)
  normal        mean/median angle and the fractions within 11.25°, 22.5°, 30°
  segmentation  mIoU and pixel accuracy, ids decoded by nearest palette colour

Beside each score the job reports a trivial baseline computed from the same
images (depth: a constant per-row depth fitted to the ground truth; normals: the
mean ground-truth normal; segmentation: the most frequent class per pixel row),
so a number can be read as better or worse than "no model".

Results go to the clu writer (TensorBoard) and to `<workdir>/eval/step_XXXXXX.json`.
"""

from __future__ import annotations

import json
import time
from typing import Any

from absl import logging
from clu import metric_writers
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from mmgen_jax import checkpoint as checkpoint_lib
from mmgen_jax import metrics as metrics_lib
from mmgen_jax import modalities as modalities_lib
from mmgen_jax import parallel
from mmgen_jax import train_state as ts_lib
from mmgen_jax.data import palettes
from mmgen_jax.data import pipeline
from mmgen_jax.data import scenes


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str):
  """(model, step) from the latest checkpoint in workdir (EMA weights if config.sample.use_ema)."""
  from mmgen_jax import train  # pylint: disable=g-import-not-at-top
  parts = train.default_parts(config)
  mesh = parallel.make_mesh(config.mesh)
  tx = ts_lib.make_optimizer(config.optim,
                             ts_lib.make_schedule(config.optim, config.train.num_steps))
  plan = ts_lib.plan_train_state(parts.model_fn, tx, mesh, config.sharding_rules,
                                 int(config.seed), config.train.rng_impl)
  ckpt = checkpoint_lib.Checkpointer(workdir, config, read_only=True)  # may run beside training
  try:
    restored = ckpt.restore_latest(plan.abstract, None)
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f'no checkpoint in {workdir}/checkpoints: train first (--mode=train).')
  state, step = restored
  params = state.ema_params if config.sample.use_ema else state.params
  with jax.set_mesh(mesh):
    model = ts_lib.merge_model(plan.graphdef, params, state.model_state)
  return model, step, mesh


def _baselines(gt: dict[str, np.ndarray], seg_classes: int) -> dict[str, float]:
  """Scores of predictions that ignore the image (see the module docstring)."""
  out = {}
  if 'depth' in gt:
    d = gt['depth']
    rows = np.broadcast_to(np.median(d, axis=(0, 2), keepdims=True), d.shape)
    out.update({f'baseline/{k}': v for k, v in metrics_lib.depth_metrics(rows, d).items()})
  if 'normal' in gt:
    n = gt['normal']
    mean = n.reshape(-1, 3).mean(0)
    mean = np.broadcast_to(mean / np.linalg.norm(mean), n.shape)
    out.update({f'baseline/{k}': v for k, v in metrics_lib.normal_metrics(mean, n).items()})
  if 'segmentation' in gt:
    s = gt['segmentation']
    counts = np.stack([(s == c).sum(axis=(0, 2)) for c in range(seg_classes)], -1)  # (H, C)
    rows = np.broadcast_to(counts.argmax(-1)[None, :, None], s.shape)
    out.update({f'baseline/{k}': v for k, v in
                metrics_lib.segmentation_metrics(rows, s, seg_classes).items()})
  return out


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Scores RGB → every other image modality on the validation split; returns the metrics."""
  if config.objective.name != 'decoupled':
    logging.warning('evaluate: RGB-conditioned prediction needs the decoupled objective; '
                    '%r is not evaluated.', config.objective.name)
    return {}
  from mmgen_jax.diffusion import samplers  # pylint: disable=g-import-not-at-top
  mods = modalities_lib.from_config(config.modalities)
  images = modalities_lib.images(mods)
  first = images[0]
  model, step, mesh = restore_for_inference(config, workdir)
  rules = parallel.rules_dict(config.sharding_rules)
  num_classes = int(config.data.num_classes)
  limit = int(config.eval.num_examples)
  it = pipeline.make_iterator(config, config.data.eval_split, train=False)

  # y is the null class (no label given): guidance would mix v_null with itself.
  settings = {**samplers.settings_from_config(config), 'cfg_scale': 1.0}
  sample = jax.jit(lambda m, key, y, cond: samplers.sample(
      m, key, mods=mods, shape=cond.shape[:3], y=y, num_classes=num_classes,
      condition={first.name: cond}, **settings))

  preds: dict[str, list[np.ndarray]] = {m.name: [] for m in images[1:]}
  truth: dict[str, list[np.ndarray]] = {m.name: [] for m in images[1:]}
  key = jax.random.fold_in(jax.random.key(int(config.seed), impl=config.train.rng_impl), 3)
  seen, start = 0, time.time()
  for i, batch in enumerate(it):
    if limit and seen >= limit:
      break
    # Decided on the global batch: one process's shard may end a batch earlier, and
    # a process leaving the loop alone would leave the others waiting in the sampler.
    if not np.any(multihost_utils.process_allgather(np.asarray(batch['valid']))):
      break  # every process has run out of records: only padding is left
    fields = {m.name: {'depth': f'{m.name}_raw', 'segmentation': f'{m.name}_ids'}.get(
        m.encoding, m.name) for m in images[1:]}
    g = pipeline.to_global_batch(
        {k: batch[k] for k in (first.name, 'valid', *fields.values())}, mesh, rules)
    y = np.full((g[first.name].shape[0],), num_classes, np.int32)  # null class: no label given
    with jax.set_mesh(mesh):
      out = sample(model, jax.random.fold_in(key, i), y, g[first.name])
    # Every process scores the whole global batch, so process 0 reports all of it.
    valid_all = np.asarray(multihost_utils.process_allgather(g['valid'], tiled=True))
    for m in images[1:]:
      pred = np.asarray(multihost_utils.process_allgather(out[m.name], tiled=True))
      true = np.asarray(multihost_utils.process_allgather(g[fields[m.name]], tiled=True))
      preds[m.name].append(pred[valid_all])
      truth[m.name].append(true[valid_all])
    seen += int(valid_all.sum())
    logging.info('evaluate: %d images, %.1f images/s', seen, seen / (time.time() - start))
  if seen == 0:
    raise ValueError(f'evaluate: split {config.data.eval_split!r} yielded no valid examples.')

  # Bad records (config.data.on_bad_record='skip') are left out of the scores: say how many.
  results: dict[str, float] = {
      'eval/num_examples': float(seen),
      'eval/skipped_records': float(parallel.sum_over_processes(it.stats.skipped))}
  if results['eval/skipped_records']:
    it.stats.log()
  gt_by_encoding = {}
  seg_classes = len(scenes.SEMANTIC_CLASSES)
  for m in images[1:]:
    p, t = np.concatenate(preds[m.name]), np.concatenate(truth[m.name])
    if m.encoding == 'depth':
      t = t.reshape(t.shape[:3])
      scores = metrics_lib.depth_metrics(p[..., 0], t)
    elif m.encoding == 'normal':
      scores = metrics_lib.normal_metrics(p, t)
    elif m.encoding == 'segmentation':
      seg_classes = len(palettes.get(m.palette))
      scores = metrics_lib.segmentation_metrics(palettes.ids_from_colors(p, m.palette), t,
                                                seg_classes)
    else:
      continue  # rgb-like modalities have no dense-prediction score
    gt_by_encoding[m.encoding] = t
    results.update({f'eval/{m.name}/{k.split("/", 1)[1]}': v for k, v in scores.items()})
  results.update({f'eval/{k}': v for k, v in _baselines(gt_by_encoding, seg_classes).items()})

  if jax.process_index() == 0:
    writer = metric_writers.create_default_writer(workdir, just_logging=False)
    writer.write_scalars(step, results)
    writer.flush()
    path = epath.Path(workdir) / 'eval' / f'step_{step:06d}.json'  # local or gs://
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({'step': step, **results}, indent=1, sort_keys=True))
    logging.info('evaluate: wrote %s', path)
  return results


def summarize(results: dict[str, Any]) -> str:
  """The scores one line per metric, model beside baseline."""
  lines = []
  for k, v in sorted(results.items()):
    if k.startswith('eval/baseline/'):
      continue
    lines.append(f'{k:40s} {v:10.4f}')
  for k, v in sorted(results.items()):
    if k.startswith('eval/baseline/'):
      lines.append(f'{k:40s} {v:10.4f}')
  return '\n'.join(lines)
