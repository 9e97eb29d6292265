r"""This project's train step against the official MMGen (PyTorch) at the same size, as JSON.

Both sides train SiT-S/2 on MMGen's four-modality layout: width 384, depth 12,
6 heads, patch 2, 4 modalities × 4 latent channels at 32×32 (256 tokens),
batch 8, the REPA projector after block 8 with its loss (coefficient 0.5,
random stand-in targets), AdamW with gradient clipping, and the EMA update.
The official side is MMGen's `models/sit.py` and `loss.py` run with the flags
of its scripts/train_imagenet.sh (--is-mmcat-diff --num-tasks=4
--use-decouple-task --use-decouple-rand1 --use-taskcond-emb
--ratio-train-onlyrgb=0.5 --use-quarter-mixing --use-diff-task-weight) and the
optimisation step of its train.py; this side is `bench/train_step.py`'s
`mmgen_s2` case.

Each side runs in its own worker process, pinned to the same CPUs (so torch's
intra-op threads and XLA's thread pool both get `--cpus`), and the two take
turns: round r runs `--steps` steps of the official side, then `--steps` of
this side, so a shared machine's load falls on both alike. The JSON gives each
side's step times, their minimum and median, the CPU seconds its process spent
per step (all threads; spin-waiting threads count too), and the ratio ours /
official. A loaded machine slows torch's OpenMP threads more than XLA's pool:
`--cpus=0` (one CPU, one thread each) compares them without that.

PyTorch is not a dependency of this project: the official side runs under
`--torch_python`, a Python with torch and timm installed (e.g. a venv made with
`pip install torch timm numpy`), reading the official code from
`--mmgen_path`, an unpacked checkout of github.com/jiepengwang/MMGen.

  python bench/peer_mmgen_torch.py --mmgen_path=/path/to/MMGen \
      --torch_python=/path/to/torch-venv/bin/python [--rounds=5] [--steps=3] \
      [--dtype=float32|bfloat16] [--cpus=0,1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

# The size both sides run (MMGen's SiT-S/2 at 256-pixel latents).
HIDDEN, DEPTH, HEADS, PATCH = 384, 12, 6, 2
MODALITIES, LATENT_CHANNELS, SIDE = 4, 4, 32
BATCH, ENCODER_DEPTH, Z_DIM, NUM_CLASSES = 8, 8, 768, 1000
PROJ_COEFF, TASK_WEIGHTS, EMA_DECAY = 0.5, (1.0, 0.2, 0.1, 0.1), 0.9999


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  p.add_argument('--mmgen_path', default=os.environ.get('MMGEN_PATH', ''),
                 help='Unpacked official MMGen checkout (has models/sit.py and loss.py).')
  p.add_argument('--torch_python', default='',
                 help='Python with torch and timm for the official side (default: this one).')
  p.add_argument('--rounds', type=int, default=5, help='Alternating rounds.')
  p.add_argument('--steps', type=int, default=3, help='Steps per side per round.')
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'],
                 help='Compute dtype (official: torch.autocast bf16; ours: model.dtype).')
  p.add_argument('--cpus', default='',
                 help='Comma-separated CPU ids both workers are pinned to (default: all usable).')
  p.add_argument('--role', default='compare', choices=['compare', 'torch', 'jax'],
                 help=argparse.SUPPRESS)
  return p.parse_args(argv)


def _pin(cpus: str) -> int:
  """Pins this process to `cpus` before a framework starts its threads; returns their count."""
  if cpus:
    os.sched_setaffinity(0, {int(c) for c in cpus.split(',')})
  return len(os.sched_getaffinity(0))


def _serve(run_steps, info: dict[str, Any]) -> None:
  """Worker loop: announce `info`, then for each line N on stdin run N steps and print
  their wall times and the process's CPU seconds per step (all its threads)."""
  print(json.dumps(info), flush=True)
  for line in sys.stdin:
    if not line.strip():
      break
    start = time.process_time()
    times = run_steps(int(line))
    cpu = (time.process_time() - start) / len(times)
    print(json.dumps({'times': times, 'cpu_per_step': cpu}), flush=True)


