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
from mmgen_jax import plan
from mmgen_jax.data import pipeline
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
  # Every block counted (XLA counts a scanned trunk's body once): within the
  # analytic count's margin, not a 1/depth fraction of it.
  analytic = 3 * _config().data.global_batch_size * plan.analytic_forward_flops(_config())
  counted = result['flops_per_step_per_device'] * jax.device_count()
  assert 0.8 < counted / analytic < 1.3, (counted, analytic)
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


def test_init_from_starts_a_new_run_from_another_runs_weights(straight, tmp_path):
  """train.init_from: the straight run's weights and EMA, a fresh optimizer, step 0."""
  source, _, source_state = straight
  # One step at a vanishing learning rate leaves the loaded weights as they were.
  config = _config(**{'train.num_steps': 1, 'train.init_from': source,
                      'optim.learning_rate': 1e-12})
  workdir = str(tmp_path)
  train.train_and_evaluate(config, workdir, parts=tiny_task.make_parts(config))
  state, step = _final_state(workdir, config)
  assert step == 1 and int(state.step) == 1
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(source_state.params),
                       strict=True):
    np.testing.assert_allclose(got, want, atol=1e-9)
  decay = float(ts.ema_decay_at(0, config.optim.ema_decay))  # the EMA moves on from the loaded one
  for got, ema, params in zip(jax.tree.leaves(state.ema_params),
                              jax.tree.leaves(source_state.ema_params),
                              jax.tree.leaves(source_state.params), strict=True):
    np.testing.assert_allclose(got, decay * ema + (1 - decay) * params, rtol=1e-5, atol=1e-6)
  counts = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) == 0]
  assert counts and all(int(c) == 1 for c in counts)  # Adam's own, one step old
  # Once the run has checkpoints of its own, it resumes from them.
  again = _config(**{'train.num_steps': 2, 'train.init_from': str(tmp_path / 'nowhere'),
                     'optim.learning_rate': 1e-12})
  resumed = train.train_and_evaluate(again, workdir, parts=tiny_task.make_parts(again))
  assert sorted(resumed['loss_history']) == [2]


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


def _kill_during_or_right_after_a_save(proc, checkpoints, after_step: int) -> list[str]:
  """SIGKILLs `proc` as soon as a save of a step past `after_step` is being written
  (Orbax's temporary directory) or has just been committed; returns what it left."""
  def steps():
    names = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
    return names, [int(n.split('.')[0]) for n in names if n.split('.')[0].isdigit()]

  deadline = time.monotonic() + 300
  while time.monotonic() < deadline:
    assert proc.poll() is None, 'the run ended before it was killed'
    if any(step > after_step for step in steps()[1]):
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return steps()[0]
    time.sleep(0.002)
  raise AssertionError(f'no save past step {after_step} in {checkpoints} within 300 s')


@pytest.mark.slow
def test_kill_9_during_an_async_save_then_the_same_command_resumes_exactly(straight, tmp_path):
  """A real SIGKILL (no handler, no final save) while or just after step 2+ is saved."""
  _, ref, ref_state = straight
  workdir = tmp_path / 'killed'
  # The run of `straight`, with a save after every step so the kill lands mid-run.
  cmd = [sys.executable, tiny_task.__file__, f'--workdir={workdir}', f'--num_steps={STEPS}',
         '--mesh=-1,2,1', '--checkpoint_every=1']
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  log = tmp_path / 'killed.log'
  with open(log, 'w') as out:  # a file, not a pipe nobody reads, which could fill and block
    killed = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
      left = _kill_during_or_right_after_a_save(killed, workdir / 'checkpoints', after_step=1)
    except AssertionError as e:
      raise AssertionError(f'{e}\n{log.read_text()[-3000:]}') from None
    finally:
      if killed.poll() is None:
        killed.kill()
  assert killed.returncode == -signal.SIGKILL
  committed = sorted(int(name) for name in left if name.isdigit())
  assert STEPS not in committed, left  # the run was cut short

  again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  line = next(l for l in again.stdout.splitlines() if l.startswith('RESULT '))
  resumed = {int(k): v for k, v in json.loads(line[len('RESULT '):])['loss_history'].items()}
  # It resumed from the newest committed step; a half-written one does not count.
  assert sorted(resumed) == list(range(max(committed, default=0) + 1, STEPS + 1)), left
  assert resumed == {s: ref['loss_history'][s] for s in resumed}
  state, _ = _final_state(str(workdir), _config())
  _assert_bitwise_equal(state, ref_state)


