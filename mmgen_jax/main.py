r"""The command line: one config, one workdir, one mode.

  python -m mmgen_jax.main --config=configs/tiny_cpu.py --workdir=/tmp/mmgen/tiny \
      [--config.model.depth=2 ...] [--mode=all]

Modes:
  data      build the configured dataset if it is missing, print a few batches
  train     train (resuming from <workdir>/checkpoints), grids and checkpoints on the way
  sample    sample grids from the latest checkpoint into <workdir>/samples; with --task,
            run a task on your own files (below)
  evaluate  the evaluation job on the latest checkpoint
  plan      parameters, FLOPs per step, memory per device; nothing is allocated.
            --plan_devices=32 --plan_device_memory_gb=95 plans for a machine you
            are not on (compiled against as many fake CPU devices)
  all       data -> train (grids at the last step) -> evaluate (the default)

Inference on your own files (mmgen_jax/inference.py says more):
  python -m mmgen_jax.main --mode=sample --config=CONFIG --workdir=WORKDIR --task=rgb_to_x \
      --input='photos/*.png' --out=OUT [--ensemble=8] [--seed=0] [--fov=60] [--params=ema|raw]
  --task    joint (class -> every modality; --class_id, --num_samples), rgb_to_x
            (understanding), <modality>_to_x (that modality held as the condition), rgb_to_rgb
            (RGB -> predicted --via map -> a new RGB with the same geometry)
  --input   PNG, JPEG or .npy files of the task's input modality, any size (resized to the
            model's square, outputs resized back to each input's H×W)
  writes    OUT/<stem>/<modality>.png and .npy, grid.png, scene.ply (coloured points with
            normals), and with --ensemble=K (rgb_to_x) <modality>_spread.png and .npy
  Sampler, steps and guidance come from config.sample (--config.sample.num_steps=...).

Data is read from (and built into) config.data.data_dir; when that is empty,
TFDS's default: $TFDS_DATA_DIR, else ~/tensorflow_datasets. Several processes
join one job through $MMGEN_COORDINATOR / $MMGEN_NUM_PROCESSES /
$MMGEN_PROCESS_ID, or JAX's own detection on TPU VMs, SLURM and Kubernetes
(see launch/README.md).
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from mmgen_jax import config_validation
from mmgen_jax import parallel

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               'configs', 'tiny_cpu.py')


def unknown_override(argv: list[str], schema) -> str | None:
  """Names the first `--config.a.b=v` whose path is not in `schema`, with the valid keys."""
  for arg in argv[1:]:
    if not arg.startswith('--config.'):
      continue
    path = arg[len('--config.'):].split('=', 1)[0].split('.')
    node, seen = schema, 'config'
    for key in path:
      if not hasattr(node, 'keys'):
        break  # a leaf value; the flag parser reports what is wrong with it
      if key not in node:
        return (f'{arg.split("=", 1)[0]}: {seen} has no key {key!r}; valid keys: '
                f'{sorted(node.keys())}.')
      node, seen = node[key], f'{seen}.{key}'
  return None


def _refuse_unknown_override(argv: list[str], error: Exception):
  """Re-raises a misspelt `--config.` override as one line naming the valid keys."""
  from mmgen_jax import config_schema  # pylint: disable=g-import-not-at-top
  message = unknown_override(argv, config_schema.base_config())
  if message is None:
    raise error
  raise SystemExit(f'FATAL config override {message}') from error


def _define_config_flag():
  """--config; its overrides are checked here (default config) and when parsed (--config=)."""
  try:
    return config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG, 'Experiment config file.',
                                           lock_config=True)
  except (AttributeError, KeyError) as e:
    _refuse_unknown_override(sys.argv, e)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    _refuse_unknown_override(argv, e)


_CONFIG = _define_config_flag()
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and samples go here.')
_MODE = flags.DEFINE_enum('mode', 'all', ['train', 'evaluate', 'sample', 'plan', 'data', 'all'],
                          'What to run.')
_DATA_BATCHES = flags.DEFINE_integer('data_batches', 2, '--mode=data: batches to print.')
_RENDER_WORKERS = flags.DEFINE_integer('render_workers', 2, 'Processes rendering the scenes.')
_PLAN_DEVICES = flags.DEFINE_integer('plan_devices', None,
                                     '--mode=plan: target device count (default: this job\'s).')
_PLAN_MEMORY = flags.DEFINE_float('plan_device_memory_gb', None,
                                  '--mode=plan: memory per device in GiB, to say if it fits.')
_PLAN_COMPILE = flags.DEFINE_bool('plan_compile', True,
                                  '--mode=plan: also compile the step for XLA\'s memory analysis '
                                  '(minutes for large models on CPU); false = analytic + lowered.')

# --mode=sample --task=...: inference on the user's files (mmgen_jax/inference.py).
_TASK = flags.DEFINE_string('task', None, '--mode=sample: joint | rgb_to_x | <modality>_to_x | '
                            'rgb_to_rgb (unset: sample grids into <workdir>/samples).')
_INPUT = flags.DEFINE_string('input', '', '--task: input file or glob (PNG, JPEG, .npy).')
_OUT = flags.DEFINE_string('out', '', '--task: output directory (OUT/<input stem>/...).')
_ENSEMBLE = flags.DEFINE_integer('ensemble', 1, '--task=rgb_to_x: samples aggregated per pixel '
                                 '(depth median after alignment, normal mean, segmentation vote).')
_CLASS_ID = flags.DEFINE_integer('class_id', None, '--task: class condition (default: joint '
                                 'cycles through the classes, other tasks use the null class).')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', None, '--task=joint: samples (default '
                                    'config.sample.num_images).')
_SEED = flags.DEFINE_integer('seed', None, '--task: noise seed (default config.seed).')
_FOV = flags.DEFINE_float('fov', None, '--task: horizontal field of view in degrees for '
                          'scene.ply (default: the scenes camera, 50, else 60).')
_PARAMS = flags.DEFINE_enum('params', None, ['ema', 'raw'], '--task: EMA or raw weights '
                            '(default: config.sample.use_ema).')
_VIA = flags.DEFINE_string('via', 'depth', '--task=rgb_to_rgb: the modality the new RGB keeps.')
_DEPTH_RANGE = flags.DEFINE_list('depth_range', ['1', '10'], '--task: NEAR,FAR the relative '
                                 'depth a model predicts (-1..1) is mapped onto.')


# EX_TEMPFAIL: the run stopped early on a signal, saved, and resumes when started again.
PREEMPTED_EXIT_CODE = 75


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config, mode = _CONFIG.value, _MODE.value
  if mode == 'plan':
    return run_plan(config)
  workdir = _WORKDIR.value
  # --task reads converted weights (config.sample.checkpoint) without a workdir.
  if mode != 'data' and not workdir and not (_TASK.value is not None
                                             and config.sample.checkpoint):
    raise app.UsageError(f'--mode={mode} needs --workdir.')
  if _TASK.value is not None:
    if mode != 'sample':
      raise app.UsageError(f'--task needs --mode=sample, not --mode={mode}.')
    return run_task(config, workdir)
  parallel.initialize_distributed()
  config_validation.validate(config)
  logging.info('%s', config_validation.describe(config))
  run(config, mode, workdir)


def run(config, mode: str, workdir: str | None) -> None:
  """The work of one mode other than plan, on a validated config."""
  if mode in ('data', 'all'):
    ensure_data(config)
  if mode == 'data':
    print_batches(config, _DATA_BATCHES.value)
  if mode in ('train', 'all'):
    from mmgen_jax import train  # pylint: disable=g-import-not-at-top
    metrics = train.train_and_evaluate(config, workdir)  # writes grids at the last step
    if metrics.get('preempted'):
      # A preempted job has seconds left: it saved at the step boundary; evaluation
      # waits for the run to finish. The exit status tells schedulers the run is
      # unfinished (a JobSet restarts it; the same command resumes it).
      logging.warning('Stopped by a signal at step %s; run the same command to resume '
                      '(exit status %d).', metrics.get('step'), PREEMPTED_EXIT_CODE)
      raise SystemExit(PREEMPTED_EXIT_CODE)
    logging.info('Training done at step %s: loss %s.', metrics.get('step'), metrics.get('loss'))
  if mode == 'sample':
    write_samples(config, workdir)
  if mode in ('evaluate', 'all'):
    from mmgen_jax import evaluate  # pylint: disable=g-import-not-at-top
    results = evaluate.evaluate(config, workdir)
    if jax.process_index() == 0 and results:
      print(evaluate.summarize(results))
  if jax.process_index() == 0 and mode in ('train', 'all', 'sample', 'evaluate'):
    print(f'Outputs in {workdir}: samples/*.png, eval/*.json, checkpoints/; '
          f'TensorBoard: tensorboard --logdir {workdir}')


def run_plan(config) -> None:
  """--mode=plan: on this job's devices, or on `--plan_devices` fake CPU devices."""
  from mmgen_jax import plan  # pylint: disable=g-import-not-at-top
  devices, compile_ = _PLAN_DEVICES.value, _PLAN_COMPILE.value
  if devices and compile_:
    # Before the first JAX call: the step is compiled for `devices` CPU devices.
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', devices)
  p = plan.make_plan(config, num_devices=devices, device_memory_gb=_PLAN_MEMORY.value,
                     compile=compile_)
  print(plan.format_plan(p))


