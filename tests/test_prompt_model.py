"""Multimodal prompts on the model side: encoder, cross-attention, dropout, guidance,
entity alignment, configs and a prompt-conditioned train step on a sharded mesh.

Synthetic batches follow the prompt contract (data/prompts.py): L tokens, R '<ent>'
slots per entity image marked k + 1 in `prompt_entity`, uint8 entity images.
"""

from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmgen_jax import config_schema
from mmgen_jax import config_validation
from mmgen_jax import modalities
from mmgen_jax import parallel
from mmgen_jax import train
from mmgen_jax import train_state as ts
from mmgen_jax.data import pipeline
from mmgen_jax.diffusion import decoupled
from mmgen_jax.diffusion import paths
from mmgen_jax.diffusion import samplers
from mmgen_jax.models import build, dit
from mmgen_jax.models import prompt_encoder as prompt_lib

SLOTS = (3, 1, 3, 3)
PROMPT = dict(vocab_size=16, width=16, depth=1, num_heads=2, entity_tokens=2, max_tokens=8,
              max_entities=2, entity_size=8, entity_widths=(8,), resampler_depth=1)
SMALL = dict(input_size=8, patch_size=2, in_channels=10, image_heads=SLOTS, time_slots=SLOTS,
             hidden_size=32, depth=2, num_heads=2, num_classes=4, class_dropout_prob=0.1,
             num_tasks=4)
NULL = SMALL['num_classes']
NEW = ('prompt_encoder', 'prompt_proj', 'cross_attn')  # the parameters a prompt adds


def _abstract(**kwargs):
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: dit.MMDiT(**{**SMALL, **kwargs}, rngs=nnx.Rngs(0)))


def _perturb(model, seed=1, scale=0.2, only=None):
  """Parameters replaced by N(0, scale²) values (those whose path names one of `only`)."""
  rng = np.random.default_rng(seed)
  flat = []
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = var.get_value()
    if only is None or any(str(k) in only for k in path):
      value = jnp.asarray(scale * rng.normal(size=value.shape), value.dtype)
    flat.append((path, var.replace(value)))
  nnx.update(model, nnx.from_flat_state(flat))


def _init(model):
  """A concrete model: abstract values become zeros (then `_perturb` fills them)."""
  nnx.update(model, jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype),
                                 nnx.state(model, nnx.Param)))
  return model


def _prompt(n=2, seed=0, p=PROMPT):
  """Prompts per the contract: words, then entity 0's R slots, a word, entity 1's slots, padding."""
  rng = np.random.default_rng(seed)
  length, r, k = p['max_tokens'], p['entity_tokens'], p['max_entities']
  tokens = rng.integers(3, p['vocab_size'], (n, length)).astype(np.int32)
  entity = np.zeros((n, length), np.int32)
  entity[:, 1:1 + r] = 1
  entity[:, 2 + r:2 + 2 * r] = 2
  tokens[entity > 0] = 2  # '<ent>'
  mask = np.ones((n, length), bool)
  mask[:, 2 + 2 * r:] = False
  mask[0, 2 + 2 * r - 1:] = False  # sample 0 is shorter
  entity[~mask] = 0
  tokens[~mask] = 0
  images = rng.integers(0, 256, (n, k, p['entity_size'], p['entity_size'], 3)).astype(np.uint8)
  return {'prompt_tokens': tokens, 'prompt_mask': mask, 'prompt_entity': entity,
          'entity_images': images}


def _inputs(n=2, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, 8, 8, 10)), jnp.float32)
  t = jnp.asarray(rng.uniform(size=(n, 4)), jnp.float32)
  return x, t, jnp.full((n,), NULL, jnp.int32), jnp.zeros((n,), jnp.int32)


@nnx.jit
def _forward(model, x, t, y, task, prompt):
  return jnp.concatenate(model(x, t, y, task, prompt=prompt).images, -1)


@nnx.jit
def _forward_plain(model, x, t, y, task):
  return jnp.concatenate(model(x, t, y, task).images, -1)


# ---- the model ----------------------------------------------------------------------


