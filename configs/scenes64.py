r"""Procedural 64×64 scenes: a DiT-S-sized model for one accelerator.

Patch 4 gives 256 tokens per image (a patch carries 4·4·10 = 160 values,
below the width of 384), 8 blocks of width 384 with 6 heads, batch 128 from
the 20,000-scene build, 20,000 steps (128 epochs), bfloat16 compute. On a
single GPU or TPU chip this is hours; on a 2-core CPU it is days, so plan it
first (`--mode=plan`) and shorten `train.num_steps` for a CPU.

  python -m mmgen_jax.main --config=configs/scenes64.py --workdir=/tmp/mmgen/scenes64
"""

import ml_collections

from mmgen_jax import config_schema


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg  # no variants
  c = config_schema.base_config()
  c.lock()  # a typo below is refused, naming the valid keys

  c.data.builder_config = 'res64'     # 20,000 train / 1,000 validation scenes
  c.data.resolution = 64
  c.data.global_batch_size = 128
  c.data.worker_count = 4

  c.model.patch_size = 4
  c.model.hidden_size = 384
  c.model.depth = 8
  c.model.num_heads = 6
  c.model.dtype = 'bfloat16'

  c.optim.learning_rate = 2e-4
  c.optim.warmup_steps = 500
  c.optim.schedule = 'cosine'
  c.optim.ema_decay = 0.9995

  c.train.num_steps = 20_000
  c.train.log_every = 100
  c.train.sample_every = 2000
  c.train.checkpoint_every = 1000

  c.sample.num_steps = 50
  c.sample.num_images = 8
  return c
