r"""A small feature network for the procedural scenes: the "Inception" of their modalities.

No pretrained image network exists offline for depth, normals or segmentation
maps, so the project trains its own: one small CNN per image modality, each
trained on the train split to predict what the scene holds, read from the
record alone:

  label     the scene class (the shape of the largest object), softmax;
  present   which semantic classes (sky, ground, wall, sphere, box, cylinder,
            cone) occur in the segmentation ids, one sigmoid each;
  area      the fraction of pixels each semantic class covers (squared error).

A network's penultimate features (the global average of its last convolution,
`feature_dim`-d, after ReLU, as Inception's pool3) give the Fréchet distance
between two sets of one modality ("scenes FD"). Every modality is read in model
space as the data pipeline produces it (`pipeline.normalise`: RGB and palette
colours in [-1, 1], depth min-max normalised per image, unit normals).

Weights go to `<workdir>/scenes_features/` (`weights.safetensors`, one tensor
per `<modality>/<path>`, and `config.json` with the architecture, the dataset
and the training figures). Train once per dataset:

  python -m mmgen_jax.models.scenes_features --config=configs/tiny_cpu.py \
      --workdir=/tmp/mmgen/tiny --config.data.data_dir=/tmp/tfds

The training settings are `config.eval.gen.scenes_net.*` (steps, batch size,
learning rate, widths, seed); a few minutes on 2 CPU cores at the defaults.
`--check` prints the sanity figures of a trained network instead (scenes FD of
the validation split against itself, its halves, the train split, blurred and
channel-shuffled copies).
"""

from __future__ import annotations

import json
import time
from typing import Any, Mapping, Sequence

from absl import logging
from etils import epath
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmgen_jax import modalities as modalities_lib
from mmgen_jax.data import scenes
from mmgen_jax.models import param_files

DIRNAME = 'scenes_features'
WEIGHTS = param_files.WEIGHTS
META = param_files.META
NUM_SEMANTIC = len(scenes.SEMANTIC_CLASSES)


