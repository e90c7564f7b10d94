"""Converts between the per-layer and the scanned parameter layouts of the ViT encoder.

Per-layer (`scan=False`, the published checkpoints): `Transformer/encoderblock_{i}/...`, one
subtree per block. Scanned (`scan=True`, big_vision): one `Transformer/encoderblock/...` subtree
whose leaves have a leading layer axis. Either function returns its input's layout unchanged when
it is already in the target layout, so loaders can call them unconditionally.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.errors import UserError

_LAYER_NAME = re.compile(r'^encoderblock_(\d+)$')


def _transformer_of(params):
  """Returns (the dict holding `Transformer`, a function that rebuilds the whole tree)."""
  params = dict(params)
  if 'Transformer' not in params and 'params' in params:  # A full variables dict.
    inner, rebuild = _transformer_of(params['params'])
    return inner, lambda new: {**params, 'params': rebuild(new)}
  if 'Transformer' not in params:
    raise UserError(f'no Transformer in the parameters (top-level keys: {sorted(params)})')
  return params, lambda new: new


def _stack(leaves):
  if all(isinstance(leaf, np.ndarray) for leaf in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


def layers_to_scan(params):
  """`Transformer/encoderblock_{i}` subtrees -> one `Transformer/encoderblock` stacked on axis 0."""
  params, rebuild = _transformer_of(params)
  transformer = dict(params['Transformer'])
  layer_ids = sorted(int(m.group(1)) for m in map(_LAYER_NAME.match, transformer) if m)
  if not layer_ids:
    return rebuild(params)
  if layer_ids != list(range(len(layer_ids))):
    raise UserError(f'encoder layers are not numbered 0..{len(layer_ids) - 1}: {layer_ids}')
  blocks = [transformer.pop(f'encoderblock_{i}') for i in layer_ids]
  try:
    transformer['encoderblock'] = jax.tree.map(lambda *leaves: _stack(leaves), *blocks)
  except ValueError as e:  # Blocks with different structures or shapes.
    raise UserError(f'encoder blocks differ and cannot be stacked: {e}') from None
  return rebuild({**params, 'Transformer': transformer})


def scan_to_layers(params):
  """One `Transformer/encoderblock` stacked on axis 0 -> `Transformer/encoderblock_{i}` subtrees."""
  params, rebuild = _transformer_of(params)
  transformer = dict(params['Transformer'])
  if 'encoderblock' not in transformer:
    return rebuild(params)
  stacked = transformer.pop('encoderblock')
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(num_layers):
    transformer[f'encoderblock_{i}'] = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
  return rebuild({**params, 'Transformer': transformer})
