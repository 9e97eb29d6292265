r"""The attribute classifier: an object crop -> its shape and its colour name.

Multimodal prompts name objects by shape (`prompts.SHAPES`) and colour
(`prompts.COLOURS`); to score whether a generated image holds the objects a
prompt asks for, each generated object is read by this small CNN, trained on
the procedural scenes' exact ground truth, never by the generator itself.

Input: one object's crop (`crops`): the square box around its mask (plus a
margin), resampled bilinearly to `crop_size`² with the image's RGB in [-1, 1]
zeroed outside the mask, and the mask itself as a 4th channel (so the
silhouette is seen even where the object is dark). Targets: the object's
shape, and the colour name `prompts` gives its albedo (the colour the prompt
would say), so the classifier learns to undo the shading.

Training data: `scenes.render_scene(seed, resolution, with_instances=True)`,
one crop per object with at least `min_pixels` visible pixels. Train seeds
0 ... num_scenes − 1 (the dataset's train seeds); held-out seeds start at
VAL_SEED_OFFSET (the dataset's validation seeds), so the reported accuracy is
on scenes the classifier never saw.

  python -m mmgen_jax.models.attribute_classifier --out=/tmp/attr --resolution=32 \
      --num_scenes=4000

writes `<out>/weights.safetensors` and `<out>/config.json` (architecture, crop
size, vocabularies and the held-out accuracies) and prints the accuracies.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
from etils import epath
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmgen_jax.data import prompts
from mmgen_jax.data import scenes
from mmgen_jax.models import param_files

WEIGHTS = param_files.WEIGHTS
META = param_files.META
VAL_SEED_OFFSET = 1_000_000_000   # the scenes dataset's validation seeds
IN_CHANNELS = 4                   # masked RGB + mask
FIRST_OBJECT = 3                  # instance id of object 0 (scenes.render_scene)


# ---- vocabularies (from the prompt module: the words a prompt can say) ------------------------

def vocabularies() -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(SHAPES, COLOURS) of `mmgen_jax.data.prompts`."""
  return tuple(prompts.SHAPES), tuple(prompts.COLOURS)


def colour_id(albedo: Sequence[float]) -> int:
  """Index into prompts.COLOURS of the colour name a prompt gives this albedo."""
  return prompts.COLOURS.index(prompts.colour_name(albedo))


# ---- crops -----------------------------------------------------------------------------------

