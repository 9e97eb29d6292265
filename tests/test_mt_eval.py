"""Generation metrics of an MT-Diffusion model's joint samples (scenes FD, label agreement)."""

import json

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmgen_jax import config_schema
from mmgen_jax import generation_eval as ge
from mmgen_jax import metrics
from mmgen_jax import modalities
from mmgen_jax import mt_eval
from mmgen_jax import parallel
from mmgen_jax.diffusion import mt_elbo
from mmgen_jax.models import mt_encoders
from mmgen_jax.models import scenes_features
from tests.conftest import SCENES_TEST_BUILD
from tests.generation_eval_process import gen_config
from tests.test_mt_elbo import Out


class PixelTrunk(nnx.Module):
  """Per-pixel MLP with the MMDiT call signature and random (non-zero) heads."""

  def __init__(self, spec, num_classes, *, rngs, hidden=8):
    self.body = nnx.Linear(spec['in_channels'] + 1, hidden, rngs=rngs)
    self.task = nnx.Embed(spec['num_tasks'] + 1, hidden, rngs=rngs)
    self.image_heads = nnx.List([nnx.Linear(hidden, c, rngs=rngs) for c in spec['image_heads']])
    self.class_heads = nnx.List([nnx.Linear(hidden, k, rngs=rngs) for k in spec['class_heads']])

  def __call__(self, x, t, y, task=None):
    t_map = jnp.broadcast_to(t[:, None, None, :1], (*x.shape[:3], 1))
    h = nnx.silu(self.body(jnp.concatenate([x, t_map], -1)) + self.task(task)[:, None, None])
    return Out(images=tuple(head(h) for head in self.image_heads),
               logits=tuple(head(200.0 * (h - h.mean((0, 1, 2))).mean(axis=(1, 2))) for head in self.class_heads))


@pytest.fixture(scope='module')
def setup(scenes_data_dir):
  config = gen_config(scenes_data_dir, SCENES_TEST_BUILD, features='scenes')
  config.modalities = config_schema.scenes_modalities(with_label_modality=True)
  config.objective.update(dict(name='mt_elbo', primary='rgb', path='vp_linear',
                               prediction='eps', num_timesteps=50))
  mods = modalities.from_config(config.modalities)
  rngs = nnx.Rngs(0)
  model = mt_encoders.MTDiffusion(PixelTrunk(mt_encoders.trunk_spec(mods, 'rgb'), 4, rngs=rngs),
                                  mods=mods, primary='rgb', spatial=(32, 32), rngs=rngs)
  mesh = parallel.make_mesh(dict(data=-1, fsdp=1, tensor=1), jax.devices()[:4])
  scenes = scenes_features.build(scenes_features.net_config(config), seed=0)
  extractor = ge.make_extractor(config, '', mesh, scenes_model=scenes)
  return config, model, mesh, extractor


