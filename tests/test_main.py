"""The command line, run as users run it: `python -m mmgen_jax.main ...` in a subprocess."""

import importlib.util
import os
import subprocess
import sys

import pytest

from mmgen_jax import main as main_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'tiny_cpu.py')


def run_main(*args: str, devices: int = 8, timeout: float = 600) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  return subprocess.run([sys.executable, '-m', 'mmgen_jax.main', f'--config={TINY}', *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_plan_mode_prints_the_figures_for_tiny():
  r = run_main('--mode=plan', '--plan_compile=false', '--config.model.depth=2',
               '--plan_device_memory_gb=1')
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout
  assert 'DiT width 256 depth 2 heads 4 patch 4 (64 tokens, patch input 160)' in out
  assert 'devices: 8 (mesh data=8 fsdp=1 tensor=1); global batch 32, 4 samples per device' in out
  params = int(out.split('parameters: ')[1].split('\n')[0].replace(',', ''))
  assert 2_500_000 < params < 4_000_000  # two 256-wide blocks plus embedders and four heads
  flops = float(out.split('FLOPs per train step (forward+backward): ')[1].split(' ')[0])
  tokens = 32 * 64
  assert 2 * params * tokens < flops < 6 * params * tokens
  assert 'device memory 1.00 GiB: fits' in out


def test_misspelt_override_names_the_valid_keys():
  r = run_main('--mode=plan', '--config.model.hiden_size=3')
  assert r.returncode != 0
  assert "--config.model.hiden_size: config.model has no key 'hiden_size'; valid keys:" in r.stderr
  assert "'hidden_size'" in r.stderr


def test_invalid_config_is_refused_before_anything_runs():
  r = run_main('--mode=train', '--workdir=/nonexistent/never_created', '--config.model.patch_size=8')
  assert r.returncode != 0
  assert 'patch_size² × input channels = 8² × 10 = 640' in r.stderr
  assert not os.path.exists('/nonexistent/never_created')


def test_train_needs_a_workdir():
  r = run_main('--mode=train')
  assert r.returncode != 0
  assert '--mode=train needs --workdir' in r.stderr


def test_missing_external_dataset_names_what_to_build(tmp_path):
  spec = importlib.util.spec_from_file_location('xl2', os.path.join(REPO, 'configs',
                                                                    'imagenet256_xl2.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.data.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match='dataset imagenet2012_mmgen is not built in'):
    main_lib.ensure_data(c)


@pytest.mark.slow
def test_data_mode_builds_the_scenes_and_prints_batches(tmp_path):
  r = run_main('--mode=data', '--config.data.builder_config=res32_n16_8',
               f'--config.data.data_dir={tmp_path}', '--config.data.global_batch_size=8',
               '--render_workers=0', '--data_batches=1')
  assert r.returncode == 0, r.stderr[-3000:]
  assert os.path.isdir(tmp_path / 'mmgen_scenes' / 'res32_n16_8')
  assert 'batch 0 (train, process 0):' in r.stdout
  rgb = [line for line in r.stdout.splitlines() if line.strip().startswith('rgb ')]
  assert rgb and '(8, 32, 32, 3)' in rgb[0]
  # A second run finds the build and does not render again.
  again = run_main('--mode=data', '--config.data.builder_config=res32_n16_8',
                   f'--config.data.data_dir={tmp_path}', '--config.data.global_batch_size=8',
                   '--data_batches=1')
  assert again.returncode == 0 and 'found in' in again.stderr


@pytest.mark.slow
def test_plan_compiles_for_a_target_device_count():
  r = run_main('--mode=plan', '--plan_devices=4', '--config.model.depth=1',
               '--plan_device_memory_gb=2', devices=1)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'devices: 4 (mesh data=4 fsdp=1 tensor=1)' in r.stdout
  assert 'compiled on 4 cpu devices (XLA memory_analysis, per device)' in r.stdout


def test_a_preempted_run_stops_before_sampling_or_evaluating(monkeypatch, tmp_path, capsys):
  from mmgen_jax import evaluate, train  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('tiny', TINY)
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  calls = []
  monkeypatch.setattr(main_lib, 'ensure_data', lambda config: calls.append('data'))
  monkeypatch.setattr(train, 'train_and_evaluate',
                      lambda config, workdir: calls.append('train') or {'step': 7,
                                                                       'preempted': True})
  monkeypatch.setattr(evaluate, 'evaluate', lambda config, workdir: calls.append('evaluate'))
  with pytest.raises(SystemExit) as e:
    main_lib.run(tiny.get_config(), 'all', str(tmp_path))
  assert e.value.code == main_lib.PREEMPTED_EXIT_CODE == 75  # unfinished: restart to resume
  assert calls == ['data', 'train']  # the grace period is for saving, not for evaluating
  assert 'Outputs in' not in capsys.readouterr().out
