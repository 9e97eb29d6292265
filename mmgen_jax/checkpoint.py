"""The one module that talks to Orbax: train state + data iterator + config.

Layout: `<workdir>/checkpoints/<step>/{state, data, config}`.
  state   the TrainState pytree (params, EMA, optimizer, step, RNG), sharded;
  data    the Grain iterator position, one JSON file per process;
  config  the run's config as JSON, for people reading the directory.

Saves are asynchronous (the arrays are copied off the devices before `save`
returns, so the next step may donate them). A restore reads onto whatever
shardings the caller asks for, so a run saved on one mesh resumes on another.
A latest step that cannot be restored (damaged or missing files) is logged,
moved aside to `<workdir>/corrupt_checkpoints/` and the previous step is used.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp

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

  def __init__(self, workdir: str | os.PathLike, config: ml_collections.ConfigDict):
    # Orbax writes through TensorStore, which needs absolute paths (local or gs://).
    path = epath.Path(workdir)
    self.workdir = path if path.is_absolute() or '://' in str(workdir) else path.absolute()
    self.directory = self.workdir / CHECKPOINT_DIR
    self._config_json = json.loads(config.to_json_best_effort())
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, int(config.train.checkpoint_every)),
        max_to_keep=int(config.train.keep_checkpoints) or None,
        enable_async_checkpointing=True,
        create=True,
        cleanup_tmp_directories=True,  # saves cut short (killed mid-write) never count
    )
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
    """Restores `step` onto the shardings of `abstract_state`; positions `data_iter`."""
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored['state']

  def restore_latest(self, abstract_state: Any, data_iter: Any | None
                     ) -> tuple[Any, int] | None:
    """(state, step) from the newest restorable step, or None if there is none.

    A step that fails to restore is logged with the reason and moved aside, and
    the one before it is tried; if every step fails the run stops (starting
    from scratch would silently discard the training done so far).
    """
    self._manager.wait_until_finished()
    failures = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state = self.restore(step, abstract_state, data_iter)
      except Exception as e:  # pylint: disable=broad-except
        reason = f'{type(e).__name__}: {e}'
        logging.error('Checkpoint step %d in %s cannot be restored (%s); falling back to the '
                      'previous checkpoint.', step, self.directory, reason)
        failures.append(f'step {step}: {reason}')
        self._quarantine(step)
        continue
      logging.info('Restored checkpoint step %d from %s.', step, self.directory)
      return state, step
    if failures:
      raise RuntimeError(f'no checkpoint in {self.directory} could be restored (moved to '
                         f'{self.workdir / CORRUPT_DIR}):\n' + '\n'.join(failures))
    return None

  def _quarantine(self, step: int) -> None:
    """Moves a bad step out of the manager's directory, so the step can be saved again."""
    if jax.process_index() == 0:
      dest = self.workdir / CORRUPT_DIR / f'{step}.{int(time.time())}'
      dest.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(os.fspath(self.directory / str(step)), os.fspath(dest))
      logging.error('Moved the bad checkpoint step %d to %s.', step, dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'mmgen_quarantine_{step}')
    self._manager.reload()

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, then releases the manager."""
    self._manager.close()
