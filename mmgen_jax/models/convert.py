"""Converter from MMGen/SiT PyTorch state dicts to `MMDiT` parameters.

Key names are exactly those of the official `SiT.state_dict()` (github.com/
jiepengwang/MMGen, `models/sit.py`), which the released checkpoints hold in
their `ema` and `model` dicts. Every key maps to exactly one parameter with
a layout transform (Linear (out, in) -> kernel (in, out); the stride-p Conv
OIHW -> the (p·p·C, D) patch matrix; qkv (3·H·hd, D) -> (D, 3, H, hd)); any
unmapped key, unfilled parameter or shape mismatch is an error naming it.
`pos_embed` is fixed in `MMDiT` (not a parameter); it is checked against the
table the model computes.

Both layouts of the trunk are served: per block (`blocks.{i}.…` -> NNX
`blocks/{i}/…`) and stacked (`model.scan_layers`: `blocks.{i}.…` -> row i of
NNX `blocks/…`, whose leading axis is the layer). `to_layout` moves any tree of
parameters (a model's state, a train state with its EMA and optimizer
moments, abstract shapes with shardings) from one layout to the other.

CLI (the released SiT-XL/2 checkpoint -> flat safetensors keyed by NNX path,
the trunk stacked; `load_params` reads the file into either layout):

  python -m mmgen_jax.models.convert --checkpoint 0600000.pt \\
      --config configs/imagenet256_xl2.py --out xl2.safetensors

`--config` (with `--config.<key>=<value>` overrides) sizes the model as the
config does, so the file loads where the config is used
(`--config.sample.checkpoint=xl2.safetensors`); without it the size flags
(`--depth`, `--hidden_size`, ...; defaults: the released SiT-XL/2) do. A `.pt`
needs PyTorch (the optional `torch` extra); `--subset` picks 'ema' (default,
as MMGen's exp_sample.py) or 'model'.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

from flax import nnx
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from mmgen_jax.models import dit

Array = Any  # numpy array, jax.Array or jax.ShapeDtypeStruct


@dataclasses.dataclass(frozen=True)
class Rule:
  """One torch key -> one NNX parameter path (row `layer` of it if stacked), with the transform."""
  path: tuple[str | int, ...]
  transform: Callable[[Array], Array]
  layer: int | None = None

  @property
  def target(self) -> str:
    name = '.'.join(map(str, self.path))
    return name if self.layer is None else f'{name}[{self.layer}]'


def _identity(w):
  return w


def _linear_t(w):  # torch Linear (out, in) -> Flax kernel (in, out)
  return w.T


def mmgen_rules(model: dit.MMDiT) -> dict[str, Rule]:
  """torch state_dict key -> Rule, for every parameter of `model`."""
  if len(model.class_heads):
    raise ValueError('MMGen checkpoints have no classifier heads; build the model with '
                     'class_heads=() to convert one.')
  rules: dict[str, Rule] = {}

  def linear(torch_name: str, path: tuple[str | int, ...], layer: int | None = None) -> None:
    rules[f'{torch_name}.weight'] = Rule((*path, 'kernel'), _linear_t, layer)
    rules[f'{torch_name}.bias'] = Rule((*path, 'bias'), _identity, layer)

  p, c, d = model.patch_size, model.in_channels, model.hidden_size
  rules['x_embedder.proj.weight'] = Rule(
      ('x_embedder', 'proj', 'kernel'),
      lambda w: w.transpose(2, 3, 1, 0).reshape(p * p * c, d))  # OIHW -> (p, p, C) x D
  rules['x_embedder.proj.bias'] = Rule(('x_embedder', 'proj', 'bias'), _identity)

  linear('t_embedder.mlp.0', ('t_embedder', 'fc1'))
  linear('t_embedder.mlp.2', ('t_embedder', 'fc2'))
  if len(model.t_embedder.time_slots) > 1:
    linear('t_embedder.mlp_fused.0', ('t_embedder', 'fuse_fc1'))
    linear('t_embedder.mlp_fused.2', ('t_embedder', 'fuse_fc2'))
  rules['y_embedder.embedding_table.weight'] = Rule(
      ('y_embedder', 'embedding_table', 'embedding'), _identity)
  if model.task_embedder is not None:
    rules['taskcond_embedder.embedding_table.weight'] = Rule(
        ('task_embedder', 'embedding_table', 'embedding'), _identity)

  attn = (model.blocks if model.scan_layers else model.blocks[0]).attn
  heads, hd = attn.num_heads, attn.head_dim
  for i in range(model.depth):
    t = f'blocks.{i}'
    # Stacked: every block's key fills row i of one parameter.
    b, layer = (('blocks',), i) if model.scan_layers else (('blocks', i), None)
    rules[f'{t}.attn.qkv.weight'] = Rule(
        (*b, 'attn', 'qkv_kernel'), lambda w: w.T.reshape(w.shape[1], 3, heads, hd), layer)
    rules[f'{t}.attn.qkv.bias'] = Rule(
        (*b, 'attn', 'qkv_bias'), lambda w: w.reshape(3, heads, hd), layer)
    rules[f'{t}.attn.proj.weight'] = Rule(
        (*b, 'attn', 'proj_kernel'), lambda w: w.T.reshape(heads, hd, w.shape[0]), layer)
    rules[f'{t}.attn.proj.bias'] = Rule((*b, 'attn', 'proj_bias'), _identity, layer)
    if attn.qk_norm:
      for norm in ('q_norm', 'k_norm'):
        rules[f'{t}.attn.{norm}.weight'] = Rule((*b, 'attn', norm, 'scale'), _identity, layer)
        rules[f'{t}.attn.{norm}.bias'] = Rule((*b, 'attn', norm, 'bias'), _identity, layer)
    linear(f'{t}.mlp.fc1', (*b, 'mlp', 'fc1'), layer)
    linear(f'{t}.mlp.fc2', (*b, 'mlp', 'fc2'), layer)
    linear(f'{t}.adaLN_modulation.1', (*b, 'adaln_modulation'), layer)

  for j in range(len(model.projectors)):
    for torch_idx, name in ((0, 'fc1'), (2, 'fc2'), (4, 'fc3')):
      linear(f'projectors.{j}.{torch_idx}', ('projectors', j, name))

  # The official single-head model names its head `final_layer`.
  many = len(model.final_layers) > 1
  for m in range(len(model.final_layers)):
    t = f'lis_final_layer.{m}' if many else 'final_layer'
    linear(f'{t}.linear', ('final_layers', m, 'linear'))
    linear(f'{t}.adaLN_modulation.1', ('final_layers', m, 'adaln_modulation'))
  return rules


FIXED_KEYS = ('pos_embed',)  # buffers-in-disguise: checked, not loaded


def parameter_targets(model: dit.MMDiT) -> list[str]:
  """Every parameter of `model` a key must fill (`Rule.target` names; stacked: one per row)."""
  out = []
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name = '.'.join(map(str, path))
    if model.scan_layers and path[0] == 'blocks':
      out += [f'{name}[{i}]' for i in range(var.get_value().shape[0])]
    else:
      out.append(name)
  return out


def plan_conversion(model: dit.MMDiT, shapes: Mapping[str, tuple[int, ...]]
                    ) -> dict[str, Rule]:
  """Checks keys and shapes (torch layout) against `model`; returns the rules to apply.

  Raises one ValueError listing every unknown key, every parameter no key
  fills, and every shape that does not match after the layout transform.
  """
  rules = mmgen_rules(model)
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  problems = []

  unknown = sorted(set(shapes) - set(rules) - set(FIXED_KEYS))
  if unknown:
    problems.append(f'{len(unknown)} key(s) map to no parameter of the model: {unknown}')
  targets = [r.target for r in rules.values()]
  if len(set(targets)) != len(targets):
    problems.append('internal error: two keys map to the same parameter')
  missing = sorted(k for k in rules if k not in shapes)
  if missing:
    problems.append(f'{len(missing)} parameter key(s) absent from the state dict: {missing}')
  unfilled = sorted(set(parameter_targets(model)) - set(targets))
  if unfilled:
    problems.append(f'{len(unfilled)} model parameter(s) no key maps to: {unfilled}')
  for key, rule in rules.items():
    if key not in shapes:
      continue
    if rule.path not in params:
      problems.append(f'{key}: target {rule.target} is not a model parameter')
      continue
    want = tuple(params[rule.path].get_value().shape)[rule.layer is not None:]
    try:
      got = jax.eval_shape(rule.transform, jax.ShapeDtypeStruct(tuple(shapes[key]), np.float32))
      got = tuple(got.shape)
    except (TypeError, ValueError) as e:  # reshape impossible: the source shape is wrong
      got = f'untransformable ({e})'
    if got != want:
      problems.append(f'{key}: torch shape {tuple(shapes[key])} -> {got}, but '
                      f'{rule.target} expects {want}')
  if 'pos_embed' in shapes:
    want = (1, model.grid_size ** 2, model.hidden_size)
    if tuple(shapes['pos_embed']) != want:
      problems.append(f'pos_embed: shape {tuple(shapes["pos_embed"])}, expected {want}')
  if problems:
    raise ValueError('state dict does not match the model:\n  ' + '\n  '.join(problems))
  return rules


def convert_mmgen_state_dict(state_dict: Mapping[str, np.ndarray], model: dit.MMDiT,
                             *, pos_embed_atol: float = 1e-6) -> nnx.State:
  """Returns the model's Param state filled from an MMGen/SiT state dict.

  Values are numpy arrays in the parameters' dtype. `model` may be abstract
  (`nnx.eval_shape`); use `load_mmgen_state_dict` to assign into a model.
  """
  state_dict = {k: np.asarray(v) for k, v in state_dict.items()}
  rules = plan_conversion(model, {k: v.shape for k, v in state_dict.items()})
  if 'pos_embed' in state_dict:
    ours = model.pos_embed()
    err = float(np.abs(state_dict['pos_embed'].reshape(ours.shape) - ours).max())
    if err > pos_embed_atol:
      raise ValueError(f'pos_embed differs from the fixed sin-cos table by {err:.3g} '
                       f'(> {pos_embed_atol}); the checkpoint uses another position layout.')
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  values = {}
  for key, rule in rules.items():
    like = flat[rule.path].get_value()
    # Contiguous copy: transposed views would be written wrongly by some savers.
    value = np.ascontiguousarray(rule.transform(state_dict[key]), dtype=like.dtype)
    if rule.layer is None:
      values[rule.path] = value
    else:
      values.setdefault(rule.path, np.empty(like.shape, like.dtype))[rule.layer] = value
  return nnx.from_flat_state({p: var.replace(values[p]) for p, var in flat.items()})


def load_mmgen_state_dict(model: dit.MMDiT, state_dict: Mapping[str, np.ndarray]) -> None:
  """Converts `state_dict` and assigns it into `model`, keeping each parameter's sharding."""
  new = convert_mmgen_state_dict(state_dict, model)
  nnx.update(model, _placed_like(nnx.state(model, nnx.Param), new))


