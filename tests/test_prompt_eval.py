"""Prompt fidelity evaluation: object finding, prompt parsing, scores, variants, classifier."""

import numpy as np
import pytest

from mmgen_jax import prompt_eval as pe
from mmgen_jax.data import prompts
from mmgen_jax.data import scenes
from mmgen_jax.models import attribute_classifier as ac

SPHERE, BOX, CYLINDER, CONE = (scenes.SEMANTIC_CLASSES.index(s) for s in scenes.SCENE_CLASSES)
GROUND = scenes.SEMANTIC_CLASSES.index('ground')
RED, BLUE = (np.array(c, np.uint8) for c in ((200, 30, 30), (30, 30, 200)))
VAL = ac.VAL_SEED_OFFSET


# ---- objects in a segmentation ----------------------------------------------------------------


def test_find_instances_components_classes_and_small_pieces():
  seg = np.full((10, 12), GROUND, np.int32)
  seg[1:4, 1:4] = SPHERE       # 9 px
  seg[6:9, 1:4] = SPHERE       # 9 px, same class, not touching: a second object
  seg[1:5, 4:8] = BOX          # 16 px, touches the first sphere: another class
  seg[8, 10] = CONE            # 1 px: dropped and counted
  seg[5, 9] = CYLINDER         # diagonal neighbours are not 4-connected:
  seg[6, 10] = CYLINDER        # two 1-px pieces, both dropped
  inst = pe.find_instances(seg, min_area=2)
  assert len(inst) == 3 and inst.dropped_small == 3
  assert sorted(inst.area.tolist()) == [9, 9, 16]
  assert sorted(inst.semantic.tolist()) == [SPHERE, SPHERE, BOX]
  box = inst.masks[inst.semantic == BOX][0]
  assert box.sum() == 16 and box[1:5, 4:8].all()
  np.testing.assert_allclose(inst.centre_x[inst.semantic == BOX], 6.0 / 12)
  np.testing.assert_allclose(sorted(inst.centre_x[inst.semantic == SPHERE]), [2.5 / 12] * 2)


def test_find_instances_splits_touching_objects_by_colour():
  seg = np.full((8, 8), GROUND, np.int32)
  seg[2:6, 0:8] = SPHERE                  # one component of one class ...
  rgb = np.zeros((8, 8, 3), np.uint8)
  rgb[:, :4], rgb[:, 4:] = RED, BLUE      # ... holding two colours: two objects
  rgb[3, 1] = (90, 14, 14)                # the red one in shadow: same colour, darker
  rgb[4, 2] = BLUE                        # one stray pixel: merged back, not an object
  assert len(pe.find_instances(seg, 2)) == 1
  inst = pe.find_instances(seg, 2, rgb)
  assert len(inst) == 2 and inst.dropped_small == 0
  assert sorted(inst.area.tolist()) == [16, 16]
  left = inst.masks[np.argmin(inst.centre_x)]
  assert left[3, 1] and left[4, 2] and not left[:, 4:].any()


def test_find_instances_keeps_a_noisy_object_whole():
  seg = np.full((16, 16), GROUND, np.int32)
  seg[2:14, 1:15] = SPHERE
  clean = np.zeros((16, 16, 3), np.float32)
  clean[:, :8], clean[:, 8:] = RED / 127.5 - 1, BLUE / 127.5 - 1
  clean[2:8, :8] = (clean[2:8, :8] + 1.0) * 0.5 - 1.0           # a shadow on the red one
  noisy = clean + np.random.default_rng(0).normal(0.0, 0.03, clean.shape)
  inst = pe.find_instances(seg, 5, np.clip(noisy, -1, 1))
  assert len(inst) == 2 and inst.dropped_small == 0 and sorted(inst.area) == [84, 84]


# ---- hand-built prompts --------------------------------------------------------------------


def _record(words, spans, shapes, colours, seg, imaged=()):
  """A contract record from words, entity spans (k -> [start, end)) and attributes."""
  E, H = prompts.MAX_ENTITIES, seg.shape[0]
  tokens, mask = prompts.encode_words(words, 24)
  span = np.zeros((E, 2), np.int32)
  valid = np.zeros(E, bool)
  for k, s in spans.items():
    span[k], valid[k] = s, True
  entity = np.zeros(24, np.int32)
  for k in imaged:
    entity[span[k, 0]:span[k, 1]][tokens[span[k, 0]:span[k, 1]] == prompts.ENT_ID] = k + 1
  pad = lambda v: np.array(list(v) + [-1] * (E - len(v)), np.int32)
  return dict(prompt_tokens=tokens, prompt_mask=mask, prompt_entity=entity,
              prompt_kind=np.int32(1 if imaged else 0),
              entity_images=np.zeros((E, 8, 8, 3), np.uint8),
              entity_is_image=np.isin(np.arange(E), list(imaged)), entity_valid=valid,
              entity_masks=np.zeros((E, H, H), bool), entity_spans=span,
              entity_shape=pad(shapes), entity_colour=pad(colours))


