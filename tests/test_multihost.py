"""Two local processes (2 CPU devices each) train like one process with 4 devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), 'tiny_task.py')
STEPS = 4


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(workdir, devices, *extra):
  # The device count must be in the environment before JAX starts in the child.
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  cmd = [sys.executable, SCRIPT, '--workdir', str(workdir), '--num_steps', str(STEPS),
         '--mesh=-1,2,1', *extra]
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _result(proc, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-4000:]
  line = next(l for l in out.splitlines() if l.startswith('RESULT '))
  result = json.loads(line[len('RESULT '):])
  return result, np.array([result['loss_history'][str(s)] for s in range(1, STEPS + 1)])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one_process_with_four_devices(tmp_path):
  port = _free_port()
  procs = [_start(tmp_path / 'multi', 2, f'--coordinator=127.0.0.1:{port}',
                  '--num_processes=2', f'--process_id={i}') for i in range(2)]
  single = _start(tmp_path / 'single', 4)
  try:
    results = [_result(p) for p in procs]
    _, reference = _result(single)
  finally:
    for p in procs + [single]:
      if p.poll() is None:
        p.kill()
  assert [r['process'] for r, _ in results] == [0, 1]
  for r, losses in results:
    assert r['step'] == STEPS
    np.testing.assert_allclose(losses, reference, rtol=1e-5)
  # Both processes wrote their part of the final checkpoint and their iterator state.
  data_dir = tmp_path / 'multi' / 'checkpoints' / str(STEPS) / 'data'
  assert sorted(p.name for p in data_dir.glob('*.json')) == ['process_0-of-2.json',
                                                             'process_1-of-2.json']