def write_samples(config, workdir: str) -> None:
  """Sample grids (PNG) from the latest checkpoint into <workdir>/samples."""
  # pylint: disable=g-import-not-at-top
  from mmgen_jax import evaluate, train, visualize
  model, step, mesh = evaluate.restore_for_inference(config, workdir)
  key = jax.random.fold_in(jax.random.key(int(config.seed), impl=config.train.rng_impl), step)
  with jax.set_mesh(mesh):
    grids = train.make_sample_fn(config)(model, key)
  if jax.process_index() == 0:
    for name, grid in grids.items():
      path = os.path.join(workdir, 'samples', f'checkpoint_{step:06d}_{name}.png')
      visualize.save_png(path, grid)
      print(path)


def run_task(config, workdir: str) -> None:
  """--mode=sample --task=...: a problem with the request ends the run with one line."""
  from mmgen_jax import inference  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed()
  if _PARAMS.value is not None:
    config.sample.use_ema = _PARAMS.value == 'ema'
  try:
    try:
      depth_range = tuple(float(v) for v in _DEPTH_RANGE.value)
    except ValueError as e:
      raise inference.InferenceError(f'--depth_range={",".join(_DEPTH_RANGE.value)}: {e}') from e
    if len(depth_range) != 2:
      raise inference.InferenceError(f'--depth_range needs NEAR,FAR; got {_DEPTH_RANGE.value}.')
    opts = inference.Options(
        task=_TASK.value, inputs=_INPUT.value, out=_OUT.value, ensemble=_ENSEMBLE.value,
        class_id=_CLASS_ID.value, num_samples=_NUM_SAMPLES.value, seed=_SEED.value,
        fov=_FOV.value, via=_VIA.value, depth_range=depth_range)
    inference.check(config, opts)
    config_validation.validate(config)
    inference.run(config, workdir, opts)
  except config_validation.ConfigError as e:
    raise SystemExit(f'mmgen_jax sample: {"; ".join(e.problems)}') from e
  except (inference.InferenceError, FileNotFoundError) as e:
    raise SystemExit(f'mmgen_jax sample: {e}') from e