def test_prompt_path_starts_as_the_checkpoint_without_it(scan_layers=True):
  """Zero-initialised cross-attention and pooled projection: a prompt-free model's weights in
  a prompt model give exactly its outputs, whatever the prompt; once trained they do not.
  (The scanned trunk; the per-block one calls the same block.)"""
  base = _init(_abstract(scan_layers=scan_layers))
  _perturb(base)
  with nnx.use_eager_sharding(False):  # new parameters as initialised
    model = nnx.jit(lambda: dit.MMDiT(**SMALL, scan_layers=scan_layers, prompt=PROMPT,
                                      rngs=nnx.Rngs(3)))()
  nnx.update(model, nnx.state(base, nnx.Param))  # the checkpoint's weights
  x, t, y, task = _inputs()
  prompt = prompt_lib.from_batch(_prompt())
  ref = _forward_plain(base, x, t, y, task)
  np.testing.assert_array_equal(_forward(model, x, t, y, task, prompt), ref)
  _perturb(model, seed=2, only=('cross_attn',))  # a trained cross-attention reads the prompt
  assert float(jnp.abs(_forward(model, x, t, y, task, prompt) - ref).max()) > 1e-3


def test_prompt_free_model_has_no_prompt_parameters():
  paths_ = [p for p, _ in nnx.to_flat_state(nnx.state(_abstract(), nnx.Param))]
  assert not [p for p in paths_ if any(str(k) in NEW for k in p)]
  with pytest.raises(ValueError, match='without a prompt encoder'):
    _init(_abstract())(*_inputs(), prompt=prompt_lib.from_batch(_prompt()))


@pytest.fixture(scope='module')
def random_prompt_model():
  model = _init(_abstract(prompt=PROMPT))
  _perturb(model)
  return model


def test_padded_tokens_and_dropped_parts_change_nothing(random_prompt_model):
  model = random_prompt_model
  x, t, y, task = _inputs()
  batch = _prompt()
  ref = _forward(model, x, t, y, task, prompt_lib.from_batch(batch))

  def changed(**edits):
    b = {k: v.copy() for k, v in batch.items()}
    for key, (where, value) in edits.items():
      b[key][where] = value
    return _forward(model, x, t, y, task, prompt_lib.from_batch(b))

  pad = ~batch['prompt_mask']
  np.testing.assert_allclose(changed(prompt_tokens=(pad, 7)), ref, rtol=0, atol=1e-6)
  real = np.zeros_like(pad)
  real[:, 0] = True
  assert float(jnp.abs(changed(prompt_tokens=(real, 7)) - ref).max()) > 1e-4
  assert float(jnp.abs(changed(entity_images=(np.s_[:, 1], 0)) - ref).max()) > 1e-4

  # Dropped entities: their slots are masked, so their images are not read.
  n = x.shape[0]
  drop = lambda p, text, ent: prompt_lib.drop_condition(p, jnp.full((n,), text),
                                                        jnp.full((n,), ent))
  b2 = {**batch, 'entity_images': np.zeros_like(batch['entity_images'])}
  text_only = [_forward(model, x, t, y, task, drop(prompt_lib.from_batch(b), False, True))
               for b in (batch, b2)]
  np.testing.assert_allclose(text_only[0], text_only[1], rtol=0, atol=1e-6)
  # Everything dropped is the empty prompt, which is what prompt=None means.
  empty = _forward(model, x, t, y, task, drop(prompt_lib.from_batch(batch), True, True))
  np.testing.assert_allclose(empty, _forward_plain(model, x, t, y, task), rtol=0, atol=1e-5)


def test_entity_slots_take_the_resampled_image_tokens():
  entity = jnp.asarray([[0, 1, 1, 0, 2, 2, 0, 0]])
  np.testing.assert_array_equal(prompt_lib._entity_slot_index(entity, 2, 2),
                                [[0, 0, 1, 0, 2, 3, 0, 0]])  # k·R + r on slots
  bad = {**_prompt(), 'prompt_entity': np.tile(np.asarray([0, 1, 1, 1, 0, 0, 0, 0]), (2, 1))}
  with pytest.raises(ValueError, match='expected 2 consecutive slots'):
    prompt_lib.check_prompt_arrays(bad, **{k: PROMPT[k] for k in (
        'max_tokens', 'entity_tokens', 'max_entities', 'entity_size', 'vocab_size')})


# ---- condition dropout and guidance ------------------------------------------------------