def _scene(objects, size=12):
  """seg ids and RGB with one 3x3 object per (shape id, colour, column) triple."""
  seg = np.full((size, size), GROUND, np.int32)
  rgb = np.full((size, size, 3), 128, np.uint8)
  for sem, colour, col in objects:
    seg[4:7, col:col + 3] = sem
    rgb[4:7, col:col + 3] = colour
  return seg, rgb


def _score(record, objects):
  """The record's score on a scene of `objects`, read by a classifier that takes the
  shape from the map and the colour from a table (exact, like an oracle)."""
  seg, rgb = _scene(objects)
  table = {tuple(RED): prompts.COLOURS.index('red'), tuple(BLUE): prompts.COLOURS.index('blue')}

  def classify(rgb_batch, index, masks):
    shape = [seg[m][0] - SPHERE for m in masks]
    colour = [table[tuple(rgb_batch[i][m][0])] for i, m in zip(index, masks)]
    return np.array(shape), np.array(colour)

  batch = {k: np.asarray(v)[None] for k, v in record.items()}
  return pe.score_images(rgb[None], seg[None], batch, classify, min_area=2)[0]


def test_counts_colours_shapes_and_left_right_on_hand_built_maps():
  red, blue = prompts.COLOURS.index('red'), prompts.COLOURS.index('blue')
  words = 'a red ball to the left of a blue box'.split()
  rec = _record(words, {0: (0, 3), 1: (7, 10)}, [0, 1], [red, blue], np.zeros((12, 12)))
  assert pe.relations(rec) == ([(0, 1)], 0)
  assert [a.tolist() for a in pe.named_attributes(rec)] == [[0, 1, -1, -1], [red, blue, -1, -1]]

  good = _score(rec, [(SPHERE, RED, 1), (BOX, BLUE, 7)])
  assert good.count and good.colour == [True, True] and good.shape == [True, True]
  assert good.relation == [True] and good.text_alignment == 1.0
  swapped = _score(rec, [(SPHERE, RED, 7), (BOX, BLUE, 1)])          # right of, not left
  assert swapped.relation == [False] and swapped.count and swapped.text_alignment == 5 / 6
  recoloured = _score(rec, [(SPHERE, BLUE, 1), (BOX, RED, 7)])
  assert recoloured.colour == [False, False] and recoloured.shape == [True, True]
  assert recoloured.relation == [False]   # neither entity is there: no relation between them
  extra = _score(rec, [(SPHERE, RED, 0), (BOX, BLUE, 4), (CONE, RED, 8)])
  assert not extra.count and extra.relation == [True]
  missing = _score(rec, [(SPHERE, RED, 1)])
  assert not missing.count and missing.shape == [True, False] and missing.relation == [False]


def test_three_objects_chain_and_image_entities():
  red, blue = prompts.COLOURS.index('red'), prompts.COLOURS.index('blue')
  ent = [prompts.ENT] * 2
  words = ['from', 'right', 'to', 'left', ',', 'a', *ent, ',', 'a', 'red', 'cone', 'and', 'a',
           'blue', 'ball']
  spans = {2: (5, 8), 0: (9, 12), 1: (13, 16)}
  rec = _record(words, spans, [3, 0, 1], [red, blue, blue], np.zeros((12, 12)), imaged=(2,))
  # Right to left: entity 2, then 0, then 1 -> 0 left of 2, 1 left of 0.
  assert pe.relations(rec) == ([(0, 2), (1, 0)], 0)
  s = _score(rec, [(SPHERE, BLUE, 0), (CONE, RED, 4), (BOX, BLUE, 8)])
  assert s.entity == [True] and s.relation == [True, True] and s.text_alignment == 1.0
  wrong_entity = _score(rec, [(SPHERE, BLUE, 0), (CONE, RED, 4), (BOX, RED, 8)])
  assert wrong_entity.entity == [False] and wrong_entity.entity_shape == [True]
  # Its attributes are no textual claim, but a relation needs the entity found.
  assert wrong_entity.colour == [True, True] and wrong_entity.shape == [True, True]
  assert wrong_entity.relation == [False, True]


def test_identical_entities_are_matched_by_the_stated_order():
  red = prompts.COLOURS.index('red')
  words = 'a little red cone right of a red cone'.split()
  rec = _record(words, {0: (0, 4), 1: (6, 9)}, [3, 3], [red, red], np.zeros((12, 12)))
  s = _score(rec, [(CONE, RED, 1), (CONE, RED, 7)])   # entity 0 is the object on the right
  assert s.relation == [True] and s.text_alignment == 1.0


