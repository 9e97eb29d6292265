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

The job is three steps: `sampler_predictor` makes the predictions,
`predict_split` runs any such predictor over the split on every process and
gathers the results, and `score` (pure) turns predictions and truths into the
numbers. Results go to the clu writer (TensorBoard) and to
`<workdir>/eval/step_XXXXXX.json`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Mapping

from absl import logging
from clu import metric_writers
from etils import epath
from flax import nnx
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from mmgen_jax import checkpoint as checkpoint_lib
from mmgen_jax import codec as codec_lib
from mmgen_jax import metrics as metrics_lib
from mmgen_jax import modalities as modalities_lib
from mmgen_jax import parallel
from mmgen_jax import train_state as ts_lib
from mmgen_jax.data import encodings
from mmgen_jax.data import palettes
from mmgen_jax.data import pipeline
from mmgen_jax.data import scenes


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str | None):
  """(model, step, mesh) for sampling and evaluation.

  `config.sample.checkpoint` '' restores the latest checkpoint in workdir (EMA
  weights if config.sample.use_ema); a path reads a `.safetensors` written by
  `python -m mmgen_jax.models.convert` (the released MMGen checkpoint, say),
  which must match the model the config builds. Converted weights carry no
  step: it is 0. Either way every parameter is placed in its shards on the
  config's mesh.
  """
  from mmgen_jax import train  # pylint: disable=g-import-not-at-top
  parts = train.default_parts(config)
  mesh = parallel.make_mesh(config.mesh)
  tx = ts_lib.make_optimizer(config.optim,
                             ts_lib.make_schedule(config.optim, config.train.num_steps))
  plan = ts_lib.plan_train_state(parts.model_fn, tx, mesh, config.sharding_rules,
                                 int(config.seed), config.train.rng_impl)
  if config.sample.checkpoint:
    return _restore_converted(config, parts.model_fn, plan, mesh), 0, mesh
  if not workdir:
    raise FileNotFoundError('no weights to sample from: give --workdir (its latest checkpoint) '
                            'or --config.sample.checkpoint=<converted .safetensors>.')
  ckpt = checkpoint_lib.Checkpointer(workdir, config, read_only=True)  # may run beside training
  try:
    restored = ckpt.restore_latest(plan.abstract, None)
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f'no checkpoint in {workdir}/checkpoints: train first (--mode=train), '
                            'or set --config.sample.checkpoint to converted weights.')
  state, step = restored
  params = state.ema_params if config.sample.use_ema else state.params
  with jax.set_mesh(mesh):
    model = ts_lib.merge_model(plan.graphdef, params, state.model_state)
  return model, step, mesh


def _restore_converted(config: ml_collections.ConfigDict, model_fn, plan, mesh):
  """The model with its parameters read from config.sample.checkpoint, in their shards."""
  from mmgen_jax.models import convert  # pylint: disable=g-import-not-at-top
  path = config.sample.checkpoint
  if not config.sample.use_ema:
    logging.warning('config.sample.use_ema=False is not read for %s: it holds the weights '
                    'convert was given (--subset ema or model).', path)
  if not epath.Path(path).exists():
    raise FileNotFoundError(f'config.sample.checkpoint={path!r}: no such file (convert the '
                            'released checkpoint with python -m mmgen_jax.models.convert).')
  try:
    values = convert.read_params(path, plan.abstract.params)
  except ValueError as e:
    raise ValueError(f'config.sample.checkpoint: {e} (the config must size the model as '
                     'the converted one: convert with --config=<this config>).') from e
  # Every process holds the whole file; each device takes its shard of it.
  params = jax.tree.map(
      lambda v, a: jax.make_array_from_callback(v.shape, a.sharding, lambda i, v=v: v[i]),
      values, plan.abstract.params)
  key = jax.random.key(int(config.seed), impl=config.train.rng_impl)
  # The non-parameter state (e.g. rng counters), created as training creates it; the
  # parameters this init would draw are unused outputs and compiled away.
  model_state = parallel.sharded_init(
      lambda: ts_lib.split_model(model_fn(nnx.Rngs(key)))[2], plan.shardings.model_state, mesh)
  logging.info('restore_for_inference: %d parameter arrays from %s', len(jax.tree.leaves(params)),
               path)
  with jax.set_mesh(mesh):
    return ts_lib.merge_model(plan.graphdef, params, model_state)


