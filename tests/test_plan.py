"""plan.py: parameter count, FLOPs and per-device memory without allocating anything."""

import dataclasses
import importlib.util
import os

import pytest

from mmgen_jax import parallel
from mmgen_jax import plan
from mmgen_jax.models import build
from mmgen_jax.models import dit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2 ** 20


def load(name: str, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs', name + '.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny(**model):
  """tiny_cpu with the model and batch the figures below were worked out for."""
  c = load('tiny_cpu')
  c.model.patch_size, c.model.hidden_size, c.data.global_batch_size = 2, 128, 16
  for k, v in model.items():
    c.model[k] = v
  return c


def count_params(config) -> int:
  return dit.count_params(parallel.abstract_model(lambda r: build.build_model(config, rngs=r)))


@pytest.fixture(scope='module')
def tiny_plan():
  return plan.make_plan(tiny(), num_devices=8, device_memory_gb=16, lower=True)


def test_tiny_counts_match_the_model(tiny_plan):
  p = tiny_plan
  assert p.num_params == count_params(tiny())
  assert p.num_devices == 8 and p.mesh == {'data': 8, 'fsdp': 1, 'tensor': 1}
  assert p.global_batch == 16 and p.per_device_batch == 2
  assert p.tokens_per_sample == (32 // 2) ** 2


def test_tiny_flops_lowered_agree_with_the_analytic_count(tiny_plan):
  p = tiny_plan
  assert p.flops_source == 'lowered'
  # XLA counts elementwise work too; the matmuls dominate.
  assert 0.95 < p.flops_per_step / p.analytic_flops_per_step < 1.1
  # Rule of thumb: 6 FLOPs per parameter per token (adaLN is per sample, so less).
  tokens = p.global_batch * p.tokens_per_sample
  assert p.flops_per_step < 6 * p.num_params * tokens


def test_gradient_accumulation_keeps_the_flops_of_the_global_batch(tiny_plan):
  """XLA counts the accumulation loop's body once; the plan counts every micro-batch."""
  c = tiny()
  c.optim.grad_accum_steps = 2
  p = plan.make_plan(c, num_devices=8, lower=True)
  assert p.flops_source == 'lowered'
  assert p.flops_per_step == pytest.approx(tiny_plan.flops_per_step, rel=0.02)


def test_tiny_state_memory_is_replicated_on_a_data_mesh(tiny_plan):
  m = tiny_plan.memory
  assert m['params'] == 4 * tiny_plan.num_params  # float32, every device holds all
  assert m['ema'] == m['params'] == m['gradients']
  assert 2 * m['params'] <= m['optimizer'] < 2 * m['params'] + 1024  # Adam moments + counters
  assert m['activations'] > 0
  assert m['total'] == sum(v for k, v in m.items() if k != 'total')
  assert tiny_plan.fits is True


def test_fsdp_divides_the_state_but_not_the_parameter_count():
  c = tiny()
  c.mesh.data, c.mesh.fsdp = 1, 8
  p = plan.make_plan(c, num_devices=8, lower=False)
  total = 4 * p.num_params
  assert p.num_params == count_params(c)
  assert total / 8 <= p.memory['params'] < total / 4  # biases and small tables stay whole
  assert p.per_device_batch == 2
  assert p.flops_source == 'analytic'


def test_remat_shrinks_the_activation_estimate():
  kept = {policy: plan.analytic_activation_bytes(tiny(remat_policy=policy), per_device_batch=4)
          for policy in ('none', 'save_dots', 'full')}
  assert kept['full'] < kept['save_dots'] < kept['none'] and kept['full'] < kept['none'] / 2


def test_report_names_every_figure(tiny_plan):
  text = plan.format_plan(tiny_plan)
  assert f'parameters: {tiny_plan.num_params:,}' in text
  assert 'FLOPs per train step (forward+backward):' in text and '(lowered; analytic' in text
  for key in ('params', 'ema', 'optimizer', 'gradients', 'activations', 'total'):
    assert f'  {key}' in text
  assert 'device memory 16.00 GiB: fits' in text


def test_xl2_on_a_v5p_32_analytic():
  c = load('imagenet256_xl2')
  p = plan.make_plan(c, num_devices=16, device_memory_gb=95, lower=False)
  assert p.num_params == 694_353_024  # the released MMGen SiT-XL/2
  assert p.mesh == {'data': 1, 'fsdp': 16, 'tensor': 1}
  assert p.per_device_batch == 16
  # The lowered XL/2 step measured 1.83e14 FLOPs (XLA cost analysis, batch 256).
  assert 1.75e14 < p.flops_per_step < 1.95e14
  full = 4 * p.num_params
  assert full / 16 <= p.memory['params'] < full / 16 * 1.05
  assert p.fits is True
  assert 'fits' in plan.format_plan(p)

  small = dataclasses.replace(p, device_memory_bytes=2 * 2 ** 30)
  assert small.fits is False
  text = plan.format_plan(small)
  assert 'does NOT fit' in text and "model.remat_policy='save_dots'" in text


@pytest.mark.slow
def test_compiled_memory_on_the_fake_devices():
  c = tiny(depth=1)
  p = plan.make_plan(c, num_devices=8, lower=False, compile=True)
  cm = p.compiled_memory
  state = p.memory['params'] + p.memory['ema'] + p.memory['optimizer']
  assert cm['arguments'] >= state  # the donated state is an argument
  assert cm['aliased'] >= state * 0.9  # ... and reused for the new state
  assert cm['peak'] >= cm['arguments'] and cm['temporaries'] > 0
  assert p.compiled_backend == '8 cpu devices'
  assert 'compiled on 8 cpu devices' in plan.format_plan(p)


@pytest.mark.slow
def test_the_plans_quick_cpu_compile_gives_the_memory_of_a_full_compile(monkeypatch):
  """The plan compiles without LLVM's optimisation on CPU; the buffer assignment, and so
  every memory figure, is that of the optimised compile."""
  c = tiny(depth=2)
  quick = plan.make_plan(c, num_devices=8, lower=False, compile=True).compiled_memory
  monkeypatch.setattr(plan, 'PLAN_CPU_COMPILER_OPTIONS', {})
  full = plan.make_plan(c, num_devices=8, lower=False, compile=True).compiled_memory
  assert {k: v for k, v in quick.items() if k != 'code'} == {
      k: v for k, v in full.items() if k != 'code'}


@pytest.mark.slow
def test_scanned_trunk_keeps_the_batch_split_on_an_fsdp_mesh():
  """Inside the scan the activations stay split over the batch (not the stacked weights'
  embed axis), so the scanned step needs no more temporary memory than the per-block one."""
  temporaries = {}
  for scan_layers in (False, True):
    c = tiny(scan_layers=scan_layers)
    c.mesh.data, c.mesh.fsdp = 1, 8
    p = plan.make_plan(c, num_devices=8, lower=False, compile=True)
    temporaries[scan_layers] = p.compiled_memory['temporaries']
  assert temporaries[True] <= temporaries[False]


@pytest.mark.parametrize('variant', ['all', 'joint_label', 'masked', 'transition'])
def test_mt_diffusion_variants_trace_a_train_step(variant):
  """The MT-ELBO model, objective and batch fit together (the step is traced)."""
  c = load('mt_diffusion', variant)
  c.model.depth = 1
  p = plan.make_plan(c, num_devices=8, lower=True)
  assert p.flops_source == 'lowered' and p.flops_per_step > 0
  assert p.num_params > 0
