r"""The embedded default: procedural 32×32 scenes in pixel space, minutes on a CPU.

A 4-block, 128-wide DiT with patch 2 (256 tokens; patch input 2·2·10 = 40
channels < 128 wide) trains for a few hundred steps on 2 CPU cores, logs often,
writes one sample grid and one checkpoint at the end. It shows the whole flow
working; it does not learn the scenes well (see configs/scenes32.py).

  python -m mmgen_jax.main --config=configs/tiny_cpu.py --workdir=/tmp/mmgen/tiny

Variants (`--config=configs/tiny_cpu.py:<variant>`): `pixels` (default) and
`latent` (the same flow through an SD-VAE latent space; see `_latent`).
"""

import ml_collections

from mmgen_jax import config_schema


VARIANTS = ('pixels', 'latent')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or 'pixels'
  if variant not in VARIANTS:
    raise ValueError(f'configs/tiny_cpu.py:{variant}: unknown variant; choose one of '
                     f'{list(VARIANTS)}.')
  c = config_schema.base_config()
  c.lock()  # a typo below is refused, naming the valid keys

  c.data.builder_config = 'res32_small'  # 2,000 train / 200 validation scenes
  c.data.resolution = 32
  c.data.global_batch_size = 16

  c.model.patch_size = 2
  c.model.hidden_size = 128
  c.model.depth = 4
  c.model.num_heads = 4

  c.optim.learning_rate = 3e-4   # a small model tolerates a larger step than DiT's 1e-4
  c.optim.warmup_steps = 20
  c.optim.ema_decay = 0.99       # an EMA over ~100 steps: meaningful within a short run

  c.train.num_steps = 300
  c.train.log_every = 10
  c.train.sample_every = 300     # one grid, at the end
  c.train.checkpoint_every = 300
  c.train.keep_checkpoints = 1

  c.sample.num_steps = 20
  c.sample.num_images = 8
  c.eval.gen.num_samples = 128     # scenes FD per modality of joint samples (a small N)
  c.eval.gen.batch = 32
  c.eval.gen.shard_size = 64
  c.eval.gen.features = 'scenes'
  if variant == 'latent':
    _latent(c)
  return c


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
