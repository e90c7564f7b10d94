"""Training workdirs written by `train.py`: `config.json`, `class_names.json` and Orbax
checkpoints under `checkpoints/<step>/`. Read only: a workdir is made by training.

The path may be the workdir (its latest step), its `checkpoints` folder, or one step's folder
(`workdir/checkpoints/1000`). Reading goes through `vit_jax.train.checkpoint.restore`, so the model is
rebuilt from the saved config and only the weights are read: the EMA of the params when the run
kept one (what it evaluated), else the params; `weights='ema'|'params'` chooses.
"""

import dataclasses
import os

from vit_jax.train import checkpoint
from vit_jax.train import workdir as workdir_lib
from vit_jax.errors import UserError
from vit_jax.weights import tree

WEIGHTS = checkpoint.WEIGHTS  # 'ema', 'params'


def locate(path):
  """`(workdir, step or None)` for a workdir, its checkpoints folder or a step folder (local or
  gs://); else None."""
  path = workdir_lib.as_path(path)
  candidates = [(path, None)]
  if path.name == workdir_lib.CHECKPOINT_SUBDIR:
    candidates.append((path.parent, None))
  if path.parent.name == workdir_lib.CHECKPOINT_SUBDIR and path.name.isdigit():
    candidates.append((path.parent.parent, int(path.name)))
  for workdir, step in candidates:
    files = workdir_lib.RunFiles(workdir)
    if files.config_json.exists() and files.checkpoints.is_dir():
      return os.fspath(workdir), step
  return None


def read(path, weights=None, log=None):
  """Reads the weights of a workdir's checkpoint.

  Args:
    path: the workdir, its checkpoints folder or one step's folder.
    weights: 'ema', 'params', or None: 'ema' when the run kept an EMA, else 'params'.
    log: where the choice is reported (default: stderr).

  Returns:
    (params, metadata): params a flat `{'a/b': np.ndarray}`; metadata has `format`,
    `model_kwargs` (the module's fields), `model_name`, `image_size`, `class_names`, `step`.
  """
  found = locate(path)
  if found is None:
    subdir = workdir_lib.CHECKPOINT_SUBDIR
    raise UserError(f'{path} is not a train.py workdir (no config.json and {subdir}/ in it, '
                    'nor above a step folder)')
  workdir, step = found
  model, params, config = checkpoint.restore(workdir, step=step, weights=weights, log=log)
  model_kwargs = {field.name: getattr(model, field.name) for field in dataclasses.fields(model)
                  if field.name not in ('parent', 'name')}
  try:
    class_names = workdir_lib.RunFiles(workdir).read_class_names()
  except UserError:
    class_names = None
  return tree.to_numpy(tree.flatten(params)), {
      'format': 'workdir', 'model_kwargs': model_kwargs, 'model_name': config.model_name,
      'image_size': config.image_size, 'class_names': class_names, 'step': step}