def test_condition_dropout_rates_are_separate_and_independent():
  n = 20_000
  batch = _prompt(n=n)
  prompt = prompt_lib.from_batch({k: jnp.asarray(v) for k, v in batch.items()})
  dropped, drop_text, drop_ent = jax.jit(lambda k, p: decoupled.drop_prompt(k, p, 0.3, 0.1))(
      jax.random.key(0), prompt)
  drop_text, drop_ent = np.asarray(drop_text), np.asarray(drop_ent)
  assert abs(drop_text.mean() - 0.3) < 0.015 and abs(drop_ent.mean() - 0.1) < 0.01
  assert abs((drop_text & drop_ent).mean() - 0.03) < 0.006  # independent draws
  mask, slot = np.asarray(dropped.mask), batch['prompt_entity'] > 0
  words = batch['prompt_mask'] & ~slot
  np.testing.assert_array_equal(mask & words, words & ~drop_text[:, None])
  np.testing.assert_array_equal(mask & slot, slot & ~drop_ent[:, None])
  assert not np.any(mask & ~batch['prompt_mask'])  # padding stays out


@pytest.mark.parametrize('text_scale, entity_scale', [(1, 1), (0, 0), (3, 0), (0, 2), (2.5, 4)])
def test_guidance_combination_isolates_each_term(text_scale, entity_scale):
  none, text_gain, entity_gain = 1.0, 10.0, 100.0  # v_text = none + 10, v_full = v_text + 100
  v = prompt_lib.combine_guidance(jnp.asarray(none), jnp.asarray(none + text_gain),
                                  jnp.asarray(none + text_gain + entity_gain), text_scale,
                                  entity_scale)
  assert float(v) == pytest.approx(none + text_scale * text_gain + entity_scale * entity_gain)


class Out(NamedTuple):
  images: tuple
  logits: tuple = ()
  zs: tuple = ()


class CountsTokens(nnx.Module):
  """v = (#unmasked words) + 10 × (#unmasked entity slots); records the labels it saw."""

  def __call__(self, x, t, y, task=None, *, prompt=None):
    words = (prompt.mask & (prompt.entity == 0)).sum(-1)
    slots = (prompt.mask & (prompt.entity > 0)).sum(-1)
    v = (words + 10.0 * slots + 1000.0 * (y != NULL))[:, None, None, None] + 0 * x
    return Out(images=paths.split_slots(v, list(SLOTS)))


@pytest.mark.parametrize('scales', [(1.0, 1.0), (2.0, 0.5), (0.0, 3.0)])
def test_sampler_runs_the_three_passes_and_combines_them(scales):
  batch = _prompt()
  prompt = prompt_lib.from_batch({k: jnp.asarray(v) for k, v in batch.items()})
  words = (batch['prompt_mask'] & (batch['prompt_entity'] == 0)).sum(-1)
  slots = (batch['prompt_entity'] > 0).sum(-1)
  noise = samplers.Noise(jnp.zeros((2, 2, 2, 10)))
  mods = modalities.from_config(config_schema.scenes_modalities())
  out = samplers.sample(CountsTokens(), None, mods=mods, shape=(2, 2, 2), y=None,
                        num_classes=NULL, num_steps=1, noise=noise, prompt=prompt,
                        text_scale=scales[0], entity_scale=scales[1])
  # One Euler step from t = 1 to 0: x = -v. none = 0, text = words, full = words + 10 slots.
  want = scales[0] * words + scales[1] * 10.0 * slots
  np.testing.assert_allclose(np.asarray(out['rgb'])[:, 0, 0, 0], -want, rtol=1e-6)
  with pytest.raises(ValueError, match='pass y=None with a prompt'):
    samplers.sample(CountsTokens(), None, mods=mods, shape=(2, 2, 2), y=jnp.zeros(2, jnp.int32),
                    num_classes=NULL, num_steps=1, noise=noise, prompt=prompt)


# ---- entity alignment ---------------------------------------------------------------------