# ---- ground-truth renders -------------------------------------------------------------------


@pytest.fixture(scope='module')
def renders():
  # 64 px: the resolution prompts measure visibility and positions at. Every object of
  # these 16 scenes is found whole (an object cut in two by a nearer one would not be).
  return pe.scene_records(range(VAL, VAL + 16), 64, kind=1, with_scene=True)


def test_ground_truth_scores_one_and_shuffled_prompts_score_low(renders):
  scores = pe.aggregate(pe.score_images(renders['rgb'], renders['segmentation'], renders,
                                        pe.oracle_classifier(renders)))
  assert scores['num_image_entities'] >= 16
  assert scores['entity_acc'] == 1.0 and scores['text_alignment'] == 1.0
  assert scores['count_acc'] == 1.0 and scores['num_relation_checks'] >= 10
  assert scores['rgb_seg_shape_agreement'] == 1.0
  assert {f'entity_acc/n{k}' for k in range(1, 5)} <= set(scores)

  # Prompt i scored on image i + 1: the oracle reads image i + 1's own objects.
  shuffled = {k: np.roll(v, 1, axis=0) for k, v in renders.items()
              if k not in ('rgb', 'segmentation', 'entity_masks')}
  oracle = pe.oracle_classifier(renders)
  bad = pe.aggregate(pe.score_images(renders['rgb'], renders['segmentation'],
                                     {**renders, **shuffled}, oracle))
  assert bad['entity_acc'] < 0.3 and bad['text_alignment'] < 0.7


def test_variants_keep_the_sentence_and_change_the_entities(renders):
  rec = pe.unbatch({k: v for k, v in renders.items() if k not in ('rgb', 'segmentation', 'seed')})
  for r in rec[:6]:
    plain, spelled = pe.placeholder_variant(r), pe.spelled_out_variant(r)
    for v in (plain, spelled):
      assert prompts.check_fields(v) == []
      assert not v['entity_is_image'].any() and not v['prompt_entity'].any()
      assert pe.mentioned(v) == pe.mentioned(r) and pe.relations(v) == pe.relations(r)
    assert all(w not in prompts.COLOURS for w in pe.words_of(plain))
    shape, colour = pe.named_attributes(spelled)
    ks = pe.mentioned(r)
    np.testing.assert_array_equal(shape[ks], r['entity_shape'][ks])
    np.testing.assert_array_equal(colour[ks], r['entity_colour'][ks])
  batch = pe.variant_batch(renders, 'spelled_out')
  scores = pe.aggregate(pe.score_images(renders['rgb'], renders['segmentation'], renders,
                                        pe.oracle_classifier(renders), texts=batch))
  assert scores['text_alignment'] == 1.0
  assert scores['num_colour_checks'] == sum(len(pe.mentioned(r)) for r in rec)


# ---- the attribute classifier -----------------------------------------------------------------


def test_crop_centres_the_mask_and_zeroes_the_rest():
  rgb = np.zeros((16, 16, 3), np.uint8)
  rgb[...] = (255, 0, 0)
  mask = np.zeros((16, 16), bool)
  mask[0:4, 12:16] = True
  x = ac.crop(rgb, mask, 8)
  assert x.shape == (8, 8, 4)
  assert x[3:5, 3:5, 3].min() > 0.99 and x[0, 0, 3] == 0 and x[..., :3].max() <= 1.0
  np.testing.assert_allclose(x[..., 0], x[..., 3], atol=1e-6)   # red where the mask is
  assert np.all(x[..., 1:3] <= 0)


def test_classifier_trains_saves_loads_and_scores(tmp_path, renders):
  model, meta = ac.train(str(tmp_path), num_scenes=24, num_val_scenes=8, crop_size=8,
                         widths=(4, 8), hidden=8, num_steps=3, batch_size=16)
  assert set(meta['held_out']) == {'shape_acc', 'colour_acc', 'both_acc', 'num_objects'}
  assert meta['colours'] == list(prompts.COLOURS) and meta['shapes'] == list(prompts.SHAPES)
  classify, loaded = pe.load_classifier(str(tmp_path))
  assert loaded['held_out'] == meta['held_out']
  data = ac.make_dataset(range(VAL, VAL + 2), 32, 8, 4)
  np.testing.assert_array_equal(np.stack(ac.predict(model, data['crops'])),
                                np.stack(ac.predict(ac.load(str(tmp_path))[0], data['crops'])))
  scores = pe.aggregate(pe.score_images(renders['rgb'][:2], renders['segmentation'][:2],
                                        {k: v[:2] for k, v in renders.items()}, classify))
  assert 0.0 <= scores['text_alignment'] <= 1.0


# ---- the whole evaluation -------------------------------------------------------------------


