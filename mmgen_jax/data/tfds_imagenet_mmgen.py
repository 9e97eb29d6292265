r"""TFDS builder `imagenet2012_mmgen`: ImageNet (or any class-folder tree) with MMGen's
pseudo-labels, centre-cropped, as ArrayRecord.

The records hold what configs/imagenet256_xl2.py reads, in MMGen's encodings
(data/encodings.py):

  image           uint8   (R, R, 3)  the RGB centre crop
  depth           uint8   (R, R)     preprocess_depth.py's 8-bit min-max disparity
  normal          uint8   (R, R, 3)  preprocess_normal.py's StableNormal RGB
  segmentation    uint8   (R, R, 3)  preprocess_mask.py's random-colour segments
  label           int64   ()         the class: the folder's rank among the sorted
                                     train class folders (prepare_meta_data.py's idx_cat;
                                     ImageNet's wnid folders give the usual 0..999)
  repa_features   float32 (T, z)     preprocess_dino.py's DINOv2-B/14 patch tokens

Input (the TFDS manual dir, `--manual_dir`; MMGen's docs/data_preparation.md layout,
where every pseudo-label mirrors its image's relative path with a .png suffix):

  MANUAL_DIR/rgb/{train,val}/<class>/<image>.(JPEG|jpg|jpeg|png|bmp|webp)
  MANUAL_DIR/depth/{train,val}/<class>/<image stem>.png   preprocess_depth.py --input rgb/S --output depth/S
  MANUAL_DIR/normal/{train,val}/<class>/<image stem>.png  preprocess_normal.py (the same pairs)
  MANUAL_DIR/mask/{train,val}/<class>/<image stem>.png    preprocess_mask.py (the same pairs)
  MANUAL_DIR/h5/dino/rgb.h5, rgb_val.h5                   preprocess_dino.py --output ... (train,
                                                          val), keyed by <class>/<image stem>.png

`rgb/train` gives the `train` split and `rgb/val` (optional) the `validation` split;
ImageNet's validation images must first be sorted into class folders, as MMGen's
preprocessing requires for every split.

Every modality gets the same centre crop as MMGen's mmgen_dataset.py gives it
before the VAE (ADM's `center_crop_arr`: halve with a box filter while the short
side is >= 2R, bicubic resize of the short side to R, central R×R crop), except
the segment colour maps, resized with nearest neighbours so that a segment keeps
its one colour (the pipeline decodes segments by exact colour).

Nothing is dropped silently: an image whose pseudo-label or DINO tokens are
missing or unreadable (or whose label's aspect ratio differs from the image's by
more than 2%, so the crops would disagree) is left out of its split, counted and
named in the log and in the dataset's metadata (`builder.info.metadata
['skipped']['train']`: one entry per image with its problems); `--strict` stops at
the first instead.

Configs: `res256` (the default: 256 px, 256 tokens of 768), `res{R}` (tokens
(R/16)², of 768), `res{R}_z{D}` (token width D, e.g. tests), `res{R}_norepa`
(no repa_features; the latent cache may compute them, data/latent_cache.py).

  python -m mmgen_jax.data.tfds_imagenet_mmgen --manual_dir=dataset/ \
      --data_dir=~/tensorflow_datasets [--config=res256] [--workers=8] [--strict]

Importing this module registers the builder with TFDS.
"""

from __future__ import annotations

import dataclasses
import io
import math
import multiprocessing
import os
import re
from typing import Any, Iterator, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

NAME = 'imagenet2012_mmgen'
FILE_FORMAT = tfds.core.FileFormat.ARRAY_RECORD
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')  # MMGen's preprocess_utils, any case
SPLIT_DIRS = {'train': 'train', 'validation': 'val'}
LABEL_DIRS = {'depth': 'depth', 'normal': 'normal', 'segmentation': 'mask'}
DINO_FILES = {'train': 'h5/dino/rgb.h5', 'validation': 'h5/dino/rgb_val.h5'}
MAX_ASPECT_DIFFERENCE = 0.02
MAX_COLORS = 256  # encodings.MAX_SEGMENTS: the pipeline's random-colour segments per record
_NAMED_IN_LOG = 20


@dataclasses.dataclass
class MmgenImagenetConfig(tfds.core.BuilderConfig):
  """Crop size and the DINOv2 token shape (tokens 0: no repa_features)."""
  resolution: int = 256
  repa_tokens: int = 256
  repa_dim: int = 768