def _bilinear(img: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
  """img (H, W, C) sampled at float pixel centres (ys, xs) (same shape); zero outside."""
  h, w = img.shape[:2]
  pad = np.pad(img, ((1, 1), (1, 1), (0, 0)))
  ys = np.clip(ys + 1.0, 0.0, h + 1.0)
  xs = np.clip(xs + 1.0, 0.0, w + 1.0)
  y0 = np.minimum(np.floor(ys).astype(np.int64), h)
  x0 = np.minimum(np.floor(xs).astype(np.int64), w)
  fy, fx = (ys - y0)[..., None], (xs - x0)[..., None]
  return ((1 - fy) * (1 - fx) * pad[y0, x0] + (1 - fy) * fx * pad[y0, x0 + 1]
          + fy * (1 - fx) * pad[y0 + 1, x0] + fy * fx * pad[y0 + 1, x0 + 1])


def crop(rgb: np.ndarray, mask: np.ndarray, size: int, margin: float = 0.15) -> np.ndarray:
  """One object's (size, size, 4) float32 crop: masked RGB in [-1, 1] and the mask.

  rgb: (H, W, 3) in [-1, 1] (float) or uint8; mask: (H, W) bool, not empty. The box is
  the mask's bounding square grown by `margin` of its side on each side (at least one
  pixel), so the silhouette's edge is always inside the crop.
  """
  rgb = np.asarray(rgb)
  if rgb.dtype == np.uint8:
    rgb = rgb.astype(np.float32) / 127.5 - 1.0
  mask = np.asarray(mask, bool)
  if rgb.ndim != 3 or rgb.shape[-1] != 3 or mask.shape != rgb.shape[:2]:
    raise ValueError(f'crop: rgb {rgb.shape} must be (H, W, 3) and mask {mask.shape} (H, W).')
  rows, cols = np.nonzero(mask)
  if not len(rows):
    raise ValueError('crop: the mask is empty.')
  cy, cx = (rows.min() + rows.max()) / 2.0, (cols.min() + cols.max()) / 2.0
  side = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1.0
  side += 2.0 * max(1.0, margin * side)
  grid = cy - side / 2.0 + (np.arange(size) + 0.5) * side / size - 0.5
  ys, xs = np.meshgrid(grid, cx - cy + grid, indexing='ij')
  m = mask.astype(np.float32)[..., None]
  img = np.concatenate([rgb.astype(np.float32) * m, m], axis=-1)
  return _bilinear(img, ys, xs).astype(np.float32)


def crops(rgb: np.ndarray, masks: np.ndarray, size: int) -> np.ndarray:
  """(K, size, size, 4) crops of K masks (K, H, W) of one image."""
  return np.stack([crop(rgb, m, size) for m in masks]) if len(masks) else np.zeros(
      (0, size, size, IN_CHANNELS), np.float32)


# ---- the network -----------------------------------------------------------------------------

class AttributeCNN(nnx.Module):
  """conv3x3 + ReLU stages (stride 2 at every second), flattened, a hidden layer, two heads.

  Flattened rather than averaged: where the silhouette narrows (a cone's apex, a
  cylinder's round top) is the shape cue (held-out shape accuracy 0.86 against 0.79
  with global average pooling, same steps).
  """

  def __init__(self, crop_size: int, widths: Sequence[int], hidden: int, num_shapes: int,
               num_colours: int, *, rngs: nnx.Rngs):
    convs, cin, side = [], IN_CHANNELS, crop_size
    for i, w in enumerate(widths):
      stride = 2 if i % 2 else 1
      convs.append(nnx.Conv(cin, w, (3, 3), strides=stride, padding='SAME', rngs=rngs))
      cin, side = w, -(-side // stride)
    self.convs = nnx.List(convs)
    self.hidden = nnx.Linear(cin * side * side, hidden, rngs=rngs)
    self.shape_head = nnx.Linear(hidden, num_shapes, rngs=rngs)
    self.colour_head = nnx.Linear(hidden, num_colours, rngs=rngs)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(N, S, S, 4) crops -> (shape logits (N, num_shapes), colour logits (N, num_colours))."""
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    f = jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1)))
    return self.shape_head(f), self.colour_head(f)


def build(meta: Mapping[str, Any], seed: int = 0) -> AttributeCNN:
  """The network of `meta`, He-uniform weights and zero biases drawn with numpy.

  Drawn on the host: flax's initialisers compile one XLA program per parameter shape,
  seconds each on a busy CPU, longer than a hundred training steps of this network.
  """
  model = nnx.eval_shape(lambda: AttributeCNN(
      meta['crop_size'], meta['widths'], meta['hidden'], len(meta['shapes']),
      len(meta['colours']), rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  flat = []
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    shape = tuple(v.get_value().shape)
    if path[-1] == 'bias':
      value = np.zeros(shape, np.float32)
    else:
      limit = np.sqrt(6.0 / np.prod(shape[:-1]))
      value = rng.uniform(-limit, limit, shape).astype(np.float32)
    flat.append((path, v.replace(jnp.asarray(value))))
  nnx.update(model, nnx.from_flat_state(flat))
  return model


# ---- data from the scenes ----------------------------------------------------------------------

def scene_objects(seed: int, resolution: int, min_pixels: int
                  ) -> tuple[np.ndarray, np.ndarray, list[scenes.Primitive]]:
  """(rgb uint8 (H, W, 3), masks (K, H, W) of the objects with >= min_pixels visible, their
  Primitives) of scene `seed`."""
  out = scenes.render_scene(seed, resolution, with_instances=True)
  objects = scenes.sample_scene(np.random.default_rng(seed)).objects
  masks, kept = [], []
  for k, p in enumerate(objects):
    m = out['instance'] == FIRST_OBJECT + k
    if m.sum() >= min_pixels:
      masks.append(m)
      kept.append(p)
  h, w = out['instance'].shape
  return out['rgb'], np.asarray(masks, bool).reshape(-1, h, w), kept


def make_dataset(seeds: Sequence[int], resolution: int, crop_size: int, min_pixels: int,
                 colour_fn: Callable[[Sequence[float]], int] = colour_id
                 ) -> dict[str, np.ndarray]:
  """{'crops' (N, S, S, 4), 'shape' (N,), 'colour' (N,), 'seed' (N,)} over `seeds`."""
  shapes = vocabularies()[0]
  parts: dict[str, list] = {'crops': [], 'shape': [], 'colour': [], 'seed': []}
  for seed in seeds:
    rgb, masks, objects = scene_objects(int(seed), resolution, min_pixels)
    parts['crops'].append(crops(rgb, masks, crop_size))
    parts['shape'] += [shapes.index(p.shape) for p in objects]
    parts['colour'] += [colour_fn(p.albedo) for p in objects]
    parts['seed'] += [int(seed)] * len(objects)
  return {'crops': np.concatenate(parts['crops']),
          'shape': np.asarray(parts['shape'], np.int32),
          'colour': np.asarray(parts['colour'], np.int32),
          'seed': np.asarray(parts['seed'], np.int64)}


def augment(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
  """Random horizontal flips, brightness x[0.85, 1.15] and pixel noise (std 0.03) on the
  masked RGB: generated objects are noisier than renders, their colour names the same."""
  x = x.copy()
  flip = rng.uniform(size=len(x)) < 0.5
  x[flip] = x[flip, :, ::-1]
  m = x[..., 3:]
  scale = rng.uniform(0.85, 1.15, (len(x), 1, 1, 1)).astype(np.float32)
  noise = rng.normal(0.0, 0.03, x[..., :3].shape).astype(np.float32)
  x[..., :3] = np.clip(((x[..., :3] + 1.0) * scale - 1.0 + noise), -1.0, 1.0) * m
  return x


# ---- training ---------------------------------------------------------------------------------

def _loss(model: AttributeCNN, x, shape, colour):
  s_logits, c_logits = model(x)
  loss = (optax.softmax_cross_entropy_with_integer_labels(s_logits, shape).mean()
          + optax.softmax_cross_entropy_with_integer_labels(c_logits, colour).mean())
  return loss, (jnp.mean(s_logits.argmax(-1) == shape), jnp.mean(c_logits.argmax(-1) == colour))


@nnx.jit
def _predict_ids(model: AttributeCNN, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return tuple(logits.argmax(-1).astype(jnp.int32) for logits in model(x))


def predict(model: AttributeCNN, x: np.ndarray, batch: int = 512
            ) -> tuple[np.ndarray, np.ndarray]:
  """(shape ids (N,), colour ids (N,)) of crops x (N, S, S, 4), in fixed-size batches (one
  compilation whatever N)."""
  out_s, out_c = [], []
  for i in range(0, len(x), batch):
    part = x[i:i + batch]
    pad = np.zeros((batch - len(part), *x.shape[1:]), np.float32)
    s, c = _predict_ids(model, jnp.asarray(np.concatenate([part, pad])))
    out_s.append(np.asarray(s)[:len(part)])
    out_c.append(np.asarray(c)[:len(part)])
  if not out_s:
    return np.zeros(0, np.int32), np.zeros(0, np.int32)
  return np.concatenate(out_s), np.concatenate(out_c)


def accuracy(model: AttributeCNN, data: Mapping[str, np.ndarray]) -> dict[str, float]:
  s, c = predict(model, data['crops'])
  return {'shape_acc': float(np.mean(s == data['shape'])),
          'colour_acc': float(np.mean(c == data['colour'])),
          'both_acc': float(np.mean((s == data['shape']) & (c == data['colour']))),
          'num_objects': int(len(s))}


def train(out_dir: str | None, *, resolution: int = 32, num_scenes: int = 8000,
          num_val_scenes: int = 500, crop_size: int = 16, widths: Sequence[int] = (16, 32, 32, 64),
          hidden: int = 128, num_steps: int = 2000, batch_size: int = 128,
          learning_rate: float = 3e-3,
          min_pixels: int = 4, seed: int = 0,
          colour_fn: Callable[[Sequence[float]], int] = colour_id
          ) -> tuple[AttributeCNN, dict[str, Any]]:
  """Trains on train seeds, measures on held-out seeds, writes to `out_dir` (None: not saved).

  Returns the model and its meta (architecture, vocabularies, figures).
  """
  start = time.time()
  shapes, colours = vocabularies()
  train_data = make_dataset(range(num_scenes), resolution, crop_size, min_pixels, colour_fn)
  val_data = make_dataset(range(VAL_SEED_OFFSET, VAL_SEED_OFFSET + num_val_scenes), resolution,
                          crop_size, min_pixels, colour_fn)
  render_s = time.time() - start
  logging.info('attribute_classifier: %d train / %d held-out objects rendered in %.1f s',
               len(train_data['shape']), len(val_data['shape']), render_s)
  meta: dict[str, Any] = {'widths': [int(w) for w in widths], 'hidden': int(hidden),
                          'crop_size': int(crop_size),
                          'shapes': list(shapes), 'colours': list(colours),
                          'resolution': int(resolution), 'min_pixels': int(min_pixels)}
  model = build(meta, seed)
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(100, num_steps // 10),
                                                num_steps)
  opt = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=1e-4), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x, shape, colour):
    (loss, accs), grads = nnx.value_and_grad(_loss, has_aux=True)(model, x, shape, colour)
    opt.update(model, grads)
    return loss, accs

  rng = np.random.default_rng(seed)
  n = len(train_data['shape'])
  for i in range(num_steps):
    idx = rng.integers(0, n, batch_size)
    loss, (s_acc, c_acc) = step(model, opt, jnp.asarray(augment(rng, train_data['crops'][idx])),
                                jnp.asarray(train_data['shape'][idx]),
                                jnp.asarray(train_data['colour'][idx]))
    if (i + 1) % max(1, num_steps // 10) == 0:
      logging.info('attribute_classifier: step %d/%d loss %.3f shape %.2f colour %.2f (%.0f s)',
                   i + 1, num_steps, float(loss), float(s_acc), float(c_acc), time.time() - start)
  held_out = accuracy(model, val_data)
  meta.update(num_scenes=int(num_scenes), num_val_scenes=int(num_val_scenes),
              num_train_objects=int(n), num_steps=int(num_steps), batch_size=int(batch_size),
              learning_rate=float(learning_rate), seed=int(seed),
              val_seeds=f'{VAL_SEED_OFFSET}..{VAL_SEED_OFFSET + num_val_scenes - 1}',
              held_out=held_out, train_seconds=round(time.time() - start, 1))
  logging.info('attribute_classifier: held-out %s', held_out)
  if out_dir is not None:
    save(model, out_dir, meta)
  return model, meta


# ---- files --------------------------------------------------------------------------------------

def save(model: AttributeCNN, out_dir: str, meta: Mapping[str, Any]) -> None:
  """Weights (safetensors) and `meta` (json); each file written whole, then renamed."""
  param_files.save(model, out_dir, meta)


def load(out_dir: str, *, check_vocabularies: bool = True
         ) -> tuple[AttributeCNN, dict[str, Any], str]:
  """(model, meta, weights fingerprint) from `out_dir`.

  With check_vocabularies, the SHAPES and COLOURS it was trained on must be today's
  (ids index them).
  """
  meta = param_files.read_meta(out_dir, 'train the classifier with python -m '
                               'mmgen_jax.models.attribute_classifier --out=DIR')
  if check_vocabularies:
    d = epath.Path(out_dir)
    shapes, colours = vocabularies()
    if (tuple(meta['shapes']), tuple(meta['colours'])) != (shapes, colours):
      raise ValueError(f'{d / META}: trained on shapes {meta["shapes"]} and colours '
                       f'{meta["colours"]}; prompts now has {list(shapes)} and {list(colours)}. '
                       'Retrain the classifier.')
  model, fingerprint = param_files.load(out_dir, build, meta)
  return model, meta, fingerprint


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  _, meta = train(f.out, resolution=f.resolution, num_scenes=f.num_scenes,
                  num_val_scenes=f.num_val_scenes, crop_size=f.crop_size,
                  widths=[int(w) for w in f.widths], hidden=f.hidden, num_steps=f.num_steps,
                  batch_size=f.batch_size, learning_rate=f.learning_rate,
                  min_pixels=f.min_pixels, seed=f.seed)
  print(json.dumps({'out': f.out, 'held_out': meta['held_out'],
                    'num_train_objects': meta['num_train_objects'],
                    'train_seconds': meta['train_seconds']}, indent=1))


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('out', None, 'Directory for weights.safetensors and config.json.')
  flags.DEFINE_integer('resolution', 32, 'Scene resolution the crops are cut from.')
  flags.DEFINE_integer('num_scenes', 8000, 'Training scenes (seeds 0 ... num_scenes - 1).')
  flags.DEFINE_integer('num_val_scenes', 500, f'Held-out scenes (seeds {VAL_SEED_OFFSET} ...).')
  flags.DEFINE_integer('crop_size', 16, 'Side of the resampled object crop.')
  flags.DEFINE_list('widths', ['16', '32', '32', '64'], 'Conv widths (stride 2 at every '
                    'second).')
  flags.DEFINE_integer('hidden', 128, 'Width of the hidden layer before the heads.')
  flags.DEFINE_integer('num_steps', 2000, 'Training steps.')
  flags.DEFINE_integer('batch_size', 128, 'Crops per step.')
  flags.DEFINE_float('learning_rate', 3e-3, 'Peak AdamW learning rate (warmup + cosine).')
  flags.DEFINE_integer('min_pixels', 4, 'Objects with fewer visible pixels are not used.')
  flags.DEFINE_integer('seed', 0, 'Initialisation and batch-order seed.')
  flags.mark_flags_as_required(['out'])
  app.run(main)
