"""The multi-modal DiT: initialisation, gradients, dtypes, time layouts, layouts, remat,
sharding, cost."""

from flax import nnx
from flax import traverse_util
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest

from mmgen_jax import config_schema
from mmgen_jax import config_validation
from mmgen_jax.models import build, convert, dit

# rgb 3 + depth 1 + normal 3 + segmentation 3, one time slot and one head each.
SLOTS = (3, 1, 3, 3)
SMALL = dict(input_size=8, patch_size=2, in_channels=10, image_heads=SLOTS, time_slots=SLOTS,
             class_heads=(4,), hidden_size=32, depth=2, num_heads=2, num_classes=4,
             class_dropout_prob=0.1, num_tasks=4, repa_encoder_depth=1, repa_z_dims=(8,),
             repa_projector_dim=16, qk_norm=True)
LAYOUTS = pytest.mark.parametrize('scan_layers', [True, False], ids=['scanned', 'per_block'])
TINY_CPU = dict(input_size=32, patch_size=2, in_channels=10, image_heads=SLOTS,
                time_slots=SLOTS, hidden_size=128, depth=4, num_heads=4, num_classes=4,
                class_dropout_prob=0.1, num_tasks=4)


def _abstract(kwargs):
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: dit.MMDiT(**kwargs, rngs=nnx.Rngs(0)))


def make(**overrides):
  """The SMALL model with overrides, initialised as in training (one compiled program)."""
  kwargs = {**SMALL, **overrides}
  with nnx.use_eager_sharding(False):
    return nnx.jit(lambda: dit.MMDiT(**kwargs, rngs=nnx.Rngs(0)))()


def random_model(**overrides):
  """The SMALL model with every parameter random, so zero-initialised layers carry signal."""
  model = _abstract({**SMALL, **overrides})
  perturb(model)
  return model


def inputs(kw=SMALL, n=2, seed=0):
  rng = np.random.default_rng(seed)
  s = kw['input_size']
  x = jnp.asarray(rng.normal(size=(n, s, s, kw['in_channels'])), jnp.float32)
  t = jnp.asarray(rng.uniform(size=(n, len(kw['time_slots']))), jnp.float32)
  y = jnp.arange(n, dtype=jnp.int32) % (kw['num_classes'] + 1)  # includes the null class
  task = jnp.arange(n, dtype=jnp.int32) % (kw['num_tasks'] + 1)
  return x, t, y, task


@nnx.jit
def forward(model, x, t, y, task):
  return model(x, t, y, task)


def perturb(model, scale=0.2, seed=1):
  """Replaces every parameter (concrete or abstract) by N(0, scale²) values."""
  rng = np.random.default_rng(seed)
  nnx.update(model, jax.tree.map(
      lambda p: jnp.asarray(scale * rng.normal(size=p.shape), p.dtype),
      nnx.state(model, nnx.Param)))


def test_zero_init_outputs_zeros():
  model = make()
  out = forward(model, *inputs())
  assert [o.shape for o in out.images] == [(2, 8, 8, c) for c in SLOTS]
  assert [o.shape for o in out.logits] == [(2, 4)]
  assert [z.shape for z in out.zs] == [(2, 16, 8)]
  for o in out.images + out.logits:
    assert o.dtype == jnp.float32
    np.testing.assert_array_equal(o, 0.0)
  assert float(jnp.abs(out.zs[0]).max()) > 0  # REPA projector is not zero-initialised


def per_block(state):
  """{path: array} of a Param state, the trunk per block (`blocks`, i, ...) in either layout."""
  tree = convert.to_layout(nnx.to_pure_dict(state), scan_layers=False)
  return traverse_util.flatten_dict(tree)


