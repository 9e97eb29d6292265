"""Device mesh, logical-axis rules and multi-host start-up.

Parallelism is data: `config.mesh` sizes the axes ('data', 'fsdp', 'tensor')
and `config.sharding_rules` maps every logical axis name a parameter carries
(`out_sharding` metadata, e.g. ('embed', 'mlp')) to a mesh axis, a tuple of
mesh axes, or None (replicated). Changing the parallelism never edits a model.
"""

from __future__ import annotations

from absl import logging
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

from flax import nnx
from flax import traverse_util
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

MESH_AXES = ('data', 'fsdp', 'tensor')

# logical name -> mesh axis | tuple of mesh axes | None
Rules = Mapping[str, str | tuple[str, ...] | None]


# ---- mesh ---------------------------------------------------------------------


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, ...]:
  """Axis sizes for `num_devices` devices; at most one axis may be -1 (the rest)."""
  sizes = {}
  for axis in MESH_AXES:
    size = int(mesh_cfg[axis])
    if size == 0 or size < -1:
      raise ValueError(f'config.mesh.{axis}={size}: use a positive size or -1 (fill).')
    sizes[axis] = size
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f'config.mesh: only one axis may be -1, got {fill}.')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  described = ', '.join(f'{a}={s}' for a, s in sizes.items())
  if fill:
    if num_devices % fixed:
      raise ValueError(f'config.mesh ({described}): the fixed axes multiply to {fixed}, which '
                       f'does not divide the {num_devices} devices.')
    sizes[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f'config.mesh ({described}) has {fixed} devices but {num_devices} are '
                     'available; set one axis to -1 to fill the rest.')
  return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh over `devices` (default: all, every process)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  # Auto axes: the compiler propagates shardings from the parameters and the
  # batch (GSPMD style); Explicit axes would need sharding-typed model code.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


# ---- logical-axis rules -------------------------------------------------------


def rules_dict(rules: Rules | Iterable[tuple[str, Any]]) -> dict[str, Any]:
  """Validates `config.sharding_rules` (pairs or a mapping) into a dict."""
  pairs = list(rules.items()) if isinstance(rules, Mapping) else [tuple(r) for r in rules]
  out: dict[str, Any] = {}
  for pair in pairs:
    if len(pair) != 2:
      raise ValueError(f'config.sharding_rules: each rule is (logical_name, mesh_axes), got '
                       f'{pair!r}.')
    name, target = pair
    if name in out:
      raise ValueError(f'config.sharding_rules: logical axis {name!r} has two rules.')
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise ValueError(f'config.sharding_rules: {name!r} -> {target!r} names unknown mesh '
                       f'axes {bad}; mesh axes are {list(MESH_AXES)}.')
    out[name] = axes[0] if len(axes) == 1 else (axes or None)
  return out


def logical_to_spec(names: Sequence[str | None] | None, rules: Rules | Iterable) -> PartitionSpec:
  """PartitionSpec of an array whose dimensions carry logical `names` (None = replicated)."""
  rules = rules_dict(rules)
  spec, used = [], set()
  for name in names or ():
    if name is None:
      spec.append(None)
      continue
    if name not in rules:
      raise KeyError(f'logical axis {name!r} has no rule in config.sharding_rules; known '
                     f'logical axes: {sorted(rules)}.')
    target = rules[name]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    twice = used.intersection(axes)
    if twice:
      raise ValueError(f'logical axes {tuple(names)} map mesh axis {sorted(twice)} to two '
                       'dimensions of one array; fix config.sharding_rules.')
    used.update(axes)
    spec.append(target)
  return PartitionSpec(*spec)


def _divisible_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, what: str
                    ) -> PartitionSpec:
  """Replicates (with a warning) dimensions that do not split evenly over their axes."""
  out = []
  for dim, (size, target) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    ways = math.prod(mesh.shape[a] for a in axes)
    if ways > 1 and size % ways:
      logging.warning('%s: dimension %d (size %d) does not split over mesh axes %s (%d ways); '
                      'it is replicated instead.', what, dim, size, axes, ways)
      target = None
    out.append(target)
  return PartitionSpec(*out)


def param_specs(abstract_state: nnx.State, rules: Rules | Iterable) -> dict[str, Any]:
  """Nested dict (like `nnx.to_pure_dict`) of PartitionSpecs from `out_sharding` metadata."""
  flat = {}
  for path, var in nnx.to_flat_state(abstract_state):
    names = var.get_metadata().get('out_sharding')
    try:
      flat[path] = logical_to_spec(names, rules)
    except (KeyError, ValueError) as e:
      raise type(e)(f'parameter {"/".join(map(str, path))}: {e.args[0]}') from None
  return traverse_util.unflatten_dict(flat)