def _placed_like(current: nnx.State, new: nnx.State) -> nnx.State:
  def place(old, value):
    sharding = getattr(old, 'sharding', None)
    return jax.device_put(value, sharding) if sharding is not None else jax.numpy.asarray(value)
  return jax.tree.map(place, current, new)


# ---- per-block <-> stacked ------------------------------------------------------


def to_layout(tree: Any, scan_layers: bool) -> Any:
  """`tree` with the trunk's blocks stacked (scan_layers) or per block.

  Every dict holding a 'blocks' entry is a trunk (nested dicts as
  `nnx.to_pure_dict` gives; a TrainState's params, EMA and optimizer moments
  alike). Per block, 'blocks' maps 0, 1, ... to one block's parameters; stacked,
  it is one block's structure whose leaves have a leading layer axis. Leaves
  may be numpy or jax arrays, or `jax.ShapeDtypeStruct`s (their sharding gets
  or loses a leading replicated axis). A tree already in the layout is returned
  as it is.
  """
  def convert(node):
    if not (isinstance(node, dict) and 'blocks' in node):
      return node
    blocks = node['blocks']
    if scan_layers and is_per_block(blocks):
      layers = [blocks[k] for k in sorted(blocks, key=int)]
      blocks = jax.tree.map(_stack_leaves, *layers)
    elif not scan_layers and not is_per_block(blocks):
      depth = jax.tree.leaves(blocks)[0].shape[0]
      blocks = {i: jax.tree.map(lambda x, i=i: _layer_of(x, i), blocks) for i in range(depth)}
    return {**node, 'blocks': blocks}
  return jax.tree.map(convert, tree, is_leaf=lambda x: isinstance(x, dict) and 'blocks' in x)


