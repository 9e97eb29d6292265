r"""MT-Diffusion (multi-task ELBO) on the procedural 32×32 scenes.

RGB is the diffusion space z_0; the auxiliary modalities are encoded into it,
added to the forward process and decoded by their own heads (see
docs/mt_elbo.md). A discrete variance-preserving chain (linear betas,
T = 1000, noise prediction) as in DDPM, on which MT-Diffusion builds.

Variants (`--config=configs/mt_diffusion.py:<variant>`):
  all          (default) depth, normals, segmentation and the scene label as
               auxiliary modalities: joint generation of everything, and
               understanding from a given RGB image (held at sample.t_cond;
               mt_elbo.sample(observed={'rgb': x}) decodes depth, normals,
               segmentation; mt_elbo.classify the label)
  joint_label  RGB and the scene label only: joint image-label generation, and
               classification of a given image (mt_elbo.classify)
  masked       RGB and a masked copy of it (random boxes, the mask as an extra
               input channel, the decoder predicting the whole image):
               masked-image training, i.e. inpainting when the masked copy
               [image, mask] is observed (the known pixels are kept;
               mt_elbo.inpaint). With --config.codec.name=sd_vae the boxes are
               cut in pixels and the blanked image is encoded by the VAE
  transition   RGB and depth, each observed half the time: image transition
               depth -> RGB (depth observed) and RGB -> depth (RGB given and
               held, depth decoded)

A generated label is decoded from the image and kept out of the forward
process, its cross-entropy taken in a second trunk pass at
t <= objective.label_t_max T, where the image is readable (docs/mt_elbo.md
§7a); the trunk is told each auxiliary's state (absent / generated /
observed) by a zero-initialised task embedding, so model.use_task_embedding
does not apply. `--mode=evaluate` scores RGB -> X and the label head under
eval/mt/ (mmgen_jax/mt_eval.py); `--config.eval.gen.num_samples=256` adds the
scenes FD of joint samples and the label agreement under eval/mt/gen/ (the
scenes feature network trains for a few minutes on first use).
"""

import ml_collections

from mmgen_jax import config_schema
from mmgen_jax import modalities

VARIANTS = ('all', 'joint_label', 'masked', 'transition')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or 'all'
  if variant not in VARIANTS:
    raise ValueError(f'configs/mt_diffusion.py:{variant}: unknown variant; choose one of '
                     f'{list(VARIANTS)}.')
  c = config_schema.base_config()
  c.lock()  # a typo below is refused, naming the valid keys

  if variant == 'all':
    c.modalities = config_schema.scenes_modalities(with_label_modality=True)
  elif variant == 'joint_label':
    c.modalities = ml_collections.ConfigDict(dict(
        rgb=modalities.spec(0, 'rgb', 1.0),
        label=modalities.spec(1, 'label', 0.1, num_classes=4)))
  elif variant == 'masked':
    c.modalities = ml_collections.ConfigDict(dict(
        rgb=modalities.spec(0, 'rgb', 1.0),
        masked_rgb=modalities.spec(1, 'rgb', 0.1, field='rgb')))
    c.objective.masked_modality = 'masked_rgb'
  elif variant == 'transition':
    c.modalities = ml_collections.ConfigDict(dict(
        rgb=modalities.spec(0, 'rgb', 1.0),
        depth=modalities.spec(1, 'depth', 0.2)))
    c.objective.aux_observed_prob = 0.5
    c.objective.aux_absent_prob = 0.0

  c.data.builder_config = 'res32'     # 20,000 train / 1,000 validation scenes
  c.data.resolution = 32
  c.data.global_batch_size = 32

  c.objective.name = 'mt_elbo'
  c.objective.primary = 'rgb'
  c.objective.path = 'vp_linear'
  c.objective.prediction = 'eps'
  c.objective.num_timesteps = 1000
  c.objective.w_max = 0.1
  c.objective.decoder_weight = 1.0

  # The trunk input is [z_t, observed encodings]: 2 × 3 channels, so patch 2
  # feeds 24 values per token into a 256-wide model.
  c.model.patch_size = 2
  c.model.hidden_size = 256
  c.model.depth = 6
  c.model.num_heads = 4
  c.model.use_task_embedding = False  # the trunk_spec sets MT-Diffusion's own state embedding

  c.optim.learning_rate = 2e-4
  c.optim.warmup_steps = 200
  c.optim.ema_decay = 0.999

  c.train.num_steps = 6000
  c.train.log_every = 50
  c.train.sample_every = 1000
  c.train.checkpoint_every = 1000

  c.sample.num_steps = 100
  c.sample.num_images = 8
  c.eval.gen.num_samples = 0      # joint samples' scenes FD off by default (see above)
  c.eval.gen.features = 'scenes'
  c.eval.gen.batch = 32
  c.eval.gen.shard_size = 64
  return c
