"""Starting local worker processes that join one JAX job on 127.0.0.1."""

import json
import os
import pathlib
import socket
import subprocess
import sys


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_workers(script: str, *args: str, out_dir: pathlib.Path, num_processes: int = 2,
                timeout: float = 300) -> list[dict]:
  """Runs `script <index> <port> *args <out.json>` once per process; returns their JSON reports.

  The workers set their own device count (XLA_FLAGS is not inherited) and find
  this repository on PYTHONPATH. A worker that fails raises with its log's tail.
  """
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [repo, env.get('PYTHONPATH')]))
  outs = [out_dir / f'process{i}.json' for i in range(num_processes)]
  procs = [subprocess.Popen([sys.executable, script, str(i), str(port), *args, str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i, out in enumerate(outs)]
  try:
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, p in enumerate(procs):
    assert p.returncode == 0, f'process {i} failed:\n{logs[i][-3000:]}'
  return [json.loads(out.read_text()) for out in outs]
