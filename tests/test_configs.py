"""Configs load through the real flag parser, and config_validation refuses what cannot run."""

import glob
import os

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

from mmgen_jax import config_validation
from mmgen_jax import main as main_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))
TINY = os.path.join(REPO, 'configs', 'tiny_cpu.py')


def parse(*args: str) -> ml_collections.ConfigDict:
  """--config=... parsed the way main.py parses it (overrides registered from argv)."""
  argv = ['prog', *args]
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', TINY, 'x', flag_values=fv, lock_config=True,
                                           sys_argv=argv)
  fv(argv)
  return holder.value


# The validation cases below start from tiny_cpu with a fixed model, batch and
# objective, so retuning the demo does not change what they check.
FIXED = ('--config.model.patch_size=2', '--config.model.hidden_size=128',
         '--config.data.global_batch_size=16', '--config.objective.joint_prob=0.75',
         '--config.objective.rgb_only_prob=0.5', '--config.objective.prediction=v')


def tiny() -> ml_collections.ConfigDict:
  c = parse(f'--config={TINY}', *FIXED)
  c.objective.cond_task_fixed = ''  # (an empty string does not parse as a flag value)
  return c


def problems(config, **kw) -> list[str]:
  kw.setdefault('num_devices', 8)
  kw.setdefault('num_processes', 1)
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate(config, **kw)
  return e.value.problems


# ---- loading -----------------------------------------------------------------------------


def test_flag_parser_loads_config_and_applies_overrides():
  c = parse(f'--config={TINY}', '--config.model.depth=2', '--config.optim.learning_rate=0.01')
  assert c.model.depth == 2
  assert c.optim.learning_rate == 0.01
  assert c.model.hidden_size == 256  # untouched keys keep the file's values


def test_flag_parser_passes_variant_argument():
  c = parse(f'--config={os.path.join(REPO, "configs", "mt_diffusion.py")}:joint_label')
  assert sorted(c.modalities.keys()) == ['label', 'rgb']


def test_unknown_override_is_refused():
  with pytest.raises((AttributeError, KeyError), match='hidden_size'):
    parse(f'--config={TINY}', '--config.model.hiden_size=3')


def test_unknown_override_message_names_valid_keys():
  schema = tiny()
  message = main_lib.unknown_override(['prog', '--config.model.hiden_size=3'], schema)
  assert "config.model has no key 'hiden_size'" in message
  assert "'hidden_size'" in message and "'num_heads'" in message
  message = main_lib.unknown_override(['prog', '--config.modle.depth=3'], schema)
  assert "config has no key 'modle'" in message and "'model'" in message
  assert main_lib.unknown_override(['prog', '--config.model.depth=3'], schema) is None


