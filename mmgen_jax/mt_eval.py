"""Evaluation of an MT-Diffusion (objective.name='mt_elbo') model on the validation split.

With the primary (RGB) observed and held at `config.sample.t_cond`
(`mt_elbo.infer_from_primary`):

* transitions: every auxiliary image modality is decoded from the primary and
  scored with the decoupled objective's metrics (`evaluate.score`: depth
  AbsRel/RMSE/δ1, normal angles, segmentation mIoU, with their baselines);
* classification: each class modality's head, the label unobserved
  (`mt_elbo.classify`), against the true label; beside it the majority-class
  rate of the same examples (chance).

Every key is 'eval/mt/...'.
"""

from __future__ import annotations

from typing import Any, Mapping

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from mmgen_jax import codec as codec_lib
from mmgen_jax import modalities as modalities_lib
from mmgen_jax.diffusion import mt_elbo


def classification_scores(name: str, predicted: np.ndarray, truth: np.ndarray
                          ) -> dict[str, float]:
  """'eval/mt/<name>/accuracy' and the majority-class rate of `truth` ('.../chance')."""
  predicted, truth = np.asarray(predicted).reshape(-1), np.asarray(truth).reshape(-1)
  if predicted.shape != truth.shape or not truth.size:
    raise ValueError(f'{name}: {predicted.shape} predictions for {truth.shape} labels.')
  chance = np.bincount(truth.astype(np.int64)).max() / truth.size
  return {f'eval/mt/{name}/accuracy': float(np.mean(predicted == truth)),
          f'eval/mt/{name}/chance': float(chance)}


def mt_predictor(config: ml_collections.ConfigDict, model: Any, mesh: jax.sharding.Mesh,
                 labels: dict[str, list[tuple[np.ndarray, np.ndarray]]]):
  """An `evaluate.Predictor`: the auxiliary images from the held primary.

  Also appends each class modality's (predicted ids, true ids) of the valid
  examples, gathered over processes, to `labels[name]`.
  """
  primary = config.objective.primary
  aux_images, aux_classes = model.aux_images, model.aux_classes
  num_classes = int(config.data.num_classes)
  t_cond = float(config.sample.t_cond)
  codec = codec_lib.from_config(config, mesh)
  infer = jax.jit(lambda m, key, x: mt_elbo.infer_from_primary(
      m, x, key, cfg=config.objective, num_classes=num_classes, generate=aux_images,
      t_cond=t_cond))
  classify = {name: jax.jit(lambda m, key, x, name=name: mt_elbo.classify(
      m, x, key, cfg=config.objective, num_classes=num_classes, name=name, t_cond=t_cond))
              for name in aux_classes}
  key = jax.random.fold_in(jax.random.key(int(config.seed), impl=config.train.rng_impl), 5)

  def gather(x):
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  def predict(batch: Mapping[str, jax.Array], index: int) -> Mapping[str, jax.Array]:
    k = jax.random.fold_in(key, index)
    with jax.set_mesh(mesh):
      x = codec.encode({primary: batch[primary]}, jax.random.fold_in(k, 1))[primary]
      valid = gather(batch['valid'])
      for i, name in enumerate(aux_classes):
        ids = classify[name](model, jax.random.fold_in(k, 2 + i), x)
        labels.setdefault(name, []).append((gather(ids)[valid], gather(batch[name])[valid]))
      if not aux_images:
        return {}
      out = infer(model, jax.random.fold_in(k, 0), x)
      return codec.decode({name: out[name] for name in aux_images})

  return predict


def evaluate_mt(config: ml_collections.ConfigDict, model: Any,
                mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Transition scores and classification accuracy, keys 'eval/mt/...'."""
  from mmgen_jax import evaluate  # pylint: disable=g-import-not-at-top
  mods = modalities_lib.from_config(config.modalities)
  images = modalities_lib.images(mods)
  if images[0].name != config.objective.primary:
    # predict_split scores the image modalities after the first one.
    raise ValueError(f'evaluate (mt_elbo): config.objective.primary='
                     f'{config.objective.primary!r} must be the first image modality '
                     f'({images[0].name!r}) to be scored as the given image.')
  labels: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
  got = evaluate.predict_split(config, mt_predictor(config, model, mesh, labels), mesh)
  results = {'eval/mt/num_examples': float(got.num_examples),
             'eval/mt/skipped_records': float(got.skipped_records)}
  scores = evaluate.score(got.predicted, got.truth, mods)
  results.update({'eval/mt/' + k.removeprefix('eval/'): v for k, v in scores.items()})
  for name, parts in labels.items():
    pred = np.concatenate([p for p, _ in parts])
    truth = np.concatenate([t for _, t in parts])
    if len(truth) != got.num_examples:
      raise ValueError(f'evaluate (mt_elbo): {len(truth)} labels of {name!r} for '
                       f'{got.num_examples} scored examples.')
    results.update(classification_scores(name, pred, truth))
  logging.info('evaluate (mt_elbo): %s', results)
  return results