def test_sigint_also_asks_to_stop():
  # The handler to restore is whatever the process had: Python's default, or SIG_IGN when
  # the tests run as a background job of a non-interactive shell.
  before = signal.getsignal(signal.SIGINT)
  with train.StopSignals() as stop:
    assert not stop.should_stop(1)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)  # Python runs handlers between bytecodes of the main thread
    assert stop.should_stop(2) and stop.received == 'SIGINT'
  assert signal.getsignal(signal.SIGINT) is before


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


# ---- optimizer pieces ---------------------------------------------------------------------


def test_ema_params_are_the_ema_of_the_parameter_history():
  """e_0 = p_0, e_(s+1) = d_s e_s + (1 - d_s) p_(s+1) with d_s = min(decay, (1 + s) / (10 + s))."""
  decay = 0.2  # the warm-up (1 + s) / (10 + s) reaches it at s = 2: both branches are used
  config = _config(**{'optim.ema_decay': decay})
  mesh = parallel.make_mesh(dict(data=2, fsdp=1, tensor=1), jax.devices()[:2])
  schedule = ts.make_schedule(config.optim, 10)
  tx = ts.make_optimizer(config.optim, schedule)
  plan = ts.plan_train_state(tiny_task.make_model_fn(config), tx, mesh, config.sharding_rules,
                             0, config.train.rng_impl)
  step = ts.jit_train_step(
      ts.make_train_step(plan.graphdef, tiny_task.loss_fn, tx, schedule, ema_decay=decay,
                         rng_impl=config.train.rng_impl),
      plan.shardings, parallel.batch_sharding(mesh, config.sharding_rules), mesh)
  data = tiny_task.make_data_iter(config, 0, 1)
  state = plan.init()
  history = [jax.device_get(state.params)]
  for _ in range(4):
    state, _ = step(state, pipeline.to_global_batch(next(data), mesh, config.sharding_rules))
    history.append(jax.device_get(state.params))

  expected = jax.tree.map(np.float64, history[0])
  for s, params in enumerate(history[1:]):
    d = min(decay, (1 + s) / (10 + s))
    expected = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * p, expected, params)
  ema = jax.device_get(state.ema_params)
  assert jax.tree.structure(ema) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(ema), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_warmup_then_cosine_schedule():
  config = _config(**{'optim.warmup_steps': 10, 'optim.schedule': 'cosine',
                      'optim.learning_rate': 1e-3})
  lr = ts.make_schedule(config.optim, 110)
  np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(60), lr(110)],
                             [0.0, 5e-4, 1e-3, 5e-4, 0.0], atol=1e-9)
  with pytest.raises(ValueError, match="schedule='linear' is not one of"):
    ts.make_schedule(_config(**{'optim.schedule': 'linear'}).optim, 10)