def test_alignment_loss_hand_case():
  # 2×2 token grid (masks 4×4 pixels), 3 prompt tokens, attention rows by hand.
  attention = jnp.asarray([[[0.8, 0.1, 0.1], [0.1, 0.5, 0.4], [0.1, 0.2, 0.2],
                            [0.0, 0.0, 0.5]]])
  masks = np.zeros((1, 3, 4, 4), bool)
  masks[0, 0, :2, :2] = True  # entity 0: the top-left token
  masks[0, 1, :2, :] = True   # entity 1: the top row
  masks[0, 2, :2, :2] = True  # entity 2: not in the prompt (no tokens)
  prompt = prompt_lib.Prompt(tokens=jnp.zeros((1, 3), jnp.int32), mask=jnp.ones((1, 3), bool),
                             entity=jnp.asarray([[1, 0, 0]]))
  spans = jnp.asarray([[[0, 1], [1, 3], [0, 0]]])
  sets = decoupled.entity_token_sets(prompt, spans, 3)
  np.testing.assert_array_equal(sets[0], [[1, 0, 0], [0, 1, 1], [0, 0, 0]])
  loss, count = decoupled.entity_alignment_loss(
      attention, sets, decoupled.masks_to_tokens(jnp.asarray(masks), 2))
  # entity 0: a = (.8, .1, .1, 0): outside 0.2/3, inside 0.8.
  # entity 1: a = (.2, .9, .4, .5): outside (.4 + .5)/2, inside (.2 + .9)/2.
  want = ((0.2 / 3 - 0.8) + (0.45 - 0.55)) / 2
  assert int(count) == 2 and float(loss) == pytest.approx(want, abs=1e-6)
  # A partial patch counts as its covered fraction; an absent entity drops out.
  masks[0, 0, 0, 2] = True  # a quarter of token 1
  loss, count = decoupled.entity_alignment_loss(
      attention, sets, decoupled.masks_to_tokens(jnp.asarray(masks), 2),
      present=jnp.asarray([[True, False, True]]))
  inside = (0.8 + 0.25 * 0.1) / 1.25
  outside = (0.75 * 0.1 + 0.1 + 0.0) / 2.75
  assert int(count) == 1 and float(loss) == pytest.approx(outside - inside, abs=1e-6)


# ---- configs and the train step --------------------------------------------------------------


def _tiny_config(align=0.0):
  c = config_schema.base_config()
  c.data.resolution, c.data.global_batch_size = 8, 8
  c.data.name = 'synthetic'  # batches made here; no TFDS build to check
  c.model.patch_size, c.model.hidden_size, c.model.depth, c.model.num_heads = 2, 32, 2, 2
  c.allow_narrow_patch = True
  c.prompt.name = 'unimo'
  c.prompt.vocab_size = 0  # prompts.VOCAB's size
  for key in ('width', 'depth', 'entity_tokens', 'max_tokens', 'max_entities', 'entity_size',
              'entity_widths', 'resampler_depth'):
    c.prompt[key] = PROMPT[key]
  c.prompt.heads = PROMPT['num_heads']
  c.prompt.text_dropout_prob = c.prompt.entity_dropout_prob = 0.25
  c.objective.entity_align_coeff = align
  c.optim.learning_rate = 1e-2
  return c