# ---- the official side (runs under --torch_python; imports nothing of this project) ------


def torch_worker(args: argparse.Namespace) -> None:
  threads = _pin(args.cpus)
  os.environ.setdefault('OMP_NUM_THREADS', str(threads))
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  sys.path.insert(0, args.mmgen_path)
  from loss import SILoss  # pylint: disable=g-import-not-at-top,import-error
  from models.sit import SiT_models  # pylint: disable=g-import-not-at-top,import-error

  torch.manual_seed(0)
  np.random.seed(0)
  model = SiT_models[f'SiT-S/{PATCH}'](
      input_size=SIDE, in_channels=LATENT_CHANNELS, num_classes=NUM_CLASSES,
      class_dropout_prob=0.1, z_dims=[Z_DIM], encoder_depth=ENCODER_DEPTH,
      num_tasks=MODALITIES, is_mmcat_diff=True, use_decouple_task=True,
      use_taskcond_emb=True, qk_norm=False, fused_attn=True)
  assert (model.blocks[0].attn.qkv.out_features, len(model.blocks)) == (3 * HIDDEN, DEPTH)
  trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
  ema = {name: p.detach().clone() for name, p in trained}
  loss_fn = SILoss(prediction='v', path_type='linear', weighting='uniform',
                   use_decouple_task=True, num_tasks=MODALITIES, ratio_train_onlyrgb=0.5,
                   use_quater_mixing=True, use_decouple_rand1=True)
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999),
                                weight_decay=0.0, eps=1e-8)
  x = torch.randn(BATCH, MODALITIES * LATENT_CHANNELS, SIDE, SIDE)
  y = torch.randint(0, NUM_CLASSES, (BATCH,))
  zs = [torch.randn(BATCH, (SIDE // PATCH) ** 2, Z_DIM)]
  autocast = torch.autocast('cpu', dtype=torch.bfloat16, enabled=args.dtype == 'bfloat16')
  model.train()

  def step() -> None:
    # train.py's step: per-task masked means weighted by --use-diff-task-weight, plus
    # proj_coeff × the REPA loss; backward, clip 1.0, AdamW, EMA.
    with autocast:
      loss, proj_loss, mask = loss_fn(model, x, dict(y=y), zs=zs)
    per_task = zip(loss.float().chunk(MODALITIES, dim=1),
                   mask[..., 0, 0].bool().chunk(MODALITIES, dim=1), TASK_WEIGHTS, strict=True)
    total = 0.0
    for task_loss, task_mask, weight in per_task:
      kept = task_loss.mean(dim=(1, 2, 3))[task_mask[:, 0]]
      if kept.numel():
        total = total + weight * kept.mean()
    total = total + PROJ_COEFF * proj_loss.mean()
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
      for name, p in trained:
        ema[name].mul_(EMA_DECAY).add_(p, alpha=1 - EMA_DECAY)

  def run_steps(n: int) -> list[float]:
    times = []
    for _ in range(n):
      start = time.perf_counter()
      step()
      times.append(time.perf_counter() - start)
    return times

  run_steps(1)  # warm-up
  _serve(run_steps, dict(side='official', framework=f'torch {torch.__version__}',
                         threads=torch.get_num_threads(),
                         params=sum(p.numel() for _, p in trained)))


# ---- this project's side ---------------------------------------------------------------


def jax_worker(args: argparse.Namespace) -> None:
  threads = _pin(args.cpus)
  import jax  # pylint: disable=g-import-not-at-top
  import step_timing  # bench/step_timing.py, beside this file  # pylint: disable=g-import-not-at-top
  config = step_timing.mmgen_config(args.dtype, BATCH, hidden=HIDDEN, depth=DEPTH, heads=HEADS,
                                   latent_side=SIDE, num_modalities=MODALITIES)
  prepared = step_timing.prepare(config)
  _serve(prepared.run, dict(side='ours', framework=f'jax {jax.__version__}', threads=threads,
                            params=prepared.params, compile_s=prepared.compile_s,
                            analytic_flops_per_step=prepared.analytic_flops))


# ---- the comparison -----------------------------------------------------------------------


class Worker:
  """A worker process: started, then asked for steps one request at a time."""

  def __init__(self, python: str, role: str, args: argparse.Namespace):
    cmd = [python, os.path.abspath(__file__), f'--role={role}', f'--mmgen_path={args.mmgen_path}',
           f'--dtype={args.dtype}', f'--cpus={args.cpus}']
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 cwd=os.path.dirname(os.path.abspath(__file__)))
    self.info = self._reply(f'the {role} worker ({" ".join(cmd)}) exited before it was ready')

  def _reply(self, failure: str) -> dict[str, Any]:
    while True:
      line = self.proc.stdout.readline()
      if not line:
        raise RuntimeError(f'{failure}; its error output is above.')
      if line.startswith('{'):  # anything else is the frameworks' own chatter
        return json.loads(line)

  def run(self, steps: int) -> dict[str, Any]:
    self.proc.stdin.write(f'{steps}\n')
    self.proc.stdin.flush()
    return self._reply('a worker died while running steps')

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait(timeout=60)


def check_inputs(args: argparse.Namespace) -> str:
  """Names what is missing for the official side; returns the Python to run it with."""
  missing = [f for f in ('models/sit.py', 'loss.py')
             if not os.path.isfile(os.path.join(args.mmgen_path, f))]
  if not args.mmgen_path or missing:
    sys.exit(f'--mmgen_path={args.mmgen_path!r} is not an official MMGen checkout (missing '
             f'{", ".join(missing)}). Unpack github.com/jiepengwang/MMGen and pass its folder.')
  python = args.torch_python or sys.executable
  probe = subprocess.run([python, '-c', 'import torch, timm'], capture_output=True, text=True,
                         check=False)
  if probe.returncode:
    sys.exit(f'{python} cannot import torch and timm, which the official side needs '
             f'({probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "no output"}). '
             'Pass --torch_python=<python of a venv with `pip install torch timm numpy`>.')
  return python


def stats(replies: list[dict[str, Any]]) -> dict[str, Any]:
  times = [t for r in replies for t in r['times']]
  return dict(step_time_min_s=min(times), step_time_median_s=statistics.median(times),
              cpu_s_per_step_median=statistics.median(r['cpu_per_step'] for r in replies),
              step_times_s=[round(t, 4) for t in times])


def compare(args: argparse.Namespace) -> None:
  torch_python = check_inputs(args)
  load_before = os.getloadavg()[0]
  # One after the other, so neither compiles while the other warms up.
  official = Worker(torch_python, 'torch', args)
  ours = Worker(sys.executable, 'jax', args)
  replies = {'official': [], 'ours': []}
  try:
    for _ in range(args.rounds):
      replies['official'].append(official.run(args.steps))
      replies['ours'].append(ours.run(args.steps))
  finally:
    official.close()
    ours.close()
  official_stats, ours_stats = stats(replies['official']), stats(replies['ours'])
  result = dict(
      size=dict(hidden=HIDDEN, depth=DEPTH, heads=HEADS, patch=PATCH, modalities=MODALITIES,
                latent_channels=LATENT_CHANNELS, side=SIDE, batch=BATCH,
                repa_encoder_depth=ENCODER_DEPTH, dtype=args.dtype),
      official={**official.info, **official_stats},
      ours={**ours.info, **ours_stats},
      ratio_ours_over_official_median=(ours_stats['step_time_median_s']
                                       / official_stats['step_time_median_s']),
      ratio_ours_over_official_min=(ours_stats['step_time_min_s']
                                    / official_stats['step_time_min_s']),
      rounds=args.rounds, steps_per_round=args.steps, cpus=args.cpus or 'all',
      cpu_count=os.cpu_count(), load_average_1min_before=load_before,
      load_average_1min_after=os.getloadavg()[0])
  print(json.dumps(result, indent=1))


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  {'compare': compare, 'torch': torch_worker, 'jax': jax_worker}[args.role](args)


if __name__ == '__main__':
  main(sys.argv[1:])
