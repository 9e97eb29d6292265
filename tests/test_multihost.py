"""Two local processes (2 CPU devices each) train like one process with 4 devices,
and a SIGTERM to one of them stops both at the same step with one checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import multiprocess

SCRIPT = os.path.join(os.path.dirname(__file__), 'tiny_task.py')
COMPARED = 5  # steps compared with the single process


def _start(workdir, devices, num_steps, *extra):
  # The device count must be in the environment before JAX starts in the child.
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  cmd = [sys.executable, SCRIPT, f'--workdir={workdir}', f'--num_steps={num_steps}',
         '--mesh=-1,2,1', f'--checkpoint_every={COMPARED}', *extra]
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _result(proc, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-4000:]
  line = next(l for l in out.splitlines() if l.startswith('RESULT '))
  result = json.loads(line[len('RESULT '):])
  history = {int(k): v for k, v in result['loss_history'].items()}
  return result, np.array([history[s] for s in sorted(history)])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one_process_and_stop_together_on_sigterm(tmp_path):
  port = multiprocess.free_port()
  multi = tmp_path / 'multi'
  procs = [_start(multi, 2, 10**6, f'--coordinator=127.0.0.1:{port}', '--num_processes=2',
                  f'--process_id={i}') for i in range(2)]
  single = _start(tmp_path / 'single', 4, COMPARED)
  try:
    first_ckpt = multi / 'checkpoints' / str(COMPARED)
    deadline = time.time() + 300
    while not first_ckpt.exists() and time.time() < deadline:
      assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-4000:]
      time.sleep(0.2)
    assert first_ckpt.exists(), 'the two processes did not reach the first checkpoint'
    procs[1].send_signal(signal.SIGTERM)  # a preemption notice to one host only
    results = [_result(p) for p in procs]
    _, reference = _result(single)
  finally:
    for p in procs + [single]:
      if p.poll() is None:
        p.kill()

  assert [r['process'] for r, _ in results] == [0, 1]
  (r0, losses0), (r1, losses1) = results
  # Same global batches, same numbers as one process with 4 devices.
  np.testing.assert_allclose(losses0[:COMPARED], reference, rtol=1e-5)
  np.testing.assert_array_equal(losses0, losses1)
  # Both agreed on the step to stop at and saved it (each its own iterator position).
  assert r0['preempted'] and r1['preempted'] and r0['step'] == r1['step'] > COMPARED
  data_dir = multi / 'checkpoints' / str(r0['step']) / 'data'
  assert sorted(p.name for p in data_dir.glob('*.json')) == ['process_0-of-2.json',
                                                             'process_1-of-2.json']