def _scene_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  n, r = config.data.global_batch_size, config.data.resolution
  batch = {'label': rng.integers(0, config.data.num_classes, n).astype(np.int32)}
  for m in modalities.images(modalities.from_config(config.modalities)):
    batch[m.name] = rng.uniform(-1, 1, (n, r, r, m.channels)).astype(np.float32)
  batch.update(_prompt(n, seed))
  k = PROMPT['max_entities']
  masks = np.zeros((n, k, r, r), bool)
  masks[:, 0, : r // 2, : r // 2] = True
  masks[:, 1, r // 2:, :] = True
  batch.update(entity_masks=masks, entity_valid=np.ones((n, k), bool),
               entity_spans=np.tile(np.asarray([[0, 3], [3, 6]], np.int32), (n, 1, 1)))
  return batch


def test_config_keys_are_checked_and_named():
  c = _tiny_config()
  config_validation.validate(c, num_devices=1, num_processes=1)
  c.prompt.text_dropout_prob = 1.5
  c.prompt.name = 'clip'
  c.model.class_dropout_prob = 0.0
  c.objective.entity_align_coeff = -1.0
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate(c, num_devices=1, num_processes=1)
  for text in ("prompt.name='clip'", 'prompt.text_dropout_prob=1.5', 'class_dropout_prob=0.0',
               'entity_align_coeff=-1.0'):
    assert text in str(e.value)


@pytest.mark.parametrize('variant', ['stage1', 'stage2', 'tiny'])
def test_unimo_configs_validate_and_build(variant):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'unimo_scenes32.py'
  spec = importlib.util.spec_from_file_location('unimo_scenes32', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(variant)
  config_validation.validate(c, num_devices=1, num_processes=1)
  model = nnx.eval_shape(lambda: build.build_model(c, rngs=nnx.Rngs(0)))
  assert model.prompt_encoder is not None
  assert model.prompt_encoder.max_tokens == c.prompt.max_tokens


@pytest.mark.slow  # two train-step compilations: ~7 s with a warm compilation cache, ~40-90 s cold
def test_prompt_train_step_on_a_sharded_mesh():
  """One prompt-conditioned step (with the alignment loss) on a (2, 2, 2) mesh, called without
  an active mesh: the loss is the one-device loss, every prompt parameter gets a gradient."""
  config = _tiny_config(align=0.5)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  mesh = parallel.make_mesh(config.mesh)
  parts = train.default_parts(config)
  schedule = ts.make_schedule(config.optim, 10)
  # optax.trace keeps the step's raw gradient in the optimizer state; plain SGD compiles
  # faster than AdamW and the step's logic is the same.
  tx = optax.chain(optax.trace(decay=0.0), optax.sgd(config.optim.learning_rate))
  plan = ts.plan_train_state(parts.model_fn, tx, mesh, config.sharding_rules, 0,
                             config.train.rng_impl)
  step = ts.jit_train_step(
      ts.make_train_step(plan.graphdef, parts.loss_fn, tx, schedule, ema_decay=0.9,
                         rng_impl=config.train.rng_impl),
      plan.shardings, parallel.batch_sharding(mesh, config.sharding_rules), mesh)
  rng = np.random.default_rng(1)
  init = jax.device_get(plan.init())
  params = jax.tree.map(lambda x: x + rng.normal(0.0, 0.05, x.shape).astype(x.dtype),
                        init.params)  # zero-initialised layers take part
  init = init.replace(params=params, ema_params=params)
  state = jax.device_put(init, plan.shardings)
  kv = state.params['blocks']['cross_attn']['kv_kernel']
  assert kv.sharding.spec[1] == 'fsdp' and kv.sharding.spec[3] == 'tensor'

  batch = _scene_batch(config)
  # Called outside `jax.set_mesh`: jit_train_step traces under its mesh itself. Traced
  # without one, the model's batch constraints were skipped and this loss was wrong
  # (1.89508 against 1.89388 on one device).
  assert jax.sharding.get_abstract_mesh().empty
  state, metrics = step(state, pipeline.to_global_batch(batch, mesh, config.sharding_rules))
  assert np.isfinite(float(metrics['loss'])) and float(metrics['entity_align_count']) > 0
  grads = jax.device_get(state.opt_state[0].trace)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    name = jax.tree_util.keystr(path)
    if any(k in name for k in NEW):
      assert np.any(g != 0), f'zero gradient for {name}'

  # The same loss on one device, without a mesh, from the same key.
  key = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(init.rng),
                                                    impl=config.train.rng_impl), 0)
  loss = jax.jit(lambda p, b, k: parts.loss_fn(
      ts.merge_model(plan.graphdef, p, init.model_state), b, k)[0])(params, batch, key)
  np.testing.assert_allclose(float(loss), float(metrics['loss']), rtol=1e-5)


def test_init_from_a_prompt_free_checkpoint_keeps_new_layers_fresh(tmp_path):
  """Stage 1: a trained scenes model's weights, the prompt layers as initialised."""
  from mmgen_jax import checkpoint  # pylint: disable=g-import-not-at-top
  config = _tiny_config()
  config.model.depth = 1
  config.prompt.name = ''
  mesh = jax.make_mesh((1, 1, 1), parallel.MESH_AXES, devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  tx = optax.sgd(config.optim.learning_rate)  # the weights alone matter here
  make_plan = lambda c: ts.plan_train_state(lambda rngs: build.build_model(c, rngs=rngs), tx,
                                            mesh, c.sharding_rules, 0)
  old = make_plan(config).init()
  old = old.replace(params=jax.tree.map(lambda x: x + 0.5, old.params))  # not an init
  ckpt = checkpoint.Checkpointer(tmp_path, config)
  ckpt.save(1, old, None, force=True)
  ckpt.close()

  config.prompt.name = 'unimo'
  plan = make_plan(config)
  fresh = plan.init()
  with pytest.raises(ValueError, match='params/blocks/cross_attn/q_kernel: not in the checkpoint'):
    checkpoint.load_weights(str(tmp_path), plan.abstract)
  weights = checkpoint.load_weights(str(tmp_path), plan.abstract, fresh=fresh,
                                    fresh_pattern='prompt_encoder|prompt_proj|cross_attn')
  flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(v)
                       for p, v in jax.tree_util.tree_leaves_with_path(tree)}
  got, saved, new = flat(weights['params']), flat(old.params), flat(fresh.params)
  assert set(got) == set(new) and set(saved) < set(got)
  for name, value in got.items():
    np.testing.assert_array_equal(value, saved.get(name, new[name]), err_msg=name)
