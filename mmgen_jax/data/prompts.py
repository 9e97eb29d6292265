"""Multimodal prompts for the procedural scenes: captions with images of their objects.

A prompt describes a scene in words from a closed vocabulary, and may show some of
its objects as pictures instead of (kind 1) or besides (kind 2) their words, as in
UNIMO-G: "a small red cone <ent> <ent> <ent> <ent> left of a blue sphere, on a
checkered floor". Everything here is a pure function of the scene's seed.

Vocabulary and attributes
-------------------------
* `VOCAB`: the closed word list (ids are positions; `PAD_ID` 0, `UNK_ID`, `ENT_ID`).
  Its order is frozen: new words are only appended, so token ids stay valid.
* `SHAPES` = scenes.SCENE_CLASSES. `COLOURS`: names for the object albedos. The
  sampler (scenes._random_colour, saturation 0.55-0.9, value 0.6-0.95, uniform hue)
  only makes bright saturated colours, so the names are hue bins of the albedo in
  display (sRGB) space; shading scales linear RGB and keeps that hue. White, grey,
  black and brown never occur and are not names. Over the 7,237 objects of seeds
  0..2999 the names split red 8.0 %, orange 8.7, yellow 9.0, lime 8.2, green 16.5,
  cyan 9.6, blue 15.6, purple 11.1, pink 13.3 (the hue is uniform, so a share is its
  bin's width: green and blue are wider because their hues look alike longer).
  A hue within a few degrees of a bin edge is borderline whatever the names.
* Size: 'small' / 'large' when the object's volume lies in the bottom / top third
  for its shape (thresholds measured over placed objects, `_SIZE_TERCILES`); no
  size word in between.

Caption grammar (`caption`, `example_fields`)
---------------------------------------------
    phrase    = article [size] colour shape [<ent> * R]     (kind 1, imaged: article <ent> * R)
    1 object  = phrase
    2 objects = phrase REL phrase          REL from image positions: 'left of', 'to the left
                                           of', 'right of', ...; 'in front of' / 'behind' when
                                           their visible centroids are within TIE_FRACTION
    3+        = 'from left to right' phrase , phrase and phrase   (or right to left, the
                                           direction phrase first or last)
    background= 'on a checkered floor' [, 'in front of a wall' | 'under the sky'], at the end,
                at the start, or left out; the wall/sky clause goes first when a prompt
                would exceed L tokens, then the floor clause (objects are never left out).
Synonyms (ball, block, column, big, little, tiled, ...) and the order of the two
objects of a pair vary per prompt. Positions, visibility and relations are
measured at scenes.LABEL_RESOLUTION, so a seed's caption does not depend on the
resolution it is rendered at. Objects covering less than MIN_VISIBLE_FRACTION of
the image are not mentioned.

Prompt kinds: 0 text only; 1 imaged objects lose their words ('a <ent>...');
2 imaged objects keep them. In kinds 1 and 2 every mentioned object is imaged with
probability 1/2, at least one, the same objects for both kinds. The batch contract
(keys, shapes, dtypes) is `field_specs`; horizontal flips swap 'left' and 'right'
(`hflip_tokens`).

Scenes records (`record_fields`, tfds_prompts) keep the prompt of all three kinds
(the text fields with a leading axis of 3, the same words in each) and the seed's
own `drawn_kind`; the pipeline picks one per example (`select_kind`), drawn from
config.prompt.kind_probs, so a run chooses its mix of kinds without a rebuild.

Real data
---------
A record of real images holds the usual image fields and ONE prompt under the
contract keys (`field_specs`; no `drawn_kind`), which the pipeline passes as it is.
`real_example_fields` makes them from what a grounding pipeline gives:

    caption           str              free text; words outside VOCAB become '<unk>'
    entity_char_spans int (E, 2)       [start, end) characters of each entity's phrase
                                       in `caption` (e.g. Grounding DINO's phrase-to-box
                                       output); (0, 0) = not mentioned
    entity_masks      bool (E, H, W)   its mask in the target image (e.g. SAM prompted by
                                       the box; with boxes only, the filled box)
    entity_images     uint8 (E, S, S, 3) the entity from ANOTHER image of it (a crop of the
                                       target invites copy-paste), background removed by
                                       its mask; zeros when not shown as an image
    entity_is_image   bool (E,)
    kind              int              1 if the imaged phrases were reduced to 'a', else 2
                                       (0 when nothing is imaged)
    entity_shape / entity_colour int32 (E,), -1 where unknown (no attribute supervision)

`encode_caption` inserts the R '<ent>' slots after each imaged entity's phrase and
returns the token fields and spans.
"""