def test_joint_samples_are_scored_with_the_scenes_fd(setup, tmp_path, monkeypatch):
  config, model, mesh, extractor = setup
  got = mt_eval.evaluate_generation_mt(config, str(tmp_path), model, 3, mesh,
                                       extractor=extractor)
  names = ('rgb', 'depth', 'normal', 'segmentation')
  assert got['eval/mt/gen/num_samples'] == 16
  assert not any('class_acc' in k for k in got)  # no class was requested
  # The scores of the joint samples drawn directly: batch b from (seed, b) alone.
  key = jax.random.fold_in(jax.random.key(int(config.seed), impl=config.train.rng_impl), 5)
  mods = modalities.from_config(config.modalities)
  feats, labels = {}, []
  for b in range(2):
    out = mt_elbo.sample(model, jax.random.fold_in(key, b), mods=mods, cfg=config.objective,
                         num=8, num_classes=4, num_steps=int(config.sample.num_steps))
    for k, v in extractor.fn({n: out[n] for n in names}).items():
      feats.setdefault(k, []).append(np.asarray(v))
    labels.append(np.asarray(out['label']))
  feats = {k: np.concatenate(v) for k, v in feats.items()}
  reference = ge.load_reference(config, str(tmp_path), extractor, mesh)
  for name in names:
    fd = metrics.frechet_distance(*metrics.feature_statistics(feats[f'scenes/{name}']),
                                  *reference.stats[f'scenes/{name}'])
    np.testing.assert_allclose(got[f'eval/mt/gen/scenes_fd/{name}'], fd, rtol=1e-3, err_msg=name)
    agree = np.mean(feats[f'{ge.SCENES_CLASS}/{name}'] == np.concatenate(labels))
    assert got[f'eval/mt/gen/label_agreement/{name}'] == agree, name
  assert len(set(np.concatenate(labels).tolist())) > 1  # the labels are the sampled ones

  # `--mode=evaluate` reports them beside the RGB-held scores (the shards are reused).
  from mmgen_jax import evaluate  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(evaluate, 'restore_for_inference', lambda c, w: (model, 3, mesh))
  monkeypatch.setattr(mt_eval, 'evaluate_mt', lambda c, m, mesh: {'eval/mt/num_examples': 8.0})
  monkeypatch.setattr(ge, 'make_extractor', lambda *a, **k: extractor)
  results = evaluate.evaluate(config, str(tmp_path))
  assert results == {'eval/mt/num_examples': 8.0, **got}
  written = json.loads((tmp_path / 'eval' / 'step_000003.json').read_text())
  assert written == {'step': 3, **results}


def test_scenes_fd_of_a_config_without_segmentation(scenes_data_dir, tmp_path):
  # joint_label (RGB and the label): the scenes network cannot learn from this config's
  # modalities (it needs segmentation ids); the one of the scenes' own modalities is used.
  config = gen_config(scenes_data_dir, SCENES_TEST_BUILD, features='scenes')
  config.modalities = ml_collections.ConfigDict(dict(
      rgb=modalities.spec(0, 'rgb', 1.0), label=modalities.spec(1, 'label', 0.1, num_classes=4)))
  config.objective.update(dict(name='mt_elbo', primary='rgb', path='vp_linear',
                               prediction='eps', num_timesteps=50))
  full_config = ml_collections.ConfigDict(config.to_dict())
  full_config.modalities = config_schema.scenes_modalities()
  full = scenes_features.build(scenes_features.net_config(full_config), seed=3)
  net_dir = tmp_path / 'net'
  scenes_features.save(full, str(net_dir), scenes_features.net_config(full_config))
  config.eval.gen.scenes_features = str(net_dir)

  sub = mt_eval.scenes_network(config, str(tmp_path))
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1.0, maxval=1.0)
  np.testing.assert_array_equal(sub({'rgb': x})['rgb'], full({'rgb': x})['rgb'])
  assert sub.names == ('rgb',)

  mods = modalities.from_config(config.modalities)
  rngs = nnx.Rngs(0)
  model = mt_encoders.MTDiffusion(PixelTrunk(mt_encoders.trunk_spec(mods, 'rgb'), 4, rngs=rngs),
                                  mods=mods, primary='rgb', spatial=(32, 32), rngs=rngs)
  mesh = parallel.make_mesh(dict(data=-1, fsdp=1, tensor=1), jax.devices()[:4])
  got = mt_eval.evaluate_generation_mt(config, str(tmp_path / 'work'), model, 3, mesh)
  assert np.isfinite(got['eval/mt/gen/scenes_fd/rgb'])
  assert 0.0 <= got['eval/mt/gen/label_agreement/rgb'] <= 1.0
  assert not (tmp_path / 'work' / 'scenes_features').exists()  # nothing retrained


def test_scenes_network_is_none_with_segmentation(scenes_data_dir):
  config = gen_config(scenes_data_dir, SCENES_TEST_BUILD, features='scenes')
  config.modalities = config_schema.scenes_modalities(with_label_modality=True)
  assert mt_eval.scenes_network(config, '') is None  # make_extractor loads its own
