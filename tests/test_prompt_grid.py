"""Prompt pictures and the sample grids of a prompt model (prompt_grid, train.make_sample_fn)."""

from flax import nnx
import jax
import numpy as np
import pytest

from mmgen_jax import config_schema
from mmgen_jax import prompt_grid as pg
from mmgen_jax import train
from mmgen_jax import visualize
from mmgen_jax.data import prompts
from mmgen_jax.data import tfds_prompts
from mmgen_jax.data import tfds_scenes
from mmgen_jax.diffusion import samplers
from mmgen_jax.models import build

RES, L, R, S = 16, 48, 4, 8
MARK = np.array([3, 250, 7], np.uint8)   # a colour no rendered word or scene has


def _record(words, images=()):
  """One prompt: `words`, each int k standing for entity image k (R slots)."""
  tokens, mask = prompts.encode_words(
      [w for x in words for w in ([prompts.ENT] * R if isinstance(x, int) else [x])], L)
  entity = np.zeros(L, np.int32)
  pos = 0
  for x in words:
    if isinstance(x, int):
      entity[pos:pos + R] = x + 1
      pos += R
    else:
      pos += 1
  ent_images = np.zeros((prompts.MAX_ENTITIES, S, S, 3), np.uint8)
  for k, image in enumerate(images):
    ent_images[k] = image
  return {'prompt_tokens': tokens, 'prompt_mask': mask, 'prompt_entity': entity,
          'entity_images': ent_images}