def _baselines(gt: dict[str, np.ndarray], seg_classes: int) -> dict[str, float]:
  """Scores of predictions that ignore the image (see the module docstring)."""
  out = {}
  if 'depth' in gt:
    d = gt['depth']
    rows = np.broadcast_to(np.median(d, axis=(0, 2), keepdims=True), d.shape)
    out.update({f'baseline/{k}': v for k, v in metrics_lib.depth_metrics(rows, d).items()})
  if 'normal' in gt:
    n = gt['normal']
    mean = n.reshape(-1, 3).mean(0, dtype=np.float64)  # float32 sums depend on the order
    mean = np.broadcast_to(mean / np.linalg.norm(mean), n.shape)
    out.update({f'baseline/{k}': v for k, v in metrics_lib.normal_metrics(mean, n).items()})
  if 'segmentation' in gt:
    s = gt['segmentation']
    counts = np.stack([(s == c).sum(axis=(0, 2)) for c in range(seg_classes)], -1)  # (H, C)
    rows = np.broadcast_to(counts.argmax(-1)[None, :, None], s.shape)
    out.update({f'baseline/{k}': v for k, v in
                metrics_lib.segmentation_metrics(rows, s, seg_classes).items()})
  return out


# (global batch, batch index) -> {image modality: (N, H, W, C) prediction in model space}.
# The batch holds every field of the validation batch (data/pipeline.py) as global
# arrays; the index tells the batches apart (the sampler folds it into its key).
Predictor = Callable[[Mapping[str, jax.Array], int], Mapping[str, jax.Array]]


def sampler_predictor(config: ml_collections.ConfigDict, model: Any,
                      mesh: jax.sharding.Mesh) -> Predictor:
  """MMGen's understanding task: the first image modality (RGB) given, the others sampled."""
  from mmgen_jax.diffusion import samplers  # pylint: disable=g-import-not-at-top
  mods = modalities_lib.from_config(config.modalities)
  first = modalities_lib.images(mods)[0]
  num_classes = int(config.data.num_classes)
  # y is the null class (no label given): guidance would mix v_null with itself.
  settings = {**samplers.settings_from_config(config), 'cfg_scale': 1.0}
  codec = codec_lib.from_config(config, mesh)  # latents: the condition encoded, samples decoded
  sample = jax.jit(lambda m, key, y, cond: samplers.sample(
      m, key, mods=mods, shape=cond.shape[:3], channels=codec.model_channels(), y=y,
      num_classes=num_classes, condition={first.name: cond}, **settings))
  key = jax.random.fold_in(jax.random.key(int(config.seed), impl=config.train.rng_impl), 3)

  def predict(batch: Mapping[str, jax.Array], index: int) -> Mapping[str, jax.Array]:
    k_sample = jax.random.fold_in(key, index)
    y = np.full((batch[first.name].shape[0],), num_classes, np.int32)  # null: no label given
    with jax.set_mesh(mesh):
      # The posterior mean, as `--task=rgb_to_x` conditions: the scores describe it.
      cond = codec.encode_mean({first.name: batch[first.name]})[first.name]
      return codec.decode(sample(model, k_sample, y, cond))

  return predict


def _truth_field(m: modalities_lib.Modality) -> str:
  """The batch field `m` is scored against: raw depth, semantic ids, or `m` itself."""
  return {'depth': f'{m.name}_raw', 'segmentation': f'{m.name}_ids',
          **_ENCODED_TRUTH}.get(m.encoding, m.name).format(name=m.name)


@dataclasses.dataclass(frozen=True)
class Predictions:
  """The valid validation examples of every process, the same on every process."""
  predicted: dict[str, np.ndarray]  # image modality -> (N, H, W, C) in model space
  truth: dict[str, np.ndarray]      # image modality -> its `_truth_field`
  num_examples: int
  skipped_records: int              # bad records left out (data.on_bad_record='skip')


