"""The training loop: exact resume, preemption, NaN stop, summaries and samples."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mmgen_jax import checkpoint
from mmgen_jax import train
from mmgen_jax import train_state as ts
from mmgen_jax import parallel
from tests import tiny_task

STEPS = 6  # 2N


def _config(**overrides):
  return tiny_task.tiny_config(**{'train.num_steps': STEPS, 'train.checkpoint_every': 3,
                                  'mesh.fsdp': 2, **overrides})


def _final_state(workdir, config):
  """The state saved at the last step, read back on the config's mesh."""
  mesh = parallel.make_mesh(config.mesh)
  tx = ts.make_optimizer(config.optim, ts.make_schedule(config.optim, config.train.num_steps))
  plan = ts.plan_train_state(tiny_task.make_model_fn(config), tx, mesh, config.sharding_rules,
                             config.seed, config.train.rng_impl)
  ckpt = checkpoint.Checkpointer(workdir, config)
  state, step = ckpt.restore_latest(plan.abstract, None)
  ckpt.close()
  return jax.device_get(state), step


def _assert_bitwise_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """2N steps in one go, with sample grids at step 3 and 6."""
  workdir = str(tmp_path_factory.mktemp('straight'))
  config = _config(**{'train.sample_every': 3})
  result = train.train_and_evaluate(config, workdir, parts=tiny_task.make_parts(config))
  state, step = _final_state(workdir, config)
  assert step == STEPS
  return workdir, result, state


def test_straight_run_learns_and_writes_summaries_and_samples(straight):
  workdir, result, _ = straight
  assert result['step'] == STEPS and not result['preempted']
  assert sorted(result['loss_history']) == list(range(1, STEPS + 1))
  assert result['loss'] < result['loss_history'][1]
  for key in ('loss/rgb', 'loss/depth', 'grad_norm', 'learning_rate'):
    assert np.isfinite(result[key]), key
  assert result['flops_per_step_per_device'] > 0
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))
  samples = sorted(os.listdir(os.path.join(workdir, 'samples')))
  assert samples == ['step_000003_joint.png', 'step_000006_joint.png']
  assert checkpoint.Checkpointer(workdir, _config()).all_steps() == [3, 6]


def test_resume_is_exact(straight, tmp_path):
  """N steps, stop, N more from the checkpoint == 2N straight, bit for bit (on CPU)."""
  _, ref, ref_state = straight
  workdir = str(tmp_path)
  first = train.train_and_evaluate(_config(**{'train.num_steps': STEPS // 2}), workdir,
                                   parts=tiny_task.make_parts(_config()))
  assert first['step'] == STEPS // 2
  second = train.train_and_evaluate(_config(), workdir, parts=tiny_task.make_parts(_config()))
  assert sorted(second['loss_history']) == list(range(STEPS // 2 + 1, STEPS + 1))
  # Same program, same inputs, same data order and per-step keys: identical floats.
  assert {**first['loss_history'], **second['loss_history']} == ref['loss_history']
  state, _ = _final_state(workdir, _config())
  _assert_bitwise_equal(state, ref_state)


def test_sigterm_saves_at_the_step_boundary_and_resume_is_exact(straight, tmp_path):
  _, ref, ref_state = straight
  workdir = str(tmp_path)
  config = _config()
  # The data pipeline sends SIGTERM to this process while loading step 4's batch.
  stopped = train.train_and_evaluate(config, workdir,
                                     parts=tiny_task.make_parts(config, sigterm_at_step=4))
  assert stopped['preempted'] and stopped['step'] == 4
  assert checkpoint.Checkpointer(workdir, config).all_steps() == [3, 4]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers are restored
  resumed = train.train_and_evaluate(config, workdir, parts=tiny_task.make_parts(config))
  assert sorted(resumed['loss_history']) == [5, 6]
  assert {**stopped['loss_history'], **resumed['loss_history']} == ref['loss_history']
  state, _ = _final_state(workdir, config)
  _assert_bitwise_equal(state, ref_state)


def test_sigint_also_asks_to_stop():
  with train.StopSignals() as stop:
    assert not stop.should_stop(1)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)  # Python runs handlers between bytecodes of the main thread
    assert stop.should_stop(2) and stop.received == 'SIGINT'
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_nan_loss_stops_with_the_step_and_modality_losses(tmp_path):
  config = _config(**{'train.checkpoint_every': 1})
  with pytest.raises(train.NonFiniteLossError) as err:
    train.train_and_evaluate(config, str(tmp_path),
                             parts=tiny_task.make_parts(config, nan_at_step=3))
  message = str(err.value)
  assert 'loss is nan at step 3' in message
  assert 'loss/rgb=nan' in message and 'loss/depth=' in message
  assert 'last good checkpoint is step 2' in message
  assert checkpoint.Checkpointer(str(tmp_path), config).all_steps() == [1, 2]


@pytest.mark.slow
def test_sigterm_to_a_training_process_then_resume(tmp_path):
  workdir = str(tmp_path)
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  cmd = [sys.executable, os.path.join(os.path.dirname(__file__), 'tiny_task.py'),
         '--workdir', workdir, '--num_steps', '100000', '--checkpoint_every', '5',
         '--mesh=-1,2,1']
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  first_ckpt = os.path.join(workdir, 'checkpoints', '5')
  deadline = time.time() + 240
  while not os.path.exists(first_ckpt) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.1)
  assert os.path.exists(first_ckpt), 'training did not reach step 5'
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  result = next(line for line in out.splitlines() if line.startswith('RESULT '))
  result = json.loads(result[len('RESULT '):])
  assert result['preempted']
  stopped_at = result['step']
  assert 'SIGTERM received' in err
  config = _config(**{'train.num_steps': stopped_at + 2, 'train.checkpoint_every': 5})
  assert checkpoint.Checkpointer(workdir, config).latest_step() == stopped_at
  resumed = train.train_and_evaluate(config, workdir, parts=tiny_task.make_parts(config))
  assert sorted(resumed['loss_history']) == [stopped_at + 1, stopped_at + 2]
