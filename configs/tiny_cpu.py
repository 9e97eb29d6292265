r"""The embedded default: procedural 32×32 scenes in pixel space, minutes on a CPU.

A 4-block, 256-wide DiT with patch 4 (64 tokens; a patch carries 4·4·10 = 160
values, below the width) trains 500 steps at batch 32 on the 2,000-scene
build: joint generation from class labels and RGB → depth / normals /
segmentation (every conditional sample is conditioned on RGB, as MMGen's RGB→X
fine-tune does, so depth → RGB is not trained here; configs/scenes32.py trains
every condition).

Two choices make it learn within minutes. The network predicts the clean
images (`objective.prediction='x0'`): in pixel space a 160-value patch is far
from the low-dimensional data, and asking the network for the noise (or the
velocity, which contains it) wastes the small model on reproducing noise; with
x0 the same run went from no better than the image-blind baselines to clearly
better on every RGB → X score (measured on 2 CPU cores, 600 steps: depth AbsRel
0.126 → 0.088 (baseline 0.124), normals within 22.5° 0.65 → 0.78 (0.74), mIoU
0.23 → 0.36 (0.16); 500 steps lose little and keep `make demo` within 10 minutes
on 2 cores). And every sample is supervised on every modality
(`rgb_only_prob=0`: the scenes' labels are exact, unlike MMGen's pseudo-labels).

  python -m mmgen_jax.main --config=configs/tiny_cpu.py --workdir=/tmp/mmgen/tiny

Variants (`--config=configs/tiny_cpu.py:<variant>`): `pixels` (default),
`latent` (the same flow through an SD-VAE latent space; see `_latent`) and
`labelled` (the same model on images labelled by `mmgen_jax.data.label_images`,
in MMGen's encodings; see `_labelled`).
"""

import ml_collections

from mmgen_jax import config_schema
from mmgen_jax import modalities


VARIANTS = ('pixels', 'latent', 'labelled')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or 'pixels'
  if variant not in VARIANTS:
    raise ValueError(f'configs/tiny_cpu.py:{variant}: unknown variant; choose one of '
                     f'{list(VARIANTS)}.')
  c = config_schema.base_config()
  c.lock()  # a typo below is refused, naming the valid keys

  c.data.builder_config = 'res32_small'  # 2,000 train / 200 validation scenes
  c.data.resolution = 32
  c.data.global_batch_size = 32

  c.model.patch_size = 4
  c.model.hidden_size = 256
  c.model.depth = 4
  c.model.num_heads = 4

  c.objective.prediction = 'x0'          # see the module docstring
  c.objective.joint_prob = 0.5           # half joint generation ...
  c.objective.cond_task_fixed = 'rgb'    # ... half RGB -> X
  c.objective.rgb_only_prob = 0.0        # exact labels: supervise every modality

  c.optim.learning_rate = 5e-4   # a small model tolerates a larger step than DiT's 1e-4
  c.optim.warmup_steps = 50
  c.optim.schedule = 'cosine'
  c.optim.ema_decay = 0.99       # an EMA over ~100 steps: meaningful within a short run

  c.train.num_steps = 500
  c.train.log_every = 10
  c.train.sample_every = 500     # one grid, at the end
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 1

  c.sample.num_steps = 20
  c.sample.num_images = 8
  # Scenes FD of joint samples is off in the demo: its feature network trains for
  # about 4 minutes on first use. `--config.eval.gen.num_samples=128` turns it on.
  c.eval.gen.num_samples = 0
  c.eval.gen.batch = 32
  c.eval.gen.shard_size = 64
  c.eval.gen.features = 'scenes'
  if variant == 'latent':
    _latent(c)
  if variant == 'labelled':
    _labelled(c)
  return c


def _labelled(c: ml_collections.ConfigDict) -> None:
  """Images labelled by `python -m mmgen_jax.data.label_images` (its default --name).

  The records are in MMGen's conventions (configs/imagenet256_xl2.py's
  modalities): the RGB in field `image`, min-max disparity, StableNormal RGB and
  class-agnostic random segment colours. Set `--config.data.data_dir` to the
  labeller's `--out` and `--config.data.num_classes` to its number of class
  folders (1 for a flat folder). No scenes FD: its feature network knows only
  the scenes.
  """
  c.data.name = 'mmgen_labelled'
  c.data.builder_config = ''
  c.data.num_classes = 1
  c.modalities = ml_collections.ConfigDict(dict(
      rgb=modalities.spec(0, 'rgb', 1.0, field='image'),
      depth=modalities.spec(1, 'disparity_minmax', 0.2),
      normal=modalities.spec(2, 'stablenormal_rgb', 0.1),
      segmentation=modalities.spec(3, 'random_colors', 0.1, color_seed=0)))
  c.eval.gen.num_samples = 0


def _latent(c: ml_collections.ConfigDict) -> None:
  """MMGen's latent recipe at toy size: every modality through an SD-architecture VAE.

  32 px scenes -> 4×4×4 latents per modality (16 tokens at patch 1). The VAE is
  a local diffusers directory: the real sd-vae-ft-mse, or a small random one of
  the same architecture for trying the flow
  (`python -m mmgen_jax.models.autoencoder --random --out DIR`).
  """
  c.codec.name = 'sd_vae'
  c.codec.weights = ''             # --config.codec.weights=DIR (config.json + safetensors)
  c.model.patch_size = 1
  c.eval.gen.num_samples = 0      # a random VAE's decodings: scenes FD would score the VAE
  c.model.hidden_size = 128
  c.data.augment.hflip = False     # as MMGen's recipe; a latent cache holds unflipped moments