def model_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Rules | Iterable
                    ) -> dict[str, Any]:
  """NamedShardings (nested dict like `nnx.to_pure_dict`) of an abstract NNX state."""
  specs = traverse_util.flatten_dict(param_specs(abstract_state, rules))
  shapes = {p: v.get_value().shape for p, v in nnx.to_flat_state(abstract_state)}
  return traverse_util.unflatten_dict({
      p: NamedSharding(mesh, _divisible_spec(s, shapes[p], mesh, '/'.join(map(str, p))))
      for p, s in specs.items()})


def batch_sharding(mesh: Mesh, rules: Rules | Iterable) -> NamedSharding:
  """Sharding of every batch array: leading dimension over the 'batch' rule."""
  return NamedSharding(mesh, logical_to_spec(('batch',), rules))


def batch_ways(mesh: Mesh, rules: Rules | Iterable) -> int:
  """How many ways `batch_sharding` splits a batch: the product of its mesh axes' sizes."""
  spec = batch_sharding(mesh, rules).spec
  axes = spec[0] if len(spec) else None
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return math.prod(mesh.shape[a] for a in axes)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


# ---- sharded creation ------------------------------------------------------------


def abstract_model(model_fn: Callable[[nnx.Rngs], nnx.Module], key: Any = 0) -> nnx.Module:
  """The model as shapes only (no memory); shardings come later from the rules.

  Built with no mesh in context, so flax does not resolve the logical names
  itself: `param_specs` does, and names an unknown one.
  """
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: model_fn(nnx.Rngs(key)))


def sharded_init(init_fn: Callable[[], Any], out_shardings: Any, mesh: Mesh) -> Any:
  """Runs `init_fn` under jit so every output is created directly in its shards.

  Eager (per-variable) sharding is off: the placement comes from `out_shardings`
  alone, which `param_specs` derived from the rules, so one table decides it.
  """
  with jax.set_mesh(mesh), nnx.use_eager_sharding(False):
    return jax.jit(init_fn, out_shardings=out_shardings)()


def bytes_per_device(tree: Any) -> dict[jax.Device, int]:
  """Bytes each device holds of the arrays in `tree` (addressable shards only)."""
  out: dict[jax.Device, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in getattr(leaf, 'addressable_shards', ()):
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


def to_host(x: Any) -> np.ndarray:
  """An array as numpy on every process, gathering it if it spans processes."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def sum_over_processes(count: int) -> int:
  """The sum of a per-process count; a collective when there are several processes."""
  if jax.process_count() == 1:
    return int(count)
  return int(np.sum(multihost_utils.process_allgather(np.asarray(count, np.int64))))


# ---- multi-host ---------------------------------------------------------------------

_ENV = ('MMGEN_COORDINATOR', 'MMGEN_NUM_PROCESSES', 'MMGEN_PROCESS_ID')
_AUTO_ENV = 'MMGEN_AUTO_DISTRIBUTED'  # '1': let JAX detect the cluster (Cloud TPU VMs)


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           env: Mapping[str, str] | None = None) -> None:
  """Joins the multi-process job, or does nothing for a single process.

  Explicit arguments win, then $MMGEN_COORDINATOR / $MMGEN_NUM_PROCESSES /
  $MMGEN_PROCESS_ID. With none of them, JAX's cluster auto-detection runs in a
  SLURM, Open MPI or GKE TPU job (seen from their environment variables), or
  wherever $MMGEN_AUTO_DISTRIBUTED=1 says so: a Cloud TPU VM shows itself only
  through its metadata server, so `launch/tpu_vm.sh` sets it. Anywhere else it
  is one process. Call before any other JAX use.
  """
  env = os.environ if env is None else env
  coordinator_address = coordinator_address or env.get(_ENV[0]) or None
  if num_processes is None and env.get(_ENV[1]):
    num_processes = int(env[_ENV[1]])
  if process_id is None and env.get(_ENV[2]):
    process_id = int(env[_ENV[2]])

  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    missing = [n for n, v in zip(_ENV, explicit) if v is None]
    if missing:
      raise ValueError(f'multi-process start needs the coordinator address, the number of '
                       f'processes and this process id; missing {missing} (flags or env).')
    if num_processes == 1:
      return
    if not 0 <= process_id < num_processes:
      raise ValueError(f'process id {process_id} is not in [0, {num_processes}).')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return
  if env.get(_AUTO_ENV) == '1' or _cluster_detected(env):
    jax.distributed.initialize()  # JAX reads the cluster's size and this process's id


def _cluster_detected(env: Mapping[str, str]) -> bool:
  """A multi-process cluster JAX can configure itself from (its auto-detect list)."""
  if 'SLURM_JOB_ID' in env and int(env.get('SLURM_NTASKS', '1')) > 1:
    return True
  if int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return True
  if env.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0:  # multi-host TPU VM slice
    return True
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return True
  return False