from __future__ import annotations

import colorsys
import dataclasses
import re
from typing import Any, Sequence

import numpy as np

from mmgen_jax.data import scenes

# ---- vocabulary -----------------------------------------------------------------------------

MAX_ENTITIES = scenes.MAX_OBJECTS
SHAPES: tuple[str, ...] = scenes.SCENE_CLASSES
COLOURS: tuple[str, ...] = ('red', 'orange', 'yellow', 'lime', 'green', 'cyan', 'blue',
                            'purple', 'pink')
# Upper hue edges (degrees, sRGB HSV) of COLOURS; red also takes [345, 360).
_HUE_EDGES = (15.0, 45.0, 75.0, 105.0, 165.0, 200.0, 255.0, 300.0, 345.0)
SIZES: tuple[str, ...] = ('small', 'large')
# Volume terciles per shape over placed objects (seeds 0..5999, ~3,600 objects per shape).
_SIZE_TERCILES = {'sphere': (0.411, 0.681), 'box': (0.459, 0.633),
                  'cylinder': (0.402, 0.603), 'cone': (0.435, 0.596)}

_SHAPE_WORDS = {'sphere': ('sphere', 'ball'), 'box': ('box', 'block'),
                'cylinder': ('cylinder', 'column'), 'cone': ('cone',)}
_SIZE_WORDS = {'small': ('small', 'little'), 'large': ('large', 'big')}
_LEFT = (('left', 'of'), ('to', 'the', 'left', 'of'))
_RIGHT = (('right', 'of'), ('to', 'the', 'right', 'of'))
_FLOOR = (('on', 'a', 'checkered', 'floor'), ('on', 'a', 'tiled', 'floor'),
          ('on', 'a', 'checkered', 'ground'))
_WALL = (('in', 'front', 'of', 'a', 'wall'), ('before', 'a', 'wall'))
_SKY = (('under', 'the', 'sky'), ('under', 'an', 'open', 'sky'))

PAD, UNK, ENT = '<pad>', '<unk>', '<ent>'
VOCAB: tuple[str, ...] = (
    PAD, UNK, ENT, ',', '.',
    'a', 'an', 'the', 'of', 'to', 'and', 'on', 'in', 'front', 'behind', 'left', 'right',
    'from', 'under', 'before', 'with',
    'small', 'little', 'large', 'big',
    *COLOURS,
    'sphere', 'ball', 'box', 'block', 'cylinder', 'column', 'cone',
    'checkered', 'tiled', 'floor', 'ground', 'wall', 'sky', 'open',
)
PAD_ID, UNK_ID, ENT_ID = VOCAB.index(PAD), VOCAB.index(UNK), VOCAB.index(ENT)
_IDS = {w: i for i, w in enumerate(VOCAB)}
assert len(_IDS) == len(VOCAB), 'VOCAB holds a word twice'

MIN_VISIBLE_FRACTION = 0.005   # of the image, at LABEL_RESOLUTION: below it, not mentioned
TIE_FRACTION = 0.06            # centroids closer than this (of the width): front/behind
KIND_PROBS = (1 / 3, 1 / 3, 1 / 3)   # text only, imaged without words, imaged with words
_PROMPT_STREAM, _VIEW_STREAM = 0x70726F6D, 0x76696577   # seed-sequence tags ('prom', 'view')


def field_specs(max_tokens: int, resolution: int, entity_size: int) -> dict[str, tuple]:
  """The contract: key -> (shape, dtype) of one example's prompt fields."""
  L, E, H, S = max_tokens, MAX_ENTITIES, resolution, entity_size
  return {
      'prompt_tokens': ((L,), np.int32), 'prompt_mask': ((L,), np.bool_),
      'prompt_entity': ((L,), np.int32), 'prompt_kind': ((), np.int32),
      'entity_images': ((E, S, S, 3), np.uint8), 'entity_is_image': ((E,), np.bool_),
      'entity_valid': ((E,), np.bool_), 'entity_masks': ((E, H, H), np.bool_),
      'entity_spans': ((E, 2), np.int32), 'entity_shape': ((E,), np.int32),
      'entity_colour': ((E,), np.int32),
  }


