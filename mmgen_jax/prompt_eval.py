r"""Prompt fidelity: do generated images hold the objects a multimodal prompt asks for?

Measured, never read off the generator: every generated object is found in the
generated segmentation and read by the attribute classifier
(models/attribute_classifier.py), a separate network trained on the scenes'
exact ground truth.

Objects (`find_instances`): the connected components (4-connectivity) of each
object class (sphere, box, cylinder, cone) in a segmentation id map, split where
the generated RGB's colour changes (two touching objects of one class), kept when
they cover at least `min_area` pixels (default: prompts.MIN_VISIBLE_FRACTION of
the image, the area below which a prompt does not mention an object; the smaller
ones are counted as `instances_dropped_small`, not silently lost). An object cut
in two by a nearer one counts twice, two touching objects of one class and
colour once: the ground-truth ceiling (`ground_truth_ceiling`, `--ceiling`)
measures how often such things happen. Each object's shape and colour come from
the classifier on its crop of the generated RGB; its horizontal position is its
mask's centroid.

Scores of one prompt (`score_record`), with E_img its entities given as images
and E its mentioned entities (a span in the text):

  entity accuracy   per entity given as an image: some generated object has both
                    its shape and its colour (UNIMO-G's question: did the entity
                    make it into the picture?). Also shape-only and colour-only.
  text alignment    the fraction of the prompt's textual claims that hold:
                    count     the number of objects equals E;
                    colour    per colour word in an entity's phrase, and
                    shape     per shape word (synonyms: prompts' shape words),
                              the object matched to that entity has it;
                    relation  per left/right relation the text states (two
                              objects: 'A left of B' / 'A right of B'; three or
                              more: 'from left to right A, B and C' gives A
                              left of B and B left of C), both entities are
                              found (their matched objects have every attribute
                              known of them, as T2I-CompBench's spatial score
                              asks both objects to be detected) and the objects'
                              centroids are in that order. 'in front of' /
                              'behind' are counted (`relations_unscored`), not
                              scored: they need depth, not the segmentation.
                    Entities are matched one-to-one to objects by how many of
                    their known attributes agree (those named in the text, and
                    shape and colour of entities given as images), ties broken by
                    how many stated relations hold. Sizes are not scored.
  rgb_seg_shape_agreement  per object: the classifier's shape (from the RGB) is the
                    class of its pixels in the generated segmentation (how
                    consistent the generated modalities are; not a prompt score).

Both are reported overall and by the number of mentioned entities 1 .. 4
(`.../n{k}`), as MultiBench reports by number of entities; entity accuracy
averages over image entities, text alignment over prompts.

Reference prompt variants (`placeholder_variant`, `spelled_out_variant`): the same
sentence with every mentioned entity's phrase replaced, scored against the
ORIGINAL record's entities:

  placeholder  the bare article, no image, no attribute words ('a left of a'):
               entity accuracy at chance, the lower reference. This is the
               phrase the prompt model trains on when an imaged entity of a
               kind-1 prompt has its image dropped (condition dropout), so it is
               in distribution; 'an object' would need a word the closed
               vocabulary lacks (pass `words=` once it has one).
  spelled_out  article, colour and shape words, no image: the upper reference
               (what the text alone achieves when it names the attributes).

`evaluate_model` runs the whole evaluation for a checkpoint: prompts of the
validation seeds, sampling with each variant, the scores above, and the scenes
Fréchet distances of the generated modalities (generation_eval's feature path):

  python -m mmgen_jax.prompt_eval --config=configs/unimo_scenes32.py:stage2 \
      --workdir=/tmp/mmgen/unimo2 --classifier=/tmp/mmgen/attribute_classifier

`--ceiling` prints the same scores of the ground-truth renders instead (what object
finding and the classifier lose when the images are perfect).

`--grid=PATH` writes a picture instead (prompt_grid.write_grid): `--num_grid` prompts
of validation scenes with 1 .. 4 entities given as images, each above the RGB,
depth, normals and segmentation generated from it and its true scene:

  python -m mmgen_jax.prompt_eval --config=configs/unimo_scenes32.py:tiny \
      --workdir=/tmp/unimo_tiny --grid=/tmp/unimo_tiny/prompt_grid.png
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import numpy as np
from scipy import optimize
from scipy import sparse
from scipy.sparse import csgraph

from mmgen_jax.data import prompts
from mmgen_jax.data import scenes

OBJECT_CLASSES: tuple[int, ...] = tuple(scenes.SEMANTIC_CLASSES.index(s)
                                        for s in scenes.SCENE_CLASSES)
SHAPE_OFFSET = OBJECT_CLASSES[0]   # semantic id = prompts.SHAPES index + SHAPE_OFFSET
assert OBJECT_CLASSES == tuple(range(SHAPE_OFFSET, SHAPE_OFFSET + len(OBJECT_CLASSES)))
# Chromaticity step between 4-neighbours (and between adjacent pieces' means) above which
# they belong to different objects. In 32 px renders (seeds 1e9 .. 1e9+299) neighbours
# within one object differ by at most 0.007 (99.9th percentile), touching objects of one
# class by at least 0.054 (1st percentile). With Gaussian noise of std 0.04 added to the
# RGB (in [-1, 1]), 0.045 keeps the count accuracy of 150 such scenes at 0.93 (0.98
# without noise), 0.03 drops it to 0.57 (shadowed pieces' means drift apart).
DEFAULT_COLOUR_EDGE = 0.045
VALIDATION_SEEDS = 1_000_000_000   # the scenes datasets' first validation seed
Record = Mapping[str, np.ndarray]
# (rgb (N, H, W, 3) uint8 or [-1, 1], image index (M,), masks (M, H, W)) ->
# (shape ids (M,), colour ids (M,)) into prompts.SHAPES / prompts.COLOURS (-1: none).
Classify = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def default_min_area(resolution: int) -> int:
  """prompts.MIN_VISIBLE_FRACTION of a resolution² image, in pixels, rounded down (prompts
  measure it at scenes.LABEL_RESOLUTION; at 32 px the threshold falls between 5 and 6)."""
  return max(1, int(np.floor(prompts.MIN_VISIBLE_FRACTION * resolution * resolution)))


# ---- objects in a segmentation --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Instances:
  """The objects found in one segmentation map.

  masks (K, H, W) bool; semantic (K,) ids into SEMANTIC_CLASSES; area (K,) pixels;
  centre_x (K,) mask centroid as a fraction of the width (0 left edge, 1 right);
  dropped_small: components below min_area, not kept.
  """
  masks: np.ndarray
  semantic: np.ndarray
  area: np.ndarray
  centre_x: np.ndarray
  dropped_small: int

  def __len__(self) -> int:
    return len(self.masks)


def chromaticity(rgb: np.ndarray) -> np.ndarray:
  """(..., 3) uint8 or [-1, 1] RGB -> rgb / (r + g + b): the colour without its brightness
  (shading and shadows scale an object's pixels, not this)."""
  rgb = np.asarray(rgb)
  x = rgb.astype(np.float64) / 255.0 if rgb.dtype == np.uint8 else (
      np.clip(rgb.astype(np.float64), -1.0, 1.0) + 1.0) / 2.0
  return x / (x.sum(-1, keepdims=True) + 1e-3)


def _neighbour_pairs(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
  """Flat indices (a, b) of every 4-connected pixel pair of an (h, w) image."""
  idx = np.arange(h * w).reshape(h, w)
  a = np.concatenate([idx[:, :-1].ravel(), idx[:-1].ravel()])
  b = np.concatenate([idx[:, 1:].ravel(), idx[1:].ravel()])
  return a, b


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Component label of each of n nodes under the edges (a, b)."""
  graph = sparse.coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
  return csgraph.connected_components(graph, directed=False)[1]


def find_instances(seg_ids: np.ndarray, min_area: int, rgb: np.ndarray | None = None,
                   colour_edge: float = DEFAULT_COLOUR_EDGE) -> Instances:
  """The objects of one image: 4-connected pixels of one object class, and (with `rgb`)
  no colour edge between them, kept when at least `min_area` pixels.

  A colour edge is a chromaticity step above `colour_edge` between two neighbours: two
  touching objects of one class (a fifth of the mentioned objects in 32 px scenes) are
  told apart by their colours. Noise makes such steps inside one object too, so
  adjacent pieces whose mean chromaticities lie within colour_edge are merged again
  (closest first), and a piece still under min_area is merged into the neighbour of its
  class it shares most boundary with; pieces under min_area with no such neighbour are
  dropped and counted. Objects are listed by first pixel in scan order.
  """
  seg_ids = np.asarray(seg_ids)
  if seg_ids.ndim != 2 or not np.issubdtype(seg_ids.dtype, np.integer):
    raise ValueError(f'seg_ids must be an integer (H, W) id map; got {seg_ids.dtype} '
                     f'{seg_ids.shape}.')
  h, w = seg_ids.shape
  if rgb is not None and np.shape(rgb) != (h, w, 3):
    raise ValueError(f'rgb has shape {np.shape(rgb)}; expected {(h, w, 3)} (as seg_ids).')
  seg = seg_ids.ravel()
  is_object = np.isin(seg, OBJECT_CLASSES)
  a, b = _neighbour_pairs(h, w)
  same = is_object[a] & (seg[a] == seg[b])
  a, b = a[same], b[same]
  joined = np.ones(len(a), bool)
  if rgb is not None:
    c = chromaticity(rgb).reshape(-1, 3)
    joined = np.linalg.norm(c[a] - c[b], axis=-1) <= colour_edge
  label = _components(h * w, a[joined], b[joined])
  cut_a, cut_b = label[a[~joined]], label[b[~joined]]

  # Pieces whose MEAN colours agree are one object (noise cuts an object into pieces of
  # its colour): the closest adjacent pair is merged first, until none is within
  # colour_edge, so a region's mean is settled before a doubtful piece joins it.
  if rgb is not None and len(cut_a):
    count = np.bincount(label, minlength=h * w).astype(np.float64)
    total = np.stack([np.bincount(label, c[:, i], minlength=h * w) for i in range(3)], -1)
    pairs = np.unique(np.sort(np.stack([cut_a, cut_b], -1), axis=1), axis=0)
    while len(pairs):
      mean = total[pairs] / count[pairs][..., None]
      d = np.linalg.norm(mean[:, 0] - mean[:, 1], axis=-1)
      i = int(np.argmin(d))
      if d[i] > colour_edge:
        break
      keep, gone = pairs[i]
      label[label == gone] = keep
      count[keep] += count[gone]
      total[keep] += total[gone]
      pairs = np.where(pairs == gone, keep, pairs)
      pairs = np.unique(np.sort(pairs[pairs[:, 0] != pairs[:, 1]], axis=1), axis=0)
    cut_a, cut_b = label[a[~joined]], label[b[~joined]]
    cut_a, cut_b = cut_a[cut_a != cut_b], cut_b[cut_a != cut_b]

  # Small pieces cut off by a colour edge go back to the neighbour they touch most.
  while len(cut_a):
    area = np.bincount(label[is_object], minlength=h * w)
    small = [l for l in np.unique(np.concatenate([cut_a, cut_b])) if area[l] < min_area]
    if not small:
      break
    l = min(small, key=lambda l: (area[l], l))
    other = np.concatenate([cut_b[cut_a == l], cut_a[cut_b == l]])
    other = other[other != l]
    if not len(other):
      break
    into = np.bincount(other).argmax()
    label[label == l] = into
    cut_a, cut_b = np.where(cut_a == l, into, cut_a), np.where(cut_b == l, into, cut_b)
    keep = cut_a != cut_b
    cut_a, cut_b = cut_a[keep], cut_b[keep]

  masks, semantic, dropped = [], [], 0
  for l in _first_seen(label[is_object]):
    m = (label == l) & is_object
    if m.sum() >= min_area:
      masks.append(m.reshape(h, w))
      semantic.append(int(seg[np.argmax(m)]))
    else:
      dropped += 1
  masks = np.asarray(masks, bool).reshape(-1, h, w)
  area = masks.sum((1, 2))
  cols = np.arange(w) + 0.5
  centre_x = (masks.sum(1) * cols).sum(-1) / np.maximum(area, 1) / w
  return Instances(masks, np.asarray(semantic, np.int32), area.astype(np.int64), centre_x,
                   dropped)


def _first_seen(x: np.ndarray) -> np.ndarray:
  """The distinct values of x in order of first appearance."""
  _, first = np.unique(x, return_index=True)
  return x[np.sort(first)]


# ---- classifiers ------------------------------------------------------------------------------


def model_classifier(model: Any, crop_size: int, batch: int = 256) -> Classify:
  """Classify with an attribute_classifier network on crops of `crop_size`."""
  from mmgen_jax.models import attribute_classifier as ac  # pylint: disable=g-import-not-at-top

  def classify(rgb, image_index, masks):
    if not len(masks):
      return np.zeros(0, np.int32), np.zeros(0, np.int32)
    x = np.stack([ac.crop(rgb[i], m, crop_size) for i, m in zip(image_index, masks)])
    return ac.predict(model, x, batch)

  return classify


def load_classifier(path: str) -> tuple[Classify, dict[str, Any]]:
  """(classify, meta) of the attribute classifier saved in `path`."""
  from mmgen_jax.models import attribute_classifier as ac  # pylint: disable=g-import-not-at-top
  model, meta, fingerprint = ac.load(path)
  return model_classifier(model, int(meta['crop_size'])), {**meta, 'fingerprint': fingerprint}


def oracle_classifier(records: Record, min_overlap: float = 0.5) -> Classify:
  """The ground truth as a classifier: an object takes the attributes of the record entity
  whose mask (entity_masks) covers more than `min_overlap` of it, else -1 (for tests and
  the ground-truth ceiling; records batched, (N, E, ...))."""
  ent_masks = np.asarray(records['entity_masks'], bool)
  shapes, colours = np.asarray(records['entity_shape']), np.asarray(records['entity_colour'])

  def classify(rgb, image_index, masks):
    del rgb
    s_out = np.full(len(masks), -1, np.int32)
    c_out = np.full(len(masks), -1, np.int32)
    for j, (i, m) in enumerate(zip(image_index, masks)):
      overlap = (ent_masks[i] & m).sum((1, 2))
      k = int(np.argmax(overlap))
      if overlap[k] > min_overlap * m.sum():
        s_out[j], c_out[j] = shapes[i, k], colours[i, k]
    return s_out, c_out

  return classify


# ---- what a prompt says ---------------------------------------------------------------------


def _shape_words() -> dict[str, int]:
  words = prompts._SHAPE_WORDS  # pylint: disable=protected-access
  return {w: prompts.SHAPES.index(s) for s, ws in words.items() for w in ws}


def words_of(record: Record) -> list[str]:
  """The record's tokens as words (padding dropped; positions are token positions)."""
  return prompts.decode(record['prompt_tokens'], record['prompt_mask'])


def mentioned(record: Record) -> list[int]:
  """Entities with a phrase in the text, in the order of their phrases."""
  spans = np.asarray(record['entity_spans'])
  valid = np.asarray(record['entity_valid'], bool)
  ks = [k for k in range(len(spans)) if valid[k] and spans[k, 1] > spans[k, 0]]
  return sorted(ks, key=lambda k: spans[k, 0])


def named_attributes(record: Record) -> tuple[np.ndarray, np.ndarray]:
  """(shape (E,), colour (E,)) ids named by the words of each entity's phrase, -1 if none."""
  words, spans = words_of(record), np.asarray(record['entity_spans'])
  shape_words = _shape_words()
  shape = np.full(len(spans), -1, np.int32)
  colour = np.full(len(spans), -1, np.int32)
  for k in mentioned(record):
    for w in words[spans[k, 0]:spans[k, 1]]:
      if w in prompts.COLOURS:
        colour[k] = prompts.COLOURS.index(w)
      elif w in shape_words:
        shape[k] = shape_words[w]
  return shape, colour


def _find(words: Sequence[str], phrase: Sequence[str]) -> bool:
  n = len(phrase)
  return any(tuple(words[i:i + n]) == tuple(phrase) for i in range(len(words) - n + 1))


def relations(record: Record) -> tuple[list[tuple[int, int]], int]:
  """([(a, b): entity a is left of entity b in the image], number of depth relations)
  the text states (grammar: the prompts module docstring)."""
  words, spans, ks = words_of(record), np.asarray(record['entity_spans']), mentioned(record)
  outside = [w for i, w in enumerate(words)
             if not any(spans[k, 0] <= i < spans[k, 1] for k in ks)]
  if len(ks) >= 2 and _find(outside, ('from', 'left', 'to', 'right')):
    return list(zip(ks, ks[1:])), 0
  if len(ks) >= 2 and _find(outside, ('from', 'right', 'to', 'left')):
    return [(b, a) for a, b in zip(ks, ks[1:])], 0
  if len(ks) == 2:
    a, b = ks
    between = words[spans[a, 1]:spans[b, 0]]
    if 'left' in between:
      return [(a, b)], 0
    if 'right' in between:
      return [(b, a)], 0
    if 'front' in between or 'behind' in between:
      return [], 1
  return [], 0


# ---- scores of one prompt ---------------------------------------------------------------------


@dataclasses.dataclass
class RecordScore:
  """Binary outcomes of one prompt's checks (lists: one entry per check)."""
  num_entities: int
  entity: list[bool]          # per image entity: shape and colour found
  entity_shape: list[bool]
  entity_colour: list[bool]
  count: bool
  colour: list[bool]
  shape: list[bool]
  relation: list[bool]
  relations_unscored: int
  num_instances: int
  dropped_small: int
  shape_agrees: list[bool] = dataclasses.field(default_factory=list)  # per object: RGB vs seg

  @property
  def text_checks(self) -> list[bool]:
    return [self.count, *self.colour, *self.shape, *self.relation]

  @property
  def text_alignment(self) -> float:
    return float(np.mean(self.text_checks))


MAX_BRUTE_FORCE = 200_000  # assignments tried exhaustively; beyond, Hungarian on attributes


def match(known_shape: np.ndarray, known_colour: np.ndarray, shape: np.ndarray,
          colour: np.ndarray, centre_x: np.ndarray | None = None,
          left_of: Sequence[tuple[int, int]] = ()) -> np.ndarray:
  """Entity -> object index (or -1), one-to-one: most agreeing known attributes first, then
  most stated relations holding (two entities alike in every scored attribute, 'a little red
  cone, a red cone', are told apart by where the text puts them).

  known_*: (n,) entity attributes (-1 unknown); shape, colour, centre_x: (K,) objects';
  left_of: (i, j) entity positions (into known_*), i stated left of j.
  """
  n, k = len(known_shape), len(shape)
  out = np.full(n, -1, np.int64)
  if not n or not k:
    return out
  agree = (((known_shape[:, None] == shape[None]) & (known_shape[:, None] >= 0)).astype(int)
           + ((known_colour[:, None] == colour[None]) & (known_colour[:, None] >= 0)))
  slots = max(n, k)   # objects, then "missing" slots (no agreement, no relation)
  if math.perm(slots, n) > MAX_BRUTE_FORCE:
    rows, cols = optimize.linear_sum_assignment(agree, maximize=True)
    out[rows] = cols
    return out
  perms = np.array(list(itertools.permutations(range(slots), n)), np.int64)  # (P, n)
  padded = np.concatenate([agree, np.zeros((n, slots - k), int)], axis=1)
  score = padded[np.arange(n), perms].sum(1) * (len(left_of) + 1)
  if left_of:
    cx = np.concatenate([np.asarray(centre_x, float), np.full(slots - k, np.nan)])
    for i, j in left_of:
      score += cx[perms[:, i]] < cx[perms[:, j]]   # nan (missing) compares False
  best = perms[int(np.argmax(score))]
  return np.where(best < k, best, -1)


def score_record(inst: Instances, shape: np.ndarray, colour: np.ndarray, record: Record,
                 text: Record | None = None) -> RecordScore:
  """The checks of one generated image against a prompt.

  inst, shape, colour: the image's objects and their classified attributes (K,).
  record: the prompt's entities (entity_valid, entity_is_image, entity_shape,
  entity_colour) whose images are checked. text: the prompt the image was generated
  from, if another variant of `record` (its words and images decide the text checks).
  """
  text = record if text is None else text
  shape, colour = np.asarray(shape), np.asarray(colour)
  true_shape = np.asarray(record['entity_shape'])
  true_colour = np.asarray(record['entity_colour'])
  imaged = [k for k in range(len(true_shape))
            if record['entity_is_image'][k] and record['entity_valid'][k]]
  found_s = [bool(np.any(shape == true_shape[k])) for k in imaged]
  found_c = [bool(np.any(colour == true_colour[k])) for k in imaged]
  found = [bool(np.any((shape == true_shape[k]) & (colour == true_colour[k]))) for k in imaged]

  ks = mentioned(text)
  named_s, named_c = named_attributes(text)
  shown = np.asarray(text['entity_is_image'], bool)
  known_s = np.where(shown, true_shape, named_s)[ks]
  known_c = np.where(shown, true_colour, named_c)[ks]
  rels, unscored = relations(text)
  pos = {e: i for i, e in enumerate(ks)}
  assigned = dict(zip(ks, match(known_s, known_c, shape, colour, inst.centre_x,
                                [(pos[a], pos[b]) for a, b in rels])))
  colour_checks = [bool(assigned[k] >= 0 and colour[assigned[k]] == named_c[k])
                   for k in ks if named_c[k] >= 0]
  shape_checks = [bool(assigned[k] >= 0 and shape[assigned[k]] == named_s[k])
                  for k in ks if named_s[k] >= 0]
  # An entity is found when its object has every attribute known of it (an entity known
  # by nothing, 'a', is any object); a relation holds when both are found, in order.
  found_all = {k: bool(assigned[k] >= 0
                       and (known_s[pos[k]] < 0 or shape[assigned[k]] == known_s[pos[k]])
                       and (known_c[pos[k]] < 0 or colour[assigned[k]] == known_c[pos[k]]))
               for k in ks}
  relation_checks = [bool(found_all[a] and found_all[b]
                          and inst.centre_x[assigned[a]] < inst.centre_x[assigned[b]])
                     for a, b in rels]
  agrees = [bool(s + SHAPE_OFFSET == c) for s, c in zip(shape, inst.semantic)]
  return RecordScore(len(ks), found, found_s, found_c, len(inst) == len(ks), colour_checks,
                     shape_checks, relation_checks, unscored, len(inst), inst.dropped_small,
                     agrees)


# ---- many images ------------------------------------------------------------------------------


def unbatch(records: Record) -> list[dict[str, np.ndarray]]:
  """Batched contract fields (N, ...) -> N records."""
  n = len(records['prompt_tokens'])
  return [{k: np.asarray(v)[i] for k, v in records.items()} for i in range(n)]


def score_images(rgb: np.ndarray, seg_ids: np.ndarray, records: Record, classify: Classify, *,
                 texts: Record | None = None, min_area: int | None = None,
                 colour_edge: float | None = DEFAULT_COLOUR_EDGE) -> list[RecordScore]:
  """Scores of N generated images against N prompts (batched contract fields).

  rgb: (N, H, W, 3) uint8 or in [-1, 1]; seg_ids: (N, H, W) semantic ids (generated, or
  an RGB -> segmentation pass); texts: the prompts actually given, when a variant;
  colour_edge: see find_instances (None: segmentation components alone).
  """
  rgb, seg_ids = np.asarray(rgb), np.asarray(seg_ids)
  n = len(rgb)
  if seg_ids.shape != rgb.shape[:3] or len(records['prompt_tokens']) != n:
    raise ValueError(f'rgb {rgb.shape}, seg_ids {seg_ids.shape} and {len(records["prompt_tokens"])}'
                     ' records must agree: (N, H, W, 3), (N, H, W) and N.')
  min_area = default_min_area(rgb.shape[1]) if min_area is None else int(min_area)
  found = [find_instances(s, min_area, None if colour_edge is None else x, colour_edge or 0.0)
           for s, x in zip(seg_ids, rgb)]
  index = np.concatenate([np.full(len(f), i) for i, f in enumerate(found)]).astype(np.int64)
  masks = np.concatenate([f.masks for f in found])
  shape, colour = classify(rgb, index, masks)
  recs = unbatch(records)
  txts = recs if texts is None else unbatch(texts)
  return [score_record(f, shape[index == i], colour[index == i], recs[i], txts[i])
          for i, f in enumerate(found)]


def _mean(xs: Sequence[bool]) -> float:
  return float(np.mean(xs))


def aggregate(scores: Sequence[RecordScore], prefix: str = '') -> dict[str, float]:
  """Means overall and by number of mentioned entities (`/n{k}`); a group with no check
  has no key (its `num_...` says so)."""
  out: dict[str, float] = {}
  groups = {'': list(scores)}
  for k in sorted({s.num_entities for s in scores}):
    groups[f'/n{k}'] = [s for s in scores if s.num_entities == k]
  for suffix, group in groups.items():
    ent = [e for s in group for e in s.entity]
    out[f'{prefix}num_prompts{suffix}'] = float(len(group))
    out[f'{prefix}num_image_entities{suffix}'] = float(len(ent))
    if ent:
      out[f'{prefix}entity_acc{suffix}'] = _mean(ent)
    if group:
      out[f'{prefix}text_alignment{suffix}'] = float(np.mean([s.text_alignment for s in group]))
  everything = list(scores)
  stems = {'entity_shape': 'entity_shape', 'entity_colour': 'entity_colour', 'colour': 'colour',
           'shape': 'shape', 'relation': 'relation', 'shape_agrees': 'rgb_seg_shape_agreement'}
  for name, stem in stems.items():
    checks = [c for s in everything for c in getattr(s, name)]
    out[f'{prefix}num_{stem}_checks'] = float(len(checks))
    if checks:
      out[f'{prefix}{stem}' if name == 'shape_agrees' else f'{prefix}{stem}_acc'] = _mean(checks)
  if everything:
    out[f'{prefix}count_acc'] = _mean([s.count for s in everything])
    out[f'{prefix}mean_instances'] = float(np.mean([s.num_instances for s in everything]))
  out[f'{prefix}relations_unscored'] = float(sum(s.relations_unscored for s in everything))
  out[f'{prefix}instances_dropped_small'] = float(sum(s.dropped_small for s in everything))
  return out


# ---- prompt variants ----------------------------------------------------------------------------


def rewrite_phrases(record: Record, phrase: Callable[[int], Sequence[str]]) -> dict[str, np.ndarray]:
  """The record with each mentioned entity's phrase (with its '<ent>' slots) replaced by
  `phrase(k)` (words, no images): text-only, the rest of the sentence, the entities'
  masks and attributes unchanged; prompt_kind 0."""
  words, spans, ks = words_of(record), np.asarray(record['entity_spans']), mentioned(record)
  max_tokens = len(record['prompt_tokens'])
  new_words: list[str] = []
  new_spans = np.zeros_like(spans)
  pos = 0
  for k in ks:
    new_words += words[pos:spans[k, 0]]
    start = len(new_words)
    new_words += list(phrase(k))
    new_spans[k] = (start, len(new_words))
    pos = spans[k, 1]
  new_words += words[pos:]
  unknown = [w for w in new_words if w not in prompts.VOCAB]
  if unknown:
    raise ValueError(f'rewritten prompt holds words outside prompts.VOCAB: {unknown}.')
  tokens, mask = prompts.encode_words(new_words, max_tokens)
  out = {k: np.array(v) for k, v in record.items()}
  out.update(prompt_tokens=tokens, prompt_mask=mask,
             prompt_entity=np.zeros(max_tokens, np.int32), entity_spans=new_spans,
             entity_is_image=np.zeros_like(np.asarray(record['entity_is_image'])),
             entity_images=np.zeros_like(np.asarray(record['entity_images'])),
             prompt_kind=np.int32(0))
  return out


def placeholder_variant(record: Record, words: Sequence[str] = ('a',)) -> dict[str, np.ndarray]:
  """Every mentioned entity as `words` (default the bare article; module docstring)."""
  return rewrite_phrases(record, lambda k: tuple(words))


def spelled_out_variant(record: Record) -> dict[str, np.ndarray]:
  """Every mentioned entity as 'a(n) <colour> <shape>' from its attributes, no image."""

  def phrase(k):
    c, s = int(record['entity_colour'][k]), int(record['entity_shape'][k])
    if c < 0 or s < 0:
      raise ValueError(f'entity {k} has no attributes (shape {s}, colour {c}) to spell out.')
    colour = prompts.COLOURS[c]
    return ('an' if colour[0] in 'aeiou' else 'a', colour, prompts.SHAPES[s])

  return rewrite_phrases(record, phrase)


VARIANTS: dict[str, Callable[[Record], Record] | None] = {
    'prompt': None, 'placeholder': placeholder_variant, 'spelled_out': spelled_out_variant}


def variant_batch(records: Record, name: str) -> dict[str, np.ndarray]:
  """Batched records (N, ...) rewritten by the variant `name` (VARIANTS)."""
  if name not in VARIANTS:
    raise KeyError(f'unknown prompt variant {name!r}; variants are {list(VARIANTS)}.')
  fn = VARIANTS[name]
  if fn is None:
    return {k: np.asarray(v) for k, v in records.items()}
  rows = [fn(r) for r in unbatch(records)]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


# ---- prompts of the scenes ----------------------------------------------------------------------


def scene_records(seeds: Sequence[int], resolution: int, *, kind: int | None = 1,
                  max_tokens: int = 48, entity_tokens: int = 4, entity_size: int = 32,
                  with_scene: bool = False) -> dict[str, np.ndarray]:
  """Batched prompt records (N, ...) of scenes `seeds` (prompts.example_fields); kind 1
  by default (imaged entities shown by their image alone: entity accuracy then measures
  what the images convey). with_scene adds the render's rgb and segmentation."""
  rows = []
  for seed in seeds:
    out = scenes.render_scene(int(seed), resolution, with_instances=True)
    row = prompts.example_fields(int(seed), resolution, max_tokens=max_tokens,
                           entity_tokens=entity_tokens, entity_size=entity_size, kind=kind,
                           instance=out['instance'])
    if with_scene:
      row.update(rgb=out['rgb'], segmentation=out['segmentation'])
    row['seed'] = np.int64(seed)
    rows.append(row)
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def ground_truth_ceiling(records: Record, classify: Classify | None = None,
                         min_area: int | None = None) -> dict[str, float]:
  """The scores of the records' own renders (rgb, segmentation in `records`): with the
  oracle classifier, what object finding alone loses (split or merged objects,
  centroids at another resolution); with a trained classifier, its errors too."""
  classify = oracle_classifier(records) if classify is None else classify
  return aggregate(score_images(records['rgb'], records['segmentation'], records, classify,
                                min_area=min_area))


# ---- the whole evaluation of a model -------------------------------------------------------------


def _image_modality(mods, encoding: str, what: str):
  found = [m for m in mods if m.encoding == encoding]
  if not found:
    raise ValueError(f'prompt evaluation needs a generated {what} (a modality with encoding '
                     f'{encoding!r}); the config has {[(m.name, m.encoding) for m in mods]}.')
  return found[0]


def make_prompt_sampler(config: Any, model: Any, mesh: Any, codec: Any, batch: int
                        ) -> Callable[[int, Record], dict[str, Any]]:
  """(batch index, `batch` prompt records) -> {image modality: (batch, H, W, C) decoded pixels,
  global arrays}. The noise of batch b comes from (config.seed, b) alone, so every prompt
  variant of a batch starts from the same noise (paired comparisons)."""
  import jax  # pylint: disable=g-import-not-at-top
  from mmgen_jax import modalities as modalities_lib  # pylint: disable=g-import-not-at-top
  from mmgen_jax import parallel  # pylint: disable=g-import-not-at-top
  from mmgen_jax.diffusion import samplers  # pylint: disable=g-import-not-at-top
  from mmgen_jax.models import prompt_encoder as prompt_lib  # pylint: disable=g-import-not-at-top
  mods = modalities_lib.from_config(config.modalities)
  sharding = parallel.batch_sharding(mesh, config.sharding_rules)
  settings = {**samplers.settings_from_config(config), 'cfg_scale': 1.0,  # a prompt, no label
              **samplers.prompt_settings_from_config(config)}
  shape = codec.model_shape(batch, int(config.data.resolution))
  sample = jax.jit(lambda m, key, prompt: samplers.sample(
      m, key, mods=mods, shape=shape, channels=codec.model_channels(), y=None,
      num_classes=int(config.data.num_classes), prompt=prompt, **settings),
                   out_shardings=sharding)
  key = jax.random.fold_in(jax.random.key(int(config.seed), impl=config.train.rng_impl), 11)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

  def draw(index: int, records: Record) -> dict[str, Any]:
    prompt = prompt_lib.Prompt(tokens=put(records['prompt_tokens']),
                               mask=put(records['prompt_mask']),
                               entity=put(records['prompt_entity']),
                               entity_images=put(records['entity_images']))
    with jax.set_mesh(mesh):
      return codec.decode(sample(model, jax.random.fold_in(key, index), prompt))

  return draw


def evaluate_model(config: Any, workdir: str | None, classifier: str | Classify, *,
                   num_prompts: int = 200, batch: int | None = None, kind: int = 1,
                   variants: Sequence[str] = tuple(VARIANTS), scenes_fd: bool = True,
                   model: Any = None, mesh: Any = None, extractor: Any = None,
                   first_seed: int = VALIDATION_SEEDS,
                   draw: Callable[[int, Record], Mapping[str, Any]] | None = None,
                   reference: Any = None) -> dict[str, float]:
  """The prompt evaluation of a checkpoint: {metric: value}, keys eval/prompt/...

  Prompts: those of scenes first_seed ... + num_prompts − 1 (default the validation
  seeds, never trained on), of `kind` (1: imaged entities shown by their image alone),
  at config.data.resolution with config.prompt's L, R, S; each variant of `variants`
  (VARIANTS) sampled with the same noise, `batch` prompts at a time (default
  config.eval.gen.batch), with config.sample's sampler and prompt guidance. Per variant:
  entity accuracy and text alignment overall and by number of entities
  (`eval/prompt/<variant>/...`, see `aggregate`), scored against the ORIGINAL prompt's
  entities; with scenes_fd, the scenes Fréchet distance of each generated image
  modality against the real images of config.eval.gen.reference_split
  (`eval/prompt/<variant>/scenes_fd/<modality>`, generation_eval's feature networks
  and reference cache; the network of config.eval.gen.scenes_features, trained on first
  use). The model is restored from `workdir` (evaluate.restore_for_inference) unless
  given; `classifier` is an attribute_classifier directory or a Classify function;
  `draw` replaces the sampler (make_prompt_sampler's signature; records carry 'seed'),
  `extractor` and `reference` generation_eval's feature networks and real statistics.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from mmgen_jax import codec as codec_lib  # pylint: disable=g-import-not-at-top
  from mmgen_jax import generation_eval as ge  # pylint: disable=g-import-not-at-top
  from mmgen_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from mmgen_jax import modalities as modalities_lib  # pylint: disable=g-import-not-at-top
  from mmgen_jax import parallel  # pylint: disable=g-import-not-at-top
  from mmgen_jax.data import palettes  # pylint: disable=g-import-not-at-top

  if not config.prompt.name:
    raise ValueError('prompt evaluation needs a model with a prompt encoder: config.prompt.name '
                     "is '' (see configs/unimo_scenes32.py).")
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown or not variants:
    raise ValueError(f'variants={list(variants)}: choose from {list(VARIANTS)}.')
  if model is None and draw is None:
    from mmgen_jax import evaluate  # pylint: disable=g-import-not-at-top
    model, step, mesh = evaluate.restore_for_inference(config, workdir)
  else:
    step = 0
  batch = int(batch or config.eval.gen.batch)
  classify, classifier_meta = ((classifier, {}) if callable(classifier)
                               else load_classifier(str(classifier)))
  images = modalities_lib.images(modalities_lib.from_config(config.modalities))
  rgb_m = _image_modality(images, 'rgb', 'RGB image')
  seg_m = _image_modality(images, 'segmentation', 'segmentation')
  resolution = int(config.data.resolution)
  records = scene_records(range(first_seed, first_seed + num_prompts), resolution, kind=kind,
                          max_tokens=int(config.prompt.max_tokens),
                          entity_tokens=int(config.prompt.entity_tokens),
                          entity_size=int(config.prompt.entity_size))
  if draw is None:
    ways = parallel.batch_ways(mesh, config.sharding_rules)
    if batch < 1 or batch % ways:
      raise ValueError(f'prompt evaluation batch={batch} must be a positive multiple of the '
                       f'{ways} ways the batch is split over the mesh.')
    draw = make_prompt_sampler(config, model, mesh, codec_lib.from_config(config, mesh), batch)
  if scenes_fd and extractor is None:
    extractor = ge.make_extractor(config, workdir or '', mesh)
  gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))

  results: dict[str, float] = {'eval/prompt/step': float(step),
                               'eval/prompt/num_prompts': float(num_prompts),
                               'eval/prompt/kind': float(kind)}
  for name, value in classifier_meta.get('held_out', {}).items():
    results[f'eval/prompt/classifier/{name}'] = float(value)
  batches_per_variant = -(-num_prompts // batch)
  total, done, start = batches_per_variant * len(variants), 0, time.time()
  for variant in variants:
    texts = variant_batch(records, variant)
    rgb, seg, feats = [], [], {}
    for b, first in enumerate(range(0, num_prompts, batch)):
      idx = np.arange(first, first + batch) % num_prompts   # the last batch wraps around
      out = draw(b, {k: v[idx] for k, v in texts.items()})   # texts hold 'seed' too
      keep = slice(0, min(batch, num_prompts - first))
      rgb.append(gather(ge.to_data_format(out[rgb_m.name], rgb_m))[keep])
      seg.append(palettes.ids_from_colors(gather(out[seg_m.name]), seg_m.palette)[keep])
      if scenes_fd and extractor is not None and extractor.keys:
        for k, v in extractor.fn({m.name: out[m.name] for m in images}).items():
          if k.startswith('scenes/'):
            feats.setdefault(k, []).append(gather(v)[keep])
      done += 1
      rate = done * batch / (time.time() - start)
      logging.info('prompt evaluation: %s batch %d/%d (%d of %d batches), %.2f samples/s, '
                   'ETA %.0f s', variant, b + 1, batches_per_variant, done, total, rate,
                   (total - done) * batch / rate)
    scores = score_images(np.concatenate(rgb), np.concatenate(seg), records, classify,
                          texts={k: v for k, v in texts.items() if k != 'seed'})
    results.update(aggregate(scores, prefix=f'eval/prompt/{variant}/'))
    if feats:
      if reference is None:
        reference = ge.load_reference(config, workdir or '', extractor, mesh)
      for k, parts in feats.items():
        results[f'eval/prompt/{variant}/scenes_fd/{k.split("/", 1)[1]}'] = (
            metrics_lib.frechet_distance(*metrics_lib.feature_statistics(np.concatenate(parts)),
                                         *reference.stats[k]))
  return results


def main(argv: Sequence[str]) -> None:
  del argv
  import json  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if f.first_prompt < 0:
    raise ValueError(f'--first_prompt={f.first_prompt}: must be >= 0.')
  first_seed = VALIDATION_SEEDS + f.first_prompt
  if f.grid:
    from mmgen_jax import prompt_grid  # pylint: disable=g-import-not-at-top
    prompt_grid.write_grid(f.config, f.workdir, f.grid, num=f.num_grid, kind=f.kind,
                           truth=f.grid_truth, first_seed=first_seed)
    print(f'wrote {f.grid}')
    return
  if f.ceiling:
    records = scene_records(range(first_seed, first_seed + f.num_prompts),
                            f.resolution, kind=f.kind, with_scene=True)
    out = {'oracle': ground_truth_ceiling(records)}
    if f.classifier:
      out['classifier'] = ground_truth_ceiling(records, load_classifier(f.classifier)[0])
    print(json.dumps(out, indent=1))
    return
  results = evaluate_model(f.config, f.workdir, f.classifier, num_prompts=f.num_prompts,
                           batch=f.batch or None, kind=f.kind, variants=f.variants,
                           scenes_fd=f.scenes_fd, first_seed=first_seed)
  results['eval/prompt/first_prompt'] = float(f.first_prompt)
  block = f'_from{f.first_prompt}' if f.first_prompt else ''  # one file per block of prompts
  path = (epath.Path(f.workdir) / 'eval' /
          f'prompt_eval_{int(results["eval/prompt/step"]):06d}{block}.json')
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(results, indent=1))
  print(json.dumps(results, indent=1))
  print(f'wrote {path}')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Experiment config (a prompt model).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Its workdir (latest checkpoint; the scores go to '
                      '<workdir>/eval/prompt_eval_<step>[_from<first_prompt>].json).')
  flags.DEFINE_string('classifier', None, 'Attribute classifier directory (python -m '
                      'mmgen_jax.models.attribute_classifier --out=DIR).')
  flags.DEFINE_integer('num_prompts', 200, 'Validation scenes whose prompts are evaluated.')
  flags.DEFINE_integer('first_prompt', 0, 'Index of the first of them among the validation '
                       'scenes (another set of prompts, e.g. to check settings chosen on one); '
                       'also where --grid and --ceiling start.')
  flags.DEFINE_integer('batch', 0, 'Prompts per sampling batch (0: config.eval.gen.batch).')
  flags.DEFINE_integer('kind', 1, 'Prompt kind: 0 text only, 1 imaged entities without '
                       'words, 2 with words.')
  flags.DEFINE_list('variants', list(VARIANTS), 'Prompt variants to sample.')
  flags.DEFINE_bool('scenes_fd', True, 'Also the scenes Fréchet distance per modality.')
  flags.DEFINE_bool('ceiling', False, 'Print the scores of the ground-truth renders instead '
                    '(oracle, and --classifier if given); no model.')
  flags.DEFINE_integer('resolution', 32, 'With --ceiling: the render resolution.')
  flags.DEFINE_string('grid', None, 'Write the prompt grid (PNG) of the model here instead of '
                      'evaluating: each column a prompt (words and entity images), the '
                      'generated modalities, the ground truth (prompt_grid.write_grid).')
  flags.DEFINE_integer('num_grid', 8, 'With --grid: prompts (columns), with 1, 2, 3, 4 entities '
                       'given as images (--kind).')
  flags.DEFINE_list('grid_truth', ['rgb'], "With --grid: ground-truth rows ('true/<modality>'); "
                    'empty for none.')
  app.run(main)