def _has_block(panel, colour, side):
  """Whether `panel` holds a side × side square of `colour`."""
  hit = np.all(panel == colour, axis=-1).astype(np.int32)
  sums = np.pad(hit, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
  box = sums[side:, side:] - sums[:-side, side:] - sums[side:, :-side] + sums[:-side, :-side]
  return bool((box == side * side).any())


# ---- prompt panels ----------------------------------------------------------------------------


def test_prompt_items_put_each_entity_image_once_where_its_slots_are():
  red, blue = np.full((S, S, 3), 200, np.uint8), np.full((S, S, 3), 30, np.uint8)
  rec = _record(['a', 'small', 0, 'left', 'of', 'a', 1, ',', 'on', 'a', 'floor'], [red, blue])
  items = pg.prompt_items(rec)
  assert [x if isinstance(x, str) else int(x[0, 0, 0]) for x in items] == [
      'a', 'small', 200, 'left', 'of', 'a', 30, ',', 'on', 'a', 'floor']
  rec['prompt_mask'][2:2 + R] = False   # entity 0's image dropped: gone, not shown as words
  assert [x if isinstance(x, str) else int(x[0, 0, 0]) for x in pg.prompt_items(rec)] == [
      'a', 'small', 'left', 'of', 'a', 30, ',', 'on', 'a', 'floor']


def test_prompt_panel_shows_words_and_entity_thumbnails():
  marked = np.broadcast_to(MARK, (S, S, 3))
  imaged = pg.prompt_panel(_record(['a', 0, 'left', 'of', 'a', 'red', 'cone'], [marked]), 96)
  worded = pg.prompt_panel(_record(['a', 'blue', 'box', 'left', 'of', 'a', 'red', 'cone']), 96)
  assert imaged.shape[1] == worded.shape[1] == 96 and imaged.dtype == np.uint8
  # The entity image is shown THUMB pixels high, enlarged from S; the text-only one has none.
  assert _has_block(imaged, MARK, pg.THUMB) and not _has_block(worded, MARK, 1)
  assert (worded < 100).any()                                   # ink of the words
  assert not np.array_equal(imaged[:worded.shape[0]], worded)
  np.testing.assert_array_equal(pg.prompt_panel(_record(['a', 'blue', 'box', 'left', 'of', 'a',
                                                         'red', 'cone']), 96), worded)


def test_flow_panel_wraps_long_text_and_never_cuts_it():
  words = ['from', 'left', 'to', 'right', ',', 'a', 'checkered', 'floor'] * 3
  wide, narrow = visualize.flow_panel(words, 400), visualize.flow_panel(words, 60)
  assert wide.shape[1] == 400 and narrow.shape[1] == 60
  assert narrow.shape[0] > 3 * wide.shape[0]                   # more lines, same words
  for panel in (wide, narrow):                                  # nothing drawn into the margins
    assert (panel[:, :2] == 255).all() and (panel[:, -2:] == 255).all()
  long = visualize.flow_panel(['supercalifragilistic'], 24)    # wider than a line: split
  assert (long[:, -2:] == 255).all() and long.shape[0] > 2 * visualize.flow_panel(['a'], 24).shape[0]


def test_prompt_grid_rows_and_columns():
  n, scale = 3, 3
  records = {k: np.stack([v] * n) for k, v in _record(['a', 'red', 'cone']).items()}
  records['prompt_tokens'][1, 2] = prompts.VOCAB.index('ball')  # another prompt
  rgb = np.full((n, RES, RES, 3), 40, np.uint8)
  grid = pg.make_prompt_grid(records, {'rgb': rgb, 'depth': rgb + 1}, scale, {'rgb': rgb + 2})
  panels = pg.prompt_panels(records, RES * scale)
  assert not np.array_equal(panels[0], panels[1]) and np.array_equal(panels[0], panels[2])
  tile, pad, hp = RES * scale, 2, panels.shape[1]
  margin = grid.shape[1] - (pad + n * (tile + pad))
  assert grid.shape[0] == pad + hp + pad + 3 * (tile + pad) and margin > 20
  body = grid[:, margin:]
  for c in range(n):
    left = pad + c * (tile + pad)
    np.testing.assert_array_equal(body[pad:pad + hp, left:left + tile], panels[c])
    for r, value in enumerate((40, 41, 42)):   # rgb, depth, true/rgb
      top = 2 * pad + hp + r * (tile + pad)
      assert (body[top:top + tile, left:left + tile] == value).all(), (c, r)


def test_pick_seeds_covers_entity_counts():
  seeds = pg.pick_seeds(5, kind=1)
  counts = [len(prompts.caption(s, kind=1).imaged) for s in seeds]
  assert counts == [1, 1, 2, 3, 4] and len(set(seeds)) == 5
  assert pg.pick_seeds(5, kind=1) == seeds                      # the same every time


# ---- the training loop's sample grids of a prompt model -------------------------------------------


def _config(num_steps=2):
  c = config_schema.base_config()
  c.data.name = tfds_prompts.NAME
  c.data.resolution, c.data.global_batch_size = RES, 8
  c.model.patch_size, c.model.hidden_size, c.model.depth, c.model.num_heads = 4, 32, 1, 2
  c.allow_narrow_patch = True
  c.prompt.name = 'unimo'
  c.prompt.vocab_size = 0
  c.prompt.width, c.prompt.depth, c.prompt.heads = 16, 1, 2
  c.prompt.max_tokens, c.prompt.entity_tokens, c.prompt.entity_size = L, R, S
  c.prompt.entity_widths, c.prompt.resampler_depth = (8,), 1
  c.prompt.kind_probs = (0.0, 0.5, 0.5)
  c.sample.num_steps, c.sample.num_images = num_steps, 8
  c.sample.text_scale, c.sample.entity_scale = 2.0, 1.5
  return c


@pytest.fixture(scope='module')
def three_records():
  """A validation split of 3 prompt records (fewer than sample.num_images)."""
  records = [tfds_prompts.render_example(tfds_scenes.seed_for('validation', i), RES, L, R, S)
             for i in range(3)]
  return [{**r, 'rgb': r['rgb'].getvalue()} for r in records]   # PNG bytes, as TFDS reads them


def test_held_out_records_are_the_records_that_exist(three_records, caplog):
  config = _config()
  with caplog.at_level('WARNING'):
    ref = train.held_out_records(config, 8, three_records)
  assert ref['index'].tolist() == [0, 1, 2] and 'valid' not in ref
  assert ref['prompt_tokens'].shape == (3, L) and ref['rgb'].shape == (3, RES, RES, 3)
  assert 'holds 3 records' in caplog.text and 'num_images=8' in caplog.text
  assert train.held_out_records(config, 2, three_records)['index'].tolist() == [0, 1]


@pytest.mark.slow  # a model built and sampled twice: ~9 s with a warm compilation cache
def test_prompt_model_sample_grids_come_from_the_prompts(three_records, monkeypatch):
  config = _config()
  model = build.build_model(config, rngs=nnx.Rngs(0))
  calls = []
  real = samplers.sample

  def spy(*args, **kwargs):
    calls.append(kwargs)
    return real(*args, **kwargs)

  monkeypatch.setattr(samplers, 'sample', spy)
  sample_fn = train.make_sample_fn(config, eval_source=three_records)
  grids = sample_fn(model, jax.random.key(0))
  again = sample_fn(model, jax.random.key(0))
  assert sorted(grids) == ['from_rgb', 'prompt']

  # Sampled from the 3 held-out prompts with the config's guidance, not from labels.
  ref = train.held_out_records(config, 8, three_records)
  prompt_call = calls[0]
  assert prompt_call['y'] is None and prompt_call['shape'][0] == 3
  assert prompt_call['text_scale'] == 2.0 and prompt_call['entity_scale'] == 1.5
  np.testing.assert_array_equal(prompt_call['prompt'].tokens, ref['prompt_tokens'])
  np.testing.assert_array_equal(prompt_call['prompt'].entity_images, ref['entity_images'])
  assert calls[1]['shape'][0] == 3 and 'prompt' not in calls[1]  # RGB -> the rest, 3 records

  # The grid: the prompt panels, then one row per modality; 3 columns, not 8.
  scale, pad = pg.tile_scale(RES), 2
  tile = RES * scale
  panels = pg.prompt_panels(ref, tile)
  assert len({p.tobytes() for p in panels}) == 3                # three different prompts
  grid = grids['prompt']
  margin = grid.shape[1] - (pad + 3 * (tile + pad))
  assert 20 < margin < tile
  assert grid.shape[0] == pad + panels.shape[1] + pad + 4 * (tile + pad)
  for c in range(3):
    left = margin + pad + c * (tile + pad)
    np.testing.assert_array_equal(grid[pad:pad + panels.shape[1], left:left + tile], panels[c])
  np.testing.assert_array_equal(grids['prompt'], again['prompt'])  # same prompts, same noise
  labels = visualize.make_grid({k: np.zeros((3, RES, RES, 3), np.uint8) for k in (
      'input/rgb', 'pred/depth', 'pred/normal', 'pred/segmentation', 'true/depth', 'true/normal',
      'true/segmentation')}, scale=max(1, -(-64 // RES)), labels=True)
  assert grids['from_rgb'].shape == labels.shape                # 3 columns, 7 labelled rows


# ---- the grid of a trained model (prompt_eval --grid) -----------------------------------------


def test_write_grid_shows_prompts_with_1_to_4_imaged_entities_and_their_truth(tmp_path):
  config = _config()
  seen = {}

  def draw(index, records):  # stands in for the model: a grey image per prompt
    seen.update(records)
    n = len(records['prompt_tokens'])
    return {m: np.full((n, RES, RES, c), 0.1 * i, np.float32)
            for i, (m, c) in enumerate((('rgb', 3), ('depth', 1), ('normal', 3),
                                        ('segmentation', 3)))}

  path = tmp_path / 'grid.png'
  grid = pg.write_grid(config, None, str(path), num=4, kind=1, truth=('rgb', 'segmentation'),
                       draw=draw)
  assert path.exists()
  assert seen['entity_is_image'].sum(1).tolist() == [1, 2, 3, 4]   # 1 .. 4 entity images
  seeds = pg.pick_seeds(4, kind=1)
  truth = pg.scene_rows(seeds, config, ('rgb', 'segmentation'))
  scale, pad = pg.tile_scale(RES), 2
  tile = RES * scale
  panels = pg.prompt_panels(seen, tile)
  margin = grid.shape[1] - (pad + 4 * (tile + pad))
  assert grid.shape[0] == pad + panels.shape[1] + pad + 6 * (tile + pad)  # 4 generated, 2 true
  for c in range(4):
    left = margin + pad + c * (tile + pad)
    np.testing.assert_array_equal(grid[pad:pad + panels.shape[1], left:left + tile], panels[c])
    for r, name in enumerate(('rgb', 'segmentation')):
      top = 2 * pad + panels.shape[1] + (4 + r) * (tile + pad)
      np.testing.assert_array_equal(grid[top:top + tile, left:left + tile],
                                    truth[name][c].repeat(scale, 0).repeat(scale, 1))


def test_write_grid_starts_at_first_seed(tmp_path):
  config = _config()
  seen = {}

  def draw(index, records):
    seen.update(records)
    n = len(records['prompt_tokens'])
    return {m: np.zeros((n, RES, RES, c), np.float32)
            for m, c in (('rgb', 3), ('depth', 1), ('normal', 3), ('segmentation', 3))}

  first = pg.prompt_eval.VALIDATION_SEEDS + 500
  pg.write_grid(config, None, str(tmp_path / 'grid.png'), num=4, kind=1, truth=(),
                first_seed=first, draw=draw)
  seeds = pg.pick_seeds(4, kind=1, first_seed=first)
  assert min(seeds) >= first
  want = pg.prompt_eval.scene_records(seeds, RES, kind=1, max_tokens=L, entity_tokens=R,
                                      entity_size=S)
  np.testing.assert_array_equal(seen['prompt_tokens'], want['prompt_tokens'])