def predict_split(config: ml_collections.ConfigDict, predict: Predictor,
                  mesh: jax.sharding.Mesh) -> Predictions:
  """Runs `predict` over the validation split (up to `config.eval.num_examples`).

  Every image modality after the first is collected, with its truth; padding
  (`valid` False) is dropped. Each process predicts its shard of every global
  batch; the results are gathered on all processes.
  """
  targets = modalities_lib.images(modalities_lib.from_config(config.modalities))[1:]
  rules = parallel.rules_dict(config.sharding_rules)
  limit = int(config.eval.num_examples)
  it = pipeline.make_iterator(config, config.data.eval_split, train=False)
  predicted: dict[str, list[np.ndarray]] = {m.name: [] for m in targets}
  truth: dict[str, list[np.ndarray]] = {m.name: [] for m in targets}
  seen, start = 0, time.time()
  for i, batch in enumerate(it):
    if limit and seen >= limit:
      break
    # Decided on the global batch: one process's shard may end a batch earlier, and
    # a process leaving the loop alone would leave the others waiting in `predict`.
    if not np.any(multihost_utils.process_allgather(np.asarray(batch['valid']))):
      break  # every process has run out of records: only padding is left
    g = pipeline.to_global_batch(batch, mesh, rules)
    out = predict(g, i)
    valid = np.asarray(multihost_utils.process_allgather(g['valid'], tiled=True))
    for m in targets:
      predicted[m.name].append(
          np.asarray(multihost_utils.process_allgather(out[m.name], tiled=True))[valid])
      truth[m.name].append(
          np.asarray(multihost_utils.process_allgather(g[_truth_field(m)], tiled=True))[valid])
    seen += int(valid.sum())
    logging.info('evaluate: %d images, %.1f images/s', seen, seen / (time.time() - start))
  if seen == 0:
    raise ValueError(f'evaluate: split {config.data.eval_split!r} yielded no valid examples.')
  skipped = parallel.sum_over_processes(it.stats.skipped)
  if skipped:
    it.stats.log()
  return Predictions(predicted={k: np.concatenate(v) for k, v in predicted.items()},
                     truth={k: np.concatenate(v) for k, v in truth.items()},
                     num_examples=seen, skipped_records=skipped)


def score(predicted: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray],
          mods: tuple[modalities_lib.Modality, ...]) -> dict[str, float]:
  """'eval/<modality>/<metric>' for every scored modality, and the baselines of `truth`.

  Pure: `predicted` and `truth` as in `Predictions`; rgb-like modalities have
  no dense-prediction score.
  """
  results: dict[str, float] = {}
  gt_by_encoding = {}
  seg_classes = len(scenes.SEMANTIC_CLASSES)
  for m in modalities_lib.images(mods):
    if m.name not in predicted:
      continue
    p, t = predicted[m.name], truth[m.name]
    if m.encoding in _ENCODED_TRUTH:  # MMGen's 8-bit encodings
      scored = score_encoded(m, p, t)
      if scored is not None:
        scores, baselines, family, t = scored
        gt_by_encoding[family] = t
        results.update({f'eval/{m.name}/{k.split("/", 1)[1]}': v for k, v in scores.items()})
        results.update({f'eval/baseline/{k}': v for k, v in baselines.items()})
      continue
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
      continue
    gt_by_encoding[m.encoding] = t
    results.update({f'eval/{m.name}/{k.split("/", 1)[1]}': v for k, v in scores.items()})
  results.update({f'eval/{k}': v for k, v in _baselines(gt_by_encoding, seg_classes).items()})
  return results