class FeatureCNN(nnx.Module):
  """conv3x3 stacks, stride 2 between stages, ReLU; global average -> features -> heads."""

  def __init__(self, in_channels: int, widths: Sequence[int], num_classes: int, *,
               rngs: nnx.Rngs):
    convs, cin = [], in_channels
    for i, w in enumerate(widths):
      # stride 2 at convs 2, 4, ...: 32 px -> 32, 32, 16, 16, 8 for five widths.
      convs.append(nnx.Conv(cin, w, (3, 3), strides=2 if i and i % 2 == 0 else 1,
                            padding='SAME', rngs=rngs))
      cin = w
    self.convs = nnx.List(convs)
    self.label = nnx.Linear(cin, num_classes, rngs=rngs)
    self.present = nnx.Linear(cin, NUM_SEMANTIC, rngs=rngs)
    self.area = nnx.Linear(cin, NUM_SEMANTIC, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """(N, H, W, C) in model space -> (N, widths[-1]) penultimate features."""
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    return x.mean(axis=(1, 2))

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    f = self.features(x)
    return {'features': f, 'label': self.label(f), 'present': self.present(f),
            'area': self.area(f)}


class ScenesFeatures(nnx.Module):
  """One FeatureCNN per image modality: {modality: (N, H, W, C)} -> {modality: (N, D)}."""

  def __init__(self, channels: Mapping[str, int], widths: Sequence[int], num_classes: int, *,
               rngs: nnx.Rngs):
    self.names = tuple(channels)
    self.nets = nnx.Dict({name: FeatureCNN(c, widths, num_classes, rngs=rngs)
                          for name, c in channels.items()})

  def __call__(self, images: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return {name: self.nets[name].features(x) for name, x in images.items()}

  def features_and_classes(self, images: Mapping[str, jax.Array]
                           ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """The features and the predicted scene class (argmax of the label head) per modality."""
    feats = self(images)
    return feats, {k: self.nets[k].label(f).argmax(-1).astype(jnp.int32)
                   for k, f in feats.items()}


def net_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The architecture and data a trained network is tied to (compared on load)."""
  s = config.eval.gen.scenes_net
  mods = modalities_lib.images(modalities_lib.from_config(config.modalities))
  return {'channels': {m.name: int(m.channels) for m in mods},
          'encodings': {m.name: m.encoding for m in mods},
          'widths': [int(w) for w in s.widths], 'num_classes': int(config.data.num_classes),
          'dataset': f'{config.data.name}/{config.data.builder_config}',
          'resolution': int(config.data.resolution)}


def build(net_config: Mapping[str, Any], seed: int = 0) -> ScenesFeatures:
  return ScenesFeatures(net_config['channels'], net_config['widths'],
                        net_config['num_classes'], rngs=nnx.Rngs(seed))


def targets(batch: Mapping[str, np.ndarray], seg_name: str) -> dict[str, np.ndarray]:
  """label, present (N, 7) in {0, 1} and area (N, 7) from a pipeline batch's ids."""
  ids = np.asarray(batch[f'{seg_name}_ids'])
  flat = ids.reshape(ids.shape[0], -1)
  area = np.stack([(flat == c).mean(1) for c in range(NUM_SEMANTIC)], -1).astype(np.float32)
  return {'label': np.asarray(batch['label'], np.int32), 'present': (area > 0).astype(np.float32),
          'area': area}


def _loss(model: ScenesFeatures, images, t):
  total, parts = 0.0, {}
  for name in model.names:
    out = model.nets[name](images[name])
    ce = optax.softmax_cross_entropy_with_integer_labels(out['label'], t['label']).mean()
    bce = optax.sigmoid_binary_cross_entropy(out['present'], t['present']).mean()
    area = jnp.mean((out['area'] - t['area']) ** 2) * 10.0  # areas are small fractions
    parts[f'{name}/label_acc'] = jnp.mean(out['label'].argmax(-1) == t['label'])
    parts[f'{name}/present_acc'] = jnp.mean((out['present'] > 0) == (t['present'] > 0.5))
    total = total + ce + bce + area
  return total, parts


def _segmentation_name(config) -> str:
  mods = modalities_lib.images(modalities_lib.from_config(config.modalities))
  seg = [m.name for m in mods if m.encoding == 'segmentation']
  if not seg:
    raise ValueError('the scenes feature network learns from semantic segmentation ids: the '
                     'config has no modality with encoding "segmentation" '
                     f'({[m.name for m in mods]}).')
  return seg[0]


def _train_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  c.data.global_batch_size = int(config.eval.gen.scenes_net.batch_size)
  c.data.shuffle_seed = int(config.eval.gen.scenes_net.seed)
  c.data.augment.crop_min_scale = 1.0  # a crop would change the area targets
  return c


def _batches(config, split: str, train: bool):
  from mmgen_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.make_iterator(_train_config(config), split, train=train,
                                process_index=0, process_count=1)


def evaluate_accuracy(model: ScenesFeatures, config, split: str, limit: int = 0
                      ) -> dict[str, float]:
  """Label and presence accuracies per modality on `split` (up to `limit` records)."""
  seg = _segmentation_name(config)
  step = nnx.jit(lambda m, x, t: _loss(m, x, t)[1])
  sums, n = {}, 0
  for batch in _batches(config, split, train=False):
    valid = np.asarray(batch['valid'])
    if not valid.any() or (limit and n >= limit):
      break
    t = {k: v[valid] for k, v in targets(batch, seg).items()}
    parts = step(model, {k: np.asarray(batch[k])[valid] for k in model.names}, t)
    for k, v in parts.items():
      sums[k] = sums.get(k, 0.0) + float(v) * int(valid.sum())
    n += int(valid.sum())
  return {k: v / n for k, v in sums.items()}


def train(config: ml_collections.ConfigDict, out_dir: str) -> ScenesFeatures:
  """Trains the networks on config.data.train_split and writes them to `out_dir`."""
  s = config.eval.gen.scenes_net
  seg = _segmentation_name(config)
  arch = net_config(config)
  model = build(arch, int(s.seed))
  opt = nnx.Optimizer(model, optax.adamw(float(s.learning_rate), weight_decay=1e-4),
                      wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, images, t):
    (loss, parts), grads = nnx.value_and_grad(_loss, has_aux=True)(model, images, t)
    opt.update(model, grads)
    return loss, parts

  it = _batches(config, config.data.train_split, train=True)
  start, num_steps = time.time(), int(s.num_steps)
  for i in range(num_steps):
    batch = next(it)
    loss, parts = step(model, opt, {k: batch[k] for k in model.names}, targets(batch, seg))
    if (i + 1) % max(1, num_steps // 10) == 0 or i + 1 == num_steps:
      elapsed = time.time() - start
      logging.info('scenes_features: step %d/%d loss %.4f %s (%.1f s, ETA %.0f s)', i + 1,
                   num_steps, float(loss),
                   ' '.join(f'{k} {float(v):.2f}' for k, v in parts.items() if 'label' in k),
                   elapsed, elapsed / (i + 1) * (num_steps - i - 1))
  acc = evaluate_accuracy(model, config, config.data.eval_split)
  logging.info('scenes_features: %s accuracy %s', config.data.eval_split,
               {k: round(v, 3) for k, v in acc.items()})
  save(model, out_dir, {**arch, 'num_steps': num_steps, 'batch_size': int(s.batch_size),
                        'learning_rate': float(s.learning_rate), 'seed': int(s.seed),
                        'train_seconds': round(time.time() - start, 1),
                        f'{config.data.eval_split}_accuracy': acc})
  return model


def save(model: ScenesFeatures, out_dir: str, meta: Mapping[str, Any]) -> None:
  """Weights (safetensors) and `meta` (json); each file written whole, then renamed."""
  param_files.save(model, out_dir, meta)


def load(out_dir: str, config: ml_collections.ConfigDict | None = None
         ) -> tuple[ScenesFeatures, str]:
  """(model, fingerprint) from `out_dir`; with `config`, checks it fits the config's data."""
  meta = param_files.read_meta(out_dir, 'train the network with python -m '
                               'mmgen_jax.models.scenes_features --config=... --workdir=...')
  d = epath.Path(out_dir)
  if config is not None:
    want = net_config(config)
    diff = {k: (meta.get(k), v) for k, v in want.items()
            if k not in ('widths',) and meta.get(k) != v}
    if diff:
      raise ValueError(f'{d}: the scenes feature network was trained for another setup '
                       f'(key: (trained, configured)): {diff}. Retrain it or point '
                       'config.eval.gen.scenes_features elsewhere.')
  return param_files.load(out_dir, build, meta)


def default_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  path = str(config.eval.gen.scenes_features)
  return path or str(epath.Path(workdir) / DIRNAME)


def load_or_train(config: ml_collections.ConfigDict, workdir: str) -> tuple[ScenesFeatures, str]:
  """The network of config.eval.gen.scenes_features ('' = <workdir>/scenes_features),
  trained there first (on process 0, the others wait) if absent."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  path = default_dir(config, workdir)
  if not (epath.Path(path) / WEIGHTS).exists():
    if jax.process_index() == 0:
      logging.info('scenes_features: no network in %s: training one (%d steps).', path,
                   int(config.eval.gen.scenes_net.num_steps))
      train(config, path)
    multihost_utils.sync_global_devices('scenes_features trained')
  return load(path, config)


# ---- sanity figures ------------------------------------------------------------------------


def split_images(config: ml_collections.ConfigDict, split: str, limit: int = 0
                 ) -> dict[str, np.ndarray]:
  """The image modalities of `split` in model space (up to `limit` records), one process."""
  names = [m.name for m in modalities_lib.images(modalities_lib.from_config(config.modalities))]
  parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
  seen = 0
  for batch in _batches(config, split, train=False):
    valid = np.asarray(batch['valid'])
    if not valid.any() or (limit and seen >= limit):
      break
    for n in names:
      parts[n].append(np.asarray(batch[n])[valid])
    seen += int(valid.sum())
  out = {n: np.concatenate(v) for n, v in parts.items()}
  return {n: v[:limit] if limit else v for n, v in out.items()}


def blur(x: np.ndarray) -> np.ndarray:
  """3x3 box blur per channel, edges repeated."""
  p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='edge')
  h, w = x.shape[1:3]
  return sum(p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def shuffle_channels(x: np.ndarray) -> np.ndarray:
  """Channels reversed (RGB -> BGR); a 1-channel map is negated (near <-> far)."""
  return -x if x.shape[-1] == 1 else x[..., ::-1]


def sanity_figures(config: ml_collections.ConfigDict, model: ScenesFeatures,
                   train_limit: int = 2000) -> dict[str, float]:
  """Scenes FD per modality of the validation split against: itself, its two halves against
  each other, the train split (up to train_limit), and blurred and channel-shuffled copies.

  Every set goes through generation_eval's feature path (to_data_format, then the nets).
  """
  from mmgen_jax import generation_eval as ge  # pylint: disable=g-import-not-at-top
  from mmgen_jax import metrics  # pylint: disable=g-import-not-at-top
  mods = {m.name: m for m in modalities_lib.images(modalities_lib.from_config(config.modalities))}
  fn = jax.jit(lambda x: model({k: ge.to_data_format(v, mods[k]) for k, v in x.items()}))

  def feats(images):
    out: dict[str, list[np.ndarray]] = {}
    n = len(next(iter(images.values())))
    for i in range(0, n, 256):
      for k, v in fn({k: jnp.asarray(v[i:i + 256]) for k, v in images.items()}).items():
        out.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in out.items()}

  val = split_images(config, config.data.eval_split)
  sets = {'train': feats(split_images(config, config.data.train_split, train_limit)),
          'blurred': feats({k: blur(v) for k, v in val.items()}),
          'channel_shuffled': feats({k: shuffle_channels(v) for k, v in val.items()})}
  fv = feats(val)
  out = {}
  for k, f in fv.items():
    half = len(f) // 2
    out[f'{k}/val_vs_val'] = metrics.fid_from_features(f, f)
    out[f'{k}/val_half_vs_half'] = metrics.fid_from_features(f[:half], f[half:])
    for name, other in sets.items():
      out[f'{k}/val_vs_{name}'] = metrics.fid_from_features(f, other[k])
  out['num_val'], out['num_train'] = float(len(next(iter(fv.values())))), float(
      len(next(iter(sets['train'].values()))))
  return out


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  path = default_dir(config, flags.FLAGS.workdir)
  if flags.FLAGS.check:
    model, _ = load(path, config)
    print(json.dumps(sanity_figures(config, model), indent=1))
    return
  model = train(config, path)
  n = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  print(f'wrote {path} ({n:,} parameters)')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'The network goes to <workdir>/scenes_features.')
  flags.DEFINE_bool('check', False, 'Print the sanity figures of the trained network instead '
                    '(scenes FD of the validation split vs itself, the train split, blurred '
                    'and channel-shuffled copies).')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
