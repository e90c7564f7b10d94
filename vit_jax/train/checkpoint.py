"""Orbax checkpoints in `workdir/checkpoints`, and `restore` for notebooks.

A checkpoint holds two items so a notebook can read the weights without building an optimizer:
`params`, and `train_state` (optimizer state, EMA params and the step counters); `restore` reads
`params`, or `train_state`'s `ema_params` alone (a partial restore). Restores always
pass an abstract target (shapes, dtypes and shardings): without one Orbax returns plain dicts and
the optimizer state loses its types.
"""

import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from vit_jax.errors import UserError
from vit_jax.train import workdir as workdir_lib


def _train_state_item(state):
  """The non-param part of a `TrainState` as a dict (None-valued fields left out)."""
  item = {
      'step': state.step,
      'opt_state': state.opt_state,
      'skipped_updates': state.skipped_updates,
      'first_nonfinite_step': state.first_nonfinite_step,
  }
  if state.ema_params is not None:
    item['ema_params'] = state.ema_params
  return item


class Checkpointer:
  """Async saves every so often, keep-N, and restore of the newest checkpoint that reads."""

  def __init__(self, directory, keep=3, async_save=True):
    """`directory`: the workdir's checkpoints folder (`RunFiles.checkpoints`), an epath."""
    self.directory = directory
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=('params', 'train_state'))

  def steps(self):
    """The steps of the checkpoints on disk, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, state, force=False):
    """Starts an (async) save of `state` at its step; returns whether one was started."""
    step = int(jax.device_get(state.step))
    if step in self._manager.all_steps():
      return False
    return self._manager.save(step, force=force, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        train_state=ocp.args.StandardSave(_train_state_item(state))))

  def wait(self):
    """Blocks until every async save has been committed to disk."""
    self._manager.wait_until_finished()

  def restore(self, step, abstract_state):
    """Restores the checkpoint at `step` into the structure (and shardings) of `abstract_state`."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_state.params),
        train_state=ocp.args.StandardRestore(_train_state_item(abstract_state))))
    rest = restored['train_state']
    return abstract_state.replace(
        step=rest['step'], params=restored['params'], opt_state=rest['opt_state'],
        ema_params=rest.get('ema_params'), skipped_updates=rest['skipped_updates'],
        first_nonfinite_step=rest['first_nonfinite_step'])

  def restore_latest(self, abstract_state, log=print):
    """Restores the newest checkpoint that reads into the structure of `abstract_state`.

    A checkpoint that fails to read (a truncated or corrupt file) is reported and skipped, and
    the one before it is tried. Returns `(state, step)`, or `(None, None)` with no checkpoints.
    """
    for step in reversed(self.steps()):
      try:
        return self.restore(step, abstract_state), step
      except Exception as e:  # pylint: disable=broad-except
        message = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        log(f'warning: checkpoint at step {step} in {self.directory} could not be read '
            f'({type(e).__name__}: {message}); trying the previous one')
    return None, None

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


WEIGHTS = ('ema', 'params')


def restore(workdir, step=None, weights=None, log=None):
  """`(model, params, config)` from a training workdir: the latest step, or `step`.

  `weights`: 'ema' (the EMA of the params, which the run evaluated and logged) or 'params' (the
  raw ones); None: 'ema' when the run had EMA (`optimizer.ema_decay > 0`), else 'params'. The
  choice is reported through `log` (default: one line on stderr).

  Builds the model from the saved (resolved) config and reads only those weights (the EMA ones
  as a partial restore of the `train_state` item: no optimizer state, no data), onto the
  default device; works on a CPU-only machine for a checkpoint written anywhere, local or
  `gs://`.
  """
  from vit_jax.train import build  # Imported here: the model is needed only once there is a workdir.

  files = workdir_lib.RunFiles(workdir)
  config = files.read_config()
  ema_decay = config.optimizer.ema_decay
  if weights is None:
    weights = 'ema' if ema_decay else 'params'
  if weights not in WEIGHTS:
    raise UserError(f'weights={weights!r} is unknown; valid: {", ".join(WEIGHTS)}')
  if weights == 'ema' and not ema_decay:
    raise UserError(f"weights='ema': the run in {workdir} kept no EMA "
                    "(optimizer.ema_decay=0); use weights='params'")
  num_classes = len(files.read_class_names())
  model = build.model_from_config(config, num_classes)
  device_sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract_params = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device_sharding),
      build.abstract_params(config, model))

  manager = ocp.CheckpointManager(files.checkpoints, item_names=('params', 'train_state'))
  steps = sorted(manager.all_steps())
  if not steps:
    raise UserError(f'no checkpoints in {files.checkpoints}')
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise UserError(f'no checkpoint at step {step} in {files.checkpoints}; steps there: {steps}')
  if weights == 'ema':
    restored = manager.restore(step, args=ocp.args.Composite(train_state=ocp.args.PyTreeRestore(
        {'ema_params': abstract_params}, partial_restore=True,
        restore_args=ocp.checkpoint_utils.construct_restore_args(
            {'ema_params': abstract_params}))))
    params = restored['train_state']['ema_params']
    chosen = (f"the EMA weights (optimizer.ema_decay={ema_decay}, what the run evaluated; "
              "weights='params' for the raw ones)")
  else:
    params = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params)))['params']
    chosen = ("the raw params (weights='ema' for their EMA, which the run evaluated)"
              if ema_decay else 'the params (the run kept no EMA)')
  manager.close()
  (log or _to_stderr)(f'restored {chosen} of step {step} from {workdir}')
  return model, params, config


def _to_stderr(line):
  print(line, file=sys.stderr)


def restore_train_state(workdir, step=None):
  """The full `TrainState` (params, optimizer state, EMA, counters) of a workdir's checkpoint.

  For inspecting or comparing runs; `restore` is the lighter params-only path.
  """
  from vit_jax.train import build  # pylint: disable=g-import-not-at-top
  files = workdir_lib.RunFiles(workdir)
  config = files.read_config()
  num_classes = len(files.read_class_names())
  abstract_state = build.parts(config, num_classes).abstract_state
  checkpointer = Checkpointer(files.checkpoints, keep=config.keep_checkpoints)
  try:
    if step is None:
      state, _ = checkpointer.restore_latest(abstract_state)
    else:
      state = checkpointer.restore(step, abstract_state)
  finally:
    checkpointer.close()
  if state is None:
    raise UserError(f'no readable checkpoint in {checkpointer.directory}')
  return state


def tree_digest(tree):
  """A hex digest of every array in a pytree (for bit-exact comparisons across runs)."""
  import hashlib
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return digest.hexdigest()