def is_per_block(blocks: Mapping[Any, Any]) -> bool:
  """Whether a 'blocks' entry maps block indices (0, 1, ... or '0', '1', ...) to blocks."""
  return all(str(k).isdigit() for k in blocks)


def scan_layers_of(tree: Any) -> bool | None:
  """The trunk layout of any pytree (a state, Orbax metadata): stacked, per block, None (no trunk)."""
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', None))) for k in path]
    if 'blocks' in keys[:-1]:
      return not str(keys[keys.index('blocks') + 1]).isdigit()
  return None


def _stack_leaves(*leaves):
  first = leaves[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype,
                                sharding=_with_spec(first.sharding, lambda s: (None, *s)))
  if isinstance(first, np.ndarray):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _layer_of(leaf, i: int):
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype,
                                sharding=_with_spec(leaf.sharding, lambda s: s[1:]))
  return leaf[i]


def _with_spec(sharding, edit):
  """A NamedSharding with its PartitionSpec edited; other shardings as they are."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
      *edit(tuple(sharding.spec))))


# ---- files ---------------------------------------------------------------------


def load_torch_state_dict(path: str, *, subset: str = 'ema', prefix: str = ''
                          ) -> dict[str, np.ndarray]:
  """Reads a state dict (key -> float32 numpy array) from .safetensors or .pt/.pth.

  A training checkpoint (a dict with 'model'/'ema' entries, as MMGen saves)
  yields its `subset` dict ('ema' by default, as the official sampler uses).
  With `prefix`, only keys starting with it are kept, with it removed (e.g.
  'params/' for the parity vectors).
  """
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    sd = load_file(path)
  elif path.endswith(('.pt', '.pth', '.ckpt', '.bin')):
    sd = _torch_load(path, subset)
  else:
    raise ValueError(f'{path}: unknown checkpoint format; expected .safetensors or .pt/.pth.')
  if prefix:
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not sd:
      raise ValueError(f'{path}: no key starts with prefix {prefix!r}.')
  return sd


def _torch_load(path: str, subset: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'Reading {path} needs PyTorch (pip install torch); or convert the '
                      'state dict to .safetensors elsewhere and load that.') from e
  # MMGen checkpoints keep their flags as an argparse.Namespace under 'args'.
  # mmap: a training checkpoint also holds the raw weights and Adam's moments (4× the
  # EMA weights, ~11 GB for XL/2); only the tensors read are paged in.
  with torch.serialization.safe_globals([argparse.Namespace]):
    try:
      ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
      ckpt = torch.load(path, map_location='cpu', weights_only=True)
  if isinstance(ckpt, dict) and ('ema' in ckpt or 'model' in ckpt):
    if subset not in ckpt:
      raise KeyError(f'{path}: checkpoint has no {subset!r} entry; it has {sorted(ckpt)}.')
    ckpt = ckpt[subset]
  if not isinstance(ckpt, dict):
    raise ValueError(f'{path}: expected a state dict, got {type(ckpt).__name__}.')
  return {k: v.detach().float().numpy() for k, v in ckpt.items()}


def save_params(path: str, model: nnx.Module) -> None:
  """Writes the model's parameters to safetensors, keyed by NNX path ('blocks.0.mlp.fc1.kernel')."""
  _save_state(path, nnx.state(model, nnx.Param))


