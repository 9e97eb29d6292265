"""Multimodal prompts: captions, token spans, entity images and masks, the TFDS records and
the pipeline's prompt fields."""

import colorsys

import jax
import ml_collections
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mmgen_jax import config_schema
from mmgen_jax import config_validation
from mmgen_jax import parallel
from mmgen_jax.data import pipeline
from mmgen_jax.data import prompts
from mmgen_jax.data import scenes
from mmgen_jax.data import tfds_prompts

L, R, S, RES = 48, 4, 32, 32
SEEDS = range(40)
BUILD = 'res32_n12_4'


def _fields(seed, kind=None, res=RES):
  return prompts.example_fields(seed, res, max_tokens=L, entity_tokens=R, entity_size=S,
                                kind=kind)


@pytest.fixture(scope='module')
def examples():
  """(seed, kind) -> prompt fields; every kind for every seed."""
  return {(s, k): _fields(s, k) for s in SEEDS for k in (0, 1, 2)}


# ---- words, spans and slots ------------------------------------------------------------------


def test_each_span_decodes_to_its_objects_phrase(examples):
  """The words in [start, end) are the object's article, size, colour, shape (or its image)."""
  mentioned = 0
  for (seed, kind), f in examples.items():
    scene = scenes.sample_scene(np.random.default_rng(seed))
    words = prompts.decode(f['prompt_tokens'], f['prompt_mask'])
    for k in range(prompts.MAX_ENTITIES):
      s, e = f['entity_spans'][k]
      if (s, e) == (0, 0):
        continue
      mentioned += 1
      phrase = words[s:e]
      p = scene.objects[k]
      slots = [prompts.ENT] * R if f['entity_is_image'][k] else []
      if kind == 1 and f['entity_is_image'][k]:
        assert phrase == ['a'] + slots, (seed, kind, k, phrase)
        continue
      size = prompts.size_name(p)
      body = phrase[1:len(phrase) - len(slots)]
      assert phrase[len(phrase) - len(slots):] == slots or not slots, (seed, k, phrase)
      assert phrase[0] in ('a', 'an'), phrase
      assert body[-2] == prompts.colour_name(p.albedo), (seed, k, phrase)
      assert body[-1] in prompts._SHAPE_WORDS[p.shape], (seed, k, phrase)
      assert body[:-2] == ([] if size is None else [body[0]]), (seed, k, phrase)
      if size is not None:
        assert body[0] in prompts._SIZE_WORDS[size], (seed, k, phrase)
      # No other object's words inside, and nothing of this phrase just outside it.
      assert e == len(words) or words[e] not in prompts._SHAPE_WORDS[p.shape] + (prompts.ENT,)
  assert mentioned > 100


def test_padding_is_masked_and_every_field_meets_the_contract(examples):
  for (seed, kind), f in examples.items():
    assert prompts.check_fields(f, max_tokens=L, entity_tokens=R, entity_size=S,
                                resolution=RES) == [], (seed, kind)
    n = int(f['prompt_mask'].sum())
    assert f['prompt_mask'][:n].all() and not f['prompt_mask'][n:].any()
    assert (f['prompt_tokens'][n:] == prompts.PAD_ID).all()
    assert (f['prompt_tokens'][:n] != prompts.PAD_ID).all()
    assert (f['prompt_tokens'][:n] != prompts.UNK_ID).all()   # captions use VOCAB only
    assert int(f['prompt_kind']) == kind or not f['entity_is_image'].any()


def test_entity_slots_carry_their_index_R_times_in_a_row(examples):
  imaged = 0
  for (seed, kind), f in examples.items():
    ent, tok = f['prompt_entity'], f['prompt_tokens']
    assert ((ent > 0) == (tok == prompts.ENT_ID)).all()
    for k in range(prompts.MAX_ENTITIES):
      slots = np.flatnonzero(ent == k + 1)
      if not f['entity_is_image'][k]:
        assert len(slots) == 0 and not f['entity_images'][k].any()
        continue
      imaged += 1
      assert kind in (1, 2)
      s, e = f['entity_spans'][k]
      np.testing.assert_array_equal(slots, np.arange(e - R, e))   # the phrase ends with them
      assert f['entity_images'][k].any()
  assert imaged > 40


