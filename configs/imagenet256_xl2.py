r"""MMGen on ImageNet 256×256, SiT-XL/2: the released recipe.

MMGen's scripts/train_imagenet.sh (the 600k release checkpoint) in this
project's keys; each line below names the flag or code it reproduces. Latent
space (SD-VAE, 4 channels per modality: rgb, depth, normal, segmentation
concatenated to 16 channels at 32×32), patch 2 (256 tokens), 28 blocks, width
1152, 16 heads, 1000 classes with 10% label dropout for guidance, REPA
projector after block 8 (z 768 = DINOv2-B, projector 2048). AdamW lr 1e-4, no
weight decay, clip 1.0, EMA 0.9999, batch 256 for 600k steps, bf16 compute
with f32 params, fully sharded (fsdp) over every device.

Where this run still differs from MMGen's (diffusion/decoupled.py lists the
objective's differences):
  - the EMA decay warms up as min(0.9999, (1 + step) / (10 + step)); MMGen's
    is 0.9999 from the first step;
  - bf16 compute where MMGen uses fp16 autocast with TF32 matmuls.

Data: a TFDS dataset `imagenet2012_mmgen` (name and config set below) that
the user builds from ImageNet-1k plus pseudo-labels, in MMGen's encodings
(data/encodings.py); each record needs

  image           uint8   (256, 256, 3)  centre-cropped RGB
  depth           uint8   (256, 256)     Depth Anything V2 disparity as MMGen's
                                         preprocess_depth.py stores it (or float32
                                         metric depth, converted on the fly)
  normal          uint8   (256, 256, 3)  StableNormal's RGB as preprocess_normal.py
                                         stores it (or float32 OpenCV-frame normals)
  segmentation    uint8   (256, 256, 3)  preprocess_mask.py's colour map (one
                                         segment per colour, recoloured here), or
                                         (256, 256) segment ids
  label           int64   scalar         ImageNet class in [0, 1000)
  repa_features   float32 (256, 768)     DINOv2-B/14 patch tokens of the 224 px
                                         centre crop (preprocess_dino.py)

and splits `train` / `validation`. Build it from MMGen's dataset/ tree (its
data/preprocess_{depth,normal,mask,dino}.py outputs beside rgb/{train,val}/<class>/;
layout and checks in mmgen_jax/data/tfds_imagenet_mmgen.py; images whose
pseudo-labels are missing or unreadable are left out and listed):

  python -m mmgen_jax.data.tfds_imagenet_mmgen --manual_dir=dataset/ \
      --data_dir=~/tensorflow_datasets --workers=8

With a latent cache the codec is not run in the loop. Check the plan before
paying for hardware (a v5p-32 slice is 16 chips of 95 GB; 8×H100 is 8 devices
of 80 GB):

  python -m mmgen_jax.main --config=configs/imagenet256_xl2.py --mode=plan \
      --plan_devices=16 --plan_device_memory_gb=95

The released checkpoint (MMGen's 0600000.pt, SiT-XL/2 at 600k steps) runs
with this config as it is: convert it once (the EMA weights, as exp_sample.py
uses), then point `sample.checkpoint` at the file and `codec.weights` at a
local copy of stabilityai/sd-vae-ft-mse (README: "The released MMGen
checkpoint"):

  python -m mmgen_jax.models.convert --checkpoint 0600000.pt \
      --config configs/imagenet256_xl2.py --out xl2.safetensors
  python -m mmgen_jax.main --config=configs/imagenet256_xl2.py --mode=sample \
      --task=rgb_to_x --config.sample.checkpoint=xl2.safetensors \
      --config.codec.weights=sd-vae-ft-mse/ --input='photos/*.jpg' --out=out/
"""

import ml_collections

