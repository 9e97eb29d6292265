r"""Multimodal prompts (UNIMO-G style) on the 32×32 scenes: one prompt -> RGB, depth,
normals and segmentation together.

The scenes32 model (configs/scenes32.py: width 256, 6 blocks, patch 4) gains the
prompt path (models/prompt_encoder.py): a 2-block, 128-wide encoder of the
prompt's words and entity images (each resampled to R = 4 tokens), cross-
attention in every DiT block and the pooled prompt in the adaLN conditioning.
Records come from the `mmgen_prompts` build (data/prompts.py: L = 48 tokens,
R = 4 slots per entity image, 32×32 entity images). The prompt replaces the
class label (the model sees the null class; diffusion/decoupled.py).

Variants (`--config=configs/unimo_scenes32.py:<variant>`):

  stage1  (default) text-only prompts, from a trained scenes32 joint run
          (config.train.init_from, default the workdir of configs/scenes32.py's
          command): its weights and EMA; the prompt layers, which that run
          lacks, start as initialised (config.train.init_fresh) and, being
          zero-initialised where they join the trunk, leave the model's outputs
          unchanged at step 0.
  stage2  a mix of text-only and multimodal prompts (entity images with and
          without their attribute words), from stage 1's run, with the entity
          alignment loss (FastComposer's localisation loss) on.
  tiny    a small model trained from scratch on the small prompt build in a
          couple of minutes on a CPU (for trying the flow and for tests).

  python -m mmgen_jax.data.build --dataset=mmgen_prompts --config=res32
  python -m mmgen_jax.main --config=configs/unimo_scenes32.py:stage1 --workdir=/tmp/mmgen/unimo1
  python -m mmgen_jax.main --config=configs/unimo_scenes32.py:stage2 --workdir=/tmp/mmgen/unimo2

Sampling guidance (config.sample.text_scale / entity_scale; 1 and 1 = no
guidance) combines the passes without prompt, with its text only and with the
whole prompt; the entity scale was chosen between 1.5 and 3.0 on the stage-2 model,
the text scale was not tuned.
"""

import importlib.util
import pathlib

import ml_collections

VARIANTS = ('stage1', 'stage2', 'tiny')
# The layers a prompt adds to the scenes model (parameter paths).
PROMPT_LAYERS = 'prompt_encoder|prompt_proj|cross_attn'


def _scenes32() -> ml_collections.ConfigDict:
  """configs/scenes32.py's joint model, so its checkpoints fit stage 1."""
  path = pathlib.Path(__file__).with_name('scenes32.py')
  spec = importlib.util.spec_from_file_location('scenes32_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config('joint')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or 'stage1'
  if variant not in VARIANTS:
    raise ValueError(f'configs/unimo_scenes32.py:{variant}: unknown variant; choose one of '
                     f'{list(VARIANTS)}.')
  c = _scenes32()  # locked: a typo below is refused, naming the valid keys

  c.data.name = 'mmgen_prompts'
  c.data.builder_config = 'res32'     # 20,000 train / 1,000 validation scenes with prompts

  c.prompt.name = 'unimo'
  c.prompt.vocab_size = 0             # the data side's vocabulary (prompts.VOCAB)
  c.prompt.width = 128
  c.prompt.depth = 2
  c.prompt.heads = 4
  c.prompt.max_tokens = 48            # the mmgen_prompts records' L, R, S
  c.prompt.entity_tokens = 4
  c.prompt.max_entities = 4
  c.prompt.entity_size = 32
  c.prompt.entity_widths = (32, 64)   # 32 px -> 8×8 = 64 feature tokens per entity image
  c.prompt.text_dropout_prob = 0.1
  c.prompt.entity_dropout_prob = 0.1

  c.sample.text_scale = 3.0
  # Stage 2, validation prompts 0-127: entity accuracy 0.215 at 1.5, 0.319 at 3.0; checked
  # on prompts 128-255 at 3.0: 0.293 (README, "Multimodal prompts").
  c.sample.entity_scale = 3.0
  c.eval.gen.num_samples = 0          # class -> joint FD does not apply to a prompt model

  if variant == 'stage1':
    _stage1(c)
  elif variant == 'stage2':
    _stage2(c)
  else:
    _tiny(c)
  return c


def _stage1(c: ml_collections.ConfigDict) -> None:
  """Text-only prompts on top of the trained scenes model."""
  c.train.init_from = '/tmp/mmgen/scenes32'  # the joint run of configs/scenes32.py
  c.train.init_fresh = PROMPT_LAYERS
  c.prompt.kind_probs = (1.0, 0.0, 0.0)
  c.prompt.entity_dropout_prob = 0.0  # no entity images to drop
  c.optim.learning_rate = 2e-4        # the prompt layers start from scratch
  c.optim.schedule = 'constant'
  c.optim.warmup_steps = 100
  c.train.num_steps = 1000            # 2.5 s/step on 2 quiet CPU cores: 42 min
  c.train.checkpoint_every = 250      # a stopped run resumes with the same command
  c.train.sample_every = 500


def _stage2(c: ml_collections.ConfigDict) -> None:
  """Text-only prompts and prompts with entity images (with and without their words)."""
  c.train.init_from = '/tmp/mmgen/unimo1'  # stage 1's run: every parameter is there
  c.prompt.kind_probs = (0.3, 0.4, 0.3)
  c.objective.entity_align_coeff = 0.01  # FastComposer's scale (0.001) × 10 for a small model
  c.optim.learning_rate = 1e-4
  c.optim.schedule = 'constant'
  c.optim.warmup_steps = 0
  c.train.num_steps = 1500
  c.train.checkpoint_every = 250
  c.train.sample_every = 500


def _tiny(c: ml_collections.ConfigDict) -> None:
  """A from-scratch toy: a couple of minutes on 2 CPU cores."""
  c.data.builder_config = 'res32_small'  # 2,000 train / 200 validation scenes
  c.data.global_batch_size = 16
  c.model.hidden_size = 192           # above the 4·4·10 = 160 values of a patch
  c.model.depth = 2
  c.model.num_heads = 4
  c.prompt.width = 64
  c.prompt.depth = 1
  c.prompt.entity_widths = (16, 32)
  c.prompt.kind_probs = (0.5, 0.25, 0.25)
  c.objective.prediction = 'x0'        # as configs/tiny_cpu.py: learns within minutes
  c.objective.joint_prob = 0.5
  c.objective.cond_task_fixed = 'rgb'
  c.objective.rgb_only_prob = 0.0
  c.objective.entity_align_coeff = 0.01
  c.optim.learning_rate = 5e-4
  c.optim.warmup_steps = 20
  c.optim.schedule = 'cosine'
  c.optim.ema_decay = 0.99
  c.train.num_steps = 150
  c.train.log_every = 10
  c.train.sample_every = 150
  c.train.checkpoint_every = 150
  c.train.keep_checkpoints = 1
  c.sample.num_steps = 20
  c.eval.num_examples = 64