def test_the_check_catches_broken_fields(examples):
  f = dict(examples[(3, 2)])
  k = int(np.flatnonzero(f['entity_is_image'])[0])
  broken = dict(f, prompt_entity=np.where(f['prompt_entity'] == k + 1, k + 2, f['prompt_entity'])
                .astype(np.int32))
  assert prompts.check_fields(broken, entity_tokens=R)
  short = dict(f, prompt_mask=np.concatenate([[False], f['prompt_mask'][1:]]))
  assert prompts.check_fields(short)
  assert prompts.check_fields(f, entity_tokens=R + 1)


def test_prompt_kinds_and_relations():
  """Kinds 1 and 2 show images; 'left of' names the object whose centroid is further left."""
  kinds = [int(_fields(s)['prompt_kind']) for s in SEEDS]
  assert set(kinds) == {0, 1, 2}
  checked = 0
  for seed in SEEDS:
    facts = prompts.scene_facts(seed)
    cap = prompts.caption(seed, facts=facts, kind=0)
    words = list(cap.words)
    if len(cap.spans) != 2 or 'left' not in words and 'right' not in words:
      continue
    (a, (_, ea)), (b, _) = sorted(cap.spans.items(), key=lambda kv: kv[1][0])
    rel = words[ea:cap.spans[b][0]]
    left = 'left' in rel
    assert (facts.objects[a].centre_x < facts.objects[b].centre_x) == left, (seed, cap.text)
    checked += 1
  assert checked >= 5


def test_colour_names_follow_the_rendered_hue():
  assert [prompts.colour_name(np.array(c) ** 2.2) for c in
          [(1, 0, 0), (1, .5, 0), (1, 1, 0), (.5, 1, 0), (0, 1, 0), (0, 1, 1), (0, 0, 1),
           (.5, 0, 1), (1, 0, .5)]] == list(prompts.COLOURS)
  # The shaded pixels of an object keep its name (shading scales linear RGB).
  agree = total = 0
  for seed in range(12):
    out = scenes.render_scene(seed, 64, with_instances=True)
    for k, p in enumerate(scenes.sample_scene(np.random.default_rng(seed)).objects):
      px = out['rgb'][out['instance'] == 3 + k].astype(float) / 255
      px = px[px.max(-1) > 0.2]   # lit enough for an 8-bit hue
      if len(px) < 10:
        continue
      hue = np.median([colorsys.rgb_to_hsv(*q)[0] for q in px])
      name = prompts.colour_name(np.array(colorsys.hsv_to_rgb(hue, 1, 1)) ** 2.2)
      agree += name == prompts.colour_name(p.albedo)
      total += 1
  assert total > 20 and agree / total > 0.85, (agree, total)


def test_every_colour_and_size_occurs():
  colours, sizes = set(), set()
  for seed in range(300):
    for p in scenes.sample_scene(np.random.default_rng(seed)).objects:
      colours.add(prompts.colour_name(p.albedo))
      sizes.add(prompts.size_name(p))
  assert colours == set(prompts.COLOURS)
  assert sizes == {'small', 'large', None}


# ---- entity images and masks --------------------------------------------------------------------