from mmgen_jax import config_schema
from mmgen_jax import modalities


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg  # no variants
  c = config_schema.base_config()
  c.lock()  # a typo below is refused, naming the valid keys

  # --num-tasks=4 --is-mmcat-diff: tasks 0..3 = rgb, depth, normal, mask, and
  # --use-diff-task-weight: train.py's per-task loss weights [1.0, 0.2, 0.1, 0.1].
  # Encodings as MMGen's preprocessing stores the pseudo-labels (docs/data_preparation.md):
  c.modalities = ml_collections.ConfigDict(dict(
      rgb=modalities.spec(0, 'rgb', 1.0, field='image'),
      # data/preprocess_depth.py: min-max 8-bit disparity (one channel: the codec
      # replicates it to RGB, as mmgen_dataset.py's convert('RGB') does).
      depth=modalities.spec(1, 'disparity_minmax', 0.2),
      # data/preprocess_normal.py: StableNormal's hubconf RGB (x right, y up, z to viewer).
      normal=modalities.spec(2, 'stablenormal_rgb', 0.1),
      # data/preprocess_mask.py: Semantic-SAM masks in random colours, random background.
      segmentation=modalities.spec(3, 'random_colors', 0.1, color_seed=0),
  ))

  c.data.name = 'imagenet2012_mmgen'
  c.data.builder_config = ''
  c.data.resolution = 256             # --resolution=256
  c.data.class_field = 'label'
  c.data.num_classes = 1000           # --num-classes=1000
  c.data.global_batch_size = 256      # BATCH=256 (global)
  c.data.worker_count = 8
  c.data.augment.hflip = False        # none: MMGen reads latents of unflipped centre crops

  c.codec.name = 'sd_vae'             # --vae-path=stabilityai/sd-vae-ft-mse latents
  c.codec.latent_channels = 4
  c.codec.scale = 0.18215             # train.py latents_scale
  c.codec.weights = ''                # --vae-path: a local sd-vae-ft-mse dir (or .safetensors)
  c.codec.precision = 'default'       # --allow-tf32: reduced-precision matmul passes

  c.model.patch_size = 2              # --model=SiT-XL/2
  c.model.hidden_size = 1152
  c.model.depth = 28
  c.model.num_heads = 16
  c.model.mlp_ratio = 4.0
  c.model.class_dropout_prob = 0.1    # --cfg-prob=0.1
  c.model.use_task_embedding = True   # --use-taskcond-emb
  c.model.task_embed_init_std = 1.0   # models/sit.py TaskCondEmbedder: nn.Embedding's N(0, 1)
  c.model.repa_encoder_depth = 8      # --encoder-depth=8
  c.model.repa_z_dim = 768            # train.py z_dims = [768] (DINOv2-B)
  c.model.repa_projector_dim = 2048   # models/sit.py SiT(projector_dim=2048)
  c.model.param_dtype = 'float32'
  c.model.dtype = 'bfloat16'          # MMGen: --mixed-precision=fp16

  c.objective.name = 'decoupled'      # --use-decouple-task: one timestep per modality
  c.objective.path = 'linear'         # --path-type=linear
  c.objective.prediction = 'v'        # --prediction=v (--weighting=uniform: t ~ U(0, 1))
  c.objective.layout = 'by_position'  # loss.py lays the modes out by position in the batch...
  c.objective.group_size = 32         # ...of each process: BATCH=256 over NPROC=8 processes
  c.objective.rgb_only_prob = 0.5     # --ratio-train-onlyrgb=0.5: the first half RGB-only
  c.objective.joint_prob = 0.75       # --use-quarter-mixing: the first 3/4 joint, then conditional
  c.objective.cond_t_max = 0.01       # --use-decouple-rand1: one condition at t = 0.01·U(0, 1)
  c.objective.cond_task_fixed = ''    # --cond-task-fixed=-1: the condition drawn per sample
  c.objective.slot_dropout = 'per_batch'  # loss.py's random task drop (on with that RGB-only ratio)
  c.objective.repa_coeff = 0.5        # --proj-coeff=0.5 (train.py: loss + proj_coeff × proj_loss)

  c.optim.learning_rate = 1e-4        # --learning-rate=1e-4, constant (train.py has no schedule)
  c.optim.warmup_steps = 0
  c.optim.schedule = 'constant'
  c.optim.b1, c.optim.b2 = 0.9, 0.999  # --adam-beta1/2 defaults
  c.optim.weight_decay = 0.0          # --adam-weight-decay=0
  c.optim.grad_clip_norm = 1.0        # --max-grad-norm=1.0
  c.optim.ema_decay = 0.9999          # train.py update_ema(decay=0.9999)

  c.mesh.data = 1
  c.mesh.fsdp = -1                    # parameters, optimiser and batch over every device
  c.mesh.tensor = 1

  c.train.num_steps = 600_000         # MAX_STEPS=600000 (the released 0600000.pt)
  c.train.log_every = 100
  c.train.sample_every = 10_000       # SAMPLE_STEPS=10000
  c.train.checkpoint_every = 5_000    # MMGen: 50,000; more often for preemptible slices
  c.train.keep_checkpoints = 3

  # MMGen's inference (exp_sample.py), also used for the training grids (MMGen's
  # train.py draws its grids with a 50-step ODE and cfg 4.0 instead):
  c.sample.method = 'euler_maruyama'  # exp_sample.py calls euler_maruyama_sampler
  c.sample.num_steps = 250            # exp_sample.py --num-steps; infer_rgb2x.sh NUM_STEPS=250
  c.sample.cfg_scale = 1.0            # exp_sample.py --cfg-scale (docs/infer_rgb2x.md: category
                                      # results use 1.0; 1.8 for conditioned generation)
  c.sample.guidance_low = 0.0         # euler_maruyama_sampler guides every step: the
  c.sample.guidance_high = 1.0        # interval [0, 1] (euler_sampler's defaults)
  c.sample.t_cond = 0.005             # exp_sample.py --t-blend-start
  c.sample.num_images = 16
  c.sample.checkpoint = ''            # '' = the workdir's checkpoint; the released weights:
                                      # convert's .safetensors (exp_sample.py --ckpt, EMA)

  # Generation metrics as in SiT/REPA papers: 50k class-balanced samples, FID/IS/P/R
  # with pytorch-fid's Inception against ADM's reference batch.
  c.eval.gen.num_samples = 50_000
  c.eval.gen.batch = 256
  c.eval.gen.shard_size = 2_048
  c.eval.gen.features = 'inception'
  c.eval.gen.inception_weights = ''   # --config.eval.gen.inception_weights=fid_inception.safetensors
  c.eval.gen.reference_stats = ''     # ADM's VIRTUAL_imagenet256_labeled.npz (else the split below)
  c.eval.gen.reference_num = 50_000
  return c
