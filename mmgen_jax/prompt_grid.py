"""Pictures of multimodal prompts and of what a prompt model generates from them.

A prompt grid has one column per prompt: first the prompt itself (`prompt_panel`:
its words with each entity image drawn where its '<ent>' slots are, wrapped to
the column's width), then one labelled row per generated image modality (as the
training grids show them: depth as a colour map, normals as RGB, segmentation in
its colours), and optionally rows of the ground truth ('true/…'). Tiles are
enlarged to at least `MIN_TILE` pixels so that a column holds a legible line
of words (about 20 characters at 96 pixels).

`write_grid` makes the grid of a trained prompt model (`python -m
mmgen_jax.prompt_eval --grid=PATH`): prompts of validation scenes picked to have
1, 2, 3 and 4 entities given as images (`pick_seeds`), sampled with the
model's prompt guidance (config.sample.text_scale / entity_scale).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from absl import logging
import numpy as np

from mmgen_jax import prompt_eval
from mmgen_jax import visualize
from mmgen_jax.data import prompts

MIN_TILE = 96            # pixels: a 32 px image is shown 3× enlarged
THUMB = 32               # pixels: the height of an entity image in a prompt panel
PROMPT_ROW = 'prompt'
Record = Mapping[str, np.ndarray]


def tile_scale(resolution: int) -> int:
  """The enlargement that makes a resolution² tile at least MIN_TILE pixels wide."""
  return max(1, -(-MIN_TILE // int(resolution)))


def _as_uint8(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image
  return np.round((np.clip(image.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def prompt_items(record: Record) -> list[str | np.ndarray]:
  """One prompt (contract fields, unbatched) as words and entity images in reading order.

  The run of '<ent>' slots of entity k becomes entity_images[k] once; masked
  positions (padding, dropped words or images) are left out. An '<ent>' slot that
  names no entity image is shown as the word '<ent>'.
  """
  tokens = np.asarray(record['prompt_tokens'])
  mask = np.asarray(record['prompt_mask'], bool)
  entity = np.asarray(record.get('prompt_entity', np.zeros_like(tokens)))
  images = record.get('entity_images')
  if tokens.ndim != 1 or mask.shape != tokens.shape or entity.shape != tokens.shape:
    raise ValueError(f'one prompt expected: prompt_tokens, prompt_mask, prompt_entity of one '
                     f'shape (L,); got {tokens.shape}, {mask.shape}, {entity.shape}.')
  words = prompts.decode(tokens)
  items: list[str | np.ndarray] = []
  previous = 0
  for word, keep, e in zip(words, mask, entity):
    e = int(e) if keep else 0
    if keep and word == prompts.ENT and e > 0:
      if images is None or e > len(images):
        raise ValueError(f'prompt slot names entity image {e - 1}, but the record holds '
                         f'{0 if images is None else len(images)} entity images.')
      if e != previous:  # the first slot of entity e - 1's run
        items.append(_as_uint8(images[e - 1]))
    elif keep:
      items.append(word)
    previous = e
  return items


def prompt_panel(record: Record, width: int, thumb: int = THUMB) -> np.ndarray:
  """uint8 (H, width, 3): the prompt's words with its entity images (`prompt_items`)."""
  items = prompt_items(record) or ['(empty', 'prompt)']
  return visualize.flow_panel(items, width, thumb=thumb)


def prompt_panels(records: Record, width: int, thumb: int = THUMB) -> np.ndarray:
  """uint8 (N, H, width, 3): the panels of batched records, padded below to one height."""
  n = len(np.asarray(records['prompt_tokens']))
  panels = [prompt_panel({k: np.asarray(v)[i] for k, v in records.items()
                          if k in prompts.PROMPT_KEYS}, width, thumb) for i in range(n)]
  height = max(p.shape[0] for p in panels)
  out = np.full((n, height, width, 3), 255, np.uint8)
  for i, p in enumerate(panels):
    out[i, :p.shape[0]] = p
  return out


