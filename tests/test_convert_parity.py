"""Parity with the official MMGen SiT (tiny vectors) and the released SiT-XL/2 layout.

Every test that builds a model runs with the trunk stacked (`scan_layers`) and per block.
"""

import os

from flax import nnx
import jax
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mmgen_jax.models import build, convert, dit

TINY = dict(input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=10,
            repa_encoder_depth=1, repa_z_dims=(32,), repa_projector_dim=64)
XL2_TRAINABLE, XL2_POS_EMBED = 694_353_024, 294_912


@pytest.fixture(scope='module')
def vectors(parity_dir):
  return load_file(os.path.join(parity_dir, 'mmgen_sit_tiny.safetensors'))


@pytest.fixture(scope='module')
def state_dict(vectors):
  return {k[len('params/'):]: v for k, v in vectors.items() if k.startswith('params/')}


LAYOUTS = pytest.mark.parametrize('scan_layers', [True, False], ids=['scanned', 'per_block'])


def _tiny_model(abstract=False, scan_layers=True):
  kwargs = build.mmgen_sit_kwargs(**TINY, scan_layers=scan_layers)
  with nnx.use_eager_sharding(False):
    init = lambda: dit.MMDiT(**kwargs, rngs=nnx.Rngs(0))
    return nnx.eval_shape(init) if abstract else nnx.jit(init)()


@nnx.jit
def _forward(model, x, t, y, task):
  return model(x, t, y, task)


@pytest.fixture(scope='module', params=[True, False], ids=['scanned', 'per_block'])
def converted(request, state_dict):
  model = _tiny_model(scan_layers=request.param)
  convert.load_mmgen_state_dict(model, state_dict)
  return model


def _nhwc(a):
  return jnp.asarray(a).transpose(0, 2, 3, 1)


def _assert_close(name, got, ref):
  got = np.asarray(got, np.float32).reshape(ref.shape)
  err, scale = np.abs(got - ref).max(), np.abs(ref).max()
  assert err <= 1e-5 * scale, f'{name}: max|out-ref| = {err:.3g} > 1e-5 * max|ref| = {scale:.3g}'


def test_every_recorded_tensor_matches(converted, vectors):
  n = vectors['inputs/x'].shape[0]
  run = nnx.jit(lambda m, *a: m(*a, return_intermediates=True))
  out = run(converted, _nhwc(vectors['inputs/x']),
            jnp.asarray(vectors['inputs/t']).reshape(n, -1), jnp.asarray(vectors['inputs/y']),
            jnp.asarray(vectors['inputs/task']))
  got = dict(out.intermediates)
  got['pred'] = jnp.concatenate(out.images, axis=-1).transpose(0, 3, 1, 2)  # -> NCHW
  got['t_emb_channelwise'] = converted.t_embedder(
      jnp.asarray(vectors['inputs/t_channelwise']).reshape(n, -1))
  refs = {k[len('outputs/'):]: v for k, v in vectors.items() if k.startswith('outputs/')}
  assert set(refs) == {'x_patch', 'x_tokens', 't_freq', 't_emb_concat', 't_emb', 'y_emb',
                       'task_emb', 'c', 'blocks.0', 'blocks.1', 'zs.0', 'final_layer.0',
                       'final_layer.1', 'final_layer.2', 'final_layer.3', 'pred',
                       't_emb_channelwise'}
  for name, ref in sorted(refs.items()):
    _assert_close(name, got[name], ref)
  _assert_close('zs[0]', out.zs[0], refs['zs.0'])


def test_per_modality_times_and_default_task(converted, vectors):
  x, y = _nhwc(vectors['inputs/x']), jnp.asarray(vectors['inputs/y'])
  pred = vectors['outputs/pred']
  out = _forward(converted, x, jnp.asarray(vectors['inputs/t_per_modality']), y,
                 jnp.asarray(vectors['inputs/task']))
  _assert_close('pred (per-slot t)', jnp.concatenate(out.images, -1).transpose(0, 3, 1, 2), pred)
  # task=None is task 0 for every sample.
  t = jnp.asarray(vectors['inputs/t_per_modality'])
  np.testing.assert_array_equal(_forward(converted, x, t, y, None).images[0],
                                _forward(converted, x, t, y, jnp.zeros_like(y)).images[0])