def _prompt_config():
  """A small prompt model on the 32 px scenes with the prompt records' L, R, S."""
  from mmgen_jax import config_schema  # pylint: disable=g-import-not-at-top
  c = config_schema.base_config()
  c.model.patch_size, c.model.hidden_size, c.model.depth, c.model.num_heads = 4, 64, 1, 2
  c.prompt.name = 'unimo'
  c.prompt.width, c.prompt.depth, c.prompt.heads = 32, 1, 2
  c.prompt.entity_widths = (8, 16)
  c.sample.num_steps = 1
  return c


def test_evaluate_model_scores_every_variant_against_the_original_entities(renders):
  """A sampler that returns each prompt's own scene: every variant finds every entity."""
  from mmgen_jax.data import palettes  # pylint: disable=g-import-not-at-top
  config = _prompt_config()
  config.data.resolution = 64
  seen = []

  def draw(index, records):
    seen.append((index, records['prompt_tokens'].copy(), records['entity_is_image'].any()))
    out = [scenes.render_scene(int(s), 64) for s in records['seed']]
    n = len(out)
    return {'rgb': np.stack([o['rgb'] for o in out]) / 127.5 - 1.0,
            'segmentation': palettes.colorize(np.stack([o['segmentation'] for o in out]))
                            / 127.5 - 1.0,
            'depth': np.zeros((n, 64, 64, 1)), 'normal': np.zeros((n, 64, 64, 3))}

  # Scenes FD: a stand-in feature network (mean colour per image) and the statistics of the
  # true renders, which the generated set here equals.
  from mmgen_jax import generation_eval as ge  # pylint: disable=g-import-not-at-top
  from mmgen_jax import metrics  # pylint: disable=g-import-not-at-top
  feats = lambda rgb: np.asarray(rgb, np.float64).mean((1, 2))
  extractor = ge.Extractor(lambda b: {'scenes/rgb': feats(b['rgb'])}, ('scenes/rgb',), {}, {})
  reference = ge.Reference({'scenes/rgb': metrics.feature_statistics(
      feats(renders['rgb'] / 127.5 - 1.0))}, {}, 16, 'renders')
  res = pe.evaluate_model(config, None, pe.oracle_classifier(renders), num_prompts=16, batch=6,
                          draw=draw, extractor=extractor, reference=reference)
  assert [i for i, *_ in seen] == [0, 1, 2] * 3 and all(len(t) == 6 for _, t, _ in seen)
  assert [has for *_, has in seen] == [True] * 3 + [False] * 6   # images only in 'prompt'
  for v in pe.VARIANTS:
    assert res[f'eval/prompt/{v}/num_image_entities'] == renders['entity_is_image'].sum()
    assert res[f'eval/prompt/{v}/entity_acc'] == 1.0
    assert res[f'eval/prompt/{v}/text_alignment'] == 1.0
    assert abs(res[f'eval/prompt/{v}/scenes_fd/rgb']) < 1e-6
  assert res['eval/prompt/placeholder/num_colour_checks'] == 0
  assert res['eval/prompt/spelled_out/num_colour_checks'] > res['eval/prompt/prompt/num_colour_checks']


@pytest.mark.slow
def test_evaluate_model_samples_a_prompt_model():
  """The real sampling path on a small random prompt model (one step, one variant)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmgen_jax import parallel  # pylint: disable=g-import-not-at-top
  from mmgen_jax.models import build  # pylint: disable=g-import-not-at-top
  config = _prompt_config()
  config.data.resolution = config.prompt.entity_size = 8   # a small program to compile
  config.prompt.entity_widths = (8,)
  mesh = parallel.make_mesh(config.mesh)
  # Random parameters drawn with numpy: flax's initialisers would compile one program per
  # parameter shape, most of this test's time.
  model = nnx.eval_shape(lambda: build.build_model(config, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  nnx.update(model, jax.tree.map(
      lambda v: jnp.asarray(0.05 * rng.normal(size=v.shape), v.dtype), nnx.state(model)))
  calls = []

  def classify(rgb, index, masks):
    calls.append(rgb.shape)
    return np.zeros(len(masks), np.int32), np.zeros(len(masks), np.int32)

  with pytest.raises(ValueError, match='batch=4 must be a positive multiple of the 8 ways'):
    pe.evaluate_model(config, None, classify, num_prompts=3, batch=4, scenes_fd=False,
                      model=model, mesh=mesh)
  res = pe.evaluate_model(config, None, classify, num_prompts=3, batch=8, variants=('prompt',),
                          scenes_fd=False, model=model, mesh=mesh)
  assert calls == [(3, 8, 8, 3)]
  assert res['eval/prompt/prompt/num_prompts'] == 3
  assert 0.0 <= res['eval/prompt/prompt/text_alignment'] <= 1.0