@LAYOUTS
def test_gradients_reach_every_parameter_and_head(scan_layers):
  model = random_model(scan_layers=scan_layers)
  x, t, y, task = inputs(n=5)  # covers every class and task row

  def loss(m, head_weights):
    out = m(x, t, y, task)
    terms = [jnp.mean(o ** 2) for o in out.images + out.logits + out.zs]
    return sum(w * l for w, l in zip(head_weights, terms, strict=True))

  grad_fn = nnx.jit(nnx.grad(loss))
  num_outputs = len(SLOTS) + 1 + 1
  grads = grad_fn(model, jnp.ones(num_outputs))
  # k_norm's bias adds q·b to every logit of a row, which softmax ignores: no gradient.
  no_grad = lambda path: path[-2:] == ('k_norm', 'bias')
  for path, g in per_block(grads).items():
    if no_grad(path):
      continue
    assert float(jnp.abs(g).max()) > 0, f'no gradient reaches {path}'
  # Each output alone reaches its own head and the trunk below it (REPA reads block 0).
  heads = [('final_layers', m) for m in range(len(SLOTS))] + [('class_heads', 0),
                                                               ('projectors', 0)]
  for i, head in enumerate(heads):
    for path, v in per_block(grad_fn(model, jnp.eye(num_outputs)[i])).items():
      norm = float(jnp.abs(v).max())
      trunk = path[0] == 'x_embedder' or path[:2] == ('blocks', 0) or (
          path[0] == 'blocks' and head[0] != 'projectors')
      if no_grad(path):
        continue
      if path[:2] == head or trunk:
        assert norm > 0, f'output {head} gives no gradient to {path}'
      elif path[0] in ('final_layers', 'class_heads', 'projectors', 'blocks'):
        assert norm == 0, f'output {head} leaks gradient into {path}'


def test_bf16_compute_is_finite_and_close_to_f32():
  f32, bf16 = random_model(), random_model(dtype=jnp.bfloat16)  # same parameters
  args = inputs()
  ref, out = forward(f32, *args), forward(bf16, *args)
  for r, o in zip(ref.images + ref.logits + ref.zs, out.images + out.logits + out.zs,
                  strict=True):
    assert o.dtype == jnp.float32 and bool(jnp.isfinite(o).all())
    assert float(jnp.abs(o - r).max()) <= 0.05 * float(jnp.abs(r).max())
  params = jax.tree.leaves(nnx.state(bf16, nnx.Param))
  assert {p.dtype for p in params} == {jnp.dtype(jnp.float32)}  # params stay f32


@nnx.jit
def slot_embeddings(model, t):
  return model.t_embedder.slot_embeddings(t), model.t_embedder.per_time(t)


def test_time_per_slot_equals_time_per_channel():
  model = random_model()
  x, t, y, task = inputs()
  per_channel = jnp.repeat(t, np.array(SLOTS), axis=1, total_repeat_length=sum(SLOTS))
  a, b = forward(model, x, t, y, task), forward(model, x, per_channel, y, task)
  for i, j in zip(a.images, b.images, strict=True):  # equal up to rounding of the channel means
    assert float(jnp.abs(i - j).max()) <= 1e-5 * float(jnp.abs(j).max())
  # (N,) = the same time in every slot.
  np.testing.assert_array_equal(slot_embeddings(model, t[:, 0])[0],
                                slot_embeddings(model, jnp.repeat(t[:, :1], len(SLOTS), 1))[0])
  # Per-channel times are embedded, then averaged within each slot (not averaged first).
  varied = jnp.asarray(np.random.default_rng(3).uniform(size=(2, sum(SLOTS))), jnp.float32)
  got, emb = slot_embeddings(model, varied)
  want = jnp.concatenate([emb[:, :3].mean(1), emb[:, 3], emb[:, 4:7].mean(1),
                          emb[:, 7:].mean(1)], axis=-1)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r'\(N, 4\) one time per slot'):
    forward(model, x, t[:, :3], y, task)


def test_single_time_slot_model():
  model = random_model(in_channels=3, image_heads=(3, 1), time_slots=(3,), num_tasks=0)
  x, t, y = jnp.ones((2, 8, 8, 3)), jnp.array([0.1, 0.9]), jnp.array([0, 4])
  out = forward(model, x, t, y, None)
  assert [o.shape for o in out.images] == [(2, 8, 8, 3), (2, 8, 8, 1)]
  t_mlp = model.t_embedder  # DiT's 256 -> D -> D, no fusing MLP
  assert (t_mlp.fc1.kernel.shape, t_mlp.fc2.kernel.shape) == ((256, 32), (32, 32))
  assert not hasattr(model.t_embedder, 'fuse_fc1')
  with pytest.raises(ValueError, match='no task embedding'):
    forward(model, x, t, y, jnp.array([0, 1]))


