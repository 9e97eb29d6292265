r"""MMGen on ImageNet 256×256, SiT-XL/2: the released recipe.

Latent space (SD-VAE, 4 channels per modality: rgb, depth, normal, segmentation
concatenated to 16 channels at 32×32), patch 2 (256 tokens), 28 blocks, width
1152, 16 heads, 1000 classes with 10% label dropout for guidance, REPA
projector after block 8 (z 768 = DINOv2-B, projector 2048). AdamW lr 1e-4, no
weight decay, clip 1.0, EMA 0.9999, batch 256, bf16 compute with f32 params,
fully sharded (fsdp) over every device.

Data: a TFDS dataset `imagenet2012_mmgen` (name and config set below) that
the user builds from ImageNet-1k plus pseudo-labels; each record needs

  image         uint8  (256, 256, 3)  centre-cropped RGB
  depth         float32 (256, 256)    relative depth from a depth estimator
  normal        float32 (256, 256, 3) unit camera-frame normals in [-1, 1]
  segmentation  uint8  (256, 256)     segment ids (class-agnostic masks)
  label         int64  scalar         ImageNet class in [0, 1000)

and splits `train` / `validation`. With a latent cache the codec is not run
in the loop. Check the plan before paying for hardware (a v5p-32 slice is 16
chips of 95 GB; 8×H100 is 8 devices of 80 GB):

  python -m mmgen_jax.main --config=configs/imagenet256_xl2.py --mode=plan \
      --plan_devices=16 --plan_device_memory_gb=95
"""

import ml_collections

from mmgen_jax import config_schema
from mmgen_jax import modalities


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg  # no variants
  c = config_schema.base_config()
  c.lock()  # a typo below is refused, naming the valid keys

  # MMGen's loss is one MSE over the concatenated latents: each modality weighs
  # the same (4 channels each).
  c.modalities = ml_collections.ConfigDict(dict(
      rgb=modalities.spec(0, 'rgb', 1.0, field='image'),
      depth=modalities.spec(1, 'depth', 1.0),
      normal=modalities.spec(2, 'normal', 1.0),
      segmentation=modalities.spec(3, 'segmentation', 1.0),
  ))

  c.data.name = 'imagenet2012_mmgen'
  c.data.builder_config = ''
  c.data.resolution = 256
  c.data.class_field = 'label'
  c.data.num_classes = 1000
  c.data.global_batch_size = 256
  c.data.worker_count = 8
  c.data.augment.hflip = True

  c.codec.name = 'sd_vae'
  c.codec.latent_channels = 4
  c.codec.scale = 0.18215

  c.model.patch_size = 2
  c.model.hidden_size = 1152
  c.model.depth = 28
  c.model.num_heads = 16
  c.model.mlp_ratio = 4.0
  c.model.class_dropout_prob = 0.1
  c.model.use_task_embedding = True
  c.model.repa_encoder_depth = 8
  c.model.repa_z_dim = 768
  c.model.repa_projector_dim = 2048
  c.model.param_dtype = 'float32'
  c.model.dtype = 'bfloat16'

  c.objective.name = 'decoupled'
  c.objective.path = 'linear'       # SiT's interpolant
  c.objective.prediction = 'v'
  c.objective.joint_prob = 0.75     # MMGen's quarter mixing: 1/4 conditional
  c.objective.rgb_only_prob = 0.5   # half the batch supervised on RGB only
  c.objective.slot_dropout_prob = 0.5  # mean of MMGen's per-batch U(0, 1) slot dropout

  c.optim.learning_rate = 1e-4
  c.optim.warmup_steps = 0
  c.optim.schedule = 'constant'
  c.optim.weight_decay = 0.0
  c.optim.grad_clip_norm = 1.0
  c.optim.ema_decay = 0.9999

  c.mesh.data = 1
  c.mesh.fsdp = -1                  # parameters, optimiser and batch over every device
  c.mesh.tensor = 1

  c.train.num_steps = 400_000       # set to your budget
  c.train.log_every = 100
  c.train.sample_every = 10_000
  c.train.checkpoint_every = 5_000
  c.train.keep_checkpoints = 3

  c.sample.num_steps = 250
  c.sample.cfg_scale = 1.0
  c.sample.num_images = 16
  return c