PROMPT_KEYS: tuple[str, ...] = tuple(field_specs(1, 1, 1))
KIND_KEYS = ('prompt_tokens', 'prompt_mask', 'prompt_entity', 'entity_spans', 'entity_is_image',
             'prompt_kind')   # a scenes record holds one row per kind of these
RECORD_KEYS: tuple[str, ...] = (*KIND_KEYS, 'drawn_kind', 'entity_images', 'entity_valid',
                                'entity_masks', 'entity_shape', 'entity_colour')


def record_specs(max_tokens: int, resolution: int, entity_size: int) -> dict[str, tuple]:
  """What a scenes record stores (record_fields): one row per prompt kind for the text."""
  specs = field_specs(max_tokens, resolution, entity_size)
  out = {k: ((3,) + specs[k][0], specs[k][1]) for k in KIND_KEYS}
  out['drawn_kind'] = ((), np.int32)
  out.update({k: specs[k] for k in specs if k not in KIND_KEYS})
  return out


# ---- attributes ---------------------------------------------------------------------------


def colour_name(albedo: Sequence[float]) -> str:
  """The COLOURS name of a linear-RGB albedo (its hue in display space)."""
  a = np.asarray(albedo, np.float64)
  if a.shape != (3,) or not np.all(np.isfinite(a)) or a.min() < 0:
    raise ValueError(f'albedo must be 3 finite non-negative linear RGB values; got {albedo!r}.')
  hue = colorsys.rgb_to_hsv(*(a ** (1 / 2.2)))[0] * 360.0
  i = int(np.searchsorted(_HUE_EDGES, hue, side='right'))
  return COLOURS[i % len(COLOURS)]   # past the last edge: red again


def volume(p: scenes.Primitive) -> float:
  if p.shape == 'sphere':
    return 4 / 3 * np.pi * p.radius ** 3
  if p.shape == 'box':
    return 4 * p.radius * p.depth * p.height
  if p.shape == 'cylinder':
    return np.pi * p.radius ** 2 * p.height
  return np.pi * p.radius ** 2 * p.height / 3


def size_name(p: scenes.Primitive) -> str | None:
  """'small', 'large' or None (the middle third of its shape's volumes)."""
  lo, hi = _SIZE_TERCILES[p.shape]
  v = volume(p)
  return 'small' if v < lo else 'large' if v > hi else None


@dataclasses.dataclass(frozen=True)
class ObjectFacts:
  shape: str
  colour: str
  size: str | None
  visible: float      # visible fraction of the image
  centre_x: float     # visible centroid, fraction of the width (0 left, 1 right)
  ground_y: float     # distance along the ground from the camera (nearer: in front)


@dataclasses.dataclass(frozen=True)
class SceneFacts:
  objects: tuple[ObjectFacts, ...]
  wall: bool

  @property
  def mentioned(self) -> tuple[int, ...]:
    return tuple(k for k, o in enumerate(self.objects) if o.visible >= MIN_VISIBLE_FRACTION)


def scene_facts(seed: int) -> SceneFacts:
  """What a caption may say about scene `seed` (measured at LABEL_RESOLUTION)."""
  scene = scenes.sample_scene(np.random.default_rng(seed))
  r = scenes.LABEL_RESOLUTION
  inst = scenes.instance_map(seed, r)
  cols = np.arange(r) + 0.5
  objects = []
  for k, p in enumerate(scene.objects):
    mask = inst == scenes._FIRST_OBJECT + k  # pylint: disable=protected-access
    area = int(mask.sum())
    cx = float((mask.sum(0) * cols).sum() / area / r) if area else float('nan')
    objects.append(ObjectFacts(p.shape, colour_name(p.albedo), size_name(p), area / r / r, cx,
                               p.y))
  return SceneFacts(tuple(objects), scene.wall_y is not None)


# ---- caption grammar ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Caption:
  """A caption as words, with each object's phrase as a [start, end) word span."""
  words: tuple[str, ...]
  spans: dict[int, tuple[int, int]]   # object index -> span (incl. its '<ent>' slots)
  imaged: tuple[int, ...]             # objects shown as images
  kind: int

  @property
  def text(self) -> str:
    return ' '.join(self.words).replace(' ,', ',')


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
  return options[int(rng.integers(len(options)))]


