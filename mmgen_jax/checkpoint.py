"""The one module that talks to Orbax: train state + data iterator + config.

Layout: `<workdir>/checkpoints/<step>/{state, data, config}`.
  state   the TrainState pytree (params, EMA, optimizer, step, RNG), sharded;
  data    the Grain iterator position, one JSON file per process;
  config  the run's config as JSON, for people reading the directory.

Saves are asynchronous (the arrays are copied off the devices before `save`
returns, so the next step may donate them). A restore reads onto whatever
shardings the caller asks for, so a run saved on one mesh resumes on another.
A latest step that cannot be restored while an older one can (damaged or
missing files) is logged, moved aside to `<workdir>/corrupt_checkpoints/` and
the older step is used. When no step restores, nothing is moved: that is a
mismatch between the run and its checkpoints (model size, RNG implementation,
process count, data pipeline), and the error says so. The trunk's layout
(`model.scan_layers`, blocks stacked or one by one) may differ: the state is
converted on restore.

`load_weights` reads only the weights and EMA weights of another run's
checkpoint, to start a new run from them (`config.train.init_from`).
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from mmgen_jax.models import convert

CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'corrupt_checkpoints'


class _IteratorSnapshot:
  """The iterator's position when `save` was called (the save itself is async).

  Grain's Orbax handler writes `get_state()` bytes as the JSON file, so the
  position must be taken now, not when the background save runs.
  """

  def __init__(self, data_iter: Any):
    state = data_iter.get_state()
    self._state = state if isinstance(state, bytes) else json.dumps(state, indent=2).encode()

  def get_state(self) -> bytes:
    return self._state


class Checkpointer:
  """Saves every `config.train.checkpoint_every` steps, keeps `keep_checkpoints`."""

  def __init__(self, workdir: str | os.PathLike, config: ml_collections.ConfigDict,
               read_only: bool = False):
    """read_only: for jobs beside a training run (sample, evaluate): they neither
    clean up its in-progress saves nor move its checkpoints aside."""
    # Orbax writes through TensorStore, which needs absolute paths (local or gs://).
    path = epath.Path(workdir)
    self.workdir = path if path.is_absolute() or '://' in str(workdir) else path.absolute()
    self.directory = self.workdir / CHECKPOINT_DIR
    self._config_json = json.loads(config.to_json_best_effort())
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, int(config.train.checkpoint_every)),
        max_to_keep=int(config.train.keep_checkpoints) or None,
        enable_async_checkpointing=True,
        create=not read_only,
        # Saves cut short (killed mid-write) never count; a reader must not remove
        # the saves a running training job is still writing.
        cleanup_tmp_directories=not read_only,
    )
    self.read_only = read_only
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=('state', 'data', 'config'),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler(),
                       'config': ocp.JsonCheckpointHandler()})

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any | None, force: bool = False) -> bool:
    """Starts an async save of `step` if it is due (or `force`); True if started."""
    if step in self._manager.all_steps():
      return False  # e.g. the final save right after a periodic one
    items = dict(state=ocp.args.StandardSave(state),
                 config=ocp.args.JsonSave(self._config_json))
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iter))
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info('Checkpoint of step %d started in %s.', step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any, data_iter: Any | None) -> Any:
    """Restores `step` onto the shardings of `abstract_state`; positions `data_iter`.

    A state saved with the trunk's blocks in the other layout (`model.scan_layers`)
    is read in its own layout and converted.
    """
    saved_layout = convert.scan_layers_of(self._manager.item_metadata(step)['state'])
    target = _in_layout(abstract_state, saved_layout)
    items = dict(state=ocp.args.StandardRestore(target))
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return _relaid_out(restored['state'], abstract_state, f'checkpoint step {step}')

  def restore_latest(self, abstract_state: Any, data_iter: Any | None
                     ) -> tuple[Any, int] | None:
    """(state, step) from the newest restorable step, or None if there is none.

    Steps are tried newest first. The newer steps that failed while an older one
    restores are damaged: each is logged with its reason and moved aside (unless
    read-only). If every step fails, nothing is moved and the run stops: starting
    from scratch would silently discard the training done so far, and a failure
    shared by every step points at the run's setup, not at the files. On several
    processes a step counts as restored only if it restored on all of them.
    """
    self._manager.wait_until_finished()
    failures: list[tuple[int, str]] = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state, reason = self.restore(step, abstract_state, data_iter), ''
      except Exception as e:  # pylint: disable=broad-except
        state, reason = None, f'{type(e).__name__}: {e}'
      if not _restored_everywhere(not reason, step):
        reason = reason or 'restored here but not on every process'
        logging.error('Checkpoint step %d in %s cannot be restored (%s); trying the one '
                      'before it.', step, self.directory, reason)
        failures.append((step, reason))
        continue
      for bad, _ in failures:
        self._quarantine(bad)
      logging.info('Restored checkpoint step %d from %s.', step, self.directory)
      return state, step
    if failures:
      raise RuntimeError(
          f'no checkpoint in {self.directory} could be restored, and none was moved. When '
          'every step fails alike, the run differs from the one that saved them: compare '
          'the model, train.rng_impl, data.worker_count and the process count with the '
          "config saved beside each step ('config' item).\n"
          + '\n'.join(f'step {step}: {reason}' for step, reason in failures))
    return None

  def _quarantine(self, step: int) -> None:
    """Moves a damaged step out of the manager's directory, so it can be saved again."""
    if self.read_only:
      logging.error('Checkpoint step %d in %s looks damaged; left in place (read-only).',
                    step, self.directory)
      return
    if jax.process_index() == 0:
      dest = self.workdir / CORRUPT_DIR / f'{step}.{int(time.time())}'
      dest.parent.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(dest)  # epath: local disks and gs:// alike
      logging.error('Moved the damaged checkpoint step %d to %s.', step, dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'mmgen_quarantine_{step}')
    self._manager.reload()

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, then releases the manager."""
    self._manager.close()


WEIGHTS = ('params', 'ema_params')


def load_weights(source: str | os.PathLike, abstract_state: Any, *, fresh: Any = None,
                 fresh_pattern: str = '') -> dict[str, Any]:
  """The weights and EMA weights of another run, for `config.train.init_from`.

  `source` is a run's workdir, its `checkpoints/` directory or one step
  directory; a directory of steps gives its newest finished step. Returns
  {'params', 'ema_params'} placed on the shardings of `abstract_state`'s;
  the optimizer, step, RNG and data position stay the new run's. The saved
  trees must have the model's names and shapes (dtypes are cast); otherwise
  the error lists every difference. Except: leaves the checkpoint lacks whose
  path ('params/blocks/cross_attn/q_kernel') matches the regular expression
  `fresh_pattern` (`config.train.init_fresh`) keep their values in the state
  `fresh` (the new run's initialisation), e.g. layers added to a trained model.
  """
  step_dir = _newest_step_dir(source)
  where = f'config.train.init_from={str(source)!r} ({step_dir})'
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    saved = checkpointer.metadata(step_dir / 'state').item_metadata.tree
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{where}: cannot read the saved train state: {type(e).__name__}: {e}') from e
  wanted = {name: getattr(abstract_state, name) for name in WEIGHTS}
  target = _in_layout(wanted, convert.scan_layers_of(saved))
  problems = [p for name in WEIGHTS for p in _differences(name, saved, target[name])]
  absent = ': not in the checkpoint'
  kept = {p.removesuffix(absent) for p in problems if fresh_pattern and p.endswith(absent)
          and re.search(fresh_pattern, p.removesuffix(absent))}
  problems = [p for p in problems if p.removesuffix(absent) not in kept]
  if kept and fresh is None:
    raise ValueError(f'{where}: config.train.init_fresh={fresh_pattern!r} keeps {len(kept)} '
                     'parameters fresh but no fresh state was given.')
  if problems:
    shown = '\n'.join(f'  - {p}' for p in problems[:20])
    more = f'\n  ... and {len(problems) - 20} more' if len(problems) > 20 else ''
    raise ValueError(f'{where} does not fit this model ({len(problems)} difference(s)); '
                     f'compare config.model with the config saved beside it:\n{shown}{more}')
  target = _pruned(target, kept)
  restored = checkpointer.restore(step_dir / 'state', args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))
  logging.info('Initialised the weights and EMA weights from %s.', step_dir)
  if kept:
    logging.info('%d parameters not in %s keep their initial values (config.train.init_fresh='
                 '%r), e.g. %s.', len(kept), step_dir, fresh_pattern, sorted(kept)[0])
    fresh_weights = {name: getattr(fresh, name) for name in WEIGHTS}
    restored = _filled(restored, _in_layout(fresh_weights, convert.scan_layers_of(saved)))
  return _relaid_out(restored, wanted, where)


def _pruned(tree: Any, drop: set[str], prefix: str = '') -> Any:
  """Nested dicts without the leaves at the '/'-joined paths `drop` (empty dicts removed)."""
  if not isinstance(tree, dict) or not drop:
    return tree
  out = {}
  for key, value in tree.items():
    path = f'{prefix}/{key}' if prefix else str(key)
    if isinstance(value, dict):
      value = _pruned(value, drop, path)
      if value:
        out[key] = value
    elif path not in drop:
      out[key] = value
  return out


def _filled(tree: Any, full: Any) -> Any:
  """`full`'s nested dicts with `tree`'s leaves wherever `tree` has them."""
  if not isinstance(full, dict):
    return full if tree is None else tree
  tree = tree or {}
  return {key: _filled(tree.get(key), value) for key, value in full.items()}


def _in_layout(abstract_state: Any, scan_layers: bool | None) -> Any:
  """`abstract_state` with its trunk in the saved layout (None: as it is)."""
  return abstract_state if scan_layers is None else convert.to_layout(abstract_state, scan_layers)


def _relaid_out(state: Any, abstract_state: Any, what: str) -> Any:
  """A restored state in the layout and on the shardings of `abstract_state`."""
  wanted = convert.scan_layers_of(abstract_state)
  if wanted is None or convert.scan_layers_of(state) == wanted:
    return state
  logging.warning('%s holds the trunk\'s blocks %s; converted to this run\'s layout '
                  '(config.model.scan_layers=%s).', what,
                  'per block' if wanted else 'stacked', wanted)
  return jax.tree.map(lambda x, a: jax.device_put(x, a.sharding) if a.sharding else x,
                      convert.to_layout(state, wanted), abstract_state)


def _newest_step_dir(source: str | os.PathLike) -> epath.Path:
  path = epath.Path(source)
  if (path / 'state').is_dir():
    return path
  steps_dir = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
  steps = ocp.utils.checkpoint_steps(steps_dir) if steps_dir.is_dir() else []
  if not steps:
    raise FileNotFoundError(
        f'config.train.init_from={str(source)!r}: no finished checkpoint there; expected a '
        f'run\'s workdir, its {CHECKPOINT_DIR}/ directory or one step directory (with state/).')
  return steps_dir / str(max(steps))


def _differences(name: str, saved: Any, model: Any) -> list[str]:
  """Leaves of `model` that are missing or shaped differently under saved[name], and extras."""
  if name not in saved:
    return [f'the checkpoint has no {name!r} (it has {sorted(saved)})']
  def shapes(tree):  # by 'a/b/0/c' paths: Orbax's metadata spells list indices as strings
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {'/'.join([name, *(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)]):
            tuple(leaf.shape) for path, leaf in leaves}
  have, want = shapes(saved[name]), shapes(model)
  out = [f'{k}: saved {have[k]}, model {want[k]}'
         for k in sorted(want.keys() & have.keys()) if have[k] != want[k]]
  out += [f'{k}: not in the checkpoint' for k in sorted(want.keys() - have.keys())]
  out += [f'{k}: in the checkpoint, not in the model' for k in sorted(have.keys() - want.keys())]
  return out


def _restored_everywhere(ok: bool, step: int) -> bool:
  """Whether every process restored `step` (one process: `ok` itself)."""
  if jax.process_count() == 1:
    return ok
  oks = multihost_utils.process_allgather(np.asarray(ok, np.int32))
  if not np.all(oks):
    logging.error('Checkpoint step %d: restored on processes %s of %d.', step,
                  np.flatnonzero(oks).tolist(), jax.process_count())
  return bool(np.all(oks))
