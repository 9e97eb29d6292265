"""Display helpers and segmentation palettes."""

import numpy as np
import pytest
from PIL import Image

from mmgen_jax import visualize
from mmgen_jax.data import palettes, scenes

VIRIDIS_LOW, VIRIDIS_HIGH = (0x44, 0x01, 0x54), (0xfd, 0xe7, 0x25)


# ---- palettes --------------------------------------------------------------------------------

def test_scenes_palette_has_one_distinct_colour_per_class():
  pal = palettes.get('scenes')
  assert pal.dtype == np.uint8 and pal.shape == (len(scenes.SEMANTIC_CLASSES), 3)
  d = np.linalg.norm(pal[:, None].astype(float) - pal[None].astype(float), axis=-1)
  assert d[~np.eye(len(pal), dtype=bool)].min() > 200   # far apart: robust decoding


def test_unknown_palette_lists_the_names():
  with pytest.raises(KeyError, match='scenes'):
    palettes.get('nope')


def test_colorize_and_decode_round_trip_from_uint8_and_model_space():
  ids = np.arange(len(scenes.SEMANTIC_CLASSES)).repeat(3).reshape(1, 3, -1)
  colours = palettes.colorize(ids, 'scenes')
  assert colours.shape == ids.shape + (3,) and colours.dtype == np.uint8
  np.testing.assert_array_equal(palettes.ids_from_colors(colours, 'scenes'), ids)
  model_space = colours.astype(np.float32) / 127.5 - 1.0
  noisy = model_space + np.random.default_rng(0).normal(0, 0.2, model_space.shape)
  np.testing.assert_array_equal(palettes.ids_from_colors(noisy, 'scenes'), ids)


def test_colorize_names_the_out_of_range_id():
  with pytest.raises(ValueError, match='max id 9'):
    palettes.colorize(np.array([0, 9]), 'scenes')


def test_ids_from_colors_refuses_ambiguous_input():
  with pytest.raises(TypeError, match='uint8'):
    palettes.ids_from_colors(np.zeros((2, 3), np.int32), 'scenes')
  with pytest.raises(ValueError, match='3 channels'):
    palettes.ids_from_colors(np.zeros((2, 4), np.uint8), 'scenes')


# ---- colour maps -----------------------------------------------------------------------------

def test_depth_colour_map_endpoints_and_range():
  depth = np.linspace(1.0, 5.0, 12).reshape(3, 4)
  rgb = visualize.depth_to_rgb(depth)
  assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
  assert tuple(rgb[0, 0]) == VIRIDIS_HIGH     # nearest is bright
  assert tuple(rgb[-1, -1]) == VIRIDIS_LOW    # farthest is dark
  fixed = visualize.depth_to_rgb(np.full((2, 2, 1), 3.0), vmin=1.0, vmax=5.0)
  assert fixed.shape == (2, 2, 3)
  np.testing.assert_array_equal(fixed[0, 0], visualize.colormap(np.float32(0.5)))


def test_colormap_is_monotonic_in_lightness():
  rgb = visualize.colormap(np.linspace(0, 1, 64)).astype(float)
  luma = rgb @ np.array([0.2126, 0.7152, 0.0722])
  assert np.all(np.diff(luma) > 0)


def test_normal_and_segmentation_maps():
  n = np.array([[[-1.0, 0.0, 1.0]]])
  np.testing.assert_array_equal(visualize.normal_to_rgb(n), [[[0, 128, 255]]])
  seg = visualize.segmentation_to_rgb(np.array([[3, 1]]), 'scenes')
  np.testing.assert_array_equal(seg[0], palettes.get('scenes')[[3, 1]])


@pytest.mark.parametrize('encoding,channels', [('rgb', 3), ('depth', 1), ('normal', 3),
                                               ('segmentation', 3)])
def test_modality_to_rgb_any_encoding(encoding, channels):
  x = np.random.default_rng(0).uniform(-1.2, 1.2, (2, 8, 8, channels)).astype(np.float32)
  rgb = visualize.modality_to_rgb(x, encoding)
  assert rgb.shape == (2, 8, 8, 3) and rgb.dtype == np.uint8
  ones = visualize.modality_to_rgb(np.ones((1, 1, channels), np.float32), encoding)
  expected = VIRIDIS_LOW if encoding == 'depth' else (255, 255, 255)   # +1: far / white
  assert tuple(ones[0, 0]) == expected