def test_gradient_accumulation_matches_one_big_batch():
  """With a loss that uses no randomness, 4 micro-batches == the whole batch at once."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def loss_fn(model, batch, rng):
    del rng
    x = jnp.concatenate([batch['rgb'], batch['depth']], -1)
    err = model(x, jnp.full((x.shape[0],), 0.5), batch['label']) ** 2
    return err.mean(), {'loss/all': err.mean()}

  config = _config()
  mesh = parallel.make_mesh(dict(data=2, fsdp=1, tensor=1), jax.devices()[:2])
  schedule = ts.make_schedule(config.optim, 10)
  tx = ts.make_optimizer(config.optim, schedule)
  plan = ts.plan_train_state(tiny_task.make_model_fn(config), tx, mesh, config.sharding_rules,
                             0, config.train.rng_impl)
  init = jax.device_get(plan.init())
  batch = pipeline.to_global_batch(next(tiny_task.make_data_iter(config, 0, 1)), mesh,
                                   config.sharding_rules)
  out = {}
  for k in (1, 4):
    step = ts.jit_train_step(
        ts.make_train_step(plan.graphdef, loss_fn, tx, schedule, ema_decay=0.9,
                           grad_accum_steps=k, rng_impl=config.train.rng_impl),
        plan.shardings, parallel.batch_sharding(mesh, config.sharding_rules), mesh)
    state, metrics = step(jax.device_put(init, plan.shardings), batch)
    out[k] = jax.device_get((state.params, metrics))
  np.testing.assert_allclose(out[4][1]['loss'], out[1][1]['loss'], rtol=1e-6)
  np.testing.assert_allclose(out[4][1]['grad_norm'], out[1][1]['grad_norm'], rtol=1e-5)
  # Adam's first update is ~lr * sign(grad), so near-zero gradients turn float summation
  # order into visible parameter differences; 1e-5 is a thousandth of the step (lr 1e-2).
  for a, b in zip(jax.tree.leaves(out[4][0]), jax.tree.leaves(out[1][0]), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)


# ---- the real model, objective, pipeline and sampler ----------------------------------------


@pytest.mark.slow
def test_end_to_end_with_the_real_parts(tmp_path):
  """The DiT + decoupled objective + Grain pipeline + sampler, 2 steps on built scenes."""
  from configs import tiny_cpu  # pylint: disable=g-import-not-at-top
  from mmgen_jax.data import tfds_scenes  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / 'tfds')
  tfds_scenes.build('res32_n16_8', data_dir)
  config = tiny_cpu.get_config()
  config.data.builder_config, config.data.data_dir = 'res32_n16_8', data_dir
  config.data.global_batch_size = 8
  config.model.hidden_size, config.model.depth, config.model.num_heads = 32, 1, 2
  config.allow_narrow_patch = True
  config.train.num_steps, config.train.log_every = 2, 1
  config.train.sample_every, config.train.checkpoint_every = 2, 2
  config.train.rng_impl = 'rbg'
  config.sample.num_steps, config.sample.num_images = 2, 2
  config.mesh.fsdp = 2
  workdir = str(tmp_path / 'work')
  result = train.train_and_evaluate(config, workdir)
  assert result['step'] == 2 and np.isfinite(result['loss'])
  for name in ('rgb', 'depth', 'normal', 'segmentation'):
    assert np.isfinite(result[f'loss/{name}']), name
  assert sorted(os.listdir(os.path.join(workdir, 'samples'))) == [
      'step_000002_from_rgb.png', 'step_000002_joint.png']
  assert checkpoint.Checkpointer(workdir, config).all_steps() == [2]

  # The evaluation job on the same checkpoint: every validation record scored once.
  from mmgen_jax import evaluate  # pylint: disable=g-import-not-at-top
  config.eval.num_examples = 0
  scores = evaluate.evaluate(config, workdir)
  assert scores['eval/num_examples'] == 8 and scores['eval/skipped_records'] == 0
  for key in ('depth/abs_rel', 'depth/delta1', 'normal/mean_deg', 'segmentation/miou'):
    assert np.isfinite(scores[f'eval/{key}']) and np.isfinite(scores[f'eval/baseline/{key}']), key
  assert 0.0 <= scores['eval/depth/delta1'] <= 1.0
  assert 0.0 <= scores['eval/normal/mean_deg'] <= 180.0
  assert os.path.exists(os.path.join(workdir, 'eval', 'step_000002.json'))


def test_ema_decay_warms_up_then_holds():
  decays = [float(ts.ema_decay_at(s, 0.999)) for s in (0, 10, 1000, 100000)]
  np.testing.assert_allclose(decays, [0.1, 11 / 20, 1001 / 1010, 0.999], rtol=1e-6)
