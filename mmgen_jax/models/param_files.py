"""A small network's parameters as safetensors keyed by NNX path, with its config as JSON.

The evaluation networks trained in this project (models/attribute_classifier,
models/scenes_features) are saved as a directory holding `weights.safetensors`
(key 'conv/0/kernel': the NNX Param path joined by '/') and `config.json` (what
rebuilds the architecture). Each file is written whole, then renamed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Mapping, TypeVar

from etils import epath
from flax import nnx
import jax.numpy as jnp
import numpy as np

from mmgen_jax.data import atomic_io

WEIGHTS = 'weights.safetensors'
META = 'config.json'

M = TypeVar('M', bound=nnx.Module)


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
  """{'a/0/kernel': value} of every nnx.Param of `model`."""
  return {'/'.join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def load_params(model: nnx.Module, tensors: Mapping[str, Any], source: str) -> None:
  """Sets every nnx.Param of `model` from `tensors` (keys as `flat_params` writes them).

  The keys must be the model's, one to one, and each shape the parameter's; the
  ValueError names `source`, the missing and unexpected keys and every shape that
  differs. Nothing is assigned unless all match.
  """
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  paths = {'/'.join(map(str, p)): p for p in flat}
  missing = sorted(set(paths) - set(tensors))
  unexpected = sorted(set(tensors) - set(paths))
  shapes = sorted(f'{k} {tuple(np.shape(tensors[k]))} (expected {tuple(flat[p].shape)})'
                  for k, p in paths.items()
                  if k in tensors and tuple(np.shape(tensors[k])) != tuple(flat[p].shape))
  if missing or unexpected or shapes:
    raise ValueError(f'{source} does not fit the model: missing keys {missing}, unexpected keys '
                     f'{unexpected}, shape mismatches {shapes}.')
  for k, p in paths.items():
    flat[p] = flat[p].replace(jnp.asarray(tensors[k]))
  nnx.update(model, nnx.from_flat_state(flat))


def save(model: nnx.Module, out_dir: str, meta: Mapping[str, Any]) -> None:
  """`out_dir`/weights.safetensors (every Param) and `out_dir`/config.json (`meta`)."""
  from safetensors.numpy import save as save_bytes  # pylint: disable=g-import-not-at-top
  d = epath.Path(out_dir)
  d.mkdir(parents=True, exist_ok=True)
  atomic_io.write_bytes(d / WEIGHTS, save_bytes(flat_params(model)))
  atomic_io.write_bytes(d / META, json.dumps(meta, indent=1).encode())


def read_meta(out_dir: str, how_to_make: str) -> dict[str, Any]:
  """`out_dir`/config.json; FileNotFoundError (saying `how_to_make` one) without both files."""
  d = epath.Path(out_dir)
  if not (d / WEIGHTS).exists() or not (d / META).exists():
    raise FileNotFoundError(f'{d}: no {WEIGHTS} + {META}; {how_to_make}')
  return json.loads((d / META).read_text())


def load(out_dir: str, build: Callable[[dict[str, Any]], M], meta: dict[str, Any]
         ) -> tuple[M, str]:
  """(build(meta) with the weights of `out_dir`, the weights' fingerprint: 12 hex digits)."""
  from safetensors.numpy import load as load_bytes  # pylint: disable=g-import-not-at-top
  path = epath.Path(out_dir) / WEIGHTS
  raw = path.read_bytes()
  model = build(meta)
  load_params(model, load_bytes(raw), f'{path} (architecture from {META})')
  return model, hashlib.sha256(raw).hexdigest()[:12]
