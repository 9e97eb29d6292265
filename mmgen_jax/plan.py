"""Sizes a run before paying for it: parameters, FLOPs per step, memory per device.

Nothing is allocated. The model and optimizer exist as shapes only
(`nnx.eval_shape`, `jax.eval_shape`) and are placed on an `AbstractMesh` of the
target size, so a v5p-32 or 8×H100 plan needs neither. Three levels of
evidence, each labelled in the report:

* analytic: the state's bytes per device from the real sharding rules (exact
  for the state), activations from a per-block formula (an estimate), FLOPs
  from the DiT's matmuls;
* lowered: XLA's cost analysis of the real train step (`jit(...).lower`),
  exact FLOPs for the whole global step, no devices needed;
* compiled: the step compiled for the configured mesh on this process's
  devices (real, or fake CPU devices of the target count, see main.py's
  `--plan_devices`), whose `memory_analysis()` gives XLA's own per-device
  arguments / temporaries on that backend.

The batch is as the step takes it from a latent cache (posterior moments for
the sd_vae codec), so the VAE's own cost is not part of the step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from mmgen_jax import codec as codec_lib
from mmgen_jax import config_validation
from mmgen_jax import modalities as modalities_lib
from mmgen_jax import parallel
from mmgen_jax import train_state
from mmgen_jax.models import build

GiB = 2 ** 30
_ITEMSIZE = {'float32': 4, 'bfloat16': 2, 'float16': 2}


@dataclasses.dataclass(frozen=True)
class Plan:
  description: str
  num_devices: int
  mesh: dict[str, int]
  global_batch: int
  per_device_batch: float          # samples per device per micro-batch
  tokens_per_sample: int
  num_params: int
  flops_per_step: float            # forward + backward + update, whole global batch
  flops_source: str                # 'lowered' | 'analytic'
  analytic_flops_per_step: float
  memory: dict[str, int]           # per device, analytic: state exact, activations estimated
  compiled_memory: dict[str, int] | None = None  # per device, XLA memory_analysis
  compiled_backend: str = ''
  device_memory_bytes: int | None = None

  @property
  def peak_bytes(self) -> int:
    """The compiled peak if there is one, else the analytic total."""
    if self.compiled_memory:
      return self.compiled_memory['peak']
    return self.memory['total']

  @property
  def fits(self) -> bool | None:
    if not self.device_memory_bytes:
      return None
    return self.peak_bytes <= self.device_memory_bytes

  def to_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), 'peak_bytes': self.peak_bytes, 'fits': self.fits}


# ---- abstract pieces -----------------------------------------------------------------


def abstract_batch(config: ml_collections.ConfigDict, batch_size: int
                   ) -> dict[str, jax.ShapeDtypeStruct]:
  """One batch as the step takes it: images (B, s, s, C) float32 (with the sd_vae codec
  their posterior moments '<name>_moments', (B, s, s, 2·latent)), classes and 'label'
  (B,) int32, and 'repa_features' (B, tokens, z) float32 when the REPA loss is on."""
  s = build.model_kwargs(config)['input_size']
  latent = config.codec.name != 'identity'
  out = {'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
  for m in modalities_lib.from_config(config.modalities):
    if m.is_image:
      if latent:
        out[codec_lib.moments_field(m.name)] = jax.ShapeDtypeStruct(
            (batch_size, s, s, 2 * int(config.codec.latent_channels)), jnp.float32)
      else:
        out[m.name] = jax.ShapeDtypeStruct((batch_size, s, s, m.channels), jnp.float32)
    else:
      out[m.name] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  if config.objective.repa_coeff > 0:  # the REPA term reads one feature per token
    tokens = (s // int(config.model.patch_size)) ** 2
    out[modalities_lib.REPA_FEATURES] = jax.ShapeDtypeStruct(
        (batch_size, tokens, int(config.model.repa_z_dim)), jnp.float32)
  return out


def _abstract_state(config, mesh) -> tuple[Any, Any, Callable]:
  """(abstract TrainState carrying shardings, the shardings, the pure train step)."""
  from mmgen_jax import train  # the loop's own model and objective
  parts = train.default_parts(config)
  schedule = train_state.make_schedule(config.optim, config.train.num_steps)
  tx = train_state.make_optimizer(config.optim, schedule)
  rng_impl = config.train.rng_impl
  state = train_state.plan_train_state(parts.model_fn, tx, mesh, config.sharding_rules,
                                       int(config.seed), rng_impl)
  step = train_state.make_train_step(state.graphdef, parts.loss_fn, tx, schedule,
                                     ema_decay=float(config.optim.ema_decay),
                                     grad_accum_steps=int(config.optim.grad_accum_steps),
                                     rng_impl=rng_impl)
  return state.abstract, state.shardings, step


def _bytes_per_device(tree: Any) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


# ---- analytic estimates ----------------------------------------------------------------


def analytic_forward_flops(config: ml_collections.ConfigDict) -> float:
  """Matmul FLOPs of one forward pass of one sample (2 per multiply-add).

  Counts the patch embedding, every block (qkv, attention scores and mix,
  projection, MLP, adaLN modulation), the REPA projector and the output
  layers; leaves out the small time/label embedders and MT-Diffusion encoders.
  """
  kw = build.model_kwargs(config)
  p, d, depth, r = kw['patch_size'], kw['hidden_size'], kw['depth'], kw['mlp_ratio']
  t = (kw['input_size'] // p) ** 2
  flops = 2 * t * p * p * kw['in_channels'] * d
  per_block = 2 * t * (4 * d * d + 2 * r * d * d) + 4 * t * t * d + 2 * d * 6 * d
  flops += depth * per_block
  for z in kw['repa_z_dims']:
    q = kw['repa_projector_dim']
    flops += 2 * t * (d * q + q * q + q * z)
  for ch in kw['image_heads']:
    flops += 2 * t * d * p * p * ch + 2 * d * 2 * d
  for k in kw['class_heads']:
    flops += 2 * d * k + 2 * d * 2 * d
  return float(flops)


def analytic_activation_bytes(config: ml_collections.ConfigDict, per_device_batch: float,
                              tensor: int = 1) -> int:
  """Activations kept for the backward pass, per device (an estimate).

  Per block and token: the float32 residual stream and its normalised copies
  (8 bytes·D), plus, in the compute dtype, modulated inputs, q/k/v, attention
  output, projection and the two MLP activations ((7 + 2·mlp_ratio)·D), plus
  the attention logits (float32) and probabilities (heads·T each). With
  model.remat_policy 'full' only each block's float32 input is kept, with
  'save_dots' also the weight matmuls' outputs (qkv, projection, the two MLP
  layers: (5 + mlp_ratio)·D); either way plus one block's worth during its
  recompute. Tensor parallelism divides the per-head and MLP parts.
  """
  kw = build.model_kwargs(config)
  d, depth, r, heads = kw['hidden_size'], kw['depth'], kw['mlp_ratio'], config.model.num_heads
  t = (kw['input_size'] // kw['patch_size']) ** 2
  e = _ITEMSIZE[config.model.dtype]
  residual = 8 * t * d
  split = (e * (7 + 2 * r) * t * d + heads * t * t * (4 + e)) / tensor  # logits in float32
  block = residual + split
  kept = {'none': block, 'full': 4 * t * d, 'save_dots': 4 * t * d + e * (5 + r) * t * d / tensor}
  policy = config.model.remat_policy
  total = depth * kept[policy] + (block if policy != 'none' else 0)
  return int(total * per_device_batch)


def lowered_step_flops(config: ml_collections.ConfigDict,
                       mesh: jax.sharding.AbstractMesh | None = None) -> float:
  """XLA's FLOP count of one global train step (0.0 if XLA gives none).

  Unpartitioned: the FLOPs of the whole global step, whatever the mesh (default:
  one device). XLA counts a loop's body once, so the step is lowered, not
  compiled, with the trunk's scan unrolled; gradient accumulation is counted.
  """
  mesh = mesh or jax.sharding.AbstractMesh((1, 1, 1), parallel.MESH_AXES,
                                           axis_types=(jax.sharding.AxisType.Auto,) * 3)
  counted = config.copy_and_resolve_references()
  counted.model.scan_unroll = max(1, int(config.model.depth))
  state, _, counted_step = _abstract_state(counted, mesh)
  bare = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  abatch = abstract_batch(config, int(config.data.global_batch_size))
  cost = jax.jit(counted_step).lower(bare, abatch).cost_analysis()
  return train_state.step_flops(cost, int(config.optim.grad_accum_steps))


# ---- the plan ---------------------------------------------------------------------------


def make_plan(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
              device_memory_gb: float | None = None, lower: bool = True,
              compile: bool = False) -> Plan:  # pylint: disable=redefined-builtin
  """The plan of `config` on `num_devices` devices (default: this job's).

  lower: trace the real train step and take XLA's FLOP count (seconds for
    large models); else the analytic count is used.
  compile: also compile the step for the mesh on this process's devices (they
    must number `num_devices`) and read XLA's per-device memory analysis.
  """
  num_devices = jax.device_count() if num_devices is None else int(num_devices)
  config_validation.validate(config, num_devices=num_devices, num_processes=1)
  shape = parallel.mesh_shape(config.mesh, num_devices)
  mesh_sizes = dict(zip(parallel.MESH_AXES, shape))
  abstract_mesh = jax.sharding.AbstractMesh(shape, parallel.MESH_AXES,
                                             axis_types=(jax.sharding.AxisType.Auto,) * 3)
  state, _, step = _abstract_state(config, abstract_mesh)

  batch = int(config.data.global_batch_size)
  accum = int(config.optim.grad_accum_steps)
  per_device_batch = batch / accum / (mesh_sizes['data'] * mesh_sizes['fsdp'])
  params = _bytes_per_device(state.params)
  memory = dict(
      params=params,
      ema=_bytes_per_device(state.ema_params),
      optimizer=_bytes_per_device(state.opt_state),
      gradients=params,
      activations=analytic_activation_bytes(config, per_device_batch, mesh_sizes['tensor']))
  memory['total'] = sum(memory.values())

  kw = build.model_kwargs(config)
  analytic = 3.0 * batch * analytic_forward_flops(config)  # backward ≈ 2 × forward
  flops, source = analytic, 'analytic'
  abatch = abstract_batch(config, batch)
  if lower:
    lowered = lowered_step_flops(config, abstract_mesh)
    if lowered:
      flops, source = lowered, 'lowered'

  compiled, backend = None, ''
  if compile:
    compiled, backend = _compiled_memory(config, abatch)
  return Plan(
      description=config_validation.describe(config), num_devices=num_devices,
      mesh=mesh_sizes, global_batch=batch, per_device_batch=per_device_batch,
      tokens_per_sample=(kw['input_size'] // kw['patch_size']) ** 2,
      num_params=int(sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))),
      flops_per_step=flops, flops_source=source, analytic_flops_per_step=analytic,
      memory=memory, compiled_memory=compiled, compiled_backend=backend,
      device_memory_bytes=int(device_memory_gb * GiB) if device_memory_gb else None)


# The plan reads the buffer assignment, which XLA fixes before it generates machine code;
# on CPU (fake devices standing in for a pod) that code is never run, so LLVM's
# optimisation, most of the compile time, is skipped. The memory figures are the same.
PLAN_CPU_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0,
                             'xla_llvm_disable_expensive_passes': True}


def _compiled_memory(config, abatch) -> tuple[dict[str, int], str]:
  """XLA's per-device memory of the step compiled for the configured mesh here."""
  mesh = parallel.make_mesh(config.mesh)
  state, shardings, step = _abstract_state(config, mesh)
  batch_sharding = parallel.batch_sharding(mesh, config.sharding_rules)
  abatch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
            for k, v in abatch.items()}
  platform = mesh.devices.flat[0].platform
  options = PLAN_CPU_COMPILER_OPTIONS if platform == 'cpu' else {}
  with jax.set_mesh(mesh):
    jitted = train_state.jit_train_step(step, shardings, batch_sharding, mesh)
    analysis = jitted.lower(state, abatch).compile(compiler_options=options).memory_analysis()
  out = dict(arguments=int(analysis.argument_size_in_bytes),
             outputs=int(analysis.output_size_in_bytes),
             aliased=int(analysis.alias_size_in_bytes),
             temporaries=int(analysis.temp_size_in_bytes),
             code=int(analysis.generated_code_size_in_bytes))
  # Donated state buffers are reused for the outputs (aliased), so they count once.
  out['peak'] = out['arguments'] + out['outputs'] - out['aliased'] + out['temporaries']
  return out, f'{len(mesh.devices.flat)} {platform} devices'


