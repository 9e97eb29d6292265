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

With `config.eval.gen.num_samples` > 0, `evaluate_generation_mt` also scores
JOINT samples (nothing observed, every auxiliary generated, `mt_elbo.sample`)
with the generation job's feature networks (`generation_eval`: scenes FD per
image modality, FID/IS/precision/recall with the Inception weights), resumable
as that job is, under 'eval/mt/gen/...'. A trunk trained with class labels
(no class modality) samples class i mod K, and class_acc is as in the
decoupled job; with a class modality the label is generated with the image,
and 'eval/mt/gen/label_agreement/<modality>' is how often the scenes
network's class of the sampled image equals the label sampled with it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from absl import logging
from flax import nnx
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from mmgen_jax import codec as codec_lib
from mmgen_jax import modalities as modalities_lib
from mmgen_jax import parallel
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


def make_joint_sampler(config: ml_collections.ConfigDict, model: Any, mesh: jax.sharding.Mesh,
                       codec: codec_lib.Codec):
  """batch index -> joint samples: the image modalities (pixels, global) and, per class
  modality, its sampled labels under 'mt_label/<name>'.

  Batch b's noise comes from (config.seed, b) alone, as in `generation_eval.make_sampler`.
  """
  from mmgen_jax import generation_eval  # pylint: disable=g-import-not-at-top
  mods = modalities_lib.from_config(config.modalities)
  images = [m.name for m in modalities_lib.images(mods)]
  num_classes, b = int(config.data.num_classes), int(config.eval.gen.batch)
  sharding = parallel.batch_sharding(mesh, config.sharding_rules)
  conditional = not model.aux_classes  # a trunk trained with the class condition y
  sample = jax.jit(lambda m, key, y: mt_elbo.sample(
      m, key, mods=mods, cfg=config.objective, num=b, num_classes=num_classes, y=y,
      num_steps=int(config.sample.num_steps)), out_shardings=sharding)
  key = jax.random.fold_in(jax.random.key(int(config.seed), impl=config.train.rng_impl), 5)

  def draw(index: int) -> dict[str, jax.Array]:
    y = None
    if conditional:
      classes = generation_eval.sample_classes(index * b, b, num_classes)
      y = jax.make_array_from_callback(classes.shape, sharding, lambda i: classes[i])
    with jax.set_mesh(mesh):
      out = sample(model, jax.random.fold_in(key, index), y)
      return {**codec.decode({name: out[name] for name in images}),
              **{f'{LABEL_KEY}/{name}': out[name] for name in model.aux_classes}}

  return draw


LABEL_KEY = 'mt_label'  # a joint sample's generated label, beside its features


def scenes_network(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """The scenes feature network for the config's image modalities, or None.

  The network learns from the scenes' segmentation ids, so a config without a
  segmentation modality (joint_label: RGB and the label; transition: RGB and
  depth) cannot train or load one of its own. It is then loaded (trained
  first if absent, at config.eval.gen.scenes_features or
  <workdir>/scenes_features) for the scenes' own modalities, and each image
  modality of the config gets the CNN of the scenes modality with its encoding
  (one CNN per modality, so this is the same network a full-scenes run uses).
  None: the config has a segmentation modality (make_extractor loads its own).
  """
  from mmgen_jax import config_schema  # pylint: disable=g-import-not-at-top
  from mmgen_jax.models import scenes_features  # pylint: disable=g-import-not-at-top
  images = modalities_lib.images(modalities_lib.from_config(config.modalities))
  if any(m.encoding == 'segmentation' for m in images):
    return None
  full_config = ml_collections.ConfigDict(config.to_dict())
  full_config.modalities = config_schema.scenes_modalities()
  full, _ = scenes_features.load_or_train(full_config, workdir)
  net = scenes_features.net_config(full_config)
  by_encoding = {enc: name for name, enc in net['encodings'].items()}
  channels = {}
  for m in images:
    source = by_encoding.get(m.encoding)
    if source is None or net['channels'][source] != int(m.channels):
      raise ValueError(f'scenes features: modality {m.name!r} (encoding {m.encoding!r}, '
                       f'{m.channels} channels) has no counterpart in the scenes network '
                       f'(encodings {net["encodings"]}, channels {net["channels"]}).')
    channels[m.name] = source
  model = scenes_features.build({**net, 'channels': {k: net['channels'][v]
                                                     for k, v in channels.items()}})
  for name, source in channels.items():
    nnx.update(model.nets[name], nnx.state(full.nets[source]))
  return model


def evaluate_generation_mt(config: ml_collections.ConfigDict, workdir: str, model: Any,
                           step: int, mesh: jax.sharding.Mesh, *,
                           extractor: Any = None) -> dict[str, float]:
  """Generation metrics of joint samples, keys 'eval/mt/gen/...' ({} if no network)."""
  from mmgen_jax import generation_eval as ge  # pylint: disable=g-import-not-at-top
  ge.check_sizes(config, mesh)
  if extractor is None:
    scenes = scenes_network(config, workdir) if 'scenes' in ge.requested_nets(config) else None
    extractor = ge.make_extractor(config, workdir, mesh, scenes_model=scenes)
  if not extractor.keys:
    logging.warning('generation metrics (mt_elbo): no feature network available (%s).',
                    extractor.skipped)
    return {}
  # The sampled labels travel with the features (the extractor reads the images only).
  with_labels = dataclasses.replace(extractor, fn=lambda batch: {
      **extractor.fn(batch), **{k: v for k, v in batch.items() if k.startswith(LABEL_KEY)}})
  draw = make_joint_sampler(config, model, mesh, codec_lib.from_config(config, mesh))
  generated = ge.generate_features(config, workdir, step, draw, with_labels)
  reference = ge.load_reference(config, workdir, extractor, mesh)
  scores = ge.score(generated, reference, config)
  if model.aux_classes:  # no class was requested: class_acc would compare with i mod K
    scores = {k: v for k, v in scores.items() if not k.startswith('eval/gen/class_acc/')}
    for name in model.aux_classes:
      sampled = generated[f'{LABEL_KEY}/{name}']
      for k, v in generated.items():
        if k.startswith(f'{ge.SCENES_CLASS}/'):
          scores[f'eval/gen/label_agreement/{k.split("/", 1)[1]}'] = float(np.mean(v == sampled))
  results = {'eval/gen/num_samples': float(len(generated['label'])),
             'eval/gen/reference_num': float(reference.num_images),
             'eval/gen/num_steps': float(config.sample.num_steps),
             'eval/gen/rgb_out_of_range_frac': float(np.mean(generated['rgb_out_of_range'])),
             **scores}
  results = {'eval/mt/gen/' + k.removeprefix('eval/gen/'): v for k, v in results.items()}
  logging.info('generation metrics (mt_elbo, reference %s): %s', reference.source,
               {k: round(v, 4) for k, v in results.items()})
  return results


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