@LAYOUTS
def test_every_param_has_logical_axes_from_the_rules(scan_layers):
  config = config_schema.base_config()
  rules = dict(config.sharding_rules)
  model = _abstract({**SMALL, 'scan_layers': scan_layers})
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = var.get_metadata().get('out_sharding')
    shape = var.get_value().shape
    assert names is not None and len(names) == len(shape), f'{path}: {names} for {shape}'
    assert all(n is None or n in rules for n in names), f'{path}: {names} not in {sorted(rules)}'
    mesh_axes = [a for n in names if n is not None for a in np.atleast_1d(rules[n]) if a]
    assert len(mesh_axes) == len(set(mesh_axes)), f'{path}: {names} reuses a mesh axis'
  if scan_layers:  # one stacked parameter per block parameter, its leading axis unsharded
    qkv = model.blocks.attn.qkv_kernel
    assert qkv.get_metadata()['out_sharding'] == ('layers', 'embed', None, 'heads', 'kv')
    assert qkv.get_value().shape == (2, 32, 3, 2, 16) and rules['layers'] is None
  else:
    qkv = model.blocks[0].attn.qkv_kernel
    assert qkv.get_metadata()['out_sharding'] == ('embed', None, 'heads', 'kv')


@LAYOUTS
def test_sharded_build_and_forward_match_unsharded(scan_layers):
  config = config_schema.base_config()
  config.data.resolution = 8
  config.model.hidden_size, config.model.depth, config.model.num_heads = 32, 2, 2
  config.model.scan_layers = scan_layers
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'), axis_types=(AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):
    sharded = nnx.jit(lambda: build.build_model(config, rngs=nnx.Rngs(0)))()
  plain = nnx.eval_shape(lambda: build.build_model(config, rngs=nnx.Rngs(0)))
  def spec(var):  # jit drops trailing Nones from specs
    value = var.get_value()
    return tuple(value.sharding.spec) + (None,) * (value.ndim - len(value.sharding.spec))
  block, layer = (sharded.blocks, (None,)) if scan_layers else (sharded.blocks[0], ())
  assert spec(block.attn.qkv_kernel) == (*layer, 'fsdp', None, 'tensor', None)
  assert spec(block.mlp.fc2.kernel) == (*layer, 'tensor', 'fsdp')
  perturb(plain)
  values = dict(nnx.to_flat_state(nnx.state(plain, nnx.Param)))
  nnx.update(sharded, nnx.from_flat_state([
      (path, var.replace(jax.device_put(values[path].get_value(), var.get_value().sharding)))
      for path, var in nnx.to_flat_state(nnx.state(sharded, nnx.Param))]))
  kw = build.model_kwargs(config)
  x, t, y, task = inputs(kw, n=8)
  with jax.set_mesh(mesh):
    x = jax.device_put(x, NamedSharding(mesh, P(('data', 'fsdp'))))
    out = forward(sharded, x, t, y, task).images
  ref = forward(plain, x, t, y, task).images
  for o, r in zip(out, ref, strict=True):
    np.testing.assert_allclose(o, r, rtol=1e-4, atol=1e-5)