# ---- data -----------------------------------------------------------------------------


def ensure_data(config) -> None:
  """Builds the procedural scenes if missing; other datasets must already exist.

  Process 0 builds first; a process that still does not see the data after it
  (a host-local data_dir) builds its own copy, the same records by seed.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from mmgen_jax.data import tfds_scenes  # pylint: disable=g-import-not-at-top
  d = config.data
  data_dir = d.data_dir or None
  if d.name != tfds_scenes.NAME:
    name = f'{d.name}/{d.builder_config}' if d.builder_config else d.name
    try:
      built = tfds.builder(name, data_dir=data_dir).is_prepared()
    except tfds.core.registered.DatasetNotFoundError:
      built = False  # neither registered nor found on disk
    if not built:
      raise FileNotFoundError(
          f'dataset {name} is not built in {data_dir or "the TFDS default data dir"} '
          f'(config.data.name / builder_config / data_dir). Only {tfds_scenes.NAME} is built '
          'here; build this one with its own TFDS builder first (see its config file).')
    return

  def build_here() -> None:
    builder = tfds_scenes.make_builder(d.builder_config, data_dir)
    if builder.is_prepared():
      logging.info('Dataset %s/%s found in %s.', d.name, d.builder_config, builder.data_dir)
      return
    logging.info('Building %s/%s in %s.', d.name, d.builder_config, builder.data_dir_root)
    tfds_scenes.build(d.builder_config, data_dir, render_workers=_RENDER_WORKERS.value,
                      show_progress=jax.process_index() == 0)

  if jax.process_index() == 0:
    build_here()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('mmgen_data_built')
    if jax.process_index() != 0:
      build_here()


def print_batches(config, num_batches: int) -> None:
  """Prints what the training pipeline yields (this process's share of each batch)."""
  from mmgen_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  it = pipeline.make_iterator(config, config.data.train_split, train=True)
  for i in range(num_batches):
    print(f'batch {i} ({config.data.train_split}, process {jax.process_index()}):')
    print(pipeline.summarize(next(it)))


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