def test_modality_to_rgb_segmentation_shows_palette_colours_as_is():
  ids = np.array([[0, 3, 6]])
  model_space = palettes.colorize(ids, 'scenes').astype(np.float32) / 127.5 - 1.0
  np.testing.assert_array_equal(visualize.modality_to_rgb(model_space, 'segmentation'),
                                palettes.colorize(ids, 'scenes'))


def test_modality_to_rgb_rejects_unknown_encoding():
  with pytest.raises(ValueError, match='label'):
    visualize.modality_to_rgb(np.zeros((4, 4, 3)), 'label')


# ---- grids and files -------------------------------------------------------------------------

def test_make_grid_layout():
  n, h, w, pad = 3, 4, 5, 2
  rows = {'a': np.full((n, h, w, 3), 10, np.uint8), 'b': np.full((n, h, w, 3), 20, np.uint8)}
  rows['b'][2] = 30
  grid = visualize.make_grid(rows, pad=pad)
  assert grid.shape == (pad + 2 * (h + pad), pad + n * (w + pad), 3)
  assert np.all(grid[:pad] == 255) and np.all(grid[:, :pad] == 255)
  assert np.all(grid[pad:pad + h, pad:pad + w] == 10)                   # row a, column 0
  top, left = pad + (h + pad), pad + 2 * (w + pad)
  assert np.all(grid[top:top + h, left:left + w] == 30)                 # row b, column 2
  assert np.all(grid[top:top + h, left - pad:left] == 255)              # gap between tiles


def test_make_grid_names_the_mismatched_row():
  rows = {'rgb': np.zeros((2, 4, 4, 3), np.uint8), 'depth': np.zeros((3, 4, 4, 3), np.uint8)}
  with pytest.raises(ValueError, match="'depth'"):
    visualize.make_grid(rows)


def test_save_png_round_trip(tmp_path):
  image = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
  path = tmp_path / 'sub' / 'grid.png'
  visualize.save_png(path, image)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
  with pytest.raises(ValueError, match='uint8'):
    visualize.save_png(tmp_path / 'x.png', image.astype(np.float32))


def test_scene_grid_end_to_end(tmp_path):
  outs = [scenes.render_scene(s, 32) for s in range(4)]
  rows = {
      'rgb': np.stack([o['rgb'] for o in outs]),
      'depth': np.stack([visualize.depth_to_rgb(o['depth']) for o in outs]),
      'normal': np.stack([visualize.normal_to_rgb(o['normal']) for o in outs]),
      'segmentation': np.stack([visualize.segmentation_to_rgb(o['segmentation']) for o in outs]),
  }
  grid = visualize.make_grid(rows)
  assert grid.shape == (2 + 4 * 34, 2 + 4 * 34, 3)
  visualize.save_png(tmp_path / 'scenes.png', grid)
  assert (tmp_path / 'scenes.png').stat().st_size > 1000


def test_make_grid_scales_tiles_and_labels_rows():
  n, h, w, pad, scale = 2, 4, 5, 2, 3
  rows = {'rgb': np.full((n, h, w, 3), 10, np.uint8), 'pred/depth': np.full((n, h, w, 3), 20, np.uint8)}
  rows['rgb'][0, 0, 0] = 200                                             # one marked pixel
  plain = visualize.make_grid(rows, pad=pad, scale=scale)
  assert plain.shape == (pad + 2 * (h * scale + pad), pad + n * (w * scale + pad), 3)
  # Nearest-neighbour enlargement: the marked pixel becomes a scale × scale block.
  assert np.all(plain[pad:pad + scale, pad:pad + scale] == 200)
  assert np.all(plain[pad + scale, pad:pad + scale] == 10)

  labelled = visualize.make_grid(rows, pad=pad, scale=scale, labels=True)
  margin = labelled.shape[1] - plain.shape[1]
  assert labelled.shape[0] == plain.shape[0] and margin > 20              # room for 'pred/depth'
  np.testing.assert_array_equal(labelled[:, margin:], plain)             # tiles untouched
  ink = labelled[:, :margin].min(axis=(1, 2)) < 128                      # rows of text pixels
  row_of = lambda y: (y - pad) // (h * scale + pad)
  assert {row_of(y) for y in np.flatnonzero(ink)} == {0, 1}             # each row has its label
  with pytest.raises(ValueError, match='scale'):
    visualize.make_grid(rows, scale=0)