def test_model_kwargs_follow_the_config():
  c = config_schema.base_config()
  kw = build.model_kwargs(c)
  assert (kw['in_channels'], kw['image_heads'], kw['time_slots'], kw['num_tasks']) == (
      10, SLOTS, SLOTS, 4)
  assert kw['input_size'] == c.data.resolution and kw['class_heads'] == ()

  c.codec.name = 'sd_vae'
  c.data.resolution = 256
  kw = build.model_kwargs(c)
  assert (kw['input_size'], kw['in_channels'], kw['image_heads']) == (32, 16, (4,) * 4)

  # MT-Diffusion: the trunk sees [z_t, observed encodings] of the primary (rgb) and
  # decodes the primary's noise plus every other modality, labels by a class head.
  c = config_schema.base_config()
  c.modalities = config_schema.scenes_modalities(with_label_modality=True)
  c.objective.name = 'mt_elbo'
  kw = build.model_kwargs(c)
  assert (kw['in_channels'], kw['image_heads'], kw['time_slots'], kw['class_heads'],
          kw['num_tasks']) == (6, (3, 1, 3, 3), (6,), (4,), 3 ** 4 - 1)  # a state per auxiliary

  c = config_schema.base_config()
  c.modalities = config_schema.scenes_modalities(with_label_modality=True)
  c.objective.name = 'mt_elbo'
  c.objective.primary = 'normal'
  kw = build.model_kwargs(c)
  # primary first, then the other image modalities in slot order; labels get a classifier.
  assert (kw['in_channels'], kw['image_heads'], kw['time_slots']) == (6, (3, 3, 1, 3), (6,))
  assert (kw['class_heads'], kw['num_tasks']) == ((4,), 3 ** 4 - 1)
  model = nnx.eval_shape(lambda: build.build_model(c, rngs=nnx.Rngs(0)))
  assert isinstance(model, dit.MMDiT) and len(model.class_heads) == 1

  c.objective.name = 'ddpm'
  with pytest.raises(ValueError, match="objective.name='ddpm'"):
    build.model_kwargs(c)


# ---- layouts and remat ---------------------------------------------------------


@pytest.mark.parametrize('repa_encoder_depth', [2, 3], ids=['repa_mid', 'repa_last'])
def test_scanned_and_per_block_models_agree(repa_encoder_depth):
  """The same parameters in both layouts give the same outputs and intermediates."""
  kw = dict(depth=3, repa_encoder_depth=repa_encoder_depth)
  flat = random_model(scan_layers=False, **kw)
  stacked = _abstract({**SMALL, **kw, 'scan_layers': True})
  values = convert.to_layout(nnx.to_pure_dict(nnx.state(flat, nnx.Param)), scan_layers=True)
  state = nnx.state(stacked, nnx.Param)
  nnx.replace_by_pure_dict(state, values)
  nnx.update(stacked, state)
  assert stacked.blocks.mlp.fc1.kernel.get_value().shape == (3, 32, 128)

  run = nnx.jit(lambda m, *a: m(*a, return_intermediates=True))
  ref, out = run(flat, *inputs()), run(stacked, *inputs())
  assert sorted(out.intermediates) == sorted(ref.intermediates)
  assert {'blocks.0', 'blocks.1', 'blocks.2', 'zs.0'} <= set(out.intermediates)
  pairs = [*zip(ref.images + ref.logits + ref.zs, out.images + out.logits + out.zs, strict=True),
           *((ref.intermediates[k], out.intermediates[k]) for k in ref.intermediates)]
  for r, o in pairs:  # the same math; XLA may fuse the loop body differently
    np.testing.assert_allclose(o, r, rtol=0, atol=1e-6 * float(jnp.abs(r).max()))


