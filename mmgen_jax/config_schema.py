"""Every config key with its default; configs in `configs/` start from `base_config()`.

Config files lock what this returns (`c.lock()`) after adding any modality of
their own, so a typo in a config file or on the command line
(`--config.model.hiden_size=...`) is refused with the valid keys listed.
"""

from __future__ import annotations

import ml_collections

from mmgen_jax import modalities as modalities_lib


def scenes_modalities(with_label_modality: bool = False) -> ml_collections.ConfigDict:
  """The procedural scenes' modalities in MMGen's order (rgb, depth, normal, mask)."""
  mods = dict(
      rgb=modalities_lib.spec(0, 'rgb', 1.0),
      depth=modalities_lib.spec(1, 'depth', 0.2),
      normal=modalities_lib.spec(2, 'normal', 0.1),
      segmentation=modalities_lib.spec(3, 'segmentation', 0.1, palette='scenes'),
  )
  if with_label_modality:
    mods['label'] = modalities_lib.spec(4, 'label', 0.1, num_classes=4)
  return ml_collections.ConfigDict(mods)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # A model narrower than its patch input (patch² × input channels) stalls; set
  # True to train it anyway (config_validation warns instead of refusing).
  c.allow_narrow_patch = False

  c.modalities = scenes_modalities()

  # ---- data ------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.name = 'mmgen_scenes'        # TFDS builder name
  c.data.builder_config = 'res32_small'  # TFDS builder config (resolution + size)
  c.data.resolution = 32              # square image side in pixels (must match the build)
  c.data.data_dir = ''                # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.class_field = 'label'        # record field used as the class condition y
  c.data.num_classes = 4
  c.data.global_batch_size = 32
  c.data.shuffle_seed = 0
  c.data.worker_count = 0             # Grain mp_prefetch workers (0 = in-process)
  c.data.worker_buffer_size = 2
  c.data.read_threads = 2             # threads decoding records in each process / worker
  c.data.read_buffer_size = 64        # records decoded ahead in each process / worker
  c.data.on_bad_record = 'raise'      # 'raise' | 'skip' (skipped records are counted)
  # A directory written by `python -m mmgen_jax.data.latent_cache` (sd_vae codec):
  # training reads the train split's posterior moments from it (augmentation off).
  c.data.latent_cache = ''
  c.data.latent_cache_dtype = 'float32'  # moments as written: 'float32' | 'float16'
  c.data.repa_encoder = ''            # latent_cache's registered REPA encoder ('' = the records')
  c.data.repa_encoder_weights = ''    # its weights, if it has any (dinov2: a transformers dir)
  c.data.augment = ml_collections.ConfigDict()
  c.data.augment.hflip = True
  c.data.augment.crop_min_scale = 1.0  # < 1 enables random crop + resize back

  # ---- codec: pixel space or SD-VAE latents ----------------------------------
  c.codec = ml_collections.ConfigDict()
  c.codec.name = 'identity'           # 'identity' | 'sd_vae'
  c.codec.latent_channels = 4
  c.codec.scale = 0.18215
  c.codec.weights = ''                # 'sd_vae': a diffusers directory or .safetensors file
  c.codec.precision = 'highest'       # VAE matmuls/convs: 'highest' | 'high' | 'default'

  # ---- model -----------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.patch_size = 2
  c.model.hidden_size = 128
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.mlp_ratio = 4.0
  c.model.qk_norm = False
  c.model.class_dropout_prob = 0.1
  c.model.use_task_embedding = True
  c.model.task_embed_init_std = 0.02  # MMGen's task table is a plain nn.Embedding: 1.0
  c.model.repa_encoder_depth = 0      # > 0 adds the REPA projector after this block
  c.model.repa_z_dim = 768
  c.model.repa_projector_dim = 2048
  c.model.param_dtype = 'float32'
  c.model.dtype = 'float32'           # compute dtype: 'float32' | 'bfloat16'
  # The blocks as one stacked module run by a scan (compile time independent of
  # depth), or one module per block; checkpoints restore into either layout.
  c.model.scan_layers = True
  c.model.scan_unroll = 1             # blocks per scan iteration; model.depth: no loop at all
  # What the backward pass recomputes: 'none' (keep every activation), 'full'
  # (keep each block's input) or 'save_dots' (keep the weight matmuls' outputs).
  c.model.remat_policy = 'none'

  # ---- multimodal prompts (UNIMO-G style; models/prompt_encoder.py) -----------
  # Text interleaved with entity images conditions the decoupled objective through
  # cross-attention in every block; '' = off (no prompt parameters exist).
  c.prompt = ml_collections.ConfigDict()
  c.prompt.name = ''                  # '' | 'unimo'
  c.prompt.vocab_size = 0             # 0 = len(mmgen_jax.data.prompts.VOCAB)
  c.prompt.width = 128                # encoder width (the cross-attention's key/value input)
  c.prompt.depth = 2                  # encoder transformer blocks
  c.prompt.heads = 4                  # encoder, resampler and cross-attention heads
  c.prompt.mlp_ratio = 4.0
  c.prompt.max_tokens = 48            # L: prompt length (records are padded to it)
  c.prompt.entity_tokens = 4          # R: '<ent>' slots (resampler tokens) per entity image
  c.prompt.max_entities = 4           # K: entity images per prompt
  c.prompt.entity_size = 32           # S: entity image side
  c.prompt.entity_widths = (32, 64)   # entity conv widths, one stride-2 conv each
  c.prompt.resampler_depth = 1        # Perceiver resampler layers
  # Training: each sample's words / entity images leave the prompt (masked) with
  # these probabilities, independently, so guidance has its three passes.
  c.prompt.text_dropout_prob = 0.1
  c.prompt.entity_dropout_prob = 0.1
  # Probabilities of the prompt kinds the data pipeline draws per record: text only,
  # entity images without their attribute words, entity images with them.
  c.prompt.kind_probs = (1 / 3, 1 / 3, 1 / 3)

  # ---- objective ---------------------------------------------------------------
  c.objective = ml_collections.ConfigDict()
  c.objective.name = 'decoupled'      # 'decoupled' (MMGen) | 'mt_elbo' (MT-Diffusion)
  c.objective.path = 'linear'         # 'linear' | 'vp_cosine' | 'vp_linear'
  c.objective.prediction = 'v'        # 'v' | 'eps' | 'x0'
  # decoupled (MMGen); diffusion/decoupled.py explains each key.
  c.objective.joint_prob = 0.75       # else conditional on one modality
  c.objective.cond_t_max = 0.01       # condition time ~ cond_t_max * U(0, 1)
  c.objective.cond_task_fixed = ''    # condition modality of every conditional sample ('' = drawn)
  c.objective.rgb_only_prob = 0.5     # fraction of samples supervised on RGB only
  c.objective.layout = 'per_sample'   # modes drawn 'per_sample' | 'by_position' (MMGen)
  c.objective.slot_dropout = 'fixed'  # non-RGB loss dropout: 'fixed' rate | 'per_batch' (MMGen)
  c.objective.slot_dropout_prob = 0.0  # the 'fixed' rate
  c.objective.group_size = 0          # samples per MMGen process batch (0 = the whole batch)
  # REPA: + repa_coeff × (−cos) between the projector's tokens and the batch field
  # 'repa_features' (N, T, model.repa_z_dim), T the token grid; 0 = off.
  c.objective.repa_coeff = 0.0
  # Entity alignment (FastComposer's localisation loss): + coeff × the mean over
  # entities of (cross-attention on the entity's tokens outside its mask − inside);
  # needs config.prompt and the batch fields entity_masks / entity_spans; 0 = off.
  c.objective.entity_align_coeff = 0.0
  c.objective.primary = 'rgb'         # mt_elbo: the modality that is the shared space z_0
  c.objective.num_timesteps = 1000    # mt_elbo: discrete T
  c.objective.w_max = 0.1             # mt_elbo: encoder weight schedule scale
  c.objective.decoder_weight = 1.0    # mt_elbo: weight of the decoder terms
  c.objective.aux_observed_prob = 0.4  # mt_elbo: P(an auxiliary modality is a trunk input)
  c.objective.aux_absent_prob = 0.1   # mt_elbo: P(an auxiliary modality is left out, E_i = 0)
  c.objective.masked_modality = ''    # mt_elbo: auxiliary image modality given random box masks
  c.objective.label_t_max = 0.1       # mt_elbo: class heads trained at t <= label_t_max T

  # ---- optimiser -------------------------------------------------------------
  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-4
  c.optim.warmup_steps = 0
  c.optim.schedule = 'constant'       # 'constant' | 'cosine'
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.0
  c.optim.grad_clip_norm = 1.0
  c.optim.ema_decay = 0.9999
  c.optim.grad_accum_steps = 1

  # ---- parallelism: mesh shape and logical-axis rules ----------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                    # -1 fills the remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.sharding_rules = (
      ('batch', ('data', 'fsdp')),
      ('embed', 'fsdp'),
      ('mlp', 'tensor'),
      ('heads', 'tensor'),
      ('kv', None),
      ('vocab', None),
      ('patch_in', None),
      ('channels', None),
      ('length', None),
      ('freq', None),
      ('layers', None),               # the stacked blocks' leading axis
  )

  # ---- training loop -------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000
  c.train.log_every = 50
  c.train.sample_every = 500
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  # Start from another run's weights and EMA (its workdir, checkpoints/ directory
  # or one step directory; its newest step), with a fresh optimiser and step 0.
  # Only for a new run: a run with checkpoints of its own resumes from them.
  c.train.init_from = ''
  # A regular expression: parameters init_from's checkpoint lacks whose path matches it
  # (e.g. 'prompt_encoder|prompt_proj|cross_attn', layers added to a trained model)
  # keep their initial values; any other difference is an error.
  c.train.init_fresh = ''
  c.train.peak_flops = 0.0            # per-device peak FLOP/s for MFU (0 = not reported)
  # PRNG behind parameter init and every train-time draw: 'threefry2x32' (JAX's
  # default), 'rbg' or 'unsafe_rbg' (RngBitGenerator: faster on TPU and much
  # faster to compile on CPU; its bits may depend on the sharding).
  c.train.rng_impl = 'threefry2x32'

  # ---- sampling and evaluation ---------------------------------------------
  # Read by the training grids, --mode=sample and the evaluation job
  # (diffusion/samplers.py's settings_from_config).
  c.sample = ml_collections.ConfigDict()
  c.sample.method = 'euler'           # 'euler' | 'heun' (ODE) | 'euler_maruyama' (SDE)
  c.sample.num_steps = 50
  c.sample.cfg_scale = 1.0            # classifier-free guidance (1 = none)
  c.sample.guidance_low = 0.0         # guide only where guidance_low <= t <= guidance_high
  c.sample.guidance_high = 1.0
  c.sample.t_cond = 0.005             # a held condition's time (MMGen's --t-blend-start)
  # Prompt guidance (config.prompt): v = v_none + text_scale (v_text - v_none)
  # + entity_scale (v_full - v_text); 1 and 1 = the full prompt, one pass.
  c.sample.text_scale = 1.0
  c.sample.entity_scale = 1.0
  c.sample.num_images = 8
  c.sample.use_ema = True
  # Weights for --mode=sample / evaluate: '' = the workdir's latest Orbax checkpoint; else a
  # `.safetensors` written by `python -m mmgen_jax.models.convert` (e.g. the released MMGen
  # checkpoint converted; its weights are used as converted, use_ema is not read).
  c.sample.checkpoint = ''

  # ---- evaluation job (RGB -> the other image modalities) ---------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.num_examples = 256           # validation images scored (0 = the whole split)

  # ---- generation metrics (generation_eval.py): class -> joint samples -> features ----
  # Sampler and guidance come from config.sample.*; scores land beside the RGB -> X ones.
  c.eval.gen = ml_collections.ConfigDict()
  c.eval.gen.num_samples = 0          # joint samples, classes cycled (0 = off)
  c.eval.gen.batch = 64               # global samples per sampler call (split over the mesh)
  c.eval.gen.shard_size = 256         # samples per resumable feature file (a multiple of batch)
  c.eval.gen.features = 'inception'   # comma list of 'inception' (FID/IS/P/R), 'scenes' (scenes FD)
  c.eval.gen.inception_weights = ''   # FID Inception safetensors or .pth ('' = FID skipped, logged)
  c.eval.gen.reference_stats = ''     # FID statistics .npz (pytorch-fid / ADM); '' = from the split
  c.eval.gen.reference_split = 'train'
  c.eval.gen.reference_num = 0        # real images in the reference (0 = the whole split)
  c.eval.gen.is_splits = 10           # Inception Score splits
  c.eval.gen.pr_k = 3                 # precision/recall neighbourhood size
  c.eval.gen.scenes_features = ''     # scenes feature network dir ('' = <workdir>/scenes_features)
  c.eval.gen.scenes_net = ml_collections.ConfigDict()  # its training (models/scenes_features.py)
  c.eval.gen.scenes_net.widths = (16, 32, 32, 64, 128)  # conv widths; the last = feature dim
  c.eval.gen.scenes_net.num_steps = 400
  c.eval.gen.scenes_net.batch_size = 64
  c.eval.gen.scenes_net.learning_rate = 2e-3
  c.eval.gen.scenes_net.seed = 0

  return c