def test_pos_embed_matches_official_table(converted, vectors):
  np.testing.assert_allclose(converted.pos_embed(), vectors['params/pos_embed'][0], atol=1e-7)


@LAYOUTS
def test_conversion_errors_name_the_key(state_dict, scan_layers):
  model = _tiny_model(abstract=True, scan_layers=scan_layers)
  bad = dict(state_dict)
  bad['blocks.0.mlp.fc1.weight'] = bad['blocks.0.mlp.fc1.weight'][:, :32]
  del bad['taskcond_embedder.embedding_table.weight']
  bad['blocks.9.attn.qkv.weight'] = np.zeros((3, 3), np.float32)
  with pytest.raises(ValueError) as e:
    convert.convert_mmgen_state_dict(bad, model)
  msg = str(e.value)
  target = 'blocks.mlp.fc1.kernel[0]' if scan_layers else 'blocks.0.mlp.fc1.kernel'
  assert f'blocks.0.mlp.fc1.weight: torch shape (256, 32) -> (32, 256), but {target} expects (64, 256)' in msg
  assert "absent from the state dict: ['taskcond_embedder.embedding_table.weight']" in msg
  assert "['blocks.9.attn.qkv.weight']" in msg

  shifted = dict(state_dict, pos_embed=state_dict['pos_embed'][:, ::-1])
  with pytest.raises(ValueError, match='pos_embed differs'):
    convert.convert_mmgen_state_dict(shifted, model)


def test_safetensors_round_trip(tmp_path, converted, state_dict):
  src = tmp_path / 'sit.safetensors'
  save_file({f'params/{k}': v for k, v in state_dict.items()}, str(src))
  loaded = convert.load_torch_state_dict(str(src), prefix='params/')
  assert sorted(loaded) == sorted(state_dict)

  dst = tmp_path / 'nnx.safetensors'
  convert.save_params(str(dst), converted)
  fresh = nnx.clone(converted)
  nnx.update(fresh, jax.tree.map(lambda p: np.zeros(p.shape, p.dtype),
                                 nnx.state(fresh, nnx.Param)))
  convert.load_params(fresh, str(dst))
  want = dict(nnx.to_flat_state(nnx.state(converted, nnx.Param)))
  for path, var in nnx.to_flat_state(nnx.state(fresh, nnx.Param)):
    np.testing.assert_array_equal(var.get_value(), want[path].get_value(), err_msg=str(path))


def _xl2_manifest(parity_dir):
  shapes, total = {}, None
  with open(os.path.join(parity_dir, 'mmgen_sit_xl2_keys.tsv')) as f:
    for line in f:
      key, shape, *_ = line.rstrip('\n').split('\t')
      if key == '# total_params':
        total = int(shape)
      elif not key.startswith('#'):
        shapes[key] = tuple(int(s) for s in shape.split('x'))
  return shapes, total


@LAYOUTS
def test_xl2_manifest_maps_one_to_one(parity_dir, scan_layers):
  shapes, total = _xl2_manifest(parity_dir)
  assert len(shapes) == 315
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: dit.MMDiT(**build.model_config_for_mmgen_xl2(),
                                             scan_layers=scan_layers, rngs=nnx.Rngs(0)))
  rules = convert.plan_conversion(model, shapes)  # raises on any mismatch
  assert sorted(rules) == sorted(set(shapes) - {'pos_embed'})
  targets = [r.target for r in rules.values()]
  assert sorted(targets) == sorted(convert.parameter_targets(model))  # one key per parameter
  assert len(targets) == 314 and len(nnx.to_flat_state(nnx.state(model, nnx.Param))) == (
      314 - 27 * 10 if scan_layers else 314)  # stacked: 10 block parameters of 28 rows each

  trainable = dit.count_params(model)
  pos = int(np.prod(shapes['pos_embed']))
  assert (trainable, pos, trainable + pos) == (XL2_TRAINABLE, XL2_POS_EMBED, total)
  assert trainable == sum(int(np.prod(s)) for k, s in shapes.items() if k != 'pos_embed')