def test_typo_inside_a_config_file_is_refused():
  c = tiny()
  with pytest.raises(AttributeError, match='hidden_size'):
    c.model.hiden_size = 3


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_every_config_loads_and_validates(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location('cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for variant in getattr(module, 'VARIANTS', (None,)):
    c = module.get_config(variant)
    assert c.is_locked
    assert config_validation.validate(c, num_devices=8, num_processes=1) == []


def test_mt_diffusion_refuses_unknown_variant():
  with pytest.raises(flags.IllegalFlagValueError, match="unknown variant.*'joint_label'"):
    parse(f'--config={os.path.join(REPO, "configs", "mt_diffusion.py")}:joint')


def test_xl2_config_is_the_released_recipe():
  c = parse(f'--config={os.path.join(REPO, "configs", "imagenet256_xl2.py")}')
  m = c.model
  assert (m.patch_size, m.depth, m.hidden_size, m.num_heads) == (2, 28, 1152, 16)
  assert (m.repa_encoder_depth, m.repa_z_dim, m.repa_projector_dim) == (8, 768, 2048)
  assert (c.codec.name, c.codec.latent_channels, c.data.resolution) == ('sd_vae', 4, 256)
  assert (c.data.num_classes, c.data.global_batch_size, m.class_dropout_prob) == (1000, 256, 0.1)
  assert (c.optim.learning_rate, c.optim.weight_decay, c.optim.grad_clip_norm,
          c.optim.ema_decay) == (1e-4, 0.0, 1.0, 0.9999)
  assert (m.dtype, c.mesh.data, c.mesh.fsdp) == ('bfloat16', 1, -1)
  assert config_validation.patch_input_size(c) == (2, 16, 64)
  # train.py --use-diff-task-weight: tasks 0..3 (rgb, depth, normal, mask) weigh 1, 0.2, 0.1, 0.1.
  weights = {name: spec.loss_weight for name, spec in c.modalities.items()}
  assert weights == {'rgb': 1.0, 'depth': 0.2, 'normal': 0.1, 'segmentation': 0.1}
  assert (c.train.num_steps, c.data.augment.hflip, m.task_embed_init_std) == (600_000, False, 1.0)
  o = c.objective
  assert (o.layout, o.group_size, o.rgb_only_prob, o.joint_prob, o.cond_t_max) == (
      'by_position', 32, 0.5, 0.75, 0.01)
  assert (o.slot_dropout, o.cond_task_fixed) == ('per_batch', '')


def test_scenes32_rgb2x_is_the_fixed_condition_finetune_of_the_joint_run():
  joint = parse(f'--config={os.path.join(REPO, "configs", "scenes32.py")}')
  rgb2x = parse(f'--config={os.path.join(REPO, "configs", "scenes32.py")}:rgb2x')
  o = rgb2x.objective
  assert (o.cond_task_fixed, o.cond_t_max, o.joint_prob, o.rgb_only_prob) == ('rgb', 0.0, 0.0, 0.0)
  assert rgb2x.train.init_from and not joint.train.init_from
  assert rgb2x.model.to_dict() == joint.model.to_dict()  # the joint run's weights fit
  assert rgb2x.modalities.to_dict() == joint.modalities.to_dict()
  with pytest.raises(flags.IllegalFlagValueError, match="unknown variant.*'rgb2x'"):
    parse(f'--config={os.path.join(REPO, "configs", "scenes32.py")}:rgb')


def test_task_embedding_init_std_reaches_the_model():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mmgen_jax.models import build  # pylint: disable=g-import-not-at-top
  c = tiny()
  c.model.update(hidden_size=256, depth=1, num_heads=2, task_embed_init_std=1.0)
  model = build.build_model(c, rngs=nnx.Rngs(0))
  task = np.asarray(model.task_embedder.embedding_table.embedding[...])
  label = np.asarray(model.y_embedder.embedding_table.embedding[...])
  assert abs(task.std() - 1.0) < 0.1 and abs(label.std() - 0.02) < 0.002


# ---- validation errors -------------------------------------------------------------------


def _set(c, key, value):
  *parents, leaf = key.split('.')
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value


@pytest.mark.parametrize('changes, expected', [
    ({'mesh.data': 3}, 'config.mesh (data=3, fsdp=1, tensor=1) has 3 devices but 8 are'),
    ({'mesh.tensor': 3}, 'config.mesh (data=-1, fsdp=1, tensor=3): the fixed axes multiply to 3'),
    ({'mesh.fsdp': 2, 'mesh.data': 2}, 'has 4 devices but 8 are available'),
    ({'data.global_batch_size': 12}, 'global_batch_size=12 is not divisible by the mesh\'s '
     'batch axes data×fsdp = 8×1 = 8'),
    ({'data.global_batch_size': 32, 'optim.grad_accum_steps': 3},
     'global_batch_size=32 is not divisible by config.optim.grad_accum_steps=3'),
    ({'data.global_batch_size': 16, 'optim.grad_accum_steps': 4},
     'global_batch_size=16 / grad_accum_steps 4 = 4 is not divisible'),
    ({'model.num_heads': 3}, 'config.model.hidden_size=128 is not divisible by '
     'config.model.num_heads=3'),
    ({'model.patch_size': 3}, 'config.data.resolution: 32 is not divisible by '
     'config.model.patch_size=3'),
    ({'codec.name': 'sd_vae', 'data.resolution': 36, 'data.builder_config': 'res32'},
     'config.data.resolution=36 must be a multiple of 8'),
    ({'codec.name': 'sd_vae', 'model.patch_size': 8},
     'config.data.resolution: 32 / 8 = 4 (latent) is not divisible by config.model.patch_size=8'),
    ({'codec.name': 'vqgan'}, "config.codec.name='vqgan' is not one of ['identity', 'sd_vae']"),
    ({'objective.name': 'edm'}, "config.objective.name='edm' is not one of"),
    ({'objective.path': 'cosine'}, "config.objective.path='cosine' is not one of "
     "['linear', 'vp_cosine', 'vp_linear']"),
    ({'objective.prediction': 'score'}, "config.objective.prediction='score'"),
    ({'objective.joint_prob': 1.5}, 'config.objective.joint_prob=1.5 must be in [0.0, 1.0]'),
    ({'objective.rgb_only_prob': 0.9}, 'rgb_only_prob=0.9 exceeds joint_prob=0.75'),
    ({'objective.layout': 'quarter'}, "config.objective.layout='quarter' is not one of"),
    ({'objective.slot_dropout': 'uniform'}, "config.objective.slot_dropout='uniform' is not"),
    ({'objective.cond_task_fixed': 'albedo'}, "config.objective.cond_task_fixed='albedo' must "
     "name an image modality; image modalities: ['rgb', 'depth', 'normal', 'segmentation']"),
    ({'objective.group_size': 6}, 'config.objective.group_size=6 does not divide the batch each '
     'loss sees: config.data.global_batch_size=16'),
    ({'objective.group_size': 8, 'optim.grad_accum_steps': 4}, 'global_batch_size=16 / '
     'grad_accum_steps 4 = 4'),
    ({'objective.layout': 'by_position', 'objective.group_size': 2},
     'joint_prob × group size = 0.75 × 2 = 1.5'),
    ({'model.task_embed_init_std': -1.0}, 'config.model.task_embed_init_std=-1.0 must be >= 0'),
    ({'model.class_dropout_prob': -0.1}, 'config.model.class_dropout_prob=-0.1 must be in'),
    ({'optim.ema_decay': 1.1}, 'config.optim.ema_decay=1.1 must be in [0.0, 1.0]'),
    ({'model.repa_encoder_depth': 5}, 'config.model.repa_encoder_depth=5 must be in [0, 4]'),
    ({'model.dtype': 'float8'}, "config.model.dtype='float8' is not one of"),
    ({'optim.schedule': 'linear'}, "config.optim.schedule='linear' is not one of"),
    ({'data.resolution': 64}, "config.data.resolution=64 but builder config 'res32_small' "
     'renders 32×32'),
    ({'data.builder_config': 'res33'}, "unknown builder config 'res33'"),
    ({'objective.name': 'mt_elbo', 'objective.path': 'vp_linear',
      'objective.primary': 'label'}, "config.objective.primary='label' must name an image"),
    ({'train.num_steps': 0}, 'config.train.num_steps=0 must be >= 1'),
])
def test_validation_names_key_value_and_valid_range(changes, expected):
  c = tiny()
  for key, value in changes.items():
    _set(c, key, value)
  found = problems(c)
  assert any(expected in p for p in found), found


def test_batch_must_divide_by_process_count():
  c = tiny()
  c.data.global_batch_size = 24
  found = problems(c, num_devices=8, num_processes=16)
  assert any('global_batch_size=24 is not divisible by the 16 processes' in p for p in found)


def test_bad_modality_list_is_reported():
  c = tiny()
  c.modalities.depth.slot = 7
  found = problems(c)
  assert any('slots must be 0..N-1' in p for p in found), found


def test_all_problems_are_reported_together():
  c = tiny()
  c.model.num_heads = 3
  c.optim.ema_decay = 2.0
  c.objective.path = 'nope'
  message = str(pytest.raises(config_validation.ConfigError, config_validation.validate, c,
                              num_devices=8, num_processes=1).value)
  assert 'the config has 3 problem(s)' in message
  assert 'num_heads=3' in message and 'ema_decay=2.0' in message and "path='nope'" in message


def test_narrow_patch_is_refused_with_the_numbers():
  c = tiny()
  c.model.patch_size, c.model.hidden_size, c.model.num_heads = 4, 128, 4  # 4·4·10 = 160 > 128
  found = problems(c)
  assert any('config.model.hidden_size=128 is below the patch input size patch_size² × input '
             'channels = 4² × 10 = 160' in p and 'allow_narrow_patch' in p for p in found), found


def test_narrow_patch_is_a_warning_when_allowed():
  c = tiny()
  c.model.patch_size = 4
  c.allow_narrow_patch = True
  warnings = config_validation.validate(c, num_devices=8, num_processes=1)
  assert len(warnings) == 1 and '4² × 10 = 160' in warnings[0]


def test_narrow_patch_counts_latent_channels():
  c = tiny()
  c.codec.name, c.data.resolution, c.data.builder_config = 'sd_vae', 64, 'res64'
  c.model.patch_size, c.model.hidden_size, c.model.num_heads = 4, 192, 4  # 4·4·16 = 256 > 192
  found = problems(c)
  assert any('4² × 16 = 256' in p for p in found), found


def test_split_warning_for_uneven_fsdp():
  c = tiny()
  c.mesh.data, c.mesh.fsdp = 1, 8
  c.model.hidden_size, c.model.num_heads = 132, 4  # 132 does not split 8 ways
  warnings = config_validation.validate(c, num_devices=8, num_processes=1)
  assert any('hidden_size=132 does not split over mesh.fsdp=8' in w for w in warnings)


def test_narrow_patch_counts_the_mt_diffusion_trunk_input():
  c = parse(f'--config={os.path.join(REPO, "configs", "mt_diffusion.py")}')
  c.model.patch_size, c.model.hidden_size = 4, 64  # trunk input [z_t, encodings]: 2 × 3
  found = problems(c)
  assert any('4² × 6 = 96' in p for p in found), found


# ---- REPA's DINOv2 encoder and MT-Diffusion's label pass ----------------------------------


def _with_repa(c, coeff=0.5):
  c.objective.repa_coeff = coeff
  c.model.repa_encoder_depth, c.model.repa_z_dim = 2, 768
  c.data.augment.hflip, c.data.augment.crop_min_scale = False, 1.0
  c.data.repa_encoder = 'dinov2'
  return c


def test_dinov2_repa_encoder_without_weights_is_refused_naming_the_key():
  found = problems(_with_repa(tiny()))
  assert len(found) == 1, found
  assert ("config.data.repa_encoder='dinov2' (with config.objective.repa_coeff=0.5) needs "
          'config.data.repa_encoder_weights, which is empty' in found[0])
  assert 'facebook/dinov2-' in found[0] and 'config.model.repa_z_dim=768' in found[0]
  c = _with_repa(tiny())
  c.data.repa_encoder_weights = 'dinov2-base/'  # a path: read (and checked) when built
  assert config_validation.validate(c, num_devices=8, num_processes=1) == []
  # Without the REPA loss the encoder never runs, so it needs no weights.
  assert config_validation.validate(_with_repa(tiny(), coeff=0.0), num_devices=8,
                                    num_processes=1) == []


@pytest.mark.parametrize('value', [0.0, -0.1, 1.5])
def test_mt_elbo_label_t_max_outside_0_1_is_refused_naming_the_key(value):
  c = parse(f'--config={os.path.join(REPO, "configs", "mt_diffusion.py")}')
  c.objective.label_t_max = value
  assert problems(c) == [f'config.objective.label_t_max={value} must be in (0, 1]: '
                         "objective.name='mt_elbo' trains its class heads at t <= label_t_max "
                         '× objective.num_timesteps (1000).']


def test_label_t_max_bounds_and_other_objectives():
  c = parse(f'--config={os.path.join(REPO, "configs", "mt_diffusion.py")}')
  c.objective.label_t_max = 1.0  # every time step: allowed
  assert config_validation.validate(c, num_devices=8, num_processes=1) == []
  c = tiny()  # the decoupled objective has no label pass and does not read it
  c.objective.label_t_max = 0.0
  assert config_validation.validate(c, num_devices=8, num_processes=1) == []