# ---- report ------------------------------------------------------------------------------


def _size(n: float) -> str:
  for unit, scale in (('GiB', GiB), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
    if n >= scale:
      return f'{n / scale:.2f} {unit}'
  return f'{int(n)} B'


def format_plan(p: Plan) -> str:
  m = p.mesh
  lines = [
      f'plan: {p.description}',
      f'devices: {p.num_devices} (mesh data={m["data"]} fsdp={m["fsdp"]} tensor={m["tensor"]}); '
      f'global batch {p.global_batch}, {p.per_device_batch:g} samples per device per micro-batch; '
      f'{p.tokens_per_sample} tokens per sample',
      f'parameters: {p.num_params:,}',
      f'FLOPs per train step (forward+backward): {p.flops_per_step:.3e} ({p.flops_source}'
      + (f'; analytic {p.analytic_flops_per_step:.3e}' if p.flops_source != 'analytic' else '')
      + f'), {p.flops_per_step / p.num_devices:.3e} per device',
      'memory per device (analytic: state exact from the sharding rules, activations estimated):',
  ]
  for key in ('params', 'ema', 'optimizer', 'gradients', 'activations', 'total'):
    lines.append(f'  {key:<12s} {_size(p.memory[key]):>12s}')
  if p.compiled_memory:
    c = p.compiled_memory
    lines.append(f'compiled on {p.compiled_backend} (XLA memory_analysis, per device): '
                 f'arguments {_size(c["arguments"])}, outputs {_size(c["outputs"])} '
                 f'({_size(c["aliased"])} aliased), temporaries {_size(c["temporaries"])}, '
                 f'peak {_size(c["peak"])}')
    if p.compiled_backend.endswith('cpu devices'):
      lines.append('  (a CPU compile: TPU and GPU compilers fuse and schedule differently, so '
                   'their peak differs)')
  if p.device_memory_bytes:
    used = p.peak_bytes / p.device_memory_bytes
    what = 'compiled peak' if p.compiled_memory else 'analytic total'
    verdict = 'fits' if p.fits else 'does NOT fit'
    lines.append(f'device memory {_size(p.device_memory_bytes)}: {verdict} ({what} is '
                 f'{100 * used:.0f}%)')
    if not p.fits:
      lines.append("  to fit: model.remat_policy='save_dots' or 'full', a larger mesh.fsdp, or "
                   'optim.grad_accum_steps > 1 (smaller micro-batches)')
  return '\n'.join(lines)