@LAYOUTS
@pytest.mark.parametrize('overrides', [
    dict(qk_norm=True),                                    # timm q_norm / k_norm
    dict(num_modalities=1, repa_encoder_depth=0, repa_z_dims=()),  # plain SiT: `final_layer`
])
def test_rules_cover_every_parameter_of_variants(overrides, scan_layers):
  kwargs = build.mmgen_sit_kwargs(**{**TINY, **overrides}, scan_layers=scan_layers)
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: dit.MMDiT(**kwargs, rngs=nnx.Rngs(0)))
  rules = convert.mmgen_rules(model)
  assert sorted(r.target for r in rules.values()) == sorted(convert.parameter_targets(model))
  if overrides.get('qk_norm'):
    assert rules['blocks.1.attn.k_norm.bias'].target == (
        'blocks.attn.k_norm.bias[1]' if scan_layers else 'blocks.1.attn.k_norm.bias')
  else:
    assert 'final_layer.linear.weight' in rules and 't_embedder.mlp_fused.0.weight' not in rules


def test_cli_converts_a_state_dict_file(tmp_path, state_dict, converted):
  """The CLI builds the model from the released flags; run it with the tiny sizes."""
  src, dst = tmp_path / 'ckpt.safetensors', tmp_path / 'out.safetensors'
  save_file(state_dict, str(src))
  convert.main(['--checkpoint', str(src), '--out', str(dst), '--input_size', '8',
                '--num_classes', '10', '--hidden_size', '64', '--depth', '2', '--num_heads', '4',
                '--repa_encoder_depth', '1', '--repa_z_dim', '32', '--repa_projector_dim', '64'])
  written = load_file(str(dst))
  assert 'blocks.mlp.fc1.kernel' in written and written['blocks.mlp.fc1.kernel'].shape[0] == 2
  # The file is stacked; load_params reads it into either layout.
  fresh = nnx.clone(converted)
  nnx.update(fresh, jax.tree.map(lambda p: np.zeros(p.shape, p.dtype),
                                 nnx.state(fresh, nnx.Param)))
  convert.load_params(fresh, str(dst))
  ref = nnx.to_flat_state(nnx.state(converted, nnx.Param))
  got = dict(nnx.to_flat_state(nnx.state(fresh, nnx.Param)))
  for path, var in ref:
    np.testing.assert_array_equal(got[path].get_value(), var.get_value(), err_msg=str(path))


def test_to_layout_round_trips_a_train_state_of_twelve_blocks():
  """Blocks are stacked in index order (not '10' < '2'), shardings gain and lose the layer axis."""
  mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('fsdp', None))
  blocks = {str(i): {'mlp': {'kernel': np.full((8, 2), i, np.float32)}} for i in range(12)}
  abstract = {i: {'mlp': {'kernel': jax.ShapeDtypeStruct((8, 2), np.float32, sharding=sharding)}}
              for i in range(12)}
  tree = {'params': {'blocks': blocks, 'x_embedder': np.ones(3)},
          'opt': ({'mu': {'trunk': {'blocks': blocks}}}, np.zeros(())),
          'abstract': {'blocks': abstract}}
  stacked = convert.to_layout(tree, scan_layers=True)
  for kernel in (stacked['params']['blocks']['mlp']['kernel'],
                 stacked['opt'][0]['mu']['trunk']['blocks']['mlp']['kernel']):
    assert kernel.shape == (12, 8, 2)
    np.testing.assert_array_equal(kernel[:, 0, 0], np.arange(12))
  kernel = stacked['abstract']['blocks']['mlp']['kernel']
  assert kernel.shape == (12, 8, 2) and kernel.sharding.spec == P(None, 'fsdp', None)
  assert convert.scan_layers_of(stacked) is True and convert.scan_layers_of(tree) is False
  again = convert.to_layout(stacked, scan_layers=True)  # already stacked: as it is
  assert all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(stacked), strict=True))

  back = convert.to_layout(stacked, scan_layers=False)
  assert sorted(back['params']['blocks']) == list(range(12))
  for i in range(12):
    np.testing.assert_array_equal(back['params']['blocks'][i]['mlp']['kernel'],
                                  blocks[str(i)]['mlp']['kernel'])
  assert back['abstract']['blocks'][5]['mlp']['kernel'].sharding.spec == P('fsdp', None)
  np.testing.assert_array_equal(back['params']['x_embedder'], tree['params']['x_embedder'])