def make_prompt_grid(records: Record, generated: Mapping[str, np.ndarray], scale: int,
                     truth: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
  """The grid: the prompt panels, then `generated` rows, then `truth` rows ('true/<name>').

  generated, truth: {row name: uint8 (N, H, W, 3)} display images, one per record.
  """
  if not generated:
    raise ValueError('a prompt grid needs at least one generated row.')
  n = len(np.asarray(records['prompt_tokens']))
  first = next(iter(generated.values()))
  if len(first) != n:
    raise ValueError(f'{n} prompts but {len(first)} generated images per row.')
  rows = {PROMPT_ROW: prompt_panels(records, np.shape(first)[2] * scale)}
  rows.update(generated)
  rows.update({f'true/{k}': v for k, v in (truth or {}).items()})
  return visualize.make_grid(rows, scale=scale, labels=True, unscaled=(PROMPT_ROW,))


# ---- the grid of a trained model ------------------------------------------------------------


def pick_seeds(num: int, *, kind: int = 1, counts: Sequence[int] = (1, 2, 3, 4),
               first_seed: int = prompt_eval.VALIDATION_SEEDS, max_seeds: int = 5000,
               max_tokens: int = 48, entity_tokens: int = 4) -> list[int]:
  """`num` scene seeds from first_seed on, column i's prompt of `kind` giving
  counts[i % len(counts)] entities as images (kind 0: mentioning that many), sorted
  by that count.

  The first seeds of each count are taken (the same every time). Among the first
  max_seeds scenes a count may be too rare (4 imaged entities: about 1 scene in
  100); its columns then take the nearest count with seeds to spare, with a warning.
  """
  if num < 1:
    raise ValueError(f'pick_seeds num={num}: expected at least 1.')
  wanted: dict[int, int] = {}
  for i in range(num):
    c = int(counts[i % len(counts)])
    wanted[c] = wanted.get(c, 0) + 1
  found: dict[int, list[int]] = {}
  for seed in range(first_seed, first_seed + max_seeds):
    cap = prompts.caption(seed, kind=kind, max_tokens=max_tokens, entity_tokens=entity_tokens)
    c = len(cap.imaged) if kind else len(cap.spans)
    if c > 0 and len(found.setdefault(c, [])) < num:
      found[c].append(seed)
    if all(len(found.get(c, ())) >= k for c, k in wanted.items()):
      break
  chosen: list[tuple[int, int]] = []
  used: set[int] = set()
  for c, k in sorted(wanted.items()):
    take = found.get(c, [])[:k]
    chosen += [(c, s) for s in take]
    used.update(take)
    for _ in range(k - len(take)):  # too rare: the nearest count with a seed to spare
      spare = [(abs(d - c), d, s) for d, seeds in found.items() for s in seeds if s not in used]
      if not spare:
        raise ValueError(f'scenes {first_seed} .. {first_seed + max_seeds - 1} hold too few '
                         f'prompts of kind {kind} with entities for {num} columns.')
      _, d, s = min(spare)
      logging.warning('No further prompt of kind %d with %d entities among %d scenes: a '
                      'column shows one with %d.', kind, c, max_seeds, d)
      chosen.append((d, s))
      used.add(s)
  return [s for _, s in sorted(chosen)]


def scene_rows(seeds: Sequence[int], config: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
  """The rendered scenes `seeds` (their ground truth) as display rows {name: uint8 (N, H, W, 3)}
  of the image modalities `names`, through the data pipeline's decoding and normalisation
  (so they look as the training data does)."""
  from mmgen_jax import modalities as modalities_lib  # pylint: disable=g-import-not-at-top
  from mmgen_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mmgen_jax.data import scenes  # pylint: disable=g-import-not-at-top
  mods = modalities_lib.from_config(config.modalities)
  images = {m.name: m for m in modalities_lib.images(mods)}
  unknown = [n for n in names if n not in images]
  if unknown:
    raise ValueError(f'ground-truth rows {unknown} are not image modalities of the config '
                     f'({list(images)}).')
  res = int(config.data.resolution)
  out: dict[str, list[np.ndarray]] = {n: [] for n in names}
  for seed in seeds:
    raw = pipeline.decode_record(scenes.render_scene(int(seed), res), mods, split='render',
                                 index=int(seed), class_field=config.data.class_field,
                                 num_classes=int(config.data.num_classes), resolution=res)
    x = pipeline.normalise(raw, mods)
    for n in names:
      m = images[n]
      out[n].append(visualize.modality_to_rgb(x[n], m.encoding, m.palette))
  return {n: np.stack(v) for n, v in out.items()}


def write_grid(config: Any, workdir: str | None, path: str, *, num: int = 8, kind: int = 1,
               truth: Sequence[str] = ('rgb',), first_seed: int = prompt_eval.VALIDATION_SEEDS,
               model: Any = None, mesh: Any = None,
               draw: Callable[[int, Record], Mapping[str, Any]] | None = None) -> np.ndarray:
  """Writes (and returns) the prompt grid of the model in `workdir` (its EMA parameters as
  evaluate.restore_for_inference loads them, unless `model`/`mesh` or `draw` are given;
  `draw` is prompt_eval.make_prompt_sampler's signature): `num` prompts of `kind`
  (`pick_seeds` from `first_seed` on), the generated image modalities, and the ground-truth rows `truth`."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from mmgen_jax import codec as codec_lib  # pylint: disable=g-import-not-at-top
  from mmgen_jax import modalities as modalities_lib  # pylint: disable=g-import-not-at-top
  from mmgen_jax import parallel  # pylint: disable=g-import-not-at-top

  if not config.prompt.name:
    raise ValueError('a prompt grid needs a model with a prompt encoder: config.prompt.name '
                     "is '' (see configs/unimo_scenes32.py).")
  res = int(config.data.resolution)
  seeds = pick_seeds(num, kind=kind, first_seed=first_seed,
                     max_tokens=int(config.prompt.max_tokens),
                     entity_tokens=int(config.prompt.entity_tokens))
  records = prompt_eval.scene_records(seeds, res, kind=kind,
                                      max_tokens=int(config.prompt.max_tokens),
                                      entity_tokens=int(config.prompt.entity_tokens),
                                      entity_size=int(config.prompt.entity_size))
  batch = num
  if draw is None:
    if model is None:
      from mmgen_jax import evaluate  # pylint: disable=g-import-not-at-top
      model, _, mesh = evaluate.restore_for_inference(config, workdir)
    ways = parallel.batch_ways(mesh, config.sharding_rules)
    batch = -(-num // ways) * ways  # the batch splits over the mesh; extra prompts repeat
    draw = prompt_eval.make_prompt_sampler(config, model, mesh,
                                           codec_lib.from_config(config, mesh), batch)
  idx = np.arange(batch) % num
  out = draw(0, {k: v[idx] for k, v in records.items() if k != 'seed'})
  gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))[:num]
  images = modalities_lib.images(modalities_lib.from_config(config.modalities))
  generated = {m.name: visualize.modality_to_rgb(gather(out[m.name]), m.encoding, m.palette)
               for m in images if m.name in out}
  grid = make_prompt_grid(records, generated, tile_scale(res),
                          scene_rows(seeds, config, truth) if truth else None)
  if jax.process_index() == 0:
    visualize.save_png(path, grid)
  return grid
