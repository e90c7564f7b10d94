"""The device mesh and every sharding rule, stated once.

The mesh has two axes, `data` and `fsdp`. The batch is split over both (every device sees its
own slice of examples). Parameters and optimizer state are replicated over `data` and, when
`fsdp > 1`, each array is split along `fsdp` on its largest dimension that divides evenly
(ZeRO-3 style: XLA gathers a layer's weights just before it is used). Arrays too small to be
worth splitting stay replicated.
"""

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vit_jax.errors import UserError

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')  # The batch dimension is split over the whole mesh.
MIN_FSDP_SHARD_SIZE = 2 ** 12  # Elements; smaller arrays are replicated.


def create_mesh(mesh_config, devices=None):
  """A `Mesh` over all devices (of all processes) with axes (data, fsdp); -1 means "the rest"."""
  devices = jax.devices() if devices is None else devices
  sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
  if list(sizes.values()).count(-1) > 1:
    raise UserError(f'mesh {sizes}: at most one axis may be -1')
  known = math.prod(size for size in sizes.values() if size != -1)
  if any(size == 0 or size < -1 for size in sizes.values()) or len(devices) % known:
    raise UserError(f'mesh {sizes} does not fit {len(devices)} devices '
                    f'(sizes must be positive and multiply to the device count)')
  sizes = {axis: (len(devices) // known if size == -1 else size) for axis, size in sizes.items()}
  if math.prod(sizes.values()) != len(devices):
    raise UserError(f'mesh {sizes} has {math.prod(sizes.values())} devices, '
                    f'but there are {len(devices)}')
  device_grid = np.asarray(devices).reshape([sizes[axis] for axis in MESH_AXES])
  # Auto axes: XLA propagates shardings inside jit (jax >= 0.12 defaults to Explicit).
  axis_types = getattr(jax.sharding, 'AxisType', None)
  if axis_types is not None:
    return Mesh(device_grid, MESH_AXES, axis_types=(axis_types.Auto,) * len(MESH_AXES))
  return Mesh(device_grid, MESH_AXES)


def batch_sharding(mesh):
  """Leading (batch) dimension split over every device in the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh):
  """The same full array on every device."""
  return NamedSharding(mesh, P())


def array_partition_spec(shape, fsdp_size):
  """The rule for one parameter or optimizer-state array of `shape`."""
  if fsdp_size <= 1 or math.prod(shape) < MIN_FSDP_SHARD_SIZE:
    return P()
  # Largest dimension first; ties go to the later dimension (the output features).
  for dim in sorted(range(len(shape)), key=lambda d: (shape[d], d), reverse=True):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def state_shardings(mesh, abstract_tree):
  """Shardings for a pytree of arrays or `ShapeDtypeStruct`s (params, optimizer state, ...)."""
  fsdp_size = mesh.shape['fsdp']

  def sharding_for(leaf):
    shape = getattr(leaf, 'shape', ())
    return NamedSharding(mesh, array_partition_spec(tuple(shape), fsdp_size))

  return jax.tree_util.tree_map(sharding_for, abstract_tree)


def global_batch(local_batch, mesh):
  """Assembles each process's numpy batch into one global array sharded over the mesh."""
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda local: jax.make_array_from_process_local_data(sharding, local), local_batch)


def describe(params):
  """One line on how the params really lie on the devices (read from the arrays themselves)."""
  leaves = jax.tree_util.tree_leaves(params)
  sharded = [leaf for leaf in leaves
             if leaf.addressable_shards[0].data.shape != leaf.shape]
  total_bytes = sum(leaf.nbytes for leaf in leaves)
  device_bytes = sum(leaf.addressable_shards[0].data.nbytes for leaf in leaves)
  return (f'params: {sum(leaf.size for leaf in leaves):,} in {len(leaves)} arrays, '
          f'{len(sharded)} sharded over fsdp; {device_bytes / 2**20:.1f} MiB per device of '
          f'{total_bytes / 2**20:.1f} MiB')