def test_entity_images_are_new_views_not_crops_of_the_target(examples):
  compared = 0
  for (seed, kind), f in examples.items():
    if kind != 2:
      continue
    rgb = scenes.render_scene(seed, RES)['rgb'].astype(np.float32)
    for k in np.flatnonzero(f['entity_is_image']):
      m = f['entity_masks'][k]
      if m.sum() < 4:
        continue
      rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
      crop = rgb[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
      iy = (np.arange(S) * crop.shape[0] // S)
      ix = (np.arange(S) * crop.shape[1] // S)
      crop = crop[iy][:, ix]
      diff = np.abs(crop - f['entity_images'][k].astype(np.float32)).mean()
      assert diff > 20, (seed, k, diff)
      # ... yet the same object: its pixels carry the object's colour name.
      img = f['entity_images'][k].astype(float) / 255
      corner = img[0, 0]
      obj = img[np.abs(img - corner).max(-1) > 0.02]
      obj = obj[obj.max(-1) > 0.2]
      hue = np.median([colorsys.rgb_to_hsv(*q)[0] for q in obj])
      name = prompts.colour_name(np.array(colorsys.hsv_to_rgb(hue, 1, 1)) ** 2.2)
      compared += name == prompts.COLOURS[f['entity_colour'][k]]
  assert compared > 10


def test_entity_views_change_with_the_view_seed_and_not_the_object():
  a = scenes.render_entity(5, 0, S, prompts.view_seed(5, 0))
  np.testing.assert_array_equal(a, scenes.render_entity(5, 0, S, prompts.view_seed(5, 0)))
  assert np.abs(a.astype(int) - scenes.render_entity(5, 0, S, [1, 2, 3])).mean() > 5
  with pytest.raises(IndexError, match='object 9'):
    scenes.render_entity(5, 9, S, 0)


def test_masks_are_the_instance_map(examples):
  for (seed, kind), f in examples.items():
    if kind:
      continue
    inst = scenes.render_scene(seed, RES, with_instances=True)['instance']
    n = len(scenes.sample_scene(np.random.default_rng(seed)).objects)
    for k in range(prompts.MAX_ENTITIES):
      np.testing.assert_array_equal(f['entity_masks'][k], inst == 3 + k)
      assert f['entity_valid'][k] == (k < n)
      if tuple(f['entity_spans'][k]) != (0, 0):
        assert f['entity_masks'][k].any(), (seed, k)   # a mentioned object is visible
    assert (f['entity_shape'][n:] == -1).all() and (f['entity_colour'][n:] == -1).all()
    assert [prompts.SHAPES[i] for i in f['entity_shape'][:n]] == [
        p.shape for p in scenes.sample_scene(np.random.default_rng(seed)).objects]


def test_deterministic_per_seed_and_the_same_words_at_every_resolution(examples):
  again = _fields(7, 2)
  for key, x in examples[(7, 2)].items():
    np.testing.assert_array_equal(x, again[key], err_msg=key)
  hi = _fields(7, 2, res=64)
  np.testing.assert_array_equal(hi['prompt_tokens'], again['prompt_tokens'])
  assert hi['entity_masks'].shape == (prompts.MAX_ENTITIES, 64, 64)
  texts = {prompts.caption(s).text for s in SEEDS}
  assert len(texts) > 30   # seeds differ


# ---- real data -------------------------------------------------------------------------------


def test_encode_caption_inserts_slots_after_imaged_phrases():
  text = 'A red cone, left of a zebra sphere.'
  out = prompts.encode_caption(text, [(0, 10), (20, 34)], [True, False], max_tokens=20,
                               entity_tokens=3)
  words = prompts.decode(out['prompt_tokens'], out['prompt_mask'])
  assert words == ['a', 'red', 'cone'] + ['<ent>'] * 3 + [',', 'left', 'of', 'a', '<unk>',
                                                         'sphere', '.']
  np.testing.assert_array_equal(out['entity_spans'][:2], [[0, 6], [9, 12]])
  assert out['prompt_entity'].tolist()[:7] == [0, 0, 0, 1, 1, 1, 0]
  with pytest.raises(ValueError, match='overlap'):
    prompts.encode_caption(text, [(0, 10), (5, 12)], [False, False], max_tokens=20,
                           entity_tokens=3)
  with pytest.raises(ValueError, match='max_tokens=8'):
    prompts.encode_caption(text, [(0, 10)], [True], max_tokens=8, entity_tokens=3)
  masks = np.zeros((2, 16, 16), bool)
  masks[0, 2:5, 3:9] = masks[1, 9:, :4] = True
  real = prompts.real_example_fields(text, [(0, 10), (20, 34)], [True, False],
                                     np.full((2, 8, 8, 3), 9, np.uint8), masks, kind=2,
                                     max_tokens=20, entity_tokens=3)
  assert prompts.check_fields(real, max_tokens=20, entity_tokens=3, entity_size=8,
                              resolution=16) == []
  assert real['entity_valid'].tolist() == [True, True, False, False]
  assert real['entity_images'][0].all() and not real['entity_images'][1:].any()
  assert real['entity_colour'].tolist() == [-1] * 4 and int(real['prompt_kind']) == 2


# ---- TFDS records and the pipeline --------------------------------------------------------------


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('tfds_prompts')
  tfds_prompts.build(BUILD, path)
  return str(path)


def _source(data_dir, split):
  builder = tfds_prompts.make_builder(BUILD, data_dir)
  return builder.as_data_source(split=split, decoders={'rgb': tfds.decode.SkipDecoding()})


def test_records_hold_the_fields_of_their_seed(data_dir):
  for split, n in (('train', 12), ('validation', 4)):
    src = _source(data_dir, split)
    assert len(src) == n
    r = src[n - 1]
    seed = tfds_prompts.tfds_scenes.seed_for(split, n - 1)
    assert r['seed'] == seed
    ref = prompts.record_fields(seed, RES, max_tokens=L, entity_tokens=R, entity_size=S)
    for key in prompts.RECORD_KEYS:
      np.testing.assert_array_equal(np.asarray(r[key]), ref[key], err_msg=f'{split} {key}')
    for j in range(3):   # each kind's row is that kind's prompt
      for key, x in _fields(seed, j).items():
        np.testing.assert_array_equal(prompts.select_kind(r, j)[key], x, err_msg=f'{j} {key}')
    assert r['caption'].decode() == ' '.join(prompts.decode(
        _fields(seed)['prompt_tokens'], _fields(seed)['prompt_mask']))
  train = {tuple(_source(data_dir, 'train')[i]['prompt_tokens'][0]) for i in range(12)}
  assert not train & {tuple(_source(data_dir, 'validation')[i]['prompt_tokens'][0])
                      for i in range(4)}


def _config(kind_probs=(0.0, 0.5, 0.5), **prompt):
  c = config_schema.base_config()
  c.data.name = tfds_prompts.NAME
  c.data.global_batch_size = 8
  c.data.augment.hflip = True
  if 'prompt' not in c:
    c.prompt = ml_collections.ConfigDict()
  for k, v in {**dict(max_tokens=L, entity_tokens=R, entity_size=S, kind_probs=kind_probs),
               **prompt}.items():
    c.prompt[k] = v
  return c


def _kind_of(batch, b, record):
  """The kind row of `record` that batch example b holds (-1: none)."""
  for j in range(3):
    f = prompts.select_kind(record, j)
    if all(np.array_equal(batch[k][b], f[k]) for k in ('prompt_mask', 'prompt_entity',
                                                        'entity_images', 'entity_spans')):
      return j
  return -1


def test_pipeline_batches_have_the_contract_shapes_and_flip_left_right(data_dir):
  config = _config()
  src = _source(data_dir, 'train')
  batch = next(pipeline.make_iterator(config, 'train', train=True, source=src))
  for key, (shape, dtype) in prompts.field_specs(L, RES, S).items():
    assert batch[key].shape == (8,) + shape and batch[key].dtype == dtype, (key, batch[key].shape)
  assert batch['rgb'].shape == (8, RES, RES, 3)
  flipped = 0
  for b in range(8):
    r = src[int(batch['index'][b])]
    j = _kind_of(batch, b, r)
    assert j >= 0 and batch['prompt_kind'][b] == r['prompt_kind'][j], (b, j)
    f = prompts.select_kind(r, j)
    rgb = np.asarray(pipeline._decode_image(r['rgb'], None), np.float32) / 127.5 - 1
    flip = not np.allclose(batch['rgb'][b], rgb)
    if flip:
      np.testing.assert_allclose(batch['rgb'][b], rgb[:, ::-1])
      flipped += 1
    np.testing.assert_array_equal(batch['entity_masks'][b],
                                  f['entity_masks'][:, :, ::-1] if flip else f['entity_masks'])
    words = prompts.decode(batch['prompt_tokens'][b])
    swap = {'left': 'right', 'right': 'left'}
    want = [swap.get(w, w) if flip else w for w in prompts.decode(f['prompt_tokens'])]
    assert words == want
  assert 0 < flipped < 8


def test_pipeline_global_batch_is_sharded_and_checks_config_sizes(data_dir):
  config = _config()
  config.data.builder_config, config.data.data_dir = BUILD, data_dir   # read through TFDS
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 4, 2, 1
  mesh = parallel.make_mesh(config.mesh)
  it = pipeline.make_iterator(config, 'validation', train=False)
  batch = next(pipeline.global_batches(it, mesh, config.sharding_rules))
  for key in prompts.PROMPT_KEYS:
    assert isinstance(batch[key], jax.Array) and batch[key].shape[0] == 8, key
    assert batch[key].sharding.spec == P(('data', 'fsdp')), key
  assert int(batch['valid'].sum()) == 4   # 4 records, padded
  # A config asking for another L names the mismatch.
  config = _config(max_tokens=40)
  it = pipeline.make_iterator(config, 'validation', train=False,
                              source=_source(data_dir, 'validation'))
  with pytest.raises(pipeline.BadRecordError, match=r'prompt_tokens: int32\(48,\), expected'):
    next(it)


def test_pipeline_draws_prompt_kinds_from_the_config(data_dir):
  src = _source(data_dir, 'train')

  def kinds(probs, train=True, n=3):
    it = pipeline.make_iterator(_config(probs), 'train', train=train, source=src)
    out = []
    for _ in range(n if train else 2):
      batch = next(it)
      out += [(int(i), _kind_of(batch, b, src[int(i)])) for b, i in enumerate(batch['index'])]
      assert not batch['entity_images'][batch['prompt_kind'] == 0].any()
    return out

  assert {j for _, j in kinds((1.0, 0.0, 0.0))} == {0}
  assert {j for _, j in kinds((0.0, 0.0, 1.0))} == {2}
  mixed = kinds((0.4, 0.3, 0.3), n=6)
  assert {j for _, j in mixed} == {0, 1, 2}
  # Without a kind mix each record keeps the kind its seed drew; evaluation is repeatable.
  own = kinds(None, train=False)
  assert [j for _, j in own] == [int(src[i]['drawn_kind']) for i, _ in own]
  assert kinds((0.4, 0.3, 0.3), train=False) == kinds((0.4, 0.3, 0.3), train=False)
  with pytest.raises(ValueError, match='kind_probs'):
    kinds((0.5, 0.5, 0.5))


def test_pipeline_refuses_crops_of_prompt_records(data_dir):
  config = _config()
  config.data.augment.crop_min_scale = 0.5
  it = pipeline.make_iterator(config, 'train', train=True, source=_source(data_dir, 'train'))
  with pytest.raises(ValueError, match='crops are refused for prompt records'):
    next(it)


def test_config_validation_compares_the_build_with_the_run():
  c = _config(max_tokens=40)
  c.data.builder_config, c.data.augment.crop_min_scale = 'res32_small', 0.8
  problems = list(config_validation._check_data(c, 8, 1))
  assert any('config.prompt.max_tokens=40' in p for p in problems), problems
  assert any('crop_min_scale=0.8' in p for p in problems), problems
  c = _config()
  c.data.builder_config, c.data.augment.crop_min_scale = 'res32_small', 1.0
  assert list(config_validation._check_data(c, 8, 1)) == []