def _save_state(path: str, state: nnx.State) -> int:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  flat = nnx.to_flat_state(state)
  save_file({'.'.join(map(str, p)): np.ascontiguousarray(v.get_value()) for p, v in flat}, path)
  return len(flat)


def read_params(path: str, like: Any) -> Any:
  """A `save_params` file as numpy arrays in the structure, layout and dtypes of `like`.

  `like`: the model's parameters as a pure nested dict (`nnx.to_pure_dict`) of
  arrays or `jax.ShapeDtypeStruct`s; the file may hold either trunk layout.
  Keys and shapes must match exactly; the error names every difference.
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    raw = load_file(path)
  except Exception as e:  # safetensors raises several kinds; name the file
    raise ValueError(f'{path}: cannot read it as a .safetensors file of converted parameters '
                     f'({type(e).__name__}: {e}).') from e
  stored = _by_name(to_layout(_from_names(raw), scan_layers_of(like)))
  want = _by_name(like)
  extra, missing = sorted(set(stored) - set(want)), sorted(set(want) - set(stored))
  bad = [f'{k}: file {stored[k].shape}, model {tuple(want[k].shape)}'
         for k in set(stored) & set(want) if stored[k].shape != tuple(want[k].shape)]
  if extra or missing or bad:
    raise ValueError(f'{path} does not match the model: unknown keys {extra}, missing keys '
                     f'{missing}, shape mismatches {sorted(bad)}.')
  split = lambda name: tuple(int(p) if p.isdigit() else p for p in name.split('.'))
  return traverse_util.unflatten_dict(
      {split(k): np.asarray(stored[k]).astype(v.dtype) for k, v in want.items()})


def load_params(model: nnx.Module, path: str) -> None:
  """Reads a `save_params` file of either trunk layout into `model` (keys and shapes must match)."""
  current = nnx.state(model, nnx.Param)
  values = read_params(path, nnx.to_pure_dict(current))
  flat = {p: var.replace(_at(values, p))
          for p, var in nnx.to_flat_state(current)}
  nnx.update(model, _placed_like(current, nnx.from_flat_state(flat)))


def _at(tree: Mapping[Any, Any], path: tuple[Any, ...]) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def _from_names(flat: Mapping[str, np.ndarray]) -> dict[Any, Any]:
  """'blocks.0.mlp.fc1.kernel' keys -> nested dicts, integer parts as int keys (like NNX)."""
  split = lambda name: tuple(int(p) if p.isdigit() else p for p in name.split('.'))
  return traverse_util.unflatten_dict({split(k): v for k, v in flat.items()})


def _by_name(tree: Mapping[Any, Any]) -> dict[str, np.ndarray]:
  return {'.'.join(map(str, k)): v for k, v in traverse_util.flatten_dict(tree).items()}


# ---- the command line ------------------------------------------------------------

# The size flags and their defaults: the released SiT-XL/2 (build.mmgen_sit_kwargs).
SIZE_FLAGS = (('input_size', 32), ('patch_size', 2), ('hidden_size', 1152), ('depth', 28),
              ('num_heads', 16), ('num_classes', 1000), ('repa_encoder_depth', 8),
              ('repa_z_dim', 768), ('repa_projector_dim', 2048))


def load_config(spec: str, overrides: Sequence[str] = ()) -> Any:
  """`configs/x.py[:arg]` with `--config.a.b=value` overrides applied, as main.py reads it.

  A value is parsed as the type of the key it replaces (bool: true/false;
  tuples and lists: a Python literal); an unknown key is an error naming the
  valid ones.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ValueError(f'--config={spec}: no config file {path!r}.')
  module_spec = importlib.util.spec_from_file_location('mmgen_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  for item in overrides:
    if not item.startswith('--config.') or '=' not in item:
      raise ValueError(f'{item}: expected --config.<key>=<value>.')
    key, text = item[len('--config.'):].split('=', 1)
    parent, node, seen = None, config, 'config'
    for part in key.split('.'):
      if not hasattr(node, 'keys') or part not in node:
        valid = sorted(node.keys()) if hasattr(node, 'keys') else []
        raise ValueError(f'--config.{key}: {seen} has no key {part!r}; valid keys: {valid}.')
      parent, node, seen = node, node[part], f'{seen}.{part}'
    parent[part] = _parse_override(key, text, node)
  return config


def _parse_override(key: str, text: str, current: Any) -> Any:
  import ast  # pylint: disable=g-import-not-at-top
  try:
    if isinstance(current, bool):
      if text.lower() not in ('true', 'false', '1', '0'):
        raise ValueError('expected true or false')
      return text.lower() in ('true', '1')
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
    return ast.literal_eval(text)
  except (ValueError, SyntaxError) as e:
    raise ValueError(f'--config.{key}={text}: not a {type(current).__name__} ({e}).') from e


def model_kwargs_from_args(args: argparse.Namespace, overrides: Sequence[str]) -> dict[str, Any]:
  """MMDiT arguments from --config (+ overrides) or from the size flags (not both)."""
  from mmgen_jax.models import build  # pylint: disable=g-import-not-at-top
  given = [f'--{flag}' for flag, _ in SIZE_FLAGS if getattr(args, flag) is not None]
  if args.config:
    if given:
      raise ValueError(f'--config sizes the model; drop {", ".join(given)} (or override the '
                       'config, e.g. --config.model.depth=2).')
    config = load_config(args.config, overrides)
    if config.objective.name != 'decoupled':
      raise ValueError(f'--config: MMGen checkpoints are decoupled-objective models; '
                       f'config.objective.name={config.objective.name!r}.')
    return build.model_kwargs(config)
  if overrides:
    raise ValueError(f'{overrides[0]}: --config.* overrides need --config=<file>.')
  v = {flag: default if getattr(args, flag) is None else getattr(args, flag)
       for flag, default in SIZE_FLAGS}
  return build.mmgen_sit_kwargs(
      input_size=v['input_size'], patch_size=v['patch_size'], hidden_size=v['hidden_size'],
      depth=v['depth'], num_heads=v['num_heads'], num_classes=v['num_classes'],
      repa_encoder_depth=v['repa_encoder_depth'], repa_z_dims=(v['repa_z_dim'],),
      repa_projector_dim=v['repa_projector_dim'])


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', required=True,
                      help='.pt/.pth (MMGen: a dict with ema/model; needs torch) or .safetensors')
  parser.add_argument('--out', required=True, help='output .safetensors (keys = NNX paths)')
  parser.add_argument('--subset', default='ema', choices=('ema', 'model'))
  parser.add_argument('--prefix', default='',
                      help='keep only keys with this prefix, removed (e.g. params/)')
  parser.add_argument('--config', default='',
                      help='size the model from a config (configs/imagenet256_xl2.py), with '
                      '--config.<key>=<value> overrides, instead of the size flags')
  for flag, default in SIZE_FLAGS:
    parser.add_argument(f'--{flag}', type=int, default=None, help=f'default {default}')
  args, rest = parser.parse_known_args(argv)
  overrides = [a for a in rest if a.startswith('--config.')]
  if len(overrides) != len(rest):
    parser.error(f'unrecognized arguments: {[a for a in rest if a not in overrides]}')
  try:
    kwargs = model_kwargs_from_args(args, overrides)
  except ValueError as e:
    parser.error(str(e))
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: dit.MMDiT(**kwargs, rngs=nnx.Rngs(0)))
  state = convert_mmgen_state_dict(
      load_torch_state_dict(args.checkpoint, subset=args.subset, prefix=args.prefix), model)
  count = _save_state(args.out, state)
  print(f'wrote {count} tensors ({dit.count_params(model):,} parameters) to {args.out}')


if __name__ == '__main__':
  main()