def _phrase(o: ObjectFacts, rng: np.random.Generator, *, words: bool, slots: int
            ) -> list[str]:
  body = []
  if words:
    if o.size is not None:
      body.append(_pick(rng, _SIZE_WORDS[o.size]))
    body += [o.colour, _pick(rng, _SHAPE_WORDS[o.shape])]
  article = 'an' if body and body[0][0] in 'aeiou' else 'a'
  return [article] + body + [ENT] * slots


def _relation(a: ObjectFacts, b: ObjectFacts, rng: np.random.Generator) -> tuple[str, ...]:
  """Where a is relative to b in the image."""
  if abs(a.centre_x - b.centre_x) >= TIE_FRACTION:
    return _pick(rng, _LEFT if a.centre_x < b.centre_x else _RIGHT)
  return ('in', 'front', 'of') if a.ground_y < b.ground_y else ('behind',)


def caption(seed: int, *, max_tokens: int = 48, entity_tokens: int = 4,
            kind: int | None = None, facts: SceneFacts | None = None) -> Caption:
  """The caption of scene `seed` (its prompt kind drawn from the seed unless given).

  Raises ValueError if the objects' phrases alone do not fit `max_tokens`.
  """
  if entity_tokens < 1:
    raise ValueError(f'entity_tokens must be >= 1; got {entity_tokens}.')
  facts = scene_facts(seed) if facts is None else facts
  rng = np.random.default_rng([seed, _PROMPT_STREAM])
  drawn_kind = int(rng.choice(3, p=KIND_PROBS))   # always drawn: `kind` keeps the other draws
  kind = drawn_kind if kind is None else int(kind)
  if kind not in (0, 1, 2):
    raise ValueError(f'prompt kind must be 0, 1 or 2; got {kind}.')
  mentioned = list(facts.mentioned)
  # Drawn whatever the kind, so the three kinds of a seed share their words.
  show = rng.random(len(mentioned)) < 0.5
  fallback = int(rng.integers(len(mentioned))) if mentioned else 0
  if kind and mentioned and not show.any():
    show[fallback] = True
  imaged = tuple(k for k, s in zip(mentioned, show) if s and kind) if mentioned else ()
  if not mentioned:
    kind = 0

  # Phrases, each a list of words; the order of the objects in the sentence.
  objs = facts.objects
  phrases = {k: _phrase(objs[k], rng, words=not (kind == 1 and k in imaged),
                        slots=entity_tokens if k in imaged else 0) for k in mentioned}
  parts: list[list[str] | int] = []   # an int stands for that object's phrase
  if len(mentioned) == 2:
    a, b = mentioned if rng.random() < 0.5 else mentioned[::-1]
    parts = [a, list(_relation(objs[a], objs[b], rng)), b]
  elif len(mentioned) >= 3:
    order = sorted(mentioned, key=lambda k: objs[k].centre_x)
    left_to_right = rng.random() < 0.5
    if not left_to_right:
      order = order[::-1]
    direction = ['from', 'left', 'to', 'right'] if left_to_right else ['from', 'right', 'to',
                                                                       'left']
    items: list[list[str] | int] = []
    for i, k in enumerate(order):
      if i:
        items.append(['and'] if i == len(order) - 1 else [','])
      items.append(k)
    parts = [direction, [','], *items] if rng.random() < 0.5 else [*items, [','], direction]
  elif mentioned:
    parts = [mentioned[0]]

  floor = list(_pick(rng, _FLOOR))
  back = list(_pick(rng, _WALL if facts.wall else _SKY))
  where = rng.choice(3, p=(0.6, 0.2, 0.2))   # end, start, none
  back_first = rng.random() < 0.5

  def assemble(clauses: list[list[str]]) -> list[list[str] | int]:
    bg: list[list[str] | int] = []
    for c in clauses:
      bg += [[','], c]
    bg = bg[1:]
    if not parts:
      return bg or [floor]
    if not bg or where == 2:
      return parts
    return parts + [[',']] + bg if where == 0 else bg + [[',']] + parts

  clauses = [back, floor] if back_first else [floor, back]
  for keep in (clauses, [floor], []):   # shorten: the wall/sky clause goes first
    seq = assemble(keep)
    length = sum(len(phrases[p]) if isinstance(p, int) else len(p) for p in seq)
    if length <= max_tokens:
      break
  else:
    raise ValueError(f'scene {seed}: the phrases of its {len(mentioned)} objects take {length} '
                     f'tokens with entity_tokens={entity_tokens}; max_tokens={max_tokens} is '
                     'too small.')

  words: list[str] = []
  spans: dict[int, tuple[int, int]] = {}
  for p in seq:
    if isinstance(p, int):
      spans[p] = (len(words), len(words) + len(phrases[p]))
      words += phrases[p]
    else:
      words += p
  return Caption(tuple(words), spans, imaged, kind)


