"""Flat '/'-joined parameter dicts, and writing files so that a failure leaves nothing behind."""

import contextlib
import os
import shutil
import tempfile

import numpy as np


def flatten(params, prefix=''):
  """Nested dict (or FrozenDict) of arrays -> `{'a/b/c': array}`; leaves kept as they are."""
  flat = {}
  for name, value in params.items():
    key = f'{prefix}{name}'
    if hasattr(value, 'items'):
      flat.update(flatten(value, prefix=f'{key}/'))
    else:
      flat[key] = value
  return flat


def unflatten(flat):
  """`{'a/b/c': array}` -> nested dicts of arrays."""
  nested = {}
  for key, value in flat.items():
    *parents, leaf = key.split('/')
    node = nested
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return nested


def to_numpy(flat):
  """Every leaf as a host numpy array (jax arrays are fetched; dtypes kept, bfloat16 included)."""
  return {key: np.asarray(value) for key, value in flat.items()}


@contextlib.contextmanager
def atomic_output(path, is_dir=False):
  """Yields a temporary path next to `path`; renames it to `path` only if the block succeeds.

  Writing to the same folder keeps the rename atomic. An existing `path` is replaced only once
  the new one is complete, so a failed conversion leaves neither a partial file nor a lost one.
  """
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  base = os.path.basename(path)
  if is_dir:
    tmp = tempfile.mkdtemp(prefix=f'.{base}.', suffix='.tmp', dir=parent)
  else:
    handle, tmp = tempfile.mkstemp(prefix=f'.{base}.', suffix='.tmp', dir=parent)
    os.close(handle)
  try:
    yield tmp
    if is_dir and os.path.isdir(path):
      # A directory cannot be replaced by rename; move the old one aside first.
      old = tempfile.mkdtemp(prefix=f'.{base}.', suffix='.old', dir=parent)
      os.rmdir(old)
      os.rename(path, old)
      os.rename(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, path)
  except BaseException:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.exists(tmp):
      os.remove(tmp)
    raise