def evaluate_predictor(config: ml_collections.ConfigDict, predict: Predictor,
                       mesh: jax.sharding.Mesh) -> dict[str, float]:
  """The counts, scores and baselines of `predict` on the validation split."""
  got = predict_split(config, predict, mesh)
  # Bad records (config.data.on_bad_record='skip') are left out of the scores: say how many.
  return {'eval/num_examples': float(got.num_examples),
          'eval/skipped_records': float(got.skipped_records),
          **score(got.predicted, got.truth, modalities_lib.from_config(config.modalities))}


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Scores RGB → every other image modality on the validation split; returns the metrics.

  With config.eval.gen.num_samples > 0, also the generation metrics (eval/gen/*,
  generation_eval.py), in the same summaries and JSON file.
  """
  if config.objective.name not in ('decoupled', 'mt_elbo'):
    logging.warning('evaluate: RGB-conditioned prediction needs the decoupled or mt_elbo '
                    'objective; %r is not evaluated.', config.objective.name)
    return {}
  model, step, mesh = restore_for_inference(config, workdir)
  if config.objective.name == 'mt_elbo':  # RGB held: transitions and the label head
    from mmgen_jax import mt_eval  # pylint: disable=g-import-not-at-top
    results = mt_eval.evaluate_mt(config, model, mesh)
  else:
    results = evaluate_predictor(config, sampler_predictor(config, model, mesh), mesh)
  # FID / IS / precision-recall / scenes FD (of the decoupled sampler)
  if int(config.eval.gen.num_samples) > 0 and config.objective.name == 'decoupled':
    from mmgen_jax import generation_eval  # pylint: disable=g-import-not-at-top
    results.update(generation_eval.evaluate_generation(config, workdir, model, step, mesh))
  elif int(config.eval.gen.num_samples) > 0:  # mt_elbo: its joint samples
    results.update(mt_eval.evaluate_generation_mt(config, workdir, model, step, mesh))

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


# ---- MMGen's 8-bit encodings (data/encodings.py) ------------------------------

# encoding -> the batch field its predictions are scored against.
_ENCODED_TRUTH = {'disparity_minmax': '{name}_raw', 'stablenormal_rgb': '{name}_raw',
                  'random_colors': '{name}_ids'}


def score_encoded(m: modalities_lib.Modality, p: np.ndarray, t: np.ndarray
                  ) -> tuple[dict[str, float], dict[str, float], str, np.ndarray] | None:
  """(scores, own baselines, family, truth) of a modality in an MMGen encoding, or None.

  `family` names the `_baselines` entry the truth feeds ('normal'; disparity
  and the class-agnostic segments have their own baselines instead). None: unscorable.

  disparity_minmax: the prediction is relative disparity, aligned to 1/depth by
    least squares and inverted (metrics.disparity_depth_metrics); records that
    hold 8-bit disparity have no depth (NaN truth): they are counted, reported
    and left out (`depth/num_scored` says how many were scored).
  stablenormal_rgb: decoded to OpenCV-frame normals, then the normal metrics.
  random_colors: colours clustered into segments (encodings.ids_from_colors),
    scored by Hungarian-matched IoU against the segment ids; its baseline is
    one segment covering the image.
  """
  if m.encoding == 'disparity_minmax':
    t = t.reshape(t.shape[:3])
    has_depth = np.isfinite(t).reshape(len(t), -1).any(axis=1)
    if not has_depth.all():
      logging.warning('evaluate: %d of %d %s records hold 8-bit disparity, no depth: not '
                      'scored.', int((~has_depth).sum()), len(t), m.name)
    if not has_depth.any():
      return None
    p, t = p[has_depth], t[has_depth]
    scores = {**metrics_lib.disparity_depth_metrics(encodings.decode_disparity(p), t),
              'depth/num_scored': float(len(t))}
    # The image-blind baseline under the same protocol: a disparity constant per
    # pixel row (the rows' median of 1/depth), aligned in disparity space like the model.
    rows = np.broadcast_to(np.nanmedian(1.0 / np.where(t > 0, t, np.nan), axis=(0, 2),
                                        keepdims=True), t.shape)
    baseline = metrics_lib.disparity_depth_metrics(np.nan_to_num(rows), t)
    return scores, baseline, 'disparity', t
  if m.encoding == 'stablenormal_rgb':
    return metrics_lib.normal_metrics(encodings.decode_stablenormal_rgb(p), t), {}, 'normal', t
  if m.encoding == 'random_colors':
    pred_ids = np.stack([encodings.ids_from_colors(x) for x in p])
    one = metrics_lib.matched_iou_metrics(np.zeros_like(t), t)['segmentation/matched_iou']
    return (metrics_lib.matched_iou_metrics(pred_ids, t),
            {'segmentation/matched_iou': one}, 'random_colors', t)
  raise ValueError(f'{m.name}: encoding {m.encoding!r} is not one of {sorted(_ENCODED_TRUTH)}.')