def config_from_name(name: str) -> MmgenImagenetConfig | None:
  """`res{R}`, `res{R}_z{D}` or `res{R}_norepa` (module docstring); None for other names."""
  m = re.fullmatch(r'res(\d+)(?:_z(\d+)|_(norepa))?', name)
  if m is None:
    return None
  res = int(m.group(1))
  if res < 16 or res % 16:
    raise ValueError(f'{NAME}/{name}: resolution {res} must be a positive multiple of 16 (the '
                     'SD-VAE downsamples 8×, patch 2: (R/16)² tokens).')
  tokens = 0 if m.group(3) else (res // 16) ** 2
  dim = int(m.group(2) or 768)
  what = 'no repa_features' if not tokens else f'repa_features ({tokens}, {dim})'
  return MmgenImagenetConfig(name=name, resolution=res, repa_tokens=tokens, repa_dim=dim,
                             description=f'{res}×{res} centre crops; {what}.')


def features(config: MmgenImagenetConfig) -> tfds.features.FeaturesDict:
  r = config.resolution
  f = {
      'image': tfds.features.Image(shape=(r, r, 3), encoding_format='png'),
      'depth': tfds.features.Image(shape=(r, r, 1), encoding_format='png'),
      'normal': tfds.features.Image(shape=(r, r, 3), encoding_format='png'),
      'segmentation': tfds.features.Image(shape=(r, r, 3), encoding_format='png'),
      'label': tfds.features.Scalar(np.int64),
  }
  if config.repa_tokens:
    f['repa_features'] = tfds.features.Tensor(shape=(config.repa_tokens, config.repa_dim),
                                              dtype=np.float32)
  return tfds.features.FeaturesDict(f)


# ---- images, as MMGen's dataset crops them -----------------------------------------------


def center_crop(image: PIL.Image.Image, size: int, *, nearest: bool = False) -> np.ndarray:
  """ADM's centre crop (module docstring); `nearest` keeps every colour of a label map."""
  if not nearest:
    while min(image.size) >= 2 * size:
      image = image.resize(tuple(x // 2 for x in image.size), resample=PIL.Image.BOX)
  scale = size / min(image.size)
  image = image.resize(tuple(round(x * scale) for x in image.size),
                       resample=PIL.Image.NEAREST if nearest else PIL.Image.BICUBIC)
  x = np.asarray(image)
  top, left = (x.shape[0] - size) // 2, (x.shape[1] - size) // 2
  return x[top:top + size, left:left + size]


def _png(x: np.ndarray) -> bytes:
  """PNG bytes by PIL: in the workers, and without TensorFlow (TFDS takes encoded images)."""
  buf = io.BytesIO()
  PIL.Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).save(buf, format='PNG')
  return buf.getvalue()


def _open(path: str) -> PIL.Image.Image:
  with PIL.Image.open(path) as im:
    im.load()  # decode now: a truncated file fails here, named
    return im


def _label(kind: str, path: str, rgb_size: tuple[int, int], size: int
           ) -> tuple[np.ndarray | None, str | None]:
  """One pseudo-label PNG, cropped; or the problem with it."""
  if not os.path.isfile(path):
    return None, f'{kind} {path}: missing'
  try:
    im = _open(path)
  except Exception as e:  # pylint: disable=broad-except  (named per file)
    return None, f'{kind} {path}: unreadable ({e})'
  w, h = im.size
  if abs(math.log((w / h) / (rgb_size[0] / rgb_size[1]))) > MAX_ASPECT_DIFFERENCE:
    return None, (f'{kind} {path}: {w}×{h} does not have the aspect of its image '
                  f'({rgb_size[0]}×{rgb_size[1]}); the crops would not align')
  if kind == 'depth':
    if im.mode in ('RGB', 'RGBA'):  # a grey map saved as RGB: its channels must agree
      x = np.asarray(im)[..., :3]
      if (x != x[..., :1]).any():
        return None, f'{kind} {path}: a colour image (mode {im.mode}); expected 8-bit grey'
      im = im.convert('L')
    if im.mode != 'L':
      return None, f'{kind} {path}: mode {im.mode}; expected 8-bit grey (L)'
    return center_crop(im, size)[..., None], None
  if im.mode != 'RGB':
    return None, f'{kind} {path}: mode {im.mode}; expected RGB'
  if kind == 'normal':
    return center_crop(im, size), None
  x = center_crop(im, size, nearest=True)
  colors = len(np.unique(x.reshape(-1, 3), axis=0))
  if colors > MAX_COLORS:
    return None, f'{kind} {path}: {colors} colours in the crop; at most {MAX_COLORS} segments'
  return x, None


def load_example(rgb_path: str, rel: str, label: int, manual_dir: str, split_dir: str,
                 size: int) -> tuple[dict[str, Any] | None, list[str]]:
  """The record of one image (without repa_features), or its problems (every one named)."""
  try:
    rgb = _open(rgb_path).convert('RGB')  # grey and CMYK JPEGs, as mmgen_dataset.py reads them
  except Exception as e:  # pylint: disable=broad-except
    return None, [f'image {rgb_path}: unreadable ({e})']
  example = {'image': _png(center_crop(rgb, size)), 'label': np.int64(label)}
  problems = []
  png = os.path.splitext(rel)[0] + '.png'  # preprocess_utils.output_path
  for name, folder in LABEL_DIRS.items():
    x, problem = _label(name, os.path.join(manual_dir, folder, split_dir, png), rgb.size, size)
    if problem:
      problems.append(problem)
    example[name] = None if x is None else _png(x)
  return (None, problems) if problems else (example, [])


def _load_args(args):
  return load_example(*args)


# ---- the file tree -------------------------------------------------------------------------


def class_folders(manual_dir: str, split_dir: str) -> list[str]:
  root = os.path.join(manual_dir, 'rgb', split_dir)
  return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def list_images(manual_dir: str, split_dir: str) -> list[str]:
  """Relative paths `<class>/<...>/<image>` under rgb/<split_dir>, sorted (MMGen's order)."""
  root = os.path.join(manual_dir, 'rgb', split_dir)
  out = []
  for folder, _, files in os.walk(root):
    out += [os.path.relpath(os.path.join(folder, f), root) for f in files
            if f.lower().endswith(IMAGE_SUFFIXES)]
  flat = [p for p in out if os.sep not in p]
  if flat:
    raise ValueError(f'{root}: images must sit in class folders (as MMGen\'s '
                     f'prepare_meta_data.py requires); found {flat[0]!r} at the top.')
  return sorted(out)


class _Dino:
  """preprocess_dino.py's HDF5 tokens: key = the image's relative path with .png."""

  def __init__(self, path: str, shape: tuple[int, int]):
    import h5py  # pylint: disable=g-import-not-at-top  (tensorflow's dependency)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: the DINOv2 tokens of this split are missing (MMGen\'s '
                              'data/preprocess_dino.py writes them); or build a `_norepa` config.')
    self.path, self.shape, self.file = path, shape, h5py.File(path, 'r')

  def get(self, rel: str) -> tuple[np.ndarray | None, str | None]:
    key = os.path.splitext(rel)[0].replace(os.sep, '/') + '.png'
    if key not in self.file:
      return None, f'repa_features {self.path}[{key!r}]: missing'
    try:
      z = np.asarray(self.file[key][...], np.float32)
    except Exception as e:  # pylint: disable=broad-except
      return None, f'repa_features {self.path}[{key!r}]: unreadable ({e})'
    if z.shape != self.shape:
      return None, f'repa_features {self.path}[{key!r}]: shape {z.shape}; expected {self.shape}'
    if not np.isfinite(z).all():
      return None, f'repa_features {self.path}[{key!r}]: {(~np.isfinite(z)).sum()} non-finite'
    return z, None

  def close(self):
    self.file.close()


# ---- the builder ---------------------------------------------------------------------------


# Run as a script (python -m; its spawned workers import it as __mp_main__), the builder
# used is the imported module's (TFDS locates a builder's files by its package, which a
# script lacks): the script's copy is not registered.
class Imagenet2012Mmgen(tfds.core.GeneratorBasedBuilder,
                        skip_registration=__name__ in ('__main__', '__mp_main__')):
  """ImageNet class folders + MMGen's depth / normal / mask PNGs and DINOv2 tokens."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [config_from_name('res256')]
  DEFAULT_CONFIG_NAME = 'res256'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'MMGen\'s dataset/ tree (its docs/data_preparation.md): rgb/{train,val}/<class>/<image>, '
      'depth/, normal/ and mask/ mirroring it with .png files, h5/dino/rgb.h5 (train) and '
      'h5/dino/rgb_val.h5 (val) from preprocess_dino.py; see mmgen_jax/data/tfds_imagenet_mmgen.py.')

  # Set by `build`: worker processes decoding and cropping images (0 = here), and strictness.
  workers: int = 0
  strict: bool = False

  @classmethod
  def get_builder_config(cls, name, version=None):
    """A registered config, or one parsed from its name (`res{R}[_z{D}|_norepa]`)."""
    return super().get_builder_config(name, version) or config_from_name(name)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=('ImageNet-style class folders with MMGen\'s pseudo-labels (Depth Anything '
                     'V2 disparity, StableNormal normals, Semantic-SAM segments) and DINOv2 '
                     'tokens, centre-cropped as MMGen\'s training reads them.'),
        features=features(self.builder_config),
        supervised_keys=None,
        disable_shuffling=True,  # record i of a split is its i-th image in sorted order
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    if not os.path.isdir(os.path.join(manual_dir, 'rgb', SPLIT_DIRS['train'])):
      raise FileNotFoundError(f'{manual_dir}/rgb/train is missing; expected:\n'
                              + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    classes = class_folders(manual_dir, SPLIT_DIRS['train'])
    self.info.metadata['classes'] = classes
    self.info.metadata['skipped'] = {}
    return {split: self._generate_examples(manual_dir, split, classes)
            for split, d in SPLIT_DIRS.items()
            if os.path.isdir(os.path.join(manual_dir, 'rgb', d))}

  def _generate_examples(self, manual_dir: str, split: str, classes: Sequence[str]
                         ) -> Iterator[tuple[str, dict[str, Any]]]:
    cfg = self.builder_config
    split_dir = SPLIT_DIRS[split]
    ids = {c: i for i, c in enumerate(classes)}
    images = list_images(manual_dir, split_dir)
    unknown = sorted({p.split(os.sep)[0] for p in images} - set(ids))
    if unknown:
      raise ValueError(f'rgb/{split_dir} has class folders {unknown[:5]} that rgb/train lacks; '
                       'labels are ranks among the train classes.')
    root = os.path.join(manual_dir, 'rgb', split_dir)
    args = [(os.path.join(root, p), p, ids[p.split(os.sep)[0]], manual_dir, split_dir,
             cfg.resolution) for p in images]
    dino = (_Dino(os.path.join(manual_dir, DINO_FILES[split]), (cfg.repa_tokens, cfg.repa_dim))
            if cfg.repa_tokens else None)
    skipped = []
    pool = (multiprocessing.get_context('spawn').Pool(self.workers) if self.workers > 0
            else None)
    try:
      loaded = (pool.imap(_load_args, args, chunksize=16) if pool  # ordered
                else (_load_args(a) for a in args))
      for rel, (example, problems) in zip(images, loaded):
        if dino is not None:
          z, problem = dino.get(rel)
          problems += [problem] if problem else []
          if example is not None:
            example['repa_features'] = z
        if problems:
          if self.strict:
            raise ValueError(f'{split} image {rel}: ' + '; '.join(problems))
          skipped.append({'image': rel, 'problems': problems})
          continue
        yield rel, example
    finally:
      if pool is not None:
        pool.terminate()
      if dino is not None:
        dino.close()
    self.info.metadata['skipped'][split] = skipped
    if skipped:
      logging.warning('%s: %d of %d %s images left out (their pseudo-labels are missing or '
                      'unreadable; all listed in the metadata), e.g.\n  %s', NAME, len(skipped),
                      len(images), split, '\n  '.join(
                          f'{s["image"]}: {"; ".join(s["problems"])}'
                          for s in skipped[:_NAMED_IN_LOG]))


def make_builder(config: str = 'res256', data_dir: str | None = None) -> Imagenet2012Mmgen:
  return Imagenet2012Mmgen(config=config, data_dir=data_dir, file_format=FILE_FORMAT)


def build(manual_dir: str, data_dir: str, config: str = 'res256', *, workers: int = 0,
          strict: bool = False) -> Imagenet2012Mmgen:
  """Writes `config` from `manual_dir` under `data_dir` (reused if already built)."""
  builder = make_builder(config, data_dir)
  builder.workers, builder.strict = workers, strict
  builder.download_and_prepare(
      file_format=FILE_FORMAT,
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir),
                                                   try_download_gcs=False))
  return builder


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  builder = build(f.manual_dir, f.data_dir, f.config, workers=f.workers, strict=f.strict)
  skipped = builder.info.metadata.get('skipped', {})
  for split, info in builder.info.splits.items():
    print(f'{NAME}/{f.config} {split}: {info.num_examples} records, '
          f'{len(skipped.get(split, []))} images left out')


if __name__ == '__main__':
  flags.DEFINE_string('manual_dir', None, 'MMGen\'s dataset/ tree (module docstring).')
  flags.DEFINE_string('data_dir', None, 'TFDS data dir to write to.')
  flags.DEFINE_string('config', 'res256', 'res256 | res{R} | res{R}_z{D} | res{R}_norepa.')
  flags.DEFINE_integer('workers', 0, 'Processes decoding and cropping images (0 = this one).')
  flags.DEFINE_bool('strict', False, 'Stop at the first image with a bad pseudo-label.')
  flags.mark_flags_as_required(['manual_dir', 'data_dir'])
  from mmgen_jax.data import tfds_imagenet_mmgen  # pylint: disable=g-import-not-at-top
  app.run(tfds_imagenet_mmgen.main)