# ---- tokens -------------------------------------------------------------------------------


def tokenize(text: str) -> list[str]:
  """Lower-case words and punctuation; '<ent>' kept whole."""
  return re.findall(r"<ent>|[a-z]+|[,.]", text.lower())


def encode_words(words: Sequence[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 (L,), mask bool (L,)); unknown words become UNK_ID, the rest PAD_ID."""
  if len(words) > max_tokens:
    raise ValueError(f'{len(words)} tokens do not fit max_tokens={max_tokens}: '
                     f'{" ".join(words)!r}')
  tokens = np.full(max_tokens, PAD_ID, np.int32)
  tokens[:len(words)] = [_IDS.get(w, UNK_ID) for w in words]
  mask = np.zeros(max_tokens, np.bool_)
  mask[:len(words)] = True
  return tokens, mask


def decode(tokens: Sequence[int], mask: Sequence[bool] | None = None) -> list[str]:
  """Token ids -> words (masked-out positions dropped)."""
  tokens = np.asarray(tokens)
  keep = np.ones(len(tokens), bool) if mask is None else np.asarray(mask, bool)
  if tokens.min(initial=0) < 0 or tokens.max(initial=0) >= len(VOCAB):
    raise ValueError(f'token ids must lie in [0, {len(VOCAB)}); got [{tokens.min()}, '
                     f'{tokens.max()}].')
  return [VOCAB[int(t)] for t, k in zip(tokens, keep) if k]


_SWAP = np.arange(len(VOCAB), dtype=np.int32)
_SWAP[_IDS['left']], _SWAP[_IDS['right']] = _IDS['right'], _IDS['left']


def hflip_tokens(tokens: np.ndarray) -> np.ndarray:
  """The prompt of the mirrored image: 'left' <-> 'right' (positions unchanged)."""
  return _SWAP[np.asarray(tokens)]


def _token_fields(words: Sequence[str], spans: dict[int, tuple[int, int]],
                  imaged: Sequence[int], max_tokens: int) -> dict[str, np.ndarray]:
  tokens, mask = encode_words(words, max_tokens)
  entity = np.zeros(max_tokens, np.int32)
  span_arr = np.zeros((MAX_ENTITIES, 2), np.int32)
  is_image = np.zeros(MAX_ENTITIES, np.bool_)
  for k, (s, e) in spans.items():
    span_arr[k] = (s, e)
    if k in imaged:
      is_image[k] = True
      slots = np.flatnonzero(tokens[s:e] == ENT_ID) + s
      entity[slots] = k + 1
  return dict(prompt_tokens=tokens, prompt_mask=mask, prompt_entity=entity,
              entity_spans=span_arr, entity_is_image=is_image)


def encode_caption(text: str, entity_char_spans: Sequence[Sequence[int]],
                   entity_is_image: Sequence[bool], *, max_tokens: int,
                   entity_tokens: int) -> dict[str, np.ndarray]:
  """Real captions: token fields of `text`, R '<ent>' slots after each imaged entity.

  `entity_char_spans[k]` = [start, end) characters of entity k's phrase in `text`
  ((0, 0): not mentioned); phrases must not overlap. Returns prompt_tokens,
  prompt_mask, prompt_entity, entity_spans, entity_is_image (see field_specs).
  """
  spans_c = np.asarray(entity_char_spans, np.int64).reshape(-1, 2)
  if len(spans_c) > MAX_ENTITIES:
    raise ValueError(f'{len(spans_c)} entities; at most MAX_ENTITIES={MAX_ENTITIES}.')
  cuts = sorted({0, len(text), *[int(c) for s in spans_c if s[1] > s[0] for c in s]})
  order = sorted((int(s[0]), k) for k, s in enumerate(spans_c) if s[1] > s[0])
  for (s0, k0), (s1, k1) in zip(order, order[1:]):
    if spans_c[k0][1] > s1:
      raise ValueError(f'entity phrases {k0} {spans_c[k0].tolist()} and {k1} '
                       f'{spans_c[k1].tolist()} overlap.')
  words: list[str] = []
  spans: dict[int, tuple[int, int]] = {}
  imaged = [k for k in range(len(spans_c)) if entity_is_image[k] and spans_c[k][1] > spans_c[k][0]]
  starts = {int(spans_c[k][0]): k for _, k in order}
  for a, b in zip(cuts, cuts[1:]):
    k = starts.get(a)
    piece = tokenize(text[a:b])
    if k is not None and spans_c[k][1] == b:
      if not piece:
        raise ValueError(f'entity {k}: its phrase {text[a:b]!r} holds no word.')
      start = len(words)
      words += piece + ([ENT] * entity_tokens if k in imaged else [])
      spans[k] = (start, len(words))
    else:
      words += piece
  return _token_fields(words, spans, imaged, max_tokens)


def real_example_fields(caption: str, entity_char_spans: Sequence[Sequence[int]],
                        entity_is_image: Sequence[bool], entity_images: np.ndarray,
                        entity_masks: np.ndarray, *, kind: int, max_tokens: int,
                        entity_tokens: int, entity_shape: Sequence[int] | None = None,
                        entity_colour: Sequence[int] | None = None) -> dict[str, np.ndarray]:
  """The contract fields of one real image's prompt (see the module docstring).

  Entities are the first len(entity_char_spans) of MAX_ENTITIES; the rest are
  padding (invalid). Raises ValueError naming every broken field.
  """
  n = len(entity_char_spans)
  E = MAX_ENTITIES
  pad_to = lambda x, fill, dtype: np.concatenate(   # noqa: E731
      [np.asarray(x, dtype), np.full((E - n,) + np.shape(x)[1:], fill, dtype)])
  out = encode_caption(caption, entity_char_spans, entity_is_image, max_tokens=max_tokens,
                       entity_tokens=entity_tokens)
  images = pad_to(entity_images, 0, np.uint8) * out['entity_is_image'][:, None, None, None]
  out.update(
      prompt_kind=np.int32(kind if out['entity_is_image'].any() else 0),
      entity_images=images.astype(np.uint8),
      entity_valid=np.arange(E) < n,
      entity_masks=pad_to(entity_masks, False, np.bool_),
      entity_shape=pad_to([-1] * n if entity_shape is None else entity_shape, -1, np.int32),
      entity_colour=pad_to([-1] * n if entity_colour is None else entity_colour, -1, np.int32))
  out = {k: out[k] for k in PROMPT_KEYS}
  problems = check_fields(out, max_tokens=max_tokens, entity_tokens=entity_tokens)
  if problems:
    raise ValueError(f'real prompt {caption!r}: ' + '; '.join(problems))
  return out


# ---- whole examples -----------------------------------------------------------------------


def view_seed(seed: int, k: int) -> list[int]:
  """The render_entity view seed of object k of scene `seed` (a seed-sequence entropy)."""
  return [int(seed), int(k), _VIEW_STREAM]


def record_fields(seed: int, resolution: int, *, max_tokens: int = 48, entity_tokens: int = 4,
                  entity_size: int = 32, instance: np.ndarray | None = None
                  ) -> dict[str, np.ndarray]:
  """The prompt fields a record of scene `seed` stores: the prompt of every kind.

  The text fields hold one row per kind j (`KIND_KEYS`: prompt_tokens (3, L),
  prompt_mask, prompt_entity (3, L), entity_spans (3, E, 2), entity_is_image (3, E),
  prompt_kind (3,): the kind row j really is, 0 when nothing can be imaged); the
  three rows share their words and kinds 1 and 2 image the same objects. Plus
  `drawn_kind` () (the seed's own kind, used when no kind mix is asked for) and
  the single entity_images (those of kinds 1/2), entity_valid, entity_masks,
  entity_shape, entity_colour. `select_kind` turns it into one example's fields.
  `instance`: the scene's instance map at `resolution` if already rendered.
  """
  facts = scene_facts(seed)
  caps = [caption(seed, max_tokens=max_tokens, entity_tokens=entity_tokens, kind=j, facts=facts)
          for j in range(3)]
  drawn = caption(seed, max_tokens=max_tokens, entity_tokens=entity_tokens, facts=facts).kind
  rows = [_token_fields(c.words, c.spans, c.imaged, max_tokens) for c in caps]
  out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  out['prompt_kind'] = np.array([c.kind for c in caps], np.int32)
  out['drawn_kind'] = np.int32(drawn)
  inst = scenes.instance_map(seed, resolution) if instance is None else np.asarray(instance)
  if inst.shape != (resolution, resolution):
    raise ValueError(f'instance map of scene {seed} has shape {inst.shape}; expected '
                     f'{(resolution, resolution)}.')
  n, E, S = len(facts.objects), MAX_ENTITIES, entity_size
  images = np.zeros((E, S, S, 3), np.uint8)
  for k in caps[2].imaged:
    images[k] = scenes.render_entity(seed, k, S, view_seed(seed, k))
  first = scenes._FIRST_OBJECT  # pylint: disable=protected-access
  out.update(
      entity_images=images,
      entity_valid=np.arange(E) < n,
      entity_masks=inst[None] == (first + np.arange(E))[:, None, None],
      entity_shape=np.array([SHAPES.index(o.shape) for o in facts.objects] + [-1] * (E - n),
                            np.int32),
      entity_colour=np.array([COLOURS.index(o.colour) for o in facts.objects] + [-1] * (E - n),
                             np.int32))
  return out


def select_kind(stored: dict[str, Any], kind: int | None = None) -> dict[str, np.ndarray]:
  """One example's prompt fields (the contract) from `record_fields`' rows: kind `kind`,
  or the record's own `drawn_kind` when None. A text-only prompt shows no image."""
  j = int(stored['drawn_kind']) if kind is None else int(kind)
  if j not in (0, 1, 2):
    raise ValueError(f'prompt kind must be 0, 1 or 2; got {j}.')
  out = {k: np.asarray(stored[k])[j] for k in KIND_KEYS}
  images = np.asarray(stored['entity_images'])
  out['entity_images'] = np.where(out['entity_is_image'][:, None, None, None], images,
                                  np.zeros_like(images))
  for k in ('entity_valid', 'entity_masks', 'entity_shape', 'entity_colour'):
    out[k] = np.asarray(stored[k])
  return {k: out[k] for k in PROMPT_KEYS}


def example_fields(seed: int, resolution: int, *, max_tokens: int = 48, entity_tokens: int = 4,
                   entity_size: int = 32, kind: int | None = None,
                   instance: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """The prompt fields (see field_specs) of scene `seed` with target at `resolution`:
  prompt kind `kind`, or the seed's own when None."""
  return select_kind(record_fields(seed, resolution, max_tokens=max_tokens,
                                   entity_tokens=entity_tokens, entity_size=entity_size,
                                   instance=instance), kind)


def check_fields(example: dict[str, Any], *, max_tokens: int | None = None,
                 entity_tokens: int | None = None, entity_size: int | None = None,
                 resolution: int | None = None) -> list[str]:
  """Problems with an example's prompt fields (empty when it meets the contract).

  Checks every key's dtype and shape (L, S, H taken from the record where not
  given), entity ids and '<ent>' runs, spans within the mask, masks and
  attributes only on valid entities.
  """
  problems = []
  for key in PROMPT_KEYS:
    if key not in example:
      return [f'{key}: missing']
  L = max_tokens or np.shape(example['prompt_tokens'])[0]
  H = resolution or np.shape(example['entity_masks'])[-1]
  S = entity_size or np.shape(example['entity_images'])[1]
  for key, (shape, dtype) in field_specs(L, H, S).items():
    x = np.asarray(example[key])
    if x.shape != shape or x.dtype != dtype:
      problems.append(f'{key}: {x.dtype}{x.shape}, expected {np.dtype(dtype)}{shape}')
  if problems:
    return problems
  tok, mask, ent = example['prompt_tokens'], example['prompt_mask'], example['prompt_entity']
  n = int(mask.sum())
  if not mask[:n].all():
    problems.append('prompt_mask: real tokens must come first, then padding')
  if tok.min() < 0 or tok.max() >= len(VOCAB):
    problems.append(f'prompt_tokens: ids span [{tok.min()}, {tok.max()}], VOCAB has {len(VOCAB)}')
  if (tok[~mask] != PAD_ID).any() or (tok[mask] == PAD_ID).any():
    problems.append('prompt_tokens: <pad> must be exactly the masked-out positions')
  if ((ent > 0) != (tok == ENT_ID)).any():
    problems.append('prompt_entity: nonzero exactly on the <ent> tokens expected')
  valid, is_image = example['entity_valid'], example['entity_is_image']
  for k in range(MAX_ENTITIES):
    slots = np.flatnonzero(ent == k + 1)
    s, e = (int(v) for v in example['entity_spans'][k])
    if is_image[k]:
      if entity_tokens is not None and len(slots) != entity_tokens:
        problems.append(f'entity {k}: {len(slots)} <ent> slots, expected {entity_tokens}')
      if len(slots) and (np.diff(slots) != 1).any():
        problems.append(f'entity {k}: its <ent> slots are not consecutive')
      if len(slots) and not s <= slots[0] <= slots[-1] < e:
        problems.append(f'entity {k}: its <ent> slots lie outside its span [{s}, {e})')
    elif len(slots) or example['entity_images'][k].any():
      problems.append(f'entity {k}: not an image, but has <ent> slots or a non-zero image')
    if (s, e) != (0, 0) and not 0 <= s < e <= n:
      problems.append(f'entity {k}: span [{s}, {e}) outside the {n} real tokens')
    if not valid[k] and ((s, e) != (0, 0) or example['entity_masks'][k].any()
                         or example['entity_shape'][k] != -1
                         or example['entity_colour'][k] != -1 or is_image[k]):
      problems.append(f'entity {k}: invalid but has a span, mask, attributes or image')
  return problems


def stored_fields(record: dict[str, Any], *, resolution: int | None = None,
                  max_tokens: int | None = None, entity_tokens: int | None = None,
                  entity_size: int | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
  """A stored record's prompt fields as arrays, and their problems.

  A scenes record (RECORD_KEYS, rows per kind) has every kind's selection
  checked against the contract (see check_fields); a real-data record holds one
  prompt under the contract keys (PROMPT_KEYS) and is checked as it is.

  Integer fields of another integer width (a TFDS scalar comes back as a Python
  int) become int32; any other dtype is reported, not converted.
  """
  single = 'drawn_kind' not in record   # one prompt (real data): the contract keys
  out, problems = {}, []
  for key in PROMPT_KEYS if single else RECORD_KEYS:
    if key not in record:
      return {}, [f'{key}: missing (the record has {sorted(record)})']
    x = np.asarray(record[key])
    if x.dtype != np.int32 and np.issubdtype(x.dtype, np.integer) and key in (
        'prompt_tokens', 'prompt_entity', 'entity_spans', 'prompt_kind', 'drawn_kind',
        'entity_shape', 'entity_colour'):
      if x.size and (x.min() < np.iinfo(np.int32).min or x.max() > np.iinfo(np.int32).max):
        problems.append(f'{key}: values beyond int32')
      x = x.astype(np.int32)
    out[key] = x
  if single:
    return out, problems or check_fields(out, max_tokens=max_tokens, entity_tokens=entity_tokens,
                                         entity_size=entity_size, resolution=resolution)
  for key in KIND_KEYS:
    if out[key].shape[:1] != (3,):
      problems.append(f'{key}: shape {out[key].shape}, expected one row per prompt kind (3, ...)')
  if out['drawn_kind'].shape != () or not 0 <= int(out['drawn_kind']) < 3:
    problems.append(f'drawn_kind: {out["drawn_kind"]!r}, expected a kind 0, 1 or 2')
  if problems:
    return out, problems
  for j in range(3):
    selected = select_kind(out, j)
    if int(selected['prompt_kind']) not in (0, j):
      problems.append(f'prompt_kind: row {j} holds kind {int(selected["prompt_kind"])}')
    problems += [f'{p} (kind {j})' for p in check_fields(
        selected, max_tokens=max_tokens, entity_tokens=entity_tokens, entity_size=entity_size,
        resolution=resolution)]
    if problems:
      break
  return out, problems