def _remat_policies(model, loss):
  """Policy of every rematerialised region of the forward pass, scan bodies included."""
  graphdef, state = nnx.split(model)
  found = []
  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if {'policy', 'prevent_cse'} <= set(eqn.params):  # jax.checkpoint's primitive
        found.append(eqn.params['policy'])
      for v in eqn.params.values():
        if isinstance(v, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
          walk(getattr(v, 'jaxpr', v))
  walk(jax.make_jaxpr(lambda s: loss(nnx.merge(graphdef, s)))(state).jaxpr)
  return found


@pytest.mark.slow
@LAYOUTS
def test_remat_policies_give_the_same_gradients(scan_layers):
  args = inputs()
  def loss(m):
    out = m(*args)
    return sum(jnp.mean(o ** 2) for o in out.images + out.zs)

  grads = {}
  policies = {'none': None, 'full': jax.checkpoint_policies.nothing_saveable,
              'save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
  assert list(dit.REMAT_POLICIES) == list(policies)
  for name, policy in policies.items():
    model = random_model(scan_layers=scan_layers, remat_policy=name)
    # Each block (per block: SMALL's 2; stacked: one loop body per REPA segment) is
    # rematerialised with the policy asked for, or not at all.
    assert _remat_policies(model, loss) == ([] if policy is None else [policy] * 2)
    grads[name] = jax.tree.leaves(nnx.jit(nnx.grad(loss))(model))
  scale = max(float(jnp.abs(g).max()) for g in grads['none'])
  for name in ('full', 'save_dots'):
    for a, b in zip(grads['none'], grads[name], strict=True):  # same math, fused differently
      assert float(jnp.abs(a - b).max()) <= 1e-5 * scale, name


def test_a_bad_remat_policy_names_the_valid_ones():
  with pytest.raises(ValueError, match=r"remat_policy='some' is not one of \['none', 'full', "
                                       r"'save_dots'\]"):
    _abstract({**SMALL, 'remat_policy': 'some'})
  config = config_schema.base_config()
  config.model.remat_policy = 'some'
  with pytest.raises(config_validation.ConfigError,
                     match=r"config.model.remat_policy='some' is not one of"):
    config_validation.validate(config, num_devices=1, num_processes=1)


# ---- parameter counts and FLOPs ------------------------------------------------


def _train_step_lowered(kwargs, batch):
  """jit(grad of a loss over every output) lowered on abstract inputs: nothing is allocated."""
  # XLA counts a loop's body once: the scanned trunk is unrolled for the count.
  graphdef, params, rest = nnx.split(_abstract({**kwargs, 'scan_unroll': kwargs['depth']}),
                                     nnx.Param, ...)

  def loss(params, rest, x, t, y):
    out = nnx.merge(graphdef, params, rest)(x, t, y)
    return sum(jnp.mean(o ** 2) for o in out.images + out.zs)

  s = kwargs['input_size']
  spec = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt)
  return jax.jit(jax.grad(loss)).lower(
      params, rest, spec((batch, s, s, kwargs['in_channels'])),
      spec((batch, len(kwargs['time_slots']))), spec((batch,), jnp.int32))


def _matmul_estimate(kwargs, batch):
  """6·T·(token-wise weights) + 3·(attention 4·T²·D per block), per batch."""
  model = _abstract(kwargs)
  tokens = (kwargs['input_size'] // kwargs['patch_size']) ** 2
  weights = [model.x_embedder.proj.kernel] + [f.linear.kernel for f in model.final_layers]
  for b in [model.blocks] if model.scan_layers else model.blocks:  # stacked: all at once
    weights += [b.attn.qkv_kernel, b.attn.proj_kernel, b.mlp.fc1.kernel, b.mlp.fc2.kernel]
  for p in model.projectors:
    weights += [p.fc1.kernel, p.fc2.kernel, p.fc3.kernel]
  per_token = sum(int(np.prod(w.get_value().shape)) for w in weights)
  attention = 4 * tokens ** 2 * kwargs['hidden_size'] * kwargs['depth']
  return batch * (6 * tokens * per_token + 3 * attention)


def _flops(cost):
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def test_tiny_cpu_train_step_flops():
  batch = 32
  flops = _flops(_train_step_lowered(TINY_CPU, batch).compile().cost_analysis())
  params = dit.count_params(_abstract(TINY_CPU))
  print(f'\ntiny CPU model: {params:,} params; forward+backward, batch {batch}: '
        f'{flops / 1e9:.2f} GFLOP ({flops / batch / 1e9:.3f} GFLOP/sample)')
  assert params == 1_421_672
  assert 0.8 < flops / _matmul_estimate(TINY_CPU, batch) < 1.3


@pytest.mark.slow
def test_xl2_train_step_flops():
  """XL/2, abstractly. HLO cost before compilation: compiling takes minutes on CPU."""
  kwargs = build.model_config_for_mmgen_xl2()
  flops = _flops(_train_step_lowered(kwargs, 1).cost_analysis())
  print(f'\nSiT-XL/2 (MMGen): {dit.count_params(_abstract(kwargs)):,} params; '
        f'forward+backward: {flops / 1e9:.1f} GFLOP/sample')
  assert 0.8 < flops / _matmul_estimate(kwargs, 1) < 1.3
